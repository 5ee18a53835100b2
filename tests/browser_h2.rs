//! A real browser (headless Chromium) through berth over HTTP/2: the page
//! loads over h2 and its WebSocket rides the same connection (RFC 8441),
//! a typed message comes back, a reload stays on its backend (cookie
//! affinity through the browser's cookie jar), a drain of that backend
//! gives the page Close 1012 and it reconnects elsewhere, and killing the
//! backend gives it 1014. The same steps with `http2 = false` run over
//! HTTP/1.1.

mod support;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use serde_json::Value;
use tokio::net::TcpListener;
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use tokio_tungstenite::tungstenite::protocol::Role;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;
use tokio_util::sync::CancellationToken;

use support::browser::Browser;
use support::{admin_request, config_for, with_listener_key, Proxy};

const WAIT: Duration = Duration::from_secs(20);

/// The page every backend serves: its id, a message box, and a WebSocket
/// that asks its backend's id, keeps what it receives and every close code,
/// and reconnects 300 ms after a close.
const PAGE: &str = r#"<!doctype html>
<html><head><meta charset="utf-8"><title>berth h2</title></head><body>
<p id="page-backend">BACKEND</p>
<input id="msg"><button id="send">send</button>
<script>
window.closes = []; window.received = []; window.wsBackends = [];
function connect() {
  const ws = new WebSocket(`wss://${location.host}/ws`);
  window.ws = ws;
  ws.onopen = () => ws.send("whoami");
  ws.onmessage = (e) => {
    if (e.data.startsWith("backend:")) window.wsBackends.push(e.data.slice(8));
    else window.received.push(e.data);
  };
  ws.onclose = (e) => { window.closes.push(e.code); setTimeout(connect, 300); };
}
document.getElementById("send").onclick = () => {
  const box = document.getElementById("msg");
  window.ws.send(box.value);
  box.value = "";
};
connect();
</script></body></html>
"#;

/// A backend serving [`PAGE`] and an echoing WebSocket at `/ws` (which
/// answers "whoami" with `backend:ID`); `kill` ends it at once: listener
/// and connections, no Close frames.
struct PageBackend {
    addr: SocketAddr,
    kill: CancellationToken,
}

async fn page_backend(id: &'static str) -> PageBackend {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let kill = CancellationToken::new();
    let stop = kill.clone();
    tokio::spawn(async move {
        loop {
            let accepted = tokio::select! {
                _ = stop.cancelled() => return,
                r = listener.accept() => r,
            };
            let Ok((stream, _)) = accepted else { return };
            let stop = stop.clone();
            tokio::spawn(async move {
                let svc_stop = stop.clone();
                let svc = hyper::service::service_fn(move |req: hyper::Request<Incoming>| {
                    let stop = svc_stop.clone();
                    async move { Ok::<_, Infallible>(answer(id, req, stop)) }
                });
                let conn = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), svc)
                    .with_upgrades();
                tokio::select! {
                    _ = stop.cancelled() => {}
                    _ = conn => {}
                }
            });
        }
    });
    PageBackend { addr, kill }
}

fn answer(
    id: &'static str,
    mut req: hyper::Request<Incoming>,
    stop: CancellationToken,
) -> hyper::Response<Full<Bytes>> {
    let key = req.headers().get("sec-websocket-key").cloned();
    let Some(key) = key else {
        let mut resp = hyper::Response::new(Full::new(Bytes::from(PAGE.replace("BACKEND", id))));
        resp.headers_mut()
            .insert("content-type", "text/html; charset=utf-8".parse().unwrap());
        return resp;
    };
    let on_upgrade = hyper::upgrade::on(&mut req);
    tokio::spawn(async move {
        let Ok(upgraded) = on_upgrade.await else {
            return;
        };
        let mut ws =
            WebSocketStream::from_raw_socket(TokioIo::new(upgraded), Role::Server, None).await;
        loop {
            let msg = tokio::select! {
                _ = stop.cancelled() => return,
                m = ws.next() => m,
            };
            let Some(Ok(msg)) = msg else { return };
            let reply = match msg {
                Message::Text(t) if t.as_str() == "whoami" => {
                    Message::text(format!("backend:{id}"))
                }
                Message::Text(_) | Message::Binary(_) => msg,
                _ => continue,
            };
            if ws.send(reply).await.is_err() {
                return;
            }
        }
    });
    let mut resp = hyper::Response::new(Full::new(Bytes::new()));
    *resp.status_mut() = hyper::StatusCode::SWITCHING_PROTOCOLS;
    let h = resp.headers_mut();
    h.insert("connection", "Upgrade".parse().unwrap());
    h.insert("upgrade", "websocket".parse().unwrap());
    h.insert(
        "sec-websocket-accept",
        derive_accept_key(key.as_bytes()).parse().unwrap(),
    );
    resp
}

async fn metric(proxy: &Proxy, series: &str) -> f64 {
    let (status, body) = admin_request(proxy.admin.unwrap(), "GET", "/metrics", None).await;
    assert_eq!(status, 200);
    body.lines()
        .find_map(|l| l.strip_prefix(series).and_then(|v| v.trim().parse().ok()))
        .unwrap_or(0.0)
}

