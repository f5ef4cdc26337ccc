//! The server's CAS as the worker uses it, a [`Cas`] over gRPC: downloads streamed to files
//! while hashing (large blobs in parallel ranges, each on a connection of its own), small
//! blobs in batches, uploads of output files.

use crate::link::LinkChannel as Channel;
use bytes::Bytes;
use futures::StreamExt;
use kiln_proto::bytestream::byte_stream_client::ByteStreamClient;
use kiln_proto::bytestream::{ReadRequest, WriteRequest};
use kiln_proto::reapi::content_addressable_storage_client::ContentAddressableStorageClient;
use kiln_proto::reapi::{
    batch_update_blobs_request, BatchReadBlobsRequest, BatchUpdateBlobsRequest,
    FindMissingBlobsRequest,
};
use kiln_reapi::cas::{Cas, CasError, CasFuture};
use kiln_reapi::digest::{BlobKey, Digest, Hasher, InstanceName};
use kiln_reapi::resource::{ReadResource, WriteResource};
use std::path::Path;
use std::sync::Arc;
use tokio::io::{AsyncReadExt, AsyncSeekExt, AsyncWriteExt};

/// Largest message exchanged with the server.
const MAX_MESSAGE: usize = 64 << 20;
/// Blobs up to this size travel in batches.
pub const SMALL: u64 = 256 << 10;
/// Bytes per batch call.
const BATCH: u64 = 2 << 20;
/// Digests per FindMissingBlobs call.
const FIND_MISSING: usize = 10_000;
/// ByteStream write message size.
const CHUNK: usize = 1 << 20;
/// The smallest range a download is split into.
const MIN_RANGE: u64 = 1 << 20;

/// The worker's connections to the server's CAS.
#[derive(Clone)]
pub struct CasLinks {
    /// Every call but the ranges of a large download.
    pub main: Channel,
    /// One connection per range of a large download (the first may be `main`): the server
    /// serves each connection on one of its cores.
    pub ranges: Arc<[Channel]>,
    /// Blobs of at least this size are downloaded in ranges.
    pub ranged_min: u64,
}

impl CasLinks {
    /// Everything on one connection, every download one stream.
    pub fn single(channel: Channel) -> CasLinks {
        CasLinks {
            ranges: Arc::from(vec![channel.clone()]),
            main: channel,
            ranged_min: u64::MAX,
        }
    }
}

/// The server's CAS over gRPC, as a [`Cas`]: every call names its instance and each digest
/// its function, so one handle serves every action.
#[derive(Clone)]
pub struct RemoteCas {
    links: CasLinks,
}

fn bytestream_client(channel: &Channel) -> ByteStreamClient<Channel> {
    ByteStreamClient::new(channel.clone())
        .max_decoding_message_size(MAX_MESSAGE)
        .max_encoding_message_size(MAX_MESSAGE)
}

/// Splits `digests` into runs, in order, of one digest function each and at most `count`
/// digests and (past the first) `bytes` bytes: a request names one function, and has a size.
fn runs(digests: &[Digest], count: usize, bytes: u64) -> Vec<&[Digest]> {
    let mut out = Vec::new();
    let mut start = 0;
    let mut total = 0u64;
    for (i, d) in digests.iter().enumerate() {
        let full = i - start >= count
            || total.saturating_add(d.size) > bytes
            || d.function != digests[start].function;
        if i > start && full {
            out.push(&digests[start..i]);
            start = i;
            total = 0;
        }
        total = total.saturating_add(d.size);
    }
    if start < digests.len() {
        out.push(&digests[start..]);
    }
    out
}

fn remote(status: tonic::Status) -> CasError {
    CasError::Remote(status)
}

impl RemoteCas {
    /// The server through `links`.
    pub fn new(links: CasLinks) -> RemoteCas {
        RemoteCas { links }
    }

    fn cas(&self) -> ContentAddressableStorageClient<Channel> {
        ContentAddressableStorageClient::new(self.links.main.clone())
            .max_decoding_message_size(MAX_MESSAGE)
            .max_encoding_message_size(MAX_MESSAGE)
    }

