//! The `berth` binary: command line, logging, signals, the pid file, and
//! the shell completions and man page generated from the command line's own
//! definition. Everything else lives in the library.

use std::future::Future;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::{Arc, OnceLock};

use anyhow::Context as _;
use berth::app::App;
use berth::config::Config;
use clap::{Args, CommandFactory as _, FromArgMatches as _, Parser, Subcommand, ValueEnum};

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

/// `berth --version`: the crate version and the commit it was built from
/// (see build.rs; "unknown" outside a git checkout).
const VERSION: &str = concat!(
    env!("CARGO_PKG_VERSION"),
    " (commit ",
    env!("BERTH_GIT_COMMIT"),
    ")"
);

/// The exit codes, for `--help` and the man page. The README's command
/// table says the same.
const EXIT_CODES: [(u8, &str); 3] = [
    (
        0,
        "success; run and demo: stopped cleanly after SIGTERM or SIGINT",
    ),
    (
        1,
        "runtime failure: a listener or the admin API cannot bind, the pid file cannot be \
         written, or a second signal forced the exit",
    ),
    (
        2,
        "invalid or unreadable config file (check, run), or an invalid command line",
    ),
];

/// Exit code 2: the config file (or the command line) is wrong.
const EXIT_INVALID_CONFIG: u8 = 2;

#[derive(Parser)]
#[command(
    name = "berth",
    version = VERSION,
    about = "A WebSocket-aware, TLS-terminating reverse proxy and sticky load balancer",
    long_about = "A WebSocket-aware, TLS-terminating reverse proxy and sticky load balancer.\n\n\
        berth reads one TOML config file: `berth check` validates it, `berth run` serves it. \
        The README documents every key, the admin API and the metrics."
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

/// The config file, given as `FILE` or as `--config FILE`.
#[derive(Args)]
struct ConfigPath {
    /// Path to the TOML config file (default config/berth.toml).
    #[arg(value_name = "FILE", conflicts_with = "config")]
    file: Option<PathBuf>,
    /// Path to the TOML config file, as an option (the same as FILE).
    #[arg(long, short, value_name = "FILE")]
    config: Option<PathBuf>,
}

impl ConfigPath {
    fn path(self) -> PathBuf {
        self.file
            .or(self.config)
            .unwrap_or_else(|| PathBuf::from("config/berth.toml"))
    }
}

#[derive(Subcommand)]
enum Command {
    /// Run the proxy with a config file. Validates it fully before binding anything.
    ///
    /// SIGHUP re-reads the file (an invalid one is logged and the running config
    /// stays); SIGTERM or SIGINT stop accepting, close WebSockets with 1001 spread
    /// over shutdown_window, and exit 0; a second signal exits at once.
    Run {
        #[command(flatten)]
        config: ConfigPath,
        /// Reload whenever the config file changes, as SIGHUP does (the file is
        /// looked at every second by path, so a Kubernetes ConfigMap's symlink
        /// swap counts; a change is applied once it has settled for a second).
        #[arg(long)]
        watch: bool,
        /// Write berth's process id to this file once every socket is bound
        /// (and the signal handlers are in place); it is removed on exit.
        #[arg(long, value_name = "FILE")]
        pid_file: Option<PathBuf>,
    },
    /// Validate a config file: exit 0 if it is valid, or print every problem
    /// as FILE:LINE: KEY: MESSAGE and exit 2.
    Check {
        #[command(flatten)]
        config: ConfigPath,
    },
    /// Start a self-contained demo: three WebSocket backends on loopback and
    /// the proxy on https://localhost:8443 with a self-signed certificate.
    Demo {
        /// Where the demo proxy listens.
        #[arg(long, default_value = "127.0.0.1:8443")]
        bind: std::net::SocketAddr,
    },
    /// Print a shell completion script for berth to standard output.
    ///
    /// bash: berth completions bash > /usr/share/bash-completion/completions/berth;
    /// zsh: berth completions zsh > "${fpath[1]}/_berth";
    /// fish: berth completions fish > ~/.config/fish/completions/berth.fish.
    Completions {
        /// The shell to complete for.
        #[arg(value_name = "SHELL")]
        shell: clap_complete::Shell,
    },
    /// Print berth's man page (roff) to standard output.
    ///
    /// View it with `berth manpage | man -l -`, or install it with
    /// `berth manpage > /usr/local/share/man/man1/berth.1`.
    Manpage,
}

