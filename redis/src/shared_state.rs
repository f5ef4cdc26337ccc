//! The calls the farm's shared state is made of: conditional sets (leases and claims),
//! compare-and-set holds, sets, sorted sets and expiries, each one round trip.

use crate::{Redis, RedisError, When};
use std::time::Duration;

impl Redis {
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
    pub async fn release(&self, key: &str, value: &[u8]) -> Result<(), RedisError> {
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
}
