//! Connection hygiene: how many connections the service holds, from whom, and for how
//! long when they carry nothing.
//!
//! tonic's `Server` builder covers HTTP/2 keepalive, streams per connection and the TLS
//! handshake deadline (set in `startup`); it has no cap on connections and no idle timeout,
//! so this module adds both around the listener:
//!
//! - [`Connections::incoming`] accepts from the listener and admits a connection only while
//!   fewer than `--max-connections` are open in all and fewer than
//!   `--max-connections-per-peer` from its peer (`ratelimit::Peer`: an IPv4 address or an
//!   IPv6 /64). Past either cap the connection is closed at once, before TLS or HTTP/2:
//!   one address cannot take every place.
//! - **Places without a key are given up at the cap** (`evict_without_key`, the gRPC
//!   listener). Health checks and reflection need no key, and a health `Watch` never
//!   ends, so connections without a key could otherwise hold every place (sixteen
//!   addresses did, 2026-12-06). A connection is a key holder's while a call on it that
//!   authenticated is under way or ended within the idle timeout ([`Connections::key_holder`], from
//!   `api::authenticate`/`authorize` and each item of a `SubmitCases` stream). At the cap
//!   in all, a new connection takes the place of the oldest connection on which no call
//!   has authenticated, of the address holding the most such (two or more); else of the
//!   one whose last authenticated call is the longest ago past the idle timeout with no
//!   authenticated call under way; else of a principal holding more than
//!   `--max-connections-per-peer` places (one key from many addresses cannot hold them
//!   all); else of the oldest connection without a key alone at its address; that one is
//!   out of the
//!   counts at once, and its reads end and its writes fail, so HTTP/2 closes it (a call it
//!   had read is answered UNAVAILABLE). Only when none of these is found is the new
//!   connection closed. (The metrics listener evicts too: none of its connections holds a
//!   key.)
//! - [`ActivityLayer`] counts, per connection, the calls under way (a call lasts until its
//!   response body ends, so an open stream counts), and a connection with no call for
//!   `--idle-timeout-secs` is closed: its reads report end of file, and HTTP/2 closes it.
//!   Idle is measured in calls, not bytes, because the server's own keepalive pings make
//!   an idle connection exchange bytes forever.
//! - **Answers not yet read are bounded per peer.** An answer waits in the server's
//!   memory until the client's HTTP/2 window takes it and its bytes reach the socket; a
//!   client that grants no window (or never reads its socket) could otherwise have the
//!   server hold every answer it asks for. Every data chunk of a response body is counted
//!   for its peer from when the body produces it until the chunk is dropped: when HTTP/2
//!   has written the last of it to the socket, or the stream is reset, or the connection
//!   closes ([`Unread`]). The count is of memory held: what the client sends lowers it only
//!   when the memory goes with it (a reset does, a PING does not). A new call from a peer holding
//!   `--max-unread-bytes-per-peer` or more is refused with RESOURCE_EXHAUSTED before any
//!   handler runs (by [`AdmissionLayer`], inside the wire contract's layer, which counts
//!   the refusal in the per-address summary). A call that changes nothing ([`READS`])
//!   admitted before its peer reached the bound, or a stream of one already open, does
//!   not go past it either: a chunk its body produces while the peer holds the bound or
//!   more is dropped and the answer ends with RESOURCE_EXHAUSTED ([`GuardedBody`]), so a
//!   peer holds at most the bound and one chunk of reads' answers. A write's answer is
//!   always sent, because it tells the client whether its change was made; writes admitted
//!   before the bound still answer (small answers; for each principal at most its calls
//!   running and waiting, `ratelimit::CallGate`). The same count summed over every peer
//!   is bounded by `--max-unread-bytes` ([`Bounds`]): while all peers together hold it or
//!   more, a peer already holding more than its share (the bound over `--max-connections`)
//!   is refused reads and their answers as above, and a peer within its share still gets
//!   its next answer; so many peers (an IPv6 /64 each is cheap) hold in reads' answers at
//!   most that bound and, per connection, its share and one answer chunk. With TLS a chunk counts until rustls takes it; a
//!   chunk under 256 bytes h2 copies into its write buffer and drops at once. The count
//!   relies on hyper (since 1.13) taking a response's next chunk before the window has
//!   room for it and holding it until it has (`wire::answers_an_address_leaves_unread_are_bounded`
//!   fails if that changes). A connection whose peer address cannot be read is not
//!   counted (nor idle-timed; `TcpStream::peer_addr` fails only for a socket already
//!   closed).
//! - **Reflection calls are capped per peer.** Reflection needs no key, its answers are
//!   tens of kilobytes, and while a client reads none tonic-reflection keeps two of them
//!   per stream besides the one counted above. At most `--max-reflection-calls-per-peer`
//!   are under way from one peer (until each response body ends), and
//!   [`REFLECTION_CALLS_IN_ALL`] from every peer together; past either,
//!   RESOURCE_EXHAUSTED. (Health answers are a few bytes: a client-side health check keeps
//!   a `Watch` open per channel, and those are not capped here.)
//!
//! The tables are keyed by open connections (bounded by the cap) and emptied as they close.

use std::collections::{BTreeMap, HashMap};
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, ready};
use std::time::Duration;

use atomic_waker::AtomicWaker;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::time::{Instant, Sleep};
use tokio_stream::{Stream, StreamExt};
use tonic::codegen::http;
use tonic::transport::server::{Connected, TcpConnectInfo, TcpIncoming, TlsConnectInfo};
use tracing::{debug, warn};

use crate::ratelimit::Peer;

/// How long accepting pauses when the process is out of file descriptors.
const DESCRIPTORS_PAUSE: Duration = Duration::from_millis(100);
/// How often that is logged at most.
const DESCRIPTORS_WARN_EVERY: Duration = Duration::from_secs(10);

/// Whether an accept failed for want of file descriptors (the process's or the system's)
/// or of kernel memory for the socket: the next accept would fail the same way at once.
fn out_of_descriptors(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM)
    )
}

/// The caps and the idle timeout.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConnectionLimits {
    pub max_connections: usize,
    pub max_per_peer: usize,
    /// `None`: connections may stay idle.
    pub idle_timeout: Option<Duration>,
    /// Bytes of answers a peer may leave unread before its new calls are refused (`None`:
    /// not bounded).
    pub max_unread_per_peer: Option<u64>,
    /// Bytes of answers all peers together may leave unread before the reads of those
    /// holding more than their share are refused (`None`: not bounded).
    pub max_unread_all: Option<u64>,
    /// Calls without a key (health, reflection) under way from one peer (`None`: not
    /// capped).
    pub max_reflection_per_peer: Option<usize>,
    /// At the cap on connections, close a connection without a key to admit a new one,
    /// instead of closing the new one: the oldest on which no call has authenticated,
    /// else the one whose last authenticated call is the longest ago, if that is more
    /// than `idle_timeout` ago ([`Connections::key_holder`] marks a connection when a
    /// call on it authenticates).
    pub evict_without_key: bool,
}

/// Which listener a [`Connections`] serves: it names the log lines and the labels of
/// `ern_connections_refused_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Listener {
    Grpc,
    Console,
    Metrics,
}

/// The open connections, shared by the listener and the layer.
pub struct Connections {
    listener: Listener,
    limits: ConnectionLimits,
    epoch: Instant,
    open: Mutex<Open>,
    /// When running out of file descriptors was last logged (ms since `epoch`; 0: never).
    descriptors_warned: AtomicU64,
    /// Bytes of answers held unread for every peer together.
    unread_all: Arc<AtomicU64>,
    /// Reflection calls under way from every peer together.
    reflection_all: Arc<AtomicUsize>,
}

#[derive(Default)]
struct Open {
    total: usize,
    per_peer: HashMap<Peer, PeerEntry>,
    by_addr: HashMap<SocketAddr, Arc<Activity>>,
    /// Per principal, the open connections it last authenticated a call on.
    per_principal: HashMap<i64, usize>,
    /// Connections in the peers' `without_key` tables, all together.
    without_key: usize,
    /// The number the next admitted connection gets.
    admitted: u64,
}

impl Open {
    /// Takes `activity`'s connection out of the counts (once: a connection evicted is
    /// not counted again when it drops). It stays known by its address until it drops,
    /// so that a call arriving on it meanwhile is still seen (and refused: evicted).
    fn release(&mut self, activity: &Arc<Activity>) {
        if activity.released.swap(true, Ordering::SeqCst) {
            return;
        }
        self.total = self.total.saturating_sub(1);
        if let Some(entry) = self.per_peer.get_mut(&activity.from) {
            entry.connections -= 1;
            if entry.without_key.remove(&activity.number).is_some() {
                self.without_key -= 1;
            }
            if entry.connections == 0 {
                self.per_peer.remove(&activity.from);
            }
        }
        let principal = activity.principal.load(Ordering::SeqCst);
        if principal != 0
            && let Some(held) = self.per_principal.get_mut(&principal)
        {
            *held -= 1;
            if *held == 0 {
                self.per_principal.remove(&principal);
            }
        }
    }

