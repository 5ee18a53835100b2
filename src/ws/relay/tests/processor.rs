//! Table and property tests of the frame processor: every case fed whole,
//! split at every byte offset, and in 1-byte chunks gives the same output,
//! byte for byte, and the same decisions.

use proptest::prelude::*;

use super::{close_payload, frame, pattern};
use crate::ws::frame::{opcode, FrameError};
use crate::ws::relay::processor::{
    FrameProcessor, Inject, ProtocolError, Report, Sink, Source, PING_TOKEN_LEN,
};

const KEY: [u8; 4] = [0x37, 0xfa, 0x21, 0x3d];
const KEY2: [u8; 4] = [0x01, 0x80, 0xff, 0x42];
const TOKEN: [u8; PING_TOKEN_LEN] = *b"berth-42";

/// Counts in `Report::frames` order.
#[derive(Clone, Copy, Default)]
struct Frames {
    cont: u32,
    text: u32,
    binary: u32,
    close: u32,
    ping: u32,
    pong: u32,
    other: u32,
}

impl Frames {
    fn array(self) -> [u32; 7] {
        [
            self.cont,
            self.text,
            self.binary,
            self.close,
            self.ping,
            self.pong,
            self.other,
        ]
    }
}

/// An injection queued after this many input bytes: what, masking key,
/// whether to discard afterwards.
type QueueAt = (usize, Inject, [u8; 4], bool);

enum Step {
    Bytes(Vec<u8>),
    /// Queue an injection here (the driver's timers and stop switch do this
    /// between reads).
    Queue(Inject, [u8; 4], bool),
}

/// One table case: the input (with injection points), the exact output
/// expected, and the decisions expected.
struct Case {
    name: String,
    source: Source,
    pong: Option<[u8; PING_TOKEN_LEN]>,
    /// The message size limit.
    limit: Option<u64>,
    steps: Vec<Step>,
    out: Vec<u8>,
    frames: Frames,
    messages: u32,
    close: Option<u16>,
    pong_consumed: bool,
    ping_written: bool,
    too_big: bool,
    error: Option<ProtocolError>,
}

impl Case {
    fn new(name: impl Into<String>, source: Source) -> Case {
        Case {
            name: name.into(),
            source,
            pong: None,
            limit: None,
            steps: Vec::new(),
            out: Vec::new(),
            frames: Frames::default(),
            messages: 0,
            close: None,
            pong_consumed: false,
            ping_written: false,
            too_big: false,
            error: None,
        }
    }

    fn limit(mut self, max_message: u64) -> Case {
        self.limit = Some(max_message);
        self
    }

    fn too_big(mut self) -> Case {
        self.too_big = true;
        self
    }

    fn pong(mut self, token: [u8; PING_TOKEN_LEN]) -> Case {
        self.pong = Some(token);
        self
    }

    /// Input that reaches the destination unchanged.
    fn pass(mut self, bytes: &[u8]) -> Case {
        self.out.extend_from_slice(bytes);
        self.steps.push(Step::Bytes(bytes.to_vec()));
        self
    }

    /// Input that must not reach the destination.
    fn gone(mut self, bytes: &[u8]) -> Case {
        self.steps.push(Step::Bytes(bytes.to_vec()));
        self
    }

    fn queue(mut self, inject: Inject, key: [u8; 4], then_discard: bool) -> Case {
        self.steps.push(Step::Queue(inject, key, then_discard));
        self
    }

    /// Output that is not input: an injected frame, where it must land.
    fn lands(mut self, bytes: &[u8]) -> Case {
        self.out.extend_from_slice(bytes);
        self
    }

    fn frames(mut self, frames: Frames, messages: u32) -> Case {
        self.frames = frames;
        self.messages = messages;
        self
    }

    fn close(mut self, code: u16) -> Case {
        self.close = Some(code);
        self
    }

    fn consumed(mut self) -> Case {
        self.pong_consumed = true;
        self
    }

    fn ping_written(mut self) -> Case {
        self.ping_written = true;
        self
    }

    fn error(mut self, e: ProtocolError) -> Case {
        self.error = Some(e);
        self
    }

