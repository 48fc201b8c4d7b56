//! Helpers shared by the end-to-end tests: test backends that answer with
//! their own name, an in-process server, the real daemon binary, and
//! wait-for-condition with a deadline (never a sleep).

#![allow(dead_code)] // each test binary uses its own subset

use std::collections::HashMap;
use std::future::Future;
use std::io::{BufRead, BufReader};
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc;
use std::time::Duration;

pub mod tls;

use http_body_util::BodyExt;
use switchyard::config;
use switchyard::config::Role;
use switchyard::server::Server;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader as TokioBufReader};
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::task::JoinHandle;

/// Generous: CI machines are small and shared.
pub const DEADLINE: Duration = Duration::from_secs(20);

/// Poll `cond` until it holds, failing the test after `DEADLINE`.
pub async fn wait_for(what: &str, mut cond: impl FnMut() -> bool) {
    let start = tokio::time::Instant::now();
    let mut poll = tokio::time::interval(Duration::from_millis(5));
    while !cond() {
        assert!(start.elapsed() < DEADLINE, "timed out waiting for {what}");
        poll.tick().await;
    }
}

/// [`eventually`] for a probe that answers `Some` once the condition
/// holds and `None` before.
pub async fn eventually_some<T, Fut: Future<Output = Option<T>>>(
    what: &str,
    mut probe: impl FnMut() -> Fut,
) -> T {
    eventually(what, || {
        let answer = probe();
        async move { answer.await.ok_or_else(|| "not yet".to_owned()) }
    })
    .await
}

/// The `q` quantile (0.5, 0.99) of durations sorted ascending.
pub fn percentile(sorted: &[Duration], q: f64) -> Duration {
    sorted[((sorted.len() as f64 * q) as usize).min(sorted.len() - 1)]
}

/// Run `fut` or fail the test after `DEADLINE`.
pub async fn within<T>(what: &str, fut: impl Future<Output = T>) -> T {
    tokio::time::timeout(DEADLINE, fut)
        .await
        .unwrap_or_else(|_| panic!("timed out: {what}"))
}

/// A backend that writes `"<name>\n"` on every connection, then echoes what
/// it receives until the client closes.
pub struct NamedBackend {
    pub name: String,
    pub addr: SocketAddr,
    /// Connections accepted so far.
    pub accepted: Arc<AtomicUsize>,
    /// Connections currently open.
    pub open: Arc<AtomicUsize>,
    /// The most connections ever open at once.
    pub max_open: Arc<AtomicUsize>,
    task: JoinHandle<()>,
}

impl NamedBackend {
    pub async fn start(name: &str) -> NamedBackend {
        Self::start_on("127.0.0.1:0".parse().unwrap(), name).await
    }

    pub async fn start_on(addr: SocketAddr, name: &str) -> NamedBackend {
        let listener = TcpListener::bind(addr).await.unwrap();
        let addr = listener.local_addr().unwrap();
        let accepted = Arc::new(AtomicUsize::new(0));
        let open = Arc::new(AtomicUsize::new(0));
        let max_open = Arc::new(AtomicUsize::new(0));
        let (acc, op, greeting) = (accepted.clone(), open.clone(), format!("{name}\n"));
        let peak = max_open.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((mut s, _)) = listener.accept().await else {
                    return;
                };
                acc.fetch_add(1, Ordering::SeqCst);
                let now = op.fetch_add(1, Ordering::SeqCst) + 1;
                peak.fetch_max(now, Ordering::SeqCst);
                let (greeting, op) = (greeting.clone(), op.clone());
                tokio::spawn(async move {
                    let _ = s.write_all(greeting.as_bytes()).await;
                    let mut buf = vec![0u8; 16 * 1024];
                    loop {
                        match s.read(&mut buf).await {
                            Ok(0) | Err(_) => break,
                            Ok(n) => {
                                if s.write_all(&buf[..n]).await.is_err() {
                                    break;
                                }
                            }
                        }
                    }
                    op.fetch_sub(1, Ordering::SeqCst);
                });
            }
        });
        NamedBackend {
            name: name.to_owned(),
            addr,
            accepted,
            open,
            max_open,
            task,
        }
    }

    pub fn accepted(&self) -> usize {
        self.accepted.load(Ordering::SeqCst)
    }

    pub fn open(&self) -> usize {
        self.open.load(Ordering::SeqCst)
    }

    /// Stop listening (new connections are refused).
    pub fn stop(&self) {
        self.task.abort();
    }
}

