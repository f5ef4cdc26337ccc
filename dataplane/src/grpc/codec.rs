//! gRPC message framing (sans-IO): a 1-byte compressed flag, a 4-byte big-endian length, then
//! the protobuf message. [`MessageDecoder`] reassembles messages from HTTP/2 DATA chunks without
//! copying when a message sits inside one chunk, and with exactly one copy otherwise.

use bytes::{Buf, BufMut, Bytes, BytesMut};
use kiln_reapi::status::{Classify, ErrorKind};
use std::collections::VecDeque;

/// Length of the gRPC message prefix.
pub const PREFIX_LEN: usize = 5;

/// A framing error; its kind gives the gRPC status.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    /// The message is larger than the configured limit.
    #[error("message of {size} bytes exceeds the limit of {limit} bytes")]
    TooLarge { size: usize, limit: usize },
    /// The compressed flag is set; Kiln accepts only uncompressed messages.
    #[error("compressed gRPC messages are not supported (send grpc-encoding identity)")]
    Compressed,
    /// The compressed flag is neither 0 nor 1.
    #[error("invalid gRPC message flag {0}")]
    BadFlag(u8),
    /// The stream ended inside a message.
    #[error("request body ended inside a gRPC message ({buffered} of {expected} bytes)")]
    Truncated { buffered: usize, expected: usize },
}

impl Classify for FrameError {
    fn kind(&self) -> ErrorKind {
        match self {
            FrameError::TooLarge { .. } => ErrorKind::Exhausted,
            FrameError::Compressed => ErrorKind::Unsupported,
            FrameError::BadFlag(_) | FrameError::Truncated { .. } => ErrorKind::Invalid,
        }
    }
}

/// Reassembles gRPC messages from a sequence of byte chunks.
#[derive(Debug)]
pub struct MessageDecoder {
    chunks: VecDeque<Bytes>,
    buffered: usize,
    limit: usize,
    /// Length of the message being assembled, once its prefix has been read.
    pending: Option<usize>,
}

impl MessageDecoder {
    /// A decoder that refuses messages over `limit` bytes.
    pub fn new(limit: usize) -> MessageDecoder {
        MessageDecoder {
            chunks: VecDeque::new(),
            buffered: 0,
            limit,
            pending: None,
        }
    }

    /// Adds received bytes.
    pub fn push(&mut self, chunk: Bytes) {
        if !chunk.is_empty() {
            self.buffered += chunk.len();
            self.chunks.push_back(chunk);
        }
    }

    /// Bytes received but not yet returned as messages.
    pub fn buffered(&self) -> usize {
        self.buffered
    }

    /// Returns the next complete message, if one is buffered.
    pub fn next_message(&mut self) -> Result<Option<Bytes>, FrameError> {
        let len = match self.pending {
            Some(len) => len,
            None => {
                if self.buffered < PREFIX_LEN {
                    return Ok(None);
                }
                let prefix = self.take(PREFIX_LEN);
                match prefix[0] {
                    0 => {}
                    1 => return Err(FrameError::Compressed),
                    flag => return Err(FrameError::BadFlag(flag)),
                }
                let len = u32::from_be_bytes([prefix[1], prefix[2], prefix[3], prefix[4]]) as usize;
                if len > self.limit {
                    return Err(FrameError::TooLarge {
                        size: len,
                        limit: self.limit,
                    });
                }
                self.pending = Some(len);
                len
            }
        };
        if self.buffered < len {
            return Ok(None);
        }
        self.pending = None;
        Ok(Some(self.take(len)))
    }

    /// Called at end of stream: an error if a partial message is left.
    pub fn finish(&self) -> Result<(), FrameError> {
        match (self.pending, self.buffered) {
            (None, 0) => Ok(()),
            (Some(expected), buffered) => Err(FrameError::Truncated { buffered, expected }),
            (None, buffered) => Err(FrameError::Truncated {
                buffered,
                expected: PREFIX_LEN,
            }),
        }
    }

    /// Removes `n` buffered bytes (callers check `n <= buffered`).
    fn take(&mut self, n: usize) -> Bytes {
        self.buffered -= n;
        if n == 0 {
            return Bytes::new();
        }
        if let Some(front) = self.chunks.front_mut() {
            if front.len() >= n {
                let out = front.split_to(n);
                if front.is_empty() {
                    self.chunks.pop_front();
                }
                return out;
            }
        }
        let mut out = BytesMut::with_capacity(n);
        while out.len() < n {
            let Some(front) = self.chunks.front_mut() else {
                break;
            };
            let want = (n - out.len()).min(front.len());
            out.put_slice(&front[..want]);
            front.advance(want);
            if front.is_empty() {
                self.chunks.pop_front();
            }
        }
        out.freeze()
    }
}

