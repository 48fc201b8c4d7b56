//! `--watch`: reload when the config file, or a certificate or key it
//! names, changes on disk.
//!
//! The parent directories are watched, not the files: editors and config
//! management write a new file and rename it over the old one, certbot
//! and Kubernetes swap a symlink, and a watch on the old inode would miss
//! all of these. Any event in a watched directory wakes the watcher; it
//! waits until the directory has been quiet for [`QUIET`], then looks at
//! the files themselves (size, times and inode, through symlinks) and
//! yields only when one of them differs from what the last reload read.
//! So unrelated files beside a certificate never cause a reload, and a
//! burst of events (write, chmod, rename) causes one.

use std::collections::HashSet;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use notify::{RecommendedWatcher, RecursiveMode, Watcher};
use tokio::sync::mpsc;
use tracing::warn;

/// How long the files must be quiet before a reload: long enough to
/// cover an editor's write-then-rename, short enough to feel immediate.
pub const QUIET: Duration = Duration::from_millis(200);

/// What a file looked like when it was last read; `None` when it was
/// missing.
type Stamp = Option<(u64, u64, u64, i64, i64, i64, i64)>;

fn stamp(path: &Path) -> Stamp {
    let m = std::fs::metadata(path).ok()?;
    Some((
        m.dev(),
        m.ino(),
        m.size(),
        m.mtime(),
        m.mtime_nsec(),
        m.ctime(),
        m.ctime_nsec(),
    ))
}

fn dir_of(path: &Path) -> PathBuf {
    match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_owned(),
        _ => PathBuf::from("."),
    }
}

/// Watches the files a configuration was read from; yields once per
/// burst of changes that altered one of them.
pub struct ConfigWatcher {
    watcher: RecommendedWatcher,
    dirs: HashSet<PathBuf>,
    /// The files and how each looked when last read.
    files: Vec<(PathBuf, Stamp)>,
    events: mpsc::UnboundedReceiver<()>,
}

impl ConfigWatcher {
    /// Watch `files` (the config first); fails when the config file's
    /// directory cannot be watched.
    pub fn new(files: &[PathBuf]) -> notify::Result<ConfigWatcher> {
        let (tx, events) = mpsc::unbounded_channel();
        let watcher = notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
            if event.is_ok_and(|e| !e.kind.is_access()) {
                let _ = tx.send(());
            }
        })?;
        let mut w = ConfigWatcher {
            watcher,
            dirs: HashSet::new(),
            files: Vec::new(),
            events,
        };
        if let Some(config) = files.first() {
            let dir = dir_of(config);
            w.watcher.watch(&dir, RecursiveMode::NonRecursive)?;
            w.dirs.insert(dir);
        }
        w.set_files(files);
        Ok(w)
    }

    /// Watch these files from now on (after a reload: the files of the
    /// configuration that runs). A file watched before keeps the state
    /// the last reload saw, so a change made while it ran is not missed.
    pub fn set_files(&mut self, files: &[PathBuf]) {
        let wanted: HashSet<PathBuf> = files.iter().map(|f| dir_of(f)).collect();
        for gone in self.dirs.difference(&wanted) {
            let _ = self.watcher.unwatch(gone);
        }
        self.dirs.retain(|d| wanted.contains(d));
        for dir in wanted {
            if self.dirs.contains(&dir) {
                continue;
            }
            match self.watcher.watch(&dir, RecursiveMode::NonRecursive) {
                Ok(()) => {
                    self.dirs.insert(dir);
                }
                Err(e) => warn!(dir = %dir.display(), error = %e,
                    "cannot watch this directory; changes in it need a SIGHUP"),
            }
        }
        let old = std::mem::take(&mut self.files);
        self.files = files
            .iter()
            .map(|f| match old.iter().find(|(p, _)| p == f) {
                Some(kept) => kept.clone(),
                None => (f.clone(), stamp(f)),
            })
            .collect();
    }

    /// Wait until a watched file has changed and things are quiet.
    pub async fn changed(&mut self) {
        loop {
            if self.events.recv().await.is_none() {
                return std::future::pending().await;
            }
            while let Ok(Some(())) = tokio::time::timeout(QUIET, self.events.recv()).await {}
            let mut changed = false;
            for (path, seen) in &mut self.files {
                let now = stamp(path);
                if now != *seen {
                    *seen = now;
                    changed = true;
                }
            }
            if changed {
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// How long nothing must happen: ten times the quiet period a
    /// spurious reload would wait for.
    const NOTHING: Duration = Duration::from_secs(2);
    /// Generous: the machines are small and shared.
    const DEADLINE: Duration = Duration::from_secs(20);

    fn replace(path: &Path, content: &str) {
        let tmp = path.with_extension("tmp");
        std::fs::write(&tmp, content).unwrap();
        std::fs::rename(&tmp, path).unwrap();
    }

    #[tokio::test]
    async fn yields_for_its_files_only_and_follows_a_new_set() {
        let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let config = a.path().join("switchyard.toml");
        let cert = b.path().join("cert.pem");
        std::fs::write(&config, "x").unwrap();
        std::fs::write(&cert, "1").unwrap();
        let mut w = ConfigWatcher::new(&[config.clone(), cert.clone()]).unwrap();

        // A neighbour of the certificate: events, but no change of ours.
        std::fs::write(b.path().join("other.pem"), "n").unwrap();
        assert!(
            tokio::time::timeout(NOTHING, w.changed()).await.is_err(),
            "an unrelated file caused a reload"
        );
        // The certificate replaced by a rename: one reload.
        replace(&cert, "2");
        tokio::time::timeout(DEADLINE, w.changed())
            .await
            .expect("the renamed certificate was missed");

        // After a reload that drops the certificate, its directory is no
        // longer watched; the config still is.
        w.set_files(std::slice::from_ref(&config));
        replace(&cert, "3");
        assert!(
            tokio::time::timeout(NOTHING, w.changed()).await.is_err(),
            "a file no longer in the config caused a reload"
        );
        replace(&config, "y");
        tokio::time::timeout(DEADLINE, w.changed())
            .await
            .expect("the rewritten config was missed");
    }
}
