//! Live upgrade (SIGUSR2) against the real daemon binary, run from a copy
//! in a temp dir so a test can put another executable at its path: open
//! connections move to the new process byte-exact, no client is refused,
//! backend state and counters carry over, a failing executable changes
//! nothing, and pgbench sessions survive upgrades without reconnecting.

mod common;
mod db;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use common::*;
use sha2::{Digest, Sha256};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::block_in_place;

/// The daemon binary copied into a temp dir: the path a live upgrade starts.
struct Exe {
    dir: tempfile::TempDir,
}

impl Exe {
    fn new() -> Exe {
        become_subreaper();
        let exe = Exe {
            dir: tempfile::tempdir().unwrap(),
        };
        exe.install_binary();
        exe
    }

    fn path(&self) -> PathBuf {
        self.dir.path().join("switchyard")
    }

    /// Put a file at the path as a package upgrade does: written beside it,
    /// renamed over (the running executable is never written to).
    fn install(&self, write: impl FnOnce(&Path)) {
        use std::os::unix::fs::PermissionsExt;
        let tmp = self.dir.path().join("switchyard.new");
        write(&tmp);
        std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o755)).unwrap();
        std::fs::rename(&tmp, self.path()).unwrap();
    }

    fn install_binary(&self) {
        self.install(|p| {
            std::fs::copy(binary(), p).unwrap();
        });
    }

    fn install_script(&self, script: &str) {
        self.install(|p| std::fs::write(p, script).unwrap());
    }

    fn start(&self, toml: &str) -> Daemon {
        Daemon::start_exe(&self.path(), toml, &[], &[])
    }

    /// Start as systemd would: `NOTIFY_SOCKET`, and a watchdog whose
    /// `WATCHDOG_PID` is the daemon's own pid (a wrapper sets it, then
    /// execs the binary at the path).
    fn start_notified(&self, toml: &str, notify: &NotifySocket, watchdog_usec: u64) -> Daemon {
        let wrapper = self.dir.path().join("as-systemd.sh");
        std::fs::write(
            &wrapper,
            format!(
                "#!/bin/sh\nWATCHDOG_PID=$$ exec {} \"$@\"\n",
                self.path().display()
            ),
        )
        .unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&wrapper, std::fs::Permissions::from_mode(0o755)).unwrap();
        let usec = watchdog_usec.to_string();
        let envs = [
            ("NOTIFY_SOCKET", notify.path.as_str()),
            ("WATCHDOG_USEC", usec.as_str()),
        ];
        Daemon::start_exe(&wrapper, toml, &[], &envs)
    }
}

/// Byte `i` of a test stream: deterministic, not periodic in any small
/// power of two, so a dropped, repeated or reordered chunk shows.
fn stream_byte(seed: u64, i: u64) -> u8 {
    let x = (i ^ (i >> 13) ^ seed).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    (x >> 56) as u8
}

/// Send the stream until `stop`, at most `limit` bytes, then half-close;
/// the bytes sent and their SHA-256.
async fn send_stream(
    mut w: tokio::net::tcp::OwnedWriteHalf,
    seed: u64,
    stop: Arc<AtomicBool>,
    limit: u64,
) -> (u64, [u8; 32]) {
    let mut sha = Sha256::new();
    let mut sent = 0u64;
    let mut chunk = vec![0u8; 16 * 1024];
    while !stop.load(Ordering::Relaxed) && sent < limit {
        for (k, b) in chunk.iter_mut().enumerate() {
            *b = stream_byte(seed, sent + k as u64);
        }
        w.write_all(&chunk).await.expect("the stream is never cut");
        sha.update(&chunk);
        sent += chunk.len() as u64;
    }
    w.shutdown().await.unwrap();
    (sent, sha.finalize().into())
}

