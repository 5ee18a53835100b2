//! Client-facing listeners: the accept loop and one task per connection
//! (TLS handshake under `handshake_timeout`, then hyper's HTTP/1.1 server
//! with upgrades enabled).
//!
//! The accept loop stops when the shutdown token is cancelled; each HTTP
//! connection then finishes its in-flight request (hyper's graceful
//! shutdown). Upgraded connections are owned by their relay tasks.

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::server::TlsStream;
use tokio_rustls::TlsAcceptor;

use crate::app::Shared;
use crate::proxy::{self, ConnInfo};

/// A client connection, plain or TLS. The TLS state is boxed so that plain
/// connections stay small.
pub enum ClientStream {
    Plain(TcpStream),
    Tls(Box<TlsStream<TcpStream>>),
}

impl AsyncRead for ClientStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            ClientStream::Plain(s) => Pin::new(s).poll_read(cx, buf),
            ClientStream::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for ClientStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            ClientStream::Plain(s) => Pin::new(s).poll_write(cx, buf),
            ClientStream::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            ClientStream::Plain(s) => Pin::new(s).poll_flush(cx),
            ClientStream::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            ClientStream::Plain(s) => Pin::new(s).poll_shutdown(cx),
            ClientStream::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}

/// What a listener's connections need to know.
pub struct ListenerSpec {
    pub name: Arc<str>,
    pub tls: Option<TlsAcceptor>,
    pub handshake_timeout: Duration,
}

/// Accepts until shutdown. Accept errors (EMFILE and the like) back off
/// briefly instead of ending the loop.
pub async fn accept_loop(listener: TcpListener, spec: Arc<ListenerSpec>, shared: Arc<Shared>) {
    loop {
        let accepted = tokio::select! {
            _ = shared.shutdown.cancelled() => break,
            r = listener.accept() => r,
        };
        match accepted {
            Ok((stream, peer)) => {
                let _ = stream.set_nodelay(true);
                let spec = Arc::clone(&spec);
                let shared2 = Arc::clone(&shared);
                shared
                    .tracker
                    .spawn(serve_connection(stream, peer, spec, shared2));
            }
            Err(e) => {
                tracing::warn!(listener = %spec.name, error = %e, "accept failed; backing off");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

async fn serve_connection(
    tcp: TcpStream,
    peer: SocketAddr,
    spec: Arc<ListenerSpec>,
    shared: Arc<Shared>,
) {
    let gauge = shared
        .metrics
        .connections_active
        .with_label_values(&[&spec.name]);
    gauge.inc();
    struct Dec(prometheus::IntGauge);
    impl Drop for Dec {
        fn drop(&mut self) {
            self.0.dec();
        }
    }
    let _dec = Dec(gauge);

    let stream = match &spec.tls {
        None => ClientStream::Plain(tcp),
        Some(acceptor) => {
            let started = Instant::now();
            let result = tokio::time::timeout(spec.handshake_timeout, acceptor.accept(tcp)).await;
            let label = match &result {
                Ok(Ok(_)) => "ok",
                Ok(Err(_)) => "error",
                Err(_) => "timeout",
            };
            shared
                .metrics
                .tls_handshakes
                .with_label_values(&[&spec.name, label])
                .inc();
            match result {
                Ok(Ok(s)) => {
                    shared
                        .metrics
                        .tls_duration
                        .with_label_values(&[&spec.name])
                        .observe(started.elapsed().as_secs_f64());
                    ClientStream::Tls(Box::new(s))
                }
                Ok(Err(e)) => {
                    tracing::debug!(client = %peer, listener = %spec.name, error = %e, "TLS handshake failed");
                    return;
                }
                Err(_) => {
                    tracing::debug!(client = %peer, listener = %spec.name, "TLS handshake timed out");
                    return;
                }
            }
        }
    };
    let info = Arc::new(ConnInfo {
        peer,
        listener: Arc::clone(&spec.name),
        tls: spec.tls.is_some(),
    });
    let shared_svc = Arc::clone(&shared);
    let service =
        service_fn(move |req| proxy::serve(req, Arc::clone(&info), Arc::clone(&shared_svc)));
    let conn = hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(spec.handshake_timeout)
        .serve_connection(TokioIo::new(stream), service)
        .with_upgrades();
    tokio::pin!(conn);
    tokio::select! {
        res = conn.as_mut() => {
            if let Err(e) = res {
                tracing::debug!(client = %peer, error = %e, "connection ended with an error");
            }
        }
        _ = shared.shutdown.cancelled() => {
            conn.as_mut().graceful_shutdown();
            let _ = conn.await;
        }
    }
}
