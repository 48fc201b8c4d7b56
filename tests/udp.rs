//! UDP listeners (`mode = "udp"`) end to end, on the real daemon: sessions
//! keyed by client address and how they are scheduled, kept and ended;
//! datagrams forwarded whole; what is dropped and counted; health checks,
//! admin state, ICMP errors, reload and stop; the metrics and status API;
//! and real DNS servers (dnsmasq) behind a listener.
//!
//! Every test talks to its listener from client sockets that are not
//! connected, so each reply's source address is checked: it must be the
//! listener's own address.

mod common;
mod dns;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::mem::MaybeUninit;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use common::*;
use serde_json::Value as Json;
use tokio::net::{TcpListener, UdpSocket};
use tokio::task::{JoinHandle, block_in_place};

const ADMIN: &str = "[admin]\nbind = \"127.0.0.1:0\"\n";

/// The largest UDP payload over IPv4 (65 535 - 20 - 8).
const MAX_DATAGRAM: usize = 65_507;

// ---------------------------------------------------------------------
// Test backends and clients
// ---------------------------------------------------------------------

/// A datagram a backend received: its source and payload.
type Seen = (SocketAddr, Vec<u8>);

/// What a [`UdpEcho`] answers to a datagram.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Reply {
    /// `"<name>:" + payload`.
    Named,
    /// The payload reversed, same length (for sizes up to the maximum).
    Reversed,
}

/// A UDP backend on 127.0.0.1 that answers every datagram at once (one
/// reply per datagram, to its source) and records what it saw.
struct UdpEcho {
    name: String,
    addr: SocketAddr,
    /// Every datagram received, in order, with its source address.
    seen: Arc<Mutex<Vec<Seen>>>,
    task: JoinHandle<()>,
    /// A TCP listener on the same port (for `kind = "tcp"` probes).
    tcp: Mutex<Option<JoinHandle<()>>>,
}

impl UdpEcho {
    async fn start(name: &str) -> UdpEcho {
        Self::start_with(name, Reply::Named, false).await
    }

    /// Same, also listening on TCP on the same port: a `kind = "tcp"`
    /// probe passes until [`UdpEcho::stop_tcp`].
    async fn with_tcp(name: &str) -> UdpEcho {
        Self::start_with(name, Reply::Named, true).await
    }

    async fn start_with(name: &str, reply: Reply, tcp: bool) -> UdpEcho {
        let (socket, listener) = bind_backend(tcp);
        let addr = socket.local_addr().unwrap();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let (log, me) = (seen.clone(), name.to_owned());
        let task = tokio::spawn(async move {
            let mut buf = vec![0u8; 65_536];
            loop {
                let Ok((n, peer)) = socket.recv_from(&mut buf).await else {
                    continue;
                };
                let payload = &buf[..n];
                // Recorded before the reply leaves: whoever has the reply
                // sees the datagram counted.
                log.lock().unwrap().push((peer, payload.to_vec()));
                let answer = match reply {
                    Reply::Named => [me.as_bytes(), b":", payload].concat(),
                    Reply::Reversed => payload.iter().rev().copied().collect(),
                };
                let _ = socket.send_to(&answer, peer).await;
            }
        });
        let tcp = listener.map(|l| {
            tokio::spawn(async move {
                while let Ok((s, _)) = l.accept().await {
                    drop(s);
                }
            })
        });
        UdpEcho {
            name: name.to_owned(),
            addr,
            seen,
            task,
            tcp: Mutex::new(tcp),
        }
    }

    /// Datagrams received so far.
    fn datagrams(&self) -> usize {
        self.seen.lock().unwrap().len()
    }

    /// Datagrams received so far, by source address (one per session
    /// socket of the proxy).
    fn peers(&self) -> HashMap<SocketAddr, usize> {
        let mut peers = HashMap::new();
        for (peer, _) in self.seen.lock().unwrap().iter() {
            *peers.entry(*peer).or_default() += 1;
        }
        peers
    }

    /// The payloads received so far, in order.
    fn payloads(&self) -> Vec<Vec<u8>> {
        self.seen
            .lock()
            .unwrap()
            .iter()
            .map(|(_, p)| p.clone())
            .collect()
    }

    /// Stop listening on TCP: probes are refused from now on.
    fn stop_tcp(&self) {
        if let Some(task) = self.tcp.lock().unwrap().take() {
            task.abort();
        }
    }
}

impl Drop for UdpEcho {
    fn drop(&mut self) {
        self.task.abort();
        self.stop_tcp();
    }
}

/// A UDP socket on 127.0.0.1 with a large receive buffer (so that bursts
/// from the proxy are never dropped by our own backend), and with `tcp` a
/// TCP listener on the same port.
fn bind_backend(tcp: bool) -> (UdpSocket, Option<TcpListener>) {
    use socket2::{Domain, Socket, Type};
    for _ in 0..100 {
        let socket = Socket::new(Domain::IPV4, Type::DGRAM, None).unwrap();
        // Capped by net.core.rmem_max; whatever we get is more than the
        // default.
        let _ = socket.set_recv_buffer_size(4 << 20);
        socket
            .bind(&SocketAddr::from(([127, 0, 0, 1], 0)).into())
            .unwrap();
        socket.set_nonblocking(true).unwrap();
        let socket = UdpSocket::from_std(socket.into()).unwrap();
        if !tcp {
            return (socket, None);
        }
        let port = socket.local_addr().unwrap().port();
        if let Ok(l) = std::net::TcpListener::bind(("127.0.0.1", port)) {
            l.set_nonblocking(true).unwrap();
            return (socket, Some(TcpListener::from_std(l).unwrap()));
        }
    }
    panic!("no port free for both UDP and TCP");
}

/// A client: one UDP socket of its own (one source address, so one
/// session), not connected, so the source of every reply is checked.
struct Client {
    socket: UdpSocket,
    proxy: SocketAddr,
}

impl Client {
    async fn new(proxy: SocketAddr) -> Client {
        Self::from_ip(proxy, IpAddr::V4(Ipv4Addr::LOCALHOST)).await
    }

    /// From a chosen loopback source address (127.0.0.2, …).
    async fn from_ip(proxy: SocketAddr, ip: IpAddr) -> Client {
        let socket = UdpSocket::bind(SocketAddr::new(ip, 0)).await.unwrap();
        Client { socket, proxy }
    }

    fn addr(&self) -> SocketAddr {
        self.socket.local_addr().unwrap()
    }

    async fn send(&self, payload: &[u8]) {
        let sent = self.socket.send_to(payload, self.proxy).await.unwrap();
        assert_eq!(sent, payload.len(), "datagram truncated on send");
    }

    /// The next datagram that arrives, asserting it comes from the
    /// listener's address.
    async fn recv(&self) -> Vec<u8> {
        let mut buf = vec![0u8; 65_536];
        let (n, from) = within(
            &format!("a reply to {}", self.addr()),
            self.socket.recv_from(&mut buf),
        )
        .await
        .unwrap();
        assert_eq!(
            from,
            self.proxy,
            "a reply to {} came from {from}, not from the listener",
            self.addr()
        );
        buf.truncate(n);
        buf
    }

    /// Send `payload` to a [`Reply::Named`] backend and return the name of
    /// the backend that answered (checking it echoed the payload).
    async fn ask(&self, payload: &str) -> String {
        self.send(payload.as_bytes()).await;
        let reply = String::from_utf8(self.recv().await).expect("a text reply");
        let (who, echoed) = reply
            .split_once(':')
            .unwrap_or_else(|| panic!("not a named reply: {reply:?}"));
        assert_eq!(echoed, payload, "the reply echoes another datagram");
        who.to_owned()
    }

