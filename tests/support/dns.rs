//! A small DNS server on 127.0.0.1 (UDP) whose answers a test changes: A
//! and AAAA records for the names it is given (every other name is
//! NXDOMAIN), or, on demand, SERVFAIL for everything or no answer at all.
//! Messages are parsed and built with hickory's protocol types, the same
//! library berth resolves with, but nothing of berth's own.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use hickory_resolver::proto::op::{Message, MessageType, ResponseCode};
use hickory_resolver::proto::rr::rdata::{A, AAAA};
use hickory_resolver::proto::rr::{RData, Record, RecordType};
use tokio::net::UdpSocket;
use tokio::task::JoinHandle;

/// How the server answers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    Answer,
    /// SERVFAIL to every query.
    Fail,
    /// No answer at all (a dead server, as the resolver sees it).
    Silent,
}

struct State {
    /// Lower-case name without the final dot -> addresses.
    records: HashMap<String, Vec<IpAddr>>,
    ttl: u32,
    mode: Mode,
}

pub struct DnsServer {
    pub addr: SocketAddr,
    state: Arc<Mutex<State>>,
    queries: Arc<AtomicUsize>,
    task: JoinHandle<()>,
}

impl Drop for DnsServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl DnsServer {
    pub async fn start() -> DnsServer {
        let socket = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let addr = socket.local_addr().unwrap();
        let state = Arc::new(Mutex::new(State {
            records: HashMap::new(),
            ttl: 300,
            mode: Mode::Answer,
        }));
        let queries = Arc::new(AtomicUsize::new(0));
        let (st, q) = (Arc::clone(&state), Arc::clone(&queries));
        let task = tokio::spawn(async move {
            let mut buf = vec![0u8; 4096];
            loop {
                let Ok((n, from)) = socket.recv_from(&mut buf).await else {
                    return;
                };
                let Ok(request) = Message::from_vec(&buf[..n]) else {
                    continue;
                };
                q.fetch_add(1, Ordering::SeqCst);
                let reply = {
                    let state = st.lock().unwrap();
                    answer(&request, &state)
                };
                if let Some(bytes) = reply.and_then(|m| m.to_vec().ok()) {
                    let _ = socket.send_to(&bytes, from).await;
                }
            }
        });
        DnsServer {
            addr,
            state,
            queries,
            task,
        }
    }

    /// `name` now resolves to `ips` (none: the name has no address).
    pub fn set(&self, name: &str, ips: &[&str]) {
        let ips = ips.iter().map(|ip| ip.parse().unwrap()).collect();
        self.state.lock().unwrap().records.insert(key(name), ips);
    }

    pub fn set_ttl(&self, ttl: u32) {
        self.state.lock().unwrap().ttl = ttl;
    }

    pub fn mode(&self, mode: Mode) {
        self.state.lock().unwrap().mode = mode;
    }

    /// Queries received so far.
    pub fn queries(&self) -> usize {
        self.queries.load(Ordering::SeqCst)
    }
}

fn key(name: &str) -> String {
    name.trim_end_matches('.').to_ascii_lowercase()
}

fn answer(request: &Message, state: &State) -> Option<Message> {
    if state.mode == Mode::Silent {
        return None;
    }
    let mut reply = Message::new();
    reply
        .set_id(request.id())
        .set_message_type(MessageType::Response)
        .set_op_code(request.op_code())
        .set_recursion_desired(request.recursion_desired())
        .set_recursion_available(true)
        .set_authoritative(true);
    for q in request.queries() {
        reply.add_query(q.clone());
    }
    if state.mode == Mode::Fail {
        reply.set_response_code(ResponseCode::ServFail);
        return Some(reply);
    }
    for q in request.queries() {
        let Some(ips) = state.records.get(&key(&q.name().to_ascii())) else {
            reply.set_response_code(ResponseCode::NXDomain);
            continue;
        };
        for ip in ips {
            let rdata = match (ip, q.query_type()) {
                (IpAddr::V4(v4), RecordType::A) => RData::A(A(*v4)),
                (IpAddr::V6(v6), RecordType::AAAA) => RData::AAAA(AAAA(*v6)),
                _ => continue,
            };
            reply.add_answer(Record::from_rdata(q.name().clone(), state.ttl, rdata));
        }
    }
    Some(reply)
}
