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
//! auto flag) are marked in use too, as QEMU marks every bitmap it loads:
//! their bits never change, and close only clears the flag again (a crash
//! leaves them inconsistent, as QEMU leaves them). A directory or a bitmap
//! QEMU would refuse to load makes the read-write open fail, as in QEMU. Autoclear bits other than the bitmaps bit are cleared
//! on read-write open (the qcow2 specification requires it); a bitmaps
//! extension whose autoclear bit is clear is dropped, as QEMU drops it.

use crate::error::{Error, Result};
use crate::image::{ioerr, refcount_err, Inner};
use qcow2_format::bitmap::{self, BitmapEntry, BitmapsExt};
use qcow2_format::header::{Header, AUTOCLEAR_BITMAPS, EXT_BITMAPS};
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
    /// Writes set no bits (they rewrite what the guest already reads).
    paused: bool,
}

/// One maintained (consistent at open, marked in use by this open) bitmap.
struct Live {
    /// Index in the directory.
    idx: usize,
    /// Tracks writes (the auto flag); a disabled one is only held in use.
    enabled: bool,
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
    fn bitmap_err(&self, what: impl std::fmt::Display) -> Error {
        Error::Corrupt(format!("'{}': {what}", self.name))
    }

    /// Read-write open: clears the autoclear bits not maintained here, drops
    /// a bitmaps extension no longer vouched for, loads the bitmaps
    /// and marks them in use, durably, before any guest write.
    pub(crate) fn open_bitmaps(&mut self) -> Result<()> {
        if self.read_only {
            return Ok(());
        }
        let has_ext = self.header.extension(EXT_BITMAPS).is_some();
        let vouched = self.header.autoclear_features & AUTOCLEAR_BITMAPS != 0;
        // Kept: the bitmaps bit (maintained here) and, with an external
        // data file, the raw bit (every write keeps the data file raw).
        let kept = AUTOCLEAR_BITMAPS
            | if self.df {
                qcow2_format::header::AUTOCLEAR_DATA_FILE_RAW
            } else {
                0
            };
        let autoclear = self.header.autoclear_features & kept;
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

    /// QEMU's name of the metadata [`Inner::foreign_metadata`] found.
    fn foreign_metadata_name(&self, off: u64, len: u64) -> &'static str {
        let cs = self.geo.cluster_size();
        let end = off.saturating_add(len);
        let l1 = self.header.l1_table_offset;
        let l1_end = l1 + (self.l1.len() as u64 * 8).div_ceil(cs) * cs;
        if off < cs {
            "qcow2_header"
        } else if off < l1_end && l1 < end {
            "active L1 table"
        } else if self.refs.overlaps(off, len) {
            "refcount block"
        } else {
            "active L2 table"
        }
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
    /// the consistent bitmaps and marks them in use. Returns whether anything
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
        if ext.directory_offset != 0
            && dir_end.is_some_and(|e| e <= file_len)
            && self.foreign_metadata(ext.directory_offset, ext.directory_size)
        {
            // Marking the bitmaps in use would write over other metadata:
            // QEMU refuses that write and marks the image corrupt.
            let what = self.foreign_metadata_name(ext.directory_offset, ext.directory_size);
            self.mark_corrupt();
            return Err(Error::Corrupt(format!(
                "'{}': {}: bitmap directory at {:#x}",
                self.name,
                crate::image::overlap_message(what),
                ext.directory_offset
            )));
        }
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
            if e.in_use() {
                // Inconsistent (left by a crash): left alone.
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
        if let Err(Error::Io { source, .. }) = self.inactive_l2_gate(0) {
            // Refused as in QEMU, which updates the directory in place
            // with the bitmaps bit cleared first (header writes are not
            // checked): the bit stays cleared, the bitmaps are lost.
            self.write_autoclear(self.header.autoclear_features & !AUTOCLEAR_BITMAPS, false)?;
            self.sync()?;
            return Err(Error::io("Can't update bitmap directory", source));
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
            paused: false,
        };
        Ok(true)
    }

    /// Reads a bitmap's table. `None` when its clusters are not
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
            enabled: e.auto(),
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
        if len == 0 || self.bitmaps.live.is_empty() || self.bitmaps.paused {
            return;
        }
        let cs = self.geo.cluster_size();
        for b in self.bitmaps.live.iter_mut().filter(|b| b.enabled) {
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

// ----- management: add, remove, clear, enable, disable, merge -----

/// A persistent dirty bitmap of an image, as listed by [`Image::bitmaps`](crate::Image::bitmaps).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BitmapInfo {
    /// Name.
    pub name: String,
    /// Bytes covered by one bit.
    pub granularity: u64,
    /// Tracks writes (the auto flag).
    pub enabled: bool,
    /// Marked in use on disk (maintained by this open image, or left
    /// inconsistent by a crash).
    pub in_use: bool,
    /// Inconsistent: in use on disk and not maintained by this open image.
    pub inconsistent: bool,
}

/// One bitmap management operation (`qemu-img bitmap`'s operations).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BitmapOp {
    /// Creates an empty bitmap; `granularity` in bytes (default as QEMU:
    /// the cluster size clamped to 4 KiB..64 KiB); `enabled`: tracks writes.
    Add {
        /// Bytes per bit.
        granularity: Option<u64>,
        /// Whether it tracks writes from now on.
        enabled: bool,
    },
    /// Removes the bitmap and frees its clusters (inconsistent ones too).
    Remove,
    /// Clears every bit.
    Clear,
    /// Starts tracking writes.
    Enable,
    /// Stops tracking writes.
    Disable,
    /// ORs the bits of bitmap `source` (of this image, or of the source
    /// image given) into the bitmap.
    Merge {
        /// Name of the source bitmap.
        source: String,
    },
}

impl BitmapOp {
    /// The operation's name as qemu-img prints it.
    pub fn verb(&self) -> &'static str {
        match self {
            BitmapOp::Add { .. } => "add",
            BitmapOp::Remove => "remove",
            BitmapOp::Clear => "clear",
            BitmapOp::Enable => "enable",
            BitmapOp::Disable => "disable",
            BitmapOp::Merge { .. } => "merge",
        }
    }
}

