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

/// A segment's id, from its file name.
fn id_of(name: &str) -> Option<u64> {
    let hex = name.strip_suffix(".seg")?;
    (hex.len() == 16)
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
        File::open(dir)?.sync_all()?;
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

/// Reads every segment in `dir` (created if missing), oldest first. A torn tail is cut off
/// (and the cut synced with `durable`).
pub fn recover(dir: &Path, durable: bool) -> io::Result<Vec<Recovered>> {
    std::fs::create_dir_all(dir)?;
    let mut ids = Vec::new();
    let mut indexes = Vec::new();
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        let name = entry.file_name();
        let Some(name) = name.to_str() else { continue };
        if let Some(id) = id_of(name) {
            ids.push(id);
        } else if index_file::is_index(name) {
            indexes.push(entry.path());
        }
    }
    ids.sort_unstable();
    // Index files of segments gone (dropped before a crash), and unfinished ones.
    for index in indexes {
        let stem = index
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or_default();
        let id = stem
            .split('.')
            .next()
            .and_then(|h| u64::from_str_radix(h, 16).ok());
        if !stem.ends_with(".idx") || id.is_none_or(|id| ids.binary_search(&id).is_err()) {
            let _ = std::fs::remove_file(&index);
        }
    }
    let mut out = Vec::with_capacity(ids.len());
    for id in ids {
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(path(dir, id))?;
        let on_disk = file.metadata()?.len();
        if let Some(records) = index_file::read(dir, id, on_disk) {
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
        let (records, len) = scan(&file, on_disk)?;
        let torn = on_disk - len;
        if torn > 0 {
            file.set_len(len)?;
            if durable {
                file.sync_all()?;
            }
        }
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

/// The records of a segment `len` bytes long, and where the last whole one ends.
fn scan(file: &File, len: u64) -> io::Result<(Vec<Found>, u64)> {
    let mut reader = BufReader::with_capacity(1 << 20, file);
    reader.rewind()?;
    let mut records = Vec::new();
    let mut pos = 0u64;
    let mut header = Vec::new();
    loop {
        header.clear();
        let mut need = 0usize;
        let (key, header_len) = loop {
            match record::parse(&header) {
                Parsed::Record { key, header_len } => break (key, header_len),
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
        let Some(end) = end.filter(|e| *e <= len) else {
            return Ok((records, pos));
        };
        let skip = i64::try_from(size).map_err(|_| io::Error::other("record too large"))?;
        reader.seek_relative(skip)?;
        records.push(Found {
            key,
            offset: pos + header_len as u64,
            record_len: end - pos,
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

    fn record(data: &[u8]) -> (BlobKey, Vec<u8>) {
        let key = BlobKey::new(
            InstanceName::default_instance(),
            Digest::of(DigestFunction::Sha256, data),
        );
        let mut bytes = record::header(&key);
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
            let found = recover(&dir, true).unwrap();
            assert_eq!(found.len(), 1);
            assert_eq!(
                found[0].records,
                vec![Found {
                    key: k1.clone(),
                    offset: (r1.len() - 10) as u64,
                    record_len: r1.len() as u64
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
        let found = recover(&dir, false).unwrap();
        assert_eq!((found.len(), found[0].id, found[0].torn), (1, 9, 0));
        let keys: Vec<&BlobKey> = found[0].records.iter().map(|r| &r.key).collect();
        assert_eq!(keys, vec![&k1, &k2]);
        let second = &found[0].records[1];
        assert_eq!(read(&file, second.offset, 5000).unwrap(), vec![7u8; 5000]);
    }

    #[test]
    fn a_damaged_header_ends_the_segment_there() {
        let dir = tempfile::tempdir().unwrap();
        let (k1, r1) = record(b"kept");
        let (_, mut r2) = record(b"damaged");
        let (_, r3) = record(b"after the damage");
        r2[6] ^= 1;
        let file = create(dir.path(), 2, false).unwrap();
        append(&file, 0, &[r1.clone(), r2, r3].concat(), false).unwrap();
        let found = recover(dir.path(), false).unwrap();
        assert_eq!(found[0].records.len(), 1);
        assert_eq!(found[0].records[0].key, k1);
        assert_eq!(found[0].len, r1.len() as u64);
    }
}
