//! Access logs from the real binary: `--log-format json` writes one event
//! per finished WebSocket connection and per HTTP request.

mod support;

use std::io::{BufRead, BufReader};
use std::process::Stdio;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use support::*;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::Message;

#[tokio::test]
async fn json_access_log_has_one_event_per_connection_and_request() {
    let b = WsBackend::start("b1").await;
    let mut berth = BerthProcess::spawn(
        &config_for(&[b.addr], ""),
        &["--log-format", "json"],
        Stdio::piped(),
    )
    .await;
    let stderr = berth.child.stderr.take().unwrap();
    let lines = std::thread::spawn(move || {
        BufReader::new(stderr)
            .lines()
            .map_while(Result::ok)
            .collect::<Vec<_>>()
    });
    let addr = berth.addr;
    let mut ws = ws_connect(addr, false, "/").await;
    ws.send(Message::text("hello")).await.unwrap();
    assert_eq!(ws.next().await.unwrap().unwrap(), Message::text("hello"));
    ws.close(Some(CloseFrame {
        code: CloseCode::Normal,
        reason: "bye".into(),
    }))
    .await
    .unwrap();
    while ws.next().await.is_some() {}
    // A plain request (the backend is WebSocket-only and answers 400).
    let _ = http_get(addr, "/plain").await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    berth.signal("TERM");
    let _ = berth.wait_exit(Duration::from_secs(10)).await;
    let lines = lines.join().unwrap();
    let events: Vec<serde_json::Value> = lines
        .iter()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect();
    assert!(!events.is_empty(), "no JSON lines in {lines:?}");
    let access: Vec<&serde_json::Value> = events
        .iter()
        .filter(|e| e["target"] == "berth::access")
        .collect();
    let ws_events: Vec<_> = access.iter().filter(|e| e["kind"] == "websocket").collect();
    assert_eq!(ws_events.len(), 1, "{lines:#?}");
    let e = ws_events[0];
    assert_eq!(e["pool"], "main");
    assert_eq!(e["backend"], "b1");
    assert_eq!(e["listener"], "public");
    assert_eq!(e["initiator"], "client");
    assert_eq!(e["close_code"], "1000");
    assert_eq!(e["messages_client_to_backend"], 1);
    assert_eq!(e["messages_backend_to_client"], 1);
    assert!(e["bytes_client_to_backend"].as_u64().unwrap() >= 11);
    assert!(e["client"].as_str().unwrap().starts_with("127.0.0.1:"));
    let http_events: Vec<_> = access.iter().filter(|e| e["kind"] == "http").collect();
    assert_eq!(http_events.len(), 1, "{lines:#?}");
    assert_eq!(http_events[0]["path"], "/plain");
    assert_eq!(http_events[0]["method"], "GET");
    assert!(http_events[0]["status"].as_u64().is_some());
}
