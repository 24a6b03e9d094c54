//! Writeback in crash-safe order: the ordering rules of `durability`
//! applied to the caches (refcounts and data before the L2/L1 entries that
//! point at them; deferred frees and holes after the L2/L1 changes that
//! dropped them are durable), and the syncs they need.
//!
//! Lazy refcounts (QEMU's semantics): on an image using them, the first L2
//! entry linked to a new cluster marks the image dirty (incompatible bit 0,
//! written and synced before that entry can reach the file). From then on
//! the refcounts on disk are allowed to be stale, as a dirty image is
//! repaired on its next read-write open: rule 1 of `durability` keeps only
//! its data half (the data of a new cluster is durable before the entry
//! pointing at it), and flushes write no refcount block (a block leaves the
//! cache only when evicted). Every other rule stands. A new L2 table's
//! refcount is still written when the table is allocated, as QEMU does.
//! Close (and anything needing exact refcounts on disk) writes the
//! refcounts, syncs, then clears the dirty bit, durably (`mark_clean`).

use crate::error::{ioerr, Result};
use crate::image::{refcount_err, runs, Inner};
use crate::types::*;
use qcow2_format::put_be64;
use qcow2_io::{DebugEvent, Storage};

impl Inner {
    /// Syncs the file (per cache mode): everything written so far is durable.
    pub(crate) fn sync(&mut self) -> Result<()> {
        let start = self.sh.dur.sync_start();
        if self.opts.cache != CacheMode::Unsafe {
            self.check_sync_failed()?;
            let r = match &self.data {
                Some(d) => sync_files(&*self.file, &**d),
                None => self.file.sync(),
            };
            self.stats.file_syncs += 1;
            self.note_sync(r)?;
        }
        self.sh.dur.synced_to(start);
        Ok(())
    }

    /// Whether L2/L1 entries may not be written before refcounts are
    /// written back and synced (rule 1 of `durability`; a dirty refcount
    /// cache may hold increments).
    pub(crate) fn alloc_pending(&self) -> bool {
        (self.refs.is_dirty() && self.accurate_refcounts()) || self.sh.dur.alloc_pending()
    }

    /// Whether refcounts must be written back before the entries that
    /// depend on them (QEMU's `qcow2_need_accurate_refcounts`): always,
    /// unless this open marked the image dirty (lazy refcounts).
    pub(crate) fn accurate_refcounts(&self) -> bool {
        !self.dirtied
    }

    /// An L2 entry is about to be linked to a new cluster (or one whose
    /// entry changes from zero or unallocated): with lazy refcounts, marks
    /// the image dirty, written and synced, before it (QEMU's
    /// `qcow2_mark_dirty` in `qcow2_alloc_cluster_link_l2`).
    pub(crate) fn mark_dirty(&mut self) -> Result<()> {
        if !self.lazy || self.dirtied || self.read_only || self.header.is_dirty() {
            // Already dirty before this open (opened for repair): its
            // refcounts are a repair's business; ours keep being written
            // back and the bit is left alone.
            return Ok(());
        }
        self.set_incompat_bit(qcow2_format::header::INCOMPAT_DIRTY, true)?;
        self.dirtied = true;
        Ok(())
    }

    /// Makes the refcounts on disk exact again and clears the dirty bit:
    /// everything written back, refcount blocks included, and synced, then
    /// the header (QEMU's `qcow2_mark_clean`). Only when this open marked
    /// the image dirty; see [`Inner::mark_clean_always`].
    pub(crate) fn mark_clean(&mut self) -> Result<()> {
        if !self.dirtied {
            return Ok(());
        }
        self.mark_clean_always()
    }

    /// [`Inner::mark_clean`] whoever set the dirty bit (a repair that left
    /// no error).
    pub(crate) fn mark_clean_always(&mut self) -> Result<()> {
        if self.read_only || !self.header.is_dirty() {
            self.dirtied = false;
            return Ok(());
        }
        self.flush_close()?;
        let name = self.name.clone();
        if self
            .refs
            .flush(&*self.file)
            .map_err(|e| refcount_err(&name, e))?
        {
            self.stats.cache_flushes += 1;
        }
        // Unconditionally: refcount blocks evicted since the last sync are
        // not tracked by any flag.
        self.sync()?;
        self.set_incompat_bit(qcow2_format::header::INCOMPAT_DIRTY, false)?;
        self.dirtied = false;
        Ok(())
    }

    /// Something was written that a flush must make durable.
    pub(crate) fn set_unsynced(&mut self) {
        self.sh.dur.wrote();
    }

    /// L2/L1 entries now depend on refcounts or data not yet durable.
    pub(crate) fn set_alloc_unsynced(&mut self) -> Result<()> {
        self.mark_dirty()?;
        self.sh.dur.depend_on_all();
        Ok(())
    }

    /// Refcount decrements or hole punches were written.
    pub(crate) fn set_tail_unsynced(&mut self) {
        self.sh.dur.wrote_optional();
    }

    /// Before any L2 slice is written: refcounts of new clusters (unless
    /// the image is marked dirty) and their data must be durable.
    pub(crate) fn prepare_l2_writeback(&mut self) -> Result<()> {
        let name = self.name.clone();
        if self.refs.is_dirty() && self.accurate_refcounts() {
            self.inactive_l2_gate(0)?;
            self.refs
                .flush(&*self.file)
                .map_err(|e| refcount_err(&name, e))?;
            let n = self.sh.dur.wrote();
            self.sh.dur.depend_on(n);
        }
        if self.sh.dur.alloc_pending() {
            self.sync()?;
        }
        Ok(())
    }

