//! The admin listener: the status page (`GET /`) and its event stream
//! (`GET /admin/events`), `GET /metrics`, `/healthz`, `/readyz`,
//! `/admin/pools`, and `POST /admin/reload`,
//! `/admin/pools/{pool}/backends/{id}/drain` and `.../undrain`.
//! A plain `match` on the path, then the method (another method gets `405`
//! with `Allow`); it never shares a socket with client traffic.
//!
//! [`AdminContext`] is all the API answers from: the routing table, the
//! metrics, the lifecycle (readiness, drains), the reload handle and the
//! status feed. [`serve`] runs the accept loop and one task per admin
//! connection until its stop token is cancelled (the wiring module does
//! that at the end of shutdown); then each connection finishes its answer
//! in progress within [`CLOSE_GRACE`] (an event stream ends as soon as the
//! sampler stops) and the loop returns.
//!
//! The admin port must answer while client traffic misbehaves: it has its
//! own small connection cap ([`ADMIN_MAX_CONNECTIONS`], inside the
//! descriptor reserve, so it works while client listeners refuse at their
//! descriptor limit), a request-head timeout, one request per connection,
//! and at the cap a new connection evicts the one that has waited longest
//! for its request head. Event streams, which hold their connection for as
//! long as they are open, have a smaller cap of their own
//! ([`ADMIN_MAX_EVENT_STREAMS`]), so open status pages cannot take every
//! place.

use std::convert::Infallible;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use bytes::Bytes;
use futures_util::StreamExt;
use http::{HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, StreamBody};
use hyper::body::Frame;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use subtle::ConstantTimeEq;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::body::{full, text_response, ProxyBody};
use crate::io::head::Head;
use crate::io::ClientStream;
use crate::lifecycle::Lifecycle;
use crate::metrics::Metrics;
use crate::reload::ReloadContext;
use crate::routing::Routing;
use crate::status::Feed;

/// How long an admin connection may take to finish once the admin API
/// stops.
pub const CLOSE_GRACE: Duration = Duration::from_secs(1);

/// What the admin API reads and acts on.
pub struct AdminContext {
    pub routing: Arc<Routing>,
    pub metrics: Metrics,
    pub lifecycle: Arc<Lifecycle>,
    pub reload: Arc<ReloadContext>,
    /// The status page's snapshots.
    pub status: Feed,
    /// The places for open `/admin/events` streams.
    pub event_streams: EventStreams,
}

/// `/admin/events` streams open at once. Each holds an admin connection
/// for as long as it is open, so they get well under
/// [`ADMIN_MAX_CONNECTIONS`]: the rest stay for `/metrics`, `/readyz` and
/// drains whatever number of status pages is left open.
pub const ADMIN_MAX_EVENT_STREAMS: usize = 8;
/// The `Retry-After` of a refused event stream, in seconds.
const EVENT_STREAM_RETRY_AFTER: &str = "5";

/// The places for event streams: a stream holds one from its answer until
/// its body is dropped (the client went away, or the sampler stopped).
#[derive(Clone)]
pub struct EventStreams(Arc<tokio::sync::Semaphore>);

impl Default for EventStreams {
    fn default() -> Self {
        EventStreams(Arc::new(tokio::sync::Semaphore::new(
            ADMIN_MAX_EVENT_STREAMS,
        )))
    }
}

/// Admin connections open at once. The descriptor reserve has room for
/// them whatever the client listeners do.
pub const ADMIN_MAX_CONNECTIONS: usize = 32;
/// The time an admin connection has to send its request head.
pub const ADMIN_HEAD_TIMEOUT: Duration = Duration::from_secs(5);
/// The largest admin request head.
const ADMIN_MAX_HEAD: usize = 8 * 1024;

/// The admin connections open, and those still waiting for their request
/// head, oldest first, each with the token that closes it.
#[derive(Default)]
struct AdminConns {
    open: usize,
    next_id: u64,
    waiting: std::collections::VecDeque<(u64, CancellationToken)>,
}

/// An admin connection's place; dropping it gives the place back.
struct AdminSlot {
    conns: Arc<Mutex<AdminConns>>,
    id: u64,
}

impl AdminSlot {
    /// The head has arrived: the connection can no longer be evicted.
    fn busy(&self) {
        lock(&self.conns).waiting.retain(|(id, _)| *id != self.id);
    }
}

impl Drop for AdminSlot {
    fn drop(&mut self) {
        let mut conns = lock(&self.conns);
        conns.open -= 1;
        conns.waiting.retain(|(id, _)| *id != self.id);
    }
}

