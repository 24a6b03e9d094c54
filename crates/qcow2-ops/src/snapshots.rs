//! Internal snapshots: create, apply (revert to), delete, list.
//!
//! Refcounts follow QEMU: a snapshot's L2 tables and the data clusters they
//! reach gain one reference per L1 table (active or snapshot) reaching them;
//! the active tables lose their COPIED flags where the refcount exceeds one,
//! so the request paths copy shared tables and clusters before changing
//! them.
//!
//! Crash safety: create and delete are shadow-paged (`shadow`): the new
//! state (L2 table copies with the COPIED flags it needs, L1 table,
//! snapshot table, refcount structures) is built in clusters free in both
//! states and made durable, then one header write switches to it. A crash
//! leaves the old or the new state, both consistent: no OFLAG_COPIED window
//! (QEMU's in-place code has one, between the flags and the refcounts,
//! which live in different clusters). Create copies the active L2 tables
//! (the old ones stay with the snapshot), where QEMU shares them and copies
//! each on its first write afterwards. Apply changes only the snapshot's
//! tables before its header switch (the active L1 table moves) and
//! decrements after it, so a crash there leaves at most leaks.

use crate::error::{Error, Result};
use crate::image::{ioerr, refcount_err, Inner};
use crate::shadow::{Commit, Shadow};
use qcow2_format::entry::{L2Entry, FLAG_COPIED, OFFSET_MASK};
use qcow2_format::snapshot::{self, SnapshotEntry};
use qcow2_format::{be64, put_be32, put_be64};

/// One internal snapshot, as listed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SnapshotInfo {
    /// Unique id (a number as QEMU assigns them).
    pub id: String,
    /// Name (may be empty, need not be unique).
    pub name: String,
    /// Size of the saved VM state in bytes (0 for disk-only snapshots).
    pub vm_state_size: u64,
    /// Creation time: seconds since the epoch.
    pub date_sec: u32,
    /// Creation time: nanoseconds.
    pub date_nsec: u32,
    /// Guest clock at creation, nanoseconds.
    pub vm_clock_nsec: u64,
    /// Virtual disk size at creation, if recorded.
    pub disk_size: Option<u64>,
    /// Instruction count, if recorded (all ones: none).
    pub icount: Option<u64>,
    /// Host offset of the snapshot's L1 table.
    pub l1_table_offset: u64,
    /// Entries of that L1 table.
    pub l1_size: u32,
}

impl SnapshotInfo {
    fn from_entry(e: &SnapshotEntry) -> Self {
        SnapshotInfo {
            id: String::from_utf8_lossy(&e.id).into_owned(),
            name: String::from_utf8_lossy(&e.name).into_owned(),
            vm_state_size: e.vm_state_size_large().unwrap_or(e.vm_state_size as u64),
            date_sec: e.date_sec,
            date_nsec: e.date_nsec,
            vm_clock_nsec: e.vm_clock_nsec,
            disk_size: e.disk_size(),
            icount: e.icount(),
            l1_table_offset: e.l1_table_offset,
            l1_size: e.l1_size,
        }
    }
}

/// The error for a snapshot that does not exist (errno ENOENT).
fn not_found(image: &str, what: &str) -> Error {
    Error::io(
        format!("{image}: snapshot '{what}' not found"),
        std::io::Error::from_raw_os_error(libc::ENOENT),
    )
}

/// QEMU's strtoul on an id: the leading decimal digits (0 when none).
fn numeric_id(id: &[u8]) -> u64 {
    id.iter()
        .take_while(|b| b.is_ascii_digit())
        .fold(0u64, |a, &b| {
            a.wrapping_mul(10).wrapping_add((b - b'0') as u64)
        })
}

