//! The frame-stream processor: one direction of a relay, as a pure,
//! synchronous state machine. Bytes in, decisions out.
//!
//! A [`FrameProcessor`] is fed each chunk read from its source
//! ([`FrameProcessor::feed`]) and parses the frame headers in it (RFC 6455
//! §5.2) as they pass. It writes nothing itself: everything that should reach
//! the destination goes through a [`Sink`], in order, as
//! - runs of the input to forward as they are ([`Sink::forward`]): payloads
//!   are never copied or unmasked;
//! - bytes it kept from an earlier feed ([`Sink::stored`]): a header split
//!   across reads, or a held Pong that turned out not to be berth's;
//! - control frames of berth's own ([`Sink::inject`]), written only at a
//!   frame boundary.
//!
//! What it saw comes back as a [`Report`] per feed: frames per opcode,
//! complete messages, whether a data frame passed, whether berth's Ping was
//! answered (that Pong is consumed) or written, whether a message grew past
//! the size limit, and the protocol error that stopped the stream.
//!
//! With a message size limit ([`FrameProcessor::with_max_message`]), the
//! data frame that takes a message (all its fragments' payloads together)
//! past the limit is not written, nor is anything after it: the caller
//! closes both ends with 1009. Fragments already written stay written;
//! control frames do not count. Close frames and their codes are state
//! ([`FrameProcessor::close_code`]).
//!
//! It owns no socket, reads no clock and draws no randomness: the caller
//! passes the masking key of a frame it queues and the token of the Ping it
//! expects a Pong for. So the same bytes cut at any points give the same
//! output and the same decisions, which is what its tests check.

use crate::metrics::opcode_index;
use crate::ws::frame::{self, opcode, ControlFrame, FrameError, FrameHeader, MAX_HEADER_LEN};

/// Length of the Ping payload berth uses to recognize its own Pongs.
pub const PING_TOKEN_LEN: usize = 8;

/// Which peer a processor's bytes come from.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Source {
    /// Frames must be masked (RFC 6455 §5.1); frames berth writes towards the
    /// backend are masked with the caller's key.
    Client,
    /// Frames pass whether masked or not; berth's frames towards the client
    /// are not masked.
    Backend,
}

/// Where a processor's output goes, in order. Each call carries at least one
/// byte. Implementations append or write; they never see the same byte twice.
pub trait Sink {
    /// A run of the input of the current [`FrameProcessor::feed`] call.
    fn forward(&mut self, bytes: &[u8]);
    /// Bytes kept from an earlier feed: the start of a header that was split
    /// across reads, or a held Pong that was not an answer to berth's Ping.
    fn stored(&mut self, bytes: &[u8]);
    /// A whole control frame of berth's own.
    fn inject(&mut self, frame: &[u8]);
}

/// A control frame berth writes at the next frame boundary. Encoded only
/// when written, so a queued one is small.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Inject {
    Close { code: u16, reason: &'static str },
    Ping([u8; PING_TOKEN_LEN]),
}

/// Why a stream can no longer be relayed (RFC 6455 §7.4.1: berth answers
/// with 1002).
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ProtocolError {
    /// RFC 6455 §5.1: a client must mask every frame.
    #[error("unmasked frame from the client")]
    Unmasked,
    /// The header parser rejected the header.
    #[error(transparent)]
    Frame(#[from] FrameError),
    /// A header collected across reads did not parse at the length its first
    /// bytes announced (the parser and its length hint disagree).
    #[error("frame header shorter than its length fields announce")]
    HeaderLength,
}

/// What one feed (or one injection) saw. Counts are per call: the caller
/// adds them to its totals once per read.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Report {
    /// Frames whose header was parsed, indexed by
    /// [`crate::metrics::opcode_index`].
    pub frames: [u32; 7],
    /// Complete data messages: text, binary or continuation frames with FIN.
    pub messages: u32,
    /// A data frame header was seen (the idle timeout watches for these).
    pub data: bool,
    /// A Pong echoing the caller's token was consumed (never written).
    pub pong_consumed: bool,
    /// A queued Ping was written.
    pub ping_written: bool,
    /// A data frame took its message past the size limit: that frame and
    /// everything after it are dropped.
    pub too_big: bool,
    /// The stream broke a framing rule; nothing after it is written.
    pub error: Option<ProtocolError>,
}

