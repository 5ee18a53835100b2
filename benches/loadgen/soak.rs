//! The soak mode (`benches/soak.sh`): C WebSockets that each send a numbered
//! message every interval and check every echo, for a long time, while the
//! script reloads berth, drains one backend and kills another.
//!
//! Each of the C clients is a loop of sessions: connect (plain `ws://`, with
//! the affinity cookie of its last session, as a browser would), send and
//! check until berth closes the connection, then reconnect after a short
//! random pause. The backend a session landed on is read from berth's
//! affinity cookie (`<backend id>.<tag>`; a session that got no new cookie
//! is on the backend its cookie names), so the pool must use
//! `affinity = "cookie"`.
//!
//! Per session it records every sequence number echoed (a bitmap), so that
//! messages lost, duplicated or reordered are counted exactly, and how the
//! session ended: still open when the run ended (then it stops sending,
//! waits for the last echoes and closes with 1000), closed by berth with a
//! code, or dropped without a Close.
//!
//! Verdict (exit status 1 when any fails):
//! - sessions on backends that were neither drained nor killed (and
//!   sessions on a killed backend that opened after its restart) stay open
//!   to the end with nothing lost, duplicated, reordered or corrupted;
//! - every session on a drained backend is closed with 1012, every session
//!   on a killed backend that was open at the kill with 1014, and at least
//!   one session saw each;
//! - nothing is duplicated, reordered or corrupted on any session;
//! - every client is connected again at the end;
//! - berth's open descriptors and RSS at the end are within the tolerance
//!   of their values when all clients first were connected.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context as _};
use bytes::{Buf, BytesMut};
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};
use tokio::sync::{watch, Notify, Semaphore};
use tokio::time::{sleep, timeout, MissedTickBehavior};

use crate::stats::{self, round3};
use crate::ws::{self, Pattern, Rng};

pub struct SoakOpts {
    pub addr: SocketAddr,
    pub host: String,
    pub path: String,
    pub source_ips: Vec<Ipv4Addr>,
    pub connections: usize,
    /// From the moment every client is connected to the stop.
    pub duration: Duration,
    /// Between two messages of one client.
    pub interval: Duration,
    pub size: usize,
    /// Connects in progress at once.
    pub concurrency: usize,
    /// The affinity cookie's name.
    pub cookie: String,
    /// Backends the script drains (their sessions must end with 1012).
    pub drained: Vec<String>,
    /// Backends the script kills (their sessions must end with 1014).
    pub killed: Vec<String>,
    /// berth's process id, for descriptors and RSS.
    pub berth_pid: Option<u32>,
    /// Allowed growth of descriptors and RSS, as a fraction (0.05 = 5 %).
    pub tolerance: f64,
}

/// How long a connect plus upgrade may take.
const CONNECT_LIMIT: Duration = Duration::from_secs(30);
/// How long the last echoes may take after the stop.
const DRAIN_LIMIT: Duration = Duration::from_secs(15);
/// How long a Close handshake may take.
const CLOSE_LIMIT: Duration = Duration::from_secs(10);
/// How long, at the end, to wait for every client to be connected again.
const RECONNECT_LIMIT: Duration = Duration::from_secs(60);

/// How a session ended.
#[derive(Debug, Clone, PartialEq, Eq)]
enum End {
    /// Open until the stop; `clean`: our Close 1000 was answered.
    Completed { clean: bool },
    /// berth sent a Close with this code (1005: none given).
    Closed(u16),
    /// The stream ended or failed without a Close.
    Dropped(String),
}

/// One session's record.
struct Session {
    backend: String,
    end: End,
    sent: u64,
    echoed: u64,
    duplicated: u64,
    reordered: u64,
    corrupted: u64,
}

impl Session {
    fn lost(&self) -> u64 {
        self.sent.saturating_sub(self.echoed)
    }
}

/// Shared by every client task.
struct Shared {
    opts: SoakOpts,
    pattern: Pattern,
    live: AtomicUsize,
    changed: Notify,
    connect_slots: Semaphore,
}

/// The sequence numbers echoed on one session.
#[derive(Default)]
struct Seen {
    bits: Vec<u64>,
    max: Option<u64>,
    distinct: u64,
    duplicated: u64,
    reordered: u64,
}

