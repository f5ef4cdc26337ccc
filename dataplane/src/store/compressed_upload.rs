//! The rules of one compressed ByteStream upload (sans-IO), as REAPI gives them for
//! `uploads/{uuid}/compressed-blobs/zstd/…`: the first message's `write_offset` is where the
//! uncompressed blob resumes (the upload's committed bytes); every later one is that offset
//! plus the compressed bytes sent before it. The data is decompressed one chunk at a time into
//! the upload's [`UploadState`](super::upload::UploadState), which hashes and checks it; the
//! blob's declared size bounds what decompression may produce.

use super::upload::UploadError;
use bytes::Bytes;
use kiln_reapi::compression::Inflater;

/// Decompression and offsets of one compressed upload stream.
pub struct CompressedUpload {
    inflater: Inflater,
    /// The offset the next message must carry; `None` before the first.
    next: Option<u64>,
}

impl CompressedUpload {
    /// A stream resuming the blob of `size` bytes at `committed`, decompressed `chunk` bytes at
    /// a time, refusing windows above 2^`max_window_log`.
    pub fn new(
        committed: u64,
        size: u64,
        chunk: usize,
        max_window_log: u32,
    ) -> Result<CompressedUpload, UploadError> {
        let left = size.saturating_sub(committed);
        Ok(CompressedUpload {
            inflater: Inflater::new(left, chunk, max_window_log)?,
            next: None,
        })
    }

    /// Checks one message's offset and takes its compressed data; `committed` is the
    /// uncompressed bytes the upload holds. Drain [`CompressedUpload::next_chunk`] before
    /// the next message.
    pub fn push(
        &mut self,
        committed: u64,
        write_offset: i64,
        data: Bytes,
    ) -> Result<(), UploadError> {
        let expected = self.next.unwrap_or(committed);
        if write_offset < 0 || write_offset as u64 != expected {
            return Err(UploadError::Offset {
                expected,
                got: write_offset,
            });
        }
        // Offsets are i64 on the wire; a stream that would overflow them is refused.
        let next = expected
            .checked_add(data.len() as u64)
            .filter(|n| *n <= i64::MAX as u64)
            .ok_or(UploadError::Offset {
                expected,
                got: write_offset,
            })?;
        self.next = Some(next);
        self.inflater.push(data);
        Ok(())
    }

    /// The next decompressed piece (at most one chunk), or `None` when the message is used up.
    pub fn next_chunk(&mut self) -> Result<Option<Bytes>, UploadError> {
        Ok(self.inflater.next_chunk()?)
    }

    /// At `finish_write`: the compressed data must have ended at the end of a zstd frame.
    pub fn finish(&self) -> Result<(), UploadError> {
        Ok(self.inflater.finish()?)
    }

    /// The `committed_size` a finished compressed upload answers: the first offset plus the
    /// compressed bytes received (the spec's mixed offset, which clients check).
    pub fn committed_size(&self) -> i64 {
        self.next.unwrap_or(0) as i64
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::upload::UploadState;
    use kiln_reapi::compression::{compress, InflateError};
    use kiln_reapi::digest::{Digest, DigestFunction};

    /// Feeds `messages` (offset, data) and returns the decompressed bytes and the state.
    fn run(
        state: &mut UploadState,
        z: &mut CompressedUpload,
        messages: &[(i64, Bytes)],
    ) -> Result<Vec<u8>, UploadError> {
        let mut out = Vec::new();
        for (offset, data) in messages {
            z.push(state.committed(), *offset, data.clone())?;
            while let Some(piece) = z.next_chunk()? {
                assert!(piece.len() <= 1000);
                state.accept(state.committed() as i64, &piece, false)?;
                out.extend_from_slice(&piece);
            }
        }
        z.finish()?;
        state.accept(state.committed() as i64, &[], true)?;
        Ok(out)
    }

    fn blob() -> Vec<u8> {
        (0..20_000u32)
            .flat_map(|i| (i % 251).to_le_bytes())
            .collect()
    }

    #[test]
    fn offsets_are_uncompressed_first_then_compressed() {
        let data = blob();
        let packed = compress(3, &data).unwrap();
        let (a, b) = packed.split_at(packed.len() / 2);
        let mut state = UploadState::new(Digest::of(DigestFunction::Sha256, &data));
        let mut z = CompressedUpload::new(0, data.len() as u64, 1000, 23).unwrap();
        let messages = [
            (0, Bytes::copy_from_slice(a)),
            (a.len() as i64, Bytes::copy_from_slice(b)),
        ];
        assert_eq!(run(&mut state, &mut z, &messages).unwrap(), data);
        assert_eq!(z.committed_size(), packed.len() as i64);
    }

    #[test]
    fn a_resumed_stream_starts_a_new_frame_at_the_uncompressed_offset() {
        let data = blob();
        let digest = Digest::of(DigestFunction::Blake3, &data);
        let mut first = UploadState::new(digest);
        first.accept(0, &data[..30_000], false).unwrap();
        let (committed, hasher) = first.into_parts();
        let mut state = UploadState::resume(digest, committed, hasher);
        let rest = compress(1, &data[30_000..]).unwrap();
        let mut z = CompressedUpload::new(committed, data.len() as u64, 1000, 23).unwrap();
        assert!(matches!(
            z.push(committed, 0, rest.clone()),
            Err(UploadError::Offset {
                expected: 30_000,
                got: 0
            })
        ));
        let out = run(&mut state, &mut z, &[(30_000, rest.clone())]).unwrap();
        assert_eq!(out, &data[30_000..]);
        assert_eq!(z.committed_size(), 30_000 + rest.len() as i64);
    }

    #[test]
    fn bad_offsets_and_bad_data_are_refused() {
        let data = blob();
        let packed = compress(1, &data).unwrap();
        let digest = Digest::of(DigestFunction::Sha256, &data);
        let size = data.len() as u64;
        // The second message repeats the uncompressed offset instead of the compressed one.
        let mut state = UploadState::new(digest);
        let mut z = CompressedUpload::new(0, size, 1000, 23).unwrap();
        let messages = [(0, packed.slice(..10)), (0, packed.slice(10..))];
        assert!(matches!(
            run(&mut state, &mut z, &messages),
            Err(UploadError::Offset {
                expected: 10,
                got: 0
            })
        ));
        // Data for a smaller blob than declared: the size check at the end refuses it.
        let mut state = UploadState::new(digest);
        let mut z = CompressedUpload::new(0, size, 1000, 23).unwrap();
        let short = compress(1, &data[..100]).unwrap();
        assert!(matches!(
            run(&mut state, &mut z, &[(0, short)]),
            Err(UploadError::TooLittleData { .. })
        ));
        // Data for a larger blob than declared stops at the declared size.
        let small = Digest::of(DigestFunction::Sha256, &data[..100]);
        let mut state = UploadState::new(small);
        let mut z = CompressedUpload::new(0, 100, 1000, 23).unwrap();
        assert!(matches!(
            run(&mut state, &mut z, &[(0, packed.clone())]),
            Err(UploadError::Inflate(InflateError::TooLong { size: 100 }))
        ));
        // A stream cut inside its frame is not finished.
        let mut state = UploadState::new(digest);
        let mut z = CompressedUpload::new(0, size, 1000, 23).unwrap();
        assert!(matches!(
            run(&mut state, &mut z, &[(0, packed.slice(..packed.len() - 1))]),
            Err(UploadError::Inflate(InflateError::Truncated))
        ));
    }
}
