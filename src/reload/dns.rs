//! DNS discovery: one task per pool with `[pools.NAME.dns]`, looking up the
//! name's A and AAAA records every `interval` (sooner when the records'
//! TTL is shorter, never more than once a second unless `interval` asks
//! for it), through hickory-resolver with its cache cleared before each
//! lookup, so every lookup asks the server.
//!
//! Each lookup is counted in `berth_dns_lookups_total{pool, result}`:
//! `success` (one address or more: the set is compared with the last one),
//! `empty` (the name has no A or AAAA record, or does not exist) or
//! `failure` (no answer, a server failure, no usable resolver). Only a
//! success changes anything: a failed or empty lookup keeps the last known
//! set, so a DNS outage never drains a pool. A success with another set
//! of addresses goes to the pool runner (`Apply`, implemented in `pools.rs`), which replaces
//! the pool (its new task takes over from there).
//!
//! The task starts with its pool and stops with it (its `stop` token) or
//! at shutdown. Its first lookup is at once when the pool has no answer
//! yet (at start, or a new name), else after the known set's wait.

use std::future::Future;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use hickory_resolver::config::{
    NameServerConfig, NameServerConfigGroup, ResolveHosts, ResolverConfig,
};
use hickory_resolver::name_server::TokioConnectionProvider;
use hickory_resolver::proto::op::ResponseCode;
use hickory_resolver::proto::xfer::Protocol;
use hickory_resolver::proto::ProtoErrorKind;
use hickory_resolver::{ResolveError, TokioResolver};
use tokio_util::sync::CancellationToken;

use crate::balancer::{Discovered, Pool};
use crate::config::DnsConfig;
use crate::metrics::Metrics;

/// The shortest wait a short TTL may bring about (a longer `interval`
/// than this is shortened to the TTL, but not below it).
const MIN_TTL_WAIT: Duration = Duration::from_secs(1);

/// Where discovery hands what it found: the pool runner, which swaps the
/// pool in (a trait, so that this module does not depend on the runner
/// that starts it).
pub(super) trait Apply: Send + Sync + 'static {
    /// Puts `found` into force for `asked`, unless `asked` was replaced
    /// meanwhile.
    fn apply(&self, asked: &Arc<Pool>, found: Discovered) -> impl Future<Output = ()> + Send;
}

/// Starts `pool`'s discovery, if it has `[pools.NAME.dns]`; it ends with
/// the pool (its stop token), at shutdown, or once it has handed a change
/// to `apply` (the new pool's own discovery carries on).
pub(super) fn start<A: Apply>(
    apply: A,
    pool: &Arc<Pool>,
    metrics: &Metrics,
    shutdown: &CancellationToken,
) {
    let Some(dns) = pool.config.dns.clone() else {
        return;
    };
    let task = discover(
        apply,
        Arc::clone(pool),
        dns,
        metrics.clone(),
        shutdown.clone(),
    );
    tokio::spawn(task);
}

/// What one lookup found.
#[derive(Debug, PartialEq, Eq)]
enum Outcome {
    /// Addresses (sorted, unique) and the shortest TTL among them.
    Found(Vec<IpAddr>, Option<Duration>),
    Empty,
    Failed(String),
}

impl Outcome {
    fn label(&self) -> &'static str {
        match self {
            Outcome::Found(..) => "success",
            Outcome::Empty => "empty",
            Outcome::Failed(_) => "failure",
        }
    }
}

async fn discover<A: Apply>(
    apply: A,
    pool: Arc<Pool>,
    dns: DnsConfig,
    metrics: Metrics,
    shutdown: CancellationToken,
) {
    let name = pool.config.name.clone();
    let resolver = resolver(&dns).map_err(|e| e.to_string());
    if let Err(e) = &resolver {
        tracing::error!(pool = %name, error = %e, "dns discovery has no usable resolver configuration");
    }
    let mut wait = match &pool.discovered {
        Some(known) if known.name == dns.name => next_wait(dns.interval, known.ttl),
        _ => Duration::ZERO,
    };
    let stop = pool.stop.clone();
    let mut failing = false;
    loop {
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            _ = stop.cancelled() => return,
            _ = shutdown.cancelled() => return,
        }
        let outcome = match &resolver {
            Ok(r) => tokio::select! {
                o = lookup(r, &dns.name) => o,
                _ = stop.cancelled() => return,
                _ = shutdown.cancelled() => return,
            },
            Err(e) => Outcome::Failed(e.clone()),
        };
        metrics
            .dns_lookups
            .with_label_values(&[&name, outcome.label()])
            .inc();
        wait = dns.interval;
        match outcome {
            Outcome::Found(ips, ttl) => {
                if failing {
                    tracing::info!(pool = %name, dns = %dns.name, "dns discovery answers again");
                    failing = false;
                }
                wait = next_wait(dns.interval, ttl);
                let same = pool
                    .discovered
                    .as_ref()
                    .is_some_and(|d| d.name == dns.name && d.ips == ips);
                if !same {
                    let found = Discovered {
                        name: dns.name.clone(),
                        ips,
                        ttl,
                    };
                    // The pool is replaced (or was already): its successor's
                    // task carries on.
                    apply.apply(&pool, found).await;
                    return;
                }
            }
            Outcome::Empty | Outcome::Failed(_) if failing => {}
            Outcome::Empty => {
                failing = true;
                tracing::warn!(pool = %name, dns = %dns.name, "dns discovery found no address; keeping the last known backends");
            }
            Outcome::Failed(e) => {
                failing = true;
                tracing::warn!(pool = %name, dns = %dns.name, error = %e, "dns lookup failed; keeping the last known backends");
            }
        }
    }
}

