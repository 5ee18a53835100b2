use http_body_util::BodyExt;

use crate::balancer::BackendState;

use super::*;
use crate::listener::ListenerContext;
use crate::proxy::testing;

const CONFIG: &str = r#"
[[listeners]]
name = "public"
bind = "127.0.0.1:0"

[admin]
bind = "127.0.0.1:0"
token = "s3cret-token"

[[routes]]
pool = "main"

[pools.main]
balance = "round_robin"

[[pools.main.backends]]
id = "b1"
address = "127.0.0.1:9001"

[[pools.main.backends]]
id = "b2"
address = "127.0.0.1:9002"
weight = 3
"#;

fn context(text: &str) -> AdminContext {
    let proxy = testing::context(text);
    let reload = ReloadContext::new(
        Arc::clone(&proxy.routing),
        Arc::new(ListenerContext::new(Arc::clone(&proxy))),
        Arc::clone(&proxy.lifecycle),
        proxy.metrics.clone(),
        None,
    );
    let reload = Arc::new(reload);
    let (_sampler, status) = crate::status::Sampler::new(
        Arc::clone(&proxy.routing),
        proxy.metrics.clone(),
        Arc::clone(&proxy.lifecycle),
        Arc::clone(&reload),
    );
    AdminContext {
        routing: Arc::clone(&proxy.routing),
        metrics: proxy.metrics.clone(),
        lifecycle: Arc::clone(&proxy.lifecycle),
        reload,
        status,
        event_streams: EventStreams::default(),
    }
}

/// Sends `method path` (with `token` as the bearer, if any); returns
/// the status, the content type and the body.
async fn call(
    ctx: &AdminContext,
    method: &str,
    path: &str,
    token: Option<&str>,
) -> (StatusCode, String, String) {
    let mut req = Request::builder().method(method).uri(path);
    if let Some(t) = token {
        req = req.header("authorization", format!("Bearer {t}"));
    }
    let resp = route(req.body(()).unwrap(), ctx).await;
    let status = resp.status();
    let kind = resp
        .headers()
        .get("content-type")
        .map(|v| v.to_str().unwrap().to_string())
        .unwrap_or_default();
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    (status, kind, String::from_utf8(body.to_vec()).unwrap())
}

#[tokio::test]
async fn status_routes_answer_from_the_context() {
    let ctx = context(CONFIG);
    assert_eq!(call(&ctx, "GET", "/healthz", None).await.0, StatusCode::OK);
    let (status, _, body) = call(&ctx, "GET", "/readyz", None).await;
    assert_eq!(
        (status, body.as_str()),
        (StatusCode::SERVICE_UNAVAILABLE, "not ready\n")
    );
    ctx.lifecycle.set_ready(true);
    assert_eq!(call(&ctx, "GET", "/readyz", None).await.0, StatusCode::OK);

    let (status, kind, body) = call(&ctx, "GET", "/metrics", None).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(kind, "text/plain; version=0.0.4; charset=utf-8");
    assert!(
        body.contains("berth_backend_up{backend=\"b2\",pool=\"main\"} 1"),
        "{body}"
    );

    let (status, kind, body) = call(&ctx, "GET", "/admin/pools", None).await;
    assert_eq!(
        (status, kind.as_str()),
        (StatusCode::OK, "application/json")
    );
    let json: serde_json::Value = serde_json::from_str(&body).unwrap();
    let pool = &json["pools"]["main"];
    assert_eq!(pool["balance"], "round_robin");
    assert_eq!(pool["backends"][1]["id"], "b2");
    assert_eq!(pool["backends"][1]["weight"], 3);
    assert_eq!(pool["backends"][0]["state"], "up");

    assert_eq!(
        call(&ctx, "DELETE", "/healthz", None).await.0,
        StatusCode::METHOD_NOT_ALLOWED
    );
    assert_eq!(
        call(&ctx, "GET", "/nowhere", None).await.0,
        StatusCode::NOT_FOUND
    );
}

