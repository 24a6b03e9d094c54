//! What has reached stable storage, and what must before what.
//!
//! The ordering rules of the engine, stated once:
//! 1. **Allocation before reference.** A refcount increase, and the data of
//!    a newly written cluster, are durable before any L2 or L1 entry that
//!    points at them is written: before an L2 slice (or L1 entry) goes to
//!    the file, [`Durability::alloc_pending`] must be false (the caller
//!    writes the refcount cache back, then syncs). With lazy refcounts,
//!    once the dirty bit is durable the refcount half is waived (a dirty
//!    image is repaired on open): only the data half stands (`writeback`).
//! 2. **Unreference before release.** A refcount decrease (and a hole
//!    punched over the cluster) follows the durable L2/L1 change that
//!    dropped the last reference: deferred frees are applied only after a
//!    sync that [`Durability::needs_sync`] asks for, and only once no request
//!    still in flight may hold the old mapping (see `inflight`).
//! 3. **Flush.** A flush makes durable every write that completed before it
//!    started: [`Durability::needs_sync`] is false once a sync that started
//!    after the last such write has succeeded. A flush with nothing written
//!    issues no sync.
//! 4. **Optional durability.** Refcount decrements and punched holes need
//!    no sync of their own (a crash before it leaks clusters at worst):
//!    [`Durability::tail_pending`] makes close sync them, nothing else.
//!
//! How: every write that matters is numbered after it completed (a global
//! sequence, [`Durability::wrote`]); a sync records the number it started
//! at, and everything numbered up to it is durable. Dependencies are
//! numbers too: "L2 entries may be written once everything up to `n` is
//! durable". All counters only grow (`fetch_max`), so concurrent writers,
//! syncs and flushes never lose a mark: a flag cleared by one thread while
//! another sets it would (the reason this replaces the old flags).
//!
//! Why this is sound without a model checker: each property is a
//! comparison of two monotone counters. A write gets its number after its
//! system call returned; a sync reads the sequence before it starts
//! (`SeqCst`), so a write numbered at or below it completed before the
//! sync began and is covered. A number taken after that read is above it
//! and stays pending. The only read-modify-writes are `fetch_add` on the
//! sequence and `fetch_max` on the marks, which commute.

use crossbeam_utils::CachePadded;
use std::sync::atomic::{AtomicU64, Ordering::SeqCst};

/// Durability state of one image file, shared by the metadata paths (under
/// the image lock) and the data paths (outside it).
#[derive(Default, Debug)]
pub(crate) struct Durability {
    /// Sequence of completed writes (bumped by every data write: on a
    /// cache line of its own, away from the marks that are mostly read).
    seq: CachePadded<AtomicU64>,
    /// Every write numbered up to this is durable.
    synced: AtomicU64,
    /// Highest number of a write a flush must make durable.
    needed: CachePadded<AtomicU64>,
    /// Highest number of a write whose durability is optional (frees, holes).
    tail: AtomicU64,
    /// L2/L1 entries may be written once everything up to this is durable.
    alloc: AtomicU64,
}

impl Durability {
    /// A write that a flush must make durable has completed; returns its number.
    pub(crate) fn wrote(&self) -> u64 {
        let n = self.seq.fetch_add(1, SeqCst) + 1;
        self.needed.fetch_max(n, SeqCst);
        n
    }

    /// A write whose durability is optional (refcount decrements, holes).
    pub(crate) fn wrote_optional(&self) {
        let n = self.seq.fetch_add(1, SeqCst) + 1;
        self.tail.fetch_max(n, SeqCst);
    }

    /// L2/L1 entries about to be set point at what was written up to `n`
    /// (rule 1).
    pub(crate) fn depend_on(&self, n: u64) {
        self.alloc.fetch_max(n, SeqCst);
    }

    /// L2/L1 entries about to be set point at everything written so far.
    pub(crate) fn depend_on_all(&self) {
        self.depend_on(self.seq.load(SeqCst));
    }

    /// Where a sync starting now would reach (read before the sync).
    pub(crate) fn sync_start(&self) -> u64 {
        self.seq.load(SeqCst)
    }

    /// A sync that started at `start` succeeded.
    pub(crate) fn synced_to(&self, start: u64) {
        self.synced.fetch_max(start, SeqCst);
    }

    /// Whether a flush must sync (rule 3).
    pub(crate) fn needs_sync(&self) -> bool {
        self.needed.load(SeqCst) > self.synced.load(SeqCst)
    }

    /// Whether optional writes are not yet durable (rule 4).
    pub(crate) fn tail_pending(&self) -> bool {
        self.tail.load(SeqCst) > self.synced.load(SeqCst)
    }

    /// Whether entries may not be written yet without a sync (rule 1; the
    /// refcount cache's own dirtiness is the caller's to check).
    pub(crate) fn alloc_pending(&self) -> bool {
        self.alloc.load(SeqCst) > self.synced.load(SeqCst)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_sync_covers_what_completed_before_it() {
        let d = Durability::default();
        assert!(!d.needs_sync() && !d.alloc_pending() && !d.tail_pending());
        let w = d.wrote();
        d.depend_on(w);
        assert!(d.needs_sync() && d.alloc_pending());
        let s = d.sync_start();
        // A write completing during the sync is not covered by it.
        let late = d.wrote();
        d.synced_to(s);
        assert!(!d.alloc_pending());
        assert!(d.needs_sync());
        d.depend_on(late);
        assert!(d.alloc_pending());
        d.wrote_optional();
        let s = d.sync_start();
        d.synced_to(s);
        assert!(!d.needs_sync() && !d.alloc_pending() && !d.tail_pending());
        // An older sync finishing late takes nothing back.
        d.synced_to(1);
        assert!(!d.needs_sync());
    }
}
