//! Abuse costs the attacker, not the service: floods of bad keys, wrong secrets, calls in
//! flight, garbage streams and idle connections, each bounded in count and time, over
//! loopback. Assertions count (audit rows, refusals, Argon2 runs, key reads), never time.

use std::time::Duration;

use ern_registry::audit::AuditKey;
use ern_registry::auth::{HMAC_HASH_PREFIX, Role};
use ern_registry::config::ServeArgs;
use ern_registry::keys::MasterSecret;
use ern_registry::proto;
use ern_registry::proto::case_service_client::CaseServiceClient;
use ern_registry::proto::submit_cases_result::Outcome;
use ern_registry::store::db;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::Code;
use tonic::transport::Channel;
use tonic_types::StatusExt;

use crate::helpers::*;

/// Calls per flood, and connections they come over.
const FLOOD: usize = 200;
const CONNECTIONS: usize = 8;

fn client(channel: &Channel, token: &str) -> Client {
    let bearer = Bearer(Some(format!("Bearer {token}").parse().unwrap()));
    CaseServiceClient::with_interceptor(channel.clone(), bearer)
}

/// A well-formed key whose id names no key.
fn garbage_key(n: usize) -> String {
    format!("ern_{:016x}_{:064x}", 0xdead_0000_0000_u64 + n as u64, n)
}

/// `token` with another secret.
fn wrong_secret(token: &str, n: usize) -> String {
    format!("{}{:064x}", &token[..21], n + 1)
}

/// Sends `FLOOD` GetCase calls, `tokens(i)` for the i-th, over `CONNECTIONS` connections
/// (each sequential); returns every status code and how many refusals carried RetryInfo.
async fn flood(app: &TestApp, tokens: impl Fn(usize) -> String) -> (Vec<Code>, usize) {
    let mut tasks = Vec::new();
    for c in 0..CONNECTIONS {
        let channel = app.channel().await;
        let tokens: Vec<String> = (0..FLOOD / CONNECTIONS)
            .map(|i| tokens(c * (FLOOD / CONNECTIONS) + i))
            .collect();
        tasks.push(tokio::spawn(async move {
            let mut out = Vec::new();
            for token in tokens {
                let status = client(&channel, &token)
                    .get_case(get_case("ERN-LUNG", "P01-01-AAAAAAAAAAAAAAAAAAAAAAAA"))
                    .await
                    .unwrap_err();
                let retry = status.get_error_details().retry_info().is_some();
                out.push((status.code(), retry));
            }
            out
        }));
    }
    let mut codes = Vec::new();
    let mut with_retry = 0;
    for t in tasks {
        for (code, retry) in t.await.unwrap() {
            codes.push(code);
            with_retry += usize::from(retry && code == Code::ResourceExhausted);
        }
    }
    (codes, with_retry)
}

fn count(codes: &[Code], code: Code) -> usize {
    codes.iter().filter(|c| **c == code).count()
}

/// Audit entries without a principal: (principal, method, outcome, items), in order.
async fn summary_rows(app: &TestApp) -> Vec<(String, String, String, i64)> {
    db::query(
        "SELECT principal, method, outcome, items FROM audit_log WHERE principal_id IS NULL \
         ORDER BY principal, method, outcome",
    )
    .fetch_all(app.store.pool())
    .await
    .unwrap()
    .iter()
    .map(|r| (r.get(0), r.get(1), r.get(2), r.get(3)))
    .collect()
}

async fn chain_verifies(app: &TestApp) -> i64 {
    let master = MasterSecret::load(&app.dir.path().join("master.key")).unwrap();
    app.store
        .verify_audit(&AuditKey::derive(&master))
        .await
        .unwrap()
        .expect("the audit chain verifies")
        .head_seq
}

