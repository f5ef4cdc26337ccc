//! The REAPI surfaces beyond the plain CAS: `[get_tree]`, `[compression]`, `[chunking]`,
//! `[remote_asset]`.

use bytesize::ByteSize;
use serde::{Deserialize, Serialize};

/// `GetTree`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct GetTreeConfig {
    /// Largest tree served: the bytes of its `Directory` messages (one walk holds them all).
    pub max_tree_bytes: ByteSize,
    /// Whole trees kept for repeated calls, by the bytes of their messages (0: none).
    pub cache_bytes: ByteSize,
    /// How long a cached tree (and a kept directory) is served before it is read again.
    pub cache_ttl_secs: u64,
    /// `Directory` messages kept by digest, so that trees sharing subtrees read only what is
    /// new (0: none).
    pub subtree_cache_bytes: ByteSize,
}

impl Default for GetTreeConfig {
    fn default() -> Self {
        GetTreeConfig {
            max_tree_bytes: ByteSize::mib(64),
            cache_bytes: ByteSize::mib(64),
            cache_ttl_secs: 60,
            subtree_cache_bytes: ByteSize::mib(64),
        }
    }
}

/// Compressed blobs (`compressed-blobs/zstd/…` resource names, batch entries with a
/// compressor). Blobs are stored uncompressed; this is how they travel.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct CompressionConfig {
    /// Speak zstd: advertise it, accept compressed uploads and serve compressed reads.
    pub zstd: bool,
    /// The zstd level Kiln compresses reads and batch answers at (negative: faster, larger).
    pub level: i32,
    /// Largest window a client's zstd frame may ask for, as a power of two: the memory one
    /// decompressing upload may take.
    pub max_window_log: u32,
    /// Memory for zstd frames of blobs read compressed, sent again without compressing (0:
    /// none kept).
    pub frame_cache_bytes: ByteSize,
}

impl Default for CompressionConfig {
    fn default() -> Self {
        CompressionConfig {
            zstd: true,
            level: 1,
            max_window_log: 23,
            frame_cache_bytes: ByteSize::mib(128),
        }
    }
}

/// `SplitBlob` and `SpliceBlob`, with FastCDC 2020 as REAPI defines it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct ChunkingConfig {
    /// Serve and advertise `SplitBlob` and `SpliceBlob` (and FastCDC 2020's parameters).
    pub enabled: bool,
    /// FastCDC's average chunk size: a power of two from 1 KiB to 1 MiB (chunks are a
    /// quarter of it to four times it).
    pub avg_chunk_size_bytes: ByteSize,
    /// FastCDC's seed; every client of a cache should use the same.
    pub seed: u32,
    /// Most chunks in one `SpliceBlob` list or `SplitBlob` answer.
    pub max_chunks: usize,
    /// Memory for remembered chunk lists (a second `SplitBlob` of a blob is a lookup).
    pub list_cache_bytes: ByteSize,
}

impl Default for ChunkingConfig {
    fn default() -> Self {
        ChunkingConfig {
            enabled: true,
            avg_chunk_size_bytes: ByteSize::kib(512),
            seed: 0,
            max_chunks: 65_536,
            list_cache_bytes: ByteSize::mib(16),
        }
    }
}

/// The Remote Asset API (`build.bazel.remote.asset.v1`: `Fetch` and `Push`).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct RemoteAssetConfig {
    /// Serve `Fetch` and `Push`.
    pub enabled: bool,
    /// Fetch from origin (`http://` and `https://` URLs); off, only pushed content is served.
    pub fetch_from_origin: bool,
    /// Longest one fetch from origin may take, whatever timeout the request asks for.
    pub max_fetch_secs: u64,
    /// Timeout of a fetch whose request sets none.
    pub default_fetch_secs: u64,
    /// Largest download accepted.
    pub max_fetch_bytes: ByteSize,
    /// Redirects followed per URL.
    pub max_redirects: u32,
    /// Downloads from origin running at once (more wait).
    pub concurrent_fetches: usize,
    /// Memory for remembered associations (URI and qualifiers to digest), fetched or pushed.
    pub memory_bytes: ByteSize,
    /// Fetch from loopback addresses (127.0.0.0/8, ::1): the server's own ports.
    pub fetch_loopback: bool,
    /// Fetch from private networks (10/8, 172.16/12, 192.168/16, fc00::/7): mirrors on the LAN.
    pub fetch_private_networks: bool,
    /// An HTTP proxy every fetch goes through (`http://HOST:PORT` or `https://HOST:PORT`);
    /// empty: none. The proxy environment (`HTTPS_PROXY` and the like) is not used.
    pub proxy: String,
}

impl Default for RemoteAssetConfig {
    fn default() -> Self {
        RemoteAssetConfig {
            enabled: true,
            fetch_from_origin: true,
            max_fetch_secs: 3600,
            default_fetch_secs: 300,
            max_fetch_bytes: ByteSize::gib(4),
            max_redirects: 8,
            concurrent_fetches: 8,
            memory_bytes: ByteSize::mib(32),
            fetch_loopback: false,
            fetch_private_networks: true,
            proxy: String::new(),
        }
    }
}
