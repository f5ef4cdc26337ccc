//! Test blobs without gigabytes of buffers: every blob is a 16-byte header unique to the run
//! and the blob, followed by a prefix of one shared pool (random bytes, or source-like text).
//! Bytes are sent as slices of the pool; digests are computed before the measured phase.

use crate::cli::{Content, DigestFunction};
use bytes::{Bytes, BytesMut};
use kiln_proto::bytestream::WriteRequest;
use kiln_proto::reapi;
use kiln_reapi::compression::Compressor;
use kiln_reapi::resource;
use sha2::Digest as _;

/// Length of the per-blob header.
pub const HEADER: usize = 16;

/// Incremental hashing with the run's digest function.
pub enum StreamHasher {
    /// SHA-256.
    Sha256(sha2::Sha256),
    /// BLAKE3.
    Blake3(Box<blake3::Hasher>),
}

impl StreamHasher {
    /// Feeds bytes.
    pub fn update(&mut self, data: &[u8]) {
        match self {
            StreamHasher::Sha256(h) => h.update(data),
            StreamHasher::Blake3(h) => {
                h.update(data);
            }
        }
    }

    /// The hash as lowercase hex.
    pub fn finish_hex(self) -> String {
        match self {
            StreamHasher::Sha256(h) => hex::encode(h.finalize()),
            StreamHasher::Blake3(h) => h.finalize().to_hex().to_string(),
        }
    }
}

/// A hasher for either digest function.
pub fn hasher(function: DigestFunction) -> StreamHasher {
    match function {
        DigestFunction::Sha256 => StreamHasher::Sha256(sha2::Sha256::new()),
        DigestFunction::Blake3 => StreamHasher::Blake3(Box::default()),
    }
}

/// The REAPI enum value of a digest function.
pub fn proto_function(function: DigestFunction) -> i32 {
    match function {
        DigestFunction::Sha256 => reapi::digest_function::Value::Sha256 as i32,
        DigestFunction::Blake3 => reapi::digest_function::Value::Blake3 as i32,
    }
}

/// The digest of some bytes.
pub fn digest_of(function: DigestFunction, parts: &[&[u8]]) -> reapi::Digest {
    let mut h = hasher(function);
    let mut size = 0;
    for p in parts {
        h.update(p);
        size += p.len();
    }
    reapi::Digest {
        hash: h.finish_hex(),
        size_bytes: size as i64,
    }
}

/// The shared random pool and this run's nonce.
#[derive(Clone)]
pub struct BlobPool {
    data: Bytes,
    nonce: u64,
}

impl BlobPool {
    /// A pool of random bytes for blobs up to `max` bytes.
    pub fn new(max: u64) -> BlobPool {
        BlobPool::of(max, Content::Random)
    }

    /// A pool of `content` for blobs up to `max` bytes.
    pub fn of(max: u64, content: Content) -> BlobPool {
        BlobPool::seeded(max, content, None)
    }

    /// A pool of `content` for blobs up to `max` bytes; with a `seed`, the same blobs in
    /// every run given that seed (else new ones each run).
    pub fn seeded(max: u64, content: Content, seed: Option<u64>) -> BlobPool {
        let nonce = seed.unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_nanos() as u64)
                ^ ((std::process::id() as u64) << 32)
        });
        let len = max.saturating_sub(HEADER as u64) as usize;
        let mut data = Vec::with_capacity(len + 128);
        let mut x = nonce | 1;
        let mut next = || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        while data.len() < len {
            match content {
                Content::Random => data.extend_from_slice(&next().to_le_bytes()),
                Content::Text => {
                    let r = next();
                    let line = format!(
                        "    let v{} = compute_{}(&ctx, {}, \"{}\");\n",
                        r % 64,
                        (r >> 8) % 256,
                        (r >> 16) % 10_000,
                        ["item", "path", "name", "size"][(r >> 40) as usize % 4]
                    );
                    data.extend_from_slice(line.as_bytes());
                }
            }
        }
        data.truncate(len);
        BlobPool {
            data: Bytes::from(data),
            nonce,
        }
    }

    fn header(&self, id: u64) -> [u8; HEADER] {
        let mut h = [0u8; HEADER];
        h[..8].copy_from_slice(&self.nonce.to_le_bytes());
        h[8..].copy_from_slice(&id.to_le_bytes());
        h
    }

    /// The two parts of blob `id` of `size` bytes: its header and a slice of the pool.
    pub fn parts(&self, id: u64, size: u64) -> (Bytes, Bytes) {
        let header = self.header(id);
        let head = (size as usize).min(HEADER);
        let body = (size as usize).saturating_sub(HEADER);
        (
            Bytes::copy_from_slice(&header[..head]),
            self.data.slice(..body),
        )
    }

    /// Blob `id` as one buffer (for batches of small blobs).
    pub fn contents(&self, id: u64, size: u64) -> Bytes {
        let (head, body) = self.parts(id, size);
        let mut out = BytesMut::with_capacity(size as usize);
        out.extend_from_slice(&head);
        out.extend_from_slice(&body);
        out.freeze()
    }

    /// The digest of blob `id` of `size` bytes.
    pub fn digest(&self, function: DigestFunction, id: u64, size: u64) -> reapi::Digest {
        let (head, body) = self.parts(id, size);
        digest_of(function, &[&head, &body])
    }

    /// Digests of many blobs, hashed on every core.
    pub fn digests(&self, function: DigestFunction, blobs: &[(u64, u64)]) -> Vec<reapi::Digest> {
        on_every_core(blobs, |id, size| self.digest(function, id, size))
    }

    /// Blob `id` as one zstd frame at `level`.
    pub fn compressed(&self, id: u64, size: u64, level: i32) -> anyhow::Result<Bytes> {
        let (head, body) = self.parts(id, size);
        let mut d = kiln_reapi::compression::Deflater::new(level, Some(size))?;
        let mut out = BytesMut::new();
        out.extend_from_slice(&d.push(&head)?);
        out.extend_from_slice(&d.push(&body)?);
        out.extend_from_slice(&d.finish()?);
        Ok(out.freeze())
    }

    /// The ByteStream messages uploading blob `id` to `name` in `chunk`-byte messages. Only
    /// the first message is copied; the rest are slices of the pool.
    pub fn write_requests(
        &self,
        name: &str,
        id: u64,
        size: u64,
        chunk: usize,
    ) -> Vec<WriteRequest> {
        let (head, body) = self.parts(id, size);
        let chunk = chunk.max(HEADER + 1);
        let first_body = body.len().min(chunk - head.len());
        let mut first = BytesMut::with_capacity(head.len() + first_body);
        first.extend_from_slice(&head);
        first.extend_from_slice(&body[..first_body]);
        let mut out = vec![WriteRequest {
            resource_name: name.to_string(),
            write_offset: 0,
            finish_write: first.len() as u64 == size,
            data: first.freeze(),
        }];
        let mut pos = first_body;
        while pos < body.len() {
            let end = (pos + chunk).min(body.len());
            out.push(WriteRequest {
                resource_name: String::new(),
                write_offset: (head.len() + pos) as i64,
                finish_write: end == body.len(),
                data: body.slice(pos..end),
            });
            pos = end;
        }
        out
    }
}

