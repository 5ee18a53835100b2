//! The WebSocket path: validate the client's handshake (RFC 6455 §4.2.1),
//! forward it to a backend, check the backend's `101` and accept key
//! (§4.1), answer the client, then run the relay in a tracked task.

use std::sync::Arc;
use std::time::Duration;

use http::header::{CONNECTION, UPGRADE};
use http::{HeaderValue, Request, Response, StatusCode};
use http_body_util::{BodyExt, Empty};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

use super::headers::{add_forwarded, host_without_port, request_host, strip_hop_by_hop};
use super::tunnel::Tunnel;
use super::{ConnInfo, ProxyContext, ProxyError};
use crate::balancer::{Backend, Choice, Pool, RequestFacts};
use crate::body::{text_response, ProxyBody};
use crate::ws::handshake::{accept_matches, validate, HandshakeError};
use crate::ws::relay::RelayConfig;

pub async fn handle(
    mut req: Request<Incoming>,
    conn: &Arc<ConnInfo>,
    ctx: &Arc<ProxyContext>,
) -> Response<ProxyBody> {
    let count = |pool: &str, backend: &str, result: &str| {
        ctx.metrics
            .ws_upgrades
            .with_label_values(&[pool, backend, result])
            .inc();
    };
    // 1. The client's handshake, before any backend is touched.
    let key = match validate(req.headers()) {
        Ok(key) => key.to_string(),
        Err(HandshakeError::BadVersion) => {
            count("", "", "bad_version");
            let mut resp = text_response(
                StatusCode::UPGRADE_REQUIRED,
                "unsupported Sec-WebSocket-Version: berth speaks version 13\n",
            );
            resp.headers_mut()
                .insert("sec-websocket-version", HeaderValue::from_static("13"));
            return resp;
        }
        Err(e) => {
            count("", "", "bad_key");
            return text_response(StatusCode::BAD_REQUEST, &format!("{e}\n"));
        }
    };
    // 2. Route.
    let host = request_host(&req);
    let runtime = ctx.routing.load();
    let Some(pool) = runtime
        .route(
            host.as_deref().map(host_without_port).as_deref(),
            req.uri().path(),
        )
        .cloned()
    else {
        count("", "", "no_route");
        return ProxyError::NoRoute.response();
    };
    drop(runtime);
    let pool_name = pool.config.name.clone();
    if !origin_allowed(&pool.config.allowed_origins, req.headers()) {
        count(&pool_name, "", "origin_rejected");
        return text_response(StatusCode::FORBIDDEN, "origin not allowed\n");
    }

    // 3. The request the backend sees: end-to-end headers kept, the upgrade
    //    headers restated, X-Forwarded-* added.
    let client_upgrade = hyper::upgrade::on(&mut req);
    let mut headers = req.headers().clone();
    strip_hop_by_hop(&mut headers);
    // berth's own affinity cookie is not the application's business.
    if let Some(name) = pool.sticky.cookie_name() {
        crate::affinity::strip_cookie(&mut headers, name);
    }
    headers.insert(CONNECTION, HeaderValue::from_static("Upgrade"));
    headers.insert(UPGRADE, HeaderValue::from_static("websocket"));
    add_forwarded(&mut headers, conn.peer.ip(), conn.tls, host.as_deref());
    let path_and_query = req
        .uri()
        .path_and_query()
        .map_or("/", |pq| pq.as_str())
        .to_string();

    // 4. Choose (affinity first) and connect, retrying once on another backend.
    let facts = RequestFacts {
        headers: req.headers(),
        uri: req.uri(),
        peer: conn.peer.ip(),
        tls: conn.tls,
    };
    let (choice, stream) = match connect_with_retry(&pool, &facts).await {
        Ok(pair) => pair,
        Err(err) => {
            let backend = match &err {
                ProxyError::Connect { backend, .. } => backend.clone(),
                _ => String::new(),
            };
            count(&pool_name, &backend, err.upgrade_result());
            tracing::warn!(client = %conn.peer, pool = %pool_name, error = %err, "websocket upgrade failed");
            return err.response();
        }
    };

    let backend = Arc::clone(&choice.backend);
    if let Some(result) = choice.result {
        ctx.metrics
            .affinity
            .with_label_values(&[&pool_name, pool.config.affinity.mode(), result])
            .inc();
    }

    // 5. Send the handshake and wait for the backend's answer.
    let mut out = Request::new(Empty::<bytes::Bytes>::new());
    *out.uri_mut() = match path_and_query.parse() {
        Ok(uri) => uri,
        Err(_) => {
            count(&pool_name, "", "bad_key");
            return text_response(StatusCode::BAD_REQUEST, "unusable request target\n");
        }
    };
    *out.headers_mut() = headers;
    let exchange = async {
        let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|source| ProxyError::Backend {
                backend: backend.id.clone(),
                source,
            })?;
        tokio::spawn(async move {
            // Ends once the upgrade takes the socket, or the response ends.
            let _ = connection.with_upgrades().await;
        });
        sender
            .send_request(out)
            .await
            .map_err(|source| ProxyError::Backend {
                backend: backend.id.clone(),
                source,
            })
    };
    let mut resp = match tokio::time::timeout(pool.config.response_timeout, exchange).await {
        Ok(Ok(resp)) => resp,
        Ok(Err(err)) => return fail(ctx, &pool_name, &backend, err),
        Err(_) => {
            return fail(
                ctx,
                &pool_name,
                &backend,
                ProxyError::ResponseTimeout(backend.id.clone()),
            )
        }
    };

    // 6. Anything but 101 goes back to the client unchanged.
    if resp.status() != StatusCode::SWITCHING_PROTOCOLS {
        count(&pool_name, &backend.id, "backend_refused");
        let (parts, body) = resp.into_parts();
        return Response::from_parts(parts, body.boxed_unsync());
    }
    if !accept_matches(resp.headers(), &key) {
        // The backend connection is dropped with `resp`.
        return fail(
            ctx,
            &pool_name,
            &backend,
            ProxyError::BadAccept(backend.id.clone()),
        );
    }
    let backend_io = match hyper::upgrade::on(&mut resp).await {
        Ok(upgraded) => match upgraded.downcast::<TokioIo<TcpStream>>() {
            Ok(parts) => (parts.io.into_inner(), parts.read_buf),
            Err(_) => {
                return fail(
                    ctx,
                    &pool_name,
                    &backend,
                    ProxyError::BadAccept(backend.id.clone()),
                )
            }
        },
        Err(source) => {
            return fail(
                ctx,
                &pool_name,
                &backend,
                ProxyError::Backend {
                    backend: backend.id.clone(),
                    source,
                },
            )
        }
    };
    count(&pool_name, &backend.id, "ok");

    // 7. The client gets the backend's 101 (subprotocol, extensions and
    //    cookies included), and the relay starts once hyper hands over the
    //    client's socket.
    let mut client_resp =
        Response::new(Empty::new().map_err(|never| match never {}).boxed_unsync());
    *client_resp.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
    let mut out_headers = resp.headers().clone();
    strip_hop_by_hop(&mut out_headers);
    out_headers.insert(CONNECTION, HeaderValue::from_static("Upgrade"));
    out_headers.insert(UPGRADE, HeaderValue::from_static("websocket"));
    if let Some(cookie) = choice
        .set_cookie
        .as_deref()
        .and_then(|c| HeaderValue::from_str(c).ok())
    {
        out_headers.append(http::header::SET_COOKIE, cookie);
    }
    *client_resp.headers_mut() = out_headers;

    let guard = backend.track_websocket();
    let relay_config = RelayConfig {
        idle_timeout: pool.config.idle_timeout,
        ping_interval: pool.config.ping_interval,
        pong_timeout: pool.config.pong_timeout,
        close_timeout: pool.config.close_timeout,
    };
    // The tunnel keeps the client connection's info (and its gauge) alive.
    ctx.lifecycle.tracker.spawn(Tunnel::new(
        Arc::clone(ctx),
        Arc::clone(conn),
        guard,
        client_upgrade,
        backend_io.0,
        backend_io.1,
        relay_config,
    ));
    client_resp
}

