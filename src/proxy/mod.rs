//! The per-request service: routes each request and hands it to the plain
//! HTTP path (`forward`) or the WebSocket path (`upgrade`: an HTTP/1.1
//! upgrade, or an HTTP/2 extended CONNECT; [`ConnInfo::protocol`] says
//! which the connection speaks).
//!
//! [`ProxyContext`] is everything the service may touch. [`serve`] runs
//! inside the listener's connection task (on HTTP/2, in a task per stream);
//! the only task the proxy starts is a `tunnel` per upgraded connection or
//! stream, tracked by the lifecycle's tracker. On HTTP/2 it also counts
//! each request from its start to the end of its response body, for the
//! listener's idle check.
//! [`ProxyError::status`], [`ProxyError::upgrade_result`] and
//! [`ProxyError::public_message`] are the one place that maps errors to a
//! status code, a metric label and the words a client is told: generic
//! ones, never a backend id, an address or an OS error (those go to the log
//! line of the same event, under the request id that the response carries
//! in `X-Request-Id`).

pub mod forward;
pub mod headers;
pub mod request;
pub mod target;
pub mod tunnel;
pub mod upgrade;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use http::{HeaderValue, Response, StatusCode};
use hyper::body::Incoming;
use hyper::Request;
use rand::Rng;

use crate::body::{text_response, ProxyBody};
use crate::lifecycle::Lifecycle;
use crate::metrics::Metrics;
use crate::routing::Routing;
use crate::ws::handshake::{classify, UpgradeKind};

/// What the request service needs, and all it may touch: the routing table,
/// the metrics, and the lifecycle (shutdown, task tracker, relay registry).
/// It knows nothing of listeners, the admin API or reloads.
pub struct ProxyContext {
    pub routing: Arc<Routing>,
    pub metrics: Metrics,
    pub lifecycle: Arc<Lifecycle>,
}

/// The HTTP version a client connection speaks: the `protocol` label of
/// `berth_client_connections_total` and `berth_websocket_opened_total`, and
/// the access log's `protocol`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Protocol {
    Http1,
    Http2,
}

impl Protocol {
    pub fn label(self) -> &'static str {
        match self {
            Protocol::Http1 => "http1",
            Protocol::Http2 => "http2",
        }
    }
}

/// Facts about the client connection a request arrived on. It lives as
/// long as the connection does, upgraded ones included (the relay task holds
/// it), so dropping it is what lowers `berth_connections_active`.
#[derive(Debug)]
pub struct ConnInfo {
    /// The client: the socket's peer, or the source a PROXY header named.
    pub peer: SocketAddr,
    /// The address the client connected to: the socket's own, or the
    /// destination a PROXY header named (what berth's own PROXY header to
    /// a backend carries as the destination).
    pub local: SocketAddr,
    pub listener: Arc<str>,
    pub tls: bool,
    pub protocol: Protocol,
    /// WebSockets relaying on this connection now (one at most on
    /// HTTP/1.1; any number of streams on HTTP/2): shutdown sends an
    /// HTTP/2 connection its `GOAWAY` once they have closed.
    pub websockets: AtomicUsize,
    /// HTTP/2 only: requests in flight (from the request's start to the
    /// end of its response body), and how many have started so far. The
    /// listener closes a connection that has had neither a request nor a
    /// WebSocket for `handshake_timeout`.
    pub requests: AtomicUsize,
    pub started: AtomicU64,
    /// Lowers the listener's open-connections gauge when dropped.
    pub open_gauge: prometheus::IntGauge,
    /// The connection's place under the listener's caps and the descriptor
    /// reserve, given back when dropped (`None` outside a listener).
    pub slot: Option<crate::limits::Slot>,
}

