//! `redis.wait_replicas`: after a `sent` record, wait until that many
//! replicas have it.
//!
//! `WAIT n timeout` blocks the connection it is sent on, and it waits for
//! the writes of that connection only
//! (<https://redis.io/docs/latest/commands/wait/>). On the store's shared
//! multiplexed connection one `WAIT` would hold up every other command
//! behind it (up to the timeout while a replica is down). So the waits go
//! over a connection of their own, and are grouped: a waiter writes a
//! marker (which the master orders after every write it answered before,
//! the caller's record included) and sends `WAIT` after it; one such
//! round covers every caller whose record was written before the round
//! began, so callers queued behind a round share the next one, and a
//! replica down costs each sent record at most two timeouts, not a queue
//! of them.

use std::sync::atomic::{AtomicU64, Ordering};

use redis::Value;
use tokio::sync::Mutex;

use super::connection::Backend;
use crate::config::RedisSettings;
use crate::ports::CacheError;

pub(super) struct Replication {
    backend: Backend,
    replicas: u32,
    timeout_ms: u64,
    marker: String,
    /// Tickets handed out, one per caller whose record is written.
    issued: AtomicU64,
    /// One round at a time; holds the ticket the last round covered and
    /// what it found.
    round: Mutex<(u64, i64, Option<String>)>,
}

impl Replication {
    pub fn new(settings: &RedisSettings) -> Result<Self, CacheError> {
        Ok(Self {
            backend: Backend::new(settings)?,
            replicas: settings.wait_replicas,
            timeout_ms: settings.wait_timeout_ms,
            marker: format!("{}:replicated", settings.key_prefix),
            issued: AtomicU64::new(0),
            round: Mutex::new((0, 0, None)),
        })
    }

    /// How many replicas acknowledged every write made before this call,
    /// and the error if the round failed (then -1).
    pub async fn wait(&self) -> (i64, Option<String>) {
        let ticket = self.issued.fetch_add(1, Ordering::SeqCst) + 1;
        let mut round = self.round.lock().await;
        if round.0 >= ticket {
            return (round.1, round.2.clone());
        }
        // Every ticket up to here belongs to a record already answered.
        let covers = self.issued.load(Ordering::SeqCst);
        let (acknowledged, error) = match self.round_trip().await {
            Ok(n) => (n, None),
            Err(e) => (-1, Some(e)),
        };
        *round = (covers, acknowledged, error.clone());
        (acknowledged, error)
    }

    async fn round_trip(&self) -> Result<i64, String> {
        let mut lease = self.backend.connection().await.map_err(|e| e.0)?;
        let mut pipe = redis::pipe();
        pipe.cmd("SET")
            .arg(&self.marker)
            .arg("1")
            .arg("PX")
            .arg(60_000)
            .ignore()
            .cmd("WAIT")
            .arg(self.replicas)
            .arg(self.timeout_ms);
        match pipe.query_async::<(Value,)>(&mut lease.conn).await {
            Ok((Value::Int(n),)) => Ok(n),
            Ok((other,)) => Err(format!("WAIT answered {other:?}")),
            Err(e) => {
                self.backend.failed(&lease, &e);
                Err(e.to_string())
            }
        }
    }
}
