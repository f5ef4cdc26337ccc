//! The REAPI vocabulary every part of Kiln shares, with no runtime underneath: digests and
//! digest functions, ByteStream resource names, proto conversions (durations, platforms), error kinds and the one table of their gRPC
//! codes, the rules for paths that come from protos (working directories, output paths,
//! symlink targets) and for the `Directory` messages of an input tree, and the one bounded walk
//! of such a tree; and the [`cas::Cas`] trait, the CAS as the control plane and the
//! worker use it, whatever answers. The control plane
//! checks the rules before it queues an action; the worker checks them again before it
//! touches the filesystem.

pub mod cas;
pub mod compression;
pub mod convert;
pub mod digest;
pub mod paths;
pub mod raw;
pub mod resource;
pub mod status;
pub mod tree;
pub mod walk;