impl Seen {
    fn add(&mut self, seq: u64) {
        let (word, bit) = ((seq / 64) as usize, seq % 64);
        if self.bits.len() <= word {
            self.bits.resize(word + 1, 0);
        }
        if self.bits[word] & (1 << bit) != 0 {
            self.duplicated += 1;
            return;
        }
        self.bits[word] |= 1 << bit;
        self.distinct += 1;
        if self.max.is_some_and(|m| seq < m) {
            self.reordered += 1;
        }
        self.max = Some(self.max.map_or(seq, |m| m.max(seq)));
    }
}

/// Descriptors and RSS of a process.
#[derive(Clone, Copy, Debug, Default)]
struct Usage {
    fds: u64,
    rss_kb: u64,
}

fn usage(pid: Option<u32>) -> Option<Usage> {
    let pid = pid?;
    let fds = std::fs::read_dir(format!("/proc/{pid}/fd")).ok()?.count() as u64;
    let rss_kb = stats::sample(&[pid]).rss_kb;
    Some(Usage { fds, rss_kb })
}

fn usage_json(u: Option<Usage>) -> Value {
    match u {
        Some(u) => json!({ "fds": u.fds, "rss_kb": u.rss_kb }),
        None => Value::Null,
    }
}

pub async fn run(opts: SoakOpts) -> anyhow::Result<Value> {
    if !opts.addr.ip().is_loopback() {
        bail!("{}: the soak test only targets loopback", opts.addr);
    }
    let idle = usage(opts.berth_pid);
    let n = opts.connections;
    let shared = Arc::new(Shared {
        pattern: Pattern::new(opts.size),
        live: AtomicUsize::new(0),
        changed: Notify::new(),
        connect_slots: Semaphore::new(opts.concurrency.max(1)),
        opts,
    });
    let (stop_tx, stop_rx) = watch::channel(false);
    let t0 = Instant::now();
    let mut clients = tokio::task::JoinSet::new();
    for i in 0..n {
        let (shared, stop) = (shared.clone(), stop_rx.clone());
        clients.spawn(client(shared, i, stop));
    }

    // Every client connected: the starting point.
    let all_in = wait_live(&shared, n, CONNECT_LIMIT * 4).await;
    let open_secs = t0.elapsed().as_secs_f64();
    sleep(Duration::from_secs(2)).await;
    let start = usage(shared.opts.berth_pid);
    {
        use std::io::Write as _;
        let mut out = std::io::stdout().lock();
        writeln!(out, "READY {}", shared.live.load(Ordering::SeqCst))?;
        out.flush()?;
    }
    eprintln!(
        "soak: {} of {n} connected in {open_secs:.1}s; running for {:?}",
        shared.live.load(Ordering::SeqCst),
        shared.opts.duration
    );
    let began = Instant::now();
    let mut next_note = began + Duration::from_secs(60);
    while began.elapsed() < shared.opts.duration {
        sleep(Duration::from_secs(1)).await;
        if Instant::now() >= next_note {
            next_note += Duration::from_secs(60);
            eprintln!(
                "soak: {:.0}s, {} connected",
                began.elapsed().as_secs_f64(),
                shared.live.load(Ordering::SeqCst)
            );
        }
    }

    // The end point: every client connected again, then measure.
    let all_back = wait_live(&shared, n, RECONNECT_LIMIT).await;
    let live_at_end = shared.live.load(Ordering::SeqCst);
    sleep(Duration::from_secs(2)).await;
    let end = usage(shared.opts.berth_pid);
    let _ = stop_tx.send(true);
    let mut sessions = Vec::new();
    let mut connect_errors = 0u64;
    let mut first_errors = Vec::new();
    // Clients by how many times berth closed them (any code): a client
    // closed twice by one rebalance shows in the entries above 1.
    let mut clients_by_closes: BTreeMap<usize, u64> = BTreeMap::new();
    while let Some(r) = clients.join_next().await {
        let (s, errors) = r.context("a client task failed")?;
        let closes = s.iter().filter(|s| matches!(s.end, End::Closed(_))).count();
        *clients_by_closes.entry(closes).or_default() += 1;
        sessions.extend(s);
        connect_errors += errors.len() as u64;
        for e in errors {
            if first_errors.len() < 5 {
                first_errors.push(e);
            }
        }
    }
    // berth frees a connection's descriptors once both sides are closed.
    sleep(Duration::from_secs(3)).await;
    let after = usage(shared.opts.berth_pid);

    let o = &shared.opts;
    Ok(verdict(
        o,
        &sessions,
        Counts {
            all_in,
            all_back,
            live_at_end,
            open_secs,
            connect_errors,
            first_errors,
            clients_by_closes,
        },
        [idle, start, end, after],
    ))
}

