//! UDP load generator and echo backend for row 6 of `benches/load/run.sh`
//! (DNS-like request/response through a UDP proxy).
//!
//! ```text
//! udpload echo ADDR
//!     answer every datagram with the same bytes (recvmmsg/sendmmsg, one thread);
//!     prints `bound IP:PORT` once bound (ADDR may have port 0)
//! udpload load ADDR [--sockets N] [--outstanding K] [--size B] [--duration S]
//!                   [--warmup S] [--timeout-ms MS] [--cpu-pid PID]...
//!     keep K datagrams outstanding from N sockets (client source ports), at
//!     most one per socket, for S seconds; print one line of key=value
//! ```
//!
//! `load` sends each datagram from the socket that has been idle longest,
//! so with N > K every source port waits several round trips before it is
//! used again (for a proxy, mostly a new session per datagram, as with DNS
//! clients that pick a fresh port per query). A datagram is `B` bytes: a
//! sequence number, the socket's index and filler. A reply must carry the
//! sequence number the socket is waiting for; one that comes after its
//! datagram was given up (`--timeout-ms`, default 1000) counts as `late`,
//! anything else as `bad`. A datagram unanswered past the timeout counts as
//! `lost` and its slot goes to the next socket.
//!
//! After `--warmup` seconds (not counted) the counters start; `--duration`
//! seconds later the sending stops, the datagrams still out get up to the
//! timeout to come back (those that do not are lost; their replies, if
//! they come, are not counted in `replies`). With `--cpu-pid`, utime+stime
//! of those processes (all their threads) is read from `/proc/PID/stat` at
//! the start and the end of the counted seconds: `cpu_s` is the difference,
//! summed over the PIDs. `wait_s` is the time their threads spent runnable
//! but waiting for a CPU (`/proc/PID/task/*/schedstat`, second field) over
//! the same seconds: with the proxy alone on its CPU, the share of that CPU
//! that other work took from it.
//!
//! Output: `replies sent lost late bad refused send_err seconds rate
//! per_sec_min per_sec_max cpu_s wait_s` (rate = replies / seconds;
//! per_sec_* over whole counted seconds).

use std::collections::VecDeque;
use std::io::{self, ErrorKind};
use std::net::{SocketAddr, UdpSocket};
use std::os::fd::AsRawFd;
use std::process::ExitCode;
use std::time::{Duration, Instant};

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let result = match args.first().map(String::as_str) {
        Some("echo") if args.len() == 2 => echo(&args[1]),
        Some("load") if args.len() >= 2 => Load::parse(&args[1..]).and_then(|l| l.run()),
        _ => Err(io::Error::new(
            ErrorKind::InvalidInput,
            "usage: udpload echo ADDR | udpload load ADDR [--sockets N] [--outstanding K] \
             [--size B] [--duration S] [--warmup S] [--timeout-ms MS] [--cpu-pid PID]...",
        )),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("udpload: {e}");
            ExitCode::FAILURE
        }
    }
}

fn invalid(msg: String) -> io::Error {
    io::Error::new(ErrorKind::InvalidInput, msg)
}

fn addr(s: &str) -> io::Result<SocketAddr> {
    s.parse()
        .map_err(|e| invalid(format!("bad address {s:?}: {e}")))
}

fn check(rc: libc::c_int) -> io::Result<libc::c_int> {
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(rc)
    }
}

// ------------------------------------------------------------------ echo

/// Datagrams read (and answered) per system call at most.
const ECHO_BATCH: usize = 64;
/// Largest datagram echoed whole; longer ones are cut (the bench sends ~80 bytes).
const ECHO_MAX: usize = 2048;

