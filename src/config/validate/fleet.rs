//! Validation of a pool's fleet keys: `slow_start`, `max_connection_age`,
//! `[pools.NAME.rebalance]`, `[pools.NAME.dns]` and `send_proxy_protocol`, with the per-value
//! rules of `rules.rs`. Nothing here resolves a name: `check` never needs
//! DNS.

use std::time::Duration;

use super::{path, Checker};
use crate::config::file::{FileDns, FilePool, FileRebalance};
use crate::config::locate::Seg;
use crate::config::rules;
use crate::config::{BackendConfig, DnsConfig, RebalanceConfig};

/// A pool's fleet settings, validated.
pub(super) struct Fleet {
    pub slow_start: Option<Duration>,
    pub max_connection_age: Option<Duration>,
    pub rebalance: Option<RebalanceConfig>,
    pub dns: Option<DnsConfig>,
    pub send_proxy_protocol: bool,
}

impl Checker<'_, '_> {
    pub(super) fn fleet(&mut self, name: &str, raw: &FilePool) -> Fleet {
        let base = [Seg::Key("pools"), Seg::Key(name)];
        let key = |k: &'static str| path(&base, &[Seg::Key(k)]);
        Fleet {
            slow_start: self.optional_duration(
                &key("slow_start"),
                raw.slow_start.as_deref(),
                rules::SLOW_START,
            ),
            max_connection_age: self.optional_duration(
                &key("max_connection_age"),
                raw.max_connection_age.as_deref(),
                rules::MAX_CONNECTION_AGE,
            ),
            rebalance: raw
                .rebalance
                .as_ref()
                .map(|r| self.rebalance(&key("rebalance"), r)),
            dns: raw.dns.as_ref().and_then(|d| self.dns(&key("dns"), d)),
            send_proxy_protocol: raw.send_proxy_protocol.as_deref().is_some_and(|v| {
                self.check(&key("send_proxy_protocol"), rules::send_proxy_protocol(v))
                    .is_some()
            }),
        }
    }

    fn rebalance(&mut self, base: &[Seg<'_>], raw: &FileRebalance) -> RebalanceConfig {
        let threshold = raw
            .threshold
            .and_then(|t| self.check(&path(base, &[Seg::Key("threshold")]), rules::threshold(t)))
            .unwrap_or(DEFAULT_THRESHOLD);
        let window = self.duration(
            &path(base, &[Seg::Key("window")]),
            raw.window.as_deref(),
            rules::REBALANCE_WINDOW,
        );
        RebalanceConfig { threshold, window }
    }

    fn dns(&mut self, base: &[Seg<'_>], raw: &FileDns) -> Option<DnsConfig> {
        let name_at = path(base, &[Seg::Key("name")]);
        let port_at = path(base, &[Seg::Key("port")]);
        let name = self
            .required(&name_at, raw.name.as_deref(), "name = \"chat.internal\"")
            .and_then(|n| self.check(&name_at, rules::dns_name(n)).map(|()| n));
        let port = match raw.port {
            None => {
                self.push(&port_at, "required key is missing (add e.g. port = 9000)");
                None
            }
            Some(p) => self
                .check(&port_at, rules::int(p, &rules::DNS_PORT))
                .and_then(|p| u16::try_from(p).ok()),
        };
        let interval = self.duration(
            &path(base, &[Seg::Key("interval")]),
            raw.interval.as_deref(),
            rules::DNS_INTERVAL,
        );
        let resolver = match raw.resolver.as_deref() {
            None => Some(None),
            Some(r) => self
                .check(
                    &path(base, &[Seg::Key("resolver")]),
                    rules::resolver_address(r),
                )
                .map(Some),
        };
        Some(DnsConfig {
            name: name?.to_string(),
            port: port?,
            interval,
            resolver: resolver?,
        })
    }

    /// A pool needs static backends, DNS discovery or both (the message
    /// for neither predates discovery and stays as it was); with DNS, the
    /// static ids leave the discovered ones' prefix alone.
    pub(super) fn check_members(
        &mut self,
        name: &str,
        raw: &FilePool,
        backends: &[(usize, BackendConfig)],
    ) {
        let base = [Seg::Key("pools"), Seg::Key(name)];
        if raw.backends.is_empty() && raw.dns.is_none() {
            self.push(
                &path(&base, &[Seg::Key("backends")]),
                format!("pool {name:?} has no backends (add a [[pools.{name}.backends]] entry with id and address)"),
            );
        }
        if raw.dns.is_none() {
            return;
        }
        for (i, b) in backends {
            if b.id.starts_with(rules::DISCOVERED_ID_PREFIX) {
                self.push(
                    &path(&base, &[Seg::Key("backends"), Seg::Index(*i), Seg::Key("id")]),
                    format!(
                        "backend id {:?} starts with {:?}, which names the backends [pools.{name}.dns] discovers (choose another id)",
                        b.id,
                        rules::DISCOVERED_ID_PREFIX
                    ),
                );
            }
        }
    }
}

/// `threshold` when the rebalance table leaves it out.
pub(super) const DEFAULT_THRESHOLD: f64 = 1.2;
