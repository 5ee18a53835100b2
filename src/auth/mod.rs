//! Authentication at the handshake: a pool's JWT check and forward-auth,
//! run on every request to the pool (plain HTTP and WebSocket upgrades
//! alike) before any backend is chosen or connected to.
//!
//! [`PoolAuth`] is built with its pool from `[pools.NAME.auth]`: JWT first
//! (`jwt`: token from `token_from`, verified with the pool's keys), then
//! forward-auth (`forward`: an auth service asked about the request). A
//! request that passes gets a [`Verified`]: the headers to set from claims
//! and from the auth service, when the token stops being valid, and the
//! claim hash affinity keys on. One that does not gets a [`Rejection`]:
//! `401` with `WWW-Authenticate`, the auth service's own answer, or `503`
//! when berth cannot tell (fail closed). Every decision is counted in
//! `berth_auth_total{pool, method, result}`.
//!
//! What the client sent is never trusted for what auth sets: the headers
//! named by `claims_to_headers` and `copy_headers` are removed from every
//! request ([`PoolAuth::strip_headers`]), and `query:NAME` token
//! parameters are removed from the target ([`PoolAuth::strip_query`])
//! before it is forwarded or logged. Tokens are never logged, counted or
//! put in a response.
//!
//! Tasks: a pool with a `jwks_url` has one refresher task ([`start`]),
//! started with the pool's health checks and stopped with them (the pool's
//! `stop` token, or shutdown). Everything else runs in the request's task.

mod client;
mod forward;
mod jwt;
mod keys;

use std::sync::Arc;
use std::time::SystemTime;

use bytes::Bytes;
use http::{HeaderMap, HeaderName, HeaderValue, Method, Response, StatusCode, Uri};
use prometheus::IntCounterVec;
use tokio_util::sync::CancellationToken;

use crate::affinity::form_decode;
use crate::body::{full, ProxyBody};
use crate::config::{Affinity, HashKey, JwtKeys, PoolConfig, TokenSource};
use crate::metrics::Metrics;
use forward::{Answer, Asked, ForwardAuth};
use jwt::{claim_text, Failure, JwtAuth};
use keys::{KeyStore, Keys};

/// The `result` label values of `berth_auth_total`.
const RESULTS: [&str; 6] = ["ok", "missing", "invalid", "expired", "denied", "error"];

/// A pool's authentication, ready to use.
pub struct PoolAuth {
    pool: String,
    jwt: Option<JwtAuth>,
    forward: Option<ForwardAuth>,
    /// Headers auth sets: whatever the client sent under these names goes.
    guarded: Vec<HeaderName>,
    /// `query:NAME` token parameters.
    query_params: Vec<String>,
    /// The claim `claim:NAME` hash affinity keys on.
    affinity_claim: Option<String>,
    decisions: IntCounterVec,
}

impl std::fmt::Debug for PoolAuth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PoolAuth")
            .field("pool", &self.pool)
            .field("jwt", &self.jwt.is_some())
            .field("forward", &self.forward.is_some())
            .finish_non_exhaustive()
    }
}

/// The request as authentication sees it.
pub struct AuthRequest<'a> {
    pub method: &'a Method,
    /// The headers as the client sent them (the token is looked for here).
    pub headers: &'a HeaderMap,
    /// The target as the client sent it (a query token included).
    pub uri: &'a Uri,
    /// The headers as the backend will get them (`X-Forwarded-*` added,
    /// berth's affinity cookie and guarded headers removed): what an auth
    /// service is sent.
    pub forwarded: &'a HeaderMap,
    /// The target as forwarded (`/path?query`, a query token removed).
    pub target: &'a str,
}

/// What a request that passed carries on to the backend.
#[derive(Clone, Debug, Default)]
pub struct Verified {
    /// Headers to add to the forwarded request (claims, then the auth
    /// service's `copy_headers`).
    pub headers: Vec<(HeaderName, HeaderValue)>,
    /// When a WebSocket opened with this token is closed with 1008
    /// (`exp` plus `leeway`, with `on_expiry = "close"`).
    pub close_at: Option<SystemTime>,
    /// The value of the claim `claim:NAME` hash affinity keys on.
    pub affinity_key: Option<String>,
}

/// A request that did not pass, and the answer the client gets.
#[derive(Clone, Debug)]
pub struct Rejection {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Bytes,
    /// Why, for the log (never a token).
    pub reason: String,
    /// berth's own answer (not the auth service's): a `503` of berth's
    /// own gets a `Retry-After` like every other.
    pub own: bool,
}

impl std::fmt::Display for Rejection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "authentication refused the request: {}", self.reason)
    }
}

