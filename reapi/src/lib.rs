//! The REAPI vocabulary every part of Kiln shares, with no runtime underneath: the rules for
//! paths that come from protos (working directories, output paths, symlink targets) and for
//! the `Directory` messages of an input tree. The control plane checks them before it queues
//! an action; the worker checks them again before it touches the filesystem.

pub mod digest;
pub mod paths;
pub mod resource;
pub mod tree;
