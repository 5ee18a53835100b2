//! An HTTP/2 client for the tests, on the `h2` crate: a connection with
//! prior knowledge (plain) or ALPN `h2` (TLS), WebSockets over extended
//! CONNECT (RFC 8441) as tokio-tungstenite streams, and plain requests.
//! It shares no code with berth.
#![allow(dead_code)]

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};
use std::time::Duration;

use bytes::{Buf, Bytes};
use h2::client::SendRequest;
use http::{Method, Request, Response};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::task::JoinHandle;
use tokio_tungstenite::tungstenite::protocol::{Role, WebSocketConfig};
use tokio_tungstenite::WebSocketStream;

/// One HTTP/2 connection to berth.
pub struct H2Conn {
    pub send: SendRequest<Bytes>,
    /// The connection task; it ends with the connection (its result says
    /// how: a GOAWAY's error code, an I/O error, or a clean end).
    pub task: JoinHandle<Result<(), h2::Error>>,
}

/// A WebSocket on one stream of an HTTP/2 connection.
pub type H2Ws = WebSocketStream<H2Io>;

impl H2Conn {
    /// Prior knowledge over plain TCP.
    pub async fn plain(addr: SocketAddr) -> H2Conn {
        let tcp = TcpStream::connect(addr).await.unwrap();
        H2Conn::over(tcp).await
    }

    /// TLS with ALPN `h2` (the test certificate, for `localhost`).
    pub async fn tls(addr: SocketAddr) -> H2Conn {
        let tcp = TcpStream::connect(addr).await.unwrap();
        let mut cfg = (*super::tls_client_config()).clone();
        cfg.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        let name = rustls_pki_types::ServerName::try_from("localhost").unwrap();
        let tls = tokio_rustls::TlsConnector::from(Arc::new(cfg))
            .connect(name, tcp)
            .await
            .unwrap();
        assert_eq!(tls.get_ref().1.alpn_protocol(), Some(&b"h2"[..]));
        H2Conn::over(tls).await
    }

    async fn over<T>(io: T) -> H2Conn
    where
        T: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let (send, conn) = h2::client::Builder::new()
            .initial_window_size(1 << 20)
            .handshake::<_, Bytes>(io)
            .await
            .unwrap();
        let task = tokio::spawn(conn);
        let mut c = H2Conn { send, task };
        // berth's SETTINGS (with ENABLE_CONNECT_PROTOCOL) arrive with the
        // connection's first round trip.
        for _ in 0..200 {
            if c.send.is_extended_connect_protocol_enabled() {
                break;
            }
            // A request in flight makes the connection read berth's frames.
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        c.send = c.send.clone().ready().await.unwrap();
        c
    }

    /// Whether berth sent SETTINGS_ENABLE_CONNECT_PROTOCOL = 1.
    pub fn connect_protocol_enabled(&self) -> bool {
        self.send.is_extended_connect_protocol_enabled()
    }

    /// Sends an extended CONNECT for a WebSocket at `path` with `headers`
    /// (a `sec-websocket-version: 13` is added unless given); returns the
    /// response head and, on a 2xx, the stream.
    pub async fn connect_ws(
        &mut self,
        path: &str,
        headers: &[(&str, &str)],
    ) -> (Response<()>, Option<H2Io>) {
        let mut req = Request::builder()
            .method(Method::CONNECT)
            .uri(format!("http://localhost{path}"))
            .extension(h2::ext::Protocol::from_static("websocket"));
        if !headers
            .iter()
            .any(|(k, _)| k.eq_ignore_ascii_case("sec-websocket-version"))
        {
            req = req.header("sec-websocket-version", "13");
        }
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        let req = req.body(()).unwrap();
        self.send = self.send.clone().ready().await.unwrap();
        let (resp, send) = self.send.send_request(req, false).unwrap();
        let resp = tokio::time::timeout(Duration::from_secs(10), resp)
            .await
            .expect("a response to the CONNECT")
            .unwrap();
        let (head, recv) = resp.into_parts();
        let ok = head.status.is_success();
        let resp = Response::from_parts(head, ());
        (resp, ok.then(|| H2Io::new(send, recv)))
    }

    /// A WebSocket at `path` (panics unless berth answers 200).
    pub async fn ws(&mut self, path: &str, headers: &[(&str, &str)]) -> (Response<()>, H2Ws) {
        let (resp, io) = self.connect_ws(path, headers).await;
        assert_eq!(resp.status(), 200, "{resp:?}");
        let io = io.unwrap();
        let config = WebSocketConfig::default()
            .max_message_size(Some(64 << 20))
            .max_frame_size(Some(64 << 20));
        let ws = WebSocketStream::from_raw_socket(io, Role::Client, Some(config)).await;
        (resp, ws)
    }

