//! How the store reaches Redis in each `redis.mode`:
//!
//! - standalone: one [`ConnectionManager`], which reconnects by itself;
//! - sentinel: the master that the Sentinels name, over one multiplexed
//!   connection. A connection to a server that is no longer the master
//!   (it answers `READONLY` after a failover, or drops) is given up and
//!   the master found again through the Sentinels, with a backoff between
//!   failed discoveries so a failover in progress is not hammered. A
//!   master cut off from the Sentinels may keep answering as a master, so
//!   the master in use is also re-checked at most every [`CHECK_EVERY`]
//!   (its `ROLE`, and the address the Sentinels name) and given up when
//!   either disagrees; `NOREPLICAS` (a master with `min-replicas-to-write`
//!   that lost its replicas) also gives it up;
//! - cluster: the crate's cluster connection, which follows `MOVED` and
//!   `ASK` redirections and refreshes its slot map by itself.
//!
//! The crate has no self-healing connection for Sentinel (its
//! `SentinelClient` hands out plain connections:
//! <https://docs.rs/redis/1.0.0/redis/sentinel/index.html>), hence
//! [`SentinelMaster`].

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use redis::aio::MultiplexedConnection;
use redis::aio::{ConnectionLike, ConnectionManager, ConnectionManagerConfig};
use redis::cluster::ClusterClient;
use redis::cluster_async::ClusterConnection;
use redis::sentinel::{SentinelClient, SentinelNodeConnectionInfo, SentinelServerType};
use redis::{
    AsyncConnectionConfig, Cmd, ConnectionAddr, ErrorKind, IntoConnectionInfo, RedisError,
    RedisFuture, ServerErrorKind, Value,
};
use secrecy::ExposeSecret;
use tokio::sync::OnceCell;

use crate::config::{node_url, RedisMode, RedisSettings};
use crate::ports::CacheError;

fn store_error(e: impl std::fmt::Display) -> CacheError {
    CacheError(e.to_string())
}

/// One connection of any mode; cheap to clone (all are multiplexed).
#[derive(Clone)]
pub(super) enum Conn {
    Manager(ConnectionManager),
    Direct(MultiplexedConnection),
    Cluster(ClusterConnection),
}

impl ConnectionLike for Conn {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match self {
            Self::Manager(c) => c.req_packed_command(cmd),
            Self::Direct(c) => c.req_packed_command(cmd),
            Self::Cluster(c) => c.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a redis::Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match self {
            Self::Manager(c) => c.req_packed_commands(pipeline, offset, count),
            Self::Direct(c) => c.req_packed_commands(pipeline, offset, count),
            Self::Cluster(c) => c.req_packed_commands(pipeline, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Self::Manager(c) => c.get_db(),
            Self::Direct(c) => c.get_db(),
            Self::Cluster(c) => c.get_db(),
        }
    }
}

/// The way to Redis of one store.
pub(super) enum Backend {
    Standalone {
        client: redis::Client,
        config: ConnectionManagerConfig,
        /// Made on first use, so the service starts while Redis is away.
        manager: OnceCell<ConnectionManager>,
    },
    Sentinel(Arc<SentinelMaster>),
    Cluster {
        client: ClusterClient,
        connection: OnceCell<ClusterConnection>,
    },
}

/// A connection handed out, with the generation of the master it goes to
/// (sentinel mode), so that a failure gives up only that one.
pub(super) struct Lease {
    pub conn: Conn,
    generation: u64,
}

impl Backend {
    pub fn new(settings: &RedisSettings) -> Result<Self, CacheError> {
        let timeout = Duration::from_millis(settings.timeout_ms);
        let url = settings.url.expose_secret();
        Ok(match settings.mode {
            RedisMode::Standalone => Self::Standalone {
                client: redis::Client::open(url).map_err(store_error)?,
                config: ConnectionManagerConfig::new()
                    .set_connection_timeout(Some(timeout))
                    .set_response_timeout(Some(timeout))
                    .set_number_of_retries(2)
                    .set_max_delay(Duration::from_secs(2)),
                manager: OnceCell::new(),
            },
            RedisMode::Sentinel => {
                Self::Sentinel(Arc::new(SentinelMaster::new(settings, timeout)?))
            }
            RedisMode::Cluster => {
                let info = url.into_connection_info().map_err(store_error)?;
                let redis = info.redis_settings();
                let nodes: Vec<String> =
                    settings.nodes.iter().filter_map(|n| node_url(n)).collect();
                let mut builder = ClusterClient::builder(nodes)
                    .connection_timeout(timeout)
                    .response_timeout(timeout)
                    // Redirections and TRYAGAIN during a slot migration
                    // are retried by the crate, up to this many times.
                    .retries(8)
                    .min_retry_wait(10)
                    .max_retry_wait(500);
                if let Some(user) = redis.username() {
                    builder = builder.username(user);
                }
                if let Some(password) = redis.password() {
                    builder = builder.password(password);
                }
                Self::Cluster {
                    client: builder.build().map_err(store_error)?,
                    connection: OnceCell::new(),
                }
            }
        })
    }

