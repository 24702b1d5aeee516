//! Calls refused before anyone authenticated: a per-peer allowance, and their audit
//! summary.
//!
//! A caller without a valid key costs the service whatever it does before refusing:
//! reading the key's row, and once an audit row per refusal. Garbage tokens from a few
//! connections committed thousands of audit rows a second. So:
//!
//! - **Summarised, not logged one by one.** A call that ends without an authenticated
//!   principal is counted in memory per peer, principal text (`key:<id>` when the key id
//!   exists), method and outcome ([`Refusals::note`]); every `--refusal-summary-secs` (and
//!   at shutdown) each count becomes one audit entry (`principal` = `peer:<address>`,
//!   `items` = the number of calls). At most [`MAX_KEYS_PER_PEER`] counts per peer and
//!   [`MAX_SUMMARY_KEYS`] in all per interval; past them, counts are folded, so refused
//!   calls add a bounded number of audit rows whatever they vary. Authenticated calls are
//!   audited one by one as before.
//! - **Limited per peer.** Each refusal of authentication (and an authentication
//!   abandoned half-way, `service::ChargedIfAbandoned`) takes one from the peer's allowance (a token
//!   bucket of `--refusals-per-peer-per-minute`, refilled at that rate; refusals of calls
//!   in flight together can take it below zero, by at most five minutes of it, and are
//!   repaid first). A peer with none left is refused before anything else (RESOURCE_EXHAUSTED with the time to wait),
//!   without a database read, unless it presents a key that authenticated a call in this
//!   process and has not been found dead since (`KeyVerifier::known_good`): a valid caller
//!   behind the same address keeps working.
//!
//! Memory follows the attack and then goes back: both tables are capped (past the cap,
//! new peers share one [`Peer::Other`] entry), the summary is emptied at every flush, and
//! a peer whose allowance has refilled is forgotten at the next flush.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use chrono::{DateTime, SecondsFormat, Utc};
use tokio::sync::oneshot;
use tokio::task::JoinSet;
use tracing::{debug, warn};

use crate::audit::Entry;
use crate::ratelimit::{Limit, Peer, RateLimited};
use crate::store::writer::{Command, Writer};

/// Most peers with an allowance in use; past it, new peers share [`Peer::Other`].
const MAX_PEERS: usize = 100_000;
/// Most distinct summary counts per interval; past it, new ones are kept under
/// [`Peer::Other`] (and without a key id). With the per-peer cap below, at most about
/// this many audit rows per interval, however many addresses refuse calls: 1,000 rows of
/// about 250 bytes a minute at the default interval, about 360 MB a day at the worst.
const MAX_SUMMARY_KEYS: usize = 1_000;
/// Most distinct summary counts of one peer per interval; past it, its further ones are
/// kept in one count of its own, without a key id, method or outcome (a caller without a
/// key that varies the method and the outcome made about one row per call before,
/// 2026-12-07).
const MAX_KEYS_PER_PEER: usize = 8;
/// The method and outcome of a folded count.
const FOLDED: &str = "(other)";

/// The counts of one interval.
#[derive(Default)]
struct Summary {
    counts: HashMap<SummaryKey, i64>,
    /// Distinct counts per peer (folded ones not counted).
    keys_per_peer: HashMap<Peer, usize>,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct SummaryKey {
    peer: Peer,
    /// `key:<key id>` when the presented key id exists, else empty.
    principal: String,
    method: String,
    outcome: String,
}

#[derive(Debug, Clone, Copy)]
struct Bucket {
    tokens: f64,
    at: Instant,
}

/// The per-peer allowance of refused calls and the counts to summarise.
pub struct Refusals {
    per_minute: u32,
    allowances: Mutex<HashMap<Peer, Bucket>>,
    summary: Mutex<Summary>,
    /// When the interval the summary counts began (the last drain, or the start).
    interval_start: Mutex<DateTime<Utc>>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// How far into debt a peer's allowance may go, in minutes of its allowance: a peer that
/// had that many refusals in flight at once is refused for at most this long after them
/// (plus the time one refusal takes to come back). Short, because everyone behind the
/// address waits too (the web console's sign-ins, and API keys not yet used in this
/// process); long enough that a burst of calls in flight together is repaid at the
/// allowance's rate rather than let through again at every refill.
const MAX_DEBT_MINUTES: f64 = 5.0;

impl Refusals {
    /// `per_minute` (at least 1) refusals per peer per minute, in bursts of as many.
    pub fn per_minute(per_minute: u32) -> Refusals {
        Refusals {
            per_minute: per_minute.max(1),
            allowances: Mutex::new(HashMap::new()),
            summary: Mutex::new(Summary::default()),
            interval_start: Mutex::new(Utc::now()),
        }
    }