fn echo(bind: &str) -> io::Result<()> {
    let sock = UdpSocket::bind(addr(bind)?)?;
    // With port 0 the kernel picks the port: say which (run.sh reads this line).
    println!("bound {}", sock.local_addr()?);
    let fd = sock.as_raw_fd();
    let mut bufs = vec![[0u8; ECHO_MAX]; ECHO_BATCH];
    // SAFETY: all-zero is a valid sockaddr_storage, iovec and mmsghdr (null pointers, zero lengths).
    let mut names: Vec<libc::sockaddr_storage> = vec![unsafe { std::mem::zeroed() }; ECHO_BATCH];
    let mut iovs: Vec<libc::iovec> = vec![unsafe { std::mem::zeroed() }; ECHO_BATCH];
    let mut msgs: Vec<libc::mmsghdr> = vec![unsafe { std::mem::zeroed() }; ECHO_BATCH];
    for i in 0..ECHO_BATCH {
        iovs[i].iov_base = bufs[i].as_mut_ptr().cast();
    }
    loop {
        for i in 0..ECHO_BATCH {
            iovs[i].iov_len = ECHO_MAX;
            let h = &mut msgs[i].msg_hdr;
            h.msg_name = (&mut names[i] as *mut libc::sockaddr_storage).cast();
            h.msg_namelen = std::mem::size_of::<libc::sockaddr_storage>() as libc::socklen_t;
            h.msg_iov = &mut iovs[i];
            h.msg_iovlen = 1;
            msgs[i].msg_len = 0;
        }
        // SAFETY: msgs points at ECHO_BATCH headers whose buffers live as long as this loop.
        let n = unsafe {
            libc::recvmmsg(
                fd,
                msgs.as_mut_ptr(),
                ECHO_BATCH as libc::c_uint,
                libc::MSG_WAITFORONE,
                std::ptr::null_mut(),
            )
        };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        let n = n as usize;
        // Send back what came, to whom it came from (msg_namelen was set by recvmmsg).
        for i in 0..n {
            iovs[i].iov_len = msgs[i].msg_len as usize;
        }
        let mut done = 0;
        while done < n {
            // SAFETY: as above; headers done..n are filled in.
            let m = unsafe {
                libc::sendmmsg(fd, msgs[done..].as_mut_ptr(), (n - done) as libc::c_uint, 0)
            };
            if m < 0 {
                let e = io::Error::last_os_error();
                if e.kind() == ErrorKind::Interrupted {
                    continue;
                }
                // A reply that cannot go (say, ENOBUFS) is dropped, as a server would.
                done += 1;
                continue;
            }
            done += m as usize;
        }
    }
}

// ------------------------------------------------------------------ load

struct Load {
    target: SocketAddr,
    sockets: usize,
    outstanding: usize,
    size: usize,
    duration: Duration,
    warmup: Duration,
    timeout: Duration,
    cpu_pids: Vec<u32>,
}

#[derive(Default)]
struct Counts {
    replies: u64,
    sent: u64,
    lost: u64,
    late: u64,
    bad: u64,
    refused: u64,
    send_err: u64,
}

/// What a socket waits for: the sequence number of its datagram and when it left.
#[derive(Clone, Copy)]
struct Waiting {
    seq: u64,
    at: Instant,
}

/// Header of a datagram: the sequence number (8 bytes) and the socket's index (4).
const HEADER: usize = 12;

impl Load {
    fn parse(args: &[String]) -> io::Result<Load> {
        let mut l = Load {
            target: addr(&args[0])?,
            sockets: 256,
            outstanding: 64,
            size: 80,
            duration: Duration::from_secs(5),
            warmup: Duration::from_secs(1),
            timeout: Duration::from_millis(1000),
            cpu_pids: Vec::new(),
        };
        let mut it = args[1..].iter();
        while let Some(flag) = it.next() {
            let value = it
                .next()
                .ok_or_else(|| invalid(format!("{flag} needs a value")))?;
            let num = |v: &str| -> io::Result<f64> {
                v.parse::<f64>()
                    .ok()
                    .filter(|n| n.is_finite() && *n >= 0.0)
                    .ok_or_else(|| invalid(format!("{flag}: not a number: {v:?}")))
            };
            match flag.as_str() {
                "--sockets" => l.sockets = num(value)? as usize,
                "--outstanding" => l.outstanding = num(value)? as usize,
                "--size" => l.size = num(value)? as usize,
                "--duration" => l.duration = Duration::from_secs_f64(num(value)?),
                "--warmup" => l.warmup = Duration::from_secs_f64(num(value)?),
                "--timeout-ms" => l.timeout = Duration::from_secs_f64(num(value)? / 1000.0),
                "--cpu-pid" => l.cpu_pids.push(num(value)? as u32),
                _ => return Err(invalid(format!("unknown option {flag}"))),
            }
        }
        if l.outstanding == 0 || l.sockets < l.outstanding {
            return Err(invalid("need 0 < --outstanding <= --sockets".into()));
        }
        if l.size < HEADER || l.size > 65507 {
            return Err(invalid(format!("--size must be {HEADER}..=65507")));
        }
        if l.duration.is_zero() || l.timeout.is_zero() {
            return Err(invalid("--duration and --timeout-ms must be > 0".into()));
        }
        Ok(l)
    }

