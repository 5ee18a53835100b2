//! Where a running berth is in its life, and the live connections that a
//! drain or a shutdown must reach.
//!
//! [`Lifecycle`] holds the shutdown token, the tracker of connection and
//! relay tasks (shutdown waits for it), the readiness flag `/readyz`
//! reports, and the registry of live relays: every relayed WebSocket
//! registers a [`StopHandle`] with its backend while it runs, so that a
//! drain (one backend), a rebalance (some of a backend's) or a shutdown
//! (all) can signal it; with it go the client's address and, for a
//! hash-placed connection, its key's placement ([`RelayTag`]), which a
//! rebalance chooses by. The registry lock
//! is taken when a relay starts and ends, never per frame. It also keeps
//! the drains in progress (which backend, how many connections it had,
//! when and over what window), so the status page can show their progress.
//! This module starts no tasks; the drain controllers that use the registry
//! live in `drain`.

use std::collections::HashMap;
use std::num::NonZeroU64;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use std::net::IpAddr;

use crate::balancer::{Backend, BackendState, HashPlacement};
use crate::ws::relay::{StopHandle, StopReason};

/// A running berth's lifecycle state, shared by the listeners, the proxy
/// and the control plane.
#[derive(Default)]
pub struct Lifecycle {
    /// Cancelled when berth starts shutting down.
    pub shutdown: CancellationToken,
    /// Every connection and relay task, so shutdown can wait for them.
    pub tracker: TaskTracker,
    /// True once listeners are accepting; false again while shutting down.
    ready: AtomicBool,
    /// Live relayed WebSockets across all pools.
    ws_live: AtomicU64,
    relays: Mutex<Relays>,
    drains: Mutex<Vec<DrainRecord>>,
}

/// How long a finished drain stays listed after its window ends, so that
/// whoever watches sees it complete.
pub const FINISHED_DRAIN_KEPT: Duration = Duration::from_secs(60);

/// A drain as it started.
struct DrainRecord {
    backend: Arc<Backend>,
    /// The backend's drain epoch at the start; another drain or an undrain
    /// changes it, which ends this record.
    epoch: u64,
    total: u64,
    started: Instant,
    window: Duration,
}

/// A drain's progress: the connections the backend had when it started,
/// and how many of them have closed since.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DrainProgress {
    pub pool: String,
    pub backend: String,
    /// Live WebSockets when the drain started.
    pub total: u64,
    /// Of those, closed so far (`total` minus the live ones, never below 0).
    pub closed: u64,
    pub elapsed: Duration,
    pub window: Duration,
}

impl DrainProgress {
    /// True once every connection the drain started with has closed.
    pub fn finished(&self) -> bool {
        self.closed >= self.total
    }

    /// Time left in the drain window (zero once it has passed).
    pub fn remaining(&self) -> Duration {
        self.window.saturating_sub(self.elapsed)
    }
}

/// A live relay's entry in the registry (never zero, so that an
/// `Option<RelayId>`, which every tunnel holds, takes 8 bytes).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RelayId(NonZeroU64);

/// What a relay is registered with besides its backend.
#[derive(Clone, Debug, Default)]
pub struct RelayTag {
    /// The client's address.
    pub peer: Option<IpAddr>,
    /// Where its hash key belonged when it was placed.
    pub placement: Option<HashPlacement>,
}

/// A live relay as a rebalance sees it.
#[derive(Clone)]
pub struct LiveRelay {
    pub handle: Arc<StopHandle>,
    pub tag: RelayTag,
}

#[derive(Default)]
struct Relays {
    /// The last id given out (ids count from 1).
    last_id: u64,
    live: HashMap<NonZeroU64, (Arc<StopHandle>, Arc<Backend>, RelayTag)>,
}

impl Lifecycle {
    pub fn new() -> Lifecycle {
        Lifecycle::default()
    }

