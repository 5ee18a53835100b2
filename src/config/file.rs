//! The config file as written: the raw types for `berth.toml` and the reader
//! that fills them from a parsed TOML document.
//!
//! These types own the TOML *shape* only: which keys each table has and the
//! TOML type of each value. Everything that needs checking beyond that is
//! kept raw (durations and addresses as strings, required keys as `Option`)
//! for `validate.rs`.
//!
//! The reader does not stop at the first problem, as serde's derive would:
//! it reports every unknown key and every value of the wrong type into the
//! [`Report`] and carries on, treating a bad value as absent (and a bad table
//! as empty), so that one run shows every problem in the file.
//!
//! To add a key: add an `Option` field to the right `File*` struct and its
//! name to the table's `*_KEYS`, read it in the table's function below, then
//! validate it and copy it into the validated type in `validate.rs`.

use std::collections::BTreeMap;

use serde::de::{DeserializeOwned, Error as _};
use toml::{Table, Value};

use super::locate::Seg;
use super::report::Report;

/// The whole file.
#[derive(Clone, Debug, Default)]
pub struct FileConfig {
    pub shutdown_window: Option<String>,
    pub listeners: Vec<FileListener>,
    pub admin: Option<FileAdmin>,
    pub routes: Vec<FileRoute>,
    /// Pools by name.
    pub pools: BTreeMap<String, FilePool>,
}

/// One `[[listeners]]` entry.
#[derive(Clone, Debug, Default)]
pub struct FileListener {
    pub name: Option<String>,
    pub bind: Option<String>,
    pub tls: Option<FileTls>,
    pub handshake_timeout: Option<String>,
    /// Signed, so that a negative count gets a range message.
    pub max_connections: Option<i64>,
    pub max_connections_per_ip: Option<i64>,
    pub max_header_bytes: Option<FileSize>,
    pub proxy_protocol: Option<String>,
    pub proxy_protocol_from: Option<Vec<String>>,
    pub reuse_port: Option<bool>,
    pub http2: Option<bool>,
    /// Signed, so that a negative count gets a range message.
    pub max_concurrent_streams: Option<i64>,
}

/// A listener's `tls = { cert = "...", key = "...", ticket_keys = "..." }`.
#[derive(Clone, Debug, Default)]
pub struct FileTls {
    pub cert: Option<String>,
    pub key: Option<String>,
    pub ticket_keys: Option<String>,
}

/// The optional `[admin]` table.
#[derive(Clone, Debug, Default)]
pub struct FileAdmin {
    pub bind: Option<String>,
    pub token: Option<String>,
}

/// One `[[routes]]` entry.
#[derive(Clone, Debug, Default)]
pub struct FileRoute {
    pub host: Option<String>,
    pub path_prefix: Option<String>,
    pub pool: Option<String>,
}

/// One `[pools.NAME]` table.
#[derive(Clone, Debug, Default)]
pub struct FilePool {
    pub balance: Option<String>,
    pub connect_timeout: Option<String>,
    pub response_timeout: Option<String>,
    pub idle_timeout: Option<String>,
    pub ping_interval: Option<String>,
    pub pong_timeout: Option<String>,
    pub close_timeout: Option<String>,
    pub drain_window: Option<String>,
    pub allowed_origins: Option<Vec<String>>,
    pub affinity: Option<String>,
    pub max_message_size: Option<FileSize>,
    /// Signed, so that a negative rate gets a range message.
    pub max_upgrades_per_second: Option<i64>,
    pub upgrade_burst: Option<i64>,
    pub retry_after_max: Option<String>,
    pub send_timeout: Option<String>,
    pub cookie: Option<FileCookie>,
    pub hash: Option<FileHash>,
    pub health: Option<FileHealth>,
    pub backends: Vec<FileBackend>,
    pub auth: Option<FileAuth>,
    pub slow_start: Option<String>,
    pub max_connection_age: Option<String>,
    pub rebalance: Option<FileRebalance>,
    pub dns: Option<FileDns>,
    pub send_proxy_protocol: Option<String>,
}

/// `[pools.NAME.rebalance]`.
#[derive(Clone, Debug, Default)]
pub struct FileRebalance {
    pub threshold: Option<f64>,
    pub window: Option<String>,
}

/// `[pools.NAME.dns]`: backends discovered by DNS.
#[derive(Clone, Debug, Default)]
pub struct FileDns {
    pub name: Option<String>,
    /// Signed, so that a negative port gets a range message.
    pub port: Option<i64>,
    pub interval: Option<String>,
    pub resolver: Option<String>,
}