    fn capacity(&self) -> f64 {
        f64::from(self.per_minute)
    }

    fn refill(&self, bucket: &mut Bucket, now: Instant) {
        let elapsed = now.saturating_duration_since(bucket.at).as_secs_f64();
        bucket.tokens = (bucket.tokens + elapsed * self.capacity() / 60.0).min(self.capacity());
        bucket.at = now;
    }

    /// Whether `peer` may still be refused the expensive way (reading its key), without
    /// taking anything from its allowance.
    pub fn check(&self, peer: Peer) -> Result<(), RateLimited> {
        self.check_at(peer, Instant::now())
    }

    fn check_at(&self, peer: Peer, now: Instant) -> Result<(), RateLimited> {
        let mut allowances = lock(&self.allowances);
        let key = if allowances.contains_key(&peer) {
            peer
        } else if allowances.contains_key(&Peer::Other) && allowances.len() >= MAX_PEERS {
            Peer::Other
        } else {
            return Ok(());
        };
        let Some(bucket) = allowances.get_mut(&key) else {
            return Ok(());
        };
        self.refill(bucket, now);
        if bucket.tokens >= 1.0 {
            return Ok(());
        }
        let wait = (1.0 - bucket.tokens) * 60.0 / self.capacity();
        Err(RateLimited {
            limit: Limit::PeerRefusals {
                per_minute: self.per_minute,
            },
            retry_after: Duration::from_secs_f64(wait).max(Duration::from_millis(1)),
        })
    }

    /// Takes one refusal from `peer`'s allowance.
    pub fn charge(&self, peer: Peer) {
        self.charge_at(peer, Instant::now());
    }

    fn charge_at(&self, peer: Peer, now: Instant) {
        // Refilled peers are dropped at the next flush (`drain`), not here: pruning per
        // refusal would cost a scan of the table per call at the cap.
        let mut allowances = lock(&self.allowances);
        let key = if allowances.contains_key(&peer) || allowances.len() < MAX_PEERS {
            peer
        } else {
            Peer::Other
        };
        let full = self.capacity();
        let bucket = allowances.entry(key).or_insert(Bucket {
            tokens: full,
            at: now,
        });
        self.refill(bucket, now);
        // Below zero: calls that passed `check` together, while the allowance still had
        // one, are all charged when they fail, and the peer waits until that is repaid.
        // So a burst of concurrent calls exceeds the allowance once, not once per refill.
        // Not the allowance peers past the cap share: a flood from many addresses would
        // otherwise keep every new address out for as long.
        let floor = if key == Peer::Other {
            0.0
        } else {
            -self.capacity() * MAX_DEBT_MINUTES
        };
        bucket.tokens = (bucket.tokens - 1.0).max(floor);
    }

    /// Drops the peers whose allowance has refilled: they are as if never seen.
    fn prune(&self, allowances: &mut HashMap<Peer, Bucket>, now: Instant) {
        allowances.retain(|_, bucket| {
            self.refill(bucket, now);
            bucket.tokens < self.capacity()
        });
        if allowances.is_empty() {
            allowances.shrink_to_fit();
        }
    }

    /// Counts a call that ended without an authenticated principal. A peer's count past
    /// its [`MAX_KEYS_PER_PEER`] distinct ones is folded into one of its own; past
    /// [`MAX_SUMMARY_KEYS`] in all, into [`Peer::Other`]'s.
    pub fn note(&self, peer: Peer, principal: &str, method: &str, outcome: &str) {
        let mut summary = lock(&self.summary);
        let Summary {
            counts,
            keys_per_peer,
        } = &mut *summary;
        let mut key = SummaryKey {
            peer,
            principal: principal.to_owned(),
            method: method.to_owned(),
            outcome: outcome.to_owned(),
        };
        if !counts.contains_key(&key) {
            let of_peer = keys_per_peer.get(&peer).copied().unwrap_or(0);
            if of_peer >= MAX_KEYS_PER_PEER {
                key.principal.clear();
                key.method = FOLDED.to_owned();
                key.outcome = FOLDED.to_owned();
            }
            if !counts.contains_key(&key) && counts.len() >= MAX_SUMMARY_KEYS {
                key.peer = Peer::Other;
                key.principal.clear();
                key.method = FOLDED.to_owned();
                key.outcome = FOLDED.to_owned();
            }
            if !counts.contains_key(&key) && key.method != FOLDED {
                *keys_per_peer.entry(key.peer).or_insert(0) += 1;
            }
        }
        *counts.entry(key).or_insert(0) += 1;
    }

