//! Action results kept in Redis too (`[redis] action_cache`): the tier behind each server's
//! own store that every server naming the same Redis reads, so a result one server stored is a
//! hit on all of them. Written through on every put; read when the server's own store misses,
//! and then kept in that store. A value larger than the server's own limit is not even
//! transferred; one that does not decode, references malformed data or is too large to check
//! is removed from Redis (unless another result replaced it meanwhile) and served as a miss.

use crate::error::ControlError;
use bytes::Bytes;
use kiln_reapi::digest::BlobKey;
use kiln_redis::{Redis, Value};
use std::sync::Arc;
use std::time::Duration;

/// The action cache's tier in Redis.
pub struct SharedResults {
    redis: Arc<Redis>,
    ttl: Option<Duration>,
    /// The largest result read (the server's own `action_cache.max_entry_bytes`).
    max_entry: u64,
}

impl SharedResults {
    /// Results in `redis`, expiring `ttl` after they were written (`None`: never), read up to
    /// `max_entry` bytes each.
    pub fn new(redis: Arc<Redis>, ttl: Option<Duration>, max_entry: u64) -> SharedResults {
        SharedResults {
            redis,
            ttl,
            max_entry,
        }
    }

    /// The key of `key`'s result: the instance, the digest function, the hash, the size.
    fn key(&self, key: &BlobKey) -> String {
        self.redis.digest_key("ac", key)
    }

    /// The stored result of `key`, if Redis has one this server can take. Redis failing is a
    /// miss too (logged): the server's own results are still served, and clients are not made
    /// to retry every lookup while Redis is gone.
    pub async fn get(&self, key: &BlobKey) -> Option<Bytes> {
        match self.redis.get(&self.key(key), self.max_entry).await {
            Ok(Value::Found(data)) => Some(data),
            Ok(Value::Missing) => None,
            Ok(Value::TooLarge(len)) => {
                tracing::warn!(action = ?key.digest, len, limit = self.max_entry, "action result in Redis is over this server's limit; a miss here");
                None
            }
            Err(e) => {
                e.log(&key.digest, "action cache lookup in Redis failed; a miss");
                None
            }
        }
    }

    /// Stores `data` as `key`'s result.
    pub async fn put(&self, key: &BlobKey, data: &[u8]) -> Result<(), ControlError> {
        Ok(self.redis.put(&self.key(key), data, self.ttl).await?)
    }

    /// Removes `key`'s result if it is still `data` (one that was found unusable), not a
    /// different result another server stored since.
    pub async fn remove(&self, key: &BlobKey, data: &[u8]) {
        if let Err(e) = self.redis.release(&self.key(key), data).await {
            tracing::warn!(action = ?key.digest, error = %e, "cannot remove a bad action result from Redis");
        }
    }
}