/// Read the stream to its end, checking every byte; its length and SHA-256.
async fn check_stream(mut r: tokio::net::tcp::OwnedReadHalf, seed: u64) -> (u64, [u8; 32]) {
    let mut sha = Sha256::new();
    let mut got = 0u64;
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = r.read(&mut buf).await.expect("the stream is never cut");
        if n == 0 {
            return (got, sha.finalize().into());
        }
        for (k, &b) in buf[..n].iter().enumerate() {
            let at = got + k as u64;
            assert_eq!(b, stream_byte(seed, at), "byte {at} of stream {seed:#x}");
        }
        sha.update(&buf[..n]);
        got += n as u64;
    }
}

fn listener(name: &str, extra: &str, backends: &[(&str, SocketAddr)]) -> String {
    let mut t = format!(
        "[[listener]]\nname = \"{name}\"\nbind = \"127.0.0.1:0\"\nidle_timeout = \"1h\"\n{extra}\n"
    );
    for (b, addr) in backends {
        t += &format!("[[listener.backend]]\nname = \"{b}\"\naddress = \"{addr}\"\n");
    }
    t
}

const ADMIN: &str = "[admin]\nbind = \"127.0.0.1:0\"\n";

/// One connection streams a checksummed byte stream each way, both at
/// once and as fast as they go, across ten upgrades: it is never closed,
/// every byte arrives once and in order, every old process exits 0, every
/// new one has a pid of its own.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_both_ways_moves_byte_exact_across_ten_upgrades() {
    let exe = Exe::new();
    let backend = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let baddr = backend.local_addr().unwrap();
    let toml = listener(
        "s",
        "[listener.health_check]\nkind = \"none\"",
        &[("b", baddr)],
    );
    let mut d = block_in_place(|| exe.start(&toml));
    let stop = Arc::new(AtomicBool::new(false));
    const LIMIT: u64 = 8 << 30;
    let (c2b_seed, b2c_seed) = (0x1234_5678, 0x9abc_def0);

    let client = TcpStream::connect(d.addr("s")).await.unwrap();
    let (server, _) = within("backend accept", backend.accept()).await.unwrap();
    let (cr, cw) = client.into_split();
    let (sr, sw) = server.into_split();
    let up = tokio::spawn(send_stream(cw, c2b_seed, stop.clone(), LIMIT));
    let down = tokio::spawn(send_stream(sw, b2c_seed, stop.clone(), LIMIT));
    let at_backend = tokio::spawn(check_stream(sr, c2b_seed));
    let at_client = tokio::spawn(check_stream(cr, b2c_seed));

    let mut pids = vec![d.pid];
    for _ in 0..10 {
        let code = block_in_place(|| d.upgrade());
        assert_eq!(code, 0, "the old process exits 0");
        assert!(!pids.contains(&d.pid), "pid {} again", d.pid);
        pids.push(d.pid);
    }
    stop.store(true, Ordering::Relaxed);
    let (sent_up, sha_up) = within("client stream", up).await.unwrap();
    let (sent_down, sha_down) = within("backend stream", down).await.unwrap();
    let (got_up, rsha_up) = within("backend read", at_backend).await.unwrap();
    let (got_down, rsha_down) = within("client read", at_client).await.unwrap();
    assert_eq!((got_up, rsha_up), (sent_up, sha_up), "client → backend");
    assert_eq!(
        (got_down, rsha_down),
        (sent_down, sha_down),
        "backend → client"
    );
    assert!(
        sent_up > 0 && sent_down > 0,
        "both directions moved bytes ({sent_up}, {sent_down})"
    );
}

