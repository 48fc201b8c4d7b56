//! `kind = "redis"` against real Redis servers started by the tests (see
//! `db/mod.rs`): a password-protected primary and its replica behind
//! `role = "primary"`, traffic that follows a switchover and back, and the
//! server's own error as a failed check's reason.

mod common;
mod db;

use std::net::SocketAddr;
use std::time::Duration;

use common::*;
use db::{Redis, redis_cli_as};
use switchyard::config::Role;
use switchyard::server::Server;
use tokio::task::block_in_place;
use tokio::time::Instant;

/// Both servers' `requirepass` (and the replica's `masterauth`).
const PASSWORD: &str = "s3cret-redis";

/// Fast checks: a flip shows within interval × max(fall, rise) + timeout.
const INTERVAL_MS: u64 = 200;
const TIMEOUT_MS: u64 = 150;
const FALL: u32 = 2;
const RISE: u32 = 2;
const DETECTION: Duration = Duration::from_millis(INTERVAL_MS * 2 + TIMEOUT_MS);
/// Scheduling noise on a loaded 2-core machine.
const SLACK: Duration = Duration::from_millis(1500);

/// A listener named `name` with fast redis checks (`fields` added to its
/// `[listener.health_check]`) over `backends`.
fn listener(name: &str, fields: &str, backends: &[(&str, SocketAddr)]) -> String {
    let check = format!(
        "kind = \"redis\"\ninterval = \"{INTERVAL_MS}ms\"\ntimeout = \"{TIMEOUT_MS}ms\"\n\
         fall = {FALL}\nrise = {RISE}\n{fields}"
    );
    checked_listener(name, &check, backends)
}

/// A server that takes `PASSWORD`; a replica of `primary` if given.
fn server(primary: Option<&Redis>) -> Redis {
    let port = primary.map(|p| p.port.to_string());
    // A replica's full sync starts at once, not after the default 5 s
    // wait for more replicas.
    let mut args = vec!["--masterauth", PASSWORD, "--repl-diskless-sync-delay", "0"];
    if let Some(port) = &port {
        args.extend(["--replicaof", "127.0.0.1", port]);
    }
    Redis::start_with(Some(PASSWORD), &args)
}

/// Wait until `replica` is in sync with its primary (or fail after
/// `DEADLINE`).
async fn wait_linked(replica: &Redis) {
    let start = Instant::now();
    let mut poll = tokio::time::interval(Duration::from_millis(20));
    loop {
        let info = block_in_place(|| replica.cli(&["INFO", "replication"]));
        if info.contains("role:slave") && info.contains("master_link_status:up") {
            return;
        }
        assert!(
            start.elapsed() < DEADLINE,
            "replica on {} not linked:\n{info}\n{}",
            replica.port,
            replica.log()
        );
        poll.tick().await;
    }
}

/// `n` client connections through `proxy`, each writing `key:i = value`
/// and asking `ROLE`: every one must reach a master that takes writes.
fn traffic(proxy: SocketAddr, n: usize, key: &str, value: &str) {
    for i in 0..n {
        let key = format!("{key}:{i}");
        let set = redis_cli_as(proxy.port(), Some(PASSWORD), &["SET", &key, value]);
        assert_eq!(set, "OK", "SET {key} through the proxy");
        let role = redis_cli_as(proxy.port(), Some(PASSWORD), &["ROLE"]);
        assert_eq!(role.lines().next(), Some("master"), "ROLE: {role}");
    }
}

fn total(server: &Server, backend: &str) -> u64 {
    server.backend_state("l", backend).unwrap().total()
}

/// Make `new` the primary and `old` its replica (promote first, so there
/// is never no master), and return when the listener offers only `new`:
/// within the detection bound.
async fn switch_over(server: &Server, old: (&str, &Redis), new: (&str, &Redis)) {
    let switched = Instant::now();
    assert_eq!(
        block_in_place(|| new.1.cli(&["REPLICAOF", "NO", "ONE"])),
        "OK"
    );
    let port = new.1.port.to_string();
    assert_eq!(
        block_in_place(|| old.1.cli(&["REPLICAOF", "127.0.0.1", &port])),
        "OK"
    );
    wait_rotation(server, "l", &[new.0]).await;
    let took = switched.elapsed();
    assert!(
        took <= DETECTION + SLACK,
        "listener followed the switchover after {took:?}, bound {DETECTION:?} + {SLACK:?}"
    );
    wait_report(server, "l", new.0, (None, Some(Role::Primary))).await;
    wait_report(
        server,
        "l",
        old.0,
        (Some("role is replica"), Some(Role::Replica)),
    )
    .await;
    wait_linked(old.1).await;
}

