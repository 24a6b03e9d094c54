//! Compressed writes (QEMU's `write -c`, `qemu-img convert -c`).
//!
//! Semantics, as QEMU 10 has them:
//! - only whole clusters starting on a cluster boundary (the last cluster of
//!   an image whose size is not cluster aligned may be short: it is padded
//!   with zeroes); anything else is `EINVAL`;
//! - each cluster is compressed with the image's compression type (zlib:
//!   raw deflate with a 4 KiB window, which is what QEMU decompresses; zstd:
//!   one frame); when the result is not smaller than a cluster, the cluster
//!   is written uncompressed like a normal write;
//! - a compressed cluster never replaces an entry with a host cluster
//!   (normal, preallocated zero, or compressed): `EIO`, as QEMU refuses it;
//!   unallocated and zero-plain entries are replaced;
//! - the compressed bytes are packed one after another into host clusters
//!   (`Inner::alloc_bytes`): a compressed cluster continues into the next
//!   host cluster only when that is the next one allocated, and every host
//!   cluster it touches gets one reference per compressed cluster;
//! - extended L2 entries of compressed clusters have an all-zero bitmap;
//!   compressed entries never carry the COPIED flag.
//!
//! Crash safety: the refcount increments (of a fresh host cluster, or of the
//! partially filled one a cluster is appended to) and the compressed data
//! are durable before the L2 entry is written (`prepare_l2_writeback`);
//! bytes of earlier compressed clusters are never rewritten.

use crate::error::{Error, Result};
use crate::image::{refcount_err, Inner};
use qcow2_format::entry::{CompressedDescriptor, L2Entry, OFFSET_MASK};
use qcow2_format::CompressionType;

/// Deflate window QEMU uses for qcow2 (and the only one it can inflate).
const ZLIB_WINDOW_BITS: u8 = 12;

/// Compresses one cluster; `None` when the result would not be smaller
/// than `limit` bytes (QEMU then writes the cluster uncompressed).
pub(crate) fn compress_cluster(ty: CompressionType, src: &[u8], limit: usize) -> Option<Vec<u8>> {
    let out = match ty {
        CompressionType::Zlib => {
            let mut c = flate2::Compress::new_with_window_bits(
                flate2::Compression::default(),
                false,
                ZLIB_WINDOW_BITS,
            );
            let mut out = Vec::with_capacity(limit + 64);
            loop {
                let rest = &src[c.total_in() as usize..];
                let st = c
                    .compress_vec(rest, &mut out, flate2::FlushCompress::Finish)
                    .ok()?;
                if st == flate2::Status::StreamEnd {
                    break;
                }
                if out.len() >= limit {
                    return None;
                }
                out.reserve(4096);
            }
            out
        }
        CompressionType::Zstd => zstd::bulk::compress(src, 0).ok()?,
    };
    (out.len() < limit).then_some(out)
}

impl Inner {
    /// Writes whole clusters compressed (range validated, image writable).
    pub(crate) fn write_compressed(&mut self, offset: u64, buf: &[u8]) -> Result<()> {
        if self.df {
            // The spec allows no compressed clusters there (QEMU: ENOTSUP).
            return Err(Error::NotSupported(format!(
                "'{}': compressed writes to an image with an external data file",
                self.name
            )));
        }
        let cs = self.geo.cluster_size();
        let end = offset + buf.len() as u64;
        if offset & (cs - 1) != 0 || (buf.len() as u64 & (cs - 1) != 0 && end != self.header.size) {
            return Err(Error::Invalid(format!(
                "'{}': compressed writes need whole clusters of {cs} bytes \
                 (request at {offset} of {} bytes)",
                self.name,
                buf.len()
            )));
        }
        let mut done = 0usize;
        while done < buf.len() {
            let n = (cs as usize).min(buf.len() - done);
            self.write_compressed_cluster(offset + done as u64, &buf[done..done + n])?;
            done += n;
        }
        Ok(())
    }

