//! The upgrade-request checks (`ws::handshake`) on requests built from
//! arbitrary methods, versions, header names and values: no panic, and the
//! answers agree with RFC 6455 §4.2.1: only a GET over HTTP/1.1 with the
//! `upgrade` token in `Connection` and `websocket` in `Upgrade` is a
//! WebSocket upgrade; only version 13 with a 16-byte base64 key passes, and
//! the accept key computed for it is the one berth then expects. An HTTP/2
//! `CONNECT` is an extended CONNECT (RFC 8441) whatever its headers: these
//! requests carry no `:protocol`, so it is an unsupported one
//! (`tests/http2.rs` covers `:protocol = websocket`).
#![no_main]

use arbitrary::Arbitrary;
use berth::ws::handshake::{
    accept_key, accept_matches, classify, header_has_token, validate, HandshakeError, UpgradeKind,
};
use http::header::{CONNECTION, UPGRADE};
use http::{HeaderMap, HeaderName, HeaderValue, Method, Request, Version};
use libfuzzer_sys::fuzz_target;

const NAMES: [&str; 8] = [
    "connection",
    "upgrade",
    "sec-websocket-key",
    "sec-websocket-version",
    "sec-websocket-accept",
    "host",
    "origin",
    "sec-websocket-protocol",
];

#[derive(Arbitrary, Debug)]
enum Name {
    Known(u8),
    Raw(Vec<u8>),
}

#[derive(Arbitrary, Debug)]
struct Input {
    method: u8,
    version: u8,
    headers: Vec<(Name, Vec<u8>)>,
    other_key: Vec<u8>,
}

fuzz_target!(|input: Input| {
    let method = [Method::GET, Method::POST, Method::HEAD, Method::CONNECT]
        [usize::from(input.method % 4)]
    .clone();
    let version = [
        Version::HTTP_11,
        Version::HTTP_10,
        Version::HTTP_09,
        Version::HTTP_2,
    ][usize::from(input.version % 4)];
    let mut builder = Request::builder()
        .method(method.clone())
        .version(version)
        .uri("/ws");
    for (name, value) in &input.headers {
        let name = match name {
            Name::Known(i) => HeaderName::from_static(NAMES[usize::from(*i) % NAMES.len()]),
            Name::Raw(raw) => match HeaderName::from_bytes(raw) {
                Ok(n) => n,
                Err(_) => continue,
            },
        };
        let Ok(value) = HeaderValue::from_bytes(value) else {
            continue;
        };
        builder = builder.header(name, value);
    }
    let Ok(req) = builder.body(()) else {
        return;
    };
    let headers = req.headers();

    let h2_connect = version == Version::HTTP_2 && method == Method::CONNECT;
    match classify(&req) {
        _ if h2_connect => assert_eq!(classify(&req), UpgradeKind::Unsupported),
        UpgradeKind::WebSocket => {
            assert_eq!(method, Method::GET);
            assert_eq!(version, Version::HTTP_11);
            assert!(header_has_token(headers, CONNECTION, "upgrade"));
            assert!(headers.contains_key(UPGRADE));
        }
        UpgradeKind::Unsupported => {
            assert!(header_has_token(headers, CONNECTION, "upgrade"));
            assert!(headers.contains_key(UPGRADE));
        }
        UpgradeKind::None => {
            assert!(
                !header_has_token(headers, CONNECTION, "upgrade") || !headers.contains_key(UPGRADE)
            );
        }
    }

    let version_13 = headers
        .get("sec-websocket-version")
        .is_some_and(|v| v.as_bytes() == b"13");
    match validate(headers) {
        Ok(key) => {
            assert!(version_13);
            assert_eq!(key.len(), 24, "key {key:?}");
            assert!(key.ends_with("=="));
            let accept = accept_key(key);
            assert_eq!(accept.len(), 28);
            let mut answer = HeaderMap::new();
            let value = HeaderValue::from_str(&accept).expect("base64 is a header value");
            answer.insert("sec-websocket-accept", value);
            assert!(accept_matches(&answer, key));
            // Another key's accept value does not match.
            if let Ok(other) = std::str::from_utf8(&input.other_key) {
                if other != key && accept_key(other) != accept {
                    assert!(!accept_matches(&answer, other));
                }
            }
        }
        Err(HandshakeError::BadVersion) => assert!(!version_13),
        Err(HandshakeError::MissingKey) => {
            assert!(version_13);
            assert!(!headers.contains_key("sec-websocket-key"));
        }
        Err(HandshakeError::BadKey) => {
            assert!(version_13);
            assert!(headers.contains_key("sec-websocket-key"));
        }
    }
});
