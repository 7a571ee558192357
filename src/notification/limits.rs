//! Step 2, before a command's first provider call under its claim: the
//! per-recipient limits (`[limits]`), against SMS pumping and loops.
//!
//! The check runs after the claim, so a duplicate of a key that is sent,
//! failed or in flight never counts (the claim answered for it), and after
//! everything that could stop the call without one (an open breaker, the
//! expiry), so only a message about to go counts. The store counts per
//! idempotency key: a retry, a redelivery or a return from a delay tier
//! goes without counting again while its count is inside the longest
//! window. Numbers in `limits.allow` are neither counted nor limited.
//!
//! Over a limit, the action of the command's priority decides:
//!
//! - `fail`: SmsFailed `recipient_rate_limited`, recorded and published as
//!   any failure, then dead-lettered;
//! - `delay`: the lease is released and the command waits in the delay
//!   tiers until the windows let one more through, then is claimed and
//!   checked again. The wait is no provider call and no failure: it counts
//!   neither in `retry.max_attempts` nor in the tier climbed, and for a key
//!   that has made no call yet it does not count in `retry.max_age` either
//!   (its age starts afresh; see `CacheService::postpone`). A key whose
//!   `expiresAt` comes first comes back then, and fails as `expired`.

use std::collections::HashSet;

use tracing::{info, warn, Instrument};

use super::{Attempt, Notifier};
use crate::domain::{FailureReason, LimitAction, LimitActions, RateWindow};
use crate::ports::{Outcome, RecipientSend};

/// Per-recipient limits, as `[limits]` sets them.
#[derive(Debug, Clone, Default)]
pub struct RecipientLimits {
    /// The sliding windows; empty: no limit.
    pub windows: Vec<RateWindow>,
    /// What happens over a limit, by priority.
    pub actions: LimitActions,
    /// Numbers (E.164) never counted nor limited: test numbers.
    pub allow: HashSet<String>,
}

impl RecipientLimits {
    /// `5/15m, 20/24h`, for logs and failure details.
    fn describe(&self) -> String {
        let windows: Vec<String> = self.windows.iter().map(ToString::to_string).collect();
        windows.join(", ")
    }
}

impl Notifier {
    /// Counts the command against its recipient's limits before its first
    /// provider call under this claim; the outcome when it must not go now.
    pub(super) async fn over_recipient_limit(&self, a: &mut Attempt<'_>) -> Option<Outcome> {
        let limits = &self.settings.limits;
        let to = a.cmd.phone_number.as_str();
        if limits.windows.is_empty() || a.calls > 0 || limits.allow.contains(to) {
            return None;
        }
        let key = &a.cmd.idempotency_key;
        let span = tracing::info_span!("recipient_limit", verdict = tracing::field::Empty);
        let verdict = self
            .cache
            .record_recipient_send(to, key, &limits.windows)
            .instrument(span.clone())
            .await;
        let retry_after = match verdict {
            Ok(RecipientSend::Counted) => {
                span.record("verdict", "counted");
                return None;
            }
            Ok(RecipientSend::CountedBefore) => {
                span.record("verdict", "counted_before");
                return None;
            }
            Ok(RecipientSend::Limited { retry_after }) => {
                span.record("verdict", "limited");
                retry_after
            }
            Err(e) => {
                warn!(error = %e, "cannot count the message against its recipient's limits; pausing");
                self.release(a, a.retry.attempts).await;
                return Some(Outcome::StoreUnavailable);
            }
        };
        drop(span);
        let action = limits.actions.for_priority(a.cmd.priority);
        self.meters.recipient_limited(action).increment(1);
        let wait_s = retry_after.as_secs_f64().ceil();
        match action {
            LimitAction::Fail => {
                let detail = format!(
                    "the recipient is over its limits ({}); the next message may go in {wait_s}s",
                    limits.describe()
                );
                Some(
                    self.fail(a, FailureReason::RecipientRateLimited, detail)
                        .await,
                )
            }
            LimitAction::Delay => {
                info!(
                    wait_s,
                    priority = a.cmd.priority.as_str(),
                    "over the recipient's limits: waiting in a delay tier"
                );
                Some(self.postpone(a, retry_after).await)
            }
        }
    }
}
