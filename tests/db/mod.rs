//! Real database servers for the end-to-end tests: PostgreSQL clusters,
//! Redis and MariaDB servers started by the test itself on loopback, each on
//! a free port picked at run time and in a temporary directory of its own,
//! and stopped when the handle is dropped (also when the test panics). Plus
//! runners for `psql`, `pgbench`, `redis-cli`, `redis-benchmark` and
//! `mariadb` that never wait forever.
//!
//! Needs the Debian packages `postgresql` (server, `psql`, `pgbench`,
//! `pg_isready`), `redis-server` (with `redis-tools`: `redis-cli`,
//! `redis-benchmark`) and `mariadb-server` (`mariadbd`,
//! `mariadb-install-db`, the `mariadb` client); `scripts/test.sh` installs
//! them. A missing binary is a test failure, never a skip.

#![allow(dead_code)] // each test binary uses its own subset

use std::io::Read;
use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

const INSTALL_HINT: &str =
    "run `bash scripts/test.sh`, which installs postgresql, redis-server and mariadb-server";

/// How long a server may take to initialise and come up. Generous: initdb
/// on a small shared CI machine takes seconds.
pub const START_DEADLINE: Duration = Duration::from_secs(60);

/// The database user and database every client here uses. Authentication
/// is `trust`: the servers listen on loopback only and live for one test.
pub const PG_USER: &str = "postgres";
pub const PG_DB: &str = "postgres";

/// A free TCP port on 127.0.0.1 (bound, read, released).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A finished client process.
#[derive(Debug)]
pub struct Run {
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
    pub elapsed: Duration,
}

impl Run {
    pub fn code(&self) -> Option<i32> {
        self.status.code()
    }

    /// stdout and stderr, for failure messages.
    pub fn output(&self) -> String {
        format!(
            "exit {:?} after {:?}\n--- stdout\n{}\n--- stderr\n{}",
            self.status.code(),
            self.elapsed,
            self.stdout,
            self.stderr
        )
    }

    // pgbench 15 summary lines.

    /// "number of transactions actually processed: N" (or "N/M" with -t).
    pub fn processed(&self) -> u64 {
        let v = self.summary("number of transactions actually processed:");
        v.split('/').next().unwrap().parse().unwrap()
    }

    /// "number of failed transactions: N (x%)": transactions that failed
    /// with a serialization or deadlock error. Any other error aborts the
    /// client instead (see `aborted_clients`).
    pub fn failed(&self) -> u64 {
        self.summary("number of failed transactions:")
            .parse()
            .unwrap()
    }

    /// Clients pgbench gave up on ("client N aborted ..." after a failed
    /// connection, "client N script M aborted in command ..." after an SQL
    /// error): pgbench 15 aborts a client at its first error, and then exits
    /// 2 ("Run was aborted; the above results are incomplete.").
    pub fn aborted_clients(&self) -> usize {
        self.stderr
            .lines()
            .filter(|l| {
                let Some(rest) = l.split("client ").nth(1) else {
                    return false;
                };
                let mut words = rest.split_whitespace();
                let number = |w: Option<&str>| w.is_some_and(|n| n.parse::<u32>().is_ok());
                if !number(words.next()) {
                    return false;
                }
                match words.next() {
                    Some("aborted") => true,
                    Some("script") => number(words.next()) && words.next() == Some("aborted"),
                    _ => false,
                }
            })
            .count()
    }

    fn summary(&self, key: &str) -> String {
        let line = self
            .stdout
            .lines()
            .find_map(|l| l.trim().strip_prefix(key))
            .unwrap_or_else(|| panic!("no {key:?} in pgbench output:\n{}", self.output()));
        line.split_whitespace().next().unwrap().to_owned()
    }
}

/// Run `cmd` to its end, failing the test if it takes longer than `limit`
/// (the process is killed first, so nothing is left behind).
pub fn run(mut cmd: Command, limit: Duration) -> Run {
    let what = format!("{cmd:?}");
    let start = Instant::now();
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run {what}: {e}; {INSTALL_HINT}"));
    let reader = |mut r: Box<dyn Read + Send>| {
        std::thread::spawn(move || {
            let mut buf = Vec::new();
            let _ = r.read_to_end(&mut buf);
            String::from_utf8_lossy(&buf).into_owned()
        })
    };
    let out = reader(Box::new(child.stdout.take().unwrap()));
    let err = reader(Box::new(child.stderr.take().unwrap()));
    let status = match wait_within(child, limit) {
        Ok(status) => status,
        Err(()) => panic!(
            "{what} did not finish within {limit:?}\n--- stdout\n{}\n--- stderr\n{}",
            out.join().unwrap(),
            err.join().unwrap()
        ),
    };
    Run {
        status,
        stdout: out.join().unwrap(),
        stderr: err.join().unwrap(),
        elapsed: start.elapsed(),
    }
}

