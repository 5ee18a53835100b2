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

use crate::tls_stream::{self, ServerTlsStream};
use arc_swap::ArcSwap;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

use crate::app::Shared;
use crate::config::ListenerConfig;
use crate::proxy::{self, ConnInfo};

/// A client connection, plain or TLS. The TLS state is boxed so that plain
/// connections stay small.
pub enum ClientStream {
    Plain(TcpStream),
    Tls(Box<ServerTlsStream>),
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
    /// TLS and timeouts; swapped on reload without touching the socket.
    pub settings: ArcSwap<ListenerSettings>,
    /// Cancelled when a reload removes or rebinds this listener.
    pub stop: CancellationToken,
}

/// The reloadable part of a listener.
pub struct ListenerSettings {
    pub tls: Option<Arc<rustls::ServerConfig>>,
    pub handshake_timeout: Duration,
}

impl ListenerSettings {
    pub fn from_config(config: &ListenerConfig) -> ListenerSettings {
        ListenerSettings {
            tls: config.tls.as_ref().map(|t| Arc::clone(&t.server_config)),
            handshake_timeout: config.handshake_timeout,
        }
    }
}

/// A bound listener socket and its spec.
pub struct BoundListener {
    pub spec: Arc<ListenerSpec>,
    pub socket: TcpListener,
    /// The configured bind address (port 0 stays 0 here).
    pub bind: SocketAddr,
    /// The address actually bound.
    pub addr: SocketAddr,
}

impl BoundListener {
    /// Binds a listener (synchronously, so reloads can bind before swapping).
    pub fn bind(config: &ListenerConfig) -> std::io::Result<BoundListener> {
        let std_listener = std::net::TcpListener::bind(config.bind)?;
        std_listener.set_nonblocking(true)?;
        let socket = TcpListener::from_std(std_listener)?;
        let addr = socket.local_addr()?;
        Ok(BoundListener {
            spec: Arc::new(ListenerSpec {
                name: Arc::from(config.name.as_str()),
                settings: ArcSwap::from_pointee(ListenerSettings::from_config(config)),
                stop: CancellationToken::new(),
            }),
            socket,
            bind: config.bind,
            addr,
        })
    }
}

/// Accepts until shutdown or until the listener is stopped by a reload.
/// Accept errors (EMFILE and the like) back off briefly instead of ending
/// the loop.
pub async fn accept_loop(listener: TcpListener, spec: Arc<ListenerSpec>, shared: Arc<Shared>) {
    loop {
        let accepted = tokio::select! {
            _ = shared.shutdown.cancelled() => break,
            _ = spec.stop.cancelled() => break,
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
    // The gauge goes up now and down when the last holder of the
    // connection's `ConnInfo` lets go: this task, or the relay after an upgrade.
    let open_gauge = shared
        .metrics
        .connections_active
        .with_label_values(&[&spec.name]);
    open_gauge.inc();
    let mut info = ConnInfo {
        peer,
        listener: Arc::clone(&spec.name),
        tls: false,
        open_gauge,
    };

    let settings = spec.settings.load_full();
    let stream = match &settings.tls {
        None => ClientStream::Plain(tcp),
        Some(config) => {
            let started = Instant::now();
            let result = tokio::time::timeout(
                settings.handshake_timeout,
                tls_stream::accept(tcp, Arc::clone(config)),
            )
            .await;
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
                    if s.resumed() {
                        shared
                            .metrics
                            .tls_resumed
                            .with_label_values(&[&spec.name])
                            .inc();
                    }
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
    info.tls = settings.tls.is_some();
    let info = Arc::new(info);
    let shared_svc = Arc::clone(&shared);
    let service =
        service_fn(move |req| proxy::serve(req, Arc::clone(&info), Arc::clone(&shared_svc)));
    let conn = hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(settings.handshake_timeout)
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