/// A handshake whose `Origin` is not listed is refused (cross-site
/// WebSocket hijacking); one without `Origin` comes from a non-browser
/// client and is let through.
fn origin_allowed(allowed: &[String], headers: &http::HeaderMap) -> bool {
    if allowed.is_empty() {
        return true;
    }
    match headers.get(http::header::ORIGIN).map(|v| v.to_str()) {
        None => true,
        Some(Ok(origin)) => allowed
            .iter()
            .any(|a| a.eq_ignore_ascii_case(origin.trim())),
        Some(Err(_)) => false,
    }
}

fn fail(ctx: &ProxyContext, pool: &str, backend: &Backend, err: ProxyError) -> Response<ProxyBody> {
    ctx.metrics
        .ws_upgrades
        .with_label_values(&[pool, &backend.id, err.upgrade_result()])
        .inc();
    tracing::warn!(pool, backend = %backend.id, error = %err, "websocket upgrade failed");
    err.response()
}

/// Connects to a backend chosen by the pool; on failure, once more to
/// another one.
async fn connect_with_retry(
    pool: &Pool,
    facts: &RequestFacts<'_>,
) -> Result<(Choice, TcpStream), ProxyError> {
    let mut tried: Vec<Arc<Backend>> = Vec::new();
    let mut last = ProxyError::NoBackend(pool.config.name.clone());
    for _ in 0..2 {
        let Some(choice) = pool.choose(facts, &tried) else {
            break;
        };
        let backend = Arc::clone(&choice.backend);
        match connect(&backend.address, pool.config.connect_timeout).await {
            Ok(stream) => return Ok((choice, stream)),
            Err(reason) => {
                tracing::debug!(backend = %backend.id, %reason, "backend connect failed");
                pool.observe(&backend, false, &format!("connect failed: {reason}"));
                last = ProxyError::Connect {
                    backend: backend.id.clone(),
                    reason,
                };
                tried.push(backend);
            }
        }
    }
    Err(last)
}

/// A TCP connection to `address` (hostnames resolved now), with Nagle off.
pub async fn connect(address: &str, timeout: Duration) -> Result<TcpStream, String> {
    match tokio::time::timeout(timeout, TcpStream::connect(address)).await {
        Ok(Ok(stream)) => {
            let _ = stream.set_nodelay(true);
            Ok(stream)
        }
        Ok(Err(e)) => Err(e.to_string()),
        Err(_) => Err(format!(
            "no connection within {}",
            humantime::format_duration(timeout)
        )),
    }
}
