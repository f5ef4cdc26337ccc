//! Rendezvous (highest random weight) hashing: each digest goes to the shard that scores
//! highest for it, each shard's score a hash of its name and the digest scaled by its weight
//! (`-weight / ln(u)`, `u` uniform in (0, 1)), so that shards get blobs in proportion to their
//! weights and adding or removing a shard moves only the blobs that go to, or came from, it.
//! A shard's name is its identity: renaming one (another address for the same server) moves
//! its blobs. Sans-IO.
//!
//! The digest's hash is already uniform (SHA-256, BLAKE3), so a shard's score mixes its first
//! eight bytes with the shard's seed (a hash of its name, made once) by SplitMix64: a few
//! nanoseconds per shard, so placing many digests costs the data plane's core little.

/// Each shard's seed and weight, for [`owner_seeded`], from (name, weight).
pub fn seeds(shards: &[(String, u32)]) -> Vec<(u64, u32)> {
    shards
        .iter()
        .map(|(name, weight)| {
            let mut first = [0u8; 8];
            first.copy_from_slice(&blake3::hash(name.as_bytes()).as_bytes()[..8]);
            (u64::from_le_bytes(first), *weight)
        })
        .collect()
}

/// The index in `shards` (name, weight) of the shard that holds the blob of `hash`.
pub fn owner(hash: &[u8; 32], shards: &[(String, u32)]) -> usize {
    owner_seeded(hash, &seeds(shards))
}

/// [`owner`] with the shards' seeds made beforehand; 0 when there is one shard.
pub fn owner_seeded(hash: &[u8; 32], seeds: &[(u64, u32)]) -> usize {
    if seeds.len() <= 1 {
        return 0;
    }
    let mut first = [0u8; 8];
    first.copy_from_slice(&hash[..8]);
    let key = u64::from_le_bytes(first);
    let mut best = (f64::NEG_INFINITY, 0);
    for (i, (seed, weight)) in seeds.iter().enumerate() {
        // 53 random bits, strictly inside (0, 1).
        let u = ((mix(key ^ seed) >> 11) as f64 + 0.5) / (1u64 << 53) as f64;
        let score = -f64::from(*weight) / u.ln();
        if score > best.0 {
            best = (score, i);
        }
    }
    best.1
}

/// SplitMix64's finaliser.
fn mix(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    x ^ (x >> 31)
}

#[cfg(test)]
mod tests {
    use super::owner;

    fn hashes(n: u32) -> Vec<[u8; 32]> {
        (0..n)
            .map(|i| *blake3::hash(&i.to_le_bytes()).as_bytes())
            .collect()
    }

    fn shards(list: &[(&str, u32)]) -> Vec<(String, u32)> {
        list.iter().map(|(n, w)| (n.to_string(), *w)).collect()
    }

    #[test]
    fn blobs_spread_in_proportion_to_the_weights() {
        let s = shards(&[("a", 1), ("b", 2), ("c", 1)]);
        let mut counts = [0u32; 3];
        for h in hashes(40_000) {
            counts[owner(&h, &s)] += 1;
        }
        let shares: Vec<f64> = counts.iter().map(|c| f64::from(*c) / 40_000.0).collect();
        for (share, want) in shares.iter().zip([0.25, 0.5, 0.25]) {
            assert!((share - want).abs() < 0.02, "{shares:?}");
        }
    }

    #[test]
    fn adding_a_shard_moves_only_what_goes_to_it_and_removing_one_only_what_it_held() {
        let before = shards(&[("a", 1), ("b", 1), ("c", 1)]);
        let after = shards(&[("a", 1), ("b", 1), ("c", 1), ("d", 1)]);
        let mut moved = 0;
        for h in hashes(20_000) {
            let (was, is) = (owner(&h, &before), owner(&h, &after));
            if was != is {
                assert_eq!(is, 3, "a blob moved between old shards");
                moved += 1;
            }
        }
        // About a quarter goes to the new shard.
        assert!((4_000..6_000).contains(&moved), "{moved}");
        let fewer = shards(&[("a", 1), ("c", 1)]);
        for h in hashes(20_000) {
            let was = owner(&h, &before);
            let is = owner(&h, &fewer);
            let name = |s: &[(String, u32)], i: usize| s[i].0.clone();
            if was != 1 {
                assert_eq!(name(&before, was), name(&fewer, is), "only b's blobs move");
            }
        }
    }

    #[test]
    fn the_owner_depends_on_names_not_order() {
        let one = shards(&[("a", 1), ("b", 3)]);
        let other = shards(&[("b", 3), ("a", 1)]);
        for h in hashes(1_000) {
            assert_eq!(one[owner(&h, &one)].0, other[owner(&h, &other)].0);
        }
    }
}
