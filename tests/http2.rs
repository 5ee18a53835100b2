//! HTTP/2 end to end, with the `h2` crate as the client: WebSockets over
//! extended CONNECT (RFC 8441) with every answer an HTTP/1.1 upgrade gets,
//! affinity, drains, resets, plain requests and SSE, the abuse cases, and
//! `http2 = false`.

mod support;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use http::Method;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio_tungstenite::tungstenite::Message;

use support::h2c::{self, frame, goaway_code, raw_h2, H2Conn, H2Ws};
use support::{
    admin_request, config_for, http_backend, raw_backend, with_listener_key, Proxy, WsBackend,
};

const ENHANCE_YOUR_CALM: u32 = 0xb;

/// Sends `text` and waits for its echo.
async fn echo(ws: &mut H2Ws, text: &str) {
    ws.send(Message::text(text)).await.unwrap();
    let got = tokio::time::timeout(Duration::from_secs(5), ws.next())
        .await
        .expect("an echo in time");
    match got {
        Some(Ok(Message::Text(t))) => assert_eq!(t.as_str(), text),
        other => panic!("expected the echo of {text:?}, got {other:?}"),
    }
}

async fn whoami(ws: &mut H2Ws) -> String {
    ws.send(Message::text("whoami")).await.unwrap();
    match tokio::time::timeout(Duration::from_secs(5), ws.next()).await {
        Ok(Some(Ok(Message::Text(t)))) => t.to_string(),
        other => panic!("no whoami answer: {other:?}"),
    }
}

/// The next Close's code (None: the stream ended without one).
async fn next_close(ws: &mut H2Ws, limit: Duration) -> Option<u16> {
    tokio::time::timeout(limit, async {
        while let Some(msg) = ws.next().await {
            match msg {
                Ok(Message::Close(f)) => return Some(f.map_or(1005, |f| u16::from(f.code))),
                Ok(_) => continue,
                Err(_) => return None,
            }
        }
        None
    })
    .await
    .expect("the connection ends in time")
}

/// The value of the metric line that starts with `series` (0 if absent).
async fn metric(proxy: &Proxy, series: &str) -> f64 {
    let (status, body) = admin_request(proxy.admin.unwrap(), "GET", "/metrics", None).await;
    assert_eq!(status, 200);
    body.lines()
        .find_map(|l| l.strip_prefix(series).and_then(|v| v.trim().parse().ok()))
        .unwrap_or(0.0)
}

