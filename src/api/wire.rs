//! The gRPC contract on the wire, held before tonic reads a request: a tower layer around
//! every route (the registry's services, health and reflection).
//!
//! tonic is lenient where the gRPC over HTTP/2 specification is not, and strict with the
//! wrong code where the caller is at fault: it serves any `content-type`, answers a broken
//! length prefix, a compressed flag without `grpc-encoding` or an empty unary body with
//! INTERNAL (the code of a server bug), an oversized message with OUT_OF_RANGE,
//! and silently drops the second message of a unary call. This layer decides first:
//!
//! - a `content-type` that does not start with `application/grpc` is refused with HTTP 415
//!   Unsupported Media Type, as `PROTOCOL-HTTP2.md` says a server should (so that no plain
//!   HTTP client takes the answer for a success); `application/grpc+<subtype>` other than
//!   `+proto` is a gRPC request in a message format this service does not speak:
//!   UNIMPLEMENTED, like a compression it does not support;
//! - a body whose framing is broken (a length prefix that announces more than arrives, a
//!   compressed flag with no `grpc-encoding`, a flag other than 0 or 1) is INVALID_ARGUMENT:
//!   the caller's to fix, never INTERNAL (the service promises that malformed input never
//!   produces INTERNAL; `docs/security.md`);
//! - a message longer than `--max-message-bytes` is RESOURCE_EXHAUSTED, naming the limit,
//!   as the status-code table of gRPC says for a message over a configured limit; a
//!   request message is refused from its length prefix, before its bytes are buffered, and
//!   a response message over the limit (tonic's encoder says OUT_OF_RANGE) fails the call
//!   with the same code;
//! - a unary or server-streaming call (one request message by contract) with no message or
//!   with a second one is INVALID_ARGUMENT: the request body is malformed for its method,
//!   and the caller's to fix. (gRPC's status-code table suggests UNIMPLEMENTED for such a
//!   "cardinality violation", but that is also the code of a method that does not exist,
//!   so a client could not tell its own malformed body from a missing method.)
//!
//! - **unfinished requests are bounded per address and in all** ([`Unfinished`]): tonic
//!   buffers a request message until its last byte arrives, and reads a unary call's
//!   message before its handler checks the key, so a caller without a valid key could
//!   open many calls, send all but the last byte of a large message each, and keep the
//!   memory for the call's deadline (or send it whole and never end the body: tonic keeps
//!   a unary call's message until then; or send no body at all, and have its header
//!   fields and stream held). A request costs, from its headers until its body ends,
//!   [`CALL_COST`], its header fields ([`FIELD_COST`] each beside name and value), and its
//!   message's announced length (tonic reserves it when the prefix arrives) from its
//!   prefix until it is complete, and for a method of one message until the body ends: at
//!   most [`UNFINISHED_PER_PEER`] per address (an IPv4 address or an IPv6 /64); and when
//!   all addresses together hold [`UNFINISHED_TOTAL`], an address already holding more
//!   than its share (the total over `--max-connections`) is refused more, and one within
//!   it is not (so that many addresses together cannot refuse the others' calls; each
//!   connection's address may then add one request past its share, so all together hold
//!   at most the total and, per connection, its share and one request). A call whose headers alone go past is
//!   refused at once; a frame that would go past fails its call with RESOURCE_EXHAUSTED
//!   (a reflection stream so failed ends with OK: tonic-reflection ends its stream on a
//!   request error). A request with more than [`MAX_HEADER_FIELDS`] header fields is
//!   refused at once, INVALID_ARGUMENT (a few hundred bytes of compressed header block
//!   can name one field hundreds of times).
//!   Health and reflection requests, which need no key and are names, are held to
//!   [`SMALL_MESSAGE`].
//!
//! The framing is followed as the bytes pass, without buffering: the layer only counts.
//! Its verdict reaches tonic as an error of the request body, which tonic gives the client
//! as the call's status (for a streaming call, as the status that ends the stream).
//!
//! **Refusals no handler saw.** A call refused here, or by tonic before its handler runs
//! (a body that is not a message of the method, an unknown method), or answered while
//! the database is unreachable, or whose own audit entry could not be committed (a
//! success then answered UNAVAILABLE, or a failure), has no audit entry of its own, when the refusal is the
//! whole answer (trailers-only: a stream that the handler had begun ends in trailers this
//! layer does not read). This layer counts each in the per-address summary of refused
//! calls (`refusals`, written to the audit log as every unauthenticated refusal is; a path
//! that is no method of the service under one label). It charges nothing to the address's
//! allowance of refusals (see `Rules::refused`). (Reflection ends its stream with OK on a
//! body that is not a message: not counted.) It tells them from a
//! handler's failure by the header `x-ern-audited`, which `api::conclude` puts on every
//! failure it recorded and this layer removes. A call that ends before any handler took
//! it (reset, its connection closed, or ended by the server's deadline while its body
//! had not come) is counted as CANCELLED ([`Abandoned`]; a handler marks the calls it
//! takes with [`Seen`]).