impl Inner {
    /// Reads the snapshot table (empty when there is none).
    pub(crate) fn read_snapshot_table(&mut self) -> Result<Vec<SnapshotEntry>> {
        let n = self.header.nb_snapshots;
        if n == 0 {
            return Ok(Vec::new());
        }
        let base = self.header.snapshots_offset;
        let file_len = self.file.len().map_err(ioerr("stat", &self.name))?;
        let avail = file_len
            .saturating_sub(base)
            .min(snapshot::MAX_SNAPSHOTS_SIZE);
        let mut want = (64u64 << 10).min(avail);
        loop {
            let mut buf = vec![0u8; want as usize];
            self.file
                .read_at(&mut buf, base)
                .map_err(ioerr("read snapshot table", &self.name))?;
            match snapshot::parse_table(&buf, n, self.header.version >= 3) {
                Ok((v, _)) => return Ok(v),
                Err(qcow2_format::FormatError::Truncated(_)) if want < avail => {
                    want = (want * 4).min(avail);
                }
                Err(e) => {
                    return Err(Error::Corrupt(format!(
                        "{}: snapshot table: {e}",
                        self.name
                    )))
                }
            }
        }
    }

    /// Before a snapshot operation: everything durable, the L2 cache empty
    /// (tables are about to change on disk and may become shared).
    fn snapshot_prepare(&mut self) -> Result<()> {
        self.check_writable()?;
        if self.header.has_data_file() {
            return Err(Error::NotSupported(format!(
                "'{}': internal snapshots with an external data file",
                self.name
            )));
        }
        self.flush_close()?;
        self.l2.clear();
        self.sh.zcache.invalidate();
        self.fresh_l2.clear();
        Ok(())
    }

    /// Host clusters an L2 entry references (first, last), if any.
    fn entry_clusters(&mut self, raw: u64, guest_hint: u64) -> Result<Option<(u64, u64)>> {
        let cb = self.geo.cluster_bits;
        let cs = self.geo.cluster_size();
        let e = L2Entry::standard(raw);
        if e.is_compressed() {
            let d = e.compressed(cb);
            return Ok(Some((d.first_cluster(cb) >> cb, d.last_cluster(cb) >> cb)));
        }
        let off = e.host_offset();
        if off == 0 {
            return Ok(None);
        }
        if off & (cs - 1) != 0 {
            self.mark_corrupt();
            return Err(Error::Corrupt(format!(
                "{}: cluster allocation offset {off:#x} unaligned (L2 table at {guest_hint:#x})",
                self.name
            )));
        }
        Ok(Some((off >> cb, off >> cb)))
    }

    fn read_table(&self, off: u64, len: u64, what: &str) -> Result<Vec<u8>> {
        let mut t = vec![0u8; len as usize];
        self.file
            .read_at(&mut t, off)
            .map_err(ioerr(what, &self.name))?;
        Ok(t)
    }

    /// Adds `delta` to the refcount of every L2 table `l1` references and
    /// of every cluster those tables reference (once per reference).
    fn refcount_walk(&mut self, l1: &[u64], delta: i64) -> Result<()> {
        self.refcount_walk_mode(l1, delta, false)
    }

    /// Fails, changing nothing, when adding one reference (per reference
    /// `l1` holds) would overflow a refcount, as QEMU's snapshot creation
    /// fails with -EINVAL (e.g. with refcount_bits=1).
    fn refcount_walk_dry(&mut self, l1: &[u64]) -> Result<()> {
        self.refcount_walk_mode(l1, 1, true)
    }

