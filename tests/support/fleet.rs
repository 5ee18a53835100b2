//! Real `berth` processes run from one config file: each binds port 0, so
//! any number of instances can share the file on one host, and the test
//! learns each one's addresses from its JSON log lines (`listening` with
//! `listener` and `addr`; `admin API listening` with `addr`).

use std::collections::HashMap;
use std::io::BufRead;
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// One berth process and what it logged.
pub struct Instance {
    pub child: Child,
    /// Listener name -> bound address.
    pub listeners: HashMap<String, SocketAddr>,
    pub admin: SocketAddr,
    /// Every log line so far (the reader thread keeps appending).
    pub log: Arc<Mutex<Vec<String>>>,
}

impl Instance {
    /// Starts `berth --log-format json run --config CONFIG [extra]` and waits
    /// until it has logged `listeners` listening addresses and its admin
    /// address.
    pub fn start(config: &Path, extra: &[&str], listeners: usize) -> Instance {
        let mut child = Command::new(env!("CARGO_BIN_EXE_berth"))
            .args(["--log-format", "json", "run", "--config"])
            .arg(config)
            .args(extra)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let stderr = child.stderr.take().unwrap();
        let log = Arc::new(Mutex::new(Vec::new()));
        let sink = Arc::clone(&log);
        std::thread::spawn(move || {
            for line in std::io::BufReader::new(stderr).lines() {
                let Ok(line) = line else { return };
                sink.lock().unwrap().push(line);
            }
        });
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            let (found, admin) = addresses(&log.lock().unwrap());
            if let Some(admin) = admin {
                if found.len() >= listeners {
                    return Instance {
                        child,
                        listeners: found,
                        admin,
                        log,
                    };
                }
            }
            if let Ok(Some(status)) = child.try_wait() {
                panic!("berth exited ({status}): {:?}", log.lock().unwrap());
            }
            assert!(
                Instant::now() < deadline,
                "berth did not start: {:?}",
                log.lock().unwrap()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn addr(&self, listener: &str) -> SocketAddr {
        self.listeners[listener]
    }

    /// Sends a signal (`HUP`, `TERM`) with kill(1).
    pub fn signal(&self, name: &str) {
        let ok = Command::new("kill")
            .args([&format!("-{name}"), &self.child.id().to_string()])
            .status()
            .unwrap()
            .success();
        assert!(ok, "kill -{name} failed");
    }

    /// Log lines whose message is `message`.
    pub fn logged(&self, message: &str) -> usize {
        let want = format!("\"message\":\"{message}\"");
        self.log
            .lock()
            .unwrap()
            .iter()
            .filter(|l| l.contains(&want))
            .count()
    }
}

impl Drop for Instance {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn addresses(lines: &[String]) -> (HashMap<String, SocketAddr>, Option<SocketAddr>) {
    let mut listeners = HashMap::new();
    let mut admin = None;
    for line in lines {
        let Ok(v) = serde_json::from_str::<serde_json::Value>(line) else {
            continue;
        };
        let addr = v["addr"].as_str().and_then(|a| a.parse().ok());
        match v["message"].as_str() {
            Some("listening") => {
                if let (Some(name), Some(addr)) = (v["listener"].as_str(), addr) {
                    listeners.insert(name.to_string(), addr);
                }
            }
            Some("admin API listening") => admin = addr,
            _ => {}
        }
    }
    (listeners, admin)
}

/// A counter's value in a `/metrics` text (0 when absent).
pub fn metric(text: &str, series: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(series).and_then(|v| v.trim().parse().ok()))
        .unwrap_or(0.0)
}
