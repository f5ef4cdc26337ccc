//! The owner's periodic work: expiring interrupted uploads and pins past their deadline,
//! and writing access times to the blobs' files, on the file lane.

use super::Owner;
use crate::shutdown::ShutdownWatch;
use crate::store::atime;
use crate::store::parked::ParkedUpload;
use futures::future::{select, Either};
use kiln_reapi::digest::BlobKey;
use std::path::PathBuf;
use std::rc::Rc;
use std::time::Duration;
use tracing::info;

/// Access times written per second of maintenance (per shard).
pub(super) const ATIME_FLUSH_PER_TICK: usize = 16_384;

impl Owner {
    /// Periodic work: expire parked uploads, write access times.
    pub(super) async fn maintain(self: Rc<Self>, stop: ShutdownWatch) {
        let mut stopping = Box::pin(stop.wait());
        loop {
            match select(
                self.runtime.sleep(Duration::from_secs(1)),
                stopping.as_mut(),
            )
            .await
            {
                Either::Left(_) => {}
                Either::Right(_) => return,
            }
            let expired = self.uploads.borrow_mut().expire(self.runtime.now());
            if !expired.is_empty() {
                info!(
                    shard = self.shard,
                    count = expired.len(),
                    "dropping expired interrupted uploads"
                );
            }
            self.remove_temps(expired);
            self.flush_atimes(ATIME_FLUSH_PER_TICK);
            // Cheap when no lease is due: the leases are ordered by deadline.
            self.expire_pins();
        }
    }

    /// Queues a blob's access time for its file (best effort: past the bound it is skipped,
    /// and only the order after a restart can suffer).
    pub(super) fn schedule_atime(&self, key: &BlobKey) {
        let mut pending = self.pending_atimes.borrow_mut();
        if pending.len() < self.settings.max_pending_atimes {
            pending.push(key.clone());
        }
    }

    /// Writes up to `limit` pending access times to the blobs' files, on the lane.
    pub(super) fn flush_atimes(&self, limit: usize) {
        let keys: Vec<BlobKey> = {
            let mut pending = self.pending_atimes.borrow_mut();
            let n = pending.len().min(limit);
            pending.drain(..n).collect()
        };
        let index = self.index.borrow();
        let times: Vec<(PathBuf, u64)> = keys
            .iter()
            .filter_map(|key| Some((self.layout.blob_path(key), index.peek(key)?.atime)))
            .collect();
        if !times.is_empty() {
            self.lane.queue(move || {
                for (path, atime) in times {
                    atime::persist(&path, atime);
                }
            });
        }
    }

    /// Deletes dropped uploads' temp files on the lane.
    pub(super) fn remove_temps(&self, uploads: Vec<ParkedUpload>) {
        for p in uploads {
            self.remove_later(p.temp);
        }
    }
}
