//! Table tests of config validation: text in, the exact rendered problems
//! (or the validated values) out. No sockets.

use std::path::{Path, PathBuf};
use std::time::Duration;

use super::rules::{self, backend_address, normalize_host};
use super::*;

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

const CONFIG_DIR: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/config");

/// A shipped config, loaded from its file (its relative paths resolve
/// against config/).
fn shipped(name: &str) -> Config {
    let path = Path::new(CONFIG_DIR).join(name);
    Config::load(&path).unwrap_or_else(|e| panic!("{name} should be valid, got:\n{e}"))
}

#[test]
fn example_config_validates() {
    let config = shipped("berth.toml");
    assert_eq!(
        config.source.as_deref(),
        Some(Path::new(CONFIG_DIR).join("berth.toml").as_path())
    );
    assert_eq!(config.shutdown_window, Duration::from_secs(10));
    assert_eq!(config.listeners.len(), 3);
    assert_eq!(config.listeners[0].name, "public");
    assert_eq!(
        config.listeners[2]
            .proxy_protocol
            .as_ref()
            .map(|p| p.versions),
        Some(crate::config::ProxyVersions::V2)
    );
    assert_eq!(config.listeners[0].bind, "127.0.0.1:8080".parse().unwrap());
    assert!(config.listeners[0].tls.is_none());
    let public = &config.listeners[0];
    assert_eq!(
        (
            public.max_connections,
            public.max_connections_per_ip,
            public.max_header_bytes
        ),
        (Some(50_000), Some(200), 64 * 1024)
    );
    let tls = config.listeners[1]
        .tls
        .as_ref()
        .expect("public-tls has TLS");
    assert_eq!(tls.cert, Path::new(CONFIG_DIR).join("../certs/example.crt"));
    assert_eq!(tls.key, Path::new(CONFIG_DIR).join("../certs/example.key"));
    assert_eq!(
        tls.server_config.alpn_protocols,
        vec![b"h2".to_vec(), b"http/1.1".to_vec()]
    );
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
    assert_eq!(
        chat.limits,
        PoolLimits {
            max_message_size: Some(1 << 20),
            upgrade_rate: Some(UpgradeRate {
                per_second: 500,
                burst: 1000
            }),
            retry_after_max: Duration::from_secs(5),
            send_timeout: Some(Duration::from_secs(30)),
        }
    );
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
            limits: PoolLimits {
                max_message_size: None,
                upgrade_rate: None,
                retry_after_max: Duration::from_secs(5),
                send_timeout: None,
            },
            health: None,
            backends: vec![BackendConfig {
                id: "chat-1".into(),
                address: "127.0.0.1:9001".into(),
                weight: 1,
                max_connections: None,
                drain: false,
            }],
            auth: AuthConfig::default(),
            slow_start: None,
            max_connection_age: None,
            rebalance: None,
            dns: None,
            send_proxy_protocol: false,
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
         `name`, `bind`, `tls`, `handshake_timeout`, `max_connections`, \
         `max_connections_per_ip`, `max_header_bytes`, `proxy_protocol`, `proxy_protocol_from`, `reuse_port`, `http2`, `max_concurrent_streams`"
    );
    let text = BASE.replace("address = ", "weight = 2\nadress = ");
    assert_eq!(
        errors(&text),
        "berth.toml:13: pools.chat.backends[0].adress: unknown field `adress`, \
         expected one of `id`, `address`, `weight`, `max_connections`, `drain`"
    );
    let text = BASE.replace(
        "bind = \"127.0.0.1:8080\"",
        "bind = \"127.0.0.1:8080\"\ntls = { cert = \"a.crt\", kye = \"a.key\" }",
    );
    assert_eq!(
        errors(&text),
        "berth.toml:4: listeners[0].tls.kye: unknown field `kye`, expected one of `cert`, `key`, `ticket_keys`"
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
        assert_eq!(backend_address(address), Err(message.to_string()));
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
        "berth.toml:9: pools.chat.connect_timeout: duration must be between 10ms and 2m, got \"0s\""
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
    let text =
        format!("{BASE}\n[[pools.chat.backends]]\nid = \"chat-1\"\naddress = \"127.0.0.1:9002\"\n");
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
    let certified = rcgen::generate_simple_self_signed(vec!["localhost".into()]).expect("rcgen");
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

// ---- ranges ----

/// `BASE` with duration key `key` set to `value` in the table it belongs to.
fn with_duration(key: &str, value: &str) -> String {
    // A key qualified by its table (`health.timeout`) is written bare.
    let bare = key.split_once('.').map_or(key, |(_, bare)| bare);
    let line = format!("{bare} = {value:?}");
    match key {
        "shutdown_window" => format!("{line}\n{BASE}"),
        "handshake_timeout" => BASE.replace(
            "bind = \"127.0.0.1:8080\"",
            &format!("bind = \"127.0.0.1:8080\"\n{line}"),
        ),
        "max_age" => BASE.replace(
            "[pools.chat]",
            &format!(
                "[pools.chat]\naffinity = \"cookie\"\n\n[pools.chat.cookie]\nsecret = \"{}\"\n{line}",
                "s".repeat(32)
            ),
        ),
        "health.interval" | "health.timeout" => BASE.replace(
            "[pools.chat]",
            &format!("[pools.chat]\n\n[pools.chat.health]\n{line}"),
        ),
        "refresh" | "leeway" => BASE.replace(
            "[pools.chat]",
            &format!("[pools.chat]\n\n[pools.chat.auth.jwt]\njwks_url = \"https://idp.example.com/jwks.json\"\n{line}"),
        ),
        "forward.timeout" | "cache" => BASE.replace(
            "[pools.chat]",
            &format!("[pools.chat]\n\n[pools.chat.auth.forward]\nurl = \"http://127.0.0.1:9000/verify\"\n{line}"),
        ),
        "rebalance.window" => BASE.replace(
            "[pools.chat]",
            &format!("[pools.chat]\n\n[pools.chat.rebalance]\n{line}"),
        ),
        "dns.interval" => BASE.replace(
            "[pools.chat]",
            &format!("[pools.chat]\n\n[pools.chat.dns]\nname = \"chat.internal\"\nport = 9000\n{line}"),
        ),
        _ => BASE.replace("[pools.chat]", &format!("[pools.chat]\n{line}")),
    }
}

#[test]
fn every_duration_key_has_a_range_of_at_most_30_days() {
    assert_eq!(rules::LONGEST, Duration::from_secs(30 * 24 * 3600));
    for (key, rule) in rules::DURATIONS {
        assert!(rule.min <= rule.max && rule.max <= rules::LONGEST, "{key}");
        if let Some(default) = rule.default {
            assert!((rule.min..=rule.max).contains(&default), "{key}");
        }
        // A key that is "off" when absent has a real minimum above zero.
        assert!(rule.default.is_some() || !rule.min.is_zero(), "{key}");
    }
}

#[test]
fn durations_outside_their_range_are_rejected_with_the_range() {
    let ms = Duration::from_millis;
    for (key, rule) in rules::DURATIONS {
        let (min, max) = (rules::human(rule.min), rules::human(rule.max));
        let expected = |raw: &str| match rule.default {
            Some(_) => format!("duration must be between {min} and {max}, got {raw:?}"),
            None => {
                format!("duration must be \"0s\" (off) or between {min} and {max}, got {raw:?}")
            }
        };
        // The bounds themselves are valid.
        load(&with_duration(key, &min));
        load(&with_duration(key, &max));
        // Just outside them is not, and the message names the range.
        let mut bad = vec![
            rules::human(rule.max + Duration::from_secs(1)),
            "500000000000y".to_string(),
        ];
        if rule.min >= ms(1) {
            bad.push(rules::human(rule.min - ms(1)));
            bad.push("1ns".to_string());
        }
        if rule.default.is_some() && !rule.min.is_zero() {
            bad.push("0s".to_string());
        }
        for raw in bad {
            let found = problems(&with_duration(key, &raw));
            assert_eq!(found.len(), 1, "{key} = {raw:?}: {found:?}");
            assert!(found[0].key.ends_with(key), "{key}: {found:?}");
            assert_eq!(found[0].message, expected(&raw), "{key}");
        }
    }
}

#[test]
fn zero_means_off_or_at_once_where_documented() {
    let chat = |text: &str| load(text).pools["chat"].clone();
    assert_eq!(
        chat(&with_duration("idle_timeout", "0s")).idle_timeout,
        None
    );
    assert_eq!(
        chat(&with_duration("ping_interval", "0s")).ping_interval,
        None
    );
    assert_eq!(
        chat(&with_duration("drain_window", "0s")).drain_window,
        Duration::ZERO
    );
    let Affinity::Cookie(cookie) = chat(&with_duration("max_age", "0s")).affinity else {
        panic!("cookie affinity");
    };
    assert_eq!(cookie.max_age, None);
    let config = load(&with_duration("shutdown_window", "0s"));
    assert_eq!(config.shutdown_window, Duration::ZERO);
    // The issue's examples.
    assert_eq!(
        errors(&with_duration("close_timeout", "500000000000y")),
        "berth.toml:9: pools.chat.close_timeout: duration must be between 100ms and 10m, \
         got \"500000000000y\""
    );
    assert_eq!(
        errors(&with_duration("ping_interval", "1ns")),
        "berth.toml:9: pools.chat.ping_interval: duration must be \"0s\" (off) or between \
         10ms and 1h, got \"1ns\""
    );
    assert_eq!(
        errors(&with_duration("pong_timeout", "1ns")),
        "berth.toml:9: pools.chat.pong_timeout: duration must be between 100ms and 10m, \
         got \"1ns\""
    );
}

#[test]
fn numbers_outside_their_range_are_rejected_with_the_range() {
    let backend = |extra: &str| {
        BASE.replace(
            "address = \"127.0.0.1:9001\"",
            &format!("address = \"127.0.0.1:9001\"\n{extra}"),
        )
    };
    let health = |extra: &str| {
        BASE.replace(
            "[pools.chat]",
            &format!("[pools.chat]\n\n[pools.chat.health]\n{extra}"),
        )
    };
    let pool = |extra: &str| BASE.replace("[pools.chat]", &format!("[pools.chat]\n{extra}"));
    let listener = |extra: &str| {
        BASE.replace(
            "bind = \"127.0.0.1:8080\"",
            &format!("bind = \"127.0.0.1:8080\"\n{extra}"),
        )
    };
    for rule in rules::NUMBERS {
        let text = |n: i64| {
            let line = format!("{} = {n}", rule.name);
            match rule.name {
                "rise" | "fall" => health(&line),
                "max_upgrades_per_second" => pool(&line),
                "upgrade_burst" => pool(&format!("max_upgrades_per_second = 1\n{line}")),
                "max_connections_per_ip" | "max_concurrent_streams" => listener(&line),
                "port" => BASE.replace(
                    "[pools.chat]",
                    &format!("[pools.chat]\n\n[pools.chat.dns]\nname = \"chat.internal\"\n{line}"),
                ),
                _ => backend(&line),
            }
        };
        load(&text(rule.min));
        load(&text(rule.max));
        for n in [rule.min - 1, rule.max + 1, -1, i64::MAX] {
            let found = problems(&text(n));
            assert_eq!(found.len(), 1, "{} = {n}: {found:?}", rule.name);
            assert!(
                found[0].message.starts_with(&format!(
                    "{} must be between {} and {}, got {n}",
                    rule.name, rule.min, rule.max
                )),
                "{found:?}"
            );
        }
    }
    let config = load(&backend("max_connections = 1000000\nweight = 1000"));
    assert_eq!(
        config.pools["chat"].backends[0].max_connections,
        Some(1_000_000)
    );
    assert_eq!(config.pools["chat"].backends[0].weight, 1000);

    let hash = |c: &str| {
        BASE.replace(
            "[pools.chat]",
            &format!("[pools.chat]\naffinity = \"hash\"\n\n[pools.chat.hash]\nkey = \"client_ip\"\nbounded_load = {c}"),
        )
    };
    load(&hash("1.01"));
    load(&hash("100"));
    for c in ["1", "1.0", "0.5", "100.5", "-3", "nan", "inf"] {
        assert!(
            errors(&hash(c)).contains(
                "pools.chat.hash.bounded_load: bounded_load must be a number greater than 1.0 and at most 100"
            ),
            "{c}"
        );
    }
}

/// The README's Configuration section.
pub(super) fn readme_configuration() -> &'static str {
    include_str!("../../README.md")
        .split("\n## Configuration\n")
        .nth(1)
        .and_then(|rest| rest.split("\n## ").next())
        .expect("README has a Configuration section")
}

