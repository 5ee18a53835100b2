//! One backend: its address, weight, live counts and state.
//!
//! Counts are atomics so that choosing a backend takes no lock. A connection
//! holds a [`ConnectionGuard`] while it is live; dropping the guard gives the
//! slot back and moves the gauge.

use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use arc_swap::ArcSwapOption;

use prometheus::IntGauge;

use super::{http_client, HttpClient};
use crate::config::BackendConfig;
use crate::metrics::{Metrics, RelayCounters};

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
}

pub struct Backend {
    pub pool: String,
    pub id: String,
    pub address: String,
    weight: AtomicU32,
    /// Cap on live WebSockets (`u64::MAX` when unlimited).
    max_connections: AtomicU64,
    live_ws: AtomicU64,
    inflight_http: AtomicU64,
    /// Health as the checks see it (active and passive).
    healthy: AtomicBool,
    /// Drained by an operator or removed by a reload.
    draining: AtomicBool,
    /// Consecutive successful / failed observations.
    ok_streak: AtomicU32,
    fail_streak: AtomicU32,
    /// When the backend last went down (ms on the process clock), for the
    /// passive-only retry window.
    down_since_ms: AtomicU64,
    /// Bumped by every drain and undrain, so that a drain schedule stops
    /// when the backend is put back in service.
    drain_epoch: AtomicU64,
    /// This backend's own keep-alive pool for plain HTTP. A drain drops it:
    /// requests in flight keep their clone and finish, and the idle
    /// connections close once the last clone is gone.
    http: ArcSwapOption<HttpClient>,
    connect_timeout_ms: AtomicU64,
    /// Counter handles for the relay, resolved once.
    pub counters: Arc<RelayCounters>,
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
    pub fn new(
        pool: &str,
        config: &BackendConfig,
        connect_timeout: Duration,
        metrics: &Metrics,
    ) -> Arc<Backend> {
        let backend = Backend {
            pool: pool.to_string(),
            id: config.id.clone(),
            address: config.address.clone(),
            weight: AtomicU32::new(config.weight.max(1)),
            max_connections: AtomicU64::new(config.max_connections.unwrap_or(u64::MAX)),
            live_ws: AtomicU64::new(0),
            inflight_http: AtomicU64::new(0),
            healthy: AtomicBool::new(true),
            draining: AtomicBool::new(false),
            ok_streak: AtomicU32::new(0),
            fail_streak: AtomicU32::new(0),
            down_since_ms: AtomicU64::new(0),
            drain_epoch: AtomicU64::new(0),
            http: ArcSwapOption::from_pointee(http_client(connect_timeout)),
            connect_timeout_ms: AtomicU64::new(duration_ms(connect_timeout)),
            counters: Arc::new(metrics.relay_counters(pool, &config.id)),
            live_gauge: metrics
                .ws_connections_active
                .with_label_values(&[pool, &config.id]),
            metrics: metrics.clone(),
        };
        backend.publish_state(BackendState::Up);
        Arc::new(backend)
    }

    pub fn state(&self) -> BackendState {
        if self.draining.load(Ordering::Acquire) {
            BackendState::Draining
        } else if self.healthy.load(Ordering::Acquire) {
            BackendState::Up
        } else {
            BackendState::Down
        }
    }

    /// Forces a state (tests and operator actions). Returns true when the
    /// visible state changed.
    pub fn set_state(&self, state: BackendState) -> bool {
        let before = self.state();
        match state {
            BackendState::Up => {
                self.draining.store(false, Ordering::Release);
                self.healthy.store(true, Ordering::Release);
            }
            BackendState::Down => {
                self.healthy.store(false, Ordering::Release);
                self.down_since_ms.store(clock_ms(), Ordering::Relaxed);
            }
            BackendState::Draining => self.draining.store(true, Ordering::Release),
        }
        let after = self.state();
        if after != before {
            self.publish_state(after);
        }
        after != before
    }

