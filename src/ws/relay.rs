//! The frame-aware relay between a client and a backend after the `101`.
//!
//! One task per connection runs [`relay`], a single future that moves bytes
//! both ways. It parses frame headers as they pass (never copying or
//! unmasking payloads it does not need), so it always knows where the next
//! frame boundary is. That lets it count frames and messages, see Close
//! frames and their codes, and inject its own control frames (Close, Ping)
//! only between frames.
//!
//! Memory: bytes are read into a per-thread scratch buffer only when a socket
//! is readable and written straight on. Only bytes the destination could not
//! take yet are copied into a per-connection buffer, which is freed as soon
//! as it drains, so an idle connection holds no relay buffer.
//!
//! Ending (RFC 6455 §7): a Close from either end is relayed, and once both
//! Close frames have passed berth closes TCP towards the client first. When a
//! peer's TCP stream ends without a Close, the other peer gets one from berth
//! (1014 towards the client when the backend vanished, 1001 towards the
//! backend when the client did). Idle timeouts, failed heartbeats, drains,
//! shutdown and protocol errors make berth close both sides itself. No end
//! waits longer than `close_timeout`.

use std::cell::RefCell;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::Arc;

use futures_util::task::AtomicWaker;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::{Instant, Sleep};

use crate::metrics::{opcode_index, DirCounters, RelayCounters};

use super::frame::{self, close_code, opcode, ControlFrame, FrameHeader, MAX_HEADER_LEN};

/// Size of the per-thread read buffer.
const SCRATCH_LEN: usize = 32 * 1024;

/// Length of the Ping payload berth uses to recognize its own Pongs.
const PING_TOKEN_LEN: usize = 8;

thread_local! {
    /// Shared read buffer: borrowed only inside one poll, never across awaits.
    static SCRATCH: RefCell<Box<[u8]>> = RefCell::new(vec![0u8; SCRATCH_LEN].into_boxed_slice());
}

/// Per-pool timing of a relayed connection.
#[derive(Clone, Copy, Debug)]
pub struct RelayConfig {
    pub idle_timeout: Option<Duration>,
    pub ping_interval: Option<Duration>,
    pub pong_timeout: Duration,
    pub close_timeout: Duration,
}

/// Why berth itself asks a connection to end.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StopReason {
    /// The backend is being drained or was removed: Close 1012.
    Drain,
    /// berth is shutting down: Close 1001.
    Shutdown,
}

