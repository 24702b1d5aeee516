//! The web console: server-rendered HTML (maud) over HTTP/1.1 (axum), for the people who
//! are not programmers: consent officers, researchers and physicians.
//!
//! It owns HTTP only: cookies, the CSRF check of every form, the security headers, form
//! parsing and the pages. Every rule is the service layer's: a session yields a
//! [`Principal`] (`service::console::session`), and each page calls the use case gRPC
//! calls (`service::consent`, `service::research`), inside a [`Call`] that is audited
//! the same way (`Console/<Action>` entries). No SQL and no policy here.
//!
//! Why this shape:
//! - **No JavaScript.** Every page works with plain HTML forms; charts are SVG drawn on
//!   the server (plotters). The Content-Security-Policy allows no script at all.
//! - **POST for anything about a patient.** Identifiers, pseudonyms and receipt ids travel
//!   in form bodies only, never in a URL (which browsers keep in history and servers and
//!   proxies log); pages that show them are `no-store`.
//! - **Cookies**: `__Host-` prefixed (no Domain, Path=/, Secure), HttpOnly,
//!   SameSite=Strict; the session's token only, never who it is.

mod chart;
mod pages;

use std::net::SocketAddr;
use std::sync::Arc;

use axum::Router;
use axum::body::Bytes;
use axum::extract::{ConnectInfo, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Redirect, Response};
use axum::routing::{get, post};
use chrono::{DateTime, NaiveDate, Utc};
use maud::Markup;
use secrecy::{ExposeSecret, SecretString};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tracing::{info, warn};
use zeroize::Zeroizing;

use crate::aggregate::{Dimension, Filter, Key, MAX_COUNT_DIMENSIONS, MAX_DELAY_DIMENSIONS};
use crate::auth::{AuthError, Principal};
use crate::connections::{ConnectionLimits, Connections, Listener};
use crate::consent::{self, AttestationItem, Decision, Scope};
use crate::domain::{CodeCatalog, CodeSystem};
use crate::domain::{FieldViolations, HpoTerm, Orphacode};
use crate::outcome::Outcome;
use crate::pseudonym::{DemographicInput, IdentifiersInput, NationalInput, PatientIdentity};
use crate::ratelimit::Peer;
use crate::service::consent as consent_service;
use crate::service::console::{self as console_service, SignIn};
use crate::service::research;
use crate::service::{Call, Running, ServiceError, Services, parse_pseudonym};
use crate::store::consent::WithdrawalReason;
use crate::store::writer::WriteError;

pub use pages::Errors;

/// The session cookie: the token only.
pub const SESSION_COOKIE: &str = "__Host-ern-session";
/// The pre-session cookie the sign-in form's CSRF token is bound to.
pub const PRE_COOKIE: &str = "__Host-ern-pre";
/// The Content-Security-Policy of every response.
pub const CSP: &str = "default-src 'none'; style-src 'self'; img-src 'self'; form-action 'self'; \
                       frame-ancestors 'none'; base-uri 'none'";
/// Most bytes of a form body.
const MAX_FORM_BYTES: usize = 64 * 1024;

type St = Arc<Services>;

/// The console's routes over the services.
pub fn router(services: Arc<Services>) -> Router {
    Router::new()
        .route("/console.css", get(stylesheet))
        .route("/", get(|| async { Redirect::to("/home") }))
        .route("/sign-in", get(sign_in_page).post(sign_in))
        .route("/sign-out", post(sign_out))
        .route("/home", get(home))
        .route("/officer", get(officer_find_page))
        .route("/officer/patient", post(officer_patient))
        .route("/officer/record", post(officer_record))
        .route("/officer/withdraw", post(officer_withdraw))
        .route("/officer/receipt", get(receipt_page).post(receipt_lookup))
        .route(
            "/officer/expiring",
            get(officer_expiring).post(officer_expiring_next),
        )
        .route("/research", get(research_page))
        .route("/research/count", post(research_count))
        .route("/research/count.csv", post(research_count_csv))
        .route("/research/delay", post(research_delay))
        .route("/expertise", get(expertise_page).post(expertise))
        .route("/cases", get(cases_page).post(case_read))
        .fallback(|| async {
            (
                StatusCode::NOT_FOUND,
                pages::message("Not found", "There is no such page."),
            )
        })
        .layer(axum::extract::DefaultBodyLimit::max(MAX_FORM_BYTES))
        .layer(middleware::from_fn(security_headers))
        .with_state(services)
}

/// The console's own limits.
#[derive(Debug, Clone, Copy)]
pub struct ConsoleLimits {
    /// Connections open at once (`--console-max-connections`).
    pub max_connections: usize,
    /// A request not answered within it is answered 503 (`--request-timeout-secs`).
    pub request_timeout: std::time::Duration,
    /// A connection that sends no request's headers within it (idle between requests
    /// included) is closed (`--console-header-timeout-secs`).
    pub header_timeout: std::time::Duration,
}

/// Binds the console's listener: plain HTTP, so on loopback only unless `allow_plaintext`
/// (a TLS-terminating proxy in front).
pub async fn bind(addr: SocketAddr, allow_plaintext: bool) -> Result<TcpListener, String> {
    check_address(addr, allow_plaintext)?;
    TcpListener::bind(addr)
        .await
        .map_err(|e| format!("cannot listen on {addr} for the console: {e}"))
}

/// Refuses a console address that is not loopback unless `allow_plaintext` (the console
/// is plain HTTP: a TLS-terminating proxy must be in front).
pub fn check_address(addr: SocketAddr, allow_plaintext: bool) -> Result<(), String> {
    if !addr.ip().is_loopback() && !allow_plaintext {
        return Err(format!(
            "refusing the plain-HTTP web console on {addr}, which is not a loopback address: put \
             a TLS-terminating proxy in front and set --allow-plaintext"
        ));
    }
    Ok(())
}

