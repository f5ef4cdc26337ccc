//! The configuration types. Every struct rejects unknown keys and fills defaults.

use crate::defaults as d;
use bytesize::ByteSize;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;

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
}

/// Roles for client certificates by name.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Default)]
#[serde(deny_unknown_fields, default)]
pub struct CertificateRoles {
    /// The certificate's common name, or a prefix ending in `*`.
    pub name: String,
    /// Roles: cache-read, cache-write, ac-write, execute, worker, admin.
    pub roles: Vec<String>,
    /// Instances they apply to; empty for all.
    pub instances: Vec<String>,
}

/// Identities and permissions.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Default)]
#[serde(deny_unknown_fields, default)]
pub struct AuthConfig {
    /// Check every call's caller (off: everyone may do everything).
    pub enabled: bool,
    /// Bearer tokens, stored hashed (default `auth/tokens.toml` under the data directory).
    pub tokens_file: Option<PathBuf>,
    /// Roles of callers that present no credentials (none: they are refused).
    pub anonymous_roles: Vec<String>,
    /// Roles of client certificates, first match wins.
    pub certificates: Vec<CertificateRoles>,
}

/// Where the server's certificate comes from.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "kebab-case")]
pub enum TlsMode {
    /// Plain HTTP/2 (the embedded default, on loopback).
    #[default]
    Off,
    /// `cert` and `key` from the operator's own PKI.
    Files,
    /// Kiln's own farm CA, made under `{data_dir}/tls/` on first start.
    Auto,
}

/// Whether clients must present a certificate.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "kebab-case")]
pub enum ClientAuthMode {
    /// Never asked for.
    None,
    /// Verified when presented (against `client_ca`, or the farm CA in auto mode).
    #[default]
    Optional,
    /// Every connection must present one.
    Required,
}

/// TLS on the main port: the handshake runs on the data-plane shard that accepted the
/// connection (rustls, ALPN `h2`).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct TlsConfig {
    /// `off`, `files` or `auto`.
    pub mode: TlsMode,
    /// The certificate chain, PEM (files mode).
    pub cert: Option<PathBuf>,
    /// Its private key, PEM (files mode).
    pub key: Option<PathBuf>,
    /// CA certificates that sign client certificates, PEM (files mode; auto mode uses the farm
    /// CA).
    pub client_ca: Option<PathBuf>,
    /// `none`, `optional` or `required`.
    pub client_auth: ClientAuthMode,
    /// Extra names (DNS names or IP addresses) for the auto-mode server certificate.
    pub names: Vec<String>,
    /// A connection that has not finished its TLS handshake after this long is closed (seconds).
    pub handshake_timeout_secs: u64,
    /// How often the certificate files are checked for changes (seconds; 0: on SIGHUP only).
    pub reload_check_secs: u64,
}

impl Default for TlsConfig {
    fn default() -> Self {
        TlsConfig {
            mode: TlsMode::Off,
            cert: None,
            key: None,
            client_ca: None,
            client_auth: ClientAuthMode::Optional,
            names: Vec::new(),
            handshake_timeout_secs: 10,
            reload_check_secs: 10,
        }
    }
}

/// Which executor runs the data plane's shards.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub enum RuntimeKind {
    /// glommio on io_uring (Linux only; the Linux default).
    Glommio,
    /// monoio with its io_uring driver (Linux).
    MonoioUring,
    /// monoio with its readiness driver: epoll on Linux, kqueue on macOS (the macOS default).
    MonoioLegacy,
}

impl Default for RuntimeKind {
    fn default() -> Self {
        if cfg!(target_os = "linux") {
            RuntimeKind::Glommio
        } else {
            RuntimeKind::MonoioLegacy
        }
    }
}

impl RuntimeKind {
    /// Every backend this platform can run.
    pub fn available() -> &'static [RuntimeKind] {
        if cfg!(target_os = "linux") {
            &[
                RuntimeKind::Glommio,
                RuntimeKind::MonoioUring,
                RuntimeKind::MonoioLegacy,
            ]
        } else {
            &[RuntimeKind::MonoioLegacy]
        }
    }

    /// The name used in configuration and logs.
    pub fn name(self) -> &'static str {
        match self {
            RuntimeKind::Glommio => "glommio",
            RuntimeKind::MonoioUring => "monoio-uring",
            RuntimeKind::MonoioLegacy => "monoio-legacy",
        }
    }
}

