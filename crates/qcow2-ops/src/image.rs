//! The image handle: open, create, flush, close, and the metadata plumbing
//! (L1, L2 cache, refcounts, ordering) shared by the request paths.

use crate::backing::{Backing, Layer};
use crate::crypt::{self, Crypt};
use crate::datapath::{Io, ReadPlan, Src, WritePlan, ZCache};
use crate::durability::Durability;
use crate::error::{Error, Result};
use crate::frees::Frees;
use crate::meta::{Kind, MetaRanges};
use crate::types::*;
use qcow2_cache::{CacheConfig, SlotId, TableCache};
use qcow2_format::entry::{L1Entry, L2Entry};
use qcow2_format::header::{self, Header};
use qcow2_format::{be64, put_be64, Geometry};
use qcow2_inflight::{RangeLocks, Tickets};
use qcow2_io::{DebugEvent, FileStorage, OpenMode, Storage};
use qcow2_refcount::{RefcountError, Refcounts};
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, RwLock, RwLockReadGuard, RwLockWriteGuard};

mod mapped;
pub use mapped::{MapPiece, MappedRead, MappedWrite};

/// Deferred refcount decrements are applied at the latest when this many wait.
const MAX_PENDING_FREES: usize = 1 << 16;

/// An open qcow2 image. Safe to share between threads: requests run in
/// parallel.
///
/// How requests share the image (lock order top to bottom; nothing takes
/// one higher up while holding one below it):
/// - `gate`: every request holds it shared; operations that change the
///   image's layout (resize, snapshots, bitmap management, amend, repair,
///   backing change) hold it exclusively, so they never meet a request in
///   flight.
/// - `ranges`: a request that changes what guest clusters map to (write,
///   write-zeroes, discard) holds the range lock of its clusters from its
///   L2 lookup until its L2 entries are set: overlapping ones run one after
///   the other, so none loses another's data (QEMU's in-flight allocation
///   list, per cluster).
/// - `inner`: the metadata (L1, L2 cache, refcounts, deferred frees), held
///   for lookups and updates only; data reads and writes, copy-on-write
///   reads, backing reads and decompression run without it (`datapath`).
/// - the shared state's own short locks (tickets, decompressed cluster).
pub struct Image {
    gate: RwLock<()>,
    ranges: RangeLocks,
    inner: Mutex<Inner>,
    sh: Arc<Shared>,
    file: Arc<dyn Storage>,
    name: String,
    cluster_bits: u32,
    /// Every write is made durable before it completes (writethrough, directsync).
    writethrough: bool,
    /// The data cipher of an encrypted image.
    crypt: Option<Arc<Crypt>>,
    /// Where guest data lives: the image file, or its external data file.
    data: Arc<dyn Storage>,
    /// Mutating requests completed so far.
    req_gen: AtomicU64,
    /// `req_gen` as it was when the last successful flush started: every
    /// request up to it is durable. Lets concurrent flushes share one sync.
    flushed_gen: AtomicU64,
}

/// State shared by the metadata paths (under the image lock) and the data
/// paths (outside it).
#[derive(Default)]
pub(crate) struct Shared {
    /// What is durable, and what must be before what.
    pub(crate) dur: Durability,
    /// Requests doing data I/O with mappings looked up at a given stamp.
    pub(crate) tickets: Tickets,
    /// The last decompressed cluster.
    pub(crate) zcache: ZCache,
    /// Data bytes written by requests (added to `Stats::data_bytes_written`).
    pub(crate) data_bytes: AtomicU64,
    /// Nonzero: the errno every write past the header fails with, the
    /// pre-write overlap check being impossible (see
    /// `Inner::inactive_l2_gate`). Enforced by the file itself, so that no
    /// path (cache evictions, refcount blocks, table clears) writes around it.
    pub(crate) write_gate: std::sync::atomic::AtomicI32,
}

/// The image lock held together with the gate, exclusively: no request is
/// in flight (see [`Image`]).
pub(crate) struct Exclusive<'a> {
    g: MutexGuard<'a, Inner>,
    _gate: RwLockWriteGuard<'a, ()>,
}

impl std::ops::Deref for Exclusive<'_> {
    type Target = Inner;
    fn deref(&self) -> &Inner {
        &self.g
    }
}

impl std::ops::DerefMut for Exclusive<'_> {
    fn deref_mut(&mut self) -> &mut Inner {
        &mut self.g
    }
}

/// Everything behind the lock.
pub(crate) struct Inner {
    pub(crate) name: String,
    pub(crate) path: PathBuf,
    pub(crate) file: std::sync::Arc<dyn Storage>,
    pub(crate) header: Header,
    pub(crate) geo: Geometry,
    pub(crate) l1: Vec<u64>,
    pub(crate) l1_dirty: BTreeSet<usize>,
    pub(crate) l2: TableCache,
    pub(crate) refs: Refcounts,
    pub(crate) backing: Option<Backing>,
    pub(crate) opts: OpenOptions,
    pub(crate) read_only: bool,
    /// File length seen by the last fstat (see `within_file`).
    pub(crate) len_seen: u64,
    pub(crate) stats: Stats,
    /// Slices of newly allocated L2 tables that were never cached: on disk
    /// they read as zeroes, so their first load needs no read. A slice
    /// leaves the set when it enters the cache (from then on the file holds
    /// whatever was written back).
    pub(crate) fresh_l2: std::collections::HashSet<u64>,
    /// Whether the image looks metadata-preallocated (decided on first block status).
    pub(crate) metadata_prealloc: Option<bool>,
    /// Host offsets of the L2 tables the L1 table references (overlap checks).
    pub(crate) l2_tables: std::collections::HashSet<u64>,
    /// Persistent dirty bitmaps maintained while open.
    pub(crate) bitmaps: crate::bitmaps::Bitmaps,
    /// Durability, tickets, decompressed cluster (shared with [`Image`]).
    pub(crate) sh: Arc<Shared>,
    /// Host clusters to release once their unreferencing is durable.
    pub(crate) frees: Frees,
    /// errno of a failed sync of the image file (0: none), kept by the
    /// [`qcow2_io::StickySync`] wrapping `file`. What reached the disk is
    /// unknown from then on (the kernel may have dropped the dirty pages), so
    /// every later sync fails with it instead of succeeding over lost data,
    /// as QEMU's file driver does (also like it: not with O_DIRECT).
    pub(crate) sync_failed: std::sync::Arc<std::sync::atomic::AtomicI32>,
    /// Other metadata ranges for the overlap checks (header, L1, snapshot
    /// and bitmap structures); refcount structures live in `refs`.
    pub(crate) meta: MetaRanges,
    /// With [`OpenOptions::overlap_inactive_l2`]: why the snapshot L1
    /// tables could not be read (errno, what), which fails every write.
    pub(crate) inactive_l2_unknown: Option<(i32, String)>,
    /// A corruption found while open read-write marked the image corrupt
    /// (and read-only) through this handle.
    pub(crate) corrupted_here: bool,
    /// Where the next compressed cluster goes (0: a new host cluster).
    pub(crate) free_byte_offset: u64,
    /// The data cipher of an encrypted image (`None`: not encrypted, or
    /// opened for metadata only).
    pub(crate) crypt: Option<Arc<Crypt>>,
    /// How the image is encrypted.
    pub(crate) encryption: Option<crate::types::EncryptionInfo>,
    /// The clusters of the LUKS header.
    pub(crate) crypt_area: Option<std::ops::Range<u64>>,
    /// The image has an external data file (host offset = guest offset,
    /// data clusters not refcounted).
    pub(crate) df: bool,
    /// The external data file (`None`: none, or opened for metadata only).
    pub(crate) data: Option<Arc<dyn Storage>>,
    /// Lazy refcounts in use (see `lazy`): the first L2 entry linked to a
    /// new cluster marks the image dirty, and while it is dirty refcount
    /// blocks are written back only when evicted or when closing.
    pub(crate) lazy: bool,
    /// This open set the dirty bit (close and reopen clear it again).
    pub(crate) dirtied: bool,
    /// What the repair of a dirty image at open found and did.
    pub(crate) open_repair: Option<CheckReport>,
}

impl Image {
    /// Opens the image at `path`.
    pub fn open(path: impl AsRef<Path>, opts: &OpenOptions) -> Result<Image> {
        Ok(Image::from_inner(Inner::open(path.as_ref(), opts)?))
    }

