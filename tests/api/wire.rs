//! The gRPC contract on the wire, as an attacker (or a broken client) speaks it: raw
//! HTTP/2 frames (h2) to the real server, with the framing, cardinality, size and
//! content-type the client chooses. Every answer is the code the gRPC specification (or,
//! for broken framing, the service's promise of "never INTERNAL") names, and the server
//! keeps serving.

use std::net::SocketAddr;
use std::time::Duration;

use ern_registry::auth::Role;
use ern_registry::config::ServeArgs;
use ern_registry::proto;
use prost::Message;
use prost::bytes::Bytes;
use tonic::Code;
use tonic::codegen::http::{self, HeaderMap, StatusCode};
use tonic_health::pb::HealthCheckRequest;

use crate::helpers::{TestApp, bsn, get_case, national, submission};

const CHECK: &str = "/grpc.health.v1.Health/Check";
const SUBMIT: &str = "/ern_registry.v1.CaseService/SubmitCase";
const SUBMIT_MANY: &str = "/ern_registry.v1.CaseService/SubmitCases";
pub(crate) const GRPC: Option<&str> = Some("application/grpc");

type Headers<'a> = &'a [(&'a str, &'a str)];

/// What came back for one raw call.
pub(crate) struct Answer {
    http: StatusCode,
    headers: HeaderMap,
    data: Vec<u8>,
    trailers: Option<HeaderMap>,
}

impl Answer {
    /// The call's gRPC status: from the trailers, or the headers of a trailers-only answer.
    fn status(&self) -> tonic::Status {
        self.trailers
            .as_ref()
            .and_then(tonic::Status::from_header_map)
            .or_else(|| tonic::Status::from_header_map(&self.headers))
            .unwrap_or_else(|| panic!("no grpc-status (HTTP {})", self.http))
    }

    pub(crate) fn code(&self) -> Code {
        self.status().code()
    }

    /// The messages of the response body.
    fn messages(&self) -> usize {
        let (mut at, mut n) = (0, 0);
        while at + 5 <= self.data.len() {
            let len = u32::from_be_bytes(self.data[at + 1..at + 5].try_into().unwrap()) as usize;
            at += 5 + len;
            n += 1;
        }
        n
    }
}

/// A length-prefixed gRPC message with compressed-flag `flag`.
pub(crate) fn framed(flag: u8, body: &[u8]) -> Vec<u8> {
    let mut m = vec![flag];
    m.extend_from_slice(&(body.len() as u32).to_be_bytes());
    m.extend_from_slice(body);
    m
}

fn health_check() -> Vec<u8> {
    HealthCheckRequest {
        service: String::new(),
    }
    .encode_to_vec()
}

/// One call over a fresh HTTP/2 connection: POST `path` with `content_type`, `headers`
/// and the request body sent as `frames` (DATA frames; none: the headers end the stream).
pub(crate) async fn call(
    addr: SocketAddr,
    path: &str,
    content_type: Option<&str>,
    headers: &[(&str, &str)],
    frames: Vec<Vec<u8>>,
) -> Answer {
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let (client, connection) = h2::client::handshake(tcp).await.unwrap();
    tokio::spawn(async move {
        let _ = connection.await;
    });
    let mut client = client.ready().await.unwrap();
    let mut request = http::Request::builder()
        .method("POST")
        .uri(format!("http://{addr}{path}"))
        .header("te", "trailers");
    if let Some(content_type) = content_type {
        request = request.header("content-type", content_type);
    }
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    let last = frames.len();
    let (response, mut body) = client
        .send_request(request.body(()).unwrap(), last == 0)
        .unwrap();
    for (i, frame) in frames.into_iter().enumerate() {
        // The server may answer (and reset the stream) before it has read everything.
        let _ = body.send_data(Bytes::from(frame), i + 1 == last);
    }
    let response = tokio::time::timeout(Duration::from_secs(10), response)
        .await
        .expect("the server answers")
        .unwrap();
    let (parts, mut body) = response.into_parts();
    let mut data = Vec::new();
    while let Some(chunk) = body.data().await {
        let Ok(chunk) = chunk else { break };
        let _ = body.flow_control().release_capacity(chunk.len());
        data.extend_from_slice(&chunk);
    }
    let trailers = body.trailers().await.ok().flatten();
    Answer {
        http: parts.status,
        headers: parts.headers,
        data,
        trailers,
    }
}

/// A physician's bearer header value.
async fn physician_token(app: &TestApp) -> String {
    app.centre("NL-WIRE", "NL", &["ERN-LUNG"]).await;
    let token = app
        .principal("dr-wire", Role::Physician, Some("NL-WIRE"), &[])
        .await;
    format!("Bearer {token}")
}

#[tokio::test]
async fn broken_framing_is_invalid_argument_never_internal() {
    let app = TestApp::spawn().await;
    let bearer = physician_token(&app).await;
    let auth = [("authorization", bearer.as_str())];
    let mut body = health_check();
    body.push(0); // a non-empty message for the cases that cut it
    let cases: Vec<(&str, Headers, Vec<u8>)> = vec![
        ("compressed flag, no grpc-encoding", &[], framed(1, &body)),
        (
            "compressed flag, identity encoding",
            &[("grpc-encoding", "identity")],
            framed(1, &body),
        ),
        ("compressed-flag 2", &[], framed(2, &body)),
        (
            "length prefix longer than the body",
            &[],
            vec![0, 0, 0, 0, 50, 8, 1],
        ),
        ("a prefix cut short", &[], vec![0, 0, 0]),
    ];
    for (case, headers, bytes) in cases {
        let answer = call(app.addr, CHECK, GRPC, headers, vec![bytes.clone()]).await;
        assert_eq!(
            answer.code(),
            Code::InvalidArgument,
            "{case} (health): {}",
            answer.status().message()
        );
        let mut with_auth = headers.to_vec();
        with_auth.extend(auth);
        // Our own unary method and our client-streaming one (whose stream ends with it).
        for path in [SUBMIT, SUBMIT_MANY] {
            let answer = call(app.addr, path, GRPC, &with_auth, vec![bytes.clone()]).await;
            assert_eq!(
                answer.code(),
                Code::InvalidArgument,
                "{case} ({path}): {}",
                answer.status().message()
            );
        }
    }
    // A stream cut inside its second message, over several frames: the stream ends with
    // the framing error.
    let first = framed(
        0,
        &submission("ERN-LUNG", national("NL", &bsn(4000))).encode_to_vec(),
    );
    let answer = call(
        app.addr,
        SUBMIT_MANY,
        GRPC,
        &auth,
        vec![first, vec![0, 0, 0, 0, 9], vec![1, 2]],
    )
    .await;
    assert_eq!(
        answer.code(),
        Code::InvalidArgument,
        "{:?}",
        answer.status()
    );
    // A message that is not a SubmitCaseRequest after one that is (case.proto): the
    // stream ends with INVALID_ARGUMENT, after the result of the one before it.
    let first = framed(
        0,
        &submission("ERN-LUNG", national("NL", &bsn(4001))).encode_to_vec(),
    );
    let answer = call(
        app.addr,
        SUBMIT_MANY,
        GRPC,
        &auth,
        vec![first, framed(0, &[0xff, 0xff, 0xff, 0xff])],
    )
    .await;
    assert_eq!(
        answer.code(),
        Code::InvalidArgument,
        "{:?}",
        answer.status()
    );
    assert_eq!(answer.messages(), 1, "the first item's result came first");
    still_serving(&app).await;
}

