//! Connection limits and overload, black-box: real sockets from real client
//! addresses (127.0.0.2, 127.0.0.3), the real binary where process limits
//! matter (`prlimit`), and what a client notices: a connection closed
//! before anything is read, a `414` or `431`, a WebSocket that still
//! echoes, an admin port that still answers.

mod support;

use std::io::Read as _;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};

/// "Promptly": a refused client learns within this (the connection is
/// closed right after the accept; the margin is for a loaded machine).
const PROMPTLY: Duration = Duration::from_millis(1000);

/// A TCP connection to `addr` from the loopback address `source`.
async fn connect_from(source: &str, addr: SocketAddr) -> TcpStream {
    let sock = TcpSocket::new_v4().unwrap();
    sock.bind(format!("{source}:0").parse().unwrap()).unwrap();
    sock.connect(addr).await.unwrap()
}

/// Sends a WebSocket upgrade and reads the response head ("" when the
/// connection closed first).
async fn upgrade(s: &mut TcpStream) -> String {
    let _ = s.write_all(upgrade_head("/", "").as_bytes()).await;
    read_head(s).await
}

/// Reads a response head byte by byte ("" when the connection closed or
/// failed first).
async fn read_head<S: tokio::io::AsyncRead + Unpin>(s: &mut S) -> String {
    let mut got = Vec::new();
    let mut b = [0u8; 1];
    while !got.ends_with(b"\r\n\r\n") {
        match tokio::time::timeout(Duration::from_secs(10), s.read(&mut b)).await {
            Ok(Ok(1)) => got.push(b[0]),
            _ => return String::new(),
        }
    }
    String::from_utf8_lossy(&got).into_owned()
}

/// Whether berth closes `s` (EOF or reset) within `limit`, without the
/// client sending anything.
async fn closed_within(s: &mut TcpStream, limit: Duration) -> bool {
    let mut b = [0u8; 16];
    match tokio::time::timeout(limit, s.read(&mut b)).await {
        Ok(Ok(0)) | Ok(Err(_)) => true,
        Ok(Ok(n)) => panic!("a refused connection got {n} bytes"),
        Err(_) => false,
    }
}

/// One text message through an open raw WebSocket: sent masked, echoed back.
async fn echoes(s: &mut TcpStream, text: &str) -> bool {
    if s.write_all(&client_frame(true, 1, text.as_bytes()))
        .await
        .is_err()
    {
        return false;
    }
    match tokio::time::timeout(Duration::from_secs(10), read_frame(s)).await {
        Ok(Some((true, 1, payload))) => payload == text.as_bytes(),
        _ => false,
    }
}

/// One series' value from the admin `/metrics` (0 when absent).
async fn metric(admin: SocketAddr, series: &str) -> f64 {
    let (status, body) = admin_request(admin, "GET", "/metrics", None).await;
    assert_eq!(status, 200, "{body}");
    body.lines()
        .find_map(|l| l.strip_prefix(series)?.trim().parse().ok())
        .unwrap_or(0.0)
}

