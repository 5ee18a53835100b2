//! Validation: turns config text into a [`Config`] or the full list of
//! [`Problem`]s with it.
//!
//! This module owns every rule about what a valid config is. It first
//! deserializes the text into [`FileConfig`] (a TOML or shape error there is
//! reported alone, since nothing after it can be trusted), then checks every
//! field and cross-reference, collecting all problems in one pass. Each
//! problem is located with [`Locator`]: a bad value points at its own line, a
//! missing key at its enclosing table. Problems come back ordered by line.

use std::cmp::Reverse;
use std::collections::{BTreeMap, HashMap};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use super::file::{
    FileAdmin, FileBackend, FileConfig, FileCookie, FileHash, FileHealth, FileListener, FilePool,
    FileRoute, FileTls,
};
use super::locate::{line_at, render_path, Locator, Seg};
use super::{
    AdminConfig, Affinity, BackendConfig, Balance, Config, CookieConfig, HashConfig, HealthConfig,
    ListenerConfig, PoolConfig, Problem, RouteConfig, SameSite, TlsConfig,
};
use crate::tls::TlsError;

const DEFAULT_SHUTDOWN_WINDOW: Duration = Duration::from_secs(10);
const DEFAULT_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
const DEFAULT_RESPONSE_TIMEOUT: Duration = Duration::from_secs(30);
const DEFAULT_PONG_TIMEOUT: Duration = Duration::from_secs(10);
const DEFAULT_CLOSE_TIMEOUT: Duration = Duration::from_secs(5);
const DEFAULT_DRAIN_WINDOW: Duration = Duration::from_secs(30);
const MAX_WEIGHT: i64 = 1000;

/// Parses and validates config text.
pub(super) fn parse_and_validate(text: &str) -> Result<Config, Vec<Problem>> {
    let file: FileConfig = match toml::from_str(text) {
        Ok(file) => file,
        Err(err) => return Err(vec![toml_problem(text, &err)]),
    };
    let mut checker = Checker {
        locator: Locator::new(text),
        problems: Vec::new(),
    };
    let config = checker.config(&file);
    if checker.problems.is_empty() {
        Ok(config)
    } else {
        let mut problems = checker.problems;
        // Stable: problems on one line keep the order they were found in;
        // problems with no line (file-wide ones) come first.
        problems.sort_by_key(|p| p.line);
        Err(problems)
    }
}

/// The one problem for a TOML syntax error or a serde shape error.
fn toml_problem(text: &str, err: &toml::de::Error) -> Problem {
    let (line, key) = match err.span() {
        Some(span) => (
            Some(line_at(text, span.start)),
            super::locate::path_at(text, span),
        ),
        None => (None, String::new()),
    };
    Problem {
        line,
        key,
        // Parser messages can span lines; a problem renders on one.
        message: err
            .message()
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty())
            .collect::<Vec<_>>()
            .join("; "),
    }
}

/// Whether a duration may be zero.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Zero {
    Allowed,
    Rejected,
}

/// How a TLS failure maps onto the `tls` keys (None: the table itself).
fn tls_error_key(err: &TlsError) -> Option<&'static str> {
    match err {
        TlsError::ReadCert { .. } | TlsError::NoCert { .. } => Some("cert"),
        TlsError::ReadKey { .. } | TlsError::Mismatch { .. } | TlsError::BadKey { .. } => {
            Some("key")
        }
        TlsError::Ticketer { .. } | TlsError::Versions { .. } => None,
    }
}

fn path<'a>(base: &[Seg<'a>], rest: &[Seg<'a>]) -> Vec<Seg<'a>> {
    let mut out = Vec::with_capacity(base.len() + rest.len());
    out.extend_from_slice(base);
    out.extend_from_slice(rest);
    out
}

struct Checker<'t> {
    locator: Locator<'t>,
    problems: Vec<Problem>,
}