use std::collections::HashSet;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll, ready};

use http_body::Frame;
use prost::Message;
use prost::bytes::Bytes;
use tonic::Status;
use tonic::body::Body;
use tonic::codegen::Service;
use tonic::codegen::http::{self, HeaderMap, HeaderValue, StatusCode, header};

use crate::outcome::Outcome;
use crate::ratelimit::Peer;
use crate::refusals::Refusals;

/// The header `api::conclude` marks a failure it recorded with; removed here before the
/// answer leaves.
pub const AUDITED: &str = "x-ern-audited";

/// The content types of the contract: protobuf messages in gRPC framing.
const GRPC: &str = "application/grpc";
const GRPC_PROTO: &str = "application/grpc+proto";

/// The gRPC message prefix: a compressed flag and a big-endian length.
const PREFIX: usize = 5;

/// Health and reflection request messages are held to this length (an HTTP/2 frame's
/// default size).
pub const SMALL_MESSAGE: usize = 16 << 10;
/// Bytes of unfinished requests of one address at once.
pub const UNFINISHED_PER_PEER: usize = 64 << 20;
/// The same, from all addresses, past which an address holding more than its share is
/// refused.
pub const UNFINISHED_TOTAL: usize = 256 << 20;
/// What a call costs while its request is unfinished, beside its header fields and its
/// message: HTTP/2's and tonic's state of a stream (about 11 to 12 KB measured with few
/// headers, 2026-12-06).
pub const CALL_COST: usize = 12 << 10;
/// What a header field costs in memory beside its name and value (a decoded field takes
/// about 100 bytes more than its text: measured with 440 empty fields, 2026-12-06).
pub const FIELD_COST: usize = 100;
/// Header fields a request may have; past it the call is refused at once (a header block
/// of 537 bytes can name one compressed field 440 times).
pub const MAX_HEADER_FIELDS: usize = 64;

/// The bytes of unfinished requests, per address and in all (module doc).
pub struct Unfinished {
    counts: std::sync::Mutex<(usize, std::collections::HashMap<Peer, usize>)>,
    per_peer: usize,
    total: usize,
    /// What an address may hold while all of them hold `total` or more.
    share: usize,
}

impl Unfinished {
    /// The bounds, with an address's share of the total for `max_connections`
    /// connections.
    pub fn new(max_connections: usize) -> Unfinished {
        Unfinished::with_limits(
            UNFINISHED_PER_PEER,
            UNFINISHED_TOTAL,
            UNFINISHED_TOTAL / max_connections.max(1),
        )
    }

    pub fn with_limits(per_peer: usize, total: usize, share: usize) -> Unfinished {
        Unfinished {
            counts: std::sync::Mutex::new((0, std::collections::HashMap::new())),
            per_peer,
            total,
            share,
        }
    }
}

/// One call's share of [`Unfinished`]: while its request is unfinished, its cost
/// ([`request_cost`]) and the bytes of its message under way, counted per address and
/// in all.
struct Held {
    unfinished: Arc<Unfinished>,
    peer: Peer,
    bytes: usize,
    /// The request's cost beside its message.
    base: usize,
}

