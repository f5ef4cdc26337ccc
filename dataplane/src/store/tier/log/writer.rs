//! The log's writer: one thread per log that takes every append queued, writes them as one
//! batch at the end of the segment being appended, syncs its data once (when durable),
//! indexes them and answers them all; then drops the oldest segments while the log is over
//! its cap, copying forward what is still used. Callers on any executor only queue and wait:
//! no file call runs on a data-plane core.

use super::index_file::{self, Entries};
use super::record;
use super::segments;
use super::state::{each_once, Keep};
use super::Shared;
use crate::store::{Committed, StoreError};
use bytes::Bytes;
use futures::channel::oneshot;
use kiln_reapi::digest::{BlobKey, Hasher};
use std::cell::RefCell;
use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use tracing::warn;

/// Bytes of blobs written by one batch at most (more wait for the next).
const BATCH_BYTES: usize = 8 << 20;

/// Records of a dropped segment sorted out per hold of the index.
const SORT_CHUNK: usize = 4096;

/// A blob to append, and who waits for it.
pub struct Append {
    pub key: BlobKey,
    pub data: Bytes,
    pub reply: oneshot::Sender<Result<Committed, StoreError>>,
}

/// What the writer is asked to do.
pub enum Job {
    /// Append a blob.
    Append(Append),
    /// Answer once everything queued before has been written, and the eviction after it
    /// done (tests wait on this to read the log's counters).
    #[cfg_attr(not(test), allow(dead_code))]
    Settle(oneshot::Sender<()>),
}

/// Where a record went.
struct Placed {
    segment: u64,
    offset: u64,
    record_len: u64,
}

/// The writer thread's state.
pub struct Writer {
    pub shared: Arc<Shared>,
    pub rx: async_channel::Receiver<Job>,
    /// The index of the segment being appended, written when it is sealed.
    pub entries: RefCell<Entries>,
}

impl Writer {
    /// Serves appends until every sender is gone.
    pub fn run(self) {
        while let Ok(first) = self.rx.recv_blocking() {
            let (mut batch, mut settled, mut bytes) = (Vec::new(), Vec::new(), 0usize);
            let mut next = Some(first);
            while let Some(job) = next.take() {
                match job {
                    Job::Append(a) => {
                        bytes += a.data.len();
                        batch.push(a);
                    }
                    Job::Settle(tx) => settled.push(tx),
                }
                if bytes < BATCH_BYTES && settled.is_empty() {
                    next = self.rx.try_recv().ok();
                }
            }
            if !batch.is_empty() {
                self.write(batch);
            }
            self.evict();
            for tx in settled {
                let _ = tx.send(());
            }
        }
    }

    /// Appends a batch and answers it.
    fn write(&self, batch: Vec<Append>) {
        // Blobs already held, and second copies within the batch, are not written again.
        let mut fresh: Vec<Append> = Vec::with_capacity(batch.len());
        let mut fresh_keys: HashSet<BlobKey> = HashSet::with_capacity(batch.len());
        let mut copies: HashMap<BlobKey, Vec<Append>> = HashMap::new();
        {
            let state = self.shared.lock();
            for a in batch {
                if state.holds(&a.key) {
                    let _ = a.reply.send(Ok(Committed::AlreadyPresent));
                } else if !fresh_keys.insert(a.key.clone()) {
                    copies.entry(a.key.clone()).or_default().push(a);
                } else {
                    fresh.push(a);
                }
            }
        }
        if fresh.is_empty() {
            return;
        }
        let records: Vec<(&BlobKey, &[u8])> =
            fresh.iter().map(|a| (&a.key, a.data.as_ref())).collect();
        match self.append(&records) {
            Ok(placed) => {
                let mut state = self.shared.lock();
                for (a, p) in fresh.into_iter().zip(placed) {
                    let key = a.key.clone();
                    let new = state.insert(key, p.segment, p.offset, p.record_len, true, None);
                    let outcome = if new {
                        Committed::Stored
                    } else {
                        Committed::AlreadyPresent
                    };
                    let _ = a.reply.send(Ok(outcome));
                    for c in copies.remove(&a.key).unwrap_or_default() {
                        let _ = c.reply.send(Ok(Committed::AlreadyPresent));
                    }
                }
                self.shared.publish(&state);
            }
            Err(e) => {
                warn!(error = %e, "log: a batch could not be written");
                for a in fresh {
                    let _ = a.reply.send(Err(e.retell()));
                    for c in copies.remove(&a.key).unwrap_or_default() {
                        let _ = c.reply.send(Err(e.retell()));
                    }
                }
            }
        }
    }

