//! The `switchyard` command: parse the CLI, set up logging, call the library.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand, ValueEnum};
use switchyard::config;
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
#[command(name = "switchyard", version, about = "Layer-4 load balancer")]
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
    }
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
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start runtime: {e}");
            return ExitCode::from(2);
        }
    };
    match runtime.block_on(daemon::run(options)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e}");
            ExitCode::from(e.exit_code() as u8)
        }
    }
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
