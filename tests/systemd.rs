//! Live upgrade under a real systemd: `scripts/systemd-live-upgrade.sh`
//! boots the machine's systemd as PID 1 of a private PID and mount
//! namespace, runs the shipped unit as the `switchyard` user and upgrades
//! it three times with `systemctl kill -s USR2` while a connection is held
//! open (see the script for every check). Here it runs on the test build.

use std::process::Command;

#[test]
fn live_upgrade_under_systemd_keeps_the_unit_active_and_the_connection_open() {
    let root = env!("CARGO_MANIFEST_DIR");
    let out = Command::new("bash")
        .arg(format!("{root}/scripts/systemd-live-upgrade.sh"))
        .env("SWITCHYARD_BIN", env!("CARGO_BIN_EXE_switchyard"))
        .output()
        .expect("bash runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success() && stdout.trim_end().ends_with("PASS"),
        "{}\n--- stdout\n{stdout}\n--- stderr\n{stderr}",
        out.status
    );
    for i in 1..=3 {
        let line = stdout
            .lines()
            .find(|l| l.starts_with(&format!("upgrade {i}:")))
            .unwrap_or_else(|| panic!("no upgrade {i} in\n{stdout}"));
        assert!(
            line.contains("old gone: yes, ActiveState=active, NRestarts=0"),
            "{line}"
        );
    }
}
