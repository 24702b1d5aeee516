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
