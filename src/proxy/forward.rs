//! Plain HTTP (and Server-Sent Events): forwarded through a pooled hyper
//! client, bodies streamed both ways, never buffered.
//!
//! Passive health: a response below 500 counts for the backend; a failed
//! connect against it (in `request`). A 5xx answer, a response timeout or
//! a connection lost mid-request count neither way: a plain request's
//! failure may be the application's. A request whose body the client
//! botched (a malformed chunk) is answered `400` and touches neither the
//! backend's health nor its metrics.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

use http::{HeaderValue, Method, Request, Response, StatusCode, Uri};
use http_body_util::BodyExt;
use hyper::body::{Body, Incoming};

use super::headers::strip_hop_by_hop;
use super::request::{
    append_set_cookie, choose_and_connect, facts, AttemptError, ConnectError, Prepared,
};
use super::{
    count_rejected, ConnInfo, ProxyContext, ProxyError, DEFAULT_RETRY_AFTER_MAX, X_REQUEST_ID,
};
use crate::balancer::connector::client_tag;
use crate::balancer::{Backend, Choice};
use crate::body::{empty, ProxyBody};
use crate::io::proxy_header::Addresses;
use crate::metrics::status_class;

/// What the access log and the metrics say about one request.
struct Access<'a> {
    conn: &'a ConnInfo,
    method: Method,
    path: String,
    started: Instant,
    request_id: &'a HeaderValue,
}

impl Access<'_> {
    fn request_id(&self) -> &str {
        self.request_id.to_str().unwrap_or("")
    }
}

pub async fn handle(
    req: Request<Incoming>,
    conn: &ConnInfo,
    ctx: &ProxyContext,
    request_id: &HeaderValue,
) -> Response<ProxyBody> {
    let access = Access {
        conn,
        method: req.method().clone(),
        path: req.uri().path().to_string(),
        started: Instant::now(),
        request_id,
    };
    // The shared path's order: normalize and route, then authenticate
    // (before any backend is chosen; plain HTTP has no rate limit), then
    // choose and connect.
    let (mut parts, body) = req.into_parts();
    let prepared = match Prepared::new(&ctx.routing, conn, &parts) {
        Ok(p) => p,
        Err(err) => {
            let status = err.status();
            if status == StatusCode::BAD_REQUEST {
                count_rejected(ctx, conn, status);
            }
            tracing::info!(target: "berth::access", kind = "http", client = %conn.peer, listener = %conn.listener, protocol = conn.protocol.label(), method = %access.method, path = %access.path, status = status.as_u16(), request_id = access.request_id(), error = %err, "request refused");
            return err.response(DEFAULT_RETRY_AFTER_MAX);
        }
    };
    let pool = Arc::clone(&prepared.pool);
    let mut prepared = match prepared.authenticate(&mut parts, request_id).await {
        Ok(p) => p,
        Err(err) => return refused(ctx, &access, &pool, &err),
    };
    // Again after auth: `copy_headers` cannot replace berth's id.
    prepared.headers.insert(X_REQUEST_ID, request_id.clone());
    // A request without a body can be sent again if the first backend
    // could not be reached at all.
    let attempts = if body.is_end_stream() { 2 } else { 1 };
    // Set when reading the client's body fails, so that the failure is
    // put down to the client and not to the backend it was streaming to.
    let client_body_failed = Arc::new(AtomicBool::new(false));
    let flag = Arc::clone(&client_body_failed);
    let body = body.map_err(move |e| {
        flag.store(true, Ordering::Relaxed);
        e
    });
    let mut body = Some(body.boxed_unsync());
    let result = choose_and_connect(
        &ctx.metrics,
        &pool,
        &facts(&parts, conn),
        attempts,
        |backend| {
            let out = backend_request(&parts.method, &prepared, backend, body.take(), conn);
            send(out, Arc::clone(backend), &prepared)
        },
    )
    .await;
    let result = match result {
        Err(ProxyError::BackendClient { backend, source })
            if client_body_failed.load(Ordering::Relaxed) =>
        {
            Err(ProxyError::ClientBody { backend, source })
        }
        other => other,
    };
    match result {
        Ok((choice, resp)) => {
            if resp.status().as_u16() < 500 {
                pool.observe(&choice.backend, true, "answered a request");
            }
            respond(ctx, &access, &pool.config.name, &choice, resp)
        }
        Err(err) => fail(ctx, &access, &pool, &err),
    }
}

