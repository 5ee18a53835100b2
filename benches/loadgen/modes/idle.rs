//! The idle mode: open connections, hold them, sample the watched
//! processes, then check each is still alive.

use super::*;

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
