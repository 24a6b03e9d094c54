//! Refcount table and refcount blocks: lookups, allocation of host
//! clusters, increments and decrements, growth of the refcount structures.
//!
//! The layer answers "give me N free clusters" and "change this cluster's
//! refcount"; it never looks at L1/L2 tables. Decisions about when refcount
//! changes may reach the disk (the ordering rules) belong to the caller, who
//! flushes [`Refcounts::flush`] at the right moments. The only writes this
//! layer issues on its own are the ones that make new refcount structures
//! reachable (new refcount block, moved refcount table), each preceded by a
//! sync of what it points at.
#![forbid(unsafe_code)]
#![warn(missing_docs)]

use qcow2_cache::{CacheConfig, CacheStats, TableCache};
use qcow2_format::header::MAX_REFTABLE_BYTES;
use qcow2_format::refcount as rc;
use qcow2_format::{be64, put_be32, put_be64};
use qcow2_io::{DebugEvent, Storage};
use std::collections::HashSet;
use std::io;
use std::ops::Range;
use thiserror::Error;

/// Errors of the refcount layer.
#[derive(Debug, Error)]
pub enum RefcountError {
    /// I/O failed.
    #[error("refcount I/O: {0}")]
    Io(#[from] io::Error),
    /// On-disk refcount structures are inconsistent.
    #[error("refcount structures corrupt: {0}")]
    Corrupt(String),
    /// Out of room (refcount overflow, table limit).
    #[error("{0}")]
    NoSpace(String),
    /// A cluster about to be handed out, or to receive a new refcount block
    /// or table, holds other metadata (its refcount was lost). Nothing was
    /// written; the caller should mark the image corrupt.
    #[error("Preventing invalid write on metadata (overlaps with {what}): {purpose} at {offset:#x} ({len} bytes)")]
    Overlap {
        /// QEMU's name of the metadata structure hit ("active L2 table", ...).
        what: &'static str,
        /// What was to be placed there.
        purpose: &'static str,
        /// Byte offset of the range.
        offset: u64,
        /// Length of the range in bytes.
        len: u64,
    },
}

/// Tells the refcount layer which host byte ranges hold metadata it does not
/// own itself (header, L1/L2 tables, snapshot and bitmap structures), so that
/// it never hands them out or places a new refcount structure there.
pub trait MetadataGuard {
    /// The name of a metadata structure overlapping `[off, off+len)`, if any.
    fn clash(&self, off: u64, len: u64) -> Option<&'static str>;
}

/// A guard that knows of no other metadata.
pub struct NoGuard;

impl MetadataGuard for NoGuard {
    fn clash(&self, _off: u64, _len: u64) -> Option<&'static str> {
        None
    }
}

impl<F: Fn(u64, u64) -> Option<&'static str>> MetadataGuard for F {
    fn clash(&self, off: u64, len: u64) -> Option<&'static str> {
        self(off, len)
    }
}

type Result<T> = std::result::Result<T, RefcountError>;

/// Refcount state of an open image.
pub struct Refcounts {
    cluster_bits: u32,
    order: u32,
    entries_per_block: u64,
    table: Vec<u64>,
    table_offset: u64,
    table_clusters: u32,
    cache: TableCache,
    free_hint: u64,
    /// Clusters that reached refcount zero since the caller last took them.
    freed: Vec<u64>,
    /// Host offsets of the refcount blocks, for overlap checks.
    blocks: HashSet<u64>,
    /// Byte ranges owned by other metadata (header, L1): no refcount block may lie there.
    protected: Vec<(u64, u64)>,
}

impl Refcounts {
    /// Loads the refcount table. `cache_bytes` bounds the block cache.
    pub fn load(
        storage: &dyn Storage,
        cluster_bits: u32,
        order: u32,
        table_offset: u64,
        table_clusters: u32,
        cache_bytes: usize,
        granularity: usize,
    ) -> Result<Self> {
        let cs = 1u64 << cluster_bits;
        let bytes = table_clusters as u64 * cs;
        if bytes > MAX_REFTABLE_BYTES {
            return Err(RefcountError::Corrupt("refcount table too large".into()));
        }
        let mut raw = vec![0u8; bytes as usize];
        storage.event(DebugEvent::ReftableLoad);
        storage.read_at(&mut raw, table_offset)?;
        // Entries are validated when used, so that check can still open
        // (and repair) an image with a broken entry.
        let table: Vec<u64> = raw.chunks_exact(8).map(|c| be64(c, 0)).collect();
        let slice = cs.min(64 << 10) as usize;
        Ok(Refcounts {
            cluster_bits,
            order,
            entries_per_block: rc::entries_per_block(cluster_bits, order),
            table_offset,
            table_clusters,
            cache: TableCache::new(CacheConfig {
                slice_size: slice,
                capacity: (cache_bytes / slice).max(4),
                granularity,
                // Reported when a block is used for an update, not when it
                // is read in (QEMU reads blocks for lookups silently).
                load_event: None,
                write_event: Some(DebugEvent::RefblockUpdatePart),
            }),
            free_hint: 0,
            freed: Vec::new(),
            blocks: table.iter().copied().filter(|&e| e != 0).collect(),
            protected: Vec::new(),
            table,
        })
    }

