//! The server side of a TLS connection, built on rustls's unbuffered API so
//! that an idle connection holds no TLS buffers: only the TLS state itself.
//!
//! rustls's buffered `ServerConnection` keeps a 4 KiB receive buffer for the
//! life of every connection. Here ciphertext is read into a per-thread
//! scratch buffer and processed there; a connection keeps bytes of its own
//! only while they are in flight:
//!
//! - `incoming`: the tail of a record that has not fully arrived yet;
//! - `plain`: decrypted bytes the reader's buffer had no room for;
//! - `outgoing`: encrypted bytes the socket has not taken yet.
//!
//! Each is freed as soon as it is empty again.

use std::cell::RefCell;
use std::future::poll_fn;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};

use rustls::server::UnbufferedServerConnection;
use rustls::unbuffered::{
    ConnectionState, EncodeError, EncryptError, InsufficientSizeError, UnbufferedStatus,
};
use rustls::ServerConfig;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

/// Ciphertext read from the socket per read call.
const READ_CHUNK: usize = 32 * 1024;
/// Ciphertext read per read call during the handshake.
const HANDSHAKE_READ: usize = 8 * 1024;
/// Plaintext accepted per write call (bounds what `outgoing` can hold).
const MAX_WRITE: usize = 64 * 1024;
/// Per-record overhead of TLS 1.2/1.3 ciphertext is well under this.
const RECORD_OVERHEAD: usize = 64;
/// rustls's largest plaintext fragment.
const MAX_FRAGMENT: usize = 16 * 1024;

thread_local! {
    /// Where ciphertext is read and decrypted in place; one per runtime
    /// thread, shared by all of its connections.
    static SCRATCH: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
    /// Where outgoing records are encrypted before they are written; the
    /// part the socket does not take is copied to the connection's
    /// `outgoing`.
    static WRITE_SCRATCH: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
}