    /// Opens an image held by any storage backend (in-memory, fault-injecting,
    /// counting). `path` names the image in messages and anchors relative
    /// backing file names.
    pub fn open_with_storage(
        storage: Box<dyn qcow2_io::Storage>,
        path: impl AsRef<Path>,
        opts: &OpenOptions,
    ) -> Result<Image> {
        let inner = Inner::open_storage(storage, path.as_ref(), opts)?;
        Ok(Image::from_inner(inner))
    }

    fn from_inner(inner: Inner) -> Image {
        Image {
            crypt: inner.crypt.clone(),
            data: inner
                .data
                .clone()
                .unwrap_or_else(|| Arc::clone(&inner.file)),
            gate: RwLock::new(()),
            ranges: RangeLocks::new(),
            sh: Arc::clone(&inner.sh),
            file: Arc::clone(&inner.file),
            name: inner.name.clone(),
            cluster_bits: inner.geo.cluster_bits,
            writethrough: inner.opts.cache.writethrough(),
            inner: Mutex::new(inner),
            req_gen: AtomicU64::new(0),
            flushed_gen: AtomicU64::new(0),
        }
    }

    /// Creates a new image file at `path` of `size` bytes (an existing file is truncated).
    pub fn create(path: impl AsRef<Path>, size: u64, opts: &CreateOptions) -> Result<()> {
        crate::create::create(path.as_ref(), size, opts)
    }

