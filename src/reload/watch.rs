//! `berth run --watch`: reloads when the config file changes.
//!
//! The file is polled, not watched through inotify: every
//! [`WATCH_INTERVAL`] its metadata is read by path, following symlinks, so
//! what is watched is whatever the path names now, not an inode. That is
//! what a Kubernetes ConfigMap volume needs: the kubelet writes a new
//! directory, then atomically replaces the `..data` symlink that the
//! file's own symlink goes through, and the old inode never changes. An
//! editor that writes a new file and renames it over the old one, or one
//! that rewrites it in place, is seen the same way.
//!
//! A change is applied once the file has looked the same for one more
//! interval (so a burst of writes is one reload), through
//! [`ReloadContext::reload`]: exactly what SIGHUP does, with the same log
//! lines, metric and status-page record; a broken file is rejected and the
//! running config stays. The rejected file is not tried again until it
//! changes again. One task, started by the binary, ends with the shutdown
//! token.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use super::ReloadContext;

/// How often the file is looked at.
pub const WATCH_INTERVAL: Duration = Duration::from_secs(1);

/// What identifies a version of the file: the inode it resolves to and its
/// size and times. `None`: it could not be read (missing for a moment
/// during a swap).
#[derive(Clone, Debug, PartialEq, Eq)]
struct Fingerprint(Option<[i64; 7]>);

/// Reads the metadata off the async threads (a stalled mount must not stop
/// the proxy; the poll then waits, and the reload has its own time limit).
async fn fingerprint(path: &Path) -> Fingerprint {
    use std::os::unix::fs::MetadataExt as _;
    let path = path.to_path_buf();
    let read = tokio::task::spawn_blocking(move || {
        std::fs::metadata(&path).ok().map(|m| {
            // Casts of identifiers: only equality matters.
            [
                m.dev() as i64,
                m.ino() as i64,
                m.size() as i64,
                m.mtime(),
                m.mtime_nsec(),
                m.ctime(),
                m.ctime_nsec(),
            ]
        })
    });
    Fingerprint(read.await.ok().flatten())
}

/// Polls the config file and reloads on a change, until `stop`.
pub async fn watch(reload: Arc<ReloadContext>, interval: Duration, stop: CancellationToken) {
    let Some(path) = reload.config_path.clone() else {
        return;
    };
    tracing::info!(path = %path.display(), interval = ?interval, "watching the config file for changes");
    let mut applied = fingerprint(&path).await;
    let mut last = applied.clone();
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(interval) => {}
        }
        let now = fingerprint(&path).await;
        let settled = now == last;
        last = now.clone();
        if !settled || now == applied || now.0.is_none() {
            continue;
        }
        tracing::info!(path = %path.display(), "config file changed: reloading");
        applied = now;
        let _ = reload.reload().await;
    }
}
