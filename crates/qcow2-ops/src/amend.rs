//! `amend`: change the format options of an existing image (compat level,
//! lazy refcounts), as `qemu-img amend` does.
//!
//! Every header change is one write within the first cluster followed by a
//! sync, so a crash leaves either the old or the new header. Structures the
//! new header no longer uses (old refcount structures, the old bitmap
//! directory, tables and data of a downgrade) are freed only after it is
//! durable; new ones are durable, with their refcounts, before it is written.

use crate::error::{Error, Result};
use crate::image::{ioerr, refcount_err, Image, Inner};
use qcow2_format::entry::L1Entry;
use qcow2_format::header::{self, V2_HEADER_LEN, V3_HEADER_LEN};

/// What to change; `None` keeps the current value.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct AmendOptions {
    /// Target header version: 2 (compat=0.10) or 3 (compat=1.1).
    pub version: Option<u32>,
    /// Lazy refcounts (v3 only).
    pub lazy_refcounts: Option<bool>,
    /// Refcount width in bits, a power of two from 1 to 64 (v2 images: 16
    /// only); the refcount structures are rebuilt at the new width.
    pub refcount_bits: Option<u32>,
    /// Backing file name, as `qemu-img amend -o backing_file=`. Like QEMU
    /// 10, amend does not change the backing file (that is
    /// [`Image::set_backing`], `qemu-img rebase -u`): with `backing_fmt`,
    /// it must name the current backing file and format, else amend fails
    /// with [`Error::Invalid`], after the upgrade and the refcount width
    /// change asked for with it (those stay done) and before any other
    /// change, as QEMU does.
    pub backing_file: Option<String>,
    /// Backing file format, as `-o backing_fmt=` (see `backing_file`).
    pub backing_fmt: Option<String>,
}

impl Image {
    /// Changes the image's format options (see [`AmendOptions`]). A
    /// downgrade to version 2 keeps persistent bitmaps in the header's
    /// extension, as QEMU 10 does (a v2 header cannot vouch for them: they
    /// are inconsistent from then on).
    pub fn amend(&self, o: &AmendOptions) -> Result<()> {
        let mut g = self.exclusive();
        // Every refusal comes before anything is written, but that of a
        // backing file change: QEMU's order (see `Inner::amend`).
        g.validate(o)?;
        if o.version == Some(2) && g.header.version > 2 && !g.backing_refused(o) {
            // compat=0.10 has no zero clusters: expand those of the active
            // table first by writing zeroes through the ordinary write path,
            // which copies a host cluster shared with a snapshot instead of
            // writing into it (QEMU writes in place there and corrupts the
            // snapshot). Then those of the snapshot tables (see
            // `expand_snapshot_zeros`).
            let zeros = g.active_zero_clusters()?;
            let cs = g.geo.cluster_size();
            let size = g.header.size;
            let backing = g.header.backing_file.is_some();
            // The guest reads zeroes there before and after: no bitmap bit
            // is set for it (QEMU's expansion sets none either).
            g.pause_bitmaps(true);
            drop(g);
            let buf = vec![0u8; cs as usize];
            let mut r = Ok(());
            for (guest, plain) in zeros {
                let n = cs.min(size - guest);
                // Plain zero without a backing file becomes unallocated, as
                // in QEMU (done with the snapshot tables' entries below).
                if !plain || backing {
                    r = self.write(guest, &buf[..n as usize], 0);
                    if r.is_err() {
                        break;
                    }
                }
            }
            let r = r.and_then(|()| self.flush());
            g = self.exclusive();
            g.pause_bitmaps(false);
            r?;
        }
        g.amend(o)
    }
}

impl Inner {
    /// Writes a cluster of zeroes at `host` for a zero cluster that a
    /// version 2 image cannot express (encrypted as the image's data is).
    fn write_zero_cluster(&mut self, host: u64, zeros: &[u8]) -> Result<()> {
        if self.iv_from_guest() {
            // Shared tables do not tell one guest offset per cluster.
            return Err(Error::NotSupported(format!(
                "'{}': cannot expand zero clusters of a legacy AES-encrypted image",
                self.name
            )));
        }
        // The IV of LUKS data is its host sector: the guest offset is not needed.
        self.write_guest_data(host, 0, zeros)
    }

    /// Whether `o` asks for another backing file or format than the
    /// image's (compared as QEMU compares them: the names as stored, a
    /// missing one differing from any given one).
    fn backing_refused(&self, o: &AmendOptions) -> bool {
        if o.backing_file.is_none() && o.backing_fmt.is_none() {
            return false;
        }
        o.backing_file.as_deref().map(str::as_bytes) != self.header.backing_file.as_deref()
            || o.backing_fmt != self.header.backing_format()
    }

