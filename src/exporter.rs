//! The Prometheus metrics' listener (`--metrics-listen`): `GET /metrics` over plain
//! HTTP/1.1, served with the caps of the service's other listeners.
//!
//! The exporter crate's own HTTP listener has no cap on connections and no timeout, and
//! retries a failed accept at once, logging each failure: a defences audit of 2026-12-07
//! took every file descriptor through it from one address without a key (gRPC then
//! refused everyone) and had it log 1.8 GB of warnings in 47 s. Here the recorder is the
//! crate's, and the listener is the service's:
//!
//! - at most [`MAX_CONNECTIONS`] connections in all (a scraper needs one), counted beside
//!   the other listeners' in the open-files limit (`startup`); at the cap, the oldest
//!   connection gives its place to the new one (`connections`' eviction: no metrics
//!   connection holds a key), so whoever holds the places cannot keep a scraper out;
//! - the metrics are rendered at most once per [`RENDER_EVERY`] (a client asking in a loop
//!   gets the same text), so clients cannot keep a core busy rendering;
//! - out of file descriptors, accepting pauses 100 ms at a time with a warning at most
//!   every 10 s (`connections::Connections::accept`);
//! - a request's headers within [`HEADER_TIMEOUT`], and a connection lasts at most
//!   [`CONNECTION_LIFETIME`] (a scraper reconnects), so a client that sends nothing, or
//!   never reads its answer, gives its place back.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::http::{Method, Request, Response, StatusCode, header};
use metrics_exporter_prometheus::PrometheusHandle;
use tokio::net::TcpListener;

use crate::connections::{ConnectionLimits, Connections, Listener};

/// Connections to the metrics listener open at once, from everyone together.
pub const MAX_CONNECTIONS: usize = 16;
/// How long a request's headers may take (the first, or the next on a kept-alive
/// connection).
pub const HEADER_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a connection may last, whatever it does.
pub const CONNECTION_LIFETIME: Duration = Duration::from_secs(60);
/// How often the recorder's upkeep runs (what the crate's own listener does for it).
const UPKEEP_EVERY: Duration = Duration::from_secs(5);
/// How long a rendering of the metrics is served again.
pub const RENDER_EVERY: Duration = Duration::from_secs(1);

/// The recorder's handle and its last rendering.
struct Rendered {
    handle: PrometheusHandle,
    last: std::sync::Mutex<Option<(tokio::time::Instant, Arc<str>)>>,
}

impl Rendered {
    /// The metrics as of at most [`RENDER_EVERY`] ago.
    fn text(&self) -> Arc<str> {
        let mut last = self.last.lock().unwrap_or_else(|e| e.into_inner());
        let now = tokio::time::Instant::now();
        match &*last {
            Some((at, text)) if now.duration_since(*at) < RENDER_EVERY => text.clone(),
            _ => {
                let text: Arc<str> = self.handle.render().into();
                *last = Some((now, text.clone()));
                text
            }
        }
    }
}

/// The listener's limits (tests shorten them).
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub max_connections: usize,
    pub header_timeout: Duration,
    pub lifetime: Duration,
}

impl Default for Limits {
    fn default() -> Limits {
        Limits {
            max_connections: MAX_CONNECTIONS,
            header_timeout: HEADER_TIMEOUT,
            lifetime: CONNECTION_LIFETIME,
        }
    }
}

/// Runs the recorder's upkeep every few seconds, for as long as the process runs.
pub fn keep_up(handle: PrometheusHandle) {
    tokio::spawn(async move {
        loop {
            tokio::time::sleep(UPKEEP_EVERY).await;
            handle.run_upkeep();
        }
    });
}

/// Serves `handle`'s metrics on `listener` under `limits`, for as long as the process
/// runs.
pub async fn serve(listener: TcpListener, handle: PrometheusHandle, limits: Limits) {
    let admitted = Connections::of(
        Listener::Metrics,
        ConnectionLimits {
            max_connections: limits.max_connections,
            // No cap per peer (a scraper and an attacker may share an address, as on
            // loopback): at the cap in all the oldest connection gives its place instead.
            max_per_peer: usize::MAX,
            // The lifetime bounds an idle connection.
            idle_timeout: None,
            // The gRPC listener's layers only.
            max_unread_per_peer: None,
            max_unread_all: None,
            max_reflection_per_peer: None,
            // No metrics connection holds a key: at the cap, the oldest gives its place.
            evict_without_key: true,
        },
    );
    let handle = Arc::new(Rendered {
        handle,
        last: std::sync::Mutex::new(None),
    });
    let mut tasks = tokio::task::JoinSet::new();
    loop {
        let stream = tokio::select! {
            // Reaps the connections that ended.
            Some(_) = tasks.join_next(), if !tasks.is_empty() => continue,
            stream = admitted.accept(&listener) => stream,
        };
        let handle = handle.clone();
        let service = hyper::service::service_fn(move |request: Request<hyper::body::Incoming>| {
            let answer = answer(&handle, &request);
            async move { Ok::<_, Infallible>(answer) }
        });
        let connection = hyper::server::conn::http1::Builder::new()
            .timer(hyper_util::rt::TokioTimer::new())
            .header_read_timeout(limits.header_timeout)
            .serve_connection(hyper_util::rt::TokioIo::new(stream), service);
        let lifetime = limits.lifetime;
        tasks.spawn(async move {
            // Past its lifetime the connection is dropped, and closed with it.
            let _ = tokio::time::timeout(lifetime, connection).await;
        });
    }
}

