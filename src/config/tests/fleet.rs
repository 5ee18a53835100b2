//! The fleet keys: `slow_start`, `max_connection_age`, `[pools.NAME.rebalance]`,
//! `[pools.NAME.dns]` and a backend's `drain`; text in, values or exact
//! problems out.

use std::net::IpAddr;
use std::time::Duration;

use super::{errors, load, BASE};
use crate::config::{DnsConfig, RebalanceConfig};

/// `BASE` with `text` (TOML) added to pool chat.
fn with(text: &str) -> String {
    BASE.replace("[pools.chat]", &format!("[pools.chat]\n{text}\n"))
}

#[test]
fn every_key_is_read() {
    let config = load(
        &with(
            r#"slow_start = "60s"
max_connection_age = "6h"

[pools.chat.rebalance]
threshold = 1.5
window = "2m"

[pools.chat.dns]
name = "chat.internal."
port = 9000
interval = "30s"
resolver = "127.0.0.1:5353"
"#,
        )
        .replace(
            "address = \"127.0.0.1:9001\"",
            "address = \"127.0.0.1:9001\"\ndrain = true",
        ),
    );
    let chat = &config.pools["chat"];
    assert_eq!(chat.slow_start, Some(Duration::from_secs(60)));
    assert_eq!(chat.max_connection_age, Some(Duration::from_secs(6 * 3600)));
    assert_eq!(
        chat.rebalance,
        Some(RebalanceConfig {
            threshold: 1.5,
            window: Duration::from_secs(120)
        })
    );
    assert_eq!(
        chat.dns,
        Some(DnsConfig {
            name: "chat.internal.".into(),
            port: 9000,
            interval: Duration::from_secs(30),
            resolver: Some("127.0.0.1:5353".parse().unwrap()),
        })
    );
    assert!(chat.backends[0].drain);
}

#[test]
fn defaults_leave_everything_off() {
    let chat = &load(BASE).pools["chat"];
    assert_eq!(chat.slow_start, None);
    assert_eq!(chat.max_connection_age, None);
    assert_eq!(chat.rebalance, None);
    assert_eq!(chat.dns, None);
    assert!(!chat.backends[0].drain);
    // An empty table turns the feature on with its defaults.
    let config = load(&with("[pools.chat.rebalance]\n"));
    assert_eq!(
        config.pools["chat"].rebalance,
        Some(RebalanceConfig {
            threshold: 1.2,
            window: Duration::from_secs(300)
        })
    );
    let config = load(&with("[pools.chat.dns]\nname = \"chat\"\nport = 1"));
    let dns = config.pools["chat"].dns.clone().unwrap();
    assert_eq!(
        (dns.interval, dns.resolver),
        (Duration::from_secs(10), None)
    );
    // "0s" is off, as for every optional duration.
    let config = load(&with("slow_start = \"0s\"\nmax_connection_age = \"0s\""));
    assert_eq!(config.pools["chat"].slow_start, None);
    assert_eq!(config.pools["chat"].max_connection_age, None);
}

#[test]
fn a_pool_may_have_only_discovered_backends() {
    let text = "[[listeners]]\nname = \"public\"\nbind = \"127.0.0.1:8080\"\n\n\
                [[routes]]\npool = \"chat\"\n\n\
                [pools.chat.dns]\nname = \"chat.internal\"\nport = 9000\n";
    let config = load(text);
    assert!(config.pools["chat"].backends.is_empty());
    // Without either, the old message stands.
    assert!(errors(&text.replace(
        "[pools.chat.dns]\nname = \"chat.internal\"\nport = 9000\n",
        "[pools.chat]\n"
    ))
    .contains("pools.chat.backends: pool \"chat\" has no backends"));
}

