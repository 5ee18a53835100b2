//! The affinity cookie check and cookie handling (`berth::affinity`) on
//! arbitrary secrets, pool names, cookie values and `Cookie` headers:
//! - `verify` never panics, accepts every value `sign` makes for the same
//!   pool and secret, and accepts nothing else: a value it accepts is the
//!   one spelling `sign` gives for that id (so a tampered value fails);
//! - `find_cookie` returns bytes that are in a `Cookie` line; after
//!   `strip_cookie` the cookie is gone and every other cookie reads the same;
//! - `client_ip` returns the peer or an address from `X-Forwarded-For`, and
//!   the peer itself when it is not a trusted proxy.
#![no_main]

use std::net::{IpAddr, SocketAddr};

use arbitrary::Arbitrary;
use berth::affinity::{client_ip, find_cookie, strip_cookie, CookieSigner};
use http::header::COOKIE;
use http::{HeaderMap, HeaderValue};
use ipnet::IpNet;
use libfuzzer_sys::fuzz_target;

#[derive(Arbitrary, Debug)]
struct Input {
    secret: Vec<u8>,
    pool: String,
    other_pool: String,
    id: String,
    value: String,
    tamper: (u16, u8),
    name: String,
    other_name: String,
    cookie_lines: Vec<Vec<u8>>,
    peer: ([u8; 16], bool),
    trusted: Vec<([u8; 16], bool, u8)>,
    forwarded: Vec<Vec<u8>>,
}

fn ip((bytes, v4): ([u8; 16], bool)) -> IpAddr {
    if v4 {
        IpAddr::from([bytes[0], bytes[1], bytes[2], bytes[3]])
    } else {
        IpAddr::from(bytes)
    }
}

/// An `X-Forwarded-For` entry as the README describes it: a bare address,
/// `address:port`, or a bracketed IPv6 address.
fn forwarded_ip(entry: &str) -> Option<IpAddr> {
    let ip = entry
        .parse::<IpAddr>()
        .ok()
        .or_else(|| entry.parse::<SocketAddr>().ok().map(|s| s.ip()))
        .or_else(|| {
            entry
                .strip_prefix('[')?
                .strip_suffix(']')?
                .parse::<IpAddr>()
                .ok()
        })?;
    Some(ip.to_canonical())
}

fn signer_checks(input: &Input) {
    let signer = CookieSigner::new(&input.secret);
    let signed = signer.sign(&input.pool, &input.id);
    assert_eq!(signer.verify(&input.pool, &signed), Some(&input.id[..]));
    // Signing is deterministic (every process with the secret agrees).
    assert_eq!(
        CookieSigner::new(&input.secret).sign(&input.pool, &input.id),
        signed
    );
    // Another pool's cookie does not pin a client here.
    if input.other_pool != input.pool {
        let other = signer.sign(&input.other_pool, &input.id);
        assert_ne!(signer.verify(&input.pool, &other), Some(&input.id[..]));
    }
    // One changed byte breaks it (unless the change left a value that is
    // itself validly signed, which `sign` then spells the same way).
    let mut tampered = signed.clone().into_bytes();
    let at = usize::from(input.tamper.0) % tampered.len();
    tampered[at] ^= input.tamper.1;
    if let Ok(tampered) = String::from_utf8(tampered) {
        if let Some(id) = signer.verify(&input.pool, &tampered) {
            assert_eq!(
                signer.sign(&input.pool, id),
                tampered,
                "a forged value passed"
            );
        }
    }
    // An arbitrary value passes only in the one spelling `sign` gives.
    if let Some(id) = signer.verify(&input.pool, &input.value) {
        assert!(input.value.starts_with(id));
        assert_eq!(
            signer.sign(&input.pool, id),
            input.value,
            "a forged value passed"
        );
    }
}

fn cookie_checks(input: &Input) {
    let mut headers = HeaderMap::new();
    for line in &input.cookie_lines {
        if let Ok(v) = HeaderValue::from_bytes(line) {
            headers.append(COOKIE, v);
        }
    }
    let found = find_cookie(&headers, &input.name).map(str::to_owned);
    if let Some(v) = &found {
        let in_a_line = headers.get_all(COOKIE).iter().any(|line| {
            line.as_bytes()
                .windows(v.len().max(1))
                .any(|w| v.is_empty() || w == v.as_bytes())
        });
        assert!(in_a_line, "find_cookie returned bytes from nowhere: {v:?}");
    }
    let other_before = find_cookie(&headers, &input.other_name).map(str::to_owned);
    let mut stripped = headers.clone();
    strip_cookie(&mut stripped, &input.name);
    assert_eq!(
        find_cookie(&stripped, &input.name),
        None,
        "cookie still there"
    );
    if input.other_name != input.name {
        assert_eq!(
            find_cookie(&stripped, &input.other_name).map(str::to_owned),
            other_before,
            "stripping {:?} changed cookie {:?}",
            input.name,
            input.other_name
        );
    }
}

fn client_ip_checks(input: &Input) {
    let peer = ip(input.peer);
    let trusted: Vec<IpNet> = input
        .trusted
        .iter()
        .filter_map(|&(bytes, v4, prefix)| IpNet::new(ip((bytes, v4)), prefix).ok())
        .collect();
    let mut headers = HeaderMap::new();
    let mut entries = Vec::new();
    for line in &input.forwarded {
        if let Ok(v) = HeaderValue::from_bytes(line) {
            if let Ok(text) = v.to_str() {
                entries.extend(text.split(',').filter_map(|e| forwarded_ip(e.trim())));
            }
            headers.append("x-forwarded-for", v);
        }
    }
    let got = client_ip(&headers, peer, &trusted);
    let canonical = peer.to_canonical();
    let peer_trusted = trusted.iter().any(|n| n.contains(&canonical));
    if !peer_trusted {
        assert_eq!(got, canonical, "an untrusted peer's own address is used");
    }
    assert!(
        got == canonical || entries.contains(&got),
        "client_ip made up {got}"
    );
}

fuzz_target!(|input: Input| {
    signer_checks(&input);
    cookie_checks(&input);
    client_ip_checks(&input);
});
