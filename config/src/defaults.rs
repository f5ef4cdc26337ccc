//! Default values, in one place so the docs and the code agree.

use bytesize::ByteSize;
use std::net::SocketAddr;
use std::path::PathBuf;

pub(crate) fn listen() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 50051))
}

/// The data directory: `$XDG_CACHE_HOME/kiln`, else `$HOME/.cache/kiln`, else `./kiln-data`.
pub fn data_dir() -> PathBuf {
    data_dir_from(std::env::var_os("XDG_CACHE_HOME"), std::env::var_os("HOME"))
}

/// [`data_dir`] for given values of `XDG_CACHE_HOME` and `HOME`.
pub(crate) fn data_dir_from(
    xdg_cache_home: Option<std::ffi::OsString>,
    home: Option<std::ffi::OsString>,
) -> PathBuf {
    if let Some(dir) = xdg_cache_home.filter(|d| !d.is_empty()) {
        return PathBuf::from(dir).join("kiln");
    }
    if let Some(home) = home.filter(|d| !d.is_empty()) {
        return PathBuf::from(home).join(".cache").join("kiln");
    }
    PathBuf::from("kiln-data")
}

pub(crate) fn admin_listen() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 9090))
}

pub(crate) fn max_message_bytes() -> ByteSize {
    ByteSize::mib(16)
}
pub(crate) fn max_batch_total_size_bytes() -> ByteSize {
    ByteSize::mib(4)
}
pub(crate) fn read_chunk_bytes() -> ByteSize {
    ByteSize::mib(1)
}
pub(crate) fn stream_window_bytes() -> ByteSize {
    ByteSize::mib(16)
}
pub(crate) fn connection_window_bytes() -> ByteSize {
    ByteSize::mib(64)
}
pub(crate) fn max_concurrent_streams() -> u32 {
    1024
}
pub(crate) fn shard_queue_depth() -> usize {
    4096
}
pub(crate) fn shutdown_grace_secs() -> u64 {
    30
}
pub(crate) fn memory_bytes() -> ByteSize {
    ByteSize::mib(512)
}
pub(crate) fn memory_max_blob_bytes() -> ByteSize {
    ByteSize::mib(1)
}
pub(crate) fn disk_bytes() -> ByteSize {
    ByteSize::gib(10)
}
pub(crate) fn group_commit_max_bytes() -> ByteSize {
    ByteSize::mib(1)
}
pub(crate) fn direct_io_min_bytes() -> ByteSize {
    ByteSize::mib(1)
}
pub(crate) fn yes() -> bool {
    true
}
pub(crate) fn access_time_resolution_secs() -> u64 {
    60
}
pub(crate) fn upload_expiry_secs() -> u64 {
    600
}
pub(crate) fn max_pending_access_times() -> usize {
    1 << 18
}
pub(crate) fn max_parked_uploads() -> usize {
    1024
}
pub(crate) fn action_cache_bytes() -> ByteSize {
    ByteSize::gib(1)
}
pub(crate) fn action_cache_memory_bytes() -> ByteSize {
    ByteSize::mib(64)
}
pub(crate) fn max_check_digests() -> u64 {
    1_000_000
}
pub(crate) fn max_action_result_bytes() -> ByteSize {
    ByteSize::mib(4)
}
pub(crate) fn control_plane_threads() -> usize {
    2
}
pub(crate) fn handoff_queue_depth() -> usize {
    1024
}
