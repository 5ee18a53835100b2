//! Client-facing listeners: the accept loop, admission, and one task per
//! connection (`conn`: the TLS handshake and the first request head under
//! `handshake_timeout`, then hyper's HTTP/1.1 server with upgrades enabled).
//!
//! [`ListenerContext`] is this layer's context: the proxy's context (which
//! the connections serve requests with), the set of running listeners and
//! their accept-loop tracker, and the process-wide descriptor reserve
//! ([`FdGuard`], whose monitor task the wiring module runs). `start` spawns
//! a listener's accept loop; the loop stops when the shutdown token is
//! cancelled or a reload stops the listener; each HTTP connection then
//! finishes its in-flight request (hyper's graceful shutdown). Connection
//! tasks are tracked by the lifecycle's tracker; upgraded connections are
//! owned by their relay tasks.
//!
//! Every accepted socket is admitted or refused at once (`limits`): a
//! refused one (listener full, its address over its cap, or berth inside
//! its descriptor reserve) is closed before anything is read from it, and
//! counted in `berth_connections_refused_total`. On a listener with
//! `proxy_protocol`, a peer outside `proxy_protocol_from` is refused the
//! same way, and the connection's PROXY header is read first of all
//! (`conn`); its client address then stands for the peer everywhere, the
//! per-address cap included.

mod conn;

use std::collections::HashMap;
use std::io;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use arc_swap::ArcSwap;
use futures_util::FutureExt;
use prometheus::IntCounter;
use tokio::net::{TcpListener, TcpSocket};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use ipnet::IpNet;

use crate::config::{ListenerConfig, ProxyProtocolConfig, ProxyVersions};
use crate::io::proxy_header;
use crate::limits::{Caps, FdGuard, ListenerLimits, Refusal};
use crate::metrics::Metrics;
use crate::proxy::ProxyContext;

/// What a listener's connections need to know.
pub struct ListenerSpec {
    pub name: Arc<str>,
    /// TLS, timeouts and limits; swapped on reload without touching the
    /// socket.
    pub settings: ArcSwap<ListenerSettings>,
    /// Cancelled when a reload removes or rebinds this listener.
    pub stop: CancellationToken,
}

/// The reloadable part of a listener.
pub struct ListenerSettings {
    pub tls: Option<Arc<rustls::ServerConfig>>,
    pub handshake_timeout: Duration,
    pub caps: Caps,
    pub max_header_bytes: usize,
    /// HTTP/2 on (ALPN `h2`, prior knowledge on plain TCP).
    pub http2: bool,
    pub max_concurrent_streams: u32,
    /// `proxy_protocol`: which headers are read, and from which peers.
    pub proxy_protocol: Option<ProxyProtocol>,
}

/// A listener's PROXY protocol settings.
pub struct ProxyProtocol {
    pub accept: proxy_header::Accept,
    /// `proxy_protocol_from`: a peer outside these is refused unread.
    pub from: Vec<IpNet>,
}

impl ProxyProtocol {
    fn from_config(config: &ProxyProtocolConfig) -> ProxyProtocol {
        ProxyProtocol {
            accept: match config.versions {
                ProxyVersions::V1 => proxy_header::Accept::V1,
                ProxyVersions::V2 => proxy_header::Accept::V2,
                ProxyVersions::Any => proxy_header::Accept::Any,
            },
            from: config.from.clone(),
        }
    }

    /// Whether `peer` may send a PROXY header here.
    pub fn allows(&self, peer: std::net::IpAddr) -> bool {
        let peer = peer.to_canonical();
        self.from.iter().any(|net| net.contains(&peer))
    }
}

