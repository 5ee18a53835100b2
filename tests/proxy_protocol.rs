//! The PROXY protocol, end to end with real sockets: a listener with
//! `proxy_protocol` takes the client's address from the header (in
//! `X-Forwarded-For`, hash `client_ip` and `max_connections_per_ip`),
//! refuses peers outside `proxy_protocol_from` and connections without a
//! good header; a pool with `send_proxy_protocol` hands the client's
//! address on to its backends, over WebSockets and plain HTTP, and never
//! reuses one client's keep-alive connection for another. The headers the
//! tests send and read are built and parsed with the `ppp` crate, not with
//! berth's code.

mod support;

use std::collections::HashSet;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// A PROXY v2 header for `src` -> `dst`.
fn v2(src: &str, dst: &str) -> Vec<u8> {
    let (src, dst): (SocketAddr, SocketAddr) = (src.parse().unwrap(), dst.parse().unwrap());
    ppp::v2::Builder::with_addresses(
        ppp::v2::Version::Two | ppp::v2::Command::Proxy,
        ppp::v2::Protocol::Stream,
        (src, dst),
    )
    .build()
    .unwrap()
}

/// A PROXY v1 line for an IPv4 `src` -> `dst`.
fn v1(src: &str, dst: &str) -> Vec<u8> {
    let (src, dst): (SocketAddr, SocketAddr) = (src.parse().unwrap(), dst.parse().unwrap());
    format!(
        "PROXY TCP4 {} {} {} {}\r\n",
        src.ip(),
        dst.ip(),
        src.port(),
        dst.port()
    )
    .into_bytes()
}

/// A proxy whose "public" listener reads `version` headers from loopback.
fn config(
    backends: &[SocketAddr],
    version: &str,
    from: &str,
    listener_extra: &str,
    pool_extra: &str,
) -> String {
    config_for(backends, pool_extra).replacen(
        "name = \"public\"\nbind = \"127.0.0.1:0\"",
        &format!(
            "name = \"public\"\nbind = \"127.0.0.1:0\"\nproxy_protocol = \"{version}\"\nproxy_protocol_from = [\"{from}\"]\n{listener_extra}"
        ),
        1,
    )
}

/// Sends `header` then `head` on a new connection; returns the stream and
/// the response head (empty when the connection was closed unanswered).
async fn request_after(addr: SocketAddr, header: &[u8], head: &str) -> (TcpStream, String) {
    let mut s = TcpStream::connect(addr).await.unwrap();
    let mut out = header.to_vec();
    out.extend_from_slice(head.as_bytes());
    // The peer may already have closed (a refused connection).
    let _ = s.write_all(&out).await;
    let head = read_head(&mut s).await;
    (s, head)
}

/// Reads a response head (up to the empty line); "" when the connection
/// ends first.
async fn read_head(s: &mut TcpStream) -> String {
    let mut buf = Vec::new();
    let mut byte = [0u8; 1];
    loop {
        match tokio::time::timeout(Duration::from_secs(5), s.read(&mut byte)).await {
            Ok(Ok(1)) => {
                buf.push(byte[0]);
                if buf.ends_with(b"\r\n\r\n") {
                    return String::from_utf8_lossy(&buf).into_owned();
                }
            }
            Ok(_) | Err(_) => return String::from_utf8_lossy(&buf).into_owned(),
        }
    }
}

fn header_value(head: &str, name: &str) -> Option<String> {
    head.lines().find_map(|l| {
        let (k, v) = l.split_once(':')?;
        k.eq_ignore_ascii_case(name).then(|| v.trim().to_string())
    })
}

async fn refused(admin: SocketAddr, reason: &str) -> u64 {
    let (_, body) = admin_request(admin, "GET", "/metrics", None).await;
    let want =
        format!("berth_connections_refused_total{{listener=\"public\",reason=\"{reason}\"}} ");
    body.lines()
        .find_map(|l| l.strip_prefix(&want))
        .map_or(0, |v| v.trim().parse().unwrap())
}