impl Held {
    /// Makes the call's share `bytes`; `Err(())`, unchanged, if more would go past the
    /// address's bound, or past the bound in all while the address already holds more
    /// than its share (one within it may still grow, by one message at most).
    fn set(&mut self, bytes: usize) -> Result<(), ()> {
        if bytes == self.bytes {
            return Ok(());
        }
        let u = &self.unfinished;
        let mut counts = u.counts.lock().unwrap_or_else(|e| e.into_inner());
        let (total, per_peer) = &mut *counts;
        let from = per_peer.get(&self.peer).copied().unwrap_or(0);
        let from_now = from - self.bytes + bytes;
        let total_now = *total - self.bytes + bytes;
        if bytes > self.bytes && (from_now > u.per_peer || (total_now > u.total && from > u.share))
        {
            return Err(());
        }
        *total = total_now;
        if from_now == 0 {
            per_peer.remove(&self.peer);
        } else {
            per_peer.insert(self.peer, from_now);
        }
        self.bytes = bytes;
        Ok(())
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        let _ = self.set(0);
    }
}

/// What a request costs the server while it is unfinished, beside its message:
/// [`CALL_COST`], its URI's authority, path and query (the pseudo-header fields, which
/// the header map leaves out), and each header field's name and value and
/// [`FIELD_COST`].
fn request_cost<B>(request: &http::Request<B>) -> usize {
    let uri = request.uri();
    CALL_COST
        + uri.authority().map_or(0, |a| a.as_str().len())
        + uri.path_and_query().map_or(0, |p| p.as_str().len())
        + request
            .headers()
            .iter()
            .map(|(name, value)| name.as_str().len() + value.len() + FIELD_COST)
            .sum::<usize>()
}

/// The refusal of a call past [`Unfinished`]'s bounds.
fn unfinished_refusal() -> Status {
    metrics::counter!("ern_rate_limited_total", "limit" => "unfinished_messages").increment(1);
    Status::resource_exhausted(
        "the service holds too many unfinished requests from your address (or from all): \
         retry in a moment",
    )
}

/// Enforces the wire contract in front of every route (see the module documentation).
#[derive(Clone)]
pub struct WireContractLayer {
    rules: Arc<Rules>,
}

struct Rules {
    /// Paths (`/package.Service/Method`) of methods that take exactly one request message.
    single_request: HashSet<String>,
    /// Paths of every method of the descriptor sets: a refusal of any other path is
    /// counted under one label, so that a flood of made-up paths adds no summary entries.
    known: HashSet<String>,
    max_message_bytes: usize,
    /// Where refusals no handler recorded are counted (none: not counted).
    refusals: Option<Arc<Refusals>>,
    /// The bound on unfinished messages (none: not bounded).
    unfinished: Option<Arc<Unfinished>>,
}

impl Rules {
    /// Counts a call refused without an audit entry of its own. Nothing is charged to
    /// the address's allowance of refusals: that allowance only gates authentication, so
    /// a charge would not slow a flood of malformed requests, and everyone behind the
    /// address (a hospital's NAT, its console sign-ins) would pay for one broken client.
    fn refused(&self, peer: Peer, path: &str, outcome: Outcome) {
        let Some(refusals) = &self.refusals else {
            return;
        };
        let method = if self.known.contains(path) {
            method_of(path)
        } else {
            "(unknown method)".to_owned()
        };
        refusals.note(peer, "", &method, outcome.name());
    }
}

/// "Service/Method" of a path `/package.Service/Method`, as audit entries name methods.
fn method_of(path: &str) -> String {
    let path = path.trim_start_matches('/');
    match path.split_once('/') {
        Some((service, method)) => {
            let service = service.rsplit('.').next().unwrap_or(service);
            format!("{service}/{method}")
        }
        None => path.to_owned(),
    }
}

impl WireContractLayer {
    /// The rules for the methods in `descriptor_sets` (encoded `FileDescriptorSet`s):
    /// those that are not client-streaming take exactly one request message. A path in no
    /// set is held to the framing rules only (tonic answers an unknown method itself).
    /// Refusals no handler recorded are counted in `refusals`; unfinished messages are
    /// bounded by `unfinished`.
    pub fn new(
        descriptor_sets: &[&[u8]],
        max_message_bytes: usize,
        refusals: Option<Arc<Refusals>>,
        unfinished: Option<Unfinished>,
    ) -> WireContractLayer {
        WireContractLayer {
            rules: Arc::new(Rules {
                single_request: methods(descriptor_sets, true),
                known: methods(descriptor_sets, false),
                max_message_bytes,
                refusals,
                unfinished: unfinished.map(Arc::new),
            }),
        }
    }
}