    pub(crate) fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The image lock with no request in flight, for operations that change
    /// the image's layout.
    pub(crate) fn exclusive(&self) -> Exclusive<'_> {
        let gate = self.gate.write().unwrap_or_else(|e| e.into_inner());
        Exclusive {
            g: self.lock(),
            _gate: gate,
        }
    }

    fn shared(&self) -> RwLockReadGuard<'_, ()> {
        self.gate.read().unwrap_or_else(|e| e.into_inner())
    }

    /// The guest clusters `[offset, offset+len)` touches, locked against
    /// other mutating requests (an out-of-range request is refused later,
    /// under the image lock).
    fn lock_clusters(&self, offset: u64, len: u64) -> qcow2_inflight::RangeGuard<'_> {
        let cb = self.cluster_bits;
        let first = offset >> cb;
        let end = offset.saturating_add(len).saturating_add((1 << cb) - 1) >> cb;
        self.ranges.lock(first, end.max(first + 1))
    }

    /// Virtual size in bytes.
    pub fn virtual_size(&self) -> u64 {
        self.lock().header.size
    }
    /// Whether every write is durable before it completes (writethrough,
    /// directsync).
    pub(crate) fn writethrough(&self) -> bool {
        self.writethrough
    }
    /// Cluster size in bytes.
    pub fn cluster_size(&self) -> u64 {
        1 << self.cluster_bits
    }
    /// Header information.
    pub fn info(&self) -> ImageInfo {
        self.lock().info()
    }
    /// Reads `buf.len()` bytes at guest `offset`. The lookup runs under the
    /// image lock; the reads (host ranges adjacent in the file as one read,
    /// backing file, decompression) run without it.
    pub fn read(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        let _gate = self.shared();
        if self.crypt.is_some() && !crypt::aligned(offset, buf.len() as u64) {
            // Whole sectors only.
            self.lock().check_range(offset, buf.len() as u64)?;
            let w = crypt::widen(offset, buf.len() as u64);
            let mut whole = vec![0u8; (w.end - w.start) as usize];
            self.read_in(w.start, &mut whole)?;
            let at = (offset - w.start) as usize;
            buf.copy_from_slice(&whole[at..at + buf.len()]);
            return Ok(());
        }
        self.read_in(offset, buf)
    }

    /// [`Image::read`] with the gate held.
    fn read_in(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        let mut plan = ReadPlan::new();
        let mut g = self.lock();
        g.check_range(offset, buf.len() as u64)?;
        g.check_key()?;
        g.plan_read(offset, buf.len(), 0, &mut plan)?;
        if plan.iter().all(|s| s.src == Src::Zero) {
            drop(g);
            buf.fill(0);
            return Ok(());
        }
        // No cluster mapped now is released before the ticket is returned.
        let _ticket = self.sh.tickets.take(g.frees.stamp());
        let backing = if plan.iter().any(|s| matches!(s.src, Src::Backing(_))) {
            g.backing.clone()
        } else {
            None
        };
        let io = Io {
            backing: backing.as_deref(),
            ..self.io(&g)
        };
        drop(g);
        io.read(&plan, buf, offset)
    }

    /// The data path's view of the image (`g`: the image lock, held while
    /// the plan to carry out is made).
    fn io(&self, g: &Inner) -> Io<'_> {
        Io {
            file: &*self.file,
            backing: None,
            zcache: &self.sh.zcache,
            zgen: self.sh.zcache.generation(),
            compression: g.header.compression(),
            cluster_bits: self.cluster_bits,
            name: &self.name,
            crypt: self.crypt.as_deref(),
            data: &*self.data,
        }
    }

    /// Writes `buf` at guest `offset`; `flags` may hold [`REQ_FUA`] and
    /// [`REQ_COMPRESSED`] (whole clusters only, see [`Image::write_compressed`]).
    ///
    /// Planned under the image lock (allocations, copy-on-write sources,
    /// metadata overlap checks), written without it, then the L2 entries of
    /// new clusters are set under the lock again; a write into clusters it
    /// owns takes the lock once.
    pub fn write(&self, offset: u64, buf: &[u8], mut flags: u32) -> Result<()> {
        let _gate = self.shared();
        if self.crypt.is_some() {
            // As QEMU: compressed writes to an encrypted image are written
            // normally (compressed data would not be encrypted).
            if flags & REQ_COMPRESSED != 0 {
                self.lock().check_flags(flags, REQ_FUA | REQ_COMPRESSED)?;
                flags &= !REQ_COMPRESSED;
            }
            if !crypt::aligned(offset, buf.len() as u64) {
                // Whole sectors only: the edges as they read now, read and
                // written under the range lock of the widened request.
                {
                    let g = self.lock();
                    g.check_writable()?;
                    g.check_range(offset, buf.len() as u64)?;
                }
                let w = crypt::widen(offset, buf.len() as u64);
                let range = self.lock_clusters(w.start, w.end - w.start);
                let mut whole = vec![0u8; (w.end - w.start) as usize];
                self.read_in(w.start, &mut whole)?;
                let at = (offset - w.start) as usize;
                whole[at..at + buf.len()].copy_from_slice(buf);
                return self.write_in(range, w.start, &whole, flags);
            }
        }
        let range = self.lock_clusters(offset, buf.len() as u64);
        self.write_in(range, offset, buf, flags)
    }

    /// [`Image::write`] with the gate and the range lock held.
    fn write_in(
        &self,
        range: qcow2_inflight::RangeGuard<'_>,
        offset: u64,
        buf: &[u8],
        flags: u32,
    ) -> Result<()> {
        let mut g = self.lock();
        g.check_flags(flags, REQ_FUA | REQ_COMPRESSED)?;
        g.check_writable()?;
        g.check_range(offset, buf.len() as u64)?;
        g.mark_bitmaps(offset, buf.len() as u64);
        if flags & REQ_COMPRESSED != 0 {
            let r = g.write_compressed(offset, buf);
            return self.complete(g, range, r, flags);
        }
        let mut plan = WritePlan::default();
        if let Err(e) = g.plan_write(offset, buf.len(), &mut plan) {
            g.abandon(&mut plan);
            return self.complete(g, range, Err(e), flags);
        }
        let backing = if plan.in_place() {
            None
        } else {
            g.backing.clone()
        };
        let io = Io {
            backing: backing.as_deref(),
            ..self.io(&g)
        };
        drop(g);
        let r = io.write(&plan, buf);
        if let Ok(n) = r {
            self.sh.data_bytes.fetch_add(n, Ordering::Relaxed);
        }
        if plan.in_place() {
            // Nothing to publish: the write is complete once it is numbered
            // (an empty one wrote nothing a flush would have to sync). A
            // failed one may have reached the file in part: the next flush
            // syncs it, as QEMU's does after any write request.
            if r.as_ref().map_or(true, |&n| n > 0) {
                self.sh.dur.wrote();
            }
            drop(range);
            self.req_gen.fetch_add(1, Ordering::SeqCst);
            r?;
            if self.writethrough || flags & REQ_FUA != 0 {
                self.flush()?;
            }
            return Ok(());
        }
        let gen = self.sh.dur.wrote();
        let mut g = self.lock();
        let r = match r {
            Ok(_) => g.publish(&mut plan, gen),
            Err(e) => {
                g.abandon(&mut plan);
                Err(e)
            }
        };
        self.complete(g, range, r, flags)
    }

    /// Ends a mutating request: bookkeeping under the lock, then the flush
    /// writethrough or FUA asks for, after every lock is released (so that
    /// concurrent flushes share one sync).
    fn complete(
        &self,
        mut g: MutexGuard<'_, Inner>,
        range: qcow2_inflight::RangeGuard<'_>,
        r: Result<()>,
        flags: u32,
    ) -> Result<()> {
        self.req_gen.fetch_add(1, Ordering::SeqCst);
        let flush = g.finish_request(r, flags);
        drop(g);
        drop(range);
        if flush? {
            self.flush()?;
        }
        Ok(())
    }

    /// Writes whole clusters compressed with the image's compression type,
    /// as QEMU's `write -c`: `offset` and the length cluster aligned (the
    /// last cluster of the image may be short), else [`Error::Invalid`];
    /// a cluster that does not compress is written normally; a cluster
    /// that has a host cluster is not replaced (EIO, as QEMU).
    pub fn write_compressed(&self, offset: u64, buf: &[u8]) -> Result<()> {
        self.write(offset, buf, REQ_COMPRESSED)
    }
    /// Zeroes `len` bytes at `offset` with QEMU's semantics; flags [`REQ_MAY_UNMAP`],
    /// [`REQ_FUA`], [`REQ_NO_FALLBACK`].
    pub fn write_zeroes(&self, offset: u64, len: u64, flags: u32) -> Result<()> {
        let _gate = self.shared();
        let range = self.lock_clusters(offset, len);
        let mut g = self.lock();
        g.check_flags(flags, REQ_KNOWN)?;
        g.check_writable()?;
        g.check_range(offset, len)?;
        g.mark_bitmaps(offset, len);
        let r = g
            .zero_raw_data_file(offset, len)
            .and_then(|()| g.write_zeroes(offset, len, flags));
        self.complete(g, range, r, flags)
    }
    /// Discards whole clusters in the range (partial clusters: no-op).
    pub fn discard(&self, offset: u64, len: u64) -> Result<()> {
        let _gate = self.shared();
        let range = self.lock_clusters(offset, len);
        let mut g = self.lock();
        g.check_writable()?;
        g.check_range(offset, len)?;
        if g.opts.discard != DiscardMode::Ignore {
            // As QEMU: a discard ignored by the open options changes nothing.
            g.mark_bitmaps(offset, len);
        }
        let r = g.discard(offset, len);
        self.complete(g, range, r, 0)
    }
    /// Writes back caches and syncs (per cache mode).
    pub fn flush(&self) -> Result<()> {
        // Everything completed before this call must become durable.
        let target = self.req_gen.load(Ordering::SeqCst);
        let mut g = self.lock();
        // First: a read-only image (possibly one turned read-only after a
        // corruption) must not hide a failed sync either.
        g.check_sync_failed()?;
        if g.read_only {
            return Ok(());
        }
        if self.flushed_gen.load(Ordering::SeqCst) >= target && target > 0 {
            // A flush that started after our requests completed has finished.
            return Ok(());
        }
        let start = self.req_gen.load(Ordering::SeqCst);
        // Write everything back in crash-safe order (ordering syncs included)
        // under the lock; the final, durability sync runs without it so that
        // other requests proceed meanwhile and concurrent flushes overlap.
        if let Err(e) = g.flush_all(false) {
            if let Error::Corrupt(_) = e {
                g.mark_corrupt();
            }
            return Err(e);
        }
        if !g.sh.dur.needs_sync() || g.opts.cache == CacheMode::Unsafe {
            if g.sh.dur.needs_sync() {
                g.sync()?;
            }
            self.flushed_gen.fetch_max(start, Ordering::SeqCst);
            return Ok(());
        }
        let seen = self.sh.dur.sync_start();
        drop(g);
        let r = crate::writeback::sync_files(&*self.file, &*self.data);
        let mut g = self.lock();
        g.stats.file_syncs += 1;
        g.note_sync(r)?;
        // A concurrent sync may have failed meanwhile: ours then proves nothing.
        g.check_sync_failed()?;
        drop(g);
        self.sh.dur.synced_to(seen);
        self.flushed_gen.fetch_max(start, Ordering::SeqCst);
        Ok(())
    }
    /// Allocation status of `[offset, offset+len)`, merged like `qemu-img map`.
    pub fn block_status(&self, offset: u64, len: u64) -> Result<Vec<MapEntry>> {
        let mut g = self.lock();
        g.check_range(offset, len)?;
        g.map_range(offset, len)
    }
    /// At most `max` extents of `[offset, offset+len)` from its start (the
    /// walk stops once they are known); continue from the end of the last.
    pub fn block_status_limit(&self, offset: u64, len: u64, max: usize) -> Result<Vec<MapEntry>> {
        let mut g = self.lock();
        g.check_range(offset, len)?;
        g.map_range_limit(offset, len, max)
    }
    /// The whole map, equal to `qemu-img map --output=json`.
    pub fn map(&self) -> Result<Vec<MapEntry>> {
        let mut g = self.lock();
        let size = g.header.size;
        g.map_range(0, size)
    }
    /// Checks (and optionally repairs) metadata consistency.
    pub fn check(&self, repair: RepairMode) -> Result<CheckReport> {
        self.check_with_progress(repair, &mut |_, _| {})
    }

    /// [`Image::check`], telling `progress` how far the walk of the active
    /// L2 tables is: `(done, total)` tables (a repair walks them twice).
    pub fn check_with_progress(
        &self,
        repair: RepairMode,
        progress: &mut dyn FnMut(u64, u64),
    ) -> Result<CheckReport> {
        let mut g = self.exclusive();
        if repair != RepairMode::None {
            g.check_writable()?;
            g.flush_close()?;
            // A repair may change refcounts: compressed data starts afresh.
            g.free_byte_offset = 0;
        }
        let r = crate::check::check(&mut g, repair, progress);
        // A repair may have reloaded the refcount structures.
        g.protect_in_refcounts();
        let r = r?;
        if repair != RepairMode::None && r.corruptions == 0 && r.check_errors == 0 {
            // As QEMU: a repair that leaves no error marks the image clean
            // (refcounts exact on disk again) and consistent.
            g.mark_clean_always()?;
            if repair == RepairMode::All && g.header.is_corrupt() {
                g.set_incompat_bit(header::INCOMPAT_CORRUPT, false)?;
            }
        }
        Ok(r)
    }
    /// Counters since open or the last reset.
    pub fn stats(&self) -> Stats {
        self.lock().stats()
    }
    /// Resets the counters.
    pub fn reset_stats(&self) {
        let mut g = self.lock();
        g.stats = Stats::default();
        self.sh.data_bytes.store(0, Ordering::Relaxed);
        g.l2.stats = Default::default();
        g.refs.reset_stats();
    }
    /// Flushes and closes.
    pub fn close(self) -> Result<()> {
        let mut g = self.lock();
        g.check_sync_failed()?;
        if g.read_only {
            return Ok(());
        }
        g.flush_close()?;
        g.store_bitmaps()?;
        g.mark_clean()
    }

    /// Whether a corruption found while the image was open read-write
    /// marked it corrupt through this handle (it is read-only since). QEMU
    /// makes such a device unusable ("No medium found" for every request).
    pub fn corrupted_here(&self) -> bool {
        self.lock().corrupted_here
    }

    /// Whether L2 table slices or L1 entries wait to be written (what
    /// the next flush or close writes besides refcount blocks).
    pub fn tables_dirty(&self) -> bool {
        let g = self.lock();
        g.l2.is_dirty() || !g.l1_dirty.is_empty()
    }

    /// What the repair of a dirty image at open (refcounts left stale by
    /// lazy refcounts and a crash) found and did, as qemu-img check reports
    /// it (QEMU prints these messages on open); `None` when nothing was
    /// repaired.
    pub fn open_repair(&self) -> Option<CheckReport> {
        self.lock().open_repair.clone()
    }
}