/// New content of a bitmap at commit.
enum Content {
    /// Table and data unchanged.
    Keep,
    /// Every bit clear (a new table without data clusters).
    Zero,
    /// These bits (table size × cluster size bytes).
    Bits(Vec<u8>),
}

/// Message of a bitmap that cannot be used (QEMU's wording).
fn inconsistent_msg(name: &str) -> Error {
    Error::Invalid(format!(
        "Bitmap '{name}' is inconsistent and cannot be used\n\
         Try block-dirty-bitmap-remove to delete this bitmap from disk"
    ))
}

fn not_found(name: &str) -> Error {
    Error::Invalid(format!("Dirty bitmap '{name}' not found"))
}

/// ORs source bits (granularity `gs`) into `dst` (granularity `gd`) for a
/// disk of `size` bytes: a destination bit is set when any byte it covers
/// is dirty in the source.
fn merge_into(dst: &mut [u8], gd: u8, src: &[u8], gs: u8, size: u64) {
    if gd == gs {
        for (d, s) in dst.iter_mut().zip(src) {
            *d |= *s;
        }
        return;
    }
    let nsrc = size.div_ceil(1u64 << gs);
    for (byte, &v) in src.iter().enumerate() {
        if v == 0 {
            continue;
        }
        for k in 0..8 {
            if v & (1 << k) == 0 {
                continue;
            }
            let b = byte as u64 * 8 + k;
            if b >= nsrc {
                return;
            }
            let start = b << gs;
            let end = ((b + 1) << gs).min(size);
            let s = (start >> gd) as usize;
            let e = (((end - 1) >> gd) + 1) as usize;
            if e <= dst.len() * 8 {
                set_bits(dst, s, e);
            }
        }
    }
}

impl Inner {
    /// The bitmap directory as it is on disk now (empty without a vouched
    /// extension): `(offset, size, entries)`.
    fn read_directory(&mut self) -> Result<(u64, u64, Vec<BitmapEntry>)> {
        let Some(data) = self.header.extension(EXT_BITMAPS).map(|d| d.to_vec()) else {
            return Ok((0, 0, Vec::new()));
        };
        if self.header.autoclear_features & AUTOCLEAR_BITMAPS == 0 {
            return Ok((0, 0, Vec::new()));
        }
        let ext = BitmapsExt::parse(&data).map_err(|e| self.bitmap_err(format!("bitmaps: {e}")))?;
        let file_len = self.file.len().map_err(ioerr("stat", &self.name))?;
        if ext.directory_offset & (self.geo.cluster_size() - 1) != 0
            || ext
                .directory_offset
                .checked_add(ext.directory_size)
                .is_none_or(|e| e > file_len)
        {
            return Err(self.bitmap_err(format!(
                "invalid bitmap directory offset {:#x}",
                ext.directory_offset
            )));
        }
        let mut raw = vec![0u8; ext.directory_size as usize];
        self.file
            .read_at(&mut raw, ext.directory_offset)
            .map_err(ioerr("read bitmap directory", &self.name))?;
        let entries = bitmap::parse_directory(&raw, ext.nb_bitmaps)
            .map_err(|e| self.bitmap_err(format!("bitmap directory: {e}")))?;
        Ok((ext.directory_offset, ext.directory_size, entries))
    }

    /// Whether directory entry `idx` is maintained by this open image.
    fn is_live(&self, idx: usize) -> bool {
        self.bitmaps.live.iter().any(|l| l.idx == idx)
    }

