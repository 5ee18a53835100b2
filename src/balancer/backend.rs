//! One backend: its address, weight, live counts and state.
//!
//! Counts are atomics so that choosing a backend takes no lock. A connection
//! holds a [`ConnectionGuard`] while it is live; dropping the guard gives the
//! slot back and moves the gauge.
//!
//! A backend is draining while any of its [`DrainSource`]s says so (the
//! admin API, or `drain = true` in the config), and each source is lifted
//! on its own. A backend that joins a pool, comes back from `down` or is
//! put back in service ramps up over the pool's `slow_start`
//! ([`Backend::slow_start_factor`]). While a rebalance sheds its excess it
//! is marked shedding, and it holds a ticket per client address it closed,
//! so that cookie clients it sent away are re-pinned elsewhere.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU32, AtomicU64, AtomicU8, Ordering};
use std::sync::Arc;
use std::sync::{Mutex, OnceLock};
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

/// Who drains a backend. It drains while any source says so.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DrainSource {
    /// `POST .../drain` (and a reload that removed the backend).
    Admin,
    /// `drain = true` in the backend's config entry.
    Config,
}

impl DrainSource {
    fn bit(self) -> u8 {
        match self {
            DrainSource::Admin => 1,
            DrainSource::Config => 2,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            DrainSource::Admin => "admin",
            DrainSource::Config => "config",
        }
    }
}

/// The share of a joining backend's weight it starts with.
pub const SLOW_START_FLOOR: f64 = 0.1;

/// The effective weight factor `elapsed` into a slow start of `total`:
/// [`SLOW_START_FLOOR`] at the start, rising linearly to 1 at the end.
pub fn slow_start_ramp(elapsed: Duration, total: Duration) -> f64 {
    if total.is_zero() || elapsed >= total {
        return 1.0;
    }
    SLOW_START_FLOOR + (1.0 - SLOW_START_FLOOR) * elapsed.as_secs_f64() / total.as_secs_f64()
}

