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
//!
//! - a backend whose entry says `drain = true` is drained (once: an admin
//!   drain already in force stays the one), and one whose entry no longer
//!   says so has the config's drain lifted (an admin drain stays);
//! - the addresses a pool's DNS discovery found are kept (`pools.rs`), so
//!   a reload never drops discovered backends.
//!
//! [`ReloadContext`] is what a reload may touch: the routing table, the
//! listeners, the lifecycle and the metrics. A reload starts the new pools'
//! tasks ([`PoolRunner`]: health checks, JWKS refresh, rebalance, DNS
//! discovery), a drain task per removed backend, and a task per removed
//! backend that forgets its metric series once its last connection is gone
//! (or at shutdown). DNS discovery swaps one pool at a time through the
//! same lock as reloads (`dns.rs`, `pools.rs`).
//!
//! `watch` is `berth run --watch`: it polls the config file and reloads
//! when it changes.
//!
//! Every reload's outcome is kept as the [`LastReload`] (the status page
//! shows it), and what it changed is described in plain words
//! (`changes.rs`) for the log line and the admin API's answer.

mod changes;
mod dns;
mod pools;
pub mod watch;

pub use changes::BackendChange;
pub use pools::PoolRunner;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::balancer::Backend;
use crate::config::{Config, ConfigError, ListenerConfig};
use crate::lifecycle::Lifecycle;
use crate::listener::{BoundListener, ListenerContext, ListenerSettings};
use crate::metrics::Metrics;
use crate::routing::{Routing, Runtime};

#[derive(Debug, thiserror::Error)]
pub enum ReloadError {
    #[error("berth was started without a config file; nothing to reload")]
    NoFile,
    #[error("{0}")]
    Config(#[from] ConfigError),
    #[error("cannot bind listener {name:?} on {addr}: {source}")]
    Bind {
        name: String,
        addr: SocketAddr,
        source: std::io::Error,
    },
}

/// What a successful reload changed.
#[derive(Debug, Default, serde::Serialize)]
pub struct ReloadSummary {
    pub listeners_added: Vec<String>,
    pub listeners_removed: Vec<String>,
    /// `pool/id`.
    pub backends_added: Vec<String>,
    /// `pool/id`; these are drained.
    pub backends_removed: Vec<String>,
    /// Weight and `max_connections` changes of backends that stayed.
    pub backends_changed: Vec<BackendChange>,
    /// Every other change (settings, routes, pools), in plain words.
    pub settings_changed: Vec<String>,
}

impl ReloadSummary {
    /// Every change, one plain sentence each, in a fixed order: listeners,
    /// backends, then settings.
    pub fn in_words(&self) -> Vec<String> {
        let mut out = Vec::new();
        let named = |out: &mut Vec<String>, what: &str, list: &[String], how: &str| {
            out.extend(list.iter().map(|n| format!("{what} {n} {how}")));
        };
        named(&mut out, "listener", &self.listeners_added, "added");
        named(&mut out, "listener", &self.listeners_removed, "removed");
        named(&mut out, "backend", &self.backends_added, "added");
        named(
            &mut out,
            "backend",
            &self.backends_removed,
            "removed (draining)",
        );
        out.extend(self.backends_changed.iter().map(ToString::to_string));
        out.extend(self.settings_changed.iter().cloned());
        out
    }
}

/// The outcome of the last config load: the one at startup, or the last
/// reload (by SIGHUP or the admin API).
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct LastReload {
    /// Unix time, seconds.
    pub time: f64,
    /// `success` or `failure`.
    pub result: &'static str,
    /// True for the load at startup.
    pub initial: bool,
    /// What changed, in plain words (a success).
    pub changes: Vec<String>,
    /// Why the file was rejected, one message per line (a failure).
    pub messages: Vec<String>,
}

/// What a reload may touch.
pub struct ReloadContext {
    pub routing: Arc<Routing>,
    pub listeners: Arc<ListenerContext>,
    pub lifecycle: Arc<Lifecycle>,
    pub metrics: Metrics,
    /// The file reloads re-read, if any.
    pub config_path: Option<PathBuf>,
    /// Starts each pool's tasks; shares the lock below with DNS discovery.
    pub pools: PoolRunner,
    /// One change of the routing table at a time (a reload or a DNS answer).
    lock: Arc<tokio::sync::Mutex<()>>,
    last: Mutex<LastReload>,
}

/// Seconds since the Unix epoch, for timestamp gauges.
pub fn unix_now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

impl ReloadContext {
    pub fn new(
        routing: Arc<Routing>,
        listeners: Arc<ListenerContext>,
        lifecycle: Arc<Lifecycle>,
        metrics: Metrics,
        config_path: Option<PathBuf>,
    ) -> ReloadContext {
        let lock = Arc::new(tokio::sync::Mutex::new(()));
        ReloadContext {
            pools: PoolRunner {
                routing: Arc::clone(&routing),
                lifecycle: Arc::clone(&lifecycle),
                metrics: metrics.clone(),
                lock: Arc::clone(&lock),
            },
            routing,
            listeners,
            lifecycle,
            metrics,
            config_path,
            lock,
            last: Mutex::new(LastReload {
                time: unix_now(),
                result: "success",
                initial: true,
                changes: Vec::new(),
                messages: Vec::new(),
            }),
        }
    }

