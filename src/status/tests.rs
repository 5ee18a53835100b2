use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;

use super::*;
use crate::listener::ListenerContext;
use crate::proxy::testing;

const CONFIG: &str = r#"
[[listeners]]
name = "public"
bind = "127.0.0.1:0"

[admin]
bind = "127.0.0.1:0"

[[routes]]
pool = "main"

[pools.main]
balance = "round_robin"
drain_window = "10s"

[[pools.main.backends]]
id = "b1"
address = "127.0.0.1:9001"

[[pools.main.backends]]
id = "b2"
address = "127.0.0.1:9002"
weight = 3
max_connections = 50
"#;

struct Setup {
    proxy: Arc<crate::proxy::ProxyContext>,
    sampler: Sampler,
    feed: Feed,
}

fn setup(text: &str) -> Setup {
    let proxy = testing::context(text);
    let reload = Arc::new(ReloadContext::new(
        Arc::clone(&proxy.routing),
        Arc::new(ListenerContext::new(Arc::clone(&proxy))),
        Arc::clone(&proxy.lifecycle),
        proxy.metrics.clone(),
        Some("/etc/berth/berth.toml".into()),
    ));
    let (sampler, feed) = Sampler::new(
        Arc::clone(&proxy.routing),
        proxy.metrics.clone(),
        Arc::clone(&proxy.lifecycle),
        reload,
    );
    Setup {
        proxy,
        sampler,
        feed,
    }
}

/// The JSON of one `data:` event.
fn parse(event: &[u8]) -> serde_json::Value {
    let text = std::str::from_utf8(event).unwrap();
    let data = text
        .lines()
        .find_map(|l| l.strip_prefix("data: "))
        .unwrap_or_else(|| panic!("no data line in {text:?}"));
    serde_json::from_str(data).unwrap()
}

