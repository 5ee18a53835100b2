//! Plain HTTP and Server-Sent Events through the proxy, with a real hyper
//! backend and a real hyper client.

mod support;

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use support::*;
use tokio::net::TcpStream;

type Sender = hyper::client::conn::http1::SendRequest<Full<Bytes>>;

async fn client(addr: std::net::SocketAddr) -> Sender {
    let stream = TcpStream::connect(addr).await.unwrap();
    let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .unwrap();
    tokio::spawn(conn);
    sender
}

async fn tls_client(addr: std::net::SocketAddr) -> Sender {
    let stream = TcpStream::connect(addr).await.unwrap();
    let connector = tokio_rustls::TlsConnector::from(tls_client_config());
    let tls = connector
        .connect(
            rustls_pki_types::ServerName::try_from("localhost").unwrap(),
            stream,
        )
        .await
        .unwrap();
    let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
        .await
        .unwrap();
    tokio::spawn(conn);
    sender
}

fn get(path: &str, headers: &[(&str, &str)]) -> hyper::Request<Full<Bytes>> {
    let mut b = hyper::Request::builder()
        .uri(path)
        .header("host", "app.example.com:8080");
    for (k, v) in headers {
        b = b.header(*k, *v);
    }
    b.body(Full::new(Bytes::new())).unwrap()
}

#[tokio::test]
async fn get_is_proxied_with_forwarded_headers_and_hop_by_hop_removed() {
    let backend = http_backend("h1", Arc::new(tokio::sync::Notify::new())).await;
    let proxy = Proxy::start(&config_for(&[backend], "")).await;
    for tls in [false, true] {
        let mut c = if tls {
            tls_client(proxy.tls_addr.unwrap()).await
        } else {
            client(proxy.addr).await
        };
        let resp = c
            .send_request(get(
                "/echo?x=1",
                &[
                    ("x-forwarded-for", "203.0.113.7"),
                    ("connection", "x-hop"),
                    ("x-hop", "secret"),
                    ("x-app", "kept"),
                ],
            ))
            .await
            .unwrap();
        assert_eq!(resp.status(), 200);
        assert_eq!(resp.headers()["x-backend"], "h1");
        // The backend's hop-by-hop header did not reach the client.
        assert!(!resp.headers().contains_key("keep-alive"));
        let body = String::from_utf8(
            resp.into_body()
                .collect()
                .await
                .unwrap()
                .to_bytes()
                .to_vec(),
        )
        .unwrap();
        assert!(body.contains("path=/echo?x=1"), "{body}");
        assert!(
            body.contains("x-forwarded-for: 203.0.113.7, 127.0.0.1"),
            "{body}"
        );
        assert!(
            body.contains(&format!(
                "x-forwarded-proto: {}",
                if tls { "https" } else { "http" }
            )),
            "{body}"
        );
        assert!(
            body.contains("x-forwarded-host: app.example.com:8080"),
            "{body}"
        );
        assert!(body.contains("x-app: kept"), "{body}");
        assert!(!body.contains("x-hop"), "{body}");
    }
    proxy.shutdown().await;
}

#[tokio::test]
async fn request_and_response_bodies_stream_through() {
    let backend = http_backend("h1", Arc::new(tokio::sync::Notify::new())).await;
    let proxy = Proxy::start(&config_for(&[backend], "")).await;
    let mut c = client(proxy.addr).await;
    let payload: Vec<u8> = (0..8 * 1024 * 1024u32).map(|i| (i % 251) as u8).collect();
    let req = hyper::Request::builder()
        .method("POST")
        .uri("/upload")
        .header("host", "x")
        .body(Full::new(Bytes::from(payload.clone())))
        .unwrap();
    let resp = c.send_request(req).await.unwrap();
    assert_eq!(resp.status(), 200);
    let got = resp.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(got.len(), payload.len());
    assert!(got.as_ref() == payload.as_slice());
    proxy.shutdown().await;
}

