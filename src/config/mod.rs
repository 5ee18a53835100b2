//! Configuration: the TOML file as written (`file.rs`), and the validated
//! [`Config`] the rest of berth runs on.
//!
//! The pipeline is `text -> TOML document -> FileConfig (file.rs: unknown
//! keys and wrong types) -> validate (validate.rs, with the per-value rules
//! of rules.rs) -> Config`. Every problem of every stage after the TOML
//! syntax goes into one report, so one run shows them all; each names the
//! file, the line and the dotted key (`locate.rs` maps a key path back to a
//! line of the source text), in the form
//! `config/berth.toml:14: pools.chat.backends[1].address: invalid socket address "10.0.0.1"`.
//!
//! The validated types are what the rest of berth runs on: durations within
//! their documented ranges, hash keys as [`HashKey`], CIDRs as
//! [`ipnet::IpNet`], so nothing is parsed again at run time. This module is
//! at the bottom of the layers: it imports nothing of berth but `tls`.
//!
//! Files the config names are read by `read.rs`: regular files only, with a
//! size cap, relative paths against the config file's directory. Loading
//! is synchronous; [`Config::load_async`] runs it off the async runtime.

mod file;
mod jwks;
mod locate;
mod read;
mod report;
mod rules;
mod validate;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

pub use file::{FileConfig, FileSize};
pub use jwks::{KeySet, VerifyKey};
pub use read::JWKS_LIMIT;
pub use rules::human_size;

/// Where the running proxy's configuration came from and what it says.
#[derive(Clone, Debug)]
pub struct Config {
    /// The file this was read from (`None` for configs built from a string).
    pub source: Option<PathBuf>,
    pub listeners: Vec<ListenerConfig>,
    pub admin: Option<AdminConfig>,
    /// Routes, sorted most specific first: host routes before host-less ones,
    /// then longer path prefixes before shorter ones, then file order.
    pub routes: Vec<RouteConfig>,
    /// Pools by name.
    pub pools: BTreeMap<String, PoolConfig>,
    /// How long a SIGTERM/SIGINT shutdown spreads its Close 1001 frames over.
    pub shutdown_window: Duration,
}

#[derive(Clone, Debug)]
pub struct ListenerConfig {
    pub name: String,
    pub bind: SocketAddr,
    pub tls: Option<TlsConfig>,
    /// Time allowed for the TLS handshake plus the first request head.
    pub handshake_timeout: Duration,
    /// Cap on this listener's open client connections; `None`: no cap (the
    /// process-wide descriptor reserve still applies).
    pub max_connections: Option<u64>,
    /// Cap on open connections from one client address (IPv6: one /64).
    pub max_connections_per_ip: Option<u64>,
    /// The largest request head (request line plus headers) accepted; on
    /// HTTP/2, the largest decoded header list (`SETTINGS_MAX_HEADER_LIST_SIZE`).
    pub max_header_bytes: usize,
    /// Whether the listener speaks HTTP/2: ALPN `h2` on TLS, prior
    /// knowledge on plain TCP.
    pub http2: bool,
    /// Streams one HTTP/2 connection may have open at once.
    pub max_concurrent_streams: u32,
    /// `proxy_protocol` (with `proxy_protocol_from`): every connection
    /// starts with a PROXY header naming the client; `None`: off.
    pub proxy_protocol: Option<ProxyProtocolConfig>,
    /// `reuse_port`: bind with SO_REUSEPORT, so that several processes
    /// share the port.
    pub reuse_port: bool,
}

/// A listener's `proxy_protocol` and `proxy_protocol_from`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ProxyProtocolConfig {
    pub versions: ProxyVersions,
    /// The peers allowed to send the header (host bits cleared); never
    /// empty.
    pub from: Vec<ipnet::IpNet>,
}

/// Which PROXY protocol versions a listener accepts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ProxyVersions {
    V1,
    V2,
    Any,
}

