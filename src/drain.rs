//! Ending live WebSockets on purpose, without a thundering herd.
//!
//! Every relayed connection registers a [`StopHandle`] here while it runs.
//! A drain (one backend) or a shutdown (everything) takes a snapshot of the
//! handles concerned and one controller task signals them one by one,
//! evenly spread across the window with jitter inside each slot, so that
//! the clients' reconnects are spread too. The relay notices its handle at
//! its next poll and closes at a frame boundary (1012 for a drain, 1001 for
//! a shutdown).
//!
//! Costs: a handle is an atomic and a waker slot; the registry lock is
//! taken when a connection starts and ends, never per frame; a drain costs
//! one task, not a timer per connection.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::balancer::{Backend, BackendState};
use crate::ws::relay::{StopHandle, StopReason};

/// The live relays, each with its backend.
#[derive(Default)]
pub struct Registry {
    inner: Mutex<Inner>,
}

#[derive(Default)]
struct Inner {
    next_id: u64,
    conns: HashMap<u64, (Arc<StopHandle>, Arc<Backend>)>,
}

impl Registry {
    fn lock(&self) -> MutexGuard<'_, Inner> {
        match self.inner.lock() {
            Ok(g) => g,
            Err(poisoned) => poisoned.into_inner(),
        }
    }

    /// Registers a relay about to start. A connection that races a drain of
    /// its backend, or a shutdown, is told to stop at once.
    pub fn register(&self, backend: &Arc<Backend>, shutting_down: bool) -> (u64, Arc<StopHandle>) {
        let handle = Arc::new(StopHandle::default());
        if shutting_down {
            handle.stop(StopReason::Shutdown);
        } else if backend.state() == BackendState::Draining {
            handle.stop(StopReason::Drain);
        }
        let mut inner = self.lock();
        inner.next_id += 1;
        let id = inner.next_id;
        inner
            .conns
            .insert(id, (Arc::clone(&handle), Arc::clone(backend)));
        (id, handle)
    }

    pub fn unregister(&self, id: u64) {
        self.lock().conns.remove(&id);
    }

    /// The handles of one backend's connections, or of all of them.
    fn snapshot(&self, backend: Option<&Arc<Backend>>) -> Vec<Arc<StopHandle>> {
        self.lock()
            .conns
            .values()
            .filter(|(_, b)| backend.is_none_or(|want| Arc::ptr_eq(want, b)))
            .map(|(h, _)| Arc::clone(h))
            .collect()
    }
}

/// Drains `backend`: it takes no new connections, and its live WebSockets
/// are closed with 1012 spread over `window`. Returns false if it was
/// already draining.
pub fn drain_backend(
    registry: &Registry,
    backend: &Arc<Backend>,
    window: Duration,
    shutdown: &CancellationToken,
) -> bool {
    if !backend.start_drain() {
        return false;
    }
    let handles = registry.snapshot(Some(backend));
    let backend = Arc::clone(backend);
    let shutdown = shutdown.clone();
    tokio::spawn(async move {
        let epoch = backend.drain_epoch();
        spread(handles, window, StopReason::Drain, || {
            // An undrain (or a newer drain) ends this schedule.
            shutdown.is_cancelled() || backend.drain_epoch() != epoch
        })
        .await;
    });
    true
}

/// Shutdown: every live WebSocket gets 1001, spread over `window`.
pub fn shut_down_all(registry: &Registry, window: Duration) {
    let handles = registry.snapshot(None);
    tokio::spawn(spread(handles, window, StopReason::Shutdown, || false));
}

/// Signals `handles` one by one: handle `i` of `n` at
/// `start + window * (i + jitter) / n`, with jitter uniform in [0, 1).
async fn spread(
    handles: Vec<Arc<StopHandle>>,
    window: Duration,
    reason: StopReason,
    cancelled: impl Fn() -> bool,
) {
    let n = handles.len().max(1) as f64;
    let start = Instant::now();
    for (i, handle) in handles.iter().enumerate() {
        let jitter: f64 = rand::random();
        let at = start + window.mul_f64((i as f64 + jitter) / n);
        tokio::time::sleep_until(at).await;
        if cancelled() {
            return;
        }
        handle.stop(reason);
    }
}
