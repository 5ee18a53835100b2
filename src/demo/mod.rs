//! `berth demo`: a self-contained tour of berth.
//!
//! Starts three in-process backends (`demo-1` to `demo-3`, see `backend.rs`)
//! on loopback, makes a self-signed certificate for `localhost` and
//! `127.0.0.1` in a fresh temp directory, and runs berth in front of them:
//! one TLS listener and the admin API. The pool is sticky (cookie affinity,
//! with a secret made for the run; new clients are placed round robin), so
//! a reload of the page comes back to the same backend and a drain shows
//! the re-pin; heartbeats every 20s. The listener speaks HTTP/2 (the
//! default), so a browser loads the page and opens its WebSocket (RFC 8441)
//! over one connection. The config goes through the same
//! validation as a config file. On shutdown berth drains first, then the
//! backends stop and the temp directory is removed.

mod backend;

use std::fmt::Write as _;
use std::future::Future;
use std::io::Write as _;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};

use anyhow::Context as _;

use crate::app::{App, AppError};
use crate::config::Config;

use backend::Backends;

/// Backend ids, in pool order.
const BACKEND_IDS: [&str; 3] = ["demo-1", "demo-2", "demo-3"];
/// The demo pool's name, in the admin API's paths.
const POOL: &str = "demo";
/// The affinity cookie that pins a browser to a backend.
const COOKIE: &str = "berth_demo";
/// Where the admin API goes unless that port is taken.
const PREFERRED_ADMIN: SocketAddr =
    SocketAddr::new(IpAddr::V4(std::net::Ipv4Addr::LOCALHOST), 9900);
/// The fallback admin address: any free loopback port.
const ANY_ADMIN: SocketAddr = SocketAddr::new(IpAddr::V4(std::net::Ipv4Addr::LOCALHOST), 0);

/// Runs the demo with the proxy on `bind` until `shutdown` resolves.
pub async fn run(bind: SocketAddr, shutdown: impl Future<Output = ()>) -> anyhow::Result<()> {
    let dir = std::env::temp_dir().join(format!("berth-demo-{}", std::process::id()));
    let demo = Demo::start(bind, PREFERRED_ADMIN, dir).await?;
    let mut out = std::io::stdout().lock();
    // A closed stdout is no reason to stop the demo.
    let _ = out.write_all(demo.guide().as_bytes());
    let _ = out.flush();
    drop(out);
    demo.serve(shutdown).await;
    Ok(())
}

/// A started demo: backends serving, proxy bound but not yet accepting.
struct Demo {
    app: App,
    backends: Backends,
    /// Holds the certificate and key; removed on drop.
    dir: TempDir,
    proxy: SocketAddr,
    admin: Option<SocketAddr>,
    /// The preferred admin port was busy.
    admin_moved: bool,
}

impl Demo {
    /// Starts the backends, writes the certificate into `dir` (created
    /// fresh), and binds berth on `bind` with the admin API on `admin`
    /// (or any free loopback port when `admin` is taken).
    async fn start(bind: SocketAddr, admin: SocketAddr, dir: PathBuf) -> anyhow::Result<Demo> {
        let backends = Backends::start(&BACKEND_IDS).await?;
        let dir = TempDir::create(dir)?;
        let (cert, key) = write_certificate(&dir.0, bind.ip())?;
        // A fresh cookie secret per run: 32 random bytes, hex.
        let secret: String = rand::random::<[u8; 32]>()
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        let config_for = |admin: SocketAddr| -> anyhow::Result<Config> {
            let text = config_toml(bind, admin, &cert, &key, &secret, backends.addrs())?;
            Config::from_toml_str(&text, "berth demo config").context("the demo config is invalid")
        };
        // The admin socket is bound after the listener, so an admin error
        // means the listener itself was fine.
        let (app, admin_moved) = match App::bind(config_for(admin)?).await {
            Ok(app) => (app, false),
            Err(AppError::Bind { name, .. }) if name == "admin" && admin.port() != 0 => {
                let app = App::bind(config_for(ANY_ADMIN)?)
                    .await
                    .context("cannot start the demo proxy")?;
                (app, true)
            }
            Err(e) => return Err(anyhow::Error::new(e).context("cannot start the demo proxy")),
        };
        let proxy = app
            .listener_addr("demo")
            .context("the demo listener is missing from the bound proxy")?;
        let admin = app.admin_addr();
        Ok(Demo {
            app,
            backends,
            dir,
            proxy,
            admin,
            admin_moved,
        })
    }

