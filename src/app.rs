//! The wiring module: binds every socket up front (so callers learn the
//! real addresses, port 0 included), builds each layer's narrow context,
//! then runs accept loops until the shutdown future resolves, then drains
//! with a deadline. Nothing in the library imports this module; only the
//! binary and the demo do.
//!
//! The contexts it builds, bottom up: one [`Metrics`], one [`Routing`]
//! handle and one [`Lifecycle`] shared by all; the [`ProxyContext`]
//! (routing, metrics, lifecycle); the [`ListenerContext`] (the proxy's plus
//! the running listeners); the [`ReloadContext`] (routing, listeners,
//! lifecycle, metrics, config path); the status [`Sampler`] and its feed;
//! the [`AdminContext`] (routing, metrics, lifecycle, reload, status feed).
//!
//! `run` also starts the descriptor reserve's monitor
//! (`limits::FdGuard::monitor`), which ends with the shutdown token.
//!
//! Shutdown: the token is cancelled; accept loops stop; HTTP connections
//! finish their in-flight request; every WebSocket relay sends Close 1001,
//! the closes spread over `shutdown_window` (the value in force when
//! shutdown starts, so a reload's change applies); once all tracked tasks are done
//! (or after the window plus the longest `close_timeout`), the admin API
//! and the status sampler stop (which ends every event stream), and `run`
//! returns.

use std::collections::HashMap;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::admin::AdminContext;
use crate::config::Config;
use crate::lifecycle::Lifecycle;
use crate::listener::{BoundListener, ListenerContext};
use crate::metrics::{Metrics, MetricsError};
use crate::proxy::ProxyContext;
use crate::reload::{unix_now, ReloadContext};
use crate::routing::{Routing, Runtime};
use crate::status::Sampler;

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

/// A bound, not yet running berth.
pub struct App {
    routing: Arc<Routing>,
    lifecycle: Arc<Lifecycle>,
    listeners: Arc<ListenerContext>,
    reload: Arc<ReloadContext>,
    admin: Option<(TcpListener, SocketAddr, Arc<AdminContext>, Sampler)>,
    pending: Vec<BoundListener>,
}

impl App {
    /// Binds every listener and the admin socket.
    pub async fn bind(config: Config) -> Result<App, AppError> {
        let metrics = Metrics::new()?;
        let mut pending = Vec::new();
        for lc in &config.listeners {
            let bound = BoundListener::bind(lc).map_err(|source| AppError::Bind {
                name: lc.name.clone(),
                addr: lc.bind,
                source,
            })?;
            pending.push(bound);
        }
        let admin_socket = match &config.admin {
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
        // The load at startup counts as a successful config load.
        metrics.config_reloads.with_label_values(&["success"]).inc();
        metrics.config_reloads.with_label_values(&["failure"]);
        metrics.config_last_reload_success.set(unix_now());

        let config_path = config.source.clone();
        let routing = Arc::new(Routing::new(Runtime::new(Arc::new(config), &metrics, None)));
        let lifecycle = Arc::new(Lifecycle::new());
        let proxy = Arc::new(ProxyContext {
            routing: Arc::clone(&routing),
            metrics: metrics.clone(),
            lifecycle: Arc::clone(&lifecycle),
        });
        let listeners = Arc::new(ListenerContext::new(proxy));
        let reload = Arc::new(ReloadContext::new(
            Arc::clone(&routing),
            Arc::clone(&listeners),
            Arc::clone(&lifecycle),
            metrics.clone(),
            config_path,
        ));
        let admin = admin_socket.map(|(l, addr)| {
            let (sampler, status) = Sampler::new(
                Arc::clone(&routing),
                metrics.clone(),
                Arc::clone(&lifecycle),
                Arc::clone(&reload),
            );
            let ctx = Arc::new(AdminContext {
                routing: Arc::clone(&routing),
                metrics,
                lifecycle: Arc::clone(&lifecycle),
                reload: Arc::clone(&reload),
                status,
                event_streams: Default::default(),
            });
            (l, addr, ctx, sampler)
        });
        Ok(App {
            routing,
            lifecycle,
            listeners,
            reload,
            admin,
            pending,
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
        self.admin.as_ref().map(|(_, addr, _, _)| *addr)
    }

    /// The reload handle (for SIGHUP), usable while and after `run` runs.
    pub fn reloader(&self) -> Arc<ReloadContext> {
        Arc::clone(&self.reload)
    }

    /// Serves until `shutdown` resolves, then drains.
    pub async fn run(self, shutdown: impl Future<Output = ()>) {
        let App {
            routing,
            lifecycle,
            listeners,
            reload,
            admin,
            pending,
        } = self;
        // Backends the config drains take no connection, from the first.
        crate::drain::apply_config_drains(&lifecycle, &routing.load());
        for bound in pending {
            listeners.start(bound);
        }
        tokio::spawn(Arc::clone(&listeners.fds).monitor(lifecycle.shutdown.clone()));
        for pool in routing.load().pools.values() {
            reload.pools.start(pool);
        }
        // The admin API and the status sampler outlive the drain (so the
        // status page shows it) and stop together after it.
        let admin_stop = CancellationToken::new();
        let admin_task = admin.map(|(listener, addr, ctx, sampler)| {
            tracing::info!(%addr, "admin API listening");
            tokio::spawn(sampler.run(admin_stop.clone()));
            tokio::spawn(crate::admin::serve(listener, ctx, admin_stop.clone()))
        });
        lifecycle.set_ready(true);

        shutdown.await;
        lifecycle.set_ready(false);
        // Read now, not at start: a reload may have changed the window.
        let shutdown_window = routing.load().config.shutdown_window;
        let live = lifecycle.live_websockets();
        tracing::info!(websocket_connections = live, window = ?shutdown_window, "shutting down");
        lifecycle.shutdown.cancel();
        crate::drain::shut_down_all(&lifecycle, shutdown_window);
        listeners.stopped().await;
        lifecycle.tracker.close();
        let close_timeout = routing
            .load()
            .config
            .pools
            .values()
            .map(|p| p.close_timeout)
            .max()
            .unwrap_or(Duration::from_secs(5));
        let deadline = shutdown_window + close_timeout + Duration::from_secs(1);
        if tokio::time::timeout(deadline, lifecycle.tracker.wait())
            .await
            .is_err()
        {
            tracing::warn!(
                remaining = lifecycle.tracker.len(),
                "drain deadline passed; exiting with connections open"
            );
        }
        admin_stop.cancel();
        if let Some(mut task) = admin_task {
            // `serve` gives its connections CLOSE_GRACE; this bounds it again.
            let limit = crate::admin::CLOSE_GRACE * 2;
            if tokio::time::timeout(limit, &mut task).await.is_err() {
                task.abort();
            }
        }
        tracing::info!("stopped");
    }
}
