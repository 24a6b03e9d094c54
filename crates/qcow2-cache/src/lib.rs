//! Table cache for L2 slices and refcount block slices.
//!
//! Fixed capacity (a number of slices of one size), least-recently-used
//! eviction, and dirty tracking at sub-slice granularity: writeback writes
//! only the dirty granules, merging adjacent ones into one write. The cache
//! does not know about ordering between caches; the layer above decides when
//! a writeback is allowed (see [`TableCache::victim_is_dirty`]).
#![forbid(unsafe_code)]
#![warn(missing_docs)]

use qcow2_io::{DebugEvent, Storage};
use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};
use std::io;

/// Counters of one cache.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct CacheStats {
    /// Lookups served from memory.
    pub hits: u64,
    /// Lookups that read from the file (or created a new slice).
    pub misses: u64,
    /// Clean-to-dirty transitions of slices.
    pub dirty_marks: u64,
    /// Write calls issued by writeback.
    pub writebacks: u64,
    /// Bytes written by writeback.
    pub bytes_written: u64,
    /// Flushes that wrote anything.
    pub flushes: u64,
}

/// Cache geometry.
#[derive(Debug, Clone, Copy)]
pub struct CacheConfig {
    /// Bytes per slice (power of two, at least 512).
    pub slice_size: usize,
    /// Number of slices held.
    pub capacity: usize,
    /// Dirty tracking unit (power of two, 512..=slice_size).
    pub granularity: usize,
    /// Event reported to the storage before a slice is read from it.
    pub load_event: Option<DebugEvent>,
    /// Event reported to the storage before a dirty slice is written back.
    pub write_event: Option<DebugEvent>,
}

struct Slot {
    offset: u64,
    data: Box<[u8]>,
    dirty: Vec<u64>,
    is_dirty: bool,
    last_use: u64,
}

/// Hasher for slice offsets: they are cluster-aligned and distinct, so one
/// multiplication spreads them well enough (SipHash costs more than the rest
/// of a cached lookup).
#[derive(Default)]
struct OffsetHasher(u64);

impl Hasher for OffsetHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = (self.0 ^ b as u64).wrapping_mul(0x100_0000_01b3);
        }
    }
    fn write_u64(&mut self, v: u64) {
        self.0 = (v ^ (v >> 29)).wrapping_mul(0x9e37_79b9_7f4a_7c15);
    }
}

type OffsetMap = HashMap<u64, usize, BuildHasherDefault<OffsetHasher>>;

/// A slot handle, valid until the next call that may evict.
pub type SlotId = usize;

/// The cache.
pub struct TableCache {
    cfg: CacheConfig,
    gran_shift: u32,
    slots: Vec<Slot>,
    index: OffsetMap,
    clock: u64,
    /// Counters.
    pub stats: CacheStats,
}

impl TableCache {
    /// New empty cache.
    pub fn new(mut cfg: CacheConfig) -> Self {
        cfg.capacity = cfg.capacity.max(2);
        cfg.granularity = cfg.granularity.clamp(512, cfg.slice_size);
        TableCache {
            gran_shift: cfg.granularity.trailing_zeros(),
            cfg,
            slots: Vec::new(),
            index: OffsetMap::default(),
            clock: 0,
            stats: CacheStats::default(),
        }
    }

    /// Slice size in bytes.
    pub fn slice_size(&self) -> usize {
        self.cfg.slice_size
    }

    /// Looks up the slice at host `offset` (slice aligned), counting a hit.
    #[inline]
    pub fn lookup(&mut self, offset: u64) -> Option<SlotId> {
        let id = *self.index.get(&offset)?;
        self.clock += 1;
        self.slots[id].last_use = self.clock;
        self.stats.hits += 1;
        Some(id)
    }

    /// Whether loading one more slice would evict a dirty one.
    pub fn victim_is_dirty(&self) -> bool {
        if self.slots.len() < self.cfg.capacity {
            return false;
        }
        self.victim()
            .map(|v| self.slots[v].is_dirty)
            .unwrap_or(false)
    }

    fn victim(&self) -> Option<SlotId> {
        // Prefer clean slices; among them the least recently used.
        let clean = self
            .slots
            .iter()
            .enumerate()
            .filter(|(_, s)| !s.is_dirty)
            .min_by_key(|(_, s)| s.last_use)
            .map(|(i, _)| i);
        clean.or_else(|| {
            self.slots
                .iter()
                .enumerate()
                .min_by_key(|(_, s)| s.last_use)
                .map(|(i, _)| i)
        })
    }