/// The paths of the methods of `descriptor_sets`; `single`: only those that take one
/// request message.
pub(crate) fn methods(descriptor_sets: &[&[u8]], single: bool) -> HashSet<String> {
    let mut paths = HashSet::new();
    for set in descriptor_sets {
        // The sets are compiled into the binary; `single_request_methods_are_known` holds
        // them decodable.
        let Ok(set) = prost_types::FileDescriptorSet::decode(*set) else {
            continue;
        };
        for file in &set.file {
            let package = file.package();
            for service in &file.service {
                for method in &service.method {
                    if !(single && method.client_streaming()) {
                        let service = match package {
                            "" => service.name().to_owned(),
                            package => format!("{package}.{}", service.name()),
                        };
                        paths.insert(format!("/{service}/{}", method.name()));
                    }
                }
            }
        }
    }
    paths
}

impl<S> tower_layer::Layer<S> for WireContractLayer {
    type Service = WireContract<S>;

    fn layer(&self, inner: S) -> WireContract<S> {
        WireContract {
            inner,
            rules: self.rules.clone(),
        }
    }
}

/// The service of [`WireContractLayer`].
#[derive(Clone)]
pub struct WireContract<S> {
    inner: S,
    rules: Arc<Rules>,
}

type BoxFuture<T, E> = Pin<Box<dyn Future<Output = Result<T, E>> + Send>>;

impl<S> Service<http::Request<Body>> for WireContract<S>
where
    S: Service<http::Request<Body>, Response = http::Response<Body>>,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
{
    type Response = http::Response<Body>;
    type Error = S::Error;
    type Future = BoxFuture<Self::Response, Self::Error>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<Body>) -> Self::Future {
        let peer = Peer::of(crate::connections::remote_addr(&request));
        let path = request.uri().path().to_owned();
        if let Some(refusal) = refuse_content_type(request.headers()) {
            let outcome = match Status::from_header_map(refusal.headers()) {
                Some(status) => crate::api::outcome_of(status.code()),
                None => Outcome::InvalidArgument,
            };
            self.rules.refused(peer, &path, outcome);
            return Box::pin(std::future::ready(Ok(refusal)));
        }
        let single = self.rules.single_request.contains(request.uri().path());
        // A compressed message needs a `grpc-encoding` other than identity; one tonic does
        // not support is refused by tonic (UNIMPLEMENTED) before the body is read.
        let encoded = request
            .headers()
            .get("grpc-encoding")
            .is_some_and(|v| v.as_bytes() != b"identity");
        // Health and reflection requests are names: no more than a small message (their
        // streams need no key, and tonic keeps a stream's largest message while it is open).
        let limit = if path.starts_with("/grpc.health.") || path.starts_with("/grpc.reflection.") {
            self.rules.max_message_bytes.min(SMALL_MESSAGE)
        } else {
            self.rules.max_message_bytes
        };
        let framing = Framing {
            single,
            encoded,
            limit,
            prefix: [0; PREFIX],
            have: 0,
            remaining: 0,
            length: 0,
            messages: 0,
        };
        let fields = request.headers().len();
        if fields > MAX_HEADER_FIELDS {
            self.rules.refused(peer, &path, Outcome::InvalidArgument);
            return Box::pin(std::future::ready(Ok(Status::invalid_argument(format!(
                "the request has {fields} header fields; at most {MAX_HEADER_FIELDS} are read"
            ))
            .into_http())));
        }
        let mut held = None;
        if let Some(unfinished) = self.rules.unfinished.as_ref() {
            let base = request_cost(&request);
            let mut share = Held {
                unfinished: Arc::clone(unfinished),
                peer,
                bytes: 0,
                base,
            };
            if share.set(base).is_err() {
                self.rules.refused(peer, &path, Outcome::ResourceExhausted);
                return Box::pin(std::future::ready(Ok(unfinished_refusal().into_http())));
            }
            held = Some(share);
        }
        let cut = Arc::new(AtomicBool::new(false));
        let mut request = request.map(|body| {
            Body::new(FramedBody {
                inner: body,
                framing,
                done: false,
                held,
                cut: Arc::clone(&cut),
            })
        });
        let seen = Seen::default();
        request.extensions_mut().insert(seen.clone());
        let limit = self.rules.max_message_bytes;
        let mut abandoned = Abandoned {
            rules: Arc::clone(&self.rules),
            peer,
            path,
            seen,
            cut,
            armed: true,
        };
        let call = self.inner.call(request);
        Box::pin(async move {
            let mut response = call.await?;
            abandoned.armed = false;
            // A failure answered in the headers (trailers-only) that no handler recorded.
            let audited = response.headers_mut().remove(AUDITED).is_some();
            if !audited
                && let Some(status) = Status::from_header_map(response.headers())
                && status.code() != tonic::Code::Ok
            {
                let outcome = if abandoned.cut.load(Ordering::Relaxed) {
                    Outcome::Cancelled
                } else {
                    crate::api::outcome_of(status.code())
                };
                abandoned.rules.refused(peer, &abandoned.path, outcome);
            }
            Ok(response.map(|body| Body::new(SizedResponse { inner: body, limit })))
        })
    }
}

