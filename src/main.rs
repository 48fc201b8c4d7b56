//! The `switchyard` command: parse the CLI, set up logging, call the library.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{CommandFactory, Parser, Subcommand, ValueEnum};
use switchyard::backend::AdminState;
use switchyard::config;
use switchyard::control::{self, ControlError};
use switchyard::daemon::{self, RunOptions};

/// jemalloc rather than glibc's allocator: each connection's task and its
/// two socket registrations are cache-line-aligned allocations (tokio's
/// layout), which glibc pads and leaves fragments around, and jemalloc's
/// size classes hold exactly. Measured with `benches/load/idle.py`: 2.01
/// KiB per idle proxied connection with glibc, 1.22 KiB with jemalloc.
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// jemalloc's options, read before `main`: memory freed by connections
/// that closed goes back to the system within about a second, by a
/// background thread rather than on the data path, and for good
/// (`MADV_DONTNEED`, not the lazy `MADV_FREE`, which still counts in RSS).
/// `_RJEM_MALLOC_CONF` in the environment overrides them.
#[unsafe(export_name = "_rjem_malloc_conf")]
static MALLOC_CONF: Option<&'static std::ffi::c_char> = Some(unsafe {
    &*c"background_thread:true,max_background_threads:1,dirty_decay_ms:1000,muzzy_decay_ms:0"
        .as_ptr()
});

#[derive(Parser, Debug)]
#[command(
    name = "switchyard",
    version,
    about = "Layer-4 load balancer",
    disable_help_subcommand = true
)]
struct Cli {
    /// Log format on stderr.
    #[arg(long, value_enum, default_value_t = LogFormat::Text, global = true)]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run the daemon in the foreground.
    Run {
        /// Config file.
        #[arg(long, default_value = config::DEFAULT_PATH)]
        config: PathBuf,
        /// Also reload when the config file changes on disk.
        #[arg(long)]
        watch: bool,
    },
    /// Validate a config file, print a summary, exit 0 (valid) or 1.
    Check {
        /// Config file.
        #[arg(long, default_value = config::DEFAULT_PATH)]
        config: PathBuf,
    },
    /// Show the running daemon's listeners and backends; exit 1 when a
    /// listener has no usable backend.
    Status {
        #[command(flatten)]
        admin: AdminArgs,
        /// Print the admin endpoint's status document (JSON) instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Set a backend's admin state: `ready`, `drain` (no new connections but
    /// sticky ones) or `maint` (no new connections).
    State {
        /// The listener's name.
        listener: String,
        /// The backend's name (as `switchyard status` shows it).
        backend: String,
        /// The new admin state.
        #[arg(value_enum)]
        state: StateArg,
        #[command(flatten)]
        admin: AdminArgs,
        /// File holding the admin token [default: the config's `[admin] token_file`].
        #[arg(long, value_name = "PATH")]
        token_file: Option<PathBuf>,
    },
    /// Print a shell completion script (for the package, or
    /// `source <(switchyard completions bash)`).
    Completions {
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
    /// Print the manual page (roff), e.g. `switchyard man | man -l -`; with
    /// `--dir`, write it and one page per subcommand there.
    Man {
        /// Write switchyard.1, switchyard-run.1, ... into this directory.
        #[arg(long, value_name = "DIR")]
        dir: Option<PathBuf>,
    },
}

/// Where `status` and `state` find the daemon.
#[derive(clap::Args, Debug)]
struct AdminArgs {
    /// The admin endpoint, `http://HOST:PORT` [default: the config's
    /// `[admin] bind`, else http://127.0.0.1:9900].
    #[arg(long, value_name = "URL")]
    admin: Option<String>,
    /// The config file whose `[admin]` gives the defaults.
    #[arg(long, default_value = config::DEFAULT_PATH)]
    config: PathBuf,
}

#[derive(Copy, Clone, Debug, ValueEnum)]
enum StateArg {
    Ready,
    Drain,
    Maint,
}

#[derive(Copy, Clone, Debug, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

fn main() -> ExitCode {
    // Before anything could change the working directory: SIGUSR2 starts
    // the file at this path (see `upgrade`).
    switchyard::upgrade::remember_executable();
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            let _ = e.print();
            // Help and version are not errors; bad usage exits 1 as the CLI
            // contract says (clap's own default would be 2).
            return if e.use_stderr() {
                ExitCode::from(1)
            } else {
                ExitCode::SUCCESS
            };
        }
    };
    init_logging(cli.log_format);
    match cli.command {
        Command::Check { config } => check(&config),
        Command::Run { config, watch } => run(RunOptions { config, watch }),
        Command::Status { admin, json } => control(status(admin, json)),
        Command::State {
            listener,
            backend,
            state,
            admin,
            token_file,
        } => control(set_state(listener, backend, state, admin, token_file)),
        Command::Completions { shell } => {
            clap_complete::generate(
                shell,
                &mut Cli::command(),
                "switchyard",
                &mut std::io::stdout(),
            );
            ExitCode::SUCCESS
        }
        Command::Man { dir } => {
            let written = match &dir {
                Some(dir) => clap_mangen::generate_to(Cli::command(), dir),
                None => clap_mangen::Man::new(Cli::command()).render(&mut std::io::stdout()),
            };
            match written {
                Ok(()) => ExitCode::SUCCESS,
                // `switchyard man | head` is not an error.
                Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => ExitCode::SUCCESS,
                Err(e) => {
                    match dir {
                        Some(dir) => eprintln!("error: {}: {e}", dir.display()),
                        None => eprintln!("error: {e}"),
                    }
                    ExitCode::from(2)
                }
            }
        }
    }
}