/// `cmd` must succeed within `limit`; its stdout.
fn run_ok(cmd: Command, limit: Duration) -> String {
    let r = run(cmd, limit);
    assert!(r.status.success(), "{}", r.output());
    r.stdout
}

/// A command from `PATH`, or a failure that says how to install it.
fn on_path(name: &str) -> PathBuf {
    std::env::var_os("PATH")
        .and_then(|paths| {
            std::env::split_paths(&paths)
                .map(|d| d.join(name))
                .find(|p| p.is_file())
        })
        .unwrap_or_else(|| panic!("`{name}` not found; {INSTALL_HINT}"))
}

/// The PostgreSQL binaries: /usr/lib/postgresql/<newest major>/bin (the
/// Debian layout; /usr/bin/psql and friends are only version wrappers).
pub fn pg_bin() -> PathBuf {
    let root = Path::new("/usr/lib/postgresql");
    let newest = std::fs::read_dir(root)
        .ok()
        .into_iter()
        .flatten()
        .filter_map(|e| {
            let e = e.ok()?;
            let major: u32 = e.file_name().to_str()?.parse().ok()?;
            let bin = e.path().join("bin");
            bin.join("initdb").is_file().then_some((major, bin))
        })
        .max();
    match newest {
        Some((_, bin)) => bin,
        None => panic!(
            "no PostgreSQL server under {}; {INSTALL_HINT}",
            root.display()
        ),
    }
}

fn pg_tool(name: &str) -> PathBuf {
    let p = pg_bin().join(name);
    assert!(p.is_file(), "{} missing; {INSTALL_HINT}", p.display());
    p
}

/// A PostgreSQL client command (run as ourselves; trust auth over TCP).
fn pg_client(name: &str) -> Command {
    let mut cmd = Command::new(pg_tool(name));
    cmd.env("PGUSER", PG_USER)
        .env("PGDATABASE", PG_DB)
        .env("PGCONNECT_TIMEOUT", "5")
        .env_remove("PGPASSWORD")
        .env_remove("PGSERVICE")
        .env_remove("PGHOST")
        .env_remove("PGPORT");
    cmd
}

/// Our effective uid (the owner of /proc/self).
fn euid() -> u32 {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata("/proc/self").unwrap().uid()
}

/// The unprivileged account PostgreSQL runs as when the tests run as root
/// (PostgreSQL refuses to run as root): the `postgres` system user the
/// Debian package creates. `None` when we are not root.
fn pg_account() -> Option<(u32, u32)> {
    if euid() != 0 {
        return None;
    }
    let passwd = std::fs::read_to_string("/etc/passwd").unwrap();
    let line = passwd
        .lines()
        .find(|l| l.starts_with("postgres:"))
        .unwrap_or_else(|| panic!("no `postgres` user in /etc/passwd; {INSTALL_HINT}"));
    let f: Vec<&str> = line.split(':').collect();
    Some((f[2].parse().unwrap(), f[3].parse().unwrap()))
}

/// `program` run as the PostgreSQL account: through `setpriv`, which execs
/// (no extra process in between), so the child's pid is the server's.
fn as_pg_user(program: &Path, dir: &Path) -> Command {
    let mut cmd = if pg_account().is_some() {
        let mut c = Command::new(on_path("setpriv"));
        c.args([
            "--reuid=postgres",
            "--regid=postgres",
            "--init-groups",
            "--",
        ])
        .arg(program);
        c
    } else {
        Command::new(program)
    };
    cmd.current_dir(dir).env("HOME", dir).env("LC_ALL", "C");
    cmd
}

/// Send `sig` (e.g. "QUIT") to `pid` with kill(1).
fn signal(pid: u32, sig: &str) {
    let _ = Command::new("kill")
        .args([&format!("-{sig}"), &pid.to_string()])
        .stderr(Stdio::null())
        .status();
}

/// Wait up to `limit` for `child` to exit; then SIGKILL it.
fn reap(child: Child, limit: Duration) {
    let _ = wait_within(child, limit);
}

