//! Block status and the allocation map, as `qemu-img map` reports them.

use crate::error::Result;
use crate::image::{ioerr, Inner};
use crate::types::MapEntry;
use qcow2_format::entry::SubclusterType;
use qcow2_io::Storage;

pub(crate) use crate::types::push_merged;

impl Inner {
    /// Status of `[offset, offset+len)`, merged.
    pub(crate) fn map_range(&mut self, offset: u64, len: u64) -> Result<Vec<MapEntry>> {
        self.map_range_limit(offset, len, usize::MAX)
    }

    /// The first `limit` extents of `[offset, offset+len)`, merged; stops
    /// walking the tables once they are known.
    pub(crate) fn map_range_limit(
        &mut self,
        offset: u64,
        len: u64,
        limit: usize,
    ) -> Result<Vec<MapEntry>> {
        let mut out = Vec::new();
        self.status_into(offset, len, 0, limit, &mut out)?;
        if self.encryption.is_some() {
            // As QEMU: where encrypted data lies in the file is not told
            // (it is not the guest's data there).
            let mut plain = Vec::with_capacity(out.len());
            for e in out {
                push_merged(&mut plain, MapEntry { offset: None, ..e });
            }
            out = plain;
        }
        // Entries before the last are complete (a later one has started).
        out.truncate(limit);
        Ok(out)
    }

    pub(crate) fn status_into(
        &mut self,
        offset: u64,
        len: u64,
        depth: u32,
        limit: usize,
        out: &mut Vec<MapEntry>,
    ) -> Result<()> {
        let end = offset + len;
        let cov = self.geo.l2_coverage();
        // Extents of each whole L2 table already walked (and the guest
        // offset it was walked at): L1 entries that share a table repeat
        // them instead of walking it again, so the walk follows the tables
        // the file holds, not how often the L1 table claims them. Without a
        // backing file nothing in them depends on the guest offset.
        let mut seen: std::collections::HashMap<u64, (u64, Vec<MapEntry>)> = Default::default();
        let mut pos = offset;
        while pos < end && out.len() <= limit {
            let l1_idx = self.geo.l1_index(pos) as usize;
            let table = self.l2_table(l1_idx)?;
            if table == 0 {
                let tend = ((l1_idx as u64 + 1) * cov).min(end);
                self.unallocated_into(pos, tend - pos, None, depth, limit, out)?;
                pos = tend;
                continue;
            }
            let whole = self.backing.is_none() && pos % cov == 0 && end - pos >= cov;
            if !whole {
                pos += self.cluster_into(pos, end, depth, limit, out)?;
                continue;
            }
            if let Some((base, extents)) = seen.get(&table) {
                for e in extents {
                    push_merged(
                        out,
                        MapEntry {
                            start: e.start - base + pos,
                            ..*e
                        },
                    );
                }
            } else {
                let mut extents = Vec::new();
                let mut p = pos;
                while p < pos + cov {
                    p += self.cluster_into(p, pos + cov, depth, usize::MAX, &mut extents)?;
                }
                for e in &extents {
                    push_merged(out, *e);
                }
                seen.insert(table, (pos, extents));
            }
            pos += cov;
        }
        Ok(())
    }

