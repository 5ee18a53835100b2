//! A small WebDriver client for real-browser tests: headless Chromium
//! driven by chromedriver over the W3C WebDriver protocol, spoken with
//! hyper (no other HTTP client).
//!
//! [`Browser::start`] runs chromedriver on a free port and opens a session
//! with a fresh profile directory; dropping the [`Browser`] deletes the
//! session (which closes Chromium) and kills chromedriver. Scripts run in
//! the page with [`Browser::execute`] (sync) and [`Browser::execute_async`]
//! (the last argument is the callback); [`Browser::wait_until`] polls a
//! script until it returns something truthy.
//!
//! The binaries are Debian's `chromium` and `chromium-driver`
//! (`scripts/test.sh` installs them when missing); `BERTH_CHROMIUM` and
//! `BERTH_CHROMEDRIVER` override their paths.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use base64::Engine;
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use serde_json::{json, Value};

/// Chromium's path unless `BERTH_CHROMIUM` says otherwise.
pub fn chromium_path() -> PathBuf {
    std::env::var_os("BERTH_CHROMIUM").map_or_else(|| "/usr/bin/chromium".into(), PathBuf::from)
}

/// chromedriver's path unless `BERTH_CHROMEDRIVER` says otherwise.
pub fn chromedriver_path() -> PathBuf {
    std::env::var_os("BERTH_CHROMEDRIVER")
        .map_or_else(|| "/usr/bin/chromedriver".into(), PathBuf::from)
}

/// How a browser is started.
#[derive(Clone, Debug)]
pub struct BrowserOptions {
    /// The window's size in CSS pixels (also the screenshot's size).
    pub window: (u32, u32),
    /// Accept self-signed and otherwise invalid certificates.
    pub accept_insecure_certs: bool,
    /// Extra Chromium command-line switches (e.g. `--enable-features=...`).
    pub extra_args: Vec<String>,
    /// How long to wait for chromedriver and the session to start.
    pub start_timeout: Duration,
}

impl Default for BrowserOptions {
    fn default() -> BrowserOptions {
        BrowserOptions {
            window: (1280, 900),
            accept_insecure_certs: true,
            extra_args: Vec::new(),
            start_timeout: Duration::from_secs(60),
        }
    }
}

type HttpClient = Client<HttpConnector, Full<Bytes>>;

/// A running headless Chromium session.
pub struct Browser {
    driver: Child,
    base: String,
    session: String,
    client: HttpClient,
    profile: tempfile::TempDir,
}

impl Browser {
    /// Starts chromedriver and a headless Chromium with the defaults.
    pub async fn start() -> Browser {
        Browser::start_with(BrowserOptions::default()).await
    }