async fn wait_for(what: &str, mut cond: impl AsyncFnMut() -> bool) {
    for _ in 0..100 {
        if cond().await {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("timed out waiting for {what}");
}

#[tokio::test]
async fn a_websocket_rides_an_h2_stream_with_the_backends_answer() {
    let b1 = WsBackend::start("b1").await;
    let proxy = Proxy::start(&config_for(&[b1.addr], "")).await;
    for tls in [false, true] {
        let mut conn = if tls {
            H2Conn::tls(proxy.tls_addr.unwrap()).await
        } else {
            H2Conn::plain(proxy.addr).await
        };
        assert!(conn.connect_protocol_enabled(), "ENABLE_CONNECT_PROTOCOL");
        let (resp, mut ws) = conn
            .ws(
                "/chat",
                &[
                    ("sec-websocket-protocol", "other, superchat"),
                    ("cookie", "a=1"),
                    ("cookie", "b=2"),
                ],
            )
            .await;
        // The backend's choices come back in the 200; its accept key (for
        // berth's own key) does not.
        assert_eq!(resp.headers()["sec-websocket-protocol"], "superchat");
        assert!(resp.headers().get("sec-websocket-accept").is_none());
        // The backend got one Cookie header, the fields joined.
        assert_eq!(resp.headers()["x-seen-cookie"], "a=1; b=2");
        echo(&mut ws, "hello over h2").await;
        let big = "x".repeat(200_000);
        echo(&mut ws, &big).await;
        ws.send(Message::Binary(Bytes::from_static(&[1, 2, 3])))
            .await
            .unwrap();
        match ws.next().await {
            Some(Ok(Message::Binary(b))) => assert_eq!(&b[..], &[1, 2, 3]),
            other => panic!("{other:?}"),
        }
        ws.close(None).await.unwrap();
        assert_eq!(
            next_close(&mut ws, Duration::from_secs(5)).await,
            Some(1005)
        );
    }
    let opened = "berth_websocket_opened_total{pool=\"main\",protocol=\"http2\"}";
    assert_eq!(metric(&proxy, opened).await, 2.0);
    for listener in ["public", "tls"] {
        let series =
            format!("berth_client_connections_total{{listener=\"{listener}\",protocol=\"http2\"}}");
        assert_eq!(metric(&proxy, &series).await, 1.0, "{series}");
    }
    // An HTTP/1.1 WebSocket is counted as such.
    let mut ws1 = support::ws_connect(proxy.addr, false, "/").await;
    assert_eq!(support::whoami(&mut ws1).await, "b1");
    let h1 = "berth_websocket_opened_total{pool=\"main\",protocol=\"http1\"}";
    assert_eq!(metric(&proxy, h1).await, 1.0);
    let h1c = "berth_client_connections_total{listener=\"public\",protocol=\"http1\"}";
    assert!(metric(&proxy, h1c).await >= 1.0);
    proxy.shutdown().await;
}

#[tokio::test]
async fn extended_connect_gets_the_same_refusals_as_an_upgrade() {
    let live = WsBackend::start("b1").await;
    // 502: nothing listens there.
    let dead = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap()
    };
    // 502: a 101 with a wrong accept key.
    let (bad_accept, _t1) = raw_backend(
        b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: bm90IHRoZSByaWdodCBrZXk=\r\n\r\n",
    )
    .await;
    // 504: the backend never answers.
    let (silent, _t2) = raw_backend(b"").await;
    // 401: the auth service refuses.
    let (auth, _t3) = raw_backend(
        b"HTTP/1.1 401 Unauthorized\r\ncontent-length: 0\r\nwww-authenticate: Bearer\r\n\r\n",
    )
    .await;
    let toml = format!(
        r#"
shutdown_window = "500ms"

[[listeners]]
name = "public"
bind = "127.0.0.1:0"

[admin]
bind = "127.0.0.1:0"

[[routes]]
host = "localhost"
path_prefix = "/live"
pool = "live"

[[routes]]
host = "localhost"
path_prefix = "/limited"
pool = "limited"

[[routes]]
host = "localhost"
path_prefix = "/dead"
pool = "dead"

[[routes]]
host = "localhost"
path_prefix = "/bad-accept"
pool = "bad_accept"

[[routes]]
host = "localhost"
path_prefix = "/silent"
pool = "silent"

[[routes]]
host = "localhost"
path_prefix = "/auth"
pool = "auth"

[pools.live]
allowed_origins = ["https://good.example"]
[[pools.live.backends]]
id = "live"
address = "{live}"

[pools.limited]
max_upgrades_per_second = 1
upgrade_burst = 1
retry_after_max = "3s"
[[pools.limited.backends]]
id = "limited"
address = "{live}"

[pools.dead]
connect_timeout = "1s"
[[pools.dead.backends]]
id = "dead"
address = "{dead}"

[pools.bad_accept]
[[pools.bad_accept.backends]]
id = "bad"
address = "{bad_accept}"

[pools.silent]
response_timeout = "300ms"
[[pools.silent.backends]]
id = "silent"
address = "{silent}"

[pools.auth]
[pools.auth.auth.forward]
url = "http://{auth}/verify"
[[pools.auth.backends]]
id = "authed"
address = "{live}"
"#,
        live = live.addr
    );
    let proxy = Proxy::start(&toml).await;
    let mut conn = H2Conn::plain(proxy.addr).await;
    let status = |r: &http::Response<()>| r.status().as_u16();

    let (r, _) = conn
        .connect_ws("/live", &[("sec-websocket-version", "8")])
        .await;
    assert_eq!(status(&r), 426);
    assert_eq!(r.headers()["sec-websocket-version"], "13");
    let (r, _) = conn.connect_ws("/live/%zz", &[]).await;
    assert_eq!(status(&r), 400, "malformed path");
    let (r, _) = conn.connect_ws("/nowhere", &[]).await;
    assert_eq!(status(&r), 404);
    let (r, _) = conn
        .connect_ws("/live", &[("origin", "https://evil.example")])
        .await;
    assert_eq!(status(&r), 403);
    let (r, io) = conn
        .connect_ws("/live", &[("origin", "https://good.example")])
        .await;
    assert_eq!(status(&r), 200);
    drop(io);
    let (r, _) = conn.connect_ws("/auth", &[]).await;
    assert_eq!(status(&r), 401);
    assert_eq!(r.headers()["www-authenticate"], "Bearer");
    let (r, _) = conn.connect_ws("/dead", &[]).await;
    assert_eq!(status(&r), 502);
    let (r, _) = conn.connect_ws("/bad-accept", &[]).await;
    assert_eq!(status(&r), 502);
    let (r, _) = conn.connect_ws("/silent", &[]).await;
    assert_eq!(status(&r), 504);
    let (r, first) = conn.connect_ws("/limited", &[]).await;
    assert_eq!(status(&r), 200);
    let (r, _) = conn.connect_ws("/limited", &[]).await;
    assert_eq!(status(&r), 503);
    let retry: u64 = r.headers()["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!((1..=3).contains(&retry), "{retry}");
    drop(first);
    // A CONNECT that is not a WebSocket is refused, and the connection
    // goes on serving.
    let req = http::Request::builder()
        .method(Method::CONNECT)
        .uri("http://localhost:443")
        .body(())
        .unwrap();
    conn.send = conn.send.clone().ready().await.unwrap();
    let (resp, _) = conn.send.send_request(req, false).unwrap();
    assert_eq!(resp.await.unwrap().status(), 400);
    let (_, mut ws) = conn.ws("/live", &[]).await;
    echo(&mut ws, "still here").await;
    proxy.shutdown().await;
}

/// The cookie of a `set-cookie` value (`name=value`).
fn cookie_of(set_cookie: &http::HeaderValue) -> String {
    set_cookie
        .to_str()
        .unwrap()
        .split(';')
        .next()
        .unwrap()
        .to_string()
}

#[tokio::test]
async fn cookie_and_hash_affinity_hold_with_split_cookie_fields() {
    let b1 = WsBackend::start("b1").await;
    let b2 = WsBackend::start("b2").await;
    let b3 = WsBackend::start("b3").await;
    let addrs = [b1.addr, b2.addr, b3.addr];
    let cookie = "affinity = \"cookie\"\n[pools.main.cookie]\nname = \"berth_main\"\nsecret = \"0123456789abcdef0123456789abcdef\"\n";
    let proxy = Proxy::start(&config_for(&addrs, cookie)).await;
    let mut conn = H2Conn::plain(proxy.addr).await;
    let (resp, mut ws) = conn.ws("/", &[]).await;
    let pinned = cookie_of(&resp.headers()["set-cookie"]);
    let home = whoami(&mut ws).await;
    for _ in 0..6 {
        // The affinity cookie in a field of its own, between others.
        let (resp, mut ws) = conn
            .ws(
                "/",
                &[("cookie", "app=1"), ("cookie", &pinned), ("cookie", "z=9")],
            )
            .await;
        assert_eq!(whoami(&mut ws).await, home);
        // berth's cookie is not the backend's business; the others are
        // joined into one header.
        assert_eq!(resp.headers()["x-seen-cookie"], "app=1; z=9");
    }
    proxy.shutdown().await;

    let hash = "affinity = \"hash\"\n[pools.main.hash]\nkey = \"cookie:room\"\n";
    let proxy = Proxy::start(&config_for(&addrs, hash)).await;
    let mut conn = H2Conn::plain(proxy.addr).await;
    for room in ["r1", "r2", "r3", "r4"] {
        let field = format!("room={room}");
        let (_, mut ws) = conn.ws("/", &[("cookie", "x=1"), ("cookie", &field)]).await;
        let first = whoami(&mut ws).await;
        for _ in 0..3 {
            let (_, mut ws) = conn.ws("/", &[("cookie", &field), ("cookie", "y=2")]).await;
            assert_eq!(whoami(&mut ws).await, first, "room {room}");
        }
        // HTTP/1.1 with the same cookie lands on the same backend too.
        let mut h1 = support::try_ws_connect(proxy.addr, false, "/", &[("cookie", &field)])
            .await
            .unwrap()
            .0;
        assert_eq!(support::whoami(&mut h1).await, first, "room {room} over h1");
    }
    proxy.shutdown().await;
}

/// A forward-auth service that allows a request only when it got exactly
/// one `Cookie` header holding both `a=1` and `session=s1`.
async fn cookie_checking_auth() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                return;
            };
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(
                    |req: hyper::Request<hyper::body::Incoming>| async move {
                        let fields: Vec<_> = req.headers().get_all("cookie").iter().collect();
                        let ok = fields.len() == 1
                            && fields[0].to_str().is_ok_and(|c| {
                                c.split("; ").any(|p| p == "a=1")
                                    && c.split("; ").any(|p| p == "session=s1")
                            });
                        let status = if ok { 200 } else { 401 };
                        let resp = hyper::Response::builder()
                            .status(status)
                            .body(http_body_util::Full::new(Bytes::new()))
                            .unwrap();
                        Ok::<_, Infallible>(resp)
                    },
                );
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
    addr
}

