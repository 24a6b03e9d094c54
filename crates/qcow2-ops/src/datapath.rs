//! The data path: guest reads and writes as plans made under the image lock
//! and carried out without it.
//!
//! A request looks up its L2 entries under the lock and turns them into a
//! plan: where each byte range of the request lives (a host range, zeroes,
//! the backing layer, a compressed cluster) and, for writes, which clusters
//! it writes in place and which it fills anew (allocation or copy-on-write,
//! with how the untouched part of the cluster reads now). The lock is then
//! released, the data I/O runs (host-contiguous pieces as one system call),
//! and a write takes the lock again to set the entries of the clusters it
//! filled, after their data is written. Metadata decisions stay apart from
//! data I/O; the same functions serve the paths that already hold the lock
//! (write-zeroes' fallback, amend, resize), which simply do all three steps
//! in one critical section.
//!
//! What keeps this safe while other requests run (see `Image`):
//! - a write holds the range lock of its guest clusters from its lookup
//!   until its entries are set, so nothing else changes them meanwhile;
//! - a read holds a ticket, so no cluster it maps is freed, punched or
//!   reused until it is done (`Frees::take_ready`);
//! - an entry points at a new cluster only after its data is written, and
//!   is written to the file only after that data is durable (`Durability`).

use crate::backing::{self, Layer};
use crate::crypt::{self, Crypt};
use crate::error::{Error, Result};
use crate::image::{ioerr, Inner};
use qcow2_format::entry::{L2Entry, SubclusterType, FLAG_COPIED, OFFSET_MASK};
use qcow2_format::CompressionType;
use qcow2_io::{DebugEvent, Storage};
use smallvec::SmallVec;
use std::io::Read;
use std::ops::Range;
use std::sync::{Arc, Mutex};

/// One run of same-typed subclusters inside a cluster: (type, start in cluster, length).
pub(crate) type Segment = (SubclusterType, u64, u64);

/// Where a range of a request's bytes comes from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Src {
    /// The image file, from this host offset.
    Host(u64),
    /// Zeroes.
    Zero,
    /// The backing layer, from this guest offset (zeroes without one).
    Backing(u64),
    /// Within the compressed cluster with this L2 entry, mapping the guest
    /// cluster at `guest`, from byte `in_c`.
    Compressed { entry: u64, guest: u64, in_c: u64 },
}

/// A range of a buffer and where its bytes come from.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Seg {
    pub(crate) src: Src,
    /// Position in the buffer.
    pub(crate) at: usize,
    pub(crate) len: usize,
}

/// Where the bytes of a buffer come from, in buffer order.
pub(crate) type ReadPlan = SmallVec<[Seg; 4]>;

/// Appends `s`, extending the last segment where both continue each other
/// (host ranges adjacent in the file become one read).
fn push_seg(plan: &mut ReadPlan, s: Seg) {
    if let Some(last) = plan.last_mut() {
        if last.at + last.len == s.at {
            let next = match (last.src, s.src) {
                (Src::Host(a), Src::Host(b)) => a + last.len as u64 == b,
                (Src::Zero, Src::Zero) => true,
                (Src::Backing(a), Src::Backing(b)) => a + last.len as u64 == b,
                _ => false,
            };
            if next {
                last.len += s.len;
                return;
            }
        }
    }
    plan.push(s);
}

/// The parts of the request `[offset, offset+len)` in each cluster of
/// size `cs`: (guest offset of the cluster, offset in it, position in the
/// request, length).
fn cluster_pieces(
    offset: u64,
    len: usize,
    cs: u64,
) -> impl Iterator<Item = (u64, u64, usize, usize)> {
    let mut done = 0usize;
    std::iter::from_fn(move || {
        if done >= len {
            return None;
        }
        let guest = offset + done as u64;
        let in_c = guest & (cs - 1);
        let n = (cs - in_c).min((len - done) as u64) as usize;
        let piece = (guest - in_c, in_c, done, n);
        done += n;
        Some(piece)
    })
}

