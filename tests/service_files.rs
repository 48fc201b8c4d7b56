//! The service files under `deploy/`: the systemd unit (checked with
//! `systemd-analyze verify` and `systemd-analyze security`), the install
//! script (run against a temporary root with DESTDIR) and the keepalived
//! health check (run against a tiny HTTP server).
//!
//! Needs `systemd-analyze` (Debian package `systemd`), `bash` and `curl`.
//! `bash scripts/test.sh` installs what is missing; a missing tool fails the
//! test with a message saying so, it never skips it.

use std::collections::BTreeMap;
use std::io::{ErrorKind, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// The exposure level `systemd-analyze security --offline=true` gives
/// deploy/switchyard.service with systemd 252 (Debian 12): 1.4 "OK". What
/// remains is what a network daemon needs (internet sockets, the host's
/// network, no IP allow-list, CAP_NET_BIND_SERVICE) plus the host's root
/// directory and user namespace. Lower it here when the unit gets tighter;
/// never raise it to make a weaker unit pass.
const MAX_EXPOSURE: f64 = 1.4;

fn repo() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn binary() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_switchyard"))
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// Runs `cmd`; a program that is not installed fails the test with a
/// message naming the Debian package and `scripts/test.sh`.
fn run(cmd: &mut Command, package: &str) -> Output {
    let program = cmd.get_program().to_string_lossy().into_owned();
    match cmd.output() {
        Ok(out) => out,
        Err(e) if e.kind() == ErrorKind::NotFound => panic!(
            "`{program}` not found on PATH: these tests need it. Run the tests with \
             `bash scripts/test.sh`, which installs it (Debian package `{package}`: \
             apt-get install -y {package})"
        ),
        Err(e) => panic!("could not run `{program}`: {e}"),
    }
}

fn text(out: &Output) -> String {
    format!(
        "--- stdout\n{}--- stderr\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

// --- systemd unit -----------------------------------------------------------

/// A copy of the unit, as `switchyard.service` in a temp dir, with
/// /usr/bin/switchyard replaced by the binary cargo built: `verify` checks
/// that every Exec*= program exists and is executable.
fn unit_copy() -> (tempfile::TempDir, PathBuf) {
    let bin = binary();
    let bin = bin.to_str().expect("binary path is UTF-8");
    assert!(
        !bin.contains(char::is_whitespace),
        "the binary path {bin:?} contains whitespace, which a unit's ExecStart= cannot take \
         unquoted; use a CARGO_TARGET_DIR without spaces"
    );
    // '%' starts a specifier in unit files.
    let bin = bin.replace('%', "%%");
    let unit = read(&repo().join("deploy/switchyard.service"));
    assert!(
        unit.contains("/usr/bin/switchyard run --config /etc/switchyard/switchyard.toml"),
        "the unit no longer runs /usr/bin/switchyard: update this test"
    );
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("switchyard.service");
    std::fs::write(&path, unit.replace("/usr/bin/switchyard", &bin)).unwrap();
    (dir, path)
}

#[test]
fn unit_passes_systemd_analyze_verify() {
    let (_dir, unit) = unit_copy();
    // --man=no: the unit has no Documentation= man page to look for.
    let out = run(
        Command::new("systemd-analyze")
            .args(["verify", "--man=no"])
            .arg(&unit),
        "systemd",
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "systemd-analyze verify {} failed ({}):\n{}",
        unit.display(),
        out.status,
        text(&out)
    );
    // verify also loads the host's units our unit refers to
    // (network-online.target, multi-user.target); a complaint about those is
    // the host's business. Anything about this unit is a failure.
    let ours: Vec<&str> = stderr
        .lines()
        .filter(|l| l.contains("switchyard") || l.contains(&*unit.to_string_lossy()))
        .collect();
    assert!(
        ours.is_empty(),
        "systemd-analyze verify warns about the unit:\n{}\n\nfull output:\n{}",
        ours.join("\n"),
        text(&out)
    );
}

#[test]
fn unit_exposure_level_stays_low() {
    let (_dir, unit) = unit_copy();
    // --offline=true (systemd >= 250) analyses the file itself rather than a
    // loaded unit, so no running systemd is needed.
    let out = run(
        Command::new("systemd-analyze")
            .args(["security", "--offline=true"])
            .arg(&unit),
        "systemd",
    );
    assert!(
        out.status.success(),
        "systemd-analyze security failed ({}):\n{}",
        out.status,
        text(&out)
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    // "→ Overall exposure level for switchyard.service: 1.4 OK 🙂"
    let line = stdout
        .lines()
        .find(|l| l.contains("Overall exposure level for switchyard.service"))
        .unwrap_or_else(|| panic!("no overall exposure level in:\n{}", text(&out)));
    let score: f64 = line
        .rsplit_once(": ")
        .and_then(|(_, rest)| rest.split_whitespace().next())
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("cannot parse the exposure level in {line:?}"));
    assert!(
        score <= MAX_EXPOSURE + 1e-9,
        "exposure level {score} is above {MAX_EXPOSURE}: the unit lost some hardening\n{stdout}"
    );
}

/// Parses the few duration forms used here: "45s", "2min", "1m", "500ms".
fn seconds(s: &str) -> f64 {
    let s = s.trim().trim_matches('"');
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (n, unit) = s.split_at(split);
    let n: f64 = n.parse().unwrap_or_else(|_| panic!("bad duration {s:?}"));
    match unit {
        "ms" => n / 1000.0,
        "" | "s" => n,
        "m" | "min" => n * 60.0,
        "h" => n * 3600.0,
        _ => panic!("bad duration {s:?}"),
    }
}

/// A unit setting, e.g. `setting(unit, "TimeoutStopSec")` → "45s".
fn settings<'a>(unit: &'a str, key: &str) -> Vec<&'a str> {
    unit.lines()
        .filter_map(|l| l.trim().strip_prefix(key)?.strip_prefix('='))
        .collect()
}

#[test]
fn unit_stop_timeout_exceeds_shutdown_timeout() {
    let unit = read(&repo().join("deploy/switchyard.service"));
    let stop = settings(&unit, "TimeoutStopSec");
    assert_eq!(stop.len(), 1, "one TimeoutStopSec= expected");
    let stop = seconds(stop[0]);
    // The daemon's default shutdown_timeout and the one in the config that
    // install.sh installs: systemd must not SIGKILL a draining daemon.
    let config = read(&repo().join("config/switchyard.toml"));
    let shipped = config
        .lines()
        .find_map(|l| l.trim().strip_prefix("shutdown_timeout"))
        .map(|rest| {
            seconds(
                rest.trim_start()
                    .trim_start_matches('=')
                    .split('#')
                    .next()
                    .unwrap(),
            )
        })
        .unwrap_or(30.0);
    for grace in [30.0, shipped] {
        assert!(
            stop > grace,
            "TimeoutStopSec ({stop}s) must exceed shutdown_timeout ({grace}s)"
        );
    }
    // The watchdog and the reload that checks the file first.
    assert_eq!(settings(&unit, "Type"), ["notify"]);
    assert_eq!(settings(&unit, "WatchdogSec"), ["30s"]);
    assert_eq!(
        settings(&unit, "ExecReload"),
        [
            "/usr/bin/switchyard check --config /etc/switchyard/switchyard.toml",
            "/bin/kill -HUP $MAINPID"
        ]
    );
}

// --- install.sh -----------------------------------------------------------

#[derive(Debug, PartialEq, Eq)]
struct Entry {
    dir: bool,
    mode: u32,
    mtime_ns: i128,
    content: Vec<u8>,
}

/// Every file and directory under `root`, with mode, mtime and content.
fn snapshot(root: &Path) -> BTreeMap<PathBuf, Entry> {
    fn walk(root: &Path, dir: &Path, out: &mut BTreeMap<PathBuf, Entry>) {
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            let meta = std::fs::symlink_metadata(&path).unwrap();
            let rel = path.strip_prefix(root).unwrap().to_path_buf();
            let e = Entry {
                dir: meta.is_dir(),
                mode: meta.permissions().mode() & 0o7777,
                mtime_ns: meta.mtime() as i128 * 1_000_000_000 + meta.mtime_nsec() as i128,
                content: if meta.is_file() {
                    std::fs::read(&path).unwrap()
                } else {
                    Vec::new()
                },
            };
            out.insert(rel, e);
            if meta.is_dir() {
                walk(root, &path, out);
            }
        }
    }
    let mut out = BTreeMap::new();
    walk(root, root, &mut out);
    out
}

