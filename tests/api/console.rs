//! The web console over HTTP, without a browser: sign-in with password and TOTP, sessions
//! (cookie attributes, idle and absolute expiry, sign-out), CSRF, lockout, the security
//! headers, every page and its refusals (no session, wrong role, wrong ERN, bad CSRF
//! token, expired session), and that no identifier reaches a URL or the log.
//! `console_browser.rs` drives the same pages in headless Chromium.

use ern_registry::store::db;
use std::collections::BTreeMap;
use std::net::SocketAddr;

use chrono::Duration;
use ern_registry::auth::Role;
use ern_registry::clock::Clock;
use ern_registry::config::ServeArgs;
use ern_registry::keys::MasterSecret;
use ern_registry::service::admin::{AdminAction, run_action};
use ern_registry::service::console::{current_code, secret_of_uri};
use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use secrecy::{ExposeSecret, SecretString};

use crate::helpers::*;

pub const PASSWORD: &str = "a long enough password";

/// An app with the console on, on loopback.
pub async fn console_app(args: ServeArgs) -> TestApp {
    TestApp::spawn_with(ServeArgs {
        console_listen: Some("127.0.0.1:0".parse().unwrap()),
        ..args
    })
    .await
}

/// A principal with a console password and TOTP, set through the admin actions (as
/// `admin set-password` and `admin enrol-totp` run them); returns their TOTP secret.
pub async fn console_user(
    app: &TestApp,
    name: &str,
    role: Role,
    centre: Option<&str>,
    erns: &[&str],
) -> Vec<u8> {
    let erns: Vec<String> = erns.iter().map(|s| s.to_string()).collect();
    app.store
        .create_principal(name, role, centre, &erns)
        .await
        .unwrap();
    let master = MasterSecret::load(&app.dir.path().join("master.key")).unwrap();
    run_action(
        &app.store,
        &master,
        "admin-cli:test",
        AdminAction::SetPassword {
            principal: name.into(),
            password: SecretString::from(PASSWORD.to_owned()),
        },
    )
    .await
    .unwrap();
    let done = run_action(
        &app.store,
        &master,
        "admin-cli:test",
        AdminAction::EnrolTotp {
            principal: name.into(),
        },
    )
    .await
    .unwrap();
    let uri = done.totp_uri.unwrap();
    assert!(
        uri.expose_secret()
            .starts_with("otpauth://totp/ern-registry:")
    );
    secret_of_uri(uri.expose_secret()).unwrap()
}

pub struct Page {
    pub status: u16,
    pub headers: hyper::HeaderMap,
    pub body: String,
}

impl Page {
    /// The CSRF token of the page's first form.
    pub fn csrf(&self) -> String {
        let start = self
            .body
            .find("name=\"csrf\" value=\"")
            .unwrap_or_else(|| panic!("no CSRF field in {}", self.body))
            + 19;
        self.body[start..start + 64].to_owned()
    }

    pub fn location(&self) -> Option<&str> {
        self.headers.get("location").map(|v| v.to_str().unwrap())
    }
}

/// A cookie-keeping HTTP/1.1 client of the console.
pub struct Web {
    base: String,
    client: Client<HttpConnector, Full<Bytes>>,
    pub cookies: BTreeMap<String, String>,
    /// Every Set-Cookie header received, as sent.
    pub set_cookies: Vec<String>,
    /// Every URL requested and every Location answered.
    pub urls: Vec<String>,
}

impl Web {
    pub fn new(addr: SocketAddr) -> Web {
        Web {
            base: format!("http://{addr}"),
            client: Client::builder(TokioExecutor::new()).build_http(),
            cookies: BTreeMap::new(),
            set_cookies: Vec::new(),
            urls: Vec::new(),
        }
    }

    async fn send(&mut self, method: &str, path: &str, body: Option<String>) -> Page {
        let url = format!("{}{path}", self.base);
        self.urls.push(url.clone());
        let mut req = hyper::Request::builder().method(method).uri(&url);
        if !self.cookies.is_empty() {
            let cookie = self
                .cookies
                .iter()
                .map(|(k, v)| format!("{k}={v}"))
                .collect::<Vec<_>>()
                .join("; ");
            req = req.header("cookie", cookie);
        }
        let body = match body {
            Some(b) => {
                req = req.header("content-type", "application/x-www-form-urlencoded");
                Full::new(Bytes::from(b))
            }
            None => Full::new(Bytes::new()),
        };
        let response = self.client.request(req.body(body).unwrap()).await.unwrap();
        let status = response.status().as_u16();
        let headers = response.headers().clone();
        for v in headers.get_all("set-cookie") {
            let text = v.to_str().unwrap().to_owned();
            let (pair, attrs) = text.split_once(';').unwrap_or((&text, ""));
            let (name, value) = pair.split_once('=').unwrap();
            if attrs.contains("Max-Age=0") {
                self.cookies.remove(name);
            } else {
                self.cookies.insert(name.to_owned(), value.to_owned());
            }
            self.set_cookies.push(text.clone());
        }
        if let Some(l) = headers.get("location") {
            self.urls.push(l.to_str().unwrap().to_owned());
        }
        let bytes = response.into_body().collect().await.unwrap().to_bytes();
        Page {
            status,
            headers,
            body: String::from_utf8_lossy(&bytes).into_owned(),
        }
    }

    pub async fn get(&mut self, path: &str) -> Page {
        self.send("GET", path, None).await
    }

    pub async fn post(&mut self, path: &str, fields: &[(&str, &str)]) -> Page {
        let body = url::form_urlencoded::Serializer::new(String::new())
            .extend_pairs(fields)
            .finish();
        self.send("POST", path, Some(body)).await
    }

    /// Finds a patient of `registry` by BSN on the officer's find form; the page found and
    /// the patient's pseudonym.
    pub async fn find_by_bsn(&mut self, registry: &str, bsn: &str) -> (Page, String) {
        let find = self.get("/officer").await;
        let found = self
            .post(
                "/officer/patient",
                &[
                    ("csrf", &find.csrf()),
                    ("kind", "national"),
                    ("registry", registry),
                    ("national.issuing_country", "NL"),
                    ("national.value", bsn),
                ],
            )
            .await;
        assert_eq!(found.status, 200, "{}", found.body);
        let at = found.body.find("name=\"pseudonym\" value=\"").unwrap() + 24;
        let pseudonym = found.body[at..].split('"').next().unwrap().to_owned();
        (found, pseudonym)
    }

    /// Signs in with the TOTP code of `secret` at the app's clock.
    pub async fn sign_in(&mut self, app: &TestApp, name: &str, secret: &[u8]) -> Page {
        let form = self.get("/sign-in").await;
        let code = current_code(secret, app.clock.now());
        self.post(
            "/sign-in",
            &[
                ("csrf", &form.csrf()),
                ("name", name),
                ("password", PASSWORD),
                ("code", &code),
            ],
        )
        .await
    }
}

/// Moves the clock to the next TOTP step (each code is good once).
fn next_step(app: &TestApp) {
    app.clock.advance(Duration::seconds(31));
}

async fn officer_app() -> (TestApp, Web, Vec<u8>) {
    officer_app_with(ServeArgs::default()).await
}

async fn officer_app_with(args: ServeArgs) -> (TestApp, Web, Vec<u8>) {
    let app = console_app(args).await;
    let secret = console_user(
        &app,
        "officer-eye",
        Role::ConsentOfficer,
        None,
        &["ERN-EYE"],
    )
    .await;
    // Time stands still unless a test moves it: a code is of one 30-s step, and a step
    // that ended between two sign-ins of a test would make "the same code" a new one.
    app.clock.freeze_at(app.clock.now());
    let web = Web::new(app.console.unwrap());
    (app, web, secret)
}

/// HTTP/1.1 only: a client speaking HTTP/2 from the first byte (prior knowledge, no TLS)
/// is not served, so no connection carries more than one request at a time (a request
/// whose client goes away ends with its connection: `docs/console.md`, sign-in). An
/// HTTP/1.1 request on the same listener is answered.
#[tokio::test]
async fn the_console_speaks_http1_only() {
    let app = console_app(ServeArgs::default()).await;
    let addr = app.console.unwrap();
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let refused = async {
        let (mut h2, connection) = h2::client::handshake(tcp).await?;
        tokio::spawn(connection);
        let request = hyper::Request::get(format!("http://{addr}/sign-in"))
            .body(())
            .unwrap();
        let (response, _) = h2.send_request(request, true)?;
        response.await
    };
    let outcome = tokio::time::timeout(std::time::Duration::from_secs(60), refused)
        .await
        .expect("the console neither answered nor closed the connection");
    assert!(outcome.is_err(), "HTTP/2 was served: {outcome:?}");
    let mut web = Web::new(addr);
    assert_eq!(web.get("/sign-in").await.status, 200);
}

#[tokio::test]
async fn the_console_is_off_unless_asked_for() {
    let app = TestApp::spawn().await;
    assert!(app.console.is_none());
}

#[tokio::test]
async fn an_officer_signs_in_with_password_and_totp_and_gets_a_strict_session_cookie() {
    let (app, mut web, secret) = officer_app().await;
    let form = web.get("/sign-in").await;
    assert_eq!(form.status, 200);
    let pre = web.set_cookies.last().unwrap().clone();
    assert!(pre.starts_with("__Host-ern-pre="), "{pre}");
    let signed = web.sign_in(&app, "officer-eye", &secret).await;
    assert_eq!(signed.status, 303, "{}", signed.body);
    assert_eq!(signed.location(), Some("/home"));
    let cookie = web
        .set_cookies
        .iter()
        .find(|c| c.starts_with("__Host-ern-session="))
        .unwrap();
    for attr in ["Path=/", "Secure", "HttpOnly", "SameSite=Strict"] {
        assert!(cookie.contains(attr), "{cookie} lacks {attr}");
    }
    assert!(!cookie.contains("Domain"), "{cookie}");
    let home = web.get("/home").await;
    assert_eq!(home.status, 200);
    assert!(home.body.contains("officer-eye"));
    assert!(home.body.contains("Find a patient"));
    // Only the token's hash is on file.
    let token = web.cookies["__Host-ern-session"].clone();
    let stored: Vec<String> = db::query("SELECT token_hash FROM console_sessions")
        .fetch_scalars(app.store.pool())
        .await
        .unwrap();
    assert_eq!(stored.len(), 1);
    assert_ne!(stored[0], token);
    // The sign-in is in the audit log.
    let methods: Vec<String> =
        db::query("SELECT method FROM audit_log WHERE principal = 'officer-eye'")
            .fetch_scalars(app.store.pool())
            .await
            .unwrap();
    assert!(
        methods.contains(&"Console/SignIn".to_string()),
        "{methods:?}"
    );
}

