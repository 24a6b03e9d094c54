//! Requests whose data the caller moves itself: the engine plans them and
//! keeps them safe while they run, the caller reads or writes the host
//! ranges with the image file's descriptor ([`Image::data_file`]) however
//! it likes (an io_uring event loop serving many requests on one thread).
//!
//! Only the plain cases are mapped: a read of clusters that hold data or
//! read as zeroes, a write into data clusters the image owns (nothing
//! allocated, no entry changed). Everything else (backing file, compressed
//! clusters, copy-on-write, allocation, encryption, an external data file)
//! gets `None` and goes through [`Image::read`] / [`Image::write`]. So do
//! requests that would have to wait: `try_map_*` never blocks on another
//! request, which lets a single thread hold many mappings without
//! deadlocking against itself. A caller moves data with the descriptor
//! only when [`Image::data_file`] gives one (not through a layer that must
//! see each request, such as error injection); [`MappedWrite::write_now`]
//! writes through the engine's own file access instead.
//!
//! A mapping holds what the request would hold on the engine's own path:
//! the shared gate (no layout change meanwhile), for a read a ticket (no
//! cluster it maps is freed or reused until it is dropped), for a write
//! the range lock of its clusters (no other write, zeroing or discard of
//! them meanwhile). [`MappedWrite::finish`] does the write's bookkeeping:
//! the next flush syncs what it wrote.

use super::Image;
use crate::datapath::{ReadPlan, Src, WritePlan};
use crate::error::{Error, Result};
use qcow2_io::RawFile;
use smallvec::SmallVec;
use std::ops::Range;
use std::sync::atomic::Ordering;
use std::sync::RwLockReadGuard;

/// Where a range of a mapped read's buffer comes from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MapPiece {
    /// Position in the request's buffer.
    pub at: usize,
    /// Length in bytes.
    pub len: usize,
    /// The host offset in [`Image::data_file`] to read it from; `None`:
    /// it reads as zeroes.
    pub host: Option<u64>,
}

/// A read planned by [`Image::try_map_read`]; the clusters it maps stay
/// where they are until it is dropped.
#[must_use = "the mapping is valid only while it is held"]
pub struct MappedRead<'a> {
    pieces: SmallVec<[MapPiece; 4]>,
    _ticket: Option<qcow2_inflight::Ticket<'a>>,
    _gate: RwLockReadGuard<'a, ()>,
}

impl MappedRead<'_> {
    /// The request's buffer, piece by piece in buffer order (host ranges
    /// adjacent in the file already joined).
    pub fn pieces(&self) -> &[MapPiece] {
        &self.pieces
    }
}

/// A write planned by [`Image::try_map_write`]: the caller writes each
/// piece, then calls [`MappedWrite::finish`].
#[must_use = "call finish once the data is written"]
pub struct MappedWrite<'a> {
    img: &'a Image,
    pieces: SmallVec<[(u64, Range<usize>); 4]>,
    range: Option<qcow2_inflight::RangeGuard<'a>>,
    _gate: RwLockReadGuard<'a, ()>,
}

impl MappedWrite<'_> {
    /// (host offset in [`Image::data_file`], range of the request's
    /// buffer), host ranges adjacent in the file already joined.
    pub fn pieces(&self) -> &[(u64, Range<usize>)] {
        &self.pieces
    }

    /// Writes `buf` (the request's buffer) through the engine's own file
    /// access, on this thread, and ends the write: for buffered files,
    /// where a write is a copy into the page cache that asynchronous I/O
    /// would only hand to another thread.
    pub fn write_now(self, buf: &[u8]) -> Result<()> {
        let mut written = 0u64;
        let mut res = Ok(());
        for (h, r) in &self.pieces {
            let Some(b) = buf.get(r.clone()) else {
                res = Err(std::io::Error::from_raw_os_error(libc::EINVAL));
                break;
            };
            if let Err(e) = self.img.data.write_at(b, *h) {
                res = Err(e);
                break;
            }
            written += b.len() as u64;
        }
        self.finish(res.map(|()| written))
    }

    /// Ends the write once its pieces are written (or failed): `written`
    /// is the bytes written, or the first error. A write that reached the
    /// file even in part is synced by the next flush.
    pub fn finish(mut self, written: std::io::Result<u64>) -> Result<()> {
        let img = self.img;
        match &written {
            Ok(n) => {
                img.sh.data_bytes.fetch_add(*n, Ordering::Relaxed);
                if *n > 0 {
                    img.sh.dur.wrote();
                }
            }
            Err(_) => {
                img.sh.dur.wrote();
            }
        }
        drop(self.range.take());
        img.req_gen.fetch_add(1, Ordering::SeqCst);
        written
            .map(drop)
            .map_err(crate::image::ioerr("write data", &img.name))
    }
}

