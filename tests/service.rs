//! Running as a service: sd_notify, the watchdog, graceful stop, freebind,
//! and JSON logs — all against the real daemon binary.

mod common;

use std::process::Command;
use std::time::{Duration, Instant};

use common::*;
use sha2::{Digest, Sha256};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::task::block_in_place;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn notifies_ready_reloading_stopping_in_order_and_pings_the_watchdog() {
    let a = NamedBackend::start("a").await;
    let notify = NotifySocket::new();
    let mut d = Daemon::start_env(
        &listener_toml("roundrobin", "", &[b("a", a.addr)]),
        &[],
        &[
            ("NOTIFY_SOCKET", &notify.path),
            ("WATCHDOG_USEC", "1000000"),
        ],
    );
    let mut pings = Vec::new();
    let ready = notify.next(&mut pings);
    assert!(ready.lines().any(|l| l == "READY=1"), "{ready:?}");
    // Serving by then.
    assert_eq!(connect_named(d.addr("l")).await.backend, "a");

    d.signal("HUP");
    let reloading = notify.next(&mut pings);
    assert!(
        reloading.lines().any(|l| l == "RELOADING=1"),
        "{reloading:?}"
    );
    let usec: u64 = reloading
        .lines()
        .find_map(|l| l.strip_prefix("MONOTONIC_USEC="))
        .expect("MONOTONIC_USEC with RELOADING=1")
        .parse()
        .unwrap();
    assert!(usec > 0);
    let again = notify.next(&mut pings);
    assert!(again.lines().any(|l| l == "READY=1"), "{again:?}");

    // Collect watchdog pings for a while (the socket read has a deadline).
    let first = pings.len();
    while pings.len() < first + 4 {
        let (msg, _) = notify.next_from();
        assert_eq!(msg, "WATCHDOG=1\n");
        pings.push(Instant::now());
    }
    let gaps: Vec<Duration> = pings[first..].windows(2).map(|w| w[1] - w[0]).collect();
    // Every gap well inside the 1 s watchdog period (pings at half of it),
    // and not spamming either.
    for gap in &gaps {
        assert!(*gap < Duration::from_millis(950), "gap {gap:?} in {gaps:?}");
    }
    let mean = gaps.iter().sum::<Duration>() / gaps.len() as u32;
    assert!(mean >= Duration::from_millis(250), "mean {mean:?}");

    d.signal("TERM");
    let stopping = notify.next(&mut pings);
    assert!(stopping.lines().any(|l| l == "STOPPING=1"), "{stopping:?}");
    assert_eq!(block_in_place(|| d.wait_exit()), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_refuses_new_connections_and_lets_a_stream_finish() {
    let a = NamedBackend::start("a").await;
    let mut d = Daemon::start(&format!(
        "[global]\nshutdown_timeout = \"60s\"\n{}",
        listener_toml("roundrobin", "", &[b("a", a.addr)])
    ));
    let proxy = d.addr("l");
    let s = connect_named(proxy).await;
    let (mut r, mut w) = s.stream.into_split();
    let reader = tokio::spawn(async move {
        let mut got = Vec::new();
        r.read_to_end(&mut got).await.unwrap();
        got
    });
    let chunk: Vec<u8> = (0..1 << 20).map(|i: u32| (i % 253) as u8).collect();
    let mut sent = Sha256::new();
    for i in 0..8 {
        if i == 2 {
            d.signal("TERM");
            block_in_place(|| d.log_until(|l| l.contains("stopped accepting")));
            assert!(
                tokio::net::TcpStream::connect(proxy).await.is_err(),
                "still accepting"
            );
        }
        w.write_all(&chunk).await.unwrap();
        sent.update(&chunk);
    }
    w.shutdown().await.unwrap();
    let got = within("stream end", reader).await.unwrap();
    assert_eq!(got.len(), 8 << 20);
    assert_eq!(Sha256::digest(&got), sent.finalize());
    assert_eq!(block_in_place(|| d.wait_exit()), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_timeout_cuts_what_is_still_open() {
    let a = NamedBackend::start("a").await;
    let mut d = Daemon::start(&format!(
        "[global]\nshutdown_timeout = \"400ms\"\n{}",
        listener_toml("roundrobin", "", &[b("a", a.addr)])
    ));
    let mut open = connect_named(d.addr("l")).await;
    let start = tokio::time::Instant::now();
    d.signal("TERM");
    assert!(within("cut at shutdown_timeout", closed_by_peer(&mut open.stream)).await);
    assert!(
        start.elapsed() >= Duration::from_millis(400),
        "cut after {:?}",
        start.elapsed()
    );
    assert_eq!(block_in_place(|| d.wait_exit()), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_sigterm_stops_at_once() {
    let a = NamedBackend::start("a").await;
    let mut d = Daemon::start(&format!(
        "[global]\nshutdown_timeout = \"1h\"\n{}",
        listener_toml("roundrobin", "", &[b("a", a.addr)])
    ));
    let _open = connect_named(d.addr("l")).await;
    d.signal("TERM");
    block_in_place(|| d.log_until(|l| l.contains("waiting for open connections")));
    d.signal("TERM");
    assert_eq!(block_in_place(|| d.wait_exit()), 0);
}

/// Run the daemon on a config that must fail to start; its output.
fn run_failing(toml: &str) -> std::process::Output {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("c.toml");
    std::fs::write(&path, toml).unwrap();
    let child = Command::new(binary())
        .args(["run", "--config"])
        .arg(&path)
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let pid = child.id();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    match rx.recv_timeout(DEADLINE) {
        Ok(out) => out.unwrap(),
        Err(_) => {
            let _ = Command::new("kill").args(["-9", &pid.to_string()]).status();
            panic!("daemon kept running on a config that cannot bind");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn freebind_binds_an_address_this_host_does_not_have() {
    let a = NamedBackend::start("a").await;
    // 192.0.2.10 is TEST-NET-1: no interface has it, nothing is sent to it.
    let vip =
        listener_toml("roundrobin", "", &[b("a", a.addr)]).replace("127.0.0.1:0", "192.0.2.10:0");
    let with = vip.replace("algorithm = ", "freebind = true\nalgorithm = ");
    let d = Daemon::start(&with);
    assert_eq!(d.addr("l").ip().to_string(), "192.0.2.10");
    drop(d);

    let out = block_in_place(|| run_failing(&vip));
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("listener `l`"), "{stderr}");
    assert!(stderr.contains("192.0.2.10:0"), "{stderr}");
    assert!(stderr.contains("freebind = true"), "hint missing: {stderr}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_logs_are_one_object_per_line_with_fields() {
    let a = NamedBackend::start("a").await;
    let mut d = Daemon::start_with(
        &listener_toml("roundrobin", "", &[b("a", a.addr)]),
        &["--log-format", "json"],
    );
    d.signal("HUP");
    block_in_place(|| d.log_until(|l| l.contains("configuration reloaded")));
    let line = d
        .raw
        .iter()
        .rev()
        .find(|l| l.contains("configuration reloaded"))
        .unwrap();
    let v: serde_json::Value = serde_json::from_str(line).expect("a JSON object per line");
    assert_eq!(v["fields"]["message"], "configuration reloaded");
    assert_eq!(v["fields"]["changes"], 0);
    assert_eq!(v["level"], "INFO");
    // Every line written so far is a JSON object with a message.
    assert!(d.raw.len() >= 4, "{:?}", d.raw);
    for line in &d.raw {
        let v: serde_json::Value =
            serde_json::from_str(line).unwrap_or_else(|e| panic!("{e}: {line}"));
        assert!(v["fields"]["message"].is_string(), "{line}");
    }
    assert!(v["timestamp"].is_string());
}
