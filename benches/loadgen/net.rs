//! Client connections: URL parsing, TCP with an explicit source address, TLS
//! with rustls, and the WebSocket upgrade.

use std::io;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::Path;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use anyhow::{anyhow, bail, Context as _};
use bytes::BytesMut;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, ServerName};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::{TcpSocket, TcpStream};
use tokio_rustls::TlsConnector;

use crate::stage::{stage, Stage, StageError};
use crate::ws;

// The loadgen's TLS provider follows berth's build: aws-lc-rs by default
// (needed for `--kx X25519MLKEM768`), or ring with `--no-default-features`.
#[cfg(feature = "aws-lc")]
use rustls::crypto::aws_lc_rs as provider_impl;
#[cfg(not(feature = "aws-lc"))]
use rustls::crypto::ring as provider_impl;

/// The provider's name, for the JSON output.
pub const PROVIDER_NAME: &str = if cfg!(feature = "aws-lc") {
    "aws-lc-rs"
} else {
    "ring"
};

/// The TLS provider, offering only the key exchange group `kx` when given
/// (a name such as X25519, secp256r1 or X25519MLKEM768, any case), and
/// otherwise the provider's classical groups: the post-quantum hybrids are
/// measured on their own (`--kx X25519MLKEM768`), so that the other tests
/// compare the same key exchange whatever each side's provider prefers.
pub fn provider(kx: Option<&str>) -> anyhow::Result<rustls::crypto::CryptoProvider> {
    let mut p = provider_impl::default_provider();
    p.kx_groups.retain(|g| {
        !format!("{:?}", g.name())
            .to_ascii_uppercase()
            .contains("MLKEM")
    });
    if let Some(kx) = kx {
        let names = || {
            provider_impl::ALL_KX_GROUPS
                .iter()
                .map(|g| format!("{:?}", g.name()))
                .collect::<Vec<_>>()
                .join(", ")
        };
        let group = provider_impl::ALL_KX_GROUPS
            .iter()
            .find(|g| format!("{:?}", g.name()).eq_ignore_ascii_case(kx))
            .ok_or_else(|| {
                anyhow!(
                    "--kx {kx}: not offered by {PROVIDER_NAME} (it has {}){}",
                    names(),
                    if cfg!(feature = "aws-lc") {
                        ""
                    } else {
                        "; X25519MLKEM768 needs the loadgen built with aws-lc-rs (the default)"
                    }
                )
            })?;
        p.kx_groups = vec![*group];
    }
    Ok(p)
}

/// A plain or TLS client stream, or one stream of an HTTP/2 connection
/// (`--h2-streams`).
pub enum Conn {
    Plain(TcpStream),
    Tls(Box<tokio_rustls::client::TlsStream<TcpStream>>),
    H2(Box<crate::h2::Stream>),
    /// An HTTP/2 connection without a stream (`--h2-streams 0`): it has no
    /// bytes to read or write.
    H2Bare(Box<crate::h2::Bare>),
}

impl Conn {
    /// The key exchange group the TLS handshake used (None over ws).
    pub fn kx_group(&self) -> Option<rustls::NamedGroup> {
        match self {
            Conn::Plain(_) | Conn::H2(_) | Conn::H2Bare(_) => None,
            Conn::Tls(s) => s
                .get_ref()
                .1
                .negotiated_key_exchange_group()
                .map(|g| g.name()),
        }
    }

    /// Whether the TLS handshake resumed an earlier session (false over ws).
    pub fn resumed(&self) -> bool {
        match self {
            Conn::Plain(_) | Conn::H2(_) | Conn::H2Bare(_) => false,
            Conn::Tls(s) => s.get_ref().1.handshake_kind() == Some(rustls::HandshakeKind::Resumed),
        }
    }
}

impl AsyncRead for Conn {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Conn::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Conn::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
            Conn::H2(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
            Conn::H2Bare(_) => Poll::Ready(Err(no_stream())),
        }
    }
}

impl AsyncWrite for Conn {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Conn::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Conn::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
            Conn::H2(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
            Conn::H2Bare(_) => Poll::Ready(Err(no_stream())),
        }
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Conn::Plain(s) => Pin::new(s).poll_flush(cx),
            Conn::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
            Conn::H2(s) => Pin::new(s.as_mut()).poll_flush(cx),
            Conn::H2Bare(_) => Poll::Ready(Err(no_stream())),
        }
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Conn::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Conn::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
            Conn::H2(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
            Conn::H2Bare(_) => Poll::Ready(Err(no_stream())),
        }
    }
}

