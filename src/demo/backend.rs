//! The demo's in-process backends: small hyper HTTP/1.1 servers on loopback
//! that berth proxies to.
//!
//! Each backend serves the demo page (`/`), a WebSocket (`/ws`: hello, echo
//! and a chat shared by every backend through one broadcast channel),
//! Server-Sent Events (`/events`, one per second, 30 at most) and `/healthz`.
//! Every response names the backend that produced it, so the page can show
//! the balancer at work.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use base64::Engine as _;
use bytes::Bytes;
use futures_util::{SinkExt as _, StreamExt as _};
use http::header::{
    ALLOW, CACHE_CONTROL, CONNECTION, CONTENT_TYPE, SEC_WEBSOCKET_ACCEPT, SEC_WEBSOCKET_KEY,
    SEC_WEBSOCKET_VERSION, UPGRADE,
};
use http::{HeaderMap, HeaderName, HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt as _, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::broadcast;
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::{CloseFrame, Role};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// The page every backend serves; `{{BACKEND}}` is replaced by its id.
const PAGE: &str = include_str!("index.html");
/// An SSE response ends after this many events.
pub const SSE_EVENTS: u64 = 30;
/// Chat messages a slow WebSocket client may fall behind by before it
/// skips some.
const CHAT_BACKLOG: usize = 256;
/// How long a backend waits for a peer's Close (or a connection's last
/// response) when the demo stops.
const STOP_GRACE: Duration = Duration::from_secs(2);
/// Response header naming the backend that answered.
pub const BACKEND_HEADER: &str = "x-demo-backend";

type Body = UnsyncBoxBody<Bytes, Infallible>;

/// A chat line on its way to every WebSocket client of every backend.
#[derive(Clone, Debug)]
struct ChatLine {
    /// The connection it came from, which already got it as an echo.
    origin: u64,
    /// The JSON text sent to the other clients.
    json: Arc<str>,
}

/// What the backends share: the chat channel and the stop signals.
struct Hub {
    chat: broadcast::Sender<ChatLine>,
    next_conn: AtomicU64,
    /// Cancelled as soon as the demo starts stopping: ends SSE streams, so
    /// the proxy's drain does not wait for them.
    streams: CancellationToken,
    /// Cancelled once the proxy has drained: stops everything else.
    stop: CancellationToken,
    tracker: TaskTracker,
}

/// One backend.
struct Backend {
    id: Arc<str>,
    page: Bytes,
    hub: Arc<Hub>,
}

/// The running backends. Dropping this stops them (without waiting);
/// [`Backends::stop`] stops them and waits.
pub struct Backends {
    addrs: Vec<(String, SocketAddr)>,
    hub: Arc<Hub>,
}

impl Backends {
    /// Binds one backend per id on `127.0.0.1:0` and starts serving.
    pub async fn start(ids: &[&str]) -> anyhow::Result<Backends> {
        let (chat, _) = broadcast::channel(CHAT_BACKLOG);
        let hub = Arc::new(Hub {
            chat,
            next_conn: AtomicU64::new(1),
            streams: CancellationToken::new(),
            stop: CancellationToken::new(),
            tracker: TaskTracker::new(),
        });
        let mut listeners = Vec::new();
        for id in ids {
            let listener = TcpListener::bind(SocketAddr::from(([127, 0, 0, 1], 0)))
                .await
                .map_err(|e| anyhow::anyhow!("cannot bind demo backend {id} on 127.0.0.1: {e}"))?;
            let addr = listener
                .local_addr()
                .map_err(|e| anyhow::anyhow!("demo backend {id}: {e}"))?;
            listeners.push((id.to_string(), listener, addr));
        }
        let mut addrs = Vec::new();
        for (id, listener, addr) in listeners {
            let backend = Arc::new(Backend {
                page: Bytes::from(PAGE.replace("{{BACKEND}}", &id)),
                id: Arc::from(id.as_str()),
                hub: Arc::clone(&hub),
            });
            hub.tracker.spawn(accept_loop(listener, backend));
            addrs.push((id, addr));
        }
        Ok(Backends { addrs, hub })
    }

    /// Each backend's id and address, in the order given to `start`.
    pub fn addrs(&self) -> &[(String, SocketAddr)] {
        &self.addrs
    }

    /// A token whose cancellation ends every SSE stream.
    pub fn streams_token(&self) -> CancellationToken {
        self.hub.streams.clone()
    }

    /// Stops the backends: WebSockets get Close 1001, HTTP connections
    /// finish their response; waits for that, at most a few seconds.
    pub async fn stop(&self) {
        self.hub.streams.cancel();
        self.hub.stop.cancel();
        self.hub.tracker.close();
        let deadline = STOP_GRACE + Duration::from_secs(1);
        if tokio::time::timeout(deadline, self.hub.tracker.wait())
            .await
            .is_err()
        {
            tracing::warn!(
                remaining = self.hub.tracker.len(),
                "demo backends did not stop in time"
            );
        }
    }
}

impl Drop for Backends {
    fn drop(&mut self) {
        self.hub.streams.cancel();
        self.hub.stop.cancel();
    }
}

async fn accept_loop(listener: TcpListener, backend: Arc<Backend>) {
    loop {
        let stream = tokio::select! {
            _ = backend.hub.stop.cancelled() => return,
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(e) => {
                    tracing::warn!(backend = %backend.id, error = %e, "demo backend accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        backend
            .hub
            .tracker
            .spawn(serve_connection(stream, Arc::clone(&backend)));
    }
}

async fn serve_connection(stream: TcpStream, backend: Arc<Backend>) {
    let stop = backend.hub.stop.clone();
    let id = Arc::clone(&backend.id);
    let svc = service_fn(move |req| {
        let backend = Arc::clone(&backend);
        async move { Ok::<_, Infallible>(backend.handle(req)) }
    });
    let conn = hyper::server::conn::http1::Builder::new()
        .serve_connection(TokioIo::new(stream), svc)
        .with_upgrades();
    let mut conn = std::pin::pin!(conn);
    let result = tokio::select! {
        r = conn.as_mut() => r,
        _ = stop.cancelled() => {
            conn.as_mut().graceful_shutdown();
            match tokio::time::timeout(STOP_GRACE, conn.as_mut()).await {
                Ok(r) => r,
                Err(_) => Ok(()),
            }
        }
    };
    if let Err(e) = result {
        tracing::debug!(backend = %id, error = %e, "demo backend connection ended with an error");
    }
}

impl Backend {
    fn handle(self: &Arc<Self>, req: Request<Incoming>) -> Response<Body> {
        let mut resp = match (req.method(), req.uri().path()) {
            (&Method::GET, "/" | "/index.html") => {
                let mut resp = Response::new(full(self.page.clone()));
                set(&mut resp, CONTENT_TYPE, "text/html; charset=utf-8");
                set(&mut resp, CACHE_CONTROL, "no-store");
                resp
            }
            (&Method::GET, "/ws") => self.websocket(req),
            (&Method::GET, "/events") => self.events(),
            (&Method::GET, "/healthz") => text(StatusCode::OK, "ok"),
            (_, "/" | "/index.html" | "/ws" | "/events" | "/healthz") => {
                let mut resp = text(StatusCode::METHOD_NOT_ALLOWED, "method not allowed\n");
                set(&mut resp, ALLOW, "GET");
                resp
            }
            _ => text(StatusCode::NOT_FOUND, "not found\n"),
        };
        if let Ok(v) = HeaderValue::from_str(&self.id) {
            resp.headers_mut().insert(BACKEND_HEADER, v);
        }
        resp
    }

    /// `GET /ws`: checks the handshake, answers 101 and runs the session
    /// on the upgraded connection.
    fn websocket(self: &Arc<Self>, req: Request<Incoming>) -> Response<Body> {
        let headers = req.headers();
        if !has_token(headers, &UPGRADE, "websocket") || !has_token(headers, &CONNECTION, "upgrade")
        {
            let mut resp = text(
                StatusCode::UPGRADE_REQUIRED,
                "this is a WebSocket endpoint (Upgrade: websocket)\n",
            );
            set(&mut resp, UPGRADE, "websocket");
            set(&mut resp, CONNECTION, "Upgrade");
            return resp;
        }
        let version_13 = headers
            .get(SEC_WEBSOCKET_VERSION)
            .is_some_and(|v| v == "13");
        if !version_13 {
            let mut resp = text(
                StatusCode::UPGRADE_REQUIRED,
                "unsupported Sec-WebSocket-Version\n",
            );
            set(&mut resp, SEC_WEBSOCKET_VERSION, "13");
            return resp;
        }
        let Some(key) = headers
            .get(SEC_WEBSOCKET_KEY)
            .filter(|k| valid_key(k.as_bytes()))
        else {
            return text(
                StatusCode::BAD_REQUEST,
                "missing or malformed Sec-WebSocket-Key\n",
            );
        };
        let Ok(accept) = HeaderValue::from_str(&derive_accept_key(key.as_bytes())) else {
            return text(
                StatusCode::INTERNAL_SERVER_ERROR,
                "cannot derive the accept key\n",
            );
        };

        let backend = Arc::clone(self);
        self.hub.tracker.spawn(async move {
            match hyper::upgrade::on(req).await {
                Ok(upgraded) => {
                    let ws = WebSocketStream::from_raw_socket(TokioIo::new(upgraded), Role::Server, None).await;
                    backend.session(ws).await;
                }
                Err(e) => {
                    tracing::debug!(backend = %backend.id, error = %e, "demo WebSocket upgrade failed");
                }
            }
        });

        let mut resp = Response::new(empty());
        *resp.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
        set(&mut resp, UPGRADE, "websocket");
        set(&mut resp, CONNECTION, "Upgrade");
        resp.headers_mut().insert(SEC_WEBSOCKET_ACCEPT, accept);
        resp
    }

    /// One WebSocket client: hello, then echo + chat until either side closes.
    async fn session<S>(&self, ws: WebSocketStream<S>)
    where
        S: AsyncRead + AsyncWrite + Unpin,
    {
        let me = self.hub.next_conn.fetch_add(1, Ordering::Relaxed);
        // Subscribe first, so nothing said after the hello is missed.
        let mut chat = self.hub.chat.subscribe();
        let (mut tx, mut rx) = ws.split();
        let hello = WsMessage::new("hello", &self.id, None).to_json();
        if tx.send(Message::text(hello)).await.is_err() {
            return;
        }
        tracing::debug!(backend = %self.id, conn = me, "demo WebSocket connected");
        loop {
            tokio::select! {
                msg = rx.next() => match msg {
                    Some(Ok(Message::Text(t))) => {
                        let echo = WsMessage::new("echo", &self.id, Some(t.as_str())).to_json();
                        if tx.send(Message::text(echo)).await.is_err() {
                            return;
                        }
                        let line = WsMessage::new("chat", &self.id, Some(t.as_str())).to_json();
                        // Err only means nobody else is listening.
                        let _ = self.hub.chat.send(ChatLine { origin: me, json: Arc::from(line) });
                    }
                    Some(Ok(Message::Binary(b))) => {
                        if tx.send(Message::Binary(b)).await.is_err() {
                            return;
                        }
                    }
                    // Pings are answered by tungstenite itself.
                    Some(Ok(Message::Ping(_) | Message::Pong(_) | Message::Frame(_))) => {}
                    Some(Ok(Message::Close(frame))) => {
                        tracing::debug!(backend = %self.id, conn = me, close = ?frame, "demo WebSocket closed by the client");
                        // tungstenite has queued the Close reply; reading on
                        // flushes it and ends the stream.
                        let _ = tokio::time::timeout(STOP_GRACE, async { while let Some(Ok(_)) = rx.next().await {} }).await;
                        return;
                    }
                    Some(Err(e)) => {
                        tracing::debug!(backend = %self.id, conn = me, error = %e, "demo WebSocket failed");
                        return;
                    }
                    None => return,
                },
                line = chat.recv() => match line {
                    Ok(line) if line.origin != me => {
                        if tx.send(Message::text(&*line.json)).await.is_err() {
                            return;
                        }
                    }
                    Ok(_) => {}
                    Err(broadcast::error::RecvError::Lagged(n)) => {
                        tracing::debug!(backend = %self.id, conn = me, skipped = n, "demo chat client fell behind");
                    }
                    Err(broadcast::error::RecvError::Closed) => return,
                },
                _ = self.hub.stop.cancelled() => {
                    let close = CloseFrame { code: CloseCode::Away, reason: "demo backend stopping".into() };
                    if tx.send(Message::Close(Some(close))).await.is_ok() {
                        let _ = tokio::time::timeout(STOP_GRACE, async { while let Some(Ok(_)) = rx.next().await {} }).await;
                    }
                    return;
                }
            }
        }
    }

    /// `GET /events`: one event per second, streamed as it is produced.
    fn events(&self) -> Response<Body> {
        let mut ticker = tokio::time::interval(Duration::from_secs(1));
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let state = (0u64, ticker, self.hub.streams.clone(), Arc::clone(&self.id));
        let events = futures_util::stream::unfold(state, |(n, mut ticker, stop, id)| async move {
            if n >= SSE_EVENTS {
                return None;
            }
            tokio::select! {
                _ = stop.cancelled() => return None,
                _ = ticker.tick() => {}
            }
            let n = n + 1;
            let data = serde_json::json!({ "backend": &*id, "n": n });
            let event = format!("id: {n}\ndata: {data}\n\n");
            Some((
                Ok::<_, Infallible>(Frame::data(Bytes::from(event))),
                (n, ticker, stop, id),
            ))
        });
        let mut resp = Response::new(StreamBody::new(events).boxed_unsync());
        set(&mut resp, CONTENT_TYPE, "text/event-stream");
        set(&mut resp, CACHE_CONTROL, "no-cache");
        resp
    }
}

/// A JSON message to a WebSocket client: `{"type":..,"backend":..,"text":..}`
/// (a struct rather than `json!` so the keys keep this order).
#[derive(serde::Serialize)]
struct WsMessage<'a> {
    r#type: &'static str,
    backend: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    text: Option<&'a str>,
}

impl<'a> WsMessage<'a> {
    fn new(kind: &'static str, backend: &'a str, text: Option<&'a str>) -> Self {
        WsMessage {
            r#type: kind,
            backend,
            text,
        }
    }

    fn to_json(&self) -> String {
        // Serializing plain strings cannot fail; an empty object keeps the
        // connection going if it ever did.
        serde_json::to_string(self).unwrap_or_else(|_| String::from("{}"))
    }
}

/// True when `name` is a comma-separated header list containing `token`
/// (case-insensitive), as `Connection: keep-alive, Upgrade` is.
fn has_token(headers: &HeaderMap, name: &HeaderName, token: &str) -> bool {
    headers
        .get_all(name)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|t| t.trim().eq_ignore_ascii_case(token))
}

/// A `Sec-WebSocket-Key` is the base64 of 16 bytes (RFC 6455 §4.1).
fn valid_key(key: &[u8]) -> bool {
    base64::engine::general_purpose::STANDARD
        .decode(key)
        .is_ok_and(|raw| raw.len() == 16)
}

fn set<B>(resp: &mut Response<B>, name: HeaderName, value: &'static str) {
    resp.headers_mut()
        .insert(name, HeaderValue::from_static(value));
}

fn full(bytes: Bytes) -> Body {
    Full::new(bytes).boxed_unsync()
}

fn empty() -> Body {
    full(Bytes::new())
}

fn text(status: StatusCode, body: &'static str) -> Response<Body> {
    let mut resp = Response::new(full(Bytes::from_static(body.as_bytes())));
    *resp.status_mut() = status;
    set(&mut resp, CONTENT_TYPE, "text/plain; charset=utf-8");
    resp
}