    /// The refusals QEMU makes before it changes anything; with a backing
    /// file change (refused after the upgrade and refcount width change)
    /// only those, else also the others ([`Inner::validate_rest`]).
    fn validate(&mut self, o: &AmendOptions) -> Result<()> {
        self.validate_first(o)?;
        if !self.backing_refused(o) {
            self.validate_rest(o)?;
        }
        Ok(())
    }

    fn validate_first(&mut self, o: &AmendOptions) -> Result<()> {
        self.check_writable()?;
        let cur = self.header.version;
        let target = o.version.unwrap_or(cur);
        if target != 2 && target != 3 {
            return Err(Error::Invalid(format!(
                "Unknown compatibility level {target}"
            )));
        }
        if let Some(bits) = o.refcount_bits {
            if target < 3 && bits != 16 {
                return Err(Error::Invalid(
                    "Refcount widths other than 16 bits require compatibility level 1.1 or \
                     above (use compat=1.1 or greater)"
                        .into(),
                ));
            }
            if bits < self.header.refcount_bits() {
                self.check_refcount_width(bits)?;
            }
        }
        Ok(())
    }

    fn validate_rest(&mut self, o: &AmendOptions) -> Result<()> {
        let cur = self.header.version;
        let target = o.version.unwrap_or(cur);
        if o.lazy_refcounts == Some(true) && target < 3 {
            return Err(Error::Invalid(
                "Lazy refcounts only supported with compatibility level 1.1 and above (use \
                 compat=1.1 or greater)"
                    .into(),
            ));
        }
        if target < cur {
            self.downgrade_check(o.refcount_bits.is_some())?;
        }
        Ok(())
    }

    fn amend(&mut self, o: &AmendOptions) -> Result<()> {
        self.validate(o)?;
        let cur = self.header.version;
        let target = o.version.unwrap_or(cur);
        // Everything written so far is durable before the header changes,
        // refcounts included (lazy refcounts: the image marked clean, as
        // QEMU's amend needs accurate refcounts).
        self.flush_all(true)?;
        self.mark_clean()?;
        // QEMU's order: upgrade, refcount width, the backing file refusal,
        // lazy refcounts, downgrade.
        if target > cur {
            self.upgrade()?;
        }
        if let Some(bits) = o.refcount_bits {
            if bits != self.header.refcount_bits() {
                self.change_refcount_width(bits.trailing_zeros())?;
            }
        }
        if self.backing_refused(o) {
            return Err(Error::Invalid(
                "Cannot amend the backing file\nYou can use 'qemu-img rebase' instead.".into(),
            ));
        }
        if let Some(lazy) = o.lazy_refcounts {
            if target >= 3 && lazy != self.header.lazy_refcounts() {
                self.set_lazy(lazy)?;
            }
        }
        if target < cur {
            self.expand_snapshot_zeros()?;
            self.downgrade()?;
        }
        Ok(())
    }

    /// Writes the whole header cluster from `h` in one write, then syncs.
    fn write_header(&mut self, mut h: header::Header) -> Result<()> {
        let buf = h
            .serialize()
            .map_err(|e| Error::Invalid(format!("{}: {e}", self.name)))?;
        self.check_sync_failed()?;
        self.file
            .write_at(&buf, 0)
            .map_err(ioerr("write header", &self.name))?;
        let r = self.file.sync();
        self.stats.file_syncs += 1;
        self.note_sync(r)?;
        self.header = h;
        Ok(())
    }

    fn upgrade(&mut self) -> Result<()> {
        let mut h = self.header.clone();
        h.version = 3;
        h.header_length = V3_HEADER_LEN;
        h.incompatible_features = 0;
        h.compatible_features = 0;
        h.autoclear_features = 0;
        h.refcount_order = 4;
        h.compression_type = 0;
        h.extra.clear();
        if !h
            .extensions
            .iter()
            .any(|e| e.kind == header::EXT_FEATURE_TABLE)
        {
            let ft = header::Extension {
                kind: header::EXT_FEATURE_TABLE,
                data: crate::create::feature_table(),
            };
            // QEMU puts the feature table first and leaves it out when the
            // header cluster is too small for it.
            let mut with = h.clone();
            with.extensions.insert(0, ft);
            if with.clone().serialize().is_ok() {
                h = with;
            }
        }
        self.write_header(h)
    }

