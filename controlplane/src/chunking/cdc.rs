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

    /// The spec's test vectors (`fastcdc2020_test_vectors.txt` beside `remote_execution.proto`):
    /// offset, length, SHA-256 and the gear hash at the boundary of each chunk of its test
    /// image (`tests/fixtures/SekienAkashita.jpg`, from the fastcdc-rs repository the spec
    /// points to), cut with an average of 16 KiB and seeds 0 and 666.
    #[test]
    fn the_spec_test_vectors_cut_alike() {
        /// Offset, length, SHA-256, gear hash.
        type Chunk = (u64, usize, &'static str, u64);
        const VECTORS: [(u32, [Chunk; 6]); 2] = [
            (
                0,
                [
                    (
                        0,
                        19186,
                        "0f9efa589121d5d9e9e2c4ace91337d77cae866537143f6f15a0ffd525a77c2d",
                        17583755766661134474,
                    ),
                    (
                        19186,
                        19279,
                        "c7c86a165573c16448cda35c9169742e85645af42be22889f8b96b8ee0ec7cb0",
                        4098594969649699419,
                    ),
                    (
                        38465,
                        17354,
                        "bc88521e28a8b4479cdea5f75aa721a24f3a0a7d0be903aa6d505c574e51e89d",
                        2365586132076908760,
                    ),
                    (
                        55819,
                        16387,
                        "4b8dac2652e4685c629d2bb1ae9d4448e676b86f2e67ca0b2fff3d9580184b79",
                        16009206469796846404,
                    ),
                    (
                        72206,
                        19940,
                        "c0a7062da6f2386c28e086ee0cedd5732252741269838773cff1ddb05b2df6ed",
                        2473608525189754172,
                    ),
                    (
                        92146,
                        17320,
                        "7fa5b12134dc75cd2ac8dc60d3a8f3c8d22f0ee9d4cf74a4aa937e2a0d2d79a5",
                        2504464741100432583,
                    ),
                ],
            ),
            (
                666,
                [
                    (
                        0,
                        17635,
                        "cb3a9d80a3569772d4ed331ca37ab0c862c759897b890fc1aac90a4f2ea3a407",
                        17021115692437263050,
                    ),
                    (
                        17635,
                        17334,
                        "d758c6b7b0b7eef1e996f8ccd17de6c645360b03a26c35541e7581348ac08944",
                        8231525949846907466,
                    ),
                    (
                        34969,
                        19136,
                        "24846aefd89e510594bae3e9d7d5ea5012067601512610fed126a3c57ba993f5",
                        10944310959829698982,
                    ),
                    (
                        54105,
                        17467,
                        "efa785e1fefb49f190e665f72fd246c1442079874508c312196da1fb3040d00b",
                        13602876513398592944,
                    ),
                    (
                        71572,
                        23593,
                        "a2f557bdd8d40d8faada963ad5f91ec54b10ccee7c5ae72754a65137592dc607",
                        2945079350535657389,
                    ),
                    (
                        95165,
                        14301,
                        "e131100b4a7147ccad19dc63c4a2fac1f5d8b644e1373eeb6803825024234efc",
                        8981594897574481255,
                    ),
                ],
            ),
        ];
        let path = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../tests/fixtures/SekienAkashita.jpg"
        );
        let image = std::fs::read(path).unwrap();
        assert_eq!(image.len(), 109_466);
        for (seed, expected) in VECTORS {
            let params = ChunkParams { avg: 16384, seed };
            let cut: Vec<(u64, usize, String, u64)> = params
                .chunks(&image[..])
                .map(|c| {
                    let c = c.unwrap();
                    let sha = kiln_reapi::digest::Digest::of(
                        kiln_reapi::digest::DigestFunction::Sha256,
                        &c.data,
                    );
                    (c.offset, c.length, sha.hex(), c.hash)
                })
                .collect();
            let expected: Vec<(u64, usize, String, u64)> = expected
                .iter()
                .map(|&(o, l, h, g)| (o, l, h.to_string(), g))
                .collect();
            assert_eq!(cut, expected, "seed {seed}");
        }
    }

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