    pub async fn connection(&self) -> Result<Lease, CacheError> {
        match self {
            Self::Standalone {
                client,
                config,
                manager,
            } => {
                let manager = manager
                    .get_or_try_init(|| {
                        ConnectionManager::new_with_config(client.clone(), config.clone())
                    })
                    .await
                    .map_err(store_error)?;
                Ok(Lease {
                    conn: Conn::Manager(manager.clone()),
                    generation: 0,
                })
            }
            Self::Sentinel(master) => SentinelMaster::connection(master).await,
            Self::Cluster { client, connection } => {
                let connection = connection
                    .get_or_try_init(|| client.get_async_connection())
                    .await
                    .map_err(store_error)?;
                Ok(Lease {
                    conn: Conn::Cluster(connection.clone()),
                    generation: 0,
                })
            }
        }
    }

    /// After `error` on `lease`: gives the connection up when it goes to
    /// a server that is no longer the master (sentinel mode); the next
    /// [`Backend::connection`] finds the master again.
    pub fn failed(&self, lease: &Lease, error: &RedisError) {
        if let Self::Sentinel(master) = self {
            if stale(error) {
                master.forget(lease.generation);
            }
        }
    }
}

/// Whether an error means the connection no longer leads to a writable
/// master: dropped, timed out, or refused as a replica's (`READONLY`,
/// also what a script's write gets on a replica), a loading server's, a
/// master's that lost its replicas (`NOREPLICAS`, with
/// `min-replicas-to-write`: likely cut off from the rest) or a replica's
/// cut off from its master (`MASTERDOWN`).
pub(super) fn stale(error: &RedisError) -> bool {
    error.is_io_error()
        || error.is_connection_dropped()
        || error.is_connection_refusal()
        || error.is_timeout()
        || error.is_unrecoverable_error()
        || matches!(
            error.kind(),
            ErrorKind::Server(
                ServerErrorKind::ReadOnly
                    | ServerErrorKind::BusyLoading
                    | ServerErrorKind::MasterDown
            )
        )
        || matches!(error.code(), Some("READONLY" | "NOREPLICAS" | "MASTERDOWN"))
}

/// The master the Sentinels name, found again after a failover.
pub(super) struct SentinelMaster {
    /// Discovery, one at a time.
    sentinel: tokio::sync::Mutex<Discovery>,
    current: Mutex<Option<Current>>,
    /// When the master in use was last re-checked (or found).
    checked: Mutex<Instant>,
    config: AsyncConnectionConfig,
    timeout: Duration,
}

struct Current {
    generation: u64,
    conn: MultiplexedConnection,
    /// Where the Sentinels said the master was.
    addr: ConnectionAddr,
}

struct Discovery {
    client: SentinelClient,
    generation: u64,
    /// Failed discoveries in a row, and when the next may start.
    failures: u32,
    not_before: Option<Instant>,
}

/// The first wait after a failed discovery; it doubles up to the most.
const FIRST_BACKOFF: Duration = Duration::from_millis(100);
const MOST_BACKOFF: Duration = Duration::from_secs(2);

/// How often, at most, the master in use is re-checked (on use, in a task).
pub(super) const CHECK_EVERY: Duration = Duration::from_secs(2);

impl SentinelMaster {
    fn new(settings: &RedisSettings, timeout: Duration) -> Result<Self, CacheError> {
        let info = settings
            .url
            .expose_secret()
            .into_connection_info()
            .map_err(store_error)?;
        let node = SentinelNodeConnectionInfo::default()
            .set_redis_connection_info(info.redis_settings().clone());
        let sentinels: Vec<String> = settings
            .sentinels
            .iter()
            .filter_map(|s| node_url(s))
            .collect();
        let client = SentinelClient::build(
            sentinels,
            settings.master_name.clone(),
            Some(node),
            SentinelServerType::Master,
        )
        .map_err(store_error)?;
        Ok(Self {
            sentinel: tokio::sync::Mutex::new(Discovery {
                client,
                generation: 0,
                failures: 0,
                not_before: None,
            }),
            current: Mutex::new(None),
            checked: Mutex::new(Instant::now()),
            config: AsyncConnectionConfig::new()
                .set_connection_timeout(Some(timeout))
                .set_response_timeout(Some(timeout)),
            timeout,
        })
    }