/// A connection's stop switch, shared with whoever may end it on purpose
/// (the drain and shutdown controllers in `crate::drain`). Checking it is an
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
        };
        if self
            .state
            .compare_exchange(0, code, Ordering::AcqRel, Ordering::Acquire)
            .is_ok()
        {
            self.waker.wake();
        }
    }

    fn reason(&self) -> Option<StopReason> {
        match self.state.load(Ordering::Acquire) {
            0 => None,
            1 => Some(StopReason::Drain),
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

/// Relays between `client` and `backend` until both directions are finished.
///
/// `*_prefix` are bytes already read from each side during the handshake;
/// they are relayed before anything else.
#[allow(clippy::too_many_arguments)]
pub fn relay<C, B>(
    client: C,
    client_prefix: Bytes,
    backend: B,
    backend_prefix: Bytes,
    config: RelayConfig,
    stop: Option<Arc<StopHandle>>,
    counters: Option<Arc<RelayCounters>>,
) -> Relay<C, B>
where
    C: AsyncRead + AsyncWrite + Unpin,
    B: AsyncRead + AsyncWrite + Unpin,
{
    let now = Instant::now();
    Relay {
        client,
        backend,
        up: Dir::new(Side::Client, client_prefix),
        down: Dir::new(Side::Backend, backend_prefix),
        config,
        stop,
        timer: None,
        timer_at: None,
        last_data: now,
        next_ping: config.ping_interval.map(|i| now + i),
        ping: PingState::Idle,
        close_deadline: None,
        outcome: None,
        counters,
    }
}

/// Which peer a direction reads from.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Side {
    Client,
    Backend,
}

/// What happens to the frame being read.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Action {
    Forward,
    /// Parsed (to find Close frames) but not written: berth already closed
    /// this direction's destination.
    Drop,
    /// A Pong that may answer berth's own Ping: held back until its payload
    /// is known.
    Hold,
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum PingState {
    Idle,
    /// A Ping is queued for injection.
    Queued([u8; PING_TOKEN_LEN]),
    /// A Ping was written; its Pong is due by the deadline.
    Sent([u8; PING_TOKEN_LEN], Instant),
}

/// A control frame berth will write at the next frame boundary. Encoded
/// only when written (masked towards the backend), so a queued one is small.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Inject {
    Close { code: u16, reason: &'static str },
    Ping([u8; PING_TOKEN_LEN]),
}

/// Frame tracking for one direction: everything the chunk processor needs
/// except the output.
struct Parse {
    side: Side,
    /// A header split across reads (not yet written anywhere).
    hdr: [u8; MAX_HEADER_LEN],
    hdr_len: u8,
    /// Payload bytes of the current frame still to come.
    remaining: u64,
    /// Payload bytes of the current frame already seen.
    offset: u64,
    cur: Option<FrameHeader>,
    action: Action,
    /// First two payload bytes of a Close frame, unmasked.
    close_buf: [u8; 2],
    /// A held Pong: header and (masked) payload as received.
    held: [u8; MAX_HEADER_LEN + PING_TOKEN_LEN],
    held_len: u8,
    /// The stream can no longer be parsed (protocol error): bytes are dropped.
    broken: bool,
    /// A control frame to write at the next frame boundary.
    inject: Option<Inject>,
    /// After `inject` is written, drop this direction's frames.
    discard_after_inject: bool,
    /// berth has queued (or written) its own Close towards the destination:
    /// never a second one.
    close_queued: bool,
    /// Frames from the source are parsed but not written.
    discard: bool,
    /// A Close frame from the source has been seen in full.
    close_seen: bool,
    close_code: Option<u16>,
    stats: DirStats,
    /// Frames per opcode not yet added to the shared counters.
    unflushed_frames: [u32; 7],
    /// Bytes and messages not yet added to the shared counters.
    unflushed_bytes: u32,
    unflushed_messages: u32,
    /// A data frame header was seen since the timers last looked.
    saw_data: bool,
}

impl Parse {
    /// True when no frame is half-written to the destination, so a control
    /// frame may go out now. Headers still being collected, held Pongs and
    /// dropped frames have written nothing yet.
    fn at_boundary(&self) -> bool {
        self.broken || !(self.cur.is_some() && self.action == Action::Forward && self.remaining > 0)
    }
}

/// Bytes on their way to a destination that could not take them yet.
#[derive(Default)]
struct OutState {
    /// Empty (unallocated) whenever the destination keeps up.
    pending: Vec<u8>,
    pending_pos: usize,
    /// Written but not flushed (TLS buffers records until flushed).
    needs_flush: bool,
}

impl OutState {
    fn has_pending(&self) -> bool {
        self.pending_pos < self.pending.len()
    }

    fn clear(&mut self) {
        self.pending = Vec::new();
        self.pending_pos = 0;
    }
}

/// One direction of the relay: reads from `p.side`, writes to the other peer.
struct Dir {
    p: Parse,
    out: OutState,
    /// Bytes read during the handshake, relayed first.
    prefix: Bytes,
    /// After pending bytes and injection, shut the destination's write side.
    want_shutdown: bool,
    /// The source is finished (EOF, error, or no longer read).
    eof: bool,
    /// The destination's write side is shut, or it is gone.
    shut: bool,
}

impl Dir {
    fn new(side: Side, prefix: Bytes) -> Dir {
        // The prefix is usually a view into the 8 KiB read buffer of the
        // HTTP connection that did the handshake (even when empty), which
        // would stay allocated for the life of the relay: keep an exact copy.
        let prefix = if prefix.is_empty() {
            Bytes::new()
        } else {
            Bytes::copy_from_slice(&prefix)
        };
        Dir {
            p: Parse {
                side,
                hdr: [0; MAX_HEADER_LEN],
                hdr_len: 0,
                remaining: 0,
                offset: 0,
                cur: None,
                action: Action::Forward,
                close_buf: [0; 2],
                held: [0; MAX_HEADER_LEN + PING_TOKEN_LEN],
                held_len: 0,
                broken: false,
                inject: None,
                discard_after_inject: false,
                close_queued: false,
                discard: false,
                close_seen: false,
                close_code: None,
                stats: DirStats::default(),
                unflushed_frames: [0; 7],
                unflushed_bytes: 0,
                unflushed_messages: 0,
                saw_data: false,
            },
            out: OutState::default(),
            prefix,
            want_shutdown: false,
            eof: false,
            shut: false,
        }
    }

    /// Nothing left to do in this direction.
    fn finished(&self) -> bool {
        self.eof && self.shut
    }

    /// The destination cannot be written any more (reset, broken pipe): its
    /// peer is gone, so stop writing to it.
    fn destination_failed(&mut self) {
        self.shut = true;
        self.p.discard = true;
        self.p.inject = None;
        self.out.clear();
    }

    /// Adds the traffic counted since the last flush to the shared counters
    /// (atomic adds on handles resolved once: no lock, no allocation).
    fn flush_counters(&mut self, counters: Option<&DirCounters>) {
        let p = &mut self.p;
        if let Some(c) = counters {
            if p.unflushed_bytes > 0 {
                c.bytes.inc_by(u64::from(p.unflushed_bytes));
            }
            if p.unflushed_messages > 0 {
                c.messages.inc_by(u64::from(p.unflushed_messages));
            }
            for (counter, n) in c.frames.iter().zip(p.unflushed_frames) {
                if n > 0 {
                    counter.inc_by(u64::from(n));
                }
            }
        }
        p.unflushed_bytes = 0;
        p.unflushed_messages = 0;
        p.unflushed_frames = [0; 7];
    }
}

/// Writes to a destination, stashing what it cannot take yet.
struct Out<'a, W> {
    dst: &'a mut W,
    state: &'a mut OutState,
    failed: bool,
}

