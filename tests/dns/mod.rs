//! A real DNS server for the discovery tests: dnsmasq, started by the test
//! itself on 127.0.0.1 at a free port, in a temporary directory of its own,
//! answering for names under `test.` from a hosts file the test rewrites
//! (`Dnsmasq::set`), plus SRV records given at start. Stopped when the
//! handle is dropped (also when the test panics).
//!
//! Also a small DNS client (one UDP query, built and parsed by hand) so the
//! harness can see what the server answers before a test relies on it.
//!
//! Needs the Debian package `dnsmasq-base` (`/usr/sbin/dnsmasq`, no system
//! service); `scripts/test.sh` installs it. A missing binary is a test
//! failure, never a skip.

#![allow(dead_code)] // each test binary uses its own subset

use std::collections::{BTreeMap, BTreeSet};
use std::io::{BufRead, BufReader};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener, UdpSocket};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

pub const DNSMASQ: &str = "/usr/sbin/dnsmasq";
const INSTALL_HINT: &str = "run `bash scripts/test.sh`, which installs dnsmasq-base";

/// How long dnsmasq may take to come up, or to show a rewritten hosts file.
/// Generous: CI machines are small and shared.
pub const WAIT: Duration = Duration::from_secs(20);

/// How long one query waits for its answer.
const QUERY_TIMEOUT: Duration = Duration::from_millis(500);

pub const A: u16 = 1;
pub const AAAA: u16 = 28;
pub const SRV: u16 = 33;

pub const NOERROR: u8 = 0;
pub const SERVFAIL: u8 = 2;
pub const NXDOMAIN: u8 = 3;
pub const REFUSED: u8 = 5;

/// One resource record of an answer section.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub enum Record {
    /// An A or AAAA record.
    Addr(IpAddr),
    Srv {
        priority: u16,
        weight: u16,
        port: u16,
        target: String,
    },
    /// Anything else (a CNAME, ...): its type.
    Other(u16),
}

/// A DNS response: its RCODE and answer section.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Answer {
    pub rcode: u8,
    pub records: Vec<Record>,
    /// The TTL of each answer record, in order.
    pub ttls: Vec<u32>,
}

impl Answer {
    pub fn addresses(&self) -> BTreeSet<IpAddr> {
        self.records
            .iter()
            .filter_map(|r| match r {
                Record::Addr(ip) => Some(*ip),
                _ => None,
            })
            .collect()
    }
}

static QUERY_ID: AtomicU32 = AtomicU32::new(0);

/// A query message for `name` (recursion desired) and its id, unique
/// within this process.
fn query_message(name: &str, qtype: u16) -> (u16, Vec<u8>) {
    let id = (std::process::id() as u16)
        .wrapping_mul(31)
        .wrapping_add(QUERY_ID.fetch_add(1, Ordering::Relaxed) as u16);
    let mut q = Vec::with_capacity(64);
    q.extend_from_slice(&id.to_be_bytes());
    q.extend_from_slice(&0x0100u16.to_be_bytes()); // RD
    q.extend_from_slice(&[0, 1, 0, 0, 0, 0, 0, 0]); // QDCOUNT 1
    for label in name.trim_end_matches('.').split('.') {
        assert!(!label.is_empty() && label.len() < 64, "bad name {name:?}");
        q.push(label.len() as u8);
        q.extend_from_slice(label.as_bytes());
    }
    q.push(0);
    q.extend_from_slice(&qtype.to_be_bytes());
    q.extend_from_slice(&1u16.to_be_bytes()); // IN
    (id, q)
}

/// One query over UDP, from a socket of its own (a new source port each
/// time); `None` when no answer came within `timeout` (or the port is
/// closed: the kernel then reports the ICMP error at once).
pub fn query(server: SocketAddr, name: &str, qtype: u16, timeout: Duration) -> Option<Answer> {
    let (id, q) = query_message(name, qtype);
    let bind: SocketAddr = if server.is_ipv4() {
        "127.0.0.1:0".parse().unwrap()
    } else {
        "[::1]:0".parse().unwrap()
    };
    let socket = UdpSocket::bind(bind).unwrap();
    socket.connect(server).unwrap();
    socket.send(&q).ok()?;
    let start = Instant::now();
    let mut buf = [0u8; 4096];
    loop {
        let left = timeout.checked_sub(start.elapsed())?;
        socket
            .set_read_timeout(Some(left.max(Duration::from_millis(1))))
            .unwrap();
        let n = socket.recv(&mut buf).ok()?;
        if let Some(answer) = parse(&buf[..n], id) {
            return Some(answer);
        }
        // A stray or mangled datagram: keep waiting for ours.
    }
}

