//! The admin API's status feed over plain HTTP: `/admin/events` snapshots
//! a second apart with live rates, an event stream that does not hold up
//! shutdown, a cap on open streams that leaves the rest of the API
//! answering, and `405` with `Allow` on wrong methods. Real proxy, real
//! backends, real WebSocket clients.

mod support;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use http_body_util::BodyExt;
use hyper_util::rt::TokioIo;
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::Message;

/// A client of `/admin/events`: yields each event's JSON.
struct Events {
    body: hyper::body::Incoming,
    buffer: String,
}

impl Events {
    async fn open(admin: SocketAddr) -> (Events, hyper::http::response::Parts) {
        let stream = TcpStream::connect(admin).await.unwrap();
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .unwrap();
        tokio::spawn(conn);
        let req = hyper::Request::builder()
            .uri("/admin/events")
            .header("host", "admin")
            .body(http_body_util::Empty::<Bytes>::new())
            .unwrap();
        let resp = sender.send_request(req).await.unwrap();
        let (parts, body) = resp.into_parts();
        let events = Events {
            body,
            buffer: String::new(),
        };
        (events, parts)
    }

    /// The next event's data as JSON; `None` when the stream ended.
    async fn next(&mut self) -> Option<serde_json::Value> {
        loop {
            while let Some(end) = self.buffer.find("\n\n") {
                let event: String = self.buffer.drain(..end + 2).collect();
                if let Some(data) = event.lines().find_map(|l| l.strip_prefix("data: ")) {
                    return Some(serde_json::from_str(data).unwrap());
                }
            }
            let frame = tokio::time::timeout(Duration::from_secs(5), self.body.frame())
                .await
                .expect("an event within 5 s")?
                .ok()?;
            if let Ok(data) = frame.into_data() {
                self.buffer.push_str(std::str::from_utf8(&data).unwrap());
            }
        }
    }
}

fn backend<'a>(snap: &'a serde_json::Value, pool: &str, id: &str) -> &'a serde_json::Value {
    snap["pools"][pool]["backends"]
        .as_array()
        .unwrap()
        .iter()
        .find(|b| b["id"] == id)
        .unwrap_or_else(|| panic!("no {pool}/{id} in {snap}"))
}

