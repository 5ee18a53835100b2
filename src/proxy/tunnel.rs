//! The task that owns one upgraded connection: it waits for hyper to hand
//! over the client's side after the `101` (the socket itself on HTTP/1.1,
//! or the stream after the `200` on HTTP/2: a [`ClientSide`] either way),
//! runs the relay, then records how the connection ended (metrics and the
//! access log).
//!
//! It is written as one small state machine rather than an `async` block so
//! that an idle connection's task holds the relay and little else: an async
//! block would keep its captured values alongside the relay for the
//! connection's whole life.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Instant;

use bytes::Bytes;
use hyper::upgrade::{OnUpgrade, Upgraded};
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

use super::{ConnInfo, Protocol, ProxyContext};
use crate::balancer::ConnectionGuard;
use crate::io::ClientStream;
use crate::lifecycle::{RelayId, RelayTag};
use crate::metrics::close_code_label;
use crate::ws::frame::close_code;
use crate::ws::relay::{relay, Deadline, EndReason, Relay, RelayConfig, RelayOutcome, Source};

/// The client's side of a relayed WebSocket: its whole connection (an
/// HTTP/1.1 upgrade), or one stream of an HTTP/2 connection (RFC 8441),
/// which hyper's HTTP/2 server carries in frames of that connection.
pub enum ClientSide {
    Conn(ClientStream),
    Stream(TokioIo<Upgraded>),
}

impl AsyncRead for ClientSide {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            ClientSide::Conn(s) => Pin::new(s).poll_read(cx, buf),
            ClientSide::Stream(s) => Pin::new(s).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for ClientSide {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            ClientSide::Conn(s) => Pin::new(s).poll_write(cx, buf),
            ClientSide::Stream(s) => Pin::new(s).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            ClientSide::Conn(s) => Pin::new(s).poll_flush(cx),
            ClientSide::Stream(s) => Pin::new(s).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            ClientSide::Conn(s) => Pin::new(s).poll_shutdown(cx),
            ClientSide::Stream(s) => Pin::new(s).poll_shutdown(cx),
        }
    }
}

/// One upgraded connection, from the `101` to its end.
pub struct Tunnel {
    ctx: Arc<ProxyContext>,
    conn: Arc<ConnInfo>,
    /// Holds the backend's live-connection slot.
    guard: ConnectionGuard,
    started: Instant,
    /// The relay's entry in the drain registry, while it runs.
    registered: Option<RelayId>,
    state: State,
}

/// How a tunnel's connection may end on berth's own clock, and what its
/// relay is registered with.
pub struct Terms {
    /// The earlier of the token's expiry and the maximum age.
    /// A maximum age closes with 1012 and a token's expiry with 1008,
    /// which is how the end tells them apart.
    pub deadline: Option<Deadline>,
    pub tag: RelayTag,
}

// The relay is the state a tunnel spends its life in, so it stays inline;
// the short-lived upgrading state is the one boxed.
#[allow(clippy::large_enum_variant)]
enum State {
    /// The `101` is on its way to the client; hyper hands the socket over next.
    Upgrading(Box<Pending>),
    Relaying(Relay<ClientSide, TcpStream>),
    Done,
}

/// What the relay needs once the client's socket arrives (boxed: it lives
/// only for the moment between the `101` and the hand-over).
struct Pending {
    upgrade: OnUpgrade,
    backend: TcpStream,
    backend_prefix: Bytes,
    config: Arc<RelayConfig>,
    deadline: Option<Deadline>,
    tag: RelayTag,
}

impl Tunnel {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        ctx: Arc<ProxyContext>,
        conn: Arc<ConnInfo>,
        guard: ConnectionGuard,
        upgrade: OnUpgrade,
        backend: TcpStream,
        backend_prefix: Bytes,
        config: Arc<RelayConfig>,
        terms: Terms,
    ) -> Tunnel {
        Tunnel {
            ctx,
            conn,
            guard,
            started: Instant::now(),
            registered: None,
            state: State::Upgrading(Box::new(Pending {
                upgrade,
                backend,
                backend_prefix,
                config,
                deadline: terms.deadline,
                tag: terms.tag,
            })),
        }
    }

    fn record(&self, outcome: &RelayOutcome) {
        let backend = self.guard.backend();
        let m = &self.ctx.metrics;
        let pool = backend.pool.as_str();
        let elapsed = self.started.elapsed();
        m.ws_duration
            .with_label_values(&[pool, &backend.id])
            .observe(elapsed.as_secs_f64());
        m.ws_closes
            .with_label_values(&[
                pool,
                outcome.initiator.as_str(),
                close_code_label(outcome.code),
            ])
            .inc();
        match outcome.reason {
            EndReason::IdleTimeout => m.ws_idle_timeouts.with_label_values(&[pool]).inc(),
            EndReason::HeartbeatFailure => m.ws_heartbeat_failures.with_label_values(&[pool]).inc(),
            EndReason::Drained => m.ws_drained.with_label_values(&[pool, &backend.id]).inc(),
            EndReason::Rebalanced => m
                .ws_rebalanced
                .with_label_values(&[pool, &backend.id])
                .inc(),
            EndReason::Deadline if outcome.code == Some(close_code::SERVICE_RESTART) => {
                m.ws_max_age.with_label_values(&[pool]).inc()
            }
            EndReason::SendTimeout(side) => {
                let side = match side {
                    Source::Client => "client",
                    Source::Backend => "backend",
                };
                m.ws_send_timeouts.with_label_values(&[pool, side]).inc();
            }
            _ => {}
        }
        tracing::info!(
            target: "berth::access",
            kind = "websocket",
            client = %self.conn.peer,
            listener = %self.conn.listener,
            protocol = self.conn.protocol.label(),
            pool,
            backend = %backend.id,
            duration_ms = elapsed.as_secs_f64() * 1000.0,
            bytes_client_to_backend = outcome.client_to_backend.bytes,
            bytes_backend_to_client = outcome.backend_to_client.bytes,
            messages_client_to_backend = outcome.client_to_backend.messages,
            messages_backend_to_client = outcome.backend_to_client.messages,
            close_code = close_code_label(outcome.code),
            initiator = outcome.initiator.as_str(),
            "websocket closed"
        );
    }
}

