//! Transport: TLS with a configured certificate, mutual TLS binding a client certificate
//! to a principal, and no plaintext off loopback unless forced. Certificates are made
//! for each test with rcgen.

use std::path::{Path, PathBuf};

use ern_registry::auth::{self, Role};
use ern_registry::config::ServeArgs;
use ern_registry::proto::case_service_client::CaseServiceClient;
use ern_registry::startup::{Application, StartupError};
use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair,
};
use rustls_pki_types::{CertificateDer, pem::PemObject};
use tonic::Code;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Identity};

use crate::helpers::*;

/// A CA, a server certificate for localhost, and client certificates, as PEM files.
pub struct Pki {
    _dir: tempfile::TempDir,
    issuer: CertifiedIssuer<'static, KeyPair>,
    pub ca: PathBuf,
    server_cert: PathBuf,
    server_key: PathBuf,
}

impl Pki {
    pub fn new() -> Pki {
        let dir = tempfile::tempdir().unwrap();
        let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca_params
            .distinguished_name
            .push(DnType::CommonName, "ern-registry test CA");
        let ca = CertifiedIssuer::self_signed(ca_params, KeyPair::generate().unwrap()).unwrap();
        let server_key = KeyPair::generate().unwrap();
        let server = CertificateParams::new(vec!["localhost".to_string()])
            .unwrap()
            .signed_by(&server_key, &ca)
            .unwrap();
        let write = |name: &str, pem: String| {
            let path = dir.path().join(name);
            std::fs::write(&path, pem).unwrap();
            path
        };
        Pki {
            ca: write("ca.pem", ca.pem()),
            server_cert: write("server.pem", server.pem()),
            server_key: write("server.key", server_key.serialize_pem()),
            issuer: ca,
            _dir: dir,
        }
    }

    /// A client certificate (PEM) and its key, signed by the CA.
    pub fn client(&self, name: &str) -> (String, String) {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.distinguished_name.push(DnType::CommonName, name);
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        let cert = params.signed_by(&key, &self.issuer).unwrap();
        (cert.pem(), key.serialize_pem())
    }

    pub fn args(&self, mutual: bool) -> ServeArgs {
        ServeArgs {
            tls_cert: Some(self.server_cert.clone()),
            tls_key: Some(self.server_key.clone()),
            tls_client_ca: mutual.then(|| self.ca.clone()),
            ..Default::default()
        }
    }
}

async fn tls_channel(
    app: &TestApp,
    ca: &Path,
    client: Option<&(String, String)>,
) -> Result<Channel, tonic::transport::Error> {
    let mut tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(std::fs::read(ca).unwrap()))
        .domain_name("localhost");
    if let Some((cert, key)) = client {
        tls = tls.identity(Identity::from_pem(cert, key));
    }
    Channel::from_shared(format!("https://localhost:{}", app.addr.port()))
        .unwrap()
        .tls_config(tls)?
        .connect()
        .await
}

fn with_key(
    channel: Channel,
    token: &str,
) -> CaseServiceClient<tonic::service::interceptor::InterceptedService<Channel, Bearer>> {
    let bearer = Bearer(Some(format!("Bearer {token}").parse().unwrap()));
    CaseServiceClient::with_interceptor(channel, bearer)
}

#[tokio::test]
async fn tls_serves_and_plaintext_clients_are_refused() {
    let pki = Pki::new();
    let app = TestApp::spawn_with(pki.args(false)).await;
    app.centre("NL-AMC", "NL", &["ERN-EYE"]).await;
    let token = app
        .principal("dr-tls", Role::Physician, Some("NL-AMC"), &[])
        .await;
    let channel = tls_channel(&app, &pki.ca, None).await.unwrap();
    with_key(channel, &token)
        .submit_case(submission("ERN-EYE", national("NL", &bsn(1))))
        .await
        .unwrap();
    // A plaintext client gets no service from a TLS port.
    let mut plain = app.client(Some(&token)).await;
    let err = plain
        .submit_case(submission("ERN-EYE", national("NL", &bsn(2))))
        .await
        .unwrap_err();
    assert_ne!(err.code(), Code::Ok);
    assert_eq!(app.count("cases").await, 1);
}

#[tokio::test]
async fn mutual_tls_binds_a_client_certificate_to_a_principal() {
    let pki = Pki::new();
    let app = TestApp::spawn_with(pki.args(true)).await;
    app.centre("NL-AMC", "NL", &["ERN-EYE"]).await;
    let token = app
        .principal("dr-mtls", Role::Physician, Some("NL-AMC"), &[])
        .await;
    let own = pki.client("dr-mtls");
    let other = pki.client("someone-else");
    let der = CertificateDer::from_pem_slice(own.0.as_bytes()).unwrap();
    app.store
        .bind_certificate("dr-mtls", &auth::certificate_fingerprint(&der))
        .await
        .unwrap();

    // Its own certificate: served.
    let channel = tls_channel(&app, &pki.ca, Some(&own)).await.unwrap();
    with_key(channel, &token)
        .submit_case(submission("ERN-EYE", national("NL", &bsn(1))))
        .await
        .unwrap();
    // The key over a connection with another (valid) certificate: refused.
    let channel = tls_channel(&app, &pki.ca, Some(&other)).await.unwrap();
    let err = with_key(channel, &token)
        .submit_case(submission("ERN-EYE", national("NL", &bsn(2))))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated, "{}", err.message());
    assert!(err.message().contains("client certificate"));
    // No client certificate at all: the handshake (or the first call) fails.
    let refused = match tls_channel(&app, &pki.ca, None).await {
        Err(_) => true,
        Ok(channel) => with_key(channel, &token)
            .submit_case(submission("ERN-EYE", national("NL", &bsn(3))))
            .await
            .is_err(),
    };
    assert!(refused);
    assert_eq!(app.count("cases").await, 1);
}

