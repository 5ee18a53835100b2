//! The reconnect storm: C clients, each with a TLS session cache of its own
//! (as browsers keep theirs), open their connections, then a command cuts
//! them all at once (`--cut-cmd`, e.g. SIGUSR1 to the echo backend, which
//! then closes every connection as a restart would), and every client
//! reconnects at once, resuming its TLS session. Measured: the time from the
//! cut until the last client is re-established (its `101` received), each
//! client's own time, and the watched processes' CPU over that span.
//! Bounded in time: clients give up at `--limit` after the cut.

use std::net::Ipv4Addr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail};
use bytes::{Buf, BytesMut};
use serde_json::{json, Value};
use tokio::io::AsyncWriteExt;
use tokio::sync::{watch, Notify, Semaphore};

use crate::modes::{merge, read_frame, run_hook, source_for, Client, Errors, CONNECT_LIMIT};
use crate::net::{Conn, Target};
use crate::stage::{Stage, StageError};
use crate::stats::{self, round3};
use crate::ws;

pub struct StormOpts {
    pub connections: usize,
    /// Connections opened at once before the cut (the storm itself has no
    /// such limit: every client reconnects as soon as it sees the cut).
    pub concurrency: usize,
    /// The shell command that cuts every connection.
    pub cut_cmd: String,
    /// How long after the cut clients keep trying.
    pub limit: Duration,
}

/// What one client saw.
struct ClientReport {
    opened: bool,
    /// When it noticed the cut (its connection ended).
    cut_seen: Option<Instant>,
    /// When its new connection's `101` arrived.
    back: Option<Instant>,
    resumed: bool,
    attempts: u64,
    errors: Errors,
}

/// Shared progress counters, so the main task knows when to stop waiting.
struct Progress {
    opened: AtomicUsize,
    /// Clients done opening (opened or failed).
    open_settled: AtomicUsize,
    /// Opened clients done with the storm (back, given up, or ended early).
    storm_settled: AtomicUsize,
    notify: Notify,
}

impl Progress {
    fn bump(&self, n: &AtomicUsize) {
        n.fetch_add(1, Ordering::AcqRel);
        self.notify.notify_one();
    }
}

pub async fn storm(c: Client, o: StormOpts) -> anyhow::Result<Value> {
    if o.connections == 0 {
        bail!("--connections must be at least 1");
    }
    let progress = Arc::new(Progress {
        opened: AtomicUsize::new(0),
        open_settled: AtomicUsize::new(0),
        storm_settled: AtomicUsize::new(0),
        notify: Notify::new(),
    });
    let sem = Arc::new(Semaphore::new(o.concurrency.max(1)));
    // `cut` holds the time of the cut once it is made: clients whose
    // connection ends before it are not counted as cut.
    let (cut_tx, cut_rx) = watch::channel(None::<Instant>);
    let (stop_tx, stop_rx) = watch::channel(false);
    let t_open = Instant::now();
    let mut set = tokio::task::JoinSet::new();
    for i in 0..o.connections {
        let target = Arc::new(c.target.client_for_one_server());
        let source = source_for(&c.source_ips, i);
        let (sem, progress, cut_rx, stop_rx) = (
            sem.clone(),
            progress.clone(),
            cut_rx.clone(),
            stop_rx.clone(),
        );
        let limit = o.limit;
        set.spawn(async move {
            storm_client(target, source, sem, progress, cut_rx, stop_rx, limit).await
        });
    }
    // Every client has opened (or failed to).
    let open_deadline = tokio::time::Instant::now() + CONNECT_LIMIT * 2;
    loop {
        let notified = progress.notify.notified();
        if progress.open_settled.load(Ordering::Acquire) >= o.connections {
            break;
        }
        if tokio::time::timeout_at(open_deadline, notified)
            .await
            .is_err()
        {
            break;
        }
    }
    let opened = progress.opened.load(Ordering::Acquire);
    let open_secs = t_open.elapsed().as_secs_f64();
    eprintln!(
        "storm: {opened} of {} open in {open_secs:.2}s",
        o.connections
    );
    // Let the proxy settle after the last handshake, then cut.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let before = stats::sample(&c.watch);
    let overflows_before = listen_overflows();
    let t_cut = Instant::now();
    let _ = cut_tx.send(Some(t_cut));
    run_hook(&o.cut_cmd, "--cut-cmd")?;
    // Wait until every opened client is back or has given up.
    let deadline = tokio::time::Instant::now() + o.limit + Duration::from_secs(2);
    loop {
        let notified = progress.notify.notified();
        if progress.storm_settled.load(Ordering::Acquire) >= opened {
            break;
        }
        if tokio::time::timeout_at(deadline, notified).await.is_err() {
            break;
        }
    }
    let settled_at = Instant::now();
    let after = stats::sample(&c.watch);
    let overflows = listen_overflows()
        .zip(overflows_before)
        .map(|(a, b)| a.saturating_sub(b));
    let _ = stop_tx.send(true);
    let mut reports = Vec::with_capacity(o.connections);
    let join_deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while let Ok(Some(r)) = tokio::time::timeout_at(join_deadline, set.join_next()).await {
        if let Ok(r) = r {
            reports.push(r);
        }
    }
    set.abort_all();

    let mut errors = Errors::default();
    let (mut cut_seen, mut back, mut resumed, mut attempts) = (0usize, 0usize, 0usize, 0u64);
    let mut times: Vec<u64> = Vec::new();
    let mut last_back = None::<Instant>;
    for r in reports {
        errors.merge(r.errors);
        if !r.opened {
            continue;
        }
        cut_seen += r.cut_seen.is_some() as usize;
        attempts += r.attempts;
        if let Some(b) = r.back {
            back += 1;
            resumed += r.resumed as usize;
            times.push(b.saturating_duration_since(t_cut).as_nanos() as u64);
            last_back = Some(last_back.map_or(b, |l: Instant| l.max(b)));
        }
    }
    times.sort_unstable();
    let reconnect_secs = last_back.map(|l| l.saturating_duration_since(t_cut).as_secs_f64());
    let mut v = json!({
        "mode": "storm",
        "connections": o.connections,
        "opened": opened,
        "open_secs": round3(open_secs),
        "cut_seen": cut_seen,
        "reestablished": back,
        "resumed": resumed,
        "attempts": attempts,
        "reconnect_secs": reconnect_secs.map(round3),
        "waited_secs": round3(settled_at.duration_since(t_cut).as_secs_f64()),
        "listen_overflows": overflows,
        "errors": errors.total(),
        "error_detail": errors.json(),
    });
    merge(
        &mut v,
        json!({ "reconnect_time": stats::percentiles_us(&times) }),
    );
    merge(&mut v, stats::watched_json(&c.watch, before, after));
    Ok(v)
}

