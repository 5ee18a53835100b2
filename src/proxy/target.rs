//! The request's host and target as berth routes on them, and as the
//! backend receives them: one normalized form for both, so that routing and
//! the backend cannot disagree about which resource a request names.
//!
//! - Host (RFC 9112 §3.2): exactly one `Host` header; an HTTP/1.1 request
//!   without one is refused; an absolute-form target (`GET http://a/b`)
//!   brings its own authority, which replaces `Host` (§3.2.2). The host is
//!   routed on in lower case, without its port and without a trailing dot;
//!   the backend gets it as sent, less the trailing dot.
//! - Path (RFC 3986 §6.2.2): percent-encoded unreserved characters are
//!   decoded (`%6c` is `l`, `%2e` is `.`), other percent-encodings get
//!   upper-case hex digits, and dot segments are removed (§5.2.4), so
//!   `/log/../t9` is `/t9` and `/%6cog/x` is `/log/x`. A malformed
//!   percent-encoding is refused. The query is left as sent.
//!
//! Pure functions, no I/O; it starts no tasks.

use std::borrow::Cow;

use http::header::HOST;
use http::request::Parts;
use http::uri::Authority;
use http::{HeaderValue, Version};

use super::headers::host_without_port;

/// Why a request's host or target cannot be routed (answered with `400`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{}", self.as_str())]
pub enum TargetError {
    DuplicateHost,
    MissingHost,
    BadHost,
    BadPath,
}

impl TargetError {
    /// What the client is told.
    pub fn as_str(self) -> &'static str {
        match self {
            TargetError::DuplicateHost => "bad request: more than one Host header",
            TargetError::MissingHost => "bad request: HTTP/1.1 request without a Host header",
            TargetError::BadHost => "bad request: invalid Host header",
            TargetError::BadPath => "bad request: malformed percent-encoding in the request path",
        }
    }
}

/// A request's host and target, normalized.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Target {
    /// What routes match: lower case, no port, no trailing dot. `None`
    /// when the request names no host (HTTP/1.0 without `Host`, or an
    /// empty `Host`).
    pub route_host: Option<String>,
    /// The `Host` the backend gets (and `X-Forwarded-Host`): the client's,
    /// less a trailing dot, or the absolute-form target's authority.
    pub host: Option<HeaderValue>,
    /// The normalized path, routed on.
    pub path: String,
    /// The normalized path and the query as sent: the backend's target.
    pub path_and_query: String,
}

/// Reads and normalizes the host and target of a request.
pub fn resolve(parts: &Parts) -> Result<Target, TargetError> {
    let mut hosts = parts.headers.get_all(HOST).iter();
    let header = hosts.next();
    if hosts.next().is_some() {
        return Err(TargetError::DuplicateHost);
    }
    let (route_host, host) = match (parts.uri.authority(), header) {
        // Absolute form: the target's own authority, whatever Host says.
        (Some(authority), _) => split_host(authority)?,
        (None, Some(value)) if !value.is_empty() => {
            let authority =
                Authority::try_from(value.as_bytes()).map_err(|_| TargetError::BadHost)?;
            let (route_host, host) = split_host(&authority)?;
            // Unchanged, the client's own value is forwarded (its case kept).
            let host = match host {
                Some(h) if h.as_bytes() == authority.as_str().as_bytes() => Some(value.clone()),
                other => other,
            };
            (route_host, host)
        }
        // RFC 9112 §3.2: an empty Host is allowed, and names no host.
        (None, Some(_)) => (None, None),
        (None, None) if parts.version == Version::HTTP_11 => return Err(TargetError::MissingHost),
        (None, None) => (None, None),
    };
    let path = normalize_path(parts.uri.path())?;
    let path_and_query = match &path {
        // Already normal: the target goes on exactly as sent (an
        // absolute-form target without a path stays without one, and is
        // refused when the backend's request is built).
        Cow::Borrowed(_) => parts
            .uri
            .path_and_query()
            .map_or("/", |pq| pq.as_str())
            .to_string(),
        Cow::Owned(normal) => match parts.uri.query() {
            Some(query) => format!("{normal}?{query}"),
            None => normal.clone(),
        },
    };
    Ok(Target {
        route_host,
        host,
        path: path.into_owned(),
        path_and_query,
    })
}

