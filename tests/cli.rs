//! The command line of the real binary, as an operator meets it: `--version`,
//! shell completions and the man page (generated from the CLI definition),
//! the config path as an argument, `run --pid-file`, exit codes, one clear
//! message for a bind failure, and log colour only on a terminal.

use std::io::Write as _;
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_berth");
const ROOT: &str = env!("CARGO_MANIFEST_DIR");

fn berth(args: &[&str]) -> Output {
    Command::new(BIN).args(args).output().unwrap()
}

fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// The subcommands `berth --help` lists.
fn subcommands() -> Vec<String> {
    let help = stdout(&berth(&["--help"]));
    let list: Vec<String> = help
        .lines()
        .skip_while(|l| !l.starts_with("Commands:"))
        .skip(1)
        .take_while(|l| !l.trim().is_empty())
        .filter_map(|l| l.split_whitespace().next().map(str::to_string))
        .collect();
    for expected in ["run", "check", "demo", "completions", "manpage"] {
        assert!(list.iter().any(|c| c == expected), "{expected} in {list:?}");
    }
    list
}

/// Every `--flag` the help of berth and of each subcommand mentions.
fn flags() -> Vec<String> {
    let mut helps = vec![stdout(&berth(&["--help"]))];
    for sub in subcommands() {
        helps.push(stdout(&berth(&[&sub, "--help"])));
    }
    let mut flags: Vec<String> = Vec::new();
    for help in helps {
        for (i, _) in help.match_indices("--") {
            let name: String = help[i + 2..]
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '-')
                .collect();
            let flag = format!("--{name}");
            if !name.is_empty() && !flags.contains(&flag) {
                flags.push(flag);
            }
        }
    }
    for expected in [
        "--config",
        "--pid-file",
        "--bind",
        "--log-format",
        "--version",
    ] {
        assert!(
            flags.iter().any(|f| f == expected),
            "{expected} in {flags:?}"
        );
    }
    flags
}

fn write_config(dir: &Path, bind: &str) -> String {
    let path = dir.join("berth.toml");
    std::fs::write(
        &path,
        format!(
            r#"shutdown_window = "200ms"

[[listeners]]
name = "public"
bind = "{bind}"

[[routes]]
pool = "p"

[[pools.p.backends]]
id = "b1"
address = "127.0.0.1:9"
"#
        ),
    )
    .unwrap();
    path.display().to_string()
}

/// Polls until `done` or `limit` passes.
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

#[test]
fn version_names_the_git_commit_it_was_built_from() {
    let out = berth(&["--version"]);
    assert!(out.status.success());
    // What build.rs should have found: an outer BERTH_GIT_COMMIT, else the
    // checkout's HEAD, else "unknown" (not built from a git checkout).
    let from_git = Command::new("git")
        .current_dir(ROOT)
        .args(["rev-parse", "--show-toplevel", "--short=12", "HEAD"])
        .output()
        .ok()
        .filter(|o| o.status.success())
        .and_then(|o| {
            let text = String::from_utf8(o.stdout).ok()?;
            let mut lines = text.lines();
            let top = lines.next()?;
            let same = std::fs::canonicalize(top).ok()? == std::fs::canonicalize(ROOT).ok()?;
            same.then(|| lines.next().map(str::to_string))?
        });
    let commit = std::env::var("BERTH_GIT_COMMIT")
        .ok()
        .filter(|c| !c.trim().is_empty())
        .or(from_git)
        .unwrap_or_else(|| "unknown".to_string());
    assert_eq!(
        stdout(&out).trim(),
        format!("berth {} (commit {commit})", env!("CARGO_PKG_VERSION"))
    );
}

