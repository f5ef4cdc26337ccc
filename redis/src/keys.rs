//! Keys and pipelines: the key of a digest's value (its hash tag, for Redis Cluster), keys
//! grouped by hash tag, and pipelines bounded by count and by bytes.

/// The key of a digest's value under `kind` (`ac`, `cas`): instance, digest function, the
/// hash with its first two hex digits as the hash tag, size. An instance name (or key
/// prefix) holding braces of its own would move the tag: every key of that instance in one
/// slot (still correct, not spread).
pub(crate) fn digest_key(
    kind: &str,
    instance: &str,
    function: &str,
    hex: &str,
    size: u64,
) -> String {
    let (tag, rest) = hex.split_at(hex.len().min(2));
    format!("{kind}:{instance}:{function}:{{{tag}}}{rest}:{size}")
}

/// Hash tags whose pipelines a Cluster call sends at once.
pub(crate) const SLOTS_AT_ONCE: usize = 8;

/// The hash tag of `key` (what Redis Cluster hashes to pick its slot): the text between the
/// first `{` and the next `}`, when not empty; else the whole key.
pub(crate) fn slot_tag(key: &str) -> &str {
    if let Some(open) = key.find('{') {
        if let Some(len) = key[open + 1..].find('}') {
            if len > 0 {
                return &key[open + 1..open + 1 + len];
            }
        }
    }
    key
}

/// Positions of `keys` grouped by hash tag (one group of all when `cluster` is off), in order.
pub(crate) fn slot_groups<K>(
    keys: &[K],
    cluster: bool,
    key: impl Fn(&K) -> &str,
) -> Vec<Vec<usize>> {
    if !cluster {
        return vec![(0..keys.len()).collect()];
    }
    let mut groups: std::collections::BTreeMap<&str, Vec<usize>> = Default::default();
    for (i, k) in keys.iter().enumerate() {
        groups.entry(slot_tag(key(k))).or_default().push(i);
    }
    groups.into_values().collect()
}

/// Bytes of values one pipeline of [`Redis::get_many`] may bring (by their bounds), so that
/// one call's answer is not too large to arrive within the timeout.
pub(crate) const PIPELINE_BYTES: u64 = 8 << 20;

/// `keys` in runs of at most `count` whose bounds add up to at most [`PIPELINE_BYTES`] (a
/// larger one alone).
pub(crate) fn byte_bounded(keys: &[(String, u64)], count: usize) -> Vec<&[(String, u64)]> {
    let mut runs = Vec::new();
    let (mut start, mut bytes) = (0, 0u64);
    for (i, (_, max)) in keys.iter().enumerate() {
        if i > start && (i - start >= count || bytes.saturating_add(*max) > PIPELINE_BYTES) {
            runs.push(&keys[start..i]);
            (start, bytes) = (i, 0);
        }
        bytes = bytes.saturating_add(*max);
    }
    if start < keys.len() {
        runs.push(&keys[start..]);
    }
    runs
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_tag_two_hex_digits_and_cluster_pipelines_group_by_tag() {
        let key = digest_key("cas", "main", "sha256", "abcdef", 3);
        assert_eq!(key, "cas:main:sha256:{ab}cdef:3");
        assert_eq!(slot_tag(&key), "ab");
        assert_eq!(
            slot_tag(&format!("{key}:tmp:123")),
            "ab",
            "a temporary key, same slot"
        );
        assert_eq!(slot_tag("no tag"), "no tag");
        assert_eq!(slot_tag("empty {} tag"), "empty {} tag");
        let keys = ["x{ab}1", "y{cd}2", "z{ab}3"];
        assert_eq!(slot_groups(&keys, true, |k| k), vec![vec![0, 2], vec![1]]);
        assert_eq!(slot_groups(&keys, false, |k| k), vec![vec![0, 1, 2]]);
    }

    #[test]
    fn pipelines_are_bounded_by_count_and_by_bytes() {
        let keys: Vec<(String, u64)> = (0..10).map(|i| (format!("k{i}"), 1)).collect();
        let runs: Vec<usize> = byte_bounded(&keys, 4).iter().map(|r| r.len()).collect();
        assert_eq!(runs, vec![4, 4, 2]);
        let big: Vec<(String, u64)> = (0..5)
            .map(|i| (format!("k{i}"), PIPELINE_BYTES / 2))
            .collect();
        let runs: Vec<usize> = byte_bounded(&big, 100).iter().map(|r| r.len()).collect();
        assert_eq!(runs, vec![2, 2, 1]);
        let huge = vec![("a".to_string(), PIPELINE_BYTES * 3), ("b".to_string(), 1)];
        let runs: Vec<usize> = byte_bounded(&huge, 100).iter().map(|r| r.len()).collect();
        assert_eq!(runs, vec![1, 1], "a value over the bound goes alone");
        assert!(byte_bounded(&[], 4).is_empty());
    }
}
