//! `kind = "postgres"` against real PostgreSQL clusters started by the
//! tests (see `db/mod.rs`): each authentication method, role checks on a
//! primary and its streaming standby that follow a promotion, and the
//! server's own words as a failed check's reason. Every test also reads the
//! servers' logs: the probes leave no trace of a half-open session there.

mod common;
mod db;

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use common::*;
use db::{HeldSession, PgSetup, Postgres, psql};
use switchyard::config::Role;
use tokio::task::block_in_place;
use tokio::time::Instant;

/// The probe's login (a SCRAM-SHA-256 password; a space in it, which the
/// password file keeps).
const USER: &str = "probe";
const PASSWORD: &str = "s3cret probe";
/// `USER` must log in with SCRAM-SHA-256; everyone else is trusted.
const SCRAM_HBA: &str = "host all probe 127.0.0.1/32 scram-sha-256";

/// Fast checks: a change shows within interval × max(fall, rise) + timeout.
const INTERVAL_MS: u64 = 300;
const TIMEOUT_MS: u64 = 300;
const FALL: u32 = 2;
const RISE: u32 = 2;
const DETECTION: Duration = Duration::from_millis(INTERVAL_MS * 2 + TIMEOUT_MS);
/// Scheduling noise on a loaded 2-core machine.
const SLACK: Duration = Duration::from_millis(1500);

/// Log settings that show how each session went: its login (with the
/// authentication method) and, at DEBUG1, "unexpected EOF on client
/// connection" for a session closed without Terminate.
const LOUD: &[&str] = &["log_connections=on", "log_min_messages=debug1"];

/// A listener named `name` on 127.0.0.1:0 with fast checks of `kind`
/// (and the check fields in `fields`) over `backends`.
fn listener(name: &str, fields: &str, backends: &[(&str, SocketAddr)]) -> String {
    let check = format!(
        "interval = \"{INTERVAL_MS}ms\"\ntimeout = \"{TIMEOUT_MS}ms\"\n\
         fall = {FALL}\nrise = {RISE}\n{fields}"
    );
    checked_listener(name, &check, backends)
}

/// Check fields for a postgres probe as `user` with `password` (if any)
/// read from a file in `dir`.
fn postgres_check(dir: &Path, user: &str, password: Option<&str>, more: &str) -> String {
    let mut s = format!("kind = \"postgres\"\nuser = \"{user}\"\n{more}");
    if let Some(password) = password {
        let name = format!("{user}-{}.password", password.len());
        s += &password_file_line(dir, &name, password);
    }
    s
}

/// Neither log holds what a session cut short leaves: a probe always
/// said goodbye.
fn assert_clean_goodbyes(clusters: &[&Postgres]) {
    for pg in clusters {
        let log = pg.log();
        for trace in [
            "unexpected EOF",
            "could not receive data from client",
            "expected password response",
            "expected SASL response",
            "incomplete startup packet",
            "invalid frontend message",
        ] {
            assert!(!log.contains(trace), "{trace:?} in the log:\n{log}");
        }
    }
}

