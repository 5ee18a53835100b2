//! What berth does with a request before and around the backend, seen
//! from the client with raw HTTP/1.1: routing and the backend agree on the
//! host and path (normalized), requests that break HTTP's host rules are
//! 400s, a client's malformed body is the client's fault, and berth's own
//! error responses say what happened without naming a backend, an address
//! or an OS error, under a request id the log line shares.

mod support;

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Sends `request` as is on a new connection and reads the whole answer
/// (berth closes or the 10 s timeout ends it): (status, head, body).
async fn exchange(addr: SocketAddr, request: &str) -> (u16, String, String) {
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(request.as_bytes()).await.unwrap();
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    // Read until the response is complete (Content-Length) or the stream ends.
    loop {
        let n = match tokio::time::timeout(Duration::from_secs(10), s.read(&mut buf)).await {
            Ok(Ok(n)) => n,
            _ => 0,
        };
        if n == 0 {
            break;
        }
        out.extend_from_slice(&buf[..n]);
        let text = String::from_utf8_lossy(&out);
        if let Some((head, body)) = text.split_once("\r\n\r\n") {
            let length = head.lines().find_map(|l| {
                l.to_ascii_lowercase()
                    .strip_prefix("content-length:")
                    .and_then(|v| v.trim().parse::<usize>().ok())
            });
            if length.is_some_and(|len| body.len() >= len) {
                break;
            }
        }
    }
    let text = String::from_utf8_lossy(&out).into_owned();
    let status = text.get(9..12).and_then(|c| c.parse().ok()).unwrap_or(0);
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    (status, head.to_string(), body.to_string())
}

fn header<'a>(head: &'a str, name: &str) -> Option<&'a str> {
    head.lines().find_map(|l| {
        let (k, v) = l.split_once(':')?;
        k.eq_ignore_ascii_case(name).then(|| v.trim())
    })
}

/// berth with a `/log` pool, a catch-all pool and a host route, each an
/// echo backend that reports the target and headers it received.
async fn routed() -> (Proxy, [SocketAddr; 3]) {
    let release = Arc::new(tokio::sync::Notify::new());
    let log = http_backend("log", release.clone()).await;
    let main = http_backend("main", release.clone()).await;
    let chat = http_backend("chat", release).await;
    let toml = format!(
        r#"
[[listeners]]
name = "public"
bind = "127.0.0.1:0"

[admin]
bind = "127.0.0.1:0"

[[routes]]
path_prefix = "/log"
pool = "log"

[[routes]]
host = "chat.example.com"
pool = "chat"

[[routes]]
pool = "main"

[[pools.log.backends]]
id = "log-1"
address = "{log}"

[[pools.main.backends]]
id = "main-1"
address = "{main}"

[[pools.chat.backends]]
id = "chat-1"
address = "{chat}"
"#
    );
    (Proxy::start(&toml).await, [log, main, chat])
}

/// What the echo backend says it received: (backend, target, host).
fn echoed(body: &str) -> (String, String, String) {
    let field = |prefix: &str| {
        body.lines()
            .find_map(|l| l.strip_prefix(prefix))
            .unwrap_or("")
            .to_string()
    };
    (field("backend="), field("path="), field("host: "))
}

#[tokio::test]
async fn routing_and_the_backend_agree_on_the_normalized_host_and_path() {
    let (proxy, _) = routed().await;
    let get = |target: &str, host: &str| {
        format!("GET {target} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n")
    };
    let cases = [
        // Dot segments are removed: this is /t9, not under /log.
        (get("/log/../t9", "a.example"), "main", "/t9", "a.example"),
        (
            get("/log/%2e%2e/t9", "a.example"),
            "main",
            "/t9",
            "a.example",
        ),
        // A percent-encoded unreserved character is decoded: /log/x.
        (get("/%6cog/x", "a.example"), "log", "/log/x", "a.example"),
        (
            get("/%6Cog/x?q=%6c", "a.example"),
            "log",
            "/log/x?q=%6c",
            "a.example",
        ),
        // The host route matches with a trailing dot and in any case.
        (
            get("/", "chat.example.com."),
            "chat",
            "/",
            "chat.example.com",
        ),
        (
            get("/r", "Chat.Example.COM.:8080"),
            "chat",
            "/r",
            "Chat.Example.COM:8080",
        ),
        // An absolute-form target's authority replaces Host.
        (
            get("http://chat.example.com/abs", "a.example"),
            "chat",
            "/abs",
            "chat.example.com",
        ),
    ];
    for (request, pool, target, host) in cases {
        let (status, head, body) = exchange(proxy.addr, &request).await;
        assert_eq!(status, 200, "{request}: {head}");
        assert_eq!(
            echoed(&body),
            (pool.to_string(), target.to_string(), host.to_string()),
            "{request}"
        );
    }
    proxy.shutdown().await;
}

