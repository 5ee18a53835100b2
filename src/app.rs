//! The running proxy: binds every socket up front (so callers learn the real
//! addresses, port 0 included), then runs accept loops until the shutdown
//! future resolves, then drains with a deadline.
//!
//! Shutdown: the token is cancelled; accept loops stop; HTTP connections
//! finish their in-flight request; every WebSocket relay sends Close 1001,
//! the closes spread over `shutdown_window`; `run` returns once all tracked
//! tasks are done, or after the window plus the longest `close_timeout`.

use std::collections::HashMap;
use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use arc_swap::ArcSwap;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::Config;
use crate::listener::{accept_loop, BoundListener, ListenerSpec};
use crate::metrics::{Metrics, MetricsError};
use crate::routing::Runtime;

#[derive(Debug, thiserror::Error)]
pub enum AppError {
    #[error("cannot bind listener {name:?} on {addr}: {source}")]
    Bind {
        name: String,
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error(transparent)]
    Metrics(#[from] MetricsError),
}

/// State every task shares.
pub struct Shared {
    /// The routing table in force; replaced whole on reload.
    pub live: ArcSwap<Runtime>,
    pub metrics: Metrics,
    /// Cancelled when berth starts shutting down.
    pub shutdown: CancellationToken,
    pub shutdown_window: Duration,
    /// Every connection and relay task, so shutdown can wait for them.
    pub tracker: TaskTracker,
    /// Accept loops (listeners come and go with reloads).
    pub accept_loops: TaskTracker,
    /// Listeners accepting now.
    pub listeners: Mutex<Vec<RunningListener>>,
    /// One reload at a time.
    pub reload_lock: tokio::sync::Mutex<()>,
    /// Live WebSocket connections across all pools.
    pub ws_live: AtomicU64,
    /// Live relays, for drains and shutdown.
    pub registry: crate::drain::Registry,
    /// True once listeners are bound; false again while shutting down.
    pub ready: AtomicBool,
    /// The file reloads re-read, if any.
    pub config_path: Option<PathBuf>,
}

/// A listener that is accepting: its spec and addresses.
pub struct RunningListener {
    pub spec: Arc<ListenerSpec>,
    pub bind: SocketAddr,
    pub addr: SocketAddr,
}

pub struct App {
    shared: Arc<Shared>,
    pending: Vec<BoundListener>,
    admin: Option<(TcpListener, SocketAddr)>,
}

impl App {
    /// Binds every listener and the admin socket.
    pub async fn bind(config: Config) -> Result<App, AppError> {
        let metrics = Metrics::new()?;
        let config = Arc::new(config);
        let mut pending = Vec::new();
        for lc in &config.listeners {
            let bound = BoundListener::bind(lc).map_err(|source| AppError::Bind {
                name: lc.name.clone(),
                addr: lc.bind,
                source,
            })?;
            metrics
                .connections_active
                .with_label_values(&[&lc.name])
                .set(0);
            pending.push(bound);
        }
        let admin = match &config.admin {
            Some(ac) => {
                let bind_err = |source| AppError::Bind {
                    name: "admin".into(),
                    addr: ac.bind,
                    source,
                };
                let l = TcpListener::bind(ac.bind).await.map_err(bind_err)?;
                let addr = l.local_addr().map_err(bind_err)?;
                Some((l, addr))
            }
            None => None,
        };
        metrics.config_reloads.with_label_values(&["success"]);
        metrics.config_reloads.with_label_values(&["failure"]);
        metrics.config_last_reload_success.set(unix_now());
        let runtime = Runtime::new(Arc::clone(&config), &metrics, None);
        let shared = Arc::new(Shared {
            live: ArcSwap::from_pointee(runtime),
            metrics,
            shutdown: CancellationToken::new(),
            shutdown_window: config.shutdown_window,
            tracker: TaskTracker::new(),
            accept_loops: TaskTracker::new(),
            listeners: Mutex::new(Vec::new()),
            ws_live: AtomicU64::new(0),
            registry: crate::drain::Registry::default(),
            ready: AtomicBool::new(false),
            config_path: config.source.clone(),
            reload_lock: tokio::sync::Mutex::new(()),
        });
        Ok(App {
            shared,
            pending,
            admin,
        })
    }