    /// The bitmaps of the image.
    pub(crate) fn list_bitmaps(&mut self) -> Result<Vec<BitmapInfo>> {
        let (_, _, entries) = self.read_directory()?;
        Ok(entries
            .iter()
            .enumerate()
            .map(|(i, e)| BitmapInfo {
                name: String::from_utf8_lossy(&e.name).into_owned(),
                granularity: e.granularity(),
                enabled: e.auto(),
                in_use: e.in_use(),
                inconsistent: e.in_use() && !self.is_live(i),
            })
            .collect())
    }

    /// Current bits of entry `idx` (disk data plus bits set since open),
    /// `table_size × cluster_size` bytes, bits past the disk end clear.
    fn entry_bits(&mut self, idx: usize, e: &BitmapEntry) -> Result<Vec<u8>> {
        self.entry_bits_ticking(idx, e, &mut || {})
    }

    /// [`Inner::entry_bits`], calling `tick` after each table entry read.
    fn entry_bits_ticking(
        &mut self,
        idx: usize,
        e: &BitmapEntry,
        tick: &mut dyn FnMut(),
    ) -> Result<Vec<u8>> {
        let cs = self.geo.cluster_size();
        let n = e.table_size as usize;
        let name = self.name.clone();
        let bname = String::from_utf8_lossy(&e.name).into_owned();
        if e.granularity_bits < bitmap::MIN_GRANULARITY_BITS
            || e.granularity_bits > bitmap::MAX_GRANULARITY_BITS
            || n as u64 > bitmap::MAX_TABLE_ENTRIES
            || (n as u64).saturating_mul(cs) > bitmap::MAX_PHYS_SIZE
        {
            return Err(self.bitmap_err(format!("bitmap '{bname}' is invalid")));
        }
        let mut raw = vec![0u8; n * 8];
        self.file
            .read_at(&mut raw, e.table_offset)
            .map_err(ioerr("read bitmap table", &name))?;
        let mut bits = vec![0u8; n * cs as usize];
        for (i, c) in raw.chunks_exact(8).enumerate() {
            let t = be64(c, 0);
            if let Some(why) = bitmap::table_entry_problem(t, cs) {
                return Err(self.bitmap_err(format!("bitmap '{bname}': table entry {i}: {why}")));
            }
            let off = t & bitmap::BTE_OFFSET_MASK;
            let chunk = &mut bits[i * cs as usize..(i + 1) * cs as usize];
            if off != 0 {
                self.file
                    .read_at(chunk, off)
                    .map_err(ioerr("read bitmap data", &name))?;
            } else if t & bitmap::BTE_ALL_ONES != 0 {
                chunk.fill(0xff);
            }
            tick();
        }
        if let Some(l) = self.bitmaps.live.iter().find(|l| l.idx == idx) {
            for (ci, chunk) in &l.set {
                let at = *ci as usize * cs as usize;
                if let Some(dst) = bits.get_mut(at..at + cs as usize) {
                    for (d, s) in dst.iter_mut().zip(chunk.iter()) {
                        *d |= *s;
                    }
                }
            }
        }
        let nbits = self.header.size.div_ceil(e.granularity()) as usize;
        if nbits < bits.len() * 8 {
            if nbits % 8 != 0 {
                bits[nbits / 8] &= (1u8 << (nbits % 8)) - 1;
            }
            bits[nbits.div_ceil(8)..].fill(0);
        }
        Ok(bits)
    }

    /// Bits and granularity of bitmap `name`, for merging into another
    /// bitmap (refused when inconsistent); `tick` after each table entry.
    pub(crate) fn source_bits(
        &mut self,
        name: &str,
        tick: &mut dyn FnMut(),
    ) -> Result<(u8, Vec<u8>)> {
        let (_, _, entries) = self.read_directory()?;
        let Some(idx) = entries.iter().position(|e| e.name == name.as_bytes()) else {
            return Err(not_found(name));
        };
        let e = entries[idx].clone();
        if e.in_use() && !self.is_live(idx) {
            return Err(inconsistent_msg(name));
        }
        Ok((e.granularity_bits, self.entry_bits_ticking(idx, &e, tick)?))
    }

    /// Table entries (bitmap data clusters) of bitmap `name`, 0 without it.
    pub(crate) fn bitmap_table_size(&mut self, name: &str) -> Result<u64> {
        let (_, _, entries) = self.read_directory()?;
        Ok(entries
            .iter()
            .find(|e| e.name == name.as_bytes())
            .map_or(0, |e| e.table_size as u64))
    }