    fn bytestream(&self) -> ByteStreamClient<Channel> {
        bytestream_client(&self.links.main)
    }

    fn name(instance: &InstanceName, d: &Digest) -> String {
        ReadResource {
            key: BlobKey::new(instance.clone(), *d),
        }
        .name()
    }

    /// One batch read: in order, `None` for blobs the server lacks.
    async fn read_batch(
        &self,
        instance: &InstanceName,
        batch: &[Digest],
    ) -> Result<Vec<Option<Bytes>>, CasError> {
        let response = self
            .cas()
            .batch_read_blobs(BatchReadBlobsRequest {
                instance_name: instance.as_str().to_string(),
                digests: batch.iter().map(Digest::to_proto).collect(),
                acceptable_compressors: Vec::new(),
                digest_function: batch[0].function.proto() as i32,
            })
            .await
            .map_err(remote)?
            .into_inner();
        if response.responses.len() != batch.len() {
            return Err(CasError::bad_answer(format!(
                "{} answers to a batch read of {} blobs",
                response.responses.len(),
                batch.len()
            )));
        }
        let mut got = Vec::with_capacity(batch.len());
        for (d, r) in batch.iter().zip(response.responses) {
            let code = r.status.as_ref().map_or(0, |s| s.code);
            if code == tonic::Code::NotFound as i32 {
                got.push(None);
                continue;
            }
            if code != 0 {
                let s = r.status.unwrap_or_default();
                return Err(remote(tonic::Status::new(
                    tonic::Code::from_i32(s.code),
                    s.message,
                )));
            }
            if r.data.len() as u64 != d.size || Hasher::hash(d.function, &r.data) != d.hash {
                return Err(mismatch(d));
            }
            got.push(Some(r.data));
        }
        Ok(got)
    }

    /// A blob read whole with ByteStream (too large for a batch), checked; `None` when the
    /// server lacks it. Holds at most the digest's size.
    async fn read_stream(
        &self,
        instance: &InstanceName,
        digest: Digest,
    ) -> Result<Option<Bytes>, CasError> {
        let request = ReadRequest {
            resource_name: Self::name(instance, &digest),
            read_offset: 0,
            read_limit: 0,
        };
        let mut stream = match self.bytestream().read(request).await {
            Ok(r) => r.into_inner(),
            Err(s) if s.code() == tonic::Code::NotFound => return Ok(None),
            Err(s) => return Err(remote(s)),
        };
        let mut data = Vec::with_capacity(usize::try_from(digest.size).unwrap_or(0));
        while let Some(message) = stream.next().await {
            let piece = match message {
                Ok(m) => m.data,
                Err(s) if s.code() == tonic::Code::NotFound => return Ok(None),
                Err(s) => return Err(remote(s)),
            };
            if (data.len() + piece.len()) as u64 > digest.size {
                return Err(too_much(&digest, digest.size));
            }
            data.extend_from_slice(&piece);
        }
        if data.len() as u64 != digest.size || Hasher::hash(digest.function, &data) != digest.hash {
            return Err(mismatch(&digest));
        }
        Ok(Some(data.into()))
    }

    /// Downloads a blob into a new file at `path`, verifying it; NOT_FOUND when the server
    /// lacks it. A large blob comes in parallel ranges.
    async fn download(
        &self,
        instance: &InstanceName,
        digest: Digest,
        path: &Path,
    ) -> Result<(), CasError> {
        match self.ranges_for(digest.size) {
            0 | 1 => self.download_stream(instance, digest, path).await,
            n => self.download_ranges(instance, digest, path, n).await,
        }
    }

    /// How many ranges a blob of `size` bytes is downloaded in.
    fn ranges_for(&self, size: u64) -> usize {
        if size < self.links.ranged_min {
            return 1;
        }
        let most = usize::try_from(size / MIN_RANGE).unwrap_or(usize::MAX);
        self.links.ranges.len().min(most)
    }

