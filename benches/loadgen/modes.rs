//! The load modes: throughput, latency, idle, handshake and half-open (the
//! storm mode lives in storm.rs). Each one is bounded in time and prints one
//! JSON object on stdout.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::anyhow;
use bytes::{Buf, BytesMut};
use serde_json::{json, Value};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt, ReadHalf, WriteHalf};
use tokio::sync::{mpsc, watch, Barrier, Notify, Semaphore};
use tokio::time::{sleep_until, timeout};

use crate::net::{self, Conn, Target};
use crate::stage::{stage, Stage, StageError};
use crate::stats::{self, round3};
use crate::ws::{self, Header, Pattern, Rng};

/// What every client mode shares.
pub struct Client {
    pub target: Arc<Target>,
    pub source_ips: Arc<Vec<Ipv4Addr>>,
    pub watch: Vec<u32>,
}

impl Client {
    fn source(&self, i: usize) -> Option<Ipv4Addr> {
        source_for(&self.source_ips, i)
    }
}

pub fn source_for(ips: &[Ipv4Addr], i: usize) -> Option<Ipv4Addr> {
    (!ips.is_empty()).then(|| ips[i % ips.len()])
}

/// How long a connection (TCP + TLS + upgrade) may take.
pub const CONNECT_LIMIT: Duration = Duration::from_secs(30);
/// How long, after the end of a run, the last echoes may take to arrive.
const DRAIN_LIMIT: Duration = Duration::from_secs(10);
/// How long one echo may take in the latency, idle and handshake modes.
const ECHO_LIMIT: Duration = Duration::from_secs(10);
/// How long the results of a run may be late before they are given up on.
const STRAGGLER_LIMIT: Duration = Duration::from_secs(15);

/// The sequence numbers of connection `id` start at `id << 40`.
fn seq_base(id: usize) -> u64 {
    (id as u64) << 40
}

/// Reads until `buf` starts with one complete frame and returns its header.
pub async fn read_frame<R: AsyncRead + Unpin>(
    rd: &mut R,
    buf: &mut BytesMut,
) -> anyhow::Result<Header> {
    loop {
        if let Some(h) = ws::parse_header(buf).map_err(anyhow::Error::msg)? {
            if buf.len() >= h.total_len() {
                return Ok(h);
            }
            buf.reserve(h.total_len() - buf.len());
        } else if buf.capacity() - buf.len() < 1024 {
            buf.reserve(4096);
        }
        if rd.read_buf(buf).await? == 0 {
            return Err(anyhow!("connection closed by the server"));
        }
    }
}

/// Sends message `seq` and checks its echo.
async fn echo_once(
    conn: &mut Conn,
    buf: &mut BytesMut,
    pattern: &Pattern,
    out: &mut Vec<u8>,
    seq: u64,
    mask: [u8; 4],
) -> Result<(), StageError> {
    out.clear();
    pattern.push_frame(out, seq, mask);
    conn.write_all(out).await.map_err(stage(Stage::Echo))?;
    conn.flush().await.map_err(stage(Stage::Echo))?;
    let h = match timeout(ECHO_LIMIT, read_frame(conn, buf)).await {
        Ok(r) => r.map_err(stage(Stage::Echo))?,
        Err(_) => {
            return Err(StageError {
                stage: Stage::Echo,
                error: anyhow!("no echo within {ECHO_LIMIT:?}"),
            })
        }
    };
    let res = pattern.verify(&h, &buf[h.header_len..h.total_len()], seq);
    buf.advance(h.total_len());
    res.map_err(|e| StageError {
        stage: Stage::Echo,
        error: anyhow!("verification failed: {e}"),
    })
}

/// Sends Close 1000 and reads until the server's Close (or the end of the
/// stream), at most `limit`.
async fn close_handshake(
    conn: &mut Conn,
    buf: &mut BytesMut,
    mask: [u8; 4],
    limit: Duration,
) -> Result<(), StageError> {
    let mut out = Vec::with_capacity(16);
    ws::push_client_frame(&mut out, 0x80 | ws::OP_CLOSE, &1000u16.to_be_bytes(), mask);
    conn.write_all(&out).await.map_err(stage(Stage::Close))?;
    conn.flush().await.map_err(stage(Stage::Close))?;
    let wait = async {
        loop {
            let h = read_frame(conn, buf).await?;
            buf.advance(h.total_len());
            if h.opcode() == ws::OP_CLOSE {
                return Ok::<_, anyhow::Error>(());
            }
        }
    };
    match timeout(limit, wait).await {
        Ok(r) => r.map_err(stage(Stage::Close)),
        Err(_) => Err(StageError {
            stage: Stage::Close,
            error: anyhow!("no Close reply within {limit:?}"),
        }),
    }
}