/// `[pools.NAME.auth]`.
#[derive(Clone, Debug, Default)]
pub struct FileAuth {
    pub jwt: Option<FileJwt>,
    pub forward: Option<FileForward>,
}

/// `[pools.NAME.auth.jwt]`.
#[derive(Clone, Debug, Default)]
pub struct FileJwt {
    pub jwks_url: Option<String>,
    pub jwks_file: Option<String>,
    pub secret_file: Option<String>,
    pub issuer: Option<String>,
    pub audience: Option<String>,
    pub token_from: Option<Vec<String>>,
    pub refresh: Option<String>,
    pub leeway: Option<String>,
    pub on_expiry: Option<String>,
    pub claims_to_headers: Option<BTreeMap<String, String>>,
}

/// `[pools.NAME.auth.forward]`.
#[derive(Clone, Debug, Default)]
pub struct FileForward {
    pub url: Option<String>,
    pub timeout: Option<String>,
    pub copy_headers: Option<Vec<String>>,
    pub cache: Option<String>,
}

/// A size as written: an integer number of bytes, or a string with a unit
/// (`"64 KiB"`); `rules::size` reads and checks it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum FileSize {
    Bytes(i64),
    Text(String),
}

impl<'de> serde::Deserialize<'de> for FileSize {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl serde::de::Visitor<'_> for Visitor {
            type Value = FileSize;

            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a size: an integer number of bytes or a string such as \"64 KiB\"")
            }

            fn visit_i64<E: serde::de::Error>(self, n: i64) -> Result<FileSize, E> {
                Ok(FileSize::Bytes(n))
            }

            fn visit_u64<E: serde::de::Error>(self, n: u64) -> Result<FileSize, E> {
                Ok(FileSize::Bytes(i64::try_from(n).unwrap_or(i64::MAX)))
            }

            fn visit_str<E: serde::de::Error>(self, s: &str) -> Result<FileSize, E> {
                Ok(FileSize::Text(s.to_string()))
            }
        }
        d.deserialize_any(Visitor)
    }
}

/// `[pools.NAME.cookie]`: the signed affinity cookie.
#[derive(Clone, Debug, Default)]
pub struct FileCookie {
    pub name: Option<String>,
    pub secret: Option<String>,
    pub secret_file: Option<String>,
    pub max_age: Option<String>,
    pub path: Option<String>,
    pub domain: Option<String>,
    pub same_site: Option<String>,
}

/// `[pools.NAME.hash]`: consistent-hash affinity.
#[derive(Clone, Debug, Default)]
pub struct FileHash {
    pub key: Option<String>,
    pub bounded_load: Option<f64>,
    pub trusted_proxies: Option<Vec<String>>,
}

/// `[pools.NAME.health]`: active HTTP health checks.
#[derive(Clone, Debug, Default)]
pub struct FileHealth {
    pub path: Option<String>,
    pub interval: Option<String>,
    pub timeout: Option<String>,
    /// Signed, so that a negative count gets a range message.
    pub rise: Option<i64>,
    pub fall: Option<i64>,
}

/// One `[[pools.NAME.backends]]` entry.
#[derive(Clone, Debug, Default)]
pub struct FileBackend {
    pub id: Option<String>,
    pub address: Option<String>,
    pub weight: Option<i64>,
    pub max_connections: Option<i64>,
    pub drain: Option<bool>,
}