    /// The connection dropped: out of the counts if it still was, and forgotten.
    fn dropped(&mut self, activity: &Arc<Activity>) {
        self.release(activity);
        if let Some(addr) = activity.remote
            && self
                .by_addr
                .get(&addr)
                .is_some_and(|a| Arc::ptr_eq(a, activity))
        {
            self.by_addr.remove(&addr);
        }
    }
}

/// One peer's open connections and what they hold for it.
struct PeerEntry {
    connections: usize,
    load: Arc<PeerLoad>,
    /// Its connections on which no call has authenticated yet, oldest first (by their
    /// number of admission): those a new connection may take the place of.
    without_key: BTreeMap<u64, Arc<Activity>>,
}

/// What a peer's connections hold for it, summed over them.
#[derive(Default)]
struct PeerLoad {
    /// Bytes of answers produced for the peer and not yet dropped by the transport.
    unread: AtomicU64,
    /// Reflection calls under way.
    reflection: AtomicUsize,
    /// The same bytes summed over every peer of the listener (shared).
    all: Arc<AtomicU64>,
}

/// The bounds on answers held unread that a read's answer is held to (a write's is
/// counted, never refused).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Bounds {
    /// `--max-unread-bytes-per-peer`.
    per_peer: Option<u64>,
    /// `--max-unread-bytes`, and a peer's share of it (the bound over
    /// `--max-connections`): while every peer together holds the bound or more, a peer
    /// holding more than its share is refused (one within it still gets its next answer,
    /// whatever its size).
    all: Option<(u64, u64)>,
}

impl Bounds {
    /// Why more bytes may not be held for a peer that holds `peer` bytes, while all peers
    /// hold `all`; `None`: they may.
    fn refuses(self, peer: u64, all: u64) -> Option<Crowded> {
        if let Some(limit) = self.per_peer
            && peer >= limit
        {
            return Some(Crowded::Unread(limit));
        }
        match self.all {
            Some((limit, share)) if all >= limit && peer > share => Some(Crowded::UnreadAll(limit)),
            _ => None,
        }
    }
}

/// Calls under way on one connection, and when the last one ended.
struct Activity {
    active: AtomicUsize,
    /// Milliseconds since `Connections::epoch`.
    last: AtomicU64,
    peer: Arc<PeerLoad>,
    /// Its number of admission (the order of age).
    number: u64,
    /// Its peer and address, for the counts.
    from: Peer,
    remote: Option<SocketAddr>,
    /// When a call on it last authenticated, or one that had authenticated ended
    /// (milliseconds since `Connections::epoch`, plus one; 0: never). Recently, it keeps
    /// its place at the cap.
    keyed: AtomicU64,
    /// Calls under way on it that have authenticated: while there is one, it keeps its
    /// place at the cap.
    keyed_calls: AtomicUsize,
    /// The principal whose call last authenticated on it (0: none yet). Changed under the
    /// lock of `Open`, which counts it in `per_principal`.
    principal: AtomicI64,
    /// It gave its place to a newer connection: its reads end and its writes fail.
    evicted: AtomicBool,
    /// Taken out of the counts (on eviction or when it drops).
    released: AtomicBool,
    /// The task reading the connection, woken when it is evicted.
    reader: AtomicWaker,
}

impl Activity {
    fn new(
        number: u64,
        from: Peer,
        remote: Option<SocketAddr>,
        peer: Arc<PeerLoad>,
        now: u64,
    ) -> Activity {
        Activity {
            active: AtomicUsize::new(0),
            last: AtomicU64::new(now),
            peer,
            number,
            from,
            remote,
            keyed: AtomicU64::new(0),
            keyed_calls: AtomicUsize::new(0),
            principal: AtomicI64::new(0),
            evicted: AtomicBool::new(false),
            released: AtomicBool::new(false),
            reader: AtomicWaker::new(),
        }
    }
}

/// One data chunk of an answer, counted for its peer until the transport drops it (the
/// owner of the `Bytes` HTTP/2 is given: dropped when the last of it is written, or its
/// stream or connection ends).
struct Unread {
    data: tonic::codegen::Bytes,
    peer: Arc<PeerLoad>,
}

impl Unread {
    /// `data`, counted for `peer` (and all peers); or, when `bounds` refuse it, `Err` with
    /// nothing counted and the data dropped. The chunk that crosses the peer's bound is
    /// kept: a peer holds at most its bound and one chunk.
    fn within(
        data: tonic::codegen::Bytes,
        peer: &Arc<PeerLoad>,
        bounds: Option<Bounds>,
    ) -> Result<tonic::codegen::Bytes, Crowded> {
        if data.is_empty() {
            return Ok(data);
        }
        let len = data.len() as u64;
        match bounds {
            // Checked and added in one step for the peer, so that a chunk refused never
            // counts, even for a moment.
            Some(bounds) => {
                let mut refused = None;
                let added = peer
                    .unread
                    .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |held| {
                        refused = bounds.refuses(held, peer.all.load(Ordering::SeqCst));
                        refused.is_none().then_some(held + len)
                    });
                if added.is_err() {
                    return Err(refused.expect("refused"));
                }
            }
            None => {
                peer.unread.fetch_add(len, Ordering::SeqCst);
            }
        }
        peer.all.fetch_add(len, Ordering::SeqCst);
        Ok(tonic::codegen::Bytes::from_owner(Unread {
            data,
            peer: peer.clone(),
        }))
    }
}

impl AsRef<[u8]> for Unread {
    fn as_ref(&self) -> &[u8] {
        &self.data
    }
}

impl Drop for Unread {
    fn drop(&mut self) {
        let len = self.data.len() as u64;
        self.peer.unread.fetch_sub(len, Ordering::SeqCst);
        self.peer.all.fetch_sub(len, Ordering::SeqCst);
    }
}

/// Why a call was refused before a handler saw it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Crowded {
    /// The peer has this many bytes of answers or more unread.
    Unread(u64),
    /// All peers together have this many bytes of answers or more unread, and this peer
    /// more than its share of them.
    UnreadAll(u64),
    /// The peer has this many reflection calls under way.
    Reflection(usize),
    /// Every peer together has this many reflection calls under way.
    ReflectionAll(usize),
}

impl Crowded {
    /// The label of `ern_rate_limited_total`.
    pub fn limit(self) -> &'static str {
        match self {
            Crowded::Unread(_) => "unread_answers",
            Crowded::UnreadAll(_) => "unread_answers_all",
            Crowded::Reflection(_) => "reflection_calls",
            Crowded::ReflectionAll(_) => "reflection_calls_all",
        }
    }

    /// The refusal the caller gets: RESOURCE_EXHAUSTED, naming the flag.
    pub fn status(self) -> tonic::Status {
        tonic::Status::resource_exhausted(match self {
            Crowded::Unread(limit) => format!(
                "this address has {limit} bytes or more of answers it has not read yet \
                 (--max-unread-bytes-per-peer; answers still on their way count): read them, \
                 or end their calls, before calling again, and have fewer large answers under \
                 way at once"
            ),
            Crowded::UnreadAll(limit) => format!(
                "the server holds {limit} bytes or more of answers its clients have not read \
                 yet (--max-unread-bytes), and this address holds more than its share of them: \
                 read your answers, or end their calls, before asking again"
            ),
            Crowded::Reflection(limit) => format!(
                "{limit} reflection calls are already under way from this address \
                 (--max-reflection-calls-per-peer); end one before starting another"
            ),
            Crowded::ReflectionAll(limit) => format!(
                "{limit} reflection calls are already under way on this server, from every \
                 address together; try again in a moment"
            ),
        })
    }

    /// The end of an answer not kept (it changes nothing): RESOURCE_EXHAUSTED.
    fn not_kept(self) -> tonic::Status {
        let status = self.status();
        tonic::Status::resource_exhausted(format!(
            "this answer was ready but not kept, and the call changed nothing: {}",
            status.message()
        ))
    }
}

/// The methods that change nothing, whose answers are not kept for a peer at the bound
/// ([`GuardedBody`]): every method the server serves is either here or in [`WRITES`]
/// (`every_method_is_a_read_or_a_write`).
pub const READS: [&str; 12] = [
    "/ern_registry.v1.CaseService/GetCase",
    "/ern_registry.v1.CaseService/ExportPhenopackets",
    "/ern_registry.v1.ConsentService/GetConsent",
    "/ern_registry.v1.ConsentService/GetErasureReceipt",
    "/ern_registry.v1.ResearchService/CountPatients",
    "/ern_registry.v1.ResearchService/DiagnosticDelay",
    "/ern_registry.v1.ResearchService/FindExpertise",
    "/ern_registry.v1.AdminService/ListAuditEntries",
    "/grpc.health.v1.Health/Check",
    "/grpc.health.v1.Health/Watch",
    "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
    "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo",
];

