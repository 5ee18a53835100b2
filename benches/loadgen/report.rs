//! `loadgen report`: turns the raw results of `benches/compare.sh` into the
//! markdown table of `benches/results/latest.md`.
//!
//! The results directory holds, per run, `TEST__TARGET__REP.json` (the
//! loadgen's JSON output), for idle runs `TEST__TARGET__REP.rss` ("BEFORE_KB
//! HELD_KB", sampled by the script), and for a run that failed
//! `TEST__TARGET__REP.fail` (one line: why), for a target that does not run
//! a test `TEST__TARGET__REP.skip` (one line: why), and for the callgrind
//! tests `TEST__TARGET__REP.ir` (the instructions counted in the measured
//! window). `meta.tsv` has `KEY<TAB>VALUE` lines for the header, `tests.tsv`
//! has `TEST<TAB>DESCRIPTION` lines in suite order, and `provider.tsv`, when
//! present, `FIGURE<TAB>AWS-LC-RS<TAB>RING` lines for the TLS provider table.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::Path;

use anyhow::Context as _;
use serde_json::Value;

/// The proxies berth is compared with.
const ANCHORS: [&str; 2] = ["nginx", "haproxy"];

#[derive(Default)]
struct Run {
    json: Option<Value>,
    rss: Option<(f64, f64)>,
    /// Instructions counted by callgrind in the measured window.
    ir: Option<f64>,
    fail: Option<String>,
    skip: Option<String>,
}

#[derive(Clone, Copy, PartialEq)]
enum Agg {
    Median,
    Sum,
    Min,
}

struct Metric {
    name: &'static str,
    /// None: a count or a figure with no better direction (not ratioed).
    higher_better: Option<bool>,
    agg: Agg,
    decimals: usize,
    headline: bool,
    get: fn(&Run) -> Option<f64>,
}

/// A summed count (errors and the like): not ratioed, never a headline.
fn count(name: &'static str, get: fn(&Run) -> Option<f64>) -> Metric {
    Metric {
        name,
        higher_better: None,
        agg: Agg::Sum,
        decimals: 0,
        headline: false,
        get,
    }
}

const HIGHER: bool = true;
const LOWER: bool = false;

/// A figure reported as the median over repetitions.
fn median(
    name: &'static str,
    higher_better: bool,
    decimals: usize,
    headline: bool,
    get: fn(&Run) -> Option<f64>,
) -> Metric {
    Metric {
        name,
        higher_better: Some(higher_better),
        agg: Agg::Median,
        decimals,
        headline,
        get,
    }
}

fn num(v: &Value, path: &[&str]) -> Option<f64> {
    let mut cur = v;
    for p in path {
        cur = cur.get(p)?;
    }
    cur.as_f64()
}

fn j(r: &Run, path: &[&str]) -> Option<f64> {
    num(r.json.as_ref()?, path)
}

fn cpu_per(r: &Run, count: &str) -> Option<f64> {
    let cpu = j(r, &["proxy_cpu_secs"])?;
    let n = j(r, &[count])?;
    (n > 0.0).then(|| cpu * 1e6 / n)
}

