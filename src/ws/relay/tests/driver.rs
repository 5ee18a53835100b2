//! The driver's timers and endings, on tokio's paused clock over in-memory
//! duplex pipes: minutes of relay time cost milliseconds.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use tokio::io::{duplex, AsyncReadExt, AsyncWriteExt, DuplexStream};
use tokio::task::JoinHandle;
use tokio::time::Instant;

use super::{close_payload, config, frame, pattern};
use crate::metrics::Metrics;
use crate::ws::frame::opcode;
use crate::ws::relay::driver::SCRATCH_LEN;
use crate::ws::relay::{
    relay, Deadline, EndReason, Initiator, Relay, RelayConfig, RelayOutcome, Source, StopHandle,
    StopReason,
};

const KEY: [u8; 4] = [0x11, 0x22, 0x33, 0x44];

/// A frame as a peer reads it: opcode, whether it was masked, and the
/// unmasked payload.
#[derive(Debug, PartialEq, Eq)]
struct Got {
    op: u8,
    masked: bool,
    key: [u8; 4],
    payload: Vec<u8>,
}

impl Got {
    fn close(&self) -> (u16, &str) {
        assert_eq!(self.op, opcode::CLOSE, "expected a Close, got {self:?}");
        let code = u16::from_be_bytes([self.payload[0], self.payload[1]]);
        (code, std::str::from_utf8(&self.payload[2..]).unwrap())
    }
}

/// Reads one frame, or `None` at the end of the stream.
async fn read_frame(s: &mut DuplexStream) -> Option<Got> {
    let mut head = [0u8; 2];
    if s.read(&mut head[..1]).await.unwrap() == 0 {
        return None;
    }
    s.read_exact(&mut head[1..]).await.unwrap();
    let mut len = u64::from(head[1] & 0x7F);
    if len == 126 {
        len = u64::from(s.read_u16().await.unwrap());
    } else if len == 127 {
        len = s.read_u64().await.unwrap();
    }
    let masked = head[1] & 0x80 != 0;
    let mut key = [0u8; 4];
    if masked {
        s.read_exact(&mut key).await.unwrap();
    }
    let mut payload = vec![0u8; len as usize];
    s.read_exact(&mut payload).await.unwrap();
    if masked {
        for (i, b) in payload.iter_mut().enumerate() {
            *b ^= key[i % 4];
        }
    }
    Some(Got {
        op: head[0] & 0x0F,
        masked,
        key,
        payload,
    })
}

/// The far ends of a relay: what the client and the backend hold.
struct Peers {
    client: DuplexStream,
    backend: DuplexStream,
    relay: JoinHandle<RelayOutcome>,
    started: Instant,
}

fn pipes(client_cap: usize, backend_cap: usize) -> [(DuplexStream, DuplexStream); 2] {
    [duplex(client_cap), duplex(backend_cap)]
}

fn start(config: RelayConfig, stop: Option<Arc<StopHandle>>) -> Peers {
    let [(client, client_side), (backend, backend_side)] = pipes(64 * 1024, 64 * 1024);
    let started = Instant::now();
    let relay = tokio::spawn(relay(
        client_side,
        Bytes::new(),
        backend_side,
        Bytes::new(),
        config,
        stop,
        None,
    ));
    Peers {
        client,
        backend,
        relay,
        started,
    }
}

impl Peers {
    /// Checks that `secs` of relay time have passed (the timer wheel may
    /// round a deadline up by a millisecond).
    fn at(&self, secs: u64) {
        let elapsed = self.started.elapsed();
        let want = Duration::from_secs(secs);
        assert!(
            elapsed >= want && elapsed < want + Duration::from_millis(10),
            "{elapsed:?} passed, expected {want:?}"
        );
    }

    async fn client_sends(&mut self, op: u8, payload: &[u8]) {
        let f = frame(true, op, payload, Some(KEY));
        self.client.write_all(&f).await.unwrap();
    }

