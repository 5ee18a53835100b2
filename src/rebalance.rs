//! Rebalance: moving live WebSockets off backends that hold more than
//! their share, typically after a backend was added or came back, without
//! a herd.
//!
//! One controller task per pool with `[pools.NAME.rebalance]`, started with
//! the pool (at start, and with every pool a reload or a DNS change builds)
//! and stopped with it (its `stop` token) or at shutdown. It checks the
//! pool when it starts (so right after a reload or a DNS change) and every
//! [`CHECK_EVERY`] after (so soon after a backend comes back up):
//!
//! - it waits while any backend that is up ramps up in its slow start, so
//!   that it never sheds onto a backend faster than slow start admits it;
//! - a backend that is up holds more than `threshold` times its weighted
//!   share of the live WebSockets of the backends that are up
//!   ([`excess`]): a **round** starts. Every overloaded backend is marked
//!   shedding (new connections go elsewhere while another backend can take
//!   them) and a set of its connections is chosen once: without hash
//!   affinity, its excess over its share, at random; in a hash pool, every
//!   connection whose key now belongs to another backend (its first choice
//!   among the backends that are up differs from where it belonged when it
//!   was placed), and no other. The chosen connections get Close 1012
//!   (`rebalance`) spread over `window` with jitter (`crate::drain::spread`),
//!   each one once, in random order across the backends; outside hash
//!   pools, a backend that fell to its share on the way is passed over. A
//!   cookie client closed this way leaves a ticket for its address, so
//!   that its reconnect, which still names the old backend, is re-pinned
//!   to one that is not shedding (a `rebind`).
//! - After the window the marks go, and the controller waits the pool's
//!   `close_timeout` (the reconnects land) before it checks again.
//!
//! A round ends early when the pool is replaced, berth shuts down, or a
//! backend starts a slow start.

use std::sync::Arc;
use std::time::Duration;

use rand::seq::SliceRandom;

use crate::balancer::{Backend, BackendState, Pool, Sticky};
use crate::config::RebalanceConfig;
use crate::lifecycle::{Lifecycle, LiveRelay};
use crate::ws::relay::StopReason;

/// How often a pool is checked for imbalance between rounds.
pub const CHECK_EVERY: Duration = Duration::from_secs(1);

/// How long after a round's window a cookie client it closed is still
/// re-pinned elsewhere when it comes back.
pub const TICKET_GRACE: Duration = Duration::from_secs(30);

/// Starts `pool`'s controller, if the pool has `[pools.NAME.rebalance]`.
pub fn start(pool: &Arc<Pool>, lifecycle: &Arc<Lifecycle>) {
    let Some(config) = pool.config.rebalance else {
        return;
    };
    tokio::spawn(control(Arc::clone(pool), Arc::clone(lifecycle), config));
}

async fn control(pool: Arc<Pool>, lifecycle: Arc<Lifecycle>, config: RebalanceConfig) {
    let stop = pool.stop.clone();
    let shutdown = lifecycle.shutdown.clone();
    loop {
        if stop.is_cancelled() || shutdown.is_cancelled() {
            return;
        }
        if let Some(round) = plan(&pool, &lifecycle, config.threshold) {
            round.run(&pool, config.window).await;
            let settle = pool.config.close_timeout;
            tokio::select! {
                _ = tokio::time::sleep(settle) => {}
                _ = stop.cancelled() => return,
                _ = shutdown.cancelled() => return,
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(CHECK_EVERY) => {}
            _ = stop.cancelled() => return,
            _ = shutdown.cancelled() => return,
        }
    }
}

/// The live WebSockets and weight of one backend, as a check sees them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Load {
    pub live: u64,
    pub weight: u32,
}

/// How many connections each backend holds above its weighted share of
/// the total, for the backends above `threshold` times that share (0 for
/// the others): what a round sheds from each, outside hash pools.
pub fn excess(loads: &[Load], threshold: f64) -> Vec<u64> {
    let total: u64 = loads.iter().map(|l| l.live).sum();
    let weights: u64 = loads.iter().map(|l| u64::from(l.weight)).sum();
    loads
        .iter()
        .map(|l| {
            if loads.len() < 2 || weights == 0 {
                return 0;
            }
            let share = total as f64 * f64::from(l.weight) / weights as f64;
            let live = l.live as f64;
            if live > threshold * share {
                (live - share).floor() as u64
            } else {
                0
            }
        })
        .collect()
}

