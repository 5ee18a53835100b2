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
mod tests {
    use std::path::Path;

    use std::time::Duration;

    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    use super::*;

    const CERTS: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/certs");

    fn server_config(versions: &[&'static rustls::SupportedProtocolVersion]) -> Arc<ServerConfig> {
        let base = crate::tls::load_server_config(
            &Path::new(CERTS).join("example.crt"),
            &Path::new(CERTS).join("example.key"),
        )
        .unwrap();
        let mut config = ServerConfig::builder_with_provider(crate::tls::provider())
            .with_protocol_versions(versions)
            .unwrap()
            .with_no_client_auth()
            .with_cert_resolver(Arc::clone(&base.cert_resolver));
        config.session_storage = Arc::clone(&base.session_storage);
        config.ticketer = Arc::clone(&base.ticketer);
        Arc::new(config)
    }

    fn client() -> tokio_rustls::TlsConnector {
        tokio_rustls::TlsConnector::from(crate::tls::test_client_config(
            &Path::new(CERTS).join("example.crt"),
        ))
    }

    /// A listener on 127.0.0.1:0 whose first connection goes to `serve`.
    async fn serve_once<T, F, Fut>(serve: F) -> (std::net::SocketAddr, tokio::task::JoinHandle<T>)
    where
        F: FnOnce(TcpStream) -> Fut + Send + 'static,
        Fut: std::future::Future<Output = T> + Send + 'static,
        T: Send + 'static,
    {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let task = tokio::spawn(async move {
            let (tcp, _) = listener.accept().await.unwrap();
            serve(tcp).await
        });
        (addr, task)
    }

    /// A TLS client connection to `addr` (a new client session cache each).
    async fn connect(addr: std::net::SocketAddr) -> tokio_rustls::client::TlsStream<TcpStream> {
        let tcp = TcpStream::connect(addr).await.unwrap();
        let name = rustls_pki_types::ServerName::try_from("localhost").unwrap();
        client().connect(name, tcp).await.unwrap()
    }

    /// A server that echoes through `ServerTlsStream`, reading with a small
    /// buffer so decrypted records overflow into `plain`; after `total`
    /// bytes it reports whether the connection holds any buffer, then waits
    /// for the client's close.
    async fn echo_server(
        config: Arc<ServerConfig>,
        total: usize,
    ) -> (
        std::net::SocketAddr,
        tokio::task::JoinHandle<(usize, [usize; 3], usize)>,
    ) {
        serve_once(move |tcp| async move {
            let mut tls = accept(tcp, config).await.unwrap();
            let mut buf = [0u8; 1000];
            let mut echoed = 0;
            while echoed < total {
                let n = tls.read(&mut buf).await.unwrap();
                assert!(n > 0, "EOF after {echoed} bytes");
                tls.write_all(&buf[..n]).await.unwrap();
                echoed += n;
            }
            tls.flush().await.unwrap();
            let held = [
                tls.incoming.capacity(),
                tls.plain.capacity(),
                tls.outgoing.capacity(),
            ];
            // The client's close_notify reads as the end.
            let after = tls.read(&mut buf).await.unwrap();
            (echoed, held, after)
        })
        .await
    }

    async fn round_trip(config: Arc<ServerConfig>, rekey: bool) {
        const TOTAL: usize = 1 << 20;
        let (addr, server) = echo_server(config, TOTAL).await;
        let mut tls = connect(addr).await;
        let sent: Vec<u8> = (0..TOTAL).map(|i| (i * 7 % 251) as u8).collect();
        let mut got = vec![0u8; 10_000];
        // Chunk by chunk: each is echoed before the next (10 kB fits in the
        // sockets' buffers, so neither side can block the other).
        for (i, chunk) in sent.chunks(10_000).enumerate() {
            if rekey && i == 50 {
                // A TLS 1.3 KeyUpdate asking the server to update too.
                tls.get_mut().1.refresh_traffic_keys().unwrap();
            }
            tls.write_all(chunk).await.unwrap();
            tls.flush().await.unwrap();
            tls.read_exact(&mut got[..chunk.len()]).await.unwrap();
            assert!(got[..chunk.len()] == *chunk, "chunk {i} echoed differently");
        }
        tls.shutdown().await.unwrap();
        let (echoed, held, after) = server.await.unwrap();
        assert_eq!(echoed, TOTAL);
        assert_eq!(held, [0, 0, 0], "an idle connection holds no buffers");
        assert_eq!(after, 0, "close_notify reads as EOF");
    }

    #[tokio::test]
    async fn echoes_a_mebibyte_over_tls13_and_holds_nothing_when_idle() {
        round_trip(server_config(&[&rustls::version::TLS13]), false).await;
    }

    #[tokio::test]
    async fn echoes_a_mebibyte_over_tls12() {
        round_trip(server_config(&[&rustls::version::TLS12]), false).await;
    }

    #[tokio::test]
    async fn a_key_update_mid_stream_keeps_data_flowing() {
        round_trip(server_config(&[&rustls::version::TLS13]), true).await;
    }

    #[tokio::test]
    async fn a_forged_record_after_the_handshake_is_a_read_error() {
        let config = server_config(&[&rustls::version::TLS13]);
        let (addr, server) = serve_once(move |tcp| async move {
            let mut tls = accept(tcp, config).await.unwrap();
            let mut buf = [0u8; 64];
            let first = tls.read(&mut buf).await.map(|n| buf[..n].to_vec());
            let second = tls.read(&mut buf).await.map_err(|e| e.kind());
            // Failed for good: later calls fail at once instead of waiting.
            let third = tls.read(&mut buf).await.map_err(|e| e.kind());
            let write = tls.write(b"x").await.map_err(|e| e.kind());
            (first.unwrap(), second, third, write)
        })
        .await;
        let mut tls = connect(addr).await;
        tls.write_all(b"hello").await.unwrap();
        tls.flush().await.unwrap();
        // An application-data record whose bytes were not encrypted with
        // the session's keys, written under the client's TLS layer.
        let mut forged = vec![0x17, 0x03, 0x03, 0x00, 0x20];
        forged.extend_from_slice(&[0xAB; 0x20]);
        tls.get_mut().0.write_all(&forged).await.unwrap();
        let (first, second, third, write) = server.await.unwrap();
        assert_eq!(first, b"hello");
        assert_eq!(second.err(), Some(io::ErrorKind::InvalidData));
        assert_eq!(third.err(), Some(io::ErrorKind::InvalidData));
        assert_eq!(write.err(), Some(io::ErrorKind::InvalidData));
        // The client hears why: rustls's bad_record_mac alert.
        let mut buf = [0u8; 16];
        let error = tls.read(&mut buf).await.expect_err("an alert, not data");
        assert!(error.to_string().contains("BadRecordMac"), "{error}");
    }

    #[tokio::test]
    async fn a_client_that_does_not_read_pushes_back_instead_of_growing_buffers() {
        const TOTAL: usize = 32 << 20;
        let config = server_config(&[&rustls::version::TLS13]);
        let (start_tx, start_rx) = tokio::sync::oneshot::channel::<()>();
        let (addr, server) = serve_once(move |tcp| async move {
            let mut tls = accept(tcp, config).await.unwrap();
            let chunk: Vec<u8> = (0..MAX_WRITE).map(|i| (i % 251) as u8).collect();
            let mut sent = 0;
            // Write until the socket pushes back for 300 ms.
            let mut blocked_at = None;
            while sent < TOTAL {
                let n = TOTAL - sent;
                match tokio::time::timeout(
                    Duration::from_millis(300),
                    tls.write(&chunk[..n.min(chunk.len())]),
                )
                .await
                {
                    Ok(written) => sent += written.unwrap(),
                    Err(_) => {
                        blocked_at = Some((sent, tls.outgoing.len()));
                        break;
                    }
                }
            }
            start_tx.send(()).unwrap();
            let rest = chunk.repeat((TOTAL - sent) / MAX_WRITE + 1);
            tls.write_all(&rest[..TOTAL - sent]).await.unwrap();
            tls.shutdown().await.unwrap();
            blocked_at
        })
        .await;
        let mut tls = connect(addr).await;
        start_rx.await.unwrap();
        let mut received = Vec::with_capacity(TOTAL);
        tls.read_to_end(&mut received).await.unwrap();
        let (sent_when_blocked, held) = server.await.unwrap().expect("the writer never blocked");
        assert!(sent_when_blocked < TOTAL);
        assert!(
            held <= MAX_WRITE + 8 * RECORD_OVERHEAD,
            "{held} bytes of ciphertext held for a slow reader"
        );
        assert_eq!(received.len(), TOTAL);
        assert!(
            received
                .iter()
                .enumerate()
                .all(|(i, b)| *b == ((i % MAX_WRITE) % 251) as u8),
            "bytes arrived out of order or changed"
        );
    }

    #[tokio::test]
    async fn a_returning_client_resumes_its_session_after_a_reload() {
        for version in [&rustls::version::TLS13, &rustls::version::TLS12] {
            let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
            let addr = listener.local_addr().unwrap();
            tokio::spawn(async move {
                for _ in 0..2 {
                    // Each connection meets a freshly loaded config, as after
                    // a reload: the resumption state outlives it.
                    let config = server_config(&[version]);
                    let (tcp, _) = listener.accept().await.unwrap();
                    let mut tls = accept(tcp, config).await.unwrap();
                    let mut buf = [0u8; 4];
                    tls.read_exact(&mut buf).await.unwrap();
                    tls.write_all(&buf).await.unwrap();
                    tls.shutdown().await.unwrap();
                }
            });
            // One client config, so one session cache, for both connections.
            let connector = client();
            let mut kinds = Vec::new();
            for _ in 0..2 {
                let tcp = TcpStream::connect(addr).await.unwrap();
                let name = rustls_pki_types::ServerName::try_from("localhost").unwrap();
                let mut tls = connector.connect(name, tcp).await.unwrap();
                tls.write_all(b"ping").await.unwrap();
                let mut got = Vec::new();
                // Reading to the end also takes in TLS 1.3's session tickets.
                tls.read_to_end(&mut got).await.unwrap();
                assert_eq!(got, b"ping");
                kinds.push(tls.get_ref().1.handshake_kind());
            }
            assert_eq!(
                kinds,
                [
                    Some(rustls::HandshakeKind::Full),
                    Some(rustls::HandshakeKind::Resumed)
                ],
                "{version:?}"
            );
        }
    }

    #[tokio::test]
    async fn a_fin_without_close_notify_reads_as_the_end() {
        let config = server_config(&[&rustls::version::TLS13]);
        let (addr, server) = serve_once(move |tcp| async move {
            let mut tls = accept(tcp, config).await.unwrap();
            let mut got = Vec::new();
            let end = tls.read_to_end(&mut got).await.map_err(|e| e.kind());
            (got, end)
        })
        .await;
        let mut tls = connect(addr).await;
        tls.write_all(b"bye").await.unwrap();
        tls.flush().await.unwrap();
        // The client's TCP side closes; no TLS close_notify is sent.
        tls.get_mut().0.shutdown().await.unwrap();
        let (got, end) = server.await.unwrap();
        assert_eq!(got, b"bye");
        assert_eq!(end, Ok(3), "the same as a FIN on a plain connection");
    }

    #[tokio::test]
    async fn plain_http_fails_the_handshake_with_an_alert() {
        let config = server_config(&[&rustls::version::TLS13, &rustls::version::TLS12]);
        let (addr, server) =
            serve_once(
                move |tcp| async move { accept(tcp, config).await.err().map(|e| e.to_string()) },
            )
            .await;
        let mut tcp = TcpStream::connect(addr).await.unwrap();
        tcp.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .unwrap();
        let error = server.await.unwrap().expect("the handshake must fail");
        assert!(error.starts_with("TLS:"), "{error}");
        let mut reply = Vec::new();
        let _ = tcp.read_to_end(&mut reply).await;
        assert_eq!(reply.first(), Some(&0x15), "an alert record: {reply:?}");
    }

    #[tokio::test]
    async fn a_client_that_leaves_mid_handshake_is_an_error() {
        let config = server_config(&[&rustls::version::TLS13]);
        let (addr, server) =
            serve_once(move |tcp| async move { accept(tcp, config).await.err() }).await;
        let mut tcp = TcpStream::connect(addr).await.unwrap();
        // The first bytes of a ClientHello record, then gone.
        tcp.write_all(&[0x16, 0x03, 0x01, 0x02, 0x00, 0x01])
            .await
            .unwrap();
        drop(tcp);
        let error = server.await.unwrap().expect("the handshake must fail");
        assert!(matches!(error, TlsStreamError::HandshakeEof), "{error:?}");
    }
}
