//! The config loader and validator (`Config::from_toml_str`) on arbitrary
//! text: an error or a config, never a panic. An error names at least one
//! problem, each with a message; a config has listeners and routes, and
//! every route's pool exists.
//!
//! Files: a config names files that validation reads (`tls.cert`,
//! `tls.key`, `tls.ticket_keys`, a cookie `secret_file`), relative to the working directory.
//! The target skips any input in which such a key (or any key ending in
//! `_file`) holds an absolute path or one that climbs with `..`, so the
//! fuzzer reads nothing outside the directory it runs in (`fuzz/`, where
//! scripts/fuzz.sh runs it): no device, FIFO or /proc file (some change
//! state when read). It does not change directory itself: libFuzzer writes
//! the corpus and crash inputs to paths relative to it. A key that names a
//! new kind of file goes into `FILE_KEYS`.
#![no_main]

use std::path::{Component, Path};

use berth::config::{Config, ConfigError};
use libfuzzer_sys::fuzz_target;

/// The keys whose values berth reads as file paths.
const FILE_KEYS: [&str; 4] = ["cert", "key", "secret_file", "ticket_keys"];

/// True when a string is a path that stays inside the working directory.
fn stays_inside(path: &str) -> bool {
    let path = Path::new(path);
    !path.is_absolute()
        && path
            .components()
            .all(|c| matches!(c, Component::Normal(_) | Component::CurDir))
}

/// True when every file path the document names (at any depth, under a
/// key that names a file) stays inside the working directory.
fn paths_stay_inside(key: &str, value: &toml::Value) -> bool {
    let names_file = FILE_KEYS.contains(&key) || key.ends_with("_file");
    match value {
        toml::Value::String(s) => !names_file || stays_inside(s),
        toml::Value::Array(items) => items.iter().all(|v| paths_stay_inside(key, v)),
        toml::Value::Table(table) => table.iter().all(|(k, v)| paths_stay_inside(k, v)),
        _ => true,
    }
}

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    // berth parses with the same `toml` crate: text it cannot parse is
    // refused before any file is named.
    if let Ok(doc) = toml::from_str::<toml::Table>(text) {
        if !doc.iter().all(|(k, v)| paths_stay_inside(k, v)) {
            return;
        }
    }
    match Config::from_toml_str(text, "fuzz.toml") {
        Ok(config) => {
            assert!(!config.listeners.is_empty(), "a config without listeners");
            assert!(!config.routes.is_empty(), "a config without routes");
            for route in &config.routes {
                assert!(config.pool(&route.pool).is_some(), "a route to no pool");
            }
        }
        Err(ConfigError::Invalid { problems, .. }) => {
            assert!(!problems.is_empty(), "an invalid config without a problem");
            for p in &problems {
                assert!(!p.message.is_empty(), "a problem without a message");
            }
        }
        Err(e @ ConfigError::Read { .. }) => panic!("from_toml_str reads no config file: {e}"),
    }
});