// The keys of each table, in the order the messages list them.
const ROOT_KEYS: &[&str] = &["shutdown_window", "listeners", "admin", "routes", "pools"];
const LISTENER_KEYS: &[&str] = &[
    "name",
    "bind",
    "tls",
    "handshake_timeout",
    "max_connections",
    "max_connections_per_ip",
    "max_header_bytes",
    "proxy_protocol",
    "proxy_protocol_from",
    "reuse_port",
    "http2",
    "max_concurrent_streams",
];
const TLS_KEYS: &[&str] = &["cert", "key", "ticket_keys"];
const ADMIN_KEYS: &[&str] = &["bind", "token"];
const ROUTE_KEYS: &[&str] = &["host", "path_prefix", "pool"];
const POOL_KEYS: &[&str] = &[
    "balance",
    "connect_timeout",
    "response_timeout",
    "idle_timeout",
    "ping_interval",
    "pong_timeout",
    "close_timeout",
    "drain_window",
    "allowed_origins",
    "affinity",
    "max_message_size",
    "max_upgrades_per_second",
    "upgrade_burst",
    "retry_after_max",
    "send_timeout",
    "cookie",
    "hash",
    "health",
    "backends",
    "auth",
    "slow_start",
    "max_connection_age",
    "rebalance",
    "dns",
    "send_proxy_protocol",
];
const COOKIE_KEYS: &[&str] = &[
    "name",
    "secret",
    "secret_file",
    "max_age",
    "path",
    "domain",
    "same_site",
];
const HASH_KEYS: &[&str] = &["key", "bounded_load", "trusted_proxies"];
const HEALTH_KEYS: &[&str] = &["path", "interval", "timeout", "rise", "fall"];
const BACKEND_KEYS: &[&str] = &["id", "address", "weight", "max_connections", "drain"];
const REBALANCE_KEYS: &[&str] = &["threshold", "window"];
const DNS_KEYS: &[&str] = &["name", "port", "interval", "resolver"];
const AUTH_KEYS: &[&str] = &["jwt", "forward"];
const JWT_KEYS: &[&str] = &[
    "jwks_url",
    "jwks_file",
    "secret_file",
    "issuer",
    "audience",
    "token_from",
    "refresh",
    "leeway",
    "on_expiry",
    "claims_to_headers",
];
const FORWARD_KEYS: &[&str] = &["url", "timeout", "copy_headers", "cache"];

/// Every table of the file and its keys, for the documentation guards
/// (`tests/docs.rs`). A table is named by its path, with `NAME` for any
/// pool; an array of tables is named once.
#[cfg(test)]
pub(super) const TABLES: &[(&str, &[&str])] = &[
    ("", ROOT_KEYS),
    ("listeners", LISTENER_KEYS),
    ("listeners.tls", TLS_KEYS),
    ("admin", ADMIN_KEYS),
    ("routes", ROUTE_KEYS),
    ("pools.NAME", POOL_KEYS),
    ("pools.NAME.cookie", COOKIE_KEYS),
    ("pools.NAME.hash", HASH_KEYS),
    ("pools.NAME.health", HEALTH_KEYS),
    ("pools.NAME.backends", BACKEND_KEYS),
    ("pools.NAME.rebalance", REBALANCE_KEYS),
    ("pools.NAME.dns", DNS_KEYS),
    ("pools.NAME.auth", AUTH_KEYS),
    ("pools.NAME.auth.jwt", JWT_KEYS),
    ("pools.NAME.auth.forward", FORWARD_KEYS),
];

/// Reads a parsed document into [`FileConfig`], reporting every unknown key
/// and every value of the wrong type.
pub(super) fn read(doc: &Table, report: &mut Report<'_>) -> FileConfig {
    let root = Fields::open(doc, Vec::new(), ROOT_KEYS, report);
    FileConfig {
        shutdown_window: root.get(report, "shutdown_window"),
        listeners: root
            .tables(report, "listeners", LISTENER_KEYS)
            .into_iter()
            .map(|t| listener(&t, report))
            .collect(),
        admin: root.table(report, "admin", ADMIN_KEYS).map(|t| FileAdmin {
            bind: t.get(report, "bind"),
            token: t.get(report, "token"),
        }),
        routes: root
            .tables(report, "routes", ROUTE_KEYS)
            .into_iter()
            .map(|t| FileRoute {
                host: t.get(report, "host"),
                path_prefix: t.get(report, "path_prefix"),
                pool: t.get(report, "pool"),
            })
            .collect(),
        pools: root
            .named_tables(report, "pools", POOL_KEYS)
            .into_iter()
            .map(|(name, t)| (name.to_string(), pool(&t, report)))
            .collect(),
    }
}

fn listener(t: &Fields<'_>, report: &mut Report<'_>) -> FileListener {
    FileListener {
        name: t.get(report, "name"),
        bind: t.get(report, "bind"),
        tls: t.table(report, "tls", TLS_KEYS).map(|tls| FileTls {
            cert: tls.get(report, "cert"),
            key: tls.get(report, "key"),
            ticket_keys: tls.get(report, "ticket_keys"),
        }),
        handshake_timeout: t.get(report, "handshake_timeout"),
        max_connections: t.get(report, "max_connections"),
        max_connections_per_ip: t.get(report, "max_connections_per_ip"),
        max_header_bytes: t.get(report, "max_header_bytes"),
        proxy_protocol: t.get(report, "proxy_protocol"),
        proxy_protocol_from: t.get(report, "proxy_protocol_from"),
        reuse_port: t.get(report, "reuse_port"),
        http2: t.get(report, "http2"),
        max_concurrent_streams: t.get(report, "max_concurrent_streams"),
    }
}

