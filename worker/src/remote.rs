//! The server's CAS as the worker uses it: downloads streamed to files while hashing (large
//! blobs in parallel ranges, each on a connection of its own), small blobs in batches, uploads
//! of output files.

use crate::error::ActionError;
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

/// A handle to the server's CAS for one instance and digest function.
#[derive(Clone)]
pub struct RemoteCas {
    links: CasLinks,
    instance: InstanceName,
    function: i32,
}

fn bytestream_client(channel: &Channel) -> ByteStreamClient<Channel> {
    ByteStreamClient::new(channel.clone())
        .max_decoding_message_size(MAX_MESSAGE)
        .max_encoding_message_size(MAX_MESSAGE)
}

impl RemoteCas {
    /// The server through `links`, for `instance` and the digest function `function`.
    pub fn new(links: CasLinks, instance: InstanceName, function: i32) -> RemoteCas {
        RemoteCas {
            links,
            instance,
            function,
        }
    }

    fn cas(&self) -> ContentAddressableStorageClient<Channel> {
        ContentAddressableStorageClient::new(self.links.main.clone())
            .max_decoding_message_size(MAX_MESSAGE)
            .max_encoding_message_size(MAX_MESSAGE)
    }

    fn bytestream(&self) -> ByteStreamClient<Channel> {
        bytestream_client(&self.links.main)
    }

    fn key(&self, d: &Digest) -> BlobKey {
        BlobKey::new(self.instance.clone(), *d)
    }

    fn name(&self, d: &Digest) -> String {
        ReadResource { key: self.key(d) }.name()
    }

    fn upload_name(&self, d: &Digest) -> String {
        WriteResource::new_upload(self.key(d)).name()
    }

    /// The digests the server does not hold.
    pub async fn find_missing(&self, digests: &[Digest]) -> Result<Vec<Digest>, ActionError> {
        let mut missing = Vec::new();
        for chunk in digests.chunks(10_000) {
            let response = self
                .cas()
                .find_missing_blobs(FindMissingBlobsRequest {
                    instance_name: self.instance.as_str().to_string(),
                    blob_digests: chunk.iter().map(Digest::to_proto).collect(),
                    digest_function: self.function,
                })
                .await?
                .into_inner();
            for d in response.missing_blob_digests {
                let d = Digest::from_proto(&d, self.function)
                    .map_err(|e| ActionError::BadInput(e.to_string()))?;
                missing.push(d);
            }
        }
        Ok(missing)
    }

    /// Small blobs, in batches; blobs the server lacks are left out of the answer.
    pub async fn read_small(
        &self,
        digests: &[Digest],
    ) -> Result<Vec<(Digest, Bytes)>, ActionError> {
        let mut out = Vec::with_capacity(digests.len());
        let mut batch: Vec<Digest> = Vec::new();
        let mut bytes = 0;
        let flush = |batch: Vec<Digest>| async move {
            let response = self
                .cas()
                .batch_read_blobs(BatchReadBlobsRequest {
                    instance_name: self.instance.as_str().to_string(),
                    digests: batch.iter().map(Digest::to_proto).collect(),
                    acceptable_compressors: Vec::new(),
                    digest_function: self.function,
                })
                .await?
                .into_inner();
            let mut got = Vec::new();
            for (d, r) in batch.into_iter().zip(response.responses) {
                if r.status.as_ref().is_none_or(|s| s.code == 0)
                    && Hasher::hash(d.function, &r.data) == d.hash
                {
                    got.push((d, r.data));
                }
            }
            Ok::<_, ActionError>(got)
        };
        for d in digests {
            if bytes + d.size > BATCH && !batch.is_empty() {
                out.extend(flush(std::mem::take(&mut batch)).await?);
                bytes = 0;
            }
            bytes += d.size;
            batch.push(*d);
        }
        if !batch.is_empty() {
            out.extend(flush(batch).await?);
        }
        Ok(out)
    }