    /// Records one health observation (an active check, or a connect or
    /// handshake outcome on the data path). `rise` consecutive successes
    /// bring a down backend up; `fall` consecutive failures take an up one
    /// down. Returns true when health flipped; the flip is logged once, with
    /// the reason.
    pub fn observe(&self, ok: bool, rise: u32, fall: u32, reason: &str) -> bool {
        let flipped = if ok {
            self.fail_streak.store(0, Ordering::Relaxed);
            let streak = self
                .ok_streak
                .fetch_add(1, Ordering::Relaxed)
                .saturating_add(1);
            streak >= rise && !self.healthy.swap(true, Ordering::AcqRel)
        } else {
            self.ok_streak.store(0, Ordering::Relaxed);
            let streak = self
                .fail_streak
                .fetch_add(1, Ordering::Relaxed)
                .saturating_add(1);
            let went_down = streak >= fall && self.healthy.swap(false, Ordering::AcqRel);
            if went_down {
                self.down_since_ms.store(clock_ms(), Ordering::Relaxed);
            }
            went_down
        };
        if flipped {
            if ok {
                tracing::info!(pool = %self.pool, backend = %self.id, reason, "backend down -> up");
            } else {
                tracing::warn!(pool = %self.pool, backend = %self.id, reason, "backend up -> down");
            }
            self.publish_state(self.state());
        }
        flipped
    }

    /// For pools without active checks: a backend that went down passively
    /// is tried again once `retry_after` has passed since it went down.
    pub fn passive_retry_due(&self, retry_after: std::time::Duration) -> bool {
        !self.healthy.load(Ordering::Acquire)
            && clock_ms().saturating_sub(self.down_since_ms.load(Ordering::Relaxed))
                >= u64::try_from(retry_after.as_millis()).unwrap_or(u64::MAX)
    }

    /// Brings a passively-down backend back on probation (one failure in a
    /// row takes it down again only after `fall` failures, as usual).
    pub fn passive_retry(&self) {
        if !self.healthy.swap(true, Ordering::AcqRel) {
            self.ok_streak.store(0, Ordering::Relaxed);
            self.fail_streak.store(0, Ordering::Relaxed);
            tracing::info!(pool = %self.pool, backend = %self.id, reason = "passive retry window elapsed", "backend down -> up");
            self.publish_state(self.state());
        }
    }

    /// True when the backend is at its `max_connections` cap.
    pub fn is_full(&self) -> bool {
        self.live_ws.load(Ordering::Relaxed) >= self.max_connections.load(Ordering::Relaxed)
    }

    /// The cap on live WebSockets; `None` when unlimited.
    pub fn max_connections(&self) -> Option<u64> {
        let max = self.max_connections.load(Ordering::Relaxed);
        (max != u64::MAX).then_some(max)
    }

    pub fn set_max_connections(&self, max: Option<u64>) {
        self.max_connections
            .store(max.unwrap_or(u64::MAX), Ordering::Relaxed);
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

    /// Marks the backend draining (no new connections). Returns false if it
    /// already was. `crate::drain::drain_backend` also closes its
    /// connections, spread over the drain window.
    pub fn start_drain(&self) -> bool {
        self.drain_epoch.fetch_add(1, Ordering::AcqRel);
        self.http.store(None);
        let was = self.set_state(BackendState::Draining);
        if was {
            tracing::info!(pool = %self.pool, backend = %self.id, live = self.live_connections(), "backend draining");
        }
        was
    }

    /// Returns a drained backend to service; connections already told to
    /// close still close, the rest of the schedule is dropped.
    pub fn undrain(&self) -> bool {
        self.drain_epoch.fetch_add(1, Ordering::AcqRel);
        let was_draining = self.draining.swap(false, Ordering::AcqRel);
        if self.http.load().is_none() {
            let timeout = Duration::from_millis(self.connect_timeout_ms.load(Ordering::Relaxed));
            self.http.store(Some(Arc::new(http_client(timeout))));
        }
        if was_draining {
            tracing::info!(pool = %self.pool, backend = %self.id, "backend back in service");
            self.publish_state(self.state());
        }
        was_draining
    }

    /// The client for plain HTTP requests; `None` while draining.
    pub fn http_client(&self) -> Option<HttpClient> {
        self.http.load().as_deref().cloned()
    }

    /// A reload may change the pool's connect timeout: rebuild the client.
    pub fn set_connect_timeout(&self, timeout: Duration) {
        let ms = duration_ms(timeout);
        if self.connect_timeout_ms.swap(ms, Ordering::Relaxed) != ms && self.http.load().is_some() {
            self.http.store(Some(Arc::new(http_client(timeout))));
        }
    }

    /// Changes with every drain and undrain.
    pub fn drain_epoch(&self) -> u64 {
        self.drain_epoch.load(Ordering::Acquire)
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

fn duration_ms(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// Milliseconds since the first call: a monotonic clock that fits an atomic.
fn clock_ms() -> u64 {
    static START: OnceLock<Instant> = OnceLock::new();
    let start = START.get_or_init(Instant::now);
    u64::try_from(start.elapsed().as_millis()).unwrap_or(u64::MAX)
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