impl Rejection {
    /// berth's own answer: a short text with `WWW-Authenticate` for a 401.
    fn own(status: StatusCode, challenge: Option<&'static str>, body: &str, reason: &str) -> Self {
        let mut headers = HeaderMap::new();
        headers.insert(
            http::header::CONTENT_TYPE,
            HeaderValue::from_static("text/plain; charset=utf-8"),
        );
        if let Some(challenge) = challenge {
            headers.insert(
                http::header::WWW_AUTHENTICATE,
                HeaderValue::from_static(challenge),
            );
        }
        Rejection {
            status,
            headers,
            body: Bytes::from(body.to_string()),
            reason: reason.to_string(),
            own: true,
        }
    }

    fn unavailable(reason: &str) -> Self {
        Rejection::own(
            StatusCode::SERVICE_UNAVAILABLE,
            None,
            "authentication unavailable\n",
            reason,
        )
    }

    /// The response the client gets (the caller removes hop-by-hop
    /// headers from an auth service's answer).
    pub fn response(&self) -> Response<ProxyBody> {
        let mut resp = Response::new(full(self.body.clone()));
        *resp.status_mut() = self.status;
        *resp.headers_mut() = self.headers.clone();
        // The body is whole: its length is known, whatever the service said.
        resp.headers_mut().remove(http::header::CONTENT_LENGTH);
        resp
    }
}

impl PoolAuth {
    /// The pool's authentication, or `None` when it has none. A key store
    /// of `previous` (the pool before a reload) with the same `jwks_url`
    /// is kept, with its keys.
    pub fn new(
        config: &PoolConfig,
        metrics: &Metrics,
        previous: Option<&PoolAuth>,
    ) -> Option<Arc<PoolAuth>> {
        let auth = &config.auth;
        if auth.jwt.is_none() && auth.forward.is_none() {
            return None;
        }
        let pool = config.name.as_str();
        // Only a jwks_url and an auth service are called over the network.
        let calls = auth.forward.is_some()
            || auth
                .jwt
                .as_ref()
                .is_some_and(|j| matches!(j.keys, JwtKeys::Url(_)));
        let client = calls.then(client::service_client).flatten();
        let jwt = auth.jwt.as_ref().map(|jc| {
            let store = match &jc.keys {
                JwtKeys::Url(url) => Some(
                    previous
                        .and_then(PoolAuth::key_store)
                        .filter(|store| store.url() == url)
                        .unwrap_or_else(|| {
                            Arc::new(KeyStore::new(pool, url.clone(), client.clone(), metrics))
                        }),
                ),
                _ => None,
            };
            JwtAuth::new(jc, store)
        });
        let forward = auth
            .forward
            .as_ref()
            .map(|fc| ForwardAuth::new(fc, client.clone()));
        let mut guarded: Vec<HeaderName> = Vec::new();
        let mut query_params = Vec::new();
        if let Some(jwt) = &jwt {
            guarded.extend(jwt.config.claims_to_headers.iter().map(|(h, _)| h.clone()));
            query_params.extend(jwt.config.token_from.iter().filter_map(|s| match s {
                TokenSource::Query(name) => Some(name.clone()),
                _ => None,
            }));
        }
        if let Some(forward) = &forward {
            guarded.extend(forward.copy_headers().iter().cloned());
        }
        let affinity_claim = match &config.affinity {
            Affinity::Hash(h) => match &h.key {
                HashKey::Claim(name) => Some(name.clone()),
                _ => None,
            },
            _ => None,
        };
        let decisions = metrics.auth.clone();
        // Every series exists from the start, at zero.
        for (method, on) in [("jwt", jwt.is_some()), ("forward", forward.is_some())] {
            for result in RESULTS.iter().filter(|_| on) {
                decisions.with_label_values(&[pool, method, result]);
            }
        }
        Some(Arc::new(PoolAuth {
            pool: pool.to_string(),
            jwt,
            forward,
            guarded,
            query_params,
            affinity_claim,
            decisions,
        }))
    }

    fn key_store(&self) -> Option<Arc<KeyStore>> {
        match &self.jwt.as_ref()?.keys {
            Keys::Fetched(store) => Some(Arc::clone(store)),
            Keys::Fixed(_) => None,
        }
    }

    /// Removes the headers auth sets from what the client sent.
    pub fn strip_headers(&self, headers: &mut HeaderMap) {
        for name in &self.guarded {
            headers.remove(name);
        }
    }

    /// The target without its `query:NAME` token parameters, or `None`
    /// when it has none.
    pub fn strip_query(&self, target: &str) -> Option<String> {
        strip_params(target, &self.query_params)
    }