impl Report {
    /// All frames counted.
    pub fn frames_total(&self) -> u64 {
        self.frames.iter().map(|&n| u64::from(n)).sum()
    }

    /// Something the caller must react to besides counting: berth's Pong
    /// consumed or Ping written, a message over the limit, an error.
    pub fn needs_reaction(&self) -> bool {
        self.pong_consumed || self.ping_written || self.too_big || self.error.is_some()
    }

    /// Adds `other` (a later call) to this report.
    pub fn merge(&mut self, other: &Report) {
        for (a, b) in self.frames.iter_mut().zip(other.frames) {
            *a = a.wrapping_add(b);
        }
        self.messages = self.messages.wrapping_add(other.messages);
        self.data |= other.data;
        self.pong_consumed |= other.pong_consumed;
        self.ping_written |= other.ping_written;
        self.too_big |= other.too_big;
        self.error = self.error.or(other.error);
    }
}

/// What [`FrameProcessor::phase`] compares.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Phase {
    close_code: Option<u16>,
    discard: bool,
    broken: bool,
    queued: bool,
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

/// Frame tracking for one direction of a relay (see the module docs).
pub struct FrameProcessor {
    source: Source,
    /// A header split across reads (not yet written anywhere).
    hdr: [u8; MAX_HEADER_LEN],
    hdr_len: u8,
    /// Payload bytes of the current frame still to come. Zero between frames.
    remaining: u64,
    /// The frame whose payload is passing; `None` between frames (and while a
    /// frame that fits in one feed is forwarded whole).
    cur: Option<FrameHeader>,
    action: Action,
    /// First two payload bytes of a Close frame, unmasked, and how many of
    /// them are known.
    close_buf: [u8; 2],
    close_got: u8,
    /// A held Pong: header and (masked) payload as received.
    held: [u8; MAX_HEADER_LEN + PING_TOKEN_LEN],
    held_len: u8,
    /// The stream can no longer be parsed (protocol error): bytes are dropped.
    broken: bool,
    /// A control frame to write at the next frame boundary, and the masking
    /// key for it (used towards the backend only).
    inject: Option<Inject>,
    inject_key: [u8; 4],
    /// After `inject` is written, drop this direction's frames.
    discard_after_inject: bool,
    /// berth has queued (or written) its own Close towards the destination.
    close_queued: bool,
    /// Frames from the source are parsed but not written.
    discard: bool,
    /// The code of the latest Close frame seen in full (1005 when it had
    /// none); `Some` once a Close has passed.
    close_code: Option<u16>,
    /// The largest message payload relayed (`u64::MAX`: no limit).
    max_message: u64,
    /// Payload bytes of the data message in progress, its frames so far
    /// included.
    message_len: u64,
}

impl FrameProcessor {
    /// A processor without a message size limit.
    pub fn new(source: Source) -> FrameProcessor {
        Self::with_max_message(source, None)
    }

    /// A processor that stops at the first message whose payload would
    /// exceed `max_message` bytes (`None`: no limit).
    pub fn with_max_message(source: Source, max_message: Option<u64>) -> FrameProcessor {
        FrameProcessor {
            source,
            hdr: [0; MAX_HEADER_LEN],
            hdr_len: 0,
            remaining: 0,
            cur: None,
            action: Action::Forward,
            close_buf: [0; 2],
            close_got: 0,
            held: [0; MAX_HEADER_LEN + PING_TOKEN_LEN],
            held_len: 0,
            broken: false,
            inject: None,
            inject_key: [0; 4],
            discard_after_inject: false,
            close_queued: false,
            discard: false,
            close_code: None,
            max_message: max_message.unwrap_or(u64::MAX),
            message_len: 0,
        }
    }

    pub fn source(&self) -> Source {
        self.source
    }

    /// True when no frame is half-written to the destination, so a control
    /// frame may go out now (RFC 6455 §5.4: control frames may be injected
    /// between the fragments of a message, never inside a frame). Headers
    /// still being collected, held Pongs and dropped frames have written
    /// nothing yet.
    pub fn at_boundary(&self) -> bool {
        self.broken || !(self.cur.is_some() && self.action == Action::Forward && self.remaining > 0)
    }

    /// The injection waiting for a boundary, if any.
    pub fn queued(&self) -> Option<Inject> {
        self.inject
    }