/// A session's row is keyed by an HMAC of its token under a key from the master secret:
/// whoever can write to the database, without that secret, cannot plant one. A row for
/// the officer keyed by the SHA-256 of a token of the attacker's (what rows were keyed by
/// until 2026-12-07, when a defences audit signed in so as any officer) opens nothing;
/// the officer's own session still works.
#[tokio::test]
async fn a_session_planted_in_the_database_opens_nothing() {
    let (app, mut web, secret) = officer_app().await;
    web.get("/sign-in").await;
    assert_eq!(web.sign_in(&app, "officer-eye", &secret).await.status, 303);
    let officer: i64 = db::query("SELECT id FROM principals WHERE name = 'officer-eye'")
        .fetch_scalars(app.store.pool())
        .await
        .unwrap()[0];
    let token = "5a".repeat(32);
    let sha256 = hex::encode(ring::digest::digest(
        &ring::digest::SHA256,
        token.as_bytes(),
    ));
    let now = app.instant_sql(app.clock.now().timestamp_millis());
    db::query(&format!(
        "INSERT INTO console_sessions (token_hash, principal_id, created_at, last_seen_at) \
         VALUES ($1, $2, {now}, {now})"
    ))
    .bind(sha256)
    .bind(officer)
    .execute(app.store.pool())
    .await
    .unwrap();
    let mut planted = Web::new(app.console.unwrap());
    planted
        .cookies
        .insert("__Host-ern-session".into(), token.clone());
    let home = planted.get("/home").await;
    assert_ne!(
        home.status, 200,
        "a planted session was served:\n{}",
        home.body
    );
    assert!(!home.body.contains("officer-eye"), "{}", home.body);
    assert_eq!(web.get("/home").await.status, 200);
}

#[tokio::test]
async fn a_wrong_password_or_code_is_refused_and_a_code_is_good_once() {
    let (app, mut web, secret) = officer_app().await;
    let form = web.get("/sign-in").await;
    let code = current_code(&secret, app.clock.now());
    let wrong = web
        .post(
            "/sign-in",
            &[
                ("csrf", &form.csrf()),
                ("name", "officer-eye"),
                ("password", "not the password"),
                ("code", &code),
            ],
        )
        .await;
    assert_eq!(wrong.status, 401);
    assert!(wrong.body.contains("wrong name, password or code"));
    assert!(!web.cookies.contains_key("__Host-ern-session"));
    let form = web.get("/sign-in").await;
    let bad_code = web
        .post(
            "/sign-in",
            &[
                ("csrf", &form.csrf()),
                ("name", "officer-eye"),
                ("password", PASSWORD),
                ("code", if code == "000000" { "111111" } else { "000000" }),
            ],
        )
        .await;
    assert_eq!(bad_code.status, 401);
    let unknown = web.sign_in(&app, "nobody", &secret).await;
    assert_eq!(unknown.status, 401);
    assert!(unknown.body.contains("wrong name, password or code"));
    assert_eq!(web.sign_in(&app, "officer-eye", &secret).await.status, 303);
    // The same code again (same time step): refused, and counted as a failure of the
    // name like a wrong code (the right password with a used code learns nothing free).
    let failures = || async {
        app.pairs::<i64, i64>(
            "SELECT COUNT(*), CAST(COALESCE(SUM(failures), 0) AS BIGINT) \
             FROM console_sign_in_failures",
        )
        .await[0]
            .1
    };
    let before = failures().await;
    let mut other = Web::new(app.console.unwrap());
    assert_eq!(
        other.sign_in(&app, "officer-eye", &secret).await.status,
        401
    );
    assert_eq!(failures().await, before + 1);
    next_step(&app);
    assert_eq!(
        other.sign_in(&app, "officer-eye", &secret).await.status,
        303
    );
}

