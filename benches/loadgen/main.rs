//! berth's load generator and echo backend (benchmark issue 6).
//!
//! ```sh
//! cargo bench --bench loadgen -- echo-backend --listen 127.0.0.1:9101 --listen 127.0.0.1:9102
//! cargo bench --bench loadgen -- throughput --url ws://127.0.0.1:9101/ --connections 100 \
//!     --window 8 --size 64 --duration 10
//! cargo bench --bench loadgen -- latency --url wss://127.0.0.1:8443/ --ca certs/example.crt \
//!     --connections 1 --duration 10
//! cargo bench --bench loadgen -- idle --url ws://127.0.0.1:8080/ --connections 9900 --hold 10
//! cargo bench --bench loadgen -- handshake --url wss://127.0.0.1:8443/ --ca certs/example.crt \
//!     --concurrency 50 --duration 10
//! cargo bench --bench loadgen -- half-open --url wss://127.0.0.1:8443/ --stage hello \
//!     --connections 6000 --watch-pid "$(pidof berth)"
//! cargo bench --bench loadgen -- soak --url ws://127.0.0.1:8080/ --cookie soak \
//!     --connections 1000 --duration 60 --drained b1 --killed b2 --berth-pid PID
//! ```
//!
//! Every client mode targets loopback only, is bounded in time, and prints one
//! JSON object on stdout (progress goes to stderr). `--watch-pid PID` (any
//! number of times) makes the JSON include the CPU time (utime + stime from
//! /proc/PID/stat) those processes used during the measurement and their
//! VmRSS before and after. `benches/compare.sh` runs the whole suite against
//! berth, nginx and HAProxy; `benches/smoke.sh` is the CI smoke test.
//!
//! Started without a subcommand (as `cargo test --all-targets` does), it runs
//! a few in-process checks of its framing code and exits.