#[tokio::test]
async fn the_header_address_is_the_client_in_forwarded_for_over_websocket_and_http() {
    let ws = WsBackend::start("b1").await;
    let proxy = Proxy::start(&config(&[ws.addr], "any", "127.0.0.0/8", "", "")).await;

    // v2 then a WebSocket handshake in the same write.
    let (_s, head) = request_after(
        proxy.addr,
        &v2("203.0.113.7:51000", "198.51.100.1:443"),
        &upgrade_head("/", ""),
    )
    .await;
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    assert_eq!(
        header_value(&head, "x-seen-xff").as_deref(),
        Some("203.0.113.7")
    );

    // v1 on the same listener ("any").
    let (_s, head) = request_after(
        proxy.addr,
        &v1("192.0.2.44:1234", "198.51.100.1:443"),
        &upgrade_head("/", ""),
    )
    .await;
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    assert_eq!(
        header_value(&head, "x-seen-xff").as_deref(),
        Some("192.0.2.44")
    );
    proxy.shutdown().await;

    let http = http_backend("h1", Arc::new(tokio::sync::Notify::new())).await;
    let proxy = Proxy::start(&config(&[http], "v2", "127.0.0.1", "", "")).await;
    let (mut s, head) = request_after(
        proxy.addr,
        &v2("[2001:db8::9]:4000", "[2001:db8::1]:443"),
        "GET /echo HTTP/1.1\r\nHost: x\r\n\r\n",
    )
    .await;
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    let len: usize = header_value(&head, "content-length")
        .unwrap()
        .parse()
        .unwrap();
    let mut body = vec![0u8; len];
    s.read_exact(&mut body).await.unwrap();
    let body = String::from_utf8(body).unwrap();
    assert!(body.contains("x-forwarded-for: 2001:db8::9\n"), "{body}");
    proxy.shutdown().await;
}

#[tokio::test]
async fn the_header_works_in_front_of_tls() {
    let ws = WsBackend::start("b1").await;
    let toml = config(
        &[ws.addr],
        "v2",
        "127.0.0.1/32",
        "tls = { cert = \"{CERT}\", key = \"{KEY}\" }",
        "",
    );
    let proxy = Proxy::start(&toml).await;
    let mut tcp = TcpStream::connect(proxy.addr).await.unwrap();
    tcp.write_all(&v2("203.0.113.8:5000", "198.51.100.1:443"))
        .await
        .unwrap();
    let name = rustls_pki_types::ServerName::try_from("localhost").unwrap();
    let mut tls = tokio_rustls::TlsConnector::from(tls_client_config())
        .connect(name, tcp)
        .await
        .expect("TLS after the PROXY header");
    tls.write_all(upgrade_head("/", "").as_bytes())
        .await
        .unwrap();
    let mut buf = vec![0u8; 2048];
    let n = tokio::time::timeout(Duration::from_secs(5), tls.read(&mut buf))
        .await
        .unwrap()
        .unwrap();
    let head = String::from_utf8_lossy(&buf[..n]).into_owned();
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    assert_eq!(
        header_value(&head, "x-seen-xff").as_deref(),
        Some("203.0.113.8")
    );
    proxy.shutdown().await;
}

#[tokio::test]
async fn hash_client_ip_and_the_per_address_cap_use_the_header_address() {
    let backends = [
        WsBackend::start("b1").await,
        WsBackend::start("b2").await,
        WsBackend::start("b3").await,
    ];
    let addrs: Vec<SocketAddr> = backends.iter().map(|b| b.addr).collect();
    let toml = config(
        &addrs,
        "v2",
        "127.0.0.0/8",
        "",
        "affinity = \"hash\"\n[pools.main.hash]\nkey = \"client_ip\"",
    );
    let proxy = Proxy::start(&toml).await;

    // Every connection comes from 127.0.0.1; the header's address decides
    // the backend, the same one each time for the same client.
    let mut chosen = HashSet::new();
    for i in 1..=8 {
        let client = format!("198.51.100.{i}:4000");
        let mut first = None;
        for _ in 0..2 {
            let (s, head) = request_after(
                proxy.addr,
                &v2(&client, "192.0.2.1:443"),
                &upgrade_head("/", ""),
            )
            .await;
            assert!(head.starts_with("HTTP/1.1 101"), "{head}");
            let mut ws = tokio_tungstenite::WebSocketStream::from_raw_socket(
                tokio_tungstenite::MaybeTlsStream::Plain(s),
                tokio_tungstenite::tungstenite::protocol::Role::Client,
                None,
            )
            .await;
            let who = whoami(&mut ws).await;
            match &first {
                None => first = Some(who.clone()),
                Some(f) => assert_eq!(f, &who, "client {client} moved"),
            }
        }
        chosen.insert(first.unwrap());
    }
    assert!(chosen.len() >= 2, "every client on one backend: {chosen:?}");
    proxy.shutdown().await;

    let proxy = Proxy::start(&config(
        &addrs,
        "v2",
        "127.0.0.0/8",
        "max_connections_per_ip = 1",
        "",
    ))
    .await;
    let admin = proxy.admin.unwrap();

    // Two open connections from one header address: the second is refused
    // (per_ip), while another address over the same socket peer is not.
    let (_held, head) = request_after(
        proxy.addr,
        &v2("203.0.113.50:1000", "192.0.2.1:443"),
        &upgrade_head("/", ""),
    )
    .await;
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    let before = refused(admin, "per_ip").await;
    let (_s, head) = request_after(
        proxy.addr,
        &v2("203.0.113.50:1001", "192.0.2.1:443"),
        &upgrade_head("/", ""),
    )
    .await;
    assert_eq!(
        head, "",
        "the second connection from 203.0.113.50 is closed"
    );
    assert_eq!(refused(admin, "per_ip").await, before + 1);
    let (_other, head) = request_after(
        proxy.addr,
        &v2("203.0.113.51:1000", "192.0.2.1:443"),
        &upgrade_head("/", ""),
    )
    .await;
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    proxy.shutdown().await;
}

