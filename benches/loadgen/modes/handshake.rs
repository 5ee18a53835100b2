//! The handshake mode: connect, upgrade, one echo, close, again and again.

use super::*;

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
