//! `kind = "mysql"` against a real MariaDB server started by the tests
//! (see `db/mod.rs`): the greeting alone, a mysql_native_password login,
//! and `role = "primary"` following `read_only` both ways, with the
//! server's own words as a failed check's reason.

mod common;
mod db;

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use common::*;
use db::{Mariadb, mariadb_tcp};
use switchyard::config::Role;
use tokio::net::TcpListener;
use tokio::task::block_in_place;
use tokio::time::Instant;

/// The probe's login.
const USER: &str = "probe";
const PASSWORD: &str = "s3cret mysql";

/// Fast checks: a flip shows within interval × max(fall, rise) + timeout.
const INTERVAL_MS: u64 = 200;
const TIMEOUT_MS: u64 = 150;
const FALL: u32 = 2;
const RISE: u32 = 2;
const DETECTION: Duration = Duration::from_millis(INTERVAL_MS * 2 + TIMEOUT_MS);
/// Scheduling noise on a loaded 2-core machine.
const SLACK: Duration = Duration::from_millis(1500);

/// A listener named `name` with fast mysql checks (`fields` added to its
/// `[listener.health_check]`) over `backends`.
fn listener(name: &str, fields: &str, backends: &[(&str, SocketAddr)]) -> String {
    let check = format!(
        "kind = \"mysql\"\ninterval = \"{INTERVAL_MS}ms\"\ntimeout = \"{TIMEOUT_MS}ms\"\n\
         fall = {FALL}\nrise = {RISE}\n{fields}"
    );
    checked_listener(name, &check, backends)
}

/// `user` and `password_file` lines, the file written in `dir`.
fn login(dir: &Path, name: &str, password: &str) -> String {
    format!(
        "user = \"{USER}\"\n{}",
        password_file_line(dir, name, password)
    )
}

/// A port that accepts and closes each connection at once.
async fn slammer() -> (SocketAddr, tokio::task::JoinHandle<()>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let task = tokio::spawn(async move {
        while let Ok((s, _)) = listener.accept().await {
            drop(s);
        }
    });
    (addr, task)
}

/// Without `user` the greeting is the check: a real server passes (no
/// role is read), a port that closes at once fails.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_greeting_passes_and_a_port_that_closes_at_once_fails() {
    let db = block_in_place(Mariadb::start);
    let (closer, closer_task) = slammer().await;
    let server = start_server(&listener("l", "", &[("db", db.addr), ("closer", closer)])).await;

    wait_rotation(&server, "l", &["db"]).await;
    wait_report(
        &server,
        "l",
        "closer",
        (Some("server closed the connection"), None),
    )
    .await;
    wait_for("three checks of db", || {
        server.checks("l", "db").unwrap().0 >= 3
    })
    .await;
    assert_eq!(report(&server, "l", "db"), (None, None));
    assert_eq!(
        server.checks("l", "db").unwrap().1,
        0,
        "a check of db failed"
    );
    assert!(!server.backend_state("l", "closer").unwrap().is_up());
    server.shutdown(Duration::from_secs(1)).await;
    closer_task.abort();
}

/// A mysql_native_password account logs in, and `role = "primary"`
/// follows `read_only`: set, the server is down with `role is replica`
/// within interval × fall + slack; cleared, it is back. A wrong password
/// is down with the server's own error meanwhile.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_native_login_and_the_primary_role_follow_read_only() {
    let db = block_in_place(Mariadb::start);
    block_in_place(|| {
        db.sql(&format!(
            "CREATE USER '{USER}'@'%' IDENTIFIED VIA mysql_native_password \
             USING PASSWORD('{PASSWORD}')"
        ))
    });
    assert_eq!(
        block_in_place(|| db.sql(&format!(
            "SELECT plugin FROM mysql.user WHERE user = '{USER}'"
        ))),
        "mysql_native_password"
    );
    let dir = tempfile::tempdir().unwrap();
    let primary = format!(
        "role = \"primary\"\n{}",
        login(dir.path(), "right", PASSWORD)
    );
    let wrong = login(dir.path(), "wrong", "not the password");
    let toml = [
        listener("l", &primary, &[("db", db.addr)]),
        listener("wrong", &wrong, &[("db", db.addr)]),
    ]
    .concat();
    let server = start_server(&toml).await;
    let proxy = server.local_addr("l").unwrap();

    wait_report(&server, "l", "db", (None, Some(Role::Primary))).await;
    wait_rotation(&server, "l", &["db"]).await;
    let denied = format!(
        "ERROR 1045 (28000): Access denied for user '{USER}'@'127.0.0.1' (using password: YES)"
    );
    wait_report(&server, "wrong", "db", (Some(&denied), None)).await;
    wait_rotation(&server, "wrong", &[]).await;
    // A client through the balancer reaches the server.
    let port = block_in_place(|| mariadb_tcp(proxy.port(), USER, PASSWORD, "SELECT @@port"));
    assert_eq!(port, db.port.to_string());

    // Read-only: a replica now.
    let flipped = Instant::now();
    block_in_place(|| db.sql("SET GLOBAL read_only = 1"));
    wait_rotation(&server, "l", &[]).await;
    let took = flipped.elapsed();
    assert!(
        took <= DETECTION + SLACK,
        "down after {took:?}, bound {DETECTION:?} + {SLACK:?}"
    );
    wait_report(
        &server,
        "l",
        "db",
        (Some("role is replica"), Some(Role::Replica)),
    )
    .await;

    // Writable again: back after `rise` checks.
    let flipped = Instant::now();
    block_in_place(|| db.sql("SET GLOBAL read_only = 0"));
    wait_rotation(&server, "l", &["db"]).await;
    let took = flipped.elapsed();
    assert!(
        took <= DETECTION + SLACK,
        "up after {took:?}, bound {DETECTION:?} + {SLACK:?}"
    );
    wait_report(&server, "l", "db", (None, Some(Role::Primary))).await;
    assert_eq!(
        report(&server, "wrong", "db"),
        (Some(denied.clone()), None),
        "the wrong password stays down"
    );

    // The probes' sessions all ended with COM_QUIT: the server counts no
    // client that went away without one. (A refused login is counted
    // apart, in Aborted_connects.)
    let aborted = block_in_place(|| {
        db.sql(
            "SELECT VARIABLE_VALUE FROM information_schema.GLOBAL_STATUS \
                WHERE VARIABLE_NAME = 'ABORTED_CLIENTS'",
        )
    });
    assert_eq!(aborted, "0", "sessions ended without COM_QUIT");
    server.shutdown(Duration::from_secs(1)).await;
}