fn pool(t: &Fields<'_>, report: &mut Report<'_>) -> FilePool {
    FilePool {
        balance: t.get(report, "balance"),
        connect_timeout: t.get(report, "connect_timeout"),
        response_timeout: t.get(report, "response_timeout"),
        idle_timeout: t.get(report, "idle_timeout"),
        ping_interval: t.get(report, "ping_interval"),
        pong_timeout: t.get(report, "pong_timeout"),
        close_timeout: t.get(report, "close_timeout"),
        drain_window: t.get(report, "drain_window"),
        allowed_origins: t.get(report, "allowed_origins"),
        affinity: t.get(report, "affinity"),
        max_message_size: t.get(report, "max_message_size"),
        max_upgrades_per_second: t.get(report, "max_upgrades_per_second"),
        upgrade_burst: t.get(report, "upgrade_burst"),
        retry_after_max: t.get(report, "retry_after_max"),
        send_timeout: t.get(report, "send_timeout"),
        cookie: t.table(report, "cookie", COOKIE_KEYS).map(|c| FileCookie {
            name: c.get(report, "name"),
            secret: c.get(report, "secret"),
            secret_file: c.get(report, "secret_file"),
            max_age: c.get(report, "max_age"),
            path: c.get(report, "path"),
            domain: c.get(report, "domain"),
            same_site: c.get(report, "same_site"),
        }),
        hash: t.table(report, "hash", HASH_KEYS).map(|h| FileHash {
            key: h.get(report, "key"),
            bounded_load: h.get(report, "bounded_load"),
            trusted_proxies: h.get(report, "trusted_proxies"),
        }),
        health: t.table(report, "health", HEALTH_KEYS).map(|h| FileHealth {
            path: h.get(report, "path"),
            interval: h.get(report, "interval"),
            timeout: h.get(report, "timeout"),
            rise: h.get(report, "rise"),
            fall: h.get(report, "fall"),
        }),
        backends: t
            .tables(report, "backends", BACKEND_KEYS)
            .into_iter()
            .map(|b| FileBackend {
                id: b.get(report, "id"),
                address: b.get(report, "address"),
                weight: b.get(report, "weight"),
                max_connections: b.get(report, "max_connections"),
                drain: b.get(report, "drain"),
            })
            .collect(),
        auth: t.table(report, "auth", AUTH_KEYS).map(|a| auth(&a, report)),
        slow_start: t.get(report, "slow_start"),
        max_connection_age: t.get(report, "max_connection_age"),
        rebalance: t
            .table(report, "rebalance", REBALANCE_KEYS)
            .map(|r| FileRebalance {
                threshold: r.get(report, "threshold"),
                window: r.get(report, "window"),
            }),
        dns: t.table(report, "dns", DNS_KEYS).map(|d| FileDns {
            name: d.get(report, "name"),
            port: d.get(report, "port"),
            interval: d.get(report, "interval"),
            resolver: d.get(report, "resolver"),
        }),
        send_proxy_protocol: t.get(report, "send_proxy_protocol"),
    }
}

fn auth(t: &Fields<'_>, report: &mut Report<'_>) -> FileAuth {
    FileAuth {
        jwt: t.table(report, "jwt", JWT_KEYS).map(|j| FileJwt {
            jwks_url: j.get(report, "jwks_url"),
            jwks_file: j.get(report, "jwks_file"),
            secret_file: j.get(report, "secret_file"),
            issuer: j.get(report, "issuer"),
            audience: j.get(report, "audience"),
            token_from: j.get(report, "token_from"),
            refresh: j.get(report, "refresh"),
            leeway: j.get(report, "leeway"),
            on_expiry: j.get(report, "on_expiry"),
            claims_to_headers: j.get(report, "claims_to_headers"),
        }),
        forward: t
            .table(report, "forward", FORWARD_KEYS)
            .map(|f| FileForward {
                url: f.get(report, "url"),
                timeout: f.get(report, "timeout"),
                copy_headers: f.get(report, "copy_headers"),
                cache: f.get(report, "cache"),
            }),
    }
}