    async fn backend_sends(&mut self, op: u8, payload: &[u8]) {
        let f = frame(true, op, payload, None);
        self.backend.write_all(&f).await.unwrap();
    }

    async fn client_gets(&mut self) -> Got {
        let got = read_frame(&mut self.client)
            .await
            .expect("client: stream ended");
        assert!(!got.masked, "frames towards the client are not masked");
        got
    }

    async fn backend_gets(&mut self) -> Got {
        let got = read_frame(&mut self.backend)
            .await
            .expect("backend: stream ended");
        assert!(got.masked, "frames towards the backend are masked");
        // berth's keys are random (RFC 6455 §5.3): all zeros has odds of
        // 2^-32, the test client's key is fixed.
        assert_ne!(got.key, [0; 4], "masking key not drawn");
        got
    }

    /// Both peers answer berth's Close; the relay then ends.
    async fn both_answer_close(mut self) -> RelayOutcome {
        self.client_sends(opcode::CLOSE, &close_payload(1001, ""))
            .await;
        self.backend_sends(opcode::CLOSE, &close_payload(1001, ""))
            .await;
        self.relay.await.unwrap()
    }
}

fn text(payload: &[u8]) -> Got {
    Got {
        op: opcode::TEXT,
        masked: false,
        key: [0; 4],
        payload: payload.to_vec(),
    }
}

#[tokio::test(start_paused = true)]
async fn idle_timeout_closes_both_sides_with_1001() {
    let mut p = start(config(Some(30), None), None);
    p.client_sends(opcode::TEXT, b"hi").await;
    assert_eq!(p.backend_gets().await.payload, b"hi");
    // Data resets the idle clock.
    tokio::time::sleep(Duration::from_secs(20)).await;
    p.backend_sends(opcode::TEXT, b"yo").await;
    assert_eq!(p.client_gets().await, text(b"yo"));

    assert_eq!(p.client_gets().await.close(), (1001, "idle timeout"));
    p.at(50);
    assert_eq!(p.backend_gets().await.close(), (1001, "idle timeout"));
    let outcome = p.both_answer_close().await;
    assert_eq!(outcome.initiator, Initiator::Internal);
    assert_eq!(outcome.code, Some(1001));
    assert_eq!(outcome.reason, EndReason::IdleTimeout);
    assert_eq!(outcome.client_to_backend.messages, 1);
    assert_eq!(outcome.backend_to_client.messages, 1);
}

#[tokio::test(start_paused = true)]
async fn berths_ping_is_answered_and_the_pong_never_reaches_the_backend() {
    let mut p = start(config(None, Some(10)), None);
    let ping = p.client_gets().await;
    assert_eq!(ping.op, opcode::PING);
    assert_eq!(ping.payload.len(), 8);
    p.at(10);
    // Someone else's Pong passes; the one echoing berth's token does not.
    p.client_sends(opcode::PONG, b"not ours").await;
    p.client_sends(opcode::PONG, &ping.payload).await;
    p.client_sends(opcode::TEXT, b"after").await;
    assert_eq!(p.backend_gets().await.payload, b"not ours");
    assert_eq!(p.backend_gets().await.payload, b"after");

    // Answered: no heartbeat failure at 15 s, the next Ping at 20 s.
    let again = p.client_gets().await;
    assert_eq!(again.op, opcode::PING);
    assert_ne!(again.payload, ping.payload, "each Ping has a fresh token");
    p.at(20);
    p.client_sends(opcode::PONG, &again.payload).await;
    p.client_sends(opcode::CLOSE, &close_payload(1000, "done"))
        .await;
    // The backend's next frame is the client's Close: nothing else came.
    assert_eq!(p.backend_gets().await.close(), (1000, "done"));
    p.backend_sends(opcode::CLOSE, &close_payload(1000, ""))
        .await;
    assert_eq!(p.client_gets().await.close(), (1000, ""));
    let outcome = p.relay.await.unwrap();
    assert_eq!(outcome.initiator, Initiator::Client);
    assert_eq!(outcome.code, Some(1000));
    assert_eq!(outcome.reason, EndReason::Peer);
}