#[tokio::test]
async fn events_carry_one_snapshot_a_second_with_live_rates() {
    let b1 = WsBackend::start("b1").await;
    let b2 = WsBackend::start("b2").await;
    let proxy = Proxy::start(&config_for(&[b1.addr, b2.addr], "")).await;
    let admin = proxy.admin.unwrap();
    let (mut events, head) = Events::open(admin).await;
    assert_eq!(head.status, 200);
    assert_eq!(head.headers["content-type"], "text/event-stream");

    // Four clients (round robin: two each), sending and reading echoes.
    let mut clients = Vec::new();
    for _ in 0..4 {
        clients.push(ws_connect(proxy.addr, false, "/").await);
    }
    let traffic = tokio::spawn(async move {
        let payload = "x".repeat(100);
        loop {
            for ws in clients.iter_mut() {
                if ws.send(Message::text(payload.clone())).await.is_err() {
                    return;
                }
                let _ = ws.next().await;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    });

    // Skip the snapshots taken before the traffic started.
    let mut snap = events.next().await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while backend(&snap, "main", "b1")["messages_per_second"]["client_to_backend"] == 0.0 {
        assert!(Instant::now() < deadline, "no message rate: {snap}");
        snap = events.next().await.unwrap();
    }
    let next = events.next().await.unwrap();
    // One snapshot a second.
    let gap = next["time"].as_f64().unwrap() - snap["time"].as_f64().unwrap();
    assert!((0.5..=2.0).contains(&gap), "snapshots {gap} s apart");
    for s in [&snap, &next] {
        for id in ["b1", "b2"] {
            let b = backend(s, "main", id);
            assert_eq!(b["live_connections"], 2, "{b}");
            assert_eq!(b["state"], "up");
            assert_eq!(b["weighted_share"], 0.5);
            for dir in ["client_to_backend", "backend_to_client"] {
                let messages = b["messages_per_second"][dir].as_f64().unwrap();
                let bytes = b["bytes_per_second"][dir].as_f64().unwrap();
                // Each message is 100 bytes of payload plus its header.
                assert!(
                    messages > 0.0 && bytes >= messages * 100.0,
                    "{id} {dir}: {b}"
                );
            }
        }
        assert_eq!(s["pools"]["main"]["live_connections"], 4);
        assert_eq!(s["process"]["websockets_open"], 4);
        assert!(
            s["process"]["connections_open"].as_u64().unwrap() >= 4,
            "{s}"
        );
        let fds = &s["process"]["fds"];
        assert!(fds["open"].as_u64().unwrap() >= 8, "{fds}");
        // The descriptor guard's headroom: what is left above its reserve.
        let reserve = fds["reserve"].as_u64().unwrap();
        assert_eq!(reserve, 256 + fds["limit"].as_u64().unwrap() / 100, "{fds}");
        assert_eq!(
            fds["headroom"].as_u64().unwrap(),
            fds["limit"].as_u64().unwrap() - fds["open"].as_u64().unwrap() - reserve
        );
        assert_eq!(s["last_reload"]["initial"], true);
        assert_eq!(s["drains"], serde_json::json!([]));
    }
    // The pools part is the /admin/pools document (and more).
    let (_, pools) = admin_request(admin, "GET", "/admin/pools", None).await;
    let pools: serde_json::Value = serde_json::from_str(&pools).unwrap();
    for (i, b) in pools["pools"]["main"]["backends"]
        .as_array()
        .unwrap()
        .iter()
        .enumerate()
    {
        for (key, value) in b.as_object().unwrap() {
            assert_eq!(&next["pools"]["main"]["backends"][i][key], value, "{key}");
        }
    }

    // Upgrades per second show new connections; closes go into the chart.
    let mut more = Vec::new();
    for _ in 0..6 {
        more.push(ws_connect(proxy.addr, false, "/").await);
    }
    for mut ws in more {
        let normal = CloseFrame {
            code: CloseCode::Normal,
            reason: "".into(),
        };
        ws.close(Some(normal)).await.unwrap();
        while ws.next().await.is_some() {}
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    // A rate is per second of its sampling interval, which a busy machine
    // stretches past 1 s (six upgrades over 1.01 s read 5.94): each rate is
    // weighted by its own interval, so the sum counts upgrades (up to the
    // rounding of rates and times).
    let mut upgrades = 0.0;
    let mut last_time = next["time"].as_f64().unwrap();
    loop {
        let s = events.next().await.unwrap();
        let time = s["time"].as_f64().unwrap();
        let rate = backend(&s, "main", "b1")["upgrades_per_second"]
            .as_f64()
            .unwrap()
            + backend(&s, "main", "b2")["upgrades_per_second"]
                .as_f64()
                .unwrap();
        upgrades += rate * (time - last_time);
        last_time = time;
        let closes = s["pools"]["main"]["closes"]["totals"]["1000"]
            .as_u64()
            .unwrap_or(0);
        if upgrades >= 5.9 && closes == 6 {
            assert!(upgrades < 6.1, "upgrades {upgrades}: {s}");
            break;
        }
        assert!(Instant::now() < deadline, "upgrades {upgrades}: {s}");
    }
    traffic.abort();
    proxy.shutdown().await;
}

#[tokio::test]
async fn an_open_event_stream_does_not_hold_up_shutdown() {
    let b1 = WsBackend::start("b1").await;
    let proxy = Proxy::start(&config_for(&[b1.addr], "")).await;
    let (mut events, _) = Events::open(proxy.admin.unwrap()).await;
    assert!(events.next().await.is_some());
    let started = Instant::now();
    proxy.shutdown().await;
    let took = started.elapsed();
    // shutdown_window is 500 ms; the admin API gets a second more at most.
    assert!(took < Duration::from_secs(5), "shutdown took {took:?}");
    // The stream ended rather than staying open.
    let ended = tokio::time::timeout(Duration::from_secs(3), async {
        while events.next().await.is_some() {}
    })
    .await;
    assert!(ended.is_ok(), "the event stream is still open");
}

/// Sends `method path` to the admin API; returns the status line and
/// headers (lower-cased).
async fn head_of(admin: SocketAddr, method: &str, path: &str) -> String {
    let mut s = TcpStream::connect(admin).await.unwrap();
    let req = format!(
        "{method} {path} HTTP/1.1\r\nHost: admin\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
    );
    s.write_all(req.as_bytes()).await.unwrap();
    let mut out = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut out))
        .await
        .unwrap()
        .unwrap();
    let text = String::from_utf8_lossy(&out).to_ascii_lowercase();
    text.split("\r\n\r\n").next().unwrap().to_string()
}

#[tokio::test]
async fn wrong_methods_get_405_and_allow() {
    let b1 = WsBackend::start("b1").await;
    let proxy = Proxy::start(&config_for(&[b1.addr], "")).await;
    let admin = proxy.admin.unwrap();
    for path in [
        "/admin/reload",
        "/admin/pools/main/backends/b1/drain",
        "/admin/pools/main/backends/b1/undrain",
    ] {
        for method in ["GET", "PUT", "DELETE"] {
            let head = head_of(admin, method, path).await;
            assert!(head.starts_with("http/1.1 405"), "{method} {path}: {head}");
            assert!(head.contains("\r\nallow: post"), "{method} {path}: {head}");
        }
    }
    for path in [
        "/",
        "/admin/events",
        "/admin/pools",
        "/metrics",
        "/healthz",
        "/readyz",
    ] {
        let head = head_of(admin, "POST", path).await;
        assert!(head.starts_with("http/1.1 405"), "POST {path}: {head}");
        assert!(head.contains("\r\nallow: get"), "POST {path}: {head}");
    }
    // A GET never drained anything.
    assert_eq!(backend_state(admin, "b1").await, "up");
    assert!(head_of(admin, "GET", "/admin/nowhere")
        .await
        .starts_with("http/1.1 404"));
    proxy.shutdown().await;
}

#[tokio::test]
async fn event_streams_are_capped_so_the_rest_of_the_admin_api_answers() {
    let b1 = WsBackend::start("b1").await;
    let proxy = Proxy::start(&config_for(&[b1.addr], "")).await;
    let admin = proxy.admin.unwrap();
    // The documented cap: 8 streams at once.
    let mut open = Vec::new();
    for _ in 0..8 {
        let (mut events, parts) = Events::open(admin).await;
        assert_eq!(parts.status, 200);
        assert!(events.next().await.is_some());
        open.push(events);
    }
    let (refused, parts) = Events::open(admin).await;
    assert_eq!(parts.status, 503);
    assert_eq!(parts.headers["retry-after"], "5");
    let body = refused.body.collect().await.unwrap().to_bytes();
    assert_eq!(
        &body[..],
        b"too many event streams open (at most 8), try again later\n"
    );
    // Meanwhile the rest of the API answers, and the refusal is counted.
    let (status, metrics) = admin_request(admin, "GET", "/metrics", None).await;
    assert_eq!(status, 200);
    assert!(
        metrics.contains("berth_requests_rejected_total{listener=\"admin\",status=\"503\"} 1\n"),
        "{metrics}"
    );
    assert_eq!(admin_request(admin, "GET", "/readyz", None).await.0, 200);
    // The streams still open keep streaming.
    for events in open.iter_mut() {
        assert!(events.next().await.is_some());
    }
    // Closing one gives its place back (once berth notices, at the latest
    // with the next event a second later).
    drop(open.pop());
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let (mut events, parts) = Events::open(admin).await;
        if parts.status == 200 {
            assert!(events.next().await.is_some());
            break;
        }
        assert_eq!(parts.status, 503);
        assert!(Instant::now() < deadline, "no place after closing a stream");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    drop(open);
    proxy.shutdown().await;
}