/// The methods that change something: their answers are always sent, whatever the peer
/// holds, because they tell the client whether its change was made.
pub const WRITES: [&str; 7] = [
    "/ern_registry.v1.CaseService/SubmitCase",
    "/ern_registry.v1.CaseService/SubmitCases",
    "/ern_registry.v1.CaseService/UpdateCase",
    "/ern_registry.v1.CaseService/SubmitPhenopacket",
    "/ern_registry.v1.ConsentService/RecordConsent",
    "/ern_registry.v1.ConsentService/RecordConsents",
    "/ern_registry.v1.ConsentService/WithdrawConsent",
];

/// Whether a call of `path` is one of the reflection service's (which needs no key).
fn reflection(path: &str) -> bool {
    path.starts_with("/grpc.reflection.")
}

fn lock(m: &Mutex<Open>) -> std::sync::MutexGuard<'_, Open> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Connections {
    pub fn new(limits: ConnectionLimits) -> Arc<Connections> {
        Connections::of(Listener::Grpc, limits)
    }

    pub fn of(listener: Listener, limits: ConnectionLimits) -> Arc<Connections> {
        Arc::new(Connections {
            listener,
            limits: ConnectionLimits {
                max_connections: limits.max_connections.max(1),
                max_per_peer: limits.max_per_peer.max(1),
                idle_timeout: limits.idle_timeout.filter(|t| !t.is_zero()),
                max_unread_per_peer: limits.max_unread_per_peer,
                max_unread_all: limits.max_unread_all,
                max_reflection_per_peer: limits.max_reflection_per_peer,
                evict_without_key: limits.evict_without_key,
            },
            epoch: Instant::now(),
            open: Mutex::new(Open::default()),
            descriptors_warned: AtomicU64::new(0),
            unread_all: Arc::default(),
            reflection_all: Arc::default(),
        })
    }

    fn now_ms(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64
    }

    /// Connections open now.
    pub fn open(&self) -> usize {
        lock(&self.open).total
    }

    /// Sets the gauges of open connections, and of those without a key, from `open`
    /// (under its lock, so they are never set out of order).
    fn publish(&self, open: &Open) {
        let listener = match self.listener {
            Listener::Grpc => "grpc",
            Listener::Console => "console",
            Listener::Metrics => "metrics",
        };
        metrics::gauge!("ern_connections_open", "listener" => listener).set(open.total as f64);
        if self.limits.evict_without_key {
            metrics::gauge!("ern_connections_without_key", "listener" => listener)
                .set(open.without_key as f64);
        }
    }

    /// The listener's connections, past the caps, with TCP keepalive probes after
    /// `tcp_keepalive` of silence.
    pub fn incoming(
        self: &Arc<Self>,
        listener: TcpListener,
        tcp_keepalive: Option<Duration>,
    ) -> impl Stream<Item = io::Result<Tracked>> + Send + 'static {
        let connections = self.clone();
        let accepted = TcpIncoming::from(listener)
            .with_nodelay(Some(true))
            .with_keepalive(tcp_keepalive);
        accepted
            .then(move |accepted| {
                let connections = connections.clone();
                async move {
                    match accepted {
                        Ok(stream) => connections.admit(stream).map(Ok),
                        // Out of file descriptors: the next accept would fail at once too,
                        // and tonic tries again without a pause (a core busy, nothing
                        // accepted). Wait a moment, say so at most every 10 s, go on.
                        Err(e) if out_of_descriptors(&e) => {
                            connections.out_of_descriptors(&e);
                            tokio::time::sleep(DESCRIPTORS_PAUSE).await;
                            None
                        }
                        Err(e) => Some(Err(e)),
                    }
                }
            })
            .filter_map(|admitted| admitted)
    }

    /// The label of `ern_connections_refused_total` for `limit` on this listener.
    fn label(&self, limit: &'static str) -> &'static str {
        match (self.listener, limit) {
            (Listener::Grpc, limit) => limit,
            (Listener::Console, "file_descriptors") => "console_file_descriptors",
            (Listener::Console, _) => "console_connections",
            (Listener::Metrics, "file_descriptors") => "metrics_file_descriptors",
            // No cap per peer, and eviction at the cap in all: never refused.
            (Listener::Metrics, _) => "metrics_connections",
        }
    }

    /// Counts an accept that failed for want of file descriptors, and logs it at most
    /// every [`DESCRIPTORS_WARN_EVERY`].
    fn out_of_descriptors(&self, e: &io::Error) {
        metrics::counter!("ern_connections_refused_total", "limit" => self.label("file_descriptors"))
            .increment(1);
        let now = self.now_ms();
        let last = self.descriptors_warned.load(Ordering::Relaxed);
        if last == 0 || now.saturating_sub(last) >= DESCRIPTORS_WARN_EVERY.as_millis() as u64 {
            self.descriptors_warned.store(now.max(1), Ordering::Relaxed);
            let (what, cap) = match self.listener {
                Listener::Grpc => ("gRPC", "--max-connections"),
                Listener::Console => ("web console", "--console-max-connections"),
                Listener::Metrics => ("metrics", "--max-connections"),
            };
            warn!(
                error = %e,
                open = self.open(),
                "cannot accept {what} connections: out of file descriptors (raise the \
                 open-files limit, or lower {cap}); trying again every 100 ms"
            );
        }
    }

    /// Accepts the next connection of `listener` that the caps admit (for a listener not
    /// served through [`Connections::incoming`]). Pauses when out of file descriptors,
    /// as `incoming` does, and 1 s after any other failure to accept but a connection
    /// reset before it was taken; `None` never: it waits until one is admitted.
    pub async fn accept(self: &Arc<Self>, listener: &TcpListener) -> Tracked {
        loop {
            match listener.accept().await {
                Ok((stream, _)) => {
                    let _ = stream.set_nodelay(true);
                    if let Some(admitted) = self.admit(stream) {
                        return admitted;
                    }
                }
                Err(e) if out_of_descriptors(&e) => {
                    self.out_of_descriptors(&e);
                    tokio::time::sleep(DESCRIPTORS_PAUSE).await;
                }
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::ConnectionAborted
                            | io::ErrorKind::ConnectionReset
                            | io::ErrorKind::ConnectionRefused
                    ) => {}
                Err(e) => {
                    warn!(error = %e, listener = ?self.listener, "cannot accept connections; trying again in 1 s");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
            }
        }
    }

    /// Admits `stream` if the caps allow, else closes it. At the cap on connections in
    /// all (not the one per peer), with `evict_without_key`, the oldest connection on
    /// which no call has authenticated gives its place to `stream`.
    fn admit(self: &Arc<Self>, stream: TcpStream) -> Option<Tracked> {
        let remote = stream.peer_addr().ok();
        let peer = Peer::of(remote);
        let activity = {
            let mut open = lock(&self.open);
            let from_peer = open
                .per_peer
                .get(&peer)
                .map_or(0, |entry| entry.connections);
            let refused = if from_peer >= self.limits.max_per_peer {
                Some("max_connections_per_peer")
            } else if open.total >= self.limits.max_connections && !self.evict_one(&mut open) {
                Some("max_connections")
            } else {
                None
            };
            if let Some(reason) = refused {
                drop(open);
                metrics::counter!("ern_connections_refused_total", "limit" => self.label(reason))
                    .increment(1);
                debug!(%peer, reason, "connection refused");
                return None;
            }
            open.total += 1;
            let all = &self.unread_all;
            let number = open.admitted + 1;
            let entry = open.per_peer.entry(peer).or_insert_with(|| PeerEntry {
                connections: 0,
                load: Arc::new(PeerLoad {
                    all: all.clone(),
                    ..PeerLoad::default()
                }),
                without_key: BTreeMap::new(),
            });
            entry.connections += 1;
            let load = entry.load.clone();
            let activity = Arc::new(Activity::new(number, peer, remote, load, self.now_ms()));
            // A connection whose peer address cannot be read (`peer_addr` fails only for a
            // socket already closed) has no calls tracked, so it could never show a key:
            // not taken for one without.
            if self.limits.evict_without_key && remote.is_some() {
                entry.without_key.insert(number, activity.clone());
                open.without_key += 1;
            }
            open.admitted = number;
            if let Some(addr) = remote {
                open.by_addr.insert(addr, activity.clone());
            }
            self.publish(&open);
            activity
        };
        let idle = self
            .limits
            .idle_timeout
            .map(|timeout| Box::pin(tokio::time::sleep(timeout)));
        Some(Tracked {
            inner: stream,
            connections: self.clone(),
            remote,
            peer,
            activity,
            idle,
            closed: false,
        })
    }

    /// Evicts a connection, if the limits allow it and there is one to take, in this
    /// order: the oldest on which no call has authenticated of the address holding the
    /// most such connections, two or more; else the one whose last authenticated call
    /// ended the longest ago, if that is longer than the idle timeout and none is under
    /// way (a revoked key keeps no place for longer); else one of a principal holding
    /// more places than `max_per_peer`, the one whose last authenticated call ended the
    /// longest ago, with none under way; else the oldest connection without a key alone
    /// at its address. It is out of the counts at once, and its task is woken to close
    /// it. Whether one was.
    fn evict_one(&self, open: &mut Open) -> bool {
        if !self.limits.evict_without_key {
            return false;
        }
        // A connection without a key alone at its address comes last: otherwise one that
        // reconnects whenever it is closed takes every new connection's place in turn,
        // before a principal holding more than its share gives one (a defences
        // re-attack, 2026-12-07).
        let Some(oldest) = self
            .without_key(open, 2)
            .or_else(|| self.lapsed(open))
            .or_else(|| self.past_its_share(open))
            .or_else(|| self.without_key(open, 1))
        else {
            return false;
        };
        open.release(&oldest);
        oldest.evicted.store(true, Ordering::SeqCst);
        oldest.reader.wake();
        metrics::counter!("ern_connections_evicted_total").increment(1);
        debug!(peer = %oldest.from, "connection closed at the cap for a new one");
        true
    }

    /// The oldest connection on which no call has authenticated, of the address holding
    /// the most, if it holds at least `at_least` (so that many connections from one
    /// address give their places before a client's one new connection, whatever their
    /// age), taken out of its table.
    fn without_key(&self, open: &mut Open, at_least: usize) -> Option<Arc<Activity>> {
        let Open {
            per_peer,
            without_key: count,
            ..
        } = open;
        loop {
            let entry = per_peer
                .values_mut()
                .filter(|entry| entry.without_key.len() >= at_least.max(1))
                .max_by_key(|entry| {
                    let oldest = entry.without_key.keys().next().copied().unwrap_or(0);
                    (entry.without_key.len(), std::cmp::Reverse(oldest))
                })?;
            while let Some((_, candidate)) = entry.without_key.pop_first() {
                *count -= 1;
                // One marked a key holder's just now may still be in the table (it is
                // marked before it is taken out): skipped.
                if candidate.keyed.load(Ordering::SeqCst) == 0 {
                    return Some(candidate);
                }
            }
        }
    }

    /// The key holder's connection whose last authenticated call ended the longest ago,
    /// more than the idle timeout ago, with none under way.
    fn lapsed(&self, open: &Open) -> Option<Arc<Activity>> {
        let lapse = self.limits.idle_timeout?;
        let before = self
            .now_ms()
            .saturating_sub(lapse.as_millis() as u64)
            .saturating_add(1);
        open.by_addr
            .values()
            .filter(|a| {
                // Only a key holder's place lapses: one that never had a key (0) is
                // taken by its own rules.
                let keyed = a.keyed.load(Ordering::SeqCst);
                !a.released.load(Ordering::SeqCst)
                    && a.keyed_calls.load(Ordering::SeqCst) == 0
                    && keyed != 0
                    && keyed < before
            })
            .min_by_key(|a| a.keyed.load(Ordering::SeqCst))
            .cloned()
    }

    /// Of the principal holding the most places, if more than `max_per_peer`: its
    /// connection whose last authenticated call ended the longest ago, with none under
    /// way (one key cannot keep every other principal out).
    fn past_its_share(&self, open: &Open) -> Option<Arc<Activity>> {
        let (&principal, _) = open
            .per_principal
            .iter()
            .filter(|&(_, &held)| held > self.limits.max_per_peer)
            .max_by_key(|&(_, &held)| held)?;
        open.by_addr
            .values()
            .filter(|a| {
                !a.released.load(Ordering::SeqCst)
                    && a.principal.load(Ordering::SeqCst) == principal
                    && a.keyed_calls.load(Ordering::SeqCst) == 0
            })
            .min_by_key(|a| a.keyed.load(Ordering::SeqCst))
            .cloned()
    }

    /// Marks the connection of a request (its `extensions`) as one on which a call of
    /// `principal` has just authenticated: it keeps its place at the cap on connections
    /// while the call lasts and for the idle timeout after (`evict_without_key`).
    pub fn key_holder(extensions: &http::Extensions, principal: i64) {
        if let Some(on) = extensions.get::<OnConnectionKeyed>() {
            on.authenticated(principal);
        }
    }

    /// The bounds on answers held unread.
    fn bounds(&self) -> Bounds {
        Bounds {
            per_peer: self.limits.max_unread_per_peer,
            all: self.limits.max_unread_all.map(|limit| {
                let share = limit / self.limits.max_connections.max(1) as u64;
                (limit, share)
            }),
        }
    }

    /// Marks a call under way on the connection from `addr`, until the guard drops.
    fn begin(self: &Arc<Self>, addr: SocketAddr) -> Option<CallGuard> {
        let activity = lock(&self.open).by_addr.get(&addr)?.clone();
        activity.active.fetch_add(1, Ordering::SeqCst);
        Some(CallGuard {
            activity,
            connections: self.clone(),
            authenticated: Arc::default(),
        })
    }

    /// The layer that tells connections when calls begin and end, and counts their
    /// answers' bytes as the bodies produce them.
    pub fn layer(self: &Arc<Self>) -> ActivityLayer {
        ActivityLayer(self.clone())
    }

    /// The layer that refuses a call from a peer past the caps on unread answers and
    /// calls without a key (inside [`Connections::layer`], which tells it the connection).
    pub fn admission_layer(self: &Arc<Self>) -> AdmissionLayer {
        AdmissionLayer(self.clone())
    }

    /// Admits a call of `path` on the connection of `activity`: `Ok(Some(guard))` holds a
    /// reflection call until the guard drops.
    fn admit_call(
        &self,
        activity: &Activity,
        path: &str,
    ) -> Result<Option<ReflectionGuard>, Crowded> {
        let mut bounds = self.bounds();
        if !READS.contains(&path) {
            // A write's answer is small and always sent: only its peer's bound applies.
            bounds.all = None;
        }
        let peer = &activity.peer;
        let held = (
            peer.unread.load(Ordering::SeqCst),
            peer.all.load(Ordering::SeqCst),
        );
        if let Some(crowded) = bounds.refuses(held.0, held.1) {
            return Err(crowded);
        }
        if !reflection(path) {
            return Ok(None);
        }
        let peer = activity.peer.clone();
        let before = peer.reflection.fetch_add(1, Ordering::SeqCst);
        let in_all = self.reflection_all.fetch_add(1, Ordering::SeqCst);
        let guard = ReflectionGuard(peer, self.reflection_all.clone());
        match self.limits.max_reflection_per_peer {
            Some(limit) if before >= limit => Err(Crowded::Reflection(limit)),
            Some(_) if in_all >= REFLECTION_CALLS_IN_ALL => {
                Err(Crowded::ReflectionAll(REFLECTION_CALLS_IN_ALL))
            }
            _ => Ok(Some(guard)),
        }
    }
}

