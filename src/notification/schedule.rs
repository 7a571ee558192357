//! Step 0: a command whose `sendAt` is still ahead is held in the broker
//! until it is due ([`Outcome::Hold`]), before it waits for a send slot or
//! the rate limit and before any claim: a scheduled command holds no slot,
//! no token and no lease, and nothing of it stays in the process.
//!
//! Its key is recorded as `scheduled` first, with the number (for the
//! `SmsFailed` of a cancel) and the due time (for the status API), unless
//! the key is known otherwise: then the command goes on to the claim at
//! once, which decides as for any command (a copy of a key already sent is
//! acked, a cancelled key ends with its `SmsFailed`). A held command comes
//! back here on every return from its hold, so a cancel takes effect at its
//! next return; once due it goes on to the claim, and `expiresAt` is
//! checked before the provider call as for every command.
//!
//! A command that is due but in the quiet hours where its recipient is
//! (`quiet.rs`) is held here the same way, until they end for it.

use std::time::SystemTime;

use tracing::{debug, warn, Instrument};

use super::Notifier;
use crate::domain::{rfc3339, SendSms};
use crate::ports::{Outcome, Scheduled};

impl Notifier {
    /// `Some` when the command is not due yet (held), or the store is away.
    pub(super) async fn not_due(&self, cmd: &SendSms) -> Option<Outcome> {
        let now = SystemTime::now();
        let (send_at, quiet) = match cmd.send_at.filter(|at| *at > now) {
            Some(at) => (at, false),
            None => (self.quiet_release(cmd, now)?, true),
        };
        let span = tracing::info_span!("schedule", scheduled = tracing::field::Empty);
        let scheduled = self
            .cache
            .schedule(
                &cmd.idempotency_key,
                &cmd.fingerprint(),
                cmd.phone_number.as_str(),
                send_at,
            )
            .instrument(span.clone())
            .await;
        match scheduled {
            Ok(Scheduled::Held) => {
                span.record("scheduled", "held");
                if quiet {
                    let wait = send_at.duration_since(now).unwrap_or_default();
                    self.held_for_quiet_hours(cmd, wait);
                } else {
                    debug!(send_at = %rfc3339(send_at), "not due yet: held");
                }
                Some(Outcome::Hold { until: send_at })
            }
            Ok(Scheduled::Known) => {
                span.record("scheduled", "known");
                None
            }
            Err(e) => {
                warn!(error = %e, "cannot record the scheduled command; pausing");
                Some(Outcome::StoreUnavailable)
            }
        }
    }
}