#[tokio::test]
async fn a_unary_call_takes_exactly_one_request_message() {
    let app = TestApp::spawn().await;
    let bearer = physician_token(&app).await;
    let one = framed(0, &health_check());

    let answer = call(app.addr, CHECK, GRPC, &[], vec![one.clone()]).await;
    assert_eq!(answer.code(), Code::Ok);
    assert_eq!(answer.messages(), 1);

    let none = call(app.addr, CHECK, GRPC, &[], vec![]).await;
    assert_eq!(none.code(), Code::InvalidArgument, "{:?}", none.status());
    let empty_frame = call(app.addr, CHECK, GRPC, &[], vec![vec![]]).await;
    assert_eq!(empty_frame.code(), Code::InvalidArgument);

    let two_in_one_frame = [one.clone(), one.clone()].concat();
    let answer = call(app.addr, CHECK, GRPC, &[], vec![two_in_one_frame]).await;
    assert_eq!(
        answer.code(),
        Code::InvalidArgument,
        "{:?}",
        answer.status()
    );
    assert_eq!(answer.messages(), 0, "the call is refused, not answered");
    let answer = call(app.addr, CHECK, GRPC, &[], vec![one.clone(), one.clone()]).await;
    assert_eq!(answer.code(), Code::InvalidArgument);

    // Our own unary method: refused whatever the messages say (not a silent first-wins).
    let submit = framed(
        0,
        &submission("ERN-LUNG", national("NL", &bsn(4100))).encode_to_vec(),
    );
    let auth = [("authorization", bearer.as_str())];
    let answer = call(
        app.addr,
        SUBMIT,
        GRPC,
        &auth,
        vec![submit.clone(), submit.clone()],
    )
    .await;
    assert_eq!(
        answer.code(),
        Code::InvalidArgument,
        "{:?}",
        answer.status()
    );
    assert_eq!(app.count("cases").await, 0, "nothing of it was stored");

    // A client-streaming method takes any number.
    let second = framed(
        0,
        &submission("ERN-LUNG", national("NL", &bsn(4101))).encode_to_vec(),
    );
    let answer = call(app.addr, SUBMIT_MANY, GRPC, &auth, vec![submit, second]).await;
    assert_eq!(answer.code(), Code::Ok, "{:?}", answer.status());
    assert_eq!(answer.messages(), 2);
    still_serving(&app).await;
}

#[tokio::test]
async fn an_oversize_message_is_resource_exhausted_naming_the_limit() {
    let app = TestApp::spawn_with(ServeArgs {
        max_message_bytes: 4096,
        ..ServeArgs::default()
    })
    .await;
    // Refused from its length prefix: the megabyte it announces is never sent.
    let answer = call(
        app.addr,
        CHECK,
        GRPC,
        &[],
        vec![[0u8, 0, 0x10, 0, 0].to_vec(), vec![0; 16]],
    )
    .await;
    assert_eq!(answer.code(), Code::ResourceExhausted);
    assert!(
        answer.status().message().contains("limit of 4096 bytes"),
        "{}",
        answer.status().message()
    );
    let answer = call(app.addr, CHECK, GRPC, &[], vec![framed(0, &[8; 4097])]).await;
    assert_eq!(answer.code(), Code::ResourceExhausted);
    // At the limit the size is fine (and these bytes are no message: the codec's answer).
    let answer = call(app.addr, SUBMIT, GRPC, &[], vec![framed(0, &[0xff; 4096])]).await;
    assert_eq!(
        answer.code(),
        Code::InvalidArgument,
        "{:?}",
        answer.status()
    );

    // What an ordinary client sees.
    let mut dr = app.physician("dr-big", "NL-BIG").await;
    let mut big = submission("ERN-LUNG", national("NL", &bsn(4200)));
    big.record.as_mut().unwrap().hpo_terms = vec!["HP:0006528".into(); 500];
    let status = dr.submit_case(big).await.unwrap_err();
    assert_eq!(status.code(), Code::ResourceExhausted);
    assert!(status.message().contains("4096"), "{}", status.message());
    still_serving(&app).await;
}

#[tokio::test]
async fn a_response_over_the_limit_is_resource_exhausted_too() {
    let app = TestApp::spawn_with(ServeArgs {
        max_message_bytes: 1024,
        ..ServeArgs::default()
    })
    .await;
    let mut dr = app.physician("dr-long", "NL-LONG").await;
    let pseudonym = dr
        .submit_case(submission("ERN-LUNG", national("NL", &bsn(4300))))
        .await
        .unwrap()
        .into_inner()
        .pseudonym;
    // Each version adds a record to the history; the request stays small.
    for version in 1..=8 {
        dr.update_case(proto::UpdateCaseRequest {
            registry: "ERN-LUNG".into(),
            pseudonym: pseudonym.clone(),
            expected_version: version,
            record: Some(crate::helpers::record()),
            consent: vec![],
        })
        .await
        .unwrap();
    }
    let mut read = get_case("ERN-LUNG", &pseudonym);
    read.include_history = false;
    dr.get_case(read).await.expect("the case alone fits");
    let status = dr
        .get_case(get_case("ERN-LUNG", &pseudonym))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
    assert!(
        status.message().contains("limit of 1024 bytes"),
        "{status:?}"
    );
}

