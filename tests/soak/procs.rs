//! The soak's backends, each a process of its own so that it can be
//! SIGKILLed (or, for Redis, SIGSTOPped) and revived on the same port:
//! - tcp echo and HTTP backends are this test binary again, run with
//!   `SOAK_ROLE` set ([`serve`]): `common`'s `NamedBackend` (says its name
//!   on connect, then echoes) and `HttpBackend` (its name in `x-backend`,
//!   the request body echoed back);
//! - Redis backends are real `redis-server` processes on loopback, each in
//!   a temporary directory of its own (no persistence).
//!
//! Ports are picked below the kernel's ephemeral range, so no outgoing
//! connection of this machine (the daemon's, another test's) can take a
//! dead backend's port before it is revived.

use std::net::SocketAddr;
use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;
use tokio::process::{Child, Command};
use tokio::time::Instant;

use crate::common::{DEADLINE, HttpBackend, NamedBackend};
use crate::rng::Rng;

/// Set in a backend process's environment: which server it runs.
pub const ROLE: &str = "SOAK_ROLE";
const NAME: &str = "SOAK_NAME";
const ADDR: &str = "SOAK_ADDR";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    TcpEcho,
    Http,
    Redis,
}

impl Kind {
    fn role(self) -> &'static str {
        match self {
            Kind::TcpEcho => "tcp-echo",
            Kind::Http => "http",
            Kind::Redis => "redis-server",
        }
    }
}

/// The main of a backend process: serve on `SOAK_ADDR` as `SOAK_NAME`,
/// say `ready` on stdout once listening, and exit when stdin closes (the
/// parent holds it open, so a parent that dies takes its backends along).
pub fn serve(role: &str) -> ! {
    let name = std::env::var(NAME).expect("SOAK_NAME");
    let addr: SocketAddr = std::env::var(ADDR).expect("SOAK_ADDR").parse().unwrap();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let _server: Box<dyn std::any::Any> = match role {
            "tcp-echo" => Box::new(NamedBackend::start_on(addr, &name).await),
            "http" => Box::new(HttpBackend::start_on(addr, &name).await),
            other => panic!("unknown {ROLE} {other:?}"),
        };
        println!("ready");
        let stdin = tokio::task::spawn_blocking(|| {
            std::io::copy(&mut std::io::stdin(), &mut std::io::sink())
        });
        let _ = stdin.await;
    });
    std::process::exit(0)
}

/// A running backend process.
pub struct Proc {
    child: Child,
}

impl Proc {
    fn pid(&self) -> i32 {
        self.child.id().expect("not reaped yet") as i32
    }

    /// SIGKILL, and return once the process is gone (its sockets closed).
    pub async fn kill(mut self) {
        self.child.start_kill().expect("SIGKILL");
        self.child.wait().await.expect("reap");
    }

    /// Send `sig` (SIGSTOP, SIGCONT).
    pub fn signal(&self, sig: i32) {
        // SAFETY: kill(2) on a child we have not reaped.
        let r = unsafe { libc::kill(self.pid(), sig) };
        assert_eq!(r, 0, "kill: {}", std::io::Error::last_os_error());
    }
}

/// Start `kind` as `name` on 127.0.0.1:`port` (`dir` is a Redis server's
/// working directory) and return once it answers. A failed start (the port
/// not yet bindable, say) is tried again until the deadline.
pub async fn start(kind: Kind, name: &str, port: u16, dir: &Path) -> Proc {
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let began = Instant::now();
    let mut poll = tokio::time::interval(Duration::from_millis(50));
    loop {
        let attempt = match kind {
            Kind::Redis => start_redis(port, dir).await,
            _ => start_child(kind, name, addr).await,
        };
        match attempt {
            Ok(child) => return Proc { child },
            Err(why) => assert!(
                began.elapsed() < DEADLINE,
                "{} {name} on {addr} did not start: {why}",
                kind.role()
            ),
        }
        poll.tick().await;
    }
}

async fn start_child(kind: Kind, name: &str, addr: SocketAddr) -> Result<Child, String> {
    let exe = std::env::current_exe().unwrap();
    let mut child = Command::new(exe)
        .env(ROLE, kind.role())
        .env(NAME, name)
        .env(ADDR, addr.to_string())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| e.to_string())?;
    let mut out = BufReader::new(child.stdout.take().unwrap());
    let mut line = String::new();
    let said = tokio::time::timeout(DEADLINE, out.read_line(&mut line)).await;
    if matches!(said, Ok(Ok(_))) && line == "ready\n" {
        return Ok(child);
    }
    let _ = child.start_kill();
    let status = child.wait().await;
    Err(format!("said {line:?} ({said:?}), then {status:?}"))
}

async fn start_redis(port: u16, dir: &Path) -> Result<Child, String> {
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(dir.join("redis.log"))
        .map_err(|e| e.to_string())?;
    let mut child = Command::new("redis-server")
        .args(["--port", &port.to_string()])
        .args(["--bind", "127.0.0.1"])
        .args(["--save", ""])
        .args(["--appendonly", "no"])
        .args(["--daemonize", "no"])
        .args(["--logfile", ""])
        .arg("--dir")
        .arg(dir)
        .current_dir(dir)
        .stdin(Stdio::null())
        .stdout(log.try_clone().map_err(|e| e.to_string())?)
        .stderr(log)
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| format!("{e}; run `bash scripts/test.sh`, which installs redis-server"))?;
    let began = Instant::now();
    let mut poll = tokio::time::interval(Duration::from_millis(20));
    loop {
        if let Some(status) = child.try_wait().map_err(|e| e.to_string())? {
            let log = std::fs::read_to_string(dir.join("redis.log")).unwrap_or_default();
            let tail: Vec<&str> = log.lines().rev().take(5).collect();
            return Err(format!("exited ({status}); log ends: {tail:?}"));
        }
        if ping(port).await {
            return Ok(child);
        }
        if began.elapsed() > DEADLINE {
            let _ = child.start_kill();
            return Err("no PONG before the deadline".into());
        }
        poll.tick().await;
    }
}

/// Whether a Redis server answers PING on `port` now.
async fn ping(port: u16) -> bool {
    let exchange = async {
        let mut s = TcpStream::connect(("127.0.0.1", port)).await.ok()?;
        s.write_all(b"PING\r\n").await.ok()?;
        let mut buf = [0u8; 7];
        s.read_exact(&mut buf).await.ok()?;
        (&buf == b"+PONG\r\n").then_some(())
    };
    matches!(
        tokio::time::timeout(Duration::from_secs(1), exchange).await,
        Ok(Some(()))
    )
}

/// `n` distinct ports on 127.0.0.1, free now, below the ephemeral range
/// (falling back to ephemeral ones if that range starts too low).
pub fn pick_ports(n: usize, rng: &mut Rng) -> Vec<u16> {
    let low: u16 = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse().ok())
        .unwrap_or(32768);
    let mut ports = Vec::new();
    while ports.len() < n {
        let port = if low > 11_000 {
            rng.range(10_000, u64::from(low)) as u16
        } else {
            std::net::TcpListener::bind("127.0.0.1:0")
                .unwrap()
                .local_addr()
                .unwrap()
                .port()
        };
        if !ports.contains(&port) && std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            ports.push(port);
        }
    }
    ports
}
