//! zstd compression as data goes out: each [`Deflater::push`] returns the compressed bytes
//! ready so far, [`Deflater::finish`] the end of the frame.

use bytes::Bytes;
use std::io::{self, Write};

/// One zstd frame being written.
pub struct Deflater {
    encoder: zstd::stream::write::Encoder<'static, Vec<u8>>,
}

impl Deflater {
    /// A frame at `level` for `size` bytes of input when known (written in the frame header,
    /// so the reader's window is no larger than the blob).
    pub fn new(level: i32, size: Option<u64>) -> io::Result<Deflater> {
        let mut encoder = zstd::stream::write::Encoder::new(Vec::new(), level)?;
        encoder.set_pledged_src_size(size)?;
        encoder.include_contentsize(size.is_some())?;
        Ok(Deflater { encoder })
    }

    /// Compresses `data`; returns what compressed output is ready (often nothing for small
    /// pushes: zstd works in blocks of up to 128 KiB).
    pub fn push(&mut self, data: &[u8]) -> io::Result<Bytes> {
        self.encoder.write_all(data)?;
        Ok(Bytes::from(std::mem::take(self.encoder.get_mut())))
    }

    /// Ends the frame and returns the rest of it.
    pub fn finish(self) -> io::Result<Bytes> {
        self.encoder.finish().map(Bytes::from)
    }
}

/// `data` as one zstd frame at `level`.
pub fn compress(level: i32, data: &[u8]) -> io::Result<Bytes> {
    let mut d = Deflater::new(level, Some(data.len() as u64))?;
    let mut out = d.push(data)?.to_vec();
    out.extend_from_slice(&d.finish()?);
    Ok(Bytes::from(out))
}
