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

/// Runs `berth check --config CONFIG` in `cwd`; fails the test if it has not
/// finished within 10 s. Returns the exit code and stderr.
fn check_in(cwd: &Path, config: &str) -> (i32, String) {
    let mut child = Command::new(BIN)
        .current_dir(cwd)
        .args(["check", "--config", config])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while child.try_wait().unwrap().is_none() {
        if std::time::Instant::now() > deadline {
            child.kill().unwrap();
            panic!("berth check --config {config} hung");
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let out = child.wait_with_output().unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// GOOD with cookie affinity reading `secret_file`.
fn with_secret_file(secret_file: &str) -> String {
    GOOD.replace(
        "connect_timeout = \"3s\"",
        &format!(
            "connect_timeout = \"3s\"\naffinity = \"cookie\"\n\n[pools.chat.cookie]\nsecret_file = {secret_file:?}"
        ),
    )
}

#[test]
fn fifos_and_devices_named_by_the_config_are_errors_not_hangs() {
    let dir = tempfile::tempdir().unwrap();
    let fifo = dir.path().join("fifo");
    assert!(Command::new("mkfifo")
        .arg(&fifo)
        .status()
        .unwrap()
        .success());
    // Relative names resolve against the config's directory: "fifo" is the
    // FIFO above, wherever berth check runs.
    let text = with_secret_file("fifo").replace(
        "bind = \"127.0.0.1:0\"",
        "bind = \"127.0.0.1:0\"\ntls = { cert = \"/dev/zero\", key = \"fifo\" }",
    );
    let path = write(dir.path(), "fifo.toml", &text);
    let (code, err) = check_in(Path::new("/"), &path);
    assert_eq!(code, 2, "{err}");
    let fifo = fifo.display();
    assert_eq!(
        err.trim_end(),
        format!(
            "{path}:4: listeners[0].tls.cert: /dev/zero: certificate file must be a regular file, \
             not a character device\n\
             {path}:4: listeners[0].tls.key: {fifo}: private key must be a regular file, not a FIFO\n\
             {path}:14: pools.chat.cookie.secret_file: {fifo}: secret file must be a regular file, \
             not a FIFO"
        )
    );

    let path = write(dir.path(), "zero.toml", &with_secret_file("/dev/zero"));
    let (code, err) = check_in(dir.path(), &path);
    assert_eq!(code, 2, "{err}");
    assert_eq!(
        err.trim_end(),
        format!(
            "{path}:13: pools.chat.cookie.secret_file: /dev/zero: secret file must be a regular \
             file, not a character device"
        )
    );
}

#[test]
fn relative_paths_resolve_against_the_config_directory() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let dir = tempfile::tempdir().unwrap();
    let etc = dir.path().join("etc");
    std::fs::create_dir_all(etc.join("tls")).unwrap();
    std::fs::copy(root.join("certs/example.crt"), etc.join("tls/site.crt")).unwrap();
    std::fs::copy(root.join("certs/example.key"), etc.join("tls/site.key")).unwrap();
    std::fs::copy(root.join("certs/example-cookie-secret"), etc.join("secret")).unwrap();
    let text = with_secret_file("secret").replace(
        "bind = \"127.0.0.1:0\"",
        "bind = \"127.0.0.1:0\"\ntls = { cert = \"tls/site.crt\", key = \"tls/site.key\" }",
    );
    let path = write(&etc, "berth.toml", &text);
    let elsewhere = tempfile::tempdir().unwrap();
    let (code, err) = check_in(elsewhere.path(), &path);
    assert_eq!(code, 0, "{err}");
    // A relative --config works too: its directory is relative to the
    // working directory.
    let (code, err) = check_in(dir.path(), "etc/berth.toml");
    assert_eq!(code, 0, "{err}");

    // A missing file is named by the path it was resolved to.
    std::fs::remove_file(etc.join("secret")).unwrap();
    let (code, err) = check_in(elsewhere.path(), &path);
    assert_eq!(code, 2);
    let expected = format!(
        "{path}:14: pools.chat.cookie.secret_file: {}: cannot read secret file: ",
        etc.join("secret").display()
    );
    assert!(
        err.starts_with(&expected),
        "expected {expected:?} in:\n{err}"
    );
    let (code, err) = check_in(dir.path(), "etc/berth.toml");
    assert_eq!(code, 2);
    assert!(
        err.starts_with(
            "etc/berth.toml:14: pools.chat.cookie.secret_file: etc/secret: cannot read secret file: "
        ),
        "{err}"
    );
}

#[test]
fn shipped_configs_are_valid_from_any_directory() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let elsewhere = tempfile::tempdir().unwrap();
    for name in ["berth.toml", "cookie-affinity.toml", "hash-affinity.toml"] {
        let path = root.join("config").join(name);
        let (code, err) = check_in(elsewhere.path(), &path.display().to_string());
        assert_eq!(code, 0, "{name}: {err}");
    }
}