    /// Queues a control frame for the next boundary, replacing one already
    /// queued. `mask_key` must be fresh per frame (RFC 6455 §5.3); it is used
    /// only when the destination is the backend. With `then_discard`, frames
    /// from the source are dropped once it is written. Queuing a Close marks
    /// [`close_queued`](Self::close_queued).
    pub fn queue(&mut self, inject: Inject, mask_key: [u8; 4], then_discard: bool) {
        if matches!(inject, Inject::Close { .. }) {
            self.close_queued = true;
        }
        self.inject = Some(inject);
        self.inject_key = mask_key;
        self.discard_after_inject = then_discard;
    }

    /// berth has queued (or written) a Close of its own to the destination.
    pub fn close_queued(&self) -> bool {
        self.close_queued
    }

    /// From now on frames are parsed (Close frames are still seen) but not
    /// written.
    pub fn discard(&mut self) {
        self.discard = true;
    }

    /// The destination is gone: drop everything, including what is queued.
    pub fn destination_gone(&mut self) {
        self.discard = true;
        self.inject = None;
    }

    pub fn is_discarding(&self) -> bool {
        self.discard
    }

    /// The stream broke a framing rule; it is no longer parsed.
    pub fn is_broken(&self) -> bool {
        self.broken
    }

    /// The code of the latest Close frame seen in full (1005 for a Close
    /// without one, RFC 6455 §7.1.5), or `None` before any.
    pub fn close_code(&self) -> Option<u16> {
        self.close_code
    }

    pub fn close_seen(&self) -> bool {
        self.close_code.is_some()
    }

    /// The state the caller reacts to (a Close seen, discarding, broken, an
    /// injection queued), to tell whether a feed changed any of it: a feed
    /// that leaves it as it was and reports nothing that
    /// [needs a reaction](Report::needs_reaction) needs none.
    pub fn phase(&self) -> Phase {
        Phase {
            close_code: self.close_code,
            discard: self.discard,
            broken: self.broken,
            queued: self.inject.is_some(),
        }
    }

    /// Writes the queued control frame now if the stream is at a boundary.
    /// Returns what was written.
    pub fn inject_at_boundary<S: Sink>(&mut self, sink: &mut S) -> Option<Inject> {
        if self.inject.is_none() || !self.at_boundary() {
            return None;
        }
        self.write_inject(sink)
    }

    /// Passes one chunk of the source's bytes through: parses headers,
    /// forwards, drops or holds frames, and writes a queued control frame at
    /// the first boundary. `pong` is the token of the Ping berth is waiting
    /// to see answered, if any: an 8-byte Pong from the client is held until
    /// its payload is known, and consumed if it echoes the token.
    pub fn feed<S: Sink>(
        &mut self,
        input: &[u8],
        pong: Option<[u8; PING_TOKEN_LEN]>,
        sink: &mut S,
    ) -> Report {
        let mut report = Report::default();
        self.feed_into(input, pong, sink, &mut report);
        report
    }