/// Serves the console on `listener` until `stopping` turns true (then lets requests in
/// flight finish).
pub async fn serve(
    listener: TcpListener,
    services: Arc<Services>,
    limits: ConsoleLimits,
    mut stopping: watch::Receiver<bool>,
    deadline: watch::Receiver<bool>,
) {
    let addr = listener.local_addr().ok();
    info!(?addr, "serving the web console");
    let admitted = Connections::of(
        Listener::Console,
        ConnectionLimits {
            max_connections: limits.max_connections,
            // Behind the proxy every user has its address: one cap for all.
            max_per_peer: limits.max_connections,
            // Between requests, hyper's header timeout closes an idle connection.
            idle_timeout: None,
            // Used by the gRPC listener's layers only, which the console does not install
            // (HTTP/1.1: one request at a time per connection, the next not read while
            // an answer waits).
            max_unread_per_peer: None,
            max_unread_all: None,
            max_reflection_per_peer: None,
            // Its users sign in per request (a session cookie), not per connection.
            evict_without_key: false,
        },
    );
    // A request not answered in time (a slow body, a slow database) is answered 503
    // and its handler dropped, as gRPC's deadline ends a call.
    let request_timeout = limits.request_timeout;
    let timed = middleware::from_fn(
        move |request: axum::extract::Request, next: Next| async move {
            match tokio::time::timeout(request_timeout, next.run(request)).await {
                Ok(response) => response,
                Err(_) => (
                    StatusCode::SERVICE_UNAVAILABLE,
                    format!(
                        "the request was not answered within {} s; try again",
                        request_timeout.as_secs()
                    ),
                )
                    .into_response(),
            }
        },
    );
    // At the shutdown deadline (gRPC's: the grace after the signal), a request still
    // running is answered 503 and its handler dropped, as gRPC's calls are ended then.
    let cut_off = middleware::from_fn(move |request: axum::extract::Request, next: Next| {
        let mut deadline = deadline.clone();
        async move {
            let passes = async move {
                // The sender goes when gRPC has stopped, which may be before the deadline
                // (no connection left): then `startup` bounds the wait instead.
                if deadline.wait_for(|passed| *passed).await.is_err() {
                    std::future::pending::<()>().await;
                }
            };
            tokio::select! {
                response = next.run(request) => response,
                () = passes => (
                    StatusCode::SERVICE_UNAVAILABLE,
                    "the server is shutting down; try again in a moment",
                )
                    .into_response(),
            }
        }
    });
    let app = router(services)
        .layer(timed)
        .layer(cut_off)
        // The 503 above carries them too.
        .layer(middleware::from_fn(security_headers));
    // HTTP/1.1 only, one request at a time per connection: a request whose client goes
    // away ends with its connection (`docs/console.md`, sign-in). axum's `serve` would
    // also answer cleartext HTTP/2, where one connection runs many requests and resets
    // each at no cost.
    let connections = hyper_util::server::graceful::GracefulShutdown::new();
    // Owned here: aborting this task (`startup`, past the shutdown's limit) ends every
    // connection with it, so no request outlives it.
    let mut tasks = tokio::task::JoinSet::new();
    let mut shutdown = std::pin::pin!(async move {
        let _ = stopping.wait_for(|s| *s).await;
    });
    loop {
        let stream = tokio::select! {
            biased;
            () = &mut shutdown => break,
            // Reaps the connections that ended.
            Some(_) = tasks.join_next(), if !tasks.is_empty() => continue,
            // Past the cap a connection is closed at once; out of file descriptors,
            // accepting pauses (`connections`).
            stream = admitted.accept(&listener) => stream,
        };
        let Some(peer) = stream.remote() else {
            continue;
        };
        let app = app.clone();
        let service = hyper::service::service_fn(
            move |mut request: axum::http::Request<hyper::body::Incoming>| {
                request.extensions_mut().insert(ConnectInfo(peer));
                // A router is always ready.
                tower_service::Service::call(&mut app.clone(), request)
            },
        );
        // A request's headers (the first, or the next on a kept-alive connection) must
        // arrive within the header timeout; its body within the request timeout (`timed`).
        let connection = hyper::server::conn::http1::Builder::new()
            .timer(hyper_util::rt::TokioTimer::new())
            .header_read_timeout(limits.header_timeout)
            .serve_connection(hyper_util::rt::TokioIo::new(stream), service);
        let connection = connections.watch(connection);
        tasks.spawn(async move {
            if let Err(e) = connection.await {
                tracing::debug!(error = %e, "a web console connection ended with an error");
            }
        });
    }
    // No new connections; requests in flight finish, idle connections close.
    drop(listener);
    connections.shutdown().await;
    while tasks.join_next().await.is_some() {}
}

async fn security_headers(request: axum::extract::Request, next: Next) -> Response {
    let is_css = request.uri().path() == "/console.css";
    let mut response = next.run(request).await;
    let h = response.headers_mut();
    let set = |h: &mut HeaderMap, name: header::HeaderName, value: &'static str| {
        h.insert(name, HeaderValue::from_static(value));
    };
    set(h, header::CONTENT_SECURITY_POLICY, CSP);
    set(h, header::X_FRAME_OPTIONS, "DENY");
    set(h, header::REFERRER_POLICY, "no-referrer");
    set(h, header::X_CONTENT_TYPE_OPTIONS, "nosniff");
    set(
        h,
        header::HeaderName::from_static("cross-origin-opener-policy"),
        "same-origin",
    );
    set(
        h,
        header::HeaderName::from_static("cross-origin-resource-policy"),
        "same-origin",
    );
    set(
        h,
        header::CACHE_CONTROL,
        if is_css { "max-age=300" } else { "no-store" },
    );
    response
}

async fn stylesheet() -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, "text/css; charset=utf-8")],
        include_str!("console.css"),
    )
}

// ----- Forms and cookies -----

/// A parsed form body. Values are wiped when dropped (identifiers pass through here).
pub struct Form(Vec<(String, Zeroizing<String>)>);

impl Form {
    fn parse(body: &[u8]) -> Form {
        Form(
            url::form_urlencoded::parse(body)
                .map(|(k, v)| (k.into_owned(), Zeroizing::new(v.into_owned())))
                .collect(),
        )
    }

    /// The value of `name` (the first), trimmed; "" when absent.
    pub fn get(&self, name: &str) -> &str {
        self.0
            .iter()
            .find(|(k, _)| k == name)
            .map_or("", |(_, v)| v.trim())
    }

    /// The value of `name` (the first) as sent, untrimmed: a password, whose spaces are
    /// part of it (`admin set-password` keeps them); "" when absent.
    fn raw(&self, name: &str) -> &str {
        self.0
            .iter()
            .find(|(k, _)| k == name)
            .map_or("", |(_, v)| v.as_str())
    }

    fn has(&self, name: &str) -> bool {
        !self.get(name).is_empty()
    }

    /// Every field as sent (name and value), in order, repeated ones as often as sent.
    fn fields(&self) -> impl Iterator<Item = (&str, &str)> {
        self.0.iter().map(|(k, v)| (k.as_str(), v.as_str()))
    }

    /// The form without the fields whose names `drop` accepts (to repeat it in hidden
    /// fields).
    /// The values are copies, wiped on drop like the form's own.
    fn hidden_except(&self, drop: impl Fn(&str) -> bool) -> Vec<(String, Zeroizing<String>)> {
        self.0
            .iter()
            .filter(|(k, _)| !drop(k))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect()
    }
}

fn cookie<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .find_map(|kv| {
            let (k, v) = kv.trim().split_once('=')?;
            (k == name).then_some(v)
        })
}

fn set_cookie(name: &str, value: &str, max_age: Option<i64>) -> HeaderValue {
    let age = max_age.map_or(String::new(), |s| format!("; Max-Age={s}"));
    HeaderValue::from_str(&format!(
        "{name}={value}; Path=/; Secure; HttpOnly; SameSite=Strict{age}"
    ))
    .expect("cookie text is ASCII")
}

// ----- Sessions -----

/// A signed-in request: who, the session's token (for CSRF) and the audited call. The
/// call is under a [`Running`] guard: a request whose handler is dropped before it
/// concludes (its connection closed, the server's shutdown cut it off) is recorded as
/// CANCELLED, as a gRPC call is.
pub struct Ctx {
    pub principal: Principal,
    token: Zeroizing<String>,
    pub csrf: String,
    call: Running,
}

impl Ctx {
    /// A page that only shows an empty form: not audited (docs/console.md).
    fn unaudited(&mut self) {
        self.call.disarm();
    }
}

/// Authenticates the request by its session cookie, in a call named `Console/<action>`.
async fn signed_in(
    st: &St,
    headers: &HeaderMap,
    peer: SocketAddr,
    action: &str,
) -> Result<Ctx, Response> {
    let mut call = Running::console(st, Call::new(&format!("Console/{action}")));
    let token = Zeroizing::new(cookie(headers, SESSION_COOKIE).unwrap_or("").to_owned());
    match console_service::session(st, &token, Peer::of(Some(peer)), call.call()).await {
        Ok(principal) => Ok(Ctx {
            csrf: st.console.csrf_token(&token),
            principal,
            token,
            call,
        }),
        Err(err) => {
            let outcome = err.outcome();
            let _ = record(st, call.finish(), outcome).await;
            Err(match err {
                ServiceError::Auth(AuthError::NoSession) => {
                    Redirect::to("/sign-in").into_response()
                }
                ServiceError::Auth(AuthError::SessionExpired) => {
                    sign_in_form(st, StatusCode::UNAUTHORIZED, Some(&err.to_string()), "")
                }
                other => error_page(&other),
            })
        }
    }
}