    fn input(&self) -> (Vec<u8>, Vec<QueueAt>) {
        let mut bytes = Vec::new();
        let mut queues = Vec::new();
        for step in &self.steps {
            match step {
                Step::Bytes(b) => bytes.extend_from_slice(b),
                Step::Queue(i, k, d) => queues.push((bytes.len(), *i, *k, *d)),
            }
        }
        (bytes, queues)
    }
}

/// A sink that checks the output against the expected bytes as it comes
/// (no copy), and that forwarded runs are pieces of the current input, in
/// order.
struct Check<'a> {
    label: &'a str,
    expect: &'a [u8],
    pos: usize,
    input: std::ops::Range<usize>,
    last_forward: usize,
}

impl Check<'_> {
    fn take(&mut self, what: &str, bytes: &[u8]) {
        let end = self.pos + bytes.len();
        assert!(
            end <= self.expect.len() && self.expect[self.pos..end] == *bytes,
            "{}: {what} of {} bytes at output offset {} does not match",
            self.label,
            bytes.len(),
            self.pos
        );
        self.pos = end;
    }
}

impl Sink for Check<'_> {
    fn forward(&mut self, bytes: &[u8]) {
        assert!(!bytes.is_empty(), "{}: empty forward", self.label);
        let start = bytes.as_ptr() as usize;
        assert!(
            start >= self.input.start && start + bytes.len() <= self.input.end,
            "{}: forwarded bytes outside the input",
            self.label
        );
        assert!(
            start >= self.last_forward,
            "{}: runs out of order",
            self.label
        );
        self.last_forward = start + bytes.len();
        self.take("forward", bytes);
    }

    fn stored(&mut self, bytes: &[u8]) {
        assert!(!bytes.is_empty(), "{}: empty store", self.label);
        self.take("stored", bytes);
    }

    fn inject(&mut self, frame: &[u8]) {
        self.take("inject", frame);
    }
}

/// Feeds `input` cut at `cuts` (and at every injection point), acting
/// between feeds as the driver does: queue what is due, then write a queued
/// injection if the stream is at a boundary. Returns the merged report and
/// the processor.
#[allow(clippy::too_many_arguments)]
fn feed_cut(
    label: &str,
    source: Source,
    pong: Option<[u8; PING_TOKEN_LEN]>,
    limit: Option<u64>,
    input: &[u8],
    queues: &[QueueAt],
    cuts: impl Iterator<Item = usize>,
    expect: &[u8],
) -> (Report, FrameProcessor) {
    let mut p = FrameProcessor::with_max_message(source, limit);
    let mut sink = Check {
        label,
        expect,
        pos: 0,
        input: 0..0,
        last_forward: 0,
    };
    let mut total = Report::default();
    let mut at = 0;
    let mut queues = queues.iter().peekable();
    let mut cuts = cuts.chain(std::iter::once(input.len())).peekable();
    loop {
        while let Some(&&(q, inject, key, discard)) = queues.peek() {
            if q != at {
                break;
            }
            p.queue(inject, key, discard);
            queues.next();
        }
        if let Some(Inject::Ping(_)) = p.inject_at_boundary(&mut sink) {
            total.ping_written = true;
        }
        if at == input.len() {
            break;
        }
        let next_queue = queues.peek().map_or(input.len(), |q| q.0);
        while cuts.peek().is_some_and(|&c| c <= at) {
            cuts.next();
        }
        let end = cuts.peek().copied().unwrap_or(input.len()).min(next_queue);
        let chunk = &input[at..end];
        sink.input = chunk.as_ptr() as usize..chunk.as_ptr() as usize + chunk.len();
        sink.last_forward = sink.input.start;
        let r = p.feed(chunk, pong, &mut sink);
        total.merge(&r);
        at = end;
    }
    assert_eq!(sink.pos, expect.len(), "{label}: output ended early");
    (total, p)
}