#[test]
fn bad_values_are_reported_at_their_keys() {
    assert_eq!(
        errors(&with("[pools.chat.rebalance]\nthreshold = 1.0")),
        "berth.toml:10: pools.chat.rebalance.threshold: threshold must be a number \
         greater than 1.0 and at most 10 (e.g. 1.2), got 1"
    );
    for bad in ["0.5", "10.5", "-2", "nan", "inf"] {
        assert!(
            errors(&with(&format!("[pools.chat.rebalance]\nthreshold = {bad}")))
                .contains("rebalance.threshold: threshold must be a number greater than 1.0"),
            "{bad}"
        );
    }
    load(&with("[pools.chat.rebalance]\nthreshold = 10"));
    load(&with("[pools.chat.rebalance]\nthreshold = 2"));
    assert_eq!(
        errors(&with("[pools.chat.dns]\nport = 9000")),
        "berth.toml:9: pools.chat.dns.name: required key is missing (add e.g. name = \"chat.internal\")"
    );
    assert_eq!(
        errors(&with("[pools.chat.dns]\nname = \"chat.internal\"")),
        "berth.toml:9: pools.chat.dns.port: required key is missing (add e.g. port = 9000)"
    );
    for bad in [
        "",
        "chat..internal",
        "chat internal",
        "-",
        &"a".repeat(64),
        "x:1",
    ] {
        let text = with(&format!("[pools.chat.dns]\nname = {bad:?}\nport = 9000"));
        assert!(
            errors(&text).contains(&format!(
                "berth.toml:10: pools.chat.dns.name: invalid DNS name {bad:?}"
            )),
            "{bad:?}: {}",
            errors(&text)
        );
    }
    for bad in ["127.0.0.1", "127.0.0.1:0", "dns.example:53", "[::1]"] {
        let text = with(&format!(
            "[pools.chat.dns]\nname = \"chat\"\nport = 9000\nresolver = {bad:?}"
        ));
        assert_eq!(
            errors(&text),
            format!(
                "berth.toml:12: pools.chat.dns.resolver: invalid resolver {bad:?} \
                 (expected IP:port, e.g. \"10.0.0.2:53\" or \"[fd00::2]:53\")"
            )
        );
    }
    load(&with(
        "[pools.chat.dns]\nname = \"chat\"\nport = 9000\nresolver = \"[::1]:53\"",
    ));
    assert!(errors(&with(
        "[pools.chat.dns]\nname = \"chat\"\nport = 9000\nttl = \"5s\""
    ))
    .contains("pools.chat.dns.ttl: unknown field `ttl`"));
    assert!(
        errors(&BASE.replace("127.0.0.1:9001\"", "127.0.0.1:9001\"\ndrain = \"yes\"")).contains(
            "pools.chat.backends[0].drain: invalid type: string \"yes\", expected a boolean"
        )
    );
}

#[test]
fn discovered_ids_are_kept_for_discovery() {
    let dns = "[pools.chat.dns]\nname = \"chat\"\nport = 9000";
    let text = with(dns).replace("id = \"chat-1\"", "id = \"dns-10.0.0.1-9000\"");
    assert_eq!(
        errors(&text),
        "berth.toml:15: pools.chat.backends[0].id: backend id \"dns-10.0.0.1-9000\" starts with \
         \"dns-\", which names the backends [pools.chat.dns] discovers (choose another id)"
    );
    // Without discovery the id is anyone's.
    load(&BASE.replace("id = \"chat-1\"", "id = \"dns-1\""));
}

#[test]
fn discovered_backends_are_named_after_their_address() {
    let dns = DnsConfig {
        name: "chat".into(),
        port: 9000,
        interval: Duration::from_secs(10),
        resolver: None,
    };
    let cases = [
        ("10.0.0.7", "dns-10.0.0.7-9000", "10.0.0.7:9000"),
        ("fd00::7", "dns-fd00--7-9000", "[fd00::7]:9000"),
        (
            "2001:db8:0:0:1:0:0:1",
            "dns-2001-db8--1-0-0-1-9000",
            "[2001:db8::1:0:0:1]:9000",
        ),
        // A v4-mapped v6 address is the v4 address.
        ("::ffff:10.0.0.7", "dns-10.0.0.7-9000", "10.0.0.7:9000"),
    ];
    for (ip, id, address) in cases {
        let b = dns.backend(ip.parse::<IpAddr>().unwrap());
        assert_eq!((b.id.as_str(), b.address.as_str()), (id, address), "{ip}");
        assert_eq!((b.weight, b.max_connections, b.drain), (1, None, false));
        // Every derived id is a valid backend id.
        assert!(super::rules::backend_id(&b.id).is_ok(), "{}", b.id);
    }
}

/// `BASE`'s listener with `text` (TOML) added.
fn listener_with(text: &str) -> String {
    BASE.replace(
        "bind = \"127.0.0.1:8080\"",
        &format!("bind = \"127.0.0.1:8080\"\n{text}"),
    )
}