    fn run(&self) -> io::Result<()> {
        let bind: SocketAddr = if self.target.is_ipv4() {
            "127.0.0.1:0".parse().unwrap()
        } else {
            "[::1]:0".parse().unwrap()
        };
        let mut socks = Vec::with_capacity(self.sockets);
        // SAFETY: plain system call; the fd is closed when `ep` drops.
        let ep = Fd(check(unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) })?);
        for i in 0..self.sockets {
            let s = UdpSocket::bind(bind)?;
            s.connect(self.target)?;
            s.set_nonblocking(true)?;
            let mut ev = libc::epoll_event {
                events: libc::EPOLLIN as u32,
                u64: i as u64,
            };
            // SAFETY: both fds are open; ev lives across the call.
            check(unsafe { libc::epoll_ctl(ep.0, libc::EPOLL_CTL_ADD, s.as_raw_fd(), &mut ev) })?;
            socks.push(s);
        }

        let mut waiting: Vec<Option<Waiting>> = vec![None; self.sockets];
        let mut idle: VecDeque<usize> = (0..self.sockets).collect();
        let mut out = 0usize; // datagrams outstanding
        let mut seq = 0u64;
        let mut c = Counts::default();
        let mut buf = vec![0u8; 65536];
        let mut msg = vec![0x5au8; self.size];
        let mut events = vec![libc::epoll_event { events: 0, u64: 0 }; 256];

        let start = Instant::now();
        let t0 = start + self.warmup; // counting starts
        let t1 = t0 + self.duration; // sending stops
        let mut counting = false;
        let mut at0 = Sched::default();
        let mut used: Option<Sched> = None;
        let mut per_sec: Vec<u64> = vec![0; self.duration.as_secs() as usize];
        let mut next_sweep = start;
        let sweep_every = (self.timeout / 10).max(Duration::from_millis(1));
        let mut last = Instant::now();

        loop {
            let now = last;
            if !counting && now >= t0 {
                counting = true;
                c = Counts::default();
                at0 = Sched::read(&self.cpu_pids)?;
            }
            let sending = now < t1;
            if !sending && counting && used.is_none() {
                used = Some(Sched::read(&self.cpu_pids)?.since(&at0));
            }
            // Fill the window.
            while sending && out < self.outstanding {
                let Some(i) = idle.pop_front() else { break };
                msg[..8].copy_from_slice(&seq.to_le_bytes());
                msg[8..12].copy_from_slice(&(i as u32).to_le_bytes());
                match socks[i].send(&msg) {
                    Ok(_) => {
                        waiting[i] = Some(Waiting { seq, at: now });
                        seq += 1;
                        out += 1;
                        c.sent += 1;
                    }
                    Err(_) => {
                        // Not sent (buffer full, or an ICMP error from before): try another later.
                        c.send_err += 1;
                        idle.push_back(i);
                        break;
                    }
                }
            }
            // Give up on datagrams past the timeout.
            if now >= next_sweep {
                next_sweep = now + sweep_every;
                for (i, w) in waiting.iter_mut().enumerate() {
                    if let Some(x) = *w
                        && now.duration_since(x.at) > self.timeout
                    {
                        *w = None;
                        out -= 1;
                        c.lost += 1;
                        idle.push_back(i);
                    }
                }
            }
            if !sending && (out == 0 || now >= t1 + self.timeout + sweep_every) {
                break;
            }

            // SAFETY: events has room for events.len() entries.
            let n = unsafe {
                libc::epoll_wait(
                    ep.0,
                    events.as_mut_ptr(),
                    events.len() as libc::c_int,
                    sweep_every.as_millis().clamp(1, 100) as libc::c_int,
                )
            };
            if n < 0 {
                let e = io::Error::last_os_error();
                if e.kind() == ErrorKind::Interrupted {
                    continue;
                }
                return Err(e);
            }
            last = Instant::now();
            for ev in &events[..n as usize] {
                let i = ev.u64 as usize;
                loop {
                    let len = match socks[i].recv(&mut buf) {
                        Ok(len) => len,
                        Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                        Err(e) if e.kind() == ErrorKind::ConnectionRefused => {
                            // ICMP port unreachable for this socket's last datagram;
                            // it is counted lost when its time is up.
                            c.refused += 1;
                            continue;
                        }
                        Err(e) => return Err(e),
                    };
                    let got = (len == self.size)
                        .then(|| u64::from_le_bytes(buf[..8].try_into().unwrap()))
                        .filter(|_| buf[8..12] == (i as u32).to_le_bytes());
                    match (got, waiting[i]) {
                        (Some(s), Some(w)) if s == w.seq => {
                            waiting[i] = None;
                            out -= 1;
                            idle.push_back(i);
                            if counting && w.at >= t0 && last < t1 {
                                c.replies += 1;
                                let sec = last.duration_since(t0).as_secs() as usize;
                                if let Some(b) = per_sec.get_mut(sec) {
                                    *b += 1;
                                }
                            }
                        }
                        (Some(s), _) if s < seq => c.late += 1,
                        _ => c.bad += 1,
                    }
                }
            }
        }
        if !counting {
            return Err(invalid("the run ended before counting began".into()));
        }
        let secs = self.duration.as_secs_f64();
        let (min, max) = per_sec
            .iter()
            .fold((u64::MAX, 0), |(lo, hi), &v| (lo.min(v), hi.max(v)));
        let min = if per_sec.is_empty() { 0 } else { min };
        println!(
            "replies={} sent={} lost={} late={} bad={} refused={} send_err={} seconds={:.3} \
             rate={:.0} per_sec_min={} per_sec_max={} cpu_s={:.3} wait_s={:.3}",
            c.replies,
            c.sent,
            c.lost,
            c.late,
            c.bad,
            c.refused,
            c.send_err,
            secs,
            c.replies as f64 / secs,
            min,
            max,
            used.as_ref().map_or(0.0, |u| u.cpu),
            used.as_ref().map_or(0.0, |u| u.wait),
        );
        Ok(())
    }
}

