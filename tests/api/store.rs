//! The Redis store's scripts against the real Redis.

use sms_service::adapters::redis::RedisStore;
use sms_service::domain::IdempotencyKey;
use sms_service::ports::{CacheService, Claim, SentRecord};

use crate::helpers::{delete_redis_keys, settings, Names};

fn store(names: &Names) -> RedisStore {
    RedisStore::new(&settings(&names.env("http://127.0.0.1:9")).redis).unwrap()
}

fn sent() -> SentRecord {
    SentRecord {
        provider: "generic".into(),
        provider_message_id: "m-1".into(),
        segments: 1,
        attempts: 1,
        sent_at: "2026-11-22T10:00:00Z".into(),
    }
}

#[tokio::test]
async fn a_claim_retried_by_its_own_owner_is_granted_again_not_busy() {
    let names = Names::unique();
    let store = store(&names);
    let key = IdempotencyKey::parse("retried-claim").unwrap();
    assert_eq!(
        store.claim(&key, "owner-1").await.unwrap(),
        Claim::Send { attempts: 0 }
    );
    // The reply was lost and the same claim is sent again.
    assert_eq!(
        store.claim(&key, "owner-1").await.unwrap(),
        Claim::Send { attempts: 0 }
    );
    assert!(matches!(
        store.claim(&key, "owner-2").await.unwrap(),
        Claim::Busy { .. }
    ));
    delete_redis_keys(&names.key_prefix).await;
}

#[tokio::test]
async fn a_send_recorded_late_as_published_is_done_for_every_later_claim() {
    let names = Names::unique();
    let store = store(&names);
    let key = IdempotencyKey::parse("late-record").unwrap();
    store.claim(&key, "owner-1").await.unwrap();
    // The first record failed; after the event's confirm it is written
    // together with "published".
    store.record_sent(&key, &sent(), true).await.unwrap();
    assert_eq!(
        store.claim(&key, "owner-2").await.unwrap(),
        Claim::AlreadySent
    );
    let status = store.status("late-record").await.unwrap().unwrap();
    assert_eq!((status.status.as_str(), status.attempts), ("sent", 1));
    delete_redis_keys(&names.key_prefix).await;
}

#[tokio::test]
async fn a_recorded_but_unpublished_send_is_handed_out_for_publishing_once_its_lease_is_free() {
    let names = Names::unique();
    let store = store(&names);
    let key = IdempotencyKey::parse("unpublished").unwrap();
    store.claim(&key, "owner-1").await.unwrap();
    store.record_sent(&key, &sent(), false).await.unwrap();
    assert!(matches!(
        store.claim(&key, "owner-2").await.unwrap(),
        Claim::Busy { .. }
    ));
    store.release(&key, "owner-1", 1).await.unwrap();
    assert_eq!(
        store.claim(&key, "owner-2").await.unwrap(),
        Claim::PublishSent(sent())
    );
    store.mark_published(&key, "owner-2").await.unwrap();
    assert_eq!(
        store.claim(&key, "owner-3").await.unwrap(),
        Claim::AlreadySent
    );
    delete_redis_keys(&names.key_prefix).await;
}
