//! Test harness: real backends on 127.0.0.1:0 and a real proxy, started in
//! process; clients are real (tokio-tungstenite, hyper, raw TCP).
//!
//! The raw-frame helpers here are written independently of berth's own
//! frame code, so tests do not check berth against itself.
#![allow(dead_code)]

pub mod browser;
pub mod dns;
pub mod fleet;
pub mod h2c;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use berth::app::App;
use berth::config::Config;
use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use http_body_util::{BodyExt, Full};
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tokio_tungstenite::tungstenite::handshake::server::{Request, Response};
use tokio_tungstenite::tungstenite::Message;

pub const CERT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/certs/example.crt");
pub const KEY: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/certs/example.key");

/// A running proxy.
pub struct Proxy {
    pub addr: SocketAddr,
    pub tls_addr: Option<SocketAddr>,
    pub admin: Option<SocketAddr>,
    stop: Option<oneshot::Sender<()>>,
    pub task: JoinHandle<()>,
}

impl Proxy {
    /// Starts berth with `toml`; the listener named "public" is `addr`, one
    /// named "tls" is `tls_addr`. `{CERT}`/`{KEY}` are replaced by the test
    /// certificate paths.
    pub async fn start(toml: &str) -> Proxy {
        let text = toml.replace("{CERT}", CERT).replace("{KEY}", KEY);
        Proxy::run(Config::from_toml_str(&text, "test.toml").unwrap_or_else(|e| panic!("{e}")))
            .await
    }

    /// Starts berth from a config file (so that reloads re-read it).
    pub async fn start_file(path: &std::path::Path) -> Proxy {
        Proxy::run(Config::load(path).unwrap_or_else(|e| panic!("{e}"))).await
    }

    async fn run(config: Config) -> Proxy {
        let app = App::bind(config).await.expect("bind");
        let addr = app.listener_addr("public").expect("listener named public");
        let tls_addr = app.listener_addr("tls");
        let admin = app.admin_addr();
        let (tx, rx) = oneshot::channel::<()>();
        let task = tokio::spawn(app.run(async {
            let _ = rx.await;
        }));
        Proxy {
            addr,
            tls_addr,
            admin,
            stop: Some(tx),
            task,
        }
    }

    /// Triggers shutdown and waits for `run` to return.
    pub async fn shutdown(mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        let _ = tokio::time::timeout(Duration::from_secs(30), &mut self.task).await;
    }
}

/// A minimal config: a plain listener "public", a TLS listener "tls", one
/// pool "main" with the given backends, plus extra pool keys.
pub fn config_for(backends: &[SocketAddr], pool_extra: &str) -> String {
    let mut s = String::from(
        r#"
shutdown_window = "500ms"

[[listeners]]
name = "public"
bind = "127.0.0.1:0"

[[listeners]]
name = "tls"
bind = "127.0.0.1:0"
tls = { cert = "{CERT}", key = "{KEY}" }

[admin]
bind = "127.0.0.1:0"

[[routes]]
pool = "main"

[pools.main]
balance = "round_robin"
connect_timeout = "1s"
"#,
    );
    s.push_str(pool_extra);
    s.push('\n');
    for (i, b) in backends.iter().enumerate() {
        s.push_str(&format!(
            "[[pools.main.backends]]\nid = \"b{}\"\naddress = \"{}\"\n\n",
            i + 1,
            b
        ));
    }
    s
}

/// `toml` (a [`config_for`] config) with `line` (`"http2 = false"`) added
/// to its first `listeners` listeners: 1 for "public", 2 for "tls" too.
pub fn with_listener_key(toml: &str, line: &str, listeners: usize) -> String {
    let bind = "bind = \"127.0.0.1:0\"\n";
    toml.replacen(bind, &format!("{bind}{line}\n"), listeners)
}

/// A tokio-tungstenite echo backend that answers the text "whoami" with its
/// id, picks "superchat" when the client offers it as a subprotocol, and
/// counts connections and Pong frames it receives.
pub struct WsBackend {
    pub addr: SocketAddr,
    pub id: String,
    pub connections: Arc<AtomicUsize>,
    pub pongs_seen: Arc<AtomicUsize>,
    pub closes_seen: Arc<std::sync::Mutex<Vec<u16>>>,
    pub task: JoinHandle<()>,
}

