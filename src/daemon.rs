//! The daemon: load the config, start the server, react to signals and
//! (with `--watch`) to changes of the config file.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tokio::signal::unix::{SignalKind, signal};
use tracing::{debug, error, info, warn};

use crate::admin::{AdminContext, AdminServer};
use crate::config::{self, ConfigError};
use crate::server::{Server, StartError};
use crate::service;
use crate::sockets;
use crate::upgrade::{self, TakeOver, Upgrade};
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
    #[error("admin endpoint: cannot bind {addr}: {source}")]
    Admin {
        addr: std::net::SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("live upgrade: {0}")]
    Upgrade(String),
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
            RunError::Start(_)
            | RunError::Signal(_)
            | RunError::Admin { .. }
            | RunError::Upgrade(_)
            | RunError::Watch { .. } => 2,
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
    // Started by a live upgrade: the old process waits on this socket.
    let inherited = upgrade::inherited().map_err(RunError::Upgrade)?;
    // SIGUSR2 is handled from the start, except in a process a live
    // upgrade started: there it comes ignored and stays so until this
    // process has taken over (the signal meant for the old process may
    // reach it too; see `upgrade::Upgrade::start`).
    let mut sigusr2 = match inherited {
        None => Some(signal(SignalKind::user_defined2()).map_err(RunError::Signal)?),
        Some(_) => None,
    };

    let config = config::load_file(&options.config)?;
    let mut watcher = match options.watch {
        true => Some(
            ConfigWatcher::new(&config.files()).map_err(|source| RunError::Watch {
                path: options.config.clone(),
                source,
            })?,
        ),
        false => None,
    };
    let mut server = Server::new();
    let token = config.admin.as_ref().and_then(|a| a.token.clone());
    let admin_ctx = AdminContext::new(server.directory(), server.metrics().clone(), token);
    let admin_bind = config.admin.as_ref().map(|a| a.bind);
    let admin = match inherited {
        None => {
            // The admin endpoint comes up first, so /healthz answers and
            // /readyz says 503 while listeners are being bound.
            let admin = admin_bind
                .map(|bind| start_admin(bind, &admin_ctx))
                .transpose()?;
            server.reload(config).await?;
            server.metrics().record_reload(true);
            admin
        }
        Some(sock) => take_over(sock, config, &mut server, admin_bind, &admin_ctx).await?,
    };
    admin_ctx.set_ready(true);
    service::ready();
    let mut watchdog = service::spawn_watchdog();
    info!(config = %options.config.display(), watch = options.watch, "ready");
    let mut daemon = Daemon {
        server,
        admin_ctx,
        admin,
        path: options.config.clone(),
    };
    let mut upgrading: Option<Upgrade> = None;
    let mut sigusr2 = match sigusr2.take() {
        Some(s) => s,
        None => signal(SignalKind::user_defined2()).map_err(RunError::Signal)?,
    };

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
            _ = sighup.recv() => { daemon.reload(Trigger::Signal, &mut watcher).await; }
            () = file_changed => { daemon.reload(Trigger::FileChange, &mut watcher).await; }
            _ = sigusr2.recv() => match upgrading {
                Some(_) => warn!("SIGUSR2 during a live upgrade: ignored"),
                None => match Upgrade::start() {
                    Ok(u) => upgrading = Some(u),
                    Err(reason) => daemon.upgrade_failed(&reason),
                },
            },
            hello = hello_of(&mut upgrading) => {
                let u = upgrading.take().expect("a hello comes from an upgrade");
                match hello {
                    Err(reason) => daemon.upgrade_failed(&reason),
                    Ok(pid) => {
                        info!(pid, "live upgrade: the new process is ready; handing over");
                        // The new process pings from its start; pings from
                        // this one would be refused once it is no longer
                        // the main process.
                        if let Some(w) = watchdog.take() {
                            w.abort();
                        }
                        match daemon.hand_over(u).await {
                            Ok(()) => {
                                info!("handed over; exiting");
                                return Ok(());
                            }
                            Err(reason) => {
                                // Past the hello this process has stopped
                                // accepting and frozen its sessions: it
                                // cannot go back to serving. Exit 2, so
                                // that systemd (Restart=on-failure) starts
                                // the service afresh.
                                daemon.server.metrics().record_upgrade(false);
                                error!(%reason, "live upgrade failed during the handover; exiting");
                                return Err(RunError::Upgrade(reason));
                            }
                        }
                    }
                }
            }
        }
    }
    // Not ready from the first moment of shutdown: load balancers in front
    // (keepalived, a cloud LB) stop sending before listeners close.
    daemon.admin_ctx.set_ready(false);
    service::stopping();
    let grace = daemon.server.config().shutdown_timeout;
    let stop = daemon.server.shutdown(grace);
    tokio::pin!(stop);
    tokio::select! {
        _ = &mut stop => {}
        // A second signal means "now".
        _ = sigterm.recv() => warn!("second signal; exiting at once"),
        _ = sigint.recv() => warn!("second signal; exiting at once"),
    }
    if let Some(admin) = daemon.admin {
        admin.stop().await;
    }
    if let Some(w) = watchdog {
        w.abort();
    }
    info!("stopped");
    Ok(())
}