/// Marks a call that a handler of the service took (`api::audited!`): from then on the
/// handler records the call, abandoned or not (`service::Running`).
#[derive(Clone, Default)]
pub struct Seen(Arc<AtomicBool>);

impl Seen {
    pub fn mark(&self) {
        self.0.store(true, Ordering::Relaxed);
    }
}

/// A call whose answer is still to come: dropped so (the client reset the stream or
/// closed its connection, or the server's deadline passed) before any handler took it,
/// it is counted as CANCELLED in the summary of refused calls. (Before a handler runs,
/// tonic reads a unary call's whole body: a call whose body never came would otherwise
/// leave no trace.) So is a call that tonic answered because its body was `cut`.
struct Abandoned {
    rules: Arc<Rules>,
    peer: Peer,
    path: String,
    seen: Seen,
    /// The transport ended the request body (a reset, a closed connection).
    cut: Arc<AtomicBool>,
    armed: bool,
}

impl Drop for Abandoned {
    fn drop(&mut self) {
        if self.armed && !self.seen.0.load(Ordering::Relaxed) {
            self.rules
                .refused(self.peer, &self.path, Outcome::Cancelled);
        }
    }
}

/// The response that refuses the request's content type; `None` for those of the contract.
fn refuse_content_type(headers: &HeaderMap) -> Option<http::Response<Body>> {
    let media = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .map(|v| {
            v.split(';')
                .next()
                .unwrap_or("")
                .trim()
                .to_ascii_lowercase()
        });
    match media.as_deref() {
        Some(GRPC | GRPC_PROTO) => None,
        Some(m) if m.starts_with("application/grpc+") => Some(
            Status::unimplemented(format!(
                "this service speaks protobuf only: send content-type {GRPC} or {GRPC_PROTO}"
            ))
            .into_http(),
        ),
        _ => {
            let message = format!(
                "this is a gRPC service: requests need content-type {GRPC} or {GRPC_PROTO}\n"
            );
            let mut response = http::Response::new(Body::new(message));
            *response.status_mut() = StatusCode::UNSUPPORTED_MEDIA_TYPE;
            let headers = response.headers_mut();
            headers.insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("text/plain; charset=utf-8"),
            );
            // For a gRPC client that mislabelled its request: the same refusal as a status.
            let _ = Status::unimplemented(format!("content-type must be {GRPC} or {GRPC_PROTO}"))
                .add_header(headers);
            Some(response)
        }
    }
}

/// Where a request body stands in its gRPC framing.
#[derive(Debug, Clone)]
struct Framing {
    /// The method takes exactly one message.
    single: bool,
    /// The call names a `grpc-encoding` (other than identity).
    encoded: bool,
    limit: usize,
    /// The prefix of the next message, as far as it has arrived.
    prefix: [u8; PREFIX],
    have: usize,
    /// Bytes of the current message still to come.
    remaining: usize,
    /// The length of the current message.
    length: usize,
    /// Messages whose prefix has arrived.
    messages: usize,
}