    fn set_lazy(&mut self, on: bool) -> Result<()> {
        // The image is clean here (see `amend`): lazy from now on, or not.
        self.lazy = on;
        let mut h = self.header.clone();
        if on {
            h.compatible_features |= header::COMPAT_LAZY_REFCOUNTS;
        } else {
            h.compatible_features &= !header::COMPAT_LAZY_REFCOUNTS;
        }
        self.write_header(h)
    }

    fn downgrade_check(&mut self, refcount_bits_given: bool) -> Result<()> {
        let h = &self.header;
        if h.refcount_order != 4 && !refcount_bits_given {
            return Err(Error::Invalid(
                "compat=0.10 requires refcount_bits=16".into(),
            ));
        }
        if h.has_data_file() {
            return Err(Error::Invalid(
                "Cannot downgrade an image with a data file".into(),
            ));
        }
        let incompat = h.incompatible_features & !header::INCOMPAT_DIRTY;
        if incompat != 0 {
            return Err(Error::Invalid(format!(
                "Cannot downgrade an image with incompatible features {incompat:#x} set"
            )));
        }
        Ok(())
    }

    /// Whether any L2 table of the active or a snapshot L1 table holds a
    /// zero-flagged entry (which compat=0.10 cannot represent).
    fn has_zero_clusters(&mut self, snapshots_only: bool) -> Result<bool> {
        self.flush_all(true)?;
        let cs = self.geo.cluster_size();
        let mut l1s: Vec<Vec<u64>> = Vec::new();
        if !snapshots_only {
            l1s.push(self.l1.clone());
        }
        for sn in self.read_snapshot_table()? {
            let mut b = vec![0u8; sn.l1_size as usize * 8];
            self.file
                .read_at(&mut b, sn.l1_table_offset)
                .map_err(ioerr("read snapshot L1 table", &self.name))?;
            l1s.push(
                b.chunks_exact(8)
                    .map(|c| u64::from_be_bytes(c.try_into().unwrap_or([0; 8])))
                    .collect(),
            );
        }
        let mut seen = std::collections::HashSet::new();
        let mut t = vec![0u8; cs as usize];
        for l1 in l1s {
            for raw in l1 {
                let off = L1Entry(raw).l2_offset();
                if off == 0 || !seen.insert(off) {
                    continue;
                }
                self.file
                    .read_at(&mut t, off)
                    .map_err(ioerr("read L2 table", &self.name))?;
                for c in t.chunks_exact(8) {
                    let e = u64::from_be_bytes(c.try_into().unwrap_or([0; 8]));
                    if e & (1 << 62) == 0 && e & 1 != 0 {
                        return Ok(true);
                    }
                }
            }
        }
        Ok(false)
    }