/// The new process's start after a live upgrade: say hello, serve the
/// listening sockets handed over (binding only what the config on disk
/// added or moved), adopt the connections and counters, serve the admin
/// endpoint on the old one's socket. Returns the admin server.
async fn take_over(
    sock: std::os::unix::net::UnixStream,
    config: config::Config,
    server: &mut Server,
    admin_bind: Option<SocketAddr>,
    admin_ctx: &Arc<AdminContext>,
) -> Result<Option<AdminServer>, RunError> {
    let mut takeover = TakeOver::hello(sock).map_err(RunError::Upgrade)?;
    let sockets = takeover
        .listeners(server)
        .await
        .map_err(RunError::Upgrade)?;
    server.reload_inherited(config, sockets).await?;
    let handed = takeover.rest(server).await.map_err(RunError::Upgrade)?;
    let handed = handed.and_then(|fd| sockets::inherited_listener(fd).ok());
    let admin = match (admin_bind, handed) {
        (None, _) => None,
        (Some(bind), Some(l)) if l.local_addr().is_ok_and(|a| sockets::serves(a, bind)) => {
            let served = AdminServer::serve_on(l, admin_ctx.clone());
            Some(served.map_err(|source| RunError::Admin { addr: bind, source })?)
        }
        (Some(bind), _) => Some(start_admin(bind, admin_ctx)?),
    };
    takeover.main_pid_sent(server).await;
    Ok(admin)
}

/// An upgrade's hello, or never when none is under way.
async fn hello_of(upgrading: &mut Option<Upgrade>) -> Result<u32, String> {
    match upgrading {
        Some(u) => u.hello().await,
        None => std::future::pending().await,
    }
}

fn start_admin(bind: SocketAddr, ctx: &Arc<AdminContext>) -> Result<AdminServer, RunError> {
    AdminServer::start(bind, ctx.clone()).map_err(|source| RunError::Admin { addr: bind, source })
}

/// The running daemon: the proxy, its admin endpoint, the config path.
struct Daemon {
    server: Server,
    admin_ctx: Arc<AdminContext>,
    admin: Option<AdminServer>,
    path: PathBuf,
}

impl Daemon {
    /// Hand everything to an upgrade's new process (after its hello).
    async fn hand_over(&mut self, upgrade: Upgrade) -> Result<(), String> {
        let grace = self.server.config().shutdown_timeout;
        let admin = &mut self.admin;
        let stop_admin = async || {
            let a = admin.take()?;
            let fd = a.socket().try_clone_to_owned().ok();
            a.stop().await;
            fd
        };
        upgrade
            .hand_over(&mut self.server, grace, stop_admin)
            .await
            .map(|_| ())
    }

    /// A live upgrade failed: log why and count it; this process serves on.
    fn upgrade_failed(&self, reason: &str) {
        // Counted before it is logged, as reloads are.
        self.server.metrics().record_upgrade(false);
        error!(reason, "live upgrade failed; this process keeps serving");
    }

