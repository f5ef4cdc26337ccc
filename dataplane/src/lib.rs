//! Kiln's data plane: one shard per core, each an executor pinned to its core, accepting on
//! the shared port with SO_REUSEPORT, speaking HTTP/2 gRPC itself and serving the blob methods
//! from a digest-partitioned CAS. Everything else is handed to the control plane in-process.
//!
//! Layers, bottom up: [`runtime`] (the executor boundary), [`digest`] and [`resource`]
//! (parsing), [`store`] (the CAS), [`grpc`] (framing and connections), [`service`] (the blob
//! methods), [`server`] (starting and stopping the shards).

pub mod digest;
pub mod grpc;
pub mod metrics;
pub mod resource;
pub mod runtime;
pub mod server;
pub mod service;
pub mod shutdown;
pub mod store;
pub mod tls;
