//! The command line: `check`, `run`, exit codes, signals, shipped configs.

mod common;

use std::process::Command;

use common::*;
use tokio::io::AsyncWriteExt;

fn check(path: &std::path::Path) -> std::process::Output {
    Command::new(binary())
        .args(["check", "--config"])
        .arg(path)
        .output()
        .unwrap()
}

#[test]
fn every_shipped_config_is_valid() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("config");
    let mut checked = 0;
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "toml") {
            let out = check(&path);
            let stdout = String::from_utf8_lossy(&out.stdout);
            assert!(
                out.status.success(),
                "{}: {}",
                path.display(),
                String::from_utf8_lossy(&out.stderr)
            );
            assert!(stdout.contains("configuration is valid"), "{stdout}");
            assert!(stdout.contains("listener "), "{stdout}");
            checked += 1;
        }
    }
    assert!(
        checked >= 2,
        "only {checked} configs found in {}",
        dir.display()
    );
}

#[test]
fn invalid_config_exits_1_naming_file_line_and_field() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bad.toml");
    std::fs::write(
        &path,
        "[[listener]]\nname = \"web\"\nbind = \"127.0.0.1:0\"\n[[listener.backend]]\nname = \"a\"\naddress = \"127.0.0.1:1\"\nweight = -1\n",
    )
    .unwrap();
    for args in [&["check"][..], &["run"][..]] {
        let out = Command::new(binary())
            .args(args)
            .arg("--config")
            .arg(&path)
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(1), "{args:?}");
        let stderr = String::from_utf8_lossy(&out.stderr);
        let want = format!("{}:7:", path.display());
        assert!(stderr.contains(&want), "{args:?}: {stderr}");
        assert!(stderr.contains("weight"), "{stderr}");
    }

    std::fs::write(
        &path,
        "[[listener]]\nname = \"web\"\nbind = \"127.0.0.1:0\"\nmode = \"tcp\"\n",
    )
    .unwrap();
    let out = check(&path);
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("listener[0].backend"), "{stderr}");
}

#[test]
fn bad_usage_exits_1_and_version_exits_0() {
    let out = Command::new(binary()).arg("frobnicate").output().unwrap();
    assert_eq!(out.status.code(), Some(1));
    let out = Command::new(binary()).arg("--version").output().unwrap();
    assert_eq!(out.status.code(), Some(0));
    assert!(String::from_utf8_lossy(&out.stdout).starts_with("switchyard "));
}

#[test]
fn bind_failure_exits_2_naming_listener_and_address() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("c.toml");
    std::fs::write(
        &path,
        format!("[[listener]]\nname = \"busy\"\nbind = \"{addr}\"\n[[listener.backend]]\nname = \"a\"\naddress = \"127.0.0.1:1\"\n"),
    )
    .unwrap();
    let out = Command::new(binary())
        .args(["run", "--config"])
        .arg(&path)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("listener `busy`"), "{stderr}");
    assert!(stderr.contains(&addr.to_string()), "{stderr}");
}

#[tokio::test]
async fn daemon_proxies_and_stops_cleanly_on_sigterm() {
    let (one, two) = (
        NamedBackend::start("one").await,
        NamedBackend::start("two").await,
    );
    let mut daemon = Daemon::start(&format!(
        "[global]\nshutdown_timeout = \"10s\"\n{}",
        listener_toml("roundrobin", "", &[b("one", one.addr), b("two", two.addr)])
    ));
    let proxy = daemon.addr("l");
    let first = connect_named(proxy).await.backend;
    let second = connect_named(proxy).await.backend;
    assert_eq!((first.as_str(), second.as_str()), ("one", "two"));

    // An open session survives the stop signal until it ends by itself.
    let mut open = connect_named(proxy).await;
    daemon.signal("TERM");
    wait_for_refused(proxy).await;
    open.stream.write_all(b"bye").await.unwrap();
    let mut echo = [0u8; 3];
    tokio::io::AsyncReadExt::read_exact(&mut open.stream, &mut echo)
        .await
        .unwrap();
    assert_eq!(&echo, b"bye");
    drop(open);
    assert_eq!(
        tokio::task::spawn_blocking(move || daemon.wait_exit())
            .await
            .unwrap(),
        0
    );
}