    fn current(&self) -> Option<Lease> {
        let current = self.current.lock().expect("not poisoned");
        current.as_ref().map(|c| Lease {
            conn: Conn::Direct(c.conn.clone()),
            generation: c.generation,
        })
    }

    async fn connection(this: &Arc<Self>) -> Result<Lease, CacheError> {
        if let Some(lease) = this.current() {
            this.check_if_due(lease.generation);
            return Ok(lease);
        }
        this.discover().await
    }

    /// Re-checks the master in use in a task when the last check is
    /// [`CHECK_EVERY`] old: a master split off with a minority of the
    /// Sentinels still answers as a master and takes writes until
    /// `min-replicas-to-write` makes it refuse them.
    fn check_if_due(self: &Arc<Self>, generation: u64) {
        {
            let mut checked = self.checked.lock().expect("not poisoned");
            if checked.elapsed() < CHECK_EVERY {
                return;
            }
            *checked = Instant::now();
        }
        let this = Arc::clone(self);
        tokio::spawn(async move {
            if let Some(why) = this.recheck(generation).await {
                tracing::warn!(
                    generation,
                    why,
                    "redis master in use is no longer the master"
                );
                this.forget(generation);
            }
        });
    }

    /// Why the master of `generation` is to be given up, if it is.
    async fn recheck(&self, generation: u64) -> Option<&'static str> {
        let (mut conn, addr) = {
            let current = self.current.lock().expect("not poisoned");
            let c = current.as_ref().filter(|c| c.generation == generation)?;
            (c.conn.clone(), c.addr.clone())
        };
        // ROLE: https://redis.io/docs/latest/commands/role/
        let role = tokio::time::timeout(
            self.timeout,
            redis::cmd("ROLE").query_async::<Vec<Value>>(&mut conn),
        )
        .await;
        match role {
            Err(_) => return Some("ROLE timed out"),
            Ok(Err(e)) if stale(&e) => return Some("ROLE failed"),
            Ok(Err(_)) => {}
            Ok(Ok(role)) => {
                let master = matches!(role.first(), Some(Value::BulkString(b)) if b == b"master")
                    || matches!(role.first(), Some(Value::SimpleString(s)) if s == "master");
                if !master {
                    return Some("ROLE is not master");
                }
            }
        }
        // The Sentinels' view; skipped while a discovery runs.
        let mut discovery = self.sentinel.try_lock().ok()?;
        let named = tokio::time::timeout(
            self.timeout.saturating_mul(3),
            discovery.client.async_get_client(),
        )
        .await;
        match named {
            Ok(Ok(client)) if *client.get_connection_info().addr() != addr => {
                Some("the sentinels name another master")
            }
            // Sentinels unreachable: the master stays; a split-off one
            // refuses writes with min-replicas-to-write (`NOREPLICAS`).
            _ => None,
        }
    }

