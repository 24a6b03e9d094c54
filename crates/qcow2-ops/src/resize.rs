//! Resize (grow and shrink) with QEMU's semantics (`qemu-img resize`).
//!
//! Growing may need a larger L1 table. The new table is written to newly
//! allocated clusters and made durable together with its refcount before
//! one header write switches `l1_size` and `l1_table_offset`; after that
//! write is durable the old table is freed. A power loss at any point
//! leaves the header pointing at a complete table: the old one or the new.
//! The virtual size changes last, with one write of the header's size
//! field followed by a sync.
//!
//! Shrinking fully discards the clusters beyond the new end (entries become
//! unallocated), clears the L1 entries past the new end on disk (the L1
//! table keeps its size, as in QEMU), frees their L2 tables, cuts the file
//! after its last used cluster and then writes the new size.
//!
//! Persistent bitmaps follow the image, as in QEMU 10 (bits past a new end
//! are dropped, a grown area is clean): they are flagged in use on disk
//! while the image changes and stored for the new size afterwards.

use crate::error::{Error, Result};
use crate::image::{ioerr, refcount_err, Image, Inner};
use qcow2_format::entry::{L1Entry, L2Entry, FLAG_COPIED};
use qcow2_format::put_be64;

/// QEMU's limit on the L1 table size (32 MiB).
const MAX_L1_BYTES: u64 = 32 << 20;
/// QEMU's limit on an image length (`BDRV_MAX_LENGTH`).
const MAX_LENGTH: u64 = (i64::MAX as u64) & !((1u64 << 30) - 1);

/// Preallocation of the area a resize adds (qemu-img's `--preallocation`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Prealloc {
    /// Nothing is allocated.
    #[default]
    Off,
    /// L2 tables and data clusters are allocated, data is not written.
    Metadata,
    /// As metadata, and the file space reserved (zeroes are written).
    Falloc,
    /// As metadata, and zeroes written to the data clusters.
    Full,
}

impl Prealloc {
    /// Parses qemu-img's name of the mode.
    pub fn parse(s: &str) -> Option<Prealloc> {
        Some(match s {
            "off" => Prealloc::Off,
            "metadata" => Prealloc::Metadata,
            "falloc" => Prealloc::Falloc,
            "full" => Prealloc::Full,
            _ => return None,
        })
    }
    /// qemu-img's name of the mode.
    pub fn name(self) -> &'static str {
        match self {
            Prealloc::Off => "off",
            Prealloc::Metadata => "metadata",
            Prealloc::Falloc => "falloc",
            Prealloc::Full => "full",
        }
    }
}

impl Image {
    /// Changes the virtual size to `new_size` bytes (a multiple of 512), as
    /// `qemu-img resize` does. Shrinking needs `shrink` (everything beyond
    /// the new end is discarded); `prealloc` applies to the added area.
    pub fn resize(&self, new_size: u64, prealloc: Prealloc, shrink: bool) -> Result<()> {
        let mut g = self.exclusive();
        g.check_writable()?;
        let r = g.resize(new_size, prealloc, shrink);
        if let Err(Error::Corrupt(_)) = &r {
            g.mark_corrupt();
        }
        r
    }
}

impl Inner {
    pub(crate) fn resize(&mut self, new: u64, prealloc: Prealloc, shrink: bool) -> Result<()> {
        let old = self.header.size;
        let name = self.name.clone();
        if new == 0 {
            return Err(Error::Invalid(format!(
                "'{name}': new image size must be positive"
            )));
        }
        if new % 512 != 0 {
            return Err(Error::Invalid(format!(
                "'{name}': the new size must be a multiple of 512"
            )));
        }
        if new > MAX_LENGTH {
            return Err(Error::Invalid(format!(
                "'{name}': offset({new}) exceeds maximum({MAX_LENGTH})"
            )));
        }
        if new < old && !shrink {
            return Err(Error::Invalid(format!(
                "'{name}': shrinking needs the shrink option (data beyond the new end is lost)"
            )));
        }
        if new < old && prealloc != Prealloc::Off {
            return Err(Error::Invalid(format!(
                "'{name}': preallocation can't be used for shrinking an image"
            )));
        }
        if self.header.nb_snapshots > 0 && self.header.version < 3 {
            return Err(Error::NotSupported(format!(
                "'{name}': Can't resize a v2 image which has snapshots"
            )));
        }
        // Persistent bitmaps follow the new size (as in QEMU 10).
        self.resize_with_bitmaps(new, |me| me.resize_image(old, new, prealloc))
    }