    /// Whether no datagram is waiting on the socket right now (a plain
    /// non-blocking receive, not the runtime's cached readiness).
    fn nothing_waiting(&self) -> bool {
        let mut buf = [MaybeUninit::<u8>::uninit(); 64];
        match socket2::SockRef::from(&self.socket).recv_from(&mut buf) {
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => true,
            Err(e) => panic!("receive on {}: {e}", self.addr()),
            Ok(_) => false,
        }
    }
}

/// Deterministic pseudo-random bytes (xorshift64*), seeded per call site.
fn random_bytes(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        out.extend_from_slice(&x.wrapping_mul(0x2545_f491_4f6c_dd1d).to_le_bytes());
    }
    out.truncate(len);
    out
}

fn seed() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64
}

// ---------------------------------------------------------------------
// The daemon, its config, status and metrics
// ---------------------------------------------------------------------

/// Config text: the admin endpoint, and one udp listener "l" on
/// 127.0.0.1:0 with the lines `settings` (plain keys first, then any
/// sub-table such as `[listener.health_check]`), over `backends`.
fn udp_config(settings: &str, backends: &[(&str, SocketAddr)]) -> String {
    let mut s = format!(
        "{ADMIN}[[listener]]\nname = \"l\"\nbind = \"127.0.0.1:0\"\nmode = \"udp\"\n{settings}\n"
    );
    for (name, addr) in backends {
        s += &format!("[[listener.backend]]\nname = \"{name}\"\naddress = \"{addr}\"\n");
    }
    s
}

/// Start the daemon (blocking until it is ready) on a multi-threaded
/// runtime, so the test's backends keep running meanwhile.
fn start(toml: &str) -> (Daemon, SocketAddr, SocketAddr) {
    let d = block_in_place(|| Daemon::start(toml));
    let proxy = d.addr("l");
    let admin = d.admin.expect("admin address logged");
    assert_eq!(proxy.ip(), IpAddr::V4(Ipv4Addr::LOCALHOST));
    assert_ne!(proxy.port(), 0, "the listening line names the bound port");
    (d, proxy, admin)
}

async fn status(admin: SocketAddr) -> Json {
    let (code, body) = http(admin, "GET", "/api/v1/status", &[], "").await;
    assert_eq!(code, 200, "{body}");
    serde_json::from_str(&body).unwrap()
}

fn listener<'a>(status: &'a Json, name: &str) -> &'a Json {
    status["listeners"]
        .as_array()
        .unwrap()
        .iter()
        .find(|l| l["name"] == name)
        .unwrap_or_else(|| panic!("no listener {name} in {status}"))
}

fn backend<'a>(status: &'a Json, name: &str) -> Option<&'a Json> {
    listener(status, "l")["backends"]
        .as_array()
        .unwrap()
        .iter()
        .find(|b| b["name"] == name)
}

fn num(v: &Json, key: &str) -> u64 {
    v[key]
        .as_u64()
        .unwrap_or_else(|| panic!("no number {key} in {v}"))
}

/// Listener "l"'s sessions as the status API shows them: open sessions,
/// and per backend (open, so far).
#[derive(Debug, Clone, PartialEq, Eq)]
struct Sessions {
    open: u64,
    backends: BTreeMap<String, (u64, u64)>,
}

async fn sessions(admin: SocketAddr) -> Sessions {
    let s = status(admin).await;
    let l = listener(&s, "l");
    let backends: BTreeMap<String, (u64, u64)> = l["backends"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| {
            (
                b["name"].as_str().unwrap().to_owned(),
                (num(b, "active_connections"), num(b, "connections_total")),
            )
        })
        .collect();
    let open = num(l, "open_client_connections");
    // Every open session is on a backend.
    let on_backends: u64 = backends.values().map(|(active, _)| active).sum();
    assert_eq!(
        num(l, "active_connections"),
        on_backends,
        "listener total vs backends in {l}"
    );
    Sessions { open, backends }
}

/// Wait until listener "l" has `open` open sessions and each named backend
/// (open, so far) sessions; backends not named are not looked at.
async fn wait_sessions(admin: SocketAddr, open: u64, want: &[(&str, u64, u64)]) {
    eventually(
        &format!("{open} open sessions and {want:?}"),
        || async move {
            let now = sessions(admin).await;
            let matches = now.open == open
                && want
                    .iter()
                    .all(|(b, a, t)| now.backends.get(*b) == Some(&(*a, *t)));
            if matches {
                Ok(())
            } else {
                Err(format!("{now:?}"))
            }
        },
    )
    .await;
}

/// One expected sample: metric name, labels, value.
type Want<'a> = (&'a str, Vec<(&'a str, &'a str)>, f64);

