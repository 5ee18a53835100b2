//! Measurements of the process under test, read from /proc, and percentiles.

use serde_json::{json, Value};

/// Clock ticks per second of /proc/PID/stat (USER_HZ, 100 on Linux).
const CLK_TCK: f64 = 100.0;

/// CPU time (utime + stime, seconds) and VmRSS (KiB) of a set of processes.
#[derive(Debug, Clone, Copy, Default)]
pub struct Sample {
    pub cpu_secs: f64,
    pub rss_kb: u64,
}

pub fn sample(pids: &[u32]) -> Sample {
    let mut s = Sample::default();
    for &pid in pids {
        if let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) {
            // Fields after the command name, which may contain spaces.
            if let Some(rest) = stat.rsplit_once(')').map(|(_, r)| r) {
                let f: Vec<&str> = rest.split_whitespace().collect();
                // f[0] is field 3 (state); utime and stime are fields 14, 15.
                let ticks: u64 = [11, 12]
                    .iter()
                    .filter_map(|&i| f.get(i).and_then(|v| v.parse::<u64>().ok()))
                    .sum();
                s.cpu_secs += ticks as f64 / CLK_TCK;
            }
        }
        if let Ok(status) = std::fs::read_to_string(format!("/proc/{pid}/status")) {
            if let Some(kb) = status
                .lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.split_whitespace().next())
                .and_then(|v| v.parse::<u64>().ok())
            {
                s.rss_kb += kb;
            }
        }
    }
    s
}

/// The JSON fields describing the watched processes over a measurement.
pub fn watched_json(pids: &[u32], before: Sample, after: Sample) -> Value {
    if pids.is_empty() {
        return json!({});
    }
    json!({
        "proxy_pids": pids,
        "proxy_cpu_secs": round3(after.cpu_secs - before.cpu_secs),
        "proxy_rss_kb_before": before.rss_kb,
        "proxy_rss_kb_after": after.rss_kb,
    })
}

pub fn round3(v: f64) -> f64 {
    (v * 1000.0).round() / 1000.0
}

/// Percentiles (nearest rank) of sorted nanosecond samples, in microseconds.
pub fn percentiles_us(sorted_ns: &[u64]) -> Value {
    let p = |q: f64| -> f64 {
        if sorted_ns.is_empty() {
            return 0.0;
        }
        let rank = ((q * sorted_ns.len() as f64).ceil() as usize).clamp(1, sorted_ns.len());
        (sorted_ns[rank - 1] as f64 / 100.0).round() / 10.0
    };
    let mean = if sorted_ns.is_empty() {
        0.0
    } else {
        sorted_ns.iter().sum::<u64>() as f64 / sorted_ns.len() as f64 / 1000.0
    };
    json!({
        "p50_us": p(0.50),
        "p90_us": p(0.90),
        "p99_us": p(0.99),
        "p999_us": p(0.999),
        "max_us": p(1.0),
        "mean_us": (mean * 10.0).round() / 10.0,
    })
}
