//! The PROXY protocol (HAProxy's, versions 1 and 2): the header an L4
//! balancer puts in front of a connection to name the client it came from,
//! read on listeners with `proxy_protocol`, and the v2 header berth writes
//! to backends of a pool with `send_proxy_protocol`.
//!
//! Parsing is the `ppp` crate's; [`parse`] is the pure part (bytes in, a
//! verdict out; fuzzed in `fuzz/`), [`read`] feeds it from a connection.
//! The reader takes what the socket has, at most [`FIRST_READ`] bytes at a
//! time and never more than the header needs once its length is known (v2
//! says it in its first 16 bytes), so a connection that stops halfway
//! through its header holds a buffer of a hundred-odd bytes, not more; the
//! bytes read past the header (the start of a TLS ClientHello or of a
//! request head) are handed back to be read first. The caller sets the
//! time limit. Nothing here starts a task.

use std::net::SocketAddr;

use ppp::v1;
use ppp::v2;
use tokio::io::{AsyncRead, AsyncReadExt};

/// Which header versions a listener accepts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Accept {
    V1,
    V2,
    Any,
}

/// The longest v1 header (the spec's 107 bytes, CRLF included).
const V1_MAX: usize = 107;
/// The first read: room for any v1 header, or a v2 header without TLVs.
pub const FIRST_READ: usize = V1_MAX + 1;
/// The largest v2 header berth accepts: the 16-byte preamble plus 1 KiB of
/// addresses and TLVs (an AWS NLB, Azure or GCP header carries a few tens
/// of bytes of TLVs).
pub const V2_MAX: usize = 16 + 1024;
/// v2's signature, the first 12 bytes of every v2 header.
const V2_SIGNATURE: &[u8; 12] = b"\r\n\r\n\0\r\nQUIT\n";
const V1_PREFIX: &[u8; 6] = b"PROXY ";

/// The addresses a header gave: the client (`source`) and the address it
/// connected to (`destination`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Addresses {
    pub source: SocketAddr,
    pub destination: SocketAddr,
}

