//! Kiln's data plane: one shard per core, each an executor pinned to its core, accepting on
//! the shared port with SO_REUSEPORT, speaking HTTP/2 gRPC itself and serving the blob methods
//! from a digest-partitioned CAS. Everything else is handed to the control plane in-process.
//!
//! Layers, bottom up: [`runtime`] (the executor boundary), [`store`] (the CAS, keyed by
//! `kiln_reapi`'s digests), [`grpc`] (framing and connections), [`service`] (the blob
//! methods), [`server`] (starting and stopping the shards).

pub mod grpc;
pub mod metrics;
pub mod runtime;
pub mod server;
pub mod service;
pub mod shutdown;
pub mod slots;
pub mod store;
pub mod tls;