#[test]
fn bash_completion_is_valid_bash_and_completes_every_subcommand() {
    let out = berth(&["completions", "bash"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let dir = tempfile::tempdir().unwrap();
    let script = dir.path().join("berth.bash");
    std::fs::write(&script, &out.stdout).unwrap();
    let syntax = Command::new("bash")
        .arg("-n")
        .arg(&script)
        .output()
        .unwrap();
    assert!(syntax.status.success(), "bash -n: {}", stderr(&syntax));

    // Press Tab as bash would: after `berth `, after `berth run --pid`, and
    // after `berth completions `.
    let complete = |words: &[&str]| -> Vec<String> {
        let line = words.join(" ");
        let program = format!(
            r#"source "$1"
f=$(complete -p berth | sed -n 's/.* -F \([^ ]*\) .*/\1/p')
COMP_WORDS=({words}); COMP_CWORD={cword}; COMP_LINE="{line}"; COMP_POINT=${{#COMP_LINE}}
"$f" berth "${{COMP_WORDS[COMP_CWORD]}}" "${{COMP_WORDS[COMP_CWORD-1]}}"
printf '%s\n' "${{COMPREPLY[@]}}""#,
            words = words
                .iter()
                .map(|w| format!("'{w}'"))
                .collect::<Vec<_>>()
                .join(" "),
            cword = words.len() - 1,
        );
        let out = Command::new("bash")
            .args(["-c", &program, "complete"])
            .arg(&script)
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", stderr(&out));
        stdout(&out).lines().map(str::to_string).collect()
    };
    let offered = complete(&["berth", ""]);
    for sub in subcommands() {
        assert!(offered.contains(&sub), "{sub} not offered: {offered:?}");
    }
    assert_eq!(complete(&["berth", "run", "--pid"]), vec!["--pid-file"]);
    let shells = complete(&["berth", "completions", ""]);
    for shell in ["bash", "zsh", "fish"] {
        assert!(shells.iter().any(|s| s == shell), "{shell}: {shells:?}");
    }
}

#[test]
fn zsh_and_fish_completions_list_every_subcommand() {
    let zsh = stdout(&berth(&["completions", "zsh"]));
    let fish = stdout(&berth(&["completions", "fish"]));
    assert!(zsh.starts_with("#compdef berth"), "{zsh}");
    for sub in subcommands() {
        assert!(zsh.contains(&format!("'{sub}:")), "zsh lacks {sub}");
        assert!(fish.contains(&format!("-a \"{sub}\"")), "fish lacks {sub}");
    }
    assert!(fish.contains("-l pid-file"), "{fish}");
    assert_eq!(berth(&["completions", "tcsh"]).status.code(), Some(2));
}

/// Runs groff over a page: its warnings (none for a valid page).
fn groff_warnings(page: &[u8]) -> String {
    let mut child = Command::new("groff")
        .args(["-man", "-ww", "-z"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("groff (Debian: groff-base; scripts/test.sh installs it)");
    child.stdin.take().unwrap().write_all(page).unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "groff failed: {}", stderr(&out));
    stderr(&out)
}

#[test]
fn man_page_is_valid_roff_with_every_subcommand_and_flag() {
    let out = berth(&["manpage"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let page = out.stdout;
    // The check itself sees a broken page.
    let mut broken = page.clone();
    broken.extend_from_slice(b".BOGUS macro\n");
    assert!(!groff_warnings(&broken).is_empty());
    assert_eq!(groff_warnings(&page), "");

    let text = String::from_utf8(page).unwrap().replace("\\-", "-");
    assert!(text.contains(".TH BERTH 1"), "{text}");
    for sub in subcommands() {
        assert!(
            text.contains(&format!(".SS \"berth {sub}\"")),
            "{sub}: {text}"
        );
    }
    for flag in flags() {
        assert!(text.contains(&flag), "{flag}: {text}");
    }
    assert!(text.contains(".SH \"EXIT STATUS\""), "{text}");
}

#[test]
fn check_takes_the_config_path_as_an_argument_or_with_config() {
    let run = |args: &[&str]| {
        Command::new(BIN)
            .current_dir(ROOT)
            .args(args)
            .output()
            .unwrap()
    };
    // As the example config's header says.
    let out = run(&["check", "config/berth.toml"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(stdout(&out), "config/berth.toml: ok\n");
    let out = run(&["check", "--config", "config/berth.toml"]);
    assert_eq!(stdout(&out), "config/berth.toml: ok\n");
    // Both at once is ambiguous: a usage error, exit 2.
    let out = run(&[
        "check",
        "config/berth.toml",
        "--config",
        "config/berth.toml",
    ]);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        stderr(&out).contains("cannot be used with"),
        "{}",
        stderr(&out)
    );
}

#[test]
fn an_unreadable_config_exits_2_for_run_and_check() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("missing.toml").display().to_string();
    for cmd in ["run", "check"] {
        let out = berth(&[cmd, &missing]);
        assert_eq!(out.status.code(), Some(2), "{cmd}: {}", stderr(&out));
        assert!(stderr(&out).contains(&missing), "{}", stderr(&out));
    }
}

#[test]
fn a_bind_failure_says_so_once_and_exits_1_without_a_pid_file() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), &addr);
    let pid_file = dir.path().join("berth.pid");
    let out = berth(&["run", &config, "--pid-file", pid_file.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    let err = stderr(&out);
    let failure: Vec<&str> = err.lines().filter(|l| l.starts_with("berth: ")).collect();
    assert_eq!(failure.len(), 1, "{err}");
    assert!(
        failure[0].contains(&format!("cannot bind listener \"public\" on {addr}")),
        "{err}"
    );
    // The OS error once, not once per layer of context.
    assert_eq!(err.matches("(os error ").count(), 1, "{err}");
    assert!(!pid_file.exists());
}

#[test]
fn pid_file_names_the_process_takes_sighup_at_once_and_is_removed_on_exit() {
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), "127.0.0.1:0");
    let pid_file = dir.path().join("run").join("berth.pid");
    std::fs::create_dir(pid_file.parent().unwrap()).unwrap();
    let mut child = Command::new(BIN)
        .args(["run", "--config", &config, "--pid-file"])
        .arg(&pid_file)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    assert!(
        wait_until(Duration::from_secs(10), || pid_file.exists()),
        "no pid file"
    );
    let pid = std::fs::read_to_string(&pid_file).unwrap();
    assert_eq!(pid, format!("{}\n", child.id()));
    let kill = |signal: &str| {
        let ok = Command::new("kill")
            .args([signal, pid.trim()])
            .status()
            .unwrap()
            .success();
        assert!(ok, "kill {signal} {pid}");
    };
    // The handlers are in place once the file exists: SIGHUP reloads
    // rather than killing berth.
    kill("-HUP");
    std::thread::sleep(Duration::from_millis(300));
    assert!(child.try_wait().unwrap().is_none(), "SIGHUP killed berth");
    kill("-TERM");
    let mut status = None;
    assert!(
        wait_until(Duration::from_secs(10), || {
            status = child.try_wait().unwrap();
            status.is_some()
        }),
        "berth did not stop"
    );
    assert!(status.unwrap().success(), "{status:?}");
    assert!(!pid_file.exists(), "the pid file outlived berth");
    // Only the temp file's directory remains, empty.
    assert_eq!(
        std::fs::read_dir(pid_file.parent().unwrap())
            .unwrap()
            .count(),
        0
    );
}

/// `berth run` on an occupied port: it logs (the descriptor limit) and
/// fails fast. Returns everything it wrote to stderr, through `script`'s
/// pseudo-terminal when `tty` is set.
fn logs_of_failed_run(tty: bool, no_color: Option<&str>) -> Vec<u8> {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), &taken.local_addr().unwrap().to_string());
    let mut cmd = if tty {
        // util-linux's script runs the command on a pseudo-terminal and
        // copies what it writes to its own stdout.
        let mut c = Command::new("script");
        c.args(["-q", "-e", "-c"])
            .arg(format!("'{BIN}' run '{config}'"))
            .arg("/dev/null");
        c
    } else {
        let mut c = Command::new(BIN);
        c.args(["run", &config]);
        c
    };
    cmd.env_remove("NO_COLOR");
    if let Some(v) = no_color {
        cmd.env("NO_COLOR", v);
    }
    let log = dir.path().join("stderr.log");
    let file = std::fs::File::create(&log).unwrap();
    let out = if tty {
        cmd.stdin(Stdio::null()).output().unwrap().stdout
    } else {
        let status = cmd.stderr(file).status().unwrap();
        assert_eq!(status.code(), Some(1));
        std::fs::read(&log).unwrap()
    };
    let text = String::from_utf8_lossy(&out);
    assert!(
        text.contains("open file limit") && text.contains("cannot bind"),
        "{text}"
    );
    out
}

#[test]
fn logs_are_coloured_only_on_a_terminal_and_never_with_no_color() {
    const ESC: u8 = 0x1b;
    // stderr to a file: plain text.
    assert!(!logs_of_failed_run(false, None).contains(&ESC));
    // On a terminal: colour, unless NO_COLOR is set (to anything but "").
    assert!(logs_of_failed_run(true, None).contains(&ESC));
    assert!(!logs_of_failed_run(true, Some("1")).contains(&ESC));
    assert!(logs_of_failed_run(true, Some("")).contains(&ESC));
}

#[test]
fn generated_text_survives_a_reader_that_stops_early() {
    // `berth manpage | head -1`: no panic, no error message.
    let mut child = Command::new(BIN)
        .arg("manpage")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    drop(child.stdout.take());
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(stderr(&out), "");
}
