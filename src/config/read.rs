//! Reading the config file and the files it names, without letting a file
//! hang or bloat the process.
//!
//! A file named by the config (a TLS certificate or key, a cookie
//! `secret_file`) is read only if it is a regular file, and only up to a
//! cap: a FIFO would block the reader forever and `/dev/zero` would grow it
//! without end. The type is checked with `metadata` before opening, the
//! file is opened non-blocking (so that a FIFO swapped in after the check
//! cannot block the `open`), checked again on the open handle, and read
//! through `take(cap + 1)`. Relative paths are resolved against the config
//! file's directory.
//!
//! Everything here is blocking file I/O: see `Config::load_async` for
//! callers on the async runtime.

use std::fs::File;
use std::io::Read;
use std::path::{Path, PathBuf};

/// The largest config file berth reads.
pub(super) const CONFIG_FILE_LIMIT: u64 = 1024 * 1024;
/// The largest PEM certificate chain or private key berth reads.
pub(super) const PEM_LIMIT: u64 = 1024 * 1024;
/// The largest cookie or JWT `secret_file` berth reads.
pub(super) const SECRET_LIMIT: u64 = 64 * 1024;
/// The largest `ticket_keys` file berth reads: 51 keys of 80 bytes.
pub(super) const TICKET_KEYS_LIMIT: u64 = 4 * 1024;
/// The largest JWKS document berth reads (a `jwks_file`, or a fetched set).
pub const JWKS_LIMIT: u64 = 1024 * 1024;

/// Why a file named by the config could not be used.
#[derive(Debug, thiserror::Error)]
pub(super) enum FileError {
    #[error("{path}: cannot read {what}: {source}")]
    Io {
        path: String,
        what: &'static str,
        source: std::io::Error,
    },
    #[error("{path}: {what} must be a regular file, not {kind}")]
    NotRegular {
        path: String,
        what: &'static str,
        kind: &'static str,
    },
    #[error("{path}: {what} is larger than {limit} (the limit for this key)")]
    TooLarge {
        path: String,
        what: &'static str,
        limit: String,
    },
}

/// `path` as named in a config read from `base` (the config file's
/// directory): relative paths are joined to it. Without a base (a config
/// given as a string) the path is left as is, so it resolves against the
/// working directory.
pub(super) fn resolve(base: Option<&Path>, path: &str) -> PathBuf {
    let path = Path::new(path);
    match base {
        Some(base) if path.is_relative() => base.join(path),
        _ => path.to_path_buf(),
    }
}

/// The contents of the regular file `path`, at most `limit` bytes; `what`
/// names the file in errors ("certificate file", "secret file").
pub(super) fn regular_file(
    path: &Path,
    what: &'static str,
    limit: u64,
) -> Result<Vec<u8>, FileError> {
    let name = || path.display().to_string();
    let io = |source| FileError::Io {
        path: name(),
        what,
        source,
    };
    let check = |meta: &std::fs::Metadata| {
        if !meta.is_file() {
            return Err(FileError::NotRegular {
                path: name(),
                what,
                kind: kind(meta),
            });
        }
        if meta.len() > limit {
            return Err(too_large(name(), what, limit));
        }
        Ok(())
    };
    check(&std::fs::metadata(path).map_err(io)?)?;
    let file = open_nonblocking(path).map_err(io)?;
    check(&file.metadata().map_err(io)?)?;
    let bytes = read_capped(file, limit).map_err(io)?;
    if bytes.len() as u64 > limit {
        return Err(too_large(name(), what, limit));
    }
    Ok(bytes)
}

/// The config file itself: any file that can be read (`berth check --config
/// <(...)` is a pipe), but at most [`CONFIG_FILE_LIMIT`] bytes of UTF-8.
/// An error is the `std::io::Error` to report for the file.
pub(super) fn config_text(path: &Path) -> Result<String, std::io::Error> {
    let bytes = read_capped(File::open(path)?, CONFIG_FILE_LIMIT)?;
    if bytes.len() as u64 > CONFIG_FILE_LIMIT {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("the file is larger than {}", size(CONFIG_FILE_LIMIT)),
        ));
    }
    String::from_utf8(bytes).map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))
}

/// Up to `limit + 1` bytes, so that the caller can tell "too large".
fn read_capped(file: File, limit: u64) -> std::io::Result<Vec<u8>> {
    let mut bytes = Vec::new();
    file.take(limit.saturating_add(1)).read_to_end(&mut bytes)?;
    Ok(bytes)
}

#[cfg(unix)]
fn open_nonblocking(path: &Path) -> std::io::Result<File> {
    use std::os::unix::fs::OpenOptionsExt;
    // On a regular file O_NONBLOCK changes nothing; on a FIFO it makes the
    // open return at once instead of waiting for a writer.
    std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(path)
}

#[cfg(not(unix))]
fn open_nonblocking(path: &Path) -> std::io::Result<File> {
    File::open(path)
}

fn too_large(path: String, what: &'static str, limit: u64) -> FileError {
    FileError::TooLarge {
        path,
        what,
        limit: size(limit),
    }
}

/// `64 KiB`, `1 MiB`.
pub(super) fn size(bytes: u64) -> String {
    if bytes >= 1024 * 1024 && bytes % (1024 * 1024) == 0 {
        format!("{} MiB", bytes / (1024 * 1024))
    } else if bytes >= 1024 && bytes % 1024 == 0 {
        format!("{} KiB", bytes / 1024)
    } else {
        format!("{bytes} bytes")
    }
}

/// What a file that is not a regular file is, for the message.
fn kind(meta: &std::fs::Metadata) -> &'static str {
    let ft = meta.file_type();
    if ft.is_dir() {
        return "a directory";
    }
    #[cfg(unix)]
    {
        use std::os::unix::fs::FileTypeExt;
        if ft.is_fifo() {
            return "a FIFO";
        }
        if ft.is_char_device() {
            return "a character device";
        }
        if ft.is_block_device() {
            return "a block device";
        }
        if ft.is_socket() {
            return "a socket";
        }
    }
    "a special file"
}
