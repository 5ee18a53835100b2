//! The rules: every limit's range, and one validator per kind of value.
//!
//! Each validator takes a value as written and returns the typed value or a
//! message. It is written once and used for every key of its kind; the
//! caller (`validate.rs`) adds the file, the line and the key. Nothing here
//! knows about key paths, lines or other keys.
//!
//! The ranges are a documented contract: README.md's Configuration tables
//! and config/berth.toml's comments state each one, and a unit test checks
//! that the README agrees with [`DURATIONS`], [`NUMBERS`] and [`SIZES`].

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::Duration;

use ipnet::IpNet;

use super::{Balance, HashKey, OnExpiry, ProxyVersions, SameSite, TokenSource};

// ---------------------------------------------------------------------------
// Ranges
// ---------------------------------------------------------------------------

const fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

const fn secs(n: u64) -> Duration {
    Duration::from_secs(n)
}

const MINUTE: u64 = 60;
const HOUR: u64 = 60 * MINUTE;
const DAY: u64 = 24 * HOUR;

/// The longest duration any key accepts: nothing in berth needs to wait
/// longer, and everything below it is far from overflowing an `Instant`.
pub(super) const LONGEST: Duration = secs(30 * DAY);

/// A duration key: its default and its inclusive range.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct DurationKey {
    /// `None`: the key is optional, and absent or `"0s"` means off.
    pub default: Option<Duration>,
    pub min: Duration,
    pub max: Duration,
}

const fn required(default: Duration, min: Duration, max: Duration) -> DurationKey {
    DurationKey {
        default: Some(default),
        min,
        max,
    }
}

const fn optional(min: Duration, max: Duration) -> DurationKey {
    DurationKey {
        default: None,
        min,
        max,
    }
}

// Minimums: small enough for the fast tests (which use down to 20ms pings,
// 50ms health checks and 300ms timeouts), large enough that no value can
// busy-loop (a 1ns ping interval) or make a key useless (a 1ns pong
// timeout). Maximums: what an operator could mean, which also catches a
// forgotten unit ("5000m").
pub(super) const SHUTDOWN_WINDOW: DurationKey = required(secs(10), Duration::ZERO, secs(HOUR));
pub(super) const HANDSHAKE_TIMEOUT: DurationKey = required(secs(10), ms(100), secs(5 * MINUTE));
pub(super) const CONNECT_TIMEOUT: DurationKey = required(secs(3), ms(10), secs(2 * MINUTE));
pub(super) const RESPONSE_TIMEOUT: DurationKey = required(secs(30), ms(100), secs(HOUR));
pub(super) const IDLE_TIMEOUT: DurationKey = optional(ms(100), secs(7 * DAY));
pub(super) const PING_INTERVAL: DurationKey = optional(ms(10), secs(HOUR));
pub(super) const PONG_TIMEOUT: DurationKey = required(secs(10), ms(100), secs(10 * MINUTE));
pub(super) const CLOSE_TIMEOUT: DurationKey = required(secs(5), ms(100), secs(10 * MINUTE));
pub(super) const DRAIN_WINDOW: DurationKey = required(secs(30), Duration::ZERO, secs(DAY));
pub(super) const COOKIE_MAX_AGE: DurationKey = optional(secs(1), LONGEST);
pub(super) const HEALTH_INTERVAL: DurationKey = required(secs(5), ms(50), secs(HOUR));
pub(super) const HEALTH_TIMEOUT: DurationKey = required(secs(2), ms(100), secs(5 * MINUTE));
/// Retry-After on berth's 503s is drawn from 1 s to this (whole seconds).
pub(super) const RETRY_AFTER_MAX: DurationKey = required(secs(5), secs(1), secs(HOUR));
pub(super) const SEND_TIMEOUT: DurationKey = optional(ms(100), secs(HOUR));
// Authentication. The refresh minimum keeps berth from hammering an
// identity provider; leeway is clock skew, which minutes already cover.
pub(super) const JWT_REFRESH: DurationKey = required(secs(10 * MINUTE), secs(1), secs(DAY));
pub(super) const JWT_LEEWAY: DurationKey = required(secs(30), Duration::ZERO, secs(10 * MINUTE));
pub(super) const FORWARD_TIMEOUT: DurationKey = required(secs(2), ms(100), secs(MINUTE));
pub(super) const FORWARD_CACHE: DurationKey = optional(secs(1), secs(HOUR));
// Fleet changes. A slow start or an age under a second means nothing to a
// WebSocket; a rebalance window of a second still spreads reconnects a
// little; DNS is asked at most ten times a second.
pub(super) const SLOW_START: DurationKey = optional(secs(1), secs(HOUR));
pub(super) const MAX_CONNECTION_AGE: DurationKey = optional(secs(1), LONGEST);
pub(super) const REBALANCE_WINDOW: DurationKey = required(secs(5 * MINUTE), secs(1), secs(DAY));
pub(super) const DNS_INTERVAL: DurationKey = required(secs(10), ms(100), secs(HOUR));

