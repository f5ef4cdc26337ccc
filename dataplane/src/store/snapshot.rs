//! The CAS index persisted at a clean stop (`{data_dir}/cas.index`), so that the next start
//! loads it instead of `stat`-ing every blob.
//!
//! The snapshot is kept per blob directory (`{instance}/{function}/{xx}`), with the
//! directory's identity as it was when the snapshot was written: inode, mtime and ctime.
//! Adding, removing or renaming a file in a directory changes its mtime and ctime, so at the
//! next start a directory whose identity still matches is taken from the snapshot and any
//! other is scanned from its files. A crash after the snapshot therefore costs a scan of
//! only the directories written since; a torn or foreign file fails its checksum, version or
//! bounds and is ignored (everything is scanned). Entries come back unverified, like scanned
//! ones: the bytes are hashed on their first read in this process, so a snapshot never makes
//! Kiln serve a blob that does not match its digest.
//!
//! Format (little-endian): `KILNIDX` + version byte; the instance names (count, then length
//! and bytes each); the directories (count, then for each: instance index, function, fan-out
//! byte, inode, mtime and ctime in nanoseconds, entry count, then per entry: 32-byte hash,
//! digest size, access time, and the bytes the entry is counted as — its digest's size for a
//! blob, its charged size for an action result); and a BLAKE3 hash of everything before
//! it. Version 1 (without the last field) is not read: its directories are scanned.
//!
//! The action cache keeps a snapshot of its own the same way (`{data_dir}/ac.index`).

use super::durable;
use super::index::Entry;
use kiln_reapi::digest::{BlobKey, Digest, DigestFunction, InstanceName};
use std::collections::HashMap;
use std::io::{self, Write};
use std::path::Path;

/// The file's first bytes: magic and format version.
const MAGIC: &[u8; 8] = b"KILNIDX\x02";
/// Bytes of one entry in the file.
const ENTRY_BYTES: u64 = 56;
/// Bytes of the trailing checksum.
const CHECKSUM: usize = 32;

/// What identifies a directory's contents: any change of a name in it changes this.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct DirStamp {
    /// Inode number (a directory removed and made again is another one).
    pub inode: u64,
    /// Last modification, nanoseconds since the Unix epoch.
    pub mtime: i128,
    /// Last status change, nanoseconds since the Unix epoch.
    pub ctime: i128,
}

impl DirStamp {
    /// The stamp of a directory, from its metadata.
    pub fn of(meta: &std::fs::Metadata) -> DirStamp {
        use std::os::unix::fs::MetadataExt;
        let ns = |s: i64, n: i64| i128::from(s) * 1_000_000_000 + i128::from(n);
        DirStamp {
            inode: meta.ino(),
            mtime: ns(meta.mtime(), meta.mtime_nsec()),
            ctime: ns(meta.ctime(), meta.ctime_nsec()),
        }
    }
}

/// Where a blob directory sits in the tree.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct DirKey {
    /// The instance.
    pub instance: InstanceName,
    /// The digest function.
    pub function: DigestFunction,
    /// The fan-out byte (the hashes' first byte).
    pub fanout: u8,
}

/// One directory's blobs as they were at the stop.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DirSnapshot {
    /// The directory's stamp when the snapshot was written.
    pub stamp: DirStamp,
    /// Each blob with its access time and the bytes its entry is counted as.
    pub blobs: Vec<(Digest, u64, u64)>,
}

/// A decoded snapshot.
pub type Snapshot = HashMap<DirKey, DirSnapshot>;

/// Why a snapshot file was not used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SnapshotError {
    /// Not a Kiln index, or another version of the format.
    #[error("not a Kiln index of this version (2); an older one is ignored once")]
    Version,
    /// The checksum does not match (torn or changed).
    #[error("checksum mismatch (torn or changed)")]
    Checksum,
    /// The content is inconsistent (truncated inside a record, bad names).
    #[error("malformed at byte {0}")]
    Malformed(usize),
}

