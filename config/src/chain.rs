//! `storage.chain` and `storage.tiers`: which tiers the CAS is served through, and their
//! resolution into a tree of [`TierSpec`]s that the data plane builds.
//!
//! A chain is a list of tier names, top first. Every name but the last decorates the rest of
//! the list (`memory`, `in_flight`); the last is a store: `filesystem`, or a `size_partition`
//! whose two sides are chains of their own. Built-in names: `memory` (the tier sized by
//! `storage.memory_bytes` and `storage.memory_max_blob_bytes`), `in_flight` and `filesystem`;
//! `storage.tiers` adds memory tiers of their own size, size partitions, and `redis` tiers
//! (small blobs shared through `[redis]`).

use crate::types::StorageConfig;
use crate::ConfigError;
use bytesize::ByteSize;
use serde::{Deserialize, Serialize};

/// The built-in memory tier's name.
pub const MEMORY: &str = "memory";
/// The filesystem tier's name.
pub const FILESYSTEM: &str = "filesystem";
/// The in-flight tier's name (read-while-write).
pub const IN_FLIGHT: &str = "in_flight";

/// How deep size partitions may nest (a name that refers to itself would recurse forever).
const MAX_DEPTH: usize = 8;

/// A named tier of `storage.tiers`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum TierConfig {
    /// A memory tier of its own size.
    Memory {
        /// Its budget.
        bytes: ByteSize,
        /// Largest blob it keeps.
        max_blob_bytes: ByteSize,
    },
    /// Blobs up to `max_blob_bytes` shared through Redis (`[redis]`) with every server naming
    /// the same Redis, over the tiers after it.
    Redis {
        /// The largest blob shared.
        max_blob_bytes: ByteSize,
    },
    /// Another REAPI CAS (a Kiln server, or any) as the store of every blob, over the tiers
    /// after it (a read-through, write-through cache of it).
    Grpc {
        /// `grpc://HOST:PORT`.
        endpoint: String,
    },
    /// Several REAPI CAS endpoints, each blob on the one rendezvous hashing over their
    /// weights picks, over the tiers after it.
    Shard {
        /// The endpoints.
        shards: Vec<ShardConfig>,
    },
    /// A log of small blobs: appended to segment files, one data sync per batch of writes,
    /// the oldest segment dropped when over `bytes` (what is still used is copied forward).
    /// Only the store of a size partition's small side.
    Log {
        /// Its cap (exceeded by the segment being appended, the records one pass of eviction
        /// copies forward, and pinned records: see docs/configuration.md).
        bytes: ByteSize,
        /// The size of one segment file.
        #[serde(default = "default_segment")]
        segment_bytes: ByteSize,
    },
    /// Blobs up to `threshold_bytes` through the chain `small`, larger ones through `large`.
    SizePartition {
        /// The largest blob of the small side.
        threshold_bytes: ByteSize,
        /// The chain of small blobs.
        small: Vec<String>,
        /// The chain of large blobs.
        large: Vec<String>,
    },
}

/// One endpoint of a `shard` tier.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct ShardConfig {
    /// `grpc://HOST:PORT`.
    pub endpoint: String,
    /// Its share of the blobs, relative to the others' (default 1).
    #[serde(default = "one")]
    pub weight: u32,
}

fn one() -> u32 {
    1
}

fn default_segment() -> ByteSize {
    ByteSize::mib(64)
}

/// The largest size-partition threshold in front of a log tier: a log holds each blob in
/// memory while it writes it.
pub const MAX_LOG_BLOB: u64 = 1 << 20;

/// Calls `f` on every tier of `tiers`, size partitions' sides included.
pub fn visit(tiers: &[TierSpec], f: &mut impl FnMut(&TierSpec)) {
    for t in tiers {
        f(t);
        if let TierSpec::SizePartition { small, large, .. } = t {
            visit(small, f);
            visit(large, f);
        }
    }
}