#[tokio::test]
async fn sse_events_arrive_one_by_one_while_the_response_is_open() {
    let release = Arc::new(tokio::sync::Notify::new());
    let backend = http_backend("h1", release.clone()).await;
    let proxy = Proxy::start(&config_for(&[backend], "")).await;
    let mut c = tls_client(proxy.tls_addr.unwrap()).await;
    let resp = c
        .send_request(get("/sse", &[("accept", "text/event-stream")]))
        .await
        .unwrap();
    assert_eq!(resp.headers()["content-type"], "text/event-stream");
    let mut body = resp.into_body();
    // The first event arrives while the backend still holds the response open.
    let first = tokio::time::timeout(Duration::from_secs(5), body.frame())
        .await
        .expect("first event in time")
        .unwrap()
        .unwrap();
    assert_eq!(
        first.into_data().unwrap(),
        Bytes::from_static(b"data: first\n\n")
    );
    release.notify_one();
    let second = tokio::time::timeout(Duration::from_secs(5), body.frame())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(
        second.into_data().unwrap(),
        Bytes::from_static(b"data: second\n\n")
    );
    proxy.shutdown().await;
}

#[tokio::test]
async fn unmatched_route_gets_404_and_dead_backend_502() {
    let dead = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let toml = config_for(&[dead], "").replace(
        "[[routes]]\npool = \"main\"",
        "[[routes]]\nhost = \"app.example.com\"\npool = \"main\"",
    );
    let proxy = Proxy::start(&toml).await;
    let mut c = client(proxy.addr).await;
    let resp = c.send_request(get("/", &[]).map(|b| b)).await.unwrap();
    assert_eq!(resp.status(), 502);
    let mut req = get("/", &[]);
    req.headers_mut()
        .insert("host", "other.example.com".parse().unwrap());
    let resp = c.send_request(req).await.unwrap();
    assert_eq!(resp.status(), 404);
    proxy.shutdown().await;
}

#[tokio::test]
async fn get_is_retried_on_another_backend_when_the_first_refuses() {
    let dead = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let alive = http_backend("alive", Arc::new(tokio::sync::Notify::new())).await;
    let proxy = Proxy::start(&config_for(&[dead, alive], "")).await;
    let mut c = client(proxy.addr).await;
    for _ in 0..4 {
        let resp = c.send_request(get("/echo", &[])).await.unwrap();
        assert_eq!(resp.status(), 200);
        assert_eq!(resp.headers()["x-backend"], "alive");
        let _ = resp.into_body().collect().await;
    }
    proxy.shutdown().await;
}

#[tokio::test]
async fn draining_a_backend_closes_its_idle_keep_alive_connections() {
    use std::sync::atomic::{AtomicUsize, Ordering};
    // A backend that counts its open connections.
    let open = Arc::new(AtomicUsize::new(0));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let counter = open.clone();
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                return;
            };
            let counter = counter.clone();
            tokio::spawn(async move {
                counter.fetch_add(1, Ordering::SeqCst);
                let svc = hyper::service::service_fn(|_req| async {
                    Ok::<_, std::convert::Infallible>(hyper::Response::new(Full::new(
                        Bytes::from_static(b"kept alive"),
                    )))
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
                counter.fetch_sub(1, Ordering::SeqCst);
            });
        }
    });
    let proxy = Proxy::start(&config_for(&[addr], "")).await;
    let mut c = client(proxy.addr).await;
    let resp = c.send_request(get("/", &[])).await.unwrap();
    assert_eq!(
        resp.into_body().collect().await.unwrap().to_bytes(),
        Bytes::from_static(b"kept alive")
    );
    // berth keeps its connection to the backend alive for reuse...
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(open.load(Ordering::SeqCst), 1);
    // ...until the backend is drained: then it closes.
    let (status, _) = admin_request(
        proxy.admin.unwrap(),
        "POST",
        "/admin/pools/main/backends/b1/drain",
        None,
    )
    .await;
    assert_eq!(status, 200);
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while open.load(Ordering::SeqCst) != 0 {
        assert!(
            std::time::Instant::now() < deadline,
            "keep-alive connection to the drained backend stayed open"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    proxy.shutdown().await;
}