#[tokio::test]
async fn failed_sign_ins_hold_the_account_back_even_with_the_right_password() {
    let (app, mut web, secret) = officer_app().await;
    for _ in 0..5 {
        let page = wrong_guess(&mut web, "officer-eye").await;
        assert_eq!(page.status, 401);
    }
    let locked = web.sign_in(&app, "officer-eye", &secret).await;
    assert_eq!(locked.status, 429, "{}", locked.body);
    assert!(locked.body.contains("held back"));
    // After the hold (1 minute at the fifth failure) the right credentials work again.
    app.clock.advance(Duration::seconds(61));
    assert_eq!(web.sign_in(&app, "officer-eye", &secret).await.status, 303);
    // A sign-in that succeeds is in the log before its answer.
    let ok: i64 = db::query(
        "SELECT COUNT(*) FROM audit_log WHERE method = 'Console/SignIn' AND principal = 'officer-eye' AND outcome = 'OK'",
    )
    .fetch_scalar(app.store.pool())
    .await
    .unwrap();
    assert_eq!(ok, 1);
    // The success cleared the name's failures.
    let rows: i64 = db::query("SELECT COUNT(*) FROM console_sign_in_failures")
        .fetch_scalar(app.store.pool())
        .await
        .unwrap();
    assert_eq!(rows, 0);
    // A refused sign-in's entry is appended after its answer, not before (so that its
    // commit does not time the answer), and on PostgreSQL by either writer partition: the
    // entries arrive in any order, a moment after the answers.
    let mut outcomes: Vec<String> = Vec::new();
    for _ in 0..500 {
        outcomes = db::query(
            "SELECT outcome FROM audit_log WHERE method = 'Console/SignIn' AND principal = 'officer-eye' ORDER BY seq",
        )
        .fetch_scalars(app.store.pool())
        .await
        .unwrap();
        if outcomes.len() >= 7 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    outcomes.sort();
    let mut expected = vec!["OK", "RESOURCE_EXHAUSTED"];
    expected.extend(["UNAUTHENTICATED"; 5]);
    assert_eq!(outcomes, expected);
    // Each entry, refused ones too, names the principal's role (a claims audit of
    // 2026-12-07 found the refused ones without it).
    let roles: Vec<String> = db::query(
        "SELECT DISTINCT role FROM audit_log WHERE method = 'Console/SignIn' AND principal = 'officer-eye'",
    )
    .fetch_scalars(app.store.pool())
    .await
    .unwrap();
    assert_eq!(roles, ["consent_officer"]);
}

/// A sign-in with `name`, `password` and `code`, on a fresh form.
async fn signing_in(web: &mut Web, name: &str, password: &str, code: &str) -> Page {
    let form = web.get("/sign-in").await;
    web.post(
        "/sign-in",
        &[
            ("csrf", &form.csrf()),
            ("name", name),
            ("password", password),
            ("code", code),
        ],
    )
    .await
}

/// A sign-in with `name` and a wrong password and code.
async fn wrong_guess(web: &mut Web, name: &str) -> Page {
    signing_in(web, name, "guess guess guess", "123456").await
}

/// Five wrong guesses with `name`, then the answer to a sixth (status, body).
async fn guessed_six_times(web: &mut Web, name: &str) -> (u16, String) {
    for _ in 0..5 {
        let page = wrong_guess(web, name).await;
        assert_eq!(page.status, 401, "{name}: {}", page.body);
    }
    let page = wrong_guess(web, name).await;
    (page.status, page.body)
}

/// A password is taken as it was set: `admin set-password` keeps leading and trailing
/// spaces, and so does the sign-in form (a password set so could never be used before).
#[tokio::test]
async fn a_password_with_spaces_at_its_ends_signs_in() {
    let app = console_app(ServeArgs::default()).await;
    let secret = console_user(&app, "padded", Role::ConsentOfficer, None, &["ERN-EYE"]).await;
    let master = MasterSecret::load(&app.dir.path().join("master.key")).unwrap();
    let padded = "  correct horse battery  ";
    run_action(
        &app.store,
        &master,
        "admin-cli:test",
        AdminAction::SetPassword {
            principal: "padded".into(),
            password: SecretString::from(padded.to_owned()),
        },
    )
    .await
    .unwrap();
    let mut web = Web::new(app.console.unwrap());
    let code = || current_code(&secret, app.clock.now());
    // Trimmed, it is another password: refused.
    let refused = signing_in(&mut web, "padded", "correct horse battery", &code()).await;
    assert_eq!(refused.status, 401, "{}", refused.body);
    let home = signing_in(&mut web, "padded", padded, &code()).await;
    assert_eq!(home.status, 303, "{}", home.body);
    app.stop().await;
}

/// A sign-in refused because both Argon2 runs are taken (503) is charged to the address
/// like any other refusal, as on gRPC: a flood sent behind a few slow attempts is not
/// refused for free. Two dozen attempts at once, under as many names (no name is held
/// back), against an allowance of 6 a minute: every one is charged, so the next attempt
/// from the address is refused before any check.
#[tokio::test]
async fn sign_ins_refused_as_busy_are_charged_to_the_address() {
    let app = console_app(ServeArgs {
        refusals_per_peer_per_minute: 6,
        ..Default::default()
    })
    .await;
    let addr = app.console.unwrap();
    let mut webs = Vec::new();
    for _ in 0..24 {
        let mut web = Web::new(addr);
        let csrf = web.get("/sign-in").await.csrf();
        webs.push((web, csrf));
    }
    let pages = futures_util::future::join_all(webs.iter_mut().enumerate().map(
        |(i, (web, csrf))| async move {
            let name = format!("nobody-{i}");
            web.post(
                "/sign-in",
                &[
                    ("csrf", csrf.as_str()),
                    ("name", name.as_str()),
                    ("password", "guess guess guess"),
                    ("code", "123456"),
                ],
            )
            .await
        },
    ))
    .await;
    let statuses: Vec<u16> = pages.iter().map(|p| p.status).collect();
    assert!(
        statuses.contains(&503),
        "no attempt found both runs taken: {statuses:?}"
    );
    let next = wrong_guess(&mut Web::new(addr), "nobody-else").await;
    assert_eq!(next.status, 429, "after {statuses:?}: {}", next.body);
    app.stop().await;
}

/// Being held back tells nothing about the name: a console user, a principal without
/// console credentials and a name of nobody are held back alike after five failures, with
/// the same page. The names tried are not kept readable, and a name's failures are
/// forgotten a day after the last one, once its hold has ended.
#[tokio::test]
async fn every_name_is_held_back_alike_so_the_hold_tells_no_console_user_apart() {
    let (app, mut web, _) = officer_app().await;
    app.store
        .create_principal("api-only", Role::Researcher, None, &["ERN-EYE".to_string()])
        .await
        .unwrap();
    let mut answers = Vec::new();
    for name in ["officer-eye", "api-only", "nobody-at-all"] {
        let (status, body) = guessed_six_times(&mut web, name).await;
        assert_eq!(status, 429, "{name}: {body}");
        // The page's message, without the milliseconds to wait (the clock runs on).
        let start = body.find("<p class=\"error\"").expect("an error message");
        let message = &body[start..start + body[start..].find("</p>").unwrap()];
        answers.push(message.replace(|c: char| c.is_ascii_digit(), ""));
    }
    assert_eq!(answers[0], answers[1]);
    assert_eq!(answers[0], answers[2]);
    assert!(answers[0].contains("held back"));

    let names: Vec<String> = db::query("SELECT name_mac FROM console_sign_in_failures")
        .fetch_scalars(app.store.pool())
        .await
        .unwrap();
    assert_eq!(names.len(), 3);
    for mac in &names {
        assert_eq!(mac.len(), 64, "{mac}");
        assert!(!mac.contains("officer") && !mac.contains("nobody") && !mac.contains("api"));
    }

    // A day after the last failure, its hold long over, a name starts afresh: one more
    // failure is a plain refusal, not a hold. Also when a flood of names left more
    // forgotten rows than one sign-in removes (100): the name's own count starts again.
    let long_ago = app.clock.now() - Duration::hours(48);
    let mut tx = app.store.pool().begin().await.unwrap();
    for n in 0..250 {
        db::query(
            "INSERT INTO console_sign_in_failures (name_mac, failures, locked_until, last_failure_at) \
             VALUES ($1, 3, $2, $3)",
        )
        .bind(format!("{n:064x}"))
        .bind(chrono::DateTime::<chrono::Utc>::UNIX_EPOCH)
        .bind(long_ago)
        .execute(&mut tx)
        .await
        .unwrap();
    }
    tx.commit().await.unwrap();
    app.clock.advance(Duration::hours(25));
    for name in ["officer-eye", "nobody-at-all"] {
        let page = wrong_guess(&mut web, name).await;
        assert_eq!(page.status, 401, "{name}: {}", page.body);
    }
    let master = MasterSecret::load(&app.dir.path().join("master.key")).unwrap();
    for name in ["officer-eye", "nobody-at-all"] {
        let mac = ern_registry::service::console::name_mac(&master, name);
        let failures: i64 =
            db::query("SELECT failures FROM console_sign_in_failures WHERE name_mac = $1")
                .bind(mac)
                .fetch_scalar(app.store.pool())
                .await
                .unwrap();
        assert_eq!(failures, 1, "{name}");
    }
    // 253 forgotten rows (the 250, and the three names' of before): each of the two
    // sign-ins removed 100 of them, and wrote its own name's row back if it was one of
    // those removed. A flood is cleared a hundred at a time.
    let left: i64 = db::query("SELECT COUNT(*) FROM console_sign_in_failures")
        .fetch_scalar(app.store.pool())
        .await
        .unwrap();
    assert!((53..=55).contains(&left), "{left}");
}

#[tokio::test]
async fn pages_without_a_session_send_the_browser_to_sign_in() {
    let (app, mut web, _) = officer_app().await;
    for path in [
        "/home",
        "/officer",
        "/officer/receipt",
        "/officer/expiring",
        "/research",
        "/expertise",
    ] {
        let page = web.get(path).await;
        assert_eq!(page.status, 303, "{path}");
        assert_eq!(page.location(), Some("/sign-in"), "{path}");
    }
    let posted = web
        .post(
            "/officer/patient",
            &[("registry", "ERN-EYE"), ("kind", "pseudonym")],
        )
        .await;
    assert_eq!(posted.status, 303);
    web.cookies
        .insert("__Host-ern-session".into(), "0".repeat(64));
    assert_eq!(web.get("/home").await.status, 303);
    drop(app);
}

#[tokio::test]
async fn forms_without_the_sessions_csrf_token_are_refused() {
    let (app, mut web, secret) = officer_app().await;
    // Sign-in: no pre-session cookie, or a token of another one.
    let form = web.get("/sign-in").await;
    let token = form.csrf();
    let mut stranger = Web::new(app.console.unwrap());
    let code = current_code(&secret, app.clock.now());
    let fields = [
        ("csrf", token.as_str()),
        ("name", "officer-eye"),
        ("password", PASSWORD),
        ("code", code.as_str()),
    ];
    assert_eq!(stranger.post("/sign-in", &fields).await.status, 403);
    assert_eq!(web.sign_in(&app, "officer-eye", &secret).await.status, 303);
    for csrf in ["", "nonsense", &"0".repeat(64), &token] {
        let page = web
            .post(
                "/officer/patient",
                &[
                    ("csrf", csrf),
                    ("registry", "ERN-EYE"),
                    ("kind", "pseudonym"),
                    ("pseudonym", "x"),
                ],
            )
            .await;
        assert_eq!(page.status, 403, "csrf {csrf:?}");
        assert!(page.body.contains("security token"));
    }
    // Signing out needs the token too.
    assert_eq!(web.post("/sign-out", &[("csrf", "")]).await.status, 403);
    assert_eq!(web.get("/home").await.status, 200);
    let refused: i64 = db::query(
        "SELECT COUNT(*) FROM audit_log WHERE method = 'Console/FindPatient' AND outcome = 'PERMISSION_DENIED'",
    )
    .fetch_scalar(app.store.pool())
    .await
    .unwrap();
    assert_eq!(refused, 4);
    // The sign-in refused for its token is audited too: before any session, in the
    // summary of the address's refusals, written into the chain at shutdown at the latest.
    let mut app = app;
    app.stop_server().await;
    let summary: Vec<(String, i64)> = db::query(
        "SELECT outcome, items FROM audit_log \
         WHERE principal_id IS NULL AND principal = 'peer:127.0.0.1' AND method = 'Console/SignIn'",
    )
    .fetch_all(app.store.pool())
    .await
    .unwrap()
    .iter()
    .map(|r| (r.get(0), r.get(1)))
    .collect();
    assert_eq!(summary, [("PERMISSION_DENIED".to_string(), 1)]);
}

#[tokio::test]
async fn sessions_end_on_sign_out_when_idle_and_after_the_absolute_limit() {
    let app = console_app(ServeArgs {
        console_idle_minutes: 15,
        console_session_hours: 1,
        ..ServeArgs::default()
    })
    .await;
    let secret = console_user(
        &app,
        "officer-eye",
        Role::ConsentOfficer,
        None,
        &["ERN-EYE"],
    )
    .await;
    let mut web = Web::new(app.console.unwrap());
    // Sign-out.
    assert_eq!(web.sign_in(&app, "officer-eye", &secret).await.status, 303);
    let token = web.cookies["__Host-ern-session"].clone();
    let home = web.get("/home").await;
    let out = web.post("/sign-out", &[("csrf", &home.csrf())]).await;
    assert_eq!(out.status, 303);
    assert!(!web.cookies.contains_key("__Host-ern-session"));
    web.cookies.insert("__Host-ern-session".into(), token);
    assert_eq!(web.get("/home").await.status, 303);
    // Idle: 15 minutes without a request.
    next_step(&app);
    assert_eq!(web.sign_in(&app, "officer-eye", &secret).await.status, 303);
    app.clock.advance(Duration::minutes(14));
    assert_eq!(web.get("/home").await.status, 200);
    app.clock.advance(Duration::minutes(15));
    let expired = web.get("/home").await;
    assert_eq!(expired.status, 401);
    assert!(expired.body.contains("expired"));
    assert_eq!(
        web.get("/home").await.status,
        303,
        "an expired session is gone"
    );
    // Absolute: an hour after sign-in, however busy.
    next_step(&app);
    assert_eq!(web.sign_in(&app, "officer-eye", &secret).await.status, 303);
    for _ in 0..4 {
        app.clock.advance(Duration::minutes(14));
        assert_eq!(web.get("/home").await.status, 200);
    }
    app.clock.advance(Duration::minutes(5));
    assert_eq!(web.get("/home").await.status, 401);
}

#[tokio::test]
async fn a_disabled_principal_loses_its_session_at_once() {
    let (app, mut web, secret) = officer_app().await;
    assert_eq!(web.sign_in(&app, "officer-eye", &secret).await.status, 303);
    assert!(app.store.disable_principal("officer-eye").await.unwrap());
    assert_eq!(web.get("/home").await.status, 303);
}

/// A principal bound to client certificates calls with one of them (mutual TLS); the
/// console sees no certificate, so it signs such a principal in never, and a session
/// made before the binding ends at its next request.
#[tokio::test]
async fn a_principal_bound_to_certificates_cannot_use_the_console() {
    let (app, mut web, secret) = officer_app().await;
    assert_eq!(web.sign_in(&app, "officer-eye", &secret).await.status, 303);
    assert_eq!(web.get("/home").await.status, 200);
    app.store
        .bind_certificate("officer-eye", &"ab".repeat(32))
        .await
        .unwrap();
    let ended = web.get("/home").await;
    assert_eq!(ended.status, 403, "{}", ended.body);
    assert!(
        ended.body.contains("bound to client certificates"),
        "{}",
        ended.body
    );
    assert_eq!(web.get("/home").await.status, 303, "the session ended");
    let sessions: Vec<i64> = db::query("SELECT COUNT(*) FROM console_sessions")
        .fetch_scalars(app.store.pool())
        .await
        .unwrap();
    assert_eq!(sessions, [0]);
    next_step(&app);
    let mut fresh = Web::new(app.console.unwrap());
    let refused = fresh.sign_in(&app, "officer-eye", &secret).await;
    assert_ne!(refused.status, 303, "signed in");
    assert!(
        refused.body.contains("not in the web console"),
        "{}",
        refused.body
    );
    let sessions: Vec<i64> = db::query("SELECT COUNT(*) FROM console_sessions")
        .fetch_scalars(app.store.pool())
        .await
        .unwrap();
    assert_eq!(sessions, [0]);
}

#[tokio::test]
async fn every_response_carries_the_security_headers() {
    let (app, mut web, secret) = officer_app().await;
    let sign_in = web.get("/sign-in").await;
    web.sign_in(&app, "officer-eye", &secret).await;
    let home = web.get("/home").await;
    let missing = web.get("/no-such-page").await;
    assert_eq!(missing.status, 404);
    for page in [&sign_in, &home, &missing] {
        let h = |n: &str| page.headers.get(n).map(|v| v.to_str().unwrap().to_owned());
        assert_eq!(
            h("content-security-policy").as_deref(),
            Some(
                "default-src 'none'; style-src 'self'; img-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
            )
        );
        assert_eq!(h("x-frame-options").as_deref(), Some("DENY"));
        assert_eq!(h("referrer-policy").as_deref(), Some("no-referrer"));
        assert_eq!(h("x-content-type-options").as_deref(), Some("nosniff"));
        assert_eq!(h("cache-control").as_deref(), Some("no-store"));
        assert_eq!(
            h("cross-origin-opener-policy").as_deref(),
            Some("same-origin")
        );
        assert_eq!(
            h("cross-origin-resource-policy").as_deref(),
            Some("same-origin")
        );
        assert!(!page.body.contains("<script"));
        assert!(!page.body.contains("style=\""));
    }
    let css = web.get("/console.css").await;
    assert_eq!(css.status, 200);
    assert!(
        css.headers["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/css")
    );
}

/// The field of `page` named `field` is followed by its error message.
pub fn error_next_to(page: &Page, field: &str, message: &str) -> bool {
    let id = field.replace(['.', '[', ']'], "-");
    let marker = format!("id=\"{id}-error\"");
    page.body.find(&marker).is_some_and(|at| {
        page.body[at..]
            .split("</span>")
            .next()
            .unwrap()
            .contains(message)
    })
}

/// An invalid form is answered with the form again and, for a patient's page, the
/// patient's consent history: shown only once the refusal's audit entry is committed,
/// like any page that reads (here the entry cannot be written, and the page is not shown).
#[tokio::test]
async fn an_invalid_form_shows_nothing_the_audit_log_does_not_record() {
    let (app, mut web, secret) = officer_app().await;
    let mut physician = app.physician("dr-eye", "NL-AMC").await;
    let pseudonym = physician
        .submit_case(submission("ERN-EYE", national("NL", &bsn(31))))
        .await
        .unwrap()
        .into_inner()
        .pseudonym;
    web.sign_in(&app, "officer-eye", &secret).await;
    let find = web.get("/officer").await;
    let csrf = find.csrf();
    let fields = [
        ("csrf", csrf.as_str()),
        ("registry", "ERN-EYE"),
        ("pseudonym", pseudonym.as_str()),
        ("scope", "registry_inclusion"),
        ("decision", "granted"),
        ("form_version", "v2"),
        ("given_at", "2999-01-01"),
    ];
    // Recorded: the form again, with the history (the physician's attestation).
    let shown = web.post("/officer/record", &fields).await;
    assert_eq!(shown.status, 400, "{}", shown.body);
    assert!(shown.body.contains("<h2>History</h2>"), "{}", shown.body);
    fail_audit_entries_of(&app, "Console/RecordConsent").await;
    let withheld = web.post("/officer/record", &fields).await;
    assert_eq!(withheld.status, 503, "{}", withheld.body);
    assert!(
        !withheld.body.contains("<h2>History</h2>") && !withheld.body.contains(&pseudonym),
        "{}",
        withheld.body
    );
    app.stop().await;
}

/// The tag of the input named `name` on `page`.
fn input_tag<'a>(page: &'a Page, name: &str) -> &'a str {
    let at = page
        .body
        .find(&format!("name=\"{name}\""))
        .unwrap_or_else(|| panic!("no input {name}"));
    let start = page.body[..at].rfind('<').unwrap();
    let end = at + page.body[at..].find('>').unwrap();
    &page.body[start..=end]
}