/// One query over TCP (RFC 1035 4.2.2: each message after its two-byte
/// length), on a connection of its own; `None` when the connection or the
/// answer did not come within `timeout`, or the answer is not ours.
pub fn query_tcp(server: SocketAddr, name: &str, qtype: u16, timeout: Duration) -> Option<Answer> {
    use std::io::{Read, Write};
    let (id, q) = query_message(name, qtype);
    let mut stream = std::net::TcpStream::connect_timeout(&server, timeout).ok()?;
    stream.set_read_timeout(Some(timeout)).unwrap();
    stream.set_write_timeout(Some(timeout)).unwrap();
    let mut framed = (q.len() as u16).to_be_bytes().to_vec();
    framed.extend_from_slice(&q);
    stream.write_all(&framed).ok()?;
    let mut len = [0u8; 2];
    stream.read_exact(&mut len).ok()?;
    let mut msg = vec![0u8; u16::from_be_bytes(len) as usize];
    stream.read_exact(&mut msg).ok()?;
    parse(&msg, id)
}

/// A response to query `id`, or `None` if `msg` is not one.
fn parse(msg: &[u8], id: u16) -> Option<Answer> {
    let u16_at =
        |i: usize| -> Option<u16> { Some(u16::from_be_bytes([*msg.get(i)?, *msg.get(i + 1)?])) };
    if u16_at(0)? != id || msg[2] & 0x80 == 0 {
        return None;
    }
    let rcode = msg[3] & 0x0f;
    let (qd, an) = (u16_at(4)?, u16_at(6)?);
    let mut at = 12;
    for _ in 0..qd {
        at = read_name(msg, at)?.1 + 4;
    }
    let (mut records, mut ttls) = (Vec::new(), Vec::new());
    for _ in 0..an {
        at = read_name(msg, at)?.1;
        let rtype = u16_at(at)?;
        let ttl = u32::from_be_bytes(msg.get(at + 4..at + 8)?.try_into().ok()?);
        let len = u16_at(at + 8)? as usize;
        let data = at + 10;
        let rdata = msg.get(data..data + len)?;
        records.push(match (rtype, len) {
            (A, 4) => Record::Addr(IpAddr::V4(Ipv4Addr::from(<[u8; 4]>::try_from(rdata).ok()?))),
            (AAAA, 16) => Record::Addr(IpAddr::V6(Ipv6Addr::from(
                <[u8; 16]>::try_from(rdata).ok()?,
            ))),
            (SRV, 7..) => Record::Srv {
                priority: u16_at(data)?,
                weight: u16_at(data + 2)?,
                port: u16_at(data + 4)?,
                target: read_name(msg, data + 6)?.0,
            },
            (other, _) => Record::Other(other),
        });
        ttls.push(ttl);
        at = data + len;
    }
    Some(Answer {
        rcode,
        records,
        ttls,
    })
}

/// The (possibly compressed) name at `at`: its text, and where the field
/// after it starts.
fn read_name(msg: &[u8], mut at: usize) -> Option<(String, usize)> {
    let mut labels = Vec::new();
    let mut end = None;
    for _ in 0..128 {
        let len = *msg.get(at)? as usize;
        match len {
            0 => {
                return Some((labels.join("."), end.unwrap_or(at + 1)));
            }
            0xc0.. => {
                let ptr = (len & 0x3f) << 8 | *msg.get(at + 1)? as usize;
                end.get_or_insert(at + 2);
                at = ptr;
            }
            1..=63 => {
                let label = msg.get(at + 1..at + 1 + len)?;
                labels.push(String::from_utf8_lossy(label).into_owned());
                at += 1 + len;
            }
            _ => return None,
        }
    }
    None // a pointer loop
}

/// What `server` answers for `name`: A and AAAA together. `None` when
/// either query got no answer or the server failed (an RCODE other than
/// NOERROR and NXDOMAIN).
pub fn addresses(server: SocketAddr, name: &str) -> Option<BTreeSet<IpAddr>> {
    let mut all = BTreeSet::new();
    for qtype in [A, AAAA] {
        let answer = query(server, name, qtype, QUERY_TIMEOUT)?;
        if ![NOERROR, NXDOMAIN].contains(&answer.rcode) {
            return None;
        }
        all.extend(answer.addresses());
    }
    Some(all)
}