impl Drop for Image {
    fn drop(&mut self) {
        let g = self.inner.get_mut().unwrap_or_else(|e| e.into_inner());
        if !g.read_only {
            let _ = g.flush_close();
            let _ = g.store_bitmaps();
            let _ = g.mark_clean();
        }
    }
}

/// Opens the backing chain of the image at `image`: a qcow2 layer is an
/// [`Image`] opened read-only.
pub(crate) fn open_backing(
    image: &Path,
    name: &[u8],
    format: Option<&str>,
    key: Option<&Secret>,
) -> Result<Backing> {
    crate::backing::open(image, name, format, |file, path| {
        let opts = OpenOptions {
            key_secret: key.cloned(),
            ..OpenOptions::read_only()
        };
        let inner = Inner::open_storage(file, path, &opts)?;
        Ok(Arc::new(Image::from_inner(inner)) as Backing)
    })
}

impl Layer for Image {
    fn size(&self) -> u64 {
        self.virtual_size()
    }
    fn read_within(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        self.read(offset, buf)
    }
    fn status_into(
        &self,
        offset: u64,
        len: u64,
        depth: u32,
        limit: usize,
        out: &mut Vec<MapEntry>,
    ) -> Result<()> {
        self.lock().status_into(offset, len, depth, limit, out)
    }
}

pub(crate) use crate::error::ioerr;

/// The image file as the engine writes it: a write that fails may have
/// reached the file in part, so the next flush syncs, as QEMU's does after
/// any write to a file (a persistent error shows there too).
/// It also refuses, while `Shared::write_gate` is set, every write past
/// the header (QEMU's header writes are not overlap-checked either); a
/// refused write never reached the file, so it asks for no sync.
struct FailedWrites<S> {
    inner: S,
    sh: Arc<Shared>,
    /// The header cluster's end.
    header_end: u64,
}

impl<S: Storage> FailedWrites<S> {
    fn note<T>(&self, r: std::io::Result<T>) -> std::io::Result<T> {
        if r.is_err() {
            self.sh.dur.wrote();
        }
        r
    }

    fn gate(&self, offset: u64) -> std::io::Result<()> {
        match self.sh.write_gate.load(Ordering::Relaxed) {
            0 => Ok(()),
            _ if offset < self.header_end => Ok(()),
            errno => Err(std::io::Error::from_raw_os_error(errno)),
        }
    }
}

impl<S: Storage> Storage for FailedWrites<S> {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
        self.inner.read_at(buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> std::io::Result<()> {
        self.gate(offset)?;
        self.note(self.inner.write_at(buf, offset))
    }
    fn write_vectored_at(&self, bufs: &[&[u8]], offset: u64) -> std::io::Result<()> {
        self.gate(offset)?;
        self.note(self.inner.write_vectored_at(bufs, offset))
    }
    fn sync(&self) -> std::io::Result<()> {
        self.inner.sync()
    }
    fn punch_hole(&self, offset: u64, len: u64) -> std::io::Result<bool> {
        self.gate(offset)?;
        self.note(self.inner.punch_hole(offset, len))
    }
    fn len(&self) -> std::io::Result<u64> {
        self.inner.len()
    }
    fn set_len(&self, len: u64) -> std::io::Result<()> {
        self.gate(len)?;
        self.note(self.inner.set_len(len))
    }
    fn next_data(&self, offset: u64) -> std::io::Result<Option<u64>> {
        self.inner.next_data(offset)
    }
    fn next_hole(&self, offset: u64) -> std::io::Result<u64> {
        self.inner.next_hole(offset)
    }
    fn allocated_size(&self) -> std::io::Result<Option<u64>> {
        self.inner.allocated_size()
    }
    fn raw_file(&self) -> Option<qcow2_io::RawFile> {
        self.inner.raw_file()
    }
    fn event(&self, ev: DebugEvent) {
        self.inner.event(ev)
    }
}

impl Inner {
    fn open(path: &Path, opts: &OpenOptions) -> Result<Inner> {
        let name = path.display().to_string();
        let file = FileStorage::open(
            path,
            OpenMode {
                writable: opts.writable,
                direct: opts.cache.direct(),
                create: false,
            },
        )
        .map_err(|e| Error::io(format!("could not open '{name}'"), e))?;
        Self::open_storage(Box::new(file), path, opts)
    }

    pub(crate) fn open_storage(
        file: Box<dyn Storage>,
        path: &Path,
        opts: &OpenOptions,
    ) -> Result<Inner> {
        let name = path.display().to_string();
        let file_len = file.len().map_err(ioerr("stat", &name))?;
        let mut first = vec![0u8; (2u64 << 20).min(file_len.max(512)) as usize];
        file.read_at(&mut first, 0)
            .map_err(ioerr("read header", &name))?;
        let header = Header::parse(&first, file_len).map_err(|e| match e {
            qcow2_format::FormatError::Truncated(_) | qcow2_format::FormatError::BadMagic => {
                Error::Invalid(format!("'{name}' is not a qcow2 image: {e}"))
            }
            e => Error::BadHeader {
                image: name.clone(),
                source: e,
            },
        })?;
        let crypto = crate::crypt::open(&*file, &header, file_len, &name, opts)?;
        let data = crate::datafile::open(path, &header, &name, opts)?;
        let has_df = header.has_data_file();
        let geo = header.geometry();
        let read_only = !opts.writable || opts.metadata_only;
        let lazy = opts.lazy_refcounts.unwrap_or(header.lazy_refcounts());
        if lazy && header.version < 3 {
            return Err(Error::Invalid(
                "Lazy refcounts require a qcow2 image with at least qemu 1.1 compatibility level"
                    .into(),
            ));
        }
        if header.is_corrupt() && opts.writable && !opts.for_repair {
            return Err(Error::Corrupt(format!(
                "'{name}' is marked corrupt; repair it with 'qcow2 check -r all' or open it read-only"
            )));
        }
        let mut raw = vec![0u8; header.l1_size as usize * 8];
        file.read_at(&mut raw, header.l1_table_offset)
            .map_err(ioerr("read L1 table", &name))?;
        let cs = geo.cluster_size();
        let l1: Vec<u64> = raw.chunks_exact(8).map(|c| be64(c, 0)).collect();
        for (i, &e) in l1.iter().enumerate() {
            let e = L1Entry(e);
            if e.l2_offset() & (cs - 1) != 0 {
                return Err(Error::Corrupt(format!(
                    "'{name}': L2 table offset {:#x} of L1 entry {i} is not cluster aligned",
                    e.l2_offset()
                )));
            }
        }
        let granularity = opts.dirty_granularity.clamp(512, 1 << 21);
        let refs = Refcounts::load(
            &*file,
            header.cluster_bits,
            header.refcount_order,
            header.refcount_table_offset,
            header.refcount_table_clusters,
            opts.refcount_cache_bytes,
            granularity,
        )
        .map_err(|e| refcount_err(&name, e))?;
        let slice = cs.min(64 << 10) as usize;
        let l2 = TableCache::new(CacheConfig {
            slice_size: slice,
            capacity: (opts.l2_cache_bytes / slice).max(4),
            granularity,
            load_event: Some(DebugEvent::L2Load),
            write_event: Some(DebugEvent::L2Update),
        });
        let backing = if opts.open_backing {
            match &header.backing_file {
                Some(b) => Some(open_backing(
                    path,
                    b,
                    opts.backing_driver
                        .clone()
                        .or_else(|| header.backing_format())
                        .as_deref(),
                    opts.backing_key_secret.as_ref(),
                )?),
                None => None,
            }
        } else {
            None
        };
        // Every sync of the file, including those of the refcount layer
        // and of check, goes through the sticky failure state.
        let file = qcow2_io::StickySync::new(file, !opts.cache.direct());
        let sync_failed = file.failed_errno();
        let sh = Arc::new(Shared::default());
        let file = FailedWrites {
            inner: file,
            sh: Arc::clone(&sh),
            header_end: cs,
        };
        let mut me = Inner {
            name,
            path: path.to_path_buf(),
            file: std::sync::Arc::new(file),
            header,
            geo,
            l1,
            l1_dirty: BTreeSet::new(),
            l2,
            refs,
            backing,
            opts: opts.clone(),
            read_only,
            len_seen: 0,
            stats: Stats::default(),
            free_byte_offset: 0,
            fresh_l2: Default::default(),
            metadata_prealloc: None,
            l2_tables: Default::default(),
            bitmaps: Default::default(),
            sh,
            frees: Frees::default(),
            sync_failed,
            meta: MetaRanges::default(),
            inactive_l2_unknown: None,
            corrupted_here: false,
            crypt: crypto.crypt,
            encryption: crypto.info,
            crypt_area: crypto.area,
            df: has_df,
            data,
            lazy,
            dirtied: false,
            open_repair: None,
        };
        me.l2_tables = me
            .l1
            .iter()
            .map(|&e| L1Entry(e).l2_offset())
            .filter(|&o| o != 0)
            .collect();
        let l1 = me.header.l1_table_offset;
        me.meta.replace(
            0,
            [
                (0..cs, Kind::Header),
                (
                    l1..l1.saturating_add(me.l1.len() as u64 * 8),
                    Kind::ActiveL1,
                ),
            ],
        );
        if let Some(a) = me.crypt_area.clone() {
            me.meta
                .replace(Kind::CryptoHeader.bit(), [(a, Kind::CryptoHeader)]);
        }
        me.protect_in_refcounts();
        me.refresh_snapshot_ranges()?;
        me.refresh_bitmap_ranges()?;
        if !me.read_only && me.header.is_dirty() && !opts.for_repair {
            // Lazy refcounts were not written back: repair them, as QEMU
            // does (what it found and did is kept for `open_repair`).
            let (first_errors, r) =
                crate::check::check_passes(&mut me, RepairMode::All, &mut |_, _| {})?;
            if r.corruptions > 0 || r.check_errors > 0 || first_errors > 0 {
                return Err(Error::DirtyRepair {
                    messages: r.messages,
                });
            }
            me.set_incompat_bit(header::INCOMPAT_DIRTY, false)?;
            // The repair reloaded the refcount structures.
            me.protect_in_refcounts();
            me.open_repair = Some(r);
        }
        me.open_bitmaps()?;
        Ok(me)
    }

