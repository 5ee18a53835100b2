//! Pools of backends and how a backend is chosen for a new connection.
//!
//! Selection returns the best eligible backend, skipping ones already tried
//! (a failed connect is retried once elsewhere) and ones that are not up.

mod backend;
pub mod health;
pub mod rate;
pub mod sticky;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

pub use backend::{Backend, BackendState, ConnectionGuard};
pub use rate::UpgradeBucket;
pub use sticky::{Choice, RequestFacts, Sticky};

use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;

use crate::auth::PoolAuth;
use crate::body::ProxyBody;
use crate::config::{Balance, PoolConfig};
use crate::metrics::Metrics;
use crate::ws::relay::RelayConfig;

/// Consecutive data-path failures that take a backend down in a pool
/// without active health checks.
pub const PASSIVE_FALL: u32 = 3;

/// How long a passively-down backend rests before it is tried again (pools
/// without active checks only; with them, the checks bring it back).
pub const PASSIVE_RETRY: Duration = Duration::from_secs(10);

/// An HTTP/1.1 client with its own connection pool.
pub type HttpClient = Client<HttpConnector, ProxyBody>;

/// A pooled HTTP/1.1 client (Nagle off, the pool's connect timeout).
pub fn http_client(connect_timeout: Duration) -> HttpClient {
    let mut connector = HttpConnector::new();
    connector.set_connect_timeout(Some(connect_timeout));
    connector.set_nodelay(true);
    Client::builder(TokioExecutor::new()).build(connector)
}

/// A pool's backends and its balancing state.
pub struct Pool {
    pub config: PoolConfig,
    /// HTTP/1.1 client for the pool's active health checks (plain requests
    /// use each backend's own client, see [`Backend::http_client`]).
    pub http: HttpClient,
    pub backends: Vec<Arc<Backend>>,
    /// Affinity, ready to apply.
    pub sticky: Sticky,
    /// The upgrade rate limit, when the pool has one. Kept across reloads
    /// that do not change it, so a reload does not refill it.
    pub upgrades: Option<Arc<UpgradeBucket>>,
    /// Smooth weighted round-robin order (indexes into `backends`).
    schedule: Vec<usize>,
    cursor: AtomicUsize,
    /// Cancelled when a reload replaces this pool (stops its health checks).
    pub stop: tokio_util::sync::CancellationToken,
    /// Who may reach the pool (`[pools.NAME.auth]`), when anyone may not.
    pub auth: Option<Arc<PoolAuth>>,
    /// The settings of every relay in the pool: one copy, shared by its
    /// WebSockets.
    pub relay: Arc<RelayConfig>,
}

impl std::fmt::Debug for Pool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pool")
            .field("name", &self.config.name)
            .field("backends", &self.backends)
            .finish()
    }
}

impl Pool {
    /// Builds a pool; backends found in `previous` (same id and address) are
    /// kept, with their live counts and state.
    pub fn new(config: PoolConfig, metrics: &Metrics, previous: Option<&Pool>) -> Pool {
        let backends: Vec<Arc<Backend>> = config
            .backends
            .iter()
            .map(|b| {
                match previous
                    .and_then(|p| p.find(&b.id))
                    .filter(|old| old.address == b.address)
                {
                    Some(old) => {
                        old.set_weight(b.weight);
                        old.set_max_connections(b.max_connections);
                        old.set_connect_timeout(config.connect_timeout);
                        Arc::clone(old)
                    }
                    None => Backend::new(&config.name, b, config.connect_timeout, metrics),
                }
            })
            .collect();
        let weights: Vec<u32> = backends.iter().map(|b| b.weight()).collect();
        let http = http_client(config.connect_timeout);
        let upgrades = config.limits.upgrade_rate.map(|rate| {
            previous
                .and_then(|p| p.upgrades.as_ref())
                .filter(|old| old.rate() == rate)
                .map_or_else(|| Arc::new(UpgradeBucket::new(rate)), Arc::clone)
        });
        let auth = PoolAuth::new(&config, metrics, previous.and_then(|p| p.auth.as_deref()));
        let relay = Arc::new(RelayConfig {
            idle_timeout: config.idle_timeout,
            ping_interval: config.ping_interval,
            pong_timeout: config.pong_timeout,
            close_timeout: config.close_timeout,
            max_message_size: config.limits.max_message_size,
            send_timeout: config.limits.send_timeout,
        });
        Pool {
            relay,
            sticky: Sticky::from_config(&config.affinity),
            http,
            upgrades,
            schedule: smooth_schedule(&weights),
            config,
            backends,
            cursor: AtomicUsize::new(0),
            stop: tokio_util::sync::CancellationToken::new(),
            auth,
        }
    }

