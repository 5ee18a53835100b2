//! An HTTP/2 connection's first bytes, read before hyper's HTTP/2 server
//! sees the connection: the client connection preface and the `SETTINGS`
//! frame that must follow it (RFC 9113 §3.4).
//!
//! Why here and not in hyper: memory. hyper's HTTP/2 server (the `h2`
//! crate) gives every connection a 16 KiB write buffer and an 8 KiB read
//! buffer the moment it starts, which a client that opens a connection and
//! sends nothing (or half a preface) would hold for the whole
//! `handshake_timeout`. Here such a connection holds only the bytes it has
//! sent (at most [`LIMIT`]), as with HTTP/1.1's first head (`head`); the
//! HTTP/2 server starts once the client's `SETTINGS` frame is complete and
//! reads these bytes again first (`ClientStream::unread`).
//!
//! [`check`] is the pure part: bytes in, a verdict out. [`read_preface`]
//! feeds it from a stream; the caller sets the time limit.

use std::future::poll_fn;
use std::pin::Pin;

use bytes::Bytes;
use tokio::io::{AsyncRead, ReadBuf};

/// The client connection preface.
pub const PREFACE: &[u8; 24] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// The request line an HTTP/1.1 reader sees at the start of a preface: a
/// plain connection that starts with it speaks HTTP/2 with prior knowledge.
pub const PREFACE_LINE: &[u8] = b"PRI * HTTP/2.0\r\n";

/// The largest first `SETTINGS` payload accepted: 64 settings of 6 bytes
/// (RFC 9113 defines 7; browsers send 3 to 6).
const MAX_SETTINGS: usize = 64 * 6;

/// The most berth reads before the HTTP/2 server starts: the preface, a
/// frame header and the largest `SETTINGS` payload.
pub const LIMIT: usize = PREFACE.len() + 9 + MAX_SETTINGS;

/// The buffer's first size, and the least room it offers each read.
const READ_MIN: usize = 128;

/// What the first bytes say.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// More bytes are needed.
    More,
    /// The preface and a valid first `SETTINGS` frame end at this offset.
    Complete(usize),
    /// Not an HTTP/2 preface, or no valid `SETTINGS` frame after it.
    Bad,
}

/// Checks the bytes a connection has sent so far.
pub fn check(buf: &[u8]) -> Verdict {
    let n = buf.len().min(PREFACE.len());
    if buf[..n] != PREFACE[..n] {
        return Verdict::Bad;
    }
    let Some(header) = buf.get(PREFACE.len()..PREFACE.len() + 9) else {
        return Verdict::More;
    };
    let len = usize::from(header[0]) << 16 | usize::from(header[1]) << 8 | usize::from(header[2]);
    let (kind, flags) = (header[3], header[4]);
    let stream = u32::from_be_bytes([header[5], header[6], header[7], header[8]]) & 0x7fff_ffff;
    // RFC 9113 §3.4: the preface is followed by a SETTINGS frame (not an
    // acknowledgement), on stream 0, whose payload is whole settings.
    if kind != 0x4 || flags & 0x1 != 0 || stream != 0 || len % 6 != 0 || len > MAX_SETTINGS {
        return Verdict::Bad;
    }
    let end = PREFACE.len() + 9 + len;
    if buf.len() >= end {
        Verdict::Complete(end)
    } else {
        Verdict::More
    }
}

/// How the start of an HTTP/2 connection ended.
#[derive(Debug, PartialEq, Eq)]
pub enum Preface {
    /// The preface and the first `SETTINGS` frame, and whatever followed
    /// them in the same reads: the HTTP/2 server reads these first.
    Ready(Bytes),
    /// Not an HTTP/2 connection preface (or a bad first frame).
    Bad,
    /// The client closed the connection (or it failed) before.
    Closed,
}