/// Counts errors, keeping the first few messages.
#[derive(Default)]
pub struct Errors {
    by_stage: BTreeMap<&'static str, u64>,
    first: Vec<String>,
}

impl Errors {
    pub fn add(&mut self, e: &StageError) {
        *self.by_stage.entry(e.stage.name()).or_default() += 1;
        if self.first.len() < 5 {
            self.first.push(e.to_string());
        }
    }
    pub fn merge(&mut self, o: Errors) {
        for (k, v) in o.by_stage {
            *self.by_stage.entry(k).or_default() += v;
        }
        for f in o.first {
            if self.first.len() < 5 {
                self.first.push(f);
            }
        }
    }
    pub fn total(&self) -> u64 {
        self.by_stage.values().sum()
    }
    pub fn json(&self) -> Value {
        json!({ "total": self.total(), "by_stage": self.by_stage, "first": self.first })
    }
}

// ---------------------------------------------------------------------------
// throughput
// ---------------------------------------------------------------------------

pub struct ThroughputOpts {
    pub connections: usize,
    pub window: usize,
    pub size: usize,
    pub duration: Duration,
    /// A load phase before the measurement (none when zero).
    pub warmup: Duration,
    /// Shell commands run when every connection is quiet (no message in
    /// flight), just before and just after the measured phase.
    pub start_cmd: Option<String>,
    pub end_cmd: Option<String>,
}

struct Flow {
    /// Messages queued for sending (written before the write starts).
    sent: AtomicU64,
    /// Echoes received and verified.
    received: AtomicU64,
    writer_done: AtomicBool,
    stop: AtomicBool,
    credit: Notify,
    done: Notify,
}

#[derive(Default)]
struct TpReport {
    connected: bool,
    sent: u64,
    received: u64,
    verification_errors: u64,
    errors: Option<String>,
    connect_error: Option<StageError>,
}

/// Runs `cmd` with `sh -c` and waits for it; a failure ends the run.
pub fn run_hook(cmd: &str, what: &str) -> anyhow::Result<()> {
    let status = std::process::Command::new("sh")
        .arg("-c")
        .arg(cmd)
        .stdout(std::process::Stdio::null())
        .status()
        .map_err(|e| anyhow!("{what} command: cannot run: {e}"))?;
    if !status.success() {
        return Err(anyhow!("{what} command {cmd:?} failed: {status}"));
    }
    Ok(())
}

