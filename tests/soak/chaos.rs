//! The chaos: the daemon (the real binary, three listeners), the backend
//! processes behind it, and the events done to them — SIGKILL and revival
//! of backends, SIGSTOP/SIGCONT of a Redis server (a hung database, which
//! `on_marked_down = "shutdown"` must cut), SIGHUP reloads that add,
//! remove and reweight backends (and now and then an invalid file, which
//! must change nothing), and drain/maint/ready through the admin API.
//!
//! One rule keeps the invariant "a connection with a live backend
//! throughout succeeds" meaningful: no event may leave a listener without
//! a backend that is alive *and* in the daemon's rotation (read from the
//! status API just before the event). Revivals wait until the daemon has
//! marked the dead backend down, as after a real failure. Each outage is
//! logged with its window, for the report to excuse the connections that
//! were on that backend.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::Duration;

use serde_json::Value;
use tokio::task::block_in_place;
use tokio::time::Instant;

use crate::common::{DEADLINE, Daemon, http, sample_value, scrape, status_backends};
use crate::load::{LISTENERS, REDIS, TCP, Targets, WEB};
use crate::procs::{self, Kind, Proc};
use crate::rng::Rng;

/// Health checks for all three listeners: a dead backend is out of
/// rotation within about interval × fall; `timeout` equal to `interval`
/// leaves a loaded CI machine room before a live backend looks dead.
const HEALTH: &str = "interval = \"500ms\"\ntimeout = \"500ms\"\nfall = 3\nrise = 2\n";

/// `retries` covers every other backend of a listener (four at most), so a
/// connection reaches a live one whatever died before checks noticed.
const LISTENER_HEADS: [&str; 3] = [
    "name = \"tcp\"\nbind = \"127.0.0.1:0\"\nmode = \"tcp\"\nalgorithm = \"leastconn\"\n\
     retries = 3\n[listener.health_check]\n",
    "name = \"web\"\nbind = \"127.0.0.1:0\"\nmode = \"http\"\nalgorithm = \"roundrobin\"\n\
     retries = 3\n[listener.health_check]\n",
    "name = \"redis\"\nbind = \"127.0.0.1:0\"\nmode = \"tcp\"\nalgorithm = \"roundrobin\"\n\
     retries = 3\non_marked_down = \"shutdown\"\n[listener.health_check]\nkind = \"redis\"\n",
];

/// Backends per listener (kind, name prefix, slots, configured at start).
const POOLS: [(Kind, &str, usize, usize); 3] = [
    (Kind::TcpEcho, "t", 4, 3),
    (Kind::Http, "w", 4, 3),
    (Kind::Redis, "r", 2, 2),
];

/// Ports the soak needs.
pub const PORTS: usize = POOLS[0].2 + POOLS[1].2 + POOLS[2].2;

/// A time a backend was dead (or frozen): connections on it may fail.
#[derive(Debug, Clone)]
pub struct Outage {
    pub listener: usize,
    pub backend: String,
    pub from: Instant,
    /// Open while a frozen server is not thawed yet.
    pub to: Option<Instant>,
    pub frozen: bool,
}

impl Outage {
    /// Whether this outage overlaps `start..=end` on `listener`.
    pub fn overlaps(&self, listener: usize, start: Instant, end: Instant) -> bool {
        self.listener == listener && self.from <= end && self.to.is_none_or(|to| start <= to)
    }
}

/// A time a backend was in the config: one instance of it (removing it
/// ends one, adding it again starts another with fresh state).
#[derive(Debug, Clone)]
pub struct Membership {
    pub listener: usize,
    pub backend: String,
    pub from: Instant,
    pub to: Option<Instant>,
}

/// What the chaos did.
#[derive(Debug, Default, Clone)]
pub struct Tally {
    pub kills: u64,
    pub freezes: u64,
    pub revivals: u64,
    pub thaws: u64,
    pub reloads: u64,
    pub invalid_reloads: u64,
    pub added: u64,
    pub removed: u64,
    pub reweighted: u64,
    pub drains: u64,
    pub maints: u64,
    pub readies: u64,
    pub scrapes: u64,
    /// Events drawn whose precondition did not hold (nothing done).
    pub skipped: u64,
}

/// One backend of a listener, alive or not, configured or not.
struct Slot {
    name: String,
    port: u16,
    proc: Option<Proc>,
    /// The open outage while SIGSTOPped.
    frozen: Option<usize>,
    in_config: bool,
    weight: u32,
    admin: &'static str,
    /// A Redis server's working directory, kept across revivals.
    dir: tempfile::TempDir,
}

