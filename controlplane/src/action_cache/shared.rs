//! Action results kept in Redis too (`[redis] action_cache`): the tier behind each server's
//! own store that every server naming the same Redis reads, so a result one server stored is a
//! hit on all of them. Written through on every put; read when the server's own store misses,
//! and then kept in that store. A result read from Redis that does not decode is removed from
//! it and served as a miss.

use crate::error::ControlError;
use bytes::Bytes;
use kiln_reapi::digest::BlobKey;
use kiln_redis::Redis;
use std::sync::Arc;
use std::time::Duration;

/// The action cache's tier in Redis.
pub struct SharedResults {
    redis: Arc<Redis>,
    ttl: Option<Duration>,
}

impl SharedResults {
    /// Results in `redis`, expiring `ttl` after they were written (`None`: never).
    pub fn new(redis: Arc<Redis>, ttl: Option<Duration>) -> SharedResults {
        SharedResults { redis, ttl }
    }

    /// The key of `key`'s result: the instance, the digest function, the hash in a hash tag
    /// (one Cluster slot for the result and its temporary key), the size.
    fn key(&self, key: &BlobKey) -> String {
        self.redis.key(&format!(
            "ac:{}:{}:{{{}}}:{}",
            key.instance.as_str(),
            key.digest.function.name(),
            key.digest.hex(),
            key.digest.size
        ))
    }

    /// The stored result of `key`, if Redis has one.
    pub async fn get(&self, key: &BlobKey) -> Result<Option<Bytes>, ControlError> {
        Ok(self.redis.get(&self.key(key)).await?)
    }

    /// Stores `data` as `key`'s result.
    pub async fn put(&self, key: &BlobKey, data: &[u8]) -> Result<(), ControlError> {
        Ok(self.redis.put(&self.key(key), data, self.ttl).await?)
    }

    /// Removes `key`'s result (it did not decode).
    pub async fn remove(&self, key: &BlobKey) {
        if let Err(e) = self.redis.delete(&self.key(key)).await {
            tracing::warn!(action = ?key.digest, error = %e, "cannot remove a bad action result from Redis");
        }
    }
}
