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

use bytes::Bytes;
use kiln_reapi::status::{Classify, ErrorKind};
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::cluster_async::ClusterConnection;
use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// A failed call to Redis: `UNAVAILABLE` to clients, naming Redis.
#[derive(Debug, thiserror::Error)]
pub enum RedisError {
    /// Redis (or connecting to it) took longer than `redis.timeout_ms`.
    #[error("Redis at {at} did not answer within {ms} ms")]
    Timeout {
        /// Where Redis is (without credentials).
        at: String,
        /// The bound.
        ms: u64,
    },
    /// Redis answered with an error, or could not be reached.
    #[error("Redis at {at}: {message}")]
    Failed {
        /// Where Redis is (without credentials).
        at: String,
        /// What went wrong.
        message: String,
    },
    /// Redis could not be reached a moment ago: the call was not tried (see [`BACKOFF`]).
    #[error("Redis at {at} is unreachable ({why}); trying again within a second")]
    Down {
        /// Where Redis is (without credentials).
        at: String,
        /// The last failure.
        why: String,
    },
    /// The configured URL is not one.
    #[error("redis.url: {0}")]
    Url(String),
}

impl RedisError {
    /// Whether the call was not even tried (Redis failed a moment ago): worth no more than a
    /// debug line, the failure itself having been reported.
    pub fn is_known_down(&self) -> bool {
        matches!(self, RedisError::Down { .. })
    }

    /// Logs a failure `what` about `subject` (an action, a blob, an operation): a warning, or
    /// a debug line when the call was not even tried ([`RedisError::is_known_down`]).
    pub fn log(&self, subject: &dyn std::fmt::Debug, what: &str) {
        if self.is_known_down() {
            tracing::debug!(subject = ?subject, error = %self, "{what}");
        } else {
            tracing::warn!(subject = ?subject, error = %self, "{what}");
        }
    }
}

impl Classify for RedisError {
    fn kind(&self) -> ErrorKind {
        match self {
            RedisError::Url(_) => ErrorKind::Internal,
            _ => ErrorKind::Unavailable,
        }
    }

    fn client_message(&self) -> String {
        self.to_string()
    }
}

/// After Redis could not be reached, calls fail at once for this long (then one goes through
/// to try again), so that an outage costs callers nothing but the first timeout.
const BACKOFF: Duration = Duration::from_secs(1);

/// A connection to one Redis or to a Redis Cluster.
#[derive(Clone)]
enum Connection {
    Single(ConnectionManager),
    Cluster(ClusterConnection),
}

impl redis::aio::ConnectionLike for Connection {
    fn req_packed_command<'a>(
        &'a mut self,
        cmd: &'a redis::Cmd,
    ) -> redis::RedisFuture<'a, redis::Value> {
        match self {
            Connection::Single(c) => c.req_packed_command(cmd),
            Connection::Cluster(c) => c.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a redis::Pipeline,
        offset: usize,
        count: usize,
    ) -> redis::RedisFuture<'a, Vec<redis::Value>> {
        match self {
            Connection::Single(c) => c.req_packed_commands(pipeline, offset, count),
            Connection::Cluster(c) => c.req_packed_commands(pipeline, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Connection::Single(c) => c.get_db(),
            Connection::Cluster(c) => c.get_db(),
        }
    }
}

/// The connection, and which one it is (a failed call drops only the connection it used).
struct Link {
    generation: u64,
    connection: Connection,
}

/// The key of a digest's value under `kind` (`ac`, `cas`): instance, digest function, the
/// hash with its first two hex digits as the hash tag, size. An instance name (or key
/// prefix) holding braces of its own would move the tag: every key of that instance in one
/// slot (still correct, not spread).
fn digest_key(kind: &str, instance: &str, function: &str, hex: &str, size: u64) -> String {
    let (tag, rest) = hex.split_at(hex.len().min(2));
    format!("{kind}:{instance}:{function}:{{{tag}}}{rest}:{size}")
}

/// Hash tags whose pipelines a Cluster call sends at once.
const SLOTS_AT_ONCE: usize = 8;

/// The hash tag of `key` (what Redis Cluster hashes to pick its slot): the text between the
/// first `{` and the next `}`, when not empty; else the whole key.
fn slot_tag(key: &str) -> &str {
    if let Some(open) = key.find('{') {
        if let Some(len) = key[open + 1..].find('}') {
            if len > 0 {
                return &key[open + 1..open + 1 + len];
            }
        }
    }
    key
}