/// Reflection calls under way from every peer together (with the cap per peer on):
/// tonic-reflection keeps about 70 KB for a stream whose client reads nothing, counted
/// per peer only (a defences audit held 945 MB from 400 addresses without a key,
/// 2026-12-06). A tool's calls, not the registry's: a few at a time.
pub const REFLECTION_CALLS_IN_ALL: usize = 256;

/// A reflection call under way, counted for its peer and in all until dropped.
struct ReflectionGuard(Arc<PeerLoad>, Arc<AtomicUsize>);

impl Drop for ReflectionGuard {
    fn drop(&mut self) {
        self.0.reflection.fetch_sub(1, Ordering::SeqCst);
        self.1.fetch_sub(1, Ordering::SeqCst);
    }
}

/// An admitted connection: the TCP stream, counted until dropped, closed when idle.
pub struct Tracked {
    inner: TcpStream,
    connections: Arc<Connections>,
    remote: Option<SocketAddr>,
    peer: Peer,
    activity: Arc<Activity>,
    idle: Option<Pin<Box<Sleep>>>,
    closed: bool,
}

/// What writing to an evicted connection fails with.
fn evicted() -> io::Error {
    io::Error::new(
        io::ErrorKind::ConnectionAborted,
        "connection closed for a new one: no call on it had authenticated",
    )
}

impl Tracked {
    /// Whether the connection gave its place to a newer one. Registers the waker for the
    /// moment it does.
    fn evicted(&self, cx: &mut Context<'_>) -> bool {
        if !self.connections.limits.evict_without_key {
            return false;
        }
        self.activity.reader.register(cx.waker());
        self.activity.evicted.load(Ordering::SeqCst)
    }

