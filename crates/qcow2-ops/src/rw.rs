//! Guest reads and writes.

use crate::error::{Error, Result};
use crate::image::{ioerr, Inner};
use qcow2_format::entry::{L2Entry, SubclusterType, FLAG_COPIED, OFFSET_MASK};
use qcow2_format::CompressionType;
use std::io::Read;

/// One run of same-typed subclusters inside a cluster: (type, start in cluster, length).
pub(crate) type Segment = (SubclusterType, u64, u64);

impl Inner {
    /// Splits `[in_c, in_c+n)` of a cluster with entry `e` into runs of equal type.
    pub(crate) fn segments(&self, e: L2Entry, in_c: u64, n: u64) -> Vec<Segment> {
        let ext = self.geo.extended_l2;
        if !ext || e.is_compressed() {
            return vec![(e.subcluster_type(ext, 0), in_c, n)];
        }
        let sub = self.geo.subcluster_size();
        let mut out: Vec<Segment> = Vec::new();
        let mut pos = in_c;
        let end = in_c + n;
        while pos < end {
            let sc = (pos / sub) as u32;
            let t = e.subcluster_type(true, sc);
            let seg_end = ((sc as u64 + 1) * sub).min(end);
            match out.last_mut() {
                Some((lt, _, len)) if *lt == t => *len += seg_end - pos,
                _ => out.push((t, pos, seg_end - pos)),
            }
            pos = seg_end;
        }
        out
    }

    /// Reads guest data (range already validated).
    pub(crate) fn read(&mut self, offset: u64, buf: &mut [u8]) -> Result<()> {
        let cs = self.geo.cluster_size();
        let mut done = 0usize;
        while done < buf.len() {
            let guest = offset + done as u64;
            let in_c = guest & (cs - 1);
            let n = (cs - in_c).min((buf.len() - done) as u64);
            let e = self.l2_entry(guest)?;
            let cluster_guest = guest - in_c;
            for (t, s, len) in self.segments(e, in_c, n) {
                let b = &mut buf[done + (s - in_c) as usize..done + (s - in_c + len) as usize];
                self.read_segment(e, t, cluster_guest, s, b)?;
            }
            done += n as usize;
        }
        Ok(())
    }

    fn read_segment(
        &mut self,
        e: L2Entry,
        t: SubclusterType,
        cluster_guest: u64,
        in_c: u64,
        b: &mut [u8],
    ) -> Result<()> {
        match t {
            SubclusterType::Normal => {
                let host = e.host_offset() + in_c;
                self.file
                    .read_at(b, host)
                    .map_err(ioerr("read data", &self.name))?;
            }
            SubclusterType::ZeroAlloc | SubclusterType::ZeroPlain => b.fill(0),
            SubclusterType::UnallocatedAlloc | SubclusterType::UnallocatedPlain => {
                match self.backing.as_mut() {
                    Some(bk) => bk.read(cluster_guest + in_c, b)?,
                    None => b.fill(0),
                }
            }
            SubclusterType::Compressed => {
                let data = self.decompress(e, cluster_guest)?;
                b.copy_from_slice(&data[in_c as usize..in_c as usize + b.len()]);
            }
            SubclusterType::Invalid => {
                let msg = format!(
                    "{}: invalid subcluster bitmap {:#x} for guest offset {cluster_guest:#x}",
                    self.name, e.bitmap
                );
                self.mark_corrupt();
                return Err(Error::Corrupt(msg));
            }
        }
        Ok(())
    }

    /// Decompressed contents of a compressed cluster (cached for the last one).
    pub(crate) fn decompress(&mut self, e: L2Entry, cluster_guest: u64) -> Result<Vec<u8>> {
        if let Some((raw, data)) = &self.zcache {
            if *raw == e.raw {
                return Ok(data.clone());
            }
        }
        let cb = self.geo.cluster_bits;
        let cs = self.geo.cluster_size() as usize;
        let d = e.compressed(cb);
        let len = d.byte_len().min(2 * cs as u64);
        if d.offset < self.geo.cluster_size() {
            let msg = format!(
                "{}: compressed cluster for guest offset {cluster_guest:#x} lies on the header",
                self.name
            );
            self.mark_corrupt();
            return Err(Error::Corrupt(msg));
        }
        // As QEMU: whatever of the descriptor's range lies past the end of
        // the file reads as zeroes, and the data is good when it
        // decompresses to a whole cluster (the size field may overstate it).
        let mut src = vec![0u8; len as usize];
        self.file
            .read_at(&mut src, d.offset)
            .map_err(ioerr("read compressed cluster", &self.name))?;
        let mut out = vec![0u8; cs];
        let ok = match self.header.compression() {
            CompressionType::Zlib => {
                let mut dec = flate2::read::DeflateDecoder::new(&src[..]);
                dec.read_exact(&mut out).is_ok()
            }
            CompressionType::Zstd => match zstd::stream::read::Decoder::with_buffer(&src[..]) {
                Ok(dec) => {
                    let mut dec = dec.single_frame();
                    dec.read_exact(&mut out).is_ok()
                }
                Err(_) => false,
            },
        };
        if !ok {
            return Err(Error::io(
                format!(
                    "{}: compressed cluster for guest offset {cluster_guest:#x} does not decompress",
                    self.name
                ),
                std::io::Error::from_raw_os_error(libc::EIO),
            ));
        }
        self.zcache = Some((e.raw, out.clone()));
        Ok(out)
    }