impl WsBackend {
    pub async fn start(id: &str) -> WsBackend {
        WsBackend::start_at(id, "127.0.0.1:0".parse().unwrap()).await
    }

    /// A backend on a given address (another loopback address on the same
    /// port, for DNS discovery).
    pub async fn start_at(id: &str, at: SocketAddr) -> WsBackend {
        let listener = TcpListener::bind(at).await.unwrap();
        let addr = listener.local_addr().unwrap();
        let connections = Arc::new(AtomicUsize::new(0));
        let pongs_seen = Arc::new(AtomicUsize::new(0));
        let closes_seen = Arc::new(std::sync::Mutex::new(Vec::new()));
        let (c, p, cl, name) = (
            connections.clone(),
            pongs_seen.clone(),
            closes_seen.clone(),
            id.to_string(),
        );
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    return;
                };
                let (c, p, cl, name) = (c.clone(), p.clone(), cl.clone(), name.clone());
                tokio::spawn(async move {
                    #[allow(clippy::result_large_err)] // tungstenite's callback signature
                    let cb = |req: &Request, mut resp: Response| {
                        let offered = req
                            .headers()
                            .get("sec-websocket-protocol")
                            .and_then(|v| v.to_str().ok())
                            .unwrap_or("");
                        if offered.split(',').any(|p| p.trim() == "superchat") {
                            resp.headers_mut()
                                .insert("sec-websocket-protocol", "superchat".parse().unwrap());
                        }
                        if let Some(xff) = req.headers().get("x-forwarded-for") {
                            resp.headers_mut().insert("x-seen-xff", xff.clone());
                        }
                        let cookies: Vec<&str> = req
                            .headers()
                            .get_all("cookie")
                            .iter()
                            .filter_map(|v| v.to_str().ok())
                            .collect();
                        resp.headers_mut()
                            .insert("x-seen-cookie", cookies.join(" | ").parse().unwrap());
                        Ok(resp)
                    };
                    let config =
                        tokio_tungstenite::tungstenite::protocol::WebSocketConfig::default()
                            .max_message_size(Some(64 << 20))
                            .max_frame_size(Some(64 << 20));
                    let Ok(mut ws) =
                        tokio_tungstenite::accept_hdr_async_with_config(stream, cb, Some(config))
                            .await
                    else {
                        return;
                    };
                    c.fetch_add(1, Ordering::SeqCst);
                    while let Some(msg) = ws.next().await {
                        let Ok(msg) = msg else { break };
                        match msg {
                            // Vanish without a Close frame (a crash, as the proxy sees it).
                            Message::Text(t) if t.as_str() == "die" => return,
                            Message::Text(t) if t.as_str() == "whoami" => {
                                let sent = ws.send(Message::text(name.clone())).await;
                                if sent.is_err() {
                                    break;
                                }
                            }
                            Message::Text(_) | Message::Binary(_) => {
                                let sent = ws.send(msg).await;
                                if sent.is_err() {
                                    break;
                                }
                            }
                            Message::Pong(_) => {
                                p.fetch_add(1, Ordering::SeqCst);
                            }
                            Message::Close(frame) => {
                                cl.lock()
                                    .unwrap()
                                    .push(frame.map_or(1005, |f| u16::from(f.code)));
                            }
                            _ => {}
                        }
                    }
                });
            }
        });
        WsBackend {
            addr,
            id: id.to_string(),
            connections,
            pongs_seen,
            closes_seen,
            task,
        }
    }
}

/// A raw TCP backend that answers every request with `response` (bytes as
/// given) and then holds the connection open until the peer closes it.
pub async fn raw_backend(response: &'static [u8]) -> (SocketAddr, JoinHandle<()>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let task = tokio::spawn(async move {
        loop {
            let Ok((mut s, _)) = listener.accept().await else {
                return;
            };
            tokio::spawn(async move {
                let mut buf = vec![0u8; 4096];
                let mut got = Vec::new();
                while !got.windows(4).any(|w| w == b"\r\n\r\n") {
                    match s.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => got.extend_from_slice(&buf[..n]),
                    }
                }
                if !response.is_empty() {
                    let _ = s.write_all(response).await;
                }
                let _ = s.read(&mut buf).await;
            });
        }
    });
    (addr, task)
}