    /// Reload and count the result; the watcher, if any, then watches the
    /// files of the configuration that runs.
    async fn reload(&mut self, trigger: Trigger, watcher: &mut Option<ConfigWatcher>) -> bool {
        service::reloading();
        let settle = match trigger {
            Trigger::Signal => None,
            Trigger::FileChange => watcher.as_mut(),
        };
        info!(trigger = trigger.name(), "reloading configuration");
        let outcome = match self.load(settle).await {
            Ok(config) => self.apply(config).await,
            Err(e) => Err(e.into()),
        };
        // Counted before the outcome is logged: whoever reads the log line
        // and then scrapes sees the count that goes with it.
        self.server.metrics().record_reload(outcome.is_ok());
        match &outcome {
            Ok(changes) => info!(changes, "configuration reloaded"),
            Err(e) => error!(error = %e, "reload failed; the running configuration stays"),
        }
        if let Some(w) = watcher {
            w.set_files(&self.server.config().files());
        }
        // Serving either way: the new config, or the old one kept.
        service::ready();
        outcome.is_ok()
    }

    /// Load and validate the file. After a change `--watch` saw (`settle`
    /// is its watcher), a certificate or key that does not load is most
    /// often a renewal caught between its two writes (the key is new, the
    /// certificate not yet): the load is tried again at each further change
    /// for up to [`SETTLE`] before it counts as a failure.
    async fn load(
        &self,
        mut settle: Option<&mut ConfigWatcher>,
    ) -> Result<config::Config, ConfigError> {
        let settled = tokio::time::Instant::now() + SETTLE;
        loop {
            let loaded = load_off_thread(&self.path).await;
            let Some(w) = settle.as_deref_mut() else {
                return loaded;
            };
            match loaded {
                Err(e) if e.is_certificate_file() => {
                    debug!(error = %e, "a certificate or key does not load yet; waiting for the next change");
                    tokio::select! {
                        () = w.changed() => continue,
                        () = tokio::time::sleep_until(settled) => return Err(e),
                    }
                }
                loaded => return loaded,
            }
        }
    }

    /// Apply a loaded config; on any error the running one stays. A moved
    /// admin endpoint is bound before anything changes. Returns how many
    /// changes were applied.
    async fn apply(&mut self, config: config::Config) -> Result<usize, RunError> {
        let old_bind = self.server.config().admin.as_ref().map(|a| a.bind);
        let new_admin = match &config.admin {
            Some(a) if Some(a.bind) != old_bind => Some(start_admin(a.bind, &self.admin_ctx)?),
            _ => None,
        };
        let admin_config = config.admin.clone();
        match self.server.reload(config).await {
            Ok(summary) => {
                for change in &summary.changes {
                    info!(listener = %change.listener(), ?change, "config change");
                }
                self.admin_ctx.token.store(Arc::new(
                    admin_config.as_ref().and_then(|a| a.token.clone()),
                ));
                if (new_admin.is_some() || admin_config.is_none())
                    && let Some(old) = std::mem::replace(&mut self.admin, new_admin)
                {
                    old.stop().await;
                }
                Ok(summary.changes.len())
            }
            Err(e) => {
                if let Some(unused) = new_admin {
                    unused.stop().await;
                }
                Err(e.into())
            }
        }
    }
}

/// What asked for a reload.
#[derive(Debug, Clone, Copy)]
enum Trigger {
    Signal,
    FileChange,
}

impl Trigger {
    fn name(self) -> &'static str {
        match self {
            Trigger::Signal => "SIGHUP",
            Trigger::FileChange => "file change",
        }
    }
}

/// How long `--watch` waits for a certificate caught half-renewed to be
/// completed before the reload counts as failed.
const SETTLE: Duration = Duration::from_secs(5);

/// Loading resolves host names: keep that off the serving threads.
async fn load_off_thread(path: &Path) -> Result<config::Config, ConfigError> {
    let file = path.to_owned();
    tokio::task::spawn_blocking(move || config::load_file(&file))
        .await
        .expect("config loading does not panic")
}