    /// Streams a blob into a new file at `path`, hashing it as it arrives.
    async fn download_stream(
        &self,
        instance: &InstanceName,
        digest: Digest,
        path: &Path,
    ) -> Result<(), CasError> {
        let mut stream = self
            .bytestream()
            .read(ReadRequest {
                resource_name: Self::name(instance, &digest),
                read_offset: 0,
                read_limit: 0,
            })
            .await
            .map_err(remote)?
            .into_inner();
        let mut file = tokio::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(path)
            .await
            .map_err(|e| CasError::io("create a download's file", &e))?;
        let mut hasher = Hasher::new(digest.function);
        let size = receive_into(&mut stream, &mut file, &digest, digest.size, |data| {
            hasher.update(data)
        })
        .await?;
        if size != digest.size || hasher.finalize() != digest.hash {
            return Err(mismatch(&digest));
        }
        Ok(())
    }

    /// Downloads a blob in `n` ranges at once, each into its part of the file, then hashes
    /// the whole file (the ranges arrive out of order).
    async fn download_ranges(
        &self,
        instance: &InstanceName,
        digest: Digest,
        path: &Path,
        n: usize,
    ) -> Result<(), CasError> {
        let file = tokio::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(path)
            .await
            .map_err(|e| CasError::io("create a download's file", &e))?;
        file.set_len(digest.size)
            .await
            .map_err(|e| CasError::io("size a download's file", &e))?;
        drop(file);
        let per = digest.size.div_ceil(n as u64);
        let parts = (0..n as u64).filter_map(|i| {
            let start = i * per;
            let len = per.min(digest.size.checked_sub(start)?);
            let channel = &self.links.ranges[i as usize % self.links.ranges.len()];
            (len > 0).then(|| self.download_range(channel, instance, digest, path, start, len))
        });
        futures::future::try_join_all(parts).await?;
        let stored = crate::local::hash_file(digest.function, path)
            .await
            .map_err(|e| CasError::local(&e))?;
        if stored != digest {
            return Err(mismatch(&digest));
        }
        Ok(())
    }

    /// Writes `len` bytes of the blob from `start` into the file at `path`, from `channel`.
    async fn download_range(
        &self,
        channel: &Channel,
        instance: &InstanceName,
        digest: Digest,
        path: &Path,
        start: u64,
        len: u64,
    ) -> Result<(), CasError> {
        let as_i64 = |v: u64| i64::try_from(v).map_err(|_| mismatch(&digest));
        let mut stream = bytestream_client(channel)
            .read(ReadRequest {
                resource_name: Self::name(instance, &digest),
                read_offset: as_i64(start)?,
                read_limit: as_i64(len)?,
            })
            .await
            .map_err(remote)?
            .into_inner();
        let mut file = tokio::fs::OpenOptions::new()
            .write(true)
            .open(path)
            .await
            .map_err(|e| CasError::io("open a download's file", &e))?;
        file.seek(std::io::SeekFrom::Start(start))
            .await
            .map_err(|e| CasError::io("seek in a download's file", &e))?;
        let got = receive_into(&mut stream, &mut file, &digest, len, |_| {}).await?;
        if got != len {
            return Err(CasError::bad_answer(format!(
                "the server sent {got} of the {len} bytes from offset {start} of {digest:?}"
            )));
        }
        Ok(())
    }

    /// Uploads small blobs held in memory, in batches.
    async fn upload_small(
        &self,
        instance: &InstanceName,
        blobs: &[(Digest, Bytes)],
    ) -> Result<(), CasError> {
        let digests: Vec<Digest> = blobs.iter().map(|(d, _)| *d).collect();
        let mut start = 0;
        for run in runs(&digests, usize::MAX, BATCH) {
            let batch = &blobs[start..start + run.len()];
            start += run.len();
            let response = self
                .cas()
                .batch_update_blobs(BatchUpdateBlobsRequest {
                    instance_name: instance.as_str().to_string(),
                    requests: batch
                        .iter()
                        .map(|(d, data)| batch_update_blobs_request::Request {
                            digest: Some(d.to_proto()),
                            data: data.clone(),
                            compressor: 0,
                        })
                        .collect(),
                    digest_function: run[0].function.proto() as i32,
                })
                .await
                .map_err(remote)?
                .into_inner();
            if let Some(s) = response
                .responses
                .iter()
                .find_map(|r| r.status.as_ref().filter(|s| s.code != 0))
            {
                return Err(remote(tonic::Status::new(
                    tonic::Code::from_i32(s.code),
                    s.message.clone(),
                )));
            }
        }
        Ok(())
    }