/// A client loop opens connections one after another (each: connect, send,
/// read the echo, close) across ten upgrades: not one is refused or fails.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_connecting_throughout_ten_upgrades_are_all_served() {
    let exe = Exe::new();
    let b = NamedBackend::start("b").await;
    let toml = listener(
        "c",
        "[listener.health_check]\nkind = \"none\"",
        &[("b", b.addr)],
    );
    let mut d = block_in_place(|| exe.start(&toml));
    let addr = d.addr("c");
    let stop = Arc::new(AtomicBool::new(false));
    let served = Arc::new(AtomicU64::new(0));
    let clients = {
        let (stop, served) = (stop.clone(), served.clone());
        tokio::spawn(async move {
            let mut failures = Vec::new();
            let mut n = 0u64;
            while !stop.load(Ordering::Relaxed) && n < 1_000_000 {
                n += 1;
                let attempt = async {
                    let mut s = connect_named(addr).await;
                    let msg = format!("ping {n}\n");
                    s.stream.write_all(msg.as_bytes()).await?;
                    let mut back = vec![0; msg.len()];
                    s.stream.read_exact(&mut back).await?;
                    std::io::Result::Ok(back == msg.as_bytes() && s.backend == "b")
                };
                match tokio::time::timeout(DEADLINE, attempt).await {
                    Ok(Ok(true)) => {
                        served.fetch_add(1, Ordering::Relaxed);
                    }
                    other => failures.push(format!("connection {n}: {other:?}")),
                }
            }
            failures
        })
    };
    for _ in 0..10 {
        let before = served.load(Ordering::Relaxed);
        assert_eq!(block_in_place(|| d.upgrade()), 0);
        // Every process serves some of the loop's connections.
        wait_for("connections through the new process", || {
            served.load(Ordering::Relaxed) >= before + 5
        })
        .await;
    }
    stop.store(true, Ordering::Relaxed);
    let failures = within("client loop", clients).await.unwrap();
    assert!(
        failures.is_empty(),
        "{} failed: {:?}",
        failures.len(),
        &failures[..failures.len().min(5)]
    );
    assert!(served.load(Ordering::Relaxed) >= 50);
}

/// (health, admin state) of every backend of listener `l`.
async fn states(admin: SocketAddr) -> Vec<(String, String, String)> {
    let mut v: Vec<_> = status_backends(admin, "l")
        .await
        .into_iter()
        .map(|(name, b)| {
            let s = |k: &str| b[k].as_str().unwrap_or("?").to_owned();
            (name, s("health"), s("admin_state"))
        })
        .collect();
    v.sort();
    v
}

/// A backend marked down stays down and a drained one stays drained in the
/// new process from its first answer on, and no counter goes backwards:
/// connections, bytes and the duration histogram scraped before, during
/// and after three upgrades only ever grow.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_admin_state_and_counters_carry_over() {
    let exe = Exe::new();
    let (a, b, c) = (
        NamedBackend::start("a").await,
        NamedBackend::start("b").await,
        NamedBackend::start("c").await,
    );
    let toml = format!(
        "{ADMIN}{}",
        listener(
            "l",
            "[listener.health_check]\ninterval = \"200ms\"\ntimeout = \"150ms\"",
            &[("a", a.addr), ("b", b.addr), ("c", c.addr)]
        )
    );
    let mut d = block_in_place(|| exe.start(&toml));
    let admin = d.admin.expect("admin address");
    let proxy = d.addr("l");
    // Traffic, so the counters have something to carry.
    for _ in 0..12 {
        let mut s = connect_named(proxy).await;
        s.stream.write_all(b"x").await.unwrap();
        let mut one = [0u8; 1];
        s.stream.read_exact(&mut one).await.unwrap();
    }
    b.stop();
    let path = "/api/v1/listeners/l/backends/c/state";
    assert_eq!(http(admin, "PUT", path, &[], "drain").await.0, 200);
    let expected = vec![
        ("a".to_owned(), "up".to_owned(), "ready".to_owned()),
        ("b".to_owned(), "down".to_owned(), "ready".to_owned()),
        ("c".to_owned(), "up".to_owned(), "drain".to_owned()),
    ];
    eventually("b down, c drained", || async {
        let s = states(admin).await;
        if s == expected {
            Ok(())
        } else {
            Err(format!("{s:?}"))
        }
    })
    .await;

    let before = read_values(&scrape(admin).await);
    assert!(
        before.iter().all(|&v| v > 0.0),
        "every watched series has counted: {before:?}"
    );

    // Scrape all the time: whichever process answers, nothing shrinks.
    let stop = Arc::new(AtomicBool::new(false));
    let scraper = {
        let (stop, first) = (stop.clone(), before.clone());
        tokio::spawn(async move {
            let mut last = first;
            let mut scrapes = 0;
            while !stop.load(Ordering::Relaxed) && scrapes < 100_000 {
                let Ok(Ok((200, body))) = tokio::time::timeout(DEADLINE, http_try(admin)).await
                else {
                    continue; // between two processes a scrape may fail; none may go back
                };
                let s = prometheus_parse::Scrape::parse(body.lines().map(|l| Ok(l.to_owned())))
                    .unwrap();
                let now: Vec<f64> = read_values(&s);
                for (i, (was, is)) in last.iter().zip(&now).enumerate() {
                    assert!(is >= was, "series {i} went back from {was} to {is}");
                }
                last = now;
                scrapes += 1;
            }
            scrapes
        })
    };
    for _ in 0..3 {
        assert_eq!(block_in_place(|| d.upgrade()), 0);
        // The new process's first answer already has the carried state.
        assert_eq!(states(admin).await, expected);
    }
    stop.store(true, Ordering::Relaxed);
    let scrapes = within("scraper", scraper).await.unwrap();
    assert!(scrapes > 0);
    let after = read_values(&scrape(admin).await);
    for (i, (was, is)) in before.iter().zip(&after).enumerate() {
        assert!(
            is >= was,
            "series {i}: {was} before the upgrades, {is} after"
        );
    }
    let s = scrape(admin).await;
    assert_eq!(
        sample_value(&s, "switchyard_upgrades_total", &[("result", "success")]),
        Some(3.0)
    );
    assert_eq!(
        sample_value(&s, "switchyard_upgrades_total", &[("result", "failure")]),
        Some(0.0)
    );
    // b comes back when its server does: probing went on from "down".
    let b2 = NamedBackend::start_on(b.addr, "b").await;
    eventually("b up again", || async {
        let s = states(admin).await;
        if s[1].1 == "up" {
            Ok(())
        } else {
            Err(format!("{s:?}"))
        }
    })
    .await;
    drop(b2);
}

