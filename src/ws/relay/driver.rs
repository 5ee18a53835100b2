//! The relay's I/O driver: the [`Relay`] future that owns both streams and
//! moves bytes through one [`FrameProcessor`] per direction.
//!
//! It owns what the processor must not: the sockets, the per-thread scratch
//! buffer, the pending-output buffer of a slow destination, the clock (one
//! lazily allocated timer for every deadline), randomness (Ping tokens and
//! masking keys), the [`StopHandle`], and the rules of how a connection
//! ends (see the parent module).

use std::cell::RefCell;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::{Instant, Sleep};

use super::processor::{FrameProcessor, Inject, Report, Sink, Source, PING_TOKEN_LEN};
use super::{DirStats, EndReason, Initiator, RelayConfig, RelayOutcome, StopHandle, StopReason};
use crate::metrics::{DirCounters, RelayCounters};
use crate::ws::frame::close_code;

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
        up: Dir::new(Source::Client, client_prefix),
        down: Dir::new(Source::Backend, backend_prefix),
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

/// A fresh masking key for a frame berth writes towards the backend (RFC
/// 6455 §5.3); frames towards the client are not masked.
fn mask_key(source: Source) -> [u8; 4] {
    match source {
        Source::Client => rand::random(),
        Source::Backend => [0; 4],
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

/// One direction of the relay: reads from the processor's source, writes to
/// the other peer.
struct Dir {
    p: FrameProcessor,
    out: OutState,
    /// Bytes read during the handshake, relayed first.
    prefix: Bytes,
    stats: DirStats,
    /// After pending bytes and injection, shut the destination's write side.
    want_shutdown: bool,
    /// The source is finished (EOF, error, or no longer read).
    eof: bool,
    /// The destination's write side is shut, or it is gone.
    shut: bool,
}

impl Dir {
    fn new(source: Source, prefix: Bytes) -> Dir {
        // The prefix is usually a view into the 8 KiB read buffer of the
        // HTTP connection that did the handshake (even when empty), which
        // would stay allocated for the life of the relay: keep an exact copy.
        let prefix = if prefix.is_empty() {
            Bytes::new()
        } else {
            Bytes::copy_from_slice(&prefix)
        };
        Dir {
            p: FrameProcessor::new(source),
            out: OutState::default(),
            prefix,
            stats: DirStats::default(),
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
        self.p.destination_gone();
        self.out.clear();
    }

    /// Queues berth's Close towards this direction's destination.
    fn queue_close(&mut self, code: u16, reason: &'static str, then_discard: bool) {
        let key = mask_key(self.p.source());
        self.p
            .queue(Inject::Close { code, reason }, key, then_discard);
    }

    /// Adds one read's traffic to the totals and to the shared counters
    /// (atomic adds on handles resolved once: no lock, no allocation).
    fn count(&mut self, bytes: usize, report: &Report, counters: Option<&DirCounters>) {
        let frames = report.frames_total();
        self.stats.bytes += bytes as u64;
        self.stats.frames += frames;
        self.stats.messages += u64::from(report.messages);
        if let Some(c) = counters {
            c.bytes.inc_by(bytes as u64);
            if report.messages > 0 {
                c.messages.inc_by(u64::from(report.messages));
                c.backend_messages
                    .fetch_add(u64::from(report.messages), Ordering::Relaxed);
            }
            if frames > 0 {
                for (counter, n) in c.frames.iter().zip(report.frames) {
                    if n > 0 {
                        counter.inc_by(u64::from(n));
                    }
                }
            }
        }
    }
}

/// Writes to a destination, stashing what it cannot take yet: the
/// processor's [`Sink`] inside one poll.
struct Out<'a, 'c, W> {
    cx: &'a mut Context<'c>,
    dst: &'a mut W,
    state: &'a mut OutState,
    failed: bool,
}

impl<W: AsyncWrite + Unpin> Out<'_, '_, W> {
    fn emit(&mut self, mut bytes: &[u8]) {
        if bytes.is_empty() || self.failed {
            return;
        }
        if !self.state.has_pending() {
            while !bytes.is_empty() {
                match Pin::new(&mut *self.dst).poll_write(self.cx, bytes) {
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

impl<W: AsyncWrite + Unpin> Sink for Out<'_, '_, W> {
    #[inline]
    fn forward(&mut self, bytes: &[u8]) {
        self.emit(bytes);
    }

    #[inline]
    fn stored(&mut self, bytes: &[u8]) {
        self.emit(bytes);
    }

    #[inline]
    fn inject(&mut self, frame: &[u8]) {
        self.emit(frame);
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
                    self.internal_close(code, text, close_code::GOING_AWAY, text, end);
                }
            }
            if self.poll_timers(cx) {
                return Poll::Ready(self.finish());
            }

            // Backend to client first, so that when both sides finish in the
            // same poll the client (berth's server side) is closed first.
            let pong = self.ping.token();
            let (report, down_progress) = poll_dir(
                cx,
                &mut self.down,
                &mut self.backend,
                &mut self.client,
                scratch,
                pong,
                self.counters.as_deref().map(|c| &c.backend_to_client),
            );
            self.on_report(&report, Source::Backend);
            let pong = self.ping.token();
            let (report, up_progress) = poll_dir(
                cx,
                &mut self.up,
                &mut self.client,
                &mut self.backend,
                scratch,
                pong,
                self.counters.as_deref().map(|c| &c.client_to_backend),
            );
            self.on_report(&report, Source::Client);
            self.settle();
            if self.up.finished() && self.down.finished() {
                return Poll::Ready(self.finish());
            }
            if !down_progress && !up_progress {
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
            self.internal_close(
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

    /// berth ends the connection itself: Close to the client and a masked
    /// Close to the backend, each at its next frame boundary.
    fn internal_close(
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
        // protocol error in its stream) still gets it. A queued Ping gives
        // way to the Close.
        if !self.down.p.close_queued() && !self.down.shut && !self.down.want_shutdown {
            self.down.queue_close(client_code, client_reason, true);
        }
        if !self.up.p.close_queued() && !self.up.shut && !self.up.want_shutdown {
            self.up.queue_close(backend_code, backend_reason, true);
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
                self.internal_close(
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
        self.up.p.discard();
        self.down.destination_failed();
        if !self.up.p.close_queued() && !self.up.shut && !self.up.want_shutdown {
            self.up
                .queue_close(close_code::GOING_AWAY, "client unresponsive", false);
        }
        self.up.want_shutdown = true;
        self.arm_close_deadline();
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
        [&self.up.out, &self.down.out]
            .map(|o| (o.pending.len() - o.pending_pos, o.pending.capacity()))
    }
}

/// Drives one direction as far as it can go without blocking.
/// Returns what the processor reported and whether any progress was made.
fn poll_dir<R, W>(
    cx: &mut Context<'_>,
    dir: &mut Dir,
    src: &mut R,
    dst: &mut W,
    scratch: &mut [u8],
    pong: Option<[u8; PING_TOKEN_LEN]>,
    counters: Option<&DirCounters>,
) -> (Report, bool)
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut report = Report::default();
    let mut progress = false;
    if dir.finished() {
        return (report, false);
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
                        return (report, true);
                    }
                    Poll::Pending => return (report, progress),
                }
            }
            // Drained: give the memory back so an idle connection holds none.
            dir.out.clear();
        }
        // 2. A control frame berth wants to write, if between frames.
        if dir.p.queued().is_some() && dir.p.at_boundary() {
            let mut out = Out {
                cx: &mut *cx,
                dst: &mut *dst,
                state: &mut dir.out,
                failed: false,
            };
            if let Some(Inject::Ping(_)) = dir.p.inject_at_boundary(&mut out) {
                report.ping_written = true;
            }
            progress = true;
            if out.failed {
                dir.destination_failed();
                return (report, true);
            }
            if dir.out.has_pending() {
                return (report, progress);
            }
        }
        // 3. Flush what was written.
        if dir.out.needs_flush {
            match Pin::new(&mut *dst).poll_flush(cx) {
                Poll::Ready(Ok(())) => dir.out.needs_flush = false,
                Poll::Ready(Err(_)) => {
                    dir.destination_failed();
                    return (report, true);
                }
                Poll::Pending => return (report, progress),
            }
        }
    }
    // 4. The source is done: pass the half-close on once all is written.
    if dir.eof {
        if dir.want_shutdown
            && !dir.shut
            && dir.p.queued().is_none()
            && Pin::new(&mut *dst).poll_shutdown(cx).is_ready()
        {
            dir.shut = true;
            progress = true;
        }
        return (report, progress);
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
            Poll::Pending => return (report, progress),
        }
    };
    if n == 0 {
        dir.eof = true;
        return (report, true);
    }
    if dir.shut {
        // The destination is gone: keep parsing (to see a Close) but drop.
        dir.p.discard();
    }
    let mut out = Out {
        cx,
        dst: &mut *dst,
        state: &mut dir.out,
        failed: false,
    };
    let read = dir.p.feed(&scratch[..n], pong, &mut out);
    let failed = out.failed;
    report.merge(&read);
    dir.count(n, &read, counters);
    if failed {
        dir.destination_failed();
    }
    (report, true)
}
