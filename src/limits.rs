//! Connection admission: the per-listener caps, the per-address counts and
//! the process-wide file-descriptor reserve.
//!
//! A listener asks [`ListenerLimits::admit`] for a [`Slot`] for every
//! socket it accepts; a refused socket is closed at once by the listener.
//! The slot is held by the connection (through the proxy's `ConnInfo`, so an
//! upgraded connection keeps it until its relay ends) and gives everything
//! back when dropped. Admission costs two atomic additions, and with
//! `max_connections_per_ip` one entry of a sharded map (a short lock on one
//! shard, never on the whole map).
//!
//! [`FdGuard`] keeps berth away from its open-file limit: it refuses new
//! client connections while the estimated descriptor use plus a reserve
//! ([`fd_reserve`]) would not fit under the limit, so that every accepted
//! client can still get a backend socket, a health check and an admin
//! request. The estimate is berth's own count of client connections, two
//! descriptors each (the client's socket and its backend's), corrected by a
//! count of `/proc/self/fd` that [`FdGuard::monitor`] takes every few
//! seconds: counting every socket berth opens where it opens it would reach
//! into every module that connects anywhere, and counting `/proc/self/fd`
//! on each accept would cost a directory read of up to tens of thousands of
//! entries per connection. The monitor is the one task this module starts;
//! it ends with the shutdown token.

use std::net::IpAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use dashmap::DashMap;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

/// Why a connection was refused; [`Refusal::label`] is the `reason` label
/// of `berth_connections_refused_total`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Refusal {
    /// The listener has `max_connections` open.
    ListenerFull,
    /// The client's address (an IPv6 /64) has `max_connections_per_ip` open.
    PerIp,
    /// berth is inside its file-descriptor reserve.
    FdLimit,
    /// A listener with `proxy_protocol`: the peer is not in
    /// `proxy_protocol_from`, or its PROXY header is missing or malformed.
    ProxyProtocol,
}

impl Refusal {
    pub fn label(self) -> &'static str {
        match self {
            Refusal::ListenerFull => "listener_full",
            Refusal::PerIp => "per_ip",
            Refusal::FdLimit => "fd_limit",
            Refusal::ProxyProtocol => "proxy_protocol",
        }
    }
}

/// A listener's caps, as configured now (a reload may change them).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Caps {
    pub max_connections: Option<u64>,
    pub max_connections_per_ip: Option<u64>,
}

/// The address a client is counted under: an IPv4 address (IPv4-mapped
/// IPv6 included), or the /64 of an IPv6 address, since one IPv6 client
/// usually holds a whole /64.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum IpKey {
    V4(u32),
    V6(u64),
}

impl IpKey {
    pub fn of(ip: IpAddr) -> IpKey {
        match ip {
            IpAddr::V4(v4) => IpKey::V4(u32::from(v4)),
            IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
                Some(v4) => IpKey::V4(u32::from(v4)),
                None => {
                    let bits = u128::from(v6) >> 64;
                    IpKey::V6(u64::try_from(bits).unwrap_or(u64::MAX))
                }
            },
        }
    }
}

/// One listener's counts. It lives as long as the listener's socket, so
/// counts carry over a reload that keeps the listener.
pub struct ListenerLimits {
    open: AtomicU64,
    /// Open connections per address, only while `max_connections_per_ip`
    /// is set; an address leaves the map with its last connection.
    per_ip: DashMap<IpKey, u64>,
    fds: Arc<FdGuard>,
}

impl ListenerLimits {
    pub fn new(fds: Arc<FdGuard>) -> ListenerLimits {
        ListenerLimits {
            open: AtomicU64::new(0),
            per_ip: DashMap::new(),
            fds,
        }
    }

    /// Admits a connection from `peer` under `caps`, or says why not. The
    /// descriptor reserve is checked first: it protects the whole process.
    pub fn admit(self: &Arc<Self>, peer: IpAddr, caps: Caps) -> Result<Slot, Refusal> {
        if !self.fds.has_room() {
            return Err(Refusal::FdLimit);
        }
        let open = self.open.fetch_add(1, Ordering::Relaxed) + 1;
        if caps.max_connections.is_some_and(|max| open > max) {
            self.open.fetch_sub(1, Ordering::Relaxed);
            return Err(Refusal::ListenerFull);
        }
        let ip = match caps.max_connections_per_ip {
            None => None,
            Some(max) => match self.count_ip(peer, max) {
                Some(key) => Some(key),
                None => {
                    self.open.fetch_sub(1, Ordering::Relaxed);
                    return Err(Refusal::PerIp);
                }
            },
        };
        self.fds.clients.fetch_add(1, Ordering::Relaxed);
        Ok(Slot {
            listener: Arc::clone(self),
            ip,
        })
    }

