//! The command line as a shell uses it.

use std::process::{Command, Stdio};

/// `ern-registry admin list-registries | head -0`: the reader is gone before the first
/// line is written. The process ends as SIGPIPE ends other Unix tools (status 141, not
/// success), without a panic.
#[test]
fn output_into_a_closed_pipe_ends_quietly_and_unsuccessfully() {
    let dir = tempfile::tempdir().unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_ern-registry"))
        .arg("--data-dir")
        .arg(dir.path())
        .args(["admin", "list-registries"])
        .env("ERN_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Closed at once: the binary opens (and creates) the database before it prints.
    drop(child.stdout.take());
    let output = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert_eq!(output.status.code(), Some(141), "{stderr}");
}

/// A server out of file descriptors says so (at most every 10 s), pauses its accepting
/// instead of retrying at once, and accepts again once connections close. Started with
/// an open-files limit of 96 (soft and hard: it cannot raise it), it also warns at start
/// that the limit leaves too few beside `--max-connections`.
#[tokio::test]
async fn a_server_out_of_file_descriptors_says_so_and_accepts_again() {
    let dir = tempfile::tempdir().unwrap();
    let port = crate::helpers::free_port();
    let log = dir.path().join("server.log");
    let mut child = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "ulimit -n 96 && exec \"$0\" --data-dir '{}' serve --listen 127.0.0.1:{port} --max-connections-per-peer 1000 2> '{}'",
            dir.path().display(),
            log.display()
        ))
        .arg(env!("CARGO_BIN_EXE_ern-registry"))
        .env("ERN_LOG", "warn")
        .env_remove("DATABASE_URL")
        .env_remove("ERN_MASTER_KEY_FILE")
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let addr: std::net::SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let health = || async move {
        let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
            .unwrap()
            .connect_timeout(std::time::Duration::from_secs(2))
            .timeout(std::time::Duration::from_secs(2))
            .connect()
            .await
            .map_err(|e| e.to_string())?;
        tonic_health::pb::health_client::HealthClient::new(channel)
            .check(tonic_health::pb::HealthCheckRequest::default())
            .await
            .map_err(|e| e.to_string())
            .map(|_| ())
    };
    // Whether a health check succeeds within `tries` tenths of a second.
    let answers = |tries: usize| async move {
        for _ in 0..tries {
            if health().await.is_ok() {
                return true;
            }
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        }
        false
    };
    assert!(
        answers(100).await,
        "{}",
        std::fs::read_to_string(&log).unwrap_or_default()
    );
    // More connections than descriptors are left.
    let mut held = Vec::new();
    for _ in 0..120 {
        if let Ok(tcp) = tokio::net::TcpStream::connect(addr).await {
            held.push(tcp);
        }
    }
    tokio::time::sleep(std::time::Duration::from_secs(2)).await;
    let during = std::fs::read_to_string(&log).unwrap();
    let warned = during
        .matches("cannot accept gRPC connections: out of file descriptors")
        .count();
    assert!((1..=2).contains(&warned), "warned {warned} times: {during}");
    assert!(
        during.contains("the open-files limit leaves too few descriptors"),
        "{during}"
    );
    drop(held);
    let again = answers(50).await;
    let _ = child.kill();
    let _ = child.wait();
    assert!(again, "{}", std::fs::read_to_string(&log).unwrap());
}

/// The counters without labels are exported at 0 from the start (an alert on one has a
/// series before its first occurrence); before 2026-12-07 they appeared only then.
#[tokio::test]
async fn counters_without_labels_are_exported_at_zero_from_the_start() {
    use std::io::{Read, Write};
    let dir = tempfile::tempdir().unwrap();
    let (port, metrics) = (crate::helpers::free_port(), crate::helpers::free_port());
    let mut child = Command::new(env!("CARGO_BIN_EXE_ern-registry"))
        .arg("--data-dir")
        .arg(dir.path())
        .args(["serve", "--listen", &format!("127.0.0.1:{port}")])
        .args(["--metrics-listen", &format!("127.0.0.1:{metrics}")])
        .env("ERN_LOG", "warn")
        .env_remove("DATABASE_URL")
        .env_remove("ERN_MASTER_KEY_FILE")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let scrape = || -> std::io::Result<String> {
        let mut tcp = std::net::TcpStream::connect(("127.0.0.1", metrics))?;
        tcp.write_all(b"GET /metrics HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")?;
        let mut text = String::new();
        tcp.read_to_string(&mut text)?;
        Ok(text)
    };
    let mut text = String::new();
    for _ in 0..200 {
        match scrape() {
            Ok(t) if t.starts_with("HTTP/1.1 200") => {
                text = t;
                break;
            }
            _ => tokio::time::sleep(std::time::Duration::from_millis(100)).await,
        }
    }
    let _ = child.kill();
    let _ = child.wait();
    for name in ern_registry::startup::ZERO_FROM_THE_START {
        assert!(
            text.lines().any(|l| l == format!("{name} 0")),
            "{name} not at 0: {text}"
        );
    }
}