pub async fn throughput(c: Client, o: ThroughputOpts) -> anyhow::Result<Value> {
    let pattern = Arc::new(Pattern::new(o.size));
    let barrier = Arc::new(Barrier::new(o.connections + 1));
    // The phases: an optional warm-up, then the measurement. Every
    // connection drains its echoes at the end of a phase, so nothing is in
    // flight between phases (where the hooks run) and the measured count is
    // exactly what crossed the proxy in the measured phase.
    let phases: Vec<Duration> = (!o.warmup.is_zero())
        .then_some(o.warmup)
        .into_iter()
        .chain([o.duration])
        .collect();
    let measured = phases.len() - 1;
    let (go_tx, go_rx) = watch::channel(0usize);
    let (res_tx, mut res_rx) = mpsc::unbounded_channel();
    let t_connect = Instant::now();
    let mut handles = Vec::with_capacity(o.connections);
    for id in 0..o.connections {
        handles.push(tokio::spawn(tp_conn(
            id,
            c.target.clone(),
            c.source(id),
            pattern.clone(),
            o.window,
            phases.clone(),
            barrier.clone(),
            res_tx.clone(),
            go_rx.clone(),
        )));
    }
    drop(res_tx);
    barrier.wait().await;
    let connect_secs = t_connect.elapsed().as_secs_f64();
    let mut reports = Vec::with_capacity(o.connections);
    let (mut before, mut after) = (stats::Sample::default(), stats::Sample::default());
    let (mut t0, mut elapsed) = (Instant::now(), 0.0);
    for (p, &d) in phases.iter().enumerate() {
        if p == measured {
            if let Some(cmd) = &o.start_cmd {
                run_hook(cmd, "--start-cmd")?;
            }
            eprintln!("throughput: measurement starts");
            before = stats::sample(&c.watch);
            t0 = Instant::now();
        } else {
            eprintln!("throughput: warm-up for {d:?}");
        }
        let _ = go_tx.send(p);
        // One report per connection and phase; the tasks stay alive (and
        // their connections open) until the last phase is over, so count
        // rather than wait for the channel to close.
        reports.clear();
        let collect_by = tokio::time::Instant::now() + d + DRAIN_LIMIT + STRAGGLER_LIMIT;
        while reports.len() < o.connections {
            match tokio::time::timeout_at(collect_by, res_rx.recv()).await {
                Ok(Some((phase, r))) if phase == p => reports.push(r),
                Ok(Some(_)) => {}
                _ => break,
            }
        }
        if p == measured {
            elapsed = t0.elapsed().as_secs_f64();
            after = stats::sample(&c.watch);
            eprintln!("throughput: measurement ends");
            if let Some(cmd) = &o.end_cmd {
                run_hook(cmd, "--end-cmd")?;
            }
        } else {
            let failed = reports.iter().filter(|r| r.errors.is_some()).count();
            if failed > 0 {
                eprintln!("throughput: {failed} connections failed in the warm-up");
            }
        }
    }
    let missing = o.connections - reports.len();
    let _ = go_tx.send(phases.len());
    for h in handles {
        let _ = timeout(Duration::from_secs(5), h).await;
    }

    let connected = reports.iter().filter(|r| r.connected).count();
    let mut connect_errors = Errors::default();
    let (mut messages, mut sent, mut verification_errors, mut conn_errors) = (0u64, 0u64, 0, 0);
    let mut first_error: Vec<String> = Vec::new();
    if missing > 0 {
        conn_errors += missing as u64;
        first_error.push(format!("{missing} connections never reported"));
    }
    for r in reports {
        if let Some(e) = &r.connect_error {
            connect_errors.add(e);
            continue;
        }
        messages += r.received;
        sent += r.sent;
        verification_errors += r.verification_errors;
        if let Some(e) = r.errors {
            conn_errors += 1;
            if first_error.len() < 5 {
                first_error.push(e);
            }
        }
    }
    let mut v = json!({
        "mode": "throughput",
        "connections": o.connections,
        "connected": connected,
        "window": o.window,
        "size": o.size,
        "warmup_secs": o.warmup.as_secs_f64(),
        "connect_secs": round3(connect_secs),
        "elapsed_secs": round3(elapsed),
        "messages": messages,
        "bytes": messages * o.size as u64,
        "msgs_per_sec": (messages as f64 / elapsed).round(),
        "mib_per_sec": round3(messages as f64 * o.size as f64 / elapsed / 1048576.0),
        "lost_messages": sent.saturating_sub(messages),
        "verification_errors": verification_errors,
        "connection_errors": conn_errors + connect_errors.total(),
        "connect_errors": connect_errors.json(),
        "first_error": first_error,
    });
    merge(&mut v, stats::watched_json(&c.watch, before, after));
    Ok(v)
}

/// One connection of the throughput mode: one report per phase, each phase
/// started by `go` (which then holds the phase's index; `phases.len()` means
/// close).
#[allow(clippy::too_many_arguments)]
async fn tp_conn(
    id: usize,
    target: Arc<Target>,
    source: Option<Ipv4Addr>,
    pattern: Arc<Pattern>,
    window: usize,
    phases: Vec<Duration>,
    barrier: Arc<Barrier>,
    res_tx: mpsc::UnboundedSender<(usize, TpReport)>,
    mut go: watch::Receiver<usize>,
) {
    let conn = target.connect_timeout(source, CONNECT_LIMIT).await;
    barrier.wait().await;
    let mut conn = match conn {
        Ok(c) => Some(c),
        Err(e) => {
            // The error counts once, in the measured phase's report.
            for p in 0..phases.len() {
                let mut r = TpReport::default();
                if p + 1 == phases.len() {
                    r.connect_error = Some(StageError {
                        stage: e.stage,
                        error: anyhow!("{:#}", e.error),
                    });
                }
                let _ = res_tx.send((p, r));
            }
            return;
        }
    };
    // The next message's number within this connection.
    let mut next: u64 = 0;
    for (p, &duration) in phases.iter().enumerate() {
        while *go.borrow_and_update() < p {
            if go.changed().await.is_err() {
                return;
            }
        }
        let Some((c, leftover)) = conn.take() else {
            let report = TpReport {
                connected: true,
                errors: Some("failed in an earlier phase".into()),
                ..TpReport::default()
            };
            let _ = res_tx.send((p, report));
            continue;
        };
        let (after, report) =
            tp_phase(c, leftover, &pattern, seq_base(id) | next, window, duration).await;
        next += report.received;
        conn = after;
        let _ = res_tx.send((p, report));
    }
    // Close politely once the measurement is over.
    while *go.borrow_and_update() < phases.len() {
        if go.changed().await.is_err() {
            break;
        }
    }
    if let Some((mut c, mut buf)) = conn {
        let _ = close_handshake(&mut c, &mut buf, [1, 2, 3, 4], Duration::from_secs(2)).await;
    }
}

