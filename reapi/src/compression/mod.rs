//! Compressed blobs as REAPI carries them: the [`Compressor`] a resource name or a batch entry
//! names, and zstd streams as pure state machines — [`Inflater`] decompresses with its output
//! bounded by the size the digest declares and handed out one chunk at a time, [`Deflater`]
//! compresses as data goes out. Neither does I/O: the data plane and the clients drive them.

mod deflate;
mod inflate;

pub use deflate::{compress, Deflater};
pub use inflate::{decompress, InflateError, Inflater};

/// Whether `data` is exactly one zstd frame (not a skippable one) and nothing after it.
pub fn is_one_frame(data: &[u8]) -> bool {
    data.first_chunk::<4>().map(|m| u32::from_le_bytes(*m)) == Some(0xFD2F_B528)
        && zstd::zstd_safe::find_frame_compressed_size(data) == Ok(data.len())
}

use kiln_proto::reapi::compressor;

/// The compressors Kiln can speak (`Compressor.Value`); identity is always spoken.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum Compressor {
    /// Plain bytes.
    #[default]
    Identity,
    /// Zstandard.
    Zstd,
}

/// A compressor Kiln does not speak, as the client named it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("compressor {0} is not supported (this server speaks zstd and uncompressed data)")]
pub struct UnknownCompressor(pub String);

impl Compressor {
    /// From a batch entry's `compressor` field.
    pub fn from_proto(value: i32) -> Result<Compressor, UnknownCompressor> {
        match compressor::Value::try_from(value) {
            Ok(compressor::Value::Identity) => Ok(Compressor::Identity),
            Ok(compressor::Value::Zstd) => Ok(Compressor::Zstd),
            Ok(other) => Err(UnknownCompressor(other.as_str_name().to_ascii_lowercase())),
            Err(_) => Err(UnknownCompressor(value.to_string())),
        }
    }

    /// The `Compressor.Value` for the wire.
    pub fn proto(self) -> i32 {
        match self {
            Compressor::Identity => compressor::Value::Identity as i32,
            Compressor::Zstd => compressor::Value::Zstd as i32,
        }
    }

    /// From the `{compressor}` segment of a `compressed-blobs` resource name: the lowercase
    /// name of a compressor other than identity.
    pub fn from_segment(segment: &str) -> Result<Compressor, UnknownCompressor> {
        match segment {
            "zstd" => Ok(Compressor::Zstd),
            other => Err(UnknownCompressor(format!("{other:?}"))),
        }
    }

    /// The `{compressor}` segment of a `compressed-blobs` resource name (none for identity).
    pub fn segment(self) -> Option<&'static str> {
        match self {
            Compressor::Identity => None,
            Compressor::Zstd => Some("zstd"),
        }
    }
}

#[cfg(test)]
mod tests;
