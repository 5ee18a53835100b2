//! Where a running berth is in its life, and the live connections that a
//! drain or a shutdown must reach.
//!
//! [`Lifecycle`] holds the shutdown token, the tracker of connection and
//! relay tasks (shutdown waits for it), the readiness flag `/readyz`
//! reports, and the registry of live relays: every relayed WebSocket
//! registers a [`StopHandle`] with its backend while it runs, so that a
//! drain (one backend) or a shutdown (all) can signal it. The registry lock
//! is taken when a relay starts and ends, never per frame. This module
//! starts no tasks; the drain controllers that use the registry live in
//! `drain`.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::balancer::{Backend, BackendState};
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
}

/// A live relay's entry in the registry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RelayId(u64);

#[derive(Default)]
struct Relays {
    next_id: u64,
    live: HashMap<u64, (Arc<StopHandle>, Arc<Backend>)>,
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
        let handle = Arc::new(StopHandle::default());
        if self.is_shutting_down() {
            handle.stop(StopReason::Shutdown);
        } else if backend.state() == BackendState::Draining {
            handle.stop(StopReason::Drain);
        }
        self.ws_live.fetch_add(1, Ordering::Relaxed);
        let mut relays = self.relays();
        relays.next_id += 1;
        let id = relays.next_id;
        relays
            .live
            .insert(id, (Arc::clone(&handle), Arc::clone(backend)));
        (RelayId(id), handle)
    }

    /// Removes a relay that has ended.
    pub fn relay_ended(&self, id: RelayId) {
        if self.relays().live.remove(&id.0).is_some() {
            self.ws_live.fetch_sub(1, Ordering::Relaxed);
        }
    }

    /// The stop handles of one backend's relays, or of all of them.
    pub fn stop_handles(&self, backend: Option<&Arc<Backend>>) -> Vec<Arc<StopHandle>> {
        self.relays()
            .live
            .values()
            .filter(|(_, b)| backend.is_none_or(|want| Arc::ptr_eq(want, b)))
            .map(|(h, _)| Arc::clone(h))
            .collect()
    }
}
