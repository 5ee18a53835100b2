//! Sticky routing end to end: signed-cookie and consistent-hash affinity
//! with several real backends that report their id.

mod support;

use std::collections::HashMap;

use support::*;

const SECRET: &str = "0123456789abcdef0123456789abcdef-test-secret";

fn cookie_pool() -> String {
    format!(
        "affinity = \"cookie\"\n\n[pools.main.cookie]\nsecret = \"{SECRET}\"\nmax_age = \"1h\"\n"
    )
}

/// Connects (optionally with a Cookie header) and returns (backend id,
/// Set-Cookie if any, the Cookie header the backend saw).
async fn connect_with_cookie(
    addr: std::net::SocketAddr,
    tls: bool,
    cookie: Option<&str>,
) -> (String, Option<String>, String) {
    let headers: Vec<(&str, &str)> = cookie.map(|c| vec![("cookie", c)]).unwrap_or_default();
    let (mut ws, resp) = try_ws_connect(addr, tls, "/", &headers).await.unwrap();
    let set_cookie = resp
        .headers()
        .get("set-cookie")
        .map(|v| v.to_str().unwrap().to_string());
    let seen = resp.headers()["x-seen-cookie"]
        .to_str()
        .unwrap()
        .to_string();
    (whoami(&mut ws).await, set_cookie, seen)
}

/// "berth_main=VALUE; Path=/; ..." -> "berth_main=VALUE"
fn cookie_pair(set_cookie: &str) -> String {
    set_cookie.split(';').next().unwrap().trim().to_string()
}

async fn three() -> Vec<WsBackend> {
    let mut v = Vec::new();
    for id in ["b1", "b2", "b3"] {
        v.push(WsBackend::start(id).await);
    }
    v
}

#[tokio::test]
async fn cookie_pins_a_client_across_20_reconnects_and_is_not_forwarded() {
    let backends = three().await;
    let addrs: Vec<_> = backends.iter().map(|b| b.addr).collect();
    let proxy = Proxy::start(&config_for(&addrs, &cookie_pool())).await;
    let tls = proxy.tls_addr.unwrap();
    let (first, set_cookie, _) = connect_with_cookie(tls, true, None).await;
    let set_cookie = set_cookie.expect("the 101 carries Set-Cookie");
    for attr in [
        "HttpOnly",
        "Secure",
        "Path=/",
        "Max-Age=3600",
        "SameSite=Lax",
    ] {
        assert!(
            set_cookie.contains(attr),
            "{attr} missing from {set_cookie}"
        );
    }
    let pin = cookie_pair(&set_cookie);
    assert!(pin.starts_with(&format!("berth_main={first}.")), "{pin}");
    let with_app_cookie = format!("theme=dark; {pin}; session=abc");
    for _ in 0..20 {
        let (id, again, seen) = connect_with_cookie(tls, true, Some(&with_app_cookie)).await;
        assert_eq!(id, first);
        assert!(again.is_none(), "no new cookie while pinned");
        // berth's cookie is stripped; the application's pass untouched.
        assert_eq!(seen, "theme=dark; session=abc");
    }
    // Plain HTTP requests in the pool are pinned too (and get the cookie).
    let (_, plain_cookie, _) = connect_with_cookie(proxy.addr, false, None).await;
    assert!(
        !plain_cookie.unwrap().contains("Secure"),
        "Secure only on TLS listeners"
    );
    let (_, metrics) = admin_request(proxy.admin.unwrap(), "GET", "/metrics", None).await;
    assert!(
        metrics.contains("berth_affinity_total{mode=\"cookie\",pool=\"main\",result=\"hit\"} 20"),
        "{metrics}"
    );
    proxy.shutdown().await;
}

#[tokio::test]
async fn forged_cookies_are_ignored_and_the_client_re_pinned() {
    let backends = three().await;
    let addrs: Vec<_> = backends.iter().map(|b| b.addr).collect();
    let proxy = Proxy::start(&config_for(&addrs, &cookie_pool())).await;
    let (first, set_cookie, _) = connect_with_cookie(proxy.addr, false, None).await;
    let pin = cookie_pair(&set_cookie.unwrap());
    // Point the cookie at another backend without the secret.
    let other = if first == "b1" { "b2" } else { "b1" };
    let forged = pin.replace(&format!("={first}."), &format!("={other}."));
    for bad in [
        forged.as_str(),
        "berth_main=b1",
        "berth_main=",
        "berth_main=garbage!!.AAAA",
    ] {
        let (_, reissued, seen) = connect_with_cookie(proxy.addr, false, Some(bad)).await;
        let reissued = reissued.expect("a forged cookie gets a fresh one");
        assert!(reissued.starts_with("berth_main="));
        assert!(!seen.contains("berth_main"));
    }
    let (_, metrics) = admin_request(proxy.admin.unwrap(), "GET", "/metrics", None).await;
    assert!(
        metrics
            .contains("berth_affinity_total{mode=\"cookie\",pool=\"main\",result=\"invalid\"} 4"),
        "{metrics}"
    );
    proxy.shutdown().await;
}