/// Wait for `child` to exit within `limit`: its status, or `Err` after it
/// was killed for taking longer (nothing is left running either way).
fn wait_within(mut child: Child, limit: Duration) -> Result<std::process::ExitStatus, ()> {
    let pid = child.id();
    let (tx, rx) = std::sync::mpsc::channel();
    let waiter = std::thread::spawn(move || {
        let _ = tx.send(child.wait());
    });
    match rx.recv_timeout(limit) {
        Ok(status) => Ok(status.expect("wait for a child")),
        Err(_) => {
            // Not reaped yet (the waiter is still in wait()): the pid is
            // still this child's.
            signal(pid, "KILL");
            let _ = waiter.join();
            Err(())
        }
    }
}

/// Start a server with its stdout and stderr copied into `log`, and wait
/// until a log line contains `ready` and the `confirm` probe agrees. Fails
/// with the log if the server exits first or is not ready within
/// [`START_DEADLINE`]. Nothing is polled: the log is read as it is written.
fn start_server(
    what: &str,
    cmd: &mut Command,
    log: &Path,
    ready: &'static str,
    confirm: impl Fn() -> bool,
) -> Child {
    let file = std::sync::Arc::new(std::sync::Mutex::new(std::fs::File::create(log).unwrap()));
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {what}: {e}; {INSTALL_HINT}"));
    let (tx, rx) = std::sync::mpsc::channel();
    let copy = |stream: Box<dyn Read + Send>| {
        let (file, tx) = (file.clone(), tx.clone());
        std::thread::spawn(move || {
            use std::io::{BufRead, Write};
            for line in std::io::BufReader::new(stream).lines() {
                let Ok(line) = line else { break };
                let _ = writeln!(file.lock().unwrap(), "{line}");
                if line.contains(ready) {
                    let _ = tx.send(());
                }
            }
        });
    };
    copy(Box::new(child.stdout.take().unwrap()));
    copy(Box::new(child.stderr.take().unwrap()));
    drop(tx);
    let read_log = || std::fs::read_to_string(log).unwrap_or_default();
    match rx.recv_timeout(START_DEADLINE) {
        Ok(()) => {}
        // Both pipes closed: the server is gone.
        Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => {
            let status = child.wait().unwrap();
            panic!("{what} exited ({status}) during start-up:\n{}", read_log());
        }
        Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "{what} not ready within {START_DEADLINE:?}:\n{}",
                read_log()
            );
        }
    }
    assert!(
        confirm(),
        "{what} logged readiness but does not answer:\n{}",
        read_log()
    );
    child
}

/// A throwaway PostgreSQL cluster on 127.0.0.1:`port`.
pub struct Postgres {
    pub port: u16,
    pub addr: SocketAddr,
    child: Option<Child>,
    pub dir: tempfile::TempDir,
}

/// What a cluster starts with beyond the defaults of [`Postgres::start`].
#[derive(Debug, Default, Clone, Copy)]
pub struct PgSetup<'a> {
    /// `name=value` server settings, given after the defaults (so they win).
    pub settings: &'a [&'a str],
    /// pg_hba.conf lines put before initdb's `trust` ones (the first line
    /// that matches a connection decides its authentication).
    pub hba: &'a [&'a str],
}

/// The log line of a primary that is up.
const PRIMARY_READY: &str = "database system is ready to accept connections";
/// The log line of a hot standby that is up.
const STANDBY_READY: &str = "database system is ready to accept read-only connections";

/// A temp dir the PostgreSQL account owns.
fn pg_dir() -> tempfile::TempDir {
    let dir = tempfile::Builder::new().prefix("sy-pg-").tempdir().unwrap();
    if let Some((uid, gid)) = pg_account() {
        std::os::unix::fs::chown(dir.path(), Some(uid), Some(gid)).unwrap();
    }
    dir
}

impl Postgres {
    /// initdb a new cluster in a temp dir and start it; returns once it
    /// accepts connections.
    pub fn start() -> Postgres {
        Postgres::start_with(PgSetup::default())
    }

