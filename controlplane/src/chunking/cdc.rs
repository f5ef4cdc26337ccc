//! FastCDC 2020 as REAPI defines it (`FastCdc2020Params`): the average chunk size from the
//! configuration, the minimum a quarter of it, the maximum four times it, normalization
//! level 2, GEAR tables from the seed — the `fastcdc` crate's `v2020`, which the spec names as
//! a reference implementation.

use fastcdc::v2020::{Normalization, StreamCDC};
use kiln_proto::reapi::FastCdc2020Params;
use std::io::Read;

/// The parameters of the chunking function.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChunkParams {
    /// Average chunk size (a power of two, 1 KiB–1 MiB).
    pub avg: u32,
    /// GEAR seed.
    pub seed: u32,
}

impl ChunkParams {
    /// Smallest chunk (but the last).
    pub fn min(&self) -> u32 {
        self.avg / 4
    }

    /// Largest chunk.
    pub fn max(&self) -> u32 {
        self.avg.saturating_mul(4)
    }

    /// As advertised in the capabilities.
    pub fn proto(&self) -> FastCdc2020Params {
        FastCdc2020Params {
            avg_chunk_size_bytes: u64::from(self.avg),
            seed: self.seed,
        }
    }

    /// The chunks of `source`, read as they are cut.
    pub fn chunks<R: Read>(&self, source: R) -> StreamCDC<R> {
        StreamCDC::with_level_and_seed(
            source,
            self.min(),
            self.avg,
            self.max(),
            Normalization::Level2,
            u64::from(self.seed),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Chunks fall within the bounds, cover the input in order, and the same bytes cut the
    /// same way; a different seed cuts differently.
    #[test]
    fn chunks_are_bounded_contiguous_and_deterministic() {
        let params = ChunkParams { avg: 4096, seed: 0 };
        let mut x = 0x9E37_79B9_7F4A_7C15u64;
        let data: Vec<u8> = (0..200_000)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect();
        let cut = |p: ChunkParams| -> Vec<(u64, usize)> {
            p.chunks(&data[..])
                .map(|c| c.map(|c| (c.offset, c.length)).unwrap())
                .collect()
        };
        let chunks = cut(params);
        assert!(chunks.len() > 10);
        let mut at = 0u64;
        for (i, (offset, len)) in chunks.iter().enumerate() {
            assert_eq!(*offset, at);
            assert!(*len <= params.max() as usize);
            if i + 1 < chunks.len() {
                assert!(*len >= params.min() as usize);
            }
            at += *len as u64;
        }
        assert_eq!(at, data.len() as u64);
        assert_eq!(cut(params), chunks);
        assert_ne!(
            cut(ChunkParams {
                avg: 4096,
                seed: 666
            }),
            chunks
        );
        assert_eq!(params.proto().avg_chunk_size_bytes, 4096);
    }
}
