//! `--watch`: reload when the config file changes on disk.
//!
//! The parent directory is watched, not the file: editors and config
//! management write a new file and rename it over the old one, which a
//! watch on the old inode would miss. Bursts of events (write, chmod,
//! rename) are coalesced into one reload once the file has been quiet for
//! [`QUIET`].

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::time::Duration;

use notify::{RecommendedWatcher, RecursiveMode, Watcher};
use tokio::sync::mpsc;

/// How long the file must be quiet before a reload: long enough to cover an
/// editor's write-then-rename, short enough to feel immediate.
pub const QUIET: Duration = Duration::from_millis(200);

/// Watches one config file; yields once per burst of changes.
pub struct ConfigWatcher {
    _watcher: RecommendedWatcher,
    events: mpsc::UnboundedReceiver<()>,
}

impl ConfigWatcher {
    pub fn new(path: &Path) -> notify::Result<ConfigWatcher> {
        let dir = match path.parent() {
            Some(d) if !d.as_os_str().is_empty() => d.to_owned(),
            _ => PathBuf::from("."),
        };
        let name: OsString = path.file_name().unwrap_or_default().to_owned();
        let (tx, events) = mpsc::unbounded_channel();
        let mut watcher =
            notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
                let Ok(event) = event else { return };
                if event.kind.is_access() {
                    return;
                }
                if event.paths.iter().any(|p| p.file_name() == Some(&name)) {
                    let _ = tx.send(());
                }
            })?;
        watcher.watch(&dir, RecursiveMode::NonRecursive)?;
        Ok(ConfigWatcher {
            _watcher: watcher,
            events,
        })
    }

    /// Wait for the next change, then for the file to be quiet.
    pub async fn changed(&mut self) {
        if self.events.recv().await.is_none() {
            return std::future::pending().await;
        }
        while let Ok(Some(())) = tokio::time::timeout(QUIET, self.events.recv()).await {}
    }
}