/// One phase on one connection: messages `first`, `first + 1`, ... with
/// `window` in flight until `duration` is over, then every echo drained. The
/// connection comes back unless the phase failed.
async fn tp_phase(
    conn: Conn,
    leftover: BytesMut,
    pattern: &Arc<Pattern>,
    first: u64,
    window: usize,
    duration: Duration,
) -> (Option<(Conn, BytesMut)>, TpReport) {
    let deadline = tokio::time::Instant::now() + duration;
    let flow = Arc::new(Flow {
        sent: AtomicU64::new(0),
        received: AtomicU64::new(0),
        writer_done: AtomicBool::new(false),
        stop: AtomicBool::new(false),
        credit: Notify::new(),
        done: Notify::new(),
    });
    let (rd, wr) = tokio::io::split(conn);
    let writer = tokio::spawn(tp_writer(
        wr,
        flow.clone(),
        pattern.clone(),
        first,
        window,
        deadline,
    ));
    let (rd, buf, mut report) =
        tp_reader(rd, leftover, &flow, pattern, first, deadline + DRAIN_LIMIT).await;
    report.connected = true;
    report.sent = flow.sent.load(Ordering::Acquire);
    flow.stop.store(true, Ordering::Release);
    flow.credit.notify_one();
    // A writer blocked on a peer that stopped reading is given up on.
    let mut writer = writer;
    let (wr, write_error) = match timeout(STRAGGLER_LIMIT, &mut writer).await {
        Ok(Ok(r)) => r,
        Ok(Err(e)) => {
            report.errors = Some(format!("writer task failed: {e}"));
            return (None, report);
        }
        Err(_) => {
            writer.abort();
            report
                .errors
                .get_or_insert_with(|| "writer stuck: the peer stopped reading".into());
            return (None, report);
        }
    };
    // The writer may have queued more since (it stops at its next check).
    report.sent = flow.sent.load(Ordering::Acquire);
    if report.errors.is_none() {
        report.errors = write_error;
    }
    if report.errors.is_some() {
        return (None, report);
    }
    (Some((rd.unsplit(wr), buf)), report)
}

async fn tp_writer(
    mut wr: WriteHalf<Conn>,
    flow: Arc<Flow>,
    pattern: Arc<Pattern>,
    first: u64,
    window: usize,
    deadline: tokio::time::Instant,
) -> (WriteHalf<Conn>, Option<String>) {
    let mut rng = Rng::new(first ^ 0x9E37_79B9_7F4A_7C15 ^ rand::random::<u64>());
    let mut out: Vec<u8> = Vec::with_capacity(window * (pattern.size() + 14));
    // Messages sent in this phase; message k carries number `first + k`.
    let mut n: u64 = 0;
    let mut error = None;
    loop {
        if flow.stop.load(Ordering::Acquire) || tokio::time::Instant::now() >= deadline {
            break;
        }
        let inflight = n - flow.received.load(Ordering::Acquire);
        if inflight < window as u64 {
            for _ in inflight..window as u64 {
                pattern.push_frame(&mut out, first + n, rng.mask());
                n += 1;
            }
            flow.sent.store(n, Ordering::Release);
            let r = async {
                wr.write_all(&out).await?;
                wr.flush().await
            }
            .await;
            out.clear();
            if let Err(e) = r {
                error = Some(format!("write failed: {e}"));
                break;
            }
        } else {
            tokio::select! {
                _ = flow.credit.notified() => {}
                _ = sleep_until(deadline) => {}
            }
        }
    }
    flow.writer_done.store(true, Ordering::Release);
    flow.done.notify_one();
    (wr, error)
}

