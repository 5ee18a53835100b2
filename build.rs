//! Records the git commit berth is built from, for `berth --version`.
//!
//! Sets `BERTH_GIT_COMMIT` for the crate: the short commit hash when the
//! source is a git checkout (this directory is the repository's top level)
//! and `git` is installed, or `unknown` otherwise (a source tarball, a
//! container build that copies no `.git`). An outer `BERTH_GIT_COMMIT` in the
//! environment wins, so such builds can still name their commit
//! (`docker build --build-arg BERTH_COMMIT=...`).

use std::path::{Path, PathBuf};
use std::process::Command;

fn main() {
    println!("cargo:rerun-if-env-changed=BERTH_GIT_COMMIT");
    println!("cargo:rerun-if-changed=build.rs");
    let from_env = std::env::var("BERTH_GIT_COMMIT")
        .ok()
        .filter(|c| !c.trim().is_empty());
    let commit = match from_env {
        Some(c) => c.trim().to_string(),
        None => {
            let dir = PathBuf::from(std::env::var_os("CARGO_MANIFEST_DIR").unwrap_or_default());
            from_git(&dir).unwrap_or_else(|| "unknown".to_string())
        }
    };
    println!("cargo:rustc-env=BERTH_GIT_COMMIT={commit}");
}

/// The short HEAD commit of the checkout at `dir`, and rerun-if-changed
/// lines for the files that move when HEAD does; `None` when `dir` is not
/// the top of a git checkout or git cannot be run.
fn from_git(dir: &Path) -> Option<String> {
    let top = git(dir, &["rev-parse", "--show-toplevel"])?;
    // Inside someone else's repository (a vendored copy), that repository's
    // commit says nothing about berth's source.
    if std::fs::canonicalize(&top).ok()? != std::fs::canonicalize(dir).ok()? {
        return None;
    }
    let commit = git(dir, &["rev-parse", "--short=12", "HEAD"])?;
    // HEAD names the branch; the branch's ref (loose or packed) names the
    // commit. In a worktree, HEAD and the refs live in different git
    // directories, which --git-path resolves. Only existing files are
    // listed: cargo reruns a build script on every build for a missing one.
    let mut watch = vec![git(dir, &["rev-parse", "--git-path", "HEAD"])?];
    if let Some(branch) = git(dir, &["symbolic-ref", "-q", "HEAD"]) {
        watch.extend(git(dir, &["rev-parse", "--git-path", &branch]));
    }
    watch.extend(git(dir, &["rev-parse", "--git-path", "packed-refs"]));
    for path in watch {
        let path = dir.join(path);
        if path.exists() {
            println!("cargo:rerun-if-changed={}", path.display());
        }
    }
    Some(commit)
}

/// Runs git in `dir`; its trimmed stdout when it succeeds with output.
fn git(dir: &Path, args: &[&str]) -> Option<String> {
    let out = Command::new("git")
        .current_dir(dir)
        .args(args)
        .output()
        .ok()?;
    let text = String::from_utf8(out.stdout).ok()?;
    let text = text.trim();
    (out.status.success() && !text.is_empty()).then(|| text.to_string())
}