/// Encodes `dirs` (sans-IO).
pub fn encode(dirs: &Snapshot) -> Vec<u8> {
    let mut names: Vec<&InstanceName> = Vec::new();
    let mut index_of: HashMap<&InstanceName, u32> = HashMap::new();
    for key in dirs.keys() {
        index_of.entry(&key.instance).or_insert_with(|| {
            names.push(&key.instance);
            (names.len() - 1) as u32
        });
    }
    let blobs: usize = dirs.values().map(|d| d.blobs.len()).sum();
    let mut out = Vec::with_capacity(64 + dirs.len() * 64 + blobs * ENTRY_BYTES as usize);
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&(names.len() as u32).to_le_bytes());
    for name in &names {
        out.extend_from_slice(&(name.as_str().len() as u32).to_le_bytes());
        out.extend_from_slice(name.as_str().as_bytes());
    }
    out.extend_from_slice(&(dirs.len() as u64).to_le_bytes());
    for (key, dir) in dirs {
        out.extend_from_slice(&index_of[&key.instance].to_le_bytes());
        out.push(function_code(key.function));
        out.push(key.fanout);
        out.extend_from_slice(&dir.stamp.inode.to_le_bytes());
        out.extend_from_slice(&dir.stamp.mtime.to_le_bytes());
        out.extend_from_slice(&dir.stamp.ctime.to_le_bytes());
        out.extend_from_slice(&(dir.blobs.len() as u64).to_le_bytes());
        for (digest, atime, size) in &dir.blobs {
            out.extend_from_slice(&digest.hash);
            out.extend_from_slice(&digest.size.to_le_bytes());
            out.extend_from_slice(&atime.to_le_bytes());
            out.extend_from_slice(&size.to_le_bytes());
        }
    }
    let sum = blake3::hash(&out);
    out.extend_from_slice(sum.as_bytes());
    out
}

/// Decodes a snapshot, refusing anything torn, foreign or inconsistent (sans-IO).
pub fn decode(bytes: &[u8]) -> Result<Snapshot, SnapshotError> {
    if bytes.len() < MAGIC.len() + CHECKSUM || &bytes[..MAGIC.len()] != MAGIC {
        return Err(SnapshotError::Version);
    }
    let (body, sum) = bytes.split_at(bytes.len() - CHECKSUM);
    if blake3::hash(body).as_bytes() != sum {
        return Err(SnapshotError::Checksum);
    }
    let mut r = Reader {
        bytes: body,
        pos: MAGIC.len(),
    };
    let count = r.u32()? as usize;
    let mut names = Vec::with_capacity(count.min(1 << 16));
    for _ in 0..count {
        let len = r.u32()? as usize;
        let at = r.pos;
        let text = std::str::from_utf8(r.take(len)?).map_err(|_| SnapshotError::Malformed(at))?;
        names.push(InstanceName::new(text).map_err(|_| SnapshotError::Malformed(at))?);
    }
    let dirs = r.u64()?;
    let mut out = Snapshot::new();
    for _ in 0..dirs {
        let at = r.pos;
        let instance = names
            .get(r.u32()? as usize)
            .ok_or(SnapshotError::Malformed(at))?
            .clone();
        let function = function_of(r.u8()?).ok_or(SnapshotError::Malformed(at))?;
        let fanout = r.u8()?;
        let stamp = DirStamp {
            inode: r.u64()?,
            mtime: r.i128()?,
            ctime: r.i128()?,
        };
        let n = r.u64()?;
        // A count the rest of the file cannot hold is a lie.
        if n > (r.bytes.len() - r.pos) as u64 / ENTRY_BYTES {
            return Err(SnapshotError::Malformed(at));
        }
        let mut blobs = Vec::with_capacity(n as usize);
        for _ in 0..n {
            let mut hash = [0u8; 32];
            hash.copy_from_slice(r.take(32)?);
            let size = r.u64()?;
            let atime = r.u64()?;
            let counted = r.u64()?;
            if hash[0] != fanout {
                return Err(SnapshotError::Malformed(r.pos));
            }
            blobs.push((
                Digest {
                    function,
                    hash,
                    size,
                },
                atime,
                counted,
            ));
        }
        let key = DirKey {
            instance,
            function,
            fanout,
        };
        if out.insert(key, DirSnapshot { stamp, blobs }).is_some() {
            return Err(SnapshotError::Malformed(at));
        }
    }
    if r.pos != body.len() {
        return Err(SnapshotError::Malformed(r.pos));
    }
    Ok(out)
}

/// An index's blobs grouped by directory, not yet stamped: digest, access time, and the
/// bytes the entry is counted as.
pub type Grouped = HashMap<DirKey, Vec<(Digest, u64, u64)>>;

