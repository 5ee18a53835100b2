//! The frame-aware relay between a client and a backend after the `101`.
//!
//! It is built in two parts:
//! - [`processor`]: a pure, synchronous [`FrameProcessor`] per direction.
//!   It owns the frame-parsing state (a header split across reads, the
//!   frame in flight, a held Pong, a queued injection, the Close codes
//!   seen) and decides, for each chunk fed to it, which bytes go on, which
//!   frames are counted, dropped or consumed, and where berth's own control
//!   frames (Close, Ping) may be written: only between frames (RFC 6455
//!   §5.4). It knows no socket, no clock and no randomness.
//! - the driver ([`Relay`], started by [`relay`]): the I/O future. It owns
//!   both streams (any `AsyncRead + AsyncWrite + Unpin`, so a TCP socket, a
//!   TLS stream or later an HTTP/2 stream), the per-thread scratch buffer
//!   reads go into, the per-connection pending-output buffer (allocated only
//!   while a destination is slower than its source, freed as soon as it
//!   drains), the one lazily allocated timer (idle timeout, ping interval,
//!   pong timeout, close timeout, a [`Deadline`]), the [`StopHandle`], and
//!   the rules of how a connection ends.
//!
//! Memory: bytes are read into the scratch buffer only when a socket is
//! readable and written straight on, so an idle connection holds no relay
//! buffer.
//!
//! Starting and stopping: the tunnel task (`crate::proxy::tunnel`) creates
//! the relay once hyper hands over the client's socket and polls it until
//! it returns a [`RelayOutcome`]. Ending (RFC 6455 §7): a Close from either
//! end is relayed, and once both Close frames have passed berth closes TCP
//! towards the client first. When a peer's TCP stream ends without a Close,
//! the other peer gets one from berth (1014 towards the client when the
//! backend vanished, 1001 towards the backend when the client did). Idle
//! timeouts, failed heartbeats, drains and rebalances (1012), shutdown
//! (1001, all through the [`StopHandle`]), protocol errors (1002, RFC 6455
//! §7.4.1), a message over `max_message_size` (1009), a peer that takes
//! nothing within `send_timeout` and a connection's [`Deadline`] (its own
//! code, e.g. 1008 for an expired token, 1012 at its maximum age) make
//! berth end the connection itself; each such cause is one [`Ending`] (what each peer is told, or that it is dropped,
//! and the [`EndReason`]), so a new cause is a new value, not new closing
//! code. No end waits longer than `close_timeout`.

use std::sync::atomic::{AtomicU8, Ordering};
use std::task::Context;
use std::time::Duration;

use futures_util::task::AtomicWaker;

use crate::ws::frame::close_code;

mod driver;
pub mod processor;

#[cfg(test)]
mod tests;

pub use driver::{relay, Relay};
pub use processor::{FrameProcessor, Inject, ProtocolError, Report, Sink, Source, PING_TOKEN_LEN};

/// Per-pool timing and limits of a relayed connection.
#[derive(Clone, Copy, Debug)]
pub struct RelayConfig {
    pub idle_timeout: Option<Duration>,
    pub ping_interval: Option<Duration>,
    pub pong_timeout: Duration,
    pub close_timeout: Duration,
    /// The largest data message relayed either way (payload bytes, all
    /// fragments together); a larger one closes both ends with 1009.
    pub max_message_size: Option<u64>,
    /// A peer that accepts no bytes for this long while berth holds bytes
    /// for it is dropped; `None` leaves backpressure alone.
    pub send_timeout: Option<Duration>,
}

/// A moment at which berth ends the connection itself, with this Close code
/// and reason to both peers (e.g. 1008 when the client's token expires).
/// Set with [`Relay::with_deadline`]; one timer serves it with the others,
/// and when it passes it is one more [`Ending`] ([`Deadline::ending`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Deadline {
    pub at: tokio::time::Instant,
    pub code: u16,
    pub reason: &'static str,
}

impl Deadline {
    /// What each peer is told when the deadline passes.
    pub fn ending(self) -> Ending {
        Ending::close_both(EndReason::Deadline, self.code, self.reason)
    }
}

/// Why berth itself asks a connection to end.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StopReason {
    /// The backend is being drained or was removed: Close 1012.
    Drain,
    /// berth is shutting down: Close 1001.
    Shutdown,
    /// A rebalance moves the client to a less loaded backend: Close 1012.
    Rebalance,
}

impl StopReason {
    /// What each peer is told.
    pub fn ending(self) -> Ending {
        match self {
            StopReason::Drain => Ending::close(
                EndReason::Drained,
                (close_code::SERVICE_RESTART, "service restart"),
                (close_code::GOING_AWAY, "service restart"),
            ),
            StopReason::Shutdown => Ending::close_both(
                EndReason::Shutdown,
                close_code::GOING_AWAY,
                "server shutting down",
            ),
            StopReason::Rebalance => Ending::close(
                EndReason::Rebalanced,
                (close_code::SERVICE_RESTART, "rebalance"),
                (close_code::GOING_AWAY, "rebalance"),
            ),
        }
    }
}

