//! Raw WebSocket framing (RFC 6455) and the HTTP/1.1 upgrade, written by hand
//! so that the load generator and the echo backend spend as little CPU as
//! possible per message: frames are parsed in place, payloads are masked and
//! unmasked eight bytes at a time, and many frames share one write.

use base64::Engine as _;
use sha1::{Digest, Sha1};

pub const OP_BINARY: u8 = 0x2;
pub const OP_CLOSE: u8 = 0x8;
pub const OP_PING: u8 = 0x9;
pub const OP_PONG: u8 = 0xA;

/// The largest payload either side accepts (the benchmarks use at most 64 KiB).
pub const MAX_PAYLOAD: usize = 64 << 20;

const GUID: &str = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11";

/// A parsed frame header.
#[derive(Debug, Clone, Copy)]
pub struct Header {
    /// The first byte: FIN, RSV1-3 and the opcode, as on the wire.
    pub b0: u8,
    pub mask: Option<[u8; 4]>,
    pub header_len: usize,
    pub payload_len: usize,
}

impl Header {
    pub fn fin(&self) -> bool {
        self.b0 & 0x80 != 0
    }
    pub fn opcode(&self) -> u8 {
        self.b0 & 0x0F
    }
    /// Header plus payload.
    pub fn total_len(&self) -> usize {
        self.header_len + self.payload_len
    }
}

/// Parses the frame header at the start of `buf`. `Ok(None)` means more bytes
/// are needed.
pub fn parse_header(buf: &[u8]) -> Result<Option<Header>, &'static str> {
    if buf.len() < 2 {
        return Ok(None);
    }
    let b0 = buf[0];
    let masked = buf[1] & 0x80 != 0;
    let (len, mut pos) = match buf[1] & 0x7F {
        126 => {
            if buf.len() < 4 {
                return Ok(None);
            }
            (u16::from_be_bytes([buf[2], buf[3]]) as u64, 4)
        }
        127 => {
            if buf.len() < 10 {
                return Ok(None);
            }
            let mut b = [0u8; 8];
            b.copy_from_slice(&buf[2..10]);
            (u64::from_be_bytes(b), 10)
        }
        n => (n as u64, 2),
    };
    if len > MAX_PAYLOAD as u64 {
        return Err("frame payload too large");
    }
    let mask = if masked {
        if buf.len() < pos + 4 {
            return Ok(None);
        }
        let m = [buf[pos], buf[pos + 1], buf[pos + 2], buf[pos + 3]];
        pos += 4;
        Some(m)
    } else {
        None
    };
    Ok(Some(Header {
        b0,
        mask,
        header_len: pos,
        payload_len: len as usize,
    }))
}

/// Appends a frame header (FIN/opcode byte `b0`, the length, and the masking
/// key when `mask` is given).
pub fn push_header(out: &mut Vec<u8>, b0: u8, payload_len: usize, mask: Option<[u8; 4]>) {
    let mbit = if mask.is_some() { 0x80 } else { 0 };
    out.push(b0);
    if payload_len < 126 {
        out.push(mbit | payload_len as u8);
    } else if payload_len <= u16::MAX as usize {
        out.push(mbit | 126);
        out.extend_from_slice(&(payload_len as u16).to_be_bytes());
    } else {
        out.push(mbit | 127);
        out.extend_from_slice(&(payload_len as u64).to_be_bytes());
    }
    if let Some(m) = mask {
        out.extend_from_slice(&m);
    }
}

/// XORs `buf` with the masking key, where `buf[0]` is payload byte 0.
pub fn apply_mask(buf: &mut [u8], key: [u8; 4]) {
    let k = u32::from_ne_bytes(key) as u64;
    let k64 = k | (k << 32);
    let mut chunks = buf.chunks_exact_mut(8);
    for c in &mut chunks {
        let mut w = [0u8; 8];
        w.copy_from_slice(c);
        let v = u64::from_ne_bytes(w) ^ k64;
        c.copy_from_slice(&v.to_ne_bytes());
    }
    // The remainder starts at a multiple of 8, so key index = i % 4.
    for (i, b) in chunks.into_remainder().iter_mut().enumerate() {
        *b ^= key[i & 3];
    }
}

/// Appends a complete masked client frame.
pub fn push_client_frame(out: &mut Vec<u8>, b0: u8, payload: &[u8], key: [u8; 4]) {
    push_header(out, b0, payload.len(), Some(key));
    let start = out.len();
    out.extend_from_slice(payload);
    apply_mask(&mut out[start..], key);
}

/// A tiny, fast PRNG (xorshift64*) for masking keys and sequence salts.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Rng(seed | 1)
    }
    pub fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    pub fn mask(&mut self) -> [u8; 4] {
        (self.next_u64() as u32).to_ne_bytes()
    }
}

/// `Sec-WebSocket-Accept` for a key.
pub fn accept_key(key: &str) -> String {
    let mut h = Sha1::new();
    h.update(key.trim().as_bytes());
    h.update(GUID.as_bytes());
    base64::engine::general_purpose::STANDARD.encode(h.finalize())
}

/// A fresh random `Sec-WebSocket-Key`.
pub fn new_key() -> String {
    base64::engine::general_purpose::STANDARD.encode(rand::random::<[u8; 16]>())
}