impl ProxyVersions {
    /// As written in the config.
    pub fn as_str(self) -> &'static str {
        match self {
            ProxyVersions::V1 => "v1",
            ProxyVersions::V2 => "v2",
            ProxyVersions::Any => "any",
        }
    }
}

#[derive(Clone, Debug)]
pub struct TlsConfig {
    pub cert: PathBuf,
    pub key: PathBuf,
    /// `ticket_keys`: the file of shared session-ticket keys, when set
    /// (its keys are in `server_config`'s ticketer).
    pub ticket_keys: Option<PathBuf>,
    /// Built (and the key checked against the certificate) during validation,
    /// so `check` catches what `run` would fail on.
    pub server_config: Arc<rustls::ServerConfig>,
}

#[derive(Clone, Debug)]
pub struct AdminConfig {
    pub bind: SocketAddr,
    /// Bearer token required on mutating admin routes, when set.
    pub token: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RouteConfig {
    /// Lower-cased host without port; `None` matches any host.
    pub host: Option<String>,
    /// Always starts with `/`.
    pub path_prefix: String,
    pub pool: String,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Balance {
    LeastConnections,
    RoundRobin,
}

impl Balance {
    /// As written in the config.
    pub fn as_str(self) -> &'static str {
        match self {
            Balance::LeastConnections => "least_connections",
            Balance::RoundRobin => "round_robin",
        }
    }
}

#[derive(Clone, Debug, PartialEq)]
pub struct PoolConfig {
    pub name: String,
    pub balance: Balance,
    pub connect_timeout: Duration,
    /// Time allowed for a backend to answer with a response head (the `101`
    /// of a WebSocket handshake, or the head of a plain HTTP response).
    pub response_timeout: Duration,
    /// No data frame in either direction for this long closes the connection.
    pub idle_timeout: Option<Duration>,
    /// berth pings the client this often; `None` disables heartbeats.
    pub ping_interval: Option<Duration>,
    pub pong_timeout: Duration,
    pub close_timeout: Duration,
    pub drain_window: Duration,
    /// Browser origins allowed to open WebSockets, lower-cased
    /// (`scheme://host[:port]`); empty means any. A handshake without an
    /// `Origin` header (a non-browser client) is not affected.
    pub allowed_origins: Vec<String>,
    pub affinity: Affinity,
    /// Message size, upgrade rate, slow consumers and Retry-After.
    pub limits: PoolLimits,
    /// Active health checks; `None` means passive checks only.
    pub health: Option<HealthConfig>,
    pub backends: Vec<BackendConfig>,
    /// Who may reach the pool (`[pools.NAME.auth]`); by default, anyone.
    pub auth: AuthConfig,
    /// A backend that joins ramps up to its full share over this long;
    /// `None`: at once.
    pub slow_start: Option<Duration>,
    /// WebSockets older than this (spread over its last 10 %) are closed
    /// with 1012; `None`: never.
    pub max_connection_age: Option<Duration>,
    /// `[pools.NAME.rebalance]`; `None`: live connections stay where they are.
    pub rebalance: Option<RebalanceConfig>,
    /// `[pools.NAME.dns]`: backends discovered by DNS, besides `backends`.
    pub dns: Option<DnsConfig>,
    /// `send_proxy_protocol = "v2"`: every backend connection starts with a
    /// PROXY v2 header naming the client.
    pub send_proxy_protocol: bool,
}

/// `[pools.NAME.rebalance]`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct RebalanceConfig {
    /// A backend holding more than this times its weighted share of the
    /// live WebSockets sheds the excess; above 1.0 and at most 10.
    pub threshold: f64,
    /// The sheds of one rebalance are spread over this window.
    pub window: Duration,
}

/// `[pools.NAME.dns]`: each A and AAAA record of `name` is a backend at
/// `port`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DnsConfig {
    /// As written (a trailing dot makes it fully qualified).
    pub name: String,
    pub port: u16,
    /// Looked up again this often (sooner when the records' TTL is shorter).
    pub interval: Duration,
    /// The name server to ask; `None`: the system's (`/etc/resolv.conf`).
    pub resolver: Option<SocketAddr>,
}