#[tokio::test]
async fn forward_auth_sees_split_cookies_as_one_header() {
    let b1 = WsBackend::start("b1").await;
    let auth = cookie_checking_auth().await;
    let extra = format!("[pools.main.auth.forward]\nurl = \"http://{auth}/verify\"\n");
    let proxy = Proxy::start(&config_for(&[b1.addr], &extra)).await;
    let mut conn = H2Conn::plain(proxy.addr).await;
    let (r, _) = conn.connect_ws("/", &[("cookie", "a=1")]).await;
    assert_eq!(r.status(), 401);
    let (_, mut ws) = conn
        .ws("/", &[("cookie", "a=1"), ("cookie", "session=s1")])
        .await;
    echo(&mut ws, "authorized").await;
    proxy.shutdown().await;
}

#[tokio::test]
async fn draining_one_backend_closes_its_stream_with_1012_and_spares_the_sibling() {
    let b1 = WsBackend::start("b1").await;
    let b2 = WsBackend::start("b2").await;
    let proxy = Proxy::start(&config_for(
        &[b1.addr, b2.addr],
        "drain_window = \"200ms\"\n",
    ))
    .await;
    let mut conn = H2Conn::tls(proxy.tls_addr.unwrap()).await;
    let (_, mut first) = conn.ws("/", &[]).await;
    let (_, mut second) = conn.ws("/", &[]).await;
    let a = whoami(&mut first).await;
    let b = whoami(&mut second).await;
    assert_ne!(a, b, "round robin spreads the two streams");
    let (mut on_b1, mut on_b2) = if a == "b1" {
        (first, second)
    } else {
        (second, first)
    };
    let (status, _) = admin_request(
        proxy.admin.unwrap(),
        "POST",
        "/admin/pools/main/backends/b1/drain",
        None,
    )
    .await;
    assert_eq!(status, 200);
    assert_eq!(
        next_close(&mut on_b1, Duration::from_secs(5)).await,
        Some(1012)
    );
    for i in 0..5 {
        echo(&mut on_b2, &format!("sibling {i}")).await;
    }
    // The connection itself is fine: a new stream goes to b2.
    let (_, mut third) = conn.ws("/", &[]).await;
    assert_eq!(whoami(&mut third).await, "b2");
    assert!(!conn.task.is_finished());
    proxy.shutdown().await;
}

