//! Ending live WebSockets on purpose, without a thundering herd.
//!
//! Every relayed connection registers a stop handle in the
//! [`Lifecycle`](crate::lifecycle::Lifecycle) while it runs. A drain (one
//! backend) or a shutdown (everything) takes a snapshot of the handles
//! concerned and one controller task signals them one by one, evenly spread
//! across the window with jitter inside each slot, so that the clients'
//! reconnects are spread too. The relay notices its handle at its next poll
//! and closes at a frame boundary (1012 for a drain, 1001 for a shutdown).
//! A drain's task ends early when the backend is undrained (or drained
//! again) or berth shuts down.
//!
//! Costs: a drain costs one task, not a timer per connection.

use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use crate::balancer::Backend;
use crate::lifecycle::Lifecycle;
use crate::ws::relay::StopReason;

/// Drains `backend`: it takes no new connections, and its live WebSockets
/// are closed with 1012 spread over `window`. Returns false if it was
/// already draining.
pub fn drain_backend(lifecycle: &Lifecycle, backend: &Arc<Backend>, window: Duration) -> bool {
    if !backend.start_drain() {
        return false;
    }
    let handles = lifecycle.stop_handles(Some(backend));
    tokio::spawn(drain_schedule(
        handles,
        Arc::clone(backend),
        window,
        lifecycle.shutdown.clone(),
        |h| h.stop(StopReason::Drain),
    ));
    true
}

/// Shutdown: every live WebSocket gets 1001, spread over `window`.
pub fn shut_down_all(lifecycle: &Lifecycle, window: Duration) {
    let handles = lifecycle.stop_handles(None);
    tokio::spawn(spread(
        handles,
        window,
        || false,
        |h| h.stop(StopReason::Shutdown),
    ));
}

/// A drain's schedule: [`spread`], ended by an undrain (or a newer drain)
/// of `backend`, or by shutdown (which closes everything itself).
async fn drain_schedule<T>(
    items: Vec<T>,
    backend: Arc<Backend>,
    window: Duration,
    shutdown: tokio_util::sync::CancellationToken,
    signal: impl Fn(&T),
) {
    let epoch = backend.drain_epoch();
    spread(
        items,
        window,
        || shutdown.is_cancelled() || backend.drain_epoch() != epoch,
        signal,
    )
    .await;
}

/// Signals `items` one by one: item `i` of `n` at
/// `start + window * (i + jitter) / n`, with jitter uniform in [0, 1).
/// Stops for good the first time `cancelled` says so.
async fn spread<T>(
    items: Vec<T>,
    window: Duration,
    cancelled: impl Fn() -> bool,
    signal: impl Fn(&T),
) {
    let n = items.len().max(1) as f64;
    let start = Instant::now();
    for (i, item) in items.iter().enumerate() {
        let jitter: f64 = rand::random();
        let at = start + window.mul_f64((i as f64 + jitter) / n);
        tokio::time::sleep_until(at).await;
        if cancelled() {
            return;
        }
        signal(item);
    }
}