#[tokio::test(start_paused = true)]
async fn no_pong_in_time_closes_the_backend_and_drops_the_client() {
    let mut p = start(config(None, Some(10)), None);
    assert_eq!(p.client_gets().await.op, opcode::PING);
    assert_eq!(
        p.backend_gets().await.close(),
        (1001, "client unresponsive")
    );
    p.at(15);
    // The backend never answers: close_timeout ends the relay, and the
    // client's stream ends without a Close.
    assert_eq!(read_frame(&mut p.client).await, None);
    p.at(17);
    let outcome = p.relay.await.unwrap();
    assert_eq!(outcome.initiator, Initiator::Internal);
    assert_eq!(outcome.code, Some(1001));
    assert_eq!(outcome.reason, EndReason::HeartbeatFailure);
}

#[tokio::test(start_paused = true)]
async fn close_timeout_bounds_a_close_the_peer_never_answers() {
    let mut p = start(config(None, None), None);
    p.client_sends(opcode::CLOSE, &close_payload(1000, "bye"))
        .await;
    assert_eq!(p.backend_gets().await.close(), (1000, "bye"));
    let outcome = (&mut p.relay).await.unwrap();
    p.at(2);
    assert_eq!(outcome.initiator, Initiator::Client);
    assert_eq!(outcome.code, Some(1000));
    assert_eq!(read_frame(&mut p.client).await, None);

    // berth's own Close (here the idle timeout's) is bounded the same way.
    let mut p = start(config(Some(30), None), None);
    assert_eq!(p.client_gets().await.close(), (1001, "idle timeout"));
    let outcome = (&mut p.relay).await.unwrap();
    p.at(32);
    assert_eq!(outcome.reason, EndReason::IdleTimeout);
}

#[tokio::test(start_paused = true)]
async fn stop_handle_drains_with_1012_and_shuts_down_with_1001() {
    let cases = [
        (
            StopReason::Drain,
            1012,
            "service restart",
            EndReason::Drained,
        ),
        (
            StopReason::Shutdown,
            1001,
            "server shutting down",
            EndReason::Shutdown,
        ),
    ];
    for (reason, code, text, end) in cases {
        let stop = Arc::new(StopHandle::default());
        let mut p = start(config(None, None), Some(Arc::clone(&stop)));
        p.client_sends(opcode::TEXT, b"running").await;
        assert_eq!(p.backend_gets().await.payload, b"running");
        stop.stop(reason);
        assert_eq!(p.client_gets().await.close(), (code, text));
        assert_eq!(p.backend_gets().await.close(), (1001, text));
        let outcome = p.both_answer_close().await;
        assert_eq!(outcome.initiator, Initiator::Internal);
        assert_eq!(outcome.code, Some(code));
        assert_eq!(outcome.reason, end);
    }
}

#[tokio::test(start_paused = true)]
async fn backend_eof_sends_1014_to_the_client() {
    let mut p = start(config(None, None), None);
    p.backend.shutdown().await.unwrap();
    assert_eq!(
        p.client_gets().await.close(),
        (1014, "backend connection lost")
    );
    assert_eq!(read_frame(&mut p.client).await, None);
    // The client's answer still reaches the backend; then the client goes.
    p.client_sends(opcode::CLOSE, &close_payload(1014, ""))
        .await;
    assert_eq!(p.backend_gets().await.close(), (1014, ""));
    drop(p.client);
    let outcome = p.relay.await.unwrap();
    assert_eq!(outcome.initiator, Initiator::Backend);
    assert_eq!(outcome.code, None);
}

