//! What lets berth instances act as one fleet, tested with real processes:
//! shared TLS ticket keys (`tls.ticket_keys`), `berth run --watch`, and
//! `reuse_port`.

mod support;

use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};

use rustls::HandshakeKind;
use support::fleet::{metric, Instance};
use support::*;

/// A config with one TLS listener "tls" (ticket keys from `keys`, if any)
/// and one plain listener "public", both on port 0.
fn tls_config(backend: SocketAddr, keys: Option<&Path>) -> String {
    let tickets = keys.map_or(String::new(), |k| {
        format!(", ticket_keys = \"{}\"", k.display())
    });
    format!(
        r#"shutdown_window = "0s"

[[listeners]]
name = "tls"
bind = "127.0.0.1:0"
tls = {{ cert = "{CERT}", key = "{KEY}"{tickets} }}

[[listeners]]
name = "public"
bind = "127.0.0.1:0"

[admin]
bind = "127.0.0.1:0"

[[routes]]
pool = "main"

[[pools.main.backends]]
id = "b1"
address = "{backend}"
"#
    )
}

fn key(seed: u8) -> Vec<u8> {
    (0..80u8)
        .map(|i| i.wrapping_mul(37).wrapping_add(seed))
        .collect()
}

fn write(dir: &Path, name: &str, text: impl AsRef<[u8]>) -> std::path::PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, text).unwrap();
    path
}