/// The subsection of the README's Configuration section (its `### `
/// heading and what follows, up to the next one) whose heading contains
/// `marker`, e.g. `` `[pools.NAME.health]` ``.
pub(super) fn readme_subsection(marker: &str) -> Option<&'static str> {
    readme_configuration()
        .split("\n### ")
        .skip(1)
        .find(|s| s.lines().next().is_some_and(|h| h.contains(marker)))
}

/// The table rows in `scope` whose first cell names `key`: alone
/// (`` | `key` | ``) or among alternatives (`` | `secret` / `secret_file` | ``).
pub(super) fn readme_rows<'a>(scope: &'a str, key: &str) -> Vec<&'a str> {
    let name = format!("`{key}`");
    scope
        .lines()
        .filter(|line| {
            line.strip_prefix("| ")
                .and_then(|rest| rest.split(" |").next())
                .is_some_and(|cell| cell.split(" / ").any(|n| n == name))
        })
        .collect()
}

/// The README's Configuration tables state the same ranges as the code.
#[test]
fn readme_documents_every_range() {
    let section = readme_configuration();
    // A key qualified by its table (`health.timeout`) is looked up in the
    // table's own subsection (`### [pools.NAME.health]`). `max_connections`
    // is both a listener and a backend key, with one range: two rows.
    let rows = |key: &str| {
        let (scope, bare) = match key.split_once('.') {
            Some((table, bare)) => {
                let heading = readme_subsection(&format!(".{table}]"))
                    .unwrap_or_else(|| panic!("README has no subsection for [pools.NAME.{table}]"));
                (heading, bare)
            }
            None => (section, key),
        };
        let rows = readme_rows(scope, bare);
        let expected = if key == "max_connections" { 2 } else { 1 };
        assert_eq!(rows.len(), expected, "README rows for {key}: {rows:?}");
        rows
    };
    let row = |key: &str| rows(key)[0];
    for (key, rule) in rules::DURATIONS {
        let range = format!(
            "`{}` to `{}`",
            rules::human(rule.min),
            rules::human(rule.max)
        );
        let row = row(key);
        assert!(
            row.contains(&range),
            "README's {key} row lacks {range}: {row}"
        );
        if let Some(default) = rule.default {
            let default = format!("| `\"{}\"` |", rules::human(default));
            assert!(
                row.contains(&default),
                "README's {key} row lacks {default}: {row}"
            );
        }
    }
    for rule in rules::NUMBERS {
        let range = format!("`{}` to `{}`", rule.min, rule.max);
        for row in rows(rule.name) {
            assert!(
                row.contains(&range),
                "README's {} row lacks {range}: {row}",
                rule.name
            );
        }
    }
    for (key, rule) in rules::SIZES {
        let range = format!(
            "`{}` to `{}`",
            rules::human_size(rule.min),
            rules::human_size(rule.max)
        );
        let row = row(key);
        assert!(
            row.contains(&range),
            "README's {key} row lacks {range}: {row}"
        );
        if let Some(default) = rule.default {
            let default = format!("| `\"{}\"` |", rules::human_size(default));
            assert!(
                row.contains(&default),
                "README's {key} row lacks {default}: {row}"
            );
        }
    }
}

