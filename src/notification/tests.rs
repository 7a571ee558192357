//! The core's unit tests: the step driven one command at a time over the
//! in-memory adapters, every crash window and failure by name.

use std::time::Duration;

use super::*;
use crate::breaker::{BreakerState, CircuitBreaker};
use crate::concurrency::AdaptiveLimit;
use crate::domain::IdempotencyKey;
use crate::ports::{
    Accepted, CancelVerdict, Claim, EventMeta, Lane, ProviderError, RetryState, SmsService,
};
use crate::testing::{MemoryCache, MemoryEvents, ScriptedProvider};
use std::sync::atomic::Ordering::SeqCst;

const LEASE: Duration = Duration::from_secs(30);
const LIVENESS: Duration = Duration::from_secs(5);

struct Harness {
    cache: Arc<MemoryCache>,
    provider: Arc<ScriptedProvider>,
    events: Arc<MemoryEvents>,
    notifier: Notifier,
}

fn policy() -> RetryPolicy {
    RetryPolicy {
        max_attempts: 3,
        max_age: Duration::from_secs(3600),
        in_process_attempts: 3,
        base_delay: Duration::from_millis(100),
        max_delay: Duration::from_secs(2),
        tiers: vec![Duration::from_secs(10), Duration::from_secs(60)],
        requeue_delay: Duration::from_secs(1),
    }
}

fn harness(provider: Arc<ScriptedProvider>) -> Harness {
    harness_with(provider, policy(), ProviderGuard::unlimited())
}

fn harness_with(
    provider: Arc<ScriptedProvider>,
    policy: RetryPolicy,
    guard: ProviderGuard,
) -> Harness {
    let cache = MemoryCache::new(LEASE);
    let events = Arc::new(MemoryEvents::default());
    let notifier = instance(&cache, &provider, &events, guard, policy);
    Harness {
        cache,
        provider,
        events,
        notifier,
    }
}

/// One instance over the given ports, alive (its liveness record written)
/// for longer than any test runs.
fn instance(
    cache: &Arc<MemoryCache>,
    provider: &Arc<ScriptedProvider>,
    events: &Arc<MemoryEvents>,
    guard: ProviderGuard,
    policy: RetryPolicy,
) -> Notifier {
    let notifier = Notifier::new(
        cache.clone(),
        Providers::single(provider.clone(), guard),
        events.clone(),
        NotifierSettings {
            retry: policy,
            max_body_bytes: 1024,
            max_takeovers: 3,
            lease: LEASE,
            liveness_ttl: LIVENESS,
            smart_encoding: true,
            limits: Default::default(),
            quiet_hours: None,
        },
    );
    cache.set_alive(notifier.instance(), Duration::from_secs(86_400));
    notifier
}

/// A holder of `key` on an instance whose liveness record lasts `alive`
/// (then it is dead, as after kill -9).
async fn holder(cache: &MemoryCache, key: &str, alive: Duration) -> Owner {
    let owner = Owner::new("crashed", 1);
    cache.set_alive(&owner.instance, alive);
    let key = IdempotencyKey::parse(key).unwrap();
    assert!(matches!(
        cache.claim(&key, &owner, "fp").await.unwrap(),
        Claim::Send { attempts: 0, .. }
    ));
    owner
}

async fn handle_on(
    notifier: &Notifier,
    body: &[u8],
    redelivered: bool,
    retry: &RetryState,
) -> Outcome {
    let meta = EventMeta::default();
    let stop = tokio_util::sync::CancellationToken::new();
    let inbound = Inbound {
        body,
        redelivered,
        meta: &meta,
        retry,
        lane: Lane::Normal,
        stop: &stop,
    };
    notifier.handle(inbound).await
}

