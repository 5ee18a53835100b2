//! WebSocket frame headers (RFC 6455 §5.2): a pure parser over `&[u8]` and
//! encoders for the few control frames berth writes itself.
//!
//! The relay never copies or unmasks payloads it does not need: it parses a
//! header, learns how many payload bytes follow, and lets them pass. So the
//! parser answers two questions separately: "is a whole header here?"
//! (`Ok(None)` when not yet) and "what does it say?".

/// Largest possible header: 2 bytes + 8-byte extended length + 4-byte mask.
pub const MAX_HEADER_LEN: usize = 14;

/// Frame opcodes (RFC 6455 §5.2, §11.8).
pub mod opcode {
    pub const CONTINUATION: u8 = 0x0;
    pub const TEXT: u8 = 0x1;
    pub const BINARY: u8 = 0x2;
    pub const CLOSE: u8 = 0x8;
    pub const PING: u8 = 0x9;
    pub const PONG: u8 = 0xA;
}

/// A parsed frame header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FrameHeader {
    pub fin: bool,
    /// The three RSV bits, as the low bits of this byte (passed through untouched).
    pub rsv: u8,
    pub opcode: u8,
    /// The masking key, when the MASK bit is set.
    pub mask: Option<[u8; 4]>,
    pub payload_len: u64,
    /// Bytes taken by the header itself (2 to 14).
    pub header_len: usize,
}

impl FrameHeader {
    /// Control frames have the high opcode bit set (RFC 6455 §5.5).
    pub fn is_control(&self) -> bool {
        self.opcode & 0x8 != 0
    }