impl std::str::FromStr for RuntimeKind {
    type Err = String;
    fn from_str(s: &str) -> Result<RuntimeKind, String> {
        [
            RuntimeKind::Glommio,
            RuntimeKind::MonoioUring,
            RuntimeKind::MonoioLegacy,
        ]
        .into_iter()
        .find(|k| k.name() == s)
        .ok_or_else(|| format!("unknown runtime {s:?}: glommio, monoio-uring or monoio-legacy"))
    }
}

/// The one port that serves every method, and its limits.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct ServerConfig {
    /// Address to listen on (every shard accepts on it with SO_REUSEPORT).
    pub listen: SocketAddr,
    /// Number of data-plane shards; 0 means one per core.
    pub shards: usize,
    /// The data-plane runtime backend.
    pub runtime: RuntimeKind,
    /// Largest gRPC message accepted or sent.
    pub max_message_bytes: ByteSize,
    /// Largest total of blob bytes in one BatchUpdateBlobs/BatchReadBlobs (advertised to clients).
    pub max_batch_total_size_bytes: ByteSize,
    /// Size of each ByteStream Read response message.
    pub read_chunk_bytes: ByteSize,
    /// HTTP/2 flow-control window per stream.
    pub stream_window_bytes: ByteSize,
    /// HTTP/2 flow-control window per connection.
    pub connection_window_bytes: ByteSize,
    /// HTTP/2 concurrent streams per connection.
    pub max_concurrent_streams: u32,
    /// Bound on each shard's cross-core request queue.
    pub shard_queue_depth: usize,
    /// Seconds to wait for in-flight requests after SIGTERM/SIGINT before exiting.
    pub shutdown_grace_secs: u64,
    /// A ByteStream Write that sends no bytes for this long is ended and its upload parked for
    /// resumption (seconds; 0: never).
    pub stalled_upload_secs: u64,
    /// Open client connections across all shards; more are closed as they arrive.
    pub max_connections: usize,
    /// A connection with no call in flight for this long is closed with GOAWAY (seconds;
    /// 0: never).
    pub idle_timeout_secs: u64,
    /// Also serve CAS reads (ByteStream `Read`, `BatchReadBlobs`, `FindMissingBlobs`) over
    /// QUIC, on UDP at the port of `listen`, for workers with `worker.server_transport` `quic`
    /// or `both`. Needs `[tls]`.
    pub quic: bool,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            listen: d::listen(),
            shards: 0,
            runtime: RuntimeKind::default(),
            max_message_bytes: d::max_message_bytes(),
            max_batch_total_size_bytes: d::max_batch_total_size_bytes(),
            read_chunk_bytes: d::read_chunk_bytes(),
            stream_window_bytes: d::stream_window_bytes(),
            connection_window_bytes: d::connection_window_bytes(),
            max_concurrent_streams: d::max_concurrent_streams(),
            shard_queue_depth: d::shard_queue_depth(),
            shutdown_grace_secs: d::shutdown_grace_secs(),
            stalled_upload_secs: 60,
            max_connections: 4096,
            idle_timeout_secs: 300,
            quic: false,
        }
    }
}

