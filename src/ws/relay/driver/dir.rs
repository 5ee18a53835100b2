//! One direction of the relay, for the driver: the processor, the bytes
//! held for a destination that could not take them yet (allocated only
//! then, freed once drained), the stall clock of `send_timeout`, and
//! [`poll_dir`], which moves that direction as far as it can go without
//! blocking. It owns no task: the driver polls it.

use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::task::{Context, Poll};

use bytes::Bytes;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::Instant;

use crate::metrics::DirCounters;
use crate::ws::relay::processor::{FrameProcessor, Inject, Report, Sink, Source, PING_TOKEN_LEN};
use crate::ws::relay::DirStats;

/// A fresh masking key for a frame berth writes towards the backend (RFC
/// 6455 §5.3); frames towards the client are not masked.
pub(super) fn mask_key(source: Source) -> [u8; 4] {
    match source {
        Source::Client => rand::random(),
        Source::Backend => [0; 4],
    }
}

/// Bytes on their way to a destination that could not take them yet.
#[derive(Default)]
pub(super) struct OutState {
    /// `None` whenever the destination keeps up (boxed: every idle relay
    /// would otherwise carry an empty buffer and its position, 32 bytes
    /// per direction).
    pub(super) pending: Option<Box<Pending>>,
    /// Written but not flushed (TLS buffers records until flushed).
    needs_flush: bool,
    /// The destination took some bytes since the last look (for
    /// `send_timeout`).
    accepted: bool,
}

/// The held bytes: `buf[pos..]` are still to be written.
#[derive(Default)]
pub(super) struct Pending {
    pub(super) buf: Vec<u8>,
    pub(super) pos: usize,
}

impl OutState {
    fn has_pending(&self) -> bool {
        self.pending.as_ref().is_some_and(|p| p.pos < p.buf.len())
    }

    /// berth holds bytes the destination has not taken: in the pending
    /// buffer, or written into the stream but not yet flushed out of it.
    fn holding(&self) -> bool {
        self.has_pending() || self.needs_flush
    }

    fn clear(&mut self) {
        self.pending = None;
    }
}

/// One direction of the relay: reads from the processor's source, writes to
/// the other peer.
pub(super) struct Dir {
    pub(super) p: FrameProcessor,
    pub(super) out: OutState,
    /// Bytes read during the handshake, relayed first. Boxed, and gone once
    /// relayed: most clients wait for the `101` before they send, so most
    /// relays never have one, and every idle relay would otherwise carry
    /// an empty `Bytes` (32 bytes) per direction.
    prefix: Option<Box<Bytes>>,
    pub(super) stats: DirStats,
    /// After pending bytes and injection, shut the destination's write side.
    pub(super) want_shutdown: bool,
    /// The source is finished (EOF, error, or no longer read).
    pub(super) eof: bool,
    /// The destination's write side is shut, or it is gone.
    pub(super) shut: bool,
    /// Since when berth has held bytes for the destination without it
    /// accepting any (tracked only with `send_timeout`).
    pub(super) stall: Option<Instant>,
}

impl Dir {
    pub(super) fn new(source: Source, prefix: Bytes, max_message: Option<u64>) -> Dir {
        // The prefix is usually a view into the 8 KiB read buffer of the
        // HTTP connection that did the handshake (even when empty), which
        // would stay allocated for the life of the relay: keep an exact copy.
        let prefix = if prefix.is_empty() {
            None
        } else {
            Some(Box::new(Bytes::copy_from_slice(&prefix)))
        };
        Dir {
            p: FrameProcessor::with_max_message(source, max_message),
            out: OutState::default(),
            prefix,
            stats: DirStats::default(),
            want_shutdown: false,
            eof: false,
            shut: false,
            stall: None,
        }
    }

    /// Nothing left to do in this direction.
    pub(super) fn finished(&self) -> bool {
        self.eof && self.shut
    }

    /// The destination cannot be written any more (reset, broken pipe): its
    /// peer is gone, so stop writing to it.
    pub(super) fn destination_failed(&mut self) {
        self.shut = true;
        self.stall = None;
        self.p.destination_gone();
        self.out.clear();
    }

    /// Queues berth's Close towards this direction's destination.
    pub(super) fn queue_close(&mut self, code: u16, reason: &'static str, then_discard: bool) {
        let key = mask_key(self.p.source());
        self.p
            .queue(Inject::Close { code, reason }, key, then_discard);
    }

    /// The source is dropped: it is not read again, and what it sent is
    /// not written on.
    pub(super) fn source_dropped(&mut self) {
        self.eof = true;
        self.p.discard();
    }