    fn take_slot(&mut self, storage: &dyn Storage, offset: u64) -> io::Result<SlotId> {
        self.clock += 1;
        let granules = self.cfg.slice_size >> self.gran_shift;
        if self.slots.len() < self.cfg.capacity {
            self.slots.push(Slot {
                offset,
                data: vec![0u8; self.cfg.slice_size].into_boxed_slice(),
                dirty: vec![0; granules.div_ceil(64)],
                is_dirty: false,
                last_use: self.clock,
            });
            let id = self.slots.len() - 1;
            self.index.insert(offset, id);
            return Ok(id);
        }
        let v = self.victim().expect("capacity >= 2");
        if self.slots[v].is_dirty {
            self.write_slot(storage, v)?;
        }
        let old = self.slots[v].offset;
        self.index.remove(&old);
        let s = &mut self.slots[v];
        s.offset = offset;
        s.last_use = self.clock;
        self.index.insert(offset, v);
        Ok(v)
    }

    /// Reads the slice at `offset` into the cache (evicting, with writeback
    /// of the victim if it is dirty: check [`Self::victim_is_dirty`] first
    /// when ordering matters). Counts a miss.
    pub fn load(&mut self, storage: &dyn Storage, offset: u64) -> io::Result<SlotId> {
        if let Some(id) = self.lookup(offset) {
            return Ok(id);
        }
        self.stats.misses += 1;
        let id = self.take_slot(storage, offset)?;
        if let Some(ev) = self.cfg.load_event {
            storage.event(ev);
        }
        if let Err(e) = storage.read_at(&mut self.slots[id].data, offset) {
            self.index.remove(&offset);
            self.slots.swap_remove(id);
            if id < self.slots.len() {
                let moved = self.slots[id].offset;
                self.index.insert(moved, id);
            }
            return Err(e);
        }
        Ok(id)
    }

    /// Puts a new all-zero slice at `offset` without reading, entirely dirty.
    pub fn insert_zeroed(&mut self, storage: &dyn Storage, offset: u64) -> io::Result<SlotId> {
        let id = match self.index.get(&offset) {
            Some(&id) => id,
            None => {
                self.stats.misses += 1;
                self.take_slot(storage, offset)?
            }
        };
        self.slots[id].data.fill(0);
        let len = self.cfg.slice_size;
        self.mark_dirty(id, 0, len);
        Ok(id)
    }

    /// Puts an all-zero slice at `offset` that is known to read as zeroes
    /// on disk: clean, no read. Counts a miss.
    pub fn insert_zeroed_clean(
        &mut self,
        storage: &dyn Storage,
        offset: u64,
    ) -> io::Result<SlotId> {
        if let Some(id) = self.lookup(offset) {
            return Ok(id);
        }
        self.stats.misses += 1;
        let id = self.take_slot(storage, offset)?;
        self.slots[id].data.fill(0);
        Ok(id)
    }

    /// The bytes of a slice.
    #[inline]
    pub fn data(&self, id: SlotId) -> &[u8] {
        &self.slots[id].data
    }

    /// Host offset of a slice.
    pub fn offset_of(&self, id: SlotId) -> u64 {
        self.slots[id].offset
    }

    /// Mutable bytes `[start, start+len)` of a slice, marking them dirty.
    #[inline]
    pub fn data_mut(&mut self, id: SlotId, start: usize, len: usize) -> &mut [u8] {
        self.mark_dirty(id, start, len);
        &mut self.slots[id].data[start..start + len]
    }

    /// Mutable bytes of a whole slice WITHOUT marking anything dirty: the
    /// caller must call [`Self::mark_dirty`] for every range it changes.
    /// For hot loops that change many entries of one slice.
    #[inline]
    pub fn data_mut_unmarked(&mut self, id: SlotId) -> &mut [u8] {
        &mut self.slots[id].data
    }

    /// Marks a byte range of a slice dirty.
    pub fn mark_dirty(&mut self, id: SlotId, start: usize, len: usize) {
        if len == 0 {
            return;
        }
        let s = &mut self.slots[id];
        if !s.is_dirty {
            s.is_dirty = true;
            self.stats.dirty_marks += 1;
        }
        let first = start >> self.gran_shift;
        let last = (start + len - 1) >> self.gran_shift;
        for g in first..=last {
            s.dirty[g / 64] |= 1 << (g % 64);
        }
    }

    /// Whether any slice is dirty.
    pub fn is_dirty(&self) -> bool {
        self.slots.iter().any(|s| s.is_dirty)
    }

    /// Number of dirty slices.
    pub fn dirty_count(&self) -> usize {
        self.slots.iter().filter(|s| s.is_dirty).count()
    }

