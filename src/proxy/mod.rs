//! The per-request service: routes each request and hands it to the plain
//! HTTP path (`forward`) or the WebSocket path (`upgrade`).
//!
//! Errors carry the side that caused them (client, backend or berth itself);
//! [`ProxyError::status`] and [`ProxyError::upgrade_result`] are the one place
//! that maps them to a status code and a metric label.

pub mod forward;
pub mod headers;
pub mod tunnel;
pub mod upgrade;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;

use bytes::Bytes;
use http::{HeaderValue, Response, StatusCode};
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::Request;

use crate::app::Shared;
use crate::ws::handshake::{classify, UpgradeKind};

/// Bodies berth sends: a backend's streamed body or a short text of its own.
pub type ProxyBody = UnsyncBoxBody<Bytes, hyper::Error>;

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
}

impl Drop for ConnInfo {
    fn drop(&mut self) {
        self.open_gauge.dec();
    }
}

/// Which party a failure is attributed to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Side {
    Client,
    Backend,
    Internal,
}

#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    #[error("no route matches this host and path")]
    NoRoute,
    #[error("no backend of pool {0:?} is available")]
    NoBackend(String),
    #[error("connecting to backend {backend} failed: {reason}")]
    Connect { backend: String, reason: String },
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
}

impl ProxyError {
    pub fn side(&self) -> Side {
        match self {
            ProxyError::NoRoute => Side::Client,
            ProxyError::NoBackend(_) => Side::Internal,
            _ => Side::Backend,
        }
    }

    pub fn status(&self) -> StatusCode {
        match self {
            ProxyError::NoRoute => StatusCode::NOT_FOUND,
            ProxyError::NoBackend(_) => StatusCode::SERVICE_UNAVAILABLE,
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
            ProxyError::NoBackend(_) => "no_backend",
            ProxyError::Connect { .. } => "backend_connect_error",
            ProxyError::ResponseTimeout(_) => "backend_timeout",
            ProxyError::BadAccept(_) => "backend_bad_accept",
            ProxyError::Backend { .. } | ProxyError::BackendClient { .. } => {
                "backend_connect_error"
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

/// A short plain-text response from berth itself.
pub fn text_response(status: StatusCode, body: &str) -> Response<ProxyBody> {
    let mut resp = Response::new(full(Bytes::from(body.to_string())));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        http::header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    resp
}

/// A complete body as a [`ProxyBody`].
pub fn full(bytes: Bytes) -> ProxyBody {
    Full::new(bytes)
        .map_err(|never: Infallible| match never {})
        .boxed_unsync()
}

/// hyper service entry point: never fails, every error becomes a response.
pub async fn serve(
    req: Request<Incoming>,
    conn: Arc<ConnInfo>,
    shared: Arc<Shared>,
) -> Result<Response<ProxyBody>, Infallible> {
    let resp = match classify(&req) {
        UpgradeKind::WebSocket => upgrade::handle(req, &conn, &shared).await,
        UpgradeKind::Unsupported => {
            shared
                .metrics
                .ws_upgrades
                .with_label_values(&["", "", "not_websocket"])
                .inc();
            text_response(
                StatusCode::BAD_REQUEST,
                "berth proxies only WebSocket upgrades (GET, HTTP/1.1, Upgrade: websocket)\n",
            )
        }
        UpgradeKind::None => forward::handle(req, &conn, &shared).await,
    };
    Ok(resp)
}
