//! A sealed segment's index file, `{id:016x}.idx`: each record's header and where its bytes
//! start, so that a start lists a segment without reading its blobs. Written when a segment is
//! sealed (or first scanned at a start), through a temp file and a rename; it ends in a trailer
//! with the segment's length and a CRC of the whole, and one that does not check, or that
//! names another length than the segment's, is ignored (the segment is scanned instead).
//!
//! ```text
//! (record header | data offset u64) ... | magic "KLX1" | segment length u64 | crc32 u32
//! ```

use super::record::{self, Parsed};
use super::segments::Found;
use std::io::{self, Write};
use std::path::{Path, PathBuf};

const MAGIC: &[u8; 4] = b"KLX1";
const TRAILER: usize = 4 + 8 + 4;

/// The index file of segment `id` in `dir`.
pub fn path(dir: &Path, id: u64) -> PathBuf {
    dir.join(format!("{id:016x}.idx"))
}

/// An index being built as records are appended.
#[derive(Debug, Default)]
pub struct Entries(Vec<u8>);

impl Entries {
    /// Adds the record of `key` (its header `header`) whose bytes start at `offset`.
    pub fn push(&mut self, header: &[u8], offset: u64) {
        self.0.extend_from_slice(header);
        self.0.extend_from_slice(&offset.to_le_bytes());
    }

    /// The index of the records found by a scan.
    pub fn of(found: &[Found]) -> Entries {
        let mut entries = Entries::default();
        for f in found {
            entries.push(&record::with_crc(&f.key, f.data_crc), f.offset);
        }
        entries
    }

    /// Writes it as segment `id`'s index (the segment `len` bytes long), replacing any; with
    /// `durable` the file and its directory entry are synced.
    pub fn write(&self, dir: &Path, id: u64, len: u64, durable: bool) -> io::Result<()> {
        let mut bytes = Vec::with_capacity(self.0.len() + TRAILER);
        bytes.extend_from_slice(&self.0);
        bytes.extend_from_slice(MAGIC);
        bytes.extend_from_slice(&len.to_le_bytes());
        let crc = crc32fast::hash(&bytes);
        bytes.extend_from_slice(&crc.to_le_bytes());
        let temp = path(dir, id).with_extension("idx.tmp");
        let mut file = std::fs::File::create(&temp)?;
        file.write_all(&bytes)?;
        if durable {
            file.sync_data()?;
        }
        std::fs::rename(&temp, path(dir, id))?;
        if durable {
            std::fs::File::open(dir)?.sync_all()?;
        }
        Ok(())
    }

    /// Clears it for the next segment.
    pub fn clear(&mut self) {
        self.0.clear();
    }
}

/// The records segment `id` holds by its index file, when the file checks and describes a
/// segment of `len` bytes whose every record lies within it and is at most `max_blob`;
/// `None` otherwise.
pub fn read(dir: &Path, id: u64, len: u64, max_blob: u64) -> Option<Vec<Found>> {
    let bytes = std::fs::read(path(dir, id)).ok()?;
    let body_len = bytes.len().checked_sub(TRAILER)?;
    let (body, trailer) = bytes.split_at(body_len);
    let crc_at = TRAILER - 4;
    let mut crc = [0u8; 4];
    crc.copy_from_slice(&trailer[crc_at..]);
    if crc32fast::hash(&bytes[..body_len + crc_at]) != u32::from_le_bytes(crc) {
        return None;
    }
    let mut segment_len = [0u8; 8];
    segment_len.copy_from_slice(&trailer[4..12]);
    if &trailer[..4] != MAGIC || u64::from_le_bytes(segment_len) != len {
        return None;
    }
    let mut found = Vec::new();
    let mut rest = body;
    while !rest.is_empty() {
        let Parsed::Record {
            key,
            header_len,
            data_crc,
        } = record::parse(rest)
        else {
            return None;
        };
        if key.digest.size > max_blob {
            return None;
        }
        let at = rest.get(header_len..header_len + 8)?;
        let mut offset = [0u8; 8];
        offset.copy_from_slice(at);
        let offset = u64::from_le_bytes(offset);
        let record_len = (header_len as u64).checked_add(key.digest.size)?;
        let end = offset.checked_add(key.digest.size)?;
        if end > len || offset < header_len as u64 {
            return None;
        }
        found.push(Found {
            key,
            offset,
            record_len,
            data_crc,
        });
        rest = &rest[header_len + 8..];
    }
    Some(found)
}

/// Removes segment `id`'s index file, if any.
pub fn remove(dir: &Path, id: u64) {
    let _ = std::fs::remove_file(path(dir, id));
}

/// Whether `name` is an index file or an unfinished one's temp file.
pub fn is_index(name: &str) -> bool {
    name.ends_with(".idx") || name.ends_with(".idx.tmp")
}

#[cfg(test)]
mod tests {
    use super::*;
    use kiln_reapi::digest::{BlobKey, Digest, DigestFunction, InstanceName};

    const MAX: u64 = 1 << 20;

    fn found(n: u8, offset: u64) -> Found {
        let key = BlobKey::new(
            InstanceName::new("ci").unwrap(),
            Digest::of(DigestFunction::Sha256, &[n; 10]),
        );
        let header_len = record::header(&key, &[n; 10]).len() as u64;
        Found {
            key,
            offset,
            record_len: header_len + 10,
            data_crc: crc32fast::hash(&[n; 10]),
        }
    }

    #[test]
    fn an_index_reads_back_and_a_wrong_or_damaged_one_is_ignored() {
        let dir = tempfile::tempdir().unwrap();
        let first = found(1, 0);
        let h = first.record_len - 10;
        let records = vec![found(1, h), found(2, h + first.record_len)];
        let len = 2 * first.record_len;
        Entries::of(&records)
            .write(dir.path(), 3, len, true)
            .unwrap();
        assert_eq!(read(dir.path(), 3, len, MAX).as_ref(), Some(&records));
        assert_eq!(
            read(dir.path(), 3, len + 1, MAX),
            None,
            "the segment grew since"
        );
        assert_eq!(read(dir.path(), 4, len, MAX), None, "no index");
        let bytes = std::fs::read(path(dir.path(), 3)).unwrap();
        for at in [0, 20, bytes.len() - 1] {
            let mut damaged = bytes.clone();
            damaged[at] ^= 1;
            std::fs::write(path(dir.path(), 3), &damaged).unwrap();
            assert_eq!(read(dir.path(), 3, len, MAX), None, "byte {at} flipped");
        }
        std::fs::write(path(dir.path(), 3), &bytes[..bytes.len() - 3]).unwrap();
        assert_eq!(read(dir.path(), 3, len, MAX), None, "cut short");
        // An index whose records lie past the segment's end is not believed.
        Entries::of(&records)
            .write(dir.path(), 5, len - 1, false)
            .unwrap();
        assert_eq!(read(dir.path(), 5, len - 1, MAX), None);
        assert!(is_index("0000000000000003.idx") && is_index("x.idx.tmp"));
        remove(dir.path(), 3);
        assert!(!path(dir.path(), 3).exists());
    }
}
