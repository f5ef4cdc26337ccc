//! The check of a stored blob's bytes against its digest (sans-IO): fed the bytes in order,
//! it says whether they are the blob's.

use kiln_reapi::digest::{BlobKey, Hasher};

/// A check in progress.
pub struct Check {
    hasher: Hasher,
    expected: [u8; 32],
    seen: u64,
    size: u64,
    done: Option<[u8; 32]>,
}

impl Check {
    /// Starts checking the blob `key`.
    pub fn new(key: &BlobKey) -> Check {
        Check {
            hasher: Hasher::new(key.digest.function),
            expected: key.digest.hash,
            seen: 0,
            size: key.digest.size,
            done: None,
        }
    }

    /// A check whose whole-blob hash was computed elsewhere (with [`Check::into_hasher`]).
    pub fn finished(key: &BlobKey, hash: [u8; 32]) -> Check {
        Check {
            seen: key.digest.size,
            done: Some(hash),
            ..Check::new(key)
        }
    }

    /// The blob's size (the digest's).
    pub fn size(&self) -> u64 {
        self.size
    }

    /// The next bytes of the blob.
    pub fn update(&mut self, data: &[u8]) {
        self.hasher.update(data);
        self.seen = self.seen.saturating_add(data.len() as u64);
    }

    /// The hasher, for code that reads the file itself.
    pub fn into_hasher(self) -> Hasher {
        self.hasher
    }

    /// Whether exactly the digest's size was fed and it hashes to the digest.
    pub fn matches(self) -> bool {
        let hash = match self.done {
            Some(h) => h,
            None => self.hasher.finalize(),
        };
        self.seen == self.size && hash == self.expected
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kiln_reapi::digest::{Digest, DigestFunction, InstanceName};

    fn key(data: &[u8], f: DigestFunction) -> BlobKey {
        BlobKey::new(InstanceName::default_instance(), Digest::of(f, data))
    }

    #[test]
    fn matches_only_the_blobs_own_bytes_in_full() {
        for f in DigestFunction::ALL {
            let k = key(b"hello, kiln", f);
            let mut c = Check::new(&k);
            c.update(b"hello, ");
            c.update(b"kiln");
            assert!(c.matches());
            let mut c = Check::new(&k);
            c.update(b"hello, kilN");
            assert!(!c.matches(), "other bytes");
            let mut c = Check::new(&k);
            c.update(b"hello");
            assert!(!c.matches(), "a prefix");
        }
    }

    #[test]
    fn a_hash_computed_elsewhere_is_compared_too() {
        let k = key(b"abc", DigestFunction::Sha256);
        assert!(Check::finished(&k, k.digest.hash).matches());
        assert!(!Check::finished(&k, [0; 32]).matches());
    }
}