/// A primary and its streaming standby, a SCRAM login for the probe on
/// both. `role = "primary"` takes only the primary, `"replica"` only the
/// standby, and the other server's check_reason says why. After the
/// standby is promoted and the old primary is stopped, the primary
/// listener sends new sessions to the new primary within the detection
/// bound, and the replica listener has no one left.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn role_checks_over_scram_follow_a_promotion() {
    let (primary, standby) = block_in_place(|| {
        let primary = Postgres::start_with(PgSetup {
            settings: LOUD,
            hba: &[SCRAM_HBA],
        });
        primary.psql(&format!("CREATE ROLE {USER} LOGIN PASSWORD '{PASSWORD}'"));
        let standby = primary.standby(LOUD);
        (primary, standby)
    });
    let mut primary = primary;
    let dir = tempfile::tempdir().unwrap();
    let backends = [("pg1", primary.addr), ("pg2", standby.addr)];
    let check = |role: &str| {
        postgres_check(
            dir.path(),
            USER,
            Some(PASSWORD),
            &format!("database = \"postgres\"\nrole = \"{role}\"\n"),
        )
    };
    let server = start_server(&format!(
        "{}{}",
        listener("rw", &check("primary"), &backends),
        listener("ro", &check("replica"), &backends)
    ))
    .await;
    let (rw, ro) = (
        server.local_addr("rw").unwrap(),
        server.local_addr("ro").unwrap(),
    );

    wait_report(&server, "rw", "pg1", (None, Some(Role::Primary))).await;
    wait_report(
        &server,
        "rw",
        "pg2",
        (Some("role is replica"), Some(Role::Replica)),
    )
    .await;
    wait_report(
        &server,
        "ro",
        "pg1",
        (Some("role is primary"), Some(Role::Primary)),
    )
    .await;
    wait_report(&server, "ro", "pg2", (None, Some(Role::Replica))).await;
    wait_rotation(&server, "rw", &["pg1"]).await;
    wait_rotation(&server, "ro", &["pg2"]).await;
    assert!(!server.backend_state("rw", "pg2").unwrap().is_up());
    assert!(!server.backend_state("ro", "pg1").unwrap().is_up());
    // The probe really logged in with SCRAM, on both servers.
    for pg in [&primary, &standby] {
        let log = pg.log();
        assert!(
            log.contains(&format!(
                "connection authenticated: identity=\"{USER}\" method=scram-sha-256"
            )),
            "no SCRAM login in the log:\n{log}"
        );
    }

    // Real clients: psql through each listener lands where it should.
    block_in_place(|| {
        assert_eq!(psql(rw.port(), "SELECT pg_is_in_recovery()"), "f");
        assert_eq!(psql(ro.port(), "SELECT pg_is_in_recovery()"), "t");
    });
    assert_clean_goodbyes(&[&primary, &standby]);

    // Failover: promote the standby, then the old primary dies.
    block_in_place(|| standby.promote());
    block_in_place(|| primary.stop());
    let stopped = Instant::now();
    wait_for("the primary listener on the new primary", || {
        rotation(&server, "rw") == ["pg2"]
    })
    .await;
    let took = stopped.elapsed();
    assert!(
        took <= DETECTION + SLACK,
        "new primary in rotation after {took:?}, bound {DETECTION:?} + {SLACK:?}"
    );
    let written = block_in_place(|| {
        psql(
            rw.port(),
            "CREATE TABLE after_failover (x int); INSERT INTO after_failover VALUES (1); \
             SELECT pg_is_in_recovery(), count(*) FROM after_failover",
        )
    });
    assert_eq!(written, "f|1", "a write on the new primary");

    wait_report(&server, "rw", "pg1", (Some("connection refused"), None)).await;
    assert_eq!(report(&server, "rw", "pg2"), (None, Some(Role::Primary)));
    wait_report(
        &server,
        "ro",
        "pg2",
        (Some("role is primary"), Some(Role::Primary)),
    )
    .await;
    wait_rotation(&server, "ro", &[]).await;
    assert_clean_goodbyes(&[&primary, &standby]);
}