/// A signed-in POST: the session, then the form's CSRF token.
async fn signed_in_form(
    st: &St,
    headers: &HeaderMap,
    peer: SocketAddr,
    action: &str,
    body: &Bytes,
) -> Result<(Ctx, Form), Response> {
    let ctx = signed_in(st, headers, peer, action).await?;
    let form = Form::parse(body);
    if !st.console.csrf_valid(&ctx.token, form.get("csrf")) {
        warn!(
            principal = ctx.principal.id,
            action, "console form refused: CSRF token missing or wrong"
        );
        let _ = record(st, ctx.call.finish(), Outcome::PermissionDenied).await;
        return Err((
            StatusCode::FORBIDDEN,
            pages::message(
                "Form refused",
                "This form did not come from this console session (its security token is missing or wrong). Go back, reload the page and try again.",
            ),
        )
            .into_response());
    }
    Ok((ctx, form))
}

/// Appends a console request's audit entry ([`Services::record`]: one by one, or in its
/// address's summary of refusals for a caller not signed in) and counts it in
/// `ern_console_requests_total` with its outcome: every request that is audited is
/// counted, sign-ins and refused forms included. (One abandoned before its entry is
/// counted CANCELLED by its [`Running`] guard.)
async fn record(st: &St, call: Call, outcome: Outcome) -> Result<(), WriteError> {
    metrics::counter!("ern_console_requests_total", "action" => call.method().to_owned(), "outcome" => outcome.name())
        .increment(1);
    st.record(call, outcome).await
}

/// Records the call's audit entry with the page's outcome and answers the page (or, when
/// the entry cannot be committed, an error: nothing is shown that the log does not show).
async fn conclude(st: &St, call: Call, result: Result<Response, ServiceError>) -> Response {
    let outcome = result
        .as_ref()
        .map_or_else(ServiceError::outcome, |_| Outcome::Ok);
    match (record(st, call, outcome).await, result) {
        (Ok(()), Ok(page)) => page,
        (Err(_), Ok(_)) => error_page(&ServiceError::Unavailable),
        (_, Err(err)) => error_page(&err),
    }
}

/// [`conclude`] for a form refused as invalid, answered with `page` (the form again, its
/// errors next to the fields): shown only once its entry is committed, like any page.
async fn conclude_invalid(st: &St, call: Call, page: Response) -> Response {
    match record(st, call, Outcome::InvalidArgument).await {
        Ok(()) => page,
        Err(_) => error_page(&ServiceError::Unavailable),
    }
}

fn status_of(outcome: Outcome) -> StatusCode {
    match outcome {
        Outcome::Ok => StatusCode::OK,
        Outcome::InvalidArgument => StatusCode::BAD_REQUEST,
        Outcome::Unauthenticated => StatusCode::UNAUTHORIZED,
        Outcome::PermissionDenied => StatusCode::FORBIDDEN,
        Outcome::NotFound => StatusCode::NOT_FOUND,
        Outcome::AlreadyExists | Outcome::Aborted | Outcome::FailedPrecondition => {
            StatusCode::CONFLICT
        }
        Outcome::ResourceExhausted => StatusCode::TOO_MANY_REQUESTS,
        Outcome::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
        _ => StatusCode::INTERNAL_SERVER_ERROR,
    }
}

/// The page of a failed action: the same message gRPC would give (internal failures
/// logged with a reference, never shown).
fn error_page(err: &ServiceError) -> Response {
    let outcome = err.outcome();
    let text = match err {
        ServiceError::Internal(crate::store::StoreError::CommitUnknown { .. }) => {
            "Saving this failed without a final answer from the database: it may or may \
             not be stored. Look it up before doing it again."
                .to_string()
        }
        ServiceError::Internal(cause) if !cause.is_unavailable() => {
            let mut bytes = [0u8; 6];
            let _ = ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut bytes);
            let reference = hex::encode(bytes);
            tracing::error!(reference = %reference, error = %cause, "console: internal error");
            format!("Internal error; quote reference {reference} to the operator.")
        }
        ServiceError::Invalid(v) => v
            .iter()
            .map(|v| format!("{}: {}", v.field, v.description))
            .collect::<Vec<_>>()
            .join("; "),
        other => other.to_string(),
    };
    let title = match outcome {
        Outcome::PermissionDenied => "Not allowed",
        Outcome::NotFound => "Not found",
        Outcome::ResourceExhausted => "Too many requests",
        Outcome::Unauthenticated => "Not signed in",
        Outcome::FailedPrecondition => "Cannot do this",
        Outcome::InvalidArgument => "Invalid request",
        Outcome::Unavailable => "Unavailable",
        _ => "Error",
    };
    (status_of(outcome), pages::message(title, &text)).into_response()
}

fn html(status: StatusCode, markup: Markup) -> Response {
    (status, markup).into_response()
}

// ----- Sign-in, sign-out, home -----

fn sign_in_form(st: &St, status: StatusCode, error: Option<&str>, name: &str) -> Response {
    let Ok(pre) = console_service::new_token() else {
        return error_page(&ServiceError::Unavailable);
    };
    let csrf = st.console.csrf_token(pre.expose_secret());
    let mut response = html(status, pages::sign_in(&csrf, error, name));
    response.headers_mut().append(
        header::SET_COOKIE,
        set_cookie(PRE_COOKIE, pre.expose_secret(), Some(3600)),
    );
    response
}

async fn sign_in_page(State(st): State<St>) -> Response {
    sign_in_form(&st, StatusCode::OK, None, "")
}

async fn sign_in(
    State(st): State<St>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let form = Form::parse(&body);
    let pre = cookie(&headers, PRE_COOKIE).unwrap_or("");
    if pre.is_empty() || !st.console.csrf_valid(pre, form.get("csrf")) {
        // Refused before any check, as every form without its token is: audited (for a
        // caller not signed in, in the per-address summary of refusals, `refusals`) and
        // taken from the address's allowance of refused calls.
        let peer = Peer::of(Some(peer));
        let mut call = Call::new("Console/SignIn");
        call.from_peer(peer);
        if let Err(limited) = st.refusals.check(peer) {
            metrics::counter!("ern_rate_limited_total", "limit" => "peer_refusals").increment(1);
            let _ = record(&st, call, Outcome::ResourceExhausted).await;
            return sign_in_form(
                &st,
                StatusCode::TOO_MANY_REQUESTS,
                Some(&limited.to_string()),
                "",
            );
        }
        st.refusals.charge(peer);
        let _ = record(&st, call, Outcome::PermissionDenied).await;
        return sign_in_form(
            &st,
            StatusCode::FORBIDDEN,
            Some("This sign-in form has expired or did not come from this console; try again."),
            "",
        );
    }
    // Wiped when done, as the other form values (a password typed into the name field).
    let name = Zeroizing::new(form.get("name").to_owned());
    let password = SecretString::from(form.raw("password").to_owned());
    let mut call = Call::new("Console/SignIn");
    let result = console_service::sign_in(
        &st,
        SignIn {
            name: name.as_str(),
            password: &password,
            code: form.get("code"),
            peer: Peer::of(Some(peer)),
        },
        &mut call,
    )
    .await;
    let outcome = result
        .as_ref()
        .map_or_else(ServiceError::outcome, |_| Outcome::Ok);
    // A refused sign-in is answered without waiting for its entry: a principal's name is
    // audited by a commit, any other name only counted in the address's summary, and the
    // wait for one would tell the two apart. A session is given only once recorded.
    let recorded = if result.is_ok() {
        record(&st, call, outcome).await
    } else {
        let st = st.clone();
        tokio::spawn(async move {
            if let Err(e) = record(&st, call, outcome).await {
                warn!(error = %e, "audit entry of a refused sign-in not committed");
            }
        });
        Ok(())
    };
    match (result, recorded) {
        (Ok(session), Ok(())) => {
            let mut response = Redirect::to("/home").into_response();
            let h = response.headers_mut();
            h.append(
                header::SET_COOKIE,
                set_cookie(SESSION_COOKIE, session.token.expose_secret(), None),
            );
            h.append(header::SET_COOKIE, set_cookie(PRE_COOKIE, "", Some(0)));
            response
        }
        (Ok(session), Err(_)) => {
            let _ = console_service::sign_out(&st, session.token.expose_secret()).await;
            error_page(&ServiceError::Unavailable)
        }
        (Err(err), _) => {
            let status = status_of(err.outcome());
            sign_in_form(&st, status, Some(&err.to_string()), &name)
        }
    }
}