    /// Same, with extra settings and pg_hba.conf lines.
    pub fn start_with(setup: PgSetup<'_>) -> Postgres {
        let dir = pg_dir();
        let data = dir.path().join("data");
        let mut initdb = as_pg_user(&pg_tool("initdb"), dir.path());
        initdb.arg("-D").arg(&data).args([
            "-U",
            PG_USER,
            "--auth=trust",
            "--encoding=UTF8",
            "--locale=C",
            "--no-sync",
            "--no-instructions",
        ]);
        run_ok(initdb, START_DEADLINE);
        if !setup.hba.is_empty() {
            // Rewriting the file in place keeps its owner and mode.
            let hba = data.join("pg_hba.conf");
            let initdb_lines = std::fs::read_to_string(&hba).unwrap();
            std::fs::write(&hba, setup.hba.join("\n") + "\n" + &initdb_lines).unwrap();
        }
        Postgres::launch(dir, setup.settings, PRIMARY_READY)
    }

    /// A streaming hot standby of this cluster: a base backup taken with
    /// `pg_basebackup -R` (which configures the replication) and started
    /// with `settings`; returns once it accepts read-only connections.
    pub fn standby(&self, settings: &[&str]) -> Postgres {
        let dir = pg_dir();
        let mut backup = as_pg_user(&pg_tool("pg_basebackup"), dir.path());
        backup
            .args([
                "-h",
                "127.0.0.1",
                "-p",
                &self.port.to_string(),
                "-U",
                PG_USER,
            ])
            .arg("-D")
            .arg(dir.path().join("data"))
            .args(["-R", "-X", "stream", "--checkpoint=fast", "--no-sync"]);
        run_ok(backup, START_DEADLINE);
        Postgres::launch(dir, settings, STANDBY_READY)
    }

    /// Promote a standby to primary (`pg_ctl promote`); returns once it
    /// takes writes.
    pub fn promote(&self) {
        let mut promote = as_pg_user(&pg_tool("pg_ctl"), self.dir.path());
        promote
            .arg("promote")
            .arg("-D")
            .arg(self.dir.path().join("data"))
            .args(["-w", "-t", "60"]);
        run_ok(promote, START_DEADLINE);
    }

    /// Start the server on the data directory in `dir` and wait for its
    /// `ready` log line.
    fn launch(dir: tempfile::TempDir, settings: &[&str], ready: &'static str) -> Postgres {
        let data = dir.path().join("data");
        let port = free_port();
        let mut cmd = as_pg_user(&pg_tool("postgres"), dir.path());
        cmd.arg("-D")
            .arg(&data)
            .args(["-p", &port.to_string()])
            .arg("-k")
            .arg(dir.path())
            .args(["-c", "listen_addresses=127.0.0.1"])
            // Speed over durability: the cluster lives for one test.
            .args(["-c", "fsync=off"])
            .args(["-c", "synchronous_commit=off"])
            .args(["-c", "full_page_writes=off"])
            .args(["-c", "shared_buffers=16MB"])
            .args(["-c", "max_connections=100"])
            .args(["-c", "logging_collector=off"]);
        for setting in settings {
            cmd.args(["-c", setting]);
        }
        let child = start_server(
            "postgres",
            &mut cmd,
            &dir.path().join("postgres.log"),
            ready,
            || {
                let mut probe = pg_client("pg_isready");
                probe.args(["-h", "127.0.0.1", "-p", &port.to_string(), "-t", "5"]);
                run(probe, Duration::from_secs(10)).status.success()
            },
        );
        Postgres {
            port,
            addr: SocketAddr::from(([127, 0, 0, 1], port)),
            child: Some(child),
            dir,
        }
    }

