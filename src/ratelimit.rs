//! Per-principal rate limits (GCRA, from `governor`): a principal may make `per_minute`
//! calls of a kind, in bursts of up to that many; a refused call is told how long to wait.
//!
//! Used where a high volume of calls is itself the risk: research queries (differencing
//! attacks need many of them).

use std::num::NonZeroU32;
use std::time::Duration;

use governor::clock::{Clock, DefaultClock};
use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter};

/// A call refused by a rate limit, and when it would be allowed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("rate limit of {per_minute} {what} per minute exceeded; retry in {} ms", .retry_after.as_millis())]
pub struct RateLimited {
    pub what: &'static str,
    pub per_minute: u32,
    pub retry_after: Duration,
}

pub struct PrincipalLimiter {
    what: &'static str,
    per_minute: NonZeroU32,
    limiter: DefaultKeyedRateLimiter<i64>,
    clock: DefaultClock,
}

impl PrincipalLimiter {
    /// `per_minute` calls of `what` per principal per minute (at least 1).
    pub fn per_minute(what: &'static str, per_minute: u32) -> Self {
        let per_minute = NonZeroU32::new(per_minute.max(1)).expect("at least 1");
        PrincipalLimiter {
            what,
            per_minute,
            limiter: RateLimiter::keyed(Quota::per_minute(per_minute)),
            clock: DefaultClock::default(),
        }
    }

    /// Takes one call from `principal`'s allowance.
    pub fn check(&self, principal: i64) -> Result<(), RateLimited> {
        self.limiter.check_key(&principal).map_err(|not_until| {
            let retry_after = not_until.wait_time_from(self.clock.now());
            // Forget idle principals now and then, so memory follows the active ones.
            if self.limiter.len() > 10_000 {
                self.limiter.retain_recent();
            }
            RateLimited {
                what: self.what,
                per_minute: self.per_minute.get(),
                retry_after,
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_burst_is_allowed_then_refused_with_a_wait() {
        let limiter = PrincipalLimiter::per_minute("queries", 3);
        for _ in 0..3 {
            limiter.check(1).unwrap();
        }
        let refused = limiter.check(1).unwrap_err();
        assert!(refused.retry_after > Duration::from_secs(10));
        assert!(refused.retry_after <= Duration::from_secs(20));
        // Another principal has its own allowance.
        limiter.check(2).unwrap();
    }
}
