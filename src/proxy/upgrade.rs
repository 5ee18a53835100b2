//! The WebSocket path: validate the client's handshake (RFC 6455 §4.2.1,
//! or an HTTP/2 extended CONNECT, RFC 8441 §5), route it, authenticate it,
//! admit it under the pool's upgrade rate, forward it to a backend as an
//! HTTP/1.1 upgrade (with a key of berth's own for an HTTP/2 client, which
//! sends none), check the backend's `101` and accept key (§4.1), answer the
//! client (`101`, or `200` on HTTP/2, with the backend's subprotocol,
//! extensions and cookies either way), then run the relay in a tunnel task
//! tracked by the lifecycle's tracker. Authentication runs in the shared request
//! path (`Prepared::authenticate`); a token's expiry becomes the relay's
//! deadline.
//!
//! Passive health: a good `101`, or any other answer below 500, counts
//! for the backend; a 5xx answer, a `101` with a bad accept key, a broken
//! or timed-out handshake count against it (a failed connect too, in
//! `request`).

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use http::header::{CONNECTION, UPGRADE};
use http::{HeaderValue, Request, Response, StatusCode, Uri, Version};
use http_body_util::{BodyExt, Empty};
use hyper::body::Incoming;
use hyper::upgrade::OnUpgrade;
use hyper_util::rt::TokioIo;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

use super::headers::strip_hop_by_hop;
use super::request::{
    append_set_cookie, choose_and_connect, connect, facts, AttemptError, Prepared,
};
use super::tunnel::{Terms, Tunnel};
use super::{
    count_rejected, ConnInfo, Protocol, ProxyContext, ProxyError, DEFAULT_RETRY_AFTER_MAX,
    X_REQUEST_ID,
};
use crate::auth::Verified;
use crate::balancer::{Backend, Choice, Pool};
use crate::body::{empty, text_response, ProxyBody};
use crate::io::proxy_header::{self, Addresses};
use crate::lifecycle::RelayTag;
use crate::ws::frame::close_code;
use crate::ws::handshake::{accept_matches, new_key, validate, validate_h2, HandshakeError};
use crate::ws::relay::Deadline;

/// The backend's side of a switched connection: the stream and the bytes
/// hyper already read past the `101`.
type BackendIo = (TcpStream, Bytes);