/// Wait until every sample in `want` has exactly its value (a missing
/// sample counts as 0).
async fn wait_metrics(admin: SocketAddr, want: &[Want<'_>]) {
    eventually("metrics", || async move {
        let s = scrape(admin).await;
        let wrong: Vec<String> = want
            .iter()
            .filter_map(|(name, labels, v)| {
                let got = sample_value(&s, name, labels).unwrap_or(0.0);
                (got != *v).then(|| format!("{name}{labels:?} = {got}, want {v}"))
            })
            .collect();
        if wrong.is_empty() {
            Ok(())
        } else {
            Err(wrong.join("; "))
        }
    })
    .await;
}

async fn metric(admin: SocketAddr, name: &str, labels: &[(&str, &str)]) -> f64 {
    sample_value(&scrape(admin).await, name, labels).unwrap_or(0.0)
}

const REJECTED: &str = "switchyard_rejected_connections_total";
const CONNECT_ERRORS: &str = "switchyard_backend_connect_errors_total";
const DATAGRAMS: &str = "switchyard_udp_datagrams_total";
const BYTES: &str = "switchyard_bytes_total";
const C2B: &str = "client_to_backend";
const B2C: &str = "backend_to_client";

async fn set_admin_state(admin: SocketAddr, backend: &str, state: &str) {
    let path = format!("/api/v1/listeners/l/backends/{backend}/state");
    let (code, body) = http(admin, "PUT", &path, &[], state).await;
    assert_eq!(code, 200, "{body}");
}

// ---------------------------------------------------------------------
// Scheduling and session affinity
// ---------------------------------------------------------------------

/// Round robin over sessions, each session's datagrams on its backend, one
/// proxy socket per session, and exact per-backend counts in the metrics
/// and status API.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sessions_take_turns_and_keep_their_backend() {
    let (a, b) = (UdpEcho::start("a").await, UdpEcho::start("b").await);
    let (_d, proxy, admin) = start(&udp_config(
        "algorithm = \"roundrobin\"\nidle_timeout = \"60s\"",
        &[("a", a.addr), ("b", b.addr)],
    ));

    let mut clients = Vec::new();
    for _ in 0..6 {
        clients.push(Client::new(proxy).await);
    }
    // Payload bytes sent per backend.
    let mut bytes: HashMap<String, usize> = HashMap::new();
    let mut first = Vec::new();
    for (i, c) in clients.iter().enumerate() {
        let payload = format!("client {i} datagram 0");
        let who = c.ask(&payload).await;
        *bytes.entry(who.clone()).or_default() += payload.len();
        first.push(who);
    }
    assert_eq!(first, ["a", "b", "a", "b", "a", "b"]);

    // Four more datagrams per client, interleaved across clients: each
    // session stays where it started.
    for round in 1..5 {
        for (i, c) in clients.iter().enumerate() {
            let payload = format!("client {i} datagram {round}{}", "x".repeat(i));
            let who = c.ask(&payload).await;
            assert_eq!(who, first[i], "client {i}'s session moved");
            *bytes.entry(who).or_default() += payload.len();
        }
    }

    // One proxy socket per session: each backend saw three sources, five
    // datagrams from each.
    for backend in [&a, &b] {
        let peers = backend.peers();
        assert_eq!(peers.len(), 3, "{}: {peers:?}", backend.name);
        assert!(
            peers.values().all(|&n| n == 5),
            "{}: {peers:?}",
            backend.name
        );
        for peer in peers.keys() {
            assert_eq!(peer.ip(), IpAddr::V4(Ipv4Addr::LOCALHOST));
            assert_ne!(*peer, proxy, "forwarded from the listener's own socket");
        }
    }

    wait_sessions(admin, 6, &[("a", 3, 3), ("b", 3, 3)]).await;
    let s = status(admin).await;
    let l = listener(&s, "l");
    assert_eq!(l["mode"], "udp");
    assert_eq!(l["local_addr"], proxy.to_string());
    for name in ["a", "b"] {
        let be = backend(&s, name).unwrap();
        // No [listener.health_check]: kind "none" on udp, always up.
        assert_eq!(be["check_kind"], "none", "{be}");
        assert_eq!(be["health"], "up", "{be}");
        assert_eq!(num(be, "connect_errors_total"), 0);
    }

    // Datagrams and payload bytes, exactly; replies are "<name>:" longer.
    let mut want: Vec<Want> = Vec::new();
    for name in ["a", "b"] {
        let sent = bytes[name] as f64;
        let lb = |more: &[(&'static str, &'static str)]| {
            let mut v = vec![("listener", "l"), ("backend", name)];
            v.extend_from_slice(more);
            v
        };
        want.push(("switchyard_connections_total", lb(&[]), 3.0));
        want.push(("switchyard_active_connections", lb(&[]), 3.0));
        want.push((DATAGRAMS, lb(&[("direction", C2B)]), 15.0));
        want.push((DATAGRAMS, lb(&[("direction", B2C)]), 15.0));
        want.push((BYTES, lb(&[("direction", C2B)]), sent));
        want.push((BYTES, lb(&[("direction", B2C)]), sent + 15.0 * 2.0));
    }
    wait_metrics(admin, &want).await;
    let s = status(admin).await;
    for name in ["a", "b"] {
        let be = backend(&s, name).unwrap();
        assert_eq!(num(be, "bytes_client_to_backend"), bytes[name] as u64);
        assert_eq!(
            num(be, "bytes_backend_to_client"),
            bytes[name] as u64 + 30,
            "{be}"
        );
    }
}

/// `udp_replies = 1`: every query is a session of its own, even from one
/// client socket, so round robin alternates across its own queries.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_reply_per_session_reschedules_every_query() {
    let (a, b) = (UdpEcho::start("a").await, UdpEcho::start("b").await);
    let (_d, proxy, admin) = start(&udp_config(
        "algorithm = \"roundrobin\"\nudp_replies = 1\nidle_timeout = \"60s\"",
        &[("a", a.addr), ("b", b.addr)],
    ));
    let client = Client::new(proxy).await;
    let mut order = Vec::new();
    for i in 0..6u64 {
        order.push(client.ask(&format!("query {i}")).await);
        let done = i / 2 + 1;
        // Sessions so far grow by one per query; each ends at its reply.
        let (ta, tb) = (done, if i % 2 == 1 { done } else { done - 1 });
        wait_sessions(admin, 0, &[("a", 0, ta), ("b", 0, tb)]).await;
    }
    assert_eq!(order, ["a", "b", "a", "b", "a", "b"]);
    assert_eq!((a.datagrams(), b.datagrams()), (3, 3));
    wait_metrics(
        admin,
        &[
            ("switchyard_active_connections", vec![("backend", "a")], 0.0),
            ("switchyard_active_connections", vec![("backend", "b")], 0.0),
            ("switchyard_connections_total", vec![("backend", "a")], 3.0),
            ("switchyard_connections_total", vec![("backend", "b")], 3.0),
        ],
    )
    .await;
}

/// `udp_replies = 2`: a session ends after its second reply, not before.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_ends_after_its_reply_count() {
    let (a, b) = (UdpEcho::start("a").await, UdpEcho::start("b").await);
    let (_d, proxy, admin) = start(&udp_config(
        "algorithm = \"roundrobin\"\nudp_replies = 2\nidle_timeout = \"60s\"",
        &[("a", a.addr), ("b", b.addr)],
    ));
    let client = Client::new(proxy).await;
    let mut order = Vec::new();
    for i in 0..6 {
        order.push(client.ask(&format!("query {i}")).await);
        if i % 2 == 0 {
            // One reply so far: the session is still open.
            let s = sessions(admin).await;
            assert_eq!(s.open, 1, "after query {i}: {s:?}");
        } else {
            let n = (i / 2 + 1) as u64;
            wait_sessions(admin, 0, &[("a", 0, n.div_ceil(2)), ("b", 0, n / 2)]).await;
        }
    }
    assert_eq!(order, ["a", "a", "b", "b", "a", "a"]);
    // Each session used one proxy socket for both of its datagrams.
    assert!(a.peers().values().all(|&n| n == 2), "{:?}", a.peers());
    assert!(b.peers().values().all(|&n| n == 2), "{:?}", b.peers());
}

/// An idle session ends after `idle_timeout`; the client's next datagram
/// opens a new session, scheduled afresh.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_session_ends_and_the_next_datagram_opens_another() {
    let (a, b) = (UdpEcho::start("a").await, UdpEcho::start("b").await);
    let (_d, proxy, admin) = start(&udp_config(
        "algorithm = \"roundrobin\"\nidle_timeout = \"1s\"",
        &[("a", a.addr), ("b", b.addr)],
    ));
    let client = Client::new(proxy).await;
    assert_eq!(client.ask("first").await, "a");
    // Ends by itself once idle.
    wait_sessions(admin, 0, &[("a", 0, 1), ("b", 0, 0)]).await;
    wait_metrics(
        admin,
        &[("switchyard_active_connections", vec![("backend", "a")], 0.0)],
    )
    .await;
    // Same client socket, new session: round robin's next backend.
    assert_eq!(client.ask("second").await, "b");
    let s = sessions(admin).await;
    assert_eq!(s.backends["a"].1 + s.backends["b"].1, 2, "{s:?}");
    assert_eq!(s.backends["b"].1, 1, "{s:?}");
    wait_sessions(admin, 0, &[("a", 0, 1), ("b", 0, 1)]).await;
}

/// `algorithm = "source"`: every session from one client IP goes to the
/// same backend, whatever its port; different IPs spread.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn source_hash_keeps_an_ip_on_one_backend_across_sessions() {
    let (a, b) = (UdpEcho::start("a").await, UdpEcho::start("b").await);
    let (_d, proxy, _admin) = start(&udp_config(
        "algorithm = \"source\"\nudp_replies = 1",
        &[("a", a.addr), ("b", b.addr)],
    ));
    let mut seen = HashSet::new();
    for i in 2..22u8 {
        let ip = IpAddr::from([127, 0, 0, i]);
        let mut first = None;
        // Three sessions from three ports of this IP.
        for q in 0..3 {
            let who = Client::from_ip(proxy, ip).await.ask(&format!("q{q}")).await;
            assert_eq!(*first.get_or_insert(who.clone()), who, "{ip} moved");
        }
        seen.insert(first.unwrap());
    }
    assert_eq!(seen.len(), 2, "20 client IPs all landed on {seen:?}");
    assert_eq!(a.datagrams() + b.datagrams(), 60);
}