fn metrics(mode: &str, test: &str) -> Vec<Metric> {
    let big = test.contains("64k");
    if test.starts_with("ir") {
        return vec![
            median("user-space instructions/msg", LOWER, 0, true, |r| {
                let n = j(r, &["messages"])?;
                let ir = r.ir?;
                (n > 0.0).then(|| ir / n)
            }),
            Metric {
                name: "messages counted",
                higher_better: None,
                agg: Agg::Median,
                decimals: 0,
                headline: false,
                get: |r| j(r, &["messages"]),
            },
            count("verification errors", |r| j(r, &["verification_errors"])),
            count("conn errors", |r| j(r, &["connection_errors"])),
        ];
    }
    match mode {
        "throughput" => vec![
            median("proxy CPU µs/msg", LOWER, 2, true, |r| {
                cpu_per(r, "messages")
            }),
            Metric {
                name: "msgs/s",
                higher_better: Some(true),
                agg: Agg::Median,
                decimals: 0,
                headline: !big,
                get: |r| j(r, &["msgs_per_sec"]),
            },
            median("MiB/s", HIGHER, 1, big, |r| j(r, &["mib_per_sec"])),
            median("proxy CPU ms/MiB", LOWER, 2, big, |r| {
                let mib = j(r, &["bytes"])? / 1048576.0;
                let cpu = j(r, &["proxy_cpu_secs"])?;
                (mib > 0.0).then(|| cpu * 1000.0 / mib)
            }),
            count("verification errors", |r| j(r, &["verification_errors"])),
            count("lost msgs", |r| j(r, &["lost_messages"])),
            count("conn errors", |r| j(r, &["connection_errors"])),
        ],
        "latency" => {
            let many = !test.contains("-c1-");
            vec![
                median("p50 µs", LOWER, 1, true, |r| j(r, &["p50_us"])),
                median("p90 µs", LOWER, 1, false, |r| j(r, &["p90_us"])),
                median("p99 µs", LOWER, 1, true, |r| j(r, &["p99_us"])),
                median("p99.9 µs", LOWER, 1, many, |r| j(r, &["p999_us"])),
                median("msgs/s", HIGHER, 0, false, |r| j(r, &["msgs_per_sec"])),
                median("proxy CPU µs/msg", LOWER, 2, false, |r| {
                    cpu_per(r, "messages")
                }),
                count("verification errors", |r| j(r, &["verification_errors"])),
                count("conn errors", |r| j(r, &["connection_errors"])),
            ]
        }
        "handshake" => vec![
            median("handshakes/s", HIGHER, 0, true, |r| {
                j(r, &["handshakes_per_sec"])
            }),
            median("proxy CPU µs/handshake", LOWER, 1, true, |r| {
                cpu_per(r, "handshakes")
            }),
            median("p50 ms", LOWER, 2, false, |r| {
                j(r, &["handshake_time", "p50_us"]).map(|v| v / 1000.0)
            }),
            median("p99 ms", LOWER, 2, false, |r| {
                j(r, &["handshake_time", "p99_us"]).map(|v| v / 1000.0)
            }),
            count("TLS sessions resumed", |r| j(r, &["resumed"])),
            count("X25519MLKEM768", |r| {
                j(r, &["kx_groups", "X25519MLKEM768"]).or(Some(0.0))
            }),
            count("errors", |r| j(r, &["errors"])),
        ],
        "storm" => vec![
            median("time to reconnect all s", LOWER, 2, true, |r| {
                j(r, &["reconnect_secs"])
            }),
            median("proxy CPU s", LOWER, 2, true, |r| j(r, &["proxy_cpu_secs"])),
            median("proxy CPU µs/reconnect", LOWER, 1, false, |r| {
                cpu_per(r, "reestablished")
            }),
            median("p50 ms", LOWER, 1, false, |r| {
                j(r, &["reconnect_time", "p50_us"]).map(|v| v / 1000.0)
            }),
            median("p99 ms", LOWER, 1, false, |r| {
                j(r, &["reconnect_time", "p99_us"]).map(|v| v / 1000.0)
            }),
            Metric {
                name: "back",
                higher_better: None,
                agg: Agg::Min,
                decimals: 0,
                headline: false,
                get: |r| j(r, &["reestablished"]),
            },
            Metric {
                name: "resumed",
                higher_better: None,
                agg: Agg::Min,
                decimals: 0,
                headline: false,
                get: |r| j(r, &["resumed"]),
            },
            count("attempts", |r| j(r, &["attempts"])),
            count("listen overflows", |r| j(r, &["listen_overflows"])),
            count("errors", |r| j(r, &["errors"])),
        ],
        "idle" => vec![
            // Over HTTP/2 a connection carries many WebSockets: the
            // figure is per WebSocket (per connection when it carries none).
            median(
                if test.contains("h2") && !test.ends_with("-h2-0") {
                    "RSS growth KiB/WebSocket"
                } else {
                    "RSS growth KiB/conn"
                },
                LOWER,
                2,
                true,
                |r| {
                    let (before, held) = r.rss?;
                    let n = j(r, &["opened"])?;
                    (n > 0.0).then(|| (held - before) / n)
                },
            ),
            median("RSS held MiB", LOWER, 1, false, |r| {
                r.rss.map(|(_, held)| held / 1024.0)
            }),
            median("open time s", LOWER, 2, false, |r| j(r, &["open_secs"])),
            median("proxy CPU µs/open", LOWER, 1, true, |r| {
                let cpu = j(r, &["proxy_cpu_secs_open"])?;
                let n = j(r, &["opened"])?;
                (n > 0.0).then(|| cpu * 1e6 / n)
            }),
            Metric {
                name: "opened",
                higher_better: None,
                agg: Agg::Min,
                decimals: 0,
                headline: false,
                get: |r| j(r, &["opened"]),
            },
            Metric {
                name: "alive after hold",
                higher_better: None,
                agg: Agg::Min,
                decimals: 0,
                headline: false,
                get: |r| j(r, &["alive_after_hold"]),
            },
            count("failed", |r| j(r, &["failed"])),
        ],
        _ => Vec::new(),
    }
}

