//! `SpliceBlob`: the chunks read from the CAS in order — small ones a batch at a time, large
//! ones through a file — and written into a temp file by a blocking thread that hashes them;
//! the blob is stored (linked from that file) only if the hash is the digest's, so a splice
//! that does not match leaves nothing visible.

use super::{ChunkError, ChunkService};
use crate::temp_file::TempFile;
use bytes::Bytes;
use kiln_reapi::cas::RoomHold;
use kiln_reapi::digest::{Digest, Hasher, InstanceName};
use std::io::{Read, Write};

/// Chunks up to this size are read into memory; larger ones are copied through a file.
const IN_MEMORY: u64 = 4 << 20;

/// Bytes of small chunks read per `read_blobs` call.
const BATCH_BYTES: u64 = 8 << 20;

/// One piece of the blob, in order.
enum Piece {
    Bytes(Bytes),
    /// A large chunk copied out of the CAS, with the room its copy holds (released once the
    /// writer has read it).
    File(TempFile, RoomHold),
}

/// What a splice did.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Spliced {
    /// The blob was stored already: nothing was read.
    Present,
    /// The chunks were read and their concatenation checked (and stored).
    Checked,
}

/// Concatenates `chunks` (all present, their sizes adding up to the blob's) and stores the
/// result as `blob` if it hashes to it.
pub(super) async fn splice(
    svc: &ChunkService,
    instance: &InstanceName,
    blob: Digest,
    chunks: &[Digest],
) -> Result<Spliced, ChunkError> {
    let check = |hash: [u8; 32]| {
        if hash == blob.hash {
            Ok(())
        } else {
            Err(ChunkError::HashMismatch {
                expected: blob,
                actual: hex::encode(hash),
            })
        }
    };
    if blob.size == 0 {
        // Always stored; its only list is the empty one (a list of empty chunks is not kept).
        return check(Hasher::new(blob.function).finalize()).map(|()| Spliced::Present);
    }
    // Already stored: nothing to do (the spec allows a no-op).
    if svc.cas.find_missing(instance, &[blob]).await?.is_empty() {
        return Ok(Spliced::Present);
    }
    // The concatenation's temp file counts against the CAS's cap while it is written, like
    // an upload's: a splice of a small chunk listed many times cannot fill the disk.
    let room = svc.cas.hold_room(blob.size).await?;
    let temp = TempFile(svc.temp_path());
    let (tx, mut rx) = tokio::sync::mpsc::channel::<Piece>(4);
    let (path, function) = (temp.0.clone(), blob.function);
    let writer = tokio::task::spawn_blocking(move || -> std::io::Result<[u8; 32]> {
        let mut out = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&path)?;
        let mut hasher = Hasher::new(function);
        let mut buf = vec![0u8; 1 << 20];
        while let Some(piece) = rx.blocking_recv() {
            match piece {
                Piece::Bytes(data) => {
                    hasher.update(&data);
                    out.write_all(&data)?;
                }
                Piece::File(file, _room) => {
                    let mut src = std::fs::File::open(&file.0)?;
                    loop {
                        let n = src.read(&mut buf)?;
                        if n == 0 {
                            break;
                        }
                        hasher.update(&buf[..n]);
                        out.write_all(&buf[..n])?;
                    }
                }
            }
        }
        Ok(hasher.finalize())
    });
    let fed = feed(svc, instance, chunks, &tx).await;
    drop(tx);
    let written = writer
        .await
        .map_err(|e| ChunkError::io("write the spliced blob")(std::io::Error::other(e)))
        .and_then(|r| r.map_err(ChunkError::io("write the spliced blob")));
    match fed {
        // The writer stopped first: its error (a full disk) is the answer.
        Err(ChunkError::WriterStopped) => {
            written?;
            return Err(ChunkError::WriterStopped);
        }
        // A missing chunk is the better answer than the writer's end that it caused.
        Err(e) => return Err(e),
        Ok(()) => {}
    }
    check(written?)?;
    // Stored, the blob counts as itself: counted twice while it is committed, it could be
    // the oldest blob an eviction for that excess finds.
    drop(room);
    svc.cas.write_file(instance, blob, &temp.0).await?;
    Ok(Spliced::Checked)
}

/// Reads the chunks in order and hands them to the writer.
async fn feed(
    svc: &ChunkService,
    instance: &InstanceName,
    chunks: &[Digest],
    tx: &tokio::sync::mpsc::Sender<Piece>,
) -> Result<(), ChunkError> {
    let gone = |chunk: Digest| ChunkError::ChunksMissing {
        count: 1,
        first: chunk,
    };
    let stopped = || ChunkError::WriterStopped;
    let mut at = 0;
    while at < chunks.len() {
        if chunks[at].size > IN_MEMORY {
            let room = svc.cas.hold_room(chunks[at].size).await?;
            let file = TempFile(svc.temp_path());
            if !svc.cas.read_to_file(instance, chunks[at], &file.0).await? {
                return Err(gone(chunks[at]));
            }
            tx.send(Piece::File(file, room))
                .await
                .map_err(|_| stopped())?;
            at += 1;
            continue;
        }
        let mut end = at;
        let mut bytes = 0;
        while end < chunks.len() && chunks[end].size <= IN_MEMORY && bytes < BATCH_BYTES {
            bytes += chunks[end].size;
            end += 1;
        }
        let read = svc.cas.read_blobs(instance, &chunks[at..end]).await?;
        for (chunk, data) in chunks[at..end].iter().zip(read) {
            let data = data.ok_or_else(|| gone(*chunk))?;
            tx.send(Piece::Bytes(data)).await.map_err(|_| stopped())?;
        }
        at = end;
    }
    Ok(())
}
