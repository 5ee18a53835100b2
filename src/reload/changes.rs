//! What a reload changes, in plain words: a pure comparison of the config
//! in force with the new one, for the reload's log line, its JSON answer
//! and the status page. Listeners and backends added or removed are found
//! by the reload itself (they depend on which sockets and backends it
//! keeps); this module describes everything else that differs.

use std::time::Duration;

use crate::config::{
    human_size, Affinity, Config, HealthConfig, ListenerConfig, PoolConfig, RouteConfig,
};

/// A setting of a backend that stayed (same pool, id and address) and now
/// has another value. `null` (`None`) means unlimited.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct BackendChange {
    /// `pool/id`.
    pub backend: String,
    /// `weight` or `max_connections`.
    pub setting: &'static str,
    pub from: Option<u64>,
    pub to: Option<u64>,
}

impl std::fmt::Display for BackendChange {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let show = |v: Option<u64>| v.map_or_else(|| "unlimited".to_string(), |n| n.to_string());
        write!(
            f,
            "backend {}: {} {} -> {}",
            self.backend,
            self.setting,
            show(self.from),
            show(self.to)
        )
    }
}

/// The weight and `max_connections` changes of the backends that stay.
pub fn backend_changes(old: &Config, new: &Config) -> Vec<BackendChange> {
    let mut out = Vec::new();
    for (name, pool) in &new.pools {
        let Some(before) = old.pools.get(name) else {
            continue;
        };
        for b in &pool.backends {
            let Some(was) = before
                .backends
                .iter()
                .find(|o| o.id == b.id && o.address == b.address)
            else {
                continue;
            };
            let backend = format!("{name}/{}", b.id);
            if was.weight != b.weight {
                out.push(BackendChange {
                    backend: backend.clone(),
                    setting: "weight",
                    from: Some(u64::from(was.weight)),
                    to: Some(u64::from(b.weight)),
                });
            }
            if was.max_connections != b.max_connections {
                out.push(BackendChange {
                    backend,
                    setting: "max_connections",
                    from: was.max_connections,
                    to: b.max_connections,
                });
            }
        }
    }
    out
}

/// Every other difference between `old` and `new`, one sentence each:
/// top-level settings, the admin API, kept listeners' settings, routes,
/// pools added or removed, and pool settings. Secrets are never shown.
pub fn setting_changes(old: &Config, new: &Config) -> Vec<String> {
    let mut out = Vec::new();
    if old.shutdown_window != new.shutdown_window {
        out.push(format!(
            "shutdown_window {} -> {} (applies to the next shutdown)",
            human(old.shutdown_window),
            human(new.shutdown_window)
        ));
    }
    admin_changes(old, new, &mut out);
    for l in &new.listeners {
        if let Some(was) = old
            .listeners
            .iter()
            .find(|o| o.name == l.name && o.bind == l.bind)
        {
            listener_changes(was, l, &mut out);
        }
    }
    route_changes(&old.routes, &new.routes, &mut out);
    for name in new.pools.keys().filter(|n| !old.pools.contains_key(*n)) {
        out.push(format!("pool {name:?} added"));
    }
    for name in old.pools.keys().filter(|n| !new.pools.contains_key(*n)) {
        out.push(format!("pool {name:?} removed"));
    }
    for (name, pool) in &new.pools {
        if let Some(was) = old.pools.get(name) {
            pool_changes(was, pool, &mut out);
        }
    }
    out
}

fn admin_changes(old: &Config, new: &Config, out: &mut Vec<String>) {
    let bind = |c: &Config| c.admin.as_ref().map(|a| a.bind);
    let token = |c: &Config| c.admin.as_ref().and_then(|a| a.token.clone());
    if bind(old) != bind(new) {
        let show =
            |b: Option<std::net::SocketAddr>| b.map_or("none".to_string(), |b| b.to_string());
        out.push(format!(
            "[admin] bind {} -> {} (applies from the next start)",
            show(bind(old)),
            show(bind(new))
        ));
    }
    match (token(old), token(new)) {
        (None, Some(_)) => out.push("[admin] token set".to_string()),
        (Some(_), None) => out.push("[admin] token removed".to_string()),
        (Some(a), Some(b)) if a != b => out.push("[admin] token changed".to_string()),
        _ => {}
    }
}

