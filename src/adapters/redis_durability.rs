//! Whether the Redis in use keeps every idempotency record until it
//! expires. A Redis with a `maxmemory-policy` other than `noeviction`
//! drops keys when it runs out of memory, and a command whose record was
//! dropped is sent again. At start the service reads the policy once and
//! warns; it never changes the server's configuration.

use std::collections::HashMap;
use std::time::Duration;

use redis::aio::MultiplexedConnection;
use redis::AsyncConnectionConfig;
use secrecy::ExposeSecret;

use crate::config::RedisSettings;

/// The only policy under which Redis never drops a key before it expires.
pub const NO_EVICTION: &str = "noeviction";

/// A warning to log once at start if the Redis of `settings` may evict
/// keys; `None` if it does not, or if it did not say (unreachable, or
/// neither `CONFIG GET` nor `INFO` answered).
pub async fn eviction_warning(settings: &RedisSettings) -> Option<String> {
    // Through Sentinel or a cluster the URL names no server: the README
    // asks for noeviction on every node of those.
    if settings.mode != crate::config::RedisMode::Standalone {
        return None;
    }
    let policy = eviction_policy(settings).await?;
    warning_for(&policy, &server_address(settings.url.expose_secret()))
}

/// The server's `maxmemory-policy`: from `CONFIG GET`, or, where `CONFIG`
/// is disabled or renamed (as managed Redis services often do), from the
/// `maxmemory_policy` field of `INFO memory`. Bounded by three
/// `redis.timeout_ms` (a connect and two commands).
pub async fn eviction_policy(settings: &RedisSettings) -> Option<String> {
    let timeout = Duration::from_millis(settings.timeout_ms);
    let ask = async {
        let client = redis::Client::open(settings.url.expose_secret()).ok()?;
        let config = AsyncConnectionConfig::new()
            .set_connection_timeout(Some(timeout))
            .set_response_timeout(Some(timeout));
        let mut connection = client
            .get_multiplexed_async_connection_with_config(&config)
            .await
            .ok()?;
        if let Some(policy) = from_config(&mut connection).await {
            return Some(policy);
        }
        let info: String = redis::cmd("INFO")
            .arg("memory")
            .query_async(&mut connection)
            .await
            .ok()?;
        policy_from_info(&info)
    };
    tokio::time::timeout(timeout.saturating_mul(3), ask)
        .await
        .ok()
        .flatten()
}

async fn from_config(connection: &mut MultiplexedConnection) -> Option<String> {
    let mut answer: HashMap<String, String> = redis::cmd("CONFIG")
        .arg("GET")
        .arg("maxmemory-policy")
        .query_async(connection)
        .await
        .ok()?;
    answer.remove("maxmemory-policy")
}

/// The `maxmemory_policy` field of an `INFO` answer.
fn policy_from_info(info: &str) -> Option<String> {
    info.lines()
        .find_map(|line| line.trim().strip_prefix("maxmemory_policy:"))
        .map(|policy| policy.trim().to_owned())
        .filter(|policy| !policy.is_empty())
}

/// The decision: any policy but `noeviction` is worth a warning.
fn warning_for(policy: &str, server: &str) -> Option<String> {
    (policy != NO_EVICTION).then(|| {
        format!(
            "Redis at {server} has maxmemory-policy {policy}: when its memory is full it may \
             evict idempotency records before they expire, and a command whose record was \
             evicted is sent again. Set maxmemory-policy noeviction (README, Redis durability)"
        )
    })
}

/// `host:port` of a Redis URL, without its user name or password.
pub fn server_address(url: &str) -> String {
    match url::Url::parse(url) {
        Ok(url) => format!(
            "{}:{}",
            url.host_str().unwrap_or("?"),
            url.port().unwrap_or(6379)
        ),
        Err(_) => "?".to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_policy_other_than_noeviction_is_warned_about() {
        assert_eq!(warning_for("noeviction", "cache:6379"), None);
        for policy in [
            "allkeys-lru",
            "allkeys-lfu",
            "allkeys-random",
            "volatile-lru",
            "volatile-lfu",
            "volatile-random",
            "volatile-ttl",
        ] {
            let warning = warning_for(policy, "cache:6379").expect(policy);
            assert!(warning.contains(policy), "{warning}");
            assert!(warning.contains("cache:6379"), "{warning}");
            assert!(warning.contains("noeviction"), "{warning}");
        }
    }

    #[test]
    fn the_warning_names_host_and_port_but_never_the_password() {
        assert_eq!(
            server_address("redis://user:hunter2@cache.internal:6380/2"),
            "cache.internal:6380"
        );
        assert_eq!(server_address("redis://:hunter2@10.0.0.7"), "10.0.0.7:6379");
        assert_eq!(server_address("rediss://[::1]:7000"), "[::1]:7000");
    }

    #[test]
    fn the_policy_is_read_from_info_memory_when_config_is_disabled() {
        let info = "# Memory\r\nused_memory:1032416\r\nmaxmemory:0\r\n\
                    maxmemory_human:0B\r\nmaxmemory_policy:allkeys-lru\r\n\
                    allocator_frag_ratio:1.00\r\n";
        assert_eq!(policy_from_info(info).as_deref(), Some("allkeys-lru"));
        assert_eq!(policy_from_info("# Memory\r\nused_memory:1\r\n"), None);
    }
}