/// Waits until `want` clients are connected, at most `limit`.
async fn wait_live(shared: &Shared, want: usize, limit: Duration) -> bool {
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        let notified = shared.changed.notified();
        if shared.live.load(Ordering::SeqCst) >= want {
            return true;
        }
        if tokio::time::timeout_at(deadline, notified).await.is_err() {
            return shared.live.load(Ordering::SeqCst) >= want;
        }
    }
}

/// One client: sessions until the stop. Returns them and the connect errors.
async fn client(
    shared: Arc<Shared>,
    i: usize,
    mut stop: watch::Receiver<bool>,
) -> (Vec<Session>, Vec<String>) {
    let o = &shared.opts;
    let source = (!o.source_ips.is_empty()).then(|| o.source_ips[i % o.source_ips.len()]);
    let mut rng = Rng::new(0x9E37_79B9_7F4A_7C15 ^ (i as u64 + 1));
    let mut cookie: Option<String> = None;
    let mut sessions = Vec::new();
    let mut errors = Vec::new();
    while !*stop.borrow() {
        let connected = {
            let _slot = shared.connect_slots.acquire().await;
            timeout(CONNECT_LIMIT, connect(o, source, cookie.as_deref())).await
        };
        let (stream, leftover, value) = match connected {
            Ok(Ok(c)) => c,
            Ok(Err(e)) => {
                errors.push(format!("{e:#}"));
                pause(&mut rng, &mut stop, 1000).await;
                continue;
            }
            Err(_) => {
                errors.push(format!("connect took longer than {CONNECT_LIMIT:?}"));
                continue;
            }
        };
        if let Some(v) = value {
            cookie = Some(v);
        }
        let backend = cookie
            .as_deref()
            .and_then(|c| c.rsplit_once('.'))
            .map_or("?", |(id, _)| id)
            .to_string();
        shared.live.fetch_add(1, Ordering::SeqCst);
        shared.changed.notify_waiters();
        let s = session(&shared, stream, leftover, backend, &mut rng, &mut stop).await;
        shared.live.fetch_sub(1, Ordering::SeqCst);
        shared.changed.notify_waiters();
        let again = !matches!(s.end, End::Completed { .. });
        sessions.push(s);
        if again {
            // Reconnect after a pause, as clients told to go away do.
            pause(&mut rng, &mut stop, 2000).await;
        }
    }
    (sessions, errors)
}

/// Sleeps 0.25 to `max_ms` ms, or until the stop.
async fn pause(rng: &mut Rng, stop: &mut watch::Receiver<bool>, max_ms: u64) {
    let ms = 250 + rng.next_u64() % max_ms.saturating_sub(250).max(1);
    tokio::select! {
        _ = sleep(Duration::from_millis(ms)) => {}
        _ = stop.changed() => {}
    }
}

/// TCP connect (from `source`), the upgrade with the cookie, the `101`.
/// Returns the stream, bytes after the head, and the new cookie value if
/// berth set one.
async fn connect(
    o: &SoakOpts,
    source: Option<Ipv4Addr>,
    cookie: Option<&str>,
) -> anyhow::Result<(TcpStream, BytesMut, Option<String>)> {
    let sock = TcpSocket::new_v4().context("socket")?;
    if let Some(ip) = source {
        sock.set_reuseaddr(true)?;
        sock.bind(SocketAddr::new(IpAddr::V4(ip), 0))
            .with_context(|| format!("bind {ip}"))?;
    }
    let mut tcp = sock.connect(o.addr).await.context("connect")?;
    tcp.set_nodelay(true)?;
    let key = ws::new_key();
    let mut req = format!(
        "GET {} HTTP/1.1\r\nHost: {}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n",
        o.path, o.host
    );
    if let Some(value) = cookie {
        req.push_str(&format!("Cookie: {}={value}\r\n", o.cookie));
    }
    req.push_str("\r\n");
    tcp.write_all(req.as_bytes()).await?;
    let mut buf = BytesMut::with_capacity(1024);
    let end = loop {
        if let Some(end) = ws::head_end(&buf) {
            break end;
        }
        if buf.len() > 16 * 1024 {
            bail!("response head longer than 16 KiB");
        }
        if tcp.read_buf(&mut buf).await? == 0 {
            bail!("connection closed before the response head");
        }
    };
    let head = std::str::from_utf8(&buf[..end]).context("response head is not UTF-8")?;
    let status = head.lines().next().unwrap_or("");
    if !status.starts_with("HTTP/1.1 101") {
        bail!("expected 101, got {status:?}");
    }
    if ws::header_value(head, "sec-websocket-accept") != Some(&ws::accept_key(&key)[..]) {
        bail!("bad Sec-WebSocket-Accept");
    }
    let prefix = format!("{}=", o.cookie);
    let value = head
        .split("\r\n")
        .filter_map(|l| l.split_once(':'))
        .filter(|(n, _)| n.trim().eq_ignore_ascii_case("set-cookie"))
        .find_map(|(_, v)| {
            let v = v.trim().strip_prefix(&prefix)?;
            Some(v.split(';').next().unwrap_or(v).to_string())
        });
    buf.advance(end);
    Ok((tcp, buf, value))
}

