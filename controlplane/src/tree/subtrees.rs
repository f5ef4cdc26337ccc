//! `Directory` messages kept by digest for `GetTree`, so that trees sharing subtrees (a new
//! root over mostly the same directories, the usual shape of a rebuilt input tree) read only
//! what is new from the CAS. Kept as the bytes the CAS holds, weighted by them, for as long as
//! the tree cache keeps whole trees (`get_tree.cache_ttl_secs`): a directory that has left the
//! CAS may be listed until then, as with a cached tree.

use bytes::Bytes;
use kiln_reapi::digest::{Digest, InstanceName};
use std::time::Duration;

/// What an entry costs beyond its message's bytes: its key (an instance name and a digest),
/// its `Bytes` handle and the cache's own bookkeeping (moka's entry, its place in the access
/// order and the hash table).
const PER_ENTRY: u64 = 256;

/// The kept directories.
pub struct Subtrees {
    cache: Option<moka::sync::Cache<(InstanceName, Digest), Bytes>>,
}

impl Subtrees {
    /// Room for `bytes` of directories, each kept for `ttl` (0 bytes: none kept).
    pub fn new(bytes: u64, ttl: Duration) -> Subtrees {
        let cache = (bytes > 0).then(|| {
            moka::sync::Cache::builder()
                .max_capacity(bytes)
                .weigher(|_: &(InstanceName, Digest), d: &Bytes| {
                    u32::try_from(d.len() as u64 + PER_ENTRY).unwrap_or(u32::MAX)
                })
                .time_to_live(ttl)
                .build()
        });
        Subtrees { cache }
    }

    /// The kept directory, if any.
    pub fn get(&self, instance: &InstanceName, digest: Digest) -> Option<Bytes> {
        self.cache.as_ref()?.get(&(instance.clone(), digest))
    }

    /// Keeps a directory read from the CAS.
    pub fn insert(&self, instance: &InstanceName, digest: Digest, bytes: Bytes) {
        if let Some(cache) = &self.cache {
            cache.insert((instance.clone(), digest), bytes);
        }
    }
}