/// An HTTP backend (hyper) for plain-request tests:
/// - `/echo` returns a JSON-ish dump of method, path and headers;
/// - `/upload` streams the request body back;
/// - `/sse` sends one event, then waits for `release` before the second.
pub async fn http_backend(id: &'static str, release: Arc<tokio::sync::Notify>) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                return;
            };
            let release = release.clone();
            tokio::spawn(async move {
                let svc = service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
                    let release = release.clone();
                    async move {
                        let resp: hyper::Response<
                            http_body_util::combinators::BoxBody<Bytes, Infallible>,
                        > = match req.uri().path() {
                            "/upload" => {
                                let body = req
                                    .into_body()
                                    .collect()
                                    .await
                                    .map(|b| b.to_bytes())
                                    .unwrap_or_default();
                                hyper::Response::new(Full::new(body).boxed())
                            }
                            "/sse" => {
                                let (tx, rx) = tokio::sync::mpsc::channel::<
                                    Result<hyper::body::Frame<Bytes>, Infallible>,
                                >(4);
                                tokio::spawn(async move {
                                    let _ = tx
                                        .send(Ok(hyper::body::Frame::data(Bytes::from_static(
                                            b"data: first\n\n",
                                        ))))
                                        .await;
                                    release.notified().await;
                                    let _ = tx
                                        .send(Ok(hyper::body::Frame::data(Bytes::from_static(
                                            b"data: second\n\n",
                                        ))))
                                        .await;
                                });
                                let body = http_body_util::StreamBody::new(tokio_stream_from(rx));
                                let mut r = hyper::Response::new(BodyExt::boxed(body));
                                r.headers_mut()
                                    .insert("content-type", "text/event-stream".parse().unwrap());
                                r
                            }
                            _ => {
                                let mut text = format!(
                                    "backend={id}\nmethod={}\npath={}\n",
                                    req.method(),
                                    req.uri()
                                );
                                for (k, v) in req.headers() {
                                    text.push_str(&format!(
                                        "{}: {}\n",
                                        k,
                                        v.to_str().unwrap_or("?")
                                    ));
                                }
                                let mut r =
                                    hyper::Response::new(Full::new(Bytes::from(text)).boxed());
                                r.headers_mut().insert("x-backend", id.parse().unwrap());
                                r.headers_mut()
                                    .insert("keep-alive", "timeout=5".parse().unwrap());
                                r
                            }
                        };
                        Ok::<_, Infallible>(resp)
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
    addr
}

/// Adapts an mpsc receiver into a stream without another dependency.
fn tokio_stream_from<T: Send + 'static>(
    rx: tokio::sync::mpsc::Receiver<T>,
) -> impl futures_util::Stream<Item = T> {
    futures_util::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|v| (v, rx)) })
}

/// A rustls client config that trusts the test certificate (a session cache
/// of its own, as every new config has).
pub fn tls_client_config() -> Arc<rustls::ClientConfig> {
    tls_client_config_for(rustls::DEFAULT_VERSIONS)
}

