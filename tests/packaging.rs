//! The systemd unit's commands, run against the real binary: ExecStart
//! starts berth with its pid file, `systemctl reload` (the ExecReload lines,
//! in order, stopping at the first failure as systemd does) reloads a valid
//! file and refuses a broken one without signalling berth, and KillSignal
//! stops it cleanly within TimeoutStopSec. scripts/check-packaging.sh checks
//! the unit's syntax with systemd-analyze; this checks that it works.

use std::io::{Read as _, Write as _};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_berth");
const UNIT: &str = include_str!("../packaging/systemd/berth.service");

/// Every value of `KEY=` in the unit, in order.
fn unit_values(key: &str) -> Vec<String> {
    let prefix = format!("{key}=");
    UNIT.lines()
        .filter_map(|l| l.strip_prefix(&prefix))
        .map(str::to_string)
        .collect()
}

fn wait_until(limit: Duration, mut done: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + limit;
    while Instant::now() < deadline {
        if done() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    done()
}

/// `berth_config_reloads_total{result}` from the admin API.
fn reloads(admin: SocketAddr, result: &str) -> f64 {
    let mut s = TcpStream::connect(admin).unwrap();
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .unwrap();
    let mut text = String::new();
    s.read_to_string(&mut text).unwrap();
    let series = format!("berth_config_reloads_total{{result=\"{result}\"}} ");
    text.lines()
        .find_map(|l| l.strip_prefix(&series))
        .map_or(0.0, |v| v.trim().parse().unwrap())
}

fn config(admin: SocketAddr) -> String {
    format!(
        r#"shutdown_window = "300ms"

[[listeners]]
name = "public"
bind = "127.0.0.1:0"

[admin]
bind = "{admin}"

[[routes]]
pool = "p"

[[pools.p.backends]]
id = "b1"
address = "127.0.0.1:9"
"#
    )
}

#[test]
fn unit_starts_reloads_through_the_pid_file_and_stops_berth() {
    let dir = tempfile::tempdir().unwrap();
    let admin = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let config_path = dir.path().join("berth.toml");
    std::fs::write(&config_path, config(admin)).unwrap();
    let run_dir = dir.path().join("run");
    std::fs::create_dir(&run_dir).unwrap();
    // The unit's paths, moved into the temp directory.
    let local = |line: &str| {
        line.replace("/usr/local/bin/berth", BIN)
            .replace("/etc/berth/berth.toml", config_path.to_str().unwrap())
            .replace("/run/berth/", &format!("{}/", run_dir.display()))
    };

    let exec_start = unit_values("ExecStart");
    assert_eq!(exec_start.len(), 1, "{exec_start:?}");
    let exec_start = local(&exec_start[0]);
    let words: Vec<&str> = exec_start.split_whitespace().collect();
    let pid_file = words
        .iter()
        .position(|w| *w == "--pid-file")
        .map(|i| Path::new(words[i + 1]).to_path_buf())
        .expect("ExecStart passes --pid-file");
    let mut berth = Command::new(words[0])
        .args(&words[1..])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    assert!(wait_until(Duration::from_secs(10), || pid_file.exists()));

    // `systemctl reload`: each ExecReload line in turn; systemd stops at
    // the first that fails. Their quoting is plain enough that sh parses
    // them as systemd does.
    let reload = || -> bool {
        unit_values("ExecReload").iter().all(|line| {
            Command::new("sh")
                .args(["-c", &format!("exec {}", local(line))])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .unwrap()
                .success()
        })
    };
    let before = reloads(admin, "success");
    assert!(reload(), "reload of a valid file failed");
    assert!(
        wait_until(Duration::from_secs(10), || reloads(admin, "success")
            == before + 1.0),
        "berth did not reload"
    );

    // A broken file: `systemctl reload` fails and berth never hears of it.
    std::fs::write(&config_path, "shutdown_window = \"soon\"\n").unwrap();
    let failures = reloads(admin, "failure");
    assert!(!reload(), "reload of a broken file succeeded");
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(reloads(admin, "failure"), failures);
    assert_eq!(reloads(admin, "success"), before + 1.0);
    assert!(berth.try_wait().unwrap().is_none());

    // `systemctl stop`: KillSignal, and berth is gone well within
    // TimeoutStopSec, its pid file with it.
    let signal = unit_values("KillSignal").pop().expect("KillSignal");
    let signal = signal.trim_start_matches("SIG");
    let ok = Command::new("kill")
        .args([&format!("-{signal}"), &berth.id().to_string()])
        .status()
        .unwrap()
        .success();
    assert!(ok);
    let mut status = None;
    assert!(wait_until(Duration::from_secs(10), || {
        status = berth.try_wait().unwrap();
        status.is_some()
    }));
    assert!(status.unwrap().success(), "{status:?}");
    assert!(!pid_file.exists());
}
