//! The relay's frame processor on arbitrary bytes (valid frames or not), cut
//! at arbitrary points taken from the input: it never panics, and the cut
//! feeds give the output, the report and the end state of one whole feed
//! (a protocol error or an oversized message stops the stream at the same
//! byte however it was cut).
#![no_main]

use arbitrary::Arbitrary;
use berth::ws::frame::MAX_HEADER_LEN;
use berth::ws::relay::processor::{FrameProcessor, Report, Sink, Source, PING_TOKEN_LEN};
use libfuzzer_sys::fuzz_target;

/// The Ping token a processor may be waiting to see echoed.
const TOKEN: [u8; PING_TOKEN_LEN] = *b"berth-42";

#[derive(Arbitrary, Debug)]
struct Input {
    client: bool,
    expect_pong: bool,
    /// A message size limit; small values make oversized messages common.
    limit: Option<u16>,
    /// Cut points, reduced modulo the input length.
    cuts: Vec<u16>,
    bytes: Vec<u8>,
}

/// Collects the output and checks the sink contract (no empty call).
struct Collect(Vec<u8>);

impl Sink for Collect {
    fn forward(&mut self, bytes: &[u8]) {
        assert!(!bytes.is_empty(), "empty forward");
        self.0.extend_from_slice(bytes);
    }

    fn stored(&mut self, bytes: &[u8]) {
        assert!(!bytes.is_empty(), "empty stored");
        self.0.extend_from_slice(bytes);
    }

    fn inject(&mut self, frame: &[u8]) {
        assert!(!frame.is_empty(), "empty inject");
        self.0.extend_from_slice(frame);
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
    let data = &input.bytes[..];

    let mut whole_out = Collect(Vec::new());
    let mut p = FrameProcessor::with_max_message(source, limit);
    let whole = p.feed(data, pong, &mut whole_out);

    let mut cuts: Vec<usize> = input
        .cuts
        .iter()
        .map(|&c| usize::from(c) % (data.len() + 1))
        .collect();
    cuts.sort_unstable();
    cuts.push(data.len());
    let mut cut_out = Collect(Vec::new());
    let mut q = FrameProcessor::with_max_message(source, limit);
    let mut cut = Report::default();
    let mut at = 0;
    for c in cuts {
        cut.merge(&q.feed(&data[at..c], pong, &mut cut_out));
        at = c;
    }

    assert_eq!(whole_out.0, cut_out.0, "output differs when cut");
    assert_eq!(whole, cut, "report differs when cut");
    assert_eq!(p.close_code(), q.close_code());
    assert_eq!(p.is_broken(), q.is_broken());
    assert_eq!(p.is_discarding(), q.is_discarding());
    assert_eq!(p.at_boundary(), q.at_boundary());
    assert_eq!(whole.error.is_some(), p.is_broken());

    let out = &whole_out.0;
    assert!(out.len() <= data.len(), "more output than input");
    // Without a Pong to hold back, nothing is removed from the middle of the
    // stream: what comes out is a prefix of what went in, and a stream that
    // broke no rule and stayed under the limit is only short of a header
    // still being collected.
    if source == Source::Backend || pong.is_none() {
        assert_eq!(
            out[..],
            data[..out.len()],
            "output is not a prefix of the input"
        );
        assert!(!whole.pong_consumed);
        if whole.error.is_none() && !whole.too_big {
            assert!(data.len() - out.len() < MAX_HEADER_LEN, "bytes held back");
        }
    }
});
