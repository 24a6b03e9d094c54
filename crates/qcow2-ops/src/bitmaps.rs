//! Persistent dirty bitmaps (qcow2 bitmaps extension), maintained the way
//! QEMU maintains them: an image opened read-write loads its enabled
//! bitmaps and marks them in use in the bitmap directory before any guest
//! write; every write, write-zeroes and discard sets their bits; close
//! stores the bits and clears the in-use flag. A crash in between leaves
//! the bitmaps flagged in use, which every reader treats as inconsistent:
//! never wrong.
//!
//! Only the bits set since open are held in memory (one cluster-sized
//! chunk per bitmap table entry that was touched); at close each touched
//! chunk is merged into the bitmap data on disk. While a bitmap is marked
//! in use its on-disk data is not trusted by anyone, so data clusters owned
//! by it alone are updated in place; a chunk without a data cluster (or one
//! whose cluster is shared) gets a new cluster, whose refcount is durable
//! before the table entry pointing at it. The in-use flag is cleared only
//! after the data and tables are durable. Nothing is freed.
//!
//! Bitmaps already in use at open (left by a crash) are inconsistent: they
//! are neither loaded nor written and stay flagged. Disabled bitmaps (no
//! auto flag) never change and are left exactly as they are. A directory or
//! an enabled bitmap QEMU would refuse to load makes the read-write open
//! fail, as in QEMU. Autoclear bits other than the bitmaps bit are cleared
//! on read-write open (the qcow2 specification requires it); a bitmaps
//! extension whose autoclear bit is clear is dropped, as QEMU drops it.

use crate::error::{Error, Result};
use crate::image::{ioerr, refcount_err, Inner};
use qcow2_format::bitmap::{self, BitmapEntry, BitmapsExt};
use qcow2_format::header::{AUTOCLEAR_BITMAPS, EXT_BITMAPS};
use qcow2_format::{be64, put_be32, put_be64};
use std::collections::{BTreeMap, HashSet};

/// Bitmaps state of an open image (empty when none is maintained).
#[derive(Default)]
pub(crate) struct Bitmaps {
    /// Host offset of the bitmap directory.
    dir_offset: u64,
    /// The directory as read (only flags and table offsets are ever patched).
    dir_raw: Vec<u8>,
    /// Byte position of each entry in `dir_raw`.
    pos: Vec<usize>,
    /// Bitmaps maintained while open.
    live: Vec<Live>,
}

/// One maintained (enabled, consistent at open) bitmap.
struct Live {
    /// Index in the directory.
    idx: usize,
    /// log2 of the bytes one bit covers.
    granularity_bits: u8,
    /// Bits in the bitmap (disk size / granularity, rounded up).
    nbits: u64,
    /// Host offset of the bitmap table.
    table_offset: u64,
    /// Bitmap table entries.
    table: Vec<u64>,
    /// Bits set since open, per table entry (cluster-sized chunks).
    set: BTreeMap<u64, Box<[u8]>>,
}

impl Live {
    /// Sets the bits of guest bytes `[offset, offset + len)`.
    fn mark(&mut self, offset: u64, len: u64, cluster_size: u64) {
        let g = self.granularity_bits as u32;
        let first = offset >> g;
        let end = (((offset + len - 1) >> g) + 1).min(self.nbits);
        let per = cluster_size * 8;
        let mut bit = first;
        while bit < end {
            let ci = bit / per;
            let cend = ((ci + 1) * per).min(end);
            let e = self.table.get(ci as usize).copied().unwrap_or(0);
            let all_ones = e & bitmap::BTE_OFFSET_MASK == 0 && e & bitmap::BTE_ALL_ONES != 0;
            if !all_ones {
                let chunk = self
                    .set
                    .entry(ci)
                    .or_insert_with(|| vec![0u8; cluster_size as usize].into_boxed_slice());
                set_bits(chunk, (bit - ci * per) as usize, (cend - ci * per) as usize);
            }
            bit = cend;
        }
    }
}

