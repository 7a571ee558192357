//! The idempotency store's contract, written once and run against every
//! [`CacheService`]: the in-memory store (in this crate's unit tests) and
//! the Redis store (in `tests/api/store.rs`). The core's correctness
//! argument rests on these transitions, so the model the core's unit tests
//! use must keep them exactly as production does.
//!
//! Each case runs against a store whose lease is `lease` long and whose
//! liveness TTL is `liveness` (short: the cases wait them out in real
//! time), on keys unique to `unique`.

use std::time::Duration;

use crate::domain::{DeliveryStatus, FailureReason, IdempotencyKey, RateWindow};
use crate::ports::{
    Admission, CacheService, CancelVerdict, Claim, FailedRecord, InvalidVerdict, Owner,
    ProviderReport, RecipientSend, Recorded, ReportOutcome, Scheduled, SentRecord,
};

/// Runs every case; panics naming the first that fails.
pub async fn check(store: &dyn CacheService, lease: Duration, liveness: Duration, unique: &str) {
    let c = Case {
        store,
        lease,
        liveness,
        unique,
    };
    c.a_new_key_is_granted_for_sending().await;
    c.a_claim_retried_by_its_owner_is_granted_again_and_counted_once()
        .await;
    c.a_live_holders_lease_is_busy_for_everyone_else().await;
    c.an_expired_lease_of_a_live_holder_is_taken_over_and_counted()
        .await;
    c.a_dead_holders_lease_is_taken_over_once_dead_for_a_liveness_ttl()
        .await;
    c.a_holder_that_comes_back_to_life_keeps_its_lease().await;
    c.a_retired_instance_is_dead().await;
    c.only_the_holder_records_and_a_late_holder_is_fenced()
        .await;
    c.a_recorded_outcome_is_published_by_the_next_claim_once_free()
        .await;
    c.a_published_key_is_done_for_every_claim().await;
    c.a_failed_and_published_key_answers_its_failure().await;
    c.release_keeps_the_attempts_made_and_frees_the_key().await;
    c.a_postponed_key_without_a_call_starts_its_age_afresh()
        .await;
    c.the_claim_counts_the_call_about_to_be_made().await;
    c.renew_extends_the_holders_lease_only().await;
    c.status_follows_the_key().await;
    c.an_admitted_key_is_processing_and_new_to_its_claim().await;
    c.a_scheduled_key_shows_when_it_is_due_and_is_new_to_its_claim()
        .await;
    c.a_key_cancelled_before_its_command_arrives_fails_that_command_once()
        .await;
    c.a_cancelled_scheduled_key_is_published_by_the_cancel_while_claims_wait()
        .await;
    c.a_key_sent_in_work_perhaps_sent_or_failed_is_too_late_to_cancel()
        .await;
    c.a_reused_key_with_another_payload_conflicts().await;
    c.a_withdrawn_admission_is_forgotten_but_nothing_else_is()
        .await;
    c.an_invalid_command_is_failed_but_reserves_nothing().await;
    c.an_invalid_copy_of_a_known_key_is_a_duplicate().await;
    c.only_the_owner_of_an_outcome_marks_it_published().await;
    c.a_pin_outlives_the_claim_that_set_it().await;
    c.delivery_reports_move_a_message_forward_only().await;
    c.an_unconfirmed_report_is_published_again_on_its_repeat()
        .await;
    c.a_report_before_its_send_is_kept_and_applied_when_the_send_is_recorded()
        .await;
    c.a_message_in_parts_is_delivered_only_when_every_part_is()
        .await;
    c.a_recipient_is_counted_once_per_key_and_limited_until_its_window_frees()
        .await;
    c.every_window_of_a_recipient_is_checked_and_the_longest_decides_the_wait()
        .await;
}

fn report(id: &str, status: DeliveryStatus, provider_status: &str) -> ProviderReport {
    ProviderReport {
        provider_message_id: id.into(),
        status,
        provider_status: provider_status.into(),
        error_code: status.is_failure().then(|| "E1".to_owned()),
        permanent: status.is_failure(),
    }
}

const PARK: Option<Duration> = Some(Duration::from_secs(60));

struct Case<'a> {
    store: &'a dyn CacheService,
    lease: Duration,
    liveness: Duration,
    unique: &'a str,
}

/// A liveness record that outlives every case.
const ALIVE: Duration = Duration::from_secs(60);

fn sent(attempts: u32) -> SentRecord {
    SentRecord {
        provider: "contract".into(),
        provider_message_id: "m-1".into(),
        other_part_ids: Vec::new(),
        phone_number: "+254712345678".into(),
        segments: 1,
        attempts,
        sent_at: "2026-12-01T10:00:00Z".into(),
        traceparent: Some(SEND_TRACE.into()),
    }
}

/// The trace a send was recorded in.
const SEND_TRACE: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

fn failed() -> FailedRecord {
    FailedRecord {
        reason: FailureReason::ProviderRejected,
        detail: "rejected".into(),
        attempts: 1,
        failed_at: "2026-12-01T10:00:00Z".into(),
    }
}

