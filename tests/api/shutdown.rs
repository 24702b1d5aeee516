//! Shutdown with a deadline, against the real binary as a child process: SIGTERM while a
//! client holds an idle `SubmitCases` stream open. Without a deadline the stream would
//! keep the server alive until the client gave up, past the 30 s after which Kubernetes
//! and Docker kill the process; with `--shutdown-grace-secs` the stream is ended with
//! UNAVAILABLE when the grace is over, the process exits 0, and the write it acknowledged
//! before is in the database.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use ern_registry::auth::Role;
use ern_registry::proto::case_service_client::CaseServiceClient;
use ern_registry::proto::submit_cases_result::Outcome;
use tokio_stream::wrappers::ReceiverStream;
use tonic::Code;
use tonic::transport::Channel;

use crate::helpers::{Bearer, TestApp, bsn, national, submission};

const GRACE: Duration = Duration::from_secs(2);
/// Time allowed beyond the grace: the writer's flush, closing, a loaded test machine.
const MARGIN: Duration = Duration::from_secs(8);

/// The server process, killed if the test ends without it having exited.
struct Server(Child);

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_ends_an_idle_stream_at_the_grace_and_exits_0_keeping_acknowledged_writes() {
    // The database and a physician, made by an in-process server that is then stopped;
    // the binary starts on the same files (data dir, master key).
    let mut app = TestApp::spawn().await;
    app.centre("NL-TERM", "NL", &["ERN-LUNG"]).await;
    let token = app
        .principal("dr-term", Role::Physician, Some("NL-TERM"), &[])
        .await;
    app.stop_server().await;

    let mut child = Command::new(env!("CARGO_BIN_EXE_ern-registry"))
        .args(["serve", "--listen", "127.0.0.1:0", "--shutdown-grace-secs"])
        .arg(GRACE.as_secs().to_string())
        .env("DATABASE_URL", &app.database_url)
        .env("ERN_DATA_DIR", app.dir.path())
        .env("ERN_LOG", "info")
        .env("ERN_LOG_FORMAT", "text")
        .env_remove("ERN_MASTER_PASSPHRASE")
        .env_remove("ERN_MASTER_PASSPHRASE_FILE")
        .env_remove("ERN_MASTER_KEY_FILE")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("the binary starts");
    let stderr = child.stderr.take().unwrap();
    let pid = child.id();
    let mut server = Server(child);
    let (lines_tx, lines) = mpsc::channel::<String>();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if lines_tx.send(line).is_err() {
                break;
            }
        }
    });
    let mut log = Vec::new();
    let addr = loop {
        let line = lines
            .recv_timeout(Duration::from_secs(30))
            .unwrap_or_else(|_| panic!("the server did not get ready:\n{}", log.join("\n")));
        if let Some(at) = line.find("local_addr=") {
            let addr = line[at + "local_addr=".len()..]
                .split_whitespace()
                .next()
                .unwrap()
                .to_owned();
            log.push(line);
            break addr;
        }
        log.push(line);
    };

    let channel = Channel::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let bearer = Bearer(Some(format!("Bearer {token}").parse().unwrap()));
    let mut client = CaseServiceClient::with_interceptor(channel, bearer);
    let (submissions, queue) = tokio::sync::mpsc::channel(4);
    submissions
        .send(submission("ERN-LUNG", national("NL", &bsn(6100))))
        .await
        .unwrap();
    let mut results = client
        .submit_cases(ReceiverStream::new(queue))
        .await
        .unwrap()
        .into_inner();
    let first = results.message().await.unwrap().expect("a result");
    assert!(
        matches!(first.outcome, Some(Outcome::Accepted(_))),
        "{first:?}"
    );
    // The stream now stays open and idle: `submissions` is held, nothing more is sent.

    let signalled = Instant::now();
    let killed = Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status()
        .unwrap();
    assert!(killed.success());

    let ended = tokio::time::timeout(GRACE + MARGIN, results.message())
        .await
        .expect("the open stream is ended within the grace");
    let status = ended.expect_err("the stream ends with a status, not a result");
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    // The stream was given the grace: not cut at the signal.
    assert!(
        signalled.elapsed() >= GRACE - Duration::from_millis(200),
        "ended after {:?}",
        signalled.elapsed()
    );

    let exit = loop {
        if let Some(exit) = server.0.try_wait().unwrap() {
            break exit;
        }
        if signalled.elapsed() > GRACE + MARGIN {
            while let Ok(line) = lines.try_recv() {
                log.push(line);
            }
            panic!(
                "still running {:?} after SIGTERM:\n{}",
                signalled.elapsed(),
                log.join("\n")
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    while let Ok(line) = lines.try_recv() {
        log.push(line);
    }
    assert!(exit.success(), "exit {exit:?}:\n{}", log.join("\n"));
    // The writer finished its queue: nothing still holds it after the server stopped.
    assert!(
        !log.iter().any(|l| l.contains("did not finish its queue")),
        "{}",
        log.join("\n")
    );
    drop(submissions);

    // The submission it acknowledged is in the database.
    assert_eq!(app.count("cases").await, 1);
}
