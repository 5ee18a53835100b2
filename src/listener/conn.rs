//! One client connection, from the accept to its end: the PROXY header
//! (on a listener with `proxy_protocol`), the TLS handshake and the first
//! request head within `handshake_timeout`, then hyper's HTTP/1.1 server
//! (with upgrades) until the client leaves or shutdown.
//!
//! Until its first request head is complete a connection holds little: the
//! task, the socket, the TLS state and the bytes it has sent. The TLS
//! handshake and hyper's connection are boxed futures, so each takes memory
//! only while it runs, and hyper (with its 8 KiB read and write buffers)
//! starts only once the head is complete (`io::head`).

use std::sync::Arc;
use std::time::{Duration, Instant};

use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use super::{ListenerSettings, ListenerSpec, ProxyProtocol, Refused};
use crate::io::head::{self, Head};
use crate::io::proxy_header;
use crate::io::ClientStream;
use crate::limits::{Refusal, Slot};
use crate::proxy::{self, ConnInfo, ProxyContext};
use crate::tls_stream;

/// hyper's own read-buffer cap (`max_buf_size`) unless raised: 8 KiB plus
/// 100 times 4 KiB.
const HYPER_DEFAULT_MAX_BUF: usize = 8192 + 4096 * 100;

/// How long a refused head's connection lingers to let the response reach
/// the client before the socket closes (closing with unread bytes resets
/// the connection, which can overtake the response).
const LINGER: Duration = Duration::from_secs(1);
/// How much of the rest of a refused request is read and dropped meanwhile.
const LINGER_BYTES: usize = 256 * 1024;

pub(super) async fn serve(
    tcp: TcpStream,
    peer: std::net::SocketAddr,
    spec: Arc<ListenerSpec>,
    ctx: Arc<ProxyContext>,
    slot: Slot,
    refused: Arc<Refused>,
) {
    let settings = spec.settings.load_full();
    // One limit for the TLS handshake and the first head together.
    let deadline = tokio::time::Instant::now() + settings.handshake_timeout;
    // The gauge goes up now and down when the last holder of the
    // connection's `ConnInfo` lets go: this task, or the relay after an upgrade.
    let open_gauge = ctx
        .metrics
        .connections_active
        .with_label_values(&[&spec.name]);
    open_gauge.inc();
    let local = tcp.local_addr().unwrap_or(peer);
    let mut info = ConnInfo {
        peer,
        local,
        listener: Arc::clone(&spec.name),
        tls: settings.tls.is_some(),
        open_gauge,
        slot: Some(slot),
    };
    let mut tcp = tcp;

    // Bytes read past the PROXY header: the start of the ClientHello or of
    // the request head.
    let mut early = Vec::new();
    if let Some(pp) = &settings.proxy_protocol {
        let read = Box::pin(proxy_header(&mut tcp, &mut info, pp, &settings, deadline));
        match read.await {
            Ok(rest) => early = rest,
            Err(reason) => {
                refused.count(reason);
                return;
            }
        }
    }

    let mut stream = match &settings.tls {
        None => {
            let mut stream = ClientStream::plain(tcp);
            stream.unread(early.into());
            stream
        }
        Some(config) => {
            let handshake = Box::pin(tls_handshake(tcp, early, &info, deadline, config, &ctx));
            let Some(stream) = handshake.await else {
                return;
            };
            ClientStream::tls(Box::new(stream))
        }
    };
    info.tls = stream.is_tls();

    let max = settings.max_header_bytes;
    let status = match tokio::time::timeout_at(deadline, head::read_head(&mut stream, max)).await {
        Ok(Head::Ready(bytes)) => {
            stream.unread(bytes);
            Box::pin(serve_http(stream, Arc::new(info), settings, ctx)).await;
            return;
        }
        Ok(Head::Closed) => return,
        Err(_) => {
            tracing::debug!(client = %peer, listener = %spec.name, "no complete request head within handshake_timeout");
            return;
        }
        Ok(Head::LineTooLong) => 414,
        Ok(Head::TooLarge) => 431,
    };
    ctx.metrics
        .requests_rejected
        .with_label_values(&[&spec.name, if status == 414 { "414" } else { "431" }])
        .inc();
    tracing::debug!(client = %peer, listener = %spec.name, status, max_header_bytes = max, "request head over max_header_bytes");
    Box::pin(refuse_head(stream, status)).await;
}