    /// Starts chromedriver on a free port and a session per `options`.
    /// Panics with chromedriver's log when either does not come up.
    pub async fn start_with(options: BrowserOptions) -> Browser {
        let driver_bin = chromedriver_path();
        let chromium = chromium_path();
        assert!(
            driver_bin.exists() && chromium.exists(),
            "real-browser tests need {} and {} (apt-get install chromium chromium-driver; scripts/test.sh does)",
            chromium.display(),
            driver_bin.display()
        );
        let profile = tempfile::tempdir().unwrap();
        let log_path = profile.path().join("chromedriver.log");
        let port = free_port();
        let driver = Command::new(&driver_bin)
            .arg(format!("--port={port}"))
            .arg(format!("--log-path={}", log_path.display()))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot run {}: {e}", driver_bin.display()));
        let client = Client::builder(TokioExecutor::new()).build_http();
        let mut browser = Browser {
            driver,
            base: format!("http://127.0.0.1:{port}"),
            session: String::new(),
            client,
            profile,
        };
        let deadline = Instant::now() + options.start_timeout;
        loop {
            if let Ok(status) = browser.request("GET", "/status", None).await {
                if status["ready"] == true {
                    break;
                }
            }
            if let Ok(Some(exit)) = browser.driver.try_wait() {
                panic!("chromedriver exited ({exit}): {}", browser.driver_log());
            }
            assert!(
                Instant::now() < deadline,
                "chromedriver did not start: {}",
                browser.driver_log()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let user_data = browser.profile_dir();
        let mut args: Vec<String> = [
            "--headless=new",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--disable-dev-shm-usage",
            "--ignore-certificate-errors",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        args.push(format!("--user-data-dir={}", user_data.display()));
        args.push(format!(
            "--window-size={},{}",
            options.window.0, options.window.1
        ));
        args.extend(options.extra_args.iter().cloned());
        let caps = json!({
            "capabilities": {
                "alwaysMatch": {
                    "browserName": "chrome",
                    "acceptInsecureCerts": options.accept_insecure_certs,
                    "goog:chromeOptions": {
                        "binary": chromium.display().to_string(),
                        "args": args,
                    },
                    "goog:loggingPrefs": { "browser": "ALL" },
                }
            }
        });
        let created = browser
            .request("POST", "/session", Some(caps))
            .await
            .unwrap_or_else(|e| panic!("cannot start a session: {e}\n{}", browser.driver_log()));
        browser.session = created["sessionId"]
            .as_str()
            .unwrap_or_else(|| panic!("no sessionId in {created}"))
            .to_string();
        browser
    }

    /// The browser's profile directory (`--user-data-dir`), unique to this
    /// browser and removed with it.
    pub fn profile_dir(&self) -> PathBuf {
        self.profile.path().join("profile")
    }

    /// The tail of chromedriver's log, for failure messages.
    pub fn driver_log(&self) -> String {
        let log = std::fs::read_to_string(self.profile.path().join("chromedriver.log"))
            .unwrap_or_default();
        let lines: Vec<&str> = log.lines().collect();
        lines[lines.len().saturating_sub(40)..].join("\n")
    }

    /// One WebDriver command; the response's `value`, or the WebDriver
    /// error as text.
    pub async fn request(
        &self,
        method: &str,
        path: &str,
        body: Option<Value>,
    ) -> Result<Value, String> {
        send(&self.client, &self.base, method, path, body).await
    }

    fn session_path(&self, tail: &str) -> String {
        format!("/session/{}{tail}", self.session)
    }

    async fn command(&self, method: &str, tail: &str, body: Option<Value>) -> Value {
        let path = self.session_path(tail);
        self.request(method, &path, body)
            .await
            .unwrap_or_else(|e| panic!("WebDriver {method} {tail}: {e}"))
    }

    /// Types `text` into the element `css` selects, as keystrokes
    /// (WebDriver's Element Send Keys).
    pub async fn type_into(&self, css: &str, text: &str) {
        let found = self
            .command(
                "POST",
                "/element",
                Some(json!({ "using": "css selector", "value": css })),
            )
            .await;
        let id = found
            .as_object()
            .and_then(|o| o.values().next())
            .and_then(Value::as_str)
            .unwrap_or_else(|| panic!("no element {css}: {found}"))
            .to_string();
        self.command(
            "POST",
            &format!("/element/{id}/value"),
            Some(json!({ "text": text })),
        )
        .await;
    }

    /// Navigates to `url` and waits for the page to load.
    pub async fn goto(&self, url: &str) {
        self.command("POST", "/url", Some(json!({ "url": url })))
            .await;
    }

    pub async fn current_url(&self) -> String {
        self.command("GET", "/url", None)
            .await
            .as_str()
            .unwrap_or_default()
            .to_string()
    }

    pub async fn title(&self) -> String {
        self.command("GET", "/title", None)
            .await
            .as_str()
            .unwrap_or_default()
            .to_string()
    }

    /// Runs `script` as a function body in the page (`arguments` are
    /// `args`); returns what it returns. A script error is `Err`.
    pub async fn try_execute(&self, script: &str, args: Vec<Value>) -> Result<Value, String> {
        let path = self.session_path("/execute/sync");
        self.request(
            "POST",
            &path,
            Some(json!({ "script": script, "args": args })),
        )
        .await
    }

    /// [`Browser::try_execute`], panicking on a script error.
    pub async fn execute(&self, script: &str, args: Vec<Value>) -> Value {
        self.try_execute(script, args)
            .await
            .unwrap_or_else(|e| panic!("script failed: {e}\n{script}"))
    }

    /// Runs `script` asynchronously: it ends by calling its last argument
    /// (`arguments[arguments.length - 1]`) with the result.
    pub async fn execute_async(&self, script: &str, args: Vec<Value>) -> Value {
        let path = self.session_path("/execute/async");
        self.request(
            "POST",
            &path,
            Some(json!({ "script": script, "args": args })),
        )
        .await
        .unwrap_or_else(|e| panic!("async script failed: {e}\n{script}"))
    }

    /// Runs `script` every 100 ms until it returns something truthy (not
    /// `null`, `false`, `0` or `""`) and returns that; panics after
    /// `timeout` naming `what` and the last value.
    pub async fn wait_until(&self, timeout: Duration, what: &str, script: &str) -> Value {
        let deadline = Instant::now() + timeout;
        loop {
            let last = match self.try_execute(script, Vec::new()).await {
                Ok(v) if truthy(&v) => return v,
                Ok(v) => v,
                Err(e) => Value::String(e),
            };
            assert!(
                Instant::now() < deadline,
                "timed out after {timeout:?} waiting for {what}; last value: {last}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Resizes the window (CSS pixels).
    pub async fn set_window_size(&self, width: u32, height: u32) {
        self.command(
            "POST",
            "/window/rect",
            Some(json!({ "width": width, "height": height })),
        )
        .await;
    }

    /// The visible part of the page as PNG bytes.
    pub async fn screenshot(&self) -> Vec<u8> {
        let encoded = self.command("GET", "/screenshot", None).await;
        base64::engine::general_purpose::STANDARD
            .decode(encoded.as_str().unwrap_or_default())
            .expect("screenshot is base64")
    }

    /// Writes [`Browser::screenshot`] to `path`.
    pub async fn save_screenshot(&self, path: &Path) {
        std::fs::write(path, self.screenshot().await).unwrap();
    }

    /// The browser console's messages since the last call, as
    /// `LEVEL message` lines (CSP violations and script errors are SEVERE).
    pub async fn console(&self) -> Vec<String> {
        let path = self.session_path("/se/log");
        let entries = self
            .request("POST", &path, Some(json!({ "type": "browser" })))
            .await
            .unwrap_or(Value::Null);
        entries
            .as_array()
            .into_iter()
            .flatten()
            .map(|e| {
                format!(
                    "{} {}",
                    e["level"].as_str().unwrap_or("?"),
                    e["message"].as_str().unwrap_or("")
                )
            })
            .collect()
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        if !self.session.is_empty() {
            // Deleting the session quits Chromium (chromedriver waits for
            // it to exit). Drop cannot await, and the caller's runtime may
            // be the one this thread blocks, so the request runs on a
            // thread of its own, with its own runtime and client (a pooled
            // connection of the caller's runtime would never be polled).
            let base = self.base.clone();
            let path = format!("/session/{}", self.session);
            let _ = std::thread::spawn(move || {
                let Ok(rt) = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                else {
                    return;
                };
                rt.block_on(async {
                    let client: HttpClient = Client::builder(TokioExecutor::new()).build_http();
                    let limit = Duration::from_secs(10);
                    let delete = send(&client, &base, "DELETE", &path, None);
                    if !matches!(tokio::time::timeout(limit, delete).await, Ok(Ok(_))) {
                        // chromedriver's own endpoint: quit every session, then itself.
                        let shutdown = send(&client, &base, "GET", "/shutdown", None);
                        let _ = tokio::time::timeout(limit, shutdown).await;
                    }
                });
            })
            .join();
        }
        let _ = self.driver.kill();
        let _ = self.driver.wait();
    }
}

/// A WebDriver request with `client`: the response's `value`, or the
/// error WebDriver reported.
async fn send(
    client: &HttpClient,
    base: &str,
    method: &str,
    path: &str,
    body: Option<Value>,
) -> Result<Value, String> {
    let bytes = body.map_or_else(Bytes::new, |b| Bytes::from(b.to_string()));
    let req = hyper::Request::builder()
        .method(method)
        .uri(format!("{base}{path}"))
        .header("content-type", "application/json; charset=utf-8")
        .body(Full::new(bytes))
        .map_err(|e| e.to_string())?;
    let resp = client.request(req).await.map_err(|e| e.to_string())?;
    let status = resp.status();
    let body = resp
        .into_body()
        .collect()
        .await
        .map_err(|e| e.to_string())?
        .to_bytes();
    let json: Value = serde_json::from_slice(&body)
        .map_err(|e| format!("{status}: {e}: {}", String::from_utf8_lossy(&body)))?;
    let value = json.get("value").cloned().unwrap_or(Value::Null);
    if status.is_success() {
        Ok(value)
    } else {
        Err(format!(
            "{status} {}: {}",
            value["error"].as_str().unwrap_or("error"),
            value["message"].as_str().unwrap_or("")
        ))
    }
}

fn truthy(v: &Value) -> bool {
    match v {
        Value::Null => false,
        Value::Bool(b) => *b,
        Value::Number(n) => n.as_f64().is_some_and(|f| f != 0.0),
        Value::String(s) => !s.is_empty(),
        Value::Array(_) | Value::Object(_) => true,
    }
}

/// A loopback port free a moment ago.
fn free_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr: SocketAddr = l.local_addr().unwrap();
    addr.port()
}
