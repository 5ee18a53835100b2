//! WebSockets over HTTP/2 (RFC 8441 extended CONNECT) for the client modes:
//! with `--h2-streams N`, every N WebSockets share one HTTP/2 connection
//! (prior knowledge over ws://, ALPN `h2` over wss://), each on a stream of
//! its own. A stream is a byte stream like a TCP connection, so every mode
//! runs over it unchanged.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::task::{ready, Context, Poll};
use std::time::Duration;

use anyhow::{anyhow, bail};
use bytes::{Buf, Bytes};
use h2::client::SendRequest;
use h2::{Ping, PingPong};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::Mutex;

use crate::stage::{stage, Stage, StageError};

/// The HTTP/2 connection new WebSockets go on, and how many it carries.
pub struct Pool {
    per_conn: usize,
    /// `--h2-streams 0`: every client is a connection without a stream.
    bare: bool,
    current: Mutex<Option<(SendRequest<Bytes>, usize)>>,
}

impl Pool {
    pub fn new(per_conn: usize) -> Pool {
        Pool {
            per_conn: per_conn.max(1),
            bare: per_conn == 0,
            current: Mutex::new(None),
        }
    }

    /// Whether clients are bare connections (`--h2-streams 0`).
    pub fn bare(&self) -> bool {
        self.bare
    }

    /// A WebSocket on the current connection, or on a new one once the
    /// current one carries `per_conn`.
    /// `uri` is the extended CONNECT's target; `dial` opens a new
    /// connection when one is needed (the caller's TCP and TLS, then
    /// [`handshake`]).
    pub async fn open<F, Fut>(&self, uri: String, dial: F) -> Result<Stream, StageError>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<SendRequest<Bytes>, StageError>>,
    {
        let send = {
            let mut current = self.current.lock().await;
            match current.as_mut() {
                Some((send, n)) if *n < self.per_conn => {
                    *n += 1;
                    send.clone()
                }
                _ => {
                    let send = dial().await?;
                    *current = Some((send.clone(), 1));
                    send
                }
            }
        };
        let mut send = send.ready().await.map_err(stage(Stage::Upgrade))?;
        let req = http::Request::builder()
            .method(http::Method::CONNECT)
            .uri(uri)
            .extension(h2::ext::Protocol::from_static("websocket"))
            .header("sec-websocket-version", "13")
            .body(())
            .map_err(stage(Stage::Upgrade))?;
        let (resp, send_stream) = send
            .send_request(req, false)
            .map_err(stage(Stage::Upgrade))?;
        let resp = resp.await.map_err(stage(Stage::Upgrade))?;
        if resp.status() != 200 {
            return Err(StageError {
                stage: Stage::Upgrade,
                error: anyhow!(
                    "expected 200 to the extended CONNECT, got {}",
                    resp.status()
                ),
            });
        }
        Ok(Stream {
            send: send_stream,
            recv: resp.into_body(),
            buf: Bytes::new(),
        })
    }
}

/// The HTTP/2 handshake on an open transport (TCP, or TLS that chose `h2`),
/// its connection task spawned; returns once the server has allowed
/// extended CONNECT, with the connection's PING handle.
pub async fn handshake<T>(io: T) -> Result<(SendRequest<Bytes>, PingPong), StageError>
where
    T: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (send, mut conn) = h2::client::Builder::new()
        .initial_window_size(1 << 20)
        .initial_connection_window_size(4 << 20)
        .handshake::<_, Bytes>(io)
        .await
        .map_err(stage(Stage::Upgrade))?;
    let ping = conn.ping_pong().ok_or_else(|| StageError {
        stage: Stage::Upgrade,
        error: anyhow!("the HTTP/2 connection's PING handle was already taken"),
    })?;
    tokio::spawn(conn);
    // The server's SETTINGS (ENABLE_CONNECT_PROTOCOL) arrive with its first
    // flight; the connection task reads them.
    for _ in 0..5000 {
        if send.is_extended_connect_protocol_enabled() {
            return Ok((send, ping));
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    Err(StageError {
        stage: Stage::Upgrade,
        error: anyhow!("the server did not enable extended CONNECT (RFC 8441) within 5 s"),
    })
}

/// An HTTP/2 connection that carries no stream (`--h2-streams 0`, idle mode
/// only): what the server holds for the connection itself.
pub struct Bare {
    /// Kept so that the client does not end the connection.
    _send: SendRequest<Bytes>,
    ping: PingPong,
}

impl Bare {
    pub fn new(send: SendRequest<Bytes>, ping: PingPong) -> Bare {
        Bare { _send: send, ping }
    }

    /// Alive: a PING comes back within 5 s.
    pub async fn check(&mut self) -> Result<(), StageError> {
        match tokio::time::timeout(Duration::from_secs(5), self.ping.ping(Ping::opaque())).await {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(e)) => Err(StageError {
                stage: Stage::Echo,
                error: e.into(),
            }),
            Err(_) => Err(StageError {
                stage: Stage::Echo,
                error: anyhow!("no PING answer within 5 s"),
            }),
        }
    }
}

/// One WebSocket's HTTP/2 stream as a byte stream.
pub struct Stream {
    send: h2::SendStream<Bytes>,
    recv: h2::RecvStream,
    buf: Bytes,
}

impl AsyncRead for Stream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        out: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if self.buf.is_empty() {
            match ready!(self.recv.poll_data(cx)) {
                None => return Poll::Ready(Ok(())),
                Some(Err(e)) if e.reason() == Some(h2::Reason::CANCEL) => {
                    return Poll::Ready(Ok(()))
                }
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

impl AsyncWrite for Stream {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        if buf.is_empty() {
            return Poll::Ready(Ok(0));
        }
        // Only what the stream's window takes now, so that the writer
        // feels the server's flow control.
        self.send.reserve_capacity(buf.len());
        loop {
            let cap = self.send.capacity();
            if cap > 0 {
                let n = cap.min(buf.len());
                self.send
                    .send_data(Bytes::copy_from_slice(&buf[..n]), false)
                    .map_err(io::Error::other)?;
                return Poll::Ready(Ok(n));
            }
            match ready!(self.send.poll_capacity(cx)) {
                Some(Ok(_)) => {}
                Some(Err(e)) => return Poll::Ready(Err(io::Error::other(e))),
                None => return Poll::Ready(Err(io::ErrorKind::BrokenPipe.into())),
            }
        }
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let _ = self.send.send_data(Bytes::new(), true);
        Poll::Ready(Ok(()))
    }
}

/// `--h2-streams` is at least 1, or 0 (connections without a stream) in
/// the idle mode only.
pub fn check_streams(n: usize, idle: bool) -> anyhow::Result<()> {
    if n == 0 && !idle {
        bail!("--h2-streams 0 (HTTP/2 connections without a WebSocket) is for the idle mode only");
    }
    Ok(())
}
