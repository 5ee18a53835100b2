//! The per-pool token bucket for WebSocket upgrades
//! (`max_upgrades_per_second`, `upgrade_burst`).
//!
//! It is the generic cell rate algorithm: one atomic "theoretical arrival
//! time" instead of a token count and a timestamp. Each admitted upgrade
//! moves it one interval (1 s / rate) on from the later of itself and now;
//! an upgrade that would move it more than `burst` intervals ahead of now
//! is refused. That is a bucket of `burst` tokens refilled at `rate` per
//! second, taken with one compare-and-swap and no lock. It owns no task.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use crate::config::UpgradeRate;

/// A lock-free token bucket.
#[derive(Debug)]
pub struct UpgradeBucket {
    rate: UpgradeRate,
    /// Nanoseconds per token.
    interval: u64,
    /// How far ahead of now the arrival time may run: `burst` intervals.
    tolerance: u64,
    /// The theoretical arrival time, in nanoseconds since `origin`.
    tat: AtomicU64,
    origin: Instant,
}

impl UpgradeBucket {
    /// A full bucket.
    pub fn new(rate: UpgradeRate) -> UpgradeBucket {
        let interval = 1_000_000_000 / u64::from(rate.per_second.max(1));
        UpgradeBucket {
            rate,
            interval,
            tolerance: interval.saturating_mul(u64::from(rate.burst.max(1))),
            tat: AtomicU64::new(0),
            origin: Instant::now(),
        }
    }

    /// The rate and burst this bucket enforces.
    pub fn rate(&self) -> UpgradeRate {
        self.rate
    }

    /// Takes a token if there is one.
    pub fn try_take(&self) -> bool {
        let now = u64::try_from(self.origin.elapsed().as_nanos()).unwrap_or(u64::MAX);
        self.try_take_at(now)
    }

    /// [`try_take`](Self::try_take) at `now` nanoseconds after the origin.
    fn try_take_at(&self, now: u64) -> bool {
        let mut tat = self.tat.load(Ordering::Relaxed);
        loop {
            let next = tat.max(now).saturating_add(self.interval);
            if next - now > self.tolerance {
                return false;
            }
            match self
                .tat
                .compare_exchange_weak(tat, next, Ordering::Relaxed, Ordering::Relaxed)
            {
                Ok(_) => return true,
                Err(current) => tat = current,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECOND: u64 = 1_000_000_000;

    fn bucket(per_second: u32, burst: u32) -> UpgradeBucket {
        UpgradeBucket::new(UpgradeRate { per_second, burst })
    }

    /// How many of `n` attempts at `at` are admitted.
    fn admitted(b: &UpgradeBucket, at: u64, n: usize) -> usize {
        (0..n).filter(|_| b.try_take_at(at)).count()
    }

    #[test]
    fn a_full_bucket_admits_the_burst_then_the_rate() {
        let b = bucket(10, 30);
        let start = 5 * SECOND;
        assert_eq!(admitted(&b, start, 100), 30);
        // A tenth of a second refills one token...
        assert_eq!(admitted(&b, start + SECOND / 10, 100), 1);
        // ... and a whole second ten.
        assert_eq!(admitted(&b, start + SECOND + SECOND / 10, 100), 10);
        // A long quiet spell refills the bucket, never beyond the burst.
        assert_eq!(admitted(&b, start + 3600 * SECOND, 100), 30);
    }

    #[test]
    fn a_steady_stream_at_the_rate_is_never_refused() {
        let b = bucket(100, 1);
        for i in 0..1000 {
            assert!(b.try_take_at(SECOND + i * SECOND / 100), "attempt {i}");
        }
        // Twice the rate: every other one is refused.
        let b = bucket(100, 1);
        let got = (0..1000)
            .filter(|i| b.try_take_at(SECOND + i * SECOND / 200))
            .count();
        assert_eq!(got, 500);
    }

    #[test]
    fn threads_share_one_bucket_without_losing_or_inventing_tokens() {
        let b = std::sync::Arc::new(bucket(1, 1000));
        let handles: Vec<_> = (0..4)
            .map(|_| {
                let b = std::sync::Arc::clone(&b);
                std::thread::spawn(move || admitted(&b, 10 * SECOND, 500))
            })
            .collect();
        let total: usize = handles.into_iter().map(|h| h.join().unwrap()).sum();
        assert_eq!(total, 1000);
    }
}