/// The upgrade request a client sends.
pub fn upgrade_request(host: &str, path: &str, key: &str) -> String {
    format!(
        "GET {path} HTTP/1.1\r\nHost: {host}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n"
    )
}

/// The position just past the `\r\n\r\n` ending an HTTP head, if present.
pub fn head_end(buf: &[u8]) -> Option<usize> {
    buf.windows(4).position(|w| w == b"\r\n\r\n").map(|p| p + 4)
}

/// The value of a header in an HTTP head (name matched case-insensitively).
pub fn header_value<'a>(head: &'a str, name: &str) -> Option<&'a str> {
    head.split("\r\n").skip(1).find_map(|line| {
        let (n, v) = line.split_once(':')?;
        n.trim().eq_ignore_ascii_case(name).then(|| v.trim())
    })
}

/// The payload pattern of the benchmarks: a message with sequence number `seq`
/// is `seq` as 8 little-endian bytes, then `size - 8` bytes of `pattern`
/// starting at offset `seq % 251`, so that every message differs from its
/// neighbours and a reordered, duplicated, truncated or corrupted message is
/// caught by a byte-for-byte comparison.
pub struct Pattern {
    bytes: Vec<u8>,
    size: usize,
}

impl Pattern {
    pub const MIN_SIZE: usize = 8;

    pub fn new(size: usize) -> Self {
        assert!(size >= Self::MIN_SIZE);
        let bytes = (0..size + 251)
            .map(|i| ((i as u32).wrapping_mul(2_654_435_761) >> 24) as u8)
            .collect();
        Pattern { bytes, size }
    }

    pub fn size(&self) -> usize {
        self.size
    }

    fn tail(&self, seq: u64) -> &[u8] {
        let off = (seq % 251) as usize;
        &self.bytes[off..off + self.size - 8]
    }

    /// Appends a masked binary client frame carrying message `seq`.
    pub fn push_frame(&self, out: &mut Vec<u8>, seq: u64, key: [u8; 4]) {
        push_header(out, 0x80 | OP_BINARY, self.size, Some(key));
        let start = out.len();
        out.extend_from_slice(&seq.to_le_bytes());
        out.extend_from_slice(self.tail(seq));
        apply_mask(&mut out[start..], key);
    }

    /// Checks an echoed (unmasked) frame against message `seq`.
    pub fn verify(&self, h: &Header, payload: &[u8], seq: u64) -> Result<(), String> {
        if !h.fin() || h.opcode() != OP_BINARY {
            return Err(format!(
                "expected a final binary frame, got b0={:#04x} (opcode {})",
                h.b0,
                h.opcode()
            ));
        }
        if h.mask.is_some() {
            return Err("server frame is masked".into());
        }
        if payload.len() != self.size {
            return Err(format!(
                "message {seq}: length {} instead of {}",
                payload.len(),
                self.size
            ));
        }
        let mut s = [0u8; 8];
        s.copy_from_slice(&payload[..8]);
        let got = u64::from_le_bytes(s);
        if got != seq {
            return Err(format!("out of order: expected message {seq}, got {got}"));
        }
        if &payload[8..] != self.tail(seq) {
            let i = payload[8..]
                .iter()
                .zip(self.tail(seq))
                .position(|(a, b)| a != b)
                .unwrap_or(0);
            return Err(format!("message {seq}: payload differs at byte {}", i + 8));
        }
        Ok(())
    }
}

/// Quick checks of the framing code, run when the binary is started without a
/// subcommand (as `cargo test --all-targets` does): masking round-trips, the
/// three length encodings parse back, and the verifier catches a corruption.
pub fn self_check() -> Result<(), String> {
    let mut v: Vec<u8> = (0..37).collect();
    let orig = v.clone();
    apply_mask(&mut v, [1, 2, 3, 4]);
    for (i, (a, b)) in v.iter().zip(&orig).enumerate() {
        if *a != b ^ [1, 2, 3, 4][i % 4] {
            return Err(format!("mask byte {i} wrong"));
        }
    }
    for size in [8usize, 125, 126, 65535, 65536, 70000] {
        let p = Pattern::new(size);
        let mut out = Vec::new();
        let key = [9, 8, 7, 6];
        p.push_frame(&mut out, 42, key);
        let h = parse_header(&out)?.ok_or("incomplete header")?;
        if h.payload_len != size || h.total_len() != out.len() || h.mask != Some(key) {
            return Err(format!("size {size}: header parsed back wrong: {h:?}"));
        }
        let start = h.header_len;
        apply_mask(&mut out[start..], key);
        let unmasked = Header { mask: None, ..h };
        p.verify(&unmasked, &out[start..], 42)?;
        if p.verify(&unmasked, &out[start..], 43).is_ok() {
            return Err("verifier accepted the wrong sequence number".into());
        }
        let last = out.len() - 1;
        out[last] ^= 1;
        if p.verify(&unmasked, &out[start..], 42).is_ok() {
            return Err("verifier accepted a corrupted payload".into());
        }
    }
    if accept_key("dGhlIHNhbXBsZSBub25jZQ==") != "s3pPLMBiTxaQ9kYGzzhZRbK+xOo=" {
        return Err("accept key wrong".into());
    }
    Ok(())
}