    fn last(&self) -> MutexGuard<'_, LastReload> {
        match self.last.lock() {
            Ok(g) => g,
            Err(poisoned) => poisoned.into_inner(),
        }
    }

    /// The outcome of the last load (the startup load until a reload runs).
    pub fn last_reload(&self) -> LastReload {
        self.last().clone()
    }

    /// Re-reads the config file and applies it; counts the result.
    pub async fn reload(&self) -> Result<ReloadSummary, ReloadError> {
        let _one_at_a_time = self.lock.lock().await;
        let result = match &self.config_path {
            None => Err(ReloadError::NoFile),
            Some(path) => match Config::load_async(path.clone()).await {
                Ok(config) => self.apply(config),
                Err(e) => Err(e.into()),
            },
        };
        let label = if result.is_ok() { "success" } else { "failure" };
        self.metrics
            .config_reloads
            .with_label_values(&[label])
            .inc();
        let record = match &result {
            Ok(summary) => {
                self.metrics.config_last_reload_success.set(unix_now());
                let words = summary.in_words();
                if words.is_empty() {
                    tracing::info!("config reloaded: nothing changed");
                } else {
                    tracing::info!("config reloaded: {}", words.join("; "));
                }
                LastReload {
                    time: unix_now(),
                    result: "success",
                    initial: false,
                    changes: words,
                    messages: Vec::new(),
                }
            }
            Err(e) => {
                tracing::error!(error = %e, "config reload rejected; the running config stays in force");
                LastReload {
                    time: unix_now(),
                    result: "failure",
                    initial: false,
                    changes: Vec::new(),
                    messages: e.to_string().lines().map(str::to_string).collect(),
                }
            }
        };
        *self.last() = record;
        result
    }

    /// Swaps in an already validated config.
    pub fn apply(&self, mut config: Config) -> Result<ReloadSummary, ReloadError> {
        if config.source.is_none() {
            config.source.clone_from(&self.config_path);
        }
        let old = Arc::clone(&self.routing.load().config);
        let (listeners_added, listeners_removed) = self.apply_listeners(&config.listeners)?;
        let backends_changed = changes::backend_changes(&old, &config);
        let settings_changed = changes::setting_changes(&old, &config);
        let (mut backends_added, mut backends_removed) = self.apply_pools(config);
        backends_added.sort();
        backends_removed.sort();
        Ok(ReloadSummary {
            listeners_added,
            listeners_removed,
            backends_added,
            backends_removed,
            backends_changed,
            settings_changed,
        })
    }

    /// Binds every new listener before changing anything (a bind failure
    /// aborts the reload), swaps the kept ones' settings, stops the removed
    /// ones and starts the new. Returns (added, removed) names.
    fn apply_listeners(
        &self,
        wanted: &[ListenerConfig],
    ) -> Result<(Vec<String>, Vec<String>), ReloadError> {
        let running = self.listeners.snapshot();
        let keys: Vec<(&str, SocketAddr)> = running
            .iter()
            .map(|(spec, bind)| (&*spec.name, *bind))
            .collect();
        let plan = plan_listeners(&keys, wanted);
        let mut bound = Vec::new();
        for lc in plan.bind.iter().map(|&i| &wanted[i]) {
            let b = BoundListener::bind(lc).map_err(|source| ReloadError::Bind {
                name: lc.name.clone(),
                addr: lc.bind,
                source,
            })?;
            bound.push(b);
        }
        for &(r, w) in &plan.keep {
            let settings = ListenerSettings::from_config(&wanted[w]);
            running[r].0.settings.store(Arc::new(settings));
        }
        let gone: Vec<_> = plan.remove.iter().map(|&r| &running[r].0).collect();
        let removed = self.listeners.stop(&gone);
        let mut added = Vec::new();
        for b in bound {
            added.push(b.spec.name.to_string());
            self.listeners.start(b);
        }
        Ok((added, removed))
    }

