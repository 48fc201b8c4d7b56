//! The daemon: load the config, start the server, react to signals and
//! (with `--watch`) to changes of the config file.

use std::path::{Path, PathBuf};

use tokio::signal::unix::{SignalKind, signal};
use tracing::{error, info, warn};

use crate::config::{self, ConfigError};
use crate::server::{Server, StartError};
use crate::watch::ConfigWatcher;

/// Why the daemon stopped other than cleanly. Maps to the exit codes of the
/// CLI contract: invalid config → 1, runtime failure → 2.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Start(#[from] StartError),
    #[error("cannot install signal handler: {0}")]
    Signal(#[source] std::io::Error),
    #[error("cannot watch {path}: {source}")]
    Watch {
        path: PathBuf,
        #[source]
        source: notify::Error,
    },
}

impl RunError {
    /// The process exit code for this error.
    pub fn exit_code(&self) -> i32 {
        match self {
            RunError::Config(_) => 1,
            RunError::Start(_) | RunError::Signal(_) | RunError::Watch { .. } => 2,
        }
    }
}

/// Options of `switchyard run`.
#[derive(Debug, Clone)]
pub struct RunOptions {
    pub config: PathBuf,
    /// Also reload when the file changes on disk.
    pub watch: bool,
}

/// Run until SIGTERM or SIGINT, then stop gracefully. SIGHUP (and with
/// `watch`, a change of the file) reloads.
pub async fn run(options: RunOptions) -> Result<(), RunError> {
    // Signal handlers first: a signal that arrives during start-up must not
    // kill the process with the default action.
    let mut sigterm = signal(SignalKind::terminate()).map_err(RunError::Signal)?;
    let mut sigint = signal(SignalKind::interrupt()).map_err(RunError::Signal)?;
    let mut sighup = signal(SignalKind::hangup()).map_err(RunError::Signal)?;

    let config = config::load_file(&options.config)?;
    let mut watcher = match options.watch {
        true => Some(
            ConfigWatcher::new(&options.config).map_err(|source| RunError::Watch {
                path: options.config.clone(),
                source,
            })?,
        ),
        false => None,
    };
    let mut server = Server::start(config).await?;
    info!(config = %options.config.display(), watch = options.watch, "ready");

    loop {
        let file_changed = async {
            match &mut watcher {
                Some(w) => w.changed().await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            _ = sigterm.recv() => { info!(signal = "SIGTERM", "stopping"); break }
            _ = sigint.recv() => { info!(signal = "SIGINT", "stopping"); break }
            _ = sighup.recv() => { reload(&mut server, &options.config, "SIGHUP").await; }
            () = file_changed => { reload(&mut server, &options.config, "file change").await; }
        }
    }
    let grace = server.config().shutdown_timeout;
    let stop = server.shutdown(grace);
    tokio::pin!(stop);
    tokio::select! {
        _ = &mut stop => {}
        // A second signal means "now".
        _ = sigterm.recv() => warn!("second signal; exiting at once"),
        _ = sigint.recv() => warn!("second signal; exiting at once"),
    }
    info!("stopped");
    Ok(())
}

/// Load, validate and apply the file; on any error the running config stays.
/// Returns whether the new config is now in effect.
pub async fn reload(server: &mut Server, path: &Path, trigger: &str) -> bool {
    info!(trigger, "reloading configuration");
    let file = path.to_owned();
    // Loading resolves host names: keep that off the serving threads.
    let loaded = tokio::task::spawn_blocking(move || config::load_file(&file))
        .await
        .expect("config loading does not panic");
    let config = match loaded {
        Ok(c) => c,
        Err(e) => {
            error!(error = %e, "reload failed; the running configuration stays");
            return false;
        }
    };
    match server.reload(config).await {
        Ok(summary) => {
            for change in &summary.changes {
                info!(listener = %change.listener(), ?change, "config change");
            }
            info!(changes = summary.changes.len(), "configuration reloaded");
            true
        }
        Err(e) => {
            error!(error = %e, "reload failed; the running configuration stays");
            false
        }
    }
}