/// What an officer types to find a patient (identifiers, a pseudonym) or a receipt is not
/// kept in the browser's form history, for the next user of a shared workstation.
#[tokio::test]
async fn the_browser_is_asked_not_to_keep_identifiers_typed_into_the_console() {
    let (app, mut web, secret) = officer_app().await;
    web.sign_in(&app, "officer-eye", &secret).await;
    let find = web.get("/officer").await;
    for name in [
        "national.issuing_country",
        "national.value",
        "demographic.given_names",
        "demographic.family_name",
        "demographic.date_of_birth",
        "demographic.place_of_birth",
        "demographic.country_of_birth",
        "pseudonym",
    ] {
        let tag = input_tag(&find, name);
        assert!(tag.contains("autocomplete=\"off\""), "{tag}");
    }
    let receipts = web.get("/officer/receipt").await;
    let tag = input_tag(&receipts, "receipt_id");
    assert!(tag.contains("autocomplete=\"off\""), "{tag}");
    app.stop().await;
}

#[tokio::test]
async fn an_officer_finds_records_withdraws_and_gets_a_printable_receipt() {
    let (app, mut web, secret) = officer_app().await;
    let mut physician = app.physician("dr-eye", "NL-AMC").await;
    let canary = bsn(424_242);
    web.sign_in(&app, "officer-eye", &secret).await;
    let find = web.get("/officer").await;
    assert_eq!(find.status, 200);
    // A malformed BSN: the API's field violation, next to the field.
    let bad = web
        .post(
            "/officer/patient",
            &[
                ("csrf", &find.csrf()),
                ("kind", "national"),
                ("registry", "ERN-EYE"),
                ("national.issuing_country", "NL"),
                ("national.value", "123456789"),
            ],
        )
        .await;
    assert_eq!(bad.status, 400);
    assert!(
        error_next_to(&bad, "national.value", "must be a valid BSN"),
        "{}",
        bad.body
    );
    assert!(
        !bad.body.contains("123456789"),
        "identifiers are not echoed"
    );
    // Found by BSN: nothing on file yet.
    let found = web
        .post(
            "/officer/patient",
            &[
                ("csrf", &find.csrf()),
                ("kind", "national"),
                ("registry", "ERN-EYE"),
                ("national.issuing_country", "NL"),
                ("national.value", &canary),
            ],
        )
        .await;
    assert_eq!(found.status, 200, "{}", found.body);
    assert!(found.body.contains("No decision on file."));
    assert!(!found.body.contains(&canary));
    let pseudonym = {
        let at = found.body.find("name=\"pseudonym\" value=\"").unwrap() + 24;
        found.body[at..].split('"').next().unwrap().to_owned()
    };
    assert!(pseudonym.starts_with("R0"), "{pseudonym}");
    // Record: a bad date is shown next to its field; then the decision is on file.
    let today = app.clock.now().format("%Y-%m-%d").to_string();
    let bad = web
        .post(
            "/officer/record",
            &[
                ("csrf", &found.csrf()),
                ("registry", "ERN-EYE"),
                ("pseudonym", &pseudonym),
                ("scope", "registry_inclusion"),
                ("decision", "granted"),
                ("form_version", "v2"),
                ("given_at", "2999-01-01"),
            ],
        )
        .await;
    assert_eq!(bad.status, 400);
    assert!(bad.body.contains("id=\"given_at-error\""), "{}", bad.body);
    // A pseudonym of a key version the registry does not have: said of the page's
    // pseudonym (a hidden field), as the form names it.
    let never = app
        .pseudonym_under("ERN-EYE", &national("NL", &canary), 3)
        .await;
    let unknown = web
        .post(
            "/officer/record",
            &[
                ("csrf", &found.csrf()),
                ("registry", "ERN-EYE"),
                ("pseudonym", &never),
                ("scope", "registry_inclusion"),
                ("decision", "granted"),
                ("form_version", "v2"),
                ("given_at", &today),
            ],
        )
        .await;
    assert_eq!(unknown.status, 400, "{}", unknown.body);
    assert!(
        unknown
            .body
            .contains("<p class=\"error\">pseudonym: is of a pseudonym key version"),
        "{}",
        unknown.body
    );
    for scope in ["registry_inclusion", "research_use"] {
        let recorded = web
            .post(
                "/officer/record",
                &[
                    ("csrf", &found.csrf()),
                    ("registry", "ERN-EYE"),
                    ("pseudonym", &pseudonym),
                    ("scope", scope),
                    ("decision", "granted"),
                    ("form_version", "v2"),
                    ("given_at", &today),
                ],
            )
            .await;
        assert_eq!(recorded.status, 200, "{}", recorded.body);
        assert!(recorded.body.contains("The decision is recorded."));
    }
    // A physician's case, stored under that consent.
    let mut submission = submission("ERN-EYE", national("NL", &canary));
    submission.consent.clear();
    physician.submit_case(submission).await.unwrap();
    // Withdraw with no scope ticked: the error is tied to the check boxes' group.
    let no_scope = web
        .post(
            "/officer/withdraw",
            &[
                ("csrf", &found.csrf()),
                ("registry", "ERN-EYE"),
                ("pseudonym", &pseudonym),
                ("reason", "patient_request"),
            ],
        )
        .await;
    assert_eq!(no_scope.status, 400, "{}", no_scope.body);
    assert!(
        no_scope
            .body
            .contains("<fieldset aria-describedby=\"scopes-error\">")
            && no_scope
                .body
                .contains("<p class=\"error\" id=\"scopes-error\">"),
        "{}",
        no_scope.body
    );
    // Withdraw: first the confirmation, saying what is erased.
    let confirm = web
        .post(
            "/officer/withdraw",
            &[
                ("csrf", &found.csrf()),
                ("registry", "ERN-EYE"),
                ("pseudonym", &pseudonym),
                ("scope.registry_inclusion", "on"),
                ("reason", "patient_request"),
            ],
        )
        .await;
    assert_eq!(confirm.status, 200, "{}", confirm.body);
    assert!(
        confirm
            .body
            .contains("This erases the patient&#39;s clinical data")
            || confirm
                .body
                .contains("This erases the patient's clinical data"),
        "{}",
        confirm.body
    );
    assert!(confirm.body.contains("every case record of this pseudonym"));
    assert_eq!(
        app.count("cases").await,
        1,
        "nothing erased before confirming"
    );
    let receipt = web
        .post(
            "/officer/withdraw",
            &[
                ("csrf", &confirm.csrf()),
                ("registry", "ERN-EYE"),
                ("pseudonym", &pseudonym),
                ("scope.registry_inclusion", "on"),
                ("reason", "patient_request"),
                ("confirm", "yes"),
            ],
        )
        .await;
    assert_eq!(receipt.status, 200, "{}", receipt.body);
    assert!(receipt.body.contains("Erasure receipt"));
    assert_eq!(app.count("cases").await, 0);
    let receipt_id = {
        let at = receipt.body.find("rcpt-").unwrap();
        receipt.body[at..at + 37].to_owned()
    };
    // Looked up later by its id (in the form body).
    let lookup_form = web.get("/officer/receipt").await;
    let again = web
        .post(
            "/officer/receipt",
            &[("csrf", &lookup_form.csrf()), ("receipt_id", &receipt_id)],
        )
        .await;
    assert_eq!(again.status, 200);
    assert!(again.body.contains(&pseudonym));
    let bad_id = web
        .post(
            "/officer/receipt",
            &[("csrf", &lookup_form.csrf()), ("receipt_id", "rcpt-nope")],
        )
        .await;
    assert_eq!(bad_id.status, 400);
    assert!(error_next_to(&bad_id, "receipt_id", "must be a receipt id"));
    assert!(
        !bad_id.body.contains("rcpt-nope"),
        "what was typed is not shown back"
    );
    // Audited as the console's actions, by the officer.
    let methods: Vec<String> = db::query(
        "SELECT method FROM audit_log WHERE principal = 'officer-eye' AND outcome = 'OK' ORDER BY seq",
    )
    .fetch_scalars(app.store.pool())
    .await
    .unwrap();
    for m in [
        "Console/SignIn",
        "Console/FindPatient",
        "Console/RecordConsent",
        "Console/ConfirmWithdrawal",
        "Console/WithdrawConsent",
        "Console/GetErasureReceipt",
    ] {
        assert!(methods.contains(&m.to_string()), "{m} not in {methods:?}");
    }
    // No identifier or pseudonym in any URL, and no identifier in the log.
    for url in &web.urls {
        assert!(
            !url.contains(&canary) && !url.contains(&pseudonym) && !url.contains("rcpt-"),
            "{url}"
        );
    }
    assert!(!logs().contains(&canary), "the BSN reached the log");
    assert!(
        !logs().contains(&pseudonym),
        "the pseudonym reached the log"
    );
}

