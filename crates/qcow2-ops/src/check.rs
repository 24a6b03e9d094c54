//! Consistency check and repair with the semantics of QEMU 10's
//! `qemu-img check` (block/qcow2-refcount.c, qcow2-bitmap.c).
//!
//! The walk builds an in-memory refcount table ("expected" refcounts) from
//! every structure that owns host clusters: the header, the active and the
//! snapshot L1/L2 tables with their data clusters, the snapshot table, the
//! refcount table and blocks, and the bitmap directory with its tables. That
//! table is compared with the stored refcounts; leaks (stored > expected) and
//! corruptions (stored < expected) are counted once per cluster, and the
//! COPIED flags of the active tables are checked against the stored
//! refcounts. Repair sets stored refcounts to the expected values and
//! rewrites wrong COPIED flags, then the caller-visible report is the result
//! of a second, read-only pass plus the fixed counts, as qemu-img prints it.
//!
//! Where QEMU rebuilds the whole refcount structure (a referenced cluster
//! with stored refcount zero, as lazy refcounts leave them; refcount blocks
//! overlapping other data) so does this module: new refcount blocks, then
//! the new table, past the end of everything in use; the old structures
//! are then freed as leaks.

use crate::error::{Error, Result};
use crate::image::{ioerr, refcount_err, Inner};
use crate::types::{CheckReport, RepairMode};
use qcow2_format::entry::{FLAG_COMPRESSED, FLAG_COPIED, FLAG_ZERO, L1_RESERVED, OFFSET_MASK};
use qcow2_format::header::{AUTOCLEAR_BITMAPS, EXT_BITMAPS};
use qcow2_format::refcount::{max_refcount, REFTABLE_OFFSET_MASK};
use qcow2_format::{be32, be64, bitmap, put_be64, snapshot, CompressedDescriptor};

/// Reserved bits of a standard L2 descriptor, as QEMU checks them (also for
/// extended L2, whose bit 0 QEMU does not look at).
const L2_STD_RESERVED: u64 = 0x3f00_0000_0000_01fe;
/// Allocation half of an extended L2 bitmap.
const BITMAP_ALL_ALLOC: u64 = 0xffff_ffff;
/// Zero half of an extended L2 bitmap.
const BITMAP_ALL_ZERO: u64 = 0xffff_ffff_0000_0000;
/// QEMU refuses to check images of more host clusters than this.
const MAX_CHECK_CLUSTERS: u64 = i32::MAX as u64;
/// A refcount block past the end of the file is made part of the file (as
/// QEMU does) only when that grows the file by at most this much; otherwise
/// the refcount structures are rebuilt.
const MAX_REFBLOCK_EXTEND: u64 = 1 << 30;
/// ... and only while all such blocks together keep the file within this
/// much of its length at the start of the check (QEMU has no such limit):
/// the in-memory refcount table and the walk follow the file's length.
const MAX_REFBLOCK_EXTEND_TOTAL: u64 = 8 << 30;
/// Largest L1 table QEMU accepts (QCOW_MAX_L1_SIZE).
const MAX_L1_BYTES: u64 = 32 << 20;
/// Messages kept in a report (per pass); past this they are only counted,
/// so a hostile image cannot make the report as large as its claims.
const MAX_MESSAGES: usize = 10_000;

/// Formats and records a check message only while the report has room for
/// it (the formatting itself is skipped past the cap).
macro_rules! note {
    ($c:expr, $($arg:tt)*) => {
        if $c.has_room() {
            let m = format!($($arg)*);
            $c.msg(m);
        } else {
            $c.dropped += 1;
        }
    };
}

/// [`note!`] for a message that `n` references would each print.
macro_rules! note_n {
    ($c:expr, $n:expr, $($arg:tt)*) => {
        let mut left: u64 = $n;
        while left > 0 && $c.has_room() {
            let m = format!($($arg)*);
            $c.msg(m);
            left -= 1;
        }
        $c.dropped += left;
    };
}

/// Checks (and with `repair` fixes) the image, returning what qemu-img would
/// report: after a repair that fixed anything, the counts of a second pass
/// plus the numbers fixed.
pub(crate) fn check(
    inner: &mut Inner,
    repair: RepairMode,
    progress: &mut dyn FnMut(u64, u64),
) -> Result<CheckReport> {
    Ok(check_passes(inner, repair, progress)?.1)
}

/// [`check`], also returning the internal errors of the first pass (the
/// repairing one), which the report of the second pass does not count.
pub(crate) fn check_passes(
    inner: &mut Inner,
    repair: RepairMode,
    progress: &mut dyn FnMut(u64, u64),
) -> Result<(u64, CheckReport)> {
    if !inner.read_only {
        // Tables are read straight from the file: write back dirty caches.
        inner.flush_all(false)?;
    }
    let first = run(inner, repair, progress)?;
    let first_errors = first.check_errors;
    if repair == RepairMode::None || (first.leaks_fixed == 0 && first.corruptions_fixed == 0) {
        return Ok((first_errors, first));
    }
    let mut second = run(inner, RepairMode::None, progress)?;
    second.leaks_fixed = first.leaks_fixed;
    second.corruptions_fixed = first.corruptions_fixed;
    let mut messages = first.messages;
    messages.append(&mut second.messages);
    second.messages = messages;
    Ok((first_errors, second))
}

/// One pass (QEMU's qcow2_check_refcounts).
fn run(
    inner: &mut Inner,
    fix: RepairMode,
    progress: &mut dyn FnMut(u64, u64),
) -> Result<CheckReport> {
    let cb = inner.geo.cluster_bits;
    let cs = 1u64 << cb;
    let file_len = inner.file.len().map_err(ioerr("stat", &inner.name))?;
    let mut res = CheckReport::default();
    let nb_clusters = file_len.div_ceil(cs);
    if nb_clusters > MAX_CHECK_CLUSTERS {
        res.check_errors += 1;
        res.messages.push(format!(
            "ERROR: the image file has {nb_clusters} clusters, more than can be checked"
        ));
        return Ok(res);
    }
    // QEMU counts guest clusters of the size rounded down to sectors.
    res.total_clusters = (inner.header.size / 512 * 512).div_ceil(cs);
    let order = inner.refs.order();
    let mut imrt = match Imrt::new(order, nb_clusters) {
        Some(t) => t,
        None => {
            res.check_errors += 1;
            res.messages
                .push("ERROR: not enough memory for the in-memory refcount table".into());
            return Ok(res);
        }
    };
    let mut c = Checker {
        inner,
        res,
        fix,
        cb,
        cs,
        file_len,
        start_len: file_len,
        rebuild: false,
        hard_rebuild: false,
        wrote: false,
        extra_metadata: Vec::new(),
        dropped: 0,
        progress,
    };
    let r = c.run_inner(&mut imrt);
    let finish = c.finish();
    if c.dropped > 0 {
        let m = format!("({} more messages not shown)", c.dropped);
        c.res.messages.push(m);
    }
    r?;
    finish?;
    Ok(c.res)
}

/// In-memory refcount table: one counter per host cluster.
enum Counts {
    Narrow(Vec<u16>),
    Wide(Vec<u32>),
}

