//! Live upgrade (SIGUSR2): a new executable takes over every listening
//! socket and every established tcp-mode connection, with the backends'
//! health and admin state and every counter (SPEC "Live upgrade").
//!
//! The old process ([`Upgrade`]) starts the executable at the path it was
//! started from, with the same arguments and environment and one inherited
//! Unix socket (`SWITCHYARD_UPGRADE_FD`). The new process ([`take_over`])
//! loads and validates the config, checks that the socket's peer is its
//! parent, and says hello. From then on:
//!
//! 1. old → new: the backends' states, then every listening socket (the old
//!    process stops accepting first; clients wait in the kernel backlog, none
//!    is refused); the new process starts serving them at once;
//! 2. old: every established tcp-mode session freezes (`handover`) and goes
//!    over with its two sockets and the bytes it held; connections still
//!    being placed follow as soon as they are established; udp sessions go
//!    with their connected sockets (the new listener adopts them before it
//!    reads a datagram); HTTP-mode client connections go between two
//!    requests, with what was read ahead (one in progress is answered
//!    first); WebSocket tunnels are tcp-mode sessions and move as such;
//! 3. once the old process holds no connection (or after `shutdown_timeout`),
//!    its counters, then its admin socket, then `Done`; the new process
//!    adopts the connections, carries the counters (before it serves a
//!    scrape: no counter goes backwards) and answers `Adopted`;
//! 4. the old process, still systemd's main process, sends
//!    `MAINPID=<new pid>`, tells the new one, which sends `READY=1`; the old
//!    process exits 0.
//!
//! Before the hello the old process has changed nothing: a new process that
//! exits (noticed at once) or is not ready within [`HELLO_TIMEOUT`] (then
//! killed) is a failure, counted, and everything goes on as before.

pub mod wire;

use std::ffi::OsString;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::sync::OnceLock;
use std::time::Duration;

use hashbrown::HashMap;
use serde::{Deserialize, Serialize};
use tokio::time::Instant;
use tracing::{info, warn};

use crate::handover::{Frozen, FrozenHttp, FrozenTcp, FrozenUdp, Pending};
use crate::metrics::Carried;
use crate::proxy::Bound;
use crate::registry::Seed;
use crate::server::Server;
use wire::{Frame, Link};

/// The environment variable that names the inherited handover socket.
pub const FD_ENV: &str = "SWITCHYARD_UPGRADE_FD";

/// How long a new process may take to load its config and say hello.
pub const HELLO_TIMEOUT: Duration = Duration::from_secs(30);

/// How long the new process may take to adopt what it was handed.
const ADOPT_TIMEOUT: Duration = Duration::from_secs(30);

/// Old → new.
#[derive(Debug, Serialize, Deserialize)]
pub enum ToNew {
    Backends(Vec<Seed>),
    /// A listening socket (one descriptor) of the named listener.
    Listener {
        name: String,
    },
    /// Every listening socket has been sent.
    ListenersDone,
    /// An established tcp-mode connection: descriptors client, backend;
    /// payload = the client→backend bytes, then the backend→client bytes.
    Connection {
        listener: String,
        backend: String,
        c2b_len: usize,
        c2b_done: bool,
        b2c_done: bool,
        age_ms: u64,
        keepalive_pending: bool,
    },
    /// A udp session: one descriptor, its socket connected to the backend.
    UdpSession {
        listener: String,
        backend: String,
        client: std::net::SocketAddr,
        replies_left: Option<u32>,
    },
    /// An HTTP-mode client connection between two requests: one
    /// descriptor; payload = bytes read past the last request answered.
    HttpConnection {
        listener: String,
        peer: std::net::SocketAddr,
        age_ms: u64,
    },
    Metrics(Vec<Carried>),
    /// The admin endpoint's listening socket (one descriptor).
    Admin,
    /// Nothing more: adopt everything and answer.
    Done,
    /// systemd has been told the new main PID: send `READY=1`.
    MainPidSent,
}