    fn resize_image(&mut self, old: u64, new: u64, prealloc: Prealloc) -> Result<()> {
        // Start from a state with everything written back, so the L1
        // table on disk equals the one in memory.
        self.flush_all(true)?;
        self.sh.zcache.invalidate();
        self.metadata_prealloc = None;
        let new_l1 = self.geo.l1_entries_for(new);
        if new < old {
            self.shrink_to(new, new_l1)?;
        } else {
            if new_l1 > self.l1.len() as u64 {
                self.grow_l1_table(new_l1)?;
            }
            let zero_new_area = match &self.backing {
                Some(b) => b.size() > old,
                None => self.header.backing_file.is_some(),
            };
            if zero_new_area || prealloc != Prealloc::Off {
                // The request paths judge ranges against the in-memory size.
                self.header.size = new;
                let r = self.fill_new_area(old, new, zero_new_area, prealloc);
                self.header.size = old;
                if let Err(e) = r {
                    // Entries past the old end are harmless; write back what
                    // is consistent.
                    let _ = self.flush_all(true);
                    return Err(e);
                }
            }
        }
        self.flush_all(true)?;
        if self.sh.dur.tail_pending() {
            self.sync()?;
        }
        self.write_size(new)
    }

    /// The new area `[old, new)` of a grow: zeroed over a longer backing
    /// file (as QEMU does since 5.0), then preallocated if asked.
    fn fill_new_area(&mut self, old: u64, new: u64, zero: bool, p: Prealloc) -> Result<()> {
        // As QEMU: with data preallocation the new data clusters hold the
        // zeroes; otherwise zero clusters are written after any metadata
        // preallocation (which they keep allocated).
        let write = matches!(p, Prealloc::Falloc | Prealloc::Full);
        let zeroize = zero && !write;
        if zeroize && self.header.version < 3 {
            return Err(Error::NotSupported(format!(
                "'{}': Failed to zero out new clusters: Operation not supported (zero clusters need a v3 image)",
                self.name
            )));
        }
        if p != Prealloc::Off {
            self.preallocate(old, new, write, zero)?;
        }
        if zeroize {
            self.write_zeroes(old, new - old, 0)?;
        }
        Ok(())
    }