/// The CAS: a chain of tiers (by default a memory tier over the filesystem), both capped.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct StorageConfig {
    /// Directory holding the CAS, the action cache and upload temp files.
    pub data_dir: PathBuf,
    /// Memory tier budget (split evenly across shards).
    pub memory_bytes: ByteSize,
    /// Largest blob kept in the memory tier.
    pub memory_max_blob_bytes: ByteSize,
    /// Filesystem tier cap; the least recently used blobs are evicted above it.
    pub disk_bytes: ByteSize,
    /// fsync each blob (and its directory) before acknowledging it.
    pub fsync: bool,
    /// With `fsync`: commits made at the same time share one filesystem sync
    /// (`syncfs`, Linux) instead of each syncing its file and directory.
    pub group_commit: bool,
    /// With `group_commit`: blobs larger than this sync their own data before they join a
    /// group, so that one large blob does not hold up the small ones sharing its sync.
    pub group_commit_max_bytes: ByteSize,
    /// Uploads of at least this many bytes are written with direct I/O (O_DIRECT: to the disk
    /// without a copy into the page cache) where the runtime (glommio) and the filesystem
    /// allow it; `0` writes every upload through the page cache.
    pub direct_io_min_bytes: ByteSize,
    /// Access times are written to disk at most this often per blob (seconds).
    pub access_time_resolution_secs: u64,
    /// An interrupted upload can be resumed for this long (seconds).
    pub upload_expiry_secs: u64,
    /// Interrupted uploads kept for resumption, per shard.
    pub max_parked_uploads: usize,
    /// Access times queued for writing to blob files, per shard; past it, updates are skipped.
    pub max_pending_access_times: usize,
    /// The tiers blobs go through, top first (see [`crate::chain`]).
    pub chain: Vec<String>,
    /// Named tiers for `chain`.
    pub tiers: BTreeMap<String, crate::chain::TierConfig>,
}

impl Default for StorageConfig {
    fn default() -> Self {
        StorageConfig {
            data_dir: d::data_dir(),
            memory_bytes: d::memory_bytes(),
            memory_max_blob_bytes: d::memory_max_blob_bytes(),
            disk_bytes: d::disk_bytes(),
            fsync: d::yes(),
            group_commit: d::yes(),
            group_commit_max_bytes: d::group_commit_max_bytes(),
            direct_io_min_bytes: d::direct_io_min_bytes(),
            access_time_resolution_secs: d::access_time_resolution_secs(),
            upload_expiry_secs: d::upload_expiry_secs(),
            max_parked_uploads: d::max_parked_uploads(),
            max_pending_access_times: d::max_pending_access_times(),
            chain: crate::chain::default_chain(),
            tiers: BTreeMap::new(),
        }
    }
}

/// The action cache (stored on disk under `data_dir/ac`).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct ActionCacheConfig {
    /// Cap on the action cache's bytes on disk; least recently used entries are evicted above it.
    pub max_bytes: ByteSize,
    /// Largest ActionResult accepted.
    pub max_entry_bytes: ByteSize,
    /// Serve an entry only when every blob it references is in the CAS.
    pub completeness_check: bool,
    /// Copies of recently used results kept in memory (0: every hit reads its file).
    pub memory_bytes: ByteSize,
}

impl Default for ActionCacheConfig {
    fn default() -> Self {
        ActionCacheConfig {
            max_bytes: d::action_cache_bytes(),
            max_entry_bytes: d::max_action_result_bytes(),
            completeness_check: d::yes(),
            memory_bytes: d::action_cache_memory_bytes(),
        }
    }
}

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

/// The control plane's runtime.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct ControlPlaneConfig {
    /// tokio worker threads.
    pub threads: usize,
    /// Bound on requests handed over from the data plane and not yet taken.
    pub handoff_queue_depth: usize,
}

impl Default for ControlPlaneConfig {
    fn default() -> Self {
        ControlPlaneConfig {
            threads: d::control_plane_threads(),
            handoff_queue_depth: d::handoff_queue_depth(),
        }
    }
}

/// The admin listener: Prometheus `/metrics`, `/healthz`, `/readyz` and the `/status` page.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct AdminConfig {
    /// Serve the admin endpoints at all.
    pub enabled: bool,
    /// Where (plain HTTP; keep it on a trusted network).
    pub listen: SocketAddr,
}

impl Default for AdminConfig {
    fn default() -> Self {
        AdminConfig {
            enabled: d::yes(),
            listen: d::admin_listen(),
        }
    }
}

/// How a platform property of an action is matched against workers.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub enum PropertyKind {
    /// The worker must offer exactly this value (the default for undeclared properties).
    Exact,
    /// A number: the worker's value is a capacity, and each running action consumes what it
    /// asks for (`cores = "4"` on a worker offering 16 runs at most four such at once).
    Minimum,
    /// Not used for matching.
    Ignore,
}