    /// The server's log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("postgres.log")).unwrap_or_default()
    }

    /// The postmaster's pid, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Run `sql` with psql on this cluster (directly, not through the
    /// balancer); unaligned, tuples only, trimmed.
    pub fn psql(&self, sql: &str) -> String {
        psql(self.port, sql)
    }

    /// `pgbench -i -s <scale>` on this cluster directly.
    pub fn pgbench_init(&self, scale: u32) {
        let r = pgbench(
            &[
                "-i",
                "-q",
                "-s",
                &scale.to_string(),
                "-h",
                "127.0.0.1",
                "-p",
                &self.port.to_string(),
            ],
            START_DEADLINE,
        );
        assert!(r.status.success(), "pgbench -i failed: {}", r.output());
    }

    /// Smart shutdown (SIGTERM, `pg_ctl stop -m smart`): the server lets
    /// open sessions finish and refuses new ones with "the database system
    /// is shutting down" until the last has ended.
    pub fn begin_smart_shutdown(&self) {
        let child = self.child.as_ref().expect("running");
        signal(child.id(), "TERM");
    }

    /// Immediate shutdown (SIGQUIT, what `pg_ctl stop -m immediate` sends):
    /// the postmaster kills its backends at once, so every open session
    /// sees its connection drop, as when a database server dies. Returns
    /// once the postmaster has exited.
    pub fn stop(&mut self) {
        if let Some(child) = self.child.take() {
            signal(child.id(), "QUIT");
            reap(child, Duration::from_secs(10));
        }
    }

    /// The server dies (a crash, a lost machine): SIGKILL to the postmaster
    /// first, so its listening socket is gone at once and new connects are
    /// refused, then to every process it had forked, which cuts each open
    /// session. Unlike `stop`, no shutdown window in which the server still
    /// accepts connections only to refuse them with "the database system is
    /// shutting down".
    pub fn crash(&mut self) {
        if let Some(mut child) = self.child.take() {
            let pm = child.id();
            let children = children_of(pm);
            let _ = child.kill();
            let _ = child.wait();
            for pid in children {
                signal(pid, "KILL");
            }
        }
    }
}

/// The pids whose parent is `ppid` (from /proc).
fn children_of(ppid: u32) -> Vec<u32> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .filter_map(|e| {
            let e = e.ok()?;
            let pid: u32 = e.file_name().to_str()?.parse().ok()?;
            let stat = std::fs::read_to_string(e.path().join("stat")).ok()?;
            // "pid (comm) state ppid ...": comm may hold spaces, so split
            // after its closing parenthesis.
            let after = &stat[stat.rfind(')')? + 1..];
            let parent: u32 = after.split_whitespace().nth(1)?.parse().ok()?;
            (parent == ppid).then_some(pid)
        })
        .collect()
}

impl Drop for Postgres {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A session held open on a cluster, as [`PG_USER`] (trust): it takes one
/// of the server's connection slots until dropped, when it says goodbye
/// with Terminate.
pub struct HeldSession(std::net::TcpStream);

impl HeldSession {
    /// Log in on `port` and read up to ReadyForQuery. A server with no free
    /// slot yet (one whose previous session is still exiting) is asked
    /// again until [`START_DEADLINE`]; any other error fails the test.
    pub fn open(port: u16) -> HeldSession {
        use std::io::Write;
        let start = Instant::now();
        loop {
            let mut stream = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
            stream
                .set_read_timeout(Some(Duration::from_secs(10)))
                .unwrap();
            let params = format!("user\0{PG_USER}\0database\0{PG_DB}\0\0");
            let mut startup = ((params.len() + 8) as i32).to_be_bytes().to_vec();
            startup.extend(196_608i32.to_be_bytes()); // protocol 3.0
            startup.extend(params.as_bytes());
            stream.write_all(&startup).unwrap();
            loop {
                let mut header = [0u8; 5];
                std::io::Read::read_exact(&mut stream, &mut header).unwrap();
                let len = i32::from_be_bytes(header[1..].try_into().unwrap()) as usize;
                let mut body = vec![0; len - 4];
                std::io::Read::read_exact(&mut stream, &mut body).unwrap();
                match header[0] {
                    b'Z' => return HeldSession(stream),
                    b'E' => {
                        let text = String::from_utf8_lossy(&body).replace('\0', " ");
                        assert!(
                            text.contains("too many clients") && start.elapsed() < START_DEADLINE,
                            "cannot hold a session on port {port}: {text}"
                        );
                        // Wait for the server to close this attempt: its
                        // backend process is on its way out, then try again.
                        let _ = std::io::Read::read_to_end(&mut stream, &mut Vec::new());
                        break;
                    }
                    _ => {}
                }
            }
        }
    }
}

impl Drop for HeldSession {
    fn drop(&mut self) {
        use std::io::Write;
        let _ = self.0.write_all(&[b'X', 0, 0, 0, 4]);
    }
}

/// psql against any port (a cluster or the balancer in front of it).
pub fn psql(port: u16, sql: &str) -> String {
    let mut cmd = pg_client("psql");
    cmd.args([
        "-X",
        "-q",
        "-A",
        "-t",
        "-v",
        "ON_ERROR_STOP=1",
        "-h",
        "127.0.0.1",
        "-p",
        &port.to_string(),
        "-c",
        sql,
    ]);
    run_ok(cmd, Duration::from_secs(30)).trim().to_owned()
}

/// pgbench with `args` (the caller gives -h/-p); user and database are set
/// through the environment. Fails the test if it runs longer than `limit`.
pub fn pgbench(args: &[&str], limit: Duration) -> Run {
    let mut cmd = pg_client("pgbench");
    cmd.args(args);
    run(cmd, limit)
}

/// A throwaway Redis server on 127.0.0.1:`port`, no persistence.
pub struct Redis {
    pub port: u16,
    pub addr: SocketAddr,
    /// Its `requirepass`, which [`Redis::cli`] logs in with.
    pub password: Option<String>,
    child: Option<Child>,
    pub dir: tempfile::TempDir,
}

impl Redis {
    pub fn start() -> Redis {
        Redis::start_with(None, &[])
    }

