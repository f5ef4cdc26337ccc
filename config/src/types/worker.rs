//! A worker: `[worker]`, and how its blobs travel.

use crate::defaults as d;
use bytesize::ByteSize;
use serde::{Deserialize, Serialize};
use std::path::PathBuf;

/// `worker.run_as_user`: one user every action runs as, or users each running action takes
/// one of for itself.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(untagged)]
pub enum RunAsUser {
    /// Every action runs as this user.
    Shared(String),
    /// Each running action runs as one of these, no two at once as the same.
    Each(Vec<String>),
}

/// A worker.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct WorkerConfig {
    /// `kiln serve` runs one worker in-process (using the server's own CAS).
    pub embedded: bool,
    /// The scheduler `kiln worker` connects to, `grpc://HOST:PORT`.
    pub scheduler: Option<String>,
    /// More schedulers the worker serves at the same time (the other servers of a farm
    /// sharing Redis), sharing its slots among them.
    pub schedulers: Vec<String>,
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
    /// Run actions as this user (name or uid), or as one of these users each (a list: every
    /// running action takes one for itself); the worker must run as root.
    pub run_as_user: Option<RunAsUser>,
    /// Bytes of input trees kept laid out in the directory cache (0: no cache).
    pub dircache_bytes: ByteSize,
    /// Where the directory cache is (default: `dircache/` under the data directory); on the
    /// same filesystem as the CAS and the work directory, so files can be hardlinked.
    pub dircache_dir: Option<PathBuf>,
    /// How a cached input root is put in place: `links` (a hardlink per file, a directory
    /// made per directory) or `overlay` (one overlay mount over the entry; Linux, as root).
    pub dircache_layout: DirCacheLayout,
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
    /// How the worker reads blobs from and uploads them to the server: `tcp`, `quic` (the
    /// server must set `server.quic`), or `both` (QUIC first, TCP while the server is not
    /// reachable over UDP). The session goes over TCP.
    pub server_transport: PeerTransport,
}

/// How a cached input root is put in place.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum DirCacheLayout {
    /// A hardlink per file and a directory made per directory.
    #[default]
    Links,
    /// An overlay mount with the entry as its read-only lower layer (Linux, as root; falls
    /// back to links where the mount is refused).
    Overlay,
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
            schedulers: Vec::new(),
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
            dircache_layout: DirCacheLayout::Links,
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