    /// Refusals of QEMU for a new persistent bitmap.
    fn check_add(
        &self,
        name: &str,
        granularity: Option<u64>,
        entries: &[BitmapEntry],
    ) -> Result<u8> {
        if name.is_empty() {
            return Err(Error::Invalid("Bitmap name cannot be empty".into()));
        }
        let cs = self.geo.cluster_size();
        let g = match granularity {
            // QMP carries the granularity as 32 bits.
            Some(g) => {
                let g = g as u32 as u64;
                if g < 512 || !g.is_power_of_two() {
                    return Err(Error::Invalid(
                        "Granularity must be power of 2 and at least 512".into(),
                    ));
                }
                g
            }
            None => cs.clamp(4096, 65536),
        };
        if entries.iter().any(|e| e.name == name.as_bytes()) {
            return Err(Error::Invalid(format!("Bitmap already exists: {name}")));
        }
        let pre = format!("Can't make bitmap '{name}' persistent in '{}'", self.name);
        let fail = |m: String| Err(Error::Invalid(format!("{pre}: {m}")));
        if self.header.version < 3 {
            return fail("Cannot store dirty bitmaps in qcow2 v2 files".into());
        }
        let gb = g.trailing_zeros() as u8;
        if gb > bitmap::MAX_GRANULARITY_BITS {
            return fail(format!(
                "Granularity exceeds maximum ({} bytes)",
                1u64 << bitmap::MAX_GRANULARITY_BITS
            ));
        }
        let bytes = self.header.size.div_ceil(g).div_ceil(8);
        if bytes > bitmap::MAX_PHYS_SIZE || bytes > bitmap::MAX_TABLE_ENTRIES * cs {
            return fail(
                "Too much space will be occupied by the bitmap. Use larger granularity".into(),
            );
        }
        if name.len() > bitmap::MAX_NAME_SIZE {
            return fail(format!(
                "Name length exceeds maximum ({} characters)",
                bitmap::MAX_NAME_SIZE
            ));
        }
        if entries.len() >= bitmap::MAX_BITMAPS as usize {
            return fail("Maximum number of persistent bitmaps is already reached".into());
        }
        let dir: u64 = entries.iter().map(|e| e.encoded_len() as u64).sum();
        let new = (bitmap::ENTRY_FIXED_LEN + name.len()).div_ceil(8) as u64 * 8;
        if dir + new > bitmap::MAX_DIRECTORY_SIZE {
            return fail("Not enough space in the bitmap directory".into());
        }
        Ok(gb)
    }