/// New → old.
#[derive(Debug, Serialize, Deserialize)]
pub enum ToOld {
    /// The config loaded and validated: hand over.
    Hello { pid: u32 },
    /// Every connection adopted; the old process may let go.
    Adopted { connections: usize },
}

static EXECUTABLE: OnceLock<Option<PathBuf>> = OnceLock::new();

/// Remember the absolute path this process was started from (argv[0],
/// searched in `PATH` when it has no slash): a package upgrade replaces
/// the file at that path, and SIGUSR2 starts whatever is there then. Call
/// once at start-up, before the working directory could change.
pub fn remember_executable() {
    EXECUTABLE.get_or_init(|| {
        let argv0 = PathBuf::from(std::env::args_os().next()?);
        if argv0.components().count() > 1 {
            return std::path::absolute(&argv0).ok();
        }
        std::env::split_paths(&std::env::var_os("PATH")?)
            .map(|dir| dir.join(&argv0))
            .find(|p| p.is_file())
            .and_then(|p| std::path::absolute(p).ok())
    });
}

fn executable() -> Option<PathBuf> {
    EXECUTABLE.get().cloned().flatten()
}

/// An upgrade the old process has started: the new process, until its
/// hello.
pub struct Upgrade {
    child: tokio::process::Child,
    link: Link<ToNew, ToOld>,
    deadline: Instant,
}

