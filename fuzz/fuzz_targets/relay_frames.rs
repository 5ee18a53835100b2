//! The relay's frame processor on a valid frame stream built from the input
//! (any opcode, RSV bits, masks, fragments, the three length encodings,
//! Close codes, berth's own Pongs and others'), cut at arbitrary points:
//! - with no limit, every frame comes out byte for byte (a Pong that echoes
//!   berth's token from the client is the one thing consumed), and the
//!   report counts exactly the frames and messages sent;
//! - with a message size limit, the output stops exactly before the data
//!   frame that takes its message past the limit;
//! - cut feeds give the output and report of one whole feed;
//! - Pings queued between feeds land whole, at frame boundaries, never
//!   before the point they were queued at, and take nothing else away.
#![no_main]

use arbitrary::Arbitrary;
use berth::ws::frame::{opcode, ControlFrame};
use berth::ws::relay::processor::{FrameProcessor, Inject, Report, Sink, Source, PING_TOKEN_LEN};
use libfuzzer_sys::fuzz_target;

const TOKEN: [u8; PING_TOKEN_LEN] = *b"berth-42";

#[derive(Arbitrary, Debug)]
enum Kind {
    Continuation,
    Text,
    Binary,
    /// Opcodes 3 to 7 (data range) and 0xB to 0xF (control range).
    Reserved(u8),
    Close,
    Ping,
    Pong,
    /// A Pong whose payload is berth's token.
    OurPong,
}

#[derive(Arbitrary, Debug)]
enum Payload {
    Bytes(Vec<u8>),
    /// A longer payload of a length at an encoding edge.
    Long(u8),
}

#[derive(Arbitrary, Debug)]
struct Frame {
    kind: Kind,
    fin: bool,
    rsv: u8,
    mask: Option<[u8; 4]>,
    payload: Payload,
}

#[derive(Arbitrary, Debug)]
struct Input {
    client: bool,
    expect_pong: bool,
    limit: Option<u16>,
    frames: Vec<Frame>,
    cuts: Vec<u16>,
    /// Per cut: queue a Ping there (when none is waiting), and whether the
    /// driver then asks for it at once (`inject_at_boundary`).
    pings: Vec<(bool, bool, [u8; 4])>,
}

/// Payload lengths at the edges of the three length encodings.
const LONG: [usize; 5] = [125, 126, 127, 65_535, 65_536];
/// Long payloads per input beyond which `Payload::Long` is 127 bytes (each
/// whole feed copies the stream several times; this keeps runs fast).
const MAX_LONG: usize = 4;

/// Encodes a frame as a peer would (written here, not taken from berth).
fn encode(b0: u8, payload: &[u8], mask: Option<[u8; 4]>) -> Vec<u8> {
    let mut v = vec![b0];
    let m = if mask.is_some() { 0x80 } else { 0 };
    match payload.len() {
        n if n < 126 => v.push(m | n as u8),
        n if n <= 0xFFFF => {
            v.push(m | 126);
            v.extend_from_slice(&(n as u16).to_be_bytes());
        }
        n => {
            v.push(m | 127);
            v.extend_from_slice(&(n as u64).to_be_bytes());
        }
    }
    match mask {
        Some(key) => {
            v.extend_from_slice(&key);
            v.extend(payload.iter().enumerate().map(|(i, b)| b ^ key[i % 4]));
        }
        None => v.extend_from_slice(payload),
    }
    v
}

/// Index into `Report::frames` (berth's metric order: continuation, text,
/// binary, close, ping, pong, other).
fn slot(op: u8) -> usize {
    match op {
        0..=2 => usize::from(op),
        opcode::CLOSE => 3,
        opcode::PING => 4,
        opcode::PONG => 5,
        _ => 6,
    }
}

/// What the stream should do, frame by frame, modelled from RFC 6455 and
/// the processor's documented rules.
struct Model {
    input: Vec<u8>,
    out: Vec<u8>,
    /// Output offsets between frames.
    boundaries: Vec<usize>,
    frames: [u32; 7],
    messages: u32,
    consumed: bool,
    too_big: bool,
    close: Option<u16>,
}

fn model(input: &Input, source: Source, pong: bool, limit: u64) -> Model {
    let client = source == Source::Client;
    let mut m = Model {
        input: Vec::new(),
        out: Vec::new(),
        boundaries: vec![0],
        frames: [0; 7],
        messages: 0,
        consumed: false,
        too_big: false,
        close: None,
    };
    let mut message_len = 0u64;
    let mut discard = false;
    let mut longs = 0;
    for f in input.frames.iter().take(64) {
        let op = match f.kind {
            Kind::Continuation => opcode::CONTINUATION,
            Kind::Text => opcode::TEXT,
            Kind::Binary => opcode::BINARY,
            Kind::Reserved(n) => [3, 4, 5, 6, 7, 0xB, 0xC, 0xD, 0xE, 0xF][usize::from(n % 10)],
            Kind::Close => opcode::CLOSE,
            Kind::Ping => opcode::PING,
            Kind::Pong | Kind::OurPong => opcode::PONG,
        };
        let control = op & 0x8 != 0;
        let mut payload = match (&f.kind, &f.payload) {
            (Kind::OurPong, _) => TOKEN.to_vec(),
            (_, Payload::Bytes(b)) => b.clone(),
            (_, Payload::Long(n)) => {
                longs += 1;
                let len = if longs > MAX_LONG {
                    127
                } else {
                    LONG[usize::from(*n) % LONG.len()]
                };
                (0..len).map(|i| (i * 7 % 251) as u8).collect()
            }
        };
        if control {
            payload.truncate(125);
        }
        // Control frames are never fragmented; clients always mask.
        let fin = f.fin || control;
        let mask = if client {
            Some(f.mask.unwrap_or([1, 2, 3, 4]))
        } else {
            f.mask
        };
        let b0 = (u8::from(fin) << 7) | ((f.rsv & 7) << 4) | op;
        let bytes = encode(b0, &payload, mask);
        m.input.extend_from_slice(&bytes);

        m.frames[slot(op)] += 1;
        let mut too_big = false;
        if op <= opcode::BINARY {
            let len = payload.len() as u64;
            message_len = if op == opcode::CONTINUATION {
                message_len.saturating_add(len)
            } else {
                len
            };
            too_big = message_len > limit;
            if !too_big {
                m.messages += u32::from(fin);
            }
        }
        if op == opcode::CLOSE {
            m.close = Some(match payload[..] {
                [hi, lo, ..] => u16::from_be_bytes([hi, lo]),
                _ => 1005,
            });
        }
        if discard {
            continue;
        }
        if too_big {
            m.too_big = true;
            discard = true;
            continue;
        }
        if client && pong && op == opcode::PONG && payload[..] == TOKEN[..] {
            m.consumed = true;
            continue;
        }
        m.out.extend_from_slice(&bytes);
        m.boundaries.push(m.out.len());
    }
    m
}

