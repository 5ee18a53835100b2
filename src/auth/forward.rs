//! Forward-auth: ask an auth service about each request.
//!
//! berth sends `GET url` with the client's `Cookie` and `Authorization`,
//! the `X-Forwarded-For`, `-Proto` and `-Host` the backend would get, and
//! the original method and target (`X-Forwarded-Method`,
//! `X-Forwarded-Uri`, a query token already removed), and the request's
//! `X-Request-Id` (the one the backend gets). A `2xx` lets the
//! request through with the `copy_headers` of the answer; any other answer
//! goes back to the client as it is (status, headers, body up to
//! [`BODY_LIMIT`]). No answer within `timeout`, or none at all, is a
//! failure: berth fails closed.
//!
//! With `cache`, an allowing answer is kept for requests that send the same
//! `Cookie` and `Authorization` (keyed by their SHA-256; denials are never
//! kept). The cache lock is taken once per request, never per frame.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use bytes::Bytes;
use http::header::{AUTHORIZATION, COOKIE};
use http::{HeaderMap, HeaderName, HeaderValue, Method, Request, StatusCode};
use http_body_util::{BodyExt, Empty, Limited};
use sha2::{Digest, Sha256};
use tokio::time::Instant;

use super::client::ServiceClient;
use crate::config::ForwardAuthConfig;

/// The most of an auth service's answer berth reads (a login page, an
/// error document); a longer one is a failure.
pub(crate) const BODY_LIMIT: usize = 64 * 1024;

/// The most answers one pool's cache holds.
const CACHE_ENTRIES: usize = 10_000;

/// The headers of the client's request that berth sends on, besides the
/// method and target.
const SENT: [&str; 6] = [
    "cookie",
    "authorization",
    "x-forwarded-for",
    "x-forwarded-proto",
    "x-forwarded-host",
    "x-request-id",
];

/// Headers to add to an allowed request.
type Added = Vec<(HeaderName, HeaderValue)>;

/// What the auth service said.
pub(crate) enum Answer {
    /// `2xx`: the headers to add to the request.
    Allow(Added),
    /// Anything else, to be passed back to the client.
    Deny {
        status: StatusCode,
        headers: HeaderMap,
        body: Bytes,
    },
    /// No usable answer (down, too slow, too long): why, for the log.
    Failed(String),
}

/// The request as the auth service is asked about it.
pub(crate) struct Asked<'a> {
    pub method: &'a Method,
    /// The target as forwarded (`/path?query`).
    pub target: &'a str,
    /// The headers as the backend would get them.
    pub headers: &'a HeaderMap,
}

/// A pool's forward-auth, ready to use.
pub(crate) struct ForwardAuth {
    config: ForwardAuthConfig,
    client: Option<ServiceClient>,
    /// Allowing answers by credentials digest, with when they lapse.
    cache: Mutex<HashMap<[u8; 32], (Instant, Added)>>,
}

impl ForwardAuth {
    pub(crate) fn new(config: &ForwardAuthConfig, client: Option<ServiceClient>) -> ForwardAuth {
        ForwardAuth {
            config: config.clone(),
            client,
            cache: Mutex::new(HashMap::new()),
        }
    }

    pub(crate) fn copy_headers(&self) -> &[HeaderName] {
        &self.config.copy_headers
    }

    /// Asks the service (or the cache) about one request.
    pub(crate) async fn check(&self, asked: &Asked<'_>) -> Answer {
        let key = self.config.cache.map(|_| credentials_key(asked.headers));
        if let Some(headers) = key.as_ref().and_then(|k| self.cached(k)) {
            return Answer::Allow(headers);
        }
        let answer = match tokio::time::timeout(self.config.timeout, self.ask(asked)).await {
            Ok(answer) => answer,
            Err(_) => Answer::Failed(format!(
                "no answer within {}",
                humantime::format_duration(self.config.timeout)
            )),
        };
        if let (Answer::Allow(headers), Some(key), Some(ttl)) = (&answer, key, self.config.cache) {
            self.remember(key, headers.clone(), ttl);
        }
        answer
    }

    async fn ask(&self, asked: &Asked<'_>) -> Answer {
        let Some(client) = &self.client else {
            return Answer::Failed("no HTTP client (TLS setup failed)".into());
        };
        let resp = match client.request(self.request(asked)).await {
            Ok(resp) => resp,
            Err(e) => return Answer::Failed(format!("calling {}: {e}", self.config.url)),
        };
        let (parts, body) = resp.into_parts();
        // Read the answer whole (so the connection can be reused, and a
        // denial's body can be passed on).
        let body = match Limited::new(body, BODY_LIMIT).collect().await {
            Ok(body) => body.to_bytes(),
            Err(e) => return Answer::Failed(format!("reading the answer: {e}")),
        };
        if parts.status.is_success() {
            let headers = self
                .config
                .copy_headers
                .iter()
                .flat_map(|name| {
                    parts
                        .headers
                        .get_all(name)
                        .iter()
                        .map(move |v| (name.clone(), v.clone()))
                })
                .collect();
            return Answer::Allow(headers);
        }
        Answer::Deny {
            status: parts.status,
            headers: parts.headers,
            body,
        }
    }