/// `algorithm = "leastconn"` counts open sessions.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leastconn_goes_to_the_backend_with_fewest_open_sessions() {
    let echoes = [
        UdpEcho::start("a").await,
        UdpEcho::start("b").await,
        UdpEcho::start("c").await,
    ];
    let (_d, proxy, admin) = start(&udp_config(
        // A session ends at its second reply: the test ends sessions by
        // asking again.
        "algorithm = \"leastconn\"\nudp_replies = 2\nidle_timeout = \"60s\"",
        &[
            ("a", echoes[0].addr),
            ("b", echoes[1].addr),
            ("c", echoes[2].addr),
        ],
    ));
    let mut held = Vec::new();
    for i in 0..6 {
        let c = Client::new(proxy).await;
        let who = c.ask(&format!("open {i}")).await;
        held.push((c, who));
    }
    let on = |held: &[(Client, String)], n: &str| held.iter().filter(|(_, w)| w == n).count();
    assert_eq!((on(&held, "a"), on(&held, "b"), on(&held, "c")), (2, 2, 2));

    // End both of a's sessions: a is now the least loaded, and takes the
    // next two.
    for (c, who) in held.iter().filter(|(_, w)| w == "a") {
        assert_eq!(&c.ask("close").await, who);
    }
    held.retain(|(_, w)| w != "a");
    wait_sessions(admin, 4, &[("a", 0, 2)]).await;
    for i in 0..2 {
        let c = Client::new(proxy).await;
        assert_eq!(c.ask(&format!("again {i}")).await, "a");
        held.push((c, "a".into()));
    }
    // 2/2/2 again: the next three go one to each.
    let mut next = Vec::new();
    for i in 0..3 {
        let c = Client::new(proxy).await;
        next.push(c.ask(&format!("more {i}")).await);
        held.push((c, next.last().unwrap().clone()));
    }
    next.sort();
    assert_eq!(next, ["a", "b", "c"]);
    wait_sessions(admin, 9, &[("a", 3, 5), ("b", 3, 3), ("c", 3, 3)]).await;
}

// ---------------------------------------------------------------------
// Datagrams
// ---------------------------------------------------------------------

/// Each datagram is forwarded whole, one for one, from 0 bytes up to the
/// largest IPv4 UDP payload, both ways; bytes are counted exactly.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn datagrams_of_every_size_arrive_whole() {
    let echo = UdpEcho::start_with("r", Reply::Reversed, false).await;
    let (_d, proxy, admin) = start(&udp_config("idle_timeout = \"60s\"", &[("r", echo.addr)]));
    let client = Client::new(proxy).await;
    let seed = seed();
    let mut total = 0usize;
    let mut count = 0usize;
    for (k, size) in [60_000, 1, 0, MAX_DATAGRAM, 60_000].into_iter().enumerate() {
        let payload = random_bytes(size, seed.wrapping_add(k as u64));
        client.send(&payload).await;
        let reply = client.recv().await;
        let got = echo.payloads().pop().unwrap();
        assert!(
            got == payload,
            "backend got {} bytes, not the {size} sent",
            got.len()
        );
        let want: Vec<u8> = payload.iter().rev().copied().collect();
        assert!(
            reply == want,
            "client got {} bytes, not the {size} sent back",
            reply.len()
        );
        total += size;
        count += 1;
    }

    // Sent back to back, never merged: three datagrams, three datagrams.
    let burst: Vec<Vec<u8>> = [100, 2000, 30_000]
        .iter()
        .enumerate()
        .map(|(k, &n)| random_bytes(n, seed.wrapping_add(100 + k as u64)))
        .collect();
    for p in &burst {
        client.send(p).await;
    }
    let mut replies = Vec::new();
    for _ in &burst {
        replies.push(client.recv().await);
    }
    let mut want: Vec<Vec<u8>> = burst
        .iter()
        .map(|p| p.iter().rev().copied().collect())
        .collect();
    want.sort();
    replies.sort();
    assert!(replies == want, "replies to the burst differ");
    let mut arrived = echo.payloads().split_off(count);
    arrived.sort();
    let mut sent = burst.clone();
    sent.sort();
    assert!(
        arrived == sent,
        "the burst arrived as {} datagrams, changed",
        arrived.len()
    );
    total += burst.iter().map(Vec::len).sum::<usize>();
    count += burst.len();

    // All on one session, one proxy socket.
    assert_eq!(echo.peers().len(), 1);
    let lb = |dir| vec![("listener", "l"), ("backend", "r"), ("direction", dir)];
    wait_metrics(
        admin,
        &[
            (DATAGRAMS, lb(C2B), count as f64),
            (DATAGRAMS, lb(B2C), count as f64),
            (BYTES, lb(C2B), total as f64),
            (BYTES, lb(B2C), total as f64),
            (
                "switchyard_connections_total",
                vec![("listener", "l"), ("backend", "r")],
                1.0,
            ),
        ],
    )
    .await;
}

