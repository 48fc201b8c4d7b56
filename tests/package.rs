//! The Debian package: built by `scripts/package.sh` from
//! `[package.metadata.deb]` in Cargo.toml and the maintainer scripts in
//! `debian/`, then checked as a package (its files and their modes, the
//! conffile, the maintainer scripts, the generated man page and
//! completions, lintian) and as an install: `dpkg -i`, an upgrade that
//! keeps a locally changed conffile, `dpkg --remove` and `dpkg --purge`,
//! in a throwaway copy of this machine's root.
//!
//! The package holds the binary `cargo test` built (`package.sh --binary`),
//! compressed quickly (`--fast`): the release build's fat LTO would take
//! minutes, and what is tested here is the packaging. Users package the
//! release build (`bash scripts/package.sh`).
//!
//! The throwaway root is an overlay: this machine's root file system read
//! only below, a tmpfs directory above that takes every write, mounted in
//! a private mount namespace for each step and entered with chroot. It is
//! a real Debian 12 with dpkg, adduser and deb-systemd-helper, needs no
//! download, and nothing of it reaches the machine. No systemd runs in it:
//! `/run/systemd/system` exists there and `systemctl` is a stand-in that
//! records its calls, so the test sees what the maintainer scripts ask
//! systemd to do (and that they never start the service).
//!
//! Needs root (mount, chroot), cargo-deb and lintian; `bash scripts/test.sh`
//! installs cargo-deb and lintian. A missing tool fails the test with a
//! message saying so; it never skips.

use std::collections::{BTreeMap, BTreeSet};
use std::io::ErrorKind;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::OnceLock;

/// Tools this test runs that a minimal system may lack, and the Debian
/// package of each. (package.sh says so itself when cargo-deb is missing.)
const TOOLS: &[(&str, &str)] = &[("lintian", "lintian"), ("readelf", "binutils")];

/// The subcommands the man page and every completion script must know.
const SUBCOMMANDS: &[&str] = &["run", "check", "status", "state"];

/// Where tests/package.rs keeps its files (the package, its unpacked
/// contents): below cargo's target directory, replaced on every run.
fn workdir() -> PathBuf {
    Path::new(env!("CARGO_TARGET_TMPDIR")).join("package-test")
}

