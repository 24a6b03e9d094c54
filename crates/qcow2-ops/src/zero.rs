//! write-zeroes and discard with QEMU 10's semantics and minimal L2 churn.
//!
//! The request is split like QEMU's block layer does: an unaligned head,
//! the aligned middle and an unaligned tail (alignment: the subcluster
//! size). Unaligned pieces are zeroed in place only when the rest of their
//! (sub)cluster already reads as zeroes; otherwise they fall back to writing
//! zero data, or fail with ENOTSUP under NO_FALLBACK. Whole clusters get
//! their L2 entries rewritten, and an entry that is already in its target
//! state is left alone: its slice is not dirtied.

use crate::error::{Error, Result};
use crate::image::Inner;
use crate::types::*;
use qcow2_format::entry::{L2Entry, SubclusterType, FLAG_ZERO, L2_BITMAP_ALL_ZERO};
use qcow2_format::{be64, put_be64};

fn enotsup(what: &str) -> Error {
    Error::NotSupported(what.to_string())
}

/// How a zeroing step ended: not an error when it cannot be done by
/// changing entries; the caller writes zero data instead (or, under
/// NO_FALLBACK, fails with ENOTSUP).
#[must_use]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Zeroed {
    Done,
    /// Only writing zero data can do it; why not.
    NeedsData(&'static str),
}

impl Inner {
    pub(crate) fn write_zeroes(&mut self, offset: u64, len: u64, mut flags: u32) -> Result<()> {
        if self.opts.discard == DiscardMode::Ignore {
            flags &= !REQ_MAY_UNMAP;
        }
        if self.header.version < 3 && flags & REQ_NO_FALLBACK != 0 {
            return Err(enotsup("v2 images cannot zero without writing data"));
        }
        if len == 0 {
            return Ok(());
        }
        let align = self.geo.subcluster_size();
        let end = offset + len;
        let mut pos = offset;
        while pos < end {
            let head = pos % align;
            let num = if head != 0 {
                (align - head).min(end - pos)
            } else if end - pos >= align {
                (end - pos) / align * align
            } else {
                end - pos
            };
            match self.zeroes_piece(pos, num, flags)? {
                Zeroed::Done => {}
                Zeroed::NeedsData(why) if flags & REQ_NO_FALLBACK != 0 => {
                    return Err(enotsup(why));
                }
                Zeroed::NeedsData(_) => self.write_zero_data(pos, num)?,
            }
            pos += num;
        }
        Ok(())
    }

    /// Writes literal zeroes (the fallback).
    fn write_zero_data(&mut self, offset: u64, len: u64) -> Result<()> {
        let chunk = self.geo.cluster_size().max(1 << 20);
        let zeros = vec![0u8; chunk.min(len) as usize];
        let mut pos = offset;
        while pos < offset + len {
            let n = (offset + len - pos).min(chunk);
            self.write(pos, &zeros[..n as usize])?;
            pos += n;
        }
        Ok(())
    }

    /// One driver-level zeroing call: `[offset, offset+bytes)` is either
    /// aligned or lies within one subcluster.
    fn zeroes_piece(&mut self, mut offset: u64, mut bytes: u64, flags: u32) -> Result<Zeroed> {
        let sub = self.geo.subcluster_size();
        let size = self.header.size;
        let head = offset % sub;
        let mut tail = (offset + bytes).div_ceil(sub) * sub - (offset + bytes);
        if offset + bytes == size {
            tail = 0;
        }
        if head != 0 || tail != 0 {
            if !(self.is_zero(offset - head, head)? && self.is_zero(offset + bytes, tail)?) {
                return Ok(Zeroed::NeedsData("rest of the subcluster is not zero"));
            }
            offset -= head;
            bytes = sub.min(size - offset);
            let e = self.l2_entry(offset)?;
            let sc = ((offset % self.geo.cluster_size()) / sub) as u32;
            let t = e.subcluster_type_in(self.geo.extended_l2, sc, self.df);
            if !matches!(
                t,
                SubclusterType::UnallocatedPlain
                    | SubclusterType::UnallocatedAlloc
                    | SubclusterType::ZeroPlain
                    | SubclusterType::ZeroAlloc
            ) {
                return Ok(Zeroed::NeedsData("partial zeroing of a data cluster"));
            }
        }
        self.zeroize(offset, bytes, flags)
    }

    /// Whether `[offset, offset+len)` reads as zeroes through the backing chain,
    /// judged from allocation status (as QEMU's block status does).
    pub(crate) fn is_zero(&mut self, offset: u64, len: u64) -> Result<bool> {
        let size = self.header.size;
        let len = len.min(size.saturating_sub(offset));
        if len == 0 {
            return Ok(true);
        }
        let st = self.map_range(offset, len)?;
        Ok(st.iter().all(|m| m.zero))
    }

