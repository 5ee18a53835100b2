//! WebSocket proxying end to end: real tokio-tungstenite clients and
//! backends, real TLS, the real proxy on 127.0.0.1:0.

mod support;

use std::collections::HashSet;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_tungstenite::tungstenite::Message;

async fn three_backends() -> (Vec<WsBackend>, Proxy) {
    let mut backends = Vec::new();
    for id in ["b1", "b2", "b3"] {
        backends.push(WsBackend::start(id).await);
    }
    let addrs: Vec<_> = backends.iter().map(|b| b.addr).collect();
    let proxy = Proxy::start(&config_for(&addrs, "")).await;
    (backends, proxy)
}

#[tokio::test]
async fn echoes_text_and_binary_over_ws_and_wss() {
    let (_b, proxy) = three_backends().await;
    for (addr, tls) in [(proxy.addr, false), (proxy.tls_addr.unwrap(), true)] {
        let mut ws = ws_connect(addr, tls, "/chat").await;
        ws.send(Message::text("hello")).await.unwrap();
        assert_eq!(ws.next().await.unwrap().unwrap(), Message::text("hello"));
        let bin: Vec<u8> = (0..=255u8).cycle().take(70_000).collect();
        ws.send(Message::binary(bin.clone())).await.unwrap();
        assert_eq!(ws.next().await.unwrap().unwrap(), Message::binary(bin));
        ws.close(None).await.unwrap();
    }
    proxy.shutdown().await;
}

#[tokio::test]
async fn round_robin_spreads_connections_across_backends() {
    let (_b, proxy) = three_backends().await;
    let mut seen = HashSet::new();
    for _ in 0..6 {
        let mut ws = ws_connect(proxy.addr, false, "/").await;
        seen.insert(whoami(&mut ws).await);
    }
    assert_eq!(
        seen,
        HashSet::from(["b1".to_string(), "b2".into(), "b3".into()])
    );
    proxy.shutdown().await;
}

#[tokio::test]
async fn wrong_version_gets_426_with_supported_version() {
    let (_b, proxy) = three_backends().await;
    let head =
        upgrade_head("/", "").replace("Sec-WebSocket-Version: 13", "Sec-WebSocket-Version: 8");
    let (_s, resp) = raw_request(proxy.addr, &head).await;
    assert!(resp.starts_with("HTTP/1.1 426"), "{resp}");
    assert!(
        resp.to_ascii_lowercase()
            .contains("sec-websocket-version: 13"),
        "{resp}"
    );
    proxy.shutdown().await;
}

#[tokio::test]
async fn bad_or_missing_key_gets_400() {
    let (backends, proxy) = three_backends().await;
    for key_line in [
        "Sec-WebSocket-Key: c2hvcnQ=",
        "Sec-WebSocket-Key: not base64 at all!!!!!!!",
        "",
    ] {
        let head = upgrade_head("/", "").replace(
            "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n",
            &if key_line.is_empty() {
                String::new()
            } else {
                format!("{key_line}\r\n")
            },
        );
        let (_s, resp) = raw_request(proxy.addr, &head).await;
        assert!(resp.starts_with("HTTP/1.1 400"), "{key_line}: {resp}");
    }
    // Nothing reached a backend.
    assert!(backends
        .iter()
        .all(|b| b.connections.load(std::sync::atomic::Ordering::SeqCst) == 0));
    proxy.shutdown().await;
}

#[tokio::test]
async fn non_websocket_upgrade_gets_400() {
    let (_b, proxy) = three_backends().await;
    let head = "GET / HTTP/1.1\r\nHost: localhost\r\nConnection: Upgrade\r\nUpgrade: h2c\r\n\r\n";
    let (_s, resp) = raw_request(proxy.addr, head).await;
    assert!(resp.starts_with("HTTP/1.1 400"), "{resp}");
    proxy.shutdown().await;
}

#[tokio::test]
async fn wrong_accept_from_backend_gives_502() {
    let (addr, _t) = raw_backend(
        b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Accept: AAAAAAAAAAAAAAAAAAAAAAAAAAA=\r\n\r\n",
    )
    .await;
    let proxy = Proxy::start(&config_for(&[addr], "")).await;
    let (_s, resp) = raw_request(proxy.addr, &upgrade_head("/", "")).await;
    assert!(resp.starts_with("HTTP/1.1 502"), "{resp}");
    // A missing accept header is refused the same way.
    let (addr2, _t2) = raw_backend(
        b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n",
    )
    .await;
    let proxy2 = Proxy::start(&config_for(&[addr2], "")).await;
    let (_s, resp) = raw_request(proxy2.addr, &upgrade_head("/", "")).await;
    assert!(resp.starts_with("HTTP/1.1 502"), "{resp}");
    proxy.shutdown().await;
    proxy2.shutdown().await;
}