    /// The text printed on start: URLs and commands with the real ports.
    fn guide(&self) -> String {
        let host = url_host(self.proxy);
        let base = format!("https://{host}/");
        let ws = format!("wss://{host}/ws");
        let events = format!("https://{host}/events");
        let backends = self
            .backends
            .addrs()
            .iter()
            .map(|(id, addr)| format!("{id} {addr}"))
            .collect::<Vec<_>>()
            .join(", ");

        let mut g = String::new();
        let _ = writeln!(
            g,
            "berth demo: TLS proxy on {} -> sticky pool over {backends}",
            self.proxy
        );
        let _ = writeln!(g);
        let _ = writeln!(
            g,
            "  {base:<36} the chat page (reloads stay on one backend: sticky)"
        );
        let _ = writeln!(g, "  {ws:<36} WebSocket: hello, echo and chat as JSON");
        let _ = writeln!(g, "  {events:<36} Server-Sent Events, one per second");
        if let Some(admin) = self.admin {
            let note = if self.admin_moved {
                format!(" (port {} was busy)", PREFERRED_ADMIN.port())
            } else {
                String::new()
            };
            let status = format!("http://{admin}/");
            let metrics = format!("http://{admin}/metrics");
            let pools = format!("http://{admin}/admin/pools");
            let _ = writeln!(g, "  {status:<36} live status page (drain buttons){note}");
            let _ = writeln!(g, "  {metrics:<36} Prometheus metrics{note}");
            let _ = writeln!(g, "  {pools:<36} pools and backends as JSON{note}");
        }
        let _ = writeln!(g);
        let _ = writeln!(
            g,
            "Sticky sessions: the first response pins a browser to one backend with the"
        );
        let _ = writeln!(
            g,
            "cookie {COOKIE} (new browsers are spread round robin); reloads and the"
        );
        let _ = writeln!(
            g,
            "page's WebSocket stay on that backend. Browsers load the page over HTTP/2"
        );
        let _ = writeln!(
            g,
            "and open its WebSocket inside the same connection (RFC 8441)."
        );
        if let Some(admin) = self.admin {
            let backend = format!("http://{admin}/admin/pools/{POOL}/backends/ID");
            let _ = writeln!(
                g,
                "Drain the page's backend (ID as shown on the page): its WebSockets get Close"
            );
            let _ = writeln!(
                g,
                "1012, the page reconnects, and berth re-pins it to another backend:"
            );
            let _ = writeln!(g, "  curl -X POST {backend}/drain");
            let _ = writeln!(g, "  curl -X POST {backend}/undrain");
        }
        let _ = writeln!(g);
        let _ = writeln!(g, "Try:");
        let _ = writeln!(g, "  curl -k {base}");
        let _ = writeln!(g, "  curl -kN {events}");
        let _ = writeln!(
            g,
            "  curl -kN --http1.1 -H 'Connection: Upgrade' -H 'Upgrade: websocket' \\"
        );
        let _ = writeln!(
            g,
            "       -H 'Sec-WebSocket-Version: 13' -H 'Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==' {base}ws"
        );
        let _ = writeln!(
            g,
            "    (curl shows the 101 answer and the frames that arrive: hello, then chat)"
        );
        let _ = writeln!(
            g,
            "  An interactive WebSocket client: `cargo install websocat`, then websocat -k {ws}"
        );
        let _ = writeln!(g);
        let _ = writeln!(
            g,
            "The certificate is self-signed and made for this run: the browser will warn"
        );
        let _ = writeln!(
            g,
            "about it (accept the warning to continue); curl and websocat need -k."
        );
        let _ = writeln!(g, "Press Ctrl-C to stop.");
        g
    }

    /// Serves until `shutdown` resolves; berth drains (SSE streams end at
    /// once, WebSockets get Close 1001), then the backends stop and the temp
    /// directory is removed.
    async fn serve(self, shutdown: impl Future<Output = ()>) {
        let Demo {
            app, backends, dir, ..
        } = self;
        let streams = backends.streams_token();
        app.run(async move {
            shutdown.await;
            streams.cancel();
        })
        .await;
        backends.stop().await;
        drop(dir);
    }
}

/// A directory removed (with its contents) on drop.
struct TempDir(PathBuf);