    /// Counts one more connection from `ip`'s address, unless it already
    /// has `max`; the key counted under.
    fn count_ip(&self, ip: IpAddr, max: u64) -> Option<IpKey> {
        let key = IpKey::of(ip);
        let mut count = self.per_ip.entry(key).or_insert(0);
        // A new entry starts at 0 and every cap is at least 1, so a
        // refusal never leaves an empty entry behind.
        if *count >= max {
            return None;
        }
        *count += 1;
        Some(key)
    }

    /// Connections open on this listener.
    pub fn open(&self) -> u64 {
        self.open.load(Ordering::Relaxed)
    }

    /// Connections open from `ip`'s address (0 unless the per-address cap
    /// was set when they were accepted).
    pub fn open_from(&self, ip: IpAddr) -> u64 {
        self.per_ip.get(&IpKey::of(ip)).map_or(0, |c| *c)
    }
}

/// An admitted connection's place in the counts; dropping it gives the
/// place back.
#[derive(Debug)]
pub struct Slot {
    listener: Arc<ListenerLimits>,
    /// The address counted for `max_connections_per_ip`, if it was set.
    ip: Option<IpKey>,
}

impl Slot {
    /// Counts the connection under `ip` for `max_connections_per_ip` (a
    /// listener with `proxy_protocol` learns the client's address from the
    /// PROXY header, after admission): `Err(PerIp)` when that address has
    /// `max` open already. A slot already counted under an address keeps it.
    pub fn claim_ip(&mut self, ip: IpAddr, max: Option<u64>) -> Result<(), Refusal> {
        let Some(max) = max else {
            return Ok(());
        };
        if self.ip.is_some() {
            return Ok(());
        }
        match self.listener.count_ip(ip, max) {
            Some(key) => {
                self.ip = Some(key);
                Ok(())
            }
            None => Err(Refusal::PerIp),
        }
    }
}

impl std::fmt::Debug for ListenerLimits {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ListenerLimits")
            .field("open", &self.open())
            .finish_non_exhaustive()
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        let l = &self.listener;
        l.open.fetch_sub(1, Ordering::Relaxed);
        l.fds.clients.fetch_sub(1, Ordering::Relaxed);
        if let Some(key) = self.ip {
            l.per_ip.remove_if_mut(&key, |_, count| {
                *count = count.saturating_sub(1);
                *count == 0
            });
        }
    }
}

// ---------------------------------------------------------------------------
// The file-descriptor reserve
// ---------------------------------------------------------------------------

/// Descriptors kept free under the open-file limit: a fixed 256 (admin
/// connections, health checks, config and certificate files, DNS lookups,
/// listeners bound by a reload) plus 1% of the limit.
pub fn fd_reserve(limit: u64) -> u64 {
    256 + limit / 100
}

/// How often the monitor counts descriptors while far from the limit...
const SAMPLE_EVERY: Duration = Duration::from_secs(5);
/// ...and while within a quarter of it, or refusing.
const SAMPLE_NEAR: Duration = Duration::from_secs(1);

/// The process-wide descriptor estimate and the refusal episode state.
#[derive(Debug)]
pub struct FdGuard {
    /// Client connections admitted and still open, on every listener.
    clients: AtomicU64,
    /// The last count of open descriptors (high 32 bits) and of clients at
    /// that moment (low 32 bits), in one word so they are read together.
    sampled: AtomicU64,
    /// RLIMIT_NOFILE's soft limit when last read.
    limit: AtomicU64,
    /// Descriptors berth held before any client (from the first count).
    base: AtomicU64,
    /// Whether `/proc/self/fd` could be counted at all (not on every OS).
    counted: bool,
    /// True from the first refusal of an episode until one is admitted.
    refusing: AtomicBool,
    /// Refusals in the current episode.
    refused: AtomicU64,
    /// Wakes the monitor early (an accept failed for lack of descriptors).
    wake: Notify,
    /// One descriptor held back so that, should `accept` fail with EMFILE
    /// anyway, a pending connection can still be accepted and closed.
    spare: Mutex<Option<std::fs::File>>,
}