mod backend;
mod h2;
mod modes;
mod net;
mod report;
mod soak;
mod stage;
mod stats;
mod storm;
mod ws;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context as _};
use clap::{Args, Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "loadgen",
    about = "WebSocket load generator and echo backend for berth's benchmarks"
)]
struct Cli {
    /// Tokio worker threads; 1 (the default) runs everything on the calling thread.
    #[arg(long, default_value_t = 1, global = true)]
    threads: usize,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// WebSocket echo servers, one per listen address (raw framing).
    EchoBackend {
        /// A plain listener (repeat for more).
        #[arg(long)]
        listen: Vec<SocketAddr>,
        /// A TLS listener (repeat for more); needs --cert and --key.
        #[arg(long)]
        tls_listen: Vec<SocketAddr>,
        #[arg(long)]
        cert: Option<PathBuf>,
        #[arg(long)]
        key: Option<PathBuf>,
    },
    /// C connections with W messages of S bytes in flight each; every echo is
    /// verified byte for byte and in order.
    Throughput {
        #[command(flatten)]
        client: ClientArgs,
        #[arg(long, default_value_t = 100)]
        connections: usize,
        #[arg(long, default_value_t = 8)]
        window: usize,
        /// Message size in bytes (at least 8).
        #[arg(long, default_value_t = 64)]
        size: usize,
        /// Seconds.
        #[arg(long, default_value_t = 10.0)]
        duration: f64,
        /// Seconds of load before the measurement (0: none). Connections are
        /// drained between the two, so the measured counts are exact.
        #[arg(long, default_value_t = 0.0)]
        warmup: f64,
        /// A shell command run when the measurement is about to start, with
        /// no message in flight (e.g. `callgrind_control -i on PID`); the
        /// measurement starts when it has returned.
        #[arg(long)]
        start_cmd: Option<String>,
        /// A shell command run after the measurement, once every echo has
        /// arrived (e.g. `callgrind_control -i off PID`).
        #[arg(long)]
        end_cmd: Option<String>,
    },
    /// One message in flight per connection; round-trip percentiles.
    Latency {
        #[command(flatten)]
        client: ClientArgs,
        #[arg(long, default_value_t = 1)]
        connections: usize,
        #[arg(long, default_value_t = 64)]
        size: usize,
        #[arg(long, default_value_t = 10.0)]
        duration: f64,
    },
    /// Opens C connections, prints `READY <n>`, holds them, then checks that
    /// each still echoes.
    Idle {
        #[command(flatten)]
        client: ClientArgs,
        #[arg(long, default_value_t = 1000)]
        connections: usize,
        /// Seconds to hold the connections after `READY`.
        #[arg(long, default_value_t = 10.0)]
        hold: f64,
        /// Connections opened at once.
        #[arg(long, default_value_t = 128)]
        concurrency: usize,
        /// One echo on each connection as it opens (then it goes quiet).
        #[arg(long)]
        echo_first: bool,
    },
    /// Connect (TCP + TLS + upgrade), one echo, close; as fast as possible.
    Handshake {
        #[command(flatten)]
        client: ClientArgs,
        #[arg(long, default_value_t = 50)]
        concurrency: usize,
        #[arg(long, default_value_t = 10.0)]
        duration: f64,
    },
    /// Opens C connections that stop halfway through the TLS ClientHello
    /// (`--stage hello`, wss:// only) or the request head (`--stage head`,
    /// after the TLS handshake over wss://), holds them, and reports how much
    /// the watched processes' RSS grew per connection.
    HalfOpen {
        #[command(flatten)]
        client: ClientArgs,
        #[arg(long, default_value_t = 1000)]
        connections: usize,
        /// `hello` or `head`.
        #[arg(long, default_value = "head")]
        stage: String,
        /// Seconds to wait after the last connection before measuring.
        #[arg(long, default_value_t = 2.0)]
        settle: f64,
        /// Connections opened at once.
        #[arg(long, default_value_t = 128)]
        concurrency: usize,
    },
    /// The reconnect storm: C clients (TLS sessions resumed, each client
    /// with its own) connect, `--cut-cmd` cuts them all at once, and all
    /// reconnect at once; time until all are back, and the proxy's CPU.
    Storm {
        #[command(flatten)]
        client: ClientArgs,
        #[arg(long, default_value_t = 1000)]
        connections: usize,
        /// Connections opened at once before the cut.
        #[arg(long, default_value_t = 128)]
        concurrency: usize,
        /// The shell command that cuts every connection, e.g.
        /// `kill -USR1 BACKEND_PID` (the echo backend then closes all).
        #[arg(long)]
        cut_cmd: String,
        /// Seconds after the cut that clients keep trying to reconnect.
        #[arg(long, default_value_t = 60.0)]
        limit: f64,
    },
    /// C clients sending numbered messages through berth for a long time,
    /// reconnecting when berth closes them; checks every echo and how each
    /// connection ended (benches/soak.sh runs it).
    Soak {
        /// ws://HOST:PORT/PATH of berth's listener; loopback only.
        #[arg(long)]
        url: String,
        #[arg(long, default_value_t = 9000)]
        connections: usize,
        /// Seconds from "every client connected" to the stop.
        #[arg(long, default_value_t = 600.0)]
        duration: f64,
        /// Seconds between two messages of one client.
        #[arg(long, default_value_t = 1.0)]
        interval: f64,
        /// Message size in bytes (at least 8).
        #[arg(long, default_value_t = 32)]
        size: usize,
        #[arg(long, default_value_t = 128)]
        concurrency: usize,
        /// Client source addresses (as for idle).
        #[arg(long, default_value = "127.0.0.2-127.0.0.250")]
        source_ips: String,
        /// The pool's affinity cookie name.
        #[arg(long)]
        cookie: String,
        /// A backend id the script drains (repeatable).
        #[arg(long)]
        drained: Vec<String>,
        /// A backend id the script kills (repeatable).
        #[arg(long)]
        killed: Vec<String>,
        /// berth's pid: its open descriptors and RSS are measured.
        #[arg(long)]
        berth_pid: Option<u32>,
        /// Allowed change of descriptors and RSS, in per cent.
        #[arg(long, default_value_t = 5.0)]
        tolerance: f64,
    },
    /// Writes the markdown report of a `benches/compare.sh` results directory.
    Report {
        /// The results directory (see benches/loadgen/report.rs for its layout).
        #[arg(long)]
        dir: PathBuf,
        /// Targets in column order.
        #[arg(
            long,
            value_delimiter = ',',
            default_value = "berth,nginx,haproxy,direct"
        )]
        targets: Vec<String>,
        /// Output file (stdout when absent).
        #[arg(long)]
        out: Option<PathBuf>,
    },
    /// Prints N free loopback TCP ports (bound at once, so they differ).
    FreePorts {
        #[arg(long, default_value_t = 1)]
        count: usize,
    },
}