fn listener_changes(was: &ListenerConfig, now: &ListenerConfig, out: &mut Vec<String>) {
    let name = &now.name;
    if was.handshake_timeout != now.handshake_timeout {
        out.push(format!(
            "listener {name:?}: handshake_timeout {} -> {}",
            human(was.handshake_timeout),
            human(now.handshake_timeout)
        ));
    }
    match (&was.tls, &now.tls) {
        (None, Some(_)) => out.push(format!("listener {name:?}: TLS turned on")),
        (Some(_), None) => out.push(format!("listener {name:?}: TLS turned off")),
        (Some(a), Some(b)) => {
            if a.cert != b.cert || a.key != b.key {
                out.push(format!(
                    "listener {name:?}: certificate {} -> {}, key {} -> {}",
                    a.cert.display(),
                    b.cert.display(),
                    a.key.display(),
                    b.key.display()
                ));
            } else {
                // The files are read again on every reload, so a renewed
                // certificate under the same name is now in use.
                out.push(format!(
                    "listener {name:?}: certificate and key re-read from {} and {}",
                    b.cert.display(),
                    b.key.display()
                ));
            }
        }
        (None, None) => {}
    }
    if let Some(keys) = now.tls.as_ref().and_then(|t| t.ticket_keys.as_ref()) {
        // Read again on every reload, like the certificate: a rotated file
        // is in force now.
        out.push(format!(
            "listener {name:?}: ticket keys re-read from {}",
            keys.display()
        ));
    }
    let proxy = |l: &ListenerConfig| {
        l.proxy_protocol.as_ref().map_or("off".to_string(), |p| {
            let from: Vec<String> = p.from.iter().map(ToString::to_string).collect();
            format!("{} from {}", p.versions.as_str(), from.join(", "))
        })
    };
    if proxy(was) != proxy(now) {
        out.push(format!(
            "listener {name:?}: proxy_protocol {} -> {}",
            proxy(was),
            proxy(now)
        ));
    }
    if was.reuse_port != now.reuse_port {
        out.push(format!(
            "listener {name:?}: reuse_port {} -> {} (applies when the listener is next bound)",
            was.reuse_port, now.reuse_port
        ));
    }
}

fn route_changes(old: &[RouteConfig], new: &[RouteConfig], out: &mut Vec<String>) {
    let show = |r: &RouteConfig| {
        format!(
            "{}{} -> pool {:?}",
            r.host.as_deref().unwrap_or("any host "),
            r.path_prefix,
            r.pool
        )
    };
    for r in new.iter().filter(|r| !old.contains(r)) {
        out.push(format!("route {} added", show(r)));
    }
    for r in old.iter().filter(|r| !new.contains(r)) {
        out.push(format!("route {} removed", show(r)));
    }
}