struct Fd(libc::c_int);

impl Drop for Fd {
    fn drop(&mut self) {
        // SAFETY: we own the fd.
        unsafe { libc::close(self.0) };
    }
}

/// CPU time used by the processes and time their threads waited for a
/// CPU, in seconds.
#[derive(Default)]
struct Sched {
    cpu: f64,
    wait: f64,
}

impl Sched {
    fn read(pids: &[u32]) -> io::Result<Sched> {
        let mut wait = 0u64;
        for pid in pids {
            // Threads may come and go (a blocking pool): read what is there now.
            for task in std::fs::read_dir(format!("/proc/{pid}/task"))?.flatten() {
                wait += run_queue_ns(&task.path().join("schedstat"));
            }
        }
        Ok(Sched {
            cpu: cpu_seconds(pids)?,
            wait: wait as f64 / 1e9,
        })
    }

    /// What was used since `before` (a thread that ended takes its share
    /// with it, so a difference below zero reads as zero).
    fn since(&self, before: &Sched) -> Sched {
        Sched {
            cpu: (self.cpu - before.cpu).max(0.0),
            wait: (self.wait - before.wait).max(0.0),
        }
    }
}

/// The second field of a schedstat file: ns spent runnable, waiting for a CPU (0 if unreadable).
fn run_queue_ns(path: &std::path::Path) -> u64 {
    std::fs::read_to_string(path)
        .ok()
        .and_then(|s| s.split_whitespace().nth(1)?.parse().ok())
        .unwrap_or(0)
}

/// utime + stime of the processes (all threads), in seconds.
fn cpu_seconds(pids: &[u32]) -> io::Result<f64> {
    // SAFETY: plain query.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    let mut ticks = 0u64;
    for pid in pids {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
        // Fields after the command name (which may hold spaces and parens):
        // state is field 3, utime and stime are fields 14 and 15.
        let rest = &stat[stat.rfind(')').map_or(0, |p| p + 1)..];
        let f: Vec<&str> = rest.split_whitespace().collect();
        for idx in [11, 12] {
            ticks += f
                .get(idx)
                .and_then(|v| v.parse::<u64>().ok())
                .ok_or_else(|| invalid(format!("cannot read /proc/{pid}/stat")))?;
        }
    }
    Ok(ticks as f64 / hz)
}