/// Sets bits `[s, e)` of `buf` (bit 0 is the least significant bit of byte 0).
fn set_bits(buf: &mut [u8], s: usize, e: usize) {
    let mut i = s;
    while i < e && i % 8 != 0 {
        buf[i / 8] |= 1 << (i % 8);
        i += 1;
    }
    let full = e / 8 * 8;
    if i < full {
        buf[i / 8..full / 8].fill(0xff);
        i = full;
    }
    while i < e {
        buf[i / 8] |= 1 << (i % 8);
        i += 1;
    }
}

impl Inner {
    /// Placeholder of the metadata overlap registry's refresh.
    // replaced by the overlap registry on merge
    pub(crate) fn refresh_bitmap_ranges(&mut self) -> Result<()> {
        Ok(())
    }

    fn bitmap_err(&self, what: impl std::fmt::Display) -> Error {
        Error::Corrupt(format!("'{}': {what}", self.name))
    }

    /// Read-write open: clears the autoclear bits not maintained here, drops
    /// a bitmaps extension no longer vouched for, loads the enabled bitmaps
    /// and marks them in use, durably, before any guest write.
    pub(crate) fn open_bitmaps(&mut self) -> Result<()> {
        if self.read_only {
            return Ok(());
        }
        let has_ext = self.header.extension(EXT_BITMAPS).is_some();
        let vouched = self.header.autoclear_features & AUTOCLEAR_BITMAPS != 0;
        let autoclear = self.header.autoclear_features & AUTOCLEAR_BITMAPS;
        let drop_ext = has_ext && !vouched;
        let mut wrote = false;
        if drop_ext || autoclear != self.header.autoclear_features {
            self.write_autoclear(autoclear, drop_ext)?;
            wrote = true;
        }
        if has_ext && vouched {
            wrote |= self.load_bitmaps()?;
        }
        if wrote {
            self.sync()?;
        }
        Ok(())
    }

    /// Rewrites the autoclear field (and the extensions, when the bitmaps
    /// extension is dropped).
    fn write_autoclear(&mut self, autoclear: u64, drop_ext: bool) -> Result<()> {
        let name = self.name.clone();
        if drop_ext {
            let mut h = self.header.clone();
            h.extensions.retain(|e| e.kind != EXT_BITMAPS);
            h.autoclear_features = autoclear;
            let buf = h.serialize().map_err(|e| Error::BadHeader {
                image: name.clone(),
                source: e,
            })?;
            self.file
                .write_at(&buf, 0)
                .map_err(ioerr("write header", &name))?;
            self.header = h;
            self.set_unsynced();
            self.refresh_bitmap_ranges()?;
        } else if self.header.version >= 3 {
            let mut b = [0u8; 8];
            put_be64(&mut b, 0, autoclear);
            self.file
                .write_at(&b, 88)
                .map_err(ioerr("write header", &name))?;
            self.header.autoclear_features = autoclear;
            self.set_unsynced();
        }
        Ok(())
    }

    /// Whether `[off, off+len)` overlaps the header, the L1 table, refcount
    /// structures or an L2 table.
    fn foreign_metadata(&self, off: u64, len: u64) -> bool {
        let cs = self.geo.cluster_size();
        let end = off.saturating_add(len);
        let l1 = self.header.l1_table_offset;
        let l1_end = l1 + (self.l1.len() as u64 * 8).div_ceil(cs) * cs;
        let overlaps = |a: u64, b: u64| off < b && a < end;
        if overlaps(0, cs) || overlaps(l1, l1_end) || self.refs.overlaps(off, len) {
            return true;
        }
        let mut c = off & !(cs - 1);
        while c < end {
            if self.l2_tables.contains(&c) {
                return true;
            }
            c += cs;
        }
        false
    }

