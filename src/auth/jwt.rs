//! JWT authentication: find the token (`token_from`, in order), verify it
//! with the pool's keys (`jsonwebtoken`: signature, `exp` and `nbf` with
//! leeway, `iss`, `aud`), and read the claims berth passes on.
//!
//! Only RS256, ES256 and EdDSA (keys from a JWKS) and HS256 (a
//! `secret_file`) verify; a key verifies one algorithm only, so a token
//! cannot choose how it is checked, and `none` does not parse.

use std::borrow::Cow;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use http::{HeaderMap, HeaderName, HeaderValue, Uri};
use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::{Algorithm, Validation};
use serde_json::{Map, Value};

use super::keys::{KeyStore, Keys};
use crate::affinity::{find_cookie, query_param};
use crate::config::{JwtConfig, JwtKeys, KeySet, OnExpiry, TokenSource};

/// The algorithms berth verifies.
const ALGORITHMS: [Algorithm; 4] = [
    Algorithm::RS256,
    Algorithm::ES256,
    Algorithm::EdDSA,
    Algorithm::HS256,
];

/// Why a token was not accepted; `Unavailable` is berth's side.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Failure {
    Missing,
    Invalid,
    Expired,
    /// No key set has ever been fetched: berth cannot tell.
    Unavailable,
}

/// A verified token's claims, and when it stops being valid.
pub(crate) struct Claims {
    pub claims: Map<String, Value>,
    /// `exp` plus `leeway`, when `on_expiry = "close"`.
    pub close_at: Option<SystemTime>,
}

/// A pool's JWT check, ready to use.
pub(crate) struct JwtAuth {
    pub config: JwtConfig,
    pub keys: Keys,
    /// One validation per algorithm, built once.
    validations: Vec<(Algorithm, Validation)>,
}

impl JwtAuth {
    /// `store` is a key store to keep (a reload with the same `jwks_url`).
    pub(crate) fn new(config: &JwtConfig, store: Option<Arc<KeyStore>>) -> JwtAuth {
        let keys = match (&config.keys, store) {
            (JwtKeys::Url(_), Some(store)) => Keys::Fetched(store),
            (JwtKeys::File { keys, .. } | JwtKeys::Secret { keys, .. }, _) => {
                Keys::Fixed(Arc::new(keys.clone()))
            }
            // Not reached: the caller makes a store for every jwks_url.
            (JwtKeys::Url(_), None) => Keys::Fixed(Arc::new(KeySet::default())),
        };
        let validations = ALGORITHMS
            .iter()
            .map(|&alg| (alg, validation(config, alg)))
            .collect();
        JwtAuth {
            config: config.clone(),
            keys,
            validations,
        }
    }

    /// Verifies the request's token.
    pub(crate) async fn check(&self, headers: &HeaderMap, uri: &Uri) -> Result<Claims, Failure> {
        let token = find_token(&self.config.token_from, headers, uri).ok_or(Failure::Missing)?;
        let header = jsonwebtoken::decode_header(&token).map_err(|_| Failure::Invalid)?;
        let validation = self
            .validations
            .iter()
            .find(|(alg, _)| *alg == header.alg)
            .map(|(_, v)| v)
            .ok_or(Failure::Invalid)?;
        let kid = header.kid.as_deref();
        let mut keys = self.keys.current();
        let unknown = |keys: &Option<Arc<KeySet>>| {
            keys.as_ref()
                .is_none_or(|set| kid.is_some_and(|kid| !set.has_kid(kid)))
        };
        if let (Keys::Fetched(store), true) = (&self.keys, unknown(&keys)) {
            keys = store.refresh_for_kid(kid).await;
        }
        let keys = keys.ok_or(Failure::Unavailable)?;
        let mut outcome = Err(Failure::Invalid);
        for key in keys.candidates(kid, header.alg) {
            match jsonwebtoken::decode::<Map<String, Value>>(&token, &key.key, validation) {
                Ok(data) => {
                    outcome = Ok(data.claims);
                    break;
                }
                // Another key with this kid (or none) may have signed it.
                Err(e) if *e.kind() == ErrorKind::InvalidSignature => continue,
                Err(e) if *e.kind() == ErrorKind::ExpiredSignature => {
                    outcome = Err(Failure::Expired);
                    break;
                }
                Err(_) => break,
            }
        }
        let claims = outcome?;
        let close_at = match self.config.on_expiry {
            OnExpiry::Close => claims
                .get("exp")
                .and_then(Value::as_f64)
                .filter(|exp| exp.is_finite() && *exp >= 0.0)
                .map(|exp| {
                    UNIX_EPOCH
                        + Duration::from_secs_f64(exp.min(u32::MAX.into()))
                        + self.config.leeway
                }),
            OnExpiry::Ignore => None,
        };
        Ok(Claims { claims, close_at })
    }

    /// The `claims_to_headers` headers for these claims (a claim the token
    /// lacks, or that cannot be a header value, sets nothing).
    pub(crate) fn headers(&self, claims: &Map<String, Value>) -> Vec<(HeaderName, HeaderValue)> {
        self.config
            .claims_to_headers
            .iter()
            .filter_map(|(header, claim)| {
                let text = claim_text(claims.get(claim)?)?;
                Some((header.clone(), HeaderValue::from_str(&text).ok()?))
            })
            .collect()
    }
}

/// The validation for tokens signed with `alg`: a required `exp`, `nbf`
/// when present, both with `leeway`; `iss` and `aud` required when set.
fn validation(config: &JwtConfig, alg: Algorithm) -> Validation {
    let mut v = Validation::new(alg);
    v.leeway = config.leeway.as_secs();
    v.validate_nbf = true;
    let mut required = vec!["exp"];
    if let Some(issuer) = &config.issuer {
        v.set_issuer(&[issuer]);
        required.push("iss");
    }
    if let Some(audience) = &config.audience {
        v.set_audience(&[audience]);
        required.push("aud");
    }
    v.set_required_spec_claims(&required);
    v
}

/// The token from the first source that has one.
pub(crate) fn find_token<'a>(
    sources: &[TokenSource],
    headers: &'a HeaderMap,
    uri: &Uri,
) -> Option<Cow<'a, str>> {
    sources.iter().find_map(|source| {
        let token = match source {
            TokenSource::Header(name) => {
                let value = headers.get(name)?.to_str().ok()?.trim();
                let bearer = value
                    .split_once(' ')
                    .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
                    .map(|(_, token)| token.trim());
                match bearer {
                    Some(token) => Cow::Borrowed(token),
                    // Authorization with another scheme (Basic) has no token.
                    None if *name == http::header::AUTHORIZATION => return None,
                    None => Cow::Borrowed(value),
                }
            }
            TokenSource::Cookie(name) => Cow::Borrowed(find_cookie(headers, name)?),
            TokenSource::Query(name) => Cow::Owned(query_param(uri.query()?, name)?),
        };
        (!token.is_empty()).then_some(token)
    })
}

/// A claim as header text: a string as it is, a number or boolean as
/// written, an array's items joined with commas, an object as JSON; `null`
/// is no value.
pub(crate) fn claim_text(value: &Value) -> Option<String> {
    match value {
        Value::Null => None,
        Value::String(s) => Some(s.clone()),
        Value::Array(items) => Some(
            items
                .iter()
                .filter_map(|item| match item {
                    Value::String(s) => Some(s.clone()),
                    Value::Null => None,
                    other => Some(other.to_string()),
                })
                .collect::<Vec<_>>()
                .join(","),
        ),
        other => Some(other.to_string()),
    }
}
