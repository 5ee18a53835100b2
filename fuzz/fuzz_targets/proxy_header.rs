//! The PROXY protocol header parser (`io::proxy_header::parse`, on the `ppp`
//! crate) on arbitrary bytes, under each `proxy_protocol` setting: no panic,
//! and the verdicts hang together:
//! - a complete header's length is within the bytes given and within the
//!   caps (107 bytes for v1, `V2_MAX` for v2), and the header alone (the
//!   bytes after it cut off) parses to the same verdict;
//! - a known total length of an incomplete v2 header lies beyond the bytes
//!   given and within `V2_MAX`;
//! - a listener that takes only v1 or only v2 never accepts a header that
//!   the other setting accepts as the other version;
//! - the header berth writes to backends (`v2_header`) for the addresses
//!   found parses back to the same addresses.
#![no_main]

use arbitrary::Arbitrary;
use berth::io::proxy_header::{parse, v2_header, Accept, Parsed, V2_MAX};
use libfuzzer_sys::fuzz_target;

#[derive(Arbitrary, Debug)]
struct Input {
    accept: u8,
    bytes: Vec<u8>,
}

fuzz_target!(|input: Input| {
    let accept = match input.accept % 3 {
        0 => Accept::V1,
        1 => Accept::V2,
        _ => Accept::Any,
    };
    let buf = &input.bytes;
    match parse(buf, accept) {
        Parsed::Header { len, addresses } => {
            assert!(len <= buf.len() && len <= V2_MAX, "len {len} of {}", buf.len());
            assert_eq!(
                parse(&buf[..len], accept),
                Parsed::Header { len, addresses },
                "the header alone"
            );
            let is_v2 = buf.starts_with(b"\r\n\r\n\0\r\nQUIT\n");
            assert!(accept != if is_v2 { Accept::V1 } else { Accept::V2 });
            if let Some(a) = addresses {
                let written = v2_header(Some(a));
                match parse(&written, Accept::V2) {
                    Parsed::Header {
                        len,
                        addresses: Some(back),
                    } => {
                        assert_eq!(len, written.len());
                        assert_eq!(back, a);
                    }
                    other => panic!("berth's own header for {a:?} reads as {other:?}"),
                }
            }
        }
        Parsed::Incomplete { need: Some(need) } => {
            assert!(need > buf.len() && need <= V2_MAX, "need {need} of {}", buf.len());
        }
        Parsed::Incomplete { need: None } | Parsed::Invalid(_) => {}
    }
});