    /// [`feed`](Self::feed), adding what it saw to `r` (as
    /// [`Report::merge`] would) instead of returning a report of its own.
    pub fn feed_into<S: Sink>(
        &mut self,
        chunk: &[u8],
        pong: Option<[u8; PING_TOKEN_LEN]>,
        sink: &mut S,
        r: &mut Report,
    ) {
        // Only `fail` sets `broken`, and it returns: checked once per feed.
        if self.broken {
            return;
        }
        let client = self.source == Source::Client;
        let n = chunk.len();
        let mut i = 0;
        // Start of the run of input bytes to be forwarded as they are.
        let mut run = 0;
        while i < n {
            if self.remaining == 0 {
                // A new frame starts here (or its header continues).
                debug_assert!(self.held_len == 0 && self.cur.is_none());
                if self.hdr_len == 0 && self.inject.is_none() && !self.discard {
                    i = self.skip_data_frames(chunk, i, client, r);
                    if i == n {
                        break;
                    }
                }
                if self.hdr_len == 0 && self.inject.is_some() {
                    forward(sink, &chunk[run..i]);
                    run = i;
                    if let Some(Inject::Ping(_)) = self.write_inject(sink) {
                        r.ping_written = true;
                    }
                }
                let (header, from_chunk, stored) = if self.hdr_len == 0 {
                    match frame::parse_header(&chunk[i..]) {
                        Ok(Some(h)) => (h, h.header_len, false),
                        Ok(None) => {
                            // Keep the partial header back until it is whole.
                            forward(sink, &chunk[run..i]);
                            let part = &chunk[i..];
                            self.hdr[..part.len()].copy_from_slice(part);
                            self.hdr_len = part.len() as u8;
                            return;
                        }
                        Err(e) => {
                            forward(sink, &chunk[run..i]);
                            self.fail(e.into(), r);
                            return;
                        }
                    }
                } else {
                    match self.complete_header(chunk, &mut i) {
                        Some(Ok(h)) => {
                            let from_chunk = h.header_len - usize::from(self.hdr_len);
                            (h, from_chunk, true)
                        }
                        // Still incomplete: the chunk was all header.
                        None => return,
                        Some(Err(e)) => {
                            self.hdr_len = 0;
                            self.fail(e, r);
                            return;
                        }
                    }
                };
                // RFC 6455 §5.1: every client frame is masked.
                if client && header.mask.is_none() {
                    forward(sink, &chunk[run..i]);
                    self.hdr_len = 0;
                    self.fail(ProtocolError::Unmasked, r);
                    return;
                }
                let op = header.opcode;
                let slot = &mut r.frames[opcode_index(op)];
                *slot = slot.wrapping_add(1);
                let mut too_big = false;
                if header.is_data() {
                    r.data = true;
                    // A text or binary frame starts a message; continuations
                    // add to it.
                    self.message_len = if op == opcode::CONTINUATION {
                        self.message_len.saturating_add(header.payload_len)
                    } else {
                        header.payload_len
                    };
                    too_big = self.message_len > self.max_message;
                    if !too_big {
                        r.messages = r.messages.wrapping_add(u32::from(header.fin));
                    }
                }
                let action = if self.discard {
                    Action::Drop
                } else if too_big {
                    // This frame and everything after it stay here.
                    r.too_big = true;
                    self.discard = true;
                    Action::Drop
                } else if client
                    && op == opcode::PONG
                    && header.payload_len == PING_TOKEN_LEN as u64
                    && pong.is_some()
                {
                    Action::Hold
                } else {
                    Action::Forward
                };
                match action {
                    Action::Forward if !stored => {
                        // The common case: a frame that fits in this chunk
                        // passes as part of the run, with no state kept.
                        let room = (n - i - from_chunk) as u64;
                        if op != opcode::CLOSE && header.payload_len <= room {
                            i += from_chunk + header.payload_len as usize;
                            continue;
                        }
                    }
                    Action::Forward => {
                        forward(sink, &chunk[run..i]);
                        sink.stored(&self.hdr[..header.header_len]);
                        run = i + from_chunk;
                    }
                    Action::Drop => {
                        forward(sink, &chunk[run..i]);
                        run = i + from_chunk;
                    }
                    Action::Hold => {
                        forward(sink, &chunk[run..i]);
                        let hl = header.header_len;
                        if stored {
                            self.held[..hl].copy_from_slice(&self.hdr[..hl]);
                        } else {
                            self.held[..hl].copy_from_slice(&chunk[i..i + hl]);
                        }
                        self.held_len = hl as u8;
                        run = i + from_chunk;
                    }
                }
                self.hdr_len = 0;
                i += from_chunk;
                self.cur = Some(header);
                self.action = action;
                self.remaining = header.payload_len;
                self.close_got = 0;
                if self.remaining == 0 {
                    self.end_frame(sink, pong, r);
                }
                continue;
            }
            // Payload bytes of the current frame.
            let take = usize::try_from(self.remaining).map_or(n - i, |rem| rem.min(n - i));
            let payload = &chunk[i..i + take];
            if let Some(h) = self.cur {
                if h.opcode == opcode::CLOSE && self.close_got < 2 {
                    for &byte in payload.iter().take(2 - usize::from(self.close_got)) {
                        let at = usize::from(self.close_got);
                        let key = h.mask.map_or(0, |m| m[at]);
                        self.close_buf[at] = byte ^ key;
                        self.close_got += 1;
                    }
                }
            }
            match self.action {
                Action::Forward => {}
                Action::Drop => {
                    forward(sink, &chunk[run..i]);
                    run = i + take;
                }
                Action::Hold => {
                    let at = usize::from(self.held_len);
                    self.held[at..at + take].copy_from_slice(payload);
                    self.held_len += take as u8;
                    run = i + take;
                }
            }
            i += take;
            self.remaining -= take as u64;
            if self.remaining == 0 {
                self.end_frame(sink, pong, r);
            }
        }
        forward(sink, &chunk[run..n]);
    }