#[tokio::test]
async fn expiring_consents_are_listed_for_follow_up() {
    let (app, mut web, secret) = officer_app().await;
    web.sign_in(&app, "officer-eye", &secret).await;
    let (found, pseudonym) = web.find_by_bsn("ERN-EYE", &bsn(77)).await;
    let today = app.clock.now().format("%Y-%m-%d").to_string();
    let in_ten_days = (app.clock.now() + Duration::days(10))
        .format("%Y-%m-%d")
        .to_string();
    let recorded = web
        .post(
            "/officer/record",
            &[
                ("csrf", &found.csrf()),
                ("registry", "ERN-EYE"),
                ("pseudonym", &pseudonym),
                ("scope", "recontact"),
                ("decision", "granted"),
                ("form_version", "v1"),
                ("given_at", &today),
                ("expires_at", &in_ten_days),
            ],
        )
        .await;
    assert_eq!(recorded.status, 200, "{}", recorded.body);
    let soon = web.get("/officer/expiring?days=30").await;
    assert_eq!(soon.status, 200);
    let (upcoming, expired) = soon.body.split_once("Expired in the last 90 days").unwrap();
    assert!(upcoming.contains(&pseudonym));
    assert!(!expired.contains(&pseudonym));
    let week = web.get("/officer/expiring?days=7").await;
    assert!(
        !week
            .body
            .split_once("Expired")
            .unwrap()
            .0
            .contains(&pseudonym)
    );
    app.clock.advance(Duration::days(11));
    next_step(&app);
    web.sign_in(&app, "officer-eye", &secret).await;
    let later = web.get("/officer/expiring").await;
    let (upcoming, expired) = later
        .body
        .split_once("Expired in the last 90 days")
        .unwrap();
    assert!(!upcoming.contains(&pseudonym));
    assert!(expired.contains(&pseudonym));
}

/// The (registry, pseudonym, scope, expiry) rows of an expiry list page, in order.
fn expiry_rows(body: &str) -> Vec<(String, String, String, String)> {
    let mut out = Vec::new();
    for row in body.split("<tr>").skip(1) {
        let cells: Vec<&str> = row
            .split("<td")
            .skip(1)
            .map(|c| {
                let c = &c[c.find('>').unwrap() + 1..];
                &c[..c.find("</td>").unwrap()]
            })
            .collect();
        if cells.len() >= 4 {
            out.push((
                cells[0].to_owned(),
                cells[1].to_owned(),
                cells[2].to_owned(),
                cells[3].to_owned(),
            ));
        }
    }
    out
}

/// The fields of the page's "next" form of an expiry list, if any.
fn next_form(body: &str) -> Option<Vec<(String, String)>> {
    let start = body.find("name=\"list\"")?;
    let form = &body[body[..start].rfind("<form")?..];
    let form = &form[..form.find("</form>")?];
    Some(
        form.split("<input")
            .skip(1)
            .map(|i| {
                let attr = |name: &str| {
                    let at = i.find(&format!("{name}=\"")).unwrap() + name.len() + 2;
                    i[at..].split('"').next().unwrap().to_owned()
                };
                (attr("name"), attr("value"))
            })
            .collect(),
    )
}

#[tokio::test]
async fn expiry_lists_come_in_pages_in_a_stable_order_across_registries() {
    let app = console_app(ServeArgs::default()).await;
    let secret = console_user(
        &app,
        "officer-two",
        Role::ConsentOfficer,
        None,
        &["ERN-EYE", "ERN-LUNG"],
    )
    .await;
    let mut physician = app.physician("dr-expiry", "NL-UMCU").await;
    // 230 research consents that expire: most at one and the same instant (ties the
    // order must break the same way on every page), the others a day apart.
    let tie = app.clock.now() + Duration::days(5);
    let mut expected = 0;
    for i in 0..230u32 {
        let registry = if i % 2 == 0 { "ERN-EYE" } else { "ERN-LUNG" };
        let mut request = submission(registry, national("NL", &bsn(5000 + i)));
        let expires = if i % 4 == 0 {
            tie + Duration::days(i64::from(i % 20))
        } else {
            tie
        };
        request.consent[1].expires_at =
            Some(ern_registry::api::convert::timestamp_to_proto(expires));
        physician.submit_case(request).await.unwrap();
        expected += 1;
    }
    let mut web = Web::new(app.console.unwrap());
    web.sign_in(&app, "officer-two", &secret).await;
    let first = web.get("/officer/expiring?days=30").await;
    assert_eq!(first.status, 200, "{}", first.body);
    let (soon, expired) = first
        .body
        .split_once("Expired in the last 90 days")
        .unwrap();
    assert!(expiry_rows(expired).is_empty());
    let mut seen = expiry_rows(soon);
    assert_eq!(seen.len(), 100, "a page holds 100 rows");
    let mut next = next_form(&first.body);
    let mut pages = 1;
    while let Some(fields) = next {
        let csrf = first.csrf();
        let mut body: Vec<(&str, &str)> = vec![("csrf", &csrf)];
        body.extend(
            fields
                .iter()
                .filter(|(k, _)| k != "csrf")
                .map(|(k, v)| (k.as_str(), v.as_str())),
        );
        let page = web.post("/officer/expiring", &body).await;
        assert_eq!(page.status, 200, "{}", page.body);
        let rows = expiry_rows(&page.body);
        assert!(rows.len() <= 100);
        seen.extend(rows);
        next = next_form(&page.body);
        pages += 1;
        assert!(pages < 10, "the pages do not end");
    }
    assert_eq!(pages, 3);
    assert_eq!(seen.len(), expected, "every row once");
    let distinct: std::collections::BTreeSet<_> = seen.iter().map(|r| (&r.0, &r.1)).collect();
    assert_eq!(distinct.len(), expected, "no row twice");
    let mut sorted = seen.clone();
    sorted.sort_by(|a, b| (&a.3, &a.0, &a.1).cmp(&(&b.3, &b.0, &b.1)));
    assert_eq!(
        seen.iter().map(|r| &r.3).collect::<Vec<_>>(),
        sorted.iter().map(|r| &r.3).collect::<Vec<_>>(),
        "soonest first"
    );
    assert!(seen.iter().any(|r| r.0 == "ERN-EYE") && seen.iter().any(|r| r.0 == "ERN-LUNG"));
    // No pseudonym in any URL: the next pages are POSTs.
    for url in &web.urls {
        assert!(seen.iter().all(|r| !url.contains(&r.1)), "{url}");
    }
    // A damaged page link is an error, not a list from somewhere.
    let damaged = web
        .post(
            "/officer/expiring",
            &[
                ("csrf", &first.csrf()),
                ("list", "soon"),
                ("after.expires_at", "x"),
            ],
        )
        .await;
    assert_eq!(damaged.status, 400);
}