async fn sign_out(
    State(st): State<St>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let (ctx, _form) = match signed_in_form(&st, &headers, peer, "SignOut", &body).await {
        Ok(x) => x,
        Err(r) => return r,
    };
    let result = console_service::sign_out(&st, &ctx.token).await;
    let signed_out = result.is_ok();
    let page = result.map(|()| Redirect::to("/sign-in").into_response());
    let mut response = conclude(&st, ctx.call.finish(), page).await;
    // The session is gone: its cookie is cleared whatever the answer (also the error page
    // of a sign-out whose audit entry could not be committed).
    if signed_out {
        response
            .headers_mut()
            .append(header::SET_COOKIE, set_cookie(SESSION_COOKIE, "", Some(0)));
    }
    response
}

async fn home(
    State(st): State<St>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
) -> Response {
    match signed_in(&st, &headers, peer, "Home").await {
        Ok(mut ctx) => {
            ctx.unaudited();
            html(StatusCode::OK, pages::home(&ctx))
        }
        Err(r) => r,
    }
}

// ----- Consent officers -----

/// Registry codes the principal may act on.
async fn registries_of(st: &St, principal: &Principal) -> Vec<String> {
    crate::service::registries_of(st, principal)
        .await
        .map(|rs| rs.into_iter().map(|r| r.code).collect())
        .unwrap_or_default()
}

async fn officer_find_page(
    State(st): State<St>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
) -> Response {
    let mut ctx = match signed_in(&st, &headers, peer, "FindPatientForm").await {
        Ok(ctx) => ctx,
        Err(r) => return r,
    };
    if let Err(e) = consent_service::require_officer(&ctx.principal) {
        return conclude(&st, ctx.call.finish(), Err(e)).await;
    }
    ctx.unaudited();
    let registries = registries_of(&st, &ctx.principal).await;
    html(
        StatusCode::OK,
        pages::officer_find(&ctx, &registries, &Form(Vec::new()), &Errors::default()),
    )
}

/// The patient a find form names: identifiers (derived, rate limited) or a pseudonym.
async fn resolve(
    st: &St,
    access: &consent_service::ConsentAccess,
    form: &Form,
) -> Result<crate::pseudonym::Pseudonym, ServiceError> {
    match form.get("kind") {
        "national" | "demographic" => {
            let sex = crate::domain::Sex::parse_db(form.get("demographic.sex_at_birth")).ok_or(
                crate::domain::DomainError::Format("female, male, undetermined or unknown"),
            );
            let input = if form.get("kind") == "national" {
                IdentifiersInput::National(NationalInput {
                    issuing_country: form.get("national.issuing_country"),
                    value: form.get("national.value"),
                })
            } else {
                IdentifiersInput::Demographic(DemographicInput {
                    given_names: form.get("demographic.given_names"),
                    family_name: form.get("demographic.family_name"),
                    date_of_birth: form.get("demographic.date_of_birth"),
                    sex_at_birth: sex,
                    place_of_birth: form.get("demographic.place_of_birth"),
                    country_of_birth: form.get("demographic.country_of_birth"),
                })
            };
            let identity = PatientIdentity::parse(Some(input)).map_err(ServiceError::Invalid)?;
            consent_service::resolve(st, access, identity).await
        }
        _ => parse_pseudonym(form.get("pseudonym"), access.registry()),
    }
}

async fn officer_patient(
    State(st): State<St>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let (mut ctx, form) = match signed_in_form(&st, &headers, peer, "FindPatient", &body).await {
        Ok(x) => x,
        Err(r) => return r,
    };
    let result = async {
        let access = consent_access(&st, &mut ctx, &form).await?;
        let pseudonym = resolve(&st, &access, &form).await?;
        let view = consent_service::get(&st, &access, pseudonym, st.clock.now()).await?;
        ctx.call.call().items(view.events.len());
        Ok(view)
    }
    .await;
    match result {
        Ok(view) => {
            let page = html(
                StatusCode::OK,
                pages::officer_patient(&ctx, form.get("registry"), &view, None, &Errors::default()),
            );
            conclude(&st, ctx.call.finish(), Ok(page)).await
        }
        Err(ServiceError::Invalid(v)) => {
            let registries = registries_of(&st, &ctx.principal).await;
            let page = html(
                StatusCode::BAD_REQUEST,
                pages::officer_find(&ctx, &registries, &form, &Errors::from(&v)),
            );
            conclude_invalid(&st, ctx.call.finish(), page).await
        }
        Err(e) => conclude(&st, ctx.call.finish(), Err(e)).await,
    }
}

/// A calendar date from a date field, at midnight UTC; `Some(None)` when present but not
/// a date.
fn date_field(form: &Form, name: &str) -> Option<Option<DateTime<Utc>>> {
    let text = form.get(name);
    if text.is_empty() {
        return None;
    }
    Some(
        NaiveDate::parse_from_str(text, "%Y-%m-%d")
            .ok()
            .and_then(|d| d.and_hms_opt(0, 0, 0))
            .map(|t| t.and_utc()),
    )
}

fn scope_named(name: &str) -> Option<Scope> {
    Scope::ALL.into_iter().find(|s| s.as_str() == name)
}

async fn officer_record(
    State(st): State<St>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let (mut ctx, form) = match signed_in_form(&st, &headers, peer, "RecordConsent", &body).await {
        Ok(x) => x,
        Err(r) => return r,
    };
    let result = async {
        let access = consent_access(&st, &mut ctx, &form).await?;
        let pseudonym = parse_pseudonym(form.get("pseudonym"), access.registry())?;
        let now = consent_service::now_millis(&st);
        let decision = match form.get("decision") {
            "granted" => Some(Decision::Granted),
            "refused" => Some(Decision::Refused),
            _ => None,
        };
        let item = AttestationItem {
            scope: scope_named(form.get("scope")),
            decision,
            given_at: date_field(&form, "given_at"),
            form_version: form.get("form_version"),
            expires_at: date_field(&form, "expires_at"),
        };
        let decisions = consent::check_attestation(&[item], now).map_err(|v| {
            let mut out = FieldViolations::new();
            for item in v.iter() {
                let field = item.field.trim_start_matches("consent[0].");
                let field = if field == "state" { "decision" } else { field };
                out.push(field, item.description.clone());
            }
            ServiceError::Invalid(out)
        })?;
        let view = consent_service::record(
            &st,
            &access,
            pseudonym.clone(),
            decisions,
            now,
            None,
            ctx.call.call(),
        )
        .await
        .map_err(on_the_form)?;
        // The page shows the whole history again.
        consent_service::get(&st, &access, pseudonym, now)
            .await
            .map(|full| (view, full))
    }
    .await;
    match result {
        Ok((_, full)) => {
            let page = html(
                StatusCode::OK,
                pages::officer_patient(
                    &ctx,
                    form.get("registry"),
                    &full,
                    Some("The decision is recorded."),
                    &Errors::default(),
                ),
            );
            conclude(&st, ctx.call.finish(), Ok(page)).await
        }
        Err(ServiceError::Invalid(v)) => refused_form(&st, ctx, &form, &v).await,
        Err(e) => conclude(&st, ctx.call.finish(), Err(e)).await,
    }
}

