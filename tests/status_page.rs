//! The status page in a real headless Chromium (chromedriver, WebDriver):
//! live counts that match `/admin/pools`, the Drain button's Close 1012 and
//! progress bar, a rejected reload's messages, markup in names shown as
//! text, the admin token asked for once and sent, and the backend notes
//! (`drain = true`, slow start). Real proxy, real
//! backends, real WebSocket clients.
//!
//! `cargo test --test status_page -- --ignored screenshot` writes
//! docs/status-page.png (the README's picture) from a berth under load.

mod support;

use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use support::browser::Browser;
use support::*;
use tokio_tungstenite::tungstenite::Message;

/// One browser at a time: the machine is small and Chromium is not.
static ONE_BROWSER: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

const WAIT: Duration = Duration::from_secs(15);

/// Opens the status page and waits for its first snapshot.
async fn open_page(browser: &Browser, admin: SocketAddr) {
    browser.goto(&format!("http://{admin}/")).await;
    browser
        .wait_until(
            WAIT,
            "the first snapshot",
            "return Number(document.body.dataset.updates || 0) > 0",
        )
        .await;
}

/// Every backend row as the page shows it: pool, id, live count, state.
async fn page_rows(browser: &Browser) -> Vec<(String, String, u64, String)> {
    let rows = browser
        .execute(
            "return [...document.querySelectorAll('tr[data-backend]')].map(r => [
                r.dataset.pool, r.dataset.backend,
                Number(r.querySelector('.count').textContent),
                r.querySelector('.state').textContent])",
            vec![],
        )
        .await;
    rows.as_array()
        .unwrap()
        .iter()
        .map(|r| {
            (
                r[0].as_str().unwrap().to_string(),
                r[1].as_str().unwrap().to_string(),
                r[2].as_u64().unwrap(),
                r[3].as_str().unwrap().to_string(),
            )
        })
        .collect()
}

/// The same from `/admin/pools`.
async fn api_rows(admin: SocketAddr) -> Vec<(String, String, u64, String)> {
    let (_, body) = admin_request(admin, "GET", "/admin/pools", None).await;
    let json: Value = serde_json::from_str(&body).unwrap();
    let mut out = Vec::new();
    for (pool, p) in json["pools"].as_object().unwrap() {
        for b in p["backends"].as_array().unwrap() {
            out.push((
                pool.clone(),
                b["id"].as_str().unwrap().to_string(),
                b["live_connections"].as_u64().unwrap(),
                b["state"].as_str().unwrap().to_string(),
            ));
        }
    }
    out
}