fn repo() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn read_bytes(path: &Path) -> Vec<u8> {
    std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn text(out: &Output) -> String {
    format!(
        "--- stdout\n{}--- stderr\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// Runs `cmd`; a program that is not installed fails the test with a
/// message naming what to install.
fn run(cmd: &mut Command) -> Output {
    let program = cmd.get_program().to_string_lossy().into_owned();
    match cmd.output() {
        Ok(out) => out,
        Err(e) if e.kind() == ErrorKind::NotFound => {
            let package = TOOLS
                .iter()
                .find(|(tool, _)| *tool == program)
                .map_or("(see the module docs)", |(_, package)| package);
            panic!(
                "`{program}` not found on PATH: this test needs it. Run the tests with \
                 `bash scripts/test.sh`, which installs it; package: {package}"
            )
        }
        Err(e) => panic!("could not run `{program}`: {e}"),
    }
}

/// Runs `cmd`, fails the test unless it exits 0, returns its stdout.
fn ok(cmd: &mut Command) -> String {
    let out = run(cmd);
    assert!(
        out.status.success(),
        "{cmd:?} failed ({}):\n{}",
        out.status,
        text(&out)
    );
    String::from_utf8(out.stdout).expect("output is UTF-8")
}

/// Removes `dir` and everything in it, if it is there.
fn remove_dir_all(dir: &Path) {
    match std::fs::remove_dir_all(dir) {
        Ok(()) => {}
        Err(e) if e.kind() == ErrorKind::NotFound => {}
        Err(e) => panic!("{}: {e}", dir.display()),
    }
}

fn gunzip(path: &Path) -> Vec<u8> {
    let out = run(Command::new("gzip").arg("-dc").arg(path));
    assert!(
        out.status.success(),
        "gzip -dc {}:\n{}",
        path.display(),
        text(&out)
    );
    out.stdout
}

/// The package, built once for all tests of this file.
struct Package {
    deb: PathBuf,
    /// `dpkg-deb -x`: the files as installed.
    files: PathBuf,
    /// `dpkg-deb -e`: control, conffiles, maintainer scripts.
    control: PathBuf,
    /// `dpkg-deb --contents`: path (without the leading `.`) → entry.
    contents: BTreeMap<String, Entry>,
}

#[derive(Debug)]
struct Entry {
    /// As `ls -l` shows it: `-rwxr-xr-x`, `drwxr-xr-x`.
    mode: String,
    /// `uid/gid`.
    owner: String,
}

fn package() -> &'static Package {
    static PACKAGE: OnceLock<Package> = OnceLock::new();
    PACKAGE.get_or_init(|| {
        let dir = workdir();
        remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let out = ok(Command::new("bash")
            .arg(repo().join("scripts/package.sh"))
            .arg("--binary")
            .arg(env!("CARGO_BIN_EXE_switchyard"))
            .arg("--output")
            .arg(&dir)
            .arg("--fast"));
        let deb = PathBuf::from(out.lines().last().unwrap_or_default());
        assert_eq!(
            deb,
            dir.join(format!(
                "switchyard_{}-1_amd64.deb",
                env!("CARGO_PKG_VERSION")
            )),
            "package.sh's last line names the package it built:\n{out}"
        );
        let files = dir.join("files");
        let control = dir.join("control");
        ok(Command::new("dpkg-deb").arg("-x").arg(&deb).arg(&files));
        ok(Command::new("dpkg-deb").arg("-e").arg(&deb).arg(&control));
        let listing = ok(Command::new("dpkg-deb").arg("--contents").arg(&deb));
        let mut contents = BTreeMap::new();
        for line in listing.lines() {
            // drwxr-xr-x 0/0               0 2026-12-03 00:00 ./usr/
            let fields: Vec<&str> = line.split_whitespace().collect();
            assert_eq!(fields.len(), 6, "unexpected listing line {line:?}");
            let path = fields[5]
                .strip_prefix('.')
                .unwrap_or_else(|| panic!("path not relative in {line:?}"));
            let path = path.strip_suffix('/').unwrap_or(path).to_string();
            let entry = Entry {
                mode: fields[0].to_string(),
                owner: fields[1].to_string(),
            };
            assert!(
                contents.insert(path, entry).is_none(),
                "listed twice: {line:?}"
            );
        }
        Package {
            deb,
            files,
            control,
            contents,
        }
    })
}

/// Each regular file the package must hold, with its mode, and where its
/// content comes from in the repository (None: generated or built).
fn expected_files() -> BTreeMap<String, (&'static str, Option<PathBuf>)> {
    const EXEC: &str = "-rwxr-xr-x";
    const DATA: &str = "-rw-r--r--";
    let src = |p: &str| Some(repo().join(p));
    let mut files: BTreeMap<String, (&'static str, Option<PathBuf>)> = BTreeMap::from([
        ("/usr/bin/switchyard".into(), (EXEC, None)),
        (
            "/etc/switchyard/switchyard.toml".into(),
            (DATA, src("config/switchyard.toml")),
        ),
        (
            "/usr/lib/systemd/system/switchyard.service".into(),
            (DATA, src("deploy/switchyard.service")),
        ),
        (
            "/usr/lib/switchyard/check-switchyard.sh".into(),
            (EXEC, src("deploy/keepalived/check-switchyard.sh")),
        ),
        (
            "/usr/lib/switchyard/notify.sh".into(),
            (EXEC, src("deploy/keepalived/notify.sh")),
        ),
        ("/usr/share/man/man1/switchyard.1.gz".into(), (DATA, None)),
        // The pages the main page's SUBCOMMANDS section refers to.
        (
            "/usr/share/man/man1/switchyard-run.1.gz".into(),
            (DATA, None),
        ),
        (
            "/usr/share/man/man1/switchyard-check.1.gz".into(),
            (DATA, None),
        ),
        (
            "/usr/share/man/man1/switchyard-status.1.gz".into(),
            (DATA, None),
        ),
        (
            "/usr/share/man/man1/switchyard-state.1.gz".into(),
            (DATA, None),
        ),
        (
            "/usr/share/man/man1/switchyard-completions.1.gz".into(),
            (DATA, None),
        ),
        (
            "/usr/share/man/man1/switchyard-man.1.gz".into(),
            (DATA, None),
        ),
        (
            "/usr/share/bash-completion/completions/switchyard".into(),
            (DATA, None),
        ),
        (
            "/usr/share/zsh/vendor-completions/_switchyard".into(),
            (DATA, None),
        ),
        (
            "/usr/share/fish/vendor_completions.d/switchyard.fish".into(),
            (DATA, None),
        ),
        (
            "/usr/share/doc/switchyard/copyright".into(),
            (DATA, src("debian/copyright")),
        ),
        (
            "/usr/share/doc/switchyard/changelog.Debian.gz".into(),
            (DATA, None),
        ),
        (
            "/usr/share/doc/switchyard/README.md.gz".into(),
            (DATA, None),
        ),
        (
            "/usr/share/lintian/overrides/switchyard".into(),
            (DATA, src("debian/switchyard.lintian-overrides")),
        ),
        (
            "/usr/share/doc/switchyard/examples/prometheus/alerts.yml".into(),
            (DATA, src("deploy/prometheus/alerts.yml")),
        ),
        (
            "/usr/share/doc/switchyard/examples/prometheus/prometheus.yml".into(),
            (DATA, src("deploy/prometheus/prometheus.yml")),
        ),
        (
            "/usr/share/doc/switchyard/examples/grafana/switchyard.json".into(),
            (DATA, src("deploy/grafana/switchyard.json")),
        ),
    ]);
    // The globs of Cargo.toml's assets, as the repository has them now.
    let names = |dir: &str, keep: &dyn Fn(&str) -> bool| -> Vec<String> {
        let mut names: Vec<String> = std::fs::read_dir(repo().join(dir))
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .filter(|n| keep(n))
            .collect();
        names.sort();
        assert!(!names.is_empty(), "nothing matches in {dir}/");
        names
    };
    for name in names("docs", &|n| n.ends_with(".md")) {
        files.insert(format!("/usr/share/doc/switchyard/{name}.gz"), (DATA, None));
    }
    for name in names("config", &|n| n.ends_with(".toml")) {
        files.insert(
            format!("/usr/share/doc/switchyard/examples/{name}"),
            (DATA, src(&format!("config/{name}"))),
        );
    }
    for name in names("deploy/keepalived", &|n| {
        n.starts_with("keepalived-lb") && n.ends_with(".conf")
    }) {
        files.insert(
            format!("/usr/share/doc/switchyard/examples/keepalived/{name}"),
            (DATA, src(&format!("deploy/keepalived/{name}"))),
        );
    }
    files
}

#[test]
fn package_holds_every_file_at_its_path_with_its_mode() {
    let pkg = package();
    let expected = expected_files();
    let mut files = BTreeMap::new();
    for (path, entry) in &pkg.contents {
        assert_eq!(entry.owner, "0/0", "{path} is not owned by root");
        match entry.mode.as_bytes()[0] {
            b'd' => assert_eq!(entry.mode, "drwxr-xr-x", "directory {path}"),
            b'-' => {
                files.insert(path.clone(), entry.mode.clone());
            }
            _ => panic!("{path}: neither file nor directory ({})", entry.mode),
        }
    }
    let want: BTreeMap<String, String> = expected
        .iter()
        .map(|(path, (mode, _))| (path.clone(), mode.to_string()))
        .collect();
    assert_eq!(files, want, "the package's files and modes");
    // Every file that comes from the repository is its copy.
    for (path, (_, source)) in &expected {
        if let Some(source) = source {
            assert!(
                read_bytes(&pkg.files.join(&path[1..])) == read_bytes(source),
                "{path} differs from {}",
                source.display()
            );
        }
    }
    // The docs, gzipped.
    let mut docs = vec![("README.md.gz".to_string(), repo().join("README.md"))];
    for name in expected.keys() {
        if let Some(name) = name.strip_prefix("/usr/share/doc/switchyard/")
            && name.ends_with(".md.gz")
            && name != "README.md.gz"
        {
            docs.push((
                name.to_string(),
                repo().join("docs").join(name.strip_suffix(".gz").unwrap()),
            ));
        }
    }
    for (name, source) in docs {
        let doc = pkg.files.join("usr/share/doc/switchyard").join(&name);
        assert!(
            gunzip(&doc) == read_bytes(&source),
            "{name} is not {}",
            source.display()
        );
    }
    // The binary is the switchyard cargo built, stripped.
    let bin = pkg.files.join("usr/bin/switchyard");
    let version = ok(Command::new(&bin).arg("--version"));
    assert_eq!(
        version,
        format!("switchyard {}\n", env!("CARGO_PKG_VERSION"))
    );
    let symbols = ok(Command::new("readelf").arg("-S").arg(&bin));
    assert!(
        !symbols.contains(".debug_info") && !symbols.contains(".symtab"),
        "usr/bin/switchyard is not stripped:\n{symbols}"
    );
}

#[test]
fn control_fields_conffiles_and_changelog() {
    let pkg = package();
    let control = read(&pkg.control.join("control"));
    let field = |name: &str| -> String {
        control
            .lines()
            .find_map(|l| l.strip_prefix(&format!("{name}: ")))
            .unwrap_or_else(|| panic!("no {name} field in:\n{control}"))
            .to_string()
    };
    let version = format!("{}-1", env!("CARGO_PKG_VERSION"));
    assert_eq!(field("Package"), "switchyard");
    assert_eq!(field("Version"), version);
    assert_eq!(field("Architecture"), "amd64");
    assert_eq!(field("Section"), "net");
    assert_eq!(field("Priority"), "optional");
    assert_eq!(field("Description"), "Layer-4 load balancer daemon");
    let depends: BTreeSet<String> = field("Depends")
        .split(", ")
        .map(|d| d.split(' ').next().unwrap().to_string())
        .collect();
    assert_eq!(
        depends,
        BTreeSet::from(["adduser".into(), "libc6".into(), "procps".into()]),
        "Depends: adduser (postinst), libc6 (the binary), procps (/bin/kill in ExecReload=)"
    );
    assert_eq!(field("Suggests"), "keepalived, curl");

    // dpkg's conffile handling for the config, and for nothing else.
    assert_eq!(
        read(&pkg.control.join("conffiles")),
        "/etc/switchyard/switchyard.toml\n"
    );

    // The changelog's newest entry is the package's version (a version
    // bump in Cargo.toml needs a debian/changelog entry).
    let changelog = gunzip(
        &pkg.files
            .join("usr/share/doc/switchyard/changelog.Debian.gz"),
    );
    assert!(
        changelog == read_bytes(&repo().join("debian/changelog")),
        "changelog.Debian.gz is not debian/changelog"
    );
    let first = String::from_utf8(changelog)
        .unwrap()
        .lines()
        .next()
        .unwrap()
        .to_string();
    assert!(
        first.starts_with(&format!("switchyard ({version}) ")),
        "debian/changelog's newest entry {first:?} is not version {version}"
    );
}

#[test]
fn maintainer_scripts_are_valid_and_create_the_user() {
    let pkg = package();
    let mut names: Vec<String> = std::fs::read_dir(&pkg.control)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    names.sort();
    assert_eq!(
        names,
        ["conffiles", "control", "postinst", "postrm", "prerm"],
        "control archive members"
    );
    let script = |name: &str| -> String {
        let path = pkg.control.join(name);
        let mode = std::os::unix::fs::PermissionsExt::mode(
            &std::fs::metadata(&path).unwrap().permissions(),
        );
        assert_eq!(mode & 0o777, 0o755, "{name} mode {mode:o}");
        let out = run(Command::new("sh").arg("-n").arg(&path));
        assert!(out.status.success(), "sh -n {name}:\n{}", text(&out));
        let body = read(&path);
        assert!(body.starts_with("#!/bin/sh\n"), "{name} is not a sh script");
        assert!(body.contains("\nset -e\n"), "{name} does not set -e");
        assert!(!body.contains("#DEBHELPER#"), "{name}: token left in");
        body
    };
    let postinst = script("postinst");
    assert!(
        postinst.contains(
            "adduser --system --group --quiet --no-create-home --home /nonexistent \\\n        \
             --shell /usr/sbin/nologin --comment \"switchyard load balancer\" switchyard"
        ),
        "postinst does not create the system user:\n{postinst}"
    );
    // Never enabled or started by the package: no deb-systemd-invoke (the
    // only way a snippet starts a unit) and no enable outside the
    // was-enabled branch that restores an administrator's choice.
    assert!(
        !postinst.contains("deb-systemd-invoke"),
        "postinst starts or restarts the service:\n{postinst}"
    );
    assert!(postinst.contains("deb-systemd-helper update-state switchyard.service"));
    let prerm = script("prerm");
    assert!(
        prerm.contains("[ \"$1\" = remove ]")
            && prerm.contains("deb-systemd-invoke stop switchyard.service"),
        "prerm stops the service on removal only:\n{prerm}"
    );
    let postrm = script("postrm");
    assert!(postrm.contains("deb-systemd-helper purge switchyard.service"));
    assert!(
        !postrm.contains("deluser") && !postrm.contains("userdel"),
        "postrm keeps the system user"
    );
}

/// Whole words of `text` (letters, digits, `_`, `-`).
fn words(text: &str) -> BTreeSet<&str> {
    text.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_' || c == '-'))
        .filter(|w| !w.is_empty())
        .collect()
}

#[test]
fn man_page_and_completions_cover_every_subcommand() {
    let pkg = package();
    let man = String::from_utf8(gunzip(
        &pkg.files.join("usr/share/man/man1/switchyard.1.gz"),
    ))
    .unwrap();
    assert!(man.starts_with(".ie"), "not roff:\n{man}");
    assert!(man.contains(".TH switchyard 1 "), "no title line:\n{man}");
    let man_text = man.replace("\\-", "-");
    for sub in SUBCOMMANDS {
        assert!(
            man_text.contains(&format!("switchyard-{sub}(1)")),
            "the man page does not list `{sub}`:\n{man}"
        );
    }

    let bash = pkg
        .files
        .join("usr/share/bash-completion/completions/switchyard");
    let out = run(Command::new("bash").arg("-n").arg(&bash));
    assert!(out.status.success(), "bash -n:\n{}", text(&out));
    let completions = [
        (bash, "complete -F _switchyard"),
        (
            pkg.files
                .join("usr/share/zsh/vendor-completions/_switchyard"),
            "#compdef switchyard",
        ),
        (
            pkg.files
                .join("usr/share/fish/vendor_completions.d/switchyard.fish"),
            "complete -c switchyard",
        ),
    ];
    for (path, marker) in completions {
        let script = read(&path);
        assert!(
            script.contains(marker),
            "{} lacks {marker:?}",
            path.display()
        );
        let words = words(&script);
        for sub in SUBCOMMANDS {
            assert!(words.contains(sub), "{} lacks `{sub}`", path.display());
        }
    }
}

#[test]
fn lintian_finds_no_error_and_no_warning() {
    let pkg = package();
    // --display-info: information tags too, so an override that no longer
    // matches anything (unused-override) shows. What is left at that level
    // is information only: hardening-no-fortify-functions (jemalloc's C
    // code), no-md5sums-control-file (cargo-deb writes none) and
    // systemd-service-file-missing-documentation-key.
    let out = run(Command::new("lintian").arg("--display-info").arg(&pkg.deb));
    let stdout = String::from_utf8_lossy(&out.stdout);
    let bad: Vec<&str> = stdout
        .lines()
        .filter(|l| {
            l.starts_with("E: ")
                || l.starts_with("W: ")
                || l.contains("unused-override")
                || l.contains("mismatched-override")
        })
        .collect();
    assert!(
        bad.is_empty(),
        "lintian:\n{}\n\n{}",
        bad.join("\n"),
        text(&out)
    );
    assert!(out.status.success(), "lintian failed:\n{}", text(&out));
}

// --- Installing -------------------------------------------------------------

/// Stands in for systemctl in the throwaway root: records each call, and
/// answers `is-active` from a flag file the test sets.
const SYSTEMCTL: &str = r#"#!/bin/sh
echo "$*" >>/switchyard-test/systemctl.log
case " $* " in
*" is-active "*) [ -e /switchyard-test/active ] ;;
esac
"#;

