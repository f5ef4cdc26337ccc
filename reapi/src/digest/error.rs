//! Why a digest in a request is not acceptable.

/// A digest (or its digest function) that a request got wrong. Always the client's fault.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DigestError {
    /// The request carried no digest where one is required.
    #[error("missing digest")]
    Missing,
    /// The `digest_function` value is not a known enum value.
    #[error("unknown digest function value {0}")]
    UnknownFunction(i32),
    /// A known digest function that Kiln does not implement.
    #[error("digest function {0} is not supported (Kiln supports sha256 and blake3)")]
    UnsupportedFunction(String),
    /// The hash is not hex, or has the wrong length for its function.
    #[error("hash {hash:?} is not {expected} lowercase hex digits")]
    BadHash { hash: String, expected: usize },
    /// The size is negative.
    #[error("digest size {0} is negative")]
    NegativeSize(i64),
    /// The size is not a decimal number.
    #[error("digest size {0:?} is not a number")]
    BadSize(String),
    /// The `Digest` message itself is not valid protobuf.
    #[error("malformed digest message: {0}")]
    Malformed(String),
}