/// The series `health_admin_state_and_counters_carry_over` watches (-1:
/// missing).
fn read_values(scrape: &prometheus_parse::Scrape) -> Vec<f64> {
    let watched: [(&str, &[(&str, &str)]); 5] = [
        (
            "switchyard_connections_total",
            &[("listener", "l"), ("backend", "a")],
        ),
        (
            "switchyard_connections_total",
            &[("listener", "l"), ("backend", "c")],
        ),
        (
            "switchyard_bytes_total",
            &[
                ("listener", "l"),
                ("backend", "a"),
                ("direction", "client_to_backend"),
            ],
        ),
        (
            "switchyard_connection_duration_seconds_count",
            &[("listener", "l")],
        ),
        (
            "switchyard_health_checks_total",
            &[("listener", "l"), ("backend", "b"), ("result", "failure")],
        ),
    ];
    watched
        .iter()
        .map(|(name, labels)| sample_value(scrape, name, labels).unwrap_or(-1.0))
        .collect()
}

/// One scrape that may fail (the admin socket is between processes).
async fn http_try(admin: SocketAddr) -> std::io::Result<(u16, String)> {
    let mut s = TcpStream::connect(admin).await?;
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .await?;
    let mut out = Vec::new();
    s.read_to_end(&mut out).await?;
    let text = String::from_utf8_lossy(&out).into_owned();
    let code = text
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    // Chunked bodies are not expected from the admin endpoint's /metrics.
    Ok((code, body))
}

