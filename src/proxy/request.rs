//! The request path `forward` (plain HTTP, SSE) and `upgrade` (WebSocket)
//! share, in two steps:
//! - [`Prepared::new`]: normalize the host and target (`target`), route on
//!   them, and make the request the backend sees: the same normalized
//!   target and host, hop-by-hop headers and berth's affinity cookie
//!   removed, `X-Forwarded-*` added; then [`Prepared::authenticate`]: for
//!   a pool with `[pools.NAME.auth]`, authenticate it (`crate::auth`)
//!   before any backend is chosen, and set the headers auth passes on
//!   (the callers run it right after routing, before any rate limit);
//! - [`choose_and_connect`]: choose a backend (affinity first), run the
//!   path's attempt on it, and when that could not connect, count it
//!   against the backend (passive health) and try once more elsewhere;
//!   on success, count `berth_affinity_total`. A connect that failed for
//!   want of a local resource (file descriptors, ports, buffers) is
//!   berth's own trouble: it is not held against the backend, and the
//!   request ends with `503` at once. [`append_set_cookie`] adds the
//!   affinity cookie to the response the client gets.
//!
//! It starts no tasks.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use http::header::HOST;
use http::request::Parts;
use http::{HeaderMap, HeaderValue};
use tokio::net::TcpStream;

use super::headers::{add_forwarded, strip_hop_by_hop};
use super::{target, ConnInfo, ProxyError, X_REQUEST_ID};
use crate::auth::{AuthRequest, Verified};
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
    /// The pooled HTTP client's connect failed (shown with its causes:
    /// the client's own message names only the stage).
    #[error("{}", causes(.0))]
    Client(hyper_util::client::legacy::Error),
    #[error("address does not form a valid URI")]
    BadAddress(#[source] http::uri::InvalidUri),
}

impl ConnectError {
    /// The connect failed for want of something of berth's own: file
    /// descriptors (`EMFILE`, `ENFILE`), buffers or memory (`ENOBUFS`,
    /// `ENOMEM`) or local ports (`EADDRNOTAVAIL`). Not the backend's fault.
    pub fn is_local(&self) -> bool {
        match self {
            ConnectError::Io(e) => is_local_io(e),
            ConnectError::Client(e) => caused_locally(e),
            ConnectError::Timeout(_) | ConnectError::BadAddress(_) => false,
        }
    }
}

/// An error and its causes, each said once: `client error (Connect): tcp
/// connect error: Connection refused (os error 111)`.
fn causes(e: &(dyn std::error::Error + 'static)) -> String {
    let mut text = e.to_string();
    let mut cause = e.source();
    while let Some(err) = cause {
        let part = err.to_string();
        if !text.contains(&part) {
            text.push_str(": ");
            text.push_str(&part);
        }
        cause = err.source();
    }
    text
}

fn is_local_io(e: &std::io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM | libc::EADDRNOTAVAIL)
    )
}