#[tokio::test]
async fn mutations_need_the_token() {
    let ctx = context(CONFIG);
    let drain = "/admin/pools/main/backends/b1/drain";
    for token in [None, Some("wrong"), Some("s3cret-token-and-more"), Some("")] {
        let resp = route(
            {
                let mut r = Request::builder().method("POST").uri(drain);
                if let Some(t) = token {
                    r = r.header("authorization", format!("Bearer {t}"));
                }
                r.body(()).unwrap()
            },
            &ctx,
        )
        .await;
        assert_eq!(resp.status(), StatusCode::UNAUTHORIZED, "{token:?}");
        assert_eq!(resp.headers()["www-authenticate"], "Bearer");
    }
    let b1 = Arc::clone(ctx.routing.load().pools["main"].find("b1").unwrap());
    assert_eq!(b1.state(), BackendState::Up);
}

#[tokio::test]
async fn drain_and_undrain_a_backend() {
    let ctx = context(CONFIG);
    let token = Some("s3cret-token");
    let drain = "/admin/pools/main/backends/b1/drain";
    let (status, _, body) = call(&ctx, "POST", drain, token).await;
    assert_eq!(status, StatusCode::OK);
    let json: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(json["state"], "draining");
    assert_eq!(json["changed"], true);
    let again: serde_json::Value =
        serde_json::from_str(&call(&ctx, "POST", drain, token).await.2).unwrap();
    assert_eq!(again["changed"], false);

    let undrain = "/admin/pools/main/backends/b1/undrain";
    let json: serde_json::Value =
        serde_json::from_str(&call(&ctx, "POST", undrain, token).await.2).unwrap();
    assert_eq!(
        (json["state"].as_str(), json["changed"].as_bool()),
        (Some("up"), Some(true))
    );

    let (status, _, body) = call(&ctx, "POST", "/admin/pools/main/backends/b9/drain", token).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert_eq!(body, "no backend \"b9\" in pool \"main\"\n");
    let (status, _, _) = call(&ctx, "POST", "/admin/elsewhere", token).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
}

#[tokio::test]
async fn reload_without_a_file_is_422() {
    let ctx = context(CONFIG);
    let (status, _, body) = call(&ctx, "POST", "/admin/reload", Some("s3cret-token")).await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(
        body,
        "berth was started without a config file; nothing to reload\n"
    );
}

/// Sends `method path` with extra headers; returns the response.
async fn send(
    ctx: &AdminContext,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
) -> Response<ProxyBody> {
    let mut req = Request::builder().method(method).uri(path);
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    route(req.body(()).unwrap(), ctx).await
}

#[tokio::test]
async fn a_wrong_method_is_405_with_allow() {
    let ctx = context(CONFIG);
    let token = ("authorization", "Bearer s3cret-token");
    let post_only = [
        "/admin/reload",
        "/admin/pools/main/backends/b1/drain",
        "/admin/pools/main/backends/b1/undrain",
    ];
    for path in post_only {
        for method in ["GET", "PUT", "DELETE", "HEAD", "PATCH"] {
            let resp = send(&ctx, method, path, &[token]).await;
            assert_eq!(
                resp.status(),
                StatusCode::METHOD_NOT_ALLOWED,
                "{method} {path}"
            );
            assert_eq!(resp.headers()["allow"], "POST", "{method} {path}");
        }
    }
    let get_only = [
        "/",
        "/admin/events",
        "/metrics",
        "/healthz",
        "/readyz",
        "/admin/pools",
    ];
    for path in get_only {
        for method in ["POST", "PUT", "DELETE"] {
            let resp = send(&ctx, method, path, &[token]).await;
            assert_eq!(
                resp.status(),
                StatusCode::METHOD_NOT_ALLOWED,
                "{method} {path}"
            );
            assert_eq!(resp.headers()["allow"], "GET", "{method} {path}");
        }
    }
    // Nothing was drained by the wrong methods; unknown paths stay 404.
    let b1 = Arc::clone(ctx.routing.load().pools["main"].find("b1").unwrap());
    assert_eq!(b1.state(), BackendState::Up);
    for (method, path) in [
        ("GET", "/admin/nothing"),
        ("POST", "/admin/pools/main/drain"),
    ] {
        let resp = send(&ctx, method, path, &[token]).await;
        assert_eq!(resp.status(), StatusCode::NOT_FOUND, "{method} {path}");
        assert!(resp.headers().get("allow").is_none());
    }
}