    /// Allocates L2 tables and data clusters for every cluster of
    /// `[old, new)` without one; the clusters read as zeroes. With
    /// `write`, zeroes are written to the data clusters so the file holds
    /// them (`full`; `falloc` does the same here, there being no portable
    /// way to reserve space that the file systems report as allocated);
    /// `over_backing`: they must hide a longer backing file.
    fn preallocate(&mut self, old: u64, new: u64, write: bool, over_backing: bool) -> Result<()> {
        if self.df {
            return self.preallocate_data_file(old, new);
        }
        let cs = self.geo.cluster_size();
        let name = self.name.clone();
        let mut guest = old / cs * cs;
        let mut file_end = self.file.len().map_err(ioerr("stat", &name))?;
        // Clusters from here on never held data: they read as zeroes.
        let orig_end = file_end;
        let zeros = vec![0u8; cs as usize];
        while guest < new {
            let table = self.ensure_l2_table(guest)?;
            let e = self.l2_entry_unchecked(guest)?;
            if e.is_compressed() || e.host_offset() != 0 {
                if write && guest < old {
                    // An allocated partial first cluster: its new part
                    // reads as zeroes (QEMU puts a new cluster there).
                    self.zero_head_tail(table, guest, old, new, e)?;
                }
                guest += cs;
                continue;
            }
            // A partial first cluster keeps what its head reads now.
            let mut head = Vec::new();
            if guest < old {
                head = vec![0u8; (old - guest) as usize];
                self.read(guest, &mut head)?;
            }
            // As QEMU: the clusters of one L2 table without a host cluster
            // are allocated as one run (so a refcount block that run needs
            // lands after it, where QEMU puts it).
            let mut n = 1u64;
            if head.is_empty() {
                let table_end = (guest / self.geo.l2_coverage() + 1) * self.geo.l2_coverage();
                let stop = table_end.min(new.div_ceil(cs) * cs);
                // A run never covers a whole refcount block's range: a new
                // block needs a cluster of its range to describe itself.
                let max = self.refs.entries_per_block().saturating_sub(1).max(1);
                while guest + n * cs < stop && n < max {
                    let next = self.l2_entry_unchecked(guest + n * cs)?;
                    if next.is_compressed() || next.host_offset() != 0 {
                        break;
                    }
                    n += 1;
                }
            }
            let first = self.alloc_clusters(n)?;
            for k in 0..n {
                let g = guest + k * cs;
                let host = (first + k) * cs;
                let e = if k == 0 {
                    e
                } else {
                    self.l2_entry_unchecked(g)?
                };
                if host < orig_end || write || self.crypt.is_some() {
                    // A reused cluster must read as zeroes (so must a new one
                    // of an encrypted image: zeroes in the file are not).
                    let mut buf = zeros.clone();
                    buf[..head.len()].copy_from_slice(&head);
                    self.write_guest_data(host, g, &buf)?;
                } else {
                    // Past the old end of the file: a hole reads as zeroes.
                    // The file is only ever extended here (the allocation
                    // may have put refcount structures past this cluster).
                    if host + cs > file_end {
                        file_end = self.file.len().map_err(ioerr("stat", &name))?;
                    }
                    if host + cs > file_end {
                        self.file
                            .set_len(host + cs)
                            .map_err(ioerr("extend file", &name))?;
                        file_end = host + cs;
                    }
                    if !head.is_empty() {
                        // Copied like QEMU's copy-on-write of the head.
                        self.write_guest_data(host, g, &head)?;
                    }
                }
                // Normal entries: the cluster; extended ones keep their
                // subcluster bits (unallocated subclusters read from below),
                // except where written zeroes must hide a backing file.
                let bitmap = match (self.geo.extended_l2, write && over_backing) {
                    (false, _) => 0,
                    (true, false) => e.bitmap,
                    (true, true) => 0xffff_ffff,
                };
                let raw = host | FLAG_COPIED;
                self.set_l2_entry(table, g, L2Entry { raw, bitmap })?;
                self.set_alloc_unsynced()?;
            }
            guest += n * cs;
        }
        Ok(())
    }

    /// [`Self::preallocate`] with an external data file: every cluster
    /// maps its own guest offset there; the data file is extended to the new
    /// size (its new part reads as zeroes).
    fn preallocate_data_file(&mut self, old: u64, new: u64) -> Result<()> {
        let cs = self.geo.cluster_size();
        let name = self.name.clone();
        if let Some(d) = self.data.clone() {
            if d.len().map_err(ioerr("stat data file", &name))? < new {
                d.set_len(new).map_err(ioerr("extend data file", &name))?;
                self.set_unsynced();
            }
        }
        let mut guest = old / cs * cs;
        while guest < new {
            let table = self.ensure_l2_table(guest)?;
            let e = self.l2_entry_unchecked(guest)?;
            if !e.has_host(true) {
                if guest < old {
                    // A partial first cluster keeps what its head reads now.
                    let mut head = vec![0u8; (old - guest) as usize];
                    self.read(guest, &mut head)?;
                    self.write_data(guest, &head)?;
                }
                let bitmap = if self.geo.extended_l2 { 0xffff_ffff } else { 0 };
                let raw = guest | FLAG_COPIED;
                self.set_l2_entry(table, guest, L2Entry { raw, bitmap })?;
                self.set_alloc_unsynced()?;
            }
            guest += cs;
        }
        Ok(())
    }