    /// Same, with `requirepass` when `password` is set, and further
    /// `redis-server` arguments (`--replicaof`, `--masterauth`, …).
    pub fn start_with(password: Option<&str>, args: &[&str]) -> Redis {
        let server = on_path("redis-server");
        on_path("redis-cli");
        let dir = tempfile::Builder::new()
            .prefix("sy-redis-")
            .tempdir()
            .unwrap();
        let port = free_port();
        let mut cmd = Command::new(server);
        cmd.args(["--port", &port.to_string()])
            .args(["--bind", "127.0.0.1"])
            .args(["--save", ""])
            .args(["--appendonly", "no"])
            .args(["--daemonize", "no"])
            .args(["--logfile", ""])
            .arg("--dir")
            .arg(dir.path())
            .current_dir(dir.path());
        if let Some(password) = password {
            cmd.args(["--requirepass", password]);
        }
        cmd.args(args);
        let child = start_server(
            "redis-server",
            &mut cmd,
            &dir.path().join("redis.log"),
            "Ready to accept connections",
            || {
                let r = run(
                    redis_cli_cmd(port, password, &["ping"]),
                    Duration::from_secs(10),
                );
                r.status.success() && r.stdout.trim() == "PONG"
            },
        );
        Redis {
            port,
            addr: SocketAddr::from(([127, 0, 0, 1], port)),
            password: password.map(str::to_owned),
            child: Some(child),
            dir,
        }
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("redis.log")).unwrap_or_default()
    }

    /// redis-cli against this server directly (logged in with its
    /// password, if it has one); its stdout, trimmed.
    pub fn cli(&self, args: &[&str]) -> String {
        redis_cli_as(self.port, self.password.as_deref(), args)
    }

    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        self.stop();
    }
}

/// redis-cli on `port`, logged in with `password` (through the
/// environment, so no warning about a password on the command line).
fn redis_cli_cmd(port: u16, password: Option<&str>, args: &[&str]) -> Command {
    let mut cmd = Command::new(on_path("redis-cli"));
    cmd.args(["-h", "127.0.0.1", "-p", &port.to_string()])
        .args(args)
        .env_remove("REDISCLI_AUTH");
    if let Some(password) = password {
        cmd.env("REDISCLI_AUTH", password);
    }
    cmd
}

/// redis-cli against any port; must succeed; stdout trimmed.
pub fn redis_cli(port: u16, args: &[&str]) -> String {
    redis_cli_as(port, None, args)
}

/// Same, logged in with `password`.
pub fn redis_cli_as(port: u16, password: Option<&str>, args: &[&str]) -> String {
    run_ok(redis_cli_cmd(port, password, args), Duration::from_secs(30))
        .trim()
        .to_owned()
}

/// redis-benchmark with `args` (the caller gives -h/-p).
pub fn redis_benchmark(args: &[&str], limit: Duration) -> Run {
    let mut cmd = Command::new(on_path("redis-benchmark"));
    cmd.args(args);
    run(cmd, limit)
}

/// A server program: from `PATH`, else from /usr/sbin (Debian puts
/// `mariadbd` there, which a non-root `PATH` may lack).
fn sbin(name: &str) -> PathBuf {
    let in_sbin = Path::new("/usr/sbin").join(name);
    if in_sbin.is_file() {
        return in_sbin;
    }
    on_path(name)
}

/// A throwaway MariaDB server on 127.0.0.1:`port`, its socket and data in a
/// temp dir. `root` logs in over the socket without a password; tests make
/// their own accounts with [`Mariadb::sql`]. Host names are not resolved,
/// so TCP accounts are `'user'@'127.0.0.1'` or `'user'@'%'`.
pub struct Mariadb {
    pub port: u16,
    pub addr: SocketAddr,
    child: Option<Child>,
    pub dir: tempfile::TempDir,
}