    fn refcount_walk_mode(&mut self, l1: &[u64], delta: i64, dry: bool) -> Result<()> {
        let cs = self.geo.cluster_size();
        let cb = self.geo.cluster_bits;
        let es = self.geo.l2_entry_size() as usize;
        let name = self.name.clone();
        // Dry run: host clusters holding compressed data may be referenced
        // by several entries; their references are summed.
        let mut shared: std::collections::HashMap<u64, u64> = Default::default();
        for &l1e in l1 {
            let t = l1e & OFFSET_MASK & !(cs - 1);
            if l1e & OFFSET_MASK == 0 {
                continue;
            }
            if l1e & OFFSET_MASK & (cs - 1) != 0 || t < cs || self.is_other_metadata(t) {
                self.mark_corrupt();
                return Err(Error::Corrupt(format!(
                    "{name}: L2 table offset {:#x} invalid",
                    l1e & OFFSET_MASK
                )));
            }
            let tbl = self.read_table(t, cs, "read L2 table")?;
            for p in (0..tbl.len()).step_by(es) {
                let raw = be64(&tbl, p);
                if let Some((a, b)) = self.entry_clusters(raw, t)? {
                    for c in a..=b {
                        if dry && L2Entry::standard(raw).is_compressed() {
                            // The last sector of compressed data may end
                            // past the file (QEMU accepts that): counted
                            // only, no end-of-file check.
                            *shared.entry(c).or_default() += 1;
                        } else {
                            self.walk_one(c, delta, dry)?;
                        }
                    }
                }
            }
            self.walk_one(t >> cb, delta, dry)?;
        }
        let file_clusters = self.file.len().map_err(ioerr("stat", &name))?.div_ceil(cs);
        for (c, n) in shared {
            if c > file_clusters + 1 {
                self.mark_corrupt();
                return Err(Error::Corrupt(format!(
                    "{name}: compressed cluster {c} lies past the end of the file"
                )));
            }
            let rc = self
                .refs
                .get(&*self.file, c)
                .map_err(|e| refcount_err(&name, e))?;
            if rc.saturating_add(n) > self.refs.max_refcount() {
                return Err(Error::Invalid(format!(
                    "'{name}': refcount of cluster {c} would overflow"
                )));
            }
        }
        Ok(())
    }

    /// Every L2 table offset of `l1` is aligned, inside the file and on no
    /// other metadata (checked before a commit whose tail walks them).
    fn check_l2_offsets(&mut self, l1: &[u64], whose: &str) -> Result<()> {
        let cs = self.geo.cluster_size();
        let file_len = self.file.len().map_err(ioerr("stat", &self.name))?;
        for &e in l1 {
            let t = e & OFFSET_MASK;
            if t != 0
                && (t & (cs - 1) != 0
                    || t.saturating_add(cs) > file_len
                    || self.is_other_metadata(t))
            {
                return Err(Error::Corrupt(format!(
                    "{}: {whose} references an invalid L2 table at {t:#x}",
                    self.name
                )));
            }
        }
        Ok(())
    }

    /// Whether the cluster at `t` is the header, the active L1 table or a
    /// refcount structure (so never an L2 table).
    fn is_other_metadata(&self, t: u64) -> bool {
        let cs = self.geo.cluster_size();
        let l1 = self.header.l1_table_offset;
        let l1_end = l1 + (self.l1.len() as u64 * 8).div_ceil(cs) * cs;
        t < cs || (t < l1_end && l1 < t + cs) || self.refs.overlaps(t, cs)
    }

    fn walk_one(&mut self, c: u64, delta: i64, dry: bool) -> Result<()> {
        let name = self.name.clone();
        if !dry {
            self.refs
                .update(&*self.file, c, delta)
                .map_err(|e| refcount_err(&name, e))?;
            return Ok(());
        }
        if !self.within_file((c + 1) << self.geo.cluster_bits)? {
            self.mark_corrupt();
            return Err(Error::Corrupt(format!(
                "{name}: cluster {c} referenced by the L1 table lies past the end of the file"
            )));
        }
        let rc = self
            .refs
            .get(&*self.file, c)
            .map_err(|e| refcount_err(&name, e))?;
        if rc >= self.refs.max_refcount() {
            return Err(Error::Invalid(format!(
                "'{name}': refcount of cluster {c} would overflow"
            )));
        }
        Ok(())
    }