impl ListenerSettings {
    pub fn from_config(config: &ListenerConfig) -> ListenerSettings {
        ListenerSettings {
            proxy_protocol: config
                .proxy_protocol
                .as_ref()
                .map(ProxyProtocol::from_config),
            tls: config.tls.as_ref().map(|t| Arc::clone(&t.server_config)),
            handshake_timeout: config.handshake_timeout,
            caps: Caps {
                max_connections: config.max_connections,
                max_connections_per_ip: config.max_connections_per_ip,
            },
            max_header_bytes: config.max_header_bytes,
            http2: config.http2,
            max_concurrent_streams: config.max_concurrent_streams,
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

/// The listen backlog berth asks for. `std::net::TcpListener::bind` asks
/// for 128, which a reconnect storm overflows (the kernel then drops SYNs,
/// and each dropped client waits a second or more for its retransmit). The
/// kernel caps it at `net.core.somaxconn` (4096 by default since Linux 5.4).
/// The backlog holds connections the kernel has completed and berth has not
/// yet accepted; each one costs the kernel a socket, not berth.
pub const LISTEN_BACKLOG: u32 = 4096;

impl BoundListener {
    /// Binds a listener (synchronously, so reloads can bind before swapping)
    /// with a [`LISTEN_BACKLOG`] backlog, and with SO_REUSEPORT when the
    /// config says `reuse_port = true`.
    pub fn bind(config: &ListenerConfig) -> std::io::Result<BoundListener> {
        let socket = if config.bind.is_ipv4() {
            TcpSocket::new_v4()?
        } else {
            TcpSocket::new_v6()?
        };
        // As std's and tokio's own bind do: a restarted berth binds its
        // port again while the old process's connections are in TIME_WAIT.
        socket.set_reuseaddr(true)?;
        // Several processes (each with its own descriptor limit) share the
        // port; the kernel spreads new connections over their sockets by a
        // hash of the connection's addresses. Every socket of the group
        // must set it, and all must belong to the same user.
        if config.reuse_port {
            socket.set_reuseport(true)?;
        }
        socket.bind(config.bind)?;
        let socket = socket.listen(LISTEN_BACKLOG)?;
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

/// The listeners' context: what their connections serve requests with, and
/// the listeners accepting now.
pub struct ListenerContext {
    pub proxy: Arc<ProxyContext>,
    /// The descriptor reserve, shared by every listener.
    pub fds: Arc<FdGuard>,
    /// Accept loops (listeners come and go with reloads).
    accept_loops: TaskTracker,
    running: Mutex<Vec<RunningListener>>,
}

/// A listener that is accepting: its spec and addresses.
pub struct RunningListener {
    pub spec: Arc<ListenerSpec>,
    /// The configured bind address (port 0 stays 0 here).
    pub bind: SocketAddr,
    pub addr: SocketAddr,
    /// Its connection counts (they live as long as its socket).
    pub limits: Arc<ListenerLimits>,
}

impl ListenerContext {
    pub fn new(proxy: Arc<ProxyContext>) -> ListenerContext {
        ListenerContext {
            proxy,
            fds: Arc::new(FdGuard::new()),
            accept_loops: TaskTracker::new(),
            running: Mutex::new(Vec::new()),
        }
    }

    fn running(&self) -> MutexGuard<'_, Vec<RunningListener>> {
        match self.running.lock() {
            Ok(g) => g,
            Err(poisoned) => poisoned.into_inner(),
        }
    }

    /// Starts accepting on a bound listener and records it.
    pub fn start(self: &Arc<Self>, bound: BoundListener) {
        let settings = bound.spec.settings.load();
        tracing::info!(listener = %bound.spec.name, addr = %bound.addr, tls = settings.tls.is_some(), "listening");
        drop(settings);
        // The series exists (at 0) from the start, not from the first client.
        self.proxy
            .metrics
            .connections_active
            .with_label_values(&[&bound.spec.name])
            .add(0);
        let limits = Arc::new(ListenerLimits::new(Arc::clone(&self.fds)));
        let entry = RunningListener {
            spec: Arc::clone(&bound.spec),
            bind: bound.bind,
            addr: bound.addr,
            limits: Arc::clone(&limits),
        };
        let accept = Accept {
            counters: Arc::new(Refused::new(&self.proxy.metrics, &bound.spec.name)),
            spec: bound.spec,
            limits,
            ctx: Arc::clone(self),
            trouble: None,
            full: false,
        };
        self.accept_loops.spawn(accept.run(bound.socket));
        self.running().push(entry);
    }

    /// The running listeners' names, configured bind addresses and specs.
    pub fn snapshot(&self) -> Vec<(Arc<ListenerSpec>, SocketAddr)> {
        self.running()
            .iter()
            .map(|l| (Arc::clone(&l.spec), l.bind))
            .collect()
    }

    /// Stops accepting on the listeners given (their open connections
    /// carry on); returns their names.
    pub fn stop(&self, which: &[&Arc<ListenerSpec>]) -> Vec<String> {
        let mut stopped = Vec::new();
        self.running().retain(|r| {
            let stays = !which.iter().any(|s| Arc::ptr_eq(s, &r.spec));
            if !stays {
                r.spec.stop.cancel();
                stopped.push(r.spec.name.to_string());
            }
            stays
        });
        stopped
    }

    /// A running listener's connection counts, by name.
    pub fn limits(&self, name: &str) -> Option<Arc<ListenerLimits>> {
        self.running()
            .iter()
            .find(|l| &*l.spec.name == name)
            .map(|l| Arc::clone(&l.limits))
    }

    /// The listeners currently accepting, by name and address.
    pub fn addrs(&self) -> HashMap<String, SocketAddr> {
        self.running()
            .iter()
            .map(|l| (l.spec.name.to_string(), l.addr))
            .collect()
    }

    /// Waits for every accept loop to end (after the shutdown token is
    /// cancelled).
    pub async fn stopped(&self) {
        self.accept_loops.close();
        self.accept_loops.wait().await;
    }
}

/// One listener's accept loop and its state.
struct Accept {
    spec: Arc<ListenerSpec>,
    limits: Arc<ListenerLimits>,
    ctx: Arc<ListenerContext>,
    counters: Arc<Refused>,
    /// The current back-off after failed accepts (None: accepting fine).
    trouble: Option<Duration>,
    /// Whether the listener is refusing at `max_connections` (logged once
    /// per episode).
    full: bool,
}

/// `berth_connections_refused_total` for one listener, resolved once.
pub(crate) struct Refused {
    listener_full: IntCounter,
    per_ip: IntCounter,
    fd_limit: IntCounter,
    proxy_protocol: IntCounter,
}

impl Refused {
    fn new(metrics: &Metrics, listener: &str) -> Refused {
        let c = |reason: Refusal| {
            metrics
                .connections_refused
                .with_label_values(&[listener, reason.label()])
        };
        Refused {
            listener_full: c(Refusal::ListenerFull),
            per_ip: c(Refusal::PerIp),
            fd_limit: c(Refusal::FdLimit),
            proxy_protocol: c(Refusal::ProxyProtocol),
        }
    }

    pub(crate) fn count(&self, reason: Refusal) {
        match reason {
            Refusal::ListenerFull => &self.listener_full,
            Refusal::PerIp => &self.per_ip,
            Refusal::FdLimit => &self.fd_limit,
            Refusal::ProxyProtocol => &self.proxy_protocol,
        }
        .inc();
    }
}

/// The first back-off after a failed accept, and the longest.
const BACKOFF_MIN: Duration = Duration::from_millis(10);
const BACKOFF_MAX: Duration = Duration::from_secs(1);

/// Accept errors that concern one connection only (it went away before it
/// was accepted): the next accept is tried at once.
fn is_per_connection(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::ConnectionAborted
            | io::ErrorKind::ConnectionReset
            | io::ErrorKind::Interrupted
            | io::ErrorKind::WouldBlock
    )
}

/// EMFILE (the process's limit) or ENFILE (the system's).
fn is_out_of_descriptors(e: &io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::EMFILE | libc::ENFILE))
}

impl Accept {
    /// Accepts until shutdown or until the listener is stopped by a reload.
    async fn run(mut self, listener: TcpListener) {
        let lifecycle = Arc::clone(&self.ctx.proxy.lifecycle);
        loop {
            let accepted = tokio::select! {
                _ = lifecycle.shutdown.cancelled() => break,
                _ = self.spec.stop.cancelled() => break,
                r = listener.accept() => r,
            };
            match accepted {
                Ok((stream, peer)) => {
                    if self.trouble.take().is_some() {
                        tracing::info!(listener = %self.spec.name, "accepting again");
                    }
                    self.admit(stream, peer);
                }
                Err(e) if is_per_connection(&e) => {}
                Err(e) if is_out_of_descriptors(&e) => {
                    // Out of descriptors although the reserve should have
                    // prevented it: accept the pending connection with the
                    // spare descriptor and close it, so it does not wait in
                    // the backlog; back off when even that fails.
                    let closed = self
                        .ctx
                        .fds
                        .with_spare(|| matches!(listener.accept().now_or_never(), Some(Ok(_))));
                    if closed {
                        self.counters.count(Refusal::FdLimit);
                    } else {
                        self.back_off(&e).await;
                    }
                }
                Err(e) => self.back_off(&e).await,
            }
        }
    }