    /// Declares byte ranges owned by other metadata (header, L1 table).
    pub fn set_protected(&mut self, ranges: Vec<(u64, u64)>) {
        self.protected = ranges;
    }

    /// Whether the host cluster at byte offset `off` is a refcount block.
    pub fn is_refblock(&self, off: u64) -> bool {
        self.blocks.contains(&off)
    }

    /// Whether `[off, off+len)` overlaps the refcount table or a refcount block.
    pub fn overlaps(&self, off: u64, len: u64) -> bool {
        self.overlaps_table(off, len) || self.overlaps_block(off, len)
    }

    /// Whether `[off, off+len)` overlaps the refcount table.
    pub fn overlaps_table(&self, off: u64, len: u64) -> bool {
        let cs = self.cluster_size();
        let end = off.saturating_add(len);
        let rt_end = self
            .table_offset
            .saturating_add(self.table_clusters as u64 * cs);
        off < rt_end && self.table_offset < end
    }

    /// Whether `[off, off+len)` overlaps a refcount block.
    pub fn overlaps_block(&self, off: u64, len: u64) -> bool {
        let cs = self.cluster_size();
        let end = off.saturating_add(len);
        let mut c = off & !(cs - 1);
        while c < end {
            if self.blocks.contains(&c) {
                return true;
            }
            c += cs;
            if c - (off & !(cs - 1)) > 64 * cs {
                // Long ranges: test the blocks instead.
                return self
                    .blocks
                    .iter()
                    .any(|&b| b < end && off < b.saturating_add(cs));
            }
        }
        false
    }

    /// Counts clusters below `end` with a nonzero refcount, stopping at
    /// `limit`. Ranges without a refcount block are skipped whole.
    pub fn count_used(&mut self, storage: &dyn Storage, end: u64, limit: u64) -> Result<u64> {
        let epb = self.entries_per_block;
        let mut count = 0;
        let mut c = 0;
        while c < end && count < limit {
            let block = c / epb;
            if self.table.get(block as usize).copied().unwrap_or(0) == 0 {
                c = (block + 1) * epb;
                continue;
            }
            if self.get(storage, c)? != 0 {
                count += 1;
            }
            c += 1;
        }
        Ok(count)
    }

    /// Cluster size.
    pub fn cluster_size(&self) -> u64 {
        1 << self.cluster_bits
    }
    /// Refcount order.
    pub fn order(&self) -> u32 {
        self.order
    }
    /// Largest refcount value.
    pub fn max_refcount(&self) -> u64 {
        rc::max_refcount(self.order)
    }
    /// Entries of the refcount table (block offsets, 0: none).
    pub fn table(&self) -> &[u64] {
        &self.table
    }
    /// Refcount table location and length in clusters.
    pub fn table_location(&self) -> (u64, u32) {
        (self.table_offset, self.table_clusters)
    }
    /// Clusters described by one refcount block.
    pub fn entries_per_block(&self) -> u64 {
        self.entries_per_block
    }
    /// Cache counters.
    pub fn cache_stats(&self) -> CacheStats {
        self.cache.stats
    }
    /// Resets cache counters.
    pub fn reset_stats(&mut self) {
        self.cache.stats = CacheStats::default();
    }
    /// Whether refcount changes wait in the cache.
    pub fn is_dirty(&self) -> bool {
        self.cache.is_dirty()
    }
    /// Whether loading another slice would have to write back a dirty one.
    pub fn victim_is_dirty(&self) -> bool {
        self.cache.victim_is_dirty()
    }

