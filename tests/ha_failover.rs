//! Failover of the active/standby pair: `scripts/ha-failover.sh` builds the
//! pair of docs/ha.md in network namespaces of its own, runs switchyard on
//! both nodes (the VIP bound with `freebind`) and keepalived with the
//! shipped `deploy/keepalived/` configs, and while a client makes 10
//! connection attempts a second through the VIP it upgrades the active
//! node's switchyard live (SIGUSR2: the VIP must stay), kills it (SIGKILL),
//! then wedges the other one (SIGSTOP), then cuts a node off the network
//! (see the script for every check). Here it runs on the test build, and
//! the crash figures are checked against issue #18's bounds: the VIP on
//! the standby within 2 s, fewer than 5 failed attempts.

use std::process::Command;

/// Issue #18: the VIP reaches the standby within this many seconds of the
/// active node's switchyard being killed ...
const MAX_MOVE_SECS: f64 = 2.0;
/// ... and fewer than this many of the client's attempts (10 a second, 1 s
/// each) fail meanwhile.
const MAX_FAILED: u32 = 5;

/// The number right after the first `word` in `line` (`after` in
/// `"VIP on lb2 after 0.125 s"`: 0.125).
fn number_after(line: &str, word: &str) -> f64 {
    let words: Vec<&str> = line.split_whitespace().collect();
    let i = words
        .iter()
        .position(|w| *w == word)
        .unwrap_or_else(|| panic!("no {word:?} in {line:?}"));
    words[i + 1]
        .parse()
        .unwrap_or_else(|e| panic!("{:?} after {word:?} in {line:?}: {e}", words[i + 1]))
}

/// The number right before `word` in `line` (`failed` in `"1 failed"`: 1).
fn number_before(line: &str, word: &str) -> f64 {
    let words: Vec<&str> = line.split_whitespace().collect();
    let i = words
        .iter()
        .position(|w| w.trim_end_matches([',', ';']) == word)
        .unwrap_or_else(|| panic!("no {word:?} in {line:?}"));
    words[i - 1]
        .parse()
        .unwrap_or_else(|e| panic!("{:?} before {word:?} in {line:?}: {e}", words[i - 1]))
}

#[test]
fn killing_the_active_daemon_moves_the_vip_within_2_s_with_fewer_than_5_failed_attempts() {
    let root = env!("CARGO_MANIFEST_DIR");
    let out = Command::new("bash")
        .arg(format!("{root}/scripts/ha-failover.sh"))
        .env("SWITCHYARD_BIN", env!("CARGO_BIN_EXE_switchyard"))
        .output()
        .expect("bash runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    // Only where network namespaces cannot be created (not root, or a
    // container without CAP_SYS_ADMIN); the script says why.
    if out.status.code() == Some(77) {
        let reason = stdout.lines().find(|l| l.starts_with("SKIP: "));
        let reason = reason.unwrap_or_else(|| panic!("exit 77 without a SKIP line\n{stdout}"));
        eprintln!("ha_failover skipped: {reason}");
        return;
    }
    assert!(
        out.status.success() && stdout.trim_end().ends_with("\nPASS"),
        "{}\n--- stdout\n{stdout}\n--- stderr\n{stderr}",
        out.status
    );
    println!("{stdout}");
    assert!(!stdout.contains("NOT:"), "{stdout}");
    for check in [
        "ok: lb1 kept the VIP through a live upgrade",
        "ok: lb1's process tracking saw no gap",
        "ok: no attempt failed during the live upgrade",
        "ok: lb2 holds the VIP within 2 s of the SIGKILL",
        "ok: fewer than 5 attempts failed",
        "ok: lb1's keepalived saw the process go (track_process)",
        "ok: lb1 entered FAULT",
        "ok: lb1 holds the VIP within 6 s of the SIGSTOP",
        "ok: lb2's /readyz check failed",
        "ok: lb2's process tracking saw nothing (the process still runs)",
        "ok: lb2 holds the VIP within 3 s of the cut",
    ] {
        assert!(stdout.contains(check), "no {check:?} in\n{stdout}");
    }

    // crash: VIP on lb2 after 0.125 s (off lb1 after 0.017 s); 32 attempts, 1 failed (1 timeout)
    let crash = stdout
        .lines()
        .find(|l| l.starts_with("crash: VIP on lb2 after "))
        .unwrap_or_else(|| panic!("no crash figures in\n{stdout}"));
    let moved = number_after(crash, "after");
    let attempts = number_before(crash, "attempts");
    let failed = number_before(crash, "failed");
    assert!(moved > 0.0 && moved <= MAX_MOVE_SECS, "{crash}");
    assert!(failed < f64::from(MAX_FAILED), "{crash}");
    // 10 before the kill, 20 after the move at least: the figure counts a
    // real stretch of attempts on both sides.
    assert!(attempts >= 30.0, "{crash}");
}

/// The lines of a keepalived config that mean something: comments and
/// blank lines dropped, whitespace trimmed.
fn config_lines(node: &str) -> Vec<String> {
    let path = format!(
        "{}/deploy/keepalived/keepalived-{node}.conf",
        env!("CARGO_MANIFEST_DIR")
    );
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
    text.lines()
        .map(|l| l.split('#').next().unwrap().trim().to_string())
        .filter(|l| !l.is_empty())
        .collect()
}

/// The two nodes must run the same VRRP instance (version, interval,
/// router id, checks): the shipped files differ only in router_id and
/// priority, lb1's the higher (it wins the first election), as their
/// headers say.
#[test]
fn the_two_keepalived_configs_differ_only_in_router_id_and_priority() {
    let (lb1, lb2) = (config_lines("lb1"), config_lines("lb2"));
    assert_eq!(lb1.len(), lb2.len(), "{lb1:#?}\n{lb2:#?}");
    let mut priorities = Vec::new();
    for (a, b) in lb1.iter().zip(&lb2) {
        if a == b {
            continue;
        }
        match (a.split_once(' '), b.split_once(' ')) {
            (Some(("router_id", "lb1")), Some(("router_id", "lb2"))) => {}
            (Some(("priority", p1)), Some(("priority", p2))) => {
                priorities.push((p1.parse::<u8>().unwrap(), p2.parse::<u8>().unwrap()))
            }
            _ => panic!("lb1 has {a:?} where lb2 has {b:?}"),
        }
    }
    // Below 255 ("address owner", which tracking cannot lower).
    let [(p1, p2)] = priorities[..] else {
        panic!("one priority line expected, differing: {priorities:?}")
    };
    assert!(p2 < p1 && p1 < 255, "lb1 {p1}, lb2 {p2}");
    for line in ["version 3", "advert_int 0.5", "nopreempt", "state BACKUP"] {
        assert!(lb1.iter().any(|l| l == line), "no {line:?} in {lb1:#?}");
    }
}
