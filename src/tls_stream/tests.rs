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