/// Errors of a TLS connection.
#[derive(Debug, thiserror::Error)]
pub enum TlsStreamError {
    #[error("TLS: {0}")]
    Tls(#[from] rustls::Error),
    #[error("TLS: peer closed the connection during the handshake")]
    HandshakeEof,
    #[error("TLS: the connection is closed")]
    Closed,
    #[error("TLS: unexpected state {0}")]
    Unexpected(&'static str),
    #[error("TLS: cannot encode a record: {0}")]
    Encode(String),
    #[error(transparent)]
    Io(#[from] io::Error),
}

impl From<TlsStreamError> for io::Error {
    fn from(e: TlsStreamError) -> io::Error {
        match e {
            TlsStreamError::Io(e) => e,
            TlsStreamError::Closed => io::Error::new(io::ErrorKind::BrokenPipe, e),
            TlsStreamError::HandshakeEof => io::Error::new(io::ErrorKind::UnexpectedEof, e),
            other => io::Error::new(io::ErrorKind::InvalidData, other),
        }
    }
}

/// A server-side TLS stream over a TCP socket.
pub struct ServerTlsStream {
    tcp: TcpStream,
    conn: UnbufferedServerConnection,
    incoming: Vec<u8>,
    plain: Vec<u8>,
    plain_pos: usize,
    outgoing: Vec<u8>,
    out_pos: usize,
    /// The peer sent close_notify, or the socket reached EOF.
    read_eof: bool,
    /// berth queued its own close_notify.
    close_sent: bool,
    /// rustls failed the connection (a bad record, a protocol violation):
    /// every later read and write gets this error.
    broken: Option<io::ErrorKind>,
}

/// What to do once the connection can carry application data.
enum Goal<'a> {
    /// Nothing: reading, or finishing the handshake.
    Read,
    /// Encrypt this plaintext.
    Write(&'a [u8]),
    /// Queue close_notify.
    Close,
}

/// Where processing stopped.
#[derive(PartialEq, Eq, Debug)]
enum Reached {
    /// The handshake needs more bytes from the peer.
    Blocked,
    /// Application data may flow (the goal was carried out).
    Traffic,
    /// Both sides sent close_notify.
    Closed,
}

/// Accepts a TLS connection: runs the handshake to completion.
pub async fn accept(
    tcp: TcpStream,
    config: Arc<ServerConfig>,
) -> Result<ServerTlsStream, TlsStreamError> {
    accept_after(tcp, config, Vec::new()).await
}

/// [`accept`] on a connection whose first bytes were already read (past a
/// PROXY protocol header): `early` is processed before the socket is read.
pub async fn accept_after(
    tcp: TcpStream,
    config: Arc<ServerConfig>,
    early: Vec<u8>,
) -> Result<ServerTlsStream, TlsStreamError> {
    let mut stream = ServerTlsStream {
        tcp,
        conn: UnbufferedServerConnection::new(config)?,
        incoming: early,
        plain: Vec::new(),
        plain_pos: 0,
        outgoing: Vec::new(),
        out_pos: 0,
        read_eof: false,
        close_sent: false,
        broken: None,
    };
    poll_fn(|cx| stream.poll_handshake(cx)).await?;
    Ok(stream)
}

impl ServerTlsStream {
    /// Whether the handshake resumed an earlier session.
    pub fn resumed(&self) -> bool {
        self.conn.handshake_kind() == Some(rustls::HandshakeKind::Resumed)
    }

    /// Whether the client and berth agreed on HTTP/2 in ALPN.
    pub fn alpn_is_h2(&self) -> bool {
        self.conn.alpn_protocol() == Some(b"h2")
    }

    fn poll_handshake(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), TlsStreamError>> {
        loop {
            let reached = match self.process_carried(Goal::Read, None) {
                Ok(reached) => reached,
                Err(e) => {
                    self.send_alert(cx);
                    return Poll::Ready(Err(e));
                }
            };
            // Our flight goes out before we wait for the peer's.
            ready!(self.poll_write_out(cx))?;
            match reached {
                Reached::Traffic => {
                    if self.incoming.is_empty() {
                        self.incoming = Vec::new();
                    }
                    return Poll::Ready(Ok(()));
                }
                Reached::Closed => return Poll::Ready(Err(TlsStreamError::HandshakeEof)),
                Reached::Blocked => {}
            }
            if self.read_eof {
                return Poll::Ready(Err(TlsStreamError::HandshakeEof));
            }
            // Handshake messages are read into the per-thread scratch buffer
            // and only the bytes read are added to `incoming` (it lives for
            // the handshake's few round trips): growing `incoming` by a
            // zeroed read-sized chunk per read cost more than the copy.
            let polled = SCRATCH.with(|cell| match cell.try_borrow_mut() {
                Ok(mut scratch) => self.read_handshake(cx, &mut scratch),
                Err(_) => self.read_handshake(cx, &mut Vec::new()),
            });
            match polled {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e.into())),
                Poll::Ready(Ok(0)) => return Poll::Ready(Err(TlsStreamError::HandshakeEof)),
                Poll::Ready(Ok(_)) => {}
            }
        }
    }

    /// Reads once during the handshake, through `scratch`, appending what
    /// came to `incoming`; the number of bytes read (0 at EOF).
    fn read_handshake(
        &mut self,
        cx: &mut Context<'_>,
        scratch: &mut Vec<u8>,
    ) -> Poll<io::Result<usize>> {
        if scratch.len() < HANDSHAKE_READ {
            scratch.resize(HANDSHAKE_READ, 0);
        }
        let mut buf = ReadBuf::new(&mut scratch[..HANDSHAKE_READ]);
        ready!(Pin::new(&mut self.tcp).poll_read(cx, &mut buf))?;
        let n = buf.filled().len();
        self.incoming.extend_from_slice(&scratch[..n]);
        Poll::Ready(Ok(n))
    }

    /// Runs [`process`] over the bytes carried from earlier reads (no new
    /// ones) towards `goal`, and keeps what it did not use.
    /// Records to send go to `target`, or to `outgoing` without one.
    fn process_carried(
        &mut self,
        goal: Goal<'_>,
        target: Option<&mut Vec<u8>>,
    ) -> Result<Reached, TlsStreamError> {
        let mut incoming = std::mem::take(&mut self.incoming);
        let result = process(
            &mut self.conn,
            &mut incoming,
            None,
            &mut self.plain,
            target.unwrap_or(&mut self.outgoing),
            &mut self.read_eof,
            goal,
        );
        if let Ok((used, _)) = &result {
            incoming.drain(..*used);
        }
        self.incoming = incoming;
        result.map(|(_, reached)| reached)
    }

    /// Encrypts `data` into `scratch` and writes what the socket takes now;
    /// the rest waits in `outgoing` and goes first on the next write or
    /// flush. The caller has emptied `outgoing`, so order is kept.
    fn encrypt_and_send(
        &mut self,
        cx: &mut Context<'_>,
        data: &[u8],
        scratch: &mut Vec<u8>,
    ) -> Result<Reached, TlsStreamError> {
        scratch.clear();
        let reached = self.process_carried(Goal::Write(data), Some(scratch))?;
        let mut sent = 0;
        while sent < scratch.len() {
            match Pin::new(&mut self.tcp).poll_write(cx, &scratch[sent..]) {
                Poll::Ready(Ok(0)) => return Err(io::Error::from(io::ErrorKind::WriteZero).into()),
                Poll::Ready(Ok(n)) => sent += n,
                Poll::Ready(Err(e)) => return Err(e.into()),
                Poll::Pending => break,
            }
        }
        self.outgoing.extend_from_slice(&scratch[sent..]);
        Ok(reached)
    }

    /// After a fatal error rustls queues an alert for the peer: send it if
    /// the socket takes it now (best effort; the connection is over).
    fn send_alert(&mut self, cx: &mut Context<'_>) {
        let UnbufferedStatus { state, .. } = self.conn.process_tls_records(&mut []);
        if let Ok(ConnectionState::EncodeTlsData(mut encoder)) = state {
            let mut alert = [0u8; 64];
            if let Ok(n) = encoder.encode(&mut alert) {
                self.outgoing.extend_from_slice(&alert[..n]);
                let _ = self.poll_write_out(cx);
            }
        }
    }

    /// Writes `outgoing` until it is empty (then frees it) or the socket
    /// pushes back.
    fn poll_write_out(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while self.out_pos < self.outgoing.len() {
            let n = ready!(Pin::new(&mut self.tcp).poll_write(cx, &self.outgoing[self.out_pos..]))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            self.out_pos += n;
        }
        if self.outgoing.capacity() > 0 {
            self.outgoing = Vec::new();
        }
        self.out_pos = 0;
        Poll::Ready(Ok(()))
    }

    /// Moves buffered plaintext into `buf`; true if there was any.
    fn take_plain(&mut self, buf: &mut ReadBuf<'_>) -> bool {
        if self.plain_pos >= self.plain.len() {
            return false;
        }
        let n = (self.plain.len() - self.plain_pos).min(buf.remaining());
        buf.put_slice(&self.plain[self.plain_pos..self.plain_pos + n]);
        self.plain_pos += n;
        if self.plain_pos == self.plain.len() {
            self.plain = Vec::new();
            self.plain_pos = 0;
        }
        true
    }

    /// Reads ciphertext once and decrypts what it completes, using `scratch`.
    /// Ready(true) when plaintext reached `buf` (or `plain`), Ready(false)
    /// when more must be read.
    fn read_some(
        &mut self,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
        scratch: &mut Vec<u8>,
    ) -> Poll<io::Result<bool>> {
        let carried = self.incoming.len();
        if scratch.len() < carried + READ_CHUNK {
            scratch.resize(carried + READ_CHUNK, 0);
        }
        scratch[..carried].copy_from_slice(&self.incoming);
        let mut rb = ReadBuf::new(&mut scratch[carried..carried + READ_CHUNK]);
        ready!(Pin::new(&mut self.tcp).poll_read(cx, &mut rb))?;
        let n = rb.filled().len();
        if n == 0 {
            // EOF without close_notify (or inside a record): the end all
            // the same for a proxy.
            self.read_eof = true;
            self.incoming = Vec::new();
            return Poll::Ready(Ok(true));
        }
        let total = carried + n;
        let before = buf.filled().len();
        let result = process(
            &mut self.conn,
            &mut scratch[..total],
            Some(buf),
            &mut self.plain,
            &mut self.outgoing,
            &mut self.read_eof,
            Goal::Read,
        );
        let used = match result {
            Ok((used, _)) => used,
            Err(e) => {
                let e = io::Error::from(e);
                self.broken = Some(e.kind());
                self.incoming = Vec::new();
                self.send_alert(cx);
                // Records decrypted before the bad one are delivered; the
                // error comes with the next read.
                if buf.filled().len() > before || self.plain_pos < self.plain.len() {
                    return Poll::Ready(Ok(true));
                }
                return Poll::Ready(Err(e));
            }
        };
        let rest = &scratch[used..total];
        if rest.is_empty() {
            self.incoming = Vec::new();
        } else {
            self.incoming.clear();
            self.incoming.extend_from_slice(rest);
        }
        let delivered = buf.filled().len() > before || self.plain_pos < self.plain.len();
        Poll::Ready(Ok(delivered || self.read_eof))
    }
}

/// Feeds `data` to rustls until it needs more bytes or application data
/// may flow, then carries out `goal`. Decrypted data goes to `out` while it
/// has room and to `plain` after; TLS records rustls wants sent are
/// appended to `outgoing`. Returns how many bytes of `data` are used up.
fn process(
    conn: &mut UnbufferedServerConnection,
    data: &mut [u8],
    mut out: Option<&mut ReadBuf<'_>>,
    plain: &mut Vec<u8>,
    outgoing: &mut Vec<u8>,
    read_eof: &mut bool,
    goal: Goal<'_>,
) -> Result<(usize, Reached), TlsStreamError> {
    // rustls never reports more to discard than it was given; the clamps
    // keep a broken promise from turning into a panic.
    let len = data.len();
    let mut used = 0;
    loop {
        let UnbufferedStatus { discard, state } = conn.process_tls_records(&mut data[used..]);
        let mut extra = 0;
        match state? {
            ConnectionState::ReadTraffic(mut traffic) => {
                while let Some(record) = traffic.next_record() {
                    let record = record?;
                    extra += record.discard;
                    let mut payload = record.payload;
                    if let Some(out) = out.as_deref_mut() {
                        if plain.is_empty() {
                            let n = payload.len().min(out.remaining());
                            out.put_slice(&payload[..n]);
                            payload = &payload[n..];
                        }
                    }
                    plain.extend_from_slice(payload);
                }
            }
            ConnectionState::EncodeTlsData(mut encoder) => {
                // Offered no room, the encoder says how much it needs: the
                // buffer grows (and is zeroed) by exactly that.
                append_with(outgoing, 0, |buf| encoder.encode(buf))?;
            }
            // The encoded records are in `outgoing`, which is written in
            // order before anything queued after them.
            ConnectionState::TransmitTlsData(transmit) => transmit.done(),
            ConnectionState::PeerClosed => *read_eof = true,
            ConnectionState::Closed => {
                *read_eof = true;
                return Ok(((used + discard).min(len), Reached::Closed));
            }
            ConnectionState::BlockedHandshake => {
                return Ok(((used + discard).min(len), Reached::Blocked))
            }
            ConnectionState::WriteTraffic(mut traffic) => {
                match goal {
                    Goal::Read => {}
                    Goal::Write(data) => {
                        let records = data.len() / MAX_FRAGMENT + 1;
                        let want = data.len() + records * RECORD_OVERHEAD;
                        append_with(outgoing, want, |buf| traffic.encrypt(data, buf))?;
                    }
                    Goal::Close => {
                        append_with(outgoing, RECORD_OVERHEAD, |buf| {
                            traffic.queue_close_notify(buf)
                        })?;
                    }
                }
                return Ok(((used + discard).min(len), Reached::Traffic));
            }
            ConnectionState::ReadEarlyData(_) => {
                return Err(TlsStreamError::Unexpected("early data"))
            }
            _ => return Err(TlsStreamError::Unexpected("unknown")),
        }
        used = (used + discard + extra).min(len);
    }
}

/// rustls's "the buffer you gave me is too small" errors.
trait NeedsRoom: std::fmt::Display {
    fn required_size(&self) -> Option<usize>;
}

impl NeedsRoom for EncodeError {
    fn required_size(&self) -> Option<usize> {
        match self {
            EncodeError::InsufficientSize(InsufficientSizeError { required_size }) => {
                Some(*required_size)
            }
            _ => None,
        }
    }
}

impl NeedsRoom for EncryptError {
    fn required_size(&self) -> Option<usize> {
        match self {
            EncryptError::InsufficientSize(InsufficientSizeError { required_size }) => {
                Some(*required_size)
            }
            _ => None,
        }
    }
}

/// Appends what `write` puts into a buffer to `outgoing`: it is offered
/// `want` bytes of room first, then as many as rustls asks for.
fn append_with<E: NeedsRoom>(
    outgoing: &mut Vec<u8>,
    mut want: usize,
    mut write: impl FnMut(&mut [u8]) -> Result<usize, E>,
) -> Result<(), TlsStreamError> {
    let start = outgoing.len();
    loop {
        outgoing.resize(start + want, 0);
        match write(&mut outgoing[start..]) {
            Ok(n) => {
                outgoing.truncate(start + n);
                return Ok(());
            }
            Err(e) => {
                outgoing.truncate(start);
                match e.required_size() {
                    Some(required) if required > want => want = required,
                    _ => return Err(TlsStreamError::Encode(e.to_string())),
                }
            }
        }
    }
}

fn broken_error(kind: io::ErrorKind) -> io::Error {
    io::Error::new(kind, "TLS: the connection failed earlier")
}

impl AsyncRead for ServerTlsStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        loop {
            if this.take_plain(buf) {
                return Poll::Ready(Ok(()));
            }
            if let Some(kind) = this.broken {
                return Poll::Ready(Err(broken_error(kind)));
            }
            if this.read_eof {
                return Poll::Ready(Ok(()));
            }
            // Records rustls wants to send on its own (session tickets,
            // key update replies) go out whenever the socket takes them.
            if this.out_pos < this.outgoing.len() {
                if let Poll::Ready(Err(e)) = this.poll_write_out(cx) {
                    return Poll::Ready(Err(e));
                }
            }
            let polled = SCRATCH.with(|cell| match cell.try_borrow_mut() {
                Ok(mut scratch) => this.read_some(cx, buf, &mut scratch),
                // Polls do not nest; should one ever, a temporary buffer
                // keeps the stream correct.
                Err(_) => this.read_some(cx, buf, &mut Vec::new()),
            });
            if ready!(polled)? {
                return Poll::Ready(Ok(()));
            }
        }
    }
}

