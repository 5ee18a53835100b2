//! Metric names and the one registry they live in.
//!
//! [`Metrics`] owns a `prometheus::Registry` (no global registration, so
//! tests can run several proxies in one process) and hands labelled handles
//! to the components that count. Hot-path counters (per frame) are resolved
//! once per pool and backend into [`RelayCounters`]; nothing per frame takes
//! a lock or allocates.

use std::sync::atomic::AtomicU64;
use std::sync::Arc;

use prometheus::{
    Encoder, Gauge, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec,
    Opts, Registry, TextEncoder,
};

/// Label values for `direction`.
pub const CLIENT_TO_BACKEND: &str = "client_to_backend";
pub const BACKEND_TO_CLIENT: &str = "backend_to_client";

/// Label values for `opcode`, in [`opcode_index`] order.
pub const OPCODE_LABELS: [&str; 7] = [
    "continuation",
    "text",
    "binary",
    "close",
    "ping",
    "pong",
    "other",
];

/// Maps a WebSocket opcode (RFC 6455 §5.2, §11.8) to its slot in
/// [`OPCODE_LABELS`]. The numbers are spelled out here because metrics is
/// the bottom layer and does not import `ws`.
#[inline]
pub fn opcode_index(op: u8) -> usize {
    // A table rather than a match: the relay calls this once per frame.
    const SLOTS: [u8; 16] = [0, 1, 2, 6, 6, 6, 6, 6, 3, 4, 5, 6, 6, 6, 6, 6];
    SLOTS
        .get(usize::from(op))
        .map_or(6, |&slot| usize::from(slot))
}

/// Counter handles for one direction of a relay, resolved once per pool and
/// backend so that counting takes no lock and no allocation.
#[derive(Clone)]
pub struct DirCounters {
    pub bytes: IntCounter,
    /// Per pool (the exported series).
    pub messages: IntCounter,
    /// Per backend, not exported: the status page's messages per second.
    pub backend_messages: Arc<AtomicU64>,
    /// Indexed by [`opcode_index`].
    pub frames: [IntCounter; 7],
}

/// Relay counter handles for both directions.
#[derive(Clone)]
pub struct RelayCounters {
    pub client_to_backend: DirCounters,
    pub backend_to_client: DirCounters,
}

/// Buckets for WebSocket connection lifetimes: 1 s to 24 h.
const DURATION_BUCKETS: &[f64] = &[
    1.0, 5.0, 15.0, 30.0, 60.0, 300.0, 900.0, 1800.0, 3600.0, 7200.0, 14400.0, 43200.0, 86400.0,
];

/// Buckets for HTTP requests and TLS handshakes: 1 ms to 60 s.
const LATENCY_BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
];