/// Every duration key by name: unique across tables, or qualified by the
/// last part of its table's name (`health.timeout`, `forward.timeout`).
#[cfg(test)]
pub(super) const DURATIONS: &[(&str, DurationKey)] = &[
    ("shutdown_window", SHUTDOWN_WINDOW),
    ("handshake_timeout", HANDSHAKE_TIMEOUT),
    ("connect_timeout", CONNECT_TIMEOUT),
    ("response_timeout", RESPONSE_TIMEOUT),
    ("idle_timeout", IDLE_TIMEOUT),
    ("ping_interval", PING_INTERVAL),
    ("pong_timeout", PONG_TIMEOUT),
    ("close_timeout", CLOSE_TIMEOUT),
    ("drain_window", DRAIN_WINDOW),
    ("max_age", COOKIE_MAX_AGE),
    ("health.interval", HEALTH_INTERVAL),
    ("health.timeout", HEALTH_TIMEOUT),
    ("retry_after_max", RETRY_AFTER_MAX),
    ("send_timeout", SEND_TIMEOUT),
    ("refresh", JWT_REFRESH),
    ("leeway", JWT_LEEWAY),
    ("forward.timeout", FORWARD_TIMEOUT),
    ("cache", FORWARD_CACHE),
    ("slow_start", SLOW_START),
    ("max_connection_age", MAX_CONNECTION_AGE),
    ("rebalance.window", REBALANCE_WINDOW),
    ("dns.interval", DNS_INTERVAL),
];

/// An integer key: its inclusive range.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct IntKey {
    pub name: &'static str,
    pub min: i64,
    pub max: i64,
}

pub(super) const WEIGHT: IntKey = IntKey {
    name: "weight",
    min: 1,
    max: 1000,
};
/// One process cannot hold more sockets than the kernel's per-process file
/// limit (`nr_open`, 1,048,576 by default), so a larger cap means nothing.
pub(super) const MAX_CONNECTIONS: IntKey = IntKey {
    name: "max_connections",
    min: 1,
    max: 1_000_000,
};
pub(super) const RISE: IntKey = IntKey {
    name: "rise",
    min: 1,
    max: 100,
};
pub(super) const FALL: IntKey = IntKey {
    name: "fall",
    min: 1,
    max: 100,
};

pub(super) const MAX_UPGRADES_PER_SECOND: IntKey = IntKey {
    name: "max_upgrades_per_second",
    min: 1,
    max: 1_000_000,
};
pub(super) const UPGRADE_BURST: IntKey = IntKey {
    name: "upgrade_burst",
    min: 1,
    max: 1_000_000,
};
/// Connections from one client address (an IPv6 /64) on one listener.
pub(super) const MAX_CONNECTIONS_PER_IP: IntKey = IntKey {
    name: "max_connections_per_ip",
    min: 1,
    max: 1_000_000,
};

