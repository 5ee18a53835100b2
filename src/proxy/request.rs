//! The request path `forward` (plain HTTP, SSE) and `upgrade` (WebSocket)
//! share, in two steps:
//! - [`Prepared::new`]: route the request, and make the headers the backend
//!   sees (hop-by-hop headers and berth's affinity cookie removed,
//!   `X-Forwarded-*` added);
//! - [`choose_and_connect`]: choose a backend (affinity first), run the
//!   path's attempt on it, and when that could not connect, count it
//!   against the backend (passive health) and try once more elsewhere;
//!   on success, count `berth_affinity_total`. [`append_set_cookie`] adds
//!   the affinity cookie to the response the client gets.
//!
//! It starts no tasks.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use http::request::Parts;
use http::{HeaderMap, HeaderValue};
use tokio::net::TcpStream;

use super::headers::{add_forwarded, host_without_port, request_host, strip_hop_by_hop};
use super::{ConnInfo, ProxyError};
use crate::balancer::{Backend, Choice, Pool, RequestFacts};
use crate::metrics::Metrics;
use crate::routing::Routing;

/// Why a backend could not be connected to.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error(transparent)]
    Io(#[from] std::io::Error),
    #[error("no connection within {}", humantime::format_duration(*.0))]
    Timeout(Duration),
    /// The pooled HTTP client's connect failed.
    #[error(transparent)]
    Client(hyper_util::client::legacy::Error),
    #[error("address does not form a valid URI")]
    BadAddress(#[source] http::uri::InvalidUri),
}

/// A routed request and what the backend is to receive.
pub struct Prepared {
    pub pool: Arc<Pool>,
    /// The client's headers as the backend gets them.
    pub headers: HeaderMap,
    /// The request target in origin form (`/path?query`).
    pub path_and_query: String,
}

impl Prepared {
    /// Routes the request by host and path and rewrites its headers.
    /// `parts` is left as the client sent it (affinity reads it).
    pub fn new(routing: &Routing, conn: &ConnInfo, parts: &Parts) -> Result<Prepared, ProxyError> {
        let host = request_host(&parts.headers, &parts.uri);
        let pool = routing
            .load()
            .route(
                host.as_deref().map(host_without_port).as_deref(),
                parts.uri.path(),
            )
            .cloned()
            .ok_or(ProxyError::NoRoute)?;
        let mut headers = parts.headers.clone();
        strip_hop_by_hop(&mut headers);
        // berth's own affinity cookie is not the application's business.
        if let Some(name) = pool.sticky.cookie_name() {
            crate::affinity::strip_cookie(&mut headers, name);
        }
        add_forwarded(&mut headers, conn.peer.ip(), conn.tls, host.as_deref());
        let path_and_query = parts
            .uri
            .path_and_query()
            .map_or("/", |pq| pq.as_str())
            .to_string();
        Ok(Prepared {
            pool,
            headers,
            path_and_query,
        })
    }
}

/// What the balancer may read of a request: as the client sent it.
pub fn facts<'a>(parts: &'a Parts, conn: &ConnInfo) -> RequestFacts<'a> {
    RequestFacts {
        headers: &parts.headers,
        uri: &parts.uri,
        peer: conn.peer.ip(),
        tls: conn.tls,
    }
}

/// How one attempt on a chosen backend failed.
#[derive(Debug)]
pub enum AttemptError {
    /// Not connected: counts against the backend, and the request may go
    /// to another one.
    Connect(ConnectError),
    /// Failed after connecting: the request ends with this error.
    Failed(ProxyError),
}

/// Chooses a backend and runs `attempt` on it; when it could not connect,
/// observes the failure (passive health) and chooses again, never the same
/// backend, up to `attempts` times. On success, counts the affinity result
/// and returns the choice (its `set_cookie` is for the response).
pub async fn choose_and_connect<T, F, Fut>(
    metrics: &Metrics,
    pool: &Pool,
    facts: &RequestFacts<'_>,
    attempts: usize,
    mut attempt: F,
) -> Result<(Choice, T), ProxyError>
where
    F: FnMut(&Arc<Backend>) -> Fut,
    Fut: Future<Output = Result<T, AttemptError>>,
{
    let mut tried: Vec<Arc<Backend>> = Vec::new();
    let mut last = ProxyError::NoBackend(pool.config.name.clone());
    for _ in 0..attempts {
        let Some(choice) = pool.choose(facts, &tried) else {
            break;
        };
        let backend = Arc::clone(&choice.backend);
        match attempt(&backend).await {
            Ok(value) => {
                if let Some(result) = choice.result {
                    let labels = [
                        pool.config.name.as_str(),
                        pool.config.affinity.mode(),
                        result,
                    ];
                    metrics.affinity.with_label_values(&labels).inc();
                }
                return Ok((choice, value));
            }
            Err(AttemptError::Connect(source)) => {
                tracing::debug!(backend = %backend.id, error = %source, "backend connect failed");
                pool.observe(&backend, false, &format!("connect failed: {source}"));
                last = ProxyError::Connect {
                    backend: backend.id.clone(),
                    source,
                };
                tried.push(backend);
            }
            Err(AttemptError::Failed(err)) => return Err(err),
        }
    }
    Err(last)
}

/// Adds the affinity cookie of `choice`, if any, to the client's response.
pub fn append_set_cookie(choice: &Choice, headers: &mut HeaderMap) {
    if let Some(cookie) = choice
        .set_cookie
        .as_deref()
        .and_then(|c| HeaderValue::from_str(c).ok())
    {
        headers.append(http::header::SET_COOKIE, cookie);
    }
}

/// A TCP connection to `address` (hostnames resolved now), with Nagle off.
pub async fn connect(address: &str, timeout: Duration) -> Result<TcpStream, ConnectError> {
    match tokio::time::timeout(timeout, TcpStream::connect(address)).await {
        Ok(Ok(stream)) => {
            let _ = stream.set_nodelay(true);
            Ok(stream)
        }
        Ok(Err(e)) => Err(ConnectError::Io(e)),
        Err(_) => Err(ConnectError::Timeout(timeout)),
    }
}
