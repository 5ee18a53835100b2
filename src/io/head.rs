//! A connection's first request head, read before hyper sees the
//! connection.
//!
//! Two reasons to read it here rather than in hyper: size and memory.
//! `max_header_bytes` needs the request line's length (over the limit is
//! `414`, a head over it `431`), which hyper does not report; and hyper
//! gives every connection an 8 KiB read buffer and an 8 KiB write buffer
//! from its first byte, which a client that never finishes its head (a
//! slowloris) would hold for the whole `handshake_timeout`. Here a
//! connection holds only the bytes it has sent, in a buffer that grows from
//! 512 bytes; hyper starts once the head is complete and reads those bytes
//! again first (`ClientStream::unread`).
//!
//! [`Scanner`] is the pure part: bytes in, a verdict out. [`read_head`]
//! feeds it from a stream; the caller sets the time limit.

use std::future::poll_fn;
use std::pin::Pin;

use bytes::Bytes;
use tokio::io::{AsyncRead, ReadBuf};

/// The buffer's first size, and the least room it offers each read.
const READ_MIN: usize = 512;

/// What the first bytes of a connection turned out to be.
#[derive(Debug, PartialEq, Eq)]
pub enum Head {
    /// A complete head within the limit, or bytes that are not an HTTP/1
    /// head at all (hyper answers those with its own `400`): hyper reads
    /// these bytes first. They may run past the head (a body, a pipelined
    /// request).
    Ready(Bytes),
    /// The request line alone is longer than the limit: `414`.
    LineTooLong,
    /// The head is longer than the limit: `431`.
    TooLarge,
    /// The client closed the connection (or it failed) before a complete
    /// head.
    Closed,
}

/// The scanner's verdict on the bytes so far.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// More bytes are needed.
    More,
    /// The head ends at this offset (after its empty line).
    Complete(usize),
    /// A byte no HTTP/1 head contains (a control character, e.g. a TLS
    /// ClientHello sent to a plain listener): hyper is left to reject it.
    NotHttp,
    LineTooLong,
    TooLarge,
}

/// Finds the end of a request head and checks its size, incrementally:
/// each byte is looked at once however the head arrives.
///
/// The head's length counts every byte from the connection's first, empty
/// lines before the request line included (hyper skips those too). A line
/// ends at LF; a CR before it is not counted as content, so `\r\n` and a
/// bare `\n` both end a line, and an empty line ends the head.
#[derive(Debug)]
pub struct Scanner {
    max: usize,
    scanned: usize,
    /// Bytes of the current line other than CR.
    line_len: usize,
    /// Whether the request line has started (leading empty lines skipped).
    started: bool,
    /// Whether the request line has ended.
    line_done: bool,
}

impl Scanner {
    pub fn new(max: usize) -> Scanner {
        Scanner {
            max,
            scanned: 0,
            line_len: 0,
            started: false,
            line_done: false,
        }
    }

    /// Looks at the bytes of `buf` not seen yet (`buf` only ever grows).
    pub fn feed(&mut self, buf: &[u8]) -> Verdict {
        let from = self.scanned;
        self.scanned = buf.len();
        for (i, &b) in buf.iter().enumerate().skip(from) {
            let end = i + 1;
            match b {
                b'\n' if self.line_len == 0 => {
                    if self.started {
                        return if end > self.max {
                            Verdict::TooLarge
                        } else {
                            Verdict::Complete(end)
                        };
                    }
                }
                b'\n' => {
                    if !self.line_done {
                        if end > self.max {
                            return Verdict::LineTooLong;
                        }
                        self.line_done = true;
                    }
                    self.line_len = 0;
                }
                b'\r' => {}
                b'\t' => self.line_len += 1,
                0..=0x1f | 0x7f => return Verdict::NotHttp,
                _ => {
                    self.started = true;
                    self.line_len += 1;
                }
            }
        }
        if buf.len() > self.max {
            if self.line_done {
                Verdict::TooLarge
            } else {
                Verdict::LineTooLong
            }
        } else {
            Verdict::More
        }
    }
}

/// Reads until a complete head (or a verdict) with at most `max` + 1 bytes
/// read; see [`Head`]. Cancel-safe in the sense that matters: dropping it
/// drops only the bytes read so far.
pub async fn read_head<S: AsyncRead + Unpin>(stream: &mut S, max: usize) -> Head {
    let mut buf: Vec<u8> = Vec::new();
    let mut scanner = Scanner::new(max);
    loop {
        // Grows by doubling from READ_MIN, never past one byte over the
        // limit (enough to tell that the head is too large).
        buf.reserve(READ_MIN);
        let start = buf.len();
        let room = (buf.capacity() - start).min(max + 1 - start);
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
            return Head::Closed;
        }
        match scanner.feed(&buf) {
            Verdict::More => {}
            Verdict::Complete(_) | Verdict::NotHttp => return Head::Ready(Bytes::from(buf)),
            Verdict::LineTooLong => return Head::LineTooLong,
            Verdict::TooLarge => return Head::TooLarge,
        }
    }
}

/// The whole response berth sends for a head it refuses (the connection is
/// closed after it).
pub fn refusal(status: u16) -> &'static [u8] {
    match status {
        414 => {
            b"HTTP/1.1 414 URI Too Long\r\ncontent-type: text/plain; charset=utf-8\r\n\
                 content-length: 29\r\nconnection: close\r\n\r\nthe request line is too long\n"
        }
        _ => {
            b"HTTP/1.1 431 Request Header Fields Too Large\r\n\
               content-type: text/plain; charset=utf-8\r\ncontent-length: 30\r\n\
               connection: close\r\n\r\nthe request head is too large\n"
        }
    }
}