impl Drop for NamedBackend {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// An HTTP/1.1 backend (hyper) that answers every request with its name in
/// `x-backend`, what it saw in `x-seen-*` headers, and the request body
/// echoed back as the response body (streamed, never buffered). An
/// `Upgrade` request is answered 101 and the connection then echoes bytes.
pub struct HttpBackend {
    pub name: String,
    pub addr: SocketAddr,
    pub requests: Arc<AtomicUsize>,
    task: JoinHandle<()>,
}

impl HttpBackend {
    pub async fn start(name: &str) -> HttpBackend {
        Self::start_on("127.0.0.1:0".parse().unwrap(), name).await
    }

    pub async fn start_on(addr: SocketAddr, name: &str) -> HttpBackend {
        use hyper::header::{HeaderName, HeaderValue};
        let listener = TcpListener::bind(addr).await.unwrap();
        let addr = listener.local_addr().unwrap();
        let requests = Arc::new(AtomicUsize::new(0));
        let (count, me) = (requests.clone(), name.to_owned());
        let task = tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let (count, me) = (count.clone(), me.clone());
                tokio::spawn(async move {
                    let service = hyper::service::service_fn(
                        move |mut req: hyper::Request<hyper::body::Incoming>| {
                            count.fetch_add(1, Ordering::SeqCst);
                            let me = me.clone();
                            async move {
                                let seen = |name: &str| {
                                    req.headers()
                                        .get_all(name)
                                        .iter()
                                        .map(|v| v.to_str().unwrap_or("?").to_owned())
                                        .collect::<Vec<_>>()
                                        .join(" | ")
                                };
                                let mut resp = hyper::Response::builder()
                                    .header("x-backend", me.as_str())
                                    .header("x-seen-cookie", seen("cookie"))
                                    .header("x-seen-xff", seen("x-forwarded-for"))
                                    .header("x-seen-xfp", seen("x-forwarded-proto"))
                                    .header("x-seen-forwarded", seen("forwarded"))
                                    .header("x-seen-connection", seen("connection"))
                                    .header("x-seen-path", req.uri().to_string());
                                if req.headers().contains_key("upgrade") {
                                    let upgrade = hyper::upgrade::on(&mut req);
                                    tokio::spawn(async move {
                                        if let Ok(up) = upgrade.await {
                                            let mut io = hyper_util::rt::TokioIo::new(up);
                                            let mut buf = [0u8; 4096];
                                            while let Ok(n @ 1..) = io.read(&mut buf).await {
                                                if io.write_all(&buf[..n]).await.is_err() {
                                                    break;
                                                }
                                            }
                                        }
                                    });
                                    resp = resp
                                        .status(101)
                                        .header(
                                            HeaderName::from_static("upgrade"),
                                            HeaderValue::from_static("echo"),
                                        )
                                        .header(
                                            HeaderName::from_static("connection"),
                                            HeaderValue::from_static("upgrade"),
                                        );
                                    let empty = http_body_util::Empty::<bytes::Bytes>::new()
                                        .map_err(|never| match never {})
                                        .boxed();
                                    return Ok::<_, std::convert::Infallible>(
                                        resp.body(empty).unwrap(),
                                    );
                                }
                                let body = http_body_util::BodyExt::boxed(req.into_body());
                                Ok(resp.body(body).unwrap())
                            }
                        },
                    );
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                        .with_upgrades()
                        .await;
                });
            }
        });
        HttpBackend {
            name: name.to_owned(),
            addr,
            requests,
            task,
        }
    }
}

impl Drop for HttpBackend {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A keep-alive HTTP/1.1 client connection (hyper).
pub struct HttpClient {
    sender: hyper::client::conn::http1::SendRequest<http_body_util::Full<bytes::Bytes>>,
    pub addr: SocketAddr,
}

/// A response, read in full.
pub struct HttpReply {
    pub status: u16,
    pub headers: hyper::HeaderMap,
    pub body: bytes::Bytes,
}

impl HttpReply {
    pub fn header(&self, name: &str) -> &str {
        self.headers.get(name).map_or("", |v| v.to_str().unwrap())
    }
    pub fn set_cookies(&self) -> Vec<String> {
        self.headers
            .get_all("set-cookie")
            .iter()
            .map(|v| v.to_str().unwrap().to_owned())
            .collect()
    }
}

impl HttpClient {
    pub async fn connect(addr: SocketAddr) -> HttpClient {
        let stream = within("connect", TcpStream::connect(addr)).await.unwrap();
        let (sender, conn) =
            hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
                .await
                .unwrap();
        tokio::spawn(conn.with_upgrades());
        HttpClient { sender, addr }
    }