fn body(key: &str) -> Vec<u8> {
    format!(r#"{{"idempotencyKey":"{key}","phoneNumber":"+254712345678","text":"hello"}}"#)
        .into_bytes()
}

impl Harness {
    async fn handle(&self, body: &[u8], redelivered: bool) -> Outcome {
        self.handle_retry(body, redelivered, &RetryState::default())
            .await
    }

    async fn handle_retry(&self, body: &[u8], redelivered: bool, retry: &RetryState) -> Outcome {
        let meta = EventMeta {
            correlation_id: Some("c-1".into()),
            traceparent: None,
            tracestate: None,
        };
        let stop = tokio_util::sync::CancellationToken::new();
        let inbound = Inbound {
            body,
            redelivered,
            meta: &meta,
            retry,
            lane: Lane::Normal,
            stop: &stop,
        };
        // In the span the processing loop runs it in.
        let span = crate::processing::consume_span(&meta, redelivered, retry);
        tracing::Instrument::instrument(self.notifier.handle(inbound), span).await
    }
}

fn transient(retry_after: Option<Duration>) -> Result<Accepted, ProviderError> {
    Err(ProviderError::Transient {
        detail: "503".into(),
        retry_after,
    })
}

fn delayed(outcome: Outcome) -> (Duration, RetryState) {
    match outcome {
        Outcome::Delay { delay, retry } => (delay, retry),
        other => panic!("expected Delay, got {other:?}"),
    }
}

#[tokio::test(start_paused = true)]
async fn a_new_key_is_claimed_sent_recorded_published_and_released() {
    let h = harness(ScriptedProvider::new(vec![]));
    assert_eq!(h.handle(&body("k1"), false).await, Outcome::Sent);
    assert_eq!(h.provider.calls(), 1);
    let sent = h.events.sent();
    assert_eq!(sent.len(), 1);
    assert_eq!(sent[0].provider_message_id, "id-1");
    assert_eq!(sent[0].provider, "scripted");
    assert_eq!((sent[0].attempts, sent[0].segments), (1, 1));
    assert_eq!(
        h.events.sent.lock().unwrap()[0].1.correlation_id.as_deref(),
        Some("c-1")
    );
    assert_eq!(
        h.cache.status_of("k1"),
        Some(("sent".into(), true, 1)),
        "recorded and published: done for every later claim"
    );
}

#[tokio::test(start_paused = true)]
async fn duplicate_command_is_acked_without_second_send() {
    let h = harness(ScriptedProvider::new(vec![]));
    assert_eq!(h.handle(&body("k1"), false).await, Outcome::Sent);
    assert_eq!(h.handle(&body("k1"), false).await, Outcome::Duplicate);
    assert_eq!(h.handle(&body("k1"), true).await, Outcome::Duplicate);
    assert_eq!(h.provider.calls(), 1);
    assert_eq!(h.events.sent().len(), 1);
}

#[tokio::test(start_paused = true)]
async fn duplicate_while_in_flight_is_acked_and_a_returning_command_waits_for_the_holder() {
    let h = Arc::new(harness(ScriptedProvider::slow(Duration::from_secs(5))));
    let first = tokio::spawn({
        let h = h.clone();
        async move { h.handle(&body("k1"), false).await }
    });
    tokio::time::sleep(Duration::from_millis(10)).await;
    assert_eq!(h.handle(&body("k1"), false).await, Outcome::Duplicate);
    // A broker redelivery, or a command back from a delay tier, may be
    // the lease holder's own: it waits for the holder instead.
    let (delay, retry) = delayed(h.handle(&body("k1"), true).await);
    assert!(delay <= LIVENESS, "{delay:?}");
    // Back from the tier it is marked as returning, not a duplicate.
    let (_, retry) = delayed(h.handle_retry(&body("k1"), false, &retry).await);
    assert_eq!((retry.attempts, retry.delays), (0, 1));
    let back = RetryState {
        attempts: 1,
        delays: 1,
        first_attempt_at_ms: Some(1),
        pinned_provider: None,
    };
    let (_, retry) = delayed(h.handle_retry(&body("k1"), false, &back).await);
    assert_eq!(
        retry.attempts, back.attempts,
        "waiting for a lease makes no attempt"
    );
    assert_eq!(retry.delays, back.delays, "and climbs no tier");
    assert_eq!(first.await.unwrap(), Outcome::Sent);
    assert_eq!(h.provider.calls(), 1);
    assert_eq!(h.events.sent().len(), 1);
}

#[tokio::test(start_paused = true)]
async fn unconfirmed_sms_sent_is_republished_on_redelivery_without_calling_the_provider() {
    let h = harness(ScriptedProvider::new(vec![]));
    h.events.down.store(true, SeqCst);
    // Crash window: recorded sent, event not confirmed.
    assert_eq!(
        h.handle(&body("k1"), false).await,
        Outcome::RetryAfter(policy().requeue_delay)
    );
    assert_eq!(h.cache.status_of("k1"), Some(("sent".into(), false, 1)));
    assert_eq!(
        h.cache.lease_holder("k1"),
        None,
        "lease released for the next try"
    );
    h.events.down.store(false, SeqCst);
    assert_eq!(h.handle(&body("k1"), true).await, Outcome::Sent);
    assert_eq!(h.provider.calls(), 1, "no second provider call");
    let sent = h.events.sent();
    assert_eq!(sent.len(), 1);
    assert_eq!(sent[0].provider_message_id, "id-1");
}

#[tokio::test(start_paused = true)]
async fn an_unroutable_sms_sent_waits_in_a_delay_tier_for_a_subscriber() {
    let h = harness(ScriptedProvider::new(vec![]));
    h.events.unroutable.store(true, SeqCst);
    let (delay, retry) = delayed(h.handle(&body("k1"), false).await);
    assert!(delay >= Duration::from_secs(5), "{delay:?}");
    let (_, retry) = delayed(h.handle_retry(&body("k1"), false, &retry).await);
    assert_eq!(h.provider.calls(), 1, "waiting for a route never resends");
    h.events.unroutable.store(false, SeqCst);
    assert_eq!(
        h.handle_retry(&body("k1"), false, &retry).await,
        Outcome::Sent
    );
    assert_eq!(h.events.sent().len(), 1);
}

#[tokio::test(start_paused = true)]
async fn a_crashed_holders_key_is_taken_over_a_liveness_ttl_after_its_record_expired_not_its_lease()
{
    let h = harness(ScriptedProvider::new(vec![]));
    // An instance claimed the key and died (kill -9) before calling the
    // provider; its liveness record lasts LIVENESS more.
    holder(&h.cache, "k1", LIVENESS).await;
    let (delay, retry) = delayed(h.handle(&body("k1"), true).await);
    assert!(
        delay > LIVENESS - Duration::from_millis(10) && delay <= LIVENESS,
        "waits for the liveness record, not the {LEASE:?} lease: {delay:?}"
    );
    tokio::time::advance(delay).await;
    // Gone: but it may only have lost it in a store outage, so one more
    // liveness TTL before the takeover.
    let (grace, retry) = delayed(h.handle_retry(&body("k1"), false, &retry).await);
    assert!(grace > LIVENESS / 2 && grace <= LIVENESS, "{grace:?}");
    assert_eq!(h.provider.calls(), 0);
    tokio::time::advance(grace).await;
    assert_eq!(
        h.handle_retry(&body("k1"), false, &retry).await,
        Outcome::Sent
    );
    assert_eq!(h.provider.calls(), 1);
}

#[tokio::test(start_paused = true)]
async fn a_holder_whose_record_lapsed_in_a_store_outage_is_not_taken_over_once_it_beats_again() {
    let h = harness(ScriptedProvider::new(vec![]));
    let owner = holder(&h.cache, "k1", Duration::ZERO).await;
    let (grace, retry) = delayed(h.handle(&body("k1"), true).await);
    // Its heartbeat is back within the grace: the key stays its own.
    h.cache.set_alive(&owner.instance, LIVENESS * 3);
    tokio::time::advance(grace).await;
    delayed(h.handle_retry(&body("k1"), false, &retry).await);
    assert_eq!(h.provider.calls(), 0, "taken over from a live holder");
}

#[tokio::test(start_paused = true)]
async fn a_live_but_slow_holder_keeps_the_key_for_its_whole_lease() {
    let h = harness(ScriptedProvider::new(vec![]));
    holder(&h.cache, "k1", Duration::from_secs(86_400)).await;
    let mut retry = RetryState::default();
    let mut waited = Duration::ZERO;
    while waited < LEASE - LIVENESS {
        let (delay, back) = delayed(h.handle_retry(&body("k1"), true, &retry).await);
        assert!(
            delay <= LIVENESS,
            "one round waits at most the liveness TTL: {delay:?}"
        );
        assert_eq!(back.delays, 1, "waiting for a holder climbs no tier");
        tokio::time::advance(delay).await;
        (waited, retry) = (waited + delay, back);
    }
    assert_eq!(
        h.provider.calls(),
        0,
        "sent while a live holder had the lease"
    );
}

#[tokio::test(start_paused = true)]
async fn the_documented_window_provider_accepted_but_nothing_recorded_sends_twice() {
    let h = harness(ScriptedProvider::new(vec![]));
    // Simulates a crash right after the provider accepted: the claim is
    // held, nothing is recorded; the holder's liveness record runs out.
    holder(&h.cache, "k1", LIVENESS).await;
    h.provider.calls.fetch_add(1, SeqCst); // the call that the crash swallowed
    tokio::time::advance(LIVENESS + Duration::from_millis(1)).await;
    let (grace, retry) = delayed(h.handle(&body("k1"), true).await);
    tokio::time::advance(grace).await;
    assert_eq!(
        h.handle_retry(&body("k1"), false, &retry).await,
        Outcome::Sent
    );
    assert_eq!(h.provider.calls(), 2, "the one duplicate the design allows");
    let sent = h.events.sent();
    assert_eq!(sent.len(), 1, "still one SmsSent");
    assert_eq!(
        sent[0].attempts, 2,
        "the swallowed call counted at its claim"
    );
}

#[tokio::test(start_paused = true)]
async fn store_down_at_claim_pauses_without_sending() {
    let h = harness(ScriptedProvider::new(vec![]));
    h.cache.down.store(true, SeqCst);
    assert_eq!(
        h.handle(&body("k1"), false).await,
        Outcome::StoreUnavailable
    );
    assert_eq!(h.handle(&body("k1"), true).await, Outcome::StoreUnavailable);
    assert_eq!(
        h.provider.calls(),
        0,
        "never send without the idempotency check"
    );
    assert!(!h.notifier.ready().await);
    h.cache.down.store(false, SeqCst);
    assert!(h.notifier.ready().await);
}

#[tokio::test(start_paused = true)]
async fn claims_racing_for_a_key_bring_the_command_back_shortly_without_pausing() {
    let h = harness(ScriptedProvider::new(vec![]));
    h.cache.contended.store(true, SeqCst);
    let (delay, retry) = delayed(h.handle(&body("k1"), false).await);
    assert!(delay <= LIVENESS, "{delay:?}");
    assert_eq!(
        (retry.attempts, retry.delays),
        (0, 1),
        "marked as returning, no attempt made"
    );
    assert_eq!(h.provider.calls(), 0);
    assert!(h.notifier.ready().await, "the store answered: no pause");
}

#[tokio::test(start_paused = true)]
async fn a_store_outage_after_the_provider_accepted_holds_the_delivery_until_the_record_is_written()
{
    let h = Arc::new(harness(ScriptedProvider::new(vec![])));
    h.cache.fail_records.store(true, SeqCst);
    let first = tokio::spawn({
        let h = h.clone();
        async move { h.handle(&body("k1"), false).await }
    });
    // Longer than the lease: the delivery is held, nothing is published,
    // and the instance takes no new work.
    tokio::time::sleep(LEASE * 3).await;
    assert!(!first.is_finished(), "settled without its record");
    assert_eq!(h.events.sent().len(), 0, "published without its record");
    assert!(!h.notifier.ready().await, "ready with a record held");
    h.cache.fail_records.store(false, SeqCst);
    assert_eq!(first.await.unwrap(), Outcome::Sent);
    assert!(h.notifier.ready().await);
    assert_eq!(h.cache.status_of("k1"), Some(("sent".into(), true, 1)));
    // The duplicate that follows finds the record: no second send.
    assert_eq!(h.handle(&body("k1"), false).await, Outcome::Duplicate);
    assert_eq!(h.provider.calls(), 1);
    assert_eq!(h.events.sent().len(), 1);
}

#[tokio::test(start_paused = true)]
async fn a_holder_that_lost_its_lease_records_nothing_and_publishes_nothing() {
    // Instance A pauses mid-call for longer than its liveness record; B
    // takes the key over and sends; A wakes up: its record is refused.
    let cache = MemoryCache::new(LEASE);
    let events = Arc::new(MemoryEvents::default());
    let slow = ScriptedProvider::slow(Duration::from_secs(20));
    let a = instance(&cache, &slow, &events, ProviderGuard::unlimited(), policy());
    let fast = ScriptedProvider::new(vec![]);
    let b = instance(&cache, &fast, &events, ProviderGuard::unlimited(), policy());
    let none = RetryState::default();
    let command = body("k1");
    let (paused, taker) = tokio::join!(handle_on(&a, &command, false, &none), async {
        tokio::time::sleep(Duration::from_secs(1)).await;
        cache.set_alive(a.instance(), Duration::ZERO); // A stops heart-beating
        let (grace, retry) = delayed(handle_on(&b, &command, true, &none).await);
        tokio::time::sleep(grace).await;
        handle_on(&b, &command, false, &retry).await
    });
    assert_eq!(taker, Outcome::Sent);
    assert_eq!(
        paused,
        Outcome::Duplicate,
        "the fenced holder acks, publishing nothing"
    );
    let sent = events.sent();
    assert_eq!(sent.len(), 1, "one SmsSent: {sent:?}");
    assert_eq!(sent[0].provider, "scripted");
    assert_eq!(cache.status_of("k1"), Some(("sent".into(), true, 2)));
}

#[tokio::test(start_paused = true)]
async fn a_live_owner_renews_its_lease_through_a_slow_provider_call() {
    let cache = MemoryCache::new(LEASE);
    let events = Arc::new(MemoryEvents::default());
    let slow = ScriptedProvider::slow(LEASE * 2);
    let a = instance(&cache, &slow, &events, ProviderGuard::unlimited(), policy());
    let other = ScriptedProvider::new(vec![]);
    let b = instance(
        &cache,
        &other,
        &events,
        ProviderGuard::unlimited(),
        policy(),
    );
    let none = RetryState::default();
    let command = body("k1");
    let (first, later) = tokio::join!(handle_on(&a, &command, false, &none), async {
        tokio::time::sleep(LEASE + LEASE / 2).await;
        // Past the first lease: a returning copy still finds it held.
        handle_on(&b, &command, true, &none).await
    });
    assert_eq!(first, Outcome::Sent);
    assert!(matches!(later, Outcome::Delay { .. }), "{later:?}");
    assert_eq!(other.calls(), 0, "sent twice: the lease was not renewed");
    assert_eq!(events.sent().len(), 1);
}

fn expiring_body(key: &str, at: std::time::SystemTime) -> Vec<u8> {
    let at = crate::domain::rfc3339(at);
    format!(r#"{{"idempotencyKey":"{key}","phoneNumber":"+254712345678","text":"hello","expiresAt":"{at}"}}"#)
        .into_bytes()
}

#[tokio::test(start_paused = true)]
async fn a_command_past_its_expiry_fails_expired_without_a_provider_call() {
    let h = harness(ScriptedProvider::new(vec![]));
    let past = std::time::SystemTime::now() - Duration::from_secs(5);
    match h.handle(&expiring_body("k1", past), false).await {
        Outcome::Failed(reason) => assert!(reason.starts_with("expired"), "{reason}"),
        other => panic!("{other:?}"),
    }
    assert_eq!(h.provider.calls(), 0);
    assert_eq!(h.events.failed()[0].reason, "expired");
    let future = std::time::SystemTime::now() + Duration::from_secs(3600);
    assert_eq!(
        h.handle(&expiring_body("k2", future), false).await,
        Outcome::Sent
    );
}

/// A command due at `send_at`, expiring at `expires_at` if given.
fn scheduled_body(
    key: &str,
    send_at: std::time::SystemTime,
    expires_at: Option<std::time::SystemTime>,
) -> Vec<u8> {
    let mut body = serde_json::json!({
        "idempotencyKey": key,
        "phoneNumber": "+254712345678",
        "text": "hello",
        "sendAt": crate::domain::rfc3339(send_at),
    });
    if let Some(at) = expires_at {
        body["expiresAt"] = crate::domain::rfc3339(at).into();
    }
    serde_json::to_vec(&body).unwrap()
}

/// `at` to the second, as sendAt carries it.
fn whole_seconds(at: std::time::SystemTime) -> std::time::SystemTime {
    let secs = at.duration_since(std::time::UNIX_EPOCH).unwrap().as_secs();
    std::time::UNIX_EPOCH + Duration::from_secs(secs)
}

#[tokio::test(start_paused = true)]
async fn a_command_not_yet_due_is_held_until_its_send_at_with_no_claim_slot_or_call() {
    let h = harness(ScriptedProvider::new(vec![]));
    let due = whole_seconds(std::time::SystemTime::now() + Duration::from_secs(120));
    let body = scheduled_body("k1", due, None);
    assert_eq!(h.handle(&body, false).await, Outcome::Hold { until: due });
    assert_eq!(h.provider.calls(), 0);
    assert_eq!(h.cache.lease_holder("k1"), None, "no lease taken");
    let status = h.cache.status("k1").await.unwrap().unwrap();
    assert_eq!(status.status, "scheduled");
    assert_eq!(status.send_at, Some(crate::domain::rfc3339(due)));
    // Back from its hold still early: held again, still nothing sent.
    assert_eq!(h.handle(&body, false).await, Outcome::Hold { until: due });
    assert!(h.events.sent().is_empty() && h.events.failed().is_empty());
}

#[tokio::test(start_paused = true)]
async fn a_command_that_is_due_is_sent_and_its_expiry_still_counts() {
    let h = harness(ScriptedProvider::new(vec![]));
    let past = std::time::SystemTime::now() - Duration::from_secs(2);
    assert_eq!(
        h.handle(&scheduled_body("due", past, None), false).await,
        Outcome::Sent
    );
    // Due two seconds ago, expired one second ago: sendAt before expiresAt,
    // as the parser requires, and both past.
    let expired = scheduled_body("expired", past, Some(past + Duration::from_secs(1)));
    match h.handle(&expired, false).await {
        Outcome::Failed(reason) => assert!(reason.starts_with("expired"), "{reason}"),
        other => panic!("{other:?}"),
    }
    assert_eq!(h.provider.calls(), 1, "only the one still valid");
}

#[tokio::test(start_paused = true)]
async fn a_scheduled_copy_of_a_key_already_sent_is_acked_at_once_not_held() {
    let h = harness(ScriptedProvider::new(vec![]));
    assert_eq!(h.handle(&body("k1"), false).await, Outcome::Sent);
    let later = std::time::SystemTime::now() + Duration::from_secs(3600);
    let copy = scheduled_body("k1", later, None);
    assert_eq!(h.handle(&copy, false).await, Outcome::Duplicate);
    assert_eq!(h.provider.calls(), 1);
}

#[tokio::test(start_paused = true)]
async fn a_scheduled_command_pauses_the_instance_while_the_store_is_away() {
    let h = harness(ScriptedProvider::new(vec![]));
    h.cache.down.store(true, SeqCst);
    let later = std::time::SystemTime::now() + Duration::from_secs(60);
    assert_eq!(
        h.handle(&scheduled_body("k1", later, None), false).await,
        Outcome::StoreUnavailable
    );
}

#[tokio::test(start_paused = true)]
async fn a_command_cancelled_before_it_arrives_ends_with_one_sms_failed_and_no_call() {
    let h = harness(ScriptedProvider::new(vec![]));
    let key = IdempotencyKey::parse("k1").unwrap();
    let door = Owner::cancel("door", 1);
    let verdict = h.cache.cancel(&key, &door, "cancelled by test").await;
    assert_eq!(verdict.unwrap(), CancelVerdict::Cancelled { known: false });
    match h.handle(&body("k1"), false).await {
        Outcome::Failed(reason) => assert_eq!(reason, "cancelled: cancelled by test"),
        other => panic!("{other:?}"),
    }
    let failed = h.events.failed();
    assert_eq!(failed.len(), 1);
    assert_eq!(
        (failed[0].reason.as_str(), failed[0].phone_number.as_str()),
        ("cancelled", "+254712345678")
    );
    // A copy of it: dead-lettered as cancelled, no second event.
    assert!(
        matches!(h.handle(&body("k1"), false).await, Outcome::Failed(r) if r.starts_with("cancelled"))
    );
    assert_eq!(h.events.failed().len(), 1);
    assert_eq!(h.provider.calls(), 0);
}

#[tokio::test(start_paused = true)]
async fn a_held_command_back_while_its_cancel_publishes_waits_then_ends_with_no_second_event() {
    let h = harness(ScriptedProvider::new(vec![]));
    let due = whole_seconds(std::time::SystemTime::now() + Duration::from_secs(600));
    let command = scheduled_body("k1", due, None);
    assert_eq!(
        h.handle(&command, false).await,
        Outcome::Hold { until: due }
    );
    let door = Owner::cancel("door", 1);
    h.cache.set_alive(&door.instance, Duration::from_secs(3600));
    let key = IdempotencyKey::parse("k1").unwrap();
    let verdict = h
        .cache
        .cancel(&key, &door, "cancelled by test")
        .await
        .unwrap();
    assert!(
        matches!(verdict, CancelVerdict::Publish { .. }),
        "{verdict:?}"
    );
    // Back from a hop while the cancel publishes: held again, briefly.
    match h.handle(&command, false).await {
        Outcome::Hold { until } => assert!(until < due, "held past the cancel only"),
        other => panic!("{other:?}"),
    }
    h.cache.mark_published(&key, &door).await.unwrap();
    match h.handle(&command, false).await {
        Outcome::Failed(reason) => assert!(reason.starts_with("cancelled"), "{reason}"),
        other => panic!("{other:?}"),
    }
    assert!(
        h.events.failed().is_empty(),
        "the cancel published it, not the command"
    );
    assert_eq!(h.provider.calls(), 0);
}

#[tokio::test(start_paused = true)]
async fn expiry_is_checked_again_when_a_command_returns_from_a_delay_tier() {
    let h = harness(ScriptedProvider::new(vec![transient(Some(
        Duration::from_secs(90),
    ))]));
    // Expires while it waits in the tier (real clock: the check uses it).
    let soon = std::time::SystemTime::now() + Duration::from_millis(1500);
    let body = expiring_body("k1", soon);
    let (_, retry) = delayed(h.handle(&body, false).await);
    assert_eq!(h.provider.calls(), 1);
    std::thread::sleep(Duration::from_millis(1600));
    match h.handle_retry(&body, true, &retry).await {
        Outcome::Failed(reason) => assert!(reason.starts_with("expired"), "{reason}"),
        other => panic!("{other:?}"),
    }
    assert_eq!(h.provider.calls(), 1, "never sent after it");
    let failed = h.events.failed();
    assert_eq!(
        (failed[0].reason.as_str(), failed[0].attempts),
        ("expired", 1)
    );
}

#[tokio::test(start_paused = true)]
async fn transient_failures_are_retried_with_backoff_then_sent() {
    let h = harness(ScriptedProvider::new(vec![
        transient(None),
        transient(None),
    ]));
    assert_eq!(h.handle(&body("k1"), false).await, Outcome::Sent);
    assert_eq!(h.provider.calls(), 3);
    assert_eq!(h.events.sent()[0].attempts, 3);
}

#[tokio::test(start_paused = true)]
async fn retry_after_is_waited_in_process_when_short() {
    let h = harness(ScriptedProvider::new(vec![transient(Some(
        Duration::from_secs(1),
    ))]));
    let started = tokio::time::Instant::now();
    assert_eq!(h.handle(&body("k1"), false).await, Outcome::Sent);
    assert!(started.elapsed() >= Duration::from_secs(1));
}

#[tokio::test(start_paused = true)]
async fn a_long_retry_after_goes_to_a_delay_tier_keeping_the_attempts() {
    let h = harness(ScriptedProvider::new(vec![transient(Some(
        Duration::from_secs(90),
    ))]));
    let (delay, retry) = delayed(h.handle(&body("k1"), false).await);
    assert!(
        delay >= Duration::from_secs(90),
        "Retry-After honoured: {delay:?}"
    );
    assert_eq!((retry.attempts, retry.delays), (1, 1));
    assert!(retry.first_attempt_at_ms.is_some());
    assert_eq!(h.cache.status_of("k1"), Some(("retrying".into(), false, 1)));
    assert_eq!(
        h.cache.lease_holder("k1"),
        None,
        "lease released while waiting"
    );
    assert_eq!(
        h.handle_retry(&body("k1"), false, &retry).await,
        Outcome::Sent
    );
    assert_eq!(h.events.sent()[0].attempts, 2);
}

#[tokio::test(start_paused = true)]
async fn after_the_quick_attempts_the_command_climbs_the_delay_tiers() {
    let quick = RetryPolicy {
        in_process_attempts: 2,
        max_attempts: 12,
        ..policy()
    };
    let h = harness_with(
        ScriptedProvider::new(vec![transient(None); 7]),
        quick,
        ProviderGuard::unlimited(),
    );
    let (first, retry) = delayed(h.handle(&body("k1"), false).await);
    assert_eq!(h.provider.calls(), 2, "two quick attempts, then the broker");
    assert!(
        first >= Duration::from_secs(5) && first <= Duration::from_secs(10),
        "{first:?}"
    );
    let (second, retry) = delayed(h.handle_retry(&body("k1"), false, &retry).await);
    assert!(
        second >= Duration::from_secs(30) && second <= Duration::from_secs(60),
        "{second:?}"
    );
    let (third, retry) = delayed(h.handle_retry(&body("k1"), false, &retry).await);
    assert!(
        third >= Duration::from_secs(30),
        "the last tier repeats: {third:?}"
    );
    assert_eq!((retry.attempts, retry.delays), (6, 3));
    assert_eq!(
        h.handle_retry(&body("k1"), false, &retry).await,
        Outcome::Sent
    );
    assert_eq!(h.events.sent()[0].attempts, 8);
}

#[tokio::test(start_paused = true)]
async fn a_duplicate_arriving_while_the_command_waits_in_a_tier_sends_it_once() {
    let h = harness_with(
        ScriptedProvider::new(vec![transient(None)]),
        RetryPolicy {
            in_process_attempts: 1,
            ..policy()
        },
        ProviderGuard::unlimited(),
    );
    let (_, retry) = delayed(h.handle(&body("k1"), false).await);
    assert_eq!(
        h.handle(&body("k1"), false).await,
        Outcome::Sent,
        "the duplicate sends"
    );
    assert_eq!(
        h.handle_retry(&body("k1"), false, &retry).await,
        Outcome::Duplicate
    );
    assert_eq!(h.provider.calls(), 2);
    assert_eq!(h.events.sent().len(), 1);
}

#[tokio::test(start_paused = true)]
async fn attempts_running_out_is_retries_exhausted() {
    let h = harness(ScriptedProvider::new(vec![
        transient(None),
        transient(None),
        transient(None),
    ]));
    match h.handle(&body("k1"), false).await {
        Outcome::Failed(reason) => assert!(reason.starts_with("retries_exhausted")),
        other => panic!("{other:?}"),
    }
    assert_eq!(h.provider.calls(), 3);
    let failed = h.events.failed();
    assert_eq!(
        (failed[0].reason.as_str(), failed[0].attempts),
        ("retries_exhausted", 3)
    );
    // A duplicate of the failed key is dead-lettered, not sent, no event.
    assert!(matches!(
        h.handle(&body("k1"), false).await,
        Outcome::Failed(_)
    ));
    assert_eq!(h.provider.calls(), 3);
    assert_eq!(h.events.failed().len(), 1);
}

#[tokio::test(start_paused = true)]
async fn a_command_older_than_the_maximum_age_is_retries_exhausted() {
    let h = harness(ScriptedProvider::new(vec![]));
    let old = RetryState {
        attempts: 1,
        delays: 1,
        first_attempt_at_ms: Some(now_ms() - 3_601_000),
        pinned_provider: None,
    };
    match h.handle_retry(&body("k1"), false, &old).await {
        Outcome::Failed(reason) => assert!(reason.starts_with("retries_exhausted"), "{reason}"),
        other => panic!("{other:?}"),
    }
    assert_eq!(h.provider.calls(), 0);
}

#[tokio::test(start_paused = true)]
async fn an_open_breaker_delays_commands_without_calling_the_provider() {
    let breaker = Arc::new(CircuitBreaker::new(2, Duration::from_secs(20)));
    let h = harness_with(
        ScriptedProvider::new(vec![transient(None), transient(None)]),
        RetryPolicy {
            in_process_attempts: 1,
            ..policy()
        },
        ProviderGuard::new(breaker.clone(), 0),
    );
    delayed(h.handle(&body("k1"), false).await);
    delayed(h.handle(&body("k2"), false).await);
    assert_eq!(breaker.state(), BreakerState::Open);
    let (delay, retry) = delayed(h.handle(&body("k3"), false).await);
    assert_eq!(h.provider.calls(), 2, "no call while open");
    assert!(delay >= Duration::from_secs(19), "{delay:?}");
    assert_eq!(retry.attempts, 0, "no attempt burnt");
    // Rejections are answers: they close it again.
    breaker.admit().await;
    assert_eq!(h.handle(&body("k3"), false).await, Outcome::Sent);
    assert_eq!(breaker.state(), BreakerState::Closed);
}

#[tokio::test(start_paused = true)]
async fn a_command_waiting_for_a_send_slot_holds_no_lease_no_token_and_calls_nothing() {
    let breaker = Arc::new(CircuitBreaker::new(0, Duration::from_secs(1)));
    let mut h = harness_with(
        ScriptedProvider::new(vec![]),
        policy(),
        ProviderGuard::new(breaker, 1),
    );
    h.notifier = h.notifier.with_send_limit(AdaptiveLimit::new(1, 1, false));
    let sends = h.notifier.sends.as_ref().expect("a send limit");
    let taken = sends.acquire().await;
    let command = body("k1");
    let mut handling = std::pin::pin!(h.handle(&command, false));
    let waited = tokio::time::timeout(Duration::from_secs(5), handling.as_mut()).await;
    assert!(waited.is_err(), "finished without a slot: {waited:?}");
    assert_eq!(h.cache.lease_holder("k1"), None, "claimed while waiting");
    assert_eq!(h.provider.calls(), 0);
    let limiter = h
        .notifier
        .providers
        .get(0)
        .guard
        .limiter
        .as_ref()
        .expect("a rate limit");
    assert!(
        limiter.check().is_ok(),
        "took a rate-limit token while waiting"
    );
    drop(taken);
    assert_eq!(handling.await, Outcome::Sent);
    assert_eq!(h.provider.calls(), 1);
}

#[tokio::test]
async fn the_rate_limit_spaces_provider_calls() {
    let h = harness_with(
        ScriptedProvider::new(vec![]),
        policy(),
        ProviderGuard::unlimited(),
    );
    let limited = harness_with(
        ScriptedProvider::new(vec![]),
        policy(),
        ProviderGuard::new(Arc::new(CircuitBreaker::new(0, Duration::from_secs(1))), 20),
    );
    let started = std::time::Instant::now();
    for i in 0..30 {
        assert_eq!(
            limited.handle(&body(&format!("k{i}")), false).await,
            Outcome::Sent
        );
    }
    // 20 at once (the burst), then 10 more at 20/s.
    assert!(
        started.elapsed() >= Duration::from_millis(400),
        "{:?}",
        started.elapsed()
    );
    let unlimited = std::time::Instant::now();
    for i in 0..30 {
        h.handle(&body(&format!("k{i}")), false).await;
    }
    assert!(unlimited.elapsed() < Duration::from_millis(400));
}

/// Runs the real sequence of a command that kills its consumer during the
/// provider call: each instance takes the delivery (first fresh, then back
/// from a delay tier, unflagged), calls the provider, and dies; its
/// redelivery finds the dead holder's lease and waits in a tier until the
/// holder's liveness record is gone. Returns the first outcome reached.
async fn crash_loop(policy: RetryPolicy, max_cycles: u32) -> (Outcome, u32, Arc<MemoryCache>) {
    let cache = MemoryCache::new(LEASE);
    let events = Arc::new(MemoryEvents::default());
    let provider = ScriptedProvider::slow(Duration::from_secs(3600));
    let command = br#"{"idempotencyKey":"p1","phoneNumber":"+254712345678","text":"x"}"#;
    let mut retry = RetryState::default();
    for _ in 0..max_cycles {
        let notifier = Arc::new(instance(
            &cache,
            &provider,
            &events,
            ProviderGuard::unlimited(),
            policy.clone(),
        ));
        let task = tokio::spawn({
            let (notifier, retry) = (notifier.clone(), retry.clone());
            async move { handle_on(&notifier, command, false, &retry).await }
        });
        tokio::time::sleep(Duration::from_millis(10)).await;
        if task.is_finished() {
            return (task.await.unwrap(), provider.calls(), cache);
        }
        // kill -9: the task dies mid-call, the heartbeat stops.
        task.abort();
        cache.set_alive(notifier.instance(), LIVENESS);
        let next = instance(
            &cache,
            &provider,
            &events,
            ProviderGuard::unlimited(),
            policy.clone(),
        );
        // The redelivery waits for the dead holder's record to expire, then
        // for a whole liveness TTL more (it might only have lost it in a
        // store outage), each wait in a delay tier.
        for round in 0..2 {
            match handle_on(&next, command, round == 0, &retry).await {
                Outcome::Delay { delay, retry: back } => {
                    assert!(delay <= LIVENESS, "{delay:?}");
                    tokio::time::advance(delay).await;
                    retry = back;
                }
                other => return (other, provider.calls(), cache),
            }
        }
    }
    panic!(
        "still looping after {max_cycles} crashes, {} provider calls",
        provider.calls()
    );
}

#[tokio::test(start_paused = true)]
async fn a_command_that_keeps_killing_its_consumer_fails_as_poison_with_its_sms_failed() {
    let policy = RetryPolicy {
        max_attempts: 100,
        ..policy()
    };
    let (outcome, calls, cache) = crash_loop(policy, 20).await;
    match outcome {
        Outcome::Failed(reason) => assert!(
            reason.starts_with("retries_exhausted: poison: taken over 4 times"),
            "{reason}"
        ),
        other => panic!("{other:?}"),
    }
    assert_eq!(calls, 4, "max_takeovers (3) + 1 provider calls");
    // Failed for good and said so: subscribers are told, the status says
    // failed, and an operator can clear it (`dead-letters replay --reset`).
    assert_eq!(cache.status_of("p1"), Some(("failed".into(), true, 4)));
}

#[tokio::test(start_paused = true)]
async fn attempts_counted_at_the_claim_stop_a_crash_loop_at_max_attempts() {
    // max_attempts 3 is below the poison limit: the attempts the claims
    // counted (the calls their holders never returned from) stop it.
    let (outcome, calls, _) = crash_loop(policy(), 20).await;
    match outcome {
        Outcome::Failed(reason) => assert!(reason.starts_with("retries_exhausted"), "{reason}"),
        other => panic!("{other:?}"),
    }
    assert_eq!(calls, 3);
}

#[tokio::test(start_paused = true)]
async fn a_sent_key_is_never_poison_however_often_it_is_redelivered() {
    let h = harness(ScriptedProvider::new(vec![]));
    assert_eq!(h.handle(&body("k1"), true).await, Outcome::Sent);
    for _ in 0..10 {
        assert_eq!(h.handle(&body("k1"), true).await, Outcome::Duplicate);
    }
    h.events.down.store(true, SeqCst);
    let h2 = harness(ScriptedProvider::new(vec![]));
    h2.events.down.store(true, SeqCst);
    for _ in 0..10 {
        // Recorded sent, event never confirmed: republished each time, never poison.
        assert!(matches!(
            h2.handle(&body("k2"), true).await,
            Outcome::RetryAfter(_)
        ));
    }
    assert_eq!(h2.provider.calls(), 1);
}

#[tokio::test(start_paused = true)]
async fn a_rejection_is_provider_rejected_at_once() {
    let rejected = Err(ProviderError::Rejected {
        detail: "HTTP 400: barred".into(),
        invalid_number: false,
    });
    let h = harness(ScriptedProvider::new(vec![rejected]));
    match h.handle(&body("k1"), false).await {
        Outcome::Failed(reason) => assert_eq!(reason, "provider_rejected: HTTP 400: barred"),
        other => panic!("{other:?}"),
    }
    assert_eq!(h.provider.calls(), 1);
    assert_eq!(h.cache.status_of("k1"), Some(("failed".into(), true, 1)));
}

#[tokio::test(start_paused = true)]
async fn unconfirmed_sms_failed_is_republished_on_redelivery() {
    let rejected = Err(ProviderError::Rejected {
        detail: "no".into(),
        invalid_number: false,
    });
    let h = harness(ScriptedProvider::new(vec![rejected]));
    h.events.down.store(true, SeqCst);
    assert!(matches!(
        h.handle(&body("k1"), false).await,
        Outcome::RetryAfter(_)
    ));
    h.events.down.store(false, SeqCst);
    assert!(matches!(
        h.handle(&body("k1"), true).await,
        Outcome::Failed(_)
    ));
    assert_eq!(h.provider.calls(), 1);
    assert_eq!(h.events.failed().len(), 1);
}

#[tokio::test(start_paused = true)]
async fn a_report_that_came_before_the_send_is_published_after_its_sms_sent_even_across_a_failure()
{
    use crate::domain::DeliveryStatus;
    use crate::ports::{ProviderReport, ReportOutcome};
    let h = harness(ScriptedProvider::new(vec![]));
    let early = ProviderReport {
        provider_message_id: "id-1".into(),
        status: DeliveryStatus::Delivered,
        provider_status: "delivered".into(),
        error_code: None,
        permanent: false,
    };
    let parked = h
        .cache
        .record_report("scripted", &early, "2026-12-01T10:00:00Z", Some(LEASE))
        .await;
    assert_eq!(parked, Ok(ReportOutcome::Parked));
    h.events.deliveries_down.store(true, SeqCst);
    assert_eq!(
        h.handle(&body("k1"), false).await,
        Outcome::Sent,
        "a report's publish never holds the send"
    );
    assert_eq!((h.events.sent().len(), h.events.deliveries().len()), (1, 0));
    assert_eq!(
        h.notifier.republish_reports(Duration::ZERO, 10).await,
        0,
        "still down"
    );
    h.events.deliveries_down.store(false, SeqCst);
    assert_eq!(
        h.notifier.republish_reports(Duration::ZERO, 10).await,
        1,
        "the sweeper"
    );
    assert_eq!(h.provider.calls(), 1);
    let deliveries = h.events.deliveries();
    assert_eq!(deliveries.len(), 1);
    assert_eq!(deliveries[0].idempotency_key, "k1");
    assert_eq!(deliveries[0].status, DeliveryStatus::Delivered);
    assert_eq!(h.notifier.republish_reports(Duration::ZERO, 10).await, 0);
    assert_eq!(h.handle(&body("k1"), true).await, Outcome::Duplicate);
    assert_eq!(h.events.deliveries().len(), 1, "published once confirmed");
}

#[tokio::test(start_paused = true)]
async fn a_parked_report_nobody_subscribes_to_never_holds_its_send() {
    use crate::domain::DeliveryStatus;
    use crate::ports::ProviderReport;
    let h = harness(ScriptedProvider::new(vec![]));
    let early = ProviderReport {
        provider_message_id: "id-1".into(),
        status: DeliveryStatus::Undelivered,
        provider_status: "failed".into(),
        error_code: None,
        permanent: true,
    };
    h.cache
        .record_report("scripted", &early, "2026-12-01T10:00:00Z", Some(LEASE))
        .await
        .unwrap();
    h.events.deliveries_unroutable.store(true, SeqCst);
    assert_eq!(h.handle(&body("k1"), false).await, Outcome::Sent);
    assert_eq!(h.events.sent().len(), 1);
    assert_eq!(
        h.cache.pending_report("k1").await.unwrap(),
        None,
        "dropped, marked"
    );
}

#[tokio::test(start_paused = true)]
async fn malformed_bodies_are_dead_lettered_without_events() {
    let h = harness(ScriptedProvider::new(vec![]));
    for bad in [&b"nope"[..], br#"{"text":"no key"}"#, &[b'x'; 2000]] {
        assert!(
            matches!(h.handle(bad, false).await, Outcome::DeadLetter(r) if r.starts_with("malformed"))
        );
    }
    assert_eq!(h.provider.calls(), 0);
    assert!(h.events.failed().is_empty());
}

#[tokio::test(start_paused = true)]
async fn invalid_commands_get_sms_failed_a_failed_status_and_no_provider_call() {
    let h = harness(ScriptedProvider::new(vec![]));
    let bad = br#"{"idempotencyKey":"k9","phoneNumber":"12","text":"hi"}"#;
    match h.handle(bad, false).await {
        Outcome::Failed(reason) => assert!(reason.starts_with("invalid_phone_number")),
        other => panic!("{other:?}"),
    }
    assert_eq!(h.events.failed()[0].reason, "invalid_phone_number");
    assert_eq!(h.cache.status_of("k9"), Some(("failed".into(), true, 0)));
    assert_eq!(h.provider.calls(), 0);
    // The same mistake again: one SmsFailed per key.
    assert!(matches!(h.handle(bad, false).await, Outcome::DeadLetter(_)));
    assert_eq!(h.events.failed().len(), 1);
    // The corrected command reuses the key.
    assert_eq!(h.handle(&body("k9"), false).await, Outcome::Sent);
    h.events.down.store(true, SeqCst);
    let other = br#"{"idempotencyKey":"k10","phoneNumber":"12","text":"hi"}"#;
    assert!(
        matches!(h.handle(other, false).await, Outcome::RetryAfter(_)),
        "event must be confirmed"
    );
}

#[tokio::test(start_paused = true)]
async fn an_invalid_duplicate_of_a_known_key_publishes_nothing() {
    let h = harness(ScriptedProvider::new(vec![]));
    assert_eq!(h.handle(&body("k1"), false).await, Outcome::Sent);
    let bad = br#"{"idempotencyKey":"k1","phoneNumber":"+2547bad","text":"hi"}"#;
    match h.handle(bad, false).await {
        Outcome::DeadLetter(reason) => {
            assert!(reason.starts_with("invalid_phone_number"), "{reason}");
            assert!(reason.contains("duplicate of a known key"), "{reason}");
        }
        other => panic!("{other:?}"),
    }
    assert!(h.events.failed().is_empty(), "SmsFailed after SmsSent");
    assert_eq!(h.events.sent().len(), 1);
    // With the store away it is not decided blind.
    h.cache.down.store(true, SeqCst);
    assert_eq!(h.handle(bad, false).await, Outcome::StoreUnavailable);
}

#[tokio::test(start_paused = true)]
async fn an_event_nobody_subscribes_to_waits_in_the_tiers_at_most_max_age() {
    let h = harness(ScriptedProvider::new(vec![]));
    h.events.unroutable.store(true, SeqCst);
    let (_, retry) = delayed(h.handle(&body("k1"), false).await);
    let old = RetryState {
        first_attempt_at_ms: Some(now_ms() - policy().max_age.as_millis() as u64 - 1),
        ..retry
    };
    match h.handle_retry(&body("k1"), false, &old).await {
        Outcome::DeadLetter(reason) => assert!(reason.starts_with("unroutable"), "{reason}"),
        other => panic!("{other:?}"),
    }
    assert_eq!(
        h.provider.calls(),
        1,
        "never resent while waiting for a route"
    );
    // An invalid command's SmsFailed is capped the same way.
    let bad = br#"{"idempotencyKey":"k2","phoneNumber":"12","text":"hi"}"#;
    let (_, retry) = delayed(h.handle(bad, false).await);
    let old = RetryState {
        first_attempt_at_ms: Some(1),
        ..retry
    };
    assert!(matches!(
        h.handle_retry(bad, false, &old).await,
        Outcome::DeadLetter(_)
    ));
}

/// Log lines written while `f` runs, at warn level and above.
async fn warnings_during<F: std::future::Future>(f: F) -> String {
    logs_during(tracing::Level::WARN, f).await
}

/// Log lines written while `f` runs, at `level` and above.
async fn logs_during<F: std::future::Future>(level: tracing::Level, f: F) -> String {
    #[derive(Clone, Default)]
    struct Buffer(Arc<std::sync::Mutex<Vec<u8>>>);
    impl std::io::Write for Buffer {
        fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(bytes);
            Ok(bytes.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let buffer = Buffer::default();
    let writer = buffer.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_max_level(level)
        .with_ansi(false)
        .with_writer(move || writer.clone())
        .finish();
    let _guard = tracing::subscriber::set_default(subscriber);
    f.await;
    let bytes = buffer.0.lock().unwrap().clone();
    String::from_utf8(bytes).unwrap()
}

#[tokio::test(start_paused = true)]
async fn events_waiting_for_a_bound_queue_are_said_once_not_per_message() {
    let h = harness(ScriptedProvider::new(vec![]));
    h.events.unroutable.store(true, SeqCst);
    let logs = warnings_during(async {
        for i in 0..5 {
            let (_, retry) = delayed(h.handle(&body(&format!("k{i}")), false).await);
            delayed(h.handle_retry(&body(&format!("k{i}")), false, &retry).await);
        }
    })
    .await;
    assert_eq!(logs.matches("no queue is bound").count(), 1, "{logs}");
    // Once an event went through, a new wait is said again.
    h.events.unroutable.store(false, SeqCst);
    assert_eq!(h.handle(&body("ok"), false).await, Outcome::Sent);
    h.events.unroutable.store(true, SeqCst);
    let logs = warnings_during(async {
        delayed(h.handle(&body("again"), false).await);
    })
    .await;
    assert_eq!(logs.matches("no queue is bound").count(), 1, "{logs}");
}

#[tokio::test(start_paused = true)]
async fn the_providers_acceptance_is_logged_at_once_with_the_key_and_a_masked_number() {
    let h = harness(ScriptedProvider::new(vec![]));
    h.events.unroutable.store(true, SeqCst);
    let logs = logs_during(tracing::Level::INFO, async {
        delayed(h.handle(&body("k1"), false).await);
    })
    .await;
    let line = logs
        .lines()
        .find(|l| l.contains("provider accepted"))
        .unwrap_or_else(|| panic!("no 'provider accepted' line: {logs}"));
    assert!(line.contains("k1") && line.contains("id-1"), "{line}");
    assert!(line.contains("********5678"), "{line}");
    assert!(!logs.contains("254712345678"), "a full number: {logs}");
}

#[tokio::test(start_paused = true)]
async fn a_holder_paused_between_its_record_and_its_event_publishes_nothing_once_taken_over() {
    // A records `sent`, then pauses (VM pause) past its liveness record
    // and the grace after it; B takes the recorded key over and publishes
    // SmsSent. A wakes up: it must not publish a second one.
    let cache = MemoryCache::new(LEASE);
    let events = Arc::new(MemoryEvents::default());
    let provider = ScriptedProvider::new(vec![]);
    let a = instance(
        &cache,
        &provider,
        &events,
        ProviderGuard::unlimited(),
        policy(),
    );
    let b = instance(
        &cache,
        &provider,
        &events,
        ProviderGuard::unlimited(),
        policy(),
    );
    cache.record_pause_ms.store(30_000, SeqCst);
    let none = RetryState::default();
    let command = body("k1");
    let (paused, taker) = tokio::join!(handle_on(&a, &command, false, &none), async {
        tokio::time::sleep(Duration::from_secs(1)).await;
        cache.set_alive(a.instance(), Duration::ZERO); // A stops heart-beating
        let (grace, retry) = delayed(handle_on(&b, &command, true, &none).await);
        tokio::time::sleep(grace).await;
        handle_on(&b, &command, false, &retry).await
    });
    assert_eq!(taker, Outcome::Sent, "B publishes the recorded SmsSent");
    assert_eq!(paused, Outcome::Duplicate, "A publishes nothing");
    assert_eq!(events.sent().len(), 1, "{:?}", events.sent());
    assert_eq!(provider.calls(), 1, "one provider call");
}

#[tokio::test(start_paused = true)]
async fn a_fresh_copy_of_an_invalid_command_whose_sms_failed_is_not_out_yet_publishes_nothing() {
    let h = harness(ScriptedProvider::new(vec![]));
    let bad = br#"{"idempotencyKey":"k1","phoneNumber":"12","text":"hi"}"#;
    h.events.unroutable.store(true, SeqCst);
    let (_, retry) = delayed(h.handle(bad, false).await);
    h.events.unroutable.store(false, SeqCst);
    // A second copy (another instance, or a producer's retry) meanwhile.
    assert!(matches!(h.handle(bad, false).await, Outcome::DeadLetter(_)));
    assert!(h.events.failed().is_empty());
    // The first one comes back from its tier and publishes: one SmsFailed.
    assert!(matches!(
        h.handle_retry(bad, false, &retry).await,
        Outcome::Failed(_)
    ));
    assert_eq!(h.events.failed().len(), 1);
}

#[tokio::test(start_paused = true)]
async fn an_invalid_copy_never_marks_a_valid_commands_unpublished_sms_sent_as_published() {
    let h = harness(ScriptedProvider::new(vec![]));
    let bad = br#"{"idempotencyKey":"k1","phoneNumber":"12","text":"hi"}"#;
    h.events.unroutable.store(true, SeqCst);
    let (_, bad_retry) = delayed(h.handle(bad, false).await);
    // The valid command reuses the key, is sent, its SmsSent waits too.
    let (_, good_retry) = delayed(h.handle(&body("k1"), false).await);
    h.events.unroutable.store(false, SeqCst);
    // The invalid copy returns first: the key is the valid one's now.
    assert!(matches!(
        h.handle_retry(bad, false, &bad_retry).await,
        Outcome::DeadLetter(_)
    ));
    assert_eq!(
        h.handle_retry(&body("k1"), false, &good_retry).await,
        Outcome::Sent
    );
    assert_eq!(h.events.sent().len(), 1, "SmsSent lost");
    assert_eq!(h.provider.calls(), 1);
}

/// Two instances, `a` then `b`, on one route for every number.
fn two_providers(
    a: Arc<ScriptedProvider>,
    b: Arc<ScriptedProvider>,
    policy: RetryPolicy,
) -> (Notifier, Arc<MemoryCache>, Arc<MemoryEvents>) {
    let cache = MemoryCache::new(LEASE);
    let events = Arc::new(MemoryEvents::default());
    let guard = || ProviderGuard::new(Arc::new(CircuitBreaker::new(3, Duration::from_secs(30))), 0);
    let providers = Providers::new(
        vec![
            (a as Arc<dyn SmsService>, guard()),
            (b as Arc<dyn SmsService>, guard()),
        ],
        &[(vec!["+".into()], vec!["a".into(), "b".into()])],
    )
    .unwrap();
    let notifier = Notifier::new(
        cache.clone(),
        providers,
        events.clone(),
        NotifierSettings {
            retry: policy,
            max_body_bytes: 1024,
            max_takeovers: 3,
            lease: LEASE,
            liveness_ttl: LIVENESS,
            smart_encoding: true,
            limits: Default::default(),
            quiet_hours: None,
        },
    );
    cache.set_alive(notifier.instance(), Duration::from_secs(86_400));
    (notifier, cache, events)
}

/// An answer that may have sent the message (a timeout).
fn ambiguous() -> Result<Accepted, ProviderError> {
    Err(ProviderError::Ambiguous {
        detail: "timeout".into(),
        retry_after: None,
    })
}

fn refused() -> Result<Accepted, ProviderError> {
    Err(ProviderError::transient(
        "connect error: connection refused",
    ))
}

#[tokio::test(start_paused = true)]
async fn a_provider_that_is_down_fails_over_to_the_next_after_its_in_process_attempts() {
    let a = ScriptedProvider::named("a", vec![refused(), refused(), refused()]);
    let b = ScriptedProvider::named("b", vec![]);
    let policy = RetryPolicy {
        max_attempts: 10,
        ..policy()
    };
    let (n, _, events) = two_providers(a.clone(), b.clone(), policy);
    let none = RetryState::default();
    assert_eq!(
        handle_on(&n, &body("k1"), false, &none).await,
        Outcome::Sent
    );
    assert_eq!((a.calls(), b.calls()), (3, 1));
    let sent = events.sent();
    assert_eq!((sent.len(), sent[0].provider.as_str()), (1, "b"));
    assert_eq!(sent[0].attempts, 4);
}

#[tokio::test(start_paused = true)]
async fn a_route_refused_moves_to_the_next_provider_at_once() {
    let route = Err(ProviderError::RouteRefused {
        detail: "21408: permission to send to this region".into(),
    });
    let a = ScriptedProvider::named("a", vec![route]);
    let b = ScriptedProvider::named("b", vec![]);
    let (n, _, events) = two_providers(a.clone(), b.clone(), policy());
    let none = RetryState::default();
    assert_eq!(
        handle_on(&n, &body("k1"), false, &none).await,
        Outcome::Sent
    );
    assert_eq!((a.calls(), b.calls()), (1, 1));
    assert_eq!(events.sent()[0].provider, "b");
}

#[tokio::test(start_paused = true)]
async fn a_route_no_provider_takes_is_provider_rejected() {
    let route = || {
        Err(ProviderError::RouteRefused {
            detail: "not this destination".into(),
        })
    };
    let a = ScriptedProvider::named("a", vec![route()]);
    let b = ScriptedProvider::named("b", vec![route()]);
    let (n, _, events) = two_providers(a.clone(), b.clone(), policy());
    let none = RetryState::default();
    match handle_on(&n, &body("k1"), false, &none).await {
        Outcome::Failed(reason) => assert!(reason.starts_with("provider_rejected"), "{reason}"),
        other => panic!("{other:?}"),
    }
    assert_eq!(events.failed()[0].reason, "provider_rejected");
}

#[tokio::test(start_paused = true)]
async fn an_ambiguous_answer_is_retried_at_the_same_provider_only_even_after_a_delay_tier() {
    let a = ScriptedProvider::named("a", vec![ambiguous(), ambiguous(), ambiguous()]);
    let b = ScriptedProvider::named("b", vec![]);
    let policy = RetryPolicy {
        max_attempts: 10,
        ..policy()
    };
    let (n, _, events) = two_providers(a.clone(), b.clone(), policy);
    let none = RetryState::default();
    let (_, retry) = delayed(handle_on(&n, &body("k1"), false, &none).await);
    assert_eq!(b.calls(), 0, "failed over after an ambiguous answer");
    assert_eq!(
        retry.pinned_provider.as_deref(),
        Some("a"),
        "the pin travels"
    );
    // Back from the tier: still a only (its breaker is open by now? it
    // took 3 failures: the command waits for it rather than go to b).
    assert_eq!(a.calls(), 3);
    let outcome = handle_on(&n, &body("k1"), false, &retry).await;
    assert_eq!(
        b.calls(),
        0,
        "failed over after an ambiguous answer: {outcome:?}"
    );
    assert!(events.sent().iter().all(|e| e.provider == "a"));
}

#[tokio::test(start_paused = true)]
async fn a_key_handed_to_a_tier_after_an_ambiguous_answer_is_pinned_even_if_its_pin_write_failed() {
    let a = ScriptedProvider::named("a", vec![ambiguous(), ambiguous(), ambiguous()]);
    let b = ScriptedProvider::named("b", vec![]);
    let policy = RetryPolicy {
        max_attempts: 10,
        ..policy()
    };
    let (n, cache, _) = two_providers(a.clone(), b.clone(), policy);
    cache.pin_down.store(true, SeqCst);
    let none = RetryState::default();
    let (_, retry) = delayed(handle_on(&n, &body("k1"), false, &none).await);
    assert_eq!(retry.pinned_provider.as_deref(), Some("a"));
    // The SMS may be out: a cancel must not answer "cancelled".
    let key = IdempotencyKey::parse("k1").unwrap();
    let door = Owner::cancel("door", 1);
    let verdict = cache.cancel(&key, &door, "cancelled by test").await;
    assert_eq!(verdict.unwrap(), CancelVerdict::TooLate);
}

#[tokio::test(start_paused = true)]
async fn with_every_provider_of_the_route_open_the_command_waits_in_a_tier_without_a_call() {
    let a = ScriptedProvider::named("a", vec![refused(), refused(), refused()]);
    let b = ScriptedProvider::named("b", vec![refused(), refused(), refused()]);
    let policy = RetryPolicy {
        max_attempts: 20,
        ..policy()
    };
    let (n, _, events) = two_providers(a.clone(), b.clone(), policy);
    let none = RetryState::default();
    let (_, retry) = delayed(handle_on(&n, &body("k1"), false, &none).await);
    assert_eq!((a.calls(), b.calls()), (3, 3));
    assert_eq!(retry.pinned_provider, None, "not-sent failures pin nothing");
    // Both breakers are open (3 failures each): no call at all now.
    let (_, _) = delayed(handle_on(&n, &body("k2"), false, &none).await);
    assert_eq!((a.calls(), b.calls()), (3, 3));
    // Once a's cool-down is over, the command goes out there, once.
    tokio::time::advance(Duration::from_secs(31)).await;
    assert_eq!(
        handle_on(&n, &body("k1"), false, &retry).await,
        Outcome::Sent
    );
    assert_eq!(events.sent().len(), 1);
}

#[tokio::test(start_paused = true)]
async fn a_key_accepted_by_one_provider_is_never_sent_by_another_on_redelivery() {
    let a = ScriptedProvider::named("a", vec![]);
    let b = ScriptedProvider::named("b", vec![]);
    let (n, _, events) = two_providers(a.clone(), b.clone(), policy());
    events.down.store(true, SeqCst);
    let none = RetryState::default();
    // Accepted by a, recorded, but its SmsSent not confirmed.
    assert!(matches!(
        handle_on(&n, &body("k1"), false, &none).await,
        Outcome::RetryAfter(_)
    ));
    events.down.store(false, SeqCst);
    // a's breaker now open for the route's next command does not matter:
    // the redelivery publishes a's record.
    assert_eq!(handle_on(&n, &body("k1"), true, &none).await, Outcome::Sent);
    assert_eq!((a.calls(), b.calls()), (1, 0));
    assert_eq!(events.sent()[0].provider, "a");
}

#[tokio::test(start_paused = true)]
async fn a_duplicate_without_the_tiers_header_still_keeps_to_the_provider_that_answered_ambiguously(
) {
    // a answers ambiguously twice, then is simply down (not sent).
    let a = ScriptedProvider::named("a", vec![ambiguous(), ambiguous(), refused(), refused()]);
    let b = ScriptedProvider::named("b", vec![]);
    let policy = RetryPolicy {
        max_attempts: 10,
        in_process_attempts: 2,
        ..policy()
    };
    let (n, _, events) = two_providers(a.clone(), b.clone(), policy);
    let none = RetryState::default();
    // Two ambiguous answers at a: the command goes to a delay tier.
    delayed(handle_on(&n, &body("k1"), false, &none).await);
    // A copy of it arrives fresh (a producer's retry, or a redelivery that
    // lost its headers). a fails without sending now, which would fail
    // over to b: but a may have sent it, so it waits for a instead.
    let (_, retry) = delayed(handle_on(&n, &body("k1"), false, &none).await);
    assert_eq!(b.calls(), 0, "a second provider got a key that may be out");
    assert_eq!(retry.pinned_provider.as_deref(), Some("a"));
    assert!(events.sent().is_empty());
}

// ---------------------------------------------------------------- limits

/// A harness whose notifier counts every recipient against `limits`.
fn limited(provider: Arc<ScriptedProvider>, limits: RecipientLimits) -> Harness {
    let cache = MemoryCache::new(LEASE);
    let events = Arc::new(MemoryEvents::default());
    let notifier = Notifier::new(
        cache.clone(),
        Providers::single(provider.clone(), ProviderGuard::unlimited()),
        events.clone(),
        NotifierSettings {
            retry: RetryPolicy {
                max_attempts: 10,
                ..policy()
            },
            max_body_bytes: 1024,
            max_takeovers: 3,
            lease: LEASE,
            liveness_ttl: LIVENESS,
            smart_encoding: true,
            limits,
            quiet_hours: None,
        },
    );
    cache.set_alive(notifier.instance(), Duration::from_secs(86_400));
    Harness {
        cache,
        provider,
        events,
        notifier,
    }
}

/// At most `limit` messages per recipient in any `window`.
fn at_most(limit: u32, window: Duration) -> RecipientLimits {
    RecipientLimits {
        windows: vec![crate::domain::RateWindow { limit, window }],
        ..RecipientLimits::default()
    }
}

fn to(key: &str, phone: &str, priority: &str) -> Vec<u8> {
    format!(
        r#"{{"idempotencyKey":"{key}","phoneNumber":"{phone}","text":"hello","priority":"{priority}"}}"#
    )
    .into_bytes()
}

#[tokio::test(start_paused = true)]
async fn a_high_command_over_its_recipients_limit_fails_without_a_provider_call() {
    let h = limited(
        ScriptedProvider::new(vec![]),
        at_most(1, Duration::from_secs(900)),
    );
    let number = "+254712345678";
    assert_eq!(
        h.handle(&to("k1", number, "high"), false).await,
        Outcome::Sent
    );
    match h.handle(&to("k2", number, "high"), false).await {
        Outcome::Failed(reason) => assert!(
            reason.starts_with("recipient_rate_limited: the recipient is over its limits (1/15m)"),
            "{reason}"
        ),
        other => panic!("{other:?}"),
    }
    assert_eq!(h.provider.calls(), 1);
    let failed = h.events.failed();
    assert_eq!(
        (failed[0].reason.as_str(), failed[0].attempts),
        ("recipient_rate_limited", 0)
    );
    assert!(
        !failed[0].detail.contains("712345678"),
        "{}",
        failed[0].detail
    );
    assert_eq!(h.cache.status_of("k2"), Some(("failed".into(), true, 0)));
    assert_eq!(
        h.handle(&to("k3", "+254700000009", "high"), false).await,
        Outcome::Sent,
        "another recipient is not limited"
    );
}

#[tokio::test(start_paused = true)]
async fn a_normal_command_over_its_limit_waits_without_its_lease_or_an_attempt_then_goes() {
    let h = limited(
        ScriptedProvider::new(vec![]),
        at_most(1, Duration::from_secs(60)),
    );
    let number = "+254712345678";
    assert_eq!(
        h.handle(&to("k1", number, "normal"), false).await,
        Outcome::Sent
    );
    tokio::time::sleep(Duration::from_secs(20)).await;
    let (delay, retry) = delayed(h.handle(&to("k2", number, "bulk"), false).await);
    assert!(
        delay > Duration::from_secs(39) && delay <= Duration::from_secs(40),
        "until the first leaves the window: {delay:?}"
    );
    assert_eq!(
        (retry.attempts, retry.delays, retry.first_attempt_at_ms),
        (0, 1, None),
        "no attempt, no tier climbed, no age"
    );
    assert_eq!(h.cache.lease_holder("k2"), None, "the lease is released");
    assert_eq!(h.cache.status_of("k2"), Some(("retrying".into(), false, 0)));
    // Back too early (a clock apart): it waits again, still no attempt.
    let (_, again) = delayed(
        h.handle_retry(&to("k2", number, "bulk"), false, &retry)
            .await,
    );
    assert_eq!((again.attempts, again.delays), (0, 1));
    tokio::time::sleep(delay).await;
    assert_eq!(
        h.handle_retry(&to("k2", number, "bulk"), false, &again)
            .await,
        Outcome::Sent
    );
    assert_eq!(h.provider.calls(), 2);
    assert_eq!(h.events.sent()[1].attempts, 1, "the waits were no attempts");
}

#[tokio::test(start_paused = true)]
async fn a_retry_a_redelivery_or_a_duplicate_of_a_counted_key_is_not_counted_again() {
    let h = limited(
        ScriptedProvider::new(vec![transient(None), transient(None), transient(None)]),
        at_most(1, Duration::from_secs(3600)),
    );
    let number = "+254712345678";
    // Counted at its first call, which fails: on to a delay tier.
    let (_, retry) = delayed(h.handle(&to("k1", number, "normal"), false).await);
    assert_eq!(retry.attempts, 3);
    // Back from the tier, and a redelivered copy: neither counts again.
    assert_eq!(
        h.handle_retry(&to("k1", number, "normal"), false, &retry)
            .await,
        Outcome::Sent
    );
    assert_eq!(
        h.handle(&to("k1", number, "normal"), true).await,
        Outcome::Duplicate
    );
    // The window holds one: k1's.
    assert!(matches!(
        h.handle(&to("k2", number, "normal"), false).await,
        Outcome::Delay { .. }
    ));
    assert_eq!(h.provider.calls(), 4);
}

#[tokio::test(start_paused = true)]
async fn allowed_numbers_are_neither_counted_nor_limited() {
    let mut limits = at_most(1, Duration::from_secs(3600));
    limits.allow.insert("+15005550006".to_owned());
    let h = limited(ScriptedProvider::new(vec![]), limits);
    for i in 0..5 {
        assert_eq!(
            h.handle(&to(&format!("k{i}"), "+15005550006", "high"), false)
                .await,
            Outcome::Sent
        );
    }
    assert_eq!(
        h.handle(&to("other", "+254712345678", "high"), false).await,
        Outcome::Sent
    );
    assert_eq!(h.provider.calls(), 6);
}

#[tokio::test(start_paused = true)]
async fn a_limited_command_whose_expiry_comes_first_returns_then_and_fails_expired() {
    let h = limited(
        ScriptedProvider::new(vec![]),
        at_most(1, Duration::from_secs(3600)),
    );
    let number = "+254712345678";
    assert_eq!(
        h.handle(&to("k1", number, "normal"), false).await,
        Outcome::Sent
    );
    let soon = std::time::SystemTime::now() + Duration::from_millis(1500);
    let at = crate::domain::rfc3339(soon);
    let body = format!(
        r#"{{"idempotencyKey":"k2","phoneNumber":"{number}","text":"hello","expiresAt":"{at}"}}"#
    )
    .into_bytes();
    let (delay, retry) = delayed(h.handle(&body, false).await);
    assert!(delay <= Duration::from_millis(2600), "{delay:?}");
    // The expiry check reads the real clock.
    std::thread::sleep(Duration::from_millis(1600));
    match h.handle_retry(&body, false, &retry).await {
        Outcome::Failed(reason) => assert!(reason.starts_with("expired"), "{reason}"),
        other => panic!("{other:?}"),
    }
    assert_eq!(h.provider.calls(), 1);
}

#[tokio::test(start_paused = true)]
async fn each_priority_takes_its_configured_action() {
    let mut limits = at_most(1, Duration::from_secs(3600));
    limits.actions = crate::domain::LimitActions {
        high: crate::domain::LimitAction::Delay,
        normal: crate::domain::LimitAction::Fail,
        bulk: crate::domain::LimitAction::Fail,
    };
    let h = limited(ScriptedProvider::new(vec![]), limits);
    let number = "+254712345678";
    assert_eq!(
        h.handle(&to("k1", number, "bulk"), false).await,
        Outcome::Sent
    );
    assert!(matches!(
        h.handle(&to("k2", number, "high"), false).await,
        Outcome::Delay { .. }
    ));
    for (key, priority) in [("k3", "normal"), ("k4", "bulk")] {
        assert!(matches!(
            h.handle(&to(key, number, priority), false).await,
            Outcome::Failed(_)
        ));
    }
}

// ---------------------------------------------------------------- quiet hours

/// `HH:MM:SS` of `at` in UTC.
fn utc_clock(at: std::time::SystemTime) -> String {
    crate::domain::rfc3339(at)[11..19].to_owned()
}

/// Quiet hours from a minute ago to `left` from now, UTC (Iceland's time).
fn quiet_for(left: Duration) -> crate::domain::QuietHours {
    let now = std::time::SystemTime::now();
    crate::domain::QuietHours::new(
        &utc_clock(now - Duration::from_secs(60)),
        &utc_clock(now + left),
        Duration::ZERO,
    )
    .unwrap()
}

#[tokio::test(start_paused = true)]
async fn a_quiet_hours_hold_whose_lease_could_not_be_released_is_requeued_not_held() {
    // Back from the hold queues a command is not a returning one: it would
    // take the lease left behind for a live holder's, and be acked.
    let mut h = limited(
        ScriptedProvider::new(vec![refused(), refused(), refused()]),
        at_most(1, Duration::from_secs(3600)),
    );
    let command = to("q1", "+3545551234", "bulk");
    // In its retries (a key known to the store), it reaches the quiet
    // hours' check under its claim.
    let (_, retry) = delayed(h.handle(&command, false).await);
    h.notifier.settings.quiet_hours = Some(quiet_for(Duration::from_secs(3600)));
    h.cache
        .postpone_down
        .store(true, std::sync::atomic::Ordering::SeqCst);
    assert_eq!(
        h.handle_retry(&command, false, &retry).await,
        Outcome::StoreUnavailable
    );
    assert_eq!(h.provider.calls(), 3);
}

#[tokio::test(start_paused = true)]
async fn a_command_in_quiet_hours_is_held_before_any_claim_as_scheduled_and_can_be_cancelled() {
    let mut h = limited(
        ScriptedProvider::new(vec![]),
        at_most(1, Duration::from_secs(3600)),
    );
    h.notifier.settings.quiet_hours = Some(quiet_for(Duration::from_secs(3600)));
    let command = to("q1", "+3545551234", "bulk");
    let Outcome::Hold { until } = h.handle(&command, false).await else {
        panic!("not held");
    };
    // No claim was made: the key is scheduled until the release, each
    // return from the hold queues the same.
    let status = h.cache.status("q1").await.unwrap().unwrap();
    assert_eq!(status.status, "scheduled");
    assert_eq!(status.send_at, Some(crate::domain::rfc3339(until)));
    assert_eq!(h.cache.lease_holder("q1"), None);
    assert!(matches!(
        h.handle(&command, false).await,
        Outcome::Hold { .. }
    ));
    let key = IdempotencyKey::parse("q1").unwrap();
    let door = Owner::cancel("door", 1);
    let verdict = h.cache.cancel(&key, &door, "cancelled by test").await;
    assert!(
        matches!(verdict, Ok(CancelVerdict::Publish { .. })),
        "{verdict:?}"
    );
    // One that expires before the quiet hours end comes back just after
    // its expiry, and fails as expired then.
    let expires = std::time::SystemTime::now() + Duration::from_secs(60);
    let body = format!(
        r#"{{"idempotencyKey":"q2","phoneNumber":"+3545551234","text":"hello","priority":"bulk","expiresAt":"{}"}}"#,
        crate::domain::rfc3339(expires)
    );
    let Outcome::Hold { until } = h.handle(body.as_bytes(), false).await else {
        panic!("not held");
    };
    assert!(until > expires && until <= expires + Duration::from_secs(2));
    assert_eq!(h.provider.calls(), 0);
}

#[tokio::test]
async fn quiet_hours_postpone_a_normal_command_uncounted_and_never_a_high_one() {
    let mut h = limited(
        ScriptedProvider::new(vec![]),
        at_most(1, Duration::from_secs(3600)),
    );
    h.notifier.settings.quiet_hours = Some(quiet_for(Duration::from_secs(3600)));
    let iceland = "+3545551234";
    let Outcome::Hold { until } = h.handle(&to("q1", iceland, "bulk"), false).await else {
        panic!("not held");
    };
    let ahead = until.duration_since(std::time::SystemTime::now()).unwrap();
    assert!(
        ahead > Duration::from_secs(3500) && ahead <= Duration::from_secs(3600),
        "until the quiet hours end: {ahead:?}"
    );
    assert_eq!(h.cache.lease_holder("q1"), None);
    assert_eq!(
        h.cache.status_of("q1"),
        Some(("scheduled".into(), false, 0))
    );
    // Held before the limits: the held one took no place in the window.
    assert_eq!(
        h.handle(&to("q2", iceland, "high"), false).await,
        Outcome::Sent
    );
    // A number of no country cannot tell night from day: not held.
    assert_eq!(
        h.handle(&to("q3", "+80012345678", "normal"), false).await,
        Outcome::Sent
    );
    assert_eq!(h.provider.calls(), 2);
}
