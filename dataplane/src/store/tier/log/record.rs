//! One record of a log segment: a header naming the blob, then the blob's bytes. The header
//! carries its own checksum and one of the bytes, so a start-up scan tells a whole record from
//! a torn tail or a batch a crash left unwritten; the bytes are also checked against the
//! digest when first read (as every blob found on disk is).
//!
//! ```text
//! magic "KLB2" | function u8 | instance length u16 | size u64 | bytes' crc32 u32 | hash [32]
//!   | instance | crc32 u32
//! ```
//! (integers little-endian; the last CRC covers everything before it).

use kiln_reapi::digest::{BlobKey, Digest, DigestFunction, InstanceName};

const MAGIC: &[u8; 4] = b"KLB2";
/// Header bytes before the instance name.
const FIXED: usize = 4 + 1 + 2 + 8 + 4 + 32;

/// The header of `key`'s record, whose bytes are `data`.
pub fn header(key: &BlobKey, data: &[u8]) -> Vec<u8> {
    with_crc(key, crc32fast::hash(data))
}

/// The header of `key`'s record, whose bytes' CRC is `data_crc`.
pub fn with_crc(key: &BlobKey, data_crc: u32) -> Vec<u8> {
    let instance = key.instance.as_str().as_bytes();
    let mut out = Vec::with_capacity(FIXED + instance.len() + 4);
    out.extend_from_slice(MAGIC);
    out.push(match key.digest.function {
        DigestFunction::Sha256 => 0,
        DigestFunction::Blake3 => 1,
    });
    // Instance names are bounded far below 64 KiB when parsed; a longer one cannot be logged.
    let len = u16::try_from(instance.len()).unwrap_or(u16::MAX);
    out.extend_from_slice(&len.to_le_bytes());
    out.extend_from_slice(&key.digest.size.to_le_bytes());
    out.extend_from_slice(&data_crc.to_le_bytes());
    out.extend_from_slice(&key.digest.hash);
    out.extend_from_slice(&instance[..usize::from(len)]);
    let crc = crc32fast::hash(&out);
    out.extend_from_slice(&crc.to_le_bytes());
    out
}

/// What the bytes at a record's start say.
#[derive(Debug, PartialEq, Eq)]
pub enum Parsed {
    /// A whole header: the blob's key, the header's length (its bytes follow) and their CRC.
    Record {
        key: BlobKey,
        header_len: usize,
        data_crc: u32,
    },
    /// Too few bytes to tell: read more (or, at the end of the file, a torn tail).
    Short { need: usize },
    /// Not a record: a torn or damaged header.
    Bad,
}

/// Parses the header at the start of `bytes`.
pub fn parse(bytes: &[u8]) -> Parsed {
    if bytes.len() < FIXED {
        return Parsed::Short { need: FIXED };
    }
    if &bytes[..4] != MAGIC {
        return Parsed::Bad;
    }
    let function = match bytes[4] {
        0 => DigestFunction::Sha256,
        1 => DigestFunction::Blake3,
        _ => return Parsed::Bad,
    };
    let instance_len = usize::from(u16::from_le_bytes([bytes[5], bytes[6]]));
    let header_len = FIXED + instance_len + 4;
    if bytes.len() < header_len {
        return Parsed::Short { need: header_len };
    }
    let body = &bytes[..header_len - 4];
    let mut crc = [0u8; 4];
    crc.copy_from_slice(&bytes[header_len - 4..header_len]);
    if crc32fast::hash(body) != u32::from_le_bytes(crc) {
        return Parsed::Bad;
    }
    let mut size = [0u8; 8];
    size.copy_from_slice(&bytes[7..15]);
    let mut data_crc = [0u8; 4];
    data_crc.copy_from_slice(&bytes[15..19]);
    let mut hash = [0u8; 32];
    hash.copy_from_slice(&bytes[19..FIXED]);
    let Ok(name) = std::str::from_utf8(&bytes[FIXED..FIXED + instance_len]) else {
        return Parsed::Bad;
    };
    let Ok(instance) = InstanceName::new(name) else {
        return Parsed::Bad;
    };
    let digest = Digest {
        function,
        hash,
        size: u64::from_le_bytes(size),
    };
    Parsed::Record {
        key: BlobKey::new(instance, digest),
        header_len,
        data_crc: u32::from_le_bytes(data_crc),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(instance: &str, data: &[u8], function: DigestFunction) -> BlobKey {
        BlobKey::new(
            InstanceName::new(instance).unwrap(),
            Digest::of(function, data),
        )
    }

    #[test]
    fn a_header_parses_back_to_its_key() {
        for k in [
            key("", b"hello", DigestFunction::Sha256),
            key("main/linux", b"other", DigestFunction::Blake3),
        ] {
            let data = b"the blob's bytes follow";
            let h = header(&k, data);
            let mut bytes = h.clone();
            bytes.extend_from_slice(data);
            assert_eq!(
                parse(&bytes),
                Parsed::Record {
                    key: k.clone(),
                    header_len: h.len(),
                    data_crc: crc32fast::hash(data),
                }
            );
        }
    }

    #[test]
    fn a_torn_or_damaged_header_is_told_apart() {
        let h = header(&key("ci", b"data", DigestFunction::Sha256), b"data");
        for cut in 0..h.len() {
            assert!(
                matches!(parse(&h[..cut]), Parsed::Short { need } if need > cut),
                "cut at {cut}"
            );
        }
        for at in 0..h.len() {
            let mut damaged = h.clone();
            damaged[at] ^= 0x40;
            assert!(
                matches!(parse(&damaged), Parsed::Bad | Parsed::Short { .. }),
                "flipped byte {at}: {:?}",
                parse(&damaged)
            );
            assert!(!matches!(parse(&damaged), Parsed::Record { .. }));
        }
        assert_eq!(parse(&[0u8; 64]), Parsed::Bad, "zeros (a sparse tail)");
    }
}