    /// The address of the connection's peer.
    pub fn remote(&self) -> Option<SocketAddr> {
        self.remote
    }

    /// Whether the connection has been without a call for the idle timeout. Registers
    /// the waker for the moment it would be.
    fn idle_expired(&mut self, cx: &mut Context<'_>) -> bool {
        let (Some(timeout), Some(sleep)) =
            (self.connections.limits.idle_timeout, self.idle.as_mut())
        else {
            return false;
        };
        loop {
            if sleep.as_mut().poll(cx).is_pending() {
                return false;
            }
            let now = Instant::now();
            if self.activity.active.load(Ordering::SeqCst) > 0 {
                sleep.as_mut().reset(now + timeout);
                continue;
            }
            let last = self.connections.epoch
                + Duration::from_millis(self.activity.last.load(Ordering::SeqCst));
            let due = last + timeout;
            if due <= now {
                return true;
            }
            sleep.as_mut().reset(due);
        }
    }
}

impl Drop for Tracked {
    fn drop(&mut self) {
        let mut open = lock(&self.connections.open);
        open.dropped(&self.activity);
        self.connections.publish(&open);
    }
}

impl Connected for Tracked {
    type ConnectInfo = TcpConnectInfo;

    fn connect_info(&self) -> TcpConnectInfo {
        self.inner.connect_info()
    }
}

impl AsyncRead for Tracked {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        if this.evicted(cx) {
            this.closed = true;
        }
        if this.closed || this.idle_expired(cx) {
            if !this.closed {
                debug!(peer = %this.peer, "idle connection closed");
                metrics::counter!("ern_connections_idle_closed_total").increment(1);
            }
            this.closed = true;
            // End of file: the server closes the connection as if the client had.
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut this.inner).poll_read(cx, buf)
    }
}

impl AsyncWrite for Tracked {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        if self.activity.evicted.load(Ordering::SeqCst) {
            return Poll::Ready(Err(evicted()));
        }
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        if self.activity.evicted.load(Ordering::SeqCst) {
            return Poll::Ready(Err(evicted()));
        }
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

/// One call under way on a connection.
struct CallGuard {
    activity: Arc<Activity>,
    connections: Arc<Connections>,
    /// The call has authenticated ([`OnConnectionKeyed::authenticated`]).
    authenticated: Arc<AtomicBool>,
}

impl Drop for CallGuard {
    fn drop(&mut self) {
        let now = self.connections.now_ms();
        if self.authenticated.load(Ordering::SeqCst) {
            // A key holder's place lapses from the end of its last authenticated call.
            self.activity.keyed.store(now + 1, Ordering::SeqCst);
            self.activity.keyed_calls.fetch_sub(1, Ordering::SeqCst);
        }
        self.activity.last.store(now, Ordering::SeqCst);
        self.activity.active.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Wraps the services: every call holds its connection's activity until its response
/// body ends (or the call is dropped).
#[derive(Clone)]
pub struct ActivityLayer(Arc<Connections>);

impl<S> tower_layer::Layer<S> for ActivityLayer {
    type Service = ActivityService<S>;

    fn layer(&self, inner: S) -> ActivityService<S> {
        ActivityService {
            inner,
            connections: self.0.clone(),
        }
    }
}

#[derive(Clone)]
pub struct ActivityService<S> {
    inner: S,
    connections: Arc<Connections>,
}

/// The peer of a request, from the connection information tonic puts in its extensions.
pub(crate) fn remote_addr<B>(request: &http::Request<B>) -> Option<SocketAddr> {
    let extensions = request.extensions();
    extensions
        .get::<TcpConnectInfo>()
        .and_then(TcpConnectInfo::remote_addr)
        .or_else(|| {
            extensions
                .get::<TlsConnectInfo<TcpConnectInfo>>()
                .and_then(|info| info.get_ref().remote_addr())
        })
}

impl<S, B> tonic::codegen::Service<http::Request<B>> for ActivityService<S>
where
    S: tonic::codegen::Service<http::Request<B>, Response = http::Response<tonic::body::Body>>,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
{
    type Response = http::Response<tonic::body::Body>;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, S::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: http::Request<B>) -> Self::Future {
        let guard = remote_addr(&request).and_then(|addr| self.connections.begin(addr));
        if let Some(guard) = &guard {
            if guard.activity.evicted.load(Ordering::SeqCst) {
                // Read before the connection gave its place, not served on it.
                let status = tonic::Status::unavailable(
                    "this connection was closed for a new one (no call on it had \
                     authenticated); connect again",
                );
                return Box::pin(std::future::ready(Ok(status.into_http())));
            }
            request
                .extensions_mut()
                .insert(OnConnection(guard.activity.clone()));
            request.extensions_mut().insert(OnConnectionKeyed(
                self.connections.clone(),
                guard.activity.clone(),
                guard.authenticated.clone(),
            ));
        }
        let bounds =
            Some(self.connections.bounds()).filter(|_| READS.contains(&request.uri().path()));
        let response = self.inner.call(request);
        Box::pin(async move {
            let response = response.await?;
            Ok(match guard {
                Some(guard) => response.map(|body| {
                    let unread = Some(guard.activity.peer.clone());
                    tonic::body::Body::new(GuardedBody {
                        body: Some(body),
                        _guard: guard,
                        unread,
                        bounds,
                    })
                }),
                None => response,
            })
        })
    }
}

/// A response body that holds `_guard` (its call counted as under way, or as a call
/// without a key) until it ends, and counts its data for the peer `unread` until the
/// transport drops it ([`Unread`]). With a `bound` (an answer of one of the [`READS`]),
/// a chunk produced while the peer holds that many bytes or more is dropped and the
/// answer ends there with RESOURCE_EXHAUSTED: a call admitted before its peer reached the
/// bound adds at most one chunk past it.
struct GuardedBody<G> {
    /// `None` once ended by the bound.
    body: Option<tonic::body::Body>,
    _guard: G,
    unread: Option<Arc<PeerLoad>>,
    bounds: Option<Bounds>,
}

impl<G: Unpin> http_body::Body for GuardedBody<G> {
    type Data = tonic::codegen::Bytes;
    type Error = tonic::Status;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Self::Data>, Self::Error>>> {
        let this = &mut *self;
        let Some(body) = this.body.as_mut() else {
            return Poll::Ready(None);
        };
        let frame = ready!(Pin::new(body).poll_frame(cx));
        let Some(peer) = &this.unread else {
            return Poll::Ready(frame);
        };
        let frame = match frame {
            Some(Ok(frame)) => frame,
            other => return Poll::Ready(other),
        };
        let frame = match frame.into_data() {
            Ok(data) => match Unread::within(data, peer, this.bounds) {
                Ok(data) => http_body::Frame::data(data),
                Err(crowded) => {
                    // The handler's work is dropped with the body; its audit entry says
                    // what it answered.
                    this.body = None;
                    metrics::counter!("ern_rate_limited_total", "limit" => crowded.limit())
                        .increment(1);
                    debug!(limit = crowded.limit(), "answer not kept");
                    let mut trailers = http::HeaderMap::new();
                    let _ = crowded.not_kept().add_header(&mut trailers);
                    http_body::Frame::trailers(trailers)
                }
            },
            Err(frame) => frame,
        };
        Poll::Ready(Some(Ok(frame)))
    }

    fn is_end_stream(&self) -> bool {
        self.body.as_ref().is_none_or(|body| body.is_end_stream())
    }

    fn size_hint(&self) -> http_body::SizeHint {
        match &self.body {
            Some(body) => body.size_hint(),
            None => http_body::SizeHint::with_exact(0),
        }
    }
}

/// The connection a call came on: put in the request's extensions by [`ActivityService`]
/// for [`AdmissionService`].
#[derive(Clone)]
struct OnConnection(Arc<Activity>);

/// The connection a call came on, for [`Connections::key_holder`] (in the request's
/// extensions until the handler; a stream's handler may keep it for its items).
#[derive(Clone)]
pub struct OnConnectionKeyed(Arc<Connections>, Arc<Activity>, Arc<AtomicBool>);

impl OnConnectionKeyed {
    /// The connection of a request (its `extensions`), if it is tracked.
    pub fn of(extensions: &http::Extensions) -> Option<OnConnectionKeyed> {
        extensions.get::<OnConnectionKeyed>().cloned()
    }

