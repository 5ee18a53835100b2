//! Three real berth processes run from one config file, as a fleet behind
//! an L4 balancer would: each binds port 0 (so the one file serves every
//! instance on this host; in Kubernetes each pod has its own network and
//! binds the same port), and they share nothing but the file and the files
//! it names (cookie secret, ticket keys). A cookie routes to the same
//! backend through every instance; `drain = true` in the file drains that
//! backend on all three (`--watch`); a DNS change is seen by all three; a
//! TLS session made on one resumes on the others.

mod support;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use rustls::HandshakeKind;
use support::dns::DnsServer;
use support::fleet::Instance;
use support::*;

fn config(backends: &[SocketAddr], dns: SocketAddr, dns_port: u16, keys: &str) -> String {
    let mut s = format!(
        r#"shutdown_window = "0s"

[[listeners]]
name = "public"
bind = "127.0.0.1:0"

[[listeners]]
name = "tls"
bind = "127.0.0.1:0"
tls = {{ cert = "{CERT}", key = "{KEY}", ticket_keys = "{keys}" }}

[admin]
bind = "127.0.0.1:0"

[[routes]]
path_prefix = "/disc"
pool = "disc"

[[routes]]
pool = "chat"

[pools.disc.dns]
name = "disc.test"
port = {dns_port}
interval = "200ms"
resolver = "{dns}"

[pools.chat]
affinity = "cookie"
drain_window = "1s"

[pools.chat.cookie]
secret = "a fleet-wide secret of at least thirty-two bytes"
"#
    );
    for (i, b) in backends.iter().enumerate() {
        s.push_str(&format!(
            "\n[[pools.chat.backends]]\nid = \"c{}\"\naddress = \"{b}\"\n",
            i + 1
        ));
    }
    s
}

/// The backend ids of pool `pool` as one instance's `/admin/pools` lists them.
async fn members(admin: SocketAddr, pool: &str) -> Vec<String> {
    let (_, body) = admin_request(admin, "GET", "/admin/pools", None).await;
    let json: serde_json::Value = serde_json::from_str(&body).unwrap();
    json["pools"][pool]["backends"]
        .as_array()
        .map(|bs| {
            bs.iter()
                .map(|b| b["id"].as_str().unwrap().to_string())
                .collect()
        })
        .unwrap_or_default()
}

async fn eventually<F: std::future::Future<Output = bool>>(
    what: &str,
    mut check: impl FnMut() -> F,
) {
    let deadline = Instant::now() + Duration::from_secs(15);
    while !check().await {
        assert!(Instant::now() < deadline, "timed out waiting: {what}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_instances_from_one_file_act_as_one() {
    let chat = [
        WsBackend::start("c1").await,
        WsBackend::start("c2").await,
        WsBackend::start("c3").await,
    ];
    let addrs: Vec<SocketAddr> = chat.iter().map(|b| b.addr).collect();
    let dns_port = std::net::TcpListener::bind("127.0.0.21:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let _disc_a =
        WsBackend::start_at("d-21", format!("127.0.0.21:{dns_port}").parse().unwrap()).await;
    let _disc_b =
        WsBackend::start_at("d-22", format!("127.0.0.22:{dns_port}").parse().unwrap()).await;
    let dns = DnsServer::start().await;
    dns.set("disc.test", &["127.0.0.21"]);

    let dir = tempfile::tempdir().unwrap();
    let keys = dir.path().join("ticket.keys");
    std::fs::write(&keys, (0..80u8).map(|i| i ^ 0x5a).collect::<Vec<u8>>()).unwrap();
    let text = config(&addrs, dns.addr, dns_port, keys.to_str().unwrap())
        .replace("{CERT}", CERT)
        .replace("{KEY}", KEY);
    let path = dir.path().join("berth.toml");
    std::fs::write(&path, &text).unwrap();
    let fleet: Vec<Instance> = (0..3)
        .map(|_| Instance::start(&path, &["--watch"], 2))
        .collect();
    let public: Vec<SocketAddr> = fleet.iter().map(|i| i.addr("public")).collect();
    assert_ne!(public[0], public[1]);

    // 1. A cookie from one instance routes to the same backend through all.
    let (mut ws, resp) = try_ws_connect(public[0], false, "/", &[]).await.unwrap();
    let pinned = whoami(&mut ws).await;
    let cookie = resp
        .headers()
        .get("set-cookie")
        .expect("an affinity cookie")
        .to_str()
        .unwrap()
        .split(';')
        .next()
        .unwrap()
        .to_string();
    drop(ws);
    let mut clients = Vec::new();
    for &addr in &public {
        for _ in 0..2 {
            let (mut ws, _) = try_ws_connect(addr, false, "/", &[("cookie", &cookie)])
                .await
                .unwrap();
            assert_eq!(whoami(&mut ws).await, pinned, "instance at {addr}");
            clients.push(ws);
        }
    }

    // 2. `drain = true` for that backend in the one file: every instance
    //    drains it; every client gets 1012.
    let entry = format!("id = \"{pinned}\"\n");
    std::fs::write(
        &path,
        text.replace(&entry, &format!("{entry}drain = true\n")),
    )
    .unwrap();
    for ws in &mut clients {
        let code = tokio::time::timeout(Duration::from_secs(10), next_close(ws))
            .await
            .expect("a close within the watch interval plus drain_window");
        assert_eq!(code, Some(1012));
    }
    for i in &fleet {
        assert_eq!(backend_state(i.admin, &pinned).await, "draining");
    }
    // The cookie now re-pins elsewhere, on every instance.
    for &addr in &public {
        let (mut ws, _) = try_ws_connect(addr, false, "/", &[("cookie", &cookie)])
            .await
            .unwrap();
        assert_ne!(whoami(&mut ws).await, pinned);
    }

    // 3. A DNS change is seen by all three.
    let (a, b) = (
        format!("dns-127.0.0.21-{dns_port}"),
        format!("dns-127.0.0.22-{dns_port}"),
    );
    for i in &fleet {
        eventually("the first DNS answer", || async {
            members(i.admin, "disc").await == vec![a.clone()]
        })
        .await;
    }
    dns.set("disc.test", &["127.0.0.22"]);
    for i in &fleet {
        eventually("the changed DNS answer", || async {
            members(i.admin, "disc").await == vec![b.clone()]
        })
        .await;
        let mut ws = ws_connect(i.addr("public"), false, "/disc").await;
        assert_eq!(whoami(&mut ws).await, "d-22");
    }

    // 4. A TLS session from one instance resumes on the others (TLS 1.3 and
    //    1.2).
    for versions in [
        &[&rustls::version::TLS13][..],
        &[&rustls::version::TLS12][..],
    ] {
        let client = tls_client_config_for(versions);
        assert_eq!(
            tls_handshake_kind(fleet[0].addr("tls"), &client).await,
            Some(HandshakeKind::Full)
        );
        for i in &fleet[1..] {
            assert_eq!(
                tls_handshake_kind(i.addr("tls"), &client).await,
                Some(HandshakeKind::Resumed)
            );
        }
    }
}