/// An executable that exits 1 at the path: the old process notices, keeps
/// serving everything and counts the failure; one that hangs is killed
/// after 30 s, and a SIGUSR2 meanwhile is ignored; the real binary put back
/// afterwards upgrades, and the new process has the failures counted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_executable_changes_nothing_and_is_counted() {
    let exe = Exe::new();
    let b = NamedBackend::start("b").await;
    let toml = format!(
        "{ADMIN}{}",
        listener(
            "c",
            "[listener.health_check]\nkind = \"none\"",
            &[("b", b.addr)]
        )
    );
    let mut d = block_in_place(|| exe.start(&toml));
    let (admin, proxy) = (d.admin.unwrap(), d.addr("c"));
    let mut held = connect_named(proxy).await;

    exe.install_script("#!/bin/sh\nexit 1\n");
    d.signal("USR2");
    let line = block_in_place(|| d.log_until(|l| l.contains("live upgrade failed")));
    assert!(line.contains("exited"), "{line}");
    assert!(d.alive());
    let s = scrape(admin).await;
    assert_eq!(
        sample_value(&s, "switchyard_upgrades_total", &[("result", "failure")]),
        Some(1.0)
    );
    assert_eq!(connect_named(proxy).await.backend, "b", "still serving");

    exe.install_script("#!/bin/sh\nexec sleep 120\n");
    d.signal("USR2");
    block_in_place(|| d.log_until(|l| l.contains("live upgrade: new process started")));
    d.signal("USR2");
    block_in_place(|| d.log_until(|l| l.contains("SIGUSR2 during a live upgrade: ignored")));
    let started = std::time::Instant::now();
    // The hello timeout (30 s) is longer than the usual log deadline.
    let line = block_in_place(|| {
        d.log_until_for(Duration::from_secs(30) + DEADLINE, |l| {
            l.contains("live upgrade failed")
        })
    });
    assert!(line.contains("did not take over within 30s"), "{line}");
    assert!(started.elapsed() < Duration::from_secs(60));
    assert!(d.alive());
    assert_eq!(connect_named(proxy).await.backend, "b", "still serving");

    exe.install_binary();
    assert_eq!(block_in_place(|| d.upgrade()), 0);
    let s = scrape(admin).await;
    assert_eq!(
        sample_value(&s, "switchyard_upgrades_total", &[("result", "failure")]),
        Some(2.0)
    );
    assert_eq!(
        sample_value(&s, "switchyard_upgrades_total", &[("result", "success")]),
        Some(1.0)
    );
    // The connection held all along moved too.
    held.stream.write_all(b"still here\n").await.unwrap();
    let mut back = [0u8; 11];
    within("echo", held.stream.read_exact(&mut back))
        .await
        .unwrap();
    assert_eq!(&back, b"still here\n");
}

/// pgbench (8 clients, -T 20) through switchyard across 3 upgrades: no
/// failed transaction, no aborted client, and PostgreSQL saw exactly the
/// sessions pgbench opened at its start: the sessions themselves moved.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pgbench_sessions_move_across_three_upgrades() {
    const CLIENTS: u64 = 8;
    let exe = Exe::new();
    let pg = block_in_place(|| {
        let pg = db::Postgres::start_with(db::PgSetup {
            settings: &["log_connections=on"],
            hba: &[],
        });
        pg.pgbench_init(1);
        pg
    });
    let pg_addr: SocketAddr = format!("127.0.0.1:{}", pg.port).parse().unwrap();
    let toml = listener("pg", "", &[("pg1", pg_addr)]);
    let mut d = block_in_place(|| exe.start(&toml));
    let port = d.addr("pg").port().to_string();
    let sessions_before = block_in_place(|| sessions(&pg));
    let bench = std::thread::spawn(move || {
        let c = CLIENTS.to_string();
        db::pgbench(
            &[
                "-n",
                "-h",
                "127.0.0.1",
                "-p",
                &port,
                "-T",
                "20",
                "-c",
                &c,
                "-j",
                "2",
            ],
            Duration::from_secs(20) + DEADLINE * 3,
        )
    });
    // Upgrades once the clients are connected.
    eventually("pgbench's clients connected", || async {
        let n = block_in_place(|| sessions(&pg)) - sessions_before;
        if n >= CLIENTS {
            Ok(())
        } else {
            Err(format!("{n} sessions"))
        }
    })
    .await;
    // Each process commits transactions of the moved sessions before the
    // next upgrade (pgbench_history gains a row per transaction).
    let committed = || -> u64 {
        let n = block_in_place(|| pg.psql("select count(*) from pgbench_history"));
        n.trim().parse().unwrap()
    };
    for _ in 0..3 {
        let before = committed();
        eventually("transactions through this process", || async {
            let now = committed();
            if now >= before + 200 {
                Ok(())
            } else {
                Err(format!("{} since the last upgrade", now - before))
            }
        })
        .await;
        assert_eq!(block_in_place(|| d.upgrade()), 0);
    }
    let run = block_in_place(|| bench.join().unwrap());
    assert_eq!(run.code(), Some(0), "{}", run.output());
    assert_eq!(run.failed(), 0, "{}", run.output());
    assert_eq!(run.aborted_clients(), 0, "{}", run.output());
    assert!(run.processed() > 0, "{}", run.output());
    // 8 clients + pgbench's own first connection (it reads the scale).
    let opened = block_in_place(|| sessions(&pg)) - sessions_before;
    assert_eq!(
        opened,
        CLIENTS + 1,
        "sessions PostgreSQL authorized during the run"
    );
}