#[tokio::test]
async fn a_stream_reset_by_the_client_is_a_client_gone() {
    let b1 = WsBackend::start("b1").await;
    let proxy = Proxy::start(&config_for(&[b1.addr], "")).await;
    let mut conn = H2Conn::plain(proxy.addr).await;
    let (_, io) = conn.connect_ws("/", &[]).await;
    let mut io = io.unwrap();
    // A masked text frame "hi", then the reset.
    let frame = support::client_frame(true, 1, b"hi");
    io.write_all(&frame).await.unwrap();
    let mut back = [0u8; 4];
    tokio::time::timeout(Duration::from_secs(5), io.read_exact(&mut back))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(&back, &[0x81, 2, b'h', b'i']);
    io.send.send_reset(h2::Reason::CANCEL);
    wait_for("the backend's Close", async || {
        b1.closes_seen.lock().unwrap().contains(&1001)
    })
    .await;
    // The connection goes on.
    let (_, mut ws) = conn.ws("/", &[]).await;
    echo(&mut ws, "after the reset").await;
    proxy.shutdown().await;
}

#[tokio::test]
async fn a_backend_that_dies_is_1014_on_the_stream() {
    let b1 = WsBackend::start("b1").await;
    let proxy = Proxy::start(&config_for(&[b1.addr], "")).await;
    let mut conn = H2Conn::plain(proxy.addr).await;
    // Raw frames: tokio-tungstenite reports a received 1014 as 1002.
    let (_, io) = conn.connect_ws("/", &[]).await;
    let mut io = io.unwrap();
    let (_, mut sibling) = conn.ws("/", &[]).await;
    io.write_all(&support::client_frame(true, 1, b"die"))
        .await
        .unwrap();
    let code = tokio::time::timeout(Duration::from_secs(5), support::read_until_close(&mut io))
        .await
        .unwrap();
    assert_eq!(code, Some(1014));
    echo(&mut sibling, "unharmed").await;
    proxy.shutdown().await;
}