/// One cluster a write fills anew: a new or reused host cluster gets the
/// cluster (or the touched subclusters) as they read now with the request's
/// data on top, then its L2 entry changes from `old` to `new`.
pub(crate) struct Fill {
    /// Guest offset of the cluster.
    cg: u64,
    old: L2Entry,
    new: L2Entry,
    /// Where the region goes in the file.
    host: u64,
    /// Length of the region.
    len: usize,
    /// How the region reads before the write (positions relative to the
    /// region); `None`: zeroes.
    base: Option<ReadPlan>,
    /// Where the request's data goes in the region.
    data_at: usize,
    /// The request's data for it (a range of the request's buffer).
    data: Range<usize>,
    /// A cluster allocated for it: released if the request fails before
    /// the entry points at it.
    fresh: Option<u64>,
    /// The old entry's clusters lose this reference once `new` is set.
    release_old: bool,
}

/// What a write does: pieces written in place into clusters it owns, and
/// clusters it fills anew.
#[derive(Default)]
pub(crate) struct WritePlan {
    /// Guest offset of the request's buffer.
    offset: u64,
    /// (host offset, range of the request's buffer).
    direct: SmallVec<[(u64, Range<usize>); 4]>,
    fills: SmallVec<[Fill; 2]>,
}

impl WritePlan {
    /// Whether the write changes no L2 entry.
    pub(crate) fn in_place(&self) -> bool {
        self.fills.is_empty()
    }
    /// The pieces written in place: (host offset, range of the buffer).
    pub(crate) fn direct_pieces(&self) -> impl Iterator<Item = (u64, Range<usize>)> + '_ {
        self.direct.iter().cloned()
    }
}

/// The last decompressed cluster, shared by all requests. Its generation
/// moves whenever a compressed cluster may have been freed: a request that
/// decompressed data it looked up before that may not store it, since the
/// same descriptor may meanwhile name other data.
#[derive(Default)]
pub(crate) struct ZCache {
    state: Mutex<ZState>,
}

#[derive(Default)]
struct ZState {
    generation: u64,
    last: Option<(u64, Arc<[u8]>)>,
}

impl ZCache {
    fn state(&self) -> std::sync::MutexGuard<'_, ZState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
    /// The generation to pass to [`ZCache::put`] (read under the image lock).
    pub(crate) fn generation(&self) -> u64 {
        self.state().generation
    }
    fn get(&self, entry: u64) -> Option<Arc<[u8]>> {
        match &self.state().last {
            Some((e, d)) if *e == entry => Some(Arc::clone(d)),
            _ => None,
        }
    }
    fn put(&self, entry: u64, data: Arc<[u8]>, generation: u64) {
        let mut s = self.state();
        if s.generation == generation {
            s.last = Some((entry, data));
        }
    }
    /// Forgets the cached cluster (a compressed cluster may be freed).
    pub(crate) fn invalidate(&self) {
        let mut s = self.state();
        s.generation += 1;
        s.last = None;
    }
}

/// What carrying out a plan needs, all of it usable without the image lock.
pub(crate) struct Io<'a> {
    pub(crate) file: &'a dyn Storage,
    pub(crate) backing: Option<&'a dyn Layer>,
    pub(crate) zcache: &'a ZCache,
    /// [`ZCache::generation`] when the plan was made.
    pub(crate) zgen: u64,
    pub(crate) compression: CompressionType,
    pub(crate) cluster_bits: u32,
    pub(crate) name: &'a str,
    /// The data cipher of an encrypted image.
    pub(crate) crypt: Option<&'a Crypt>,
    /// Where guest data lives (the image file or its external data file).
    pub(crate) data: &'a dyn Storage,
}