/// `[pools.NAME.auth]`: a pool has JWT, forward-auth, both (JWT first) or
/// neither.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct AuthConfig {
    pub jwt: Option<JwtConfig>,
    pub forward: Option<ForwardAuthConfig>,
}

/// `[pools.NAME.auth.jwt]`.
#[derive(Clone, Debug, PartialEq)]
pub struct JwtConfig {
    pub keys: JwtKeys,
    /// Required `iss`, when set.
    pub issuer: Option<String>,
    /// Required `aud`, when set.
    pub audience: Option<String>,
    /// Where the token is looked for, in order; never empty.
    pub token_from: Vec<TokenSource>,
    /// How often a `jwks_url` is fetched again.
    pub refresh: Duration,
    /// Clock skew allowed on `exp` and `nbf` (whole seconds count).
    pub leeway: Duration,
    pub on_expiry: OnExpiry,
    /// Header set on the forwarded request, and the claim it carries; in
    /// header-name order, names unique.
    pub claims_to_headers: Vec<(http::HeaderName, String)>,
}

/// Where a pool's JWT verification keys come from.
#[derive(Clone, Debug, PartialEq)]
pub enum JwtKeys {
    /// `jwks_url`: fetched at run time (never by `check`).
    Url(http::Uri),
    /// `jwks_file`: read and parsed when the config is loaded.
    File { path: PathBuf, keys: KeySet },
    /// `secret_file`: an HS256 secret, read when the config is loaded.
    Secret { path: PathBuf, keys: KeySet },
}

/// One entry of `token_from`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TokenSource {
    /// `header:NAME`; a `Bearer ` scheme is taken off the value.
    Header(http::HeaderName),
    /// `cookie:NAME`.
    Cookie(String),
    /// `query:NAME`: removed from the URI before it is forwarded or logged.
    Query(String),
}

impl std::fmt::Display for TokenSource {
    /// As written in the config.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            TokenSource::Header(name) => write!(f, "header:{name}"),
            TokenSource::Cookie(name) => write!(f, "cookie:{name}"),
            TokenSource::Query(name) => write!(f, "query:{name}"),
        }
    }
}

/// `on_expiry`: what happens to a live WebSocket when its token expires.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OnExpiry {
    /// Close 1008 to both sides.
    Close,
    Ignore,
}

/// `[pools.NAME.auth.forward]`.
#[derive(Clone, Debug, PartialEq)]
pub struct ForwardAuthConfig {
    /// `http://` or `https://`, absolute.
    pub url: http::Uri,
    pub timeout: Duration,
    /// Headers copied from the auth service's 2xx answer onto the request.
    pub copy_headers: Vec<http::HeaderName>,
    /// How long an allowing answer is reused; `None`: never.
    pub cache: Option<Duration>,
}

/// A pool's limits against overload and hostile or stuck clients.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PoolLimits {
    /// The largest data message (all its fragments' payloads together)
    /// relayed either way; `None` is no limit.
    pub max_message_size: Option<u64>,
    /// New WebSockets admitted per second (a token bucket); `None` is no limit.
    pub upgrade_rate: Option<UpgradeRate>,
    /// `Retry-After` on berth's 503s is drawn uniformly from 1 s to this
    /// (whole seconds, at least 1).
    pub retry_after_max: Duration,
    /// A peer that accepts no bytes for this long while berth holds bytes
    /// for it is dropped; `None` leaves backpressure alone.
    pub send_timeout: Option<Duration>,
}

impl Default for PoolLimits {
    /// The documented defaults: no limits, and Retry-After up to 5 s.
    fn default() -> Self {
        PoolLimits {
            max_message_size: None,
            upgrade_rate: None,
            retry_after_max: Duration::from_secs(5),
            send_timeout: None,
        }
    }
}

/// A pool's token bucket for upgrades.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct UpgradeRate {
    /// Tokens added per second (`max_upgrades_per_second`).
    pub per_second: u32,
    /// The bucket's size: upgrades admitted at once after a quiet spell
    /// (`upgrade_burst`).
    pub burst: u32,
}

