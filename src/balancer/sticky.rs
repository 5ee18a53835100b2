//! Sticky routing at run time: which backend a request goes to when its pool
//! has cookie or hash affinity. The pure pieces (signing, hashing, key
//! extraction) live in `crate::affinity`; this module applies them to a
//! pool's live backends.
//!
//! Results, as counted in `berth_affinity_total{result}`:
//! - `hit`: the client's pinned (cookie) or preferred (hash) backend took it;
//! - `new`: no cookie, or no hash key in the request: `balance` picked;
//! - `rebind`: the pinned backend is down, draining, removed or full (or,
//!   for hash, bounded load sent the key further down its order);
//! - `invalid`: a cookie that failed authentication was ignored.

use std::net::IpAddr;
use std::sync::Arc;

use http::{HeaderMap, Uri};

use super::{Backend, Pool};
use ipnet::IpNet;

use crate::affinity::{
    find_cookie, hash_key_value, pick_bounded, rendezvous_pick, set_cookie_value, CookieSigner,
    CookieSpec,
};
use crate::config::{Affinity, HashKey};

/// A pool's affinity, ready to use.
pub enum Sticky {
    None,
    Cookie {
        signer: CookieSigner,
        spec: CookieSpec,
    },
    Hash {
        key: HashKey,
        bounded_load: Option<f64>,
        trusted_proxies: Vec<IpNet>,
    },
}

impl Sticky {
    /// Builds from validated config, whose values are already typed.
    pub fn from_config(affinity: &Affinity) -> Sticky {
        match affinity {
            Affinity::None => Sticky::None,
            Affinity::Cookie(c) => Sticky::Cookie {
                signer: CookieSigner::new(&c.secret),
                spec: CookieSpec {
                    name: c.name.clone(),
                    path: c.path.clone(),
                    domain: c.domain.clone(),
                    same_site: c.same_site,
                    max_age: c.max_age,
                },
            },
            Affinity::Hash(h) => Sticky::Hash {
                key: h.key.clone(),
                bounded_load: h.bounded_load,
                trusted_proxies: h.trusted_proxies.clone(),
            },
        }
    }

    /// The affinity cookie's name, when the pool uses one.
    pub fn cookie_name(&self) -> Option<&str> {
        match self {
            Sticky::Cookie { spec, .. } => Some(&spec.name),
            _ => None,
        }
    }
}

/// What the balancer needs to know about a request.
pub struct RequestFacts<'a> {
    pub headers: &'a HeaderMap,
    pub uri: &'a Uri,
    pub peer: IpAddr,
    /// The request came over TLS (cookies get `Secure`).
    pub tls: bool,
    /// The verified claim `claim:NAME` hash affinity keys on, if any.
    pub claim: Option<&'a str>,
}

/// The backend chosen for a request.
pub struct Choice {
    pub backend: Arc<Backend>,
    /// `Set-Cookie` value to send with the response (cookie affinity, when
    /// the client was not already pinned to this backend).
    pub set_cookie: Option<String>,
    /// `berth_affinity_total` result, for pools with affinity.
    pub result: Option<&'static str>,
}

impl Pool {
    /// Chooses a backend for a request, honouring the pool's affinity and
    /// never one in `tried`.
    pub fn choose(&self, req: &RequestFacts<'_>, tried: &[Arc<Backend>]) -> Option<Choice> {
        let excluded: Vec<&Arc<Backend>> = tried.iter().collect();
        let usable =
            |b: &Arc<Backend>| self.eligible(b) && !tried.iter().any(|t| Arc::ptr_eq(t, b));
        match &self.sticky {
            Sticky::None => self.pick(&excluded).map(|backend| Choice {
                backend,
                set_cookie: None,
                result: None,
            }),
            Sticky::Cookie { signer, spec } => {
                let pool = self.config.name.as_str();
                let (pinned, result) = match find_cookie(req.headers, &spec.name) {
                    None => (None, "new"),
                    Some(value) => match signer.verify(pool, value) {
                        None => (None, "invalid"),
                        Some(id) => match self.find(id) {
                            Some(b) if usable(b) => (Some(Arc::clone(b)), "hit"),
                            _ => (None, "rebind"),
                        },
                    },
                };
                if let Some(backend) = pinned {
                    return Some(Choice {
                        backend,
                        set_cookie: None,
                        result: Some(result),
                    });
                }
                let backend = self.pick(&excluded)?;
                let value = signer.sign(pool, &backend.id);
                Some(Choice {
                    set_cookie: Some(set_cookie_value(spec, &value, req.tls)),
                    backend,
                    result: Some(result),
                })
            }
            Sticky::Hash {
                key,
                bounded_load,
                trusted_proxies,
            } => {
                let value = match key {
                    HashKey::Claim(_) => req.claim.map(str::to_string),
                    _ => hash_key_value(key, req.headers, req.uri, req.peer, trusted_proxies),
                };
                let Some(value) = value else {
                    return self.pick(&excluded).map(|backend| Choice {
                        backend,
                        set_cookie: None,
                        result: Some("new"),
                    });
                };
                let candidates: Vec<&Arc<Backend>> =
                    self.backends.iter().filter(|b| usable(b)).collect();
                let ids: Vec<(&str, u32)> = candidates
                    .iter()
                    .map(|b| (b.id.as_str(), b.weight()))
                    .collect();
                let live: Vec<u64> = candidates.iter().map(|b| b.live_connections()).collect();
                let chosen = pick_bounded(value.as_bytes(), &ids, &live, *bounded_load)?;
                let first = rendezvous_pick(value.as_bytes(), &ids);
                Some(Choice {
                    backend: Arc::clone(candidates.get(chosen)?),
                    set_cookie: None,
                    result: Some(if first == Some(chosen) {
                        "hit"
                    } else {
                        "rebind"
                    }),
                })
            }
        }
    }
}