fn check_decisions(label: &str, case: &Case, r: &Report, p: &FrameProcessor) {
    assert_eq!(r.frames, case.frames.array(), "{label}: frames per opcode");
    assert_eq!(r.messages, case.messages, "{label}: messages");
    let data = case.frames.cont + case.frames.text + case.frames.binary > 0;
    assert_eq!(r.data, data, "{label}: data seen");
    assert_eq!(
        r.pong_consumed, case.pong_consumed,
        "{label}: pong consumed"
    );
    assert_eq!(r.ping_written, case.ping_written, "{label}: ping written");
    assert_eq!(r.too_big, case.too_big, "{label}: message too big");
    if case.too_big {
        assert!(
            p.is_discarding(),
            "{label}: still forwarding after the limit"
        );
    }
    assert_eq!(r.error, case.error, "{label}: protocol error");
    assert_eq!(p.is_broken(), case.error.is_some(), "{label}: broken");
    assert_eq!(p.close_code(), case.close, "{label}: close code");
    assert!(p.queued().is_none(), "{label}: injection never written");
}

/// Whole, split at every offset, and 1-byte chunks.
fn run(case: &Case) {
    let (input, queues) = case.input();
    let feed = |label: &str, cuts: &mut dyn Iterator<Item = usize>| {
        let (r, p) = feed_cut(
            label,
            case.source,
            case.pong,
            case.limit,
            &input,
            &queues,
            cuts,
            &case.out,
        );
        check_decisions(label, case, &r, &p);
    };
    feed(&format!("{} (whole)", case.name), &mut std::iter::empty());
    for k in 1..input.len() {
        feed(
            &format!("{} (split at {k})", case.name),
            &mut std::iter::once(k),
        );
    }
    feed(
        &format!("{} (1-byte chunks)", case.name),
        &mut (1..input.len()),
    );
}

fn masked(source: Source) -> Option<[u8; 4]> {
    (source == Source::Client).then_some(KEY)
}

#[test]
fn every_length_class_passes_byte_for_byte() {
    let configs = [
        ("client, masked", Source::Client, Some(KEY)),
        ("backend, unmasked", Source::Backend, None),
        ("backend, masked", Source::Backend, Some(KEY2)),
    ];
    for (who, source, mask) in configs {
        // 7-bit lengths up to 125, the first 16-bit length, both in a run.
        let mut case = Case::new(format!("lengths 0/125/126, {who}"), source);
        for len in [0, 125, 126] {
            case = case.pass(&frame(true, opcode::BINARY, &pattern(len), mask));
        }
        run(&case.frames(
            Frames {
                binary: 3,
                ..Frames::default()
            },
            3,
        ));
    }
    // The largest 16-bit length and the first 64-bit one, followed by a
    // small frame so the end of the big one is a boundary inside a read.
    for (who, source, mask) in &configs[..2] {
        for len in [65535, 65536] {
            let case = Case::new(format!("length {len}, {who}"), *source)
                .pass(&frame(true, opcode::TEXT, &pattern(len), *mask))
                .pass(&frame(true, opcode::TEXT, b"next", *mask))
                .frames(
                    Frames {
                        text: 2,
                        ..Frames::default()
                    },
                    2,
                );
            run(&case);
        }
    }
}

#[test]
fn fragmented_messages_with_interleaved_control_frames() {
    for source in [Source::Client, Source::Backend] {
        let m = masked(source);
        let case = Case::new(format!("fragments, {source:?}"), source)
            .pass(&frame(false, opcode::TEXT, b"frag", m))
            .pass(&frame(true, opcode::PING, b"are you there", m))
            .pass(&frame(false, opcode::CONTINUATION, b"men", m))
            .pass(&frame(true, opcode::PONG, b"yes", m))
            .pass(&frame(false, opcode::CONTINUATION, &pattern(300), m))
            .pass(&frame(true, opcode::CONTINUATION, b"ted", m))
            .pass(&frame(true, opcode::BINARY, b"\x00\x01", m))
            .frames(
                Frames {
                    cont: 3,
                    text: 1,
                    binary: 1,
                    ping: 1,
                    pong: 1,
                    ..Frames::default()
                },
                2,
            );
        run(&case);
    }
}