/// How a pool keeps a client on one backend.
#[derive(Clone, Debug, PartialEq)]
pub enum Affinity {
    None,
    Cookie(CookieConfig),
    Hash(HashConfig),
}

impl Affinity {
    /// The `mode` label of `berth_affinity_total`.
    pub fn mode(&self) -> &'static str {
        match self {
            Affinity::None => "none",
            Affinity::Cookie(_) => "cookie",
            Affinity::Hash(_) => "hash",
        }
    }
}

/// The affinity cookie's `SameSite` attribute.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SameSite {
    Lax,
    Strict,
    None,
}

impl SameSite {
    /// The attribute value as written in `Set-Cookie`.
    pub fn as_str(self) -> &'static str {
        match self {
            SameSite::Lax => "Lax",
            SameSite::Strict => "Strict",
            SameSite::None => "None",
        }
    }
}

#[derive(Clone, PartialEq)]
pub struct CookieConfig {
    pub name: String,
    /// At least 32 bytes.
    pub secret: Vec<u8>,
    pub max_age: Option<Duration>,
    pub path: String,
    pub domain: Option<String>,
    pub same_site: SameSite,
}

impl std::fmt::Debug for CookieConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print the secret.
        f.debug_struct("CookieConfig")
            .field("name", &self.name)
            .field("max_age", &self.max_age)
            .field("path", &self.path)
            .field("domain", &self.domain)
            .field("same_site", &self.same_site)
            .finish_non_exhaustive()
    }
}

#[derive(Clone, Debug, PartialEq)]
pub struct HashConfig {
    pub key: HashKey,
    /// No backend takes more than this many times the average live
    /// connections (consistent hashing with bounded loads); above 1.0 and
    /// at most 100.
    pub bounded_load: Option<f64>,
    /// CIDRs (host bits cleared) whose `X-Forwarded-For` is believed for
    /// `client_ip`.
    pub trusted_proxies: Vec<ipnet::IpNet>,
}

/// What a hash-affinity pool hashes on (`key` in `[pools.NAME.hash]`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum HashKey {
    /// `client_ip`: the client address, through trusted proxies.
    ClientIp,
    /// `header:NAME`: a request header (all its lines, comma-joined).
    Header(http::HeaderName),
    /// `cookie:NAME`: a request cookie.
    Cookie(String),
    /// `query:NAME`: a query-string parameter (form-decoded).
    Query(String),
    /// `claim:NAME`: a claim of the request's verified JWT (pools with
    /// `[pools.NAME.auth.jwt]` only).
    Claim(String),
}

