//! A flood of refused calls against the real server binary, measured from outside: the
//! server's resident memory before, at the end of and after the flood, how many calls it
//! refused and how, and how long a legitimate key's first call takes right after.
//!
//! `cargo bench --bench flood` (SQLite, a temporary data dir, loopback only; bounded in
//! time: `ERN_BENCH_SECONDS`, default 20, of flood). Appends a section to
//! `docs/benchmarks.md` (`ERN_BENCH_WRITE=0` to only print).

#[path = "common/report.rs"]
mod report;

use std::collections::BTreeMap;
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ern_registry::proto::{
    FindExpertiseRequest, GetCaseRequest, case_service_client::CaseServiceClient,
    research_service_client::ResearchServiceClient,
};
use tonic::transport::Channel;

const BIN: &str = env!("CARGO_BIN_EXE_ern-registry");

fn admin(dir: &str, args: &[&str]) -> String {
    let out = Command::new(BIN)
        .args(["--data-dir", dir])
        .args(args)
        .env("ERN_LOG", "warn")
        .output()
        .expect("run the admin command");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn token_of(printed: &str) -> String {
    printed
        .split_whitespace()
        .find(|w| w.starts_with("ern_"))
        .expect("an API key is printed")
        .to_string()
}

/// Resident memory of process `pid`, in MiB.
fn rss_mib(pid: u32) -> Option<f64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let kib: f64 = status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())?;
    Some(kib / 1024.0)
}

async fn call(channel: Channel, token: &str) -> tonic::Code {
    let mut request = tonic::Request::new(GetCaseRequest {
        registry: "ERN-LUNG".into(),
        pseudonym: "EL1-0000000000000000000000000000000000000000".into(),
        include_history: false,
    });
    request
        .metadata_mut()
        .insert("authorization", format!("Bearer {token}").parse().unwrap());
    match CaseServiceClient::new(channel).get_case(request).await {
        Ok(_) => tonic::Code::Ok,
        Err(status) => status.code(),
    }
}

