//! Incremental hashing with either supported function.

use super::DigestFunction;
use sha2::Digest as _;

/// An incremental hasher; `Clone` so an interrupted upload can park its state and resume.
#[derive(Clone)]
pub enum Hasher {
    /// SHA-256 state.
    Sha256(sha2::Sha256),
    /// BLAKE3 state (boxed: it is large).
    Blake3(Box<blake3::Hasher>),
}

impl Hasher {
    /// A fresh hasher for `function`.
    pub fn new(function: DigestFunction) -> Hasher {
        match function {
            DigestFunction::Sha256 => Hasher::Sha256(sha2::Sha256::new()),
            DigestFunction::Blake3 => Hasher::Blake3(Box::new(blake3::Hasher::new())),
        }
    }

    /// Feeds bytes.
    pub fn update(&mut self, data: &[u8]) {
        match self {
            Hasher::Sha256(h) => h.update(data),
            Hasher::Blake3(h) => {
                h.update(data);
            }
        }
    }

    /// The final 32-byte hash.
    pub fn finalize(self) -> [u8; 32] {
        match self {
            Hasher::Sha256(h) => h.finalize().into(),
            Hasher::Blake3(h) => *h.finalize().as_bytes(),
        }
    }

    /// Hashes `data` in one call.
    pub fn hash(function: DigestFunction, data: &[u8]) -> [u8; 32] {
        let mut h = Hasher::new(function);
        h.update(data);
        h.finalize()
    }
}

impl std::fmt::Debug for Hasher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Hasher::Sha256(_) => "Hasher(sha256)",
            Hasher::Blake3(_) => "Hasher(blake3)",
        })
    }
}
