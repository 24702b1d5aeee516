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

use std::io::{self, Write};

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
