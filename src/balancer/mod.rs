//! Pools of backends and how a backend is chosen for a new connection.
//!
//! Selection returns the best eligible backend, skipping ones already tried
//! (a failed connect is retried once elsewhere) and ones that are not up.
//!
//! Two things bend the choice for a while:
//! - **slow start**: a backend ramping up (see
//!   [`Backend::slow_start_factor`], a factor `f` from 0.1 to 1) takes a
//!   connection `balance` gives it with probability `f`, otherwise the
//!   choice goes on as if it were not eligible; so under `round_robin` it
//!   gets `f` times its weighted share of new connections, and under
//!   `least_connections` `f` times what least-connections would give it
//!   (an empty backend would otherwise take every new connection at once).
//!   Hash affinity ranks it at `f` times its weight instead (see `sticky`).
//!   When every eligible backend refused by chance, the first one offered
//!   takes the connection: slow start never refuses a client;
//! - **rebalance**: backends a rebalance is shedding are passed over while
//!   any other backend is eligible.
//!
//! A pool's members are its configured backends plus, with
//! `[pools.NAME.dns]`, one per address discovered ([`Discovered`]).

mod backend;
pub mod connector;
pub mod health;
pub mod rate;
pub mod sticky;

use std::net::IpAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

pub use backend::{
    slow_start_ramp, Backend, BackendState, ConnectionGuard, DrainSource, SLOW_START_FLOOR,
};
pub use rate::UpgradeBucket;
pub use sticky::{Choice, HashPlacement, RequestFacts, Sticky};

use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;

use crate::auth::PoolAuth;
use crate::body::ProxyBody;
use crate::config::{BackendConfig, Balance, PoolConfig};
use crate::metrics::Metrics;
use crate::ws::relay::RelayConfig;

/// Consecutive data-path failures that take a backend down in a pool
/// without active health checks.
pub const PASSIVE_FALL: u32 = 3;

/// How long a passively-down backend rests before it is tried again (pools
/// without active checks only; with them, the checks bring it back).
pub const PASSIVE_RETRY: Duration = Duration::from_secs(10);

/// An HTTP/1.1 client with its own connection pool.
pub type HttpClient = Client<connector::BackendConnector, ProxyBody>;

/// How long an idle keep-alive connection of a `send_proxy_protocol` pool
/// is kept: each is keyed to one client connection (see `connector`), which
/// berth itself closes after `handshake_timeout` (10 s by default) without
/// a request.
pub const PROXY_POOL_IDLE: Duration = Duration::from_secs(10);

/// A pooled HTTP/1.1 client (Nagle off, the pool's connect timeout; with
/// `send_proxy`, a PROXY v2 header on every connection, see `connector`).
pub fn http_client(connect_timeout: Duration, send_proxy: bool) -> HttpClient {
    let connector = connector::BackendConnector::new(connect_timeout, send_proxy);
    let mut builder = Client::builder(TokioExecutor::new());
    if send_proxy {
        builder.pool_idle_timeout(PROXY_POOL_IDLE);
    }
    builder.build(connector)
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
    /// What `[pools.NAME.dns]` found last (`None`: no table, or nothing
    /// found yet).
    pub discovered: Option<Arc<Discovered>>,
}