    /// Applies one management operation to bitmap `name`. `source` holds
    /// the merge source's granularity bits, bits and disk size when it
    /// comes from another image. A merge tells `progress` (done, total) in
    /// bitmap clusters: the source's read (`done` of them already when it
    /// came from another image), then the target's read and written.
    pub(crate) fn bitmap_op(
        &mut self,
        name: &str,
        op: &BitmapOp,
        source: Option<(u8, Vec<u8>, u64)>,
        done: u64,
        progress: &mut dyn FnMut(u64, u64),
    ) -> Result<()> {
        self.check_writable()?;
        // 1. Refusals, before anything is written.
        let (_, _, entries) = self.read_directory()?;
        let idx = entries.iter().position(|e| e.name == name.as_bytes());
        let mut add_bits = 0u8;
        match op {
            BitmapOp::Add { granularity, .. } => {
                add_bits = self.check_add(name, *granularity, &entries)?;
            }
            _ => {
                let Some(i) = idx else {
                    return Err(not_found(name));
                };
                let inconsistent = entries[i].in_use() && !self.is_live(i);
                if inconsistent && *op != BitmapOp::Remove {
                    return Err(inconsistent_msg(name));
                }
            }
        }
        if let BitmapOp::Merge { source: sname } = op {
            if let Some((_, _, size)) = &source {
                if *size != self.header.size {
                    return Err(Error::Invalid(format!(
                        "Bitmaps are of different sizes (destination size is {}, source size \
                         is {size}) and can't be merged",
                        self.header.size
                    )));
                }
            } else {
                let si = entries.iter().position(|e| e.name == sname.as_bytes());
                match si {
                    None => return Err(not_found(sname)),
                    Some(si) if entries[si].in_use() && !self.is_live(si) => {
                        return Err(inconsistent_msg(sname))
                    }
                    _ => {}
                }
            }
        }
        match (op, idx.map(|i| &entries[i])) {
            (BitmapOp::Enable, Some(e)) if e.auto() => return Ok(()),
            (BitmapOp::Disable, Some(e)) if !e.auto() => return Ok(()),
            _ => {}
        }
        // 2. Bits set since open go to disk (in-use flags cleared), so the
        //    directory read now is the whole truth. Without such bits the
        //    maintained bitmaps' data on disk is already current: the new
        //    directory simply holds them not in use (step 3 marks them again).
        let live: Vec<usize> = if self.bitmaps.live.iter().any(|l| !l.set.is_empty()) {
            self.store_bitmaps()?;
            Vec::new()
        } else {
            self.bitmaps.live.iter().map(|l| l.idx).collect()
        };
        let (dir_off, dir_size, mut entries) = self.read_directory()?;
        for i in live {
            if let Some(e) = entries.get_mut(i) {
                e.flags &= !bitmap::FLAG_IN_USE;
            }
        }
        let idx = entries.iter().position(|e| e.name == name.as_bytes());
        let table_size = |n: &[u8]| {
            entries
                .iter()
                .find(|e| e.name == n)
                .map_or(0, |e| e.table_size as u64)
        };
        let total = match op {
            BitmapOp::Merge { source: sname } => {
                let src_n = if source.is_some() {
                    done
                } else {
                    table_size(sname.as_bytes())
                };
                src_n + 2 * table_size(name.as_bytes())
            }
            _ => 0,
        };
        let mut done = if source.is_some() { done } else { 0 };
        let mut tick = || {
            if total > 0 {
                done += 1;
                progress(done.min(total), total);
            }
        };
        let src = match (op, source) {
            (BitmapOp::Merge { source: sname }, None) => {
                let si = entries
                    .iter()
                    .position(|e| e.name == sname.as_bytes())
                    .ok_or_else(|| not_found(sname))?;
                let e = entries[si].clone();
                Some((
                    e.granularity_bits,
                    self.entry_bits_ticking(si, &e, &mut tick)?,
                ))
            }
            (_, s) => s.map(|(g, b, _)| (g, b)),
        };
        let cs = self.geo.cluster_size();
        let size = self.header.size;
        let mut list: Vec<(BitmapEntry, Content)> = Vec::new();
        let mut dropped: Vec<BitmapEntry> = Vec::new();
        for (i, e) in entries.iter().enumerate() {
            if Some(i) != idx {
                list.push((e.clone(), Content::Keep));
                continue;
            }
            let mut ne = e.clone();
            match op {
                BitmapOp::Remove => dropped.push(e.clone()),
                BitmapOp::Enable => {
                    ne.flags |= bitmap::FLAG_AUTO;
                    list.push((ne, Content::Keep));
                }
                BitmapOp::Disable => {
                    ne.flags &= !bitmap::FLAG_AUTO;
                    list.push((ne, Content::Keep));
                }
                BitmapOp::Clear => {
                    dropped.push(e.clone());
                    list.push((ne, Content::Zero));
                }
                BitmapOp::Merge { .. } => {
                    let mut bits = self.entry_bits_ticking(i, e, &mut tick)?;
                    if let Some((gs, sb)) = &src {
                        merge_into(&mut bits, e.granularity_bits, sb, *gs, size);
                    }
                    dropped.push(e.clone());
                    list.push((ne, Content::Bits(bits)));
                }
                BitmapOp::Add { .. } => {}
            }
        }
        if let BitmapOp::Add { enabled, .. } = op {
            let mut e = BitmapEntry {
                kind: bitmap::TYPE_DIRTY_TRACKING,
                granularity_bits: add_bits,
                name: name.as_bytes().to_vec(),
                flags: if *enabled { bitmap::FLAG_AUTO } else { 0 },
                ..Default::default()
            };
            e.table_size = e.table_entries_for(size, cs) as u32;
            list.push((e, Content::Zero));
        }
        let old_dir = (dir_size > 0).then_some((dir_off, dir_size));
        self.commit_directory(list, old_dir, dropped, |_| {}, &mut tick)?;
        if total > 0 {
            progress(total, total);
        }
        // 3. Enabled bitmaps maintained again (marked in use).
        self.bitmaps = Bitmaps::default();
        if self.header.extension(EXT_BITMAPS).is_some() && self.load_bitmaps()? {
            self.sync()?;
        }
        Ok(())
    }