#[test]
fn human_durations() {
    let cases = [
        (Duration::ZERO, "0s"),
        (Duration::from_millis(10), "10ms"),
        (Duration::from_millis(1500), "1500ms"),
        (Duration::from_secs(90), "90s"),
        (Duration::from_secs(300), "5m"),
        (Duration::from_secs(3600), "1h"),
        (Duration::from_secs(86400), "1d"),
        (Duration::from_secs(30 * 86400), "30d"),
    ];
    for (d, text) in cases {
        assert_eq!(rules::human(d), text);
        assert_eq!(humantime::parse_duration(text).ok(), Some(d), "{text}");
    }
}

// ---- one pass ----

#[test]
fn every_problem_is_reported_in_one_pass() {
    let text = r#"listen = []
admin = 5

[[listeners]]
name = "public"
bind = 8080
handshake_timout = "5s"

[[routes]]
pool = "nope"
weight = 3

[pools.chat]
conect_timeout = "3s"
idle_timeout = "1ns"

[[pools.chat.backends]]
id = "chat 1"
adress = "127.0.0.1:9001"
max_connections = 0

[[pools.chat.backends]]
id = "chat-2"
address = "127.0.0.1:9002"
weight = "heavy"
"#;
    assert_eq!(
        errors(text),
        [
            "berth.toml:1: listen: unknown field `listen`, expected one of `shutdown_window`, \
             `listeners`, `admin`, `routes`, `pools`",
            "berth.toml:2: admin: invalid type: integer `5`, expected a map",
            "berth.toml:6: listeners[0].bind: invalid type: integer `8080`, expected a string",
            "berth.toml:7: listeners[0].handshake_timout: unknown field `handshake_timout`, \
             expected one of `name`, `bind`, `tls`, `handshake_timeout`, `max_connections`, \
             `max_connections_per_ip`, `max_header_bytes`, `proxy_protocol`, `proxy_protocol_from`, `reuse_port`, `http2`, `max_concurrent_streams`",
            "berth.toml:10: routes[0].pool: unknown pool \"nope\" (defined pools: chat)",
            "berth.toml:11: routes[0].weight: unknown field `weight`, expected one of `host`, \
             `path_prefix`, `pool`",
            "berth.toml:14: pools.chat.conect_timeout: unknown field `conect_timeout`, expected \
             one of `balance`, `connect_timeout`, `response_timeout`, `idle_timeout`, \
             `ping_interval`, `pong_timeout`, `close_timeout`, `drain_window`, \
             `allowed_origins`, `affinity`, `max_message_size`, `max_upgrades_per_second`, \
             `upgrade_burst`, `retry_after_max`, `send_timeout`, `cookie`, `hash`, `health`, \
             `backends`, `auth`, `slow_start`, `max_connection_age`, `rebalance`, `dns`, `send_proxy_protocol`",
            "berth.toml:15: pools.chat.idle_timeout: duration must be \"0s\" (off) or between \
             100ms and 7d, got \"1ns\"",
            "berth.toml:18: pools.chat.backends[0].id: invalid backend id \"chat 1\" (use only \
             letters, digits, '.', '_' and '-')",
            "berth.toml:19: pools.chat.backends[0].adress: unknown field `adress`, expected one \
             of `id`, `address`, `weight`, `max_connections`, `drain`",
            "berth.toml:20: pools.chat.backends[0].max_connections: max_connections must be \
             between 1 and 1000000, got 0 (omit it for no cap)",
            "berth.toml:25: pools.chat.backends[1].weight: invalid type: string \"heavy\", \
             expected i64",
        ]
        .join("\n")
    );
}