impl Case<'_> {
    fn key(&self, name: &str) -> IdempotencyKey {
        IdempotencyKey::parse(&format!("{}-{name}", self.unique)).unwrap()
    }

    /// A live instance (its liveness record written) and one claim of it.
    async fn live(&self, instance: &str, claim: u64) -> Owner {
        let instance = format!("{}{instance}", self.unique.replace('-', ""));
        self.store.heartbeat(&instance, ALIVE).await.unwrap();
        Owner::new(&instance, claim)
    }

    /// An instance without a liveness record (never given one: the names
    /// differ from every live instance's).
    fn dead(&self, instance: &str, claim: u64) -> Owner {
        let instance = format!("{}dead{instance}", self.unique.replace('-', ""));
        Owner::new(&instance, claim)
    }

    async fn claim(&self, key: &IdempotencyKey, owner: &Owner) -> Claim {
        self.store.claim(key, owner, "fp-1").await.unwrap()
    }

    async fn outlive_the_lease(&self) {
        tokio::time::sleep(self.lease + self.lease / 2).await;
    }

    async fn a_new_key_is_granted_for_sending(&self) {
        let key = self.key("new");
        let a = self.live("a", 1).await;
        match self.claim(&key, &a).await {
            Claim::Send {
                attempts: 0,
                takeovers: 0,
                took_over: false,
                first_attempt_ms,
                pinned: None,
            } => assert!(first_attempt_ms > 0, "new: first attempt time kept"),
            other => panic!("new: {other:?}"),
        }
    }

    async fn a_claim_retried_by_its_owner_is_granted_again_and_counted_once(&self) {
        let key = self.key("retried");
        let a = self.live("a", 1).await;
        let first = self.claim(&key, &a).await;
        let again = self.claim(&key, &a).await;
        assert_eq!(first, again, "retried claim: same answer");
        let status = self.store.status(key.as_str()).await.unwrap().unwrap();
        assert_eq!(status.attempts, 1, "retried claim: one call counted");
    }

    async fn a_live_holders_lease_is_busy_for_everyone_else(&self) {
        let key = self.key("busy");
        let a = self.live("a", 1).await;
        let b = self.live("b", 1).await;
        self.claim(&key, &a).await;
        match self.claim(&key, &b).await {
            Claim::Busy {
                lease_left,
                holder_alive_for,
            } => {
                assert!(lease_left <= self.lease, "busy: {lease_left:?}");
                assert!(holder_alive_for > Duration::ZERO, "busy: holder alive");
            }
            other => panic!("busy: {other:?}"),
        }
        // Another claim of the same instance is someone else too.
        let a2 = self.live("a", 2).await;
        assert!(
            matches!(self.claim(&key, &a2).await, Claim::Busy { .. }),
            "busy: same instance, other claim"
        );
    }

    async fn an_expired_lease_of_a_live_holder_is_taken_over_and_counted(&self) {
        let key = self.key("expired");
        let a = self.live("a", 1).await;
        let b = self.live("b", 1).await;
        self.claim(&key, &a).await;
        self.outlive_the_lease().await;
        match self.claim(&key, &b).await {
            Claim::Send {
                attempts: 1,
                takeovers: 1,
                took_over: true,
                ..
            } => {}
            other => panic!("expired: {other:?}"),
        }
    }

    /// Waits out what a claim found: a dead holder's remaining grace.
    async fn outlive(&self, claim: &Claim) {
        if let Claim::Busy {
            holder_alive_for, ..
        } = claim
        {
            tokio::time::sleep(*holder_alive_for + Duration::from_millis(20)).await;
        }
    }

    async fn a_dead_holders_lease_is_taken_over_once_dead_for_a_liveness_ttl(&self) {
        let key = self.key("dead");
        let a = self.dead("a", 1);
        let b = self.live("b", 1).await;
        self.claim(&key, &a).await;
        // Its record may only be lost in a store outage: not yet.
        let first = self.claim(&key, &b).await;
        match first {
            Claim::Busy {
                holder_alive_for, ..
            } => assert!(
                holder_alive_for <= self.liveness && holder_alive_for > self.liveness / 2,
                "dead holder: waits a liveness TTL, {holder_alive_for:?}"
            ),
            other => panic!("dead holder, first look: {other:?}"),
        }
        self.outlive(&first).await;
        match self.claim(&key, &b).await {
            Claim::Send {
                attempts: 1,
                takeovers: 1,
                took_over: true,
                ..
            } => {}
            other => panic!("dead holder: {other:?}"),
        }
    }

    async fn a_holder_that_comes_back_to_life_keeps_its_lease(&self) {
        let key = self.key("revived");
        let a = self.dead("r", 1);
        let b = self.live("b", 1).await;
        self.claim(&key, &a).await;
        let first = self.claim(&key, &b).await;
        assert!(matches!(first, Claim::Busy { .. }), "revived: {first:?}");
        // Its heartbeat comes back (the store outage is over).
        self.store.heartbeat(&a.instance, ALIVE).await.unwrap();
        self.outlive(&first).await;
        assert!(
            matches!(self.claim(&key, &b).await, Claim::Busy { .. }),
            "revived: taken over from a live holder"
        );
        // Dead again later: the grace starts afresh.
        self.store.retire(&a.instance).await.unwrap();
        let again = self.claim(&key, &b).await;
        assert!(
            matches!(again, Claim::Busy { .. }),
            "revived, dead again: {again:?}"
        );
        self.outlive(&again).await;
        assert!(matches!(
            self.claim(&key, &b).await,
            Claim::Send {
                took_over: true,
                ..
            }
        ));
    }

    async fn a_retired_instance_is_dead(&self) {
        let key = self.key("retired");
        let a = self.live("a", 1).await;
        let b = self.live("b", 1).await;
        self.claim(&key, &a).await;
        self.store.retire(&a.instance).await.unwrap();
        let first = self.claim(&key, &b).await;
        self.outlive(&first).await;
        assert!(
            matches!(self.claim(&key, &b).await, Claim::Send { takeovers: 1, .. }),
            "retired holder"
        );
    }

    async fn only_the_holder_records_and_a_late_holder_is_fenced(&self) {
        let key = self.key("fenced");
        let a = self.dead("a", 1);
        let b = self.live("b", 1).await;
        self.claim(&key, &a).await;
        let first = self.claim(&key, &b).await;
        self.outlive(&first).await;
        self.claim(&key, &b).await;
        let store = self.store;
        assert_eq!(
            store.record_sent(&key, &a, &sent(1)).await.unwrap(),
            Recorded::Fenced,
            "fenced: sent by the old holder"
        );
        assert_eq!(
            store.record_failed(&key, &a, &failed()).await.unwrap(),
            Recorded::Fenced,
            "fenced: failed by the old holder"
        );
        assert_eq!(
            store.status(key.as_str()).await.unwrap().unwrap().status,
            "processing",
            "fenced: nothing written"
        );
        assert_eq!(
            store.record_sent(&key, &b, &sent(2)).await.unwrap(),
            Recorded::Written,
            "fenced: the holder records"
        );
        // Retried after a lost reply: still the holder's own record.
        assert_eq!(
            store.record_sent(&key, &b, &sent(2)).await.unwrap(),
            Recorded::Written,
            "fenced: the holder's record retried"
        );
        assert_eq!(
            store.record_failed(&key, &a, &failed()).await.unwrap(),
            Recorded::Fenced,
            "fenced: a recorded outcome stands"
        );
    }

    async fn a_recorded_outcome_is_published_by_the_next_claim_once_free(&self) {
        let key = self.key("unpublished");
        let a = self.live("a", 1).await;
        let b = self.live("b", 1).await;
        self.claim(&key, &a).await;
        self.store.record_sent(&key, &a, &sent(1)).await.unwrap();
        assert!(
            matches!(self.claim(&key, &b).await, Claim::Busy { .. }),
            "unpublished: leased while the holder publishes"
        );
        self.store.release(&key, &a, 1, None).await.unwrap();
        assert_eq!(
            self.claim(&key, &b).await,
            Claim::PublishSent(sent(1)),
            "unpublished: handed out for publishing"
        );
    }

    async fn a_published_key_is_done_for_every_claim(&self) {
        let key = self.key("published");
        let a = self.live("a", 1).await;
        self.claim(&key, &a).await;
        self.store.record_sent(&key, &a, &sent(1)).await.unwrap();
        self.store.mark_published(&key, &a).await.unwrap();
        for claim in 2..4 {
            let other = self.dead("x", claim);
            assert_eq!(
                self.claim(&key, &other).await,
                Claim::AlreadySent,
                "published"
            );
        }
    }

    async fn a_failed_and_published_key_answers_its_failure(&self) {
        let key = self.key("failed");
        let a = self.live("a", 1).await;
        self.claim(&key, &a).await;
        self.store.record_failed(&key, &a, &failed()).await.unwrap();
        self.store.mark_published(&key, &a).await.unwrap();
        assert_eq!(
            self.claim(&key, &self.dead("x", 1)).await,
            Claim::AlreadyFailed(failed()),
            "failed"
        );
    }

    async fn release_keeps_the_attempts_made_and_frees_the_key(&self) {
        let key = self.key("released");
        let a = self.live("a", 1).await;
        let b = self.live("b", 1).await;
        self.claim(&key, &a).await;
        // Released by someone who does not hold it: nothing happens.
        self.store.release(&key, &b, 7, None).await.unwrap();
        assert!(
            matches!(self.claim(&key, &b).await, Claim::Busy { .. }),
            "release: only by the holder"
        );
        self.store.release(&key, &a, 3, None).await.unwrap();
        match self.claim(&key, &b).await {
            Claim::Send {
                attempts: 3,
                takeovers: 0,
                ..
            } => {}
            other => panic!("released: {other:?}"),
        }
    }

    async fn a_postponed_key_without_a_call_starts_its_age_afresh(&self) {
        let first_ms = |claim: Claim| match claim {
            Claim::Send {
                attempts,
                first_attempt_ms,
                ..
            } => (attempts, first_attempt_ms),
            other => panic!("postponed: {other:?}"),
        };
        let key = self.key("postponed");
        let a = self.live("a", 1).await;
        let b = self.live("b", 1).await;
        let (_, before) = first_ms(self.claim(&key, &a).await);
        // Postponed by someone who does not hold it: nothing happens.
        self.store.postpone(&key, &b, 0).await.unwrap();
        assert!(matches!(self.claim(&key, &b).await, Claim::Busy { .. }));
        tokio::time::sleep(Duration::from_millis(20)).await;
        self.store.postpone(&key, &a, 0).await.unwrap();
        let (attempts, after) = first_ms(self.claim(&key, &b).await);
        assert_eq!(attempts, 0, "postponed: no call counted");
        assert!(
            after > before,
            "postponed: age afresh ({before} then {after})"
        );
        // A key that made a call keeps its age.
        self.store.release(&key, &b, 1, None).await.unwrap();
        let c = self.live("c", 1).await;
        let (_, kept) = first_ms(self.claim(&key, &c).await);
        tokio::time::sleep(Duration::from_millis(20)).await;
        self.store.postpone(&key, &c, 1).await.unwrap();
        let d = self.live("d", 1).await;
        assert_eq!(first_ms(self.claim(&key, &d).await), (1, kept));
    }

    async fn the_claim_counts_the_call_about_to_be_made(&self) {
        // The holder crashes during its call: the next claim sees the call.
        let key = self.key("counted");
        let a = self.dead("a", 1);
        let b = self.dead("b", 1);
        let c = self.live("c", 1).await;
        self.claim(&key, &a).await;
        let first = self.claim(&key, &b).await;
        self.outlive(&first).await;
        self.claim(&key, &b).await;
        let second = self.claim(&key, &c).await;
        self.outlive(&second).await;
        match self.claim(&key, &c).await {
            Claim::Send {
                attempts: 2,
                takeovers: 2,
                ..
            } => {}
            other => panic!("counted: {other:?}"),
        }
    }

    async fn renew_extends_the_holders_lease_only(&self) {
        let key = self.key("renewed");
        let a = self.live("a", 1).await;
        let b = self.live("b", 1).await;
        self.claim(&key, &a).await;
        assert_eq!(
            self.store.renew(&key, &b).await.unwrap(),
            Recorded::Fenced,
            "renew: not the holder"
        );
        tokio::time::sleep(self.lease * 3 / 4).await;
        assert_eq!(
            self.store.renew(&key, &a).await.unwrap(),
            Recorded::Written,
            "renew: the holder"
        );
        tokio::time::sleep(self.lease * 3 / 4).await;
        assert!(
            matches!(self.claim(&key, &b).await, Claim::Busy { .. }),
            "renew: the lease was extended"
        );
    }

    async fn status_follows_the_key(&self) {
        let key = self.key("status");
        assert_eq!(self.store.status(key.as_str()).await.unwrap(), None);
        let a = self.live("a", 1).await;
        self.claim(&key, &a).await;
        let status = self.store.status(key.as_str()).await.unwrap().unwrap();
        assert_eq!(status.status, "processing");
        self.store.release(&key, &a, 1, None).await.unwrap();
        let status = self.store.status(key.as_str()).await.unwrap().unwrap();
        assert_eq!((status.status.as_str(), status.attempts), ("processing", 1));
        self.claim(&key, &a).await;
        self.store.record_sent(&key, &a, &sent(2)).await.unwrap();
        let status = self.store.status(key.as_str()).await.unwrap().unwrap();
        assert_eq!(
            (
                status.status.as_str(),
                status.provider_message_id.as_deref()
            ),
            ("sent", Some("m-1"))
        );
    }

    async fn an_admitted_key_is_processing_and_new_to_its_claim(&self) {
        let key = self.key("admitted");
        assert_eq!(
            self.store.admit(&key, "fp-1").await.unwrap(),
            Admission::New
        );
        let status = self.store.status(key.as_str()).await.unwrap().unwrap();
        assert_eq!((status.status.as_str(), status.attempts), ("processing", 0));
        assert_eq!(
            self.store.admit(&key, "fp-1").await.unwrap(),
            Admission::Same
        );
        let a = self.live("a", 1).await;
        assert!(
            matches!(
                self.claim(&key, &a).await,
                Claim::Send {
                    attempts: 0,
                    takeovers: 0,
                    ..
                }
            ),
            "admitted: the claim is the first"
        );
    }

    async fn a_scheduled_key_shows_when_it_is_due_and_is_new_to_its_claim(&self) {
        let key = self.key("scheduled");
        let due = std::time::UNIX_EPOCH + Duration::from_secs(1_900_000_000);
        let due_text = crate::domain::rfc3339(due);
        // Admitted first: its fingerprint stays the one a reuse is checked by.
        self.store.admit(&key, "fp-1").await.unwrap();
        let held = self
            .store
            .schedule(&key, "fp-other", "+254712345678", due)
            .await
            .unwrap();
        assert_eq!(held, Scheduled::Held, "scheduled: admitted");
        let again = self
            .store
            .schedule(&key, "fp-1", "+254712345678", due)
            .await;
        assert_eq!(again.unwrap(), Scheduled::Held, "scheduled: again");
        let status = self.store.status(key.as_str()).await.unwrap().unwrap();
        assert_eq!(
            (
                status.status.as_str(),
                status.send_at.as_deref(),
                status.attempts
            ),
            ("scheduled", Some(due_text.as_str()), 0)
        );
        assert_eq!(
            self.store.admit(&key, "fp-2").await.unwrap(),
            Admission::Conflict,
            "scheduled: the admitted fingerprint kept"
        );
        let a = self.live("a", 1).await;
        assert!(
            matches!(
                self.claim(&key, &a).await,
                Claim::Send {
                    attempts: 0,
                    takeovers: 0,
                    ..
                }
            ),
            "scheduled: the claim when due is the first"
        );
        let known = self
            .store
            .schedule(&key, "fp-1", "+254712345678", due)
            .await;
        assert_eq!(known.unwrap(), Scheduled::Known, "scheduled: in work");
        self.store.record_sent(&key, &a, &sent(1)).await.unwrap();
        let known = self
            .store
            .schedule(&key, "fp-1", "+254712345678", due)
            .await;
        assert_eq!(known.unwrap(), Scheduled::Known, "scheduled: sent");
        // An invalid command reserves nothing.
        let invalid = self.key("scheduled-invalid");
        self.store
            .record_invalid(&invalid, &failed())
            .await
            .unwrap();
        let held = self
            .store
            .schedule(&invalid, "fp-1", "+254712345678", due)
            .await;
        assert_eq!(
            held.unwrap(),
            Scheduled::Held,
            "scheduled: after an invalid command"
        );
        let status = self.store.status(invalid.as_str()).await.unwrap().unwrap();
        assert_eq!((status.status.as_str(), status.reason), ("scheduled", None));
    }

    async fn cancel(&self, key: &IdempotencyKey, owner: &Owner) -> CancelVerdict {
        self.store
            .cancel(key, owner, "cancelled by test")
            .await
            .unwrap()
    }

    async fn a_key_cancelled_before_its_command_arrives_fails_that_command_once(&self) {
        let key = self.key("cancel-unknown");
        let door = self.live("door", 1).await;
        let verdict = self.cancel(&key, &door).await;
        assert_eq!(
            verdict,
            CancelVerdict::Cancelled { known: false },
            "unknown"
        );
        let status = self.store.status(key.as_str()).await.unwrap().unwrap();
        assert_eq!(
            (status.status.as_str(), status.reason.as_deref()),
            ("failed", Some("cancelled"))
        );
        assert_eq!(
            self.cancel(&key, &door).await,
            CancelVerdict::Cancelled { known: true },
            "cancelled again: nothing more"
        );
        // The command arrives: no provider call, it publishes the SmsFailed.
        let a = self.live("a", 1).await;
        let record = match self.claim(&key, &a).await {
            Claim::PublishFailed(record) => record,
            other => panic!("cancelled, then claimed: {other:?}"),
        };
        assert_eq!(
            (record.reason, record.detail.as_str(), record.attempts),
            (FailureReason::Cancelled, "cancelled by test", 0)
        );
        self.store.mark_published(&key, &a).await.unwrap();
        let b = self.live("b", 1).await;
        assert!(
            matches!(self.claim(&key, &b).await, Claim::AlreadyFailed(r) if r.reason == FailureReason::Cancelled),
            "published: done"
        );
        // A key admitted, or waiting in a delay tier, is known.
        let admitted = self.key("cancel-admitted");
        self.store.admit(&admitted, "fp-1").await.unwrap();
        let verdict = self.cancel(&admitted, &door).await;
        assert_eq!(
            verdict,
            CancelVerdict::Cancelled { known: true },
            "admitted"
        );
        let retrying = self.key("cancel-retrying");
        self.claim(&retrying, &a).await;
        self.store.release(&retrying, &a, 1, None).await.unwrap();
        let verdict = self.cancel(&retrying, &door).await;
        assert_eq!(
            verdict,
            CancelVerdict::Cancelled { known: true },
            "retrying"
        );
        let status = self.store.status(retrying.as_str()).await.unwrap().unwrap();
        assert_eq!((status.status.as_str(), status.attempts), ("failed", 1));
    }

    async fn a_cancelled_scheduled_key_is_published_by_the_cancel_while_claims_wait(&self) {
        let key = self.key("cancel-scheduled");
        let due = std::time::UNIX_EPOCH + Duration::from_secs(1_900_000_000);
        self.store
            .schedule(&key, "fp-1", "+254712345678", due)
            .await
            .unwrap();
        let door = self.live("door", 1).await;
        match self.cancel(&key, &door).await {
            CancelVerdict::Publish {
                record,
                phone_number,
            } => {
                assert_eq!(phone_number, "+254712345678");
                assert_eq!(record.reason, FailureReason::Cancelled);
            }
            other => panic!("scheduled: {other:?}"),
        }
        // The held command comes back meanwhile: it waits, sends nothing.
        let a = self.live("a", 1).await;
        match self.claim(&key, &a).await {
            Claim::Cancelling { retry_in } => {
                assert!(retry_in > Duration::ZERO && retry_in <= self.lease)
            }
            other => panic!("while the cancel publishes: {other:?}"),
        }
        let again = self.live("door", 2).await;
        assert_eq!(
            self.cancel(&key, &again).await,
            CancelVerdict::Cancelled { known: true },
            "a second cancel while the first publishes: no second event"
        );
        self.store.mark_published(&key, &door).await.unwrap();
        assert!(
            matches!(self.claim(&key, &a).await, Claim::AlreadyFailed(r) if r.reason == FailureReason::Cancelled),
            "its SmsFailed out: done"
        );
        assert_eq!(
            self.cancel(&key, &again).await,
            CancelVerdict::Cancelled { known: true },
            "published: nothing more"
        );
        // A cancel whose publish failed hands the key back: the command
        // publishes it.
        let handed = self.key("cancel-handed-back");
        self.store
            .schedule(&handed, "fp-1", "+254712345678", due)
            .await
            .unwrap();
        assert!(matches!(
            self.cancel(&handed, &door).await,
            CancelVerdict::Publish { .. }
        ));
        self.store.release(&handed, &door, 0, None).await.unwrap();
        assert!(
            matches!(self.claim(&handed, &a).await, Claim::PublishFailed(r) if r.reason == FailureReason::Cancelled),
            "handed back: the command publishes"
        );
    }

    async fn a_key_sent_in_work_perhaps_sent_or_failed_is_too_late_to_cancel(&self) {
        let door = self.live("door", 1).await;
        let a = self.live("a", 1).await;
        let in_work = self.key("late-in-work");
        self.claim(&in_work, &a).await;
        assert_eq!(
            self.cancel(&in_work, &door).await,
            CancelVerdict::TooLate,
            "in work"
        );
        let pinned = self.key("late-pinned");
        self.claim(&pinned, &a).await;
        self.store.pin(&pinned, &a, "generic").await.unwrap();
        self.store.release(&pinned, &a, 1, None).await.unwrap();
        assert_eq!(
            self.cancel(&pinned, &door).await,
            CancelVerdict::TooLate,
            "perhaps sent"
        );
        // The pin written by the release itself, without a pin before.
        let released_pinned = self.key("late-released-pinned");
        self.claim(&released_pinned, &a).await;
        self.store
            .release(&released_pinned, &a, 1, Some("generic"))
            .await
            .unwrap();
        assert_eq!(
            self.cancel(&released_pinned, &door).await,
            CancelVerdict::TooLate,
            "pinned by its release"
        );
        self.store
            .record_sent(&in_work, &a, &sent(1))
            .await
            .unwrap();
        assert_eq!(
            self.cancel(&in_work, &door).await,
            CancelVerdict::TooLate,
            "sent"
        );
        let status = self.store.status(in_work.as_str()).await.unwrap().unwrap();
        assert_eq!(status.status, "sent", "too late: unchanged");
        let failed_key = self.key("late-failed");
        self.claim(&failed_key, &a).await;
        self.store
            .record_failed(&failed_key, &a, &failed())
            .await
            .unwrap();
        assert_eq!(
            self.cancel(&failed_key, &door).await,
            CancelVerdict::TooLate,
            "failed"
        );
        let status = self
            .store
            .status(failed_key.as_str())
            .await
            .unwrap()
            .unwrap();
        assert_eq!(status.reason.as_deref(), Some("provider_rejected"));
    }

    async fn a_reused_key_with_another_payload_conflicts(&self) {
        let key = self.key("reused");
        let a = self.live("a", 1).await;
        self.claim(&key, &a).await; // with fingerprint fp-1
        assert_eq!(
            self.store.admit(&key, "fp-2").await.unwrap(),
            Admission::Conflict
        );
        assert_eq!(
            self.store.admit(&key, "fp-1").await.unwrap(),
            Admission::Same
        );
        self.store.record_sent(&key, &a, &sent(1)).await.unwrap();
        self.store.mark_published(&key, &a).await.unwrap();
        assert_eq!(
            self.store.admit(&key, "fp-2").await.unwrap(),
            Admission::Conflict
        );
    }

    async fn a_withdrawn_admission_is_forgotten_but_nothing_else_is(&self) {
        let key = self.key("withdrawn");
        self.store.admit(&key, "fp-1").await.unwrap();
        self.store.withdraw(&key).await.unwrap();
        assert_eq!(self.store.status(key.as_str()).await.unwrap(), None);
        let a = self.live("a", 1).await;
        self.claim(&key, &a).await;
        self.store.withdraw(&key).await.unwrap();
        assert!(
            self.store.status(key.as_str()).await.unwrap().is_some(),
            "withdraw touched a claimed key"
        );
    }

    async fn an_invalid_command_is_failed_but_reserves_nothing(&self) {
        let key = self.key("invalid");
        let bad = FailedRecord {
            reason: FailureReason::InvalidPhoneNumber,
            detail: "phoneNumber must be E.164".into(),
            attempts: 0,
            failed_at: "2026-12-01T10:00:00Z".into(),
        };
        let store = self.store;
        assert_eq!(
            store.record_invalid(&key, &bad).await.unwrap(),
            InvalidVerdict::Recorded
        );
        let status = store.status(key.as_str()).await.unwrap().unwrap();
        assert_eq!(
            (
                status.status.as_str(),
                status.reason.as_deref(),
                status.detail.as_deref()
            ),
            (
                "failed",
                Some("invalid_phone_number"),
                Some("phoneNumber must be E.164")
            )
        );
        // Its SmsFailed not confirmed yet: the next copy publishes it.
        assert_eq!(
            store.record_invalid(&key, &bad).await.unwrap(),
            InvalidVerdict::Unpublished
        );
        store.mark_invalid_published(&key).await.unwrap();
        assert_eq!(
            store.record_invalid(&key, &bad).await.unwrap(),
            InvalidVerdict::Known
        );
        // A corrected command may reuse the key.
        let a = self.live("a", 1).await;
        assert!(
            matches!(self.claim(&key, &a).await, Claim::Send { attempts: 0, .. }),
            "invalid: the key is new to a valid command"
        );
        let status = store.status(key.as_str()).await.unwrap().unwrap();
        assert_eq!(
            (status.status.as_str(), status.reason),
            ("processing", None)
        );
    }

    async fn an_invalid_copy_of_a_known_key_is_a_duplicate(&self) {
        let key = self.key("invalid-copy");
        let a = self.live("a", 1).await;
        self.claim(&key, &a).await;
        assert_eq!(
            self.store.record_invalid(&key, &failed()).await.unwrap(),
            InvalidVerdict::Known,
            "in work"
        );
        self.store.record_sent(&key, &a, &sent(1)).await.unwrap();
        self.store.mark_published(&key, &a).await.unwrap();
        assert_eq!(
            self.store.record_invalid(&key, &failed()).await.unwrap(),
            InvalidVerdict::Known,
            "sent"
        );
        assert_eq!(self.claim(&key, &a).await, Claim::AlreadySent);
    }

    async fn only_the_owner_of_an_outcome_marks_it_published(&self) {
        let key = self.key("marked");
        let a = self.live("a", 1).await;
        let b = self.live("b", 1).await;
        // Admitted, then an invalid copy: the admitted one is known.
        self.store.admit(&key, "fp-1").await.unwrap();
        assert_eq!(
            self.store.record_invalid(&key, &failed()).await.unwrap(),
            InvalidVerdict::Known,
            "marked: an admitted key is known"
        );
        self.claim(&key, &a).await;
        // Nothing to mark yet, and not by a stranger, nor as invalid.
        self.store.mark_published(&key, &a).await.unwrap();
        self.store.record_sent(&key, &a, &sent(1)).await.unwrap();
        self.store.mark_published(&key, &b).await.unwrap();
        self.store.mark_invalid_published(&key).await.unwrap();
        self.store.release(&key, &a, 1, None).await.unwrap();
        assert_eq!(
            self.claim(&key, &b).await,
            Claim::PublishSent(sent(1)),
            "marked: only its owner marks an outcome published"
        );
        self.store.mark_published(&key, &b).await.unwrap();
        assert_eq!(self.claim(&key, &a).await, Claim::AlreadySent);
    }

    /// A key sent under the provider ids `parts` (the first is the
    /// message's).
    async fn sent_in_parts(&self, name: &str, parts: &[&str]) -> (IdempotencyKey, Recorded) {
        let key = self.key(name);
        let a = self.live("a", 1).await;
        self.claim(&key, &a).await;
        let record = SentRecord {
            provider_message_id: parts[0].into(),
            other_part_ids: parts[1..].iter().map(|p| p.to_string()).collect(),
            ..sent(1)
        };
        let recorded = self.store.record_sent(&key, &a, &record).await.unwrap();
        self.store.mark_published(&key, &a).await.unwrap();
        (key, recorded)
    }

    async fn report(&self, id: &str, status: DeliveryStatus, said: &str) -> ReportOutcome {
        let id = format!("{}-{id}", self.unique);
        let at = "2026-12-01T10:00:05Z";
        let report = report(&id, status, said);
        self.store
            .record_report("contract", &report, at, PARK)
            .await
            .unwrap()
    }

    async fn delivery_reports_move_a_message_forward_only(&self) {
        use DeliveryStatus::*;
        let id = format!("{}-fwd", self.unique);
        let (key, _) = self.sent_in_parts("forward", &[&id]).await;
        assert_eq!(
            self.report("fwd", Sent, "accepted").await,
            ReportOutcome::Unchanged,
            "sent is no change"
        );
        let ReportOutcome::Publish {
            report: event,
            send_trace,
        } = self.report("fwd", Delivered, "DELIVRD").await
        else {
            panic!("delivered: no event");
        };
        assert_eq!(send_trace.as_deref(), Some(SEND_TRACE), "the send's trace");
        assert_eq!(
            (event.idempotency_key.as_str(), event.phone_number.as_str()),
            (key.as_str(), "+254712345678")
        );
        assert_eq!(
            (event.provider.as_str(), event.provider_message_id.as_str()),
            ("contract", id.as_str())
        );
        assert_eq!(
            (event.status, event.provider_status.as_str()),
            (Delivered, "DELIVRD")
        );
        assert_eq!(event.reported_at, "2026-12-01T10:00:05Z");
        self.store
            .mark_report_published(key.as_str(), Delivered)
            .await
            .unwrap();
        for (status, said, why) in [
            (Delivered, "DELIVRD", "a repeat"),
            (Sent, "buffered", "a step back"),
            (Undelivered, "UNDELIV", "a change to a final status"),
        ] {
            assert_eq!(
                self.report("fwd", status, said).await,
                ReportOutcome::Unchanged,
                "{why}"
            );
        }
        let status = self.store.status(key.as_str()).await.unwrap().unwrap();
        assert_eq!(status.status, "delivered");
        assert_eq!(status.delivery_status, Some(Delivered));
        assert_eq!(status.provider.as_deref(), Some("contract"));
        let history: Vec<(DeliveryStatus, &str)> = status
            .history
            .iter()
            .map(|h| (h.status, h.provider_status.as_str()))
            .collect();
        assert_eq!(
            history,
            [
                (Sent, "accepted"),
                (Delivered, "DELIVRD"),
                (Sent, "buffered"),
                (Undelivered, "UNDELIV")
            ],
            "each distinct report once, in order"
        );
        assert_eq!(status.history[3].error_code.as_deref(), Some("E1"));
        assert_eq!(self.store.pending_report(key.as_str()).await.unwrap(), None);
    }

    async fn an_unconfirmed_report_is_published_again_on_its_repeat(&self) {
        use DeliveryStatus::*;
        let id = format!("{}-again", self.unique);
        let (key, _) = self.sent_in_parts("again", &[&id]).await;
        assert!(matches!(
            self.report("again", Undelivered, "failed").await,
            ReportOutcome::Publish { .. }
        ));
        assert!(
            matches!(
                self.report("again", Undelivered, "failed").await,
                ReportOutcome::Publish { .. }
            ),
            "its event was never confirmed: the provider's retry publishes it"
        );
        assert_eq!(
            self.report("again", Delivered, "delivered").await,
            ReportOutcome::Unchanged,
            "another report never publishes for a final status"
        );
        self.store
            .mark_report_published(key.as_str(), Undelivered)
            .await
            .unwrap();
        assert_eq!(
            self.report("again", Undelivered, "failed").await,
            ReportOutcome::Unchanged
        );
    }

    async fn a_report_before_its_send_is_kept_and_applied_when_the_send_is_recorded(&self) {
        use DeliveryStatus::*;
        let unknown = report("never-sent", Delivered, "delivered");
        assert_eq!(
            self.store
                .record_report("contract", &unknown, "t", None)
                .await
                .unwrap(),
            ReportOutcome::Unmatched,
            "not kept without a park TTL"
        );
        assert_eq!(
            self.report("early", Sent, "sent").await,
            ReportOutcome::Parked
        );
        assert_eq!(
            self.report("early", Expired, "EXPIRED").await,
            ReportOutcome::Parked
        );
        let id = format!("{}-early", self.unique);
        let (key, recorded) = self.sent_in_parts("early", &[&id]).await;
        assert_eq!(recorded, Recorded::WrittenReported);
        let again = self
            .store
            .record_sent(
                &key,
                &self.live("a", 1).await,
                &SentRecord {
                    provider_message_id: id.clone(),
                    ..sent(1)
                },
            )
            .await
            .unwrap();
        assert_eq!(
            again,
            Recorded::WrittenReported,
            "the same record retried after a lost reply says it again"
        );
        let pending = self.store.pending_report(key.as_str()).await.unwrap();
        let pending = pending.expect("the parked report ended it");
        assert_eq!(
            (pending.status, pending.provider_status.as_str()),
            (Expired, "EXPIRED")
        );
        assert_eq!(pending.idempotency_key, key.as_str());
        self.store
            .mark_report_published(key.as_str(), Expired)
            .await
            .unwrap();
        assert_eq!(self.store.pending_report(key.as_str()).await.unwrap(), None);
        let status = self.store.status(key.as_str()).await.unwrap().unwrap();
        assert_eq!(
            (status.status.as_str(), status.history.len()),
            ("expired", 2)
        );
        assert_eq!(
            self.report("early", Expired, "EXPIRED").await,
            ReportOutcome::Unchanged,
            "applied once"
        );
        assert_eq!(
            self.report("early-sent", Sent, "sent").await,
            ReportOutcome::Parked
        );
        let id = format!("{}-early-sent", self.unique);
        let (_, recorded) = self.sent_in_parts("early-sent", &[&id]).await;
        assert_eq!(recorded, Recorded::Written, "a parked `sent` ends nothing");
    }

    async fn a_message_in_parts_is_delivered_only_when_every_part_is(&self) {
        use DeliveryStatus::*;
        let (one, two) = (format!("{}-p1", self.unique), format!("{}-p2", self.unique));
        let (key, _) = self.sent_in_parts("parts", &[&one, &two]).await;
        assert_eq!(
            self.report("p2", Delivered, "delivered").await,
            ReportOutcome::Unchanged
        );
        let ReportOutcome::Publish { report: event, .. } =
            self.report("p1", Delivered, "delivered").await
        else {
            panic!("every part delivered: no event");
        };
        assert_eq!((event.status, event.provider_message_id), (Delivered, one));
        assert_eq!(event.idempotency_key, key.as_str());
        let (three, four) = (format!("{}-p3", self.unique), format!("{}-p4", self.unique));
        self.sent_in_parts("failed-part", &[&three, &four]).await;
        let ReportOutcome::Publish { report: event, .. } =
            self.report("p4", Undelivered, "failed").await
        else {
            panic!("a failed part: no event");
        };
        assert_eq!(event.status, Undelivered);
        assert_eq!(
            self.report("p3", Delivered, "delivered").await,
            ReportOutcome::Unchanged,
            "a later success never hides a part's failure"
        );
        // A part unknown, then the last part delivered: that last report
        // ends it `unknown`; unconfirmed, its repeat publishes it again.
        let (five, six) = (format!("{}-p5", self.unique), format!("{}-p6", self.unique));
        let (key, _) = self.sent_in_parts("unknown-part", &[&five, &six]).await;
        assert_eq!(
            self.report("p5", Unknown, "unknown").await,
            ReportOutcome::Unchanged
        );
        let ReportOutcome::Publish { report: event, .. } =
            self.report("p6", Delivered, "delivered").await
        else {
            panic!("all parts final: no event");
        };
        assert_eq!(event.status, Unknown);
        assert!(
            matches!(self.report("p6", Delivered, "delivered").await, ReportOutcome::Publish { report: e, .. } if e.status == Unknown),
            "the repeat of the report that ended it publishes it again"
        );
        let unconfirmed = self
            .store
            .unpublished_reports(Duration::ZERO, 1000)
            .await
            .unwrap();
        assert!(
            unconfirmed
                .iter()
                .any(|r| r.idempotency_key == key.as_str() && r.status == Unknown),
            "the sweeper finds it"
        );
        self.store
            .mark_report_published(key.as_str(), Unknown)
            .await
            .unwrap();
        let unconfirmed = self
            .store
            .unpublished_reports(Duration::ZERO, 1000)
            .await
            .unwrap();
        assert!(
            unconfirmed
                .iter()
                .all(|r| r.idempotency_key != key.as_str()),
            "confirmed: gone"
        );
    }

    async fn count(&self, to: &str, key: &str, windows: &[RateWindow]) -> RecipientSend {
        // Keys are unique per case; recipients per store (their record
        // is under the store's prefix).
        self.store
            .record_recipient_send(&format!("+{to}"), &self.key(key), windows)
            .await
            .unwrap()
    }

    async fn a_recipient_is_counted_once_per_key_and_limited_until_its_window_frees(&self) {
        let two = [RateWindow {
            limit: 2,
            window: Duration::from_millis(600),
        }];
        assert_eq!(
            self.count("2547001", "r-a", &two).await,
            RecipientSend::Counted
        );
        assert_eq!(
            self.count("2547001", "r-a", &two).await,
            RecipientSend::CountedBefore,
            "a key is counted once"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert_eq!(
            self.count("2547001", "r-b", &two).await,
            RecipientSend::Counted
        );
        let RecipientSend::Limited { retry_after } = self.count("2547001", "r-c", &two).await
        else {
            panic!("a third message in the window is limited");
        };
        assert!(
            retry_after > Duration::from_millis(300) && retry_after <= Duration::from_millis(400),
            "until the first leaves the window: {retry_after:?}"
        );
        assert_eq!(
            self.count("2547001", "r-a", &two).await,
            RecipientSend::CountedBefore,
            "a counted key still goes when the window is full"
        );
        assert_eq!(
            self.count("2547002", "r-c", &two).await,
            RecipientSend::Counted,
            "another recipient has limits of its own"
        );
        tokio::time::sleep(retry_after + Duration::from_millis(20)).await;
        assert_eq!(
            self.count("2547001", "r-c", &two).await,
            RecipientSend::Counted,
            "the window freed up when the first left it"
        );
        assert!(
            matches!(
                self.count("2547001", "r-d", &two).await,
                RecipientSend::Limited { .. }
            ),
            "the second is still in it"
        );
    }

    async fn every_window_of_a_recipient_is_checked_and_the_longest_decides_the_wait(&self) {
        let windows = [
            RateWindow {
                limit: 2,
                window: Duration::from_millis(300),
            },
            RateWindow {
                limit: 3,
                window: Duration::from_secs(3),
            },
        ];
        for key in ["w-a", "w-b"] {
            assert_eq!(
                self.count("2547003", key, &windows).await,
                RecipientSend::Counted
            );
        }
        assert!(matches!(
            self.count("2547003", "w-c", &windows).await,
            RecipientSend::Limited { retry_after } if retry_after <= Duration::from_millis(300)
        ));
        tokio::time::sleep(Duration::from_millis(350)).await;
        assert_eq!(
            self.count("2547003", "w-c", &windows).await,
            RecipientSend::Counted
        );
        match self.count("2547003", "w-d", &windows).await {
            RecipientSend::Limited { retry_after } => assert!(
                retry_after > Duration::from_secs(2) && retry_after <= Duration::from_secs(3),
                "the 3 s window holds it, not the free 300 ms one: {retry_after:?}"
            ),
            other => panic!("the longer window is full: {other:?}"),
        }
    }

    async fn a_pin_outlives_the_claim_that_set_it(&self) {
        let key = self.key("pinned");
        let a = self.live("a", 1).await;
        let b = self.live("b", 1).await;
        self.claim(&key, &a).await;
        // Only the holder pins.
        self.store.pin(&key, &b, "elsewhere").await.unwrap();
        self.store.pin(&key, &a, "twilio").await.unwrap();
        self.store.release(&key, &a, 1, None).await.unwrap();
        match self.claim(&key, &b).await {
            Claim::Send { pinned, .. } => {
                assert_eq!(pinned.as_deref(), Some("twilio"), "pinned")
            }
            other => panic!("pinned: {other:?}"),
        }
    }
}
