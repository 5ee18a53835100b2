//! Sticky routing: which backend a client belongs to.
//!
//! This module owns the two affinity schemes a pool can use and nothing
//! else:
//!
//! - **Cookie affinity**: a signed cookie names the backend by its `id`
//!   ([`CookieSigner`]), plus the helpers to read the cookie from the request
//!   ([`find_cookie`]), hide it from the backend ([`strip_cookie`]) and build
//!   the `Set-Cookie` value that pins the client ([`set_cookie_value`]).
//! - **Hash affinity**: a request key ([`HashKey`], [`hash_key_value`]) is
//!   mapped onto the pool's eligible backends with weighted rendezvous
//!   hashing ([`rendezvous_order`], [`rendezvous_pick`]), optionally with
//!   bounded loads ([`pick_bounded`]).
//!
//! Everything here is pure: no I/O, no clocks, no global or per-process state
//! and no randomness. The same inputs give the same answer in every berth
//! process, which is what lets several berth instances that share a config
//! agree on where a cookie or a key goes. Deciding *when* to use affinity,
//! which backends are eligible, and counting live connections is the
//! caller's job.

use std::borrow::Cow;
use std::cmp::Ordering;
use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use hmac::{Hmac, Mac};
use http::header::{HeaderValue, COOKIE};
use http::{HeaderMap, Uri};
use ipnet::IpNet;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use crate::config::{HashKey, SameSite};

// ---------------------------------------------------------------------------
// Cookie signing
// ---------------------------------------------------------------------------

type HmacSha256 = Hmac<Sha256>;

/// SHA-256 block size: HMAC keys are normalised to exactly this many bytes.
const HMAC_BLOCK: usize = 64;
/// How many leading bytes of the HMAC-SHA256 output the cookie carries.
/// 128 bits is far beyond what an online forger can brute-force.
const TAG_BYTES: usize = 16;
/// Length of the base64url (unpadded) text of a `TAG_BYTES` tag.
const TAG_CHARS: usize = (TAG_BYTES * 4).div_ceil(3);

/// Signs and checks affinity cookie values with a pool's secret.
///
/// Value format: `<backend_id>.<tag>` where `tag` is the unpadded base64url
/// encoding of the first 16 bytes of
/// `HMAC-SHA256(secret, pool_name || 0x00 || backend_id)`.
///
/// The pool name is inside the MAC so that a cookie minted for one pool
/// cannot pin a client in another pool that happens to share the secret and
/// has a backend with the same id. The tag alphabet has no `.`, so the value
/// is split at its last `.` and backend ids may themselves contain dots.
/// There is no timestamp or nonce: signing is deterministic, so every process
/// holding the same secret mints and accepts exactly the same values.
#[derive(Clone)]
pub struct CookieSigner {
    /// HMAC state with the key already absorbed; cloned for every use.
    mac: HmacSha256,
}

impl fmt::Debug for CookieSigner {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Never print key material.
        f.write_str("CookieSigner { .. }")
    }
}

impl CookieSigner {
    /// A signer for `secret` (any length; the config asks for at least 32
    /// bytes).
    pub fn new(secret: &[u8]) -> CookieSigner {
        // RFC 2104 key normalisation done by hand: a key longer than the
        // block is replaced by its digest, then zero-padded to the block
        // size. HMAC under the padded block is by definition HMAC under the
        // original key, and going through the fixed-size constructor means
        // there is no "invalid length" error to handle.
        let mut block = [0u8; HMAC_BLOCK];
        if secret.len() > HMAC_BLOCK {
            let digest = Sha256::digest(secret);
            block[..digest.len()].copy_from_slice(&digest);
        } else {
            block[..secret.len()].copy_from_slice(secret);
        }
        let mac = <HmacSha256 as Mac>::new(&block.into());
        CookieSigner { mac }
    }

    fn keyed(&self, pool: &str, backend_id: &str) -> HmacSha256 {
        let mut mac = self.mac.clone();
        mac.update(pool.as_bytes());
        mac.update(&[0]);
        mac.update(backend_id.as_bytes());
        mac
    }

    /// The cookie value naming `backend_id` in `pool`.
    pub fn sign(&self, pool: &str, backend_id: &str) -> String {
        let tag = self.keyed(pool, backend_id).finalize().into_bytes();
        let mut value = String::with_capacity(backend_id.len() + 1 + TAG_CHARS);
        value.push_str(backend_id);
        value.push('.');
        URL_SAFE_NO_PAD.encode_string(&tag[..TAG_BYTES], &mut value);
        value
    }

    /// The backend id named by `value` if it was signed for `pool` with this
    /// secret, else `None`. Any input is accepted without panicking; the tag
    /// comparison is constant-time.
    ///
    /// `None` also covers values in any other format (another proxy, a
    /// future berth). An authentic id may still name a backend that is gone
    /// or unhealthy; checking that is the caller's job. Either way the client
    /// is simply re-pinned.
    pub fn verify<'a>(&self, pool: &str, value: &'a str) -> Option<&'a str> {
        let (id, tag_text) = value.rsplit_once('.')?;
        if tag_text.len() != TAG_CHARS {
            return None;
        }
        // The decoder rejects non-zero trailing bits, so each tag has exactly
        // one accepted spelling.
        let tag = URL_SAFE_NO_PAD.decode(tag_text).ok()?;
        if tag.len() != TAG_BYTES {
            return None;
        }
        let expected = self.keyed(pool, id).finalize().into_bytes();
        // Constant-time, so that response timing does not tell a forger how
        // many leading bytes of a guessed tag were right.
        bool::from(expected[..TAG_BYTES].ct_eq(&tag)).then_some(id)
    }
}

// ---------------------------------------------------------------------------
// Cookie headers
// ---------------------------------------------------------------------------

/// How the affinity cookie is set (name and attributes, not the value).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CookieSpec {
    pub name: String,
    /// `Path`; the config defaults it to `/`.
    pub path: String,
    pub domain: Option<String>,
    pub same_site: SameSite,
    /// `Max-Age`; `None` makes a session cookie.
    pub max_age: Option<Duration>,
}