fn main() {
    let seconds: f64 = std::env::var("ERN_BENCH_SECONDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(20.0);
    let dir = tempfile_dir();
    let d = dir.as_str();
    // The first start makes the key; admin commands need it.
    admin(d, &["keygen", "--out", &format!("{d}/master.key")]);
    admin(
        d,
        &[
            "admin",
            "create-centre",
            "--code",
            "NL-AMC",
            "--name",
            "Amsterdam UMC",
            "--country",
            "NL",
            "--ern",
            "ERN-LUNG",
        ],
    );
    let real = token_of(&admin(
        d,
        &[
            "admin",
            "create-principal",
            "--name",
            "dr-a",
            "--role",
            "physician",
            "--centre",
            "NL-AMC",
        ],
    ));
    let key_id = real.split('_').nth(1).unwrap().to_string();
    // Another physician's key for the warm-up, so that `real` is still fresh at the end.
    let warm_key = token_of(&admin(
        d,
        &[
            "admin",
            "create-principal",
            "--name",
            "dr-warm",
            "--role",
            "physician",
            "--centre",
            "NL-AMC",
        ],
    ));
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let mut server = Command::new(BIN)
        .args([
            "--data-dir",
            d,
            "serve",
            "--listen",
            &format!("127.0.0.1:{port}"),
        ])
        .env("ERN_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start the server");
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    let url = format!("http://127.0.0.1:{port}");
    let channel = rt.block_on(async {
        for _ in 0..200 {
            if let Ok(ch) = Channel::from_shared(url.clone()).unwrap().connect().await {
                return ch;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("the server did not come up")
    });
    std::thread::sleep(Duration::from_secs(1));
    let before = rss_mib(server.id()).unwrap_or(0.0);

    // A legitimate warm-up first: 32 connections with a valid key for 5 s, so
    // that what a flood leaves behind is compared with a server that has served as many
    // connections, not with one that never had a caller.
    let warm_end = Instant::now() + Duration::from_secs(5);
    let warm_calls = rt.block_on(async {
        let mut tasks = Vec::new();
        for _ in 0..32 {
            let (url, warm_key) = (url.clone(), warm_key.clone());
            tasks.push(tokio::spawn(async move {
                let channel = Channel::from_shared(url).unwrap().connect().await.unwrap();
                let mut n = 0u64;
                while Instant::now() < warm_end {
                    call(channel.clone(), &warm_key).await;
                    n += 1;
                }
                n
            }));
        }
        let mut total = 0;
        for t in tasks {
            total += t.await.unwrap();
        }
        total
    });
    std::thread::sleep(Duration::from_secs(10));
    let warmed = rss_mib(server.id()).unwrap_or(0.0);

    // 32 connections: half send wrong secrets for the real (public) key id, half garbage.
    let codes: Arc<Mutex<BTreeMap<String, u64>>> = Arc::default();
    let peak = Arc::new(Mutex::new(warmed));
    let mut after_rounds = Vec::new();
    for _round in 0..2 {
        let end = Instant::now() + Duration::from_secs_f64(seconds);
        rt.block_on(async {
            let mut tasks = Vec::new();
            for conn in 0..32 {
                let url = url.clone();
                let codes = codes.clone();
                let key_id = key_id.clone();
                tasks.push(tokio::spawn(async move {
                    let channel = Channel::from_shared(url).unwrap().connect().await.unwrap();
                    let mut n = 0u64;
                    while Instant::now() < end {
                        n += 1;
                        let token = if conn % 2 == 0 {
                            format!("ern_{key_id}_{:064x}", n * 7919 + conn)
                        } else {
                            format!("garbage-{conn}-{n}")
                        };
                        let code = call(channel.clone(), &token).await;
                        *codes
                            .lock()
                            .unwrap()
                            .entry(format!("{code:?}"))
                            .or_default() += 1;
                    }
                }));
            }
            let pid_peak = peak.clone();
            let server_pid = server.id();
            let sampler = tokio::spawn(async move {
                while Instant::now() < end {
                    if let Some(now) = rss_mib(server_pid) {
                        let mut p = pid_peak.lock().unwrap();
                        *p = p.max(now);
                    }
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
            });
            for t in tasks {
                t.await.unwrap();
            }
            sampler.await.unwrap();
        });
        std::thread::sleep(Duration::from_secs(10));
        after_rounds.push(rss_mib(server.id()).unwrap_or(0.0));
    }
    let start = Instant::now();
    let legit = rt.block_on(async {
        let mut request = tonic::Request::new(FindExpertiseRequest {
            orphacodes: vec!["ORPHA:558".into()],
            countries: vec![],
            registries: vec![],
            ..Default::default()
        });
        request
            .metadata_mut()
            .insert("authorization", format!("Bearer {real}").parse().unwrap());
        match ResearchServiceClient::new(channel)
            .find_expertise(request)
            .await
        {
            Ok(_) => tonic::Code::Ok,
            Err(status) => status.code(),
        }
    });
    let first_call = start.elapsed();
    server.kill().ok();
    server.wait().ok();
    let _ = std::fs::remove_dir_all(d);

    let total: u64 = codes.lock().unwrap().values().sum();
    let codes_text: Vec<String> = codes
        .lock()
        .unwrap()
        .iter()
        .map(|(c, n)| format!("{c} {n}"))
        .collect();
    let out = format!(
        "\n## A flood of refused calls, {}\n\n`cargo bench --bench flood`: the release binary on \
         SQLite, 32 connections from one loopback peer, twice {seconds:.0} s, half with wrong \
         secrets for a real key id, half with garbage tokens (default limits). Measured from \
         outside (`/proc/<pid>/status`).\n\n\
         | figure | value |\n|---|---:|\n\
         | calls sent | {total} ({:.0}/s) |\n\
         | answers | {} |\n\
         | server RSS before | {before:.1} MiB |\n\
         | server RSS 10 s after a legitimate warm-up (another physician's valid key, 32 connections, 5 s, {warm_calls} calls) | {warmed:.1} MiB |\n\
         | server RSS peak during the flood | {:.1} MiB |\n\
         | server RSS 10 s after the first flood | {:.1} MiB |\n\
         | server RSS 10 s after a second, identical flood | {:.1} MiB |\n\
         | a legitimate key's first call right after (FindExpertise, OK expected) | {:?}, {:.1} ms |\n",
        chrono::Utc::now().format("%Y-%m-%d"),
        total as f64 / (2.0 * seconds),
        codes_text.join(", "),
        *peak.lock().unwrap(),
        after_rounds[0],
        after_rounds[1],
        legit,
        first_call.as_secs_f64() * 1e3,
    );
    report::publish(&out);
}

fn tempfile_dir() -> String {
    let dir = std::env::temp_dir().join(format!("ern-flood-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir.display().to_string()
}
