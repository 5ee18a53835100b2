//! The opening handshake (RFC 6455 §4): recognizing an upgrade request,
//! or an HTTP/2 extended CONNECT (RFC 8441 §4), validating it before any
//! backend is touched (§4.2.1; RFC 8441 §5), making the key of the
//! HTTP/1.1 handshake berth sends for an HTTP/2 client, and checking the
//! backend's `Sec-WebSocket-Accept` (§4.2.2, §4.1 step 4).

use base64::engine::general_purpose::STANDARD;
use base64::Engine as _;
use http::header::{CONNECTION, UPGRADE};
use http::{HeaderMap, Method, Request, Version};
use sha1::{Digest, Sha1};

/// The GUID every WebSocket accept key is derived with (RFC 6455 §1.3).
const ACCEPT_GUID: &[u8] = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11";

/// What kind of request this is, as far as upgrades go.
#[derive(Debug, PartialEq, Eq)]
pub enum UpgradeKind {
    /// No `Connection: upgrade`: an ordinary HTTP request.
    None,
    /// A WebSocket upgrade request (not yet validated).
    WebSocket,
    /// `Connection: upgrade` with an `Upgrade` other than websocket, or a
    /// websocket upgrade on a method or version that cannot carry one.
    Unsupported,
}

/// Why a WebSocket handshake was refused before reaching a backend.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum HandshakeError {
    /// §4.2.2: answer 426 with the version berth speaks.
    #[error("unsupported Sec-WebSocket-Version (berth speaks 13)")]
    BadVersion,
    #[error("missing Sec-WebSocket-Key")]
    MissingKey,
    #[error("Sec-WebSocket-Key is not base64 of 16 bytes")]
    BadKey,
}

/// True when a comma-separated header list contains `token` (ASCII
/// case-insensitive), across every instance of the header.
pub fn header_has_token(headers: &HeaderMap, name: http::header::HeaderName, token: &str) -> bool {
    headers.get_all(name).iter().any(|value| {
        value.to_str().is_ok_and(|v| {
            v.split(',')
                .any(|part| part.trim().eq_ignore_ascii_case(token))
        })
    })
}

/// Classifies a request: `Connection` contains the `upgrade` token, and
/// `Upgrade` names websocket on a GET over HTTP/1.1 (§4.2.1 items 1–4); or,
/// over HTTP/2, a `CONNECT` whose `:protocol` is `websocket` (RFC 8441 §4).
/// Any other HTTP/2 `CONNECT` is unsupported.
pub fn classify<B>(req: &Request<B>) -> UpgradeKind {
    if req.version() == Version::HTTP_2 && req.method() == Method::CONNECT {
        let websocket = req
            .extensions()
            .get::<hyper::ext::Protocol>()
            .is_some_and(|p| p.as_str().eq_ignore_ascii_case("websocket"));
        return if websocket {
            UpgradeKind::WebSocket
        } else {
            UpgradeKind::Unsupported
        };
    }
    if !header_has_token(req.headers(), CONNECTION, "upgrade") {
        return UpgradeKind::None;
    }
    let Some(upgrade) = req.headers().get(UPGRADE) else {
        // `Connection: upgrade` with no Upgrade header asks for nothing.
        return UpgradeKind::None;
    };
    let is_websocket = upgrade.to_str().is_ok_and(|v| {
        v.split(',')
            .any(|p| p.trim().eq_ignore_ascii_case("websocket"))
    });
    if is_websocket && req.method() == Method::GET && req.version() == Version::HTTP_11 {
        UpgradeKind::WebSocket
    } else {
        UpgradeKind::Unsupported
    }
}

/// Validates the version of an HTTP/2 extended CONNECT (RFC 8441 §5: it
/// carries no key; berth makes one for the backend, [`new_key`]).
pub fn validate_h2(headers: &HeaderMap) -> Result<(), HandshakeError> {
    let version_ok = headers
        .get("sec-websocket-version")
        .is_some_and(|v| v.as_bytes() == b"13");
    if version_ok {
        Ok(())
    } else {
        Err(HandshakeError::BadVersion)
    }
}

/// A fresh `Sec-WebSocket-Key`: 16 random bytes in base64 (§4.1).
pub fn new_key() -> String {
    let bytes: [u8; 16] = rand::random();
    STANDARD.encode(bytes)
}

/// Validates version and key (§4.2.1 items 5–6) and returns the key.
pub fn validate(headers: &HeaderMap) -> Result<&str, HandshakeError> {
    validate_h2(headers)?;
    let key = headers
        .get("sec-websocket-key")
        .ok_or(HandshakeError::MissingKey)?;
    let key = key.to_str().map_err(|_| HandshakeError::BadKey)?.trim();
    // 16 random bytes in base64 are always 24 characters with "==" padding.
    let mut decoded = [0u8; 18];
    match STANDARD.decode_slice(key, &mut decoded) {
        Ok(16) if key.len() == 24 => Ok(key),
        _ => Err(HandshakeError::BadKey),
    }
}

