//! Limits on what one caller may cost the service.
//!
//! - Per-principal rates (GCRA, from `governor`): a principal may make `per_minute` calls
//!   of a kind, in bursts of up to that many. Used where a high volume of calls is itself
//!   the risk: research queries (differencing attacks need many of them), pseudonym
//!   derivations (an enumeration oracle).
//! - Per-principal calls in flight ([`CallGate`]): a principal's calls beyond its share
//!   wait for one of its own to finish, and beyond twice that are refused at once, so one
//!   caller cannot occupy every worker, connection of the pool or place in the writer's
//!   queue while others wait.
//! - [`Peer`]: how callers who have not authenticated are told apart (their network
//!   address), for the per-peer allowance of refused calls (`refusals`) and the per-peer
//!   connection cap (`connections`).
//!
//! Every refusal says how long to wait ([`RateLimited::retry_after`], sent as gRPC
//! `RetryInfo`). Nothing here is keyed by what an unauthenticated caller chooses to send:
//! principals are ids from the database, peers are addresses the kernel reports.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::num::NonZeroU32;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use governor::clock::{Clock, DefaultClock};
use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// Which limit refused a call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Limit {
    /// `per_minute` calls of `what` per principal per minute.
    Rate { what: &'static str, per_minute: u32 },
    /// `max` calls of one principal running at once (and as many waiting).
    InFlight { max: u32 },
    /// `per_minute` refused unauthenticated calls per network peer per minute.
    PeerRefusals { per_minute: u32 },
    /// `max` invalid items in one bulk stream.
    StreamInvalidItems { max: u32 },
    /// Console sign-ins with one name held back after failures in a row (whatever the
    /// name names).
    SignInLocked,
}

impl std::fmt::Display for Limit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Limit::Rate { what, per_minute } => {
                write!(f, "rate limit of {per_minute} {what} per minute exceeded")
            }
            Limit::InFlight { max } => write!(
                f,
                "too many calls of yours in flight (at most {max} run and {max} wait)"
            ),
            Limit::PeerRefusals { per_minute } => write!(
                f,
                "too many refused calls from your address (at most {per_minute} per minute)"
            ),
            Limit::StreamInvalidItems { max } => write!(
                f,
                "this stream sent {max} invalid items and is ended; fix the items and open a new one"
            ),
            Limit::SignInLocked => write!(
                f,
                "too many failed sign-ins with this name: sign-in is held back for a while"
            ),
        }
    }
}

/// A call refused by a limit, and when it would be allowed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("{limit}; retry in {} ms", .retry_after.as_millis())]
pub struct RateLimited {
    pub limit: Limit,
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
                limit: Limit::Rate {
                    what: self.what,
                    per_minute: self.per_minute.get(),
                },
                retry_after,
            }
        })
    }
}

/// A caller as the network sees it, for limits on callers who have not (yet) proven who
/// they are: an IPv4 address, or an IPv6 /64 (what one subscriber is typically given, so
/// that rotating addresses inside it does not make a new peer). Behind a proxy every
/// caller is the proxy.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Peer {
    V4([u8; 4]),
    V6([u8; 8]),
    /// The transport reported no address.
    Unknown,
    /// Every peer past a table's capacity, together.
    Other,
}

impl Peer {
    pub fn of(addr: Option<SocketAddr>) -> Peer {
        match addr.map(|a| a.ip().to_canonical()) {
            Some(IpAddr::V4(ip)) => Peer::V4(ip.octets()),
            Some(IpAddr::V6(ip)) => {
                let mut net = [0u8; 8];
                net.copy_from_slice(&ip.octets()[..8]);
                Peer::V6(net)
            }
            None => Peer::Unknown,
        }
    }
}

impl std::fmt::Display for Peer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Peer::V4(ip) => write!(f, "{}", std::net::Ipv4Addr::from(*ip)),
            Peer::V6(net) => {
                let mut full = [0u8; 16];
                full[..8].copy_from_slice(net);
                write!(f, "{}/64", std::net::Ipv6Addr::from(full))
            }
            Peer::Unknown => f.write_str("unknown"),
            Peer::Other => f.write_str("other"),
        }
    }
}