/// Mounts the overlay in the private mount namespace it runs in, then
/// runs the command chrooted into it with a clean environment.
const ENTER: &str = r#"set -eu
d=$1
shift
mount -t overlay overlay -o "lowerdir=/,upperdir=$d/upper,workdir=$d/work" "$d/merged"
mount --bind /dev "$d/merged/dev"
mount -t proc proc "$d/merged/proc"
mount -t tmpfs tmpfs "$d/merged/run"
mkdir -p "$d/merged/run/systemd/system"
exec chroot "$d/merged" /usr/bin/env -i \
  PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
  DEBIAN_FRONTEND=noninteractive LC_ALL=C "$@"
"#;

/// A throwaway root: this machine's root below, a tmpfs directory above.
struct Root {
    dir: tempfile::TempDir,
}

impl Root {
    fn new() -> Root {
        // The upper directory must not be on the root file system (the
        // lower layer): overlayfs refuses overlapping layers.
        let shm = Path::new("/dev/shm");
        assert!(shm.is_dir(), "/dev/shm (a tmpfs) is missing");
        let dir = tempfile::Builder::new()
            .prefix("switchyard-package-")
            .tempdir_in(shm)
            .unwrap();
        for sub in ["upper", "work", "merged", "upper/switchyard-test"] {
            std::fs::create_dir(dir.path().join(sub)).unwrap();
        }
        // The upper directory's mode is the root directory's.
        std::fs::set_permissions(
            dir.path().join("upper"),
            std::os::unix::fs::PermissionsExt::from_mode(0o755),
        )
        .unwrap();
        Root { dir }
    }