#[tokio::test(start_paused = true)]
async fn client_eof_sends_a_masked_1001_to_the_backend() {
    let mut p = start(config(None, None), None);
    p.client.shutdown().await.unwrap();
    assert_eq!(
        p.backend_gets().await.close(),
        (1001, "client connection lost")
    );
    assert_eq!(read_frame(&mut p.backend).await, None);
    // The backend's replies keep arriving until it closes.
    p.backend_sends(opcode::TEXT, b"late").await;
    assert_eq!(p.client_gets().await, text(b"late"));
    // Then the backend goes too, and the client hears of it.
    drop(p.backend);
    let got = read_frame(&mut p.client).await.unwrap();
    assert_eq!(got.close(), (1014, "backend connection lost"));
    assert_eq!(read_frame(&mut p.client).await, None);
    let outcome = p.relay.await.unwrap();
    assert_eq!(outcome.initiator, Initiator::Client);
    assert_eq!(outcome.code, None);
}

/// Polls a relay and records, after each poll, the most bytes it held for
/// one destination (`side` 0: the backend, 1: the client) and the capacity
/// it holds for it now.
struct Watch<'a, C, B> {
    relay: Relay<C, B>,
    side: usize,
    max_pending: &'a AtomicUsize,
    capacity: &'a AtomicUsize,
}

impl<C, B> Future for Watch<'_, C, B>
where
    C: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
    B: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    type Output = RelayOutcome;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<RelayOutcome> {
        let r = Pin::new(&mut self.relay).poll(cx);
        let (pending, capacity) = self.relay.buffered()[self.side];
        self.max_pending.fetch_max(pending, Ordering::Relaxed);
        self.capacity.store(capacity, Ordering::Relaxed);
        r
    }
}

#[tokio::test(start_paused = true)]
async fn a_slow_backend_holds_at_most_one_read_and_the_buffer_is_freed() {
    let [(mut client, client_side), (mut backend, backend_side)] = pipes(1 << 20, 4096);
    let metrics = Metrics::new().unwrap();
    let counters = Arc::new(metrics.relay_counters("pool", "b1"));
    let (max_pending, capacity) = (AtomicUsize::new(0), AtomicUsize::new(0));
    let watch = Watch {
        relay: relay(
            client_side,
            Bytes::new(),
            backend_side,
            Bytes::new(),
            config(None, None),
            None,
            Some(Arc::clone(&counters)),
        ),
        side: 0,
        max_pending: &max_pending,
        capacity: &capacity,
    };
    let message = frame(true, opcode::BINARY, &pattern(256 * 1024), Some(KEY));
    client.write_all(&message).await.unwrap();
    let reader = async {
        let mut got = vec![0u8; message.len()];
        let mut at = 0;
        while at < got.len() {
            let end = (at + 1000).min(got.len());
            at += backend.read(&mut got[at..end]).await.unwrap();
            tokio::task::yield_now().await;
        }
        got
    };
    tokio::pin!(watch);
    let got = tokio::select! {
        _ = &mut watch => panic!("the relay ended"),
        got = reader => got,
    };
    assert!(got == message, "the message arrived changed");
    let max = max_pending.load(Ordering::Relaxed);
    assert!(max > 0, "the backend never fell behind");
    assert!(max <= SCRATCH_LEN, "held {max} bytes, more than one read");
    assert_eq!(
        capacity.load(Ordering::Relaxed),
        0,
        "buffer kept after draining"
    );
    let c2b = &counters.client_to_backend;
    assert_eq!(c2b.bytes.get(), message.len() as u64);
    assert_eq!(c2b.messages.get(), 1);
    assert_eq!(c2b.frames[2].get(), 1);
}

fn limited(max_message: u64) -> RelayConfig {
    RelayConfig {
        max_message_size: Some(max_message),
        ..config(None, None)
    }
}