impl std::fmt::Display for HashKey {
    /// As written in the config.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            HashKey::ClientIp => f.write_str("client_ip"),
            HashKey::Header(name) => write!(f, "header:{name}"),
            HashKey::Cookie(name) => write!(f, "cookie:{name}"),
            HashKey::Query(name) => write!(f, "query:{name}"),
            HashKey::Claim(name) => write!(f, "claim:{name}"),
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HealthConfig {
    pub path: String,
    pub interval: Duration,
    pub timeout: Duration,
    pub rise: u32,
    pub fall: u32,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BackendConfig {
    pub id: String,
    /// `host:port` as written; hostnames are resolved at connect time.
    pub address: String,
    pub weight: u32,
    /// Cap on live upgraded connections; `None` is unlimited.
    pub max_connections: Option<u64>,
    /// `drain = true`: drained as by the admin API, for as long as the
    /// config says so.
    pub drain: bool,
}

impl DnsConfig {
    /// The backend an address discovered by this table stands for: weight
    /// 1, no cap, and an id derived from the address alone, so every berth
    /// instance names it the same way: `dns-` then the IP as written by
    /// Rust's `Display` (IPv6 in its shortest form), each `:` turned into
    /// `-`, then `-` and the port. `10.0.0.7` on port 9000 is
    /// `dns-10.0.0.7-9000`; `fd00::7` is `dns-fd00--7-9000`.
    pub fn backend(&self, ip: std::net::IpAddr) -> BackendConfig {
        let ip = ip.to_canonical();
        BackendConfig {
            id: format!(
                "{}{}-{}",
                rules::DISCOVERED_ID_PREFIX,
                ip.to_string().replace(':', "-"),
                self.port
            ),
            address: SocketAddr::new(ip, self.port).to_string(),
            weight: 1,
            max_connections: None,
            drain: false,
        }
    }
}

/// One thing wrong with a config file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Problem {
    /// 1-based line in the source, when it could be located.
    pub line: Option<usize>,
    /// Dotted key path, e.g. `pools.chat.backends[1].address`.
    pub key: String,
    pub message: String,
}

/// Every problem found in one config file.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{path}: cannot read config file: {source}")]
    Read {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{}", render_problems(.origin, .problems))]
    Invalid {
        origin: String,
        problems: Vec<Problem>,
    },
}

fn render_problems(origin: &str, problems: &[Problem]) -> String {
    let mut out = String::new();
    for (i, p) in problems.iter().enumerate() {
        if i > 0 {
            out.push('\n');
        }
        match p.line {
            Some(line) => out.push_str(&format!("{origin}:{line}: ")),
            None => out.push_str(&format!("{origin}: ")),
        }
        if !p.key.is_empty() {
            out.push_str(&p.key);
            out.push_str(": ");
        }
        out.push_str(&p.message);
    }
    out
}

/// How long [`Config::load_async`] waits for a load before giving up.
pub const LOAD_TIME_LIMIT: Duration = Duration::from_secs(10);

impl Config {
    /// Reads and validates a config file. Relative paths in it (`tls` files,
    /// a cookie `secret_file`) are resolved against the file's directory.
    ///
    /// This is blocking file I/O: on the async runtime use
    /// [`Config::load_async`].
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let origin = path.display().to_string();
        let text = read::config_text(path).map_err(|source| ConfigError::Read {
            path: origin.clone(),
            source,
        })?;
        // `berth.toml` has the parent "", which joins as the working directory.
        let base = path.parent().unwrap_or(Path::new(""));
        let mut config = validate::parse_and_validate(&text, Some(base))
            .map_err(|problems| ConfigError::Invalid { origin, problems })?;
        config.source = Some(path.to_path_buf());
        Ok(config)
    }

    /// [`Config::load`] for async callers (a reload): the load runs on
    /// tokio's blocking pool, so no file can stall the runtime, and gives up
    /// after [`LOAD_TIME_LIMIT`] (a file on a stalled network mount; the
    /// blocked thread is left to finish on its own).
    pub async fn load_async(path: PathBuf) -> Result<Config, ConfigError> {
        Self::load_within(path, LOAD_TIME_LIMIT).await
    }

    async fn load_within(path: PathBuf, limit: Duration) -> Result<Config, ConfigError> {
        let origin = path.display().to_string();
        let task = tokio::task::spawn_blocking(move || Config::load(&path));
        let failed = |message: String| ConfigError::Read {
            path: origin.clone(),
            source: std::io::Error::other(message),
        };
        match tokio::time::timeout(limit, task).await {
            Ok(Ok(result)) => result,
            Ok(Err(join)) => Err(failed(format!("loading the config failed: {join}"))),
            Err(_) => Err(failed(format!(
                "reading the config and the files it names took longer than {}",
                rules::human(limit)
            ))),
        }
    }

    /// Parses and validates TOML text; `origin` names it in error messages.
    /// Relative paths in it resolve against the working directory.
    pub fn from_toml_str(text: &str, origin: &str) -> Result<Config, ConfigError> {
        validate::parse_and_validate(text, None).map_err(|problems| ConfigError::Invalid {
            origin: origin.to_string(),
            problems,
        })
    }

    pub fn pool(&self, name: &str) -> Option<&PoolConfig> {
        self.pools.get(name)
    }
}

#[cfg(test)]
mod tests;