/// The number of entries in the page's array `name`.
async fn count(browser: &Browser, name: &str) -> u64 {
    browser
        .execute(
            &format!("return window.{name} ? window.{name}.length : 0;"),
            Vec::new(),
        )
        .await
        .as_u64()
        .unwrap_or(0)
}

/// Waits for the page's WebSocket number `n` (from 1) to report its
/// backend, and returns it.
async fn ws_backend(browser: &Browser, n: u64) -> String {
    let script = format!("return (window.wsBackends || [])[{}] || '';", n - 1);
    let v = browser
        .wait_until(WAIT, &format!("WebSocket #{n} to open"), &script)
        .await;
    v.as_str().unwrap().to_string()
}

async fn the_five_steps(http2: bool) {
    let b1 = page_backend("b1").await;
    let b2 = page_backend("b2").await;
    let mut toml = config_for(
        &[b1.addr, b2.addr],
        "drain_window = \"100ms\"\naffinity = \"cookie\"\n[pools.main.cookie]\nname = \"berth_main\"\nsecret = \"0123456789abcdef0123456789abcdef\"\n",
    );
    if !http2 {
        toml = with_listener_key(&toml, "http2 = false", 2);
    }
    let proxy = Proxy::start(&toml).await;
    let tls = proxy.tls_addr.unwrap();
    let browser = Browser::start().await;
    let url = format!("https://localhost:{}/", tls.port());
    let (protocol, label) = if http2 {
        ("h2", "http2")
    } else {
        ("http/1.1", "http1")
    };

    // 1. The page over h2, its WebSocket connected, a typed message back.
    browser.goto(&url).await;
    let hop = browser
        .execute(
            "return performance.getEntriesByType('navigation')[0].nextHopProtocol;",
            Vec::new(),
        )
        .await;
    assert_eq!(hop, Value::from(protocol));
    let page_backend = browser
        .execute(
            "return document.getElementById('page-backend').textContent;",
            Vec::new(),
        )
        .await
        .as_str()
        .unwrap()
        .to_string();
    let first = ws_backend(&browser, 1).await;
    assert_eq!(
        first, page_backend,
        "the WebSocket follows the page's cookie"
    );
    browser.type_into("#msg", "hello through berth").await;
    browser
        .execute("document.getElementById('send').click();", Vec::new())
        .await;
    browser
        .wait_until(
            WAIT,
            "the echo",
            "return (window.received || []).includes('hello through berth');",
        )
        .await;
    let opened = format!("berth_websocket_opened_total{{pool=\"main\",protocol=\"{label}\"}}");
    assert_eq!(metric(&proxy, &opened).await, 1.0, "{opened}");
    if http2 {
        // One connection carried the page and the WebSocket.
        let conns = "berth_client_connections_total{listener=\"tls\",protocol=\"http2\"}";
        assert_eq!(metric(&proxy, conns).await, 1.0, "{conns}");
        let h1 = "berth_client_connections_total{listener=\"tls\",protocol=\"http1\"}";
        assert_eq!(metric(&proxy, h1).await, 0.0, "{h1}");
    }

    // 2. A reload lands on the same backend (the cookie jar's affinity
    //    cookie).
    browser.goto(&url).await;
    let again = browser
        .execute(
            "return document.getElementById('page-backend').textContent;",
            Vec::new(),
        )
        .await;
    assert_eq!(again, Value::from(page_backend.clone()));
    assert_eq!(ws_backend(&browser, 1).await, page_backend);

    // 3. Draining the page's backend: its WebSocket gets 1012, and the
    //    page reconnects to the other backend.
    let path = format!("/admin/pools/main/backends/{page_backend}/drain");
    let (status, body) = admin_request(proxy.admin.unwrap(), "POST", &path, None).await;
    assert_eq!(status, 200, "{body}");
    browser
        .wait_until(
            WAIT,
            "Close 1012",
            "return (window.closes || []).includes(1012);",
        )
        .await;
    let moved = ws_backend(&browser, 2).await;
    assert_ne!(moved, page_backend, "reconnected to another backend");

    // 4. Killing that backend: the page sees 1014.
    let victim = if moved == "b1" { &b1 } else { &b2 };
    let closes_before = count(&browser, "closes").await;
    victim.kill.cancel();
    browser
        .wait_until(
            WAIT,
            "Close 1014",
            "return (window.closes || []).includes(1014);",
        )
        .await;
    assert!(count(&browser, "closes").await > closes_before);
    if http2 {
        // Every WebSocket the page opened rode HTTP/2.
        let h1 = "berth_websocket_opened_total{pool=\"main\",protocol=\"http1\"}";
        assert_eq!(metric(&proxy, h1).await, 0.0);
    }
    drop(browser);
    proxy.shutdown().await;
}

#[tokio::test]
async fn a_page_and_its_websocket_share_one_http2_connection() {
    the_five_steps(true).await;
}

#[tokio::test]
async fn with_http2_off_the_same_steps_run_over_http1() {
    the_five_steps(false).await;
}