#[tokio::test]
async fn plain_requests_and_sse_stream_over_h2() {
    let release = Arc::new(tokio::sync::Notify::new());
    let backend = http_backend("h1", Arc::clone(&release)).await;
    let proxy = Proxy::start(&config_for(&[backend], "")).await;
    let mut conn = H2Conn::plain(proxy.addr).await;
    let (resp, body) = conn
        .request(
            Method::GET,
            "/echo?x=1",
            &[("cookie", "a=1"), ("cookie", "b=2")],
            None,
        )
        .await;
    assert_eq!(resp.status(), 200);
    assert!(resp.headers().get("keep-alive").is_none());
    let text = h2c::body_text(body).await;
    assert!(text.contains("backend=h1"), "{text}");
    assert!(text.contains("path=/echo?x=1"), "{text}");
    assert!(text.contains("cookie: a=1; b=2"), "{text}");
    assert!(text.contains("host: localhost"), "{text}");
    let upload = Bytes::from(vec![7u8; 300_000]);
    let (resp, body) = conn
        .request(Method::POST, "/upload", &[], Some(upload.clone()))
        .await;
    assert_eq!(resp.status(), 200);
    let mut body = body;
    let mut got = 0;
    while let Some(chunk) = body.data().await {
        let chunk = chunk.unwrap();
        let _ = body.flow_control().release_capacity(chunk.len());
        got += chunk.len();
    }
    assert_eq!(got, upload.len());

    // SSE: the first event arrives while the backend holds the second.
    let (resp, mut events) = conn.request(Method::GET, "/sse", &[], None).await;
    assert_eq!(resp.headers()["content-type"], "text/event-stream");
    let first = tokio::time::timeout(Duration::from_secs(5), events.data())
        .await
        .expect("the first event before the second is released")
        .unwrap()
        .unwrap();
    assert_eq!(&first[..], b"data: first\n\n");
    release.notify_one();
    let second = tokio::time::timeout(Duration::from_secs(5), events.data())
        .await
        .expect("the second event")
        .unwrap()
        .unwrap();
    assert_eq!(&second[..], b"data: second\n\n");
    proxy.shutdown().await;
}

/// A bystander on its own HTTP/2 connection: it must keep echoing while
/// another client misbehaves.
async fn bystander(proxy: &Proxy) -> (H2Conn, H2Ws) {
    let mut conn = H2Conn::plain(proxy.addr).await;
    let (_, ws) = conn.ws("/", &[]).await;
    (conn, ws)
}

/// One HEADERS frame opening stream `id` with a GET of `/`.
fn get_headers(id: u32, end_stream: bool) -> Vec<u8> {
    let block = h2c::hpack_literals(&[
        (":method", "GET"),
        (":scheme", "http"),
        (":path", "/"),
        (":authority", "localhost"),
    ]);
    frame(0x1, 0x4 | u8::from(end_stream), id, &block)
}

#[tokio::test]
async fn rapid_reset_gets_goaway_and_others_are_served() {
    let b1 = WsBackend::start("b1").await;
    let proxy = Proxy::start(&config_for(&[b1.addr], "")).await;
    let (_by_conn, mut by) = bystander(&proxy).await;
    let mut attacker = raw_h2(proxy.addr).await;
    let mut burst = Vec::new();
    for i in 0..2000u32 {
        let id = 2 * i + 1;
        burst.extend(get_headers(id, true));
        burst.extend(frame(0x3, 0, id, &8u32.to_be_bytes()));
    }
    // Written as fast as the socket takes it; berth may stop reading.
    let writer = tokio::spawn(async move {
        let _ = attacker.write_all(&burst).await;
        attacker
    });
    let mut attacker = tokio::time::timeout(Duration::from_secs(10), writer)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        goaway_code(&mut attacker, Duration::from_secs(10)).await,
        Some(ENHANCE_YOUR_CALM)
    );
    echo(&mut by, "unaffected").await;
    proxy.shutdown().await;
}

