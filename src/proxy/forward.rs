//! Plain HTTP (and Server-Sent Events): forwarded through a pooled hyper
//! client, bodies streamed both ways, never buffered.

use std::time::Instant;

use http::{Request, Response, Uri};
use http_body_util::{BodyExt, Empty};
use hyper::body::{Body, Incoming};

use super::headers::{add_forwarded, host_without_port, request_host, strip_hop_by_hop};
use super::{ConnInfo, ProxyContext, ProxyError};
use crate::body::ProxyBody;
use std::sync::Arc;

use crate::balancer::RequestFacts;
use crate::metrics::status_class;

pub async fn handle(
    req: Request<Incoming>,
    conn: &ConnInfo,
    ctx: &ProxyContext,
) -> Response<ProxyBody> {
    let started = Instant::now();
    let method = req.method().clone();
    let path = req.uri().path().to_string();
    let host = request_host(&req);
    let runtime = ctx.routing.load();
    let Some(pool) = runtime.route(host.as_deref().map(host_without_port).as_deref(), &path) else {
        let err = ProxyError::NoRoute;
        tracing::info!(target: "berth::access", kind = "http", client = %conn.peer, listener = %conn.listener, method = %method, path = %path, status = 404u16, "no route");
        return err.response();
    };
    let pool = pool.clone();
    drop(runtime);

    let (mut parts, body) = req.into_parts();
    strip_hop_by_hop(&mut parts.headers);
    add_forwarded(
        &mut parts.headers,
        conn.peer.ip(),
        conn.tls,
        host.as_deref(),
    );
    let path_and_query = parts
        .uri
        .path_and_query()
        .map_or("/", |pq| pq.as_str())
        .to_string();
    // A request without a body can be sent again if the first backend
    // could not be reached at all.
    let retryable = body.is_end_stream();
    let mut body = Some(body.boxed_unsync());
    let mut tried = Vec::new();
    let attempts = if retryable { 2 } else { 1 };

    let mut last_err = ProxyError::NoBackend(pool.config.name.clone());
    for _ in 0..attempts {
        let facts = RequestFacts {
            headers: &parts.headers,
            uri: &parts.uri,
            peer: conn.peer.ip(),
            tls: conn.tls,
        };
        let Some(choice) = pool.choose(&facts, &tried) else {
            break;
        };
        let backend = Arc::clone(&choice.backend);
        let uri: Uri = match format!("http://{}{}", backend.address, path_and_query).parse() {
            Ok(u) => u,
            Err(_) => {
                last_err = ProxyError::Connect {
                    backend: backend.id.clone(),
                    reason: "address does not form a valid URI".into(),
                };
                tried.push(backend);
                continue;
            }
        };
        let mut out = Request::new(
            body.take()
                .unwrap_or_else(|| Empty::new().map_err(|never| match never {}).boxed_unsync()),
        );
        *out.method_mut() = parts.method.clone();
        *out.uri_mut() = uri;
        *out.headers_mut() = parts.headers.clone();
        // berth's own affinity cookie is not the application's business.
        if let Some(name) = pool.sticky.cookie_name() {
            crate::affinity::strip_cookie(out.headers_mut(), name);
        }
        let guard = backend.track_request();
        let result = tokio::time::timeout(pool.config.response_timeout, {
            // The backend's own keep-alive pool; a backend that started
            // draining since it was chosen falls back to the pool's.
            let client = backend.http_client().unwrap_or_else(|| pool.http.clone());
            client.request(out)
        })
        .await;
        drop(guard);
        match result {
            Ok(Ok(resp)) => {
                let (mut rparts, rbody) = resp.into_parts();
                strip_hop_by_hop(&mut rparts.headers);
                if let Some(cookie) = choice
                    .set_cookie
                    .as_deref()
                    .and_then(|c| http::HeaderValue::from_str(c).ok())
                {
                    rparts.headers.append(http::header::SET_COOKIE, cookie);
                }
                if let Some(result) = choice.result {
                    ctx.metrics
                        .affinity
                        .with_label_values(&[
                            &pool.config.name,
                            pool.config.affinity.mode(),
                            result,
                        ])
                        .inc();
                }
                let status = rparts.status.as_u16();
                let elapsed = started.elapsed();
                ctx.metrics
                    .http_requests
                    .with_label_values(&[&pool.config.name, &backend.id, status_class(status)])
                    .inc();
                ctx.metrics
                    .http_duration
                    .with_label_values(&[&pool.config.name])
                    .observe(elapsed.as_secs_f64());
                tracing::info!(target: "berth::access", kind = "http", client = %conn.peer, listener = %conn.listener, method = %method, path = %path, status, pool = %pool.config.name, backend = %backend.id, duration_ms = elapsed.as_secs_f64() * 1000.0, "request");
                return Response::from_parts(rparts, rbody.boxed_unsync());
            }
            Ok(Err(e)) if e.is_connect() => {
                pool.observe(&backend, false, &format!("connect failed: {e}"));
                last_err = ProxyError::Connect {
                    backend: backend.id.clone(),
                    reason: e.to_string(),
                };
                tried.push(backend);
            }
            Ok(Err(e)) => {
                last_err = ProxyError::BackendClient {
                    backend: backend.id.clone(),
                    source: e,
                };
                tried.push(backend);
                break;
            }
            Err(_) => {
                last_err = ProxyError::ResponseTimeout(backend.id.clone());
                tried.push(backend);
                break;
            }
        }
    }
    let resp = last_err.response();
    let backend = tried.last().map_or("", |b| b.id.as_str());
    ctx.metrics
        .http_requests
        .with_label_values(&[
            &pool.config.name,
            backend,
            status_class(resp.status().as_u16()),
        ])
        .inc();
    tracing::warn!(target: "berth::access", kind = "http", client = %conn.peer, listener = %conn.listener, method = %method, path = %path, status = resp.status().as_u16(), pool = %pool.config.name, backend, error = %last_err, "request failed");
    resp
}