/// [`tls_client_config`] restricted to `versions`.
pub fn tls_client_config_for(
    versions: &[&'static rustls::SupportedProtocolVersion],
) -> Arc<rustls::ClientConfig> {
    use rustls_pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls_pki_types::CertificateDer::pem_file_iter(CERT).unwrap() {
        roots.add(cert.unwrap()).unwrap();
    }
    let mut cfg = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_protocol_versions(versions)
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    Arc::new(cfg)
}

/// One TLS connection to `addr` with `config` (whose session cache decides
/// whether it can resume) and a request berth answers itself (426: wrong
/// WebSocket version). Reading the answer also takes in TLS 1.3's session
/// tickets. Returns how the handshake went.
pub async fn tls_handshake_kind(
    addr: SocketAddr,
    config: &Arc<rustls::ClientConfig>,
) -> Option<rustls::HandshakeKind> {
    let tcp = TcpStream::connect(addr).await.unwrap();
    let name = rustls_pki_types::ServerName::try_from("localhost").unwrap();
    let mut conn = tokio_rustls::TlsConnector::from(Arc::clone(config))
        .connect(name, tcp)
        .await
        .unwrap();
    let head =
        upgrade_head("/", "").replace("Sec-WebSocket-Version: 13", "Sec-WebSocket-Version: 12");
    conn.write_all(head.as_bytes()).await.unwrap();
    let mut buf = [0u8; 64];
    let n = tokio::time::timeout(Duration::from_secs(5), conn.read(&mut buf))
        .await
        .expect("an answer")
        .unwrap();
    assert!(
        buf[..n].starts_with(b"HTTP/1.1 426"),
        "{:?}",
        String::from_utf8_lossy(&buf[..n])
    );
    conn.get_ref().1.handshake_kind()
}

pub type Ws = tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<TcpStream>>;

/// Connects a tokio-tungstenite client over ws:// (or wss:// when `tls`).
pub async fn ws_connect(addr: SocketAddr, tls: bool, path: &str) -> Ws {
    try_ws_connect(addr, tls, path, &[]).await.unwrap().0
}

pub async fn try_ws_connect(
    addr: SocketAddr,
    tls: bool,
    path: &str,
    extra_headers: &[(&str, &str)],
) -> Result<
    (
        Ws,
        tokio_tungstenite::tungstenite::handshake::client::Response,
    ),
    tokio_tungstenite::tungstenite::Error,
> {
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;
    let url = if tls {
        format!("wss://localhost:{}{}", addr.port(), path)
    } else {
        format!("ws://127.0.0.1:{}{}", addr.port(), path)
    };
    let mut req = url.into_client_request().unwrap();
    for (k, v) in extra_headers {
        req.headers_mut().insert(
            http::HeaderName::from_bytes(k.as_bytes()).unwrap(),
            v.parse().unwrap(),
        );
    }
    let config = tokio_tungstenite::tungstenite::protocol::WebSocketConfig::default()
        .max_message_size(Some(64 << 20))
        .max_frame_size(Some(64 << 20));
    let stream = TcpStream::connect(addr).await.unwrap();
    let connector = tls.then(|| tokio_tungstenite::Connector::Rustls(tls_client_config()));
    tokio_tungstenite::client_async_tls_with_config(req, stream, Some(config), connector).await
}

/// Asks the backend behind a connection who it is.
pub async fn whoami(ws: &mut Ws) -> String {
    ws.send(Message::text("whoami")).await.unwrap();
    loop {
        match tokio::time::timeout(Duration::from_secs(5), ws.next()).await {
            Ok(Some(Ok(Message::Text(t)))) => return t.to_string(),
            Ok(Some(Ok(_))) => continue,
            other => panic!("no whoami answer: {other:?}"),
        }
    }
}

/// Sends a raw HTTP/1.1 request head and returns the response head.
pub async fn raw_request(addr: SocketAddr, head: &str) -> (TcpStream, String) {
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(head.as_bytes()).await.unwrap();
    let mut got = Vec::new();
    let mut buf = [0u8; 1];
    while !got.ends_with(b"\r\n\r\n") {
        match tokio::time::timeout(Duration::from_secs(10), s.read(&mut buf)).await {
            Ok(Ok(1)) => got.push(buf[0]),
            _ => break,
        }
    }
    (s, String::from_utf8_lossy(&got).into_owned())
}

/// A valid upgrade request head for `path`.
pub fn upgrade_head(path: &str, extra: &str) -> String {
    format!(
        "GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n{extra}\r\n"
    )
}

/// Encodes a client frame (always masked, key fixed per call).
pub fn client_frame(fin: bool, opcode: u8, payload: &[u8]) -> Vec<u8> {
    let key = [0x11, 0x22, 0x33, 0x44];
    let mut out = vec![(if fin { 0x80 } else { 0 }) | opcode];
    let len = payload.len();
    if len < 126 {
        out.push(0x80 | len as u8);
    } else if len <= 0xFFFF {
        out.push(0x80 | 126);
        out.extend_from_slice(&(len as u16).to_be_bytes());
    } else {
        out.push(0x80 | 127);
        out.extend_from_slice(&(len as u64).to_be_bytes());
    }
    out.extend_from_slice(&key);
    out.extend(payload.iter().enumerate().map(|(i, b)| b ^ key[i % 4]));
    out
}

/// Reads one whole unmasked frame from a raw stream: (fin, opcode, payload).
pub async fn read_frame<S: tokio::io::AsyncRead + Unpin>(s: &mut S) -> Option<(bool, u8, Vec<u8>)> {
    let mut h = [0u8; 2];
    s.read_exact(&mut h).await.ok()?;
    let mut len = u64::from(h[1] & 0x7F);
    if len == 126 {
        let mut b = [0u8; 2];
        s.read_exact(&mut b).await.ok()?;
        len = u64::from(u16::from_be_bytes(b));
    } else if len == 127 {
        let mut b = [0u8; 8];
        s.read_exact(&mut b).await.ok()?;
        len = u64::from_be_bytes(b);
    }
    let mask = if h[1] & 0x80 != 0 {
        let mut m = [0u8; 4];
        s.read_exact(&mut m).await.ok()?;
        Some(m)
    } else {
        None
    };
    let mut payload = vec![0u8; len as usize];
    s.read_exact(&mut payload).await.ok()?;
    if let Some(m) = mask {
        for (i, b) in payload.iter_mut().enumerate() {
            *b ^= m[i % 4];
        }
    }
    Some((h[0] & 0x80 != 0, h[0] & 0x0F, payload))
}

/// Reads frames until a Close; returns its code (1005 when it has none).
pub async fn read_until_close<S: tokio::io::AsyncRead + Unpin>(s: &mut S) -> Option<u16> {
    loop {
        let (_, op, payload) = read_frame(s).await?;
        if op == 0x8 {
            return Some(if payload.len() >= 2 {
                u16::from_be_bytes([payload[0], payload[1]])
            } else {
                1005
            });
        }
    }
}

/// Opens a raw WebSocket through the proxy (handshake done, 101 checked).
pub async fn raw_ws(addr: SocketAddr) -> TcpStream {
    let (s, head) = raw_request(addr, &upgrade_head("/", "")).await;
    assert!(head.starts_with("HTTP/1.1 101"), "expected 101, got {head}");
    s
}

/// Sends a request to the admin API and returns (status, body).
pub async fn admin_request(
    admin: SocketAddr,
    method: &str,
    path: &str,
    token: Option<&str>,
) -> (u16, String) {
    let mut s = TcpStream::connect(admin).await.unwrap();
    let auth = token.map_or(String::new(), |t| format!("Authorization: Bearer {t}\r\n"));
    let head = format!("{method} {path} HTTP/1.1\r\nHost: admin\r\n{auth}Content-Length: 0\r\nConnection: close\r\n\r\n");
    s.write_all(head.as_bytes()).await.unwrap();
    let mut out = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut out))
        .await
        .unwrap()
        .unwrap();
    let text = String::from_utf8_lossy(&out).into_owned();
    let status = text.get(9..12).and_then(|c| c.parse().ok()).unwrap_or(0);
    let body = text
        .split_once("\r\n\r\n")
        .map_or(String::new(), |(_, b)| b.to_string());
    (status, body)
}