/// Reads the PROXY header (before `deadline`) and makes the client it names
/// the connection's peer, counted under `max_connections_per_ip`. Returns
/// the bytes read past the header, or why the connection is refused (it is
/// then closed without an answer).
async fn proxy_header(
    tcp: &mut TcpStream,
    info: &mut ConnInfo,
    pp: &ProxyProtocol,
    settings: &ListenerSettings,
    deadline: tokio::time::Instant,
) -> Result<Vec<u8>, Refusal> {
    let received = match tokio::time::timeout_at(deadline, proxy_header::read(tcp, pp.accept)).await
    {
        Ok(Ok(received)) => received,
        Ok(Err(e)) => {
            tracing::debug!(peer = %info.peer, listener = %info.listener, error = %e, "PROXY header refused");
            return Err(Refusal::ProxyProtocol);
        }
        Err(_) => {
            tracing::debug!(peer = %info.peer, listener = %info.listener, "no complete PROXY header within handshake_timeout");
            return Err(Refusal::ProxyProtocol);
        }
    };
    if let Some(addresses) = received.addresses {
        info.peer = addresses.source;
        info.local = addresses.destination;
    }
    let max = settings.caps.max_connections_per_ip;
    if let Some(slot) = info.slot.as_mut() {
        slot.claim_ip(info.peer.ip(), max).inspect_err(|_| {
            tracing::debug!(listener = %info.listener, client = %info.peer, "over max_connections_per_ip: refused");
        })?;
    }
    Ok(received.rest)
}

/// Sends the refusal, closes the sending side, and reads (and drops) what
/// the client still sends for up to [`LINGER`].
async fn refuse_head(mut stream: ClientStream, status: u16) {
    let _ = tokio::time::timeout(LINGER, async {
        stream.write_all(head::refusal(status)).await?;
        stream.shutdown().await?;
        let mut sink = [0u8; 4096];
        let mut dropped = 0;
        while dropped < LINGER_BYTES {
            match stream.read(&mut sink).await? {
                0 => break,
                n => dropped += n,
            }
        }
        Ok::<_, std::io::Error>(())
    })
    .await;
}

/// hyper's HTTP/1.1 server on a connection whose first head has arrived.
async fn serve_http(
    stream: ClientStream,
    info: Arc<ConnInfo>,
    settings: Arc<ListenerSettings>,
    ctx: Arc<ProxyContext>,
) {
    let peer = info.peer;
    let listener = Arc::clone(&info.listener);
    let svc_ctx = Arc::clone(&ctx);
    let service = service_fn(move |req| proxy::serve(req, Arc::clone(&info), Arc::clone(&svc_ctx)));
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(settings.handshake_timeout)
        // Later heads on a kept-alive connection: hyper checks the same
        // limit (and answers 431 for a long request line too).
        .max_header_size(settings.max_header_bytes);
    if settings.max_header_bytes > HYPER_DEFAULT_MAX_BUF {
        builder.max_buf_size(settings.max_header_bytes + 8192);
    }
    let conn = builder
        .serve_connection(TokioIo::new(stream), service)
        .with_upgrades();
    tokio::pin!(conn);
    let result = tokio::select! {
        res = conn.as_mut() => res,
        _ = ctx.lifecycle.shutdown.cancelled() => {
            conn.as_mut().graceful_shutdown();
            conn.await
        }
    };
    if let Err(e) = result {
        // hyper answered a head it could not parse itself (a later head
        // over the limit, more than 100 header lines, or not HTTP at all).
        let status = if e.is_parse_too_large() {
            Some("431")
        } else if e.is_parse() {
            Some("400")
        } else {
            None
        };
        if let Some(status) = status {
            ctx.metrics
                .requests_rejected
                .with_label_values(&[&listener, status])
                .inc();
        }
        tracing::debug!(client = %peer, error = %e, "connection ended with an error");
    }
}

/// The TLS handshake until `deadline`, counted by result; `None` when it
/// failed or timed out (the connection is then dropped).
async fn tls_handshake(
    tcp: TcpStream,
    early: Vec<u8>,
    info: &ConnInfo,
    deadline: tokio::time::Instant,
    config: &Arc<rustls::ServerConfig>,
    ctx: &ProxyContext,
) -> Option<tls_stream::ServerTlsStream> {
    let listener = &*info.listener;
    let started = Instant::now();
    let result = tokio::time::timeout_at(
        deadline,
        tls_stream::accept_after(tcp, Arc::clone(config), early),
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
