//! A blob's identity: digest function, hash and size, and the instance it lives in.

use super::{DigestError, DigestFunction, Hasher, InstanceName};
use kiln_proto::reapi;

/// A parsed, validated digest.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Digest {
    /// The function the hash was computed with.
    pub function: DigestFunction,
    /// The 32-byte hash.
    pub hash: [u8; 32],
    /// The blob's size in bytes.
    pub size: u64,
}

impl Digest {
    /// Parses a hex hash and a size under a known function.
    pub fn parse(
        function: DigestFunction,
        hex_hash: &str,
        size: i64,
    ) -> Result<Digest, DigestError> {
        Digest::parse_ascii(function, hex_hash.as_bytes(), size)
    }

    /// [`Digest::parse`] of a hash given as bytes (anything but lowercase hex is refused).
    pub fn parse_ascii(
        function: DigestFunction,
        hex_hash: &[u8],
        size: i64,
    ) -> Result<Digest, DigestError> {
        if size < 0 {
            return Err(DigestError::NegativeSize(size));
        }
        let bad = || DigestError::BadHash {
            hash: String::from_utf8_lossy(&hex_hash[..hex_hash.len().min(80)])
                .chars()
                .take(80)
                .collect(),
            expected: DigestFunction::HASH_LEN * 2,
        };
        if hex_hash.len() != DigestFunction::HASH_LEN * 2 {
            return Err(bad());
        }
        let mut hash = [0u8; 32];
        // SIMD and branch-free: on FindMissingBlobs of 1,000 digests a branching decoder
        // was a third of the server's CPU. Lowercase only, as the spec writes hashes: an
        // uppercase hash would come back lowercase in answers and match nothing the client
        // holds.
        faster_hex::hex_decode(hex_hash, &mut hash).map_err(|_| bad())?;
        // Every byte is a hex digit now; of those only 'A'..='F' lack bit 0x20, so one AND
        // over the bytes (which the compiler vectorises) finds an uppercase digit.
        if hex_hash.iter().fold(0xff, |all, b| all & b) & 0x20 == 0 {
            return Err(bad());
        }
        Ok(Digest {
            function,
            hash,
            size: size as u64,
        })
    }

    /// Parses a REAPI digest whose function comes from the request's `digest_function` field
    /// (inferred from the hash length when unset).
    pub fn from_proto(digest: &reapi::Digest, digest_function: i32) -> Result<Digest, DigestError> {
        let function = DigestFunction::from_request(digest_function, digest.hash.len())?;
        Digest::parse(function, &digest.hash, digest.size_bytes)
    }

    /// Parses an optional REAPI digest field.
    pub fn from_proto_field(
        digest: Option<&reapi::Digest>,
        digest_function: i32,
    ) -> Result<Digest, DigestError> {
        Digest::from_proto(digest.ok_or(DigestError::Missing)?, digest_function)
    }

    /// The digest of `data` under `function`.
    pub fn of(function: DigestFunction, data: &[u8]) -> Digest {
        Digest {
            function,
            hash: Hasher::hash(function, data),
            size: data.len() as u64,
        }
    }

    /// The REAPI form.
    pub fn to_proto(&self) -> reapi::Digest {
        reapi::Digest {
            hash: self.hex(),
            size_bytes: self.size as i64,
        }
    }

    /// The hash as lowercase hex.
    pub fn hex(&self) -> String {
        faster_hex::hex_string(&self.hash)
    }

    /// True for the empty blob, which is always present.
    pub fn is_empty_blob(&self) -> bool {
        self.size == 0 && self.hash == self.function.empty_hash()
    }

    /// Bits used to pick the shard that owns this digest (independent of the on-disk fan-out,
    /// which uses the first byte).
    pub fn shard_bits(&self) -> u64 {
        let mut b = [0u8; 8];
        b.copy_from_slice(&self.hash[8..16]);
        u64::from_le_bytes(b)
    }
}

impl std::fmt::Display for Digest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:{}/{}", self.function, self.hex(), self.size)
    }
}

impl std::fmt::Debug for Digest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::Display::fmt(self, f)
    }
}

/// A blob in one instance's CAS.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct BlobKey {
    /// The instance the blob was stored under.
    pub instance: InstanceName,
    /// The blob's digest.
    pub digest: Digest,
}

impl BlobKey {
    /// Pairs an instance with a digest.
    pub fn new(instance: InstanceName, digest: Digest) -> BlobKey {
        BlobKey { instance, digest }
    }
}

impl std::fmt::Debug for BlobKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:?}/{}", self.instance, self.digest)
    }
}