/// The `Set-Cookie` header value pinning the client to `value`.
///
/// `secure` says whether the listener that served the request is TLS.
pub fn set_cookie_value(spec: &CookieSpec, value: &str, secure: bool) -> String {
    let mut out = format!("{}={}; Path={}", spec.name, value, spec.path);
    if let Some(domain) = &spec.domain {
        out.push_str("; Domain=");
        out.push_str(domain);
    }
    if let Some(max_age) = spec.max_age {
        // Round a fractional second up: `Max-Age=0` would delete the cookie.
        let secs = max_age.as_secs() + u64::from(max_age.subsec_nanos() > 0);
        out.push_str(&format!("; Max-Age={secs}"));
    }
    out.push_str("; HttpOnly");
    // Browsers reject a `SameSite=None` cookie that is not also `Secure`, so
    // it gets `Secure` even on a plain-HTTP listener (for example behind a
    // TLS-terminating load balancer). The cookie then only comes back over
    // HTTPS, which is what such a deployment wants anyway.
    if secure || spec.same_site == SameSite::None {
        out.push_str("; Secure");
    }
    out.push_str("; SameSite=");
    out.push_str(spec.same_site.as_str());
    out
}

/// Splits one `Cookie` header value into its `name=value` pairs (RFC 6265
/// §5.4: pairs separated by `;` and optional whitespace), both trimmed.
/// Pieces without `=` are skipped. Works on bytes, so one cookie with
/// non-UTF-8 bytes does not hide the others on the same line.
fn cookie_pairs(line: &[u8]) -> impl Iterator<Item = (&[u8], &[u8])> {
    line.split(|&b| b == b';').filter_map(|piece| {
        let eq = piece.iter().position(|&b| b == b'=')?;
        Some((trim_ows(&piece[..eq]), trim_ows(&piece[eq + 1..])))
    })
}

/// The value of cookie `name` from the request's `Cookie` headers (there may
/// be several, e.g. after HTTP/2 splitting). The first occurrence wins, which
/// is the most specific path when a browser holds several. Surrounding
/// double quotes are removed. A value that is not UTF-8 counts as missing.
pub fn find_cookie<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    let (_, value) = headers
        .get_all(COOKIE)
        .iter()
        .flat_map(|line| cookie_pairs(line.as_bytes()))
        .find(|(n, _)| *n == name.as_bytes())?;
    let value = match value {
        [b'"', inner @ .., b'"'] => inner,
        _ => value,
    };
    std::str::from_utf8(value).ok()
}

/// Removes cookie `name` from the request so the backend never sees it.
///
/// Only `Cookie` headers that contain it are rewritten (their remaining
/// pairs keep their order and text, joined with `"; "`); a header left empty
/// is dropped; other headers stay byte-for-byte as they were, in order.
pub fn strip_cookie(headers: &mut HeaderMap, name: &str) {
    let name = name.as_bytes();
    let is_target = |piece: &[u8]| {
        piece
            .iter()
            .position(|&b| b == b'=')
            .is_some_and(|eq| trim_ows(&piece[..eq]) == name)
    };
    let touched = headers
        .get_all(COOKIE)
        .iter()
        .any(|line| line.as_bytes().split(|&b| b == b';').any(is_target));
    if !touched {
        return;
    }
    let lines: Vec<HeaderValue> = headers.get_all(COOKIE).iter().cloned().collect();
    headers.remove(COOKIE);
    for line in lines {
        let bytes = line.as_bytes();
        if !bytes.split(|&b| b == b';').any(is_target) {
            headers.append(COOKIE, line);
            continue;
        }
        let kept: Vec<&[u8]> = bytes
            .split(|&b| b == b';')
            .map(trim_ows)
            .filter(|piece| !piece.is_empty() && !is_target(piece))
            .collect();
        if kept.is_empty() {
            continue;
        }
        let joined = kept.join(&b"; "[..]);
        // Pieces of a valid header value joined by "; " are still valid;
        // should that ever fail, keep the original line rather than lose the
        // application's cookies.
        headers.append(COOKIE, HeaderValue::from_bytes(&joined).unwrap_or(line));
    }
}

fn trim_ows(bytes: &[u8]) -> &[u8] {
    let start = bytes.iter().position(|&b| b != b' ' && b != b'\t');
    let Some(start) = start else { return &[] };
    let end = bytes
        .iter()
        .rposition(|&b| b != b' ' && b != b'\t')
        .unwrap_or(start);
    &bytes[start..=end]
}

// ---------------------------------------------------------------------------
// Hash keys
// ---------------------------------------------------------------------------

/// The value `key` takes for a request, or `None` when the request does not
/// carry it (the caller then falls back to the pool's `balance`). A header,
/// cookie or parameter that is present but empty counts as missing, so that
/// all such clients do not pile onto one backend. `ClientIp` is never
/// missing.
pub fn hash_key_value(
    key: &HashKey,
    headers: &HeaderMap,
    uri: &Uri,
    peer: IpAddr,
    trusted_proxies: &[IpNet],
) -> Option<String> {
    let value = match key {
        HashKey::ClientIp => client_ip(headers, peer, trusted_proxies).to_string(),
        HashKey::Header(name) => {
            let mut joined = Vec::new();
            for line in headers.get_all(name) {
                let line = trim_ows(line.as_bytes());
                if line.is_empty() {
                    continue;
                }
                if !joined.is_empty() {
                    joined.extend_from_slice(b", ");
                }
                joined.extend_from_slice(line);
            }
            String::from_utf8_lossy(&joined).into_owned()
        }
        HashKey::Cookie(name) => find_cookie(headers, name)?.to_string(),
        HashKey::Query(name) => query_param(uri.query()?, name)?,
        // A verified claim is not in the request as sent: the balancer
        // takes it from the authentication result.
        HashKey::Claim(_) => return None,
    };
    (!value.is_empty()).then_some(value)
}

/// The first value of parameter `name` in `query`, both sides decoded as
/// `application/x-www-form-urlencoded` (`+` is a space, `%XX` a byte; a
/// malformed escape is kept literally, bytes that are not UTF-8 become U+FFFD).
pub fn query_param(query: &str, name: &str) -> Option<String> {
    query
        .split('&')
        .map(|pair| pair.split_once('=').unwrap_or((pair, "")))
        .find(|(n, _)| form_decode(n) == name)
        .map(|(_, value)| form_decode(value).into_owned())
}

/// `text` decoded as `application/x-www-form-urlencoded` (see [`query_param`]).
pub fn form_decode(text: &str) -> Cow<'_, str> {
    if !text.bytes().any(|b| b == b'%' || b == b'+') {
        return Cow::Borrowed(text);
    }
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'+' => out.push(b' '),
            b'%' => {
                let hi = bytes.get(i + 1).and_then(|b| hex_value(*b));
                let lo = bytes.get(i + 2).and_then(|b| hex_value(*b));
                if let (Some(hi), Some(lo)) = (hi, lo) {
                    out.push(hi << 4 | lo);
                    i += 3;
                    continue;
                }
                out.push(b'%');
            }
            b => out.push(b),
        }
        i += 1;
    }
    Cow::Owned(String::from_utf8_lossy(&out).into_owned())
}