/// Positions of `keys` grouped by hash tag (one group of all when `cluster` is off), in order.
fn slot_groups<K>(keys: &[K], cluster: bool, key: impl Fn(&K) -> &str) -> Vec<Vec<usize>> {
    if !cluster {
        return vec![(0..keys.len()).collect()];
    }
    let mut groups: std::collections::BTreeMap<&str, Vec<usize>> = Default::default();
    for (i, k) in keys.iter().enumerate() {
        groups.entry(slot_tag(key(k))).or_default().push(i);
    }
    groups.into_values().collect()
}

/// Bytes of values one pipeline of [`Redis::get_many`] may bring (by their bounds), so that
/// one call's answer is not too large to arrive within the timeout.
const PIPELINE_BYTES: u64 = 8 << 20;

/// `keys` in runs of at most `count` whose bounds add up to at most [`PIPELINE_BYTES`] (a
/// larger one alone).
fn byte_bounded(keys: &[(String, u64)], count: usize) -> Vec<&[(String, u64)]> {
    let mut runs = Vec::new();
    let (mut start, mut bytes) = (0, 0u64);
    for (i, (_, max)) in keys.iter().enumerate() {
        if i > start && (i - start >= count || bytes.saturating_add(*max) > PIPELINE_BYTES) {
            runs.push(&keys[start..i]);
            (start, bytes) = (i, 0);
        }
        bytes = bytes.saturating_add(*max);
    }
    if start < keys.len() {
        runs.push(&keys[start..]);
    }
    runs
}

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

