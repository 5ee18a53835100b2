//! The half-open mode: connections that stop halfway through their
//! ClientHello or request head, held while the watched process is sampled.

use super::*;

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