/// One connection's life: send every interval, check every echo, until
/// berth closes it or the stop.
async fn session(
    shared: &Shared,
    mut tcp: TcpStream,
    mut buf: BytesMut,
    backend: String,
    rng: &mut Rng,
    stop: &mut watch::Receiver<bool>,
) -> Session {
    let o = &shared.opts;
    let mut s = Session {
        backend,
        end: End::Dropped(String::new()),
        sent: 0,
        echoed: 0,
        duplicated: 0,
        reordered: 0,
        corrupted: 0,
    };
    let mut seen = Seen::default();
    let mut out = Vec::with_capacity(o.size + 16);
    let offset = Duration::from_millis(rng.next_u64() % o.interval.as_millis().max(1) as u64);
    let mut ticker = tokio::time::interval_at(tokio::time::Instant::now() + offset, o.interval);
    ticker.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let mut stopping = *stop.borrow();
    let mut drain_deadline = None;
    let end = loop {
        // Handle every whole frame in the buffer.
        let mut closed = None;
        loop {
            let h = match ws::parse_header(&buf) {
                Ok(Some(h)) if buf.len() >= h.total_len() => h,
                Ok(_) => break,
                Err(e) => {
                    closed = Some(End::Dropped(format!("bad frame: {e}")));
                    break;
                }
            };
            let payload = &buf[h.header_len..h.total_len()];
            match h.opcode() {
                ws::OP_BINARY if payload.len() >= 8 => {
                    let mut n = [0u8; 8];
                    n.copy_from_slice(&payload[..8]);
                    let seq = u64::from_le_bytes(n);
                    if seq >= s.sent || shared.pattern.verify(&h, payload, seq).is_err() {
                        s.corrupted += 1;
                    } else {
                        seen.add(seq);
                    }
                }
                ws::OP_CLOSE => {
                    let code = match payload {
                        [a, b, ..] => u16::from_be_bytes([*a, *b]),
                        _ => 1005,
                    };
                    closed = Some(End::Closed(code));
                }
                ws::OP_PING => {
                    let mut pong = Vec::with_capacity(payload.len() + 8);
                    ws::push_client_frame(&mut pong, 0x80 | ws::OP_PONG, payload, rng.mask());
                    if tcp.write_all(&pong).await.is_err() {
                        closed = Some(End::Dropped("write failed".into()));
                    }
                }
                ws::OP_PONG => {}
                _ => s.corrupted += 1,
            }
            buf.advance(h.total_len());
            if closed.is_some() {
                break;
            }
        }
        if let Some(end) = closed {
            if let End::Closed(code) = end {
                // Answer the Close (RFC 6455 §5.5.1) and wait for TCP to end.
                out.clear();
                ws::push_client_frame(
                    &mut out,
                    0x80 | ws::OP_CLOSE,
                    &code.to_be_bytes(),
                    rng.mask(),
                );
                let _ = tcp.write_all(&out).await;
                let _ = timeout(CLOSE_LIMIT, async {
                    let mut sink = [0u8; 512];
                    while matches!(tcp.read(&mut sink).await, Ok(n) if n > 0) {}
                })
                .await;
            }
            break end;
        }
        if stopping && seen.distinct >= s.sent {
            break close_1000(&mut tcp, &mut buf, rng).await;
        }
        if buf.capacity() - buf.len() < 256 {
            buf.reserve(1024);
        }
        let deadline = drain_deadline;
        let drain = async move {
            match deadline {
                Some(d) => tokio::time::sleep_until(d).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            r = tcp.read_buf(&mut buf) => match r {
                Ok(0) => break End::Dropped("connection closed without a Close".into()),
                Ok(_) => {}
                Err(e) => break End::Dropped(format!("read: {e}")),
            },
            _ = ticker.tick(), if !stopping => {
                out.clear();
                shared.pattern.push_frame(&mut out, s.sent, rng.mask());
                if let Err(e) = tcp.write_all(&out).await {
                    break End::Dropped(format!("write: {e}"));
                }
                s.sent += 1;
            }
            _ = stop.changed(), if !stopping => {
                stopping = true;
                drain_deadline = Some(tokio::time::Instant::now() + DRAIN_LIMIT);
            }
            _ = drain => break close_1000(&mut tcp, &mut buf, rng).await,
        }
    };
    s.end = end;
    s.echoed = seen.distinct;
    s.duplicated = seen.duplicated;
    s.reordered = seen.reordered;
    s
}

/// Our Close 1000 at the end of the run, and berth's answer.
async fn close_1000(tcp: &mut TcpStream, buf: &mut BytesMut, rng: &mut Rng) -> End {
    let mut out = Vec::with_capacity(16);
    ws::push_client_frame(
        &mut out,
        0x80 | ws::OP_CLOSE,
        &1000u16.to_be_bytes(),
        rng.mask(),
    );
    if tcp.write_all(&out).await.is_err() {
        return End::Completed { clean: false };
    }
    let answered = timeout(CLOSE_LIMIT, async {
        loop {
            match ws::parse_header(buf) {
                Ok(Some(h)) if buf.len() >= h.total_len() => {
                    let op = h.opcode();
                    buf.advance(h.total_len());
                    if op == ws::OP_CLOSE {
                        return true;
                    }
                    continue;
                }
                Ok(_) => {}
                Err(_) => return false,
            }
            if !matches!(tcp.read_buf(buf).await, Ok(n) if n > 0) {
                return false;
            }
        }
    })
    .await
    .unwrap_or(false);
    End::Completed { clean: answered }
}

struct Counts {
    all_in: bool,
    all_back: bool,
    live_at_end: usize,
    open_secs: f64,
    connect_errors: u64,
    first_errors: Vec<String>,
    clients_by_closes: BTreeMap<usize, u64>,
}

/// Totals for a group of sessions.
#[derive(Default)]
struct Group {
    sessions: u64,
    completed: u64,
    unclean_close: u64,
    closes: BTreeMap<u16, u64>,
    dropped: u64,
    sent: u64,
    lost: u64,
    /// Lost on sessions open to the end (the rest were in flight when the
    /// connection ended).
    lost_open: u64,
    duplicated: u64,
    reordered: u64,
    corrupted: u64,
    first_drop: Option<String>,
}

impl Group {
    fn add(&mut self, s: &Session) {
        self.sessions += 1;
        match &s.end {
            End::Completed { clean } => {
                self.completed += 1;
                self.unclean_close += u64::from(!clean);
            }
            End::Closed(code) => *self.closes.entry(*code).or_default() += 1,
            End::Dropped(why) => {
                self.dropped += 1;
                self.first_drop.get_or_insert_with(|| why.clone());
            }
        }
        self.sent += s.sent;
        self.lost += s.lost();
        if matches!(s.end, End::Completed { .. }) {
            self.lost_open += s.lost();
        }
        self.duplicated += s.duplicated;
        self.reordered += s.reordered;
        self.corrupted += s.corrupted;
    }

    fn json(&self) -> Value {
        json!({
            "sessions": self.sessions,
            "open_to_the_end": self.completed,
            "close_1000_unanswered": self.unclean_close,
            "closed_by_berth": self.closes.iter().map(|(c, n)| (c.to_string(), json!(n))).collect::<serde_json::Map<_, _>>(),
            "dropped_without_close": self.dropped,
            "first_drop": self.first_drop,
            "messages_sent": self.sent,
            "lost": self.lost,
            "lost_open_to_the_end": self.lost_open,
            "duplicated": self.duplicated,
            "reordered": self.reordered,
            "corrupted": self.corrupted,
        })
    }
}

fn within(o: &SoakOpts, what: &str, start: u64, end: u64, failures: &mut Vec<String>) -> f64 {
    let change = (end as f64 - start as f64) / (start.max(1) as f64);
    if change.abs() > o.tolerance {
        failures.push(format!(
            "berth's {what} went from {start} to {end} ({:+.1} %, more than {:.0} %)",
            change * 100.0,
            o.tolerance * 100.0
        ));
    }
    round3(change * 100.0)
}

fn verdict(o: &SoakOpts, sessions: &[Session], c: Counts, usage: [Option<Usage>; 4]) -> Value {
    let [idle, start, end, after] = usage;
    let mut untouched = Group::default();
    let mut drained = Group::default();
    let mut killed = Group::default();
    let mut by_backend: BTreeMap<&str, Group> = BTreeMap::new();
    for s in sessions {
        by_backend.entry(&s.backend).or_default().add(s);
        let is = |list: &[String]| list.contains(&s.backend);
        let closed = !matches!(s.end, End::Completed { .. });
        if is(&o.drained) {
            drained.add(s);
        } else if is(&o.killed) && closed {
            // Open at the kill. Sessions that reached the restarted backend
            // and stayed open are untouched.
            killed.add(s);
        } else {
            untouched.add(s);
        }
    }
    let all = {
        let mut g = Group::default();
        sessions.iter().for_each(|s| g.add(s));
        g
    };

    let mut failures = Vec::new();
    if !c.all_in {
        failures.push(format!(
            "not every client connected at the start ({} errors)",
            c.connect_errors
        ));
    }
    if !c.all_back {
        failures.push(format!(
            "{} of {} clients connected at the end",
            c.live_at_end, o.connections
        ));
    }
    let u = &untouched;
    if u.lost + u.duplicated + u.reordered + u.corrupted > 0 {
        failures.push(format!(
            "untouched connections: {} lost, {} duplicated, {} reordered, {} corrupted",
            u.lost, u.duplicated, u.reordered, u.corrupted
        ));
    }
    if !u.closes.is_empty() || u.dropped > 0 || u.unclean_close > 0 {
        failures.push(format!(
            "untouched connections ended early: closes {:?}, {} dropped, {} Close 1000 unanswered",
            u.closes, u.dropped, u.unclean_close
        ));
    }
    for (name, group, code, ids) in [
        ("drained", &drained, 1012u16, &o.drained),
        ("killed", &killed, 1014u16, &o.killed),
    ] {
        if ids.is_empty() {
            continue;
        }
        let with_code = group.closes.get(&code).copied().unwrap_or(0);
        if with_code == 0 {
            failures.push(format!("no connection on the {name} backend got {code}"));
        }
        if with_code != group.sessions {
            failures.push(format!(
                "{name} backend: {} sessions, {with_code} closed with {code} (others: closes {:?}, {} dropped, {} open to the end)",
                group.sessions, group.closes, group.dropped, group.completed
            ));
        }
    }
    if all.duplicated + all.reordered + all.corrupted > 0 {
        failures.push(format!(
            "all connections: {} duplicated, {} reordered, {} corrupted",
            all.duplicated, all.reordered, all.corrupted
        ));
    }
    let mut fd_change = Value::Null;
    let mut rss_change = Value::Null;
    match (start, end) {
        (Some(s), Some(e)) => {
            fd_change = json!(within(o, "open descriptors", s.fds, e.fds, &mut failures));
            rss_change = json!(within(o, "RSS (KiB)", s.rss_kb, e.rss_kb, &mut failures));
        }
        _ if o.berth_pid.is_some() => failures.push("could not read berth's /proc entries".into()),
        _ => {}
    }
    json!({
        "mode": "soak",
        "connections": o.connections,
        "duration_secs": o.duration.as_secs_f64(),
        "interval_secs": o.interval.as_secs_f64(),
        "message_size": o.size,
        "open_secs": round3(c.open_secs),
        "connect_errors": c.connect_errors,
        "first_connect_errors": c.first_errors,
        "connected_at_end": c.live_at_end,
        "clients_by_closes": c.clients_by_closes.iter().map(|(k, n)| (k.to_string(), json!(n))).collect::<serde_json::Map<_, _>>(),
        "untouched": untouched.json(),
        "drained": drained.json(),
        "killed": killed.json(),
        "all": all.json(),
        "by_backend": by_backend.iter().map(|(b, g)| (b.to_string(), g.json())).collect::<serde_json::Map<_, _>>(),
        "berth": {
            "before_clients": usage_json(idle),
            "start": usage_json(start),
            "end": usage_json(end),
            "after_clients": usage_json(after),
            "fds_change_percent": fd_change,
            "rss_change_percent": rss_change,
        },
        "pass": failures.is_empty(),
        "failures": failures,
    })
}

/// The soak report's failures, if any, as an error (after it is printed).
pub fn check(report: &Value) -> anyhow::Result<()> {
    match report["failures"].as_array() {
        Some(f) if !f.is_empty() => Err(anyhow!(
            "soak criteria failed: {}",
            f.iter()
                .filter_map(Value::as_str)
                .collect::<Vec<_>>()
                .join("; ")
        )),
        _ => Ok(()),
    }
}