/// The consent officer's access to the registry the form names (field `registry`).
async fn consent_access(
    st: &St,
    ctx: &mut Ctx,
    form: &Form,
) -> Result<consent_service::ConsentAccess, ServiceError> {
    consent_service::open(
        st,
        &ctx.principal,
        form.get("registry"),
        "registry",
        ctx.call.call(),
    )
    .await
}

/// An officer's form refused as invalid: the patient's page again, the errors next to
/// their fields, the patient as on file.
async fn refused_form(st: &St, mut ctx: Ctx, form: &Form, v: &FieldViolations) -> Response {
    let page = match reopen_patient(st, &mut ctx, form).await {
        Ok(view) => html(
            StatusCode::BAD_REQUEST,
            pages::officer_patient(&ctx, form.get("registry"), &view, None, &Errors::from(v)),
        ),
        Err(e) => return conclude(st, ctx.call.finish(), Err(e)).await,
    };
    conclude_invalid(st, ctx.call.finish(), page).await
}

async fn reopen_patient(
    st: &St,
    ctx: &mut Ctx,
    form: &Form,
) -> Result<consent_service::ConsentView, ServiceError> {
    let access = consent_access(st, ctx, form).await?;
    let pseudonym = parse_pseudonym(form.get("pseudonym"), access.registry())?;
    consent_service::get(st, &access, pseudonym, st.clock.now()).await
}

fn reason_named(name: &str) -> Option<WithdrawalReason> {
    WithdrawalReason::parse_db(name)
}

/// A consent call's violations named as the officer's form names its fields: the API's
/// `patient.pseudonym` is the form's `pseudonym`.
fn on_the_form(e: ServiceError) -> ServiceError {
    match e {
        ServiceError::Invalid(v) => {
            let mut out = FieldViolations::new();
            for item in v.iter() {
                let field = item.field.strip_prefix("patient.").unwrap_or(&item.field);
                out.push(field, item.description.clone());
            }
            ServiceError::Invalid(out)
        }
        other => other,
    }
}

async fn officer_withdraw(
    State(st): State<St>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let form = Form::parse(&body);
    let confirmed = form.get("confirm") == "yes";
    let action = if confirmed {
        "WithdrawConsent"
    } else {
        "ConfirmWithdrawal"
    };
    let (mut ctx, form) = match signed_in_form(&st, &headers, peer, action, &body).await {
        Ok(x) => x,
        Err(r) => return r,
    };
    let result = async {
        let access = consent_access(&st, &mut ctx, &form).await?;
        let pseudonym = parse_pseudonym(form.get("pseudonym"), access.registry())?;
        let scopes: Vec<Scope> = Scope::ALL
            .into_iter()
            .filter(|s| form.has(&format!("scope.{}", s.as_str())))
            .collect();
        let mut v = FieldViolations::new();
        if scopes.is_empty() {
            v.push("scopes", "choose at least one scope to withdraw");
        }
        let reason = reason_named(form.get("reason"));
        if reason.is_none() {
            v.push("reason", "choose the reason for the withdrawal");
        }
        v.into_result()?;
        let reason = reason.expect("checked");
        if !confirmed {
            return Ok(html(
                StatusCode::OK,
                pages::confirm_withdrawal(&ctx, &access.registry().code, &pseudonym, &scopes, reason, &form),
            ));
        }
        let withdrawn =
            consent_service::withdraw(&st, &access, pseudonym.clone(), scopes, reason, ctx.call.call())
                .await
                .map_err(on_the_form)?;
        Ok(match withdrawn.receipt {
            Some(receipt) => html(StatusCode::OK, pages::receipt(&ctx, &receipt, true)),
            None => {
                let full = consent_service::get(&st, &access, pseudonym, st.clock.now()).await?;
                html(
                    StatusCode::OK,
                    pages::officer_patient(
                        &ctx,
                        &access.registry().code,
                        &full,
                        Some("The consent is withdrawn. No clinical data was erased (REGISTRY_INCLUSION was not withdrawn)."),
                        &Errors::default(),
                    ),
                )
            }
        })
    }
    .await;
    match result {
        Err(ServiceError::Invalid(v)) => refused_form(&st, ctx, &form, &v).await,
        other => conclude(&st, ctx.call.finish(), other).await,
    }
}

async fn receipt_page(
    State(st): State<St>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
) -> Response {
    let mut ctx = match signed_in(&st, &headers, peer, "ReceiptForm").await {
        Ok(ctx) => ctx,
        Err(r) => return r,
    };
    if let Err(e) = consent_service::require_officer(&ctx.principal) {
        return conclude(&st, ctx.call.finish(), Err(e)).await;
    }
    ctx.unaudited();
    html(
        StatusCode::OK,
        pages::receipt_lookup(&ctx, &Errors::default()),
    )
}

async fn receipt_lookup(
    State(st): State<St>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let (mut ctx, form) =
        match signed_in_form(&st, &headers, peer, "GetErasureReceipt", &body).await {
            Ok(x) => x,
            Err(r) => return r,
        };
    let id = form.get("receipt_id");
    if !consent_service::is_receipt_id(id) {
        let mut v = FieldViolations::new();
        v.push(
            "receipt_id",
            "must be a receipt id as issued: \"rcpt-\" and 32 hex digits",
        );
        // Empty again, like every form with an error: what was typed is not shown back.
        let page = html(
            StatusCode::BAD_REQUEST,
            pages::receipt_lookup(&ctx, &Errors::from(&v)),
        );
        return conclude_invalid(&st, ctx.call.finish(), page).await;
    }
    let result = consent_service::receipt(&st, &ctx.principal, id, ctx.call.call())
        .await
        .map(|r| html(StatusCode::OK, pages::receipt(&ctx, &r, false)));
    conclude(&st, ctx.call.finish(), result).await
}

async fn officer_expiring(
    State(st): State<St>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    uri: axum::http::Uri,
) -> Response {
    let mut ctx = match signed_in(&st, &headers, peer, "ExpiringConsents").await {
        Ok(ctx) => ctx,
        Err(r) => return r,
    };
    // `?days=N` (1 to 365, default 30): about no patient, so a query string is fine.
    let days = url::form_urlencoded::parse(uri.query().unwrap_or("").as_bytes())
        .find(|(k, _)| k == "days")
        .and_then(|(_, v)| v.parse::<i64>().ok())
        .unwrap_or(30)
        .clamp(1, 365);
    let result = consent_service::expiring(&st, &ctx.principal, days, ctx.call.call()).await;
    let page = result.map(|lists| html(StatusCode::OK, pages::expiring(&ctx, days, &lists)));
    conclude(&st, ctx.call.finish(), page).await
}

