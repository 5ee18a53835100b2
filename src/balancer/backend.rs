//! One backend: its address, weight, live counts and state.
//!
//! Counts are atomics so that choosing a backend takes no lock. A connection
//! holds a [`ConnectionGuard`] while it is live; dropping the guard gives the
//! slot back and moves the gauge.

use std::sync::atomic::{AtomicU32, AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Mutex};

use prometheus::IntGauge;
use tokio_util::sync::CancellationToken;

use crate::config::BackendConfig;
use crate::metrics::Metrics;
use crate::ws::relay::RelayCounters;

/// Whether a backend takes new connections.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BackendState {
    Up,
    Down,
    Draining,
}

impl BackendState {
    pub fn as_str(self) -> &'static str {
        match self {
            BackendState::Up => "up",
            BackendState::Down => "down",
            BackendState::Draining => "draining",
        }
    }

    fn from_u8(v: u8) -> BackendState {
        match v {
            1 => BackendState::Down,
            2 => BackendState::Draining,
            _ => BackendState::Up,
        }
    }

    fn as_u8(self) -> u8 {
        match self {
            BackendState::Up => 0,
            BackendState::Down => 1,
            BackendState::Draining => 2,
        }
    }
}

pub struct Backend {
    pub pool: String,
    pub id: String,
    pub address: String,
    weight: AtomicU32,
    live_ws: AtomicU64,
    inflight_http: AtomicU64,
    state: AtomicU8,
    /// Hands out drain slots so closes spread across the drain window.
    drain_ticket: AtomicU64,
    /// Cancelled when the backend is drained or removed: its WebSocket
    /// connections then close with 1012 across the pool's drain window. An
    /// undrain puts a fresh token in place for new connections.
    drain: Mutex<CancellationToken>,
    /// Counter handles for the relay, resolved once.
    pub counters: RelayCounters,
    live_gauge: IntGauge,
    metrics: Metrics,
}

impl std::fmt::Debug for Backend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Backend")
            .field("pool", &self.pool)
            .field("id", &self.id)
            .field("address", &self.address)
            .field("state", &self.state())
            .finish()
    }
}

impl Backend {
    pub fn new(pool: &str, config: &BackendConfig, metrics: &Metrics) -> Arc<Backend> {
        let backend = Backend {
            pool: pool.to_string(),
            id: config.id.clone(),
            address: config.address.clone(),
            weight: AtomicU32::new(config.weight.max(1)),
            live_ws: AtomicU64::new(0),
            inflight_http: AtomicU64::new(0),
            state: AtomicU8::new(BackendState::Up.as_u8()),
            drain_ticket: AtomicU64::new(0),
            drain: Mutex::new(CancellationToken::new()),
            counters: metrics.relay_counters(pool, &config.id),
            live_gauge: metrics
                .ws_connections_active
                .with_label_values(&[pool, &config.id]),
            metrics: metrics.clone(),
        };
        backend.publish_state(BackendState::Up);
        Arc::new(backend)
    }

    pub fn state(&self) -> BackendState {
        BackendState::from_u8(self.state.load(Ordering::Acquire))
    }

    /// Sets the state; returns true when it changed.
    pub fn set_state(&self, state: BackendState) -> bool {
        let old = self.state.swap(state.as_u8(), Ordering::AcqRel);
        let changed = old != state.as_u8();
        if changed {
            self.publish_state(state);
        }
        changed
    }

    fn publish_state(&self, state: BackendState) {
        let labels = [self.pool.as_str(), self.id.as_str()];
        self.metrics
            .backend_up
            .with_label_values(&labels)
            .set(i64::from(state == BackendState::Up));
        for s in [BackendState::Up, BackendState::Down, BackendState::Draining] {
            self.metrics
                .backend_state
                .with_label_values(&[self.pool.as_str(), self.id.as_str(), s.as_str()])
                .set(i64::from(s == state));
        }
    }

