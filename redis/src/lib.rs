//! Kiln's client of Redis (`[redis]`): one connection, made at first use and remade by itself
//! after Redis went away; every call bounded by `redis.timeout_ms` (connecting included) and
//! failing with `UNAVAILABLE` and a message naming Redis, never hanging; calls about many
//! keys pipelined in chunks of `redis.pipeline_keys`, so N keys cost one round trip per chunk;
//! values written under a temporary key and renamed into place in one transaction, so a
//! reader never sees half a value.
//!
//! Keys start with `redis.key_prefix`. Every key Kiln builds puts its digest in a hash tag
//! (`{…}`), so a value's temporary key lives in the same Redis Cluster slot as the value.

use bytes::Bytes;
use kiln_reapi::status::{Classify, ErrorKind};
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

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
    /// The configured URL is not one.
    #[error("redis.url: {0}")]
    Url(String),
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

/// Redis, as `[redis]` describes it.
pub struct Redis {
    client: redis::Client,
    /// The URL without its credentials, for messages.
    at: String,
    /// Made at first use (Redis may be down when the server starts); it reconnects by itself
    /// afterwards.
    connection: tokio::sync::Mutex<Option<ConnectionManager>>,
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
        let client =
            redis::Client::open(config.url.as_str()).map_err(|e| RedisError::Url(e.to_string()))?;
        let info = client.get_connection_info();
        let at = format!("{}", info.addr);
        Ok(Some(Arc::new(Redis {
            client,
            at,
            connection: tokio::sync::Mutex::new(None),
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

    fn failed(&self, e: redis::RedisError) -> RedisError {
        RedisError::Failed {
            at: self.at.clone(),
            message: e.to_string(),
        }
    }

    /// Runs `call` on the connection (made first when there is none), all within the
    /// timeout.
    async fn run<T, F, Fut>(&self, call: F) -> Result<T, RedisError>
    where
        F: FnOnce(ConnectionManager) -> Fut,
        Fut: Future<Output = redis::RedisResult<T>>,
    {
        let work = async {
            let connection = {
                let mut slot = self.connection.lock().await;
                match &*slot {
                    Some(c) => c.clone(),
                    None => {
                        let config = ConnectionManagerConfig::new()
                            .set_connection_timeout(self.timeout)
                            .set_response_timeout(self.timeout)
                            .set_number_of_retries(1);
                        let c = ConnectionManager::new_with_config(self.client.clone(), config)
                            .await
                            .map_err(|e| self.failed(e))?;
                        tracing::info!(redis = %self.at, "connected to Redis");
                        *slot = Some(c.clone());
                        c
                    }
                }
            };
            call(connection).await.map_err(|e| self.failed(e))
        };
        let outcome = match tokio::time::timeout(self.timeout, work).await {
            Ok(r) => r,
            Err(_) => Err(RedisError::Timeout {
                at: self.at.clone(),
                ms: self.timeout.as_millis() as u64,
            }),
        };
        if outcome.is_err() {
            // The next call connects afresh (within its own timeout) rather than wait on a
            // connection that may be backing off from a Redis that has come back since.
            *self.connection.lock().await = None;
        }
        outcome
    }

    /// The value at `key`, if any.
    pub async fn get(&self, key: &str) -> Result<Option<Bytes>, RedisError> {
        let value: Option<Vec<u8>> = self
            .run(|mut c| async move { redis::cmd("GET").arg(key).query_async(&mut c).await })
            .await?;
        Ok(value.map(Bytes::from))
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

    /// Whether each of `keys` exists, in order: one round trip per `redis.pipeline_keys`.
    pub async fn exists_many(&self, keys: &[String]) -> Result<Vec<bool>, RedisError> {
        self.each("EXISTS", keys).await
    }

    /// The values of `keys`, in order: one round trip per `redis.pipeline_keys`.
    pub async fn get_many(&self, keys: &[String]) -> Result<Vec<Option<Bytes>>, RedisError> {
        let values: Vec<Option<Vec<u8>>> = self.each("GET", keys).await?;
        Ok(values.into_iter().map(|v| v.map(Bytes::from)).collect())
    }

    /// `command KEY` for each of `keys`, pipelined in chunks; the answers in order.
    async fn each<T: redis::FromRedisValue>(
        &self,
        command: &str,
        keys: &[String],
    ) -> Result<Vec<T>, RedisError> {
        let mut out = Vec::with_capacity(keys.len());
        for chunk in keys.chunks(self.chunk) {
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
    }
}