    /// A file of the test's, at `/switchyard-test/NAME` inside the root.
    fn test_file(&self, name: &str) -> PathBuf {
        self.dir.path().join("upper/switchyard-test").join(name)
    }

    /// Runs `args` inside the root.
    fn run(&self, args: &[&str]) -> Output {
        run(Command::new("unshare")
            .args([
                "--mount",
                "--propagation",
                "private",
                "--",
                "sh",
                "-c",
                ENTER,
                "sh",
            ])
            .arg(self.dir.path())
            .args(args))
    }

    /// Runs `args` inside the root; fails the test unless it exits 0.
    fn ok(&self, args: &[&str]) -> String {
        let out = self.run(args);
        assert!(
            out.status.success(),
            "in the root: {args:?} failed ({}):\n{}",
            out.status,
            text(&out)
        );
        String::from_utf8(out.stdout).unwrap()
    }

    /// The file at `path` inside the root, if there is one. (Every query
    /// must succeed as a command: a failed mount is never "no such file".)
    fn read(&self, path: &str) -> Option<String> {
        let out = self.ok(&[
            "sh",
            "-c",
            "if [ -f \"$1\" ]; then echo file; cat \"$1\"; else echo none; fi",
            "sh",
            path,
        ]);
        match out.split_once('\n') {
            Some(("file", content)) => Some(content.to_string()),
            Some(("none", "")) => None,
            _ => panic!("reading {path}: {out:?}"),
        }
    }