/// `[pools.NAME.dns] port`: where every discovered address is reached.
pub(super) const DNS_PORT: IntKey = IntKey {
    name: "port",
    min: 1,
    max: 65535,
};
/// Streams open at once on one HTTP/2 connection (each WebSocket is one).
/// Below 1 a connection could do nothing; above 1,000 one client could hold
/// a thousand backend connections through a single TCP connection.
pub(super) const MAX_CONCURRENT_STREAMS: IntKey = IntKey {
    name: "max_concurrent_streams",
    min: 1,
    max: 1000,
};
pub(super) const MAX_CONCURRENT_STREAMS_DEFAULT: i64 = 100;

/// Every integer key.
#[cfg(test)]
pub(super) const NUMBERS: &[IntKey] = &[
    WEIGHT,
    MAX_CONNECTIONS,
    MAX_CONNECTIONS_PER_IP,
    RISE,
    FALL,
    MAX_UPGRADES_PER_SECOND,
    UPGRADE_BURST,
    DNS_PORT,
    MAX_CONCURRENT_STREAMS,
];

const KIB: u64 = 1024;
const MIB: u64 = 1024 * KIB;
const GIB: u64 = 1024 * MIB;

/// A size key: its default and its inclusive range, in bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct SizeKey {
    /// `None`: the key is optional, and absent means no limit.
    pub default: Option<u64>,
    pub min: u64,
    pub max: u64,
}

/// Below 1 KiB no real protocol fits; above 1 GiB a limit protects nothing
/// (leave the key out for no limit).
pub(super) const MAX_MESSAGE_SIZE: SizeKey = SizeKey {
    default: None,
    min: KIB,
    max: GIB,
};

/// A listener's request line plus headers. The minimum still fits any
/// ordinary request; the maximum is far above what browsers send (a few
/// KiB; the largest cookies browsers keep add up to some tens of KiB).
pub(super) const MAX_HEADER_BYTES: SizeKey = SizeKey {
    default: Some(64 * KIB),
    min: KIB,
    max: MIB,
};

/// Every size key by name.
#[cfg(test)]
pub(super) const SIZES: &[(&str, SizeKey)] = &[
    ("max_message_size", MAX_MESSAGE_SIZE),
    ("max_header_bytes", MAX_HEADER_BYTES),
];

/// A size as the README writes it: `512 B`, `64 KiB`, `1 MiB`, in the
/// largest binary unit that divides it exactly.
pub fn human_size(n: u64) -> String {
    for (unit, size) in [("GiB", GIB), ("MiB", MIB), ("KiB", KIB)] {
        if n >= size && n % size == 0 {
            return format!("{} {unit}", n / size);
        }
    }
    format!("{n} B")
}

/// `bounded_load` must be above this...
pub(super) const BOUNDED_LOAD_ABOVE: f64 = 1.0;
/// ...and at most this (beyond the number of backends it bounds nothing).
pub(super) const BOUNDED_LOAD_MAX: f64 = 100.0;

/// `rebalance.threshold` must be above this...
pub(super) const THRESHOLD_ABOVE: f64 = 1.0;
/// ...and at most this (a backend ten times over its share is far gone).
pub(super) const THRESHOLD_MAX: f64 = 10.0;

/// A duration as the README writes it: `0s`, `250ms`, `30s`, `5m`, `2h`,
/// `7d`, in the largest unit that divides it exactly.
pub(super) fn human(d: Duration) -> String {
    let ms = d.as_millis();
    if ms == 0 {
        return "0s".to_string();
    }
    for (unit, size) in [
        ("d", 86_400_000),
        ("h", 3_600_000),
        ("m", 60_000),
        ("s", 1000),
    ] {
        if ms % size == 0 {
            return format!("{}{unit}", ms / size);
        }
    }
    format!("{ms}ms")
}

// ---------------------------------------------------------------------------
// Validators
// ---------------------------------------------------------------------------