/// What the bytes so far are.
#[derive(Debug, PartialEq, Eq)]
pub enum Parsed {
    /// A header could still follow; `need` is the total length when it is
    /// known (a v2 header's preamble has arrived).
    Incomplete { need: Option<usize> },
    /// A complete header of `len` bytes. `addresses` is `None` for a v2
    /// `LOCAL` command (a balancer's own health check), a v1 `UNKNOWN`, or
    /// an address family other than TCP over IPv4 or IPv6: the connection's
    /// own addresses stand.
    Header {
        len: usize,
        addresses: Option<Addresses>,
    },
    /// Not a header this listener accepts.
    Invalid(&'static str),
}

/// Looks at the first bytes of a connection.
pub fn parse(buf: &[u8], accept: Accept) -> Parsed {
    let v2_ok = accept != Accept::V1;
    let v1_ok = accept != Accept::V2;
    let prefix_of = |sig: &[u8]| {
        let n = buf.len().min(sig.len());
        buf[..n] == sig[..n]
    };
    if buf.is_empty() {
        return Parsed::Incomplete { need: None };
    }
    if prefix_of(V2_SIGNATURE) {
        if !v2_ok {
            return Parsed::Invalid("a PROXY v2 header on a listener that accepts v1 only");
        }
        return parse_v2(buf);
    }
    if prefix_of(V1_PREFIX) {
        if !v1_ok {
            return Parsed::Invalid("a PROXY v1 header on a listener that accepts v2 only");
        }
        return parse_v1(buf);
    }
    Parsed::Invalid("no PROXY protocol header")
}

fn parse_v2(buf: &[u8]) -> Parsed {
    match v2::Header::try_from(buf) {
        Ok(header) => {
            let len = header.len();
            if len > V2_MAX {
                return Parsed::Invalid("PROXY v2 header too long");
            }
            let addresses = match (header.command, header.addresses) {
                (v2::Command::Local, _) => None,
                (v2::Command::Proxy, v2::Addresses::IPv4(a)) => Some(Addresses {
                    source: SocketAddr::from((a.source_address, a.source_port)),
                    destination: SocketAddr::from((a.destination_address, a.destination_port)),
                }),
                (v2::Command::Proxy, v2::Addresses::IPv6(a)) => Some(Addresses {
                    source: canonical(SocketAddr::from((a.source_address, a.source_port))),
                    destination: canonical(SocketAddr::from((
                        a.destination_address,
                        a.destination_port,
                    ))),
                }),
                (v2::Command::Proxy, _) => None,
            };
            Parsed::Header { len, addresses }
        }
        Err(v2::ParseError::Partial(_, length)) => {
            let need = 16 + length;
            if need > V2_MAX {
                Parsed::Invalid("PROXY v2 header too long")
            } else {
                Parsed::Incomplete { need: Some(need) }
            }
        }
        Err(v2::ParseError::Incomplete(_)) => Parsed::Incomplete { need: None },
        Err(_) => Parsed::Invalid("malformed PROXY v2 header"),
    }
}

fn parse_v1(buf: &[u8]) -> Parsed {
    match v1::Header::try_from(buf) {
        Ok(header) => {
            let addresses = match header.addresses {
                v1::Addresses::Unknown => None,
                v1::Addresses::Tcp4(a) => Some(Addresses {
                    source: SocketAddr::from((a.source_address, a.source_port)),
                    destination: SocketAddr::from((a.destination_address, a.destination_port)),
                }),
                v1::Addresses::Tcp6(a) => Some(Addresses {
                    source: canonical(SocketAddr::from((a.source_address, a.source_port))),
                    destination: canonical(SocketAddr::from((
                        a.destination_address,
                        a.destination_port,
                    ))),
                }),
            };
            Parsed::Header {
                len: header.header.len(),
                addresses,
            }
        }
        Err(e) if ppp::PartialResult::is_incomplete(&e) && buf.len() < V1_MAX => {
            Parsed::Incomplete { need: None }
        }
        Err(_) => Parsed::Invalid("malformed PROXY v1 header"),
    }
}

/// An IPv4-mapped IPv6 address as the IPv4 address it stands for.
fn canonical(addr: SocketAddr) -> SocketAddr {
    SocketAddr::new(addr.ip().to_canonical(), addr.port())
}

/// Why a connection's header was refused.
#[derive(Debug, thiserror::Error)]
pub enum ProxyHeaderError {
    #[error("{0}")]
    Invalid(&'static str),
    #[error("the connection closed before its PROXY header was complete")]
    Closed,
    #[error(transparent)]
    Io(#[from] std::io::Error),
}

/// A header read off a connection, and the bytes read past it.
#[derive(Debug)]
pub struct Received {
    pub addresses: Option<Addresses>,
    /// The first bytes after the header (empty, and unallocated, when the
    /// header came alone).
    pub rest: Vec<u8>,
}

/// Reads the PROXY header that starts `io`. The caller bounds the time.
pub async fn read<R: AsyncRead + Unpin>(
    io: &mut R,
    accept: Accept,
) -> Result<Received, ProxyHeaderError> {
    let mut buf: Vec<u8> = Vec::with_capacity(FIRST_READ);
    loop {
        if io.read_buf(&mut buf).await? == 0 {
            return Err(ProxyHeaderError::Closed);
        }
        match parse(&buf, accept) {
            Parsed::Header { len, addresses } => {
                let rest = if buf.len() > len {
                    buf.split_off(len)
                } else {
                    Vec::new()
                };
                return Ok(Received { addresses, rest });
            }
            Parsed::Invalid(why) => return Err(ProxyHeaderError::Invalid(why)),
            Parsed::Incomplete { need } => {
                // Room for the rest of a v2 header whose length is known,
                // and never more than a header needs.
                let want = need.unwrap_or(FIRST_READ).max(buf.len() + 1);
                if want > buf.capacity() {
                    buf.reserve_exact(want - buf.len());
                }
                if buf.len() >= V2_MAX {
                    return Err(ProxyHeaderError::Invalid("PROXY header too long"));
                }
            }
        }
    }
}

/// The PROXY v2 header berth sends a backend: `PROXY` with the client's
/// address and the one it connected to, or `LOCAL` (berth's own
/// connection: a health check) without them. Addresses of different
/// families (an IPv4 client on an IPv6 listener) are both written as IPv6.
pub fn v2_header(addresses: Option<Addresses>) -> Vec<u8> {
    let local = || {
        // The 16-byte preamble alone: version 2, LOCAL, AF_UNSPEC.
        let mut h = V2_SIGNATURE.to_vec();
        h.extend_from_slice(&[0x20, 0x00, 0x00, 0x00]);
        h
    };
    let Some(a) = addresses else {
        return local();
    };
    let (src, dst) = match (a.source, a.destination) {
        (s @ SocketAddr::V4(_), d @ SocketAddr::V4(_))
        | (s @ SocketAddr::V6(_), d @ SocketAddr::V6(_)) => (s, d),
        (s, d) => (as_v6(s), as_v6(d)),
    };
    v2::Builder::with_addresses(
        v2::Version::Two | v2::Command::Proxy,
        v2::Protocol::Stream,
        (src, dst),
    )
    .build()
    .unwrap_or_else(|_| local())
}

fn as_v6(addr: SocketAddr) -> SocketAddr {
    match addr {
        SocketAddr::V4(v4) => SocketAddr::new(v4.ip().to_ipv6_mapped().into(), v4.port()),
        v6 => v6,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addrs(src: &str, dst: &str) -> Addresses {
        Addresses {
            source: src.parse().unwrap(),
            destination: dst.parse().unwrap(),
        }
    }

    #[test]
    fn table_of_headers() {
        let v4 = addrs("203.0.113.7:51000", "10.0.0.1:443");
        let v6 = addrs("[2001:db8::7]:51000", "[2001:db8::1]:443");
        let v2_v4 = v2_header(Some(v4));
        let v2_local = v2_header(None);
        let cases: Vec<(&str, Vec<u8>, Accept, Parsed)> = vec![
            (
                "v1 tcp4",
                b"PROXY TCP4 203.0.113.7 10.0.0.1 51000 443\r\nGET".to_vec(),
                Accept::V1,
                Parsed::Header {
                    len: 43,
                    addresses: Some(v4),
                },
            ),
            (
                "v1 tcp6 on any",
                b"PROXY TCP6 2001:db8::7 2001:db8::1 51000 443\r\n".to_vec(),
                Accept::Any,
                Parsed::Header {
                    len: 46,
                    addresses: Some(v6),
                },
            ),
            (
                "v1 unknown",
                b"PROXY UNKNOWN\r\n".to_vec(),
                Accept::V1,
                Parsed::Header {
                    len: 15,
                    addresses: None,
                },
            ),
            (
                "v1 half",
                b"PROXY TCP4 203.0".to_vec(),
                Accept::V1,
                Parsed::Incomplete { need: None },
            ),
            (
                "v1 on a v2 listener",
                b"PROXY UNKNOWN\r\n".to_vec(),
                Accept::V2,
                Parsed::Invalid("a PROXY v1 header on a listener that accepts v2 only"),
            ),
            (
                "v1 garbage",
                b"PROXY TCP4 not-an-ip 10.0.0.1 1 2\r\n".to_vec(),
                Accept::V1,
                Parsed::Invalid("malformed PROXY v1 header"),
            ),
            (
                "v2 tcp4",
                v2_v4.clone(),
                Accept::V2,
                Parsed::Header {
                    len: 28,
                    addresses: Some(v4),
                },
            ),
            (
                "v2 local",
                v2_local.clone(),
                Accept::Any,
                Parsed::Header {
                    len: 16,
                    addresses: None,
                },
            ),
            (
                "v2 preamble only",
                v2_v4[..16].to_vec(),
                Accept::V2,
                Parsed::Incomplete { need: Some(28) },
            ),
            (
                "v2 signature half",
                v2_v4[..5].to_vec(),
                Accept::V2,
                Parsed::Incomplete { need: None },
            ),
            (
                "v2 on a v1 listener",
                v2_v4.clone(),
                Accept::V1,
                Parsed::Invalid("a PROXY v2 header on a listener that accepts v1 only"),
            ),
            (
                "no header: a TLS ClientHello",
                vec![0x16, 0x03, 0x01, 0x00, 0x50],
                Accept::Any,
                Parsed::Invalid("no PROXY protocol header"),
            ),
            (
                "no header: a request",
                b"GET / HTTP/1.1\r\n".to_vec(),
                Accept::Any,
                Parsed::Invalid("no PROXY protocol header"),
            ),
        ];
        for (name, bytes, accept, want) in cases {
            assert_eq!(parse(&bytes, accept), want, "{name}");
        }
    }

    #[test]
    fn a_v2_header_longer_than_the_cap_is_refused_on_its_preamble() {
        let mut h = v2_header(None);
        let len = u16::try_from(V2_MAX).unwrap();
        h[14..16].copy_from_slice(&len.to_be_bytes());
        h[12] = 0x21;
        assert_eq!(
            parse(&h, Accept::V2),
            Parsed::Invalid("PROXY v2 header too long")
        );
    }

    #[test]
    fn mixed_families_are_written_as_ipv6() {
        let h = v2_header(Some(addrs("203.0.113.7:51000", "[2001:db8::1]:443")));
        let Parsed::Header { addresses, .. } = parse(&h, Accept::V2) else {
            panic!("not a header");
        };
        // IPv4-mapped addresses read back as IPv4.
        assert_eq!(
            addresses.unwrap().source,
            "203.0.113.7:51000".parse::<SocketAddr>().unwrap()
        );
    }

    #[tokio::test]
    async fn read_returns_the_bytes_after_the_header() {
        let (mut client, mut server) = tokio::io::duplex(1024);
        let header = v2_header(Some(addrs("203.0.113.7:51000", "10.0.0.1:443")));
        tokio::io::AsyncWriteExt::write_all(&mut client, &header[..10])
            .await
            .unwrap();
        let reader = tokio::spawn(async move { read(&mut server, Accept::Any).await });
        tokio::task::yield_now().await;
        let mut rest = header[10..].to_vec();
        rest.extend_from_slice(b"GET / HTTP/1.1\r\n");
        tokio::io::AsyncWriteExt::write_all(&mut client, &rest)
            .await
            .unwrap();
        let got = reader.await.unwrap().unwrap();
        assert_eq!(got.addresses.unwrap().source.port(), 51000);
        assert_eq!(got.rest, b"GET / HTTP/1.1\r\n");
    }

    #[tokio::test]
    async fn read_refuses_a_closed_or_headerless_connection() {
        let (client, mut server) = tokio::io::duplex(64);
        drop(client);
        assert!(matches!(
            read(&mut server, Accept::Any).await,
            Err(ProxyHeaderError::Closed)
        ));
        let (mut client, mut server) = tokio::io::duplex(64);
        tokio::io::AsyncWriteExt::write_all(&mut client, b"GET / HTTP/1.1\r\n")
            .await
            .unwrap();
        assert!(matches!(
            read(&mut server, Accept::Any).await,
            Err(ProxyHeaderError::Invalid(_))
        ));
    }
}