/// The `Sec-WebSocket-Accept` value for a client key (§4.2.2 item 5.4).
pub fn accept_key(key: &str) -> String {
    let mut sha = Sha1::new();
    sha.update(key.as_bytes());
    sha.update(ACCEPT_GUID);
    STANDARD.encode(sha.finalize())
}

/// True when the backend's accept header matches the client's key.
pub fn accept_matches(headers: &HeaderMap, key: &str) -> bool {
    headers
        .get("sec-websocket-accept")
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.trim() == accept_key(key))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(headers: &[(&str, &str)]) -> Request<()> {
        let mut b = Request::builder().method("GET").uri("/ws");
        for (k, v) in headers {
            b = b.header(*k, *v);
        }
        b.body(()).unwrap()
    }

    #[test]
    fn rfc_sample_accept_key() {
        // The example from RFC 6455 §1.3.
        assert_eq!(
            accept_key("dGhlIHNhbXBsZSBub25jZQ=="),
            "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="
        );
    }

    #[test]
    fn classify_requires_both_headers() {
        assert_eq!(classify(&request(&[])), UpgradeKind::None);
        assert_eq!(
            classify(&request(&[("upgrade", "websocket")])),
            UpgradeKind::None
        );
        let ws = request(&[
            ("connection", "keep-alive, Upgrade"),
            ("upgrade", "WebSocket"),
        ]);
        assert_eq!(classify(&ws), UpgradeKind::WebSocket);
        let h2c = request(&[("connection", "upgrade"), ("upgrade", "h2c")]);
        assert_eq!(classify(&h2c), UpgradeKind::Unsupported);
    }

    #[test]
    fn extended_connect_is_a_websocket_only_with_its_protocol() {
        let connect = |protocol: Option<&str>| {
            let mut req = Request::builder()
                .method(Method::CONNECT)
                .version(Version::HTTP_2)
                .uri("https://chat.example.com/ws")
                .body(())
                .unwrap();
            if let Some(p) = protocol {
                req.extensions_mut().insert(hyper::ext::Protocol::from(p));
            }
            req
        };
        assert_eq!(
            classify(&connect(Some("websocket"))),
            UpgradeKind::WebSocket
        );
        assert_eq!(
            classify(&connect(Some("WebSocket"))),
            UpgradeKind::WebSocket
        );
        assert_eq!(
            classify(&connect(Some("connect-udp"))),
            UpgradeKind::Unsupported
        );
        assert_eq!(classify(&connect(None)), UpgradeKind::Unsupported);
        // HTTP/1.1's CONNECT is left to the plain path, as before.
        let mut h1 = connect(Some("websocket"));
        *h1.version_mut() = Version::HTTP_11;
        assert_eq!(classify(&h1), UpgradeKind::None);
    }

    #[test]
    fn new_keys_are_valid_and_differ() {
        let (a, b) = (new_key(), new_key());
        assert_ne!(a, b);
        for key in [a, b] {
            let r = request(&[("sec-websocket-version", "13"), ("sec-websocket-key", &key)]);
            assert_eq!(validate(r.headers()), Ok(key.as_str()));
        }
        let r = request(&[("sec-websocket-version", "8")]);
        assert_eq!(validate_h2(r.headers()), Err(HandshakeError::BadVersion));
        let r = request(&[("sec-websocket-version", "13")]);
        assert_eq!(validate_h2(r.headers()), Ok(()));
    }

    #[test]
    fn post_upgrade_is_unsupported() {
        let mut req = request(&[("connection", "upgrade"), ("upgrade", "websocket")]);
        *req.method_mut() = Method::POST;
        assert_eq!(classify(&req), UpgradeKind::Unsupported);
    }

    #[test]
    fn validate_version_then_key() {
        let key = "dGhlIHNhbXBsZSBub25jZQ==";
        let r = request(&[("sec-websocket-version", "8"), ("sec-websocket-key", key)]);
        assert_eq!(validate(r.headers()), Err(HandshakeError::BadVersion));
        let r = request(&[("sec-websocket-version", "13")]);
        assert_eq!(validate(r.headers()), Err(HandshakeError::MissingKey));
        let r = request(&[
            ("sec-websocket-version", "13"),
            ("sec-websocket-key", "c2hvcnQ="),
        ]);
        assert_eq!(validate(r.headers()), Err(HandshakeError::BadKey));
        let r = request(&[
            ("sec-websocket-version", "13"),
            ("sec-websocket-key", "!!!notbase64!!!!!!!!!!=="),
        ]);
        assert_eq!(validate(r.headers()), Err(HandshakeError::BadKey));
        let r = request(&[("sec-websocket-version", "13"), ("sec-websocket-key", key)]);
        assert_eq!(validate(r.headers()), Ok(key));
    }
}