/// Whether `e` says the connection (not the command) failed.
fn connection_failed(e: &redis::RedisError) -> bool {
    e.is_io_error()
        || e.is_connection_dropped()
        || e.is_connection_refusal()
        || e.is_timeout()
        || e.is_unrecoverable_error()
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

    /// Sets `key` to `value`, expiring after `ttl`, if `when` allows it: whether it was set.
    /// Leases and claims are made of this (`SET … PX … NX|XX`).
    pub async fn set(
        &self,
        key: &str,
        value: &[u8],
        ttl: Duration,
        when: When,
    ) -> Result<bool, RedisError> {
        self.run(|mut c| async move {
            let mut cmd = redis::cmd("SET");
            cmd.arg(key)
                .arg(value)
                .arg("PX")
                .arg(ttl.as_millis().max(1) as u64);
            match when {
                When::Always => {}
                When::Missing => {
                    cmd.arg("NX");
                }
                When::Present => {
                    cmd.arg("XX");
                }
            }
            let answer: redis::Value = cmd.query_async(&mut c).await?;
            Ok(!matches!(answer, redis::Value::Nil))
        })
        .await
    }

    /// Adds `member` to the set at `key`.
    pub async fn set_add(&self, key: &str, member: &str) -> Result<(), RedisError> {
        self.run(|mut c| async move {
            redis::cmd("SADD")
                .arg(key)
                .arg(member)
                .query_async::<()>(&mut c)
                .await
        })
        .await
    }

    /// Removes `member` from the set at `key`: whether it was there (of two callers, one
    /// finds it: a claim).
    pub async fn set_remove(&self, key: &str, member: &str) -> Result<bool, RedisError> {
        self.run(|mut c| async move {
            let removed: u64 = redis::cmd("SREM")
                .arg(key)
                .arg(member)
                .query_async(&mut c)
                .await?;
            Ok(removed > 0)
        })
        .await
    }

    /// Sets `key` to `value` (expiring after `ttl`) if it is not there, or renews its expiry
    /// if it holds `value` already: whether it holds `value` now.
    pub async fn hold(&self, key: &str, value: &str, ttl: Duration) -> Result<bool, RedisError> {
        const HOLD: &str = "local v = redis.call('GET', KEYS[1]) \
             if not v then redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2]) return 1 end \
             if v == ARGV[1] then redis.call('PEXPIRE', KEYS[1], ARGV[2]) return 1 end \
             return 0";
        self.run(|mut c| async move {
            let held: i64 = redis::cmd("EVAL")
                .arg(HOLD)
                .arg(1)
                .arg(key)
                .arg(value)
                .arg(ttl.as_millis().max(1) as u64)
                .query_async(&mut c)
                .await?;
            Ok(held == 1)
        })
        .await
    }

    /// Removes `key` if it holds `value` (and not what another wrote since).
    pub async fn release(&self, key: &str, value: &str) -> Result<(), RedisError> {
        const RELEASE: &str =
            "if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end \
             return 0";
        self.run(|mut c| async move {
            redis::cmd("EVAL")
                .arg(RELEASE)
                .arg(1)
                .arg(key)
                .arg(value)
                .query_async::<()>(&mut c)
                .await
        })
        .await
    }

    /// Adds `member` to the sorted set at `key` with `score` (or moves it there).
    pub async fn sorted_add(&self, key: &str, member: &str, score: u64) -> Result<(), RedisError> {
        self.run(|mut c| async move {
            redis::cmd("ZADD")
                .arg(key)
                .arg(score)
                .arg(member)
                .query_async::<()>(&mut c)
                .await
        })
        .await
    }

    /// Removes `member` from the sorted set at `key`.
    pub async fn sorted_remove(&self, key: &str, member: &str) -> Result<(), RedisError> {
        self.run(|mut c| async move {
            redis::cmd("ZREM")
                .arg(key)
                .arg(member)
                .query_async::<()>(&mut c)
                .await
        })
        .await
    }

    /// Removes the members of the sorted set at `key` scored below `score`.
    pub async fn sorted_remove_below(&self, key: &str, score: u64) -> Result<(), RedisError> {
        self.run(|mut c| async move {
            redis::cmd("ZREMRANGEBYSCORE")
                .arg(key)
                .arg("-inf")
                .arg(format!("({score}"))
                .query_async::<()>(&mut c)
                .await
        })
        .await
    }

    /// At most `limit` members of the sorted set at `key` scored `score` or more.
    pub async fn sorted_from(
        &self,
        key: &str,
        score: u64,
        limit: usize,
    ) -> Result<Vec<String>, RedisError> {
        self.run(|mut c| async move {
            redis::cmd("ZRANGEBYSCORE")
                .arg(key)
                .arg(score)
                .arg("+inf")
                .arg("LIMIT")
                .arg(0)
                .arg(limit)
                .query_async(&mut c)
                .await
        })
        .await
    }

    /// Makes `key` expire after `ttl` (from now).
    pub async fn expire(&self, key: &str, ttl: Duration) -> Result<(), RedisError> {
        self.run(|mut c| async move {
            redis::cmd("PEXPIRE")
                .arg(key)
                .arg(ttl.as_millis().max(1) as u64)
                .query_async::<()>(&mut c)
                .await
        })
        .await
    }

    /// The members of the set at `key` (none when there is no such key).
    pub async fn set_members(&self, key: &str) -> Result<Vec<String>, RedisError> {
        self.run(|mut c| async move { redis::cmd("SMEMBERS").arg(key).query_async(&mut c).await })
            .await
    }

    /// Removes `key`.
    pub async fn delete(&self, key: &str) -> Result<(), RedisError> {
        self.run(|mut c| async move { redis::cmd("DEL").arg(key).query_async::<()>(&mut c).await })
            .await
    }

    /// Whether each of `keys` exists, in order, marking each used for Redis's LRU (`TOUCH`:
    /// `EXISTS` does not): one round trip per `redis.pipeline_keys`.
    pub async fn exists_many(&self, keys: &[String]) -> Result<Vec<bool>, RedisError> {
        self.each("TOUCH", keys).await
    }

    /// The values at `keys`, each if it is at most its bound (a larger one is not
    /// transferred: its length is asked first, in the same pipeline), in order: one round trip
    /// per `redis.pipeline_keys` (per hash tag with `redis.cluster`).
    pub async fn get_many(&self, keys: &[(String, u64)]) -> Result<Vec<Value>, RedisError> {
        self.per_slot(
            keys,
            |k| k.0.as_str(),
            |group| async move {
                let mut out = Vec::with_capacity(group.len());
                for chunk in byte_bounded(&group, self.chunk) {
                    let answers: Vec<(bool, u64, Vec<u8>)> = self
                        .run(|mut c| async move {
                            let mut pipe = redis::pipe();
                            for (k, max) in chunk {
                                // GETRANGE's end is inclusive; 1..0 is empty.
                                let (from, to) = match max {
                                    0 => (1, 0),
                                    m => (0, m.saturating_sub(1).min(i64::MAX as u64) as i64),
                                };
                                pipe.cmd("EXISTS").arg(k);
                                pipe.cmd("STRLEN").arg(k);
                                pipe.cmd("GETRANGE").arg(k).arg(from).arg(to);
                            }
                            let flat: Vec<redis::Value> = pipe.query_async(&mut c).await?;
                            flat.chunks(3)
                                .map(|t| match t {
                                    [e, l, v] => Ok((
                                        redis::from_redis_value(e)?,
                                        redis::from_redis_value(l)?,
                                        redis::from_redis_value(v)?,
                                    )),
                                    _ => Err(redis::RedisError::from((
                                        redis::ErrorKind::TypeError,
                                        "a short pipeline answer",
                                    ))),
                                })
                                .collect()
                        })
                        .await?;
                    out.extend(
                        chunk
                            .iter()
                            .zip(answers)
                            .map(|((_, max), (exists, len, data))| match (exists, len) {
                                (false, _) => Value::Missing,
                                (true, len) if len > *max => Value::TooLarge(len),
                                (true, _) => Value::Found(Bytes::from(data)),
                            }),
                    );
                }
                Ok(out)
            },
        )
        .await
    }

    /// `command KEY` for each of `keys`, pipelined in chunks (per hash tag with
    /// `redis.cluster`); the answers in order.
    async fn each<T: redis::FromRedisValue + Send>(
        &self,
        command: &str,
        keys: &[String],
    ) -> Result<Vec<T>, RedisError> {
        self.per_slot(
            keys,
            |k| k.as_str(),
            |group| async move {
                let mut out = Vec::with_capacity(group.len());
                for chunk in group.chunks(self.chunk) {
                    let answers: Vec<T> = self
                        .run(|mut c| async move {
                            let mut pipe = redis::pipe();
                            for k in chunk {
                                pipe.cmd(command).arg(k);
                            }
                            pipe.query_async(&mut c).await
                        })
                        .await?;
                    out.extend(answers);
                }
                Ok(out)
            },
        )
        .await
    }

    /// Runs `work` on the keys of each hash tag (all keys at once when not a Cluster), every
    /// group at the same time; the answers in the order of `keys`.
    async fn per_slot<'a, K: Clone, T, Fut>(
        &'a self,
        keys: &'a [K],
        name: impl Fn(&K) -> &str,
        work: impl Fn(Vec<K>) -> Fut,
    ) -> Result<Vec<T>, RedisError>
    where
        Fut: Future<Output = Result<Vec<T>, RedisError>>,
    {
        use futures::{StreamExt, TryStreamExt};
        let groups = slot_groups(keys, self.cluster.is_some(), name);
        // A few slots' pipelines at a time, each within its own bound.
        let group_keys: Vec<Vec<K>> = groups
            .iter()
            .map(|g| g.iter().map(|&i| keys[i].clone()).collect())
            .collect();
        let answers: Vec<Vec<T>> = futures::stream::iter(group_keys)
            .map(&work)
            .buffered(SLOTS_AT_ONCE)
            .try_collect()
            .await?;
        let mut out: Vec<Option<T>> = (0..keys.len()).map(|_| None).collect();
        for (group, answer) in groups.iter().zip(answers) {
            for (&i, v) in group.iter().zip(answer) {
                out[i] = Some(v);
            }
        }
        out.into_iter()
            .collect::<Option<Vec<T>>>()
            .ok_or_else(|| RedisError::Failed {
                at: self.at.clone(),
                message: "a short answer to a pipeline".into(),
            })
    }
}