impl Slot {
    fn alive(&self) -> bool {
        self.proc.is_some() && self.frozen.is_none()
    }
}

struct Pool {
    kind: Kind,
    slots: Vec<Slot>,
}

pub struct Chaos {
    pools: Vec<Pool>,
    pub daemon: Daemon,
    pub admin: SocketAddr,
    pub outages: Vec<Outage>,
    pub tally: Tally,
    /// Every event, when it was done.
    pub journal: Vec<(Instant, String)>,
    pub memberships: Vec<Membership>,
    rng: Rng,
}

impl Chaos {
    /// Start every backend (the unconfigured spares too), then the daemon
    /// over the configured ones, and wait until all are in rotation.
    pub async fn start(ports: &[u16], rng: Rng) -> Chaos {
        let mut ports = ports.iter().copied();
        let mut pools = Vec::new();
        for (kind, prefix, n, configured) in POOLS {
            let mut slots = Vec::new();
            for i in 0..n {
                let name = format!("{prefix}{}", i + 1);
                let port = ports.next().expect("enough ports");
                let dir = tempfile::Builder::new()
                    .prefix("sy-soak-")
                    .tempdir()
                    .unwrap();
                let proc = procs::start(kind, &name, port, dir.path()).await;
                slots.push(Slot {
                    name,
                    port,
                    proc: Some(proc),
                    frozen: None,
                    in_config: i < configured,
                    weight: 1,
                    admin: "ready",
                    dir,
                });
            }
            pools.push(Pool { kind, slots });
        }
        let toml = config_text(&pools, None);
        let daemon = block_in_place(|| Daemon::start(&toml));
        let admin = daemon.admin.expect("admin endpoint");
        let mut chaos = Chaos {
            pools,
            daemon,
            admin,
            outages: Vec::new(),
            tally: Tally::default(),
            journal: Vec::new(),
            memberships: Vec::new(),
            rng,
        };
        chaos.sync_memberships();
        chaos.wait_all_in_rotation().await;
        chaos
    }

    /// What each of this soak's TCP ports is, for the daemon's descriptor
    /// breakdown: backends, listeners, the admin endpoint.
    pub fn ports(&self) -> HashMap<u16, String> {
        let mut ports: HashMap<u16, String> = self
            .pools
            .iter()
            .flat_map(|p| p.slots.iter())
            .map(|s| (s.port, format!("backend {}", s.name)))
            .collect();
        for l in LISTENERS {
            ports.insert(self.daemon.addr(l).port(), format!("client of {l}"));
        }
        ports.insert(self.admin.port(), "admin".into());
        ports
    }

    pub fn targets(&self) -> Targets {
        let redis_names = self.pools[REDIS]
            .slots
            .iter()
            .map(|s| (s.port, s.name.clone()))
            .collect();
        Targets {
            addrs: LISTENERS.map(|l| self.daemon.addr(l)),
            redis_names: std::sync::Arc::new(redis_names),
        }
    }

    /// One of each event, under load, before the baseline is measured: so
    /// that every code path the chaos takes has run (and its pages and
    /// allocations are in the baseline), and a short run still covers all.
    pub async fn warm_up(&mut self) {
        for p in [TCP, WEB, REDIS] {
            self.kill(p, 0).await;
            self.wait_backend(p, 0, "down").await;
            self.revive(p, 0).await;
            self.wait_backend(p, 0, "in rotation").await;
        }
        self.freeze(REDIS, 1);
        self.wait_backend(REDIS, 1, "down").await;
        self.revive(REDIS, 1).await;
        self.wait_backend(REDIS, 1, "in rotation").await;
        for p in [TCP, WEB] {
            self.pools[p].slots[3].in_config = true;
            self.tally.added += 1;
        }
        self.pools[TCP].slots[0].weight = 3;
        self.tally.reweighted += 1;
        self.reload();
        self.invalid_reload(WEB, 1);
        for p in [TCP, WEB] {
            self.pools[p].slots[3].in_config = false;
            self.tally.removed += 1;
        }
        self.pools[TCP].slots[0].weight = 1;
        self.reload();
        self.set_admin(TCP, 1, "drain").await;
        self.set_admin(WEB, 1, "maint").await;
        self.set_admin(REDIS, 0, "drain").await;
        self.set_admin(TCP, 1, "ready").await;
        self.set_admin(WEB, 1, "ready").await;
        self.set_admin(REDIS, 0, "ready").await;
        self.scrape().await;
        self.wait_all_in_rotation().await;
    }