    /// Builds the new routing table (keeping the backends that stay), puts
    /// it in force, moves the pools' tasks over, brings the config's drains
    /// in line and drains the backends that went away. Returns (added,
    /// removed) as `pool/id`.
    fn apply_pools(&self, config: Config) -> (Vec<String>, Vec<String>) {
        let old = self.routing.load_full();
        let runtime = Arc::new(Runtime::new(Arc::new(config), &self.metrics, Some(&old)));
        let diff = diff_backends(&old, &runtime);
        self.routing.store(Arc::clone(&runtime));
        for pool in old.pools.values() {
            pool.stop.cancel();
        }
        for pool in runtime.pools.values() {
            self.pools.start(pool);
        }
        crate::drain::apply_config_drains(&self.lifecycle, &runtime);
        let mut removed = Vec::new();
        for gone in diff.removed {
            removed.push(format!("{}/{}", gone.backend.pool, gone.backend.id));
            self.pools.retire(gone);
        }
        (diff.added, removed)
    }
}

/// What a reload does with the listeners, as indexes: into the running
/// list (`keep.0`, `remove`) and into the wanted configs (`keep.1`, `bind`).
#[derive(Debug, Default, PartialEq, Eq)]
pub struct ListenerPlan {
    /// Same name and configured bind: the socket stays, settings swap.
    pub keep: Vec<(usize, usize)>,
    /// New, or same name on another bind: bound fresh.
    pub bind: Vec<usize>,
    /// No longer wanted at that name and bind: stops accepting.
    pub remove: Vec<usize>,
}

/// Compares the running listeners (name, configured bind) with the wanted ones.
pub fn plan_listeners(running: &[(&str, SocketAddr)], wanted: &[ListenerConfig]) -> ListenerPlan {
    let same = |r: &(&str, SocketAddr), lc: &ListenerConfig| r.0 == lc.name && r.1 == lc.bind;
    let mut plan = ListenerPlan::default();
    for (w, lc) in wanted.iter().enumerate() {
        match running.iter().position(|r| same(r, lc)) {
            Some(r) => plan.keep.push((r, w)),
            None => plan.bind.push(w),
        }
    }
    for (r, key) in running.iter().enumerate() {
        if !wanted.iter().any(|lc| same(key, lc)) {
            plan.remove.push(r);
        }
    }
    plan
}

/// A backend the new table no longer has (or has at another address),
/// with the timings of the pool it was in.
pub struct Removed {
    pub backend: Arc<Backend>,
    pub drain_window: Duration,
    pub close_timeout: Duration,
}

/// How the backends differ between two routing tables.
pub struct BackendDiff {
    /// `pool/id` of backends new in `new` (a changed address counts as new).
    pub added: Vec<String>,
    pub removed: Vec<Removed>,
}

