//! The live routing table: validated config plus the pools built from it.
//! Swapped whole on reload (through `arc_swap`), so a request sees one
//! consistent version from start to end.

use std::collections::HashMap;
use std::sync::Arc;

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
