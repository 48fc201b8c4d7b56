//! The daemon: load the config, start the server, react to signals.

use std::path::PathBuf;

use tokio::signal::unix::{SignalKind, signal};
use tracing::{info, warn};

use crate::config::{self, ConfigError};
use crate::server::{Server, StartError};

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
}

impl RunError {
    /// The process exit code for this error.
    pub fn exit_code(&self) -> i32 {
        match self {
            RunError::Config(_) => 1,
            RunError::Start(_) | RunError::Signal(_) => 2,
        }
    }
}

/// Options of `switchyard run`.
#[derive(Debug, Clone)]
pub struct RunOptions {
    pub config: PathBuf,
}

/// Run until SIGTERM or SIGINT, then stop gracefully.
pub async fn run(options: RunOptions) -> Result<(), RunError> {
    // Signal handlers first: a SIGTERM that arrives during start-up must not
    // kill the process with the default action.
    let mut sigterm = signal(SignalKind::terminate()).map_err(RunError::Signal)?;
    let mut sigint = signal(SignalKind::interrupt()).map_err(RunError::Signal)?;
    let mut sighup = signal(SignalKind::hangup()).map_err(RunError::Signal)?;

    let config = config::load_file(&options.config)?;
    let grace = config.shutdown_timeout;
    let server = Server::start(config).await?;
    info!(config = %options.config.display(), "ready");

    loop {
        tokio::select! {
            _ = sigterm.recv() => { info!(signal = "SIGTERM", "stopping"); break }
            _ = sigint.recv() => { info!(signal = "SIGINT", "stopping"); break }
            _ = sighup.recv() => {
                warn!("SIGHUP received; configuration reload is not available in this version");
            }
        }
    }
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
