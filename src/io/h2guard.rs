//! The frame-level guard between an HTTP/2 client connection and hyper's
//! HTTP/2 server: it reads the frame headers going by (no payloads) and
//! ends a connection that floods berth with frames that cost work and
//! carry nothing (`PING`, `SETTINGS`, `RST_STREAM`, `PRIORITY`, empty
//! `DATA`), with a `GOAWAY` (`ENHANCE_YOUR_CALM`) of its own.
//!
//! The `h2` crate answers each `PING` and `SETTINGS` (one outstanding
//! answer at a time, so its memory stays bounded) but never gives up on a
//! client that sends them without end (CVE-2019-9512, -9515); a rapid
//! reset loop (CVE-2023-44487) is a stream of `HEADERS` and `RST_STREAM`.
//! `h2` itself sends `GOAWAY` for streams reset before they were
//! accepted, for too many `CONTINUATION` frames and for a header block
//! that decodes far past `max_header_bytes` (an HPACK bomb); the guard
//! covers the rest with one budget per connection: [`BURST`] such frames
//! at once, refilled at [`PER_SECOND`]. Browsers send a few (a `SETTINGS`
//! and its acknowledgement, the odd `PING`, a `RST_STREAM` per cancelled
//! request).
//!
//! The guard also follows the frames berth sends, so that its `GOAWAY`
//! goes out between two of hyper's frames, never inside one; after it,
//! every read and write fails, and hyper's connection ends. [`Tripped`]
//! tells the connection's task, which gives the `GOAWAY` a moment to leave
//! and then drops the connection whatever state it is in.
//!
//! Costs: a few dozen bytes per connection, a header parse per frame. It
//! starts no tasks.

use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::Notify;
use tokio::time::Instant;

use super::preface::PREFACE;

/// Frames that cost work and carry nothing a client may send at once...
pub const BURST: u32 = 500;
/// ...and how many more it may send each second after that.
pub const PER_SECOND: u32 = 100;

const DATA: u8 = 0x0;
const HEADERS: u8 = 0x1;
const PRIORITY: u8 = 0x2;
const RST_STREAM: u8 = 0x3;
const SETTINGS: u8 = 0x4;
const PING: u8 = 0x6;
const GOAWAY: u8 = 0x7;
const ACK: u8 = 0x1;
const END_STREAM: u8 = 0x1;
/// The `ENHANCE_YOUR_CALM` error code (RFC 9113 §7).
const ENHANCE_YOUR_CALM: u32 = 0xb;

/// Where a byte stream of frames is: inside a frame header (how much of
/// it has arrived) or inside a payload (how much is left).
#[derive(Clone, Copy, Debug, Default)]
struct Framing {
    header: [u8; 9],
    have: u8,
    payload_left: u32,
}

/// One complete frame header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct FrameHead {
    len: u32,
    kind: u8,
    flags: u8,
    stream: u32,
}

impl Framing {
    /// Passes `bytes` through, calling `on_head` for each frame header
    /// completed.
    fn feed(&mut self, mut bytes: &[u8], mut on_head: impl FnMut(FrameHead)) {
        while !bytes.is_empty() {
            if self.payload_left > 0 {
                let n = bytes.len().min(self.payload_left as usize);
                self.payload_left -= n as u32;
                bytes = &bytes[n..];
                continue;
            }
            let have = usize::from(self.have);
            let n = (9 - have).min(bytes.len());
            self.header[have..have + n].copy_from_slice(&bytes[..n]);
            bytes = &bytes[n..];
            self.have += n as u8;
            if self.have == 9 {
                let h = &self.header;
                let head = FrameHead {
                    len: u32::from(h[0]) << 16 | u32::from(h[1]) << 8 | u32::from(h[2]),
                    kind: h[3],
                    flags: h[4],
                    stream: u32::from_be_bytes([h[5], h[6], h[7], h[8]]) & 0x7fff_ffff,
                };
                self.have = 0;
                self.payload_left = head.len;
                on_head(head);
            }
        }
    }

    /// True between two frames.
    fn at_boundary(&self) -> bool {
        self.have == 0 && self.payload_left == 0
    }

    /// How many bytes may go before the current frame ends (unlimited,
    /// as far as this frame goes, while its header is incomplete).
    fn left_in_frame(&self) -> usize {
        if self.have > 0 {
            usize::MAX
        } else {
            self.payload_left as usize
        }
    }
}