fn no_stream() -> io::Error {
    io::Error::new(
        io::ErrorKind::Unsupported,
        "an HTTP/2 connection without a stream has no bytes to move",
    )
}

/// Where the load goes: parsed from `ws://` or `wss://` URLs, loopback only.
pub struct Target {
    pub addr: SocketAddr,
    /// The `Host` header value.
    pub host: String,
    pub path: String,
    pub tls: Option<(TlsConnector, ServerName<'static>)>,
    /// Whether TLS sessions are resumed (`--resume`).
    resume: bool,
    /// WebSockets over HTTP/2 (`--h2-streams`), shared by the clones of
    /// this target.
    pub h2: Option<std::sync::Arc<crate::h2::Pool>>,
}

impl Target {
    /// Parses the URL. `ca` is a PEM file of trusted certificates for `wss://`
    /// (without it the server certificate is not verified). `resume` keeps
    /// rustls's TLS session cache, so reconnections resume their sessions.
    /// `kx` limits the client to one key exchange group (see [`provider`]).
    pub async fn parse(
        url: &str,
        ca: Option<&Path>,
        resume: bool,
        kx: Option<&str>,
        h2_streams: Option<usize>,
    ) -> anyhow::Result<Target> {
        let (tls, rest) = if let Some(r) = url.strip_prefix("wss://") {
            (true, r)
        } else if let Some(r) = url.strip_prefix("ws://") {
            (false, r)
        } else {
            bail!("{url}: the URL must start with ws:// or wss://");
        };
        let (authority, path) = match rest.find('/') {
            Some(i) => (&rest[..i], &rest[i..]),
            None => (rest, "/"),
        };
        let default_port = if tls { 443 } else { 80 };
        let (hostname, port) = if let Some(v6) = authority.strip_prefix('[') {
            let (h, after) = v6
                .split_once(']')
                .ok_or_else(|| anyhow!("{url}: bad IPv6 host"))?;
            match after.strip_prefix(':') {
                Some(p) => (h, p.parse::<u16>().context("bad port in URL")?),
                None => (h, default_port),
            }
        } else {
            match authority.rsplit_once(':') {
                Some((h, p)) => (h, p.parse::<u16>().context("bad port in URL")?),
                None => (authority, default_port),
            }
        };
        let addr = tokio::net::lookup_host((hostname, port))
            .await
            .with_context(|| format!("cannot resolve {hostname}"))?
            .next()
            .ok_or_else(|| anyhow!("{hostname}: no address"))?;
        if !addr.ip().is_loopback() {
            bail!("{addr}: the load generator only targets loopback addresses");
        }
        let tls = if tls {
            let provider = Arc::new(provider(kx)?);
            let builder = rustls::ClientConfig::builder_with_provider(provider)
                .with_safe_default_protocol_versions()?;
            let mut config = match ca {
                Some(ca) => {
                    let mut roots = rustls::RootCertStore::empty();
                    for cert in CertificateDer::pem_file_iter(ca)
                        .with_context(|| format!("{}: cannot read", ca.display()))?
                    {
                        roots.add(cert.with_context(|| format!("{}: bad PEM", ca.display()))?)?;
                    }
                    builder.with_root_certificates(roots).with_no_client_auth()
                }
                None => builder
                    .dangerous()
                    .with_custom_certificate_verifier(Arc::new(NoVerify))
                    .with_no_client_auth(),
            };
            config.alpn_protocols = if h2_streams.is_some() {
                vec![b"h2".to_vec()]
            } else {
                vec![b"http/1.1".to_vec()]
            };
            if !resume {
                config.resumption = rustls::client::Resumption::disabled();
            }
            let name = ServerName::try_from(hostname.to_string())
                .map_err(|e| anyhow!("{hostname}: not a valid TLS server name: {e}"))?;
            Some((TlsConnector::from(Arc::new(config)), name))
        } else {
            None
        };
        Ok(Target {
            addr,
            host: authority.to_string(),
            path: path.to_string(),
            tls,
            resume,
            h2: h2_streams.map(|n| std::sync::Arc::new(crate::h2::Pool::new(n))),
        })
    }

