//! Monitoring end to end: what an operator sees by scraping `GET /metrics`
//! from the admin listener over real HTTP, while real clients and backends
//! drive traffic through the proxy. Also the admin health endpoints,
//! `promtool check metrics` on the exposition, and a real Prometheus server
//! scraping berth.
//!
//! Every proxy has its own registry, but assertions still compare values
//! before and after (deltas), as an operator reading counters would.

mod support;

use std::collections::{BTreeMap, HashMap};
use std::io::Write;
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::TokioIo;
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::Message;

/// How long to wait for asynchronous metric updates (closes, relay flushes).
const SETTLE: Duration = Duration::from_secs(5);

// ---------------------------------------------------------------------------
// Scraping and parsing the exposition.
// ---------------------------------------------------------------------------

/// One sample line: `name{labels} value`.
#[derive(Debug, Clone)]
struct Sample {
    name: String,
    labels: BTreeMap<String, String>,
    value: f64,
}

/// One parsed `/metrics` response.
#[derive(Debug, Clone)]
struct Scrape {
    samples: Vec<Sample>,
    /// `# TYPE` lines: family name -> type.
    types: HashMap<String, String>,
    text: String,
}

fn label_set(labels: &[(&str, &str)]) -> BTreeMap<String, String> {
    labels
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

impl Scrape {
    fn parse(text: &str) -> Scrape {
        let mut samples = Vec::new();
        let mut types = HashMap::new();
        for line in text.lines() {
            let line = line.trim_end();
            if line.is_empty() {
                continue;
            }
            if let Some(rest) = line.strip_prefix("# TYPE ") {
                let (name, ty) = rest.split_once(' ').expect("TYPE line with a type");
                types.insert(name.to_string(), ty.to_string());
                continue;
            }
            if line.starts_with('#') {
                continue;
            }
            samples.push(parse_sample(line).unwrap_or_else(|| panic!("unparsable line {line:?}")));
        }
        Scrape {
            samples,
            types,
            text: text.to_string(),
        }
    }

    /// The sample with exactly these labels.
    fn get(&self, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        let want = label_set(labels);
        self.samples
            .iter()
            .find(|s| s.name == name && s.labels == want)
            .map(|s| s.value)
    }

    /// The sample with exactly these labels, 0 when the series is absent (a
    /// counter that has not been touched yet).
    fn val(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        self.get(name, labels).unwrap_or(0.0)
    }

    /// The sum over every series of `name` whose labels include `labels`.
    fn sum(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        self.samples
            .iter()
            .filter(|s| {
                s.name == name
                    && labels
                        .iter()
                        .all(|(k, v)| s.labels.get(*k).map(String::as_str) == Some(*v))
            })
            .map(|s| s.value)
            .sum()
    }

    /// Every series of `name`, for failure messages.
    fn series(&self, name: &str) -> Vec<String> {
        self.text
            .lines()
            .filter(|l| {
                l.strip_prefix(name)
                    .is_some_and(|r| r.starts_with('{') || r.starts_with(' '))
            })
            .map(str::to_string)
            .collect()
    }
}

/// Parses `name{k="v",...} value` (label values may hold escapes).
fn parse_sample(line: &str) -> Option<Sample> {
    let name_end = line.find(['{', ' '])?;
    let name = line[..name_end].to_string();
    let mut labels = BTreeMap::new();
    let mut rest = &line[name_end..];
    if let Some(after) = rest.strip_prefix('{') {
        let mut chars = after.char_indices().peekable();
        let end;
        loop {
            // Skip separators; stop at the closing brace.
            match chars.peek() {
                Some((i, '}')) => {
                    end = *i;
                    break;
                }
                Some((_, ',')) | Some((_, ' ')) => {
                    chars.next();
                    continue;
                }
                Some(_) => {}
                None => return None,
            }
            let mut key = String::new();
            for (_, c) in chars.by_ref() {
                if c == '=' {
                    break;
                }
                key.push(c);
            }
            if chars.next()?.1 != '"' {
                return None;
            }
            let mut value = String::new();
            loop {
                match chars.next()?.1 {
                    '"' => break,
                    '\\' => match chars.next()?.1 {
                        'n' => value.push('\n'),
                        other => value.push(other),
                    },
                    c => value.push(c),
                }
            }
            labels.insert(key, value);
        }
        rest = &after[end + 1..];
    }
    let value = rest.split_whitespace().next()?;
    let value = match value {
        "+Inf" => f64::INFINITY,
        "-Inf" => f64::NEG_INFINITY,
        "NaN" => f64::NAN,
        v => v.parse().ok()?,
    };
    Some(Sample {
        name,
        labels,
        value,
    })
}

/// GET `path` over HTTP/1.1 with hyper; returns (status, content-type, body).
async fn http_fetch(addr: SocketAddr, path: &str) -> (u16, String, String) {
    let stream = TcpStream::connect(addr)
        .await
        .unwrap_or_else(|e| panic!("connect {addr}: {e}"));
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .unwrap();
    tokio::spawn(conn);
    let req = hyper::Request::builder()
        .uri(path)
        .header("host", addr.to_string())
        .body(Empty::<Bytes>::new())
        .unwrap();
    let resp = tokio::time::timeout(Duration::from_secs(10), sender.send_request(req))
        .await
        .unwrap_or_else(|_| panic!("no answer to GET {path} from {addr} within 10s"))
        .unwrap();
    let status = resp.status().as_u16();
    let content_type = resp
        .headers()
        .get(http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_string();
    let body = tokio::time::timeout(Duration::from_secs(10), resp.into_body().collect())
        .await
        .unwrap()
        .unwrap()
        .to_bytes();
    (
        status,
        content_type,
        String::from_utf8_lossy(&body).into_owned(),
    )
}

/// Scrapes `GET /metrics` from the admin listener.
async fn scrape(proxy: &Proxy) -> Scrape {
    let admin = proxy.admin.expect("admin listener");
    let (status, content_type, body) = http_fetch(admin, "/metrics").await;
    assert_eq!(status, 200, "GET /metrics: {body}");
    assert!(
        content_type.starts_with("text/plain"),
        "content-type {content_type:?}"
    );
    Scrape::parse(&body)
}

/// Scrapes until `done` holds or [`SETTLE`] has passed; returns the last
/// scrape either way, so that the caller's assertion shows what was seen.
async fn scrape_until(proxy: &Proxy, done: impl Fn(&Scrape) -> bool) -> Scrape {
    let deadline = Instant::now() + SETTLE;
    loop {
        let s = scrape(proxy).await;
        if done(&s) || Instant::now() >= deadline {
            return s;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn delta(before: &Scrape, after: &Scrape, name: &str, labels: &[(&str, &str)]) -> f64 {
    after.val(name, labels) - before.val(name, labels)
}

fn delta_sum(before: &Scrape, after: &Scrape, name: &str, labels: &[(&str, &str)]) -> f64 {
    after.sum(name, labels) - before.sum(name, labels)
}

// ---------------------------------------------------------------------------
// Small client helpers.
// ---------------------------------------------------------------------------

/// Closes a client WebSocket (with `code`, or none) and waits for the
/// stream to end.
async fn close_ws(mut ws: Ws, code: Option<CloseCode>) {
    let frame = code.map(|code| CloseFrame {
        code,
        reason: "".into(),
    });
    ws.close(frame).await.unwrap();
    let _ =
        tokio::time::timeout(SETTLE, async { while let Some(Ok(_)) = ws.next().await {} }).await;
}

async fn ws_backends(ids: &[&str]) -> Vec<WsBackend> {
    let mut v = Vec::new();
    for id in ids {
        v.push(WsBackend::start(id).await);
    }
    v
}

async fn proxy_for(backends: &[WsBackend], pool_extra: &str) -> Proxy {
    let addrs: Vec<_> = backends.iter().map(|b| b.addr).collect();
    Proxy::start(&config_for(&addrs, pool_extra)).await
}

const UPGRADES: &str = "berth_websocket_upgrades_total";

/// Asserts that exactly one upgrade attempt was counted, with `labels`.
async fn assert_one_upgrade(proxy: &Proxy, before: &Scrape, labels: &[(&str, &str)]) {
    let after = scrape_until(proxy, |s| delta(before, s, UPGRADES, labels) >= 1.0).await;
    assert_eq!(
        delta(before, &after, UPGRADES, labels),
        1.0,
        "{UPGRADES}{labels:?}; series now: {:#?}",
        after.series(UPGRADES)
    );
    assert_eq!(
        delta_sum(before, &after, UPGRADES, &[]),
        1.0,
        "exactly one upgrade result should move; series now: {:#?}",
        after.series(UPGRADES)
    );
}

/// A port with nothing listening on it (probed just now).
fn free_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap().port()
}

// ---------------------------------------------------------------------------
// 1. Live connection gauges.
// ---------------------------------------------------------------------------

#[tokio::test]
async fn active_connection_gauges_follow_open_websockets() {
    let backends = ws_backends(&["b1", "b2"]).await;
    let proxy = proxy_for(&backends, "").await;
    let before = scrape(&proxy).await;
    assert_eq!(
        before.sum("berth_websocket_connections_active", &[("pool", "main")]),
        0.0
    );
    assert_eq!(
        before.get("berth_connections_active", &[("listener", "public")]),
        Some(0.0),
        "the listener gauge exists from the start"
    );

    let mut clients = Vec::new();
    for _ in 0..5 {
        let mut ws = ws_connect(proxy.addr, false, "/").await;
        whoami(&mut ws).await;
        clients.push(ws);
    }
    let open = scrape_until(&proxy, |s| {
        s.sum("berth_websocket_connections_active", &[("pool", "main")]) == 5.0
            && s.val("berth_connections_active", &[("listener", "public")]) == 5.0
    })
    .await;
    assert_eq!(
        open.sum("berth_websocket_connections_active", &[("pool", "main")]),
        5.0,
        "{:#?}",
        open.series("berth_websocket_connections_active")
    );
    // Round robin over two backends: 3 + 2, each labelled by its backend.
    let mut per_backend = [
        open.val(
            "berth_websocket_connections_active",
            &[("pool", "main"), ("backend", "b1")],
        ),
        open.val(
            "berth_websocket_connections_active",
            &[("pool", "main"), ("backend", "b2")],
        ),
    ];
    per_backend.sort_by(f64::total_cmp);
    assert_eq!(per_backend, [2.0, 3.0]);
    assert_eq!(
        open.val("berth_connections_active", &[("listener", "public")]),
        5.0,
        "{:#?}",
        open.series("berth_connections_active")
    );

    for ws in clients {
        close_ws(ws, None).await;
    }
    let closed = scrape_until(&proxy, |s| {
        s.sum("berth_websocket_connections_active", &[("pool", "main")]) == 0.0
            && s.val("berth_connections_active", &[("listener", "public")]) == 0.0
    })
    .await;
    assert_eq!(
        closed.sum("berth_websocket_connections_active", &[("pool", "main")]),
        0.0,
        "{:#?}",
        closed.series("berth_websocket_connections_active")
    );
    assert_eq!(
        closed.val("berth_connections_active", &[("listener", "public")]),
        0.0,
        "{:#?}",
        closed.series("berth_connections_active")
    );
    proxy.shutdown().await;
}

// ---------------------------------------------------------------------------
// 2. Closes and connection durations.
// ---------------------------------------------------------------------------

#[tokio::test]
async fn client_close_1000_is_counted_with_its_duration() {
    let backends = ws_backends(&["b1"]).await;
    let proxy = proxy_for(&backends, "").await;
    let closes = "berth_websocket_closes_total";
    let close_labels = [("pool", "main"), ("initiator", "client"), ("code", "1000")];
    let count = "berth_websocket_connection_duration_seconds_count";
    let count_labels = [("pool", "main"), ("backend", "b1")];
    let before = scrape(&proxy).await;

    let mut ws = ws_connect(proxy.addr, false, "/").await;
    assert_eq!(whoami(&mut ws).await, "b1");
    close_ws(ws, Some(CloseCode::Normal)).await;

    let after = scrape_until(&proxy, |s| {
        delta(&before, s, closes, &close_labels) >= 1.0
            && delta(&before, s, count, &count_labels) >= 1.0
    })
    .await;
    assert_eq!(
        delta(&before, &after, closes, &close_labels),
        1.0,
        "{:#?}",
        after.series(closes)
    );
    assert_eq!(
        delta_sum(&before, &after, closes, &[]),
        1.0,
        "one connection, one close: {:#?}",
        after.series(closes)
    );
    assert_eq!(
        delta(&before, &after, count, &count_labels),
        1.0,
        "{:#?}",
        after.series(count)
    );
    // The lifetime was well under a second: it lands in the first bucket.
    let first_bucket = [("pool", "main"), ("backend", "b1"), ("le", "1")];
    assert_eq!(
        delta(
            &before,
            &after,
            "berth_websocket_connection_duration_seconds_bucket",
            &first_bucket
        ),
        1.0,
        "{:#?}",
        after.series("berth_websocket_connection_duration_seconds_bucket")
    );
    proxy.shutdown().await;
}

// ---------------------------------------------------------------------------
// 3. Upgrade results.
// ---------------------------------------------------------------------------

#[tokio::test]
async fn upgrade_results_for_client_refusals_and_success() {
    let backends = ws_backends(&["b1"]).await;
    let proxy = proxy_for(&backends, "").await;

    // Wrong version: 426, counted before any pool is chosen.
    let before = scrape(&proxy).await;
    let head =
        upgrade_head("/", "").replace("Sec-WebSocket-Version: 13", "Sec-WebSocket-Version: 8");
    let (_s, resp) = raw_request(proxy.addr, &head).await;
    assert!(resp.starts_with("HTTP/1.1 426"), "{resp}");
    assert_one_upgrade(
        &proxy,
        &before,
        &[("pool", ""), ("backend", ""), ("result", "bad_version")],
    )
    .await;

    // A key that is not 16 bytes of base64: 400.
    let before = scrape(&proxy).await;
    let head = upgrade_head("/", "").replace(
        "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==",
        "Sec-WebSocket-Key: c2hvcnQ=",
    );
    let (_s, resp) = raw_request(proxy.addr, &head).await;
    assert!(resp.starts_with("HTTP/1.1 400"), "{resp}");
    assert_one_upgrade(
        &proxy,
        &before,
        &[("pool", ""), ("backend", ""), ("result", "bad_key")],
    )
    .await;

    // An upgrade to something other than WebSocket: 400.
    let before = scrape(&proxy).await;
    let head = "GET / HTTP/1.1\r\nHost: localhost\r\nConnection: Upgrade\r\nUpgrade: h2c\r\n\r\n";
    let (_s, resp) = raw_request(proxy.addr, head).await;
    assert!(resp.starts_with("HTTP/1.1 400"), "{resp}");
    assert_one_upgrade(
        &proxy,
        &before,
        &[("pool", ""), ("backend", ""), ("result", "not_websocket")],
    )
    .await;

    // A real client: ok, with the pool and backend that took it.
    let before = scrape(&proxy).await;
    let mut ws = ws_connect(proxy.addr, false, "/").await;
    assert_eq!(whoami(&mut ws).await, "b1");
    assert_one_upgrade(
        &proxy,
        &before,
        &[("pool", "main"), ("backend", "b1"), ("result", "ok")],
    )
    .await;
    close_ws(ws, None).await;
    proxy.shutdown().await;
}

#[tokio::test]
async fn upgrade_result_backend_refused() {
    let (addr, _t) = raw_backend(
        b"HTTP/1.1 403 Forbidden\r\nContent-Length: 11\r\nX-Reason: no-token\r\n\r\nnot allowed",
    )
    .await;
    let proxy = Proxy::start(&config_for(&[addr], "")).await;
    let before = scrape(&proxy).await;
    let (_s, resp) = raw_request(proxy.addr, &upgrade_head("/", "")).await;
    assert!(resp.starts_with("HTTP/1.1 403"), "{resp}");
    assert_one_upgrade(
        &proxy,
        &before,
        &[
            ("pool", "main"),
            ("backend", "b1"),
            ("result", "backend_refused"),
        ],
    )
    .await;
    proxy.shutdown().await;
}

#[tokio::test]
async fn upgrade_result_bad_request_for_an_unusable_target() {
    let backends = ws_backends(&["b1"]).await;
    let proxy = proxy_for(&backends, "").await;
    let before = scrape(&proxy).await;
    // Absolute form without a path: what is left for the backend, "?x=1",
    // is no request target. Refused with 400 before a backend is chosen.
    let (_s, resp) = raw_request(proxy.addr, &upgrade_head("http://localhost?x=1", "")).await;
    assert!(resp.starts_with("HTTP/1.1 400"), "{resp}");
    assert_one_upgrade(
        &proxy,
        &before,
        &[("pool", "main"), ("backend", ""), ("result", "bad_request")],
    )
    .await;
    assert_eq!(
        backends[0]
            .connections
            .load(std::sync::atomic::Ordering::SeqCst),
        0
    );
    proxy.shutdown().await;
}

#[tokio::test]
async fn upgrade_result_backend_bad_accept() {
    let (addr, _t) = raw_backend(
        b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Accept: AAAAAAAAAAAAAAAAAAAAAAAAAAA=\r\n\r\n",
    )
    .await;
    let proxy = Proxy::start(&config_for(&[addr], "")).await;
    let before = scrape(&proxy).await;
    let (_s, resp) = raw_request(proxy.addr, &upgrade_head("/", "")).await;
    assert!(resp.starts_with("HTTP/1.1 502"), "{resp}");
    assert_one_upgrade(
        &proxy,
        &before,
        &[
            ("pool", "main"),
            ("backend", "b1"),
            ("result", "backend_bad_accept"),
        ],
    )
    .await;
    proxy.shutdown().await;
}

#[tokio::test]
async fn upgrade_result_backend_connect_error() {
    let dead: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let proxy = Proxy::start(&config_for(&[dead], "")).await;
    let before = scrape(&proxy).await;
    let (_s, resp) = raw_request(proxy.addr, &upgrade_head("/", "")).await;
    assert!(resp.starts_with("HTTP/1.1 502"), "{resp}");
    assert_one_upgrade(
        &proxy,
        &before,
        &[
            ("pool", "main"),
            ("backend", "b1"),
            ("result", "backend_connect_error"),
        ],
    )
    .await;
    proxy.shutdown().await;
}

#[tokio::test]
async fn upgrade_result_backend_timeout() {
    let (addr, _t) = raw_backend(b"").await;
    let proxy = Proxy::start(&config_for(&[addr], "response_timeout = \"300ms\"")).await;
    let before = scrape(&proxy).await;
    let (_s, resp) = raw_request(proxy.addr, &upgrade_head("/", "")).await;
    assert!(resp.starts_with("HTTP/1.1 504"), "{resp}");
    assert_one_upgrade(
        &proxy,
        &before,
        &[
            ("pool", "main"),
            ("backend", "b1"),
            ("result", "backend_timeout"),
        ],
    )
    .await;
    proxy.shutdown().await;
}

// ---------------------------------------------------------------------------
// 4. Messages, frames and bytes.
// ---------------------------------------------------------------------------

#[tokio::test]
async fn messages_frames_and_bytes_are_counted_each_way() {
    let backends = ws_backends(&["b1"]).await;
    let proxy = proxy_for(&backends, "").await;
    let mut ws = ws_connect(proxy.addr, false, "/").await;
    let before = scrape(&proxy).await;

    let texts = ["0123456789", "abcdefghij", "ABCDEFGHIJ"];
    let binary: Vec<u8> = (0..20u8).collect();
    for t in texts {
        ws.send(Message::text(t)).await.unwrap();
        let echo = tokio::time::timeout(SETTLE, ws.next()).await.unwrap();
        assert_eq!(echo.unwrap().unwrap(), Message::text(t));
    }
    ws.send(Message::binary(binary.clone())).await.unwrap();
    let echo = tokio::time::timeout(SETTLE, ws.next()).await.unwrap();
    assert_eq!(echo.unwrap().unwrap(), Message::binary(binary.clone()));

    let messages = "berth_websocket_messages_total";
    let frames = "berth_websocket_frames_total";
    let bytes = "berth_websocket_bytes_total";
    let c2b = [("pool", "main"), ("direction", "client_to_backend")];
    let b2c = [("pool", "main"), ("direction", "backend_to_client")];
    let frame_labels = |dir: &'static str, op: &'static str| {
        [("pool", "main"), ("direction", dir), ("opcode", op)]
    };
    let after = scrape_until(&proxy, |s| {
        delta(&before, s, messages, &c2b) >= 4.0 && delta(&before, s, messages, &b2c) >= 4.0
    })
    .await;

    assert_eq!(
        delta(&before, &after, messages, &c2b),
        4.0,
        "{:#?}",
        after.series(messages)
    );
    assert_eq!(
        delta(&before, &after, messages, &b2c),
        4.0,
        "{:#?}",
        after.series(messages)
    );
    for dir in ["client_to_backend", "backend_to_client"] {
        assert_eq!(
            delta(&before, &after, frames, &frame_labels(dir, "text")),
            3.0,
            "{dir}: {:#?}",
            after.series(frames)
        );
        assert_eq!(
            delta(&before, &after, frames, &frame_labels(dir, "binary")),
            1.0,
            "{dir}: {:#?}",
            after.series(frames)
        );
    }
    // Client frames are masked: 2 header bytes + 4 mask bytes each; the
    // backend's are not: 2 header bytes each.
    let payload = (texts.iter().map(|t| t.len()).sum::<usize>() + binary.len()) as f64;
    let c2b_bytes = delta(
        &before,
        &after,
        bytes,
        &[
            ("pool", "main"),
            ("backend", "b1"),
            ("direction", "client_to_backend"),
        ],
    );
    let b2c_bytes = delta(
        &before,
        &after,
        bytes,
        &[
            ("pool", "main"),
            ("backend", "b1"),
            ("direction", "backend_to_client"),
        ],
    );
    assert!(
        c2b_bytes >= payload + 4.0 * 6.0,
        "client_to_backend bytes grew by {c2b_bytes}, expected at least {}: {:#?}",
        payload + 24.0,
        after.series(bytes)
    );
    assert!(
        b2c_bytes >= payload + 4.0 * 2.0,
        "backend_to_client bytes grew by {b2c_bytes}, expected at least {}: {:#?}",
        payload + 8.0,
        after.series(bytes)
    );
    close_ws(ws, None).await;
    proxy.shutdown().await;
}

// ---------------------------------------------------------------------------
// 5. Plain HTTP.
// ---------------------------------------------------------------------------

#[tokio::test]
async fn plain_http_requests_are_counted_by_status_class() {
    let backend = http_backend("h1", Arc::new(tokio::sync::Notify::new())).await;
    let proxy = Proxy::start(&config_for(&[backend], "")).await;
    let requests = "berth_http_requests_total";
    let labels = [("pool", "main"), ("backend", "b1"), ("status_class", "2xx")];
    let count = "berth_http_request_duration_seconds_count";
    let before = scrape(&proxy).await;

    let (status, body) = http_get(proxy.addr, "/echo").await;
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("backend=h1"), "{body}");

    let after = scrape_until(&proxy, |s| {
        delta(&before, s, requests, &labels) >= 1.0
            && delta(&before, s, count, &[("pool", "main")]) >= 1.0
    })
    .await;
    assert_eq!(
        delta(&before, &after, requests, &labels),
        1.0,
        "{:#?}",
        after.series(requests)
    );
    assert_eq!(delta_sum(&before, &after, requests, &[]), 1.0);
    assert_eq!(
        delta(&before, &after, count, &[("pool", "main")]),
        1.0,
        "{:#?}",
        after.series(count)
    );
    proxy.shutdown().await;
}

// ---------------------------------------------------------------------------
// 6. TLS handshakes.
// ---------------------------------------------------------------------------

#[tokio::test]
async fn tls_handshakes_are_counted_by_result() {
    let backends = ws_backends(&["b1"]).await;
    let proxy = proxy_for(&backends, "").await;
    let tls_addr = proxy.tls_addr.unwrap();
    let handshakes = "berth_tls_handshakes_total";
    let ok = [("listener", "tls"), ("result", "ok")];
    let error = [("listener", "tls"), ("result", "error")];
    let duration_count = "berth_tls_handshake_duration_seconds_count";
    let resumed = "berth_tls_resumed_handshakes_total";

    let before = scrape(&proxy).await;
    let mut ws = ws_connect(tls_addr, true, "/").await;
    assert_eq!(whoami(&mut ws).await, "b1");
    let after = scrape_until(&proxy, |s| delta(&before, s, handshakes, &ok) >= 1.0).await;
    assert_eq!(
        delta(&before, &after, handshakes, &ok),
        1.0,
        "{:#?}",
        after.series(handshakes)
    );
    assert_eq!(delta(&before, &after, handshakes, &error), 0.0);
    assert_eq!(
        delta(&before, &after, duration_count, &[("listener", "tls")]),
        1.0,
        "{:#?}",
        after.series(duration_count)
    );
    close_ws(ws, None).await;
    assert_eq!(
        delta(&before, &after, resumed, &[("listener", "tls")]),
        0.0,
        "a first connection is a full handshake"
    );

    // A returning client (the same session cache) resumes.
    let before = scrape(&proxy).await;
    let client = tls_client_config();
    let kinds = [
        tls_handshake_kind(tls_addr, &client).await,
        tls_handshake_kind(tls_addr, &client).await,
    ];
    assert_eq!(
        kinds,
        [
            Some(rustls::HandshakeKind::Full),
            Some(rustls::HandshakeKind::Resumed)
        ]
    );
    let after = scrape_until(&proxy, |s| delta(&before, s, handshakes, &ok) >= 2.0).await;
    assert_eq!(delta(&before, &after, handshakes, &ok), 2.0);
    assert_eq!(
        delta(&before, &after, resumed, &[("listener", "tls")]),
        1.0,
        "{:#?}",
        after.series(resumed)
    );

    // Plain HTTP on the TLS port is not a ClientHello.
    let before = scrape(&proxy).await;
    let mut junk = TcpStream::connect(tls_addr).await.unwrap();
    junk.write_all(b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n")
        .await
        .unwrap();
    let mut sink = Vec::new();
    let _ = tokio::time::timeout(SETTLE, junk.read_to_end(&mut sink)).await;
    let after = scrape_until(&proxy, |s| delta(&before, s, handshakes, &error) >= 1.0).await;
    assert_eq!(
        delta(&before, &after, handshakes, &error),
        1.0,
        "{:#?}",
        after.series(handshakes)
    );
    assert_eq!(delta(&before, &after, handshakes, &ok), 0.0);
    assert_eq!(
        delta(&before, &after, duration_count, &[("listener", "tls")]),
        0.0,
        "only successful handshakes are timed"
    );
    proxy.shutdown().await;
}

#[tokio::test]
async fn a_stalled_tls_handshake_is_cut_off_and_counted_as_timeout() {
    // A client that opens TCP and sends half a ClientHello holds a socket
    // until handshake_timeout; then berth closes it and counts a timeout.
    let backends = ws_backends(&["b1"]).await;
    let addrs: Vec<_> = backends.iter().map(|b| b.addr).collect();
    let toml = config_for(&addrs, "").replace(
        "tls = { cert = \"{CERT}\", key = \"{KEY}\" }",
        "tls = { cert = \"{CERT}\", key = \"{KEY}\" }\nhandshake_timeout = \"300ms\"",
    );
    let proxy = Proxy::start(&toml).await;
    let handshakes = "berth_tls_handshakes_total";
    let timeout = [("listener", "tls"), ("result", "timeout")];
    let before = scrape(&proxy).await;
    let started = Instant::now();
    let mut stalled = TcpStream::connect(proxy.tls_addr.unwrap()).await.unwrap();
    stalled
        .write_all(&[0x16, 0x03, 0x01, 0x02, 0x00, 0x01])
        .await
        .unwrap();
    let mut sink = Vec::new();
    let closed = tokio::time::timeout(Duration::from_secs(5), stalled.read_to_end(&mut sink)).await;
    assert!(
        closed.is_ok(),
        "berth kept a stalled handshake open for 5 s"
    );
    let waited = started.elapsed();
    assert!(
        waited >= Duration::from_millis(250),
        "closed before the timeout: {waited:?}"
    );
    let after = scrape_until(&proxy, |s| delta(&before, s, handshakes, &timeout) >= 1.0).await;
    assert_eq!(delta(&before, &after, handshakes, &timeout), 1.0);
    assert_eq!(
        delta(
            &before,
            &after,
            handshakes,
            &[("listener", "tls"), ("result", "error")]
        ),
        0.0
    );
    proxy.shutdown().await;
}

// ---------------------------------------------------------------------------
// 7. Backend state, process and config gauges.
// ---------------------------------------------------------------------------

#[tokio::test]
async fn backend_state_process_and_config_gauges() {
    let backends = ws_backends(&["b1"]).await;
    let proxy = proxy_for(&backends, "").await;
    let s = scrape(&proxy).await;
    let b1 = [("pool", "main"), ("backend", "b1")];
    assert_eq!(
        s.get("berth_backend_up", &b1),
        Some(1.0),
        "{:#?}",
        s.series("berth_backend_up")
    );
    for (state, want) in [("up", 1.0), ("down", 0.0), ("draining", 0.0)] {
        assert_eq!(
            s.get(
                "berth_backend_state",
                &[("pool", "main"), ("backend", "b1"), ("state", state)]
            ),
            Some(want),
            "state={state}: {:#?}",
            s.series("berth_backend_state")
        );
    }
    let fds = s.get("process_open_fds", &[]);
    assert!(fds.is_some_and(|v| v > 0.0), "process_open_fds = {fds:?}");
    let rss = s.get("process_resident_memory_bytes", &[]);
    assert!(
        rss.is_some_and(|v| v > 0.0),
        "process_resident_memory_bytes = {rss:?}"
    );
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64();
    let loaded = s
        .get("berth_config_last_reload_success_timestamp_seconds", &[])
        .expect("berth_config_last_reload_success_timestamp_seconds");
    assert!(
        loaded > 0.0 && loaded <= now + 1.0 && now - loaded < 600.0,
        "last successful load at {loaded}, now {now}"
    );
    // The load at startup is a config load: counted as a success.
    assert_eq!(
        s.get("berth_config_reloads_total", &[("result", "success")]),
        Some(1.0)
    );
    assert_eq!(
        s.get("berth_config_reloads_total", &[("result", "failure")]),
        Some(0.0)
    );
    assert_eq!(
        s.get(
            "berth_build_info",
            &[("version", env!("CARGO_PKG_VERSION"))]
        ),
        Some(1.0),
        "{:#?}",
        s.series("berth_build_info")
    );
    // The families present from the start carry the documented types.
    for (family, ty) in [
        ("berth_connections_active", "gauge"),
        ("berth_websocket_connections_active", "gauge"),
        ("berth_backend_up", "gauge"),
        ("berth_backend_state", "gauge"),
        ("berth_websocket_bytes_total", "counter"),
        ("berth_websocket_messages_total", "counter"),
        ("berth_websocket_frames_total", "counter"),
        ("berth_config_reloads_total", "counter"),
        (
            "berth_config_last_reload_success_timestamp_seconds",
            "gauge",
        ),
        ("berth_build_info", "gauge"),
    ] {
        assert_eq!(
            s.types.get(family).map(String::as_str),
            Some(ty),
            "# TYPE of {family}"
        );
    }
    proxy.shutdown().await;
}

// ---------------------------------------------------------------------------
// 8. Admin health endpoints and the pools view.
// ---------------------------------------------------------------------------

#[tokio::test]
async fn admin_health_endpoints_and_pools_view() {
    let backends = ws_backends(&["b1", "b2"]).await;
    let proxy = proxy_for(&backends, "").await;
    let admin = proxy.admin.unwrap();

    let (status, _, body) = http_fetch(admin, "/healthz").await;
    assert_eq!(status, 200, "/healthz: {body}");
    let (status, _, body) = http_fetch(admin, "/readyz").await;
    assert_eq!(status, 200, "/readyz: {body}");

    // Three WebSockets, spread by round robin; count where each landed.
    let mut clients = Vec::new();
    let mut landed: HashMap<String, u64> = HashMap::new();
    for _ in 0..3 {
        let mut ws = ws_connect(proxy.addr, false, "/").await;
        *landed.entry(whoami(&mut ws).await).or_default() += 1;
        clients.push(ws);
    }

    let (status, content_type, body) = http_fetch(admin, "/admin/pools").await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(content_type, "application/json");
    let json: serde_json::Value = serde_json::from_str(&body).unwrap();
    let pools = json["pools"].as_object().expect("pools object");
    assert_eq!(pools.keys().collect::<Vec<_>>(), ["main"], "{body}");
    // The balance algorithm is named as the config spells it.
    assert_eq!(json["pools"]["main"]["balance"], "round_robin", "{body}");
    let list = json["pools"]["main"]["backends"]
        .as_array()
        .expect("backends array");
    assert_eq!(list.len(), 2, "{body}");
    let metrics = scrape(&proxy).await;
    let mut total = 0;
    for (b, entry) in backends.iter().zip(list) {
        assert_eq!(entry["id"], b.id.as_str(), "{body}");
        assert_eq!(entry["address"], b.addr.to_string(), "{body}");
        assert_eq!(entry["state"], "up", "{body}");
        let live = entry["live_connections"]
            .as_u64()
            .expect("live_connections");
        assert_eq!(
            live,
            landed.get(&b.id).copied().unwrap_or(0),
            "{}: {body}",
            b.id
        );
        // The metric agrees with the admin view.
        assert_eq!(
            metrics.val(
                "berth_websocket_connections_active",
                &[("pool", "main"), ("backend", b.id.as_str())]
            ),
            live as f64
        );
        total += live;
    }
    assert_eq!(total, 3, "{body}");

    for ws in clients {
        close_ws(ws, None).await;
    }
    proxy.shutdown().await;
}

// ---------------------------------------------------------------------------
// 9. promtool.
// ---------------------------------------------------------------------------

/// A config with the WebSocket pool "main" (all paths) and an HTTP pool
/// "web" (paths under /web).
fn two_pool_config(ws: SocketAddr, http: SocketAddr) -> String {
    let mut toml = config_for(&[ws], "");
    toml.push_str(&format!(
        "[[routes]]\npath_prefix = \"/web\"\npool = \"web\"\n\n\
         [pools.web]\nbalance = \"round_robin\"\n\n\
         [[pools.web.backends]]\nid = \"h1\"\naddress = \"{http}\"\n"
    ));
    toml
}

/// Drives WebSocket (ws and wss), refused upgrades, TLS errors and plain
/// HTTP through `proxy`, so that labelled series of every kind exist.
async fn drive_traffic(proxy: &Proxy) {
    for (addr, tls) in [(proxy.addr, false), (proxy.tls_addr.unwrap(), true)] {
        let mut ws = ws_connect(addr, tls, "/").await;
        ws.send(Message::text("hello")).await.unwrap();
        assert_eq!(ws.next().await.unwrap().unwrap(), Message::text("hello"));
        ws.send(Message::binary(vec![1u8, 2, 3])).await.unwrap();
        assert_eq!(
            ws.next().await.unwrap().unwrap(),
            Message::binary(vec![1u8, 2, 3])
        );
        close_ws(ws, Some(CloseCode::Normal)).await;
    }
    let head =
        upgrade_head("/", "").replace("Sec-WebSocket-Version: 13", "Sec-WebSocket-Version: 8");
    let (_s, resp) = raw_request(proxy.addr, &head).await;
    assert!(resp.starts_with("HTTP/1.1 426"), "{resp}");
    let mut junk = TcpStream::connect(proxy.tls_addr.unwrap()).await.unwrap();
    junk.write_all(b"not a client hello\r\n\r\n").await.unwrap();
    let mut sink = Vec::new();
    let _ = tokio::time::timeout(SETTLE, junk.read_to_end(&mut sink)).await;
    let (status, body) = http_get(proxy.addr, "/web/echo").await;
    assert_eq!(status, 200, "{body}");
    // Let the relay tasks record their closes.
    scrape_until(proxy, |s| {
        s.sum("berth_websocket_closes_total", &[]) >= 2.0
            && s.sum("berth_websocket_connections_active", &[]) == 0.0
    })
    .await;
}

#[tokio::test]
async fn promtool_check_metrics_is_clean() {
    let ws = WsBackend::start("b1").await;
    let http = http_backend("h1", Arc::new(tokio::sync::Notify::new())).await;
    let proxy = Proxy::start(&two_pool_config(ws.addr, http)).await;
    drive_traffic(&proxy).await;
    let s = scrape(&proxy).await;
    // The traffic above created labelled series of every type.
    for family in [
        "berth_websocket_upgrades_total",
        "berth_websocket_closes_total",
        "berth_websocket_connection_duration_seconds_bucket",
        "berth_http_requests_total",
        "berth_http_request_duration_seconds_bucket",
        "berth_tls_handshakes_total",
        "berth_tls_handshake_duration_seconds_bucket",
    ] {
        assert!(s.sum(family, &[]) > 0.0, "no traffic in {family}");
    }

    let mut child = match Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
    {
        Ok(child) => child,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => panic!(
            "promtool is not on PATH: run ./scripts/test.sh (it installs it) \
             or `apt-get install prometheus`"
        ),
        Err(e) => panic!("could not run promtool: {e}"),
    };
    child
        .stdin
        .take()
        .unwrap()
        .write_all(s.text.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success() && stdout.trim().is_empty() && stderr.trim().is_empty(),
        "promtool check metrics: {}\nstdout:\n{stdout}\nstderr:\n{stderr}",
        out.status
    );
    proxy.shutdown().await;
}

// ---------------------------------------------------------------------------
// 10. A real Prometheus server scraping berth.
// ---------------------------------------------------------------------------

/// Kills the Prometheus server when the test ends, passed or failed.
struct KillOnDrop(Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The scalar value of a one-element instant-vector answer, as Prometheus
/// writes it (a string).
fn instant_value(json: &serde_json::Value) -> Option<String> {
    if json["status"] != "success" {
        return None;
    }
    let result = json["data"]["result"].as_array()?;
    match result.as_slice() {
        [one] => one["value"][1].as_str().map(str::to_string),
        _ => None,
    }
}

#[tokio::test]
async fn prometheus_server_scrapes_live_connections() {
    let backends = ws_backends(&["b1", "b2"]).await;
    let proxy = proxy_for(&backends, "").await;
    let admin = proxy.admin.unwrap();

    let mut clients = Vec::new();
    for _ in 0..3 {
        let mut ws = ws_connect(proxy.addr, false, "/").await;
        whoami(&mut ws).await;
        clients.push(ws);
    }

    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("prometheus.yml");
    std::fs::write(
        &config,
        format!(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n\
             scrape_configs:\n  - job_name: berth\n    scrape_interval: 1s\n    \
             static_configs:\n      - targets: [\"{admin}\"]\n"
        ),
    )
    .unwrap();
    let log_path = dir.path().join("prometheus.log");
    let log = std::fs::File::create(&log_path).unwrap();
    let port = free_port();
    let web: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let child = match Command::new("prometheus")
        .arg(format!("--config.file={}", config.display()))
        .arg(format!(
            "--storage.tsdb.path={}",
            dir.path().join("data").display()
        ))
        .arg(format!("--web.listen-address={web}"))
        .stdin(Stdio::null())
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
    {
        Ok(child) => child,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => panic!(
            "prometheus is not on PATH: run ./scripts/test.sh (it installs it) \
             or `apt-get install prometheus`"
        ),
        Err(e) => panic!("could not run prometheus: {e}"),
    };
    let mut server = KillOnDrop(child);

    let query = "/api/v1/query?query=sum%28berth_websocket_connections_active%29";
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut last = String::from("(no answer yet)");
    let mut value = None;
    while Instant::now() < deadline {
        if let Ok(Some(status)) = server.0.try_wait() {
            panic!(
                "prometheus exited with {status}:\n{}",
                std::fs::read_to_string(&log_path).unwrap_or_default()
            );
        }
        // Prometheus may not be listening yet.
        if TcpStream::connect(web).await.is_ok() {
            let (status, _, body) = http_fetch(web, query).await;
            if status == 200 {
                let json: serde_json::Value = serde_json::from_str(&body).unwrap();
                value = instant_value(&json);
                if value.as_deref() == Some("3") {
                    break;
                }
            }
            last = format!("{status} {body}");
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    assert_eq!(
        value.as_deref(),
        Some("3"),
        "sum(berth_websocket_connections_active) from Prometheus; last answer: {last}\n\
         prometheus log:\n{}",
        std::fs::read_to_string(&log_path).unwrap_or_default()
    );
    drop(server);

    for ws in clients {
        close_ws(ws, None).await;
    }
    proxy.shutdown().await;
}