impl Drop for ConnInfo {
    fn drop(&mut self) {
        self.open_gauge.dec();
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    #[error("no route matches this host and path")]
    NoRoute,
    #[error("unusable request target")]
    BadTarget,
    /// The request's host or target breaks HTTP's rules (or cannot be
    /// normalized): refused before routing.
    #[error(transparent)]
    BadRequest(#[from] target::TargetError),
    #[error("no backend of pool {0:?} is available")]
    NoBackend(String),
    #[error("pool {0:?} is over its max_upgrades_per_second")]
    RateLimited(String),
    /// berth itself ran out of a resource (file descriptors, ports,
    /// buffers) opening a backend connection: never the backend's fault.
    #[error("berth could not open a connection to backend {backend}: {source}")]
    LocalResource {
        backend: String,
        #[source]
        source: request::ConnectError,
    },
    #[error("connecting to backend {backend} failed: {source}")]
    Connect {
        backend: String,
        #[source]
        source: request::ConnectError,
    },
    #[error("backend {0} did not answer within response_timeout")]
    ResponseTimeout(String),
    #[error("backend {0} answered 101 with a wrong or missing Sec-WebSocket-Accept")]
    BadAccept(String),
    #[error("backend {backend} failed: {source}")]
    Backend {
        backend: String,
        #[source]
        source: hyper::Error,
    },
    #[error("backend {backend} failed: {source}")]
    BackendClient {
        backend: String,
        #[source]
        source: hyper_util::client::legacy::Error,
    },
    /// The client's request body broke HTTP's framing (a malformed chunk):
    /// the client's fault, not the backend's.
    #[error("malformed request body from the client (backend {backend}): {source}")]
    ClientBody {
        backend: String,
        #[source]
        source: hyper_util::client::legacy::Error,
    },
    /// berth's own failure: the upgraded backend connection was not the
    /// stream berth opened.
    #[error("berth could not take over the connection to backend {0}")]
    Handover(String),
    /// The pool's authentication refused the request (its own answer).
    #[error("{rejection}")]
    Auth {
        pool: String,
        rejection: Box<crate::auth::Rejection>,
    },
}

impl ProxyError {
    pub fn status(&self) -> StatusCode {
        match self {
            ProxyError::NoRoute => StatusCode::NOT_FOUND,
            ProxyError::BadTarget | ProxyError::BadRequest(_) | ProxyError::ClientBody { .. } => {
                StatusCode::BAD_REQUEST
            }
            ProxyError::NoBackend(_)
            | ProxyError::RateLimited(_)
            | ProxyError::LocalResource { .. } => StatusCode::SERVICE_UNAVAILABLE,
            ProxyError::Handover(_) => StatusCode::INTERNAL_SERVER_ERROR,
            ProxyError::ResponseTimeout(_) => StatusCode::GATEWAY_TIMEOUT,
            ProxyError::Connect { .. }
            | ProxyError::BadAccept(_)
            | ProxyError::Backend { .. }
            | ProxyError::BackendClient { .. } => StatusCode::BAD_GATEWAY,
            ProxyError::Auth { rejection, .. } => rejection.status,
        }
    }

    /// The `result` label of `berth_websocket_upgrades_total`.
    pub fn upgrade_result(&self) -> &'static str {
        match self {
            ProxyError::NoRoute => "no_route",
            ProxyError::BadTarget | ProxyError::BadRequest(_) | ProxyError::ClientBody { .. } => {
                "bad_request"
            }
            ProxyError::NoBackend(_) => "no_backend",
            ProxyError::RateLimited(_) => "rate_limited",
            ProxyError::LocalResource { .. } => "local_error",
            ProxyError::Handover(_) => "internal_error",
            ProxyError::Connect { .. } => "backend_connect_error",
            ProxyError::ResponseTimeout(_) => "backend_timeout",
            ProxyError::BadAccept(_) => "backend_bad_accept",
            ProxyError::Backend { .. } | ProxyError::BackendClient { .. } => {
                "backend_connect_error"
            }
            ProxyError::Auth { .. } => "auth_rejected",
        }
    }

    /// The pool of a request refused before any backend was chosen.
    pub fn pool(&self) -> Option<&str> {
        match self {
            ProxyError::Auth { pool, .. } => Some(pool),
            _ => None,
        }
    }

    /// The backend the failure is attributed to (in metrics), if any: not
    /// for failures that are the client's or berth's own.
    pub fn backend(&self) -> Option<&str> {
        match self {
            ProxyError::NoRoute
            | ProxyError::BadTarget
            | ProxyError::BadRequest(_)
            | ProxyError::NoBackend(_)
            | ProxyError::RateLimited(_)
            | ProxyError::LocalResource { .. }
            | ProxyError::ClientBody { .. }
            | ProxyError::Auth { .. } => None,
            ProxyError::Connect { backend, .. }
            | ProxyError::Backend { backend, .. }
            | ProxyError::BackendClient { backend, .. } => Some(backend),
            ProxyError::ResponseTimeout(b) | ProxyError::BadAccept(b) | ProxyError::Handover(b) => {
                Some(b)
            }
        }
    }

    /// What the client is told: what happened, in generic words. The
    /// details (which backend, which OS error) are for the log only. An
    /// authentication refusal has its own answer ([`ProxyError::response`]).
    pub fn public_message(&self) -> &'static str {
        match self {
            ProxyError::NoRoute => "no route matches this host and path",
            ProxyError::BadTarget => "bad request target",
            ProxyError::BadRequest(e) => e.as_str(),
            ProxyError::NoBackend(_) => "no backend available",
            ProxyError::RateLimited(_) => "too many new connections, try again later",
            ProxyError::LocalResource { .. } => "service temporarily unavailable",
            ProxyError::Connect { .. } => "could not connect to a backend",
            ProxyError::ResponseTimeout(_) => "backend timed out",
            ProxyError::BadAccept(_) => "backend sent an invalid handshake response",
            ProxyError::Backend { .. } | ProxyError::BackendClient { .. } => "backend failed",
            ProxyError::ClientBody { .. } => "malformed request body",
            ProxyError::Handover(_) => "internal error",
            ProxyError::Auth { .. } => "authentication refused the request",
        }
    }