/// The routing host and the forwarded `Host` of an authority.
fn split_host(authority: &Authority) -> Result<(Option<String>, Option<HeaderValue>), TargetError> {
    let raw = authority.as_str();
    let host = authority.host();
    // No credentials in a Host (so it starts with the host), and a port is
    // a number from 0 to 65535.
    let port_ok = raw.strip_prefix(host).is_some_and(|rest| {
        rest.is_empty()
            || rest.strip_prefix(':').is_some_and(|p| {
                !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()) && p.parse::<u16>().is_ok()
            })
    });
    if raw.contains('@') || !port_ok {
        return Err(TargetError::BadHost);
    }
    let bare = host.strip_suffix('.').unwrap_or(host);
    if bare.is_empty() || bare.ends_with('.') {
        return Err(TargetError::BadHost);
    }
    let route_host = host_without_port(bare);
    let forwarded = match authority.port() {
        Some(port) => format!("{bare}:{port}"),
        None => bare.to_string(),
    };
    let forwarded = HeaderValue::from_str(&forwarded).map_err(|_| TargetError::BadHost)?;
    Ok((Some(route_host), Some(forwarded)))
}

/// RFC 3986 §2.3.
fn is_unreserved(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~')
}

fn hex(b: u8) -> Option<u8> {
    char::from(b)
        .to_digit(16)
        .and_then(|d| u8::try_from(d).ok())
}

/// The path with unreserved characters decoded, percent-encodings in upper
/// case and dot segments removed. A path that is not `/`-rooted (`*`) is
/// left alone (no route matches it).
pub fn normalize_path(path: &str) -> Result<Cow<'_, str>, TargetError> {
    if !path.starts_with('/') {
        return Ok(Cow::Borrowed(path));
    }
    let dotted = || path.split('/').any(|s| s == "." || s == "..");
    if !path.contains('%') && !dotted() {
        return Ok(Cow::Borrowed(path));
    }
    let bytes = path.as_bytes();
    let mut decoded = String::with_capacity(path.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] != b'%' {
            // Everything up to the next `%` is kept as sent, UTF-8 included
            // (the request line may carry it). `%` is ASCII, so the run ends
            // on a character boundary.
            let end = bytes[i..]
                .iter()
                .position(|&b| b == b'%')
                .map_or(bytes.len(), |p| i + p);
            decoded.push_str(&path[i..end]);
            i = end;
            continue;
        }
        let (Some(hi), Some(lo)) = (
            bytes.get(i + 1).copied().and_then(hex),
            bytes.get(i + 2).copied().and_then(hex),
        ) else {
            return Err(TargetError::BadPath);
        };
        let value = hi * 16 + lo;
        if is_unreserved(value) {
            decoded.push(char::from(value));
        } else {
            decoded.push('%');
            decoded.push(char::from(bytes[i + 1].to_ascii_uppercase()));
            decoded.push(char::from(bytes[i + 2].to_ascii_uppercase()));
        }
        i += 3;
    }
    Ok(Cow::Owned(remove_dot_segments(&decoded)))
}

/// RFC 3986 §5.2.4 on a `/`-rooted path: `.` segments go, `..` removes the
/// segment before it (never above the root), and a path that ended in a
/// dot segment keeps its trailing `/`.
fn remove_dot_segments(path: &str) -> String {
    let mut out: Vec<&str> = Vec::new();
    let mut segments = path[1..].split('/').peekable();
    while let Some(segment) = segments.next() {
        let last = segments.peek().is_none();
        match segment {
            "." => {}
            ".." => {
                out.pop();
            }
            s => {
                out.push(s);
                continue;
            }
        }
        if last {
            out.push("");
        }
    }
    let mut normalized = String::with_capacity(path.len());
    for segment in out {
        normalized.push('/');
        normalized.push_str(segment);
    }
    if normalized.is_empty() {
        normalized.push('/');
    }
    normalized
}

#[cfg(test)]
mod tests {
    use http::Request;

    use super::*;

    #[test]
    fn paths_are_normalized_per_rfc_3986() {
        let cases = [
            ("/", "/"),
            ("/chat/room", "/chat/room"),
            ("/log/../t9", "/t9"),
            ("/%6cog/x", "/log/x"),
            ("/%6Cog/x", "/log/x"),
            ("/log/%2e%2e/t9", "/t9"),
            ("/log/%2E%2E/t9", "/t9"),
            ("/a/./b/../../c", "/c"),
            ("/../../etc", "/etc"),
            ("/a/..", "/"),
            ("/a/.", "/a/"),
            ("/a/./", "/a/"),
            ("/a/b/..", "/a/"),
            ("/.", "/"),
            ("/..", "/"),
            ("/a//../b", "/a/b"),
            ("/a/.b/..c/", "/a/.b/..c/"),
            ("/%7euser/%41", "/~user/A"),
            ("/a%2fb", "/a%2Fb"),
            ("/a%2Fb/../c", "/c"),
            ("/caf%c3%a9", "/caf%C3%A9"),
            ("/a%20b", "/a%20b"),
            ("*", "*"),
            // Found by the `target` fuzz target: bytes that are not ASCII
            // stay as sent (they were re-encoded one byte per character, so
            // `/café/./x` went to the backend as `/cafÃ©/x`).
            ("/caf\u{e9}/./x", "/caf\u{e9}/x"),
            ("///n/./\u{771}.", "///n/\u{771}."),
            ("/%41\u{1F980}/%7e", "/A\u{1F980}/~"),
        ];
        for (raw, want) in cases {
            assert_eq!(normalize_path(raw).as_deref(), Ok(want), "{raw}");
        }
        // Nothing to do: no copy.
        assert!(matches!(
            normalize_path("/chat/room.v2"),
            Ok(Cow::Borrowed(_))
        ));
        for raw in ["/%", "/%4", "/%zz", "/a%g1", "/%%41"] {
            assert_eq!(normalize_path(raw), Err(TargetError::BadPath), "{raw}");
        }
    }

