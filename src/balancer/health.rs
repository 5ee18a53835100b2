//! Active health checks: one task per pool that has a `[pools.NAME.health]`
//! table, probing each backend with `GET path` every `interval`. A 2xx or
//! 3xx answer within `timeout` is a success. Results feed the same
//! rise/fall state as the passive checks on the data path.
//!
//! The task stops when its pool is replaced by a reload (the pool's `stop`
//! token) or when berth shuts down.

use std::sync::Arc;

use http::{Request, Uri};
use http_body_util::{BodyExt, Empty};
use tokio_util::sync::CancellationToken;

use super::{Backend, Pool};
use crate::metrics::Metrics;

/// Starts the checker for `pool` if it has active checks configured.
pub fn start(pool: &Arc<Pool>, metrics: &Metrics, shutdown: &CancellationToken) {
    let Some(health) = pool.config.health.clone() else {
        return;
    };
    let pool = Arc::clone(pool);
    let metrics = metrics.clone();
    let stop = pool.stop.clone();
    let shutdown = shutdown.clone();
    tokio::spawn(async move {
        let mut ticker = tokio::time::interval(health.interval);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = ticker.tick() => {}
                _ = stop.cancelled() => return,
                _ = shutdown.cancelled() => return,
            }
            let probes = pool
                .backends
                .iter()
                .map(|b| probe(&pool, b, &health.path, health.timeout));
            let results = futures_util::future::join_all(probes).await;
            for (backend, (ok, reason)) in pool.backends.iter().zip(results) {
                metrics
                    .health_checks
                    .with_label_values(&[
                        &pool.config.name,
                        &backend.id,
                        if ok { "success" } else { "failure" },
                    ])
                    .inc();
                backend.observe(ok, health.rise, health.fall, &reason);
            }
        }
    });
}

/// One probe: (success, reason for the log).
async fn probe(
    pool: &Pool,
    backend: &Backend,
    path: &str,
    timeout: std::time::Duration,
) -> (bool, String) {
    let uri: Uri = match format!("http://{}{}", backend.address, path).parse() {
        Ok(u) => u,
        Err(e) => return (false, format!("bad health check URI: {e}")),
    };
    let mut req = Request::new(Empty::new().map_err(|never| match never {}).boxed_unsync());
    *req.uri_mut() = uri;
    req.headers_mut().insert(
        http::header::USER_AGENT,
        http::HeaderValue::from_static("berth-health-check"),
    );
    match tokio::time::timeout(timeout, pool.http.request(req)).await {
        Ok(Ok(resp)) => {
            let status = resp.status();
            // Read the (small) body so the connection can be reused.
            let _ = tokio::time::timeout(timeout, resp.into_body().collect()).await;
            if status.is_success() || status.is_redirection() {
                (true, format!("health check answered {status}"))
            } else {
                (false, format!("health check answered {status}"))
            }
        }
        Ok(Err(e)) => (false, format!("health check failed: {e}")),
        Err(_) => (
            false,
            format!(
                "health check timed out after {}",
                humantime::format_duration(timeout)
            ),
        ),
    }
}
