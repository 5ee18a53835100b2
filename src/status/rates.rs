//! Rates and the close history, from counter readings: pure arithmetic, no
//! clock and no metrics registry (the sampler hands in each [`Reading`] and
//! the time between readings), so the tests are tables.

use std::collections::{BTreeMap, VecDeque};
use std::time::Duration;

/// How much close history is kept: five minutes of one-second samples.
pub const HISTORY_SECONDS: usize = 300;
/// The close chart's bar width: 30 bars over the five minutes.
pub const BUCKET_SECONDS: usize = 10;
/// The window of the TLS resumed share.
pub const TLS_SHARE_SECONDS: usize = 60;

/// Counter values of one backend. Directions are
/// `[client_to_backend, backend_to_client]`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BackendCounts {
    /// Upgrades that succeeded (`result="ok"`).
    pub upgrades: u64,
    pub messages: [u64; 2],
    pub bytes: [u64; 2],
}

/// TLS handshake counters, summed over the listeners.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TlsCounts {
    /// Every handshake, whatever its result.
    pub all: u64,
    /// Successful ones.
    pub ok: u64,
    /// Successful ones that resumed a session.
    pub resumed: u64,
}

/// Every counter the status page turns into rates, read at one moment.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Reading {
    /// By (pool, backend id).
    pub backends: BTreeMap<(String, String), BackendCounts>,
    /// Connection ends by (pool, code label), summed over initiators.
    pub closes: BTreeMap<(String, String), u64>,
    pub tls: TlsCounts,
}

/// Per-second rates of one backend (directions as in [`BackendCounts`]).
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct BackendRates {
    pub upgrades: f64,
    pub messages: [f64; 2],
    pub bytes: [f64; 2],
}

/// The rates since the previous reading and the recent history.
#[derive(Default)]
pub struct History {
    previous: Option<Reading>,
    rates: BTreeMap<(String, String), BackendRates>,
    /// TLS handshakes per second over the last interval.
    tls_rate: f64,
    /// One entry per reading, newest last: closes in that interval.
    closes: VecDeque<BTreeMap<(String, String), u64>>,
    /// One entry per reading, newest last: (ok, resumed) handshakes.
    tls: VecDeque<(u64, u64)>,
}

/// How much a counter grew; a counter that went back (a series that was
/// removed and made again) counts from zero.
fn grew(now: u64, before: u64) -> u64 {
    if now >= before {
        now - before
    } else {
        now
    }
}

fn per_second(delta: u64, elapsed: Duration) -> f64 {
    let secs = elapsed.as_secs_f64();
    if secs <= 0.0 {
        0.0
    } else {
        delta as f64 / secs
    }
}

impl History {
    /// Takes a reading made `elapsed` after the previous one. The first
    /// reading only sets the baseline: its rates are zero.
    pub fn push(&mut self, reading: Reading, elapsed: Duration) {
        let before = self.previous.take().unwrap_or_else(|| reading.clone());
        self.rates = reading
            .backends
            .iter()
            .map(|(key, now)| {
                let was = before.backends.get(key).copied().unwrap_or(*now);
                let rate = |n: u64, b: u64| per_second(grew(n, b), elapsed);
                let rates = BackendRates {
                    upgrades: rate(now.upgrades, was.upgrades),
                    messages: [
                        rate(now.messages[0], was.messages[0]),
                        rate(now.messages[1], was.messages[1]),
                    ],
                    bytes: [
                        rate(now.bytes[0], was.bytes[0]),
                        rate(now.bytes[1], was.bytes[1]),
                    ],
                };
                (key.clone(), rates)
            })
            .collect();
        let closes: BTreeMap<(String, String), u64> = reading
            .closes
            .iter()
            .filter_map(|(key, &n)| {
                // A series first seen now counts from zero: its counter is
                // made by the first close with that code. (On the first
                // reading `before` is the reading itself: nothing counts.)
                let d = grew(n, before.closes.get(key).copied().unwrap_or(0));
                (d > 0).then(|| (key.clone(), d))
            })
            .collect();
        push_capped(&mut self.closes, closes, HISTORY_SECONDS);
        let tls = (
            grew(reading.tls.ok, before.tls.ok),
            grew(reading.tls.resumed, before.tls.resumed),
        );
        self.tls_rate = per_second(grew(reading.tls.all, before.tls.all), elapsed);
        push_capped(&mut self.tls, tls, TLS_SHARE_SECONDS);
        self.previous = Some(reading);
    }