#[tokio::test]
async fn two_hosts_no_host_and_bad_targets_are_400_and_counted() {
    let (proxy, _) = routed().await;
    let admin = proxy.admin.unwrap();
    let requests = [
        "GET / HTTP/1.1\r\nHost: chat.example.com\r\nHost: a.example\r\nConnection: close\r\n\r\n",
        "GET / HTTP/1.1\r\nConnection: close\r\n\r\n",
        "GET /%zz HTTP/1.1\r\nHost: a.example\r\nConnection: close\r\n\r\n",
        "GET / HTTP/1.1\r\nHost: user@a.example\r\nConnection: close\r\n\r\n",
        // An upgrade with two Hosts is refused the same way.
        &upgrade_head("/", "Host: chat.example.com\r\n"),
    ];
    for request in requests {
        let (status, head, body) = exchange(proxy.addr, request).await;
        assert_eq!(status, 400, "{request}: {head}");
        assert!(body.starts_with("bad request"), "{body}");
    }
    // HTTP/1.0 may leave Host out: routed by path alone.
    let (status, _, body) = exchange(proxy.addr, "GET /log/a HTTP/1.0\r\n\r\n").await;
    assert_eq!(status, 200);
    assert_eq!(echoed(&body).0, "log");
    let (_, metrics) = admin_request(admin, "GET", "/metrics", None).await;
    assert!(
        metrics.contains("berth_requests_rejected_total{listener=\"public\",status=\"400\"} 5"),
        "{metrics}"
    );
    proxy.shutdown().await;
}

#[tokio::test]
async fn a_malformed_chunked_body_is_the_clients_400_and_leaves_the_backend_alone() {
    let backend = http_backend("h1", Arc::new(tokio::sync::Notify::new())).await;
    let proxy = Proxy::start(&config_for(&[backend], "")).await;
    let admin = proxy.admin.unwrap();
    // More than the three failures that would take it down passively.
    for _ in 0..4 {
        let request = "POST /upload HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n5\nhello\r\n0\r\n\r\n";
        let (status, head, body) = exchange(proxy.addr, request).await;
        assert_eq!(status, 400, "{head}");
        assert_eq!(body, "malformed request body\n");
    }
    assert_eq!(backend_state(admin, "b1").await, "up");
    let (_, metrics) = admin_request(admin, "GET", "/metrics", None).await;
    assert!(
        !metrics.contains("berth_http_requests_total{backend=\"b1\""),
        "{metrics}"
    );
    assert!(
        metrics.contains(
            "berth_http_requests_total{backend=\"\",pool=\"main\",status_class=\"4xx\"} 4"
        ),
        "{metrics}"
    );
    // A well-formed chunked body still goes through.
    let request = "POST /upload HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n5\r\nhello\r\n0\r\n\r\n";
    let (status, _, body) = exchange(proxy.addr, request).await;
    assert_eq!((status, body.as_str()), (200, "hello"));
    proxy.shutdown().await;
}