/// pgbench sessions PostgreSQL has authorized so far (its log's
/// `connection authorized` lines; the test's own psql queries are not
/// counted).
fn sessions(pg: &db::Postgres) -> u64 {
    pg.log()
        .lines()
        .filter(|l| l.contains("connection authorized") && l.contains("application_name=pgbench"))
        .count() as u64
}

/// systemd follows the new process with `NotifyAccess=main`: the old
/// process, still the main one, sends `MAINPID=<new pid>`; only then the new
/// one sends `READY=1`, and from then on only the new one speaks, its
/// watchdog pings included (the old `WATCHDOG_PID` is not passed on).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn systemd_is_told_the_new_main_pid_before_the_new_process_is_ready() {
    let exe = Exe::new();
    let notify = NotifySocket::new();
    let b = NamedBackend::start("b").await;
    let toml = listener(
        "c",
        "[listener.health_check]\nkind = \"none\"",
        &[("b", b.addr)],
    );
    let mut d = block_in_place(|| exe.start_notified(&toml, &notify, 400_000));
    let old = d.pid;
    let (msg, from) = block_in_place(|| notify.next_from());
    assert_eq!((msg.lines().next(), from), (Some("READY=1"), old), "{msg}");
    assert_eq!(block_in_place(|| d.upgrade()), 0);
    let new = d.pid;
    let mut seen = Vec::new();
    let mut new_pings = 0;
    block_in_place(|| {
        while new_pings < 3 {
            let (msg, from) = notify.next_from();
            seen.push((msg.trim().to_owned(), from));
            if msg.trim() == "WATCHDOG=1" && from == new {
                new_pings += 1;
            }
            assert!(seen.len() < 1000, "{seen:?}");
        }
    });
    let main_pid = seen
        .iter()
        .position(|(m, _)| m.starts_with("MAINPID="))
        .unwrap_or_else(|| panic!("no MAINPID: {seen:?}"));
    assert_eq!(seen[main_pid], (format!("MAINPID={new}"), old), "{seen:?}");
    let ready = seen
        .iter()
        .position(|(m, p)| m.lines().next() == Some("READY=1") && *p == new)
        .unwrap_or_else(|| panic!("no READY=1 from the new process: {seen:?}"));
    assert!(main_pid < ready, "MAINPID before READY=1: {seen:?}");
    assert!(
        seen[..main_pid].iter().all(|(_, p)| *p == old),
        "only the main process speaks before MAINPID: {seen:?}"
    );
    assert!(
        seen[main_pid + 1..].iter().all(|(_, p)| *p == new),
        "only the new main process speaks after MAINPID: {seen:?}"
    );
}