#[tokio::test]
async fn wrong_role_and_wrong_ern_are_refused_page_by_page() {
    let app = console_app(ServeArgs::default()).await;
    let officer = console_user(
        &app,
        "officer-eye",
        Role::ConsentOfficer,
        None,
        &["ERN-EYE"],
    )
    .await;
    let researcher =
        console_user(&app, "researcher-eye", Role::Researcher, None, &["ERN-EYE"]).await;
    app.centre("NL-AMC", "NL", &["ERN-EYE"]).await;
    let physician = console_user(&app, "dr-eye", Role::Physician, Some("NL-AMC"), &[]).await;
    let addr = app.console.unwrap();

    let mut o = Web::new(addr);
    o.sign_in(&app, "officer-eye", &officer).await;
    assert_eq!(o.get("/research").await.status, 403);
    assert_eq!(o.get("/expertise").await.status, 403);
    assert_eq!(o.get("/cases").await.status, 403);
    let home = o.get("/home").await;
    // A registry of another ERN.
    let foreign = o
        .post(
            "/officer/patient",
            &[
                ("csrf", &home.csrf()),
                ("kind", "national"),
                ("registry", "ERN-LUNG"),
                ("national.issuing_country", "NL"),
                ("national.value", &bsn(5)),
            ],
        )
        .await;
    assert_eq!(foreign.status, 403, "{}", foreign.body);
    assert!(foreign.body.contains("ERN-LUNG"));
    let counted = o
        .post(
            "/research/count",
            &[("csrf", &home.csrf()), ("registry", "ERN-EYE")],
        )
        .await;
    assert_eq!(counted.status, 403);

    let mut r = Web::new(addr);
    r.sign_in(&app, "researcher-eye", &researcher).await;
    assert_eq!(r.get("/officer").await.status, 403);
    assert_eq!(r.get("/officer/receipt").await.status, 403);
    assert_eq!(r.get("/officer/expiring").await.status, 403);
    assert_eq!(r.get("/cases").await.status, 403);
    let home = r.get("/home").await;
    let withdraw = r
        .post(
            "/officer/withdraw",
            &[
                ("csrf", &home.csrf()),
                ("registry", "ERN-EYE"),
                ("pseudonym", "x"),
            ],
        )
        .await;
    assert_eq!(withdraw.status, 403);
    let lung = r
        .post(
            "/research/count",
            &[("csrf", &home.csrf()), ("registry", "ERN-LUNG")],
        )
        .await;
    assert_eq!(lung.status, 403);

    let mut p = Web::new(addr);
    p.sign_in(&app, "dr-eye", &physician).await;
    assert_eq!(p.get("/research").await.status, 403);
    assert_eq!(p.get("/officer").await.status, 403);
    assert_eq!(p.get("/expertise").await.status, 200);
    assert_eq!(p.get("/cases").await.status, 200);
}

/// `n` consented patients of ERN-EYE at centre NL-UMCU, submitted over gRPC: the
/// fixture's record, two in three female, diagnosed 6 months to 9 years after onset.
pub async fn cohort(app: &TestApp, n: u32) {
    let mut physician = app.physician("dr-cohort", "NL-UMCU").await;
    let diagnosed = [
        "2016-03-14",
        "2017-06-01",
        "2016-01-10",
        "2019-11-02",
        "2024-08-30",
    ];
    for i in 0..n {
        let mut request = submission("ERN-EYE", national("NL", &bsn(1000 + i)));
        let record = request.record.as_mut().unwrap();
        if i % 3 == 2 {
            record.sex = ern_registry::proto::Sex::Male as i32;
        }
        record.diagnosis_date = diagnosed[i as usize % diagnosed.len()].into();
        physician.submit_case(request).await.unwrap();
    }
}

#[tokio::test]
async fn a_researcher_sees_the_protection_level_in_force_beside_k() {
    let app = console_app(ServeArgs::default()).await;
    let secret = console_user(&app, "researcher-p", Role::Researcher, None, &["ERN-EYE"]).await;
    cohort(&app, 12).await;
    let master = MasterSecret::load(&app.dir.path().join("master.key")).unwrap();
    run_action(
        &app.store,
        &master,
        "admin-cli:test",
        AdminAction::SetProtectionLevel {
            registry: "ERN-EYE".into(),
            level: 3,
        },
    )
    .await
    .unwrap();
    let mut web = Web::new(app.console.unwrap());
    web.sign_in(&app, "researcher-p", &secret).await;
    let form = web.get("/research").await;
    let csrf = form.csrf();
    let ask = [
        ("csrf", csrf.as_str()),
        ("registry", "ERN-EYE"),
        ("group_by[0]", "SEX"),
    ];
    let table = web.post("/research/count", &ask).await;
    assert_eq!(table.status, 200, "{}", table.body);
    assert!(
        table
            .body
            .contains("k = <strong>5</strong>, p = <strong>3</strong>"),
        "{}",
        table.body
    );
    let delay = web.post("/research/delay", &ask).await;
    assert_eq!(delay.status, 200, "{}", delay.body);
    assert!(
        delay
            .body
            .contains("k = <strong>5</strong>, p = <strong>3</strong>"),
        "{}",
        delay.body
    );
    let csv = web.post("/research/count.csv", &ask).await;
    assert!(
        csv.body.starts_with("# registry ERN-EYE, k = 5, p = 3,"),
        "{}",
        csv.body
    );
    app.stop().await;
}