#[test]
fn a_bad_table_hides_only_what_is_inside_it() {
    // A value that should be a table (or an array of tables) is one problem;
    // the keys it should have had are not reported missing as well.
    let text =
        format!("{BASE}\n[[pools.chat.backends]]\nid = \"b\"\naddress = \"b:1\"\ncookie = 3\n")
            .replace(
                "[pools.chat]",
                "[pools.chat]\naffinity = \"cookie\"\ncookie = \"yes\"\nhealth = []",
            );
    assert_eq!(
        errors(&text),
        "berth.toml:10: pools.chat.cookie: invalid type: string \"yes\", expected a map\n\
         berth.toml:11: pools.chat.health: invalid type: sequence, expected a map\n\
         berth.toml:20: pools.chat.backends[1].cookie: unknown field `cookie`, expected one of \
         `id`, `address`, `weight`, `max_connections`, `drain`"
    );
    let text = "listeners = [1, { name = \"b\", bind = \"127.0.0.1:1\" }]\n\
                routes = 3\npools = { chat = 4 }\n";
    assert_eq!(
        errors(text),
        "berth.toml:1: listeners[0]: invalid type: integer `1`, expected a map\n\
         berth.toml:2: routes: invalid type: integer `3`, expected a sequence\n\
         berth.toml:3: pools.chat: invalid type: integer `4`, expected a map"
    );
}

#[test]
fn a_misspelt_required_key_is_reported_once() {
    // `nmae` stands for the missing `name`, which is not reported again;
    // `tsl` (for the optional `tls`) is reported as unknown too.
    let text = BASE.replace("name = \"public\"", "nmae = \"public\"\ntsl = 1");
    assert_eq!(
        errors(&text),
        "berth.toml:2: listeners[0].nmae: unknown field `nmae`, expected one of `name`, `bind`, \
         `tls`, `handshake_timeout`, `max_connections`, `max_connections_per_ip`, \
         `max_header_bytes`, `proxy_protocol`, `proxy_protocol_from`, `reuse_port`, `http2`, `max_concurrent_streams`\n\
         berth.toml:3: listeners[0].tsl: unknown field `tsl`, expected one of `name`, `bind`, \
         `tls`, `handshake_timeout`, `max_connections`, `max_connections_per_ip`, \
         `max_header_bytes`, `proxy_protocol`, `proxy_protocol_from`, `reuse_port`, `http2`, `max_concurrent_streams`"
    );
    // A key that is nothing like the missing one does not excuse it.
    let text = BASE.replace("name = \"public\"", "colour = \"blue\"");
    assert_eq!(
        errors(&text),
        "berth.toml:1: listeners[0].name: required key is missing (add e.g. name = \"public\")\n\
         berth.toml:2: listeners[0].colour: unknown field `colour`, expected one of `name`, \
         `bind`, `tls`, `handshake_timeout`, `max_connections`, `max_connections_per_ip`, \
         `max_header_bytes`, `proxy_protocol`, `proxy_protocol_from`, `reuse_port`, `http2`, `max_concurrent_streams`"
    );
}