    /// Rewrites the COPIED flags of the L2 tables `l1` references to match
    /// the refcounts (QEMU's rule: set exactly where the refcount is one;
    /// never on compressed entries). Writes only the changed sectors of the
    /// tables; returns `l1` with its own COPIED flags recomputed.
    fn fix_copied(&mut self, l1: &[u64]) -> Result<Vec<u64>> {
        let cs = self.geo.cluster_size();
        let cb = self.geo.cluster_bits;
        let es = self.geo.l2_entry_size() as usize;
        let name = self.name.clone();
        let mut out = l1.to_vec();
        for e in out.iter_mut() {
            let t = *e & OFFSET_MASK;
            if t == 0 {
                *e &= !FLAG_COPIED;
                continue;
            }
            if t & (cs - 1) != 0 || self.is_other_metadata(t) {
                return Err(Error::Corrupt(format!(
                    "{name}: invalid L2 table offset {t:#x}"
                )));
            }
            let rc = self
                .refs
                .get(&*self.file, t >> cb)
                .map_err(|err| refcount_err(&name, err))?;
            *e = if rc == 1 {
                *e | FLAG_COPIED
            } else {
                *e & !FLAG_COPIED
            };
            let mut tbl = self.read_table(t, cs, "read L2 table")?;
            let mut dirty = std::collections::BTreeSet::new();
            for p in (0..tbl.len()).step_by(es) {
                let raw = be64(&tbl, p);
                let le = L2Entry::standard(raw);
                let want = if le.is_compressed() || le.host_offset() == 0 {
                    if le.is_compressed() {
                        raw & !FLAG_COPIED
                    } else {
                        raw
                    }
                } else {
                    let rc = self
                        .refs
                        .get(&*self.file, le.host_offset() >> cb)
                        .map_err(|err| refcount_err(&name, err))?;
                    if rc == 1 {
                        raw | FLAG_COPIED
                    } else {
                        raw & !FLAG_COPIED
                    }
                };
                if want != raw {
                    put_be64(&mut tbl, p, want);
                    dirty.insert(p / 512);
                }
            }
            for (s, n) in crate::image::runs(dirty.into_iter().map(|s| s as u64)) {
                let (a, b) = ((s * 512) as usize, ((s + n) * 512) as usize);
                self.file
                    .write_at(&tbl[a..b], t + a as u64)
                    .map_err(ioerr("write L2 table", &name))?;
                self.set_unsynced();
            }
        }
        Ok(out)
    }

    /// Allocates clusters for `bytes` and writes them there. Returns the offset.
    fn write_new(&mut self, bytes: &[u8], what: &str) -> Result<u64> {
        let cs = self.geo.cluster_size();
        let n = (bytes.len() as u64).div_ceil(cs).max(1);
        let off = self.alloc_clusters(n)? * cs;
        self.overlap_check(off, n * cs, what)?;
        // Only the meaningful bytes (whole sectors) are written; the file
        // is extended over the rest of the clusters.
        let mut b = bytes.to_vec();
        b.resize(bytes.len().div_ceil(512).max(1) * 512, 0);
        self.file
            .write_at(&b, off)
            .map_err(ioerr(what, &self.name))?;
        if self.file.len().map_err(ioerr("stat", &self.name))? < off + n * cs {
            self.file
                .set_len(off + n * cs)
                .map_err(ioerr("extend file", &self.name))?;
        }
        self.set_unsynced();
        Ok(off)
    }

    fn flush_refs(&mut self) -> Result<()> {
        let name = self.name.clone();
        if self
            .refs
            .flush(&*self.file)
            .map_err(|e| refcount_err(&name, e))?
        {
            self.set_unsynced();
        }
        Ok(())
    }