#[cfg(test)]
mod tests {
    use super::{byte_bounded, digest_key, slot_groups, slot_tag, PIPELINE_BYTES};

    #[test]
    fn keys_tag_two_hex_digits_and_cluster_pipelines_group_by_tag() {
        let key = digest_key("cas", "main", "sha256", "abcdef", 3);
        assert_eq!(key, "cas:main:sha256:{ab}cdef:3");
        assert_eq!(slot_tag(&key), "ab");
        assert_eq!(
            slot_tag(&format!("{key}:tmp:123")),
            "ab",
            "a temporary key, same slot"
        );
        assert_eq!(slot_tag("no tag"), "no tag");
        assert_eq!(slot_tag("empty {} tag"), "empty {} tag");
        let keys = ["x{ab}1", "y{cd}2", "z{ab}3"];
        assert_eq!(slot_groups(&keys, true, |k| k), vec![vec![0, 2], vec![1]]);
        assert_eq!(slot_groups(&keys, false, |k| k), vec![vec![0, 1, 2]]);
    }

    #[test]
    fn pipelines_are_bounded_by_count_and_by_bytes() {
        let keys: Vec<(String, u64)> = (0..10).map(|i| (format!("k{i}"), 1)).collect();
        let runs: Vec<usize> = byte_bounded(&keys, 4).iter().map(|r| r.len()).collect();
        assert_eq!(runs, vec![4, 4, 2]);
        let big: Vec<(String, u64)> = (0..5)
            .map(|i| (format!("k{i}"), PIPELINE_BYTES / 2))
            .collect();
        let runs: Vec<usize> = byte_bounded(&big, 100).iter().map(|r| r.len()).collect();
        assert_eq!(runs, vec![2, 2, 1]);
        let huge = vec![("a".to_string(), PIPELINE_BYTES * 3), ("b".to_string(), 1)];
        let runs: Vec<usize> = byte_bounded(&huge, 100).iter().map(|r| r.len()).collect();
        assert_eq!(runs, vec![1, 1], "a value over the bound goes alone");
        assert!(byte_bounded(&[], 4).is_empty());
    }
}