/// 10 000 datagrams from 50 clients, in bounded bursts: every one is
/// answered exactly once, and the 50 clients are 50 sessions.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_thousand_datagrams_are_each_answered_once() {
    const CLIENTS: usize = 50;
    const EACH: usize = 200;
    /// Outstanding datagrams per client.
    const WINDOW: usize = 16;
    /// Outstanding datagrams in all. A socket's default receive buffer
    /// (rmem_default) holds about 256 small datagrams; staying well below
    /// means no datagram can be dropped for want of buffer space at the
    /// listener, so a missing reply is the proxy's doing.
    const IN_FLIGHT: usize = 128;

    let (a, b) = (UdpEcho::start("a").await, UdpEcho::start("b").await);
    let (_d, proxy, admin) = start(&udp_config(
        "algorithm = \"roundrobin\"\nidle_timeout = \"60s\"",
        &[("a", a.addr), ("b", b.addr)],
    ));
    let permits = Arc::new(tokio::sync::Semaphore::new(IN_FLIGHT));
    let answered = Arc::new(AtomicUsize::new(0));
    let mut tasks = tokio::task::JoinSet::new();
    for id in 0..CLIENTS {
        let (permits, answered) = (permits.clone(), answered.clone());
        tasks.spawn(async move {
            let client = Client::new(proxy).await;
            let mut got = vec![0u32; EACH];
            let mut backends = HashSet::new();
            let (mut sent, mut received) = (0usize, 0usize);
            let mut buf = vec![0u8; 2048];
            while received < EACH {
                // Fill the window, as far as the global bound lets us. A
                // client with replies to read never waits for a permit:
                // reading them is what gives permits back.
                while sent < EACH && sent - received < WINDOW {
                    let permit = if sent == received {
                        permits.acquire().await.ok()
                    } else {
                        match permits.try_acquire() {
                            Err(tokio::sync::TryAcquireError::NoPermits) => break,
                            other => other.ok(),
                        }
                    };
                    let Some(permit) = permit else {
                        return Err(format!("client {id}: stopped (another client failed)"));
                    };
                    permit.forget();
                    client.send(format!("{id}:{sent}").as_bytes()).await;
                    sent += 1;
                }
                let Ok(r) = tokio::time::timeout(DEADLINE, client.socket.recv_from(&mut buf)).await
                else {
                    let missing: Vec<usize> = (0..sent).filter(|&s| got[s] == 0).collect();
                    return Err(format!(
                        "client {id}: no reply for {DEADLINE:?}; {received} received, \
                         missing {missing:?}"
                    ));
                };
                let (n, from) = r.unwrap();
                if from != proxy {
                    return Err(format!("client {id}: a reply from {from}"));
                }
                permits.add_permits(1);
                let text = String::from_utf8_lossy(&buf[..n]).into_owned();
                let mut parts = text.split(':');
                let (who, cid, seq) = (parts.next(), parts.next(), parts.next());
                let seq: usize = seq.and_then(|s| s.parse().ok()).unwrap_or(usize::MAX);
                if cid != Some(id.to_string().as_str()) || seq >= sent {
                    return Err(format!("client {id}: stray reply {text:?}"));
                }
                got[seq] += 1;
                if got[seq] > 1 {
                    return Err(format!("client {id}: datagram {seq} answered twice"));
                }
                backends.insert(who.unwrap().to_owned());
                received += 1;
                answered.fetch_add(1, Ordering::Relaxed);
            }
            Ok(backends)
        });
    }
    let mut on = HashMap::new();
    // Each client gives up by itself after DEADLINE without a reply; the
    // first to fail stops the others.
    while let Some(done) = tasks.join_next().await {
        let backends = match done.unwrap() {
            Ok(b) => b,
            Err(e) => {
                permits.close();
                let mut others = Vec::new();
                while let Some(r) = tasks.join_next().await {
                    if let Ok(Err(e)) = r {
                        others.push(e);
                    }
                }
                others.retain(|e| !e.contains("stopped"));
                panic!(
                    "{e}; {} replies in all; {} other clients failed: {others:?}",
                    answered.load(Ordering::Relaxed),
                    others.len()
                );
            }
        };
        // Every datagram of a client went the way of its session.
        assert_eq!(
            backends.len(),
            1,
            "a client's datagrams split: {backends:?}"
        );
        *on.entry(backends.into_iter().next().unwrap()).or_insert(0) += 1;
    }
    assert_eq!(answered.load(Ordering::Relaxed), CLIENTS * EACH);
    assert_eq!(
        on,
        HashMap::from([("a".to_owned(), 25), ("b".to_owned(), 25)])
    );
    assert_eq!((a.datagrams(), b.datagrams()), (5000, 5000));
    assert_eq!((a.peers().len(), b.peers().len()), (25, 25));
    wait_sessions(admin, 50, &[("a", 25, 25), ("b", 25, 25)]).await;
    let d = |backend, dir| vec![("listener", "l"), ("backend", backend), ("direction", dir)];
    wait_metrics(
        admin,
        &[
            (DATAGRAMS, d("a", C2B), 5000.0),
            (DATAGRAMS, d("a", B2C), 5000.0),
            (DATAGRAMS, d("b", C2B), 5000.0),
            (DATAGRAMS, d("b", B2C), 5000.0),
        ],
    )
    .await;
}

// ---------------------------------------------------------------------
// Backends going away
// ---------------------------------------------------------------------

/// `kind = "tcp"` probes the backend's port over TCP; a backend marked
/// down ends its sessions and the client moves on its next datagram.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backend_marked_down_ends_its_sessions() {
    let (a, b) = (UdpEcho::with_tcp("a").await, UdpEcho::with_tcp("b").await);
    let (_d, proxy, admin) = start(&udp_config(
        "algorithm = \"roundrobin\"\nidle_timeout = \"60s\"\n\
         [listener.health_check]\nkind = \"tcp\"\ninterval = \"200ms\"\ntimeout = \"200ms\"\n\
         fall = 1\nrise = 1",
        &[("a", a.addr), ("b", b.addr)],
    ));
    let health = |s: &Json, name: &str| backend(s, name).unwrap()["health"].clone();
    eventually("both backends up", || async move {
        let s = status(admin).await;
        if health(&s, "a") == "up" && health(&s, "b") == "up" {
            Ok(())
        } else {
            Err(s.to_string())
        }
    })
    .await;
    let s = status(admin).await;
    assert_eq!(backend(&s, "a").unwrap()["check_kind"], "tcp");

    let client = Client::new(proxy).await;
    assert_eq!(client.ask("before").await, "a");
    assert_eq!(client.ask("still").await, "a");
    wait_sessions(admin, 1, &[("a", 1, 1)]).await;

    a.stop_tcp();
    eventually("a marked down", || async move {
        let s = status(admin).await;
        if health(&s, "a") == "down" {
            Ok(())
        } else {
            Err(backend(&s, "a").unwrap().to_string())
        }
    })
    .await;
    wait_sessions(admin, 0, &[("a", 0, 1), ("b", 0, 0)]).await;
    assert_eq!(client.ask("after").await, "b");
    wait_sessions(admin, 1, &[("a", 0, 1), ("b", 1, 1)]).await;
    assert_eq!(a.datagrams(), 2);
}

/// A backend put in `maint` through the admin API ends its sessions.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn maint_ends_a_backends_sessions() {
    let (a, b) = (UdpEcho::start("a").await, UdpEcho::start("b").await);
    let (_d, proxy, admin) = start(&udp_config(
        "algorithm = \"roundrobin\"\nidle_timeout = \"60s\"",
        &[("a", a.addr), ("b", b.addr)],
    ));
    let client = Client::new(proxy).await;
    assert_eq!(client.ask("before").await, "a");
    wait_sessions(admin, 1, &[("a", 1, 1)]).await;

    set_admin_state(admin, "a", "maint").await;
    wait_sessions(admin, 0, &[("a", 0, 1), ("b", 0, 0)]).await;
    for i in 0..3 {
        assert_eq!(client.ask(&format!("after {i}")).await, "b");
    }
    wait_sessions(admin, 1, &[("a", 0, 1), ("b", 1, 1)]).await;
    assert_eq!(a.datagrams(), 1);
}

/// Nothing listening on a backend's UDP port: the ICMP port unreachable is
/// a connect error, the session ends without a reply, and that client's
/// next session goes elsewhere.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn port_unreachable_is_a_connect_error_and_the_client_moves() {
    let live = UdpEcho::start("live").await;
    let dead = {
        let s = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        s.local_addr().unwrap()
    };
    // Weighted 10:1 and first in the file: the first session goes to
    // "dead", and so would the next one from plain scheduling.
    let toml = udp_config(
        "algorithm = \"roundrobin\"\nidle_timeout = \"3s\"",
        &[("dead", dead), ("live", live.addr)],
    )
    .replace(
        &format!("name = \"dead\"\naddress = \"{dead}\"\n"),
        &format!("name = \"dead\"\naddress = \"{dead}\"\nweight = 10\n"),
    );
    assert!(toml.contains("weight = 10"));
    let (d, proxy, admin) = start(&toml);

    let client = Client::new(proxy).await;
    client.send(b"lost").await;
    wait_metrics(
        admin,
        &[(
            CONNECT_ERRORS,
            vec![("listener", "l"), ("backend", "dead")],
            1.0,
        )],
    )
    .await;
    wait_sessions(admin, 0, &[("dead", 0, 1), ("live", 0, 0)]).await;
    let s = status(admin).await;
    assert_eq!(num(backend(&s, "dead").unwrap(), "connect_errors_total"), 1);
    assert!(client.nothing_waiting(), "a reply came from a dead backend");

    // The same client, again: not to "dead" this time. Its first reply is
    // to this datagram (nothing of the lost one comes late).
    for i in 0..3 {
        assert_eq!(client.ask(&format!("retry {i}")).await, "live");
    }
    wait_sessions(admin, 1, &[("dead", 0, 1), ("live", 1, 1)]).await;
    assert_eq!(live.datagrams(), 3);
    assert_eq!(
        metric(admin, CONNECT_ERRORS, &[("backend", "live")]).await,
        0.0
    );
    // Quiet now until the live session's idle timeout ends it: an open
    // session waits on its socket's readiness, and the error readiness the
    // ICMP raised is consumed, so the daemon burns next to nothing (a task
    // that kept waking would use all of that time).
    let before = cpu_ticks(d.pid);
    let quiet = tokio::time::Instant::now();
    wait_sessions(admin, 0, &[("dead", 0, 1), ("live", 0, 1)]).await;
    let (used, ticks) = (
        cpu_ticks(d.pid) - before,
        quiet.elapsed().as_millis() as u64 / 10,
    );
    assert!(
        used * 2 < ticks,
        "{used} CPU ticks (1/100 s) in {ticks} ticks of waiting for an idle end"
    );
}