#[derive(Debug, thiserror::Error)]
pub enum MetricsError {
    #[error("metric registration failed: {0}")]
    Register(#[from] prometheus::Error),
}

/// Every metric berth exports.
#[derive(Clone)]
pub struct Metrics {
    pub registry: Registry,
    pub connections_active: IntGaugeVec,
    pub connections_refused: IntCounterVec,
    pub client_connections: IntCounterVec,
    pub requests_rejected: IntCounterVec,
    pub ws_connections_active: IntGaugeVec,
    pub ws_upgrades: IntCounterVec,
    pub ws_opened: IntCounterVec,
    pub ws_duration: HistogramVec,
    pub ws_messages: IntCounterVec,
    pub ws_frames: IntCounterVec,
    pub ws_bytes: IntCounterVec,
    pub ws_closes: IntCounterVec,
    pub ws_idle_timeouts: IntCounterVec,
    pub ws_heartbeat_failures: IntCounterVec,
    pub ws_drained: IntCounterVec,
    pub ws_send_timeouts: IntCounterVec,
    pub ws_rebalanced: IntCounterVec,
    pub ws_max_age: IntCounterVec,
    pub dns_lookups: IntCounterVec,
    pub affinity: IntCounterVec,
    pub backend_up: IntGaugeVec,
    pub backend_state: IntGaugeVec,
    pub health_checks: IntCounterVec,
    pub http_requests: IntCounterVec,
    pub http_duration: HistogramVec,
    pub tls_handshakes: IntCounterVec,
    pub tls_resumed: IntCounterVec,
    pub tls_duration: HistogramVec,
    pub config_reloads: IntCounterVec,
    pub config_last_reload_success: Gauge,
    pub build_info: IntGauge,
    pub auth: IntCounterVec,
    pub auth_jwks_refresh: IntCounterVec,
}

fn counter(
    r: &Registry,
    name: &str,
    help: &str,
    labels: &[&str],
) -> Result<IntCounterVec, MetricsError> {
    let c = IntCounterVec::new(Opts::new(name, help), labels)?;
    r.register(Box::new(c.clone()))?;
    Ok(c)
}

fn gauge(
    r: &Registry,
    name: &str,
    help: &str,
    labels: &[&str],
) -> Result<IntGaugeVec, MetricsError> {
    let g = IntGaugeVec::new(Opts::new(name, help), labels)?;
    r.register(Box::new(g.clone()))?;
    Ok(g)
}

fn histogram(
    r: &Registry,
    name: &str,
    help: &str,
    labels: &[&str],
    buckets: &[f64],
) -> Result<HistogramVec, MetricsError> {
    let h = HistogramVec::new(
        HistogramOpts::new(name, help).buckets(buckets.to_vec()),
        labels,
    )?;
    r.register(Box::new(h.clone()))?;
    Ok(h)
}

impl Metrics {
    pub fn new() -> Result<Metrics, MetricsError> {
        let r = Registry::new();
        let m = Metrics {
            connections_active: gauge(
                &r,
                "berth_connections_active",
                "Client connections open, per listener.",
                &["listener"],
            )?,
            connections_refused: counter(
                &r,
                "berth_connections_refused_total",
                "Client connections closed right after accept, unread, by reason: fd_limit, listener_full or per_ip.",
                &["listener", "reason"],
            )?,
            client_connections: counter(
                &r,
                "berth_client_connections_total",
                "Client connections served, by the protocol they spoke (http1, http2), counted once the first request head (HTTP/1.1) or the connection preface (HTTP/2) has arrived.",
                &["listener", "protocol"],
            )?,
            requests_rejected: counter(
                &r,
                "berth_requests_rejected_total",
                "Requests berth answered itself before routing, by status (400, 414, 431); on the admin listener, 503 for an /admin/events stream over its cap.",
                &["listener", "status"],
            )?,
            ws_connections_active: gauge(
                &r,
                "berth_websocket_connections_active",
                "Live upgraded WebSocket connections.",
                &["pool", "backend"],
            )?,
            ws_upgrades: counter(
                &r,
                "berth_websocket_upgrades_total",
                "WebSocket upgrade attempts by result.",
                &["pool", "backend", "result"],
            )?,
            ws_opened: counter(
                &r,
                "berth_websocket_opened_total",
                "WebSockets established, by the protocol the client used (http1: an HTTP/1.1 upgrade; http2: an RFC 8441 extended CONNECT).",
                &["pool", "protocol"],
            )?,
            ws_duration: histogram(
                &r,
                "berth_websocket_connection_duration_seconds",
                "Lifetime of finished WebSocket connections.",
                &["pool", "backend"],
                DURATION_BUCKETS,
            )?,
            ws_messages: counter(
                &r,
                "berth_websocket_messages_total",
                "Complete WebSocket data messages relayed.",
                &["pool", "direction"],
            )?,
            ws_frames: counter(
                &r,
                "berth_websocket_frames_total",
                "WebSocket frames relayed, by opcode.",
                &["pool", "direction", "opcode"],
            )?,
            ws_bytes: counter(
                &r,
                "berth_websocket_bytes_total",
                "WebSocket bytes relayed (frame headers included).",
                &["pool", "backend", "direction"],
            )?,
            ws_closes: counter(
                &r,
                "berth_websocket_closes_total",
                "WebSocket connection ends by initiator and close code.",
                &["pool", "initiator", "code"],
            )?,
            ws_idle_timeouts: counter(
                &r,
                "berth_websocket_idle_timeouts_total",
                "Connections closed by berth after idle_timeout.",
                &["pool"],
            )?,
            ws_heartbeat_failures: counter(
                &r,
                "berth_websocket_heartbeat_failures_total",
                "Clients that did not answer berth's ping within pong_timeout.",
                &["pool"],
            )?,
            ws_drained: counter(
                &r,
                "berth_websocket_drained_total",
                "Connections closed with 1012 because their backend was drained or removed.",
                &["pool", "backend"],
            )?,
            ws_send_timeouts: counter(
                &r,
                "berth_websocket_send_timeouts_total",
                "Peers dropped for accepting no bytes within send_timeout, by side.",
                &["pool", "side"],
            )?,
            ws_rebalanced: counter(
                &r,
                "berth_websocket_rebalanced_total",
                "Connections closed with 1012 by a rebalance, by the backend they left.",
                &["pool", "backend"],
            )?,
            ws_max_age: counter(
                &r,
                "berth_websocket_max_age_closes_total",
                "Connections closed with 1012 at max_connection_age.",
                &["pool"],
            )?,
            dns_lookups: counter(
                &r,
                "berth_dns_lookups_total",
                "DNS discovery lookups by result (success, empty, failure); only a success changes the backends.",
                &["pool", "result"],
            )?,
            affinity: counter(
                &r,
                "berth_affinity_total",
                "Affinity decisions by mode and result.",
                &["pool", "mode", "result"],
            )?,
            backend_up: gauge(
                &r,
                "berth_backend_up",
                "1 when the backend takes new connections, else 0.",
                &["pool", "backend"],
            )?,
            backend_state: gauge(
                &r,
                "berth_backend_state",
                "Backend state: 1 for the current state, 0 for the others.",
                &["pool", "backend", "state"],
            )?,
            health_checks: counter(
                &r,
                "berth_health_checks_total",
                "Active health checks by result.",
                &["pool", "backend", "result"],
            )?,
            http_requests: counter(
                &r,
                "berth_http_requests_total",
                "Plain HTTP requests proxied, by status class.",
                &["pool", "backend", "status_class"],
            )?,
            http_duration: histogram(
                &r,
                "berth_http_request_duration_seconds",
                "Time to the response head of proxied HTTP requests.",
                &["pool"],
                LATENCY_BUCKETS,
            )?,
            tls_handshakes: counter(
                &r,
                "berth_tls_handshakes_total",
                "TLS handshakes on listeners by result.",
                &["listener", "result"],
            )?,
            tls_resumed: counter(
                &r,
                "berth_tls_resumed_handshakes_total",
                "Successful TLS handshakes that resumed an earlier session.",
                &["listener"],
            )?,
            tls_duration: histogram(
                &r,
                "berth_tls_handshake_duration_seconds",
                "Duration of successful TLS handshakes.",
                &["listener"],
                LATENCY_BUCKETS,
            )?,
            config_reloads: counter(
                &r,
                "berth_config_reloads_total",
                "Configuration reloads by result.",
                &["result"],
            )?,
            config_last_reload_success: {
                let g = Gauge::new(
                    "berth_config_last_reload_success_timestamp_seconds",
                    "Unix time of the last successful config load.",
                )?;
                r.register(Box::new(g.clone()))?;
                g
            },
            build_info: {
                let g = IntGauge::with_opts(
                    Opts::new(
                        "berth_build_info",
                        "Always 1; labelled with the berth version.",
                    )
                    .const_label("version", env!("CARGO_PKG_VERSION")),
                )?;
                r.register(Box::new(g.clone()))?;
                g.set(1);
                g
            },
            auth: counter(
                &r,
                "berth_auth_total",
                "Authentication decisions by method (jwt, forward) and result.",
                &["pool", "method", "result"],
            )?,
            auth_jwks_refresh: counter(
                &r,
                "berth_auth_jwks_refresh_total",
                "JWKS fetches by result; a failed one keeps the last good key set.",
                &["pool", "result"],
            )?,
            registry: r,
        };
        #[cfg(target_os = "linux")]
        m.registry.register(Box::new(
            prometheus::process_collector::ProcessCollector::for_self(),
        ))?;
        Ok(m)
    }