    /// One random event on a random listener (up to three draws, if the
    /// first ones cannot be done now).
    pub async fn step(&mut self) {
        for _ in 0..3 {
            let p = self.rng.below(3) as usize;
            let done = match self.rng.below(100) {
                0..25 => self.try_kill(p).await,
                25..50 => self.try_revive(p).await,
                50..70 => self.try_reload(p).await,
                70..95 => self.try_admin(p).await,
                _ => {
                    self.scrape().await;
                    true
                }
            };
            if done {
                return;
            }
            self.tally.skipped += 1;
        }
    }

    /// Back to the start: every backend alive and ready, the initial
    /// config loaded, all configured backends in rotation.
    pub async fn restore(&mut self) {
        for (p, &(_, _, n, configured)) in POOLS.iter().enumerate() {
            for i in 0..n {
                if !self.pools[p].slots[i].alive() {
                    self.revive(p, i).await;
                }
                if self.pools[p].slots[i].in_config && self.pools[p].slots[i].admin != "ready" {
                    self.set_admin(p, i, "ready").await;
                }
            }
            for (i, s) in self.pools[p].slots.iter_mut().enumerate() {
                (s.in_config, s.weight, s.admin) = (i < configured, 1, "ready");
            }
        }
        self.reload();
        self.wait_all_in_rotation().await;
    }

    /// Wait until no client connection is open on any listener.
    pub async fn wait_idle(&self) {
        let start = Instant::now();
        let mut poll = tokio::time::interval(Duration::from_millis(20));
        loop {
            let (code, body) = http(self.admin, "GET", "/api/v1/status", &[], "").await;
            assert_eq!(code, 200, "{body}");
            let doc: Value = serde_json::from_str(&body).unwrap();
            let busy: Vec<String> = doc["listeners"]
                .as_array()
                .unwrap()
                .iter()
                .filter(|l| l["open_client_connections"] != 0 || l["active_connections"] != 0)
                .map(|l| {
                    format!(
                        "{}: {} open, {} active",
                        l["name"], l["open_client_connections"], l["active_connections"]
                    )
                })
                .collect();
            if busy.is_empty() {
                return;
            }
            assert!(
                start.elapsed() < DEADLINE,
                "connections still open after the load stopped: {busy:?}"
            );
            poll.tick().await;
        }
    }

    /// SIGTERM; wait for "stopped" (reading every log line up to it) and
    /// the exit code.
    pub fn stop_daemon(&mut self) -> i32 {
        self.daemon.signal("TERM");
        block_in_place(|| {
            self.daemon.log_until(|l| l.ends_with(": stopped"));
            self.daemon.wait_exit()
        })
    }

    /// Open and close memberships as the slots' config now says.
    fn sync_memberships(&mut self) {
        let now = Instant::now();
        for (p, pool) in self.pools.iter().enumerate() {
            for s in &pool.slots {
                let open = self
                    .memberships
                    .iter_mut()
                    .find(|m| m.listener == p && m.backend == s.name && m.to.is_none());
                match (s.in_config, open) {
                    (false, Some(m)) => m.to = Some(now),
                    (true, None) => self.memberships.push(Membership {
                        listener: p,
                        backend: s.name.clone(),
                        from: now,
                        to: None,
                    }),
                    _ => {}
                }
            }
        }
    }

    fn note(&mut self, at: Instant, what: String) {
        self.journal.push((at, what));
    }

    async fn status(&self, p: usize) -> HashMap<String, Value> {
        status_backends(self.admin, LISTENERS[p]).await
    }

    /// Whether a backend other than slot `except` is alive and in rotation.
    fn others_usable(&self, p: usize, except: usize, st: &HashMap<String, Value>) -> bool {
        self.pools[p].slots.iter().enumerate().any(|(j, s)| {
            j != except && s.alive() && st.get(&s.name).is_some_and(|b| b["in_rotation"] == true)
        })
    }

    async fn try_kill(&mut self, p: usize) -> bool {
        let st = self.status(p).await;
        let candidates: Vec<usize> = (0..self.pools[p].slots.len())
            .filter(|&i| self.pools[p].slots[i].proc.is_some() && self.others_usable(p, i, &st))
            .collect();
        let Some(i) = self.rng.pick(&candidates) else {
            return false;
        };
        let slot = &self.pools[p].slots[i];
        if self.pools[p].kind == Kind::Redis && slot.frozen.is_none() && self.rng.percent(50) {
            self.freeze(p, i);
        } else {
            self.kill(p, i).await;
        }
        true
    }