    /// Rewrites the zero-flagged entries left in the L2 tables of the active
    /// and the snapshot L1 tables (in the active ones only plain zero without
    /// backing file is left, see [`Image::amend`]): plain zero without a backing file
    /// becomes unallocated; otherwise the entry gets a host cluster of
    /// zeroes: its own one written in place when nobody else references it,
    /// else a new cluster (refcount: that of the L2 table), never one shared
    /// with other data. New clusters and refcounts are durable before the
    /// table is rewritten (one write), and old clusters are released after.
    fn expand_snapshot_zeros(&mut self) -> Result<()> {
        self.flush_all(true)?;
        let cs = self.geo.cluster_size();
        let cb = self.geo.cluster_bits;
        let backing = self.header.backing_file.is_some();
        let name = self.name.clone();
        let mut tables = Vec::new();
        let mut seen = std::collections::HashSet::new();
        for &raw in &self.l1 {
            let off = L1Entry(raw).l2_offset();
            if off != 0 && seen.insert(off) {
                tables.push(off);
            }
        }
        for sn in self.read_snapshot_table()? {
            let mut b = vec![0u8; sn.l1_size as usize * 8];
            self.file
                .read_at(&mut b, sn.l1_table_offset)
                .map_err(ioerr("read snapshot L1 table", &name))?;
            for c in b.chunks_exact(8) {
                let off = L1Entry(u64::from_be_bytes(c.try_into().unwrap_or([0; 8]))).l2_offset();
                if off != 0 && seen.insert(off) {
                    tables.push(off);
                }
            }
        }
        let zeros = vec![0u8; cs as usize];
        let mut t = vec![0u8; cs as usize];
        for off in tables {
            self.file
                .read_at(&mut t, off)
                .map_err(ioerr("read L2 table", &name))?;
            let entry = |t: &[u8], i: usize| {
                u64::from_be_bytes(t[i * 8..i * 8 + 8].try_into().unwrap_or([0; 8]))
            };
            let n = (cs / 8) as usize;
            if !(0..n).any(|i| {
                let e = entry(&t, i);
                e & (1 << 62) == 0 && e & 1 != 0
            }) {
                continue;
            }
            let users = self
                .refs
                .get(&*self.file, off >> cb)
                .map_err(|e| refcount_err(&name, e))?;
            let mut release = Vec::new();
            for i in 0..n {
                let e = entry(&t, i);
                if e & (1 << 62) != 0 || e & 1 == 0 {
                    continue;
                }
                let host = e & 0x00ff_ffff_ffff_fe00;
                let new = if host == 0 && !backing {
                    0
                } else if host != 0
                    && self
                        .refs
                        .get(&*self.file, host >> cb)
                        .map_err(|e| refcount_err(&name, e))?
                        == 1
                {
                    self.overlap_check(host, cs, "zero cluster expansion")?;
                    self.write_zero_cluster(host, &zeros)?;
                    e & !1
                } else {
                    let c = self.alloc_clusters(1)?;
                    if users > 1 {
                        self.refs
                            .update(&*self.file, c, users as i64 - 1)
                            .map_err(|e| refcount_err(&name, e))?;
                    }
                    self.overlap_check(c * cs, cs, "zero cluster expansion")?;
                    self.write_zero_cluster(c * cs, &zeros)?;
                    if host != 0 {
                        release.push(host >> cb);
                    }
                    // COPIED exactly when the refcount is one.
                    (c * cs) | if users == 1 { 1 << 63 } else { 0 }
                };
                t[i * 8..i * 8 + 8].copy_from_slice(&new.to_be_bytes());
            }
            if self
                .refs
                .flush(&*self.file)
                .map_err(|e| refcount_err(&name, e))?
            {
                self.set_unsynced();
            }
            self.set_unsynced();
            self.sync()?;
            self.file
                .write_at(&t, off)
                .map_err(ioerr("write L2 table", &name))?;
            self.set_unsynced();
            self.sync()?;
            self.l2.discard_range(off, cs);
            for c in release {
                self.refs
                    .update(&*self.file, c, -(users as i64))
                    .map_err(|e| refcount_err(&name, e))?;
            }
            if self
                .refs
                .flush(&*self.file)
                .map_err(|e| refcount_err(&name, e))?
            {
                self.set_unsynced();
            }
        }
        self.sync()
    }

    /// Number of host clusters the refcount structures may describe now.
    fn refcount_span(&mut self) -> Result<u64> {
        let cs = self.geo.cluster_size();
        let len = self.file.len().map_err(ioerr("stat", &self.name))?;
        let epb = self.refs.entries_per_block();
        let covered = self.refs.table().len() as u64 * epb;
        Ok(len.div_ceil(cs).min(covered))
    }

    fn check_refcount_width(&mut self, bits: u32) -> Result<()> {
        self.flush_all(true)?;
        let cs = self.geo.cluster_size();
        let max = qcow2_format::refcount::max_refcount(bits.trailing_zeros());
        let name = self.name.clone();
        for c in 0..self.refcount_span()? {
            let r = self
                .refs
                .get(&*self.file, c)
                .map_err(|e| refcount_err(&name, e))?;
            if r > max {
                return Err(Error::Invalid(format!(
                    "Cannot decrease refcount entry width to {bits} bits: Cluster at offset \
                     {:#x} has a refcount of {r}",
                    c * cs
                )));
            }
        }
        Ok(())
    }