/// Waits until the page's rows equal `/admin/pools` (asked again each
/// time, so either may move).
async fn wait_for_match(
    browser: &Browser,
    admin: SocketAddr,
    what: &str,
) -> Vec<(String, String, u64, String)> {
    let deadline = Instant::now() + WAIT;
    loop {
        let api = api_rows(admin).await;
        let page = page_rows(browser).await;
        if page == api {
            return page;
        }
        assert!(
            Instant::now() < deadline,
            "{what}: the page shows {page:?}, /admin/pools says {api:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Clicks a backend row's button (`drain` or `undrain`) once the page
/// shows it enabled (it follows the backend's state, a snapshot late).
async fn click(browser: &Browser, pool: &str, id: &str, button: &str) {
    let deadline = Instant::now() + WAIT;
    loop {
        let clicked = browser
            .execute(
                "const row = [...document.querySelectorAll('tr[data-backend]')]
                    .find(r => r.dataset.pool === arguments[0] && r.dataset.backend === arguments[1]);
                 if (!row) return 'no row';
                 const b = row.querySelector('button.' + arguments[2]);
                 if (b.disabled) return 'disabled';
                 b.click();
                 return 'clicked';",
                vec![json!(pool), json!(id), json!(button)],
            )
            .await;
        if clicked == "clicked" {
            return;
        }
        assert!(Instant::now() < deadline, "{button} {pool}/{id}: {clicked}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn text_of(browser: &Browser, id: &str) -> String {
    browser
        .execute(
            "return document.getElementById(arguments[0]).textContent",
            vec![json!(id)],
        )
        .await
        .as_str()
        .unwrap_or_default()
        .to_string()
}

/// The console's errors (a CSP violation or a script error is one).
async fn console_errors(browser: &Browser) -> Vec<String> {
    browser
        .console()
        .await
        .into_iter()
        // An error status the page handles itself (a 401, a 422) is
        // logged by the browser too; those are expected.
        .filter(|l| l.starts_with("SEVERE") && !l.contains("Failed to load resource"))
        .collect()
}

fn two_pools(chat: &[SocketAddr], feed: &[SocketAddr], admin_extra: &str) -> String {
    let mut s = format!(
        r#"
shutdown_window = "500ms"

[[listeners]]
name = "public"
bind = "127.0.0.1:0"

[admin]
bind = "127.0.0.1:0"
{admin_extra}

[[routes]]
path_prefix = "/feed"
pool = "feed"

[[routes]]
pool = "chat"

[pools.chat]
balance = "round_robin"
drain_window = "2s"

[pools.feed]
balance = "least_connections"
"#
    );
    for (pool, addrs) in [("chat", chat), ("feed", feed)] {
        for (i, a) in addrs.iter().enumerate() {
            s.push_str(&format!(
                "[[pools.{pool}.backends]]\nid = \"{pool}-{}\"\naddress = \"{a}\"\n\n",
                i + 1
            ));
        }
    }
    s
}

#[tokio::test]
async fn the_page_shows_every_backend_with_live_counts_that_match_the_api() {
    let _one = ONE_BROWSER.lock().await;
    let backends = [
        WsBackend::start("a").await,
        WsBackend::start("b").await,
        WsBackend::start("c").await,
    ];
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("berth.toml");
    let toml = two_pools(
        &[backends[0].addr, backends[1].addr],
        &[backends[2].addr],
        "",
    );
    std::fs::write(&path, toml).unwrap();
    let proxy = Proxy::start_file(&path).await;
    let admin = proxy.admin.unwrap();
    let browser = Browser::start().await;
    open_page(&browser, admin).await;

    // Titled with the version, the commit and the config file.
    let title = browser.title().await;
    assert!(
        title.starts_with(&format!("berth {} (", env!("CARGO_PKG_VERSION"))),
        "{title}"
    );
    assert!(title.ends_with(&path.display().to_string()), "{title}");
    assert_eq!(
        text_of(&browser, "config").await,
        path.display().to_string()
    );

    let rows = wait_for_match(&browser, admin, "at rest").await;
    let ids: Vec<&str> = rows.iter().map(|r| r.1.as_str()).collect();
    assert_eq!(ids, ["chat-1", "chat-2", "feed-1"]);
    let tags = browser
        .execute(
            "return [...document.querySelectorAll('section.pool')].map(s =>
                [s.dataset.pool, ...[...s.querySelectorAll('.tag')].map(t => t.textContent)])",
            vec![],
        )
        .await;
    assert_eq!(
        tags,
        json!([
            ["chat", "balance: round_robin", "affinity: none", "0 live"],
            [
                "feed",
                "balance: least_connections",
                "affinity: none",
                "0 live"
            ]
        ])
    );

    // Clients come: three on chat (round robin 2 + 1), two on feed.
    let mut chat = Vec::new();
    for _ in 0..3 {
        chat.push(ws_connect(proxy.addr, false, "/").await);
    }
    let mut feed = Vec::new();
    for _ in 0..2 {
        feed.push(ws_connect(proxy.addr, false, "/feed").await);
    }
    let rows = wait_for_match(&browser, admin, "after connecting").await;
    let live: Vec<u64> = rows.iter().map(|r| r.2).collect();
    assert_eq!(live.iter().sum::<u64>(), 5, "{rows:?}");
    assert_eq!(rows[2].2, 2, "{rows:?}");
    browser
        .wait_until(
            WAIT,
            "five live WebSockets in the process card",
            "return document.getElementById('p-ws').textContent === '5 live WebSockets'",
        )
        .await;

    // ...and go.
    for mut ws in chat.drain(..2) {
        ws.close(None).await.unwrap();
        while ws.next().await.is_some() {}
    }
    drop(feed.pop());
    let rows = wait_for_match(&browser, admin, "after disconnecting").await;
    assert_eq!(rows.iter().map(|r| r.2).sum::<u64>(), 2, "{rows:?}");

    // Closes appear in the pool's chart legend.
    browser
        .wait_until(
            WAIT,
            "closes in the chart",
            "const s = [...document.querySelectorAll('section.pool')].find(s => s.dataset.pool === 'chat');
             return s && s.querySelectorAll('.legend .code, svg rect').length >= 2",
        )
        .await;
    assert_eq!(console_errors(&browser).await, Vec::<String>::new());
    drop(browser);
    proxy.shutdown().await;
}

#[tokio::test]
async fn the_drain_button_closes_with_1012_and_the_progress_reaches_the_end() {
    let _one = ONE_BROWSER.lock().await;
    let b1 = WsBackend::start("b1").await;
    let b2 = WsBackend::start("b2").await;
    let proxy = Proxy::start(&config_for(&[b1.addr, b2.addr], "drain_window = \"2s\"")).await;
    let admin = proxy.admin.unwrap();
    let mut clients = Vec::new();
    for _ in 0..6 {
        let mut ws = ws_connect(proxy.addr, false, "/").await;
        let id = whoami(&mut ws).await;
        clients.push((id, ws));
    }
    let browser = Browser::start().await;
    open_page(&browser, admin).await;
    wait_for_match(&browser, admin, "before the drain").await;

    click(&browser, "main", "b1", "drain").await;
    // b1's three clients get Close 1012; b2's are untouched.
    for (id, ws) in clients.iter_mut().filter(|(id, _)| id == "b1") {
        let code = tokio::time::timeout(Duration::from_secs(5), next_close(ws))
            .await
            .unwrap_or_else(|_| panic!("no close for a client of {id}"));
        assert_eq!(code, Some(1012));
    }
    for (_, ws) in clients.iter_mut().filter(|(id, _)| id == "b2") {
        ws.send(Message::text("still here")).await.unwrap();
        assert_eq!(
            ws.next().await.unwrap().unwrap(),
            Message::text("still here")
        );
    }
    // The page shows the drain's progress reaching its end.
    let done = browser
        .wait_until(
            WAIT,
            "the drain's progress to reach 3 of 3",
            "const d = [...document.querySelectorAll('#drain-list .drain-row')]
                .find(r => r.dataset.pool === 'main' && r.dataset.backend === 'b1');
             return d && d.dataset.closed === '3' && d.dataset.total === '3'
                && d.classList.contains('finished')
                && !document.getElementById('drains').hidden
                && [d.querySelector('.small').textContent, d.querySelector('.fill').style.width]",
        )
        .await;
    assert_eq!(done, json!(["3 of 3 closed · done", "100%"]));
    let rows = wait_for_match(&browser, admin, "drained").await;
    assert_eq!(rows[0].3, "draining");
    assert_eq!(b1.closes_seen.lock().unwrap().len(), 3);

    // Undrain puts it back, and the drain leaves the page.
    click(&browser, "main", "b1", "undrain").await;
    browser
        .wait_until(
            WAIT,
            "the drain list to empty",
            "return document.getElementById('drains').hidden",
        )
        .await;
    let rows = wait_for_match(&browser, admin, "undrained").await;
    assert_eq!(rows[0].3, "up");
    assert!(text_of(&browser, "notice")
        .await
        .contains("undrain main/b1: now up"));
    drop(browser);
    proxy.shutdown().await;
}

#[tokio::test]
async fn a_rejected_reload_shows_the_validation_messages() {
    let _one = ONE_BROWSER.lock().await;
    let b1 = WsBackend::start("b1").await;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("berth.toml");
    let good = config_for(&[b1.addr], "")
        .replace("{CERT}", CERT)
        .replace("{KEY}", KEY);
    std::fs::write(&path, &good).unwrap();
    let proxy = Proxy::start_file(&path).await;
    let admin = proxy.admin.unwrap();
    let browser = Browser::start().await;
    open_page(&browser, admin).await;
    assert_eq!(text_of(&browser, "r-result").await, "loaded at startup");

    std::fs::write(
        &path,
        good.replace("connect_timeout = \"1s\"", "connect_timeout = \"soon\""),
    )
    .unwrap();
    browser
        .execute("document.getElementById('reload-btn').click()", vec![])
        .await;
    let expected = format!("{}:", path.display());
    let messages = browser
        .wait_until(
            WAIT,
            "the validation message",
            "const li = [...document.querySelectorAll('#r-messages li')].map(l => l.textContent);
             return li.length > 0 && li",
        )
        .await;
    let first = messages[0].as_str().unwrap();
    assert!(first.starts_with(&expected), "{first}");
    assert!(first.contains("pools.main.connect_timeout"), "{first}");
    assert_eq!(text_of(&browser, "r-result").await, "reload rejected");
    let notice = text_of(&browser, "notice").await;
    assert!(notice.starts_with("Reload failed (422):\n"), "{notice}");
    assert!(notice.contains("pools.main.connect_timeout"), "{notice}");

    // A good file again, with a weight change: the page lists it.
    std::fs::write(
        &path,
        good.replace("id = \"b1\"", "id = \"b1\"\nweight = 4"),
    )
    .unwrap();
    browser
        .execute("document.getElementById('reload-btn').click()", vec![])
        .await;
    let changes = browser
        .wait_until(
            WAIT,
            "the reload's changes",
            "const r = document.getElementById('r-result').textContent;
             const li = [...document.querySelectorAll('#r-changes li')].map(l => l.textContent);
             return r === 'reloaded' && li",
        )
        .await;
    assert_eq!(changes[0], "backend main/b1: weight 1 -> 4");
    // config_for has a TLS listener: its files are read again.
    let tls = changes[1].as_str().unwrap();
    assert!(
        tls.starts_with("listener \"tls\": certificate and key re-read from "),
        "{tls}"
    );
    assert_eq!(changes.as_array().unwrap().len(), 2, "{changes}");
    assert_eq!(
        browser
            .execute(
                "return document.querySelectorAll('#r-messages li').length",
                vec![]
            )
            .await,
        0
    );
    drop(browser);
    proxy.shutdown().await;
}

/// Each backend row's note says why it is in its state when the state
/// alone does not: `drain = true` for a drain the config asks for, `slow
/// start N%` for a backend a reload added while it ramps up; a plain
/// backend has none.
#[tokio::test]
async fn backend_notes_show_a_config_drain_and_a_slow_start() {
    let _one = ONE_BROWSER.lock().await;
    let backends = [
        WsBackend::start("a").await,
        WsBackend::start("b").await,
        WsBackend::start("c").await,
    ];
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("berth.toml");
    let base = two_pools(&[backends[0].addr], &[], "").replace(
        "drain_window = \"2s\"",
        "drain_window = \"2s\"\nslow_start = \"10m\"",
    );
    let drained = format!(
        "{base}[[pools.chat.backends]]\nid = \"chat-2\"\naddress = \"{}\"\ndrain = true\n\n\
         [[pools.feed.backends]]\nid = \"feed-1\"\naddress = \"{}\"\n\n",
        backends[1].addr, backends[2].addr
    );
    std::fs::write(&path, &drained).unwrap();
    let proxy = Proxy::start_file(&path).await;
    let admin = proxy.admin.unwrap();
    let browser = Browser::start().await;
    open_page(&browser, admin).await;
    let notes = "return [...document.querySelectorAll('tr[data-backend]')].map(r =>
        [r.dataset.backend, r.querySelector('.state').textContent, r.querySelector('.note').textContent])";
    let shown = browser
        .wait_until(
            WAIT,
            "the config drain's note",
            &format!(
                "const n = (() => {{ {notes} }})(); return n.length === 3 && n[1][2] !== '' && n"
            ),
        )
        .await;
    assert_eq!(
        shown,
        json!([
            ["chat-1", "up", ""],
            ["chat-2", "draining", "drain = true"],
            ["feed-1", "up", ""]
        ])
    );

    // A reload adds chat-3 to the serving pool: it ramps up from a tenth.
    let added = drained.replace(
        "[[pools.feed.backends]]",
        &format!(
            "[[pools.chat.backends]]\nid = \"chat-3\"\naddress = \"{}\"\n\n[[pools.feed.backends]]",
            backends[2].addr
        ),
    );
    std::fs::write(&path, &added).unwrap();
    let (status, body) = admin_request(admin, "POST", "/admin/reload", None).await;
    assert_eq!(status, 200, "{body}");
    let shown = browser
        .wait_until(
            WAIT,
            "chat-3's slow-start note",
            &format!("const n = (() => {{ {notes} }})(); return n.length === 4 && n"),
        )
        .await;
    let rows = shown.as_array().unwrap();
    assert_eq!(rows[1], json!(["chat-2", "draining", "drain = true"]));
    assert_eq!(rows[2][0], "chat-3");
    assert_eq!(rows[2][1], "up");
    let note = rows[2][2].as_str().unwrap();
    let percent: u32 = note
        .strip_prefix("slow start ")
        .and_then(|p| p.strip_suffix('%'))
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("chat-3's note: {note:?}"));
    // 10 % when it joins, 11 % some seven seconds into a ten-minute ramp.
    assert!((10..=15).contains(&percent), "{note}");
    assert_eq!(rows[0][2], "");
    assert_eq!(console_errors(&browser).await, Vec::<String>::new());
    drop(browser);
    proxy.shutdown().await;
}

#[tokio::test]
async fn a_pool_with_authentication_is_tagged_until_a_reload_turns_it_off() {
    let _one = ONE_BROWSER.lock().await;
    let b1 = WsBackend::start("b1").await;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("berth.toml");
    let plain = config_for(&[b1.addr], "")
        .replace("{CERT}", CERT)
        .replace("{KEY}", KEY);
    // Nothing is asked until a request comes: the service need not exist.
    let with_auth = config_for(
        &[b1.addr],
        "\n[pools.main.auth.forward]\nurl = \"http://127.0.0.1:9/verify\"\n",
    )
    .replace("{CERT}", CERT)
    .replace("{KEY}", KEY);
    std::fs::write(&path, &with_auth).unwrap();
    let proxy = Proxy::start_file(&path).await;
    let admin = proxy.admin.unwrap();
    let browser = Browser::start().await;
    open_page(&browser, admin).await;
    let tags = "return [...document.querySelectorAll('section.pool .tag')].map(t => t.textContent)";
    assert_eq!(
        browser.execute(tags, vec![]).await,
        json!([
            "balance: round_robin",
            "affinity: none",
            "auth: forward",
            "0 live"
        ])
    );

    std::fs::write(&path, &plain).unwrap();
    browser
        .execute("document.getElementById('reload-btn').click()", vec![])
        .await;
    let changes = browser
        .wait_until(
            WAIT,
            "the reload's changes",
            "const r = document.getElementById('r-result').textContent;
             const li = [...document.querySelectorAll('#r-changes li')].map(l => l.textContent);
             return r === 'reloaded' && li",
        )
        .await;
    // (After the TLS listener's files, read again on every reload.)
    assert!(
        changes
            .as_array()
            .unwrap()
            .contains(&json!("pool \"main\": [auth.forward] turned off")),
        "{changes}"
    );
    browser
        .wait_until(
            WAIT,
            "the auth tag to go",
            "return [...document.querySelectorAll('section.pool .tag')]
                .every(t => !t.textContent.startsWith('auth'))",
        )
        .await;
    assert_eq!(
        browser.execute(tags, vec![]).await,
        json!(["balance: round_robin", "affinity: none", "0 live"])
    );
    assert_eq!(console_errors(&browser).await, Vec::<String>::new());
    drop(browser);
    proxy.shutdown().await;
}

#[tokio::test]
async fn markup_in_names_paths_and_messages_is_shown_as_text() {
    let _one = ONE_BROWSER.lock().await;
    let b1 = WsBackend::start("b1").await;
    // A pool name is any TOML key; a backend id is only [A-Za-z0-9._-] (so
    // the closest an id gets is this); a path may hold anything but '/'.
    let pool = r#"<img src=x onerror="window.pwned='pool'"><script>window.pwned='script'</script>"#;
    let id = "b1.-_x";
    let dir = tempfile::tempdir().unwrap();
    let sub = dir
        .path()
        .join(r#"<img src=x onerror="window.pwned='path'">"#);
    std::fs::create_dir(&sub).unwrap();
    let path = sub.join("berth.toml");
    let key = serde_json::to_string(pool).unwrap();
    let toml = format!(
        r#"
shutdown_window = "500ms"

[[listeners]]
name = "public"
bind = "127.0.0.1:0"

[admin]
bind = "127.0.0.1:0"

[[routes]]
pool = {key}

[pools.{key}]
drain_window = "1s"

[[pools.{key}.backends]]
id = "{id}"
address = "{}"
"#,
        b1.addr
    );
    std::fs::write(&path, &toml).unwrap();
    let proxy = Proxy::start_file(&path).await;
    let admin = proxy.admin.unwrap();
    let mut ws = ws_connect(proxy.addr, false, "/").await;
    assert_eq!(whoami(&mut ws).await, "b1");

    let browser = Browser::start().await;
    open_page(&browser, admin).await;
    let rows = wait_for_match(&browser, admin, "markup pool").await;
    assert_eq!(rows[0].0, pool);
    let shown = browser
        .execute(
            "const s = document.querySelector('section.pool');
             return [s.querySelector('h2').textContent, document.getElementById('config').textContent,
                     document.title, document.querySelectorAll('img, main script').length,
                     window.pwned === undefined]",
            vec![],
        )
        .await;
    assert_eq!(shown[0], pool);
    assert_eq!(shown[1], path.display().to_string());
    assert!(
        shown[2]
            .as_str()
            .unwrap()
            .ends_with(&path.display().to_string()),
        "{shown}"
    );
    assert_eq!(shown[3], 0, "markup became elements");
    assert_eq!(shown[4], true, "a script ran");

    // The Drain button reaches that pool (its name percent-encoded).
    click(&browser, pool, id, "drain").await;
    let code = tokio::time::timeout(Duration::from_secs(5), next_close(&mut ws))
        .await
        .unwrap();
    assert_eq!(code, Some(1012));

    // A validation message that quotes markup is text too.
    std::fs::write(
        &path,
        toml.replace("drain_window = \"1s\"", "drain_window = \"<b>1s</b>\""),
    )
    .unwrap();
    browser
        .execute("document.getElementById('reload-btn').click()", vec![])
        .await;
    let message = browser
        .wait_until(
            WAIT,
            "the validation message",
            "const li = document.querySelector('#r-messages li');
             return li && li.textContent",
        )
        .await;
    assert!(
        message.as_str().unwrap().contains("\"<b>1s</b>\""),
        "{message}"
    );
    let after = browser
        .execute(
            "return [document.querySelectorAll('b, img').length, window.pwned === undefined]",
            vec![],
        )
        .await;
    assert_eq!(after, json!([0, true]));
    assert_eq!(console_errors(&browser).await, Vec::<String>::new());
    drop(browser);
    proxy.shutdown().await;
}

#[tokio::test]
async fn with_a_token_the_page_asks_once_and_sends_it() {
    let _one = ONE_BROWSER.lock().await;
    let b1 = WsBackend::start("b1").await;
    let b2 = WsBackend::start("b2").await;
    let toml = two_pools(&[b1.addr, b2.addr], &[], "token = \"t0ps3cret\"")
        .replace("[pools.feed]\nbalance = \"least_connections\"\n", "")
        .replace("[[routes]]\npath_prefix = \"/feed\"\npool = \"feed\"\n", "");
    let proxy = Proxy::start(&toml).await;
    let admin = proxy.admin.unwrap();
    let browser = Browser::start().await;
    open_page(&browser, admin).await;

    // The first click asks for the token instead of sending anything.
    click(&browser, "chat", "chat-1", "drain").await;
    browser
        .wait_until(
            WAIT,
            "the token form",
            "return !document.getElementById('token-box').hidden",
        )
        .await;
    assert_eq!(backend_state(admin, "chat-1").await, "up");

    // A wrong token is refused (401) and asked for again.
    let submit = "document.getElementById('token-input').value = arguments[0];
                  document.querySelector('#token-form button[type=submit]').click();";
    browser.execute(submit, vec![json!("wrong")]).await;
    browser
        .wait_until(
            WAIT,
            "the refusal",
            "return document.getElementById('notice').textContent.includes('refused')
                && !document.getElementById('token-box').hidden",
        )
        .await;
    assert_eq!(backend_state(admin, "chat-1").await, "up");

    // The right one drains, and is kept for the next button.
    browser.execute(submit, vec![json!("t0ps3cret")]).await;
    wait_for_state(admin, "chat-1", "draining").await;
    click(&browser, "chat", "chat-1", "undrain").await;
    wait_for_state(admin, "chat-1", "up").await;
    click(&browser, "chat", "chat-2", "drain").await;
    wait_for_state(admin, "chat-2", "draining").await;
    let stored = browser
        .execute(
            "return [document.getElementById('token-box').hidden, document.cookie,
                     localStorage.length, sessionStorage.length]",
            vec![],
        )
        .await;
    assert_eq!(
        stored,
        json!([true, "", 0, 0]),
        "the token went somewhere it should not"
    );
    drop(browser);
    proxy.shutdown().await;
}

/// Processes whose command line mentions `needle` (Linux: /proc).
fn processes_mentioning(needle: &str) -> Vec<String> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(cmdline) = std::fs::read(entry.path().join("cmdline")) else {
            continue;
        };
        let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
        if cmdline.contains(needle) {
            found.push(format!(
                "{}: {cmdline}",
                entry.file_name().to_string_lossy()
            ));
        }
    }
    found
}

