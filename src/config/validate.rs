//! Validation: turns config text into a [`Config`] or the full list of
//! [`Problem`]s with it.
//!
//! This module owns the cross-key rules of a valid config (required keys,
//! uniqueness, references between tables, which tables go with which
//! `affinity`) and applies the per-value rules of `rules.rs`. The text is
//! parsed as TOML (a syntax error is reported alone, since nothing after it
//! can be trusted), read into [`FileConfig`] by `file.rs` (unknown keys and
//! wrong types reported), then checked here; every problem goes into one
//! [`Report`], so one run shows them all. A bad value points at its own
//! line, a missing key at its enclosing table.

use std::cmp::Reverse;
use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use super::file::{
    FileAdmin, FileBackend, FileConfig, FileCookie, FileHash, FileHealth, FilePool, FileRoute,
    FileSize,
};
use super::locate::{line_at, path_at, Seg};
use super::read;
use super::report::Report;
use super::rules::{self, DurationKey, IntKey, SizeKey};
use super::{
    AdminConfig, Affinity, BackendConfig, Balance, Config, CookieConfig, HashConfig, HealthConfig,
    ListenerConfig, PoolConfig, Problem, RouteConfig, SameSite,
};

mod auth;
mod fleet;
mod limits;
mod listener;

use listener::binds_collide;

/// Parses and validates config text; relative paths in it are resolved
/// against `base` (the config file's directory), or the working directory
/// without one.
pub(super) fn parse_and_validate(text: &str, base: Option<&Path>) -> Result<Config, Vec<Problem>> {
    let doc: toml::Table = match toml::from_str(text) {
        Ok(doc) => doc,
        Err(err) => return Err(vec![toml_problem(text, &err)]),
    };
    let mut report = Report::new(text);
    let file = super::file::read(&doc, &mut report);
    let config = Checker {
        report: &mut report,
        base,
    }
    .config(&file);
    report.finish().map(|()| config)
}

/// The one problem for a TOML syntax error.
fn toml_problem(text: &str, err: &toml::de::Error) -> Problem {
    let (line, key) = match err.span() {
        Some(span) => (Some(line_at(text, span.start)), path_at(text, span)),
        None => (None, String::new()),
    };
    // Parser messages can span lines; a problem renders on one.
    let mut message = err
        .message()
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect::<Vec<_>>()
        .join("; ");
    if message.is_empty() {
        // Some parser errors carry no message (a carriage return without a
        // newline): name the character where parsing stopped.
        let at = err.span().and_then(|s| text.get(s.start..)?.chars().next());
        message = match at {
            Some(c) => format!("unexpected character {c:?}"),
            None => "invalid TOML".to_string(),
        };
    }
    Problem { line, key, message }
}

