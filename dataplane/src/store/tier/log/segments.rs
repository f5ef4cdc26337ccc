//! A log's segment files: `{id:016x}.seg` in its directory, appended only. At start-up each is
//! listed from its index file when that checks ([`index_file`]), else read through once to
//! index its records (and its index file written); a torn tail (a crash while a batch was
//! written, before it was synced and acknowledged) is cut off.

use super::index_file::{self, Entries};
use super::record::{self, Parsed};
use kiln_reapi::digest::BlobKey;
use std::fs::File;
use std::io::{self, BufReader, Read, Seek};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

/// The file of segment `id` in `dir`.
pub fn path(dir: &Path, id: u64) -> PathBuf {
    dir.join(format!("{id:016x}.seg"))
}

/// The id in a file name `{id:016x}{suffix}` (a segment's, `.seg`, or its index file's).
fn id_of(name: &str, suffix: &str) -> Option<u64> {
    let hex = name.strip_suffix(suffix)?;
    let lower = |b: &u8| b.is_ascii_digit() || (b'a'..=b'f').contains(b);
    (hex.len() == 16 && hex.as_bytes().iter().all(lower))
        .then(|| u64::from_str_radix(hex, 16).ok())
        .flatten()
}

/// Creates segment `id` (which must not exist); with `durable`, the directory entry is
/// synced too, so that a segment acknowledged records went to survives a crash.
pub fn create(dir: &Path, id: u64, durable: bool) -> io::Result<File> {
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .open(path(dir, id))?;
    if durable {
        // Not left behind when its entry cannot be made durable: the next try makes it anew.
        if let Err(e) = File::open(dir).and_then(|d| d.sync_all()) {
            let _ = std::fs::remove_file(path(dir, id));
            return Err(e);
        }
    }
    Ok(file)
}

/// One record found in a segment.
#[derive(Debug, PartialEq, Eq)]
pub struct Found {
    /// Its blob.
    pub key: BlobKey,
    /// Where its bytes start.
    pub offset: u64,
    /// The whole record's length.
    pub record_len: u64,
    /// The CRC of its bytes, from its header.
    pub data_crc: u32,
}

/// A segment read at start-up.
#[derive(Debug)]
pub struct Recovered {
    /// Its id.
    pub id: u64,
    /// The file, open for reading and appending.
    pub file: File,
    /// Its length (after a torn tail was cut off).
    pub len: u64,
    /// Its records, in order.
    pub records: Vec<Found>,
    /// Bytes of torn tail cut off.
    pub torn: u64,
    /// Whether its records came from its index file (not a scan).
    pub from_index: bool,
}

/// Reads every segment in `dir` (created if missing), oldest first; records of blobs over
/// `max_blob` bytes are taken for damage. The newest segment's torn tail is cut off (and the
/// cut synced with `durable`); in an older one, damage ends what is indexed of it but nothing
/// is cut (what follows is unreachable, and goes with the segment).
pub fn recover(dir: &Path, durable: bool, max_blob: u64) -> io::Result<Vec<Recovered>> {
    std::fs::create_dir_all(dir)?;
    let mut ids = Vec::new();
    let mut indexes = Vec::new();
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        let name = entry.file_name();
        let Some(name) = name.to_str() else { continue };
        if let Some(id) = id_of(name, ".seg") {
            ids.push(id);
        } else if index_file::is_index(name) {
            indexes.push((entry.path(), id_of(name, ".idx")));
        }
    }
    ids.sort_unstable();
    // Index files of segments gone (dropped before a crash), and unfinished ones.
    for (index, id) in indexes {
        if id.is_none_or(|id| ids.binary_search(&id).is_err()) {
            let _ = std::fs::remove_file(&index);
        }
    }
    let mut out = Vec::with_capacity(ids.len());
    let newest = ids.last().copied();
    for id in ids {
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(path(dir, id))?;
        let on_disk = file.metadata()?.len();
        if let Some(records) = index_file::read(dir, id, on_disk, max_blob) {
            out.push(Recovered {
                id,
                file,
                len: on_disk,
                records,
                torn: 0,
                from_index: true,
            });
            continue;
        }
        let (records, len) = scan(&file, on_disk, max_blob)?;
        let torn = on_disk - len;
        if torn > 0 && Some(id) == newest {
            file.set_len(len)?;
            if durable {
                file.sync_all()?;
            }
        } else if torn > 0 {
            tracing::warn!(
                segment = id,
                bytes = torn,
                "log: damage in a sealed segment; its records from there on are lost"
            );
        }
        // An older segment keeps its length (nothing is cut): its index names that length,
        // so that the next start believes it.
        let len = if Some(id) == newest { len } else { on_disk };
        // Never appended again (a start begins a new segment): indexed for the next start.
        if let Err(e) = Entries::of(&records).write(dir, id, len, durable) {
            tracing::warn!(segment = id, error = %e, "log: cannot write a segment's index file");
        }
        out.push(Recovered {
            id,
            file,
            len,
            records,
            torn,
            from_index: false,
        });
    }
    Ok(out)
}