fn aggregate(agg: Agg, mut v: Vec<f64>) -> Option<f64> {
    if v.is_empty() {
        return None;
    }
    v.sort_by(|a, b| a.total_cmp(b));
    Some(match agg {
        Agg::Sum => v.iter().sum(),
        Agg::Min => v[0],
        Agg::Median => {
            let n = v.len();
            if n % 2 == 1 {
                v[n / 2]
            } else {
                (v[n / 2 - 1] + v[n / 2]) / 2.0
            }
        }
    })
}

fn fmt(v: Option<f64>, decimals: usize) -> String {
    match v {
        Some(v) => format!("{v:.decimals$}"),
        None => "—".into(),
    }
}

/// "1.35× worse" style ratio of berth to the best anchor.
fn ratio(m: &Metric, vals: &BTreeMap<String, Option<f64>>) -> String {
    let Some(higher) = m.higher_better else {
        return String::new();
    };
    let Some(Some(b)) = vals.get("berth") else {
        return "—".into();
    };
    let anchors: Vec<(&str, f64)> = ANCHORS
        .iter()
        .filter_map(|a| vals.get(*a).copied().flatten().map(|v| (*a, v)))
        .collect();
    let best = if higher {
        anchors.iter().copied().max_by(|x, y| x.1.total_cmp(&y.1))
    } else {
        anchors.iter().copied().min_by(|x, y| x.1.total_cmp(&y.1))
    };
    let Some((name, best)) = best else {
        return "—".into();
    };
    if best == 0.0 {
        return "—".into();
    }
    let r = b / best;
    let verdict = if (r - 1.0).abs() < 0.02 {
        "≈"
    } else if (r > 1.0) == higher {
        "better"
    } else {
        "worse"
    };
    format!("{r:.2} vs {name} ({verdict})")
}