#[tokio::test]
async fn non_101_answer_is_passed_through_unchanged() {
    let (addr, _t) = raw_backend(
        b"HTTP/1.1 403 Forbidden\r\nContent-Length: 11\r\nX-Reason: no-token\r\n\r\nnot allowed",
    )
    .await;
    let proxy = Proxy::start(&config_for(&[addr], "")).await;
    let (mut s, resp) = raw_request(proxy.addr, &upgrade_head("/", "")).await;
    assert!(resp.starts_with("HTTP/1.1 403"), "{resp}");
    assert!(
        resp.to_ascii_lowercase().contains("x-reason: no-token"),
        "{resp}"
    );
    let mut body = [0u8; 11];
    s.read_exact(&mut body).await.unwrap();
    assert_eq!(&body, b"not allowed");
    proxy.shutdown().await;
}

#[tokio::test]
async fn subprotocol_and_backend_headers_pass_through() {
    let (_b, proxy) = three_backends().await;
    let (mut ws, resp) = try_ws_connect(
        proxy.tls_addr.unwrap(),
        true,
        "/",
        &[("sec-websocket-protocol", "chat, superchat")],
    )
    .await
    .unwrap();
    assert_eq!(resp.headers()["sec-websocket-protocol"], "superchat");
    // The backend saw X-Forwarded-For with the client address.
    assert_eq!(resp.headers()["x-seen-xff"], "127.0.0.1");
    ws.send(Message::text("x")).await.unwrap();
    assert_eq!(ws.next().await.unwrap().unwrap(), Message::text("x"));
    proxy.shutdown().await;
}

#[tokio::test]
async fn sixteen_mib_messages_arrive_intact_both_ways() {
    let (_b, proxy) = three_backends().await;
    for (addr, tls) in [(proxy.addr, false), (proxy.tls_addr.unwrap(), true)] {
        let mut ws = ws_connect(addr, tls, "/").await;
        let big: Vec<u8> = (0..16 * 1024 * 1024u32)
            .map(|i| (i.wrapping_mul(2_654_435_761) >> 24) as u8)
            .collect();
        ws.send(Message::binary(big.clone())).await.unwrap();
        let got = tokio::time::timeout(Duration::from_secs(60), ws.next())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        assert_eq!(got.into_data().as_ref(), big.as_slice());
    }
    proxy.shutdown().await;
}

#[tokio::test]
async fn fragmented_message_with_interleaved_ping_arrives_intact() {
    let (_b, proxy) = three_backends().await;
    let mut s = raw_ws(proxy.addr).await;
    // "Hello, fragmented world" in three fragments, a Ping between them.
    let mut bytes = client_frame(false, 0x1, b"Hello, ");
    bytes.extend(client_frame(true, 0x9, b"are you there"));
    bytes.extend(client_frame(false, 0x0, b"fragmented "));
    bytes.extend(client_frame(true, 0x0, b"world"));
    // Written a few bytes at a time so headers split across reads.
    for chunk in bytes.chunks(5) {
        s.write_all(chunk).await.unwrap();
        s.flush().await.unwrap();
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    // The backend (tungstenite) answers the Ping and echoes the message.
    let mut got_pong = false;
    let mut got_text = None;
    while got_text.is_none() || !got_pong {
        let (fin, op, payload) = tokio::time::timeout(Duration::from_secs(5), read_frame(&mut s))
            .await
            .unwrap()
            .unwrap();
        match op {
            0xA => {
                assert_eq!(payload, b"are you there");
                got_pong = true;
            }
            0x1 => {
                assert!(fin);
                got_text = Some(String::from_utf8(payload).unwrap());
            }
            other => panic!("unexpected opcode {other}"),
        }
    }
    assert_eq!(got_text.unwrap(), "Hello, fragmented world");
    proxy.shutdown().await;
}

#[tokio::test]
async fn client_half_close_is_propagated_and_replies_still_arrive() {
    let (backends, proxy) = three_backends().await;
    let mut s = raw_ws(proxy.addr).await;
    s.write_all(&client_frame(true, 0x1, b"before FIN"))
        .await
        .unwrap();
    // Half-close: no Close frame, just FIN on our write side.
    s.shutdown().await.unwrap();
    let (_, op, payload) = tokio::time::timeout(Duration::from_secs(5), read_frame(&mut s))
        .await
        .unwrap()
        .unwrap();
    assert_eq!((op, payload.as_slice()), (0x1, &b"before FIN"[..]));
    // The backend was told the client went away (1001) and its Close reply
    // reaches the client, then the connection ends.
    let code = tokio::time::timeout(Duration::from_secs(5), read_until_close(&mut s))
        .await
        .unwrap();
    assert_eq!(code, Some(1001));
    let seen: Vec<u16> = backends
        .iter()
        .flat_map(|b| b.closes_seen.lock().unwrap().clone())
        .collect();
    assert_eq!(seen, vec![1001]);
    proxy.shutdown().await;
}

#[tokio::test]
async fn no_route_gets_404() {
    let b = WsBackend::start("b1").await;
    let toml = config_for(&[b.addr], "").replace(
        "[[routes]]\npool = \"main\"",
        "[[routes]]\npath_prefix = \"/ws\"\npool = \"main\"",
    );
    let proxy = Proxy::start(&toml).await;
    let (_s, resp) = raw_request(proxy.addr, &upgrade_head("/other", "")).await;
    assert!(resp.starts_with("HTTP/1.1 404"), "{resp}");
    let mut ws = ws_connect(proxy.addr, false, "/ws/room").await;
    assert_eq!(whoami(&mut ws).await, "b1");
    proxy.shutdown().await;
}

#[tokio::test]
async fn unreachable_backends_give_502_and_one_dead_backend_is_skipped() {
    // A port with nothing listening.
    let dead = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap()
    };
    let proxy = Proxy::start(&config_for(&[dead], "")).await;
    let (_s, resp) = raw_request(proxy.addr, &upgrade_head("/", "")).await;
    assert!(resp.starts_with("HTTP/1.1 502"), "{resp}");
    proxy.shutdown().await;

    // One dead, one alive: every connection succeeds (retried on the other).
    let alive = WsBackend::start("alive").await;
    let proxy = Proxy::start(&config_for(&[dead, alive.addr], "")).await;
    for _ in 0..6 {
        let mut ws = ws_connect(proxy.addr, false, "/").await;
        assert_eq!(whoami(&mut ws).await, "alive");
    }
    proxy.shutdown().await;
}