    /// Frees `n` clusters from `off` (refcount decrements, not synced).
    fn free_range(&mut self, off: u64, bytes: u64) -> Result<()> {
        if off == 0 || bytes == 0 {
            return Ok(());
        }
        let cs = self.geo.cluster_size();
        let cb = self.geo.cluster_bits;
        let name = self.name.clone();
        for c in (off >> cb)..((off + bytes).div_ceil(cs)) {
            self.refs
                .update(&*self.file, c, -1)
                .map_err(|e| refcount_err(&name, e))?;
        }
        Ok(())
    }

    /// Tail of every operation: refcount decrements written (not synced:
    /// a crash merely leaks), in-memory state in line with the file.
    fn snapshot_finish(&mut self) -> Result<()> {
        let name = self.name.clone();
        if self
            .refs
            .flush(&*self.file)
            .map_err(|e| refcount_err(&name, e))?
        {
            self.set_tail_unsynced();
        }
        self.forget_freed();
        self.protected_ranges_changed()?;
        Ok(())
    }

    /// Recomputes what the overlap checks protect after a snapshot operation.
    fn protected_ranges_changed(&mut self) -> Result<()> {
        // overlap registry: snapshot table / inactive L1 changed (and, for
        // apply, the active L1 table moved)
        self.active_l1_moved();
        self.refresh_snapshot_ranges()
    }

    fn l1_bytes(l1: &[u64]) -> Vec<u8> {
        let mut b = vec![0u8; l1.len() * 8];
        for (i, &e) in l1.iter().enumerate() {
            put_be64(&mut b, i * 8, e);
        }
        b
    }

    pub(crate) fn snapshot_create(&mut self, name: &[u8]) -> Result<SnapshotInfo> {
        self.snapshot_prepare()?;
        let mut table = self.read_snapshot_table()?;
        if table.len() as u64 >= snapshot::MAX_SNAPSHOTS as u64 {
            return Err(Error::NoSpace(format!("{}: too many snapshots", self.name)));
        }
        if name.len() > u16::MAX as usize {
            return Err(Error::Invalid(format!(
                "{}: snapshot name too long",
                self.name
            )));
        }
        let id = table.iter().map(|e| numeric_id(&e.id)).max().unwrap_or(0) + 1;
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default();
        let mut extra = vec![0u8; 24];
        put_be64(&mut extra, 8, self.header.size);
        // The new entry: 40 bytes, 24 of extra data, id and name.
        let bytes: usize = table.iter().map(|e| e.encoded_len()).sum::<usize>()
            + (snapshot::FIXED_LEN + 24 + 20 + name.len()).div_ceil(8) * 8;
        if bytes as u64 > snapshot::MAX_SNAPSHOTS_SIZE {
            return Err(Error::NoSpace(format!(
                "{}: snapshot table too large",
                self.name
            )));
        }
        let active = self.l1.clone();
        self.check_l2_offsets(&active, "the active L1 table")?;
        let cs = self.geo.cluster_size();
        let es = self.geo.l2_entry_size() as usize;
        let iname = self.name.clone();
        // Shadow-paged (see `shadow`): the active L1 table becomes the
        // snapshot's as it is; the active state gets copies of its L2
        // tables without COPIED flags, a new L1 table, and one more
        // reference to every cluster those copies reach.
        let mut sh = self.shadow_load()?;
        let mut new_l1 = vec![0u64; active.len()];
        for (i, &l1e) in active.iter().enumerate() {
            let t = l1e & OFFSET_MASK;
            if t == 0 {
                continue;
            }
            let mut tbl = self.read_table(t, cs, "read L2 table")?;
            for p in (0..tbl.len()).step_by(es) {
                let raw = be64(&tbl, p);
                if let Some((a, b)) = self.entry_clusters(raw, t)? {
                    for c in a..=b {
                        sh.add(c, 1, &iname)?;
                    }
                }
                if raw & FLAG_COPIED != 0 {
                    put_be64(&mut tbl, p, raw & !FLAG_COPIED);
                }
            }
            let t2 = self.shadow_write(&mut sh, &tbl, "write L2 table")?;
            new_l1[i] = t2 | FLAG_COPIED;
        }
        let l1_off = if new_l1.is_empty() {
            0
        } else {
            self.shadow_write(&mut sh, &Self::l1_bytes(&new_l1), "write L1 table")?
        };
        let entry = SnapshotEntry {
            l1_table_offset: if active.is_empty() {
                0
            } else {
                self.header.l1_table_offset
            },
            l1_size: active.len() as u32,
            id: id.to_string().into_bytes(),
            name: name.to_vec(),
            date_sec: now.as_secs() as u32,
            date_nsec: now.subsec_micros() * 1000,
            vm_clock_nsec: 0,
            vm_state_size: 0,
            extra,
        };
        table.push(entry.clone());
        let snaps = self.shadow_snapshot_table(&mut sh, &table)?;
        self.shadow_commit(
            sh,
            Commit {
                l1: Some((l1_off, new_l1)),
                snapshots: snaps,
            },
        )?;
        self.forget_freed();
        Ok(SnapshotInfo::from_entry(&entry))
    }