/// The backends a check counts: those that are up.
fn up(pool: &Pool) -> Vec<&Arc<Backend>> {
    pool.backends
        .iter()
        .filter(|b| b.state() == BackendState::Up)
        .collect()
}

fn ramping(pool: &Pool) -> bool {
    up(pool).iter().any(|b| b.slow_start_factor() < 1.0)
}

fn loads(backends: &[&Arc<Backend>]) -> Vec<Load> {
    backends
        .iter()
        .map(|b| Load {
            live: b.live_connections(),
            weight: b.weight(),
        })
        .collect()
}

/// One round: the connections to close, each with the backend it is on.
struct Round {
    chosen: Vec<(Arc<Backend>, LiveRelay)>,
    shedding: Vec<Arc<Backend>>,
    hash: bool,
    cookie: bool,
}

/// A round for `pool` if one is due now.
fn plan(pool: &Pool, lifecycle: &Lifecycle, threshold: f64) -> Option<Round> {
    if ramping(pool) {
        return None;
    }
    let backends = up(pool);
    let over = excess(&loads(&backends), threshold);
    if over.iter().all(|&e| e == 0) {
        return None;
    }
    let hash = matches!(pool.sticky, Sticky::Hash { .. });
    let mut rng = rand::thread_rng();
    let mut chosen = Vec::new();
    let mut shedding = Vec::new();
    for (backend, &extra) in backends.iter().zip(&over) {
        if extra == 0 {
            continue;
        }
        let mut relays = lifecycle.relays_on(backend);
        if hash {
            relays.retain(|r| moved(pool, backend, r));
        } else {
            relays.shuffle(&mut rng);
            relays.truncate(usize::try_from(extra).unwrap_or(usize::MAX));
        }
        if relays.is_empty() {
            continue;
        }
        shedding.push(Arc::clone(backend));
        chosen.extend(relays.into_iter().map(|r| (Arc::clone(backend), r)));
    }
    if chosen.is_empty() {
        return None;
    }
    // Interleaved, so each backend's closes spread over the whole window.
    chosen.shuffle(&mut rng);
    let cookie = pool.sticky.cookie_name().is_some();
    Some(Round {
        chosen,
        shedding,
        hash,
        cookie,
    })
}

/// Whether a hash-placed connection on `on` has a key that now belongs to
/// another backend than when it was placed (and than `on`).
fn moved(pool: &Pool, on: &Arc<Backend>, relay: &LiveRelay) -> bool {
    let Some(placement) = &relay.tag.placement else {
        return false;
    };
    pool.hash_home(placement.key_hash)
        .is_some_and(|home| !Arc::ptr_eq(&home, &placement.home) && !Arc::ptr_eq(&home, on))
}

impl Round {
    async fn run(self, pool: &Pool, window: Duration) {
        let Round {
            chosen,
            shedding,
            hash,
            cookie,
        } = self;
        let summary: Vec<String> = shedding
            .iter()
            .map(|b| {
                let n = chosen.iter().filter(|(on, _)| Arc::ptr_eq(on, b)).count();
                format!("{} ({n} of {})", b.id, b.live_connections())
            })
            .collect();
        tracing::info!(
            pool = %pool.config.name,
            closes = chosen.len(),
            window = ?window,
            "rebalance: shedding from {}",
            summary.join(", ")
        );
        for b in &shedding {
            b.set_shedding(true);
        }
        let tickets_until = std::time::Instant::now() + window + TICKET_GRACE;
        let cancelled = || pool.stop.is_cancelled() || ramping(pool);
        crate::drain::spread(chosen, window, cancelled, |(backend, relay)| {
            if !hash && !above_share(pool, backend) {
                backend.set_shedding(false);
                return;
            }
            if cookie {
                if let Some(peer) = relay.tag.peer {
                    backend.add_rebalance_ticket(peer, tickets_until);
                }
            }
            relay.handle.stop(StopReason::Rebalance);
        })
        .await;
        for b in &shedding {
            b.set_shedding(false);
        }
    }
}

/// Whether `backend` still holds more than its weighted share.
fn above_share(pool: &Pool, backend: &Arc<Backend>) -> bool {
    let backends = up(pool);
    let Some(i) = backends.iter().position(|b| Arc::ptr_eq(b, backend)) else {
        return false;
    };
    // With a threshold of 1, anything above the share counts.
    excess(&loads(&backends), 1.0)
        .get(i)
        .is_some_and(|&e| e > 0)
}

#[cfg(test)]
mod tests;
