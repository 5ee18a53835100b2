//! The per-request service: routes each request and hands it to the plain
//! HTTP path (`forward`) or the WebSocket path (`upgrade`).
//!
//! [`ProxyContext`] is everything the service may touch. [`serve`] runs
//! inside the listener's connection task; the only task the proxy starts
//! is a `tunnel` per upgraded connection, tracked by the lifecycle's tracker.
//! [`ProxyError::status`] and [`ProxyError::upgrade_result`] are the one
//! place that maps errors to a status code and a metric label.

pub mod forward;
pub mod headers;
pub mod request;
pub mod tunnel;
pub mod upgrade;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;

use http::{HeaderValue, Response, StatusCode};
use hyper::body::Incoming;
use hyper::Request;

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

/// Facts about the client connection a request arrived on. It lives as
/// long as the connection does, upgraded ones included (the relay task holds
/// it), so dropping it is what lowers `berth_connections_active`.
#[derive(Debug)]
pub struct ConnInfo {
    pub peer: SocketAddr,
    pub listener: Arc<str>,
    pub tls: bool,
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
    #[error("no backend of pool {0:?} is available")]
    NoBackend(String),
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
    /// berth's own failure: the upgraded backend connection was not the
    /// stream berth opened.
    #[error("berth could not take over the connection to backend {0}")]
    Handover(String),
}

impl ProxyError {
    pub fn status(&self) -> StatusCode {
        match self {
            ProxyError::NoRoute => StatusCode::NOT_FOUND,
            ProxyError::BadTarget => StatusCode::BAD_REQUEST,
            ProxyError::NoBackend(_) => StatusCode::SERVICE_UNAVAILABLE,
            ProxyError::Handover(_) => StatusCode::INTERNAL_SERVER_ERROR,
            ProxyError::ResponseTimeout(_) => StatusCode::GATEWAY_TIMEOUT,
            ProxyError::Connect { .. }
            | ProxyError::BadAccept(_)
            | ProxyError::Backend { .. }
            | ProxyError::BackendClient { .. } => StatusCode::BAD_GATEWAY,
        }
    }

    /// The `result` label of `berth_websocket_upgrades_total`.
    pub fn upgrade_result(&self) -> &'static str {
        match self {
            ProxyError::NoRoute => "no_route",
            ProxyError::BadTarget => "bad_request",
            ProxyError::NoBackend(_) => "no_backend",
            ProxyError::Handover(_) => "internal_error",
            ProxyError::Connect { .. } => "backend_connect_error",
            ProxyError::ResponseTimeout(_) => "backend_timeout",
            ProxyError::BadAccept(_) => "backend_bad_accept",
            ProxyError::Backend { .. } | ProxyError::BackendClient { .. } => {
                "backend_connect_error"
            }
        }
    }

    /// The backend the failure is attributed to, if one was chosen.
    pub fn backend(&self) -> Option<&str> {
        match self {
            ProxyError::NoRoute | ProxyError::BadTarget | ProxyError::NoBackend(_) => None,
            ProxyError::Connect { backend, .. }
            | ProxyError::Backend { backend, .. }
            | ProxyError::BackendClient { backend, .. } => Some(backend),
            ProxyError::ResponseTimeout(b) | ProxyError::BadAccept(b) | ProxyError::Handover(b) => {
                Some(b)
            }
        }
    }

    /// The response the client gets.
    pub fn response(&self) -> Response<ProxyBody> {
        let mut resp = text_response(self.status(), &format!("{self}\n"));
        if let ProxyError::NoBackend(_) = self {
            resp.headers_mut()
                .insert(http::header::RETRY_AFTER, HeaderValue::from_static("5"));
        }
        resp
    }
}

/// hyper service entry point: never fails, every error becomes a response.
pub async fn serve(
    req: Request<Incoming>,
    conn: Arc<ConnInfo>,
    ctx: Arc<ProxyContext>,
) -> Result<Response<ProxyBody>, Infallible> {
    let resp = match classify(&req) {
        UpgradeKind::WebSocket => upgrade::handle(req, &conn, &ctx).await,
        UpgradeKind::Unsupported => {
            ctx.metrics
                .ws_upgrades
                .with_label_values(&["", "", "not_websocket"])
                .inc();
            text_response(
                StatusCode::BAD_REQUEST,
                "berth proxies only WebSocket upgrades (GET, HTTP/1.1, Upgrade: websocket)\n",
            )
        }
        UpgradeKind::None => forward::handle(req, &conn, &ctx).await,
    };
    Ok(resp)
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
            listener: Arc::from("test"),
            tls,
            open_gauge,
            slot: None,
        }
    }
}