/// User and system CPU time of a process so far, in clock ticks.
fn cpu_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    // Fields after the command name (which is in parentheses).
    let rest = &stat[stat.rfind(')').unwrap() + 2..];
    let fields: Vec<&str> = rest.split(' ').collect();
    // utime and stime are fields 14 and 15 of the whole line.
    fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap()
}

// ---------------------------------------------------------------------
// What is dropped
// ---------------------------------------------------------------------

/// Datagrams from sources outside `allow` are dropped and counted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sources_outside_allow_are_dropped() {
    let a = UdpEcho::start("a").await;
    let (_d, proxy, admin) = start(&udp_config(
        "allow = [\"127.0.0.2/32\"]\nidle_timeout = \"60s\"",
        &[("a", a.addr)],
    ));
    let denied = Client::new(proxy).await;
    for i in 0..3 {
        denied.send(format!("denied {i}").as_bytes()).await;
    }
    wait_metrics(
        admin,
        &[(REJECTED, vec![("listener", "l"), ("reason", "acl")], 3.0)],
    )
    .await;
    let allowed = Client::from_ip(proxy, IpAddr::from([127, 0, 0, 2])).await;
    assert_eq!(allowed.ask("allowed").await, "a");
    assert_eq!(a.payloads(), [b"allowed".to_vec()]);
    assert!(denied.nothing_waiting());
    wait_sessions(admin, 1, &[("a", 1, 1)]).await;
    assert_eq!(metric(admin, REJECTED, &[("reason", "acl")]).await, 3.0);
}

/// At `max_connections` open sessions, datagrams that would open another
/// are dropped and counted; those of open sessions still pass; once a
/// session ends, a new client is served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_connections_caps_open_sessions() {
    let (a, b) = (UdpEcho::start("a").await, UdpEcho::start("b").await);
    let (_d, proxy, admin) = start(&udp_config(
        "algorithm = \"roundrobin\"\nmax_connections = 2\nudp_replies = 2\nidle_timeout = \"60s\"",
        &[("a", a.addr), ("b", b.addr)],
    ));
    let max = |n: f64| {
        vec![(
            REJECTED,
            vec![("listener", "l"), ("reason", "max_connections")],
            n,
        )]
    };
    let (c1, c2, c3) = (
        Client::new(proxy).await,
        Client::new(proxy).await,
        Client::new(proxy).await,
    );
    assert_eq!(c1.ask("c1 first").await, "a");
    assert_eq!(c2.ask("c2 first").await, "b");
    wait_sessions(admin, 2, &[]).await;

    c3.send(b"c3 dropped 1").await;
    c3.send(b"c3 dropped 2").await;
    wait_metrics(admin, &max(2.0)).await;
    assert!(c3.nothing_waiting());
    assert_eq!(a.datagrams() + b.datagrams(), 2);

    // An open session's datagram passes at the cap (and, its second
    // reply, ends it).
    assert_eq!(c2.ask("c2 second").await, "b");
    wait_sessions(admin, 1, &[]).await;
    // Room again: c3 is served, and its first reply answers this datagram.
    c3.ask("c3 served").await;
    wait_sessions(admin, 2, &[]).await;
    // Full again.
    let c4 = Client::new(proxy).await;
    c4.send(b"c4 dropped").await;
    wait_metrics(admin, &max(3.0)).await;
    assert!(c4.nothing_waiting());
    assert_eq!(a.datagrams() + b.datagrams(), 4);
}

/// No usable backend: the datagram is dropped and counted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_usable_backend_drops_the_datagram() {
    let a = UdpEcho::start("a").await;
    let (_d, proxy, admin) = start(&udp_config("idle_timeout = \"60s\"", &[("a", a.addr)]));
    set_admin_state(admin, "a", "maint").await;
    let client = Client::new(proxy).await;
    client.send(b"nobody").await;
    wait_metrics(
        admin,
        &[(
            REJECTED,
            vec![("listener", "l"), ("reason", "no_backend")],
            1.0,
        )],
    )
    .await;
    assert!(client.nothing_waiting());
    wait_sessions(admin, 0, &[("a", 0, 0)]).await;
    set_admin_state(admin, "a", "ready").await;
    assert_eq!(client.ask("somebody").await, "a");
    assert_eq!(a.payloads(), [b"somebody".to_vec()]);
}

// ---------------------------------------------------------------------
// Reload and stop
// ---------------------------------------------------------------------

/// A reload keeps the listener's socket and its sessions; a backend
/// removed by a reload ends its sessions.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reload_keeps_the_socket_and_the_sessions() {
    let (a, b, c) = (
        UdpEcho::start("a").await,
        UdpEcho::start("b").await,
        UdpEcho::start("c").await,
    );
    let settings = "algorithm = \"roundrobin\"\nidle_timeout = \"60s\"";
    let (mut d, proxy, admin) = start(&udp_config(settings, &[("a", a.addr), ("b", b.addr)]));
    let (x1, x2) = (Client::new(proxy).await, Client::new(proxy).await);
    assert_eq!(x1.ask("x1 before").await, "a");
    assert_eq!(x2.ask("x2 before").await, "b");

    // Add a backend.
    d.write_config(&udp_config(
        settings,
        &[("a", a.addr), ("b", b.addr), ("c", c.addr)],
    ));
    assert!(block_in_place(|| d.reload()), "reload failed: {:?}", d.raw);
    assert_eq!(d.addr("l"), proxy);
    let s = status(admin).await;
    assert_eq!(listener(&s, "l")["local_addr"], proxy.to_string());
    assert!(backend(&s, "c").is_some());
    for i in 0..3 {
        assert_eq!(x1.ask(&format!("x1 after {i}")).await, "a");
        assert_eq!(x2.ask(&format!("x2 after {i}")).await, "b");
    }
    assert_eq!(
        a.peers().len(),
        1,
        "x1's session changed sockets: {:?}",
        a.peers()
    );
    assert_eq!(
        b.peers().len(),
        1,
        "x2's session changed sockets: {:?}",
        b.peers()
    );
    wait_sessions(admin, 2, &[("a", 1, 1), ("b", 1, 1), ("c", 0, 0)]).await;
    // New sessions take turns over all three.
    let mut news = Vec::new();
    let mut held = Vec::new();
    for i in 0..3 {
        let n = Client::new(proxy).await;
        news.push(n.ask(&format!("new {i}")).await);
        held.push(n);
    }
    news.sort();
    assert_eq!(news, ["a", "b", "c"]);

    // Remove a: x1's session (and the new one on a) end.
    d.write_config(&udp_config(settings, &[("b", b.addr), ("c", c.addr)]));
    assert!(block_in_place(|| d.reload()), "reload failed: {:?}", d.raw);
    eventually("a gone from the status", || async move {
        let s = status(admin).await;
        match backend(&s, "a") {
            None => Ok(()),
            Some(be) => Err(be.to_string()),
        }
    })
    .await;
    wait_sessions(admin, 3, &[]).await;
    let seen_by_a = a.datagrams();
    let moved = x1.ask("x1 moved").await;
    assert!(moved == "b" || moved == "c", "x1 went to {moved}");
    assert_eq!(a.datagrams(), seen_by_a);
    assert_eq!(x2.ask("x2 kept").await, "b");
    assert_eq!(d.addr("l"), proxy);
}