/// `role = "primary"` over a primary and its replica, both behind
/// `requirepass`: clients reach the primary only; after a switchover
/// (`REPLICAOF NO ONE` on the replica, `REPLICAOF` on the old primary) new
/// connections reach the new primary within interval × fall + slack, and
/// after the switch back the first one again. Connections are counted per
/// backend, so "only" is exact.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn primary_role_follows_a_switchover_and_back() {
    let r1 = block_in_place(|| server(None));
    let r2 = block_in_place(|| server(Some(&r1)));
    wait_linked(&r2).await;
    let dir = tempfile::tempdir().unwrap();
    let fields = format!(
        "role = \"primary\"\n{}",
        password_file_line(dir.path(), "redis.password", PASSWORD)
    );
    let server = start_server(&listener("l", &fields, &[("r1", r1.addr), ("r2", r2.addr)])).await;
    let proxy = server.local_addr("l").unwrap();

    wait_rotation(&server, "l", &["r1"]).await;
    wait_report(&server, "l", "r1", (None, Some(Role::Primary))).await;
    wait_report(
        &server,
        "l",
        "r2",
        (Some("role is replica"), Some(Role::Replica)),
    )
    .await;
    block_in_place(|| traffic(proxy, 10, "before", "r1"));
    assert_eq!((total(&server, "r1"), total(&server, "r2")), (20, 0));
    assert_eq!(block_in_place(|| r1.cli(&["GET", "before:9"])), "r1");

    switch_over(&server, ("r1", &r1), ("r2", &r2)).await;
    let r1_before = total(&server, "r1");
    block_in_place(|| traffic(proxy, 10, "after", "r2"));
    assert_eq!(
        total(&server, "r1"),
        r1_before,
        "a client reached the old primary"
    );
    assert_eq!(total(&server, "r2"), 20);
    // Written on r2, replicated to r1, which now follows it.
    assert_eq!(block_in_place(|| r2.cli(&["GET", "after:9"])), "r2");

    switch_over(&server, ("r2", &r2), ("r1", &r1)).await;
    let r2_before = total(&server, "r2");
    block_in_place(|| traffic(proxy, 10, "back", "r1"));
    assert_eq!(
        total(&server, "r2"),
        r2_before,
        "a client reached the old primary"
    );
    assert_eq!(total(&server, "r1"), r1_before + 20);
    assert_eq!(block_in_place(|| r1.cli(&["GET", "back:9"])), "r1");
    server.shutdown(Duration::from_secs(1)).await;
}

/// A wrong password fails the check with Redis's own error (from AUTH,
/// not the NOAUTH the rest of the pipeline gets), while the right one —
/// also as an ACL user with only the commands the probe runs — passes on
/// the same server, its role read.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_password_is_down_with_the_servers_error() {
    let redis = block_in_place(|| server(None));
    assert_eq!(
        block_in_place(|| redis.cli(&[
            "ACL",
            "SETUSER",
            "probe",
            "on",
            ">probe-pw",
            "-@all",
            "+ping",
            "+role"
        ])),
        "OK"
    );
    let dir = tempfile::tempdir().unwrap();
    let wrong = password_file_line(dir.path(), "wrong", "not-the-password");
    let right = password_file_line(dir.path(), "right", PASSWORD);
    let acl = format!(
        "user = \"probe\"\n{}",
        password_file_line(dir.path(), "acl", "probe-pw")
    );
    let toml = [
        listener("wrong", &wrong, &[("r", redis.addr)]),
        listener("right", &right, &[("r", redis.addr)]),
        listener("acl", &acl, &[("r", redis.addr)]),
    ]
    .concat();
    let server = start_server(&toml).await;

    let wrongpass = "WRONGPASS invalid username-password pair or user is disabled.";
    wait_report(&server, "wrong", "r", (Some(wrongpass), None)).await;
    wait_rotation(&server, "wrong", &[]).await;
    wait_report(&server, "right", "r", (None, Some(Role::Primary))).await;
    wait_report(&server, "acl", "r", (None, Some(Role::Primary))).await;
    // Several checks on, nothing changed: the failures are steady.
    let failed = server.checks("wrong", "r").unwrap().1;
    wait_for("more checks", || {
        server.checks("wrong", "r").unwrap().1 >= failed + 3
    })
    .await;
    assert_eq!(
        report(&server, "wrong", "r"),
        (Some(wrongpass.into()), None)
    );
    assert_eq!(server.checks("wrong", "r").unwrap().0, 0, "a check passed");
    assert_eq!(rotation(&server, "right"), ["r"]);
    assert_eq!(rotation(&server, "acl"), ["r"]);
    server.shutdown(Duration::from_secs(1)).await;
}