/// The budget of frames that cost work and carry nothing.
#[derive(Debug)]
struct Budget {
    tokens: u32,
    /// When the tokens were last topped up (None until the first use).
    since: Option<Instant>,
}

impl Budget {
    fn new() -> Budget {
        Budget {
            tokens: BURST,
            since: None,
        }
    }

    /// Spends one token; false when there is none left.
    fn spend(&mut self, now: Instant) -> bool {
        let since = *self.since.get_or_insert(now);
        let elapsed = now.saturating_duration_since(since);
        let earned = (elapsed.as_millis() as u64 * u64::from(PER_SECOND) / 1000) as u32;
        if earned > 0 {
            self.tokens = self.tokens.saturating_add(earned).min(BURST);
            self.since = Some(now);
        }
        match self.tokens.checked_sub(1) {
            Some(left) => {
                self.tokens = left;
                true
            }
            None => false,
        }
    }
}

/// Whether the frame costs a token: work for berth and nothing for the
/// application (acknowledgements are answers to berth's own frames).
fn is_costly(head: FrameHead) -> bool {
    match head.kind {
        PING | SETTINGS => head.flags & ACK == 0,
        RST_STREAM | PRIORITY => true,
        DATA => head.len == 0 && head.flags & END_STREAM == 0,
        _ => false,
    }
}

/// The guard's signal to the connection's task.
#[derive(Clone, Debug, Default)]
pub struct Tripped {
    flag: Arc<AtomicBool>,
    notify: Arc<Notify>,
}

impl Tripped {
    /// Waits until the guard has given up on its connection.
    pub async fn wait(&self) {
        loop {
            let notified = self.notify.notified();
            if self.flag.load(Ordering::Acquire) {
                return;
            }
            notified.await;
        }
    }

    pub fn is_tripped(&self) -> bool {
        self.flag.load(Ordering::Acquire)
    }

    fn trip(&self) {
        self.flag.store(true, Ordering::Release);
        self.notify.notify_waiters();
    }
}

/// The guard's `GOAWAY`: the frame and how much of it has been written.
#[derive(Debug)]
struct GoAway {
    frame: [u8; 17],
    sent: u8,
}

impl GoAway {
    fn new(last_stream: u32) -> GoAway {
        let mut frame = [0u8; 17];
        frame[..9].copy_from_slice(&[0, 0, 8, GOAWAY, 0, 0, 0, 0, 0]);
        frame[9..13].copy_from_slice(&(last_stream & 0x7fff_ffff).to_be_bytes());
        frame[13..].copy_from_slice(&ENHANCE_YOUR_CALM.to_be_bytes());
        GoAway { frame, sent: 0 }
    }

    fn done(&self) -> bool {
        usize::from(self.sent) == self.frame.len()
    }
}

/// An HTTP/2 server connection's byte stream, guarded (see the module
/// docs). `S` is the client's stream with the preface still unread.
pub struct H2Guard<S> {
    inner: S,
    /// Bytes of the client's preface still to pass before frames start.
    preface_left: u8,
    incoming: Framing,
    outgoing: Framing,
    budget: Budget,
    /// The highest stream the client opened (for the `GOAWAY`).
    last_stream: u32,
    goaway: Option<GoAway>,
    tripped: Tripped,
}

fn refused() -> io::Error {
    io::Error::new(
        io::ErrorKind::ConnectionAborted,
        "HTTP/2 connection ended by berth: too many control frames",
    )
}

impl<S> H2Guard<S> {
    pub fn new(inner: S) -> H2Guard<S> {
        H2Guard {
            inner,
            preface_left: PREFACE.len() as u8,
            incoming: Framing::default(),
            outgoing: Framing::default(),
            budget: Budget::new(),
            last_stream: 0,
            goaway: None,
            tripped: Tripped::default(),
        }
    }

    /// The signal the connection's task waits on.
    pub fn tripped(&self) -> Tripped {
        self.tripped.clone()
    }

    /// Looks at bytes the client sent; true when they break the budget.
    fn inspect(&mut self, mut bytes: &[u8]) -> bool {
        if self.preface_left > 0 {
            let n = bytes.len().min(usize::from(self.preface_left));
            self.preface_left -= n as u8;
            bytes = &bytes[n..];
        }
        let mut over = false;
        let (budget, last) = (&mut self.budget, &mut self.last_stream);
        let mut now = None;
        self.incoming.feed(bytes, |head| {
            if head.kind == HEADERS && head.stream % 2 == 1 && head.stream > *last {
                *last = head.stream;
            }
            if is_costly(head) && !budget.spend(*now.get_or_insert_with(Instant::now)) {
                over = true;
            }
        });
        over
    }
}