impl TempDir {
    /// Creates `path` empty, replacing a leftover of the same name (a
    /// previous demo that was killed, with a recycled process id).
    fn create(path: PathBuf) -> anyhow::Result<TempDir> {
        if path.exists() {
            std::fs::remove_dir_all(&path)
                .with_context(|| format!("cannot remove the stale directory {}", path.display()))?;
        }
        let mut builder = std::fs::DirBuilder::new();
        #[cfg(unix)]
        std::os::unix::fs::DirBuilderExt::mode(&mut builder, 0o700);
        builder
            .create(&path)
            .with_context(|| format!("cannot create {}", path.display()))?;
        Ok(TempDir(path))
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        if let Err(e) = std::fs::remove_dir_all(&self.0) {
            tracing::warn!(dir = %self.0.display(), error = %e, "cannot remove the demo's temp directory");
        }
    }
}

/// Makes a self-signed ECDSA P-256 certificate for `localhost` and
/// `127.0.0.1` (plus `bind_ip` when it is another specific address) and
/// writes `cert.pem` and `key.pem` into `dir`.
fn write_certificate(dir: &Path, bind_ip: IpAddr) -> anyhow::Result<(PathBuf, PathBuf)> {
    let mut names = vec!["localhost".to_string(), "127.0.0.1".to_string()];
    if !bind_ip.is_unspecified() && !names.contains(&bind_ip.to_string()) {
        names.push(bind_ip.to_string());
    }
    let mut params =
        rcgen::CertificateParams::new(names).context("cannot describe the demo certificate")?;
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "berth demo (self-signed)");
    let key_pair = rcgen::KeyPair::generate().context("cannot generate the demo key")?;
    let cert = params
        .self_signed(&key_pair)
        .context("cannot sign the demo certificate")?;

    let cert_path = dir.join("cert.pem");
    let key_path = dir.join("key.pem");
    std::fs::write(&cert_path, cert.pem())
        .with_context(|| format!("cannot write {}", cert_path.display()))?;
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    options
        .open(&key_path)
        .and_then(|mut f| f.write_all(key_pair.serialize_pem().as_bytes()))
        .with_context(|| format!("cannot write {}", key_path.display()))?;
    Ok((cert_path, key_path))
}

/// The demo's berth config, as TOML (validated like any config file).
fn config_toml(
    bind: SocketAddr,
    admin: SocketAddr,
    cert: &Path,
    key: &Path,
    cookie_secret: &str,
    backends: &[(String, SocketAddr)],
) -> anyhow::Result<String> {
    let path_str = |p: &Path| -> anyhow::Result<String> {
        let s = p
            .to_str()
            .with_context(|| format!("the temp directory path {} is not UTF-8", p.display()))?;
        Ok(toml::Value::String(s.to_string()).to_string())
    };
    let mut t = String::new();
    let _ = writeln!(t, "# Generated by `berth demo`.");
    let _ = writeln!(t, "shutdown_window = \"2s\"");
    let _ = writeln!(t);
    let _ = writeln!(t, "[[listeners]]");
    let _ = writeln!(t, "name = \"demo\"");
    let _ = writeln!(t, "bind = \"{bind}\"");
    let _ = writeln!(
        t,
        "tls = {{ cert = {}, key = {} }}",
        path_str(cert)?,
        path_str(key)?
    );
    let _ = writeln!(t);
    let _ = writeln!(t, "[admin]");
    let _ = writeln!(t, "bind = \"{admin}\"");
    let _ = writeln!(t);
    let _ = writeln!(t, "[[routes]]");
    let _ = writeln!(t, "path_prefix = \"/\"");
    let _ = writeln!(t, "pool = \"{POOL}\"");
    let _ = writeln!(t);
    let _ = writeln!(t, "[pools.{POOL}]");
    let _ = writeln!(t, "balance = \"round_robin\"");
    let _ = writeln!(t, "affinity = \"cookie\"");
    let _ = writeln!(t, "ping_interval = \"20s\"");
    let _ = writeln!(t, "idle_timeout = \"5m\"");
    // Short, so a drain in the demo is over in moments.
    let _ = writeln!(t, "drain_window = \"3s\"");
    let _ = writeln!(t);
    let _ = writeln!(t, "[pools.{POOL}.cookie]");
    let _ = writeln!(t, "name = \"{COOKIE}\"");
    let _ = writeln!(
        t,
        "secret = {}",
        toml::Value::String(cookie_secret.to_string())
    );
    for (id, addr) in backends {
        let _ = writeln!(t);
        let _ = writeln!(t, "[[pools.{POOL}.backends]]");
        let _ = writeln!(t, "id = \"{id}\"");
        let _ = writeln!(t, "address = \"{addr}\"");
    }
    Ok(t)
}