    /// The part from `old` of the allocated cluster at `guest` (holding
    /// the old end) is made to read as zeroes with data preallocation.
    fn zero_head_tail(
        &mut self,
        table: u64,
        guest: u64,
        old: u64,
        new: u64,
        e: L2Entry,
    ) -> Result<()> {
        let cs = self.geo.cluster_size();
        let end = (guest + cs).min(new);
        if e.is_compressed() || e.zero_flag() {
            return self.write_zeroes(old, end - old, 0);
        }
        if self.geo.extended_l2 {
            // As QEMU's new cluster: every subcluster allocated, the head
            // holding what it reads now (backing data included).
            let mut head = vec![0u8; (old - guest) as usize];
            self.read(guest, &mut head)?;
            head.resize(cs as usize, 0);
            self.write_guest_data(e.host_offset(), guest, &head)?;
            let bitmap = 0xffff_ffff;
            self.set_l2_entry(table, guest, L2Entry { raw: e.raw, bitmap })?;
        } else {
            let zeros = vec![0u8; (guest + cs - old) as usize];
            self.write_guest_data(e.host_offset() + (old - guest), old, &zeros)?;
        }
        Ok(())
    }

    /// Replaces the L1 table by one of `new_l1` entries at a new place.
    pub(crate) fn grow_l1_table(&mut self, new_l1: u64) -> Result<()> {
        let cs = self.geo.cluster_size();
        let cb = self.geo.cluster_bits;
        let name = self.name.clone();
        if new_l1 * 8 > MAX_L1_BYTES || new_l1 > u32::MAX as u64 {
            return Err(Error::NoSpace(format!(
                "'{name}': Failed to grow the L1 table: File too large"
            )));
        }
        let bytes = (new_l1 * 8).div_ceil(cs) * cs;
        let n = bytes / cs;
        self.file.event(qcow2_io::DebugEvent::L1GrowAllocTable);
        let first = self.alloc_clusters(n)?;
        let off = first * cs;
        let mut t = vec![0u8; bytes as usize];
        for (i, &e) in self.l1.iter().enumerate() {
            put_be64(&mut t, i * 8, e);
        }
        // 1. The new table and its refcount, durable before the header
        //    points at it.
        self.file.event(qcow2_io::DebugEvent::L1GrowWriteTable);
        self.file
            .write_at(&t, off)
            .map_err(ioerr("write L1 table", &name))?;
        self.set_unsynced();
        self.refs
            .flush(&*self.file)
            .map_err(|e| refcount_err(&name, e))?;
        self.sync()?;
        // 2. One header write switches l1_size and l1_table_offset.
        let mut h = [0u8; 12];
        h[..4].copy_from_slice(&(new_l1 as u32).to_be_bytes());
        put_be64(&mut h, 4, off);
        self.file.event(qcow2_io::DebugEvent::L1GrowActivateTable);
        self.file
            .write_at(&h, 36)
            .map_err(ioerr("write header", &name))?;
        self.set_unsynced();
        self.sync()?;
        let old_off = self.header.l1_table_offset;
        let old_clusters = (self.l1.len() as u64 * 8).div_ceil(cs);
        self.header.l1_size = new_l1 as u32;
        self.header.l1_table_offset = off;
        self.l1.resize(new_l1 as usize, 0);
        self.l1_moved();
        // 3. The old table is freed once the switch is durable (it is).
        for c in 0..old_clusters {
            self.frees.push((old_off >> cb) + c, false);
        }
        Ok(())
    }