/// `joined_ms` of a backend at its full weight.
const NOT_RAMPING: i64 = i64::MAX;

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
    /// The [`DrainSource`] bits in force (0: not draining).
    drain: AtomicU8,
    /// The pool's `slow_start` in ms (0: none).
    slow_start_ms: AtomicU64,
    /// When the backend joined, on [`clock_ms`] (may be below zero in tests),
    /// or [`NOT_RAMPING`].
    joined_ms: AtomicI64,
    /// A rebalance is shedding this backend's excess: new connections go
    /// elsewhere when they can.
    shedding: AtomicBool,
    /// Client addresses a rebalance closed, to re-pin elsewhere.
    tickets: Tickets,
    /// Discovered by DNS rather than listed in the config.
    pub discovered: bool,
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
    /// The pool's `send_proxy_protocol`, for the client above.
    send_proxy: AtomicBool,
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
    /// `client`: the pool's connect timeout and `send_proxy_protocol`.
    pub fn new(
        pool: &str,
        config: &BackendConfig,
        client: (Duration, bool),
        metrics: &Metrics,
    ) -> Arc<Backend> {
        Arc::new(Backend::build(pool, config, client, metrics, false))
    }

    /// A backend for an address `[pools.NAME.dns]` discovered.
    pub fn new_discovered(
        pool: &str,
        config: &BackendConfig,
        client: (Duration, bool),
        metrics: &Metrics,
    ) -> Arc<Backend> {
        Arc::new(Backend::build(pool, config, client, metrics, true))
    }

    fn build(
        pool: &str,
        config: &BackendConfig,
        (connect_timeout, send_proxy): (Duration, bool),
        metrics: &Metrics,
        discovered: bool,
    ) -> Backend {
        let backend = Backend {
            pool: pool.to_string(),
            id: config.id.clone(),
            address: config.address.clone(),
            weight: AtomicU32::new(config.weight.max(1)),
            max_connections: AtomicU64::new(config.max_connections.unwrap_or(u64::MAX)),
            live_ws: AtomicU64::new(0),
            inflight_http: AtomicU64::new(0),
            healthy: AtomicBool::new(true),
            drain: AtomicU8::new(0),
            slow_start_ms: AtomicU64::new(0),
            joined_ms: AtomicI64::new(NOT_RAMPING),
            shedding: AtomicBool::new(false),
            tickets: Tickets::default(),
            discovered,
            ok_streak: AtomicU32::new(0),
            fail_streak: AtomicU32::new(0),
            down_since_ms: AtomicU64::new(0),
            drain_epoch: AtomicU64::new(0),
            http: ArcSwapOption::from_pointee(http_client(connect_timeout, send_proxy)),
            connect_timeout_ms: AtomicU64::new(duration_ms(connect_timeout)),
            send_proxy: AtomicBool::new(send_proxy),
            counters: Arc::new(metrics.relay_counters(pool, &config.id)),
            live_gauge: metrics
                .ws_connections_active
                .with_label_values(&[pool, &config.id]),
            metrics: metrics.clone(),
        };
        backend.publish_state(BackendState::Up);
        backend
    }

    pub fn state(&self) -> BackendState {
        if self.drain.load(Ordering::Acquire) != 0 {
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
                self.drain.store(0, Ordering::Release);
                self.healthy.store(true, Ordering::Release);
            }
            BackendState::Down => {
                self.healthy.store(false, Ordering::Release);
                self.down_since_ms.store(clock_ms(), Ordering::Relaxed);
            }
            BackendState::Draining => {
                self.drain
                    .fetch_or(DrainSource::Admin.bit(), Ordering::AcqRel);
            }
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
                self.start_slow_start();
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
            self.start_slow_start();
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

    /// Puts `source`'s drain in force: the backend takes no new connections.
    /// Returns true when this made it draining (it was not, for any source);
    /// `crate::drain::drain_backend` then closes its connections, spread
    /// over the drain window.
    pub fn start_drain_by(&self, source: DrainSource) -> bool {
        let before = self.drain.fetch_or(source.bit(), Ordering::AcqRel);
        if before != 0 {
            return false;
        }
        self.drain_epoch.fetch_add(1, Ordering::AcqRel);
        self.http.store(None);
        tracing::info!(pool = %self.pool, backend = %self.id, by = source.as_str(), live = self.live_connections(), "backend draining");
        self.publish_state(self.state());
        true
    }

    /// Lifts `source`'s drain. Returns true when that put the backend back
    /// in service (no other source drains it): connections already told to
    /// close still close, the rest of the schedule is dropped, and the
    /// backend ramps up again over its slow start.
    pub fn undrain_by(&self, source: DrainSource) -> bool {
        let before = self.drain.fetch_and(!source.bit(), Ordering::AcqRel);
        if before != source.bit() {
            return false;
        }
        self.drain_epoch.fetch_add(1, Ordering::AcqRel);
        if self.http.load().is_none() {
            let timeout = Duration::from_millis(self.connect_timeout_ms.load(Ordering::Relaxed));
            let send_proxy = self.send_proxy.load(Ordering::Relaxed);
            self.http
                .store(Some(Arc::new(http_client(timeout, send_proxy))));
        }
        self.start_slow_start();
        tracing::info!(pool = %self.pool, backend = %self.id, by = source.as_str(), "backend back in service");
        self.publish_state(self.state());
        true
    }

    /// [`Backend::start_drain_by`] the admin API.
    pub fn start_drain(&self) -> bool {
        self.start_drain_by(DrainSource::Admin)
    }

    /// [`Backend::undrain_by`] the admin API.
    pub fn undrain(&self) -> bool {
        self.undrain_by(DrainSource::Admin)
    }

    /// Whether `source`'s drain is in force.
    pub fn drained_by(&self, source: DrainSource) -> bool {
        self.drain.load(Ordering::Acquire) & source.bit() != 0
    }

    /// Sets the pool's slow start (`None`: none; a ramp in progress ends).
    pub fn set_slow_start(&self, slow_start: Option<Duration>) {
        let ms = slow_start.map_or(0, duration_ms);
        self.slow_start_ms.store(ms, Ordering::Relaxed);
        if ms == 0 {
            self.joined_ms.store(NOT_RAMPING, Ordering::Relaxed);
        }
    }

    /// The backend joins now: it ramps up over the pool's slow start, if
    /// there is one.
    pub fn start_slow_start(&self) {
        self.joined_ago(Duration::ZERO);
    }

    /// As if the backend had joined `ago` (tests set a ramp's progress).
    pub fn joined_ago(&self, ago: Duration) {
        if self.slow_start_ms.load(Ordering::Relaxed) == 0 {
            return;
        }
        let ago = i64::try_from(duration_ms(ago)).unwrap_or(i64::MAX);
        let now = i64::try_from(clock_ms()).unwrap_or(i64::MAX);
        self.joined_ms
            .store(now.saturating_sub(ago), Ordering::Relaxed);
    }

    /// The factor on the backend's weight while it ramps up: from
    /// [`SLOW_START_FLOOR`] when it joins to 1 after the pool's slow start
    /// (see [`slow_start_ramp`]); 1 at other times.
    pub fn slow_start_factor(&self) -> f64 {
        let joined = self.joined_ms.load(Ordering::Relaxed);
        if joined == NOT_RAMPING {
            return 1.0;
        }
        let total = self.slow_start_ms.load(Ordering::Relaxed);
        let now = i64::try_from(clock_ms()).unwrap_or(i64::MAX);
        let elapsed = u64::try_from(now.saturating_sub(joined)).unwrap_or(0);
        if elapsed >= total {
            // Done: later calls skip the clock (unless it joined again).
            let _ = self.joined_ms.compare_exchange(
                joined,
                NOT_RAMPING,
                Ordering::Relaxed,
                Ordering::Relaxed,
            );
            return 1.0;
        }
        slow_start_ramp(Duration::from_millis(elapsed), Duration::from_millis(total))
    }

    /// The weight in thousandths, times the slow-start factor (at least 1):
    /// what hash affinity ranks by, so that scaling every weight alike
    /// changes no key's place.
    pub fn effective_milli_weight(&self) -> u32 {
        let milli = f64::from(self.weight()) * 1000.0 * self.slow_start_factor();
        // The weight is at most 1000, so this fits.
        (milli.round() as u32).max(1)
    }

    /// Whether a rebalance is shedding this backend's excess.
    pub fn is_shedding(&self) -> bool {
        self.shedding.load(Ordering::Relaxed)
    }

    pub fn set_shedding(&self, on: bool) {
        self.shedding.store(on, Ordering::Relaxed);
    }

    /// Notes that a rebalance closed a client from `ip`: until `until`,
    /// its next affinity cookie for this backend re-pins it elsewhere.
    pub fn add_rebalance_ticket(&self, ip: IpAddr, until: Instant) {
        self.tickets.add(ip, until);
    }

    /// Takes a ticket for `ip`, if a rebalance left one (see
    /// [`Backend::add_rebalance_ticket`]). Lock-free when there are none.
    pub fn take_rebalance_ticket(&self, ip: IpAddr) -> bool {
        self.tickets.take(ip)
    }

    /// The client for plain HTTP requests; `None` while draining.
    pub fn http_client(&self) -> Option<HttpClient> {
        self.http.load().as_deref().cloned()
    }

    /// A reload may change the pool's connect timeout or
    /// `send_proxy_protocol`: rebuild the client.
    pub fn set_client(&self, timeout: Duration, send_proxy: bool) {
        let ms = duration_ms(timeout);
        let timeout_changed = self.connect_timeout_ms.swap(ms, Ordering::Relaxed) != ms;
        let proxy_changed = self.send_proxy.swap(send_proxy, Ordering::Relaxed) != send_proxy;
        if (timeout_changed || proxy_changed) && self.http.load().is_some() {
            self.http
                .store(Some(Arc::new(http_client(timeout, send_proxy))));
        }
    }

    /// Whether connections to this backend start with a PROXY v2 header
    /// (the pool's `send_proxy_protocol`).
    pub fn sends_proxy_header(&self) -> bool {
        self.send_proxy.load(Ordering::Relaxed)
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

/// Client addresses a rebalance sent away, each with a count (several
/// clients may share an address), valid until one moment.
#[derive(Default)]
struct Tickets {
    /// How many are held: the lock is taken only when some are.
    count: AtomicU32,
    book: Mutex<TicketBook>,
}

#[derive(Default)]
struct TicketBook {
    until: Option<Instant>,
    by_ip: HashMap<IpAddr, u32>,
}

impl Tickets {
    fn book(&self) -> std::sync::MutexGuard<'_, TicketBook> {
        match self.book.lock() {
            Ok(g) => g,
            Err(poisoned) => poisoned.into_inner(),
        }
    }

    fn add(&self, ip: IpAddr, until: Instant) {
        let mut book = self.book();
        book.until = Some(book.until.map_or(until, |u| u.max(until)));
        *book.by_ip.entry(ip.to_canonical()).or_insert(0) += 1;
        self.count.fetch_add(1, Ordering::Relaxed);
    }

    fn take(&self, ip: IpAddr) -> bool {
        if self.count.load(Ordering::Relaxed) == 0 {
            return false;
        }
        let mut book = self.book();
        if book.until.is_some_and(|u| Instant::now() >= u) {
            book.by_ip.clear();
            book.until = None;
            self.count.store(0, Ordering::Relaxed);
            return false;
        }
        let ip = ip.to_canonical();
        let Some(left) = book.by_ip.get_mut(&ip) else {
            return false;
        };
        *left -= 1;
        if *left == 0 {
            book.by_ip.remove(&ip);
        }
        self.count.fetch_sub(1, Ordering::Relaxed);
        true
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