async fn tp_reader(
    mut rd: ReadHalf<Conn>,
    mut buf: BytesMut,
    flow: &Flow,
    pattern: &Pattern,
    first: u64,
    drain_deadline: tokio::time::Instant,
) -> (ReadHalf<Conn>, BytesMut, TpReport) {
    let mut report = TpReport::default();
    let mut received: u64 = 0;
    let chunk = (pattern.size() + 14).max(16 * 1024);
    buf.reserve(chunk);
    'outer: loop {
        let mut got = false;
        loop {
            let h = match ws::parse_header(&buf) {
                Ok(Some(h)) => h,
                Ok(None) => break,
                Err(e) => {
                    report.verification_errors += 1;
                    report.errors = Some(format!("bad frame header: {e}"));
                    break 'outer;
                }
            };
            let total = h.total_len();
            if buf.len() < total {
                buf.reserve(total - buf.len());
                break;
            }
            if h.opcode() == ws::OP_CLOSE {
                report.errors = Some(format!(
                    "server sent Close ({:?}) after {received} echoes",
                    &buf[h.header_len..total]
                ));
                break 'outer;
            }
            if let Err(e) = pattern.verify(&h, &buf[h.header_len..total], first + received) {
                report.verification_errors += 1;
                report.errors = Some(format!("verification failed: {e}"));
                break 'outer;
            }
            received += 1;
            got = true;
            buf.advance(total);
        }
        if got {
            flow.received.store(received, Ordering::Release);
            flow.credit.notify_one();
        }
        let sent = flow.sent.load(Ordering::Acquire);
        if received > sent {
            report.errors = Some("more echoes than messages sent".into());
            break;
        }
        if flow.writer_done.load(Ordering::Acquire) && received == flow.sent.load(Ordering::Acquire)
        {
            break;
        }
        if buf.capacity() - buf.len() < 1024 {
            buf.reserve(chunk);
        }
        tokio::select! {
            r = rd.read_buf(&mut buf) => match r {
                Ok(0) => {
                    report.errors = Some(format!(
                        "connection closed with {} echoes outstanding",
                        flow.sent.load(Ordering::Acquire) - received
                    ));
                    break;
                }
                Ok(_) => {}
                Err(e) => {
                    report.errors = Some(format!("read failed: {e}"));
                    break;
                }
            },
            _ = flow.done.notified() => {}
            _ = sleep_until(drain_deadline) => {
                report.errors = Some(format!(
                    "{} echoes still outstanding {DRAIN_LIMIT:?} after the end",
                    flow.sent.load(Ordering::Acquire) - received
                ));
                break;
            }
        }
    }
    report.received = received;
    (rd, buf, report)
}

// ---------------------------------------------------------------------------
// latency
// ---------------------------------------------------------------------------

pub struct LatencyOpts {
    pub connections: usize,
    pub size: usize,
    pub duration: Duration,
}

struct LatReport {
    samples: Vec<u64>,
    error: Option<StageError>,
    connected: bool,
}

pub async fn latency(c: Client, o: LatencyOpts) -> anyhow::Result<Value> {
    let pattern = Arc::new(Pattern::new(o.size));
    let barrier = Arc::new(Barrier::new(o.connections + 1));
    let (res_tx, mut res_rx) = mpsc::unbounded_channel();
    let t_connect = Instant::now();
    for id in 0..o.connections {
        let (target, source, pattern, barrier, res_tx) = (
            c.target.clone(),
            c.source(id),
            pattern.clone(),
            barrier.clone(),
            res_tx.clone(),
        );
        let duration = o.duration;
        tokio::spawn(async move {
            let r = lat_conn(id, target, source, pattern, duration, barrier).await;
            let _ = res_tx.send(r);
        });
    }
    drop(res_tx);
    barrier.wait().await;
    let connect_secs = t_connect.elapsed().as_secs_f64();
    let before = stats::sample(&c.watch);
    let t0 = Instant::now();
    let mut all: Vec<u64> = Vec::new();
    let mut errors = Errors::default();
    let mut verification_errors = 0u64;
    let mut connected = 0;
    let mut reported = 0;
    let collect_by = tokio::time::Instant::now() + o.duration + ECHO_LIMIT + STRAGGLER_LIMIT;
    while let Ok(Some(r)) = tokio::time::timeout_at(collect_by, res_rx.recv()).await {
        reported += 1;
        all.extend_from_slice(&r.samples);
        connected += r.connected as usize;
        if let Some(e) = r.error {
            if e.error.to_string().contains("verification failed") {
                verification_errors += 1;
            }
            errors.add(&e);
        }
    }
    if reported < o.connections {
        errors.add(&StageError {
            stage: Stage::Echo,
            error: anyhow!("{} connections never reported", o.connections - reported),
        });
    }
    let elapsed = t0.elapsed().as_secs_f64();
    let after = stats::sample(&c.watch);
    all.sort_unstable();
    let mut v = json!({
        "mode": "latency",
        "connections": o.connections,
        "connected": connected,
        "size": o.size,
        "connect_secs": round3(connect_secs),
        "elapsed_secs": round3(elapsed),
        "messages": all.len(),
        "msgs_per_sec": (all.len() as f64 / elapsed).round(),
        "verification_errors": verification_errors,
        "connection_errors": errors.total(),
        "errors": errors.json(),
    });
    merge(&mut v, stats::percentiles_us(&all));
    merge(&mut v, stats::watched_json(&c.watch, before, after));
    Ok(v)
}

