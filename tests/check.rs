//! `berth check` and `berth run` on broken configs: the real binary, real
//! files, exact messages with file, line and key, exit code 2.

use std::path::Path;
use std::process::Command;

const BIN: &str = env!("CARGO_BIN_EXE_berth");

fn write(dir: &Path, name: &str, text: &str) -> String {
    let path = dir.join(name);
    std::fs::write(&path, text).unwrap();
    path.display().to_string()
}

fn check(path: &str) -> (i32, String) {
    let out = Command::new(BIN)
        .args(["check", "--config", path])
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

const GOOD: &str = r#"[[listeners]]
name = "public"
bind = "127.0.0.1:0"

[[routes]]
pool = "chat"

[pools.chat]
connect_timeout = "3s"

[[pools.chat.backends]]
id = "chat-1"
address = "127.0.0.1:9001"

[[pools.chat.backends]]
id = "chat-2"
address = "127.0.0.1:9002"
"#;

#[test]
fn shipped_example_config_is_valid() {
    let root = env!("CARGO_MANIFEST_DIR");
    let out = Command::new(BIN)
        .current_dir(root)
        .args(["check", "--config", "config/berth.toml"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn good_config_passes() {
    let dir = tempfile::tempdir().unwrap();
    let path = write(dir.path(), "good.toml", GOOD);
    let (code, err) = check(&path);
    assert_eq!(code, 0, "{err}");
}

#[test]
fn each_broken_config_names_file_line_and_key() {
    let dir = tempfile::tempdir().unwrap();
    let cases: &[(&str, String, &str)] = &[
        (
            "bad_address",
            GOOD.replace("address = \"127.0.0.1:9002\"", "address = \"10.0.0.1\""),
            ":17: pools.chat.backends[1].address: invalid socket address \"10.0.0.1\"",
        ),
        (
            "unknown_key",
            GOOD.replace("connect_timeout", "conect_timeout"),
            ":9: pools.chat.conect_timeout: unknown field `conect_timeout`",
        ),
        (
            "bad_duration",
            GOOD.replace("\"3s\"", "\"3 fortnights\""),
            ":9: pools.chat.connect_timeout: invalid duration \"3 fortnights\"",
        ),
        (
            "unknown_pool",
            GOOD.replace("pool = \"chat\"", "pool = \"chats\""),
            ":6: routes[0].pool: unknown pool \"chats\" (defined pools: chat)",
        ),
        (
            "duplicate_id",
            GOOD.replace("id = \"chat-2\"", "id = \"chat-1\""),
            ":16: pools.chat.backends[1].id: duplicate backend id \"chat-1\"",
        ),
        (
            "missing_cert",
            GOOD.replace("bind = \"127.0.0.1:0\"", "bind = \"127.0.0.1:0\"\ntls = { cert = \"/nonexistent/x.crt\", key = \"/nonexistent/x.key\" }"),
            ":4: listeners[0].tls.cert: /nonexistent/x.crt",
        ),
        (
            "short_cookie_secret",
            GOOD.replace("connect_timeout = \"3s\"", "affinity = \"cookie\"\n\n[pools.chat.cookie]\nsecret = \"too short\""),
            ":12: pools.chat.cookie.secret: cookie secret is 9 bytes; use at least 32 random bytes",
        ),
        (
            "bad_hash_key",
            GOOD.replace("connect_timeout = \"3s\"", "affinity = \"hash\"\n\n[pools.chat.hash]\nkey = \"ip\"\nbounded_load = 0.5"),
            ":12: pools.chat.hash.key: invalid hash key \"ip\"",
        ),
        (
            "bad_bounded_load",
            GOOD.replace("connect_timeout = \"3s\"", "affinity = \"hash\"\n\n[pools.chat.hash]\nkey = \"client_ip\"\nbounded_load = 0.5"),
            ":13: pools.chat.hash.bounded_load: bounded_load must be a number greater than 1.0",
        ),
        (
            "bad_health_rise",
            GOOD.replace("connect_timeout = \"3s\"", "connect_timeout = \"3s\"\n\n[pools.chat.health]\nrise = 0"),
            ":12: pools.chat.health.rise: rise must be between 1 and 100, got 0",
        ),
        (
            "public_admin_without_token",
            format!("{GOOD}\n[admin]\nbind = \"0.0.0.0:9900\"\n"),
            "admin.token: admin API on a non-loopback address requires [admin] token",
        ),
    ];
    for (name, text, expected) in cases {
        let path = write(dir.path(), &format!("{name}.toml"), text);
        let (code, err) = check(&path);
        assert_eq!(code, 2, "{name}: {err}");
        let expected_line = format!("{path}{expected}");
        assert!(
            err.contains(&expected_line) || (!expected.starts_with(':') && err.contains(expected)),
            "{name}: expected {expected_line:?} in:\n{err}"
        );
    }
}

#[test]
fn several_problems_are_reported_together() {
    let dir = tempfile::tempdir().unwrap();
    let text = GOOD
        .replace("address = \"127.0.0.1:9001\"", "address = \"nope\"")
        .replace("\"3s\"", "\"soon\"")
        .replace("pool = \"chat\"", "pool = \"missing\"");
    let path = write(dir.path(), "many.toml", &text);
    let (code, err) = check(&path);
    assert_eq!(code, 2);
    let lines: Vec<&str> = err.lines().collect();
    assert_eq!(lines.len(), 3, "{err}");
    assert!(lines[0].contains(":6: routes[0].pool"), "{err}");
    assert!(lines[1].contains(":9: pools.chat.connect_timeout"), "{err}");
    assert!(
        lines[2].contains(":13: pools.chat.backends[0].address"),
        "{err}"
    );
}

#[test]
fn run_refuses_an_invalid_config_before_binding() {
    let dir = tempfile::tempdir().unwrap();
    // The listener's port is taken by us: if run bound anything before
    // validating, the error would be about the port, not the config.
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port();
    let text = GOOD
        .replace("127.0.0.1:0", &format!("127.0.0.1:{port}"))
        .replace("\"3s\"", "\"later\"");
    let path = write(dir.path(), "run.toml", &text);
    let out = Command::new(BIN)
        .args(["run", "--config", &path])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("pools.chat.connect_timeout: invalid duration"),
        "{err}"
    );
}

#[test]
fn values_out_of_range_are_rejected_with_their_range() {
    let dir = tempfile::tempdir().unwrap();
    let cases: &[(&str, &str, &str)] = &[
        (
            "close_timeout",
            "close_timeout = \"500000000000y\"",
            ":9: pools.chat.close_timeout: duration must be between 100ms and 10m, got \"500000000000y\"",
        ),
        (
            "ping_interval",
            "ping_interval = \"1ns\"",
            ":9: pools.chat.ping_interval: duration must be \"0s\" (off) or between 10ms and 1h, got \"1ns\"",
        ),
        (
            "pong_timeout",
            "pong_timeout = \"1ns\"",
            ":9: pools.chat.pong_timeout: duration must be between 100ms and 10m, got \"1ns\"",
        ),
        (
            "idle_timeout",
            "idle_timeout = \"8d\"",
            ":9: pools.chat.idle_timeout: duration must be \"0s\" (off) or between 100ms and 7d, got \"8d\"",
        ),
        (
            "drain_window",
            "drain_window = \"2d\"",
            ":9: pools.chat.drain_window: duration must be between 0s and 1d, got \"2d\"",
        ),
    ];
    for (name, line, expected) in cases {
        let text = GOOD.replace("connect_timeout = \"3s\"", line);
        let path = write(dir.path(), &format!("{name}.toml"), &text);
        let (code, err) = check(&path);
        assert_eq!(code, 2, "{name}: {err}");
        assert_eq!(err.trim_end(), format!("{path}{expected}"), "{name}");
    }
    let text = GOOD.replace(
        "address = \"127.0.0.1:9002\"",
        "address = \"127.0.0.1:9002\"\nweight = 1001\nmax_connections = 0",
    );
    let path = write(dir.path(), "numbers.toml", &text);
    let (code, err) = check(&path);
    assert_eq!(code, 2);
    assert_eq!(
        err.trim_end(),
        format!(
            "{path}:18: pools.chat.backends[1].weight: weight must be between 1 and 1000, got 1001\n\
             {path}:19: pools.chat.backends[1].max_connections: max_connections must be between \
             1 and 1000000, got 0 (omit it for no cap)"
        )
    );
}

#[test]
fn unknown_keys_do_not_hide_other_problems() {
    let dir = tempfile::tempdir().unwrap();
    let text = format!("shutdown_windw = \"1s\"\n{GOOD}")
        .replace(
            "connect_timeout = \"3s\"",
            "conect_timeout = \"3s\"\npong_timeout = \"1ns\"",
        )
        .replace("id = \"chat-2\"", "id = \"chat-2\"\nwieght = 2")
        .replace(
            "address = \"127.0.0.1:9001\"",
            "address = \"10.0.0.1\"\nweight = \"heavy\"",
        )
        .replace("pool = \"chat\"", "pool = \"chats\"");
    let path = write(dir.path(), "many.toml", &text);
    let (code, err) = check(&path);
    assert_eq!(code, 2, "{err}");
    let found: Vec<&str> = err.lines().collect();
    let expected = [
        ":1: shutdown_windw: unknown field `shutdown_windw`",
        ":7: routes[0].pool: unknown pool \"chats\"",
        ":10: pools.chat.conect_timeout: unknown field `conect_timeout`",
        ":11: pools.chat.pong_timeout: duration must be between 100ms and 10m, got \"1ns\"",
        ":15: pools.chat.backends[0].address: invalid socket address \"10.0.0.1\"",
        ":16: pools.chat.backends[0].weight: invalid type: string \"heavy\", expected i64",
        ":20: pools.chat.backends[1].wieght: unknown field `wieght`",
    ];
    assert_eq!(found.len(), expected.len(), "{err}");
    for (line, want) in found.iter().zip(expected) {
        assert!(
            line.starts_with(&format!("{path}{want}")),
            "expected {want:?} in:\n{err}"
        );
    }
}