#[tokio::test]
async fn a_request_that_is_not_grpc_is_refused_with_415() {
    let app = TestApp::spawn().await;
    let one = || vec![framed(0, &health_check())];
    for content_type in [
        None,
        Some("application/json"),
        Some("text/plain"),
        Some("application/grpc-web"),
        Some("application/grpcx"),
    ] {
        let answer = call(app.addr, CHECK, content_type, &[], one()).await;
        assert_eq!(
            answer.http,
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "{content_type:?}"
        );
        // ... with the refusal as a gRPC status too, for a client that mislabelled.
        assert_eq!(answer.code(), Code::Unimplemented);
    }
    // A gRPC request in a message format other than protobuf: a gRPC refusal.
    let answer = call(app.addr, CHECK, Some("application/grpc+json"), &[], one()).await;
    assert_eq!(answer.http, StatusCode::OK);
    assert_eq!(answer.code(), Code::Unimplemented);
    // A compression the service does not take.
    let answer = call(app.addr, CHECK, GRPC, &[("grpc-encoding", "gzip")], one()).await;
    assert_eq!(answer.code(), Code::Unimplemented);
    for content_type in ["application/grpc", "application/grpc+proto"] {
        let answer = call(app.addr, CHECK, Some(content_type), &[], one()).await;
        assert_eq!(answer.code(), Code::Ok, "{content_type}");
        assert_eq!(answer.messages(), 1);
    }
    still_serving(&app).await;
}

/// The server still answers an ordinary client.
async fn still_serving(app: &TestApp) {
    let mut health = tonic_health::pb::health_client::HealthClient::new(app.channel().await);
    let status = health
        .check(HealthCheckRequest {
            service: "ern_registry.v1.CaseService".into(),
        })
        .await
        .unwrap()
        .into_inner()
        .status;
    assert_eq!(status, proto_serving());
}

fn proto_serving() -> i32 {
    tonic_health::pb::health_check_response::ServingStatus::Serving as i32
}

/// The summary of refused calls from 127.0.0.1 the server writes when it stops: (method,
/// outcome, calls), in that order.
async fn refusal_summary_at_shutdown(mut app: TestApp) -> Vec<(String, String, i64)> {
    app.stop_server().await;
    ern_registry::store::db::query(
        "SELECT method, outcome, CAST(SUM(items) AS BIGINT) FROM audit_log WHERE principal_id IS NULL \
         AND principal = 'peer:127.0.0.1' GROUP BY method, outcome ORDER BY method, outcome",
    )
    .fetch_all(app.store.pool())
    .await
    .unwrap()
    .iter()
    .map(|r| (r.get(0), r.get(1), r.get(2)))
    .collect()
}

/// Calls refused before any handler ran (a body that is not a message of the method,
/// broken framing, a content type that is not gRPC, an unknown method, a message over
/// the limit) are counted in the per-address summary of refused calls, as a wrong API key
/// is, and leave a trace; none of them is charged to the address's allowance of refusals
/// (which gates authentication: everyone behind the address would pay for one broken
/// client). A handler's own failure is recorded once, by the handler, and its mark does
/// not leave the server.
#[tokio::test]
async fn refusals_no_handler_saw_are_counted_not_charged() {
    let app = TestApp::spawn_with(ServeArgs {
        refusals_per_peer_per_minute: 1,
        // One summary, written at shutdown.
        refusal_summary_secs: 3600,
        ..ServeArgs::default()
    })
    .await;
    let bearer = physician_token(&app).await;
    let auth = [("authorization", bearer.as_str())];
    // A handler's failure: recorded by the handler (its own audit entry), unmarked on the
    // wire.
    let missing = get_case("ERN-LUNG", "R013-V001-AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA");
    let answer = call(
        app.addr,
        "/ern_registry.v1.CaseService/GetCase",
        GRPC,
        &auth,
        vec![framed(0, &missing.encode_to_vec())],
    )
    .await;
    assert_ne!(answer.code(), Code::Ok);
    assert!(!answer.headers.contains_key("x-ern-audited"));
    // Refused before any handler: methods this version does not have, a made-up path, a
    // message over the limit (refused from its length prefix), bodies that are no
    // message, broken framing, a content type that is not gRPC.
    let not_a_message = framed(0, &[0xff, 0xff, 0xff, 0xff]);
    for path in ["/ern_registry.v1.CaseService/NoSuchMethod", "/made.Up/Path"] {
        let answer = call(app.addr, path, GRPC, &auth, vec![not_a_message.clone()]).await;
        assert_eq!(answer.code(), Code::Unimplemented);
    }
    let answer = call(
        app.addr,
        SUBMIT,
        GRPC,
        &auth,
        vec![vec![0, 0x7f, 0xff, 0xff, 0xff]],
    )
    .await;
    assert_eq!(answer.code(), Code::ResourceExhausted);
    for _ in 0..2 {
        let answer = call(app.addr, SUBMIT, GRPC, &auth, vec![not_a_message.clone()]).await;
        assert_eq!(answer.code(), Code::InvalidArgument);
    }
    let answer = call(app.addr, SUBMIT, GRPC, &auth, vec![vec![0, 0, 0]]).await;
    assert_eq!(answer.code(), Code::InvalidArgument);
    let answer = call(app.addr, SUBMIT, Some("application/json"), &auth, vec![]).await;
    assert_eq!(answer.http, StatusCode::UNSUPPORTED_MEDIA_TYPE);
    // None was charged: the address's one refusal is still there for a wrong key, which
    // is looked up and refused; the next is refused before its key is read.
    let reads = app.auth.key_lookups();
    let wrong_key = || async {
        app.client(Some(&format!("ern_{:016x}_{:064x}", 0xdead_u64, 1)))
            .await
            .get_case(get_case(
                "ERN-LUNG",
                "R013-V001-AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA",
            ))
            .await
            .unwrap_err()
    };
    assert_eq!(wrong_key().await.code(), Code::Unauthenticated);
    assert_eq!(app.auth.key_lookups(), reads + 1);
    let status = wrong_key().await;
    assert_eq!(
        status.code(),
        Code::ResourceExhausted,
        "{}",
        status.message()
    );
    assert_eq!(app.auth.key_lookups(), reads + 1);
    // At shutdown the counts go into the audit log, one entry per method and outcome.
    let rows = refusal_summary_at_shutdown(app).await;
    // Made-up paths under one label, whatever they are.
    let expected = [
        ("(unknown method)", "UNIMPLEMENTED", 2),
        ("CaseService/GetCase", "RESOURCE_EXHAUSTED", 1),
        ("CaseService/GetCase", "UNAUTHENTICATED", 1),
        ("CaseService/SubmitCase", "INVALID_ARGUMENT", 3),
        ("CaseService/SubmitCase", "RESOURCE_EXHAUSTED", 1),
        ("CaseService/SubmitCase", "UNIMPLEMENTED", 1),
    ]
    .map(|(m, o, n)| (m.to_string(), o.to_string(), n));
    assert_eq!(rows, expected);
}

