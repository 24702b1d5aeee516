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
//! - [`ActivityLayer`] counts, per connection, the calls under way (a call lasts until its
//!   response body ends, so an open stream counts), and a connection with no call for
//!   `--idle-timeout-secs` is closed: its reads report end of file, and HTTP/2 closes it.
//!   Idle is measured in calls, not bytes, because the server's own keepalive pings make
//!   an idle connection exchange bytes forever.
//!
//! The tables are keyed by open connections (bounded by the cap) and emptied as they close.

use std::collections::HashMap;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

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
}

/// Which listener a [`Connections`] serves: it names the log lines and the labels of
/// `ern_connections_refused_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Listener {
    Grpc,
    Console,
}

/// The open connections, shared by the listener and the layer.
pub struct Connections {
    listener: Listener,
    limits: ConnectionLimits,
    epoch: Instant,
    open: Mutex<Open>,
    /// When running out of file descriptors was last logged (ms since `epoch`; 0: never).
    descriptors_warned: AtomicU64,
}

#[derive(Default)]
struct Open {
    total: usize,
    per_peer: HashMap<Peer, usize>,
    by_addr: HashMap<SocketAddr, Arc<Activity>>,
}

/// Calls under way on one connection, and when the last one ended.
struct Activity {
    active: AtomicUsize,
    /// Milliseconds since `Connections::epoch`.
    last: AtomicU64,
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
            },
            epoch: Instant::now(),
            open: Mutex::new(Open::default()),
            descriptors_warned: AtomicU64::new(0),
        })
    }

    fn now_ms(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64
    }

    /// Connections open now.
    pub fn open(&self) -> usize {
        lock(&self.open).total
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

    /// Admits `stream` if the caps allow, else closes it.
    fn admit(self: &Arc<Self>, stream: TcpStream) -> Option<Tracked> {
        let remote = stream.peer_addr().ok();
        let peer = Peer::of(remote);
        let activity = Arc::new(Activity {
            active: AtomicUsize::new(0),
            last: AtomicU64::new(self.now_ms()),
        });
        {
            let mut open = lock(&self.open);
            let from_peer = open.per_peer.get(&peer).copied().unwrap_or(0);
            let refused = if open.total >= self.limits.max_connections {
                Some("max_connections")
            } else if from_peer >= self.limits.max_per_peer {
                Some("max_connections_per_peer")
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
            *open.per_peer.entry(peer).or_insert(0) += 1;
            if let Some(addr) = remote {
                open.by_addr.insert(addr, activity.clone());
            }
        }
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

    /// Marks a call under way on the connection from `addr`, until the guard drops.
    fn begin(self: &Arc<Self>, addr: SocketAddr) -> Option<CallGuard> {
        let activity = lock(&self.open).by_addr.get(&addr)?.clone();
        activity.active.fetch_add(1, Ordering::SeqCst);
        Some(CallGuard {
            activity,
            connections: self.clone(),
        })
    }

    /// The layer that tells connections when calls begin and end.
    pub fn layer(self: &Arc<Self>) -> ActivityLayer {
        ActivityLayer(self.clone())
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

impl Tracked {
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
        open.total = open.total.saturating_sub(1);
        if let Some(n) = open.per_peer.get_mut(&self.peer) {
            *n -= 1;
            if *n == 0 {
                open.per_peer.remove(&self.peer);
            }
        }
        if let Some(addr) = self.remote
            && open
                .by_addr
                .get(&addr)
                .is_some_and(|a| Arc::ptr_eq(a, &self.activity))
        {
            open.by_addr.remove(&addr);
        }
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
}

impl Drop for CallGuard {
    fn drop(&mut self) {
        self.activity
            .last
            .store(self.connections.now_ms(), Ordering::SeqCst);
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
{
    type Response = http::Response<tonic::body::Body>;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, S::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        let guard = remote_addr(&request).and_then(|addr| self.connections.begin(addr));
        let response = self.inner.call(request);
        Box::pin(async move {
            let response = response.await?;
            Ok(match guard {
                Some(guard) => response.map(|body| {
                    tonic::body::Body::new(GuardedBody {
                        body,
                        _guard: guard,
                    })
                }),
                None => response,
            })
        })
    }
}

/// A response body that keeps its call counted as under way until it ends.
struct GuardedBody {
    body: tonic::body::Body,
    _guard: CallGuard,
}

impl http_body::Body for GuardedBody {
    type Data = tonic::codegen::Bytes;
    type Error = tonic::Status;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Self::Data>, Self::Error>>> {
        Pin::new(&mut self.body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.body.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn connect(addr: SocketAddr) -> TcpStream {
        TcpStream::connect(addr).await.unwrap()
    }

    #[tokio::test]
    async fn connections_past_the_caps_are_closed_and_places_come_back() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let connections = Connections::new(ConnectionLimits {
            max_connections: 10,
            max_per_peer: 2,
            idle_timeout: None,
        });
        let mut incoming = Box::pin(connections.incoming(listener, None));
        let _a = connect(addr).await;
        let first = incoming.next().await.unwrap().unwrap();
        let _b = connect(addr).await;
        let _second = incoming.next().await.unwrap().unwrap();
        assert_eq!(connections.open(), 2);
        // A third from the same address is closed at once.
        let mut c = connect(addr).await;
        let mut byte = [0u8; 1];
        let read = tokio::select! {
            _ = incoming.next() => panic!("a third connection from one peer was admitted"),
            read = tokio::io::AsyncReadExt::read(&mut c, &mut byte) => read,
        };
        // When one closes, its place comes back.
        drop(first);
        let _d = connect(addr).await;
        let _fourth = incoming.next().await.unwrap().unwrap();
        assert_eq!(connections.open(), 2);
        assert!(matches!(read, Ok(0) | Err(_)), "{read:?}");
    }
}