impl Framing {
    /// Follows the framing over the next bytes of the body.
    fn feed(&mut self, mut bytes: &[u8]) -> Result<(), Status> {
        while !bytes.is_empty() {
            if self.remaining > 0 {
                let n = self.remaining.min(bytes.len());
                self.remaining -= n;
                bytes = &bytes[n..];
                continue;
            }
            if self.have == 0 && self.single && self.messages >= 1 {
                return Err(Status::invalid_argument(
                    "this method takes exactly one request message; the call sent more",
                ));
            }
            let n = (PREFIX - self.have).min(bytes.len());
            self.prefix[self.have..self.have + n].copy_from_slice(&bytes[..n]);
            self.have += n;
            bytes = &bytes[n..];
            if self.have == PREFIX {
                self.have = 0;
                self.start_message()?;
            }
        }
        Ok(())
    }

    /// Checks a complete prefix and starts its message.
    fn start_message(&mut self) -> Result<(), Status> {
        match self.prefix[0] {
            0 => {}
            1 if self.encoded => {}
            1 => {
                return Err(Status::invalid_argument(
                    "a request message is flagged compressed, but the call names no \
                     grpc-encoding",
                ));
            }
            flag => {
                return Err(Status::invalid_argument(format!(
                    "a request message has compressed-flag {flag}; only 0 and 1 are defined"
                )));
            }
        }
        let len = u32::from_be_bytes([
            self.prefix[1],
            self.prefix[2],
            self.prefix[3],
            self.prefix[4],
        ]) as usize;
        if len > self.limit {
            return Err(Status::resource_exhausted(format!(
                "a request message of {len} bytes exceeds the limit of {} bytes",
                self.limit
            )));
        }
        self.messages += 1;
        self.remaining = len;
        self.length = len;
        Ok(())
    }

    /// What the message under way holds of the server's memory, counted against
    /// [`Unfinished`]: the length its prefix announces (tonic reserves it at once), from
    /// the prefix until the message is complete, and for a method of one message until
    /// the body ends (tonic keeps the message until then).
    fn unfinished(&self) -> usize {
        let under_way = self.remaining > 0 || (self.single && self.messages >= 1);
        if under_way { self.length } else { 0 }
    }

    /// The verdict at the end of the body.
    fn finish(&self) -> Result<(), Status> {
        if self.have > 0 {
            return Err(Status::invalid_argument(format!(
                "the request body ends inside a message prefix ({} of its {PREFIX} bytes)",
                self.have
            )));
        }
        if self.remaining > 0 {
            return Err(Status::invalid_argument(format!(
                "the request body ends {} bytes short of the length its last message \
                 announces",
                self.remaining
            )));
        }
        if self.single && self.messages == 0 {
            return Err(Status::invalid_argument(
                "this method takes exactly one request message; the call sent none",
            ));
        }
        Ok(())
    }
}

/// What tonic's encoder says of a response message over the limit (with OUT_OF_RANGE).
const TONIC_TOO_LARGE: &str = "Error, encoded message length too large";

/// A response body whose status, if it is tonic's OUT_OF_RANGE for a message over the
/// limit, is made RESOURCE_EXHAUSTED naming the limit (a handler's OUT_OF_RANGE, for a
/// committed write's answer over the limit, `api::within_limit`, has its own message).
struct SizedResponse {
    inner: Body,
    limit: usize,
}

impl http_body::Body for SizedResponse {
    type Data = Bytes;
    type Error = Status;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Status>>> {
        let frame = ready!(Pin::new(&mut self.inner).poll_frame(cx));
        let Some(Ok(frame)) = frame else {
            return Poll::Ready(frame);
        };
        let too_large = frame.trailers_ref().is_some_and(|trailers| {
            Status::from_header_map(trailers).is_some_and(|status| {
                status.code() == tonic::Code::OutOfRange
                    && status.message().starts_with(TONIC_TOO_LARGE)
            })
        });
        if !too_large {
            return Poll::Ready(Some(Ok(frame)));
        }
        let mut trailers = HeaderMap::new();
        let _ = Status::resource_exhausted(format!(
            "the response message exceeds the limit of {} bytes",
            self.limit
        ))
        .add_header(&mut trailers);
        Poll::Ready(Some(Ok(Frame::trailers(trailers))))
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }
}