    /// The same target for a client of its own: with `--resume`, a TLS
    /// session cache of its own, as every real client has. (One cache shared
    /// by all workers holds at most 8 tickets per server, which a burst of
    /// concurrent connects exhausts, so some would do full handshakes.)
    pub fn separate_client(&self) -> Target {
        let tls = self.tls.as_ref().map(|(connector, name)| {
            let mut config = rustls::ClientConfig::clone(connector.config());
            if self.resume {
                config.resumption = rustls::client::Resumption::default();
            }
            (TlsConnector::from(Arc::new(config)), name.clone())
        });
        Target {
            addr: self.addr,
            host: self.host.clone(),
            path: self.path.clone(),
            tls,
            resume: self.resume,
            h2: self.h2.clone(),
        }
    }

    /// The same target for a client of its own whose TLS session cache
    /// holds one server's sessions (the storm mode's thousands of clients:
    /// rustls's default cache is sized for 256 servers).
    pub fn client_for_one_server(&self) -> Target {
        let tls = self.tls.as_ref().map(|(connector, name)| {
            let mut config = rustls::ClientConfig::clone(connector.config());
            config.resumption = rustls::client::Resumption::in_memory_sessions(1);
            (TlsConnector::from(Arc::new(config)), name.clone())
        });
        Target {
            addr: self.addr,
            host: self.host.clone(),
            path: self.path.clone(),
            tls,
            resume: true,
            h2: self.h2.clone(),
        }
    }

    /// TCP connect (from `source` if given), TLS, and the WebSocket upgrade.
    /// Returns the stream and any bytes that arrived after the `101` head.
    pub async fn connect(&self, source: Option<Ipv4Addr>) -> Result<(Conn, BytesMut), StageError> {
        if let Some(pool) = &self.h2 {
            if pool.bare() {
                let (send, ping) = self.h2_connect(source).await?;
                return Ok((
                    Conn::H2Bare(Box::new(crate::h2::Bare::new(send, ping))),
                    BytesMut::new(),
                ));
            }
            let scheme = if self.tls.is_some() { "https" } else { "http" };
            let uri = format!("{scheme}://{}{}", self.host, self.path);
            let dial = || async { Ok(self.h2_connect(source).await?.0) };
            let stream = pool.open(uri, dial).await?;
            return Ok((Conn::H2(Box::new(stream)), BytesMut::new()));
        }
        let tcp = self.tcp(source).await?;
        let mut conn = match &self.tls {
            Some((connector, name)) => Conn::Tls(Box::new(
                connector
                    .connect(name.clone(), tcp)
                    .await
                    .map_err(stage(Stage::Tls))?,
            )),
            None => Conn::Plain(tcp),
        };
        let leftover = upgrade(&mut conn, &self.host, &self.path)
            .await
            .map_err(stage(Stage::Upgrade))?;
        Ok((conn, leftover))
    }

    /// A new HTTP/2 connection (TLS must choose `h2` in ALPN) whose server
    /// allows extended CONNECT.
    async fn h2_connect(
        &self,
        source: Option<Ipv4Addr>,
    ) -> Result<(h2::client::SendRequest<bytes::Bytes>, h2::PingPong), StageError> {
        let tcp = self.tcp(source).await?;
        match &self.tls {
            Some((connector, name)) => {
                let tls = connector
                    .connect(name.clone(), tcp)
                    .await
                    .map_err(stage(Stage::Tls))?;
                if tls.get_ref().1.alpn_protocol() != Some(b"h2") {
                    return Err(StageError {
                        stage: Stage::Tls,
                        error: anyhow!("the server did not choose h2 in ALPN"),
                    });
                }
                crate::h2::handshake(tls).await
            }
            None => crate::h2::handshake(tcp).await,
        }
    }