/// Calls that end before any handler took them are counted as CANCELLED in the summary
/// of refused calls: one the client reset half-way through its message, one whose
/// connection closed half-way, one whose body never came until the server's deadline.
/// (tonic called the first two INTERNAL and UNKNOWN, as for a fault of the server, and
/// the third left no trace.)
#[tokio::test]
async fn calls_abandoned_before_a_handler_are_counted_cancelled() {
    let app = TestApp::spawn_with(ServeArgs {
        request_timeout_secs: 1,
        refusal_summary_secs: 3600,
        ..ServeArgs::default()
    })
    .await;
    let bearer = physician_token(&app).await;
    let open = |end: bool| {
        let bearer = bearer.clone();
        let addr = app.addr;
        async move {
            let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
            let (client, connection) = h2::client::handshake(tcp).await.unwrap();
            let connection = tokio::spawn(async move {
                let _ = connection.await;
            });
            let mut client = client.ready().await.unwrap();
            let request = http::Request::builder()
                .method("POST")
                .uri(format!("http://{addr}{SUBMIT}"))
                .header("te", "trailers")
                .header("content-type", "application/grpc")
                .header("authorization", bearer.as_str())
                .body(())
                .unwrap();
            let (response, mut body) = client.send_request(request, false).unwrap();
            if !end {
                // Half a message: its prefix announces 100 bytes, 10 come.
                let mut partial = vec![0, 0, 0, 0, 100];
                partial.extend_from_slice(&[0; 10]);
                body.send_data(Bytes::from(partial), false).unwrap();
            }
            (client, connection, response, body)
        }
    };
    // Reset by the client.
    let (_client, _connection, _response, mut body) = open(false).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    body.send_reset(h2::Reason::CANCEL);
    // The connection closed.
    let (client, connection, response, body) = open(false).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    connection.abort();
    drop((client, response, body));
    // No body until the deadline: the server ends the call.
    let (_client, _connection, response, _body) = open(true).await;
    let answer = tokio::time::timeout(Duration::from_secs(10), response)
        .await
        .expect("the server answers")
        .unwrap();
    let status = tonic::Status::from_header_map(answer.headers()).expect("a trailers-only answer");
    assert_eq!(status.code(), Code::Cancelled, "{}", status.message());
    still_serving(&app).await;
    let rows = refusal_summary_at_shutdown(app).await;
    assert_eq!(
        rows,
        [(
            "CaseService/SubmitCase".to_string(),
            "CANCELLED".to_string(),
            3
        )]
    );
}

/// Opens `n` calls of `path` on one new HTTP/2 connection, `pause` apart, each with
/// `headers` and the body `body` (the stream ended with it if `end`), and returns their
/// answers to come (the connection lives as long as the task it runs on).
async fn hold(
    addr: SocketAddr,
    path: &str,
    n: usize,
    headers: impl Fn(usize) -> Vec<(String, String)>,
    body: &[u8],
    end: bool,
    pause: Duration,
) -> (
    Vec<(h2::client::ResponseFuture, h2::SendStream<Bytes>)>,
    tokio::task::JoinHandle<()>,
) {
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let (client, connection) = h2::client::handshake(tcp).await.unwrap();
    let connection = tokio::spawn(async move {
        let _ = connection.await;
    });
    let mut held = Vec::new();
    for i in 0..n {
        let mut client = client.clone().ready().await.unwrap();
        let mut request = http::Request::builder()
            .method("POST")
            .uri(format!("http://{addr}{path}"))
            .header("te", "trailers")
            .header("content-type", "application/grpc");
        for (name, value) in headers(i) {
            request = request.header(name, value);
        }
        let (response, mut stream) = client
            .send_request(request.body(()).unwrap(), false)
            .unwrap();
        // No body and not ended: no DATA frame (h2 counts empty ones as a flood).
        if !body.is_empty() || end {
            stream.send_data(Bytes::copy_from_slice(body), end).unwrap();
        }
        held.push((response, stream));
        tokio::time::sleep(pause).await;
    }
    (held, connection)
}

/// Of held calls: how many were refused (RESOURCE_EXHAUSTED, the only answer expected)
/// within 2 s, and the streams of those still waiting.
async fn refused_and_waiting(
    held: Vec<(h2::client::ResponseFuture, h2::SendStream<Bytes>)>,
) -> (usize, Vec<h2::SendStream<Bytes>>) {
    let (responses, streams): (Vec<_>, Vec<_>) = held.into_iter().unzip();
    let answers = futures_util::future::join_all(
        responses
            .into_iter()
            .map(|r| tokio::time::timeout(Duration::from_secs(2), r)),
    )
    .await;
    let mut refused = 0;
    let mut waiting = Vec::new();
    for (answer, stream) in answers.into_iter().zip(streams) {
        match answer {
            Ok(Ok(answer)) => {
                let status = tonic::Status::from_header_map(answer.headers())
                    .expect("a trailers-only refusal");
                assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
                refused += 1;
            }
            Ok(Err(e)) => panic!("{e}"),
            Err(_) => waiting.push(stream),
        }
    }
    (refused, waiting)
}