/// A wrong password: the check fails with the server's message and
/// SQLSTATE as check_reason (and never the password), while a `tcp` check
/// of the same server and a postgres one with the right password pass.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_password_is_down_with_the_servers_message() {
    let pg = block_in_place(|| {
        let pg = Postgres::start_with(PgSetup {
            settings: LOUD,
            hba: &[SCRAM_HBA],
        });
        pg.psql(&format!("CREATE ROLE {USER} LOGIN PASSWORD '{PASSWORD}'"));
        pg
    });
    let dir = tempfile::tempdir().unwrap();
    let wrong = "not the password";
    let backends = [("pg", pg.addr)];
    let server = start_server(&format!(
        "{}{}{}",
        listener(
            "wrong",
            &postgres_check(dir.path(), USER, Some(wrong), "database = \"postgres\"\n"),
            &backends
        ),
        listener("tcp", "kind = \"tcp\"\n", &backends),
        listener(
            "right",
            &postgres_check(
                dir.path(),
                USER,
                Some(PASSWORD),
                "database = \"postgres\"\n"
            ),
            &backends
        ),
    ))
    .await;
    let state = server.backend_state("wrong", "pg").unwrap();
    let reason = format!("FATAL: password authentication failed for user \"{USER}\" (28P01)");
    wait_report(&server, "wrong", "pg", (Some(reason.as_str()), None)).await;
    wait_for("wrong marked down", || !state.is_up()).await;
    wait_rotation(&server, "wrong", &[]).await;
    wait_for("a successful tcp check", || {
        server.checks("tcp", "pg").unwrap().0 >= 2
    })
    .await;
    assert_eq!(report(&server, "tcp", "pg"), (None, None));
    wait_rotation(&server, "tcp", &["pg"]).await;
    wait_report(&server, "right", "pg", (None, Some(Role::Primary))).await;
    wait_rotation(&server, "right", &["pg"]).await;
    // Still failing, check after check, and never up in between.
    let failed = server.checks("wrong", "pg").unwrap().1;
    wait_for("more failed checks", || {
        server.checks("wrong", "pg").unwrap().1 >= failed + 2
    })
    .await;
    assert_eq!(server.checks("wrong", "pg").unwrap().0, 0);
    assert!(!reason.contains(wrong) && !reason.contains(PASSWORD));
    assert_clean_goodbyes(&[&pg]);
}

/// A server with every connection slot taken refuses the probe with
/// "too many clients": down, with that as the reason; one slot freed, it
/// is up again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_out_of_connection_slots_is_down_until_one_frees() {
    let (pg, mut held) = block_in_place(|| {
        let pg = Postgres::start_with(PgSetup {
            settings: &[
                "max_connections=3",
                "superuser_reserved_connections=0",
                "log_min_messages=debug1",
            ],
            hba: &[],
        });
        let held: Vec<HeldSession> = (0..3).map(|_| HeldSession::open(pg.port)).collect();
        (pg, held)
    });
    let dir = tempfile::tempdir().unwrap();
    let server = start_server(&listener(
        "l",
        &postgres_check(dir.path(), db::PG_USER, None, ""),
        &[("pg", pg.addr)],
    ))
    .await;
    let state = server.backend_state("l", "pg").unwrap();
    wait_report(
        &server,
        "l",
        "pg",
        (Some("FATAL: sorry, too many clients already (53300)"), None),
    )
    .await;
    wait_for("marked down", || !state.is_up()).await;

    held.pop(); // one slot free again
    let freed = Instant::now();
    wait_for("marked up", || state.is_up()).await;
    let took = freed.elapsed();
    assert!(
        took <= DETECTION + SLACK,
        "up after {took:?}, bound {DETECTION:?} + {SLACK:?}"
    );
    assert_eq!(report(&server, "l", "pg"), (None, Some(Role::Primary)));
    wait_rotation(&server, "l", &["pg"]).await;
    assert_clean_goodbyes(&[&pg]);
}

/// A server shutting down (smart mode, a session still open) accepts TCP
/// and refuses every login: the postgres check is down with the server's
/// words, while a tcp check of the same server stays up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_shutting_down_is_down_for_postgres_and_up_for_tcp() {
    let (pg, held) = block_in_place(|| {
        let pg = Postgres::start_with(PgSetup {
            settings: LOUD,
            hba: &[],
        });
        let held = HeldSession::open(pg.port);
        (pg, held)
    });
    let dir = tempfile::tempdir().unwrap();
    let backends = [("pg", pg.addr)];
    let server = start_server(&format!(
        "{}{}",
        listener(
            "db",
            &postgres_check(dir.path(), db::PG_USER, None, ""),
            &backends
        ),
        listener("tcp", "kind = \"tcp\"\n", &backends),
    ))
    .await;
    wait_report(&server, "db", "pg", (None, Some(Role::Primary))).await;
    block_in_place(|| pg.begin_smart_shutdown());
    wait_report(
        &server,
        "db",
        "pg",
        (
            Some("FATAL: the database system is shutting down (57P03)"),
            None,
        ),
    )
    .await;
    let state = server.backend_state("db", "pg").unwrap();
    wait_for("marked down", || !state.is_up()).await;
    let tcp_checks = server.checks("tcp", "pg").unwrap();
    wait_for("more tcp checks", || {
        server.checks("tcp", "pg").unwrap().0 >= tcp_checks.0 + 3
    })
    .await;
    assert_eq!(server.checks("tcp", "pg").unwrap().1, 0, "tcp never failed");
    assert!(server.backend_state("tcp", "pg").unwrap().is_up());
    drop(held);
}