/// A duration string within `key`'s range. `Ok(None)` is "off" (`"0s"` on an
/// optional key).
pub(super) fn duration(raw: &str, key: &DurationKey) -> Result<Option<Duration>, String> {
    let d = humantime::parse_duration(raw.trim())
        .map_err(|_| format!("invalid duration {raw:?} (use e.g. \"250ms\", \"30s\", \"5m\")"))?;
    if key.default.is_none() && d.is_zero() {
        return Ok(None);
    }
    if (key.min..=key.max).contains(&d) {
        return Ok(Some(d));
    }
    let (min, max) = (human(key.min), human(key.max));
    Err(if key.default.is_none() {
        format!("duration must be \"0s\" (off) or between {min} and {max}, got {raw:?}")
    } else {
        format!("duration must be between {min} and {max}, got {raw:?}")
    })
}

/// An integer within `key`'s range.
pub(super) fn int(n: i64, key: &IntKey) -> Result<i64, String> {
    if (key.min..=key.max).contains(&n) {
        Ok(n)
    } else {
        Err(format!(
            "{} must be between {} and {}, got {n}",
            key.name, key.min, key.max
        ))
    }
}

/// A size within `key`'s range: an integer number of bytes, or a string of
/// an integer and a unit (`"64 KiB"`, `"1MiB"`, `"500 kB"`). Binary units
/// (`KiB`, `MiB`, `GiB`, `TiB`) are powers of 1024, decimal ones (`kB`,
/// `MB`, `GB`, `TB`) powers of 1000; `B` or no unit is bytes. Units are
/// matched without regard to case.
pub(super) fn size(raw: &super::file::FileSize, key: &SizeKey) -> Result<u64, String> {
    use super::file::FileSize;
    let n = match raw {
        FileSize::Bytes(n) => u64::try_from(*n).ok(),
        FileSize::Text(text) => parse_size(text),
    };
    let shown = || match raw {
        FileSize::Bytes(n) => n.to_string(),
        FileSize::Text(text) => format!("{text:?}"),
    };
    let Some(n) = n else {
        return Err(format!(
            "invalid size {} (use a number of bytes, or e.g. \"64 KiB\", \"1 MiB\")",
            shown()
        ));
    };
    if (key.min..=key.max).contains(&n) {
        Ok(n)
    } else {
        Err(format!(
            "size must be between {} and {}, got {}",
            human_size(key.min),
            human_size(key.max),
            shown()
        ))
    }
}

fn parse_size(text: &str) -> Option<u64> {
    let text = text.trim();
    let digits = text.bytes().take_while(u8::is_ascii_digit).count();
    let (number, unit) = text.split_at(digits);
    let number: u64 = number.parse().ok()?;
    let scale = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "kib" => KIB,
        "mib" => MIB,
        "gib" => GIB,
        "tib" => 1024 * GIB,
        "kb" => 1000,
        "mb" => 1000 * 1000,
        "gb" => 1000 * 1000 * 1000,
        "tb" => 1000 * 1000 * 1000 * 1000,
        _ => return None,
    };
    number.checked_mul(scale)
}

/// A listen address: `IP:port` (port 0 allowed) or `localhost:PORT`.
pub(super) fn bind_address(raw: &str) -> Result<SocketAddr, String> {
    if let Ok(addr) = raw.parse::<SocketAddr>() {
        return Ok(addr);
    }
    if let Some((host, port)) = raw.rsplit_once(':') {
        if host.eq_ignore_ascii_case("localhost") {
            if let Ok(port) = port.parse::<u16>() {
                return Ok(SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), port));
            }
        }
    }
    Err(format!(
        "invalid socket address {raw:?} (expected IP:port, e.g. \"0.0.0.0:8443\", or localhost:PORT)"
    ))
}