fn hex_value(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

/// The address a request is attributed to.
///
/// Without trusted proxies, or when the peer is not one of them, it is the
/// peer. When the peer is trusted, `X-Forwarded-For` (all its lines, in
/// order) is walked from the right, skipping trusted addresses; the first
/// untrusted one is the client. Entries to its left were written by the
/// client itself and are never believed. If the walk hits an entry that is
/// not an address, or runs out while every entry is trusted, the last
/// trusted address reached is used (never something a client could forge).
///
/// IPv4-mapped IPv6 addresses (`::ffff:a.b.c.d`, seen on dual-stack sockets)
/// are treated as the IPv4 address.
pub fn client_ip(headers: &HeaderMap, peer: IpAddr, trusted_proxies: &[IpNet]) -> IpAddr {
    let trusted = |ip: IpAddr| {
        let ip = ip.to_canonical();
        trusted_proxies.iter().any(|net| net.contains(&ip))
    };
    let mut current = peer.to_canonical();
    if !trusted(current) {
        return current;
    }
    let lines: Vec<&[u8]> = headers
        .get_all("x-forwarded-for")
        .iter()
        .map(HeaderValue::as_bytes)
        .collect();
    for entry in lines
        .iter()
        .rev()
        .flat_map(|line| line.rsplit(|&b| b == b','))
    {
        let entry = trim_ows(entry);
        if entry.is_empty() {
            continue;
        }
        let Some(ip) = parse_forwarded_ip(entry) else {
            return current;
        };
        current = ip;
        if !trusted(ip) {
            return ip;
        }
    }
    current
}

/// An `X-Forwarded-For` entry: a bare address, or, leniently, one with a
/// port (`1.2.3.4:80`, `[::1]:80`) or in brackets (`[::1]`).
fn parse_forwarded_ip(entry: &[u8]) -> Option<IpAddr> {
    let text = std::str::from_utf8(entry).ok()?;
    let ip = text
        .parse::<IpAddr>()
        .ok()
        .or_else(|| text.parse::<SocketAddr>().ok().map(|sa| sa.ip()))
        .or_else(|| {
            text.strip_prefix('[')
                .and_then(|t| t.strip_suffix(']'))
                .and_then(|t| t.parse::<IpAddr>().ok())
        })?;
    Some(ip.to_canonical())
}

// ---------------------------------------------------------------------------
// Weighted rendezvous hashing
// ---------------------------------------------------------------------------
//
// Why rendezvous (highest random weight) hashing rather than a hash ring:
// - There is no ring to build or rebuild. The eligible set changes on every
//   health flip, drain and reload; HRW just scores whatever candidates it is
//   handed, so there is no shared structure to keep in sync or swap.
// - Removing a backend moves only the keys that were on it (every other
//   key's top score is unchanged), and adding one moves only the keys it now
//   wins, all of them to the new backend. That is the minimal possible churn.
// - With the logarithmic method, score = weight / -ln(u), u uniform in (0,1),
//   the winner is backend i with probability exactly w_i / sum(w): each score
//   is an exponential race. A ring only approximates weights through virtual
//   node counts and needs many of them to be even.
// - A pick is O(N) hashes. For pools of tens to hundreds of backends this is
//   a few microseconds at most, per new connection, which is negligible next
//   to a TCP connect to the backend.
// - Each key has a full preference order for free (sort by score), which is
//   what bounded loads need: an overloaded first choice spills to the key's
//   own second choice, not to a neighbour shared with every other key.
//
// Stability: the hash is FNV-1a 64 over `key || 0xff || backend_id`, followed
// by the MurmurHash3 `fmix64` finaliser for avalanche, with fixed constants
// and no seed (never `RandomState`). The 0xff separator cannot occur in a
// UTF-8 backend id, so (key, id) pairs never collide by concatenation. The
// same key and the same set of (id, weight) candidates therefore give the
// same choice in every process, on every host, in every version, and
// independently of the order of `candidates`. Changing any of this reshuffles
// every pinned client: the pinned values in the tests exist to catch that.
// (The only floating-point step is `ln`; two scores would have to agree to
// the last bit for a libm difference between hosts to matter.)

const FNV_OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
const FNV_PRIME: u64 = 0x0000_0100_0000_01b3;

fn fnv1a(mut state: u64, bytes: &[u8]) -> u64 {
    for &b in bytes {
        state ^= u64::from(b);
        state = state.wrapping_mul(FNV_PRIME);
    }
    state
}

/// MurmurHash3's 64-bit finaliser: a bijection in which every input bit
/// affects every output bit.
fn fmix64(mut k: u64) -> u64 {
    k ^= k >> 33;
    k = k.wrapping_mul(0xff51_afd7_ed55_8ccd);
    k ^= k >> 33;
    k = k.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    k ^= k >> 33;
    k
}

/// FNV-1a state after `key || 0xff`, shared by every candidate's hash.
fn key_state(key: &[u8]) -> u64 {
    fnv1a(fnv1a(FNV_OFFSET, key), &[0xff])
}

fn candidate_hash(key_state: u64, backend_id: &str) -> u64 {
    fmix64(fnv1a(key_state, backend_id.as_bytes()))
}

/// The stable 64-bit hash of (`key`, `backend_id`) that rendezvous hashing
/// ranks by.
pub fn stable_hash(key: &[u8], backend_id: &str) -> u64 {
    candidate_hash(key_state(key), backend_id)
}

/// `weight / -ln(u)` with `u` taken from the top 52 bits of `hash`, mapped to
/// the open interval (0, 1) (`(k + 0.5) / 2^52` is exact in an f64 and never
/// 0 or 1, so the score is always finite and positive). Weight 0 scores 0.
fn score(weight: u32, hash: u64) -> f64 {
    if weight == 0 {
        return 0.0;
    }
    let u = ((hash >> 12) as f64 + 0.5) / (1u64 << 52) as f64;
    f64::from(weight) / -u.ln()
}

#[derive(Clone, Copy)]
struct Ranked {
    score: f64,
    hash: u64,
    index: usize,
}

/// `Greater` when `a` is preferred to `b`. A total order: score, then raw
/// hash, then id (so ties never depend on candidate order), then index (for
/// duplicate ids).
fn preference(a: &Ranked, b: &Ranked, candidates: &[(&str, u32)]) -> Ordering {
    a.score
        .total_cmp(&b.score)
        .then(a.hash.cmp(&b.hash))
        .then_with(|| candidates[b.index].0.cmp(candidates[a.index].0))
        .then(b.index.cmp(&a.index))
}

fn ranked<'a>(key: &[u8], candidates: &'a [(&'a str, u32)]) -> impl Iterator<Item = Ranked> + 'a {
    ranked_by_state(key_state(key), candidates)
}

fn ranked_by_state<'a>(
    state: u64,
    candidates: &'a [(&'a str, u32)],
) -> impl Iterator<Item = Ranked> + 'a {
    candidates
        .iter()
        .enumerate()
        .map(move |(index, (id, weight))| {
            let hash = candidate_hash(state, id);
            Ranked {
                score: score(*weight, hash),
                hash,
                index,
            }
        })
}