    fn count(&self, method: &str, result: &str) {
        self.decisions
            .with_label_values(&[&self.pool, method, result])
            .inc();
    }

    /// Checks one request: JWT first, then forward-auth.
    pub async fn check(&self, req: &AuthRequest<'_>) -> Result<Verified, Rejection> {
        let mut verified = Verified::default();
        if let Some(jwt) = &self.jwt {
            let claims = match jwt.check(req.headers, req.uri).await {
                Ok(claims) => claims,
                Err(failure) => return Err(self.jwt_rejection(failure)),
            };
            self.count("jwt", "ok");
            verified.headers = jwt.headers(&claims.claims);
            verified.close_at = claims.close_at;
            verified.affinity_key = self
                .affinity_claim
                .as_ref()
                .and_then(|name| claim_text(claims.claims.get(name)?))
                .filter(|v| !v.is_empty());
        }
        if let Some(forward) = &self.forward {
            let asked = Asked {
                method: req.method,
                target: req.target,
                headers: req.forwarded,
            };
            match forward.check(&asked).await {
                Answer::Allow(headers) => {
                    self.count("forward", "ok");
                    verified.headers.extend(headers);
                }
                Answer::Deny {
                    status,
                    headers,
                    body,
                } => {
                    let result = if status.is_server_error() {
                        "error"
                    } else {
                        "denied"
                    };
                    self.count("forward", result);
                    return Err(Rejection {
                        status,
                        headers,
                        body,
                        reason: format!("the auth service answered {status}"),
                        own: false,
                    });
                }
                Answer::Failed(why) => {
                    self.count("forward", "error");
                    tracing::warn!(pool = %self.pool, error = %why, "forward-auth failed; refusing the request");
                    return Err(Rejection::unavailable(&format!(
                        "the auth service failed: {why}"
                    )));
                }
            }
        }
        Ok(verified)
    }

    fn jwt_rejection(&self, failure: Failure) -> Rejection {
        const INVALID: &str = "Bearer error=\"invalid_token\"";
        let unauthorized = StatusCode::UNAUTHORIZED;
        let (result, rejection) = match failure {
            Failure::Missing => (
                "missing",
                Rejection::own(
                    unauthorized,
                    Some("Bearer"),
                    "authentication required\n",
                    "no token",
                ),
            ),
            Failure::Invalid => (
                "invalid",
                Rejection::own(
                    unauthorized,
                    Some(INVALID),
                    "invalid token\n",
                    "invalid token",
                ),
            ),
            Failure::Expired => (
                "expired",
                Rejection::own(
                    unauthorized,
                    Some(INVALID),
                    "token expired\n",
                    "expired token",
                ),
            ),
            Failure::Unavailable => (
                "error",
                Rejection::unavailable("no JWT keys could be fetched yet"),
            ),
        };
        self.count("jwt", result);
        rejection
    }
}

/// Starts the JWKS refresher of a pool with a `jwks_url`: a fetch at once,
/// then every `refresh`, until `stop` (the pool is replaced) or `shutdown`.
pub fn start(auth: &PoolAuth, stop: &CancellationToken, shutdown: &CancellationToken) {
    let (Some(store), Some(jwt)) = (auth.key_store(), auth.jwt.as_ref()) else {
        return;
    };
    let every = jwt.config.refresh;
    let (stop, shutdown) = (stop.clone(), shutdown.clone());
    tokio::spawn(async move {
        let mut ticker = tokio::time::interval(every);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = ticker.tick() => {}
                _ = stop.cancelled() => return,
                _ = shutdown.cancelled() => return,
            }
            tokio::select! {
                () = store.refresh() => {}
                _ = stop.cancelled() => return,
                _ = shutdown.cancelled() => return,
            }
        }
    });
}

/// `target` (`/path?query`) without the parameters named in `names`
/// (compared form-decoded, as they are read); `None` when none is there.
fn strip_params(target: &str, names: &[String]) -> Option<String> {
    let (path, query) = target.split_once('?')?;
    if names.is_empty() {
        return None;
    }
    let named = |pair: &str| {
        let name = pair.split_once('=').map_or(pair, |(n, _)| n);
        names.iter().any(|n| form_decode(name) == n.as_str())
    };
    if !query.split('&').any(named) {
        return None;
    }
    let kept: Vec<&str> = query.split('&').filter(|p| !named(p)).collect();
    let kept = kept.join("&");
    Some(if kept.is_empty() {
        path.to_string()
    } else {
        format!("{path}?{kept}")
    })
}

#[cfg(test)]
mod tests;