/// The addresses a pool's DNS discovery found last, kept across reloads
/// and DNS outages.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Discovered {
    /// The name they were found for.
    pub name: String,
    /// Sorted, without duplicates.
    pub ips: Vec<IpAddr>,
    /// When to look again: the records' TTL, if shorter than the interval.
    pub ttl: Option<Duration>,
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
    /// kept, with their live counts and state, and so are the addresses
    /// its DNS discovery found.
    pub fn new(config: PoolConfig, metrics: &Metrics, previous: Option<&Pool>) -> Pool {
        let discovered = config
            .dns
            .as_ref()
            .and(previous.and_then(|p| p.discovered.clone()));
        Pool::build(config, metrics, previous, discovered)
    }

    /// This pool with the addresses DNS discovery found now: a new
    /// address is a new backend (it joins with slow start, unless this is
    /// the pool's first answer), a vanished one is no longer a member.
    pub fn with_discovered(&self, discovered: Discovered, metrics: &Metrics) -> Pool {
        Pool::build(
            self.config.clone(),
            metrics,
            Some(self),
            Some(Arc::new(discovered)),
        )
    }

    fn build(
        config: PoolConfig,
        metrics: &Metrics,
        previous: Option<&Pool>,
        discovered: Option<Arc<Discovered>>,
    ) -> Pool {
        let kept = |b: &BackendConfig| {
            previous
                .and_then(|p| p.find(&b.id))
                .filter(|old| old.address == b.address)
        };
        let client = (config.connect_timeout, config.send_proxy_protocol);
        let mut backends: Vec<Arc<Backend>> = Vec::new();
        for b in &config.backends {
            let backend = match kept(b) {
                Some(old) => {
                    old.set_weight(b.weight);
                    old.set_max_connections(b.max_connections);
                    old.set_client(config.connect_timeout, config.send_proxy_protocol);
                    Arc::clone(old)
                }
                None => Backend::new(&config.name, b, client, metrics),
            };
            backends.push(backend);
        }
        // Discovered addresses that a configured backend already names are
        // that backend.
        let found: Vec<BackendConfig> = match (&config.dns, &discovered) {
            (Some(dns), Some(d)) => d
                .ips
                .iter()
                .map(|ip| dns.backend(*ip))
                .filter(|b| {
                    !backends
                        .iter()
                        .any(|s| s.address == b.address || s.id == b.id)
                })
                .collect(),
            _ => Vec::new(),
        };
        let first_answer = previous.is_none_or(|p| p.discovered.is_none());
        for b in &found {
            let backend = match kept(b) {
                Some(old) => Arc::clone(old),
                None => Backend::new_discovered(&config.name, b, client, metrics),
            };
            backends.push(backend);
        }
        for b in &backends {
            b.set_slow_start(config.slow_start);
        }
        // A backend joins a pool that was already serving (not at start, not
        // a new pool, not the first DNS answer): it ramps up.
        if let Some(previous) = previous {
            for b in &backends {
                let new = previous.find(&b.id).is_none_or(|old| !Arc::ptr_eq(old, b));
                if new && !(b.discovered && first_answer) {
                    b.start_slow_start();
                }
            }
        }
        let weights: Vec<u32> = backends.iter().map(|b| b.weight()).collect();
        let http = http_client(config.connect_timeout, config.send_proxy_protocol);
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
            discovered,
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

    /// Picks a backend for a new connection, never one in `exclude`,
    /// passing over backends a rebalance is shedding while others are
    /// eligible.
    pub fn pick(&self, exclude: &[&Arc<Backend>]) -> Option<Arc<Backend>> {
        let eligible =
            |b: &Arc<Backend>| self.eligible(b) && !exclude.iter().any(|e| Arc::ptr_eq(e, b));
        if self.backends.iter().any(|b| b.is_shedding()) {
            if let Some(b) = self.pick_among(|b| eligible(b) && !b.is_shedding()) {
                return Some(b);
            }
        }
        self.pick_among(eligible)
    }

    /// `balance` among the backends `eligible` admits, with slow start's
    /// admission (see the module docs).
    fn pick_among(&self, eligible: impl Fn(&Arc<Backend>) -> bool) -> Option<Arc<Backend>> {
        let admitted = |b: &Backend| {
            let f = b.slow_start_factor();
            f >= 1.0 || rand::random::<f64>() < f
        };
        let n = self.backends.len();
        // Ties (least connections) and the schedule (round robin) start at
        // a rotating place so that an idle pool still spreads its load.
        let start = self.cursor.fetch_add(1, Ordering::Relaxed);
        match self.config.balance {
            Balance::RoundRobin => {
                let len = self.schedule.len();
                let mut start = start;
                let mut refused: Vec<&Arc<Backend>> = Vec::new();
                let mut k = 0;
                while k < len {
                    let Some(b) = self.backends.get(self.schedule[(start + k) % len]) else {
                        break;
                    };
                    k += 1;
                    if !eligible(b) || refused.iter().any(|r| Arc::ptr_eq(r, b)) {
                        continue;
                    }
                    if admitted(b) {
                        return Some(Arc::clone(b));
                    }
                    // A refused turn goes to the schedule's next turn at
                    // large, not always to the same neighbour.
                    refused.push(b);
                    start = self.cursor.fetch_add(1, Ordering::Relaxed);
                    k = 0;
                }
                refused.first().map(|b| Arc::clone(b))
            }
            Balance::LeastConnections => {
                let mut refused: Vec<&Arc<Backend>> = Vec::new();
                let mut first: Option<&Arc<Backend>> = None;
                loop {
                    let mut best: Option<&Arc<Backend>> = None;
                    for k in 0..n {
                        let b = &self.backends[(start + k) % n];
                        if !eligible(b) || refused.iter().any(|r| Arc::ptr_eq(r, b)) {
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
                    let Some(b) = best else {
                        return first.cloned();
                    };
                    first.get_or_insert(b);
                    if admitted(b) {
                        return Some(Arc::clone(b));
                    }
                    refused.push(b);
                }
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
                    drain: false,
                })
                .collect(),
            auth: crate::config::AuthConfig::default(),
            slow_start: None,
            max_connection_age: None,
            rebalance: None,
            dns: None,
            send_proxy_protocol: false,
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

    /// How many of `n` picks go to each backend.
    fn shares(p: &Pool, n: usize) -> Vec<usize> {
        let mut counts = vec![0; p.backends.len()];
        for _ in 0..n {
            let b = p.pick(&[]).unwrap();
            let i = p.backends.iter().position(|x| Arc::ptr_eq(x, &b)).unwrap();
            counts[i] += 1;
        }
        counts
    }

    #[test]
    fn slow_start_ramps_the_round_robin_share_from_a_tenth() {
        let p = pool(Balance::RoundRobin, &[1, 1, 1, 1]);
        let b3 = &p.backends[3];
        // An hour's ramp: the picks' own wall time (seconds on a loaded
        // machine) must not move the factor.
        b3.set_slow_start(Some(Duration::from_secs(3600)));
        // Weighted share 25 %: at the start a tenth of it, halfway 55 %.
        for (ago, low, high) in [(0, 150, 350), (30, 1_150, 1_600), (60, 2_300, 2_700)] {
            b3.joined_ago(Duration::from_secs(ago * 60));
            let counts = shares(&p, 10_000);
            assert!((low..high).contains(&counts[3]), "{ago}m in: {counts:?}");
            // The others share the rest evenly.
            let others = &counts[..3];
            let (min, max) = (others.iter().min().unwrap(), others.iter().max().unwrap());
            assert!(max - min < 600, "{counts:?}");
        }
    }

    #[test]
    fn slow_start_admits_an_empty_backend_to_least_connections_at_its_factor() {
        let p = pool(Balance::LeastConnections, &[1, 1, 1, 1]);
        let _held: Vec<_> = (0..3)
            .flat_map(|i| (0..10).map(move |_| i))
            .map(|i| p.backends[i].track_websocket())
            .collect();
        let b3 = &p.backends[3];
        // An hour's ramp, as above.
        b3.set_slow_start(Some(Duration::from_secs(3600)));
        // Least connections alone would send b3 every new connection.
        for (ago, low, high) in [(0, 700, 1_300), (30, 5_100, 5_900), (60, 10_000, 10_001)] {
            b3.joined_ago(Duration::from_secs(ago * 60));
            let counts = shares(&p, 10_000);
            assert!((low..high).contains(&counts[3]), "{ago}m in: {counts:?}");
        }
        assert!(b3.slow_start_factor() >= 1.0);
    }

    #[test]
    fn slow_start_never_refuses_the_only_eligible_backend() {
        for balance in [Balance::RoundRobin, Balance::LeastConnections] {
            let p = pool(balance, &[1, 1]);
            p.backends[0].set_state(BackendState::Down);
            let b1 = &p.backends[1];
            b1.set_slow_start(Some(Duration::from_secs(3600)));
            b1.start_slow_start();
            assert!(b1.slow_start_factor() < 0.11);
            for _ in 0..100 {
                assert_eq!(p.pick(&[]).unwrap().id, "b1");
            }
        }
    }

    #[test]
    fn the_ramp_is_linear_from_a_tenth() {
        let total = Duration::from_secs(100);
        let ramp = |s| slow_start_ramp(Duration::from_secs(s), total);
        assert!((ramp(0) - 0.1).abs() < 1e-9);
        assert!((ramp(50) - 0.55).abs() < 1e-9);
        assert!((ramp(90) - 0.91).abs() < 1e-9);
        assert_eq!(ramp(100), 1.0);
        assert_eq!(ramp(1_000), 1.0);
        assert_eq!(slow_start_ramp(Duration::ZERO, Duration::ZERO), 1.0);
    }

    #[test]
    fn shedding_backends_are_passed_over_while_others_can_take_it() {
        for balance in [Balance::RoundRobin, Balance::LeastConnections] {
            let p = pool(balance, &[1, 1, 1]);
            p.backends[0].set_shedding(true);
            p.backends[1].set_shedding(true);
            assert_eq!(shares(&p, 300), [0, 0, 300]);
            p.backends[2].set_state(BackendState::Down);
            let counts = shares(&p, 300);
            assert_eq!(counts[0] + counts[1], 300);
        }
    }

    #[test]
    fn each_drain_source_is_lifted_on_its_own() {
        let p = pool(Balance::RoundRobin, &[1]);
        let b = &p.backends[0];
        // Config first, then the admin API too: the admin undrain leaves
        // the config's drain in force.
        let epoch = b.drain_epoch();
        assert!(b.start_drain_by(DrainSource::Config));
        assert!(!b.start_drain_by(DrainSource::Admin));
        assert_eq!(b.drain_epoch(), epoch + 1, "one drain, one schedule");
        assert!(!b.undrain_by(DrainSource::Admin));
        assert_eq!(b.state(), BackendState::Draining);
        assert!(b.undrain_by(DrainSource::Config));
        assert_eq!(b.state(), BackendState::Up);
        // The admin API first: removing the config's drain leaves it.
        assert!(b.start_drain());
        assert!(!b.start_drain_by(DrainSource::Config));
        assert!(!b.undrain_by(DrainSource::Config));
        assert!(b.drained_by(DrainSource::Admin) && !b.drained_by(DrainSource::Config));
        assert_eq!(b.state(), BackendState::Draining);
        assert!(b.undrain());
        assert_eq!(b.state(), BackendState::Up);
        assert!(!b.undrain());
    }

    /// A config of pool `p` with backends `b1..` at ports 9001.., slow start
    /// 60s, and DNS discovery of `chat` on port 7000.
    fn fleet_config(backends: usize) -> PoolConfig {
        let mut text = String::from(
            "[[listeners]]\nname = \"l\"\nbind = \"127.0.0.1:0\"\n\n[[routes]]\npool = \"p\"\n\n\
             [pools.p]\nslow_start = \"60s\"\n\n[pools.p.dns]\nname = \"chat\"\nport = 7000\n",
        );
        for i in 1..=backends {
            text.push_str(&format!(
                "\n[[pools.p.backends]]\nid = \"b{i}\"\naddress = \"127.0.0.1:{}\"\n",
                9000 + i
            ));
        }
        crate::config::Config::from_toml_str(&text, "t")
            .unwrap()
            .pools["p"]
            .clone()
    }

    fn found(ips: &[&str]) -> Discovered {
        Discovered {
            name: "chat".into(),
            ips: ips.iter().map(|ip| ip.parse().unwrap()).collect(),
            ttl: None,
        }
    }

    fn ramping(p: &Pool) -> Vec<&str> {
        p.backends
            .iter()
            .filter(|b| b.slow_start_factor() < 1.0)
            .map(|b| b.id.as_str())
            .collect()
    }

    #[test]
    fn backends_that_join_a_serving_pool_ramp_up() {
        let metrics = Metrics::new().unwrap();
        // At start nothing ramps (every backend starts empty).
        let first = Pool::new(fleet_config(2), &metrics, None);
        assert!(ramping(&first).is_empty());
        assert!(first.discovered.is_none());
        // The first DNS answer is the pool's initial set: no ramp either.
        let second = first.with_discovered(found(&["10.0.0.1", "10.0.0.2"]), &metrics);
        let ids: Vec<&str> = second.backends.iter().map(|b| b.id.as_str()).collect();
        assert_eq!(ids, ["b1", "b2", "dns-10.0.0.1-7000", "dns-10.0.0.2-7000"]);
        assert!(ramping(&second).is_empty());
        assert!(second.backends[2].discovered && !second.backends[0].discovered);
        // Later answers: a new address ramps up, a vanished one is gone,
        // the rest are the same backends.
        let third = second.with_discovered(found(&["10.0.0.2", "10.0.0.3"]), &metrics);
        let ids: Vec<&str> = third.backends.iter().map(|b| b.id.as_str()).collect();
        assert_eq!(ids, ["b1", "b2", "dns-10.0.0.2-7000", "dns-10.0.0.3-7000"]);
        assert_eq!(ramping(&third), ["dns-10.0.0.3-7000"]);
        assert!(Arc::ptr_eq(&third.backends[2], &second.backends[3]));
        // A reload keeps the discovered set; a backend it adds ramps up.
        let fourth = Pool::new(fleet_config(3), &metrics, Some(&third));
        assert_eq!(fourth.backends.len(), 5);
        assert_eq!(fourth.discovered, third.discovered);
        let mut now = ramping(&fourth);
        now.sort_unstable();
        assert_eq!(now, ["b3", "dns-10.0.0.3-7000"]);
        // Back from down: ramps again.
        fourth.backends[0].set_state(BackendState::Down);
        assert!(fourth.backends[0].observe(true, 1, 1, "check passed"));
        assert!(fourth.backends[0].slow_start_factor() < 1.0);
    }

    #[test]
    fn slow_start_ranks_a_joining_backend_lower_for_hash_keys() {
        let mut text = String::from(
            "[[listeners]]\nname = \"l\"\nbind = \"127.0.0.1:0\"\n\n[[routes]]\npool = \"p\"\n\n\
             [pools.p]\naffinity = \"hash\"\nslow_start = \"1h\"\n\n\
             [pools.p.hash]\nkey = \"header:x-key\"\nbounded_load = 1.25\n",
        );
        for i in 1..=4 {
            text.push_str(&format!(
                "\n[[pools.p.backends]]\nid = \"b{i}\"\naddress = \"127.0.0.1:{}\"\n",
                9000 + i
            ));
        }
        let config = crate::config::Config::from_toml_str(&text, "t").unwrap();
        let p = Pool::new(config.pools["p"].clone(), &Metrics::new().unwrap(), None);
        let uri: http::Uri = "/".parse().unwrap();
        let on_b4 = |p: &Pool| {
            (0..4_000)
                .filter(|i| {
                    let mut headers = http::HeaderMap::new();
                    headers.insert("x-key", format!("user-{i}").parse().unwrap());
                    let facts = RequestFacts {
                        headers: &headers,
                        uri: &uri,
                        peer: std::net::IpAddr::from([127, 0, 0, 1]),
                        tls: false,
                        claim: None,
                    };
                    let choice = p.choose(&facts, &[]).unwrap();
                    let home = &choice.placement.as_ref().unwrap().home;
                    assert!(Arc::ptr_eq(home, &choice.backend));
                    choice.backend.id == "b4"
                })
                .count()
        };
        let full = on_b4(&p);
        assert!((850..1_150).contains(&full), "{full}");
        // At a tenth of its weight, b4 wins a tenth as many keys or so
        // (0.1 / 3.1 of them), each one it would win at full weight.
        p.backends[3].joined_ago(Duration::ZERO);
        let early = on_b4(&p);
        assert!((60..200).contains(&early), "{early}");
        p.backends[3].joined_ago(Duration::from_secs(1800));
        let half = on_b4(&p);
        assert!(early < half && half < full, "{early} {half} {full}");
    }
}