    /// The L1 table moved or changed size: the metadata protected from
    /// allocation and data writes follows it.
    fn l1_moved(&mut self) {
        // The overlap registry: L1 range, refcount-layer protection, L2 set.
        self.active_l1_moved();
    }

    /// Shrinks to `new` bytes: discards the clusters beyond, drops the L2
    /// tables past L1 entry `new_l1`, cuts the file's unused tail.
    fn shrink_to(&mut self, new: u64, new_l1: u64) -> Result<()> {
        let cs = self.geo.cluster_size();
        let cb = self.geo.cluster_bits;
        let name = self.name.clone();
        let old = self.header.size;
        let start = new.div_ceil(cs) * cs;
        if start < old {
            self.discard_clusters(start, old - start, true)?;
            self.flush_all(true)?;
        }
        let l1_len = self.l1.len() as u64;
        if new_l1 < l1_len {
            // Clear the entries on disk first, then free their tables.
            let zeros = vec![0u8; ((l1_len - new_l1) * 8) as usize];
            self.file.event(qcow2_io::DebugEvent::L1ShrinkWriteTable);
            self.file
                .write_at(&zeros, self.header.l1_table_offset + new_l1 * 8)
                .map_err(ioerr("write L1 table", &name))?;
            self.set_unsynced();
            self.sync()?;
            self.file
                .event(qcow2_io::DebugEvent::L1ShrinkFreeL2Clusters);
            for i in new_l1 as usize..l1_len as usize {
                let t = L1Entry(self.l1[i]).l2_offset();
                self.l1[i] = 0;
                if t == 0 {
                    continue;
                }
                self.l2.discard_range(t, cs);
                self.l2_tables.remove(&t);
                let slice = self.l2.slice_size() as u64;
                for k in 0..cs / slice {
                    self.fresh_l2.remove(&(t + k * slice));
                }
                self.frees.push(t >> cb, false);
            }
            self.flush_all(true)?;
        }
        if self.sh.dur.tail_pending() {
            self.sync()?;
        }
        // Refcount blocks that count only themselves go, as in QEMU.
        // overlap registry: refcount blocks dropped
        let dropped = self
            .refs
            .drop_unused_blocks(&*self.file)
            .map_err(|e| refcount_err(&name, e))?;
        self.stats.file_syncs += u64::from(!dropped.is_empty());
        for b in dropped {
            // A block outside its own range is counted by another one.
            if self
                .refs
                .get(&*self.file, b >> cb)
                .map_err(|e| refcount_err(&name, e))?
                != 0
            {
                self.refs
                    .update(&*self.file, b >> cb, -1)
                    .map_err(|e| refcount_err(&name, e))?;
            }
        }
        self.forget_freed();
        if self
            .refs
            .flush(&*self.file)
            .map_err(|e| refcount_err(&name, e))?
        {
            self.sync()?;
        }
        self.trim_tail()
    }

    /// Cuts the file after its last used cluster (the refcount changes
    /// that freed the tail must be durable; failure only costs space).
    pub(crate) fn trim_tail(&mut self) -> Result<()> {
        let cs = self.geo.cluster_size();
        let name = self.name.clone();
        let len = self.file.len().map_err(ioerr("stat", &name))?;
        let mut last = len.div_ceil(cs);
        while last > 1 {
            match self.refs.get(&*self.file, last - 1) {
                Ok(0) => last -= 1,
                Ok(_) => break,
                Err(e) => return Err(self.refcount_failure(e)),
            }
        }
        if last * cs < len && self.file.set_len(last * cs).is_ok() {
            self.len_seen = 0;
            self.set_unsynced();
        }
        Ok(())
    }

    /// Writes the virtual size (one write of the size field) and syncs.
    fn write_size(&mut self, new: u64) -> Result<()> {
        let mut b = [0u8; 8];
        put_be64(&mut b, 0, new);
        self.file
            .write_at(&b, 24)
            .map_err(ioerr("write header", &self.name))?;
        self.set_unsynced();
        self.sync()?;
        self.header.size = new;
        Ok(())
    }
}