/// The next page of one expiry list. POST, because the cursor (the last row shown)
/// holds a pseudonym.
async fn officer_expiring_next(
    State(st): State<St>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let (mut ctx, form) = match signed_in_form(&st, &headers, peer, "ExpiringConsents", &body).await
    {
        Ok(x) => x,
        Err(r) => return r,
    };
    let days = form.get("days").parse::<i64>().unwrap_or(30).clamp(1, 365);
    let list = match form.get("list") {
        "soon" => Some(consent_service::ExpiryList::Soon),
        "expired" => Some(consent_service::ExpiryList::Expired),
        _ => None,
    };
    let cursor = (|| {
        Some(crate::store::console::ExpiryCursor {
            expires_at: chrono::DateTime::from_timestamp_millis(
                form.get("after.expires_at").parse().ok()?,
            )?,
            registry_id: form.get("after.registry_id").parse().ok()?,
            pseudonym: form.get("after.pseudonym").to_owned(),
            scope: scope_named(form.get("after.scope"))?.as_str().to_owned(),
        })
    })();
    let (Some(list), Some(cursor)) = (list, cursor) else {
        let mut v = FieldViolations::new();
        v.push(
            "after",
            "this page link is damaged; start again from the first page",
        );
        return conclude(&st, ctx.call.finish(), Err(ServiceError::Invalid(v))).await;
    };
    let result =
        consent_service::expiring_next(&st, &ctx.principal, list, days, &cursor, ctx.call.call())
            .await;
    let page = result.map(|(_, page)| {
        html(
            StatusCode::OK,
            pages::expiring_more(&ctx, days, list, &page),
        )
    });
    conclude(&st, ctx.call.finish(), page).await
}

// ----- Researchers -----

/// Filters a research form takes (`filters[0]`, `filters[1]`).
pub(crate) const FORM_FILTERS: usize = 2;

/// Refuses a research question posted with a field the form does not have (a third
/// filter, `filters[01]`, `Filters[1]`), a dimension past `max` (the delay takes fewer
/// than the form shows; an empty one is the form's own unused select), or a field given
/// twice: read only as far as the form goes, such a request was answered as another
/// question than the one posted (a privacy audit of 2026-12-07 posted three filters and
/// got the count of the first two). Names are compared exactly with the form's; the
/// field the caller named is not echoed.
fn selection_fields_known(form: &Form, max: usize, v: &mut FieldViolations) {
    let mut known: Vec<String> = vec!["csrf".into(), "registry".into()];
    known.extend((0..MAX_COUNT_DIMENSIONS.max(max)).map(|i| format!("group_by[{i}]")));
    for i in 0..FORM_FILTERS {
        for part in ["dimension", "values", "include_descendants"] {
            known.push(format!("filters[{i}].{part}"));
        }
    }
    let (mut unknown, mut dimensions, mut twice) = (false, false, false);
    let mut seen = std::collections::HashSet::new();
    for (key, value) in form.fields() {
        if !known.iter().any(|k| k == key) {
            unknown = true;
        } else if !seen.insert(key) {
            twice = true;
        } else if !value.trim().is_empty()
            && (max..MAX_COUNT_DIMENSIONS.max(max)).any(|i| key == format!("group_by[{i}]"))
        {
            dimensions = true;
        }
    }
    if unknown {
        v.push(
            "form",
            format!(
                "has a field the research form does not have: it takes a registry, \
                 group_by[0] to group_by[{}] and at most {FORM_FILTERS} filters, filters[0] \
                 and filters[1], each a dimension, values and include_descendants (ask \
                 through the API for more)",
                MAX_COUNT_DIMENSIONS - 1
            ),
        );
    }
    if dimensions {
        v.push(
            "group_by",
            format!(
                "this table takes at most {max} dimensions, group_by[0] to group_by[{}]",
                max - 1
            ),
        );
    }
    if twice {
        v.push(
            "form",
            "a field of the question is given twice: give each once",
        );
    }
}

/// What a research form asks: dimensions, filters and what they stand for along the code
/// releases in force, parsed with the API's field names (`group_by[i]`,
/// `filters[i].values`, `filters[i].include_descendants`) and the domain's messages.
///
/// Unlike the API (where a code no release knows matches what is stored under it), a
/// DIAGNOSIS or PHENOTYPE value the release in force does not know at all is an error
/// next to its field, with the release's near matches: a person typing a code wants to
/// hear about a typo.
fn selection(
    catalog: &CodeCatalog,
    form: &Form,
    max: usize,
) -> Result<(Vec<Dimension>, Vec<Filter>, research::Along), FieldViolations> {
    let mut v = FieldViolations::new();
    selection_fields_known(form, max, &mut v);
    let mut dims = Vec::new();
    for i in 0..max {
        let name = form.get(&format!("group_by[{i}]"));
        if name.is_empty() {
            continue;
        }
        match Dimension::ALL.into_iter().find(|d| d.name() == name) {
            None => v.push(format!("group_by[{i}]"), "is not a dimension"),
            Some(d) if dims.contains(&d) => v.push(format!("group_by[{i}]"), "is repeated"),
            Some(d) => dims.push(d),
        }
    }
    let mut filters: Vec<Filter> = Vec::new();
    let mut along = research::Along::default();
    let mut phenotype_filter = false;
    for i in 0..FORM_FILTERS {
        let dim = form.get(&format!("filters[{i}].dimension"));
        let values = form.get(&format!("filters[{i}].values"));
        let descendants = form.has(&format!("filters[{i}].include_descendants"));
        if dim.is_empty() && values.is_empty() {
            continue;
        }
        let field = format!("filters[{i}].values");
        let phenotype = dim == PHENOTYPE;
        let dimension = Dimension::ALL.into_iter().find(|d| d.name() == dim);
        if dimension.is_none() && !phenotype {
            v.push(format!("filters[{i}].dimension"), "is not a dimension");
            continue;
        }
        if (phenotype && phenotype_filter)
            || dimension.is_some_and(|d| filters.iter().any(|f| f.dimension == d))
        {
            v.push(
                format!("filters[{i}].dimension"),
                "has another filter already",
            );
            continue;
        }
        let texts: Vec<&str> = values
            .split(',')
            .map(str::trim)
            .filter(|t| !t.is_empty())
            .collect();
        if texts.is_empty() || texts.len() > crate::aggregate::MAX_FILTER_VALUES {
            v.push(
                field,
                format!(
                    "give 1 to {} values, separated by commas",
                    crate::aggregate::MAX_FILTER_VALUES
                ),
            );
            continue;
        }
        let unknown =
            |system: CodeSystem, code: &str| research::not_in_release(catalog, system, code);
        let Some(dimension) = dimension else {
            phenotype_filter = true;
            along.phenotype_descendants = descendants;
            for text in texts {
                match HpoTerm::parse(text) {
                    Ok(t) => match unknown(CodeSystem::Hpo, t.as_str()) {
                        Some(why) => v.push(field.clone(), why),
                        None if !along.phenotypes.contains(&t) => along.phenotypes.push(t),
                        None => {}
                    },
                    Err(e) => v.push(field.clone(), format!("{text}: {e}")),
                }
            }
            continue;
        };
        let mut keys = Vec::new();
        for text in texts {
            match dimension.parse_value(text) {
                Ok(k) => {
                    if dimension == Dimension::Diagnosis
                        && let Key::Int(n) = k
                        && n != i64::from(crate::domain::ORPHA_UNDIAGNOSED)
                        && let Some(why) = unknown(CodeSystem::Orphanet, &format!("ORPHA:{n}"))
                    {
                        v.push(field.clone(), why);
                    }
                    keys.push(k);
                }
                Err(msg) => {
                    v.push(field.clone(), msg);
                }
            }
        }
        if descendants {
            if dimension == Dimension::Diagnosis {
                along.diagnosis_subtypes = true;
            } else {
                v.push(
                    format!("filters[{i}].include_descendants"),
                    "only a diagnosis (its subtypes) or a phenotype (the terms below it) has descendants",
                );
            }
        }
        filters.push(Filter {
            dimension,
            values: keys,
        });
    }
    v.into_result().map(|()| (dims, filters, along))
}

/// The filter dimension of HPO terms (a filter only, as in the API).
pub const PHENOTYPE: &str = "PHENOTYPE";