#[tokio::test]
async fn ping_and_settings_floods_get_goaway() {
    let b1 = WsBackend::start("b1").await;
    let proxy = Proxy::start(&config_for(&[b1.addr], "")).await;
    let (_by_conn, mut by) = bystander(&proxy).await;
    for flood in [
        frame(0x6, 0, 0, &[7; 8]),
        frame(0x4, 0, 0, &[0, 0x3, 0, 0, 0, 100]),
    ] {
        let mut attacker = raw_h2(proxy.addr).await;
        let many: Vec<u8> = flood.repeat(5000);
        let writer = tokio::spawn(async move {
            let _ = attacker.write_all(&many).await;
            attacker
        });
        // The attacker reads its answers (pongs, acks) until the GOAWAY.
        let mut attacker = tokio::time::timeout(Duration::from_secs(10), writer)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(
            goaway_code(&mut attacker, Duration::from_secs(10)).await,
            Some(ENHANCE_YOUR_CALM),
            "flood of frame type {}",
            flood[3]
        );
        echo(&mut by, "unaffected").await;
    }
    proxy.shutdown().await;
}

#[tokio::test]
async fn continuation_flood_and_hpack_bomb_get_goaway() {
    let b1 = WsBackend::start("b1").await;
    let proxy = Proxy::start(&config_for(&[b1.addr], "")).await;
    let (_by_conn, mut by) = bystander(&proxy).await;

    // CONTINUATION frames without end, each with one small header.
    let mut attacker = raw_h2(proxy.addr).await;
    let mut flood = frame(
        0x1,
        0,
        1,
        &h2c::hpack_literals(&[(":method", "GET"), (":path", "/")]),
    );
    for i in 0..2000 {
        let name = format!("x-{i}");
        flood.extend(frame(0x9, 0, 1, &h2c::hpack_literals(&[(&name, "v")])));
    }
    let _ = attacker.write_all(&flood).await;
    assert_eq!(
        goaway_code(&mut attacker, Duration::from_secs(10)).await,
        Some(ENHANCE_YOUR_CALM)
    );
    echo(&mut by, "unaffected by the flood").await;

    // An HPACK bomb: one 4 KiB value into the dynamic table, then referred
    // to by its one-byte index thousands of times.
    let mut attacker = raw_h2(proxy.addr).await;
    let mut block = vec![0x40, 5];
    block.extend_from_slice(b"x-big");
    // Value length 4000 as an HPACK integer with a 7-bit prefix.
    let mut n = 4000 - 127;
    block.push(0x7f);
    while n >= 128 {
        block.push(((n % 128) | 0x80) as u8);
        n /= 128;
    }
    block.push(n as u8);
    block.extend(std::iter::repeat_n(b'a', 4000));
    block.extend(std::iter::repeat_n(0xbe, 12_000));
    let _ = attacker.write_all(&frame(0x1, 0x4, 1, &block)).await;
    assert_eq!(
        goaway_code(&mut attacker, Duration::from_secs(10)).await,
        Some(ENHANCE_YOUR_CALM)
    );
    echo(&mut by, "unaffected by the bomb").await;
    proxy.shutdown().await;
}

#[tokio::test]
async fn settings_carry_connect_protocol_and_max_concurrent_streams() {
    let b1 = WsBackend::start("b1").await;
    let toml = with_listener_key(&config_for(&[b1.addr], ""), "max_concurrent_streams = 7", 1);
    let proxy = Proxy::start(&toml).await;
    let mut s = raw_h2(proxy.addr).await;
    let (kind, flags, stream, payload) = h2c::read_raw_frame(&mut s).await.unwrap();
    assert_eq!((kind, flags, stream), (0x4, 0, 0));
    let settings: Vec<(u16, u32)> = payload
        .chunks(6)
        .map(|c| {
            (
                u16::from_be_bytes([c[0], c[1]]),
                u32::from_be_bytes([c[2], c[3], c[4], c[5]]),
            )
        })
        .collect();
    assert!(settings.contains(&(0x8, 1)), "{settings:?}");
    assert!(settings.contains(&(0x3, 7)), "{settings:?}");
    assert!(settings.contains(&(0x6, 64 * 1024)), "{settings:?}");
    // The eighth concurrent stream is refused; the seven are served.
    let mut conn = H2Conn::plain(proxy.addr).await;
    let mut open = Vec::new();
    for _ in 0..7 {
        let (_, ws) = conn.ws("/", &[]).await;
        open.push(ws);
    }
    let req = http::Request::builder()
        .method(Method::CONNECT)
        .uri("http://localhost/")
        .extension(h2::ext::Protocol::from_static("websocket"))
        .header("sec-websocket-version", "13")
        .body(())
        .unwrap();
    let refused = tokio::time::timeout(Duration::from_secs(5), async {
        let mut send = conn.send.clone().ready().await.unwrap();
        let (resp, _) = send.send_request(req, false).unwrap();
        resp.await
    })
    .await;
    // Either h2 holds the request back (its peer allows 7) or berth
    // refuses it: it is never served.
    if let Ok(result) = refused {
        let err = result.expect_err("no eighth stream");
        assert_eq!(err.reason(), Some(h2::Reason::REFUSED_STREAM), "{err}");
    }
    for ws in &mut open {
        echo(ws, "one of seven").await;
    }
    proxy.shutdown().await;
}

