//! Process-wide facts for the status page that no metric carries directly.

/// Open file descriptors against the process's limit.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
pub struct FdUsage {
    pub open: u64,
    /// The soft `RLIMIT_NOFILE`.
    pub limit: u64,
}

impl FdUsage {
    /// Descriptors still available before accepts start failing.
    pub fn headroom(&self) -> u64 {
        self.limit.saturating_sub(self.open)
    }
}

/// The fd headroom now: the entries of `/proc/self/fd` against the soft
/// `RLIMIT_NOFILE`; `None` where either cannot be read (not Linux).
///
/// One function on purpose: when berth gets an fd guard of its own, this is
/// the one place to ask it instead.
pub fn fd_usage() -> Option<FdUsage> {
    let (limit, _hard) = rlimit::getrlimit(rlimit::Resource::NOFILE).ok()?;
    // read_dir holds one descriptor of its own while it lists the others.
    let open = std::fs::read_dir("/proc/self/fd").ok()?.count() as u64;
    Some(FdUsage {
        open: open.saturating_sub(1),
        limit,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[cfg(target_os = "linux")]
    #[test]
    fn fd_usage_sees_a_new_descriptor() {
        let before = fd_usage().unwrap();
        assert!(before.open > 0 && before.limit >= before.open, "{before:?}");
        let files: Vec<std::fs::File> = (0..64)
            .map(|_| std::fs::File::open("/proc/self/status").unwrap())
            .collect();
        let after = fd_usage().unwrap();
        // Other tests open and close descriptors meanwhile: allow a margin.
        assert!(after.open >= before.open + 48, "{before:?} {after:?}");
        assert_eq!(after.headroom(), after.limit - after.open);
        drop(files);
    }

    #[test]
    fn headroom_never_goes_below_zero() {
        let full = FdUsage {
            open: 70,
            limit: 64,
        };
        assert_eq!(full.headroom(), 0);
    }
}
