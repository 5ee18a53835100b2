//! Reload: read the file, validate it fully, then swap. An invalid file is
//! rejected with the same messages as `berth check` and the running config
//! stays in force.
//!
//! What a valid file changes:
//! - listeners with the same name and bind keep their sockets (their TLS
//!   certificate and timeouts are swapped in place); new or rebound ones are
//!   bound first (a bind failure aborts the whole reload), then removed ones
//!   stop accepting (their open connections carry on);
//! - backends with the same pool, id and address keep their live
//!   connections, counts and state; a new weight applies at once;
//! - backends that disappeared are drained: no new connections, and their
//!   WebSockets get Close 1012 spread over the pool's drain window.

use std::sync::Arc;
use std::time::Duration;

use crate::app::{unix_now, Shared};
use crate::balancer::Backend;
use crate::config::{Config, ConfigError};
use crate::listener::{BoundListener, ListenerSettings};
use crate::routing::Runtime;

#[derive(Debug, thiserror::Error)]
pub enum ReloadError {
    #[error("berth was started without a config file; nothing to reload")]
    NoFile,
    #[error("{0}")]
    Config(#[from] ConfigError),
    #[error("cannot bind listener {name:?} on {addr}: {source}")]
    Bind {
        name: String,
        addr: std::net::SocketAddr,
        source: std::io::Error,
    },
}

/// What a successful reload changed.
#[derive(Debug, Default, serde::Serialize)]
pub struct ReloadSummary {
    pub listeners_added: Vec<String>,
    pub listeners_removed: Vec<String>,
    pub backends_added: Vec<String>,
    pub backends_removed: Vec<String>,
}

/// Re-reads the config file and applies it; counts the result.
pub async fn reload(shared: &Arc<Shared>) -> Result<ReloadSummary, ReloadError> {
    let _one_at_a_time = shared.reload_lock.lock().await;
    let result = match &shared.config_path {
        None => Err(ReloadError::NoFile),
        Some(path) => match Config::load(path) {
            Ok(config) => apply(shared, config),
            Err(e) => Err(e.into()),
        },
    };
    match &result {
        Ok(summary) => {
            shared
                .metrics
                .config_reloads
                .with_label_values(&["success"])
                .inc();
            shared.metrics.config_last_reload_success.set(unix_now());
            tracing::info!(?summary, "config reloaded");
        }
        Err(e) => {
            shared
                .metrics
                .config_reloads
                .with_label_values(&["failure"])
                .inc();
            tracing::error!(error = %e, "config reload rejected; the running config stays in force");
        }
    }
    result
}

/// Swaps in an already validated config.
pub fn apply(shared: &Arc<Shared>, mut config: Config) -> Result<ReloadSummary, ReloadError> {
    let mut summary = ReloadSummary::default();
    if config.source.is_none() {
        config.source.clone_from(&shared.config_path);
    }

    // 1. Listeners: bind everything new before changing anything.
    let mut to_bind = Vec::new();
    let mut keep = Vec::new();
    {
        let running = match shared.listeners.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        };
        for lc in &config.listeners {
            match running
                .iter()
                .find(|r| *r.spec.name == *lc.name && r.bind == lc.bind)
            {
                Some(r) => keep.push((Arc::clone(&r.spec), ListenerSettings::from_config(lc))),
                None => to_bind.push(lc),
            }
        }
    }
    let mut bound = Vec::new();
    for lc in to_bind {
        let b = BoundListener::bind(lc).map_err(|source| ReloadError::Bind {
            name: lc.name.clone(),
            addr: lc.bind,
            source,
        })?;
        bound.push(b);
    }
    for (spec, settings) in keep {
        spec.settings.store(Arc::new(settings));
    }
    {
        let mut running = match shared.listeners.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        };
        running.retain(|r| {
            let stays = config
                .listeners
                .iter()
                .any(|lc| *r.spec.name == *lc.name && r.bind == lc.bind);
            if !stays {
                r.spec.stop.cancel();
                summary.listeners_removed.push(r.spec.name.to_string());
            }
            stays
        });
    }
    for b in bound {
        summary.listeners_added.push(b.spec.name.to_string());
        shared
            .metrics
            .connections_active
            .with_label_values(&[&b.spec.name])
            .add(0);
        shared.start_listener(b);
    }

    // 2. Pools and backends.
    let old = shared.live.load_full();
    let runtime = Runtime::new(Arc::new(config), &shared.metrics, Some(&old));
    let mut removed: Vec<(Arc<Backend>, Duration, Duration)> = Vec::new();
    for (name, pool) in &old.pools {
        for b in &pool.backends {
            let still = runtime
                .pools
                .get(name)
                .and_then(|p| p.find(&b.id))
                .is_some_and(|nb| Arc::ptr_eq(nb, b));
            if !still {
                removed.push((
                    Arc::clone(b),
                    pool.config.drain_window,
                    pool.config.close_timeout,
                ));
            }
        }
    }
    for (name, pool) in &runtime.pools {
        for b in &pool.backends {
            let existed = old
                .pools
                .get(name)
                .and_then(|p| p.find(&b.id))
                .is_some_and(|ob| Arc::ptr_eq(ob, b));
            if !existed {
                summary.backends_added.push(format!("{name}/{}", b.id));
            }
        }
    }
    let runtime = Arc::new(runtime);
    shared.live.store(Arc::clone(&runtime));
    for pool in old.pools.values() {
        pool.stop.cancel();
    }
    for pool in runtime.pools.values() {
        crate::balancer::health::start(pool, &shared.metrics, &shared.shutdown);
    }
    for (backend, window, close_timeout) in removed {
        summary
            .backends_removed
            .push(format!("{}/{}", backend.pool, backend.id));
        crate::drain::drain_backend(&shared.registry, &backend, window, &shared.shutdown);
        // Once its last connection is gone, its labelled series go too.
        let shared2 = Arc::clone(shared);
        tokio::spawn(async move {
            let deadline =
                tokio::time::Instant::now() + window + close_timeout + Duration::from_secs(5);
            while backend.live_connections() > 0 && tokio::time::Instant::now() < deadline {
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_millis(250)) => {}
                    _ = shared2.shutdown.cancelled() => return,
                }
            }
            backend.forget_metrics();
        });
    }
    Ok(summary)
}