    /// `qcow2_subcluster_zeroize`: aligned range (or up to the image end).
    fn zeroize(&mut self, offset: u64, bytes: u64, flags: u32) -> Result<Zeroed> {
        let size = self.header.size;
        if self.header.version < 3 {
            if self.backing.is_none() {
                self.discard_clusters(offset, bytes, false)?;
                return Ok(Zeroed::Done);
            }
            return Ok(Zeroed::NeedsData("v2 image with a backing file"));
        }
        let cs = self.geo.cluster_size();
        let end = offset + bytes;
        let mut off = offset;
        let head = end.min(off.div_ceil(cs) * cs) - off;
        off += head;
        let tail = if end >= size {
            0
        } else {
            end - off.max(end / cs * cs)
        };
        let mid_end = end - tail;
        if head != 0 {
            if let z @ Zeroed::NeedsData(_) = self.zero_subclusters(offset, head)? {
                return Ok(z);
            }
        }
        if mid_end > off {
            let n = (mid_end - off).div_ceil(cs);
            self.zero_clusters(off, n, flags)?;
        }
        if tail != 0 {
            return self.zero_subclusters(mid_end, tail);
        }
        Ok(Zeroed::Done)
    }

    /// Part of one cluster, whole subclusters (extended L2 only).
    fn zero_subclusters(&mut self, offset: u64, len: u64) -> Result<Zeroed> {
        let sub = self.geo.subcluster_size();
        let cs = self.geo.cluster_size();
        let table = self.ensure_l2_table(offset)?;
        // As QEMU, the bitmap is updated whatever the entry holds.
        let e = self.l2_entry_unchecked(offset)?;
        if e.is_compressed() {
            return Ok(Zeroed::NeedsData("partial zeroing of a compressed cluster"));
        }
        let s0 = (offset % cs) / sub;
        let s1 = s0 + len.div_ceil(sub);
        let mut bitmap = e.bitmap;
        for s in s0..s1 {
            bitmap |= 1u64 << (32 + s);
            bitmap &= !(1u64 << s);
        }
        if bitmap == e.bitmap {
            self.stats.zero_entries_skipped += 1;
            return Ok(Zeroed::Done);
        }
        self.set_l2_entry(table, offset, L2Entry { raw: e.raw, bitmap })?;
        Ok(Zeroed::Done)
    }

    /// `zero_in_l2_slice` over `n` whole clusters from `offset`.
    fn zero_clusters(&mut self, mut offset: u64, mut n: u64, flags: u32) -> Result<()> {
        let ext = self.geo.extended_l2;
        let es = self.geo.l2_entry_size() as usize;
        let cb = self.geo.cluster_bits;
        let may_unmap = flags & REQ_MAY_UNMAP != 0;
        while n > 0 {
            let table = self.ensure_l2_table(offset)?;
            let (id, pos) = self.l2_slot(table, offset)?;
            let slice = self.l2.slice_size();
            let in_slice = ((slice - pos) / es) as u64;
            let cnt = in_slice.min(n);
            if !ext && already_zero(&self.l2.data(id)[pos..pos + cnt as usize * es], may_unmap) {
                // The common rescan case: nothing to change in this slice.
                self.stats.zero_entries_skipped += cnt;
                offset += cnt << cb;
                n -= cnt;
                continue;
            }
            let df = self.df;
            self.rewrite_slice(id, pos, cnt, offset, |old| {
                let (new, unmap) = zero_target(old, ext, may_unmap, df);
                (new, unmap)
            })?;
            offset += cnt << cb;
            n -= cnt;
        }
        Ok(())
    }