pub fn run(dir: &Path, targets: &[String]) -> anyhow::Result<String> {
    let mut meta: Vec<(String, String)> = Vec::new();
    if let Ok(s) = std::fs::read_to_string(dir.join("meta.tsv")) {
        for line in s.lines() {
            if let Some((k, v)) = line.split_once('\t') {
                meta.push((k.to_string(), v.to_string()));
            }
        }
    }
    let tests_tsv = std::fs::read_to_string(dir.join("tests.tsv"))
        .with_context(|| format!("{}: no tests.tsv", dir.display()))?;
    let tests: Vec<(String, String)> = tests_tsv
        .lines()
        .filter_map(|l| l.split_once('\t'))
        .map(|(a, b)| (a.to_string(), b.to_string()))
        .collect();

    // runs[test][target] = Vec<Run>
    let mut runs: BTreeMap<String, BTreeMap<String, BTreeMap<String, Run>>> = BTreeMap::new();
    for entry in std::fs::read_dir(dir)? {
        let path = entry?.path();
        let Some(name) = path.file_name().and_then(|n| n.to_str()) else {
            continue;
        };
        let Some((stem, ext)) = name.rsplit_once('.') else {
            continue;
        };
        let parts: Vec<&str> = stem.split("__").collect();
        let [test, target, rep] = parts[..] else {
            continue;
        };
        let run = runs
            .entry(test.to_string())
            .or_default()
            .entry(target.to_string())
            .or_default()
            .entry(rep.to_string())
            .or_default();
        let text = std::fs::read_to_string(&path)?;
        match ext {
            "json" => {
                run.json = text
                    .lines()
                    .rev()
                    .find_map(|l| serde_json::from_str::<Value>(l.trim()).ok());
                if run.json.is_none() {
                    run.fail.get_or_insert_with(|| "no JSON output".into());
                }
            }
            "ir" => run.ir = text.trim().parse().ok(),
            "skip" => run.skip = Some(text.trim().to_string()),
            "rss" => {
                let v: Vec<f64> = text
                    .split_whitespace()
                    .filter_map(|x| x.parse().ok())
                    .collect();
                if let [a, b] = v[..] {
                    run.rss = Some((a, b));
                }
            }
            "fail" => run.fail = Some(text.trim().to_string()),
            _ => {}
        }
    }

    let mut out = String::new();
    writeln!(out, "# berth benchmark: berth vs nginx vs HAProxy")?;
    writeln!(out)?;
    for (k, v) in &meta {
        writeln!(out, "- **{k}**: {v}")?;
    }
    writeln!(out)?;
    writeln!(
        out,
        "Medians over the repetitions (error counts are summed). \"proxy CPU\" is the \
         proxy's utime+stime from /proc over the measurement divided by the messages \
         echoed (each message crosses the proxy twice); for nginx it is the worker's. \
         \"RSS growth\" is the proxy's VmRSS while the connections are held minus before \
         they were opened, divided by the connections. The ratio compares berth with the \
         better of nginx and HAProxy for that figure; \"direct\" is the echo backend \
         without a proxy, for reference: over wss it is the backend's own rustls \
         listener, whose TLS runs on the load core, so it is no ceiling there."
    )?;
    writeln!(out)?;

    // Per-test aggregated values: agg[test][metric_index][target].
    let mut summary = String::new();
    let header_targets = targets.join(" | ");
    writeln!(
        summary,
        "| test | figure | {header_targets} | berth ÷ best anchor |"
    )?;
    writeln!(summary, "|---|---|{}---|", "---:|".repeat(targets.len()))?;
    let mut details = String::new();
    let mut failures = Vec::new();
    let mut not_run = Vec::new();
    for (test, desc) in &tests {
        let Some(by_target) = runs.get(test) else {
            continue;
        };
        let mode = by_target
            .values()
            .flat_map(|reps| reps.values())
            .find_map(|r| r.json.as_ref()?.get("mode")?.as_str().map(str::to_string))
            .unwrap_or_default();
        let ms = metrics(&mode, test);
        writeln!(details, "### {test}: {desc}")?;
        writeln!(details)?;
        let names: Vec<&str> = ms.iter().map(|m| m.name).collect();
        writeln!(details, "| target | {} | runs |", names.join(" | "))?;
        writeln!(details, "|---|{}---:|", "---:|".repeat(ms.len()))?;
        let mut per_metric: Vec<BTreeMap<String, Option<f64>>> = vec![BTreeMap::new(); ms.len()];
        let mut skipped = Vec::new();
        for target in targets {
            let reps = by_target.get(target);
            if let Some(why) = reps.and_then(|r| r.values().find_map(|r| r.skip.clone())) {
                not_run.push(format!("{test} / {target}: {why}"));
                skipped.push(target.as_str());
                let na = vec!["n/a"; ms.len()];
                writeln!(details, "| {target} | {} | — |", na.join(" | "))?;
                continue;
            }
            let ok: Vec<&Run> = reps
                .map(|r| r.values().filter(|r| r.fail.is_none()).collect())
                .unwrap_or_default();
            let total = reps.map_or(0, |r| r.len());
            if let Some(reps) = reps {
                for (rep, r) in reps {
                    if let Some(f) = &r.fail {
                        failures.push(format!("{test} / {target} / rep {rep}: {f}"));
                    }
                }
            }
            let mut cells = Vec::new();
            for (i, m) in ms.iter().enumerate() {
                let v = aggregate(m.agg, ok.iter().filter_map(|r| (m.get)(r)).collect());
                per_metric[i].insert(target.clone(), v);
                cells.push(fmt(v, m.decimals));
            }
            writeln!(
                details,
                "| {target} | {} | {}/{} |",
                cells.join(" | "),
                ok.len(),
                total
            )?;
        }
        let ratios: Vec<String> = ms
            .iter()
            .zip(&per_metric)
            .map(|(m, vals)| ratio(m, vals))
            .collect();
        writeln!(
            details,
            "| berth ÷ best anchor | {} | |",
            ratios.join(" | ")
        )?;
        writeln!(details)?;
        if mode == "latency" {
            added_p99(&mut details, by_target, targets, &skipped)?;
        }
        for (m, vals) in ms.iter().zip(&per_metric) {
            if !m.headline {
                continue;
            }
            let cells: Vec<String> = targets
                .iter()
                .map(|t| {
                    if skipped.contains(&t.as_str()) {
                        "n/a".into()
                    } else {
                        fmt(vals.get(t).copied().flatten(), m.decimals)
                    }
                })
                .collect();
            let dir = match m.higher_better {
                Some(true) => " ↑",
                Some(false) => " ↓",
                None => "",
            };
            writeln!(
                summary,
                "| {test} | {}{dir} | {} | {} |",
                m.name,
                cells.join(" | "),
                ratio(m, vals)
            )?;
        }
    }
    writeln!(out, "## Headline figures")?;
    writeln!(out)?;
    writeln!(out, "↑ higher is better, ↓ lower is better.")?;
    writeln!(out)?;
    out.push_str(&summary);
    writeln!(out)?;
    if let Ok(p) = std::fs::read_to_string(dir.join("provider.tsv")) {
        writeln!(
            out,
            "## TLS provider: berth with aws-lc-rs (the default) and with ring"
        )?;
        writeln!(out)?;
        writeln!(
            out,
            "The run-time figures are the berth and berth-ring columns above; these \
             are the build's."
        )?;
        writeln!(out)?;
        writeln!(out, "| figure | aws-lc-rs | ring |")?;
        writeln!(out, "|---|---:|---:|")?;
        for line in p.lines() {
            let cells: Vec<&str> = line.split('\t').collect();
            writeln!(out, "| {} |", cells.join(" | "))?;
        }
        writeln!(out)?;
    }
    writeln!(out, "## Per test")?;
    writeln!(out)?;
    out.push_str(&details);
    if !not_run.is_empty() {
        writeln!(out, "## Not run (n/a)")?;
        writeln!(out)?;
        for f in not_run {
            writeln!(out, "- {f}")?;
        }
        writeln!(out)?;
    }
    if !failures.is_empty() {
        writeln!(out, "## Failed runs")?;
        writeln!(out)?;
        for f in failures {
            writeln!(out, "- {f}")?;
        }
        writeln!(out)?;
    }
    Ok(out)
}