#[tokio::test]
async fn plaintext_is_refused_off_loopback_unless_forced() {
    let dir = tempfile::tempdir().unwrap();
    let url = fresh_database(&dir).await;
    let key = dir.path().join("master.key");
    let args = ServeArgs {
        listen: "0.0.0.0:0".parse().unwrap(),
        ..Default::default()
    };
    match Application::build(args.clone(), &url, &key).await {
        Err(StartupError::Plaintext(addr)) => assert_eq!(addr, args.listen),
        Err(other) => panic!("{other}"),
        Ok(_) => panic!("plaintext on 0.0.0.0 was accepted"),
    }
    let forced = ServeArgs {
        allow_plaintext: true,
        ..args
    };
    Application::build(forced, &url, &key).await.unwrap();
}

/// A start refused for its addresses or its TLS files makes no file: no master key, no
/// database, no lock (a claims audit of 2026-12-07 found a new key and database left
/// behind by `serve --listen 0.0.0.0:…`).
#[tokio::test]
async fn a_start_refused_for_its_arguments_leaves_no_file() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let url = format!("sqlite://{}", data.join("registry.db").display());
    let key = data.join("master.key");
    let refused = [
        ServeArgs {
            listen: "0.0.0.0:0".parse().unwrap(),
            ..Default::default()
        },
        ServeArgs {
            console_listen: Some("0.0.0.0:0".parse().unwrap()),
            ..Default::default()
        },
        ServeArgs {
            tls_cert: Some(dir.path().join("missing.crt")),
            tls_key: Some(dir.path().join("missing.key")),
            ..Default::default()
        },
    ];
    for args in refused {
        let Err(err) = Application::build(args.clone(), &url, &key).await else {
            panic!("{args:?} was accepted");
        };
        assert!(
            matches!(
                err,
                StartupError::Plaintext(_)
                    | StartupError::Console(_)
                    | StartupError::TlsFile { .. }
            ),
            "{err}"
        );
        assert!(
            !data.exists(),
            "{err}: left {:?}",
            std::fs::read_dir(&data).map(|d| d.count())
        );
    }
    // A port in use is found once the lock is held (a second server with the same flags
    // hears of the first by its lock), before the master key and the database are made
    // (a re-check of 2026-12-07: a new key's fingerprint then refused the intended one).
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let in_use = ServeArgs {
        listen: taken.local_addr().unwrap(),
        ..Default::default()
    };
    match Application::build(in_use, &url, &key).await {
        Err(StartupError::Listen { .. }) => {}
        Err(other) => panic!("{other}"),
        Ok(_) => panic!("a port in use was taken"),
    }
    assert!(!key.exists(), "a master key was made");
    let db = data.join("registry.db");
    assert_eq!(
        std::fs::metadata(&db).map(|m| m.len()).unwrap_or(0),
        0,
        "a database was made"
    );
    // Then the start with a free port makes them.
    Application::build(ServeArgs::default(), &url, &key)
        .await
        .expect("starts");
    assert!(key.exists());
}

/// The metrics (plain HTTP, naming principals) follow the same rule as plaintext gRPC.
/// That forcing them with --allow-plaintext accepts them is tested in `startup::tests`,
/// so that this test installs no exporter: the process has one, and this binary's
/// metrics test needs it to be its own.
#[tokio::test]
async fn metrics_are_refused_off_loopback() {
    let dir = tempfile::tempdir().unwrap();
    let url = fresh_database(&dir).await;
    let key = dir.path().join("master.key");
    let args = ServeArgs {
        metrics_listen: Some("0.0.0.0:0".parse().unwrap()),
        ..Default::default()
    };
    match Application::build(args.clone(), &url, &key).await {
        Err(StartupError::PlaintextMetrics(addr)) => assert_eq!(Some(addr), args.metrics_listen),
        Err(other) => panic!("{other}"),
        Ok(_) => panic!("metrics on 0.0.0.0 were accepted"),
    }
}

/// A client that opens a connection to the TLS port and never completes the handshake is
/// cut off at the handshake deadline (10 s), not held for ever (nor for the idle timeout).
#[tokio::test]
async fn a_stalled_tls_handshake_is_closed_at_its_deadline() {
    use tokio::io::AsyncReadExt;
    let pki = Pki::new();
    let app = TestApp::spawn_with(pki.args(false)).await;
    let mut stalled = tokio::net::TcpStream::connect(app.addr).await.unwrap();
    let started = std::time::Instant::now();
    let mut byte = [0u8; 1];
    let read = tokio::time::timeout(std::time::Duration::from_secs(60), stalled.read(&mut byte))
        .await
        .expect("the server closes a stalled handshake");
    assert!(matches!(read, Ok(0) | Err(_)), "{read:?}");
    let waited = started.elapsed();
    assert!(
        waited >= std::time::Duration::from_secs(9),
        "closed after {waited:?}: before the deadline"
    );
}