    pub fn find(&self, id: &str) -> Option<&Arc<Backend>> {
        self.backends.iter().find(|b| b.id == id)
    }

    /// Whether a backend may take a new connection: up and not full. In a
    /// pool without active checks, a backend that went down passively gets
    /// another chance after [`PASSIVE_RETRY`].
    pub fn eligible(&self, b: &Backend) -> bool {
        match b.state() {
            BackendState::Up => !b.is_full(),
            BackendState::Down
                if self.config.health.is_none() && b.passive_retry_due(PASSIVE_RETRY) =>
            {
                b.passive_retry();
                !b.is_full()
            }
            _ => false,
        }
    }

    /// Whether the pool's upgrade rate limit admits one more upgrade now.
    pub fn admit_upgrade(&self) -> bool {
        self.upgrades.as_ref().is_none_or(|b| b.try_take())
    }

    /// Records a data-path outcome for a backend (passive health check):
    /// failed connects and refused handshakes count against it, a good
    /// `101` or a non-5xx answer for it, so only failures in a row add up.
    pub fn observe(&self, b: &Backend, ok: bool, reason: &str) {
        let (rise, fall) = self
            .config
            .health
            .as_ref()
            .map_or((1, PASSIVE_FALL), |h| (h.rise, h.fall));
        b.observe(ok, rise, fall, reason);
    }

    /// Picks a backend for a new connection, never one in `exclude`.
    pub fn pick(&self, exclude: &[&Arc<Backend>]) -> Option<Arc<Backend>> {
        let eligible =
            |b: &Arc<Backend>| self.eligible(b) && !exclude.iter().any(|e| Arc::ptr_eq(e, b));
        match self.config.balance {
            Balance::RoundRobin => {
                let len = self.schedule.len();
                let start = self.cursor.fetch_add(1, Ordering::Relaxed);
                (0..len)
                    .map(|k| &self.backends[self.schedule[(start + k) % len]])
                    .find(|b| eligible(b))
                    .cloned()
            }
            Balance::LeastConnections => {
                // Ties rotate so that an idle pool still spreads its load.
                let n = self.backends.len();
                let start = self.cursor.fetch_add(1, Ordering::Relaxed);
                let mut best: Option<&Arc<Backend>> = None;
                for k in 0..n {
                    let b = &self.backends[(start + k) % n];
                    if !eligible(b) {
                        continue;
                    }
                    best = match best {
                        // load/weight < best_load/best_weight, without division.
                        Some(cur)
                            if u128::from(b.load()) * u128::from(cur.weight())
                                >= u128::from(cur.load()) * u128::from(b.weight()) =>
                        {
                            Some(cur)
                        }
                        _ => Some(b),
                    };
                }
                best.cloned()
            }
        }
    }
}