/// A caller cannot make the server hold many unfinished request messages: a message's
/// announced length counts from its prefix until it is complete (for a unary call, until
/// its body ends), at most `UNFINISHED_PER_PEER` (64 MiB) per address; a frame past it
/// fails its call with RESOURCE_EXHAUSTED, and the share comes back when the held calls
/// end.
#[tokio::test]
async fn unfinished_request_messages_are_bounded_per_address() {
    use ern_registry::api::wire::UNFINISHED_PER_PEER;
    let app = TestApp::spawn().await;
    // Messages of 1,000,000 bytes, all but the last byte sent, no key: more than the
    // bound holds.
    let size = 1_000_000;
    let fit = UNFINISHED_PER_PEER / (size + 5);
    let mut partial = framed(0, &vec![7u8; size]);
    partial.pop();
    let (held, connection) = hold(
        app.addr,
        SUBMIT,
        fit + 3,
        |_| Vec::new(),
        &partial,
        false,
        Duration::ZERO,
    )
    .await;
    let (refused, waiting) = refused_and_waiting(held).await;
    assert!(refused >= 3, "refused {refused}");
    assert!(waiting.len() <= fit, "{} held", waiting.len());
    // A small call still fits what is left of the address's share.
    let check = call(app.addr, CHECK, GRPC, &[], vec![framed(0, &health_check())]).await;
    assert_eq!(check.code(), Code::Ok, "{:?}", check.status());
    // Once the held calls end, a large message from the address is read again (and
    // refused for what it is: not a request of the method).
    drop(waiting);
    connection.abort();
    let mut code = Code::ResourceExhausted;
    for _ in 0..50 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        let whole = framed(0, &vec![7u8; size]);
        let frames: Vec<Vec<u8>> = whole.chunks(16 * 1024).map(<[u8]>::to_vec).collect();
        code = call(app.addr, SUBMIT, GRPC, &[], frames).await.code();
        if code != Code::ResourceExhausted {
            break;
        }
    }
    assert_eq!(code, Code::InvalidArgument);

    // A unary message sent whole but its body never ended is kept by tonic until then:
    // counted as well (one call after another, each message complete before the next; a
    // valid request, which tonic decodes and then waits for the body's end).
    let whole = framed(
        0,
        &proto::SubmitCaseRequest {
            registry: "R".repeat(size - 10),
            ..Default::default()
        }
        .encode_to_vec(),
    );
    let (held, connection) = hold(
        app.addr,
        SUBMIT,
        fit + 3,
        |_| Vec::new(),
        &whole,
        false,
        Duration::from_millis(30),
    )
    .await;
    let (refused, streams) = refused_and_waiting(held).await;
    assert!(refused >= 3, "refused {refused}");
    drop(streams);
    connection.abort();
}