/// One tier of a resolved chain.
#[derive(Debug, Clone, PartialEq)]
pub enum TierSpec {
    /// A memory tier; tiers with the same name share one cache.
    Memory {
        /// Its name in the configuration.
        name: String,
        /// Its budget (0: it caches nothing).
        bytes: u64,
        /// Largest blob it keeps.
        max_blob: u64,
    },
    /// The filesystem tier.
    Filesystem,
    /// Readers of a blob being uploaded follow the upload.
    InFlight,
    /// Small blobs shared through Redis.
    Redis {
        /// The largest blob shared.
        max_blob: u64,
    },
    /// Blobs kept by other REAPI CAS endpoints (one, or shards): (endpoint, weight).
    Remote {
        /// The endpoints and their weights.
        shards: Vec<(String, u32)>,
    },
    /// A log of small blobs (the store of a size partition's small side).
    Log {
        /// Its name in the configuration (each name is one log).
        name: String,
        /// Its cap.
        bytes: u64,
        /// The size of one segment.
        segment: u64,
        /// The largest blob it holds (its partition's threshold).
        max_blob: u64,
    },
    /// A size partition.
    SizePartition {
        /// The largest blob of the small side.
        threshold: u64,
        /// The chain of small blobs.
        small: Vec<TierSpec>,
        /// The chain of large blobs.
        large: Vec<TierSpec>,
    },
}

impl TierSpec {
    /// Whether this tier holds blobs itself rather than decorating the tiers after it.
    pub fn is_store(&self) -> bool {
        !matches!(
            self,
            TierSpec::Memory { .. }
                | TierSpec::InFlight
                | TierSpec::Redis { .. }
                | TierSpec::Remote { .. }
        )
    }
}

/// The default chain: the memory tier over the filesystem.
pub fn default_chain() -> Vec<String> {
    vec![MEMORY.to_string(), FILESYSTEM.to_string()]
}

impl StorageConfig {
    /// `storage.chain` resolved into tiers, top first; an error names what is wrong.
    pub fn resolve_chain(&self) -> Result<Vec<TierSpec>, ConfigError> {
        for name in self.tiers.keys() {
            if [MEMORY, FILESYSTEM, IN_FLIGHT].contains(&name.as_str()) {
                return Err(invalid(
                    &format!("storage.tiers.{name}"),
                    "is a built-in tier's name; pick another",
                ));
            }
        }
        self.resolve("storage.chain", &self.chain, 0, None)
    }

    /// `small`: the threshold when `chain` is a size partition's small side.
    fn resolve(
        &self,
        at: &str,
        chain: &[String],
        depth: usize,
        small: Option<u64>,
    ) -> Result<Vec<TierSpec>, ConfigError> {
        if depth > MAX_DEPTH {
            return Err(invalid(
                at,
                "size partitions nest too deep (does a tier name itself?)",
            ));
        }
        let Some(last) = chain.len().checked_sub(1) else {
            return Err(invalid(
                at,
                "is empty; a chain ends in a store (\"filesystem\")",
            ));
        };
        let mut out = Vec::with_capacity(chain.len());
        for (i, name) in chain.iter().enumerate() {
            let tier = self.tier(at, name, depth, small)?;
            match (i == last, tier.is_store()) {
                (true, false) => {
                    return Err(invalid(
                        at,
                        &format!("ends in {name:?}, which decorates the tiers after it; a chain ends in a store (\"filesystem\" or a size partition)"),
                    ))
                }
                (false, true) => {
                    return Err(invalid(
                        at,
                        &format!("has {name:?}, a store, before its end; only decorators (memory, in_flight, redis, grpc and shard tiers) come before the store"),
                    ))
                }
                _ => out.push(tier),
            }
        }
        Ok(out)
    }

