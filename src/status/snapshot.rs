//! The JSON documents: `/admin/pools`, and the status snapshot that
//! `/admin/events` sends (the pools document with rates, drains, the close
//! history, process facts and the last reload). Also the counter reading
//! the rates are computed from.

use std::path::Path;

use prometheus::core::Collector;
use serde_json::{json, Map, Value};

use super::process::FdUsage;
use super::rates::{BackendCounts, History, Reading, TlsCounts, BUCKET_SECONDS, HISTORY_SECONDS};
use crate::balancer::{Backend, BackendState, DrainSource};
use crate::lifecycle::DrainProgress;
use crate::metrics::Metrics;
use crate::reload::LastReload;
use crate::routing::Runtime;

/// `/admin/pools`: for each pool (by name), its balance and affinity mode,
/// its authentication methods (`jwt`, `forward`, in the order they run)
/// and its backends' id, address, state, health, live WebSockets, weight,
/// `max_connections` (`null`: unlimited), `slow_start` (the factor on its
/// weight while it ramps up, `null` at full weight), `drained_by` (`admin`,
/// `config`), `shedding` (a rebalance is moving its excess) and
/// `discovered` (found by DNS).
pub fn pools_document(runtime: &Runtime) -> Value {
    let mut pools = Map::new();
    let mut names: Vec<&String> = runtime.pools.keys().collect();
    names.sort();
    for name in names {
        let Some(pool) = runtime.pools.get(name) else {
            continue;
        };
        let backends: Vec<Value> = pool
            .backends
            .iter()
            .map(|b| {
                json!({
                    "id": b.id,
                    "address": b.address,
                    "state": b.state().as_str(),
                    "healthy": b.state() != BackendState::Down,
                    "live_connections": b.live_connections(),
                    "weight": b.weight(),
                    "max_connections": b.max_connections(),
                    "slow_start": slow_start(b),
                    "drained_by": drained_by(b),
                    "shedding": b.is_shedding(),
                    "discovered": b.discovered,
                })
            })
            .collect();
        let auth = &pool.config.auth;
        let methods: Vec<&str> = [
            ("jwt", auth.jwt.is_some()),
            ("forward", auth.forward.is_some()),
        ]
        .into_iter()
        .filter_map(|(method, on)| on.then_some(method))
        .collect();
        pools.insert(
            name.clone(),
            json!({
                "balance": pool.config.balance.as_str(),
                "affinity": pool.config.affinity.mode(),
                "auth": methods,
                "backends": backends,
            }),
        );
    }
    json!({ "pools": pools })
}

/// The value of every series of a metric family, with its labels.
fn series(collector: &dyn Collector) -> Vec<(Vec<(String, String)>, f64)> {
    let mut out = Vec::new();
    for family in collector.collect() {
        for m in family.get_metric() {
            let labels = m
                .get_label()
                .iter()
                .map(|l| (l.get_name().to_string(), l.get_value().to_string()))
                .collect();
            // A family is either counters or gauges; the other reads 0.
            let value = m.get_counter().get_value() + m.get_gauge().get_value();
            out.push((labels, value));
        }
    }
    out
}

fn label<'a>(labels: &'a [(String, String)], name: &str) -> &'a str {
    labels
        .iter()
        .find(|(n, _)| n == name)
        .map_or("", |(_, v)| v.as_str())
}

/// Reads every counter the rates come from: one collect per family (which
/// creates no series), plus each backend's own relay counters.
pub fn read(metrics: &Metrics, runtime: &Runtime) -> Reading {
    let mut reading = Reading::default();
    for pool in runtime.pools.values() {
        for b in &pool.backends {
            let c = &b.counters;
            let dirs = [&c.client_to_backend, &c.backend_to_client];
            reading.backends.insert(
                (b.pool.clone(), b.id.clone()),
                BackendCounts {
                    upgrades: 0,
                    messages: dirs.map(|d| {
                        d.backend_messages
                            .load(std::sync::atomic::Ordering::Relaxed)
                    }),
                    bytes: dirs.map(|d| d.bytes.get()),
                },
            );
        }
    }
    for (labels, value) in series(&metrics.ws_upgrades) {
        if label(&labels, "result") != "ok" {
            continue;
        }
        let key = (
            label(&labels, "pool").to_string(),
            label(&labels, "backend").to_string(),
        );
        if let Some(counts) = reading.backends.get_mut(&key) {
            counts.upgrades = value as u64;
        }
    }
    for (labels, value) in series(&metrics.ws_closes) {
        let key = (
            label(&labels, "pool").to_string(),
            label(&labels, "code").to_string(),
        );
        *reading.closes.entry(key).or_default() += value as u64;
    }
    let mut tls = TlsCounts::default();
    for (labels, value) in series(&metrics.tls_handshakes) {
        tls.all += value as u64;
        if label(&labels, "result") == "ok" {
            tls.ok += value as u64;
        }
    }
    tls.resumed = series(&metrics.tls_resumed)
        .iter()
        .map(|(_, v)| *v as u64)
        .sum();
    reading.tls = tls;
    reading
}

/// Client connections open on every listener.
pub fn connections_open(metrics: &Metrics) -> u64 {
    series(&metrics.connections_active)
        .iter()
        .map(|(_, v)| v.max(0.0) as u64)
        .sum()
}