    /// Refcount of every cluster of `[off, off+len)` is at least one (`exact`:
    /// exactly one) and none is other metadata.
    fn bitmap_clusters_ok(&mut self, off: u64, len: u64, exact: bool) -> Result<bool> {
        if self.foreign_metadata(off, len) {
            return Ok(false);
        }
        let cb = self.geo.cluster_bits;
        let name = self.name.clone();
        let mut c = off >> cb;
        while c << cb < off + len {
            let r = self
                .refs
                .get(&*self.file, c)
                .map_err(|e| refcount_err(&name, e))?;
            if r == 0 || (exact && r != 1) {
                return Ok(false);
            }
            c += 1;
        }
        Ok(true)
    }

    /// Reads and validates the directory (QEMU's rules), loads the tables of
    /// the enabled bitmaps and marks them in use. Returns whether anything
    /// was written.
    fn load_bitmaps(&mut self) -> Result<bool> {
        let cs = self.geo.cluster_size();
        let data = self.header.extension(EXT_BITMAPS).unwrap_or_default();
        if data.len() != bitmap::EXT_LEN {
            return Err(self.bitmap_err(format!("bitmaps extension of {} bytes", data.len())));
        }
        let ext = BitmapsExt::parse(data).map_err(|e| self.bitmap_err(format!("bitmaps: {e}")))?;
        let file_len = self.file.len().map_err(ioerr("stat", &self.name))?;
        let dir_end = ext.directory_offset.checked_add(ext.directory_size);
        if ext.directory_offset == 0
            || ext.directory_offset & (cs - 1) != 0
            || dir_end.is_none_or(|e| e > file_len)
            || self.foreign_metadata(ext.directory_offset, ext.directory_size)
        {
            return Err(self.bitmap_err(format!(
                "invalid bitmap directory offset {:#x} ({} bytes)",
                ext.directory_offset, ext.directory_size
            )));
        }
        let mut raw = vec![0u8; ext.directory_size as usize];
        self.file
            .read_at(&mut raw, ext.directory_offset)
            .map_err(ioerr("read bitmap directory", &self.name))?;
        let entries = bitmap::parse_directory(&raw, ext.nb_bitmaps)
            .map_err(|e| self.bitmap_err(format!("bitmap directory: {e}")))?;
        let size = self.header.size;
        let mut names = HashSet::new();
        for e in &entries {
            let bname = String::from_utf8_lossy(&e.name).into_owned();
            let why = if !e.extra.is_empty() {
                Some("bitmap extra data is not supported".to_string())
            } else if e.table_size == 0 || e.table_offset == 0 {
                Some("no bitmap table".to_string())
            } else {
                e.problem(size, cs, file_len)
            };
            if let Some(why) = why {
                return Err(self.bitmap_err(format!(
                    "bitmap '{bname}' doesn't satisfy the constraints: {why}"
                )));
            }
            if !names.insert(e.name.clone()) {
                return Err(self.bitmap_err(format!("bitmap '{bname}' exists twice")));
            }
        }
        let pos = bitmap::entry_positions(&entries);
        let mut mark = Vec::new();
        let mut live = Vec::new();
        for (idx, e) in entries.iter().enumerate() {
            if e.in_use() || !e.auto() {
                // Inconsistent (left by a crash) or disabled: left alone.
                continue;
            }
            mark.push(idx);
            if let Some(l) = self.load_table(idx, e)? {
                live.push(l);
            }
            // else: its clusters are not what they should be; marked in use
            // and never stored, it is inconsistent from now on (safe).
        }
        if mark.is_empty() {
            return Ok(false);
        }
        for &idx in &mark {
            let f = pos[idx] + bitmap::ENTRY_FLAGS_POS;
            let flags = entries[idx].flags | bitmap::FLAG_IN_USE;
            put_be32(&mut raw, f, flags);
        }
        self.file
            .write_at(&raw, ext.directory_offset)
            .map_err(ioerr("write bitmap directory", &self.name))?;
        self.set_unsynced();
        self.bitmaps = Bitmaps {
            dir_offset: ext.directory_offset,
            dir_raw: raw,
            pos,
            live,
        };
        Ok(true)
    }