#[test]
fn every_key_of_a_backend_is_checked() {
    // A bad id or address used to skip the max_connections check.
    let text = BASE.replace(
        "id = \"chat-1\"\naddress = \"127.0.0.1:9001\"",
        "id = \"chat 1\"\naddress = \"nowhere\"\nweight = 0\nmax_connections = -5",
    );
    let keys: Vec<String> = problems(&text).into_iter().map(|p| p.key).collect();
    assert_eq!(
        keys,
        [
            "pools.chat.backends[0].id",
            "pools.chat.backends[0].address",
            "pools.chat.backends[0].weight",
            "pools.chat.backends[0].max_connections",
        ]
    );
}

// ---- typed values ----

#[test]
fn hash_keys_are_typed() {
    let cases = [
        ("client_ip", HashKey::ClientIp),
        (
            "header:X-User-Id",
            HashKey::Header(http::HeaderName::from_static("x-user-id")),
        ),
        ("cookie:session", HashKey::Cookie("session".into())),
        ("query:room", HashKey::Query("room".into())),
    ];
    for (text, key) in cases {
        assert_eq!(rules::hash_key(text), Ok(key.clone()));
        // Display writes it as the config does (header names lower-cased).
        assert_eq!(
            rules::hash_key(&key.to_string()),
            Ok(key),
            "{text} round-trips"
        );
    }
    for bad in [
        "",
        "client",
        "CLIENT_IP",
        "header:",
        "header:bad name",
        "cookie:",
        "query:",
        "path:x",
        "room",
    ] {
        let err = rules::hash_key(bad).expect_err(bad);
        assert!(
            err.starts_with(&format!("invalid hash key {bad:?}: ")),
            "{err}"
        );
        assert!(err.contains("\"client_ip\", \"header:NAME\""), "{err}");
    }
    let text = BASE.replace(
        "[pools.chat]",
        "[pools.chat]\naffinity = \"hash\"\n\n[pools.chat.hash]\nkey = \"header:X-Room\"\n\
         trusted_proxies = [\"10.1.2.3/8\", \"::1\"]",
    );
    let Affinity::Hash(hash) = &load(&text).pools["chat"].affinity else {
        panic!("hash affinity");
    };
    assert_eq!(
        hash.key,
        HashKey::Header(http::HeaderName::from_static("x-room"))
    );
    let nets: Vec<String> = hash.trusted_proxies.iter().map(|n| n.to_string()).collect();
    assert_eq!(nets, ["10.0.0.0/8", "::1/128"]);
}

#[test]
fn cidrs_are_typed() {
    let ip = |s: &str| s.parse::<std::net::IpAddr>().expect("ip");
    let net = rules::cidr("10.0.0.0/8").expect("cidr");
    assert!(net.contains(&ip("10.200.3.4")));
    assert!(!net.contains(&ip("11.0.0.1")));
    let host = rules::cidr("::1/128").expect("cidr");
    assert!(host.contains(&ip("::1")));
    assert!(!host.contains(&ip("::2")));
    assert_eq!(
        rules::cidr("192.168.7.9/16").map(|n| n.to_string()),
        Ok("192.168.0.0/16".to_string())
    );
    assert_eq!(rules::cidr("203.0.113.5").map(|n| n.prefix_len()), Ok(32));
    assert!(rules::cidr("0.0.0.0/0")
        .expect("cidr")
        .contains(&ip("8.8.8.8")));
    let v6 = rules::cidr("2001:db8::/32").expect("cidr");
    assert!(v6.contains(&ip("2001:db8:ffff::1")));
    assert!(!v6.contains(&ip("2001:db9::1")));
    for bad in [
        "",
        "10.0.0.0/33",
        "::/129",
        "10.0.0/8",
        "10.0.0.0/",
        "10.0.0.0/x",
        "host/8",
        "/8",
    ] {
        assert_eq!(
            rules::cidr(bad),
            Err(format!(
                "invalid CIDR {bad:?} (expected e.g. \"10.0.0.0/8\" or \"::1/128\")"
            ))
        );
    }
    let text = BASE.replace(
        "[pools.chat]",
        "[pools.chat]\naffinity = \"hash\"\n\n[pools.chat.hash]\nkey = \"client_ip\"\n\
         trusted_proxies = [\"10.0.0.0/8\", \"10.0.0/8\", \"fe80::/129\"]",
    );
    assert_eq!(
        errors(&text),
        "berth.toml:13: pools.chat.hash.trusted_proxies[1]: invalid CIDR \"10.0.0/8\" \
         (expected e.g. \"10.0.0.0/8\" or \"::1/128\")\n\
         berth.toml:13: pools.chat.hash.trusted_proxies[2]: invalid CIDR \"fe80::/129\" \
         (expected e.g. \"10.0.0.0/8\" or \"::1/128\")"
    );
}

// ---- files named by the config ----

/// `BASE` with cookie affinity reading its secret from `secret_file`.
fn with_secret_file(secret_file: &str) -> String {
    BASE.replace(
        "[pools.chat]",
        &format!(
            "[pools.chat]\naffinity = \"cookie\"\n\n[pools.chat.cookie]\nsecret_file = {secret_file:?}"
        ),
    )
}

fn mkfifo(path: &Path) {
    let status = std::process::Command::new("mkfifo")
        .arg(path)
        .status()
        .expect("mkfifo");
    assert!(status.success());
}