    /// Locates the cache slice and byte/entry index for `cluster`, loading it.
    /// `None` when no refcount block covers the cluster.
    fn locate(&mut self, storage: &dyn Storage, cluster: u64) -> Result<Option<(usize, usize)>> {
        let block = cluster / self.entries_per_block;
        let Some(&boff) = self.table.get(block as usize) else {
            return Ok(None);
        };
        if boff == 0 {
            return Ok(None);
        }
        let cs = self.cluster_size();
        let rt_end = self.table_offset + self.table_clusters as u64 * cs;
        if boff & (cs - 1) != 0 {
            // QEMU's words for it.
            return Err(RefcountError::Corrupt(format!(
                "Refblock offset {boff:#x} unaligned (reftable index: {block:#x})"
            )));
        }
        if boff < cs
            || (boff < rt_end && self.table_offset < boff.saturating_add(cs))
            || self
                .protected
                .iter()
                .any(|&(a, b)| boff < b && a < boff.saturating_add(cs))
        {
            return Err(RefcountError::Corrupt(format!(
                "refcount block {block} offset {boff:#x} is invalid"
            )));
        }
        let idx = cluster % self.entries_per_block;
        let byte = rc::byte_of(idx, self.order);
        let slice = self.cache.slice_size() as u64;
        let slice_off = boff + byte / slice * slice;
        let id = match self.cache.lookup(slice_off) {
            Some(id) => id,
            None => self.cache.load(storage, slice_off)?,
        };
        let entries_per_slice = (slice * 8) >> self.order;
        Ok(Some((id, (idx % entries_per_slice) as usize)))
    }

    /// Refcount of host cluster `cluster` (0 when uncovered).
    pub fn get(&mut self, storage: &dyn Storage, cluster: u64) -> Result<u64> {
        Ok(match self.locate(storage, cluster)? {
            None => 0,
            Some((id, i)) => rc::get(self.cache.data(id), i, self.order),
        })
    }

    fn set_covered(&mut self, id: usize, i: usize, value: u64) {
        let byte = ((i as u64) << self.order) / 8;
        let width = (1usize << self.order).div_ceil(8);
        let d = self.cache.data_mut(id, byte as usize, width);
        // `d` starts at the entry's byte; index relative to that byte.
        let rel = match self.order {
            0..=2 => i % (8 >> self.order),
            _ => 0,
        };
        rc::set(d, rel, self.order, value);
    }

    /// Sets the refcount of `cluster`, creating its refcount block if needed.
    /// `avoid` is a cluster range the caller is about to use, so new
    /// structures must not be placed there.
    pub fn set(
        &mut self,
        storage: &dyn Storage,
        cluster: u64,
        value: u64,
        avoid: Range<u64>,
    ) -> Result<()> {
        self.set_guarded(storage, cluster, value, avoid, &NoGuard)
    }

    /// [`Refcounts::set`] where a new refcount block or table must not
    /// overlap metadata `guard` knows of ([`RefcountError::Overlap`]).
    pub fn set_guarded(
        &mut self,
        storage: &dyn Storage,
        cluster: u64,
        value: u64,
        avoid: Range<u64>,
        guard: &dyn MetadataGuard,
    ) -> Result<()> {
        if value > self.max_refcount() {
            return Err(RefcountError::NoSpace(format!(
                "refcount of cluster {cluster} would exceed {}",
                self.max_refcount()
            )));
        }
        storage.event(DebugEvent::RefblockAlloc);
        let block = cluster / self.entries_per_block;
        if self.table.get(block as usize).is_some_and(|&b| b != 0) {
            storage.event(DebugEvent::RefblockLoad);
        }
        let loc = match self.locate(storage, cluster)? {
            Some(l) => l,
            None => {
                if value == 0 {
                    return Ok(());
                }
                self.create_block(storage, cluster / self.entries_per_block, avoid, guard)?;
                self.locate(storage, cluster)?
                    .ok_or_else(|| RefcountError::Corrupt("new refcount block missing".into()))?
            }
        };
        let old = rc::get(self.cache.data(loc.0), loc.1, self.order);
        if old == value {
            return Ok(());
        }
        self.set_covered(loc.0, loc.1, value);
        if value == 0 {
            self.freed.push(cluster);
            self.free_hint = self.free_hint.min(cluster);
        }
        Ok(())
    }

    /// Adds `delta` to the refcount of `cluster`.
    pub fn update(&mut self, storage: &dyn Storage, cluster: u64, delta: i64) -> Result<u64> {
        let old = self.get(storage, cluster)?;
        let new = if delta < 0 {
            old.checked_sub(delta.unsigned_abs()).ok_or_else(|| {
                RefcountError::Corrupt(format!(
                    "refcount of cluster {cluster} would drop below zero"
                ))
            })?
        } else {
            old.checked_add(delta as u64)
                .filter(|&v| v <= self.max_refcount())
                .ok_or_else(|| {
                    RefcountError::NoSpace(format!("refcount of cluster {cluster} overflows"))
                })?
        };
        if delta < 0 {
            storage.event(DebugEvent::ClusterFree);
        }
        self.set(storage, cluster, new, cluster..cluster + 1)?;
        Ok(new)
    }

    /// Finds `n` contiguous free clusters (refcount zero) and sets their
    /// refcount to one. Returns the first cluster index (never the header
    /// cluster).
    pub fn alloc(&mut self, storage: &dyn Storage, n: u64) -> Result<u64> {
        self.alloc_guarded(storage, n, &NoGuard)
    }