/// Reads the next Close from a tokio-tungstenite client, answering nothing
/// else; returns its code, or None if the stream ended without one.
pub async fn next_close(ws: &mut Ws) -> Option<u16> {
    while let Some(msg) = ws.next().await {
        match msg {
            Ok(Message::Close(frame)) => return Some(frame.map_or(1005, |f| u16::from(f.code))),
            Ok(_) => continue,
            Err(_) => return None,
        }
    }
    None
}

/// Opens a raw WebSocket through the proxy's TLS listener.
pub async fn raw_wss(addr: SocketAddr) -> tokio_rustls::client::TlsStream<TcpStream> {
    let tcp = TcpStream::connect(addr).await.unwrap();
    let connector = tokio_rustls::TlsConnector::from(tls_client_config());
    let mut s = connector
        .connect(
            rustls_pki_types::ServerName::try_from("localhost").unwrap(),
            tcp,
        )
        .await
        .unwrap();
    s.write_all(upgrade_head("/", "").as_bytes()).await.unwrap();
    let mut got = Vec::new();
    let mut b = [0u8; 1];
    while !got.ends_with(b"\r\n\r\n") {
        s.read_exact(&mut b).await.unwrap();
        got.push(b[0]);
    }
    assert!(
        got.starts_with(b"HTTP/1.1 101"),
        "{}",
        String::from_utf8_lossy(&got)
    );
    s
}