/// Run a `status` or `state` exchange on a small runtime of its own.
fn control(work: impl std::future::Future<Output = Result<ExitCode, ControlError>>) -> ExitCode {
    let runtime = match runtime(tokio::runtime::Builder::new_current_thread()) {
        Ok(rt) => rt,
        Err(code) => return code,
    };
    match runtime.block_on(work) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e}");
            // A mistake of the caller's is bad usage (1); a daemon that
            // cannot be reached or fails is a runtime failure (2).
            ExitCode::from(match e {
                ControlError::Usage(_)
                | ControlError::Unauthorized { .. }
                | ControlError::NotFound { .. } => 1,
                ControlError::Unreachable { .. } | ControlError::Refused { .. } => 2,
            })
        }
    }
}

async fn status(args: AdminArgs, json: bool) -> Result<ExitCode, ControlError> {
    let (url, _) = control::target(args.admin.as_deref(), None, &args.config)?;
    let body = control::fetch_status(&url).await?;
    let status = control::Status::parse(&body)?;
    if json {
        println!("{body}");
    } else {
        let colour = std::io::IsTerminal::is_terminal(&std::io::stdout());
        print!("{}", status.table(colour));
    }
    let mut code = ExitCode::SUCCESS;
    for l in status.unusable() {
        eprintln!("listener {} has no usable backend", l.name);
        code = ExitCode::from(1);
    }
    Ok(code)
}

async fn set_state(
    listener: String,
    backend: String,
    state: StateArg,
    args: AdminArgs,
    token_file: Option<PathBuf>,
) -> Result<ExitCode, ControlError> {
    let (url, token) = control::target(args.admin.as_deref(), token_file.as_deref(), &args.config)?;
    let state = match state {
        StateArg::Ready => AdminState::Ready,
        StateArg::Drain => AdminState::Drain,
        StateArg::Maint => AdminState::Maint,
    };
    control::set_state(&url, token.as_deref(), &listener, &backend, state.as_str()).await?;
    println!("{listener}/{backend}: {}", state.as_str());
    Ok(ExitCode::SUCCESS)
}

fn check(path: &std::path::Path) -> ExitCode {
    match config::load_file(path) {
        Ok(c) => {
            print!("{}", c.summary());
            println!("{}: configuration is valid", path.display());
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::from(1)
        }
    }
}

fn run(options: RunOptions) -> ExitCode {
    let runtime = match runtime(tokio::runtime::Builder::new_multi_thread()) {
        Ok(rt) => rt,
        Err(code) => return code,
    };
    match runtime.block_on(daemon::run(options)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e}");
            ExitCode::from(e.exit_code() as u8)
        }
    }
}

/// A runtime from `builder` with I/O and timers, or exit code 2 (a
/// runtime failure) with the reason on stderr.
fn runtime(mut builder: tokio::runtime::Builder) -> Result<tokio::runtime::Runtime, ExitCode> {
    builder.enable_all().build().map_err(|e| {
        eprintln!("error: cannot start runtime: {e}");
        ExitCode::from(2)
    })
}

fn init_logging(format: LogFormat) {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        // Colour only for a person at a terminal, never into journald.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()));
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}