    fn write_slot(&mut self, storage: &dyn Storage, id: SlotId) -> io::Result<()> {
        if let Some(ev) = self.cfg.write_event {
            if self.slots[id].is_dirty {
                storage.event(ev);
            }
        }
        let g = self.cfg.granularity;
        let n = self.cfg.slice_size / g;
        let mut i = 0;
        while i < n {
            if self.slots[id].dirty[i / 64] & (1 << (i % 64)) == 0 {
                i += 1;
                continue;
            }
            let start = i;
            while i < n && self.slots[id].dirty[i / 64] & (1 << (i % 64)) != 0 {
                i += 1;
            }
            let s = &self.slots[id];
            let (a, b) = (start * g, i * g);
            storage.write_at(&s.data[a..b], s.offset + a as u64)?;
            self.stats.writebacks += 1;
            self.stats.bytes_written += (b - a) as u64;
            // Clear the granules written so far: a failure later keeps the rest dirty.
            let s = &mut self.slots[id];
            for k in start..i {
                s.dirty[k / 64] &= !(1 << (k % 64));
            }
        }
        let s = &mut self.slots[id];
        s.dirty.iter_mut().for_each(|w| *w = 0);
        s.is_dirty = false;
        Ok(())
    }

    /// Writes back every dirty slice in offset order. Returns whether anything was written.
    pub fn flush(&mut self, storage: &dyn Storage) -> io::Result<bool> {
        let mut ids: Vec<SlotId> = (0..self.slots.len())
            .filter(|&i| self.slots[i].is_dirty)
            .collect();
        if ids.is_empty() {
            return Ok(false);
        }
        ids.sort_by_key(|&i| self.slots[i].offset);
        for id in ids {
            self.write_slot(storage, id)?;
        }
        self.stats.flushes += 1;
        Ok(true)
    }

    /// Drops the slices in `[offset, offset+len)` without writing them back.
    pub fn discard_range(&mut self, offset: u64, len: u64) {
        let end = offset.saturating_add(len);
        let mut i = 0;
        while i < self.slots.len() {
            let o = self.slots[i].offset;
            if o >= offset && o < end {
                self.index.remove(&o);
                self.slots.swap_remove(i);
                if i < self.slots.len() {
                    let moved = self.slots[i].offset;
                    self.index.insert(moved, i);
                }
            } else {
                i += 1;
            }
        }
    }

    /// Drops everything (dirty data is lost).
    pub fn clear(&mut self) {
        self.slots.clear();
        self.index.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use qcow2_io::{CountingStorage, MemStorage};

    fn cache(cap: usize) -> TableCache {
        TableCache::new(CacheConfig {
            slice_size: 4096,
            capacity: cap,
            granularity: 512,
            load_event: None,
            write_event: None,
        })
    }

    #[test]
    fn writes_only_dirty_granules_merged() {
        let st = CountingStorage::new(MemStorage::from_bytes(vec![0; 8192]));
        let mut c = cache(4);
        let id = c.load(&st, 4096).unwrap();
        c.data_mut(id, 0, 8).copy_from_slice(&[1; 8]);
        c.data_mut(id, 600, 8).copy_from_slice(&[2; 8]);
        c.data_mut(id, 3000, 8).copy_from_slice(&[3; 8]);
        assert_eq!(c.stats.dirty_marks, 1);
        assert!(c.flush(&st).unwrap());
        // granules 0-1 merged, granule 5 separate
        assert_eq!(c.stats.writebacks, 2);
        assert_eq!(c.stats.bytes_written, 1536);
        assert!(!c.flush(&st).unwrap());
        assert_eq!(c.stats.flushes, 1);
        let mut b = [0u8; 8];
        st.read_at(&mut b, 4096 + 3000).unwrap();
        assert_eq!(b, [3; 8]);
    }

    #[test]
    fn eviction_prefers_clean_and_writes_back_dirty() {
        let st = MemStorage::from_bytes(vec![0; 4096 * 4]);
        let mut c = cache(2);
        let a = c.load(&st, 0).unwrap();
        c.data_mut(a, 0, 1)[0] = 9;
        c.load(&st, 4096).unwrap();
        assert!(!c.victim_is_dirty());
        c.load(&st, 8192).unwrap(); // evicts the clean 4096
        assert!(c.lookup(0).is_some());
        assert!(c.lookup(4096).is_none());
        assert!(c.victim_is_dirty() || c.lookup(8192).is_some());
        let d = c.lookup(8192).unwrap();
        c.data_mut(d, 0, 1)[0] = 7;
        assert!(c.victim_is_dirty());
        c.load(&st, 12288).unwrap(); // both dirty: the older (offset 0) is written back
        let mut b = [0u8; 1];
        st.read_at(&mut b, 0).unwrap();
        assert_eq!(b[0], 9);
        assert!(c.lookup(0).is_none());
        assert_eq!(c.stats.misses, 4);
    }
}
