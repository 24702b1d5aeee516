//! Where the service's log lines go: standard error, through a writer that never fails
//! the code that logs.
//!
//! The `fmt` layer of `tracing-subscriber` reports a failed write of a line by printing
//! to standard error with `eprintln!`, which panics when that write fails as well: a
//! full disk under a log file, or a pipe whose reader has gone. The panic would end
//! whichever thread was logging, the SQLite writer's among them (defences audit of
//! 2026-12-07: every write then refused until a restart, while health said SERVING). So
//! a line that cannot be written is dropped and counted
//! (`ern_log_lines_lost_total`), and the layer's own report is off.
//!
//! Warnings that an outage makes once per call (the database away, or its disk full) are
//! [`Throttled`]: one line at most every [`OUTAGE_LINE_EVERY`], with the number of times
//! since the line before, so that a flood of calls during an outage does not become a
//! flood of log lines (a fault audit of 2026-12-07 measured 1.4 MB of log in 5 s, three
//! lines per failed call).

use std::io::{self, Write};
use std::sync::OnceLock;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// The shortest time between two lines of one [`Throttled`] warning.
pub const OUTAGE_LINE_EVERY: Duration = Duration::from_secs(10);

/// A warning written at most once every [`OUTAGE_LINE_EVERY`] (a `static` per place that
/// logs it): [`Throttled::due`] says when, and how many times it happened since the line
/// before.
pub struct Throttled {
    /// Milliseconds since the process's first throttled warning at the last line
    /// (`i64::MIN`: none yet).
    last_ms: AtomicI64,
    /// Times since the last line, this one included once it is due.
    since: AtomicU64,
}

impl Throttled {
    pub const fn new() -> Throttled {
        Throttled {
            last_ms: AtomicI64::new(i64::MIN),
            since: AtomicU64::new(0),
        }
    }

    /// Counts one occurrence; `Some(n)` when a line is due now, `n` the occurrences it
    /// covers (since the line before, this one included).
    pub fn due(&self) -> Option<u64> {
        static START: OnceLock<Instant> = OnceLock::new();
        let now = START.get_or_init(Instant::now).elapsed().as_millis() as i64;
        self.due_at(now, OUTAGE_LINE_EVERY.as_millis() as i64)
    }

    fn due_at(&self, now_ms: i64, every_ms: i64) -> Option<u64> {
        self.since.fetch_add(1, Ordering::Relaxed);
        let last = self.last_ms.load(Ordering::Relaxed);
        if last != i64::MIN && now_ms.saturating_sub(last) < every_ms {
            return None;
        }
        // One caller wins the line; the others count on.
        self.last_ms
            .compare_exchange(last, now_ms, Ordering::Relaxed, Ordering::Relaxed)
            .ok()?;
        Some(self.since.swap(0, Ordering::Relaxed))
    }
}

impl Default for Throttled {
    fn default() -> Self {
        Throttled::new()
    }
}

/// Standard error, where a failed write is a lost line, not an error.
#[derive(Debug, Default, Clone, Copy)]
pub struct LogSink;

impl LogSink {
    /// Writes `line` to `to`; a failure is counted, and the line dropped.
    fn write_line(to: &mut impl Write, line: &[u8]) {
        if to.write_all(line).is_err() {
            metrics::counter!("ern_log_lines_lost_total").increment(1);
        }
    }
}

impl Write for LogSink {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        LogSink::write_line(&mut io::stderr().lock(), buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        let _ = io::stderr().flush();
        Ok(())
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for LogSink {
    type Writer = LogSink;

    fn make_writer(&'a self) -> Self::Writer {
        LogSink
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A sink that refuses every write, as a full disk or a closed pipe does.
    struct Refusing;

    impl Write for Refusing {
        fn write(&mut self, _: &[u8]) -> io::Result<usize> {
            Err(io::Error::from(io::ErrorKind::BrokenPipe))
        }
        fn flush(&mut self) -> io::Result<()> {
            Err(io::Error::from(io::ErrorKind::BrokenPipe))
        }
    }

    #[test]
    fn a_throttled_warning_is_due_once_per_interval_with_its_count() {
        let warning = Throttled::new();
        // The first is due at once.
        assert_eq!(warning.due_at(0, 10_000), Some(1));
        assert_eq!(warning.due_at(1, 10_000), None);
        assert_eq!(warning.due_at(9_999, 10_000), None);
        // Then one line for the three since.
        assert_eq!(warning.due_at(10_000, 10_000), Some(3));
        assert_eq!(warning.due_at(10_001, 10_000), None);
        assert_eq!(warning.due_at(60_000, 10_000), Some(2));
    }

    #[test]
    fn a_line_that_cannot_be_written_is_counted_and_dropped() {
        let recorder = metrics_exporter_prometheus::PrometheusBuilder::new().build_recorder();
        let handle = recorder.handle();
        metrics::with_local_recorder(&recorder, || {
            LogSink::write_line(&mut Refusing, b"one line\n");
            LogSink::write_line(&mut Vec::new(), b"written\n");
            LogSink::write_line(&mut Refusing, b"another\n");
        });
        let rendered = handle.render();
        assert!(
            rendered.lines().any(|l| l == "ern_log_lines_lost_total 2"),
            "{rendered}"
        );
    }
}