    /// Rewrites `cnt` consecutive L2 entries of one cached slice (from byte
    /// `pos`, the first mapping guest `offset`) to `target(old)`, which also
    /// says whether the old clusters are released. Entries already in their
    /// target state are left alone (counted in `zero_entries_skipped`);
    /// changed ones are written in place and their byte ranges marked dirty
    /// afterwards, merged.
    fn rewrite_slice(
        &mut self,
        id: qcow2_cache::SlotId,
        pos: usize,
        cnt: u64,
        offset: u64,
        target: impl Fn(L2Entry) -> (L2Entry, bool),
    ) -> Result<()> {
        let ext = self.geo.extended_l2;
        let es = self.geo.l2_entry_size() as usize;
        let cb = self.geo.cluster_bits;
        let df = self.df;
        let mut frees: Vec<L2Entry> = Vec::new();
        let mut dirty: Vec<(usize, usize)> = Vec::new();
        let mut skipped = 0u64;
        let mut failed: Option<(qcow2_refcount::RefcountError, u64)> = None;
        {
            let d = self.l2.data_mut_unmarked(id);
            for i in 0..cnt as usize {
                let p = pos + i * es;
                let old = L2Entry {
                    raw: be64(d, p),
                    bitmap: if ext { be64(d, p + 8) } else { 0 },
                };
                let (new, release) = target(old);
                if new == old {
                    skipped += 1;
                    continue;
                }
                // Entries are rewritten whatever they hold, as QEMU does;
                // only the release of their clusters is judged, before the
                // entry changes: a refcount block that cannot take the
                // decrement fails the request here, not the flush.
                let release = release
                    && (df
                        || !crate::alloc::points_into_metadata(
                            &self.meta,
                            &self.l2_tables,
                            &self.refs,
                            cb,
                            old,
                        ) && match crate::alloc::releasable(&mut self.refs, &*self.file, cb, old)
                        {
                            Ok(r) => r,
                            Err(e) => {
                                failed = Some((e, offset + ((i as u64) << cb)));
                                break;
                            }
                        });
                put_be64(d, p, new.raw);
                if ext {
                    put_be64(d, p + 8, new.bitmap);
                }
                match dirty.last_mut() {
                    Some((s0, l0)) if *s0 + *l0 == p => *l0 += es,
                    _ => dirty.push((p, es)),
                }
                if release {
                    frees.push(old);
                }
            }
        }
        for (p, l) in dirty {
            self.l2.mark_dirty(id, p, l);
        }
        self.stats.zero_entries_skipped += skipped;
        if !frees.is_empty() {
            self.sh.zcache.invalidate();
        }
        for old in frees {
            self.free_entry_clusters(old, true);
        }
        if let Some((e, guest)) = failed {
            return Err(match self.refcount_failure(e) {
                Error::Corrupt(m) => Error::Corrupt(format!(
                    "{m} (releasing the cluster of guest offset {guest:#x})"
                )),
                other => other,
            });
        }
        Ok(())
    }

    pub(crate) fn discard(&mut self, offset: u64, len: u64) -> Result<()> {
        if self.opts.discard == DiscardMode::Ignore || len == 0 {
            return Ok(());
        }
        if self.header.version < 3 && self.header.backing_file.is_some() {
            // Dropping the entries would expose the backing file: QEMU refuses
            // (ENOTSUP), which the block layer turns into a successful no-op.
            return Ok(());
        }
        let cs = self.geo.cluster_size();
        let size = self.header.size;
        // Whole clusters only; the partial cluster at an unaligned image end counts.
        let start = offset.div_ceil(cs) * cs;
        let end = if offset + len == size {
            size
        } else {
            (offset + len) / cs * cs
        };
        if end <= start {
            return Ok(());
        }
        self.discard_clusters(start, end - start, false)
    }

    /// `discard_in_l2_slice` over whole clusters.
    pub(crate) fn discard_clusters(&mut self, offset: u64, len: u64, full: bool) -> Result<()> {
        let cs = self.geo.cluster_size();
        let cb = self.geo.cluster_bits;
        let ext = self.geo.extended_l2;
        let v3 = self.header.version >= 3;
        let has_backing = self.backing.is_some() || self.header.backing_file.is_some();
        let mut guest = offset;
        let end = offset + len;
        while guest < end {
            let l1_idx = self.geo.l1_index(guest) as usize;
            let table = self.l2_table(l1_idx)?;
            let table_end = ((l1_idx as u64) + 1) * self.geo.l2_coverage();
            if table == 0 {
                // Unallocated L2: entries read as unallocated; only a backing
                // file (v3) turns them into zero clusters.
                if full || !(has_backing && v3) {
                    guest = table_end.min(end);
                    continue;
                }
                self.ensure_l2_table(guest)?;
                continue;
            }
            // A table shared with a snapshot is copied before it changes.
            let table = self.ensure_l2_table(guest)?;
            let (id, pos) = self.l2_slot(table, guest)?;
            let es = self.geo.l2_entry_size() as usize;
            let in_slice = ((self.l2.slice_size() - pos) / es) as u64;
            let cnt = in_slice.min((end - guest).div_ceil(cs));
            let df = self.df;
            self.rewrite_slice(id, pos, cnt, guest, |old| {
                let allocated = old.is_compressed() || old.has_host(df);
                let new = if full {
                    L2Entry::default()
                } else if has_backing || allocated {
                    if ext {
                        L2Entry {
                            raw: 0,
                            bitmap: L2_BITMAP_ALL_ZERO,
                        }
                    } else if v3 {
                        L2Entry::standard(FLAG_ZERO)
                    } else {
                        L2Entry::default()
                    }
                } else {
                    old
                };
                (new, true)
            })?;
            guest += cnt << cb;
        }
        Ok(())
    }
}