    async fn discover(&self) -> Result<Lease, CacheError> {
        let mut discovery = self.sentinel.lock().await;
        // Another call may have found the master while this one waited.
        if let Some(lease) = self.current() {
            return Ok(lease);
        }
        if let Some(at) = discovery.not_before {
            let left = at.saturating_duration_since(Instant::now());
            if left > self.timeout {
                return Err(CacheError(format!(
                    "redis master unknown (sentinel): next discovery in {} ms",
                    left.as_millis()
                )));
            }
            tokio::time::sleep(left).await;
        }
        // The Sentinels are asked in turn, each bounded by the timeout,
        // then the master's ROLE is checked by the crate.
        let config = &self.config;
        let found = tokio::time::timeout(self.timeout.saturating_mul(3), async {
            let client = discovery.client.async_get_client().await?;
            let addr = client.get_connection_info().addr().clone();
            let conn = client
                .get_multiplexed_async_connection_with_config(config)
                .await?;
            Ok::<_, RedisError>((conn, addr))
        })
        .await;
        match found {
            Ok(Ok((conn, addr))) => {
                discovery.generation += 1;
                discovery.failures = 0;
                discovery.not_before = None;
                let generation = discovery.generation;
                if generation > 1 {
                    tracing::warn!(generation, "redis master found again through the sentinels");
                }
                *self.current.lock().expect("not poisoned") = Some(Current {
                    generation,
                    conn: conn.clone(),
                    addr,
                });
                *self.checked.lock().expect("not poisoned") = Instant::now();
                Ok(Lease {
                    conn: Conn::Direct(conn),
                    generation,
                })
            }
            Ok(Err(e)) => Err(self.backoff(&mut discovery, store_error(e))),
            Err(_) => Err(self.backoff(
                &mut discovery,
                CacheError("redis master discovery (sentinel) timed out".into()),
            )),
        }
    }

    fn backoff(&self, discovery: &mut Discovery, error: CacheError) -> CacheError {
        let wait = FIRST_BACKOFF
            .saturating_mul(1 << discovery.failures.min(5))
            .min(MOST_BACKOFF);
        discovery.failures += 1;
        discovery.not_before = Some(Instant::now() + wait);
        CacheError(format!(
            "{} (sentinel discovery; next in {} ms)",
            error.0,
            wait.as_millis()
        ))
    }

    fn forget(&self, generation: u64) {
        let mut current = self.current.lock().expect("not poisoned");
        if current.as_ref().is_some_and(|c| c.generation == generation) {
            tracing::warn!(
                generation,
                "redis master lost: finding it again through the sentinels"
            );
            *current = None;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A server's error reply, as the crate parses it.
    fn reply(line: &str) -> RedisError {
        match redis::parse_redis_value(format!("-{line}\r\n").as_bytes()) {
            Ok(Value::ServerError(e)) => e.into(),
            other => panic!("not an error reply: {other:?}"),
        }
    }

    #[test]
    fn a_master_without_replicas_or_a_replica_is_stale() {
        for line in [
            "NOREPLICAS Not enough good replicas to write.",
            "MASTERDOWN Link with MASTER is down and replica-serve-stale-data is set to 'no'.",
            "READONLY You can't write against a read only replica.",
            "LOADING Redis is loading the dataset in memory",
        ] {
            assert!(stale(&reply(line)), "{line}");
        }
        assert!(stale(&redis::make_extension_error(
            "NOREPLICAS".into(),
            None
        )));
    }

    #[test]
    fn a_command_error_is_not_stale() {
        for line in [
            "ERR wrong number of arguments",
            "WRONGTYPE Operation against a key holding the wrong kind of value",
            "NOSCRIPT No matching script",
        ] {
            assert!(!stale(&reply(line)), "{line}");
        }
    }
}