#[tokio::test]
async fn killed_pinned_backend_rebinds_with_a_new_cookie() {
    let backends = three().await;
    let addrs: Vec<_> = backends.iter().map(|b| b.addr).collect();
    let proxy = Proxy::start(&config_for(&addrs, &cookie_pool())).await;
    let (first, set_cookie, _) = connect_with_cookie(proxy.addr, false, None).await;
    let pin = cookie_pair(&set_cookie.unwrap());
    // Kill the pinned backend: its listener goes away, connects are refused.
    backends
        .iter()
        .find(|b| b.id == first)
        .unwrap()
        .task
        .abort();
    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    let (now, reissued, _) = connect_with_cookie(proxy.addr, false, Some(&pin)).await;
    assert_ne!(now, first);
    let new_pin = cookie_pair(&reissued.expect("rebind sends a new cookie"));
    assert!(
        new_pin.starts_with(&format!("berth_main={now}.")),
        "{new_pin}"
    );
    // The new cookie sticks.
    for _ in 0..3 {
        assert_eq!(
            connect_with_cookie(proxy.addr, false, Some(&new_pin))
                .await
                .0,
            now
        );
    }
    let (_, metrics) = admin_request(proxy.admin.unwrap(), "GET", "/metrics", None).await;
    assert!(
        metrics.contains("berth_affinity_total{mode=\"cookie\",pool=\"main\",result=\"rebind\"} 1"),
        "{metrics}"
    );
    proxy.shutdown().await;
}

#[tokio::test]
async fn two_proxies_with_the_same_config_route_a_cookie_the_same_way() {
    let backends = three().await;
    let addrs: Vec<_> = backends.iter().map(|b| b.addr).collect();
    let config = config_for(&addrs, &cookie_pool());
    let p1 = Proxy::start(&config).await;
    let p2 = Proxy::start(&config).await;
    for _ in 0..6 {
        let (id, set_cookie, _) = connect_with_cookie(p1.addr, false, None).await;
        let pin = cookie_pair(&set_cookie.unwrap());
        let (on_p2, again, _) = connect_with_cookie(p2.addr, false, Some(&pin)).await;
        assert_eq!(on_p2, id);
        assert!(again.is_none());
    }
    p1.shutdown().await;
    p2.shutdown().await;
}

fn hash_pool(key: &str, extra: &str) -> String {
    format!("affinity = \"hash\"\n\n[pools.main.hash]\nkey = \"{key}\"\n{extra}")
}

async fn via_hash(addr: std::net::SocketAddr, path: &str, headers: &[(&str, &str)]) -> String {
    let (mut ws, _) = try_ws_connect(addr, false, path, headers).await.unwrap();
    whoami(&mut ws).await
}

/// Builds request `i` of a hash test: (path, headers).
type KeyedRequest = fn(usize) -> (String, Vec<(String, String)>);

#[tokio::test]
async fn hash_routes_by_each_key_kind() {
    let backends = three().await;
    let addrs: Vec<_> = backends.iter().map(|b| b.addr).collect();
    let cases: &[(&str, KeyedRequest)] = &[
        ("header:X-User-Id", |i| {
            ("/".into(), vec![("x-user-id".into(), format!("user-{i}"))])
        }),
        ("cookie:session", |i| {
            (
                "/".into(),
                vec![("cookie".into(), format!("a=1; session=s{i}"))],
            )
        }),
        ("query:room", |i| (format!("/chat?room=r{i}&x=1"), vec![])),
    ];
    for (key, make) in cases {
        let proxy = Proxy::start(&config_for(&addrs, &hash_pool(key, ""))).await;
        let mut placement = HashMap::new();
        for i in 0..12 {
            let (path, headers) = make(i);
            let hs: Vec<(&str, &str)> = headers
                .iter()
                .map(|(k, v)| (k.as_str(), v.as_str()))
                .collect();
            let first = via_hash(proxy.addr, &path, &hs).await;
            // Same key, same backend, every time.
            for _ in 0..3 {
                assert_eq!(
                    via_hash(proxy.addr, &path, &hs).await,
                    first,
                    "{key} key {i}"
                );
            }
            placement.insert(i, first);
        }
        let distinct: std::collections::HashSet<_> = placement.values().collect();
        assert!(
            distinct.len() >= 2,
            "{key}: 12 keys all on one backend: {placement:?}"
        );
        proxy.shutdown().await;
    }
    // client_ip: every connection from 127.0.0.1 lands on one backend...
    let proxy = Proxy::start(&config_for(&addrs, &hash_pool("client_ip", ""))).await;
    let first = via_hash(proxy.addr, "/", &[]).await;
    for _ in 0..5 {
        assert_eq!(via_hash(proxy.addr, "/", &[]).await, first);
    }
    proxy.shutdown().await;
    // ...unless 127.0.0.1 is a trusted proxy, then X-Forwarded-For decides.
    let proxy = Proxy::start(&config_for(
        &addrs,
        &hash_pool("client_ip", "trusted_proxies = [\"127.0.0.0/8\"]\n"),
    ))
    .await;
    let mut seen = std::collections::HashSet::new();
    for i in 0..12 {
        let xff = format!("203.0.113.{i}");
        let a = via_hash(proxy.addr, "/", &[("x-forwarded-for", &xff)]).await;
        assert_eq!(
            via_hash(proxy.addr, "/", &[("x-forwarded-for", &xff)]).await,
            a
        );
        seen.insert(a);
    }
    assert!(seen.len() >= 2);
    proxy.shutdown().await;
}