/// The command line's definition, with the exit codes in `--help`.
fn cli_command() -> clap::Command {
    let mut exit = String::from("Exit status:");
    for (code, meaning) in EXIT_CODES {
        exit.push_str(&format!("\n  {code}  {meaning}"));
    }
    Cli::command().after_long_help(exit)
}

fn main() -> ExitCode {
    let matches = cli_command().get_matches();
    let cli = match Cli::from_arg_matches(&matches) {
        Ok(cli) => cli,
        Err(e) => e.exit(),
    };
    match cli.command {
        Command::Completions { shell } => {
            let mut script = Vec::new();
            clap_complete::generate(shell, &mut cli_command(), "berth", &mut script);
            write_stdout(&script)
        }
        Command::Manpage => match manpage() {
            Ok(page) => write_stdout(&page),
            Err(e) => exit_code(Err(
                anyhow::Error::new(e).context("cannot render the man page")
            )),
        },
        Command::Check { config } => {
            init_logging(cli.log_format, cli.log_level.as_deref());
            let config = config.path();
            match Config::load(&config) {
                Ok(_) => {
                    println!("{}: ok", config.display());
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("{e}");
                    ExitCode::from(EXIT_INVALID_CONFIG)
                }
            }
        }
        Command::Run {
            config,
            pid_file,
            watch,
        } => {
            init_logging(cli.log_format, cli.log_level.as_deref());
            let config = match Config::load(&config.path()) {
                Ok(c) => c,
                Err(e) => {
                    eprintln!("{e}");
                    return ExitCode::from(EXIT_INVALID_CONFIG);
                }
            };
            exit_code(runtime().and_then(|rt| rt.block_on(run(config, pid_file, watch))))
        }
        Command::Demo { bind } => {
            init_logging(cli.log_format, cli.log_level.as_deref());
            exit_code(runtime().and_then(|rt| {
                rt.block_on(async { berth::demo::run(bind, shutdown_signal()).await })
            }))
        }
    }
}

/// Writes generated text to stdout. A reader that stops early (`| head`)
/// is not an error.
fn write_stdout(bytes: &[u8]) -> ExitCode {
    let mut out = std::io::stdout().lock();
    match out.write_all(bytes).and_then(|()| out.flush()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => ExitCode::SUCCESS,
        Err(e) => exit_code(Err(anyhow::Error::new(e).context("cannot write to stdout"))),
    }
}

fn exit_code(result: anyhow::Result<()>) -> ExitCode {
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("berth: {}", error_message(&e));
            ExitCode::FAILURE
        }
    }
}

/// The error and its causes on one line, each said once: an error that
/// already quotes its source (as "cannot bind ...: {os error}" does) is not
/// followed by that source again.
fn error_message(e: &anyhow::Error) -> String {
    let mut message = String::new();
    for cause in e.chain() {
        let text = cause.to_string();
        if message.contains(&text) {
            continue;
        }
        if !message.is_empty() {
            message.push_str(": ");
        }
        message.push_str(&text);
    }
    message
}

/// The tokio runtime: as many worker threads as `BERTH_WORKERS` says (the
/// benchmarks use 1), or as the CPUs the process may use. With one, the
/// single-threaded scheduler: the same one thread of work without the
/// work-stealing pool's bookkeeping (its per-batch clock reads and poll-time
/// averages, the parked-worker handshake), which cost about 80 user-space
/// instructions per relayed 64 B message, a tenth of the total.
fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    let workers = std::env::var("BERTH_WORKERS")
        .ok()
        .and_then(|v| v.parse::<usize>().ok())
        .filter(|&n| n > 0)
        .or_else(|| std::thread::available_parallelism().ok().map(|n| n.get()))
        .unwrap_or(1);
    let mut builder = if workers == 1 {
        tokio::runtime::Builder::new_current_thread()
    } else {
        let mut builder = tokio::runtime::Builder::new_multi_thread();
        builder.worker_threads(workers);
        builder
    };
    builder
        .enable_all()
        .build()
        .context("cannot start the tokio runtime")
}

