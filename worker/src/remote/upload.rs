//! Blobs uploaded: small ones in batches, larger ones by ByteStream from memory or a file.

use super::{remote, runs, RemoteCas, BATCH};
use bytes::Bytes;
use futures::StreamExt;
use kiln_proto::bytestream::WriteRequest;
use kiln_proto::reapi::{batch_update_blobs_request, BatchUpdateBlobsRequest};
use kiln_reapi::cas::CasError;
use kiln_reapi::digest::{BlobKey, Digest, InstanceName};
use kiln_reapi::resource::WriteResource;

impl RemoteCas {
    /// Uploads small blobs held in memory, in batches.
    pub(super) async fn upload_small(
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
    pub(super) async fn upload_stream<S>(
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