struct Imrt {
    v: Counts,
    max: u64,
}

impl Imrt {
    fn new(order: u32, n: u64) -> Option<Imrt> {
        let max = max_refcount(order);
        let mut t = if order <= 4 {
            Imrt {
                v: Counts::Narrow(Vec::new()),
                max: max.min(u16::MAX as u64),
            }
        } else {
            Imrt {
                v: Counts::Wide(Vec::new()),
                max: max.min(u32::MAX as u64),
            }
        };
        t.grow(n).then_some(t)
    }
    fn len(&self) -> u64 {
        match &self.v {
            Counts::Narrow(v) => v.len() as u64,
            Counts::Wide(v) => v.len() as u64,
        }
    }
    /// Grows to at least `n` entries; false when memory is short.
    fn grow(&mut self, n: u64) -> bool {
        let Ok(n) = usize::try_from(n) else {
            return false;
        };
        fn g<T: Clone + Default>(v: &mut Vec<T>, n: usize) -> bool {
            if n <= v.len() {
                return true;
            }
            if v.try_reserve_exact(n - v.len()).is_err() {
                return false;
            }
            v.resize(n, T::default());
            true
        }
        match &mut self.v {
            Counts::Narrow(v) => g(v, n),
            Counts::Wide(v) => g(v, n),
        }
    }
    fn get(&self, i: u64) -> u64 {
        let i = i as usize;
        match &self.v {
            Counts::Narrow(v) => v.get(i).map_or(0, |&x| x as u64),
            Counts::Wide(v) => v.get(i).map_or(0, |&x| x as u64),
        }
    }
    /// Sets entry `i` (must exist; `x <= max`).
    fn set(&mut self, i: u64, x: u64) {
        let i = i as usize;
        match &mut self.v {
            Counts::Narrow(v) => v[i] = x as u16,
            Counts::Wide(v) => v[i] = x as u32,
        }
    }
}

struct Checker<'a> {
    inner: &'a mut Inner,
    /// Told (L2 tables of the active L1 walked, how many there are).
    progress: &'a mut dyn FnMut(u64, u64),
    res: CheckReport,
    fix: RepairMode,
    cb: u32,
    cs: u64,
    /// Current length of the image file.
    file_len: u64,
    /// Length of the image file when the check started.
    start_len: u64,
    /// QEMU would rebuild the refcount structure.
    rebuild: bool,
    /// ... for a reason that setting refcounts cannot fix.
    hard_rebuild: bool,
    /// Anything written (refcounts need a flush and a sync).
    wrote: bool,
    /// Byte ranges of snapshot tables and L1 tables, for the overlap check.
    extra_metadata: Vec<(u64, u64)>,
    /// Messages past [`MAX_MESSAGES`], counted but not kept.
    dropped: u64,
}

/// The cluster types as QEMU's qcow2_get_cluster_type sees them.
#[derive(Clone, Copy, PartialEq, Eq)]
enum QType {
    Compressed,
    ZeroPlain,
    ZeroAlloc,
    Normal,
    Unallocated,
}

/// QEMU's cluster type of an L2 entry; `df`: the image has an external
/// data file (offset 0 with COPIED is guest cluster 0's data there).
fn qtype(raw: u64, extended: bool, df: bool) -> QType {
    let host = raw & OFFSET_MASK != 0 || (df && raw & FLAG_COPIED != 0);
    if raw & FLAG_COMPRESSED != 0 {
        QType::Compressed
    } else if raw & FLAG_ZERO != 0 && !extended {
        if host {
            QType::ZeroAlloc
        } else {
            QType::ZeroPlain
        }
    } else if !host {
        QType::Unallocated
    } else {
        QType::Normal
    }
}

fn errno_text(e: &Error) -> String {
    let n = -e.errno();
    std::io::Error::from_raw_os_error(n).to_string()
}

