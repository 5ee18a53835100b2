//! A pool's limits (`max_message_size`, `max_upgrades_per_second`,
//! `upgrade_burst`, `retry_after_max`, `send_timeout`): checked with the
//! rules of `rules.rs` into [`PoolLimits`].

use super::super::file::FilePool;
use super::super::locate::Seg;
use super::super::rules;
use super::super::{PoolLimits, UpgradeRate};
use super::{path, Checker};

impl Checker<'_, '_> {
    pub(super) fn pool_limits(&mut self, name: &str, raw: &FilePool) -> PoolLimits {
        let base = [Seg::Key("pools"), Seg::Key(name)];
        let key = |k: &'static str| path(&base, &[Seg::Key(k)]);
        let max_message_size = raw.max_message_size.as_ref().and_then(|size| {
            self.check(
                &key("max_message_size"),
                rules::size(size, &rules::MAX_MESSAGE_SIZE)
                    .map_err(|message| format!("{message} (omit it for no limit)")),
            )
        });
        let per_second = raw.max_upgrades_per_second.and_then(|n| {
            self.check(
                &key("max_upgrades_per_second"),
                rules::int(n, &rules::MAX_UPGRADES_PER_SECOND)
                    .map_err(|message| format!("{message} (omit it for no limit)")),
            )
        });
        let burst = raw
            .upgrade_burst
            .and_then(|n| self.check(&key("upgrade_burst"), rules::int(n, &rules::UPGRADE_BURST)));
        if raw.upgrade_burst.is_some() && raw.max_upgrades_per_second.is_none() {
            self.push(
                &key("upgrade_burst"),
                "upgrade_burst needs max_upgrades_per_second (the rate its bucket refills at)",
            );
        }
        // Both are at most 1,000,000, so they fit.
        let upgrade_rate = per_second.map(|rate| {
            let per_second = u32::try_from(rate).unwrap_or(u32::MAX);
            UpgradeRate {
                per_second,
                burst: burst.map_or(per_second, |b| u32::try_from(b).unwrap_or(u32::MAX)),
            }
        });
        let retry_after_max = self.duration(
            &key("retry_after_max"),
            raw.retry_after_max.as_deref(),
            rules::RETRY_AFTER_MAX,
        );
        let send_timeout = self.optional_duration(
            &key("send_timeout"),
            raw.send_timeout.as_deref(),
            rules::SEND_TIMEOUT,
        );
        PoolLimits {
            max_message_size,
            upgrade_rate,
            retry_after_max,
            send_timeout,
        }
    }
}