pub async fn handle(
    mut req: Request<Incoming>,
    conn: &Arc<ConnInfo>,
    ctx: &Arc<ProxyContext>,
    request_id: &HeaderValue,
) -> Response<ProxyBody> {
    let rid = request_id.to_str().unwrap_or("");
    let protocol = conn.protocol;
    // 1. The client's handshake, before any backend is touched. An HTTP/2
    //    client sends no key: the backend gets one of berth's own.
    let h2 = req.version() == Version::HTTP_2;
    let checked = if h2 {
        validate_h2(req.headers()).map(|()| new_key())
    } else {
        validate(req.headers()).map(str::to_string)
    };
    let key = match checked {
        Ok(key) => key,
        Err(err) => return refuse(ctx, conn, &err),
    };
    // 2. Route, authenticate, and the request the backend sees: end-to-end
    //    headers kept, the upgrade headers restated, X-Forwarded-* added.
    //
    //    The order, and why: normalize and route first (nothing else can
    //    be decided without the pool); then the Origin check (cheap and
    //    local: a cross-site page never costs a call to the auth
    //    service); then authentication, before any backend is chosen;
    //    then the pool's upgrade rate limit, after authentication so that
    //    refused clients (a storm of expired tokens) do not spend the
    //    tokens admitted ones need (auth touches no backend, so the bucket
    //    still stands between a storm and the backends); then choose and
    //    connect.
    let client_upgrade = hyper::upgrade::on(&mut req);
    let (mut parts, _body) = req.into_parts();
    let prepared = match Prepared::new(&ctx.routing, conn, &parts) {
        Ok(p) => p,
        Err(err) => {
            count(ctx, "", "", err.upgrade_result());
            if err.status() == StatusCode::BAD_REQUEST {
                count_rejected(ctx, conn, err.status());
            }
            tracing::info!(client = %conn.peer, protocol = protocol.label(), request_id = rid, error = %err, "websocket upgrade refused");
            return err.response(DEFAULT_RETRY_AFTER_MAX);
        }
    };
    let pool = Arc::clone(&prepared.pool);
    let pool_name = pool.config.name.as_str();
    let retry_after_max = pool.config.limits.retry_after_max;
    if !origin_allowed(&pool.config.allowed_origins, &parts.headers) {
        count(ctx, pool_name, "", "origin_rejected");
        return text_response(StatusCode::FORBIDDEN, "origin not allowed\n");
    }
    let mut prepared = match prepared.authenticate(&mut parts, request_id).await {
        Ok(p) => p,
        Err(err) => {
            count(ctx, pool_name, "", err.upgrade_result());
            tracing::info!(client = %conn.peer, protocol = protocol.label(), pool = %pool_name, request_id = rid, error = %err, "websocket upgrade refused");
            return err.response(retry_after_max);
        }
    };
    // Again after auth: `copy_headers` cannot replace berth's id.
    prepared.headers.insert(X_REQUEST_ID, request_id.clone());
    let out = match handshake_request(prepared, h2.then_some(key.as_str())) {
        Ok(out) => out,
        Err(err) => {
            count(ctx, pool_name, "", err.upgrade_result());
            count_rejected(ctx, conn, err.status());
            return err.response(retry_after_max);
        }
    };
    // A reconnect storm is turned away before it costs a backend anything.
    if !pool.admit_upgrade() {
        let err = ProxyError::RateLimited(pool_name.to_string());
        count(ctx, pool_name, "", err.upgrade_result());
        tracing::debug!(client = %conn.peer, protocol = protocol.label(), pool = %pool_name, request_id = rid, "websocket upgrade rate limited");
        return err.response(retry_after_max);
    }

    // 3. Choose (affinity first) and connect, retrying once on another backend.
    let timeout = pool.config.connect_timeout;
    let addresses = Addresses {
        source: conn.peer,
        destination: conn.local,
    };
    let chosen = choose_and_connect(&ctx.metrics, &pool, &facts(&parts, conn), 2, |b| {
        let backend = Arc::clone(b);
        // The upgrade counts as load from the moment it is placed, so that
        // a burst of upgrades does not all pick from the same counts
        // (least connections, `bounded_load`); the WebSocket's own count
        // takes over once it is established.
        let pending = b.track_request();
        async move {
            let mut stream = connect(&backend.address, timeout)
                .await
                .map_err(AttemptError::Connect)?;
            // The PROXY header goes first, before the handshake.
            if backend.sends_proxy_header() {
                let header = proxy_header::v2_header(Some(addresses));
                stream
                    .write_all(&header)
                    .await
                    .map_err(|e| AttemptError::Connect(e.into()))?;
            }
            Ok((stream, pending))
        }
    })
    .await;
    let (choice, (stream, pending)) = match chosen {
        Ok(pair) => pair,
        Err(err) => {
            count(
                ctx,
                pool_name,
                err.backend().unwrap_or(""),
                err.upgrade_result(),
            );
            tracing::warn!(client = %conn.peer, protocol = protocol.label(), pool = %pool_name, request_id = rid, error = %err, "websocket upgrade failed");
            return err.response(retry_after_max);
        }
    };

    // 4. Send the handshake; anything but a valid 101 ends here.
    let backend = Arc::clone(&choice.backend);
    let (resp, backend_io) = match backend_handshake(&pool, &backend, stream, out, &key).await {
        Ok(Switch::Switched(resp, io)) => (resp, io),
        Ok(Switch::Refused(resp)) => {
            let status = resp.status();
            // A backend that answers at all is alive, unless it says it
            // is not (5xx).
            pool.observe(
                &backend,
                !status.is_server_error(),
                &format!("answered a handshake with {status}"),
            );
            count(ctx, pool_name, &backend.id, "backend_refused");
            let (mut parts, body) = resp.into_parts();
            strip_hop_by_hop(&mut parts.headers);
            return Response::from_parts(parts, body.boxed_unsync());
        }
        Err(err) => {
            if !matches!(err, ProxyError::Handover(_)) {
                pool.observe(&backend, false, &format!("handshake failed: {err}"));
            }
            return fail(ctx, &pool, &backend, err, rid, protocol);
        }
    };
    pool.observe(&backend, true, "switched protocols");
    count(ctx, pool_name, &backend.id, "ok");

    // 5. The client gets the backend's 101; the relay starts once hyper
    //    hands over the client's socket, and ends when its token expires.
    let expires = parts.extensions.get::<Verified>().and_then(|v| v.close_at);
    let response = switch(
        ctx,
        conn,
        &pool,
        &choice,
        &resp,
        client_upgrade,
        backend_io,
        expires,
    );
    // The WebSocket is counted now (or the upgrade ended): the pending
    // count goes.
    drop(pending);
    response
}