/// `host:port` for URLs: `localhost` for loopback and wildcard binds (the
/// name the certificate is for), the address itself otherwise.
fn url_host(addr: SocketAddr) -> String {
    let ip = addr.ip();
    if ip.is_loopback() || ip.is_unspecified() {
        format!("localhost:{}", addr.port())
    } else {
        addr.to_string()
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::time::Duration;

    use futures_util::{SinkExt as _, StreamExt as _};
    use rustls_pki_types::ServerName;
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    use tokio_tungstenite::tungstenite::Message;

    use super::*;

    const LOOPBACK_ANY: SocketAddr = ANY_ADMIN;

    async fn next_json<S>(ws: &mut S) -> serde_json::Value
    where
        S: futures_util::Stream<Item = Result<Message, tokio_tungstenite::tungstenite::Error>>
            + Unpin,
    {
        loop {
            let msg = tokio::time::timeout(Duration::from_secs(5), ws.next())
                .await
                .expect("a message in time")
                .expect("stream open")
                .expect("no error");
            if let Message::Text(t) = msg {
                return serde_json::from_str(t.as_str()).unwrap();
            }
        }
    }

    #[tokio::test]
    async fn generated_config_is_valid() {
        let dir = tempfile::tempdir().unwrap();
        let (cert, key) = write_certificate(dir.path(), "127.0.0.1".parse().unwrap()).unwrap();
        let backends = vec![
            ("demo-1".to_string(), "127.0.0.1:4001".parse().unwrap()),
            ("demo-2".to_string(), "127.0.0.1:4002".parse().unwrap()),
        ];
        let text = config_toml(
            "127.0.0.1:8443".parse().unwrap(),
            PREFERRED_ADMIN,
            &cert,
            &key,
            "0123456789abcdef0123456789abcdef",
            &backends,
        )
        .unwrap();
        let config = Config::from_toml_str(&text, "demo").unwrap();
        let pool = config.pool("demo").unwrap();
        assert_eq!(pool.balance, crate::config::Balance::RoundRobin);
        assert_eq!(pool.ping_interval, Some(Duration::from_secs(20)));
        assert_eq!(pool.idle_timeout, Some(Duration::from_secs(300)));
        assert_eq!(pool.backends.len(), 2);
        let listener = &config.listeners[0];
        let tls = listener.tls.as_ref().unwrap();
        // HTTP/2 for the page and its WebSocket: one connection.
        assert!(listener.http2);
        assert_eq!(tls.server_config.alpn_protocols[0], b"h2");
        assert!(matches!(pool.affinity, crate::config::Affinity::Cookie(_)));
    }

    /// An HTTPS request through the demo proxy; the response as text.
    async fn https(
        proxy: SocketAddr,
        tls: &Arc<rustls::ClientConfig>,
        path: &str,
        cookie: Option<&str>,
    ) -> String {
        let tcp = tokio::net::TcpStream::connect(proxy).await.unwrap();
        let mut stream = tokio_rustls::TlsConnector::from(Arc::clone(tls))
            .connect(ServerName::try_from("localhost").unwrap(), tcp)
            .await
            .unwrap();
        let cookie = cookie.map_or(String::new(), |c| format!("Cookie: {c}\r\n"));
        let req =
            format!("GET {path} HTTP/1.1\r\nHost: localhost\r\n{cookie}Connection: close\r\n\r\n");
        stream.write_all(req.as_bytes()).await.unwrap();
        let mut out = Vec::new();
        // A TLS peer that closes without close_notify still gave us the
        // whole response.
        let _ = stream.read_to_end(&mut out).await;
        String::from_utf8_lossy(&out).into_owned()
    }

    /// The value of a response header (first occurrence), case-insensitive.
    fn header<'a>(response: &'a str, name: &str) -> Option<&'a str> {
        response.split("\r\n\r\n").next()?.lines().find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.eq_ignore_ascii_case(name).then(|| v.trim())
        })
    }

    /// `berth_demo=...` from a Set-Cookie value.
    fn cookie_pair(set_cookie: &str) -> String {
        set_cookie.split(';').next().unwrap().to_string()
    }

    #[tokio::test]
    async fn the_pool_is_sticky_and_a_drain_re_pins_the_browser() {
        let parent = tempfile::tempdir().unwrap();
        let dir = parent.path().join("demo");
        let demo = Demo::start(LOOPBACK_ANY, LOOPBACK_ANY, dir.clone())
            .await
            .unwrap();
        let (proxy, admin) = (demo.proxy, demo.admin.unwrap());
        assert!(demo.guide().contains(&format!(
            "http://{admin}/admin/pools/demo/backends/ID/drain"
        )));
        let tls = crate::tls::test_client_config(&dir.join("cert.pem"));
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let served = tokio::spawn(demo.serve(async {
            let _ = stop_rx.await;
        }));

        // The page pins the browser; reloads come back to the same backend.
        let page = https(proxy, &tls, "/", None).await;
        let pinned = header(&page, "x-demo-backend").unwrap().to_string();
        let cookie = cookie_pair(header(&page, "set-cookie").expect("a pin cookie"));
        assert!(cookie.starts_with("berth_demo="), "{cookie}");
        for _ in 0..5 {
            let again = https(proxy, &tls, "/", Some(&cookie)).await;
            assert_eq!(header(&again, "x-demo-backend"), Some(pinned.as_str()));
        }
        assert!(page.contains("sticky"), "the page says so");

        // So does the page's WebSocket.
        let url = format!("wss://localhost:{}/ws", proxy.port());
        let ws_with = |cookie: String| {
            let tls = Arc::clone(&tls);
            let url = url.clone();
            async move {
                use tokio_tungstenite::tungstenite::client::IntoClientRequest as _;
                let mut req = url.into_client_request().unwrap();
                req.headers_mut().insert("cookie", cookie.parse().unwrap());
                tokio_tungstenite::connect_async_tls_with_config(
                    req,
                    None,
                    false,
                    Some(tokio_tungstenite::Connector::Rustls(tls)),
                )
                .await
                .unwrap()
            }
        };
        let (mut ws, _) = ws_with(cookie.clone()).await;
        assert_eq!(next_json(&mut ws).await["backend"], pinned.as_str());

        // Drain the pinned backend: its WebSocket gets 1012, and the
        // reconnect (with the old cookie) is re-pinned elsewhere.
        let mut s = tokio::net::TcpStream::connect(admin).await.unwrap();
        let req = format!(
            "POST /admin/pools/demo/backends/{pinned}/drain HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
        );
        s.write_all(req.as_bytes()).await.unwrap();
        let mut answer = String::new();
        s.read_to_string(&mut answer).await.unwrap();
        assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
        let close = loop {
            match tokio::time::timeout(Duration::from_secs(10), ws.next())
                .await
                .unwrap()
            {
                Some(Ok(Message::Close(frame))) => break frame,
                Some(Ok(_)) => continue,
                other => panic!("expected a Close, got {other:?}"),
            }
        };
        assert_eq!(close.map(|f| u16::from(f.code)), Some(1012));
        let (mut ws, response) = ws_with(cookie.clone()).await;
        let moved = next_json(&mut ws).await["backend"].clone();
        assert_ne!(moved, pinned.as_str());
        let new_cookie = response
            .headers()
            .get("set-cookie")
            .and_then(|v| v.to_str().ok())
            .map(cookie_pair)
            .expect("a new pin cookie");
        assert_ne!(new_cookie, cookie);
        let page = https(proxy, &tls, "/", Some(&new_cookie)).await;
        assert_eq!(header(&page, "x-demo-backend"), moved.as_str());

        drop(ws);
        stop_tx.send(()).unwrap();
        tokio::time::timeout(Duration::from_secs(15), served)
            .await
            .unwrap()
            .unwrap();
    }

    #[tokio::test]
    async fn end_to_end_through_tls() {
        let parent = tempfile::tempdir().unwrap();
        let dir = parent.path().join("demo");
        // A busy "preferred" admin port makes the demo fall back to any port.
        let busy = std::net::TcpListener::bind(LOOPBACK_ANY).unwrap();
        let busy_addr = busy.local_addr().unwrap();
        let demo = Demo::start(LOOPBACK_ANY, busy_addr, dir.clone())
            .await
            .unwrap();
        assert!(demo.admin_moved);
        assert_ne!(demo.admin, Some(busy_addr));
        let proxy = demo.proxy;
        let guide = demo.guide();
        assert!(
            guide.contains(&format!("wss://localhost:{}/ws", proxy.port())),
            "{guide}"
        );
        let tls = crate::tls::test_client_config(&dir.join("cert.pem"));
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let served = tokio::spawn(demo.serve(async {
            let _ = stop_rx.await;
        }));

        // WebSocket: hello, echo, and chat between two clients.
        let url = format!("wss://127.0.0.1:{}/ws", proxy.port());
        let connector = || Some(tokio_tungstenite::Connector::Rustls(Arc::clone(&tls)));
        let (mut a, _) =
            tokio_tungstenite::connect_async_tls_with_config(&url, None, false, connector())
                .await
                .unwrap();
        let (mut b, _) =
            tokio_tungstenite::connect_async_tls_with_config(&url, None, false, connector())
                .await
                .unwrap();
        let hello_a = next_json(&mut a).await;
        let hello_b = next_json(&mut b).await;
        assert_eq!(hello_a["type"], "hello");
        assert_eq!(hello_b["type"], "hello");
        // Round robin: two connections in a row land on different backends.
        assert_ne!(hello_a["backend"], hello_b["backend"]);
        a.send(Message::text("hi there")).await.unwrap();
        let echo = next_json(&mut a).await;
        assert_eq!(
            echo,
            serde_json::json!({"type": "echo", "backend": hello_a["backend"], "text": "hi there"})
        );
        let chat = next_json(&mut b).await;
        assert_eq!(
            chat,
            serde_json::json!({"type": "chat", "backend": hello_a["backend"], "text": "hi there"})
        );
        a.close(None).await.unwrap();

        // SSE: events arrive one by one, each naming its backend.
        let tcp = tokio::net::TcpStream::connect(proxy).await.unwrap();
        let mut stream = tokio_rustls::TlsConnector::from(Arc::clone(&tls))
            .connect(ServerName::try_from("localhost").unwrap(), tcp)
            .await
            .unwrap();
        stream
            .write_all(
                b"GET /events HTTP/1.1\r\nHost: localhost\r\nAccept: text/event-stream\r\n\r\n",
            )
            .await
            .unwrap();
        let mut got = String::new();
        let mut buf = [0u8; 4096];
        let started = std::time::Instant::now();
        while !got.contains("id: 2\n") {
            let n = tokio::time::timeout(Duration::from_secs(5), stream.read(&mut buf))
                .await
                .unwrap()
                .unwrap();
            assert!(n > 0, "stream ended early: {got}");
            got.push_str(&String::from_utf8_lossy(&buf[..n]));
        }
        assert!(
            started.elapsed() >= Duration::from_millis(900),
            "events are paced: {got}"
        );
        assert!(got.contains("content-type: text/event-stream"), "{got}");
        assert!(got.contains(r#"data: {"backend":"demo-"#), "{got}");

        // Shutdown: the open WebSocket gets 1001, the SSE stream ends, the
        // temp directory goes away.
        stop_tx.send(()).unwrap();
        let close = loop {
            match tokio::time::timeout(Duration::from_secs(10), b.next())
                .await
                .unwrap()
            {
                Some(Ok(Message::Close(frame))) => break frame,
                Some(Ok(_)) => continue,
                other => panic!("expected a Close, got {other:?}"),
            }
        };
        assert_eq!(close.map(|f| u16::from(f.code)), Some(1001));
        // Reading on sends the Close reply berth waits for.
        while let Some(Ok(_)) = b.next().await {}
        tokio::time::timeout(Duration::from_secs(15), served)
            .await
            .unwrap()
            .unwrap();
        assert!(!dir.exists());
        drop(busy);
    }

    #[tokio::test]
    async fn backend_answers_directly() {
        let backends = Backends::start(&["demo-x"]).await.unwrap();
        let addr = backends.addrs()[0].1;
        let get = |path: &'static str| async move {
            let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
            let req = format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
            s.write_all(req.as_bytes()).await.unwrap();
            let mut out = String::new();
            s.read_to_string(&mut out).await.unwrap();
            out
        };
        let page = get("/").await;
        assert!(page.starts_with("HTTP/1.1 200"), "{page}");
        assert!(page.contains("x-demo-backend: demo-x"), "{page}");
        assert!(page.contains(r#"<b id="page-backend" class="mono">demo-x</b>"#));
        let health = get("/healthz").await;
        assert!(
            health.starts_with("HTTP/1.1 200") && health.ends_with("\r\n\r\nok"),
            "{health}"
        );
        assert!(get("/nope").await.starts_with("HTTP/1.1 404"));
        assert!(get("/ws").await.starts_with("HTTP/1.1 426"));
        backends.stop().await;
    }
}
