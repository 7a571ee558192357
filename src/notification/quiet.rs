//! Quiet hours (`[quiet_hours]`). A `normal` or `bulk` command taken while
//! it is night where its recipient is (in any zone of the number's
//! country) is held in the broker (`Outcome::Hold`, the hold queues) until
//! the window opens in all of them, plus its key's share of
//! `release_spread_s`; a `high` one is never held. A command whose
//! `expiresAt` comes first comes back then and fails as `expired`.
//!
//! Checked twice. First in step 0 (`schedule.rs`), before the command
//! waits for a send slot or the rate limit and before any claim, as a
//! `sendAt` is: its key is recorded as `scheduled` until the release, so a
//! night's backlog costs no slot, token or claim on each return from its
//! hold, and a cancel finds it open. A key known otherwise (in its
//! retries, say) goes on to the claim, and is checked again before its
//! first provider call under that claim (step 2, before the per-recipient
//! limits, so a held message is counted when it goes): then its lease is
//! released and the hold is no attempt and no failure (see
//! `Notifier::forgo_claim`).

use std::time::{Duration, SystemTime};

use tracing::info;

use super::send::PAST_EXPIRY;
use super::{Attempt, Notifier};
use crate::domain::{zones_of, Priority, SendSms};

impl Notifier {
    /// When `cmd` may go, if the quiet hours where its recipient is hold it
    /// at `now`: their end plus its key's share of the spread, but no later
    /// than just past its `expiresAt`. `None` for a `high` command, outside
    /// quiet hours, and for a command already expired (it fails as such).
    pub(super) fn quiet_release(&self, cmd: &SendSms, now: SystemTime) -> Option<SystemTime> {
        let hours = self.settings.quiet_hours.as_ref()?;
        if cmd.priority == Priority::High || cmd.expires_at.is_some_and(|at| at <= now) {
            return None;
        }
        let zones = zones_of(&cmd.phone_number);
        let release = hours.release_at(now, zones, cmd.idempotency_key.as_str())?;
        Some(match cmd.expires_at {
            Some(at) => release.min(at + PAST_EXPIRY),
            None => release,
        })
    }

    /// How long the command of `a` must wait for the quiet hours where its
    /// recipient is, if it must, before its first call under its claim.
    pub(super) fn quiet_hours_wait(&self, a: &Attempt<'_>) -> Option<Duration> {
        if a.calls > 0 {
            return None;
        }
        let now = SystemTime::now();
        let wait = self
            .quiet_release(a.cmd, now)?
            .duration_since(now)
            .unwrap_or_default();
        self.held_for_quiet_hours(a.cmd, wait);
        Some(wait)
    }

    /// Counts and logs a hold for quiet hours.
    pub(super) fn held_for_quiet_hours(&self, cmd: &SendSms, wait: Duration) {
        self.meters.quiet_hours_held.increment(1);
        info!(
            wait_s = wait.as_secs(),
            priority = cmd.priority.as_str(),
            "quiet hours where the recipient is: held until they end"
        );
    }
}