    /// [`Refcounts::alloc`] that refuses ([`RefcountError::Overlap`], nothing
    /// changed) when the free-looking run, or a refcount block or table it
    /// needs, overlaps metadata: the layer's own structures or what `guard`
    /// knows of. A clash means refcounts were lost: the image is corrupt.
    pub fn alloc_guarded(
        &mut self,
        storage: &dyn Storage,
        n: u64,
        guard: &dyn MetadataGuard,
    ) -> Result<u64> {
        storage.event(DebugEvent::ClusterAlloc);
        let start = self.find_free(storage, n)?;
        if start
            .checked_add(n)
            .is_none_or(|e| e > (1u64 << (56 - self.cluster_bits)))
        {
            return Err(RefcountError::NoSpace("host offsets exhausted".into()));
        }
        let cs = self.cluster_size();
        if start == 0 {
            // The header's refcount was lost.
            return Err(RefcountError::Overlap {
                what: "qcow2_header",
                purpose: "allocation",
                offset: 0,
                len: n * cs,
            });
        }
        self.refuse_overlap(start * cs, n * cs, "allocation", guard)?;
        for k in 0..n {
            self.set_guarded(storage, start + k, 1, start..start + n, guard)?;
        }
        if self.free_hint == start {
            self.free_hint = start + n;
        }
        Ok(start)
    }