    fn exists(&self, path: &str) -> bool {
        let out = self.ok(&[
            "sh",
            "-c",
            "if [ -e \"$1\" ]; then echo yes; else echo no; fi",
            "sh",
            path,
        ]);
        match out.as_str() {
            "yes\n" => true,
            "no\n" => false,
            _ => panic!("testing {path}: {out:?}"),
        }
    }

    /// `dpkg ARGS`; returns its stdout and the systemctl calls it made.
    fn dpkg(&self, args: &[&str]) -> (String, Calls) {
        let log = self.test_file("systemctl.log");
        std::fs::write(&log, "").unwrap();
        let mut cmd = vec!["dpkg"];
        cmd.extend(args);
        let out = self.ok(&cmd);
        let mut calls = Calls::default();
        for call in read(&log).lines() {
            if call.split(' ').any(|word| word == "daemon-reload") {
                calls.reloads += 1;
            } else {
                calls.actions.push(call.to_string());
            }
        }
        (out, calls)
    }

    /// dpkg's status and version of the package, or None when dpkg knows
    /// nothing of it.
    fn status(&self) -> Option<String> {
        let out = self.run(&[
            "dpkg-query",
            "-W",
            "-f",
            "${Status} ${Version}",
            "switchyard",
        ]);
        if out.status.success() {
            return Some(String::from_utf8(out.stdout).unwrap());
        }
        assert!(
            out.status.code() == Some(1)
                && String::from_utf8_lossy(&out.stderr)
                    .contains("no packages found matching switchyard"),
            "dpkg-query failed:\n{}",
            text(&out)
        );
        None
    }