fn cli(args: &[&str]) -> (Option<i32>, String, String) {
    let out = Command::new(binary()).args(args).output().unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// `switchyard status` / `state` run as separate processes against the
/// real daemon: the table, the JSON, exit codes, and errors that say what
/// to do.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_and_state_commands_drive_the_running_daemon() {
    let dir = tempfile::tempdir().unwrap();
    let token_file = dir.path().join("token");
    std::fs::write(&token_file, "cli-t0ken\n").unwrap();
    let wrong_token = dir.path().join("wrong");
    std::fs::write(&wrong_token, "nope\n").unwrap();
    let live = NamedBackend::start("live").await;
    let dead = NamedBackend::start("dead").await;
    dead.stop();
    let fast = "[listener.health_check]\ninterval = \"300ms\"\ntimeout = \"200ms\"\n";
    let admin_table = |bind: &str| {
        format!(
            "[admin]\nbind = \"{bind}\"\ntoken_file = \"{}\"\n{}{fast}",
            token_file.display(),
            listener_toml(
                "roundrobin",
                "",
                &[b("live", live.addr), b("dead", dead.addr)]
            )
        )
    };
    let d = Daemon::start(&admin_table("127.0.0.1:0"));
    let admin = d.admin.unwrap();
    let url = format!("http://{admin}");
    // A config naming the endpoint's real address: `state` and `status`
    // take the URL and the token from its [admin] when not given.
    let config = dir.path().join("switchyard.toml");
    std::fs::write(&config, admin_table(&admin.to_string())).unwrap();
    let config = config.to_str().unwrap();

    let (code, table, stderr) = eventually_some("dead shown down", || async {
        let (code, table, stderr) = cli(&["status", "--admin", &url]);
        table
            .contains("(connection refused)")
            .then_some((code, table, stderr))
    })
    .await;
    assert_eq!(code, Some(0), "one usable backend: {stderr}");
    assert!(
        !table.contains('\x1b'),
        "colour only on a terminal:\n{table}"
    );
    let lines: Vec<&str> = table.lines().collect();
    assert!(lines[0].starts_with("l 127.0.0.1:"), "{table}");
    assert!(lines[0].contains("(tcp, roundrobin)"), "{table}");
    let columns: Vec<&str> = lines[1].split_whitespace().collect();
    assert_eq!(
        columns,
        [
            "BACKEND", "ADDRESS", "HEALTH", "ADMIN", "ROLE", "ACTIVE", "TOTAL", "ERRORS"
        ]
    );
    let row = |name: &str| -> Vec<String> {
        let line = lines
            .iter()
            .find(|l| l.split_whitespace().next() == Some(name))
            .unwrap_or_else(|| panic!("no row {name} in\n{table}"));
        line.split_whitespace().map(str::to_owned).collect()
    };
    assert_eq!(row("live")[1], live.addr.to_string());
    assert_eq!(row("live")[2..5], ["up", "ready", "-"]);
    assert_eq!(row("dead")[2..5], ["down", "ready", "-"]);

    let (code, json, _) = cli(&["status", "--json", "--admin", &url]);
    assert_eq!(code, Some(0));
    let doc: serde_json::Value = serde_json::from_str(&json).unwrap();
    assert_eq!(doc["listeners"][0]["name"], "l");
    assert_eq!(doc["admin"]["token_required"], true);

    // Without a token, with a wrong one, for a backend that is not there.
    let (code, _, stderr) = cli(&["state", "l", "live", "drain", "--admin", &url]);
    assert_eq!(code, Some(1), "{stderr}");
    assert!(stderr.contains("no token given"), "{stderr}");
    assert!(stderr.contains("--token-file"), "{stderr}");
    let wrong = wrong_token.to_str().unwrap();
    let (code, _, stderr) = cli(&[
        "state",
        "l",
        "live",
        "drain",
        "--admin",
        &url,
        "--token-file",
        wrong,
    ]);
    assert_eq!(code, Some(1), "{stderr}");
    assert!(stderr.contains("wrong token"), "{stderr}");
    let (code, _, stderr) = cli(&["state", "l", "nope", "drain", "--config", config]);
    assert_eq!(code, Some(1), "{stderr}");
    assert!(
        stderr.contains("no backend `nope` in listener `l`"),
        "{stderr}"
    );
    assert!(stderr.contains("switchyard status"), "{stderr}");
    let (code, _, stderr) = cli(&["state", "l", "live", "sleepy", "--config", config]);
    assert_eq!(code, Some(1), "{stderr}");
    assert!(stderr.contains("ready, drain, maint"), "{stderr}");
    assert_eq!(
        admin_state(admin).await,
        "ready",
        "refused changes changed it"
    );

    // URL and token from the config file: drain the only backend that was
    // up; now no listener has a usable backend and `status` exits 1.
    let (code, stdout, stderr) = cli(&["state", "l", "live", "drain", "--config", config]);
    assert_eq!(code, Some(0), "{stderr}");
    assert_eq!(stdout, "l/live: drain\n");
    assert_eq!(admin_state(admin).await, "drain");
    let (code, table, stderr) = cli(&["status", "--config", config]);
    assert_eq!(code, Some(1), "{table}{stderr}");
    assert!(table.contains("NO USABLE BACKEND"), "{table}");
    assert_eq!(stderr, "listener l has no usable backend\n");
    assert_eq!(row_of(&table, "live")[3], "drain");

    let token = token_file.to_str().unwrap();
    let (code, stdout, stderr) = cli(&[
        "state",
        "l",
        "live",
        "ready",
        "--admin",
        &url,
        "--token-file",
        token,
    ]);
    assert_eq!(code, Some(0), "{stderr}");
    assert_eq!(stdout, "l/live: ready\n");
    assert_eq!(cli(&["status", "--admin", &url]).0, Some(0));
}