#[derive(Args)]
struct ClientArgs {
    /// ws://HOST:PORT/PATH or wss://...; loopback only.
    #[arg(long)]
    url: String,
    /// PEM certificate(s) to trust for wss:// (without it nothing is verified).
    #[arg(long)]
    ca: Option<PathBuf>,
    /// Client source addresses, e.g. 127.0.0.2-127.0.0.250 (connections
    /// rotate over them). Idle mode uses that range unless told otherwise;
    /// "none" lets the kernel choose.
    #[arg(long)]
    source_ips: Option<String>,
    /// Resume TLS sessions (off: every connection does a full handshake).
    #[arg(long)]
    resume: bool,
    /// Offer only this TLS key exchange group: X25519, secp256r1, secp384r1,
    /// or X25519MLKEM768 (the post-quantum hybrid; needs the loadgen built
    /// with aws-lc-rs, the default). Default: the provider's classical
    /// groups (no post-quantum hybrid).
    #[arg(long)]
    kx: Option<String>,
    /// Report CPU time and RSS of these processes over the measurement.
    #[arg(long)]
    watch_pid: Vec<u32>,
    /// WebSockets over HTTP/2 (RFC 8441 extended CONNECT), this many on
    /// each HTTP/2 connection: prior knowledge over ws://, ALPN h2 over
    /// wss://. Without it, each WebSocket is an HTTP/1.1 upgrade. 0 (idle
    /// mode only): HTTP/2 connections that open no stream at all.
    #[arg(long)]
    h2_streams: Option<usize>,
}

