//! The listener and its runtimes: `[server]`, `[control_plane]`, `[admin]`.

use crate::defaults as d;
use bytesize::ByteSize;
use serde::{Deserialize, Serialize};
use std::net::SocketAddr;

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
    /// Also serve the CAS's blob reads and uploads over QUIC, on UDP at the port of `listen`,
    /// for workers with `worker.server_transport` `quic` or `both`. Needs `[tls]`.
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
