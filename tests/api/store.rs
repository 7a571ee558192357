//! The Redis store against the real Redis: the store contract that the
//! in-memory store keeps too, and what only Redis can show (TTLs).

use std::time::Duration;

use sms_service::adapters::redis::RedisStore;
use sms_service::domain::IdempotencyKey;
use sms_service::ports::{CacheService, Claim, Owner};
use sms_service::testing::store_contract;

use crate::helpers::{delete_redis_keys, redis_connection, settings, Names};

const LEASE_MS: u64 = 700;

fn store(names: &Names) -> RedisStore {
    let mut env = names.env("http://127.0.0.1:9");
    env.push(("SMS__REDIS__LEASE_MS".into(), LEASE_MS.to_string()));
    env.push(("SMS__REDIS__LIVENESS_TTL_MS".into(), "300".into()));
    // A lease this short needs calls and confirms that fit in it.
    env.push(("SMS__PROVIDER__REQUEST_TIMEOUT_MS".into(), "50".into()));
    env.push(("SMS__AMQP__CONFIRM_TIMEOUT_MS".into(), "50".into()));
    env.push(("SMS__RETRY__MAX_DELAY_MS".into(), "50".into()));
    env.push(("SMS__RETRY__BASE_DELAY_MS".into(), "20".into()));
    RedisStore::new(&settings(&env).redis).unwrap()
}

#[tokio::test]
async fn the_redis_store_keeps_the_store_contract() {
    let names = Names::unique();
    let store = store(&names);
    store_contract::check(
        &store,
        Duration::from_millis(LEASE_MS),
        Duration::from_millis(300),
        "redis",
    )
    .await;
    delete_redis_keys(&names.key_prefix).await;
}

#[tokio::test]
async fn every_granted_claim_refreshes_the_keys_ttl() {
    let names = Names::unique();
    let store = store(&names);
    let key = IdempotencyKey::parse("ttl").unwrap();
    let owner = Owner::new("ttlinstance", 1);
    store
        .heartbeat(&owner.instance, Duration::from_secs(60))
        .await
        .unwrap();
    store.claim(&key, &owner, "fp").await.unwrap();
    let msg = format!("{}:msg:ttl", names.key_prefix);
    let mut redis = redis_connection().await;
    // As if the key had been waiting in delay tiers for most of a day.
    let _: () = redis::cmd("EXPIRE")
        .arg(&msg)
        .arg(5)
        .query_async(&mut redis)
        .await
        .unwrap();
    store.release(&key, &owner, 1, None).await.unwrap();
    assert!(matches!(
        store
            .claim(&key, &Owner::new("ttlinstance", 2), "fp")
            .await
            .unwrap(),
        Claim::Send { attempts: 1, .. }
    ));
    let ttl: i64 = redis::cmd("TTL")
        .arg(&msg)
        .query_async(&mut redis)
        .await
        .unwrap();
    assert!(ttl > 500, "TTL not refreshed by the claim: {ttl}");
    delete_redis_keys(&names.key_prefix).await;
}

async fn ttl_of(redis: &mut redis::aio::MultiplexedConnection, key: &str) -> i64 {
    redis::cmd("TTL").arg(key).query_async(redis).await.unwrap()
}

#[tokio::test]
async fn a_scheduled_record_and_a_cancel_outlive_the_send_at_they_wait_for() {
    let names = Names::unique();
    let store = store(&names);
    let mut redis = redis_connection().await;
    // The test settings remember a key 600 s.
    let idempotency_ttl = 600;
    let day = 86_400;
    let scheduled = IdempotencyKey::parse("in-ten-days").unwrap();
    let due = std::time::SystemTime::now() + Duration::from_secs(10 * day);
    store
        .schedule(&scheduled, "fp", "+254712345678", due)
        .await
        .unwrap();
    let msg = format!("{}:msg:in-ten-days", names.key_prefix);
    let ttl = ttl_of(&mut redis, &msg).await;
    assert!(
        (10 * day as i64 + idempotency_ttl - 5..=10 * day as i64 + idempotency_ttl + 5)
            .contains(&ttl),
        "scheduled: kept until it is due and the idempotency TTL after: {ttl}"
    );
    // A cancel of a key not seen yet: its command may be due 30 days on.
    let unknown = IdempotencyKey::parse("never-seen").unwrap();
    let owner = Owner::cancel("ttlinstance", 1);
    store.cancel(&unknown, &owner, "test").await.unwrap();
    let ttl = ttl_of(&mut redis, &format!("{}:msg:never-seen", names.key_prefix)).await;
    assert!(
        ttl >= 30 * day as i64 + idempotency_ttl - 5,
        "tombstone: kept past the latest sendAt: {ttl}"
    );
    delete_redis_keys(&names.key_prefix).await;
}