#[tokio::test]
async fn shutdown_closes_streams_with_1001_then_goaway() {
    let b1 = WsBackend::start("b1").await;
    let proxy = Proxy::start(&config_for(&[b1.addr], "")).await;
    let mut conn = H2Conn::plain(proxy.addr).await;
    let (_, mut a) = conn.ws("/", &[]).await;
    let (_, mut b) = conn.ws("/", &[]).await;
    echo(&mut a, "before").await;
    let H2Conn { send, task } = conn;
    let stopping = tokio::spawn(proxy.shutdown());
    assert_eq!(next_close(&mut a, Duration::from_secs(5)).await, Some(1001));
    assert_eq!(next_close(&mut b, Duration::from_secs(5)).await, Some(1001));
    drop((a, b, send));
    // The connection then ends with GOAWAY(NO_ERROR): a clean end.
    let ended = tokio::time::timeout(Duration::from_secs(10), task)
        .await
        .expect("the connection ends")
        .unwrap();
    assert!(ended.is_ok(), "{ended:?}");
    stopping.await.unwrap();
    assert!(b1.closes_seen.lock().unwrap().iter().all(|&c| c == 1001));
}

#[tokio::test]
async fn http2_false_keeps_a_listener_on_http1() {
    let b1 = WsBackend::start("b1").await;
    // Both listeners (the admin table's bind comes third).
    let toml = with_listener_key(&config_for(&[b1.addr], ""), "http2 = false", 2);
    let proxy = Proxy::start(&toml).await;
    // TLS: ALPN settles on http/1.1 even when the client prefers h2.
    let tcp = tokio::net::TcpStream::connect(proxy.tls_addr.unwrap())
        .await
        .unwrap();
    let mut cfg = (*support::tls_client_config()).clone();
    cfg.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    let tls = tokio_rustls::TlsConnector::from(Arc::new(cfg))
        .connect(
            rustls_pki_types::ServerName::try_from("localhost").unwrap(),
            tcp,
        )
        .await
        .unwrap();
    assert_eq!(tls.get_ref().1.alpn_protocol(), Some(&b"http/1.1"[..]));
    // Plain: the preface is not HTTP/1.1; hyper's HTTP/1.1 server closes
    // the connection without an answer (no HTTP/2 SETTINGS either).
    let mut s = raw_h2(proxy.addr).await;
    let mut got = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut got)).await;
    assert!(read.is_ok(), "closed at once");
    assert!(got.is_empty() || got.starts_with(b"HTTP/1.1 4"), "{got:?}");
    // WebSockets work as before.
    let mut ws = support::ws_connect(proxy.tls_addr.unwrap(), true, "/").await;
    assert_eq!(support::whoami(&mut ws).await, "b1");
    proxy.shutdown().await;
}

#[tokio::test]
async fn a_half_sent_preface_times_out_and_holds_nothing_else() {
    let b1 = WsBackend::start("b1").await;
    let toml = with_listener_key(
        &config_for(&[b1.addr], ""),
        "handshake_timeout = \"300ms\"",
        1,
    );
    let proxy = Proxy::start(&toml).await;
    let mut s = tokio::net::TcpStream::connect(proxy.addr).await.unwrap();
    s.write_all(&h2c::PREFACE[..20]).await.unwrap();
    let mut got = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut got)).await;
    assert!(read.is_ok(), "closed after handshake_timeout");
    assert!(got.is_empty(), "nothing sent: {got:?}");
    let series = "berth_client_connections_total{listener=\"public\",protocol=\"http2\"}";
    assert_eq!(metric(&proxy, series).await, 0.0);
    proxy.shutdown().await;
}

