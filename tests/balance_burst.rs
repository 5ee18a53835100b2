//! Least connections under a burst: an upgrade counts as load from the
//! moment berth places it, not only once the backend's `101` is back, so
//! upgrades in flight together do not all pick from the same counts.
//!
//! b1 holds 30 WebSockets; b2 and b3 join by reload; then 90 clients
//! upgrade at once against backends that take 300 ms to answer. Counting
//! only established WebSockets, all 90 pick from the same counts and pile
//! up (30 / 60 / 30 when this test was checked against that code);
//! counting the upgrades in flight they fill b2 and b3 up to b1 and then
//! share: 40 / 40 / 40.

mod support;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// A WebSocket backend that answers each handshake after `delay` and then
/// holds the connection; counts the WebSockets it accepted.
async fn slow_backend(delay: Duration) -> (SocketAddr, Arc<AtomicUsize>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let accepted = Arc::new(AtomicUsize::new(0));
    let counter = Arc::clone(&accepted);
    tokio::spawn(async move {
        loop {
            let Ok((mut s, _)) = listener.accept().await else {
                return;
            };
            let counter = Arc::clone(&counter);
            tokio::spawn(async move {
                let head = read_head_chunked(&mut s).await;
                let Some(reply) = switching_protocols(&head) else {
                    return;
                };
                tokio::time::sleep(delay).await;
                if s.write_all(reply.as_bytes()).await.is_err() {
                    return;
                }
                counter.fetch_add(1, Ordering::SeqCst);
                let mut sink = [0u8; 256];
                while matches!(s.read(&mut sink).await, Ok(n) if n > 0) {}
            });
        }
    });
    (addr, accepted)
}

/// A client's WebSocket through berth, its `101` checked.
async fn upgrade(addr: SocketAddr) -> TcpStream {
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(upgrade_head("/", "").as_bytes()).await.unwrap();
    let head = read_head_chunked(&mut s).await;
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    s
}

fn config(backends: &[SocketAddr]) -> String {
    config_for(backends, "").replace(
        "balance = \"round_robin\"",
        "balance = \"least_connections\"",
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_of_upgrades_counts_the_ones_in_flight() {
    let delay = Duration::from_millis(300);
    let (a1, n1) = slow_backend(Duration::ZERO).await;
    let (a2, n2) = slow_backend(delay).await;
    let (a3, n3) = slow_backend(delay).await;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("berth.toml");
    let with_certs = |text: String| text.replace("{CERT}", CERT).replace("{KEY}", KEY);
    std::fs::write(&path, with_certs(config(&[a1]))).unwrap();
    let proxy = Proxy::start_file(&path).await;
    let admin = proxy.admin.unwrap();

    let mut held = Vec::new();
    for _ in 0..30 {
        held.push(upgrade(proxy.addr).await);
    }
    assert_eq!(n1.load(Ordering::SeqCst), 30);

    std::fs::write(&path, with_certs(config(&[a1, a2, a3]))).unwrap();
    let (status, body) = admin_request(admin, "POST", "/admin/reload", None).await;
    assert_eq!(status, 200, "{body}");

    let burst: Vec<_> = (0..90).map(|_| tokio::spawn(upgrade(proxy.addr))).collect();
    for task in burst {
        held.push(task.await.unwrap());
    }
    let counts = [
        n1.load(Ordering::SeqCst),
        n2.load(Ordering::SeqCst),
        n3.load(Ordering::SeqCst),
    ];
    assert_eq!(counts.iter().sum::<usize>(), 120, "{counts:?}");
    let (min, max) = (counts.iter().min().unwrap(), counts.iter().max().unwrap());
    // 40 each, give or take a pick that raced another.
    assert!(
        max - min <= 4,
        "WebSockets per backend after the burst: {counts:?}"
    );
    drop(held);
    proxy.shutdown().await;
}
