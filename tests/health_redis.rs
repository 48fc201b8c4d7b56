//! `kind = "redis"` against real Redis servers with `requirepass`: a
//! listener with `role = "primary"` follows `REPLICAOF` switched both ways,
//! and a wrong password is down with the server's own error.

mod common;
mod db;

use std::path::Path;

use common::*;
use db::{Redis, auth_args, redis_cli};
use switchyard::config::Role;
use tokio::task::block_in_place;

const PASSWORD: &str = "redis check pass";

/// One listener "l" with fast redis checks over `backends`.
fn config(dir: &Path, password: &str, role: &str, backends: &[(&str, &Redis)]) -> String {
    let file = dir.join(format!("pass-{}", password.len()));
    std::fs::write(&file, format!("{password}\n")).unwrap();
    let mut s = format!(
        "[[listener]]\nname = \"l\"\nbind = \"127.0.0.1:0\"\n\
         [listener.health_check]\nkind = \"redis\"\n{role}password_file = \"{}\"\n\
         interval = \"200ms\"\ntimeout = \"200ms\"\nfall = 2\nrise = 2\n",
        file.display()
    );
    for (name, r) in backends {
        s += &format!(
            "[[listener.backend]]\nname = \"{name}\"\naddress = \"{}\"\n",
            r.addr
        );
    }
    s
}

/// The port of the server a new connection through the proxy reaches.
fn port_through(proxy: u16) -> u16 {
    let auth = auth_args(Some(PASSWORD));
    let out = redis_cli(
        proxy,
        &[auth.as_slice(), &["CONFIG", "GET", "port"]].concat(),
    );
    out.lines().nth(1).unwrap().parse().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_primary_listener_follows_replicaof_both_ways() {
    let (a, b_) = block_in_place(|| {
        let a = Redis::start_with(&[], Some(PASSWORD));
        let port = a.port.to_string();
        let b_ = Redis::start_with(&["--replicaof", "127.0.0.1", &port], Some(PASSWORD));
        (a, b_)
    });
    let dir = tempfile::tempdir().unwrap();
    let server = start_server(&config(
        dir.path(),
        PASSWORD,
        "role = \"primary\"\n",
        &[("a", &a), ("b", &b_)],
    ))
    .await;
    let proxy = server.local_addr("l").unwrap().port();
    wait_report(&server, "l", "a", (None, Some(Role::Primary))).await;
    wait_report(
        &server,
        "l",
        "b",
        (Some("role is replica"), Some(Role::Replica)),
    )
    .await;
    wait_rotation(&server, "l", &["a"]).await;
    block_in_place(|| {
        for _ in 0..4 {
            assert_eq!(port_through(proxy), a.port);
        }
    });

    // b is promoted, a follows it.
    block_in_place(|| {
        assert_eq!(b_.cli(&["REPLICAOF", "NO", "ONE"]), "OK");
        let port = b_.port.to_string();
        assert_eq!(a.cli(&["REPLICAOF", "127.0.0.1", &port]), "OK");
    });
    wait_rotation(&server, "l", &["b"]).await;
    assert_eq!(
        report(&server, "l", "a"),
        (Some("role is replica".into()), Some(Role::Replica))
    );
    block_in_place(|| {
        for _ in 0..4 {
            assert_eq!(port_through(proxy), b_.port);
        }
        let auth = auth_args(Some(PASSWORD));
        let set = [auth.as_slice(), &["SET", "written", "after-switch"]].concat();
        assert_eq!(redis_cli(proxy, &set), "OK", "the new primary takes writes");
        assert_eq!(b_.cli(&["GET", "written"]), "after-switch");
    });

    // And back.
    block_in_place(|| {
        assert_eq!(a.cli(&["REPLICAOF", "NO", "ONE"]), "OK");
        let port = a.port.to_string();
        assert_eq!(b_.cli(&["REPLICAOF", "127.0.0.1", &port]), "OK");
    });
    wait_rotation(&server, "l", &["a"]).await;
    block_in_place(|| assert_eq!(port_through(proxy), a.port));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_password_is_down_with_the_servers_error() {
    let r = block_in_place(|| Redis::start_with(&[], Some(PASSWORD)));
    let dir = tempfile::tempdir().unwrap();
    let server = start_server(&config(dir.path(), "not the password", "", &[("r", &r)])).await;
    let state = server.backend_state("l", "r").unwrap();
    wait_for("marked down", || !state.is_up()).await;
    let (reason, role) = report(&server, "l", "r");
    let reason = reason.expect("a reason");
    assert!(reason.starts_with("WRONGPASS"), "{reason}");
    assert!(
        !reason.contains("not the password"),
        "no password in the reason"
    );
    assert_eq!(role, None);

    // The right password: up, and no role asked for means any role passes.
    let good = start_server(&config(dir.path(), PASSWORD, "", &[("r", &r)])).await;
    wait_report(&good, "l", "r", (None, Some(Role::Primary))).await;
    assert!(good.backend_state("l", "r").unwrap().is_up());
}