#[tokio::test(start_paused = true)]
async fn a_message_over_the_limit_closes_both_sides_with_1009() {
    // From the client: the message at the limit passes, the one over it
    // does not reach the backend; both ends get 1009.
    let mut p = start(limited(1000), None);
    p.client_sends(opcode::BINARY, &pattern(1000)).await;
    assert_eq!(p.backend_gets().await.payload, pattern(1000));
    p.client_sends(opcode::BINARY, &pattern(1001)).await;
    assert_eq!(p.backend_gets().await.close(), (1009, "message too big"));
    assert_eq!(p.client_gets().await.close(), (1009, "message too big"));
    let outcome = p.both_answer_close().await;
    assert_eq!(outcome.initiator, Initiator::Internal);
    assert_eq!(outcome.code, Some(1009));
    assert_eq!(outcome.reason, EndReason::MessageTooBig(Source::Client));
    assert_eq!(outcome.client_to_backend.messages, 1);

    // From the backend, fragmented: the fragment that crosses the limit
    // stays, the one before it was already relayed.
    let mut p = start(limited(1000), None);
    let first = frame(false, opcode::TEXT, &pattern(600), None);
    let second = frame(true, opcode::CONTINUATION, &pattern(401), None);
    p.backend.write_all(&first).await.unwrap();
    p.backend.write_all(&second).await.unwrap();
    let got = read_frame(&mut p.client).await.unwrap();
    assert_eq!((got.op, got.payload.len()), (opcode::TEXT, 600));
    assert_eq!(p.client_gets().await.close(), (1009, "message too big"));
    assert_eq!(p.backend_gets().await.close(), (1009, "message too big"));
    let outcome = p.both_answer_close().await;
    assert_eq!(outcome.code, Some(1009));
    assert_eq!(outcome.reason, EndReason::MessageTooBig(Source::Backend));
}

fn send_timeout(secs: u64) -> RelayConfig {
    RelayConfig {
        send_timeout: Some(Duration::from_secs(secs)),
        ..config(None, None)
    }
}

/// A relay whose client (`client_cap`) or backend (`backend_cap`) pipe is
/// small, so that a peer that does not read falls behind at once.
fn start_with(config: RelayConfig, client_cap: usize, backend_cap: usize) -> Peers {
    let [(client, client_side), (backend, backend_side)] = pipes(client_cap, backend_cap);
    let started = Instant::now();
    let relay = tokio::spawn(relay(
        client_side,
        Bytes::new(),
        backend_side,
        Bytes::new(),
        config,
        None,
        None,
    ));
    Peers {
        client,
        backend,
        relay,
        started,
    }
}

#[tokio::test(start_paused = true)]
async fn without_send_timeout_a_stuck_client_only_holds_the_relay_back() {
    let mut p = start_with(config(None, None), 1024, 64 * 1024);
    p.backend_sends(opcode::BINARY, &pattern(32 * 1024)).await;
    tokio::time::sleep(Duration::from_secs(3600)).await;
    assert!(!p.relay.is_finished(), "dropped without a send_timeout");
    // Once the client reads, everything arrives.
    let got = read_frame(&mut p.client).await.unwrap();
    assert_eq!(got.payload, pattern(32 * 1024));
}

#[tokio::test(start_paused = true)]
async fn a_client_that_takes_nothing_for_send_timeout_is_dropped() {
    let mut p = start_with(send_timeout(5), 1024, 64 * 1024);
    p.backend_sends(opcode::BINARY, &pattern(32 * 1024)).await;
    // The backend hears why, with a masked Close 1001.
    assert_eq!(
        p.backend_gets().await.close(),
        (1001, "client unresponsive")
    );
    p.at(5);
    p.backend_sends(opcode::CLOSE, &close_payload(1001, ""))
        .await;
    let outcome = p.relay.await.unwrap();
    assert_eq!(outcome.initiator, Initiator::Internal);
    assert_eq!(outcome.code, Some(1001));
    assert_eq!(outcome.reason, EndReason::SendTimeout(Source::Client));
    // The client gets what its socket held, then the end of the stream:
    // never a whole frame, never a Close.
    let mut rest = Vec::new();
    p.client.read_to_end(&mut rest).await.unwrap();
    assert!(
        rest.len() < 32 * 1024,
        "{} bytes reached the client",
        rest.len()
    );
}