    /// The snapshot table `entries` written in the shadow state, the old
    /// one counted free there: (number, offset) for the header.
    fn shadow_snapshot_table(
        &mut self,
        sh: &mut Shadow,
        entries: &[SnapshotEntry],
    ) -> Result<(u32, u64)> {
        let cs = self.geo.cluster_size();
        let cb = self.geo.cluster_bits;
        let old_off = self.header.snapshots_offset;
        let old_len: u64 = self
            .read_snapshot_table()?
            .iter()
            .map(|e| e.encoded_len() as u64)
            .sum();
        if old_off != 0 && old_len != 0 {
            for c in (old_off >> cb)..(old_off + old_len).div_ceil(cs) {
                sh.add(c, -1, &self.name.clone())?;
            }
        }
        let off = if entries.is_empty() {
            0
        } else {
            let t = snapshot::encode_table(entries);
            self.shadow_write(sh, &t, "write snapshot table")?
        };
        Ok((entries.len() as u32, off))
    }

    /// A snapshot's L1 table must be cluster aligned, past the header, of
    /// at most QEMU's largest L1 size (32 MiB) and inside the file.
    fn check_snapshot_l1(&mut self, sn: &SnapshotEntry) -> Result<()> {
        if sn.l1_size == 0 {
            return Ok(());
        }
        let cs = self.geo.cluster_size();
        let bytes = sn.l1_size as u64 * 8;
        let file_len = self.file.len().map_err(ioerr("stat", &self.name))?;
        if sn.l1_table_offset & (cs - 1) != 0
            || sn.l1_table_offset < cs
            || bytes > 32 << 20
            || sn.l1_table_offset.saturating_add(bytes) > file_len
        {
            return Err(Error::Corrupt(format!(
                "{}: snapshot '{}' has an invalid L1 table ({} entries at {:#x})",
                self.name,
                String::from_utf8_lossy(&sn.id),
                sn.l1_size,
                sn.l1_table_offset
            )));
        }
        Ok(())
    }

    /// Index of the snapshot with this id, else the first with this name.
    fn find_id_or_name(table: &[SnapshotEntry], key: &[u8]) -> Option<usize> {
        table
            .iter()
            .position(|e| e.id == key)
            .or_else(|| table.iter().position(|e| e.name == key))
    }