fn path<'a>(base: &[Seg<'a>], rest: &[Seg<'a>]) -> Vec<Seg<'a>> {
    let mut out = Vec::with_capacity(base.len() + rest.len());
    out.extend_from_slice(base);
    out.extend_from_slice(rest);
    out
}

struct Checker<'r, 't> {
    report: &'r mut Report<'t>,
    base: Option<&'r Path>,
}

impl Checker<'_, '_> {
    /// The contents of the file that key `at` names (resolved against the
    /// config's directory), or a problem at `at`.
    fn file(
        &mut self,
        at: &[Seg<'_>],
        name: &str,
        what: &'static str,
        limit: u64,
    ) -> Option<Vec<u8>> {
        let resolved = read::resolve(self.base, name);
        let result = read::regular_file(&resolved, what, limit).map_err(|e| e.to_string());
        self.check(at, result)
    }

    fn push(&mut self, at: &[Seg<'_>], message: impl Into<String>) {
        self.report.push(at, message);
    }

    fn check<T>(&mut self, at: &[Seg<'_>], result: Result<T, String>) -> Option<T> {
        self.report.check(at, result)
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

    /// A duration key with a default; a bad value yields a problem and the
    /// default.
    fn duration(&mut self, at: &[Seg<'_>], raw: Option<&str>, key: DurationKey) -> Duration {
        let default = key.default.unwrap_or(Duration::ZERO);
        match raw {
            None => default,
            Some(raw) => self
                .check(at, rules::duration(raw, &key))
                .flatten()
                .unwrap_or(default),
        }
    }

    /// An optional duration key, where absent or `"0s"` means off.
    fn optional_duration(
        &mut self,
        at: &[Seg<'_>],
        raw: Option<&str>,
        key: DurationKey,
    ) -> Option<Duration> {
        self.check(at, rules::duration(raw?, &key)).flatten()
    }

    /// An integer key with a default; a bad value yields a problem and `None`.
    fn int(&mut self, at: &[Seg<'_>], raw: Option<i64>, default: i64, key: IntKey) -> Option<i64> {
        self.check(at, rules::int(raw.unwrap_or(default), &key))
    }

    /// An optional cap (absent: no cap); a bad value yields a problem and
    /// `None`.
    fn cap(&mut self, at: &[Seg<'_>], raw: Option<i64>, key: IntKey) -> Option<Option<u64>> {
        match raw {
            None => Some(None),
            Some(n) => self
                .check(
                    at,
                    rules::int(n, &key)
                        .map_err(|message| format!("{message} (omit it for no cap)")),
                )
                .map(|n| Some(n.unsigned_abs())),
        }
    }

    /// A size key with a default; a bad value yields a problem and the
    /// default.
    fn size(&mut self, at: &[Seg<'_>], raw: Option<&FileSize>, key: SizeKey) -> u64 {
        let default = key.default.unwrap_or(0);
        raw.and_then(|raw| self.check(at, rules::size(raw, &key)))
            .unwrap_or(default)
    }

    fn config(&mut self, file: &FileConfig) -> Config {
        let shutdown_window = self.duration(
            &[Seg::Key("shutdown_window")],
            file.shutdown_window.as_deref(),
            rules::SHUTDOWN_WINDOW,
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

    fn admin(
        &mut self,
        raw: &FileAdmin,
        listeners: &[(usize, ListenerConfig)],
    ) -> Option<AdminConfig> {
        let bind_at = [Seg::Key("admin"), Seg::Key("bind")];
        let token_at = [Seg::Key("admin"), Seg::Key("token")];
        let bind = self
            .required(&bind_at, raw.bind.as_deref(), "bind = \"127.0.0.1:9900\"")
            .and_then(|b| self.check(&bind_at, rules::bind_address(b)));
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
            Some(h) => self
                .check(&path(&base, &[Seg::Key("host")]), rules::route_host(h))
                .map(Some),
            None => Some(None),
        };
        let path_prefix = raw.path_prefix.clone().unwrap_or_else(|| "/".to_string());
        let prefix_ok = self
            .check(
                &path(&base, &[Seg::Key("path_prefix")]),
                rules::url_path(&path_prefix, "path_prefix"),
            )
            .is_some();
        let pool_at = path(&base, &[Seg::Key("pool")]);
        let pool = self.required(&pool_at, raw.pool.as_deref(), "pool = \"chat\"");
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
                self.push(&pool_at, message);
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
            None => Balance::LeastConnections,
            Some(b) => self
                .check(&key("balance"), rules::balance(b))
                .unwrap_or(Balance::LeastConnections),
        };
        let connect_timeout = self.duration(
            &key("connect_timeout"),
            raw.connect_timeout.as_deref(),
            rules::CONNECT_TIMEOUT,
        );
        let response_timeout = self.duration(
            &key("response_timeout"),
            raw.response_timeout.as_deref(),
            rules::RESPONSE_TIMEOUT,
        );
        let idle_timeout = self.optional_duration(
            &key("idle_timeout"),
            raw.idle_timeout.as_deref(),
            rules::IDLE_TIMEOUT,
        );
        let ping_interval = self.optional_duration(
            &key("ping_interval"),
            raw.ping_interval.as_deref(),
            rules::PING_INTERVAL,
        );
        let pong_timeout = self.duration(
            &key("pong_timeout"),
            raw.pong_timeout.as_deref(),
            rules::PONG_TIMEOUT,
        );
        let close_timeout = self.duration(
            &key("close_timeout"),
            raw.close_timeout.as_deref(),
            rules::CLOSE_TIMEOUT,
        );
        let drain_window = self.duration(
            &key("drain_window"),
            raw.drain_window.as_deref(),
            rules::DRAIN_WINDOW,
        );

        let mut backends: Vec<(usize, BackendConfig)> = Vec::new();
        for (i, raw) in raw.backends.iter().enumerate() {
            let at = path(&base, &[Seg::Key("backends"), Seg::Index(i)]);
            if let Some(backend) = self.backend(&at, raw) {
                if backends.iter().any(|(_, b)| b.id == backend.id) {
                    self.push(
                        &path(&at, &[Seg::Key("id")]),
                        format!(
                            "duplicate backend id {:?} (ids must be unique within a pool)",
                            backend.id
                        ),
                    );
                } else {
                    backends.push((i, backend));
                }
            }
        }
        self.check_members(name, raw, &backends);
        let fleet = self.fleet(name, raw);

        let affinity = self.affinity(name, raw);
        let auth = self.auth(name, raw.auth.as_ref());
        self.check_claim_affinity(name, &affinity, &auth);
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
            affinity,
            limits: self.pool_limits(name, raw),
            health: self.health(name, raw.health.as_ref()),
            backends: backends.into_iter().map(|(_, b)| b).collect(),
            auth,
            slow_start: fleet.slow_start,
            max_connection_age: fleet.max_connection_age,
            rebalance: fleet.rebalance,
            dns: fleet.dns,
            send_proxy_protocol: fleet.send_proxy_protocol,
        }
    }

    /// Every key of a backend is checked, whatever the others look like.
    fn backend(&mut self, base: &[Seg<'_>], raw: &FileBackend) -> Option<BackendConfig> {
        let id_at = path(base, &[Seg::Key("id")]);
        let address_at = path(base, &[Seg::Key("address")]);
        let id = self
            .required(&id_at, raw.id.as_deref(), "id = \"chat-1\"")
            .and_then(|id| self.check(&id_at, rules::backend_id(id)).map(|()| id));
        let address = self
            .required(
                &address_at,
                raw.address.as_deref(),
                "address = \"127.0.0.1:9001\"",
            )
            .and_then(|a| {
                self.check(&address_at, rules::backend_address(a))
                    .map(|()| a)
            });
        let weight = self.int(
            &path(base, &[Seg::Key("weight")]),
            raw.weight,
            1,
            rules::WEIGHT,
        );
        let max_connections = self.cap(
            &path(base, &[Seg::Key("max_connections")]),
            raw.max_connections,
            rules::MAX_CONNECTIONS,
        );
        Some(BackendConfig {
            id: id?.to_string(),
            address: address?.to_string(),
            weight: u32::try_from(weight?).ok()?,
            max_connections: max_connections?,
            drain: raw.drain.unwrap_or(false),
        })
    }

    /// `allowed_origins`: each `scheme://host[:port]`, no path.
    fn origins(&mut self, pool: &str, raw: Option<&[String]>) -> Vec<String> {
        let mut out = Vec::new();
        for (i, origin) in raw.unwrap_or_default().iter().enumerate() {
            let at = [
                Seg::Key("pools"),
                Seg::Key(pool),
                Seg::Key("allowed_origins"),
                Seg::Index(i),
            ];
            out.extend(self.check(&at, rules::origin(origin)));
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
            (Some(s), None) => {
                self.check(&key("secret"), rules::cookie_secret(s.as_bytes().to_vec()))
            }
            (None, Some(file)) => {
                let at = key("secret_file");
                self.file(&at, file, "secret file", read::SECRET_LIMIT)
                    .and_then(|mut bytes| {
                        while bytes.last().is_some_and(|b| *b == b'\n' || *b == b'\r') {
                            bytes.pop();
                        }
                        self.check(&at, rules::cookie_secret(bytes))
                    })
            }
        };
        let name = raw.name.clone().unwrap_or_else(|| format!("berth_{pool}"));
        self.check(&key("name"), rules::cookie_name(&name));
        let max_age = self.optional_duration(
            &key("max_age"),
            raw.max_age.as_deref(),
            rules::COOKIE_MAX_AGE,
        );
        let cookie_path = raw.path.clone().unwrap_or_else(|| "/".to_string());
        self.check(&key("path"), rules::cookie_path(&cookie_path));
        if let Some(d) = &raw.domain {
            self.check(&key("domain"), rules::cookie_domain(d));
        }
        let same_site = match raw.same_site.as_deref() {
            None => SameSite::Lax,
            Some(s) => self
                .check(&key("same_site"), rules::same_site(s))
                .unwrap_or(SameSite::Lax),
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
        let hash_key = self
            .required(&key("key"), raw.key.as_deref(), "key = \"client_ip\"")
            .and_then(|k| self.check(&key("key"), rules::hash_key(k)));
        let bounded_load = match raw.bounded_load {
            None => Some(None),
            Some(c) => self
                .check(&key("bounded_load"), rules::bounded_load(c))
                .map(Some),
        };
        let mut trusted_proxies = Some(Vec::new());
        for (i, cidr) in raw.trusted_proxies.iter().flatten().enumerate() {
            let at = path(&base, &[Seg::Key("trusted_proxies"), Seg::Index(i)]);
            match (self.check(&at, rules::cidr(cidr)), trusted_proxies.as_mut()) {
                (Some(net), Some(nets)) => nets.push(net),
                _ => trusted_proxies = None,
            }
        }
        Some(HashConfig {
            key: hash_key?,
            bounded_load: bounded_load?,
            trusted_proxies: trusted_proxies?,
        })
    }

    fn health(&mut self, pool: &str, raw: Option<&FileHealth>) -> Option<HealthConfig> {
        let raw = raw?;
        let base = [Seg::Key("pools"), Seg::Key(pool), Seg::Key("health")];
        let key = |k: &'static str| path(&base, &[Seg::Key(k)]);
        let check_path = raw.path.clone().unwrap_or_else(|| "/healthz".to_string());
        self.check(
            &key("path"),
            rules::url_path(&check_path, "health check path"),
        );
        let interval = self.duration(
            &key("interval"),
            raw.interval.as_deref(),
            rules::HEALTH_INTERVAL,
        );
        let timeout = self.duration(
            &key("timeout"),
            raw.timeout.as_deref(),
            rules::HEALTH_TIMEOUT,
        );
        // A bad count is a problem (so the config is rejected) and leaves
        // the default in its place.
        let mut count = |k: &'static str, raw: Option<i64>, default: u32, rule: IntKey| {
            self.int(&key(k), raw, i64::from(default), rule)
                .and_then(|n| u32::try_from(n).ok())
                .unwrap_or(default)
        };
        let rise = count("rise", raw.rise, 2, rules::RISE);
        let fall = count("fall", raw.fall, 3, rules::FALL);
        Some(HealthConfig {
            path: check_path,
            interval,
            timeout,
            rise,
            fall,
        })
    }
}

/// Most specific first: host routes before host-less ones, then longer path
/// prefixes; file order otherwise (the sort is stable).
fn sort_routes(routes: &mut [RouteConfig]) {
    routes.sort_by_key(|r| (r.host.is_none(), Reverse(r.path_prefix.len())));
}