/// The names the releases in force give the codes among a table's labels, per dimension.
fn code_names<'a>(
    st: &St,
    labelled: impl IntoIterator<Item = (Dimension, Vec<String>)> + 'a,
) -> pages::CodeNames {
    let mut out = pages::CodeNames::default();
    for (dimension, labels) in labelled {
        for (code, name) in research::names(st, dimension, &labels) {
            out.insert(dimension, code, name);
        }
    }
    out
}

async fn research_page(
    State(st): State<St>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
) -> Response {
    let mut ctx = match signed_in(&st, &headers, peer, "ResearchForm").await {
        Ok(ctx) => ctx,
        Err(r) => return r,
    };
    if let Err(e) = research::require_researcher(&ctx.principal) {
        return conclude(&st, ctx.call.finish(), Err(e)).await;
    }
    ctx.unaudited();
    let registries = registries_of(&st, &ctx.principal).await;
    html(
        StatusCode::OK,
        pages::research_form(&ctx, &registries, &Form(Vec::new()), &Errors::default()),
    )
}

enum CountAs {
    Page,
    Csv,
}

async fn count(
    st: &St,
    headers: &HeaderMap,
    peer: SocketAddr,
    body: &Bytes,
    how: CountAs,
) -> Response {
    let (mut ctx, form) = match signed_in_form(st, headers, peer, "CountPatients", body).await {
        Ok(x) => x,
        Err(r) => return r,
    };
    let result = async {
        let access =
            research::open(st, &ctx.principal, form.get("registry"), ctx.call.call()).await?;
        let (dims, filters, along) = selection(&st.codes.get(), &form, MAX_COUNT_DIMENSIONS)?;
        let counted =
            research::count_patients(st, &access, dims, filters, &along, ctx.call.call()).await?;
        Ok((access, counted))
    }
    .await;
    match result {
        Ok((access, counted)) => {
            let page = match how {
                CountAs::Page => {
                    let t = &counted.table;
                    let mut labelled: Vec<(Dimension, Vec<String>)> = Vec::new();
                    if let Some(d) = t.row_dimension {
                        labelled.push((d, t.row_labels.clone()));
                    }
                    for (c, d) in t.column_dimensions.iter().enumerate() {
                        let labels = t
                            .column_labels
                            .iter()
                            .filter_map(|values| values.get(c).cloned())
                            .collect();
                        labelled.push((*d, labels));
                    }
                    let names = code_names(st, labelled);
                    html(
                        StatusCode::OK,
                        pages::count_table(&ctx, access.registry(), &counted, &form, &names),
                    )
                }
                CountAs::Csv => (
                    [
                        (header::CONTENT_TYPE, "text/csv; charset=utf-8"),
                        (
                            header::CONTENT_DISPOSITION,
                            "attachment; filename=\"ern-registry-counts.csv\"",
                        ),
                    ],
                    pages::count_csv(access.registry(), &counted),
                )
                    .into_response(),
            };
            conclude(st, ctx.call.finish(), Ok(page)).await
        }
        Err(ServiceError::Invalid(v)) => {
            let registries = registries_of(st, &ctx.principal).await;
            let page = html(
                StatusCode::BAD_REQUEST,
                pages::research_form(&ctx, &registries, &form, &Errors::from(&v)),
            );
            conclude_invalid(st, ctx.call.finish(), page).await
        }
        Err(e) => conclude(st, ctx.call.finish(), Err(e)).await,
    }
}

async fn research_count(
    State(st): State<St>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    count(&st, &headers, peer, &body, CountAs::Page).await
}

async fn research_count_csv(
    State(st): State<St>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    count(&st, &headers, peer, &body, CountAs::Csv).await
}

async fn research_delay(
    State(st): State<St>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let (mut ctx, form) = match signed_in_form(&st, &headers, peer, "DiagnosticDelay", &body).await
    {
        Ok(x) => x,
        Err(r) => return r,
    };
    let result = async {
        let access =
            research::open(&st, &ctx.principal, form.get("registry"), ctx.call.call()).await?;
        let (dims, filters, along) = selection(&st.codes.get(), &form, MAX_DELAY_DIMENSIONS)?;
        let grouped = dims.clone();
        let (table, as_of) =
            research::diagnostic_delay(&st, &access, dims, filters, &along, ctx.call.call())
                .await?;
        Ok((access, table, as_of, grouped))
    }
    .await;
    match result {
        Ok((access, table, as_of, grouped)) => {
            let svg = chart::delay_svg(&table);
            let names = code_names(
                &st,
                grouped.iter().enumerate().map(|(i, d)| {
                    let labels = table
                        .groups
                        .iter()
                        .filter_map(|g| g.labels.get(i).cloned())
                        .collect();
                    (*d, labels)
                }),
            );
            let page = html(
                StatusCode::OK,
                pages::delay(
                    &ctx,
                    access.registry(),
                    &table,
                    &grouped,
                    as_of,
                    &svg,
                    &names,
                ),
            );
            conclude(&st, ctx.call.finish(), Ok(page)).await
        }
        Err(ServiceError::Invalid(v)) => {
            let registries = registries_of(&st, &ctx.principal).await;
            let page = html(
                StatusCode::BAD_REQUEST,
                pages::research_form(&ctx, &registries, &form, &Errors::from(&v)),
            );
            conclude_invalid(&st, ctx.call.finish(), page).await
        }
        Err(e) => conclude(&st, ctx.call.finish(), Err(e)).await,
    }
}

// ----- Where is the expertise (physicians, researchers) -----

async fn expertise_page(
    State(st): State<St>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
) -> Response {
    let mut ctx = match signed_in(&st, &headers, peer, "ExpertiseForm").await {
        Ok(ctx) => ctx,
        Err(r) => return r,
    };
    if let Err(e) = research::require_expertise_role(&ctx.principal) {
        return conclude(&st, ctx.call.finish(), Err(e)).await;
    }
    ctx.unaudited();
    html(
        StatusCode::OK,
        pages::expertise(&ctx, "", None, &Errors::default()),
    )
}

async fn expertise(
    State(st): State<St>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let (mut ctx, form) = match signed_in_form(&st, &headers, peer, "FindExpertise", &body).await {
        Ok(x) => x,
        Err(r) => return r,
    };
    let result = async {
        let access = research::open_expertise(&st, &ctx.principal)?;
        let mut v = FieldViolations::new();
        let mut codes = Vec::new();
        for text in form
            .get("orphacodes")
            .split(',')
            .map(str::trim)
            .filter(|t| !t.is_empty())
        {
            match Orphacode::parse(text) {
                Ok(c) => codes.push(i64::from(c.number())),
                Err(e) => v.push("orphacodes", e.to_string()),
            }
        }
        codes.sort_unstable();
        codes.dedup();
        if codes.is_empty() && v.is_empty() {
            v.push("orphacodes", "give at least one Orphacode (ORPHA:nnnn)");
        }
        let registries = research::expertise_registries(&st, &access, &[], &mut v).await?;
        v.into_result()?;
        research::find_expertise(&st, &access, &codes, &[], &registries, ctx.call.call()).await
    }
    .await;
    match result {
        Ok((centres, as_of)) => {
            let page = html(
                StatusCode::OK,
                pages::expertise(
                    &ctx,
                    form.get("orphacodes"),
                    Some((&centres, as_of)),
                    &Errors::default(),
                ),
            );
            conclude(&st, ctx.call.finish(), Ok(page)).await
        }
        Err(ServiceError::Invalid(v)) => {
            let page = html(
                StatusCode::BAD_REQUEST,
                pages::expertise(&ctx, form.get("orphacodes"), None, &Errors::from(&v)),
            );
            conclude_invalid(&st, ctx.call.finish(), page).await
        }
        Err(e) => conclude(&st, ctx.call.finish(), Err(e)).await,
    }
}