/// A request body whose framing is checked as it passes.
struct FramedBody {
    inner: Body,
    framing: Framing,
    /// The body has ended or failed: nothing more is read.
    done: bool,
    /// Its share of the bound on unfinished messages (none: not bounded).
    held: Option<Held>,
    /// Set when the transport ends the body (`Abandoned`).
    cut: Arc<AtomicBool>,
}

impl FramedBody {
    /// Ends the body with `status` (its remaining bytes are not read).
    fn fail(&mut self, status: Status) -> Poll<Option<Result<Frame<Bytes>, Status>>> {
        self.done = true;
        self.held = None;
        self.inner = Body::empty();
        Poll::Ready(Some(Err(status)))
    }

    /// Counts the bytes of the message under way; `Err` past a limit.
    fn hold_unfinished(&mut self) -> Result<(), Status> {
        let unfinished = self.framing.unfinished();
        let over = self
            .held
            .as_mut()
            .is_some_and(|held| held.set(held.base + unfinished).is_err());
        if over {
            return Err(unfinished_refusal());
        }
        Ok(())
    }
}

impl http_body::Body for FramedBody {
    type Data = Bytes;
    type Error = Status;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Status>>> {
        if self.done {
            return Poll::Ready(None);
        }
        match ready!(Pin::new(&mut self.inner).poll_frame(cx)) {
            Some(Ok(frame)) => {
                let checked = match frame.data_ref() {
                    Some(data) => self
                        .framing
                        .feed(data)
                        .and_then(|()| self.hold_unfinished()),
                    // Trailers end the body.
                    None => {
                        self.held = None;
                        self.framing.finish()
                    }
                };
                match checked {
                    Ok(()) => Poll::Ready(Some(Ok(frame))),
                    Err(status) => self.fail(status),
                }
            }
            Some(Err(status)) => {
                // The transport ended the body: the client reset the stream or its
                // connection closed. tonic answers INTERNAL or UNKNOWN, as for a fault of
                // the server; no answer reaches such a client, and the summary of refused
                // calls counts it as CANCELLED (`Abandoned`).
                self.cut.store(true, Ordering::Relaxed);
                self.done = true;
                self.held = None;
                Poll::Ready(Some(Err(status)))
            }
            None => {
                self.done = true;
                self.held = None;
                match self.framing.finish() {
                    Ok(()) => Poll::Ready(None),
                    Err(status) => self.fail(status),
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        // An ended body that still owes its verdict (no message on a unary call) must be
        // polled once more.
        self.done || (self.inner.is_end_stream() && self.framing.finish().is_ok())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn framing(single: bool, limit: usize) -> Framing {
        Framing {
            single,
            encoded: false,
            limit,
            prefix: [0; PREFIX],
            have: 0,
            remaining: 0,
            length: 0,
            messages: 0,
        }
    }

    /// A message's announced length counts from its prefix: until it is complete, and for
    /// a method of one message until the body ends.
    #[test]
    fn an_unfinished_message_counts_its_announced_length() {
        let big = message(0, &[7; 20_000]);
        for single in [true, false] {
            let mut f = framing(single, 1 << 20);
            f.feed(&big[..3]).unwrap();
            assert_eq!(f.unfinished(), 0, "a prefix under way");
            f.feed(&big[3..10]).unwrap();
            assert_eq!(f.unfinished(), 20_000, "announced, not received");
            f.feed(&big[10..]).unwrap();
            let kept = if single { 20_000 } else { 0 };
            assert_eq!(f.unfinished(), kept, "complete, single {single}");
        }
    }

    /// Past the bound in all, an address within its share still passes (many addresses
    /// together cannot refuse everyone), one past it does not; and no address holds more
    /// than its own bound.
    #[test]
    fn past_the_total_only_addresses_past_their_share_are_refused() {
        let unfinished = Arc::new(Unfinished::with_limits(100, 150, 20));
        let held = |peer: u8| Held {
            unfinished: Arc::clone(&unfinished),
            peer: Peer::of(Some(std::net::SocketAddr::from(([10, 0, 0, peer], 1)))),
            bytes: 0,
            base: 0,
        };
        let (mut a, mut b, mut c) = (held(1), held(2), held(3));
        a.set(100).unwrap();
        assert!(a.set(101).is_err(), "past the address's bound");
        b.set(50).unwrap();
        // The total (150) is reached: a third address, within its share of 20, may still
        // grow past it, once.
        c.set(30).unwrap();
        assert!(c.set(31).is_err(), "past its share while the total is full");
        assert!(b.set(51).is_err(), "b holds more than its share");
        // Giving back is always allowed.
        b.set(10).unwrap();
        assert_eq!(unfinished.counts.lock().unwrap().0, 140);
        c.set(40).unwrap();
        drop((a, b, c));
        assert_eq!(unfinished.counts.lock().unwrap().0, 0);
        assert!(unfinished.counts.lock().unwrap().1.is_empty());
    }

    #[test]
    fn a_requests_cost_counts_its_uri_and_header_fields() {
        let bare = http::Request::builder().uri("/a.B/C").body(()).unwrap();
        assert_eq!(request_cost(&bare), CALL_COST + 6);
        let request = http::Request::builder()
            .uri("http://host:1/a.B/C?pad=xxxx")
            .header("te", "trailers")
            .header("x-a", "")
            .header("x-a", "")
            .body(())
            .unwrap();
        assert_eq!(
            request_cost(&request),
            CALL_COST + 6 + 15 + 2 + 8 + 3 * FIELD_COST + 6
        );
    }

    fn message(flag: u8, body: &[u8]) -> Vec<u8> {
        let mut m = vec![flag];
        m.extend_from_slice(&(body.len() as u32).to_be_bytes());
        m.extend_from_slice(body);
        m
    }

    #[test]
    fn single_request_methods_are_known() {
        let sets = [
            crate::proto::FILE_DESCRIPTOR_SET,
            tonic_health::pb::FILE_DESCRIPTOR_SET,
        ];
        let paths = methods(&sets, true);
        assert!(paths.contains("/ern_registry.v1.CaseService/SubmitCase"));
        assert!(paths.contains("/grpc.health.v1.Health/Check"));
        assert!(paths.contains("/grpc.health.v1.Health/Watch"));
        assert!(!paths.contains("/ern_registry.v1.CaseService/SubmitCases"));
        let all = methods(&sets, false);
        assert!(all.contains("/ern_registry.v1.CaseService/SubmitCases"));
        assert!(all.is_superset(&paths));
    }

    #[test]
    fn a_message_split_anywhere_is_followed() {
        let mut bytes = message(0, b"hello");
        bytes.extend(message(0, b""));
        bytes.extend(message(0, b"world!"));
        for split in 0..bytes.len() {
            let mut f = framing(false, 100);
            f.feed(&bytes[..split]).unwrap();
            f.feed(&bytes[split..]).unwrap();
            f.finish().unwrap();
            assert_eq!(f.messages, 3);
        }
    }

    #[test]
    fn broken_framing_is_invalid_argument() {
        let code = |bytes: &[u8]| {
            let mut f = framing(false, 100);
            f.feed(bytes).and_then(|()| f.finish()).unwrap_err().code()
        };
        assert_eq!(code(&message(1, b"x")), tonic::Code::InvalidArgument);
        assert_eq!(code(&message(2, b"x")), tonic::Code::InvalidArgument);
        assert_eq!(code(&message(0, b"abc")[..6]), tonic::Code::InvalidArgument);
        assert_eq!(code(&[0, 0]), tonic::Code::InvalidArgument);
        let mut f = framing(false, 100);
        f.encoded = true;
        f.feed(&message(1, b"x")).unwrap();
    }

    #[test]
    fn the_length_prefix_alone_is_refused_over_the_limit() {
        let mut f = framing(false, 4);
        let status = f.feed(&[0, 0, 0, 0, 5]).unwrap_err();
        assert_eq!(status.code(), tonic::Code::ResourceExhausted);
        assert!(status.message().contains("limit of 4 bytes"));
        f = framing(false, 4);
        f.feed(&message(0, b"four")).unwrap();
    }

    #[test]
    fn a_single_request_method_takes_exactly_one_message() {
        let mut f = framing(true, 100);
        assert_eq!(f.finish().unwrap_err().code(), tonic::Code::InvalidArgument);
        f.feed(&message(0, b"one")).unwrap();
        f.finish().unwrap();
        assert_eq!(
            f.feed(&[0]).unwrap_err().code(),
            tonic::Code::InvalidArgument
        );
    }
}