/// Reads until the preface and the first `SETTINGS` frame are in, starting
/// with `already` (bytes read before, e.g. by `head::read_head`), reading
/// no more than [`LIMIT`] bytes in all unless `already` held more.
pub async fn read_preface<S: AsyncRead + Unpin>(stream: &mut S, already: Bytes) -> Preface {
    let mut buf: Vec<u8> = Vec::from(already);
    loop {
        match check(&buf) {
            Verdict::Complete(_) => return Preface::Ready(Bytes::from(buf)),
            Verdict::Bad => return Preface::Bad,
            Verdict::More => {}
        }
        // Grows from READ_MIN, never past LIMIT (a complete verdict comes
        // before that, or a bad one).
        buf.reserve(READ_MIN);
        let start = buf.len();
        let room = (buf.capacity() - start).min(LIMIT.saturating_sub(start).max(1));
        buf.resize(start + room, 0);
        let read = poll_fn(|cx| {
            let mut rb = ReadBuf::new(&mut buf[start..]);
            Pin::new(&mut *stream)
                .poll_read(cx, &mut rb)
                .map_ok(|()| rb.filled().len())
        })
        .await;
        let n = read.unwrap_or(0);
        buf.truncate(start + n);
        if n == 0 {
            return Preface::Closed;
        }
    }
}

#[cfg(test)]
mod tests {
    use tokio::io::AsyncWriteExt;

    use super::*;

    /// The preface and a SETTINGS frame with `settings` (6 bytes each).
    fn start(settings: usize) -> Vec<u8> {
        let mut v = PREFACE.to_vec();
        let len = settings * 6;
        v.extend_from_slice(&[0, (len >> 8) as u8, len as u8, 4, 0, 0, 0, 0, 0]);
        for i in 0..settings {
            v.extend_from_slice(&[0, (i + 1) as u8, 0, 0, 0x10, 0]);
        }
        v
    }

    #[test]
    fn verdicts() {
        let good = start(3);
        assert_eq!(check(&good), Verdict::Complete(good.len()));
        let mut more = good.clone();
        more.extend_from_slice(b"\x00\x00\x04\x08\x00\x00\x00\x00\x00");
        assert_eq!(check(&more), Verdict::Complete(good.len()));
        for end in 0..good.len() {
            assert_eq!(check(&good[..end]), Verdict::More, "{end}");
        }
        assert_eq!(check(&start(0)), Verdict::Complete(33));
        assert_eq!(check(&start(64)), Verdict::Complete(LIMIT));
        assert_eq!(check(&start(65)), Verdict::Bad);
        assert_eq!(check(b"GET / HTTP/1.1\r\n"), Verdict::Bad);
        assert_eq!(check(b"PRI * HTTP/2.0\r\n\r\nXX"), Verdict::Bad);
        let mut ack = start(0);
        ack[24 + 4] = 1;
        assert_eq!(check(&ack), Verdict::Bad);
        let mut ping = start(0);
        ping[24 + 3] = 6;
        assert_eq!(check(&ping), Verdict::Bad);
        let mut on_stream = start(0);
        on_stream[24 + 8] = 1;
        assert_eq!(check(&on_stream), Verdict::Bad);
        let mut odd = start(1);
        odd[24 + 2] = 5;
        assert_eq!(check(&odd), Verdict::Bad);
    }

    #[tokio::test]
    async fn reads_only_what_it_needs_and_keeps_the_rest() {
        let (mut client, mut server) = tokio::io::duplex(1 << 16);
        let good = start(2);
        let mut sent = good.clone();
        sent.extend_from_slice(b"tail");
        let head = Bytes::copy_from_slice(&sent[..18]);
        let reader = tokio::spawn(async move { read_preface(&mut server, head).await });
        client.write_all(&sent[18..30]).await.unwrap();
        tokio::task::yield_now().await;
        client.write_all(&sent[30..]).await.unwrap();
        assert_eq!(reader.await.unwrap(), Preface::Ready(Bytes::from(sent)));

        let (client, mut server) = tokio::io::duplex(1 << 16);
        drop(client);
        assert_eq!(
            read_preface(&mut server, Bytes::from_static(PREFACE_LINE)).await,
            Preface::Closed
        );
        let (mut client, mut server) = tokio::io::duplex(1 << 16);
        client.write_all(&start(65)).await.unwrap();
        assert_eq!(read_preface(&mut server, Bytes::new()).await, Preface::Bad);
    }
}
