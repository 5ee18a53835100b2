//! Fleet changes without herds: slow start under every balance mode and
//! hash bounded load, max connection age, rebalancing (hash pools close
//! only the keys that moved; cookie clients are re-pinned to the new
//! backend) and declarative drain. Real berth, real backends, real
//! clients; configs reloaded from a file through the admin API.

mod support;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use support::*;
use tokio_tungstenite::tungstenite::Message;

/// A config file with backends `(id, address, extra backend keys)` and
/// `pool_extra` in pool main.
fn write(path: &std::path::Path, backends: &[(&str, SocketAddr, &str)], pool_extra: &str) {
    let mut text = config_for(&[], pool_extra)
        .replace("{CERT}", CERT)
        .replace("{KEY}", KEY);
    if pool_extra.contains("balance =") {
        text = text.replacen("balance = \"round_robin\"\n", "", 1);
    }
    for (id, addr, extra) in backends {
        text.push_str(&format!(
            "\n[[pools.main.backends]]\nid = \"{id}\"\naddress = \"{addr}\"\n{extra}\n"
        ));
    }
    std::fs::write(path, text).unwrap();
}

async fn reload(proxy: &Proxy) {
    let (status, body) = admin_request(proxy.admin.unwrap(), "POST", "/admin/reload", None).await;
    assert_eq!(status, 200, "{body}");
}

/// `/admin/pools`' entry for backend `id` of pool main.
async fn backend_doc(admin: SocketAddr, id: &str) -> Option<serde_json::Value> {
    let (_, body) = http_get(admin, "/admin/pools").await;
    let doc: serde_json::Value = serde_json::from_str(&body).unwrap();
    doc["pools"]["main"]["backends"]
        .as_array()
        .unwrap()
        .iter()
        .find(|b| b["id"] == id)
        .cloned()
}

/// Opens a WebSocket (with `headers`), asks who answers, and hangs up.
async fn who(addr: SocketAddr, headers: &[(&str, &str)]) -> String {
    let (mut ws, _) = try_ws_connect(addr, false, "/", headers).await.unwrap();
    let id = whoami(&mut ws).await;
    let _ = ws.close(None).await;
    id
}

/// The share of `ids` that is `id`.
fn share(ids: &[String], id: &str) -> f64 {
    ids.iter().filter(|x| *x == id).count() as f64 / ids.len() as f64
}

/// Three backends serve pool main; a fourth joins by reload with a slow
/// start of 4 s. Returns the answers to `n` connections opened right after
/// the reload (within about the first fifth of the ramp) and to `n` opened
/// after it, each with the header `key(i)`; `hold` connections per old
/// backend stay open throughout.
async fn ramp(pool_extra: &str, hold: usize, n: usize, keyed: bool) -> (Vec<String>, Vec<String>) {
    let backends: Vec<WsBackend> =
        futures_util::future::join_all(["b1", "b2", "b3", "b4"].map(WsBackend::start)).await;
    let entries: Vec<(&str, SocketAddr, &str)> = backends
        .iter()
        .map(|b| (b.id.as_str(), b.addr, ""))
        .collect();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("berth.toml");
    let extra = format!("slow_start = \"4s\"\n{pool_extra}");
    write(&path, &entries[..3], &extra);
    let proxy = Proxy::start_file(&path).await;
    let mut held = Vec::new();
    for _ in 0..hold * 3 {
        held.push(ws_connect(proxy.addr, false, "/").await);
    }
    write(&path, &entries, &extra);
    reload(&proxy).await;
    let started = Instant::now();
    let key = |i: usize| format!("user-{i}");
    let mut early = Vec::new();
    for i in 0..n {
        let k = key(i);
        let headers: &[(&str, &str)] = if keyed { &[("x-key", &k)] } else { &[] };
        early.push(who(proxy.addr, headers).await);
    }
    let early_took = started.elapsed();
    // The ramp is over 4 s after the reload (and /admin/pools says so).
    tokio::time::sleep(Duration::from_millis(4300).saturating_sub(started.elapsed())).await;
    let b4 = backend_doc(proxy.admin.unwrap(), "b4").await.unwrap();
    assert_eq!(b4["slow_start"], serde_json::Value::Null, "{b4}");
    let mut late = Vec::new();
    for i in 0..n {
        let k = key(i);
        let headers: &[(&str, &str)] = if keyed { &[("x-key", &k)] } else { &[] };
        late.push(who(proxy.addr, headers).await);
    }
    eprintln!(
        "early ({early_took:?}): b4 {:.3}; late: b4 {:.3}",
        share(&early, "b4"),
        share(&late, "b4")
    );
    assert!(
        early_took < Duration::from_millis(2500),
        "the early phase took {early_took:?}: too slow to measure a ramp"
    );
    drop(held);
    proxy.shutdown().await;
    (early, late)
}