    /// Uploads a blob with ByteStream, its pieces from `pieces` (ended by `None`, or by an
    /// error of the source).
    async fn upload_stream<S>(
        &self,
        instance: &InstanceName,
        digest: Digest,
        mut pieces: S,
    ) -> Result<(), CasError>
    where
        S: futures::Stream<Item = Result<Bytes, CasError>> + Unpin + Send,
    {
        let name = WriteResource::new_upload(BlobKey::new(instance.clone(), digest)).name();
        let (tx, rx) = tokio::sync::mpsc::channel::<WriteRequest>(4);
        let reader = async move {
            let mut offset = 0u64;
            loop {
                let data = pieces.next().await.transpose()?.unwrap_or_default();
                let n = data.len() as u64;
                let finish = offset + n >= digest.size;
                let request = WriteRequest {
                    resource_name: if offset == 0 {
                        name.clone()
                    } else {
                        String::new()
                    },
                    write_offset: offset as i64,
                    finish_write: finish,
                    data,
                };
                offset += n;
                if tx.send(request).await.is_err() || finish || n == 0 {
                    return Ok::<_, CasError>(());
                }
            }
        };
        let mut client = self.bytestream();
        let (read, write) = tokio::join!(
            reader,
            client.write(tokio_stream::wrappers::ReceiverStream::new(rx))
        );
        read?;
        let committed = write.map_err(remote)?.into_inner().committed_size;
        if committed != digest.size as i64 {
            return Err(CasError::bad_answer(format!(
                "server committed {committed} of {} bytes for {digest:?}",
                digest.size
            )));
        }
        Ok(())
    }
}