/// The candidates in `key`'s rendezvous preference order, best first, as
/// indexes into `candidates` (the `(id, weight)` of the eligible backends:
/// healthy and not draining). Weight-0 candidates come last.
pub fn rendezvous_order(key: &[u8], candidates: &[(&str, u32)]) -> Vec<usize> {
    let mut ranks: Vec<Ranked> = ranked(key, candidates).collect();
    ranks.sort_unstable_by(|a, b| preference(b, a, candidates));
    ranks.into_iter().map(|r| r.index).collect()
}

/// The first of [`rendezvous_order`] without sorting or allocating; `None`
/// only when `candidates` is empty.
pub fn rendezvous_pick(key: &[u8], candidates: &[(&str, u32)]) -> Option<usize> {
    ranked(key, candidates)
        .max_by(|a, b| preference(a, b, candidates))
        .map(|r| r.index)
}

/// What a key contributes to every candidate's hash (the FNV-1a state
/// after `key || 0xff`): enough to rank candidates for it later without
/// keeping the key itself. [`rendezvous_pick_by_hash`] on it gives the same
/// answer as [`rendezvous_pick`] on the key.
pub fn key_hash(key: &[u8]) -> u64 {
    key_state(key)
}

/// [`rendezvous_pick`] for a key known only by its [`key_hash`].
pub fn rendezvous_pick_by_hash(key_hash: u64, candidates: &[(&str, u32)]) -> Option<usize> {
    ranked_by_state(key_hash, candidates)
        .max_by(|a, b| preference(a, b, candidates))
        .map(|r| r.index)
}