    /// The `switchyard` entries of /etc/passwd and /etc/group.
    fn account(&self) -> (Option<String>, Option<String>) {
        let get = |db: &str| {
            let out = self.run(&["getent", db, "switchyard"]);
            match out.status.code() {
                Some(0) => Some(
                    String::from_utf8(out.stdout)
                        .unwrap()
                        .trim_end()
                        .to_string(),
                ),
                // getent: "key could not be found"
                Some(2) => None,
                _ => panic!("getent {db} switchyard:\n{}", text(&out)),
            }
        };
        (get("passwd"), get("group"))
    }
}

/// What the maintainer scripts asked of systemctl during one dpkg run.
#[derive(Debug, Default)]
struct Calls {
    /// `daemon-reload`s: the old postrm, the new postinst and
    /// deb-systemd-helper each send one when they changed something.
    reloads: usize,
    /// Everything else, in order.
    actions: Vec<String>,
}

/// The package again as version `<version>+next`, with one more line in
/// its shipped config: an upgrade whose conffile changed.
fn next_version(pkg: &Package, dest: &Path) -> (String, String) {
    let tree = workdir().join("next");
    remove_dir_all(&tree);
    ok(Command::new("dpkg-deb").arg("-R").arg(&pkg.deb).arg(&tree));
    let control = tree.join("DEBIAN/control");
    let version = format!("{}-1", env!("CARGO_PKG_VERSION"));
    let next = format!("{version}+next");
    let text = read(&control);
    assert!(text.contains(&format!("\nVersion: {version}\n")));
    std::fs::write(
        &control,
        text.replace(
            &format!("\nVersion: {version}\n"),
            &format!("\nVersion: {next}\n"),
        ),
    )
    .unwrap();
    let config = tree.join("etc/switchyard/switchyard.toml");
    let shipped = format!("{}# shipped by {next}\n", read(&config));
    std::fs::write(&config, &shipped).unwrap();
    // gzip -1: quick, and the size does not matter here.
    ok(Command::new("dpkg-deb")
        .args(["--root-owner-group", "-Zgzip", "-z1", "--build"])
        .arg(&tree)
        .arg(dest));
    (next, shipped)
}