#[tokio::test]
async fn a_peer_outside_the_list_and_a_missing_or_bad_header_are_refused_and_counted() {
    let ws = WsBackend::start("b1").await;
    // Only 10.0.0.0/8 may send headers: the test's 127.0.0.1 may not.
    let proxy = Proxy::start(&config(&[ws.addr], "any", "10.0.0.0/8", "", "")).await;
    let admin = proxy.admin.unwrap();
    let (_s, head) = request_after(
        proxy.addr,
        &v2("203.0.113.7:51000", "198.51.100.1:443"),
        &upgrade_head("/", ""),
    )
    .await;
    assert_eq!(head, "");
    assert_eq!(refused(admin, "proxy_protocol").await, 1);
    proxy.shutdown().await;

    let proxy = Proxy::start(&config(
        &[ws.addr],
        "v2",
        "127.0.0.1",
        "handshake_timeout = \"500ms\"",
        "",
    ))
    .await;
    let admin = proxy.admin.unwrap();
    let cases: [(&str, Vec<u8>); 4] = [
        ("no header", Vec::new()),
        (
            "a v1 header on a v2 listener",
            v1("203.0.113.7:1", "198.51.100.1:443"),
        ),
        ("a broken v2 header", {
            let mut h = v2("203.0.113.7:1", "198.51.100.1:443");
            h[12] = 0x99; // version 9
            h
        }),
        (
            "half a header, then nothing",
            v2("203.0.113.7:1", "198.51.100.1:443")[..20].to_vec(),
        ),
    ];
    for (i, (name, header)) in cases.iter().enumerate() {
        let head = if i == 3 {
            ""
        } else {
            "GET / HTTP/1.1\r\nHost: x\r\n\r\n"
        };
        let (_s, answer) = request_after(proxy.addr, header, head).await;
        assert_eq!(answer, "", "{name}: closed without an answer");
        assert_eq!(
            refused(admin, "proxy_protocol").await,
            i as u64 + 1,
            "{name}"
        );
    }
    // A good header still works (a balancer's LOCAL health check too).
    let local = ppp::v2::Builder::new(
        ppp::v2::Version::Two | ppp::v2::Command::Local,
        ppp::v2::AddressFamily::Unspecified | ppp::v2::Protocol::Unspecified,
    )
    .build()
    .unwrap();
    let (_s, head) = request_after(proxy.addr, &local, &upgrade_head("/", "")).await;
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    assert_eq!(
        header_value(&head, "x-seen-xff").as_deref(),
        Some("127.0.0.1")
    );
    proxy.shutdown().await;
}

/// What a PROXY-aware backend saw: per backend connection, the source its
/// header named and the requests it carried.
type Seen = Arc<Mutex<Vec<(Option<SocketAddr>, Vec<String>)>>>;

