//! The hash functions Kiln verifies blobs with.

use super::DigestError;
use kiln_proto::reapi::digest_function::Value as ProtoFunction;

/// A supported digest function. Both produce 32-byte hashes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum DigestFunction {
    /// SHA-256 (the REAPI default).
    Sha256,
    /// BLAKE3 with 32-byte output.
    Blake3,
}

impl DigestFunction {
    /// Every supported function, in the order Kiln advertises them.
    pub const ALL: [DigestFunction; 2] = [DigestFunction::Sha256, DigestFunction::Blake3];

    /// Length of a hash in bytes.
    pub const HASH_LEN: usize = 32;

    /// The lowercase name used in resource names and on disk (`sha256`, `blake3`).
    pub fn name(self) -> &'static str {
        match self {
            DigestFunction::Sha256 => "sha256",
            DigestFunction::Blake3 => "blake3",
        }
    }

    /// The REAPI enum value.
    pub fn proto(self) -> ProtoFunction {
        match self {
            DigestFunction::Sha256 => ProtoFunction::Sha256,
            DigestFunction::Blake3 => ProtoFunction::Blake3,
        }
    }

    /// Parses a name as it appears in a ByteStream resource name. `Ok(None)` means the segment
    /// is not a digest function name at all (so it is the hash).
    pub fn from_resource_segment(segment: &str) -> Result<Option<DigestFunction>, DigestError> {
        match segment {
            "sha256" => Ok(Some(DigestFunction::Sha256)),
            "blake3" => Ok(Some(DigestFunction::Blake3)),
            "sha1" | "md5" | "vso" | "sha384" | "sha512" | "murmur3" | "sha256tree" | "gitsha1" => {
                Err(DigestError::UnsupportedFunction(segment.to_string()))
            }
            _ => Ok(None),
        }
    }

    /// Resolves a request's `digest_function` field. `UNKNOWN` (unset) means the client relies
    /// on inference from the hash length, as the spec allows for the older functions: a 64-digit
    /// hash is SHA-256, anything else names a function Kiln does not support.
    pub fn from_request(value: i32, hash_hex_len: usize) -> Result<DigestFunction, DigestError> {
        let function =
            ProtoFunction::try_from(value).map_err(|_| DigestError::UnknownFunction(value))?;
        match function {
            ProtoFunction::Sha256 => Ok(DigestFunction::Sha256),
            ProtoFunction::Blake3 => Ok(DigestFunction::Blake3),
            ProtoFunction::Unknown => match hash_hex_len {
                64 => Ok(DigestFunction::Sha256),
                32 => Err(DigestError::UnsupportedFunction(
                    "md5 (inferred from a 32-digit hash)".into(),
                )),
                40 => Err(DigestError::UnsupportedFunction(
                    "sha1 (inferred from a 40-digit hash)".into(),
                )),
                96 => Err(DigestError::UnsupportedFunction(
                    "sha384 (inferred from a 96-digit hash)".into(),
                )),
                128 => Err(DigestError::UnsupportedFunction(
                    "sha512 (inferred from a 128-digit hash)".into(),
                )),
                _ => Err(DigestError::BadHash {
                    hash: format!("<{hash_hex_len} digits>"),
                    expected: 64,
                }),
            },
            other => Err(DigestError::UnsupportedFunction(
                other.as_str_name().to_ascii_lowercase(),
            )),
        }
    }

    /// The hash of the empty blob, which every CAS holds implicitly.
    pub fn empty_hash(self) -> [u8; 32] {
        super::Hasher::new(self).finalize()
    }
}

impl std::fmt::Display for DigestFunction {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}