    /// The TCP connection alone (from `source` if given), with TCP_NODELAY.
    pub async fn tcp(&self, source: Option<Ipv4Addr>) -> Result<TcpStream, StageError> {
        let sock = match self.addr {
            SocketAddr::V4(_) => TcpSocket::new_v4(),
            SocketAddr::V6(_) => TcpSocket::new_v6(),
        }
        .map_err(stage(Stage::Tcp))?;
        if let (Some(ip), SocketAddr::V4(_)) = (source, self.addr) {
            sock.set_reuseaddr(true).map_err(stage(Stage::Tcp))?;
            sock.bind(SocketAddr::new(IpAddr::V4(ip), 0))
                .map_err(|e| StageError {
                    stage: Stage::Tcp,
                    error: anyhow!("bind {ip}: {e}"),
                })?;
        }
        let tcp = sock.connect(self.addr).await.map_err(stage(Stage::Tcp))?;
        tcp.set_nodelay(true).map_err(stage(Stage::Tcp))?;
        Ok(tcp)
    }

    /// `connect` with a time limit.
    pub async fn connect_timeout(
        &self,
        source: Option<Ipv4Addr>,
        limit: Duration,
    ) -> Result<(Conn, BytesMut), StageError> {
        match tokio::time::timeout(limit, self.connect(source)).await {
            Ok(r) => r,
            Err(_) => Err(StageError {
                stage: Stage::Tcp,
                error: anyhow!("connect + TLS + upgrade took longer than {limit:?}"),
            }),
        }
    }
}

/// The bytes of the ClientHello `connector` would send to `name`.
pub fn client_hello(
    connector: &TlsConnector,
    name: &ServerName<'static>,
) -> anyhow::Result<Vec<u8>> {
    let mut conn = rustls::ClientConnection::new(connector.config().clone(), name.clone())?;
    let mut hello = Vec::new();
    while conn.wants_write() {
        conn.write_tls(&mut hello)?;
    }
    Ok(hello)
}

/// Sends the upgrade request and checks the `101` and its accept key.
async fn upgrade(conn: &mut Conn, host: &str, path: &str) -> anyhow::Result<BytesMut> {
    let key = ws::new_key();
    conn.write_all(ws::upgrade_request(host, path, &key).as_bytes())
        .await?;
    conn.flush().await?;
    let mut buf = BytesMut::with_capacity(4096);
    let end = loop {
        if let Some(end) = ws::head_end(&buf) {
            break end;
        }
        if buf.len() > 16 * 1024 {
            bail!("response head longer than 16 KiB");
        }
        if conn.read_buf(&mut buf).await? == 0 {
            bail!("connection closed before the response head");
        }
    };
    let head = std::str::from_utf8(&buf[..end]).context("response head is not UTF-8")?;
    let status = head.lines().next().unwrap_or("");
    if !status.starts_with("HTTP/1.1 101") {
        bail!("expected 101, got {status:?}");
    }
    let expected = ws::accept_key(&key);
    match ws::header_value(head, "sec-websocket-accept") {
        Some(v) if v == expected => {}
        other => bail!("bad Sec-WebSocket-Accept {other:?}"),
    }
    let _ = buf.split_to(end);
    Ok(buf)
}

/// Parses `A-B` (an inclusive IPv4 range) or `A,B,C`.
pub fn parse_source_ips(spec: &str) -> anyhow::Result<Vec<Ipv4Addr>> {
    let mut out = Vec::new();
    for part in spec.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        if let Some((a, b)) = part.split_once('-') {
            let a: Ipv4Addr = a.trim().parse().context("bad source address")?;
            let b: Ipv4Addr = b.trim().parse().context("bad source address")?;
            let (a, b) = (u32::from(a), u32::from(b));
            if b < a || b - a > 1 << 16 {
                bail!("{part}: bad address range");
            }
            out.extend((a..=b).map(Ipv4Addr::from));
        } else {
            out.push(part.parse().context("bad source address")?);
        }
    }
    if let Some(ip) = out.iter().find(|ip| !ip.is_loopback()) {
        bail!("{ip}: source addresses must be loopback (127.0.0.0/8)");
    }
    Ok(out)
}

/// Accepts any server certificate (only when no `--ca` is given).
#[derive(Debug)]
struct NoVerify;

impl rustls::client::danger::ServerCertVerifier for NoVerify {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: rustls_pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }
    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &provider_impl::default_provider().signature_verification_algorithms,
        )
    }
    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &provider_impl::default_provider().signature_verification_algorithms,
        )
    }
    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        provider_impl::default_provider()
            .signature_verification_algorithms
            .supported_schemes()
    }
}