    /// Text, binary or continuation: the frames an idle timeout watches for.
    pub fn is_data(&self) -> bool {
        self.opcode <= opcode::BINARY
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    /// RFC 6455 §5.2: the most significant bit of a 64-bit length must be 0.
    #[error("64-bit payload length has its most significant bit set")]
    LengthOverflow,
    /// RFC 6455 §5.5: control frames carry at most 125 bytes.
    #[error("control frame payload of {0} bytes exceeds 125")]
    ControlTooLong(u64),
    /// RFC 6455 §5.5: control frames must not be fragmented.
    #[error("fragmented control frame")]
    FragmentedControl,
}

/// Parses a frame header at the start of `buf`.
///
/// Returns `Ok(None)` when `buf` does not yet hold the whole header; an error
/// when the header breaks a rule every endpoint must enforce.
// Inlined into the relay's per-frame loop, where it runs once per frame.
#[inline]
pub fn parse_header(buf: &[u8]) -> Result<Option<FrameHeader>, FrameError> {
    let [b0, b1, ..] = *buf else {
        return Ok(None);
    };
    let fin = b0 & 0x80 != 0;
    let rsv = (b0 >> 4) & 0x7;
    let opcode = b0 & 0x0F;
    let masked = b1 & 0x80 != 0;
    let len7 = b1 & 0x7F;
    let (payload_len, mut at) = match len7 {
        126 => match buf.get(2..4) {
            Some(b) => (u64::from(u16::from_be_bytes([b[0], b[1]])), 4),
            None => return Ok(None),
        },
        127 => match buf.get(2..10) {
            Some(b) => {
                let mut be = [0u8; 8];
                be.copy_from_slice(b);
                let len = u64::from_be_bytes(be);
                if len >> 63 != 0 {
                    return Err(FrameError::LengthOverflow);
                }
                (len, 10)
            }
            None => return Ok(None),
        },
        n => (u64::from(n), 2),
    };
    let mask = if masked {
        match buf.get(at..at + 4) {
            Some(b) => {
                at += 4;
                Some([b[0], b[1], b[2], b[3]])
            }
            None => return Ok(None),
        }
    } else {
        None
    };
    let header = FrameHeader {
        fin,
        rsv,
        opcode,
        mask,
        payload_len,
        header_len: at,
    };
    if header.is_control() {
        if payload_len > 125 {
            return Err(FrameError::ControlTooLong(payload_len));
        }
        if !fin {
            return Err(FrameError::FragmentedControl);
        }
    }
    Ok(Some(header))
}

/// How many header bytes a frame that starts with these two bytes needs, or
/// `None` if fewer than two bytes are known.
pub fn header_len_hint(buf: &[u8]) -> Option<usize> {
    let b1 = *buf.get(1)?;
    let ext = match b1 & 0x7F {
        126 => 2,
        127 => 8,
        _ => 0,
    };
    let mask = if b1 & 0x80 != 0 { 4 } else { 0 };
    Some(2 + ext + mask)
}

/// XORs `data` with `mask`, where `offset` is the position of `data[0]`
/// within the frame's payload (RFC 6455 §5.3).
pub fn apply_mask(data: &mut [u8], mask: [u8; 4], offset: u64) {
    for (i, byte) in data.iter_mut().enumerate() {
        // The index only matters modulo 4, so truncation is harmless.
        let idx = (offset.wrapping_add(i as u64) & 3) as usize;
        *byte ^= mask[idx];
    }
}

/// Largest control frame berth writes: header with mask + 125 bytes.
pub const MAX_CONTROL_FRAME: usize = 2 + 4 + 125;

/// A control frame berth writes, held inline (no allocation).
#[derive(Clone, Copy)]
pub struct ControlFrame {
    buf: [u8; MAX_CONTROL_FRAME],
    len: u8,
}

impl ControlFrame {
    /// Encodes a control frame. The payload is cut to 125 bytes; `mask` is
    /// required towards servers (RFC 6455 §5.1) and absent towards clients.
    pub fn new(opcode: u8, payload: &[u8], mask: Option<[u8; 4]>) -> ControlFrame {
        let payload = &payload[..payload.len().min(125)];
        let mut buf = [0u8; MAX_CONTROL_FRAME];
        buf[0] = 0x80 | (opcode & 0x0F);
        // payload.len() <= 125, so it fits the 7-bit length.
        buf[1] = payload.len() as u8;
        let mut at = 2;
        if let Some(key) = mask {
            buf[1] |= 0x80;
            buf[2..6].copy_from_slice(&key);
            at = 6;
        }
        let end = at + payload.len();
        buf[at..end].copy_from_slice(payload);
        if let Some(key) = mask {
            apply_mask(&mut buf[at..end], key, 0);
        }
        ControlFrame {
            buf,
            len: end as u8,
        }
    }

    /// A Close frame with a status code and a UTF-8 reason (RFC 6455 §5.5.1).
    pub fn close(code: u16, reason: &str, mask: Option<[u8; 4]>) -> ControlFrame {
        let mut payload = [0u8; 125];
        payload[..2].copy_from_slice(&code.to_be_bytes());
        let mut reason_len = reason.len().min(123);
        while !reason.is_char_boundary(reason_len) {
            reason_len -= 1;
        }
        payload[2..2 + reason_len].copy_from_slice(&reason.as_bytes()[..reason_len]);
        ControlFrame::new(opcode::CLOSE, &payload[..2 + reason_len], mask)
    }

    pub fn as_bytes(&self) -> &[u8] {
        &self.buf[..usize::from(self.len)]
    }
}

/// Close status codes berth sends (RFC 6455 §7.4.1, and the IANA registry
/// for 1012 and 1014).
pub mod close_code {
    pub const NORMAL: u16 = 1000;
    pub const GOING_AWAY: u16 = 1001;
    pub const PROTOCOL_ERROR: u16 = 1002;
    pub const POLICY_VIOLATION: u16 = 1008;
    pub const MESSAGE_TOO_BIG: u16 = 1009;
    pub const SERVICE_RESTART: u16 = 1012;
    pub const BAD_GATEWAY: u16 = 1014;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn short_input_is_not_an_error() {
        assert_eq!(parse_header(&[]), Ok(None));
        assert_eq!(parse_header(&[0x81]), Ok(None));
        // 16-bit length announced but missing.
        assert_eq!(parse_header(&[0x82, 126, 0x01]), Ok(None));
        // Mask announced but missing.
        assert_eq!(parse_header(&[0x81, 0x85, 1, 2, 3]), Ok(None));
    }

