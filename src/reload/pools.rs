//! A pool's life at run time: the tasks that go with every pool the
//! routing table holds, the swap of one pool when its DNS answer changes,
//! and retiring the backends a new table no longer has.
//!
//! [`PoolRunner`] starts, for each pool, its active health checks, its
//! JWKS refresher, its rebalance controller (`crate::rebalance`) and its
//! DNS discovery (`dns.rs`); all of them stop with the pool's `stop` token
//! (a reload or a DNS change replaces the pool) or at shutdown. A DNS
//! change goes through [`PoolRunner::apply_discovered`] under the same
//! lock as a reload, so the two never build on a stale table: the pool is
//! rebuilt with the new addresses (backends that stay are the same, with
//! their connections), swapped in, and the backends whose address vanished
//! are drained exactly as if a reload had removed them.

use std::sync::Arc;
use std::time::Duration;

use super::{diff_backends, dns, Removed};
use crate::balancer::{Discovered, Pool};
use crate::lifecycle::Lifecycle;
use crate::metrics::Metrics;
use crate::routing::Routing;

/// What a pool's tasks and a DNS change need; cheap to clone.
#[derive(Clone)]
pub struct PoolRunner {
    pub(super) routing: Arc<Routing>,
    pub(super) lifecycle: Arc<Lifecycle>,
    pub(super) metrics: Metrics,
    /// One change of the routing table at a time (shared with reloads).
    pub(super) lock: Arc<tokio::sync::Mutex<()>>,
}

impl PoolRunner {
    /// Starts `pool`'s tasks (each only when the pool is configured for it).
    pub fn start(&self, pool: &Arc<Pool>) {
        crate::balancer::health::start(pool, &self.metrics, &self.lifecycle.shutdown);
        if let Some(auth) = &pool.auth {
            crate::auth::start(auth, &pool.stop, &self.lifecycle.shutdown);
        }
        crate::rebalance::start(pool, &self.lifecycle);
        dns::start(self.clone(), pool, &self.metrics, &self.lifecycle.shutdown);
    }

    /// Puts what DNS discovery `asked` for found into force: `asked`,
    /// rebuilt with these addresses, replaces it (unless a reload or another
    /// answer replaced it meanwhile: its successor looks up on its own).
    pub(super) async fn apply_discovered(&self, asked: &Arc<Pool>, found: Discovered) {
        let _one_at_a_time = self.lock.lock().await;
        let old = self.routing.load_full();
        let Some(current) = old.pools.get(&asked.config.name) else {
            return;
        };
        if !Arc::ptr_eq(current, asked) {
            return;
        }
        let pool = Arc::new(current.with_discovered(found, &self.metrics));
        let runtime = Arc::new(old.with_pool(Arc::clone(&pool)));
        let diff = diff_backends(&old, &runtime);
        self.routing.store(runtime);
        current.stop.cancel();
        self.start(&pool);
        let removed: Vec<String> = diff
            .removed
            .iter()
            .map(|r| format!("{}/{}", r.backend.pool, r.backend.id))
            .collect();
        tracing::info!(
            pool = %pool.config.name,
            added = ?diff.added,
            removed = ?removed,
            "dns discovery changed the pool's backends"
        );
        for gone in diff.removed {
            self.retire(gone);
        }
    }

    /// Drains a removed backend; once its last connection is gone, its
    /// labelled series go too.
    pub(super) fn retire(&self, gone: Removed) {
        let Removed {
            backend,
            drain_window,
            close_timeout,
        } = gone;
        crate::drain::drain_backend(&self.lifecycle, &backend, drain_window);
        let shutdown = self.lifecycle.shutdown.clone();
        tokio::spawn(async move {
            let deadline =
                tokio::time::Instant::now() + drain_window + close_timeout + Duration::from_secs(5);
            while backend.live_connections() > 0 && tokio::time::Instant::now() < deadline {
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_millis(250)) => {}
                    _ = shutdown.cancelled() => return,
                }
            }
            backend.forget_metrics();
        });
    }
}

impl dns::Apply for PoolRunner {
    async fn apply(&self, asked: &Arc<Pool>, found: Discovered) {
        self.apply_discovered(asked, found).await;
    }
}