/// SIGTERM stops the daemon with a session open: exit code 0.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_exits_0_with_a_session_open() {
    let a = UdpEcho::start("a").await;
    let (mut d, proxy, admin) = start(&format!(
        "[global]\nshutdown_timeout = \"5s\"\n{}",
        udp_config("idle_timeout = \"1h\"", &[("a", a.addr)])
    ));
    let client = Client::new(proxy).await;
    assert_eq!(client.ask("hello").await, "a");
    wait_sessions(admin, 1, &[("a", 1, 1)]).await;
    d.signal("TERM");
    assert_eq!(block_in_place(|| d.wait_exit()), 0, "{:?}", d.raw);
}

// ---------------------------------------------------------------------
// Config
// ---------------------------------------------------------------------

/// `switchyard check` on `text`: (exit code, stdout, stderr).
fn check(text: &str) -> (i32, String, String, std::path::PathBuf, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("udp.toml");
    std::fs::write(&path, text).unwrap();
    let out = std::process::Command::new(binary())
        .args(["check", "--config"])
        .arg(&path)
        .output()
        .unwrap();
    (
        out.status.code().expect("exited by signal"),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
        path,
        dir,
    )
}

/// Fields a udp listener does not take are errors whatever their value,
/// naming file, line, column and field; so are `udp_replies` elsewhere
/// and `udp_replies = 0`.
#[test]
fn fields_that_do_not_apply_to_udp_are_config_errors() {
    // (mode, listener lines, backend lines, the field's path, the line
    // that holds it)
    let cases: &[(&str, &str, &str, &str, &str)] = &[
        (
            "udp",
            "sticky = { method = \"lbcookie\" }",
            "",
            "listener[0].sticky",
            "sticky =",
        ),
        (
            "udp",
            "proxy_protocol = \"off\"",
            "",
            "listener[0].proxy_protocol",
            "proxy_protocol",
        ),
        (
            "udp",
            "proxy_protocol = \"v2\"",
            "",
            "listener[0].proxy_protocol",
            "proxy_protocol",
        ),
        ("udp", "retries = 0", "", "listener[0].retries", "retries"),
        ("udp", "retries = 2", "", "listener[0].retries", "retries"),
        (
            "udp",
            "queue_timeout = \"1s\"",
            "",
            "listener[0].queue_timeout",
            "queue_timeout",
        ),
        (
            "udp",
            "",
            "max_connections = 5",
            "listener[0].backend[0].max_connections",
            "max_connections",
        ),
        (
            "udp",
            "[listener.health_check]\nkind = \"postgres\"\nuser = \"probe\"",
            "",
            "listener[0].health_check.kind",
            "kind =",
        ),
        (
            "udp",
            "[listener.health_check]\nkind = \"http\"",
            "",
            "listener[0].health_check.kind",
            "kind =",
        ),
        (
            "udp",
            "[listener.health_check]\nkind = \"mysql\"",
            "",
            "listener[0].health_check.kind",
            "kind =",
        ),
        (
            "udp",
            "[listener.health_check]\nkind = \"redis\"",
            "",
            "listener[0].health_check.kind",
            "kind =",
        ),
        (
            "udp",
            "udp_replies = 0",
            "",
            "listener[0].udp_replies",
            "udp_replies",
        ),
        (
            "tcp",
            "udp_replies = 1",
            "",
            "listener[0].udp_replies",
            "udp_replies",
        ),
        (
            "http",
            "udp_replies = 1",
            "",
            "listener[0].udp_replies",
            "udp_replies",
        ),
    ];
    for (mode, listener_lines, backend_lines, field, needle) in cases {
        let text = format!(
            "[[listener]]\nname = \"l\"\nbind = \"127.0.0.1:0\"\nmode = \"{mode}\"\n\
             {listener_lines}\n[[listener.backend]]\nname = \"a\"\naddress = \"127.0.0.1:5353\"\n\
             {backend_lines}\n"
        );
        let line = 1 + text
            .lines()
            .position(|l| l.starts_with(needle))
            .unwrap_or_else(|| panic!("{needle} not in {text}"));
        let (code, _, stderr, path, _dir) = check(&text);
        assert_eq!(
            code, 1,
            "{mode} / {listener_lines} {backend_lines}: {stderr}"
        );
        let prefix = format!("{}:{line}:", path.display());
        let at = stderr
            .find(&prefix)
            .unwrap_or_else(|| panic!("{field}: no `{prefix}` in: {stderr}"));
        let rest = &stderr[at + prefix.len()..];
        let (col, rest) = rest.split_once(": ").unwrap_or_else(|| panic!("{stderr}"));
        assert!(
            col.parse::<u32>().is_ok_and(|c| c >= 1),
            "no column in: {stderr}"
        );
        assert!(
            rest.starts_with(&format!("{field}:")),
            "want `{field}: …` after file:line:col in: {stderr}"
        );
    }

    // What a udp listener does take is fine.
    let (code, stdout, stderr, _, _dir) = check(
        "[[listener]]\nname = \"dns\"\nbind = \"127.0.0.1:0\"\nmode = \"udp\"\n\
         algorithm = \"source\"\nidle_timeout = \"5s\"\nudp_replies = 1\n\
         allow = [\"127.0.0.0/8\"]\nmax_connections = 100\n\
         [listener.health_check]\nkind = \"tcp\"\ninterval = \"2s\"\n\
         [[listener.backend]]\nname = \"a\"\naddress = \"127.0.0.1:5353\"\nweight = 2\n\
         [[listener]]\nname = \"dns2\"\nbind = \"127.0.0.1:0\"\nmode = \"udp\"\n\
         algorithm = \"leastconn\"\n[listener.health_check]\nkind = \"none\"\n\
         [[listener.backend]]\nname = \"a\"\naddress = \"127.0.0.1:5353\"\n",
    );
    assert_eq!(code, 0, "{stderr}");
    assert!(stdout.contains("configuration is valid"), "{stdout}");
}