    /// The first cluster of the lowest run of `n` free clusters, changing
    /// nothing on disk: where [`Refcounts::alloc`] would allocate now.
    pub fn find_free(&mut self, storage: &dyn Storage, n: u64) -> Result<u64> {
        // From cluster 0: the header's refcount may be lost too, which
        // `alloc_guarded` then refuses, as QEMU does.
        let mut start = self.free_hint;
        'search: loop {
            for k in 0..n {
                let c = start + k;
                if self.get(storage, c)? != 0 {
                    start = c + 1;
                    if k == 0 && c == self.free_hint {
                        self.free_hint = start;
                    }
                    continue 'search;
                }
            }
            break;
        }
        Ok(start)
    }

    /// Takes the list of clusters whose refcount dropped to zero.
    pub fn take_freed(&mut self) -> Vec<u64> {
        std::mem::take(&mut self.freed)
    }

    /// Writes back dirty refcount slices. Returns whether anything was written.
    pub fn flush(&mut self, storage: &dyn Storage) -> Result<bool> {
        Ok(self.cache.flush(storage)?)
    }

    /// Drops cached slices (after an external rewrite of the structures).
    pub fn invalidate(&mut self) {
        self.cache.clear();
    }

    /// Refuses `[off, off+len)` when it overlaps the refcount structures,
    /// the protected ranges or metadata `guard` knows of.
    fn refuse_overlap(
        &self,
        off: u64,
        len: u64,
        purpose: &'static str,
        guard: &dyn MetadataGuard,
    ) -> Result<()> {
        let end = off.saturating_add(len);
        let what = if self.overlaps_table(off, len) {
            Some("refcount table")
        } else if self.overlaps_block(off, len) {
            Some("refcount block")
        } else if self.protected.iter().any(|&(a, b)| off < b && a < end) {
            // Header and L1 table (QEMU's names need the caller's guard;
            // this is only a fallback when there is none).
            guard.clash(off, len).or(Some("image metadata"))
        } else {
            guard.clash(off, len)
        };
        match what {
            Some(what) => Err(RefcountError::Overlap {
                what,
                purpose,
                offset: off,
                len,
            }),
            None => Ok(()),
        }
    }

    /// Makes a refcount block for `block` reachable.
    fn create_block(
        &mut self,
        storage: &dyn Storage,
        block: u64,
        avoid: Range<u64>,
        guard: &dyn MetadataGuard,
    ) -> Result<()> {
        if block as usize >= self.table.len() {
            return self.grow_table(storage, block, avoid, guard);
        }
        let epb = self.entries_per_block;
        let first = block * epb;
        let cs = self.cluster_size();
        // Every cluster of an uncovered block has refcount zero: take the
        // first one the caller does not need. It describes itself.
        let mut r = first;
        while avoid.contains(&r) {
            r += 1;
        }
        let self_described = r < first + epb;
        if !self_described {
            // The caller is about to use every cluster this block describes
            // (a run longer than one block covers): the block goes to the
            // first free cluster after the run, counted in the block that
            // covers that place (made first if need be). The clusters in
            // between are in use, so avoiding them too changes nothing.
            r = avoid.end;
            while self.get(storage, r)? != 0 {
                r += 1;
            }
            self.refuse_overlap(r * cs, cs, "new refcount block", guard)?;
            self.set_guarded(storage, r, 1, avoid.start..r + 1, guard)?;
            if self.table.get(block as usize).is_some_and(|&b| b != 0) {
                return Ok(());
            }
        }
        let boff = r * cs;
        // Its refcount reads as zero only because no block covers it: it
        // may still hold metadata whose refcount was lost.
        if self_described {
            self.refuse_overlap(boff, cs, "new refcount block", guard)?;
        }
        self.table[block as usize] = boff;
        self.blocks.insert(boff);
        match self.publish_block(storage, block, boff, self_described.then_some(r)) {
            Ok(synced) => synced,
            Err(e) => {
                // The table entry did not reach the file: forget the block, so
                // nothing is allocated from it that the disk cannot describe.
                self.table[block as usize] = 0;
                self.blocks.remove(&boff);
                self.cache.discard_range(boff, cs);
                Err(e)
            }
        }
    }

    /// Writes a new block (counting itself when it is cluster `own`, else
    /// counted already in another block) and then the table entry for it.
    /// Outer error: nothing was made reachable; inner error: the entry was
    /// written but the final sync failed.
    fn publish_block(
        &mut self,
        storage: &dyn Storage,
        block: u64,
        boff: u64,
        own: Option<u64>,
    ) -> Result<Result<()>> {
        self.zero_block_in_cache(storage, boff)?;
        if let Some(r) = own {
            let (id, i) = self
                .locate(storage, r)?
                .ok_or_else(|| RefcountError::Corrupt("new block not found".into()))?;
            self.set_covered(id, i, 1);
        }
        // The block must be on disk before the table entry that points at it.
        storage.event(DebugEvent::RefblockAllocWrite);
        self.cache.flush(storage)?;
        storage.sync()?;
        let mut e = [0u8; 8];
        put_be64(&mut e, 0, boff);
        storage.event(DebugEvent::RefblockAllocHookup);
        storage.write_at(&e, self.table_offset + block * 8)?;
        // Once written, the entry stands even if this sync fails.
        Ok(storage.sync().map_err(RefcountError::from))
    }

    /// Fills the new blocks, writes the new table, then switches the header.
    fn publish_table(
        &mut self,
        storage: &dyn Storage,
        new_offs: &[u64],
        s: u64,
        new_clusters: u64,
        cs: u64,
    ) -> Result<Result<()>> {
        for &off in new_offs {
            self.zero_block_in_cache(storage, off)?;
        }
        for c in s..s + new_clusters + new_offs.len() as u64 {
            match self.locate(storage, c)? {
                Some((id, i)) => self.set_covered(id, i, 1),
                None => {
                    return Err(RefcountError::Corrupt(
                        "new refcount table not covered".into(),
                    ))
                }
            }
        }
        storage.event(DebugEvent::RefblockAllocWriteBlocks);
        self.cache.flush(storage)?;
        let mut raw = vec![0u8; (new_clusters * cs) as usize];
        for (i, &e) in self.table.iter().enumerate() {
            put_be64(&mut raw, i * 8, e);
        }
        storage.event(DebugEvent::RefblockAllocWriteTable);
        storage.write_at(&raw, s * cs)?;
        storage.sync()?;
        storage.event(DebugEvent::RefblockAllocSwitchTable);
        // Switch the header over in one write.
        let mut h = [0u8; 12];
        put_be64(&mut h, 0, s * cs);
        put_be32(&mut h, 8, new_clusters as u32);
        storage.write_at(&h, 48)?;
        // Once written, the new table stands even if this sync fails.
        Ok(storage.sync().map_err(RefcountError::from))
    }

    /// Drops the refcount blocks that count nothing but themselves (as
    /// QEMU does after shrinking an image): their table entries are cleared
    /// on disk, then synced, before the blocks are forgotten. Returns the
    /// host offsets of the blocks dropped; one that lies outside its own
    /// range is still counted by another block (the caller releases it).
    pub fn drop_unused_blocks(&mut self, storage: &dyn Storage) -> Result<Vec<u64>> {
        self.cache.flush(storage)?;
        let cs = self.cluster_size();
        let epb = self.entries_per_block;
        let mut unused = Vec::new();
        for i in 0..self.table.len() {
            let boff = self.table[i];
            if boff == 0 {
                continue;
            }
            let own = boff / cs;
            let first = i as u64 * epb;
            let mut only_self = true;
            for c in first..first + epb {
                if c != own && self.get(storage, c)? != 0 {
                    only_self = false;
                    break;
                }
            }
            if only_self {
                unused.push(i);
            }
        }
        if unused.is_empty() {
            return Ok(Vec::new());
        }
        for &i in &unused {
            storage.event(DebugEvent::ReftableUpdate);
            storage.write_at(&[0u8; 8], self.table_offset + i as u64 * 8)?;
        }
        storage.sync()?;
        let mut out = Vec::with_capacity(unused.len());
        for i in unused {
            let boff = std::mem::take(&mut self.table[i]);
            self.blocks.remove(&boff);
            self.cache.discard_range(boff, cs);
            out.push(boff);
        }
        Ok(out)
    }

    fn zero_block_in_cache(&mut self, storage: &dyn Storage, boff: u64) -> Result<()> {
        let slice = self.cache.slice_size() as u64;
        let mut o = boff;
        while o < boff + self.cluster_size() {
            self.cache.insert_zeroed(storage, o)?;
            o += slice;
        }
        Ok(())
    }

    /// Moves the refcount table to a larger place that covers `block`.
    fn grow_table(
        &mut self,
        storage: &dyn Storage,
        block: u64,
        avoid: Range<u64>,
        guard: &dyn MetadataGuard,
    ) -> Result<()> {
        storage.event(DebugEvent::ReftableGrow);
        let cs = self.cluster_size();
        let epb = self.entries_per_block;
        let needed_entries = (block + 1).max(self.table.len() as u64 * 2);
        let new_clusters = (needed_entries * 8).div_ceil(cs);
        if new_clusters * cs > MAX_REFTABLE_BYTES {
            return Err(RefcountError::NoSpace(
                "refcount table would exceed 8 MiB".into(),
            ));
        }
        let new_entries = new_clusters * cs / 8;
        // Everything from here on is unused.
        let file_end = storage.len()?.div_ceil(cs);
        let s = file_end.max(avoid.end);
        // Blocks to create: the requested one and those covering the new
        // table and the new blocks themselves.
        let covered = |tbl: &Vec<u64>, b: u64| tbl.get(b as usize).is_some_and(|&o| o != 0);
        let mut k = 0u64;
        let mut blocks: Vec<u64>;
        loop {
            blocks = Vec::new();
            if !covered(&self.table, block) {
                blocks.push(block);
            }
            let end = s + new_clusters + k;
            for b in s / epb..=(end - 1) / epb {
                if !covered(&self.table, b) && !blocks.contains(&b) {
                    blocks.push(b);
                }
            }
            if blocks.len() as u64 == k {
                break;
            }
            k = blocks.len() as u64;
        }
        if blocks.iter().any(|&b| b >= new_entries) {
            return Err(RefcountError::NoSpace(
                "refcount table growth does not converge".into(),
            ));
        }
        blocks.sort_unstable();
        // Past the end of the file, so free unless metadata lies out there.
        self.refuse_overlap(
            s * cs,
            (new_clusters + blocks.len() as u64) * cs,
            "new refcount table",
            guard,
        )?;
        // Flush pending changes of existing blocks first.
        self.cache.flush(storage)?;
        let mut table = self.table.clone();
        table.resize(new_entries as usize, 0);
        for (j, &b) in blocks.iter().enumerate() {
            table[b as usize] = (s + new_clusters + j as u64) * cs;
            self.blocks.insert(table[b as usize]);
        }
        let old_table = std::mem::replace(&mut self.table, table);
        let old_loc = (self.table_offset, self.table_clusters);
        let new_offs: Vec<u64> = blocks.iter().map(|&b| self.table[b as usize]).collect();
        let synced = match self.publish_table(storage, &new_offs, s, new_clusters, cs) {
            Ok(synced) => synced,
            Err(e) => {
                // The header still names the old table: forget the new structures.
                self.table = old_table;
                for &o in &new_offs {
                    self.blocks.remove(&o);
                    self.cache.discard_range(o, cs);
                }
                return Err(e);
            }
        };
        self.table_offset = s * cs;
        self.table_clusters = new_clusters as u32;
        synced?;
        // Release the old table.
        let first_old = old_loc.0 / cs;
        for c in first_old..first_old + old_loc.1 as u64 {
            self.update(storage, c, -1)?;
        }
        if self.free_hint > first_old {
            self.free_hint = first_old;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use qcow2_format::be32;
    use qcow2_io::MemStorage;

    const CS: u64 = 512;

    /// A minimal layout with 512-byte clusters: header (0), refcount table
    /// (cluster 1, one cluster = 64 entries), first refcount block (cluster 2).
    fn setup(order: u32) -> (MemStorage, Refcounts) {
        let st = MemStorage::from_bytes(vec![0; 3 * CS as usize]);
        let mut e = [0u8; 8];
        put_be64(&mut e, 0, 2 * CS);
        st.write_at(&e, CS).unwrap();
        let mut h = [0u8; 12];
        put_be64(&mut h, 0, CS);
        put_be32(&mut h, 8, 1);
        st.write_at(&h, 48).unwrap();
        let mut r = Refcounts::load(&st, 9, order, CS, 1, 4096, 512).unwrap();
        for c in 0..3 {
            r.set(&st, c, 1, 0..0).unwrap();
        }
        (st, r)
    }

    #[test]
    fn run_longer_than_a_block_covers() {
        // 16-bit refcounts: a 512-byte block describes 256 clusters. A run
        // of 600 covers block 1's whole range, so that block cannot
        // describe itself and goes after the run.
        let (st, mut r) = setup(4);
        let start = r.alloc(&st, 600).unwrap();
        assert_eq!(start, 3);
        r.flush(&st).unwrap();
        let blocks: Vec<u64> = r.table().iter().copied().filter(|&b| b != 0).collect();
        assert_eq!(blocks.len(), 3, "{blocks:x?}");
        for &b in &blocks {
            assert!(
                !(start * CS..(start + 600) * CS).contains(&b),
                "block {b:#x} inside the run"
            );
        }
        let (toff, tclusters) = r.table_location();
        let mut again = Refcounts::load(&st, 9, 4, toff, tclusters, 4096, 512).unwrap();
        for c in start..start + 600 {
            assert_eq!(again.get(&st, c).unwrap(), 1, "cluster {c}");
        }
        for &b in &blocks {
            assert_eq!(again.get(&st, b / CS).unwrap(), 1, "block at {b:#x}");
        }
        let mut used = 0;
        for c in 0..2000 {
            used += again.get(&st, c).unwrap();
        }
        // header, table, blocks and the run: nothing leaked, nothing lost.
        assert_eq!(used, 2 + blocks.len() as u64 + 600);
    }

    #[test]
    fn alloc_is_contiguous_and_reuses_freed() {
        let (st, mut r) = setup(4);
        assert_eq!(r.alloc(&st, 1).unwrap(), 3);
        assert_eq!(r.alloc(&st, 4).unwrap(), 4);
        assert_eq!(r.get(&st, 7).unwrap(), 1);
        r.update(&st, 5, -1).unwrap();
        assert_eq!(r.take_freed(), vec![5]);
        assert_eq!(r.alloc(&st, 1).unwrap(), 5, "freed cluster reused");
        assert_eq!(r.alloc(&st, 2).unwrap(), 8, "a run skips single holes");
        assert!(r.update(&st, 100, -1).is_err(), "below zero is corruption");
        r.flush(&st).unwrap();
        // 16-bit big-endian entries in the block at cluster 2.
        let mut b = [0u8; 20];
        st.read_at(&mut b, 2 * CS).unwrap();
        assert_eq!(
            &b[..20],
            &[0, 1, 0, 1, 0, 1, 0, 1, 0, 1, 0, 1, 0, 1, 0, 1, 0, 1, 0, 1]
        );
    }

    /// A guard claiming the clusters in `busy` for an "active L2 table".
    fn guard(busy: Range<u64>) -> impl Fn(u64, u64) -> Option<&'static str> {
        move |off: u64, len: u64| {
            let (a, b) = (busy.start * CS, busy.end * CS);
            (off < b && a < off + len).then_some("active L2 table")
        }
    }

    #[test]
    fn new_block_on_guarded_metadata_is_refused() {
        // 16-bit refcounts: a block describes 256 clusters; block 1 is
        // uncovered, so clusters 256.. look free. Cluster 257, where the new
        // block would go, holds an L2 table the guard knows of.
        let (st, mut r) = setup(4);
        for c in 3..256 {
            r.set(&st, c, 1, 0..0).unwrap();
        }
        r.flush(&st).unwrap();
        let image = st.to_bytes();
        let g = guard(257..258);
        match r.alloc_guarded(&st, 1, &g) {
            Err(RefcountError::Overlap {
                what,
                purpose,
                offset,
                ..
            }) => {
                assert_eq!(what, "active L2 table");
                assert_eq!(purpose, "new refcount block");
                assert_eq!(offset, 257 * CS);
            }
            other => panic!("expected an overlap, got {other:?}"),
        }
        assert_eq!(st.to_bytes(), image, "nothing written");
        assert_eq!(r.table()[1], 0, "no block made reachable");
        // Handing out a guarded cluster is refused the same way.
        let g = guard(256..257);
        assert!(matches!(
            r.alloc_guarded(&st, 1, &g),
            Err(RefcountError::Overlap {
                purpose: "allocation",
                ..
            })
        ));
        assert_eq!(st.to_bytes(), image, "nothing written");
        // Without metadata there, the block describes itself at 257.
        assert_eq!(r.alloc_guarded(&st, 1, &NoGuard).unwrap(), 256);
        assert_eq!(r.table()[1], 257 * CS);
    }

    #[test]
    fn lost_refcount_of_own_structures_is_refused() {
        // The refcount table (cluster 1) lost its refcount: it looks free.
        let (st, mut r) = setup(4);
        r.set(&st, 1, 0, 0..0).unwrap();
        assert!(matches!(
            r.alloc(&st, 1),
            Err(RefcountError::Overlap {
                what: "refcount table",
                ..
            })
        ));
        let (st, mut r) = setup(4);
        r.set(&st, 2, 0, 0..0).unwrap();
        assert!(matches!(
            r.alloc(&st, 1),
            Err(RefcountError::Overlap {
                what: "refcount block",
                ..
            })
        ));
    }

    #[test]
    fn grown_table_on_guarded_metadata_is_refused() {
        // 64-bit refcounts: the one-cluster table covers 64 blocks of 64
        // clusters (4096). Fill them; allocating cluster 4096 grows the table
        // past everything in use, where the guard claims metadata.
        let (st, mut r) = setup(6);
        while r.alloc(&st, 1).unwrap() < 4095 {}
        r.flush(&st).unwrap();
        let loc = r.table_location();
        let image = st.to_bytes();
        let g = guard(4097..8192);
        match r.alloc_guarded(&st, 1, &g) {
            Err(RefcountError::Overlap { purpose, .. }) => {
                assert_eq!(purpose, "new refcount table")
            }
            other => panic!("expected an overlap, got {other:?}"),
        }
        assert_eq!(r.table_location(), loc, "the table did not move");
        assert!(st.to_bytes() == image, "nothing written");
        // Elsewhere it grows.
        assert_eq!(r.alloc_guarded(&st, 1, &NoGuard).unwrap(), 4096);
        assert_ne!(r.table_location(), loc);
    }

    #[test]
    fn find_free_changes_nothing() {
        let (st, mut r) = setup(4);
        r.alloc(&st, 3).unwrap();
        r.update(&st, 4, -1).unwrap();
        assert_eq!(r.find_free(&st, 1).unwrap(), 4);
        assert_eq!(
            r.find_free(&st, 2).unwrap(),
            6,
            "a run of two skips the hole"
        );
        assert_eq!(r.get(&st, 4).unwrap(), 0, "nothing allocated");
        assert_eq!(r.get(&st, 6).unwrap(), 0, "nothing allocated");
        assert_eq!(
            r.alloc(&st, 1).unwrap(),
            4,
            "alloc takes what find_free named"
        );
    }

    #[test]
    fn overflow_of_narrow_refcounts_is_refused() {
        let (st, mut r) = setup(0);
        assert_eq!(r.max_refcount(), 1);
        assert!(matches!(
            r.update(&st, 1, 1),
            Err(RefcountError::NoSpace(_))
        ));
    }

    #[test]
    fn growth_adds_blocks_and_moves_the_table() {
        // 64-bit refcounts: one 512-byte block describes 64 clusters and the
        // one-cluster table 64 blocks (4096 clusters).
        let (st, mut r) = setup(6);
        let n = 5000;
        for _ in 0..n {
            r.alloc(&st, 1).unwrap();
        }
        r.flush(&st).unwrap();
        let (toff, tclusters) = r.table_location();
        assert!(tclusters > 1, "the table grew");
        assert_ne!(toff, CS, "and moved");
        // The header points at the new table.
        let mut h = [0u8; 12];
        st.read_at(&mut h, 48).unwrap();
        assert_eq!(be64(&h, 0), toff);
        assert_eq!(be32(&h, 8), tclusters);
        // Every block is described by itself or another block, and the old
        // table cluster was released.
        let blocks: Vec<u64> = r.table().iter().copied().filter(|&b| b != 0).collect();
        for &b in &blocks {
            assert_eq!(r.get(&st, b / CS).unwrap(), 1, "block at {b:#x}");
        }
        // The old table's cluster was released and handed out again.
        assert_eq!(r.get(&st, 1).unwrap(), 1, "old table cluster reused");
        for c in toff / CS..toff / CS + tclusters as u64 {
            assert_eq!(r.get(&st, c).unwrap(), 1, "table cluster {c}");
        }
        // A fresh load from the file sees the same counts.
        let mut again = Refcounts::load(&st, 9, 6, toff, tclusters, 4096, 512).unwrap();
        let mut used = 0;
        for c in 0..(n + 2000) {
            used += again.get(&st, c).unwrap();
        }
        // header + blocks + table + allocations: nothing leaked, nothing lost.
        assert_eq!(used, 1 + blocks.len() as u64 + tclusters as u64 + n);
    }
}
