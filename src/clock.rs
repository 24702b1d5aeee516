//! The clock every decision reads: whether consent is in force or has expired, whether a
//! key has expired, the instant a command applies the consent rules at, the "as of" of a
//! research answer, when a web console session ends and until when failed sign-ins hold an
//! account back (instants kept in the database, shared by every instance). One [`Clock`]
//! per process, held by `service::Services`, so that tests (and drills) can move time
//! forward instead of sleeping. The binary always runs on [`SystemClock`].
//!
//! Not covered, on purpose: in-process timeouts, rate limits and back-off (monotonic
//! `Instant`s: a wall clock that moves must not stretch or shorten them) and the time
//! stamps of audit entries (when a call happened, not a decision).

use std::sync::Mutex;

use chrono::{DateTime, Duration, Utc};

/// A source of the current time.
pub trait Clock: Send + Sync + 'static {
    fn now(&self) -> DateTime<Utc>;
}

/// The system's wall clock.
#[derive(Debug, Default, Clone, Copy)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> DateTime<Utc> {
        Utc::now()
    }
}

/// A clock for tests: the system clock moved forward by [`TestClock::advance`], or
/// stopped at an instant by [`TestClock::freeze_at`] (to stand exactly on a boundary).
#[derive(Debug, Default)]
pub struct TestClock {
    state: Mutex<TestTime>,
}

#[derive(Debug, Default, Clone, Copy)]
struct TestTime {
    offset: Duration,
    frozen: Option<DateTime<Utc>>,
}

impl TestClock {
    pub fn new() -> TestClock {
        TestClock::default()
    }

    /// Moves time forward by `by` (a frozen clock stays frozen, `by` later).
    pub fn advance(&self, by: Duration) {
        let mut t = self.state.lock().unwrap_or_else(|e| e.into_inner());
        match t.frozen.as_mut() {
            Some(at) => *at += by,
            None => t.offset += by,
        }
    }

    /// Stops the clock at `at`.
    pub fn freeze_at(&self, at: DateTime<Utc>) {
        self.state.lock().unwrap_or_else(|e| e.into_inner()).frozen = Some(at);
    }

    /// Lets a frozen clock run again from where it stands.
    pub fn resume(&self) {
        let mut t = self.state.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(at) = t.frozen.take() {
            t.offset = at - Utc::now();
        }
    }
}

impl Clock for TestClock {
    fn now(&self) -> DateTime<Utc> {
        let t = *self.state.lock().unwrap_or_else(|e| e.into_inner());
        t.frozen.unwrap_or_else(|| Utc::now() + t.offset)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_test_clock_moves_forward_and_stops_where_told() {
        let clock = TestClock::new();
        let before = Utc::now();
        clock.advance(Duration::days(1));
        assert!(clock.now() >= before + Duration::days(1));
        let at = before + Duration::days(30);
        clock.freeze_at(at);
        assert_eq!(clock.now(), at);
        clock.advance(Duration::seconds(5));
        assert_eq!(clock.now(), at + Duration::seconds(5));
        clock.resume();
        assert!(clock.now() >= at + Duration::seconds(5));
        assert!(SystemClock.now() >= before);
    }
}