    /// The rates of a backend over the last interval (zero if unknown).
    pub fn backend(&self, pool: &str, id: &str) -> BackendRates {
        self.rates
            .get(&(pool.to_string(), id.to_string()))
            .copied()
            .unwrap_or_default()
    }

    /// TLS handshakes per second over the last interval.
    pub fn tls_per_second(&self) -> f64 {
        self.tls_rate
    }

    /// Of the successful handshakes in the last [`TLS_SHARE_SECONDS`], the
    /// share that resumed a session; `None` when there were none.
    pub fn tls_resumed_share(&self) -> Option<f64> {
        let (ok, resumed) = self
            .tls
            .iter()
            .fold((0, 0), |(o, r), &(ok, res)| (o + ok, r + res));
        (ok > 0).then(|| resumed.min(ok) as f64 / ok as f64)
    }

    /// A pool's closes over the last five minutes: for each code label seen,
    /// [`HISTORY_SECONDS`] / [`BUCKET_SECONDS`] counts, oldest first (the
    /// last bucket ends now; history not yet recorded counts as zero).
    pub fn closes(&self, pool: &str) -> BTreeMap<String, Vec<u64>> {
        let buckets = HISTORY_SECONDS / BUCKET_SECONDS;
        let missing = HISTORY_SECONDS - self.closes.len();
        let mut out: BTreeMap<String, Vec<u64>> = BTreeMap::new();
        for (i, second) in self.closes.iter().enumerate() {
            let bucket = (missing + i) / BUCKET_SECONDS;
            for ((p, code), &n) in second {
                if p == pool {
                    out.entry(code.clone()).or_insert_with(|| vec![0; buckets])[bucket] += n;
                }
            }
        }
        out
    }
}

