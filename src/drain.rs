//! Ending live WebSockets on purpose, without a thundering herd.
//!
//! Every relayed connection registers a stop handle in the [`Lifecycle`]
//! while it runs. A drain (one backend) or a shutdown (everything) takes a
//! snapshot of the handles concerned and one controller task signals them
//! one by one, evenly spread across the window with jitter inside each
//! slot, so that the clients' reconnects are spread too. The relay notices
//! its handle at its next poll and closes at a frame boundary (1012 for a
//! drain, 1001 for a shutdown).
//! A drain's task ends early when the backend is put back in service or
//! berth shuts down. Each drain is recorded in the lifecycle (its backend,
//! connection count, start and window) for the status page.
//!
//! A backend drains while the admin API or its config (`drain = true`)
//! says so ([`DrainSource`]); [`apply_config_drains`] brings the config's
//! side in line after every load, and the connections are closed once,
//! when the first source puts the backend out of service. The same
//! [`spread`] paces a rebalance's closes (`crate::rebalance`).
//!
//! Costs: a drain costs one task, not a timer per connection.

use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use crate::balancer::{Backend, DrainSource};
use crate::lifecycle::Lifecycle;
use crate::routing::Runtime;
use crate::ws::relay::StopReason;

/// Drains `backend`: it takes no new connections, and its live WebSockets
/// are closed with 1012 spread over `window`. Returns false if it was
/// already draining.
pub fn drain_backend(lifecycle: &Lifecycle, backend: &Arc<Backend>, window: Duration) -> bool {
    drain_backend_by(lifecycle, backend, window, DrainSource::Admin)
}

/// [`drain_backend`] on behalf of `source`: its drain is in force from now
/// on; the connections are closed only if no other source drained the
/// backend already (then this returns false).
pub fn drain_backend_by(
    lifecycle: &Lifecycle,
    backend: &Arc<Backend>,
    window: Duration,
    source: DrainSource,
) -> bool {
    if !backend.start_drain_by(source) {
        return false;
    }
    let handles = lifecycle.stop_handles(Some(backend));
    lifecycle.drain_started(backend, handles.len(), window);
    tokio::spawn(drain_schedule(
        handles,
        Arc::clone(backend),
        window,
        lifecycle.shutdown.clone(),
        |h| h.stop(StopReason::Drain),
    ));
    true
}

