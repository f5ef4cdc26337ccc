//! Kiln's client of Redis (`[redis]`): one connection, made at first use and made afresh
//! after Redis could not be reached; every call bounded by `redis.timeout_ms` (connecting
//! included), never hanging; for a second after a failure to reach Redis, calls fail at once
//! (then calls try again), so an outage costs each caller at most one timeout (with a
//! Cluster, whose client reconnects each node by itself, only a failure to connect at all
//! does that); calls about
//! many keys pipelined in chunks of `redis.pipeline_keys`, so N keys cost one round trip per
//! chunk; values read with a bound on their size (a longer one is not transferred); values
//! written under a temporary key and renamed into place in one transaction. Failures are
//! `UNAVAILABLE` to clients, with a message naming Redis.
//!
//! Keys start with `redis.key_prefix`. The keys Kiln builds ([`Redis::digest_key`]) put the first two
//! hex digits of the digest's hash in a hash tag (`{…}`) after the instance name: a value's
//! temporary key lives in the same Redis Cluster slot as the value, and keys spread over 256
//! slots. With `redis.cluster`, a call about many keys sends one pipeline per hash tag (a
//! Cluster pipeline must stay in one slot; 8 at a time), where a single Redis takes them all
//! in one. The timeout bounds each round trip: a call of many chunks may take several.

mod connection;
mod error;
mod keys;
mod many;
mod shared_state;

pub use error::RedisError;

use bytes::Bytes;
use connection::{connection_failed, Connection, Link};
use keys::digest_key;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// After Redis could not be reached, calls fail at once for this long (then one goes through
/// to try again), so that an outage costs callers nothing but the first timeout.
const BACKOFF: Duration = Duration::from_secs(1);

/// When [`Redis::set`] sets a key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum When {
    /// Whether it is there or not.
    Always,
    /// Only if it is not there (a claim).
    Missing,
    /// Only if it is there (a lease renewed).
    Present,
}

/// A value read with a bound on its size.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Value {
    /// No such key.
    Missing,
    /// The value.
    Found(Bytes),
    /// Longer than the bound (this many bytes); not transferred.
    TooLarge(u64),
}

/// Redis, as `[redis]` describes it.
pub struct Redis {
    client: redis::Client,
    /// With `redis.cluster`: the Cluster's client (`client` then names its first node).
    cluster: Option<redis::cluster::ClusterClient>,
    /// The URL without its credentials, for messages.
    at: String,
    /// Made at first use (Redis may be down when the server starts); it reconnects by itself
    /// afterwards, and is made afresh after Redis could not be reached.
    connection: tokio::sync::Mutex<Option<Link>>,
    generations: AtomicU64,
    /// Until when calls fail at once, and why.
    down: std::sync::Mutex<Option<(Instant, String)>>,
    timeout: Duration,
    chunk: usize,
    prefix: String,
}

impl Redis {
    /// The Redis of `config`; `None` when no URL is set. Connects at first use.
    pub fn new(config: &kiln_config::RedisConfig) -> Result<Option<Arc<Redis>>, RedisError> {
        if config.url.is_empty() {
            return Ok(None);
        }
        // With `cluster`, `url` may list several nodes to start from, separated by commas.
        let seeds: Vec<&str> = config.url.split(',').map(str::trim).collect();
        let client = redis::Client::open(seeds[0]).map_err(|e| RedisError::Url(e.to_string()))?;
        let info = client.get_connection_info();
        let at = format!("{}", info.addr);
        let timeout = Duration::from_millis(config.timeout_ms);
        let cluster = match config.cluster {
            false => None,
            true => Some(
                redis::cluster::ClusterClient::builder(seeds)
                    .connection_timeout(timeout)
                    .response_timeout(timeout)
                    // Requests follow MOVED and ASK and wait out a failover a few times
                    // (all within the call's own bound).
                    .retries(3)
                    .build()
                    .map_err(|e| RedisError::Url(e.to_string()))?,
            ),
        };
        Ok(Some(Arc::new(Redis {
            client,
            cluster,
            at,
            connection: tokio::sync::Mutex::new(None),
            generations: AtomicU64::new(0),
            down: std::sync::Mutex::new(None),
            timeout: Duration::from_millis(config.timeout_ms),
            chunk: config.pipeline_keys.max(1),
            prefix: config.key_prefix.clone(),
        })))
    }

    /// Where Redis is, for messages.
    pub fn at(&self) -> &str {
        &self.at
    }

    /// `parts` behind the configured prefix.
    pub fn key(&self, parts: &str) -> String {
        format!("{}{parts}", self.prefix)
    }

    /// The key of `key`'s value under `kind` (`ac`, `cas`), behind the prefix (see
    /// [`digest_key`]).
    pub fn digest_key(&self, kind: &str, key: &kiln_reapi::digest::BlobKey) -> String {
        self.key(&digest_key(
            kind,
            key.instance.as_str(),
            key.digest.function.name(),
            &key.digest.hex(),
            key.digest.size,
        ))
    }

