//! Copying guest data between images: convert into an existing image
//! (`qemu-img convert -n`), commit an overlay into its backing file
//! (`qemu-img commit`) and the safe rebase (`qemu-img rebase -b`).
//!
//! The copy loops are written once, over two narrow traits: a
//! [`CopySource`] (size, allocation status, reads) and a [`CopyTarget`]
//! (writes, write-zeroes, compressed writes). [`Image`] implements both;
//! the command-line tool implements them for raw files and concatenated
//! sources and drives the same loops ([`convert`], [`commit_into`],
//! [`rebase_into`]).

use crate::backing::{self, Backing};
use crate::error::{Error, Result};
use crate::image::Image;
use crate::types::{MapEntry, REQ_COMPRESSED, REQ_MAY_UNMAP};

/// Bytes copied per step (QEMU's default buffer size).
pub const COPY_CHUNK: u64 = 2 << 20;
/// qemu-img's default `-S`: zero runs of at least 4 KiB are not written as data.
pub const DEFAULT_SPARSE_SIZE: u64 = 4096;
/// Largest sparse size (`-S`) accepted.
pub const MAX_SPARSE_SIZE: u64 = 16 << 20;

/// A progress callback: `(done, total)` bytes; `done` never decreases and
/// ends at `total`.
pub type ProgressFn<'a> = &'a mut dyn FnMut(u64, u64);

/// What a range of a [`CopySource`] holds, from the offset asked about.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SourceExtent {
    /// How far the extent reaches (at least 1 byte, at most the length asked).
    pub len: u64,
    /// It reads as zeroes (no need to read it).
    pub zero: bool,
    /// Not allocated in the source's own top layer, but in (or falling
    /// through) its backing chain: what `convert -B` leaves out.
    pub from_below: bool,
}

/// Where copied data comes from.
pub trait CopySource {
    /// Guest size in bytes.
    fn size(&self) -> u64;
    /// What `[offset, offset + len)` holds from `offset` (within the size).
    fn extent(&self, offset: u64, len: u64) -> Result<SourceExtent>;
    /// Reads `buf.len()` bytes at `offset` (within the size).
    fn read(&self, offset: u64, buf: &mut [u8]) -> Result<()>;
}

/// Where copied data goes.
pub trait CopyTarget {
    /// Guest size in bytes.
    fn size(&self) -> u64;
    /// Cluster size (the unit of compressed writes).
    fn cluster_size(&self) -> u64;
    /// Writes `buf` at `offset`.
    fn write(&self, offset: u64, buf: &[u8]) -> Result<()>;
    /// Makes `[offset, offset + len)` read as zeroes (deallocating where
    /// the target may).
    fn write_zeroes(&self, offset: u64, len: u64) -> Result<()>;
    /// Writes whole clusters compressed (see [`Image::write_compressed`]).
    fn write_compressed(&self, _offset: u64, _buf: &[u8]) -> Result<()> {
        Err(Error::NotSupported(
            "compressed writes on this target".into(),
        ))
    }
    /// Where the target's backing chain ends: past it, an unallocated
    /// range reads as zeroes (0: no backing file).
    fn backing_end(&self) -> u64 {
        0
    }
}

impl CopySource for Image {
    fn size(&self) -> u64 {
        self.virtual_size()
    }
    fn extent(&self, offset: u64, len: u64) -> Result<SourceExtent> {
        let m = self.block_status_limit(offset, len, 1)?;
        let has_backing = self.lock().header.backing_file.is_some();
        Ok(extent_of(m.first(), offset, len, has_backing))
    }
    fn read(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        Image::read(self, offset, buf)
    }
}

fn extent_of(e: Option<&MapEntry>, offset: u64, len: u64, has_backing: bool) -> SourceExtent {
    match e {
        Some(e) => {
            let top = e.present && e.depth == 0;
            SourceExtent {
                len: (e.start + e.length).saturating_sub(offset).clamp(1, len),
                zero: e.zero,
                from_below: !top && has_backing,
            }
        }
        None => SourceExtent {
            len,
            zero: false,
            from_below: false,
        },
    }
}

