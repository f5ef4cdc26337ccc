//! The action cache's file I/O: results written whole to new files, read back with the
//! identity (device, inode) of the file they came from.

use std::path::Path;

/// What a read found at an entry's path, for [`Inner::drop_entry`].
pub(super) enum Found {
    /// No file.
    Nothing,
    /// The file with this identity (device, inode).
    File((u64, u64)),
}

pub(super) fn identity(meta: &std::fs::Metadata) -> (u64, u64) {
    use std::os::unix::fs::MetadataExt;
    (meta.dev(), meta.ino())
}

/// A file's bytes and its identity (device, inode), from one open.
pub(super) fn read_with_identity(path: &Path) -> std::io::Result<(Vec<u8>, (u64, u64))> {
    use std::io::Read;
    let mut file = std::fs::File::open(path)?;
    let meta = file.metadata()?;
    let mut data = Vec::with_capacity(usize::try_from(meta.len()).unwrap_or(0));
    file.read_to_end(&mut data)?;
    Ok((data, identity(&meta)))
}

pub(super) fn write_file(path: &Path, data: &[u8], fsync: bool) -> std::io::Result<()> {
    use std::io::Write;
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(path)?;
    file.write_all(data)?;
    if fsync {
        file.sync_data()?;
    }
    Ok(())
}