/// The latency tests' added p99 in every repetition: each target's p99 minus
/// direct's p99 in the same repetition (the targets alternate within a
/// repetition, so both saw the same neighbours), and whether berth's is at
/// or below the best anchor's.
fn added_p99(
    out: &mut String,
    by_target: &BTreeMap<String, BTreeMap<String, Run>>,
    targets: &[String],
    skipped: &[&str],
) -> anyhow::Result<()> {
    let Some(direct) = by_target.get("direct") else {
        return Ok(());
    };
    let p99 = |r: &Run| -> Option<f64> {
        if r.fail.is_some() {
            return None;
        }
        j(r, &["p99_us"])
    };
    let cols: Vec<&String> = targets
        .iter()
        .filter(|t| *t != "direct" && !skipped.contains(&t.as_str()))
        .collect();
    let mut reps: Vec<&String> = direct.keys().collect();
    reps.sort_by_key(|r| r.parse::<u32>().unwrap_or(u32::MAX));
    writeln!(
        out,
        "Added p99 per repetition (µs): the target's p99 minus direct's in the same repetition."
    )?;
    writeln!(out)?;
    let names: Vec<&str> = cols.iter().map(|c| c.as_str()).collect();
    writeln!(
        out,
        "| repetition | {} | berth ≤ best anchor |",
        names.join(" | ")
    )?;
    writeln!(out, "|---|{}---|", "---:|".repeat(cols.len()))?;
    let (mut met, mut counted) = (0, 0);
    for rep in reps {
        let Some(base) = direct.get(rep).and_then(p99) else {
            continue;
        };
        let added = |t: &str| {
            by_target
                .get(t)
                .and_then(|r| r.get(rep))
                .and_then(p99)
                .map(|v| v - base)
        };
        let cells: Vec<String> = cols.iter().map(|t| fmt(added(t), 1)).collect();
        let best_anchor = ANCHORS
            .iter()
            .filter_map(|a| added(a))
            .min_by(|a, b| a.total_cmp(b));
        let verdict = match (added("berth"), best_anchor) {
            (Some(b), Some(a)) => {
                counted += 1;
                if b <= a {
                    met += 1;
                    "yes"
                } else {
                    "no"
                }
            }
            _ => "—",
        };
        writeln!(out, "| {rep} | {} | {verdict} |", cells.join(" | "))?;
    }
    writeln!(out)?;
    writeln!(
        out,
        "berth's added p99 is at or below the best anchor's in {met} of {counted} repetitions."
    )?;
    writeln!(out)?;
    Ok(())
}