#[cfg(test)]
mod tests {
    use tokio::io::AsyncWriteExt;

    use super::*;

    /// The verdict on `input` fed whole, and fed one byte at a time.
    fn verdicts(input: &[u8], max: usize) -> (Verdict, Verdict) {
        let whole = Scanner::new(max).feed(input);
        let mut s = Scanner::new(max);
        let mut bytewise = Verdict::More;
        for end in 1..=input.len() {
            bytewise = s.feed(&input[..end]);
            if bytewise != Verdict::More {
                break;
            }
        }
        (whole, bytewise)
    }

    #[test]
    fn scanner_verdicts() {
        let get = b"GET /chat HTTP/1.1\r\nHost: a\r\n\r\n";
        let cases: &[(&[u8], usize, Verdict)] = &[
            (get, 64, Verdict::Complete(get.len())),
            (get, get.len(), Verdict::Complete(get.len())),
            (get, get.len() - 1, Verdict::TooLarge),
            // The request line (20 bytes through its LF) is over the limit.
            (get, 19, Verdict::LineTooLong),
            (get, 20, Verdict::TooLarge),
            (b"GET / HTTP/1.1\n\n", 64, Verdict::Complete(16)),
            (b"GET / HTTP/1.1\r\n\r\nbody", 64, Verdict::Complete(18)),
            // Leading empty lines are skipped but counted.
            (b"\r\n\r\nGET / HTTP/1.1\r\n\r\n", 64, Verdict::Complete(22)),
            (b"GET / HTTP/1.1\r\nA: b\r\n", 64, Verdict::More),
            (b"GET / HTTP/1.1\r\nA: b\r\n", 21, Verdict::TooLarge),
            (b"GET /aaaaaaaaaaaaaaa", 19, Verdict::LineTooLong),
            (b"GET /aaaaaaaaaaaaaaa", 20, Verdict::More),
            (
                b"GET / HTTP/1.1\r\nA:\tb\r\n\r\n",
                64,
                Verdict::Complete(24),
            ),
            (b"\x16\x03\x01\x02\x00", 64, Verdict::NotHttp),
            (b"GET / HTTP/1.1\r\nA: \x00\r\n\r\n", 64, Verdict::NotHttp),
            (b"GET / HTTP/1.1\r\nA: \x7f\r\n\r\n", 64, Verdict::NotHttp),
            (
                b"GET /caf\xc3\xa9 HTTP/1.1\r\n\r\n",
                64,
                Verdict::Complete(23),
            ),
            (b"", 64, Verdict::More),
            (b"\r\n\r\n", 64, Verdict::More),
            (b"\r\n\r\n\r\n", 5, Verdict::LineTooLong),
        ];
        for (input, max, expected) in cases {
            let (whole, bytewise) = verdicts(input, *max);
            let shown = String::from_utf8_lossy(input);
            assert_eq!(whole, *expected, "whole {shown:?} max {max}");
            assert_eq!(bytewise, *expected, "bytewise {shown:?} max {max}");
        }
    }

    #[test]
    fn refusals_are_whole_responses() {
        for status in [414, 431] {
            let text = std::str::from_utf8(refusal(status)).unwrap();
            let (head, body) = text.split_once("\r\n\r\n").unwrap();
            assert!(head.starts_with(&format!("HTTP/1.1 {status} ")), "{head}");
            let length: usize = head
                .lines()
                .find_map(|l| l.strip_prefix("content-length: "))
                .unwrap()
                .parse()
                .unwrap();
            assert_eq!(body.len(), length, "{status}");
        }
    }

    #[tokio::test]
    async fn read_head_holds_only_what_arrived() {
        let (mut client, mut server) = tokio::io::duplex(1 << 16);
        let reader = tokio::spawn(async move {
            let head = read_head(&mut server, 1024).await;
            (head, server)
        });
        client.write_all(b"GET / HTTP/1.1\r\nHo").await.unwrap();
        tokio::task::yield_now().await;
        client.write_all(b"st: a\r\n\r\nrest").await.unwrap();
        let (head, _) = reader.await.unwrap();
        assert_eq!(
            head,
            Head::Ready(Bytes::from_static(b"GET / HTTP/1.1\r\nHost: a\r\n\r\nrest"))
        );
    }

    #[tokio::test]
    async fn read_head_stops_one_byte_past_the_limit() {
        let (mut client, mut server) = tokio::io::duplex(1 << 20);
        let mut big = b"GET / HTTP/1.1\r\n".to_vec();
        big.extend(std::iter::repeat_n(b'a', 5000));
        client.write_all(&big).await.unwrap();
        assert_eq!(read_head(&mut server, 4096).await, Head::TooLarge);
        let (mut client, mut server) = tokio::io::duplex(1 << 20);
        client.write_all(b"GET /").await.unwrap();
        client.write_all(&[b'x'; 5000]).await.unwrap();
        assert_eq!(read_head(&mut server, 4096).await, Head::LineTooLong);
        let (client, mut server) = tokio::io::duplex(1 << 20);
        drop(client);
        assert_eq!(read_head(&mut server, 4096).await, Head::Closed);
    }
}