/// The records of a segment `len` bytes long, and where the last whole one ends: a header
/// that fails its CRC, or a record over `max_blob`, ends it; a record whose bytes fail
/// theirs is left out.
fn scan(file: &File, len: u64, max_blob: u64) -> io::Result<(Vec<Found>, u64)> {
    let mut reader = BufReader::with_capacity(1 << 20, file);
    reader.rewind()?;
    let mut records = Vec::new();
    let mut pos = 0u64;
    let mut header = Vec::new();
    let mut data = Vec::new();
    loop {
        header.clear();
        let mut need = 0usize;
        let (key, header_len, data_crc) = loop {
            match record::parse(&header) {
                Parsed::Record {
                    key,
                    header_len,
                    data_crc,
                } => break (key, header_len, data_crc),
                Parsed::Bad => return Ok((records, pos)),
                Parsed::Short { need: more } if more > need => {
                    need = more;
                    let have = header.len();
                    header.resize(more, 0);
                    if !read_fully(&mut reader, &mut header[have..])? {
                        return Ok((records, pos));
                    }
                }
                // A header asking for no more than it has is malformed.
                Parsed::Short { .. } => return Ok((records, pos)),
            }
        };
        let size = key.digest.size;
        let end = pos
            .checked_add(header_len as u64)
            .and_then(|p| p.checked_add(size));
        let Some(end) = end.filter(|e| *e <= len && size <= max_blob) else {
            return Ok((records, pos));
        };
        // Bounded by max_blob above.
        data.resize(size as usize, 0);
        if !read_fully(&mut reader, &mut data)? {
            return Ok((records, pos));
        }
        // Bytes that do not match their header's CRC (never written before a crash, or
        // damaged since): that record is not indexed; those after it still are.
        if crc32fast::hash(&data) != data_crc {
            pos = end;
            continue;
        }
        records.push(Found {
            key,
            offset: pos + header_len as u64,
            record_len: end - pos,
            data_crc,
        });
        pos = end;
    }
}

/// Fills `buf`; false when the file ends first.
fn read_fully(reader: &mut impl Read, buf: &mut [u8]) -> io::Result<bool> {
    match reader.read_exact(buf) {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => Ok(false),
        Err(e) => Err(e),
    }
}

/// `len` bytes of `file` at `offset`.
pub fn read(file: &File, offset: u64, len: u64) -> io::Result<Vec<u8>> {
    let len = usize::try_from(len).map_err(|_| io::Error::other("record too large"))?;
    let mut buf = vec![0u8; len];
    file.read_exact_at(&mut buf, offset)?;
    Ok(buf)
}

