//! A pool's limits end to end, with real sockets: `max_message_size`
//! (Close 1009), `send_timeout` (a client that stops reading is dropped),
//! `max_upgrades_per_second` (503 with a jittered Retry-After) and the
//! Retry-After of every 503, and local resource errors at the open-file
//! limit (the real binary under a low `RLIMIT_NOFILE`).

mod support;

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};
use tokio_tungstenite::tungstenite::Message;

/// The value of one sample of `/metrics`: the series `name` whose labels
/// include all of `labels` (0 when absent).
async fn metric(admin: SocketAddr, name: &str, labels: &[(&str, &str)]) -> f64 {
    let (_, text) = admin_request(admin, "GET", "/metrics", None).await;
    text.lines()
        .filter(|l| l.starts_with(&format!("{name}{{")) || l.starts_with(&format!("{name} ")))
        .filter(|l| {
            labels
                .iter()
                .all(|(k, v)| l.contains(&format!("{k}=\"{v}\"")))
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// Waits (up to 30 s: the machine may be busy) for `check` to hold.
async fn eventually<F, Fut>(what: &str, check: F)
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + Duration::from_secs(30);
    while !check().await {
        assert!(Instant::now() < deadline, "never: {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn a_message_one_byte_over_max_message_size_gets_1009_and_one_at_it_passes() {
    let backend = WsBackend::start("b1").await;
    let proxy = Proxy::start(&config_for(
        &[backend.addr],
        "max_message_size = \"64 KiB\"",
    ))
    .await;
    let admin = proxy.admin.unwrap();
    for tls in [false, true] {
        let addr = if tls {
            proxy.tls_addr.unwrap()
        } else {
            proxy.addr
        };
        let mut ws = ws_connect(addr, tls, "/").await;
        let at_limit: Vec<u8> = (0..65536u32).map(|i| (i % 251) as u8).collect();
        ws.send(Message::binary(at_limit.clone())).await.unwrap();
        assert_eq!(
            ws.next().await.unwrap().unwrap(),
            Message::binary(at_limit),
            "a message at the limit is relayed both ways"
        );
        let over = vec![7u8; 65537];
        ws.send(Message::binary(over)).await.unwrap();
        assert_eq!(next_close(&mut ws).await, Some(1009));
    }
    // The backend never saw the big message; it got a 1009 of its own.
    eventually("the backend hears 1009 twice", || async {
        backend.closes_seen.lock().unwrap().as_slice() == [1009, 1009]
    })
    .await;
    eventually("the closes are counted", || async {
        metric(
            admin,
            "berth_websocket_closes_total",
            &[("initiator", "proxy"), ("code", "1009"), ("pool", "main")],
        )
        .await
            == 2.0
    })
    .await;
    proxy.shutdown().await;
}

#[tokio::test]
async fn a_client_that_stops_reading_is_dropped_after_send_timeout() {
    let backend = WsBackend::start("b1").await;
    let proxy = Proxy::start(&config_for(&[backend.addr], "send_timeout = \"1s\"")).await;
    let admin = proxy.admin.unwrap();
    // A client with a small receive buffer that sends one big message
    // (echoed back) and never reads again.
    let socket = TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    let mut client = socket.connect(proxy.addr).await.unwrap();
    client
        .write_all(upgrade_head("/", "").as_bytes())
        .await
        .unwrap();
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        client.read_exact(&mut byte).await.unwrap();
        head.push(byte[0]);
    }
    assert!(head.starts_with(b"HTTP/1.1 101"));
    let started = Instant::now();
    let message = client_frame(true, 0x2, &vec![42u8; 16 << 20]);
    client.write_all(&message).await.unwrap();
    // The backend echoes it, berth cannot pass it on, and after
    // send_timeout the backend is told the client is gone.
    eventually("the backend hears 1001", || async {
        backend.closes_seen.lock().unwrap().as_slice() == [1001]
    })
    .await;
    assert!(
        started.elapsed() >= Duration::from_secs(1),
        "dropped before send_timeout"
    );
    eventually("the timeout is counted", || async {
        metric(
            admin,
            "berth_websocket_send_timeouts_total",
            &[("pool", "main"), ("side", "client")],
        )
        .await
            == 1.0
    })
    .await;
    // The client's connection is closed: reading drains what the kernel
    // held and then ends (or is reset), well short of the echo.
    let mut got = 0usize;
    let mut buf = vec![0u8; 64 * 1024];
    let read = tokio::time::timeout(Duration::from_secs(30), async {
        loop {
            match client.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => got += n,
            }
        }
    })
    .await;
    assert!(read.is_ok(), "the client's connection was not closed");
    assert!(got < 16 << 20, "the whole echo arrived ({got} bytes)");
    proxy.shutdown().await;
}

/// `n` upgrade attempts as fast as they go: (101s, Retry-After of each 503).
async fn storm(addr: SocketAddr, n: usize) -> (usize, Vec<u64>) {
    let attempts = (0..n).map(|_| async move {
        let (_s, head) = raw_request(addr, &upgrade_head("/", "")).await;
        head
    });
    let heads = futures_util::future::join_all(attempts).await;
    let mut switched = 0;
    let mut retry_after = Vec::new();
    for head in heads {
        if head.starts_with("HTTP/1.1 101") {
            switched += 1;
            continue;
        }
        assert!(head.starts_with("HTTP/1.1 503"), "{head}");
        let value = head
            .lines()
            .find_map(|l| {
                l.to_ascii_lowercase()
                    .strip_prefix("retry-after:")
                    .map(|v| v.trim().to_string())
            })
            .unwrap_or_else(|| panic!("503 without Retry-After: {head}"));
        retry_after.push(value.parse().unwrap());
    }
    (switched, retry_after)
}

#[tokio::test]
async fn a_reconnect_storm_gets_503s_with_retry_after_spread_over_1_to_retry_after_max() {
    let backend = WsBackend::start("b1").await;
    let proxy = Proxy::start(&config_for(
        &[backend.addr],
        "max_upgrades_per_second = 2\nupgrade_burst = 5\nretry_after_max = \"10s\"",
    ))
    .await;
    let started = Instant::now();
    let (switched, retry_after) = storm(proxy.addr, 80).await;
    let secs = started.elapsed().as_secs_f64();
    // The burst, plus what the bucket refilled while the storm lasted.
    assert!(switched >= 5, "only {switched} got through");
    assert!(
        switched as f64 <= 5.0 + 2.0 * secs + 1.0,
        "{switched} got through in {secs:.2} s"
    );
    assert_eq!(switched + retry_after.len(), 80);
    assert!(
        retry_after.iter().all(|s| (1..=10).contains(s)),
        "{retry_after:?}"
    );
    let distinct: BTreeSet<u64> = retry_after.iter().copied().collect();
    assert!(distinct.len() >= 5, "{distinct:?}");
    assert!(distinct.iter().any(|s| *s <= 3), "{distinct:?}");
    assert!(distinct.iter().any(|s| *s >= 8), "{distinct:?}");
    let limited = metric(
        proxy.admin.unwrap(),
        "berth_websocket_upgrades_total",
        &[("pool", "main"), ("result", "rate_limited")],
    )
    .await;
    assert_eq!(limited, retry_after.len() as f64);
    proxy.shutdown().await;
}

#[tokio::test]
async fn every_503_draws_retry_after_from_1_to_retry_after_max() {
    // No backend is up: plain requests and upgrades both get 503.
    let sick = HealthBackend::start("h1").await;
    sick.healthy
        .store(false, std::sync::atomic::Ordering::SeqCst);
    let extra = "retry_after_max = \"3s\"\n\n[pools.main.health]\ninterval = \"50ms\"\nfall = 1\n";
    let proxy = Proxy::start(&config_for(&[sick.addr], extra)).await;
    let admin = proxy.admin.unwrap();
    eventually("b1 is down", || async {
        backend_state(admin, "b1").await == "down"
    })
    .await;
    let mut seen = BTreeSet::new();
    for i in 0..40 {
        let head = if i % 2 == 0 {
            raw_request(proxy.addr, &upgrade_head("/", "")).await.1
        } else {
            raw_request(proxy.addr, "GET / HTTP/1.1\r\nHost: localhost\r\n\r\n")
                .await
                .1
        };
        assert!(head.starts_with("HTTP/1.1 503"), "{head}");
        let value: u64 = head
            .lines()
            .find_map(|l| l.strip_prefix("retry-after: "))
            .unwrap_or_else(|| panic!("no Retry-After: {head}"))
            .parse()
            .unwrap();
        seen.insert(value);
    }
    assert_eq!(seen, BTreeSet::from([1, 2, 3]));
    proxy.shutdown().await;
}

/// The number of open file descriptors of process `pid`.
fn open_fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, |d| d.count())
}