fn install(destdir: &Path, extra_env: &[(&str, &str)]) -> Output {
    let mut cmd = Command::new("bash");
    cmd.arg(repo().join("deploy/install.sh"))
        .arg("--binary")
        .arg(binary())
        .env("DESTDIR", destdir)
        .env_remove("PREFIX")
        .env_remove("SYSTEMD_UNIT_DIR");
    for (k, v) in extra_env {
        cmd.env(k, v);
    }
    let out = run(&mut cmd, "bash");
    assert!(
        out.status.success(),
        "install.sh failed ({}):\n{}",
        out.status,
        text(&out)
    );
    out
}

fn mode(path: &Path) -> u32 {
    std::fs::metadata(path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .permissions()
        .mode()
        & 0o7777
}

#[test]
fn install_script_into_a_temp_root() {
    let root = tempfile::tempdir().unwrap();
    let root = root.path();
    let out = install(root, &[]);
    let stdout = String::from_utf8_lossy(&out.stdout);

    let bin = root.join("usr/bin/switchyard");
    let unit = root.join("lib/systemd/system/switchyard.service");
    let config = root.join("etc/switchyard/switchyard.toml");
    let dist = root.join("etc/switchyard/switchyard.toml.dist");
    let shipped_config = std::fs::read(repo().join("config/switchyard.toml")).unwrap();

    assert_eq!(mode(&bin), 0o755, "{}", bin.display());
    assert_eq!(
        std::fs::read(&bin).unwrap(),
        std::fs::read(binary()).unwrap()
    );
    assert_eq!(mode(&unit), 0o644, "{}", unit.display());
    assert_eq!(
        read(&unit),
        read(&repo().join("deploy/switchyard.service")),
        "with PREFIX=/usr the unit is installed as shipped"
    );
    assert_eq!(mode(&config), 0o644);
    assert_eq!(std::fs::read(&config).unwrap(), shipped_config);
    assert_eq!(mode(&dist), 0o644);
    assert_eq!(std::fs::read(&dist).unwrap(), shipped_config);
    assert_eq!(mode(&root.join("etc/switchyard")), 0o755);

    // The keepalived hooks, where keepalived-lb*.conf expect them.
    for conf in ["keepalived-lb1.conf", "keepalived-lb2.conf"] {
        let text = read(&repo().join("deploy/keepalived").join(conf));
        let scripts: Vec<&str> = text
            .split('"')
            .filter_map(|s| s.split_whitespace().next())
            .filter(|s| s.starts_with("/usr/lib/switchyard/"))
            .collect();
        assert!(
            scripts.len() >= 4,
            "{conf}: expected check and notify scripts"
        );
        for script in scripts {
            let installed = root.join(script.trim_start_matches('/'));
            assert_eq!(mode(&installed), 0o755, "{conf} runs {script}");
            let name = Path::new(script).file_name().unwrap();
            assert_eq!(
                std::fs::read(&installed).unwrap(),
                std::fs::read(repo().join("deploy/keepalived").join(name)).unwrap()
            );
        }
    }

    // With DESTDIR: no user created, no systemctl; says what it would do.
    assert!(stdout.contains("useradd --system"), "{stdout}");
    assert!(
        stdout.contains("skipped systemctl daemon-reload"),
        "{stdout}"
    );
    assert!(!root.join("etc/passwd").exists());

    // The installed binary works with the installed config.
    let out = run(Command::new(&bin).arg("--version"), "switchyard");
    assert!(out.status.success(), "{}", text(&out));
    assert!(String::from_utf8_lossy(&out.stdout).contains("switchyard"));
    let out = run(
        Command::new(&bin).args(["check", "--config"]).arg(&config),
        "switchyard",
    );
    assert!(out.status.success(), "{}", text(&out));

    // A second run changes nothing: no content, mode or mtime.
    let before = snapshot(root);
    let out = install(root, &[]);
    let after = snapshot(root);
    assert!(
        before == after,
        "a second run changed files:\n{}",
        text(&out)
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(!stdout.contains("installed:"), "{stdout}");
    assert!(!stdout.contains("updated:"), "{stdout}");

    // An operator's config is never overwritten; the .dist copy is.
    let mine = format!(
        "{}\n# edited by the operator\n",
        String::from_utf8_lossy(&shipped_config)
    );
    std::fs::write(&config, &mine).unwrap();
    std::fs::write(&dist, "stale").unwrap();
    let out = install(root, &[]);
    assert_eq!(read(&config), mine, "{}", text(&out));
    assert_eq!(std::fs::read(&dist).unwrap(), shipped_config);
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("kept existing config"),
        "{}",
        text(&out)
    );
}

#[test]
fn install_script_follows_prefix() {
    let root = tempfile::tempdir().unwrap();
    let root = root.path();
    install(root, &[("PREFIX", "/usr/local")]);
    assert_eq!(mode(&root.join("usr/local/bin/switchyard")), 0o755);
    assert_eq!(
        mode(&root.join("usr/local/lib/switchyard/check-switchyard.sh")),
        0o755
    );
    let unit = read(&root.join("lib/systemd/system/switchyard.service"));
    assert!(
        unit.contains("ExecStart=/usr/local/bin/switchyard run --config"),
        "{unit}"
    );
    assert!(!unit.contains("/usr/bin/switchyard"), "{unit}");
}

#[test]
fn install_script_refuses_a_missing_binary() {
    let root = tempfile::tempdir().unwrap();
    let out = run(
        Command::new("bash")
            .arg(repo().join("deploy/install.sh"))
            .args(["--binary", "/nonexistent/switchyard"])
            .env("DESTDIR", root.path()),
        "bash",
    );
    assert!(!out.status.success(), "{}", text(&out));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("/nonexistent/switchyard"),
        "{}",
        text(&out)
    );
    assert!(std::fs::read_dir(root.path()).unwrap().next().is_none());
}