    #[test]
    fn parses_each_length_form() {
        let h = parse_header(&[0x81, 0x05]).unwrap().unwrap();
        assert_eq!(
            (h.fin, h.opcode, h.payload_len, h.header_len),
            (true, 1, 5, 2)
        );
        let h = parse_header(&[0x02, 126, 0x01, 0x00]).unwrap().unwrap();
        assert_eq!(
            (h.fin, h.opcode, h.payload_len, h.header_len),
            (false, 2, 256, 4)
        );
        let h = parse_header(&[0x82, 0xFF, 0, 0, 0, 0, 0, 1, 0, 0, 9, 8, 7, 6])
            .unwrap()
            .unwrap();
        assert_eq!(h.payload_len, 65536);
        assert_eq!(h.mask, Some([9, 8, 7, 6]));
        assert_eq!(h.header_len, 14);
    }

    #[test]
    fn rsv_bits_are_reported_not_rejected() {
        let h = parse_header(&[0xC1, 0x00]).unwrap().unwrap();
        assert_eq!(h.rsv, 0b100);
    }

    #[test]
    fn control_frame_rules() {
        assert_eq!(
            parse_header(&[0x89, 126, 0, 126]),
            Err(FrameError::ControlTooLong(126))
        );
        assert_eq!(
            parse_header(&[0x09, 0x00]),
            Err(FrameError::FragmentedControl)
        );
        let mut bad = [0x82, 127, 0x80, 0, 0, 0, 0, 0, 0, 0];
        assert_eq!(parse_header(&bad), Err(FrameError::LengthOverflow));
        bad[2] = 0;
        assert!(parse_header(&bad).unwrap().is_some());
    }

    #[test]
    fn header_hint_matches_parse() {
        for frame in [
            &[0x81u8, 0x05][..],
            &[0x82, 0xFE, 1, 0, 1, 2, 3, 4],
            &[0x82, 127, 0, 0, 0, 0, 0, 0, 1, 0],
        ] {
            let h = parse_header(frame).unwrap().unwrap();
            assert_eq!(header_len_hint(frame), Some(h.header_len));
        }
    }

    #[test]
    fn close_frame_round_trips_through_mask() {
        let key = [0x37, 0xfa, 0x21, 0x3d];
        let f = ControlFrame::close(1012, "service restart", Some(key));
        let bytes = f.as_bytes();
        let h = parse_header(bytes).unwrap().unwrap();
        assert_eq!(h.opcode, opcode::CLOSE);
        let mut payload = bytes[h.header_len..].to_vec();
        apply_mask(&mut payload, key, 0);
        assert_eq!(&payload[..2], &1012u16.to_be_bytes());
        assert_eq!(&payload[2..], b"service restart");
    }

    #[test]
    fn mask_offset_continues_across_chunks() {
        let key = [1, 2, 3, 4];
        let mut whole = *b"hello world";
        apply_mask(&mut whole, key, 0);
        let mut split = *b"hello world";
        let (a, b) = split.split_at_mut(3);
        apply_mask(a, key, 0);
        apply_mask(b, key, 3);
        assert_eq!(whole, split);
    }

    #[test]
    fn overlong_reason_is_cut_at_a_char_boundary() {
        let reason = "é".repeat(100);
        let f = ControlFrame::close(1001, &reason, None);
        let h = parse_header(f.as_bytes()).unwrap().unwrap();
        assert!(h.payload_len <= 125);
        assert!(std::str::from_utf8(&f.as_bytes()[h.header_len + 2..]).is_ok());
    }
}