fn main() -> std::process::ExitCode {
    // `cargo bench` appends `--bench` to the arguments; it means nothing here.
    let args = std::env::args_os().filter(|a| a != "--bench");
    let cli = Cli::parse_from(args);
    let Some(command) = cli.command else {
        return match ws::self_check() {
            Ok(()) => {
                println!("loadgen: framing self-check passed (no subcommand given; see --help)");
                std::process::ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("loadgen: self-check failed: {e}");
                std::process::ExitCode::FAILURE
            }
        };
    };
    if let Err(e) = rlimit::increase_nofile_limit(u64::MAX) {
        eprintln!("loadgen: cannot raise the open file limit: {e}");
    }
    let rt = if cli.threads <= 1 {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
    } else {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(cli.threads)
            .enable_all()
            .build()
    };
    let result = rt
        .context("cannot start the tokio runtime")
        .and_then(|rt| rt.block_on(run(command)));
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("loadgen: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn secs(v: f64, what: &str) -> anyhow::Result<Duration> {
    if !(v.is_finite() && v > 0.0 && v <= 3600.0) {
        bail!("--{what} must be between 0 and 3600 seconds");
    }
    Ok(Duration::from_secs_f64(v))
}

async fn client(args: ClientArgs, default_sources: &str) -> anyhow::Result<modes::Client> {
    client_for(args, default_sources, false).await
}

/// The client of a mode; `idle` also accepts `--h2-streams 0`.
async fn client_for(
    args: ClientArgs,
    default_sources: &str,
    idle: bool,
) -> anyhow::Result<modes::Client> {
    if let Some(n) = args.h2_streams {
        h2::check_streams(n, idle)?;
    }
    let target = modes::Client {
        target: Arc::new(
            net::Target::parse(
                &args.url,
                args.ca.as_deref(),
                args.resume,
                args.kx.as_deref(),
                args.h2_streams,
            )
            .await?,
        ),
        source_ips: Arc::new(
            match args.source_ips.as_deref().unwrap_or(default_sources) {
                "" | "none" => Vec::new(),
                spec => net::parse_source_ips(spec)?,
            },
        ),
        watch: args.watch_pid,
    };
    Ok(target)
}

async fn run(command: Command) -> anyhow::Result<()> {
    let report = match command {
        Command::EchoBackend {
            listen,
            tls_listen,
            cert,
            key,
        } => {
            return backend::run(backend::Options {
                listen,
                tls_listen,
                cert,
                key,
            })
            .await
        }
        Command::Soak {
            url,
            connections,
            duration,
            interval,
            size,
            concurrency,
            source_ips,
            cookie,
            drained,
            killed,
            berth_pid,
            tolerance,
        } => {
            if !(ws::Pattern::MIN_SIZE..=4096).contains(&size) {
                bail!("--size must be between 8 and 4096 bytes");
            }
            if connections == 0 {
                bail!("--connections must be at least 1");
            }
            if !(duration.is_finite() && duration > 0.0 && duration <= 7.0 * 86400.0) {
                bail!("--duration must be between 0 and 7 days (in seconds)");
            }
            let target = net::Target::parse(&url, None, false, None, None).await?;
            if target.tls.is_some() {
                bail!("the soak mode speaks ws:// only");
            }
            let opts = soak::SoakOpts {
                addr: target.addr,
                host: target.host,
                path: target.path,
                source_ips: match source_ips.as_str() {
                    "" | "none" => Vec::new(),
                    spec => net::parse_source_ips(spec)?,
                },
                connections,
                duration: Duration::from_secs_f64(duration),
                interval: secs(interval, "interval")?,
                size,
                concurrency,
                cookie,
                drained,
                killed,
                berth_pid,
                tolerance: tolerance / 100.0,
            };
            let report = soak::run(opts).await?;
            println!("{report}");
            return soak::check(&report);
        }
        Command::Report { dir, targets, out } => {
            let md = report::run(&dir, &targets)?;
            match out {
                Some(path) => std::fs::write(&path, md)
                    .with_context(|| format!("cannot write {}", path.display()))?,
                None => print!("{md}"),
            }
            return Ok(());
        }
        Command::FreePorts { count } => {
            let listeners = (0..count)
                .map(|_| std::net::TcpListener::bind("127.0.0.1:0"))
                .collect::<Result<Vec<_>, _>>()?;
            let ports: Vec<String> = listeners
                .iter()
                .map(|l| l.local_addr().map(|a| a.port().to_string()))
                .collect::<Result<_, _>>()?;
            println!("{}", ports.join(" "));
            return Ok(());
        }
        Command::Throughput {
            client: c,
            connections,
            window,
            size,
            duration,
            warmup,
            start_cmd,
            end_cmd,
        } => {
            if !(ws::Pattern::MIN_SIZE..=ws::MAX_PAYLOAD).contains(&size) {
                bail!("--size must be between 8 and {} bytes", ws::MAX_PAYLOAD);
            }
            if connections == 0 || window == 0 {
                bail!("--connections and --window must be at least 1");
            }
            let opts = modes::ThroughputOpts {
                connections,
                window,
                size,
                duration: secs(duration, "duration")?,
                warmup: if warmup == 0.0 {
                    Duration::ZERO
                } else {
                    secs(warmup, "warmup")?
                },
                start_cmd,
                end_cmd,
            };
            modes::throughput(client(c, "").await?, opts).await?
        }
        Command::Latency {
            client: c,
            connections,
            size,
            duration,
        } => {
            if !(ws::Pattern::MIN_SIZE..=ws::MAX_PAYLOAD).contains(&size) {
                bail!("--size must be between 8 and {} bytes", ws::MAX_PAYLOAD);
            }
            if connections == 0 {
                bail!("--connections must be at least 1");
            }
            let opts = modes::LatencyOpts {
                connections,
                size,
                duration: secs(duration, "duration")?,
            };
            modes::latency(client(c, "").await?, opts).await?
        }
        Command::Idle {
            client: c,
            connections,
            hold,
            concurrency,
            echo_first,
        } => {
            let opts = modes::IdleOpts {
                connections,
                hold: secs(hold, "hold")?,
                concurrency,
                echo_first,
            };
            modes::idle(client_for(c, "127.0.0.2-127.0.0.250", true).await?, opts).await?
        }
        Command::HalfOpen {
            client: c,
            connections,
            stage,
            settle,
            concurrency,
        } => {
            let stage = match stage.as_str() {
                "hello" => modes::HalfStage::Hello,
                "head" => modes::HalfStage::Head,
                other => bail!("--stage must be hello or head, not {other:?}"),
            };
            let opts = modes::HalfOpenOpts {
                connections,
                stage,
                settle: secs(settle, "settle")?,
                concurrency,
            };
            modes::half_open(client(c, "127.0.0.2-127.0.0.250").await?, opts).await?
        }
        Command::Storm {
            client: mut c,
            connections,
            concurrency,
            cut_cmd,
            limit,
        } => {
            c.resume = true;
            let opts = storm::StormOpts {
                connections,
                concurrency,
                cut_cmd,
                limit: secs(limit, "limit")?,
            };
            storm::storm(client(c, "127.0.0.2-127.0.0.250").await?, opts).await?
        }
        Command::Handshake {
            client: c,
            concurrency,
            duration,
        } => {
            if concurrency == 0 {
                bail!("--concurrency must be at least 1");
            }
            let opts = modes::HandshakeOpts {
                concurrency,
                duration: secs(duration, "duration")?,
            };
            modes::handshake(client(c, "").await?, opts).await?
        }
    };
    println!("{report}");
    Ok(())
}
