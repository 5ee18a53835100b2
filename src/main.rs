//! The `berth` binary: command line, logging, signals. Everything else lives
//! in the library.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context as _;
use berth::app::App;
use berth::config::{Config, ConfigError};
use clap::{Parser, Subcommand, ValueEnum};

/// jemalloc keeps idle connections smaller than glibc's malloc: with 9,000
/// idle ws connections held (BERTH_WORKERS=1), RSS grew 2.3 KiB per
/// connection against 2.9 KiB, at the same CPU per message.
#[global_allocator]
static GLOBAL: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// jemalloc's options, read once when it starts (`_RJEM_MALLOC_CONF` in the
/// environment still overrides them). Memory freed after a burst of
/// handshakes goes back to the kernel within about 300 ms, purged by
/// jemalloc's own background thread, so an idle proxy does not keep the
/// burst's high-water mark resident: with 9,900 idle ws connections held,
/// RSS grew 1.8 KiB per connection instead of 2.2 KiB (see the README's
/// Performance section).
///
/// The symbol is a `const char *` that jemalloc reads; a reference to a
/// NUL-terminated byte array has that layout.
#[allow(unsafe_code)]
#[export_name = "_rjem_malloc_conf"]
pub static MALLOC_CONF: &[u8; 67] =
    b"background_thread:true,max_background_threads:1,dirty_decay_ms:300\0";

#[derive(Parser)]
#[command(
    name = "berth",
    version,
    about = "A WebSocket-aware, TLS-terminating reverse proxy and sticky load balancer"
)]
struct Cli {
    /// Log format: human-readable text or one JSON object per line.
    #[arg(long, value_enum, default_value_t = LogFormat::Text, global = true)]
    log_format: LogFormat,
    /// Log level or filter (e.g. "info", "berth=debug"); RUST_LOG is used when this is absent.
    #[arg(long, global = true)]
    log_level: Option<String>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Subcommand)]
enum Command {
    /// Run the proxy with a config file. Validates it fully before binding anything.
    ///
    /// SIGHUP re-reads the file (an invalid one is logged and the running config
    /// stays); SIGTERM or SIGINT stop accepting, close WebSockets with 1001 spread
    /// over shutdown_window, and exit 0; a second signal exits at once.
    Run {
        /// Path to the TOML config file.
        #[arg(long, short, default_value = "config/berth.toml")]
        config: PathBuf,
    },
    /// Validate a config file: exit 0 if it is valid, or print every problem
    /// as FILE:LINE: KEY: MESSAGE and exit 2.
    Check {
        /// Path to the TOML config file.
        #[arg(long, short, default_value = "config/berth.toml")]
        config: PathBuf,
    },
    /// Start a self-contained demo: three WebSocket backends on loopback and
    /// the proxy on https://localhost:8443 with a self-signed certificate.
    Demo {
        /// Where the demo proxy listens.
        #[arg(long, default_value = "127.0.0.1:8443")]
        bind: std::net::SocketAddr,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging(cli.log_format, cli.log_level.as_deref());
    match cli.command {
        Command::Check { config } => match Config::load(&config) {
            Ok(_) => {
                println!("{}: ok", config.display());
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("{e}");
                ExitCode::from(2)
            }
        },
        Command::Run { config } => {
            let config = match Config::load(&config) {
                Ok(c) => c,
                Err(e @ (ConfigError::Invalid { .. } | ConfigError::Read { .. })) => {
                    eprintln!("{e}");
                    return ExitCode::from(2);
                }
            };
            exit_code(runtime().and_then(|rt| rt.block_on(run(config))))
        }
        Command::Demo { bind } => exit_code(
            runtime().and_then(|rt| rt.block_on(berth::demo::run(bind, shutdown_signal()))),
        ),
    }
}

fn exit_code(result: anyhow::Result<()>) -> ExitCode {
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("berth: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    // BERTH_WORKERS pins the worker count (the benchmarks use 1).
    if let Some(n) = std::env::var("BERTH_WORKERS")
        .ok()
        .and_then(|v| v.parse().ok())
    {
        builder.worker_threads(n);
    }
    builder
        .enable_all()
        .build()
        .context("cannot start the tokio runtime")
}

async fn run(config: Config) -> anyhow::Result<()> {
    raise_fd_limit();
    let app = App::bind(config).await.context("cannot start")?;
    let reloader = app.reloader();
    // SIGHUP re-reads the config file; a bad file is logged and ignored.
    #[cfg(unix)]
    tokio::spawn(async move {
        use tokio::signal::unix::{signal, SignalKind};
        let Ok(mut hup) = signal(SignalKind::hangup()) else {
            return;
        };
        while hup.recv().await.is_some() {
            let _ = reloader.reload().await;
        }
    });
    app.run(shutdown_signal()).await;
    Ok(())
}

/// Raises RLIMIT_NOFILE to its hard limit: every proxied WebSocket costs two
/// descriptors.
fn raise_fd_limit() {
    match rlimit::increase_nofile_limit(u64::MAX) {
        Ok(n) => tracing::info!(limit = n, "open file limit raised to the hard limit"),
        Err(e) => tracing::warn!(error = %e, "cannot raise the open file limit"),
    }
}

/// Resolves on the first SIGTERM or SIGINT; a second one exits at once.
async fn shutdown_signal() {
    wait_for_signal().await;
    tokio::spawn(async {
        wait_for_signal().await;
        tracing::warn!("second signal: exiting now");
        std::process::exit(1);
    });
}

async fn wait_for_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        match (
            signal(SignalKind::terminate()),
            signal(SignalKind::interrupt()),
        ) {
            (Ok(mut term), Ok(mut int)) => {
                tokio::select! {
                    _ = term.recv() => {}
                    _ = int.recv() => {}
                }
            }
            _ => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}

fn init_logging(format: LogFormat, level: Option<&str>) {
    use tracing_subscriber::EnvFilter;
    let filter = match level {
        Some(l) => EnvFilter::try_new(l).unwrap_or_else(|_| EnvFilter::new("info")),
        None => EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")),
    };
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().flatten_event(true).init(),
    }
}