#[tokio::test(start_paused = true)]
async fn a_dropped_client_is_sent_nothing_more_while_the_backend_ends_its_frame() {
    // The client is dropped in the middle of a 1 MiB frame from the
    // backend: the rest of the frame is read and dropped (never held for
    // the client), and the backend hears berth's Close once it is through.
    let [(mut client, client_side), (mut backend, backend_side)] = pipes(1024, 64 * 1024);
    // Leaked so that the spawned relay may hold them.
    let max_pending: &'static AtomicUsize = Box::leak(Box::new(AtomicUsize::new(0)));
    let capacity: &'static AtomicUsize = Box::leak(Box::new(AtomicUsize::new(0)));
    let relay = tokio::spawn(Watch {
        relay: relay(
            client_side,
            Bytes::new(),
            backend_side,
            Bytes::new(),
            send_timeout(5),
            None,
            None,
        ),
        side: 1,
        max_pending,
        capacity,
    });
    let message = frame(true, opcode::BINARY, &pattern(1 << 20), None);
    backend.write_all(&message).await.unwrap();
    let got = read_frame(&mut backend).await.unwrap();
    assert_eq!(got.close(), (1001, "client unresponsive"));
    let max = max_pending.load(Ordering::Relaxed);
    assert!(max <= SCRATCH_LEN, "held {max} bytes for a dropped client");
    assert_eq!(capacity.load(Ordering::Relaxed), 0, "buffer kept");
    backend
        .write_all(&frame(true, opcode::CLOSE, &close_payload(1001, ""), None))
        .await
        .unwrap();
    let outcome = relay.await.unwrap();
    assert_eq!(outcome.reason, EndReason::SendTimeout(Source::Client));
    let mut rest = Vec::new();
    client.read_to_end(&mut rest).await.unwrap();
    assert!(
        rest.len() < 64 * 1024,
        "{} bytes reached the client",
        rest.len()
    );
}

#[tokio::test(start_paused = true)]
async fn a_slow_client_that_keeps_reading_is_not_dropped() {
    let mut p = start_with(send_timeout(5), 1024, 64 * 1024);
    let message = frame(true, opcode::BINARY, &pattern(8 * 1024), None);
    p.backend.write_all(&message).await.unwrap();
    // 512 bytes every 3 s: slower than the backend, but never 5 s idle.
    let mut got = Vec::new();
    while got.len() < message.len() {
        tokio::time::sleep(Duration::from_secs(3)).await;
        let mut buf = [0u8; 512];
        let n = p.client.read(&mut buf).await.unwrap();
        assert!(n > 0, "the client was dropped");
        got.extend_from_slice(&buf[..n]);
    }
    assert!(got == message, "the message arrived changed");
    assert!(p.started.elapsed() > Duration::from_secs(20));
    assert!(!p.relay.is_finished());
}

#[tokio::test(start_paused = true)]
async fn a_backend_that_takes_nothing_for_send_timeout_is_dropped_and_the_client_gets_1014() {
    let mut p = start_with(send_timeout(5), 64 * 1024, 1024);
    p.client_sends(opcode::BINARY, &pattern(32 * 1024)).await;
    assert_eq!(
        p.client_gets().await.close(),
        (1014, "backend unresponsive")
    );
    p.at(5);
    p.client_sends(opcode::CLOSE, &close_payload(1014, ""))
        .await;
    let outcome = p.relay.await.unwrap();
    assert_eq!(outcome.initiator, Initiator::Internal);
    assert_eq!(outcome.code, Some(1014));
    assert_eq!(outcome.reason, EndReason::SendTimeout(Source::Backend));
    // The backend's connection was dropped: it never got a Close, nor the
    // whole message.
    let mut rest = Vec::new();
    p.backend.read_to_end(&mut rest).await.unwrap();
    assert!(
        rest.len() < 32 * 1024,
        "{} bytes reached the backend",
        rest.len()
    );
}