async fn lat_conn(
    id: usize,
    target: Arc<Target>,
    source: Option<Ipv4Addr>,
    pattern: Arc<Pattern>,
    duration: Duration,
    barrier: Arc<Barrier>,
) -> LatReport {
    let conn = target.connect_timeout(source, CONNECT_LIMIT).await;
    barrier.wait().await;
    let (mut conn, mut buf) = match conn {
        Ok(c) => c,
        Err(e) => {
            return LatReport {
                samples: Vec::new(),
                error: Some(e),
                connected: false,
            }
        }
    };
    let deadline = Instant::now() + duration;
    let mut rng = Rng::new(rand::random());
    let mut out = Vec::with_capacity(pattern.size() + 14);
    let mut samples = Vec::with_capacity(1 << 14);
    let base = seq_base(id);
    let mut n = 0u64;
    let mut error = None;
    buf.reserve(pattern.size() + 4096);
    while Instant::now() < deadline {
        let t0 = Instant::now();
        if let Err(e) = echo_once(
            &mut conn,
            &mut buf,
            &pattern,
            &mut out,
            base | n,
            rng.mask(),
        )
        .await
        {
            error = Some(e);
            break;
        }
        samples.push(t0.elapsed().as_nanos() as u64);
        n += 1;
    }
    if error.is_none() {
        let _ = close_handshake(&mut conn, &mut buf, rng.mask(), Duration::from_secs(2)).await;
    }
    LatReport {
        samples,
        error,
        connected: true,
    }
}

// ---------------------------------------------------------------------------
// idle
// ---------------------------------------------------------------------------

pub struct IdleOpts {
    pub connections: usize,
    pub hold: Duration,
    /// Connections being opened at once.
    pub concurrency: usize,
    /// One echo on each connection as it opens, so that the hold measures
    /// connections that have carried a message (and gone quiet).
    pub echo_first: bool,
}

pub async fn idle(c: Client, o: IdleOpts) -> anyhow::Result<Value> {
    let before = stats::sample(&c.watch);
    let sem = Arc::new(Semaphore::new(o.concurrency.max(1)));
    let t0 = Instant::now();
    let mut set = tokio::task::JoinSet::new();
    let first = Arc::new(Pattern::new(64));
    for i in 0..o.connections {
        let (target, source, sem) = (c.target.clone(), c.source(i), sem.clone());
        let (first, echo_first) = (first.clone(), o.echo_first);
        set.spawn(async move {
            let _permit = sem.acquire_owned().await;
            let (mut conn, mut buf) = target.connect_timeout(source, CONNECT_LIMIT).await?;
            if echo_first {
                let mut out = Vec::with_capacity(80);
                let mut rng = Rng::new(i as u64 + 7);
                echo_once(&mut conn, &mut buf, &first, &mut out, i as u64, rng.mask()).await?;
            }
            Ok::<_, StageError>((conn, buf))
        });
    }
    let mut conns = Vec::with_capacity(o.connections);
    let mut open_errors = Errors::default();
    while let Some(r) = set.join_next().await {
        match r {
            Ok(Ok(c)) => conns.push(c),
            Ok(Err(e)) => open_errors.add(&e),
            Err(e) => open_errors.add(&StageError {
                stage: Stage::Tcp,
                error: anyhow!("task failed: {e}"),
            }),
        }
    }
    let open_secs = t0.elapsed().as_secs_f64();
    // The proxy's CPU for the opens alone (accept, TLS, validate, connect to
    // the backend, relay the 101), before the hold.
    let opened_sample = stats::sample(&c.watch);
    {
        use std::io::Write as _;
        let mut out = std::io::stdout().lock();
        writeln!(out, "READY {}", conns.len())?;
        out.flush()?;
    }
    eprintln!(
        "idle: {} open, {} failed in {open_secs:.2}s; holding for {:?}",
        conns.len(),
        open_errors.total(),
        o.hold
    );
    // Sample the held state halfway through the hold.
    tokio::time::sleep(o.hold / 2).await;
    let held = stats::sample(&c.watch);
    tokio::time::sleep(o.hold - o.hold / 2).await;

    // Are they all still alive? One echo on each.
    let pattern = Arc::new(Pattern::new(64));
    let mut set = tokio::task::JoinSet::new();
    let opened = conns.len();
    for (i, (mut conn, mut buf)) in conns.into_iter().enumerate() {
        let (pattern, sem) = (pattern.clone(), sem.clone());
        set.spawn(async move {
            let _permit = sem.acquire_owned().await;
            let mut out = Vec::with_capacity(80);
            let mut rng = Rng::new(i as u64 + 1);
            let r = match &mut conn {
                Conn::H2Bare(bare) => bare.check().await,
                _ => {
                    echo_once(
                        &mut conn,
                        &mut buf,
                        &pattern,
                        &mut out,
                        i as u64,
                        rng.mask(),
                    )
                    .await
                }
            };
            (r, conn)
        });
    }
    let mut alive = 0usize;
    let mut check_errors = Errors::default();
    let mut keep = Vec::with_capacity(opened);
    while let Some(r) = set.join_next().await {
        if let Ok((r, conn)) = r {
            match r {
                Ok(()) => alive += 1,
                Err(e) => check_errors.add(&e),
            }
            keep.push(conn);
        }
    }
    drop(keep);
    let mut v = json!({
        "mode": "idle",
        "connections": o.connections,
        "opened": opened,
        "failed": open_errors.total(),
        "open_secs": round3(open_secs),
        "hold_secs": o.hold.as_secs_f64(),
        "alive_after_hold": alive,
        "open_errors": open_errors.json(),
        "check_errors": check_errors.json(),
    });
    merge(&mut v, stats::watched_json(&c.watch, before, held));
    if !c.watch.is_empty() {
        merge(
            &mut v,
            json!({ "proxy_cpu_secs_open": round3(opened_sample.cpu_secs - before.cpu_secs) }),
        );
    }
    Ok(v)
}