    fn write_compressed_cluster(&mut self, cg: u64, data: &[u8]) -> Result<()> {
        let cs = self.geo.cluster_size() as usize;
        let cb = self.geo.cluster_bits;
        let out = if data.len() < cs {
            let mut full = vec![0u8; cs];
            full[..data.len()].copy_from_slice(data);
            compress_cluster(self.header.compression(), &full, cs)
        } else {
            compress_cluster(self.header.compression(), data, cs)
        };
        let Some(out) = out else {
            // Incompressible: a normal write of the cluster.
            return self.write(cg, data);
        };
        let table = self.ensure_l2_table(cg)?;
        let e = self.l2_entry(cg)?;
        if e.raw & OFFSET_MASK != 0 {
            // QEMU never lets a compressed cluster replace one with host data.
            return Err(Error::io(
                format!(
                    "{}: cannot write a compressed cluster over the allocated cluster \
                     at guest offset {cg:#x}",
                    self.name
                ),
                std::io::Error::from_raw_os_error(libc::EIO),
            ));
        }
        let host = self.alloc_bytes(out.len() as u64)?;
        let sectors = ((host + out.len() as u64 - 1) >> 9) - (host >> 9) + 1;
        let raw = CompressedDescriptor {
            offset: host,
            sectors,
        }
        .encode(cb)
        .map_err(|e| Error::NoSpace(format!("{}: {e}", self.name)))?;
        self.sh.zcache.invalidate();
        self.file.event(qcow2_io::DebugEvent::WriteCompressed);
        self.write_data(host, &out)?;
        self.set_alloc_unsynced()?;
        self.file.event(qcow2_io::DebugEvent::L2UpdateCompressed);
        self.set_l2_entry(table, cg, L2Entry { raw, bitmap: 0 })
    }

    /// Reserves `size` bytes (at most a cluster) for compressed data right
    /// after the previous compressed cluster of this session, as QEMU's
    /// qcow2_alloc_bytes: in the same host cluster when they fit, continuing
    /// into the next host cluster when that is the one allocated next, else
    /// at the start of a new host cluster. Each host cluster touched gets one
    /// more reference.
    fn alloc_bytes(&mut self, size: u64) -> Result<u64> {
        let cs = self.geo.cluster_size();
        let cb = self.geo.cluster_bits;
        self.file.event(qcow2_io::DebugEvent::ClusterAllocBytes);
        let mut off = self.free_byte_offset;
        if off != 0 {
            let c = off >> cb;
            let name = self.name.clone();
            let r = self
                .refs
                .get(&*self.file, c)
                .map_err(|e| refcount_err(&name, e))?;
            // A full refcount (or a cluster freed meanwhile) starts afresh.
            if r == 0 || r >= self.refs.max_refcount() {
                off = 0;
            }
        }
        let free_in = if off == 0 { 0 } else { cs - (off & (cs - 1)) };
        let start = if off != 0 && free_in >= size {
            self.bump_refcount(off >> cb)?;
            off
        } else {
            let new = self.alloc_clusters_for(1, Some("compressed cluster"))? * cs;
            if new == 0 {
                let msg = format!(
                    "{}: refusing to place a compressed cluster on the header",
                    self.name
                );
                self.mark_corrupt();
                return Err(Error::Corrupt(msg));
            }
            // The allocation may have applied pending frees: if they freed
            // the partly filled cluster, it is not ours to continue from.
            let kept = self.free_byte_offset == off;
            if off != 0 && kept && off.next_multiple_of(cs) == new {
                // Continues from the partly filled cluster into the new one.
                self.bump_refcount(off >> cb)?;
                off
            } else {
                new
            }
        };
        let next = start + size;
        self.free_byte_offset = if next & (cs - 1) == 0 { 0 } else { next };
        Ok(start)
    }

    fn bump_refcount(&mut self, c: u64) -> Result<()> {
        let name = self.name.clone();
        self.refs
            .update(&*self.file, c, 1)
            .map_err(|e| refcount_err(&name, e))?;
        Ok(())
    }
}