/// Writes `bytes` at `offset` of `file`, and with `durable` syncs its data.
pub fn append(file: &File, offset: u64, bytes: &[u8], durable: bool) -> io::Result<()> {
    file.write_all_at(bytes, offset)?;
    if durable {
        file.sync_data()?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use kiln_reapi::digest::{Digest, DigestFunction, InstanceName};

    const MAX: u64 = 64 << 10;

    fn record(data: &[u8]) -> (BlobKey, Vec<u8>) {
        let key = BlobKey::new(
            InstanceName::default_instance(),
            Digest::of(DigestFunction::Sha256, data),
        );
        let mut bytes = record::header(&key, data);
        bytes.extend_from_slice(data);
        (key, bytes)
    }

    #[test]
    fn records_are_found_again_and_a_torn_tail_is_cut_at_every_length() {
        let dir = tempfile::tempdir().unwrap();
        let (k1, r1) = record(b"first blob");
        let (k2, r2) = record(&[7u8; 5000]);
        let whole = [r1.clone(), r2.clone()].concat();
        // Every cut of the second record leaves the first, and the file cut back to it.
        for cut in [0, 1, 4, 30, r2.len() - 1] {
            let dir = dir.path().join(format!("cut-{cut}"));
            std::fs::create_dir(&dir).unwrap();
            let file = create(&dir, 1, true).unwrap();
            append(&file, 0, &whole[..r1.len() + cut], true).unwrap();
            let found = recover(&dir, true, MAX).unwrap();
            assert_eq!(found.len(), 1);
            assert_eq!(
                found[0].records,
                vec![Found {
                    key: k1.clone(),
                    offset: (r1.len() - 10) as u64,
                    record_len: r1.len() as u64,
                    data_crc: crc32fast::hash(b"first blob"),
                }],
                "cut {cut}"
            );
            assert_eq!(found[0].torn, cut as u64);
            assert_eq!(
                std::fs::metadata(path(&dir, 1)).unwrap().len(),
                r1.len() as u64
            );
        }
        let dir = dir.path().join("whole");
        std::fs::create_dir(&dir).unwrap();
        let file = create(&dir, 9, false).unwrap();
        append(&file, 0, &whole, false).unwrap();
        std::fs::write(dir.join("not-a-segment"), b"ignored").unwrap();
        let found = recover(&dir, false, MAX).unwrap();
        assert_eq!((found.len(), found[0].id, found[0].torn), (1, 9, 0));
        let keys: Vec<&BlobKey> = found[0].records.iter().map(|r| &r.key).collect();
        assert_eq!(keys, vec![&k1, &k2]);
        let second = &found[0].records[1];
        assert_eq!(read(&file, second.offset, 5000).unwrap(), vec![7u8; 5000]);
    }

    /// A damaged header, bytes that do not match their CRC (a batch a crash left unwritten:
    /// zeros) and a record over the largest blob each end what is indexed of a segment; only
    /// the newest segment is cut there.
    #[test]
    fn damage_ends_a_segment_and_only_the_newest_is_cut() {
        let (k1, r1) = record(b"kept");
        let (_, r3) = record(b"after the damage");
        let (_, header_damaged) = {
            let (k, mut r) = record(b"damaged");
            r[6] ^= 1;
            (k, r)
        };
        let (_, bytes_unwritten) = {
            let (k, mut r) = record(b"never written");
            let n = r.len();
            r[n - 13..].fill(0);
            (k, r)
        };
        let (_, too_large) = record(&vec![1u8; (MAX + 1) as usize]);
        for damage in [header_damaged, too_large] {
            let dir = tempfile::tempdir().unwrap();
            let whole = [r1.clone(), damage, r3.clone()].concat();
            for id in [2, 3] {
                append(&create(dir.path(), id, false).unwrap(), 0, &whole, false).unwrap();
            }
            let found = recover(dir.path(), false, MAX).unwrap();
            for seg in &found {
                assert_eq!(seg.records.len(), 1);
                assert_eq!(seg.records[0].key, k1);
                assert_eq!(seg.torn, (whole.len() - r1.len()) as u64);
            }
            assert_eq!(found[0].len, whole.len() as u64);
            assert_eq!(found[1].len, r1.len() as u64);
            let on_disk = |id| std::fs::metadata(path(dir.path(), id)).unwrap().len();
            assert_eq!(
                on_disk(2),
                whole.len() as u64,
                "an older segment is not cut"
            );
            assert_eq!(on_disk(3), r1.len() as u64, "the newest is");
            // Both indexed as they are now: the next start lists them from their index files.
            let again = recover(dir.path(), false, MAX).unwrap();
            assert!(again.iter().all(|s| s.from_index && s.records.len() == 1));
        }
        // Bytes that fail their CRC leave that record out, not those after it.
        let dir = tempfile::tempdir().unwrap();
        let whole = [r1.clone(), bytes_unwritten, r3.clone()].concat();
        append(&create(dir.path(), 4, false).unwrap(), 0, &whole, false).unwrap();
        let found = recover(dir.path(), false, MAX).unwrap();
        let keys: Vec<&BlobKey> = found[0].records.iter().map(|r| &r.key).collect();
        assert_eq!(keys.len(), 2);
        assert_eq!(keys[0], &k1);
        assert_eq!((found[0].torn, found[0].len), (0, whole.len() as u64));
    }
}
