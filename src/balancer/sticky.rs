//! Sticky routing at run time: which backend a request goes to when its pool
//! has cookie or hash affinity. The pure pieces (signing, hashing, key
//! extraction) live in `crate::affinity`; this module applies them to a
//! pool's live backends.
//!
//! Results, as counted in `berth_affinity_total{result}`:
//! - `hit`: the client's pinned (cookie) or preferred (hash) backend took it;
//! - `new`: no cookie, or no hash key in the request: `balance` picked;
//! - `rebind`: the pinned backend is down, draining, removed or full (or,
//!   for hash, bounded load sent the key further down its order), or a
//!   rebalance closed this client's connection to it (a ticket for its
//!   address): the client is re-pinned to a backend the rebalance is not
//!   shedding;
//! - `invalid`: a cookie that failed authentication was ignored.
//!
//! Hash affinity ranks each backend by its weight times its slow-start
//! factor (in thousandths, so that a pool at full weight ranks exactly as
//! by the plain weights): a joining backend wins a growing subset of the
//! keys it will hold, and bounded load's shares use the same weights. The
//! choice records the key's hash and its first choice among the backends
//! that are up ([`HashPlacement`]), so that a rebalance can tell which
//! keys moved since.

use std::net::IpAddr;
use std::sync::Arc;

use http::{HeaderMap, Uri};

use super::{Backend, Pool};
use ipnet::IpNet;

use crate::affinity::{
    find_cookie, hash_key_value, key_hash, pick_bounded, rendezvous_pick, rendezvous_pick_by_hash,
    set_cookie_value, CookieSigner, CookieSpec,
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

impl Pool {
    /// Where a hash key (by its [`key_hash`]) belongs now: its first choice
    /// among the backends that are up, by effective weight (fullness and
    /// bounded load aside). `None` when no backend is up.
    pub fn hash_home(&self, key_hash: u64) -> Option<Arc<Backend>> {
        let up: Vec<&Arc<Backend>> = self
            .backends
            .iter()
            .filter(|b| b.state() == super::BackendState::Up)
            .collect();
        let ids = ranked_weights(&up);
        rendezvous_pick_by_hash(key_hash, &ids).and_then(|i| up.get(i).map(|b| Arc::clone(b)))
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
    /// Where the request's hash key belonged when it was placed (hash
    /// affinity with a key only).
    pub placement: Option<HashPlacement>,
}

/// A hash-placed connection's key, by its hash, and the backend that was
/// its first choice among the backends up when it was placed.
#[derive(Clone, Debug)]
pub struct HashPlacement {
    pub key_hash: u64,
    pub home: Arc<Backend>,
}

/// Hash affinity's candidates: `(id, effective weight)` of each backend.
fn ranked_weights<'a>(backends: &[&'a Arc<Backend>]) -> Vec<(&'a str, u32)> {
    let ramping = backends.iter().any(|b| b.slow_start_factor() < 1.0);
    backends
        .iter()
        .map(|b| {
            let w = if ramping {
                b.effective_milli_weight()
            } else {
                b.weight()
            };
            (b.id.as_str(), w)
        })
        .collect()
}

impl Pool {
    /// Chooses a backend for a request, honouring the pool's affinity and
    /// never one in `tried`.
    pub fn choose(&self, req: &RequestFacts<'_>, tried: &[Arc<Backend>]) -> Option<Choice> {
        let mut excluded: Vec<&Arc<Backend>> = tried.iter().collect();
        let usable =
            |b: &Arc<Backend>| self.eligible(b) && !tried.iter().any(|t| Arc::ptr_eq(t, b));
        match &self.sticky {
            Sticky::None => self.pick(&excluded).map(|backend| Choice {
                backend,
                set_cookie: None,
                result: None,
                placement: None,
            }),
            Sticky::Cookie { signer, spec } => {
                let pool = self.config.name.as_str();
                let (pinned, result) = match find_cookie(req.headers, &spec.name) {
                    None => (None, "new"),
                    Some(value) => match signer.verify(pool, value) {
                        None => (None, "invalid"),
                        Some(id) => match self.find(id) {
                            // A client a rebalance sent away goes elsewhere.
                            Some(b) if usable(b) && b.take_rebalance_ticket(req.peer) => {
                                excluded.push(b);
                                (None, "rebind")
                            }
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
                        placement: None,
                    });
                }
                // Only the one backend left: it keeps its client.
                let backend = self
                    .pick(&excluded)
                    .or_else(|| self.pick(&excluded[..tried.len()]))?;
                let value = signer.sign(pool, &backend.id);
                Some(Choice {
                    set_cookie: Some(set_cookie_value(spec, &value, req.tls)),
                    backend,
                    result: Some(result),
                    placement: None,
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
                        placement: None,
                    });
                };
                let candidates: Vec<&Arc<Backend>> =
                    self.backends.iter().filter(|b| usable(b)).collect();
                let ids = ranked_weights(&candidates);
                let live: Vec<u64> = candidates.iter().map(|b| b.live_connections()).collect();
                let chosen = pick_bounded(value.as_bytes(), &ids, &live, *bounded_load)?;
                let first = rendezvous_pick(value.as_bytes(), &ids);
                let hash = key_hash(value.as_bytes());
                Some(Choice {
                    backend: Arc::clone(candidates.get(chosen)?),
                    set_cookie: None,
                    result: Some(if first == Some(chosen) {
                        "hit"
                    } else {
                        "rebind"
                    }),
                    placement: self.hash_home(hash).map(|home| HashPlacement {
                        key_hash: hash,
                        home,
                    }),
                })
            }
        }
    }
}