// ---------------------------------------------------------------------------
// handshake
// ---------------------------------------------------------------------------

pub struct HandshakeOpts {
    pub concurrency: usize,
    pub duration: Duration,
}

pub async fn handshake(c: Client, o: HandshakeOpts) -> anyhow::Result<Value> {
    let pattern = Arc::new(Pattern::new(64));
    let before = stats::sample(&c.watch);
    let t0 = Instant::now();
    let deadline = t0 + o.duration;
    let mut set = tokio::task::JoinSet::new();
    for w in 0..o.concurrency {
        // Each worker is one returning client, with its own TLS sessions.
        let target = c.target.separate_client();
        let (ips, pattern) = (c.source_ips.clone(), pattern.clone());
        let concurrency = o.concurrency;
        set.spawn(async move {
            let mut ok = 0u64;
            let mut resumed = 0u64;
            let mut errors = Errors::default();
            let mut durations = Vec::new();
            let mut rng = Rng::new(rand::random());
            let mut out = Vec::with_capacity(80);
            let mut k = w;
            let mut kx_groups = BTreeMap::new();
            while Instant::now() < deadline {
                let source = source_for(&ips, k);
                k += concurrency;
                let t = Instant::now();
                let r = async {
                    let (mut conn, mut buf) = target.connect_timeout(source, ECHO_LIMIT).await?;
                    let was_resumed = conn.resumed();
                    let kx = conn.kx_group();
                    echo_once(
                        &mut conn,
                        &mut buf,
                        &pattern,
                        &mut out,
                        k as u64,
                        rng.mask(),
                    )
                    .await?;
                    close_handshake(&mut conn, &mut buf, rng.mask(), ECHO_LIMIT).await?;
                    Ok::<_, StageError>((was_resumed, kx))
                }
                .await;
                match r {
                    Ok((was_resumed, kx)) => {
                        ok += 1;
                        resumed += u64::from(was_resumed);
                        if let Some(g) = kx {
                            *kx_groups.entry(u16::from(g)).or_insert(0u64) += 1;
                        }
                        durations.push(t.elapsed().as_nanos() as u64);
                    }
                    Err(e) => {
                        errors.add(&e);
                        // Do not spin on a refusing server.
                        tokio::time::sleep(Duration::from_millis(10)).await;
                    }
                }
            }
            (ok, resumed, errors, durations, kx_groups)
        });
    }
    let mut ok = 0u64;
    let mut resumed = 0u64;
    let mut errors = Errors::default();
    let mut durations = Vec::new();
    // Handshakes by the key exchange group they used (TLS only).
    let mut kx_groups: BTreeMap<String, u64> = BTreeMap::new();
    while let Some(r) = set.join_next().await {
        let (o, res, e, d, kx) = r?;
        for (g, n) in kx {
            let name = format!("{:?}", rustls::NamedGroup::from(g));
            *kx_groups.entry(name).or_default() += n;
        }
        ok += o;
        resumed += res;
        errors.merge(e);
        durations.extend(d);
    }
    let elapsed = t0.elapsed().as_secs_f64();
    let after = stats::sample(&c.watch);
    durations.sort_unstable();
    let mut v = json!({
        "mode": "handshake",
        "concurrency": o.concurrency,
        "elapsed_secs": round3(elapsed),
        "handshakes": ok,
        "handshakes_per_sec": (ok as f64 / elapsed).round(),
        "resumed": resumed,
        "kx_groups": kx_groups,
        "tls_provider": crate::net::PROVIDER_NAME,
        "errors": errors.total(),
        "error_detail": errors.json(),
    });
    merge(
        &mut v,
        json!({ "handshake_time": stats::percentiles_us(&durations) }),
    );
    merge(&mut v, stats::watched_json(&c.watch, before, after));
    Ok(v)
}

// ---------------------------------------------------------------------------
// half-open
// ---------------------------------------------------------------------------