async fn run(config: Config, pid_file: Option<PathBuf>, watch: bool) -> anyhow::Result<()> {
    raise_fd_limit();
    let app = App::bind(config).await.context("cannot start")?;
    let reloader = app.reloader();
    let watching = tokio_util::sync::CancellationToken::new();
    if watch {
        tokio::spawn(berth::reload::watch::watch(
            Arc::clone(&reloader),
            berth::reload::watch::WATCH_INTERVAL,
            watching.clone(),
        ));
    }
    // Every signal handler is installed before the pid file exists: a
    // SIGHUP sent the moment it appears must reload, not kill, berth.
    let shutdown = shutdown_signal();
    // SIGHUP re-reads the config file; a bad file is logged and ignored.
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        match signal(SignalKind::hangup()) {
            Ok(mut hup) => {
                tokio::spawn(async move {
                    while hup.recv().await.is_some() {
                        let _ = reloader.reload().await;
                    }
                });
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot handle SIGHUP: reload through the admin API")
            }
        }
    }
    if let Some(path) = pid_file {
        write_pid_file(&path)?;
        // Only a path whose file was written is ever removed.
        let _ = PID_FILE.set(path);
    }
    app.run(shutdown).await;
    watching.cancel();
    remove_pid_file();
    Ok(())
}

/// The pid file this process wrote, if any.
static PID_FILE: OnceLock<PathBuf> = OnceLock::new();

/// Writes this process's id to `path`. The file is written beside it and
/// renamed into place, so a reader never sees it empty or half-written.
fn write_pid_file(path: &Path) -> anyhow::Result<()> {
    let pid = std::process::id();
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(format!(".{pid}.tmp"));
    let tmp = PathBuf::from(tmp);
    std::fs::write(&tmp, format!("{pid}\n"))
        .and_then(|()| std::fs::rename(&tmp, path))
        .inspect_err(|_| {
            let _ = std::fs::remove_file(&tmp);
        })
        .with_context(|| format!("cannot write the pid file {}", path.display()))
}

/// Removes the pid file on exit, unless another process has written its own
/// id there since (two berths pointed at one file).
fn remove_pid_file() {
    let Some(path) = PID_FILE.get() else {
        return;
    };
    let ours = std::fs::read_to_string(path)
        .is_ok_and(|text| text.trim() == std::process::id().to_string());
    if ours {
        if let Err(e) = std::fs::remove_file(path) {
            tracing::warn!(path = %path.display(), error = %e, "cannot remove the pid file");
        }
    }
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
/// The handlers are installed when this is called (inside the runtime), not
/// when the future is first polled, so no signal in between kills berth.
fn shutdown_signal() -> impl Future<Output = ()> + Send + 'static {
    let mut signals = Signals::install();
    async move {
        signals.next().await;
        tokio::spawn(async move {
            signals.next().await;
            tracing::warn!("second signal: exiting now");
            remove_pid_file();
            std::process::exit(1);
        });
    }
}

/// SIGTERM and SIGINT handlers (Ctrl-C only where there are no Unix signals,
/// or where installing them failed).
struct Signals {
    #[cfg(unix)]
    handlers: Option<(tokio::signal::unix::Signal, tokio::signal::unix::Signal)>,
}

impl Signals {
    fn install() -> Signals {
        #[cfg(unix)]
        {
            use tokio::signal::unix::{signal, SignalKind};
            let handlers = match (
                signal(SignalKind::terminate()),
                signal(SignalKind::interrupt()),
            ) {
                (Ok(term), Ok(int)) => Some((term, int)),
                _ => None,
            };
            Signals { handlers }
        }
        #[cfg(not(unix))]
        Signals {}
    }

    async fn next(&mut self) {
        #[cfg(unix)]
        if let Some((term, int)) = &mut self.handlers {
            tokio::select! {
                _ = term.recv() => {}
                _ = int.recv() => {}
            }
            return;
        }
        let _ = tokio::signal::ctrl_c().await;
    }
}

/// Colour in the text logs only for a person at a terminal: never when
/// stderr is a file or a pipe, and never with NO_COLOR set (no-color.org).
fn log_colour() -> bool {
    use std::io::IsTerminal as _;
    std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty()) && std::io::stderr().is_terminal()
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
        LogFormat::Text => builder.with_ansi(log_colour()).init(),
        LogFormat::Json => builder.with_ansi(false).json().flatten_event(true).init(),
    }
}