#[test]
fn relative_paths_resolve_against_the_config_directory() {
    let dir = tempfile::tempdir().expect("tempdir");
    let etc = dir.path().join("etc");
    std::fs::create_dir_all(etc.join("tls")).expect("mkdir");
    write_cert(&etc.join("tls"), "site");
    std::fs::write(etc.join("secret"), format!("{}\n", "k".repeat(40))).expect("write");
    let text = with_tls(Path::new("tls/site.crt"), Path::new("tls/site.key"))
        .replace("[pools.chat]\n", "")
        .replace(
            "\n[[pools.chat.backends]]",
            "\n[pools.chat]\naffinity = \"cookie\"\n\n[pools.chat.cookie]\nsecret_file = \"secret\"\n\n[[pools.chat.backends]]",
        );
    let file = etc.join("berth.toml");
    std::fs::write(&file, &text).expect("write");
    let config = Config::load(&file).unwrap_or_else(|e| panic!("{e}"));
    let tls = config.listeners[0].tls.as_ref().expect("tls");
    assert_eq!(tls.cert, etc.join("tls/site.crt"));
    let Affinity::Cookie(cookie) = &config.pools["chat"].affinity else {
        panic!("cookie affinity");
    };
    // The trailing newline is not part of the secret.
    assert_eq!(cookie.secret, "k".repeat(40).into_bytes());

    // The same text from a string resolves against the working directory,
    // where these files are not; the error names the path as written.
    let rendered = errors(&text);
    assert!(
        rendered.starts_with(
            "berth.toml:4: listeners[0].tls.cert: tls/site.crt: cannot read certificate file: "
        ),
        "{rendered}"
    );
    // A missing file is reported with the path it was resolved to.
    std::fs::remove_file(etc.join("secret")).expect("rm");
    let err = Config::load(&file).expect_err("secret gone").to_string();
    let expected = format!(
        "{}:14: pools.chat.cookie.secret_file: {}: cannot read secret file: ",
        file.display(),
        etc.join("secret").display()
    );
    assert!(err.starts_with(&expected), "{err}");
}

#[test]
fn only_regular_files_of_bounded_size_are_read() {
    let dir = tempfile::tempdir().expect("tempdir");
    let fifo = dir.path().join("fifo");
    mkfifo(&fifo);
    let big = dir.path().join("big");
    std::fs::write(&big, vec![b'x'; 64 * 1024 + 1]).expect("write");
    let largest = dir.path().join("largest");
    std::fs::write(&largest, vec![b'x'; 64 * 1024]).expect("write");
    let path = |p: &Path| p.display().to_string();
    let cases = [
        (
            path(&fifo),
            "secret file must be a regular file, not a FIFO".to_string(),
        ),
        (
            "/dev/zero".to_string(),
            "secret file must be a regular file, not a character device".to_string(),
        ),
        (
            path(dir.path()),
            "secret file must be a regular file, not a directory".to_string(),
        ),
        (
            path(&big),
            "secret file is larger than 64 KiB (the limit for this key)".to_string(),
        ),
    ];
    for (file, message) in cases {
        let started = std::time::Instant::now();
        assert_eq!(
            errors(&with_secret_file(&file)),
            format!("berth.toml:12: pools.chat.cookie.secret_file: {file}: {message}")
        );
        assert!(started.elapsed() < Duration::from_secs(5), "{file}");
    }
    load(&with_secret_file(&path(&largest)));

    // PEM files: the same rules, with a 1 MiB cap; both keys are checked.
    let huge = dir.path().join("huge.pem");
    std::fs::write(&huge, vec![b'-'; 1024 * 1024 + 1]).expect("write");
    assert_eq!(
        errors(&with_tls(Path::new("/dev/zero"), &fifo)),
        format!(
            "berth.toml:4: listeners[0].tls.cert: /dev/zero: certificate file must be a regular \
             file, not a character device\n\
             berth.toml:4: listeners[0].tls.key: {}: private key must be a regular file, not a FIFO",
            fifo.display()
        )
    );
    let (cert, _) = write_cert(dir.path(), "ok");
    assert_eq!(
        errors(&with_tls(&cert, &huge)),
        format!(
            "berth.toml:4: listeners[0].tls.key: {}: private key is larger than 1 MiB (the limit \
             for this key)",
            huge.display()
        )
    );
}

#[tokio::test]
async fn load_async_gives_up_on_a_stalled_file() {
    let dir = tempfile::tempdir().expect("tempdir");
    let good = dir.path().join("good.toml");
    std::fs::write(&good, BASE).expect("write");
    let config = Config::load_async(good.clone()).await.expect("valid");
    assert_eq!(config.source.as_deref(), Some(good.as_path()));

    // A FIFO as the config file itself blocks its open until a writer
    // comes; the async load gives up without blocking the runtime.
    let fifo = dir.path().join("berth.toml");
    mkfifo(&fifo);
    let err = Config::load_within(fifo.clone(), Duration::from_millis(200))
        .await
        .expect_err("stalled");
    assert_eq!(
        err.to_string(),
        format!(
            "{}: cannot read config file: reading the config and the files it names took longer than 200ms",
            fifo.display()
        )
    );
    // Let the blocked thread finish, so that the runtime can shut down.
    drop(
        std::fs::OpenOptions::new()
            .write(true)
            .open(&fifo)
            .expect("open writer"),
    );
}

#[test]
fn shipped_configs_validate() {
    for name in ["berth.toml", "cookie-affinity.toml", "hash-affinity.toml"] {
        shipped(name);
    }
    let Affinity::Cookie(cookie) = &shipped("cookie-affinity.toml").pools["chat"].affinity else {
        panic!("cookie affinity");
    };
    assert!(cookie.secret.len() >= 32);
}

// ---- pool limits ----