/// Principals whose idle entries are dropped once the table holds more than this many.
const GATE_PRUNE_ABOVE: usize = 1024;
/// What a caller refused for too many calls in flight is told to wait.
const IN_FLIGHT_RETRY: Duration = Duration::from_secs(1);

/// Calls in flight per principal: at most `max` run at once; up to `max` more wait for
/// one of them to finish; beyond that a call is refused at once (RESOURCE_EXHAUSTED). The
/// table is keyed by principal id (rows of the database, never caller input) and idle
/// entries are dropped.
pub struct CallGate {
    max: u32,
    slots: Mutex<HashMap<i64, Arc<Slot>>>,
}

struct Slot {
    running: Arc<Semaphore>,
    admitted: Arc<Semaphore>,
}

/// A principal's place for one call; freed when dropped.
#[derive(Debug)]
pub struct CallPermit {
    _running: OwnedSemaphorePermit,
    _admitted: OwnedSemaphorePermit,
}

impl CallGate {
    /// At most `max` (at least 1) calls per principal at once, and as many waiting.
    pub fn new(max: u32) -> CallGate {
        CallGate {
            max: max.max(1),
            slots: Mutex::new(HashMap::new()),
        }
    }

    fn refused(&self) -> RateLimited {
        RateLimited {
            limit: Limit::InFlight { max: self.max },
            retry_after: IN_FLIGHT_RETRY,
        }
    }

    /// Takes a place for a call of `principal`, waiting while `max` of its calls run.
    pub async fn enter(&self, principal: i64) -> Result<CallPermit, RateLimited> {
        let (running, admitted) = {
            let mut slots = self.slots.lock().unwrap_or_else(|e| e.into_inner());
            if slots.len() > GATE_PRUNE_ABOVE {
                let idle = 2 * self.max as usize;
                slots.retain(|_, slot| slot.admitted.available_permits() < idle);
            }
            let slot = slots.entry(principal).or_insert_with(|| {
                Arc::new(Slot {
                    running: Arc::new(Semaphore::new(self.max as usize)),
                    admitted: Arc::new(Semaphore::new(2 * self.max as usize)),
                })
            });
            // Admitted under the lock: a slot holding an admission is never pruned, so a
            // principal never gets a second slot while this call waits to run.
            let admitted = slot
                .admitted
                .clone()
                .try_acquire_owned()
                .map_err(|_| self.refused())?;
            (slot.running.clone(), admitted)
        };
        let running = running.acquire_owned().await.map_err(|_| self.refused())?;
        Ok(CallPermit {
            _running: running,
            _admitted: admitted,
        })
    }

    /// Principals with an entry (for tests: the table follows the active ones).
    pub fn tracked(&self) -> usize {
        self.slots.lock().unwrap_or_else(|e| e.into_inner()).len()
    }
}

/// Bulk-stream items of one principal processed at once, across all its open streams: at
/// most `max`; the next item of any of its streams is not read until one finishes (HTTP/2
/// flow control then holds the client back). Also a principal's research tables under
/// protection (`service::research::ProtectionPool`, one at a time). Keyed by principal
/// id; idle entries dropped.
pub struct ItemGate {
    max: u32,
    slots: Mutex<HashMap<i64, Arc<Semaphore>>>,
}

impl ItemGate {
    /// At most `max` (at least 1) items per principal at once.
    pub fn new(max: u32) -> ItemGate {
        ItemGate {
            max: max.max(1),
            slots: Mutex::new(HashMap::new()),
        }
    }

    /// A place for one item of `principal`, waiting while `max` of its items are in
    /// progress; freed when dropped.
    pub async fn enter(&self, principal: i64) -> OwnedSemaphorePermit {
        let slot = {
            let mut slots = self.slots.lock().unwrap_or_else(|e| e.into_inner());
            if slots.len() > GATE_PRUNE_ABOVE {
                // Kept while in use, and while a caller that took it out waits for it (it
                // holds a handle): pruned then, the principal would get a second one.
                let max = self.max as usize;
                slots.retain(|_, slot| {
                    slot.available_permits() < max || Arc::strong_count(slot) > 1
                });
            }
            slots
                .entry(principal)
                .or_insert_with(|| Arc::new(Semaphore::new(self.max as usize)))
                .clone()
        };
        slot.acquire_owned()
            .await
            .expect("the gate's semaphores are never closed")
    }

