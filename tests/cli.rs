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