// --- keepalived check script ----------------------------------------------

/// A minimal HTTP server on 127.0.0.1: answers `status` on GET /readyz and
/// 404 elsewhere, or never answers (`status` = None). Records request paths.
fn http_server(status: Option<u16>) -> (u16, Arc<Mutex<Vec<String>>>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let paths = Arc::new(Mutex::new(Vec::new()));
    let seen = paths.clone();
    std::thread::spawn(move || {
        let mut held: Vec<TcpStream> = Vec::new();
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { continue };
            stream
                .set_read_timeout(Some(Duration::from_secs(5)))
                .unwrap();
            let mut head = Vec::new();
            let mut buf = [0u8; 1024];
            while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                match stream.read(&mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => head.extend_from_slice(&buf[..n]),
                }
            }
            let head = String::from_utf8_lossy(&head).into_owned();
            let path = head.split_whitespace().nth(1).unwrap_or("").to_string();
            seen.lock().unwrap().push(path.clone());
            let Some(status) = status else {
                held.push(stream); // hang: never answer, never close
                continue;
            };
            let code = if path == "/readyz" { status } else { 404 };
            let body = format!("{code}\n");
            let _ = write!(
                stream,
                "HTTP/1.1 {code} X\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
        }
    });
    (port, paths)
}