fn write_config(path: &std::path::Path, backends: &[std::net::SocketAddr]) {
    std::fs::write(
        path,
        config_for(backends, &hash_pool("query:room", ""))
            .replace("{CERT}", CERT)
            .replace("{KEY}", KEY),
    )
    .unwrap();
}

#[tokio::test]
async fn hash_churn_on_reload_moves_only_the_share_it_must() {
    let mut backends = Vec::new();
    for id in ["b1", "b2", "b3", "b4"] {
        backends.push(WsBackend::start(id).await);
    }
    let addrs: Vec<_> = backends.iter().map(|b| b.addr).collect();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("berth.toml");
    write_config(&path, &addrs[..3]);
    let proxy = Proxy::start_file(&path).await;
    const KEYS: usize = 300;
    async fn placement(addr: std::net::SocketAddr) -> Vec<String> {
        let mut out = Vec::new();
        for k in 0..KEYS {
            out.push(via_hash(addr, &format!("/?room=room-{k}"), &[]).await);
        }
        out
    }
    let before = placement(proxy.addr).await;
    // Add b4 (config_for names backends by position, so b1..b3 keep ids).
    write_config(&path, &addrs);
    assert_eq!(
        admin_request(proxy.admin.unwrap(), "POST", "/admin/reload", None)
            .await
            .0,
        200
    );
    let after_add = placement(proxy.addr).await;
    let moved: Vec<usize> = (0..KEYS).filter(|&k| before[k] != after_add[k]).collect();
    assert!(
        moved.iter().all(|&k| after_add[k] == "b4"),
        "keys moved between old backends"
    );
    let ideal = KEYS as f64 / 4.0;
    assert!(
        (moved.len() as f64 - ideal).abs() <= ideal * 0.2,
        "moved {} of {KEYS}, ideal {ideal}",
        moved.len()
    );
    // Remove b2: only its keys move.
    let remaining = [addrs[0], addrs[2], addrs[3]];
    // config_for numbers ids by position; give the backends their own ids back.
    let text = config_for(&remaining, &hash_pool("query:room", ""))
        .replace("{CERT}", CERT)
        .replace("{KEY}", KEY);
    let mut fixed = String::new();
    let mut n = 0;
    for line in text.lines() {
        if line.starts_with("id = \"b") {
            fixed.push_str(&format!("id = \"{}\"\n", ["b1", "b3", "b4"][n]));
            n += 1;
        } else {
            fixed.push_str(line);
            fixed.push('\n');
        }
    }
    std::fs::write(&path, fixed).unwrap();
    assert_eq!(
        admin_request(proxy.admin.unwrap(), "POST", "/admin/reload", None)
            .await
            .0,
        200
    );
    let after_remove = placement(proxy.addr).await;
    for k in 0..KEYS {
        if after_add[k] != "b2" {
            assert_eq!(
                after_remove[k], after_add[k],
                "key {k} moved though its backend stayed"
            );
        } else {
            assert_ne!(after_remove[k], "b2");
        }
    }
    proxy.shutdown().await;
}

#[tokio::test]
async fn bounded_load_caps_a_hot_key() {
    let backends = three().await;
    let addrs: Vec<_> = backends.iter().map(|b| b.addr).collect();
    let proxy = Proxy::start(&config_for(
        &addrs,
        &hash_pool("query:room", "bounded_load = 1.25\n"),
    ))
    .await;
    let mut held = Vec::new();
    let mut counts: HashMap<String, usize> = HashMap::new();
    for i in 0..60 {
        // 80 % of connections join one hot room.
        let room = if i % 5 == 0 {
            format!("cold-{i}")
        } else {
            "hot".to_string()
        };
        let (mut ws, _) = try_ws_connect(proxy.addr, false, &format!("/?room={room}"), &[])
            .await
            .unwrap();
        *counts.entry(whoami(&mut ws).await).or_default() += 1;
        held.push(ws);
    }
    let max = *counts.values().max().unwrap() as f64;
    let avg: f64 = 60.0 / 3.0;
    assert!(
        max <= (1.25 * avg).ceil(),
        "max {max} over bound; {counts:?}"
    );
    let (_, metrics) = admin_request(proxy.admin.unwrap(), "GET", "/metrics", None).await;
    assert!(
        metrics.contains("berth_affinity_total{mode=\"hash\",pool=\"main\",result=\"rebind\"}"),
        "{metrics}"
    );
    proxy.shutdown().await;
}