#[tokio::test]
async fn an_idle_connection_gets_goaway_after_handshake_timeout_but_not_one_with_a_websocket() {
    let b1 = WsBackend::start("b1").await;
    let toml = with_listener_key(
        &config_for(&[b1.addr], ""),
        "handshake_timeout = \"300ms\"",
        1,
    );
    let proxy = Proxy::start(&toml).await;
    let idle = H2Conn::plain(proxy.addr).await;
    let mut busy = H2Conn::plain(proxy.addr).await;
    let (_, mut ws) = busy.ws("/", &[]).await;
    // Idle for more than two handshake_timeouts: closed cleanly (GOAWAY).
    let ended = tokio::time::timeout(Duration::from_secs(5), idle.task)
        .await
        .expect("the idle connection is closed")
        .unwrap();
    assert!(ended.is_ok(), "{ended:?}");
    tokio::time::sleep(Duration::from_millis(700)).await;
    // The one carrying a quiet WebSocket stays.
    echo(&mut ws, "still open").await;
    assert!(!busy.task.is_finished());
    proxy.shutdown().await;
}

/// Reads frames from a raw stream until a Close (its code) or `limit`;
/// counts the Pings seen on the way.
async fn close_after_pings(io: &mut h2c::H2Io, limit: Duration) -> (Option<u16>, usize) {
    let mut pings = 0;
    let code = tokio::time::timeout(limit, async {
        while let Some((_, op, payload)) = support::read_frame(io).await {
            match op {
                0x9 => pings += 1,
                0x8 => {
                    return Some(if payload.len() >= 2 {
                        u16::from_be_bytes([payload[0], payload[1]])
                    } else {
                        1005
                    })
                }
                _ => {}
            }
        }
        None
    })
    .await
    .unwrap_or(None);
    (code, pings)
}

#[tokio::test]
async fn the_relays_guarantees_hold_on_a_stream() {
    let b1 = WsBackend::start("b1").await;
    let extra =
        "idle_timeout = \"600ms\"\nping_interval = \"100ms\"\nmax_message_size = \"1 KiB\"\n";
    let proxy = Proxy::start(&config_for(&[b1.addr], extra)).await;
    let mut conn = H2Conn::plain(proxy.addr).await;

    // A Ping from berth while the stream carries no data, then Close 1001
    // after idle_timeout.
    let (_, io) = conn.connect_ws("/", &[]).await;
    let mut quiet = io.unwrap();
    let (code, pings) = close_after_pings(&mut quiet, Duration::from_secs(5)).await;
    assert_eq!(code, Some(1001), "idle_timeout");
    // One Ping at a time: the next waits for its Pong (not sent here).
    assert_eq!(pings, 1, "berth's Ping reached the stream");

    // A message over max_message_size: 1009.
    let (_, io) = conn.connect_ws("/", &[]).await;
    let mut big = io.unwrap();
    big.write_all(&support::client_frame(true, 1, &[b'x'; 2048]))
        .await
        .unwrap();
    let (code, _) = close_after_pings(&mut big, Duration::from_secs(5)).await;
    assert_eq!(code, Some(1009));

    // An unmasked client frame breaks RFC 6455: 1002.
    let (_, io) = conn.connect_ws("/", &[]).await;
    let mut bad = io.unwrap();
    bad.write_all(&[0x81, 2, b'h', b'i']).await.unwrap();
    let (code, _) = close_after_pings(&mut bad, Duration::from_secs(5)).await;
    assert_eq!(code, Some(1002));

    // Counted in the same metrics as HTTP/1.1.
    let closes = "berth_websocket_closes_total{code=\"1009\",initiator=\"proxy\",pool=\"main\"}";
    wait_for("the 1009 in the metrics", async || {
        metric(&proxy, closes).await >= 1.0
    })
    .await;
    let frames = "berth_websocket_frames_total{direction=\"backend_to_client\",opcode=\"ping\",pool=\"main\"}";
    assert_eq!(
        metric(&proxy, frames).await,
        0.0,
        "berth's own pings are not relayed frames"
    );
    proxy.shutdown().await;
}