#[tokio::test]
async fn slow_start_ramps_a_new_backend_under_round_robin() {
    let (early, late) = ramp("", 0, 160, false).await;
    // Full share: a quarter. Early: the factor is 0.1 to about 0.5.
    assert!(share(&early, "b4") <= 0.12, "{early:?}");
    assert!(share(&late, "b4") >= 0.2, "{late:?}");
}

#[tokio::test]
async fn slow_start_ramps_a_new_backend_under_least_connections() {
    let (early, late) = ramp("balance = \"least_connections\"", 10, 100, false).await;
    // Least connections alone sends every new connection to the empty b4.
    assert!(share(&early, "b4") <= 0.45, "{early:?}");
    assert!(share(&late, "b4") >= 0.9, "{late:?}");
}

#[tokio::test]
async fn slow_start_ramps_a_new_backend_under_hash_bounded_load() {
    let hash =
        "affinity = \"hash\"\n\n[pools.main.hash]\nkey = \"header:x-key\"\nbounded_load = 1.25\n";
    let (early, late) = ramp(hash, 0, 200, true).await;
    assert!(share(&early, "b4") <= 0.12, "{early:?}");
    assert!(share(&late, "b4") >= 0.15, "{late:?}");
}

/// The next Close a client gets: (code, reason), or None.
async fn close_of(ws: &mut Ws) -> Option<(u16, String)> {
    while let Some(msg) = ws.next().await {
        match msg {
            Ok(Message::Close(Some(frame))) => {
                return Some((u16::from(frame.code), frame.reason.to_string()))
            }
            Ok(Message::Close(None)) => return Some((1005, String::new())),
            Ok(_) => continue,
            Err(_) => return None,
        }
    }
    None
}

/// A metric's value from `/metrics` (0 when absent).
async fn metric(admin: SocketAddr, series: &str) -> f64 {
    let (_, text) = http_get(admin, "/metrics").await;
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.trim().parse().ok())
        .unwrap_or(0.0)
}

#[tokio::test]
async fn connections_older_than_max_connection_age_get_1012_in_its_last_tenth() {
    let b = WsBackend::start("b1").await;
    let proxy = Proxy::start(&config_for(
        &[b.addr],
        "max_connection_age = \"2s\"\nclose_timeout = \"1s\"",
    ))
    .await;
    let n = 24;
    let clients: Vec<_> = (0..n)
        .map(|_| {
            let addr = proxy.addr;
            tokio::spawn(async move {
                let mut ws = ws_connect(addr, false, "/").await;
                let opened = Instant::now();
                let close = tokio::time::timeout(Duration::from_secs(5), close_of(&mut ws))
                    .await
                    .expect("closed within 5 s");
                (opened.elapsed(), close)
            })
        })
        .collect();
    let mut lives = Vec::new();
    for c in clients {
        let (life, close) = c.await.unwrap();
        assert_eq!(
            close,
            Some((1012, "max connection age".to_string())),
            "after {life:?}"
        );
        // In the last tenth of the age (plus scheduling slack).
        assert!(
            life >= Duration::from_millis(1790) && life <= Duration::from_millis(2400),
            "{life:?}"
        );
        lives.push(life);
    }
    // Opened together, not closed together.
    let (min, max) = (lives.iter().min().unwrap(), lives.iter().max().unwrap());
    assert!(*max - *min >= Duration::from_millis(50), "{lives:?}");
    let admin = proxy.admin.unwrap();
    let deadline = Instant::now() + Duration::from_secs(3);
    while metric(admin, "berth_websocket_max_age_closes_total{pool=\"main\"}").await < n as f64
        && Instant::now() < deadline
    {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(
        metric(admin, "berth_websocket_max_age_closes_total{pool=\"main\"}").await,
        n as f64
    );
    assert_eq!(
        metric(
            admin,
            "berth_websocket_closes_total{code=\"1012\",initiator=\"proxy\",pool=\"main\"}"
        )
        .await,
        n as f64
    );
    // The backend was told too.
    assert!(b.closes_seen.lock().unwrap().iter().all(|c| *c == 1012));
    proxy.shutdown().await;
}

/// A client that holds its WebSocket and, when berth closes it, reconnects
/// at once with the same headers; it reports every close and every backend
/// it reached.
struct Client {
    key: String,
    first: String,
    closes: Vec<u16>,
    then: Option<String>,
    set_cookie: Option<String>,
}

async fn hold(addr: SocketAddr, key: String, cookie: bool, for_: Duration) -> Client {
    let until = Instant::now() + for_;
    let mut headers: Vec<(String, String)> = vec![("x-key".into(), key.clone())];
    let connect = |headers: Vec<(String, String)>| async move {
        let h: Vec<(&str, &str)> = headers
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        let (mut ws, resp) = try_ws_connect(addr, false, "/", &h).await.unwrap();
        let id = whoami(&mut ws).await;
        let set_cookie = resp
            .headers()
            .get("set-cookie")
            .map(|v| v.to_str().unwrap().to_string());
        (ws, id, set_cookie)
    };
    let (mut ws, first, set_cookie) = connect(headers.clone()).await;
    let mut client = Client {
        key,
        first,
        closes: Vec::new(),
        then: None,
        set_cookie: None,
    };
    if cookie {
        let value = set_cookie.expect("a cookie on the first 101");
        let pair = value.split(';').next().unwrap().to_string();
        headers.push(("cookie".into(), pair));
    }
    loop {
        let left = until.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, close_of(&mut ws)).await {
            Err(_) => return client,
            Ok(Some((code, _))) => client.closes.push(code),
            Ok(None) => client.closes.push(1006),
        }
        let (next, id, set_cookie) = connect(headers.clone()).await;
        ws = next;
        client.then = Some(id);
        client.set_cookie = set_cookie;
    }
}