impl Checker<'_> {
    fn push(&mut self, at: &[Seg<'_>], message: impl Into<String>) {
        self.problems.push(Problem {
            line: self.locator.line_of(at),
            key: render_path(at),
            message: message.into(),
        });
    }

    /// A required key's value, or a problem at the enclosing table.
    fn required<'v>(
        &mut self,
        at: &[Seg<'_>],
        value: Option<&'v str>,
        example: &str,
    ) -> Option<&'v str> {
        if value.is_none() {
            self.push(at, format!("required key is missing (add e.g. {example})"));
        }
        value
    }

    /// A duration with a default; a bad value yields a problem and the default.
    fn duration(
        &mut self,
        at: &[Seg<'_>],
        raw: Option<&str>,
        default: Duration,
        zero: Zero,
    ) -> Duration {
        let Some(raw) = raw else { return default };
        match humantime::parse_duration(raw.trim()) {
            Ok(d) if d.is_zero() && zero == Zero::Rejected => {
                self.push(
                    at,
                    format!("duration must be greater than zero, got {raw:?}"),
                );
                default
            }
            Ok(d) => d,
            Err(_) => {
                self.push(
                    at,
                    format!("invalid duration {raw:?} (use e.g. \"250ms\", \"30s\", \"5m\")"),
                );
                default
            }
        }
    }

    /// An optional duration where absent or zero means "off".
    fn optional_duration(&mut self, at: &[Seg<'_>], raw: Option<&str>) -> Option<Duration> {
        raw?;
        let d = self.duration(at, raw, Duration::ZERO, Zero::Allowed);
        (!d.is_zero()).then_some(d)
    }

    fn config(&mut self, file: &FileConfig) -> Config {
        let shutdown_window = self.duration(
            &[Seg::Key("shutdown_window")],
            file.shutdown_window.as_deref(),
            DEFAULT_SHUTDOWN_WINDOW,
            Zero::Allowed,
        );

        if file.listeners.is_empty() {
            self.push(
                &[Seg::Key("listeners")],
                "no listeners defined (add a [[listeners]] table with name and bind)",
            );
        }
        let mut listeners = Vec::new();
        for (i, raw) in file.listeners.iter().enumerate() {
            if let Some(listener) = self.listener(i, raw) {
                listeners.push((i, listener));
            }
        }
        self.check_listener_uniqueness(&listeners);

        let admin = file.admin.as_ref().and_then(|a| self.admin(a, &listeners));

        let mut pools = BTreeMap::new();
        for (name, raw) in &file.pools {
            pools.insert(name.clone(), self.pool(name, raw));
        }

        if file.routes.is_empty() {
            self.push(
                &[Seg::Key("routes")],
                "no routes defined (add a [[routes]] table with a pool)",
            );
        }
        let mut routes = Vec::new();
        for (i, raw) in file.routes.iter().enumerate() {
            if let Some(route) = self.route(i, raw, &file.pools) {
                routes.push((i, route));
            }
        }
        self.check_route_uniqueness(&routes);
        let mut routes: Vec<RouteConfig> = routes.into_iter().map(|(_, r)| r).collect();
        sort_routes(&mut routes);

        Config {
            source: None,
            listeners: listeners.into_iter().map(|(_, l)| l).collect(),
            admin,
            routes,
            pools,
            shutdown_window,
        }
    }

    fn listener(&mut self, i: usize, raw: &FileListener) -> Option<ListenerConfig> {
        let base = [Seg::Key("listeners"), Seg::Index(i)];
        let name = self.required(
            &path(&base, &[Seg::Key("name")]),
            raw.name.as_deref(),
            "name = \"public\"",
        );
        if name.is_some_and(|n| n.trim().is_empty()) {
            self.push(
                &path(&base, &[Seg::Key("name")]),
                "listener name must not be empty",
            );
        }
        let bind = self
            .required(
                &path(&base, &[Seg::Key("bind")]),
                raw.bind.as_deref(),
                "bind = \"0.0.0.0:8443\"",
            )
            .and_then(|b| self.bind_address(&path(&base, &[Seg::Key("bind")]), b));
        let handshake_timeout = self.duration(
            &path(&base, &[Seg::Key("handshake_timeout")]),
            raw.handshake_timeout.as_deref(),
            DEFAULT_HANDSHAKE_TIMEOUT,
            Zero::Rejected,
        );
        // A TLS failure is already a problem, so the (then unused) listener
        // is kept without TLS to let the uniqueness checks still see it.
        let tls = raw
            .tls
            .as_ref()
            .and_then(|tls| self.tls(&path(&base, &[Seg::Key("tls")]), tls));
        Some(ListenerConfig {
            name: name?.to_string(),
            bind: bind?,
            tls,
            handshake_timeout,
        })
    }

    /// `IP:port` (port 0 allowed) or `localhost:PORT`.
    fn bind_address(&mut self, at: &[Seg<'_>], raw: &str) -> Option<SocketAddr> {
        if let Ok(addr) = raw.parse::<SocketAddr>() {
            return Some(addr);
        }
        if let Some((host, port)) = raw.rsplit_once(':') {
            if host.eq_ignore_ascii_case("localhost") {
                if let Ok(port) = port.parse::<u16>() {
                    return Some(SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), port));
                }
            }
        }
        self.push(
            at,
            format!(
                "invalid socket address {raw:?} (expected IP:port, e.g. \"0.0.0.0:8443\", or localhost:PORT)"
            ),
        );
        None
    }

    fn tls(&mut self, base: &[Seg<'_>], raw: &FileTls) -> Option<TlsConfig> {
        let cert = self.required(
            &path(base, &[Seg::Key("cert")]),
            raw.cert.as_deref(),
            "cert = \"certs/example.crt\"",
        );
        let key = self.required(
            &path(base, &[Seg::Key("key")]),
            raw.key.as_deref(),
            "key = \"certs/example.key\"",
        );
        let (cert, key) = (PathBuf::from(cert?), PathBuf::from(key?));
        match crate::tls::load_server_config(&cert, &key) {
            Ok(server_config) => Some(TlsConfig {
                cert,
                key,
                server_config,
            }),
            Err(err) => {
                let at = match tls_error_key(&err) {
                    Some(key) => path(base, &[Seg::Key(key)]),
                    None => base.to_vec(),
                };
                self.push(&at, err.to_string());
                None
            }
        }
    }

    fn check_listener_uniqueness(&mut self, listeners: &[(usize, ListenerConfig)]) {
        let mut names: HashMap<&str, usize> = HashMap::new();
        for (n, (i, listener)) in listeners.iter().enumerate() {
            let base = [Seg::Key("listeners"), Seg::Index(*i)];
            if names.insert(listener.name.as_str(), *i).is_some() {
                self.push(
                    &path(&base, &[Seg::Key("name")]),
                    format!(
                        "duplicate listener name {:?} (names must be unique)",
                        listener.name
                    ),
                );
            }
            if let Some((j, earlier)) = listeners[..n]
                .iter()
                .find(|(_, earlier)| binds_collide(earlier.bind, listener.bind))
            {
                self.push(
                    &path(&base, &[Seg::Key("bind")]),
                    format!(
                        "bind address {} is already used by listeners[{j}] ({:?}); each listener needs its own address",
                        listener.bind, earlier.name
                    ),
                );
            }
        }
    }

    fn admin(
        &mut self,
        raw: &FileAdmin,
        listeners: &[(usize, ListenerConfig)],
    ) -> Option<AdminConfig> {
        let bind_at = [Seg::Key("admin"), Seg::Key("bind")];
        let token_at = [Seg::Key("admin"), Seg::Key("token")];
        let bind = self
            .required(&bind_at, raw.bind.as_deref(), "bind = \"127.0.0.1:9900\"")
            .and_then(|b| self.bind_address(&bind_at, b));
        let token = raw.token.clone();
        if token.as_deref().is_some_and(|t| t.trim().is_empty()) {
            self.push(
                &token_at,
                "token must not be empty (remove it to disable authentication on a loopback admin bind)",
            );
        }
        let bind = bind?;
        if let Some((_, listener)) = listeners.iter().find(|(_, l)| binds_collide(l.bind, bind)) {
            self.push(
                &bind_at,
                format!(
                    "admin bind {bind} collides with listener {:?} (give the admin API its own address)",
                    listener.name
                ),
            );
        }
        if !bind.ip().is_loopback() && token.is_none() {
            self.push(
                &token_at,
                format!(
                    "admin API on a non-loopback address requires [admin] token (bind is {bind}; set token = \"...\" or bind to 127.0.0.1)"
                ),
            );
        }
        Some(AdminConfig { bind, token })
    }

    fn route(
        &mut self,
        i: usize,
        raw: &FileRoute,
        pools: &BTreeMap<String, FilePool>,
    ) -> Option<RouteConfig> {
        let base = [Seg::Key("routes"), Seg::Index(i)];
        let host = match raw.host.as_deref() {
            Some(h) => match normalize_host(h) {
                Some(host) => Some(Some(host)),
                None => {
                    self.push(
                        &path(&base, &[Seg::Key("host")]),
                        format!(
                            "invalid host {h:?} (expected a host name such as \"chat.example.com\", optionally with :port)"
                        ),
                    );
                    None
                }
            },
            None => Some(None),
        };
        let path_prefix = raw.path_prefix.clone().unwrap_or_else(|| "/".to_string());
        let prefix_ok = path_prefix.starts_with('/');
        if !prefix_ok {
            self.push(
                &path(&base, &[Seg::Key("path_prefix")]),
                format!("path_prefix must start with \"/\", got {path_prefix:?}"),
            );
        }
        let pool = self.required(
            &path(&base, &[Seg::Key("pool")]),
            raw.pool.as_deref(),
            "pool = \"chat\"",
        );
        let pool_ok = match pool {
            Some(name) if !pools.contains_key(name) => {
                let message = if pools.is_empty() {
                    format!(
                        "unknown pool {name:?} (no pools are defined; add a [pools.{name}] table)"
                    )
                } else {
                    let defined: Vec<&str> = pools.keys().map(String::as_str).collect();
                    format!(
                        "unknown pool {name:?} (defined pools: {})",
                        defined.join(", ")
                    )
                };
                self.push(&path(&base, &[Seg::Key("pool")]), message);
                false
            }
            Some(_) => true,
            None => false,
        };
        if !(prefix_ok && pool_ok) {
            return None;
        }
        Some(RouteConfig {
            host: host?,
            path_prefix,
            pool: pool?.to_string(),
        })
    }

    fn check_route_uniqueness(&mut self, routes: &[(usize, RouteConfig)]) {
        for (n, (i, route)) in routes.iter().enumerate() {
            let earlier = routes[..n]
                .iter()
                .find(|(_, r)| r.host == route.host && r.path_prefix == route.path_prefix);
            if let Some((j, _)) = earlier {
                let host = match &route.host {
                    Some(h) => format!("host {h:?}"),
                    None => "any host".to_string(),
                };
                self.push(
                    &[Seg::Key("routes"), Seg::Index(*i)],
                    format!(
                        "duplicate route: routes[{j}] already matches {host} with path_prefix {:?}, so this one would never be used",
                        route.path_prefix
                    ),
                );
            }
        }
    }

    fn pool(&mut self, name: &str, raw: &FilePool) -> PoolConfig {
        let base = [Seg::Key("pools"), Seg::Key(name)];
        let key = |k: &'static str| path(&base, &[Seg::Key(k)]);
        let balance = match raw.balance.as_deref() {
            None | Some("least_connections") => Balance::LeastConnections,
            Some("round_robin") => Balance::RoundRobin,
            Some(other) => {
                self.push(
                    &key("balance"),
                    format!(
                        "balance must be \"least_connections\" or \"round_robin\", got {other:?}"
                    ),
                );
                Balance::LeastConnections
            }
        };
        let connect_timeout = self.duration(
            &key("connect_timeout"),
            raw.connect_timeout.as_deref(),
            DEFAULT_CONNECT_TIMEOUT,
            Zero::Rejected,
        );
        let response_timeout = self.duration(
            &key("response_timeout"),
            raw.response_timeout.as_deref(),
            DEFAULT_RESPONSE_TIMEOUT,
            Zero::Rejected,
        );
        let idle_timeout =
            self.optional_duration(&key("idle_timeout"), raw.idle_timeout.as_deref());
        let ping_interval =
            self.optional_duration(&key("ping_interval"), raw.ping_interval.as_deref());
        let pong_timeout = self.duration(
            &key("pong_timeout"),
            raw.pong_timeout.as_deref(),
            DEFAULT_PONG_TIMEOUT,
            Zero::Rejected,
        );
        let close_timeout = self.duration(
            &key("close_timeout"),
            raw.close_timeout.as_deref(),
            DEFAULT_CLOSE_TIMEOUT,
            Zero::Rejected,
        );
        let drain_window = self.duration(
            &key("drain_window"),
            raw.drain_window.as_deref(),
            DEFAULT_DRAIN_WINDOW,
            Zero::Allowed,
        );

        if raw.backends.is_empty() {
            self.push(
                &key("backends"),
                format!("pool {name:?} has no backends (add a [[pools.{name}.backends]] entry with id and address)"),
            );
        }
        let mut backends: Vec<BackendConfig> = Vec::new();
        for (i, raw) in raw.backends.iter().enumerate() {
            let at = path(&base, &[Seg::Key("backends"), Seg::Index(i)]);
            if let Some(backend) = self.backend(&at, raw) {
                if backends.iter().any(|b| b.id == backend.id) {
                    self.push(
                        &path(&at, &[Seg::Key("id")]),
                        format!(
                            "duplicate backend id {:?} (ids must be unique within a pool)",
                            backend.id
                        ),
                    );
                } else {
                    backends.push(backend);
                }
            }
        }

        PoolConfig {
            name: name.to_string(),
            balance,
            connect_timeout,
            response_timeout,
            idle_timeout,
            ping_interval,
            pong_timeout,
            close_timeout,
            drain_window,
            allowed_origins: self.origins(name, raw.allowed_origins.as_deref()),
            affinity: self.affinity(name, raw),
            health: self.health(name, raw.health.as_ref()),
            backends,
        }
    }

    fn backend(&mut self, base: &[Seg<'_>], raw: &FileBackend) -> Option<BackendConfig> {
        let id_at = path(base, &[Seg::Key("id")]);
        let address_at = path(base, &[Seg::Key("address")]);
        let weight_at = path(base, &[Seg::Key("weight")]);

        let id = self.required(&id_at, raw.id.as_deref(), "id = \"chat-1\"");
        let id_ok = match id {
            Some("") => {
                self.push(&id_at, "backend id must not be empty");
                false
            }
            Some(id) if !id.bytes().all(is_id_byte) => {
                self.push(
                    &id_at,
                    format!(
                        "invalid backend id {id:?} (use only letters, digits, '.', '_' and '-')"
                    ),
                );
                false
            }
            Some(_) => true,
            None => false,
        };

        let address = self.required(
            &address_at,
            raw.address.as_deref(),
            "address = \"127.0.0.1:9001\"",
        );
        let address_ok = match address {
            Some(address) => match check_backend_address(address) {
                Ok(()) => true,
                Err(message) => {
                    self.push(&address_at, message);
                    false
                }
            },
            None => false,
        };

        let weight = raw.weight.unwrap_or(1);
        let weight = match u32::try_from(weight) {
            Ok(w) if (1..=MAX_WEIGHT).contains(&weight) => Some(w),
            _ => {
                self.push(
                    &weight_at,
                    format!("weight must be between 1 and {MAX_WEIGHT}, got {weight}"),
                );
                None
            }
        };

        if !(id_ok && address_ok) {
            return None;
        }
        let max_connections = match raw.max_connections {
            None => Some(None),
            Some(n) if n >= 1 => Some(u64::try_from(n).ok()),
            Some(n) => {
                self.push(
                    &path(base, &[Seg::Key("max_connections")]),
                    format!("max_connections must be at least 1, got {n} (omit it for no cap)"),
                );
                None
            }
        };

        if !(id_ok && address_ok) {
            return None;
        }
        Some(BackendConfig {
            id: id?.to_string(),
            address: address?.to_string(),
            weight: weight?,
            max_connections: max_connections?,
        })
    }

    /// `allowed_origins`: each `scheme://host[:port]`, no path.
    fn origins(&mut self, pool: &str, raw: Option<&[String]>) -> Vec<String> {
        let mut out = Vec::new();
        for (i, origin) in raw.unwrap_or_default().iter().enumerate() {
            let ok = origin.split_once("://").is_some_and(|(scheme, rest)| {
                matches!(scheme, "http" | "https") && !rest.is_empty() && !rest.contains('/')
            });
            if ok {
                out.push(origin.to_ascii_lowercase());
            } else {
                self.push(
                    &[Seg::Key("pools"), Seg::Key(pool), Seg::Key("allowed_origins"), Seg::Index(i)],
                    format!("invalid origin {origin:?} (expected scheme://host[:port], e.g. \"https://chat.example.com\")"),
                );
            }
        }
        out
    }

    /// `affinity` with its `cookie` / `hash` tables.
    fn affinity(&mut self, name: &str, raw: &FilePool) -> Affinity {
        let base = [Seg::Key("pools"), Seg::Key(name)];
        let key = |k: &'static str| path(&base, &[Seg::Key(k)]);
        let mode = raw.affinity.as_deref().unwrap_or("none");
        if !matches!(mode, "none" | "cookie" | "hash") {
            self.push(
                &key("affinity"),
                format!("affinity must be \"cookie\", \"hash\" or \"none\", got {mode:?}"),
            );
            return Affinity::None;
        }
        if raw.cookie.is_some() && mode != "cookie" {
            self.push(
                &key("cookie"),
                format!("a [pools.{name}.cookie] table is set but affinity is {mode:?} (set affinity = \"cookie\" or remove the table)"),
            );
        }
        if raw.hash.is_some() && mode != "hash" {
            self.push(
                &key("hash"),
                format!("a [pools.{name}.hash] table is set but affinity is {mode:?} (set affinity = \"hash\" or remove the table)"),
            );
        }
        match mode {
            "cookie" => self
                .cookie(name, raw.cookie.as_ref())
                .map_or(Affinity::None, Affinity::Cookie),
            "hash" => self
                .hash(name, raw.hash.as_ref())
                .map_or(Affinity::None, Affinity::Hash),
            _ => Affinity::None,
        }
    }

    fn cookie(&mut self, pool: &str, raw: Option<&FileCookie>) -> Option<CookieConfig> {
        let base = [Seg::Key("pools"), Seg::Key(pool), Seg::Key("cookie")];
        let key = |k: &'static str| path(&base, &[Seg::Key(k)]);
        let Some(raw) = raw else {
            self.push(
                &[Seg::Key("pools"), Seg::Key(pool), Seg::Key("affinity")],
                format!("cookie affinity needs a [pools.{pool}.cookie] table with a secret (secret = \"...\" or secret_file = \"...\")"),
            );
            return None;
        };
        let secret = match (&raw.secret, &raw.secret_file) {
            (Some(_), Some(_)) => {
                self.push(
                    &key("secret_file"),
                    "set either secret or secret_file, not both",
                );
                None
            }
            (None, None) => {
                self.push(
                    &key("secret"),
                    "cookie affinity requires secret (at least 32 bytes) or secret_file",
                );
                None
            }
            (Some(s), None) => Some(s.as_bytes().to_vec()),
            (None, Some(file)) => match std::fs::read(file) {
                Ok(mut bytes) => {
                    while bytes.last().is_some_and(|b| *b == b'\n' || *b == b'\r') {
                        bytes.pop();
                    }
                    Some(bytes)
                }
                Err(e) => {
                    self.push(
                        &key("secret_file"),
                        format!("{}: cannot read secret file: {e}", file.display()),
                    );
                    None
                }
            },
        };
        let secret = match secret {
            Some(s) if s.len() >= 32 => Some(s),
            Some(s) => {
                let at = if raw.secret.is_some() {
                    key("secret")
                } else {
                    key("secret_file")
                };
                self.push(&at, format!("cookie secret is {} bytes; use at least 32 random bytes (e.g. openssl rand -base64 32)", s.len()));
                None
            }
            None => None,
        };
        let name = raw.name.clone().unwrap_or_else(|| format!("berth_{pool}"));
        let name_ok = !name.is_empty()
            && name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b));
        if !name_ok {
            self.push(
                &key("name"),
                format!("invalid cookie name {name:?} (use letters, digits and -_.)"),
            );
        }
        let max_age = self.optional_duration(&key("max_age"), raw.max_age.as_deref());
        let cookie_path = raw.path.clone().unwrap_or_else(|| "/".to_string());
        if !cookie_path.starts_with('/')
            || cookie_path
                .bytes()
                .any(|b| b == b';' || b.is_ascii_control())
        {
            self.push(
                &key("path"),
                format!(
                    "cookie path must start with \"/\" and contain no ';', got {cookie_path:?}"
                ),
            );
        }
        if let Some(d) = &raw.domain {
            if d.is_empty()
                || d.bytes()
                    .any(|b| !(b.is_ascii_alphanumeric() || b == b'.' || b == b'-'))
            {
                self.push(&key("domain"), format!("invalid cookie domain {d:?}"));
            }
        }
        let same_site = match raw.same_site.as_deref() {
            None | Some("Lax") => SameSite::Lax,
            Some("Strict") => SameSite::Strict,
            Some("None") => SameSite::None,
            Some(other) => {
                self.push(
                    &key("same_site"),
                    format!("same_site must be \"Lax\", \"Strict\" or \"None\", got {other:?}"),
                );
                SameSite::Lax
            }
        };
        Some(CookieConfig {
            name,
            secret: secret?,
            max_age,
            path: cookie_path,
            domain: raw.domain.clone(),
            same_site,
        })
    }

    fn hash(&mut self, pool: &str, raw: Option<&FileHash>) -> Option<HashConfig> {
        let base = [Seg::Key("pools"), Seg::Key(pool), Seg::Key("hash")];
        let key = |k: &'static str| path(&base, &[Seg::Key(k)]);
        let Some(raw) = raw else {
            self.push(
                &[Seg::Key("pools"), Seg::Key(pool), Seg::Key("affinity")],
                format!("hash affinity needs a [pools.{pool}.hash] table with key = \"client_ip\" (or header:NAME, cookie:NAME, query:NAME)"),
            );
            return None;
        };
        let hash_key = self.required(&key("key"), raw.key.as_deref(), "key = \"client_ip\"");
        let key_ok = match hash_key {
            Some("client_ip") => true,
            Some(k) => match k.split_once(':') {
                Some(("header", h)) => http::HeaderName::from_bytes(h.as_bytes()).is_ok(),
                Some(("cookie" | "query", n)) => !n.is_empty(),
                _ => false,
            },
            None => false,
        };
        if hash_key.is_some() && !key_ok {
            self.push(
                &key("key"),
                format!("invalid hash key {:?} (use \"client_ip\", \"header:NAME\", \"cookie:NAME\" or \"query:NAME\")", hash_key.unwrap_or_default()),
            );
        }
        let bounded_ok = match raw.bounded_load {
            Some(c) if !(c.is_finite() && c > 1.0) => {
                self.push(
                    &key("bounded_load"),
                    format!("bounded_load must be a number greater than 1.0 (e.g. 1.25), got {c}"),
                );
                false
            }
            _ => true,
        };
        let mut proxies_ok = true;
        for (i, cidr) in raw.trusted_proxies.iter().flatten().enumerate() {
            if !valid_cidr(cidr) {
                proxies_ok = false;
                self.push(
                    &path(&base, &[Seg::Key("trusted_proxies"), Seg::Index(i)]),
                    format!("invalid CIDR {cidr:?} (expected e.g. \"10.0.0.0/8\" or \"::1/128\")"),
                );
            }
        }
        if !(key_ok && bounded_ok && proxies_ok) {
            return None;
        }
        Some(HashConfig {
            key: hash_key?.to_string(),
            bounded_load: raw.bounded_load,
            trusted_proxies: raw.trusted_proxies.clone().unwrap_or_default(),
        })
    }

    fn health(&mut self, pool: &str, raw: Option<&FileHealth>) -> Option<HealthConfig> {
        let raw = raw?;
        let base = [Seg::Key("pools"), Seg::Key(pool), Seg::Key("health")];
        let key = |k: &'static str| path(&base, &[Seg::Key(k)]);
        let check_path = raw.path.clone().unwrap_or_else(|| "/healthz".to_string());
        if !check_path.starts_with('/') {
            self.push(
                &key("path"),
                format!("health check path must start with \"/\", got {check_path:?}"),
            );
        }
        let interval = self.duration(
            &key("interval"),
            raw.interval.as_deref(),
            Duration::from_secs(5),
            Zero::Rejected,
        );
        let timeout = self.duration(
            &key("timeout"),
            raw.timeout.as_deref(),
            Duration::from_secs(2),
            Zero::Rejected,
        );
        let mut count = |k: &'static str, v: Option<i64>, default: u32| -> u32 {
            match v {
                None => default,
                Some(n) if (1..=100).contains(&n) => n as u32,
                Some(n) => {
                    self.push(&key(k), format!("{k} must be between 1 and 100, got {n}"));
                    default
                }
            }
        };
        let rise = count("rise", raw.rise, 2);
        let fall = count("fall", raw.fall, 3);
        Some(HealthConfig {
            path: check_path,
            interval,
            timeout,
            rise,
            fall,
        })
    }
}