/// How placement weighs what a free worker holds of an action: the worker with the highest
/// sum takes it.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct PlacementWeights {
    /// The worker's directory cache holds the action's input root.
    pub input_root: f64,
    /// Times the share (0 to 1) of the input tree's bytes under directories its cache holds.
    pub input_tree: f64,
    /// Times the share (0 to 1) of the input files' bytes its CAS holds.
    pub input_blobs: f64,
    /// Times the share (0 to 1) of its slots in use, subtracted.
    pub load: f64,
}

impl Default for PlacementWeights {
    fn default() -> PlacementWeights {
        PlacementWeights {
            input_root: 8.0,
            input_tree: 4.0,
            input_blobs: 2.0,
            load: 1.0,
        }
    }
}

/// The scheduler.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct ExecutionConfig {
    /// Accept Execute calls and run the scheduler and worker API.
    pub enabled: bool,
    /// Timeout for actions that set none (seconds).
    pub default_timeout_secs: u64,
    /// Cap on any action's timeout (seconds).
    pub max_timeout_secs: u64,
    /// Times an action is re-run after its worker disappears (never after its own failure).
    pub max_retries: u32,
    /// Also store results with a non-zero exit code in the action cache.
    pub cache_failed_results: bool,
    /// How often workers send keep-alives (seconds).
    pub keepalive_secs: u64,
    /// A worker silent for this long is declared lost and its actions re-queued (seconds).
    pub worker_timeout_secs: u64,
    /// Bound on queued actions; more get RESOURCE_EXHAUSTED.
    pub max_queued: usize,
    /// A queued action that no connected worker could run fails with FAILED_PRECONDITION
    /// after this long (seconds; 0 waits for a matching worker forever).
    pub unserved_timeout_secs: u64,
    /// Finished operations stay visible to WaitExecution/GetOperation this long (seconds).
    pub completed_retention_secs: u64,
    /// At most this many finished operations are kept for WaitExecution/GetOperation.
    pub max_completed_operations: usize,
    /// Share of the CAS that inputs of running actions may pin against eviction (percent).
    pub pin_budget_percent: u8,
    /// Most distinct digests (files and directories) in one action's input tree.
    pub max_input_digests: usize,
    /// How long an action may wait for a busy worker whose directory cache holds its input
    /// root before it goes to another free worker (milliseconds).
    pub locality_wait_ms: u64,
    /// Directories remembered per worker for placement (its directory cache's entries and
    /// every directory inside them).
    #[serde(alias = "max_cached_roots_per_worker")]
    pub max_cached_dirs_per_worker: usize,
    /// How placement weighs what each free worker holds of an action.
    pub placement_weights: PlacementWeights,
    /// Memory for the facts "worker W holds blob B" that workers serving their CAS to peers
    /// report (about 128 bytes each); past it the oldest facts are dropped.
    pub locality_map_bytes: ByteSize,
    /// How each platform property is matched; undeclared properties match exactly.
    pub properties: BTreeMap<String, PropertyKind>,
}

impl Default for ExecutionConfig {
    fn default() -> Self {
        ExecutionConfig {
            enabled: d::yes(),
            default_timeout_secs: 3600,
            max_timeout_secs: 4 * 3600,
            max_retries: 3,
            cache_failed_results: false,
            keepalive_secs: 5,
            worker_timeout_secs: 20,
            max_queued: 100_000,
            unserved_timeout_secs: 300,
            completed_retention_secs: 600,
            max_completed_operations: 50_000,
            pin_budget_percent: 50,
            max_input_digests: 16_000_000,
            locality_wait_ms: 100,
            max_cached_dirs_per_worker: 100_000,
            placement_weights: PlacementWeights::default(),
            locality_map_bytes: ByteSize::mib(256),
            properties: BTreeMap::new(),
        }
    }
}