    /// Downloads a blob into a new file at `path`, verifying it; NOT_FOUND when the server
    /// lacks it. A large blob comes in parallel ranges.
    pub async fn download(&self, digest: Digest, path: &Path) -> Result<(), ActionError> {
        match self.ranges_for(digest.size) {
            0 | 1 => self.download_stream(digest, path).await,
            n => self.download_ranges(digest, path, n).await,
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
    async fn download_stream(&self, digest: Digest, path: &Path) -> Result<(), ActionError> {
        let mut stream = self
            .bytestream()
            .read(ReadRequest {
                resource_name: self.name(&digest),
                read_offset: 0,
                read_limit: 0,
            })
            .await?
            .into_inner();
        let mut file = tokio::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(path)
            .await
            .map_err(|e| ActionError::io("create", path, e))?;
        let mut hasher = Hasher::new(digest.function);
        let size = receive_into(&mut stream, &mut file, path, &digest, digest.size, |data| {
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
        digest: Digest,
        path: &Path,
        n: usize,
    ) -> Result<(), ActionError> {
        let file = tokio::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(path)
            .await
            .map_err(|e| ActionError::io("create", path, e))?;
        file.set_len(digest.size)
            .await
            .map_err(|e| ActionError::io("size", path, e))?;
        drop(file);
        let per = digest.size.div_ceil(n as u64);
        let parts = (0..n as u64).filter_map(|i| {
            let start = i * per;
            let len = per.min(digest.size.checked_sub(start)?);
            let channel = &self.links.ranges[i as usize % self.links.ranges.len()];
            (len > 0).then(|| self.download_range(channel, digest, path, start, len))
        });
        futures::future::try_join_all(parts).await?;
        let stored = crate::local::hash_file(digest.function, path).await?;
        if stored != digest {
            return Err(mismatch(&digest));
        }
        Ok(())
    }

    /// Writes `len` bytes of the blob from `start` into the file at `path`, from `channel`.
    async fn download_range(
        &self,
        channel: &Channel,
        digest: Digest,
        path: &Path,
        start: u64,
        len: u64,
    ) -> Result<(), ActionError> {
        let as_i64 = |v: u64| i64::try_from(v).map_err(|_| mismatch(&digest));
        let mut stream = bytestream_client(channel)
            .read(ReadRequest {
                resource_name: self.name(&digest),
                read_offset: as_i64(start)?,
                read_limit: as_i64(len)?,
            })
            .await?
            .into_inner();
        let mut file = tokio::fs::OpenOptions::new()
            .write(true)
            .open(path)
            .await
            .map_err(|e| ActionError::io("open", path, e))?;
        file.seek(std::io::SeekFrom::Start(start))
            .await
            .map_err(|e| ActionError::io("seek", path, e))?;
        let got = receive_into(&mut stream, &mut file, path, &digest, len, |_| {}).await?;
        if got != len {
            return Err(ActionError::Remote(tonic::Status::data_loss(format!(
                "the server sent {got} of the {len} bytes from offset {start} of {digest:?}"
            ))));
        }
        Ok(())
    }

    /// Uploads small blobs held in memory.
    pub async fn upload_small(&self, blobs: Vec<(Digest, Bytes)>) -> Result<(), ActionError> {
        let mut start = 0;
        while start < blobs.len() {
            let mut end = start;
            let mut bytes = 0;
            while end < blobs.len() && (end == start || bytes + blobs[end].0.size <= BATCH) {
                bytes += blobs[end].0.size;
                end += 1;
            }
            let response = self
                .cas()
                .batch_update_blobs(BatchUpdateBlobsRequest {
                    instance_name: self.instance.as_str().to_string(),
                    requests: blobs[start..end]
                        .iter()
                        .map(|(d, data)| batch_update_blobs_request::Request {
                            digest: Some(d.to_proto()),
                            data: data.clone(),
                            compressor: 0,
                        })
                        .collect(),
                    digest_function: self.function,
                })
                .await?
                .into_inner();
            if let Some(s) = response
                .responses
                .iter()
                .find_map(|r| r.status.as_ref().filter(|s| s.code != 0))
            {
                return Err(ActionError::Remote(tonic::Status::new(
                    tonic::Code::from_i32(s.code),
                    s.message.clone(),
                )));
            }
            start = end;
        }
        Ok(())
    }

    /// Uploads a file with ByteStream.
    pub async fn upload_file(&self, digest: Digest, path: &Path) -> Result<(), ActionError> {
        let mut file = tokio::fs::File::open(path)
            .await
            .map_err(|e| ActionError::io("open", path, e))?;
        let name = self.upload_name(&digest);
        let (tx, rx) = tokio::sync::mpsc::channel::<WriteRequest>(4);
        let reader = async move {
            let mut offset = 0u64;
            loop {
                let mut buf = vec![0u8; CHUNK];
                let n = file
                    .read(&mut buf)
                    .await
                    .map_err(|e| ActionError::io("read", path, e))?;
                buf.truncate(n);
                let finish = offset + n as u64 >= digest.size;
                let request = WriteRequest {
                    resource_name: if offset == 0 {
                        name.clone()
                    } else {
                        String::new()
                    },
                    write_offset: offset as i64,
                    finish_write: finish,
                    data: buf.into(),
                };
                offset += n as u64;
                if tx.send(request).await.is_err() || finish || n == 0 {
                    return Ok::<_, ActionError>(());
                }
            }
        };
        let mut client = self.bytestream();
        let (read, write) = tokio::join!(
            reader,
            client.write(tokio_stream::wrappers::ReceiverStream::new(rx))
        );
        read?;
        let committed = write?.into_inner().committed_size;
        if committed != digest.size as i64 {
            return Err(ActionError::Remote(tonic::Status::data_loss(format!(
                "server committed {committed} of {} bytes for {digest:?}",
                digest.size
            ))));
        }
        Ok(())
    }
}

/// Writes a Read's messages into `file` (at `path`), showing each to `seen`; stops with
/// DATA_LOSS, before writing it, at the first byte past `limit`. Returns the bytes received.
async fn receive_into(
    stream: &mut tonic::Streaming<kiln_proto::bytestream::ReadResponse>,
    file: &mut tokio::fs::File,
    path: &Path,
    digest: &Digest,
    limit: u64,
    mut seen: impl FnMut(&[u8]),
) -> Result<u64, ActionError> {
    let mut got = 0u64;
    while let Some(message) = stream.next().await {
        let data = message?.data;
        got = got.saturating_add(data.len() as u64);
        if got > limit {
            return Err(too_much(digest, limit));
        }
        seen(&data);
        file.write_all(&data)
            .await
            .map_err(|e| ActionError::io("write", path, e))?;
    }
    file.flush()
        .await
        .map_err(|e| ActionError::io("write", path, e))?;
    Ok(got)
}

/// The server sent more than was asked for.
fn too_much(digest: &Digest, asked: u64) -> ActionError {
    ActionError::Remote(tonic::Status::data_loss(format!(
        "the server sent more than the {asked} bytes asked for of {digest:?}"
    )))
}

/// The bytes received do not hash to the digest.
fn mismatch(digest: &Digest) -> ActionError {
    ActionError::Remote(tonic::Status::data_loss(format!(
        "downloaded bytes do not match {digest:?}"
    )))
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
            let remote = RemoteCas::new(links, InstanceName::default_instance(), 1);
            let path = dir.path().join(format!("blob{i}"));
            let err = remote.download(digest, &path).await.unwrap_err();
            match err {
                ActionError::Remote(s) => assert_eq!(s.code(), tonic::Code::DataLoss, "{s:?}"),
                other => panic!("{other:?}"),
            }
            let written = std::fs::metadata(&path).unwrap().len();
            assert!(written <= digest.size, "{written} bytes written");
        }
        server.abort();
    }
}
