//! The relay's I/O driver: the [`Relay`] future that owns both streams and
//! moves bytes through one [`FrameProcessor`] per direction.
//!
//! It owns what the processor must not: the sockets, the per-thread scratch
//! buffer, the pending-output buffer of a slow destination, the clock (one
//! lazily allocated timer for every deadline), randomness (Ping tokens and
//! masking keys), the [`StopHandle`], and the rules of how a connection
//! ends (see the parent module). Every end berth decides on itself goes
//! through one [`Ending`]: what each peer is told (a Close with a code, or
//! nothing and a dropped connection) and why.
//!
//! With `send_timeout`, each direction also notes since when berth has held
//! bytes for its destination without the destination accepting any (a
//! stall); a stall longer than `send_timeout` drops that peer. One
//! direction's state and its polling live in `dir.rs`.

mod dir;

use std::cell::RefCell;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::time::{Instant, Sleep};

use super::processor::{Inject, Report, Source, PING_TOKEN_LEN};
use super::{
    Deadline, EndReason, Ending, Initiator, PeerEnd, RelayConfig, RelayOutcome, StopHandle,
};
use crate::metrics::RelayCounters;
use crate::ws::frame::close_code;
use dir::{poll_dir, Dir};

/// Size of the per-thread read buffer: the most one read passes on, and so
/// the most a slow destination's pending buffer holds.
pub(super) const SCRATCH_LEN: usize = 32 * 1024;

thread_local! {
    /// Shared read buffer: borrowed only inside one poll, never across awaits.
    static SCRATCH: RefCell<Box<[u8]>> = RefCell::new(vec![0u8; SCRATCH_LEN].into_boxed_slice());
}