fn lock(conns: &Mutex<AdminConns>) -> MutexGuard<'_, AdminConns> {
    match conns.lock() {
        Ok(g) => g,
        Err(poisoned) => poisoned.into_inner(),
    }
}

/// Takes a place for a new admin connection. At the cap, the connection
/// that has waited longest for its request head gives up its place (so a
/// client that opens connections and sends nothing cannot keep /metrics or
/// a drain out); with none waiting, `None`.
fn admit(conns: &Arc<Mutex<AdminConns>>) -> Option<(AdminSlot, CancellationToken)> {
    let mut c = lock(conns);
    if c.open >= ADMIN_MAX_CONNECTIONS {
        let (_, evicted) = c.waiting.pop_front()?;
        evicted.cancel();
    }
    c.open += 1;
    c.next_id += 1;
    let id = c.next_id;
    let token = CancellationToken::new();
    c.waiting.push_back((id, token.clone()));
    let slot = AdminSlot {
        conns: Arc::clone(conns),
        id,
    };
    Some((slot, token))
}

/// Serves the admin API on `listener` until `stop` is cancelled: at most
/// [`ADMIN_MAX_CONNECTIONS`] connections, each with [`ADMIN_HEAD_TIMEOUT`]
/// for its request head and one request (no keep-alive), so no client can
/// hold the admin port.
pub async fn serve(listener: TcpListener, ctx: Arc<AdminContext>, stop: CancellationToken) {
    let connections = TaskTracker::new();
    let conns = Arc::new(Mutex::new(AdminConns::default()));
    let refused = ctx
        .metrics
        .connections_refused
        .with_label_values(&["admin", crate::limits::Refusal::ListenerFull.label()]);
    let mut failing = false;
    loop {
        let accepted = tokio::select! {
            _ = stop.cancelled() => break,
            accepted = listener.accept() => accepted,
        };
        let stream = match accepted {
            Ok((stream, _peer)) => stream,
            Err(e) => {
                if !std::mem::replace(&mut failing, true) {
                    tracing::warn!(error = %e, "admin accept failed; backing off until it succeeds again");
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        failing = false;
        let Some((slot, evicted)) = admit(&conns) else {
            refused.inc();
            continue;
        };
        let ctx = Arc::clone(&ctx);
        let stop = stop.clone();
        connections.spawn(async move {
            tokio::select! {
                _ = evicted.cancelled() => {}
                _ = serve_connection(stream, &slot, ctx, &stop) => {}
            }
        });
    }
    drop(listener);
    connections.close();
    let _ = tokio::time::timeout(CLOSE_GRACE, connections.wait()).await;
}

/// The admin routes.
#[derive(Debug, PartialEq, Eq)]
enum Target {
    Page,
    Events,
    Metrics,
    Healthz,
    Readyz,
    Pools,
    Reload,
    /// Drain (`true`) or undrain a backend; pool and id percent-decoded.
    Backend {
        pool: String,
        id: String,
        drain: bool,
    },
}

impl Target {
    /// The route for a request path; `None` for a path that is none.
    fn of(path: &str) -> Option<Target> {
        let simple = match path {
            "/" => Some(Target::Page),
            "/admin/events" => Some(Target::Events),
            "/metrics" => Some(Target::Metrics),
            "/healthz" => Some(Target::Healthz),
            "/readyz" => Some(Target::Readyz),
            "/admin/pools" => Some(Target::Pools),
            "/admin/reload" => Some(Target::Reload),
            _ => None,
        };
        if simple.is_some() {
            return simple;
        }
        // /admin/pools/{pool}/backends/{id}/drain | undrain; the page
        // percent-encodes pool names (any TOML key) and ids.
        let parts: Vec<&str> = path.trim_start_matches('/').split('/').collect();
        let ["admin", "pools", pool, "backends", id, action @ ("drain" | "undrain")] =
            parts.as_slice()
        else {
            return None;
        };
        let decode = |s: &str| {
            percent_encoding::percent_decode_str(s)
                .decode_utf8()
                .ok()
                .map(|c| c.into_owned())
        };
        Some(Target::Backend {
            pool: decode(pool)?,
            id: decode(id)?,
            drain: *action == "drain",
        })
    }

    /// The one method the route answers.
    fn method(&self) -> Method {
        match self {
            Target::Reload | Target::Backend { .. } => Method::POST,
            _ => Method::GET,
        }
    }
}

/// One admin connection: its request head within [`ADMIN_HEAD_TIMEOUT`],
/// then one request; when `stop` is cancelled, the answer in progress gets
/// [`CLOSE_GRACE`] to finish.
async fn serve_connection(
    tcp: tokio::net::TcpStream,
    slot: &AdminSlot,
    ctx: Arc<AdminContext>,
    stop: &CancellationToken,
) {
    let mut stream = ClientStream::plain(tcp);
    let head = tokio::select! {
        _ = stop.cancelled() => return,
        head = tokio::time::timeout(
            ADMIN_HEAD_TIMEOUT,
            crate::io::head::read_head(&mut stream, ADMIN_MAX_HEAD),
        ) => head,
    };
    let refusal = match head {
        Ok(Head::Ready(bytes)) => {
            slot.busy();
            stream.unread(bytes);
            None
        }
        Ok(Head::LineTooLong) => Some(414),
        Ok(Head::TooLarge) => Some(431),
        Ok(Head::Closed) | Err(_) => return,
    };
    if let Some(status) = refusal {
        let _ = stream.write_all(crate::io::head::refusal(status)).await;
        return;
    }
    let svc = service_fn(move |req| {
        let ctx = Arc::clone(&ctx);
        async move { Ok::<_, Infallible>(route(req, &ctx).await) }
    });
    let conn = hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(ADMIN_HEAD_TIMEOUT)
        .keep_alive(false)
        .serve_connection(TokioIo::new(stream), svc);
    tokio::pin!(conn);
    tokio::select! {
        _ = conn.as_mut() => return,
        _ = stop.cancelled() => conn.as_mut().graceful_shutdown(),
    }
    let _ = tokio::time::timeout(CLOSE_GRACE, conn).await;
}

/// Answers one admin request (the body is never read).
pub async fn route<B>(req: Request<B>, ctx: &AdminContext) -> Response<ProxyBody> {
    let Some(target) = Target::of(req.uri().path()) else {
        return text_response(StatusCode::NOT_FOUND, "not found\n");
    };
    let allowed = target.method();
    if req.method() != allowed {
        let mut resp = text_response(
            StatusCode::METHOD_NOT_ALLOWED,
            &format!("method not allowed (use {allowed})\n"),
        );
        resp.headers_mut().insert(
            http::header::ALLOW,
            HeaderValue::from_static(if allowed == Method::POST {
                "POST"
            } else {
                "GET"
            }),
        );
        return resp;
    }
    if allowed == Method::POST {
        if let Some(refused) = cross_origin(&req).or_else(|| authorize(&req, ctx)) {
            return refused;
        }
    }
    match target {
        Target::Page => page(ctx),
        Target::Events => events(ctx),
        Target::Metrics => {
            let mut resp = Response::new(full(Bytes::from(ctx.metrics.render())));
            resp.headers_mut().insert(
                http::header::CONTENT_TYPE,
                HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
            );
            resp
        }
        Target::Healthz => text_response(StatusCode::OK, "ok\n"),
        Target::Readyz => {
            if ctx.lifecycle.is_ready() {
                text_response(StatusCode::OK, "ready\n")
            } else {
                text_response(StatusCode::SERVICE_UNAVAILABLE, "not ready\n")
            }
        }
        Target::Pools => json_response(
            StatusCode::OK,
            &crate::status::pools_document(&ctx.routing.load()),
        ),
        Target::Reload => match ctx.reload.reload().await {
            Ok(summary) => json_response(
                StatusCode::OK,
                &serde_json::json!({
                    "result": "success",
                    "changes": summary,
                    "summary": summary.in_words(),
                }),
            ),
            Err(e) => text_response(StatusCode::UNPROCESSABLE_ENTITY, &format!("{e}\n")),
        },
        Target::Backend { pool, id, drain } => drain_or_undrain(ctx, &pool, &id, drain),
    }
}

/// The status page.
fn page(ctx: &AdminContext) -> Response<ProxyBody> {
    let (html, csp) = crate::status::page(ctx.reload.config_path.as_deref());
    let mut resp = Response::new(full(Bytes::from(html)));
    let headers = resp.headers_mut();
    headers.insert(
        http::header::CONTENT_TYPE,
        HeaderValue::from_static("text/html; charset=utf-8"),
    );
    if let Ok(csp) = HeaderValue::from_str(csp) {
        headers.insert(http::header::CONTENT_SECURITY_POLICY, csp);
    }
    headers.insert(
        http::header::CACHE_CONTROL,
        HeaderValue::from_static("no-store"),
    );
    headers.insert(
        http::header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    headers.insert(
        http::header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    resp
}

/// `/admin/events`: the sampler's snapshots as Server-Sent Events; `503`
/// with `Retry-After` when [`ADMIN_MAX_EVENT_STREAMS`] are open already.
fn events(ctx: &AdminContext) -> Response<ProxyBody> {
    let Ok(place) = Arc::clone(&ctx.event_streams.0).try_acquire_owned() else {
        ctx.metrics
            .requests_rejected
            .with_label_values(&["admin", "503"])
            .inc();
        let mut resp = text_response(
            StatusCode::SERVICE_UNAVAILABLE,
            &format!(
                "too many event streams open (at most {ADMIN_MAX_EVENT_STREAMS}), try again later\n"
            ),
        );
        resp.headers_mut().insert(
            http::header::RETRY_AFTER,
            HeaderValue::from_static(EVENT_STREAM_RETRY_AFTER),
        );
        return resp;
    };
    // The place goes with the body: dropped when the stream ends.
    let frames = ctx.status.events().map(move |event| {
        let _held = &place;
        Ok::<_, hyper::Error>(Frame::data(event))
    });
    let mut resp = Response::new(StreamBody::new(frames).boxed_unsync());
    let headers = resp.headers_mut();
    headers.insert(
        http::header::CONTENT_TYPE,
        HeaderValue::from_static("text/event-stream"),
    );
    headers.insert(
        http::header::CACHE_CONTROL,
        HeaderValue::from_static("no-store"),
    );
    resp
}

/// `None` when a POST may proceed; a `403` when a browser sent it from
/// another origin (its `Origin` names another host than the request's
/// `Host`). Without this, any web page could make the operator's browser
/// drain backends through a loopback admin API that has no token. Clients
/// that send no `Origin` (curl, scripts) are not affected.
fn cross_origin<B>(req: &Request<B>) -> Option<Response<ProxyBody>> {
    let origin = req.headers().get(http::header::ORIGIN)?;
    let host = req
        .headers()
        .get(http::header::HOST)
        .and_then(|h| h.to_str().ok());
    let origin_host = origin
        .to_str()
        .ok()
        .and_then(|o| o.split_once("://"))
        .map(|(_, rest)| rest);
    match (origin_host, host) {
        (Some(o), Some(h)) if o.eq_ignore_ascii_case(h) => None,
        _ => Some(text_response(
            StatusCode::FORBIDDEN,
            "cross-origin admin request refused (Origin does not match Host)\n",
        )),
    }
}

/// `None` when the request may mutate; otherwise the 401 to send. POST
/// routes require the bearer token when `[admin] token` is set (`check`
/// refuses a non-loopback admin bind without one).
fn authorize<B>(req: &Request<B>, ctx: &AdminContext) -> Option<Response<ProxyBody>> {
    let runtime = ctx.routing.load();
    let token = runtime.config.admin.as_ref()?.token.as_deref()?;
    let presented = req
        .headers()
        .get(http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim);
    // Constant time in the token's bytes, so timing reveals nothing of it.
    if presented.is_some_and(|p| bool::from(p.as_bytes().ct_eq(token.as_bytes()))) {
        return None;
    }
    let mut resp = text_response(StatusCode::UNAUTHORIZED, "missing or wrong bearer token\n");
    resp.headers_mut().insert(
        http::header::WWW_AUTHENTICATE,
        HeaderValue::from_static("Bearer"),
    );
    Some(resp)
}

fn drain_or_undrain(ctx: &AdminContext, pool: &str, id: &str, drain: bool) -> Response<ProxyBody> {
    let runtime = ctx.routing.load();
    let Some((pool_cfg, backend)) = runtime
        .pools
        .get(pool)
        .and_then(|p| Some((&p.config, p.find(id)?)))
    else {
        return text_response(
            StatusCode::NOT_FOUND,
            &format!("no backend {id:?} in pool {pool:?}\n"),
        );
    };
    let changed = if drain {
        crate::drain::drain_backend(&ctx.lifecycle, backend, pool_cfg.drain_window)
    } else {
        backend.undrain()
    };
    json_response(
        StatusCode::OK,
        &serde_json::json!({
            "pool": pool,
            "backend": id,
            "state": backend.state().as_str(),
            "changed": changed,
            "drained_by": crate::status::drained_by(backend),
            "live_connections": backend.live_connections(),
        }),
    )
}

fn json_response(status: StatusCode, value: &serde_json::Value) -> Response<ProxyBody> {
    let mut resp = Response::new(full(Bytes::from(value.to_string())));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        http::header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    resp
}

#[cfg(test)]
mod tests;
