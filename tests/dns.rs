//! DNS discovery against a real (small) DNS server on 127.0.0.1 whose
//! answers the tests change: a new address joins with slow start, a
//! vanished one is drained with 1012, and a failed, silent or empty
//! answer keeps the last known set. Backends listen on 127.0.0.1,
//! 127.0.0.2 and 127.0.0.3 on one port, as pods behind a headless Service.

mod support;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use support::dns::{DnsServer, Mode};
use support::*;

/// Backends "one", "two", "three" on 127.0.0.1-3, all on one port.
async fn backends() -> (u16, Vec<WsBackend>) {
    // A port free on 127.0.0.1 is, in practice, free on the others too;
    // try a few in case it is not.
    for _ in 0..20 {
        let one = WsBackend::start_at("one", "127.0.0.1:0".parse().unwrap()).await;
        let port = one.addr.port();
        let others = ["127.0.0.2", "127.0.0.3"].map(|ip| format!("{ip}:{port}"));
        let two = tokio::net::TcpListener::bind(&others[0]).await;
        let three = tokio::net::TcpListener::bind(&others[1]).await;
        if let (Ok(two), Ok(three)) = (two, three) {
            drop((two, three));
            let two = WsBackend::start_at("two", others[0].parse().unwrap()).await;
            let three = WsBackend::start_at("three", others[1].parse().unwrap()).await;
            return (port, vec![one, two, three]);
        }
    }
    panic!("no port free on 127.0.0.1-3");
}

fn config(dns: SocketAddr, port: u16, extra: &str) -> String {
    format!(
        r#"
shutdown_window = "500ms"

[[listeners]]
name = "public"
bind = "127.0.0.1:0"

[admin]
bind = "127.0.0.1:0"

[[routes]]
pool = "main"

[pools.main]
balance = "round_robin"
connect_timeout = "1s"
drain_window = "500ms"
close_timeout = "1s"
{extra}

[pools.main.dns]
name = "chat.test"
port = {port}
interval = "200ms"
resolver = "{dns}"
"#
    )
}

/// Pool main's backends as `/admin/pools` lists them: (id, slow_start).
async fn members(admin: SocketAddr) -> Vec<(String, serde_json::Value)> {
    let (_, body) = http_get(admin, "/admin/pools").await;
    let doc: serde_json::Value = serde_json::from_str(&body).unwrap();
    doc["pools"]["main"]["backends"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| {
            assert_eq!(b["discovered"], true, "{b}");
            (
                b["id"].as_str().unwrap().to_string(),
                b["slow_start"].clone(),
            )
        })
        .collect()
}

async fn ids(admin: SocketAddr) -> Vec<String> {
    members(admin).await.into_iter().map(|m| m.0).collect()
}

