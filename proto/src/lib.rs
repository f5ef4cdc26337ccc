//! Generated types and services for the protocols Kiln speaks: REAPI v2
//! (`build.bazel.remote.execution.v2`, `build.bazel.semver`), `google.bytestream`,
//! `google.longrunning` and `google.rpc`. The `.proto` sources live in `proto/protos/`.

#![allow(
    clippy::large_enum_variant,
    clippy::doc_lazy_continuation,
    clippy::doc_overindented_list_items
)]

/// `build.bazel.*`
pub mod build {
    /// `build.bazel.*`
    pub mod bazel {
        /// `build.bazel.remote.*`
        pub mod remote {
            /// `build.bazel.remote.asset.*`
            pub mod asset {
                /// The Remote Asset API v1.
                pub mod v1 {
                    tonic::include_proto!("build.bazel.remote.asset.v1");
                }
            }
            /// `build.bazel.remote.execution.*`
            pub mod execution {
                /// REAPI v2.
                pub mod v2 {
                    tonic::include_proto!("build.bazel.remote.execution.v2");
                }
            }
        }
        /// Semantic versions used in capabilities.
        pub mod semver {
            tonic::include_proto!("build.bazel.semver");
        }
    }
}

/// `google.*`
pub mod google {
    /// ByteStream: streaming reads and writes of blobs.
    pub mod bytestream {
        tonic::include_proto!("google.bytestream");
    }
    /// Long-running operations (used by Execute).
    pub mod longrunning {
        tonic::include_proto!("google.longrunning");
    }
    /// Status and error details.
    pub mod rpc {
        tonic::include_proto!("google.rpc");
    }
}

/// Kiln's own protocols.
pub mod kiln {
    /// The worker API.
    pub mod worker {
        /// Version 1.
        pub mod v1 {
            tonic::include_proto!("kiln.worker.v1");
        }
    }
    /// What servers sharing one Redis keep there.
    pub mod farm {
        /// Version 1.
        pub mod v1 {
            tonic::include_proto!("kiln.farm.v1");
        }
    }
}

/// The Remote Asset API v1.
pub use build::bazel::remote::asset::v1 as asset;

/// REAPI v2, the package most code uses.
pub use build::bazel::remote::execution::v2 as reapi;
pub use google::bytestream;
pub use google::longrunning;
pub use kiln::farm::v1 as farm;
pub use kiln::worker::v1 as worker;