/// The answer to a client handshake that is not valid.
fn refuse(ctx: &ProxyContext, conn: &ConnInfo, err: &HandshakeError) -> Response<ProxyBody> {
    if let HandshakeError::BadVersion = err {
        count(ctx, "", "", "bad_version");
        let mut resp = text_response(
            StatusCode::UPGRADE_REQUIRED,
            "unsupported Sec-WebSocket-Version: berth speaks version 13\n",
        );
        resp.headers_mut()
            .insert("sec-websocket-version", HeaderValue::from_static("13"));
        return resp;
    }
    count(ctx, "", "", "bad_key");
    count_rejected(ctx, conn, StatusCode::BAD_REQUEST);
    text_response(StatusCode::BAD_REQUEST, &format!("{err}\n"))
}

/// The handshake as the backend receives it: an HTTP/1.1 upgrade, with
/// `key` as its `Sec-WebSocket-Key` when berth makes it (for an HTTP/2
/// client), else the client's own.
fn handshake_request(
    prepared: Prepared,
    key: Option<&str>,
) -> Result<Request<Empty<Bytes>>, ProxyError> {
    let Prepared {
        mut headers,
        path_and_query,
        ..
    } = prepared;
    let uri: Uri = path_and_query.parse().map_err(|_| ProxyError::BadTarget)?;
    headers.insert(CONNECTION, HeaderValue::from_static("Upgrade"));
    headers.insert(UPGRADE, HeaderValue::from_static("websocket"));
    if let Some(key) = key {
        let key = HeaderValue::from_str(key).map_err(|_| ProxyError::BadTarget)?;
        headers.insert("sec-websocket-key", key);
    }
    let mut out = Request::new(Empty::new());
    *out.uri_mut() = uri;
    *out.headers_mut() = headers;
    Ok(out)
}

/// How the backend answered the handshake.
enum Switch {
    /// A `101` with the right accept key, and the connection it switched.
    Switched(Response<Incoming>, BackendIo),
    /// Anything but `101`: passed to the client unchanged.
    Refused(Response<Incoming>),
}

/// Sends the handshake over `stream` and waits (under `response_timeout`)
/// for the answer; a `101` must carry the accept key for `key`.
async fn backend_handshake(
    pool: &Pool,
    backend: &Backend,
    stream: TcpStream,
    out: Request<Empty<Bytes>>,
    key: &str,
) -> Result<Switch, ProxyError> {
    let failed = |source| ProxyError::Backend {
        backend: backend.id.clone(),
        source,
    };
    let exchange = async {
        let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(failed)?;
        tokio::spawn(async move {
            // Ends once the upgrade takes the socket, or the response ends.
            let _ = connection.with_upgrades().await;
        });
        sender.send_request(out).await.map_err(failed)
    };
    let mut resp = match tokio::time::timeout(pool.config.response_timeout, exchange).await {
        Ok(result) => result?,
        Err(_) => return Err(ProxyError::ResponseTimeout(backend.id.clone())),
    };
    if resp.status() != StatusCode::SWITCHING_PROTOCOLS {
        return Ok(Switch::Refused(resp));
    }
    if !accept_matches(resp.headers(), key) {
        // The backend connection is dropped with `resp`.
        return Err(ProxyError::BadAccept(backend.id.clone()));
    }
    let upgraded = hyper::upgrade::on(&mut resp).await.map_err(failed)?;
    match upgraded.downcast::<TokioIo<TcpStream>>() {
        Ok(parts) => Ok(Switch::Switched(
            resp,
            (parts.io.into_inner(), parts.read_buf),
        )),
        Err(_) => Err(ProxyError::Handover(backend.id.clone())),
    }
}