#[tokio::test]
async fn pool_names_and_ids_are_percent_decoded() {
    let text = CONFIG
        .replace("pool = \"main\"", "pool = \"a/b <c>\"")
        .replace("[pools.main]", "[pools.\"a/b <c>\"]")
        .replace("[[pools.main.backends]]", "[[pools.\"a/b <c>\".backends]]");
    let ctx = context(&text);
    let path = "/admin/pools/a%2Fb%20%3Cc%3E/backends/b%31/drain";
    let (status, _, body) = call(&ctx, "POST", path, Some("s3cret-token")).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let json: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(
        (json["pool"].as_str(), json["backend"].as_str()),
        (Some("a/b <c>"), Some("b1"))
    );
    // Not UTF-8 after decoding: no such route.
    let (status, _, _) = call(
        &ctx,
        "POST",
        "/admin/pools/%FF/backends/b1/drain",
        Some("s3cret-token"),
    )
    .await;
    assert_eq!(status, StatusCode::NOT_FOUND);
}

#[tokio::test]
async fn a_cross_origin_post_is_refused() {
    let ctx = context(&CONFIG.replace("token = \"s3cret-token\"\n", ""));
    let drain = "/admin/pools/main/backends/b1/drain";
    for origin in ["http://evil.example", "null", "http://127.0.0.1:9901"] {
        let headers = [("host", "127.0.0.1:9900"), ("origin", origin)];
        let resp = send(&ctx, "POST", drain, &headers).await;
        assert_eq!(resp.status(), StatusCode::FORBIDDEN, "{origin}");
    }
    let b1 = Arc::clone(ctx.routing.load().pools["main"].find("b1").unwrap());
    assert_eq!(b1.state(), BackendState::Up);
    // The page's own origin, and clients that send no Origin, may.
    let same = [
        ("host", "127.0.0.1:9900"),
        ("origin", "http://127.0.0.1:9900"),
    ];
    assert_eq!(
        send(&ctx, "POST", drain, &same).await.status(),
        StatusCode::OK
    );
    let undrain = "/admin/pools/main/backends/b1/undrain";
    assert_eq!(
        send(&ctx, "POST", undrain, &[]).await.status(),
        StatusCode::OK
    );
}

#[tokio::test]
async fn the_page_and_the_event_stream() {
    let ctx = context(CONFIG);
    let resp = send(&ctx, "GET", "/", &[]).await;
    assert_eq!(resp.status(), StatusCode::OK);
    let h = resp.headers();
    assert_eq!(h["content-type"], "text/html; charset=utf-8");
    assert!(h["content-security-policy"]
        .to_str()
        .unwrap()
        .starts_with("default-src 'none'"));
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    let html = String::from_utf8(body.to_vec()).unwrap();
    assert!(html.contains("<title>berth "), "{html}");
    let resp = send(&ctx, "GET", "/admin/events", &[]).await;
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(resp.headers()["content-type"], "text/event-stream");
    assert_eq!(resp.headers()["cache-control"], "no-store");
}

#[test]
fn at_the_cap_the_longest_waiting_head_is_evicted_and_busy_ones_are_not() {
    let conns = Arc::new(Mutex::new(AdminConns::default()));
    let mut held: Vec<(AdminSlot, CancellationToken)> = (0..ADMIN_MAX_CONNECTIONS)
        .map(|_| admit(&conns).unwrap())
        .collect();
    // The first two have sent their heads: they can no longer be evicted.
    held[0].0.busy();
    held[1].0.busy();
    let (newcomer, _) = admit(&conns).unwrap();
    let cancelled: Vec<usize> = (0..held.len())
        .filter(|&i| held[i].1.is_cancelled())
        .collect();
    assert_eq!(cancelled, [2]);
    // The evicted connection's task ends and gives its place back.
    held.remove(2);
    assert_eq!(lock(&conns).open, ADMIN_MAX_CONNECTIONS);
    // Everyone busy: a new connection is refused.
    for (slot, _) in &held {
        slot.busy();
    }
    assert_eq!(lock(&conns).waiting.len(), 1);
    newcomer.busy();
    assert!(admit(&conns).is_none());
    drop(held);
    assert_eq!(lock(&conns).open, 1);
    drop(newcomer);
    assert_eq!(lock(&conns).open, 0);
}

#[tokio::test]
async fn without_a_token_mutations_are_open() {
    let ctx = context(&CONFIG.replace("token = \"s3cret-token\"\n", ""));
    let (status, _, _) = call(&ctx, "POST", "/admin/pools/main/backends/b2/drain", None).await;
    assert_eq!(status, StatusCode::OK);
}