    /// Status of the part of `[pos, end)` in the cluster at `pos`, whose L2
    /// table is allocated; returns the bytes covered.
    fn cluster_into(
        &mut self,
        pos: u64,
        end: u64,
        depth: u32,
        limit: usize,
        out: &mut Vec<MapEntry>,
    ) -> Result<u64> {
        let cs = self.geo.cluster_size();
        let in_c = pos & (cs - 1);
        let n = (cs - in_c).min(end - pos);
        let e = self.l2_entry(pos)?;
        let cg = pos - in_c;
        for (t, s, l) in self.segments(e, in_c, n) {
            let host = e.host_offset() + s;
            let base = MapEntry {
                start: cg + s,
                length: l,
                depth,
                present: true,
                zero: false,
                data: false,
                compressed: false,
                offset: None,
            };
            let m = match t {
                SubclusterType::Normal if self.is_metadata_preallocated()? => {
                    // As QEMU: ask the file where it really holds data.
                    let data = self.data.clone().unwrap_or_else(|| self.file.clone());
                    host_status(&*data, base, host, out)?;
                    continue;
                }
                SubclusterType::Normal => MapEntry {
                    data: true,
                    offset: Some(host),
                    ..base
                },
                SubclusterType::ZeroAlloc => MapEntry {
                    zero: true,
                    offset: Some(host),
                    ..base
                },
                SubclusterType::ZeroPlain => MapEntry { zero: true, ..base },
                SubclusterType::Compressed => MapEntry {
                    data: true,
                    compressed: true,
                    ..base
                },
                SubclusterType::UnallocatedAlloc => {
                    self.unallocated_into(cg + s, l, Some(host), depth, limit, out)?;
                    continue;
                }
                SubclusterType::UnallocatedPlain => {
                    self.unallocated_into(cg + s, l, None, depth, limit, out)?;
                    continue;
                }
                SubclusterType::Invalid => {
                    // Reads fail on it; report as data so callers do not skip it.
                    MapEntry { data: true, ..base }
                }
            };
            push_merged(out, m);
        }
        Ok(n)
    }

    /// QEMU's heuristic: clusters with a refcount outnumber the clusters the
    /// file really occupies (by more than a ninth, and by at least two).
    fn is_metadata_preallocated(&mut self) -> Result<bool> {
        if let Some(v) = self.metadata_prealloc {
            return Ok(v);
        }
        let cs = self.geo.cluster_size();
        let v = match self
            .file
            .allocated_size()
            .map(|a| a.filter(|_| !self.df))
            .map_err(ioerr("stat", &self.name))?
        {
            None => false,
            Some(real) => {
                let real_clusters = real / cs;
                let threshold = (real_clusters * 10 / 9).max(real_clusters + 2);
                let end = self
                    .file
                    .len()
                    .map_err(ioerr("stat", &self.name))?
                    .div_ceil(cs);
                let name = self.name.clone();
                let count = self
                    .refs
                    .count_used(&*self.file, end, threshold)
                    .map_err(|e| crate::image::refcount_err(&name, e))?;
                count >= threshold
            }
        };
        self.metadata_prealloc = Some(v);
        Ok(v)
    }

    /// A range unallocated in this layer: ask the backing chain.
    fn unallocated_into(
        &mut self,
        offset: u64,
        len: u64,
        host: Option<u64>,
        depth: u32,
        limit: usize,
        out: &mut Vec<MapEntry>,
    ) -> Result<()> {
        let zero_here = |start: u64, length: u64, out: &mut Vec<MapEntry>| {
            push_merged(
                out,
                MapEntry {
                    start,
                    length,
                    depth,
                    present: false,
                    zero: true,
                    data: false,
                    compressed: false,
                    offset: host.map(|h| h + (start - offset)),
                },
            )
        };
        let Some(bk) = self.backing.clone() else {
            zero_here(offset, len, out);
            return Ok(());
        };
        let bsize = bk.size();
        let inside = bsize.saturating_sub(offset).min(len);
        if inside > 0 {
            bk.status_into(offset, inside, depth + 1, limit, out)?;
        }
        if inside < len {
            zero_here(offset + inside, len - inside, out);
        }
        Ok(())
    }
}

/// A data range of this layer checked against the file's holes: holes
/// (and anything past the end of the file) also read as zeroes.
fn host_status(
    file: &dyn Storage,
    base: MapEntry,
    host: u64,
    out: &mut Vec<MapEntry>,
) -> Result<()> {
    let end = host + base.length;
    let mut pos = host;
    while pos < end {
        let next_data = file
            .next_data(pos)
            .map_err(ioerr("seek", "image file"))?
            .unwrap_or(end)
            .min(end);
        let (run_end, zero) = if next_data > pos {
            (next_data, true)
        } else {
            let h = file
                .next_hole(pos)
                .map_err(ioerr("seek", "image file"))?
                .min(end);
            (if h <= pos { end } else { h }, false)
        };
        push_merged(
            out,
            MapEntry {
                start: base.start + (pos - host),
                length: run_end - pos,
                data: true,
                zero,
                offset: Some(pos),
                ..base
            },
        );
        pos = run_end;
    }
    Ok(())
}