/// Reads a response head from a raw stream (up to 10 s).
async fn read_head(s: &mut TcpStream) -> String {
    let mut got = Vec::new();
    let mut b = [0u8; 1];
    while !got.ends_with(b"\r\n\r\n") {
        match tokio::time::timeout(Duration::from_secs(10), s.read(&mut b)).await {
            Ok(Ok(1)) => got.push(b[0]),
            _ => break,
        }
    }
    String::from_utf8_lossy(&got).into_owned()
}

#[tokio::test]
async fn at_the_open_file_limit_upgrades_get_503_and_no_backend_is_blamed() {
    let b1 = WsBackend::start("b1").await;
    let b2 = WsBackend::start("b2").await;
    // The waiting clients must outlast the flood: a long handshake_timeout.
    let toml = with_listener_key(
        &config_for(&[b1.addr, b2.addr], ""),
        "handshake_timeout = \"5m\"",
        1,
    );
    let berth = BerthProcess::spawn(&toml, &[], std::process::Stdio::null()).await;
    let pid = berth.child.id();
    // Clients that will ask for an upgrade once berth is out of files:
    // accepted now, while it still can.
    let mut waiting = Vec::new();
    for _ in 0..5 {
        waiting.push(TcpStream::connect(berth.addr).await.unwrap());
    }
    // One more, for after the flood: under a limit this low, berth's
    // descriptor reserve refuses every new client at accept, so the one
    // served at the end must already be connected.
    let after = TcpStream::connect(berth.addr).await.unwrap();
    // Let berth accept them, then allow it only a few more descriptors.
    let base = open_fds(pid);
    let deadline = Instant::now() + Duration::from_secs(10);
    while open_fds(pid) < base + 6 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let limit = open_fds(pid) + 4;
    let status = std::process::Command::new("prlimit")
        .args([
            "--pid",
            &pid.to_string(),
            &format!("--nofile={limit}:{limit}"),
        ])
        .status()
        .expect("prlimit runs");
    assert!(status.success(), "prlimit failed");
    // Idle connections take every descriptor left: berth is at its limit
    // once three more in a row are not accepted (they wait in the backlog).
    let mut idle = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(20);
    let (mut peak, mut unaccepted) = (open_fds(pid), 0);
    while unaccepted < 3 {
        assert!(Instant::now() < deadline, "berth never reached its limit");
        idle.push(TcpStream::connect(berth.addr).await.unwrap());
        tokio::time::sleep(Duration::from_millis(100)).await;
        let now = open_fds(pid);
        if now > peak {
            (peak, unaccepted) = (now, 0);
        } else {
            unaccepted += 1;
        }
    }
    // Every upgrade now fails on berth's side: 503, and no backend is
    // taken down for it (three would have been enough).
    for s in &mut waiting {
        s.write_all(upgrade_head("/", "").as_bytes()).await.unwrap();
        let head = read_head(s).await;
        assert!(head.starts_with("HTTP/1.1 503"), "{head}");
        assert!(head.to_ascii_lowercase().contains("retry-after:"), "{head}");
    }
    // The flood leaves; once berth has closed its side, the backends are
    // still up and serve at once.
    drop(idle);
    drop(waiting);
    let deadline = Instant::now() + Duration::from_secs(10);
    while open_fds(pid) + 8 > peak {
        assert!(Instant::now() < deadline, "berth kept its descriptors");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(backend_state(berth.admin, "b1").await, "up");
    assert_eq!(backend_state(berth.admin, "b2").await, "up");
    let stream = tokio_tungstenite::MaybeTlsStream::Plain(after);
    let (mut ws, _) = tokio_tungstenite::client_async("ws://127.0.0.1/", stream)
        .await
        .unwrap();
    assert!(["b1", "b2"].contains(&whoami(&mut ws).await.as_str()));
}