impl AsyncWrite for ServerTlsStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if let Some(kind) = this.broken {
            return Poll::Ready(Err(broken_error(kind)));
        }
        ready!(this.poll_write_out(cx))?;
        if this.close_sent {
            return Poll::Ready(Err(TlsStreamError::Closed.into()));
        }
        if data.is_empty() {
            return Poll::Ready(Ok(0));
        }
        let data = &data[..data.len().min(MAX_WRITE)];
        let written = WRITE_SCRATCH.with(|cell| match cell.try_borrow_mut() {
            Ok(mut scratch) => this.encrypt_and_send(cx, data, &mut scratch),
            // Polls do not nest; should one ever, a temporary buffer keeps
            // the stream correct.
            Err(_) => this.encrypt_and_send(cx, data, &mut Vec::new()),
        });
        match written {
            Ok(Reached::Traffic) => Poll::Ready(Ok(data.len())),
            Ok(_) => Poll::Ready(Err(TlsStreamError::Closed.into())),
            Err(e) => {
                let e = io::Error::from(e);
                this.broken = Some(e.kind());
                Poll::Ready(Err(e))
            }
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        ready!(this.poll_write_out(cx))?;
        Pin::new(&mut this.tcp).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if !this.close_sent && this.broken.is_none() {
            this.close_sent = true;
            // A connection rustls already failed has no close_notify to send.
            let _ = this.process_carried(Goal::Close, None);
        }
        ready!(this.poll_write_out(cx))?;
        Pin::new(&mut this.tcp).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests;
