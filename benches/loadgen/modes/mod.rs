//! The load modes: throughput, latency, idle, handshake and half-open (the
//! storm mode lives in storm.rs). Each one is bounded in time and prints one
//! JSON object on stdout.

mod half_open;
mod handshake;
mod idle;
mod latency;
mod throughput;

pub use half_open::*;
pub use handshake::*;
pub use idle::*;
pub use latency::*;
pub use throughput::*;

use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::anyhow;
use bytes::{Buf, BytesMut};
use serde_json::{json, Value};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt, ReadHalf, WriteHalf};
use tokio::sync::{mpsc, watch, Barrier, Notify, Semaphore};
use tokio::time::{sleep_until, timeout};

use crate::net::{self, Conn, Target};
use crate::stage::{stage, Stage, StageError};
use crate::stats::{self, round3};
use crate::ws::{self, Header, Pattern, Rng};

/// What every client mode shares.
pub struct Client {
    pub target: Arc<Target>,
    pub source_ips: Arc<Vec<Ipv4Addr>>,
    pub watch: Vec<u32>,
}

impl Client {
    fn source(&self, i: usize) -> Option<Ipv4Addr> {
        source_for(&self.source_ips, i)
    }
}

pub fn source_for(ips: &[Ipv4Addr], i: usize) -> Option<Ipv4Addr> {
    (!ips.is_empty()).then(|| ips[i % ips.len()])
}

/// How long a connection (TCP + TLS + upgrade) may take.
pub const CONNECT_LIMIT: Duration = Duration::from_secs(30);
/// How long, after the end of a run, the last echoes may take to arrive.
const DRAIN_LIMIT: Duration = Duration::from_secs(10);
/// How long one echo may take in the latency, idle and handshake modes.
const ECHO_LIMIT: Duration = Duration::from_secs(10);
/// How long the results of a run may be late before they are given up on.
const STRAGGLER_LIMIT: Duration = Duration::from_secs(15);

/// The sequence numbers of connection `id` start at `id << 40`.
fn seq_base(id: usize) -> u64 {
    (id as u64) << 40
}

/// Reads until `buf` starts with one complete frame and returns its header.
pub async fn read_frame<R: AsyncRead + Unpin>(
    rd: &mut R,
    buf: &mut BytesMut,
) -> anyhow::Result<Header> {
    loop {
        if let Some(h) = ws::parse_header(buf).map_err(anyhow::Error::msg)? {
            if buf.len() >= h.total_len() {
                return Ok(h);
            }
            buf.reserve(h.total_len() - buf.len());
        } else if buf.capacity() - buf.len() < 1024 {
            buf.reserve(4096);
        }
        if rd.read_buf(buf).await? == 0 {
            return Err(anyhow!("connection closed by the server"));
        }
    }
}

/// Sends message `seq` and checks its echo.
async fn echo_once(
    conn: &mut Conn,
    buf: &mut BytesMut,
    pattern: &Pattern,
    out: &mut Vec<u8>,
    seq: u64,
    mask: [u8; 4],
) -> Result<(), StageError> {
    out.clear();
    pattern.push_frame(out, seq, mask);
    conn.write_all(out).await.map_err(stage(Stage::Echo))?;
    conn.flush().await.map_err(stage(Stage::Echo))?;
    let h = match timeout(ECHO_LIMIT, read_frame(conn, buf)).await {
        Ok(r) => r.map_err(stage(Stage::Echo))?,
        Err(_) => {
            return Err(StageError {
                stage: Stage::Echo,
                error: anyhow!("no echo within {ECHO_LIMIT:?}"),
            })
        }
    };
    let res = pattern.verify(&h, &buf[h.header_len..h.total_len()], seq);
    buf.advance(h.total_len());
    res.map_err(|e| StageError {
        stage: Stage::Echo,
        error: anyhow!("verification failed: {e}"),
    })
}

/// Sends Close 1000 and reads until the server's Close (or the end of the
/// stream), at most `limit`.
async fn close_handshake(
    conn: &mut Conn,
    buf: &mut BytesMut,
    mask: [u8; 4],
    limit: Duration,
) -> Result<(), StageError> {
    let mut out = Vec::with_capacity(16);
    ws::push_client_frame(&mut out, 0x80 | ws::OP_CLOSE, &1000u16.to_be_bytes(), mask);
    conn.write_all(&out).await.map_err(stage(Stage::Close))?;
    conn.flush().await.map_err(stage(Stage::Close))?;
    let wait = async {
        loop {
            let h = read_frame(conn, buf).await?;
            buf.advance(h.total_len());
            if h.opcode() == ws::OP_CLOSE {
                return Ok::<_, anyhow::Error>(());
            }
        }
    };
    match timeout(limit, wait).await {
        Ok(r) => r.map_err(stage(Stage::Close)),
        Err(_) => Err(StageError {
            stage: Stage::Close,
            error: anyhow!("no Close reply within {limit:?}"),
        }),
    }
}

/// Counts errors, keeping the first few messages.
#[derive(Default)]
pub struct Errors {
    by_stage: BTreeMap<&'static str, u64>,
    first: Vec<String>,
}

impl Errors {
    pub fn add(&mut self, e: &StageError) {
        *self.by_stage.entry(e.stage.name()).or_default() += 1;
        if self.first.len() < 5 {
            self.first.push(e.to_string());
        }
    }
    pub fn merge(&mut self, o: Errors) {
        for (k, v) in o.by_stage {
            *self.by_stage.entry(k).or_default() += v;
        }
        for f in o.first {
            if self.first.len() < 5 {
                self.first.push(f);
            }
        }
    }
    pub fn total(&self) -> u64 {
        self.by_stage.values().sum()
    }
    pub fn json(&self) -> Value {
        json!({ "total": self.total(), "by_stage": self.by_stage, "first": self.first })
    }
}

pub fn merge(into: &mut Value, from: Value) {
    if let (Some(a), Value::Object(b)) = (into.as_object_mut(), from) {
        a.extend(b);
    }
}