#[test]
fn sizes_are_bytes_or_a_number_with_a_unit() {
    let key = rules::SizeKey {
        default: None,
        min: 1,
        max: u64::MAX,
    };
    let text = |t: &str| rules::size(&FileSize::Text(t.to_string()), &key);
    let cases = [
        ("1", 1),
        ("1024", 1024),
        ("512 B", 512),
        ("64 KiB", 64 * 1024),
        ("64KiB", 64 * 1024),
        ("1 MiB", 1 << 20),
        ("1 mib", 1 << 20),
        ("2 GiB", 2 << 30),
        ("1 TiB", 1 << 40),
        ("500 kB", 500_000),
        ("3 MB", 3_000_000),
        ("1 GB", 1_000_000_000),
        (" 7 KiB ", 7 * 1024),
    ];
    for (raw, want) in cases {
        assert_eq!(text(raw), Ok(want), "{raw:?}");
    }
    assert_eq!(rules::size(&FileSize::Bytes(4096), &key), Ok(4096));
    for raw in [
        "",
        "KiB",
        "1.5 MiB",
        "-1",
        "1 KB/s",
        "1 kiB extra",
        "1e6",
        "18446744073709551615 KiB",
    ] {
        let err = text(raw).unwrap_err();
        assert!(err.starts_with("invalid size"), "{raw:?}: {err}");
    }
    let err = rules::size(&FileSize::Bytes(-1), &key).unwrap_err();
    assert!(err.starts_with("invalid size -1"), "{err}");
    assert_eq!(rules::human_size(512), "512 B");
    assert_eq!(rules::human_size(1536), "1536 B");
    assert_eq!(rules::human_size(64 * 1024), "64 KiB");
    assert_eq!(rules::human_size(1 << 30), "1 GiB");
}

#[test]
fn pool_limits_are_parsed() {
    let pool = |extra: &str| {
        load(&BASE.replace("[pools.chat]", &format!("[pools.chat]\n{extra}"))).pools["chat"]
            .limits
            .clone()
    };
    assert_eq!(pool(""), PoolLimits::default());
    assert_eq!(
        PoolLimits::default().retry_after_max,
        rules::RETRY_AFTER_MAX.default.unwrap()
    );
    let limits = pool(
        "max_message_size = \"1 MiB\"\nmax_upgrades_per_second = 500\nupgrade_burst = 1000\n\
         retry_after_max = \"10s\"\nsend_timeout = \"30s\"",
    );
    assert_eq!(
        limits,
        PoolLimits {
            max_message_size: Some(1 << 20),
            upgrade_rate: Some(UpgradeRate {
                per_second: 500,
                burst: 1000
            }),
            retry_after_max: Duration::from_secs(10),
            send_timeout: Some(Duration::from_secs(30)),
        }
    );
    // The burst defaults to the rate; a size may be a plain integer;
    // "0s" turns send_timeout off.
    let limits =
        pool("max_message_size = 65536\nmax_upgrades_per_second = 20\nsend_timeout = \"0s\"");
    assert_eq!(limits.max_message_size, Some(65536));
    assert_eq!(
        limits.upgrade_rate,
        Some(UpgradeRate {
            per_second: 20,
            burst: 20
        })
    );
    assert_eq!(limits.send_timeout, None);
}

#[test]
fn pool_limits_outside_their_range_are_rejected() {
    let pool =
        |extra: &str| errors(&BASE.replace("[pools.chat]", &format!("[pools.chat]\n{extra}")));
    let min = rules::human_size(rules::MAX_MESSAGE_SIZE.min);
    let max = rules::human_size(rules::MAX_MESSAGE_SIZE.max);
    assert_eq!((min.as_str(), max.as_str()), ("1 KiB", "1 GiB"));
    for (raw, shown) in [
        ("\"2 GiB\"", "\"2 GiB\""),
        ("1023", "1023"),
        ("0", "0"),
        ("\"1023 B\"", "\"1023 B\""),
    ] {
        assert_eq!(
            pool(&format!("max_message_size = {raw}")),
            format!(
                "berth.toml:9: pools.chat.max_message_size: size must be between 1 KiB and 1 GiB, \
                 got {shown} (omit it for no limit)"
            )
        );
    }
    assert_eq!(
        pool("max_message_size = \"12 parsecs\""),
        "berth.toml:9: pools.chat.max_message_size: invalid size \"12 parsecs\" (use a number \
         of bytes, or e.g. \"64 KiB\", \"1 MiB\") (omit it for no limit)"
    );
    assert_eq!(
        pool("max_message_size = true"),
        "berth.toml:9: pools.chat.max_message_size: invalid type: boolean `true`, expected a \
         size: an integer number of bytes or a string such as \"64 KiB\""
    );
    assert_eq!(
        pool("upgrade_burst = 10"),
        "berth.toml:9: pools.chat.upgrade_burst: upgrade_burst needs max_upgrades_per_second \
         (the rate its bucket refills at)"
    );
    assert_eq!(
        pool("max_upgrades_per_second = 0"),
        "berth.toml:9: pools.chat.max_upgrades_per_second: max_upgrades_per_second must be \
         between 1 and 1000000, got 0 (omit it for no limit)"
    );
    assert_eq!(
        pool("retry_after_max = \"500ms\""),
        "berth.toml:9: pools.chat.retry_after_max: duration must be between 1s and 1h, got \"500ms\""
    );
    assert_eq!(
        pool("send_timeout = \"1ns\""),
        "berth.toml:9: pools.chat.send_timeout: duration must be \"0s\" (off) or between 100ms \
         and 1h, got \"1ns\""
    );
}

// ---- listener limits ----