impl Cas for RemoteCas {
    fn find_missing<'a>(
        &'a self,
        instance: &'a InstanceName,
        digests: &'a [Digest],
    ) -> CasFuture<'a, Vec<Digest>> {
        Box::pin(async move {
            let mut missing = Vec::new();
            for run in runs(digests, FIND_MISSING, u64::MAX) {
                let function = run[0].function.proto() as i32;
                let response = self
                    .cas()
                    .find_missing_blobs(FindMissingBlobsRequest {
                        instance_name: instance.as_str().to_string(),
                        blob_digests: run.iter().map(Digest::to_proto).collect(),
                        digest_function: function,
                    })
                    .await
                    .map_err(remote)?
                    .into_inner();
                let asked: std::collections::HashSet<&Digest> = run.iter().collect();
                for d in response.missing_blob_digests {
                    let d = Digest::from_proto(&d, function)
                        .map_err(|e| CasError::bad_answer(e.to_string()))?;
                    if !asked.contains(&d) {
                        return Err(CasError::bad_answer(format!(
                            "FindMissingBlobs answered with {d:?}, which was not asked about"
                        )));
                    }
                    missing.push(d);
                }
            }
            Ok(missing)
        })
    }

    fn read_blobs<'a>(
        &'a self,
        instance: &'a InstanceName,
        digests: &'a [Digest],
    ) -> CasFuture<'a, Vec<Option<Bytes>>> {
        Box::pin(async move {
            let mut out: Vec<Option<Bytes>> = vec![None; digests.len()];
            // Small blobs in batches, larger ones streamed, each answer to its place.
            let (small, large): (Vec<usize>, Vec<usize>) =
                (0..digests.len()).partition(|&i| digests[i].size <= SMALL);
            let small_digests: Vec<Digest> = small.iter().map(|&i| digests[i]).collect();
            let mut places = small.into_iter();
            for run in runs(&small_digests, usize::MAX, BATCH) {
                for found in self.read_batch(instance, run).await? {
                    if let Some(i) = places.next() {
                        out[i] = found;
                    }
                }
            }
            for i in large {
                out[i] = self.read_stream(instance, digests[i]).await?;
            }
            Ok(out)
        })
    }

    fn read_to_file<'a>(
        &'a self,
        instance: &'a InstanceName,
        digest: Digest,
        path: &'a Path,
    ) -> CasFuture<'a, bool> {
        Box::pin(async move {
            // A file already there is not this call's to replace or remove.
            if tokio::fs::symlink_metadata(path).await.is_ok() {
                let exists = std::io::Error::from(std::io::ErrorKind::AlreadyExists);
                return Err(CasError::io("create a download's file", &exists));
            }
            // Whatever happens from here (a failure, or the caller giving up), no partial
            // file stays.
            let mut partial = RemoveOnDrop(Some(path.to_path_buf()));
            let result = self.download(instance, digest, path).await;
            if result.is_ok() {
                partial.0 = None;
            }
            match result {
                Ok(()) => Ok(true),
                Err(e) if e.is_missing() => Ok(false),
                Err(e) => Err(e),
            }
        })
    }

    fn write_blobs<'a>(
        &'a self,
        instance: &'a InstanceName,
        blobs: Vec<(Digest, Bytes)>,
    ) -> CasFuture<'a, ()> {
        Box::pin(async move {
            let (small, large): (Vec<_>, Vec<_>) =
                blobs.into_iter().partition(|(d, _)| d.size <= SMALL);
            self.upload_small(instance, &small).await?;
            for (d, data) in large {
                let pieces = (0..data.len())
                    .step_by(CHUNK)
                    .map(|at| Ok(data.slice(at..(at + CHUNK).min(data.len()))))
                    .collect::<Vec<_>>();
                self.upload_stream(instance, d, futures::stream::iter(pieces))
                    .await?;
            }
            Ok(())
        })
    }

    fn write_file<'a>(
        &'a self,
        instance: &'a InstanceName,
        digest: Digest,
        path: &'a Path,
    ) -> CasFuture<'a, ()> {
        Box::pin(async move {
            if digest.size <= SMALL {
                let data = tokio::fs::read(path)
                    .await
                    .map_err(|e| CasError::io("read an output", &e))?;
                return self.upload_small(instance, &[(digest, data.into())]).await;
            }
            let file = tokio::fs::File::open(path)
                .await
                .map_err(|e| CasError::io("open an output", &e))?;
            let pieces = futures::stream::try_unfold(file, |mut file| async move {
                let mut buf = vec![0u8; CHUNK];
                let n = file
                    .read(&mut buf)
                    .await
                    .map_err(|e| CasError::io("read an output", &e))?;
                buf.truncate(n);
                Ok((n > 0).then(|| (Bytes::from(buf), file)))
            });
            self.upload_stream(instance, digest, Box::pin(pieces)).await
        })
    }
}

/// Removes a file when dropped, unless emptied first.
struct RemoveOnDrop(Option<std::path::PathBuf>);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        if let Some(path) = self.0.take() {
            let _ = std::fs::remove_file(path);
        }
    }
}

/// Writes a Read's messages into `file`, showing each to `seen`; stops with DATA_LOSS,
/// before writing it, at the first byte past `limit`. Returns the bytes received.
async fn receive_into(
    stream: &mut tonic::Streaming<kiln_proto::bytestream::ReadResponse>,
    file: &mut tokio::fs::File,
    digest: &Digest,
    limit: u64,
    mut seen: impl FnMut(&[u8]),
) -> Result<u64, CasError> {
    let mut got = 0u64;
    while let Some(message) = stream.next().await {
        let data = message.map_err(remote)?.data;
        got = got.saturating_add(data.len() as u64);
        if got > limit {
            return Err(too_much(digest, limit));
        }
        seen(&data);
        file.write_all(&data)
            .await
            .map_err(|e| CasError::io("write a download's file", &e))?;
    }
    file.flush()
        .await
        .map_err(|e| CasError::io("write a download's file", &e))?;
    Ok(got)
}