#[test]
fn rsv_bits_and_unknown_opcodes_pass_untouched() {
    let mut compressed = frame(true, opcode::TEXT, b"deflated", Some(KEY));
    compressed[0] |= 0x40;
    let reserved = frame(true, 0x3, b"?", Some(KEY));
    let case = Case::new("rsv and opcode 3", Source::Client)
        .pass(&compressed)
        .pass(&reserved)
        .frames(
            Frames {
                text: 1,
                other: 1,
                ..Frames::default()
            },
            1,
        );
    run(&case);
}

#[test]
fn close_frames_and_their_codes() {
    let cases = [
        ("with code and reason", close_payload(1000, "bye"), 1000),
        ("with code only", close_payload(4001, ""), 4001),
        // RFC 6455 §7.1.5: no code reads as 1005.
        ("empty", Vec::new(), 1005),
        ("one byte", vec![0x03], 1005),
    ];
    for source in [Source::Client, Source::Backend] {
        for (what, payload, code) in &cases {
            let m = masked(source);
            let case = Case::new(format!("close {what}, {source:?}"), source)
                .pass(&frame(true, opcode::TEXT, b"last words", m))
                .pass(&frame(true, opcode::CLOSE, payload, m))
                .frames(
                    Frames {
                        text: 1,
                        close: 1,
                        ..Frames::default()
                    },
                    1,
                )
                .close(*code);
            run(&case);
        }
    }
}

#[test]
fn berths_pong_is_consumed_and_others_pass() {
    let before = frame(true, opcode::TEXT, b"before", Some(KEY));
    let after = frame(true, opcode::TEXT, b"after", Some(KEY));
    let texts = Frames {
        text: 2,
        pong: 1,
        ..Frames::default()
    };
    let ours = frame(true, opcode::PONG, &TOKEN, Some(KEY2));
    run(&Case::new("our pong", Source::Client)
        .pong(TOKEN)
        .pass(&before)
        .gone(&ours)
        .pass(&after)
        .frames(texts, 2)
        .consumed());
    let theirs = frame(true, opcode::PONG, b"12345678", Some(KEY2));
    run(
        &Case::new("someone else's pong, held then passed", Source::Client)
            .pong(TOKEN)
            .pass(&before)
            .pass(&theirs)
            .pass(&after)
            .frames(texts, 2),
    );
    let short = frame(true, opcode::PONG, b"berth-4", Some(KEY2));
    run(&Case::new("a pong of another length", Source::Client)
        .pong(TOKEN)
        .pass(&before)
        .pass(&short)
        .pass(&after)
        .frames(texts, 2));
    run(&Case::new("no ping outstanding", Source::Client)
        .pass(&before)
        .pass(&ours)
        .pass(&after)
        .frames(texts, 2));
    // Only the client answers berth's Pings: a backend's Pong passes.
    let unmasked = frame(true, opcode::PONG, &TOKEN, None);
    run(&Case::new("backend pong", Source::Backend)
        .pong(TOKEN)
        .pass(&unmasked)
        .frames(
            Frames {
                pong: 1,
                ..Frames::default()
            },
            0,
        ));
}