impl Checker<'_> {
    fn msg(&mut self, m: String) {
        if self.has_room() {
            self.res.messages.push(m);
        } else {
            self.dropped += 1;
        }
    }

    fn has_room(&self) -> bool {
        self.res.messages.len() < MAX_MESSAGES
    }

    fn run_inner(&mut self, imrt: &mut Imrt) -> Result<()> {
        self.calculate(imrt, self.fix)?;
        let pre = self.res.clone();
        let highest = self.compare(imrt, RepairMode::None)?;
        let mut highest = highest;
        if self.fix != RepairMode::None
            && (self.rebuild || self.res.leaks > 0 || self.res.corruptions > 0)
        {
            if self.rebuild && self.fix == RepairMode::Leaks {
                self.msg("ERROR need to rebuild refcount structures".into());
                self.res.check_errors += 1;
                return Err(Error::Corrupt(format!(
                    "{}: the refcount structures need to be rebuilt (repair with 'all')",
                    self.inner.name
                )));
            }
            if self.hard_rebuild {
                // Refcount blocks overlap other data: build new refcount
                // structures from the expected refcounts, as QEMU does.
                highest = self.rebuild_and_recheck(imrt)?;
                self.check_oflag_copied()?;
                self.res.image_end_offset = (highest + 1) * self.cs;
                return Ok(());
            }
            // The first comparison's messages stand; redo it with repairs.
            let messages = std::mem::take(&mut self.res.messages);
            self.res = pre;
            self.res.messages = messages;
            highest = self.compare(imrt, self.fix)?;
        }
        self.check_oflag_copied()?;
        self.res.image_end_offset = (highest + 1) * self.cs;
        Ok(())
    }

    /// Writes back refcount changes and syncs when anything was written.
    fn finish(&mut self) -> Result<()> {
        if !self.wrote {
            return Ok(());
        }
        let name = self.inner.name.clone();
        self.inner
            .refs
            .flush(&*self.inner.file)
            .map_err(|e| refcount_err(&name, e))?;
        // Clusters whose refcount dropped to zero are free: punch them as
        // QEMU does (discard=always), best effort.
        let freed = self.inner.refs.take_freed();
        for (start, n) in crate::image::runs(freed.into_iter()) {
            if let (Some(o), Some(l)) = (start.checked_mul(self.cs), n.checked_mul(self.cs)) {
                if let Ok(true) = self.inner.file.punch_hole(o, l) {
                    self.inner.stats.holes_punched += 1;
                }
            }
        }
        self.inner.set_unsynced();
        self.inner.sync()
    }

    // ----- building the expected refcounts -----

    /// QEMU's qcow2_inc_refcounts_imrt.
    fn inc(&mut self, imrt: &mut Imrt, offset: u64, size: u64) {
        self.inc_n(imrt, offset, size, 1);
    }

    /// `n` references to `[offset, offset + size)` at once: what `n` calls
    /// of [`Self::inc`] would count, in one pass over the clusters.
    fn inc_n(&mut self, imrt: &mut Imrt, offset: u64, size: u64, n: u64) {
        if size == 0 || n == 0 {
            return;
        }
        // The last cluster may be partly past the end of the file.
        if offset as u128 + size as u128 >= self.file_len as u128 + self.cs as u128 {
            note_n!(self, n,
                "ERROR: counting reference for region exceeding the end of the file by one cluster or more: offset 0x{offset:x} size 0x{size:x}"
            );
            self.res.corruptions += n;
            return;
        }
        let first = offset >> self.cb;
        let last = (offset + size - 1) >> self.cb;
        if last >= imrt.len() && !imrt.grow(last + 1) {
            self.res.check_errors += 1;
            self.msg("ERROR: not enough memory for the in-memory refcount table".into());
            return;
        }
        for k in first..=last {
            self.add_count(imrt, k, n);
        }
    }

    /// Adds `n` references to cluster `k` (inside `imrt`); each one past
    /// the largest refcount is an overflow corruption, as QEMU counts them.
    fn add_count(&mut self, imrt: &mut Imrt, k: u64, n: u64) {
        let v = imrt.get(k);
        let room = imrt.max - v.min(imrt.max);
        if n > room {
            note_n!(self, n - room, "ERROR: overflow cluster offset=0x{:x}\nUse qemu-img amend to increase the refcount entry width or qemu-img convert to create a clean copy if the image cannot be opened for writing", k << self.cb);
            self.res.corruptions += n - room;
        }
        imrt.set(k, v + n.min(room));
    }

    fn read(&self, off: u64, len: u64, what: &str) -> Result<Vec<u8>> {
        let mut b = vec![0u8; len as usize];
        self.inner
            .file
            .read_at(&mut b, off)
            .map_err(ioerr(what, &self.inner.name))?;
        Ok(b)
    }

    /// Reads a table of `len` bytes at `off`, only as far as the file goes
    /// (and down to whole `unit`s): past the end a table reads as zeros,
    /// which reference nothing, so memory follows the file, not the claim.
    fn read_in_file(&self, off: u64, len: u64, unit: u64, what: &str) -> Result<Vec<u8>> {
        let avail = self.file_len.saturating_sub(off).min(len);
        self.read(off, avail - avail % unit, what)
    }

    /// QEMU's calculate_refcounts.
    fn calculate(&mut self, imrt: &mut Imrt, fix: RepairMode) -> Result<()> {
        self.extra_metadata.clear();
        // Header.
        self.inc(imrt, 0, self.cs);
        // LUKS header clusters.
        if let Some(a) = self.inner.crypt_area.clone() {
            self.inc(imrt, a.start, a.end - a.start);
            self.extra_metadata.push((a.start, a.end - a.start));
        }
        // Active L1 table.
        let (l1_off, l1_size) = (
            self.inner.header.l1_table_offset,
            self.inner.header.l1_size as u64,
        );
        self.check_l1(imrt, l1_off, l1_size, fix)?;
        // Snapshots.
        let (snaps, snap_size) = self.read_snapshots();
        let sn_off = self.inner.header.snapshots_offset;
        if snap_size > 0 {
            self.extra_metadata.push((sn_off, snap_size));
        }
        for s in &snaps {
            if s.l1_size > 0 {
                self.extra_metadata.push((s.l1_offset, s.l1_size * 8));
            }
        }
        let mut tables = Vec::new();
        for s in snaps {
            if s.l1_offset & (self.cs - 1) != 0 {
                note!(self,
                    "ERROR snapshot {} ({}) l1_offset={:#x}: L1 table is not cluster aligned; snapshot table entry corrupted",
                    s.id, s.name, s.l1_offset
                );
                self.res.corruptions += 1;
                continue;
            }
            if s.l1_size > MAX_L1_BYTES / 8 {
                note!(self,
                    "ERROR snapshot {} ({}) l1_size={:#x}: L1 table is too large; snapshot table entry corrupted",
                    s.id, s.name, s.l1_size
                );
                self.res.corruptions += 1;
                continue;
            }
            if s.l1_size > 0 {
                tables.push((s.l1_offset, s.l1_size * 8));
            }
        }
        self.check_snapshot_l1s(imrt, tables, fix)?;
        self.inc(imrt, sn_off, snap_size);
        // Refcount table.
        let (rt_off, rt_clusters) = self.inner.refs.table_location();
        self.inc(imrt, rt_off, rt_clusters as u64 * self.cs);
        // Bitmaps.
        self.check_bitmaps(imrt)?;
        // Refcount blocks.
        self.check_refblocks(imrt, fix)
    }

    /// QEMU's check_refcounts_l1 for the active L1 table.
    fn check_l1(
        &mut self,
        imrt: &mut Imrt,
        l1_off: u64,
        l1_size: u64,
        fix: RepairMode,
    ) -> Result<()> {
        if l1_size == 0 {
            return Ok(());
        }
        let bytes = l1_size * 8;
        self.inc(imrt, l1_off, bytes);
        let raw = match self.read_in_file(l1_off, bytes, 8, "read L1 table") {
            Ok(r) => r,
            Err(e) => {
                self.msg("ERROR: I/O error in check_refcounts_l1".into());
                self.res.check_errors += 1;
                return Err(e);
            }
        };
        let entries = (0..raw.len() / 8).map(|i| be64(&raw, i * 8));
        self.check_l1_entries(imrt, tally(entries, 1), true, fix, true)
    }

    /// QEMU's check_refcounts_l1 for every snapshot's L1 table (`(offset,
    /// bytes)`, cluster aligned), all at once: each L1 range and each L1
    /// entry value is visited once, weighted by how often the tables repeat
    /// it, so that many snapshots sharing (or overlapping in) one table
    /// cost what the table costs, and the counts stay those of QEMU's walk.
    fn check_snapshot_l1s(
        &mut self,
        imrt: &mut Imrt,
        tables: Vec<(u64, u64)>,
        fix: RepairMode,
    ) -> Result<()> {
        if tables.is_empty() {
            return Ok(());
        }
        self.inc_ranges(imrt, &tables);
        let entries = match self.tally_tables(&tables, "read L1 table") {
            Ok(e) => e,
            Err(e) => {
                self.msg("ERROR: I/O error in check_refcounts_l1".into());
                self.res.check_errors += 1;
                return Err(e);
            }
        };
        self.check_l1_entries(imrt, entries, false, fix, false)
    }

    /// [`Self::inc`] for each of the byte ranges, in one pass over the
    /// clusters however many ranges overlap (a difference array over the
    /// clusters they start and end in).
    fn inc_ranges(&mut self, imrt: &mut Imrt, ranges: &[(u64, u64)]) {
        let mut diff: std::collections::BTreeMap<u64, i64> = Default::default();
        let limit = self.file_len as u128 + self.cs as u128;
        for &(off, bytes) in ranges {
            if bytes == 0 {
                continue;
            }
            if off as u128 + bytes as u128 >= limit {
                // Past the end of the file: counted as inc counts it.
                self.inc(imrt, off, bytes);
                continue;
            }
            *diff.entry(off >> self.cb).or_default() += 1;
            *diff.entry(((off + bytes - 1) >> self.cb) + 1).or_default() -= 1;
        }
        let (mut depth, mut at) = (0i64, 0u64);
        for (&c, &d) in &diff {
            if depth > 0 {
                if c > imrt.len() && !imrt.grow(c) {
                    self.res.check_errors += 1;
                    self.msg("ERROR: not enough memory for the in-memory refcount table".into());
                    return;
                }
                for k in at..c {
                    self.add_count(imrt, k, depth as u64);
                }
            }
            depth += d;
            at = c;
        }
    }

    /// The distinct nonzero 64-bit entries of the tables at the byte ranges
    /// (8-byte aligned), each with the number of times the tables hold it,
    /// reading every byte of the file under them once: a byte range covered
    /// by several tables counts once per table. What lies past the end of
    /// the file reads as zeros and is skipped.
    fn tally_tables(&self, ranges: &[(u64, u64)], what: &str) -> Result<Vec<(u64, u64)>> {
        let mut ev: std::collections::BTreeMap<u64, i64> = Default::default();
        for &(off, bytes) in ranges {
            let end = off.saturating_add(bytes).min(self.file_len & !7);
            if off < end {
                *ev.entry(off).or_default() += 1;
                *ev.entry(end).or_default() -= 1;
            }
        }
        let mut counts: Vec<(u64, u64)> = Vec::new();
        let mut index: std::collections::HashMap<u64, usize> = Default::default();
        let (mut depth, mut at) = (0i64, 0u64);
        for (&pos, &d) in &ev {
            let mut p = at;
            while depth > 0 && p < pos {
                let len = (pos - p).min(1 << 20);
                let raw = self.read(p, len, what)?;
                for i in 0..raw.len() / 8 {
                    add_tally(&mut counts, &mut index, be64(&raw, i * 8), depth as u64);
                }
                p += len;
            }
            depth += d;
            at = pos;
        }
        Ok(counts)
    }

    /// The per-entry part of QEMU's check_refcounts_l1, for distinct entry
    /// values with the number of times they occur. Each L2 table is walked
    /// once, weighted by all the entries that point at it.
    fn check_l1_entries(
        &mut self,
        imrt: &mut Imrt,
        entries: Vec<(u64, u64)>,
        frag: bool,
        fix: RepairMode,
        active: bool,
    ) -> Result<()> {
        let mut l2_weight: std::collections::HashMap<u64, u64> = Default::default();
        for &(e, n) in &entries {
            *l2_weight.entry(e & OFFSET_MASK).or_default() += n;
        }
        let total = entries.len() as u64;
        for (i, (e, n)) in entries.into_iter().enumerate() {
            if active {
                (self.progress)(i as u64, total);
            }
            if e & L1_RESERVED != 0 {
                note_n!(
                    self,
                    n,
                    "ERROR found L1 entry with reserved bits set: {e:x}"
                );
                self.res.corruptions += n;
            }
            let l2 = e & OFFSET_MASK;
            self.inc_n(imrt, l2, self.cs, n);
            if l2 & (self.cs - 1) != 0 {
                note_n!(
                    self,
                    n,
                    "ERROR l2_offset={l2:x}: Table is not cluster aligned; L1 entry corrupted"
                );
                self.res.corruptions += n;
            }
            if let Some(w) = l2_weight.remove(&l2) {
                self.check_l2(imrt, l2, frag, fix, active, w)?;
            }
        }
        if active {
            (self.progress)(total, total);
        }
        Ok(())
    }

    /// QEMU's check_refcounts_l2, for `n` references to the table.
    fn check_l2(
        &mut self,
        imrt: &mut Imrt,
        l2_off: u64,
        frag: bool,
        fix: RepairMode,
        active: bool,
        n: u64,
    ) -> Result<()> {
        let ext = self.inner.geo.extended_l2;
        let df = self.inner.df;
        let es = self.inner.geo.l2_entry_size() as usize;
        let cs = self.cs;
        // Entries past the end of the file are zero: unallocated, no effect.
        let mut tbl = match self.read_in_file(l2_off, cs, es as u64, "read L2 table") {
            Ok(t) => t,
            Err(e) => {
                self.msg("ERROR: I/O error in check_refcounts_l2".into());
                self.res.check_errors += 1;
                return Err(e);
            }
        };
        let mut next_contiguous = 0u64;
        let fr = if frag { n } else { 0 };
        for i in 0..tbl.len() / es {
            let mut raw = be64(&tbl, i * es);
            let bitmap = if ext { be64(&tbl, i * es + 8) } else { 0 };
            let ty = qtype(raw, ext, df);
            let mut bad = 0u64;
            if ty != QType::Compressed && raw & L2_STD_RESERVED != 0 {
                note!(self, "ERROR found l2 entry with reserved bits set: {raw:x}");
                bad += 1;
            }
            match ty {
                QType::Compressed => {
                    let desc_mask = (1u64 << CompressedDescriptor::shift(self.cb)) - 1;
                    if raw & FLAG_COPIED != 0 {
                        note!(self,
                            "ERROR: coffset=0x{:x}: copied flag must never be set for compressed clusters",
                            raw & desc_mask
                        );
                        raw &= !FLAG_COPIED;
                        bad += 1;
                    }
                    if df {
                        note!(
                            self,
                            "ERROR compressed cluster {i} with data file, entry=0x{raw:x}"
                        );
                        self.res.corruptions += (bad + 1) * n;
                        continue;
                    }
                    if bitmap != 0 {
                        note!(self,
                            "ERROR compressed cluster {i} with non-zero subcluster allocation bitmap, entry=0x{raw:x}"
                        );
                        self.res.corruptions += (bad + 1) * n;
                        continue;
                    }
                    let d = CompressedDescriptor::decode(raw, self.cb);
                    self.inc_n(imrt, d.offset, d.byte_len(), n);
                    self.res.allocated_clusters += fr;
                    self.res.compressed_clusters += fr;
                    self.res.fragmented_clusters += fr;
                }
                QType::ZeroAlloc | QType::Normal => {
                    let offset = raw & OFFSET_MASK;
                    if (bitmap >> 32) & bitmap != 0 {
                        bad += 1;
                        note!(self,
                            "ERROR offset={offset:x}: Allocated cluster has corrupted subcluster allocation bitmap"
                        );
                    }
                    if offset & (cs - 1) != 0 {
                        let contains_data = if ext {
                            bitmap & BITMAP_ALL_ALLOC != 0
                        } else {
                            raw & FLAG_ZERO == 0
                        };
                        if !contains_data {
                            let repair = fix == RepairMode::All;
                            note!(self,
                                "{} offset={offset:x}: Preallocated cluster is not properly aligned; L2 entry corrupted.",
                                if repair { "Repairing" } else { "ERROR" }
                            );
                            if repair {
                                self.res.corruptions += 1;
                                if self.fix_l2_entry_by_zero(l2_off, &mut tbl, i, active)? {
                                    // The entry no longer references the
                                    // cluster: the other references see it
                                    // fixed.
                                    self.res.corruptions += bad;
                                    continue;
                                }
                                self.res.corruptions -= 1;
                            }
                        } else {
                            note!(self,
                                "ERROR offset={offset:x}: Data cluster is not properly aligned; L2 entry corrupted."
                            );
                        }
                        bad += 1;
                    }
                    if frag {
                        self.res.allocated_clusters += fr;
                        if next_contiguous != 0 && offset != next_contiguous {
                            self.res.fragmented_clusters += fr;
                        }
                        next_contiguous = offset + cs;
                    }
                    // Data in an external data file is not refcounted.
                    if !df {
                        self.inc_n(imrt, offset, cs, n);
                    }
                }
                QType::ZeroPlain => {}
                QType::Unallocated => {
                    if bitmap & BITMAP_ALL_ALLOC != 0 {
                        bad += 1;
                        note!(
                            self,
                            "ERROR: Unallocated cluster has non-zero subcluster allocation map"
                        );
                    }
                }
            }
            self.res.corruptions += bad * n;
        }
        Ok(())
    }

    /// QEMU's fix_l2_entry_by_zero: the entry becomes zero-plain (extended
    /// L2: its allocated subclusters become zero). Ok(true) when fixed; the
    /// caller counted the corruption. An overlap with metadata is an error.
    fn fix_l2_entry_by_zero(
        &mut self,
        l2_off: u64,
        tbl: &mut [u8],
        idx: usize,
        active: bool,
    ) -> Result<bool> {
        let ext = self.inner.geo.extended_l2;
        let es = self.inner.geo.l2_entry_size() as usize;
        let pos = idx * es;
        if ext {
            let mut bm = be64(tbl, pos + 8);
            bm |= bm << 32;
            bm &= BITMAP_ALL_ZERO;
            put_be64(tbl, pos + 8, bm);
            put_be64(tbl, pos, 0);
        } else {
            put_be64(tbl, pos, FLAG_ZERO);
        }
        let at = l2_off + pos as u64;
        if self.overlaps_metadata(
            at,
            es as u64,
            if active {
                Skip::ActiveL2
            } else {
                Skip::InactiveL2
            },
        ) {
            self.msg("ERROR: Overlap check failed".into());
            self.res.check_errors += 1;
            return Err(Error::Corrupt(format!(
                "{}: L2 entry at {at:#x} overlaps other metadata",
                self.inner.name
            )));
        }
        let w = self
            .inner
            .file
            .write_at(&tbl[pos..pos + es], at)
            .and_then(|_| self.inner.file.sync());
        self.inner.l2.discard_range(l2_off, self.cs);
        self.wrote = true;
        match w {
            Ok(()) => {
                self.res.corruptions -= 1;
                self.res.corruptions_fixed += 1;
                Ok(true)
            }
            Err(e) => {
                note!(self, "ERROR: Failed to overwrite L2 table entry: {e}");
                self.res.check_errors += 1;
                Ok(false)
            }
        }
    }

    /// QEMU's check_refblocks.
    fn check_refblocks(&mut self, imrt: &mut Imrt, fix: RepairMode) -> Result<()> {
        let table = self.inner.refs.table().to_vec();
        for (i, &e) in table.iter().enumerate() {
            let offset = e & REFTABLE_OFFSET_MASK;
            let cluster = offset >> self.cb;
            if e & !REFTABLE_OFFSET_MASK != 0 {
                note!(self, "ERROR refcount table entry {i} has reserved bits set");
                self.res.corruptions += 1;
                self.rebuild = true;
                self.hard_rebuild = true;
                continue;
            }
            if offset & (self.cs - 1) != 0 {
                note!(self,
                    "ERROR refcount block {i} is not cluster aligned; refcount table entry corrupted"
                );
                self.res.corruptions += 1;
                self.rebuild = true;
                self.hard_rebuild = true;
                continue;
            }
            if cluster >= imrt.len() {
                self.res.corruptions += 1;
                let repair = fix == RepairMode::All;
                note!(
                    self,
                    "{} refcount block {i} is outside image",
                    if repair { "Repairing" } else { "ERROR" }
                );
                if repair {
                    // Make the file cover the block, as QEMU does.
                    let r = match offset.checked_add(self.cs) {
                        Some(end)
                            if end / self.cs > MAX_CHECK_CLUSTERS
                                || end.saturating_sub(self.file_len) > MAX_REFBLOCK_EXTEND
                                || end.saturating_sub(self.start_len)
                                    > MAX_REFBLOCK_EXTEND_TOTAL =>
                        {
                            Err("File too large".to_string())
                        }
                        None => Err("File too large".to_string()),
                        Some(end) => self
                            .inner
                            .file
                            .set_len(end)
                            .and_then(|_| self.inner.file.len())
                            .map_err(|e| e.to_string()),
                    };
                    match r {
                        Ok(len) if len.div_ceil(self.cs) > cluster => {
                            self.file_len = len;
                            self.wrote = true;
                            if !imrt.grow(len.div_ceil(self.cs)) {
                                self.res.check_errors += 1;
                                return Err(Error::NoSpace(
                                    "not enough memory for the refcount check".into(),
                                ));
                            }
                            self.res.corruptions -= 1;
                            self.res.corruptions_fixed += 1;
                            self.inc(imrt, offset, self.cs);
                        }
                        Ok(_) => {
                            self.rebuild = true;
                            self.hard_rebuild = true;
                            self.msg("ERROR could not resize image: Invalid argument".into());
                        }
                        Err(m) => {
                            self.rebuild = true;
                            self.hard_rebuild = true;
                            note!(self, "ERROR could not resize image: {m}");
                        }
                    }
                }
                continue;
            }
            if offset != 0 {
                self.inc(imrt, offset, self.cs);
                let v = imrt.get(cluster);
                if v != 1 {
                    note!(self, "ERROR refcount block {i} refcount={v}");
                    self.res.corruptions += 1;
                    self.rebuild = true;
                    self.hard_rebuild = true;
                }
            }
        }
        Ok(())
    }

    // ----- snapshots and bitmaps -----

    /// Parses the snapshot table; returns the snapshots and the table's size
    /// in bytes. A table that cannot be parsed counts as one corruption.
    fn read_snapshots(&mut self) -> (Vec<Snapshot>, u64) {
        let n = self.inner.header.nb_snapshots;
        if n == 0 {
            return (Vec::new(), 0);
        }
        let base = self.inner.header.snapshots_offset;
        match self.parse_snapshots(base, n) {
            Ok(v) => v,
            Err(m) => {
                note!(self, "ERROR snapshot table: {m}");
                self.res.corruptions += 1;
                (Vec::new(), 0)
            }
        }
    }

    fn parse_snapshots(
        &self,
        base: u64,
        n: u32,
    ) -> std::result::Result<(Vec<Snapshot>, u64), String> {
        if n > snapshot::MAX_SNAPSHOTS {
            return Err(format!("too many snapshots ({n})"));
        }
        if base & (self.cs - 1) != 0 {
            return Err(format!("table offset {base:#x} is not cluster aligned"));
        }
        // Read the table in one go, bounded by the file and the size limit.
        let avail = self
            .file_len
            .saturating_sub(base)
            .min(snapshot::MAX_SNAPSHOTS_SIZE);
        let buf = self
            .read(base, avail, "read snapshot table")
            .map_err(|e| e.to_string())?;
        let (entries, len) = snapshot::parse_table(&buf, n, false).map_err(|e| match e {
            qcow2_format::FormatError::Truncated(_) => {
                "snapshot table exceeds the end of the file".to_string()
            }
            e => e.to_string(),
        })?;
        let out = entries
            .into_iter()
            .map(|e| Snapshot {
                l1_offset: e.l1_table_offset,
                l1_size: e.l1_size as u64,
                id: String::from_utf8_lossy(&e.id).into_owned(),
                name: String::from_utf8_lossy(&e.name).into_owned(),
            })
            .collect();
        Ok((out, len))
    }

    /// QEMU's qcow2_check_bitmaps_refcounts.
    fn check_bitmaps(&mut self, imrt: &mut Imrt) -> Result<()> {
        if self.inner.header.autoclear_features & AUTOCLEAR_BITMAPS == 0 {
            return Ok(());
        }
        let Some(ext) = self.inner.header.extension(EXT_BITMAPS) else {
            return Ok(());
        };
        if ext.len() < 24 {
            return Ok(());
        }
        let nb = be32(ext, 0);
        let dir_size = be64(ext, 8);
        let dir_off = be64(ext, 16);
        if nb == 0 {
            return Ok(());
        }
        self.inc(imrt, dir_off, dir_size);
        if dir_size > 0 {
            self.extra_metadata.push((dir_off, dir_size));
        }
        let tables = match self.parse_bitmap_dir(nb, dir_off, dir_size) {
            Ok(t) => t,
            Err(m) => {
                note!(self, "ERROR bitmap directory: {m}");
                self.res.corruptions += 1;
                return Ok(());
            }
        };
        // As QEMU: the tables up to the first invalid one are counted, and
        // those before it walked. Tables that repeat (or overlap) are read
        // once, their entries weighted by the number of tables holding them.
        let valid = |&(t_off, t_size): &(u64, u64)| {
            t_off & (self.cs - 1) == 0
                && t_size <= bitmap::MAX_TABLE_ENTRIES
                && t_off
                    .checked_add(t_size * 8)
                    .is_some_and(|e| e <= self.file_len)
        };
        let stop = tables.iter().position(|t| !valid(t));
        let counted: Vec<(u64, u64)> = tables[..stop.map_or(tables.len(), |i| i + 1)]
            .iter()
            .map(|&(o, n)| (o, n.saturating_mul(8)))
            .collect();
        self.inc_ranges(imrt, &counted);
        if let Some(i) = stop {
            let (t_off, t_size) = tables[i];
            note!(
                self,
                "ERROR bitmap table at {t_off:#x} ({t_size} entries) is invalid"
            );
            self.res.corruptions += 1;
        }
        let walked = &counted[..stop.unwrap_or(counted.len())];
        for (e, n) in self.tally_tables(walked, "read bitmap table")? {
            let off = e & bitmap::BTE_OFFSET_MASK;
            let bad = e & bitmap::BTE_RESERVED != 0
                || (off != 0 && (e & bitmap::BTE_ALL_ONES != 0 || off & (self.cs - 1) != 0));
            if bad {
                self.res.corruptions += n;
                continue;
            }
            if off != 0 {
                self.inc_n(imrt, off, self.cs, n);
            }
        }
        Ok(())
    }

    /// Bitmap directory: (table offset, table entries) of each bitmap.
    fn parse_bitmap_dir(
        &self,
        nb: u32,
        off: u64,
        size: u64,
    ) -> std::result::Result<Vec<(u64, u64)>, String> {
        if nb > bitmap::MAX_BITMAPS || size > bitmap::MAX_DIRECTORY_SIZE || size == 0 {
            return Err("invalid size".into());
        }
        if off.checked_add(size).is_none_or(|e| e > self.file_len) {
            return Err("exceeds the end of the file".into());
        }
        let buf = self
            .read(off, size, "read bitmap directory")
            .map_err(|e| e.to_string())?;
        let entries = bitmap::parse_directory(&buf, nb).map_err(|e| e.to_string())?;
        Ok(entries
            .iter()
            .map(|e| (e.table_offset, e.table_size as u64))
            .collect())
    }

    // ----- comparison and repair -----

    /// QEMU's compare_refcounts; returns the highest cluster in use.
    fn compare(&mut self, imrt: &mut Imrt, fix: RepairMode) -> Result<u64> {
        let mut highest = 0u64;
        let mut i = 0u64;
        let epb = self.inner.refs.entries_per_block();
        while i < imrt.len() {
            let block = i / epb;
            let uncovered = self
                .inner
                .refs
                .table()
                .get(block as usize)
                .is_none_or(|&b| b == 0);
            if uncovered && imrt.get(i) == 0 {
                // Stored refcounts are zero here: skip to the next reference.
                let end = ((block + 1) * epb).min(imrt.len());
                i += 1;
                while i < end && imrt.get(i) == 0 {
                    i += 1;
                }
                continue;
            }
            let stored = match self.inner.refs.get(&*self.inner.file, i) {
                Ok(v) => v,
                Err(e) => {
                    note!(self, "Can't get refcount for cluster {i}: {e}");
                    self.res.check_errors += 1;
                    i += 1;
                    continue;
                }
            };
            let expected = imrt.get(i);
            if stored > 0 || expected > 0 {
                highest = i;
            }
            if stored != expected {
                let leak = stored > expected;
                if stored == 0 {
                    // As QEMU: a referenced cluster without a refcount is
                    // repaired by rebuilding the refcount structures.
                    self.rebuild = true;
                    self.hard_rebuild = true;
                }
                let fixable = if leak {
                    fix != RepairMode::None
                } else {
                    fix == RepairMode::All && !self.hard_rebuild
                };
                note!(
                    self,
                    "{} cluster {i} refcount={stored} reference={expected}",
                    if fixable {
                        "Repairing"
                    } else if leak {
                        "Leaked"
                    } else {
                        "ERROR"
                    }
                );
                let fixed = fixable && self.set_refcount(imrt, i, expected);
                if fixed {
                    if leak {
                        self.res.leaks_fixed += 1;
                    } else {
                        self.res.corruptions_fixed += 1;
                    }
                } else if leak {
                    self.res.leaks += 1;
                } else {
                    self.res.corruptions += 1;
                }
            }
            i += 1;
        }
        Ok(highest)
    }

    /// Sets a stored refcount. A missing refcount block is placed on a
    /// cluster nothing references; new structures are added to `imrt`.
    fn set_refcount(&mut self, imrt: &mut Imrt, cluster: u64, value: u64) -> bool {
        let epb = self.inner.refs.entries_per_block();
        let block = cluster / epb;
        let table_len = self.inner.refs.table().len() as u64;
        let covered = block < table_len && self.inner.refs.table()[block as usize] != 0;
        let file = &*self.inner.file;
        let r = if covered || value == 0 {
            self.inner
                .refs
                .set(file, cluster, value, cluster..cluster + 1)
        } else {
            let before_table = self.inner.refs.table().to_vec();
            let before_loc = self.inner.refs.table_location();
            let avoid = if block < table_len {
                // The block describes itself: place it on the first cluster
                // of its range that nothing references.
                let first = block * epb;
                let mut r = first;
                while r < first + epb && imrt.get(r) != 0 {
                    r += 1;
                }
                first..r.max(first)
            } else {
                // The table grows past everything in use.
                cluster..imrt.len().max(cluster + 1)
            };
            let r = self.inner.refs.set(file, cluster, value, avoid);
            self.account_new_structures(imrt, &before_table, before_loc);
            r
        };
        self.wrote = true;
        match r {
            Ok(()) => true,
            Err(e) => {
                let e = refcount_err(&self.inner.name, e);
                note!(
                    self,
                    "ERROR could not set the refcount of cluster {cluster}: {}",
                    errno_text(&e)
                );
                false
            }
        }
    }

    /// After the refcount layer created blocks or moved its table: count
    /// them in the expected refcounts.
    fn account_new_structures(&mut self, imrt: &mut Imrt, before: &[u64], loc: (u64, u32)) {
        let table = self.inner.refs.table().to_vec();
        let new_loc = self.inner.refs.table_location();
        let add = |imrt: &mut Imrt, c: u64, up: bool| {
            if c >= imrt.len() && !imrt.grow(c + 1) {
                return;
            }
            let v = imrt.get(c);
            if up {
                imrt.set(c, (v + 1).min(imrt.max));
            } else {
                imrt.set(c, v.saturating_sub(1));
            }
        };
        for (i, &e) in table.iter().enumerate() {
            if e != 0 && before.get(i).copied().unwrap_or(0) == 0 {
                add(imrt, e >> self.cb, true);
            }
        }
        if new_loc != loc {
            for k in 0..loc.1 as u64 {
                add(imrt, (loc.0 >> self.cb) + k, false);
            }
            for k in 0..new_loc.1 as u64 {
                add(imrt, (new_loc.0 >> self.cb) + k, true);
            }
        }
        if let Ok(len) = self.inner.file.len() {
            self.file_len = self.file_len.max(len);
        }
    }

    /// QEMU's rebuild path of qcow2_check_refcounts: new refcount
    /// structures, then the old ones (now leaked) are freed; the counts of
    /// the first comparison turn into fixed counts.
    fn rebuild_and_recheck(&mut self, imrt: &mut Imrt) -> Result<u64> {
        let old = self.res.clone();
        self.msg("Rebuilding refcount structure".into());
        self.rebuild_structure(imrt)?;
        self.res.corruptions = 0;
        self.res.leaks = 0;
        self.rebuild = false;
        self.hard_rebuild = false;
        let order = self.inner.refs.order();
        *imrt = Imrt::new(order, self.file_len.div_ceil(self.cs))
            .ok_or_else(|| Error::NoSpace("not enough memory for the refcount check".into()))?;
        // Recount without touching the fragmentation numbers again.
        let bfi = (
            self.res.allocated_clusters,
            self.res.fragmented_clusters,
            self.res.compressed_clusters,
        );
        self.calculate(imrt, RepairMode::None)?;
        (
            self.res.allocated_clusters,
            self.res.fragmented_clusters,
            self.res.compressed_clusters,
        ) = bfi;
        // Free the old structures; only leaks left over count.
        let saved = std::mem::take(&mut self.res);
        self.res.messages = saved.messages.clone();
        let highest = self.compare(imrt, RepairMode::Leaks)?;
        if self.rebuild {
            self.msg("ERROR rebuilt refcount structure is still broken".into());
        }
        let fresh_leaks = self.res.leaks;
        let messages = std::mem::take(&mut self.res.messages);
        self.res = saved;
        self.res.messages = messages;
        if self.res.corruptions < old.corruptions {
            self.res.corruptions_fixed += old.corruptions - self.res.corruptions;
        }
        if self.res.leaks < old.leaks {
            self.res.leaks_fixed += old.leaks - self.res.leaks;
        }
        self.res.leaks += fresh_leaks;
        Ok(highest)
    }

    /// Writes a refcount table and blocks describing `imrt` past the end of
    /// everything in use, switches the header to them and reloads the
    /// refcount layer.
    fn rebuild_structure(&mut self, imrt: &mut Imrt) -> Result<()> {
        let cs = self.cs;
        let order = self.inner.refs.order();
        let epb = self.inner.refs.entries_per_block();
        let name = self.inner.name.clone();
        let start = imrt.len().max(self.file_len.div_ceil(cs));
        // Blocks for every range up to the end of the new structures, and a
        // table for those blocks: iterate to the fixed point.
        let (mut blocks, mut tclusters) = (0u64, 0u64);
        loop {
            let end = start + tclusters + blocks;
            let nb = end.div_ceil(epb);
            let tc = (nb * 8).div_ceil(cs);
            if nb == blocks && tc == tclusters {
                break;
            }
            (blocks, tclusters) = (nb, tc);
        }
        let end = start + tclusters + blocks;
        if tclusters * cs > qcow2_format::header::MAX_REFTABLE_BYTES
            || end > MAX_CHECK_CLUSTERS
            || !imrt.grow(end)
        {
            self.res.check_errors += 1;
            return Err(Error::NoSpace(format!(
                "{name}: the rebuilt refcount structure would be too large"
            )));
        }
        for c in start..end {
            imrt.set(c, 1);
        }
        // Blocks first, then the table (QEMU's order of allocation).
        let table_off = (start + blocks) * cs;
        let mut table = vec![0u8; (tclusters * cs) as usize];
        let mut buf = vec![0u8; cs as usize];
        self.wrote = true;
        for b in 0..blocks {
            buf.fill(0);
            let first = b * epb;
            for c in first..(first + epb).min(imrt.len()) {
                qcow2_format::refcount::set(&mut buf, (c - first) as usize, order, imrt.get(c));
            }
            let off = (start + b) * cs;
            put_be64(&mut table, b as usize * 8, off);
            self.inner
                .file
                .write_at(&buf, off)
                .map_err(ioerr("write refcount block", &name))?;
        }
        self.inner
            .file
            .write_at(&table, table_off)
            .map_err(ioerr("write refcount table", &name))?;
        self.inner.file.sync().map_err(ioerr("sync", &name))?;
        self.inner.stats.file_syncs += 1;
        let mut h = [0u8; 12];
        put_be64(&mut h, 0, table_off);
        h[8..12].copy_from_slice(&(tclusters as u32).to_be_bytes());
        self.inner
            .file
            .write_at(&h, 48)
            .map_err(ioerr("write header", &name))?;
        self.inner.file.sync().map_err(ioerr("sync", &name))?;
        self.inner.stats.file_syncs += 1;
        self.inner.header.refcount_table_offset = table_off;
        self.inner.header.refcount_table_clusters = tclusters as u32;
        let granularity = self.inner.opts.dirty_granularity.clamp(512, 1 << 21);
        self.inner.refs = qcow2_refcount::Refcounts::load(
            &*self.inner.file,
            self.cb,
            order,
            table_off,
            tclusters as u32,
            self.inner.opts.refcount_cache_bytes,
            granularity,
        )
        .map_err(|e| refcount_err(&name, e))?;
        self.file_len = self.file_len.max(end * cs);
        Ok(())
    }

    /// QEMU's check_oflag_copied (active tables only).
    fn check_oflag_copied(&mut self) -> Result<()> {
        let repair = match self.fix {
            RepairMode::All => true,
            RepairMode::Leaks => {
                self.res.check_errors == 0 && self.res.corruptions == 0 && self.res.leaks == 0
            }
            RepairMode::None => false,
        };
        let ext = self.inner.geo.extended_l2;
        let es = self.inner.geo.l2_entry_size() as usize;
        let cb = self.cb;
        // Each L2 table is read once, however many L1 entries point at it.
        let mut refs: std::collections::HashMap<u64, u64> = Default::default();
        for &e in &self.inner.l1 {
            *refs.entry(e & OFFSET_MASK).or_default() += 1;
        }
        for i in 0..self.inner.l1.len() {
            let l1e = self.inner.l1[i];
            let l2_off = l1e & OFFSET_MASK;
            if l2_off == 0 {
                continue;
            }
            let Ok(rc) = self.inner.refs.get(&*self.inner.file, l2_off >> cb) else {
                continue;
            };
            if (rc == 1) != (l1e & FLAG_COPIED != 0) {
                self.res.corruptions += 1;
                note!(
                    self,
                    "{} OFLAG_COPIED L2 cluster: l1_index={i} l1_entry={l1e:x} refcount={rc}",
                    if repair { "Repairing" } else { "ERROR" }
                );
                if repair {
                    let new = if rc == 1 {
                        l1e | FLAG_COPIED
                    } else {
                        l1e & !FLAG_COPIED
                    };
                    let mut b = [0u8; 8];
                    put_be64(&mut b, 0, new);
                    let at = self.inner.header.l1_table_offset + i as u64 * 8;
                    self.wrote = true;
                    if let Err(e) = self.inner.file.write_at(&b, at) {
                        self.res.check_errors += 1;
                        return Err(Error::io(format!("{}: write L1 table", self.inner.name), e));
                    }
                    self.inner.l1[i] = new;
                    self.res.corruptions -= 1;
                    self.res.corruptions_fixed += 1;
                }
            }
            let Some(weight) = refs.remove(&l2_off) else {
                continue;
            };
            let mut tbl = match self.read_in_file(l2_off, self.cs, es as u64, "read L2 table") {
                Ok(t) => t,
                Err(e) => {
                    note!(self, "ERROR: Could not read L2 table: {}", errno_text(&e));
                    self.res.check_errors += 1;
                    return Err(e);
                }
            };
            let mut dirty = 0u64;
            for j in 0..tbl.len() / es {
                let raw = be64(&tbl, j * es);
                let data = raw & OFFSET_MASK;
                let ty = qtype(raw, ext, self.inner.df);
                if ty != QType::Normal && ty != QType::ZeroAlloc {
                    continue;
                }
                // Data in an external data file has an implicit refcount of 1.
                let rc = if self.inner.df {
                    1
                } else {
                    let Ok(rc) = self.inner.refs.get(&*self.inner.file, data >> cb) else {
                        continue;
                    };
                    rc
                };
                if (rc == 1) != (raw & FLAG_COPIED != 0) {
                    // Repaired at the first reference; else each counts.
                    self.res.corruptions += if repair { 1 } else { weight };
                    note!(
                        self,
                        "{} OFLAG_COPIED data cluster: l2_entry={raw:x} refcount={rc}",
                        if repair { "Repairing" } else { "ERROR" }
                    );
                    if repair {
                        let new = if rc == 1 {
                            raw | FLAG_COPIED
                        } else {
                            raw & !FLAG_COPIED
                        };
                        put_be64(&mut tbl, j * es, new);
                        dirty += 1;
                    }
                }
            }
            if dirty > 0 {
                if l2_off & (self.cs - 1) != 0
                    || self.overlaps_metadata(l2_off, self.cs, Skip::ActiveL2)
                {
                    self.msg("ERROR: Could not write L2 table; metadata overlap check failed: Input/output error".into());
                    self.res.check_errors += 1;
                    return Err(Error::Corrupt(format!(
                        "{}: L2 table at {l2_off:#x} overlaps other metadata",
                        self.inner.name
                    )));
                }
                self.wrote = true;
                let w = self.inner.file.write_at(&tbl, l2_off);
                self.inner.l2.discard_range(l2_off, self.cs);
                if let Err(e) = w {
                    note!(self, "ERROR: Could not write L2 table: {e}");
                    self.res.check_errors += 1;
                    return Err(Error::io(format!("{}: write L2 table", self.inner.name), e));
                }
                self.res.corruptions -= dirty;
                self.res.corruptions_fixed += dirty;
            }
        }
        Ok(())
    }

    /// Whether `[off, off+len)` (rounded out to clusters) overlaps the
    /// header, an L1 table, the refcount table, a refcount block, the
    /// snapshot table or the bitmap directory (QEMU's metadata overlap
    /// check, minus the L2 tables of the kind being written).
    fn overlaps_metadata(&self, off: u64, len: u64, skip: Skip) -> bool {
        let cs = self.cs;
        if off < cs {
            return true;
        }
        let start = off & !(cs - 1);
        let end = off.saturating_add(len).saturating_add(cs - 1) & !(cs - 1);
        let hit = |a: u64, l: u64| l > 0 && a < end && start < a.saturating_add(l);
        let h = &self.inner.header;
        if hit(h.l1_table_offset, h.l1_size as u64 * 8) {
            return true;
        }
        let (rt, rtc) = self.inner.refs.table_location();
        if hit(rt, rtc as u64 * cs) {
            return true;
        }
        if self
            .inner
            .refs
            .table()
            .iter()
            .any(|&b| b != 0 && hit(b, cs))
        {
            return true;
        }
        if self.extra_metadata.iter().any(|&(a, l)| hit(a, l)) {
            return true;
        }
        if skip != Skip::ActiveL2
            && self
                .inner
                .l1
                .iter()
                .any(|&e| e & OFFSET_MASK != 0 && hit(e & OFFSET_MASK, cs))
        {
            return true;
        }
        false
    }
}

/// Distinct nonzero values of `entries` with how often each occurs (times
/// `n`), in the order of their first occurrence.
fn tally(entries: impl Iterator<Item = u64>, n: u64) -> Vec<(u64, u64)> {
    let mut counts = Vec::new();
    let mut index = std::collections::HashMap::new();
    for e in entries {
        add_tally(&mut counts, &mut index, e, n);
    }
    counts
}

fn add_tally(
    counts: &mut Vec<(u64, u64)>,
    index: &mut std::collections::HashMap<u64, usize>,
    e: u64,
    n: u64,
) {
    if e == 0 {
        return;
    }
    match index.entry(e) {
        std::collections::hash_map::Entry::Occupied(o) => counts[*o.get()].1 += n,
        std::collections::hash_map::Entry::Vacant(v) => {
            v.insert(counts.len());
            counts.push((e, n));
        }
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Skip {
    ActiveL2,
    InactiveL2,
}

struct Snapshot {
    l1_offset: u64,
    l1_size: u64,
    id: String,
    name: String,
}