/// A process serving `config` (written to `dir/name`).
fn start(dir: &Path, name: &str, config: &str, extra: &[&str]) -> Instance {
    let path = write(dir, name, config);
    Instance::start(&path, extra, 2)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_resumes_on_another_instance_with_the_same_ticket_keys() {
    let ws = WsBackend::start("b1").await;
    let dir = tempfile::tempdir().unwrap();
    let old = write(dir.path(), "old.keys", key(1));
    let rotated = write(dir.path(), "rotated.keys", [key(2), key(1)].concat());
    let other = write(dir.path(), "other.keys", key(9));
    let a = start(dir.path(), "a.toml", &tls_config(ws.addr, Some(&old)), &[]);
    let b = start(dir.path(), "b.toml", &tls_config(ws.addr, Some(&old)), &[]);
    let c = start(
        dir.path(),
        "c.toml",
        &tls_config(ws.addr, Some(&other)),
        &[],
    );
    let none = start(dir.path(), "none.toml", &tls_config(ws.addr, None), &[]);
    let r = start(
        dir.path(),
        "r.toml",
        &tls_config(ws.addr, Some(&rotated)),
        &[],
    );

    for versions in [
        &[&rustls::version::TLS13][..],
        &[&rustls::version::TLS12][..],
    ] {
        let name = format!("{:?}", versions[0].version);
        // A session from a resumes on b (same file), not on c (other key)
        // nor on an instance without the file.
        let client = tls_client_config_for(versions);
        assert_eq!(
            tls_handshake_kind(a.addr("tls"), &client).await,
            Some(HandshakeKind::Full),
            "{name}"
        );
        assert_eq!(
            tls_handshake_kind(b.addr("tls"), &client).await,
            Some(HandshakeKind::Resumed),
            "{name}: a -> b"
        );
        let client = tls_client_config_for(versions);
        tls_handshake_kind(a.addr("tls"), &client).await;
        assert_eq!(
            tls_handshake_kind(c.addr("tls"), &client).await,
            Some(HandshakeKind::Full),
            "{name}: a -> c"
        );
        let client = tls_client_config_for(versions);
        tls_handshake_kind(a.addr("tls"), &client).await;
        assert_eq!(
            tls_handshake_kind(none.addr("tls"), &client).await,
            Some(HandshakeKind::Full),
            "{name}: a -> none"
        );

        // The rotated file (new key first) still opens a's old tickets ...
        let client = tls_client_config_for(versions);
        tls_handshake_kind(a.addr("tls"), &client).await;
        assert_eq!(
            tls_handshake_kind(r.addr("tls"), &client).await,
            Some(HandshakeKind::Resumed),
            "{name}: a -> rotated"
        );
        // ... and issues with the new key: a (old key only) cannot open
        // them, an instance with the new key alone can.
        let client = tls_client_config_for(versions);
        tls_handshake_kind(r.addr("tls"), &client).await;
        assert_eq!(
            tls_handshake_kind(a.addr("tls"), &client).await,
            Some(HandshakeKind::Full),
            "{name}: rotated -> a"
        );
    }
    let new_only = write(dir.path(), "new.keys", key(2));
    let n = start(
        dir.path(),
        "n.toml",
        &tls_config(ws.addr, Some(&new_only)),
        &[],
    );
    let client = tls_client_config();
    tls_handshake_kind(r.addr("tls"), &client).await;
    assert_eq!(
        tls_handshake_kind(n.addr("tls"), &client).await,
        Some(HandshakeKind::Resumed),
        "rotated -> new only"
    );

    // A reload that rotates a's file keeps its old tickets working, and a
    // then issues tickets n (new key) accepts.
    let client = tls_client_config();
    tls_handshake_kind(a.addr("tls"), &client).await;
    std::fs::write(&old, [key(2), key(1)].concat()).unwrap();
    a.signal("HUP");
    wait_for(|| reloads(&a) > 0).await;
    assert_eq!(
        tls_handshake_kind(a.addr("tls"), &client).await,
        Some(HandshakeKind::Resumed),
        "across the reload"
    );
    let client = tls_client_config();
    tls_handshake_kind(a.addr("tls"), &client).await;
    assert_eq!(
        tls_handshake_kind(n.addr("tls"), &client).await,
        Some(HandshakeKind::Resumed),
        "a, rotated -> new only"
    );
}

/// Reload lines a process has logged.
fn reloads(i: &Instance) -> usize {
    i.log
        .lock()
        .unwrap()
        .iter()
        .filter(|l| l.contains("config reloaded"))
        .count()
}

async fn wait_for(mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !done() {
        assert!(Instant::now() < deadline, "timed out");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn metrics(admin: SocketAddr) -> String {
    admin_request(admin, "GET", "/metrics", None).await.1
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_reloads_on_an_edit_and_on_a_configmap_symlink_swap_and_rejects_a_broken_file() {
    let ws = WsBackend::start("b1").await;
    let dir = tempfile::tempdir().unwrap();
    let base = tls_config(ws.addr, None)
        .replace("{CERT}", CERT)
        .replace("{KEY}", KEY);
    // The layout a Kubernetes ConfigMap volume has: berth.toml ->
    // ..data/berth.toml, ..data -> ..v1 (a directory).
    let d = dir.path();
    std::fs::create_dir(d.join("..v1")).unwrap();
    std::fs::write(d.join("..v1/berth.toml"), &base).unwrap();
    std::os::unix::fs::symlink("..v1", d.join("..data")).unwrap();
    std::os::unix::fs::symlink("..data/berth.toml", d.join("berth.toml")).unwrap();
    let berth = Instance::start(&d.join("berth.toml"), &["--watch"], 2);
    let admin = berth.admin;
    let success = "berth_config_reloads_total{result=\"success\"}";
    let failure = "berth_config_reloads_total{result=\"failure\"}";
    assert_eq!(metric(&metrics(admin).await, success), 1.0);

    // 1. The kubelet's swap: a new directory, then ..data replaced
    //    atomically (a new symlink renamed over it).
    let drained = base.replace("address = ", "drain = true\naddress = ");
    std::fs::create_dir(d.join("..v2")).unwrap();
    std::fs::write(d.join("..v2/berth.toml"), &drained).unwrap();
    std::os::unix::fs::symlink("..v2", d.join("..data_tmp")).unwrap();
    std::fs::rename(d.join("..data_tmp"), d.join("..data")).unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while backend_state(admin, "b1").await != "draining" {
        assert!(Instant::now() < deadline, "no reload after the swap");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(metric(&metrics(admin).await, success), 2.0);

    // 2. A broken file (through the same symlinks): rejected, counted and
    //    logged as on SIGHUP; the running config stays.
    std::fs::write(d.join("..v2/berth.toml"), "[[listeners]]\nname = 5\n").unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while metric(&metrics(admin).await, failure) < 1.0 {
        assert!(Instant::now() < deadline, "the broken file was not tried");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(
        berth.logged("config reload rejected; the running config stays in force"),
        1
    );
    assert_eq!(backend_state(admin, "b1").await, "draining");
    // Not retried while it stays broken.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    assert_eq!(metric(&metrics(admin).await, failure), 1.0);

    // 3. An edit in place (a plain write, no symlink change) is seen too.
    std::fs::write(d.join("..v2/berth.toml"), &base).unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while backend_state(admin, "b1").await != "up" {
        assert!(Instant::now() < deadline, "no reload after the edit");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(metric(&metrics(admin).await, success), 3.0);
    // The WebSocket path still works on the config in force.
    let mut client = ws_connect(berth.addr("public"), false, "/").await;
    assert_eq!(whoami(&mut client).await, "b1");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reuse_port_lets_two_processes_share_a_port() {
    let http = http_backend("h1", std::sync::Arc::new(tokio::sync::Notify::new())).await;
    let dir = tempfile::tempdir().unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let config = |reuse: bool| {
        tls_config(http, None)
            .replace("{CERT}", CERT)
            .replace("{KEY}", KEY)
            .replacen(
                "name = \"public\"\nbind = \"127.0.0.1:0\"",
                &format!("name = \"public\"\nbind = \"127.0.0.1:{port}\"\nreuse_port = {reuse}"),
                1,
            )
    };
    let one = start(dir.path(), "one.toml", &config(true), &[]);
    let two = start(dir.path(), "two.toml", &config(true), &[]);
    assert_eq!(one.addr("public"), two.addr("public"));
    let shared = one.addr("public");
    // The kernel spreads connections over both (by a hash of each
    // connection's addresses): 64 connections reach both processes.
    for _ in 0..64 {
        let (status, _) = http_get(shared, "/echo").await;
        assert_eq!(status, 200);
    }
    let served = |text: &str| {
        metric(
            text,
            "berth_http_requests_total{backend=\"b1\",pool=\"main\",status_class=\"2xx\"}",
        )
    };
    let (a, b) = (
        served(&metrics(one.admin).await),
        served(&metrics(two.admin).await),
    );
    assert_eq!(a + b, 64.0);
    assert!(
        a > 0.0 && b > 0.0,
        "one process took every connection: {a} and {b}"
    );

    // Without reuse_port a third process cannot bind the port: exit 1,
    // naming the listener.
    let path = write(dir.path(), "three.toml", config(false));
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_berth"))
        .args(["run", "--config"])
        .arg(&path)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("cannot bind listener \"public\""),
        "{stderr}"
    );
}
