//! Steps 4 and 5: publish the key's event, wait for the broker's confirm,
//! and mark it published; or say what to do when the broker did not take
//! it.

use std::sync::atomic::Ordering;
use std::time::Duration;

use tracing::{info, warn, Instrument};

use super::claim::one_more_delay;
use super::{now_ms, Attempt, Notifier};
use crate::domain::{SmsFailed, SmsSent};
use crate::ports::{CacheError, FailedRecord, Outcome, QueueError, RetryState, SentRecord};

/// A recorded outcome whose event is to be published.
#[derive(Clone, Copy)]
pub(super) enum Event<'r> {
    /// SmsSent; with `true`, delivery reports that came before the send
    /// was recorded may have ended it: its SmsDeliveryReport follows.
    Sent(&'r SentRecord, bool),
    Failed(&'r FailedRecord),
}

impl Notifier {
    /// Publishes the event of a recorded outcome, then marks it published
    /// (held until the store takes it: a key left unmarked would publish
    /// its event again on a duplicate).
    pub(super) async fn publish_outcome(&self, a: &mut Attempt<'_>, event: Event<'_>) -> Outcome {
        if !self.still_owner(a).await {
            return self.fenced();
        }
        let (key, meta) = (&a.cmd.idempotency_key, a.inbound.meta);
        let phone_number = a.cmd.phone_number.as_str().to_owned();
        let publishing = async {
            match event {
                Event::Sent(r, reported) => {
                    let event = SmsSent {
                        idempotency_key: key.to_string(),
                        phone_number,
                        provider: r.provider.clone(),
                        provider_message_id: r.provider_message_id.clone(),
                        segments: r.segments,
                        attempts: r.attempts,
                        sent_at: r.sent_at.clone(),
                    };
                    self.events.publish_sent(&event, meta).await?;
                    // Never holds the send: what is not confirmed here the
                    // sweeper publishes (republish_reports).
                    if reported {
                        if let Err(e) = self.publish_pending_report(key.as_str()).await {
                            warn!(error = %e, "delivery report of a parked callback not published yet; the sweeper will");
                        }
                    }
                    Ok(())
                }
                Event::Failed(r) => {
                    let event = SmsFailed {
                        idempotency_key: key.to_string(),
                        phone_number,
                        reason: r.reason.as_str().to_owned(),
                        detail: r.detail.clone(),
                        attempts: r.attempts,
                        failed_at: r.failed_at.clone(),
                    };
                    self.events.publish_failed(&event, meta).await
                }
            }
        };
        let (attempts, name) = match event {
            Event::Sent(r, _) => (r.attempts, "SmsSent"),
            Event::Failed(r) => (r.attempts, "SmsFailed"),
        };
        // Covers the wait for the broker's confirm; the event carries this
        // span's context as its `traceparent`.
        let span = tracing::info_span!("publish", otel.kind = "producer", event = name);
        if let Err(e) = self.renewing(a, publishing.instrument(span)).await {
            self.release(a, attempts).await;
            return self.unpublished(&e, &a.retry);
        }
        self.unroutable_said.store(false, Ordering::Relaxed);
        self.held_write(|| self.cache.mark_published(key, a.owner))
            .await;
        match event {
            Event::Sent(r, _) => {
                self.meters.sent.increment(1);
                info!(provider_message_id = %r.provider_message_id, attempts, "sms sent");
                Outcome::Sent
            }
            Event::Failed(r) => {
                metrics::counter!("sms_failed_total", "reason" => r.reason.as_str()).increment(1);
                info!(reason = r.reason.as_str(), attempts, "sms failed");
                Outcome::Failed(format!("{}: {}", r.reason.as_str(), r.detail))
            }
        }
    }

    /// Publishes the SmsDeliveryReport that parked delivery reports set,
    /// if it is not confirmed yet, and marks it confirmed.
    async fn publish_pending_report(&self, key: &str) -> Result<(), QueueError> {
        let unavailable = |e: CacheError| QueueError::Unavailable(e.to_string());
        let Some(report) = self.cache.pending_report(key).await.map_err(unavailable)? else {
            return Ok(());
        };
        match self.events.publish_delivery(&report).await {
            Ok(()) => {}
            // Nobody subscribes to delivery reports: the send is not held
            // for them.
            Err(QueueError::Unroutable(exchange)) => {
                warn!(%exchange, "no queue is bound to the delivery exchange: SmsDeliveryReport dropped");
            }
            Err(e) => return Err(e),
        }
        metrics::counter!(
            "sms_delivery_reports_total",
            "provider" => report.provider.clone(),
            "status" => report.status.as_str()
        )
        .increment(1);
        self.cache
            .mark_report_published(key, report.status)
            .await
            .map_err(unavailable)
    }

    /// Publishes the SmsDeliveryReports recorded at least `older_than` ago
    /// and still not confirmed, at most `limit`; how many went out. Every
    /// instance runs it now and then: a callback answered 5xx that its
    /// provider never sends again, or a report a send's step could not
    /// publish, is published all the same.
    pub async fn republish_reports(&self, older_than: Duration, limit: usize) -> usize {
        let reports = match self.cache.unpublished_reports(older_than, limit).await {
            Ok(reports) => reports,
            Err(e) => {
                warn!(error = %e, "cannot list unconfirmed delivery reports");
                return 0;
            }
        };
        let mut published = 0;
        for report in reports {
            // A trace of its own: the callback's is long over.
            let span = tracing::info_span!(
                "publish",
                otel.kind = "producer",
                event = "SmsDeliveryReport",
                key = report.idempotency_key.as_str()
            );
            match self.events.publish_delivery(&report).instrument(span).await {
                Ok(()) | Err(QueueError::Unroutable(_)) => {}
                Err(e) => {
                    warn!(error = %e, "unconfirmed delivery report still not published");
                    break;
                }
            }
            let key = report.idempotency_key.as_str();
            if self
                .cache
                .mark_report_published(key, report.status)
                .await
                .is_ok()
            {
                published += 1;
            }
        }
        if published > 0 {
            info!(published, "unconfirmed delivery reports published");
        }
        published
    }

    /// What to do when an event was not confirmed. Unroutable (no queue is
    /// bound to the exchange): wait in a delay tier until a subscriber
    /// binds, for at most `retry.max_age` from the command's first attempt,
    /// then dead-letter it with the reason. Otherwise the broker itself is
    /// failing: requeue after a short wait.
    pub(super) fn unpublished(&self, error: &QueueError, retry: &RetryState) -> Outcome {
        let QueueError::Unroutable(exchange) = error else {
            warn!(error = %error, "event not confirmed; will publish it again");
            return Outcome::RetryAfter(self.settings.retry.requeue_delay);
        };
        // Said once until an event goes through again, not once per
        // message per return from a tier.
        if !self.unroutable_said.swap(true, Ordering::Relaxed) {
            warn!(
                %exchange,
                "events wait: no queue is bound to the event exchange. The messages are sent; \
                 their events wait in the delay tiers (up to retry.max_age_secs) until a \
                 subscriber binds a queue"
            );
        } else {
            tracing::debug!(error = %error, "event still unroutable; waiting in a delay tier");
        }
        let mut retry = one_more_delay(retry);
        let first = *retry.first_attempt_at_ms.get_or_insert_with(now_ms);
        let waited = Duration::from_millis(now_ms().saturating_sub(first));
        if waited >= self.settings.retry.max_age {
            return Outcome::DeadLetter(format!(
                "unroutable: no queue bound to {exchange} for {}s; its event was never delivered",
                waited.as_secs()
            ));
        }
        let delay = self.settings.retry.broker_delay(retry.delays - 1, None);
        Outcome::Delay { delay, retry }
    }
}