    /// Writes the new tables and data, then the new directory, in new
    /// clusters; makes them and their refcounts durable; switches the
    /// header extension to the new directory, durably; then frees the old
    /// directory and the tables and data of `dropped`. A crash at any point
    /// leaves the old directory or the new one, never a mix.
    fn commit_directory(
        &mut self,
        list: Vec<(BitmapEntry, Content)>,
        old_dir: Option<(u64, u64)>,
        dropped: Vec<BitmapEntry>,
        edit: impl FnOnce(&mut Header),
        tick: &mut dyn FnMut(),
    ) -> Result<()> {
        let cs = self.geo.cluster_size();
        let name = self.name.clone();
        let mut entries = Vec::with_capacity(list.len());
        for (mut e, content) in list {
            let bits = match content {
                Content::Keep => {
                    entries.push(e);
                    continue;
                }
                Content::Zero => None,
                Content::Bits(b) => Some(b),
            };
            let n = e.table_size as usize;
            let mut table = vec![0u64; n];
            if let Some(bits) = &bits {
                for (i, chunk) in bits.chunks(cs as usize).enumerate().take(n) {
                    tick();
                    if chunk.iter().all(|&b| b == 0) {
                        continue;
                    }
                    let off = self.alloc_clusters(1)? * cs;
                    self.overlap_check(off, cs, "bitmap data")?;
                    let mut buf = chunk.to_vec();
                    buf.resize(cs as usize, 0);
                    self.file
                        .write_at(&buf, off)
                        .map_err(ioerr("write bitmap data", &name))?;
                    self.set_unsynced();
                    table[i] = off;
                }
            }
            let mut raw = vec![0u8; n * 8];
            for (i, &t) in table.iter().enumerate() {
                put_be64(&mut raw, i * 8, t);
            }
            let off = self.alloc_clusters((raw.len() as u64).div_ceil(cs).max(1))? * cs;
            self.overlap_check(off, raw.len() as u64, "bitmap table")?;
            self.file
                .write_at(&raw, off)
                .map_err(ioerr("write bitmap table", &name))?;
            self.set_unsynced();
            e.table_offset = off;
            entries.push(e);
        }
        let dir = bitmap::encode_directory(&entries);
        let mut h = self.header.clone();
        if entries.is_empty() {
            h.extensions.retain(|x| x.kind != EXT_BITMAPS);
            h.autoclear_features &= !AUTOCLEAR_BITMAPS;
        } else {
            let off = self.alloc_clusters((dir.len() as u64).div_ceil(cs))? * cs;
            self.overlap_check(off, dir.len() as u64, "bitmap directory")?;
            self.file
                .write_at(&dir, off)
                .map_err(ioerr("write bitmap directory", &name))?;
            self.set_unsynced();
            let ext = BitmapsExt {
                nb_bitmaps: entries.len() as u32,
                directory_size: dir.len() as u64,
                directory_offset: off,
            }
            .encode()
            .to_vec();
            match h.extensions.iter_mut().find(|x| x.kind == EXT_BITMAPS) {
                Some(x) => x.data = ext,
                None => h.extensions.push(qcow2_format::header::Extension {
                    kind: EXT_BITMAPS,
                    data: ext,
                }),
            }
            h.autoclear_features |= AUTOCLEAR_BITMAPS;
        }
        edit(&mut h);
        let hbuf = h.serialize().map_err(|e| Error::BadHeader {
            image: name.clone(),
            source: e,
        })?;
        // New clusters and their refcounts durable before the header points
        // at them.
        if self.refs.is_dirty() {
            self.refs
                .flush(&*self.file)
                .map_err(|e| refcount_err(&name, e))?;
            self.set_unsynced();
        }
        self.sync()?;
        self.file
            .write_at(&hbuf, 0)
            .map_err(ioerr("write header", &name))?;
        self.header = h;
        self.set_unsynced();
        self.sync()?;
        self.refresh_bitmap_ranges()?;
        // Frees last: a crash before them only leaks.
        // (offset, length, bitmap data: punched once free, as QEMU does;
        // tables and directories are not).
        let mut frees: Vec<(u64, u64, bool)> = Vec::new();
        if let Some((off, size)) = old_dir {
            frees.push((off, size, false));
        }
        for e in &dropped {
            let n = e.table_size as u64;
            if n == 0 || e.table_offset == 0 {
                continue;
            }
            let mut raw = vec![0u8; (n * 8) as usize];
            if self.file.read_at(&mut raw, e.table_offset).is_err() {
                continue;
            }
            frees.push((e.table_offset, n * 8, false));
            for c in raw.chunks_exact(8) {
                let t = be64(c, 0);
                let off = t & bitmap::BTE_OFFSET_MASK;
                if off != 0 && bitmap::table_entry_problem(t, cs).is_none() {
                    frees.push((off, cs, true));
                }
            }
        }
        let mut data = Vec::new();
        for (off, len, is_data) in frees {
            // Clusters that are not what they should be are leaked, not freed.
            if !self.bitmap_clusters_ok(off, len, false)? {
                continue;
            }
            let mut c = off / cs;
            while c * cs < off + len {
                self.refs
                    .update(&*self.file, c, -1)
                    .map_err(|e| refcount_err(&name, e))?;
                if is_data {
                    data.push(c);
                }
                c += 1;
            }
        }
        let freed: HashSet<u64> = self.refs.take_freed().into_iter().collect();
        if freed.contains(&(self.free_byte_offset >> self.geo.cluster_bits)) {
            self.free_byte_offset = 0;
        }
        // Nothing durable points at them any more (the header switched):
        // a crash leaves them leaked, zeroes or not.
        for c in data.into_iter().filter(|c| freed.contains(c)) {
            self.file
                .punch_hole(c * cs, cs)
                .map_err(ioerr("punch hole", &name))?;
            self.stats.holes_punched += 1;
            self.set_tail_unsynced();
        }
        if self.refs.is_dirty()
            && self
                .refs
                .flush(&*self.file)
                .map_err(|e| refcount_err(&name, e))?
        {
            self.set_tail_unsynced();
        }
        Ok(())
    }
}