/// A backend address: `host:port` with a hostname, IPv4 address or bracketed
/// IPv6 address and a port in 1..=65535.
pub(super) fn backend_address(raw: &str) -> Result<(), String> {
    let expected = || format!("invalid socket address {raw:?} (expected host:port)");
    let (host_ok, port) = if let Some(rest) = raw.strip_prefix('[') {
        let (inner, port) = rest.split_once("]:").ok_or_else(expected)?;
        (inner.parse::<Ipv6Addr>().is_ok(), port)
    } else {
        let (host, port) = raw.rsplit_once(':').ok_or_else(expected)?;
        if host.contains(':') {
            return Err(format!(
                "invalid socket address {raw:?} (write IPv6 addresses in brackets, e.g. \"[::1]:9001\")"
            ));
        }
        (is_hostname(host), port)
    };
    if !host_ok {
        return Err(expected());
    }
    match port.parse::<u16>() {
        Ok(p) if p != 0 => Ok(()),
        _ => Err(format!(
            "invalid port in {raw:?} (expected host:port with a port from 1 to 65535)"
        )),
    }
}

/// A backend id: letters, digits, `.`, `_` and `-`.
pub(super) fn backend_id(raw: &str) -> Result<(), String> {
    if raw.is_empty() {
        Err("backend id must not be empty".to_string())
    } else if raw.bytes().all(is_id_byte) {
        Ok(())
    } else {
        Err(format!(
            "invalid backend id {raw:?} (use only letters, digits, '.', '_' and '-')"
        ))
    }
}

/// A route's host, lower-cased and without a port. Accepts `name`,
/// `name:port`, `[v6]` and `[v6]:port`.
pub(super) fn route_host(raw: &str) -> Result<String, String> {
    normalize_host(raw).ok_or_else(|| {
        format!(
            "invalid host {raw:?} (expected a host name such as \"chat.example.com\", optionally with :port)"
        )
    })
}

pub(super) fn normalize_host(raw: &str) -> Option<String> {
    let lower = raw.trim().to_ascii_lowercase();
    let port_ok = |port: &str| port.parse::<u16>().is_ok();
    if let Some(rest) = lower.strip_prefix('[') {
        let (inner, after) = rest.split_once(']')?;
        inner.parse::<Ipv6Addr>().ok()?;
        match after.strip_prefix(':') {
            Some(port) if port_ok(port) => {}
            None if after.is_empty() => {}
            _ => return None,
        }
        return Some(format!("[{inner}]"));
    }
    let host = match lower.split_once(':') {
        Some((host, port)) if port_ok(port) => host,
        Some(_) => return None,
        None => lower.as_str(),
    };
    is_hostname(host).then(|| host.to_string())
}

/// A URL path (a route prefix, a cookie path, a health-check path): starts
/// with `/`; `what` names it in the message.
pub(super) fn url_path(raw: &str, what: &str) -> Result<(), String> {
    if raw.starts_with('/') {
        Ok(())
    } else {
        Err(format!("{what} must start with \"/\", got {raw:?}"))
    }
}

/// A browser origin for `allowed_origins`: `scheme://host[:port]`, no path;
/// lower-cased.
pub(super) fn origin(raw: &str) -> Result<String, String> {
    let ok = raw.split_once("://").is_some_and(|(scheme, rest)| {
        matches!(scheme, "http" | "https") && !rest.is_empty() && !rest.contains('/')
    });
    if ok {
        Ok(raw.to_ascii_lowercase())
    } else {
        Err(format!(
            "invalid origin {raw:?} (expected scheme://host[:port], e.g. \"https://chat.example.com\")"
        ))
    }
}

pub(super) fn balance(raw: &str) -> Result<Balance, String> {
    match raw {
        "least_connections" => Ok(Balance::LeastConnections),
        "round_robin" => Ok(Balance::RoundRobin),
        other => Err(format!(
            "balance must be \"least_connections\" or \"round_robin\", got {other:?}"
        )),
    }
}