    /// The common case in a tight loop: whole data frames (text, binary,
    /// continuation) with a 7- or 16-bit length, each entirely inside
    /// `chunk` from `i`, on a stream with nothing pending (no split header,
    /// no injection, not discarding; the caller checked). Such a frame
    /// passes as part of the current run and is only counted, exactly as
    /// the general path would count it. Returns where the first frame it
    /// leaves to the general path starts: a control or reserved opcode, a
    /// 64-bit length, an unmasked client frame, a frame that does not fit,
    /// one that takes its message over the limit.
    #[inline(always)]
    fn skip_data_frames(&mut self, chunk: &[u8], i: usize, client: bool, r: &mut Report) -> usize {
        // One copy of the loop per case, so that none tests per frame what
        // is fixed for the whole feed.
        let limit = self.max_message != u64::MAX;
        let (len, max) = (self.message_len, self.max_message);
        let skipped = match (client, limit) {
            (true, false) => skip_data_frames::<true, false>(chunk, i, len, max),
            (false, false) => skip_data_frames::<false, false>(chunk, i, len, max),
            (true, true) => skip_data_frames::<true, true>(chunk, i, len, max),
            (false, true) => skip_data_frames::<false, true>(chunk, i, len, max),
        };
        if skipped.end != i {
            self.message_len = skipped.message_len;
            r.data = true;
            for op in opcode::CONTINUATION..=opcode::BINARY {
                let n = (skipped.counts >> (u32::from(op) * COUNT_BITS)) & COUNT_MASK;
                let slot = &mut r.frames[opcode_index(op)];
                // A field holds fewer than 2^21: no truncation.
                *slot = slot.wrapping_add(n as u32);
            }
            r.messages = r.messages.wrapping_add(skipped.messages);
        }
        skipped.end
    }

    /// Completes a header that began in an earlier chunk, taking bytes from
    /// `chunk` at `*i`. On success `*i` is left where the header's bytes in
    /// this chunk begin (so that they are skipped with the header);
    /// `None` when the chunk ended first (its bytes are kept).
    fn complete_header(
        &mut self,
        chunk: &[u8],
        i: &mut usize,
    ) -> Option<Result<FrameHeader, ProtocolError>> {
        let n = chunk.len();
        let start = *i;
        let mut len = usize::from(self.hdr_len);
        loop {
            let want = frame::header_len_hint(&self.hdr[..len]).unwrap_or(2);
            if len >= want {
                break;
            }
            if *i >= n {
                // A header known to be bad before it is whole (a 64-bit
                // length with its top bit set, before the masking key) is
                // refused now, as the same bytes in one read would be.
                if let Err(e) = frame::parse_header(&self.hdr[..len]) {
                    return Some(Err(e.into()));
                }
                self.hdr_len = len as u8;
                return None;
            }
            let take = (want - len).min(n - *i);
            self.hdr[len..len + take].copy_from_slice(&chunk[*i..*i + take]);
            len += take;
            *i += take;
        }
        *i = start;
        Some(match frame::parse_header(&self.hdr[..len]) {
            Ok(Some(h)) => Ok(h),
            Ok(None) => Err(ProtocolError::HeaderLength),
            Err(e) => Err(e.into()),
        })
    }

    /// Writes the queued control frame (the caller checked the boundary).
    fn write_inject<S: Sink>(&mut self, sink: &mut S) -> Option<Inject> {
        let inject = self.inject.take()?;
        // RFC 6455 §5.1/§5.3: frames towards the backend (read from the
        // client) are masked with a fresh key; frames towards the client are
        // not.
        let mask = (self.source == Source::Client).then_some(self.inject_key);
        let frame = match inject {
            Inject::Close { code, reason } => ControlFrame::close(code, reason, mask),
            Inject::Ping(token) => ControlFrame::new(opcode::PING, &token, mask),
        };
        sink.inject(frame.as_bytes());
        if self.discard_after_inject {
            self.discard = true;
            self.discard_after_inject = false;
        }
        Some(inject)
    }

