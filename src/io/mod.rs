//! The client side of a connection as one byte-stream type, the reading of
//! its first request head (`head`) or of its HTTP/2 connection preface
//! (`preface`), the frame-level guard an HTTP/2 connection runs behind
//! (`h2guard`), and the PROXY protocol header that may come before
//! everything else (`proxy_header`).
//!
//! A bottom-layer module so that the listener (which makes client streams)
//! and the proxy's tunnel (which relays over them after an upgrade) both
//! name [`ClientStream`] without importing each other. It owns no tasks.

pub mod h2guard;
pub mod head;
pub mod preface;
pub mod proxy_header;

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::{Buf, Bytes};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

use crate::tls_stream::ServerTlsStream;

/// A client connection, plain or TLS, with the bytes berth read from it
/// before hyper took over (the checked request head, see [`head`]), which
/// reads return first.
pub struct ClientStream {
    transport: Transport,
    /// `None` once hyper has read it all. Boxed: it lives only until
    /// hyper's first reads, and every open connection (an upgraded
    /// WebSocket's relay included) would otherwise carry an empty `Bytes`
    /// (32 bytes) for the rest of its life.
    read_ahead: Option<Box<Bytes>>,
}

/// The TLS state is boxed so that plain connections stay small.
enum Transport {
    Plain(TcpStream),
    Tls(Box<ServerTlsStream>),
}

impl ClientStream {
    pub fn plain(tcp: TcpStream) -> ClientStream {
        ClientStream {
            transport: Transport::Plain(tcp),
            read_ahead: None,
        }
    }

    pub fn tls(tls: Box<ServerTlsStream>) -> ClientStream {
        ClientStream {
            transport: Transport::Tls(tls),
            read_ahead: None,
        }
    }

    /// Bytes already read from the connection, to be read again first.
    pub fn unread(&mut self, bytes: Bytes) {
        self.read_ahead = (!bytes.is_empty()).then(|| Box::new(bytes));
    }

    pub fn is_tls(&self) -> bool {
        matches!(self.transport, Transport::Tls(_))
    }

    /// Whether the TLS handshake chose `h2` in ALPN.
    pub fn alpn_is_h2(&self) -> bool {
        match &self.transport {
            Transport::Tls(tls) => tls.alpn_is_h2(),
            Transport::Plain(_) => false,
        }
    }
}

impl AsyncRead for ClientStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if let Some(ahead) = this.read_ahead.as_deref_mut() {
            let n = ahead.len().min(buf.remaining());
            buf.put_slice(&ahead[..n]);
            ahead.advance(n);
            if ahead.is_empty() {
                this.read_ahead = None;
            }
            return Poll::Ready(Ok(()));
        }
        match &mut this.transport {
            Transport::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Transport::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for ClientStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match &mut self.get_mut().transport {
            Transport::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Transport::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match &mut self.get_mut().transport {
            Transport::Plain(s) => Pin::new(s).poll_flush(cx),
            Transport::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match &mut self.get_mut().transport {
            Transport::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Transport::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}

#[cfg(test)]
mod tests {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    use super::*;

    #[tokio::test]
    async fn unread_bytes_come_first_then_the_socket() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let mut client = TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        let (server, _) = listener.accept().await.unwrap();
        let mut stream = ClientStream::plain(server);
        assert!(!stream.is_tls());
        stream.unread(Bytes::from_static(b"GET / HTTP/1.1\r\n"));
        client.write_all(b"Host: x\r\n\r\n").await.unwrap();
        let mut small = [0u8; 4];
        stream.read_exact(&mut small).await.unwrap();
        assert_eq!(&small, b"GET ");
        let mut rest = vec![0u8; 12 + 11];
        stream.read_exact(&mut rest).await.unwrap();
        assert_eq!(rest, b"/ HTTP/1.1\r\nHost: x\r\n\r\n");
        assert!(stream.read_ahead.is_none());
        stream.write_all(b"ok").await.unwrap();
        let mut got = [0u8; 2];
        client.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"ok");
    }
}