    /// Writes back everything in crash-safe order; with `sync_end`, ends
    /// with a sync if anything was written.
    pub(crate) fn flush_all(&mut self, sync_end: bool) -> Result<()> {
        self.flush_all_then(sync_end, true)
    }

    /// [`Inner::flush_all`]; without `write_decrements` the refcount
    /// decrements it applies stay in the cache (written with the next
    /// refcount writeback, as their durability is optional).
    pub(crate) fn flush_all_then(&mut self, sync_end: bool, write_decrements: bool) -> Result<()> {
        let name = self.name.clone();
        // 1. Allocations (refcounts, data) before the L2/L1 entries pointing at them.
        if self.l2.is_dirty() || !self.l1_dirty.is_empty() {
            self.prepare_l2_writeback()?;
            // 2. L2 slices.
            if self.l2.is_dirty() {
                self.inactive_l2_gate(0)?;
            }
            if self
                .l2
                .flush(&*self.file)
                .map_err(ioerr("write L2 table", &name))?
            {
                self.set_unsynced();
                self.stats.cache_flushes += 1;
            }
            // 3. L1 entries, after the tables they point at are durable.
            if !self.l1_dirty.is_empty() {
                // New L2 tables and their refcounts before the L1 entries
                // (with lazy refcounts, written when the table was allocated).
                self.inactive_l2_gate(0)?;
                if self.refs.is_dirty() && self.accurate_refcounts() {
                    self.refs
                        .flush(&*self.file)
                        .map_err(|e| refcount_err(&name, e))?;
                    self.set_unsynced();
                }
                // Always: a refcount block written by cache eviction since the
                // last sync is not tracked by any flag.
                self.sync()?;
                self.write_l1_dirty()?;
            }
        }
        // 4. Deferred frees, after the L2/L1 changes are durable, and only
        //    those no request in flight may still use (see `Frees`).
        if !self.frees.is_empty() {
            if self.sh.dur.needs_sync() {
                self.sync()?;
            }
            let (ready, punch) = self.frees.take_ready(self.sh.tickets.oldest());
            for c in ready {
                self.refs
                    .update(&*self.file, c, -1)
                    .map_err(|e| refcount_err(&name, e))?;
            }
            let freed = self.refs.take_freed();
            if !freed.is_empty() {
                self.sh.zcache.invalidate();
            }
            if freed.contains(&(self.free_byte_offset >> self.geo.cluster_bits)) {
                self.free_byte_offset = 0;
            }
            if self.opts.discard == DiscardMode::Unmap {
                let cs = self.geo.cluster_size();
                for run in runs(freed.iter().copied().filter(|c| punch.contains(c))) {
                    self.file
                        .punch_hole(run.0 * cs, run.1 * cs)
                        .map_err(ioerr("punch hole", &name))?;
                    self.stats.holes_punched += 1;
                    self.set_tail_unsynced();
                }
            }
        }
        if write_decrements && self.refs.is_dirty() && self.accurate_refcounts() {
            self.inactive_l2_gate(0)?;
            if self
                .refs
                .flush(&*self.file)
                .map_err(|e| refcount_err(&name, e))?
            {
                // Only decrements can be waiting here (increments went out
                // before the L2/L1 writes that needed them): durability is
                // optional, a crash before the next sync merely leaks the
                // clusters.
                self.set_tail_unsynced();
                self.stats.cache_flushes += 1;
            }
        }
        if sync_end && self.sh.dur.needs_sync() {
            self.sync()?;
        }
        Ok(())
    }

    /// Flush for close: everything, deferred refcount decrements included, durable.
    pub(crate) fn flush_close(&mut self) -> Result<()> {
        self.flush_all(true)?;
        if self.sh.dur.tail_pending() {
            self.sync()?;
        }
        Ok(())
    }

    fn write_l1_dirty(&mut self) -> Result<()> {
        let dirty: Vec<usize> = std::mem::take(&mut self.l1_dirty).into_iter().collect();
        for (start, n) in runs(dirty.iter().map(|&i| i as u64)) {
            let mut b = vec![0u8; n as usize * 8];
            for k in 0..n as usize {
                put_be64(&mut b, k * 8, self.l1[start as usize + k]);
            }
            let off = self.header.l1_table_offset + start * 8;
            self.file.event(DebugEvent::L1Update);
            if let Err(e) = self.file.write_at(&b, off) {
                // Keep the entries dirty: dropping them would leave the new
                // L2 tables unreachable on disk for good, even after a later
                // flush succeeds (their data silently lost on reopen).
                self.l1_dirty.extend(dirty.iter().copied());
                return Err(ioerr("write L1 table", &self.name)(e));
            }
            self.set_unsynced();
        }
        Ok(())
    }
}

/// Syncs the external data file `data` (when it is not `file` itself),
/// then the image file: data is durable before the metadata naming it.
pub(crate) fn sync_files(
    file: &dyn qcow2_io::Storage,
    data: &dyn qcow2_io::Storage,
) -> std::io::Result<()> {
    if !std::ptr::addr_eq(
        file as *const dyn qcow2_io::Storage,
        data as *const dyn qcow2_io::Storage,
    ) {
        data.sync()?;
    }
    file.sync()
}