    /// A plain request; returns the head and the body stream.
    pub async fn request(
        &mut self,
        method: Method,
        path: &str,
        headers: &[(&str, &str)],
        body: Option<Bytes>,
    ) -> (Response<()>, h2::RecvStream) {
        let mut req = Request::builder()
            .method(method)
            .uri(format!("http://localhost{path}"));
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        self.send = self.send.clone().ready().await.unwrap();
        let (resp, mut send) = self
            .send
            .send_request(req.body(()).unwrap(), body.is_none())
            .unwrap();
        if let Some(body) = body {
            send.send_data(body, true).unwrap();
        }
        let resp = tokio::time::timeout(Duration::from_secs(10), resp)
            .await
            .expect("a response")
            .unwrap();
        let (head, recv) = resp.into_parts();
        (Response::from_parts(head, ()), recv)
    }
}

/// Reads a whole body.
pub async fn body_text(mut recv: h2::RecvStream) -> String {
    let mut out = Vec::new();
    while let Some(chunk) = recv.data().await {
        let chunk = chunk.unwrap();
        let _ = recv.flow_control().release_capacity(chunk.len());
        out.extend_from_slice(&chunk);
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// One HTTP/2 stream as a byte stream (what a WebSocket rides on).
pub struct H2Io {
    pub send: h2::SendStream<Bytes>,
    pub recv: h2::RecvStream,
    buf: Bytes,
}

impl H2Io {
    fn new(send: h2::SendStream<Bytes>, recv: h2::RecvStream) -> H2Io {
        H2Io {
            send,
            recv,
            buf: Bytes::new(),
        }
    }
}

impl AsyncRead for H2Io {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        out: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if self.buf.is_empty() {
            match ready!(self.recv.poll_data(cx)) {
                None => return Poll::Ready(Ok(())),
                Some(Err(e)) => return Poll::Ready(Err(io::Error::other(e))),
                Some(Ok(data)) => {
                    let _ = self.recv.flow_control().release_capacity(data.len());
                    self.buf = data;
                }
            }
        }
        let n = self.buf.len().min(out.remaining());
        out.put_slice(&self.buf[..n]);
        self.buf.advance(n);
        Poll::Ready(Ok(()))
    }
}

impl AsyncWrite for H2Io {
    fn poll_write(
        mut self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        // h2 queues what the window does not take yet; the tests send
        // little.
        self.send
            .send_data(Bytes::copy_from_slice(buf), false)
            .map_err(io::Error::other)?;
        Poll::Ready(Ok(buf.len()))
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let _ = self.send.send_data(Bytes::new(), true);
        Poll::Ready(Ok(()))
    }
}

// ---------------------------------------------------------------------------
// Raw frames, for the abuse tests
// ---------------------------------------------------------------------------

pub const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// One frame's bytes.
pub fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let len = payload.len();
    let mut v = vec![(len >> 16) as u8, (len >> 8) as u8, len as u8, kind, flags];
    v.extend_from_slice(&stream.to_be_bytes());
    v.extend_from_slice(payload);
    v
}

/// A frame as read: (type, flags, stream, payload).
pub type RawFrame = (u8, u8, u32, Vec<u8>);

/// Reads one frame.
pub async fn read_raw_frame<S: AsyncRead + Unpin>(s: &mut S) -> Option<RawFrame> {
    use tokio::io::AsyncReadExt;
    let mut h = [0u8; 9];
    s.read_exact(&mut h).await.ok()?;
    let len = usize::from(h[0]) << 16 | usize::from(h[1]) << 8 | usize::from(h[2]);
    let mut payload = vec![0u8; len];
    s.read_exact(&mut payload).await.ok()?;
    let stream = u32::from_be_bytes([h[5], h[6], h[7], h[8]]) & 0x7fff_ffff;
    Some((h[3], h[4], stream, payload))
}

/// Reads frames until a GOAWAY (its error code) or the end of the
/// connection (None), for at most `limit`.
pub async fn goaway_code<S: AsyncRead + Unpin>(s: &mut S, limit: Duration) -> Option<u32> {
    tokio::time::timeout(limit, async {
        while let Some((kind, _, _, payload)) = read_raw_frame(s).await {
            if kind == 0x7 && payload.len() >= 8 {
                return Some(u32::from_be_bytes([
                    payload[4], payload[5], payload[6], payload[7],
                ]));
            }
        }
        None
    })
    .await
    .ok()
    .flatten()
}

/// A raw HTTP/2 connection: the preface and an empty SETTINGS sent.
pub async fn raw_h2(addr: SocketAddr) -> TcpStream {
    use tokio::io::AsyncWriteExt;
    let mut s = TcpStream::connect(addr).await.unwrap();
    let mut start = PREFACE.to_vec();
    start.extend(frame(0x4, 0, 0, &[]));
    s.write_all(&start).await.unwrap();
    s
}

/// An HPACK header block of literal fields without indexing (RFC 7541
/// §6.2.2, new names, no Huffman coding), for names and values under 127
/// bytes.
pub fn hpack_literals(fields: &[(&str, &str)]) -> Vec<u8> {
    let mut out = Vec::new();
    for (name, value) in fields {
        out.push(0x00);
        out.push(name.len() as u8);
        out.extend_from_slice(name.as_bytes());
        out.push(value.len() as u8);
        out.extend_from_slice(value.as_bytes());
    }
    out
}