/// Whether every standard L2 entry in `entries` is already a zero cluster
/// that zeroing would leave alone (zero flag set, not compressed, and no
/// host cluster when unmapping).
#[inline]
fn already_zero(entries: &[u8], may_unmap: bool) -> bool {
    use qcow2_format::entry::{FLAG_COMPRESSED, OFFSET_MASK};
    let keep_mask = if may_unmap { OFFSET_MASK } else { 0 };
    // Compare in on-disk (big-endian) byte order: mask and expected value are
    // swapped once, entries never. Blocks of 8 entries fold without branches.
    let mask = (FLAG_ZERO | FLAG_COMPRESSED | keep_mask).to_be();
    let want = FLAG_ZERO.to_be();
    let word = |c: &[u8]| u64::from_ne_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]);
    let mut blocks = entries.chunks_exact(64);
    for b in &mut blocks {
        let mut acc = 0u64;
        for c in b.chunks_exact(8) {
            acc |= (word(c) & mask) ^ want;
        }
        if acc != 0 {
            return false;
        }
    }
    blocks
        .remainder()
        .chunks_exact(8)
        .all(|c| (word(c) & mask) == want)
}

/// Target entry of a whole-cluster zeroing, and whether the old clusters are released.
#[inline]
fn zero_target(old: L2Entry, ext: bool, may_unmap: bool, df: bool) -> (L2Entry, bool) {
    let compressed = old.is_compressed();
    let allocated = compressed || old.has_host(df);
    let unmap = compressed || (may_unmap && allocated);
    let mut new = if unmap { L2Entry::default() } else { old };
    if ext {
        new.bitmap = L2_BITMAP_ALL_ZERO;
    } else {
        new.raw |= FLAG_ZERO;
    }
    (new, unmap)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn already_zero_scan() {
        let mk = |v: &[u64]| v.iter().flat_map(|x| x.to_be_bytes()).collect::<Vec<u8>>();
        for n in [1usize, 7, 8, 9, 20] {
            let mut v = vec![1u64; n];
            assert!(already_zero(&mk(&v), false), "{n}");
            assert!(already_zero(&mk(&v), true), "{n}");
            v[n - 1] = 0x8000_0000_0005_0001; // zero-alloc
            assert!(already_zero(&mk(&v), false), "{n}");
            assert!(!already_zero(&mk(&v), true), "{n}");
            v[n - 1] = 0x8000_0000_0005_0000; // data
            assert!(!already_zero(&mk(&v), false), "{n}");
            v[n - 1] = 0x4000_0000_0000_0001; // compressed with bit 0 set
            assert!(!already_zero(&mk(&v), false), "{n}");
            v[n - 1] = 0; // unallocated
            assert!(!already_zero(&mk(&v), false), "{n}");
        }
    }

    #[test]
    fn target_table() {
        let data = L2Entry::standard(0x8000_0000_0005_0000);
        let (n, u) = zero_target(data, false, false, false);
        assert_eq!((n.raw, u), (0x8000_0000_0005_0001, false));
        let (n, u) = zero_target(data, false, true, false);
        assert_eq!((n.raw, u), (1, true));
        let comp = L2Entry::standard(0x4000_0000_0012_3456);
        assert_eq!(
            zero_target(comp, false, false, false),
            (L2Entry::standard(1), true)
        );
        let zp = L2Entry::standard(1);
        assert_eq!(zero_target(zp, false, true, false).0, zp);
        let za = L2Entry::standard(0x8000_0000_0005_0001);
        assert_eq!(zero_target(za, false, false, false).0, za);
        assert_eq!(
            zero_target(za, false, true, false),
            (L2Entry::standard(1), true)
        );
        assert_eq!(zero_target(L2Entry::default(), false, true, false).0, zp);
        let ext = L2Entry {
            raw: 0x8000_0000_0005_0000,
            bitmap: 0xffff_ffff,
        };
        let (n, u) = zero_target(ext, true, false, false);
        assert_eq!((n.raw, n.bitmap, u), (ext.raw, L2_BITMAP_ALL_ZERO, false));
        let (n, u) = zero_target(ext, true, true, false);
        assert_eq!((n.raw, n.bitmap, u), (0, L2_BITMAP_ALL_ZERO, true));
        // External data file: guest cluster 0's entry (offset 0, COPIED) is allocated.
        let c0 = L2Entry::standard(0x8000_0000_0000_0000);
        assert_eq!(
            zero_target(c0, false, true, false),
            (L2Entry::standard(0x8000_0000_0000_0001), false)
        );
        assert_eq!(
            zero_target(c0, false, true, true),
            (L2Entry::standard(1), true)
        );
    }
}