/// berth(1): the top-level command's sections as clap_mangen renders them,
/// then a COMMANDS section with every subcommand's usage, description and
/// options, then the exit status. All of it comes from the clap definition.
fn manpage() -> std::io::Result<Vec<u8>> {
    use clap_mangen::roff::{bold, roman, Roff};
    let mut cmd = cli_command();
    cmd.build();
    let man = clap_mangen::Man::new(cmd.clone()).title("BERTH");
    let mut page = Vec::new();
    man.render_title(&mut page)?;
    for render in [
        clap_mangen::Man::render_name_section,
        clap_mangen::Man::render_synopsis_section,
        clap_mangen::Man::render_description_section,
        clap_mangen::Man::render_options_section,
    ] {
        let mut part = Vec::new();
        render(&man, &mut part)?;
        page.extend_from_slice(without_preamble(&part));
    }

    let mut roff = Roff::default();
    roff.control("SH", ["COMMANDS"]);
    for sub in cmd.get_subcommands().filter(|s| !s.is_hide_set()) {
        let name = format!("berth {}", sub.get_name());
        roff.control("SS", [name.as_str()]);
        let usage = sub.clone().render_usage().to_string();
        let usage = usage.trim().trim_start_matches("Usage:").trim();
        roff.text([bold(usage)]);
        if let Some(about) = sub.get_long_about().or_else(|| sub.get_about()) {
            for paragraph in about.to_string().split("\n\n") {
                roff.control("PP", []);
                roff.text([roman(paragraph.replace('\n', " "))]);
            }
        }
        for arg in sub
            .get_arguments()
            .filter(|a| !a.is_hide_set() && !a.is_global_set() && a.get_id().as_str() != "help")
        {
            roff.control("TP", []);
            roff.text([bold(arg_label(arg))]);
            let mut help = arg.get_help().map(|h| h.to_string()).unwrap_or_default();
            // clap drops the full stop that ends a one-line doc comment.
            if !help.is_empty() && !help.ends_with('.') {
                help.push('.');
            }
            let values: Vec<String> = arg
                .get_possible_values()
                .iter()
                .filter(|v| !v.is_hide_set())
                .map(|v| v.get_name().to_string())
                .collect();
            if !values.is_empty() {
                help.push_str(&format!(" One of: {}.", values.join(", ")));
            }
            if let Some(default) = arg.get_default_values().first() {
                help.push_str(&format!(" Default: {}.", default.to_string_lossy()));
            }
            roff.text([roman(help.trim())]);
        }
    }
    roff.control("SH", ["EXIT STATUS"]);
    for (code, meaning) in EXIT_CODES {
        roff.control("TP", []);
        roff.text([bold(code.to_string())]);
        roff.text([roman(meaning)]);
    }
    let mut part = Vec::new();
    roff.to_writer(&mut part)?;
    page.extend_from_slice(without_preamble(&part));

    let mut part = Vec::new();
    man.render_version_section(&mut part)?;
    page.extend_from_slice(without_preamble(&part));
    Ok(page)
}

/// The roff crate starts every rendering with the same two lines that
/// define the apostrophe string; the page needs them once, at the top.
fn without_preamble(part: &[u8]) -> &[u8] {
    let mut rest = part;
    for prefix in [&b".ie \\n(.g .ds Aq"[..], &b".el .ds Aq"[..]] {
        if rest.starts_with(prefix) {
            let end = rest
                .iter()
                .position(|&b| b == b'\n')
                .map_or(rest.len(), |i| i + 1);
            rest = &rest[end..];
        }
    }
    rest
}

/// How an argument is written on the command line: `-c, --config <FILE>`,
/// `--pid-file <FILE>` or `[FILE]`.
fn arg_label(arg: &clap::Arg) -> String {
    let value = arg
        .get_value_names()
        .map(|names| names.join(" "))
        .unwrap_or_else(|| arg.get_id().as_str().to_uppercase());
    if arg.is_positional() {
        return if arg.is_required_set() {
            format!("<{value}>")
        } else {
            format!("[{value}]")
        };
    }
    let mut names = Vec::new();
    if let Some(short) = arg.get_short() {
        names.push(format!("-{short}"));
    }
    if let Some(long) = arg.get_long() {
        names.push(format!("--{long}"));
    }
    let mut label = names.join(", ");
    if arg.get_action().takes_values() {
        label.push_str(&format!(" <{value}>"));
    }
    label
}