#[allow(clippy::too_many_arguments)]
async fn storm_client(
    target: Arc<Target>,
    source: Option<Ipv4Addr>,
    sem: Arc<Semaphore>,
    progress: Arc<Progress>,
    cut: watch::Receiver<Option<Instant>>,
    mut stop: watch::Receiver<bool>,
    limit: Duration,
) -> ClientReport {
    let mut report = ClientReport {
        opened: false,
        cut_seen: None,
        back: None,
        resumed: false,
        attempts: 0,
        errors: Errors::default(),
    };
    let first = {
        let _permit = sem.acquire().await;
        target.connect_timeout(source, CONNECT_LIMIT).await
    };
    let (mut conn, mut buf) = match first {
        Ok(c) => c,
        Err(e) => {
            report.errors.add(&e);
            progress.bump(&progress.open_settled);
            return report;
        }
    };
    report.opened = true;
    progress.bump(&progress.opened);
    progress.bump(&progress.open_settled);

    // Hold the connection until it ends (the cut) or the run stops.
    let ended = tokio::select! {
        r = wait_end(&mut conn, &mut buf) => Some(r),
        _ = stop.changed() => None,
    };
    let Some(server_close) = ended else {
        return report;
    };
    let now = Instant::now();
    let Some(t_cut) = *cut.borrow() else {
        report.errors.add(&StageError {
            stage: Stage::Echo,
            error: anyhow!("connection ended before the cut"),
        });
        progress.bump(&progress.storm_settled);
        return report;
    };
    report.cut_seen = Some(now);
    if server_close {
        // Answer the Close as a browser does, without waiting on the reply.
        let mut out = Vec::with_capacity(8);
        ws::push_client_frame(
            &mut out,
            0x80 | ws::OP_CLOSE,
            &1001u16.to_be_bytes(),
            [7; 4],
        );
        let _ = tokio::time::timeout(Duration::from_millis(50), async {
            conn.write_all(&out).await?;
            conn.flush().await
        })
        .await;
    }
    drop(conn);

    // Reconnect at once; retry (after a short pause) until the limit.
    let give_up = t_cut + limit;
    let mut pause = Duration::from_millis(20);
    while Instant::now() < give_up {
        report.attempts += 1;
        let left = give_up.saturating_duration_since(Instant::now());
        match target
            .connect_timeout(source, left.min(CONNECT_LIMIT))
            .await
        {
            Ok((c, _)) => {
                report.back = Some(Instant::now());
                report.resumed = c.resumed();
                progress.bump(&progress.storm_settled);
                // Hold it until the run stops, so the proxy sees no closes
                // during the measurement.
                let _ = stop.changed().await;
                return report;
            }
            Err(e) => {
                report.errors.add(&e);
                let jitter = Duration::from_millis(rand::random::<u64>() % 20);
                tokio::time::sleep(pause + jitter).await;
                pause = (pause * 2).min(Duration::from_millis(500));
            }
        }
    }
    progress.bump(&progress.storm_settled);
    report
}

/// Reads until the connection ends: `true` when the server sent Close,
/// `false` on the end of the stream or an error.
async fn wait_end(conn: &mut Conn, buf: &mut BytesMut) -> bool {
    loop {
        match read_frame(conn, buf).await {
            Ok(h) => {
                let close = h.opcode() == ws::OP_CLOSE;
                buf.advance(h.total_len());
                if close {
                    return true;
                }
            }
            Err(_) => return false,
        }
    }
}

/// The kernel's count of connections dropped because a listen queue was full
/// (TcpExt ListenOverflows, machine-wide): a client whose SYN is dropped
/// retries only after a second, which shows in the storm's tail.
fn listen_overflows() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/net/netstat").ok()?;
    let mut lines = text.lines();
    while let (Some(names), Some(values)) = (lines.next(), lines.next()) {
        if !names.starts_with("TcpExt:") {
            continue;
        }
        let i = names
            .split_whitespace()
            .position(|n| n == "ListenOverflows")?;
        return values.split_whitespace().nth(i)?.parse().ok();
    }
    None
}