    /// The call has just authenticated as `principal` (again, for each item of a
    /// stream): the connection keeps its place while the call lasts, and for the idle
    /// timeout after, unless its principal holds more than its share.
    pub fn authenticated(&self, principal: i64) {
        let OnConnectionKeyed(connections, activity, call) = self;
        if !call.swap(true, Ordering::SeqCst) {
            activity.keyed_calls.fetch_add(1, Ordering::SeqCst);
        }
        // Marked before the tables change (under their lock), so an eviction between the
        // two skips it.
        activity
            .keyed
            .store(connections.now_ms() + 1, Ordering::SeqCst);
        if activity.principal.load(Ordering::SeqCst) == principal {
            return;
        }
        let mut open = lock(&connections.open);
        let before = activity.principal.swap(principal, Ordering::SeqCst);
        if before == principal || activity.released.load(Ordering::SeqCst) {
            return;
        }
        if before != 0
            && let Some(held) = open.per_principal.get_mut(&before)
        {
            *held -= 1;
            if *held == 0 {
                open.per_principal.remove(&before);
            }
        }
        *open.per_principal.entry(principal).or_insert(0) += 1;
        if let Some(entry) = open.per_peer.get_mut(&activity.from)
            && entry.without_key.remove(&activity.number).is_some()
        {
            open.without_key -= 1;
        }
        connections.publish(&open);
    }
}

/// Refuses calls from a peer past the caps on unread answers and calls without a key
/// (module documentation).
#[derive(Clone)]
pub struct AdmissionLayer(Arc<Connections>);

impl<S> tower_layer::Layer<S> for AdmissionLayer {
    type Service = AdmissionService<S>;