/// The server sent more than was asked for.
fn too_much(digest: &Digest, asked: u64) -> CasError {
    CasError::bad_answer(format!(
        "the server sent more than the {asked} bytes asked for of {digest:?}"
    ))
}

/// The bytes received do not hash to the digest.
fn mismatch(digest: &Digest) -> CasError {
    CasError::bad_answer(format!("downloaded bytes do not match {digest:?}"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use kiln_proto::bytestream::byte_stream_server::{ByteStream, ByteStreamServer};
    use kiln_proto::bytestream::{
        QueryWriteStatusRequest, QueryWriteStatusResponse, ReadResponse, WriteResponse,
    };
    use tonic::{Request, Response, Status, Streaming};

    /// A server that answers every read with far more than any blob: a fault Kiln's own
    /// server cannot be made to commit, so a fake stands in for a hostile or broken one.
    struct Flooding;

    #[tonic::async_trait]
    impl ByteStream for Flooding {
        type ReadStream =
            std::pin::Pin<Box<dyn futures::Stream<Item = Result<ReadResponse, Status>> + Send>>;

        async fn read(
            &self,
            _: Request<ReadRequest>,
        ) -> Result<Response<Self::ReadStream>, Status> {
            let chunk = Bytes::from(vec![7u8; 1 << 20]);
            let flood = futures::stream::repeat_with(move || {
                Ok(ReadResponse {
                    data: chunk.clone(),
                })
            })
            .take(1 << 14); // 16 GiB, were it all written
            Ok(Response::new(Box::pin(flood)))
        }

        async fn write(
            &self,
            _: Request<Streaming<WriteRequest>>,
        ) -> Result<Response<WriteResponse>, Status> {
            Err(Status::unimplemented("read only"))
        }

        async fn query_write_status(
            &self,
            _: Request<QueryWriteStatusRequest>,
        ) -> Result<Response<QueryWriteStatusResponse>, Status> {
            Err(Status::unimplemented("read only"))
        }
    }

    /// A download, whole or in ranges, stops at the first byte past what it asked for, with
    /// DATA_LOSS, having written nothing past the blob's size.
    #[tokio::test]
    async fn a_server_sending_past_the_size_is_cut_off() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let server = tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(ByteStreamServer::new(Flooding))
                .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
        );
        let channel = crate::link::Link::new(&format!("grpc://{addr}"), None)
            .unwrap()
            .connect()
            .await
            .unwrap();
        let blob = vec![7u8; (4 << 20) + 10];
        let digest = Digest::of(kiln_reapi::digest::DigestFunction::Sha256, &blob);
        let dir = tempfile::tempdir().unwrap();
        // One stream, and four ranges on two connections.
        let single = CasLinks::single(channel.clone());
        let ranged = CasLinks {
            main: channel.clone(),
            ranges: Arc::from(vec![
                channel.clone(),
                channel.clone(),
                channel.clone(),
                channel,
            ]),
            ranged_min: 1,
        };
        for (i, links) in [single, ranged].into_iter().enumerate() {
            let remote = RemoteCas::new(links);
            let path = dir.path().join(format!("blob{i}"));
            let instance = InstanceName::default_instance();
            let err = remote.download(&instance, digest, &path).await.unwrap_err();
            match err {
                CasError::Remote(s) => assert_eq!(s.code(), tonic::Code::DataLoss, "{s:?}"),
                other => panic!("{other:?}"),
            }
            let written = std::fs::metadata(&path).unwrap().len();
            assert!(written <= digest.size, "{written} bytes written");
            // Through the trait, the partial file is removed as well.
            let path = dir.path().join(format!("blob{i}-cas"));
            let err = remote.read_to_file(&instance, digest, &path).await;
            assert!(err.is_err(), "{err:?}");
            assert!(!path.exists(), "a failed download leaves no file");
        }
        server.abort();
    }
}
