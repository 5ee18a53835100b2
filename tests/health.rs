//! Health and limits: active checks with rise/fall, passive checks on the
//! data path, max_connections, and 503 when no backend can take a client.

mod support;

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use support::*;

async fn wait_for_state(admin: std::net::SocketAddr, id: &str, want: &str) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while backend_state(admin, id).await != want {
        assert!(Instant::now() < deadline, "{id} never became {want}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn active_checks_take_a_backend_out_and_put_it_back_with_rise_and_fall() {
    let h1 = HealthBackend::start("h1").await;
    let h2 = HealthBackend::start("h2").await;
    let extra = "\n[pools.main.health]\npath = \"/healthz\"\ninterval = \"100ms\"\ntimeout = \"500ms\"\nrise = 2\nfall = 3\n";
    let proxy = Proxy::start(&config_for(&[h1.addr, h2.addr], extra)).await;
    let admin = proxy.admin.unwrap();
    // Both answer while healthy.
    let mut seen = std::collections::HashSet::new();
    for _ in 0..4 {
        seen.insert(http_get(proxy.addr, "/").await.1);
    }
    assert_eq!(seen.len(), 2);

    h1.healthy.store(false, Ordering::SeqCst);
    let fails_before = h1.fail_served.load(Ordering::SeqCst);
    wait_for_state(admin, "b1", "down").await;
    // Down only after `fall` consecutive failures.
    assert!(h1.fail_served.load(Ordering::SeqCst) - fails_before >= 3);
    for _ in 0..6 {
        assert_eq!(http_get(proxy.addr, "/").await, (200, "h2".to_string()));
    }

    h1.healthy.store(true, Ordering::SeqCst);
    let oks_before = h1.ok_served.load(Ordering::SeqCst);
    wait_for_state(admin, "b1", "up").await;
    // Up only after `rise` consecutive successes.
    assert!(h1.ok_served.load(Ordering::SeqCst) - oks_before >= 2);
    let mut seen = std::collections::HashSet::new();
    for _ in 0..6 {
        seen.insert(http_get(proxy.addr, "/").await.1);
    }
    assert!(seen.contains("h1"));
    // The checks were counted.
    let (_, metrics) = admin_request(admin, "GET", "/metrics", None).await;
    assert!(
        metrics
            .contains("berth_health_checks_total{backend=\"b1\",pool=\"main\",result=\"failure\"}"),
        "{metrics}"
    );
    assert!(metrics.contains("berth_backend_up{backend=\"b1\",pool=\"main\"} 1"));
    proxy.shutdown().await;
}

#[tokio::test]
async fn every_backend_down_answers_503_with_retry_after() {
    let h1 = HealthBackend::start("h1").await;
    h1.healthy.store(false, Ordering::SeqCst);
    let extra = "\n[pools.main.health]\ninterval = \"50ms\"\nfall = 1\n";
    let proxy = Proxy::start(&config_for(&[h1.addr], extra)).await;
    wait_for_state(proxy.admin.unwrap(), "b1", "down").await;
    let (_s, resp) = raw_request(proxy.addr, &upgrade_head("/", "")).await;
    assert!(resp.starts_with("HTTP/1.1 503"), "{resp}");
    assert!(resp.to_ascii_lowercase().contains("retry-after:"), "{resp}");
    assert_eq!(http_get(proxy.addr, "/").await.0, 503);
    proxy.shutdown().await;
}

#[tokio::test]
async fn failed_connects_take_a_backend_down_passively() {
    let dead = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let alive = WsBackend::start("alive").await;
    let proxy = Proxy::start(&config_for(&[dead, alive.addr], "")).await;
    for _ in 0..8 {
        let mut ws = ws_connect(proxy.addr, false, "/").await;
        assert_eq!(whoami(&mut ws).await, "alive");
    }
    // Three failed connects in a row mark it down.
    assert_eq!(backend_state(proxy.admin.unwrap(), "b1").await, "down");
    proxy.shutdown().await;
}

#[tokio::test]
async fn full_backends_are_skipped_and_a_full_pool_answers_503() {
    let b1 = WsBackend::start("b1").await;
    let b2 = WsBackend::start("b2").await;
    let toml = config_for(&[b1.addr, b2.addr], "")
        .replace(
            &format!("address = \"{}\"\n", b1.addr),
            &format!("address = \"{}\"\nmax_connections = 2\n", b1.addr),
        )
        .replace(
            &format!("address = \"{}\"\n", b2.addr),
            &format!("address = \"{}\"\nmax_connections = 1\n", b2.addr),
        );
    let proxy = Proxy::start(&toml).await;
    let mut held = Vec::new();
    let mut counts = std::collections::HashMap::new();
    for _ in 0..3 {
        let mut ws = ws_connect(proxy.addr, false, "/").await;
        *counts.entry(whoami(&mut ws).await).or_insert(0) += 1;
        held.push(ws);
    }
    assert_eq!(counts.get("b1"), Some(&2));
    assert_eq!(counts.get("b2"), Some(&1));
    let (_s, resp) = raw_request(proxy.addr, &upgrade_head("/", "")).await;
    assert!(resp.starts_with("HTTP/1.1 503"), "{resp}");
    assert!(resp.to_ascii_lowercase().contains("retry-after:"), "{resp}");
    // A slot frees up: the next client gets in.
    drop(held.pop());
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let (_s, resp) = raw_request(proxy.addr, &upgrade_head("/", "")).await;
        if resp.starts_with("HTTP/1.1 101") {
            break;
        }
        assert!(Instant::now() < deadline, "slot never freed: {resp}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    proxy.shutdown().await;
}

/// A WebSocket backend whose handshake answers follow a script, one entry
/// per connection: `'1'` a good 101 (then an echo), `'5'` a 503, `'a'` a
/// 101 with a wrong Sec-WebSocket-Accept.
async fn scripted_backend(
    script: std::sync::Arc<std::sync::Mutex<std::collections::VecDeque<char>>>,
) -> std::net::SocketAddr {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((mut s, _)) = listener.accept().await else {
                return;
            };
            let next = script.lock().unwrap().pop_front().unwrap_or('1');
            tokio::spawn(async move {
                if next == '1' {
                    if let Ok(mut ws) = tokio_tungstenite::accept_async(s).await {
                        while let Some(Ok(_)) = futures_util::StreamExt::next(&mut ws).await {}
                    }
                    return;
                }
                let mut head = Vec::new();
                let mut buf = [0u8; 1024];
                while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                    match s.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => head.extend_from_slice(&buf[..n]),
                    }
                }
                let answer: &[u8] = if next == '5' {
                    b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 4\r\nConnection: close\r\n\r\nbusy"
                } else {
                    b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Accept: bm90IHRoZSByaWdodCBrZXk=\r\n\r\n"
                };
                let _ = s.write_all(answer).await;
                let _ = s.read(&mut buf).await;
            });
        }
    });
    addr
}

