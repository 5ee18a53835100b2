//! The admin listener: `GET /metrics`, `/healthz`, `/readyz`,
//! `/admin/pools`, and `POST /admin/reload`,
//! `/admin/pools/{pool}/backends/{id}/drain` and `.../undrain`.
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
                async move { Ok::<_, Infallible>(route(req, &shared).await) }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(Duration::from_secs(10))
                .serve_connection(TokioIo::new(stream), svc)
                .await;
        });
    }
}

async fn route(req: Request<Incoming>, shared: &Arc<Shared>) -> Response<ProxyBody> {
    if req.method() == Method::POST {
        return mutate(req, shared).await;
    }
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

/// POST routes: reload, drain, undrain. They require the bearer token when
/// `[admin] token` is set (`check` refuses a non-loopback admin bind
/// without one).
async fn mutate(req: Request<Incoming>, shared: &Arc<Shared>) -> Response<ProxyBody> {
    let token = shared
        .live
        .load()
        .config
        .admin
        .as_ref()
        .and_then(|a| a.token.clone());
    if let Some(token) = token {
        let presented = req
            .headers()
            .get(http::header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .map(str::trim);
        let ok = presented.is_some_and(|p| constant_time_eq(p.as_bytes(), token.as_bytes()));
        if !ok {
            let mut resp =
                text_response(StatusCode::UNAUTHORIZED, "missing or wrong bearer token\n");
            resp.headers_mut().insert(
                http::header::WWW_AUTHENTICATE,
                http::HeaderValue::from_static("Bearer"),
            );
            return resp;
        }
    }
    let path = req.uri().path().to_string();
    if path == "/admin/reload" {
        return match crate::reload::reload(shared).await {
            Ok(summary) => json_response(
                StatusCode::OK,
                &serde_json::json!({ "result": "success", "changes": summary }),
            ),
            Err(e) => text_response(StatusCode::UNPROCESSABLE_ENTITY, &format!("{e}\n")),
        };
    }
    // /admin/pools/{pool}/backends/{id}/drain | undrain
    let parts: Vec<&str> = path.trim_start_matches('/').split('/').collect();
    if let ["admin", "pools", pool, "backends", id, action @ ("drain" | "undrain")] =
        parts.as_slice()
    {
        let runtime = shared.live.load();
        let Some(backend) = runtime.pools.get(*pool).and_then(|p| p.find(id)) else {
            return text_response(
                StatusCode::NOT_FOUND,
                &format!("no backend {id:?} in pool {pool:?}\n"),
            );
        };
        let window = runtime
            .pools
            .get(*pool)
            .map_or(std::time::Duration::ZERO, |p| p.config.drain_window);
        let changed = if *action == "drain" {
            crate::drain::drain_backend(&shared.registry, backend, window, &shared.shutdown)
        } else {
            backend.undrain()
        };
        return json_response(
            StatusCode::OK,
            &serde_json::json!({
                "pool": pool,
                "backend": id,
                "state": backend.state().as_str(),
                "changed": changed,
                "live_connections": backend.live_connections(),
            }),
        );
    }
    text_response(StatusCode::NOT_FOUND, "not found\n")
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
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
                    "weight": b.weight(),
                })
            })
            .collect();
        pools.insert(
            name.clone(),
            serde_json::json!({ "balance": match pool.config.balance {
                crate::config::Balance::LeastConnections => "least_connections",
                crate::config::Balance::RoundRobin => "round_robin",
            }, "backends": backends }),
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