/// Relays between `client` and `backend` until both directions are finished.
///
/// `*_prefix` are bytes already read from each side during the handshake;
/// they are relayed before anything else. `config` is shared: berth passes
/// its pool's one copy (an idle relay would otherwise carry 96 bytes of
/// settings that every connection of the pool has alike).
#[allow(clippy::too_many_arguments)]
pub fn relay<C, B>(
    client: C,
    client_prefix: Bytes,
    backend: B,
    backend_prefix: Bytes,
    config: impl Into<Arc<RelayConfig>>,
    stop: Option<Arc<StopHandle>>,
    counters: Option<Arc<RelayCounters>>,
) -> Relay<C, B>
where
    C: AsyncRead + AsyncWrite + Unpin,
    B: AsyncRead + AsyncWrite + Unpin,
{
    let config = config.into();
    let now = Instant::now();
    Relay {
        client,
        backend,
        up: Dir::new(Source::Client, client_prefix, config.max_message_size),
        down: Dir::new(Source::Backend, backend_prefix, config.max_message_size),
        next_ping: config.ping_interval.map(|i| now + i),
        config,
        stop,
        timer: None,
        last_data: now,
        ping: PingState::Idle,
        close_deadline: None,
        outcome: None,
        counters,
        deadline: None,
    }
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum PingState {
    Idle,
    /// A Ping is queued for injection.
    Queued([u8; PING_TOKEN_LEN]),
    /// A Ping was written; its Pong is due by the deadline.
    Sent([u8; PING_TOKEN_LEN], Instant),
}

impl PingState {
    /// The token a Pong must echo to be consumed.
    fn token(self) -> Option<[u8; PING_TOKEN_LEN]> {
        match self {
            PingState::Idle => None,
            PingState::Queued(t) | PingState::Sent(t, _) => Some(t),
        }
    }
}

/// The relay future for one connection (see [`relay`]).
pub struct Relay<C, B> {
    client: C,
    backend: B,
    /// Client to backend.
    up: Dir,
    /// Backend to client.
    down: Dir,
    config: Arc<RelayConfig>,
    stop: Option<Arc<StopHandle>>,
    /// Allocated the first time a deadline exists (pools without timeouts
    /// never pay for one); armed for the earliest deadline, which it holds
    /// (`Sleep::deadline`).
    timer: Option<Pin<Box<Sleep>>>,
    last_data: Instant,
    next_ping: Option<Instant>,
    ping: PingState,
    close_deadline: Option<Instant>,
    outcome: Option<(Initiator, Option<u16>, EndReason)>,
    counters: Option<Arc<RelayCounters>>,
    /// When berth closes the connection itself (see [`Relay::with_deadline`]).
    /// Boxed: only some connections have one (an authenticated WebSocket),
    /// and every idle relay would otherwise carry its 40 bytes.
    deadline: Option<Box<Deadline>>,
}

impl<C, B> Relay<C, B> {
    /// Ends the connection at `deadline` if nothing ends it before, as its
    /// [`Deadline::ending`] says (through the same [`Ending`] rules as every
    /// end berth decides on): its Close goes to the client and, masked, to
    /// the backend, each at a frame boundary, and `close_timeout` bounds
    /// the rest.
    pub fn with_deadline(mut self, deadline: Option<Deadline>) -> Self {
        self.deadline = deadline.map(Box::new);
        self
    }
}

impl<C, B> Future for Relay<C, B>
where
    C: AsyncRead + AsyncWrite + Unpin,
    B: AsyncRead + AsyncWrite + Unpin,
{
    type Output = RelayOutcome;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<RelayOutcome> {
        let this = &mut *self;
        SCRATCH.with(|cell| match cell.try_borrow_mut() {
            Ok(mut scratch) => this.poll_relay(cx, &mut scratch),
            // Unreachable in practice (polls do not nest); a small stack
            // buffer keeps the relay correct if it ever happens.
            Err(_) => this.poll_relay(cx, &mut [0u8; 2048]),
        })
    }
}

impl<C, B> Relay<C, B>
where
    C: AsyncRead + AsyncWrite + Unpin,
    B: AsyncRead + AsyncWrite + Unpin,
{
    fn poll_relay(&mut self, cx: &mut Context<'_>, scratch: &mut [u8]) -> Poll<RelayOutcome> {
        // Once per poll: a stop that comes later wakes the task.
        if let Some(stop) = self.stop.as_ref() {
            if let Some(reason) = stop.poll(cx) {
                self.stop = None;
                self.end(reason.ending());
            }
        }
        loop {
            if self.poll_timers(cx) {
                return Poll::Ready(self.finish());
            }

            // Backend to client first, so that when both sides finish in the
            // same poll the client (berth's server side) is closed first.
            let mut report = Report::default();
            let down_changed = poll_dir(
                cx,
                &mut self.down,
                &mut self.backend,
                &mut self.client,
                scratch,
                self.ping.token(),
                self.counters.as_deref().map(|c| &c.backend_to_client),
                &mut report,
            );
            self.on_report(&report, Source::Backend);
            let mut report = Report::default();
            let up_changed = poll_dir(
                cx,
                &mut self.up,
                &mut self.client,
                &mut self.backend,
                scratch,
                self.ping.token(),
                self.counters.as_deref().map(|c| &c.client_to_backend),
                &mut report,
            );
            self.on_report(&report, Source::Client);
            self.settle();
            if self.up.finished() && self.down.finished() {
                return Poll::Ready(self.finish());
            }
            // A stall that just began needs the timer armed: go round once
            // more (the next pass arms it).
            let stalled = self.config.send_timeout.is_some()
                && (self.up.track_stall() | self.down.track_stall());
            // Both directions wait on their sockets' wakers unless one
            // changed (then the rules above may have queued a Close or a
            // half-close for either, and both are polled again).
            if !down_changed && !up_changed && !stalled {
                return Poll::Pending;
            }
        }
    }

    /// Reacts to what a direction saw in its latest read.
    fn on_report(&mut self, report: &Report, from: Source) {
        // Reading the clock is only worth it when something waits on it.
        if report.data && self.config.idle_timeout.is_some() {
            self.last_data = Instant::now();
        }
        if report.ping_written {
            if let PingState::Queued(token) = self.ping {
                self.ping = PingState::Sent(token, Instant::now() + self.config.pong_timeout);
            }
        }
        if report.pong_consumed {
            self.ping = PingState::Idle;
        }
        if report.error.is_some() {
            // RFC 6455 §7.4.1: 1002 to both ends.
            let reason = match from {
                Source::Client => "protocol error from client",
                Source::Backend => "protocol error from backend",
            };
            self.end(Ending::close_both(
                EndReason::ProtocolError,
                close_code::PROTOCOL_ERROR,
                reason,
            ));
        }
        if report.too_big {
            // The sender and the other peer both get 1009 (RFC 6455 §7.4.1).
            self.end(Ending::close_both(
                EndReason::MessageTooBig(from),
                close_code::MESSAGE_TOO_BIG,
                "message too big",
            ));
        }
    }

    /// Applies the rules that follow from the directions' state.
    fn settle(&mut self) {
        // Record who spoke first.
        if self.outcome.is_none() {
            if self.up.p.close_seen() {
                self.outcome = Some((Initiator::Client, self.up.p.close_code(), EndReason::Peer));
            } else if self.down.p.close_seen() {
                let code = self.down.p.close_code();
                self.outcome = Some((Initiator::Backend, code, EndReason::Peer));
            } else if self.up.eof {
                self.outcome = Some((Initiator::Client, None, EndReason::Peer));
            } else if self.down.eof {
                self.outcome = Some((Initiator::Backend, None, EndReason::Peer));
            }
        }
        // A stream that ended without Close: tell the other peer (1014 when
        // the backend vanished, 1001 when the client did), then pass the
        // half-close on. Nothing can be injected mid-frame; then only the
        // FIN is passed on.
        let up_closed = self.up.p.close_seen();
        let down_closed = self.down.p.close_seen();
        for (dir, other_closed) in [(&mut self.down, up_closed), (&mut self.up, down_closed)] {
            if dir.eof && !dir.want_shutdown && !dir.shut {
                if !dir.p.close_seen()
                    && !dir.p.is_discarding()
                    && !other_closed
                    && dir.p.at_boundary()
                    && dir.p.queued().is_none()
                    && !dir.p.close_queued()
                {
                    match dir.p.source() {
                        Source::Backend => dir.queue_close(
                            close_code::BAD_GATEWAY,
                            "backend connection lost",
                            false,
                        ),
                        Source::Client => {
                            dir.queue_close(close_code::GOING_AWAY, "client connection lost", false)
                        }
                    }
                }
                dir.want_shutdown = true;
                if self.close_deadline.is_none() {
                    self.close_deadline = Some(Instant::now() + self.config.close_timeout);
                }
            }
        }
        // Both Close frames relayed: the closing handshake is complete.
        if self.up.p.close_seen() && self.down.p.close_seen() {
            for dir in [&mut self.up, &mut self.down] {
                dir.eof = true;
                dir.want_shutdown = true;
            }
        }
        // berth closed a destination and the source answered (or the stream
        // can no longer be parsed): stop reading it.
        for dir in [&mut self.up, &mut self.down] {
            if dir.p.is_discarding() && (dir.p.close_seen() || dir.p.is_broken()) {
                dir.eof = true;
                dir.want_shutdown = true;
            }
        }
        if self.up.p.close_seen() || self.down.p.close_seen() {
            self.arm_close_deadline();
        }
    }

    fn arm_close_deadline(&mut self) {
        if self.close_deadline.is_none() {
            self.close_deadline = Some(Instant::now() + self.config.close_timeout);
        }
    }

    /// berth ends the connection itself, as `ending` says: a peer to be
    /// closed gets a Close at its next frame boundary (masked towards the
    /// backend) and the closing handshake; a peer to be dropped is neither
    /// read nor written again. The first ending decides the outcome.
    fn end(&mut self, ending: Ending) {
        if self.outcome.is_none() {
            self.outcome = Some((Initiator::Internal, ending.code(), ending.reason));
        }
        self.ping = PingState::Idle;
        self.next_ping = None;
        // A dropped peer's direction stops; what was on its way to it goes.
        if ending.client == PeerEnd::Drop {
            self.up.source_dropped();
            self.down.destination_failed();
        }
        if ending.backend == PeerEnd::Drop {
            self.down.source_dropped();
            self.up.destination_failed();
        }
        // A direction gets berth's Close unless it already has one or its
        // destination is gone; a direction that stopped forwarding (a
        // protocol error in its stream) still gets it. A queued Ping gives
        // way to the Close. A direction whose source was dropped mid-frame
        // can never reach a boundary again: it gets only the FIN.
        for (dir, end) in [
            (&mut self.down, ending.client),
            (&mut self.up, ending.backend),
        ] {
            if let PeerEnd::Close(code, text) = end {
                let stuck = dir.eof && !dir.p.at_boundary();
                if !dir.p.close_queued() && !dir.shut && !dir.want_shutdown && !stuck {
                    dir.queue_close(code, text, true);
                }
            }
        }
        // Towards the peer that stays, the dropped one's direction ends
        // once berth's Close is written.
        if ending.client == PeerEnd::Drop {
            self.up.want_shutdown = true;
        }
        if ending.backend == PeerEnd::Drop {
            self.down.want_shutdown = true;
        }
        self.arm_close_deadline();
    }

    /// Fires due timers and arms the one timer for the earliest deadline.
    /// Returns true when the connection must be dropped now.
    fn poll_timers(&mut self, cx: &mut Context<'_>) -> bool {
        // Nothing to time (no idle timeout, no heartbeats, not closing):
        // skip the clock entirely, the common case on the hot path.
        if self.config.idle_timeout.is_none()
            && self.next_ping.is_none()
            && self.close_deadline.is_none()
            && self.ping == PingState::Idle
            && self.up.stall.is_none()
            && self.down.stall.is_none()
            && self.deadline.is_none()
        {
            return false;
        }
        let now = Instant::now();
        if self.close_deadline.is_some_and(|d| now >= d) {
            if self.outcome.is_none() {
                self.outcome = Some((Initiator::Internal, None, EndReason::Peer));
            }
            return true;
        }
        if let PingState::Sent(_, due) = self.ping {
            if now >= due {
                self.heartbeat_failed();
            }
        }
        if let Some(limit) = self.config.send_timeout {
            // A stuck client is dropped and the backend told why; a stuck
            // backend is dropped and the client told it failed.
            if self.down.stall.is_some_and(|since| now >= since + limit) {
                self.end(Ending {
                    reason: EndReason::SendTimeout(Source::Client),
                    client: PeerEnd::Drop,
                    backend: PeerEnd::Close(close_code::GOING_AWAY, "client unresponsive"),
                });
            }
            if self.up.stall.is_some_and(|since| now >= since + limit) {
                self.end(Ending {
                    reason: EndReason::SendTimeout(Source::Backend),
                    client: PeerEnd::Close(close_code::BAD_GATEWAY, "backend unresponsive"),
                    backend: PeerEnd::Drop,
                });
            }
        }
        if let Some(d) = self.deadline.take_if(|d| now >= d.at) {
            // A connection already closing ends as it was going to.
            if self.close_deadline.is_none() {
                self.end(d.ending());
            }
        }
        if let (Some(idle), None) = (self.config.idle_timeout, self.close_deadline) {
            if now >= self.last_data + idle {
                self.end(Ending::close_both(
                    EndReason::IdleTimeout,
                    close_code::GOING_AWAY,
                    "idle timeout",
                ));
            }
        }
        if let (Some(at), Some(interval)) = (self.next_ping, self.config.ping_interval) {
            if now >= at && self.close_deadline.is_none() {
                self.next_ping = Some(now + interval);
                if self.ping == PingState::Idle && self.down.p.queued().is_none() {
                    let token: [u8; PING_TOKEN_LEN] = rand::random();
                    // Towards the client: no masking key.
                    self.down.p.queue(Inject::Ping(token), [0; 4], false);
                    self.ping = PingState::Queued(token);
                }
            }
        }

        let mut next = self.close_deadline;
        let mut consider = |t: Option<Instant>| {
            if let Some(t) = t {
                next = Some(next.map_or(t, |n: Instant| n.min(t)));
            }
        };
        if self.close_deadline.is_none() {
            consider(self.config.idle_timeout.map(|i| self.last_data + i));
            consider(self.next_ping);
            consider(self.deadline.as_ref().map(|d| d.at));
        }
        if let PingState::Sent(_, due) = self.ping {
            consider(Some(due));
        }
        if let Some(limit) = self.config.send_timeout {
            consider(self.up.stall.map(|since| since + limit));
            consider(self.down.stall.map(|since| since + limit));
        }
        if let Some(at) = next {
            let timer = self
                .timer
                .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(at)));
            if timer.deadline() != at {
                timer.as_mut().reset(at);
            }
            if timer.as_mut().poll(cx).is_ready() {
                // Due already: come round again at once.
                cx.waker().wake_by_ref();
            }
        }
        false
    }

    /// No Pong in time: the client is dead. The backend gets Close 1001 and
    /// the client's TCP connection is dropped without another word.
    fn heartbeat_failed(&mut self) {
        self.end(Ending {
            reason: EndReason::HeartbeatFailure,
            client: PeerEnd::Drop,
            backend: PeerEnd::Close(close_code::GOING_AWAY, "client unresponsive"),
        });
    }

    fn finish(&mut self) -> RelayOutcome {
        let (initiator, code, reason) =
            self.outcome
                .unwrap_or((Initiator::Internal, None, EndReason::Peer));
        RelayOutcome {
            client_to_backend: self.up.stats,
            backend_to_client: self.down.stats,
            initiator,
            code,
            reason,
        }
    }

    /// Bytes waiting for each destination and the capacity held for them:
    /// `[(client to backend), (backend to client)]` as `(pending, capacity)`.
    #[cfg(test)]
    pub(super) fn buffered(&self) -> [(usize, usize); 2] {
        [&self.up.out, &self.down.out].map(|o| {
            o.pending
                .as_ref()
                .map_or((0, 0), |p| (p.buf.len() - p.pos, p.buf.capacity()))
        })
    }
}