    /// Takes the counts noted so far as audit entries (one per peer, principal, method and
    /// outcome, `items` = the number of calls), and forgets refilled peers.
    pub fn drain(&self) -> Vec<Entry> {
        self.drain_at(Instant::now())
    }

    fn drain_at(&self, now: Instant) -> Vec<Entry> {
        self.prune(&mut lock(&self.allowances), now);
        let (counts, interval) = {
            // Taken together, so that every count falls in exactly one interval.
            let mut summary = lock(&self.summary);
            let end = Utc::now();
            let start = std::mem::replace(&mut *lock(&self.interval_start), end);
            let Summary { counts, .. } = std::mem::take(&mut *summary);
            (counts, interval_text(start, end))
        };
        let mut entries: Vec<Entry> = counts
            .into_iter()
            .map(|(key, count)| Entry {
                principal: if key.principal.is_empty() {
                    format!("peer:{}", key.peer)
                } else {
                    format!("peer:{} {}", key.peer, key.principal)
                },
                method: key.method,
                outcome: key.outcome,
                items: count,
                target: interval.clone(),
                ..Entry::default()
            })
            .collect();
        entries.sort_by(|a, b| {
            (&a.principal, &a.method, &a.outcome).cmp(&(&b.principal, &b.method, &b.outcome))
        });
        entries
    }

    /// Peers with an allowance in use.
    pub fn tracked_peers(&self) -> usize {
        lock(&self.allowances).len()
    }