    pub(crate) fn snapshot_apply(&mut self, key: &[u8]) -> Result<()> {
        self.snapshot_prepare()?;
        let table = self.read_snapshot_table()?;
        let Some(i) = Self::find_id_or_name(&table, key) else {
            return Err(not_found(&self.name, &String::from_utf8_lossy(key)));
        };
        if !self.list_bitmaps()?.is_empty() {
            return Err(Error::NotSupported(format!(
                "'{}': Device has active dirty bitmaps",
                self.name
            )));
        }
        let sn = table[i].clone();
        if sn.l1_size as usize > self.l1.len() {
            return Err(Error::NotSupported(format!(
                "'{}': snapshot '{}' has a larger L1 table than the image",
                self.name,
                String::from_utf8_lossy(&sn.id)
            )));
        }
        self.check_snapshot_l1(&sn)?;
        let raw = self.read_table(
            sn.l1_table_offset,
            sn.l1_size as u64 * 8,
            "read snapshot L1 table",
        )?;
        let mut new_l1: Vec<u64> = raw.chunks_exact(8).map(|c| be64(c, 0)).collect();
        new_l1.resize(self.l1.len(), 0);
        self.refcount_walk_dry(&new_l1)?;
        let active = self.l1.clone();
        self.check_l2_offsets(&active, "the active L1 table")?;
        // 1. One more reference to everything the snapshot reaches, with
        //    the COPIED flags of its tables brought in line.
        self.refcount_walk(&new_l1, 1)?;
        self.flush_refs()?;
        let new_l1 = self.fix_copied(&new_l1)?;
        // 2. The new active L1 in new clusters, durable with the above.
        let l1_off = self.write_new(&Self::l1_bytes(&new_l1), "write L1 table")?;
        self.flush_refs()?;
        self.sync()?;
        // 3. Commit: the header points at the new L1 (and takes the size).
        let size = sn.disk_size().unwrap_or(self.header.size);
        let mut b = [0u8; 24];
        put_be64(&mut b, 0, size);
        put_be32(&mut b, 8, self.header.crypt_method);
        put_be32(&mut b, 12, new_l1.len() as u32);
        put_be64(&mut b, 16, l1_off);
        self.file
            .write_at(&b, 24)
            .map_err(ioerr("write header", &self.name))?;
        self.set_unsynced();
        self.sync()?;
        let old_l1 = std::mem::replace(&mut self.l1, new_l1);
        let old_off = self.header.l1_table_offset;
        self.header.l1_table_offset = l1_off;
        self.header.size = size;
        self.l1_dirty.clear();
        self.protected_ranges_changed()?;
        // 4. The old active tables lose their reference.
        self.refcount_walk(&old_l1, -1)?;
        self.free_range(old_off, old_l1.len() as u64 * 8)?;
        self.snapshot_finish()
    }

