//! The relay over real TCP sockets on 127.0.0.1 (the sockets' own
//! readiness, not in-memory pipes): every byte arrives, in order, both
//! ways at once, through short reads, full socket buffers and a reader
//! that starts late, and the closing handshake ends the relay with exact
//! counts.

use std::time::Duration;

use bytes::Bytes;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use super::{close_payload, config, frame};
use crate::ws::frame::opcode;
use crate::ws::relay::{relay, Initiator};

/// Two connected sockets: (the far end, the end the relay holds).
async fn pair() -> (TcpStream, TcpStream) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let far = TcpStream::connect(listener.local_addr().unwrap())
        .await
        .unwrap();
    let (near, _) = listener.accept().await.unwrap();
    (far, near)
}

/// `count` binary messages of `size` bytes, each payload byte derived from
/// its position, then a Close 1000; masked when a key is given.
fn stream(count: usize, size: usize, mask: Option<[u8; 4]>, seed: u8) -> (Vec<u8>, usize) {
    let mut out = Vec::new();
    for i in 0..count {
        let payload: Vec<u8> = (0..size)
            .map(|j| (i as u8).wrapping_mul(31) ^ (j as u8) ^ seed)
            .collect();
        out.extend(frame(true, opcode::BINARY, &payload, mask));
    }
    let data = out.len();
    out.extend(frame(
        true,
        opcode::CLOSE,
        &close_payload(1000, "done"),
        mask,
    ));
    (out, data)
}

#[tokio::test]
async fn every_byte_crosses_both_ways_over_tcp_and_the_counts_are_exact() {
    let (mut client, client_side) = pair().await;
    let (mut backend, backend_side) = pair().await;
    let relay = tokio::spawn(relay(
        client_side,
        Bytes::new(),
        backend_side,
        Bytes::new(),
        config(None, None),
        None,
        None,
    ));
    // Small and large messages (many frames per read, frames across
    // reads), more than the sockets' buffers hold, both ways at once.
    let (up, up_data) = stream(3000, 700, Some([1, 2, 3, 4]), 7);
    let (down, down_data) = stream(3000, 1100, None, 9);
    let (up_len, down_len) = (up.len(), down.len());
    let (mut client_rd, mut client_wr) = client.split();
    let (mut backend_rd, mut backend_wr) = backend.split();
    let send_up = async {
        for chunk in up.chunks(5000) {
            client_wr.write_all(chunk).await.unwrap();
        }
    };
    let send_down = async {
        backend_wr.write_all(&down).await.unwrap();
    };
    let recv_up = async {
        // Start late, so that the relay meets a full socket buffer.
        tokio::time::sleep(Duration::from_millis(200)).await;
        let mut got = vec![0u8; up_len];
        backend_rd.read_exact(&mut got).await.unwrap();
        got
    };
    let recv_down = async {
        let mut got = vec![0u8; down_len];
        client_rd.read_exact(&mut got).await.unwrap();
        got
    };
    // A lost wake-up would hang: bound it.
    let all = async { tokio::join!(send_up, send_down, recv_up, recv_down) };
    let (_, _, at_backend, at_client) = tokio::time::timeout(Duration::from_secs(30), all)
        .await
        .expect("the relay stalled");
    assert!(
        at_backend == up,
        "the backend got other bytes than the client sent"
    );
    assert!(
        at_client == down,
        "the client got other bytes than the backend sent"
    );
    // Both Close frames have crossed: each peer then sees the end.
    let mut rest = Vec::new();
    assert_eq!(client.read_to_end(&mut rest).await.unwrap(), 0);
    assert_eq!(backend.read_to_end(&mut rest).await.unwrap(), 0);
    let outcome = tokio::time::timeout(Duration::from_secs(10), relay)
        .await
        .unwrap()
        .unwrap();
    // Both peers sent their Close at once: either may count as first.
    assert_ne!(outcome.initiator, Initiator::Internal);
    assert_eq!(outcome.code, Some(1000));
    assert_eq!(outcome.client_to_backend.messages, 3000);
    assert_eq!(outcome.backend_to_client.messages, 3000);
    assert_eq!(outcome.client_to_backend.frames, 3001);
    assert_eq!(outcome.backend_to_client.frames, 3001);
    assert_eq!(outcome.client_to_backend.bytes, up_len as u64);
    assert_eq!(outcome.backend_to_client.bytes, down_len as u64);
    assert!(up_data < up_len && down_data < down_len);
}