#[tokio::test(start_paused = true)]
async fn the_sampler_turns_counters_into_rates_once_a_second() {
    let Setup {
        proxy,
        sampler,
        feed,
    } = setup(CONFIG);
    let stop = CancellationToken::new();
    let task = tokio::spawn(sampler.run(stop.clone()));
    let mut events = Box::pin(feed.events());
    // The first chunk: the retry delay, and no snapshot before the first tick.
    let first = events.next().await.unwrap();
    assert!(first.starts_with(b"retry: "), "{first:?}");
    let baseline = parse(&events.next().await.unwrap());
    let b1 = &baseline["pools"]["main"]["backends"][0];
    assert_eq!(b1["upgrades_per_second"], 0.0);

    // One second of traffic on b1.
    let runtime = proxy.routing.load_full();
    let backend = Arc::clone(runtime.pools["main"].find("b1").unwrap());
    let c = &backend.counters;
    c.client_to_backend.bytes.inc_by(3000);
    c.backend_to_client.bytes.inc_by(500);
    c.client_to_backend
        .backend_messages
        .fetch_add(30, Ordering::Relaxed);
    c.backend_to_client
        .backend_messages
        .fetch_add(5, Ordering::Relaxed);
    let m = &proxy.metrics;
    m.ws_upgrades
        .with_label_values(&["main", "b1", "ok"])
        .inc_by(4);
    m.ws_upgrades
        .with_label_values(&["main", "b1", "backend_timeout"])
        .inc_by(9);
    m.ws_closes
        .with_label_values(&["main", "client", "1000"])
        .inc_by(2);
    m.ws_closes
        .with_label_values(&["main", "proxy", "1000"])
        .inc();
    m.ws_closes
        .with_label_values(&["main", "proxy", "1012"])
        .inc();
    m.tls_handshakes.with_label_values(&["tls", "ok"]).inc_by(4);
    m.tls_handshakes.with_label_values(&["tls", "error"]).inc();
    m.tls_resumed.with_label_values(&["tls"]).inc_by(3);
    let _live = [backend.track_websocket(), backend.track_websocket()];

    let snap = parse(&events.next().await.unwrap());
    let pool = &snap["pools"]["main"];
    let b1 = &pool["backends"][0];
    assert_eq!(b1["id"], "b1");
    assert_eq!(b1["upgrades_per_second"], 4.0, "{b1}");
    assert_eq!(b1["bytes_per_second"]["client_to_backend"], 3000.0);
    assert_eq!(b1["bytes_per_second"]["backend_to_client"], 500.0);
    assert_eq!(b1["messages_per_second"]["client_to_backend"], 30.0);
    assert_eq!(b1["messages_per_second"]["backend_to_client"], 5.0);
    assert_eq!(b1["live_connections"], 2);
    // Shares by weight among the backends that are up: 1 and 3.
    assert_eq!(b1["weighted_share"], 0.25);
    assert_eq!(pool["backends"][1]["weighted_share"], 0.75);
    assert_eq!(pool["backends"][1]["max_connections"], 50);
    assert_eq!(pool["backends"][1]["upgrades_per_second"], 0.0);
    assert_eq!(pool["live_connections"], 2);
    assert_eq!(pool["affinity"], "none");
    assert_eq!(pool["auth"], serde_json::json!([]));
    // Closes summed over initiators, in the last ten-second bucket.
    let closes = &pool["closes"];
    assert_eq!(closes["window_seconds"], 300);
    let by_code = closes["by_code"].as_object().unwrap();
    assert_eq!(by_code.keys().collect::<Vec<_>>(), ["1000", "1012"]);
    assert_eq!(by_code["1000"].as_array().unwrap().len(), 30);
    assert_eq!(by_code["1000"][29], 3);
    assert_eq!(closes["totals"]["1012"], 1);
    let tls = &snap["process"]["tls"];
    assert_eq!(tls["handshakes_per_second"], 5.0);
    assert_eq!(tls["resumed_share"], 0.75);
    assert_eq!(snap["process"]["websockets_open"], 0);
    assert_eq!(snap["config"], "/etc/berth/berth.toml");
    assert_eq!(snap["version"], VERSION);
    assert_eq!(snap["commit"], COMMIT);
    assert_eq!(snap["token_required"], false);
    assert_eq!(snap["last_reload"]["result"], "success");
    assert_eq!(snap["last_reload"]["initial"], true);
    #[cfg(target_os = "linux")]
    assert!(snap["process"]["fds"]["limit"].as_u64().unwrap() > 0);

    // A quiet second: the rates fall back to zero, the closes stay.
    let quiet = parse(&events.next().await.unwrap());
    let b1 = &quiet["pools"]["main"]["backends"][0];
    assert_eq!(b1["upgrades_per_second"], 0.0);
    assert_eq!(b1["bytes_per_second"]["client_to_backend"], 0.0);
    assert_eq!(quiet["pools"]["main"]["closes"]["totals"]["1000"], 3);
    assert_eq!(feed.latest().unwrap()["time"], quiet["time"]);

    // Reading the counters made no new series (the page must not change
    // what /metrics shows).
    let metrics = String::from_utf8(proxy.metrics.render()).unwrap();
    assert!(!metrics.contains("backend=\"b2\",pool=\"main\",result=\"ok\""));

    // Stopping the sampler ends every stream.
    stop.cancel();
    task.await.unwrap();
    assert!(events.next().await.is_none());
    let late: Vec<_> = feed.events().collect().await;
    assert_eq!(late.len(), 1, "only the retry delay and the last snapshot");
}