    /// The address a listener is bound to, by name.
    pub fn listener_addr(&self, name: &str) -> Option<SocketAddr> {
        self.pending
            .iter()
            .find(|b| &*b.spec.name == name)
            .map(|b| b.addr)
    }

    /// Every listener's name and bound address.
    pub fn listener_addrs(&self) -> HashMap<String, SocketAddr> {
        self.pending
            .iter()
            .map(|b| (b.spec.name.to_string(), b.addr))
            .collect()
    }

    pub fn admin_addr(&self) -> Option<SocketAddr> {
        self.admin.as_ref().map(|(_, addr)| *addr)
    }

    pub fn shared(&self) -> Arc<Shared> {
        Arc::clone(&self.shared)
    }

    /// Serves until `shutdown` resolves, then drains.
    pub async fn run(self, shutdown: impl Future<Output = ()>) {
        let shared = self.shared;
        for bound in self.pending {
            shared.start_listener(bound);
        }
        for pool in shared.live.load().pools.values() {
            crate::balancer::health::start(pool, &shared.metrics, &shared.shutdown);
        }
        let admin_task = self.admin.map(|(listener, addr)| {
            tracing::info!(%addr, "admin API listening");
            tokio::spawn(crate::admin::serve(listener, Arc::clone(&shared)))
        });
        shared.ready.store(true, Ordering::Release);

        shutdown.await;
        shared.ready.store(false, Ordering::Release);
        let live = shared.ws_live.load(Ordering::Relaxed);
        tracing::info!(websocket_connections = live, window = ?shared.shutdown_window, "shutting down");
        shared.shutdown.cancel();
        crate::drain::shut_down_all(&shared.registry, shared.shutdown_window);
        shared.accept_loops.close();
        shared.accept_loops.wait().await;
        shared.tracker.close();
        let close_timeout = shared
            .live
            .load()
            .config
            .pools
            .values()
            .map(|p| p.close_timeout)
            .max()
            .unwrap_or(Duration::from_secs(5));
        let deadline = shared.shutdown_window + close_timeout + Duration::from_secs(1);
        if tokio::time::timeout(deadline, shared.tracker.wait())
            .await
            .is_err()
        {
            tracing::warn!(
                remaining = shared.tracker.len(),
                "drain deadline passed; exiting with connections open"
            );
        }
        if let Some(task) = admin_task {
            task.abort();
        }
        tracing::info!("stopped");
    }
}

impl Shared {
    /// Starts accepting on a bound listener and records it.
    pub fn start_listener(self: &Arc<Self>, bound: BoundListener) {
        let settings = bound.spec.settings.load();
        tracing::info!(listener = %bound.spec.name, addr = %bound.addr, tls = settings.tls.is_some(), "listening");
        drop(settings);
        let entry = RunningListener {
            spec: Arc::clone(&bound.spec),
            bind: bound.bind,
            addr: bound.addr,
        };
        self.accept_loops
            .spawn(accept_loop(bound.socket, bound.spec, Arc::clone(self)));
        match self.listeners.lock() {
            Ok(mut l) => l.push(entry),
            Err(poisoned) => poisoned.into_inner().push(entry),
        }
    }

    /// The listeners currently accepting, by name and address.
    pub fn listener_addrs(&self) -> HashMap<String, SocketAddr> {
        let guard = match self.listeners.lock() {
            Ok(g) => g,
            Err(poisoned) => poisoned.into_inner(),
        };
        guard
            .iter()
            .map(|l| (l.spec.name.to_string(), l.addr))
            .collect()
    }
}

/// Seconds since the Unix epoch, for timestamp gauges.
pub fn unix_now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}
