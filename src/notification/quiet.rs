//! Step 2, before a command's first provider call under its claim: quiet
//! hours (`[quiet_hours]`). A `normal` or `bulk` command claimed while it
//! is night where its recipient is (in any zone of the number's country)
//! is held in the broker (`Outcome::Hold`, the hold queues) until the
//! window opens in all of them, plus its key's share of
//! `release_spread_s`; a `high` one is never held. Checked before the
//! per-recipient limits, so a held message is counted when it goes, not
//! when it is held. The lease is released and the hold is no attempt and
//! no failure (see `Notifier::forgo_claim`); a command whose `expiresAt`
//! comes first comes back then and fails as `expired`. Back from its hold
//! it is claimed and checked again.

use std::time::{Duration, SystemTime};

use tracing::info;

use super::{Attempt, Notifier};
use crate::domain::{zones_of, Priority};

impl Notifier {
    /// How long the command must wait for the quiet hours where its
    /// recipient is, if it must.
    pub(super) fn quiet_hours_wait(&self, a: &Attempt<'_>) -> Option<Duration> {
        let hours = self.settings.quiet_hours.as_ref()?;
        if a.cmd.priority == Priority::High || a.calls > 0 {
            return None;
        }
        let now = SystemTime::now();
        let zones = zones_of(&a.cmd.phone_number);
        let release = hours.release_at(now, zones, a.cmd.idempotency_key.as_str())?;
        let wait = release.duration_since(now).unwrap_or_default();
        self.meters.quiet_hours_held.increment(1);
        info!(
            wait_s = wait.as_secs(),
            priority = a.cmd.priority.as_str(),
            "quiet hours where the recipient is: held until they end"
        );
        Some(wait)
    }
}