#[tokio::test]
async fn a_hash_rebalance_closes_exactly_the_keys_that_moved() {
    let backends: Vec<WsBackend> =
        futures_util::future::join_all(["b1", "b2", "b3"].map(WsBackend::start)).await;
    let entries: Vec<(&str, SocketAddr, &str)> = backends
        .iter()
        .map(|b| (b.id.as_str(), b.addr, ""))
        .collect();
    let pool = "close_timeout = \"1s\"\naffinity = \"hash\"\n\n[pools.main.hash]\nkey = \"header:x-key\"\n\n\
                [pools.main.rebalance]\nthreshold = 1.2\nwindow = \"2s\"\n";
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("berth.toml");
    write(&path, &entries[..2], pool);
    let proxy = Proxy::start_file(&path).await;
    let n = 90;
    let tasks: Vec<_> = (0..n)
        .map(|i| {
            tokio::spawn(hold(
                proxy.addr,
                format!("key-{i}"),
                false,
                Duration::from_secs(7),
            ))
        })
        .collect();
    // Everyone is connected (two backends hold all 90), then b3 joins.
    let admin = proxy.admin.unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while metric(
        admin,
        "berth_websocket_upgrades_total{backend=\"b1\",pool=\"main\",result=\"ok\"}",
    )
    .await
        + metric(
            admin,
            "berth_websocket_upgrades_total{backend=\"b2\",pool=\"main\",result=\"ok\"}",
        )
        .await
        < n as f64
    {
        assert!(Instant::now() < deadline, "clients did not connect");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    write(&path, &entries, pool);
    reload(&proxy).await;
    let mut clients = Vec::new();
    for t in tasks {
        clients.push(t.await.unwrap());
    }
    let count = |id: &str| clients.iter().filter(|c| c.first == id).count();
    let overloaded = |id: &str| count(id) as f64 > 1.2 * n as f64 / 3.0;
    let mut moved = 0;
    for c in &clients {
        assert!(
            c.closes.len() <= 1,
            "{} closed twice: {:?}",
            c.key,
            c.closes
        );
        // Where the key belongs now, asked afresh.
        let now = who(proxy.addr, &[("x-key", &c.key)]).await;
        let key_moved = now != c.first;
        moved += usize::from(key_moved);
        if c.closes.is_empty() {
            assert!(
                !key_moved || !overloaded(&c.first),
                "{} moved from overloaded {} to {now} but was not closed",
                c.key,
                c.first
            );
        } else {
            assert_eq!(c.closes, [1012], "{}", c.key);
            assert!(
                key_moved,
                "{} was closed but its key stayed on {}",
                c.key, c.first
            );
            assert_eq!(c.then.as_deref(), Some(now.as_str()), "{}", c.key);
        }
    }
    assert!(moved >= 15, "only {moved} keys moved to b3");
    let rebalanced = metric(
        admin,
        "berth_websocket_rebalanced_total{backend=\"b1\",pool=\"main\"}",
    )
    .await
        + metric(
            admin,
            "berth_websocket_rebalanced_total{backend=\"b2\",pool=\"main\"}",
        )
        .await;
    let closed = clients.iter().filter(|c| !c.closes.is_empty()).count();
    assert_eq!(rebalanced, closed as f64);
    proxy.shutdown().await;
}

#[tokio::test]
async fn a_rebalance_re_pins_cookie_clients_to_the_new_backend() {
    let backends: Vec<WsBackend> =
        futures_util::future::join_all(["b1", "b2", "b3"].map(WsBackend::start)).await;
    let entries: Vec<(&str, SocketAddr, &str)> = backends
        .iter()
        .map(|b| (b.id.as_str(), b.addr, ""))
        .collect();
    let pool = "balance = \"least_connections\"\nclose_timeout = \"1s\"\naffinity = \"cookie\"\n\n\
                [pools.main.cookie]\nsecret = \"0123456789abcdef0123456789abcdef\"\n\n\
                [pools.main.rebalance]\nwindow = \"2s\"\n";
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("berth.toml");
    write(&path, &entries[..2], pool);
    let proxy = Proxy::start_file(&path).await;
    let n = 40;
    let mut tasks = Vec::new();
    for i in 0..n {
        tasks.push(tokio::spawn(hold(
            proxy.addr,
            format!("c{i}"),
            true,
            Duration::from_secs(6),
        )));
        // One at a time, so least connections splits them evenly.
        tokio::time::sleep(Duration::from_millis(15)).await;
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    write(&path, &entries, pool);
    reload(&proxy).await;
    let mut clients = Vec::new();
    for t in tasks {
        clients.push(t.await.unwrap());
    }
    assert_eq!(clients.iter().filter(|c| c.first == "b3").count(), 0);
    let closed: Vec<&Client> = clients.iter().filter(|c| !c.closes.is_empty()).collect();
    // Each of b1 and b2 held 20 against a share of 13.3: 6 each go.
    assert_eq!(
        closed.len(),
        12,
        "{:?}",
        closed.iter().map(|c| &c.first).collect::<Vec<_>>()
    );
    for c in &closed {
        assert_eq!(c.closes, [1012], "{}", c.key);
        // Its cookie still named the old backend; it was re-pinned to b3.
        assert_eq!(c.then.as_deref(), Some("b3"), "{}", c.key);
        let cookie = c.set_cookie.as_deref().expect("a new cookie");
        assert!(cookie.starts_with("berth_main=b3."), "{cookie}");
    }
    let on = |id: &str| {
        clients
            .iter()
            .filter(|c| c.then.as_deref().unwrap_or(&c.first) == id)
            .count()
    };
    assert_eq!([on("b1"), on("b2"), on("b3")], [14, 14, 12]);
    let admin = proxy.admin.unwrap();
    assert_eq!(
        metric(
            admin,
            "berth_affinity_total{mode=\"cookie\",pool=\"main\",result=\"rebind\"}"
        )
        .await,
        12.0
    );
    proxy.shutdown().await;
}

/// `n` clients, each reporting the backend it reached and its Close code.
async fn clients(addr: SocketAddr, n: usize) -> Vec<(String, Ws)> {
    let mut out = Vec::new();
    for _ in 0..n {
        let mut ws = ws_connect(addr, false, "/").await;
        let id = whoami(&mut ws).await;
        out.push((id, ws));
    }
    out
}

async fn drained_by(admin: SocketAddr, id: &str) -> (String, Vec<String>) {
    let doc = backend_doc(admin, id).await.unwrap();
    let by = doc["drained_by"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s.as_str().unwrap().to_string())
        .collect();
    (doc["state"].as_str().unwrap().to_string(), by)
}

#[tokio::test]
async fn drain_true_in_the_config_drains_until_the_key_goes_and_admin_undrain_does_not_lift_it() {
    let b1 = WsBackend::start("b1").await;
    let b2 = WsBackend::start("b2").await;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("berth.toml");
    let pool = "drain_window = \"300ms\"";
    write(&path, &[("b1", b1.addr, ""), ("b2", b2.addr, "")], pool);
    let proxy = Proxy::start_file(&path).await;
    let admin = proxy.admin.unwrap();
    let mut cs = clients(proxy.addr, 4).await;
    write(
        &path,
        &[("b1", b1.addr, "drain = true"), ("b2", b2.addr, "")],
        pool,
    );
    let (status, body) = admin_request(admin, "POST", "/admin/reload", None).await;
    assert_eq!(status, 200, "{body}");
    assert!(
        body.contains("backend main/b1: drain = true (draining)"),
        "{body}"
    );
    // Exactly as by the admin API: b1's clients get 1012, b2's stay.
    for (id, ws) in cs.iter_mut().filter(|(id, _)| id == "b1") {
        let code = tokio::time::timeout(Duration::from_secs(3), next_close(ws)).await;
        assert_eq!(code.unwrap(), Some(1012), "{id}");
    }
    assert_eq!(
        drained_by(admin, "b1").await,
        ("draining".into(), vec!["config".into()])
    );
    for _ in 0..4 {
        assert_eq!(who(proxy.addr, &[]).await, "b2");
    }
    // The admin API cannot lift the config's drain.
    let (status, body) =
        admin_request(admin, "POST", "/admin/pools/main/backends/b1/undrain", None).await;
    assert_eq!(status, 200);
    let answer: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(answer["state"], "draining");
    assert_eq!(answer["changed"], false);
    assert_eq!(answer["drained_by"], serde_json::json!(["config"]));
    // Removing the key does.
    write(&path, &[("b1", b1.addr, ""), ("b2", b2.addr, "")], pool);
    reload(&proxy).await;
    assert_eq!(drained_by(admin, "b1").await, ("up".into(), vec![]));
    let ids: Vec<String> = clients(proxy.addr, 4)
        .await
        .into_iter()
        .map(|c| c.0)
        .collect();
    assert!(ids.iter().any(|id| id == "b1"), "{ids:?}");
    proxy.shutdown().await;
}

#[tokio::test]
async fn an_admin_drain_stays_when_the_config_drain_comes_and_goes() {
    let b1 = WsBackend::start("b1").await;
    let b2 = WsBackend::start("b2").await;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("berth.toml");
    let pool = "drain_window = \"300ms\"";
    write(&path, &[("b1", b1.addr, ""), ("b2", b2.addr, "")], pool);
    let proxy = Proxy::start_file(&path).await;
    let admin = proxy.admin.unwrap();
    let mut cs = clients(proxy.addr, 4).await;
    let (status, _) =
        admin_request(admin, "POST", "/admin/pools/main/backends/b2/drain", None).await;
    assert_eq!(status, 200);
    for (_, ws) in cs.iter_mut().filter(|(id, _)| id == "b2") {
        let code = tokio::time::timeout(Duration::from_secs(3), next_close(ws)).await;
        assert_eq!(code.unwrap(), Some(1012));
    }
    // The config drains it too, then stops: the admin drain stays.
    write(
        &path,
        &[("b1", b1.addr, ""), ("b2", b2.addr, "drain = true")],
        pool,
    );
    reload(&proxy).await;
    assert_eq!(
        drained_by(admin, "b2").await,
        ("draining".into(), vec!["admin".into(), "config".into()])
    );
    write(&path, &[("b1", b1.addr, ""), ("b2", b2.addr, "")], pool);
    reload(&proxy).await;
    assert_eq!(
        drained_by(admin, "b2").await,
        ("draining".into(), vec!["admin".into()])
    );
    for _ in 0..4 {
        assert_eq!(who(proxy.addr, &[]).await, "b1");
    }
    // Only the admin API lifts its own drain.
    let (status, body) =
        admin_request(admin, "POST", "/admin/pools/main/backends/b2/undrain", None).await;
    assert_eq!(status, 200);
    assert!(body.contains("\"changed\":true"), "{body}");
    assert_eq!(drained_by(admin, "b2").await, ("up".into(), vec![]));
    // b1's clients were never touched.
    for (_, ws) in cs.iter_mut().filter(|(id, _)| id == "b1") {
        assert_eq!(whoami(ws).await, "b1");
    }
    proxy.shutdown().await;
}

#[tokio::test]
async fn a_backend_drained_in_the_config_at_start_takes_no_connection() {
    let b1 = WsBackend::start("b1").await;
    let b2 = WsBackend::start("b2").await;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("berth.toml");
    write(
        &path,
        &[("b1", b1.addr, "drain = true"), ("b2", b2.addr, "")],
        "",
    );
    let proxy = Proxy::start_file(&path).await;
    for _ in 0..6 {
        assert_eq!(who(proxy.addr, &[]).await, "b2");
    }
    assert_eq!(
        drained_by(proxy.admin.unwrap(), "b1").await,
        ("draining".into(), vec!["config".into()])
    );
    proxy.shutdown().await;
}