impl<W: AsyncWrite + Unpin> Out<'_, W> {
    fn emit(&mut self, cx: &mut Context<'_>, mut bytes: &[u8]) {
        if bytes.is_empty() || self.failed {
            return;
        }
        if !self.state.has_pending() {
            while !bytes.is_empty() {
                match Pin::new(&mut *self.dst).poll_write(cx, bytes) {
                    Poll::Ready(Ok(0)) | Poll::Ready(Err(_)) => {
                        self.failed = true;
                        return;
                    }
                    Poll::Ready(Ok(n)) => {
                        self.state.needs_flush = true;
                        bytes = &bytes[n..];
                    }
                    Poll::Pending => break,
                }
            }
        }
        if !bytes.is_empty() {
            if !self.state.has_pending() {
                self.state.clear();
            }
            self.state.pending.extend_from_slice(bytes);
        }
    }
}

/// What processing a chunk asks the relay to do.
#[derive(Default)]
struct ChunkEvents {
    protocol_error: bool,
    /// berth's Ping was answered.
    pong_matched: bool,
    /// A Ping berth queued was written.
    ping_written: bool,
}

/// The relay future for one connection (see [`relay`]).
pub struct Relay<C, B> {
    client: C,
    backend: B,
    /// Client to backend.
    up: Dir,
    /// Backend to client.
    down: Dir,
    config: RelayConfig,
    stop: Option<Arc<StopHandle>>,
    /// Allocated the first time a deadline exists (pools without timeouts
    /// never pay for one).
    timer: Option<Pin<Box<Sleep>>>,
    timer_at: Option<Instant>,
    last_data: Instant,
    next_ping: Option<Instant>,
    ping: PingState,
    close_deadline: Option<Instant>,
    outcome: Option<(Initiator, Option<u16>, EndReason)>,
    counters: Option<Arc<RelayCounters>>,
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
        loop {
            if let Some(stop) = self.stop.as_ref() {
                if let Some(reason) = stop.poll(cx) {
                    self.stop = None;
                    let (code, text, end) = match reason {
                        StopReason::Drain => (
                            close_code::SERVICE_RESTART,
                            "service restart",
                            EndReason::Drained,
                        ),
                        StopReason::Shutdown => (
                            close_code::GOING_AWAY,
                            "server shutting down",
                            EndReason::Shutdown,
                        ),
                    };
                    self.proxy_close(code, text, close_code::GOING_AWAY, text, end);
                }
            }
            if self.poll_timers(cx) {
                return Poll::Ready(self.finish());
            }

            // Backend to client first, so that when both sides finish in the
            // same poll the client (berth's server side) is closed first.
            let (events, down_progress) = poll_dir(
                cx,
                &mut self.down,
                &mut self.backend,
                &mut self.client,
                scratch,
                self.ping,
                self.counters.as_deref().map(|c| &c.backend_to_client),
            );
            self.on_events(events, Side::Backend);
            let (events, up_progress) = poll_dir(
                cx,
                &mut self.up,
                &mut self.client,
                &mut self.backend,
                scratch,
                self.ping,
                self.counters.as_deref().map(|c| &c.client_to_backend),
            );
            self.on_events(events, Side::Client);
            self.settle();
            if self.up.finished() && self.down.finished() {
                return Poll::Ready(self.finish());
            }
            if !down_progress && !up_progress {
                return Poll::Pending;
            }
        }
    }

    /// Reacts to what a direction saw in its latest chunk.
    fn on_events(&mut self, events: ChunkEvents, from: Side) {
        if self.up.p.saw_data || self.down.p.saw_data {
            self.up.p.saw_data = false;
            self.down.p.saw_data = false;
            // Reading the clock is only worth it when something waits on it.
            if self.config.idle_timeout.is_some() {
                self.last_data = Instant::now();
            }
        }
        if events.ping_written {
            if let PingState::Queued(token) = self.ping {
                self.ping = PingState::Sent(token, Instant::now() + self.config.pong_timeout);
            }
        }
        if events.pong_matched {
            self.ping = PingState::Idle;
        }
        if events.protocol_error {
            // RFC 6455 §7.4.1: 1002 to both ends.
            let reason = match from {
                Side::Client => "protocol error from client",
                Side::Backend => "protocol error from backend",
            };
            self.proxy_close(
                close_code::PROTOCOL_ERROR,
                reason,
                close_code::PROTOCOL_ERROR,
                reason,
                EndReason::ProtocolError,
            );
        }
    }

    /// Applies the rules that follow from the directions' state.
    fn settle(&mut self) {
        // Record who spoke first.
        if self.outcome.is_none() {
            if self.up.p.close_seen {
                self.outcome = Some((Initiator::Client, self.up.p.close_code, EndReason::Peer));
            } else if self.down.p.close_seen {
                self.outcome = Some((Initiator::Backend, self.down.p.close_code, EndReason::Peer));
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
        let up_closed = self.up.p.close_seen;
        let down_closed = self.down.p.close_seen;
        for (dir, other_closed) in [(&mut self.down, up_closed), (&mut self.up, down_closed)] {
            if dir.eof && !dir.want_shutdown && !dir.shut {
                if !dir.p.close_seen && !dir.p.discard && !other_closed && dir.p.at_boundary() {
                    let frame = match dir.p.side {
                        Side::Backend => Inject::Close {
                            code: close_code::BAD_GATEWAY,
                            reason: "backend connection lost",
                        },
                        Side::Client => Inject::Close {
                            code: close_code::GOING_AWAY,
                            reason: "client connection lost",
                        },
                    };
                    if dir.p.inject.is_none() && !dir.p.close_queued {
                        dir.p.close_queued = true;
                        dir.p.inject = Some(frame);
                    }
                }
                dir.want_shutdown = true;
                if self.close_deadline.is_none() {
                    self.close_deadline = Some(Instant::now() + self.config.close_timeout);
                }
            }
        }
        // Both Close frames relayed: the closing handshake is complete.
        if self.up.p.close_seen && self.down.p.close_seen {
            for dir in [&mut self.up, &mut self.down] {
                dir.eof = true;
                dir.want_shutdown = true;
            }
        }
        // berth closed a destination and the source answered (or the stream
        // can no longer be parsed): stop reading it.
        for dir in [&mut self.up, &mut self.down] {
            if dir.p.discard && (dir.p.close_seen || dir.p.broken) {
                dir.eof = true;
                dir.want_shutdown = true;
            }
        }
        if self.up.p.close_seen || self.down.p.close_seen {
            self.arm_close_deadline();
        }
    }

    fn arm_close_deadline(&mut self) {
        if self.close_deadline.is_none() {
            self.close_deadline = Some(Instant::now() + self.config.close_timeout);
        }
    }

    /// berth ends the connection itself: Close to the client and a masked
    /// Close to the backend, each at its next frame boundary.
    fn proxy_close(
        &mut self,
        client_code: u16,
        client_reason: &'static str,
        backend_code: u16,
        backend_reason: &'static str,
        reason: EndReason,
    ) {
        if self.outcome.is_none() {
            self.outcome = Some((Initiator::Internal, Some(client_code), reason));
        }
        // A direction gets berth's Close unless it already has one or its
        // destination is gone; a direction that stopped forwarding (a
        // protocol error in its stream) still gets it.
        if !self.down.p.close_queued && !self.down.shut && !self.down.want_shutdown {
            self.down.p.close_queued = true;
            self.down.p.inject = Some(Inject::Close {
                code: client_code,
                reason: client_reason,
            });
            self.down.p.discard_after_inject = true;
        }
        if !self.up.p.close_queued && !self.up.shut && !self.up.want_shutdown {
            self.up.p.close_queued = true;
            self.up.p.inject = Some(Inject::Close {
                code: backend_code,
                reason: backend_reason,
            });
            self.up.p.discard_after_inject = true;
        }
        self.ping = PingState::Idle;
        self.next_ping = None;
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
        if let (Some(idle), None) = (self.config.idle_timeout, self.close_deadline) {
            if now >= self.last_data + idle {
                self.proxy_close(
                    close_code::GOING_AWAY,
                    "idle timeout",
                    close_code::GOING_AWAY,
                    "idle timeout",
                    EndReason::IdleTimeout,
                );
            }
        }
        if let (Some(at), Some(interval)) = (self.next_ping, self.config.ping_interval) {
            if now >= at && self.close_deadline.is_none() {
                self.next_ping = Some(now + interval);
                if self.ping == PingState::Idle && self.down.p.inject.is_none() {
                    let token: [u8; PING_TOKEN_LEN] = rand::random();
                    self.down.p.inject = Some(Inject::Ping(token));
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
        }
        if let PingState::Sent(_, due) = self.ping {
            consider(Some(due));
        }
        if let Some(at) = next {
            let timer = self
                .timer
                .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(at)));
            if self.timer_at != Some(at) {
                timer.as_mut().reset(at);
                self.timer_at = Some(at);
            }
            if timer.as_mut().poll(cx).is_ready() {
                // Due already: come round again at once.
                self.timer_at = None;
                cx.waker().wake_by_ref();
            }
        }
        false
    }

    /// No Pong in time: the client is dead. The backend gets Close 1001 and
    /// the client's TCP connection is dropped without another word.
    fn heartbeat_failed(&mut self) {
        if self.outcome.is_none() {
            self.outcome = Some((
                Initiator::Internal,
                Some(close_code::GOING_AWAY),
                EndReason::HeartbeatFailure,
            ));
        }
        self.ping = PingState::Idle;
        self.next_ping = None;
        // Stop reading the client and never write to it again.
        self.up.eof = true;
        self.up.p.discard = true;
        self.down.destination_failed();
        if !self.up.p.close_queued && !self.up.shut && !self.up.want_shutdown {
            self.up.p.close_queued = true;
            self.up.p.inject = Some(Inject::Close {
                code: close_code::GOING_AWAY,
                reason: "client unresponsive",
            });
        }
        self.up.want_shutdown = true;
        self.arm_close_deadline();
    }

    fn finish(&mut self) -> RelayOutcome {
        self.up
            .flush_counters(self.counters.as_deref().map(|c| &c.client_to_backend));
        self.down
            .flush_counters(self.counters.as_deref().map(|c| &c.backend_to_client));
        let (initiator, code, reason) =
            self.outcome
                .unwrap_or((Initiator::Internal, None, EndReason::Peer));
        RelayOutcome {
            client_to_backend: self.up.p.stats,
            backend_to_client: self.down.p.stats,
            initiator,
            code,
            reason,
        }
    }
}

/// Drives one direction as far as it can go without blocking.
/// Returns the chunk events and whether any progress was made.
fn poll_dir<R, W>(
    cx: &mut Context<'_>,
    dir: &mut Dir,
    src: &mut R,
    dst: &mut W,
    scratch: &mut [u8],
    ping: PingState,
    counters: Option<&DirCounters>,
) -> (ChunkEvents, bool)
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut events = ChunkEvents::default();
    let mut progress = false;
    if dir.finished() {
        return (events, false);
    }
    if !dir.shut {
        // 1. Bytes the destination could not take earlier go first.
        if dir.out.has_pending() {
            while dir.out.has_pending() {
                let rest = &dir.out.pending[dir.out.pending_pos..];
                match Pin::new(&mut *dst).poll_write(cx, rest) {
                    Poll::Ready(Ok(n)) if n > 0 => {
                        dir.out.pending_pos += n;
                        dir.out.needs_flush = true;
                        progress = true;
                    }
                    Poll::Ready(_) => {
                        dir.destination_failed();
                        return (events, true);
                    }
                    Poll::Pending => return (events, progress),
                }
            }
            // Drained: give the memory back so an idle connection holds none.
            dir.out.clear();
        }
        // 2. A control frame berth wants to write, if between frames.
        if dir.p.inject.is_some() && dir.p.at_boundary() {
            let mut out = Out {
                dst: &mut *dst,
                state: &mut dir.out,
                failed: false,
            };
            inject_now(cx, &mut dir.p, &mut out, ping, &mut events);
            progress = true;
            if out.failed {
                dir.destination_failed();
                return (events, true);
            }
            if dir.out.has_pending() {
                return (events, progress);
            }
        }
        // 3. Flush what was written.
        if dir.out.needs_flush {
            match Pin::new(&mut *dst).poll_flush(cx) {
                Poll::Ready(Ok(())) => dir.out.needs_flush = false,
                Poll::Ready(Err(_)) => {
                    dir.destination_failed();
                    return (events, true);
                }
                Poll::Pending => return (events, progress),
            }
        }
    }
    // 4. The source is done: pass the half-close on once all is written.
    if dir.eof {
        if dir.want_shutdown
            && !dir.shut
            && dir.p.inject.is_none()
            && Pin::new(&mut *dst).poll_shutdown(cx).is_ready()
        {
            dir.shut = true;
            progress = true;
        }
        return (events, progress);
    }
    // 5. Read once, if the source has something, and pass it on.
    let n = if !dir.prefix.is_empty() {
        let n = dir.prefix.len().min(scratch.len());
        let head = dir.prefix.split_to(n);
        scratch[..n].copy_from_slice(&head);
        if dir.prefix.is_empty() {
            dir.prefix = Bytes::new();
        }
        n
    } else {
        let mut buf = ReadBuf::new(scratch);
        match Pin::new(&mut *src).poll_read(cx, &mut buf) {
            Poll::Ready(Ok(())) => buf.filled().len(),
            // A reset reads as an abrupt end.
            Poll::Ready(Err(_)) => 0,
            Poll::Pending => return (events, progress),
        }
    };
    if n == 0 {
        dir.eof = true;
        return (events, true);
    }
    let chunk = &scratch[..n];
    dir.p.stats.bytes += n as u64;
    // A chunk is at most the scratch buffer (32 KiB), so this cannot overflow.
    dir.p.unflushed_bytes = dir.p.unflushed_bytes.saturating_add(n as u32);
    let mut out = Out {
        dst: &mut *dst,
        state: &mut dir.out,
        failed: false,
    };
    if dir.shut {
        // The destination is gone: keep parsing (to see a Close) but drop.
        dir.p.discard = true;
    }
    process_chunk(cx, &mut dir.p, &mut out, chunk, ping, &mut events);
    let failed = out.failed;
    dir.flush_counters(counters);
    if failed {
        dir.destination_failed();
    }
    (events, true)
}