/// The candidate for `key` under consistent hashing with bounded loads
/// (Mirrokni, Thorup, Zadimoghaddam).
///
/// `live[i]` is the number of live connections of `candidates[i]` (a missing
/// entry counts as 0). With `c = None` this is [`rendezvous_pick`]. With
/// `c = Some(c)`, candidate `i` is full when
/// `live[i] + 1 > ceil(c * (total_live + 1) * w_i / sum_w)`, i.e. taking one
/// more connection would put it above `c` times its weighted fair share of
/// the load including the new connection; the key then goes to the first
/// candidate in *its own* preference order that is not full. Because the
/// capacities add up to at least `c * (total_live + 1) > total_live`, some
/// candidate always has room. The config requires `c > 1`; a smaller value
/// is treated as 1 and a non-finite one as unbounded. When every weight is 0
/// the shares are equal.
///
/// Returns `None` only if `candidates` is empty.
pub fn pick_bounded(
    key: &[u8],
    candidates: &[(&str, u32)],
    live: &[u64],
    c: Option<f64>,
) -> Option<usize> {
    let first = rendezvous_pick(key, candidates)?;
    let Some(c) = c.filter(|c| c.is_finite()) else {
        return Some(first);
    };
    let c = c.max(1.0);
    let load = |i: usize| live.get(i).copied().unwrap_or(0);
    let total = (0..candidates.len())
        .map(load)
        .fold(0u64, u64::saturating_add);
    let sum_weights: u64 = candidates.iter().map(|(_, w)| u64::from(*w)).sum();
    let budget = c * (total as f64 + 1.0);
    let full = |i: usize| {
        let share = if sum_weights == 0 {
            1.0 / candidates.len() as f64
        } else {
            f64::from(candidates[i].1) / sum_weights as f64
        };
        // `as` saturates; the budget is never negative.
        let capacity = (budget * share).ceil() as u64;
        load(i).saturating_add(1) > capacity
    };
    if !full(first) {
        return Some(first);
    }
    let choice = rendezvous_order(key, candidates)
        .into_iter()
        .find(|&i| !full(i))
        .unwrap_or(first);
    Some(choice)
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    const SECRET: &[u8] = b"0123456789abcdef0123456789abcdef";

    // ---- cookie signing ----

    #[test]
    fn sign_verify_round_trip() {
        let signer = CookieSigner::new(SECRET);
        for id in ["a", "b1", "web-1.eu_west", "x.y.z"] {
            let value = signer.sign("chat", id);
            assert_eq!(signer.verify("chat", &value), Some(id), "{value}");
            let tag = value.rsplit_once('.').map(|(_, t)| t).unwrap_or_default();
            assert_eq!(tag.len(), TAG_CHARS);
            assert!(value.starts_with(id));
        }
    }

    #[test]
    fn signature_is_pinned() {
        // Catches an accidental change of the cookie format or MAC input,
        // which would log every pinned client out of its backend.
        let signer = CookieSigner::new(SECRET);
        assert_eq!(signer.sign("chat", "b1"), PINNED_COOKIE);
    }
    const PINNED_COOKIE: &str = "b1.j6lYFIG7K3Qjj4pqausX2Q";

    #[test]
    fn key_normalisation_matches_hmac_crate() {
        for len in [0usize, 1, 31, 32, 63, 64, 65, 100, 300] {
            let secret: Vec<u8> = (0..len).map(|i| (i * 7 + 3) as u8).collect();
            let ours = CookieSigner::new(&secret)
                .keyed("p", "id")
                .finalize()
                .into_bytes();
            let mut reference =
                HmacSha256::new_from_slice(&secret).expect("HMAC accepts any key length");
            reference.update(b"p\0id");
            assert_eq!(ours, reference.finalize().into_bytes(), "key length {len}");
        }
    }

    #[test]
    fn two_signers_with_same_secret_agree() {
        let a = CookieSigner::new(SECRET);
        let b = CookieSigner::new(SECRET);
        assert_eq!(a.sign("chat", "b2"), b.sign("chat", "b2"));
        assert_eq!(b.verify("chat", &a.sign("chat", "b2")), Some("b2"));
    }

    #[test]
    fn forged_or_foreign_cookies_are_rejected() {
        let signer = CookieSigner::new(SECRET);
        let good = signer.sign("chat", "b1");
        let (id, tag) = good.rsplit_once('.').expect("has a dot");

        // Tampered MAC: change each character of the tag in turn.
        for pos in 0..tag.len() {
            let mut bytes = tag.as_bytes().to_vec();
            bytes[pos] = if bytes[pos] == b'A' { b'B' } else { b'A' };
            let forged = format!("{id}.{}", String::from_utf8_lossy(&bytes));
            assert_eq!(signer.verify("chat", &forged), None, "{forged}");
        }
        // Tampered id, same MAC.
        assert_eq!(signer.verify("chat", &format!("b2.{tag}")), None);
        assert_eq!(signer.verify("chat", &format!("b1x.{tag}")), None);
        assert_eq!(signer.verify("chat", &format!(".{tag}")), None);
        // Another pool, another secret.
        assert_eq!(signer.verify("other", &good), None);
        assert_eq!(
            CookieSigner::new(b"another secret of 32+ bytes.....").verify("chat", &good),
            None
        );
        // Truncated or extended.
        for cut in 0..good.len() {
            assert_eq!(
                signer.verify("chat", &good[..cut]),
                None,
                "{}",
                &good[..cut]
            );
        }
        assert_eq!(signer.verify("chat", &format!("{good}A")), None);
        assert_eq!(signer.verify("chat", &format!("{good}=")), None);
        // Empty and garbage.
        for bad in [
            "", ".", "..", "b1", "b1.", "b1..", "=", "b1.====", "b1.é", "ü.ñ", "\0.\0",
        ] {
            assert_eq!(signer.verify("chat", bad), None, "{bad:?}");
        }
        // The same 128 bits spelled non-canonically: the last character
        // carries 2 tag bits and 4 padding bits; setting a padding bit gives
        // a string that a lenient decoder would map to the same tag.
        const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
        let last = tag.as_bytes()[tag.len() - 1];
        let sextet = ALPHABET.iter().position(|&b| b == last).expect("base64url");
        assert_eq!(sextet & 0b1111, 0, "canonical tags end in zero bits");
        let respelled = format!(
            "{}{}",
            &good[..good.len() - 1],
            ALPHABET[sextet | 1] as char
        );
        assert_eq!(signer.verify("chat", &respelled), None);
    }

    #[test]
    fn verify_never_panics_on_random_input() {
        let signer = CookieSigner::new(SECRET);
        let good = signer.sign("chat", "b1");
        let mut rng = rand::rngs::StdRng::seed_from_u64(0x0062_6572_7468);
        for round in 0..5000 {
            let len = rng.gen_range(0..=80);
            let text = match round % 4 {
                // Arbitrary bytes, made into a string lossily.
                0 => {
                    let bytes: Vec<u8> = (0..len).map(|_| rng.gen()).collect();
                    String::from_utf8_lossy(&bytes).into_owned()
                }
                // Arbitrary Unicode scalar values.
                1 => (0..len).map(|_| rng.gen::<char>()).collect(),
                // Cookie-ish alphabet with dots, right length region.
                2 => {
                    const ALPHABET: &[u8] =
                        b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_.=";
                    let len = rng.gen_range(20..=30);
                    (0..len)
                        .map(|_| ALPHABET[rng.gen_range(0..ALPHABET.len())] as char)
                        .collect()
                }
                // A valid value with one byte replaced by a random char.
                _ => {
                    let mut chars: Vec<char> = good.chars().collect();
                    let at = rng.gen_range(0..chars.len());
                    chars[at] = rng.gen();
                    chars.into_iter().collect()
                }
            };
            let verified = signer.verify("chat", &text);
            assert!(verified.is_none() || text == good, "{text:?}");
        }
    }

    // ---- Set-Cookie ----

    fn spec() -> CookieSpec {
        CookieSpec {
            name: "berth_chat".to_string(),
            path: "/".to_string(),
            domain: None,
            same_site: SameSite::Lax,
            max_age: None,
        }
    }

    #[test]
    fn set_cookie_session_cookie() {
        assert_eq!(
            set_cookie_value(&spec(), "b1.xyz", false),
            "berth_chat=b1.xyz; Path=/; HttpOnly; SameSite=Lax"
        );
    }

    #[test]
    fn set_cookie_max_age_and_tls() {
        let spec = CookieSpec {
            max_age: Some(Duration::from_secs(3600)),
            same_site: SameSite::Strict,
            path: "/app".to_string(),
            ..spec()
        };
        assert_eq!(
            set_cookie_value(&spec, "v", true),
            "berth_chat=v; Path=/app; Max-Age=3600; HttpOnly; Secure; SameSite=Strict"
        );
        let sub_second = CookieSpec {
            max_age: Some(Duration::from_millis(1500)),
            ..spec
        };
        assert!(set_cookie_value(&sub_second, "v", false).contains("; Max-Age=2;"));
    }

    #[test]
    fn set_cookie_same_site_none_forces_secure() {
        let spec = CookieSpec {
            same_site: SameSite::None,
            ..spec()
        };
        for tls in [false, true] {
            assert_eq!(
                set_cookie_value(&spec, "v", tls),
                "berth_chat=v; Path=/; HttpOnly; Secure; SameSite=None"
            );
        }
    }

    #[test]
    fn set_cookie_domain() {
        let spec = CookieSpec {
            domain: Some("example.com".to_string()),
            ..spec()
        };
        assert_eq!(
            set_cookie_value(&spec, "v", false),
            "berth_chat=v; Path=/; Domain=example.com; HttpOnly; SameSite=Lax"
        );
    }

    // ---- Cookie header parsing ----

    fn cookie_headers(lines: &[&str]) -> HeaderMap {
        let mut headers = HeaderMap::new();
        headers.insert("host", HeaderValue::from_static("example.com"));
        for line in lines {
            headers.append(COOKIE, HeaderValue::from_str(line).expect("valid header"));
        }
        headers.insert("accept", HeaderValue::from_static("*/*"));
        headers
    }

    fn cookie_lines(headers: &HeaderMap) -> Vec<&str> {
        headers
            .get_all(COOKIE)
            .iter()
            .map(|v| v.to_str().expect("ascii"))
            .collect()
    }

    #[test]
    fn find_cookie_across_headers() {
        let headers = cookie_headers(&[
            "a=1; theme=dark",
            "sid=\"q\";berth_chat=b1.tag ;x=",
            "berth_chat=second",
        ]);
        assert_eq!(find_cookie(&headers, "berth_chat"), Some("b1.tag"));
        assert_eq!(find_cookie(&headers, "a"), Some("1"));
        assert_eq!(find_cookie(&headers, "theme"), Some("dark"));
        assert_eq!(find_cookie(&headers, "sid"), Some("q"));
        assert_eq!(find_cookie(&headers, "x"), Some(""));
        assert_eq!(find_cookie(&headers, "berth"), None);
        assert_eq!(find_cookie(&headers, "dark"), None);
        assert_eq!(find_cookie(&HeaderMap::new(), "a"), None);

        // A non-UTF-8 neighbour does not hide the affinity cookie.
        let mut odd = HeaderMap::new();
        let line = HeaderValue::from_bytes(b"app=caf\xe9; berth_chat=b1.tag")
            .expect("obs-text is allowed");
        odd.append(COOKIE, line);
        assert_eq!(find_cookie(&odd, "berth_chat"), Some("b1.tag"));
        assert_eq!(find_cookie(&odd, "app"), None);
    }

    #[test]
    fn strip_cookie_keeps_app_cookies() {
        let mut headers = cookie_headers(&[
            "a=1; berth_chat=b1.tag; theme=dark",
            "untouched=1;weird  spacing=2",
            "berth_chat=b2.tag",
            "z=9;berth_chat=x",
        ]);
        strip_cookie(&mut headers, "berth_chat");
        assert_eq!(
            cookie_lines(&headers),
            ["a=1; theme=dark", "untouched=1;weird  spacing=2", "z=9"]
        );
        assert_eq!(find_cookie(&headers, "berth_chat"), None);
        assert_eq!(
            headers.get("host").map(HeaderValue::as_bytes),
            Some(&b"example.com"[..])
        );
        assert_eq!(
            headers.get("accept").map(HeaderValue::as_bytes),
            Some(&b"*/*"[..])
        );

        // Nothing to strip: headers left exactly as they were.
        let before = headers.clone();
        strip_cookie(&mut headers, "berth_chat");
        assert_eq!(headers, before);

        // Only the affinity cookie: the header goes away.
        let mut only = cookie_headers(&["berth_chat=b1.tag", " berth_chat=b2 ; "]);
        strip_cookie(&mut only, "berth_chat");
        assert!(only.get(COOKIE).is_none());
        // A cookie whose name merely contains the target survives.
        let mut similar = cookie_headers(&["xberth_chat=1; berth_chatx=2; berth_chat=3"]);
        strip_cookie(&mut similar, "berth_chat");
        assert_eq!(cookie_lines(&similar), ["xberth_chat=1; berth_chatx=2"]);
    }

    // ---- hash keys ----

    // (Parsing `key = "..."` into a HashKey is config's job, tested there.)

    fn header(name: &'static str) -> HashKey {
        HashKey::Header(http::HeaderName::from_static(name))
    }

    fn cookie(name: &str) -> HashKey {
        HashKey::Cookie(name.into())
    }

    fn query(name: &str) -> HashKey {
        HashKey::Query(name.into())
    }

    fn value_of(key: HashKey, headers: &HeaderMap, uri: &str) -> Option<String> {
        let uri: Uri = uri.parse().expect("valid uri");
        hash_key_value(&key, headers, &uri, "192.0.2.7".parse().expect("ip"), &[])
    }

    #[test]
    fn hash_key_values() {
        let mut headers = cookie_headers(&["session=abc; other=1", "empty="]);
        headers.append("x-user-id", HeaderValue::from_static(" 42 "));
        headers.append("x-multi", HeaderValue::from_static("a"));
        headers.append("x-multi", HeaderValue::from_static("b"));
        headers.append("x-blank", HeaderValue::from_static(""));

        assert_eq!(
            value_of(HashKey::ClientIp, &headers, "/"),
            Some("192.0.2.7".into())
        );
        assert_eq!(
            value_of(header("x-user-id"), &headers, "/"),
            Some("42".into())
        );
        assert_eq!(
            value_of(header("x-multi"), &headers, "/"),
            Some("a, b".into())
        );
        assert_eq!(value_of(header("x-blank"), &headers, "/"), None);
        assert_eq!(value_of(header("x-missing"), &headers, "/"), None);
        assert_eq!(
            value_of(cookie("session"), &headers, "/"),
            Some("abc".into())
        );
        assert_eq!(value_of(cookie("empty"), &headers, "/"), None);
        assert_eq!(value_of(cookie("missing"), &headers, "/"), None);

        let uri = "/ws?x=1&room=lobby%20A&room=second&r%6Fom2=a+b&flag&bad=%zz";
        assert_eq!(
            value_of(query("room"), &headers, uri),
            Some("lobby A".into())
        );
        assert_eq!(value_of(query("room2"), &headers, uri), Some("a b".into()));
        assert_eq!(value_of(query("bad"), &headers, uri), Some("%zz".into()));
        assert_eq!(value_of(query("flag"), &headers, uri), None);
        assert_eq!(value_of(query("missing"), &headers, uri), None);
        assert_eq!(value_of(query("room"), &headers, "/ws"), None);
        assert_eq!(value_of(query("room"), &headers, "http://h/ws?room="), None);
    }

    #[test]
    fn client_ip_walks_forwarded_for() {
        let trusted: Vec<IpNet> = ["10.0.0.0/8", "::1/128"]
            .iter()
            .map(|s| s.parse().expect("cidr"))
            .collect();
        let ip = |s: &str| s.parse::<IpAddr>().expect("ip");
        let xff = |lines: &[&str]| {
            let mut h = HeaderMap::new();
            for line in lines {
                h.append(
                    "x-forwarded-for",
                    HeaderValue::from_str(line).expect("valid"),
                );
            }
            h
        };

        // Untrusted peer: XFF is ignored entirely.
        let spoof = xff(&["1.1.1.1"]);
        assert_eq!(
            client_ip(&spoof, ip("198.51.100.1"), &trusted),
            ip("198.51.100.1")
        );
        // No trusted proxies configured: same.
        assert_eq!(client_ip(&spoof, ip("10.0.0.1"), &[]), ip("10.0.0.1"));
        // Trusted peer: the right-most untrusted entry, skipping trusted hops;
        // the forged left-most entry is never used.
        let chain = xff(&["6.6.6.6, 203.0.113.9", "10.1.1.1 ,10.2.2.2"]);
        assert_eq!(
            client_ip(&chain, ip("10.0.0.1"), &trusted),
            ip("203.0.113.9")
        );
        assert_eq!(
            client_ip(&chain, ip("::ffff:10.0.0.1"), &trusted),
            ip("203.0.113.9")
        );
        // Ports and brackets are tolerated.
        let ported = xff(&["[2001:db8::1]:443, 10.0.0.5:8080"]);
        assert_eq!(client_ip(&ported, ip("::1"), &trusted), ip("2001:db8::1"));
        // Garbage stops the walk at the last trusted hop.
        let garbage = xff(&["203.0.113.9, unknown, 10.3.3.3"]);
        assert_eq!(
            client_ip(&garbage, ip("10.0.0.1"), &trusted),
            ip("10.3.3.3")
        );
        // All trusted, or no header: the last trusted address reached.
        assert_eq!(
            client_ip(&xff(&["10.9.9.9"]), ip("10.0.0.1"), &trusted),
            ip("10.9.9.9")
        );
        assert_eq!(
            client_ip(&HeaderMap::new(), ip("10.0.0.1"), &trusted),
            ip("10.0.0.1")
        );

        let key = HashKey::ClientIp;
        let uri = Uri::from_static("/");
        assert_eq!(
            hash_key_value(&key, &chain, &uri, ip("10.0.0.1"), &trusted).as_deref(),
            Some("203.0.113.9")
        );
    }

    // ---- rendezvous hashing ----

    fn keys(n: usize) -> Vec<String> {
        (0..n).map(|i| format!("user-{i}")).collect()
    }

    fn owners<'a>(keys: &[String], candidates: &[(&'a str, u32)]) -> Vec<&'a str> {
        keys.iter()
            .map(|k| {
                let i = rendezvous_pick(k.as_bytes(), candidates).expect("non-empty");
                candidates[i].0
            })
            .collect()
    }
    const ID_POOL: [&str; 6] = ["b0", "b1", "b2", "b3", "b4", "b5"];

    fn within(actual: f64, ideal: f64, tolerance: f64) -> bool {
        (actual - ideal).abs() <= ideal * tolerance
    }

    #[test]
    fn removing_a_backend_moves_only_its_keys() {
        let keys = keys(10_000);
        let five: Vec<(&str, u32)> = ID_POOL[..5].iter().map(|id| (*id, 1)).collect();
        let before = owners(&keys, &five);
        let four: Vec<(&str, u32)> = five.iter().copied().filter(|(id, _)| *id != "b2").collect();
        let after = owners(&keys, &four);

        let mut moved = 0;
        for (b, a) in before.iter().zip(&after) {
            if *b == "b2" {
                moved += 1;
            } else {
                assert_eq!(b, a, "a key on a surviving backend moved");
            }
        }
        let fraction = f64::from(moved) / keys.len() as f64;
        assert!(within(fraction, 1.0 / 5.0, 0.2), "moved {fraction}");
    }

    #[test]
    fn adding_a_backend_moves_keys_only_to_it() {
        let keys = keys(10_000);
        let five: Vec<(&str, u32)> = ID_POOL[..5].iter().map(|id| (*id, 1)).collect();
        let six: Vec<(&str, u32)> = ID_POOL.iter().map(|id| (*id, 1)).collect();
        let before = owners(&keys, &five);
        let after = owners(&keys, &six);
        let mut moved = 0;
        for (b, a) in before.iter().zip(&after) {
            if b != a {
                assert_eq!(*a, "b5", "a key moved between old backends");
                moved += 1;
            }
        }
        let fraction = f64::from(moved) / keys.len() as f64;
        assert!(within(fraction, 1.0 / 6.0, 0.2), "moved {fraction}");
    }

    #[test]
    fn weights_are_honoured() {
        let keys = keys(10_000);
        let candidates = [("b0", 1), ("b1", 2), ("b2", 3), ("b3", 4)];
        let owners = owners(&keys, &candidates);
        for (id, weight) in candidates {
            let share = owners.iter().filter(|o| **o == id).count() as f64 / keys.len() as f64;
            let ideal = f64::from(weight) / 10.0;
            assert!(
                within(share, ideal, 0.1),
                "{id}: share {share}, ideal {ideal}"
            );
        }
    }

    #[test]
    fn order_and_pick_agree_and_ignore_candidate_order() {
        let candidates = [("b0", 1), ("b1", 3), ("b2", 2), ("b3", 1), ("b4", 5)];
        let mut reversed = candidates;
        reversed.reverse();
        for key in keys(500) {
            let order = rendezvous_order(key.as_bytes(), &candidates);
            let mut sorted = order.clone();
            sorted.sort_unstable();
            assert_eq!(sorted, [0, 1, 2, 3, 4]);
            assert_eq!(rendezvous_pick(key.as_bytes(), &candidates), Some(order[0]));
            let ids: Vec<&str> = order.iter().map(|&i| candidates[i].0).collect();
            let ids_rev: Vec<&str> = rendezvous_order(key.as_bytes(), &reversed)
                .iter()
                .map(|&i| reversed[i].0)
                .collect();
            assert_eq!(ids, ids_rev);
        }
        assert_eq!(rendezvous_order(b"k", &[]), Vec::<usize>::new());
        assert_eq!(rendezvous_pick(b"k", &[]), None);
        assert_eq!(pick_bounded(b"k", &[], &[], Some(1.25)), None);
        // Weight 0 is chosen only when nothing else is eligible.
        let zero = [("b0", 0), ("b1", 1)];
        for key in keys(200) {
            assert_eq!(rendezvous_pick(key.as_bytes(), &zero), Some(1));
        }
        assert_eq!(rendezvous_pick(b"k", &[("b0", 0)]), Some(0));
    }

    #[test]
    fn hash_is_pinned() {
        // If any of these change, every hash-pinned client in every running
        // deployment would be reshuffled on upgrade. Do not update them
        // casually.
        assert_eq!(stable_hash(b"", ""), PINNED_HASH_EMPTY);
        assert_eq!(stable_hash(b"user-42", "a"), PINNED_HASH_USER42_A);
        let ids = [("a", 1), ("b", 1), ("c", 1)];
        let names = |key: &[u8], c: &[(&'static str, u32)]| -> Vec<&'static str> {
            rendezvous_order(key, c).iter().map(|&i| c[i].0).collect()
        };
        assert_eq!(names(b"user-42", &ids), PINNED_ORDER_USER42);
        assert_eq!(names(b"user-7", &ids), PINNED_ORDER_USER7);
        assert_eq!(names(b"203.0.113.9", &ids), PINNED_ORDER_IP);
        let weighted = [("a", 1), ("b", 2), ("c", 7)];
        assert_eq!(names(b"user-42", &weighted), PINNED_ORDER_USER42_WEIGHTED);
    }
    const PINNED_HASH_EMPTY: u64 = 1_998_855_519_756_462_295;
    const PINNED_HASH_USER42_A: u64 = 844_886_505_954_475_769;
    const PINNED_ORDER_USER42: [&str; 3] = ["b", "c", "a"];
    const PINNED_ORDER_USER7: [&str; 3] = ["b", "a", "c"];
    const PINNED_ORDER_IP: [&str; 3] = ["b", "c", "a"];
    const PINNED_ORDER_USER42_WEIGHTED: [&str; 3] = ["c", "b", "a"];

    // ---- bounded loads ----

    #[test]
    fn bounded_load_spills_to_the_keys_own_second_choice() {
        let candidates = [("b0", 1), ("b1", 1), ("b2", 1), ("b3", 1)];
        for key in keys(100) {
            let order = rendezvous_order(key.as_bytes(), &candidates);
            // Nothing running: the first choice.
            assert_eq!(
                pick_bounded(key.as_bytes(), &candidates, &[0; 4], Some(1.25)),
                Some(order[0])
            );
            // First choice overloaded: the key's own second choice.
            let mut live = [1u64; 4];
            live[order[0]] = 10;
            assert_eq!(
                pick_bounded(key.as_bytes(), &candidates, &live, Some(1.25)),
                Some(order[1])
            );
            // Unbounded ignores load.
            assert_eq!(
                pick_bounded(key.as_bytes(), &candidates, &live, None),
                Some(order[0])
            );
        }
    }

    /// Places `connections` connections, 80 % of them on 5 hot keys, and
    /// returns the final live counts; checks the bound after every placement
    /// when `c` is set.
    fn place_skewed(candidates: &[(&str, u32)], connections: usize, c: Option<f64>) -> Vec<u64> {
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        let mut live = vec![0u64; candidates.len()];
        let sum_w: u32 = candidates.iter().map(|(_, w)| w).sum();
        for n in 0..connections {
            let key = if rng.gen_bool(0.8) {
                format!("hot-{}", rng.gen_range(0..5))
            } else {
                format!("cold-{n}")
            };
            let i = pick_bounded(key.as_bytes(), candidates, &live, c).expect("non-empty");
            live[i] += 1;
            if let Some(c) = c {
                let total = (n + 1) as f64;
                for (j, (_, w)) in candidates.iter().enumerate() {
                    let bound = (c * total * f64::from(*w) / f64::from(sum_w)).ceil() as u64;
                    assert!(live[j] <= bound, "after {} connections: {live:?}", n + 1);
                }
            }
        }
        live
    }

    #[test]
    fn bounded_load_caps_hot_keys() {
        let candidates: Vec<(&str, u32)> =
            ["b0", "b1", "b2", "b3", "b4", "b5", "b6", "b7", "b8", "b9"]
                .iter()
                .map(|id| (*id, 1))
                .collect();
        let c = 1.25;
        let connections = 2_000;
        let avg = connections as f64 / candidates.len() as f64;
        let bound = (c * avg).ceil() as u64;

        let bounded = place_skewed(&candidates, connections, Some(c));
        let max = bounded.iter().copied().max().unwrap_or(0);
        assert_eq!(bounded.iter().sum::<u64>(), connections as u64);
        assert!(max <= bound, "max {max} > {bound}: {bounded:?}");
        assert!(max as f64 / avg <= c, "{bounded:?}");

        let unbounded = place_skewed(&candidates, connections, None);
        let max = unbounded.iter().copied().max().unwrap_or(0);
        assert!(
            max > bound,
            "the skew should overload a backend without the bound: {unbounded:?}"
        );
    }

    #[test]
    fn bounded_load_respects_weights() {
        let candidates = [("b0", 1), ("b1", 1), ("b2", 2), ("b3", 4)];
        let live = place_skewed(&candidates, 2_000, Some(1.25));
        assert_eq!(live.iter().sum::<u64>(), 2_000);
    }

    #[test]
    fn a_key_hash_ranks_as_the_key_does() {
        let candidates = [("b0", 1), ("b1", 3), ("b2", 2), ("b3", 7)];
        // Every weight times 1000 (how slow start passes effective weights):
        // the same winner for every key.
        let milli: Vec<(&str, u32)> = candidates.iter().map(|(id, w)| (*id, w * 1000)).collect();
        for i in 0..2_000 {
            let key = format!("user-{i}");
            let expected = rendezvous_pick(key.as_bytes(), &candidates);
            assert_eq!(
                rendezvous_pick_by_hash(key_hash(key.as_bytes()), &candidates),
                expected,
                "{key}"
            );
            assert_eq!(rendezvous_pick(key.as_bytes(), &milli), expected, "{key}");
        }
        assert_eq!(rendezvous_pick_by_hash(key_hash(b"k"), &[]), None);
    }

    #[test]
    fn a_smaller_effective_weight_only_moves_keys_away_and_back() {
        // A joining backend at a fraction of its weight wins a subset of the
        // keys it wins at full weight, growing with the fraction: a key that
        // moved to it never moves back while it ramps up.
        let full = [("a", 1000), ("b", 1000), ("c", 1000)];
        let mut won_before = 0;
        let mut previous: Vec<bool> = vec![false; 3_000];
        for step in 1..=10u32 {
            let ramp = [("a", 1000), ("b", 1000), ("c", 100 * step)];
            let mut won = 0;
            for (i, prev) in previous.iter_mut().enumerate() {
                let key = format!("k{i}");
                let on_c = rendezvous_pick(key.as_bytes(), &ramp) == Some(2);
                assert!(!*prev || on_c, "{key} left c at step {step}");
                if on_c {
                    // A key c wins while ramping is one it wins at full weight.
                    assert_eq!(rendezvous_pick(key.as_bytes(), &full), Some(2), "{key}");
                    won += 1;
                }
                *prev = on_c;
            }
            assert!(won >= won_before, "step {step}: {won} < {won_before}");
            won_before = won;
        }
        // At full weight it holds about a third.
        assert!((900..1_100).contains(&won_before), "{won_before}");
    }
}