    fn layer(&self, inner: S) -> AdmissionService<S> {
        AdmissionService {
            inner,
            connections: self.0.clone(),
        }
    }
}

/// The service of [`AdmissionLayer`].
#[derive(Clone)]
pub struct AdmissionService<S> {
    inner: S,
    connections: Arc<Connections>,
}

impl<S, B> tonic::codegen::Service<http::Request<B>> for AdmissionService<S>
where
    S: tonic::codegen::Service<http::Request<B>, Response = http::Response<tonic::body::Body>>,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
{
    type Response = http::Response<tonic::body::Body>;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, S::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: http::Request<B>) -> Self::Future {
        let Some(OnConnection(activity)) = request.extensions_mut().remove::<OnConnection>() else {
            return Box::pin(self.inner.call(request));
        };
        match self.connections.admit_call(&activity, request.uri().path()) {
            Err(crowded) => {
                metrics::counter!("ern_rate_limited_total", "limit" => crowded.limit())
                    .increment(1);
                debug!(peer = %Peer::of(remote_addr(&request)), limit = crowded.limit(), "call refused");
                Box::pin(std::future::ready(Ok(crowded.status().into_http())))
            }
            Ok(None) => Box::pin(self.inner.call(request)),
            Ok(Some(guard)) => {
                let response = self.inner.call(request);
                Box::pin(async move {
                    Ok(response.await?.map(|body| {
                        tonic::body::Body::new(GuardedBody {
                            body: Some(body),
                            _guard: guard,
                            unread: None,
                            bounds: None,
                        })
                    }))
                })
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn activity(peer: &Arc<PeerLoad>) -> Activity {
        Activity::new(1, Peer::of(None), None, peer.clone(), 0)
    }

    fn unread(peer: &PeerLoad) -> u64 {
        peer.unread.load(Ordering::SeqCst)
    }

    fn answer(bytes: usize, peer: &Arc<PeerLoad>) -> tonic::codegen::Bytes {
        Unread::within(tonic::codegen::Bytes::from(vec![7u8; bytes]), peer, None).unwrap()
    }

    #[test]
    fn every_method_is_a_read_or_a_write() {
        let served = crate::api::wire::methods(
            &[
                crate::proto::FILE_DESCRIPTOR_SET,
                tonic_health::pb::FILE_DESCRIPTOR_SET,
                tonic_reflection::pb::v1::FILE_DESCRIPTOR_SET,
                tonic_reflection::pb::v1alpha::FILE_DESCRIPTOR_SET,
            ],
            false,
        );
        let listed: std::collections::HashSet<String> =
            READS.iter().chain(&WRITES).map(|m| m.to_string()).collect();
        assert_eq!(listed.len(), READS.len() + WRITES.len(), "listed twice");
        assert_eq!(served, listed);
    }

    const PER_PEER: Bounds = Bounds {
        per_peer: Some(1_000),
        all: None,
    };

    #[test]
    fn a_bounded_answer_past_the_bound_is_dropped_and_not_counted() {
        let peer = Arc::new(PeerLoad::default());
        let chunk = || tonic::codegen::Bytes::from(vec![1u8; 600]);
        // Under the bound: kept, even the chunk that crosses it.
        let a = Unread::within(chunk(), &peer, Some(PER_PEER)).unwrap();
        let b = Unread::within(chunk(), &peer, Some(PER_PEER)).unwrap();
        assert_eq!(unread(&peer), 1_200);
        // At or past it: dropped, nothing counted.
        assert_eq!(
            Unread::within(chunk(), &peer, Some(PER_PEER)),
            Err(Crowded::Unread(1_000))
        );
        assert_eq!(unread(&peer), 1_200);
        assert_eq!(peer.all.load(Ordering::SeqCst), 1_200);
        // Without bounds (a write's answer): always kept.
        let c = Unread::within(chunk(), &peer, None).unwrap();
        assert_eq!(unread(&peer), 1_800);
        drop((a, c));
        assert_eq!(unread(&peer), 600);
        let d = Unread::within(chunk(), &peer, Some(PER_PEER)).unwrap();
        assert_eq!(unread(&peer), 1_200);
        drop((b, d));
        assert_eq!(unread(&peer), 0);
        assert_eq!(peer.all.load(Ordering::SeqCst), 0);
        let status = Crowded::Unread(1_000).not_kept();
        assert_eq!(status.code(), tonic::Code::ResourceExhausted);
        assert!(status.message().contains("--max-unread-bytes-per-peer"));
    }

    #[test]
    fn past_the_bound_over_all_peers_only_those_past_their_share_are_refused() {
        let bounds = Bounds {
            per_peer: Some(1_000_000),
            all: Some((10_000, 1_000)),
        };
        // Below the bound over all: anyone may hold more than a share.
        assert_eq!(bounds.refuses(5_000, 9_999), None);
        // At or past it: a peer that holds more than its share is refused.
        assert_eq!(
            bounds.refuses(1_001, 10_000),
            Some(Crowded::UnreadAll(10_000))
        );
        // Within its share, it is not, whatever the size of what it is given next.
        assert_eq!(bounds.refuses(1_000, 12_000), None);
        assert_eq!(bounds.refuses(0, 12_000), None);
        // The peer's own bound comes first.
        assert_eq!(
            bounds.refuses(1_000_000, 0),
            Some(Crowded::Unread(1_000_000))
        );
        // Two peers sharing the count over all: the second, holding nothing, gets an
        // answer larger than its share once the first has filled the bound, then no more.
        let all = Arc::new(AtomicU64::new(0));
        let load = || {
            Arc::new(PeerLoad {
                all: all.clone(),
                ..PeerLoad::default()
            })
        };
        let (first, second) = (load(), load());
        let chunk = |n: usize| tonic::codegen::Bytes::from(vec![0u8; n]);
        let held = Unread::within(chunk(10_000), &first, Some(bounds)).unwrap();
        assert_eq!(
            Unread::within(chunk(10), &first, Some(bounds)),
            Err(Crowded::UnreadAll(10_000))
        );
        // Refused, it was not counted.
        assert_eq!(all.load(Ordering::SeqCst), 10_000);
        let small = Unread::within(chunk(1_500), &second, Some(bounds)).unwrap();
        assert_eq!(
            Unread::within(chunk(1), &second, Some(bounds)),
            Err(Crowded::UnreadAll(10_000))
        );
        // A write's answer is counted, never refused.
        let write = Unread::within(chunk(50), &first, None).unwrap();
        assert_eq!(all.load(Ordering::SeqCst), 11_550);
        drop((held, small, write));
        assert_eq!(all.load(Ordering::SeqCst), 0);
        let status = Crowded::UnreadAll(10_000).not_kept();
        assert!(
            status.message().contains("(--max-unread-bytes)"),
            "{status:?}"
        );
        assert!(
            Crowded::UnreadAll(10_000)
                .status()
                .message()
                .contains("share")
        );
    }

    #[test]
    fn an_answers_bytes_count_until_the_last_of_them_is_dropped() {
        let peer = Arc::new(PeerLoad::default());
        let a = answer(1_000, &peer);
        let b = answer(500, &peer);
        assert_eq!(unread(&peer), 1_500);
        assert_eq!(&a[..3], &[7, 7, 7]);
        // A slice of a chunk (a frame's worth) keeps the whole chunk, and its count.
        let mut rest = a.clone();
        let frame = rest.split_to(400);
        drop(a);
        assert_eq!(unread(&peer), 1_500);
        drop((frame, rest));
        assert_eq!(unread(&peer), 500);
        drop(b);
        assert_eq!(unread(&peer), 0);
        // Empty chunks are not wrapped.
        let bounds = Bounds {
            per_peer: Some(0),
            all: Some((0, 0)),
        };
        let empty = Unread::within(tonic::codegen::Bytes::new(), &peer, Some(bounds)).unwrap();
        assert!(empty.is_empty());
        assert_eq!(unread(&peer), 0);
    }

    fn limited(unread: Option<u64>, reflection: Option<usize>) -> Arc<Connections> {
        Connections::new(ConnectionLimits {
            max_connections: 10,
            max_per_peer: 10,
            idle_timeout: None,
            max_unread_per_peer: unread,
            max_unread_all: None,
            max_reflection_per_peer: reflection,
            evict_without_key: false,
        })
    }

    #[test]
    fn past_the_bound_over_all_peers_writes_are_admitted_and_reads_refused() {
        let connections = Connections::new(ConnectionLimits {
            max_connections: 10,
            max_per_peer: 10,
            idle_timeout: None,
            max_unread_per_peer: Some(1 << 30),
            max_unread_all: Some(1_000),
            max_reflection_per_peer: None,
            evict_without_key: false,
        });
        let peer = Arc::new(PeerLoad {
            all: connections.unread_all.clone(),
            ..PeerLoad::default()
        });
        let a = activity(&peer);
        let _held = answer(1_000, &peer);
        for read in READS {
            assert_eq!(
                connections.admit_call(&a, read).err(),
                Some(Crowded::UnreadAll(1_000)),
                "{read}"
            );
        }
        for write in WRITES {
            assert!(connections.admit_call(&a, write).is_ok(), "{write}");
        }
        // Another peer, within its share (1,000 over 10 connections), is admitted.
        let other = Arc::new(PeerLoad {
            all: connections.unread_all.clone(),
            ..PeerLoad::default()
        });
        let _small = answer(100, &other);
        assert!(connections.admit_call(&activity(&other), READS[0]).is_ok());
    }

    #[test]
    fn calls_are_refused_past_the_unread_bound_and_the_reflection_cap() {
        const CHECK: &str = "/grpc.health.v1.Health/Check";
        const REFLECT: &str = "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo";
        const REFLECT_ALPHA: &str =
            "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo";
        const SUBMIT: &str = "/ern_registry.v1.CaseService/SubmitCase";
        let connections = limited(Some(1_000), Some(2));
        let peer = Arc::new(PeerLoad::default());
        let a = activity(&peer);
        let most = answer(999, &peer);
        assert!(connections.admit_call(&a, SUBMIT).unwrap().is_none());
        let last = answer(1, &peer);
        // At the bound: every call is refused, with a key or without.
        for path in [SUBMIT, CHECK, REFLECT] {
            assert_eq!(
                connections.admit_call(&a, path).err(),
                Some(Crowded::Unread(1_000))
            );
        }
        drop(last);
        let first = connections.admit_call(&a, REFLECT).unwrap().unwrap();
        let second = connections.admit_call(&a, REFLECT_ALPHA).unwrap().unwrap();
        assert_eq!(
            connections.admit_call(&a, REFLECT).err(),
            Some(Crowded::Reflection(2))
        );
        // A refused call holds no place; health and calls with a key are not counted.
        assert_eq!(peer.reflection.load(Ordering::SeqCst), 2);
        for path in [SUBMIT, CHECK] {
            assert!(connections.admit_call(&a, path).unwrap().is_none());
        }
        drop(first);
        let third = connections.admit_call(&a, REFLECT).unwrap();
        assert!(third.is_some());
        drop((second, third));
        assert_eq!(peer.reflection.load(Ordering::SeqCst), 0);
        // Every peer together: at most REFLECTION_CALLS_IN_ALL, each peer under its cap.
        let crowd = limited(None, Some(2));
        let peers: Vec<Arc<PeerLoad>> = (0..REFLECTION_CALLS_IN_ALL / 2 + 1)
            .map(|_| Arc::new(PeerLoad::default()))
            .collect();
        let mut under_way = Vec::new();
        for peer in &peers[..REFLECTION_CALLS_IN_ALL / 2] {
            for _ in 0..2 {
                under_way.push(crowd.admit_call(&activity(peer), REFLECT).unwrap());
            }
        }
        let last = activity(&peers[REFLECTION_CALLS_IN_ALL / 2]);
        assert_eq!(
            crowd.admit_call(&last, REFLECT).err(),
            Some(Crowded::ReflectionAll(REFLECTION_CALLS_IN_ALL))
        );
        assert!(crowd.admit_call(&last, CHECK).unwrap().is_none());
        under_way.pop();
        assert!(crowd.admit_call(&last, REFLECT).unwrap().is_some());
        drop(under_way);
        // Unbounded where no limit is set.
        let open = limited(None, None);
        let _held = (most, answer(1 << 20, &peer));
        let guards: Vec<_> = (0..100)
            .map(|_| open.admit_call(&a, REFLECT).unwrap())
            .collect();
        assert!(guards.iter().all(Option::is_some));
    }

    async fn connect(addr: SocketAddr) -> TcpStream {
        TcpStream::connect(addr).await.unwrap()
    }

    /// That the server closes `client` at once, admitting nothing (`why` says otherwise).
    async fn closed_on_accept<S>(incoming: &mut S, client: &mut TcpStream, why: &str)
    where
        S: Stream<Item = io::Result<Tracked>> + Unpin,
    {
        let mut byte = [0u8; 1];
        let read = tokio::select! {
            _ = incoming.next() => panic!("{why}"),
            read = tokio::io::AsyncReadExt::read(client, &mut byte) => read,
        };
        assert!(matches!(read, Ok(0) | Err(_)), "{read:?}");
    }

    #[tokio::test]
    async fn connections_past_the_caps_are_closed_and_places_come_back() {
        let (addr, connections, mut incoming) = serving(10, 2).await;
        let _a = connect(addr).await;
        let first = incoming.next().await.unwrap().unwrap();
        let _b = connect(addr).await;
        let _second = incoming.next().await.unwrap().unwrap();
        assert_eq!(connections.open(), 2);
        // A third from the same address is closed at once.
        let mut c = connect(addr).await;
        closed_on_accept(
            &mut incoming,
            &mut c,
            "a third connection from one peer was admitted",
        )
        .await;
        // When one closes, its place comes back.
        drop(first);
        let _d = connect(addr).await;
        let _fourth = incoming.next().await.unwrap().unwrap();
        assert_eq!(connections.open(), 2);
    }

    /// At the cap, the oldest connection on which no call has authenticated gives its
    /// place to a new one (its reads end, its writes fail); a connection marked as a key
    /// holder keeps its place, and when every place is a key holder's, the new one is
    /// closed.
    #[tokio::test]
    async fn at_the_cap_the_oldest_connection_without_a_key_gives_its_place() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let (addr, connections, mut incoming) = serving(2, 10).await;
        let mut accept = async || {
            let client = connect(addr).await;
            (client, incoming.next().await.unwrap().unwrap())
        };
        let keyed = |tracked: &Tracked| drop(authenticated_call(tracked, 1));
        let (_a, mut first) = accept().await;
        let (_b, second) = accept().await;
        keyed(&second);
        assert_eq!(connections.open(), 2);
        // A third is admitted; the first (no key) is closed for it: end of file for its
        // reader, an error for its writer; the key holder stays.
        let (_c, third) = accept().await;
        assert_eq!(connections.open(), 2);
        let mut byte = [0u8; 1];
        let read = tokio::time::timeout(Duration::from_secs(5), first.read(&mut byte))
            .await
            .expect("the evicted connection's read ends");
        assert_eq!(read.unwrap(), 0);
        assert!(first.write_all(b"x").await.is_err());
        assert!(!second.activity.evicted.load(Ordering::SeqCst));
        // Dropping the evicted connection does not count it out twice.
        drop(first);
        assert_eq!(connections.open(), 2);
        // Once both places are key holders', a new connection is closed at once.
        keyed(&third);
        let mut d = connect(addr).await;
        closed_on_accept(
            &mut incoming,
            &mut d,
            "a connection past the cap was admitted",
        )
        .await;
        assert_eq!(connections.open(), 2);
        assert!(!third.activity.evicted.load(Ordering::SeqCst));
        // A key holder's place comes back when it closes.
        drop(second);
        assert_eq!(connections.open(), 1);
    }

    /// A call on `tracked`'s connection that authenticated, under way until the guard
    /// drops.
    fn authenticated_call(tracked: &Tracked, principal: i64) -> CallGuard {
        let call = tracked
            .connections
            .begin(tracked.remote().unwrap())
            .expect("a tracked connection");
        let mut extensions = http::Extensions::new();
        extensions.insert(OnConnectionKeyed(
            tracked.connections.clone(),
            tracked.activity.clone(),
            call.authenticated.clone(),
        ));
        Connections::key_holder(&extensions, principal);
        call
    }

    /// A key holder keeps its place while an authenticated call on it is under way, and
    /// for the idle timeout after its last one ended; past it, at the cap, the one whose
    /// last authenticated call ended longest ago gives its place (so a revoked key holds
    /// none for long).
    #[tokio::test]
    async fn a_key_holders_place_lapses_after_the_idle_timeout() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let connections = Connections::new(ConnectionLimits {
            max_connections: 2,
            max_per_peer: 10,
            idle_timeout: Some(Duration::from_secs(2)),
            max_unread_per_peer: None,
            max_unread_all: None,
            max_reflection_per_peer: None,
            evict_without_key: true,
        });
        let mut incoming = Box::pin(connections.incoming(listener, None));
        let _a = connect(addr).await;
        let first = incoming.next().await.unwrap().unwrap();
        let _b = connect(addr).await;
        let second = incoming.next().await.unwrap().unwrap();
        // The first's call goes on; the second's ended.
        let call = authenticated_call(&first, 1);
        drop(authenticated_call(&second, 2));
        // Within the timeout both keep their places.
        let mut c = connect(addr).await;
        closed_on_accept(
            &mut incoming,
            &mut c,
            "a key holder gave its place within the timeout",
        )
        .await;
        // Past it, the second gives its place; the first, whose call is under way, not.
        tokio::time::sleep(Duration::from_millis(2_500)).await;
        let _d = connect(addr).await;
        let fourth = incoming.next().await.unwrap().unwrap();
        assert!(second.activity.evicted.load(Ordering::SeqCst));
        assert!(!first.activity.evicted.load(Ordering::SeqCst));
        // The call ends: the first keeps its place for the timeout from then on, and the
        // fourth (no key) gives its place to the next.
        drop(call);
        let _e = connect(addr).await;
        let _fifth = incoming.next().await.unwrap().unwrap();
        assert!(fourth.activity.evicted.load(Ordering::SeqCst));
        assert!(!first.activity.evicted.load(Ordering::SeqCst));
        assert_eq!(connections.open(), 2);
    }

    /// A connection whose call has just authenticated, and that is still in the table of
    /// connections without a key (marked before it is taken out), is not evicted.
    #[tokio::test]
    async fn a_connection_marked_a_key_holders_is_never_evicted_from_the_table() {
        let (addr, connections, mut incoming) = serving(1, 10).await;
        let _a = connect(addr).await;
        let first = incoming.next().await.unwrap().unwrap();
        // As `authenticated` leaves it between its two steps.
        first.activity.keyed.store(1, Ordering::SeqCst);
        assert!(
            lock(&connections.open).per_peer[&first.peer]
                .without_key
                .contains_key(&first.activity.number)
        );
        let mut b = connect(addr).await;
        closed_on_accept(&mut incoming, &mut b, "a key holder gave its place").await;
        assert!(!first.activity.evicted.load(Ordering::SeqCst));
    }

    /// A connection to `addr` from the loopback address `source` (another peer).
    async fn connect_from(source: [u8; 4], addr: SocketAddr) -> TcpStream {
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        socket.bind(SocketAddr::from((source, 0))).unwrap();
        socket.connect(addr).await.unwrap()
    }

    /// The incoming connections of a listener on a free loopback port, admitted by
    /// [`capped`] limits.
    type Incoming = Pin<Box<dyn Stream<Item = io::Result<Tracked>> + Send>>;

    async fn serving(
        max_connections: usize,
        max_per_peer: usize,
    ) -> (SocketAddr, Arc<Connections>, Incoming) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let connections = capped(max_connections, max_per_peer);
        let incoming = Box::pin(connections.incoming(listener, None));
        (addr, connections, incoming)
    }