    fn parts(target: &str, version: Version, hosts: &[&str]) -> Parts {
        let mut b = Request::builder().uri(target).version(version);
        for h in hosts {
            b = b.header(HOST, *h);
        }
        b.body(()).unwrap().into_parts().0
    }

    fn resolved(target: &str, hosts: &[&str]) -> Result<Target, TargetError> {
        resolve(&parts(target, Version::HTTP_11, hosts))
    }

    fn host(t: &Target) -> (Option<&str>, Option<&str>) {
        (
            t.route_host.as_deref(),
            t.host.as_ref().map(|h| h.to_str().unwrap()),
        )
    }

    #[test]
    fn hosts_are_routed_without_case_port_or_trailing_dot() {
        let cases = [
            ("chat.example.com", "chat.example.com", "chat.example.com"),
            (
                "Chat.Example.COM:8443",
                "chat.example.com",
                "Chat.Example.COM:8443",
            ),
            ("chat.example.com.", "chat.example.com", "chat.example.com"),
            (
                "Chat.Example.com.:8443",
                "chat.example.com",
                "Chat.Example.com:8443",
            ),
            ("[::1]:8080", "[::1]", "[::1]:8080"),
            ("127.0.0.1", "127.0.0.1", "127.0.0.1"),
        ];
        for (sent, route, forwarded) in cases {
            let t = resolved("/x", &[sent]).unwrap();
            assert_eq!(host(&t), (Some(route), Some(forwarded)), "{sent}");
        }
        for bad in ["a b", "user@host", "host:port", ".", "a..", "x:99999"] {
            assert_eq!(resolved("/", &[bad]), Err(TargetError::BadHost), "{bad}");
        }
    }

    #[test]
    fn host_header_rules_of_rfc_9112() {
        assert_eq!(
            resolved("/", &["a.example", "b.example"]),
            Err(TargetError::DuplicateHost)
        );
        assert_eq!(
            resolved("/", &["a.example", "a.example"]),
            Err(TargetError::DuplicateHost)
        );
        assert_eq!(resolved("/", &[]), Err(TargetError::MissingHost));
        // HTTP/1.0 may go without; an empty Host names no host.
        let t = resolve(&parts("/x", Version::HTTP_10, &[])).unwrap();
        assert_eq!(host(&t), (None, None));
        let t = resolved("/x", &[""]).unwrap();
        assert_eq!(host(&t), (None, None));
        // An absolute-form target's authority replaces Host.
        let t = resolved(
            "http://Chat.Example.com.:8080/a/../ws?room=1",
            &["other.example"],
        )
        .unwrap();
        assert_eq!(
            host(&t),
            (Some("chat.example.com"), Some("Chat.Example.com:8080"))
        );
        assert_eq!(t.path, "/ws");
        assert_eq!(t.path_and_query, "/ws?room=1");
        let t = resolved("http://chat.example.com", &[]).unwrap();
        assert_eq!(t.path_and_query, "/");
        // No path but a query: left as sent (no valid origin-form target).
        let t = resolved("http://chat.example.com?x=1", &[]).unwrap();
        assert_eq!(t.path_and_query, "?x=1");
        assert_eq!(
            resolved("http://user:pw@chat.example.com/", &[]),
            Err(TargetError::BadHost)
        );
    }

    #[test]
    fn the_query_is_kept_as_sent() {
        let t = resolved("/a/%2e%2e/b?x=%2e%2e/&y=%6c", &["h"]).unwrap();
        assert_eq!(t.path, "/b");
        assert_eq!(t.path_and_query, "/b?x=%2e%2e/&y=%6c");
        assert_eq!(resolved("/%zz?x=1", &["h"]), Err(TargetError::BadPath));
    }

    #[test]
    fn a_utf8_request_target_is_routed_and_forwarded_as_sent() {
        // hyper accepts UTF-8 in the request line's path.
        let t = resolved("/caf\u{e9}/./menu?q=\u{e9}", &["h"]).unwrap();
        assert_eq!(t.path, "/caf\u{e9}/menu");
        assert_eq!(t.path_and_query, "/caf\u{e9}/menu?q=\u{e9}");
    }
}
