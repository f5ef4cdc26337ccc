//! The process's allocator: jemalloc. Under the churn of a full cache (blobs evicted and
//! inserted all day, operations finishing and expiring) the same server's RSS grew more than
//! twice as fast with glibc's malloc; jemalloc returns freed pages in the background and
//! reports what is allocated and what is resident on `/metrics` (docs/operations.md, "Memory").

use kiln_controlplane::admin::AllocatorStats;

#[global_allocator]
static GLOBAL: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// Bytes allocated by the program and bytes the allocator keeps resident, as of now.
pub fn stats() -> Option<AllocatorStats> {
    // jemalloc's statistics are a snapshot taken when the epoch advances.
    tikv_jemalloc_ctl::epoch::advance().ok()?;
    Some(AllocatorStats {
        allocated: tikv_jemalloc_ctl::stats::allocated::read().ok()? as u64,
        resident: tikv_jemalloc_ctl::stats::resident::read().ok()? as u64,
    })
}

/// Lets jemalloc return freed pages to the system from its own thread, so an idle server
/// shrinks too (without it, pages are returned only as a side effect of later allocations).
pub fn purge_in_background() {
    if let Err(e) = tikv_jemalloc_ctl::background_thread::write(true) {
        tracing::warn!(error = %e, "jemalloc background purging is not available");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_a_large_allocation_while_it_lives() {
        let before = stats().expect("jemalloc stats").allocated;
        let block = vec![1u8; 64 << 20];
        let during = stats().expect("jemalloc stats");
        assert!(
            during.allocated >= before + (63 << 20),
            "{before} -> {during:?}"
        );
        assert!(during.resident >= 64 << 20, "{during:?}");
        drop(block);
        let after = stats().expect("jemalloc stats").allocated;
        assert!(after + (32 << 20) < during.allocated, "freed: {after}");
    }
}