    fn failed(&self, e: &redis::RedisError) -> RedisError {
        RedisError::Failed {
            at: self.at.clone(),
            message: e.to_string(),
        }
    }

    fn down(&self) -> std::sync::MutexGuard<'_, Option<(Instant, String)>> {
        self.down.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Notes that Redis could not be reached (through connection `generation`, when one was
    /// made): that connection is dropped, and calls fail at once for [`BACKOFF`].
    fn unreachable(&self, generation: Option<u64>, why: String) {
        // A Cluster's client reconnects each node by itself, and one node failing is not the
        // others failing: only a call that could not be made at all is retried afresh.
        if self.cluster.is_some() && generation.is_some() {
            return;
        }
        *self.down() = Some((Instant::now() + BACKOFF, why));
        // Not waiting for a caller that is connecting now: it makes the next connection.
        if let (Some(g), Ok(mut slot)) = (generation, self.connection.try_lock()) {
            if slot.as_ref().is_some_and(|l| l.generation == g) {
                *slot = None;
            }
        }
    }

    /// Runs `call` on the connection (made first when there is none), all within the
    /// timeout; at once an error while Redis is known to be down.
    async fn run<T, F, Fut>(&self, call: F) -> Result<T, RedisError>
    where
        F: FnOnce(Connection) -> Fut,
        Fut: Future<Output = redis::RedisResult<T>>,
    {
        if let Some((until, why)) = self.down().clone() {
            if Instant::now() < until {
                return Err(RedisError::Down {
                    at: self.at.clone(),
                    why,
                });
            }
        }
        let mut used = None;
        let work = async {
            let (generation, connection) = {
                let mut slot = self.connection.lock().await;
                match &*slot {
                    Some(l) => (l.generation, l.connection.clone()),
                    None => {
                        let c = self.connect().await.map_err(|e| (None, e))?;
                        let generation = self.generations.fetch_add(1, Ordering::Relaxed);
                        tracing::info!(redis = %self.at, "connected to Redis");
                        *slot = Some(Link {
                            generation,
                            connection: c.clone(),
                        });
                        (generation, c)
                    }
                }
            };
            used = Some(generation);
            call(connection).await.map_err(|e| (Some(generation), e))
        };
        match tokio::time::timeout(self.timeout, work).await {
            Ok(Ok(v)) => {
                if self.down().is_some() {
                    *self.down() = None;
                }
                Ok(v)
            }
            Ok(Err((generation, e))) => {
                if connection_failed(&e) {
                    self.unreachable(generation, e.to_string());
                }
                Err(self.failed(&e))
            }
            Err(_) => {
                let ms = self.timeout.as_millis() as u64;
                self.unreachable(used, format!("no answer within {ms} ms"));
                Err(RedisError::Timeout {
                    at: self.at.clone(),
                    ms,
                })
            }
        }
    }

    /// A new connection: to the Cluster with `redis.cluster`, else to the one Redis.
    async fn connect(&self) -> redis::RedisResult<Connection> {
        if let Some(cluster) = &self.cluster {
            return Ok(Connection::Cluster(cluster.get_async_connection().await?));
        }
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(self.timeout)
            .set_response_timeout(self.timeout)
            .set_number_of_retries(0);
        let c = ConnectionManager::new_with_config(self.client.clone(), config).await?;
        Ok(Connection::Single(c))
    }

    /// The value at `key` if it is at most `max` bytes (a larger one is not transferred).
    pub async fn get(&self, key: &str, max: u64) -> Result<Value, RedisError> {
        let mut values = self.get_many(&[(key.to_string(), max)]).await?;
        Ok(values.pop().unwrap_or(Value::Missing))
    }

    /// Sets `key` to `value` (expiring after `ttl`, when given) atomically: written under a
    /// temporary key in the same slot and renamed into place, in one transaction.
    pub async fn put(
        &self,
        key: &str,
        value: &[u8],
        ttl: Option<Duration>,
    ) -> Result<(), RedisError> {
        let temp = format!("{key}:tmp:{}", uuid::Uuid::new_v4().simple());
        self.run(|mut c| async move {
            let mut pipe = redis::pipe();
            pipe.atomic();
            match ttl {
                Some(t) => pipe
                    .cmd("SET")
                    .arg(&temp)
                    .arg(value)
                    .arg("PX")
                    .arg(t.as_millis().max(1) as u64)
                    .ignore(),
                None => pipe.cmd("SET").arg(&temp).arg(value).ignore(),
            };
            pipe.cmd("RENAME").arg(&temp).arg(key).ignore();
            pipe.query_async::<()>(&mut c).await
        })
        .await
    }

    /// Removes `key`.
    pub async fn delete(&self, key: &str) -> Result<(), RedisError> {
        self.run(|mut c| async move { redis::cmd("DEL").arg(key).query_async::<()>(&mut c).await })
            .await
    }
}