impl Drop for MappedWrite<'_> {
    fn drop(&mut self) {
        if self.range.is_some() {
            // Dropped unfinished: it may have written something.
            self.img.sh.dur.wrote();
            self.img.req_gen.fetch_add(1, Ordering::SeqCst);
        }
    }
}

impl Image {
    /// Whether guest data lives in the image file as it is (no
    /// encryption, no external data file): then host offsets mean
    /// something to the caller.
    fn mappable(&self) -> bool {
        self.crypt.is_none() && std::sync::Arc::ptr_eq(&self.data, &self.file)
    }

    /// The descriptor mapped requests move guest data with, and the
    /// alignment it needs; `None` when nothing is mapped (encryption, an
    /// external data file, a layer such as error injection between the
    /// engine and the file).
    pub fn data_file(&self) -> Option<RawFile> {
        if !self.mappable() {
            return None;
        }
        self.file.raw_file()
    }

    /// Plans a read of `len` bytes at guest `offset` for the caller to
    /// carry out (see the module documentation). `Ok(None)`: use
    /// [`Image::read`]. Errors are the request's own (out of range, a
    /// corrupt entry).
    pub fn try_map_read(&self, offset: u64, len: usize) -> Result<Option<MappedRead<'_>>> {
        if !self.mappable() {
            return Ok(None);
        }
        let Ok(gate) = self.gate.try_read() else {
            return Ok(None);
        };
        let mut g = self.lock();
        g.check_range(offset, len as u64)?;
        g.check_key()?;
        let mut plan = ReadPlan::new();
        g.plan_read(offset, len, 0, &mut plan)?;
        let mut pieces = SmallVec::new();
        let mut mapped = false;
        for s in &plan {
            let host = match s.src {
                Src::Host(h) => {
                    mapped = true;
                    Some(h)
                }
                Src::Zero => None,
                Src::Backing(_) | Src::Compressed { .. } => return Ok(None),
            };
            pieces.push(MapPiece {
                at: s.at,
                len: s.len,
                host,
            });
        }
        // No cluster mapped now is released before the ticket is returned.
        let ticket = mapped.then(|| self.sh.tickets.take(g.frees.stamp()));
        Ok(Some(MappedRead {
            pieces,
            _ticket: ticket,
            _gate: gate,
        }))
    }

    /// Plans a write of `len` bytes at guest `offset` into clusters the
    /// image owns, for the caller to carry out (see the module
    /// documentation); `flags` may hold nothing (FUA and the other flags
    /// go through [`Image::write`]). `Ok(None)`: use [`Image::write`]
    /// (allocation, copy-on-write, a request in flight on the same
    /// clusters, writethrough). Errors are the request's own.
    pub fn try_map_write(&self, offset: u64, len: usize) -> Result<Option<MappedWrite<'_>>> {
        if self.writethrough || !self.mappable() || self.sh.write_gate.load(Ordering::Relaxed) != 0
        {
            return Ok(None);
        }
        let Ok(gate) = self.gate.try_read() else {
            return Ok(None);
        };
        let cb = self.cluster_bits;
        let first = offset >> cb;
        let end = offset
            .saturating_add(len as u64)
            .saturating_add((1 << cb) - 1)
            >> cb;
        let Some(range) = self.ranges.try_lock(first, end.max(first + 1)) else {
            return Ok(None);
        };
        let mut g = self.lock();
        g.check_writable()?;
        g.check_range(offset, len as u64)?;
        if !g.writes_in_place(offset, len)? {
            return Ok(None);
        }
        g.mark_bitmaps(offset, len as u64);
        let mut plan = WritePlan::default();
        if let Err(e) = g.plan_write(offset, len, &mut plan) {
            g.abandon(&mut plan);
            if let Error::Corrupt(_) = &e {
                g.mark_corrupt();
            }
            drop(g);
            self.req_gen.fetch_add(1, Ordering::SeqCst);
            return Err(e);
        }
        if !plan.in_place() {
            // Cannot happen (checked above); never leave it half done.
            g.abandon(&mut plan);
            return Ok(None);
        }
        drop(g);
        let mut pieces: SmallVec<[(u64, Range<usize>); 4]> = SmallVec::new();
        for (h, r) in plan.direct_pieces() {
            match pieces.last_mut() {
                Some((lh, lr)) if *lh + lr.len() as u64 == h && lr.end == r.start => {
                    lr.end = r.end;
                }
                _ => pieces.push((h, r)),
            }
        }
        Ok(Some(MappedWrite {
            img: self,
            pieces,
            range: Some(range),
            _gate: gate,
        }))
    }
}