impl Io<'_> {
    /// Fills `buf`, the guest data at `guest`, as `plan` says.
    pub(crate) fn read(&self, plan: &[Seg], buf: &mut [u8], guest: u64) -> Result<()> {
        for s in plan {
            let b = &mut buf[s.at..s.at + s.len];
            match s.src {
                Src::Host(h) => {
                    self.file.event(DebugEvent::ReadAio);
                    self.data
                        .read_at(b, h)
                        .map_err(ioerr("read data", self.name))?;
                    if let Some(c) = self.crypt {
                        c.decrypt(h, guest + s.at as u64, b, self.name)?;
                    }
                }
                Src::Zero => b.fill(0),
                Src::Backing(g) => match self.backing {
                    Some(l) => {
                        self.file.event(DebugEvent::ReadBackingAio);
                        backing::read(l, g, b)?
                    }
                    None => b.fill(0),
                },
                Src::Compressed { entry, guest, in_c } => {
                    let d = self.decompress(entry, guest)?;
                    b.copy_from_slice(&d[in_c as usize..in_c as usize + b.len()]);
                }
            }
        }
        Ok(())
    }

    /// The contents of the compressed cluster with L2 entry `entry`.
    fn decompress(&self, entry: u64, guest: u64) -> Result<Arc<[u8]>> {
        if let Some(d) = self.zcache.get(entry) {
            return Ok(d);
        }
        let cb = self.cluster_bits;
        let cs = 1usize << cb;
        let d = L2Entry::standard(entry).compressed(cb);
        let len = d.byte_len().min(2 * cs as u64);
        // As QEMU: whatever of the descriptor's range lies past the end of
        // the file reads as zeroes, and the data is good when it
        // decompresses to a whole cluster (the size field may overstate it).
        let mut src = vec![0u8; len as usize];
        self.file.event(DebugEvent::ReadCompressed);
        self.file
            .read_at(&mut src, d.offset)
            .map_err(ioerr("read compressed cluster", self.name))?;
        let mut out = vec![0u8; cs];
        let ok = match self.compression {
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
                    "{}: compressed cluster for guest offset {guest:#x} does not decompress",
                    self.name
                ),
                std::io::Error::from_raw_os_error(libc::EIO),
            ));
        }
        let out: Arc<[u8]> = out.into();
        self.zcache.put(entry, Arc::clone(&out), self.zgen);
        Ok(out)
    }

    /// Writes what `plan` puts in the file: the base of each filled region
    /// read first, then every piece, runs adjacent in the file as one
    /// vectored write. Returns the bytes written.
    pub(crate) fn write(&self, plan: &WritePlan, buf: &[u8]) -> Result<u64> {
        // Regions that need a buffer of their own.
        let mut owned: SmallVec<[Vec<u8>; 2]> = SmallVec::new();
        let mut pieces: SmallVec<[(u64, usize, Range<usize>); 8]> = SmallVec::new();
        const CALLER: usize = usize::MAX;
        for (h, r) in &plan.direct {
            if let Some(c) = self.crypt {
                // Ciphertext for this place in the file.
                let mut b = buf[r.clone()].to_vec();
                c.encrypt(*h, plan.offset + r.start as u64, &mut b, self.name)?;
                pieces.push((*h, owned.len(), 0..b.len()));
                owned.push(b);
                continue;
            }
            pieces.push((*h, CALLER, r.clone()));
        }
        for f in &plan.fills {
            // Guest offset of the region.
            let guest = f.cg + (f.host - f.new.host_offset());
            if f.base.is_none() && f.data_at == 0 && f.data.len() == f.len && self.crypt.is_none() {
                pieces.push((f.host, CALLER, f.data.clone()));
                continue;
            }
            let mut region = vec![0u8; f.len];
            if let Some(base) = &f.base {
                self.file.event(DebugEvent::CowRead);
                self.read(base, &mut region, guest)?;
            }
            region[f.data_at..f.data_at + f.data.len()].copy_from_slice(&buf[f.data.clone()]);
            if let Some(c) = self.crypt {
                c.encrypt(f.host, guest, &mut region, self.name)?;
            }
            pieces.push((f.host, owned.len(), 0..f.len));
            owned.push(region);
        }
        pieces.sort_unstable_by_key(|p| p.0);
        let bytes = |p: &(u64, usize, Range<usize>)| -> &[u8] {
            if p.1 == CALLER {
                &buf[p.2.clone()]
            } else {
                &owned[p.1][p.2.clone()]
            }
        };
        // As QEMU: a data write, and one that carries copied-on-write
        // regions along is a COW write too (one I/O, two events).
        self.file.event(DebugEvent::WriteAio);
        if plan.fills.iter().any(|f| f.base.is_some()) {
            self.file.event(DebugEvent::CowWrite);
        }
        let mut total = 0u64;
        let mut i = 0;
        while i < pieces.len() {
            let start = pieces[i].0;
            let mut end = start + pieces[i].2.len() as u64;
            let mut j = i + 1;
            while j < pieces.len() && pieces[j].0 == end {
                end += pieces[j].2.len() as u64;
                j += 1;
            }
            let run: SmallVec<[&[u8]; 8]> = pieces[i..j].iter().map(bytes).collect();
            if run.len() == 1 {
                self.data.write_at(run[0], start)
            } else {
                self.data.write_vectored_at(&run, start)
            }
            .map_err(ioerr("write data", self.name))?;
            total += end - start;
            i = j;
        }
        Ok(total)
    }
}