#[tokio::test(start_paused = true)]
async fn a_drain_in_progress_is_in_the_snapshot() {
    let Setup {
        proxy,
        sampler,
        feed,
    } = setup(CONFIG);
    let backend = Arc::clone(proxy.routing.load().pools["main"].find("b2").unwrap());
    let mut live: Vec<_> = (0..4).map(|_| backend.track_websocket()).collect();
    for _ in 0..4 {
        proxy.lifecycle.relay_started(&backend);
    }
    assert!(crate::drain::drain_backend(
        &proxy.lifecycle,
        &backend,
        Duration::from_secs(10)
    ));
    let stop = CancellationToken::new();
    tokio::spawn(sampler.run(stop.clone()));
    let mut events = Box::pin(feed.events());
    events.next().await;
    let snap = parse(&events.next().await.unwrap());
    let drain = &snap["drains"][0];
    assert_eq!(drain["pool"], "main");
    assert_eq!(drain["backend"], "b2");
    assert_eq!(
        (drain["total"].as_u64(), drain["closed"].as_u64()),
        (Some(4), Some(0))
    );
    assert_eq!(drain["window_seconds"], 10.0);
    assert_eq!(drain["finished"], false);
    // The draining backend has no share of new connections.
    assert_eq!(snap["pools"]["main"]["backends"][1]["weighted_share"], 0.0);
    assert_eq!(snap["pools"]["main"]["backends"][0]["weighted_share"], 1.0);

    live.truncate(1);
    tokio::time::sleep(Duration::from_secs(3)).await;
    let snap = parse(&events.next().await.unwrap());
    let drain = &snap["drains"][0];
    assert_eq!(drain["closed"], 3);
    let left = drain["remaining_seconds"].as_f64().unwrap();
    // The snapshot is from the tick at 2 s or 3 s.
    assert!((7.0..=8.0).contains(&left), "{left}");

    live.clear();
    let snap = parse(&events.next().await.unwrap());
    assert_eq!(snap["drains"][0]["closed"], 4);
    assert_eq!(snap["drains"][0]["finished"], true);

    // Undrained: the drain is no longer listed.
    backend.undrain();
    let snap = parse(&events.next().await.unwrap());
    assert_eq!(snap["drains"], serde_json::json!([]));
    stop.cancel();
}

#[test]
fn the_page_is_self_contained_and_its_title_is_text() {
    let path = std::path::Path::new("/srv/<script>alert(1)</script>&co/berth.toml");
    let (html, csp) = page(Some(path));
    let title = html
        .split("<title>")
        .nth(1)
        .and_then(|t| t.split("</title>").next())
        .unwrap();
    assert_eq!(
        title,
        format!(
            "berth {VERSION} ({COMMIT}) · /srv/&lt;script&gt;alert(1)&lt;/script&gt;&amp;co/berth.toml"
        )
    );
    assert_eq!(
        html.matches("<script").count(),
        1,
        "only the page's own script"
    );
    // Nothing is loaded from elsewhere.
    for needle in ["src=", "<link rel=\"stylesheet", "@import", "url("] {
        assert!(!html.contains(needle), "{needle}");
    }
    // The CSP allows exactly the inline script and style, by hash.
    let inline = |open: &str, close: &str| {
        let start = html.find(open).unwrap() + open.len();
        let end = start + html[start..].find(close).unwrap();
        let digest = Sha256::digest(&html.as_bytes()[start..end]);
        format!(
            "'sha256-{}'",
            base64::engine::general_purpose::STANDARD.encode(digest)
        )
    };
    assert!(
        csp.contains(&format!("script-src {};", inline("<script>", "</script>"))),
        "{csp}"
    );
    assert!(
        csp.contains(&format!("style-src {};", inline("<style>", "</style>"))),
        "{csp}"
    );
    assert!(csp.starts_with("default-src 'none';"));
    assert!(!html.contains("{{"), "a placeholder was left in the page");
}

#[test]
fn escape_html_escapes_the_five() {
    assert_eq!(
        escape_html(r#"<a href="x">Tom & 'Jerry'</a>"#),
        "&lt;a href=&quot;x&quot;&gt;Tom &amp; &#39;Jerry&#39;&lt;/a&gt;"
    );
    assert_eq!(escape_html("plain · text"), "plain · text");
}

#[test]
fn a_pool_document_names_its_authentication_methods_in_order() {
    let text = CONFIG.replace(
        "drain_window = \"10s\"\n",
        "drain_window = \"10s\"\n\n[pools.main.auth.forward]\nurl = \"http://127.0.0.1:9000/verify\"\n",
    );
    let proxy = testing::context(&text);
    let doc = pools_document(&proxy.routing.load());
    assert_eq!(doc["pools"]["main"]["auth"], serde_json::json!(["forward"]));
}