// ----- Physicians: their centre's cases -----

async fn cases_page(
    State(st): State<St>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
) -> Response {
    let mut ctx = match signed_in(&st, &headers, peer, "GetCaseForm").await {
        Ok(ctx) => ctx,
        Err(r) => return r,
    };
    if let Err(e) = crate::service::cases::require_physician(&ctx.principal) {
        return conclude(&st, ctx.call.finish(), Err(e)).await;
    }
    ctx.unaudited();
    let registries = registries_of(&st, &ctx.principal).await;
    html(
        StatusCode::OK,
        pages::case_form(&ctx, &registries, "", &Errors::default()),
    )
}

async fn case_read(
    State(st): State<St>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let (mut ctx, form) = match signed_in_form(&st, &headers, peer, "GetCase", &body).await {
        Ok(x) => x,
        Err(r) => return r,
    };
    let result = async {
        let access = crate::service::cases::open(
            &st,
            &ctx.principal,
            form.get("registry"),
            "registry",
            ctx.call.call(),
        )
        .await?;
        let pseudonym = parse_pseudonym(form.get("pseudonym"), access.registry())?;
        let view = crate::service::cases::get(&st, &access, pseudonym, true).await?;
        ctx.call.call().items(view.versions.len());
        Ok((access.registry().code.clone(), view))
    }
    .await;
    match result {
        Ok((registry, view)) => {
            let page = html(StatusCode::OK, pages::case(&ctx, &registry, &view));
            conclude(&st, ctx.call.finish(), Ok(page)).await
        }
        Err(ServiceError::Invalid(v)) => {
            let registries = registries_of(&st, &ctx.principal).await;
            let page = html(
                StatusCode::BAD_REQUEST,
                pages::case_form(&ctx, &registries, form.get("registry"), &Errors::from(&v)),
            );
            conclude_invalid(&st, ctx.call.finish(), page).await
        }
        Err(e) => conclude(&st, ctx.call.finish(), Err(e)).await,
    }
}

#[cfg(test)]
mod tests {
    //! The stylesheet's colours against WCAG 2.1: text at least 4.5:1 against its
    //! background (1.4.3, AA), focus outlines at least 3:1 against what surrounds them
    //! (1.4.11). The colours are read from `console.css` by selector, so a change of a
    //! colour there is checked here.

    const CSS: &str = include_str!("console.css");

    /// The value of `property` in the rule whose selector list is exactly `selector`.
    fn declared(selector: &str, property: &str) -> String {
        for rule in CSS.split('}') {
            let Some((selectors, body)) = rule.split_once('{') else {
                continue;
            };
            let selectors = selectors.rsplit("*/").next().unwrap_or(selectors).trim();
            if selectors != selector {
                continue;
            }
            for decl in body.split(';') {
                if let Some((p, v)) = decl.split_once(':')
                    && p.trim() == property
                {
                    return v.trim().to_owned();
                }
            }
        }
        panic!("console.css has no {property} in a rule for {selector:?}");
    }

    /// The `#rgb` or `#rrggbb` colour in a value (the first one).
    fn colour(value: &str) -> [f64; 3] {
        let at = value
            .find('#')
            .unwrap_or_else(|| panic!("no colour in {value:?}"));
        let hex: String = value[at + 1..]
            .chars()
            .take_while(char::is_ascii_hexdigit)
            .collect();
        let hex = match hex.len() {
            3 => hex.chars().flat_map(|c| [c, c]).collect(),
            6 => hex,
            _ => panic!("not a colour: {value:?}"),
        };
        let byte = |i: usize| f64::from(u8::from_str_radix(&hex[i..i + 2], 16).unwrap());
        [byte(0), byte(2), byte(4)]
    }

    /// WCAG 2.1 relative luminance.
    fn luminance([r, g, b]: [f64; 3]) -> f64 {
        let channel = |c: f64| {
            let c = c / 255.0;
            if c <= 0.039_28 {
                c / 12.92
            } else {
                ((c + 0.055) / 1.055).powf(2.4)
            }
        };
        0.2126 * channel(r) + 0.7152 * channel(g) + 0.0722 * channel(b)
    }

    fn contrast(a: [f64; 3], b: [f64; 3]) -> f64 {
        let (la, lb) = (luminance(a), luminance(b));
        (la.max(lb) + 0.05) / (la.min(lb) + 0.05)
    }

    #[test]
    fn the_contrast_computation_matches_the_wcag_examples() {
        let white = colour("#fff");
        assert!((contrast(colour("#000"), white) - 21.0).abs() < 1e-9);
        assert!((contrast(white, white) - 1.0).abs() < 1e-9);
        // #767676 on white is the classic smallest grey that passes 4.5:1.
        let grey = contrast(colour("#767676"), white);
        assert!((4.5..4.6).contains(&grey), "{grey}");
    }

    #[test]
    fn every_text_colour_of_the_stylesheet_is_readable_on_its_background() {
        let body = colour(&declared("body", "color"));
        let page = colour(&declared("body", "background"));
        let header = colour(&declared("header", "background"));
        let button = colour(&declared("button", "background"));
        let pairs: Vec<(&str, [f64; 3], [f64; 3])> = vec![
            ("body text", body, page),
            ("links", colour(&declared("a", "color")), page),
            ("header text", colour(&declared("header", "color")), header),
            (
                "header links and buttons",
                colour(&declared("header a, header button", "color")),
                header,
            ),
            ("buttons", colour(&declared("button", "color")), button),
            (
                "danger buttons",
                colour(&declared("button", "color")),
                colour(&declared("button.danger", "background")),
            ),
            (
                "link-like buttons in the page",
                colour(&declared("main button.link", "color")),
                page,
            ),
            ("errors", colour(&declared(".error", "color")), page),
            (
                "errors in a warning",
                colour(&declared(".error", "color")),
                colour(&declared(".warning", "background")),
            ),
            (
                "errors in a notice",
                colour(&declared(".error", "color")),
                colour(&declared(".notice", "background")),
            ),
            ("code names", colour(&declared(".name", "color")), page),
            ("notices", body, colour(&declared(".notice", "background"))),
            (
                "warnings",
                body,
                colour(&declared(".warning", "background")),
            ),
            (
                "suppressed cells",
                colour(&declared("td.suppressed", "color")),
                colour(&declared("td.suppressed", "background")),
            ),
            (
                "the skip link",
                colour(&declared(".skip", "color")),
                colour(&declared(".skip", "background")),
            ),
        ];
        for (what, fg, bg) in pairs {
            let ratio = contrast(fg, bg);
            assert!(ratio >= 4.5, "{what}: {ratio:.2}:1 is below 4.5:1");
        }
        // Focus outlines (offset from the control, so against the page or the header).
        let focus = colour(&declared(
            "a:focus, button:focus, input:focus, select:focus",
            "outline",
        ));
        let header_focus = colour(&declared("header a:focus, header button:focus", "outline"));
        let skip_focus = colour(&declared(".skip:focus", "outline"));
        let skip = colour(&declared(".skip", "background"));
        assert!(declared(".skip:focus", "outline-offset").starts_with('-'));
        for (what, ring, around) in [
            ("focus in the page", focus, page),
            ("focus in the header", header_focus, header),
            // Drawn inside the link (a negative offset), whatever lies around it.
            ("the skip link's focus", skip_focus, skip),
        ] {
            let ratio = contrast(ring, around);
            assert!(ratio >= 3.0, "{what}: {ratio:.2}:1 is below 3:1");
        }
    }
}
