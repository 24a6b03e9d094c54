//! The allocator's side of the image: host clusters handed out (refcount
//! increments, guarded against landing on metadata) and released (deferred
//! in [`crate::frees::Frees`] until the change that dropped them is durable
//! and no request in flight may use them, then applied in `writeback`).

use crate::error::{Error, Result};
use crate::image::{clash_mask, refcount_err, Inner};
use crate::meta::{Kind, MetaRanges};
use qcow2_format::entry::L2Entry;
use qcow2_io::Storage;
use qcow2_refcount::{RefcountError, Refcounts};

impl Inner {
    /// Clusters freed outside `flush_all` (snapshot and resize operations;
    /// bitmap operations punch their freed data clusters themselves):
    /// nothing is punched, but the host cluster compressed
    /// clusters are being packed into must not be appended to any more.
    pub(crate) fn forget_freed(&mut self) {
        let freed = self.refs.take_freed();
        if freed.contains(&(self.free_byte_offset >> self.geo.cluster_bits)) {
            self.free_byte_offset = 0;
        }
    }

    /// Allocates `n` contiguous host clusters (refcount 1). Returns the first index.
    pub(crate) fn alloc_clusters(&mut self, n: u64) -> Result<u64> {
        self.alloc_clusters_for(n, None)
    }

    /// [`Inner::alloc_clusters`] for a structure QEMU names when the
    /// allocator hands out offset 0 (the header's refcount was lost):
    /// "Preventing invalid allocation of L2 table at offset 0".
    pub(crate) fn alloc_clusters_for(&mut self, n: u64, what: Option<&str>) -> Result<u64> {
        // Refcount slices only ever hold increments and decrements whose
        // L2/L1 change is durable (the others wait in pending_frees), so
        // evicting them needs no ordering.
        self.reclaim_pending_frees(n)?;
        // Metadata whose refcount was lost looks free: the refcount layer
        // refuses to hand it out or to put a new refcount block or table on
        // it (nothing written), and the image is marked corrupt.
        // While no write can reach the file (`inactive_l2_gate`, enforced
        // by the file itself: `Shared::write_gate`), the allocation is left
        // to fail at its first write, with the gate's errno, as in QEMU
        // (whose allocator checks no overlaps); what it hands out can never
        // be written, and the gate stays for as long as the image is open
        // (lifting it takes a snapshot change, itself a refused write).
        let cs = self.geo.cluster_size();
        let (meta, l2_tables) = (&self.meta, &self.l2_tables);
        let gated = self.inactive_l2_unknown.is_some();
        let guard = |off: u64, len: u64| {
            if gated {
                return None;
            }
            Kind::first_of(clash_mask(meta, l2_tables, cs, off, len)).map(Kind::name)
        };
        let r = self.refs.alloc_guarded(&*self.file, n, &guard);
        r.map_err(|e| {
            let overlap = matches!(e, RefcountError::Overlap { .. });
            let e = match (e, what) {
                (RefcountError::Overlap { offset: 0, .. }, Some(what)) => Error::Corrupt(format!(
                    "{}: Preventing invalid allocation of {what} at offset 0",
                    self.name
                )),
                (e, _) => refcount_err(&self.name, e),
            };
            if overlap {
                self.mark_corrupt();
            }
            e
        })
    }

    /// [`releasable`] for this image; a corrupt refcount block marks it corrupt.
    pub(crate) fn can_free(&mut self, e: L2Entry) -> Result<bool> {
        if self.df {
            // Not refcounted: `free_entry_clusters` only passes the discard on.
            return Ok(e.has_host(true));
        }
        let cb = self.geo.cluster_bits;
        if points_into_metadata(&self.meta, &self.l2_tables, &self.refs, cb, e) {
            return Ok(false);
        }
        match releasable(&mut self.refs, &*self.file, cb, e) {
            Ok(ok) => Ok(ok),
            Err(err) => Err(self.refcount_failure(err)),
        }
    }

    /// The error for a refcount lookup that failed; marks the image corrupt
    /// when the refcount structures are.
    pub(crate) fn refcount_failure(&mut self, err: RefcountError) -> Error {
        let err = refcount_err(&self.name, err);
        if let Error::Corrupt(_) = err {
            self.mark_corrupt();
        }
        err
    }