/// A backend that reads a PROXY v2 header (ppp) first, then serves HTTP/1.1
/// (answering with the header's source) or a WebSocket upgrade.
async fn proxy_aware_backend() -> (SocketAddr, Seen) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let seen: Seen = Arc::default();
    let log = Arc::clone(&seen);
    tokio::spawn(async move {
        loop {
            let Ok((mut stream, _)) = listener.accept().await else {
                return;
            };
            let log = Arc::clone(&log);
            tokio::spawn(async move {
                let mut pre = [0u8; 16];
                if stream.read_exact(&mut pre).await.is_err() {
                    return;
                }
                let len = usize::from(u16::from_be_bytes([pre[14], pre[15]]));
                let mut rest = vec![0u8; len];
                stream.read_exact(&mut rest).await.unwrap();
                let whole = [pre.to_vec(), rest].concat();
                let header =
                    ppp::v2::Header::try_from(whole.as_slice()).expect("a PROXY v2 header");
                let source = match header.addresses {
                    ppp::v2::Addresses::IPv4(a) => {
                        Some(SocketAddr::from((a.source_address, a.source_port)))
                    }
                    ppp::v2::Addresses::IPv6(a) => {
                        Some(SocketAddr::from((a.source_address, a.source_port)))
                    }
                    _ => None,
                };
                let index = {
                    let mut log = log.lock().unwrap();
                    log.push((source, Vec::new()));
                    log.len() - 1
                };
                // Either an upgrade (tungstenite) or plain requests (hyper):
                // tell them apart by the first head, once it is all there.
                let mut head = [0u8; 2048];
                let text = loop {
                    let n = stream.peek(&mut head).await.unwrap_or(0);
                    let text = String::from_utf8_lossy(&head[..n]).to_ascii_lowercase();
                    if n == 0 || text.contains("\r\n\r\n") {
                        break text;
                    }
                    tokio::time::sleep(Duration::from_millis(5)).await;
                };
                {
                    if text.contains("upgrade: websocket") {
                        let Ok(mut ws) = tokio_tungstenite::accept_async(stream).await else {
                            return;
                        };
                        use futures_util::{SinkExt, StreamExt};
                        while let Some(Ok(msg)) = ws.next().await {
                            if msg.is_text() {
                                let text = format!("{source:?}");
                                if ws
                                    .send(tokio_tungstenite::tungstenite::Message::text(text))
                                    .await
                                    .is_err()
                                {
                                    return;
                                }
                            }
                        }
                        return;
                    }
                }
                let svc = service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
                    let log = Arc::clone(&log);
                    async move {
                        log.lock().unwrap()[index]
                            .1
                            .push(req.uri().path().to_string());
                        let body = format!("{source:?}");
                        Ok::<_, std::convert::Infallible>(hyper::Response::new(Full::new(
                            Bytes::from(body),
                        )))
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
    (addr, seen)
}

/// `n` keep-alive GETs on one connection that opens with `header`; the
/// bodies.
async fn keep_alive_gets(addr: SocketAddr, header: &[u8], paths: &[&str]) -> Vec<String> {
    let mut tcp = TcpStream::connect(addr).await.unwrap();
    tcp.write_all(header).await.unwrap();
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
        .await
        .unwrap();
    tokio::spawn(conn);
    let mut out = Vec::new();
    for path in paths {
        let req = hyper::Request::get(*path)
            .header("host", "x")
            .body(http_body_util::Empty::<Bytes>::new())
            .unwrap();
        let resp = sender.send_request(req).await.unwrap();
        assert_eq!(resp.status(), 200);
        let body = resp.into_body().collect().await.unwrap().to_bytes();
        out.push(String::from_utf8(body.to_vec()).unwrap());
    }
    out
}

#[tokio::test]
async fn send_proxy_protocol_names_the_client_to_the_backend_and_keeps_keep_alive_per_client() {
    let (backend, seen) = proxy_aware_backend().await;
    // Chained: the client's address arrives in a PROXY header and leaves in
    // berth's own.
    let toml = config(
        &[backend],
        "v2",
        "127.0.0.1",
        "",
        "send_proxy_protocol = \"v2\"",
    );
    let proxy = Proxy::start(&toml).await;

    // A WebSocket: the backend's header names the client.
    let (s, head) = request_after(
        proxy.addr,
        &v2("203.0.113.7:51000", "198.51.100.1:443"),
        &upgrade_head("/ws", ""),
    )
    .await;
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    let mut ws = tokio_tungstenite::WebSocketStream::from_raw_socket(
        tokio_tungstenite::MaybeTlsStream::Plain(s),
        tokio_tungstenite::tungstenite::protocol::Role::Client,
        None,
    )
    .await;
    assert_eq!(whoami(&mut ws).await, "Some(203.0.113.7:51000)");
    drop(ws);

    // Plain HTTP: two clients, two keep-alive requests each, interleaved.
    let a = v2("203.0.113.10:1111", "198.51.100.1:443");
    let b = v2("203.0.113.20:2222", "198.51.100.1:443");
    let (got_a, got_b) = tokio::join!(
        keep_alive_gets(proxy.addr, &a, &["/a1", "/a2"]),
        keep_alive_gets(proxy.addr, &b, &["/b1", "/b2"]),
    );
    assert_eq!(got_a, vec!["Some(203.0.113.10:1111)"; 2]);
    assert_eq!(got_b, vec!["Some(203.0.113.20:2222)"; 2]);
    // Every backend connection carried the requests of one client only.
    let seen = seen.lock().unwrap().clone();
    for (source, paths) in &seen {
        for p in paths {
            let want = if p.starts_with("/a") {
                "203.0.113.10:1111"
            } else {
                "203.0.113.20:2222"
            };
            assert_eq!(
                source.map(|s| s.to_string()).as_deref(),
                Some(want),
                "{seen:?}"
            );
        }
    }
    let http_conns: Vec<_> = seen.iter().filter(|(_, p)| !p.is_empty()).collect();
    assert!(http_conns.len() >= 2, "{seen:?}");
    proxy.shutdown().await;
}
