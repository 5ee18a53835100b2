//! The throughput mode: connections keep a window of messages in flight
//! for the run, every echo checked.

use super::*;

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