/// Writes the queued control frame now (the caller checked the boundary).
fn inject_now<W: AsyncWrite + Unpin>(
    cx: &mut Context<'_>,
    p: &mut Parse,
    out: &mut Out<'_, W>,
    ping: PingState,
    events: &mut ChunkEvents,
) {
    let Some(inject) = p.inject.take() else {
        return;
    };
    // RFC 6455 §5.1/§5.3: frames towards the backend (read from the client)
    // are masked with a fresh key; frames towards the client are not.
    let mask = (p.side == Side::Client).then(rand::random::<[u8; 4]>);
    let frame = match inject {
        Inject::Close { code, reason } => ControlFrame::close(code, reason, mask),
        Inject::Ping(token) => ControlFrame::new(opcode::PING, &token, mask),
    };
    out.emit(cx, frame.as_bytes());
    if matches!(inject, Inject::Ping(_)) && matches!(ping, PingState::Queued(_)) {
        events.ping_written = true;
    }
    if p.discard_after_inject {
        p.discard = true;
        p.discard_after_inject = false;
    }
}

/// Passes one chunk through: parses headers, forwards, drops or holds frames,
/// and injects a queued control frame at the first boundary.
fn process_chunk<W: AsyncWrite + Unpin>(
    cx: &mut Context<'_>,
    p: &mut Parse,
    out: &mut Out<'_, W>,
    chunk: &[u8],
    ping: PingState,
    events: &mut ChunkEvents,
) {
    let n = chunk.len();
    let mut i = 0;
    // Start of the run of bytes to be written as they are.
    let mut run = 0;
    while i < n {
        if p.broken {
            out.emit(cx, &chunk[run..i]);
            return;
        }
        if p.remaining == 0 && p.held_len == 0 {
            // A new frame starts here (or its header continues).
            if p.hdr_len == 0 && p.inject.is_some() {
                out.emit(cx, &chunk[run..i]);
                run = i;
                inject_now(cx, p, out, ping, events);
            }
            let (header, from_chunk, stored) = if p.hdr_len == 0 {
                match frame::parse_header(&chunk[i..]) {
                    Ok(Some(h)) => (h, h.header_len, false),
                    Ok(None) => {
                        // Keep the partial header back until it is whole.
                        out.emit(cx, &chunk[run..i]);
                        let part = &chunk[i..];
                        p.hdr[..part.len()].copy_from_slice(part);
                        p.hdr_len = part.len() as u8;
                        return;
                    }
                    Err(_) => {
                        out.emit(cx, &chunk[run..i]);
                        fail(p, events);
                        return;
                    }
                }
            } else {
                // Complete a header that began in an earlier chunk.
                let mut len = usize::from(p.hdr_len);
                let start = i;
                loop {
                    let want = frame::header_len_hint(&p.hdr[..len]).unwrap_or(2);
                    if len >= want {
                        break;
                    }
                    if i >= n {
                        p.hdr_len = len as u8;
                        return;
                    }
                    let take = (want - len).min(n - i);
                    p.hdr[len..len + take].copy_from_slice(&chunk[i..i + take]);
                    len += take;
                    i += take;
                }
                match frame::parse_header(&p.hdr[..len]) {
                    Ok(Some(h)) => {
                        i = start;
                        (h, h.header_len - usize::from(p.hdr_len), true)
                    }
                    Ok(None) | Err(_) => {
                        p.hdr_len = 0;
                        fail(p, events);
                        return;
                    }
                }
            };
            // RFC 6455 §5.1: every client frame is masked.
            if p.side == Side::Client && header.mask.is_none() {
                out.emit(cx, &chunk[run..i]);
                p.hdr_len = 0;
                fail(p, events);
                return;
            }
            count_frame(p, &header);
            let action = if p.discard {
                Action::Drop
            } else if p.side == Side::Client
                && header.opcode == opcode::PONG
                && header.payload_len == PING_TOKEN_LEN as u64
                && matches!(ping, PingState::Sent(..) | PingState::Queued(_))
            {
                Action::Hold
            } else {
                Action::Forward
            };
            match action {
                Action::Forward => {
                    if stored {
                        out.emit(cx, &chunk[run..i]);
                        let whole = p.hdr;
                        out.emit(cx, &whole[..header.header_len]);
                        run = i + from_chunk;
                    }
                }
                Action::Drop => {
                    out.emit(cx, &chunk[run..i]);
                    run = i + from_chunk;
                }
                Action::Hold => {
                    out.emit(cx, &chunk[run..i]);
                    if stored {
                        let whole = p.hdr;
                        p.held[..header.header_len].copy_from_slice(&whole[..header.header_len]);
                    } else {
                        p.held[..header.header_len].copy_from_slice(&chunk[i..i + from_chunk]);
                    }
                    p.held_len = header.header_len as u8;
                    run = i + from_chunk;
                }
            }
            p.hdr_len = 0;
            i += from_chunk;
            p.cur = Some(header);
            p.action = action;
            p.remaining = header.payload_len;
            p.offset = 0;
            if p.remaining == 0 {
                end_frame(cx, p, out, ping, events);
            }
            continue;
        }
        // Payload bytes of the current frame.
        let take = usize::try_from(p.remaining).map_or(n - i, |r| r.min(n - i));
        let payload = &chunk[i..i + take];
        if let Some(h) = p.cur {
            if h.opcode == opcode::CLOSE && p.offset < 2 {
                for (k, byte) in payload.iter().take(2 - p.offset as usize).enumerate() {
                    let at = p.offset as usize + k;
                    let key = h.mask.map_or(0, |m| m[at & 3]);
                    p.close_buf[at] = byte ^ key;
                }
            }
        }
        match p.action {
            Action::Forward => {}
            Action::Drop => {
                out.emit(cx, &chunk[run..i]);
                run = i + take;
            }
            Action::Hold => {
                let at = usize::from(p.held_len);
                p.held[at..at + take].copy_from_slice(payload);
                p.held_len += take as u8;
                run = i + take;
            }
        }
        i += take;
        p.remaining -= take as u64;
        p.offset += take as u64;
        if p.remaining == 0 {
            end_frame(cx, p, out, ping, events);
        }
    }
    out.emit(cx, &chunk[run..n]);
}