    pub(crate) fn snapshot_delete(&mut self, name: &[u8]) -> Result<()> {
        self.snapshot_prepare()?;
        let mut table = self.read_snapshot_table()?;
        let Some(i) = table.iter().position(|e| e.name == name) else {
            return Err(not_found(&self.name, &String::from_utf8_lossy(name)));
        };
        let sn = table.remove(i);
        self.check_snapshot_l1(&sn)?;
        let mut l1 = Vec::new();
        if sn.l1_size > 0 {
            let raw = self.read_table(
                sn.l1_table_offset,
                sn.l1_size as u64 * 8,
                "read snapshot L1 table",
            )?;
            l1 = raw.chunks_exact(8).map(|c| be64(c, 0)).collect();
        }
        // L2 tables that cannot be read: refuse before anything changes.
        self.check_l2_offsets(
            &l1,
            &format!("snapshot '{}'", String::from_utf8_lossy(&sn.id)),
        )?;
        let active = self.l1.clone();
        self.check_l2_offsets(&active, "the active L1 table")?;
        let cs = self.geo.cluster_size();
        let cb = self.geo.cluster_bits;
        let es = self.geo.l2_entry_size() as usize;
        let iname = self.name.clone();
        // Shadow-paged (see `shadow`): the new state loses the snapshot's
        // L1 table and one reference to everything it reaches; active L2
        // tables whose COPIED flags that changes are copied with the flags
        // right, under a new active L1 table.
        let mut sh = self.shadow_load()?;
        if sn.l1_size > 0 {
            let l1_bytes = sn.l1_size as u64 * 8;
            for c in (sn.l1_table_offset >> cb)..(sn.l1_table_offset + l1_bytes).div_ceil(cs) {
                sh.add(c, -1, &iname)?;
            }
        }
        for &l1e in &l1 {
            let t = l1e & OFFSET_MASK;
            if t == 0 {
                continue;
            }
            sh.add(t >> cb, -1, &iname)?;
            let tbl = self.read_table(t, cs, "read L2 table")?;
            for p in (0..tbl.len()).step_by(es) {
                if let Some((a, b)) = self.entry_clusters(be64(&tbl, p), t)? {
                    for c in a..=b {
                        sh.add(c, -1, &iname)?;
                    }
                }
            }
        }
        let mut new_l1 = active.clone();
        for (i, &l1e) in active.iter().enumerate() {
            let t = l1e & OFFSET_MASK;
            if t == 0 {
                continue;
            }
            let mut tbl = self.read_table(t, cs, "read L2 table")?;
            let mut changed = false;
            for p in (0..tbl.len()).step_by(es) {
                let raw = be64(&tbl, p);
                let le = L2Entry::standard(raw);
                let want = if le.is_compressed() {
                    raw & !FLAG_COPIED
                } else if le.host_offset() == 0 {
                    raw
                } else if sh.get(le.host_offset() >> cb) == 1 {
                    raw | FLAG_COPIED
                } else {
                    raw & !FLAG_COPIED
                };
                if want != raw {
                    put_be64(&mut tbl, p, want);
                    changed = true;
                }
            }
            let table = if changed {
                let t2 = self.shadow_write(&mut sh, &tbl, "write L2 table")?;
                sh.add(t >> cb, -1, &iname)?;
                t2
            } else {
                t
            };
            new_l1[i] = if sh.get(table >> cb) == 1 {
                table | FLAG_COPIED
            } else {
                table
            };
        }
        let l1 = if new_l1 != active {
            let old = self.header.l1_table_offset;
            for c in (old >> cb)..(old + active.len() as u64 * 8).div_ceil(cs) {
                sh.add(c, -1, &iname)?;
            }
            let off = self.shadow_write(&mut sh, &Self::l1_bytes(&new_l1), "write L1 table")?;
            Some((off, new_l1))
        } else {
            None
        };
        let snaps = self.shadow_snapshot_table(&mut sh, &table)?;
        self.shadow_commit(
            sh,
            Commit {
                l1,
                snapshots: snaps,
            },
        )?;
        self.forget_freed();
        Ok(())
    }
}

impl crate::Image {
    /// The internal snapshots, in table order.
    pub fn snapshots(&self) -> Result<Vec<SnapshotInfo>> {
        let mut g = self.lock();
        Ok(g.read_snapshot_table()?
            .iter()
            .map(SnapshotInfo::from_entry)
            .collect())
    }

    /// Creates an internal snapshot named `name` of the current state, with
    /// the next numeric id, as `qemu-img snapshot -c` does (names need not
    /// be unique). Durable when it returns.
    pub fn snapshot_create(&self, name: &str) -> Result<SnapshotInfo> {
        self.exclusive().snapshot_create(name.as_bytes())
    }

    /// Reverts the image to snapshot `id_or_name` (looked up by id first,
    /// then by name, as `qemu-img snapshot -a`); the virtual size becomes
    /// the snapshot's. Refused while the image has persistent bitmaps, as
    /// QEMU refuses it. Durable when it returns.
    pub fn snapshot_apply(&self, id_or_name: &str) -> Result<()> {
        self.exclusive().snapshot_apply(id_or_name.as_bytes())
    }

    /// Deletes the first snapshot named `name` (by name only, as
    /// `qemu-img snapshot -d`). Durable when it returns.
    pub fn snapshot_delete(&self, name: &str) -> Result<()> {
        self.exclusive().snapshot_delete(name.as_bytes())
    }
}