/// An HTTP backend whose `/healthz` answers 200 or 503 as `healthy` says,
/// counting each kind of answer; every other path answers with its id.
pub struct HealthBackend {
    pub addr: SocketAddr,
    pub healthy: Arc<std::sync::atomic::AtomicBool>,
    pub ok_served: Arc<AtomicUsize>,
    pub fail_served: Arc<AtomicUsize>,
}

impl HealthBackend {
    pub async fn start(id: &'static str) -> HealthBackend {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let healthy = Arc::new(std::sync::atomic::AtomicBool::new(true));
        let ok_served = Arc::new(AtomicUsize::new(0));
        let fail_served = Arc::new(AtomicUsize::new(0));
        let (h, okc, failc) = (healthy.clone(), ok_served.clone(), fail_served.clone());
        tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    return;
                };
                let (h, okc, failc) = (h.clone(), okc.clone(), failc.clone());
                tokio::spawn(async move {
                    let svc = service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
                        let (h, okc, failc) = (h.clone(), okc.clone(), failc.clone());
                        async move {
                            let (status, body) = if req.uri().path() == "/healthz" {
                                if h.load(Ordering::SeqCst) {
                                    okc.fetch_add(1, Ordering::SeqCst);
                                    (200, "ok")
                                } else {
                                    failc.fetch_add(1, Ordering::SeqCst);
                                    (503, "sick")
                                }
                            } else {
                                (200, id)
                            };
                            let mut r = hyper::Response::new(Full::new(Bytes::from(body)));
                            *r.status_mut() = hyper::StatusCode::from_u16(status).unwrap();
                            Ok::<_, Infallible>(r)
                        }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), svc)
                        .await;
                });
            }
        });
        HealthBackend {
            addr,
            healthy,
            ok_served,
            fail_served,
        }
    }
}

/// GET `path` on a plain listener; returns (status, body).
pub async fn http_get(addr: SocketAddr, path: &str) -> (u16, String) {
    let stream = TcpStream::connect(addr).await.unwrap();
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .unwrap();
    tokio::spawn(conn);
    let req = hyper::Request::builder()
        .uri(path)
        .header("host", "localhost")
        .body(http_body_util::Empty::<Bytes>::new())
        .unwrap();
    let resp = sender.send_request(req).await.unwrap();
    let status = resp.status().as_u16();
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    (status, String::from_utf8_lossy(&body).into_owned())
}

/// The state of one backend as `/admin/pools` reports it.
pub async fn backend_state(admin: SocketAddr, id: &str) -> String {
    let (_, body) = admin_request(admin, "GET", "/admin/pools", None).await;
    let json: serde_json::Value = serde_json::from_str(&body).unwrap();
    for pool in json["pools"].as_object().unwrap().values() {
        for b in pool["backends"].as_array().unwrap() {
            if b["id"] == id {
                return b["state"].as_str().unwrap().to_string();
            }
        }
    }
    panic!("no backend {id} in {body}");
}

/// The real `berth` binary running a config file, with the public listener
/// and the admin API on ports probed free just before.
pub struct BerthProcess {
    pub child: std::process::Child,
    pub addr: SocketAddr,
    pub admin: SocketAddr,
    pub config_path: std::path::PathBuf,
    _dir: tempfile::TempDir,
}