#[tokio::test]
async fn backend_that_never_answers_gives_504() {
    let (addr, _t) = raw_backend(b"").await;
    let proxy = Proxy::start(&config_for(&[addr], "response_timeout = \"300ms\"")).await;
    let started = std::time::Instant::now();
    let (_s, resp) = raw_request(proxy.addr, &upgrade_head("/", "")).await;
    assert!(resp.starts_with("HTTP/1.1 504"), "{resp}");
    assert!(started.elapsed() < Duration::from_secs(5));
    proxy.shutdown().await;
}

#[tokio::test]
async fn garbage_on_one_connection_does_not_affect_others() {
    let (_b, proxy) = three_backends().await;
    let mut good = ws_connect(proxy.addr, false, "/").await;
    // Garbage instead of HTTP, and an unmasked frame after a valid upgrade.
    let mut junk = tokio::net::TcpStream::connect(proxy.addr).await.unwrap();
    junk.write_all(&[0xFFu8; 4096]).await.unwrap();
    let mut bad = raw_ws(proxy.addr).await;
    bad.write_all(&[0x81, 0x02, b'h', b'i']).await.unwrap();
    // The unmasked frame is a protocol error: Close 1002.
    let code = tokio::time::timeout(Duration::from_secs(5), read_until_close(&mut bad))
        .await
        .unwrap();
    assert_eq!(code, Some(1002));
    good.send(Message::text("still here")).await.unwrap();
    assert_eq!(
        good.next().await.unwrap().unwrap(),
        Message::text("still here")
    );
    proxy.shutdown().await;
}

#[tokio::test]
async fn origins_outside_allowed_origins_get_403() {
    let b = WsBackend::start("b1").await;
    let proxy = Proxy::start(&config_for(
        &[b.addr],
        "allowed_origins = [\"https://chat.example.com\"]",
    ))
    .await;
    let (_s, resp) = raw_request(
        proxy.addr,
        &upgrade_head("/", "Origin: https://evil.example.net\r\n"),
    )
    .await;
    assert!(resp.starts_with("HTTP/1.1 403"), "{resp}");
    let (_s, resp) = raw_request(
        proxy.addr,
        &upgrade_head("/", "Origin: https://Chat.Example.com\r\n"),
    )
    .await;
    assert!(resp.starts_with("HTTP/1.1 101"), "{resp}");
    // Non-browser clients send no Origin and are let through.
    let (_s, resp) = raw_request(proxy.addr, &upgrade_head("/", "")).await;
    assert!(resp.starts_with("HTTP/1.1 101"), "{resp}");
    proxy.shutdown().await;
}

#[tokio::test]
async fn oversized_or_fragmented_control_frames_close_both_sides_with_1002() {
    let b = WsBackend::start("b1").await;
    let proxy = Proxy::start(&config_for(&[b.addr], "")).await;
    // A Ping with 126 bytes of payload, then a Ping without FIN.
    for bad in [
        client_frame(true, 0x9, &[7u8; 126]),
        client_frame(false, 0x9, b"split"),
    ] {
        let mut s = raw_ws(proxy.addr).await;
        s.write_all(&client_frame(true, 0x1, b"fine"))
            .await
            .unwrap();
        let (_, op, payload) = read_frame(&mut s).await.unwrap();
        assert_eq!((op, payload.as_slice()), (0x1, &b"fine"[..]));
        s.write_all(&bad).await.unwrap();
        let code = tokio::time::timeout(Duration::from_secs(5), read_until_close(&mut s))
            .await
            .unwrap();
        assert_eq!(code, Some(1002));
    }
    // The backend got a (masked) Close 1002 for each, never the bad frame.
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while b.closes_seen.lock().unwrap().len() < 2 && std::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(*b.closes_seen.lock().unwrap(), vec![1002, 1002]);
    proxy.shutdown().await;
}