/// A call that sends its headers and no body waits for its message until the deadline,
/// holding its header fields and its stream: that counts too (`wire::request_cost`), so
/// one address without a key holds at most `UNFINISHED_PER_PEER` of such calls; past it
/// they are refused at once, while another address is still served. A request with more
/// header fields than `MAX_HEADER_FIELDS` is refused at once (a defences audit held
/// 597 MB with 6.9 MB of header blocks naming one field 440 times, 2026-12-06).
#[tokio::test]
async fn header_only_calls_are_bounded_per_address() {
    use ern_registry::api::wire::{CALL_COST, FIELD_COST, MAX_HEADER_FIELDS, UNFINISHED_PER_PEER};
    // The held calls must outlive the time it takes to open them all: on a loaded machine
    // that passed the default 30 s deadline, and the first were answered CANCELLED.
    let app = TestApp::spawn_with(ern_registry::config::ServeArgs {
        request_timeout_secs: 600,
        ..Default::default()
    })
    .await;
    // `hold` sends `te` and `content-type` besides: 64 fields in all wait for their
    // message, 65 are refused.
    let fields = |n: usize| -> Vec<(String, String)> {
        (0..n).map(|i| (format!("x-f{i}"), String::new())).collect()
    };
    let header_only = |headers: Vec<(String, String)>| async move {
        let (held, connection) = hold(
            app.addr,
            SUBMIT,
            1,
            |_| headers.clone(),
            &[],
            false,
            Duration::ZERO,
        )
        .await;
        (held.into_iter().next().unwrap(), connection)
    };
    let ((response, _stream), connection) = header_only(fields(MAX_HEADER_FIELDS - 2)).await;
    assert!(
        tokio::time::timeout(Duration::from_secs(1), response)
            .await
            .is_err(),
        "64 fields are read"
    );
    connection.abort();
    let ((response, _stream), connection) = header_only(fields(MAX_HEADER_FIELDS - 1)).await;
    let response = tokio::time::timeout(Duration::from_secs(5), response)
        .await
        .expect("refused at once")
        .unwrap();
    let status = tonic::Status::from_header_map(response.headers()).expect("a refusal");
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    assert!(status.message().contains("header fields"), "{status:?}");
    connection.abort();

    // Headers of about 7 KB each, no body: what one address may hold.
    let pad = "p".repeat(7_000);
    let uri = app.addr.to_string().len() + SUBMIT.len();
    let cost = CALL_COST
        + uri
        + (2 + 8 + FIELD_COST)
        + (12 + 16 + FIELD_COST)
        + (5 + pad.len() + FIELD_COST);
    let fit = UNFINISHED_PER_PEER / cost;
    let mut all = Vec::new();
    let mut connections = Vec::new();
    for _ in 0..fit.div_ceil(200) + 1 {
        let (held, connection) = hold(
            app.addr,
            SUBMIT,
            200,
            |_| vec![("x-pad".to_string(), pad.clone())],
            &[],
            false,
            Duration::ZERO,
        )
        .await;
        all.extend(held);
        connections.push(connection);
    }
    let sent = all.len();
    let (refused, waiting) = refused_and_waiting(all).await;
    assert!(
        waiting.len() <= fit,
        "{} of {sent} held, {fit} fit",
        waiting.len()
    );
    assert!(refused >= sent - fit, "refused {refused} of {sent}");
    // Another address is served meanwhile.
    let (other, driver) = connect_from([127, 0, 0, 2], app.addr).await;
    let mut ready = other.ready().await.unwrap();
    let request = http::Request::builder()
        .method("POST")
        .uri(format!("http://{}{CHECK}", app.addr))
        .header("te", "trailers")
        .header("content-type", "application/grpc")
        .body(())
        .unwrap();
    let (response, mut body) = ready.send_request(request, false).unwrap();
    body.send_data(Bytes::from(framed(0, &health_check())), true)
        .unwrap();
    let response = tokio::time::timeout(Duration::from_secs(5), response)
        .await
        .expect("answered")
        .unwrap();
    assert!(tonic::Status::from_header_map(response.headers()).is_none());
    driver.abort();
    // Once the held calls end, the address is served again.
    drop(waiting);
    for connection in connections {
        connection.abort();
    }
    let mut code = Code::ResourceExhausted;
    for _ in 0..50 {
        code = call(app.addr, CHECK, GRPC, &[], vec![framed(0, &health_check())])
            .await
            .code();
        if code == Code::Ok {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(code, Code::Ok);
}

/// Health and reflection take no key and their requests are names: a request message over
/// 16 KiB is refused from its prefix (their streams stay open, and tonic keeps a stream's
/// largest message while it is).
#[tokio::test]
async fn health_and_reflection_take_small_messages_only() {
    let app = TestApp::spawn().await;
    let big = || vec![framed(0, &vec![0u8; 20_000])];
    let answer = call(app.addr, CHECK, GRPC, &[], big()).await;
    let status = answer.status();
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
    assert!(status.message().contains("16384"), "{status:?}");
    // Reflection ends its stream (with OK: tonic-reflection ends it so on a request
    // error) and answers nothing; the same question with a short host is answered.
    use tonic_reflection::pb::v1::{ServerReflectionRequest, server_reflection_request};
    let reflection = REFLECTION;
    let ask = |host: String| {
        vec![framed(
            0,
            &ServerReflectionRequest {
                host,
                message_request: Some(server_reflection_request::MessageRequest::ListServices(
                    String::new(),
                )),
            }
            .encode_to_vec(),
        )]
    };
    let answer = call(app.addr, reflection, GRPC, &[], ask("h".repeat(20_000))).await;
    assert_eq!(answer.messages(), 0);
    let answer = call(app.addr, reflection, GRPC, &[], ask("h".into())).await;
    assert_eq!(answer.messages(), 1);
    let fine = call(app.addr, CHECK, GRPC, &[], vec![framed(0, &health_check())]).await;
    assert_eq!(fine.code(), Code::Ok);
}

const REFLECTION: &str = "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo";

/// A reflection question over `client` (the descriptor of the case service's file, tens of
/// kilobytes), the stream ended after it if `end`: the response (its headers) and the
/// request's stream.
async fn ask_reflection(
    addr: SocketAddr,
    client: &h2::client::SendRequest<Bytes>,
    end: bool,
) -> (http::Response<h2::RecvStream>, h2::SendStream<Bytes>) {
    use tonic_reflection::pb::v1::{ServerReflectionRequest, server_reflection_request};
    let mut client = client.clone().ready().await.unwrap();
    let request = http::Request::builder()
        .method("POST")
        .uri(format!("http://{addr}{REFLECTION}"))
        .header("te", "trailers")
        .header("content-type", "application/grpc")
        .body(())
        .unwrap();
    let (response, mut body) = client.send_request(request, false).unwrap();
    let question = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(
            server_reflection_request::MessageRequest::FileContainingSymbol(
                "ern_registry.v1.CaseService".into(),
            ),
        ),
    };
    body.send_data(Bytes::from(framed(0, &question.encode_to_vec())), end)
        .unwrap();
    let response = tokio::time::timeout(Duration::from_secs(10), response)
        .await
        .expect("the headers come whatever the window")
        .unwrap();
    (response, body)
}

/// A reflection answer over `client` that is not yet read: the response's body, whose
/// data waits for the stream's window.
async fn unread_answer(
    addr: SocketAddr,
    client: &h2::client::SendRequest<Bytes>,
) -> h2::RecvStream {
    let (response, _) = ask_reflection(addr, client, true).await;
    assert_eq!(response.status(), StatusCode::OK);
    assert!(tonic::Status::from_header_map(response.headers()).is_none());
    response.into_body()
}

/// The size of the reflection answer [`unread_answer`] leaves unread, read whole over a
/// connection of its own.
async fn reflection_answer_size(addr: SocketAddr) -> usize {
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let (client, connection) = h2::client::handshake(tcp).await.unwrap();
    let driver = tokio::spawn(async move {
        let _ = connection.await;
    });
    let (response, _) = ask_reflection(addr, &client, true).await;
    let mut body = response.into_body();
    let mut size = 0;
    while let Some(data) = body.data().await {
        let data = data.unwrap();
        let _ = body.flow_control().release_capacity(data.len());
        size += data.len();
    }
    driver.abort();
    size
}

/// A connection whose streams have no HTTP/2 window (the server may send headers, no
/// data), a sender that opens their windows to the size sent, and its PINGs.
async fn windowless(
    addr: SocketAddr,
) -> (
    h2::client::SendRequest<Bytes>,
    tokio::sync::mpsc::UnboundedSender<u32>,
    tokio::task::JoinHandle<()>,
    h2::PingPong,
) {
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let (client, mut connection) = h2::client::Builder::new()
        .initial_window_size(0)
        .handshake::<_, Bytes>(tcp)
        .await
        .unwrap();
    let pings = connection.ping_pong().expect("the first taker");
    let (window, mut sizes) = tokio::sync::mpsc::unbounded_channel::<u32>();
    let driver = tokio::spawn(async move {
        loop {
            tokio::select! {
                _ = &mut connection => break,
                Some(size) = sizes.recv() => connection.set_initial_window_size(size).unwrap(),
            }
        }
    });
    (client, window, driver, pings)
}

/// Health checks from 127.0.0.1 until one is answered `code` (at most 5 s); a refusal must
/// be for unread answers.
async fn check_until(addr: SocketAddr, code: Code) {
    let mut status = None;
    for _ in 0..250 {
        let answer = call(addr, CHECK, GRPC, &[], vec![framed(0, &health_check())]).await;
        if answer.code() == Code::ResourceExhausted {
            assert_unread_refusal(&answer.status());
        }
        if answer.code() == code {
            return;
        }
        status = Some(answer.status());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("never {code:?}: {status:?}")
}

fn assert_unread_refusal(status: &tonic::Status) {
    assert!(
        status.message().contains("--max-unread-bytes-per-peer"),
        "{status:?}"
    );
}

/// A client that reads none of its answers cannot have the server hold them without
/// bound: once its address has `--max-unread-bytes-per-peer` of answers unread, its new
/// calls are refused (RESOURCE_EXHAUSTED, before any handler, on any of its connections,
/// counted in the summary of refused calls). What is counted is the answers' memory:
/// PINGs the server answers earn nothing; reading the answers, resetting their streams,
/// or closing the connection that holds them gives the room back.
#[tokio::test]
async fn answers_an_address_leaves_unread_are_bounded() {
    let app = TestApp::spawn_with(ServeArgs {
        // One byte: a single unread answer is over it.
        max_unread_bytes_per_peer: 1,
        refusal_summary_secs: 3600,
        ..ServeArgs::default()
    })
    .await;
    // Before: calls are answered.
    check_until(app.addr, Code::Ok).await;
    let (client, window, driver, mut pings) = windowless(app.addr).await;
    let size = reflection_answer_size(app.addr).await;
    let mut body = unread_answer(app.addr, &client).await;
    check_until(app.addr, Code::ResourceExhausted).await;
    // The server's answers to PINGs (written, read by the client; each a 17-byte frame,
    // more bytes in all than the answer) change nothing: the answer is still in memory.
    for _ in 0..size / 17 + 100 {
        pings.ping(h2::Ping::opaque()).await.unwrap();
    }
    let check = call(app.addr, CHECK, GRPC, &[], vec![framed(0, &health_check())]).await;
    assert_eq!(
        check.code(),
        Code::ResourceExhausted,
        "{:?}",
        check.status()
    );
    assert_unread_refusal(&check.status());
    // The client opens its window and reads the answer: the address may call again.
    window.send(1 << 20).unwrap();
    let mut answer = Vec::new();
    while let Some(data) = tokio::time::timeout(Duration::from_secs(10), body.data())
        .await
        .expect("the answer comes once the window opens")
    {
        let data = data.unwrap();
        let _ = body.flow_control().release_capacity(data.len());
        answer.extend_from_slice(&data);
    }
    assert_eq!(answer.len(), size);
    check_until(app.addr, Code::Ok).await;
    // An answer whose stream the client resets (a cancelled call) is given back, the
    // connection still open.
    let (client, _window, resetting, _pings) = windowless(app.addr).await;
    let body = unread_answer(app.addr, &client).await;
    check_until(app.addr, Code::ResourceExhausted).await;
    drop(body);
    check_until(app.addr, Code::Ok).await;
    assert!(!resetting.is_finished());
    // And one left unread on a connection that then closes.
    let (client, _window, closing, _pings) = windowless(app.addr).await;
    let _body = unread_answer(app.addr, &client).await;
    check_until(app.addr, Code::ResourceExhausted).await;
    drop(client);
    closing.abort();
    check_until(app.addr, Code::Ok).await;
    driver.abort();
    resetting.abort();
    let rows = refusal_summary_at_shutdown(app).await;
    let refused = rows
        .iter()
        .find(|(method, outcome, _)| method == "Health/Check" && outcome == "RESOURCE_EXHAUSTED")
        .map(|row| row.2);
    assert!(refused >= Some(4), "{rows:?}");
}

/// A read admitted before its address reached the bound does not add its answer past it:
/// the answer is dropped and the call ends with RESOURCE_EXHAUSTED naming the flag (its
/// headers and trailers need no window). The answer left unread is the only one held: once
/// it is read the address may call again.
#[tokio::test]
async fn a_read_admitted_before_the_bound_does_not_answer_past_it() {
    use tonic_reflection::pb::v1::{ServerReflectionRequest, server_reflection_request};
    let app = TestApp::spawn_with(ServeArgs {
        max_unread_bytes_per_peer: 1,
        ..ServeArgs::default()
    })
    .await;
    let (client, window, driver, _pings) = windowless(app.addr).await;
    // A reflection stream admitted now, while the address holds nothing: no question yet.
    let mut ready = client.clone().ready().await.unwrap();
    let request = http::Request::builder()
        .method("POST")
        .uri(format!("http://{}{REFLECTION}", app.addr))
        .header("te", "trailers")
        .header("content-type", "application/grpc")
        .body(())
        .unwrap();
    let (early, mut question) = ready.send_request(request, false).unwrap();
    let early = tokio::time::timeout(Duration::from_secs(10), early)
        .await
        .expect("the headers come whatever the window")
        .unwrap();
    assert!(tonic::Status::from_header_map(early.headers()).is_none());
    // Another answer left unread takes the address to the bound.
    let mut held = unread_answer(app.addr, &client).await;
    check_until(app.addr, Code::ResourceExhausted).await;
    // The early stream asks now: its answer is not kept.
    let ask = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(
            server_reflection_request::MessageRequest::FileContainingSymbol(
                "ern_registry.v1.CaseService".into(),
            ),
        ),
    };
    question
        .send_data(Bytes::from(framed(0, &ask.encode_to_vec())), true)
        .unwrap();
    let mut early = early.into_body();
    let trailers = tokio::time::timeout(Duration::from_secs(10), early.trailers())
        .await
        .expect("trailers need no window")
        .unwrap()
        .expect("the call ends in trailers");
    let status = tonic::Status::from_header_map(&trailers).expect("a status");
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
    assert!(
        status.message().contains("--max-unread-bytes-per-peer"),
        "{status:?}"
    );
    // Only the first answer is held: read it, and the address is answered again.
    window.send(1 << 20).unwrap();
    while let Some(data) = tokio::time::timeout(Duration::from_secs(10), held.data())
        .await
        .expect("the answer comes once the window opens")
    {
        let data = data.unwrap();
        let _ = held.flow_control().release_capacity(data.len());
    }
    check_until(app.addr, Code::Ok).await;
    driver.abort();
}

/// An HTTP/2 connection to `addr` from the loopback address `source` (another peer than
/// 127.0.0.1), with its driver. `window`: the streams' initial HTTP/2 window (0: the
/// server may send headers, no data).
async fn connect_from_with(
    source: [u8; 4],
    addr: SocketAddr,
    window: u32,
) -> (h2::client::SendRequest<Bytes>, tokio::task::JoinHandle<()>) {
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket
        .bind(SocketAddr::from((source, 0)))
        .expect("any 127.0.0.0/8 address is the loopback");
    let tcp = socket.connect(addr).await.unwrap();
    let (client, connection) = h2::client::Builder::new()
        .initial_window_size(window)
        .handshake::<_, Bytes>(tcp)
        .await
        .unwrap();
    let driver = tokio::spawn(async move {
        let _ = connection.await;
    });
    (client, driver)
}

/// [`connect_from_with`] the default window.
async fn connect_from(
    source: [u8; 4],
    addr: SocketAddr,
) -> (h2::client::SendRequest<Bytes>, tokio::task::JoinHandle<()>) {
    connect_from_with(source, addr, 65_535).await
}

/// A reflection answer asked and read whole from `source`: its size, or its status.
async fn reflection_from(source: [u8; 4], addr: SocketAddr) -> Result<usize, tonic::Status> {
    let (client, driver) = connect_from(source, addr).await;
    let (response, _) = ask_reflection(addr, &client, true).await;
    if let Some(status) = tonic::Status::from_header_map(response.headers()) {
        return Err(status);
    }
    let mut body = response.into_body();
    let mut size = 0;
    while let Some(data) = body.data().await {
        let data = data.unwrap();
        let _ = body.flow_control().release_capacity(data.len());
        size += data.len();
    }
    let trailers = body.trailers().await.unwrap().expect("trailers");
    driver.abort();
    match tonic::Status::from_header_map(&trailers) {
        Some(status) if status.code() != Code::Ok => Err(status),
        _ => Ok(size),
    }
}

/// Answers left unread are bounded over every address too (`--max-unread-bytes`): once
/// all addresses together hold it, an address holding more than its share
/// (`--max-unread-bytes` over `--max-connections`) has its reads refused, while an address
/// within its share still gets its answers, even one larger than the share.
#[tokio::test]
async fn answers_left_unread_are_bounded_over_all_addresses() {
    const OTHER: [u8; 4] = [127, 0, 0, 2];
    let app = TestApp::spawn_with(ServeArgs {
        max_connections: 8,
        // A share of 2 KiB per connection: less than a reflection answer, more than a
        // health check's.
        max_unread_bytes: 8 * 2048,
        ..ServeArgs::default()
    })
    .await;
    let size = reflection_answer_size(app.addr).await;
    assert!(size > 8 * 2048, "{size}");
    // 127.0.0.1 leaves one unread: all addresses together are at the bound.
    let (client, window, driver, _pings) = windowless(app.addr).await;
    let mut held = unread_answer(app.addr, &client).await;
    let all_bound = |status: &tonic::Status| {
        status.code() == Code::ResourceExhausted
            && status.message().contains("(--max-unread-bytes)")
    };
    let mut refused = None;
    for _ in 0..250 {
        let check = call(app.addr, CHECK, GRPC, &[], vec![framed(0, &health_check())]).await;
        if check.code() != Code::Ok {
            refused = Some(check.status());
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let refused = refused.expect("the holder is refused");
    assert!(all_bound(&refused), "{refused:?}");
    // Another address, within its share, gets a whole answer larger than its share.
    assert_eq!(reflection_from(OTHER, app.addr).await.ok(), Some(size));
    // Once it leaves one unread too, it holds more than its share: refused.
    let (other, other_driver) = connect_from_with(OTHER, app.addr, 0).await;
    let other_held = unread_answer(app.addr, &other).await;
    let mut status = None;
    for _ in 0..250 {
        match reflection_from(OTHER, app.addr).await {
            Err(refusal) => {
                status = Some(refusal);
                break;
            }
            Ok(_) => tokio::time::sleep(Duration::from_millis(20)).await,
        }
    }
    let status = status.expect("refused");
    assert!(all_bound(&status), "{status:?}");
    // The first reads its answer, the other resets its call: everyone is answered in
    // full again.
    window.send(1 << 20).unwrap();
    while let Some(data) = held.data().await {
        let _ = held.flow_control().release_capacity(data.unwrap().len());
    }
    drop(other_held);
    let mut answered = None;
    for _ in 0..250 {
        answered = Some(reflection_from(OTHER, app.addr).await);
        if answered
            .as_ref()
            .is_some_and(|a| a.as_ref().ok() == Some(&size))
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(answered.and_then(Result::ok), Some(size));
    driver.abort();
    other_driver.abort();
}

/// Reflection takes no key: at most `--max-reflection-calls-per-peer` reflection calls are
/// under way from one address (an open stream counts); the next is refused, and one
/// ending gives its place back. Health checks and calls with a key are not counted.
#[tokio::test]
async fn reflection_calls_are_capped_per_address() {
    let app = TestApp::spawn_with(ServeArgs {
        max_reflection_calls_per_peer: 2,
        ..ServeArgs::default()
    })
    .await;
    let tcp = tokio::net::TcpStream::connect(app.addr).await.unwrap();
    let (client, connection) = h2::client::handshake(tcp).await.unwrap();
    let driver = tokio::spawn(async move {
        let _ = connection.await;
    });
    // Two streams, each with its question, left open.
    let mut open = Vec::new();
    for _ in 0..2 {
        let (response, stream) = ask_reflection(app.addr, &client, false).await;
        assert!(tonic::Status::from_header_map(response.headers()).is_none());
        open.push((response, stream));
    }
    let (refused, _) = ask_reflection(app.addr, &client, false).await;
    let status = tonic::Status::from_header_map(refused.headers()).expect("a refusal");
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
    assert!(
        status.message().contains("--max-reflection-calls-per-peer"),
        "{status:?}"
    );
    // Health checks and calls with a key are not counted.
    let check = call(app.addr, CHECK, GRPC, &[], vec![framed(0, &health_check())]).await;
    assert_eq!(check.code(), Code::Ok, "{:?}", check.status());
    let mut dr = app.physician("dr-reflection", "NL-AMC").await;
    dr.submit_case(submission("ERN-LUNG", national("NL", &bsn(1))))
        .await
        .unwrap();
    // One stream ends (the client resets it): its place comes back.
    drop(open.pop());
    let mut admitted = false;
    for _ in 0..250 {
        let (response, _stream) = ask_reflection(app.addr, &client, true).await;
        match tonic::Status::from_header_map(response.headers()) {
            None => {
                admitted = true;
                break;
            }
            Some(status) => assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}"),
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(admitted);
    driver.abort();
}