/// Compares two tables by backend identity: `Runtime::new` keeps a
/// backend (the same `Arc`) when its pool, id and address stay.
pub fn diff_backends(old: &Runtime, new: &Runtime) -> BackendDiff {
    let kept = |from: &Runtime, pool: &str, b: &Arc<Backend>| {
        from.pools
            .get(pool)
            .and_then(|p| p.find(&b.id))
            .is_some_and(|other| Arc::ptr_eq(other, b))
    };
    let mut removed = Vec::new();
    for (name, pool) in &old.pools {
        for b in pool.backends.iter().filter(|b| !kept(new, name, b)) {
            removed.push(Removed {
                backend: Arc::clone(b),
                drain_window: pool.config.drain_window,
                close_timeout: pool.config.close_timeout,
            });
        }
    }
    let mut added = Vec::new();
    for (name, pool) in &new.pools {
        for b in pool.backends.iter().filter(|b| !kept(old, name, b)) {
            added.push(format!("{name}/{}", b.id));
        }
    }
    BackendDiff { added, removed }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::balancer::BackendState;
    use crate::proxy::testing;

    /// Listeners `(name, bind)` and pools `(pool, id, port)` as a config.
    fn toml(listeners: &[(&str, &str)], backends: &[(&str, &str, u16)]) -> String {
        let mut s = String::new();
        for (name, bind) in listeners {
            s.push_str(&format!(
                "[[listeners]]\nname = \"{name}\"\nbind = \"{bind}\"\n\n"
            ));
        }
        let mut pools: Vec<&str> = backends.iter().map(|b| b.0).collect();
        pools.dedup();
        for pool in &pools {
            s.push_str(&format!(
                "[[routes]]\npath_prefix = \"/{pool}\"\npool = \"{pool}\"\n\n"
            ));
        }
        for (pool, id, port) in backends {
            s.push_str(&format!(
                "[[pools.{pool}.backends]]\nid = \"{id}\"\naddress = \"127.0.0.1:{port}\"\n\n"
            ));
        }
        s
    }

    #[test]
    fn listener_plan_keeps_binds_and_rebinds_moves() {
        let wanted = testing::config(&toml(
            &[
                ("a", "127.0.0.1:8080"),
                ("b", "127.0.0.1:9081"),
                ("d", "127.0.0.1:8083"),
            ],
            &[("p", "x", 1)],
        ))
        .listeners;
        let addr = |s: &str| s.parse::<SocketAddr>().unwrap();
        let running = [
            ("a", addr("127.0.0.1:8080")),
            ("b", addr("127.0.0.1:8081")),
            ("c", addr("127.0.0.1:8082")),
        ];
        let names = |idx: &[usize], from: &dyn Fn(usize) -> String| -> Vec<String> {
            idx.iter().map(|&i| from(i)).collect()
        };
        let plan = plan_listeners(&running, &wanted);
        assert_eq!(plan.keep, vec![(0, 0)]);
        assert_eq!(names(&plan.bind, &|i| wanted[i].name.clone()), ["b", "d"]);
        assert_eq!(
            names(&plan.remove, &|i| running[i].0.to_string()),
            ["b", "c"]
        );
        // The same set again changes nothing.
        let same: Vec<(&str, SocketAddr)> =
            wanted.iter().map(|l| (l.name.as_str(), l.bind)).collect();
        let plan = plan_listeners(&same, &wanted);
        assert_eq!(plan.keep, vec![(0, 0), (1, 1), (2, 2)]);
        assert!(plan.bind.is_empty() && plan.remove.is_empty());
    }

    #[test]
    fn backend_diff_is_by_pool_id_and_address() {
        let metrics = Metrics::new().unwrap();
        let public = [("public", "127.0.0.1:0")];
        let old = testing::config(&toml(
            &public,
            &[
                ("chat", "b1", 9001),
                ("chat", "b2", 9002),
                ("api", "a1", 9101),
            ],
        ));
        let new = testing::config(&toml(
            &public,
            // b1 moves, b2 stays, b3 and the pool `feed` are new, `api` goes.
            &[
                ("chat", "b1", 9011),
                ("chat", "b2", 9002),
                ("chat", "b3", 9003),
                ("feed", "f1", 9201),
            ],
        ));
        let old = Runtime::new(Arc::new(old), &metrics, None);
        let new = Runtime::new(Arc::new(new), &metrics, Some(&old));
        let diff = diff_backends(&old, &new);
        let mut added = diff.added.clone();
        added.sort();
        assert_eq!(added, ["chat/b1", "chat/b3", "feed/f1"]);
        let mut removed: Vec<String> = diff
            .removed
            .iter()
            .map(|r| format!("{}/{} {}", r.backend.pool, r.backend.id, r.backend.address))
            .collect();
        removed.sort();
        assert_eq!(removed, ["api/a1 127.0.0.1:9101", "chat/b1 127.0.0.1:9001"]);
        // The backend that stayed is the same one, live counts and all.
        assert!(Arc::ptr_eq(
            old.pools["chat"].find("b2").unwrap(),
            new.pools["chat"].find("b2").unwrap()
        ));
    }

    /// A reload context for `text` with its listeners running.
    fn running(text: &str) -> ReloadContext {
        let proxy = testing::context(text);
        let listeners = Arc::new(ListenerContext::new(Arc::clone(&proxy)));
        for lc in &proxy.routing.load().config.listeners {
            listeners.start(BoundListener::bind(lc).unwrap());
        }
        ReloadContext::new(
            Arc::clone(&proxy.routing),
            listeners,
            Arc::clone(&proxy.lifecycle),
            proxy.metrics.clone(),
            None,
        )
    }

    fn sorted(mut v: Vec<String>) -> Vec<String> {
        v.sort();
        v
    }

    #[tokio::test]
    async fn apply_swaps_listeners_and_pools() {
        let ctx = running(&toml(
            &[("a", "127.0.0.1:0"), ("b", "127.0.0.1:0")],
            &[("chat", "b1", 9001), ("chat", "b2", 9002)],
        ));
        let a_addr = ctx.listeners.addrs()["a"];
        let old_b2 = Arc::clone(ctx.routing.load().pools["chat"].find("b2").unwrap());
        let old_b1 = Arc::clone(ctx.routing.load().pools["chat"].find("b1").unwrap());
        let next = testing::config(&toml(
            &[("a", "127.0.0.1:0"), ("c", "127.0.0.1:0")],
            &[("chat", "b2", 9002), ("chat", "b3", 9003)],
        ));
        let summary = ctx.apply(next).unwrap();
        assert_eq!(summary.listeners_added, ["c"]);
        assert_eq!(summary.listeners_removed, ["b"]);
        assert_eq!(summary.backends_added, ["chat/b3"]);
        assert_eq!(summary.backends_removed, ["chat/b1"]);
        assert_eq!(
            summary.in_words(),
            [
                "listener c added",
                "listener b removed",
                "backend chat/b3 added",
                "backend chat/b1 removed (draining)",
            ]
        );
        // `a` kept its socket; `b` is gone and `c` is accepting.
        let addrs = ctx.listeners.addrs();
        assert_eq!(sorted(addrs.keys().cloned().collect()), ["a", "c"]);
        assert_eq!(addrs["a"], a_addr);
        tokio::net::TcpStream::connect(addrs["c"]).await.unwrap();
        // The new table is in force, b2 carried over, b1 draining.
        let table = ctx.routing.load();
        assert!(Arc::ptr_eq(
            table.pools["chat"].find("b2").unwrap(),
            &old_b2
        ));
        assert!(table.pools["chat"].find("b1").is_none());
        assert_eq!(old_b1.state(), BackendState::Draining);
    }

    #[tokio::test]
    async fn a_bind_failure_changes_nothing() {
        let ctx = running(&toml(&[("a", "127.0.0.1:0")], &[("chat", "b1", 9001)]));
        let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let taken_addr = taken.local_addr().unwrap().to_string();
        let next = testing::config(&toml(&[("z", &taken_addr)], &[("chat", "b9", 9009)]));
        let err = ctx.apply(next).err().unwrap();
        assert!(
            matches!(&err, ReloadError::Bind { name, .. } if name == "z"),
            "{err}"
        );
        assert_eq!(sorted(ctx.listeners.addrs().into_keys().collect()), ["a"]);
        assert!(ctx.routing.load().pools["chat"].find("b1").is_some());
    }

    #[tokio::test]
    async fn reload_reads_the_file_and_counts_the_result() {
        let text = toml(&[("a", "127.0.0.1:0")], &[("chat", "b1", 9001)]);
        let mut ctx = running(&text);
        let count = |ctx: &ReloadContext, result: &str| {
            ctx.metrics
                .config_reloads
                .with_label_values(&[result])
                .get()
        };
        assert!(matches!(ctx.reload().await, Err(ReloadError::NoFile)));
        assert_eq!(count(&ctx, "failure"), 1);

        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("berth.toml");
        ctx.config_path = Some(path.clone());
        std::fs::write(
            &path,
            text.replace("[[pools.chat.backends]]", "[[pools.chat.backendz]]"),
        )
        .unwrap();
        let err = ctx.reload().await.err().unwrap();
        assert!(matches!(err, ReloadError::Config(_)), "{err}");
        assert!(err.to_string().contains("berth.toml:"), "{err}");
        assert_eq!(count(&ctx, "failure"), 2);
        // The failure is kept, one validation message per line.
        let last = ctx.last_reload();
        assert_eq!((last.result, last.initial), ("failure", false));
        assert!(!last.messages.is_empty());
        assert_eq!(last.messages.join("\n"), err.to_string());
        assert!(ctx.routing.load().pools["chat"].find("b1").is_some());

        std::fs::write(&path, text.replace("\"b1\"", "\"b2\"")).unwrap();
        let summary = ctx.reload().await.unwrap();
        assert_eq!(summary.backends_added, ["chat/b2"]);
        assert_eq!(count(&ctx, "success"), 1);
        let last = ctx.last_reload();
        assert_eq!(last.result, "success");
        assert_eq!(
            last.changes,
            [
                "backend chat/b2 added",
                "backend chat/b1 removed (draining)"
            ]
        );
        assert!(last.messages.is_empty());
        assert!(ctx.routing.load().pools["chat"].find("b2").is_some());
        assert_eq!(
            ctx.routing.load().config.source.as_deref(),
            Some(path.as_path())
        );
    }
}