/// Counts a frame whose header was just parsed.
fn count_frame(p: &mut Parse, header: &FrameHeader) {
    p.stats.frames += 1;
    p.unflushed_frames[opcode_index(header.opcode)] += 1;
    if header.is_data() {
        p.saw_data = true;
        if header.fin {
            p.stats.messages += 1;
            p.unflushed_messages += 1;
        }
    }
}

/// The current frame is complete.
fn end_frame<W: AsyncWrite + Unpin>(
    cx: &mut Context<'_>,
    p: &mut Parse,
    out: &mut Out<'_, W>,
    ping: PingState,
    events: &mut ChunkEvents,
) {
    let Some(h) = p.cur.take() else { return };
    if h.opcode == opcode::CLOSE {
        p.close_seen = true;
        // RFC 6455 §7.1.5: a Close without a code reads as 1005.
        p.close_code = Some(if h.payload_len >= 2 {
            u16::from_be_bytes(p.close_buf)
        } else {
            1005
        });
    }
    if p.action == Action::Hold {
        let held_len = usize::from(p.held_len);
        let mut token = [0u8; PING_TOKEN_LEN];
        token.copy_from_slice(&p.held[h.header_len..held_len]);
        if let Some(mask) = h.mask {
            frame::apply_mask(&mut token, mask, 0);
        }
        let ours = match ping {
            PingState::Sent(t, _) | PingState::Queued(t) => t == token,
            PingState::Idle => false,
        };
        if ours {
            events.pong_matched = true;
        } else {
            // Someone else's Pong: it goes on untouched.
            let held = p.held;
            out.emit(cx, &held[..held_len]);
        }
        p.held_len = 0;
    }
    p.action = Action::Forward;
}

/// The stream broke a framing rule: stop parsing it and close both sides.
fn fail(p: &mut Parse, events: &mut ChunkEvents) {
    p.broken = true;
    p.discard = true;
    events.protocol_error = true;
}

#[cfg(test)]
mod size_tests {
    /// Every idle connection holds one relay: keep it small (it was 1,200
    /// bytes before injected frames were stored compactly).
    #[test]
    fn relay_state_stays_small() {
        let size =
            std::mem::size_of::<super::Relay<tokio::net::TcpStream, tokio::net::TcpStream>>();
        assert!(size <= 800, "Relay grew to {size} bytes");
        assert!(std::mem::size_of::<super::Inject>() <= 24);
    }
}