/// A `/proc/self/fd` count (None where there is no /proc).
fn count_open_fds() -> Option<u64> {
    let entries = std::fs::read_dir("/proc/self/fd").ok()?;
    // The directory handle itself is one of the entries.
    Some((entries.count() as u64).saturating_sub(1))
}

/// RLIMIT_NOFILE's soft limit (a huge or infinite one counts as the
/// kernel's usual per-process ceiling).
fn soft_limit() -> u64 {
    rlimit::getrlimit(rlimit::Resource::NOFILE)
        .map_or(1024, |(soft, _)| soft)
        .min(1 << 20)
}

fn open_spare() -> Option<std::fs::File> {
    std::fs::File::open("/dev/null").ok()
}

impl Default for FdGuard {
    fn default() -> FdGuard {
        FdGuard::new()
    }
}

impl FdGuard {
    /// Reads the limit and counts the descriptors open now.
    pub fn new() -> FdGuard {
        let spare = open_spare();
        let first = count_open_fds();
        let base = first.unwrap_or(0);
        FdGuard {
            clients: AtomicU64::new(0),
            sampled: AtomicU64::new(base << 32),
            limit: AtomicU64::new(soft_limit()),
            base: AtomicU64::new(base),
            counted: first.is_some(),
            refusing: AtomicBool::new(false),
            refused: AtomicU64::new(0),
            wake: Notify::new(),
            spare: Mutex::new(spare),
        }
    }

    /// The soft open-file limit as last read.
    pub fn limit(&self) -> u64 {
        self.limit.load(Ordering::Relaxed)
    }

    /// The descriptors berth is estimated to use with `clients` client
    /// connections open: at least two per client plus what berth held
    /// before any, and at least the last count plus two per client since.
    fn estimate(&self, clients: u64) -> u64 {
        let sampled = self.sampled.load(Ordering::Relaxed);
        let (total, then) = (sampled >> 32, sampled & 0xffff_ffff);
        let counted = (total + 2 * clients).saturating_sub(2 * then);
        counted.max(self.base.load(Ordering::Relaxed) + 2 * clients)
    }

    /// Whether one more client (two more descriptors) fits above the
    /// reserve. The first refusal of an episode is logged; so is its end.
    fn has_room(&self) -> bool {
        let limit = self.limit();
        let clients = self.clients.load(Ordering::Relaxed);
        let estimate = self.estimate(clients);
        let room = estimate + 2 + fd_reserve(limit) <= limit;
        if room {
            if self.refusing.load(Ordering::Relaxed) && self.refusing.swap(false, Ordering::Relaxed)
            {
                tracing::info!(
                    refused = self.refused.swap(0, Ordering::Relaxed),
                    open_files_estimate = estimate,
                    limit,
                    "descriptors are free again: accepting new client connections"
                );
            }
        } else {
            self.refused.fetch_add(1, Ordering::Relaxed);
            if !self.refusing.swap(true, Ordering::Relaxed) {
                tracing::warn!(
                    open_files_estimate = estimate,
                    client_connections = clients,
                    limit,
                    reserve = fd_reserve(limit),
                    "near the open-file limit: refusing new client connections until descriptors free up"
                );
                self.wake.notify_one();
            }
        }
        room
    }

    /// Counts the open descriptors and re-reads the limit now.
    pub fn sample(&self) {
        let clients = self.clients.load(Ordering::Relaxed);
        if let Some(total) = count_open_fds() {
            let packed = (total.min(u64::from(u32::MAX)) << 32) | clients.min(0xffff_ffff);
            self.sampled.store(packed, Ordering::Relaxed);
        }
        self.limit.store(soft_limit(), Ordering::Relaxed);
    }