    /// Updates the stall clock after a poll (with `send_timeout` only).
    /// Returns true when a stall began.
    pub(super) fn track_stall(&mut self) -> bool {
        let accepted = std::mem::take(&mut self.out.accepted);
        if self.shut || !self.out.holding() {
            self.stall = None;
            false
        } else if accepted || self.stall.is_none() {
            let began = self.stall.is_none();
            self.stall = Some(Instant::now());
            began
        } else {
            false
        }
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
                        self.state.accepted = true;
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
            self.state
                .pending
                .get_or_insert_with(Box::default)
                .buf
                .extend_from_slice(bytes);
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

/// The sink of a direction whose destination is gone.
struct Dropped;

impl Sink for Dropped {
    fn forward(&mut self, _: &[u8]) {}
    fn stored(&mut self, _: &[u8]) {}
    fn inject(&mut self, _: &[u8]) {}
}

/// Reads one direction may make in a row before the driver gives the other
/// direction a turn (a source that never runs dry must not starve it).
const READS_PER_TURN: usize = 8;

/// Drives one direction as far as it can go without blocking: reads,
/// relays and reads again until its source (or its destination) has
/// nothing more for now. Adds what the processor saw to `report` (and the
/// traffic to the counters, once per call) and returns whether the
/// direction changed in a way the driver must react to (an end of
/// stream, a failed destination, berth's frame written, a Close seen, a
/// report that needs a reaction) or stopped to let the other direction
/// have a turn: then the driver polls both again. Otherwise the direction
/// waits on its sockets' wakers, and polling it again now would only find
/// that out once more.
#[allow(clippy::too_many_arguments)]
pub(super) fn poll_dir<R, W>(
    cx: &mut Context<'_>,
    dir: &mut Dir,
    src: &mut R,
    dst: &mut W,
    scratch: &mut [u8],
    pong: Option<[u8; PING_TOKEN_LEN]>,
    counters: Option<&DirCounters>,
    report: &mut Report,
) -> bool
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut bytes = 0;
    let mut changed = true;
    for _ in 0..READS_PER_TURN {
        match step(cx, dir, src, dst, scratch, pong, report, &mut bytes) {
            Step::Waiting => {
                changed = false;
                break;
            }
            Step::Changed => break,
            Step::Relayed => {}
        }
    }
    if bytes > 0 {
        dir.count(bytes, report, counters);
    }
    changed
}

/// How one [`step`] ended.
enum Step {
    /// Nothing more to do until a waker fires or the other direction or the
    /// driver changes something.
    Waiting,
    /// Bytes were read and relayed, nothing else changed: read again.
    Relayed,
    /// Something the driver must react to.
    Changed,
}

/// One turn of a direction: pending bytes, a queued frame of berth's, a
/// flush, the half-close, then at most one read.
#[allow(clippy::too_many_arguments)]
fn step<R, W>(
    cx: &mut Context<'_>,
    dir: &mut Dir,
    src: &mut R,
    dst: &mut W,
    scratch: &mut [u8],
    pong: Option<[u8; PING_TOKEN_LEN]>,
    report: &mut Report,
    bytes: &mut usize,
) -> Step
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    if dir.finished() {
        return Step::Waiting;
    }
    if !dir.shut {
        // 1. Bytes the destination could not take earlier go first.
        if let Some(pending) = dir.out.pending.as_mut() {
            while pending.pos < pending.buf.len() {
                let rest = &pending.buf[pending.pos..];
                match Pin::new(&mut *dst).poll_write(cx, rest) {
                    Poll::Ready(Ok(n)) if n > 0 => {
                        pending.pos += n;
                        dir.out.needs_flush = true;
                        dir.out.accepted = true;
                    }
                    Poll::Ready(_) => {
                        dir.destination_failed();
                        return Step::Changed;
                    }
                    Poll::Pending => return Step::Waiting,
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
            if out.failed {
                dir.destination_failed();
            }
            return Step::Changed;
        }
        // 3. Flush what was written.
        if dir.out.needs_flush {
            match Pin::new(&mut *dst).poll_flush(cx) {
                Poll::Ready(Ok(())) => {
                    dir.out.needs_flush = false;
                    dir.out.accepted = true;
                }
                Poll::Ready(Err(_)) => {
                    dir.destination_failed();
                    return Step::Changed;
                }
                Poll::Pending => return Step::Waiting,
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
            return Step::Changed;
        }
        return Step::Waiting;
    }
    // 5. Read once, if the source has something, and pass it on.
    let n = if let Some(prefix) = dir.prefix.as_deref_mut() {
        let n = prefix.len().min(scratch.len());
        let head = prefix.split_to(n);
        scratch[..n].copy_from_slice(&head);
        if prefix.is_empty() {
            dir.prefix = None;
        }
        n
    } else {
        let mut buf = ReadBuf::new(scratch);
        match Pin::new(&mut *src).poll_read(cx, &mut buf) {
            Poll::Ready(Ok(())) => buf.filled().len(),
            // A reset reads as an abrupt end.
            Poll::Ready(Err(_)) => 0,
            Poll::Pending => return Step::Waiting,
        }
    };
    if n == 0 {
        dir.eof = true;
        return Step::Changed;
    }
    *bytes += n;
    let before = dir.p.phase();
    let failed = if dir.shut {
        // The destination is gone: keep parsing (to see a Close) but write
        // nothing, not even the rest of a frame it was in the middle of.
        dir.p.discard();
        dir.p.feed_into(&scratch[..n], pong, &mut Dropped, report);
        false
    } else {
        let mut out = Out {
            cx,
            dst: &mut *dst,
            state: &mut dir.out,
            failed: false,
        };
        dir.p.feed_into(&scratch[..n], pong, &mut out, report);
        out.failed
    };
    if failed {
        dir.destination_failed();
        return Step::Changed;
    }
    // `report` holds nothing that needs a reaction from earlier reads of
    // this call: those returned at once.
    if report.needs_reaction() || dir.p.phase() != before {
        return Step::Changed;
    }
    if dir.out.has_pending() {
        // The destination pushed back (its write waker is set): read no
        // more until it takes what is held.
        return Step::Waiting;
    }
    Step::Relayed
}
