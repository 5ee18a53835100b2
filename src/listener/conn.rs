//! One client connection, from the accept to its end: the PROXY header
//! (on a listener with `proxy_protocol`), the TLS handshake and the first
//! request head (or the HTTP/2 preface and first `SETTINGS`) within
//! `handshake_timeout`, then hyper's HTTP/1.1 server (with upgrades) or its
//! HTTP/2 server (with extended CONNECT) until the client leaves or
//! shutdown.
//!
//! Which protocol: on TLS, what ALPN chose (`h2` is offered only where the
//! listener has `http2` on); on plain TCP, HTTP/2 when the connection starts
//! with the HTTP/2 preface (prior knowledge) and `http2` is on.
//!
//! Until its first request head (or its preface and `SETTINGS`) is
//! complete a connection holds little: the task, the socket, the TLS state
//! and the bytes it has sent. The TLS handshake is a boxed future, so it
//! takes memory only while it runs; hyper's connection is a task of its own,
//! spawned once the handshake task is done (which then ends, so a
//! long-lived connection does not keep that task's handshake-sized state),
//! and hyper (with its 8 KiB read and write buffers on HTTP/1.1; on HTTP/2
//! `h2`'s 16 KiB write, 8 KiB read and 4 KiB HPACK buffers, which no
//! setting sizes) starts only once that is complete (`io::head`,
//! `io::preface`).
//!
//! An HTTP/2 connection runs behind `io::h2guard`, which ends a flood of
//! control frames with a `GOAWAY`; its flow-control windows and buffers are
//! sized for WebSockets and pages, not bulk downloads (below). Its stream
//! tasks (hyper's) are spawned on the lifecycle's tracker. On shutdown it
//! keeps serving until its WebSockets have closed (each gets its Close 1001
//! from the shutdown's spread), then sends `GOAWAY` and finishes its
//! in-flight requests.

use std::future::Future;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_util::task::TaskTracker;

use super::{ListenerSettings, ListenerSpec, ProxyProtocol, Refused};
use crate::io::h2guard::H2Guard;
use crate::io::head::{self, Head};
use crate::io::preface::{self, Preface};
use crate::io::proxy_header;
use crate::io::ClientStream;
use crate::limits::{Refusal, Slot};
use crate::proxy::{self, ConnInfo, Protocol, ProxyContext};
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

