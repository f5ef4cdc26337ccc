//! The rules of one ByteStream upload (sans-IO): offsets must continue exactly where the last
//! message ended, data may not run past the digest's size, and `finish_write` is accepted only
//! when every byte has arrived and hashes to the digest. Hashing happens here, as bytes arrive,
//! with the digest's own function.

use kiln_reapi::digest::{Digest, Hasher};

/// Why an upload message was refused. All are the client's fault (`INVALID_ARGUMENT`).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum UploadError {
    /// `write_offset` is not where the previous data ended.
    #[error("write_offset {got} does not continue the upload at {expected}")]
    Offset { expected: u64, got: i64 },
    /// More data than the digest's size.
    #[error("upload carries {got} bytes, more than the digest's size {size}")]
    TooMuchData { size: u64, got: u64 },
    /// `finish_write` before all bytes arrived.
    #[error("finish_write after {got} bytes, but the digest's size is {size}")]
    TooLittleData { size: u64, got: u64 },
    /// The bytes do not hash to the digest.
    #[error("uploaded bytes hash to {actual}, not to the digest {expected}")]
    HashMismatch { expected: Digest, actual: String },
    /// A message after `finish_write`.
    #[error("message after finish_write")]
    AfterFinish,
    /// Compressed data that does not decompress to the blob (see
    /// [`super::compressed_upload`]).
    #[error(transparent)]
    Inflate(#[from] kiln_reapi::compression::InflateError),
}

/// Progress of one upload.
#[derive(Debug, Clone)]
pub struct UploadState {
    digest: Digest,
    committed: u64,
    hasher: Hasher,
    finished: bool,
}

impl UploadState {
    /// A new upload of `digest` from offset zero.
    pub fn new(digest: Digest) -> UploadState {
        UploadState {
            digest,
            committed: 0,
            hasher: Hasher::new(digest.function),
            finished: false,
        }
    }

    /// Continues a parked upload.
    pub fn resume(digest: Digest, committed: u64, hasher: Hasher) -> UploadState {
        UploadState {
            digest,
            committed,
            hasher,
            finished: false,
        }
    }

    /// Bytes accepted so far.
    pub fn committed(&self) -> u64 {
        self.committed
    }

    /// The digest being uploaded.
    pub fn digest(&self) -> Digest {
        self.digest
    }

    /// True once a valid `finish_write` was accepted.
    pub fn is_finished(&self) -> bool {
        self.finished
    }

    /// Checks one message's offset and length and hashes its data. The caller writes the data
    /// at the returned offset. With `finish`, also checks size and hash.
    pub fn accept(
        &mut self,
        write_offset: i64,
        data: &[u8],
        finish: bool,
    ) -> Result<u64, UploadError> {
        if self.finished {
            return Err(UploadError::AfterFinish);
        }
        if write_offset < 0 || write_offset as u64 != self.committed {
            return Err(UploadError::Offset {
                expected: self.committed,
                got: write_offset,
            });
        }
        let end = self.committed + data.len() as u64;
        if end > self.digest.size {
            return Err(UploadError::TooMuchData {
                size: self.digest.size,
                got: end,
            });
        }
        let at = self.committed;
        self.hasher.update(data);
        self.committed = end;
        if finish {
            self.check_complete()?;
            self.finished = true;
        }
        Ok(at)
    }

    fn check_complete(&self) -> Result<(), UploadError> {
        if self.committed != self.digest.size {
            return Err(UploadError::TooLittleData {
                size: self.digest.size,
                got: self.committed,
            });
        }
        let actual = self.hasher.clone().finalize();
        if actual != self.digest.hash {
            return Err(UploadError::HashMismatch {
                expected: self.digest,
                actual: hex::encode(actual),
            });
        }
        Ok(())
    }

    /// The hashing state, for parking an interrupted upload.
    pub fn into_parts(self) -> (u64, Hasher) {
        (self.committed, self.hasher)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kiln_reapi::digest::DigestFunction;

    #[test]
    fn accepts_a_chunked_upload() {
        for f in DigestFunction::ALL {
            let data = b"hello, kiln".to_vec();
            let mut u = UploadState::new(Digest::of(f, &data));
            assert_eq!(u.accept(0, &data[..5], false), Ok(0));
            assert_eq!(u.accept(5, &data[5..], true), Ok(5));
            assert!(u.is_finished());
            assert_eq!(u.accept(11, b"", false), Err(UploadError::AfterFinish));
        }
    }

    #[test]
    fn resumes_from_parked_state() {
        let data = vec![9u8; 1000];
        let mut u = UploadState::new(Digest::of(DigestFunction::Sha256, &data));
        u.accept(0, &data[..400], false).unwrap();
        let digest = u.digest();
        let (committed, hasher) = u.into_parts();
        let mut r = UploadState::resume(digest, committed, hasher);
        assert!(matches!(
            r.accept(0, &data, false),
            Err(UploadError::Offset {
                expected: 400,
                got: 0
            })
        ));
        assert_eq!(r.accept(400, &data[400..], true), Ok(400));
    }

    #[test]
    fn refuses_bad_offsets_sizes_and_hashes() {
        let data = vec![1u8; 10];
        let d = Digest::of(DigestFunction::Blake3, &data);
        let mut u = UploadState::new(d);
        assert!(matches!(
            u.accept(-1, &data, false),
            Err(UploadError::Offset { .. })
        ));
        assert!(matches!(
            u.accept(3, &data, false),
            Err(UploadError::Offset { .. })
        ));
        assert!(matches!(
            u.accept(0, &[0u8; 11], false),
            Err(UploadError::TooMuchData { .. })
        ));
        let mut u = UploadState::new(d);
        assert!(matches!(
            u.accept(0, &data[..9], true),
            Err(UploadError::TooLittleData { .. })
        ));
        let mut u = UploadState::new(d);
        assert!(matches!(
            u.accept(0, &[2u8; 10], true),
            Err(UploadError::HashMismatch { .. })
        ));
        // A BLAKE3 digest is checked with BLAKE3: the same bytes under SHA-256 do not match.
        let mut u = UploadState::new(Digest {
            function: DigestFunction::Sha256,
            ..d
        });
        assert!(matches!(
            u.accept(0, &data, true),
            Err(UploadError::HashMismatch { .. })
        ));
    }
}