fn row_of(table: &str, name: &str) -> Vec<String> {
    table
        .lines()
        .find(|l| l.split_whitespace().next() == Some(name))
        .unwrap_or_else(|| panic!("no row {name} in\n{table}"))
        .split_whitespace()
        .map(str::to_owned)
        .collect()
}

#[test]
fn status_without_a_daemon_says_what_to_do_and_exits_2() {
    // A port nothing listens on: bound, then closed.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let url = format!("http://127.0.0.1:{port}");
    for args in [
        vec!["status", "--admin", url.as_str()],
        vec!["state", "l", "a", "drain", "--admin", url.as_str()],
    ] {
        let (code, _, stderr) = cli(&args);
        assert_eq!(code, Some(2), "{args:?}: {stderr}");
        assert!(
            stderr.contains(&format!("cannot reach the admin endpoint at {url}")),
            "{stderr}"
        );
        assert!(stderr.contains("is switchyard running"), "{stderr}");
    }
    let (code, _, stderr) = cli(&["status", "--admin", "https://127.0.0.1:9900"]);
    assert_eq!(code, Some(1), "{stderr}");
    assert!(stderr.contains("plain http://"), "{stderr}");
}

#[test]
fn completions_and_man_page_come_from_the_cli_definition() {
    for shell in ["bash", "zsh", "fish"] {
        let (code, script, stderr) = cli(&["completions", shell]);
        assert_eq!(code, Some(0), "{shell}: {stderr}");
        // (fish spells options `-l admin`, the others `--admin`.)
        for word in [
            "run",
            "check",
            "status",
            "state",
            "admin",
            "token-file",
            "drain",
        ] {
            assert!(script.contains(word), "{shell} completion lacks {word}");
        }
    }
    let (code, man, stderr) = cli(&["man"]);
    assert_eq!(code, Some(0), "{stderr}");
    assert!(man.contains(".TH switchyard 1"), "{man}");
    for word in ["run", "check", "status", "state"] {
        assert!(man.contains(word), "man page lacks {word}");
    }
}

/// Backend `live`'s admin state, as the admin API reports it.
async fn admin_state(admin: std::net::SocketAddr) -> String {
    let (status, body) = http(
        admin,
        "GET",
        "/api/v1/listeners/l/backends/live/state",
        &[],
        "",
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let doc: serde_json::Value = serde_json::from_str(&body).unwrap();
    doc["admin_state"].as_str().expect("admin_state").to_owned()
}