/// The request as `backend` receives it (an empty body on a retry). For a
/// backend that gets PROXY headers, the client's addresses ride in the
/// URI's userinfo, which keys the keep-alive pool to this client (see
/// `balancer::connector`).
fn backend_request(
    method: &Method,
    prepared: &Prepared,
    backend: &Backend,
    body: Option<ProxyBody>,
    conn: &ConnInfo,
) -> Result<Request<ProxyBody>, ConnectError> {
    let uri = if backend.sends_proxy_header() {
        let tag = client_tag(&Addresses {
            source: conn.peer,
            destination: conn.local,
        });
        format!(
            "http://{tag}@{}{}",
            backend.address, prepared.path_and_query
        )
    } else {
        format!("http://{}{}", backend.address, prepared.path_and_query)
    };
    let uri: Uri = uri.parse().map_err(ConnectError::BadAddress)?;
    let mut out = Request::new(body.unwrap_or_else(empty));
    *out.method_mut() = method.clone();
    *out.uri_mut() = uri;
    *out.headers_mut() = prepared.headers.clone();
    Ok(out)
}

/// One attempt: the request through the backend's keep-alive pool, under
/// `response_timeout`. Only a failed connect may be retried elsewhere.
fn send(
    out: Result<Request<ProxyBody>, ConnectError>,
    backend: Arc<Backend>,
    prepared: &Prepared,
) -> impl std::future::Future<Output = Result<Response<Incoming>, AttemptError>> {
    // A backend that started draining since it was chosen falls back to
    // the pool's client.
    let client = backend
        .http_client()
        .unwrap_or_else(|| prepared.pool.http.clone());
    let timeout = prepared.pool.config.response_timeout;
    async move {
        let out = out.map_err(AttemptError::Connect)?;
        let _in_flight = backend.track_request();
        match tokio::time::timeout(timeout, client.request(out)).await {
            Ok(Ok(resp)) => Ok(resp),
            Ok(Err(e)) if e.is_connect() => Err(AttemptError::Connect(ConnectError::Client(e))),
            Ok(Err(source)) => Err(AttemptError::Failed(ProxyError::BackendClient {
                backend: backend.id.clone(),
                source,
            })),
            Err(_) => Err(AttemptError::Failed(ProxyError::ResponseTimeout(
                backend.id.clone(),
            ))),
        }
    }
}

/// The backend's response, on its way to the client: counted and logged.
fn respond(
    ctx: &ProxyContext,
    access: &Access<'_>,
    pool: &str,
    choice: &Choice,
    resp: Response<Incoming>,
) -> Response<ProxyBody> {
    let (mut parts, body) = resp.into_parts();
    strip_hop_by_hop(&mut parts.headers);
    append_set_cookie(choice, &mut parts.headers);
    let backend = &choice.backend.id;
    let status = parts.status.as_u16();
    let elapsed = access.started.elapsed();
    ctx.metrics
        .http_requests
        .with_label_values(&[pool, backend, status_class(status)])
        .inc();
    ctx.metrics
        .http_duration
        .with_label_values(&[pool])
        .observe(elapsed.as_secs_f64());
    let Access {
        conn, method, path, ..
    } = access;
    tracing::info!(target: "berth::access", kind = "http", client = %conn.peer, listener = %conn.listener, protocol = conn.protocol.label(), method = %method, path = %path, status, pool, backend = %backend, duration_ms = elapsed.as_secs_f64() * 1000.0, request_id = access.request_id(), "request");
    Response::from_parts(parts, body.boxed_unsync())
}

/// A request authentication refused: counted and logged (not a failure of
/// berth's or a backend's, so at info). berth's own 503 carries the pool's
/// `Retry-After`.
fn refused(
    ctx: &ProxyContext,
    access: &Access<'_>,
    pool: &crate::balancer::Pool,
    err: &ProxyError,
) -> Response<ProxyBody> {
    let resp = err.response(pool.config.limits.retry_after_max);
    let pool = pool.config.name.as_str();
    let status = resp.status().as_u16();
    ctx.metrics
        .http_requests
        .with_label_values(&[pool, "", status_class(status)])
        .inc();
    let Access {
        conn, method, path, ..
    } = access;
    tracing::info!(target: "berth::access", kind = "http", client = %conn.peer, listener = %conn.listener, protocol = conn.protocol.label(), method = %method, path = %path, status, pool, request_id = access.request_id(), error = %err, "request refused");
    resp
}

/// berth's own error response: counted and logged. The log line has the
/// details (the backend, the OS error) and the request id the client's
/// response carries; the client is told only what happened.
fn fail(
    ctx: &ProxyContext,
    access: &Access<'_>,
    pool: &crate::balancer::Pool,
    err: &ProxyError,
) -> Response<ProxyBody> {
    let resp = err.response(pool.config.limits.retry_after_max);
    let name = pool.config.name.as_str();
    let backend = err.backend().unwrap_or("");
    let status = resp.status().as_u16();
    ctx.metrics
        .http_requests
        .with_label_values(&[name, backend, status_class(status)])
        .inc();
    let Access {
        conn, method, path, ..
    } = access;
    tracing::warn!(target: "berth::access", kind = "http", client = %conn.peer, listener = %conn.listener, protocol = conn.protocol.label(), method = %method, path = %path, status, pool = name, backend, error = %err, request_id = access.request_id(), "request failed");
    resp
}