/// A free port on 127.0.0.1 for both UDP and TCP (dnsmasq listens on
/// both), bound, read and released.
fn free_port() -> u16 {
    loop {
        let udp = UdpSocket::bind("127.0.0.1:0").unwrap();
        let port = udp.local_addr().unwrap().port();
        if TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
}

/// Our effective uid (the owner of /proc/self).
fn euid() -> u32 {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata("/proc/self").unwrap().uid()
}

/// The account name of our uid, from /etc/passwd.
fn user_name() -> Option<String> {
    let uid = euid().to_string();
    let passwd = std::fs::read_to_string("/etc/passwd").ok()?;
    passwd.lines().find_map(|l| {
        let f: Vec<&str> = l.split(':').collect();
        (f.len() > 2 && f[2] == uid).then(|| f[0].to_owned())
    })
}

static INSTANCE: AtomicU32 = AtomicU32::new(0);

/// A running dnsmasq.
pub struct Dnsmasq {
    /// Where it answers (UDP and TCP).
    pub addr: SocketAddr,
    pid: u32,
    child: Option<Child>,
    dir: tempfile::TempDir,
    /// What it logged (its stderr, read by a thread).
    log: Arc<Log>,
    /// Name → addresses, as the hosts file says.
    hosts: Mutex<BTreeMap<String, Vec<IpAddr>>>,
    /// A name only this instance knows (with `SENTINEL_IP`): an answer for
    /// it proves the answer came from this process, not from another one
    /// that took the same port.
    sentinel: String,
}

const SENTINEL_IP: IpAddr = IpAddr::V4(Ipv4Addr::new(192, 0, 2, 53));

impl Dnsmasq {
    /// dnsmasq answering from its hosts file only (empty to begin with).
    pub fn start() -> Dnsmasq {
        Self::start_with(&[])
    }

    /// Same, with these SRV records: values for `--srv-host=`, e.g.
    /// `_svc._tcp.svc.test,t1.test,5000,0,10` (name, target, port,
    /// priority, weight).
    pub fn start_with(srv: &[&str]) -> Dnsmasq {
        assert!(
            Path::new(DNSMASQ).is_file(),
            "{DNSMASQ} missing; {INSTALL_HINT}"
        );
        let dir = tempfile::tempdir().unwrap();
        // Readable by whatever account dnsmasq ends up as when it rereads
        // the hosts file after a SIGHUP.
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        let sentinel = format!(
            "harness-{}-{}.test",
            std::process::id(),
            INSTANCE.fetch_add(1, Ordering::Relaxed)
        );
        let mut dns = Dnsmasq {
            addr: "127.0.0.1:0".parse().unwrap(),
            pid: 0,
            child: None,
            dir,
            log: Arc::default(),
            hosts: Mutex::new(BTreeMap::new()),
            sentinel,
        };
        dns.write_hosts(&BTreeMap::new());
        for _attempt in 0..20 {
            let port = free_port();
            let mut cmd = Command::new(DNSMASQ);
            cmd.args([
                "--keep-in-foreground",
                "--conf-file=/dev/null",
                &format!("--port={port}"),
                "--listen-address=127.0.0.1",
                "--bind-interfaces",
                "--no-resolv",
                "--no-hosts",
                &format!("--addn-hosts={}", dns.hosts_path().display()),
                // Unknown names under test. get NXDOMAIN, never forwarded.
                "--local=/test/",
                "--pid-file=",
                "--log-facility=-",
                "--log-queries",
            ]);
            if let Some(user) = user_name() {
                // As root, dnsmasq would otherwise drop to `nobody`.
                cmd.arg(format!("--user={user}"));
            }
            for s in srv {
                cmd.arg(format!("--srv-host={s}"));
            }
            let mut child = cmd
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap_or_else(|e| panic!("cannot run {DNSMASQ}: {e}; {INSTALL_HINT}"));
            dns.log = Log::follow(child.stderr.take().unwrap());
            dns.pid = child.id();
            dns.child = Some(child);
            dns.addr = SocketAddr::from(([127, 0, 0, 1], port));
            if dns.wait_ready() {
                return dns;
            }
            // The port was taken between our probe and its bind: again.
            dns.child = None;
        }
        panic!("dnsmasq found no free port\n{}", dns.log());
    }

    /// Wait until this process has read its hosts file and answers for its
    /// sentinel name: true. False when it exited because its port was in
    /// use.
    fn wait_ready(&mut self) -> bool {
        let read = self.hosts_read_line();
        let (log, ended) = self
            .log
            .wait_for(|log, ended| ended || log.contains(&read), WAIT);
        if ended {
            let _ = self.child.as_mut().unwrap().wait();
            if log.contains("Address already in use") {
                return false;
            }
            panic!("dnsmasq exited at start\n{log}");
        }
        if !log.contains(&read) {
            self.stop();
            panic!("dnsmasq did not read its hosts file within {WAIT:?}\n{log}");
        }
        let answer = query(self.addr, &self.sentinel, A, QUERY_TIMEOUT);
        assert!(
            answer
                .as_ref()
                .is_some_and(|a| a.records == [Record::Addr(SENTINEL_IP)]),
            "dnsmasq on {} does not answer for its sentinel: {answer:?}\n{log}",
            self.addr
        );
        true
    }

    /// What dnsmasq logs each time it has (re)read the hosts file.
    fn hosts_read_line(&self) -> String {
        format!("read {} - ", self.hosts_path().display())
    }

    /// `"127.0.0.1:PORT"`, for `dns_servers`.
    pub fn server(&self) -> String {
        self.addr.to_string()
    }

    pub fn pid(&self) -> u32 {
        self.pid
    }

    fn hosts_path(&self) -> PathBuf {
        self.dir.path().join("hosts")
    }

    /// What dnsmasq logged so far (for failure messages).
    pub fn log(&self) -> String {
        self.log.text()
    }

    fn write_hosts(&self, hosts: &BTreeMap<String, Vec<IpAddr>>) {
        let mut text = format!("{SENTINEL_IP} {}\n", self.sentinel);
        for (name, ips) in hosts {
            for ip in ips {
                text += &format!("{ip} {name}\n");
            }
        }
        // A new file renamed over: dnsmasq never reads half a file.
        let tmp = self.dir.path().join("hosts.tmp");
        std::fs::write(&tmp, text).unwrap();
        std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o644)).unwrap();
        std::fs::rename(&tmp, self.hosts_path()).unwrap();
    }

    /// Make `name` resolve to exactly `ips` (none: NXDOMAIN), every other
    /// name kept as it was: rewrite the hosts file, SIGHUP dnsmasq, and wait
    /// until a query for `name` returns exactly the new set.
    pub fn set(&self, name: &str, ips: &[IpAddr]) {
        let mut hosts = self.hosts.lock().unwrap();
        if ips.is_empty() {
            hosts.remove(name);
        } else {
            hosts.insert(name.to_owned(), ips.to_vec());
        }
        self.write_hosts(&hosts);
        // dnsmasq clears its cache, rereads the file, then logs that it
        // did: one more such line means the new names are served.
        let read = self.hosts_read_line();
        let reads = self.log().matches(&read).count();
        self.signal("HUP");
        let (log, _) = self.log.wait_for(
            |log, ended| ended || log.matches(&read).count() > reads,
            WAIT,
        );
        assert!(
            log.matches(&read).count() > reads,
            "dnsmasq did not reread its hosts file within {WAIT:?}\n{log}"
        );
        let want: BTreeSet<IpAddr> = ips.iter().copied().collect();
        let got = addresses(self.addr, name);
        assert_eq!(
            got.as_ref(),
            Some(&want),
            "dnsmasq answers {got:?} for {name} after rereading its hosts file\n{log}"
        );
    }

    /// How many queries of type `qtype` ("A", "AAAA", "SRV") for `name`
    /// it has logged so far (over UDP and TCP, from anyone).
    pub fn queries_logged(&self, name: &str, qtype: &str) -> usize {
        self.log()
            .matches(&format!("query[{qtype}] {name} from "))
            .count()
    }

    /// What it answers for `name` now (A and AAAA).
    pub fn addresses(&self, name: &str) -> Option<BTreeSet<IpAddr>> {
        addresses(self.addr, name)
    }

    /// One query of any type.
    pub fn query(&self, name: &str, qtype: u16) -> Option<Answer> {
        query(self.addr, name, qtype, QUERY_TIMEOUT)
    }

    fn signal(&self, sig: &str) {
        assert!(self.child.is_some(), "dnsmasq is stopped");
        let ok = Command::new("kill")
            .args([&format!("-{sig}"), &self.pid.to_string()])
            .status()
            .unwrap()
            .success();
        assert!(ok, "kill -{sig} {} failed", self.pid);
    }

    /// Kill it and reap it: from now on its port answers nothing.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    pub fn running(&self) -> bool {
        self.child.is_some()
    }
}