/// `f(id, size)` for every blob, spread over every core, in order.
pub fn on_every_core<T: Send>(blobs: &[(u64, u64)], f: impl Fn(u64, u64) -> T + Sync) -> Vec<T> {
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    let per = blobs.len().div_ceil(threads).max(1);
    let f = &f;
    std::thread::scope(|scope| {
        let handles: Vec<_> = blobs
            .chunks(per)
            .map(|chunk| {
                scope.spawn(move || {
                    chunk
                        .iter()
                        .map(|&(id, size)| f(id, size))
                        .collect::<Vec<T>>()
                })
            })
            .collect();
        handles
            .into_iter()
            .flat_map(|h| h.join().unwrap_or_default())
            .collect()
    })
}

/// The messages uploading `data` to `name` from offset zero in `chunk`-byte messages, each
/// offset the bytes before it (for a compressed upload, the compressed bytes, as the spec
/// says).
pub fn data_write_requests(name: &str, packed: &Bytes, chunk: usize) -> Vec<WriteRequest> {
    let chunk = chunk.max(1);
    let mut out = Vec::new();
    let mut pos = 0;
    loop {
        let end = (pos + chunk).min(packed.len());
        out.push(WriteRequest {
            resource_name: if pos == 0 {
                name.to_string()
            } else {
                String::new()
            },
            write_offset: pos as i64,
            finish_write: end == packed.len(),
            data: packed.slice(pos..end),
        });
        pos = end;
        if pos == packed.len() {
            return out;
        }
    }
}

/// `{instance}/blobs/{fn/}{hash}/{size}`.
pub fn read_name(instance: &str, function: DigestFunction, d: &reapi::Digest) -> String {
    read_name_in(instance, Compressor::Identity, function, d)
}

/// `{instance}/uploads/{uuid}/blobs/{fn/}{hash}/{size}`.
pub fn write_name(instance: &str, function: DigestFunction, d: &reapi::Digest) -> String {
    write_name_in(instance, Compressor::Identity, function, d)
}

/// The read name of `d` sent in `compressor`'s form.
pub fn read_name_in(
    instance: &str,
    compressor: Compressor,
    function: DigestFunction,
    d: &reapi::Digest,
) -> String {
    resource::read_name(instance, compressor, function.into(), &d.hash, size(d))
}

/// A fresh upload name of `d` sent in `compressor`'s form.
pub fn write_name_in(
    instance: &str,
    compressor: Compressor,
    function: DigestFunction,
    d: &reapi::Digest,
) -> String {
    let upload = uuid::Uuid::new_v4().to_string();
    resource::write_name(
        instance,
        &upload,
        compressor,
        function.into(),
        &d.hash,
        size(d),
    )
}

/// The size the bench's own digests carry (never negative).
fn size(d: &reapi::Digest) -> u64 {
    u64::try_from(d.size_bytes).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blobs_are_distinct_and_messages_reassemble() {
        let pool = BlobPool::new(3 << 20);
        let a = pool.digest(DigestFunction::Blake3, 1, 3 << 20);
        let b = pool.digest(DigestFunction::Blake3, 2, 3 << 20);
        assert_ne!(a, b);
        let requests = pool.write_requests("n", 1, 3 << 20, 1 << 20);
        assert_eq!(
            requests.len(),
            3,
            "1 MiB messages, the header inside the first"
        );
        assert!(requests.last().unwrap().finish_write);
        let mut joined = Vec::new();
        for r in &requests {
            assert_eq!(r.write_offset as usize, joined.len());
            joined.extend_from_slice(&r.data);
        }
        assert_eq!(digest_of(DigestFunction::Blake3, &[&joined]), a);
        assert_eq!(pool.contents(1, 3 << 20), joined);
        // Tiny and empty blobs.
        assert_eq!(pool.write_requests("n", 5, 3, 1 << 20)[0].data.len(), 3);
        assert!(pool.write_requests("n", 5, 0, 1 << 20)[0].finish_write);
        let many = pool.digests(DigestFunction::Sha256, &[(1, 10), (2, 10), (3, 10)]);
        assert_eq!(many[1], pool.digest(DigestFunction::Sha256, 2, 10));
    }
}