    /// The Prometheus text exposition of every metric.
    pub fn render(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(16 * 1024);
        // Encoding into a Vec cannot fail for the text format.
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut out);
        out
    }

    /// Relay counter handles for one backend of one pool.
    pub fn relay_counters(&self, pool: &str, backend: &str) -> RelayCounters {
        let dir = |direction: &str| DirCounters {
            bytes: self.ws_bytes.with_label_values(&[pool, backend, direction]),
            messages: self.ws_messages.with_label_values(&[pool, direction]),
            backend_messages: Arc::default(),
            frames: OPCODE_LABELS
                .map(|op| self.ws_frames.with_label_values(&[pool, direction, op])),
        };
        RelayCounters {
            client_to_backend: dir(CLIENT_TO_BACKEND),
            backend_to_client: dir(BACKEND_TO_CLIENT),
        }
    }
}

/// The `code` label for a close: registered RFC 6455 / IANA codes by number,
/// anything else folded into `other`, and no Close frame at all `abnormal`.
pub fn close_code_label(code: Option<u16>) -> &'static str {
    match code {
        None => "abnormal",
        Some(c) => match c {
            1000 => "1000",
            1001 => "1001",
            1002 => "1002",
            1003 => "1003",
            1005 => "1005",
            1007 => "1007",
            1008 => "1008",
            1009 => "1009",
            1010 => "1010",
            1011 => "1011",
            1012 => "1012",
            1013 => "1013",
            1014 => "1014",
            _ => "other",
        },
    }
}