    /// One request on this connection; headers as (name, value) pairs.
    pub async fn request(
        &mut self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: Vec<u8>,
    ) -> HttpReply {
        use http_body_util::BodyExt;
        let mut req = hyper::Request::builder()
            .method(method)
            .uri(path)
            .header("host", "example.test");
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        let req = req
            .body(http_body_util::Full::new(bytes::Bytes::from(body)))
            .unwrap();
        within("sender ready", self.sender.ready()).await.unwrap();
        let resp = within("response", self.sender.send_request(req))
            .await
            .unwrap();
        let (parts, body) = resp.into_parts();
        let body = within("body", body.collect()).await.unwrap().to_bytes();
        HttpReply {
            status: parts.status.as_u16(),
            headers: parts.headers,
            body,
        }
    }

    pub async fn get(&mut self, path: &str, headers: &[(&str, &str)]) -> HttpReply {
        self.request("GET", path, headers, Vec::new()).await
    }
}

/// A client connection that has read the backend's name.
pub struct Session {
    pub backend: String,
    pub stream: TcpStream,
}

/// Connect through the proxy and read which backend answered.
pub async fn connect_named(proxy: SocketAddr) -> Session {
    connect_named_from(proxy, None).await
}

/// Same, from a chosen local source address (127.0.0.2, …).
pub async fn connect_named_from(proxy: SocketAddr, source: Option<IpAddr>) -> Session {
    let stream = connect_from(proxy, source).await;
    let mut reader = TokioBufReader::new(stream);
    let mut line = String::new();
    within("backend greeting", reader.read_line(&mut line))
        .await
        .unwrap();
    assert!(
        line.ends_with('\n'),
        "no greeting through the proxy: {line:?}"
    );
    line.pop();
    Session {
        backend: line,
        stream: reader.into_inner(),
    }
}

pub async fn connect_from(proxy: SocketAddr, source: Option<IpAddr>) -> TcpStream {
    let socket = if proxy.is_ipv4() {
        TcpSocket::new_v4().unwrap()
    } else {
        TcpSocket::new_v6().unwrap()
    };
    if let Some(ip) = source {
        socket.bind(SocketAddr::new(ip, 0)).unwrap();
    }
    within("connect to proxy", socket.connect(proxy))
        .await
        .unwrap()
}

/// Where `n` sequential connections went: backend name → count.
pub async fn spread(proxy: SocketAddr, n: usize) -> HashMap<String, usize> {
    let mut counts = HashMap::new();
    for _ in 0..n {
        *counts
            .entry(connect_named(proxy).await.backend)
            .or_default() += 1;
    }
    counts
}

/// Wait until `addr` refuses connections.
pub async fn wait_for_refused(addr: SocketAddr) {
    let start = tokio::time::Instant::now();
    let mut poll = tokio::time::interval(Duration::from_millis(10));
    while TcpStream::connect(addr).await.is_ok() {
        assert!(start.elapsed() < DEADLINE, "{addr} still accepts");
        poll.tick().await;
    }
}

/// A backend that never answers: a listener whose accept queue is full, so
/// the kernel drops further SYNs and connects hang. Keep all three values
/// alive for as long as the hole is needed.
pub fn hanging_backend() -> (socket2::Socket, Vec<std::net::TcpStream>, SocketAddr) {
    use socket2::{Domain, Socket, Type};
    let socket = Socket::new(Domain::IPV4, Type::STREAM, None).unwrap();
    socket
        .bind(&"127.0.0.1:0".parse::<SocketAddr>().unwrap().into())
        .unwrap();
    socket.listen(0).unwrap();
    let addr = socket.local_addr().unwrap().as_socket().unwrap();
    let fillers = (0..2)
        .filter_map(|_| {
            std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(300)).ok()
        })
        .collect();
    (socket, fillers, addr)
}