#[test]
fn size_messages_show_the_value_as_written() {
    use super::file::FileSize::{Bytes, Text};
    let key = rules::SizeKey {
        default: None,
        min: 1,
        max: 8 << 30,
    };
    let text = |t: &str| Text(t.to_string());
    let good = [
        (Bytes(1), 1),
        (Bytes(65536), 65536),
        (text("512"), 512),
        (text("512 B"), 512),
        (text("64 KiB"), 64 << 10),
        (text("64KiB"), 64 << 10),
        (text("64 kib"), 64 << 10),
        (text(" 1 MiB "), 1 << 20),
        (text("2 GiB"), 2 << 30),
        (text("32 KB"), 32_000),
        (text("1 MB"), 1_000_000),
        (text("1 GB"), 1_000_000_000),
    ];
    for (raw, n) in good {
        assert_eq!(rules::size(&raw, &key), Ok(n), "{raw:?}");
    }
    let invalid = |shown: &str| {
        format!("invalid size {shown} (use a number of bytes, or e.g. \"64 KiB\", \"1 MiB\")")
    };
    let bad = [
        (Bytes(-1), invalid("-1")),
        (text(""), invalid("\"\"")),
        (text("KiB"), invalid("\"KiB\"")),
        (text("1.5 KiB"), invalid("\"1.5 KiB\"")),
        (text("64 kbit"), invalid("\"64 kbit\"")),
        (text("-3 KiB"), invalid("\"-3 KiB\"")),
        (
            text("99999999999999999999 B"),
            invalid("\"99999999999999999999 B\""),
        ),
        (text("17179869184 GiB"), invalid("\"17179869184 GiB\"")),
        (Bytes(0), "size must be between 1 B and 8 GiB, got 0".into()),
        (
            text("9 GiB"),
            "size must be between 1 B and 8 GiB, got \"9 GiB\"".into(),
        ),
    ];
    for (raw, message) in bad {
        assert_eq!(rules::size(&raw, &key), Err(message), "{raw:?}");
    }
    assert_eq!(rules::human_size(0), "0 B");
    assert_eq!(rules::human_size(1000), "1000 B");
    assert_eq!(rules::human_size(64 << 10), "64 KiB");
    assert_eq!(rules::human_size(3 << 20), "3 MiB");
}

#[test]
fn listener_limits_load_with_their_defaults() {
    let config = load(BASE);
    let l = &config.listeners[0];
    assert_eq!(
        (
            l.max_connections,
            l.max_connections_per_ip,
            l.max_header_bytes
        ),
        (None, None, 64 * 1024)
    );
    let text = BASE.replace(
        "bind = \"127.0.0.1:8080\"",
        "bind = \"127.0.0.1:8080\"\nmax_connections = 50000\nmax_connections_per_ip = 200\nmax_header_bytes = \"32 KiB\"",
    );
    let config = load(&text);
    let l = &config.listeners[0];
    assert_eq!(
        (
            l.max_connections,
            l.max_connections_per_ip,
            l.max_header_bytes
        ),
        (Some(50_000), Some(200), 32 * 1024)
    );
    let config = load(&BASE.replace(
        "bind = \"127.0.0.1:8080\"",
        "bind = \"127.0.0.1:8080\"\nmax_header_bytes = 1024",
    ));
    assert_eq!(config.listeners[0].max_header_bytes, 1024);
}

#[test]
fn listener_limits_out_of_range_are_rejected() {
    let listener = |extra: &str| {
        BASE.replace(
            "bind = \"127.0.0.1:8080\"",
            &format!("bind = \"127.0.0.1:8080\"\n{extra}"),
        )
    };
    let cases = [
        (
            "max_header_bytes = \"2 MiB\"",
            "berth.toml:4: listeners[0].max_header_bytes: size must be between 1 KiB and 1 MiB, got \"2 MiB\"",
        ),
        (
            "max_header_bytes = 1023",
            "berth.toml:4: listeners[0].max_header_bytes: size must be between 1 KiB and 1 MiB, got 1023",
        ),
        (
            "max_header_bytes = \"lots\"",
            "berth.toml:4: listeners[0].max_header_bytes: invalid size \"lots\" (use a number of bytes, or e.g. \"64 KiB\", \"1 MiB\")",
        ),
        (
            "max_header_bytes = true",
            "berth.toml:4: listeners[0].max_header_bytes: invalid type: boolean `true`, expected a size: an integer number of bytes or a string such as \"64 KiB\"",
        ),
        (
            "max_connections = 0",
            "berth.toml:4: listeners[0].max_connections: max_connections must be between 1 and 1000000, got 0 (omit it for no cap)",
        ),
        (
            "max_connections_per_ip = -5",
            "berth.toml:4: listeners[0].max_connections_per_ip: max_connections_per_ip must be between 1 and 1000000, got -5 (omit it for no cap)",
        ),
        (
            "max_connections_per_ip = \"10\"",
            "berth.toml:4: listeners[0].max_connections_per_ip: invalid type: string \"10\", expected i64",
        ),
    ];
    for (line, expected) in cases {
        assert_eq!(errors(&listener(line)), expected, "{line}");
    }
}

mod auth;
mod docs;
mod fleet;

/// Found by the `config` fuzz target: for some syntax errors (a carriage
/// return without a newline) the TOML parser's message is empty, which
/// rendered as `berth.toml:1: ` and said nothing. Every problem has one.
#[test]
fn every_syntax_error_has_a_message() {
    for text in ["\r}", "}", "\r", "a = 1\r}", "=", "[a]\n]]"] {
        let problems = problems(text);
        assert_eq!(problems.len(), 1, "{text:?}");
        assert!(!problems[0].message.is_empty(), "{text:?}: {problems:?}");
    }
    assert_eq!(errors("\r}"), "berth.toml:1: unexpected character '\\r'");
    assert_eq!(
        errors("a = 1\n\r"),
        "berth.toml:2: unexpected character '\\r'"
    );
}