/// Answers the client with the backend's `101` (subprotocol, extensions and
/// cookies included) and starts the tunnel that will relay (until
/// `expires`, when its token's does: then Close 1008).
#[allow(clippy::too_many_arguments)]
fn switch(
    ctx: &Arc<ProxyContext>,
    conn: &Arc<ConnInfo>,
    pool: &Pool,
    choice: &Choice,
    resp: &Response<Incoming>,
    client_upgrade: OnUpgrade,
    (backend_stream, backend_prefix): BackendIo,
    expires: Option<SystemTime>,
) -> Response<ProxyBody> {
    let mut client_resp = Response::new(empty());
    let mut out_headers = resp.headers().clone();
    strip_hop_by_hop(&mut out_headers);
    match conn.protocol {
        Protocol::Http1 => {
            *client_resp.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
            out_headers.insert(CONNECTION, HeaderValue::from_static("Upgrade"));
            out_headers.insert(UPGRADE, HeaderValue::from_static("websocket"));
        }
        Protocol::Http2 => {
            // RFC 8441 §5: a 2xx opens the tunnel; the accept key was for
            // berth's own key, and a tunnel has no length.
            *client_resp.status_mut() = StatusCode::OK;
            out_headers.remove("sec-websocket-accept");
            out_headers.remove(http::header::CONTENT_LENGTH);
        }
    }
    append_set_cookie(choice, &mut out_headers);
    *client_resp.headers_mut() = out_headers;
    ctx.metrics
        .ws_opened
        .with_label_values(&[&pool.config.name, conn.protocol.label()])
        .inc();

    let guard = choice.backend.track_websocket();
    // The connection ends at the earlier of its token's expiry and its
    // maximum age, if it has either.
    let age = pool
        .config
        .max_connection_age
        .map(|age| max_age_deadline(age, rand::random()));
    let token = expires.map(token_expiry);
    let max_age = match (token, age) {
        (Some(t), Some(a)) => a.at < t.at,
        (None, a) => a.is_some(),
        (Some(_), None) => false,
    };
    let terms = Terms {
        deadline: if max_age { age } else { token },
        tag: RelayTag {
            peer: Some(conn.peer.ip()),
            placement: choice.placement.clone(),
        },
    };
    // The tunnel keeps the client connection's info (and its gauge) alive.
    ctx.lifecycle.tracker.spawn(Tunnel::new(
        Arc::clone(ctx),
        Arc::clone(conn),
        guard,
        client_upgrade,
        backend_stream,
        backend_prefix,
        Arc::clone(&pool.relay),
        terms,
    ));
    client_resp
}

/// Where in the last tenth of a connection's maximum age it ends: `u`,
/// uniform in [0, 1), puts the deadline uniformly between 90 % and 100 %
/// of `age` from now, so connections opened together are not closed
/// together.
fn max_age_deadline(age: Duration, u: f64) -> Deadline {
    let life = age.mul_f64(1.0 - MAX_AGE_SPREAD * (1.0 - u.clamp(0.0, 1.0)));
    Deadline {
        at: tokio::time::Instant::now() + life,
        code: close_code::SERVICE_RESTART,
        reason: "max connection age",
    }
}

/// The share of `max_connection_age` its deadlines are spread over.
const MAX_AGE_SPREAD: f64 = 0.1;

/// The relay deadline for a token that stops being valid at `at` (a time
/// already past closes at once).
fn token_expiry(at: SystemTime) -> Deadline {
    let left = at
        .duration_since(SystemTime::now())
        .unwrap_or(Duration::ZERO);
    Deadline {
        at: tokio::time::Instant::now() + left,
        code: close_code::POLICY_VIOLATION,
        reason: "token expired",
    }
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

/// Counts one upgrade attempt in `berth_websocket_upgrades_total`.
fn count(ctx: &ProxyContext, pool: &str, backend: &str, result: &str) {
    ctx.metrics
        .ws_upgrades
        .with_label_values(&[pool, backend, result])
        .inc();
}

/// A handshake that failed at the backend: counted, logged with the
/// details, answered in generic words.
fn fail(
    ctx: &ProxyContext,
    pool: &Pool,
    backend: &Backend,
    err: ProxyError,
    request_id: &str,
    protocol: Protocol,
) -> Response<ProxyBody> {
    let name = pool.config.name.as_str();
    count(ctx, name, &backend.id, err.upgrade_result());
    tracing::warn!(pool = name, backend = %backend.id, protocol = protocol.label(), request_id, error = %err, "websocket upgrade failed");
    err.response(pool.config.limits.retry_after_max)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn max_age_deadlines_fill_the_last_tenth_of_the_age_evenly() {
        let age = Duration::from_secs(6 * 3600);
        let start = tokio::time::Instant::now();
        let life = |u: f64| max_age_deadline(age, u).at - start;
        assert_eq!(life(0.0), age.mul_f64(0.9));
        assert_eq!(life(0.5), age.mul_f64(0.95));
        assert_eq!(life(1.0), age);
        let d = max_age_deadline(age, 0.3);
        assert_eq!((d.code, d.reason), (1012, "max connection age"));
        // Connections opened together (the clock is paused): their
        // deadlines cover the last tenth, about as many in each hundredth.
        let n = 20_000;
        let mut buckets = [0u32; 10];
        for _ in 0..n {
            let at = life(rand::random());
            assert!(at >= age.mul_f64(0.9) && at <= age, "{at:?}");
            let tenth = ((at.as_secs_f64() / age.as_secs_f64() - 0.9) * 100.0) as usize;
            buckets[tenth.min(9)] += 1;
        }
        for count in buckets {
            assert!((1_600..2_400).contains(&count), "{buckets:?}");
        }
    }
}