#[tokio::test]
async fn error_bodies_name_no_backend_and_the_log_line_has_the_details_under_the_request_id() {
    // A backend id and an address that must not reach a client. The dead
    // backend's port stays bound, without listening, for the whole test:
    // every connect to it is refused at once, and no other test can take
    // the port meanwhile (a port bound and released could be).
    let dead_socket = tokio::net::TcpSocket::new_v4().unwrap();
    dead_socket.bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let dead = dead_socket.local_addr().unwrap();
    let silent = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let silent_addr = silent.local_addr().unwrap();
    let toml = format!(
        r#"
[[listeners]]
name = "public"
bind = "127.0.0.1:0"

[admin]
bind = "127.0.0.1:0"

[[routes]]
path_prefix = "/slow"
pool = "slow"

[[routes]]
pool = "main"

[pools.main]
# Refused connects fail at once; the time is only a bound for a machine
# too busy to answer a SYN with a reset promptly.
connect_timeout = "10s"

[[pools.main.backends]]
id = "dead-backend-7"
address = "{dead}"

[pools.slow]
response_timeout = "300ms"

[[pools.slow.backends]]
id = "silent-backend-9"
address = "{silent_addr}"
"#
    );
    let mut berth = BerthProcess::spawn(&toml, &["--log-format", "json"], Stdio::piped()).await;
    let stderr = berth.child.stderr.take().unwrap();
    let lines = std::thread::spawn(move || {
        BufReader::new(stderr)
            .lines()
            .map_while(Result::ok)
            .collect::<Vec<_>>()
    });
    let addr = berth.addr;
    let cases = [
        // Refused connects: 502, then (three in a row) down: 503.
        (
            "GET /a HTTP/1.1\r\nHost: x\r\nX-Request-Id: client-id-1\r\nConnection: close\r\n\r\n",
            502,
        ),
        (
            "GET /b HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
            502,
        ),
        (
            &upgrade_head("/c", "X-Request-Id: bad id with spaces\r\n") as &str,
            502,
        ),
        (
            "GET /d HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
            503,
        ),
        // A backend that never answers: 504.
        (
            "GET /slow HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
            504,
        ),
    ];
    let mut ids = Vec::new();
    for (request, want) in cases {
        let (status, head, body) = exchange(addr, request).await;
        assert_eq!(status, want, "{request}: {head}");
        for secret in [
            "dead-backend-7".to_string(),
            "silent-backend-9".to_string(),
            dead.to_string(),
            silent_addr.to_string(),
            dead.port().to_string(),
            "os error".to_string(),
            "refused".to_string(),
        ] {
            assert!(
                !body.contains(&secret),
                "{want} body names {secret}: {body}"
            );
            assert!(
                !head.contains(&secret),
                "{want} head names {secret}: {head}"
            );
        }
        let expected = match want {
            502 => "could not connect to a backend\n",
            503 => "no backend available\n",
            _ => "backend timed out\n",
        };
        assert_eq!(body, expected);
        let id = header(&head, "x-request-id")
            .expect("X-Request-Id")
            .to_string();
        ids.push(id);
    }
    // The client's own sane id is kept; an insane one is replaced.
    assert_eq!(ids[0], "client-id-1");
    assert_ne!(ids[2], "bad id with spaces");
    for id in &ids[1..] {
        assert_eq!(id.len(), 32, "{id}");
        assert!(id.bytes().all(|b| b.is_ascii_hexdigit()), "{id}");
    }
    let unique: std::collections::HashSet<&String> = ids.iter().collect();
    assert_eq!(unique.len(), ids.len());
    drop((silent, dead_socket));
    berth.signal("TERM");
    let _ = berth.wait_exit(Duration::from_secs(10)).await;
    let lines = lines.join().unwrap();
    // Each failure's log line has the request id and the details.
    for (id, backend) in [
        (&ids[0], "dead-backend-7"),
        (&ids[1], "dead-backend-7"),
        (&ids[2], "dead-backend-7"),
        (&ids[4], "silent-backend-9"),
    ] {
        let line = lines
            .iter()
            .find(|l| l.contains(&format!("\"request_id\":\"{id}\"")))
            .unwrap_or_else(|| panic!("no log line for {id}: {lines:#?}"));
        assert!(line.contains(backend), "{line}");
    }
    let refused = lines
        .iter()
        .find(|l| l.contains(&format!("\"request_id\":\"{}\"", ids[0])))
        .unwrap();
    assert!(
        refused.contains(&dead.to_string()) || refused.contains("refused"),
        "{refused}"
    );
}

#[tokio::test]
async fn the_request_id_reaches_the_backend_and_the_client() {
    let backend = http_backend("h1", Arc::new(tokio::sync::Notify::new())).await;
    let proxy = Proxy::start(&config_for(&[backend], "")).await;
    let (status, head, body) = exchange(
        proxy.addr,
        "GET /echo HTTP/1.1\r\nHost: x\r\nX-Request-Id: trace-42\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert_eq!(status, 200);
    assert!(body.contains("x-request-id: trace-42"), "{body}");
    assert_eq!(header(&head, "x-request-id"), Some("trace-42"));
    // Without one, berth makes one up and sends the backend the same.
    let (_, head, body) = exchange(
        proxy.addr,
        "GET /echo HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    )
    .await;
    let id = header(&head, "x-request-id").expect("an id");
    assert!(body.contains(&format!("x-request-id: {id}")), "{body}");
    proxy.shutdown().await;
}