    /// Writes `records` at the end of the segment being appended (a new one when it is full),
    /// synced when durable; the index is not told.
    fn append(&self, records: &[(&BlobKey, &[u8])]) -> Result<Vec<Placed>, StoreError> {
        let shared = &self.shared;
        let headers: Vec<Vec<u8>> = records.iter().map(|(k, d)| record::header(k, d)).collect();
        let size: usize = records
            .iter()
            .zip(&headers)
            .map(|((_, d), h)| d.len() + h.len())
            .sum();
        let mut buf = Vec::with_capacity(size);
        let mut placed = Vec::with_capacity(records.len());
        let (mut segment, mut file, mut start) = self.active()?;
        if start > 0 && start.saturating_add(size as u64) > shared.options.segment {
            // The next segment first: while it cannot be made, this one stays the one
            // appended, and its index (of every record in it) is not written yet.
            let id = segment + 1;
            let created = segments::create(&shared.dir, id, shared.options.durable)
                .map_err(|e| StoreError::io("create", segments::path(&shared.dir, id), e))?;
            // Sealed: its index lets the next start list it without reading it.
            let mut entries = self.entries.borrow_mut();
            if let Err(e) = entries.write(&shared.dir, segment, start, shared.options.durable) {
                warn!(segment, error = %e, "log: cannot write a segment's index file");
            }
            entries.clear();
            drop(entries);
            let created = Arc::new(created);
            shared.lock().add_segment(id, created.clone(), 0);
            (segment, file, start) = (id, created, 0);
        }
        for ((_, data), header) in records.iter().zip(&headers) {
            let at = start + buf.len() as u64;
            buf.extend_from_slice(header);
            buf.extend_from_slice(data);
            placed.push(Placed {
                segment,
                offset: at + header.len() as u64,
                record_len: (header.len() + data.len()) as u64,
            });
        }
        if let Err(e) = segments::append(&file, start, &buf, shared.options.durable) {
            // What was written of the batch goes: the next batch takes its place, and the
            // segment's length stays the one its index will name.
            let _ = file.set_len(start);
            return Err(StoreError::io(
                "append to",
                segments::path(&shared.dir, segment),
                e,
            ));
        }
        let mut entries = self.entries.borrow_mut();
        for (header, p) in headers.iter().zip(&placed) {
            entries.push(header, p.offset);
        }
        drop(entries);
        shared.metrics.log_syncs.inc();
        shared.metrics.log_appended.inc_by(records.len() as u64);
        shared.lock().grew(buf.len() as u64);
        Ok(placed)
    }

    fn active(&self) -> Result<(u64, Arc<std::fs::File>, u64), StoreError> {
        self.shared.lock().active().ok_or(StoreError::Unavailable)
    }

    /// Drops the oldest segments while the log is over its cap.
    fn evict(&self) {
        let victims = self.shared.lock().over(self.shared.options.cap);
        // Records used since their segment was sealed are copied forward within half a
        // segment per pass, so that each pass frees at least half of what it drops.
        let mut budget = self.shared.options.segment / 2;
        for id in victims {
            self.drop_segment(id, &mut budget);
        }
    }

    /// Copies forward segment `id`'s records that are pinned or still used (see
    /// [`super::state::State::sort_out`]), drops the rest, and deletes it. A copy that fails
    /// (the disk full, say) drops those records too: the segment goes whatever happens, or a
    /// full disk could never be freed.
    fn drop_segment(&self, id: u64, budget: &mut u64) {
        let shared = &self.shared;
        let (file, slots) = {
            let mut state = shared.lock();
            match (state.segment_file(id), state.take_slots(id)) {
                (Some(file), Some(slots)) => (file, slots),
                _ => return,
            }
        };
        let slots = each_once(slots);
        // A chunk at a time: the cores wait on the index for one chunk, not a segment.
        let mut keep = Vec::new();
        for chunk in slots.chunks(SORT_CHUNK) {
            let dropped = {
                let mut state = shared.lock();
                let (kept, dropped) = state.sort_out(id, chunk, budget);
                shared.publish(&state);
                keep.extend(kept);
                dropped
            };
            shared.metrics.log_evicted.inc_by(dropped.len() as u64);
            for key in &dropped {
                shared.forget(key);
            }
        }
        // In batches of at most BATCH_BYTES: never the whole segment in memory at once.
        let mut keep = keep.into_iter().peekable();
        while keep.peek().is_some() {
            let mut copies: Vec<(Keep, Vec<u8>)> = Vec::new();
            let mut bytes = 0usize;
            while bytes < BATCH_BYTES {
                let Some(k) = keep.next() else { break };
                match segments::read(&file, k.offset, k.key.digest.size) {
                    Ok(data)
                        if k.checked
                            || Hasher::hash(k.key.digest.function, &data) == k.key.digest.hash =>
                    {
                        bytes += data.len();
                        copies.push((k, data));
                    }
                    Ok(_) => shared.damaged(&k.key, id, k.offset),
                    Err(e) => {
                        warn!(error = %e, "log: a record to copy forward could not be read; dropped");
                        shared.lose(&k.key, id, k.offset);
                    }
                }
            }
            self.copy_forward(id, &copies);
        }
        let mut state = shared.lock();
        state.drop_segment(id);
        shared.publish(&state);
        drop(state);
        let path = segments::path(&shared.dir, id);
        if let Err(e) = std::fs::remove_file(&path) {
            warn!(segment = id, error = %e, "log: cannot delete a dropped segment's file");
        }
        index_file::remove(&shared.dir, id);
    }

    /// Appends `copies` of records of segment `id` and points the index at them; when the
    /// append fails, they leave the index.
    fn copy_forward(&self, id: u64, copies: &[(Keep, Vec<u8>)]) {
        if copies.is_empty() {
            return;
        }
        let shared = &self.shared;
        let records: Vec<(&BlobKey, &[u8])> =
            copies.iter().map(|(k, d)| (&k.key, d.as_slice())).collect();
        match self.append(&records) {
            Ok(placed) => {
                let mut state = shared.lock();
                for ((k, _), p) in copies.iter().zip(placed) {
                    let from = Some((id, k.offset));
                    state.insert(k.key.clone(), p.segment, p.offset, p.record_len, true, from);
                }
                shared.metrics.log_copied.inc_by(copies.len() as u64);
            }
            Err(e) => {
                warn!(segment = id, records = copies.len(), error = %e, "log: cannot copy records forward; dropped with their segment");
                shared.metrics.log_evicted.inc_by(copies.len() as u64);
                for (k, _) in copies {
                    shared.lose(&k.key, id, k.offset);
                }
            }
        }
    }
}