/// HTTP mode: a keep-alive client connection that is between two requests
/// moves to the new process and its next requests are answered on the same
/// connection; one with a request in progress (a chunked upload half sent)
/// has it answered in full by the old process, then moves too; an upgraded
/// (WebSocket-style) tunnel moves as a byte stream.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_connections_move_between_requests_and_finish_the_one_in_progress() {
    let exe = Exe::new();
    let h = HttpBackend::start("h").await;
    let toml = listener(
        "w",
        "mode = \"http\"\n[listener.health_check]\nkind = \"none\"",
        &[("h", h.addr)],
    );
    let mut d = block_in_place(|| exe.start(&toml));
    let proxy = d.addr("w");
    // A WebSocket-style tunnel (the backend echoes after its 101).
    let mut ws = TcpStream::connect(proxy).await.unwrap();
    ws.write_all(b"GET /ws HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: echo\r\n\r\n")
        .await
        .unwrap();
    let head = read_until(&mut ws, b"\r\n\r\n").await;
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    assert_eq!(
        echo(&mut ws, b"through the tunnel").await,
        b"through the tunnel"
    );
    let mut idle = HttpClient::connect(proxy).await;
    for i in 0..3 {
        let r = idle.get(&format!("/before/{i}"), &[]).await;
        assert_eq!((r.status, r.header("x-backend")), (200, "h"));
    }
    // A request in progress: headers and one chunk of its body sent.
    let mut busy = TcpStream::connect(proxy).await.unwrap();
    busy.write_all(
        b"POST /upload HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n",
    )
    .await
    .unwrap();
    wait_for("the upload reached the backend", || {
        h.requests.load(Ordering::SeqCst) == 5
    })
    .await;

    d.signal("USR2");
    block_in_place(|| d.log_until(|l| l.contains("the new process is ready; handing over")));
    busy.write_all(b"6\r\n world\r\n0\r\n\r\n").await.unwrap();
    // The backend streams its answer as the upload comes, so its head left
    // before the upgrade began (no `Connection: close` could be added): the
    // answer completes, and the connection stays usable.
    let answer = read_until(&mut busy, b"0\r\n\r\n").await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert!(
        answer.ends_with("5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n"),
        "{answer:?}"
    );
    assert_eq!(block_in_place(|| d.finish_upgrade()), 0);

    // The idle connection is the new process's now: same connection, more
    // requests, the client's address still forwarded.
    for i in 0..3 {
        let r = idle.get(&format!("/after/{i}"), &[]).await;
        assert_eq!((r.status, r.header("x-backend")), (200, "h"));
        assert_eq!(r.header("x-seen-xff"), "127.0.0.1");
    }
    // The tunnel moved as a byte stream.
    assert_eq!(
        echo(&mut ws, b"after the upgrade").await,
        b"after the upgrade"
    );
    // The connection that was busy moved too, once its request was done.
    busy.write_all(b"GET /next HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let next = read_until(&mut busy, b"content-length: 0\r\n\r\n").await;
    assert!(
        next.starts_with("HTTP/1.1 200") && next.contains("x-seen-path: /next\r\n"),
        "{next}"
    );
    assert_eq!(block_in_place(|| d.upgrade()), 0);
    let r = idle.get("/after/second-upgrade", &[]).await;
    assert_eq!(r.status, 200);
}

/// Write `msg` and read as many bytes back.
async fn echo(s: &mut TcpStream, msg: &[u8]) -> Vec<u8> {
    s.write_all(msg).await.unwrap();
    let mut back = vec![0; msg.len()];
    within("the echo", s.read_exact(&mut back)).await.unwrap();
    back
}

/// Read until what came so far ends with `end` (or fail at the deadline).
async fn read_until(s: &mut TcpStream, end: &[u8]) -> String {
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    while !got.ends_with(end) {
        let n = within("more of the answer", s.read(&mut buf))
            .await
            .unwrap();
        assert!(n > 0, "closed after {:?}", String::from_utf8_lossy(&got));
        got.extend_from_slice(&buf[..n]);
    }
    String::from_utf8(got).unwrap()
}