#[tokio::test]
async fn a_researcher_counts_downloads_csv_and_sees_the_delay_chart() {
    let app = console_app(ServeArgs::default()).await;
    let secret = console_user(&app, "researcher-eye", Role::Researcher, None, &["ERN-EYE"]).await;
    cohort(&app, 12).await;
    let mut web = Web::new(app.console.unwrap());
    web.sign_in(&app, "researcher-eye", &secret).await;
    let form = web.get("/research").await;
    assert_eq!(form.status, 200);
    let fields = [
        ("csrf", form.csrf()),
        ("registry", "ERN-EYE".into()),
        ("group_by[0]", "SEX".into()),
        ("group_by[1]", "COUNTRY".into()),
    ];
    let fields: Vec<(&str, &str)> = fields.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let table = web.post("/research/count", &fields).await;
    assert_eq!(table.status, 200, "{}", table.body);
    assert!(
        table
            .body
            .contains("k = <strong>5</strong>, p = <strong>1</strong>"),
        "{}",
        table.body
    );
    assert!(table.body.contains("as of"));
    assert!(table.body.contains("cells suppressed"));
    assert!(
        table
            .body
            .contains("when it counts between 1 and 4 patients")
    );
    assert!(
        table.body.contains(">12<"),
        "the grand total: {}",
        table.body
    );
    let csv = web.post("/research/count.csv", &fields).await;
    assert_eq!(csv.status, 200);
    assert!(
        csv.headers["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/csv")
    );
    assert!(
        csv.headers["content-disposition"]
            .to_str()
            .unwrap()
            .starts_with("attachment")
    );
    assert!(csv.body.starts_with("# registry ERN-EYE, k = 5, p = 1,"));
    assert!(
        csv.body.contains("\"SEX\",\"NL\",\"total\""),
        "{}",
        csv.body
    );
    // A table that matched nobody (no centre in Norway): no column, so no column total, as
    // the API answers it (a privacy audit of 2026-12-07 found a stray "0" under the one
    // header).
    let nobody = [
        ("csrf", form.csrf()),
        ("registry", "ERN-EYE".into()),
        ("group_by[0]", "SEX".into()),
        ("filters[0].dimension", "COUNTRY".into()),
        ("filters[0].values", "NO".into()),
    ];
    let nobody: Vec<(&str, &str)> = nobody.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let empty = web.post("/research/count.csv", &nobody).await;
    assert_eq!(empty.status, 200, "{}", empty.body);
    let lines: Vec<&str> = empty.body.lines().skip(1).collect();
    assert_eq!(
        lines,
        ["\"SEX\",\"count\"", "\"total\",0"],
        "{}",
        empty.body
    );
    let page = web.post("/research/count", &nobody).await;
    assert_eq!(page.status, 200, "{}", page.body);
    let total_row = page
        .body
        .split("<th scope=\"row\">total</th>")
        .nth(1)
        .unwrap();
    let total_row = &total_row[..total_row.find("</tr>").unwrap()];
    assert_eq!(total_row.matches("<td").count(), 1, "{}", page.body);
    let delay = web
        .post(
            "/research/delay",
            &[
                ("csrf", &form.csrf()),
                ("registry", "ERN-EYE"),
                ("group_by[0]", "SEX"),
            ],
        )
        .await;
    assert_eq!(delay.status, 200, "{}", delay.body);
    assert!(delay.body.contains("<svg"), "the chart is inline SVG");
    assert!(delay.body.contains("median"));
    // A malformed filter: the domain's message, next to the field.
    let bad = web
        .post(
            "/research/count",
            &[
                ("csrf", &form.csrf()),
                ("registry", "ERN-EYE"),
                ("group_by[0]", "SEX"),
                ("filters[0].dimension", "COUNTRY"),
                ("filters[0].values", "Netherlands"),
            ],
        )
        .await;
    assert_eq!(bad.status, 400);
    assert!(
        error_next_to(
            &bad,
            "filters[0].values",
            "is not an ISO 3166-1 alpha-2 country code"
        ),
        "{}",
        bad.body
    );
    // A field the form does not have, or one given twice, is refused rather than read
    // as far as the form goes (a privacy audit of 2026-12-07 posted a third filter and
    // was answered without it), for counts and delays alike.
    let csrf = form.csrf();
    let base = [
        ("csrf", csrf.as_str()),
        ("registry", "ERN-EYE"),
        ("filters[0].dimension", "SEX"),
        ("filters[0].values", "female"),
    ];
    // Names are the form's exactly: another spelling of an index (`filters[01]`, which
    // the re-check of that fix still got answered without it) or of a name is refused.
    let unknown = "does not have";
    for (extra, message) in [
        (
            [
                ("filters[2].dimension", "COUNTRY"),
                ("filters[2].values", "NL"),
            ],
            unknown,
        ),
        (
            [
                ("filters[1].dimension", "COUNTRY"),
                ("filters[1].valuez", "NL"),
            ],
            unknown,
        ),
        (
            [
                ("filters[01].dimension", "COUNTRY"),
                ("filters[01].values", "NL"),
            ],
            unknown,
        ),
        (
            [
                ("filters[+1].dimension", "COUNTRY"),
                ("filters[+1].values", "NL"),
            ],
            unknown,
        ),
        (
            [
                ("Filters[1].dimension", "COUNTRY"),
                ("Filters[1].values", "NL"),
            ],
            unknown,
        ),
        ([("group_by[00]", "SEX"), ("", "")], unknown),
        ([("registry ", "ERN-EYE"), ("group_by[0]", "SEX")], unknown),
        (
            [("group_by[0]", "SEX"), ("group_by[9]", "COUNTRY")],
            unknown,
        ),
        (
            [("group_by[0]", "SEX"), ("group_by[0]", "COUNTRY")],
            "given twice",
        ),
        (
            [("filters[0].values", "male"), ("group_by[0]", "COUNTRY")],
            "given twice",
        ),
    ] {
        let fields: Vec<(&str, &str)> = base.iter().chain(&extra).copied().collect();
        for path in ["/research/count", "/research/count.csv", "/research/delay"] {
            let refused = web.post(path, &fields).await;
            assert_eq!(refused.status, 400, "{path} {extra:?}: {}", refused.body);
            assert!(
                refused.body.contains(message),
                "{path} {extra:?}: {}",
                refused.body
            );
        }
    }
    // The delay takes three dimensions: a fourth is refused there, but the form's own
    // fourth select, left empty, is what a browser posts with it.
    let four = [("group_by[0]", "SEX"), ("group_by[3]", "COUNTRY")];
    let fields: Vec<(&str, &str)> = base.iter().chain(&four).copied().collect();
    let refused = web.post("/research/delay", &fields).await;
    assert_eq!(refused.status, 400, "{}", refused.body);
    assert!(
        refused.body.contains("at most 3 dimensions"),
        "{}",
        refused.body
    );
    assert_eq!(web.post("/research/count", &fields).await.status, 200);
    let empty_fourth = [("group_by[0]", "SEX"), ("group_by[3]", "")];
    let fields: Vec<(&str, &str)> = base.iter().chain(&empty_fourth).copied().collect();
    let delay = web.post("/research/delay", &fields).await;
    assert_eq!(delay.status, 200, "{}", delay.body);
    let audited: i64 = db::query(
        "SELECT COUNT(*) FROM audit_log WHERE principal = 'researcher-eye' AND method = 'Console/CountPatients' AND outcome = 'OK'",
    )
    .fetch_scalar(app.store.pool())
    .await
    .unwrap();
    // The two tables above, the two of the table that matched nobody, and the table of
    // four dimensions.
    assert_eq!(audited, 5);
}

#[tokio::test]
async fn small_counts_show_as_suppressed() {
    let app = console_app(ServeArgs::default()).await;
    let secret = console_user(&app, "researcher-eye", Role::Researcher, None, &["ERN-EYE"]).await;
    cohort(&app, 3).await;
    let mut web = Web::new(app.console.unwrap());
    web.sign_in(&app, "researcher-eye", &secret).await;
    let form = web.get("/research").await;
    let table = web
        .post(
            "/research/count",
            &[
                ("csrf", &form.csrf()),
                ("registry", "ERN-EYE"),
                ("group_by[0]", "SEX"),
            ],
        )
        .await;
    assert_eq!(table.status, 200);
    assert!(
        table.body.contains("class=\"suppressed\""),
        "{}",
        table.body
    );
    for n in 1..=4 {
        assert!(
            !table.body.contains(&format!("<td class=\"num\">{n}</td>")),
            "{n} shown"
        );
    }
}

#[tokio::test]
async fn physicians_and_researchers_find_the_expertise_in_bands() {
    let app = console_app(ServeArgs::default()).await;
    app.centre("NL-AMC", "NL", &["ERN-EYE"]).await;
    let secret = console_user(&app, "dr-eye", Role::Physician, Some("NL-AMC"), &[]).await;
    cohort(&app, 6).await;
    let mut web = Web::new(app.console.unwrap());
    web.sign_in(&app, "dr-eye", &secret).await;
    let form = web.get("/expertise").await;
    let found = web
        .post(
            "/expertise",
            &[("csrf", &form.csrf()), ("orphacodes", "ORPHA:586")],
        )
        .await;
    assert_eq!(found.status, 200, "{}", found.body);
    assert!(found.body.contains("NL-UMCU"));
    assert!(found.body.contains("<h2>NL</h2>"));
    let bad = web
        .post(
            "/expertise",
            &[("csrf", &form.csrf()), ("orphacodes", "586")],
        )
        .await;
    assert_eq!(bad.status, 400);
    assert!(error_next_to(&bad, "orphacodes", "Orphacode"));
    // gRPC's bounds: not the code of undiagnosed cases, at most 20 codes (repeats count once).
    let undiagnosed = web
        .post(
            "/expertise",
            &[("csrf", &form.csrf()), ("orphacodes", "ORPHA:616874")],
        )
        .await;
    assert_eq!(undiagnosed.status, 400);
    assert!(error_next_to(&undiagnosed, "orphacodes", "undiagnosed"));
    let many: Vec<String> = (1..=21).map(|n| format!("ORPHA:{n}")).collect();
    let too_many = web
        .post(
            "/expertise",
            &[("csrf", &form.csrf()), ("orphacodes", &many.join(","))],
        )
        .await;
    assert_eq!(too_many.status, 400);
    assert!(error_next_to(&too_many, "orphacodes", "1 to 20"));
    let repeated = vec!["ORPHA:586"; 30].join(",");
    let once = web
        .post(
            "/expertise",
            &[("csrf", &form.csrf()), ("orphacodes", &repeated)],
        )
        .await;
    assert_eq!(once.status, 200, "{}", once.body);
}