    /// The current frame is complete.
    fn end_frame<S: Sink>(
        &mut self,
        sink: &mut S,
        pong: Option<[u8; PING_TOKEN_LEN]>,
        r: &mut Report,
    ) {
        let Some(h) = self.cur.take() else { return };
        if h.opcode == opcode::CLOSE {
            // RFC 6455 §7.1.5: a Close without a code reads as 1005.
            self.close_code = Some(if h.payload_len >= 2 {
                u16::from_be_bytes(self.close_buf)
            } else {
                1005
            });
        }
        if self.action == Action::Hold {
            let held_len = usize::from(self.held_len);
            let mut token = [0u8; PING_TOKEN_LEN];
            token.copy_from_slice(&self.held[h.header_len..held_len]);
            if let Some(mask) = h.mask {
                frame::apply_mask(&mut token, mask, 0);
            }
            if pong == Some(token) {
                r.pong_consumed = true;
            } else {
                // Someone else's Pong: it goes on untouched.
                sink.stored(&self.held[..held_len]);
            }
            self.held_len = 0;
        }
        self.action = Action::Forward;
    }

    /// The stream broke a framing rule: stop parsing it.
    fn fail(&mut self, error: ProtocolError, r: &mut Report) {
        self.broken = true;
        self.discard = true;
        r.error = Some(error);
    }
}

/// Frames of one data opcode are counted in one 21-bit field of a `u64`
/// (continuation, text, binary from the lowest bits up), so that counting
/// one is an add with no memory access.
const COUNT_BITS: u32 = 21;
const COUNT_MASK: u64 = (1 << COUNT_BITS) - 1;
/// The most input [`skip_data_frames`] looks at in one call: it holds
/// fewer 2-byte frames than a count field does.
const SKIP_WINDOW: usize = 1 << COUNT_BITS;

/// What [`skip_data_frames`] passed over.
struct Skipped {
    /// Where the first frame it did not take starts.
    end: usize,
    /// Frames per data opcode, packed (see [`COUNT_BITS`]).
    counts: u64,
    /// Frames with FIN set: complete messages.
    messages: u32,
    /// The message length after the last frame taken (only tracked with
    /// `LIMIT`; otherwise as given).
    message_len: u64,
}

/// The loop of [`FrameProcessor::skip_data_frames`], for a client (whose
/// frames must be masked) or not, with a message size limit or not.
#[inline(always)]
fn skip_data_frames<const CLIENT: bool, const LIMIT: bool>(
    chunk: &[u8],
    i: usize,
    mut message_len: u64,
    max_message: u64,
) -> Skipped {
    /// What one frame of each data opcode adds to the packed counts.
    const ONE: [u64; 3] = [1, 1 << COUNT_BITS, 1 << (2 * COUNT_BITS)];
    let window = &chunk[..chunk.len().min(i.saturating_add(SKIP_WINDOW))];
    let mut rest = window.get(i..).unwrap_or_default();
    let mut counts = 0u64;
    let mut messages = 0u32;
    while let &[b0, b1, ref after @ ..] = rest {
        let op = usize::from(b0 & 0x0F);
        let Some(&one) = ONE.get(op) else { break };
        let masked = b1 & 0x80 != 0;
        if CLIENT && !masked {
            break;
        }
        let (len, ext) = match b1 & 0x7F {
            126 => match *after {
                [hi, lo, ..] => (usize::from(u16::from_be_bytes([hi, lo])), 2),
                _ => break,
            },
            127 => break,
            len => (usize::from(len), 0),
        };
        // At most 14 + 65,535: no overflow.
        let frame_len = 2 + ext + if masked { 4 } else { 0 } + len;
        let Some(next) = rest.get(frame_len..) else {
            break;
        };
        if LIMIT {
            let len = len as u64;
            let new_len = if op == usize::from(opcode::CONTINUATION) {
                message_len.saturating_add(len)
            } else {
                len
            };
            if new_len > max_message {
                break;
            }
            message_len = new_len;
        }
        counts += one;
        messages += u32::from(b0 >> 7);
        rest = next;
    }
    Skipped {
        end: window.len() - rest.len(),
        counts,
        messages,
        message_len,
    }
}

/// Forwards a run of input, skipping empty runs.
#[inline]
fn forward<S: Sink>(sink: &mut S, bytes: &[u8]) {
    if !bytes.is_empty() {
        sink.forward(bytes);
    }
}