    /// Serves an accepted socket, or closes it at once (nothing read, no
    /// TLS) when it is refused.
    fn admit(&mut self, stream: tokio::net::TcpStream, peer: SocketAddr) {
        let settings = self.spec.settings.load();
        let mut caps = settings.caps;
        if let Some(pp) = &settings.proxy_protocol {
            if !pp.allows(peer.ip()) {
                drop(stream);
                self.counters.count(Refusal::ProxyProtocol);
                tracing::debug!(listener = %self.spec.name, peer = %peer, "peer not in proxy_protocol_from: refused");
                return;
            }
            // The per-address cap counts the client the PROXY header
            // names, once it has been read (`conn`).
            caps.max_connections_per_ip = None;
        }
        drop(settings);
        match self.limits.admit(peer.ip(), caps) {
            Ok(slot) => {
                if std::mem::take(&mut self.full) {
                    tracing::info!(listener = %self.spec.name, "below max_connections again: accepting");
                }
                let _ = stream.set_nodelay(true);
                let spec = Arc::clone(&self.spec);
                let proxy = Arc::clone(&self.ctx.proxy);
                let refused = Arc::clone(&self.counters);
                self.ctx
                    .proxy
                    .lifecycle
                    .tracker
                    .spawn(conn::serve(stream, peer, spec, proxy, slot, refused));
            }
            Err(reason) => {
                drop(stream);
                self.counters.count(reason);
                match reason {
                    Refusal::ListenerFull if !self.full => {
                        self.full = true;
                        tracing::warn!(
                            listener = %self.spec.name,
                            max_connections = caps.max_connections,
                            "listener at max_connections: refusing new connections until some close"
                        );
                    }
                    Refusal::PerIp => {
                        tracing::debug!(listener = %self.spec.name, client = %peer, "over max_connections_per_ip: refused");
                    }
                    // The descriptor reserve logs its own episodes.
                    _ => {}
                }
            }
        }
    }

    /// Waits before the next accept after a failure: from 10 ms, doubling
    /// to 1 s while failures go on. Logged once per episode.
    async fn back_off(&mut self, e: &io::Error) {
        let delay = match self.trouble {
            None => {
                tracing::warn!(listener = %self.spec.name, error = %e, "accept failed; backing off until it succeeds again");
                BACKOFF_MIN
            }
            Some(d) => (d * 2).min(BACKOFF_MAX),
        };
        self.trouble = Some(delay);
        tokio::select! {
            _ = self.ctx.proxy.lifecycle.shutdown.cancelled() => {}
            _ = self.spec.stop.cancelled() => {}
            _ = tokio::time::sleep(delay) => {}
        }
    }
}
#[cfg(test)]
mod tests;