    pub fn is_shutting_down(&self) -> bool {
        self.shutdown.is_cancelled()
    }

    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::Acquire)
    }

    pub fn set_ready(&self, ready: bool) {
        self.ready.store(ready, Ordering::Release);
    }

    /// Live relayed WebSockets.
    pub fn live_websockets(&self) -> u64 {
        self.ws_live.load(Ordering::Relaxed)
    }

    fn relays(&self) -> MutexGuard<'_, Relays> {
        match self.relays.lock() {
            Ok(g) => g,
            Err(poisoned) => poisoned.into_inner(),
        }
    }

    /// Registers a relay about to start on `backend`. A relay that races a
    /// drain of its backend, or a shutdown, is told to stop at once.
    pub fn relay_started(&self, backend: &Arc<Backend>) -> (RelayId, Arc<StopHandle>) {
        self.relay_started_with(backend, RelayTag::default())
    }

    /// [`Lifecycle::relay_started`] with the client's address and the
    /// connection's hash placement.
    pub fn relay_started_with(
        &self,
        backend: &Arc<Backend>,
        tag: RelayTag,
    ) -> (RelayId, Arc<StopHandle>) {
        let handle = Arc::new(StopHandle::default());
        if self.is_shutting_down() {
            handle.stop(StopReason::Shutdown);
        } else if backend.state() == BackendState::Draining {
            handle.stop(StopReason::Drain);
        }
        self.ws_live.fetch_add(1, Ordering::Relaxed);
        let mut relays = self.relays();
        let id = NonZeroU64::MIN.saturating_add(relays.last_id);
        relays.last_id = id.get();
        relays
            .live
            .insert(id, (Arc::clone(&handle), Arc::clone(backend), tag));
        (RelayId(id), handle)
    }

    /// Removes a relay that has ended.
    pub fn relay_ended(&self, id: RelayId) {
        if self.relays().live.remove(&id.0).is_some() {
            self.ws_live.fetch_sub(1, Ordering::Relaxed);
        }
    }

    fn drain_records(&self) -> MutexGuard<'_, Vec<DrainRecord>> {
        match self.drains.lock() {
            Ok(g) => g,
            Err(poisoned) => poisoned.into_inner(),
        }
    }

    /// Records that `backend` started draining `total` connections over
    /// `window` (replacing an earlier drain of the same backend).
    pub fn drain_started(&self, backend: &Arc<Backend>, total: usize, window: Duration) {
        let mut drains = self.drain_records();
        drains.retain(|d| !Arc::ptr_eq(&d.backend, backend));
        drains.push(DrainRecord {
            backend: Arc::clone(backend),
            epoch: backend.drain_epoch(),
            total: total as u64,
            started: Instant::now(),
            window,
        });
    }

    /// The drains in progress, oldest first. A drain is listed until its
    /// backend is undrained (or drained again), and a finished one for
    /// [`FINISHED_DRAIN_KEPT`] after its window; then it is forgotten.
    pub fn drains(&self) -> Vec<DrainProgress> {
        let mut drains = self.drain_records();
        let progress = |d: &DrainRecord| {
            let live = d.backend.live_connections();
            DrainProgress {
                pool: d.backend.pool.clone(),
                backend: d.backend.id.clone(),
                total: d.total,
                closed: d.total.saturating_sub(live),
                elapsed: d.started.elapsed(),
                window: d.window,
            }
        };
        drains.retain(|d| {
            let p = progress(d);
            d.backend.drain_epoch() == d.epoch
                && !(p.finished() && p.elapsed > d.window + FINISHED_DRAIN_KEPT)
        });
        drains.iter().map(progress).collect()
    }

    /// The stop handles of one backend's relays, or of all of them.
    pub fn stop_handles(&self, backend: Option<&Arc<Backend>>) -> Vec<Arc<StopHandle>> {
        self.relays()
            .live
            .values()
            .filter(|(_, b, _)| backend.is_none_or(|want| Arc::ptr_eq(want, b)))
            .map(|(h, _, _)| Arc::clone(h))
            .collect()
    }

    /// The live relays of `backend`, with their tags.
    pub fn relays_on(&self, backend: &Arc<Backend>) -> Vec<LiveRelay> {
        self.relays()
            .live
            .values()
            .filter(|(_, b, _)| Arc::ptr_eq(backend, b))
            .map(|(handle, _, tag)| LiveRelay {
                handle: Arc::clone(handle),
                tag: tag.clone(),
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;
    use crate::metrics::Metrics;
    use crate::routing::Runtime;

    fn backends() -> (Arc<Backend>, Arc<Backend>) {
        let text = r#"
[[listeners]]
name = "public"
bind = "127.0.0.1:0"

[[routes]]
pool = "main"

[[pools.main.backends]]
id = "b1"
address = "127.0.0.1:9001"

[[pools.main.backends]]
id = "b2"
address = "127.0.0.1:9002"
"#;
        let config = Config::from_toml_str(text, "test").unwrap();
        let runtime = Runtime::new(Arc::new(config), &Metrics::new().unwrap(), None);
        let pool = &runtime.pools["main"];
        (Arc::clone(&pool.backends[0]), Arc::clone(&pool.backends[1]))
    }

    #[test]
    fn relays_are_registered_per_backend_and_counted() {
        let (b1, b2) = backends();
        let life = Lifecycle::new();
        let (first, _) = life.relay_started(&b1);
        let (second, _) = life.relay_started(&b1);
        life.relay_started(&b2);
        assert_eq!(life.live_websockets(), 3);
        assert_eq!(life.stop_handles(Some(&b1)).len(), 2);
        assert_eq!(life.stop_handles(Some(&b2)).len(), 1);
        assert_eq!(life.stop_handles(None).len(), 3);
        life.relay_ended(first);
        // Ending twice (the tunnel's drop after its end) counts once.
        life.relay_ended(first);
        assert_eq!(life.live_websockets(), 2);
        assert_eq!(life.stop_handles(Some(&b1)).len(), 1);
        assert_ne!(first, second);
    }

    #[tokio::test(start_paused = true)]
    async fn drains_are_listed_until_undrained_or_long_finished() {
        let (b1, b2) = backends();
        let life = Lifecycle::new();
        let guards: Vec<_> = (0..3).map(|_| b1.track_websocket()).collect();
        let window = Duration::from_secs(10);
        assert!(b1.start_drain());
        life.drain_started(&b1, 3, window);
        assert!(b2.start_drain());
        life.drain_started(&b2, 0, window);
        tokio::time::advance(Duration::from_secs(4)).await;
        let drains = life.drains();
        assert_eq!(drains.len(), 2);
        let d = &drains[0];
        assert_eq!((d.backend.as_str(), d.total, d.closed), ("b1", 3, 0));
        assert_eq!(d.remaining(), Duration::from_secs(6));
        assert!(!d.finished());
        // b2 had nothing to close: finished at once.
        assert!(drains[1].finished());
        drop(guards);
        assert!(life.drains()[0].finished());
        // An undrain ends the record; a finished one goes a while after
        // its window.
        assert!(b1.undrain());
        assert_eq!(life.drains().len(), 1);
        tokio::time::advance(window + FINISHED_DRAIN_KEPT).await;
        assert!(life.drains().is_empty());
    }

    #[test]
    fn readiness_follows_the_flag() {
        let life = Lifecycle::new();
        assert!(!life.is_ready());
        life.set_ready(true);
        assert!(life.is_ready());
        assert!(!life.is_shutting_down());
        life.shutdown.cancel();
        assert!(life.is_shutting_down());
    }
}