#[test]
fn injections_land_between_frames() {
    // A Ping towards the client queued in the middle of a fragment: it goes
    // out after that fragment, before the next one (RFC 6455 §5.4).
    let first = frame(false, opcode::TEXT, b"Hello, ", None);
    let second = frame(true, opcode::CONTINUATION, b"world", None);
    let ping = frame(true, opcode::PING, &TOKEN, None);
    let fragments = Frames {
        cont: 1,
        text: 1,
        ..Frames::default()
    };
    run(&Case::new("ping mid-fragment", Source::Backend)
        .pass(&first[..4])
        .queue(Inject::Ping(TOKEN), [9; 4], false)
        .pass(&first[4..])
        .lands(&ping)
        .pass(&second)
        .frames(fragments, 1)
        .ping_written());
    run(&Case::new("ping between frames", Source::Backend)
        .pass(&first)
        .queue(Inject::Ping(TOKEN), [9; 4], false)
        .lands(&ping)
        .pass(&second)
        .frames(fragments, 1)
        .ping_written());
    // The header's first byte is kept back, so the Ping goes before it.
    run(
        &Case::new("ping while a header is incomplete", Source::Backend)
            .pass(&first)
            .gone(&second[..1])
            .queue(Inject::Ping(TOKEN), [9; 4], false)
            .lands(&ping)
            .lands(&second[..1])
            .pass(&second[1..])
            .frames(fragments, 1)
            .ping_written(),
    );
    run(&Case::new("ping before anything", Source::Backend)
        .queue(Inject::Ping(TOKEN), [9; 4], false)
        .lands(&ping)
        .pass(&first)
        .pass(&second)
        .frames(fragments, 1)
        .ping_written());
    // berth's Close towards the backend (masked with the caller's key)
    // mid-message; the rest of the client's frames are parsed, not sent.
    let first = frame(false, opcode::BINARY, &pattern(200), Some(KEY));
    let second = frame(true, opcode::CONTINUATION, b"dropped", Some(KEY));
    let answer = frame(true, opcode::CLOSE, &close_payload(1001, ""), Some(KEY));
    let close = Inject::Close {
        code: 1001,
        reason: "idle timeout",
    };
    run(
        &Case::new("close mid-message, then discard", Source::Client)
            .pass(&first[..50])
            .queue(close, KEY2, true)
            .pass(&first[50..])
            .lands(&frame(
                true,
                opcode::CLOSE,
                &close_payload(1001, "idle timeout"),
                Some(KEY2),
            ))
            .gone(&second)
            .gone(&answer)
            .frames(
                Frames {
                    cont: 1,
                    binary: 1,
                    close: 1,
                    ..Frames::default()
                },
                1,
            )
            .close(1001),
    );
}

#[test]
fn each_protocol_error_stops_the_stream() {
    let ok = frame(true, opcode::TEXT, b"fine", Some(KEY));
    let after = frame(true, opcode::TEXT, b"never", Some(KEY));
    let text = Frames {
        text: 1,
        ..Frames::default()
    };
    let mut long_ping = frame(true, opcode::PING, &pattern(126), Some(KEY));
    long_ping.extend_from_slice(&after);
    let mut fragmented_ping = frame(false, opcode::PING, b"p", Some(KEY));
    fragmented_ping.extend_from_slice(&after);
    // RFC 6455 §5.2: the most significant bit of a 64-bit length is 0.
    let mut overflow = vec![0x82, 0xFF, 0x80, 0, 0, 0, 0, 0, 0, 0];
    overflow.extend_from_slice(&KEY);
    overflow.extend_from_slice(&after);
    let unmasked = frame(true, opcode::TEXT, b"plain", None);
    let cases = [
        ("unmasked client frame", unmasked, ProtocolError::Unmasked),
        (
            "control frame over 125 bytes",
            long_ping,
            ProtocolError::Frame(FrameError::ControlTooLong(126)),
        ),
        (
            "fragmented control frame",
            fragmented_ping,
            ProtocolError::Frame(FrameError::FragmentedControl),
        ),
        (
            "64-bit length with the top bit set",
            overflow,
            ProtocolError::Frame(FrameError::LengthOverflow),
        ),
    ];
    for (what, bad, error) in cases {
        run(&Case::new(what, Source::Client)
            .pass(&ok)
            .gone(&bad)
            .gone(&after)
            .frames(text, 1)
            .error(error));
    }
}

/// Found by the `relay_cuts` fuzz target: a 64-bit length with its top bit
/// set is refused once the length is known, before the masking key, and
/// that must not depend on where the reads were cut. A header collected
/// across reads used to wait for its masking key, so the same 11 bytes cut
/// at 3 left the stream open where one read of them broke it.
#[test]
fn a_bad_length_is_refused_when_known_however_the_header_was_cut() {
    for have in 10..14 {
        let mut header = vec![0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0x25, 0x0A, 0x3F];
        header.extend_from_slice(&KEY[..have - 10]);
        run(
            &Case::new(format!("{have} bytes of a header"), Source::Client)
                .gone(&header)
                .error(ProtocolError::Frame(FrameError::LengthOverflow)),
        );
    }
}