/// A udp and a tcp listener on the same address and port both start and
/// both serve (DNS on 53/udp and 53/tcp).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn udp_and_tcp_listeners_share_a_port() {
    let u = UdpEcho::start("u").await;
    let t = NamedBackend::start("t").await;
    let port = free_udp_tcp_port();
    let toml = format!(
        "{ADMIN}[[listener]]\nname = \"u\"\nbind = \"127.0.0.1:{port}\"\nmode = \"udp\"\n\
         [[listener.backend]]\nname = \"u\"\naddress = \"{}\"\n\
         [[listener]]\nname = \"t\"\nbind = \"127.0.0.1:{port}\"\nmode = \"tcp\"\n\
         [[listener.backend]]\nname = \"t\"\naddress = \"{}\"\n",
        u.addr, t.addr
    );
    let d = block_in_place(|| Daemon::start(&toml));
    let shared = SocketAddr::from(([127, 0, 0, 1], port));
    assert_eq!(d.addr("u"), shared);
    assert_eq!(d.addr("t"), shared);
    assert_eq!(Client::new(shared).await.ask("over udp").await, "u");
    assert_eq!(connect_named(shared).await.backend, "t");
}

// ---------------------------------------------------------------------
// Real DNS servers behind a listener
// ---------------------------------------------------------------------

/// Two dnsmasq instances behind one udp listener (`udp_replies = 1`), and
/// a tcp listener on the same port in front of the same servers: every
/// answer is right, and queries from distinct client ports split evenly.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dns_servers_behind_udp_and_tcp_on_one_port() {
    const NAME: &str = "svc.test";
    let (ip1, ip2): (IpAddr, IpAddr) = ([192, 0, 2, 1].into(), [192, 0, 2, 2].into());
    let (ns1, ns2) = block_in_place(|| {
        let ns1 = dns::Dnsmasq::start();
        let ns2 = dns::Dnsmasq::start();
        // Each answers the name with its own address: the answer says who
        // answered.
        ns1.set(NAME, &[ip1]);
        ns2.set(NAME, &[ip2]);
        (ns1, ns2)
    });
    let port = free_udp_tcp_port();
    let toml = format!(
        "{ADMIN}[[listener]]\nname = \"l\"\nbind = \"127.0.0.1:{port}\"\nmode = \"udp\"\n\
         algorithm = \"roundrobin\"\nudp_replies = 1\n\
         [[listener.backend]]\nname = \"ns1\"\naddress = \"{}\"\n\
         [[listener.backend]]\nname = \"ns2\"\naddress = \"{}\"\n\
         [[listener]]\nname = \"tcp\"\nbind = \"127.0.0.1:{port}\"\nmode = \"tcp\"\n\
         algorithm = \"roundrobin\"\n\
         [[listener.backend]]\nname = \"ns1\"\naddress = \"{}\"\n\
         [[listener.backend]]\nname = \"ns2\"\naddress = \"{}\"\n",
        ns1.addr, ns2.addr, ns1.addr, ns2.addr
    );
    let (_d, proxy, admin) = start(&toml);
    assert_eq!(proxy.port(), port);
    let logged = |ns: &dns::Dnsmasq| ns.queries_logged(NAME, "A");
    let before = (logged(&ns1), logged(&ns2));

    let mut answers = Vec::new();
    for i in 0..20 {
        // A socket of its own per query: a new client port each time.
        let answer = block_in_place(|| dns::query(proxy, NAME, dns::A, DEADLINE))
            .unwrap_or_else(|| panic!("query {i}: no answer through {proxy}"));
        assert_eq!(answer.rcode, dns::NOERROR, "query {i}: {answer:?}");
        let ips = answer.addresses();
        assert_eq!(ips.len(), 1, "query {i}: {answer:?}");
        let ip = *ips.iter().next().unwrap();
        assert!(ip == ip1 || ip == ip2, "query {i}: answered {ip}");
        answers.push(ip);
    }
    let from = |ip| answers.iter().filter(|&&a| a == ip).count();
    assert_eq!((from(ip1), from(ip2)), (10, 10), "{answers:?}");
    // Taking turns.
    assert!(answers.windows(2).all(|w| w[0] != w[1]), "{answers:?}");
    // The servers' own logs agree.
    eventually("dnsmasq logs", || {
        let got = (logged(&ns1) - before.0, logged(&ns2) - before.1);
        async move {
            if got.0 >= 10 && got.1 >= 10 {
                Ok(())
            } else {
                Err(format!("{got:?}"))
            }
        }
    })
    .await;
    assert_eq!((logged(&ns1) - before.0, logged(&ns2) - before.1), (10, 10));
    wait_sessions(admin, 0, &[("ns1", 0, 10), ("ns2", 0, 10)]).await;

    // DNS over TCP, same port, through the tcp listener (once its probes
    // have found both servers up).
    eventually("the tcp listener's backends up", || async move {
        let s = status(admin).await;
        let up = listener(&s, "tcp")["backends"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|b| b["health"] == "up")
            .count();
        if up == 2 { Ok(()) } else { Err(s.to_string()) }
    })
    .await;
    let mut tcp_answers = Vec::new();
    for i in 0..2 {
        let answer = block_in_place(|| dns::query_tcp(proxy, NAME, dns::A, DEADLINE))
            .unwrap_or_else(|| panic!("tcp query {i}: no answer"));
        assert_eq!(answer.rcode, dns::NOERROR);
        tcp_answers.extend(answer.addresses());
    }
    tcp_answers.sort();
    assert_eq!(tcp_answers, [ip1, ip2]);
}

/// A live upgrade moves every udp session with its socket: after two
/// upgrades each client's datagrams still reach the backend it started on,
/// from the same proxy socket (the backend sees no new source address), no
/// session was opened anew, and a session's reply count goes on where it
/// was.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sessions_move_with_their_sockets_in_a_live_upgrade() {
    become_subreaper();
    let (a, b) = (UdpEcho::start("a").await, UdpEcho::start("b").await);
    let (mut d, proxy, admin) = start(&udp_config(
        "algorithm = \"roundrobin\"\nidle_timeout = \"60s\"\nudp_replies = 3",
        &[("a", a.addr), ("b", b.addr)],
    ));
    let mut clients = Vec::new();
    for _ in 0..6 {
        clients.push(Client::new(proxy).await);
    }
    let mut first = Vec::new();
    for (i, c) in clients.iter().enumerate() {
        first.push(c.ask(&format!("client {i} before")).await);
    }
    assert_eq!(first, ["a", "b", "a", "b", "a", "b"]);
    let peers = (a.peers(), b.peers());
    let opened =
        |s: &Json| ["a", "b"].map(|n| num(backend(s, n).expect("backend"), "connections_total"));
    let sessions_before = opened(&status(admin).await);
    assert_eq!(sessions_before, [3, 3]);
    for round in 0..2 {
        assert_eq!(block_in_place(|| d.upgrade()), 0);
        for (i, c) in clients.iter().enumerate() {
            let who = c.ask(&format!("client {i} after upgrade {round}")).await;
            assert_eq!(
                who, first[i],
                "client {i}'s session moved to another backend"
            );
        }
    }
    assert_eq!(
        (a.peers().len(), b.peers().len()),
        (3, 3),
        "no new proxy socket"
    );
    for (now, then) in [(a.peers(), &peers.0), (b.peers(), &peers.1)] {
        let mut now: Vec<_> = now.keys().copied().collect();
        let mut then: Vec<_> = then.keys().copied().collect();
        now.sort();
        then.sort();
        assert_eq!(now, then, "the sessions' sockets are the same");
    }
    assert_eq!(
        opened(&status(admin).await),
        sessions_before,
        "no session opened anew"
    );
    // Three replies per session (udp_replies = 3): each has had them, so
    // the next datagram opens a new session, from a new socket.
    let next = clients[0].ask("client 0 once more").await;
    assert!(next == "a" || next == "b");
    assert_eq!(opened(&status(admin).await).iter().sum::<u64>(), 7);
}
