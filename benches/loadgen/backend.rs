//! The echo backend: WebSocket servers that echo every frame back unmasked,
//! frame by frame (so fragmentation, opcodes and RSV bits come back as sent),
//! answer Pings with Pongs and Close with Close. Raw framing, one write per
//! batch of frames read. SIGUSR1 closes every open connection at once (the
//! listeners stay), as a restart of the backend would: the reconnect storm
//! benchmark cuts its clients that way.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{bail, Context as _};
use bytes::{Buf, BytesMut};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;

use crate::ws;

pub struct Options {
    pub listen: Vec<SocketAddr>,
    pub tls_listen: Vec<SocketAddr>,
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
}

pub async fn run(opts: Options) -> anyhow::Result<()> {
    if opts.listen.is_empty() && opts.tls_listen.is_empty() {
        bail!("give at least one --listen or --tls-listen address");
    }
    let acceptor = if opts.tls_listen.is_empty() {
        None
    } else {
        let (Some(cert), Some(key)) = (&opts.cert, &opts.key) else {
            bail!("--tls-listen needs --cert and --key");
        };
        Some(tls_acceptor(cert, key)?)
    };
    // Each SIGUSR1 bumps the generation; every connection open then ends.
    let (cut_tx, cut_rx) = tokio::sync::watch::channel(0u64);
    let mut usr1 = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::user_defined1())
        .context("cannot handle SIGUSR1")?;
    tokio::spawn(async move {
        while usr1.recv().await.is_some() {
            cut_tx.send_modify(|g| *g += 1);
            eprintln!("echo-backend: SIGUSR1: closing every connection");
        }
    });
    let mut tasks = Vec::new();
    let all = opts
        .listen
        .iter()
        .map(|a| (*a, false))
        .chain(opts.tls_listen.iter().map(|a| (*a, true)));
    for (addr, tls) in all {
        if !addr.ip().is_loopback() {
            bail!("{addr}: the echo backend only listens on loopback");
        }
        let listener = bind(addr).with_context(|| format!("cannot listen on {addr}"))?;
        let local = listener.local_addr()?;
        println!("LISTENING {}{local}", if tls { "wss://" } else { "ws://" });
        let acceptor = if tls { acceptor.clone() } else { None };
        tasks.push(tokio::spawn(accept_loop(
            listener,
            acceptor,
            cut_rx.clone(),
        )));
    }
    use std::io::Write as _;
    std::io::stdout().flush()?;
    for t in tasks {
        t.await?;
    }
    Ok(())
}

fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let sock = match addr {
        SocketAddr::V4(_) => tokio::net::TcpSocket::new_v4()?,
        SocketAddr::V6(_) => tokio::net::TcpSocket::new_v6()?,
    };
    sock.set_reuseaddr(true)?;
    sock.bind(addr)?;
    // A deep backlog: the idle benchmark opens thousands of connections.
    sock.listen(4096)
}

fn tls_acceptor(cert: &PathBuf, key: &PathBuf) -> anyhow::Result<TlsAcceptor> {
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert)
        .with_context(|| format!("{}: cannot read", cert.display()))?
        .collect::<Result<_, _>>()?;
    let key = PrivateKeyDer::from_pem_file(key)
        .with_context(|| format!("{}: cannot read", key.display()))?;
    let provider = Arc::new(crate::net::provider(None)?);
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_single_cert(chain, key)?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(TlsAcceptor::from(Arc::new(config)))
}

async fn accept_loop(
    listener: TcpListener,
    acceptor: Option<TlsAcceptor>,
    mut cut: tokio::sync::watch::Receiver<u64>,
) {
    loop {
        let (tcp, _) = match listener.accept().await {
            Ok(c) => c,
            Err(e) => {
                // EMFILE and friends: back off instead of spinning.
                eprintln!("echo-backend: accept failed: {e}");
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                continue;
            }
        };
        let _ = tcp.set_nodelay(true);
        // A cut made before this accept is not this connection's.
        cut.borrow_and_update();
        let mut cut = cut.clone();
        match &acceptor {
            None => {
                tokio::spawn(async move {
                    tokio::select! {
                        _ = serve(tcp) => {}
                        _ = cut.changed() => {}
                    }
                });
            }
            Some(acceptor) => {
                let acceptor = acceptor.clone();
                tokio::spawn(async move {
                    let conn = async {
                        if let Ok(tls) = acceptor.accept(tcp).await {
                            let _ = serve(tls).await;
                        }
                    };
                    tokio::select! {
                        _ = conn => {}
                        _ = cut.changed() => {}
                    }
                });
            }
        }
    }
}

/// One connection: the upgrade, then the echo loop.
async fn serve<S: AsyncRead + AsyncWrite + Unpin>(mut s: S) -> anyhow::Result<()> {
    let mut buf = BytesMut::with_capacity(4096);
    let end = loop {
        if let Some(end) = ws::head_end(&buf) {
            break end;
        }
        if buf.len() > 16 * 1024 || s.read_buf(&mut buf).await? == 0 {
            return Ok(());
        }
    };
    let head = String::from_utf8_lossy(&buf[..end]).into_owned();
    buf.advance(end);
    let upgrade =
        ws::header_value(&head, "upgrade").is_some_and(|v| v.eq_ignore_ascii_case("websocket"));
    let Some(key) = ws::header_value(&head, "sec-websocket-key").filter(|_| upgrade) else {
        // Not a WebSocket upgrade (a health check, say): a plain answer.
        let body = "echo backend: WebSocket only\n";
        let resp = format!(
            "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        );
        s.write_all(resp.as_bytes()).await?;
        s.shutdown().await?;
        return Ok(());
    };
    let resp = format!(
        "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: {}\r\n\r\n",
        ws::accept_key(key)
    );
    s.write_all(resp.as_bytes()).await?;
    s.flush().await?;

    // Allocated on first use: an idle connection should cost little.
    let mut out: Vec<u8> = Vec::new();
    buf.reserve(2048);
    loop {
        let mut close = false;
        while let Some(h) = ws::parse_header(&buf).map_err(anyhow::Error::msg)? {
            let total = h.total_len();
            if buf.len() < total {
                buf.reserve(total - buf.len());
                break;
            }
            let payload = &mut buf[h.header_len..total];
            if let Some(key) = h.mask {
                ws::apply_mask(payload, key);
            }
            match h.opcode() {
                ws::OP_PING => {
                    ws::push_header(&mut out, 0x80 | ws::OP_PONG, payload.len(), None);
                    out.extend_from_slice(payload);
                }
                ws::OP_PONG => {}
                ws::OP_CLOSE => {
                    ws::push_header(&mut out, 0x80 | ws::OP_CLOSE, payload.len(), None);
                    out.extend_from_slice(payload);
                    close = true;
                }
                _ => {
                    ws::push_header(&mut out, h.b0, payload.len(), None);
                    out.extend_from_slice(payload);
                }
            }
            buf.advance(total);
            if close {
                break;
            }
        }
        if !out.is_empty() {
            s.write_all(&out).await?;
            s.flush().await?;
            out.clear();
            if out.capacity() > 1 << 20 {
                out.shrink_to(16 * 1024);
            }
        }
        if close {
            // The server closes TCP first (RFC 6455 §7.1.1).
            let _ = s.shutdown().await;
            return Ok(());
        }
        if buf.capacity() - buf.len() < 1024 {
            buf.reserve(16 * 1024);
        }
        if s.read_buf(&mut buf).await? == 0 {
            return Ok(());
        }
    }
}
