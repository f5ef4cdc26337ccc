//! Digests: the hash function, the hash, the size; parsing them from requests and hashing bytes.
//!
//! Kiln supports SHA-256 and BLAKE3, both 32-byte hashes written as 64 lowercase hex digits.
//! Everything that names a blob carries its [`DigestFunction`], so the two never mix.

mod error;
mod function;
mod hasher;
mod instance;
mod key;
mod wire;

pub use error::DigestError;
pub use function::DigestFunction;
pub use hasher::Hasher;
pub use instance::{InstanceName, InstanceNameError};
pub use key::{BlobKey, Digest};

#[cfg(test)]
mod tests;