/// What a snapshot is made of besides the routing table and the history.
pub struct Facts<'a> {
    pub version: &'a str,
    pub commit: &'a str,
    pub config_path: Option<&'a Path>,
    /// Unix time, seconds.
    pub time: f64,
    pub token_required: bool,
    pub connections_open: u64,
    pub websockets_open: u64,
    pub fds: Option<FdUsage>,
    pub drains: Vec<DrainProgress>,
    pub last_reload: LastReload,
}

/// Rounds a rate for the wire (two decimals are plenty for a page).
fn round(v: f64) -> f64 {
    (v * 100.0).round() / 100.0
}

fn directions(v: [f64; 2]) -> Value {
    json!({ "client_to_backend": round(v[0]), "backend_to_client": round(v[1]) })
}

/// The factor on a ramping backend's weight (two decimals), `null` at full
/// weight.
fn slow_start(b: &Backend) -> Value {
    let f = b.slow_start_factor();
    if f < 1.0 {
        json!((f * 100.0).floor() / 100.0)
    } else {
        Value::Null
    }
}

/// Who drains a backend: `admin`, `config`, both or neither.
pub fn drained_by(b: &Backend) -> Vec<&'static str> {
    [DrainSource::Admin, DrainSource::Config]
        .into_iter()
        .filter(|s| b.drained_by(*s))
        .map(DrainSource::as_str)
        .collect()
}

/// The status snapshot: [`pools_document`] with, per backend, its weighted
/// share and rates, per pool its live total and close history, plus the
/// drains, the process facts and the last reload.
pub fn snapshot(runtime: &Runtime, history: &History, facts: Facts<'_>) -> Value {
    let mut doc = pools_document(runtime);
    if let Some(pools) = doc.get_mut("pools").and_then(Value::as_object_mut) {
        for (name, pool_doc) in pools.iter_mut() {
            let Some(pool) = runtime.pools.get(name) else {
                continue;
            };
            // The share of new connections each backend should get: its
            // weight among the backends taking connections.
            let up_weight: u64 = pool
                .backends
                .iter()
                .filter(|b| b.state() == BackendState::Up)
                .map(|b| u64::from(b.weight()))
                .sum();
            let live: u64 = pool.backends.iter().map(|b| b.live_connections()).sum();
            let backends = pool_doc.get_mut("backends").and_then(Value::as_array_mut);
            for (b, entry) in pool.backends.iter().zip(backends.into_iter().flatten()) {
                let share = if b.state() == BackendState::Up && up_weight > 0 {
                    f64::from(b.weight()) / up_weight as f64
                } else {
                    0.0
                };
                let r = history.backend(name, &b.id);
                if let Some(obj) = entry.as_object_mut() {
                    obj.insert("weighted_share".into(), json!((share * 1e4).round() / 1e4));
                    obj.insert("upgrades_per_second".into(), json!(round(r.upgrades)));
                    obj.insert("messages_per_second".into(), directions(r.messages));
                    obj.insert("bytes_per_second".into(), directions(r.bytes));
                }
            }
            let closes = history.closes(name);
            let totals: Map<String, Value> = closes
                .iter()
                .map(|(code, buckets)| (code.clone(), json!(buckets.iter().sum::<u64>())))
                .collect();
            if let Some(obj) = pool_doc.as_object_mut() {
                obj.insert("live_connections".into(), json!(live));
                obj.insert(
                    "closes".into(),
                    json!({
                        "window_seconds": HISTORY_SECONDS,
                        "bucket_seconds": BUCKET_SECONDS,
                        "by_code": closes,
                        "totals": totals,
                    }),
                );
            }
        }
    }
    let drains: Vec<Value> = facts
        .drains
        .iter()
        .map(|d| {
            json!({
                "pool": d.pool,
                "backend": d.backend,
                "total": d.total,
                "closed": d.closed,
                "window_seconds": round(d.window.as_secs_f64()),
                "elapsed_seconds": round(d.elapsed.as_secs_f64()),
                "remaining_seconds": round(d.remaining().as_secs_f64()),
                "finished": d.finished(),
            })
        })
        .collect();
    let fds = facts
        .fds
        .map(|f| json!({ "open": f.open, "limit": f.limit, "reserve": f.reserve, "headroom": f.headroom() }));
    if let Some(obj) = doc.as_object_mut() {
        obj.insert("version".into(), json!(facts.version));
        obj.insert("commit".into(), json!(facts.commit));
        obj.insert(
            "config".into(),
            json!(facts.config_path.map(|p| p.display().to_string())),
        );
        obj.insert("time".into(), json!((facts.time * 1000.0).round() / 1000.0));
        obj.insert("token_required".into(), json!(facts.token_required));
        obj.insert("drains".into(), json!(drains));
        obj.insert(
            "process".into(),
            json!({
                "connections_open": facts.connections_open,
                "websockets_open": facts.websockets_open,
                "fds": fds,
                "tls": {
                    "handshakes_per_second": round(history.tls_per_second()),
                    "resumed_share": history.tls_resumed_share().map(|s| (s * 1e4).round() / 1e4),
                },
            }),
        );
        obj.insert("last_reload".into(), json!(facts.last_reload));
    }
    doc
}