    /// Reads an enabled bitmap's table. `None` when its clusters are not
    /// exclusively its own (then it is only marked in use).
    fn load_table(&mut self, idx: usize, e: &BitmapEntry) -> Result<Option<Live>> {
        let cs = self.geo.cluster_size();
        let bname = String::from_utf8_lossy(&e.name).into_owned();
        let n = e.table_size as u64;
        let mut raw = vec![0u8; (n * 8) as usize];
        self.file
            .read_at(&mut raw, e.table_offset)
            .map_err(ioerr("read bitmap table", &self.name))?;
        let table: Vec<u64> = raw.chunks_exact(8).map(|c| be64(c, 0)).collect();
        for (i, &t) in table.iter().enumerate() {
            if let Some(why) = bitmap::table_entry_problem(t, cs) {
                return Err(
                    self.bitmap_err(format!("bitmap '{bname}': table entry {i} ({t:#x}): {why}"))
                );
            }
        }
        if !self.bitmap_clusters_ok(e.table_offset, n * 8, false)? {
            return Ok(None);
        }
        let file_len = self.file.len().map_err(ioerr("stat", &self.name))?;
        for &t in &table {
            let off = t & bitmap::BTE_OFFSET_MASK;
            if off != 0 && (off + cs > file_len || !self.bitmap_clusters_ok(off, cs, false)?) {
                return Ok(None);
            }
        }
        Ok(Some(Live {
            idx,
            granularity_bits: e.granularity_bits,
            nbits: self.header.size.div_ceil(e.granularity()),
            table_offset: e.table_offset,
            table,
            set: BTreeMap::new(),
        }))
    }

    /// Sets the bits of `[offset, offset+len)` in every maintained bitmap
    /// (in memory; stored at close).
    pub(crate) fn mark_bitmaps(&mut self, offset: u64, len: u64) {
        if len == 0 || self.bitmaps.live.is_empty() {
            return;
        }
        let cs = self.geo.cluster_size();
        for b in &mut self.bitmaps.live {
            b.mark(offset, len, cs);
        }
    }

