//! Access times, as nanoseconds since the Unix epoch: fine enough that blobs used one after
//! the other keep their order through a restart, on every filesystem with nanosecond times.

use std::time::{SystemTime, UNIX_EPOCH};

/// Now.
pub fn now() -> u64 {
    from_system_time(SystemTime::now())
}

/// A file time as nanoseconds (0 before the epoch).
pub fn from_system_time(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
}

/// Nanoseconds as a `filetime` value, for writing to a file.
pub fn to_filetime(nanos: u64) -> filetime::FileTime {
    filetime::FileTime::from_unix_time(
        (nanos / 1_000_000_000) as i64,
        (nanos % 1_000_000_000) as u32,
    )
}

/// Whether an access time is far enough past the one on disk to be written again.
pub fn due(atime: u64, persisted: u64, resolution: std::time::Duration) -> bool {
    let resolution = u64::try_from(resolution.as_nanos()).unwrap_or(u64::MAX);
    atime >= persisted.saturating_add(resolution)
}

/// Writes an access time to a file (best effort: the index is the authority while running).
pub fn persist(path: &std::path::Path, nanos: u64) {
    if let Err(e) = filetime::set_file_atime(path, to_filetime(nanos)) {
        tracing::debug!(path = %path.display(), error = %e, "cannot record access time");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_through_a_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        std::fs::write(&path, b"x").unwrap();
        let t = 1_700_000_000_123_456_789u64;
        persist(&path, t);
        let read = from_system_time(std::fs::metadata(&path).unwrap().accessed().unwrap());
        assert_eq!(read, t);
    }
}