/// `a.b.c.d/n` or `v6/n`; a bare address counts as a single host.
fn valid_cidr(text: &str) -> bool {
    let (ip, len) = match text.split_once('/') {
        Some((ip, len)) => (ip, Some(len)),
        None => (text, None),
    };
    let Ok(ip) = ip.parse::<IpAddr>() else {
        return false;
    };
    let max = if ip.is_ipv4() { 32 } else { 128 };
    len.is_none_or(|l| l.parse::<u8>().is_ok_and(|n| n <= max))
}

/// Whether two listen addresses would fight over the same socket. Port 0
/// asks the OS for a fresh port, so it never collides; an unspecified IP
/// (`0.0.0.0`, `::`) overlaps every address of its family.
fn binds_collide(a: SocketAddr, b: SocketAddr) -> bool {
    if a.port() == 0 || a.port() != b.port() {
        return false;
    }
    a.ip() == b.ip()
        || (a.is_ipv4() == b.is_ipv4() && (a.ip().is_unspecified() || b.ip().is_unspecified()))
}

fn is_id_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-')
}

fn is_hostname(host: &str) -> bool {
    !host.is_empty() && host.bytes().all(is_id_byte)
}

/// A route's host, lower-cased and without a port; `None` when malformed.
/// Accepts `name`, `name:port`, `[v6]` and `[v6]:port`.
fn normalize_host(raw: &str) -> Option<String> {
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

/// `host:port` with a hostname, IPv4 address or bracketed IPv6 address and a
/// port in 1..=65535.
fn check_backend_address(raw: &str) -> Result<(), String> {
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

/// Most specific first: host routes before host-less ones, then longer path
/// prefixes; file order otherwise (the sort is stable).
fn sort_routes(routes: &mut [RouteConfig]) {
    routes.sort_by_key(|r| (r.host.is_none(), Reverse(r.path_prefix.len())));
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;
    use crate::config::ConfigError;

    /// A small valid config; tests append to it or replace parts of it.
    const BASE: &str = r#"[[listeners]]
name = "public"
bind = "127.0.0.1:8080"

[[routes]]
pool = "chat"

[pools.chat]

[[pools.chat.backends]]
id = "chat-1"
address = "127.0.0.1:9001"
"#;

    fn load(text: &str) -> Config {
        match Config::from_toml_str(text, "berth.toml") {
            Ok(config) => config,
            Err(err) => panic!("config should be valid, got:\n{err}"),
        }
    }

    /// The rendered error for an invalid config.
    fn errors(text: &str) -> String {
        match Config::from_toml_str(text, "berth.toml") {
            Ok(_) => panic!("config should be invalid:\n{text}"),
            Err(err) => err.to_string(),
        }
    }

    fn problems(text: &str) -> Vec<Problem> {
        match Config::from_toml_str(text, "berth.toml") {
            Err(ConfigError::Invalid { problems, .. }) => problems,
            Err(other) => panic!("unexpected error {other}"),
            Ok(_) => panic!("config should be invalid:\n{text}"),
        }
    }

    #[test]
    fn example_config_validates() {
        let config = load(include_str!("../../config/berth.toml"));
        assert_eq!(config.shutdown_window, Duration::from_secs(10));
        assert_eq!(config.listeners.len(), 2);
        assert_eq!(config.listeners[0].name, "public");
        assert_eq!(config.listeners[0].bind, "127.0.0.1:8080".parse().unwrap());
        assert!(config.listeners[0].tls.is_none());
        let tls = config.listeners[1]
            .tls
            .as_ref()
            .expect("public-tls has TLS");
        assert_eq!(tls.cert, Path::new("certs/example.crt"));
        assert_eq!(tls.key, Path::new("certs/example.key"));
        assert_eq!(tls.server_config.alpn_protocols, vec![b"http/1.1".to_vec()]);
        let admin = config.admin.as_ref().expect("admin table");
        assert_eq!(admin.bind, "127.0.0.1:9900".parse().unwrap());
        assert_eq!(admin.token.as_deref(), Some("change-me"));
        assert_eq!(config.routes[0].host.as_deref(), Some("chat.example.com"));
        assert_eq!(config.routes[1].host, None);
        let chat = config.pool("chat").expect("pool chat");
        assert_eq!(chat.balance, Balance::LeastConnections);
        assert_eq!(chat.idle_timeout, Some(Duration::from_secs(60)));
        assert_eq!(chat.ping_interval, Some(Duration::from_secs(25)));
        let ids: Vec<&str> = chat.backends.iter().map(|b| b.id.as_str()).collect();
        assert_eq!(ids, ["chat-1", "chat-2", "chat-3"]);
        assert_eq!(chat.backends[2].address, "127.0.0.1:9003");
    }

    #[test]
    fn defaults_apply_to_a_minimal_config() {
        let config = load(BASE);
        assert_eq!(config.shutdown_window, Duration::from_secs(10));
        assert_eq!(
            config.listeners[0].handshake_timeout,
            Duration::from_secs(10)
        );
        assert!(config.admin.is_none());
        assert_eq!(
            config.routes,
            vec![RouteConfig {
                host: None,
                path_prefix: "/".into(),
                pool: "chat".into()
            }]
        );
        let chat = config.pool("chat").expect("pool chat");
        assert_eq!(
            *chat,
            PoolConfig {
                name: "chat".into(),
                balance: Balance::LeastConnections,
                connect_timeout: Duration::from_secs(3),
                response_timeout: Duration::from_secs(30),
                idle_timeout: None,
                ping_interval: None,
                pong_timeout: Duration::from_secs(10),
                close_timeout: Duration::from_secs(5),
                drain_window: Duration::from_secs(30),
                allowed_origins: Vec::new(),
                affinity: Affinity::None,
                health: None,
                backends: vec![BackendConfig {
                    id: "chat-1".into(),
                    address: "127.0.0.1:9001".into(),
                    weight: 1,
                    max_connections: None,
                }],
            }
        );
    }

    #[test]
    fn values_are_parsed_and_normalized() {
        let text = BASE.replace("[pools.chat]", "[pools.chat]\nbalance = \"round_robin\"\nidle_timeout = \"0s\"\nping_interval = \"1m 30s\"\ndrain_window = \"0s\"")
            .replace("pool = \"chat\"", "host = \"Chat.Example.COM:8443\"\npool = \"chat\"")
            .replace("bind = \"127.0.0.1:8080\"", "bind = \"localhost:0\"")
            + "\n[[pools.chat.backends]]\nid = \"v6.backend_2\"\naddress = \"[::1]:9002\"\nweight = 1000\n\n[[pools.chat.backends]]\nid = \"named\"\naddress = \"chat-3.internal:65535\"\n";
        let config = load(&text);
        assert_eq!(config.listeners[0].bind, "127.0.0.1:0".parse().unwrap());
        assert_eq!(config.routes[0].host.as_deref(), Some("chat.example.com"));
        let chat = config.pool("chat").expect("pool chat");
        assert_eq!(chat.balance, Balance::RoundRobin);
        assert_eq!(chat.idle_timeout, None);
        assert_eq!(chat.ping_interval, Some(Duration::from_secs(90)));
        assert_eq!(chat.drain_window, Duration::ZERO);
        assert_eq!(chat.backends[1].weight, 1000);
        assert_eq!(chat.backends[2].address, "chat-3.internal:65535");
    }

    #[test]
    fn normalize_host_strips_ports_and_lowercases() {
        assert_eq!(
            normalize_host("Chat.Example.com").as_deref(),
            Some("chat.example.com")
        );
        assert_eq!(normalize_host("a.example:80").as_deref(), Some("a.example"));
        assert_eq!(normalize_host("[::1]:8443").as_deref(), Some("[::1]"));
        assert_eq!(normalize_host("[::1]").as_deref(), Some("[::1]"));
        assert_eq!(normalize_host("a.example:http"), None);
        assert_eq!(normalize_host("a b"), None);
        assert_eq!(normalize_host(""), None);
        assert_eq!(normalize_host("::1"), None);
    }

    #[test]
    fn unknown_top_level_key() {
        let text = format!("listen = []\n{BASE}");
        assert_eq!(
            errors(&text),
            "berth.toml:1: listen: unknown field `listen`, expected one of \
             `shutdown_window`, `listeners`, `admin`, `routes`, `pools`"
        );
    }

    #[test]
    fn unknown_nested_keys() {
        let text = BASE.replace("bind = ", "bnd = ");
        assert_eq!(
            errors(&text),
            "berth.toml:3: listeners[0].bnd: unknown field `bnd`, expected one of \
             `name`, `bind`, `tls`, `handshake_timeout`"
        );
        let text = BASE.replace("address = ", "weight = 2\nadress = ");
        assert_eq!(
            errors(&text),
            "berth.toml:13: pools.chat.backends[0].adress: unknown field `adress`, \
             expected one of `id`, `address`, `weight`, `max_connections`"
        );
        let text = BASE.replace(
            "bind = \"127.0.0.1:8080\"",
            "bind = \"127.0.0.1:8080\"\ntls = { cert = \"a.crt\", kye = \"a.key\" }",
        );
        assert_eq!(
            errors(&text),
            "berth.toml:4: listeners[0].tls.kye: unknown field `kye`, expected `cert` or `key`"
        );
    }

    #[test]
    fn wrong_type_and_syntax_errors() {
        let text = BASE.replace(
            "address = \"127.0.0.1:9001\"",
            "address = \"127.0.0.1:9001\"\nweight = \"heavy\"",
        );
        assert_eq!(
            errors(&text),
            "berth.toml:13: pools.chat.backends[0].weight: invalid type: string \"heavy\", expected i64"
        );
        // Syntax errors cannot be mapped to a key: line and message only.
        let text = BASE.replace("name = \"public\"", "name = \"public");
        assert_eq!(errors(&text), "berth.toml:2: invalid basic string");
        let text = BASE.replace("name = \"public\"", "name = \"public\"\nname = \"again\"");
        assert_eq!(
            errors(&text),
            "berth.toml:3: duplicate key `name` in table `listeners`"
        );
        // A multi-line parser message is folded onto the problem's line.
        let text = format!("listeners = 3\n{BASE}");
        assert_eq!(
            errors(&text),
            "berth.toml:2: invalid table header; duplicate key `listeners` in document root"
        );
    }

    #[test]
    fn bad_socket_addresses() {
        let text = BASE.replace("\"127.0.0.1:8080\"", "\"10.0.0.1\"");
        assert_eq!(
            errors(&text),
            "berth.toml:3: listeners[0].bind: invalid socket address \"10.0.0.1\" \
             (expected IP:port, e.g. \"0.0.0.0:8443\", or localhost:PORT)"
        );
        let text =
            format!("{BASE}\n[[pools.chat.backends]]\nid = \"chat-2\"\naddress = \"10.0.0.1\"\n");
        assert_eq!(
            errors(&text),
            "berth.toml:16: pools.chat.backends[1].address: invalid socket address \"10.0.0.1\" \
             (expected host:port)"
        );
        for (address, message) in [
            ("::1:9001", "invalid socket address \"::1:9001\" (write IPv6 addresses in brackets, e.g. \"[::1]:9001\")"),
            ("[::1]", "invalid socket address \"[::1]\" (expected host:port)"),
            (":9001", "invalid socket address \":9001\" (expected host:port)"),
            ("bad host:9001", "invalid socket address \"bad host:9001\" (expected host:port)"),
            ("10.0.0.1:0", "invalid port in \"10.0.0.1:0\" (expected host:port with a port from 1 to 65535)"),
            ("10.0.0.1:65536", "invalid port in \"10.0.0.1:65536\" (expected host:port with a port from 1 to 65535)"),
        ] {
            assert_eq!(check_backend_address(address), Err(message.to_string()));
        }
    }

    #[test]
    fn bad_durations() {
        let text = BASE.replace("[pools.chat]", "[pools.chat]\nidle_timeout = \"5 parsecs\"");
        assert_eq!(
            errors(&text),
            "berth.toml:9: pools.chat.idle_timeout: invalid duration \"5 parsecs\" \
             (use e.g. \"250ms\", \"30s\", \"5m\")"
        );
        let text = BASE.replace("[pools.chat]", "[pools.chat]\nconnect_timeout = \"0s\"");
        assert_eq!(
            errors(&text),
            "berth.toml:9: pools.chat.connect_timeout: duration must be greater than zero, got \"0s\""
        );
        let text = format!("shutdown_window = \"soon\"\n{BASE}");
        assert_eq!(
            errors(&text),
            "berth.toml:1: shutdown_window: invalid duration \"soon\" (use e.g. \"250ms\", \"30s\", \"5m\")"
        );
    }

    #[test]
    fn unknown_pool() {
        let text = BASE.replace("pool = \"chat\"", "pool = \"chats\"");
        assert_eq!(
            errors(&text),
            "berth.toml:6: routes[0].pool: unknown pool \"chats\" (defined pools: chat)"
        );
    }

    #[test]
    fn duplicate_backend_id() {
        let text = format!(
            "{BASE}\n[[pools.chat.backends]]\nid = \"chat-1\"\naddress = \"127.0.0.1:9002\"\n"
        );
        assert_eq!(
            errors(&text),
            "berth.toml:15: pools.chat.backends[1].id: duplicate backend id \"chat-1\" \
             (ids must be unique within a pool)"
        );
    }

    #[test]
    fn missing_required_keys_point_at_their_table() {
        let text = BASE.replace("bind = \"127.0.0.1:8080\"\n", "");
        assert_eq!(
            errors(&text),
            "berth.toml:1: listeners[0].bind: required key is missing (add e.g. bind = \"0.0.0.0:8443\")"
        );
        let text = BASE.replace("address = \"127.0.0.1:9001\"\n", "");
        assert_eq!(
            errors(&text),
            "berth.toml:10: pools.chat.backends[0].address: required key is missing \
             (add e.g. address = \"127.0.0.1:9001\")"
        );
        let text = format!("{BASE}\n[admin]\ntoken = \"t\"\n");
        assert_eq!(
            errors(&text),
            "berth.toml:14: admin.bind: required key is missing (add e.g. bind = \"127.0.0.1:9900\")"
        );
    }

    #[test]
    fn non_loopback_admin_requires_a_token() {
        let text = format!("{BASE}\n[admin]\nbind = \"0.0.0.0:9900\"\n");
        assert_eq!(
            errors(&text),
            "berth.toml:14: admin.token: admin API on a non-loopback address requires [admin] token \
             (bind is 0.0.0.0:9900; set token = \"...\" or bind to 127.0.0.1)"
        );
        load(&format!(
            "{BASE}\n[admin]\nbind = \"0.0.0.0:9900\"\ntoken = \"s3cret\"\n"
        ));
        load(&format!("{BASE}\n[admin]\nbind = \"[::1]:9900\"\n"));
        load(&format!("admin = {{ bind = \"localhost:9900\" }}\n{BASE}"));
    }

    #[test]
    fn bind_collisions() {
        let text = format!(
            "{BASE}\n[[listeners]]\nname = \"public\"\nbind = \"0.0.0.0:8080\"\n\n[admin]\nbind = \"127.0.0.1:8080\"\n"
        );
        assert_eq!(
            errors(&text),
            "berth.toml:15: listeners[1].name: duplicate listener name \"public\" (names must be unique)\n\
             berth.toml:16: listeners[1].bind: bind address 0.0.0.0:8080 is already used by listeners[0] \
             (\"public\"); each listener needs its own address\n\
             berth.toml:19: admin.bind: admin bind 127.0.0.1:8080 collides with listener \"public\" \
             (give the admin API its own address)"
        );
        // Port 0 asks for any free port, so it never collides.
        let text = BASE.replace("127.0.0.1:8080", "127.0.0.1:0")
            + "\n[[listeners]]\nname = \"second\"\nbind = \"127.0.0.1:0\"\n\n[admin]\nbind = \"127.0.0.1:0\"\n";
        load(&text);
    }

    #[test]
    fn structural_rules() {
        assert_eq!(
            errors("[pools.chat]\n"),
            "berth.toml: listeners: no listeners defined (add a [[listeners]] table with name and bind)\n\
             berth.toml: routes: no routes defined (add a [[routes]] table with a pool)\n\
             berth.toml:1: pools.chat.backends: pool \"chat\" has no backends \
             (add a [[pools.chat.backends]] entry with id and address)"
        );
        let text = BASE
            .replace("[pools.chat]", "[pools.chat]\nbalance = \"random\"")
            .replace("id = \"chat-1\"", "id = \"chat 1\"\nweight = 0");
        assert_eq!(
            errors(&text),
            "berth.toml:9: pools.chat.balance: balance must be \"least_connections\" or \"round_robin\", got \"random\"\n\
             berth.toml:12: pools.chat.backends[0].id: invalid backend id \"chat 1\" (use only letters, digits, '.', '_' and '-')\n\
             berth.toml:13: pools.chat.backends[0].weight: weight must be between 1 and 1000, got 0"
        );
        let text = format!("{BASE}\n[[routes]]\npath_prefix = \"api\"\npool = \"chat\"\n\n[[routes]]\npool = \"chat\"\n");
        assert_eq!(
            errors(&text),
            "berth.toml:15: routes[1].path_prefix: path_prefix must start with \"/\", got \"api\"\n\
             berth.toml:18: routes[2]: duplicate route: routes[0] already matches any host with \
             path_prefix \"/\", so this one would never be used"
        );
        // An unreferenced pool is fine.
        load(&format!(
            "{BASE}\n[[pools.spare.backends]]\nid = \"s\"\naddress = \"spare:1\"\n"
        ));
    }

    #[test]
    fn several_problems_are_reported_in_line_order() {
        let text = r#"shutdown_window = "forever"

[[routes]]
pool = "nope"

[[listeners]]
name = "public"
bind = "localhost"
handshake_timeout = "0s"

[pools.chat]
pong_timeout = "10 s"

[[pools.chat.backends]]
address = "127.0.0.1:9001"
"#;
        let found = problems(text);
        let lines: Vec<Option<usize>> = found.iter().map(|p| p.line).collect();
        assert_eq!(
            lines,
            [Some(1), Some(4), Some(8), Some(9), Some(14)],
            "{}",
            errors(text)
        );
        let keys: Vec<&str> = found.iter().map(|p| p.key.as_str()).collect();
        assert_eq!(
            keys,
            [
                "shutdown_window",
                "routes[0].pool",
                "listeners[0].bind",
                "listeners[0].handshake_timeout",
                "pools.chat.backends[0].id",
            ]
        );
        assert_eq!(
            errors(text).lines().nth(1),
            Some("berth.toml:4: routes[0].pool: unknown pool \"nope\" (defined pools: chat)")
        );
    }

    #[test]
    fn routes_are_sorted_most_specific_first() {
        let text = r#"[[listeners]]
name = "public"
bind = "127.0.0.1:8080"

[[routes]]
pool = "p"

[[routes]]
path_prefix = "/api/v1"
pool = "p"

[[routes]]
host = "b.example"
pool = "p"

[[routes]]
path_prefix = "/api"
pool = "p"

[[routes]]
host = "a.example"
path_prefix = "/ws"
pool = "p"

[[routes]]
host = "c.example"
pool = "p"

[[pools.p.backends]]
id = "p1"
address = "127.0.0.1:9001"
"#;
        let config = load(text);
        let order: Vec<(Option<&str>, &str)> = config
            .routes
            .iter()
            .map(|r| (r.host.as_deref(), r.path_prefix.as_str()))
            .collect();
        assert_eq!(
            order,
            [
                (Some("a.example"), "/ws"),
                (Some("b.example"), "/"),
                (Some("c.example"), "/"),
                (None, "/api/v1"),
                (None, "/api"),
                (None, "/"),
            ]
        );
    }

    /// Writes a fresh self-signed cert and key into `dir`, named `name.crt`
    /// and `name.key`.
    fn write_cert(dir: &Path, name: &str) -> (PathBuf, PathBuf) {
        let certified =
            rcgen::generate_simple_self_signed(vec!["localhost".into()]).expect("rcgen");
        let cert = dir.join(format!("{name}.crt"));
        let key = dir.join(format!("{name}.key"));
        std::fs::write(&cert, certified.cert.pem()).expect("write cert");
        std::fs::write(&key, certified.key_pair.serialize_pem()).expect("write key");
        (cert, key)
    }

    fn with_tls(cert: &Path, key: &Path) -> String {
        BASE.replace(
            "bind = \"127.0.0.1:8080\"",
            &format!(
                "bind = \"127.0.0.1:8080\"\ntls = {{ cert = {:?}, key = {:?} }}",
                cert.display().to_string(),
                key.display().to_string()
            ),
        )
    }

    #[test]
    fn tls_files_are_loaded_and_checked() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (cert, key) = write_cert(dir.path(), "good");
        let config = load(&with_tls(&cert, &key));
        let tls = config.listeners[0].tls.as_ref().expect("tls");
        assert_eq!(tls.cert, cert);

        let missing = dir.path().join("missing.crt");
        let rendered = errors(&with_tls(&missing, &key));
        let prefix = format!(
            "berth.toml:4: listeners[0].tls.cert: {}: cannot read certificate file: ",
            missing.display()
        );
        assert!(rendered.starts_with(&prefix), "{rendered}");
        assert_eq!(rendered.lines().count(), 1);

        let (_, other_key) = write_cert(dir.path(), "other");
        let rendered = errors(&with_tls(&cert, &other_key));
        let prefix = format!(
            "berth.toml:4: listeners[0].tls.key: {}: private key does not match the certificate in {}: ",
            other_key.display(),
            cert.display()
        );
        assert!(rendered.starts_with(&prefix), "{rendered}");

        let text = BASE.replace(
            "bind = \"127.0.0.1:8080\"",
            "bind = \"127.0.0.1:8080\"\ntls = { key = \"x.key\" }",
        );
        assert_eq!(
            errors(&text),
            "berth.toml:4: listeners[0].tls.cert: required key is missing \
             (add e.g. cert = \"certs/example.crt\")"
        );
    }
}