#[tokio::test]
async fn the_admin_command_line_sets_a_password_and_enrols_totp_with_a_qr_code() {
    use std::io::Write;
    use std::process::{Command, Stdio};
    let app = console_app(ServeArgs::default()).await;
    app.store
        .create_principal(
            "officer-cli",
            Role::ConsentOfficer,
            None,
            &["ERN-EYE".into()],
        )
        .await
        .unwrap();
    let admin = |args: &[&str]| {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_ern-registry"));
        cmd.args(["--database-url", &app.database_url, "admin"])
            .args(args)
            .arg("--master-key-file")
            .arg(app.dir.path().join("master.key"))
            .env_remove("ERN_MASTER_KEY_FILE")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        cmd
    };
    // Too short: refused, and the refusal is audited.
    let mut short = admin(&["set-password", "--principal", "officer-cli"])
        .spawn()
        .unwrap();
    short.stdin.take().unwrap().write_all(b"short\n").unwrap();
    let out = short.wait_with_output().unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("at least 12 characters"));
    let mut set = admin(&["set-password", "--principal", "officer-cli"])
        .spawn()
        .unwrap();
    set.stdin
        .take()
        .unwrap()
        .write_all(format!("{PASSWORD}\n").as_bytes())
        .unwrap();
    let out = set.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = admin(&["enrol-totp", "--principal", "officer-cli"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    let uri = stdout
        .lines()
        .find_map(|l| l.strip_prefix("otpauth URI (shown once): "))
        .unwrap();
    assert!(
        stdout.contains('█') || stdout.contains('▀'),
        "a terminal QR code: {stdout}"
    );
    let secret = secret_of_uri(uri).unwrap();
    let mut web = Web::new(app.console.unwrap());
    assert_eq!(web.sign_in(&app, "officer-cli", &secret).await.status, 303);
    assert_eq!(web.get("/home").await.status, 200);
    // A new second factor ends the sessions signed in with the old one.
    let out = admin(&["enrol-totp", "--principal", "officer-cli"])
        .output()
        .unwrap();
    assert!(out.status.success());
    assert_eq!(web.get("/home").await.status, 303);
    let stdout = String::from_utf8_lossy(&out.stdout);
    let uri = stdout
        .lines()
        .find_map(|l| l.strip_prefix("otpauth URI (shown once): "))
        .unwrap();
    let secret = secret_of_uri(uri).unwrap();
    let actions: Vec<(String, String)> = app.pairs("SELECT method, outcome FROM audit_log WHERE target = 'principal officer-cli' ORDER BY seq").await;
    assert_eq!(
        actions,
        [
            (
                "AdminCli/SetPassword".to_string(),
                "INVALID_ARGUMENT".to_string()
            ),
            ("AdminCli/SetPassword".into(), "OK".into()),
            ("AdminCli/EnrolTotp".into(), "OK".into()),
            ("AdminCli/EnrolTotp".into(), "OK".into()),
        ]
    );
    // The stored hash is Argon2id; the TOTP secret is sealed (not its base32 text).
    let row = db::query("SELECT password_hash, totp_sealed FROM console_credentials")
        .fetch_one(app.store.pool())
        .await
        .unwrap();
    let (hash, sealed): (String, String) = (row.get(0), row.get(1));
    assert!(hash.starts_with("$argon2id$"));
    let base32 = uri
        .split("secret=")
        .nth(1)
        .unwrap()
        .split('&')
        .next()
        .unwrap();
    assert!(!sealed.contains(base32) && !sealed.contains(&hex::encode(&secret)));
}

#[tokio::test]
async fn a_physician_reads_their_centres_case_by_pseudonym_and_no_other() {
    let app = console_app(ServeArgs::default()).await;
    let mut physician = app.physician("dr-grpc", "NL-AMC").await;
    let submitted = physician
        .submit_case(submission("ERN-EYE", national("NL", &bsn(9))))
        .await
        .unwrap()
        .into_inner();
    let mine = console_user(&app, "dr-web", Role::Physician, Some("NL-AMC"), &[]).await;
    app.centre("DE-CHA", "DE", &["ERN-EYE"]).await;
    let theirs = console_user(&app, "dr-other", Role::Physician, Some("DE-CHA"), &[]).await;
    let read = |name: &'static str, secret: Vec<u8>| {
        let app = &app;
        let pseudonym = submitted.pseudonym.clone();
        async move {
            let mut web = Web::new(app.console.unwrap());
            web.sign_in(app, name, &secret).await;
            let form = web.get("/cases").await;
            assert_eq!(form.status, 200);
            web.post(
                "/cases",
                &[
                    ("csrf", &form.csrf()),
                    ("registry", "ERN-EYE"),
                    ("pseudonym", &pseudonym),
                ],
            )
            .await
        }
    };
    let page = read("dr-web", mine).await;
    assert_eq!(page.status, 200, "{}", page.body);
    assert!(page.body.contains("ORPHA:586") && page.body.contains("CFTR"));
    let other = read("dr-other", theirs).await;
    assert_eq!(other.status, 404, "{}", other.body);
    assert!(!other.body.contains("ORPHA:586"));
}

/// A console request whose handler is dropped before it concludes (the browser closed
/// the connection) is audited, CANCELLED, as a gRPC call is. Here the handler waits with
/// its change for room in a full writer queue (an overload; the writer is held, with one
/// command in its transaction and one in its queue of one): the change never got room,
/// so the decision is not recorded, and the request's entry says CANCELLED. PostgreSQL
/// only: on SQLite the lock that holds the writer holds the session's own write (its
/// last-seen time) too, so the request would wait there, before its place among its
/// principal's calls (and be counted in the address's summary, as a gRPC call waiting
/// for its place is).
#[tokio::test]
async fn a_console_request_abandoned_mid_way_is_audited_as_cancelled() {
    use tokio::io::AsyncWriteExt;
    let (app, mut web, secret) = officer_app_with(ServeArgs {
        writers: Some(1),
        writer_queue: 1,
        ..ServeArgs::default()
    })
    .await;
    if app.is_sqlite() {
        eprintln!("skipped on SQLite: the lock that holds the writer holds the session's write");
        return;
    }
    let physician = app.physician("dr-eye", "NL-AMC").await;
    web.sign_in(&app, "officer-eye", &secret).await;
    let (found, pseudonym) = web.find_by_bsn("ERN-EYE", &bsn(4242)).await;
    let read = || get_case("ERN-EYE", "R012-V001-AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA");
    // The physician's key known to the process: its calls write nothing but their entry.
    let status = physician.clone().get_case(read()).await.unwrap_err();
    assert_eq!(status.code(), tonic::Code::InvalidArgument, "{status:?}");

    let writer = HeldWriter::hold(&app).await;
    let held = writer
        .fill(&app, || {
            let mut client = physician.clone();
            async move { client.get_case(read()).await }
        })
        .await;
    let today = app.clock.now().format("%Y-%m-%d").to_string();
    let body = url::form_urlencoded::Serializer::new(String::new())
        .extend_pairs([
            ("csrf", found.csrf().as_str()),
            ("registry", "ERN-EYE"),
            ("pseudonym", &pseudonym),
            ("scope", "registry_inclusion"),
            ("decision", "granted"),
            ("form_version", "v2"),
            ("given_at", &today),
        ])
        .finish();
    let cookie = web
        .cookies
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join("; ");
    let signed_in_at = app.clock.now();
    app.clock.advance(Duration::seconds(1));
    let mut browser = tokio::net::TcpStream::connect(app.console.unwrap())
        .await
        .unwrap();
    browser
        .write_all(
            format!(
                "POST /officer/record HTTP/1.1\r\nhost: localhost\r\ncookie: {cookie}\r\n\
                 content-type: application/x-www-form-urlencoded\r\ncontent-length: {}\r\n\r\n{body}",
                body.len()
            )
            .as_bytes(),
        )
        .await
        .unwrap();
    // The handler waits for room once its session is checked (its last-seen time
    // written, at the clock moved on a second), then the browser goes.
    for _ in 0..200 {
        let touched: i64 =
            db::query("SELECT COUNT(*) FROM console_sessions WHERE last_seen_at > $1")
                .bind(signed_in_at)
                .fetch_one(app.store.pool())
                .await
                .unwrap()
                .get(0);
        if touched == 1 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    drop(browser);
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    writer.release().await;
    for call in held {
        let status = call.await.unwrap().unwrap_err();
        assert_eq!(status.code(), tonic::Code::InvalidArgument, "{status:?}");
    }
    let mut outcomes = Vec::new();
    for _ in 0..100 {
        outcomes = db::query(
            "SELECT outcome FROM audit_log \
             WHERE principal = 'officer-eye' AND method = 'Console/RecordConsent'",
        )
        .fetch_all(app.store.pool())
        .await
        .unwrap()
        .iter()
        .map(|r| r.get::<String>(0))
        .collect::<Vec<_>>();
        if !outcomes.is_empty() {
            break;
        }
        // Appended by a task of its own once the handler is dropped: wait for it.
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    assert_eq!(outcomes, ["CANCELLED"]);
    let events: i64 = db::query("SELECT COUNT(*) FROM consent_events")
        .fetch_one(app.store.pool())
        .await
        .unwrap()
        .get(0);
    assert_eq!(events, 0, "the abandoned decision was not recorded");
}

/// The console's connections are capped, from everyone together (past the cap a
/// connection is closed at once, and gRPC is served meanwhile: its descriptors are not
/// the console's to take); a connection that sends no headers in time is closed, and a
/// request whose body does not come in time is answered 503.
#[tokio::test]
async fn console_connections_are_capped_and_slow_clients_cut_off() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let closed_within = |mut tcp: tokio::net::TcpStream, secs: u64| async move {
        let mut buf = [0u8; 4096];
        let read = tokio::time::timeout(std::time::Duration::from_secs(secs), async {
            loop {
                match tcp.read(&mut buf).await {
                    Ok(0) | Err(_) => return,
                    Ok(_) => {}
                }
            }
        })
        .await;
        read.is_ok()
    };
    // The cap, with a header timeout long enough to tell it apart.
    let app = console_app(ServeArgs {
        console_max_connections: 3,
        console_header_timeout_secs: 600,
        ..ServeArgs::default()
    })
    .await;
    let addr = app.console.unwrap();
    let mut held = Vec::new();
    for _ in 0..3 {
        let mut tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
        tcp.write_all(b"GET /sign-in HTTP/1.1\r\nHost: x\r\n")
            .await
            .unwrap();
        held.push(tcp);
    }
    // Each is admitted before the next arrives: a request on the third's way is taken.
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    let fourth = tokio::net::TcpStream::connect(addr).await.unwrap();
    assert!(
        closed_within(fourth, 10).await,
        "a connection past the cap was kept open"
    );
    app.client(None)
        .await
        .get_case(get_case(
            "ERN-LUNG",
            "R013-V001-AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA",
        ))
        .await
        .expect_err("no key: refused, but served");
    // A place comes back when a connection closes.
    held.pop();
    let mut answered = false;
    for _ in 0..50 {
        let mut web = Web::new(addr);
        if tokio::time::timeout(std::time::Duration::from_secs(2), web.get("/sign-in"))
            .await
            .is_ok_and(|page| page.status == 200)
        {
            answered = true;
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    assert!(answered, "no place came back");
    drop(held);

    // Slow clients.
    let app = console_app(ServeArgs {
        console_header_timeout_secs: 1,
        request_timeout_secs: 1,
        ..ServeArgs::default()
    })
    .await;
    let addr = app.console.unwrap();
    let mut tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    tcp.write_all(b"GET /sign-in HTTP/1.1\r\nHost: x\r\n")
        .await
        .unwrap();
    assert!(
        closed_within(tcp, 20).await,
        "a connection that never finished its headers was kept open"
    );
    let mut tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    tcp.write_all(
        b"POST /sign-in HTTP/1.1\r\nHost: x\r\nContent-Type: application/x-www-form-urlencoded\r\nContent-Length: 100\r\n\r\nname=a",
    )
    .await
    .unwrap();
    let mut answer = Vec::new();
    let read = tokio::time::timeout(
        std::time::Duration::from_secs(20),
        tcp.read_to_end(&mut answer),
    )
    .await;
    assert!(
        read.is_ok(),
        "a request whose body never came was not answered"
    );
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 503"), "{answer}");
}