    /// Counts descriptors every few seconds (every second near the limit)
    /// until `shutdown`; an accept that failed for lack of descriptors
    /// wakes it at once.
    pub async fn monitor(self: Arc<Self>, shutdown: CancellationToken) {
        let limit = self.limit();
        let room = self.room_for_clients();
        if room < 100 {
            tracing::warn!(limit, reserve = fd_reserve(limit), client_connections = room, "the open-file limit leaves room for very few client connections; raise it (LimitNOFILE= under systemd, ulimit -n)");
        } else {
            tracing::info!(
                limit,
                reserve = fd_reserve(limit),
                client_connections = room,
                "open-file limit and reserve"
            );
        }
        loop {
            let me = Arc::clone(&self);
            // A directory read of up to the whole limit's entries: off the
            // runtime's worker threads.
            if tokio::task::spawn_blocking(move || me.sample())
                .await
                .is_err()
            {
                return;
            }
            let limit = self.limit();
            let estimate = self.estimate(self.clients.load(Ordering::Relaxed));
            let near = self.refusing.load(Ordering::Relaxed) || estimate * 4 >= limit * 3;
            let every = if near { SAMPLE_NEAR } else { SAMPLE_EVERY };
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(every) => {}
                _ = self.wake.notified() => {}
            }
        }
    }

    /// An accept failed with EMFILE or ENFILE: gives up the spare
    /// descriptor for the length of `accept_one` (which accepts and closes
    /// one pending connection, so it does not wait in the backlog), takes
    /// it back, and wakes the monitor. False when there was no spare to
    /// give (the caller backs off instead).
    pub fn with_spare(&self, accept_one: impl FnOnce() -> bool) -> bool {
        self.wake.notify_one();
        let mut spare = self.spare_slot();
        if spare.take().is_none() {
            *spare = open_spare();
            return false;
        }
        let accepted = accept_one();
        *spare = open_spare();
        accepted
    }

    fn spare_slot(&self) -> MutexGuard<'_, Option<std::fs::File>> {
        match self.spare.lock() {
            Ok(g) => g,
            Err(poisoned) => poisoned.into_inner(),
        }
    }

    /// How many more client connections fit above the reserve now.
    pub fn room_for_clients(&self) -> u64 {
        let limit = self.limit();
        let used = self.estimate(self.clients()) + fd_reserve(limit);
        limit.saturating_sub(used) / 2
    }

    /// Client connections open on every listener.
    pub fn clients(&self) -> u64 {
        self.clients.load(Ordering::Relaxed)
    }

    /// The descriptors berth is estimated to hold now, as the admission
    /// check sees them (the last count plus two per client since); `None`
    /// where `/proc/self/fd` cannot be counted.
    pub fn open_estimate(&self) -> Option<u64> {
        self.counted.then(|| self.estimate(self.clients()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn guard(limit: u64, base: u64) -> Arc<FdGuard> {
        let g = FdGuard::new();
        g.limit.store(limit, Ordering::Relaxed);
        g.base.store(base, Ordering::Relaxed);
        g.sampled.store(base << 32, Ordering::Relaxed);
        Arc::new(g)
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn addresses_are_grouped_by_ipv4_address_and_ipv6_64() {
        let key = |s: &str| IpKey::of(ip(s));
        assert_eq!(key("10.0.0.1"), key("::ffff:10.0.0.1"));
        assert_ne!(key("10.0.0.1"), key("10.0.0.2"));
        assert_eq!(key("2001:db8:1:2::1"), key("2001:db8:1:2:ffff::9"));
        assert_ne!(key("2001:db8:1:2::1"), key("2001:db8:1:3::1"));
        assert_eq!(key("::1"), IpKey::V6(0));
    }

    #[test]
    fn the_reserve_is_256_plus_one_percent() {
        for (limit, reserve) in [(1024, 266), (20_000, 456), (1 << 20, 10_741)] {
            assert_eq!(fd_reserve(limit), reserve);
        }
    }

    #[test]
    fn listener_cap_refuses_the_excess_and_frees_on_drop() {
        let l = Arc::new(ListenerLimits::new(guard(100_000, 10)));
        let caps = Caps {
            max_connections: Some(2),
            max_connections_per_ip: None,
        };
        let a = l.admit(ip("10.0.0.1"), caps).unwrap();
        let _b = l.admit(ip("10.0.0.2"), caps).unwrap();
        assert_eq!(
            l.admit(ip("10.0.0.3"), caps).unwrap_err(),
            Refusal::ListenerFull
        );
        assert_eq!(l.open(), 2);
        drop(a);
        assert_eq!(l.open(), 1);
        let _c = l.admit(ip("10.0.0.3"), caps).unwrap();
        assert_eq!(l.fds.clients(), 2);
        // Without a cap nothing is refused.
        let slots: Vec<Slot> = (0..50)
            .map(|_| l.admit(ip("10.0.0.4"), Caps::default()).unwrap())
            .collect();
        assert_eq!(l.open(), 50 + 2);
        drop(slots);
        assert_eq!(l.fds.clients(), 2);
    }

    #[test]
    fn per_address_cap_counts_each_address_and_forgets_it_at_zero() {
        let l = Arc::new(ListenerLimits::new(guard(100_000, 10)));
        let caps = Caps {
            max_connections: None,
            max_connections_per_ip: Some(2),
        };
        let a1 = l.admit(ip("2001:db8::1"), caps).unwrap();
        let a2 = l.admit(ip("2001:db8::2"), caps).unwrap();
        assert_eq!(
            l.admit(ip("2001:db8::3"), caps).unwrap_err(),
            Refusal::PerIp
        );
        let b = l.admit(ip("2001:db8:0:1::1"), caps).unwrap();
        assert_eq!(l.open_from(ip("2001:db8::7")), 2);
        assert_eq!(l.open(), 3);
        drop((a1, a2, b));
        assert!(l.per_ip.is_empty());
        assert_eq!(l.open(), 0);
        // A connection accepted without the cap is not counted per address,
        // and gives nothing back per address when it ends.
        let uncapped = l.admit(ip("2001:db8::1"), Caps::default()).unwrap();
        let capped = l.admit(ip("2001:db8::1"), caps).unwrap();
        assert_eq!(l.open_from(ip("2001:db8::1")), 1);
        drop(uncapped);
        assert_eq!(l.open_from(ip("2001:db8::1")), 1);
        drop(capped);
        assert!(l.per_ip.is_empty());
    }

    #[test]
    fn the_fd_guard_keeps_two_descriptors_per_client_and_the_reserve() {
        // limit 1000: reserve 266, base 34: (1000 - 266 - 34) / 2 = 350 clients.
        let fds = guard(1000, 34);
        let l = Arc::new(ListenerLimits::new(Arc::clone(&fds)));
        let slots: Vec<Slot> = (0..350)
            .map(|i| {
                l.admit(ip("10.0.0.1"), Caps::default())
                    .unwrap_or_else(|e| panic!("client {i}: {e:?}"))
            })
            .collect();
        assert_eq!(
            l.admit(ip("10.0.0.1"), Caps::default()).unwrap_err(),
            Refusal::FdLimit
        );
        assert!(fds.refusing.load(Ordering::Relaxed));
        assert_eq!(fds.refused.load(Ordering::Relaxed), 1);
        drop(slots);
        assert_eq!(fds.room_for_clients(), 350);
        let again = l.admit(ip("10.0.0.1"), Caps::default()).unwrap();
        assert!(!fds.refusing.load(Ordering::Relaxed));
        assert_eq!(fds.room_for_clients(), 349);
        drop(again);
    }

    #[test]
    fn a_count_above_the_model_lowers_the_room() {
        // The count found 400 descriptors with 10 clients open (pooled
        // backend connections, say): each new client still adds two.
        let fds = guard(1000, 34);
        fds.sampled.store((400 << 32) | 10, Ordering::Relaxed);
        fds.clients.store(10, Ordering::Relaxed);
        assert_eq!(fds.estimate(10), 400);
        assert_eq!(fds.estimate(20), 420);
        // Fewer clients than at the count: never below the model.
        assert_eq!(fds.estimate(0), 380);
        // A count below the model (clients not yet connected to their
        // backends) leaves the model in charge.
        fds.sampled.store((30 << 32) | 2, Ordering::Relaxed);
        assert_eq!(fds.estimate(100), 34 + 200);
        // 1000 - 266 = 734 usable: 400 + 2 * k + 2 <= 734 for k <= 166 more.
        fds.sampled.store((400 << 32) | 10, Ordering::Relaxed);
        fds.clients.store(10 + 166, Ordering::Relaxed);
        assert!(fds.has_room());
        fds.clients.store(10 + 167, Ordering::Relaxed);
        assert!(!fds.has_room());
    }

    #[test]
    fn a_real_count_sees_new_descriptors() {
        let fds = FdGuard::new();
        let before = fds.sampled.load(Ordering::Relaxed) >> 32;
        let held: Vec<std::fs::File> = (0..20).map(|_| open_spare().unwrap()).collect();
        fds.sample();
        let after = fds.sampled.load(Ordering::Relaxed) >> 32;
        // Other tests open and close descriptors meanwhile: at least most of ours.
        assert!(after + 10 >= before + 20, "{before} -> {after}");
        drop(held);
        assert!(fds.limit() > 0);
    }

    #[test]
    fn the_spare_descriptor_is_given_up_and_taken_back() {
        let fds = FdGuard::new();
        let mut ran = false;
        assert!(fds.with_spare(|| {
            ran = true;
            true
        }));
        assert!(ran);
        assert!(fds.spare_slot().is_some());
    }
}