/// A TLS connection's session keys are in the process that made the
/// handshake, so it stays there: the new process takes everything else
/// over at once (listeners, plain connections, counters, the admin
/// endpoint) while the old one serves the TLS stream to its end, then
/// exits 0 and passes on what that stream counted meanwhile.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_streams_finish_in_the_old_process_while_the_new_one_serves_the_rest() {
    use common::tls::{Ca, connect, echo_tls, tls_table};
    let exe = Exe::new();
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new();
    let (cert, key, _) = ca.leaf(dir.path(), "site", &["site.example.com"], 30);
    let echo_backend = NamedBackend::start("echo").await;
    let none = "[listener.health_check]\nkind = \"none\"";
    let toml = format!(
        "{ADMIN}[global]\nshutdown_timeout = \"60s\"\n{}{}{}",
        listener("t", none, &[("echo", echo_backend.addr)]),
        tls_table(&[(cert, key)]),
        listener("p", none, &[("echo", echo_backend.addr)]),
    );
    let mut d = block_in_place(|| exe.start(&toml));
    let (tls_addr, plain_addr, admin) = (d.addr("t"), d.addr("p"), d.admin.unwrap());
    // Handshakes are counted on the TLS listener only, from 0.
    let s = scrape(admin).await;
    let handshakes = |l: &str, result: &str| {
        sample_value(
            &s,
            "switchyard_tls_handshakes_total",
            &[("listener", l), ("result", result)],
        )
    };
    assert_eq!(handshakes("t", "failure"), Some(0.0));
    assert_eq!(
        handshakes("p", "success"),
        None,
        "a plain listener counts no handshakes"
    );
    let mut sent = 0usize; // plaintext, client to backend, on listener t
    let (mut kept, _) = connect(&ca, tls_addr, "site.example.com", true).await;
    let mut name = [0u8; 5];
    within("the backend's name", kept.read_exact(&mut name))
        .await
        .unwrap();
    assert_eq!(&name, b"echo\n");
    assert_eq!(echo_tls(&mut kept, &[1; 1000]).await, [1; 1000]);
    sent += 1000;
    let mut plain = TcpStream::connect(plain_addr).await.unwrap();
    assert_eq!(read_until(&mut plain, b"\n").await, "echo\n");

    d.signal("USR2");
    let old = block_in_place(|| d.taken_over());
    block_in_place(|| d.log_until(|l| l.contains("TLS connections finish in this process")));
    // The new process serves the rest while the TLS stream is open: the
    // admin endpoint (which counted the upgrade), the plain connection it
    // adopted, new TLS handshakes.
    let s = scrape(admin).await;
    assert_eq!(
        sample_value(&s, "switchyard_upgrades_total", &[("result", "success")]),
        Some(1.0)
    );
    assert_eq!(echo(&mut plain, b"handed over").await, b"handed over");
    let (mut fresh, _) = connect(&ca, tls_addr, "site.example.com", true).await;
    within("the backend's name", fresh.read_exact(&mut name))
        .await
        .unwrap();
    assert_eq!(&name, b"echo\n");
    assert_eq!(echo_tls(&mut fresh, &[2; 500]).await, [2; 500]);
    sent += 500;
    drop(fresh);
    // The stream made before the upgrade goes on in the old process.
    for round in 0..10u8 {
        let msg = [round + 10; 4096];
        assert_eq!(echo_tls(&mut kept, &msg).await, msg);
        sent += msg.len();
    }
    // Its end lets the old process go.
    kept.shutdown().await.unwrap();
    let mut rest = Vec::new();
    within("the end of the TLS stream", kept.read_to_end(&mut rest))
        .await
        .unwrap();
    assert!(rest.is_empty(), "{} unexpected bytes", rest.len());
    assert_eq!(block_in_place(|| old.wait()), 0, "the old process exits 0");
    // What the TLS stream counted after the handover reached the new
    // process: every plaintext byte the client sent on listener t.
    eventually("the old process's last counts carried", || async {
        let s = scrape(admin).await;
        let bytes = sample_value(
            &s,
            "switchyard_bytes_total",
            &[
                ("listener", "t"),
                ("backend", "echo"),
                ("direction", "client_to_backend"),
            ],
        );
        match bytes == Some(sent as f64) {
            true => Ok(()),
            false => Err(format!("{bytes:?} of {sent}")),
        }
    })
    .await;
    // And the plain connection is still the new process's.
    assert_eq!(echo(&mut plain, b"still here").await, b"still here");
}