#[test]
fn a_message_over_the_limit_stops_at_the_frame_that_crosses_it() {
    for source in [Source::Client, Source::Backend] {
        let m = masked(source);
        let who = format!("{source:?}");
        let text = |n| Frames {
            text: n,
            ..Frames::default()
        };
        // At the limit passes; one byte over does not, nor anything after.
        run(&Case::new(format!("at the limit, {who}"), source)
            .limit(300)
            .pass(&frame(true, opcode::TEXT, &pattern(300), m))
            .pass(&frame(true, opcode::TEXT, &pattern(300), m))
            .frames(text(2), 2));
        run(&Case::new(format!("one byte over, {who}"), source)
            .limit(300)
            .pass(&frame(true, opcode::TEXT, b"small", m))
            .gone(&frame(true, opcode::TEXT, &pattern(301), m))
            .gone(&frame(true, opcode::TEXT, b"after", m))
            .frames(text(3), 2)
            .too_big());
        // Fragments add up: the one that crosses is dropped, the ones
        // before it were already forwarded; control frames between them
        // pass and do not count.
        run(&Case::new(format!("fragments add up, {who}"), source)
            .limit(100)
            .pass(&frame(false, opcode::BINARY, &pattern(40), m))
            .pass(&frame(true, opcode::PING, &pattern(125), m))
            .pass(&frame(false, opcode::CONTINUATION, &pattern(60), m))
            .gone(&frame(true, opcode::CONTINUATION, b"!", m))
            .gone(&frame(true, opcode::CLOSE, &close_payload(1009, ""), m))
            .frames(
                Frames {
                    cont: 2,
                    binary: 1,
                    close: 1,
                    ping: 1,
                    ..Frames::default()
                },
                0,
            )
            .too_big()
            .close(1009));
        // Exactly at the limit across fragments, then a new message: each
        // message is measured on its own.
        run(
            &Case::new(format!("each message on its own, {who}"), source)
                .limit(100)
                .pass(&frame(false, opcode::TEXT, &pattern(50), m))
                .pass(&frame(true, opcode::CONTINUATION, &pattern(50), m))
                .pass(&frame(true, opcode::BINARY, &pattern(100), m))
                .frames(
                    Frames {
                        cont: 1,
                        text: 1,
                        binary: 1,
                        ..Frames::default()
                    },
                    2,
                ),
        );
    }
    // A 64-bit length far over the limit: dropped on its header alone.
    let huge = frame(true, opcode::BINARY, &pattern(70_000), Some(KEY));
    run(&Case::new("a 64-bit length", Source::Client)
        .limit(65_536)
        .pass(&frame(true, opcode::BINARY, &pattern(65_536), Some(KEY)))
        .gone(&huge)
        .frames(
            Frames {
                binary: 2,
                ..Frames::default()
            },
            1,
        )
        .too_big());
}