/// [`start`], with a deadline `secs` from now.
fn start_with_deadline(config: RelayConfig, secs: u64) -> Peers {
    let [(client, client_side), (backend, backend_side)] = pipes(64 * 1024, 64 * 1024);
    let started = Instant::now();
    let deadline = Deadline {
        at: started + Duration::from_secs(secs),
        code: 1008,
        reason: "token expired",
    };
    let relay = tokio::spawn(
        relay(
            client_side,
            Bytes::new(),
            backend_side,
            Bytes::new(),
            config,
            None,
            None,
        )
        .with_deadline(Some(deadline)),
    );
    Peers {
        client,
        backend,
        relay,
        started,
    }
}

#[tokio::test(start_paused = true)]
async fn a_deadline_closes_both_sides_with_its_code_at_a_frame_boundary() {
    let mut p = start_with_deadline(config(None, None), 10);
    p.client_sends(opcode::TEXT, b"early").await;
    assert_eq!(p.backend_gets().await.payload, b"early");
    // A frame towards the client is half written when the deadline passes:
    // the Close waits for its end.
    let message = frame(true, opcode::TEXT, b"straddling", None);
    let (head, tail) = message.split_at(5);
    tokio::time::sleep(Duration::from_secs(9)).await;
    p.backend.write_all(head).await.unwrap();
    tokio::time::sleep(Duration::from_secs(2)).await;
    p.backend.write_all(tail).await.unwrap();
    assert_eq!(p.client_gets().await, text(b"straddling"));
    assert_eq!(p.client_gets().await.close(), (1008, "token expired"));
    p.at(11);
    // The backend's direction was between frames: its Close went at 10 s.
    assert_eq!(p.backend_gets().await.close(), (1008, "token expired"));
    let outcome = p.both_answer_close().await;
    assert_eq!(outcome.initiator, Initiator::Internal);
    assert_eq!(outcome.code, Some(1008));
    assert_eq!(outcome.reason, EndReason::Deadline);
}

#[tokio::test(start_paused = true)]
async fn a_deadline_shares_the_timer_and_gives_way_to_a_close_under_way() {
    // An idle timeout before the deadline wins, and the deadline is moot.
    let mut p = start_with_deadline(config(Some(5), None), 10);
    assert_eq!(p.client_gets().await.close(), (1001, "idle timeout"));
    p.at(5);
    assert_eq!(p.backend_gets().await.close(), (1001, "idle timeout"));
    let outcome = p.both_answer_close().await;
    assert_eq!(outcome.reason, EndReason::IdleTimeout);

    // A client's Close before the deadline: the deadline passes during the
    // closing handshake and changes nothing.
    let mut p = start_with_deadline(config(None, None), 1);
    p.client_sends(opcode::CLOSE, &close_payload(1000, "bye"))
        .await;
    assert_eq!(p.backend_gets().await.close(), (1000, "bye"));
    tokio::time::sleep(Duration::from_millis(1500)).await;
    p.backend_sends(opcode::CLOSE, &close_payload(1000, ""))
        .await;
    assert_eq!(p.client_gets().await.close(), (1000, ""));
    let outcome = p.relay.await.unwrap();
    assert_eq!(outcome.initiator, Initiator::Client);
    assert_eq!(outcome.code, Some(1000));
    assert_eq!(outcome.reason, EndReason::Peer);

    // Data keeps flowing up to the deadline, and the timer is used once.
    let mut p = start_with_deadline(config(None, None), 3600);
    for i in 0..5u8 {
        tokio::time::sleep(Duration::from_secs(600)).await;
        p.client_sends(opcode::BINARY, &[i]).await;
        assert_eq!(p.backend_gets().await.payload, [i]);
    }
    assert_eq!(p.client_gets().await.close(), (1008, "token expired"));
    p.at(3600);
}