    pub(crate) fn info(&self) -> ImageInfo {
        let h = &self.header;
        ImageInfo {
            virtual_size: h.size,
            cluster_size: h.cluster_size(),
            version: h.version,
            refcount_bits: h.refcount_bits(),
            extended_l2: h.extended_l2(),
            lazy_refcounts: h.lazy_refcounts(),
            compression_type: h.compression().name(),
            corrupt: h.is_corrupt(),
            dirty: h.is_dirty(),
            backing_file: h.backing_file.clone(),
            backing_format: h.backing_format(),
            full_backing_file: h.backing_file.as_ref().map(|b| {
                use std::os::unix::ffi::OsStringExt;
                crate::backing::resolve(&self.path, b)
                    .into_os_string()
                    .into_vec()
            }),
            data_file: h.data_file(),
            data_file_raw: h.has_data_file()
                && h.autoclear_features & header::AUTOCLEAR_DATA_FILE_RAW != 0,
            file_length: self.file.len().unwrap_or(0),
            snapshots: h.nb_snapshots,
            encryption: self.encryption.clone(),
        }
    }

    pub(crate) fn stats(&self) -> Stats {
        let mut s = self.stats;
        let l2 = self.l2.stats;
        let rc = self.refs.cache_stats();
        s.l2_hits = l2.hits;
        s.l2_misses = l2.misses;
        s.l2_dirty_marks = l2.dirty_marks;
        s.l2_writebacks = l2.writebacks;
        s.l2_bytes_written = l2.bytes_written;
        s.refblock_dirty_marks = rc.dirty_marks;
        s.refblock_writebacks = rc.writebacks;
        s.refblock_bytes_written = rc.bytes_written;
        s.data_bytes_written += self.sh.data_bytes.load(Ordering::Relaxed);
        s
    }

    fn check_flags(&self, flags: u32, allowed: u32) -> Result<()> {
        if flags & !allowed != 0 {
            return Err(Error::Invalid(format!(
                "unknown request flags {:#x}",
                flags & !allowed
            )));
        }
        Ok(())
    }

    /// Fails when the data of an encrypted image cannot be read (opened
    /// for metadata only).
    pub(crate) fn check_key(&self) -> Result<()> {
        if self.encryption.is_some() && self.crypt.is_none() {
            return Err(Error::Key(format!(
                "'{}': opened without its key: the data cannot be read",
                self.name
            )));
        }
        Ok(())
    }

    pub(crate) fn check_writable(&self) -> Result<()> {
        if self.read_only {
            return Err(Error::ReadOnly(self.name.clone()));
        }
        Ok(())
    }

    pub(crate) fn check_range(&self, offset: u64, len: u64) -> Result<()> {
        match offset.checked_add(len) {
            Some(end) if end <= self.header.size => Ok(()),
            _ => Err(Error::Invalid(format!(
                "request at {offset} of {len} bytes is past the end of '{}' ({} bytes)",
                self.name, self.header.size
            ))),
        }
    }

    /// After a request: flush per cache mode / FUA; on error, keep the
    /// image consistent (nothing half-written is made reachable).
    /// After a request: bound deferred work; returns whether the caller must
    /// flush (writethrough or FUA), which it does after releasing the lock
    /// so that concurrent flushes can share one sync.
    fn finish_request(&mut self, r: Result<()>, flags: u32) -> Result<bool> {
        if let Err(Error::Corrupt(_)) = &r {
            // An inconsistency found while running: stop writing, as QEMU does.
            self.mark_corrupt();
        }
        r?;
        self.frees.settle();
        if self.opts.cache.writethrough() || flags & REQ_FUA != 0 {
            return Ok(true);
        }
        if self.frees.len() > MAX_PENDING_FREES {
            self.flush_all(false)?;
        }
        Ok(false)
    }

    // ----- low-level file access with counters -----

    pub(crate) fn write_data(&mut self, host: u64, buf: &[u8]) -> Result<()> {
        if let Some(d) = &self.data {
            // External data file: not the image file, no metadata there.
            d.write_at(buf, host)
                .map_err(ioerr("write data", &self.name))?;
            self.stats.data_bytes_written += buf.len() as u64;
            self.set_unsynced();
            return Ok(());
        }
        self.overlap_check(host, buf.len() as u64, "data")?;
        self.file
            .write_at(buf, host)
            .map_err(ioerr("write data", &self.name))?;
        self.stats.data_bytes_written += buf.len() as u64;
        self.set_unsynced();
        Ok(())
    }

    /// Refuses writes that would land on metadata (QEMU's default overlap
    /// check: header, active L1 and L2 tables, refcount table and blocks,
    /// snapshot table, snapshot L1 tables, bitmap directory; bitmap tables
    /// too): marks the image corrupt and fails with [`Error::Corrupt`].
    #[inline]
    pub(crate) fn overlap_check(&mut self, host: u64, len: u64, what: &str) -> Result<()> {
        self.overlap_check_ign(host, len, 0, what)
    }

    /// [`Inner::overlap_check`] ignoring the kinds in `ign` (a mask of
    /// [`Kind`] bits), so that a structure may be written over itself.
    pub(crate) fn overlap_check_ign(
        &mut self,
        host: u64,
        len: u64,
        ign: u32,
        what: &str,
    ) -> Result<()> {
        self.inactive_l2_gate(ign)?;
        let hit = self.overlap_mask(host, len, ign);
        match Kind::first_of(hit) {
            None => Ok(()),
            Some(k) => {
                let msg = format!(
                    "{}: {}: {what} write at {host:#x} ({len} bytes)",
                    self.name,
                    overlap_message(k.name())
                );
                self.mark_corrupt();
                Err(Error::Corrupt(msg))
            }
        }
    }

    /// Fails (with QEMU's errno, image not marked corrupt) while the
    /// inactive L2 tables are to be protected but a snapshot's L1 table
    /// could not be read: no write can be shown not to hit them. QEMU
    /// fails its first metadata write so (a refcount block flush before
    /// the data write); this engine fails whichever write comes first.
    pub(crate) fn inactive_l2_gate(&self, ign: u32) -> Result<()> {
        match &self.inactive_l2_unknown {
            Some((errno, what)) if ign & Kind::InactiveL2.bit() == 0 => Err(Error::io(
                format!("{}{}{what}", self.name, crate::error::OVERLAP_CHECK),
                std::io::Error::from_raw_os_error(*errno),
            )),
            _ => Ok(()),
        }
    }