/// A worker.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct WorkerConfig {
    /// `kiln serve` runs one worker in-process (using the server's own CAS).
    pub embedded: bool,
    /// The scheduler `kiln worker` connects to, `grpc://HOST:PORT`.
    pub scheduler: Option<String>,
    /// Where actions run (default: `work/` under the data directory); on the same filesystem
    /// as the CAS so inputs can be hardlinked.
    pub work_dir: Option<PathBuf>,
    /// Actions run at once; 0 means one per core.
    pub max_inflight: usize,
    /// Platform properties offered, `NAME=VALUE` (a name may repeat).
    pub properties: Vec<String>,
    /// Input blobs downloaded at once per action.
    pub fetch_parallelism: usize,
    /// Blobs of at least this size are downloaded in `fetch_ranges` parallel ranges.
    pub ranged_fetch_min_bytes: ByteSize,
    /// Ranges (each on a connection of its own) a large blob is downloaded in; 1: one stream.
    pub fetch_ranges: usize,
    /// Longest wait between reconnection attempts (seconds).
    pub max_reconnect_delay_secs: u64,
    /// The CA that signs the scheduler's certificate, PEM (for a `grpcs://` scheduler).
    pub tls_ca: Option<PathBuf>,
    /// This worker's client certificate, PEM (mutual TLS).
    pub tls_cert: Option<PathBuf>,
    /// Its private key, PEM.
    pub tls_key: Option<PathBuf>,
    /// A file holding a bearer token the worker presents (first line).
    pub token_file: Option<PathBuf>,
    /// Run actions as this user (name or uid); the worker must run as root.
    pub run_as_user: Option<String>,
    /// Bytes of input trees kept laid out in the directory cache (0: no cache).
    pub dircache_bytes: ByteSize,
    /// Where the directory cache is (default: `dircache/` under the data directory); on the
    /// same filesystem as the CAS and the work directory, so files can be hardlinked.
    pub dircache_dir: Option<PathBuf>,
    /// Serve the worker's CAS to its peers (read-only) and fetch inputs from the peers the
    /// scheduler names.
    pub peers: bool,
    /// Where peers reach this worker's CAS, `grpc://HOST:PORT` (default: `server.listen`,
    /// when that is one address peers can reach).
    pub peer_endpoint: Option<String>,
    /// How long a peer has to send a blob before the server is asked too (milliseconds),
    /// plus the blob's size at `peer_min_bytes_per_sec`.
    pub peer_race_delay_ms: u64,
    /// The rate a peer is expected to send at least (per second).
    pub peer_min_bytes_per_sec: ByteSize,
    /// A peer that failed is not asked again for this long (seconds).
    pub peer_cooldown_secs: u64,
    /// How blobs travel between workers: `tcp`, `quic`, or `both` (QUIC first, TCP for a peer
    /// not reachable over UDP). QUIC needs the peers' mutual TLS (an enrolled farm).
    pub peer_transport: PeerTransport,
    /// A QUIC handshake with a peer not done within this long marks it unreachable over UDP
    /// for `peer_cooldown_secs` (milliseconds); the same bound holds for the server.
    pub peer_quic_connect_timeout_ms: u64,
    /// How the worker reads blobs from the server: `tcp`, `quic` (the server must set
    /// `server.quic`), or `both` (QUIC first, TCP while the server is not reachable over UDP).
    /// Uploads go over TCP.
    pub server_transport: PeerTransport,
}

/// How blobs travel between workers.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum PeerTransport {
    /// HTTP/2 over TCP (and TLS on an enrolled farm).
    Tcp,
    /// QUIC only: a peer not reachable over UDP is not asked.
    Quic,
    /// QUIC first; TCP for a peer not reachable over UDP.
    Both,
}

impl Default for WorkerConfig {
    fn default() -> Self {
        WorkerConfig {
            embedded: d::yes(),
            scheduler: None,
            work_dir: None,
            max_inflight: 0,
            properties: Vec::new(),
            fetch_parallelism: 32,
            ranged_fetch_min_bytes: ByteSize::mib(64),
            fetch_ranges: 4,
            max_reconnect_delay_secs: 10,
            tls_ca: None,
            tls_cert: None,
            tls_key: None,
            token_file: None,
            run_as_user: None,
            dircache_bytes: ByteSize::gib(4),
            dircache_dir: None,
            peers: true,
            peer_endpoint: None,
            peer_race_delay_ms: 20,
            peer_min_bytes_per_sec: ByteSize::mib(100),
            peer_cooldown_secs: 30,
            peer_transport: PeerTransport::Tcp,
            peer_quic_connect_timeout_ms: 1000,
            server_transport: PeerTransport::Tcp,
        }
    }
}