impl CopyTarget for Image {
    fn size(&self) -> u64 {
        self.virtual_size()
    }
    fn cluster_size(&self) -> u64 {
        Image::cluster_size(self)
    }
    fn write(&self, offset: u64, buf: &[u8]) -> Result<()> {
        Image::write(self, offset, buf, 0)
    }
    fn write_zeroes(&self, offset: u64, len: u64) -> Result<()> {
        Image::write_zeroes(self, offset, len, REQ_MAY_UNMAP)
    }
    fn write_compressed(&self, offset: u64, buf: &[u8]) -> Result<()> {
        Image::write(self, offset, buf, REQ_COMPRESSED)
    }
    fn backing_end(&self) -> u64 {
        let b = self.lock().backing.clone();
        b.map_or(0, |b| b.size())
    }
}

/// A backing chain opened for reading, as a copy source.
struct LayerSource(Backing);

impl CopySource for LayerSource {
    fn size(&self) -> u64 {
        self.0.size()
    }
    fn extent(&self, offset: u64, len: u64) -> Result<SourceExtent> {
        let mut out = Vec::new();
        self.0.status_into(offset, len, 0, 1, &mut out)?;
        Ok(extent_of(out.first(), offset, len, false))
    }
    fn read(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        backing::read(&*self.0, offset, buf)
    }
}

/// Reports progress: never backwards, and `total` once at the end.
struct Report<'a> {
    f: Option<ProgressFn<'a>>,
    total: u64,
    last: u64,
}

impl<'a> Report<'a> {
    fn new(f: Option<ProgressFn<'a>>, total: u64) -> Self {
        let mut r = Report { f, total, last: 0 };
        if let Some(f) = r.f.as_mut() {
            f(0, total);
        }
        r
    }
    fn set(&mut self, done: u64) {
        let done = done.min(self.total);
        if done > self.last {
            self.last = done;
            if let Some(f) = self.f.as_mut() {
                f(done, self.total);
            }
        }
    }
    fn finish(&mut self) {
        let t = self.total;
        self.set(t);
    }
}

/// Options of [`convert`] and [`Image::convert_to`].
pub struct ConvertOptions<'a> {
    /// Write every cluster that is not all zeroes compressed (as
    /// `qemu-img convert -c`); sparse detection is then per cluster.
    pub compress: bool,
    /// Runs of zero bytes of at least this many bytes (aligned to it) are
    /// not written as data but as zeroes, or not at all on a target that
    /// reads as zeroes (`-S`; a multiple of 512 up to [`MAX_SPARSE_SIZE`]).
    /// 0 writes everything, zeroes included (`-S 0`).
    pub sparse_size: u64,
    /// The target reads as zeroes already (`--target-is-zero`): zero
    /// ranges are skipped.
    pub target_is_zero: bool,
    /// Copy only what the source allocates in its own top layer (as
    /// `convert -B` does): ranges it leaves to its backing chain are not
    /// written, so the target keeps reading them through its own backing
    /// file.
    pub top_only: bool,
    /// Called with `(done, total)` bytes as the copy advances.
    pub progress: Option<ProgressFn<'a>>,
}

impl Default for ConvertOptions<'_> {
    fn default() -> Self {
        ConvertOptions {
            compress: false,
            sparse_size: DEFAULT_SPARSE_SIZE,
            target_is_zero: false,
            top_only: false,
            progress: None,
        }
    }
}

