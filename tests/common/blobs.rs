//! REAPI client helpers: digests computed independently of the server's code, ByteStream
//! uploads and downloads, and resource names.

use bytes::Bytes;
use futures::StreamExt;
use kiln_proto::bytestream::byte_stream_client::ByteStreamClient;
use kiln_proto::bytestream::{ReadRequest, WriteRequest, WriteResponse};
use kiln_proto::reapi::content_addressable_storage_client::ContentAddressableStorageClient;
use kiln_proto::reapi::{self, digest_function::Value as Function};
use sha2::Digest as _;
use tonic::transport::Channel;

/// Largest message the test clients accept.
pub const MAX_MESSAGE: usize = 64 << 20;

/// The digest of `data` under `function` (SHA-256 or BLAKE3).
pub fn digest(function: Function, data: &[u8]) -> reapi::Digest {
    let hash = match function {
        Function::Sha256 => hex::encode(sha2::Sha256::digest(data)),
        Function::Blake3 => blake3::hash(data).to_hex().to_string(),
        other => panic!("tests only use sha256 and blake3, not {other:?}"),
    };
    reapi::Digest {
        hash,
        size_bytes: data.len() as i64,
    }
}

/// The resource-name segment for a function (`blake3/` or nothing for SHA-256).
pub fn function_segment(function: Function) -> &'static str {
    match function {
        Function::Blake3 => "blake3/",
        _ => "",
    }
}

/// `{instance}/blobs/{fn/}{hash}/{size}`.
pub fn read_name(instance: &str, function: Function, d: &reapi::Digest) -> String {
    let prefix = if instance.is_empty() {
        String::new()
    } else {
        format!("{instance}/")
    };
    format!(
        "{prefix}blobs/{}{}/{}",
        function_segment(function),
        d.hash,
        d.size_bytes
    )
}

/// `{instance}/uploads/{uuid}/blobs/{fn/}{hash}/{size}`.
pub fn write_name(instance: &str, function: Function, d: &reapi::Digest) -> String {
    let prefix = if instance.is_empty() {
        String::new()
    } else {
        format!("{instance}/")
    };
    format!(
        "{prefix}uploads/{}/blobs/{}{}/{}",
        uuid::Uuid::new_v4(),
        function_segment(function),
        d.hash,
        d.size_bytes
    )
}

/// Deterministic pseudo-random bytes.
pub fn pseudo_random(seed: u64, len: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(len + 8);
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    while out.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(&x.to_le_bytes());
    }
    out.truncate(len);
    out
}

/// A ByteStream client with large message limits.
pub fn bytestream(channel: &Channel) -> ByteStreamClient<Channel> {
    ByteStreamClient::new(channel.clone())
        .max_decoding_message_size(MAX_MESSAGE)
        .max_encoding_message_size(MAX_MESSAGE)
}

/// A CAS client with large message limits.
pub fn cas(channel: &Channel) -> ContentAddressableStorageClient<Channel> {
    ContentAddressableStorageClient::new(channel.clone())
        .max_decoding_message_size(MAX_MESSAGE)
        .max_encoding_message_size(MAX_MESSAGE)
}

/// The WriteRequests that upload `data` to `name` in `chunk`-byte pieces from `offset`.
pub fn write_requests(name: &str, data: &[u8], chunk: usize, offset: usize) -> Vec<WriteRequest> {
    let mut out = Vec::new();
    let mut pos = offset;
    loop {
        let end = (pos + chunk).min(data.len());
        out.push(WriteRequest {
            resource_name: if out.is_empty() {
                name.to_string()
            } else {
                String::new()
            },
            write_offset: pos as i64,
            finish_write: end == data.len(),
            data: Bytes::copy_from_slice(&data[pos..end]),
        });
        pos = end;
        if pos == data.len() {
            return out;
        }
    }
}

/// Uploads `data` with ByteStream.
pub async fn write(
    channel: &Channel,
    name: &str,
    data: &[u8],
    chunk: usize,
) -> Result<WriteResponse, tonic::Status> {
    let requests = write_requests(name, data, chunk, 0);
    bytestream(channel)
        .write(futures::stream::iter(requests))
        .await
        .map(|r| r.into_inner())
}