/// How far a half-open connection gets before it stops sending.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HalfStage {
    /// Half a TLS ClientHello (wss:// only).
    Hello,
    /// The TLS handshake (over wss://), then half a request head.
    Head,
}

pub struct HalfOpenOpts {
    pub connections: usize,
    pub stage: HalfStage,
    /// How long to wait after the last connection before measuring.
    pub settle: Duration,
    pub concurrency: usize,
}

/// Opens C connections that stop halfway through the ClientHello or the
/// request head (as a slowloris does) and reports how much the watched
/// processes' RSS grew per connection while they are held.
pub async fn half_open(c: Client, o: HalfOpenOpts) -> anyhow::Result<Value> {
    if o.stage == HalfStage::Hello && c.target.tls.is_none() {
        anyhow::bail!("--stage hello needs a wss:// URL");
    }
    let head = ws::upgrade_request(&c.target.host, &c.target.path, &ws::new_key());
    let half_head = Arc::new(head.as_bytes()[..head.len() / 2].to_vec());
    let before = stats::sample(&c.watch);
    let sem = Arc::new(Semaphore::new(o.concurrency.max(1)));
    let t0 = Instant::now();
    let mut set = tokio::task::JoinSet::new();
    for i in 0..o.connections {
        let (target, source, sem) = (c.target.clone(), c.source(i), sem.clone());
        let (stage_, half_head) = (o.stage, half_head.clone());
        set.spawn(async move {
            let _permit = sem.acquire_owned().await;
            let open = async {
                let tcp = target.tcp(source).await?;
                match (stage_, &target.tls) {
                    (HalfStage::Hello, Some((connector, name))) => {
                        let mut tcp = tcp;
                        let hello =
                            net::client_hello(connector, name).map_err(stage(Stage::Tls))?;
                        tcp.write_all(&hello[..hello.len() / 2])
                            .await
                            .map_err(stage(Stage::Tls))?;
                        Ok::<_, StageError>(net::Conn::Plain(tcp))
                    }
                    (_, Some((connector, name))) => {
                        let mut tls = connector
                            .connect(name.clone(), tcp)
                            .await
                            .map_err(stage(Stage::Tls))?;
                        tls.write_all(&half_head)
                            .await
                            .map_err(stage(Stage::Upgrade))?;
                        tls.flush().await.map_err(stage(Stage::Upgrade))?;
                        Ok(net::Conn::Tls(Box::new(tls)))
                    }
                    (_, None) => {
                        let mut tcp = tcp;
                        tcp.write_all(&half_head)
                            .await
                            .map_err(stage(Stage::Upgrade))?;
                        Ok(net::Conn::Plain(tcp))
                    }
                }
            };
            timeout(CONNECT_LIMIT, open).await.unwrap_or_else(|_| {
                Err(StageError {
                    stage: Stage::Tcp,
                    error: anyhow!("opening took longer than {CONNECT_LIMIT:?}"),
                })
            })
        });
    }
    let mut conns = Vec::with_capacity(o.connections);
    let mut errors = Errors::default();
    while let Some(r) = set.join_next().await {
        match r {
            Ok(Ok(c)) => conns.push(c),
            Ok(Err(e)) => errors.add(&e),
            Err(e) => errors.add(&StageError {
                stage: Stage::Tcp,
                error: anyhow!("task failed: {e}"),
            }),
        }
    }
    let open_secs = t0.elapsed().as_secs_f64();
    tokio::time::sleep(o.settle).await;
    let held = stats::sample(&c.watch);
    // Still open? A connection berth has closed reads EOF at once.
    let mut open = 0usize;
    for conn in &mut conns {
        let mut b = [0u8; 1];
        if timeout(Duration::from_millis(1), conn.read(&mut b))
            .await
            .is_err()
        {
            open += 1;
        }
    }
    drop(conns);
    let grew_kb = held.rss_kb.saturating_sub(before.rss_kb);
    let mut v = json!({
        "mode": "half-open",
        "stage": match o.stage { HalfStage::Hello => "hello", HalfStage::Head => "head" },
        "tls": c.target.tls.is_some(),
        "connections": o.connections,
        "opened": o.connections - errors.total() as usize,
        "still_open": open,
        "failed": errors.total(),
        "open_secs": round3(open_secs),
        "errors": errors.json(),
        "rss_growth_kb": grew_kb,
        "bytes_per_connection": if open > 0 { (grew_kb * 1024) / open as u64 } else { 0 },
    });
    merge(&mut v, stats::watched_json(&c.watch, before, held));
    Ok(v)
}

pub fn merge(into: &mut Value, from: Value) {
    if let (Some(a), Value::Object(b)) = (into.as_object_mut(), from) {
        a.extend(b);
    }
}