    /// The response the client gets; every `503` of berth's own carries a
    /// `Retry-After` drawn from 1 s to `retry_after_max`. An authentication
    /// refusal is berth's generic 401/503 or the auth service's answer as
    /// it was (a 503 of the service's own is passed on unchanged, as a
    /// backend's is).
    pub fn response(&self, retry_after_max: Duration) -> Response<ProxyBody> {
        if let ProxyError::Auth { rejection, .. } = self {
            let mut resp = rejection.response();
            headers::strip_hop_by_hop(resp.headers_mut());
            if rejection.own && rejection.status == StatusCode::SERVICE_UNAVAILABLE {
                resp.headers_mut()
                    .insert(http::header::RETRY_AFTER, retry_after(retry_after_max));
            }
            return resp;
        }
        let mut resp = text_response(self.status(), &format!("{}\n", self.public_message()));
        if self.status() == StatusCode::SERVICE_UNAVAILABLE {
            resp.headers_mut()
                .insert(http::header::RETRY_AFTER, retry_after(retry_after_max));
        }
        resp
    }
}

/// A `Retry-After` in whole seconds, uniform from 1 to `max` (at least 1),
/// so that clients sent away together do not come back together.
pub fn retry_after(max: Duration) -> HeaderValue {
    let secs = rand::thread_rng().gen_range(1..=max.as_secs().max(1));
    HeaderValue::from(secs)
}

/// The `retry_after_max` for an error answered before a pool is known
/// (none of those is a 503 today; every 503 uses its pool's).
pub const DEFAULT_RETRY_AFTER_MAX: Duration = Duration::from_secs(5);

/// The `X-Request-Id` header.
pub const X_REQUEST_ID: http::HeaderName = http::HeaderName::from_static("x-request-id");

/// The id of one request, for the client's response, the backend's request
/// and berth's log: the client's own `X-Request-Id` when it sent exactly
/// one sane value (1 to 128 characters from letters, digits and
/// `-_.:+/=@`), else 32 random hex digits.
pub fn request_id(headers: &http::HeaderMap) -> HeaderValue {
    let mut sent = headers.get_all(&X_REQUEST_ID).iter();
    if let (Some(value), None) = (sent.next(), sent.next()) {
        let sane = (1..=128).contains(&value.len())
            && value
                .as_bytes()
                .iter()
                .all(|b| b.is_ascii_alphanumeric() || b"-_.:+/=@".contains(b));
        if sane {
            return value.clone();
        }
    }
    let id: u128 = rand::random();
    // Hex digits are always a valid header value.
    HeaderValue::try_from(format!("{id:032x}")).unwrap_or(HeaderValue::from_static("-"))
}

/// Counts a request berth answered itself before routing.
pub fn count_rejected(ctx: &ProxyContext, conn: &ConnInfo, status: StatusCode) {
    ctx.metrics
        .requests_rejected
        .with_label_values(&[&conn.listener, status.as_str()])
        .inc();
}