    /// Principals with an entry (for tests).
    pub fn tracked(&self) -> usize {
        self.slots.lock().unwrap_or_else(|e| e.into_inner()).len()
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

    /// Polls `fut` once: `Some` if it finished, `None` if it would wait.
    async fn poll_once<F: std::future::Future + Unpin>(fut: &mut F) -> Option<F::Output> {
        tokio::select! {
            biased;
            out = fut => Some(out),
            () = std::future::ready(()) => None,
        }
    }

    #[tokio::test]
    async fn a_principals_items_wait_beyond_the_cap_across_its_streams() {
        let gate = ItemGate::new(2);
        let first = gate.enter(7).await;
        let _second = gate.enter(7).await;
        let mut third = Box::pin(gate.enter(7));
        assert!(poll_once(&mut third).await.is_none(), "a third item waits");
        // Another principal has its own.
        let _other = gate.enter(8).await;
        drop(first);
        assert!(
            poll_once(&mut third).await.is_some(),
            "and goes once one is done"
        );
    }

    #[tokio::test]
    async fn idle_item_entries_are_dropped() {
        let gate = ItemGate::new(1);
        for principal in 0..(GATE_PRUNE_ABOVE as i64 + 10) {
            drop(gate.enter(principal).await);
        }
        assert!(gate.tracked() <= GATE_PRUNE_ABOVE + 1, "{}", gate.tracked());
    }

    #[tokio::test]
    async fn calls_beyond_the_share_wait_and_beyond_twice_are_refused() {
        let gate = CallGate::new(2);
        let first = gate.enter(1).await.unwrap();
        let _second = gate.enter(1).await.unwrap();
        let mut third = Box::pin(gate.enter(1));
        let mut fourth = Box::pin(gate.enter(1));
        assert!(
            poll_once(&mut third).await.is_none(),
            "the third call waits"
        );
        assert!(poll_once(&mut fourth).await.is_none(), "so does the fourth");
        let refused = gate.enter(1).await.unwrap_err();
        assert_eq!(refused.limit, Limit::InFlight { max: 2 });
        // Another principal is not held up.
        let _other = gate.enter(2).await.unwrap();
        drop(first);
        assert!(poll_once(&mut third).await.unwrap().is_ok());
    }

    #[tokio::test]
    async fn idle_principals_are_forgotten() {
        let gate = CallGate::new(1);
        let _busy = gate.enter(-1).await.unwrap();
        for principal in 0..(3 * GATE_PRUNE_ABOVE as i64) {
            drop(gate.enter(principal).await.unwrap());
        }
        assert!(gate.tracked() <= GATE_PRUNE_ABOVE + 1, "{}", gate.tracked());
        // The busy principal's entry was kept: its next call still waits.
        let mut next = Box::pin(gate.enter(-1));
        assert!(poll_once(&mut next).await.is_none());
    }

    #[test]
    fn peers_are_addresses_and_ipv6_slash_64s() {
        let a: SocketAddr = "192.0.2.7:4000".parse().unwrap();
        let b: SocketAddr = "192.0.2.7:4001".parse().unwrap();
        assert_eq!(Peer::of(Some(a)), Peer::of(Some(b)));
        assert_eq!(Peer::of(Some(a)).to_string(), "192.0.2.7");
        let mapped: SocketAddr = "[::ffff:192.0.2.7]:1".parse().unwrap();
        assert_eq!(Peer::of(Some(mapped)), Peer::of(Some(a)));
        let x: SocketAddr = "[2001:db8:1:2::1]:1".parse().unwrap();
        let y: SocketAddr = "[2001:db8:1:2:ffff::9]:1".parse().unwrap();
        let z: SocketAddr = "[2001:db8:1:3::1]:1".parse().unwrap();
        assert_eq!(Peer::of(Some(x)), Peer::of(Some(y)));
        assert_ne!(Peer::of(Some(x)), Peer::of(Some(z)));
        assert_eq!(Peer::of(Some(x)).to_string(), "2001:db8:1:2::/64");
        assert_eq!(Peer::of(None), Peer::Unknown);
    }
}