    /// Close: merges the bits set since open into the bitmap data, makes
    /// data and tables durable, then clears the in-use flags.
    pub(crate) fn store_bitmaps(&mut self) -> Result<()> {
        if self.read_only || self.bitmaps.live.is_empty() {
            return Ok(());
        }
        let cs = self.geo.cluster_size();
        let name = self.name.clone();
        let mut live = std::mem::take(&mut self.bitmaps.live);
        let mut allocated = false;
        let mut wrote = false;
        let mut changed = vec![false; live.len()];
        // 1. Data clusters: merged in place when owned, else a new cluster.
        for (k, b) in live.iter_mut().enumerate() {
            let set = std::mem::take(&mut b.set);
            for (ci, bits) in set {
                let e = b.table[ci as usize];
                let off = e & bitmap::BTE_OFFSET_MASK;
                let mut buf = vec![0u8; cs as usize];
                if off != 0 {
                    self.file
                        .read_at(&mut buf, off)
                        .map_err(ioerr("read bitmap data", &name))?;
                    if buf.iter().zip(bits.iter()).all(|(x, y)| x | y == *x) {
                        continue;
                    }
                }
                for (x, y) in buf.iter_mut().zip(bits.iter()) {
                    *x |= *y;
                }
                let target = if off != 0 && self.bitmap_clusters_ok(off, cs, true)? {
                    off
                } else {
                    allocated = true;
                    changed[k] = true;
                    self.alloc_clusters(1)? * cs
                };
                self.overlap_check(target, cs, "bitmap data")?;
                self.file
                    .write_at(&buf, target)
                    .map_err(ioerr("write bitmap data", &name))?;
                self.set_unsynced();
                wrote = true;
                b.table[ci as usize] = target;
            }
        }
        // 2. Tables that changed: in place when owned, else a new table.
        let mut moved = false;
        for (k, b) in live.iter_mut().enumerate() {
            if !changed[k] {
                continue;
            }
            let bytes = b.table.len() as u64 * 8;
            if !self.bitmap_clusters_ok(b.table_offset, bytes, true)? {
                b.table_offset = self.alloc_clusters(bytes.div_ceil(cs))? * cs;
                allocated = true;
                moved = true;
            }
        }
        if allocated {
            // New clusters' refcounts durable before anything points at them.
            if self.refs.is_dirty() {
                self.refs
                    .flush(&*self.file)
                    .map_err(|e| refcount_err(&name, e))?;
                self.set_unsynced();
            }
            self.sync()?;
        }
        for (k, b) in live.iter().enumerate() {
            if !changed[k] {
                continue;
            }
            let mut raw = vec![0u8; b.table.len() * 8];
            for (i, &t) in b.table.iter().enumerate() {
                put_be64(&mut raw, i * 8, t);
            }
            if self.foreign_metadata(b.table_offset, raw.len() as u64) {
                self.mark_corrupt();
                return Err(self.bitmap_err(format!(
                    "refusing bitmap table write at {:#x}: overlaps image metadata",
                    b.table_offset
                )));
            }
            self.file
                .write_at(&raw, b.table_offset)
                .map_err(ioerr("write bitmap table", &name))?;
            self.set_unsynced();
            wrote = true;
        }
        // 3. Data and tables durable before the in-use flags go.
        if wrote {
            self.sync()?;
        }
        let mut dir = std::mem::take(&mut self.bitmaps.dir_raw);
        for b in &live {
            let p = self.bitmaps.pos[b.idx];
            put_be64(&mut dir, p, b.table_offset);
            let f = p + bitmap::ENTRY_FLAGS_POS;
            let flags = qcow2_format::be32(&dir, f) & !bitmap::FLAG_IN_USE;
            put_be32(&mut dir, f, flags);
        }
        let r = self.file.write_at(&dir, self.bitmaps.dir_offset);
        self.bitmaps.dir_raw = dir;
        r.map_err(ioerr("write bitmap directory", &name))?;
        self.set_unsynced();
        self.sync()?;
        if moved {
            self.refresh_bitmap_ranges()?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn set_bits_ranges() {
        let mut b = vec![0u8; 8];
        set_bits(&mut b, 3, 5);
        assert_eq!(b[0], 0b0001_1000);
        set_bits(&mut b, 7, 25);
        assert_eq!(&b[..4], &[0b1001_1000, 0xff, 0xff, 0b0000_0001]);
        let mut b = vec![0u8; 4];
        set_bits(&mut b, 8, 16);
        assert_eq!(b, vec![0, 0xff, 0, 0]);
        set_bits(&mut b, 0, 32);
        assert_eq!(b, vec![0xff; 4]);
    }

    #[test]
    fn mark_clamps_and_skips_all_ones() {
        let cs = 512u64;
        let mut l = Live {
            idx: 0,
            granularity_bits: 9,
            nbits: 5000,
            table_offset: 0,
            table: vec![0, bitmap::BTE_ALL_ONES],
            set: BTreeMap::new(),
        };
        // Bits 4095..=4096 straddle the two chunks; the second is all ones.
        l.mark(4095 * 512 + 100, 600, cs);
        assert_eq!(l.set.len(), 1);
        assert_eq!(l.set[&0][511], 0x80);
        // Past the last bit: clamped.
        l.table[1] = 0;
        l.mark(4999 * 512, 512, cs);
        let c = &l.set[&1];
        assert_eq!(c[(4999 - 4096) / 8], 1 << ((4999 - 4096) % 8));
        assert!(c[(5000 - 4096) / 8 + 1..].iter().all(|&x| x == 0));
    }
}