/// A hash-affinity key: `client_ip`, `header:NAME`, `cookie:NAME`,
/// `query:NAME` or `claim:NAME` (whether the pool has JWT auth for a claim
/// is a cross-key rule, checked in `validate.rs`).
pub(super) fn hash_key(raw: &str) -> Result<HashKey, String> {
    let err = |reason: &str| {
        format!(
            "invalid hash key {raw:?}: {reason} (use \"client_ip\", \"header:NAME\", \"cookie:NAME\", \"query:NAME\" or \"claim:NAME\")"
        )
    };
    if raw == "client_ip" {
        return Ok(HashKey::ClientIp);
    }
    let Some((kind, name)) = raw.split_once(':') else {
        return Err(err("unknown key"));
    };
    if name.is_empty() {
        return Err(err("the name after ':' is empty"));
    }
    match kind {
        "header" => http::HeaderName::from_bytes(name.as_bytes())
            .map(HashKey::Header)
            .map_err(|_| err("not a valid header name")),
        "cookie" => Ok(HashKey::Cookie(name.to_string())),
        "query" => Ok(HashKey::Query(name.to_string())),
        "claim" => Ok(HashKey::Claim(name.to_string())),
        _ => Err(err("unknown key kind")),
    }
}

/// A CIDR block (`10.0.0.0/8`, `::1/128`); a bare address is a single host.
/// Host bits below the prefix are cleared (`10.1.2.3/8` is `10.0.0.0/8`).
pub(super) fn cidr(raw: &str) -> Result<IpNet, String> {
    raw.parse::<IpNet>()
        .or_else(|_| raw.parse::<IpAddr>().map(IpNet::from))
        .map(|net| net.trunc())
        .map_err(|_| format!("invalid CIDR {raw:?} (expected e.g. \"10.0.0.0/8\" or \"::1/128\")"))
}

/// A listener's `proxy_protocol`: `"v1"`, `"v2"` or `"any"`.
pub(super) fn proxy_versions(raw: &str) -> Result<ProxyVersions, String> {
    match raw {
        "v1" => Ok(ProxyVersions::V1),
        "v2" => Ok(ProxyVersions::V2),
        "any" => Ok(ProxyVersions::Any),
        other => Err(format!(
            "proxy_protocol must be \"v1\", \"v2\" or \"any\" (leave it out for none), got {other:?}"
        )),
    }
}

/// `proxy_protocol_from`: at least one CIDR (an empty list would refuse
/// every connection).
pub(super) fn proxy_protocol_from(nets: Vec<IpNet>) -> Result<Vec<IpNet>, String> {
    if nets.is_empty() {
        Err("proxy_protocol_from is empty: list the balancers allowed to send the PROXY header (e.g. [\"10.0.0.0/8\"])".to_string())
    } else {
        Ok(nets)
    }
}

/// A pool's `send_proxy_protocol`: only `"v2"`, the binary header (named,
/// so that another version can be added without changing what this means).
pub(super) fn send_proxy_protocol(raw: &str) -> Result<(), String> {
    if raw == "v2" {
        Ok(())
    } else {
        Err(format!(
            "send_proxy_protocol must be \"v2\" (leave it out for none), got {raw:?}"
        ))
    }
}

/// The size of one shared session-ticket key: what `openssl rand 80`
/// writes, the size nginx's `ssl_session_ticket_key` files use.
pub const TICKET_KEY_BYTES: usize = 80;

/// A `ticket_keys` file: one or more keys of [`TICKET_KEY_BYTES`] bytes,
/// concatenated, nothing else.
pub(super) fn ticket_keys(bytes: &[u8]) -> Result<(), String> {
    if bytes.is_empty() || bytes.len() % TICKET_KEY_BYTES != 0 {
        Err(format!(
            "ticket key file holds {} bytes; it must hold one or more keys of {TICKET_KEY_BYTES} random bytes each, concatenated (e.g. openssl rand 80 > FILE)",
            bytes.len()
        ))
    } else {
        Ok(())
    }
}

/// `bounded_load`: a number above 1.0 and at most 100.
pub(super) fn bounded_load(c: f64) -> Result<f64, String> {
    if c.is_finite() && c > BOUNDED_LOAD_ABOVE && c <= BOUNDED_LOAD_MAX {
        Ok(c)
    } else {
        Err(format!(
            "bounded_load must be a number greater than 1.0 and at most 100 (e.g. 1.25), got {c}"
        ))
    }
}