/// hyper service entry point: never fails, every error becomes a response.
pub async fn serve(
    req: Request<Incoming>,
    conn: Arc<ConnInfo>,
    ctx: Arc<ProxyContext>,
) -> Result<Response<ProxyBody>, Infallible> {
    let id = request_id(req.headers());
    let in_flight = (conn.protocol == Protocol::Http2).then(|| InFlight::start(&conn));
    let mut resp = match classify(&req) {
        UpgradeKind::WebSocket => upgrade::handle(req, &conn, &ctx, &id).await,
        UpgradeKind::Unsupported => {
            ctx.metrics
                .ws_upgrades
                .with_label_values(&["", "", "not_websocket"])
                .inc();
            count_rejected(&ctx, &conn, StatusCode::BAD_REQUEST);
            text_response(
                StatusCode::BAD_REQUEST,
                match conn.protocol {
                    Protocol::Http1 => {
                        "berth proxies only WebSocket upgrades (GET, HTTP/1.1, Upgrade: websocket)\n"
                    }
                    Protocol::Http2 => {
                        "berth proxies only WebSocket tunnels over HTTP/2 (CONNECT with :protocol websocket)\n"
                    }
                },
            )
        }
        UpgradeKind::None => forward::handle(req, &conn, &ctx, &id).await,
    };
    // A backend's own X-Request-Id is left alone.
    resp.headers_mut().entry(X_REQUEST_ID).or_insert(id);
    Ok(match in_flight {
        None => resp,
        Some(in_flight) => resp.map(|body| {
            http_body_util::BodyExt::boxed_unsync(Counted {
                body,
                _in_flight: in_flight,
            })
        }),
    })
}

/// A request in flight on an HTTP/2 connection, from its start until its
/// response body ends or is dropped (a reset stream included).
struct InFlight(Arc<ConnInfo>);

impl InFlight {
    fn start(conn: &Arc<ConnInfo>) -> InFlight {
        conn.requests.fetch_add(1, Ordering::Relaxed);
        conn.started.fetch_add(1, Ordering::Relaxed);
        InFlight(Arc::clone(conn))
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.requests.fetch_sub(1, Ordering::Relaxed);
    }
}

/// A response body that keeps its request counted while it lasts.
struct Counted {
    body: ProxyBody,
    _in_flight: InFlight,
}

impl hyper::body::Body for Counted {
    type Data = bytes::Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<hyper::body::Frame<Self::Data>, Self::Error>>> {
        Pin::new(&mut self.body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        self.body.size_hint()
    }
}

/// Contexts built from a config text, for the unit tests of this layer
/// and the ones above it.
#[cfg(test)]
pub(crate) mod testing {
    use std::sync::Arc;

    use super::{ConnInfo, ProxyContext};
    use crate::config::Config;
    use crate::lifecycle::Lifecycle;
    use crate::metrics::Metrics;
    use crate::routing::{Routing, Runtime};

    /// The validated config of `toml` (panics with the problems if invalid).
    pub fn config(toml: &str) -> Config {
        Config::from_toml_str(toml, "test config").unwrap_or_else(|e| panic!("{e}"))
    }

    /// A proxy context serving `toml`, with fresh metrics and lifecycle.
    pub fn context(toml: &str) -> Arc<ProxyContext> {
        let metrics = Metrics::new().unwrap();
        let runtime = Runtime::new(Arc::new(config(toml)), &metrics, None);
        Arc::new(ProxyContext {
            routing: Arc::new(Routing::new(runtime)),
            metrics,
            lifecycle: Arc::new(Lifecycle::new()),
        })
    }

    /// A client connection from 127.0.0.1 on listener `test`.
    pub fn conn(ctx: &ProxyContext, tls: bool) -> ConnInfo {
        let open_gauge = ctx.metrics.connections_active.with_label_values(&["test"]);
        open_gauge.inc();
        ConnInfo {
            peer: "127.0.0.1:40000".parse().unwrap(),
            local: "127.0.0.1:8080".parse().unwrap(),
            listener: Arc::from("test"),
            tls,
            protocol: super::Protocol::Http1,
            websockets: Default::default(),
            requests: Default::default(),
            started: Default::default(),
            open_gauge,
            slot: None,
        }
    }
}