impl Inner {
    /// Splits `[in_c, in_c+n)` of a cluster with entry `e` into runs of equal type.
    pub(crate) fn segments(&self, e: L2Entry, in_c: u64, n: u64) -> SmallVec<[Segment; 4]> {
        let ext = self.geo.extended_l2;
        if !ext || e.is_compressed() {
            return smallvec::smallvec![(e.subcluster_type_in(ext, 0, self.df), in_c, n)];
        }
        let sub = self.geo.subcluster_size();
        let mut out: SmallVec<[Segment; 4]> = SmallVec::new();
        let mut pos = in_c;
        let end = in_c + n;
        while pos < end {
            let sc = (pos / sub) as u32;
            let t = e.subcluster_type_in(true, sc, self.df);
            let seg_end = ((sc as u64 + 1) * sub).min(end);
            match out.last_mut() {
                Some((lt, _, len)) if *lt == t => *len += seg_end - pos,
                _ => out.push((t, pos, seg_end - pos)),
            }
            pos = seg_end;
        }
        out
    }

    /// What carrying out a plan made now needs.
    pub(crate) fn io(&self) -> Io<'_> {
        Io {
            file: &*self.file,
            backing: self.backing.as_deref(),
            zcache: &self.sh.zcache,
            zgen: self.sh.zcache.generation(),
            compression: self.header.compression(),
            cluster_bits: self.geo.cluster_bits,
            name: &self.name,
            crypt: self.crypt.as_deref(),
            data: self.data.as_deref().unwrap_or(&*self.file),
        }
    }

    /// Appends to `plan` where the bytes of guest `[offset, offset+len)`
    /// are, the first going to buffer position `at` (range validated). An
    /// invalid entry marks the image corrupt and fails.
    pub(crate) fn plan_read(
        &mut self,
        offset: u64,
        len: usize,
        at: usize,
        plan: &mut ReadPlan,
    ) -> Result<()> {
        for (cg, in_c, done, n) in cluster_pieces(offset, len, self.geo.cluster_size()) {
            let e = self.l2_entry(cg + in_c)?;
            for (t, s, l) in self.segments(e, in_c, n as u64) {
                let src = self.source(e, t, cg, s)?;
                push_seg(
                    plan,
                    Seg {
                        src,
                        at: at + done + (s - in_c) as usize,
                        len: l as usize,
                    },
                );
            }
        }
        Ok(())
    }

    /// Where bytes of type `t` at `in_c` of the cluster at guest `cg` with
    /// entry `e` come from.
    fn source(&mut self, e: L2Entry, t: SubclusterType, cg: u64, in_c: u64) -> Result<Src> {
        Ok(match t {
            SubclusterType::Normal => Src::Host(e.host_offset() + in_c),
            SubclusterType::ZeroAlloc | SubclusterType::ZeroPlain => Src::Zero,
            SubclusterType::UnallocatedAlloc | SubclusterType::UnallocatedPlain => {
                if self.backing.is_some() {
                    Src::Backing(cg + in_c)
                } else {
                    Src::Zero
                }
            }
            SubclusterType::Compressed => {
                let d = e.compressed(self.geo.cluster_bits);
                if d.offset < self.geo.cluster_size() {
                    let msg = format!(
                        "{}: compressed cluster for guest offset {cg:#x} lies on the header",
                        self.name
                    );
                    self.mark_corrupt();
                    return Err(Error::Corrupt(msg));
                }
                Src::Compressed {
                    entry: e.raw,
                    guest: cg,
                    in_c,
                }
            }
            SubclusterType::Invalid => {
                let msg = format!(
                    "{}: invalid subcluster bitmap {:#x} for guest offset {cg:#x}",
                    self.name, e.bitmap
                );
                self.mark_corrupt();
                return Err(Error::Corrupt(msg));
            }
        })
    }

    /// Reads guest data under the lock (range already validated).
    pub(crate) fn read(&mut self, offset: u64, buf: &mut [u8]) -> Result<()> {
        if self.crypt.is_some() && !crypt::aligned(offset, buf.len() as u64) {
            let w = crypt::widen(offset, buf.len() as u64);
            let mut whole = vec![0u8; (w.end - w.start) as usize];
            self.read(w.start, &mut whole)?;
            let at = (offset - w.start) as usize;
            buf.copy_from_slice(&whole[at..at + buf.len()]);
            return Ok(());
        }
        self.check_key()?;
        let mut plan = ReadPlan::new();
        self.plan_read(offset, buf.len(), 0, &mut plan)?;
        self.io().read(&plan, buf, offset)
    }

    /// Writes guest data under the lock (range validated, image writable).
    pub(crate) fn write(&mut self, offset: u64, buf: &[u8]) -> Result<()> {
        if self.crypt.is_some() && !crypt::aligned(offset, buf.len() as u64) {
            // Whole sectors only: the rest of the edge sectors as they read now.
            let w = crypt::widen(offset, buf.len() as u64);
            let mut whole = vec![0u8; (w.end - w.start) as usize];
            self.read(w.start, &mut whole)?;
            let at = (offset - w.start) as usize;
            whole[at..at + buf.len()].copy_from_slice(buf);
            return self.write(w.start, &whole);
        }
        let mut plan = WritePlan::default();
        let r = self
            .plan_write(offset, buf.len(), &mut plan)
            .and_then(|()| {
                let n = self.io().write(&plan, buf)?;
                self.data_written(n);
                Ok(self.sh.dur.wrote())
            });
        match r {
            Ok(gen) => self.publish(&mut plan, gen),
            Err(e) => {
                self.abandon(&mut plan);
                Err(e)
            }
        }
    }

    /// Plans a write of `len` bytes at guest `offset` (range validated,
    /// image writable, the caller holds the range lock of its clusters):
    /// allocates what it fills, checks every host range against metadata.
    /// On failure the caller abandons what was planned.
    pub(crate) fn plan_write(
        &mut self,
        offset: u64,
        len: usize,
        plan: &mut WritePlan,
    ) -> Result<()> {
        plan.offset = offset;
        for (cg, in_c, done, n) in cluster_pieces(offset, len, self.geo.cluster_size()) {
            self.plan_write_cluster(cg, in_c, done..done + n, plan)?;
        }
        Ok(())
    }

    /// Where the part `[in_c, in_c+n)` of a guest cluster with entry `e`
    /// is written in place: a data cluster of its own (never shared, not
    /// compressed, not a zero cluster) with data in every touched
    /// subcluster. `None`: a write there fills the cluster anew
    /// (allocation or copy-on-write).
    pub(crate) fn in_place_host(&self, e: L2Entry, in_c: u64, n: u64) -> Option<u64> {
        let host = e.host_offset();
        // With an external data file every allocated cluster is the
        // guest's own (host = guest), never shared.
        let reuse = if self.df {
            e.has_host(true)
        } else {
            !e.is_compressed() && host != 0 && e.copied()
        };
        if !reuse {
            return None;
        }
        if self.geo.extended_l2 {
            let sub = self.geo.subcluster_size();
            let all_normal = (in_c / sub..(in_c + n).div_ceil(sub))
                .all(|s| e.subcluster_type_in(true, s as u32, self.df) == SubclusterType::Normal);
            all_normal.then_some(host + in_c)
        } else {
            (!e.zero_flag()).then_some(host + in_c)
        }
    }

    /// Whether a write of `len` bytes at guest `offset` (range validated)
    /// goes entirely into clusters it writes in place: then
    /// [`Inner::plan_write`] allocates nothing and changes no entry.
    pub(crate) fn writes_in_place(&mut self, offset: u64, len: usize) -> Result<bool> {
        for (cg, in_c, _, n) in cluster_pieces(offset, len, self.geo.cluster_size()) {
            let e = self.l2_entry(cg)?;
            if self.in_place_host(e, in_c, n as u64).is_none() {
                return Ok(false);
            }
        }
        Ok(true)
    }

    /// Plans the part `data` of the request that lands at `in_c` inside the
    /// guest cluster at `cg`.
    fn plan_write_cluster(
        &mut self,
        cg: u64,
        in_c: u64,
        data: Range<usize>,
        plan: &mut WritePlan,
    ) -> Result<()> {
        let cs = self.geo.cluster_size();
        let ext = self.geo.extended_l2;
        let n = data.len() as u64;
        self.ensure_l2_table(cg)?;
        let e = self.l2_entry(cg)?;
        let host = e.host_offset();
        // With an external data file every allocated cluster is the
        // guest's own (host = guest), never shared: always written in place.
        let reuse = if self.df {
            e.has_host(true)
        } else {
            !e.is_compressed() && host != 0 && e.copied()
        };
        if !self.df && host != 0 && !self.within_file(host)? {
            // A data cluster past the end of the file is not ours to write.
            let msg = format!(
                "{}: data cluster {host:#x} for guest offset {cg:#x} lies past the end of the file",
                self.name
            );
            self.mark_corrupt();
            return Err(Error::Corrupt(msg));
        }
        if let Some(h) = self.in_place_host(e, in_c, n) {
            // A data cluster of its own, every touched subcluster holding
            // data: written in place.
            self.data_overlap_check(h, n)?;
            plan.direct.push((h, data));
            return Ok(());
        }
        if ext && !e.is_compressed() {
            // Only the touched subclusters are written and marked allocated.
            let sub = self.geo.subcluster_size();
            let s0 = in_c / sub;
            let s1 = (in_c + n).div_ceil(sub);
            let (start, end) = (s0 * sub, s1 * sub);
            let partial = start != in_c || end != in_c + n;
            // A cluster shared with a snapshot: as QEMU, the copy gets the
            // span from the first allocated subcluster (or the write) to
            // the last one (or the write's end) as it reads now, and that
            // whole span is allocated in the new entry.
            let whole = !self.df && host != 0 && !reuse;
            let (r0, r1) = if whole {
                let alloc = (e.bitmap & 0xffff_ffff) as u32;
                let spc = (cs / sub) as u32;
                let first = (s0 as u32).min(alloc.trailing_zeros());
                let last =
                    (s1 as u32 - 1).max(spc - 1 - (spc - s1 as u32).min(alloc.leading_zeros()));
                (first as u64 * sub, (last as u64 + 1) * sub)
            } else {
                (start, end)
            };
            let base = if whole || partial {
                let mut b = ReadPlan::new();
                self.plan_read(cg + r0, (r1 - r0) as usize, 0, &mut b)?;
                Some(b)
            } else {
                None
            };
            let (new_host, fresh) = if reuse {
                (host, None)
            } else if self.df {
                (cg, None)
            } else {
                let c = self.alloc_clusters(1)?;
                (c * cs, Some(c))
            };
            let mut bitmap = e.bitmap;
            let (b0, b1) = if whole {
                (r0 / sub, r1 / sub)
            } else {
                (s0, s1)
            };
            for s in b0..b1 {
                bitmap |= 1 << s;
                bitmap &= !(1u64 << (32 + s));
            }
            plan.fills.push(Fill {
                cg,
                old: e,
                new: L2Entry {
                    raw: new_host | FLAG_COPIED,
                    bitmap,
                },
                host: new_host + r0,
                len: (r1 - r0) as usize,
                base,
                data_at: (in_c - r0) as usize,
                data,
                fresh,
                release_old: whole,
            });
            return self.data_overlap_check(new_host + r0, r1 - r0);
        }
        // Copy-on-write: the whole cluster with the untouched parts as they
        // read now (a zero cluster keeping its host cluster reads as zeroes).
        let base = if n != cs && !(reuse && e.zero_flag()) {
            let mut b = ReadPlan::new();
            self.plan_read(cg, cs as usize, 0, &mut b)?;
            Some(b)
        } else {
            None
        };
        let (new_host, fresh) = if reuse {
            (host, None)
        } else if self.df {
            (cg, None)
        } else {
            let c = self.alloc_clusters(1)?;
            (c * cs, Some(c))
        };
        let mut raw = (new_host & OFFSET_MASK) | FLAG_COPIED;
        if ext {
            raw &= !1;
        }
        plan.fills.push(Fill {
            cg,
            old: e,
            new: L2Entry {
                raw,
                bitmap: if ext { 0xffff_ffff } else { 0 },
            },
            host: new_host,
            len: cs as usize,
            base,
            data_at: in_c as usize,
            data,
            fresh,
            release_old: !reuse,
        });
        self.data_overlap_check(new_host, cs)
    }

    /// The metadata overlap check before a data write at `host`: none with
    /// an external data file (the data is not in the image file).
    fn data_overlap_check(&mut self, host: u64, len: u64) -> Result<()> {
        if self.df {
            return Ok(());
        }
        self.overlap_check(host, len, "data")
    }

    /// Counts data bytes written outside the metadata paths.
    pub(crate) fn data_written(&self, n: u64) {
        self.sh
            .data_bytes
            .fetch_add(n, std::sync::atomic::Ordering::Relaxed);
    }

    /// Points the L2 entries of the filled clusters at their new data,
    /// written as write number `gen` (entries written to the file only
    /// once it is durable); the old clusters lose their reference after
    /// that. On failure, what was not published is abandoned.
    pub(crate) fn publish(&mut self, plan: &mut WritePlan, gen: u64) -> Result<()> {
        let mut i = 0;
        let r = (|| {
            while i < plan.fills.len() {
                let f = &plan.fills[i];
                let (cg, old, new) = (f.cg, f.old, f.new);
                if new != old {
                    let table = self.ensure_l2_table(cg)?;
                    let release = plan.fills[i].release_old && self.can_free(old)?;
                    self.mark_dirty()?;
                    self.sh.dur.depend_on(gen);
                    self.set_l2_entry(table, cg, new)?;
                    if release {
                        self.free_entry_clusters(old, false);
                    }
                }
                plan.fills[i].fresh = None;
                i += 1;
            }
            Ok(())
        })();
        if r.is_err() {
            plan.fills.drain(..i);
            self.abandon(plan);
        }
        r
    }

    /// Releases the clusters allocated for fills whose entries were never
    /// set (a request that failed): nothing references them.
    pub(crate) fn abandon(&mut self, plan: &mut WritePlan) {
        for f in plan.fills.drain(..) {
            if let Some(c) = f.fresh {
                self.frees.push(c, false);
            }
        }
    }
}
