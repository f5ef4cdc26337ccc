//! The content-addressable store of the data plane: a memory tier over a filesystem tier,
//! partitioned by digest across shards.
//!
//! - [`CasClient`] routes each request to the owner shard of the digest.
//! - [`owner::Owner`] holds a shard's [`index`], [`memory`] tier and upload table, and is the
//!   only code that renames blobs into or deletes them from its part of the tree.
//! - Writers hash while they stream into a temp file ([`blob_io::TempWriter`]) and commit by
//!   rename only after the digest matched ([`upload`]): a blob is never visible unverified.
//! - [`scan`] rebuilds the indexes at start-up in access-time order.

pub mod accounting;
pub mod appender;
pub mod atime;
pub mod blob_io;
pub mod chain_cas;
mod client;
pub mod clone;
pub(crate) mod commands;
pub mod compressed_upload;
pub mod durable;
mod error;
pub mod file_lane;
pub mod group_commit;
pub mod index;
pub mod layout;
pub mod owner;
pub mod parked;
pub mod rebuild;
pub mod scan;
pub mod snapshot;
pub mod tier;
pub mod tree_commit;
pub mod upload;

pub use chain_cas::ChainCas;
pub use client::{CasClient, ShardQueues};
pub use commands::{Committed, Located, ShardStats, UploadClaim, UploadStatus};
pub use error::StoreError;
