//! Client-facing listeners: the accept loop and one task per connection
//! (TLS handshake under `handshake_timeout`, then hyper's HTTP/1.1 server
//! with upgrades enabled).
//!
//! [`ListenerContext`] is this layer's context: the proxy's context (which
//! the connections serve requests with) plus the set of running listeners
//! and their accept-loop tracker. `start` spawns a listener's accept loop;
//! the loop stops when the shutdown token is cancelled or a reload stops
//! the listener; each HTTP connection then finishes its in-flight request
//! (hyper's graceful shutdown). Connection tasks are tracked by the
//! lifecycle's tracker; upgraded connections are owned by their relay tasks.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::ListenerConfig;
use crate::io::ClientStream;
use crate::proxy::{self, ConnInfo, ProxyContext};
use crate::tls_stream;

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

/// The listeners' context: what their connections serve requests with, and
/// the listeners accepting now.
pub struct ListenerContext {
    pub proxy: Arc<ProxyContext>,
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
}

impl ListenerContext {
    pub fn new(proxy: Arc<ProxyContext>) -> ListenerContext {
        ListenerContext {
            proxy,
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
        let entry = RunningListener {
            spec: Arc::clone(&bound.spec),
            bind: bound.bind,
            addr: bound.addr,
        };
        self.accept_loops
            .spawn(accept_loop(bound.socket, bound.spec, Arc::clone(self)));
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

/// Accepts until shutdown or until the listener is stopped by a reload.
/// Accept errors (EMFILE and the like) back off briefly instead of ending
/// the loop.
async fn accept_loop(listener: TcpListener, spec: Arc<ListenerSpec>, ctx: Arc<ListenerContext>) {
    let lifecycle = &ctx.proxy.lifecycle;
    loop {
        let accepted = tokio::select! {
            _ = lifecycle.shutdown.cancelled() => break,
            _ = spec.stop.cancelled() => break,
            r = listener.accept() => r,
        };
        match accepted {
            Ok((stream, peer)) => {
                let _ = stream.set_nodelay(true);
                let spec = Arc::clone(&spec);
                let proxy = Arc::clone(&ctx.proxy);
                lifecycle
                    .tracker
                    .spawn(serve_connection(stream, peer, spec, proxy));
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
    ctx: Arc<ProxyContext>,
) {
    // The gauge goes up now and down when the last holder of the
    // connection's `ConnInfo` lets go: this task, or the relay after an upgrade.
    let open_gauge = ctx
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
            let Some(stream) = tls_handshake(tcp, &info, &settings, config, &ctx).await else {
                return;
            };
            ClientStream::Tls(Box::new(stream))
        }
    };
    info.tls = settings.tls.is_some();
    let info = Arc::new(info);
    let svc_ctx = Arc::clone(&ctx);
    let service = service_fn(move |req| proxy::serve(req, Arc::clone(&info), Arc::clone(&svc_ctx)));
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
        _ = ctx.lifecycle.shutdown.cancelled() => {
            conn.as_mut().graceful_shutdown();
            let _ = conn.await;
        }
    }
}

/// The TLS handshake under `handshake_timeout`, counted by result; `None`
/// when it failed or timed out (the connection is then dropped).
async fn tls_handshake(
    tcp: TcpStream,
    info: &ConnInfo,
    settings: &ListenerSettings,
    config: &Arc<rustls::ServerConfig>,
    ctx: &ProxyContext,
) -> Option<tls_stream::ServerTlsStream> {
    let listener = &*info.listener;
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
    let m = &ctx.metrics;
    m.tls_handshakes.with_label_values(&[listener, label]).inc();
    match result {
        Ok(Ok(s)) => {
            m.tls_duration
                .with_label_values(&[listener])
                .observe(started.elapsed().as_secs_f64());
            if s.resumed() {
                m.tls_resumed.with_label_values(&[listener]).inc();
            }
            Some(s)
        }
        Ok(Err(e)) => {
            tracing::debug!(client = %info.peer, listener, error = %e, "TLS handshake failed");
            None
        }
        Err(_) => {
            tracing::debug!(client = %info.peer, listener, "TLS handshake timed out");
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;
    use crate::proxy::testing;

    const CONFIG: &str = r#"
[[listeners]]
name = "public"
bind = "127.0.0.1:0"

[[routes]]
host = "only.example"
pool = "main"

[[pools.main.backends]]
id = "b1"
address = "127.0.0.1:9"
"#;

    /// A listener context with `public` accepting; its address.
    fn started() -> (Arc<ListenerContext>, SocketAddr) {
        let proxy = testing::context(CONFIG);
        let ctx = Arc::new(ListenerContext::new(Arc::clone(&proxy)));
        let lc = &proxy.routing.load().config.listeners[0];
        ctx.start(BoundListener::bind(lc).unwrap());
        let addr = ctx.addrs()["public"];
        (ctx, addr)
    }

    fn open_connections(ctx: &ListenerContext) -> i64 {
        ctx.proxy
            .metrics
            .connections_active
            .with_label_values(&["public"])
            .get()
    }

    /// Waits (up to 5 s) for `check` to hold.
    async fn eventually(what: &str, check: impl Fn() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(5);
        while !check() {
            assert!(Instant::now() < deadline, "never: {what}");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    #[tokio::test]
    async fn a_connection_is_served_and_counted() {
        let (ctx, addr) = started();
        assert_eq!(open_connections(&ctx), 0);
        let mut client = TcpStream::connect(addr).await.unwrap();
        client
            .write_all(b"GET /x HTTP/1.1\r\nHost: elsewhere.example\r\n\r\n")
            .await
            .unwrap();
        let mut buf = vec![0u8; 1024];
        let n = client.read(&mut buf).await.unwrap();
        let head = String::from_utf8_lossy(&buf[..n]);
        assert!(head.starts_with("HTTP/1.1 404"), "{head}");
        assert!(
            head.contains("no route matches this host and path"),
            "{head}"
        );
        assert_eq!(open_connections(&ctx), 1);
        drop(client);
        eventually("the gauge drops", || open_connections(&ctx) == 0).await;
    }

    #[tokio::test]
    async fn a_stopped_listener_stops_accepting() {
        let (ctx, addr) = started();
        let spec = Arc::clone(&ctx.snapshot()[0].0);
        assert_eq!(ctx.stop(&[&spec]), ["public"]);
        assert!(ctx.addrs().is_empty());
        // The accept loop ends and closes the socket.
        let deadline = Instant::now() + Duration::from_secs(5);
        while TcpStream::connect(addr).await.is_ok() {
            assert!(Instant::now() < deadline, "still accepting");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    #[tokio::test]
    async fn shutdown_ends_the_accept_loops() {
        let (ctx, _addr) = started();
        ctx.proxy.lifecycle.shutdown.cancel();
        tokio::time::timeout(Duration::from_secs(5), ctx.stopped())
            .await
            .expect("accept loops ended");
    }
}
