//! Shadow-paged commits: a change to the image's metadata built entirely
//! in clusters that are free before and after it, then made the image's
//! state by one write of the header fields that name the active L1 table,
//! the refcount table and the snapshot table (bytes 40..72: one sector).
//!
//! Snapshot creation and deletion change, together, the refcounts of many
//! clusters and the COPIED flags of the active L2 tables. Those live in
//! different clusters, so written in place no order keeps every
//! intermediate state consistent (QEMU's own code leaves a window where
//! `qemu-img check` reports OFLAG_COPIED errors). Here nothing the current
//! header reaches is written: the active L2 tables whose flags change are
//! copied, the L1 table and the snapshot table are new, and the refcounts
//! of the new state are written as new refcount structures. Until the header
//! write the file reads as the old state; after it, as the new one; the
//! structures only the old state used are free in the new one (counted
//! zero there), so a crash at any point leaves either state, never a mix.

use crate::error::{ioerr, Error, Result};
use crate::image::{refcount_err, Inner};
use qcow2_format::{put_be32, put_be64};
use qcow2_io::Storage;

/// Refcounts of the old state and of the new one being built.
pub(crate) struct Shadow {
    old: Vec<u64>,
    new: Vec<u64>,
    max: u64,
    /// Clusters that may be described (a bound against absurd offsets).
    limit: u64,
    /// First cluster that may be free (first-fit search start).
    hint: u64,
}

impl Shadow {
    /// The refcount of cluster `c` in the new state.
    pub(crate) fn get(&self, c: u64) -> u64 {
        self.new.get(c as usize).copied().unwrap_or(0)
    }

    /// Adds `delta` to the new refcount of cluster `c`.
    pub(crate) fn add(&mut self, c: u64, delta: i64, name: &str) -> Result<()> {
        if c >= self.limit {
            return Err(Error::Corrupt(format!(
                "{name}: cluster {c} lies far past the end of the file"
            )));
        }
        if c as usize >= self.new.len() {
            self.new.resize(c as usize + 1, 0);
        }
        let v = self.new[c as usize] as i128 + delta as i128;
        if v < 0 {
            return Err(Error::Corrupt(format!(
                "{name}: refcount of cluster {c} would drop below zero"
            )));
        }
        if v as u64 > self.max {
            return Err(Error::Invalid(format!(
                "'{name}': refcount of cluster {c} would overflow"
            )));
        }
        self.new[c as usize] = v as u64;
        Ok(())
    }

    fn free_in_both(&self, c: u64) -> bool {
        c > 0
            && self.old.get(c as usize).copied().unwrap_or(0) == 0
            && self.new.get(c as usize).copied().unwrap_or(0) == 0
    }

    /// `n` contiguous clusters free in both states, counted once in the
    /// new one. Returns the first.
    pub(crate) fn alloc(&mut self, n: u64) -> u64 {
        let mut c = self.hint.max(1);
        loop {
            if (c..c + n).all(|x| self.free_in_both(x)) {
                break;
            }
            c += 1;
        }
        let end = (c + n) as usize;
        if end > self.new.len() {
            self.new.resize(end, 0);
        }
        for x in c..c + n {
            self.new[x as usize] = 1;
        }
        if n == 1 {
            self.hint = c + 1;
        }
        self.limit = self.limit.max(c + n + 1);
        c
    }

    /// Takes back an allocation (its clusters free again in the new state).
    fn release(&mut self, c: u64, n: u64) {
        for x in c..c + n {
            self.new[x as usize] = 0;
        }
        self.hint = self.hint.min(c);
    }
}

/// What the header write switches to.
pub(crate) struct Commit {
    /// New active L1 table: (offset, entries); `None`: unchanged.
    pub(crate) l1: Option<(u64, Vec<u64>)>,
    /// Number of snapshots and offset of their table.
    pub(crate) snapshots: (u32, u64),
}

impl Inner {
    /// The refcounts as they are (the caches written back first), as both
    /// the old and the starting new state.
    pub(crate) fn shadow_load(&mut self) -> Result<Shadow> {
        let cs = self.geo.cluster_size();
        let name = self.name.clone();
        let len = self.file.len().map_err(ioerr("stat", &name))?;
        let covered = self.refs.table().len() as u64 * self.refs.entries_per_block();
        let span = len.div_ceil(cs).min(covered);
        let mut old = Vec::with_capacity(span as usize);
        for c in 0..span {
            old.push(
                self.refs
                    .get(&*self.file, c)
                    .map_err(|e| refcount_err(&name, e))?,
            );
        }
        Ok(Shadow {
            new: old.clone(),
            old,
            max: self.refs.max_refcount(),
            // New structures and copies are at most as large as the file.
            limit: len.div_ceil(cs) * 2 + 64,
            hint: 1,
        })
    }