    /// Makes clusters freed in this session available to an allocation of
    /// `n` clusters that would otherwise have to extend the file.
    ///
    /// A freed cluster stays in `pending_frees` (refcount unchanged) until
    /// the L2/L1 change that dropped it is durable, so `Refcounts::alloc`
    /// cannot hand it out, and allocations go to the end of the file. When
    /// one would, and applying the pending frees would free a cluster, this
    /// runs `flush_all`: it writes the L2/L1 changes, syncs, and only then
    /// lowers the refcounts (and punches the holes), so the allocation that
    /// follows may take a freed cluster.
    ///
    /// Why reuse is then safe: the old owner's L2/L1 change is durable
    /// before the cluster's refcount drops, so no crash can bring back an
    /// entry pointing at it. The new owner's L2 entry is written only after
    /// the refcount increase is durable (`prepare_l2_writeback`), as for any
    /// allocation. On disk the cluster is therefore referenced by at most
    /// one L2/L1 entry at any time, with a refcount of at least one whenever
    /// it is referenced: a crash leaks it at worst. Holes are punched in
    /// `flush_all` before the cluster is handed out again, never after.
    ///
    /// Cost: one flush (its syncs are the ones the ordering rules need
    /// before the refcounts may drop), and only when an allocation would
    /// grow the file while an earlier request left a cluster to free:
    /// workloads that never free are unaffected, allocations that fit in
    /// free space inside the file never force it, and a request never
    /// forces it for clusters it freed itself (a long rewrite of compressed
    /// clusters would otherwise flush once per cluster; QEMU, too, reuses
    /// at request granularity).
    fn reclaim_pending_frees(&mut self, n: u64) -> Result<()> {
        if self.frees.next_unchecked().is_none() {
            return Ok(());
        }
        let name = self.name.clone();
        let cs = self.geo.cluster_size();
        let c = self
            .refs
            .find_free(&*self.file, n)
            .map_err(|e| refcount_err(&name, e))?;
        if self.within_file(c.saturating_add(n).saturating_mul(cs))? {
            return Ok(());
        }
        // Only worth a sync if a refcount would reach zero. Entries shared
        // with a snapshot (or several compressed clusters in one host
        // cluster) just lose a reference: remember how far the list was
        // found to hold only those, so that each entry is looked at once.
        let mut frees = false;
        while let Some(c) = self.frees.next_unchecked() {
            let r = self
                .refs
                .get(&*self.file, c)
                .map_err(|e| refcount_err(&name, e))?;
            if r <= 1 {
                frees = true;
                break;
            }
            self.frees.mark_checked();
        }
        if frees {
            // The decrements may stay cached: the allocations that follow
            // change the same refcount blocks, written once before the new
            // L2 entries.
            self.flush_all_then(false, false)?;
        }
        Ok(())
    }

    /// Queues the release of the host clusters an L2 entry referenced (only
    /// when [`Inner::can_free`] said so, before the entry changed); the
    /// refcount drops only after the L2 change is durable.
    pub(crate) fn free_entry_clusters(&mut self, e: L2Entry, punch: bool) {
        let cb = self.geo.cluster_bits;
        if self.df {
            // Data in an external data file is not refcounted. Discarded
            // data is punched there at once, as QEMU passes the discard on:
            // the caller holds the range lock of the cluster (host = guest,
            // so nothing else writes it meanwhile), and a crash before the
            // entry change merely leaves it reading zeroes, which a discard
            // allows.
            if punch && e.has_host(true) {
                if let Some(d) = &self.data {
                    let _ = d.punch_hole(e.host_offset(), 1 << cb);
                }
            }
            return;
        }
        if e.is_compressed() {
            let d = e.compressed(cb);
            let first = d.first_cluster(cb) >> cb;
            let last = d.last_cluster(cb) >> cb;
            for c in first..=last {
                self.frees.push(c, false);
            }
            // The descriptor may name other data once the cluster is reused.
            self.sh.zcache.invalidate();
        } else if e.host_offset() != 0 {
            self.frees.push(e.host_offset() >> cb, punch);
        }
    }
}

/// Whether the refcounts of the host clusters `e` references may drop once
/// no entry references them, judged before the entry changes (so that a
/// failure leaves it as it was). As QEMU: clusters of an entry whose offset
/// is not cluster aligned, or whose refcount is already 0, are left alone
/// (`Ok(false)`: at worst a leak; the request goes on), while a refcount
/// block covering them that is itself invalid fails the request (`Err`).
pub(crate) fn releasable(
    refs: &mut Refcounts,
    file: &dyn Storage,
    cluster_bits: u32,
    e: L2Entry,
) -> std::result::Result<bool, RefcountError> {
    let (first, last) = if e.is_compressed() {
        let d = e.compressed(cluster_bits);
        (
            d.first_cluster(cluster_bits) >> cluster_bits,
            d.last_cluster(cluster_bits) >> cluster_bits,
        )
    } else {
        let off = e.host_offset();
        if off == 0 || off & ((1u64 << cluster_bits) - 1) != 0 {
            return Ok(false);
        }
        (off >> cluster_bits, off >> cluster_bits)
    };
    for c in first..=last {
        if refs.get(file, c)? == 0 {
            return Ok(false);
        }
    }
    Ok(true)
}

/// Whether the clusters an L2 entry references overlap metadata (a damaged
/// image). Such an entry must not free them: the refcount belongs to the
/// structure, and a hole punched there would destroy it; the cluster leaks
/// instead (QEMU would free it).
pub(crate) fn points_into_metadata(
    meta: &MetaRanges,
    l2_tables: &std::collections::HashSet<u64>,
    refs: &Refcounts,
    cb: u32,
    e: L2Entry,
) -> bool {
    let cs = 1u64 << cb;
    let (first, len) = if e.is_compressed() {
        let d = e.compressed(cb);
        let first = d.first_cluster(cb);
        (first, d.last_cluster(cb) + cs - first)
    } else {
        (e.host_offset(), cs)
    };
    first != 0 && (clash_mask(meta, l2_tables, cs, first, len) != 0 || refs.overlaps(first, len))
}