    /// The kinds of metadata (bits of [`Kind`]) not in `ign` that share a
    /// cluster with `[host, host+len)`.
    #[inline]
    pub(crate) fn overlap_mask(&self, host: u64, len: u64, ign: u32) -> u32 {
        let cs = self.geo.cluster_size();
        let mut hit = clash_mask(&self.meta, &self.l2_tables, cs, host, len) & !ign;
        let start = host & !(cs - 1);
        let end = host.saturating_add(len).saturating_add(cs - 1) & !(cs - 1);
        if ign & Kind::RefcountTable.bit() == 0 && self.refs.overlaps_table(start, end - start) {
            hit |= Kind::RefcountTable.bit();
        }
        if ign & Kind::RefcountBlock.bit() == 0 && self.refs.overlaps_block(start, end - start) {
            hit |= Kind::RefcountBlock.bit();
        }
        hit
    }

    /// Gives the refcount layer the header and active L1 ranges, against
    /// which it validates refcount block offsets.
    /// The overlap registry follows the active L1 table (after it moved or
    /// changed size): its range, the refcount layer's protection and the set
    /// of active L2 tables.
    pub(crate) fn active_l1_moved(&mut self) {
        let l1 = self.header.l1_table_offset;
        self.meta.replace(
            Kind::ActiveL1.bit(),
            [(
                l1..l1.saturating_add(self.l1.len() as u64 * 8),
                Kind::ActiveL1,
            )],
        );
        self.protect_in_refcounts();
        self.l2_tables = self
            .l1
            .iter()
            .map(|&e| L1Entry(e).l2_offset())
            .filter(|&o| o != 0)
            .collect();
    }

    pub(crate) fn protect_in_refcounts(&mut self) {
        let cs = self.geo.cluster_size();
        let l1 = self.header.l1_table_offset;
        let l1_end = l1.saturating_add((self.l1.len() as u64 * 8).div_ceil(cs) * cs);
        let mut keep = vec![(0, cs), (l1, l1_end)];
        if let Some(a) = &self.crypt_area {
            keep.push((a.start, a.end));
        }
        self.refs.set_protected(keep);
    }

    /// Reads the snapshot table and registers it and every snapshot's L1
    /// table for the overlap checks. A table that cannot be parsed protects
    /// its fixed-size part only (`check` reports it).
    pub(crate) fn refresh_snapshot_ranges(&mut self) -> Result<()> {
        use qcow2_format::snapshot;
        let n = self.header.nb_snapshots;
        let base = self.header.snapshots_offset;
        let mut new: Vec<(std::ops::Range<u64>, Kind)> = Vec::new();
        let mut inactive_l2 = None;
        if n > 0 {
            let file_len = self.file.len().map_err(ioerr("stat", &self.name))?;
            let avail = file_len
                .saturating_sub(base)
                .min(snapshot::MAX_SNAPSHOTS_SIZE);
            // Read what the entries need, growing the buffer while truncated.
            let mut want = (n as u64 * 64).clamp(4096, 1 << 20).min(avail);
            let parsed = loop {
                let mut buf = vec![0u8; want as usize];
                self.file
                    .read_at(&mut buf, base)
                    .map_err(ioerr("read snapshot table", &self.name))?;
                match snapshot::parse_table(&buf, n, false) {
                    Err(qcow2_format::FormatError::Truncated(_)) if want < avail => {
                        want = (want * 4).min(avail);
                    }
                    r => break r.ok(),
                }
            };
            match parsed {
                Some((entries, len)) => {
                    new.push((base..base.saturating_add(len), Kind::SnapshotTable));
                    new.extend(entries.iter().map(|e| {
                        let o = e.l1_table_offset;
                        (o..o.saturating_add(e.l1_size as u64 * 8), Kind::InactiveL1)
                    }));
                    if self.opts.overlap_inactive_l2 {
                        inactive_l2 = Some(self.inactive_l2_tables(&entries)?);
                    }
                }
                None => {
                    let len =
                        (n as u64 * snapshot::FIXED_LEN as u64).min(snapshot::MAX_SNAPSHOTS_SIZE);
                    new.push((base..base.saturating_add(len), Kind::SnapshotTable))
                }
            }
        }
        self.inactive_l2_unknown = None;
        match inactive_l2 {
            Some(Ok(tables)) => new.extend(tables),
            Some(Err(why)) => self.inactive_l2_unknown = Some(why),
            None => {}
        }
        let errno = self.inactive_l2_unknown.as_ref().map_or(0, |w| w.0);
        self.sh.write_gate.store(errno, Ordering::Relaxed);
        self.meta.replace(
            Kind::SnapshotTable.bit() | Kind::InactiveL1.bit() | Kind::InactiveL2.bit(),
            new,
        );
        Ok(())
    }

    /// The L2 tables of the snapshots (one cluster each), read from their
    /// L1 tables; or, when an L1 table is not valid, QEMU's errno and what
    /// is wrong (too large: `EFBIG`; offset not cluster aligned: `EINVAL`).
    #[allow(clippy::type_complexity)]
    fn inactive_l2_tables(
        &self,
        entries: &[qcow2_format::snapshot::SnapshotEntry],
    ) -> Result<std::result::Result<Vec<(std::ops::Range<u64>, Kind)>, (i32, String)>> {
        // QEMU's limit on an L1 table (32 MiB).
        const MAX_L1_BYTES: u64 = 1 << 25;
        let cs = self.geo.cluster_size();
        let mut out = Vec::new();
        for e in entries {
            let what = |p: &str| {
                format!(
                    "snapshot {} ('{}'): L1 table {p}",
                    String::from_utf8_lossy(&e.id),
                    String::from_utf8_lossy(&e.name)
                )
            };
            let bytes = e.l1_size as u64 * 8;
            if bytes > MAX_L1_BYTES {
                return Ok(Err((libc::EFBIG, what("too large"))));
            }
            let off = e.l1_table_offset;
            if off % cs != 0
                || off
                    .checked_add(bytes)
                    .is_none_or(|end| end > i64::MAX as u64)
            {
                return Ok(Err((libc::EINVAL, what("offset invalid"))));
            }
            let mut buf = vec![0u8; bytes as usize];
            self.file
                .read_at(&mut buf, off)
                .map_err(ioerr("read snapshot L1 table", &self.name))?;
            out.extend(buf.chunks_exact(8).filter_map(|c| {
                let t = L1Entry(be64(c, 0)).l2_offset();
                (t != 0).then(|| (t..t.saturating_add(cs), Kind::InactiveL2))
            }));
        }
        Ok(Ok(out))
    }

    /// Re-reads the bitmaps extension (from `self.header`) and the bitmap
    /// directory (from the file) and replaces the bitmap directory and bitmap
    /// table ranges of the overlap checks. Like QEMU, only while the bitmaps
    /// autoclear bit vouches for the extension. A directory that cannot be
    /// read or parsed protects the directory range only.
    pub(crate) fn refresh_bitmap_ranges(&mut self) -> crate::error::Result<()> {
        use qcow2_format::bitmap;
        let mut new: Vec<(std::ops::Range<u64>, Kind)> = Vec::new();
        let ext = (self.header.autoclear_features & header::AUTOCLEAR_BITMAPS != 0)
            .then(|| self.header.extension(header::EXT_BITMAPS))
            .flatten()
            .and_then(|d| bitmap::BitmapsExt::parse(d).ok());
        if let Some(ext) = ext {
            let off = ext.directory_offset;
            let end = off.saturating_add(ext.directory_size);
            new.push((off..end, Kind::BitmapDirectory));
            let file_len = self.file.len().map_err(ioerr("stat", &self.name))?;
            if end <= file_len {
                let mut buf = vec![0u8; ext.directory_size as usize];
                self.file
                    .read_at(&mut buf, off)
                    .map_err(ioerr("read bitmap directory", &self.name))?;
                if let Ok(entries) = bitmap::parse_directory(&buf, ext.nb_bitmaps) {
                    new.extend(entries.iter().map(|e| {
                        let o = e.table_offset;
                        (
                            o..o.saturating_add(e.table_size as u64 * 8),
                            Kind::BitmapTable,
                        )
                    }));
                }
            }
        }
        self.meta
            .replace(Kind::BitmapDirectory.bit() | Kind::BitmapTable.bit(), new);
        Ok(())
    }