/// Each way a server may ask for a password, against a real one: trust,
/// cleartext `password`, `md5` (an md5-stored password) and
/// `scram-sha-256`, each proven by the server's own log line; a
/// `database` that exists is used, one that does not is the reason.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_authentication_method_logs_in() {
    let pg = block_in_place(|| {
        let pg = Postgres::start_with(PgSetup {
            settings: LOUD,
            hba: &[
                "host all pw_user 127.0.0.1/32 password",
                "host all md5_user 127.0.0.1/32 md5",
                "host all scram_user 127.0.0.1/32 scram-sha-256",
            ],
        });
        pg.psql("CREATE ROLE pw_user LOGIN PASSWORD 'pw one'");
        pg.psql("SET password_encryption = 'md5'; CREATE ROLE md5_user LOGIN PASSWORD 'pw two'");
        pg.psql("CREATE ROLE scram_user LOGIN PASSWORD 'pw three'");
        pg.psql("CREATE DATABASE inventory");
        pg
    });
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let backends = [("pg", pg.addr)];
    let server = start_server(&format!(
        "{}{}{}{}{}{}",
        listener(
            "trust",
            &postgres_check(d, db::PG_USER, None, ""),
            &backends
        ),
        listener(
            "password",
            &postgres_check(d, "pw_user", Some("pw one"), "database = \"postgres\"\n"),
            &backends
        ),
        listener(
            "md5",
            &postgres_check(d, "md5_user", Some("pw two"), "database = \"inventory\"\n"),
            &backends
        ),
        listener(
            "scram",
            &postgres_check(
                d,
                "scram_user",
                Some("pw three"),
                "database = \"postgres\"\n"
            ),
            &backends
        ),
        // No password for a server that asks for one.
        listener(
            "nopass",
            &postgres_check(d, "scram_user", None, "database = \"postgres\"\n"),
            &backends
        ),
        listener(
            "nodb",
            &postgres_check(d, db::PG_USER, None, "database = \"missing\"\n"),
            &backends
        ),
    ))
    .await;
    for l in ["trust", "password", "md5", "scram"] {
        wait_report(&server, l, "pg", (None, Some(Role::Primary))).await;
        wait_rotation(&server, l, &["pg"]).await;
    }
    wait_report(
        &server,
        "nopass",
        "pg",
        (
            Some("server asks for a password (SCRAM-SHA-256); no password_file is set"),
            None,
        ),
    )
    .await;
    wait_report(
        &server,
        "nodb",
        "pg",
        (
            Some("FATAL: database \"missing\" does not exist (3D000)"),
            None,
        ),
    )
    .await;
    // The server writes a session's log lines from its own process: wait
    // for them rather than read the log once.
    let mut wanted: Vec<String> = [
        ("pw_user", "password"),
        ("md5_user", "md5"),
        ("scram_user", "scram-sha-256"),
    ]
    .iter()
    .map(|(user, method)| format!("connection authenticated: identity=\"{user}\" method={method}"))
    .collect();
    // The md5 probe's session on its database.
    wanted.push("connection authorized: user=md5_user database=inventory application_name=switchyard-health-check".into());
    eventually("every probe's login in the server log", || {
        let log = pg.log();
        let missing: Vec<&String> = wanted.iter().filter(|l| !log.contains(*l)).collect();
        async move {
            match missing.is_empty() {
                true => Ok(()),
                false => Err(format!("missing {missing:?} in:\n{log}")),
            }
        }
    })
    .await;
    assert_clean_goodbyes(&[&pg]);
}
