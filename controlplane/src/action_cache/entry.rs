//! The action cache's file format: a header naming the format, then the serialized
//! `ActionResult`'s length and BLAKE3 hash, then the result itself.
//!
//! Why a header: protobuf decodes almost anything. A file cut short by a crash (results
//! written with `storage.fsync = false`), a zero-length file a filesystem left after a power
//! cut, or a damaged block would otherwise decode as a *successful* `ActionResult` with fewer
//! or no outputs, and be served as a cache hit. With the header, such a file is recognised
//! and dropped (a miss: the action runs again).
//!
//! Files without the header were written by Kiln before this format (whole, and synced as
//! configured): they are read as they are, so an upgrade keeps the cache, except an empty
//! file, which is never a result worth serving. No encoded `ActionResult` starts with the
//! header's first byte (`K`, a group start of field 9, which `ActionResult` does not have),
//! so the two cannot be confused. The checksum covers the length and the result, not the
//! format's name: a file whose first six bytes were damaged is read as an old one (and
//! dropped when it does not decode). What a crash does — cut a file short, at any length —
//! is always caught.

use bytes::Bytes;

/// The first bytes of every entry: the format's name and its version (the last byte).
pub const MAGIC: [u8; 8] = *b"KILNAC\x00\x01";
/// The part of the magic that names the format, whatever the version.
const NAME: usize = 6;
/// Magic, length (u64, little-endian), BLAKE3 of the result.
pub const HEADER: usize = MAGIC.len() + 8 + 32;

/// Why a file is not a usable entry.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EntryError {
    /// The file is empty.
    #[error("the entry's file is empty")]
    Empty,
    /// Shorter or longer than its header says: cut short while being written, or damaged.
    #[error("the entry's file holds {found} bytes of a {expected}-byte result")]
    Length {
        /// What the header says.
        expected: u64,
        /// What follows the header.
        found: u64,
    },
    /// The result does not hash to what the header says: damaged.
    #[error("the entry's result does not match its checksum")]
    Checksum,
    /// A version of the format this build does not read.
    #[error("the entry is of format version {0}, which this build does not read")]
    Version(u8),
}

/// The file's bytes for a serialized `ActionResult`.
pub fn encode(result: &[u8]) -> Vec<u8> {
    let mut file = Vec::with_capacity(HEADER + result.len());
    file.extend_from_slice(&MAGIC);
    file.extend_from_slice(&(result.len() as u64).to_le_bytes());
    file.extend_from_slice(blake3::hash(result).as_bytes());
    file.extend_from_slice(result);
    file
}

/// The serialized `ActionResult` in a file's bytes, checked.
pub fn decode(file: Bytes) -> Result<Bytes, EntryError> {
    if file.is_empty() {
        return Err(EntryError::Empty);
    }
    let named = file.len().min(NAME);
    if file[..named] != MAGIC[..named] {
        // Written before this format.
        return Ok(file);
    }
    if file.len() < HEADER {
        return Err(EntryError::Length {
            expected: HEADER as u64,
            found: file.len() as u64,
        });
    }
    if file[..MAGIC.len()] != MAGIC {
        return Err(EntryError::Version(file[MAGIC.len() - 1]));
    }
    let mut len = [0u8; 8];
    len.copy_from_slice(&file[MAGIC.len()..MAGIC.len() + 8]);
    let expected = u64::from_le_bytes(len);
    let result = file.slice(HEADER..);
    if result.len() as u64 != expected {
        return Err(EntryError::Length {
            expected,
            found: result.len() as u64,
        });
    }
    if blake3::hash(&result).as_bytes()[..] != file[MAGIC.len() + 8..HEADER] {
        return Err(EntryError::Checksum);
    }
    Ok(result)
}

#[cfg(test)]
mod tests {
    use super::*;
    use kiln_proto::reapi::ActionResult;
    use prost::Message;

    fn result() -> Vec<u8> {
        ActionResult {
            exit_code: 3,
            stdout_raw: b"some output".to_vec().into(),
            ..Default::default()
        }
        .encode_to_vec()
    }

    #[test]
    fn an_entry_reads_back_as_its_result() {
        let r = result();
        assert_eq!(decode(encode(&r).into()).unwrap(), Bytes::from(r));
        // An empty result (a legitimate encoding) has a header, so it is not an empty file.
        assert_eq!(decode(encode(b"").into()).unwrap(), Bytes::new());
    }

    /// Every way a crash can cut a file short is refused, including the empty file and a
    /// header alone — each of which protobuf would decode as a (successful) result.
    #[test]
    fn every_cut_of_an_entry_is_refused() {
        let file = encode(&result());
        for len in 0..file.len() {
            let cut = Bytes::copy_from_slice(&file[..len]);
            assert!(decode(cut).is_err(), "cut to {len} of {} bytes", file.len());
        }
        assert_eq!(
            ActionResult::decode(&b""[..]).unwrap().exit_code,
            0,
            "what an empty file would have been served as"
        );
    }

    /// Past the format's name (a file whose name is damaged is read as one from before the
    /// format: the name is what tells the two apart).
    #[test]
    fn a_changed_byte_past_the_name_is_refused() {
        let file = encode(&result());
        for at in NAME..file.len() {
            let mut damaged = file.clone();
            damaged[at] ^= 0x20;
            let decoded = decode(damaged.into());
            assert!(decoded.is_err(), "byte {at} changed: {decoded:?}");
        }
    }

    /// What a version before the format makes of a new entry (after a downgrade): it does
    /// not decode, so that version drops it as a miss rather than serving something.
    #[test]
    fn an_earlier_version_cannot_misread_an_entry() {
        assert!(ActionResult::decode(&encode(&result())[..]).is_err());
        assert!(ActionResult::decode(&encode(b"")[..]).is_err());
    }

    #[test]
    fn another_version_is_named_not_misread() {
        let mut file = encode(&result());
        file[MAGIC.len() - 1] = 9;
        assert_eq!(decode(file.into()), Err(EntryError::Version(9)));
    }

    #[test]
    fn an_entry_from_before_the_format_is_read_as_it_is() {
        let r = result();
        assert_ne!(r[0], MAGIC[0]);
        assert_eq!(decode(r.clone().into()).unwrap(), Bytes::from(r));
        // No encoded ActionResult can start like the header: its first byte would be a
        // group start of field 9, which ActionResult does not have.
        assert_eq!(MAGIC[0] & 7, 3, "wire type 3 (start group)");
        assert_eq!(MAGIC[0] >> 3, 9);
    }
}