impl Inner {
    /// Stops (`true`) or resumes setting bits for writes: for writes that
    /// leave what the guest reads unchanged (zero clusters rewritten as
    /// clusters of zeroes).
    pub(crate) fn pause_bitmaps(&mut self, paused: bool) {
        self.bitmaps.paused = paused;
    }

    /// Whether the image holds persistent bitmaps (a vouched extension).
    pub(crate) fn has_bitmaps(&self) -> bool {
        self.header.extension(EXT_BITMAPS).is_some()
            && self.header.autoclear_features & AUTOCLEAR_BITMAPS != 0
    }

    /// compat=0.10 with persistent bitmaps, as QEMU 10 does it: the v2
    /// header keeps the bitmaps extension (a v2 header has no autoclear
    /// field, so every reader then treats the bitmaps as inconsistent and
    /// their clusters as leaked), and every consistent bitmap is stored
    /// anew, not in use, as QEMU's close stores them: new data clusters and
    /// tables, then a new directory, in new clusters, durable with their
    /// refcounts; then `to_v2` edits the header, written in one write and
    /// synced (the commit point); then the old directory, tables and data
    /// are freed (a crash before only leaks). Inconsistent bitmaps are kept
    /// as they are. The bitmaps are no longer maintained afterwards.
    pub(crate) fn downgrade_with_bitmaps(&mut self, to_v2: impl FnOnce(&mut Header)) -> Result<()> {
        let live: Vec<usize> = self.bitmaps.live.iter().map(|l| l.idx).collect();
        let (dir_off, dir_size, entries) = self.read_directory()?;
        let mut list = Vec::with_capacity(entries.len());
        let mut dropped = Vec::new();
        for (i, e) in entries.iter().enumerate() {
            if e.in_use() && !live.contains(&i) {
                list.push((e.clone(), Content::Keep));
                continue;
            }
            let bits = self.entry_bits(i, e)?;
            let mut ne = e.clone();
            ne.flags &= !bitmap::FLAG_IN_USE;
            dropped.push(e.clone());
            list.push((ne, Content::Bits(bits)));
        }
        // Nothing is maintained from here: a failure below leaves the
        // bitmaps in use on disk (inconsistent), never wrong.
        self.bitmaps = Bitmaps::default();
        let old_dir = (dir_size > 0).then_some((dir_off, dir_size));
        self.commit_directory(list, old_dir, dropped, to_v2, &mut || {})
    }

    /// Resizes every bitmap with the image, as QEMU 10 does: bits past the
    /// new end are dropped, the added area is clean. `resize` changes the
    /// image in between, while every bitmap is flagged in use on disk: a
    /// crash in between leaves them inconsistent, never wrong. Afterwards
    /// (also when `resize` fails) the bitmaps are stored for the size the
    /// image then has, and the enabled ones are maintained again.
    pub(crate) fn resize_with_bitmaps(
        &mut self,
        new_size: u64,
        resize: impl FnOnce(&mut Inner) -> Result<()>,
    ) -> Result<()> {
        let (_, _, entries) = self.read_directory()?;
        if entries.is_empty() {
            return resize(self);
        }
        let cs = self.geo.cluster_size();
        for (i, e) in entries.iter().enumerate() {
            let bname = String::from_utf8_lossy(&e.name).into_owned();
            if e.in_use() && !self.is_live(i) {
                return Err(inconsistent_msg(&bname));
            }
            let bytes = new_size.div_ceil(1u64 << e.granularity_bits).div_ceil(8);
            if bytes > bitmap::MAX_PHYS_SIZE || bytes > bitmap::MAX_TABLE_ENTRIES * cs {
                return Err(Error::Invalid(format!(
                    "'{}': bitmap '{bname}' would be too large for {new_size} bytes",
                    self.name
                )));
            }
        }
        // 1. The bits on disk are the whole truth, every bitmap flagged in use.
        let live: Vec<usize> = if self.bitmaps.live.iter().any(|l| !l.set.is_empty()) {
            self.store_bitmaps()?;
            Vec::new()
        } else {
            self.bitmaps.live.iter().map(|l| l.idx).collect()
        };
        let (dir_off, dir_size, mut entries) = self.read_directory()?;
        for i in live {
            if let Some(e) = entries.get_mut(i) {
                e.flags &= !bitmap::FLAG_IN_USE;
            }
        }
        let old_size = self.header.size;
        let mut bits = Vec::with_capacity(entries.len());
        for (i, e) in entries.iter().enumerate() {
            bits.push(self.entry_bits(i, e)?);
        }
        let list = entries
            .iter()
            .map(|e| {
                let mut e = e.clone();
                e.flags |= bitmap::FLAG_IN_USE;
                (e, Content::Keep)
            })
            .collect();
        self.commit_directory(
            list,
            Some((dir_off, dir_size)),
            Vec::new(),
            |_| {},
            &mut || {},
        )?;
        self.bitmaps = Bitmaps::default();
        // 2. The image.
        let r = resize(self);
        // 3. The bitmaps for the size the image has now.
        let size = self.header.size;
        let (dir_off, dir_size, in_use) = self.read_directory()?;
        let mut list = Vec::with_capacity(entries.len());
        for (e, b) in entries.iter().zip(bits) {
            let g = e.granularity_bits as u32;
            let keep = old_size.div_ceil(1 << g).min(size.div_ceil(1 << g)) as usize;
            let mut ne = e.clone();
            ne.flags &= !bitmap::FLAG_IN_USE;
            ne.table_size = ne.table_entries_for(size, cs) as u32;
            let mut nb = vec![0u8; (ne.table_size as u64 * cs) as usize];
            let full = (keep / 8).min(b.len()).min(nb.len());
            nb[..full].copy_from_slice(&b[..full]);
            if keep % 8 != 0 && full < b.len() && full < nb.len() {
                nb[full] = b[full] & ((1u8 << (keep % 8)) - 1);
            }
            list.push((ne, Content::Bits(nb)));
        }
        self.commit_directory(list, Some((dir_off, dir_size)), in_use, |_| {}, &mut || {})?;
        if self.header.extension(EXT_BITMAPS).is_some() && self.load_bitmaps()? {
            self.sync()?;
        }
        r
    }
}

