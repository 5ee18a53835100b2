//! The relay's unit tests: the processor's table and property tests (no
//! sockets), the driver's timers on tokio's paused clock over in-memory
//! duplex pipes, and the driver over real TCP sockets.

mod driver;
mod processor;
mod tcp;

use std::time::Duration;

use super::RelayConfig;

/// A relay config with the given idle timeout and ping interval (seconds),
/// 5 s for a Pong, 2 s for the closing handshake, and no limits.
fn config(idle: Option<u64>, ping: Option<u64>) -> RelayConfig {
    RelayConfig {
        idle_timeout: idle.map(Duration::from_secs),
        ping_interval: ping.map(Duration::from_secs),
        pong_timeout: Duration::from_secs(5),
        close_timeout: Duration::from_secs(2),
        max_message_size: None,
        send_timeout: None,
    }
}

/// Encodes a frame the way a peer would (7, 16 or 64-bit length, masked
/// when a key is given). Written here, not taken from `ws::frame`, so that
/// the tests do not share the code they check.
fn frame(fin: bool, op: u8, payload: &[u8], mask: Option<[u8; 4]>) -> Vec<u8> {
    let mut v = vec![(u8::from(fin) << 7) | op];
    let m = if mask.is_some() { 0x80 } else { 0 };
    match payload.len() {
        n if n < 126 => v.push(m | n as u8),
        n if n <= 0xFFFF => {
            v.push(m | 126);
            v.extend_from_slice(&(n as u16).to_be_bytes());
        }
        n => {
            v.push(m | 127);
            v.extend_from_slice(&(n as u64).to_be_bytes());
        }
    }
    match mask {
        Some(key) => {
            v.extend_from_slice(&key);
            v.extend(payload.iter().enumerate().map(|(i, b)| b ^ key[i % 4]));
        }
        None => v.extend_from_slice(payload),
    }
    v
}

/// A Close payload: the code, then the reason.
fn close_payload(code: u16, reason: &str) -> Vec<u8> {
    let mut p = code.to_be_bytes().to_vec();
    p.extend_from_slice(reason.as_bytes());
    p
}

/// `n` bytes that are not all alike, so a misplaced byte shows.
fn pattern(n: usize) -> Vec<u8> {
    (0..n).map(|i| (i * 7 % 251) as u8).collect()
}

/// Every idle connection holds one relay: keep it small (it was 1,200
/// bytes before injected frames were stored compactly, and 800 before the
/// pool's settings were shared and the handshake's leftover bytes boxed).
#[test]
fn relay_state_stays_small() {
    use std::mem::size_of;
    let size = size_of::<super::Relay<tokio::net::TcpStream, tokio::net::TcpStream>>();
    assert!(size <= 800, "Relay grew to {size} bytes");
    // What berth runs: the client side is an io::ClientStream.
    let size = size_of::<super::Relay<crate::io::ClientStream, tokio::net::TcpStream>>();
    assert!(
        size <= 800,
        "Relay<ClientStream, TcpStream> grew to {size} bytes"
    );
    assert!(size_of::<super::Inject>() <= 24);
}

/// Each stop reason is kept as given (the first one wins) and tells the
/// peers its own Close.
#[test]
fn stop_reasons_keep_their_close() {
    use super::{EndReason, PeerEnd, StopHandle, StopReason};
    let cases = [
        (StopReason::Drain, EndReason::Drained, 1012, 1001),
        (StopReason::Shutdown, EndReason::Shutdown, 1001, 1001),
        (StopReason::Rebalance, EndReason::Rebalanced, 1012, 1001),
    ];
    for (reason, end, client, backend) in cases {
        let handle = StopHandle::default();
        handle.stop(reason);
        let later = match reason {
            StopReason::Shutdown => StopReason::Drain,
            _ => StopReason::Shutdown,
        };
        handle.stop(later);
        assert_eq!(handle.reason(), Some(reason));
        let ending = reason.ending();
        assert_eq!(ending.reason, end);
        assert!(matches!(ending.client, PeerEnd::Close(c, _) if c == client));
        assert!(matches!(ending.backend, PeerEnd::Close(c, _) if c == backend));
    }
}