#[test]
fn proxy_protocol_keys_are_read() {
    use crate::config::{ProxyProtocolConfig, ProxyVersions};
    let config = load(&listener_with(
        "proxy_protocol = \"v2\"\nproxy_protocol_from = [\"10.1.2.3/8\", \"::1\"]\nreuse_port = true",
    ));
    let l = &config.listeners[0];
    assert_eq!(
        l.proxy_protocol,
        Some(ProxyProtocolConfig {
            versions: ProxyVersions::V2,
            from: vec!["10.0.0.0/8".parse().unwrap(), "::1/128".parse().unwrap()],
        })
    );
    assert!(l.reuse_port);
    let plain = load(BASE);
    assert_eq!(plain.listeners[0].proxy_protocol, None);
    assert!(!plain.listeners[0].reuse_port);
    assert!(!plain.pools["chat"].send_proxy_protocol);
    assert!(load(&with("send_proxy_protocol = \"v2\"")).pools["chat"].send_proxy_protocol);
}

#[test]
fn proxy_protocol_problems() {
    let cases = [
        (
            "proxy_protocol = \"v3\"\nproxy_protocol_from = [\"10.0.0.0/8\"]",
            "berth.toml:4: listeners[0].proxy_protocol: proxy_protocol must be \"v1\", \"v2\" or \"any\" (leave it out for none), got \"v3\"",
        ),
        (
            "proxy_protocol = \"any\"",
            "berth.toml:4: listeners[0].proxy_protocol: proxy_protocol needs proxy_protocol_from: the addresses of the balancers allowed to send the header (e.g. proxy_protocol_from = [\"10.0.0.0/8\"])",
        ),
        (
            "proxy_protocol_from = [\"10.0.0.0/8\"]",
            "berth.toml:4: listeners[0].proxy_protocol_from: proxy_protocol_from needs proxy_protocol (\"v1\", \"v2\" or \"any\")",
        ),
        (
            "proxy_protocol = \"v1\"\nproxy_protocol_from = []",
            "berth.toml:5: listeners[0].proxy_protocol_from: proxy_protocol_from is empty: list the balancers allowed to send the PROXY header (e.g. [\"10.0.0.0/8\"])",
        ),
        (
            "proxy_protocol = \"v1\"\nproxy_protocol_from = [\"10.0.0.0/33\"]",
            "berth.toml:5: listeners[0].proxy_protocol_from[0]: invalid CIDR \"10.0.0.0/33\" (expected e.g. \"10.0.0.0/8\" or \"::1/128\")",
        ),
    ];
    for (text, want) in cases {
        assert_eq!(errors(&listener_with(text)), want, "{text}");
    }
    assert_eq!(
        errors(&with("send_proxy_protocol = \"v1\"")),
        "berth.toml:9: pools.chat.send_proxy_protocol: send_proxy_protocol must be \"v2\" (leave it out for none), got \"v1\""
    );
}

#[test]
fn ticket_keys_must_be_whole_keys_in_a_small_regular_file() {
    let dir = tempfile::tempdir().unwrap();
    let tls = |keys: &std::path::Path| {
        BASE.replace(
            "bind = \"127.0.0.1:8080\"",
            &format!(
                "bind = \"127.0.0.1:8080\"\ntls = {{ cert = \"{}/certs/example.crt\", key = \"{}/certs/example.key\", ticket_keys = \"{}\" }}",
                env!("CARGO_MANIFEST_DIR"),
                env!("CARGO_MANIFEST_DIR"),
                keys.display()
            ),
        )
    };
    let good = dir.path().join("good");
    std::fs::write(&good, [7u8; 160]).unwrap();
    let config = load(&tls(&good));
    assert_eq!(
        config.listeners[0]
            .tls
            .as_ref()
            .unwrap()
            .ticket_keys
            .as_deref(),
        Some(good.as_path())
    );
    let short = dir.path().join("short");
    std::fs::write(&short, [7u8; 81]).unwrap();
    assert_eq!(
        errors(&tls(&short)),
        "berth.toml:4: listeners[0].tls.ticket_keys: ticket key file holds 81 bytes; it must hold one or more keys of 80 random bytes each, concatenated (e.g. openssl rand 80 > FILE)"
    );
    let big = dir.path().join("big");
    std::fs::write(&big, vec![7u8; 80 * 60]).unwrap();
    assert!(
        errors(&tls(&big)).contains("is larger than 4 KiB"),
        "{}",
        errors(&tls(&big))
    );
    assert!(errors(&tls(dir.path())).contains("must be a regular file"));
}
