//! `SplitBlob`: the blob copied out of the CAS into a temp file (checked on the way), cut with
//! FastCDC on a blocking thread, its chunks stored a batch at a time as they are cut — a few
//! chunks in memory at once, whatever the blob's size.

use super::{ChunkError, ChunkService};
use crate::temp_file::TempFile;
use bytes::Bytes;
use kiln_reapi::digest::{Digest, InstanceName};

/// Chunks stored per `write_blobs` call, by their bytes.
const BATCH_BYTES: usize = 8 << 20;

/// Chunks cut but not yet stored, between the cutting thread and the storing task.
const IN_FLIGHT: usize = 4;

/// Cuts `blob` into chunks, stores those the CAS lacks, and returns their digests in order.
pub(super) async fn split(
    svc: &ChunkService,
    instance: &InstanceName,
    blob: Digest,
) -> Result<Vec<Digest>, ChunkError> {
    if blob.is_empty_blob() {
        // The empty blob is the concatenation of no chunks.
        return Ok(Vec::new());
    }
    // The copy counts against the CAS's cap while it lives (a clone may cost nothing, but
    // that is the filesystem's to decide).
    let _room = svc.cas.hold_room(blob.size).await?;
    let temp = TempFile(svc.temp_path());
    if !svc.cas.read_to_file(instance, blob, &temp.0).await? {
        return Err(ChunkError::BlobMissing(blob));
    }
    let (tx, mut rx) = tokio::sync::mpsc::channel::<Result<(Digest, Bytes), ChunkError>>(IN_FLIGHT);
    let (params, path, function) = (svc.settings.params, temp.0.clone(), blob.function);
    let cutter = tokio::task::spawn_blocking(move || {
        let file = match std::fs::File::open(&path) {
            Ok(f) => f,
            Err(e) => {
                let _ = tx.blocking_send(Err(ChunkError::io("open the blob to split")(e)));
                return;
            }
        };
        for chunk in params.chunks(file) {
            let item = chunk
                .map(|c| (Digest::of(function, &c.data), Bytes::from(c.data)))
                .map_err(|e| ChunkError::io("read the blob to split")(std::io::Error::other(e)));
            let failed = item.is_err();
            if tx.blocking_send(item).is_err() || failed {
                return;
            }
        }
    });
    let mut list = Vec::new();
    let mut batch = Vec::new();
    let mut batch_bytes = 0;
    while let Some(item) = rx.recv().await {
        let (digest, data) = item?;
        if list.len() == svc.settings.max_chunks {
            return Err(ChunkError::SplitTooLong {
                max: svc.settings.max_chunks,
            });
        }
        list.push(digest);
        batch_bytes += data.len();
        batch.push((digest, data));
        if batch_bytes >= BATCH_BYTES {
            store(svc, instance, std::mem::take(&mut batch)).await?;
            batch_bytes = 0;
        }
    }
    store(svc, instance, batch).await?;
    cutter
        .await
        .map_err(|e| ChunkError::io("cut the blob")(std::io::Error::other(e)))?;
    let total: u64 = list.iter().map(|d| d.size).sum();
    if total != blob.size {
        return Err(ChunkError::io("cut the blob")(std::io::Error::other(
            format!("chunks cover {total} of {} bytes", blob.size),
        )));
    }
    Ok(list)
}

/// Stores the chunks of `batch` the CAS does not hold yet.
async fn store(
    svc: &ChunkService,
    instance: &InstanceName,
    batch: Vec<(Digest, Bytes)>,
) -> Result<(), ChunkError> {
    if batch.is_empty() {
        return Ok(());
    }
    let digests: Vec<Digest> = batch.iter().map(|(d, _)| *d).collect();
    let missing: std::collections::HashSet<Digest> = svc
        .cas
        .find_missing(instance, &digests)
        .await?
        .into_iter()
        .collect();
    let new: Vec<(Digest, Bytes)> = batch
        .into_iter()
        .filter(|(d, _)| missing.contains(d))
        .collect();
    if !new.is_empty() {
        svc.cas.write_blobs(instance, new).await?;
    }
    Ok(())
}