/// Read until EOF or error; true when the peer closed (EOF or reset).
pub async fn closed_by_peer(stream: &mut TcpStream) -> bool {
    let mut buf = [0u8; 1024];
    loop {
        match stream.read(&mut buf).await {
            Ok(0) | Err(_) => return true,
            Ok(_) => continue,
        }
    }
}

/// A backend entry for a config.
pub struct B<'a> {
    pub name: &'a str,
    pub addr: SocketAddr,
    pub weight: u32,
}

pub fn b(name: &str, addr: SocketAddr) -> B<'_> {
    B {
        name,
        addr,
        weight: 1,
    }
}

/// Config text for one listener named "l" on 127.0.0.1:0.
pub fn listener_toml(algorithm: &str, extra: &str, backends: &[B<'_>]) -> String {
    let mut s = format!(
        "[[listener]]\nname = \"l\"\nbind = \"127.0.0.1:0\"\nalgorithm = \"{algorithm}\"\n{extra}\n"
    );
    for b in backends {
        s += &format!(
            "[[listener.backend]]\nname = \"{}\"\naddress = \"{}\"\nweight = {}\n",
            b.name, b.addr, b.weight
        );
    }
    s
}

/// An in-process server from config text.
pub async fn start_server(toml: &str) -> Server {
    let config = config::load_str(toml, Path::new("test.toml")).expect("valid test config");
    Server::start(config).await.expect("server starts")
}

/// The daemon binary, running.
pub struct Daemon {
    child: Option<Child>,
    /// `pid` is not our child but was reparented to this process (it was
    /// started by a live upgrade): reaped with `waitpid`.
    adopted: bool,
    pub pid: u32,
    /// The config file it runs on.
    pub path: PathBuf,
    /// Listener name → bound address, from the log.
    pub listeners: HashMap<String, SocketAddr>,
    /// The admin endpoint's address, from the log.
    pub admin: Option<SocketAddr>,
    /// Every log line read so far, as written.
    pub raw: Vec<String>,
    stderr: mpsc::Receiver<String>,
    _dir: tempfile::TempDir,
}

pub fn binary() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_switchyard"))
}

impl Daemon {
    /// Start `switchyard run` on this config and wait until it logs "ready".
    pub fn start(toml: &str) -> Daemon {
        Self::start_with(toml, &[])
    }

    /// Same, with extra arguments for `run` (e.g. `--watch`).
    pub fn start_with(toml: &str, args: &[&str]) -> Daemon {
        Self::start_env(toml, args, &[])
    }

    /// Same, with extra environment variables.
    pub fn start_env(toml: &str, args: &[&str], envs: &[(&str, &str)]) -> Daemon {
        Self::start_exe(&binary(), toml, args, envs)
    }

    /// Same, running the executable at `exe` (live upgrades start the file
    /// at that path).
    pub fn start_exe(exe: &Path, toml: &str, args: &[&str], envs: &[(&str, &str)]) -> Daemon {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("switchyard.toml");
        std::fs::write(&path, toml).unwrap();
        let mut child = Command::new(exe)
            .args(["run", "--config"])
            .arg(&path)
            .args(args)
            .env("RUST_LOG", "info")
            .envs(envs.iter().copied())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let (tx, rx) = mpsc::channel();
        let stderr = child.stderr.take().unwrap();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let mut daemon = Daemon {
            pid: child.id(),
            child: Some(child),
            adopted: false,
            path,
            listeners: HashMap::new(),
            admin: None,
            raw: Vec::new(),
            stderr: rx,
            _dir: dir,
        };
        daemon.log_until(|l| l.contains(" ready"));
        daemon
    }

    /// Read log lines until one satisfies `pred`, and return it. Listener
    /// addresses logged on the way are recorded.
    pub fn log_until(&mut self, pred: impl Fn(&str) -> bool) -> String {
        self.log_until_for(DEADLINE, pred)
    }