    async fn kill(&mut self, p: usize, i: usize) {
        let slot = &mut self.pools[p].slots[i];
        let proc = slot.proc.take().expect("a live backend");
        let from = Instant::now();
        proc.kill().await;
        let to = Instant::now();
        if let Some(k) = slot.frozen.take() {
            self.outages[k].to = Some(to);
        }
        self.outages.push(Outage {
            listener: p,
            backend: slot.name.clone(),
            from,
            to: Some(to),
            frozen: false,
        });
        self.tally.kills += 1;
        self.note(
            from,
            format!("kill {}/{}", LISTENERS[p], self.pools[p].slots[i].name),
        );
    }

    /// SIGSTOP: the server still accepts (the kernel does) but never
    /// answers, until the daemon marks it down and cuts its connections.
    fn freeze(&mut self, p: usize, i: usize) {
        let slot = &mut self.pools[p].slots[i];
        let from = Instant::now();
        slot.proc
            .as_ref()
            .expect("a live backend")
            .signal(libc::SIGSTOP);
        slot.frozen = Some(self.outages.len());
        self.outages.push(Outage {
            listener: p,
            backend: slot.name.clone(),
            from,
            to: None,
            frozen: true,
        });
        self.tally.freezes += 1;
        self.note(
            from,
            format!("freeze {}/{}", LISTENERS[p], self.pools[p].slots[i].name),
        );
    }

    async fn try_revive(&mut self, p: usize) -> bool {
        let st = self.status(p).await;
        let candidates: Vec<usize> = (0..self.pools[p].slots.len())
            .filter(|&i| {
                let s = &self.pools[p].slots[i];
                !s.alive()
                    && (!s.in_config || st.get(&s.name).is_some_and(|b| b["health"] == "down"))
            })
            .collect();
        let Some(i) = self.rng.pick(&candidates) else {
            return false;
        };
        self.revive(p, i).await;
        true
    }

    /// A dead backend started again on its port, or a frozen one thawed.
    async fn revive(&mut self, p: usize, i: usize) {
        let kind = self.pools[p].kind;
        let slot = &mut self.pools[p].slots[i];
        if let Some(k) = slot.frozen.take() {
            slot.proc.as_ref().unwrap().signal(libc::SIGCONT);
            self.outages[k].to = Some(Instant::now());
            self.tally.thaws += 1;
            let what = format!("thaw {}/{}", LISTENERS[p], slot.name);
            self.note(Instant::now(), what);
            return;
        }
        slot.proc = Some(procs::start(kind, &slot.name, slot.port, slot.dir.path()).await);
        self.tally.revivals += 1;
        let what = format!("revive {}/{}", LISTENERS[p], self.pools[p].slots[i].name);
        self.note(Instant::now(), what);
    }

    async fn try_admin(&mut self, p: usize) -> bool {
        let st = self.status(p).await;
        let configured: Vec<usize> = (0..self.pools[p].slots.len())
            .filter(|&i| self.pools[p].slots[i].in_config)
            .collect();
        let Some(i) = self.rng.pick(&configured) else {
            return false;
        };
        let current = self.pools[p].slots[i].admin;
        let target = if current != "ready" && self.rng.percent(70) {
            "ready"
        } else {
            let others: Vec<&'static str> = ["drain", "maint", "ready"]
                .into_iter()
                .filter(|s| *s != current)
                .collect();
            self.rng.pick(&others).unwrap()
        };
        if target != "ready" && !self.others_usable(p, i, &st) {
            return false;
        }
        self.set_admin(p, i, target).await;
        true
    }

    async fn set_admin(&mut self, p: usize, i: usize, state: &'static str) {
        let slot = &mut self.pools[p].slots[i];
        let path = format!(
            "/api/v1/listeners/{}/backends/{}/state",
            LISTENERS[p], slot.name
        );
        let (code, body) = http(self.admin, "PUT", &path, &[], state).await;
        assert_eq!(code, 200, "PUT {path} {state}: {body}");
        slot.admin = state;
        let what = format!("{state} {}/{}", LISTENERS[p], slot.name);
        self.note(Instant::now(), what);
        match state {
            "drain" => self.tally.drains += 1,
            "maint" => self.tally.maints += 1,
            _ => self.tally.readies += 1,
        }
    }

