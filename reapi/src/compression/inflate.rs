//! zstd decompression that cannot be made to run away: output stops one byte past the size
//! the digest declares (a small frame that inflates to gigabytes costs one chunk), the
//! window a frame may ask for is capped, and output is handed out one chunk at a time so the
//! caller can write and hash each before asking for more.

use bytes::Bytes;
use zstd::stream::raw::{DParameter, Decoder, InBuffer, Operation, OutBuffer};

/// Why compressed data was refused. All are the sender's fault (`INVALID_ARGUMENT`).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InflateError {
    /// Not zstd, corrupt, or needs a window above the cap.
    #[error("compressed data is not a valid zstd stream: {0}")]
    Corrupt(String),
    /// Decompresses to more bytes than the blob's declared size.
    #[error("compressed data inflates past the blob's declared size ({size} bytes)")]
    TooLong { size: u64 },
    /// The data ended inside a zstd frame.
    #[error("compressed data ends inside a zstd frame")]
    Truncated,
    /// The decoder could not be made (out of memory): the server's fault, not the data's.
    #[error("the server could not start a zstd decoder: {0}")]
    Setup(String),
}

impl InflateError {
    /// Whether the sender is at fault (everything but [`InflateError::Setup`]).
    pub fn is_senders(&self) -> bool {
        !matches!(self, InflateError::Setup(_))
    }
}

/// Decompression of one stream of zstd frames into at most `limit` bytes.
pub struct Inflater {
    decoder: Decoder<'static>,
    input: Bytes,
    /// Bytes of `input` the decoder has taken.
    at: usize,
    /// Output still allowed.
    left: u64,
    /// The declared size, for the error.
    limit: u64,
    chunk: usize,
    /// The last step filled its output: the decoder may hold more without new input.
    full: bool,
    /// The last step ended a frame with everything flushed.
    frame_done: bool,
    seen_input: bool,
}

impl Inflater {
    /// Decompresses at most `limit` bytes, `chunk` bytes per step, refusing frames whose
    /// window is above 2^`max_window_log`.
    pub fn new(limit: u64, chunk: usize, max_window_log: u32) -> Result<Inflater, InflateError> {
        let setup = |e: std::io::Error| InflateError::Setup(e.to_string());
        let mut decoder = Decoder::new().map_err(setup)?;
        decoder
            .set_parameter(DParameter::WindowLogMax(max_window_log))
            .map_err(setup)?;
        Ok(Inflater {
            decoder,
            input: Bytes::new(),
            at: 0,
            left: limit,
            limit,
            chunk: chunk.max(1),
            full: false,
            frame_done: false,
            seen_input: false,
        })
    }

    /// Hands the next compressed bytes over. Call only once [`Inflater::next_chunk`] has
    /// returned `None` for the previous ones.
    pub fn push(&mut self, input: Bytes) {
        debug_assert!(self.at == self.input.len(), "previous input not drained");
        if !input.is_empty() {
            self.seen_input = true;
        }
        self.input = input;
        self.at = 0;
    }

    /// The next piece of output (at most one chunk), or `None` when the input handed over so
    /// far is used up.
    pub fn next_chunk(&mut self) -> Result<Option<Bytes>, InflateError> {
        loop {
            if self.at == self.input.len() && !self.full {
                return Ok(None);
            }
            // Room for one byte past the limit, so that running over is seen.
            let room = (self.chunk as u64).min(self.left.saturating_add(1)) as usize;
            let mut out: Vec<u8> = Vec::with_capacity(room);
            let mut input = InBuffer::around(&self.input[self.at..]);
            let mut output = OutBuffer::around(&mut out);
            let hint = self
                .decoder
                .run(&mut input, &mut output)
                .map_err(|e| InflateError::Corrupt(e.to_string()))?;
            let taken = input.pos();
            let made = output.pos();
            self.at += taken;
            if taken == 0 && made == 0 {
                if self.at < self.input.len() {
                    return Err(InflateError::Corrupt("the decoder made no progress".into()));
                }
                self.full = false;
                return Ok(None);
            }
            self.frame_done = hint == 0;
            // A full output may leave more inside the decoder, unless the frame just ended.
            self.full = made == room && hint != 0;
            if made as u64 > self.left {
                return Err(InflateError::TooLong { size: self.limit });
            }
            self.left -= made as u64;
            if made > 0 {
                // A piece much smaller than its buffer is copied out, so that whoever keeps
                // it does not keep the whole chunk's allocation.
                if made < room / 4 {
                    return Ok(Some(Bytes::copy_from_slice(&out)));
                }
                return Ok(Some(Bytes::from(out)));
            }
        }
    }

    /// Checks that the data handed over ended at the end of a frame (or that there was none).
    pub fn finish(&self) -> Result<(), InflateError> {
        if self.at != self.input.len() || self.full {
            return Err(InflateError::Corrupt("output not drained".into()));
        }
        if self.seen_input && !self.frame_done {
            return Err(InflateError::Truncated);
        }
        Ok(())
    }
}

/// `data` decompressed whole, refused unless it is exactly `size` bytes of complete frames.
pub fn decompress(data: Bytes, size: u64, max_window_log: u32) -> Result<Bytes, InflateError> {
    let chunk = usize::try_from(size.clamp(1, 1 << 20)).unwrap_or(1 << 20);
    let mut inflater = Inflater::new(size, chunk, max_window_log)?;
    inflater.push(data);
    let mut out = Vec::with_capacity(usize::try_from(size.min(1 << 20)).unwrap_or(0));
    while let Some(piece) = inflater.next_chunk()? {
        out.extend_from_slice(&piece);
    }
    inflater.finish()?;
    if out.len() as u64 != size {
        return Err(InflateError::Corrupt(format!(
            "decompresses to {} bytes, not the declared {size}",
            out.len()
        )));
    }
    Ok(Bytes::from(out))
}