#[tokio::test]
async fn passive_health_counts_successes_so_only_failures_in_a_row_take_a_backend_down() {
    let script = std::sync::Arc::new(std::sync::Mutex::new(std::collections::VecDeque::new()));
    let addr = scripted_backend(script.clone()).await;
    // No active checks: the passive rule takes a backend down after three
    // failures in a row.
    let proxy = Proxy::start(&config_for(&[addr], "")).await;
    let admin = proxy.admin.unwrap();
    let upgrade = || async {
        let (_s, head) = raw_request(proxy.addr, &upgrade_head("/", "")).await;
        head
    };
    // Failure, success, failure, success ...: the backend stays up. A 503
    // is passed on; a 101 with a bad accept key is berth's 502.
    let rounds = "51a15151a151";
    script.lock().unwrap().extend(rounds.chars());
    for (round, answer) in rounds.chars().enumerate() {
        let head = upgrade().await;
        let want = match answer {
            '5' => "HTTP/1.1 503",
            'a' => "HTTP/1.1 502",
            _ => "HTTP/1.1 101",
        };
        assert!(head.starts_with(want), "round {round}: {head}");
        assert_eq!(
            backend_state(admin, "b1").await,
            "up",
            "after round {round}"
        );
    }
    script.lock().unwrap().extend("5a5".chars());
    let refused = upgrade().await;
    assert!(refused.starts_with("HTTP/1.1 503"), "{refused}");
    let bad_accept = upgrade().await;
    assert!(bad_accept.starts_with("HTTP/1.1 502"), "{bad_accept}");
    assert_eq!(backend_state(admin, "b1").await, "up");
    let third = upgrade().await;
    assert!(third.starts_with("HTTP/1.1 503"), "{third}");
    // Three failures in a row: down, and berth answers for it.
    assert_eq!(backend_state(admin, "b1").await, "down");
    let (_s, head) = raw_request(proxy.addr, &upgrade_head("/", "")).await;
    assert!(head.starts_with("HTTP/1.1 503"), "{head}");
    assert!(head.to_ascii_lowercase().contains("retry-after:"), "{head}");
    proxy.shutdown().await;
}