    /// Rewrites the refcount structures with entries of 2^`order` bits:
    /// new table and blocks past the end of the file (their own clusters
    /// counted), synced; then one header write switches to them (the commit
    /// point); then the old table and blocks are freed (a crash there only
    /// leaks them).
    fn change_refcount_width(&mut self, order: u32) -> Result<()> {
        self.flush_all(true)?;
        let cs = self.geo.cluster_size();
        let cb = self.geo.cluster_bits;
        let name = self.name.clone();
        let span = self.refcount_span()?;
        let mut counts = Vec::with_capacity(span as usize);
        for c in 0..span {
            counts.push(
                self.refs
                    .get(&*self.file, c)
                    .map_err(|e| refcount_err(&name, e))?,
            );
        }
        while counts.last() == Some(&0) {
            counts.pop();
        }
        let epb = qcow2_format::refcount::entries_per_block(cb, order);
        let len = self.file.len().map_err(ioerr("stat", &name))?;
        let start = (counts.len() as u64).max(len.div_ceil(cs));
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
        if tclusters * cs > header::MAX_REFTABLE_BYTES {
            return Err(Error::NoSpace(format!(
                "{name}: the refcount table would be too large"
            )));
        }
        let end = start + tclusters + blocks;
        counts.resize(end as usize, 0);
        for c in start..end {
            counts[c as usize] = 1;
        }
        let table_off = start * cs;
        let mut table = vec![0u8; (tclusters * cs) as usize];
        let mut buf = vec![0u8; cs as usize];
        for b in 0..blocks {
            buf.fill(0);
            let first = b * epb;
            for c in first..(first + epb).min(end) {
                qcow2_format::refcount::set(
                    &mut buf,
                    (c - first) as usize,
                    order,
                    counts[c as usize],
                );
            }
            let off = (start + tclusters + b) * cs;
            table[b as usize * 8..b as usize * 8 + 8].copy_from_slice(&off.to_be_bytes());
            self.file
                .write_at(&buf, off)
                .map_err(ioerr("write refcount block", &name))?;
        }
        self.file
            .write_at(&table, table_off)
            .map_err(ioerr("write refcount table", &name))?;
        self.set_unsynced();
        self.sync()?;
        let (old_off, old_clusters) = self.refs.table_location();
        let old_blocks: Vec<u64> = self
            .refs
            .table()
            .iter()
            .copied()
            .filter(|&e| e != 0)
            .collect();
        let mut h = self.header.clone();
        h.refcount_order = order;
        h.refcount_table_offset = table_off;
        h.refcount_table_clusters = tclusters as u32;
        self.write_header(h)?;
        let granularity = self.opts.dirty_granularity.clamp(512, 1 << 21);
        self.refs = qcow2_refcount::Refcounts::load(
            &*self.file,
            cb,
            order,
            table_off,
            tclusters as u32,
            self.opts.refcount_cache_bytes,
            granularity,
        )
        .map_err(|e| refcount_err(&name, e))?;
        self.protect_in_refcounts();
        self.refresh_snapshot_ranges()?;
        for c in (old_off >> cb)..(old_off >> cb) + old_clusters as u64 {
            self.refs
                .update(&*self.file, c, -1)
                .map_err(|e| refcount_err(&name, e))?;
        }
        for b in old_blocks {
            self.refs
                .update(&*self.file, b >> cb, -1)
                .map_err(|e| refcount_err(&name, e))?;
        }
        if self
            .refs
            .flush(&*self.file)
            .map_err(|e| refcount_err(&name, e))?
        {
            self.set_unsynced();
        }
        self.sync()
    }

    /// Guest offsets of the zero-flagged clusters of the active table.
    /// With each: whether it is plain zero (no host cluster).
    fn active_zero_clusters(&mut self) -> Result<Vec<(u64, bool)>> {
        let cs = self.geo.cluster_size();
        let per_l2 = cs / 8;
        let size = self.header.size;
        let mut out = Vec::new();
        for i in 0..self.l1.len() {
            if L1Entry(self.l1[i]).l2_offset() == 0 {
                continue;
            }
            for j in 0..per_l2 {
                let guest = (i as u64 * per_l2 + j) * cs;
                if guest >= size {
                    break;
                }
                let e = self.l2_entry(guest)?;
                if !e.is_compressed() && e.zero_flag() {
                    out.push((guest, e.host_offset() == 0));
                }
            }
        }
        Ok(out)
    }

    fn downgrade(&mut self) -> Result<()> {
        if self.has_zero_clusters(false)? {
            return Err(Error::Invalid(format!(
                "{}: zero clusters remain after expanding them; image left at compat=1.1",
                self.name
            )));
        }
        let to_v2 = |h: &mut header::Header| {
            h.version = 2;
            h.header_length = V2_HEADER_LEN;
            h.incompatible_features = 0;
            h.compatible_features = 0;
            h.autoclear_features = 0;
            h.extensions.retain(|e| e.kind != header::EXT_FEATURE_TABLE);
        };
        if self.has_bitmaps() {
            // The bitmaps extension stays, as in QEMU 10 (see
            // `downgrade_with_bitmaps`); the header is written last there too.
            return self.downgrade_with_bitmaps(to_v2);
        }
        let mut h = self.header.clone();
        to_v2(&mut h);
        self.write_header(h)
    }
}
