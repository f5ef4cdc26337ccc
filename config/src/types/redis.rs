//! `[redis]`: Redis (or a Redis Cluster) as the farm's shared state: the action cache, and
//! small blobs through a `redis` tier.

use serde::{Deserialize, Serialize};

/// Redis.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct RedisConfig {
    /// `redis://[user:password@]HOST:PORT[/DB]`; empty: no Redis.
    pub url: String,
    /// `url` names nodes of a Redis Cluster, separated by commas (the others are found from
    /// them).
    pub cluster: bool,
    /// A call to Redis not answered within this long fails with `UNAVAILABLE` (milliseconds);
    /// so does connecting.
    pub timeout_ms: u64,
    /// Keys per pipelined round trip in calls about many keys.
    pub pipeline_keys: usize,
    /// Put before every key Kiln writes, so that several farms can share one Redis.
    pub key_prefix: String,
    /// Keep action results in Redis too, behind the server's own action cache: a result one
    /// server stores, every server sharing the Redis serves.
    pub action_cache: bool,
    /// Action results in Redis expire this long after they were last written (seconds; 0:
    /// never, and Redis's own `maxmemory-policy` decides what goes).
    pub action_cache_ttl_secs: u64,
    /// Share operations through Redis: every server answers `GetOperation` and
    /// `WaitExecution` for an operation another server accepted.
    pub operations: bool,
    /// With `operations`: when a server sharing this Redis dies, another takes over its
    /// queued and running operations (under the same names), so its clients' builds go on.
    pub take_over: bool,
    /// A server that has not renewed its lease in Redis for this long is taken for dead and
    /// its operations are taken over (seconds; renewed every fifth of it).
    pub lease_secs: u64,
}

impl Default for RedisConfig {
    fn default() -> Self {
        RedisConfig {
            url: String::new(),
            cluster: false,
            timeout_ms: 2000,
            pipeline_keys: 5000,
            key_prefix: "kiln:".into(),
            action_cache: true,
            action_cache_ttl_secs: 0,
            operations: true,
            take_over: true,
            lease_secs: 10,
        }
    }
}