    /// [`log_until`](Self::log_until) with a deadline of its own.
    pub fn log_until_for(&mut self, deadline: Duration, pred: impl Fn(&str) -> bool) -> String {
        let end = std::time::Instant::now() + deadline;
        loop {
            let line = self
                .stderr
                .recv_timeout(end.saturating_duration_since(std::time::Instant::now()))
                .unwrap_or_else(|e| {
                    panic!(
                        "expected log line did not come before the deadline ({e}); last lines:\n{}",
                        self.raw[self.raw.len().saturating_sub(15)..].join("\n")
                    )
                });
            self.raw.push(line.clone());
            // JSON logs: match on the same text a text log line would show.
            let line = match serde_json::from_str::<serde_json::Value>(&line) {
                Ok(v) if v.is_object() => {
                    let fields = v["fields"].as_object().cloned().unwrap_or_default();
                    let mut text = format!(
                        " {}",
                        fields.get("message").and_then(|m| m.as_str()).unwrap_or("")
                    );
                    for (k, v) in &fields {
                        if k != "message" {
                            let v = v.as_str().map_or_else(|| v.to_string(), str::to_owned);
                            text += &format!(" {k}={v}");
                        }
                    }
                    text
                }
                _ => line,
            };
            if line.contains("admin listening") {
                self.admin = Some(field(&line, "addr").parse().unwrap());
            } else if line.contains(" listening") && line.contains("addr=") {
                self.listeners.insert(
                    field(&line, "listener"),
                    field(&line, "addr").parse().unwrap(),
                );
            }
            if pred(&line) {
                return line;
            }
        }
    }

    pub fn addr(&self, listener: &str) -> SocketAddr {
        *self
            .listeners
            .get(listener)
            .unwrap_or_else(|| panic!("no listener {listener}"))
    }

    /// Write a new config in place.
    pub fn write_config(&self, toml: &str) {
        std::fs::write(&self.path, toml).unwrap();
    }

    /// Write a new config the way editors do: a new file renamed over.
    pub fn replace_config(&self, toml: &str) {
        let tmp = self.path.with_extension("toml.tmp");
        std::fs::write(&tmp, toml).unwrap();
        std::fs::rename(&tmp, &self.path).unwrap();
    }

    /// Wait for the outcome of a reload: true when it was applied.
    pub fn reload_outcome(&mut self) -> bool {
        let line =
            self.log_until(|l| l.contains("configuration reloaded") || l.contains("reload failed"));
        line.contains("configuration reloaded")
    }

    /// SIGHUP and wait for the outcome.
    pub fn reload(&mut self) -> bool {
        self.signal("HUP");
        self.reload_outcome()
    }

    pub fn signal(&self, sig: &str) {
        let ok = Command::new("kill")
            .args([&format!("-{sig}"), &self.pid.to_string()])
            .status()
            .unwrap()
            .success();
        assert!(ok, "kill -{sig} failed");
    }

    /// SIGUSR2, then wait until the new process has taken over and the
    /// old one has exited; the old one's exit code. From then on this
    /// daemon is the new process (which this test process reaps: see
    /// [`become_subreaper`]).
    pub fn upgrade(&mut self) -> i32 {
        self.signal("USR2");
        self.finish_upgrade()
    }

    /// The second half of [`upgrade`](Self::upgrade), after SIGUSR2.
    pub fn finish_upgrade(&mut self) -> i32 {
        self.taken_over().wait()
    }

    /// Wait until the new process has taken over. From then on this
    /// daemon is the new process; the old one, which may still be
    /// finishing connections (TLS ones), is returned.
    pub fn taken_over(&mut self) -> OldProcess {
        let line = self.log_until(|l| {
            l.contains("the new process has taken over") || l.contains("live upgrade failed")
        });
        assert!(line.contains("taken over"), "upgrade failed: {line}");
        let new: u32 = field(&line, "pid").parse().unwrap();
        assert_ne!(new, self.pid, "the new process has a new pid");
        let old = OldProcess {
            child: self.child.take(),
            adopted: self.adopted,
            pid: self.pid,
        };
        (self.pid, self.adopted) = (new, true);
        old
    }

    /// Wait for the process to exit and return its exit code.
    pub fn wait_exit(&mut self) -> i32 {
        exit_code(self.child.take(), self.adopted, self.pid)
    }

    /// Whether the process is still running.
    pub fn alive(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|c| c.try_wait().unwrap().is_none())
    }
}

/// The process a live upgrade replaced, until it exits.
pub struct OldProcess {
    child: Option<Child>,
    adopted: bool,
    pub pid: u32,
}

impl OldProcess {
    /// Wait for it to exit (within the deadline); its exit code.
    pub fn wait(mut self) -> i32 {
        exit_code(
            self.child.take(),
            std::mem::take(&mut self.adopted),
            self.pid,
        )
    }
}