    async fn try_reload(&mut self, p: usize) -> bool {
        let configured: Vec<usize> = (0..self.pools[p].slots.len())
            .filter(|&i| self.pools[p].slots[i].in_config)
            .collect();
        if self.rng.percent(12) {
            let i = self.rng.pick(&configured).expect("a configured backend");
            self.invalid_reload(p, i);
            return true;
        }
        let st = self.status(p).await;
        let spare: Vec<usize> = (0..self.pools[p].slots.len())
            .filter(|&i| !self.pools[p].slots[i].in_config)
            .collect();
        let removable: Vec<usize> = configured
            .iter()
            .copied()
            .filter(|&i| configured.len() >= 2 && self.others_usable(p, i, &st))
            .collect();
        let mut ops = vec!["reweight"];
        if !spare.is_empty() {
            ops.push("add");
        }
        if !removable.is_empty() {
            ops.push("remove");
        }
        match self.rng.pick(&ops).unwrap() {
            "add" => {
                let i = self.rng.pick(&spare).unwrap();
                let weight = self.rng.range(1, 4) as u32;
                let s = &mut self.pools[p].slots[i];
                (s.in_config, s.weight, s.admin) = (true, weight, "ready");
                self.tally.added += 1;
            }
            "remove" => {
                let i = self.rng.pick(&removable).unwrap();
                let s = &mut self.pools[p].slots[i];
                // Its admin state goes with it.
                (s.in_config, s.admin) = (false, "ready");
                self.tally.removed += 1;
            }
            _ => {
                let i = self.rng.pick(&configured).unwrap();
                let weight = if self.rng.percent(15) && self.others_usable(p, i, &st) {
                    0
                } else {
                    self.rng.range(1, 5) as u32
                };
                self.pools[p].slots[i].weight = weight;
                self.tally.reweighted += 1;
            }
        }
        self.reload();
        true
    }

    /// Write the config as the slots say and SIGHUP; it must apply.
    fn reload(&mut self) {
        let toml = config_text(&self.pools, None);
        self.daemon.write_config(&toml);
        let applied = block_in_place(|| self.daemon.reload());
        assert!(applied, "a valid reload failed:\n{toml}");
        self.sync_memberships();
        self.tally.reloads += 1;
        self.note(Instant::now(), format!("reload:\n{toml}"));
    }

    /// A file with an out-of-range weight on slot `i` of listener `p`: the
    /// reload must fail and change nothing (the running config stays).
    fn invalid_reload(&mut self, p: usize, i: usize) {
        let toml = config_text(&self.pools, Some((p, i)));
        self.daemon.write_config(&toml);
        let applied = block_in_place(|| self.daemon.reload());
        assert!(!applied, "an invalid reload was applied:\n{toml}");
        self.tally.invalid_reloads += 1;
        let what = format!(
            "invalid reload (weight 999 on {}/{})",
            LISTENERS[p], self.pools[p].slots[i].name
        );
        self.note(Instant::now(), what);
    }

    async fn scrape(&mut self) {
        let s = scrape(self.admin).await;
        assert!(
            sample_value(
                &s,
                "switchyard_config_reloads_total",
                &[("result", "success")]
            )
            .is_some(),
            "no reload counter in /metrics"
        );
        self.tally.scrapes += 1;
    }

    /// Wait until slot `i` of listener `p` is `down` or `in rotation`.
    async fn wait_backend(&self, p: usize, i: usize, want: &str) {
        let name = &self.pools[p].slots[i].name;
        let start = Instant::now();
        let mut poll = tokio::time::interval(Duration::from_millis(20));
        loop {
            let st = self.status(p).await;
            let b = &st[name];
            let holds = match want {
                "down" => b["health"] == "down",
                _ => b["in_rotation"] == true,
            };
            if holds {
                return;
            }
            assert!(
                start.elapsed() < DEADLINE,
                "{}/{name} not {want}: {b}",
                LISTENERS[p]
            );
            poll.tick().await;
        }
    }

    async fn wait_all_in_rotation(&self) {
        for p in 0..self.pools.len() {
            for i in 0..self.pools[p].slots.len() {
                let s = &self.pools[p].slots[i];
                if s.in_config && s.weight > 0 && s.admin == "ready" {
                    self.wait_backend(p, i, "in rotation").await;
                }
            }
        }
    }
}

/// The daemon's config for the slots as they are; `invalid` puts an
/// out-of-range weight on one backend.
fn config_text(pools: &[Pool], invalid: Option<(usize, usize)>) -> String {
    let mut s =
        String::from("[global]\nshutdown_timeout = \"5s\"\n\n[admin]\nbind = \"127.0.0.1:0\"\n");
    for (p, pool) in pools.iter().enumerate() {
        s += &format!("\n[[listener]]\n{}{HEALTH}", LISTENER_HEADS[p]);
        for (i, slot) in pool.slots.iter().enumerate().filter(|(_, s)| s.in_config) {
            let weight = if invalid == Some((p, i)) {
                999
            } else {
                slot.weight
            };
            s += &format!(
                "[[listener.backend]]\nname = \"{}\"\naddress = \"127.0.0.1:{}\"\nweight = {weight}\n",
                slot.name, slot.port
            );
        }
    }
    s
}