/// Copies the guest content of `src` into `dst` (`qemu-img convert -n`
/// semantics: `dst` exists and is at least as large as `src`): ranges that
/// read as zeroes go through the target's write-zeroes path (or are
/// skipped when it reads as zeroes), data is written (compressed with
/// `opts.compress`), runs of zeroes of at least `opts.sparse_size` are not
/// written as data.
pub fn convert<S, T>(src: &S, dst: &T, opts: ConvertOptions<'_>) -> Result<()>
where
    S: CopySource + ?Sized,
    T: CopyTarget + ?Sized,
{
    let sparse = opts.sparse_size;
    if sparse % 512 != 0 || sparse > MAX_SPARSE_SIZE {
        return Err(Error::Invalid(format!(
            "sparse size {sparse}: not a multiple of 512 up to {MAX_SPARSE_SIZE}"
        )));
    }
    let total = src.size();
    if dst.size() < total {
        return Err(Error::Invalid(format!(
            "target too small: {} bytes, need {total}",
            dst.size()
        )));
    }
    let z = ZeroTarget {
        zero_init: opts.target_is_zero,
        overlay: opts.top_only,
        backing_end: if opts.top_only { dst.backing_end() } else { 0 },
    };
    let mut rep = Report::new(opts.progress, total);
    if opts.compress {
        copy_compressed(src, dst, total, &z, &mut rep)?;
        rep.finish();
        return Ok(());
    }
    let mut buf = vec![0u8; COPY_CHUNK.min(total.max(1)) as usize];
    let mut off = 0u64;
    while off < total {
        let want = (total - off).min(COPY_CHUNK);
        let st = src.extent(off, want)?;
        let n = st.len.clamp(1, want);
        if z.overlay && st.from_below {
            // Left to the target's own backing file.
        } else if st.zero && sparse != 0 {
            // Past the end of the target's backing file an overlay reads as
            // zeroes already (QEMU's post-backing zero).
            let len = if z.overlay {
                n.min(z.backing_end.saturating_sub(off))
            } else {
                n
            };
            if !z.zero_init && len > 0 {
                dst.write_zeroes(off, len)?;
            }
        } else {
            let b = &mut buf[..n as usize];
            if st.zero {
                b.fill(0);
            } else {
                src.read(off, b)?;
            }
            copy_runs(dst, off, b, sparse, z.zero_init)?;
        }
        off += n;
        rep.set(off);
    }
    rep.finish();
    Ok(())
}

/// What a target reads as where nothing is written.
struct ZeroTarget {
    /// It reads as zeroes everywhere.
    zero_init: bool,
    /// Only the source's top layer is copied.
    overlay: bool,
    /// Where the target's backing file ends.
    backing_end: u64,
}

/// Writes `b` at `off`, except runs of zero bytes of at least `sparse`
/// bytes (aligned to `sparse`), which are zeroed (or skipped on a target
/// that reads as zeroes). `sparse == 0` writes everything.
fn copy_runs<T: CopyTarget + ?Sized>(
    t: &T,
    off: u64,
    b: &[u8],
    sparse: u64,
    zero_init: bool,
) -> Result<()> {
    if sparse == 0 {
        return t.write(off, b);
    }
    let unit = sparse as usize;
    // Units aligned to guest offsets; a short unit at either edge counts as
    // data (a zero run shorter than the sparse size is written).
    let mut runs: Vec<(usize, usize, bool)> = Vec::new();
    let mut i = 0usize;
    while i < b.len() {
        let n = (unit - ((off + i as u64) % sparse) as usize).min(b.len() - i);
        let zero = n == unit && b[i..i + n].iter().all(|&x| x == 0);
        match runs.last_mut() {
            Some((_, e, z)) if *z == zero => *e = i + n,
            _ => runs.push((i, i + n, zero)),
        }
        i += n;
    }
    for (s, e, zero) in runs {
        if !zero {
            t.write(off + s as u64, &b[s..e])?;
        } else if !zero_init {
            t.write_zeroes(off + s as u64, (e - s) as u64)?;
        }
    }
    Ok(())
}

/// Byte ranges `[start, end)` in guest offsets.
type Runs = Vec<(u64, u64)>;

/// Reads `b.len()` bytes at `off`, extent by extent (zero extents are not
/// read). Returns the ranges left to the source's backing chain (when
/// `overlay`) and those whose status is zero.
fn read_extents<S: CopySource + ?Sized>(
    src: &S,
    mut off: u64,
    b: &mut [u8],
    overlay: bool,
) -> Result<(Runs, Runs)> {
    let mut below: Runs = Vec::new();
    let mut zeroes: Runs = Vec::new();
    let add = |runs: &mut Runs, s: u64, n: u64| match runs.last_mut() {
        Some((_, e)) if *e == s => *e = s + n,
        _ => runs.push((s, s + n)),
    };
    let mut done = 0usize;
    while done < b.len() {
        let want = (b.len() - done) as u64;
        let st = src.extent(off, want)?;
        let n = st.len.clamp(1, want);
        let part = &mut b[done..done + n as usize];
        if st.zero {
            part.fill(0);
            add(&mut zeroes, off, n);
        } else {
            src.read(off, part)?;
        }
        if overlay && st.from_below {
            add(&mut below, off, n);
        }
        done += n as usize;
        off += n;
    }
    Ok((below, zeroes))
}

/// Compressed conversion: every target cluster that is not all zeroes is
/// written compressed (as `qemu-img convert -c`: whole clusters, the last
/// one of the image possibly short); all-zero clusters are skipped on a
/// target that reads as zeroes, zeroed otherwise; with `overlay`, clusters
/// the source's top layer leaves wholly unallocated are left alone.
fn copy_compressed<S, T>(
    src: &S,
    dst: &T,
    total: u64,
    z: &ZeroTarget,
    rep: &mut Report<'_>,
) -> Result<()>
where
    S: CopySource + ?Sized,
    T: CopyTarget + ?Sized,
{
    let cs = dst.cluster_size();
    // The image size is rounded up to whole sectors: its last cluster may
    // be longer than what the source gives.
    let img_size = dst.size();
    let step = COPY_CHUNK.max(cs);
    let mut buf = vec![0u8; step.min(total.max(1)) as usize];
    let mut off = 0u64;
    while off < total {
        let n = step.min(total - off);
        let b = &mut buf[..n as usize];
        let (below, zero_runs) = read_extents(src, off, b, z.overlay)?;
        let mut i = 0u64;
        while i < n {
            let m = cs.min(n - i);
            let c = &b[i as usize..(i + m) as usize];
            let at = off + i;
            i += m;
            let within = |runs: &[(u64, u64)]| runs.iter().any(|&(s, e)| s <= at && at + m <= e);
            if within(&below) {
                continue;
            }
            if c.iter().all(|&x| x == 0) {
                // Zero in the source's status: past the end of the target's
                // backing file it reads as zeroes already (zero data there
                // is still written as zeroes, as QEMU does).
                let len = if z.overlay && within(&zero_runs) {
                    m.min(z.backing_end.saturating_sub(at))
                } else {
                    m
                };
                if !z.zero_init && len > 0 {
                    dst.write_zeroes(at, len)?;
                }
                continue;
            }
            let end = (at + cs).min(img_size);
            if at + m < end {
                let mut v = vec![0u8; (end - at) as usize];
                v[..c.len()].copy_from_slice(c);
                dst.write_compressed(at, &v)?;
            } else {
                dst.write_compressed(at, c)?;
            }
        }
        off += n;
        rep.set(off);
    }
    Ok(())
}

/// Writes every range of `top` allocated above layer `base_depth` of its
/// chain (1: its backing file) into `base`. As QEMU's commit (a mirror
/// job), the work is done in granules of `granule` bytes: a granule with
/// any byte allocated above the base is copied whole (read through
/// `top`), or zeroed when all of it reads as zeroes from above.
pub fn commit_into<T: CopyTarget + ?Sized>(
    top: &Image,
    base: &T,
    base_depth: u32,
    granule: u64,
    progress: Option<ProgressFn<'_>>,
) -> Result<()> {
    let size = top.virtual_size();
    let gran = granule.max(512);
    let mut rep = Report::new(progress, size);
    let mut buf = vec![0u8; gran as usize];
    let mut off = 0u64;
    while off < size {
        let end = (off + gran).min(size);
        // What the granule holds above the base.
        let (mut any_above, mut all_zero) = (false, true);
        let mut p = off;
        while p < end {
            let m = top.block_status_limit(p, end - p, 1)?;
            let (n_end, above, zero) = match m.first() {
                Some(e) => (
                    (e.start + e.length).clamp(p + 1, end),
                    e.present && e.depth < base_depth,
                    e.zero,
                ),
                None => (end, false, false),
            };
            any_above |= above;
            all_zero &= above && zero;
            p = n_end;
        }
        if any_above {
            let n = end - off;
            if all_zero {
                base.write_zeroes(off, n)?;
            } else {
                let b = &mut buf[..n as usize];
                top.read(off, b)?;
                base.write(off, b)?;
            }
        }
        off = end;
        rep.set(off);
    }
    rep.finish();
    Ok(())
}

/// Copies into `img` the data its current chain gives for every range
/// `img` does not allocate itself where `new` (the new backing chain, or
/// zeroes for `None`) reads differently, compared cluster by cluster: the
/// first half of a safe rebase. Runs of differing clusters within a 2 MiB
/// chunk are written with one request (as QEMU does, which gives the same
/// host layout).
pub fn rebase_into(
    img: &Image,
    new: Option<&dyn CopySource>,
    progress: Option<ProgressFn<'_>>,
) -> Result<()> {
    let size = img.virtual_size();
    let cs = img.cluster_size();
    let mut rep = Report::new(progress, size);
    let mut off = 0u64;
    let mut old = vec![0u8; COPY_CHUNK.min(size.max(1)) as usize];
    let mut newb = vec![0u8; cs as usize];
    while off < size {
        let chunk_end = ((off / COPY_CHUNK + 1) * COPY_CHUNK).min(size);
        let m = img.block_status_limit(off, chunk_end - off, 1)?;
        let end = match m.first() {
            Some(e) => (e.start + e.length).clamp(off + 1, chunk_end),
            None => chunk_end,
        };
        let top = m.first().is_some_and(|e| e.present && e.depth == 0);
        if !top {
            let o = &mut old[..(end - off) as usize];
            img.read(off, o)?;
            // The run of differing clusters not yet written: [run, p).
            let mut run: Option<u64> = None;
            let mut p = off;
            while p < end {
                let n = ((p / cs + 1) * cs).min(end) - p;
                let nb = &mut newb[..n as usize];
                nb.fill(0);
                if let Some(d) = new {
                    let dsize = d.size();
                    if p < dsize {
                        let k = n.min(dsize - p) as usize;
                        d.read(p, &mut nb[..k])?;
                    }
                }
                let i = (p - off) as usize;
                if o[i..i + n as usize] != *nb {
                    run.get_or_insert(p);
                } else if let Some(r) = run.take() {
                    img.write(r, &o[(r - off) as usize..i], 0)?;
                }
                p += n;
            }
            if let Some(r) = run {
                img.write(r, &o[(r - off) as usize..], 0)?;
            }
        }
        off = end;
        rep.set(off);
    }
    rep.finish();
    Ok(())
}

/// The device and inode of the file at `path`.
fn file_id(path: &std::path::Path) -> Option<(u64, u64)> {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(path).ok().map(|m| (m.dev(), m.ino()))
}

impl Image {
    /// Fails unless the image's backing chain is open (an image that names
    /// a backing file but was opened without it reads zeroes there).
    fn check_chain_open(&self, what: &str) -> Result<()> {
        let g = self.lock();
        if g.header.backing_file.is_some() && g.backing.is_none() {
            return Err(Error::NotSupported(format!(
                "'{}': {what} needs the backing chain, which is not open",
                g.name
            )));
        }
        Ok(())
    }

    /// Copies the guest content of this image into `dst`, an image opened
    /// read-write and at least as large (`qemu-img convert -n`); see
    /// [`convert`] and [`ConvertOptions`]. The data is durable in `dst`
    /// when this returns (it is flushed).
    pub fn convert_to(&self, dst: &Image, opts: ConvertOptions<'_>) -> Result<()> {
        if std::ptr::eq(self, dst) {
            return Err(Error::Invalid(format!(
                "'{}': source and target are the same image",
                self.shown_name()
            )));
        }
        let (sp, dp) = (self.lock().path.clone(), dst.lock().path.clone());
        if file_id(&sp).is_some() && file_id(&sp) == file_id(&dp) {
            return Err(Error::Invalid(format!(
                "'{}' and '{}' are the same file",
                sp.display(),
                dp.display()
            )));
        }
        dst.lock().check_writable()?;
        if self.virtual_size() > dst.virtual_size() {
            return Err(Error::Invalid(format!(
                "'{}': target too small: {} bytes, need {}",
                dst.shown_name(),
                dst.virtual_size(),
                self.virtual_size()
            )));
        }
        convert(self, dst, opts)?;
        dst.flush()
    }

    /// Commits this image (the top) into `base`, which must be its backing
    /// file opened read-write through another handle (the same file:
    /// device and inode; else [`Error::Invalid`]): every range this image
    /// allocates is written into `base` (see [`commit_into`]), `base` is
    /// flushed, then this image is emptied ([`Image::make_empty`]) unless
    /// `keep_top`. Afterwards this image's backing chain is reopened, so
    /// that reads through it see the committed data at once.
    pub fn commit(
        &self,
        base: &Image,
        keep_top: bool,
        progress: Option<ProgressFn<'_>>,
    ) -> Result<()> {
        if std::ptr::eq(self, base) {
            return Err(Error::Invalid(format!(
                "'{}': top and base are the same image",
                self.shown_name()
            )));
        }
        base.lock().check_writable()?;
        if !keep_top {
            self.lock().check_writable()?;
        }
        let (backing, base_path) = {
            let g = self.lock();
            let b = g
                .header
                .backing_file
                .as_ref()
                .map(|b| backing::resolve(&g.path, b));
            (b, base.lock().path.clone())
        };
        let Some(backing) = backing else {
            return Err(Error::Invalid(format!(
                "'{}' has no backing file",
                self.shown_name()
            )));
        };
        let id = file_id(&backing);
        if id.is_none() || id != file_id(&base_path) {
            return Err(Error::Invalid(format!(
                "'{}' is not the backing file of '{}' ('{}')",
                base_path.display(),
                self.shown_name(),
                backing.display()
            )));
        }
        self.check_chain_open("commit")?;
        if base.virtual_size() < self.virtual_size() {
            return Err(Error::Invalid(format!(
                "'{}' ({} bytes) is larger than its base '{}' ({} bytes)",
                self.shown_name(),
                self.virtual_size(),
                base_path.display(),
                base.virtual_size()
            )));
        }
        let gran = base.cluster_size().max(4096);
        commit_into(self, base, 1, gran, progress)?;
        // The data must be in the file before the chain reads it afresh.
        base.flush()?;
        if !keep_top {
            self.make_empty()?;
        }
        let mut g = self.exclusive();
        let chain = g.open_named_backing()?;
        g.backing = chain;
        Ok(())
    }

    /// Safe rebase: copies into this image the data its current chain
    /// gives wherever the new chain (`new_backing`, of `format`, or
    /// nothing) reads differently and this image does not allocate the
    /// range itself ([`Image::rebase_copy`]), then records the new backing
    /// file ([`Image::set_backing`]). The guest content is unchanged.
    pub fn rebase(
        &self,
        new_backing: Option<&[u8]>,
        format: Option<&str>,
        progress: Option<ProgressFn<'_>>,
    ) -> Result<()> {
        // The name checks of `set_backing`, before anything is copied.
        if let Some(n) = new_backing {
            if n.len() > 1023 || n.contains(&0) {
                return Err(Error::Invalid(format!(
                    "'{}': backing file name longer than 1023 bytes or with a NUL byte",
                    self.shown_name()
                )));
            }
        }
        self.rebase_copy(new_backing, format, progress)?;
        self.set_backing(new_backing, format)
    }

    /// The copy of a safe rebase without the header change: opens the new
    /// chain (`new_backing` relative to this image's directory; `format`
    /// `None`: probed) and runs [`rebase_into`].
    pub fn rebase_copy(
        &self,
        new_backing: Option<&[u8]>,
        format: Option<&str>,
        progress: Option<ProgressFn<'_>>,
    ) -> Result<()> {
        self.lock().check_writable()?;
        self.check_chain_open("safe rebase")?;
        let new = match new_backing.filter(|n| !n.is_empty()) {
            Some(n) => {
                let (path, key) = {
                    let g = self.lock();
                    (g.path.clone(), g.opts.backing_key_secret.clone())
                };
                Some(LayerSource(crate::image::open_backing(
                    &path,
                    n,
                    format,
                    key.as_ref(),
                )?))
            }
            None => None,
        };
        rebase_into(self, new.as_ref().map(|l| l as &dyn CopySource), progress)
    }

    /// The image as messages name it.
    fn shown_name(&self) -> String {
        self.lock().name.clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::RefCell;

    /// A target recording what it is asked to do.
    #[derive(Default)]
    struct Log {
        ops: RefCell<Vec<(char, u64, u64)>>,
    }

    impl CopyTarget for Log {
        fn size(&self) -> u64 {
            1 << 20
        }
        fn cluster_size(&self) -> u64 {
            65536
        }
        fn write(&self, off: u64, buf: &[u8]) -> Result<()> {
            self.ops.borrow_mut().push(('w', off, buf.len() as u64));
            Ok(())
        }
        fn write_zeroes(&self, off: u64, len: u64) -> Result<()> {
            self.ops.borrow_mut().push(('z', off, len));
            Ok(())
        }
    }

    #[test]
    fn zero_runs_shorter_than_the_sparse_size_are_written() {
        let mut b = vec![1u8; 16384];
        b[4096..12288].fill(0); // two aligned 4 KiB units of zeroes
        b[12288..12800].fill(0); // 512 bytes: shorter than a unit
        let t = Log::default();
        copy_runs(&t, 0, &b, 4096, false).unwrap();
        assert_eq!(
            *t.ops.borrow(),
            vec![('w', 0, 4096), ('z', 4096, 8192), ('w', 12288, 4096)]
        );
        // On a target that reads as zeroes they are skipped; -S 0 writes all.
        let t = Log::default();
        copy_runs(&t, 0, &b, 4096, true).unwrap();
        assert_eq!(*t.ops.borrow(), vec![('w', 0, 4096), ('w', 12288, 4096)]);
        let t = Log::default();
        copy_runs(&t, 0, &b, 0, false).unwrap();
        assert_eq!(*t.ops.borrow(), vec![('w', 0, 16384)]);
        // Units are aligned to guest offsets: at 2 KiB the first zero unit
        // starts at 4 KiB of the guest.
        let t = Log::default();
        copy_runs(&t, 2048, &vec![0u8; 8192], 4096, false).unwrap();
        assert_eq!(
            *t.ops.borrow(),
            vec![('w', 2048, 2048), ('z', 4096, 4096), ('w', 8192, 2048)]
        );
    }

    #[test]
    fn progress_is_monotone_and_ends_at_the_total() {
        let mut seen = Vec::new();
        let mut f = |d: u64, t: u64| seen.push((d, t));
        {
            let mut r = Report::new(Some(&mut f), 100);
            r.set(40);
            r.set(30);
            r.set(40);
            r.set(500);
            r.finish();
        }
        assert_eq!(seen, vec![(0, 100), (40, 100), (100, 100)]);
    }

    #[test]
    fn a_target_too_small_or_a_bad_sparse_size_is_refused() {
        struct Big;
        impl CopySource for Big {
            fn size(&self) -> u64 {
                2 << 20
            }
            fn extent(&self, _: u64, len: u64) -> Result<SourceExtent> {
                Ok(SourceExtent {
                    len,
                    zero: true,
                    from_below: false,
                })
            }
            fn read(&self, _: u64, _: &mut [u8]) -> Result<()> {
                Ok(())
            }
        }
        let t = Log::default();
        let e = convert(&Big, &t, ConvertOptions::default()).unwrap_err();
        assert!(matches!(e, Error::Invalid(_)), "{e}");
        let o = ConvertOptions {
            sparse_size: 1000,
            ..Default::default()
        };
        assert!(matches!(convert(&Big, &t, o), Err(Error::Invalid(_))));
        assert!(t.ops.borrow().is_empty());
    }
}
