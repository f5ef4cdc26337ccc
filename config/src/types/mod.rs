//! The configuration types, one file per group of sections. Every struct rejects unknown
//! keys and fills defaults.

mod access;
mod execution;
mod protocols;
mod redis;
mod server;
mod storage;
mod worker;

pub use access::*;
pub use execution::*;
pub use protocols::*;
pub use redis::*;
pub use server::*;
pub use storage::*;
pub use worker::*;

use serde::{Deserialize, Serialize};

/// The whole configuration file.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// The listener and the gRPC limits.
    pub server: ServerConfig,
    /// The content-addressable store: memory over filesystem.
    pub storage: StorageConfig,
    /// The action cache.
    pub action_cache: ActionCacheConfig,
    /// `GetTree`: its bounds and its cache of whole trees.
    pub get_tree: GetTreeConfig,
    /// Compressed blobs: zstd over ByteStream and in batches.
    pub compression: CompressionConfig,
    /// Chunked blobs: `SplitBlob` and `SpliceBlob` with FastCDC 2020.
    pub chunking: ChunkingConfig,
    /// The Remote Asset API: blobs fetched from URLs into the CAS, and pushed associations.
    pub remote_asset: RemoteAssetConfig,
    /// The control plane's tokio runtime.
    pub control_plane: ControlPlaneConfig,
    /// The admin HTTP listener: metrics, health, status page.
    pub admin: AdminConfig,
    /// Remote execution: the scheduler.
    pub execution: ExecutionConfig,
    /// A worker: `kiln worker`, or the one `kiln serve` runs in-process.
    pub worker: WorkerConfig,
    /// TLS on the main port.
    pub tls: TlsConfig,
    /// Who may call what.
    pub auth: AuthConfig,
    /// Redis, as state shared by the servers of a farm.
    pub redis: RedisConfig,
}