    /// Writes guest data (range validated, image writable).
    pub(crate) fn write(&mut self, offset: u64, buf: &[u8]) -> Result<()> {
        let cs = self.geo.cluster_size();
        let mut done = 0usize;
        while done < buf.len() {
            let guest = offset + done as u64;
            let in_c = guest & (cs - 1);
            let n = (cs - in_c).min((buf.len() - done) as u64);
            self.write_in_cluster(guest - in_c, in_c, &buf[done..done + n as usize])?;
            done += n as usize;
        }
        Ok(())
    }

    /// Writes `data` at `in_c` inside the guest cluster starting at `cg`.
    pub(crate) fn write_in_cluster(&mut self, cg: u64, in_c: u64, data: &[u8]) -> Result<()> {
        let cs = self.geo.cluster_size();
        let ext = self.geo.extended_l2;
        let table = self.ensure_l2_table(cg)?;
        let e = self.l2_entry(cg)?;
        let n = data.len() as u64;
        let host = e.host_offset();
        let reuse = !e.is_compressed() && host != 0 && e.copied();
        self.zcache = None;
        if host != 0 {
            // A data cluster past the end of the file is not ours to write.
            if !self.within_file(host)? {
                let msg = format!(
                    "{}: data cluster {host:#x} for guest offset {cg:#x} lies past the end of the file",
                    self.name
                );
                self.mark_corrupt();
                return Err(Error::Corrupt(msg));
            }
        }
        if ext && !e.is_compressed() {
            // Only the touched subclusters are written and marked allocated.
            let sub = self.geo.subcluster_size();
            let s0 = in_c / sub;
            let s1 = (in_c + n).div_ceil(sub);
            let (start, end) = (s0 * sub, s1 * sub);
            let mut region = vec![0u8; (end - start) as usize];
            let all_normal =
                (s0..s1).all(|s| e.subcluster_type(true, s as u32) == SubclusterType::Normal);
            let partial = start != in_c || end != in_c + n;
            if partial && (!all_normal || !reuse) {
                self.read(cg + start, &mut region)?;
            } else if partial {
                // All touched subclusters hold data already: write in place.
                return self.write_data(host + in_c, data);
            }
            region[(in_c - start) as usize..(in_c - start + n) as usize].copy_from_slice(data);
            let (new_host, fresh) = if reuse {
                (host, false)
            } else {
                (self.alloc_clusters(1)? * cs, true)
            };
            if host != 0 && !reuse {
                // A cluster shared with a snapshot: the copy gets the whole
                // cluster as it reads now, then the touched subclusters.
                let mut full = vec![0u8; cs as usize];
                self.read(cg, &mut full)?;
                full[start as usize..end as usize].copy_from_slice(&region);
                self.write_data(new_host, &full)?;
                if self.can_free(e)? {
                    self.free_entry_clusters(e, false);
                }
            } else {
                self.write_data(new_host + start, &region)?;
            }
            let mut bitmap = e.bitmap;
            for s in s0..s1 {
                bitmap |= 1 << s;
                bitmap &= !(1u64 << (32 + s));
            }
            let raw = new_host | FLAG_COPIED;
            let new = L2Entry { raw, bitmap };
            if new != e {
                if fresh || bitmap != e.bitmap {
                    self.set_alloc_unsynced();
                }
                self.set_l2_entry(table, cg, new)?;
            }
            return Ok(());
        }
        if reuse && !e.zero_flag() {
            // Plain overwrite of an allocated data cluster.
            return self.write_data(host + in_c, data);
        }
        // Copy-on-write: the whole cluster with the untouched parts as they read now.
        let mut full = vec![0u8; cs as usize];
        if n != cs {
            let is_zero = reuse && e.zero_flag();
            if !is_zero {
                self.read(cg, &mut full)?;
            }
        }
        full[in_c as usize..(in_c + n) as usize].copy_from_slice(data);
        let new_host = if reuse {
            host
        } else {
            self.alloc_clusters(1)? * cs
        };
        self.write_data(new_host, &full)?;
        let mut raw = (new_host & OFFSET_MASK) | FLAG_COPIED;
        if ext {
            raw &= !1;
        }
        let new = L2Entry {
            raw,
            bitmap: if ext { 0xffff_ffff } else { 0 },
        };
        let free = !reuse && self.can_free(e)?;
        self.set_alloc_unsynced();
        self.set_l2_entry(table, cg, new)?;
        if free {
            self.free_entry_clusters(e, false);
        }
        Ok(())
    }
}