/// Waits (up to 5 s) until the pool's backends are `want`.
async fn wait_for(admin: SocketAddr, want: &[String]) {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let now = ids(admin).await;
        if now == want {
            return;
        }
        assert!(Instant::now() < deadline, "backends {now:?}, want {want:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn lookups(admin: SocketAddr, result: &str) -> f64 {
    let (_, text) = http_get(admin, "/metrics").await;
    let series = format!("berth_dns_lookups_total{{pool=\"main\",result=\"{result}\"}}");
    text.lines()
        .find_map(|l| l.strip_prefix(&series)?.trim().parse().ok())
        .unwrap_or(0.0)
}

#[tokio::test]
async fn discovered_addresses_join_with_slow_start_and_leave_with_1012() {
    let (port, _backends) = backends().await;
    let dns = DnsServer::start().await;
    dns.set("chat.test", &["127.0.0.1"]);
    let proxy = Proxy::start(&config(dns.addr, port, "slow_start = \"2s\"")).await;
    let admin = proxy.admin.unwrap();
    let id = |ip: &str| format!("dns-{ip}-{port}");
    // The first answer is the pool's set: at full weight.
    wait_for(admin, &[id("127.0.0.1")]).await;
    assert_eq!(members(admin).await[0].1, serde_json::Value::Null);
    let mut first = Vec::new();
    for _ in 0..4 {
        let mut ws = ws_connect(proxy.addr, false, "/").await;
        assert_eq!(whoami(&mut ws).await, "one");
        first.push(ws);
    }
    // A new address joins, ramping up.
    dns.set("chat.test", &["127.0.0.1", "127.0.0.2"]);
    wait_for(admin, &[id("127.0.0.1"), id("127.0.0.2")]).await;
    let factor = members(admin).await[1].1.as_f64().expect("ramping");
    assert!((0.1..0.6).contains(&factor), "{factor}");
    tokio::time::sleep(Duration::from_millis(2100)).await;
    assert_eq!(members(admin).await[1].1, serde_json::Value::Null);
    let mut seen = Vec::new();
    for _ in 0..4 {
        let mut ws = ws_connect(proxy.addr, false, "/").await;
        seen.push(whoami(&mut ws).await);
    }
    assert!(seen.iter().any(|s| s == "two"), "{seen:?}");
    // 127.0.0.1 vanishes: drained with 1012 over drain_window, as if a
    // reload had removed it.
    dns.set("chat.test", &["127.0.0.2"]);
    for ws in first.iter_mut() {
        let code = tokio::time::timeout(Duration::from_secs(3), next_close(ws)).await;
        assert_eq!(code.unwrap(), Some(1012));
    }
    wait_for(admin, &[id("127.0.0.2")]).await;
    let mut ws = ws_connect(proxy.addr, false, "/").await;
    assert_eq!(whoami(&mut ws).await, "two");
    assert!(lookups(admin, "success").await >= 3.0);
    proxy.shutdown().await;
}

#[tokio::test]
async fn a_dns_outage_or_an_empty_answer_keeps_the_last_known_set() {
    let (port, _backends) = backends().await;
    let dns = DnsServer::start().await;
    dns.set("chat.test", &["127.0.0.2", "127.0.0.3"]);
    let proxy = Proxy::start(&config(dns.addr, port, "")).await;
    let admin = proxy.admin.unwrap();
    let want = [
        format!("dns-127.0.0.2-{port}"),
        format!("dns-127.0.0.3-{port}"),
    ];
    wait_for(admin, &want).await;
    let mut held = ws_connect(proxy.addr, false, "/").await;
    let held_on = whoami(&mut held).await;
    for (mode, result) in [(Mode::Fail, "failure"), (Mode::Silent, "failure")] {
        dns.mode(mode);
        let before = lookups(admin, result).await;
        let deadline = Instant::now() + Duration::from_secs(8);
        while lookups(admin, result).await < before + 2.0 {
            assert!(Instant::now() < deadline, "no {result} counted in {mode:?}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert_eq!(ids(admin).await, want, "{mode:?}");
    }
    // The name answers again, with no address: still kept.
    dns.mode(Mode::Answer);
    dns.set("chat.test", &[]);
    let deadline = Instant::now() + Duration::from_secs(5);
    while lookups(admin, "empty").await < 2.0 {
        assert!(Instant::now() < deadline, "no empty lookup counted");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(ids(admin).await, want);
    // Nothing was drained: the held client is served as before, and new
    // ones reach both backends.
    assert_eq!(whoami(&mut held).await, held_on);
    let mut seen = Vec::new();
    for _ in 0..4 {
        let mut ws = ws_connect(proxy.addr, false, "/").await;
        seen.push(whoami(&mut ws).await);
    }
    seen.sort();
    seen.dedup();
    assert_eq!(seen, ["three", "two"]);
    // And an answer with addresses is applied again.
    dns.set("chat.test", &["127.0.0.3"]);
    wait_for(admin, &[format!("dns-127.0.0.3-{port}")]).await;
    proxy.shutdown().await;
}

#[tokio::test]
async fn a_reload_keeps_the_discovered_backends_and_their_connections() {
    let (port, _backends) = backends().await;
    let dns = DnsServer::start().await;
    dns.set("chat.test", &["127.0.0.1"]);
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("berth.toml");
    std::fs::write(&path, config(dns.addr, port, "")).unwrap();
    let proxy = Proxy::start_file(&path).await;
    let admin = proxy.admin.unwrap();
    wait_for(admin, &[format!("dns-127.0.0.1-{port}")]).await;
    let mut ws = ws_connect(proxy.addr, false, "/").await;
    assert_eq!(whoami(&mut ws).await, "one");
    // The DNS server goes quiet, then the config changes: the pool keeps
    // what it found.
    dns.mode(Mode::Fail);
    std::fs::write(&path, config(dns.addr, port, "idle_timeout = \"1h\"")).unwrap();
    let (status, body) = admin_request(admin, "POST", "/admin/reload", None).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(ids(admin).await, [format!("dns-127.0.0.1-{port}")]);
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert_eq!(ids(admin).await, [format!("dns-127.0.0.1-{port}")]);
    assert_eq!(whoami(&mut ws).await, "one");
    proxy.shutdown().await;
}

#[tokio::test]
async fn berth_check_never_asks_the_dns_server() {
    let dns = DnsServer::start().await;
    dns.set("chat.test", &["127.0.0.1"]);
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("berth.toml");
    std::fs::write(&path, config(dns.addr, 9000, "")).unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_berth"))
        .args(["check", "--config", path.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(dns.queries(), 0);
}

#[tokio::test]
async fn a_short_ttl_brings_the_next_lookup_forward() {
    let (port, _backends) = backends().await;
    let dns = DnsServer::start().await;
    dns.set("chat.test", &["127.0.0.1"]);
    dns.set_ttl(1);
    let text = config(dns.addr, port, "").replace("interval = \"200ms\"", "interval = \"1h\"");
    let proxy = Proxy::start(&text).await;
    let admin = proxy.admin.unwrap();
    wait_for(admin, &[format!("dns-127.0.0.1-{port}")]).await;
    // Every second (the TTL), not every hour (the interval).
    let before = lookups(admin, "success").await;
    tokio::time::sleep(Duration::from_millis(2600)).await;
    let after = lookups(admin, "success").await;
    assert!(
        (2.0..=4.0).contains(&(after - before)),
        "{before} -> {after}"
    );
    proxy.shutdown().await;
}
