//! Process-wide facts for the status page that no metric carries directly.

use crate::limits::{fd_reserve, FdGuard};

/// File descriptors as the descriptor reserve sees them.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
pub struct FdUsage {
    /// The descriptors berth is estimated to hold (`FdGuard`'s estimate).
    pub open: u64,
    /// The soft `RLIMIT_NOFILE`.
    pub limit: u64,
    /// The descriptors kept free under the limit (`limits::fd_reserve`).
    pub reserve: u64,
}

impl FdUsage {
    /// Descriptors still available before berth starts refusing client
    /// connections (`reason="fd_limit"`): the limit less what is open and
    /// the reserve.
    pub fn headroom(&self) -> u64 {
        self.limit
            .saturating_sub(self.open)
            .saturating_sub(self.reserve)
    }
}

/// The descriptor guard's numbers now (no count of its own: the guard's
/// monitor counts `/proc/self/fd` off the async threads); `None` where the
/// guard cannot count descriptors (not Linux).
pub fn fd_usage(fds: &FdGuard) -> Option<FdUsage> {
    let open = fds.open_estimate()?;
    let limit = fds.limit();
    Some(FdUsage {
        open,
        limit,
        reserve: fd_reserve(limit),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[cfg(target_os = "linux")]
    #[test]
    fn fd_usage_sees_a_new_descriptor() {
        let guard = FdGuard::new();
        let before = fd_usage(&guard).unwrap();
        assert!(before.open > 0 && before.limit >= before.open, "{before:?}");
        assert_eq!(before.reserve, 256 + before.limit / 100);
        let files: Vec<std::fs::File> = (0..64)
            .map(|_| std::fs::File::open("/proc/self/status").unwrap())
            .collect();
        // The guard's monitor counts every few seconds; count now.
        guard.sample();
        let after = fd_usage(&guard).unwrap();
        // Other tests open and close descriptors meanwhile: allow a margin.
        assert!(after.open >= before.open + 48, "{before:?} {after:?}");
        assert_eq!(after.headroom(), after.limit - after.open - after.reserve);
        drop(files);
    }

    #[test]
    fn headroom_never_goes_below_zero() {
        let full = FdUsage {
            open: 70,
            limit: 64,
            reserve: 0,
        };
        assert_eq!(full.headroom(), 0);
        let in_reserve = FdUsage {
            open: 500,
            limit: 1024,
            reserve: 266,
        };
        assert_eq!(in_reserve.headroom(), 258);
        let reserved = FdUsage {
            open: 900,
            limit: 1024,
            reserve: 266,
        };
        assert_eq!(reserved.headroom(), 0);
    }
}
