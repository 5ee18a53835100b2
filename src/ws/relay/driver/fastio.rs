//! The relay's shortcut past tokio's `poll_read`/`poll_write` for a plain
//! TCP socket: [`RelayIo`] says whether a stream is one, and [`read`] and
//! [`write`] then go through the socket's readiness directly. It owns no
//! task and no state beyond the one flag per direction the driver keeps.
//!
//! Why: per wake-up the relay reads the direction that woke it, reads it
//! again to learn it ran dry, and looks at the other direction, which
//! almost always has nothing. Through `poll_read` each look costs a coop
//! budget step and a lock of the socket's waker list even when nothing is
//! there. Here a look at a socket whose waker is known to be registered
//! (the last look ended in Pending and no readiness came since) is one
//! atomic load; a read that comes back short clears the readiness as
//! tokio's own `poll_read` does (edge-triggered epoll: the socket is
//! drained), so the next look costs no syscall either.

use std::io;
use std::task::{ready, Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, DuplexStream, Interest};
use tokio::net::TcpStream;

use crate::io::ClientStream;

/// A stream the relay can move bytes over; a plain TCP socket says so, and
/// is then read and written through its readiness (see the module docs).
pub trait RelayIo: AsyncRead + AsyncWrite + Unpin {
    /// The TCP socket underneath, when reads and writes may go to it
    /// directly (no TLS, no bytes read ahead of it).
    fn tcp(&self) -> Option<&TcpStream> {
        None
    }
}

impl RelayIo for TcpStream {
    #[inline]
    fn tcp(&self) -> Option<&TcpStream> {
        Some(self)
    }
}

impl RelayIo for ClientStream {
    #[inline]
    fn tcp(&self) -> Option<&TcpStream> {
        self.plain_tcp()
    }
}

/// In-memory pipes (the relay's own tests) take the general path.
impl RelayIo for DuplexStream {}

/// Reads into `buf` from `tcp`. `armed` is the direction's note that its
/// read waker is registered with the socket: the last read ended in
/// Pending, and no readiness has been seen since (readiness is set before
/// the waker is taken, so while none shows the waker is still there).
/// `Ready(Ok(0))` is the end of the stream.
pub(super) fn read(
    cx: &mut Context<'_>,
    tcp: &TcpStream,
    armed: &mut bool,
    buf: &mut [u8],
) -> Poll<io::Result<usize>> {
    let len = buf.len();
    loop {
        let mut ran = false;
        let mut short = 0;
        let result = tcp.try_io(Interest::READABLE, || {
            ran = true;
            let n = tcp.try_read(buf)?;
            if n > 0 && n < len {
                // Drained: have tokio clear the readiness (as its
                // `poll_read` does), so the next look needs no syscall.
                short = n;
                return Err(io::ErrorKind::WouldBlock.into());
            }
            Ok(n)
        });
        if ran {
            *armed = false;
        }
        match result {
            Ok(n) => return Poll::Ready(Ok(n)),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                if short > 0 {
                    return Poll::Ready(Ok(short));
                }
                if *armed {
                    return Poll::Pending;
                }
                // Register the waker. Only a Pending with budget left is
                // one from the socket (an exhausted coop budget returns
                // Pending without registering, and wakes the task itself).
                let budget = tokio::task::coop::has_budget_remaining();
                match tcp.poll_read_ready(cx) {
                    Poll::Pending => {
                        *armed = budget;
                        return Poll::Pending;
                    }
                    Poll::Ready(r) => r?,
                }
            }
            Err(e) => return Poll::Ready(Err(e)),
        }
    }
}

/// Writes from `buf` to `tcp`: straight to the socket while it is
/// writable, through `poll_write_ready` (which registers the waker) once
/// it is not.
pub(super) fn write(cx: &mut Context<'_>, tcp: &TcpStream, buf: &[u8]) -> Poll<io::Result<usize>> {
    let len = buf.len();
    loop {
        let mut short = 0;
        let result = tcp.try_io(Interest::WRITABLE, || {
            let n = tcp.try_write(buf)?;
            if n > 0 && n < len {
                // The socket's buffer is full (as tokio's `poll_write`
                // concludes): clear the readiness.
                short = n;
                return Err(io::ErrorKind::WouldBlock.into());
            }
            Ok(n)
        });
        match result {
            Ok(n) => return Poll::Ready(Ok(n)),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                if short > 0 {
                    return Poll::Ready(Ok(short));
                }
                ready!(tcp.poll_write_ready(cx))?;
            }
            Err(e) => return Poll::Ready(Err(e)),
        }
    }
}
