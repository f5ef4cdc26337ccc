//! Whole blobs read into memory: small ones in batches, larger ones by ByteStream, each
//! checked against its digest.

use super::download::too_much;
use super::{mismatch, remote, RemoteCas};
use bytes::Bytes;
use futures::StreamExt;
use kiln_proto::reapi::BatchReadBlobsRequest;
use kiln_reapi::cas::CasError;
use kiln_reapi::digest::{Digest, Hasher, InstanceName};

impl RemoteCas {
    /// One batch read: in order, `None` for blobs the server lacks.
    pub(super) async fn read_batch(
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
    pub(super) async fn read_stream(
        &self,
        instance: &InstanceName,
        digest: Digest,
    ) -> Result<Option<Bytes>, CasError> {
        let mut stream = match Self::open_read(&self.links.main, instance, &digest, 0, 0).await {
            Ok(s) => s,
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
}