/// Whether any cause in `e`'s chain is a local resource error.
fn caused_locally(e: &(dyn std::error::Error + 'static)) -> bool {
    let mut cause: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(err) = cause {
        if err
            .downcast_ref::<std::io::Error>()
            .is_some_and(is_local_io)
        {
            return true;
        }
        cause = err.source();
    }
    false
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
    /// Routes the request by its normalized host and path and rewrites its
    /// headers; a host or target that breaks HTTP's rules is a
    /// [`ProxyError::BadRequest`]. `parts` is left as the client sent it
    /// (affinity reads it).
    pub fn new(routing: &Routing, conn: &ConnInfo, parts: &Parts) -> Result<Prepared, ProxyError> {
        let target = target::resolve(parts)?;
        let pool = routing
            .load()
            .route(target.route_host.as_deref(), &target.path)
            .cloned()
            .ok_or(ProxyError::NoRoute)?;
        let mut headers = parts.headers.clone();
        strip_hop_by_hop(&mut headers);
        // berth's own affinity cookie is not the application's business.
        if let Some(name) = pool.sticky.cookie_name() {
            crate::affinity::strip_cookie(&mut headers, name);
        }
        join_cookies(&mut headers);
        // The backend sees the host berth routed on.
        match &target.host {
            Some(host) => {
                headers.insert(HOST, host.clone());
            }
            None => {
                headers.remove(HOST);
            }
        }
        let host = target.host.as_ref().and_then(|h| h.to_str().ok());
        add_forwarded(&mut headers, conn.peer.ip(), conn.tls, host);
        Ok(Prepared {
            pool,
            headers,
            path_and_query: target.path_and_query,
        })
    }

    /// The pool's authentication, after routing: a refused request is an
    /// error before any backend is touched. Whatever the outcome, the
    /// client's copies of the headers auth sets are gone and a query token
    /// is out of `parts.uri` and the target; a request that passed carries
    /// its [`Verified`] in `parts.extensions` (for affinity and the relay)
    /// and the headers auth sets. A forward-auth service is sent
    /// `request_id` as `X-Request-Id`, so its log joins berth's and the
    /// backend's.
    pub async fn authenticate(
        mut self,
        parts: &mut Parts,
        request_id: &HeaderValue,
    ) -> Result<Prepared, ProxyError> {
        let Some(auth) = self.pool.auth.clone() else {
            return Ok(self);
        };
        auth.strip_headers(&mut self.headers);
        self.headers.insert(X_REQUEST_ID, request_id.clone());
        // The token leaves both the normalized target the backend gets and
        // the request as the client sent it (what affinity reads).
        if let Some(target) = auth.strip_query(&self.path_and_query) {
            self.path_and_query = target;
        }
        let sent = parts.uri.path_and_query().map_or("/", |pq| pq.as_str());
        let sent_uri = match auth.strip_query(sent) {
            Some(target) => {
                let stripped = with_target(&parts.uri, &target)?;
                Some(std::mem::replace(&mut parts.uri, stripped))
            }
            None => None,
        };
        let req = AuthRequest {
            method: &parts.method,
            headers: &parts.headers,
            uri: sent_uri.as_ref().unwrap_or(&parts.uri),
            forwarded: &self.headers,
            target: &self.path_and_query,
        };
        let verified = auth
            .check(&req)
            .await
            .map_err(|rejection| ProxyError::Auth {
                pool: self.pool.config.name.clone(),
                rejection: Box::new(rejection),
            })?;
        for (name, value) in &verified.headers {
            self.headers.append(name.clone(), value.clone());
        }
        parts.extensions.insert(verified);
        Ok(self)
    }
}

/// Makes several `Cookie` fields one, joined with `"; "`: HTTP/2 clients
/// may send each cookie in a field of its own (RFC 9113 §8.2.3), which an
/// HTTP/1.1 backend (or auth service) must get as one header (RFC 6265
/// §5.4). One field, or none, is left as it is.
pub fn join_cookies(headers: &mut HeaderMap) {
    let mut fields = headers.get_all(http::header::COOKIE).iter();
    if fields.next().is_none() || fields.next().is_none() {
        return;
    }
    let mut joined: Vec<u8> = Vec::new();
    for value in headers.get_all(http::header::COOKIE) {
        if !joined.is_empty() {
            joined.extend_from_slice(b"; ");
        }
        joined.extend_from_slice(value.as_bytes());
    }
    // Valid field values joined by "; " are a valid field value.
    if let Ok(value) = HeaderValue::from_bytes(&joined) {
        headers.insert(http::header::COOKIE, value);
    }
}

/// `uri` with its path and query replaced by `target`.
fn with_target(uri: &http::Uri, target: &str) -> Result<http::Uri, ProxyError> {
    let mut parts = uri.clone().into_parts();
    parts.path_and_query = Some(target.parse().map_err(|_| ProxyError::BadTarget)?);
    http::Uri::from_parts(parts).map_err(|_| ProxyError::BadTarget)
}

/// What the balancer may read of a request: as the client sent it, and
/// the verified claim hash affinity may key on.
pub fn facts<'a>(parts: &'a Parts, conn: &ConnInfo) -> RequestFacts<'a> {
    RequestFacts {
        headers: &parts.headers,
        uri: &parts.uri,
        peer: conn.peer.ip(),
        tls: conn.tls,
        claim: parts
            .extensions
            .get::<Verified>()
            .and_then(|v| v.affinity_key.as_deref()),
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
            Err(AttemptError::Connect(source)) if source.is_local() => {
                // Another backend would fail the same way, and this one did
                // nothing wrong.
                return Err(ProxyError::LocalResource {
                    backend: backend.id.clone(),
                    source,
                });
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

#[cfg(test)]
mod tests {
    use std::net::SocketAddr;

    use http::Request;

    use super::super::testing;
    use super::*;
    use crate::balancer::BackendState;

    /// A cookie-affinity pool `chat` on host chat.example.com, where one
    /// failed connect takes a backend down.
    fn chat(backends: &[SocketAddr]) -> String {
        let mut toml = String::from(
            r#"
[[listeners]]
name = "public"
bind = "127.0.0.1:0"

[[routes]]
host = "chat.example.com"
pool = "chat"

[pools.chat]
balance = "round_robin"
affinity = "cookie"
connect_timeout = "1s"

[pools.chat.cookie]
name = "sticky"
secret = "0123456789abcdef0123456789abcdef"

[pools.chat.health]
fall = 1
"#,
        );
        for (i, addr) in backends.iter().enumerate() {
            toml.push_str(&format!(
                "\n[[pools.chat.backends]]\nid = \"b{}\"\naddress = \"{addr}\"\n",
                i + 1
            ));
        }
        toml
    }

    /// An address nothing listens on (bound, then released).
    fn refusing() -> SocketAddr {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap()
    }

    fn parts(host: &str) -> Parts {
        Request::builder()
            .uri("/ws/room?x=1")
            .header("host", host)
            .header("connection", "keep-alive, x-secret")
            .header("x-secret", "1")
            .header("keep-alive", "timeout=5")
            .header("te", "trailers")
            .header("cookie", "app=1; sticky=abc; theme=dark")
            .header("x-forwarded-for", "203.0.113.9")
            .header("x-app", "kept")
            .body(())
            .unwrap()
            .into_parts()
            .0
    }

    #[test]
    fn prepared_headers_are_what_the_backend_should_see() {
        let ctx = testing::context(&chat(&[refusing()]));
        let conn = testing::conn(&ctx, true);
        let parts = parts("Chat.Example.com:8443");
        let prepared = Prepared::new(&ctx.routing, &conn, &parts).unwrap();
        assert_eq!(prepared.pool.config.name, "chat");
        assert_eq!(prepared.path_and_query, "/ws/room?x=1");
        let h = &prepared.headers;
        for gone in ["connection", "x-secret", "keep-alive", "te"] {
            assert!(!h.contains_key(gone), "{gone} was forwarded");
        }
        assert_eq!(h["cookie"], "app=1; theme=dark");
        assert_eq!(h["x-forwarded-for"], "203.0.113.9, 127.0.0.1");
        assert_eq!(h["x-forwarded-proto"], "https");
        assert_eq!(h["x-forwarded-host"], "Chat.Example.com:8443");
        assert_eq!(h["host"], "Chat.Example.com:8443");
        assert_eq!(h["x-app"], "kept");
        // The client's request stays as sent: affinity reads its cookie.
        assert_eq!(parts.headers["cookie"], "app=1; sticky=abc; theme=dark");
        assert_eq!(
            facts(&parts, &conn).headers["cookie"],
            parts.headers["cookie"]
        );
    }

    #[test]
    fn split_cookie_fields_reach_the_backend_as_one() {
        let ctx = testing::context(&chat(&[refusing()]));
        let conn = testing::conn(&ctx, true);
        let mut parts = parts("chat.example.com");
        parts.headers.remove("cookie");
        for field in ["app=1", "sticky=abc", "theme=dark"] {
            parts
                .headers
                .append("cookie", HeaderValue::from_static(field));
        }
        let prepared = Prepared::new(&ctx.routing, &conn, &parts).unwrap();
        let sent: Vec<_> = prepared.headers.get_all("cookie").iter().collect();
        assert_eq!(sent, ["app=1; theme=dark"]);
        let mut one = HeaderMap::new();
        one.insert("cookie", HeaderValue::from_static("a=1;b=2"));
        join_cookies(&mut one);
        assert_eq!(one["cookie"], "a=1;b=2");
        let mut none = HeaderMap::new();
        join_cookies(&mut none);
        assert!(none.is_empty());
    }

    #[test]
    fn an_unrouted_host_is_404() {
        let ctx = testing::context(&chat(&[refusing()]));
        let conn = testing::conn(&ctx, false);
        let err = Prepared::new(&ctx.routing, &conn, &parts("other.example"))
            .err()
            .unwrap();
        assert!(matches!(err, ProxyError::NoRoute));
        assert_eq!(err.status(), http::StatusCode::NOT_FOUND);
    }

    /// Runs the WebSocket path's attempt (a TCP connect) through the step.
    async fn connect_step(
        ctx: &super::super::ProxyContext,
        attempts: usize,
    ) -> (Arc<Pool>, Result<(Choice, TcpStream), ProxyError>) {
        let pool = Arc::clone(&ctx.routing.load().pools["chat"]);
        let conn = testing::conn(ctx, false);
        let parts = parts("chat.example.com");
        let result =
            choose_and_connect(&ctx.metrics, &pool, &facts(&parts, &conn), attempts, |b| {
                let b = Arc::clone(b);
                async move {
                    connect(&b.address, Duration::from_secs(1))
                        .await
                        .map_err(AttemptError::Connect)
                }
            })
            .await;
        (pool, result)
    }

    fn affinity_count(ctx: &super::super::ProxyContext, result: &str) -> u64 {
        ctx.metrics
            .affinity
            .with_label_values(&["chat", "cookie", result])
            .get()
    }

    #[tokio::test]
    async fn a_refused_connect_moves_to_another_backend() {
        let live = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let ctx = testing::context(&chat(&[refusing(), live.local_addr().unwrap()]));
        let (pool, result) = connect_step(&ctx, 2).await;
        let (choice, stream) = result.unwrap();
        // Round robin offers b1 first; it refused, so b2 took the request.
        assert_eq!(choice.backend.id, "b2");
        let (accepted, _) = live.accept().await.unwrap();
        assert_eq!(accepted.peer_addr().unwrap(), stream.local_addr().unwrap());
        // The refusal counted against b1 (fall = 1 takes it down) ...
        assert_eq!(pool.find("b1").unwrap().state(), BackendState::Down);
        assert_eq!(pool.find("b2").unwrap().state(), BackendState::Up);
        // ... and the one successful choice was counted (the request's
        // cookie is not berth's signature), with a cookie for b2.
        assert_eq!(affinity_count(&ctx, "invalid"), 1);
        assert!(choice.set_cookie.as_deref().unwrap().starts_with("sticky="));
        let mut headers = HeaderMap::new();
        append_set_cookie(&choice, &mut headers);
        assert_eq!(headers.get_all("set-cookie").iter().count(), 1);
    }

    #[tokio::test]
    async fn two_refusals_are_a_502_naming_the_last_backend() {
        let ctx = testing::context(&chat(&[refusing(), refusing()]));
        let (pool, result) = connect_step(&ctx, 2).await;
        let err = result.err().unwrap();
        assert!(matches!(
            &err,
            ProxyError::Connect { backend, source: ConnectError::Io(_) } if backend == "b2"
        ));
        assert_eq!(err.status(), http::StatusCode::BAD_GATEWAY);
        assert_eq!(err.upgrade_result(), "backend_connect_error");
        assert_eq!(err.backend(), Some("b2"));
        assert!(pool
            .backends
            .iter()
            .all(|b| b.state() == BackendState::Down));
        assert_eq!(affinity_count(&ctx, "new"), 0);
    }

    #[tokio::test]
    async fn one_attempt_means_no_retry() {
        let live = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let ctx = testing::context(&chat(&[refusing(), live.local_addr().unwrap()]));
        let (pool, result) = connect_step(&ctx, 1).await;
        assert_eq!(result.err().unwrap().backend(), Some("b1"));
        assert_eq!(pool.find("b2").unwrap().state(), BackendState::Up);
    }

    #[tokio::test]
    async fn a_failure_after_connecting_is_neither_retried_nor_held_against_the_backend() {
        let live = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = live.local_addr().unwrap();
        let ctx = testing::context(&chat(&[addr, addr]));
        let pool = Arc::clone(&ctx.routing.load().pools["chat"]);
        let conn = testing::conn(&ctx, false);
        let parts = parts("chat.example.com");
        let mut calls = 0;
        let result: Result<(Choice, ()), _> =
            choose_and_connect(&ctx.metrics, &pool, &facts(&parts, &conn), 2, |b| {
                calls += 1;
                let id = b.id.clone();
                async move { Err(AttemptError::Failed(ProxyError::ResponseTimeout(id))) }
            })
            .await;
        assert_eq!(calls, 1);
        assert!(matches!(result, Err(ProxyError::ResponseTimeout(id)) if id == "b1"));
        assert_eq!(pool.find("b1").unwrap().state(), BackendState::Up);
        assert_eq!(affinity_count(&ctx, "invalid"), 0);
    }

    /// An error that wraps another, as hyper-util's client errors wrap the
    /// connector's, which wrap the socket's.
    #[derive(Debug)]
    struct Wrapped(Box<dyn std::error::Error + Send + Sync>);

    impl std::fmt::Display for Wrapped {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("client error (Connect)")
        }
    }

    impl std::error::Error for Wrapped {
        fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
            Some(&*self.0)
        }
    }

    #[test]
    fn local_resource_errors_are_berths_own() {
        let io = |code| ConnectError::Io(std::io::Error::from_raw_os_error(code));
        for code in [
            libc::EMFILE,
            libc::ENFILE,
            libc::ENOBUFS,
            libc::ENOMEM,
            libc::EADDRNOTAVAIL,
        ] {
            assert!(io(code).is_local(), "errno {code}");
            // Also when the socket's error is deep in a client error's chain.
            let chain = Wrapped(Box::new(Wrapped(Box::new(
                std::io::Error::from_raw_os_error(code),
            ))));
            assert!(caused_locally(&chain), "errno {code} in a chain");
        }
        for code in [
            libc::ECONNREFUSED,
            libc::ECONNRESET,
            libc::EHOSTUNREACH,
            libc::ENETUNREACH,
            libc::ETIMEDOUT,
        ] {
            assert!(!io(code).is_local(), "errno {code}");
            let chain = Wrapped(Box::new(std::io::Error::from_raw_os_error(code)));
            assert!(!caused_locally(&chain), "errno {code} in a chain");
        }
        assert!(!ConnectError::Timeout(Duration::from_secs(1)).is_local());
    }

    #[tokio::test]
    async fn a_local_error_is_a_503_and_never_held_against_the_backend() {
        let live = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let ctx = testing::context(&chat(&[live.local_addr().unwrap(), refusing()]));
        let pool = Arc::clone(&ctx.routing.load().pools["chat"]);
        let conn = testing::conn(&ctx, false);
        let parts = parts("chat.example.com");
        // fall = 1: a single failure counted would take the backend down.
        for _ in 0..3 {
            let mut calls = 0;
            let result: Result<(Choice, ()), _> =
                choose_and_connect(&ctx.metrics, &pool, &facts(&parts, &conn), 2, |_| {
                    calls += 1;
                    async {
                        Err(AttemptError::Connect(ConnectError::Io(
                            std::io::Error::from_raw_os_error(libc::EMFILE),
                        )))
                    }
                })
                .await;
            let err = result.err().unwrap();
            assert!(matches!(err, ProxyError::LocalResource { .. }), "{err}");
            assert_eq!(err.status(), http::StatusCode::SERVICE_UNAVAILABLE);
            assert_eq!(err.backend(), None);
            assert_eq!(err.upgrade_result(), "local_error");
            // Not tried elsewhere: another backend would fail the same way.
            assert_eq!(calls, 1);
        }
        assert!(pool.backends.iter().all(|b| b.state() == BackendState::Up));
    }

    #[test]
    fn connect_errors_read_as_before() {
        let timeout = ConnectError::Timeout(Duration::from_millis(1500));
        assert_eq!(timeout.to_string(), "no connection within 1s 500ms");
        let refused = std::io::Error::from(std::io::ErrorKind::ConnectionRefused);
        let text = refused.to_string();
        let err = ProxyError::Connect {
            backend: "b1".into(),
            source: ConnectError::Io(refused),
        };
        assert_eq!(
            err.to_string(),
            format!("connecting to backend b1 failed: {text}")
        );
    }
}
