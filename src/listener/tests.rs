//! Listener tests over real sockets on a narrow context.
use std::time::Instant;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use super::*;
use crate::proxy::testing;

const CONFIG: &str = r#"
[[listeners]]
name = "public"
bind = "127.0.0.1:0"

[[routes]]
host = "only.example"
pool = "main"

[[pools.main.backends]]
id = "b1"
address = "127.0.0.1:9"
"#;

/// A listener context with `public` accepting; its address.
fn started() -> (Arc<ListenerContext>, SocketAddr) {
    let proxy = testing::context(CONFIG);
    let ctx = Arc::new(ListenerContext::new(Arc::clone(&proxy)));
    let lc = &proxy.routing.load().config.listeners[0];
    ctx.start(BoundListener::bind(lc).unwrap());
    let addr = ctx.addrs()["public"];
    (ctx, addr)
}

fn open_connections(ctx: &ListenerContext) -> i64 {
    ctx.proxy
        .metrics
        .connections_active
        .with_label_values(&["public"])
        .get()
}

/// Waits (up to 5 s) for `check` to hold.
async fn eventually(what: &str, check: impl Fn() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(5);
    while !check() {
        assert!(Instant::now() < deadline, "never: {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test]
async fn a_connection_is_served_and_counted() {
    let (ctx, addr) = started();
    assert_eq!(open_connections(&ctx), 0);
    let mut client = TcpStream::connect(addr).await.unwrap();
    client
        .write_all(b"GET /x HTTP/1.1\r\nHost: elsewhere.example\r\n\r\n")
        .await
        .unwrap();
    let mut buf = vec![0u8; 1024];
    let n = client.read(&mut buf).await.unwrap();
    let head = String::from_utf8_lossy(&buf[..n]);
    assert!(head.starts_with("HTTP/1.1 404"), "{head}");
    assert!(
        head.contains("no route matches this host and path"),
        "{head}"
    );
    assert_eq!(open_connections(&ctx), 1);
    drop(client);
    eventually("the gauge drops", || open_connections(&ctx) == 0).await;
}

#[tokio::test]
async fn a_stopped_listener_stops_accepting() {
    let (ctx, addr) = started();
    let spec = Arc::clone(&ctx.snapshot()[0].0);
    assert_eq!(ctx.stop(&[&spec]), ["public"]);
    assert!(ctx.addrs().is_empty());
    // The accept loop ends and closes the socket.
    let deadline = Instant::now() + Duration::from_secs(5);
    while TcpStream::connect(addr).await.is_ok() {
        assert!(Instant::now() < deadline, "still accepting");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test]
async fn shutdown_ends_the_accept_loops() {
    let (ctx, _addr) = started();
    ctx.proxy.lifecycle.shutdown.cancel();
    tokio::time::timeout(Duration::from_secs(5), ctx.stopped())
        .await
        .expect("accept loops ended");
}

#[tokio::test]
async fn over_max_connections_a_socket_is_closed_unread_and_counted() {
    let proxy = testing::context(&CONFIG.replace(
        "bind = \"127.0.0.1:0\"",
        "bind = \"127.0.0.1:0\"\nmax_connections = 1",
    ));
    let ctx = Arc::new(ListenerContext::new(Arc::clone(&proxy)));
    let lc = &proxy.routing.load().config.listeners[0];
    ctx.start(BoundListener::bind(lc).unwrap());
    let addr = ctx.addrs()["public"];
    let limits = ctx.limits("public").unwrap();

    // The first connection sends nothing yet: it holds the only place.
    let mut first = TcpStream::connect(addr).await.unwrap();
    eventually("the first connection is counted", || limits.open() == 1).await;
    let mut second = TcpStream::connect(addr).await.unwrap();
    let mut buf = [0u8; 64];
    let n = tokio::time::timeout(Duration::from_secs(2), second.read(&mut buf))
        .await
        .expect("closed at once")
        .unwrap_or(0);
    assert_eq!(n, 0);
    let refused = proxy
        .metrics
        .connections_refused
        .with_label_values(&["public", "listener_full"]);
    eventually("the refusal is counted", || refused.get() == 1).await;

    // The first is still served.
    first
        .write_all(b"GET / HTTP/1.1\r\nHost: elsewhere.example\r\n\r\n")
        .await
        .unwrap();
    let n = first.read(&mut buf).await.unwrap();
    assert!(buf[..n].starts_with(b"HTTP/1.1 404"));
    drop(first);
    eventually("the place is given back", || limits.open() == 0).await;
    assert_eq!(ctx.fds.clients(), 0);
}
