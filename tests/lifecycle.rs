//! Connection lifecycle: idle timeouts, heartbeats, backend failure, drains
//! spread over a window, reloads and shutdown. Real clients and backends.

mod support;

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_tungstenite::tungstenite::Message;

#[tokio::test]
async fn idle_timeout_closes_both_sides_with_1001() {
    let b = WsBackend::start("b1").await;
    let proxy = Proxy::start(&config_for(
        &[b.addr],
        "idle_timeout = \"600ms\"\nclose_timeout = \"1s\"",
    ))
    .await;
    let mut ws = ws_connect(proxy.addr, false, "/").await;
    // Traffic keeps it alive (four gaps of 300 ms < 600 ms)...
    let mut last_data = Instant::now();
    for i in 0..4 {
        if i > 0 {
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
        ws.send(Message::text("x")).await.unwrap();
        assert_eq!(ws.next().await.unwrap().unwrap(), Message::text("x"));
        last_data = Instant::now();
    }
    // ...silence ends it, about idle_timeout after the last data frame.
    let msg = tokio::time::timeout(Duration::from_secs(5), ws.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    let Message::Close(Some(frame)) = msg else {
        panic!("expected Close, got {msg:?}")
    };
    assert_eq!(u16::from(frame.code), 1001);
    assert_eq!(frame.reason.as_str(), "idle timeout");
    let idle = last_data.elapsed();
    assert!(
        idle >= Duration::from_millis(550) && idle < Duration::from_secs(3),
        "{idle:?}"
    );
    // The backend got a (masked, so tungstenite accepted it) Close 1001 too.
    let deadline = Instant::now() + Duration::from_secs(3);
    while b.closes_seen.lock().unwrap().is_empty() && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(*b.closes_seen.lock().unwrap(), vec![1001]);
    proxy.shutdown().await;
}

#[tokio::test]
async fn heartbeat_finds_a_dead_client_and_spares_a_live_one() {
    let b = WsBackend::start("b1").await;
    let proxy = Proxy::start(&config_for(
        &[b.addr],
        "ping_interval = \"150ms\"\npong_timeout = \"300ms\"\nclose_timeout = \"1s\"",
    ))
    .await;
    // A live client: tokio-tungstenite answers pings while it reads.
    let mut live = ws_connect(proxy.addr, false, "/").await;
    // A dead one: a raw socket that reads nothing and answers nothing.
    let mut dead = raw_ws(proxy.addr).await;
    let started = Instant::now();
    let reader = tokio::spawn(async move {
        let mut pings = 0;
        let mut buf = [0u8; 64];
        // Read until berth drops us; don't answer.
        loop {
            match tokio::time::timeout(Duration::from_secs(5), dead.read(&mut buf)).await {
                Ok(Ok(0)) | Ok(Err(_)) => return (pings, true),
                Ok(Ok(n)) => pings += buf[..n].iter().filter(|b| **b == 0x89).count(),
                Err(_) => return (pings, false),
            }
        }
    });
    // Keep the live one reading for many intervals.
    let until = Instant::now() + Duration::from_millis(1500);
    while Instant::now() < until {
        let _ = tokio::time::timeout(Duration::from_millis(100), live.next()).await;
    }
    let (pings, dropped) = reader.await.unwrap();
    assert!(dropped, "the dead client was not dropped");
    assert!(pings >= 1, "berth never pinged");
    assert!(started.elapsed() < Duration::from_secs(3));
    live.send(Message::text("still alive")).await.unwrap();
    loop {
        match live.next().await.unwrap().unwrap() {
            Message::Text(t) => {
                assert_eq!(t.as_str(), "still alive");
                break;
            }
            Message::Ping(_) | Message::Pong(_) => continue,
            other => panic!("unexpected {other:?}"),
        }
    }
    // berth consumed the live client's pongs; the backend saw none.
    assert_eq!(b.pongs_seen.load(Ordering::SeqCst), 0);
    // The dead client's backend connection was closed with 1001.
    assert!(b.closes_seen.lock().unwrap().contains(&1001));
    proxy.shutdown().await;
}

#[tokio::test]
async fn backend_that_vanishes_gives_the_client_1014() {
    // Raw clients read the code off the wire: tokio-tungstenite 0.26 turns a
    // received 1014 into 1002 ("Protocol violation") before the app sees it.
    let b = WsBackend::start("b1").await;
    let proxy = Proxy::start(&config_for(&[b.addr], "")).await;
    let mut plain = raw_ws(proxy.addr).await;
    plain
        .write_all(&client_frame(true, 0x1, b"die"))
        .await
        .unwrap();
    let code = tokio::time::timeout(Duration::from_secs(5), read_until_close(&mut plain))
        .await
        .unwrap();
    assert_eq!(code, Some(1014));
    let mut tls = raw_wss(proxy.tls_addr.unwrap()).await;
    tls.write_all(&client_frame(true, 0x1, b"die"))
        .await
        .unwrap();
    let code = tokio::time::timeout(Duration::from_secs(5), read_until_close(&mut tls))
        .await
        .unwrap();
    assert_eq!(code, Some(1014));
    proxy.shutdown().await;
}

#[tokio::test]
async fn drained_backend_closes_its_clients_with_1012_spread_over_the_window() {
    let b1 = WsBackend::start("b1").await;
    let b2 = WsBackend::start("b2").await;
    let proxy = Proxy::start(&config_for(&[b1.addr, b2.addr], "drain_window = \"3s\"")).await;
    const PER_BACKEND: usize = 300;
    let mut on_b1 = Vec::new();
    let mut on_b2 = Vec::new();
    while on_b1.len() < PER_BACKEND || on_b2.len() < PER_BACKEND {
        let mut ws = ws_connect(proxy.addr, false, "/").await;
        match whoami(&mut ws).await.as_str() {
            "b1" if on_b1.len() < PER_BACKEND => on_b1.push(ws),
            "b2" if on_b2.len() < PER_BACKEND => on_b2.push(ws),
            _ => {}
        }
    }
    let started = Instant::now();
    let waiters: Vec<_> = on_b1
        .into_iter()
        .map(|mut ws| tokio::spawn(async move { (next_close(&mut ws).await, started.elapsed()) }))
        .collect();
    let (status, body) = admin_request(
        proxy.admin.unwrap(),
        "POST",
        "/admin/pools/main/backends/b1/drain",
        None,
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("\"state\":\"draining\""), "{body}");
    let mut times = Vec::new();
    for w in waiters {
        let (code, at) = w.await.unwrap();
        assert_eq!(code, Some(1012));
        times.push(at);
    }
    // Spread: every close inside the window (plus slack), and no tenth of
    // the window holds more than a fair share (30) plus a margin.
    let window = Duration::from_secs(3);
    let mut tenths = [0usize; 10];
    for t in &times {
        assert!(*t < window + Duration::from_millis(700), "close at {t:?}");
        let idx = ((t.as_secs_f64() / window.as_secs_f64()) * 10.0) as usize;
        tenths[idx.min(9)] += 1;
    }
    let fair = PER_BACKEND / 10;
    assert!(
        tenths.iter().all(|&n| n <= fair + fair / 2),
        "closes per tenth: {tenths:?}"
    );
    // Clients on b2 saw nothing and keep echoing; new clients avoid b1.
    for ws in on_b2.iter_mut().take(20) {
        ws.send(Message::text("ok?")).await.unwrap();
        assert_eq!(ws.next().await.unwrap().unwrap(), Message::text("ok?"));
    }
    for _ in 0..4 {
        let mut ws = ws_connect(proxy.addr, false, "/").await;
        assert_eq!(whoami(&mut ws).await, "b2");
    }
    let (_, pools) = admin_request(proxy.admin.unwrap(), "GET", "/admin/pools", None).await;
    assert!(pools.contains("\"draining\""), "{pools}");
    // Undrain puts it back.
    let (status, _) = admin_request(
        proxy.admin.unwrap(),
        "POST",
        "/admin/pools/main/backends/b1/undrain",
        None,
    )
    .await;
    assert_eq!(status, 200);
    let mut seen_b1 = false;
    for _ in 0..6 {
        let mut ws = ws_connect(proxy.addr, false, "/").await;
        seen_b1 |= whoami(&mut ws).await == "b1";
    }
    assert!(seen_b1);
    proxy.shutdown().await;
}

fn write_config(path: &std::path::Path, backends: &[std::net::SocketAddr], extra: &str) {
    std::fs::write(
        path,
        config_for(backends, extra)
            .replace("{CERT}", CERT)
            .replace("{KEY}", KEY),
    )
    .unwrap();
}

#[tokio::test]
async fn reload_removes_a_backend_with_1012_and_keeps_the_others() {
    let b1 = WsBackend::start("b1").await;
    let b2 = WsBackend::start("b2").await;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("berth.toml");
    write_config(&path, &[b1.addr, b2.addr], "drain_window = \"500ms\"");
    let proxy = Proxy::start_file(&path).await;
    let mut clients = Vec::new();
    for _ in 0..6 {
        let mut ws = ws_connect(proxy.addr, false, "/").await;
        let id = whoami(&mut ws).await;
        clients.push((id, ws));
    }
    // An invalid file is rejected and nothing changes.
    std::fs::write(
        &path,
        "[[listeners]]\nname = \"public\"\nbind = \"nowhere\"\n",
    )
    .unwrap();
    let (status, body) = admin_request(proxy.admin.unwrap(), "POST", "/admin/reload", None).await;
    assert_eq!(status, 422, "{body}");
    assert!(
        body.contains("berth.toml:3: listeners[0].bind: invalid socket address \"nowhere\""),
        "{body}"
    );
    for (_, ws) in clients.iter_mut() {
        ws.send(Message::text("still")).await.unwrap();
        assert_eq!(ws.next().await.unwrap().unwrap(), Message::text("still"));
    }
    // Remove b2 (b1 keeps its entry; "b1" is the first id in config_for).
    write_config(&path, &[b1.addr], "drain_window = \"500ms\"");
    let (status, body) = admin_request(proxy.admin.unwrap(), "POST", "/admin/reload", None).await;
    assert_eq!(status, 200, "{body}");
    for (id, ws) in clients.iter_mut() {
        if id == "b2" {
            assert_eq!(
                tokio::time::timeout(Duration::from_secs(3), next_close(ws))
                    .await
                    .unwrap(),
                Some(1012)
            );
        } else {
            ws.send(Message::text("untouched")).await.unwrap();
            assert_eq!(
                ws.next().await.unwrap().unwrap(),
                Message::text("untouched")
            );
        }
    }
    for _ in 0..4 {
        let mut ws = ws_connect(proxy.addr, false, "/").await;
        assert_eq!(whoami(&mut ws).await, "b1");
    }
    proxy.shutdown().await;
}

#[tokio::test]
async fn listeners_keep_accepting_during_reloads() {
    let b1 = WsBackend::start("b1").await;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("berth.toml");
    write_config(&path, &[b1.addr], "");
    let proxy = Proxy::start_file(&path).await;
    let addr = proxy.addr;
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let stop2 = stop.clone();
    let loop_task = tokio::spawn(async move {
        let (mut ok, mut failed) = (0, 0);
        while !stop2.load(Ordering::SeqCst) {
            match tokio::net::TcpStream::connect(addr).await {
                Ok(mut s) => {
                    let req = "GET / HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n";
                    let mut buf = [0u8; 12];
                    if s.write_all(req.as_bytes()).await.is_ok()
                        && s.read_exact(&mut buf).await.is_ok()
                        && &buf == b"HTTP/1.1 101"
                    {
                        ok += 1;
                    } else {
                        failed += 1;
                    }
                }
                Err(_) => failed += 1,
            }
        }
        (ok, failed)
    });
    for i in 0..10 {
        write_config(
            &path,
            &[b1.addr],
            &format!("idle_timeout = \"{}s\"", 10 + i % 2),
        );
        let (status, body) =
            admin_request(proxy.admin.unwrap(), "POST", "/admin/reload", None).await;
        assert_eq!(status, 200, "{body}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    stop.store(true, Ordering::SeqCst);
    let (ok, failed) = loop_task.await.unwrap();
    assert!(ok > 10, "only {ok} connections got through");
    assert_eq!(failed, 0, "{failed} connections failed during reloads");
    proxy.shutdown().await;
}

#[tokio::test]
async fn sigterm_sends_1001_to_every_client_and_exits_zero() {
    let b1 = WsBackend::start("b1").await;
    let toml = config_for(&[b1.addr], "close_timeout = \"1s\"")
        .replace("shutdown_window = \"500ms\"", "shutdown_window = \"1s\"");
    let mut berth = BerthProcess::spawn(&toml, &[], std::process::Stdio::null()).await;
    let mut clients = Vec::new();
    for _ in 0..20 {
        clients.push(ws_connect(berth.addr, false, "/").await);
    }
    let waiters: Vec<_> = clients
        .into_iter()
        .map(|mut ws| tokio::spawn(async move { next_close(&mut ws).await }))
        .collect();
    berth.signal("TERM");
    for w in waiters {
        assert_eq!(
            tokio::time::timeout(Duration::from_secs(5), w)
                .await
                .unwrap()
                .unwrap(),
            Some(1001)
        );
    }
    let status = berth
        .wait_exit(Duration::from_secs(5))
        .await
        .expect("berth did not exit");
    assert!(status.success(), "{status:?}");
}

/// The backend behind `ws` by its `whoami` answer; `None` when the
/// connection closed (or went quiet for 5 s) before an answer came.
async fn answering_backend(ws: &mut Ws) -> Option<String> {
    ws.send(Message::text("whoami")).await.ok()?;
    loop {
        match tokio::time::timeout(Duration::from_secs(5), ws.next()).await {
            Ok(Some(Ok(Message::Text(t)))) => return Some(t.to_string()),
            Ok(Some(Ok(Message::Close(_)))) | Ok(Some(Err(_))) | Ok(None) | Err(_) => return None,
            Ok(Some(Ok(_))) => continue,
        }
    }
}

#[tokio::test]
async fn sighup_reloads_the_config_file() {
    let b1 = WsBackend::start("b1").await;
    let b2 = WsBackend::start("b2").await;
    let berth = BerthProcess::spawn(
        &config_for(&[b1.addr], ""),
        &[],
        std::process::Stdio::null(),
    )
    .await;
    let mut ws = ws_connect(berth.addr, false, "/").await;
    assert_eq!(whoami(&mut ws).await, "b1");
    // Point the pool at b2 only, keeping the binds the process already has.
    let text = std::fs::read_to_string(&berth.config_path).unwrap();
    std::fs::write(
        &berth.config_path,
        text.replace(&b1.addr.to_string(), &b2.addr.to_string()),
    )
    .unwrap();
    berth.signal("HUP");
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        // A probe that reached b1 just before the reload is drained by it
        // (Close 1012): no answer, so not b2 yet; the next probe tries again.
        let mut probe = ws_connect(berth.addr, false, "/").await;
        if answering_backend(&mut probe).await.as_deref() == Some("b2") {
            break;
        }
        assert!(Instant::now() < deadline, "SIGHUP did not reload");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // The reload was counted, after the load at startup.
    let (_, metrics) = admin_request(berth.admin, "GET", "/metrics", None).await;
    assert!(
        metrics.contains("berth_config_reloads_total{result=\"success\"} 2"),
        "{metrics}"
    );
}

#[tokio::test]
async fn admin_posts_require_the_bearer_token_when_one_is_set() {
    let b1 = WsBackend::start("b1").await;
    let toml = config_for(&[b1.addr], "").replace(
        "[admin]\nbind = \"127.0.0.1:0\"",
        "[admin]\nbind = \"127.0.0.1:0\"\ntoken = \"s3cret-token\"",
    );
    let proxy = Proxy::start(&toml).await;
    let admin = proxy.admin.unwrap();
    let path = "/admin/pools/main/backends/b1/drain";
    assert_eq!(admin_request(admin, "POST", path, None).await.0, 401);
    assert_eq!(
        admin_request(admin, "POST", path, Some("wrong")).await.0,
        401
    );
    assert_eq!(
        admin_request(admin, "POST", "/admin/reload", None).await.0,
        401
    );
    // Reads stay open; the backend was not drained by the refused calls.
    assert_eq!(backend_state(admin, "b1").await, "up");
    assert_eq!(
        admin_request(admin, "POST", path, Some("s3cret-token"))
            .await
            .0,
        200
    );
    assert_eq!(backend_state(admin, "b1").await, "draining");
    proxy.shutdown().await;
}

/// A backend that answers the handshake itself and then sends one 8 MiB
/// binary message as 64 fragments, pausing between them.
async fn fragmenting_backend() -> std::net::SocketAddr {
    use base64::Engine as _;
    use sha1::Digest as _;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        let (mut s, _) = listener.accept().await.unwrap();
        let mut head = Vec::new();
        let mut byte = [0u8; 1];
        while !head.ends_with(b"\r\n\r\n") {
            s.read_exact(&mut byte).await.unwrap();
            head.push(byte[0]);
        }
        let head = String::from_utf8(head).unwrap();
        let key = head
            .lines()
            .find_map(|l| {
                l.strip_prefix("sec-websocket-key: ")
                    .or_else(|| l.strip_prefix("Sec-WebSocket-Key: "))
            })
            .unwrap()
            .trim()
            .to_string();
        let mut sha = sha1::Sha1::new();
        sha.update(key.as_bytes());
        sha.update(b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11");
        let accept = base64::engine::general_purpose::STANDARD.encode(sha.finalize());
        let resp = format!("HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Accept: {accept}\r\n\r\n");
        s.write_all(resp.as_bytes()).await.unwrap();
        let chunk = 128 * 1024;
        for i in 0..64u32 {
            let opcode = if i == 0 { 0x2 } else { 0x0 };
            let fin = if i == 63 { 0x80 } else { 0 };
            let mut frame = vec![fin | opcode, 127];
            frame.extend_from_slice(&(chunk as u64).to_be_bytes());
            frame.extend((0..chunk).map(|k| ((i as usize * chunk + k) % 253) as u8));
            s.write_all(&frame).await.unwrap();
            tokio::time::sleep(Duration::from_millis(8)).await;
        }
        let mut rest = Vec::new();
        let _ = s.read_to_end(&mut rest).await;
    });
    addr
}

#[tokio::test]
async fn ping_injected_inside_a_fragmented_8mib_message_leaves_it_intact() {
    let backend = fragmenting_backend().await;
    let proxy = Proxy::start(&config_for(
        &[backend],
        "ping_interval = \"20ms\"\npong_timeout = \"30s\"",
    ))
    .await;
    let mut s = raw_ws(proxy.addr).await;
    let mut message = Vec::new();
    let mut pings_inside = 0;
    loop {
        let (fin, op, payload) = tokio::time::timeout(Duration::from_secs(20), read_frame(&mut s))
            .await
            .unwrap()
            .unwrap();
        match op {
            0x9 => {
                if !message.is_empty() {
                    pings_inside += 1;
                }
                s.write_all(&client_frame(true, 0xA, &payload))
                    .await
                    .unwrap();
            }
            0x2 | 0x0 => {
                message.extend_from_slice(&payload);
                if fin {
                    break;
                }
            }
            other => panic!("unexpected opcode {other}"),
        }
    }
    assert_eq!(message.len(), 8 * 1024 * 1024);
    assert!(
        message
            .iter()
            .enumerate()
            .all(|(k, b)| *b == (k % 253) as u8),
        "payload corrupted"
    );
    assert!(pings_inside >= 1, "no ping landed between fragments");
    proxy.shutdown().await;
}

#[tokio::test]
async fn second_signal_exits_at_once_and_readyz_turns_503_while_draining() {
    let b1 = WsBackend::start("b1").await;
    // A long shutdown window: without the second signal, berth would wait.
    let toml = config_for(&[b1.addr], "close_timeout = \"30s\"")
        .replace("shutdown_window = \"500ms\"", "shutdown_window = \"60s\"");
    let mut berth = BerthProcess::spawn(&toml, &[], std::process::Stdio::null()).await;
    assert_eq!(
        admin_request(berth.admin, "GET", "/readyz", None).await.0,
        200
    );
    // Hold connections so the drain has something to wait for.
    let mut clients = Vec::new();
    for _ in 0..50 {
        clients.push(ws_connect(berth.addr, false, "/").await);
    }
    berth.signal("TERM");
    // Draining: not ready, still alive.
    let deadline = Instant::now() + Duration::from_secs(5);
    while admin_request(berth.admin, "GET", "/readyz", None).await.0 != 503 {
        assert!(Instant::now() < deadline, "readyz never turned 503");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(
        admin_request(berth.admin, "GET", "/healthz", None).await.0,
        200
    );
    assert!(
        berth.child.try_wait().unwrap().is_none(),
        "exited before the window"
    );
    // The second signal ends it at once.
    berth.signal("INT");
    assert!(
        berth.wait_exit(Duration::from_secs(3)).await.is_some(),
        "second signal did not exit at once"
    );
    drop(clients);
}

#[tokio::test]
async fn reload_swaps_the_certificate_without_dropping_the_listener() {
    use rustls_pki_types::pem::PemObject;
    let b1 = WsBackend::start("b1").await;
    let dir = tempfile::tempdir().unwrap();
    let cert_path = dir.path().join("live.crt");
    let key_path = dir.path().join("live.key");
    std::fs::copy(CERT, &cert_path).unwrap();
    std::fs::copy(KEY, &key_path).unwrap();
    let path = dir.path().join("berth.toml");
    let write = || {
        std::fs::write(
            &path,
            config_for(&[b1.addr], "")
                .replace("{CERT}", cert_path.to_str().unwrap())
                .replace("{KEY}", key_path.to_str().unwrap()),
        )
        .unwrap();
    };
    write();
    let proxy = Proxy::start_file(&path).await;
    let tls_addr = proxy.tls_addr.unwrap();
    // An open wss connection before the swap.
    let mut before = ws_connect(tls_addr, true, "/").await;
    // A new certificate (rcgen) replaces the files; reload.
    let fresh = rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).unwrap();
    std::fs::write(&cert_path, fresh.cert.pem()).unwrap();
    std::fs::write(&key_path, fresh.key_pair.serialize_pem()).unwrap();
    write();
    let (status, body) = admin_request(proxy.admin.unwrap(), "POST", "/admin/reload", None).await;
    assert_eq!(status, 200, "{body}");
    assert!(
        body.contains("\"listeners_added\":[]"),
        "the listener kept its socket: {body}"
    );
    // New handshakes present the new certificate.
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(rustls_pki_types::CertificateDer::from_pem_slice(fresh.cert.pem().as_bytes()).unwrap())
        .unwrap();
    let config = rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    let connector = tokio_rustls::TlsConnector::from(std::sync::Arc::new(config));
    let tcp = tokio::net::TcpStream::connect(tls_addr).await.unwrap();
    connector
        .connect(
            rustls_pki_types::ServerName::try_from("localhost").unwrap(),
            tcp,
        )
        .await
        .expect("handshake with the new certificate");
    // The connection from before the swap is untouched.
    before.send(Message::text("still")).await.unwrap();
    assert_eq!(
        before.next().await.unwrap().unwrap(),
        Message::text("still")
    );
    proxy.shutdown().await;
}

#[tokio::test]
async fn sighup_keeps_tls_sessions_resumable() {
    // A reload builds new TLS server configs; the session ticket keys and the
    // session cache outlive them, so clients resume instead of paying a full
    // handshake each after every deploy of the config.
    let b1 = WsBackend::start("b1").await;
    let tls = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let toml = config_for(&[b1.addr], "").replace(
        "name = \"tls\"\nbind = \"127.0.0.1:0\"",
        &format!("name = \"tls\"\nbind = \"{tls}\""),
    );
    let berth = BerthProcess::spawn(&toml, &[], std::process::Stdio::null()).await;
    for version in [&rustls::version::TLS13, &rustls::version::TLS12] {
        // One client config, so one client session cache, per version.
        let client = tls_client_config_for(&[version]);
        let first = tls_handshake_kind(tls, &client).await;
        let reloads = reload_count(berth.admin).await;
        berth.signal("HUP");
        let deadline = Instant::now() + Duration::from_secs(10);
        while reload_count(berth.admin).await == reloads {
            assert!(Instant::now() < deadline, "SIGHUP did not reload");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let second = tls_handshake_kind(tls, &client).await;
        assert_eq!(
            [first, second],
            [
                Some(rustls::HandshakeKind::Full),
                Some(rustls::HandshakeKind::Resumed)
            ],
            "{version:?}"
        );
    }
}

/// `berth_config_reloads_total{result="success"}`, from the admin listener.
async fn reload_count(admin: std::net::SocketAddr) -> u64 {
    let (_, metrics) = admin_request(admin, "GET", "/metrics", None).await;
    metrics
        .lines()
        .find_map(|l| l.strip_prefix("berth_config_reloads_total{result=\"success\"} "))
        .map_or(0, |v| v.trim().parse().unwrap())
}

#[tokio::test]
async fn the_binary_purges_freed_memory_in_the_background() {
    // berth's jemalloc options (src/main.rs) start one background thread
    // that returns freed memory to the kernel, so an idle proxy does not
    // keep the high-water mark of its last burst of handshakes.
    let b1 = WsBackend::start("b1").await;
    let toml = config_for(&[b1.addr], "");
    let mut berth = BerthProcess::spawn(&toml, &[], std::process::Stdio::null()).await;
    let pid = berth.child.id();
    let mut names = Vec::new();
    for entry in std::fs::read_dir(format!("/proc/{pid}/task")).unwrap() {
        let comm = entry.unwrap().path().join("comm");
        if let Ok(name) = std::fs::read_to_string(comm) {
            names.push(name.trim().to_string());
        }
    }
    berth.signal("TERM");
    let _ = berth.wait_exit(Duration::from_secs(5)).await;
    let purgers = names.iter().filter(|n| *n == "jemalloc_bg_thd").count();
    assert_eq!(purgers, 1, "threads: {names:?}");
}

#[tokio::test]
async fn a_reloaded_shutdown_window_applies_to_the_next_shutdown() {
    let b1 = WsBackend::start("b1").await;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("berth.toml");
    let write = |window: &str| {
        let text = config_for(&[b1.addr], "close_timeout = \"1s\"")
            .replace(
                "shutdown_window = \"500ms\"",
                &format!("shutdown_window = \"{window}\""),
            )
            .replace("{CERT}", CERT)
            .replace("{KEY}", KEY);
        std::fs::write(&path, text).unwrap();
    };
    // Started with every close at once; reloaded to a 2 s spread.
    write("0s");
    let proxy = Proxy::start_file(&path).await;
    let mut clients = Vec::new();
    for _ in 0..20 {
        clients.push(ws_connect(proxy.addr, false, "/").await);
    }
    write("2s");
    let (status, body) = admin_request(proxy.admin.unwrap(), "POST", "/admin/reload", None).await;
    assert_eq!(status, 200, "{body}");
    assert!(
        body.contains("shutdown_window 0s -> 2s (applies to the next shutdown)"),
        "{body}"
    );
    let started = Instant::now();
    let waiters: Vec<_> = clients
        .into_iter()
        .map(|mut ws| tokio::spawn(async move { (next_close(&mut ws).await, started.elapsed()) }))
        .collect();
    proxy.shutdown().await;
    let mut times = Vec::new();
    for w in waiters {
        let (code, at) = tokio::time::timeout(Duration::from_secs(5), w)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(code, Some(1001));
        times.push(at);
    }
    times.sort();
    // Spread over the new window: the closes start early and end late in
    // it (with "0s" they all come within a few milliseconds).
    let (first, last) = (times[0], times[times.len() - 1]);
    assert!(
        first < Duration::from_millis(800),
        "first close at {first:?}"
    );
    assert!(
        last > Duration::from_millis(1200),
        "last close at {last:?}: not spread over 2 s"
    );
    assert!(last < Duration::from_millis(3500), "last close at {last:?}");
}
