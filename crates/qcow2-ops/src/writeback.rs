//! Writeback in crash-safe order: the ordering rules of `durability`
//! applied to the caches (refcounts and data before the L2/L1 entries that
//! point at them; deferred frees and holes after the L2/L1 changes that
//! dropped them are durable), and the syncs they need.

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
        self.refs.is_dirty() || self.sh.dur.alloc_pending()
    }

    /// Something was written that a flush must make durable.
    pub(crate) fn set_unsynced(&mut self) {
        self.sh.dur.wrote();
    }

    /// L2/L1 entries now depend on refcounts or data not yet durable.
    pub(crate) fn set_alloc_unsynced(&mut self) {
        self.sh.dur.depend_on_all();
    }

    /// Refcount decrements or hole punches were written.
    pub(crate) fn set_tail_unsynced(&mut self) {
        self.sh.dur.wrote_optional();
    }

    /// Before any L2 slice is written: refcounts of new clusters and their
    /// data must be durable.
    pub(crate) fn prepare_l2_writeback(&mut self) -> Result<()> {
        let name = self.name.clone();
        if self.refs.is_dirty() {
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
                // New L2 tables and their refcounts before the L1 entries.
                if self.refs.is_dirty() {
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
        if write_decrements
            && self.refs.is_dirty()
            && self
                .refs
                .flush(&*self.file)
                .map_err(|e| refcount_err(&name, e))?
        {
            // Only decrements can be waiting here (increments went out before
            // the L2/L1 writes that needed them): durability is optional, a
            // crash before the next sync merely leaks the clusters.
            self.set_tail_unsynced();
            self.stats.cache_flushes += 1;
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