    /// Commits the summary entries through the writer (each in the audit chain).
    pub async fn flush(&self, writer: &Writer) {
        let entries = self.drain();
        if entries.is_empty() {
            return;
        }
        let calls: i64 = entries.iter().map(|e| e.items).sum();
        let mut appends = JoinSet::new();
        for entry in entries {
            let writer = writer.clone();
            appends.spawn(async move {
                let items = entry.items;
                (
                    items,
                    writer.execute(Command::Audit, Some(entry)).await.is_ok(),
                )
            });
        }
        let mut lost = 0;
        while let Some(done) = appends.join_next().await {
            match done {
                Ok((_, true)) => {}
                Ok((items, false)) => lost += items,
                Err(_) => {}
            }
        }
        if lost > 0 {
            warn!(
                lost,
                calls, "summary of refused calls not committed to the audit log"
            );
        } else {
            debug!(
                calls,
                "refused unauthenticated calls summarised in the audit log"
            );
        }
    }
}

/// The interval a summary entry counts, as its audit `target`: `refused <start>/<end>`
/// (an ISO 8601 interval, UTC, milliseconds).
fn interval_text(start: DateTime<Utc>, end: DateTime<Utc>) -> String {
    format!(
        "refused {}/{}",
        start.to_rfc3339_opts(SecondsFormat::Millis, true),
        end.to_rfc3339_opts(SecondsFormat::Millis, true)
    )
}

/// The task that flushes the summary periodically; [`Flusher::finish`] flushes once more
/// and stops it (at shutdown, before the writer drains).
pub struct Flusher {
    stop: oneshot::Sender<()>,
    task: tokio::task::JoinHandle<()>,
}

impl Flusher {
    /// Flushes every `every`, except while `database` says the database is unreachable:
    /// the counts then wait (their interval grows) rather than be drained into writes
    /// that fail and lost.
    pub fn start(
        refusals: Arc<Refusals>,
        writer: Writer,
        every: Duration,
        database: crate::health::DatabaseWatch,
    ) -> Flusher {
        let (stop, mut stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(async move {
            let mut ticks = tokio::time::interval(every.max(Duration::from_millis(100)));
            ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            ticks.tick().await;
            loop {
                tokio::select! {
                    _ = ticks.tick() => {
                        if database.is_reachable() {
                            refusals.flush(&writer).await;
                        }
                    }
                    _ = &mut stopped => {
                        refusals.flush(&writer).await;
                        break;
                    }
                }
            }
        });
        Flusher { stop, task }
    }

    /// Flushes what is left and stops.
    pub async fn finish(self) {
        let _ = self.stop.send(());
        let _ = self.task.await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn peer(n: u32) -> Peer {
        Peer::V4(n.to_be_bytes())
    }

    #[test]
    fn a_peer_is_refused_after_its_allowance_and_allowed_again_later() {
        let r = Refusals::per_minute(3);
        let t0 = Instant::now();
        for _ in 0..3 {
            r.check_at(peer(1), t0).unwrap();
            r.charge_at(peer(1), t0);
        }
        let refused = r.check_at(peer(1), t0).unwrap_err();
        assert_eq!(refused.limit, Limit::PeerRefusals { per_minute: 3 });
        assert!(refused.retry_after <= Duration::from_secs(20));
        // Another peer has its own allowance.
        r.check_at(peer(2), t0).unwrap();
        // One refill period later, one more refusal is allowed.
        r.check_at(peer(1), t0 + Duration::from_secs(20)).unwrap();
    }

    /// Calls that all passed the check while one refusal was left (in flight together)
    /// are all charged: the peer waits until the overdraft is repaid.
    #[test]
    fn refusals_in_flight_together_are_repaid_before_the_next() {
        let r = Refusals::per_minute(60);
        let t0 = Instant::now();
        for _ in 0..59 {
            r.charge_at(peer(1), t0);
        }
        // One left: 100 calls pass the check together, then each fails.
        for _ in 0..100 {
            r.check_at(peer(1), t0).unwrap();
        }
        for _ in 0..100 {
            r.charge_at(peer(1), t0);
        }
        // 99 overdrawn: refused for 100 s (one refusal a second), not one second.
        let refused = r
            .check_at(peer(1), t0 + Duration::from_secs(2))
            .unwrap_err();
        assert!(refused.retry_after > Duration::from_secs(95), "{refused:?}");
        r.check_at(peer(1), t0 + Duration::from_secs(95))
            .unwrap_err();
        r.check_at(peer(1), t0 + Duration::from_secs(101)).unwrap();
        // The overdraft is bounded: five minutes of the allowance at most.
        for _ in 0..100_000 {
            r.charge_at(peer(2), t0);
        }
        let refused = r.check_at(peer(2), t0).unwrap_err();
        assert!(
            refused.retry_after <= Duration::from_secs(301),
            "{refused:?}"
        );
        r.check_at(peer(2), t0 + Duration::from_secs(299))
            .unwrap_err();
        r.check_at(peer(2), t0 + Duration::from_secs(302)).unwrap();
    }

    #[test]
    fn memory_returns_after_a_flood_from_many_peers() {
        let r = Refusals::per_minute(5);
        let t0 = Instant::now();
        for n in 0..(MAX_PEERS as u32 + 500) {
            r.charge_at(peer(n), t0);
        }
        assert!(r.tracked_peers() <= MAX_PEERS + 1, "{}", r.tracked_peers());
        // Peers past the cap share one allowance: they are refused together.
        for _ in 0..5 {
            r.charge_at(peer(u32::MAX), t0);
        }
        assert!(r.check_at(peer(u32::MAX - 1), t0).is_err());
        // A minute later every allowance has refilled: the next drain forgets them all.
        r.drain_at(t0 + Duration::from_secs(61));
        assert_eq!(r.tracked_peers(), 0);
    }

    #[test]
    fn refusals_are_summarised_per_peer_method_and_outcome() {
        let r = Refusals::per_minute(5);
        for _ in 0..1000 {
            r.note(peer(1), "", "CaseService/GetCase", "UNAUTHENTICATED");
        }
        for _ in 0..7 {
            r.note(
                peer(1),
                "key:0123456789abcdef",
                "CaseService/GetCase",
                "UNAUTHENTICATED",
            );
        }
        r.note(peer(2), "", "CaseService/SubmitCase", "RESOURCE_EXHAUSTED");
        let entries = r.drain();
        let rows: Vec<(&str, &str, &str, i64)> = entries
            .iter()
            .map(|e| {
                (
                    e.principal.as_str(),
                    e.method.as_str(),
                    e.outcome.as_str(),
                    e.items,
                )
            })
            .collect();
        assert_eq!(
            rows,
            [
                (
                    "peer:0.0.0.1",
                    "CaseService/GetCase",
                    "UNAUTHENTICATED",
                    1000
                ),
                (
                    "peer:0.0.0.1 key:0123456789abcdef",
                    "CaseService/GetCase",
                    "UNAUTHENTICATED",
                    7
                ),
                (
                    "peer:0.0.0.2",
                    "CaseService/SubmitCase",
                    "RESOURCE_EXHAUSTED",
                    1
                ),
            ]
        );
        assert!(entries.iter().all(|e| e.principal_id.is_none()));
        assert!(r.drain().is_empty());
    }

    /// Each summary entry names the interval it counts; the intervals of successive
    /// drains meet end to start, so every refusal is in exactly one.
    #[test]
    fn summary_entries_name_their_interval() {
        let r = Refusals::per_minute(5);
        let interval = |e: &Entry| {
            let text = e.target.strip_prefix("refused ").expect("an interval");
            let (start, end) = text.split_once('/').unwrap();
            let parse = |t: &str| DateTime::parse_from_rfc3339(t).unwrap().with_timezone(&Utc);
            (parse(start), parse(end))
        };
        r.note(peer(1), "", "CaseService/GetCase", "UNAUTHENTICATED");
        r.note(peer(2), "", "CaseService/GetCase", "UNAUTHENTICATED");
        let first = r.drain();
        assert_eq!(first.len(), 2);
        let (start, end) = interval(&first[0]);
        assert!(start <= end);
        assert_eq!(interval(&first[1]), (start, end), "one interval per drain");
        std::thread::sleep(Duration::from_millis(2));
        r.note(peer(1), "", "CaseService/GetCase", "UNAUTHENTICATED");
        let second = r.drain();
        let (next_start, next_end) = interval(&second[0]);
        assert_eq!(
            next_start, end,
            "the next interval starts where the last ended"
        );
        assert!(next_end > next_start);
    }

    #[test]
    fn the_summary_is_capped() {
        let r = Refusals::per_minute(5);
        for n in 0..(MAX_SUMMARY_KEYS as u32 + 1000) {
            r.note(peer(n), "", "CaseService/GetCase", "UNAUTHENTICATED");
        }
        let entries = r.drain();
        assert_eq!(entries.len(), MAX_SUMMARY_KEYS + 1);
        assert_eq!(
            entries.iter().map(|e| e.items).sum::<i64>(),
            MAX_SUMMARY_KEYS as i64 + 1000
        );
        let other = entries
            .iter()
            .find(|e| e.principal == "peer:other")
            .unwrap();
        assert_eq!(other.items, 1000);
    }

    /// Past the cap, the method and the outcome are folded too: made-up paths (counted by
    /// `api::wire` under one label anyway) and outcomes cannot add entries either.
    #[test]
    fn the_summary_is_capped_whatever_the_methods() {
        let r = Refusals::per_minute(5);
        for n in 0..(MAX_SUMMARY_KEYS as u32 + 1000) {
            let outcome = ["UNIMPLEMENTED", "UNAUTHENTICATED", "CANCELLED"][n as usize % 3];
            r.note(peer(n), "", &format!("Made/Up{n}"), outcome);
        }
        let entries = r.drain();
        assert_eq!(entries.len(), MAX_SUMMARY_KEYS + 1);
        let other = entries
            .iter()
            .find(|e| e.principal == "peer:other")
            .unwrap();
        assert_eq!((other.method.as_str(), other.items), ("(other)", 1000));
    }

    /// One peer varying the method and the outcome adds at most [`MAX_KEYS_PER_PEER`]
    /// counts, then one folded count; every call is still counted, and another peer
    /// keeps counts of its own.
    #[test]
    fn one_peers_counts_are_capped_whatever_it_varies() {
        let r = Refusals::per_minute(5);
        let outcomes = ["UNAUTHENTICATED", "INVALID_ARGUMENT", "RESOURCE_EXHAUSTED"];
        for n in 0..300 {
            r.note(
                peer(1),
                "",
                &format!("CaseService/M{}", n % 15),
                outcomes[(n / 15) % 3],
            );
        }
        r.note(peer(2), "key:7", "CaseService/GetCase", "UNAUTHENTICATED");
        let entries = r.drain();
        let first = format!("peer:{}", peer(1));
        let of = |p: &str| entries.iter().filter(|e| e.principal == p).count();
        assert_eq!(of(&first), MAX_KEYS_PER_PEER + 1, "{entries:?}");
        let folded = entries
            .iter()
            .find(|e| e.method == FOLDED)
            .expect("a folded count");
        assert_eq!(
            (folded.principal.as_str(), folded.outcome.as_str()),
            (first.as_str(), FOLDED)
        );
        assert_eq!(entries.iter().map(|e| e.items).sum::<i64>(), 301);
        assert_eq!(of(&format!("peer:{} key:7", peer(2))), 1);
    }
}