    /// Writes `bytes` into `n` clusters allocated in the shadow state.
    pub(crate) fn shadow_write(
        &mut self,
        sh: &mut Shadow,
        bytes: &[u8],
        what: &str,
    ) -> Result<u64> {
        let cs = self.geo.cluster_size();
        let n = (bytes.len() as u64).div_ceil(cs).max(1);
        let off = sh.alloc(n) * cs;
        self.overlap_check(off, n * cs, what)?;
        let mut b = bytes.to_vec();
        b.resize((n * cs) as usize, 0);
        self.file
            .write_at(&b, off)
            .map_err(ioerr(what, &self.name))?;
        self.set_unsynced();
        Ok(off)
    }

    /// Writes the refcount structures of `sh`'s new state (the old ones
    /// counted free in it), makes everything durable, switches the header
    /// in one write, makes that durable, and reloads the in-memory state.
    pub(crate) fn shadow_commit(&mut self, mut sh: Shadow, c: Commit) -> Result<()> {
        let cs = self.geo.cluster_size();
        let cb = self.geo.cluster_bits;
        let order = self.refs.order();
        let name = self.name.clone();
        let (old_rt, old_rtc) = self.refs.table_location();
        let old_blocks: Vec<u64> = self
            .refs
            .table()
            .iter()
            .copied()
            .filter(|&b| b != 0)
            .collect();
        for x in (old_rt >> cb)..(old_rt >> cb) + old_rtc as u64 {
            sh.add(x, -1, &name)?;
        }
        for b in &old_blocks {
            sh.add(b >> cb, -1, &name)?;
        }
        // New table and blocks: sized for what they describe, themselves
        // included (allocating may extend that).
        let epb = qcow2_format::refcount::entries_per_block(cb, order);
        let mut blocks: Vec<u64> = Vec::new();
        let mut table: Option<(u64, u64)> = None;
        loop {
            let span = sh
                .new
                .iter()
                .rposition(|&v| v != 0)
                .map_or(1, |p| p as u64 + 1);
            let nb = span.div_ceil(epb).max(1);
            let tc = (nb * 8).div_ceil(cs).max(1);
            if tc * cs > qcow2_format::header::MAX_REFTABLE_BYTES {
                return Err(Error::NoSpace(format!(
                    "{name}: the refcount table would be too large"
                )));
            }
            if blocks.len() as u64 >= nb && table.is_some_and(|(_, n)| n >= tc) {
                break;
            }
            if table.is_none_or(|(_, n)| n < tc) {
                if let Some((t, n)) = table {
                    sh.release(t, n);
                }
                table = Some((sh.alloc(tc), tc));
            }
            while (blocks.len() as u64) < nb {
                blocks.push(sh.alloc(1));
            }
        }
        let (t_first, t_clusters) = table.unwrap_or((0, 0));
        let mut tbytes = vec![0u8; (t_clusters * cs) as usize];
        let mut buf = vec![0u8; cs as usize];
        for (i, &blk) in blocks.iter().enumerate() {
            buf.fill(0);
            let first = i as u64 * epb;
            for x in first..(first + epb).min(sh.new.len() as u64) {
                qcow2_format::refcount::set(
                    &mut buf,
                    (x - first) as usize,
                    order,
                    sh.new[x as usize],
                );
            }
            put_be64(&mut tbytes, i * 8, blk * cs);
            self.overlap_check(blk * cs, cs, "write refcount block")?;
            self.file
                .write_at(&buf, blk * cs)
                .map_err(ioerr("write refcount block", &name))?;
        }
        self.overlap_check(t_first * cs, t_clusters * cs, "write refcount table")?;
        self.file
            .write_at(&tbytes, t_first * cs)
            .map_err(ioerr("write refcount table", &name))?;
        self.set_unsynced();
        // Everything the new state reaches is durable before the switch.
        self.sync()?;
        let l1_off =
            c.l1.as_ref()
                .map_or(self.header.l1_table_offset, |(o, _)| *o);
        let mut h = [0u8; 32];
        put_be64(&mut h, 0, l1_off);
        put_be64(&mut h, 8, t_first * cs);
        put_be32(&mut h, 16, t_clusters as u32);
        put_be32(&mut h, 20, c.snapshots.0);
        put_be64(&mut h, 24, c.snapshots.1);
        self.check_sync_failed()?;
        self.file
            .write_at(&h, 40)
            .map_err(ioerr("write header", &name))?;
        self.set_unsynced();
        self.sync()?;
        // The new state, in memory.
        self.header.l1_table_offset = l1_off;
        self.header.refcount_table_offset = t_first * cs;
        self.header.refcount_table_clusters = t_clusters as u32;
        self.header.nb_snapshots = c.snapshots.0;
        self.header.snapshots_offset = c.snapshots.1;
        if let Some((_, l1)) = c.l1 {
            self.l1 = l1;
        }
        self.l1_dirty.clear();
        self.l2.clear();
        self.fresh_l2.clear();
        let granularity = self.opts.dirty_granularity.clamp(512, 1 << 21);
        self.refs = qcow2_refcount::Refcounts::load(
            &*self.file,
            cb,
            order,
            t_first * cs,
            t_clusters as u32,
            self.opts.refcount_cache_bytes,
            granularity,
        )
        .map_err(|e| refcount_err(&name, e))?;
        self.active_l1_moved();
        self.refresh_snapshot_ranges()?;
        Ok(())
    }
}