// HTTP/2 sizes. hyper's defaults (1 MiB windows, a 400 KiB send buffer per
// stream) are for bulk transfers; a WebSocket or a page needs far less, and
// what a stream may buffer in berth is bounded by these. Idle, a stream
// holds none of them: buffers exist only while data is in flight.
/// What a client may send on one stream before berth reads it (RFC 9113's
/// default).
const H2_STREAM_WINDOW: u32 = 65_535;
/// ...and on all streams of a connection together.
const H2_CONN_WINDOW: u32 = 512 * 1024;
/// What berth queues for one stream beyond what the client's window takes.
const H2_SEND_BUF: usize = 64 * 1024;
/// Streams a client may open and reset before berth accepted them, at any
/// time (rapid reset, CVE-2023-44487): one more is a `GOAWAY`.
const H2_PENDING_ACCEPT_RESETS: usize = 20;
/// Streams berth may reset for a client's protocol errors over the
/// connection's life (the "MadeYouReset" variant): one more is a `GOAWAY`.
const H2_LOCAL_ERROR_RESETS: usize = 200;
/// How long a `GOAWAY` from the guard has to leave before the connection
/// is dropped.
const GOAWAY_GRACE: Duration = Duration::from_secs(1);
/// How often shutdown looks whether an HTTP/2 connection's WebSockets have
/// all closed.
const WEBSOCKETS_POLL: Duration = Duration::from_millis(50);

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
        protocol: Protocol::Http1,
        websockets: Default::default(),
        requests: Default::default(),
        started: Default::default(),
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

    // ALPN chose h2 (offered only with `http2` on): the preface comes next.
    if stream.alpn_is_h2() {
        start_h2(stream, Bytes::new(), info, deadline, settings, ctx).await;
        return;
    }
    let max = settings.max_header_bytes;
    let status = match tokio::time::timeout_at(deadline, head::read_head(&mut stream, max)).await {
        Ok(Head::Ready(bytes)) => {
            // HTTP/2 with prior knowledge: "PRI * HTTP/2.0" and an empty
            // line read as a head; the rest of the preface follows.
            if settings.http2 && !info.tls && bytes.starts_with(preface::PREFACE_LINE) {
                start_h2(stream, bytes, info, deadline, settings, ctx).await;
                return;
            }
            stream.unread(bytes);
            count_connection(&ctx, &info);
            // A task of its own: this one, sized for the handshake's
            // states, ends instead of staying under the connection's life.
            let tracker = ctx.lifecycle.tracker.clone();
            tracker.spawn(serve_http(stream, Arc::new(info), settings, ctx));
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

/// `berth_client_connections_total` for a connection about to be served.
fn count_connection(ctx: &ProxyContext, info: &ConnInfo) {
    ctx.metrics
        .client_connections
        .with_label_values(&[&info.listener, info.protocol.label()])
        .inc();
}

/// Reads the rest of an HTTP/2 connection's start (the preface and the
/// client's first `SETTINGS`, after `already`) within the deadline, then
/// serves it; a connection that fails to start so is closed.
async fn start_h2(
    mut stream: ClientStream,
    already: Bytes,
    mut info: ConnInfo,
    deadline: tokio::time::Instant,
    settings: Arc<ListenerSettings>,
    ctx: Arc<ProxyContext>,
) {
    let read = tokio::time::timeout_at(deadline, preface::read_preface(&mut stream, already));
    match read.await {
        Ok(Preface::Ready(bytes)) => {
            stream.unread(bytes);
            info.protocol = Protocol::Http2;
            count_connection(&ctx, &info);
            // A task of its own, as `serve_http`.
            let tracker = ctx.lifecycle.tracker.clone();
            tracker.spawn(serve_h2(stream, Arc::new(info), settings, ctx));
        }
        Ok(Preface::Bad) => {
            tracing::debug!(client = %info.peer, listener = %info.listener, "not an HTTP/2 connection preface; closed");
        }
        Ok(Preface::Closed) => {}
        Err(_) => {
            tracing::debug!(client = %info.peer, listener = %info.listener, "no HTTP/2 preface within handshake_timeout");
        }
    }
}

/// Runs hyper's tasks for one HTTP/2 connection (its streams, and the
/// writers of upgraded streams) on the lifecycle's tracker, so that
/// shutdown waits for them.
#[derive(Clone)]
struct Tracked(TaskTracker);

impl<F> hyper::rt::Executor<F> for Tracked
where
    F: Future + Send + 'static,
    F::Output: Send + 'static,
{
    fn execute(&self, fut: F) {
        self.0.spawn(fut);
    }
}

/// hyper's HTTP/2 server on a connection whose preface has arrived.
async fn serve_h2(
    stream: ClientStream,
    info: Arc<ConnInfo>,
    settings: Arc<ListenerSettings>,
    ctx: Arc<ProxyContext>,
) {
    let peer = info.peer;
    let guard = H2Guard::new(stream);
    let tripped = guard.tripped();
    let svc_ctx = Arc::clone(&ctx);
    let svc_info = Arc::clone(&info);
    let service =
        service_fn(move |req| proxy::serve(req, Arc::clone(&svc_info), Arc::clone(&svc_ctx)));
    let mut builder =
        hyper::server::conn::http2::Builder::new(Tracked(ctx.lifecycle.tracker.clone()));
    builder
        .timer(TokioTimer::new())
        .enable_connect_protocol()
        .max_concurrent_streams(settings.max_concurrent_streams)
        .initial_stream_window_size(H2_STREAM_WINDOW)
        .initial_connection_window_size(H2_CONN_WINDOW)
        .max_send_buf_size(H2_SEND_BUF)
        .max_header_list_size(u32::try_from(settings.max_header_bytes).unwrap_or(u32::MAX))
        .max_pending_accept_reset_streams(H2_PENDING_ACCEPT_RESETS)
        .max_local_error_reset_streams(H2_LOCAL_ERROR_RESETS);
    let conn = builder.serve_connection(TokioIo::new(guard), service);
    tokio::pin!(conn);
    let result = tokio::select! {
        res = conn.as_mut() => res,
        () = idle(&info, settings.handshake_timeout) => {
            tracing::debug!(client = %peer, listener = %info.listener, "HTTP/2 connection idle for handshake_timeout: GOAWAY");
            conn.as_mut().graceful_shutdown();
            conn.await
        }
        _ = tripped.wait() => {
            tracing::warn!(client = %peer, listener = %info.listener, "HTTP/2 connection flooded berth with control frames: GOAWAY sent, connection closed");
            let _ = tokio::time::timeout(GOAWAY_GRACE, conn.as_mut()).await;
            return;
        }
        _ = ctx.lifecycle.shutdown.cancelled() => {
            // The WebSockets first (their 1001s come from the shutdown's
            // spread), then GOAWAY; the connection is served meanwhile, as
            // its WebSockets' frames travel in it.
            let websockets_closed = async {
                while info.websockets.load(Ordering::Relaxed) > 0 {
                    tokio::time::sleep(WEBSOCKETS_POLL).await;
                }
            };
            tokio::select! {
                res = conn.as_mut() => res,
                () = websockets_closed => {
                    conn.as_mut().graceful_shutdown();
                    conn.await
                }
            }
        }
    };
    if let Err(e) = result {
        tracing::debug!(client = %peer, error = %e, "HTTP/2 connection ended with an error");
    }
}

/// Returns once an HTTP/2 connection has had no request in flight, no
/// WebSocket and no new request for a whole `timeout` (so between one and
/// two `timeout`s after its last stream ended), as an idle HTTP/1.1
/// keep-alive connection is closed after `handshake_timeout`. One timer per
/// connection, woken once per `timeout`.
async fn idle(info: &ConnInfo, timeout: Duration) {
    let mut seen = info.started.load(Ordering::Relaxed);
    loop {
        tokio::time::sleep(timeout).await;
        let started = info.started.load(Ordering::Relaxed);
        let busy = info.requests.load(Ordering::Relaxed) > 0
            || info.websockets.load(Ordering::Relaxed) > 0;
        if !busy && started == seen {
            return;
        }
        seen = started;
    }
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