/// A pool setting by name, and how to read it.
type Setting<T> = (&'static str, fn(&PoolConfig) -> T);

fn pool_changes(was: &PoolConfig, now: &PoolConfig, out: &mut Vec<String>) {
    let mut set = |key: &str, from: String, to: String| {
        if from != to {
            out.push(format!("pool {:?}: {key} {from} -> {to}", now.name));
        }
    };
    set(
        "balance",
        was.balance.as_str().into(),
        now.balance.as_str().into(),
    );
    let proxy = |p: &PoolConfig| if p.send_proxy_protocol { "v2" } else { "off" }.to_string();
    set("send_proxy_protocol", proxy(was), proxy(now));
    let durations: [Setting<Duration>; 5] = [
        ("connect_timeout", |p| p.connect_timeout),
        ("response_timeout", |p| p.response_timeout),
        ("pong_timeout", |p| p.pong_timeout),
        ("close_timeout", |p| p.close_timeout),
        ("drain_window", |p| p.drain_window),
    ];
    for (key, get) in durations {
        set(key, human(get(was)), human(get(now)));
    }
    let optional: [Setting<Option<Duration>>; 4] = [
        ("idle_timeout", |p| p.idle_timeout),
        ("ping_interval", |p| p.ping_interval),
        ("slow_start", |p| p.slow_start),
        ("max_connection_age", |p| p.max_connection_age),
    ];
    for (key, get) in optional {
        let show = |d: Option<Duration>| d.map_or("off".to_string(), human);
        set(key, show(get(was)), show(get(now)));
    }
    let origins = |p: &PoolConfig| {
        if p.allowed_origins.is_empty() {
            "any".to_string()
        } else {
            p.allowed_origins.join(", ")
        }
    };
    set("allowed_origins", origins(was), origins(now));
    if was.affinity.mode() != now.affinity.mode() {
        set(
            "affinity",
            was.affinity.mode().into(),
            now.affinity.mode().into(),
        );
    } else if was.affinity != now.affinity {
        let table = match &now.affinity {
            Affinity::Cookie(_) => "cookie",
            Affinity::Hash(_) => "hash",
            Affinity::None => "affinity",
        };
        // Named, not shown: the cookie table holds the secret.
        out.push(format!("pool {:?}: [{table}] settings changed", now.name));
    }
    health_changes(&now.name, was.health.as_ref(), now.health.as_ref(), out);
    limit_changes(was, now, out);
    auth_changes(was, now, out);
    fleet_changes(was, now, out);
}

/// `[pools.NAME.rebalance]`, `[pools.NAME.dns]` and the backends' `drain`.
fn fleet_changes(was: &PoolConfig, now: &PoolConfig, out: &mut Vec<String>) {
    let pool = &now.name;
    match (&was.rebalance, &now.rebalance) {
        (None, Some(r)) => out.push(format!(
            "pool {pool:?}: rebalance turned on (threshold {}, window {})",
            r.threshold,
            human(r.window)
        )),
        (Some(_), None) => out.push(format!("pool {pool:?}: rebalance turned off")),
        (Some(a), Some(b)) => {
            if a.threshold != b.threshold {
                out.push(format!(
                    "pool {pool:?}: rebalance.threshold {} -> {}",
                    a.threshold, b.threshold
                ));
            }
            if a.window != b.window {
                out.push(format!(
                    "pool {pool:?}: rebalance.window {} -> {}",
                    human(a.window),
                    human(b.window)
                ));
            }
        }
        (None, None) => {}
    }
    let show = |d: &crate::config::DnsConfig| {
        let via = d
            .resolver
            .map_or_else(|| "the system resolver".to_string(), |r| r.to_string());
        format!(
            "{}:{} every {} via {via}",
            d.name,
            d.port,
            human(d.interval)
        )
    };
    match (&was.dns, &now.dns) {
        (None, Some(d)) => out.push(format!(
            "pool {pool:?}: dns discovery of {} turned on",
            show(d)
        )),
        (Some(_), None) => out.push(format!(
            "pool {pool:?}: dns discovery turned off (its backends are removed)"
        )),
        (Some(a), Some(b)) if a != b => out.push(format!(
            "pool {pool:?}: dns discovery {} -> {}",
            show(a),
            show(b)
        )),
        _ => {}
    }
    for b in &now.backends {
        let Some(before) = was
            .backends
            .iter()
            .find(|o| o.id == b.id && o.address == b.address)
        else {
            continue;
        };
        match (before.drain, b.drain) {
            (false, true) => out.push(format!("backend {pool}/{}: drain = true (draining)", b.id)),
            (true, false) => out.push(format!(
                "backend {pool}/{}: drain lifted (back in service unless the admin API drains it)",
                b.id
            )),
            _ => {}
        }
    }
}

/// `max_message_size`, the upgrade rate and burst, `retry_after_max` and
/// `send_timeout`.
fn limit_changes(was: &PoolConfig, now: &PoolConfig, out: &mut Vec<String>) {
    let mut set = |key: &str, from: String, to: String| {
        if from != to {
            out.push(format!("pool {:?}: {key} {from} -> {to}", now.name));
        }
    };
    let size = |p: &PoolConfig| {
        p.limits
            .max_message_size
            .map_or("no limit".to_string(), human_size)
    };
    set("max_message_size", size(was), size(now));
    let rate = |p: &PoolConfig| {
        p.limits
            .upgrade_rate
            .map_or("no limit".to_string(), |r| r.per_second.to_string())
    };
    set("max_upgrades_per_second", rate(was), rate(now));
    // A burst means something only with a rate on both sides.
    if let (Some(a), Some(b)) = (was.limits.upgrade_rate, now.limits.upgrade_rate) {
        set("upgrade_burst", a.burst.to_string(), b.burst.to_string());
    }
    set(
        "retry_after_max",
        human(was.limits.retry_after_max),
        human(now.limits.retry_after_max),
    );
    let send = |p: &PoolConfig| p.limits.send_timeout.map_or("off".to_string(), human);
    set("send_timeout", send(was), send(now));
}

/// `[pools.NAME.auth.jwt]` and `[pools.NAME.auth.forward]`: turned on, off,
/// or changed (named, not shown: they hold key files, secrets and URLs).
fn auth_changes(was: &PoolConfig, now: &PoolConfig, out: &mut Vec<String>) {
    let pool = &now.name;
    let mut table = |name: &str, before: bool, after: bool, same: bool| match (before, after) {
        (false, true) => out.push(format!("pool {pool:?}: [auth.{name}] turned on")),
        (true, false) => out.push(format!("pool {pool:?}: [auth.{name}] turned off")),
        (true, true) if !same => out.push(format!("pool {pool:?}: [auth.{name}] settings changed")),
        _ => {}
    };
    table(
        "jwt",
        was.auth.jwt.is_some(),
        now.auth.jwt.is_some(),
        was.auth.jwt == now.auth.jwt,
    );
    table(
        "forward",
        was.auth.forward.is_some(),
        now.auth.forward.is_some(),
        was.auth.forward == now.auth.forward,
    );
}

fn health_changes(
    pool: &str,
    was: Option<&HealthConfig>,
    now: Option<&HealthConfig>,
    out: &mut Vec<String>,
) {
    match (was, now) {
        (None, Some(_)) => out.push(format!("pool {pool:?}: active health checks turned on")),
        (Some(_), None) => out.push(format!("pool {pool:?}: active health checks turned off")),
        (Some(a), Some(b)) => {
            let pairs = [
                ("path", a.path.clone(), b.path.clone()),
                ("interval", human(a.interval), human(b.interval)),
                ("timeout", human(a.timeout), human(b.timeout)),
                ("rise", a.rise.to_string(), b.rise.to_string()),
                ("fall", a.fall.to_string(), b.fall.to_string()),
            ];
            for (key, from, to) in pairs {
                if from != to {
                    out.push(format!("pool {pool:?}: health.{key} {from} -> {to}"));
                }
            }
        }
        (None, None) => {}
    }
}

/// A duration as the config would spell it (`30s`, `1m 30s`, `250ms`).
fn human(d: Duration) -> String {
    humantime::format_duration(d).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proxy::testing;

    const BASE: &str = r#"
shutdown_window = "10s"

[[listeners]]
name = "public"
bind = "127.0.0.1:0"

[admin]
bind = "127.0.0.1:0"
token = "old-token"

[[routes]]
pool = "chat"

[pools.chat]
balance = "round_robin"
drain_window = "30s"

[[pools.chat.backends]]
id = "b1"
address = "127.0.0.1:9001"

[[pools.chat.backends]]
id = "b2"
address = "127.0.0.1:9002"
weight = 2
max_connections = 100
"#;

    fn changed(edit: &[(&str, &str)]) -> (Vec<BackendChange>, Vec<String>) {
        let mut text = BASE.to_string();
        for (from, to) in edit {
            assert!(text.contains(from), "{from}");
            text = text.replacen(from, to, 1);
        }
        let (old, new) = (testing::config(BASE), testing::config(&text));
        (backend_changes(&old, &new), setting_changes(&old, &new))
    }

    #[test]
    fn the_same_file_changes_nothing() {
        assert_eq!(changed(&[]), (vec![], vec![]));
    }

    #[test]
    fn weight_and_max_connections_changes_are_listed() {
        let (backends, settings) = changed(&[
            (
                "address = \"127.0.0.1:9001\"\n",
                "address = \"127.0.0.1:9001\"\nweight = 5\nmax_connections = 7\n",
            ),
            ("max_connections = 100\n", ""),
        ]);
        let words: Vec<String> = backends.iter().map(ToString::to_string).collect();
        assert_eq!(
            words,
            [
                "backend chat/b1: weight 1 -> 5",
                "backend chat/b1: max_connections unlimited -> 7",
                "backend chat/b2: max_connections 100 -> unlimited",
            ]
        );
        assert_eq!(backends[2].to, None);
        assert!(settings.is_empty(), "{settings:?}");
    }

    #[test]
    fn a_moved_backend_is_not_a_setting_change() {
        let (backends, _) = changed(&[(
            "127.0.0.1:9002\"\nweight = 2",
            "127.0.0.1:9012\"\nweight = 3",
        )]);
        assert_eq!(backends, vec![]);
    }

    #[test]
    fn settings_are_described_in_plain_words() {
        let (_, settings) = changed(&[
            ("shutdown_window = \"10s\"", "shutdown_window = \"90s\""),
            ("token = \"old-token\"", "token = \"new-token\""),
            ("balance = \"round_robin\"", "balance = \"least_connections\"\nidle_timeout = \"5m\""),
            ("drain_window = \"30s\"", "drain_window = \"1500ms\""),
            ("[[routes]]\npool = \"chat\"", "[[routes]]\npool = \"chat\"\n\n[[routes]]\npath_prefix = \"/feed\"\npool = \"feed\"\n\n[[pools.feed.backends]]\nid = \"f1\"\naddress = \"127.0.0.1:9101\"\n"),
        ]);
        assert_eq!(
            settings,
            [
                "shutdown_window 10s -> 1m 30s (applies to the next shutdown)",
                "[admin] token changed",
                "route any host /feed -> pool \"feed\" added",
                "pool \"feed\" added",
                "pool \"chat\": balance round_robin -> least_connections",
                "pool \"chat\": drain_window 30s -> 1s 500ms",
                "pool \"chat\": idle_timeout off -> 5m",
            ]
        );
        // The token itself is never shown.
        assert!(!settings.iter().any(|s| s.contains("new-token")));
    }

    #[test]
    fn limits_and_authentication_changes_are_described() {
        let forward = "\n[pools.chat.auth.forward]\nurl = \"http://127.0.0.1:9000/verify\"\n";
        let (_, settings) = changed(&[(
            "drain_window = \"30s\"",
            &format!(
                "drain_window = \"30s\"\nmax_message_size = \"1 MiB\"\n\
                 max_upgrades_per_second = 50\nretry_after_max = \"10s\"\n\
                 send_timeout = \"30s\"\n{forward}"
            ),
        )]);
        assert_eq!(
            settings,
            [
                "pool \"chat\": max_message_size no limit -> 1 MiB",
                "pool \"chat\": max_upgrades_per_second no limit -> 50",
                "pool \"chat\": retry_after_max 5s -> 10s",
                "pool \"chat\": send_timeout off -> 30s",
                "pool \"chat\": [auth.forward] turned on",
            ]
        );
        // From limits to others: the burst, and a changed auth service
        // (its URL is not shown).
        let mut with = BASE.replace(
            "drain_window = \"30s\"",
            &format!("drain_window = \"30s\"\nmax_upgrades_per_second = 50\n{forward}"),
        );
        let old = testing::config(&with);
        with = with
            .replace(
                "max_upgrades_per_second = 50",
                "max_upgrades_per_second = 50\nupgrade_burst = 80",
            )
            .replace("127.0.0.1:9000/verify", "127.0.0.1:9001/check");
        let settings = setting_changes(&old, &testing::config(&with));
        assert_eq!(
            settings,
            [
                "pool \"chat\": upgrade_burst 50 -> 80",
                "pool \"chat\": [auth.forward] settings changed",
            ]
        );
        assert!(!settings.iter().any(|s| s.contains("9001")));
    }

    #[test]
    fn fleet_changes_are_described() {
        let (_, settings) = changed(&[
            (
                "drain_window = \"30s\"",
                "drain_window = \"30s\"\nslow_start = \"1m\"\nmax_connection_age = \"6h\"\n\n\
                 [pools.chat.rebalance]\nthreshold = 1.5\n\n\
                 [pools.chat.dns]\nname = \"chat.internal\"\nport = 9000\nresolver = \"127.0.0.1:5353\"\n",
            ),
            ("address = \"127.0.0.1:9001\"\n", "address = \"127.0.0.1:9001\"\ndrain = true\n"),
        ]);
        assert_eq!(
            settings,
            [
                "pool \"chat\": slow_start off -> 1m",
                "pool \"chat\": max_connection_age off -> 6h",
                "pool \"chat\": rebalance turned on (threshold 1.5, window 5m)",
                "pool \"chat\": dns discovery of chat.internal:9000 every 10s via 127.0.0.1:5353 turned on",
                "backend chat/b1: drain = true (draining)",
            ]
        );
        let with = BASE
            .replace(
                "drain_window = \"30s\"",
                "drain_window = \"30s\"\n\n[pools.chat.rebalance]\n\n[pools.chat.dns]\nname = \"a\"\nport = 1\n",
            )
            .replace("address = \"127.0.0.1:9001\"\n", "address = \"127.0.0.1:9001\"\ndrain = true\n");
        let without = BASE.replace(
            "drain_window = \"30s\"",
            "drain_window = \"30s\"\n\n[pools.chat.rebalance]\nwindow = \"1m\"\n\n[pools.chat.dns]\nname = \"b\"\nport = 1\n",
        );
        assert_eq!(
            setting_changes(&testing::config(&with), &testing::config(&without)),
            [
                "pool \"chat\": rebalance.window 5m -> 1m",
                "pool \"chat\": dns discovery a:1 every 10s via the system resolver -> b:1 every 10s via the system resolver",
                "backend chat/b1: drain lifted (back in service unless the admin API drains it)",
            ]
        );
        assert_eq!(
            setting_changes(&testing::config(&without), &testing::config(BASE)),
            [
                "pool \"chat\": rebalance turned off",
                "pool \"chat\": dns discovery turned off (its backends are removed)",
            ]
        );
    }
}