/// How long to wait for the next lookup: `interval`, or the records' TTL
/// when shorter (but not below [`MIN_TTL_WAIT`], unless `interval` is).
fn next_wait(interval: Duration, ttl: Option<Duration>) -> Duration {
    let floor = interval.min(MIN_TTL_WAIT);
    ttl.map_or(interval, |ttl| interval.min(ttl).max(floor))
}

/// A resolver for `dns`: its `resolver` (UDP, then TCP for a truncated
/// answer), or the system's configuration. Each attempt waits at most the
/// interval (between 500 ms and 5 s), so a dead server costs a few
/// seconds per lookup at most.
fn resolver(dns: &DnsConfig) -> Result<TokioResolver, ResolveError> {
    let provider = TokioConnectionProvider::default();
    let mut builder = match dns.resolver {
        Some(addr) => {
            let servers = NameServerConfigGroup::from(vec![
                NameServerConfig::new(addr, Protocol::Udp),
                NameServerConfig::new(addr, Protocol::Tcp),
            ]);
            let config = ResolverConfig::from_parts(None, Vec::new(), servers);
            let mut builder = TokioResolver::builder_with_config(config, provider);
            // A named server is the only source asked.
            builder.options_mut().use_hosts_file = ResolveHosts::Never;
            builder
        }
        None => TokioResolver::builder(provider)?,
    };
    let options = builder.options_mut();
    options.timeout = dns
        .interval
        .clamp(Duration::from_millis(500), Duration::from_secs(5));
    options.attempts = 2;
    Ok(builder.build())
}

/// One lookup of `name`'s A and AAAA records. Either failing is a
/// failure (a half answer must not drain the other half); both empty is
/// empty.
async fn lookup(resolver: &TokioResolver, name: &str) -> Outcome {
    resolver.clear_cache();
    let (v4, v6) = tokio::join!(resolver.ipv4_lookup(name), resolver.ipv6_lookup(name));
    let now = Instant::now();
    let mut ips: Vec<IpAddr> = Vec::new();
    let mut ttl: Option<Duration> = None;
    let mut note = |until: Instant| {
        let left = until.saturating_duration_since(now);
        ttl = Some(ttl.map_or(left, |t| t.min(left)));
    };
    match v4 {
        Ok(found) => {
            note(found.valid_until());
            ips.extend(found.iter().map(|a| IpAddr::V4(a.0)));
        }
        Err(e) if no_such_record(&e) => {}
        Err(e) => return Outcome::Failed(e.to_string()),
    }
    match v6 {
        Ok(found) => {
            note(found.valid_until());
            ips.extend(found.iter().map(|a| IpAddr::V6(a.0)));
        }
        Err(e) if no_such_record(&e) => {}
        Err(e) => return Outcome::Failed(e.to_string()),
    }
    for ip in &mut ips {
        *ip = ip.to_canonical();
    }
    ips.sort_unstable();
    ips.dedup();
    if ips.is_empty() {
        Outcome::Empty
    } else {
        Outcome::Found(ips, ttl)
    }
}

/// The server said the name has no such record (NOERROR without answers)
/// or does not exist (NXDOMAIN). hickory reports a SERVFAIL or REFUSED
/// the same way, with its code: those are failures.
fn no_such_record(e: &ResolveError) -> bool {
    match e.proto().map(|p| p.kind()) {
        Some(ProtoErrorKind::NoRecordsFound { response_code, .. }) => {
            matches!(
                *response_code,
                ResponseCode::NoError | ResponseCode::NXDomain
            )
        }
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_wait_is_the_interval_or_a_shorter_ttl_but_not_below_a_second() {
        let s = Duration::from_secs;
        let ms = Duration::from_millis;
        let cases = [
            (s(10), None, s(10)),
            (s(10), Some(s(30)), s(10)),
            (s(10), Some(s(3)), s(3)),
            (s(10), Some(ms(200)), s(1)),
            (s(10), Some(Duration::ZERO), s(1)),
            // An interval under a second is what the operator asked for.
            (ms(200), Some(Duration::ZERO), ms(200)),
            (ms(200), Some(s(60)), ms(200)),
        ];
        for (interval, ttl, want) in cases {
            assert_eq!(next_wait(interval, ttl), want, "{interval:?} {ttl:?}");
        }
    }
}