/// `1xx` .. `5xx` for `status_class`.
pub fn status_class(status: u16) -> &'static str {
    match status {
        100..=199 => "1xx",
        200..=299 => "2xx",
        300..=399 => "3xx",
        400..=499 => "4xx",
        _ => "5xx",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn close_codes_fold_into_bounded_labels() {
        assert_eq!(close_code_label(None), "abnormal");
        assert_eq!(close_code_label(Some(1012)), "1012");
        assert_eq!(close_code_label(Some(4000)), "other");
        assert_eq!(close_code_label(Some(1004)), "other");
    }

    #[test]
    fn dashboard_queries_only_metrics_that_exist() {
        let dashboard = include_str!("../config/grafana/berth-dashboard.json");
        let source = include_str!("metrics.rs");
        let mut names = 0;
        for (i, _) in dashboard.match_indices("berth_") {
            let name: String = dashboard[i..]
                .chars()
                .take_while(|c| c.is_ascii_lowercase() || *c == '_')
                .collect();
            let family = name.trim_end_matches("_bucket");
            if family == "berth_" || family.starts_with("berth-") {
                continue;
            }
            names += 1;
            assert!(
                source.contains(&format!("\"{family}\"")),
                "dashboard uses unknown metric {family}"
            );
        }
        assert!(names > 10);
    }

    /// The dashboard is one Grafana dashboard JSON document that imports:
    /// unique panel ids, panels on the 24-column grid without overlaps,
    /// every query with its own `refId` against the dashboard's data
    /// source. And it charts every family berth registers but those listed
    /// here, each with the reason it is left out.
    #[test]
    fn the_dashboard_is_importable_and_charts_every_metric() {
        const NOT_CHARTED: [&str; 3] = [
            // Messages per second tell the same story for an operator.
            "berth_websocket_frames_total",
            // The backend state timeline shows up, down and draining.
            "berth_backend_up",
            // A point in time, not a series worth a chart; the reloads
            // panel shows each load.
            "berth_config_last_reload_success_timestamp_seconds",
        ];
        let text = include_str!("../config/grafana/berth-dashboard.json");
        let dashboard: serde_json::Value = serde_json::from_str(text).unwrap();
        assert_eq!(dashboard["uid"], "berth-overview");
        let panels = dashboard["panels"].as_array().unwrap();
        let mut ids = std::collections::BTreeSet::new();
        let mut cells = std::collections::BTreeSet::new();
        for panel in panels {
            let title = panel["title"].as_str().unwrap();
            assert!(ids.insert(panel["id"].as_u64().unwrap()), "{title}: id");
            assert!(panel["type"].is_string(), "{title}: type");
            assert_eq!(panel["datasource"]["uid"], "${datasource}", "{title}");
            let at = |k: &str| panel["gridPos"][k].as_u64().unwrap();
            let (x, y, w, h) = (at("x"), at("y"), at("w"), at("h"));
            assert!(w > 0 && h > 0 && x + w <= 24, "{title}: gridPos");
            for cell in (x..x + w).flat_map(|cx| (y..y + h).map(move |cy| (cx, cy))) {
                assert!(cells.insert(cell), "{title} overlaps another panel");
            }
            let targets = panel["targets"].as_array().unwrap();
            let mut refs = std::collections::BTreeSet::new();
            assert!(!targets.is_empty(), "{title}: no query");
            for t in targets {
                assert!(refs.insert(t["refId"].as_str().unwrap()), "{title}: refId");
                assert!(!t["expr"].as_str().unwrap().is_empty(), "{title}: expr");
                assert_eq!(t["datasource"]["uid"], "${datasource}", "{title}");
            }
        }
        let registered = every_family(&Metrics::new().unwrap());
        let uncharted: Vec<&String> = registered
            .iter()
            .filter(|n| n.starts_with("berth_") && !NOT_CHARTED.contains(&n.as_str()))
            .filter(|n| !text.contains(n.as_str()))
            .collect();
        assert!(uncharted.is_empty(), "not on the dashboard: {uncharted:?}");
        for name in NOT_CHARTED {
            assert!(registered.contains(name), "{name} is not a metric");
        }
    }

    /// The metric names in the first column of the README's Monitoring
    /// table, with the row each is named in.
    fn readme_metric_rows() -> Vec<(&'static str, &'static str)> {
        let readme = include_str!("../README.md");
        let section = readme
            .split("\n## Monitoring\n")
            .nth(1)
            .and_then(|rest| rest.split("\n## ").next())
            .and_then(|rest| rest.split("\n### ").next())
            .expect("README has a Monitoring section");
        section
            .lines()
            .filter_map(|row| {
                let cell = row.strip_prefix("| `")?;
                Some((cell.split('`').next()?, row))
            })
            .collect()
    }

    /// Every family the registry holds, each with a series, so that
    /// `gather` lists them all (it leaves out a labelled family with no
    /// series yet). The pattern names every field without `..`: a metric
    /// added to [`Metrics`] does not compile until it is listed here.
    fn every_family(m: &Metrics) -> std::collections::BTreeSet<String> {
        use prometheus::core::Collector;
        fn labels(c: &dyn Collector) -> Vec<&'static str> {
            vec!["x"; c.desc()[0].variable_labels.len()]
        }
        let Metrics {
            registry,
            connections_active,
            connections_refused,
            client_connections,
            requests_rejected,
            ws_connections_active,
            ws_upgrades,
            ws_opened,
            ws_duration,
            ws_messages,
            ws_frames,
            ws_bytes,
            ws_closes,
            ws_idle_timeouts,
            ws_heartbeat_failures,
            ws_drained,
            ws_send_timeouts,
            ws_rebalanced,
            ws_max_age,
            dns_lookups,
            affinity,
            backend_up,
            backend_state,
            health_checks,
            http_requests,
            http_duration,
            tls_handshakes,
            tls_resumed,
            tls_duration,
            config_reloads,
            config_last_reload_success: _,
            build_info: _,
            auth,
            auth_jwks_refresh,
        } = m;
        for c in [
            connections_refused,
            client_connections,
            requests_rejected,
            ws_upgrades,
            ws_opened,
            ws_messages,
            ws_frames,
            ws_bytes,
            ws_closes,
            ws_idle_timeouts,
            ws_heartbeat_failures,
            ws_drained,
            ws_send_timeouts,
            ws_rebalanced,
            ws_max_age,
            dns_lookups,
            affinity,
            health_checks,
            http_requests,
            tls_handshakes,
            tls_resumed,
            config_reloads,
            auth,
            auth_jwks_refresh,
        ] {
            c.with_label_values(&labels(c));
        }
        for g in [
            connections_active,
            ws_connections_active,
            backend_up,
            backend_state,
        ] {
            g.with_label_values(&labels(g));
        }
        for h in [ws_duration, http_duration, tls_duration] {
            h.with_label_values(&labels(h));
        }
        registry
            .gather()
            .iter()
            .map(|f| f.get_name().to_string())
            .collect()
    }

    /// Docs guard: every family berth registers has a row in the README's
    /// Monitoring table, and every metric the table names is registered.
    /// The process collector's families are one row, `process_*`; the
    /// names its text gives as examples must exist too.
    #[test]
    fn the_readme_monitoring_table_matches_the_registry() {
        let registered = every_family(&Metrics::new().unwrap());
        let rows = readme_metric_rows();
        let documented = |name: &str| {
            rows.iter().any(|(row, _)| match row.strip_suffix('*') {
                Some(prefix) => name.starts_with(prefix),
                None => *row == name,
            })
        };
        let missing: Vec<&String> = registered.iter().filter(|n| !documented(n)).collect();
        assert!(
            missing.is_empty(),
            "registered but not in the README's Monitoring table: {missing:?}"
        );
        let mut named: Vec<&str> = Vec::new();
        for (name, row) in &rows {
            match name.strip_suffix('*') {
                Some(prefix) => {
                    // The row's examples (`process_open_fds`, ...).
                    for (i, _) in row.match_indices(&format!("`{prefix}")) {
                        let example: String = row[i + 1..]
                            .chars()
                            .take_while(|c| c.is_ascii_lowercase() || *c == '_')
                            .collect();
                        if example != *prefix {
                            named.push(&row[i + 1..i + 1 + example.len()]);
                        }
                    }
                    assert!(
                        registered.iter().any(|n| n.starts_with(prefix)),
                        "the README's {name} row matches no registered metric"
                    );
                }
                None => named.push(name),
            }
        }
        let unknown: Vec<&&str> = named.iter().filter(|n| !registered.contains(**n)).collect();
        assert!(
            unknown.is_empty(),
            "in the README's Monitoring table but not registered: {unknown:?}"
        );
        assert!(rows.len() > 25, "{rows:?}");
    }

    #[test]
    fn opcode_index_matches_the_labels() {
        let named = [
            (0x0, "continuation"),
            (0x1, "text"),
            (0x2, "binary"),
            (0x8, "close"),
            (0x9, "ping"),
            (0xA, "pong"),
        ];
        for (op, label) in named {
            assert_eq!(OPCODE_LABELS[opcode_index(op)], label);
        }
        for op in [0x3, 0x7, 0xB, 0xF, 0x10, 0xFF] {
            assert_eq!(OPCODE_LABELS[opcode_index(op)], "other");
        }
    }

    #[test]
    fn registry_renders_every_family_name_with_prefix() {
        let m = Metrics::new().unwrap();
        m.relay_counters("chat", "chat-1");
        let text = String::from_utf8(m.render()).unwrap();
        assert!(text.contains("berth_websocket_frames_total{direction=\"client_to_backend\",opcode=\"text\",pool=\"chat\"} 0"));
        assert!(text.contains("berth_build_info"));
    }
}