impl crate::Image {
    /// The persistent dirty bitmaps of the image.
    pub fn bitmaps(&self) -> Result<Vec<BitmapInfo>> {
        self.lock().list_bitmaps()
    }

    /// Applies one management operation to bitmap `name` (as `qemu-img
    /// bitmap` does), durably: the bitmap set on disk is the old one or the
    /// new one at any crash. A merge reads its source bitmap from
    /// `source_image` when given, else from this image. Errors of the
    /// caller's making are [`Error::Invalid`] with QEMU's wording.
    pub fn bitmap(
        &self,
        name: &str,
        op: &BitmapOp,
        source_image: Option<&crate::Image>,
    ) -> Result<()> {
        self.bitmap_with_progress(name, op, source_image, &mut |_, _| {})
    }

    /// [`Image::bitmap`](crate::Image::bitmap), telling `progress` (done, total) how far a merge
    /// is, in bitmap clusters: those of the source read, then those of the
    /// target read and written (other operations report nothing). Called
    /// at most once per cluster, and last with done == total.
    pub fn bitmap_with_progress(
        &self,
        name: &str,
        op: &BitmapOp,
        source_image: Option<&crate::Image>,
        progress: &mut dyn FnMut(u64, u64),
    ) -> Result<()> {
        let other = source_image.filter(|s| !std::ptr::eq(*s, self));
        let mut done = 0u64;
        let source = match (op, other) {
            (BitmapOp::Merge { source }, Some(img)) => {
                let dst_n = self.lock().bitmap_table_size(name)?;
                let mut g = img.lock();
                let total = g.bitmap_table_size(source)? + 2 * dst_n;
                let mut tick = || {
                    done += 1;
                    progress(done.min(total), total);
                };
                match g.source_bits(source, &mut tick) {
                    Ok((gb, bits)) => Some((gb, bits, g.header.size)),
                    Err(e) => {
                        drop(g);
                        // The target is looked up first, as QEMU does.
                        let list = self.lock().list_bitmaps()?;
                        if !list.iter().any(|b| b.name == name) {
                            return Err(not_found(name));
                        }
                        return Err(e);
                    }
                }
            }
            _ => None,
        };
        self.exclusive().bitmap_op(name, op, source, done, progress)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn merge_into_other_granularities() {
        // Source at 512 bytes per bit, 8 KiB disk: bits 3 and 9 dirty.
        let src = [0b0000_1000u8, 0b0000_0010];
        // Into 4 KiB per bit: bytes 1536..2048 and 4608..5120 -> bits 0, 1.
        let mut dst = [0u8; 1];
        merge_into(&mut dst, 12, &src, 9, 8192);
        assert_eq!(dst[0], 0b11);
        // Coarse into fine: 4 KiB bit 1 -> 512-byte bits 8..16.
        let mut fine = [0u8; 2];
        merge_into(&mut fine, 9, &[0b10], 12, 8192);
        assert_eq!(fine, [0, 0xff]);
        // The last coarse bit covers only what the disk has (5000 bytes).
        let mut fine = [0u8; 2];
        merge_into(&mut fine, 9, &[0b10], 12, 5000);
        assert_eq!(fine, [0, 0b0000_0011]);
        // Same granularity: OR of bytes.
        let mut d = [0b01u8];
        merge_into(&mut d, 9, &[0b10], 9, 4096);
        assert_eq!(d[0], 0b11);
    }

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
            enabled: true,
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