#[test]
fn installs_upgrades_removes_and_purges_in_a_throwaway_root() {
    assert!(
        rustix::process::geteuid().is_root(),
        "this test mounts an overlay and chroots into it: run it as root (CI does)"
    );
    let pkg = package();
    let root = Root::new();
    let version = format!("{}-1", env!("CARGO_PKG_VERSION"));
    std::fs::copy(&pkg.deb, root.test_file("switchyard.deb")).unwrap();
    let (next, next_config) = next_version(pkg, &root.test_file("switchyard-next.deb"));
    std::fs::write(root.test_file("systemctl"), SYSTEMCTL).unwrap();
    let shipped_config = read(&repo().join("config/switchyard.toml"));

    // A root like this machine's without any trace of switchyard, and
    // acting as a booted system: systemctl is the recording stand-in and no
    // policy-rc.d forbids starting services (container images have one
    // that does).
    root.ok(&[
        "sh",
        "-c",
        "set -e
         install -m 755 /switchyard-test/systemctl /usr/bin/systemctl
         rm -f /usr/sbin/policy-rc.d
         if dpkg-query -W switchyard >/dev/null 2>&1; then dpkg --purge switchyard; fi
         rm -rf /etc/switchyard /usr/lib/switchyard /usr/bin/switchyard \
           /usr/lib/systemd/system/switchyard.service /etc/systemd/system/switchyard.service
         if getent passwd switchyard >/dev/null; then userdel switchyard; fi
         if getent group switchyard >/dev/null; then groupdel switchyard; fi",
    ]);
    assert_eq!(root.status(), None, "dpkg knows switchyard already");
    assert_eq!(root.account(), (None, None));

    // First install: the user, the conffile, and the unit neither enabled
    // nor started.
    let (out, calls) = root.dpkg(&["-i", "/switchyard-test/switchyard.deb"]);
    assert_eq!(
        root.status().unwrap(),
        format!("install ok installed {version}")
    );
    assert!(
        out.contains("then run: systemctl enable --now switchyard"),
        "postinst does not say how to start the service:\n{out}"
    );
    assert!(calls.reloads >= 1, "no daemon-reload on install");
    assert_eq!(
        calls.actions,
        [] as [&str; 0],
        "systemctl calls on install (the unit is not enabled or started)"
    );
    assert!(!root.exists("/etc/systemd/system/multi-user.target.wants/switchyard.service"));
    let (user, group) = root.account();
    let user = user.expect("no switchyard user after install");
    let group = group.expect("no switchyard group after install");
    let fields: Vec<&str> = user.split(':').collect();
    // adduser fills the GECOS field's other parts (room, phones) with ",".
    assert_eq!(
        (
            fields[0],
            fields[4].split(',').next().unwrap(),
            fields[5],
            fields[6]
        ),
        (
            "switchyard",
            "switchyard load balancer",
            "/nonexistent",
            "/usr/sbin/nologin"
        ),
        "{user}"
    );
    let uid: u32 = fields[2].parse().unwrap();
    assert!((100..1000).contains(&uid), "not a system uid: {user}");
    assert_eq!(
        group.split(':').nth(2),
        Some(fields[3]),
        "the user's primary group is not `switchyard`: {user} / {group}"
    );
    assert_eq!(
        root.read("/etc/switchyard/switchyard.toml").as_deref(),
        Some(shipped_config.as_str())
    );
    for path in [
        "/usr/bin/switchyard",
        "/usr/lib/switchyard/check-switchyard.sh",
        "/usr/lib/switchyard/notify.sh",
    ] {
        let mode = root.ok(&["stat", "-c", "%a %U:%G", path]);
        assert_eq!(mode, "755 root:root\n", "{path}");
    }
    // The installed config is valid, and readable by the service user (as
    // the unit's ExecStartPre= check runs it).
    let check = root.ok(&[
        "setpriv",
        "--reuid=switchyard",
        "--regid=switchyard",
        "--clear-groups",
        "switchyard",
        "check",
        "--config",
        "/etc/switchyard/switchyard.toml",
    ]);
    assert!(
        check.ends_with("/etc/switchyard/switchyard.toml: configuration is valid\n"),
        "{check}"
    );

    // An upgrade while the service runs, over a locally changed config
    // whose shipped version changed too: --force-confold keeps the local
    // file and puts the new one beside it; the running service gets a live
    // upgrade (SIGUSR2), never a stop or restart.
    let local = format!("{shipped_config}# changed on this machine\n");
    root.ok(&[
        "sh",
        "-c",
        "printf '%s' \"$1\" >/etc/switchyard/switchyard.toml",
        "sh",
        &local,
    ]);
    std::fs::write(root.test_file("active"), "").unwrap();
    let (_, calls) = root.dpkg(&[
        "--force-confold",
        "-i",
        "/switchyard-test/switchyard-next.deb",
    ]);
    assert_eq!(
        root.status().unwrap(),
        format!("install ok installed {next}")
    );
    assert_eq!(
        root.read("/etc/switchyard/switchyard.toml").as_deref(),
        Some(local.as_str()),
        "the upgrade overwrote the local config"
    );
    assert_eq!(
        root.read("/etc/switchyard/switchyard.toml.dpkg-dist")
            .as_deref(),
        Some(next_config.as_str())
    );
    assert!(calls.reloads >= 1, "no daemon-reload on upgrade");
    assert_eq!(
        calls.actions,
        [
            "--quiet is-active switchyard.service",
            "kill --signal=USR2 switchyard.service",
        ],
        "systemctl calls on upgrading a running service"
    );
    assert_eq!(
        root.account().0.as_deref(),
        Some(user.as_str()),
        "the user changed"
    );
    let check = root.ok(&[
        "switchyard",
        "check",
        "--config",
        "/etc/switchyard/switchyard.toml",
    ]);
    assert!(check.ends_with("configuration is valid\n"), "{check}");

    // Reinstalling while the service is stopped signals nothing, and a
    // conffile that did not change in the package is not asked about.
    std::fs::remove_file(root.test_file("active")).unwrap();
    let (_, calls) = root.dpkg(&["-i", "/switchyard-test/switchyard-next.deb"]);
    assert_eq!(
        calls.actions,
        ["--quiet is-active switchyard.service"],
        "systemctl calls on upgrading a stopped service"
    );
    assert_eq!(
        root.read("/etc/switchyard/switchyard.toml").as_deref(),
        Some(local.as_str())
    );

    // Remove: the service is stopped, the files go, the config stays.
    let (_, calls) = root.dpkg(&["--remove", "switchyard"]);
    assert_eq!(
        root.status().unwrap(),
        format!("deinstall ok config-files {next}")
    );
    assert!(calls.reloads >= 1, "no daemon-reload on remove");
    assert_eq!(
        calls.actions,
        ["stop switchyard.service"],
        "systemctl calls on remove"
    );
    for path in [
        "/usr/bin/switchyard",
        "/usr/lib/switchyard",
        "/usr/lib/systemd/system/switchyard.service",
        "/usr/share/doc/switchyard",
    ] {
        assert!(!root.exists(path), "{path} is left after dpkg --remove");
    }
    assert_eq!(
        root.read("/etc/switchyard/switchyard.toml").as_deref(),
        Some(local.as_str())
    );

    // Purge: the config goes too (and the .dpkg-dist beside it, and the
    // directory); the system user stays (see debian/postrm).
    let (_, calls) = root.dpkg(&["--purge", "switchyard"]);
    assert_eq!(calls.actions, [] as [&str; 0], "systemctl calls on purge");
    assert_eq!(
        root.status(),
        None,
        "dpkg still knows switchyard after purge"
    );
    assert!(
        !root.exists("/etc/switchyard"),
        "/etc/switchyard is left after purge"
    );
    assert_eq!(root.account(), (Some(user), Some(group)));
}