/// Many small frames in one chunk (the relay's common case, which the
/// processor skips through in a tight loop) count and stop exactly as the
/// same frames one by one: a fragment crossing the limit after a run of
/// fragments, a control frame, a 64-bit length and an unmasked client
/// frame after runs of data frames.
#[test]
fn runs_of_small_frames_count_and_stop_as_one_by_one() {
    let m = Some(KEY);
    let fragments = |n| Frames {
        cont: n,
        text: 1,
        ..Frames::default()
    };
    run(
        &Case::new("a fragment crosses the limit after a run", Source::Client)
            .limit(100)
            .pass(&frame(false, opcode::TEXT, &pattern(30), m))
            .pass(&frame(false, opcode::CONTINUATION, &pattern(30), m))
            .pass(&frame(false, opcode::CONTINUATION, &pattern(30), m))
            .gone(&frame(true, opcode::CONTINUATION, &pattern(11), m))
            .frames(fragments(3), 0)
            .too_big(),
    );
    run(&Case::new("the same at the limit", Source::Client)
        .limit(100)
        .pass(&frame(false, opcode::TEXT, &pattern(30), m))
        .pass(&frame(false, opcode::CONTINUATION, &pattern(30), m))
        .pass(&frame(false, opcode::CONTINUATION, &pattern(30), m))
        .pass(&frame(true, opcode::CONTINUATION, &pattern(10), m))
        .frames(fragments(3), 1));
    let mut small = Case::new("runs around a ping and a 64-bit length", Source::Backend);
    for i in 0..20 {
        small = small.pass(&frame(true, opcode::BINARY, &pattern(i), None));
    }
    small = small
        .pass(&frame(true, opcode::PING, b"?", None))
        .pass(&frame(true, opcode::TEXT, &pattern(200), None))
        .pass(&frame(true, opcode::BINARY, &pattern(65_536), None));
    for i in 0..5 {
        small = small.pass(&frame(true, opcode::TEXT, &pattern(i), None));
    }
    run(&small.frames(
        Frames {
            text: 6,
            binary: 21,
            ping: 1,
            ..Frames::default()
        },
        27,
    ));
    run(&Case::new("an unmasked frame after a run", Source::Client)
        .pass(&frame(true, opcode::TEXT, b"one", m))
        .pass(&frame(true, opcode::TEXT, b"two", m))
        .gone(&frame(true, opcode::TEXT, b"three", None))
        .gone(&frame(true, opcode::TEXT, b"four", m))
        .frames(
            Frames {
                text: 2,
                ..Frames::default()
            },
            2,
        )
        .error(ProtocolError::Unmasked));
}

#[test]
fn control_frames_are_not_held_to_the_limit() {
    let case = Case::new("pings and a close over a 16-byte limit", Source::Client)
        .limit(16)
        .pass(&frame(true, opcode::PING, &pattern(125), Some(KEY)))
        .pass(&frame(true, opcode::PONG, &pattern(100), Some(KEY)))
        .pass(&frame(true, opcode::TEXT, &pattern(16), Some(KEY)))
        .pass(&frame(
            true,
            opcode::CLOSE,
            &close_payload(1000, "a reason longer than sixteen bytes"),
            Some(KEY),
        ))
        .frames(
            Frames {
                text: 1,
                close: 1,
                ping: 1,
                pong: 1,
                ..Frames::default()
            },
            1,
        )
        .close(1000);
    run(&case);
}

/// A frame a proptest case may send, with whether it reaches the output.
#[derive(Clone, Debug)]
struct Gen {
    fin: bool,
    op: u8,
    len: usize,
    mask: Option<[u8; 4]>,
    /// A Pong that echoes the token (consumed when one is outstanding).
    ours: bool,
}

fn any_frame(client: bool) -> impl Strategy<Value = Gen> {
    let len = prop_oneof![
        4 => 0usize..130,
        1 => prop::sample::select(vec![125usize, 126, 127, 1000, 65535, 65536]),
    ];
    let data = (any::<bool>(), prop::sample::select(vec![0u8, 1, 2]), len)
        .prop_map(|(fin, op, len)| (fin, op, len, false));
    let control = (
        prop::sample::select(vec![opcode::CLOSE, opcode::PING, opcode::PONG]),
        0usize..=125,
    )
        .prop_map(|(op, len)| (true, op, len, false));
    let pong = any::<bool>().prop_map(|ours| (true, opcode::PONG, PING_TOKEN_LEN, ours));
    let mask = if client {
        any::<[u8; 4]>().prop_map(Some).boxed()
    } else {
        prop::option::of(any::<[u8; 4]>()).boxed()
    };
    (prop_oneof![3 => data, 1 => control, 1 => pong], mask).prop_map(
        |((fin, op, len, ours), mask)| Gen {
            fin,
            op,
            len,
            mask,
            ours,
        },
    )
}

