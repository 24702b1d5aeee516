//! A database outage as clients see it: the server reaches PostgreSQL through a TCP proxy
//! the test controls, which cuts every connection (and refuses new ones) and then lets
//! them through again. While it is cut, calls are UNAVAILABLE with a retry hint (never
//! INTERNAL or CANCELLED) and health is NOT_SERVING; once it is back, SERVING and calls
//! succeed again, with no restart.
//!
//! PostgreSQL only (`ERN_TEST_DATABASE_URL`); on SQLite the test says it is skipped. An
//! embedded database has no network to lose: its "not now" (SQLITE_BUSY past the busy
//! timeout) is held by the store's `sqlite_busy_is_unavailable` unit test.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ern_registry::config::ServeArgs;
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;
use tonic::Code;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};
use tonic_types::StatusExt;

use crate::helpers::{TestApp, bsn, get_case, national, submission};

/// A TCP proxy to the database that can be cut and restored.
struct Proxy {
    addr: SocketAddr,
    /// `true` while cut; behind the same lock as the links, so that no link is opened
    /// between a cut's flag and its aborts.
    links: Arc<Mutex<(bool, Vec<JoinHandle<()>>)>>,
    accept: JoinHandle<()>,
}

impl Proxy {
    async fn start(target: SocketAddr) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let links: Arc<Mutex<(bool, Vec<JoinHandle<()>>)>> = Arc::default();
        let shared = links.clone();
        let accept = tokio::spawn(async move {
            while let Ok((mut client, _)) = listener.accept().await {
                let mut links = shared.lock().unwrap();
                if links.0 {
                    // Cut: the connection is closed at once.
                    drop(client);
                    continue;
                }
                links.1.push(tokio::spawn(async move {
                    if let Ok(mut server) = TcpStream::connect(target).await {
                        let _ = tokio::io::copy_bidirectional(&mut client, &mut server).await;
                    }
                }));
            }
        });
        Proxy {
            addr,
            links,
            accept,
        }
    }

    /// Closes every open connection; new ones are closed as soon as they are accepted.
    fn cut(&self) {
        let mut links = self.links.lock().unwrap();
        links.0 = true;
        for link in links.1.drain(..) {
            link.abort();
        }
    }

    fn restore(&self) {
        self.links.lock().unwrap().0 = false;
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.cut();
        self.accept.abort();
    }
}

/// `url` with its host and port replaced by `addr`.
fn through(url: &str, addr: SocketAddr) -> String {
    let (scheme, rest) = url.split_once("://").unwrap();
    let (user, rest) = match rest.split_once('@') {
        Some((user, rest)) => (format!("{user}@"), rest),
        None => (String::new(), rest),
    };
    let path = rest.find('/').map_or("", |i| &rest[i..]);
    format!("{scheme}://{user}{addr}{path}")
}

/// The host and port of a database URL.
async fn target(url: &str) -> SocketAddr {
    let rest = url.split_once("://").unwrap().1;
    let rest = rest.rsplit_once('@').map_or(rest, |(_, r)| r);
    let host = rest.split('/').next().unwrap();
    let host = if host.contains(':') {
        host.to_owned()
    } else {
        format!("{host}:5432")
    };
    tokio::net::lookup_host(host).await.unwrap().next().unwrap()
}

async fn health(client: &mut HealthClient<tonic::transport::Channel>, service: &str) -> i32 {
    client
        .check(HealthCheckRequest {
            service: service.into(),
        })
        .await
        .unwrap()
        .into_inner()
        .status
}

/// Waits until the server and every service report `status`.
async fn until_health(
    client: &mut HealthClient<tonic::transport::Channel>,
    status: ServingStatus,
    within: Duration,
) {
    let started = Instant::now();
    let services = [
        "",
        "ern_registry.v1.CaseService",
        "ern_registry.v1.ConsentService",
        "ern_registry.v1.ResearchService",
        "ern_registry.v1.AdminService",
    ];
    loop {
        let mut all = true;
        for service in services {
            all &= health(client, service).await == status as i32;
        }
        if all {
            return;
        }
        assert!(
            started.elapsed() < within,
            "health did not turn {status:?} within {within:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn assert_unavailable_with_retry_hint(status: &tonic::Status) {
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    let retry = status
        .get_error_details()
        .retry_info()
        .and_then(|r| r.retry_delay)
        .expect("a RetryInfo with a delay");
    assert!(retry > Duration::ZERO && retry <= Duration::from_secs(5));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_database_outage_is_unavailable_with_a_retry_hint_and_not_serving_until_it_is_back() {
    let Some(admin_url) = std::env::var("ERN_TEST_DATABASE_URL")
        .ok()
        .filter(|u| !u.is_empty())
    else {
        eprintln!(
            "skipped: needs PostgreSQL (ERN_TEST_DATABASE_URL); SQLite's case is the store's \
             sqlite_busy_is_unavailable"
        );
        return;
    };
    let proxy = Proxy::start(target(&admin_url).await).await;
    let app = TestApp::spawn_via(ServeArgs::default(), |url| through(url, proxy.addr)).await;
    let mut dr = app.physician("dr-outage", "NL-OUTAGE").await;
    let pseudonym = dr
        .submit_case(submission("ERN-LUNG", national("NL", &bsn(5100))))
        .await
        .unwrap()
        .into_inner()
        .pseudonym;
    let mut probe = HealthClient::new(app.channel().await);
    until_health(&mut probe, ServingStatus::Serving, Duration::ZERO).await;

    proxy.cut();
    // At once, before the probe has noticed: the pool's connections are dead and new ones
    // are cut. UNAVAILABLE, promptly, with a retry hint.
    let started = Instant::now();
    let status = dr
        .get_case(get_case("ERN-LUNG", &pseudonym))
        .await
        .unwrap_err();
    assert_unavailable_with_retry_hint(&status);
    assert!(
        started.elapsed() < Duration::from_secs(12),
        "{:?}",
        started.elapsed()
    );

    until_health(
        &mut probe,
        ServingStatus::NotServing,
        Duration::from_secs(5),
    )
    .await;
    // Known to be away: refused at once, reads and writes alike.
    for _ in 0..3 {
        let started = Instant::now();
        let status = dr
            .submit_case(submission("ERN-LUNG", national("NL", &bsn(5101))))
            .await
            .unwrap_err();
        assert_unavailable_with_retry_hint(&status);
        let status = dr
            .get_case(get_case("ERN-LUNG", &pseudonym))
            .await
            .unwrap_err();
        assert_unavailable_with_retry_hint(&status);
        assert!(
            started.elapsed() < Duration::from_secs(1),
            "{:?}",
            started.elapsed()
        );
    }

    proxy.restore();
    until_health(&mut probe, ServingStatus::Serving, Duration::from_secs(5)).await;
    dr.get_case(get_case("ERN-LUNG", &pseudonym))
        .await
        .expect("served again once the database is back");
    dr.submit_case(submission("ERN-LUNG", national("NL", &bsn(5101))))
        .await
        .expect("writes again once the database is back");
    app.stop().await;
}