fn push_capped<T>(queue: &mut VecDeque<T>, item: T, cap: usize) {
    if queue.len() == cap {
        queue.pop_front();
    }
    queue.push_back(item);
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECOND: Duration = Duration::from_secs(1);

    fn key(pool: &str, id: &str) -> (String, String) {
        (pool.to_string(), id.to_string())
    }

    fn reading(
        backends: &[(&str, &str, BackendCounts)],
        closes: &[(&str, &str, u64)],
        tls: TlsCounts,
    ) -> Reading {
        Reading {
            backends: backends.iter().map(|(p, id, c)| (key(p, id), *c)).collect(),
            closes: closes.iter().map(|(p, c, n)| (key(p, c), *n)).collect(),
            tls,
        }
    }

    fn counts(upgrades: u64, messages: [u64; 2], bytes: [u64; 2]) -> BackendCounts {
        BackendCounts {
            upgrades,
            messages,
            bytes,
        }
    }

    #[test]
    fn rates_are_differences_over_the_interval() {
        let mut h = History::default();
        h.push(
            reading(
                &[("chat", "b1", counts(5, [10, 20], [100, 200]))],
                &[],
                TlsCounts::default(),
            ),
            SECOND,
        );
        // The first reading is only a baseline.
        assert_eq!(h.backend("chat", "b1"), BackendRates::default());
        h.push(
            reading(
                &[("chat", "b1", counts(7, [40, 20], [1100, 600]))],
                &[],
                TlsCounts::default(),
            ),
            Duration::from_secs(2),
        );
        assert_eq!(
            h.backend("chat", "b1"),
            BackendRates {
                upgrades: 1.0,
                messages: [15.0, 0.0],
                bytes: [500.0, 200.0],
            }
        );
        // Unknown backends, and a zero interval, give zero.
        assert_eq!(h.backend("chat", "b9"), BackendRates::default());
        h.push(
            reading(
                &[("chat", "b1", counts(9, [40, 20], [1100, 600]))],
                &[],
                TlsCounts::default(),
            ),
            Duration::ZERO,
        );
        assert_eq!(h.backend("chat", "b1").upgrades, 0.0);
    }

    #[test]
    fn a_new_backend_starts_at_zero_and_a_reset_counts_from_zero() {
        let mut h = History::default();
        h.push(reading(&[], &[], TlsCounts::default()), SECOND);
        // A backend that appears (a reload) has no baseline: zero.
        h.push(
            reading(
                &[("chat", "b2", counts(3, [3, 3], [3, 3]))],
                &[],
                TlsCounts::default(),
            ),
            SECOND,
        );
        assert_eq!(h.backend("chat", "b2"), BackendRates::default());
        // A counter that went back (a series made again) counts from zero.
        h.push(
            reading(
                &[("chat", "b2", counts(2, [3, 3], [3, 3]))],
                &[],
                TlsCounts::default(),
            ),
            SECOND,
        );
        assert_eq!(h.backend("chat", "b2").upgrades, 2.0);
    }

    #[test]
    fn closes_fall_into_ten_second_buckets_ending_now() {
        let mut h = History::default();
        let none = TlsCounts::default();
        h.push(reading(&[], &[("chat", "1000", 4)], none), SECOND);
        // Before the first reading: not counted (it happened before berth looked).
        assert!(h.closes("chat").is_empty());
        h.push(
            reading(&[], &[("chat", "1000", 6), ("chat", "1012", 1)], none),
            SECOND,
        );
        h.push(
            reading(
                &[],
                &[
                    ("chat", "1000", 6),
                    ("chat", "1012", 1),
                    ("feed", "1001", 9),
                ],
                none,
            ),
            SECOND,
        );
        let chat = h.closes("chat");
        assert_eq!(chat.keys().collect::<Vec<_>>(), ["1000", "1012"]);
        let buckets = HISTORY_SECONDS / BUCKET_SECONDS;
        assert_eq!(chat["1000"].len(), buckets);
        // Three readings: all in the last bucket.
        assert_eq!(chat["1000"][buckets - 1], 2);
        assert_eq!(chat["1012"][buckets - 1], 1);
        assert_eq!(chat["1000"].iter().sum::<u64>(), 2);
        // A series that first appears later counts from zero.
        assert_eq!(h.closes("feed")["1001"][buckets - 1], 9);
    }

    #[test]
    fn close_history_keeps_five_minutes() {
        let mut h = History::default();
        let none = TlsCounts::default();
        h.push(reading(&[], &[("chat", "1006", 0)], none), SECOND);
        for total in 1..=(HISTORY_SECONDS as u64 + 20) {
            h.push(reading(&[], &[("chat", "1006", total)], none), SECOND);
        }
        let chat = h.closes("chat");
        // One close per second for longer than the window: every bucket
        // holds ten, and nothing older than the window is left.
        assert!(
            chat["1006"].iter().all(|&n| n == BUCKET_SECONDS as u64),
            "{chat:?}"
        );
        assert_eq!(h.closes.len(), HISTORY_SECONDS);
    }

    #[test]
    fn tls_rate_and_resumed_share() {
        let mut h = History::default();
        let tls = |all, ok, resumed| TlsCounts { all, ok, resumed };
        h.push(reading(&[], &[], tls(10, 8, 2)), SECOND);
        assert_eq!(h.tls_resumed_share(), None);
        h.push(reading(&[], &[], tls(20, 16, 8)), SECOND);
        assert_eq!(h.tls_per_second(), 10.0);
        assert_eq!(h.tls_resumed_share(), Some(0.75));
        h.push(reading(&[], &[], tls(22, 18, 8)), SECOND);
        assert_eq!(h.tls_per_second(), 2.0);
        // (6 + 0) resumed of (8 + 2) in the window.
        assert_eq!(h.tls_resumed_share(), Some(0.6));
        // Sixty quiet seconds later the share is unknown again.
        for _ in 0..TLS_SHARE_SECONDS {
            h.push(reading(&[], &[], tls(22, 18, 8)), SECOND);
        }
        assert_eq!(h.tls_resumed_share(), None);
        assert_eq!(h.tls_per_second(), 0.0);
    }
}