impl Drop for OldProcess {
    fn drop(&mut self) {
        if self.child.is_some() || self.adopted {
            // SAFETY: plain syscalls on a pid this process reaps.
            unsafe {
                libc::kill(self.pid as i32, libc::SIGKILL);
                libc::waitpid(self.pid as i32, std::ptr::null_mut(), 0);
            }
        }
    }
}

/// Wait (within the deadline) for the daemon `pid` to exit: our `child`,
/// or a process reparented to us (`adopted`). Its exit code.
fn exit_code(child: Option<Child>, adopted: bool, pid: u32) -> i32 {
    if adopted {
        return reap(pid);
    }
    let mut child = child.expect("waited once");
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait());
    });
    let Ok(status) = rx.recv_timeout(DEADLINE) else {
        // Not reaped yet, so the pid is still ours.
        let _ = Command::new("kill").args(["-9", &pid.to_string()]).status();
        panic!("daemon did not exit before the deadline");
    };
    let status = status.unwrap();
    status.code().expect("exited by signal")
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        } else if self.adopted {
            // SAFETY: plain syscalls on a pid this process reaps.
            unsafe {
                libc::kill(self.pid as i32, libc::SIGKILL);
                libc::waitpid(self.pid as i32, std::ptr::null_mut(), 0);
            }
        }
    }
}

/// Make this test process the reaper of orphaned descendants: a daemon a
/// live upgrade started is the old daemon's child, and becomes ours when
/// the old one exits, so its exit code can be read.
pub fn become_subreaper() {
    // SAFETY: prctl with integer arguments.
    let r = unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) };
    assert_eq!(
        r,
        0,
        "PR_SET_CHILD_SUBREAPER: {}",
        std::io::Error::last_os_error()
    );
}

/// Wait (up to the deadline) for `pid`, a process this one reaps; its exit
/// code.
pub fn reap(pid: u32) -> i32 {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let mut status = 0;
        // SAFETY: waits for one pid; `status` is ours.
        let r = unsafe { libc::waitpid(pid as i32, &mut status, 0) };
        let _ = tx.send((r, status));
    });
    let (r, status) = rx
        .recv_timeout(DEADLINE)
        .expect("process exits before the deadline");
    assert_eq!(
        r,
        pid as i32,
        "waitpid({pid}): {}",
        std::io::Error::last_os_error()
    );
    assert!(
        libc::WIFEXITED(status),
        "pid {pid} ended by a signal: status {status}"
    );
    libc::WEXITSTATUS(status)
}