#[tokio::test]
async fn a_dropped_browser_leaves_no_chromium_behind() {
    let _one = ONE_BROWSER.lock().await;
    let browser = Browser::start().await;
    browser.goto("about:blank").await;
    assert_eq!(browser.execute("return 6 * 7", vec![]).await, 42);
    let answer = browser
        .execute_async(
            "const done = arguments[0]; setTimeout(() => done('later'), 50);",
            vec![],
        )
        .await;
    assert_eq!(answer, "later");
    let png = browser.screenshot().await;
    assert!(png.starts_with(b"\x89PNG\r\n\x1a\n"), "not a PNG");
    let profile = browser.profile_dir().display().to_string();
    assert!(
        !processes_mentioning(&profile).is_empty(),
        "no Chromium with {profile}"
    );
    drop(browser);
    let left = processes_mentioning(&profile);
    assert!(left.is_empty(), "left running: {left:#?}");
    assert!(!Path::new(&profile).exists(), "{profile} was not removed");
}

async fn wait_for_state(admin: SocketAddr, id: &str, want: &str) {
    let deadline = Instant::now() + WAIT;
    while backend_state(admin, id).await != want {
        assert!(Instant::now() < deadline, "{id} never became {want}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Writes docs/status-page.png: two pools, a few dozen WebSockets
/// exchanging messages over TLS and plain, closes of several kinds, and a
/// drain in progress. Run it on purpose (it takes about 90 s):
/// `cargo test --test status_page -- --ignored screenshot`.
#[tokio::test]
#[ignore]
async fn screenshot_under_load() {
    let _one = ONE_BROWSER.lock().await;
    let mut backends = Vec::new();
    for id in ["chat-1", "chat-2", "chat-3", "feed-1", "feed-2"] {
        backends.push(WsBackend::start(id).await);
    }
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("berth.toml");
    let addrs: Vec<SocketAddr> = backends.iter().map(|b| b.addr).collect();
    let toml = two_pools(&addrs[..3], &addrs[3..], "")
        .replace("drain_window = \"2s\"", "drain_window = \"90s\"")
        .replace(
            "[[listeners]]\nname = \"public\"\nbind = \"127.0.0.1:0\"\n",
            "[[listeners]]\nname = \"public\"\nbind = \"127.0.0.1:0\"\n\n[[listeners]]\nname = \"tls\"\nbind = \"127.0.0.1:0\"\ntls = { cert = \"{CERT}\", key = \"{KEY}\" }\n",
        )
        .replace("{CERT}", CERT)
        .replace("{KEY}", KEY)
        .replace("id = \"chat-3\"", "id = \"chat-3\"\nweight = 2");
    std::fs::write(&path, toml).unwrap();
    let proxy = Proxy::start_file(&path).await;
    let admin = proxy.admin.unwrap();
    let tls = proxy.tls_addr.unwrap();

    // Short-lived connections all along (the close chart): mostly normal
    // closes, some going-away, some "no status", and backends vanishing.
    let plain = proxy.addr;
    let resuming = tls_client_config();
    let churn_tls = std::sync::Arc::clone(&resuming);
    let churn = tokio::spawn(async move {
        for round in 0u64.. {
            let mut ws = if round % 3 == 0 {
                wss(tls, &churn_tls, "/").await
            } else {
                ws_connect(plain, false, "/").await
            };
            let code = |code| {
                Some(tokio_tungstenite::tungstenite::protocol::CloseFrame {
                    code,
                    reason: "".into(),
                })
            };
            use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
            match round % 9 {
                0 => {
                    ws.send(Message::text("die")).await.ok();
                }
                1 | 2 => {
                    ws.close(code(CloseCode::Away)).await.ok();
                }
                3 => {
                    ws.close(None).await.ok();
                }
                _ => {
                    ws.close(code(CloseCode::Normal)).await.ok();
                }
            }
            while ws.next().await.is_some() {}
            tokio::time::sleep(Duration::from_millis(400 + 300 * (round % 4))).await;
        }
    });
    // 40 clients: chat over TLS (resuming sessions) and plain, feed plain;
    // each sends a message every ~200 ms and reads the echo.
    let mut tasks = Vec::new();
    for i in 0..40 {
        let mut ws = match i % 4 {
            0 => wss(tls, &resuming, "/").await,
            1 | 2 => ws_connect(plain, false, "/").await,
            _ => ws_connect(plain, false, "/feed").await,
        };
        tasks.push(tokio::spawn(async move {
            let msg = "m".repeat(200 + 40 * (i % 7));
            loop {
                if ws.send(Message::text(msg.clone())).await.is_err() {
                    return;
                }
                if !matches!(ws.next().await, Some(Ok(_))) {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(150 + 10 * (i as u64 % 10))).await;
            }
        }));
    }
    // A minute of history for the chart, then a drain over 90 s: in
    // progress when the picture is taken.
    tokio::time::sleep(Duration::from_secs(60)).await;
    let (status, _) = admin_request(
        admin,
        "POST",
        "/admin/pools/chat/backends/chat-2/drain",
        None,
    )
    .await;
    assert_eq!(status, 200);

    let browser = Browser::start_with(support::browser::BrowserOptions {
        window: (1360, 1180),
        ..Default::default()
    })
    .await;
    open_page(&browser, admin).await;
    tokio::time::sleep(Duration::from_secs(12)).await;
    browser
        .wait_until(WAIT, "a closed connection of the drain", "const d = document.querySelector('#drain-list .drain-row'); return d && Number(d.dataset.closed) > 0")
        .await;
    let out = Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/status-page.png");
    std::fs::create_dir_all(out.parent().unwrap()).unwrap();
    browser.save_screenshot(&out).await;
    assert_eq!(console_errors(&browser).await, Vec::<String>::new());
    churn.abort();
    for t in tasks {
        t.abort();
    }
    drop(browser);
    proxy.shutdown().await;
}

/// A wss:// client with `config`, whose session cache lets later
/// connections resume.
async fn wss(addr: SocketAddr, config: &std::sync::Arc<rustls::ClientConfig>, path: &str) -> Ws {
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;
    let req = format!("wss://localhost:{}{path}", addr.port())
        .into_client_request()
        .unwrap();
    let stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let connector = tokio_tungstenite::Connector::Rustls(std::sync::Arc::clone(config));
    tokio_tungstenite::client_async_tls_with_config(req, stream, None, Some(connector))
        .await
        .unwrap()
        .0
}