    /// Whether the file extends to `end`. The file never shrinks while it is
    /// open, so a length seen once answers most calls without an fstat.
    pub(crate) fn within_file(&mut self, end: u64) -> Result<bool> {
        if end <= self.len_seen {
            return Ok(true);
        }
        self.len_seen = self.file.len().map_err(ioerr("stat", &self.name))?;
        Ok(end <= self.len_seen)
    }

    /// An L2 table must lie within the file and on no other metadata.
    fn check_l2_location(&mut self, table: u64) -> Result<()> {
        let cs = self.geo.cluster_size();
        let hit = Kind::first_of(self.overlap_mask(table, cs, Kind::ActiveL2.bit()));
        if hit.is_some() || table < cs || !self.within_file(table.saturating_add(cs))? {
            let why = match hit {
                Some(k) => format!("overlaps the {}", k.name()),
                None => "lies past the end of the file".into(),
            };
            let msg = format!("{}: L2 table at {table:#x} {why}", self.name);
            self.mark_corrupt();
            return Err(Error::Corrupt(msg));
        }
        Ok(())
    }

    /// Sets the corrupt bit (best effort) and turns the image read-only.
    pub(crate) fn mark_corrupt(&mut self) {
        if self.read_only {
            return;
        }
        self.corrupted_here = true;
        if self.header.version >= 3 {
            let _ = self.set_incompat_bit(header::INCOMPAT_CORRUPT, true);
        }
        self.read_only = true;
    }

    pub(crate) fn set_incompat_bit(&mut self, bit: u64, on: bool) -> Result<()> {
        let mut v = self.header.incompatible_features;
        if on {
            v |= bit
        } else {
            v &= !bit
        }
        let mut b = [0u8; 8];
        put_be64(&mut b, 0, v);
        self.file
            .write_at(&b, 72)
            .map_err(ioerr("write header", &self.name))?;
        self.header.incompatible_features = v;
        self.check_sync_failed()?;
        let r = self.file.sync();
        self.stats.file_syncs += 1;
        self.note_sync(r)
    }

    /// Fails once a sync has failed (see `sync_failed`).
    pub(crate) fn check_sync_failed(&self) -> Result<()> {
        match self.sync_failed.load(Ordering::SeqCst) {
            0 => Ok(()),
            errno => Err(Error::io(
                format!(
                    "{}: sync: an earlier sync failed, what reached the disk is unknown",
                    self.name
                ),
                std::io::Error::from_raw_os_error(errno),
            )),
        }
    }

    /// Takes the result of a sync of the image file (the failure state is
    /// kept by the file's `StickySync`).
    pub(crate) fn note_sync(&self, r: std::io::Result<()>) -> Result<()> {
        r.map_err(ioerr("sync", &self.name))
    }

    // ----- L1 / L2 access -----

    /// L2 table offset for L1 index (0: none). Validates the offset.
    pub(crate) fn l2_table(&mut self, l1_idx: usize) -> Result<u64> {
        let Some(&e) = self.l1.get(l1_idx) else {
            return Err(Error::Invalid("offset beyond the L1 table".into()));
        };
        let off = L1Entry(e).l2_offset();
        if off != 0 && off < self.geo.cluster_size() {
            self.mark_corrupt();
            return Err(Error::Corrupt(format!(
                "{}: L1 entry {l1_idx} points into the header",
                self.name
            )));
        }
        Ok(off)
    }

    /// Cache slot and byte position within it of the L2 entry for `guest`
    /// in table `table`.
    pub(crate) fn l2_slot(&mut self, table: u64, guest: u64) -> Result<(SlotId, usize)> {
        let es = self.geo.l2_entry_size();
        let byte = self.geo.l2_index(guest) * es;
        let slice = self.l2.slice_size() as u64;
        let slice_off = table + byte / slice * slice;
        let id = match self.l2.lookup(slice_off) {
            Some(id) => id,
            None => {
                self.check_l2_location(table)?;
                if self.l2.victim_is_dirty() && self.alloc_pending() {
                    // Entries point at new clusters: one ordering sync, then
                    // write back every dirty slice so later evictions are free.
                    self.prepare_l2_writeback()?;
                    let name = self.name.clone();
                    self.l2
                        .flush(&*self.file)
                        .map_err(ioerr("write L2 table", &name))?;
                    self.set_unsynced();
                }
                if self.l2.victim_is_dirty() {
                    // The eviction below writes a slice: it must be synced
                    // before anything that depends on it (deferred frees, L1).
                    self.set_unsynced();
                }
                let name = self.name.clone();
                if self.fresh_l2.remove(&slice_off) {
                    // A slice of a new table, never cached: zeroes on disk.
                    self.l2
                        .insert_zeroed_clean(&*self.file, slice_off)
                        .map_err(ioerr("write L2 table", &name))?
                } else {
                    self.l2
                        .load(&*self.file, slice_off)
                        .map_err(ioerr("read L2 table", &name))?
                }
            }
        };
        Ok((id, (byte % slice) as usize))
    }

    /// Reads and validates the L2 entry for `guest` (unallocated when there
    /// is no L2 table): an invalid entry marks the image corrupt and fails.
    pub(crate) fn l2_entry(&mut self, guest: u64) -> Result<L2Entry> {
        let e = self.l2_entry_unchecked(guest)?;
        self.validate_l2(e, guest)?;
        Ok(e)
    }

    /// Reads the L2 entry for `guest` without judging it (for the paths that
    /// rewrite entries whatever they hold, as QEMU's zeroing does).
    pub(crate) fn l2_entry_unchecked(&mut self, guest: u64) -> Result<L2Entry> {
        let l1_idx = self.geo.l1_index(guest) as usize;
        let table = self.l2_table(l1_idx)?;
        if table == 0 {
            return Ok(L2Entry::default());
        }
        let (id, pos) = self.l2_slot(table, guest)?;
        let d = self.l2.data(id);
        let e = L2Entry {
            raw: be64(d, pos),
            bitmap: if self.geo.extended_l2 {
                be64(d, pos + 8)
            } else {
                0
            },
        };
        Ok(e)
    }

    pub(crate) fn validate_l2(&mut self, e: L2Entry, guest: u64) -> Result<()> {
        let v2_zero = self.header.version < 3 && !e.is_compressed() && e.zero_flag();
        let problem = if v2_zero {
            Some("zero cluster entry in a pre-v3 image")
        } else if self.geo.extended_l2 && e.bitmap_invalid_in(self.df) {
            Some("invalid subcluster allocation bitmap")
        } else if self.df && e.is_compressed() {
            Some("compressed cluster entry in an image with an external data file")
        } else if self.df
            && e.has_host(true)
            && e.host_offset() != guest & !(self.geo.cluster_size() - 1)
        {
            Some("external data file host cluster offset does not match the guest cluster offset")
        } else {
            l2_entry_problem(e, self.geo.cluster_size())
        };
        if let Some(why) = problem {
            let bitmap = self.geo.extended_l2 && e.bitmap_invalid_in(self.df);
            let l2_off = self
                .l1
                .get(self.geo.l1_index(guest) as usize)
                .map_or(0, |&l| L1Entry(l).l2_offset());
            // C's %#x: no prefix for zero.
            let c_hex = |v: u64| {
                if v == 0 {
                    "0".to_string()
                } else {
                    format!("{v:#x}")
                }
            };
            let idx = c_hex(self.geo.l2_index(guest));
            let unaligned = why == "host offset is not cluster aligned";
            let msg = if bitmap && l2_off != 0 {
                // QEMU's words (its lookup finds the entry invalid).
                format!(
                    "{}: Invalid cluster entry found  (L2 offset: {l2_off:#x}, L2 index: {idx})",
                    self.name
                )
            } else if unaligned && l2_off != 0 {
                format!(
                    "{}: Cluster allocation offset {:#x} unaligned (L2 offset: {l2_off:#x}, L2 index: {idx})",
                    self.name,
                    e.host_offset()
                )
            } else if self.geo.extended_l2 {
                format!(
                    "{}: L2 entry for guest offset {guest:#x} ({:#x}, bitmap {:#x}): {why}",
                    self.name, e.raw, e.bitmap
                )
            } else {
                format!(
                    "{}: L2 entry for guest offset {guest:#x} ({:#x}): {why}",
                    self.name, e.raw
                )
            };
            self.mark_corrupt();
            return Err(Error::Corrupt(msg));
        }
        Ok(())
    }