impl Mariadb {
    pub fn start() -> Mariadb {
        let dir = tempfile::Builder::new()
            .prefix("sy-mariadb-")
            .tempdir()
            .unwrap();
        let data = dir.path().join("data");
        // Temporary tables in a dir of its own: two servers bootstrapping
        // at once in the shared /tmp trip over each other's files.
        let tmp = dir.path().join("tmp");
        std::fs::create_dir(&tmp).unwrap();
        // As root, mariadbd wants to be told to stay root (it would switch
        // to a `mysql` account otherwise); the temp dir is ours.
        let as_root = (euid() == 0).then_some("--user=root");
        let mut install = Command::new(on_path("mariadb-install-db"));
        install
            .arg("--no-defaults")
            .arg(format!("--datadir={}", data.display()))
            .args(["--auth-root-authentication-method=normal", "--skip-test-db"])
            .args(as_root)
            .current_dir(dir.path())
            .env("HOME", dir.path())
            .env("TMPDIR", &tmp);
        run_ok(install, START_DEADLINE);

        let port = free_port();
        let socket = dir.path().join("mysqld.sock");
        let mut cmd = Command::new(sbin("mariadbd"));
        // --no-defaults must come first: no /etc/mysql config applies.
        cmd.arg("--no-defaults")
            .arg(format!("--datadir={}", data.display()))
            .args(as_root)
            .arg(format!("--port={port}"))
            .arg("--bind-address=127.0.0.1")
            .arg(format!("--socket={}", socket.display()))
            .arg(format!(
                "--pid-file={}",
                dir.path().join("mysqld.pid").display()
            ))
            .arg(format!("--tmpdir={}", tmp.display()))
            .arg("--skip-name-resolve")
            // Small and fast over durable: the server lives for one test.
            .args([
                "--innodb-buffer-pool-size=16M",
                "--innodb-flush-log-at-trx-commit=0",
                "--performance-schema=OFF",
                "--skip-log-bin",
            ])
            .current_dir(dir.path())
            .env("HOME", dir.path())
            .env("TMPDIR", &tmp);
        let sock = socket.clone();
        let child = start_server(
            "mariadbd",
            &mut cmd,
            &dir.path().join("mariadbd.log"),
            "ready for connections",
            move || {
                let r = run(mariadb_cmd(&sock, "SELECT 1"), Duration::from_secs(10));
                r.status.success() && r.stdout.trim() == "1"
            },
        );
        Mariadb {
            port,
            addr: SocketAddr::from(([127, 0, 0, 1], port)),
            child: Some(child),
            dir,
        }
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("mariadbd.log")).unwrap_or_default()
    }

    /// Run `sql` as root over the socket; tab-separated rows without
    /// column names, trimmed.
    pub fn sql(&self, sql: &str) -> String {
        let cmd = mariadb_cmd(&self.dir.path().join("mysqld.sock"), sql);
        run_ok(cmd, Duration::from_secs(30)).trim().to_owned()
    }

    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for Mariadb {
    fn drop(&mut self) {
        self.stop();
    }
}

/// The `mariadb` client as root over `socket`, running `sql`.
fn mariadb_cmd(socket: &Path, sql: &str) -> Command {
    let mut cmd = Command::new(on_path("mariadb"));
    cmd.arg("--no-defaults")
        .arg("--protocol=socket")
        .arg(format!("--socket={}", socket.display()))
        .args([
            "--user=root",
            "--batch",
            "--skip-column-names",
            "--execute",
            sql,
        ]);
    cmd
}

/// The `mariadb` client over TCP on `port` (a server or the balancer in
/// front of one) as `user` with `password`, running `sql`; must succeed;
/// stdout trimmed.
pub fn mariadb_tcp(port: u16, user: &str, password: &str, sql: &str) -> String {
    let mut cmd = Command::new(on_path("mariadb"));
    cmd.arg("--no-defaults")
        .args(["--protocol=tcp", "--host=127.0.0.1"])
        .arg(format!("--port={port}"))
        .arg(format!("--user={user}"))
        .arg(format!("--password={password}"))
        .args([
            "--connect-timeout=5",
            "--batch",
            "--skip-column-names",
            "--execute",
            sql,
        ]);
    run_ok(cmd, Duration::from_secs(30)).trim().to_owned()
}