fn any_stream() -> impl Strategy<Value = (bool, Vec<Gen>, Vec<usize>)> {
    any::<bool>().prop_flat_map(|client| {
        (
            Just(client),
            prop::collection::vec(any_frame(client), 1..12),
            prop::collection::vec(any::<usize>(), 0..12),
        )
    })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    /// Random valid frame sequences cut at random points give the output
    /// and counts of one whole feed, and those match the frames sent.
    #[test]
    fn random_cuts_change_nothing((client, gens, cuts) in any_stream(), expect_pong in any::<bool>()) {
        let source = if client { Source::Client } else { Source::Backend };
        let pong = expect_pong.then_some(TOKEN);
        let mut input = Vec::new();
        let mut expect = Vec::new();
        let mut frames = [0u32; 7];
        let mut messages = 0;
        let mut consumed = false;
        for g in &gens {
            let payload = if g.op == opcode::PONG && g.len == PING_TOKEN_LEN {
                if g.ours { TOKEN.to_vec() } else { b"not ours".to_vec() }
            } else {
                pattern(g.len)
            };
            let bytes = frame(g.fin, g.op, &payload, g.mask);
            input.extend_from_slice(&bytes);
            let eaten = client && pong.is_some() && g.op == opcode::PONG && g.ours;
            if eaten {
                consumed = true;
            } else {
                expect.extend_from_slice(&bytes);
            }
            frames[crate::metrics::opcode_index(g.op)] += 1;
            if g.op <= opcode::BINARY && g.fin {
                messages += 1;
            }
        }
        let mut cuts: Vec<usize> = cuts.iter().map(|c| c % input.len()).collect();
        cuts.sort_unstable();
        let (whole, p) = feed_cut("whole", source, pong, None, &input, &[], std::iter::empty(), &expect);
        let (cut, q) = feed_cut("cut", source, pong, None, &input, &[], cuts.into_iter(), &expect);
        prop_assert_eq!(whole, cut);
        prop_assert_eq!(whole.frames, frames);
        prop_assert_eq!(whole.messages, messages);
        prop_assert_eq!(whole.pong_consumed, consumed);
        prop_assert_eq!(whole.error, None);
        prop_assert_eq!(p.close_code(), q.close_code());
        let last_close = gens.iter().rev().find(|g| g.op == opcode::CLOSE);
        prop_assert_eq!(p.close_code().is_some(), last_close.is_some());
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    /// Any bytes at all, valid or not, cut anywhere, with or without a
    /// message size limit: no panic, and the output and decisions of one
    /// whole feed (a protocol error or an oversized message stops the
    /// stream at the same byte however it was cut).
    #[test]
    fn arbitrary_bytes_cut_anywhere_match_one_feed(
        client in any::<bool>(),
        input in prop::collection::vec(any::<u8>(), 1..300),
        cuts in prop::collection::vec(any::<usize>(), 0..8),
        expect_pong in any::<bool>(),
        limit in prop::option::of(0u64..300),
    ) {
        let source = if client { Source::Client } else { Source::Backend };
        let pong = expect_pong.then_some(TOKEN);
        let mut whole_out = Collect(Vec::new());
        let mut p = FrameProcessor::with_max_message(source, limit);
        let whole = p.feed(&input, pong, &mut whole_out);
        let mut cuts: Vec<usize> = cuts.iter().map(|c| c % input.len()).collect();
        cuts.sort_unstable();
        cuts.push(input.len());
        let mut cut_out = Collect(Vec::new());
        let mut q = FrameProcessor::with_max_message(source, limit);
        let mut cut = Report::default();
        let mut at = 0;
        for c in cuts {
            cut.merge(&q.feed(&input[at..c], pong, &mut cut_out));
            at = c;
        }
        prop_assert_eq!(&whole_out.0, &cut_out.0);
        prop_assert_eq!(whole, cut);
        prop_assert_eq!(p.close_code(), q.close_code());
        prop_assert_eq!(p.is_broken(), q.is_broken());
        prop_assert_eq!(p.at_boundary(), q.at_boundary());
    }
}

/// A sink that keeps everything.
struct Collect(Vec<u8>);

impl Sink for Collect {
    fn forward(&mut self, bytes: &[u8]) {
        self.0.extend_from_slice(bytes);
    }

    fn stored(&mut self, bytes: &[u8]) {
        self.0.extend_from_slice(bytes);
    }

    fn inject(&mut self, frame: &[u8]) {
        self.0.extend_from_slice(frame);
    }
}
