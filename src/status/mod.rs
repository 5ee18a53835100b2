//! The live status page's data: one sampler task per berth, the snapshot
//! feed it publishes, and the page itself.
//!
//! The [`Sampler`] is the only task: once a second it reads the counters
//! (`snapshot::read`), turns them into rates and a five-minute close
//! history (`rates.rs`), builds one JSON snapshot (`snapshot.rs`) and
//! publishes it, already framed as a Server-Sent Event, on a `watch`
//! channel. Every `/admin/events` subscriber ([`Feed::events`]) shares that
//! one snapshot: subscribers cost no sampling of their own. The wiring
//! module starts the sampler with the admin API and stops it with the
//! admin API's stop token at the end of shutdown; dropping its sender ends
//! every event stream, so no subscriber holds the admin listener open.
//!
//! The page (`page.html`, `page.css`, `page.js`, embedded at build time)
//! loads nothing from elsewhere and draws everything from the snapshots
//! with `textContent`; its `Content-Security-Policy` allows only its own
//! script and style (by hash) and connections to its own origin.

mod process;
mod rates;
mod snapshot;

use std::path::Path;
use std::sync::{Arc, LazyLock};
use std::time::Duration;

use base64::Engine;
use bytes::Bytes;
use sha2::{Digest, Sha256};
use tokio::sync::watch;
use tokio::time::{Instant, MissedTickBehavior};
use tokio_util::sync::CancellationToken;

pub use process::{fd_usage, FdUsage};
pub use rates::{BUCKET_SECONDS, HISTORY_SECONDS, TLS_SHARE_SECONDS};
pub use snapshot::{drained_by, pools_document};

use crate::lifecycle::Lifecycle;
use crate::metrics::Metrics;
use crate::reload::{unix_now, ReloadContext};
use crate::routing::Routing;

/// How often the sampler reads the counters and publishes a snapshot.
pub const SAMPLE_EVERY: Duration = Duration::from_secs(1);

/// The berth version and the commit it was built from.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");
pub const COMMIT: &str = env!("BERTH_GIT_COMMIT");

/// The one task that samples the counters for the status page.
pub struct Sampler {
    routing: Arc<Routing>,
    metrics: Metrics,
    lifecycle: Arc<Lifecycle>,
    reload: Arc<ReloadContext>,
    tx: watch::Sender<Bytes>,
}

/// The snapshots the sampler publishes; cheap to clone, one per subscriber.
#[derive(Clone)]
pub struct Feed {
    rx: watch::Receiver<Bytes>,
}

impl Sampler {
    /// A sampler (not yet running) and the feed its snapshots go to.
    pub fn new(
        routing: Arc<Routing>,
        metrics: Metrics,
        lifecycle: Arc<Lifecycle>,
        reload: Arc<ReloadContext>,
    ) -> (Sampler, Feed) {
        let (tx, rx) = watch::channel(Bytes::new());
        let sampler = Sampler {
            routing,
            metrics,
            lifecycle,
            reload,
            tx,
        };
        (sampler, Feed { rx })
    }

    /// Samples once a second until `stop` is cancelled; the first snapshot
    /// goes out at once (its rates are zero: there is nothing to compare
    /// with yet).
    pub async fn run(self, stop: CancellationToken) {
        let mut history = rates::History::default();
        let mut tick = tokio::time::interval(SAMPLE_EVERY);
        tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
        let mut last = Instant::now();
        loop {
            tokio::select! {
                _ = stop.cancelled() => break,
                _ = tick.tick() => {}
            }
            let now = Instant::now();
            let runtime = self.routing.load_full();
            history.push(snapshot::read(&self.metrics, &runtime), now - last);
            last = now;
            let token_required = runtime
                .config
                .admin
                .as_ref()
                .is_some_and(|a| a.token.is_some());
            let facts = snapshot::Facts {
                version: VERSION,
                commit: COMMIT,
                config_path: self.reload.config_path.as_deref(),
                time: unix_now(),
                token_required,
                connections_open: snapshot::connections_open(&self.metrics),
                websockets_open: self.lifecycle.live_websockets(),
                fds: fd_usage(&self.reload.listeners.fds),
                drains: self.lifecycle.drains(),
                last_reload: self.reload.last_reload(),
            };
            let doc = snapshot::snapshot(&runtime, &history, facts);
            self.tx.send_replace(event(&doc.to_string()));
        }
        tracing::debug!("status sampler stopped");
    }
}

/// One Server-Sent Event carrying `json` (which has no newlines).
fn event(json: &str) -> Bytes {
    let mut out = String::with_capacity(json.len() + 8);
    out.push_str("data: ");
    out.push_str(json);
    out.push_str("\n\n");
    Bytes::from(out)
}

/// Sent first on every event stream: how long a browser waits before it
/// reconnects a dropped stream.
const RETRY: &[u8] = b"retry: 2000\n\n";

impl Feed {
    /// The latest snapshot as JSON; `None` before the sampler's first.
    pub fn latest(&self) -> Option<serde_json::Value> {
        let event = self.rx.borrow().clone();
        let json = event.strip_prefix(b"data: ")?;
        serde_json::from_slice(json).ok()
    }

    /// The event stream of one subscriber: the retry delay and the latest
    /// snapshot at once, then each new one. It ends when the sampler stops.
    pub fn events(&self) -> impl futures_util::Stream<Item = Bytes> + Send + 'static {
        futures_util::stream::unfold((self.rx.clone(), true), |(mut rx, first)| async move {
            if first {
                let latest = rx.borrow_and_update().clone();
                let mut out = RETRY.to_vec();
                out.extend_from_slice(&latest);
                return Some((Bytes::from(out), (rx, false)));
            }
            rx.changed().await.ok()?;
            let next = rx.borrow_and_update().clone();
            Some((next, (rx, false)))
        })
    }
}

const PAGE_HTML: &str = include_str!("page.html");
const PAGE_CSS: &str = include_str!("page.css");
const PAGE_JS: &str = include_str!("page.js");

/// The page with its style and script inlined, and the CSP that allows
/// exactly those two (by hash), built once.
static PAGE: LazyLock<(String, String)> = LazyLock::new(|| {
    let hash = |text: &str| {
        let digest = Sha256::digest(text.as_bytes());
        format!(
            "'sha256-{}'",
            base64::engine::general_purpose::STANDARD.encode(digest)
        )
    };
    let csp = format!(
        "default-src 'none'; script-src {}; style-src {}; connect-src 'self'; \
         img-src 'self' data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'",
        hash(PAGE_JS),
        hash(PAGE_CSS)
    );
    let html = PAGE_HTML
        .replacen("{{STYLE}}", PAGE_CSS, 1)
        .replacen("{{SCRIPT}}", PAGE_JS, 1);
    (html, csp)
});

/// The status page for a berth running `config_path`, and its
/// `Content-Security-Policy` header value.
pub fn page(config_path: Option<&Path>) -> (String, &'static str) {
    let (html, csp) = &*PAGE;
    let path = config_path.map_or_else(
        || "(no config file)".to_string(),
        |p| p.display().to_string(),
    );
    let title = format!("berth {VERSION} ({COMMIT}) · {path}");
    (html.replacen("{{TITLE}}", &escape_html(&title), 1), csp)
}

/// Text made safe for HTML element content and attribute values.
pub fn escape_html(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

#[cfg(test)]
mod tests;