/// Downloads a blob (or a range of it) with ByteStream.
pub async fn read(
    channel: &Channel,
    name: &str,
    offset: i64,
    limit: i64,
) -> Result<Vec<u8>, tonic::Status> {
    let mut stream = bytestream(channel)
        .read(ReadRequest {
            resource_name: name.to_string(),
            read_offset: offset,
            read_limit: limit,
        })
        .await?
        .into_inner();
    let mut out = Vec::new();
    while let Some(msg) = stream.next().await {
        out.extend_from_slice(&msg?.data);
    }
    Ok(out)
}

/// FindMissingBlobs for `digests`.
pub async fn find_missing(
    channel: &Channel,
    instance: &str,
    function: Function,
    digests: Vec<reapi::Digest>,
) -> Vec<reapi::Digest> {
    cas(channel)
        .find_missing_blobs(reapi::FindMissingBlobsRequest {
            instance_name: instance.to_string(),
            blob_digests: digests,
            digest_function: function as i32,
        })
        .await
        .expect("FindMissingBlobs")
        .into_inner()
        .missing_blob_digests
}

/// A `Write` call whose messages the test sends one at a time.
pub struct OpenUpload {
    /// Where the test sends messages; dropping it ends the request stream.
    pub tx: tokio::sync::mpsc::Sender<WriteRequest>,
    /// The call; abort it to reset the stream.
    pub call: tokio::task::JoinHandle<Result<tonic::Response<WriteResponse>, tonic::Status>>,
}

/// Starts a `Write` call fed by the test.
pub fn open_upload(channel: &Channel) -> OpenUpload {
    let (tx, rx) = tokio::sync::mpsc::channel(64);
    let mut client = bytestream(channel);
    let call = tokio::spawn(async move {
        client
            .write(tokio_stream::wrappers::ReceiverStream::new(rx))
            .await
    });
    OpenUpload { tx, call }
}

/// An upload of `data` (in messages of `chunk` bytes) begun and left open: its first
/// message is sent and has arrived (the server holds room for the whole blob).
pub struct HeldUpload {
    upload: OpenUpload,
    rest: Vec<WriteRequest>,
}

impl HeldUpload {
    /// Begins the upload of `data` as `name`.
    pub async fn begin(channel: &Channel, name: &str, data: &[u8], chunk: usize) -> HeldUpload {
        let upload = open_upload(channel);
        let mut rest = write_requests(name, data, chunk, 0);
        let first = rest.remove(0);
        upload.tx.send(first).await.unwrap();
        wait_committed(channel, name, chunk.min(data.len())).await;
        HeldUpload { upload, rest }
    }

    /// Sends the rest and returns the upload's answer.
    pub async fn finish(self) -> WriteResponse {
        for r in self.rest {
            self.upload.tx.send(r).await.unwrap();
        }
        self.upload.call.await.unwrap().unwrap().into_inner()
    }
}

/// Every `Directory` of the tree under `root` (default instance), through GetTree, in the
/// order it lists them.
pub async fn tree_directories(channel: &Channel, root: &reapi::Digest) -> Vec<reapi::Directory> {
    let mut pages = cas(channel)
        .get_tree(reapi::GetTreeRequest {
            root_digest: Some(root.clone()),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let mut all = Vec::new();
    while let Some(page) = pages.message().await.unwrap() {
        all.extend(page.directories);
    }
    all
}

/// `QueryWriteStatus`: (committed size, complete), or the error.
pub async fn query(channel: &Channel, name: &str) -> Result<(i64, bool), tonic::Status> {
    let r = bytestream(channel)
        .query_write_status(kiln_proto::bytestream::QueryWriteStatusRequest {
            resource_name: name.to_string(),
        })
        .await?
        .into_inner();
    Ok((r.committed_size, r.complete))
}

/// Waits until the server reports `size` bytes received for upload `name`.
pub async fn wait_committed(channel: &Channel, name: &str, size: usize) {
    super::eventually(&format!("{size} bytes of {name} to arrive"), || async {
        let (committed, _) = query(channel, name).await.ok()?;
        (committed == size as i64).then_some(())
    })
    .await
}

/// The file a blob of the default instance and SHA-256 is stored in under `data_dir`.
pub fn blob_file(data_dir: &std::path::Path, d: &reapi::Digest) -> std::path::PathBuf {
    data_dir
        .join("cas/i_/sha256")
        .join(&d.hash[..2])
        .join(format!("{}-{}", d.hash, d.size_bytes))
}

/// Replaces a stored blob's bytes (stored blobs are read-only).
pub fn overwrite(path: &std::path::Path, bytes: &[u8]) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o644)).unwrap();
    std::fs::write(path, bytes).unwrap();
}