#[tokio::test]
async fn garbage_keys_are_summarised_per_peer_and_refused_without_the_database_past_the_allowance()
{
    const ALLOWANCE: usize = 20;
    let app = TestApp::spawn_with(ServeArgs {
        refusals_per_peer_per_minute: ALLOWANCE as u32,
        ..ServeArgs::default()
    })
    .await;
    // A physician who has called before, from the same address as the flood.
    let mut dr = app.physician("dr-a", "NL-AMC").await;
    dr.submit_case(submission("ERN-LUNG", national("NL", &bsn(1))))
        .await
        .unwrap();
    let rows = app.count("audit_log").await;
    let reads = app.auth.key_lookups();

    let (codes, with_retry) = flood(&app, garbage_key).await;

    let refused = count(&codes, Code::Unauthenticated);
    let limited = count(&codes, Code::ResourceExhausted);
    assert_eq!(refused + limited, FLOOD, "{codes:?}");
    // The allowance, overshot at most by the calls already under way when it ran out
    // (and by what refilled meanwhile: one per three seconds).
    assert!(
        (ALLOWANCE..=ALLOWANCE + CONNECTIONS + 1).contains(&refused),
        "{refused} refused as UNAUTHENTICATED"
    );
    assert_eq!(
        with_retry, limited,
        "every RESOURCE_EXHAUSTED says when to retry"
    );
    // Past the allowance, no key was read: each refusal cost no database work ...
    assert_eq!(app.auth.key_lookups() - reads, refused as u64);
    // ... and no refusal cost an audit row.
    assert_eq!(app.count("audit_log").await, rows);

    // The physician behind the same address still gets through (their key was verified
    // before), audited as ever; a key never used in this process does not, while the
    // address is refused.
    dr.submit_case(submission("ERN-LUNG", national("NL", &bsn(2))))
        .await
        .unwrap();
    assert_eq!(app.count("audit_log").await, rows + 1);
    let fresh = app
        .principal("dr-fresh", Role::Physician, Some("NL-AMC"), &[])
        .await;
    let status = app
        .client(Some(&fresh))
        .await
        .get_case(get_case("ERN-LUNG", "P01-01-AAAAAAAAAAAAAAAAAAAAAAAA"))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::ResourceExhausted);

    // At shutdown the summary goes into the chain: one entry per peer, method and outcome.
    let mut app = app;
    app.stop_server().await;
    assert_eq!(
        summary_rows(&app).await,
        [
            (
                "peer:127.0.0.1".to_string(),
                "CaseService/GetCase".to_string(),
                "RESOURCE_EXHAUSTED".to_string(),
                limited as i64 + 1
            ),
            (
                "peer:127.0.0.1".to_string(),
                "CaseService/GetCase".to_string(),
                "UNAUTHENTICATED".to_string(),
                refused as i64
            ),
        ]
    );
    assert_eq!(app.count("audit_log").await, rows + 3);
    assert_eq!(chain_verifies(&app).await, rows + 3);
}

#[tokio::test]
async fn a_key_found_dead_gets_no_pass_through_its_addresss_allowance() {
    a_key_gone_gets_no_pass(false).await;
}

/// As a revoked key: one whose row was deleted (by an operator in SQL) since this process
/// verified it.
#[tokio::test]
async fn a_key_deleted_gets_no_pass_through_its_addresss_allowance() {
    a_key_gone_gets_no_pass(true).await;
}

async fn a_key_gone_gets_no_pass(deleted: bool) {
    const ALLOWANCE: usize = 20;
    let app = TestApp::spawn_with(ServeArgs {
        refusals_per_peer_per_minute: ALLOWANCE as u32,
        ..ServeArgs::default()
    })
    .await;
    // A physician whose key authenticated a call in this process, then was revoked (by
    // another instance or the admin CLI: this process learns it at the key's next use).
    let token = app.physician_key("dr-a", "NL-AMC").await;
    let mut dr = app.client(Some(&token)).await;
    dr.submit_case(submission("ERN-LUNG", national("NL", &bsn(1))))
        .await
        .unwrap();
    if deleted {
        let gone = ern_registry::store::db::query("DELETE FROM api_keys WHERE key_id = $1")
            .bind(&token[4..20])
            .execute(app.store.pool())
            .await
            .unwrap();
        assert_eq!(gone.rows_affected(), 1);
    } else {
        assert!(app.store.revoke_api_key(&token[4..20]).await.unwrap());
    }
    let (codes, _) = flood(&app, garbage_key).await;
    assert!(count(&codes, Code::ResourceExhausted) > 0, "{codes:?}");

    // Its first call after the revocation still passes the spent allowance (the key was
    // live when this process last saw it) and is refused as dead; from then on it is
    // refused by the allowance like any wrong key, without a database read.
    let reads = app.auth.key_lookups();
    let call = || get_case("ERN-LUNG", "P01-01-AAAAAAAAAAAAAAAAAAAAAAAA");
    let first = dr.get_case(call()).await.unwrap_err();
    assert_eq!(first.code(), Code::Unauthenticated);
    for _ in 0..5 {
        let status = dr.get_case(call()).await.unwrap_err();
        assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
    }
    assert!(app.auth.key_lookups() - reads <= 1);
}

