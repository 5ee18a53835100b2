//! The request target and host normalization that routing uses
//! (`proxy::target`), on request targets and `Host` headers built from
//! arbitrary bytes, compared with a reference written here from RFC 3986
//! on bytes:
//! - the normalized path is what RFC 3986 §6.2.2 says: percent-encoded
//!   unreserved characters decoded, other percent-encodings in upper case,
//!   every other byte kept as sent (including UTF-8), dot segments removed
//!   (§5.2.4); a malformed percent-encoding is refused;
//! - normalizing twice changes nothing;
//! - what the backend gets is a valid request target;
//! - the routing host is lower case, without port or trailing dot, and
//!   the forwarded `Host` is a valid header value.
#![no_main]

use arbitrary::Arbitrary;
use berth::proxy::target::{normalize_path, resolve, TargetError};
use http::header::HOST;
use http::uri::PathAndQuery;
use http::{HeaderValue, Request, Uri, Version};
use libfuzzer_sys::fuzz_target;

#[derive(Arbitrary, Debug)]
struct Input {
    target: Vec<u8>,
    hosts: Vec<Vec<u8>>,
    http10: bool,
    path: String,
}

fn unreserved(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~')
}

fn hex(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

/// RFC 3986 §6.2.2.1-2 on bytes; `None` for a malformed `%`.
fn decode_unreserved(path: &[u8]) -> Option<Vec<u8>> {
    let mut out = Vec::with_capacity(path.len());
    let mut i = 0;
    while i < path.len() {
        if path[i] != b'%' {
            out.push(path[i]);
            i += 1;
            continue;
        }
        let hi = hex(*path.get(i + 1)?)?;
        let lo = hex(*path.get(i + 2)?)?;
        let value = hi * 16 + lo;
        if unreserved(value) {
            out.push(value);
        } else {
            out.push(b'%');
            out.push(path[i + 1].to_ascii_uppercase());
            out.push(path[i + 2].to_ascii_uppercase());
        }
        i += 3;
    }
    Some(out)
}

/// RFC 3986 §5.2.4, the algorithm as written there (input buffer, output
/// buffer, rules A to E), on a `/`-rooted path.
fn remove_dot_segments(path: &[u8]) -> Vec<u8> {
    let mut input = path.to_vec();
    let mut out: Vec<u8> = Vec::new();
    while !input.is_empty() {
        if input.starts_with(b"../") {
            input.drain(..3);
        } else if input.starts_with(b"./") || input.starts_with(b"/./") {
            input.drain(..2);
        } else if input == b"/." {
            input = b"/".to_vec();
        } else if input.starts_with(b"/../") || input == b"/.." {
            if input == b"/.." {
                input = b"/".to_vec();
            } else {
                input.drain(..3);
            }
            let cut = out.iter().rposition(|&b| b == b'/').unwrap_or(0);
            out.truncate(cut);
        } else if input == b"." || input == b".." {
            input.clear();
        } else {
            let start = usize::from(input[0] == b'/');
            let end = input[start..]
                .iter()
                .position(|&b| b == b'/')
                .map_or(input.len(), |p| p + start);
            out.extend(input.drain(..end));
        }
    }
    out
}

fn reference(path: &str) -> Result<Vec<u8>, TargetError> {
    if !path.starts_with('/') {
        return Ok(path.as_bytes().to_vec());
    }
    let decoded = decode_unreserved(path.as_bytes()).ok_or(TargetError::BadPath)?;
    let out = remove_dot_segments(&decoded);
    Ok(if out.is_empty() { b"/".to_vec() } else { out })
}

fn check_path(path: &str) {
    let got = normalize_path(path);
    let want = reference(path);
    match (&got, &want) {
        (Ok(g), Ok(w)) => assert!(
            g.as_bytes() == &w[..],
            "normalize_path({path:?}) = {g:?}, RFC 3986 says {:?}",
            String::from_utf8_lossy(w)
        ),
        (Err(g), Err(w)) => assert_eq!(g, w),
        _ => panic!("normalize_path({path:?}) = {got:?}, RFC 3986 says {want:?}"),
    }
    if let Ok(normal) = got {
        assert_eq!(
            normalize_path(&normal).as_deref(),
            Ok(&*normal),
            "not idempotent"
        );
    }
}

fuzz_target!(|input: Input| {
    check_path(&input.path);

    let Ok(uri) = Uri::try_from(&input.target[..]) else {
        return;
    };
    let version = if input.http10 {
        Version::HTTP_10
    } else {
        Version::HTTP_11
    };
    let mut builder = Request::builder().uri(uri.clone()).version(version);
    for h in &input.hosts {
        if let Ok(v) = HeaderValue::from_bytes(h) {
            builder = builder.header(HOST, v);
        }
    }
    let Ok(req) = builder.body(()) else {
        return;
    };
    let (parts, ()) = req.into_parts();
    check_path(parts.uri.path());
    let Ok(target) = resolve(&parts) else {
        return;
    };
    assert_eq!(
        normalize_path(parts.uri.path()).as_deref(),
        Ok(&target.path[..])
    );
    // (An absolute-form target with a query but no path goes on as sent,
    // and is refused when the backend's request is built.)
    if target.path_and_query.starts_with('/') {
        assert!(target.path_and_query.starts_with(&target.path[..]));
    }
    if target.path.starts_with('/') {
        assert!(
            PathAndQuery::try_from(target.path_and_query.as_str()).is_ok(),
            "the backend's target {:?} is not a valid request target",
            target.path_and_query
        );
    }
    if let Some(host) = &target.route_host {
        assert!(!host.is_empty());
        assert!(!host.ends_with('.'), "route host {host:?} ends with a dot");
        assert!(
            !host.bytes().any(|b| b.is_ascii_uppercase()),
            "route host {host:?}"
        );
        assert!(target.host.is_some());
    }
});