/// What berth does to one peer when it ends a connection itself.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PeerEnd {
    /// A Close frame with this code and reason at the next frame boundary
    /// (masked towards the backend), then the closing handshake.
    Close(u16, &'static str),
    /// The peer is neither read nor written again; its TCP connection is
    /// closed once the other peer's side is done (within `close_timeout`).
    Drop,
}

/// How berth itself ends a connection, and why: one value per cause
/// (timeouts, drains, limits, and any later ones), so every cause goes
/// through the same closing rules and is reported the same way.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Ending {
    pub reason: EndReason,
    pub client: PeerEnd,
    pub backend: PeerEnd,
}

impl Ending {
    /// Both peers get a Close, each with its own code and reason.
    pub const fn close(
        reason: EndReason,
        client: (u16, &'static str),
        backend: (u16, &'static str),
    ) -> Ending {
        Ending {
            reason,
            client: PeerEnd::Close(client.0, client.1),
            backend: PeerEnd::Close(backend.0, backend.1),
        }
    }

    /// Both peers get the same Close.
    pub const fn close_both(reason: EndReason, code: u16, text: &'static str) -> Ending {
        Ending::close(reason, (code, text), (code, text))
    }

    /// The close code the connection is recorded with: the client's, or
    /// the backend's when the client was dropped without one.
    pub fn code(&self) -> Option<u16> {
        match (self.client, self.backend) {
            (PeerEnd::Close(code, _), _) | (PeerEnd::Drop, PeerEnd::Close(code, _)) => Some(code),
            (PeerEnd::Drop, PeerEnd::Drop) => None,
        }
    }
}

/// A connection's stop switch, shared with whoever may end it on purpose
/// (the drain and shutdown controllers in `crate::drain`, a rebalance). Checking it is an
/// atomic load; the relay's waker is kept so that a stop wakes it at once.
#[derive(Default)]
pub struct StopHandle {
    /// 0: run; otherwise a [`StopReason`].
    state: AtomicU8,
    waker: AtomicWaker,
}

impl StopHandle {
    /// Asks the relay to close; the first reason given wins.
    pub fn stop(&self, reason: StopReason) {
        let code = match reason {
            StopReason::Drain => 1,
            StopReason::Shutdown => 2,
            StopReason::Rebalance => 3,
        };
        if self
            .state
            .compare_exchange(0, code, Ordering::AcqRel, Ordering::Acquire)
            .is_ok()
        {
            self.waker.wake();
        }
    }

    /// The reason it was asked to stop for, if it was.
    pub fn reason(&self) -> Option<StopReason> {
        match self.state.load(Ordering::Acquire) {
            0 => None,
            1 => Some(StopReason::Drain),
            3 => Some(StopReason::Rebalance),
            _ => Some(StopReason::Shutdown),
        }
    }

    /// The reason, or `None` after registering to be woken by a stop.
    fn poll(&self, cx: &mut Context<'_>) -> Option<StopReason> {
        if let Some(r) = self.reason() {
            return Some(r);
        }
        self.waker.register(cx.waker());
        self.reason()
    }
}

/// Which party ended the connection first.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Initiator {
    Client,
    Backend,
    /// berth itself (a timeout, a drain, shutdown, a protocol error).
    Internal,
}

impl Initiator {
    /// The `initiator` label value.
    pub fn as_str(self) -> &'static str {
        match self {
            Initiator::Client => "client",
            Initiator::Backend => "backend",
            Initiator::Internal => "proxy",
        }
    }
}

/// The event that ended a connection, for the counters that track reaps.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EndReason {
    /// A peer sent Close, or a TCP stream ended.
    Peer,
    IdleTimeout,
    HeartbeatFailure,
    Drained,
    Shutdown,
    ProtocolError,
    /// A data message from this peer went over `max_message_size`.
    MessageTooBig(Source),
    /// This peer accepted no bytes within `send_timeout`.
    SendTimeout(Source),
    /// The connection's [`Deadline`] passed.
    Deadline,
    /// A rebalance closed it ([`StopReason::Rebalance`]).
    Rebalanced,
}

/// Traffic in one direction.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DirStats {
    pub bytes: u64,
    pub frames: u64,
    /// Complete data messages (a data frame with FIN set).
    pub messages: u64,
}

/// What the relay saw, for metrics and the access log.
#[derive(Clone, Copy, Debug)]
pub struct RelayOutcome {
    pub client_to_backend: DirStats,
    pub backend_to_client: DirStats,
    pub initiator: Initiator,
    /// The close code of the first Close (sent by the initiator, or by berth);
    /// `None` when the connection ended without one (abnormal, "1006").
    pub code: Option<u16>,
    pub reason: EndReason,
}