    /// A connection from `source`, and the server's side of it once admitted.
    async fn accept_from(
        source: [u8; 4],
        addr: SocketAddr,
        incoming: &mut Incoming,
    ) -> (TcpStream, Tracked) {
        let client = connect_from(source, addr).await;
        (client, incoming.next().await.unwrap().unwrap())
    }

    fn capped(max_connections: usize, max_per_peer: usize) -> Arc<Connections> {
        Connections::new(ConnectionLimits {
            max_connections,
            max_per_peer,
            // Long, so that places lapse by it only where a test waits for them (the
            // server's default is 300 s).
            idle_timeout: Some(Duration::from_secs(300)),
            max_unread_per_peer: None,
            max_unread_all: None,
            max_reflection_per_peer: None,
            evict_without_key: true,
        })
    }

    /// Of the connections without a key, the address holding the most gives one first,
    /// whatever their age: a client's one new connection is not the first to go.
    #[tokio::test]
    async fn the_address_holding_most_places_without_a_key_gives_one_first() {
        let (addr, connections, mut incoming) = serving(3, 10).await;
        let (_a, lone) = accept_from([127, 0, 0, 3], addr, &mut incoming).await;
        let (_b, many_first) = accept_from([127, 0, 0, 2], addr, &mut incoming).await;
        let (_c, many_second) = accept_from([127, 0, 0, 2], addr, &mut incoming).await;
        assert_eq!(lock(&connections.open).without_key, 3);
        let (_d, new) = accept_from([127, 0, 0, 4], addr, &mut incoming).await;
        assert!(many_first.activity.evicted.load(Ordering::SeqCst));
        assert_eq!(lock(&connections.open).without_key, 3);
        assert!(!many_second.activity.evicted.load(Ordering::SeqCst));
        assert!(
            !lone.activity.evicted.load(Ordering::SeqCst),
            "the oldest, alone"
        );
        // Marked, dropped: the count follows.
        drop(authenticated_call(&new, 1));
        assert_eq!(lock(&connections.open).without_key, 2);
        drop(many_second);
        assert_eq!(lock(&connections.open).without_key, 1);
    }

    /// One principal holding more places than `max_per_peer`, all in use by its key,
    /// gives one to a new connection; at its share, it keeps them.
    #[tokio::test]
    async fn a_principal_past_its_share_gives_a_place() {
        let (addr, connections, mut incoming) = serving(3, 2).await;
        let mut held = Vec::new();
        for source in 2..5u8 {
            let (client, tracked) = accept_from([127, 0, 0, source], addr, &mut incoming).await;
            drop(authenticated_call(&tracked, 7));
            held.push((client, tracked));
        }
        assert_eq!(lock(&connections.open).per_principal[&7], 3);
        // A fourth takes the place of one of the principal's connections (the one whose
        // last call ended the longest ago; here in the same millisecond, maybe).
        let evicted = |held: &[(TcpStream, Tracked)]| {
            held.iter()
                .filter(|(_, t)| t.activity.evicted.load(Ordering::SeqCst))
                .count()
        };
        let (_e, fourth) = accept_from([127, 0, 0, 5], addr, &mut incoming).await;
        assert_eq!(evicted(&held), 1);
        assert_eq!(lock(&connections.open).per_principal[&7], 2);
        // Now it holds its share: the next is closed at once, whoever it is (the fourth
        // has a key of its own).
        drop(authenticated_call(&fourth, 8));
        let mut f = connect_from([127, 0, 0, 6], addr).await;
        closed_on_accept(
            &mut incoming,
            &mut f,
            "a principal within its share gave its place",
        )
        .await;
        assert_eq!(evicted(&held), 1);
        // Its counts go when its connections do.
        drop(held);
        let open = lock(&connections.open);
        assert!(
            !open.per_principal.contains_key(&7),
            "{:?}",
            open.per_principal
        );
        assert_eq!(open.per_principal[&8], 1);
    }

    /// A connection without a key alone at its address gives its place only after a
    /// principal past its share has given one: one that reconnects whenever it is closed
    /// cannot take every new connection's place in turn while one key holds the rest.
    #[tokio::test]
    async fn one_connection_without_a_key_alone_at_its_address_goes_last() {
        let (addr, _connections, mut incoming) = serving(3, 1).await;
        let mut keyed = Vec::new();
        for source in 2..4u8 {
            let (client, tracked) = accept_from([127, 0, 0, source], addr, &mut incoming).await;
            drop(authenticated_call(&tracked, 7));
            keyed.push((client, tracked));
        }
        let (_c, alone) = accept_from([127, 0, 0, 4], addr, &mut incoming).await;
        let (_d, _new) = accept_from([127, 0, 0, 5], addr, &mut incoming).await;
        assert!(!alone.activity.evicted.load(Ordering::SeqCst));
        let evicted = keyed
            .iter()
            .filter(|(_, t)| t.activity.evicted.load(Ordering::SeqCst))
            .count();
        assert_eq!(evicted, 1);
        // The principal now holds its share (1): the next takes the one alone.
        let (_e, _next) = accept_from([127, 0, 0, 6], addr, &mut incoming).await;
        assert!(alone.activity.evicted.load(Ordering::SeqCst));
    }
}
