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

use super::{HttpClient, Pool};
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
                .map(|b| probe(&pool.http, &b.address, &health.path, health.timeout));
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

/// One probe of `GET http://{address}{path}`: (success, reason for the log).
/// The reason says what an operator needs to see: "status 503 Service
/// Unavailable", "connection refused", "timed out after 2s".
async fn probe(
    http: &HttpClient,
    address: &str,
    path: &str,
    timeout: std::time::Duration,
) -> (bool, String) {
    let uri: Uri = match format!("http://{address}{path}").parse() {
        Ok(u) => u,
        Err(e) => return (false, format!("health check: bad URI: {e}")),
    };
    let mut req = Request::new(Empty::new().map_err(|never| match never {}).boxed_unsync());
    *req.uri_mut() = uri;
    req.headers_mut().insert(
        http::header::USER_AGENT,
        http::HeaderValue::from_static("berth-health-check"),
    );
    match tokio::time::timeout(timeout, http.request(req)).await {
        Ok(Ok(resp)) => {
            let status = resp.status();
            // Read the (small) body so the connection can be reused.
            let _ = tokio::time::timeout(timeout, resp.into_body().collect()).await;
            let ok = status.is_success() || status.is_redirection();
            (ok, format!("health check: status {status}"))
        }
        Ok(Err(e)) => (false, format!("health check: {}", failure_reason(&e))),
        Err(_) => (
            false,
            format!(
                "health check: timed out after {}",
                humantime::format_duration(timeout)
            ),
        ),
    }
}

/// Why a request failed, in plain words. hyper-util's own message ("client
/// error (Connect)") names only the stage, so this looks through the causes:
/// the common socket errors get their usual names, anything else is the
/// chain of causes, each said once.
fn failure_reason(e: &(dyn std::error::Error + 'static)) -> String {
    use std::io::ErrorKind;
    let mut parts: Vec<String> = Vec::new();
    let mut cause = e.source();
    while let Some(err) = cause {
        if let Some(io) = err.downcast_ref::<std::io::Error>() {
            match io.kind() {
                ErrorKind::ConnectionRefused => return "connection refused".to_string(),
                ErrorKind::TimedOut => return "connect timed out".to_string(),
                ErrorKind::ConnectionReset => return "connection reset".to_string(),
                _ => {}
            }
        }
        let text = err.to_string();
        if !parts.iter().any(|p| p.contains(&text)) {
            parts.push(text);
        }
        cause = err.source();
    }
    if parts.is_empty() {
        e.to_string()
    } else {
        parts.join(": ")
    }
}

#[cfg(test)]
mod tests {
    use std::net::SocketAddr;
    use std::time::Duration;

    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    use tokio::net::TcpListener;

    use super::*;
    use crate::balancer::http_client;

    /// A backend on 127.0.0.1 that answers every request with `response`
    /// (or never answers, for `None`).
    async fn backend(response: Option<&'static str>) -> SocketAddr {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            loop {
                let Ok((mut s, _)) = listener.accept().await else {
                    return;
                };
                tokio::spawn(async move {
                    let mut buf = [0u8; 1024];
                    let mut head = Vec::new();
                    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                        match s.read(&mut buf).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => head.extend_from_slice(&buf[..n]),
                        }
                    }
                    match response {
                        Some(r) => {
                            let _ = s.write_all(r.as_bytes()).await;
                        }
                        None => tokio::time::sleep(Duration::from_secs(30)).await,
                    }
                });
            }
        });
        addr
    }

    async fn check(addr: SocketAddr, timeout: Duration) -> (bool, String) {
        let http = http_client(Duration::from_secs(2), false);
        probe(&http, &addr.to_string(), "/healthz", timeout).await
    }

    #[tokio::test]
    async fn reasons_name_the_status_or_the_socket_error() {
        let up = backend(Some(
            "HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok",
        ))
        .await;
        let unavailable = backend(Some(
            "HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
        ))
        .await;
        let silent = backend(None).await;
        let refused = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap()
        };
        let timeout = Duration::from_secs(2);
        assert_eq!(
            check(up, timeout).await,
            (true, "health check: status 200 OK".to_string())
        );
        assert_eq!(
            check(unavailable, timeout).await,
            (
                false,
                "health check: status 503 Service Unavailable".to_string()
            )
        );
        assert_eq!(
            check(refused, timeout).await,
            (false, "health check: connection refused".to_string())
        );
        assert_eq!(
            check(silent, Duration::from_millis(300)).await,
            (false, "health check: timed out after 300ms".to_string())
        );
    }
}
