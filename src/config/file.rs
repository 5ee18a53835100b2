//! The config file as written: raw serde types for `berth.toml`.
//!
//! These types own the TOML *shape* only. Every table rejects unknown keys,
//! and everything that needs checking beyond its TOML type is kept raw here
//! (durations and addresses as strings, required keys as `Option`) so that
//! `validate.rs` can report each problem with its key path and line instead
//! of serde stopping at the first one.
//!
//! To add a key: add an `Option` field to the right `File*` struct, then
//! validate it and copy it into the validated type in `validate.rs`.

use std::collections::BTreeMap;

use std::path::PathBuf;

use serde::Deserialize;

/// The whole file.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    /// Duration, default `10s`.
    pub shutdown_window: Option<String>,
    #[serde(default)]
    pub listeners: Vec<FileListener>,
    pub admin: Option<FileAdmin>,
    #[serde(default)]
    pub routes: Vec<FileRoute>,
    /// Pools by name.
    #[serde(default)]
    pub pools: BTreeMap<String, FilePool>,
}

/// One `[[listeners]]` entry.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileListener {
    /// Required, unique.
    pub name: Option<String>,
    /// Required: `IP:port` or `localhost:PORT`.
    pub bind: Option<String>,
    pub tls: Option<FileTls>,
    /// Duration, default `10s`.
    pub handshake_timeout: Option<String>,
}

/// A listener's `tls = { cert = "...", key = "..." }`.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileTls {
    /// Required: PEM certificate chain.
    pub cert: Option<String>,
    /// Required: PEM private key.
    pub key: Option<String>,
}

/// The optional `[admin]` table.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileAdmin {
    /// Required: `IP:port` or `localhost:PORT`.
    pub bind: Option<String>,
    pub token: Option<String>,
}

/// One `[[routes]]` entry.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileRoute {
    pub host: Option<String>,
    /// Default `/`.
    pub path_prefix: Option<String>,
    /// Required: a name in `[pools]`.
    pub pool: Option<String>,
}

/// One `[pools.NAME]` table.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FilePool {
    /// `least_connections` (default) or `round_robin`.
    pub balance: Option<String>,
    pub connect_timeout: Option<String>,
    pub response_timeout: Option<String>,
    pub idle_timeout: Option<String>,
    pub ping_interval: Option<String>,
    pub pong_timeout: Option<String>,
    pub close_timeout: Option<String>,
    pub drain_window: Option<String>,
    /// Origins allowed to open WebSockets (absent: any).
    pub allowed_origins: Option<Vec<String>>,
    /// `cookie`, `hash` or `none` (default).
    pub affinity: Option<String>,
    pub cookie: Option<FileCookie>,
    pub hash: Option<FileHash>,
    pub health: Option<FileHealth>,
    #[serde(default)]
    pub backends: Vec<FileBackend>,
}

/// `[pools.NAME.cookie]`: the signed affinity cookie.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileCookie {
    pub name: Option<String>,
    pub secret: Option<String>,
    pub secret_file: Option<PathBuf>,
    pub max_age: Option<String>,
    pub path: Option<String>,
    pub domain: Option<String>,
    pub same_site: Option<String>,
}

/// `[pools.NAME.hash]`: consistent-hash affinity.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileHash {
    pub key: Option<String>,
    pub bounded_load: Option<f64>,
    pub trusted_proxies: Option<Vec<String>>,
}

/// `[pools.NAME.health]`: active HTTP health checks.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileHealth {
    pub path: Option<String>,
    pub interval: Option<String>,
    pub timeout: Option<String>,
    pub rise: Option<i64>,
    pub fall: Option<i64>,
}

/// One `[[pools.NAME.backends]]` entry.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileBackend {
    /// Required, unique within the pool.
    pub id: Option<String>,
    /// Required: `host:port`.
    pub address: Option<String>,
    /// Default 1; signed so that a negative weight gets a range message.
    pub weight: Option<i64>,
    /// Optional cap on live upgraded connections.
    pub max_connections: Option<i64>,
}