/// Puts every configured backend's `drain = true` in force, and lifts it
/// from the backends whose config no longer says so (an admin drain stays).
/// Called after every config load, with the table in force.
pub fn apply_config_drains(lifecycle: &Lifecycle, runtime: &Runtime) {
    for pool in runtime.pools.values() {
        for wanted in &pool.config.backends {
            let Some(backend) = pool.find(&wanted.id) else {
                continue;
            };
            if wanted.drain && !backend.drained_by(DrainSource::Config) {
                drain_backend_by(
                    lifecycle,
                    backend,
                    pool.config.drain_window,
                    DrainSource::Config,
                );
            } else if !wanted.drain && backend.drained_by(DrainSource::Config) {
                backend.undrain_by(DrainSource::Config);
            }
        }
    }
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
pub async fn spread<T>(
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

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use super::*;
    use crate::proxy::testing;

    const ONE_BACKEND: &str = r#"
[[listeners]]
name = "public"
bind = "127.0.0.1:0"

[[routes]]
pool = "main"

[[pools.main.backends]]
id = "b1"
address = "127.0.0.1:9"
"#;

    /// When each item was signalled, from the start.
    type Log = Arc<Mutex<Vec<(usize, Duration)>>>;

    fn recorder(log: &Log, start: Instant) -> impl Fn(&(usize, Arc<crate::ws::relay::StopHandle>)) {
        let log = Arc::clone(log);
        move |(i, handle)| {
            handle.stop(StopReason::Drain);
            log.lock().unwrap().push((*i, start.elapsed()));
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_drain_signals_every_handle_once_in_its_own_slot() {
        let ctx = testing::context(ONE_BACKEND);
        let backend = Arc::clone(&ctx.routing.load().pools["main"].backends[0]);
        let n = 8;
        for _ in 0..n {
            ctx.lifecycle.relay_started(&backend);
        }
        let handles: Vec<_> = ctx
            .lifecycle
            .stop_handles(Some(&backend))
            .into_iter()
            .enumerate()
            .collect();
        assert_eq!(handles.len(), n);
        assert!(backend.start_drain());
        let log: Log = Arc::default();
        let window = Duration::from_secs(8);
        let shutdown = ctx.lifecycle.shutdown.clone();
        let record = recorder(&log, Instant::now());
        drain_schedule(handles, Arc::clone(&backend), window, shutdown, record).await;

        let log = log.lock().unwrap();
        assert_eq!(log.len(), n, "{log:?}");
        let slot = window / n as u32;
        for (k, &(i, at)) in log.iter().enumerate() {
            assert_eq!(i, k, "signalled out of order: {log:?}");
            // Handle i of n goes in [i, i+1) slots (the timer rounds up to 1 ms).
            assert!(at >= slot * i as u32, "{i} at {at:?}");
            assert!(
                at <= slot * (i as u32 + 1) + Duration::from_millis(1),
                "{i} at {at:?}"
            );
        }
        // Jittered inside the slots, not lined up on their starts.
        assert!(
            log.iter()
                .any(|&(i, at)| at > slot * i as u32 + Duration::from_millis(1)),
            "{log:?}"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn an_undrain_stops_the_schedule() {
        let ctx = testing::context(ONE_BACKEND);
        let backend = Arc::clone(&ctx.routing.load().pools["main"].backends[0]);
        let handles: Vec<_> = (0..4)
            .map(|i| (i, ctx.lifecycle.relay_started(&backend).1))
            .collect();
        assert!(backend.start_drain());
        let log: Log = Arc::default();
        let start = Instant::now();
        let record = recorder(&log, start);
        let window = Duration::from_secs(4);
        let shutdown = ctx.lifecycle.shutdown.clone();
        let task = tokio::spawn(drain_schedule(
            handles,
            Arc::clone(&backend),
            window,
            shutdown,
            record,
        ));
        // Slot 0 is over; slot 1 may or may not have fired.
        tokio::time::sleep(Duration::from_millis(1500)).await;
        let before = log.lock().unwrap().len();
        assert!((1..=2).contains(&before), "{before}");
        assert!(backend.undrain());
        task.await.unwrap();
        assert_eq!(log.lock().unwrap().len(), before);
        // It ended at its next slot, not at the end of the window.
        assert!(
            start.elapsed() <= Duration::from_secs(3),
            "{:?}",
            start.elapsed()
        );
    }

    #[tokio::test(start_paused = true)]
    async fn shutdown_stops_a_drain_schedule() {
        let ctx = testing::context(ONE_BACKEND);
        let backend = Arc::clone(&ctx.routing.load().pools["main"].backends[0]);
        let handles: Vec<_> = (0..4)
            .map(|i| (i, ctx.lifecycle.relay_started(&backend).1))
            .collect();
        assert!(backend.start_drain());
        let log: Log = Arc::default();
        let record = recorder(&log, Instant::now());
        let shutdown = ctx.lifecycle.shutdown.clone();
        let task = tokio::spawn(drain_schedule(
            handles,
            Arc::clone(&backend),
            Duration::from_secs(4),
            shutdown,
            record,
        ));
        tokio::time::sleep(Duration::from_millis(500)).await;
        ctx.lifecycle.shutdown.cancel();
        task.await.unwrap();
        assert!(log.lock().unwrap().len() <= 1);
    }

    #[tokio::test]
    async fn a_backend_drains_once_until_undrained() {
        let ctx = testing::context(ONE_BACKEND);
        let backend = Arc::clone(&ctx.routing.load().pools["main"].backends[0]);
        let window = Duration::from_millis(10);
        assert!(drain_backend(&ctx.lifecycle, &backend, window));
        assert!(!drain_backend(&ctx.lifecycle, &backend, window));
        assert!(backend.undrain());
        assert!(drain_backend(&ctx.lifecycle, &backend, window));
    }
}
