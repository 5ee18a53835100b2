//! A pool's JWT verification keys: a fixed set (`jwks_file`,
//! `secret_file`, read with the config) or a [`KeyStore`] fetched from a
//! `jwks_url`.
//!
//! A store is fetched by its refresher task (started by [`super::start`]:
//! at once, then every `refresh`, until its pool is replaced or berth shuts
//! down) and, at most every [`KID_REFETCH_MIN`], by the request that names
//! a `kid` the current set lacks (a key rotation needs no reload). One
//! fetch runs at a time; a request that needs one waits for the one under
//! way. A failed fetch keeps the last good set, and is logged and counted;
//! a set that is not a JWKS or has no usable key is a failed fetch.

use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwapOption;
use bytes::Bytes;
use http::{Request, Uri};
use http_body_util::{BodyExt, Empty, Limited};
use prometheus::IntCounter;
use tokio::sync::Mutex;
use tokio::time::Instant;

use super::client::ServiceClient;
use crate::config::{KeySet, JWKS_LIMIT};
use crate::metrics::Metrics;

/// The least time between two fetches caused by unknown `kid`s.
pub(crate) const KID_REFETCH_MIN: Duration = Duration::from_secs(30);

/// The time allowed for one JWKS fetch, answer included.
const FETCH_TIMEOUT: Duration = Duration::from_secs(10);

/// Where a pool's keys come from.
pub(crate) enum Keys {
    Fixed(Arc<KeySet>),
    Fetched(Arc<KeyStore>),
}

impl Keys {
    /// The keys in force; `None` when none has ever been fetched.
    pub(crate) fn current(&self) -> Option<Arc<KeySet>> {
        match self {
            Keys::Fixed(set) => Some(Arc::clone(set)),
            Keys::Fetched(store) => store.keys.load_full(),
        }
    }
}

/// When requests last caused a fetch, by cause: each is bounded on its own,
/// so that a request that found no set at all (berth just started) does
/// not hold back the fetch for a rotation that follows.
#[derive(Default)]
struct Asked {
    unknown_kid: Option<Instant>,
    no_keys: Option<Instant>,
}

/// A key set fetched from a `jwks_url`.
pub(crate) struct KeyStore {
    pool: String,
    url: Uri,
    client: Option<ServiceClient>,
    keys: ArcSwapOption<KeySet>,
    /// Held for the length of a fetch.
    fetching: Mutex<Asked>,
    fetched: IntCounter,
    failed: IntCounter,
}

impl KeyStore {
    pub(crate) fn new(
        pool: &str,
        url: Uri,
        client: Option<ServiceClient>,
        metrics: &Metrics,
    ) -> KeyStore {
        let counter = |result| metrics.auth_jwks_refresh.with_label_values(&[pool, result]);
        KeyStore {
            pool: pool.to_string(),
            url,
            client,
            keys: ArcSwapOption::empty(),
            fetching: Mutex::new(Asked::default()),
            fetched: counter("success"),
            failed: counter("failure"),
        }
    }

    pub(crate) fn url(&self) -> &Uri {
        &self.url
    }

    /// Fetches the set now (after any fetch under way).
    pub(crate) async fn refresh(&self) {
        let _one_at_a_time = self.fetching.lock().await;
        self.fetch().await;
    }

    /// A token names `kid`, which the set in force lacks (or no set was
    /// ever fetched): fetch again, unless a fetch for this reason ran less
    /// than [`KID_REFETCH_MIN`] ago. Returns the set in force afterwards.
    pub(crate) async fn refresh_for_kid(&self, kid: Option<&str>) -> Option<Arc<KeySet>> {
        let mut asked = self.fetching.lock().await;
        // The fetch this request waited for may have brought the key.
        let current = self.keys.load_full();
        let last = match &current {
            Some(set) if kid.is_none_or(|kid| set.has_kid(kid)) => return current,
            Some(_) => &mut asked.unknown_kid,
            None => &mut asked.no_keys,
        };
        let now = Instant::now();
        if last.is_some_and(|at| now < at + KID_REFETCH_MIN) {
            return current;
        }
        *last = Some(now);
        self.fetch().await;
        self.keys.load_full()
    }

    /// One fetch; the caller holds `fetching`.
    async fn fetch(&self) {
        match self.download().await {
            Ok(set) => {
                tracing::info!(pool = %self.pool, url = %self.url, keys = set.len(), "JWKS fetched");
                self.keys.store(Some(Arc::new(set)));
                self.fetched.inc();
            }
            Err(error) => {
                let kept = self.keys.load().as_ref().map_or(0, |set| set.len());
                tracing::warn!(pool = %self.pool, url = %self.url, %error, kept_keys = kept, "JWKS fetch failed; keeping the last good key set");
                self.failed.inc();
            }
        }
    }

    async fn download(&self) -> Result<KeySet, String> {
        let client = self
            .client
            .as_ref()
            .ok_or_else(|| "no HTTP client (TLS setup failed)".to_string())?;
        let mut req = Request::new(Empty::<Bytes>::new());
        *req.uri_mut() = self.url.clone();
        req.headers_mut().insert(
            http::header::ACCEPT,
            http::HeaderValue::from_static("application/jwk-set+json, application/json"),
        );
        let exchange = async {
            let resp = client.request(req).await.map_err(|e| e.to_string())?;
            let status = resp.status();
            if !status.is_success() {
                return Err(format!("status {status}"));
            }
            let body = Limited::new(resp.into_body(), JWKS_LIMIT as usize)
                .collect()
                .await
                .map_err(|e| format!("reading the answer: {e}"))?;
            Ok(body.to_bytes())
        };
        let bytes = tokio::time::timeout(FETCH_TIMEOUT, exchange)
            .await
            .map_err(|_| format!("no answer within {}s", FETCH_TIMEOUT.as_secs()))??;
        KeySet::from_jwks(&bytes)
    }
}
