//! The admin listener: `/metrics`, `/healthz`, `/readyz` and `/admin/pools`.
//! A plain `match` on method and path; it never shares a socket with client
//! traffic.

use std::convert::Infallible;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;

use crate::app::Shared;
use crate::proxy::{full, text_response, ProxyBody};

pub async fn serve(listener: TcpListener, shared: Arc<Shared>) {
    loop {
        let (stream, _peer) = match listener.accept().await {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(error = %e, "admin accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let shared = Arc::clone(&shared);
        tokio::spawn(async move {
            let svc = service_fn(move |req| {
                let shared = Arc::clone(&shared);
                async move { Ok::<_, Infallible>(route(req, &shared)) }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(Duration::from_secs(10))
                .serve_connection(TokioIo::new(stream), svc)
                .await;
        });
    }
}

fn route(req: Request<Incoming>, shared: &Shared) -> Response<ProxyBody> {
    match (req.method(), req.uri().path()) {
        (&Method::GET, "/metrics") => {
            let mut resp = Response::new(full(Bytes::from(shared.metrics.render())));
            resp.headers_mut().insert(
                http::header::CONTENT_TYPE,
                http::HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
            );
            resp
        }
        (&Method::GET, "/healthz") => text_response(StatusCode::OK, "ok\n"),
        (&Method::GET, "/readyz") => {
            if shared.ready.load(Ordering::Acquire) {
                text_response(StatusCode::OK, "ready\n")
            } else {
                text_response(StatusCode::SERVICE_UNAVAILABLE, "not ready\n")
            }
        }
        (&Method::GET, "/admin/pools") => json_response(StatusCode::OK, &pools_json(shared)),
        (_, "/metrics" | "/healthz" | "/readyz" | "/admin/pools") => {
            text_response(StatusCode::METHOD_NOT_ALLOWED, "method not allowed\n")
        }
        _ => text_response(StatusCode::NOT_FOUND, "not found\n"),
    }
}

fn pools_json(shared: &Shared) -> serde_json::Value {
    let runtime = shared.live.load();
    let mut pools = serde_json::Map::new();
    let mut names: Vec<&String> = runtime.pools.keys().collect();
    names.sort();
    for name in names {
        let Some(pool) = runtime.pools.get(name) else {
            continue;
        };
        let backends: Vec<serde_json::Value> = pool
            .backends
            .iter()
            .map(|b| {
                serde_json::json!({
                    "id": b.id,
                    "address": b.address,
                    "state": b.state().as_str(),
                    "healthy": b.state() != crate::balancer::BackendState::Down,
                    "live_connections": b.live_connections(),
                    "weight": b.weight,
                })
            })
            .collect();
        pools.insert(
            name.clone(),
            serde_json::json!({ "balance": format!("{:?}", pool.config.balance), "backends": backends }),
        );
    }
    serde_json::json!({ "pools": pools })
}

fn json_response(status: StatusCode, value: &serde_json::Value) -> Response<ProxyBody> {
    let mut resp = Response::new(full(Bytes::from(value.to_string())));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/json"),
    );
    resp
}
