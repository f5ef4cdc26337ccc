//! Kiln's configuration: one TOML file, every option with a default, unknown keys rejected.
//!
//! `Config::default()` is the embedded default that `kiln serve` runs with no file.
//! The reference for every option is `docs/configuration.md`.

pub mod chain;
mod defaults;
mod error;
mod types;

pub use error::ConfigError;
pub use types::{
    ActionCacheConfig, AdminConfig, ClientAuthMode, CompressionConfig, Config, ControlPlaneConfig,
    DirCacheLayout, ExecutionConfig, GetTreeConfig, PeerTransport, PlacementWeights, PropertyKind,
    RedisConfig, RunAsUser, RuntimeKind, ServerConfig, StorageConfig, TlsConfig, TlsMode,
    WorkerConfig,
};

use std::path::Path;

impl Config {
    /// Parses a configuration from TOML text; `origin` names the source in errors.
    pub fn from_toml(text: &str, origin: &str) -> Result<Config, ConfigError> {
        let config: Config = toml::from_str(text).map_err(|e| ConfigError::Parse {
            origin: origin.to_string(),
            message: e.to_string(),
        })?;
        config.validate()?;
        Ok(config)
    }

    /// Reads and parses a configuration file.
    pub fn from_file(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.display().to_string(),
            source,
        })?;
        Config::from_toml(&text, &path.display().to_string())
    }

    /// Checks relations between options that serde cannot express.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let invalid = |key: &str, why: &str| {
            Err(ConfigError::Invalid {
                key: key.to_string(),
                why: why.to_string(),
            })
        };
        let w = &self.execution.placement_weights;
        for (name, weight) in [
            ("input_root", w.input_root),
            ("input_tree", w.input_tree),
            ("input_blobs", w.input_blobs),
            ("load", w.load),
        ] {
            if !(0.0..=1e6).contains(&weight) {
                return invalid(
                    &format!("execution.placement_weights.{name}"),
                    "must be a number from 0 to 1,000,000",
                );
            }
        }
        if cfg!(not(target_os = "linux")) && self.worker.dircache_layout == DirCacheLayout::Overlay
        {
            return invalid(
                "worker.dircache_layout",
                "\"overlay\" is an overlay mount, which only Linux has: use \"links\"",
            );
        }
        let r = &self.redis;
        let urls_ok = r.url.split(',').all(|u| u.trim().starts_with("redis://"));
        if !(r.url.is_empty() || urls_ok) || (!r.cluster && r.url.contains(',')) {
            return invalid(
                "redis.url",
                "must be redis://[USER:PASSWORD@]HOST:PORT[/DB] (with cluster = true, several separated by commas; or empty: no Redis); TLS to Redis (rediss://) is not supported",
            );
        }
        if r.url.is_empty() {
            let mut shared = false;
            if let Ok(tiers) = self.storage.resolve_chain() {
                chain::visit(&tiers, &mut |t| {
                    shared |= matches!(t, chain::TierSpec::Redis { .. });
                });
            }
            if shared {
                return invalid(
                    "storage.chain",
                    "has a redis tier, but [redis] url is not set",
                );
            }
        }
        // Below the scheduler's patience with a silent worker: a result's write to Redis is
        // awaited on the worker's session.
        if r.timeout_ms == 0 || r.timeout_ms > 10_000 {
            return invalid("redis.timeout_ms", "must be from 1 to 10,000 milliseconds");
        }
        if r.pipeline_keys == 0 || r.pipeline_keys > 100_000 {
            return invalid("redis.pipeline_keys", "must be from 1 to 100,000");
        }
        // A renewal that times out (and the second of failing at once after it) must leave
        // time for another before the lease lapses: a live server's lease does not lapse
        // because one call was slow.
        let lease_ms = r.lease_secs.saturating_mul(1000);
        let take_over = !r.url.is_empty() && r.operations && r.take_over;
        if take_over && (r.lease_secs > 600 || lease_ms * 4 / 5 < 2 * r.timeout_ms + 1000) {
            return invalid(
                "redis.lease_secs",
                "must be at most 600 seconds, and four fifths of it at least twice redis.timeout_ms plus one second (2.5 s with timeout_ms = 500; 6.25 s with the default 2,000)",
            );
        }
        if r.action_cache_ttl_secs > 10 * 365 * 86_400 {
            return invalid("redis.action_cache_ttl_secs", "must be at most ten years");
        }
        if self.server.quic && self.tls.mode == TlsMode::Off {
            return invalid(
                "server.quic",
                "QUIC needs TLS: set [tls] mode = \"auto\" or \"files\"",
            );
        }
        let t = &self.get_tree;
        if t.max_tree_bytes.as_u64() == 0 || t.max_tree_bytes.as_u64() > 1 << 40 {
            return invalid(
                "get_tree.max_tree_bytes",
                "must be between 1 byte and 1 TiB",
            );
        }
        if t.cache_bytes.as_u64() > 1 << 40 {
            return invalid("get_tree.cache_bytes", "must be at most 1 TiB");
        }
        if t.subtree_cache_bytes.as_u64() > 1 << 40 {
            return invalid("get_tree.subtree_cache_bytes", "must be at most 1 TiB");
        }
        if t.cache_ttl_secs > 365 * 24 * 3600 {
            return invalid("get_tree.cache_ttl_secs", "must be at most a year");
        }
        let c = &self.compression;
        if !(-7..=9).contains(&c.level) {
            return invalid(
                "compression.level",
                "must be between -7 and 9 (higher levels stall a core for every read)",
            );
        }
        if c.frame_cache_bytes.as_u64() > 1 << 40 {
            return invalid("compression.frame_cache_bytes", "must be at most 1 TiB");
        }
        if !(10..=30).contains(&c.max_window_log) {
            return invalid("compression.max_window_log", "must be between 10 and 30");
        }
        let k = &self.chunking;
        let avg = k.avg_chunk_size_bytes.as_u64();
        if !avg.is_power_of_two() || !(1024..=1 << 20).contains(&avg) {
            return invalid(
                "chunking.avg_chunk_size_bytes",
                "must be a power of two from 1 KiB to 1 MiB (REAPI's FastCDC 2020 range)",
            );
        }
        if k.max_chunks == 0 || k.max_chunks > 1 << 24 {
            return invalid("chunking.max_chunks", "must be between 1 and 16,777,216");
        }
        if k.list_cache_bytes.as_u64() > 1 << 40 {
            return invalid("chunking.list_cache_bytes", "must be at most 1 TiB");
        }
        let checked = self.action_cache.max_check_digests;
        if checked == 0 || checked > 100_000_000 {
            return invalid(
                "action_cache.max_check_digests",
                "must be between 1 and 100,000,000",
            );
        }
        let a = &self.remote_asset;
        if a.max_fetch_secs == 0 || a.max_fetch_secs > 7 * 24 * 3600 {
            return invalid(
                "remote_asset.max_fetch_secs",
                "must be between 1 s and a week",
            );
        }
        if a.default_fetch_secs == 0 || a.default_fetch_secs > a.max_fetch_secs {
            return invalid(
                "remote_asset.default_fetch_secs",
                "must be between 1 s and remote_asset.max_fetch_secs",
            );
        }
        if a.max_redirects > 100 {
            return invalid("remote_asset.max_redirects", "must be at most 100");
        }
        if a.concurrent_fetches == 0 || a.concurrent_fetches > 1024 {
            return invalid(
                "remote_asset.concurrent_fetches",
                "must be between 1 and 1024",
            );
        }
        if a.memory_bytes.as_u64() > 1 << 40 {
            return invalid("remote_asset.memory_bytes", "must be at most 1 TiB");
        }
        let s = &self.server;
        if s.max_batch_total_size_bytes.as_u64() + 64 * 1024 > s.max_message_bytes.as_u64() {
            return invalid(
                "server.max_batch_total_size_bytes",
                "must be at least 64 KiB below server.max_message_bytes",
            );
        }
        if s.max_message_bytes.as_u64() > (u32::MAX as u64) {
            return invalid(
                "server.max_message_bytes",
                "must fit in 4 GiB (gRPC frame length)",
            );
        }
        if s.read_chunk_bytes.as_u64() == 0 || s.read_chunk_bytes.as_u64() > 16 * 1024 * 1024 {
            return invalid(
                "server.read_chunk_bytes",
                "must be between 1 byte and 16 MiB",
            );
        }
        if s.read_chunk_bytes.as_u64() + 64 > s.max_message_bytes.as_u64() {
            return invalid(
                "server.read_chunk_bytes",
                "must be below server.max_message_bytes",
            );
        }
        if s.stream_window_bytes.as_u64() < 65_535
            || s.stream_window_bytes.as_u64() > (i32::MAX as u64)
        {
            return invalid(
                "server.stream_window_bytes",
                "must be between 64 KiB and 2 GiB",
            );
        }
        if s.connection_window_bytes.as_u64() < 65_535
            || s.connection_window_bytes.as_u64() > (i32::MAX as u64)
        {
            return invalid(
                "server.connection_window_bytes",
                "must be between 64 KiB and 2 GiB",
            );
        }
        if s.shard_queue_depth == 0 {
            return invalid("server.shard_queue_depth", "must be at least 1");
        }
        if s.max_connections == 0 {
            return invalid("server.max_connections", "must be at least 1");
        }
        let st = &self.storage;
        if st.disk_bytes.as_u64() == 0 {
            return invalid("storage.disk_bytes", "must be above zero");
        }
        // `memory_bytes = 0` disables the memory tier, whatever memory_max_blob_bytes says.
        if st.memory_bytes.as_u64() > 0
            && st.memory_max_blob_bytes.as_u64() > st.memory_bytes.as_u64()
        {
            return invalid(
                "storage.memory_max_blob_bytes",
                "must not exceed storage.memory_bytes",
            );
        }
        st.resolve_chain()?;
        let tls = &self.tls;
        if tls.mode == TlsMode::Files && (tls.cert.is_none() || tls.key.is_none()) {
            return invalid("tls.cert", "files mode needs tls.cert and tls.key");
        }
        if tls.mode == TlsMode::Files
            && tls.client_auth == ClientAuthMode::Required
            && tls.client_ca.is_none()
        {
            return invalid(
                "tls.client_auth",
                "\"required\" needs tls.client_ca in files mode",
            );
        }
        if tls.handshake_timeout_secs == 0 {
            return invalid("tls.handshake_timeout_secs", "must be at least 1");
        }
        if self.worker.tls_cert.is_some() != self.worker.tls_key.is_some() {
            return invalid(
                "worker.tls_cert",
                "worker.tls_cert and worker.tls_key go together",
            );
        }
        if !RuntimeKind::available().contains(&s.runtime) {
            return invalid(
                "server.runtime",
                "this backend is not available on this platform",
            );
        }
        let e = &self.execution;
        if e.max_timeout_secs == 0 || e.default_timeout_secs == 0 {
            return invalid("execution.max_timeout_secs", "timeouts must be above zero");
        }
        if e.keepalive_secs == 0 || e.worker_timeout_secs <= e.keepalive_secs {
            return invalid(
                "execution.worker_timeout_secs",
                "must be above zero and longer than execution.keepalive_secs",
            );
        }
        if e.pin_budget_percent > 90 {
            return invalid(
                "execution.pin_budget_percent",
                "must be at most 90 (eviction needs room)",
            );
        }
        for p in &self.worker.properties {
            if !p.contains('=') || p.starts_with('=') {
                return invalid("worker.properties", &format!("{p:?} is not NAME=VALUE"));
            }
        }
        if let Some(e) = &self.worker.peer_endpoint {
            let plain = e
                .strip_prefix("grpc://")
                .filter(|rest| !rest.is_empty() && e.len() <= 256);
            if plain.is_none() {
                return invalid(
                    "worker.peer_endpoint",
                    &format!("{e:?} is not grpc://HOST:PORT (at most 256 characters)"),
                );
            }
        }
        if self.worker.peer_min_bytes_per_sec.as_u64() == 0 {
            return invalid("worker.peer_min_bytes_per_sec", "must be more than 0");
        }
        if self.worker.fetch_parallelism == 0 {
            return invalid("worker.fetch_parallelism", "must be at least 1");
        }
        if !(1..=64).contains(&self.worker.fetch_ranges) {
            return invalid("worker.fetch_ranges", "must be from 1 to 64");
        }
        if self.control_plane.threads == 0 {
            return invalid("control_plane.threads", "must be at least 1");
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests;

pub use defaults::data_dir as default_data_dir;