/// The smooth weighted round-robin sequence (each step: add every weight to
/// its running score, pick the highest, subtract the total from it). Weights
/// 5,1,1 give a,a,b,a,c,a,a rather than a,a,a,a,a,b,c.
fn smooth_schedule(weights: &[u32]) -> Vec<usize> {
    let total: i64 = weights.iter().map(|&w| i64::from(w)).sum();
    let mut current = vec![0i64; weights.len()];
    let mut out = Vec::with_capacity(usize::try_from(total).unwrap_or(0));
    for _ in 0..total {
        let mut best = 0;
        for (i, &w) in weights.iter().enumerate() {
            current[i] += i64::from(w);
            if current[i] > current[best] {
                best = i;
            }
        }
        current[best] -= total;
        out.push(best);
    }
    if out.is_empty() {
        out.push(0);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::BackendConfig;
    use std::time::Duration;

    fn pool(balance: Balance, weights: &[u32]) -> Pool {
        let metrics = Metrics::new().unwrap();
        let config = PoolConfig {
            name: "p".into(),
            balance,
            connect_timeout: Duration::from_secs(1),
            response_timeout: Duration::from_secs(1),
            idle_timeout: None,
            ping_interval: None,
            pong_timeout: Duration::from_secs(1),
            close_timeout: Duration::from_secs(1),
            drain_window: Duration::from_secs(1),
            allowed_origins: Vec::new(),
            affinity: crate::config::Affinity::None,
            limits: crate::config::PoolLimits::default(),
            health: None,
            backends: weights
                .iter()
                .enumerate()
                .map(|(i, &w)| BackendConfig {
                    id: format!("b{i}"),
                    address: format!("127.0.0.1:{}", 9000 + i),
                    weight: w,
                    max_connections: None,
                })
                .collect(),
            auth: crate::config::AuthConfig::default(),
        };
        Pool::new(config, &metrics, None)
    }

    #[test]
    fn smooth_schedule_interleaves() {
        assert_eq!(smooth_schedule(&[5, 1, 1]), vec![0, 0, 1, 0, 2, 0, 0]);
        assert_eq!(smooth_schedule(&[1, 1, 1]), vec![0, 1, 2]);
    }

    #[test]
    fn round_robin_honours_weights() {
        let p = pool(Balance::RoundRobin, &[3, 1]);
        let picks: Vec<String> = (0..8).map(|_| p.pick(&[]).unwrap().id.clone()).collect();
        assert_eq!(picks.iter().filter(|id| *id == "b0").count(), 6);
    }

    #[test]
    fn least_connections_prefers_least_loaded_relative_to_weight() {
        let p = pool(Balance::LeastConnections, &[1, 2]);
        let _a = p.backends[0].track_websocket();
        let _b = p.backends[1].track_websocket();
        // b0: 1/1, b1: 1/2 -> b1.
        assert_eq!(p.pick(&[]).unwrap().id, "b1");
        let _c = p.backends[1].track_websocket();
        let _d = p.backends[1].track_websocket();
        // b0: 1/1, b1: 3/2 -> b0.
        assert_eq!(p.pick(&[]).unwrap().id, "b0");
    }

    #[test]
    fn passive_health_takes_a_backend_down_only_after_fall_failures_in_a_row() {
        let p = pool(Balance::RoundRobin, &[1]);
        let b = &p.backends[0];
        // Failure, success, failure, success ...: never down.
        for _ in 0..50 {
            p.observe(b, false, "refused");
            p.observe(b, true, "switched protocols");
            assert_eq!(b.state(), BackendState::Up);
        }
        // Two in a row are not enough either; the third is.
        p.observe(b, false, "refused");
        p.observe(b, false, "refused");
        assert_eq!(b.state(), BackendState::Up);
        p.observe(b, false, "refused");
        assert_eq!(b.state(), BackendState::Down);
    }

    #[test]
    fn pick_skips_excluded_and_down() {
        let p = pool(Balance::RoundRobin, &[1, 1, 1]);
        p.backends[0].set_state(BackendState::Down);
        let first = p.pick(&[]).unwrap();
        assert_ne!(first.id, "b0");
        let second = p.pick(&[&first]).unwrap();
        assert_ne!(second.id, first.id);
        assert_ne!(second.id, "b0");
        p.backends[1].set_state(BackendState::Draining);
        p.backends[2].set_state(BackendState::Down);
        assert!(p.pick(&[]).is_none());
    }
}