/// `rebalance.threshold`: a number above 1.0 and at most 10.
pub(super) fn threshold(t: f64) -> Result<f64, String> {
    if t.is_finite() && t > THRESHOLD_ABOVE && t <= THRESHOLD_MAX {
        Ok(t)
    } else {
        Err(format!(
            "threshold must be a number greater than 1.0 and at most 10 (e.g. 1.2), got {t}"
        ))
    }
}

/// A DNS name to discover backends by: labels of 1 to 63 letters, digits,
/// `-` and `_` (not starting or ending with `-`), separated by dots, at
/// most 253 characters; a trailing dot (fully qualified) is allowed.
pub(super) fn dns_name(raw: &str) -> Result<(), String> {
    let name = raw.strip_suffix('.').unwrap_or(raw);
    let label_ok = |l: &str| {
        (1..=63).contains(&l.len())
            && !l.starts_with('-')
            && !l.ends_with('-')
            && l.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
    };
    if name.len() <= 253 && name.split('.').all(label_ok) {
        Ok(())
    } else {
        Err(format!(
            "invalid DNS name {raw:?} (expected e.g. \"chat.internal\" or \"chat.default.svc.cluster.local.\")"
        ))
    }
}

/// A name server: `IP:port` with a port from 1 to 65535.
pub(super) fn resolver_address(raw: &str) -> Result<SocketAddr, String> {
    match raw.parse::<SocketAddr>() {
        Ok(addr) if addr.port() != 0 => Ok(addr),
        _ => Err(format!(
            "invalid resolver {raw:?} (expected IP:port, e.g. \"10.0.0.2:53\" or \"[fd00::2]:53\")"
        )),
    }
}

/// The prefix of discovered backends' ids (`dns-10.0.0.7-9000`): a pool
/// with `[pools.NAME.dns]` keeps it for them.
pub const DISCOVERED_ID_PREFIX: &str = "dns-";

/// A cookie name: an RFC 6265 token.
pub(super) fn cookie_name(raw: &str) -> Result<(), String> {
    let ok = !raw.is_empty()
        && raw
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b));
    if ok {
        Ok(())
    } else {
        Err(format!(
            "invalid cookie name {raw:?} (use letters, digits and -_.)"
        ))
    }
}

/// A cookie `Path`: starts with `/`, no `;` or control characters.
pub(super) fn cookie_path(raw: &str) -> Result<(), String> {
    if raw.starts_with('/') && !raw.bytes().any(|b| b == b';' || b.is_ascii_control()) {
        Ok(())
    } else {
        Err(format!(
            "cookie path must start with \"/\" and contain no ';', got {raw:?}"
        ))
    }
}

/// A cookie `Domain`: letters, digits, `.` and `-`.
pub(super) fn cookie_domain(raw: &str) -> Result<(), String> {
    if !raw.is_empty()
        && raw
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'-')
    {
        Ok(())
    } else {
        Err(format!("invalid cookie domain {raw:?}"))
    }
}

pub(super) fn same_site(raw: &str) -> Result<SameSite, String> {
    match raw {
        "Lax" => Ok(SameSite::Lax),
        "Strict" => Ok(SameSite::Strict),
        "None" => Ok(SameSite::None),
        other => Err(format!(
            "same_site must be \"Lax\", \"Strict\" or \"None\", got {other:?}"
        )),
    }
}

/// The smallest cookie secret accepted, in bytes.
pub(super) const MIN_SECRET_BYTES: usize = 32;

pub(super) fn cookie_secret(secret: Vec<u8>) -> Result<Vec<u8>, String> {
    if secret.len() >= MIN_SECRET_BYTES {
        Ok(secret)
    } else {
        Err(format!(
            "cookie secret is {} bytes; use at least {MIN_SECRET_BYTES} random bytes (e.g. openssl rand -base64 32)",
            secret.len()
        ))
    }
}