    fn request(&self, asked: &Asked<'_>) -> Request<Empty<Bytes>> {
        let mut req = Request::new(Empty::new());
        *req.uri_mut() = self.config.url.clone();
        let out = req.headers_mut();
        for name in SENT {
            for value in asked.headers.get_all(name) {
                out.append(name, value.clone());
            }
        }
        if let Ok(method) = HeaderValue::from_str(asked.method.as_str()) {
            out.insert("x-forwarded-method", method);
        }
        if let Ok(target) = HeaderValue::from_str(asked.target) {
            out.insert("x-forwarded-uri", target);
        }
        req
    }

    fn cached(&self, key: &[u8; 32]) -> Option<Added> {
        let cache = self.cache.lock().unwrap_or_else(|p| p.into_inner());
        let (until, headers) = cache.get(key)?;
        (Instant::now() < *until).then(|| headers.clone())
    }

    fn remember(&self, key: [u8; 32], headers: Added, ttl: Duration) {
        let now = Instant::now();
        let mut cache = self.cache.lock().unwrap_or_else(|p| p.into_inner());
        if cache.len() >= CACHE_ENTRIES {
            cache.retain(|_, (until, _)| now < *until);
            if cache.len() >= CACHE_ENTRIES {
                // Still full of live answers: start over rather than grow.
                cache.clear();
            }
        }
        cache.insert(key, (now + ttl, headers));
    }
}

/// The cache key: a digest of the credentials the service is sent.
fn credentials_key(headers: &HeaderMap) -> [u8; 32] {
    let mut hash = Sha256::new();
    for name in [COOKIE, AUTHORIZATION] {
        hash.update(name.as_str());
        for value in headers.get_all(&name) {
            hash.update(b"\n");
            hash.update(value.as_bytes());
        }
        // Header values hold neither NUL nor newline, so the separators
        // keep any two different sets of lines apart.
        hash.update(b"\0");
    }
    hash.finalize().into()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(
                HeaderName::from_bytes(k.as_bytes()).unwrap(),
                v.parse().unwrap(),
            );
        }
        h
    }

    #[test]
    fn the_cache_key_is_the_credentials_and_nothing_else() {
        let base = credentials_key(&headers(&[
            ("cookie", "s=1"),
            ("authorization", "Bearer a"),
        ]));
        let same = credentials_key(&headers(&[
            ("authorization", "Bearer a"),
            ("cookie", "s=1"),
            ("x-forwarded-for", "203.0.113.9"),
            ("user-agent", "other"),
        ]));
        assert_eq!(base, same);
        for other in [
            headers(&[("cookie", "s=2"), ("authorization", "Bearer a")]),
            headers(&[("cookie", "s=1")]),
            headers(&[("authorization", "Bearer a")]),
            headers(&[
                ("cookie", "s=1"),
                ("cookie", "t=2"),
                ("authorization", "Bearer a"),
            ]),
            HeaderMap::new(),
        ] {
            assert_ne!(credentials_key(&other), base, "{other:?}");
        }
    }

    #[tokio::test(start_paused = true)]
    async fn cached_answers_expire_and_the_cache_stays_bounded() {
        let config = ForwardAuthConfig {
            url: "http://127.0.0.1:1/".parse().unwrap(),
            timeout: Duration::from_secs(1),
            copy_headers: vec![HeaderName::from_static("x-user")],
            cache: Some(Duration::from_secs(30)),
        };
        let auth = ForwardAuth::new(&config, None);
        let user = vec![(
            HeaderName::from_static("x-user"),
            HeaderValue::from_static("u1"),
        )];
        auth.remember([1; 32], user.clone(), Duration::from_secs(30));
        tokio::time::advance(Duration::from_secs(29)).await;
        assert_eq!(auth.cached(&[1; 32]), Some(user.clone()));
        tokio::time::advance(Duration::from_secs(1)).await;
        assert_eq!(auth.cached(&[1; 32]), None);
        for i in 0..CACHE_ENTRIES + 5 {
            let mut key = [0u8; 32];
            key[..8].copy_from_slice(&(i as u64).to_be_bytes());
            auth.remember(key, Vec::new(), Duration::from_secs(30));
        }
        assert!(auth.cache.lock().unwrap().len() <= CACHE_ENTRIES);
    }
}