    fn tier(
        &self,
        at: &str,
        name: &str,
        depth: usize,
        small: Option<u64>,
    ) -> Result<TierSpec, ConfigError> {
        match name {
            MEMORY => Ok(TierSpec::Memory {
                name: MEMORY.to_string(),
                bytes: self.memory_bytes.as_u64(),
                max_blob: self.memory_max_blob_bytes.as_u64(),
            }),
            FILESYSTEM => Ok(TierSpec::Filesystem),
            IN_FLIGHT => Ok(TierSpec::InFlight),
            _ => match self.tiers.get(name) {
                None => Err(invalid(
                    at,
                    &format!("names {name:?}, which is neither built in (memory, in_flight, filesystem) nor in storage.tiers"),
                )),
                Some(TierConfig::Memory {
                    bytes,
                    max_blob_bytes,
                }) => {
                    if bytes.as_u64() > 0 && max_blob_bytes.as_u64() > bytes.as_u64() {
                        return Err(invalid(
                            &format!("storage.tiers.{name}.max_blob_bytes"),
                            "must not exceed the tier's bytes",
                        ));
                    }
                    Ok(TierSpec::Memory {
                        name: name.to_string(),
                        bytes: bytes.as_u64(),
                        max_blob: max_blob_bytes.as_u64(),
                    })
                }
                Some(TierConfig::Redis { max_blob_bytes }) => {
                    if max_blob_bytes.as_u64() > 64 << 20 {
                        return Err(invalid(
                            &format!("storage.tiers.{name}.max_blob_bytes"),
                            "must be at most 64 MiB (Redis holds each blob in one value)",
                        ));
                    }
                    Ok(TierSpec::Redis {
                        max_blob: max_blob_bytes.as_u64(),
                    })
                }
                Some(TierConfig::Grpc { endpoint }) => {
                    remote(&format!("storage.tiers.{name}"), vec![(endpoint.clone(), 1)])
                }
                Some(TierConfig::Shard { shards }) => remote(
                    &format!("storage.tiers.{name}.shards"),
                    shards
                        .iter()
                        .map(|s| (s.endpoint.clone(), s.weight))
                        .collect(),
                ),
                Some(TierConfig::Log {
                    bytes,
                    segment_bytes,
                }) => log(name, bytes.as_u64(), segment_bytes.as_u64(), small),
                Some(TierConfig::SizePartition {
                    threshold_bytes,
                    small,
                    large,
                }) => {
                    let threshold = threshold_bytes.as_u64();
                    let small_at = format!("storage.tiers.{name}.small");
                    let large_at = format!("storage.tiers.{name}.large");
                    Ok(TierSpec::SizePartition {
                        threshold,
                        small: self.resolve(&small_at, small, depth + 1, Some(threshold))?,
                        large: self.resolve(&large_at, large, depth + 1, None)?,
                    })
                }
            },
        }
    }
}

/// A remote tier of `shards`, checked: at least one, each `grpc://HOST:PORT` with a weight,
/// none twice.
fn remote(at: &str, shards: Vec<(String, u32)>) -> Result<TierSpec, ConfigError> {
    if shards.is_empty() || shards.len() > 1024 {
        return Err(invalid(at, "must name from 1 to 1,024 endpoints"));
    }
    for (i, (endpoint, weight)) in shards.iter().enumerate() {
        if !endpoint.starts_with("grpc://") || endpoint.len() <= "grpc://".len() {
            return Err(invalid(
                at,
                &format!("endpoint {endpoint:?} is not grpc://HOST:PORT"),
            ));
        }
        if *weight == 0 || *weight > 1_000_000 {
            return Err(invalid(
                at,
                &format!("the weight of {endpoint:?} must be from 1 to 1,000,000"),
            ));
        }
        if shards[..i].iter().any(|(e, _)| e == endpoint) {
            return Err(invalid(at, &format!("names {endpoint:?} twice")));
        }
    }
    Ok(TierSpec::Remote { shards })
}

/// A log tier `name`, checked: the store of a size partition's small side (`small`: its
/// threshold) of at most [`MAX_LOG_BLOB`], with segments of 1 MiB to 1 GiB and room for two.
fn log(name: &str, bytes: u64, segment: u64, small: Option<u64>) -> Result<TierSpec, ConfigError> {
    let at = format!("storage.tiers.{name}");
    let Some(max_blob) = small else {
        return Err(invalid(
            &at,
            "is a log of small blobs: it can only end a size partition's small chain",
        ));
    };
    if max_blob > MAX_LOG_BLOB {
        return Err(invalid(
            &at,
            "stands behind a size partition whose threshold_bytes is over 1 MiB; a log holds small blobs (it keeps each in memory while writing it)",
        ));
    }
    if !((1 << 20)..=(1 << 30)).contains(&segment) {
        return Err(invalid(
            &format!("{at}.segment_bytes"),
            "must be from 1 MiB to 1 GiB",
        ));
    }
    if bytes < segment.saturating_mul(2) {
        return Err(invalid(
            &format!("{at}.bytes"),
            "must hold at least two segments (segment_bytes)",
        ));
    }
    Ok(TierSpec::Log {
        name: name.to_string(),
        bytes,
        segment,
        max_blob,
    })
}

fn invalid(key: &str, why: &str) -> ConfigError {
    ConfigError::Invalid {
        key: key.to_string(),
        why: why.to_string(),
    }
}