/// Groups an owner's blobs by directory (on its thread, when it stops).
pub fn group(blobs: impl IntoIterator<Item = (BlobKey, Entry)>) -> Grouped {
    let mut by_dir = Grouped::new();
    for (key, entry) in blobs {
        let dir = DirKey {
            instance: key.instance.clone(),
            function: key.digest.function,
            fanout: key.digest.hash[0],
        };
        by_dir
            .entry(dir)
            .or_default()
            .push((key.digest, entry.atime, entry.size));
    }
    by_dir
}

/// Merges every owner's groups and stamps each directory as it is now on disk. Call once
/// nothing changes the tree any more (every owner and its file lane stopped). A directory is
/// kept only if its files are exactly the blobs the index lists and it did not change while
/// being compared: whatever the index got wrong (a file removed behind the server's back, a
/// commit or eviction that finished after its owner's blobs were grouped) leaves that
/// directory out, to be scanned at the next start.
pub fn stamp(layout: &super::layout::Layout, owners: Vec<Grouped>) -> Snapshot {
    let mut merged = Grouped::new();
    for grouped in owners {
        for (dir, blobs) in grouped {
            merged.entry(dir).or_default().extend(blobs);
        }
    }
    let mut out = Snapshot::new();
    for (dir, blobs) in merged {
        let path = dir_path(layout, &dir);
        if let Some(stamp) = matching_stamp(&path, &blobs) {
            out.insert(dir, DirSnapshot { stamp, blobs });
        }
    }
    out
}

/// Adds to `snapshot` each directory of `pending` (the background rebuild had not delivered
/// it when the server stopped) that `previous` (the snapshot this run started from) lists and
/// that is unchanged since (its stamp matches): so a stop soon after a start keeps those
/// listings for the next start instead of leaving them to a scan. A directory that was
/// delivered is never carried over: when this run's index disagreed with its files, the next
/// start scans it. Returns how many it added.
pub fn carry_over(
    layout: &super::layout::Layout,
    snapshot: &mut Snapshot,
    previous: Snapshot,
    pending: &std::collections::HashSet<DirKey>,
) -> usize {
    let mut added = 0;
    for (dir, listed) in previous {
        if snapshot.contains_key(&dir) || !pending.contains(&dir) {
            continue;
        }
        let unchanged = std::fs::metadata(dir_path(layout, &dir))
            .is_ok_and(|m| DirStamp::of(&m) == listed.stamp);
        if unchanged {
            snapshot.insert(dir, listed);
            added += 1;
        }
    }
    added
}

/// Where the blob directory `dir` is.
fn dir_path(layout: &super::layout::Layout, dir: &DirKey) -> std::path::PathBuf {
    let probe = BlobKey::new(
        dir.instance.clone(),
        Digest {
            function: dir.function,
            hash: [dir.fanout; 32],
            size: 0,
        },
    );
    layout.blob_dir(&probe)
}

/// The directory's stamp, if its entries are exactly `blobs`' files and it stayed unchanged
/// while they were compared.
fn matching_stamp(path: &Path, blobs: &[(Digest, u64, u64)]) -> Option<DirStamp> {
    let before = DirStamp::of(&std::fs::metadata(path).ok()?);
    let mut expected: std::collections::HashSet<String> = blobs
        .iter()
        .map(|(d, _, _)| super::layout::blob_file_name(d))
        .collect();
    if expected.len() != blobs.len() {
        return None;
    }
    for entry in std::fs::read_dir(path).ok()? {
        let name = entry.ok()?.file_name();
        if !expected.remove(name.to_str()?) {
            return None;
        }
    }
    let after = DirStamp::of(&std::fs::metadata(path).ok()?);
    (expected.is_empty() && before == after).then_some(before)
}

/// Writes a snapshot durably: a temp file, synced, renamed over `path`, directory synced.
pub fn write(path: &Path, snapshot: &Snapshot) -> io::Result<()> {
    let temp = path.with_extension("index-tmp");
    let result = (|| {
        let mut file = std::fs::File::create(&temp)?;
        file.write_all(&encode(snapshot))?;
        file.sync_all()?;
        std::fs::rename(&temp, path)?;
        if let Some(dir) = path.parent() {
            durable::sync_dir(dir)?;
        }
        Ok(())
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&temp);
    }
    result
}