/// The answer to `request`: the metrics for `GET /metrics`, else 404 or 405.
fn answer<B>(handle: &Rendered, request: &Request<B>) -> Response<Body> {
    let plain = |status: StatusCode, text: &'static str| {
        Response::builder()
            .status(status)
            .header(header::CONTENT_TYPE, "text/plain; charset=utf-8")
            .body(Body::from(text))
            .unwrap_or_default()
    };
    if request.uri().path() != "/metrics" {
        return plain(
            StatusCode::NOT_FOUND,
            "not found: the metrics are at /metrics\n",
        );
    }
    if request.method() != Method::GET {
        return plain(StatusCode::METHOD_NOT_ALLOWED, "only GET\n");
    }
    Response::builder()
        .header(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )
        .header(header::CACHE_CONTROL, "no-store")
        .body(Body::from(handle.text().to_string()))
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;
    use metrics_exporter_prometheus::PrometheusBuilder;
    use std::net::SocketAddr;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpStream;

    /// A listener of at most `max_connections`, with these timeouts, serving a recorder
    /// that holds `ern_test_total 3`.
    async fn start(
        max_connections: usize,
        header_timeout: Duration,
        lifetime: Duration,
    ) -> SocketAddr {
        let recorder = PrometheusBuilder::new().build_recorder();
        let handle = recorder.handle();
        metrics::with_local_recorder(&recorder, || {
            metrics::counter!("ern_test_total").increment(3);
        });
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let limits = Limits {
            max_connections,
            header_timeout,
            lifetime,
        };
        tokio::spawn(serve(listener, handle, limits));
        addr
    }

    /// What the server sends on `tcp` until it closes it, if it does within `within`.
    async fn closed_within(tcp: &mut TcpStream, within: Duration) -> Option<String> {
        let mut all = Vec::new();
        let read = tokio::time::timeout(within, tcp.read_to_end(&mut all)).await;
        read.ok()
            .map(|_| String::from_utf8_lossy(&all).into_owned())
    }

    async fn until_closed(tcp: &mut TcpStream) -> Option<String> {
        closed_within(tcp, Duration::from_secs(10)).await
    }

    async fn get(addr: SocketAddr, path: &str) -> Option<String> {
        let mut tcp = TcpStream::connect(addr).await.unwrap();
        let request = format!("GET {path} HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n");
        tcp.write_all(request.as_bytes()).await.ok()?;
        until_closed(&mut tcp).await
    }

    #[tokio::test]
    async fn metrics_are_served_at_their_path_only() {
        let addr = start(MAX_CONNECTIONS, HEADER_TIMEOUT, CONNECTION_LIFETIME).await;
        let answer = get(addr, "/metrics").await.unwrap();
        assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
        assert!(answer.contains("ern_test_total 3"), "{answer}");
        let answer = get(addr, "/").await.unwrap();
        assert!(answer.starts_with("HTTP/1.1 404"), "{answer}");
    }

    /// A connection that sends nothing is closed after the header timeout.
    #[tokio::test]
    async fn a_silent_connection_is_cut_off() {
        let addr = start(2, Duration::from_millis(300), Duration::from_secs(60)).await;
        let mut silent = TcpStream::connect(addr).await.unwrap();
        assert!(
            closed_within(&mut silent, Duration::from_secs(10))
                .await
                .is_some()
        );
    }

    /// At the cap, the oldest connection gives its place to the new one: whoever holds
    /// every place cannot keep a scraper out.
    #[tokio::test]
    async fn at_the_cap_the_oldest_connection_gives_its_place() {
        let addr = start(2, Duration::from_secs(60), Duration::from_secs(60)).await;
        let mut first = TcpStream::connect(addr).await.unwrap();
        let mut second = TcpStream::connect(addr).await.unwrap();
        tokio::time::sleep(Duration::from_millis(100)).await;
        // A scraper is answered, and the oldest is closed for it (at once, not after the
        // header timeout); the second is still open.
        let answer = get(addr, "/metrics").await.unwrap();
        assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
        assert!(
            closed_within(&mut first, Duration::from_secs(5))
                .await
                .is_some()
        );
        assert!(
            closed_within(&mut second, Duration::from_millis(300))
                .await
                .is_none()
        );
    }

    /// A connection lasts its lifetime at most, whatever it does: one whose request never
    /// ends is closed then, long before the header timeout.
    #[tokio::test]
    async fn a_connection_is_closed_after_its_lifetime() {
        let addr = start(2, Duration::from_secs(60), Duration::from_secs(1)).await;
        let mut tcp = TcpStream::connect(addr).await.unwrap();
        tcp.write_all(b"GET /metrics HTTP/1.1\r\nhost: x\r\n")
            .await
            .unwrap();
        assert!(
            closed_within(&mut tcp, Duration::from_secs(10))
                .await
                .is_some()
        );
    }

    /// The metrics are rendered at most once per [`RENDER_EVERY`].
    #[test]
    fn a_rendering_is_served_again_for_a_moment() {
        let recorder = PrometheusBuilder::new().build_recorder();
        let rendered = Rendered {
            handle: recorder.handle(),
            last: std::sync::Mutex::new(None),
        };
        let before = rendered.text();
        metrics::with_local_recorder(&recorder, || {
            metrics::counter!("ern_test_total").increment(1);
        });
        assert!(Arc::ptr_eq(&before, &rendered.text()));
        let mut last = rendered.last.lock().unwrap();
        let at = &mut last.as_mut().unwrap().0;
        *at = at.checked_sub(RENDER_EVERY).unwrap();
        drop(last);
        assert!(rendered.text().contains("ern_test_total 1"));
    }
}