/// Writes the gRPC prefix of an uncompressed message of `len` bytes.
pub fn put_prefix(buf: &mut BytesMut, len: u32) {
    buf.put_u8(0);
    buf.put_u32(len);
}

/// Encodes one message with its gRPC prefix.
pub fn encode<M: prost::Message>(message: &M) -> Bytes {
    let len = message.encoded_len();
    let mut buf = BytesMut::with_capacity(PREFIX_LEN + len);
    put_prefix(&mut buf, len as u32);
    // Encoding into a buffer of exactly the right capacity cannot fail.
    let _ = message.encode(&mut buf);
    buf.freeze()
}

/// Frames a message whose only field is one `bytes` field (ByteStream `ReadResponse.data`) as
/// a small header plus the payload itself, so the payload is sent without being copied.
pub fn encode_bytes_field(field_number: u32, payload: &Bytes) -> [Bytes; 2] {
    let mut header = BytesMut::with_capacity(PREFIX_LEN + 16);
    let mut field = BytesMut::with_capacity(16);
    if !payload.is_empty() {
        prost::encoding::encode_key(
            field_number,
            prost::encoding::WireType::LengthDelimited,
            &mut field,
        );
        prost::encoding::encode_varint(payload.len() as u64, &mut field);
    }
    put_prefix(&mut header, (field.len() + payload.len()) as u32);
    header.put_slice(&field);
    [header.freeze(), payload.clone()]
}

#[cfg(test)]
mod tests {
    use super::*;
    use kiln_proto::bytestream::{ReadResponse, WriteRequest};
    use prost::Message;

    fn framed(payload: &[u8]) -> Vec<u8> {
        let mut v = vec![0];
        v.extend_from_slice(&(payload.len() as u32).to_be_bytes());
        v.extend_from_slice(payload);
        v
    }

    #[test]
    fn reassembles_across_chunk_boundaries() {
        let a = framed(b"hello");
        let b = framed(&vec![7u8; 70_000]);
        let all: Vec<u8> = [a.clone(), b.clone()].concat();
        for split in [1, 3, 5, 6, 9, 100, 16_384] {
            let mut d = MessageDecoder::new(1 << 20);
            let mut out = Vec::new();
            for chunk in all.chunks(split) {
                d.push(Bytes::copy_from_slice(chunk));
                while let Some(m) = d.next_message().unwrap() {
                    out.push(m);
                }
            }
            assert_eq!(out.len(), 2, "split {split}");
            assert_eq!(&out[0][..], b"hello");
            assert_eq!(out[1].len(), 70_000);
            d.finish().unwrap();
        }
    }

    #[test]
    fn zero_length_messages() {
        let mut d = MessageDecoder::new(10);
        d.push(Bytes::from(framed(b"")));
        assert_eq!(d.next_message().unwrap(), Some(Bytes::new()));
        assert_eq!(d.next_message().unwrap(), None);
        d.finish().unwrap();
    }

    #[test]
    fn refuses_oversized_compressed_and_truncated() {
        let mut d = MessageDecoder::new(4);
        d.push(Bytes::from(framed(b"hello")));
        assert_eq!(
            d.next_message(),
            Err(FrameError::TooLarge { size: 5, limit: 4 })
        );

        let mut d = MessageDecoder::new(100);
        let mut m = framed(b"x");
        m[0] = 1;
        d.push(Bytes::from(m));
        assert_eq!(d.next_message(), Err(FrameError::Compressed));

        let mut d = MessageDecoder::new(100);
        d.push(Bytes::from(framed(b"hello")[..7].to_vec()));
        assert_eq!(d.next_message(), Ok(None));
        assert!(matches!(
            d.finish(),
            Err(FrameError::Truncated { expected: 5, .. })
        ));
    }

    #[test]
    fn bytes_field_framing_decodes_as_read_response() {
        for size in [0usize, 1, 127, 128, 1 << 20] {
            let payload = Bytes::from(vec![42u8; size]);
            let [head, body] = encode_bytes_field(10, &payload);
            let mut d = MessageDecoder::new(2 << 20);
            d.push(head);
            d.push(body);
            let msg = d.next_message().unwrap().unwrap();
            let decoded = ReadResponse::decode(msg).unwrap();
            assert_eq!(decoded.data, payload);
        }
    }

    #[test]
    fn encode_round_trips() {
        let req = WriteRequest {
            resource_name: "x".into(),
            write_offset: 3,
            finish_write: true,
            data: Bytes::from_static(b"abc"),
        };
        let mut d = MessageDecoder::new(100);
        d.push(encode(&req));
        let msg = d.next_message().unwrap().unwrap();
        assert_eq!(WriteRequest::decode(msg).unwrap(), req);
    }
}