impl BerthProcess {
    /// Writes `toml` (from [`config_for`]; the public and admin binds are
    /// rewritten to fixed free ports) and starts `berth [args] run` on it;
    /// waits until both ports accept.
    pub async fn spawn(
        toml: &str,
        global_args: &[&str],
        stderr: std::process::Stdio,
    ) -> BerthProcess {
        BerthProcess::spawn_under(&[], toml, global_args, stderr).await
    }

    /// [`BerthProcess::spawn`] through a wrapper command that execs berth
    /// (so the process id stays berth's), e.g. `["prlimit", "--nofile=400:400", "--"]`.
    pub async fn spawn_under(
        wrapper: &[&str],
        toml: &str,
        global_args: &[&str],
        stderr: std::process::Stdio,
    ) -> BerthProcess {
        let free = || {
            std::net::TcpListener::bind("127.0.0.1:0")
                .unwrap()
                .local_addr()
                .unwrap()
        };
        let (addr, admin) = (free(), free());
        let text = toml
            .replacen("bind = \"127.0.0.1:0\"", &format!("bind = \"{addr}\""), 1)
            .replace(
                "[admin]\nbind = \"127.0.0.1:0\"",
                &format!("[admin]\nbind = \"{admin}\""),
            )
            .replace("{CERT}", CERT)
            .replace("{KEY}", KEY);
        let dir = tempfile::tempdir().unwrap();
        let config_path = dir.path().join("berth.toml");
        std::fs::write(&config_path, text).unwrap();
        let mut args: Vec<&str> = wrapper.to_vec();
        args.push(env!("CARGO_BIN_EXE_berth"));
        args.extend(global_args);
        args.extend(["run", "--config", config_path.to_str().unwrap()]);
        let child = std::process::Command::new(args[0])
            .args(&args[1..])
            .stdout(std::process::Stdio::null())
            .stderr(stderr)
            .spawn()
            .unwrap();
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while TcpStream::connect(addr).await.is_err() || TcpStream::connect(admin).await.is_err() {
            assert!(std::time::Instant::now() < deadline, "berth did not start");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        BerthProcess {
            child,
            addr,
            admin,
            config_path,
            _dir: dir,
        }
    }

    /// Sends a signal (`TERM`, `INT`, `HUP`) with kill(1).
    pub fn signal(&self, name: &str) {
        let ok = std::process::Command::new("kill")
            .args([&format!("-{name}"), &self.child.id().to_string()])
            .status()
            .unwrap()
            .success();
        assert!(ok, "kill -{name} failed");
    }

    /// Waits up to `limit` for the process to exit.
    pub async fn wait_exit(&mut self, limit: Duration) -> Option<std::process::ExitStatus> {
        let deadline = std::time::Instant::now() + limit;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return Some(status);
            }
            if std::time::Instant::now() >= deadline {
                return None;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

impl Drop for BerthProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Reads an HTTP head (up to the blank line) in chunks, for peers that send
/// nothing after their head until they are answered (a raw WebSocket
/// backend's handshake, a client's 101).
pub async fn read_head_chunked(s: &mut TcpStream) -> String {
    let mut got = Vec::new();
    let mut buf = [0u8; 1024];
    while !got.windows(4).any(|w| w == b"\r\n\r\n") {
        match s.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => got.extend_from_slice(&buf[..n]),
        }
    }
    String::from_utf8_lossy(&got).into_owned()
}

/// The `101 Switching Protocols` a WebSocket backend answers the handshake
/// `head` with; None when the head has no `Sec-WebSocket-Key`.
pub fn switching_protocols(head: &str) -> Option<String> {
    let key = head.lines().find_map(|l| {
        let (name, value) = l.split_once(':')?;
        name.eq_ignore_ascii_case("sec-websocket-key")
            .then(|| value.trim().to_string())
    })?;
    let accept = tokio_tungstenite::tungstenite::handshake::derive_accept_key(key.as_bytes());
    Some(format!("HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: {accept}\r\n\r\n"))
}