/// Reads the snapshot at `path`: `None` when there is none or it cannot be used (logged).
pub fn load(path: &Path) -> Option<Snapshot> {
    let bytes = match std::fs::read(path) {
        Ok(bytes) => bytes,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return None,
        Err(e) => {
            tracing::warn!(path = %path.display(), error = %e, "cannot read the index snapshot; scanning every blob");
            return None;
        }
    };
    match decode(&bytes) {
        Ok(snapshot) => Some(snapshot),
        Err(e) => {
            tracing::warn!(path = %path.display(), error = %e, "index snapshot unusable; scanning every blob");
            None
        }
    }
}

fn function_code(function: DigestFunction) -> u8 {
    match function {
        DigestFunction::Sha256 => 1,
        DigestFunction::Blake3 => 2,
    }
}

fn function_of(code: u8) -> Option<DigestFunction> {
    match code {
        1 => Some(DigestFunction::Sha256),
        2 => Some(DigestFunction::Blake3),
        _ => None,
    }
}

/// Bounds-checked reading of the body.
struct Reader<'a> {
    bytes: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], SnapshotError> {
        let end = self
            .pos
            .checked_add(n)
            .filter(|end| *end <= self.bytes.len())
            .ok_or(SnapshotError::Malformed(self.pos))?;
        let out = &self.bytes[self.pos..end];
        self.pos = end;
        Ok(out)
    }

    fn u8(&mut self) -> Result<u8, SnapshotError> {
        Ok(self.take(1)?[0])
    }

    fn u32(&mut self) -> Result<u32, SnapshotError> {
        let mut b = [0u8; 4];
        b.copy_from_slice(self.take(4)?);
        Ok(u32::from_le_bytes(b))
    }

    fn u64(&mut self) -> Result<u64, SnapshotError> {
        let mut b = [0u8; 8];
        b.copy_from_slice(self.take(8)?);
        Ok(u64::from_le_bytes(b))
    }

    fn i128(&mut self) -> Result<i128, SnapshotError> {
        let mut b = [0u8; 16];
        b.copy_from_slice(self.take(16)?);
        Ok(i128::from_le_bytes(b))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Snapshot {
        let mut s = Snapshot::new();
        for (i, instance) in ["", "main/ci"].into_iter().enumerate() {
            let d = Digest::of(DigestFunction::Blake3, instance.as_bytes());
            s.insert(
                DirKey {
                    instance: InstanceName::new(instance).unwrap(),
                    function: DigestFunction::Blake3,
                    fanout: d.hash[0],
                },
                DirSnapshot {
                    stamp: DirStamp {
                        inode: 7 + i as u64,
                        mtime: -5,
                        ctime: 1 << 70,
                    },
                    blobs: vec![(d, 42, 4096)],
                },
            );
        }
        s
    }

    #[test]
    fn round_trips() {
        let s = sample();
        assert_eq!(decode(&encode(&s)).unwrap(), s);
        assert_eq!(decode(&encode(&Snapshot::new())).unwrap(), Snapshot::new());
    }

    #[test]
    fn torn_changed_and_foreign_files_are_refused() {
        let bytes = encode(&sample());
        for cut in [0, 7, 8, 40, bytes.len() - 1] {
            assert!(decode(&bytes[..cut]).is_err(), "cut at {cut}");
        }
        let mut flipped = bytes.clone();
        flipped[20] ^= 1;
        assert_eq!(decode(&flipped), Err(SnapshotError::Checksum));
        let mut other = bytes.clone();
        other[7] = 1;
        assert_eq!(
            decode(&other),
            Err(SnapshotError::Version),
            "version 1 is not read"
        );
        // A well-sealed body that lies about its counts is refused, not trusted.
        let mut body = MAGIC.to_vec();
        body.extend_from_slice(&0u32.to_le_bytes());
        body.extend_from_slice(&1u64.to_le_bytes());
        body.extend_from_slice(&0u32.to_le_bytes());
        body.extend_from_slice(&[1, 0]);
        body.extend_from_slice(&[0u8; 40]);
        body.extend_from_slice(&u64::MAX.to_le_bytes());
        let sum = blake3::hash(&body);
        body.extend_from_slice(sum.as_bytes());
        assert!(matches!(decode(&body), Err(SnapshotError::Malformed(_))));
    }
}