/// A URL berth calls (`jwks_url`, a forward-auth `url`): absolute,
/// `http://` or `https://`, with a host.
pub(super) fn service_url(raw: &str) -> Result<http::Uri, String> {
    let bad = |why: &str| {
        format!("invalid URL {raw:?}: {why} (expected e.g. \"https://idp.example.com/.well-known/jwks.json\")")
    };
    let uri: http::Uri = raw.parse().map_err(|_| bad("not a URL"))?;
    match uri.scheme_str() {
        Some("http" | "https") => {}
        _ => return Err(bad("the scheme must be http or https")),
    }
    if uri.host().is_none_or(str::is_empty) {
        return Err(bad("no host"));
    }
    Ok(uri)
}

/// One `token_from` entry: `header:NAME`, `cookie:NAME` or `query:NAME`.
pub(super) fn token_source(raw: &str) -> Result<TokenSource, String> {
    let err = |reason: &str| {
        format!(
            "invalid token source {raw:?}: {reason} (use \"header:NAME\", \"cookie:NAME\" or \"query:NAME\")"
        )
    };
    let Some((kind, name)) = raw.split_once(':') else {
        return Err(err("unknown source"));
    };
    if name.is_empty() {
        return Err(err("the name after ':' is empty"));
    }
    match kind {
        "header" => http::HeaderName::from_bytes(name.as_bytes())
            .map(TokenSource::Header)
            .map_err(|_| err("not a valid header name")),
        "cookie" => cookie_name(name)
            .map(|()| TokenSource::Cookie(name.to_string()))
            .map_err(|_| err("not a valid cookie name")),
        "query" => Ok(TokenSource::Query(name.to_string())),
        _ => Err(err("unknown source kind")),
    }
}

pub(super) fn on_expiry(raw: &str) -> Result<OnExpiry, String> {
    match raw {
        "close" => Ok(OnExpiry::Close),
        "ignore" => Ok(OnExpiry::Ignore),
        other => Err(format!(
            "on_expiry must be \"close\" or \"ignore\", got {other:?}"
        )),
    }
}

/// Headers the protocol or berth itself owns: never set from a claim or
/// copied from an auth service.
const RESERVED_HEADERS: &[&str] = &[
    "host",
    "content-length",
    "transfer-encoding",
    "connection",
    "upgrade",
    "keep-alive",
    "te",
    "trailer",
    "proxy-authorization",
    "cookie",
    "authorization",
    "x-forwarded-for",
    "x-forwarded-proto",
    "x-forwarded-host",
];

/// A header berth sets on the forwarded request (`claims_to_headers`,
/// `copy_headers`): a valid name that berth or the protocol does not own.
pub(super) fn auth_header(raw: &str) -> Result<http::HeaderName, String> {
    let name = http::HeaderName::from_bytes(raw.as_bytes())
        .map_err(|_| format!("invalid header name {raw:?}"))?;
    if RESERVED_HEADERS.contains(&name.as_str()) || name.as_str().starts_with("sec-websocket-") {
        return Err(format!(
            "header {raw:?} cannot be set by authentication (berth or the protocol owns it)"
        ));
    }
    Ok(name)
}

/// A claim name (`claims_to_headers` values): not empty.
pub(super) fn claim_name(raw: &str) -> Result<(), String> {
    if raw.trim().is_empty() {
        Err("claim name must not be empty".to_string())
    } else {
        Ok(())
    }
}

/// An HS256 secret: at least 32 bytes (RFC 7518 §3.2: a key the size of the
/// hash output).
pub(super) fn jwt_secret(secret: &[u8]) -> Result<(), String> {
    if secret.len() >= MIN_SECRET_BYTES {
        Ok(())
    } else {
        Err(format!(
            "HS256 secret is {} bytes; use at least {MIN_SECRET_BYTES} random bytes (e.g. openssl rand -base64 32)",
            secret.len()
        ))
    }
}

fn is_id_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-')
}

fn is_hostname(host: &str) -> bool {
    !host.is_empty() && host.bytes().all(is_id_byte)
}