impl Future for Tunnel {
    type Output = ();

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let this = &mut *self;
        loop {
            match &mut this.state {
                State::Upgrading(pending) => {
                    let upgraded = match Pin::new(&mut pending.upgrade).poll(cx) {
                        Poll::Pending => return Poll::Pending,
                        Poll::Ready(r) => r,
                    };
                    let State::Upgrading(pending) = std::mem::replace(&mut this.state, State::Done)
                    else {
                        return Poll::Ready(());
                    };
                    let Pending {
                        backend,
                        backend_prefix,
                        config,
                        deadline,
                        tag,
                        ..
                    } = *pending;
                    let upgraded = match upgraded {
                        Ok(u) => u,
                        Err(e) => {
                            tracing::debug!(client = %this.conn.peer, error = %e, "client upgrade did not complete");
                            return Poll::Ready(());
                        }
                    };
                    let (client, client_prefix) = match this.conn.protocol {
                        // hyper's stream of the HTTP/2 connection is the
                        // client's side as it is.
                        Protocol::Http2 => {
                            (ClientSide::Stream(TokioIo::new(upgraded)), Bytes::new())
                        }
                        Protocol::Http1 => match upgraded.downcast::<TokioIo<ClientStream>>() {
                            Ok(parts) => (ClientSide::Conn(parts.io.into_inner()), parts.read_buf),
                            Err(_) => {
                                // berth's own failure: hyper handed back a
                                // stream other than the one the listener gave it.
                                tracing::error!(client = %this.conn.peer, "upgraded client connection is not a ClientStream");
                                return Poll::Ready(());
                            }
                        },
                    };
                    this.started = Instant::now();
                    let (id, stop) = this
                        .ctx
                        .lifecycle
                        .relay_started_with(this.guard.backend(), tag);
                    this.registered = Some(id);
                    this.conn.websockets.fetch_add(1, Ordering::Relaxed);
                    this.state = State::Relaying(
                        relay(
                            client,
                            client_prefix,
                            backend,
                            backend_prefix,
                            config,
                            Some(stop),
                            Some(Arc::clone(&this.guard.backend().counters)),
                        )
                        .with_deadline(deadline),
                    );
                }
                State::Relaying(relay) => {
                    let outcome = match Pin::new(relay).poll(cx) {
                        Poll::Pending => return Poll::Pending,
                        Poll::Ready(o) => o,
                    };
                    // Close the sockets before accounting for them.
                    this.state = State::Done;
                    if let Some(id) = this.registered.take() {
                        this.ctx.lifecycle.relay_ended(id);
                        this.conn.websockets.fetch_sub(1, Ordering::Relaxed);
                    }
                    this.record(&outcome);
                    return Poll::Ready(());
                }
                State::Done => return Poll::Ready(()),
            }
        }
    }
}

impl Drop for Tunnel {
    fn drop(&mut self) {
        // A tunnel dropped mid-relay (the runtime shutting down) leaves no
        // stale entry behind.
        if let Some(id) = self.registered.take() {
            self.ctx.lifecycle.relay_ended(id);
            self.conn.websockets.fetch_sub(1, Ordering::Relaxed);
        }
    }
}

#[cfg(test)]
mod tests {
    /// Every WebSocket's task is a tokio task cell: 112 bytes around the
    /// tunnel (header 32, scheduler and id 16, the stage's tag 8, the task
    /// tracker's token 8, trailer 48), rounded up to 128 bytes. At 656 bytes
    /// or less the tunnel's cell is 768 bytes; 8 bytes more and it is 896,
    /// on every idle WebSocket.
    #[test]
    fn an_idle_tunnel_fits_a_768_byte_task() {
        // tokio's TcpStream is 8 bytes larger in debug builds, and a tunnel
        // holds two (the client's on HTTP/1.1, and the backend's).
        let debug_extra = if cfg!(debug_assertions) { 16 } else { 0 };
        let tunnel = std::mem::size_of::<super::Tunnel>() - debug_extra;
        assert!(
            tunnel <= 656,
            "Tunnel is {tunnel} bytes: its task no longer fits 768 bytes"
        );
    }
}