/// One table of the document and where it is. A table that is present but
/// not a table reads as an empty one (its problem is already reported).
struct Fields<'d> {
    table: Option<&'d Table>,
    at: Vec<Seg<'d>>,
}

impl<'d> Fields<'d> {
    /// Reports every key of `table` that is not in `known`.
    fn open(
        table: &'d Table,
        at: Vec<Seg<'d>>,
        known: &'static [&'static str],
        report: &mut Report<'_>,
    ) -> Self {
        for key in table.keys().filter(|k| !known.contains(&k.as_str())) {
            let message = toml::de::Error::unknown_field(key, known);
            report.push(&child(&at, Seg::Key(key)), message.message());
            // A misspelt key stands for a known one that is then absent:
            // that one is not reported as missing as well.
            let meant = known
                .iter()
                .filter(|k| !table.contains_key(**k))
                .map(|k| (strsim::osa_distance(k, key), *k))
                .min()
                .filter(|(distance, _)| *distance <= 2);
            if let Some((_, meant)) = meant {
                report.cover(&child(&at, Seg::Key(meant)));
            }
        }
        Fields {
            table: Some(table),
            at,
        }
    }

    /// A placeholder for a value that should have been a table.
    fn bad(at: Vec<Seg<'d>>) -> Self {
        Fields { table: None, at }
    }

    /// Reads `value` as a `T`, or reports why it is not one.
    fn value<T: DeserializeOwned>(
        at: &[Seg<'_>],
        value: &Value,
        report: &mut Report<'_>,
    ) -> Option<T> {
        match T::deserialize(value.clone()) {
            Ok(v) => Some(v),
            Err(err) => {
                report.push(at, err.message());
                None
            }
        }
    }

    /// The value of `key`: `None` when absent or of the wrong type.
    fn get<T: DeserializeOwned>(&self, report: &mut Report<'_>, key: &'static str) -> Option<T> {
        let value = self.table?.get(key)?;
        Self::value(&child(&self.at, Seg::Key(key)), value, report)
    }

    /// The sub-table `key`, when present.
    fn table(
        &self,
        report: &mut Report<'_>,
        key: &'d str,
        known: &'static [&'static str],
    ) -> Option<Fields<'d>> {
        let value = self.table?.get(key)?;
        Some(Self::as_table(
            child(&self.at, Seg::Key(key)),
            value,
            known,
            report,
        ))
    }

    fn as_table(
        at: Vec<Seg<'d>>,
        value: &'d Value,
        known: &'static [&'static str],
        report: &mut Report<'_>,
    ) -> Fields<'d> {
        match value {
            Value::Table(table) => Fields::open(table, at, known, report),
            other => {
                Self::value::<Table>(&at, other, report);
                Fields::bad(at)
            }
        }
    }

    /// The array of tables `key`, one entry per element, so that indexes
    /// match the file.
    fn tables(
        &self,
        report: &mut Report<'_>,
        key: &'d str,
        known: &'static [&'static str],
    ) -> Vec<Fields<'d>> {
        let Some(value) = self.table.and_then(|t| t.get(key)) else {
            return Vec::new();
        };
        let at = child(&self.at, Seg::Key(key));
        let Value::Array(items) = value else {
            Self::value::<Vec<Table>>(&at, value, report);
            return Vec::new();
        };
        items
            .iter()
            .enumerate()
            .map(|(i, item)| Self::as_table(child(&at, Seg::Index(i)), item, known, report))
            .collect()
    }

    /// The table of named tables `key` (`[pools.NAME]`).
    fn named_tables(
        &self,
        report: &mut Report<'_>,
        key: &'d str,
        known: &'static [&'static str],
    ) -> Vec<(&'d str, Fields<'d>)> {
        let Some(value) = self.table.and_then(|t| t.get(key)) else {
            return Vec::new();
        };
        let at = child(&self.at, Seg::Key(key));
        let Value::Table(table) = value else {
            Self::value::<Table>(&at, value, report);
            return Vec::new();
        };
        table
            .iter()
            .map(|(name, item)| {
                let fields = Self::as_table(child(&at, Seg::Key(name)), item, known, report);
                (name.as_str(), fields)
            })
            .collect()
    }
}

fn child<'a>(at: &[Seg<'a>], seg: Seg<'a>) -> Vec<Seg<'a>> {
    let mut out = Vec::with_capacity(at.len() + 1);
    out.extend_from_slice(at);
    out.push(seg);
    out
}