impl Drop for Dnsmasq {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A child's log lines as they come, for waiting on one with a deadline.
#[derive(Default)]
struct Log {
    /// (text so far, the stream ended).
    state: Mutex<(String, bool)>,
    grew: Condvar,
}

impl Log {
    /// Read `stream` on a thread of its own until it ends.
    fn follow(stream: impl std::io::Read + Send + 'static) -> Arc<Log> {
        let log = Arc::new(Log::default());
        let writer = log.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stream).lines() {
                let Ok(line) = line else { break };
                let mut state = writer.state.lock().unwrap();
                state.0 += &line;
                state.0.push('\n');
                writer.grew.notify_all();
            }
            writer.state.lock().unwrap().1 = true;
            writer.grew.notify_all();
        });
        log
    }

    fn text(&self) -> String {
        self.state.lock().unwrap().0.clone()
    }

    /// Wait until `done(text, ended)` holds or `within` has passed; the
    /// text and whether the stream ended, either way.
    fn wait_for(&self, done: impl Fn(&str, bool) -> bool, within: Duration) -> (String, bool) {
        let state = self.state.lock().unwrap();
        let (state, _) = self
            .grew
            .wait_timeout_while(state, within, |(text, ended)| !done(text, *ended))
            .unwrap();
        (state.0.clone(), state.1)
    }
}