#[tokio::test]
async fn refusals_are_summarised_periodically() {
    let app = TestApp::spawn_with(ServeArgs {
        refusal_summary_secs: 1,
        ..ServeArgs::default()
    })
    .await;
    let mut anonymous = app.client(None).await;
    for _ in 0..3 {
        let status = anonymous
            .get_case(get_case("ERN-LUNG", "P01-01-AAAAAAAAAAAAAAAAAAAAAAAA"))
            .await
            .unwrap_err();
        assert_eq!(status.code(), Code::Unauthenticated);
    }
    // Bounded wait for the next flush (every second); no timing is asserted.
    let mut rows = Vec::new();
    for _ in 0..300 {
        rows = summary_rows(&app).await;
        if !rows.is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(
        rows,
        [(
            "peer:127.0.0.1".to_string(),
            "CaseService/GetCase".to_string(),
            "UNAUTHENTICATED".to_string(),
            3
        )]
    );
}

#[tokio::test]
async fn wrong_secrets_for_a_real_key_cost_no_argon2_and_a_fresh_key_works() {
    let app = TestApp::spawn().await;
    app.centre("NL-AMC", "NL", &["ERN-LUNG"]).await;
    let victim = app
        .principal("dr-victim", Role::Physician, Some("NL-AMC"), &[])
        .await;
    let (codes, _) = flood(&app, |n| wrong_secret(&victim, n)).await;
    assert_eq!(count(&codes, Code::Unauthenticated), FLOOD, "{codes:?}");
    assert_eq!(app.auth.argon2_runs(), 0);
    // A key issued now works on its first call (its hash is an HMAC, nothing queues).
    let fresh = app
        .principal("dr-fresh", Role::Physician, Some("NL-AMC"), &[])
        .await;
    app.client(Some(&fresh))
        .await
        .submit_case(submission("ERN-LUNG", national("NL", &bsn(3))))
        .await
        .unwrap();
    // The attempts are summarised under the key they tried.
    let mut app = app;
    app.stop_server().await;
    let rows = summary_rows(&app).await;
    let key_id = &victim[4..20];
    assert_eq!(
        rows,
        [(
            format!("peer:127.0.0.1 key:{key_id}"),
            "CaseService/GetCase".to_string(),
            "UNAUTHENTICATED".to_string(),
            FLOOD as i64
        )]
    );
}

/// Stores `token`'s secret the way an earlier version did: an Argon2id PHC string.
async fn make_legacy(app: &TestApp, token: &str) {
    plant_argon2(app, token, 19 * 1024).await;
}

/// Stores an Argon2id hash of `token`'s secret with a memory cost of `m_cost` KiB, as
/// anyone with write access to `api_keys` can, without the master secret.
async fn plant_argon2(app: &TestApp, token: &str, m_cost: u32) {
    use argon2::password_hash::{PasswordHasher, SaltString};
    let secret = token[21..].to_string();
    let phc = tokio::task::spawn_blocking(move || {
        let params = argon2::Params::new(m_cost, 2, 1, None).unwrap();
        let argon2 =
            argon2::Argon2::new(argon2::Algorithm::Argon2id, argon2::Version::V0x13, params);
        let salt = SaltString::encode_b64(&[7u8; 16]).unwrap();
        argon2
            .hash_password(secret.as_bytes(), &salt)
            .unwrap()
            .to_string()
    })
    .await
    .unwrap();
    db::query("UPDATE api_keys SET secret_hash = $1 WHERE key_id = $2")
        .bind(phc)
        .bind(&token[4..20])
        .execute(app.store.pool())
        .await
        .unwrap();
}

async fn stored_hash(app: &TestApp, token: &str) -> String {
    db::query("SELECT secret_hash FROM api_keys WHERE key_id = $1")
        .bind(&token[4..20])
        .fetch_one(app.store.pool())
        .await
        .unwrap()
        .get(0)
}

#[tokio::test]
async fn a_key_of_an_earlier_version_is_verified_with_argon2_once_and_migrated() {
    let app = TestApp::spawn_with(ServeArgs {
        accept_argon2_key_hashes: true,
        ..ServeArgs::default()
    })
    .await;
    app.centre("NL-AMC", "NL", &["ERN-LUNG"]).await;
    let token = app
        .principal("dr-old", Role::Physician, Some("NL-AMC"), &[])
        .await;
    make_legacy(&app, &token).await;
    assert!(stored_hash(&app, &token).await.starts_with("$argon2id$"));
    let mut dr = app.client(Some(&token)).await;
    for seed in 0..3 {
        dr.submit_case(submission("ERN-LUNG", national("NL", &bsn(10 + seed))))
            .await
            .unwrap();
    }
    assert!(
        stored_hash(&app, &token)
            .await
            .starts_with(HMAC_HASH_PREFIX)
    );
    assert_eq!(
        app.auth.argon2_runs(),
        1,
        "Argon2 ran once, on the first use"
    );
}

#[tokio::test]
async fn a_flood_against_a_key_not_yet_migrated_runs_argon2_a_bounded_number_of_times() {
    const ALLOWANCE: usize = 10;
    let app = TestApp::spawn_with(ServeArgs {
        refusals_per_peer_per_minute: ALLOWANCE as u32,
        accept_argon2_key_hashes: true,
        ..ServeArgs::default()
    })
    .await;
    app.centre("NL-AMC", "NL", &["ERN-LUNG"]).await;
    let token = app
        .principal("dr-old", Role::Physician, Some("NL-AMC"), &[])
        .await;
    make_legacy(&app, &token).await;
    let (codes, _) = flood(&app, |n| wrong_secret(&token, n)).await;
    let refused = count(&codes, Code::Unauthenticated);
    let busy = count(&codes, Code::Unavailable);
    let limited = count(&codes, Code::ResourceExhausted);
    assert_eq!(refused + busy + limited, FLOOD, "{codes:?}");
    // Every Argon2 run is a refusal; every other call was refused without one (busy: the
    // one run allowed at a time was taken; limited: the address's allowance was spent).
    assert_eq!(app.auth.argon2_runs(), refused as u64);
    assert!(
        refused + busy <= ALLOWANCE + CONNECTIONS + 1,
        "{refused} Argon2 runs, {busy} busy"
    );
    assert!(refused >= 1);
    // Nothing was migrated by a wrong secret.
    assert!(stored_hash(&app, &token).await.starts_with("$argon2id$"));
}

#[tokio::test]
async fn a_principal_has_at_most_so_many_calls_in_flight() {
    const MAX: u32 = 2;
    let app = TestApp::spawn_with(ServeArgs {
        max_calls_in_flight: MAX,
        ..ServeArgs::default()
    })
    .await;
    let dr = app.physician("dr-a", "NL-AMC").await;
    let mut other = app.physician("dr-b", "NL-AMC").await;
    // Two open bulk streams are two calls in flight, for as long as they are open.
    let mut streams = Vec::new();
    for _ in 0..MAX {
        let (tx, rx) = mpsc::channel(1);
        let results = dr
            .clone()
            .submit_cases(ReceiverStream::new(rx))
            .await
            .unwrap();
        streams.push((tx, results));
    }
    // Six more calls: two may wait for a place, four are refused at once.
    let (done_tx, mut done) = mpsc::unbounded_channel();
    for i in 0..6u32 {
        let (mut dr, done_tx) = (dr.clone(), done_tx.clone());
        tokio::spawn(async move {
            let result = dr
                .submit_case(submission("ERN-LUNG", national("NL", &bsn(100 + i))))
                .await;
            let _ = done_tx.send(result.map(|_| ()).map_err(|s| s.code()));
        });
    }
    for _ in 0..4 {
        let result = tokio::time::timeout(Duration::from_secs(30), done.recv())
            .await
            .expect("four calls answered")
            .unwrap();
        assert_eq!(result, Err(Code::ResourceExhausted));
    }
    // Another principal is not held up.
    other
        .submit_case(submission("ERN-LUNG", national("NL", &bsn(200))))
        .await
        .unwrap();
    // When the streams close, the two waiting calls run.
    drop(streams);
    for _ in 0..2 {
        assert_eq!(done.recv().await.unwrap(), Ok(()));
    }
}

#[tokio::test]
async fn an_endless_stream_of_invalid_items_is_ended() {
    const MAX: u32 = 10;
    const SENT: u32 = 500;
    let app = TestApp::spawn_with(ServeArgs {
        max_stream_invalid_items: MAX,
        ..ServeArgs::default()
    })
    .await;
    let mut dr = app.physician("dr-a", "NL-AMC").await;
    let (tx, rx) = mpsc::channel(16);
    let sender = tokio::spawn(async move {
        for i in 0..SENT {
            let mut item = submission("ERN-LUNG", national("NL", &bsn(i)));
            item.registry = "not a registry".into();
            if tx.send(item).await.is_err() {
                break;
            }
        }
    });
    let mut results = dr
        .submit_cases(ReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();
    let mut rejected = 0;
    let end = loop {
        match results.message().await {
            Ok(Some(result)) => {
                assert!(matches!(result.outcome, Some(Outcome::Rejected(_))));
                rejected += 1;
            }
            Ok(None) => break None,
            Err(status) => break Some(status),
        }
    };
    let end = end.expect("the stream is ended with an error");
    assert_eq!(end.code(), Code::ResourceExhausted, "{end:?}");
    assert_eq!(rejected, MAX);
    sender.abort();
    // Items already read when it ended may still finish; the rest were never processed.
    let audited: i64 = db::query(
        "SELECT COUNT(*) FROM audit_log WHERE method = 'CaseService/SubmitCases' AND principal_id IS NOT NULL",
    )
    .fetch_one(app.store.pool())
    .await
    .unwrap()
    .get(0);
    assert!(audited < i64::from(SENT) / 2, "{audited} items processed");
}

/// A bulk stream that sends nothing for the call deadline is ended (it holds one of the
/// principal's calls in flight and its connection), after the results of what it sent.
#[tokio::test]
async fn a_bulk_stream_that_sends_nothing_is_ended_after_its_results() {
    let app = TestApp::spawn_with(ServeArgs {
        request_timeout_secs: 1,
        ..ServeArgs::default()
    })
    .await;
    let mut dr = app.physician("dr-a", "NL-AMC").await;
    let (tx, rx) = mpsc::channel(4);
    let mut results = dr
        .submit_cases(ReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();
    for i in 0..3 {
        tx.send(submission("ERN-LUNG", national("NL", &bsn(8100 + i))))
            .await
            .unwrap();
    }
    // Then nothing, with the stream left open (`tx` is kept).
    for sequence in 0..3 {
        let result = results.message().await.unwrap().expect("a result");
        assert_eq!(result.sequence, sequence);
        assert!(matches!(result.outcome, Some(Outcome::Accepted(_))));
    }
    let end = tokio::time::timeout(Duration::from_secs(30), results.message())
        .await
        .expect("ended well before 30 s")
        .unwrap_err();
    assert_eq!(end.code(), Code::DeadlineExceeded, "{end:?}");
    assert_eq!(app.count("cases").await, 3);
    drop(tx);
}

/// The per-principal cap on bulk items in progress is shared by the principal's streams:
/// with room for one item at a time, two streams of one principal still both finish, every
/// item accepted and answered in order (the cap holds items back, it loses none).
#[tokio::test]
async fn a_principals_streams_share_its_item_cap_and_lose_nothing() {
    const ITEMS: u32 = 30;
    let app = TestApp::spawn_with(ServeArgs {
        max_stream_items_in_flight: 1,
        ..ServeArgs::default()
    })
    .await;
    let token = app.physician_key("dr-a", "NL-AMC").await;
    let mut streams = tokio::task::JoinSet::new();
    for stream in 0..2u32 {
        let mut dr = app.client(Some(&token)).await;
        streams.spawn(async move {
            let items: Vec<_> = (0..ITEMS)
                .map(|i| submission("ERN-LUNG", national("NL", &bsn(7000 + stream * 1000 + i))))
                .collect();
            let mut results = dr
                .submit_cases(tokio_stream::iter(items))
                .await
                .unwrap()
                .into_inner();
            let mut sequences = Vec::new();
            while let Some(result) = results.message().await.unwrap() {
                assert!(
                    matches!(result.outcome, Some(Outcome::Accepted(_))),
                    "{result:?}"
                );
                sequences.push(result.sequence);
            }
            sequences
        });
    }
    while let Some(sequences) = streams.join_next().await {
        assert_eq!(
            sequences.unwrap(),
            (0..u64::from(ITEMS)).collect::<Vec<_>>()
        );
    }
    assert_eq!(app.count("cases").await, i64::from(2 * ITEMS));
}

/// Whether the server closes `tcp` within 20 s (end of file or an error; what it sends
/// before, its HTTP/2 SETTINGS, is read and dropped).
async fn closed_by_the_server(tcp: &mut tokio::net::TcpStream) -> bool {
    let mut bytes = [0u8; 1024];
    tokio::time::timeout(Duration::from_secs(20), async {
        while let Ok(1..) = tcp.read(&mut bytes).await {}
    })
    .await
    .is_ok()
}

/// At the cap on connections a connection on which no call has authenticated gives its
/// place to a new one, oldest first; key holders' connections keep theirs, and once every
/// place is a key holder's a new connection is closed at once. Places come back when
/// connections close.
#[tokio::test]
async fn connections_past_the_cap_are_closed_at_once() {
    let app = TestApp::spawn_with(ServeArgs {
        max_connections: 2,
        ..ServeArgs::default()
    })
    .await;
    let mut first = tokio::net::TcpStream::connect(app.addr).await.unwrap();
    let mut second = tokio::net::TcpStream::connect(app.addr).await.unwrap();
    // A physician connects: the oldest connection without a key gives its place.
    let mut dr = app.physician("dr-a", "NL-AMC").await;
    // Served: authenticated (without a key, UNAUTHENTICATED comes first), then refused
    // for the pseudonym's form.
    let missing = || get_case("ERN-LUNG", "P01-01-AAAAAAAAAAAAAAAAAAAAAAAA");
    let code = dr.get_case(missing()).await.unwrap_err().code();
    assert_eq!(code, Code::InvalidArgument);
    assert!(closed_by_the_server(&mut first).await);
    // A second: the other gives its place.
    let mut other = app.physician("dr-b", "NL-AMC").await;
    let code = other.get_case(missing()).await.unwrap_err().code();
    assert_eq!(code, Code::InvalidArgument);
    assert!(closed_by_the_server(&mut second).await);
    // Every place is a key holder's: a third connection is closed at once, and both
    // key holders are still served.
    let mut third = tokio::net::TcpStream::connect(app.addr).await.unwrap();
    assert!(closed_by_the_server(&mut third).await);
    for client in [&mut dr, &mut other] {
        let code = client.get_case(missing()).await.unwrap_err().code();
        assert_eq!(code, Code::InvalidArgument);
    }
    // Places come back when connections close.
    drop((dr, other));
    let channel = Channel::from_shared(format!("http://{}", app.addr))
        .unwrap()
        .connect_lazy();
    let mut anonymous = CaseServiceClient::new(channel);
    // (Until the server sees them close, a new connection is closed at accept: the client
    // says UNAVAILABLE or CANCELLED, as the moment of the close falls.)
    let mut code = Code::Unavailable;
    for _ in 0..100 {
        code = anonymous.get_case(missing()).await.unwrap_err().code();
        if code == Code::Unauthenticated {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(code, Code::Unauthenticated);
}

/// Health `Watch` streams need no key and never end: connections holding them can no
/// longer take every place. At the cap, a physician's new connection takes the place of
/// the oldest watcher, whose stream ends; the other watchers go on.
#[tokio::test]
async fn health_watchers_without_a_key_cannot_hold_every_place() {
    use tonic_health::pb::HealthCheckRequest;
    use tonic_health::pb::health_client::HealthClient;
    let app = TestApp::spawn_with(ServeArgs {
        max_connections: 3,
        ..ServeArgs::default()
    })
    .await;
    let mut watches = Vec::new();
    for _ in 0..3 {
        let mut health = HealthClient::new(app.channel().await);
        let mut watch = health
            .watch(HealthCheckRequest::default())
            .await
            .unwrap()
            .into_inner();
        assert!(watch.message().await.unwrap().is_some());
        watches.push((health, watch));
    }
    let mut dr = app.physician("dr-a", "NL-AMC").await;
    let code = dr
        .get_case(get_case("ERN-LUNG", "P01-01-AAAAAAAAAAAAAAAAAAAAAAAA"))
        .await
        .unwrap_err()
        .code();
    // Authenticated (then refused for the pseudonym's form): the physician was served.
    assert_eq!(code, Code::InvalidArgument);
    // The oldest watcher's stream ends (its connection closed); the two others are still
    // open, with nothing new to say.
    let ended = tokio::time::timeout(Duration::from_secs(20), watches[0].1.message())
        .await
        .expect("the oldest watch ends");
    assert!(!matches!(ended, Ok(Some(_))), "{ended:?}");
    for (_, watch) in &mut watches[1..] {
        let more = tokio::time::timeout(Duration::from_millis(300), watch.message()).await;
        assert!(more.is_err(), "{more:?}");
    }
}

/// Reads one HTTP/2 frame: (type, flags, payload); `None` at end of file.
async fn read_frame(tcp: &mut tokio::net::TcpStream) -> Option<(u8, u8, Vec<u8>)> {
    let mut header = [0u8; 9];
    tcp.read_exact(&mut header).await.ok()?;
    let len = u32::from_be_bytes([0, header[0], header[1], header[2]]) as usize;
    let mut payload = vec![0u8; len];
    tcp.read_exact(&mut payload).await.ok()?;
    Some((header[3], header[4], payload))
}

#[tokio::test]
async fn the_server_caps_streams_pings_and_closes_idle_connections() {
    const SETTINGS: u8 = 0x4;
    const PING: u8 = 0x6;
    const MAX_CONCURRENT_STREAMS: u16 = 0x3;
    let app = TestApp::spawn_with(ServeArgs {
        max_streams_per_connection: 7,
        keepalive_secs: 1,
        idle_timeout_secs: 3,
        ..ServeArgs::default()
    })
    .await;
    let mut tcp = tokio::net::TcpStream::connect(app.addr).await.unwrap();
    // Client preface and an empty SETTINGS frame; then nothing: no call.
    tcp.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\0\0\0\x04\0\0\0\0\0")
        .await
        .unwrap();
    let mut max_streams = None;
    let mut pings = 0;
    let closed = tokio::time::timeout(Duration::from_secs(60), async {
        while let Some((kind, flags, payload)) = read_frame(&mut tcp).await {
            match kind {
                SETTINGS if flags & 1 == 0 => {
                    for setting in payload.chunks(6) {
                        if u16::from_be_bytes([setting[0], setting[1]]) == MAX_CONCURRENT_STREAMS {
                            max_streams = Some(u32::from_be_bytes([
                                setting[2], setting[3], setting[4], setting[5],
                            ]));
                        }
                    }
                    // Acknowledge the server's settings.
                    let _ = tcp.write_all(&[0, 0, 0, SETTINGS, 1, 0, 0, 0, 0]).await;
                }
                PING if flags & 1 == 0 => {
                    pings += 1;
                    let mut ack = vec![0, 0, 8, PING, 1, 0, 0, 0, 0];
                    ack.extend_from_slice(&payload);
                    let _ = tcp.write_all(&ack).await;
                }
                _ => {}
            }
        }
    })
    .await;
    assert!(
        closed.is_ok(),
        "the idle connection is closed by the server"
    );
    assert_eq!(max_streams, Some(7));
    assert!(pings >= 1, "keepalive PINGs are sent");
}

#[tokio::test]
async fn a_connection_with_an_open_stream_is_not_idle() {
    let app = TestApp::spawn_with(ServeArgs {
        idle_timeout_secs: 1,
        ..ServeArgs::default()
    })
    .await;
    let mut dr = app.physician("dr-a", "NL-AMC").await;
    let (tx, rx) = mpsc::channel(1);
    let mut results = dr
        .submit_cases(ReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();
    // An idle connection opened after the stream's is closed first ...
    let mut idle = tokio::net::TcpStream::connect(app.addr).await.unwrap();
    let mut buf = [0u8; 64];
    let read = tokio::time::timeout(Duration::from_secs(20), async {
        loop {
            match idle.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(_) => {}
            }
        }
    })
    .await;
    assert!(read.is_ok(), "an idle connection is closed");
    // ... while the stream's connection, idle as long, still carries it.
    tx.send(submission("ERN-LUNG", national("NL", &bsn(1))))
        .await
        .unwrap();
    let result = results.message().await.unwrap().unwrap();
    assert!(matches!(result.outcome, Some(Outcome::Accepted(_))));
}

/// Whoever can write `api_keys` but holds no master secret can make an Argon2id hash of a
/// secret of their own: by default such a hash never matches, and none runs Argon2.
/// Accepted while keys of earlier versions are migrated, a hash whose costs are above
/// those earlier versions used is refused unread (a planted row could name gigabytes).
#[tokio::test]
async fn an_argon2_hash_is_refused_unless_accepted_and_then_only_at_the_earlier_costs() {
    for (accept, m_cost, works) in [
        (false, 19 * 1024, false),
        (true, 64 * 1024, false),
        (true, 19 * 1024, true),
    ] {
        let app = TestApp::spawn_with(ServeArgs {
            accept_argon2_key_hashes: accept,
            ..ServeArgs::default()
        })
        .await;
        app.centre("NL-AMC", "NL", &["ERN-LUNG"]).await;
        let token = app
            .principal("dr-planted", Role::Physician, Some("NL-AMC"), &[])
            .await;
        plant_argon2(&app, &token, m_cost).await;
        let planted = stored_hash(&app, &token).await;
        let mut dr = app.client(Some(&token)).await;
        let answer = dr
            .submit_case(submission("ERN-LUNG", national("NL", &bsn(31))))
            .await;
        if works {
            answer.unwrap();
            assert_eq!(app.auth.argon2_runs(), 1);
            assert!(
                stored_hash(&app, &token)
                    .await
                    .starts_with(HMAC_HASH_PREFIX)
            );
        } else {
            let status = answer.unwrap_err();
            assert_eq!(
                status.code(),
                Code::Unauthenticated,
                "accept {accept}, m {m_cost}"
            );
            assert_eq!(status.message(), "invalid API key");
            assert_eq!(app.auth.argon2_runs(), 0, "accept {accept}, m {m_cost}");
            assert_eq!(stored_hash(&app, &token).await, planted);
            // Logged with the key id, for the operator (the log is shared by the tests of
            // this process: the key id is this test's own).
            let key_id = &token[4..20];
            assert!(
                logs()
                    .lines()
                    .any(|l| l.contains("Argon2") && l.contains(key_id)),
                "accept {accept}, m {m_cost}"
            );
        }
    }
}

/// A call abandoned after its caller authenticated leaves a trace, CANCELLED, under its
/// principal. Abandoned while it waits for a place among the principal's calls in flight
/// (it holds none): counted in its address's summary, so that abandoning calls in a loop
/// adds counts, not rows. Abandoned once admitted (here: waiting for the database pool,
/// which the test holds): an audit entry of its own, appended while it keeps its place.
#[tokio::test]
async fn a_call_abandoned_after_authentication_is_audited_as_cancelled() {
    let app = TestApp::spawn_with(ServeArgs {
        max_calls_in_flight: 1,
        db_max_connections: 1,
        ..ServeArgs::default()
    })
    .await;
    let mut dr = app.physician("dr-gone", "NL-AMC").await;
    let export = |millis| {
        let mut request = tonic::Request::new(proto::ExportPhenopacketsRequest {
            registry: "ERN-LUNG".into(),
            ..Default::default()
        });
        request.set_timeout(Duration::from_millis(millis));
        request
    };
    // Its key known to the process (so that authentication reads no row).
    dr.export_phenopackets(export(30_000)).await.unwrap();
    let cancelled = |status: tonic::Status| {
        assert!(
            matches!(status.code(), Code::Cancelled | Code::DeadlineExceeded),
            "{status:?}"
        );
    };
    // Admitted, then waiting for the pool's one connection (SQLite: the access epoch is
    // read in place, not from the pool).
    if app.is_sqlite() {
        let mut held = app.store.pool().acquire().await.unwrap();
        cancelled(dr.export_phenopackets(export(2000)).await.unwrap_err());
        // Read on the held connection, which the export waits for: it cannot finish
        // before the server drops it (its deadline, counted on the server, may end a
        // moment after the client's).
        let mut found = Vec::new();
        for _ in 0..200 {
            found = db::query(
                "SELECT principal, outcome FROM audit_log \
                 WHERE method = 'CaseService/ExportPhenopackets' ORDER BY seq",
            )
            .fetch_all(&mut held.db())
            .await
            .unwrap()
            .iter()
            .map(|r| (r.get::<String>(0), r.get::<String>(1)))
            .collect::<Vec<_>>();
            if found.len() == 2 {
                break;
            }
            // Appended by a task of its own once the call is dropped: wait for it.
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        drop(held);
        assert_eq!(
            found,
            [
                ("dr-gone".to_string(), "OK".to_string()),
                ("dr-gone".to_string(), "CANCELLED".to_string())
            ]
        );
    }
    // Waiting for a place: an open bulk stream holds the principal's one.
    let (tx, rx) = mpsc::channel(1);
    let stream = dr
        .clone()
        .submit_cases(ReceiverStream::new(rx))
        .await
        .unwrap();
    let mut request = tonic::Request::new(get_case(
        "ERN-LUNG",
        "R013-V001-AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA",
    ));
    request.set_timeout(Duration::from_millis(2000));
    cancelled(dr.get_case(request).await.unwrap_err());
    drop((tx, stream));
    let mut app = app;
    app.stop_server().await;
    let rows = summary_rows(&app).await;
    assert!(
        rows.contains(&(
            "peer:127.0.0.1 dr-gone".to_string(),
            "CaseService/GetCase".to_string(),
            "CANCELLED".to_string(),
            1
        )),
        "{rows:?}"
    );
}

/// A call whose audit entry waits for room in a full writer queue (an overload) and that
/// is abandoned meanwhile (here: its deadline) still leaves its entry, CANCELLED: nothing
/// was handed over before the room was taken, so the call's guard records it. The writer
/// is held by a lock on the database (SQLite: another connection's write transaction;
/// PostgreSQL: the audit chain head's row), with one command in its transaction and one
/// in its queue of one.
#[tokio::test]
async fn a_call_abandoned_while_the_writer_queue_is_full_is_audited_as_cancelled() {
    let app = TestApp::spawn_with(ServeArgs {
        writers: Some(1),
        writer_queue: 1,
        ..ServeArgs::default()
    })
    .await;
    let mut first = app.physician("dr-first", "NL-AMC").await;
    let mut late = app.physician("dr-late", "NL-AMC").await;
    let read = |millis| {
        let mut request = tonic::Request::new(get_case(
            "ERN-LUNG",
            "R013-V001-AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA",
        ));
        request.set_timeout(Duration::from_millis(millis));
        request
    };
    // Keys known to the process: authentication reads nothing and writes nothing.
    for client in [&mut first, &mut late] {
        let status = client.get_case(read(30_000)).await.unwrap_err();
        assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    }

    let writer = HeldWriter::hold(&app).await;
    // Entries in the writer's transaction and its queue, then the late call's waits for
    // room until its deadline ends it.
    let held = writer
        .fill(&app, || {
            let mut client = first.clone();
            async move { client.get_case(read(30_000)).await }
        })
        .await;
    let status = late.get_case(read(1000)).await.unwrap_err();
    assert!(
        matches!(status.code(), Code::Cancelled | Code::DeadlineExceeded),
        "{status:?}"
    );
    // A change waits for room too, with its entry: neither is handed over, and the call's
    // guard records it.
    let mut request = tonic::Request::new(submission("ERN-LUNG", national("NL", &bsn(7))));
    request.set_timeout(Duration::from_millis(1000));
    let status = late.submit_case(request).await.unwrap_err();
    assert!(
        matches!(status.code(), Code::Cancelled | Code::DeadlineExceeded),
        "{status:?}"
    );
    // The server ends the call at its own deadline, a moment after the client.
    tokio::time::sleep(Duration::from_millis(300)).await;
    writer.release().await;
    for call in held {
        let status = call.await.unwrap().unwrap_err();
        assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    }
    let mut outcomes = Vec::new();
    for _ in 0..100 {
        outcomes = db::query(
            "SELECT method, outcome FROM audit_log WHERE principal = 'dr-late' ORDER BY seq",
        )
        .fetch_all(app.store.pool())
        .await
        .unwrap()
        .iter()
        .map(|r| format!("{} {}", r.get::<String>(0), r.get::<String>(1)))
        .collect::<Vec<_>>();
        if outcomes.len() == 3 {
            break;
        }
        // Appended by a task of its own once the call is dropped: wait for it.
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(
        outcomes,
        [
            "CaseService/GetCase INVALID_ARGUMENT",
            "CaseService/GetCase CANCELLED",
            "CaseService/SubmitCase CANCELLED"
        ]
    );
    // The abandoned submission was not applied.
    let cases: i64 = db::query("SELECT COUNT(*) FROM cases")
        .fetch_one(app.store.pool())
        .await
        .unwrap()
        .get(0);
    assert_eq!(cases, 0);
}