impl Upgrade {
    /// Start the executable with an inherited handover socket.
    pub fn start() -> Result<Upgrade, String> {
        let exe = executable().ok_or("the executable's path is unknown")?;
        let (ours, theirs) = UnixStream::pair().map_err(|e| format!("socketpair: {e}"))?;
        // Inherited across exec: the one descriptor the child gets besides
        // stdio (Rust opens everything else close-on-exec).
        rustix::io::fcntl_setfd(&theirs, rustix::io::FdFlags::empty())
            .map_err(|e| format!("fcntl: {e}"))?;
        let args: Vec<OsString> = std::env::args_os().skip(1).collect();
        let mut command = tokio::process::Command::new(&exe);
        // SIGUSR2 ignored until the new process has taken over (an ignored
        // signal stays ignored across exec): `systemctl kill -s USR2`
        // signals every process of the unit, again and again while new ones
        // appear, so the new process gets the signal meant for this one
        // before it could install a handler, and would die of it.
        // SAFETY: the closure runs between fork and exec and calls only
        // sigaction (through signal), which is async-signal-safe.
        unsafe {
            command.pre_exec(|| {
                if libc::signal(libc::SIGUSR2, libc::SIG_IGN) == libc::SIG_ERR {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let child = command
            .args(&args)
            .env(FD_ENV, theirs.as_raw_fd().to_string())
            // systemd's watchdog names the main process; the new one
            // becomes it, so it must not think the watchdog is another's.
            .env_remove("WATCHDOG_PID")
            .kill_on_drop(false)
            .spawn()
            .map_err(|e| format!("cannot start {}: {e}", exe.display()))?;
        drop(theirs);
        let link = Link::new(ours).map_err(|e| format!("handover socket: {e}"))?;
        info!(exe = %exe.display(), pid = child.id(), "live upgrade: new process started");
        Ok(Upgrade {
            child,
            link,
            deadline: Instant::now() + HELLO_TIMEOUT,
        })
    }

    /// Wait for the new process's hello: its pid, or why the upgrade
    /// failed (it exited, broke the socket, or took too long: then it is
    /// killed).
    pub async fn hello(&mut self) -> Result<u32, String> {
        let outcome = tokio::select! {
            status = self.child.wait() => Err(match status {
                Ok(s) => format!("the new process exited ({s}) before taking over"),
                Err(e) => format!("waiting for the new process: {e}"),
            }),
            frame = self.link.rx.recv() => match frame {
                Some(Ok(Frame { msg: ToOld::Hello { pid }, .. })) => Ok(pid),
                Some(Ok(f)) => Err(format!("unexpected message before hello: {:?}", f.msg)),
                Some(Err(e)) => Err(format!("handover socket: {e}")),
                // It closed its end: most likely it is exiting; say how.
                None => Err(match tokio::time::timeout(Duration::from_secs(1), self.child.wait()).await {
                    Ok(Ok(s)) => format!("the new process exited ({s}) before taking over"),
                    _ => "the new process closed the handover socket".into(),
                }),
            },
            () = tokio::time::sleep_until(self.deadline) => {
                Err(format!("the new process did not take over within {HELLO_TIMEOUT:?}"))
            }
        };
        if outcome.is_err() {
            let _ = self.child.start_kill();
            let _ = self.child.wait().await;
        }
        outcome
    }

    /// Hand everything over to the new process (after its hello). `Ok` once
    /// it has adopted everything: this process then holds nothing and may
    /// exit. `admin` is the admin endpoint's socket, sent last, after the
    /// counters, once the caller has stopped serving it.
    pub async fn hand_over(
        mut self,
        server: &mut Server,
        grace: Duration,
        stop_admin: impl AsyncFnOnce() -> Option<OwnedFd>,
    ) -> Result<u32, String> {
        let send = |frame: Frame<ToNew>| {
            self.link
                .tx
                .send(frame)
                .map_err(|_| "the handover socket closed".to_string())
        };
        send(Frame::new(ToNew::Backends(server.registry().seeds())))?;
        // 1. Listeners: stop accepting here, then send the sockets. Sessions
        //    of stopped udp listeners wait to be frozen.
        let ctx = server.context().clone();
        let mut frozen = ctx.handover.open();
        server.stop_accepting().await;
        for (name, fd) in server.sockets() {
            let fd = fd.try_clone_to_owned().map_err(|e| format!("dup: {e}"))?;
            let mut frame = Frame::new(ToNew::Listener {
                name: name.to_string(),
            });
            frame.fds.push(fd);
            send(frame)?;
        }
        send(Frame::new(ToNew::ListenersDone))?;
        // 2. Sessions, until this process holds none it can hand over.
        //    TLS connections stay (their session keys are here): they go
        //    on below, after everything else has been handed over.
        ctx.handover.freeze();
        ctx.draining.trip();
        ctx.tracker.close();
        ctx.kept.close();
        let deadline = Instant::now() + grace;
        let mut sent = 0usize;
        loop {
            tokio::select! {
                Some(f) = frozen.recv() => { send(session_frame(f))?; sent += 1; }
                () = ctx.tracker.wait() => break,
                () = tokio::time::sleep_until(deadline) => {
                    warn!(open = ctx.tracker.len(), "live upgrade: connections that could not be handed over are cut");
                    ctx.abort.trip();
                    ctx.tracker.wait().await;
                    break;
                }
            }
        }
        while let Ok(f) = frozen.try_recv() {
            send(session_frame(f))?;
            sent += 1;
        }
        // 3. Counters, the admin socket, done. Only the connections kept
        //    here count from now on; what they count follows at the end.
        let counted = server.metrics().snapshot();
        send(Frame::new(ToNew::Metrics(counted.clone())))?;
        if let Some(fd) = stop_admin().await {
            let mut frame = Frame::new(ToNew::Admin);
            frame.fds.push(fd);
            send(frame)?;
        }
        send(Frame::new(ToNew::Done))?;
        info!(connections = sent, "live upgrade: everything sent");
        let adopted = tokio::select! {
            frame = self.link.rx.recv() => match frame {
                Some(Ok(Frame { msg: ToOld::Adopted { connections }, .. })) => Ok(connections),
                Some(Ok(f)) => Err(format!("unexpected message: {:?}", f.msg)),
                Some(Err(e)) => Err(format!("handover socket: {e}")),
                None => Err("the new process closed the handover socket".into()),
            },
            status = self.child.wait() => Err(format!("the new process exited ({status:?}) while taking over")),
            () = tokio::time::sleep(ADOPT_TIMEOUT) => Err("the new process did not confirm within 30 s".into()),
        }?;
        let pid = self.child.id().ok_or("the new process is gone")?;
        crate::service::main_pid(pid);
        let _ = send(Frame::new(ToNew::MainPidSent));
        info!(
            pid,
            connections = adopted,
            "live upgrade: the new process has taken over"
        );
        // 4. The TLS connections run on here until they end, within the
        //    grace; then what they counted goes to the new process.
        let kept = ctx.kept.len();
        if kept > 0 {
            info!(kept, "live upgrade: TLS connections finish in this process");
            if tokio::time::timeout_at(deadline, ctx.kept.wait())
                .await
                .is_err()
            {
                warn!(
                    cut = ctx.kept.len(),
                    "live upgrade: TLS connections still open at the end of shutdown_timeout are cut"
                );
                ctx.abort.trip();
                ctx.kept.wait().await;
            }
            let _ = send(Frame::new(ToNew::Metrics(server.metrics().since(&counted))));
        }
        // The sender thread flushes and shuts the socket down when the
        // link is dropped; wait for the new process to read it all.
        drop(self.link.tx);
        let _ = tokio::time::timeout(Duration::from_secs(5), self.link.rx.recv()).await;
        Ok(pid)
    }
}

fn session_frame(f: Frozen) -> Frame<ToNew> {
    match f {
        Frozen::Tcp(f) => connection_frame(f),
        Frozen::Http(f) => Frame {
            msg: ToNew::HttpConnection {
                listener: f.listener.to_string(),
                peer: f.peer,
                age_ms: f.age.as_millis() as u64,
            },
            data: f.pending,
            fds: vec![f.client],
        },
        Frozen::Udp(f) => Frame {
            msg: ToNew::UdpSession {
                listener: f.listener.to_string(),
                backend: f.backend.to_string(),
                client: f.client,
                replies_left: f.replies_left,
            },
            data: Vec::new(),
            fds: vec![f.toward],
        },
    }
}

fn connection_frame(f: FrozenTcp) -> Frame<ToNew> {
    let mut data = f.c2b.bytes;
    let c2b_len = data.len();
    data.extend_from_slice(&f.b2c.bytes);
    Frame {
        msg: ToNew::Connection {
            listener: f.listener.to_string(),
            backend: f.backend.to_string(),
            c2b_len,
            c2b_done: f.c2b.done,
            b2c_done: f.b2c.done,
            age_ms: f.age.as_millis() as u64,
            keepalive_pending: f.keepalive_pending,
        },
        data,
        fds: vec![f.client, f.upstream],
    }
}

/// The handover socket this process inherited, if it was started by a
/// live upgrade. Checked to come from the parent process.
pub fn inherited() -> Result<Option<UnixStream>, String> {
    let Some(v) = std::env::var_os(FD_ENV) else {
        return Ok(None);
    };
    let fd: i32 = v
        .to_str()
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| format!("{FD_ENV}: not a descriptor number"))?;
    // SAFETY: the parent passed this descriptor for us alone, and nothing
    // else in this process has taken it (it is read once, at start-up).
    let sock = unsafe { <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) };
    rustix::io::fcntl_setfd(&sock, rustix::io::FdFlags::CLOEXEC)
        .map_err(|e| format!("{FD_ENV}={fd}: {e}"))?;
    let peer = rustix::net::sockopt::socket_peercred(&sock)
        .map_err(|e| format!("{FD_ENV}={fd}: not a Unix socket: {e}"))?;
    let parent = rustix::process::getppid().map(|p| p.as_raw_nonzero().get());
    if Some(peer.pid.as_raw_nonzero().get()) != parent {
        return Err(format!(
            "{FD_ENV}={fd}: the socket's peer (pid {}) is not the parent process",
            peer.pid.as_raw_nonzero()
        ));
    }
    Ok(Some(UnixStream::from(sock)))
}

/// The new process's side, from its hello to serving everything.
pub struct TakeOver {
    link: Link<ToOld, ToNew>,
    /// Per udp listener taken over, where its sessions go once all came.
    udp: HashMap<String, tokio::sync::oneshot::Sender<Vec<FrozenUdp>>>,
}

impl TakeOver {
    /// Say hello (the config is loaded and valid).
    pub fn hello(sock: UnixStream) -> Result<TakeOver, String> {
        let link = Link::new(sock).map_err(|e| format!("handover socket: {e}"))?;
        let pid = std::process::id();
        link.tx
            .send(Frame::new(ToOld::Hello { pid }))
            .map_err(|_| "handover socket closed".to_string())?;
        Ok(TakeOver {
            link,
            udp: HashMap::new(),
        })
    }

    async fn next(&mut self) -> Result<Frame<ToNew>, String> {
        match self.link.rx.recv().await {
            Some(Ok(frame)) => Ok(frame),
            Some(Err(e)) => Err(format!("handover socket: {e}")),
            None => Err("the old process closed the handover socket".into()),
        }
    }

    /// Backend states and listening sockets, up to `ListenersDone`.
    pub async fn listeners(
        &mut self,
        server: &Server,
    ) -> Result<HashMap<std::sync::Arc<str>, Bound>, String> {
        let mut sockets = HashMap::new();
        loop {
            let mut frame = self.next().await?;
            match frame.msg {
                ToNew::Backends(seeds) => server.registry().seed(seeds),
                ToNew::Listener { name } => {
                    let fd = frame.fds.pop().ok_or("a listener without its socket")?;
                    let mode = server_mode_of(&fd);
                    let sessions = (mode == crate::config::Mode::Udp).then(|| {
                        let (tx, rx) = tokio::sync::oneshot::channel();
                        self.udp.insert(name.clone(), tx);
                        rx
                    });
                    let bound = Bound::inherited(mode, fd, sessions)
                        .map_err(|e| format!("listener {name}: {e}"))?;
                    sockets.insert(name.into(), bound);
                }
                ToNew::ListenersDone => return Ok(sockets),
                other => return Err(format!("unexpected message: {other:?}")),
            }
        }
    }

    /// Connections, counters and the admin socket, up to `Done`; then
    /// adopt the connections and answer. Returns the admin socket if one
    /// came.
    pub async fn rest(&mut self, server: &Server) -> Result<Option<OwnedFd>, String> {
        let mut connections = Vec::new();
        let mut udp: HashMap<String, Vec<FrozenUdp>> = HashMap::new();
        let mut http = Vec::new();
        let mut admin = None;
        loop {
            let frame = self.next().await?;
            match frame.msg {
                ToNew::Connection {
                    listener,
                    backend,
                    c2b_len,
                    c2b_done,
                    b2c_done,
                    age_ms,
                    keepalive_pending,
                } => {
                    let mut fds = frame.fds.into_iter();
                    let (Some(client), Some(upstream)) = (fds.next(), fds.next()) else {
                        return Err("a connection without its sockets".into());
                    };
                    let mut c2b = frame.data;
                    if c2b_len > c2b.len() {
                        return Err("a connection's bytes are short".into());
                    }
                    let b2c = c2b.split_off(c2b_len);
                    connections.push(FrozenTcp {
                        listener: listener.into(),
                        backend: backend.into(),
                        client,
                        upstream,
                        c2b: Pending {
                            bytes: c2b,
                            done: c2b_done,
                        },
                        b2c: Pending {
                            bytes: b2c,
                            done: b2c_done,
                        },
                        age: Duration::from_millis(age_ms),
                        keepalive_pending,
                    });
                }
                ToNew::UdpSession {
                    listener,
                    backend,
                    client,
                    replies_left,
                } => {
                    let toward = frame
                        .fds
                        .into_iter()
                        .next()
                        .ok_or("a udp session without its socket")?;
                    udp.entry(listener.clone()).or_default().push(FrozenUdp {
                        listener: listener.into(),
                        backend: backend.into(),
                        client,
                        toward,
                        replies_left,
                    });
                }
                ToNew::HttpConnection {
                    listener,
                    peer,
                    age_ms,
                } => {
                    let client = frame
                        .fds
                        .into_iter()
                        .next()
                        .ok_or("an http connection without its socket")?;
                    http.push(FrozenHttp {
                        listener: listener.into(),
                        client,
                        peer,
                        pending: frame.data,
                        age: Duration::from_millis(age_ms),
                    });
                }
                ToNew::Metrics(series) => {
                    let keep = carried_here(server);
                    server.metrics().carry(series, keep);
                }
                ToNew::Admin => {
                    let mut fds = frame.fds;
                    let fd = fds.pop().ok_or("the admin endpoint without its socket")?;
                    admin = Some(fd);
                }
                ToNew::Done => break,
                other => return Err(format!("unexpected message: {other:?}")),
            }
        }
        let mut count = 0;
        let mut lost = 0;
        for c in connections {
            let (listener, backend) = (c.listener.clone(), c.backend.clone());
            if server.adopt(c) {
                count += 1;
            } else {
                // The config on disk no longer has its listener or backend.
                warn!(%listener, %backend, "a handed-over connection has no place here; closed");
                lost += 1;
            }
        }
        for c in http {
            let listener = c.listener.clone();
            if server.adopt_http(c) {
                count += 1;
            } else {
                warn!(%listener, "a handed-over http connection has no listener here; closed");
                lost += 1;
            }
        }
        let mut sessions = 0;
        for (listener, taker) in self.udp.drain() {
            let these = udp.remove(&listener).unwrap_or_default();
            let n = these.len();
            match taker.send(these) {
                Ok(()) => sessions += n,
                // The config on disk moved or dropped the listener.
                Err(lost_here) => lost += lost_here.len(),
            }
        }
        lost += udp.values().map(Vec::len).sum::<usize>();
        server.metrics().record_upgrade(true);
        info!(
            connections = count,
            udp_sessions = sessions,
            lost,
            "live upgrade: connections adopted"
        );
        self.link
            .tx
            .send(Frame::new(ToOld::Adopted {
                connections: count + sessions,
            }))
            .map_err(|_| "handover socket closed".to_string())?;
        Ok(admin)
    }

    /// Wait until the old process has told systemd about this one. From
    /// then on, what the old process's remaining (TLS) connections count
    /// is added here when they have ended.
    pub async fn main_pid_sent(mut self, server: &Server) {
        match self.next().await {
            Ok(Frame {
                msg: ToNew::MainPidSent,
                ..
            }) => {}
            Ok(f) => warn!(msg = ?f.msg, "live upgrade: unexpected message at the end"),
            Err(e) => warn!(error = %e, "live upgrade: the old process left without a word"),
        }
        let (metrics, keep) = (server.metrics().clone(), carried_here(server));
        tokio::spawn(async move {
            while let Ok(frame) = self.next().await {
                if let ToNew::Metrics(series) = frame.msg {
                    metrics.carry(series, &keep);
                }
            }
        });
    }
}

/// A socket's listener mode as far as its type tells: datagram → udp.
fn server_mode_of(fd: &OwnedFd) -> crate::config::Mode {
    match rustix::net::sockopt::socket_type(fd) {
        Ok(rustix::net::SocketType::DGRAM) => crate::config::Mode::Udp,
        _ => crate::config::Mode::Tcp,
    }
}

/// Which carried series the new process keeps: those of its listeners and
/// backends (the config on disk may have dropped some), and the global ones.
fn carried_here(server: &Server) -> impl Fn(&[(String, String)]) -> bool + use<> {
    let config = server.config();
    let mut known: hashbrown::HashSet<(String, Option<String>)> = hashbrown::HashSet::new();
    for l in &config.listeners {
        known.insert((l.name.to_string(), None));
    }
    for (l, b) in server.backend_names() {
        known.insert((l.to_string(), Some(b.to_string())));
    }
    move |labels: &[(String, String)]| {
        let get = |k: &str| labels.iter().find(|(n, _)| n == k).map(|(_, v)| v.clone());
        match (get("listener"), get("backend")) {
            (None, _) => true,
            (Some(l), None) => known.contains(&(l, None)),
            // HTTP requests no backend answered have backend "".
            (Some(l), Some(b)) if b.is_empty() => known.contains(&(l, None)),
            (Some(l), Some(b)) => known.contains(&(l, Some(b))),
        }
    }
}