fn check_script(url: Option<&str>, args: &[&str]) -> (Output, Duration) {
    let script = repo().join("deploy/keepalived/check-switchyard.sh");
    assert_eq!(
        mode(&script) & 0o111,
        0o111,
        "{} must be executable",
        script.display()
    );
    // curl is what the script needs; say how to get it if it is missing.
    let out = run(Command::new("curl").arg("--version"), "curl");
    assert!(out.status.success(), "{}", text(&out));

    let mut cmd = Command::new(&script);
    cmd.args(args)
        .env("SWITCHYARD_READYZ_TIMEOUT", "1")
        .env_remove("SWITCHYARD_READYZ_URL");
    if let Some(url) = url {
        cmd.env("SWITCHYARD_READYZ_URL", url);
    }
    let start = Instant::now();
    let out = run(&mut cmd, "dash");
    (out, start.elapsed())
}

#[test]
fn check_script_passes_on_200() {
    let (port, paths) = http_server(Some(200));
    let (out, _) = check_script(Some(&format!("http://127.0.0.1:{port}/readyz")), &[]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    assert_eq!(*paths.lock().unwrap(), ["/readyz"]);
}

#[test]
fn check_script_takes_the_url_as_an_argument() {
    let (port, paths) = http_server(Some(200));
    let (out, _) = check_script(
        Some("http://127.0.0.1:1/readyz"),
        &[&format!("http://127.0.0.1:{port}/readyz")],
    );
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    assert_eq!(*paths.lock().unwrap(), ["/readyz"]);
}

#[test]
fn check_script_fails_on_503() {
    let (port, paths) = http_server(Some(503));
    let (out, _) = check_script(Some(&format!("http://127.0.0.1:{port}/readyz")), &[]);
    assert_ne!(out.status.code(), Some(0), "{}", text(&out));
    assert_eq!(*paths.lock().unwrap(), ["/readyz"]);
}

#[test]
fn check_script_fails_on_a_closed_port() {
    let port = {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let (out, _) = check_script(Some(&format!("http://127.0.0.1:{port}/readyz")), &[]);
    assert_ne!(out.status.code(), Some(0), "{}", text(&out));
}

#[test]
fn check_script_fails_fast_when_there_is_no_answer() {
    let (port, _) = http_server(None);
    let (out, took) = check_script(Some(&format!("http://127.0.0.1:{port}/readyz")), &[]);
    assert_ne!(out.status.code(), Some(0), "{}", text(&out));
    // The script gives curl 1 s (SWITCHYARD_READYZ_TIMEOUT); keepalived kills
    // it after 2 s (vrrp_script timeout). Some room for a loaded machine.
    assert!(took < Duration::from_secs(3), "took {took:?}");
}

#[test]
fn check_script_defaults_to_the_default_admin_address() {
    let script = read(&repo().join("deploy/keepalived/check-switchyard.sh"));
    assert!(
        script.contains("${SWITCHYARD_READYZ_URL:-http://127.0.0.1:9900/readyz}"),
        "the default URL must be the default [admin] bind"
    );
}