/// Output split into relayed bytes and injected frames (with the relayed
/// offset each landed at).
#[derive(Default)]
struct Tape {
    relayed: Vec<u8>,
    injected: Vec<(usize, Vec<u8>)>,
}

impl Sink for Tape {
    fn forward(&mut self, bytes: &[u8]) {
        assert!(!bytes.is_empty(), "empty forward");
        self.relayed.extend_from_slice(bytes);
    }

    fn stored(&mut self, bytes: &[u8]) {
        assert!(!bytes.is_empty(), "empty stored");
        self.relayed.extend_from_slice(bytes);
    }

    fn inject(&mut self, frame: &[u8]) {
        self.injected.push((self.relayed.len(), frame.to_vec()));
    }
}

fuzz_target!(|input: Input| {
    let source = if input.client {
        Source::Client
    } else {
        Source::Backend
    };
    let pong = input.expect_pong.then_some(TOKEN);
    let limit = input.limit.map(u64::from);
    let m = model(&input, source, pong.is_some(), limit.unwrap_or(u64::MAX));
    let data = &m.input[..];

    // One whole feed against the model.
    let mut whole_out = Tape::default();
    let mut p = FrameProcessor::with_max_message(source, limit);
    let whole = p.feed(data, pong, &mut whole_out);
    assert!(whole_out.injected.is_empty());
    assert!(
        whole_out.relayed == m.out,
        "output differs from the frames sent"
    );
    assert_eq!(whole.error, None);
    assert_eq!(whole.frames, m.frames);
    assert_eq!(whole.messages, m.messages);
    assert_eq!(whole.pong_consumed, m.consumed);
    assert_eq!(whole.too_big, m.too_big);
    assert_eq!(p.close_code(), m.close);
    assert!(p.at_boundary());

    // Cut feeds, with Pings queued between them.
    let mut cuts: Vec<usize> = input
        .cuts
        .iter()
        .map(|&c| usize::from(c) % (data.len() + 1))
        .collect();
    cuts.sort_unstable();
    cuts.push(data.len());
    let mut plain = Tape::default();
    let mut q = FrameProcessor::with_max_message(source, limit);
    let mut inj = Tape::default();
    let mut r = FrameProcessor::with_max_message(source, limit);
    let mut cut = Report::default();
    let mut cut_inj = Report::default();
    let mut queued_at = Vec::new();
    let mut pings = input.pings.iter();
    let mut at = 0;
    for c in cuts {
        cut.merge(&q.feed(&data[at..c], pong, &mut plain));
        cut_inj.merge(&r.feed(&data[at..c], pong, &mut inj));
        at = c;
        if let Some(&(queue, now, key)) = pings.next() {
            if queue && r.queued().is_none() {
                let token = [inj.injected.len() as u8; PING_TOKEN_LEN];
                r.queue(Inject::Ping(token), key, false);
                queued_at.push((inj.relayed.len(), token, key));
                if now {
                    r.inject_at_boundary(&mut inj);
                }
            }
        }
    }
    assert!(
        plain.relayed == whole_out.relayed,
        "output differs when cut"
    );
    assert_eq!(whole, cut, "report differs when cut");
    assert_eq!(p.close_code(), q.close_code());

    // Injections take nothing away and add nothing but themselves.
    assert!(
        inj.relayed == m.out,
        "an injection changed the relayed bytes"
    );
    assert_eq!(cut_inj.frames, whole.frames);
    assert_eq!(cut_inj.messages, whole.messages);
    assert_eq!(cut_inj.too_big, whole.too_big);
    assert_eq!(cut_inj.error, None);
    // Each written Ping is whole, masked exactly when it goes to the
    // backend, at a frame boundary, and not before it was queued. The last
    // one may still wait for a boundary that never came.
    assert!(inj.injected.len() <= queued_at.len());
    assert!(queued_at.len() - inj.injected.len() <= 1);
    for ((landed, frame), (queued, token, key)) in inj.injected.iter().zip(&queued_at) {
        let mask = (source == Source::Client).then_some(*key);
        let want = ControlFrame::new(opcode::PING, token, mask);
        assert_eq!(frame[..], *want.as_bytes(), "injected frame bytes");
        assert!(landed >= queued, "a Ping landed before it was queued");
        assert!(
            m.boundaries.binary_search(landed).is_ok(),
            "a Ping landed inside a frame (offset {landed})"
        );
    }
});