    /// Ensures an L2 table exists for `guest`, allocating one. Returns its offset.
    pub(crate) fn ensure_l2_table(&mut self, guest: u64) -> Result<u64> {
        let l1_idx = self.geo.l1_index(guest) as usize;
        let cur = self.l2_table(l1_idx)?;
        if cur != 0 {
            if !L1Entry(self.l1[l1_idx]).copied() {
                return self.cow_l2_table(l1_idx, cur);
            }
            return Ok(cur);
        }
        let cs = self.geo.cluster_size();
        let c = self.alloc_clusters_for(1, Some("L2 table"))?;
        let off = c * cs;
        // The new table must read as zeroes: extend the file over it, or
        // clear a reused cluster. Extended by writing its last byte, never
        // with a truncate: data writes run outside the lock and may have
        // grown the file past this table since its length was read.
        let len = self.file.len().map_err(ioerr("stat", &self.name))?;
        if off >= len {
            self.file
                .write_at(&[0], off + cs - 1)
                .map_err(ioerr("extend file", &self.name))?;
        } else {
            let zeros = vec![0u8; cs as usize];
            self.file
                .write_at(&zeros, off)
                .map_err(ioerr("clear L2 table", &self.name))?;
            self.set_unsynced();
        }
        self.l2.discard_range(off, cs);
        if self.fresh_l2.len() >= 1 << 16 {
            // Bound the memory: forgetting only costs reads of zeroes.
            self.fresh_l2.clear();
        }
        let slice = self.l2.slice_size() as u64;
        self.fresh_l2
            .extend((0..cs / slice).map(|i| off + i * slice));
        self.file.event(DebugEvent::L2AllocWrite);
        // The new table's refcount and contents must be durable before the
        // L1 entry that points at it (flush_all syncs before writing L1).
        self.set_unsynced();
        if self.lazy {
            // As QEMU's L2 allocation: the refcounts go to the file now,
            // before any cluster this table will map is allocated.
            let name = self.name.clone();
            if self
                .refs
                .flush(&*self.file)
                .map_err(|e| refcount_err(&name, e))?
            {
                let n = self.sh.dur.wrote();
                if self.accurate_refcounts() {
                    // Increments of clusters already linked went out too.
                    self.sh.dur.depend_on(n);
                }
            }
        }
        self.l2_tables.insert(off);
        self.l1[l1_idx] = L1Entry::new(off).0;
        self.l1_dirty.insert(l1_idx);
        Ok(off)
    }

    /// Copies an L2 table shared with an internal snapshot (L1 entry without
    /// COPIED) so the active image can change it: the copy references the
    /// same clusters, the L1 entry moves to it once it is durable, and the
    /// old table loses one reference after that.
    fn cow_l2_table(&mut self, l1_idx: usize, old: u64) -> Result<u64> {
        let cs = self.geo.cluster_size();
        let cb = self.geo.cluster_bits;
        let es = self.geo.l2_entry_size() as usize;
        let name = self.name.clone();
        // A shared table is never written by us, so the file holds its content.
        if self
            .refs
            .get(&*self.file, old >> cb)
            .map_err(|err| refcount_err(&name, err))?
            == 1
        {
            // Not actually shared: only the COPIED flag was missing.
            self.l1[l1_idx] = L1Entry::new(old).0;
            self.l1_dirty.insert(l1_idx);
            return Ok(old);
        }
        let mut t = vec![0u8; cs as usize];
        self.file.event(DebugEvent::L2AllocCowRead);
        self.file
            .read_at(&mut t, old)
            .map_err(ioerr("read L2 table", &name))?;
        let c = self.alloc_clusters(1)?;
        let new = c * cs;
        // Data clusters are counted once per L1 table that reaches them (as
        // QEMU's snapshots count them), so the copy changes no data refcount.
        for p in (0..t.len()).step_by(es) {
            let e = L2Entry::standard(be64(&t, p));
            if l2_entry_problem(e, cs).is_some() {
                let guest = (l1_idx as u64 * self.geo.l2_entries() + (p / es) as u64) << cb;
                self.validate_l2(e, guest)?;
            }
        }
        self.overlap_check(new, cs, "L2 table copy")?;
        self.file.event(DebugEvent::L2AllocWrite);
        self.file
            .write_at(&t, new)
            .map_err(ioerr("write L2 table", &name))?;
        self.set_unsynced();
        self.l2.discard_range(new, cs);
        self.l2_tables.insert(new);
        self.l1[l1_idx] = L1Entry::new(new).0;
        self.l1_dirty.insert(l1_idx);
        // The old table keeps its snapshot reference only.
        self.frees.push(old >> cb, false);
        Ok(new)
    }

    /// Stores an L2 entry (marks the slice dirty).
    pub(crate) fn set_l2_entry(&mut self, table: u64, guest: u64, e: L2Entry) -> Result<()> {
        let (id, pos) = self.l2_slot(table, guest)?;
        let ext = self.geo.extended_l2;
        let d = self.l2.data_mut(id, pos, if ext { 16 } else { 8 });
        put_be64(d, 0, e.raw);
        if ext {
            put_be64(d, 8, e.bitmap);
        }
        Ok(())
    }
}

/// What is wrong with an L2 entry's host offset, if anything.
#[inline]
pub(crate) fn l2_entry_problem(e: L2Entry, cs: u64) -> Option<&'static str> {
    if e.is_compressed() {
        None
    } else if e.host_offset() & (cs - 1) != 0 {
        Some("host offset is not cluster aligned")
    } else if e.host_offset() != 0 && e.host_offset() < cs {
        Some("host offset points at the header")
    } else {
        None
    }
}

/// Groups sorted cluster indices into (start, count) runs.
pub(crate) fn runs(it: impl Iterator<Item = u64>) -> Vec<(u64, u64)> {
    let mut v: Vec<u64> = it.collect();
    v.sort_unstable();
    v.dedup();
    let mut out: Vec<(u64, u64)> = Vec::new();
    for c in v {
        match out.last_mut() {
            Some((s, n)) if *s + *n == c => *n += 1,
            _ => out.push((c, 1)),
        }
    }
    out
}

/// The kinds of metadata (bits of [`Kind`]) other than refcount structures
/// that share a cluster with `[host, host+len)`: ranges of `meta` and the
/// active L2 tables.
#[inline]
pub(crate) fn clash_mask(
    meta: &MetaRanges,
    l2_tables: &std::collections::HashSet<u64>,
    cs: u64,
    host: u64,
    len: u64,
) -> u32 {
    let start = host & !(cs - 1);
    let end = host.saturating_add(len).saturating_add(cs - 1) & !(cs - 1);
    let mut hit = meta.overlapping(start, end);
    let l2_hit = if (end - start) / cs > l2_tables.len() as u64 {
        // Long ranges: test the tables instead of every cluster.
        l2_tables.iter().any(|&t| start <= t && t < end)
    } else {
        (start..end)
            .step_by(cs as usize)
            .any(|c| l2_tables.contains(&c))
    };
    if l2_hit {
        hit |= Kind::ActiveL2.bit();
    }
    hit
}

/// QEMU's wording of an overlap, which callers and tests look for.
pub(crate) fn overlap_message(what: &str) -> String {
    format!("Preventing invalid write on metadata (overlaps with {what})")
}

pub(crate) fn refcount_err(name: &str, e: RefcountError) -> Error {
    match e {
        e @ RefcountError::Overlap { .. } => Error::Corrupt(format!("{name}: {e}")),
        RefcountError::Io(io) => Error::io(format!("{name}: refcount update"), io),
        RefcountError::Corrupt(m) => Error::Corrupt(format!("{name}: {m}")),
        RefcountError::NoSpace(m) => Error::NoSpace(format!("{name}: {m}")),
    }
}