    /// Removes this backend's labelled series (after it left the config and
    /// its last connection ended).
    pub fn forget_metrics(&self) {
        let labels = [self.pool.as_str(), self.id.as_str()];
        let _ = self.metrics.backend_up.remove_label_values(&labels);
        for s in [BackendState::Up, BackendState::Down, BackendState::Draining] {
            let _ = self.metrics.backend_state.remove_label_values(&[
                self.pool.as_str(),
                self.id.as_str(),
                s.as_str(),
            ]);
        }
    }

    pub fn weight(&self) -> u32 {
        self.weight.load(Ordering::Relaxed)
    }

    pub fn set_weight(&self, weight: u32) {
        self.weight.store(weight.max(1), Ordering::Relaxed);
    }

    /// The token a new connection watches for this backend's drain.
    pub fn drain_token(&self) -> CancellationToken {
        match self.drain.lock() {
            Ok(t) => t.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }

    /// Starts draining: no new connections; live WebSockets get Close 1012
    /// spread over the pool's drain window. Returns false if already draining.
    pub fn start_drain(&self) -> bool {
        let was = self.set_state(BackendState::Draining);
        self.drain_token().cancel();
        if was {
            tracing::info!(pool = %self.pool, backend = %self.id, live = self.live_connections(), "backend draining");
        }
        was
    }

    /// Returns a drained backend to service (connections already told to
    /// close still close).
    pub fn undrain(&self) -> bool {
        let mut guard = match self.drain.lock() {
            Ok(g) => g,
            Err(poisoned) => poisoned.into_inner(),
        };
        if guard.is_cancelled() {
            *guard = CancellationToken::new();
        }
        drop(guard);
        self.drain_ticket.store(0, Ordering::Relaxed);
        let changed = self.set_state(BackendState::Up);
        if changed {
            tracing::info!(pool = %self.pool, backend = %self.id, "backend back in service");
        }
        changed
    }

    /// The next slot in this backend's drain schedule.
    pub fn next_drain_ticket(&self) -> u64 {
        self.drain_ticket.fetch_add(1, Ordering::Relaxed)
    }

    /// Live upgraded WebSocket connections.
    pub fn live_connections(&self) -> u64 {
        self.live_ws.load(Ordering::Relaxed)
    }

    /// What least-connections compares: live WebSockets plus HTTP requests
    /// in flight.
    pub fn load(&self) -> u64 {
        self.live_ws.load(Ordering::Relaxed) + self.inflight_http.load(Ordering::Relaxed)
    }

    /// Counts a live WebSocket connection until the guard drops.
    pub fn track_websocket(self: &Arc<Self>) -> ConnectionGuard {
        self.live_ws.fetch_add(1, Ordering::Relaxed);
        self.live_gauge.inc();
        ConnectionGuard {
            backend: Arc::clone(self),
            kind: GuardKind::WebSocket,
        }
    }

    /// Counts an HTTP request in flight until the guard drops.
    pub fn track_request(self: &Arc<Self>) -> ConnectionGuard {
        self.inflight_http.fetch_add(1, Ordering::Relaxed);
        ConnectionGuard {
            backend: Arc::clone(self),
            kind: GuardKind::Request,
        }
    }
}

enum GuardKind {
    WebSocket,
    Request,
}

/// Holds one of a backend's live slots.
pub struct ConnectionGuard {
    backend: Arc<Backend>,
    kind: GuardKind,
}

impl ConnectionGuard {
    pub fn backend(&self) -> &Arc<Backend> {
        &self.backend
    }
}

impl Drop for ConnectionGuard {
    fn drop(&mut self) {
        match self.kind {
            GuardKind::WebSocket => {
                self.backend.live_ws.fetch_sub(1, Ordering::Relaxed);
                self.backend.live_gauge.dec();
            }
            GuardKind::Request => {
                self.backend.inflight_http.fetch_sub(1, Ordering::Relaxed);
            }
        }
    }
}