/// A plain HTTP/1.1 exchange with hyper's client: (status, body).
pub async fn http(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> (u16, String) {
    use http_body_util::{BodyExt, Full};
    let stream = within("admin connect", TcpStream::connect(addr))
        .await
        .unwrap();
    let (mut sender, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
            .await
            .unwrap();
    tokio::spawn(conn);
    let mut req = hyper::Request::builder()
        .method(method)
        .uri(path)
        .header("host", addr.to_string());
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let req = req
        .body(Full::new(bytes::Bytes::from(body.to_owned())))
        .unwrap();
    let resp = within("admin response", sender.send_request(req))
        .await
        .unwrap();
    let status = resp.status().as_u16();
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    (status, String::from_utf8_lossy(&body).into_owned())
}

/// `key=value` from a text log line.
fn field(line: &str, key: &str) -> String {
    let pat = format!("{key}=");
    let start = line
        .find(&pat)
        .unwrap_or_else(|| panic!("no {key} in {line}"))
        + pat.len();
    line[start..].split_whitespace().next().unwrap().to_owned()
}

/// What a backend's last check said: (reason, role).
pub fn report(server: &Server, listener: &str, backend: &str) -> (Option<String>, Option<Role>) {
    assert!(
        server.backend_state(listener, backend).is_some(),
        "no backend {listener}/{backend}"
    );
    (
        server.check_reason(listener, backend),
        server.role(listener, backend),
    )
}

pub fn rotation(server: &Server, listener: &str) -> Vec<String> {
    let mut names: Vec<String> = server
        .in_rotation(listener)
        .unwrap()
        .iter()
        .map(|n| n.to_string())
        .collect();
    names.sort();
    names
}

/// Wait until the listener's pool offers exactly these backends (the
/// backend-set owner republishes it just after a flip).
pub async fn wait_rotation(server: &Server, listener: &str, names: &[&str]) {
    wait_for(&format!("{listener}: rotation {names:?}"), || {
        rotation(server, listener) == names
    })
    .await;
}

/// Wait until a backend's last check said exactly this (or fail after
/// `DEADLINE`, showing what it said last).
pub async fn wait_report(
    server: &Server,
    listener: &str,
    backend: &str,
    want: (Option<&str>, Option<Role>),
) {
    let start = tokio::time::Instant::now();
    let mut poll = tokio::time::interval(Duration::from_millis(5));
    loop {
        let (reason, role) = report(server, listener, backend);
        if (reason.as_deref(), role) == want {
            return;
        }
        assert!(
            start.elapsed() < DEADLINE,
            "{listener}/{backend}: waited for {want:?}, last {:?}",
            (reason, role)
        );
        poll.tick().await;
    }
}

/// Config text for a listener `name` (round robin, on 127.0.0.1:0) whose
/// `[listener.health_check]` holds the lines `check`, over `backends`.
pub fn checked_listener(name: &str, check: &str, backends: &[(&str, SocketAddr)]) -> String {
    let mut s = format!(
        "[[listener]]\nname = \"{name}\"\nbind = \"127.0.0.1:0\"\nalgorithm = \"roundrobin\"\n\
         [listener.health_check]\n{check}\n"
    );
    for (backend, addr) in backends {
        s += &format!("[[listener.backend]]\nname = \"{backend}\"\naddress = \"{addr}\"\n");
    }
    s
}

/// A `password_file = ...` line for `password`, the file (with the trailing
/// newline an editor leaves) written as `dir/name`.
pub fn password_file_line(dir: &Path, name: &str, password: &str) -> String {
    let file = dir.join(name);
    std::fs::write(&file, format!("{password}\n")).unwrap();
    format!("password_file = \"{}\"\n", file.display())
}

/// One scrape of the admin endpoint's `/metrics`, parsed by a real
/// Prometheus text parser.
pub async fn scrape(admin: SocketAddr) -> prometheus_parse::Scrape {
    let (status, body) = http(admin, "GET", "/metrics", &[], "").await;
    assert_eq!(status, 200);
    prometheus_parse::Scrape::parse(body.lines().map(|l| Ok(l.to_owned())))
        .expect("valid exposition")
}

/// Poll the async `probe` until it returns `Ok`, failing the test after
/// `DEADLINE` with the last thing it said (`Err`) about what it saw.
pub async fn eventually<T, F, Fut>(what: &str, mut probe: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, String>>,
{
    let start = tokio::time::Instant::now();
    let mut poll = tokio::time::interval(Duration::from_millis(10));
    loop {
        match probe().await {
            Ok(v) => return v,
            Err(last) => assert!(
                start.elapsed() < DEADLINE,
                "timed out waiting for {what}; last seen: {last}"
            ),
        }
        poll.tick().await;
    }
}

/// A port on 127.0.0.1 free for both UDP and TCP just now (bound, read,
/// released), for configs that must name a fixed port.
pub fn free_udp_tcp_port() -> u16 {
    for _ in 0..100 {
        let udp = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let port = udp.local_addr().unwrap().port();
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
    panic!("no port free for both UDP and TCP on 127.0.0.1");
}

/// The value of the one sample of `name` whose labels include `labels`
/// (a histogram: its count), or `None` if there is none; more than one
/// matching sample fails the test.
pub fn sample_value(
    scrape: &prometheus_parse::Scrape,
    name: &str,
    labels: &[(&str, &str)],
) -> Option<f64> {
    use prometheus_parse::Value;
    let matching: Vec<&prometheus_parse::Sample> = scrape
        .samples
        .iter()
        .filter(|s| s.metric == name && labels.iter().all(|(k, v)| s.labels.get(k) == Some(*v)))
        .collect();
    assert!(
        matching.len() <= 1,
        "{name} {labels:?} matches {} samples",
        matching.len()
    );
    matching.first().map(|s| match &s.value {
        Value::Counter(v) | Value::Gauge(v) | Value::Untyped(v) => *v,
        Value::Histogram(h) => h.iter().map(|b| b.count).fold(0.0, f64::max),
        Value::Summary(_) => panic!("no summaries here"),
    })
}

/// A fake systemd notify socket: every datagram the daemon sends, with the
/// pid of the process that sent it (`SO_PASSCRED`, as systemd reads it to
/// apply `NotifyAccess=main`).
pub struct NotifySocket {
    socket: std::os::unix::net::UnixDatagram,
    _dir: tempfile::TempDir,
    pub path: String,
}

impl NotifySocket {
    pub fn new() -> NotifySocket {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("notify.sock");
        let socket = std::os::unix::net::UnixDatagram::bind(&path).unwrap();
        socket.set_read_timeout(Some(DEADLINE)).unwrap();
        rustix::net::sockopt::set_socket_passcred(&socket, true).unwrap();
        NotifySocket {
            socket,
            path: path.to_str().unwrap().to_owned(),
            _dir: dir,
        }
    }

    /// The next message that is not a watchdog ping, with the pings seen
    /// on the way (and when they arrived).
    pub fn next(&self, pings: &mut Vec<std::time::Instant>) -> String {
        loop {
            let (msg, _) = self.next_from();
            if msg.trim() == "WATCHDOG=1" {
                pings.push(std::time::Instant::now());
            } else {
                return msg;
            }
        }
    }

    /// The next message, pings included, and the pid that sent it.
    pub fn next_from(&self) -> (String, u32) {
        use rustix::net::{RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags};
        let mut buf = [0u8; 4096];
        let mut space = [std::mem::MaybeUninit::uninit(); rustix::cmsg_space!(ScmCredentials(1))];
        let mut control = RecvAncillaryBuffer::new(&mut space);
        let r = rustix::net::recvmsg(
            &self.socket,
            &mut [std::io::IoSliceMut::new(&mut buf)],
            &mut control,
            RecvFlags::empty(),
        )
        .expect("notification before the deadline");
        let mut pid = 0;
        for m in control.drain() {
            if let RecvAncillaryMessage::ScmCredentials(c) = m {
                pid = c.pid.as_raw_nonzero().get() as u32;
            }
        }
        (String::from_utf8_lossy(&buf[..r.bytes]).into_owned(), pid)
    }
}

/// `/api/v1/status`: backend name → its JSON, for `listener`.
pub async fn status_backends(
    admin: SocketAddr,
    listener: &str,
) -> HashMap<String, serde_json::Value> {
    let (code, body) = http(admin, "GET", "/api/v1/status", &[], "").await;
    assert_eq!(code, 200, "{body}");
    let doc: serde_json::Value = serde_json::from_str(&body).unwrap();
    let l = doc["listeners"]
        .as_array()
        .unwrap()
        .iter()
        .find(|l| l["name"] == listener)
        .unwrap_or_else(|| panic!("no listener {listener} in status"))
        .clone();
    l["backends"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| (b["name"].as_str().unwrap().to_owned(), b.clone()))
        .collect()
}

/// Keepalive timers, from `ss`, of the established TCP sockets to `peer`
/// (and from `local`, if given): the seconds left, or `None` for a socket
/// without one.
pub fn keepalive_timers(local: Option<SocketAddr>, peer: SocketAddr) -> Vec<Option<u64>> {
    let out = std::process::Command::new("ss")
        .args(["-tnoH", "state", "established"])
        .output()
        .expect("ss (iproute2) runs");
    let text = String::from_utf8_lossy(&out.stdout);
    text.lines()
        .filter(|l| {
            let cols: Vec<&str> = l.split_whitespace().collect();
            cols.len() >= 4
                && local.is_none_or(|local| cols[2] == local.to_string())
                && cols[3] == peer.to_string()
        })
        .map(|l| {
            let start = l.find("timer:(keepalive,")? + "timer:(keepalive,".len();
            let secs: String = l[start..]
                .chars()
                .take_while(char::is_ascii_digit)
                .collect();
            secs.parse().ok()
        })
        .collect()
}

/// The `ss` line of the established socket from `local` to `peer`.
pub fn ss_line(local: SocketAddr, peer: SocketAddr) -> String {
    let out = std::process::Command::new("ss")
        .args(["-tnoH", "state", "established"])
        .output()
        .expect("ss (iproute2) runs");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .find(|l| {
            let cols: Vec<&str> = l.split_whitespace().collect();
            cols.len() >= 4 && cols[2] == local.to_string() && cols[3] == peer.to_string()
        })
        .unwrap_or_default()
        .to_owned()
}