/// Waits (up to 10 s) for a series to reach `expected`; fails with the
/// value last seen.
async fn assert_metric(admin: SocketAddr, series: &str, expected: f64) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let seen = metric(admin, series).await;
        if seen == expected {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{series} is {seen}, expected {expected}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A WebSocket through `addr`, retried for up to 10 s while berth refuses.
async fn ws_when_room(addr: SocketAddr, what: &str) -> TcpStream {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let mut s = TcpStream::connect(addr).await.unwrap();
        if upgrade(&mut s).await.starts_with("HTTP/1.1 101") {
            return s;
        }
        assert!(Instant::now() < deadline, "never: {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// `config_for` with `extra` lines added to both listeners.
fn with_listener_keys(backends: &[SocketAddr], extra: &str) -> String {
    with_listener_key(&config_for(backends, ""), extra, 2)
}

#[tokio::test]
async fn a_flood_over_max_connections_per_ip_is_refused_while_another_address_is_served() {
    let backend = WsBackend::start("b1").await;
    let proxy = Proxy::start(&with_listener_keys(
        &[backend.addr],
        "max_connections_per_ip = 4",
    ))
    .await;
    let admin = proxy.admin.unwrap();

    let mut held = Vec::new();
    for _ in 0..4 {
        let mut s = connect_from("127.0.0.2", proxy.addr).await;
        assert!(upgrade(&mut s).await.starts_with("HTTP/1.1 101"));
        held.push(s);
    }
    // The flood: each further connection from 127.0.0.2 is closed at once,
    // before the client has sent anything.
    for i in 0..30 {
        let started = Instant::now();
        let mut s = connect_from("127.0.0.2", proxy.addr).await;
        assert!(
            closed_within(&mut s, PROMPTLY).await,
            "connection {i} from 127.0.0.2 was not closed within {PROMPTLY:?}"
        );
        assert!(started.elapsed() < PROMPTLY);
    }
    // 127.0.0.3 is served meanwhile, and so are the ones already open.
    let mut other = connect_from("127.0.0.3", proxy.addr).await;
    assert!(upgrade(&mut other).await.starts_with("HTTP/1.1 101"));
    assert!(echoes(&mut other, "from .3").await);
    for (i, s) in held.iter_mut().enumerate() {
        assert!(echoes(s, &format!("held {i}")).await);
    }
    assert_metric(
        admin,
        r#"berth_connections_refused_total{listener="public",reason="per_ip"}"#,
        30.0,
    )
    .await;

    // On the TLS listener a refused client gets no TLS handshake at all.
    let tls_addr = proxy.tls_addr.unwrap();
    let connector = tokio_rustls::TlsConnector::from(tls_client_config());
    let name = rustls_pki_types::ServerName::try_from("localhost").unwrap();
    let mut tls_held = Vec::new();
    for _ in 0..4 {
        let tcp = connect_from("127.0.0.2", tls_addr).await;
        tls_held.push(connector.connect(name.clone(), tcp).await.unwrap());
    }
    let tcp = connect_from("127.0.0.2", tls_addr).await;
    let started = Instant::now();
    assert!(connector.connect(name.clone(), tcp).await.is_err());
    assert!(started.elapsed() < PROMPTLY);
    let handshakes = |result: &'static str| {
        format!(r#"berth_tls_handshakes_total{{listener="tls",result="{result}"}}"#)
    };
    assert_metric(
        admin,
        r#"berth_connections_refused_total{listener="tls",reason="per_ip"}"#,
        1.0,
    )
    .await;
    assert_metric(admin, &handshakes("ok"), 4.0).await;
    assert_eq!(metric(admin, &handshakes("error")).await, 0.0);
    assert_eq!(metric(admin, &handshakes("timeout")).await, 0.0);

    // Once 127.0.0.2's connections close, it is served again.
    drop(held);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let mut s = connect_from("127.0.0.2", proxy.addr).await;
        if upgrade(&mut s).await.starts_with("HTTP/1.1 101") {
            break;
        }
        assert!(Instant::now() < deadline, "127.0.0.2 is never served again");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    drop(tls_held);
    proxy.shutdown().await;
}

#[tokio::test]
async fn max_connections_refuses_the_excess_and_accepts_again_after_clients_leave() {
    let backend = WsBackend::start("b1").await;
    let proxy = Proxy::start(&with_listener_keys(&[backend.addr], "max_connections = 3")).await;
    let admin = proxy.admin.unwrap();
    let mut held = Vec::new();
    for _ in 0..3 {
        held.push(raw_ws(proxy.addr).await);
    }
    for _ in 0..5 {
        let started = Instant::now();
        let mut s = TcpStream::connect(proxy.addr).await.unwrap();
        assert!(closed_within(&mut s, PROMPTLY).await);
        assert!(started.elapsed() < PROMPTLY);
    }
    // Plain HTTP counts too: the listener is full for a GET as well.
    let mut get = TcpStream::connect(proxy.addr).await.unwrap();
    assert!(closed_within(&mut get, PROMPTLY).await);
    assert_metric(
        admin,
        r#"berth_connections_refused_total{listener="public",reason="listener_full"}"#,
        6.0,
    )
    .await;
    // The other listener has its own count.
    let tls_ws = raw_wss(proxy.tls_addr.unwrap()).await;
    for (i, s) in held.iter_mut().enumerate() {
        assert!(echoes(s, &format!("held {i}")).await);
    }
    // One leaves: one more gets in, and the listener is full again.
    drop(held.pop());
    held.push(ws_when_room(proxy.addr, "a place frees up when a client leaves").await);
    let mut s = TcpStream::connect(proxy.addr).await.unwrap();
    assert!(closed_within(&mut s, PROMPTLY).await);
    drop((held, tls_ws));
    proxy.shutdown().await;
}

#[tokio::test]
async fn heads_over_max_header_bytes_get_431_and_long_request_lines_414() {
    let backend = WsBackend::start("b1").await;
    let http = http_backend("h1", std::sync::Arc::new(tokio::sync::Notify::new())).await;
    let mut toml = with_listener_keys(&[backend.addr], "max_header_bytes = \"2 KiB\"");
    toml.push_str(&format!(
        "[[routes]]\npath_prefix = \"/http\"\npool = \"web\"\n\n[[pools.web.backends]]\nid = \"h1\"\naddress = \"{http}\"\n"
    ));
    let proxy = Proxy::start(&toml).await;
    let admin = proxy.admin.unwrap();
    let rejected = |status: &str| {
        format!(r#"berth_requests_rejected_total{{listener="public",status="{status}"}}"#)
    };

    // A head of exactly 2 KiB passes.
    let base = upgrade_head("/", "");
    let filler = 2048 - base.len() - "X-Fill: \r\n".len();
    let exact = upgrade_head("/", &format!("X-Fill: {}\r\n", "a".repeat(filler)));
    assert_eq!(exact.len(), 2048);
    let (_s, head) = raw_request(proxy.addr, &exact).await;
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");

    // One byte more: 431, and the connection is closed.
    let over = upgrade_head("/", &format!("X-Fill: {}\r\n", "a".repeat(filler + 1)));
    let (mut s, head) = raw_request(proxy.addr, &over).await;
    assert!(head.starts_with("HTTP/1.1 431 "), "{head}");
    let mut rest = Vec::new();
    let _ = s.read_to_end(&mut rest).await;
    assert_eq!(
        String::from_utf8_lossy(&rest),
        "the request head is too large\n"
    );

    // A request line over the limit: 414, however the head goes on.
    let long_path = format!("/{}", "p".repeat(2100));
    let (_s, head) = raw_request(proxy.addr, &upgrade_head(&long_path, "")).await;
    assert!(head.starts_with("HTTP/1.1 414 "), "{head}");
    // Sent slowly, in pieces, it is the same.
    let mut s = TcpStream::connect(proxy.addr).await.unwrap();
    for chunk in format!("GET {long_path} HTTP/1.1\r\n")
        .as_bytes()
        .chunks(500)
    {
        s.write_all(chunk).await.unwrap();
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(read_head(&mut s).await.starts_with("HTTP/1.1 414 "));

    // A huge head that keeps coming: 431 once the limit is passed.
    let mut s = TcpStream::connect(proxy.addr).await.unwrap();
    s.write_all(b"GET /http HTTP/1.1\r\nHost: x\r\n")
        .await
        .unwrap();
    let writer = tokio::spawn(async move {
        for _ in 0..64 {
            if s.write_all(&[b"X-A: b\r\n".as_slice(); 128].concat())
                .await
                .is_err()
            {
                break;
            }
        }
        s
    });
    let mut s = writer.await.unwrap();
    assert!(read_head(&mut s).await.starts_with("HTTP/1.1 431 "));

    // A later request on a kept-alive connection is held to the same limit.
    let mut s = TcpStream::connect(proxy.addr).await.unwrap();
    s.write_all(b"GET /http/a HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    assert!(read_head(&mut s).await.starts_with("HTTP/1.1 200"));
    let mut body = vec![0u8; 4096];
    let _ = tokio::time::timeout(Duration::from_millis(200), s.read(&mut body)).await;
    let second = format!(
        "GET /http/b HTTP/1.1\r\nHost: x\r\nX-Fill: {}\r\n\r\n",
        "a".repeat(3000)
    );
    s.write_all(second.as_bytes()).await.unwrap();
    assert!(read_head(&mut s).await.starts_with("HTTP/1.1 431 "));

    assert_metric(admin, &rejected("431"), 3.0).await;
    assert_metric(admin, &rejected("414"), 2.0).await;

    // The TLS listener checks the head after decrypting it.
    let mut tls = {
        let tcp = TcpStream::connect(proxy.tls_addr.unwrap()).await.unwrap();
        tokio_rustls::TlsConnector::from(tls_client_config())
            .connect(
                rustls_pki_types::ServerName::try_from("localhost").unwrap(),
                tcp,
            )
            .await
            .unwrap()
    };
    tls.write_all(over.as_bytes()).await.unwrap();
    assert!(read_head(&mut tls).await.starts_with("HTTP/1.1 431 "));
    assert_metric(
        admin,
        r#"berth_requests_rejected_total{listener="tls",status="431"}"#,
        1.0,
    )
    .await;
    proxy.shutdown().await;
}

#[tokio::test]
async fn every_request_refused_before_routing_is_counted_once() {
    // berth's own 400s (in the request path) and hyper's (a head it cannot
    // parse) go into the same series; none may be counted twice.
    let backend = WsBackend::start("b1").await;
    let proxy = Proxy::start(&config_for(&[backend.addr], "")).await;
    let admin = proxy.admin.unwrap();
    let series = r#"berth_requests_rejected_total{listener="public",status="400"}"#;
    let heads = [
        // Two Hosts: berth's 400 before routing.
        "GET / HTTP/1.1\r\nHost: a.example\r\nHost: b.example\r\n\r\n".to_string(),
        // Not a valid WebSocket handshake: berth's 400.
        upgrade_head("/", "").replace("dGhlIHNhbXBsZSBub25jZQ==", "short"),
        // Not HTTP at all: hyper's 400.
        "\u{16}\u{3}\u{1}\u{0}\u{5}hello\r\n\r\n".to_string(),
        // A header line hyper cannot parse: hyper's 400.
        "GET / HTTP/1.1\r\nHost: x\r\nBad Header\r\n\r\n".to_string(),
    ];
    for head in &heads {
        let (mut s, got) = raw_request(proxy.addr, head).await;
        assert!(got.starts_with("HTTP/1.1 400"), "{head:?}: {got}");
        // Wait for the connection's end, where hyper's errors are counted.
        let _ = s.shutdown().await;
        let mut rest = Vec::new();
        let _ = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut rest)).await;
    }
    assert_metric(admin, series, heads.len() as f64).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(metric(admin, series).await, heads.len() as f64);
    proxy.shutdown().await;
}

#[tokio::test]
async fn frames_sent_in_the_same_write_as_the_upgrade_reach_the_backend() {
    let backend = WsBackend::start("b1").await;
    let proxy = Proxy::start(&config_for(&[backend.addr], "")).await;
    // A small head, and a 20 KiB one that hyper reads in several pieces.
    for extra in [
        String::new(),
        format!("X-Big: {}\r\n", "b".repeat(20 * 1024)),
    ] {
        let mut bytes = upgrade_head("/", &extra).into_bytes();
        bytes.extend(client_frame(true, 1, b"first"));
        bytes.extend(client_frame(true, 1, b"second"));
        let mut s = TcpStream::connect(proxy.addr).await.unwrap();
        s.write_all(&bytes).await.unwrap();
        assert!(read_head(&mut s).await.starts_with("HTTP/1.1 101"));
        for text in ["first", "second"] {
            let frame = tokio::time::timeout(Duration::from_secs(10), read_frame(&mut s))
                .await
                .unwrap();
            assert_eq!(frame, Some((true, 1, text.as_bytes().to_vec())));
        }
    }
    proxy.shutdown().await;
}

#[tokio::test]
async fn handshake_timeout_bounds_the_tls_handshake_and_the_first_head_together() {
    let backend = WsBackend::start("b1").await;
    let proxy = Proxy::start(&with_listener_keys(
        &[backend.addr],
        "handshake_timeout = \"600ms\"",
    ))
    .await;
    // Half a head, then nothing: closed without an answer at the deadline.
    let started = Instant::now();
    let mut s = TcpStream::connect(proxy.addr).await.unwrap();
    s.write_all(b"GET / HTTP/1.1\r\nHo").await.unwrap();
    assert!(closed_within(&mut s, Duration::from_secs(5)).await);
    let took = started.elapsed();
    assert!(
        took >= Duration::from_millis(550) && took < Duration::from_secs(3),
        "{took:?}"
    );
    // Over TLS the same deadline covers the handshake and the head: a
    // handshake after 400 ms leaves 200 ms for the head.
    let started = Instant::now();
    let tcp = TcpStream::connect(proxy.tls_addr.unwrap()).await.unwrap();
    tokio::time::sleep(Duration::from_millis(400)).await;
    let mut tls = tokio_rustls::TlsConnector::from(tls_client_config())
        .connect(
            rustls_pki_types::ServerName::try_from("localhost").unwrap(),
            tcp,
        )
        .await
        .unwrap();
    tls.write_all(b"GET / HTTP/1.1\r\nHo").await.unwrap();
    let mut b = [0u8; 16];
    let n = tokio::time::timeout(Duration::from_secs(5), tls.read(&mut b))
        .await
        .unwrap()
        .unwrap_or(0);
    assert_eq!(n, 0);
    let took = started.elapsed();
    assert!(
        took >= Duration::from_millis(550) && took < Duration::from_secs(3),
        "{took:?}"
    );
    // A head in time is served.
    let mut s = TcpStream::connect(proxy.addr).await.unwrap();
    assert!(upgrade(&mut s).await.starts_with("HTTP/1.1 101"));
    drop(s);
    // Bytes that are not HTTP get hyper's 400 at once, not a wait.
    let started = Instant::now();
    let (_s, head) = raw_request(proxy.addr, "\u{16}\u{3}\u{1}\u{0}\u{5}hello\r\n\r\n").await;
    assert!(head.starts_with("HTTP/1.1 400"), "{head}");
    assert!(started.elapsed() < Duration::from_millis(500));
    assert_metric(
        proxy.admin.unwrap(),
        r#"berth_requests_rejected_total{listener="public",status="400"}"#,
        1.0,
    )
    .await;
    proxy.shutdown().await;
}

#[tokio::test]
async fn a_slowloris_on_the_admin_port_does_not_stop_metrics_or_a_drain() {
    let backend = WsBackend::start("b1").await;
    let proxy = Proxy::start(&config_for(&[backend.addr], "")).await;
    let admin = proxy.admin.unwrap();
    // 100 connections that send half a request head and then nothing.
    let mut slow = Vec::new();
    for _ in 0..100 {
        let mut s = TcpStream::connect(admin).await.unwrap();
        s.write_all(b"GET /metr").await.unwrap();
        slow.push(s);
    }
    let started = Instant::now();
    let (status, body) = admin_request(admin, "GET", "/metrics", None).await;
    assert_eq!(status, 200);
    assert!(body.contains("berth_connections_active"), "{body}");
    let (status, _) = admin_request(admin, "GET", "/healthz", None).await;
    assert_eq!(status, 200);
    let (status, body) =
        admin_request(admin, "POST", "/admin/pools/main/backends/b1/drain", None).await;
    assert_eq!(status, 200, "{body}");
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "the admin API took {:?}",
        started.elapsed()
    );
    // The oldest slow connections were closed to make room.
    let mut closed = 0;
    for s in &mut slow {
        if closed_within(s, Duration::from_millis(10)).await {
            closed += 1;
        }
    }
    assert!(
        closed >= 100 - 32,
        "only {closed} of 100 slow connections were closed"
    );
    // The rest are cut off by the head timeout.
    let mut last = slow.pop().unwrap();
    assert!(closed_within(&mut last, Duration::from_secs(8)).await);
    proxy.shutdown().await;
}

/// utime + stime of a process, in clock ticks.
fn cpu_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let rest = stat.rsplit_once(')').unwrap().1;
    let f: Vec<&str> = rest.split_whitespace().collect();
    f[11].parse::<u64>().unwrap() + f[12].parse::<u64>().unwrap()
}

#[tokio::test]
async fn at_the_open_file_limit_early_websockets_keep_echoing_and_the_rest_are_refused() {
    let backend = WsBackend::start("b1").await;
    let log = tempfile::NamedTempFile::new().unwrap();
    let mut berth = BerthProcess::spawn_under(
        &["prlimit", "--nofile=400:400", "--"],
        &config_for(&[backend.addr], ""),
        &["--log-level", "info"],
        std::process::Stdio::from(log.reopen().unwrap()),
    )
    .await;
    let pid = berth.child.id();

    // More WebSockets than 400 descriptors hold (two each, plus berth's
    // reserve of 256 + 1%).
    let mut open = Vec::new();
    let mut refused = 0;
    for i in 0..150 {
        let started = Instant::now();
        let mut s = TcpStream::connect(berth.addr).await.unwrap();
        let head = upgrade(&mut s).await;
        if head.starts_with("HTTP/1.1 101") {
            assert_eq!(refused, 0, "connection {i} was served after a refusal");
            open.push(s);
        } else {
            assert_eq!(head, "", "connection {i}");
            assert!(
                started.elapsed() < PROMPTLY,
                "connection {i} took {:?}",
                started.elapsed()
            );
            refused += 1;
        }
    }
    eprintln!(
        "under 400 descriptors: {} WebSockets open, {refused} refused",
        open.len()
    );
    assert!(open.len() >= 30, "only {} WebSockets fit", open.len());
    assert!(refused >= 30, "only {refused} refused");

    // berth idles meanwhile: no busy loop on the refusals.
    let before = cpu_ticks(pid);
    tokio::time::sleep(Duration::from_secs(2)).await;
    let used = cpu_ticks(pid) - before;
    eprintln!("berth's CPU over 2 s at its limit: {used} ticks");
    assert!(
        used <= 10,
        "berth used {used} ticks of CPU in 2 s while at its limit"
    );

    // The early ones keep echoing; the admin port answers.
    for (i, s) in open.iter_mut().enumerate() {
        assert!(echoes(s, &format!("early {i}")).await, "WebSocket {i}");
    }
    let (status, _) = admin_request(berth.admin, "GET", "/healthz", None).await;
    assert_eq!(status, 200);
    assert_metric(
        berth.admin,
        r#"berth_connections_refused_total{listener="public",reason="fd_limit"}"#,
        f64::from(refused),
    )
    .await;

    // The clients leave: berth accepts again on its own, about as many as
    // before (the count of open descriptors moves by one or two with what
    // berth has open for a moment, such as an admin request).
    let held = open.len();
    drop(open);
    assert_metric(
        berth.admin,
        r#"berth_connections_active{listener="public"}"#,
        0.0,
    )
    .await;
    let mut again = Vec::new();
    while again.len() < held - 2 {
        let mut s = TcpStream::connect(berth.addr).await.unwrap();
        assert!(
            upgrade(&mut s).await.starts_with("HTTP/1.1 101"),
            "only {} of {held} fit again",
            again.len()
        );
        again.push(s);
    }
    for (i, s) in again.iter_mut().enumerate() {
        assert!(echoes(s, &format!("again {i}")).await, "WebSocket {i}");
    }
    drop(again);

    // One log line for the episode, one for its end; not one per refusal.
    berth.signal("TERM");
    assert!(berth.wait_exit(Duration::from_secs(10)).await.is_some());
    let mut text = String::new();
    log.reopen().unwrap().read_to_string(&mut text).unwrap();
    let refusing = text.matches("refusing new client connections").count();
    let free = text.matches("accepting new client connections").count();
    assert_eq!((refusing, free), (1, 1), "{text}");
}

/// Stops a process (SIGSTOP) until dropped (SIGCONT), so that the kernel
/// alone answers connects to its listeners.
struct Stopped(u32);

impl Stopped {
    fn new(pid: u32) -> Stopped {
        let signal = |s: &str| {
            std::process::Command::new("kill")
                .args([s, &pid.to_string()])
                .status()
                .expect("kill runs")
                .success()
        };
        assert!(signal("-STOP"));
        // Wait until it is stopped (state T in /proc/PID/stat).
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
            let state = stat.rsplit_once(") ").map(|(_, rest)| &rest[..1]);
            if state == Some("T") {
                return Stopped(pid);
            }
            assert!(Instant::now() < deadline, "berth did not stop: {stat}");
            std::thread::sleep(Duration::from_millis(5));
        }
    }
}

impl Drop for Stopped {
    fn drop(&mut self) {
        let _ = std::process::Command::new("kill")
            .args(["-CONT", &self.0.to_string()])
            .status();
    }
}

#[tokio::test]
async fn a_burst_of_connects_waits_in_the_listen_backlog_instead_of_being_dropped() {
    // std's default backlog of 128 would let about 128 of these complete
    // while berth is not accepting; the kernel drops the others' SYNs and
    // they hang for seconds of retransmits. berth listens with 4096.
    const BURST: usize = 400;
    let somaxconn: usize = std::fs::read_to_string("/proc/sys/net/core/somaxconn")
        .map_or(4096, |s| s.trim().parse().unwrap());
    assert!(
        somaxconn > BURST,
        "net.core.somaxconn ({somaxconn}) caps every listen backlog below this test's burst"
    );
    let backend = WsBackend::start("b1").await;
    let berth = BerthProcess::spawn(
        &config_for(&[backend.addr], ""),
        &[],
        std::process::Stdio::null(),
    )
    .await;
    let stopped = Stopped::new(berth.child.id());
    let connects = (0..BURST).map(|_| async {
        tokio::time::timeout(Duration::from_secs(3), TcpStream::connect(berth.addr)).await
    });
    let results = futures_util::future::join_all(connects).await;
    let done = results.iter().filter(|r| matches!(r, Ok(Ok(_)))).count();
    assert_eq!(done, BURST, "connects completed while berth was stopped");
    // Once berth runs again, it accepts and serves every one of them.
    drop(stopped);
    let mut conns: Vec<TcpStream> = results.into_iter().map(|r| r.unwrap().unwrap()).collect();
    for i in [0, BURST - 1] {
        let s = &mut conns[i];
        let head = upgrade(s).await;
        assert!(head.starts_with("HTTP/1.1 101"), "{head}");
        assert!(echoes(s, "from the backlog").await);
    }
}
