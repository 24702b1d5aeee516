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
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use tracing::Level;

/// The shortest time between two lines of one [`Throttled`] warning.
pub const OUTAGE_LINE_EVERY: Duration = Duration::from_secs(10);

/// A warning written at most once every [`OUTAGE_LINE_EVERY`] (a `static` per place that
/// logs it): [`Throttled::due`] says when, and how many times it happened since the line
/// before. What happened after the last line is written by [`flush_pending`] once a line
/// is due again (the server runs [`flush_pending_every`]: within 11 s of the last line),
/// and at shutdown, so that the
/// count of an outage's last moments does not wait for the next outage (a defences audit
/// of 2026-12-07: "calls=1" logged for an incident of 2,315 such answers, the rest never).
pub struct Throttled {
    /// What the warning says, for the line [`flush_pending`] writes.
    what: &'static str,
    level: Level,
    /// Milliseconds since the process's first throttled warning at the last line
    /// (`i64::MIN`: none yet).
    last_ms: AtomicI64,
    /// Times since the last line, this one included once it is due.
    since: AtomicU64,
    /// Whether it is in [`PENDING`] (from its first occurrence).
    listed: AtomicBool,
}

/// Every [`Throttled`] warning that has occurred, for [`flush_pending`].
static PENDING: Mutex<Vec<&'static Throttled>> = Mutex::new(Vec::new());

/// Milliseconds since the first time this process asked.
fn now_ms() -> i64 {
    static START: OnceLock<Instant> = OnceLock::new();
    START.get_or_init(Instant::now).elapsed().as_millis() as i64
}

impl Throttled {
    /// A warning at `level` (`WARN` or `ERROR`), `what` saying what it counts.
    pub const fn new(level: Level, what: &'static str) -> Throttled {
        Throttled {
            what,
            level,
            last_ms: AtomicI64::new(i64::MIN),
            since: AtomicU64::new(0),
            listed: AtomicBool::new(false),
        }
    }

    /// Counts one occurrence; `Some(n)` when a line is due now, `n` the occurrences it
    /// covers (since the line before, this one included).
    pub fn due(&'static self) -> Option<u64> {
        if !self.listed.swap(true, Ordering::AcqRel) {
            PENDING
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .push(self);
        }
        self.due_at(now_ms(), OUTAGE_LINE_EVERY.as_millis() as i64)
    }

    fn due_at(&self, now_ms: i64, every_ms: i64) -> Option<u64> {
        // An occurrence takes a due line itself, so that the line carries what it says
        // (its error); only the occurrences it covers are in `since` (those that found no
        // line due), which is what [`flush_pending`] takes: after a quiet spell (`since`
        // 0) the timer never takes the line of a new incident.
        if self.take_line(now_ms, every_ms) {
            return Some(self.since.swap(0, Ordering::Relaxed) + 1);
        }
        self.since.fetch_add(1, Ordering::Relaxed);
        None
    }

    /// Whether a line is due at `now_ms` (`every_ms` after the last; at once with
    /// `every_ms` 0) and this caller takes it: one caller wins a line, the others count on.
    fn take_line(&self, now_ms: i64, every_ms: i64) -> bool {
        let last = self.last_ms.load(Ordering::Relaxed);
        if last != i64::MIN && now_ms.saturating_sub(last) < every_ms {
            return false;
        }
        self.last_ms
            .compare_exchange(last, now_ms, Ordering::Relaxed, Ordering::Relaxed)
            .is_ok()
    }

    /// The occurrences not yet written, when there are some and a line is due at `now_ms`;
    /// the line is then taken.
    fn take_at(&self, now_ms: i64, every_ms: i64) -> Option<u64> {
        if self.since.load(Ordering::Relaxed) == 0 || !self.take_line(now_ms, every_ms) {
            return None;
        }
        Some(self.since.swap(0, Ordering::Relaxed)).filter(|&times| times > 0)
    }
}

/// Writes, for every [`Throttled`] warning that occurred since its last line, a line with
/// the number of times: those due now (a line at most every [`OUTAGE_LINE_EVERY`]), or
/// all of them with `all` (at shutdown).
pub fn flush_pending(all: bool) {
    let every = if all {
        0
    } else {
        OUTAGE_LINE_EVERY.as_millis() as i64
    };
    let now = now_ms();
    let warnings = PENDING
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .clone();
    for warning in warnings {
        if let Some(times) = warning.take_at(now, every) {
            if warning.level == Level::ERROR {
                tracing::error!(
                    warning = warning.what,
                    times,
                    "more of this since its last line"
                );
            } else {
                tracing::warn!(
                    warning = warning.what,
                    times,
                    "more of this since its last line"
                );
            }
        }
    }
}

/// How often the server looks for counts to write ([`flush_pending_every`]): a count is
/// written at most this long after its line is due.
pub const FLUSH_EVERY: Duration = Duration::from_secs(1);

/// Runs [`flush_pending`] every [`FLUSH_EVERY`] (a few atomic reads per warning that
/// occurred), until dropped: what came after a warning's last line is written within
/// [`OUTAGE_LINE_EVERY`] and [`FLUSH_EVERY`] of that line.
pub async fn flush_pending_every() {
    let mut tick = tokio::time::interval(FLUSH_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        flush_pending(false);
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
        let warning = Throttled::new(Level::WARN, "test");
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
    fn what_came_after_the_last_line_is_written_once_a_line_is_due_or_at_the_end() {
        let warning = Throttled::new(Level::WARN, "test");
        assert_eq!(warning.take_at(0, 10_000), None, "nothing happened");
        assert_eq!(warning.due_at(0, 10_000), Some(1));
        assert_eq!(warning.due_at(1, 10_000), None);
        assert_eq!(warning.due_at(2, 10_000), None);
        // The timer's flush before a line is due writes nothing; once due, the two since.
        // (A new occurrence then would have taken the line itself, with the two.)
        assert_eq!(warning.take_at(9_999, 10_000), None);
        assert_eq!(warning.take_at(10_000, 10_000), Some(2));
        assert_eq!(warning.take_at(30_000, 10_000), None, "each counted once");
        // That line counts as the last: the next occurrence waits its interval.
        assert_eq!(warning.due_at(15_000, 10_000), None);
        // At shutdown, everything pending, due or not.
        assert_eq!(warning.take_at(15_001, 0), Some(1));
        assert_eq!(warning.take_at(15_002, 0), None);
        // After a quiet spell the timer takes nothing, and the next occurrence its own
        // line (with its error): the timer never takes a new incident's first line.
        assert_eq!(warning.take_at(40_000, 10_000), None);
        assert_eq!(warning.due_at(40_001, 10_000), Some(1));
    }

    #[test]
    fn every_warning_that_occurred_is_flushed() {
        static WARNING: Throttled = Throttled::new(Level::ERROR, "flushed in a test");
        assert_eq!(WARNING.due(), Some(1));
        assert_eq!(WARNING.due(), None);
        assert!(
            PENDING
                .lock()
                .unwrap()
                .iter()
                .any(|listed| std::ptr::eq(*listed, &WARNING)),
            "listed at its first occurrence"
        );
        flush_pending(true);
        assert_eq!(
            WARNING.since.load(Ordering::Relaxed),
            0,
            "the one pending written"
        );
        flush_pending(true);
        assert_eq!(
            PENDING
                .lock()
                .unwrap()
                .iter()
                .filter(|listed| std::ptr::eq(**listed, &WARNING))
                .count(),
            1
        );
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