impl<S: AsyncWrite + Unpin> H2Guard<S> {
    /// Writes the `GOAWAY` once berth's own frames are at a boundary;
    /// ready when it has gone (or cannot).
    fn poll_goaway(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let Some(goaway) = self.goaway.as_mut() else {
            return Poll::Ready(Ok(()));
        };
        while !goaway.done() {
            let rest = &goaway.frame[usize::from(goaway.sent)..];
            match Pin::new(&mut self.inner).poll_write(cx, rest) {
                Poll::Ready(Ok(0)) => return Poll::Ready(Err(io::ErrorKind::WriteZero.into())),
                Poll::Ready(Ok(n)) => goaway.sent += n as u8,
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Pending => return Poll::Pending,
            }
        }
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn trip(&mut self) {
        if self.goaway.is_none() {
            self.goaway = Some(GoAway::new(self.last_stream));
            self.tripped.trip();
        }
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncRead for H2Guard<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.goaway.is_some() {
            // Nothing more is read; the GOAWAY goes as soon as berth's
            // frames allow (h2 flushes what it has before it reads).
            if this.outgoing.at_boundary() {
                std::task::ready!(this.poll_goaway(cx))?;
                return Poll::Ready(Err(refused()));
            }
            return Poll::Pending;
        }
        let before = buf.filled().len();
        std::task::ready!(Pin::new(&mut this.inner).poll_read(cx, buf))?;
        if this.inspect(&buf.filled()[before..]) {
            // What was read is dropped: h2 never sees the flood's end.
            buf.set_filled(before);
            this.trip();
            if this.outgoing.at_boundary() {
                std::task::ready!(this.poll_goaway(cx))?;
                return Poll::Ready(Err(refused()));
            }
            return Poll::Pending;
        }
        Poll::Ready(Ok(()))
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for H2Guard<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let mut buf = buf;
        if this.goaway.is_some() {
            if this.outgoing.at_boundary() {
                std::task::ready!(this.poll_goaway(cx))?;
                return Poll::Ready(Err(refused()));
            }
            // Finish the frame on the wire, no more.
            buf = &buf[..buf.len().min(this.outgoing.left_in_frame())];
        }
        let n = std::task::ready!(Pin::new(&mut this.inner).poll_write(cx, buf))?;
        this.outgoing.feed(&buf[..n], |_| {});
        Poll::Ready(Ok(n))
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.goaway.is_some() && this.outgoing.at_boundary() {
            let _ = std::task::ready!(this.poll_goaway(cx));
        }
        Pin::new(&mut this.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;

    fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
        let len = payload.len();
        let mut v = vec![(len >> 16) as u8, (len >> 8) as u8, len as u8, kind, flags];
        v.extend_from_slice(&stream.to_be_bytes());
        v.extend_from_slice(payload);
        v
    }

    #[test]
    fn framing_finds_every_header_however_the_bytes_arrive() {
        let mut stream = Vec::new();
        stream.extend(frame(SETTINGS, 0, 0, &[0; 12]));
        stream.extend(frame(HEADERS, 4, 1, &[7; 40]));
        stream.extend(frame(PING, 0, 0, &[1; 8]));
        stream.extend(frame(DATA, 1, 1, &[]));
        let want = vec![
            (SETTINGS, 12, 0),
            (HEADERS, 40, 1),
            (PING, 8, 0),
            (DATA, 0, 1),
        ];
        for chunk in [1, 2, 5, 9, 10, 17, stream.len()] {
            let mut f = Framing::default();
            let mut seen = Vec::new();
            for piece in stream.chunks(chunk) {
                f.feed(piece, |h| seen.push((h.kind, h.len, h.stream)));
            }
            assert_eq!(seen, want, "chunks of {chunk}");
            assert!(f.at_boundary());
        }
        let mut f = Framing::default();
        f.feed(&stream[..3], |_| {});
        assert!(!f.at_boundary());
        assert_eq!(f.left_in_frame(), usize::MAX);
        f.feed(&stream[3..12], |_| {});
        assert_eq!(f.left_in_frame(), 9);
    }

    #[test]
    fn only_frames_that_carry_nothing_cost() {
        let head = |kind, flags, len| FrameHead {
            len,
            kind,
            flags,
            stream: 1,
        };
        assert!(is_costly(head(PING, 0, 8)));
        assert!(!is_costly(head(PING, ACK, 8)));
        assert!(is_costly(head(SETTINGS, 0, 0)));
        assert!(!is_costly(head(SETTINGS, ACK, 0)));
        assert!(is_costly(head(RST_STREAM, 0, 4)));
        assert!(is_costly(head(PRIORITY, 0, 5)));
        assert!(is_costly(head(DATA, 0, 0)));
        assert!(!is_costly(head(DATA, END_STREAM, 0)));
        assert!(!is_costly(head(DATA, 0, 1)));
        assert!(!is_costly(head(HEADERS, 4, 10)));
        assert!(!is_costly(head(0x8, 0, 4)));
    }

    #[tokio::test(start_paused = true)]
    async fn the_budget_refills_at_its_rate() {
        let mut b = Budget::new();
        let t0 = Instant::now();
        for _ in 0..BURST {
            assert!(b.spend(t0));
        }
        assert!(!b.spend(t0));
        let later = t0 + Duration::from_millis(100);
        for _ in 0..PER_SECOND / 10 {
            assert!(b.spend(later));
        }
        assert!(!b.spend(later));
        // Never more than a burst, however long the wait.
        let much_later = later + Duration::from_secs(3600);
        for _ in 0..BURST {
            assert!(b.spend(much_later));
        }
        assert!(!b.spend(much_later));
    }

    #[tokio::test]
    async fn a_flood_gets_goaway_between_frames_then_errors() {
        let (mut client, server) = tokio::io::duplex(1 << 20);
        let mut guard = H2Guard::new(server);
        let tripped = guard.tripped();
        // berth is halfway through writing a frame when the flood trips.
        let big = frame(DATA, 0, 1, &[9; 91]);
        guard.write_all(&big[..50]).await.unwrap();
        let mut flood = PREFACE.to_vec();
        flood.extend(frame(HEADERS, 4, 1, &[0; 3]));
        flood.extend(frame(HEADERS, 4, 3, &[0; 3]));
        for _ in 0..=BURST {
            flood.extend(frame(PING, 0, 0, &[0; 8]));
        }
        client.write_all(&flood).await.unwrap();
        let mut sink = vec![0u8; flood.len()];
        let read = tokio::time::timeout(Duration::from_millis(100), guard.read(&mut sink)).await;
        assert!(read.is_err(), "the read waits for the frame to end");
        assert!(tripped.is_tripped());
        // Only the rest of the frame is taken, then the GOAWAY goes.
        assert_eq!(guard.write(&big[50..]).await.unwrap(), 50);
        assert!(guard.write(&big).await.is_err());
        let mut out = vec![0u8; 100 + 17];
        client.read_exact(&mut out).await.unwrap();
        assert_eq!(&out[..100], &big[..]);
        assert_eq!(
            &out[100..],
            &[0, 0, 8, GOAWAY, 0, 0, 0, 0, 0, 0, 0, 0, 3, 0, 0, 0, 0xb]
        );
        assert!(guard.read(&mut sink).await.is_err());
        tokio::time::timeout(Duration::from_secs(1), tripped.wait())
            .await
            .unwrap();
    }

    #[tokio::test]
    async fn ordinary_traffic_passes_untouched() {
        let (mut client, server) = tokio::io::duplex(1 << 20);
        let mut guard = H2Guard::new(server);
        let mut sent = PREFACE.to_vec();
        sent.extend(frame(SETTINGS, 0, 0, &[0; 6]));
        sent.extend(frame(SETTINGS, ACK, 0, &[]));
        for i in 0..200u32 {
            sent.extend(frame(HEADERS, 4, 2 * i + 1, &[0; 10]));
            sent.extend(frame(DATA, 0, 2 * i + 1, &[1; 30]));
            sent.extend(frame(RST_STREAM, 0, 2 * i + 1, &[0, 0, 0, 8]));
        }
        client.write_all(&sent).await.unwrap();
        drop(client);
        let mut got = Vec::new();
        guard.read_to_end(&mut got).await.unwrap();
        assert_eq!(got, sent);
        assert!(!guard.tripped().is_tripped());
    }
}
