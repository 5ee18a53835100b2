//! The live routing table: validated config plus the pools built from it.
//! Swapped whole on reload (through `arc_swap`), so a request sees one
//! consistent version from start to end.
//!
//! [`Routing`] is the handle every layer above reads the table through
//! (the proxy per request, the admin API per call) and that only a reload
//! replaces. It owns no tasks.

use std::collections::HashMap;
use std::sync::Arc;

use arc_swap::{ArcSwap, Guard};

use crate::balancer::Pool;
use crate::config::Config;
use crate::metrics::Metrics;

#[derive(Debug)]
pub struct Runtime {
    pub config: Arc<Config>,
    pub pools: HashMap<String, Arc<Pool>>,
}

impl Runtime {
    /// Builds pools for `config`, keeping backends (and their live counts and
    /// state) that `previous` already had with the same id and address.
    pub fn new(config: Arc<Config>, metrics: &Metrics, previous: Option<&Runtime>) -> Runtime {
        let pools = config
            .pools
            .values()
            .map(|pc| {
                let old = previous
                    .and_then(|p| p.pools.get(&pc.name))
                    .map(|p| p.as_ref());
                (
                    pc.name.clone(),
                    Arc::new(Pool::new(pc.clone(), metrics, old)),
                )
            })
            .collect();
        Runtime { config, pools }
    }

    /// This table with `pool` in place of the pool of the same name (a
    /// DNS answer changed its backends); the config and the other pools
    /// stay as they are.
    pub fn with_pool(&self, pool: Arc<Pool>) -> Runtime {
        let mut pools = self.pools.clone();
        pools.insert(pool.config.name.clone(), pool);
        Runtime {
            config: Arc::clone(&self.config),
            pools,
        }
    }

    /// The pool for a request: routes are sorted most specific first, so the
    /// first match wins. `host` is lower-case without port.
    pub fn route(&self, host: Option<&str>, path: &str) -> Option<&Arc<Pool>> {
        self.config
            .routes
            .iter()
            .find(|r| {
                r.host.as_deref().is_none_or(|h| Some(h) == host)
                    && path.starts_with(&r.path_prefix)
            })
            .and_then(|r| self.pools.get(&r.pool))
    }
}

/// The routing table in force: read lock-free per request, replaced whole
/// by a reload.
pub struct Routing {
    live: ArcSwap<Runtime>,
}

impl Routing {
    pub fn new(runtime: Runtime) -> Routing {
        Routing {
            live: ArcSwap::from_pointee(runtime),
        }
    }

    /// The table for one request or one admin call (cheap; hold it briefly).
    pub fn load(&self) -> Guard<Arc<Runtime>> {
        self.live.load()
    }

    /// The table, kept as long as the caller likes.
    pub fn load_full(&self) -> Arc<Runtime> {
        self.live.load_full()
    }

    /// Puts a new table in force; requests already routed keep the old one.
    pub fn store(&self, runtime: Arc<Runtime>) {
        self.live.store(runtime);
    }
}
