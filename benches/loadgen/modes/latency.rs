//! The latency mode: one message in flight per connection, every round
//! trip timed.

use super::*;

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
