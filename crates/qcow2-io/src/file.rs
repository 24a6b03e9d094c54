//! File backend on libc: pread, pwrite, fdatasync, fallocate.

use crate::Storage;
use std::ffi::CString;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

/// How to open a file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OpenMode {
    /// Open for writing too.
    pub writable: bool,
    /// Bypass the page cache (O_DIRECT); I/O goes through aligned bounce buffers.
    pub direct: bool,
    /// Create the file (fails if it exists) and truncate.
    pub create: bool,
}

impl OpenMode {
    /// Read-only, buffered.
    pub const READ_ONLY: OpenMode = OpenMode {
        writable: false,
        direct: false,
        create: false,
    };
    /// Read-write, buffered.
    pub const READ_WRITE: OpenMode = OpenMode {
        writable: true,
        direct: false,
        create: false,
    };
}

/// Alignment used for O_DIRECT bounce buffers and offsets.
const DIRECT_ALIGN: usize = 4096;

/// A file opened with `open(2)`, closed on drop.
///
/// An O_DIRECT file is opened twice: writes that are not aligned for
/// O_DIRECT go through a second, buffered descriptor, exactly as asked
/// (the page cache merges them; a later O_DIRECT read or write of the range
/// writes back or drops the cached pages first, and fdatasync on either
/// descriptor syncs them). A read-modify-write of the aligned block would
/// lose a concurrent write to another part of the same block, and growing
/// the file to the block's end then trimming it back would cut off a
/// concurrent write past the old end.
pub struct FileStorage {
    fd: libc::c_int,
    direct: bool,
    /// The buffered descriptor of an O_DIRECT file (-1 otherwise).
    buffered: libc::c_int,
    /// Whether a failed sync may have lost page-cache data.
    pages: PageCacheSync,
}

/// Sync failures of an O_DIRECT file that also writes through the page
/// cache. A failed fdatasync with no buffered write since the last one
/// lost nothing a retry would not catch (O_DIRECT data never sat in the
/// page cache: QEMU's rule, no sticky state). After buffered writes the
/// kernel may have marked their pages clean despite the failure, so a
/// retried sync would report success over lost data: from then on every
/// sync fails with the first errno, as a buffered file's does.
#[derive(Default)]
struct PageCacheSync {
    dirty: std::sync::atomic::AtomicBool,
    failed: std::sync::atomic::AtomicI32,
}

impl PageCacheSync {
    fn wrote(&self) {
        self.dirty.store(true, std::sync::atomic::Ordering::SeqCst);
    }
    /// Runs `sync` with the rule above.
    fn sync(&self, sync: impl FnOnce() -> io::Result<()>) -> io::Result<()> {
        use std::sync::atomic::Ordering::SeqCst;
        let errno = self.failed.load(SeqCst);
        if errno != 0 {
            return Err(io::Error::from_raw_os_error(errno));
        }
        let dirty = self.dirty.swap(false, SeqCst);
        let r = sync();
        if let Err(e) = &r {
            if dirty {
                let errno = e.raw_os_error().unwrap_or(libc::EIO);
                let _ = self.failed.compare_exchange(0, errno, SeqCst, SeqCst);
            }
        }
        r
    }
}

fn cvt(r: libc::ssize_t) -> io::Result<usize> {
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r as usize)
    }
}

fn off_t(v: u64) -> io::Result<libc::off_t> {
    libc::off_t::try_from(v).map_err(|_| io::Error::from_raw_os_error(libc::EFBIG))
}

impl FileStorage {
    /// Opens `path`.
    pub fn open(path: &Path, mode: OpenMode) -> io::Result<Self> {
        let c = CString::new(path.as_os_str().as_bytes())
            .map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
        let mut flags = libc::O_CLOEXEC;
        flags |= if mode.writable {
            libc::O_RDWR
        } else {
            libc::O_RDONLY
        };
        if mode.create {
            flags |= libc::O_CREAT | libc::O_TRUNC;
        }
        if mode.direct {
            flags |= libc::O_DIRECT;
        }
        // SAFETY: `c` is a valid NUL-terminated string that outlives the call.
        let fd = unsafe { libc::open(c.as_ptr(), flags, 0o644 as libc::c_uint) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        let mut buffered = -1;
        if mode.direct {
            // The same open file, not whatever the path names by now.
            let flags = flags & !(libc::O_DIRECT | libc::O_CREAT | libc::O_TRUNC);
            let same = CString::new(format!("/proc/self/fd/{fd}")).expect("no NUL");
            // SAFETY: both strings are valid NUL-terminated strings that
            // outlive the calls.
            buffered = unsafe { libc::open(same.as_ptr(), flags) };
            if buffered < 0 {
                // SAFETY: as above.
                buffered = unsafe { libc::open(c.as_ptr(), flags) };
            }
            if buffered < 0 {
                let e = io::Error::last_os_error();
                // SAFETY: `fd` was opened above and is closed exactly once.
                unsafe { libc::close(fd) };
                return Err(e);
            }
        }
        Ok(FileStorage {
            fd,
            direct: mode.direct,
            buffered,
            pages: PageCacheSync::default(),
        })
    }

    fn pread_full(&self, buf: &mut [u8], mut offset: u64) -> io::Result<()> {
        let mut done = 0;
        while done < buf.len() {
            let rest = &mut buf[done..];
            // SAFETY: `rest` is a valid writable buffer of `rest.len()` bytes; fd is open.
            let n = cvt(unsafe {
                libc::pread(
                    self.fd,
                    rest.as_mut_ptr().cast(),
                    rest.len(),
                    off_t(offset)?,
                )
            });
            match n {
                Ok(0) => {
                    rest.fill(0);
                    return Ok(());
                }
                Ok(n) => {
                    done += n;
                    offset += n as u64;
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    fn pwrite_full(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        Self::pwrite_fd(self.fd, buf, offset)
    }

    fn pwrite_fd(fd: libc::c_int, buf: &[u8], mut offset: u64) -> io::Result<()> {
        let mut done = 0;
        while done < buf.len() {
            let rest = &buf[done..];
            // SAFETY: `rest` is a valid readable buffer of `rest.len()` bytes; fd is open.
            let n =
                cvt(unsafe { libc::pwrite(fd, rest.as_ptr().cast(), rest.len(), off_t(offset)?) });
            match n {
                Ok(0) => return Err(io::Error::from_raw_os_error(libc::ENOSPC)),
                Ok(n) => {
                    done += n;
                    offset += n as u64;
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    /// Whether a buffer at `ptr` of `len` bytes at file `offset` may go to
    /// an O_DIRECT file as it is.
    fn aligned(ptr: *const u8, len: usize, offset: u64) -> bool {
        let a = DIRECT_ALIGN;
        (ptr as usize) % a == 0 && len % a == 0 && offset % a as u64 == 0
    }

    /// `pwritev` of all of `bufs` from `offset`, resuming after short writes.
    fn pwritev_full(&self, bufs: &[&[u8]], offset: u64) -> io::Result<()> {
        Self::pwritev_fd(self.fd, bufs, offset)
    }

    fn pwritev_fd(fd: libc::c_int, bufs: &[&[u8]], mut offset: u64) -> io::Result<()> {
        // At most IOV_MAX (1024 on Linux) vectors per call.
        const MAX_IOV: usize = 1024;
        let mut iov: Vec<libc::iovec> = bufs
            .iter()
            .filter(|b| !b.is_empty())
            .map(|b| libc::iovec {
                iov_base: b.as_ptr() as *mut libc::c_void,
                iov_len: b.len(),
            })
            .collect();
        let mut first = 0;
        while first < iov.len() {
            let n = (iov.len() - first).min(MAX_IOV);
            // SAFETY: the vectors describe live, readable buffers borrowed
            // from `bufs` for the duration of the call; fd is open.
            let r = cvt(unsafe {
                libc::pwritev(fd, iov[first..].as_ptr(), n as libc::c_int, off_t(offset)?)
            });
            let mut done = match r {
                Ok(0) => return Err(io::Error::from_raw_os_error(libc::ENOSPC)),
                Ok(d) => d,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            };
            offset += done as u64;
            while done > 0 {
                let v = &mut iov[first];
                if done >= v.iov_len {
                    done -= v.iov_len;
                    first += 1;
                } else {
                    // SAFETY: advancing within the same buffer, `done` < its length.
                    v.iov_base = unsafe { v.iov_base.cast::<u8>().add(done) }.cast();
                    v.iov_len -= done;
                    done = 0;
                }
            }
        }
        Ok(())
    }

    /// Aligned window covering `[offset, offset+len)` for O_DIRECT.
    fn window(offset: u64, len: usize) -> (u64, usize) {
        let a = DIRECT_ALIGN as u64;
        let start = offset / a * a;
        let end = (offset + len as u64).div_ceil(a) * a;
        (start, (end - start) as usize)
    }

    fn stat(&self) -> io::Result<libc::stat> {
        // SAFETY: an all-zero `stat` is a valid value of this plain C struct.
        let mut st: libc::stat = unsafe { std::mem::zeroed() };
        // SAFETY: fstat writes only into `st`, which is properly sized; fd is open.
        let r = unsafe { libc::fstat(self.fd, &mut st) };
        if r < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(st)
    }

    fn seek(&self, offset: u64, whence: libc::c_int) -> io::Result<Option<u64>> {
        // SAFETY: lseek on an open fd has no memory-safety requirements.
        let r = unsafe { libc::lseek(self.fd, off_t(offset)?, whence) };
        if r < 0 {
            let e = io::Error::last_os_error();
            if e.raw_os_error() == Some(libc::ENXIO) {
                return Ok(None);
            }
            return Err(e);
        }
        Ok(Some(r as u64))
    }
}

thread_local! {
    /// Each thread's O_DIRECT bounce buffer, kept between requests: a
    /// server thread bouncing every request (clients' buffers are rarely
    /// page aligned) allocates and zeroes nothing per request. Taken out
    /// while in use, so nesting merely allocates.
    static BOUNCE: std::cell::Cell<Vec<u8>> = const { std::cell::Cell::new(Vec::new()) };
}

/// Bounce buffers up to this size are kept for the thread's next request.
const BOUNCE_KEEP: usize = 4 << 20;

/// A heap buffer aligned for O_DIRECT (its bytes are whatever an earlier
/// request left: every user fills what it reads or writes).
struct AlignedBuf {
    v: Vec<u8>,
    start: usize,
    len: usize,
}

impl AlignedBuf {
    fn new(len: usize) -> Self {
        let mut v = BOUNCE.try_with(std::cell::Cell::take).unwrap_or_default();
        if v.len() < len + DIRECT_ALIGN {
            v = vec![0u8; len + DIRECT_ALIGN];
        }
        let start = v.as_ptr().align_offset(DIRECT_ALIGN);
        AlignedBuf { v, start, len }
    }
    fn as_mut(&mut self) -> &mut [u8] {
        &mut self.v[self.start..self.start + self.len]
    }
}

impl Drop for AlignedBuf {
    fn drop(&mut self) {
        if self.v.len() <= BOUNCE_KEEP + DIRECT_ALIGN {
            let v = std::mem::take(&mut self.v);
            let _ = BOUNCE.try_with(|c| c.set(v));
        }
    }
}

impl Storage for FileStorage {
    fn raw_file(&self) -> Option<crate::RawFile> {
        Some(crate::RawFile {
            fd: self.fd,
            align: if self.direct { DIRECT_ALIGN } else { 1 },
        })
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        if !self.direct || Self::aligned(buf.as_ptr(), buf.len(), offset) {
            return self.pread_full(buf, offset);
        }
        let (ws, wl) = Self::window(offset, buf.len());
        let mut b = AlignedBuf::new(wl);
        self.pread_full(b.as_mut(), ws)?;
        let s = (offset - ws) as usize;
        buf.copy_from_slice(&b.as_mut()[s..s + buf.len()]);
        Ok(())
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        offset
            .checked_add(buf.len() as u64)
            .ok_or_else(|| io::Error::from_raw_os_error(libc::EFBIG))?;
        if !self.direct || Self::aligned(buf.as_ptr(), buf.len(), offset) {
            // Buffered, or already aligned for O_DIRECT: no bounce, no
            // trimming (an aligned write ends where it was asked to).
            return self.pwrite_full(buf, offset);
        }
        let a = DIRECT_ALIGN as u64;
        if offset % a == 0 && buf.len() as u64 % a == 0 {
            // Aligned range, unaligned memory: one copy.
            let mut b = AlignedBuf::new(buf.len());
            b.as_mut().copy_from_slice(buf);
            return self.pwrite_full(b.as_mut(), offset);
        }
        // An unaligned range: exactly these bytes, through the page cache.
        self.pages.wrote();
        Self::pwrite_fd(self.buffered, buf, offset)
    }

    fn write_vectored_at(&self, bufs: &[&[u8]], offset: u64) -> io::Result<()> {
        let total: u64 = bufs.iter().map(|b| b.len() as u64).sum();
        offset
            .checked_add(total)
            .ok_or_else(|| io::Error::from_raw_os_error(libc::EFBIG))?;
        if self.direct && !bufs.iter().all(|b| Self::aligned(b.as_ptr(), b.len(), 0)) {
            // One bounce buffer for the whole run.
            let a = DIRECT_ALIGN as u64;
            if offset % a == 0 && total % a == 0 {
                let mut b = AlignedBuf::new(total as usize);
                let mut at = 0;
                for piece in bufs {
                    b.as_mut()[at..at + piece.len()].copy_from_slice(piece);
                    at += piece.len();
                }
                return self.pwrite_full(b.as_mut(), offset);
            }
            self.pages.wrote();
            return Self::pwritev_fd(self.buffered, bufs, offset);
        }
        if self.direct && offset % DIRECT_ALIGN as u64 != 0 {
            self.pages.wrote();
            return Self::pwritev_fd(self.buffered, bufs, offset);
        }
        self.pwritev_full(bufs, offset)
    }

    fn sync(&self) -> io::Result<()> {
        self.pages.sync(|| {
            // SAFETY: fdatasync on an open fd has no memory-safety requirements.
            let r = unsafe { libc::fdatasync(self.fd) };
            if r < 0 {
                return Err(io::Error::last_os_error());
            }
            Ok(())
        })
    }

    fn punch_hole(&self, offset: u64, len: u64) -> io::Result<bool> {
        if len == 0 {
            return Ok(true);
        }
        // SAFETY: fallocate on an open fd has no memory-safety requirements.
        let r = unsafe {
            libc::fallocate(
                self.fd,
                libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                off_t(offset)?,
                off_t(len)?,
            )
        };
        if r < 0 {
            let e = io::Error::last_os_error();
            return match e.raw_os_error() {
                Some(libc::EOPNOTSUPP) | Some(libc::ENOSYS) => Ok(false),
                _ => Err(e),
            };
        }
        Ok(true)
    }

    fn len(&self) -> io::Result<u64> {
        Ok(self.stat()?.st_size as u64)
    }

    fn allocated_size(&self) -> io::Result<Option<u64>> {
        Ok(Some(self.stat()?.st_blocks as u64 * 512))
    }

    fn set_len(&self, len: u64) -> io::Result<()> {
        // SAFETY: ftruncate on an open fd has no memory-safety requirements.
        let r = unsafe { libc::ftruncate(self.fd, off_t(len)?) };
        if r < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    fn next_data(&self, offset: u64) -> io::Result<Option<u64>> {
        if offset >= self.len()? {
            return Ok(None);
        }
        match self.seek(offset, libc::SEEK_DATA) {
            Ok(r) => Ok(r),
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => Ok(Some(offset)),
            Err(e) => Err(e),
        }
    }

    fn next_hole(&self, offset: u64) -> io::Result<u64> {
        let len = self.len()?;
        if offset >= len {
            return Ok(offset);
        }
        match self.seek(offset, libc::SEEK_HOLE) {
            Ok(Some(r)) => Ok(r),
            Ok(None) => Ok(len),
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => Ok(len),
            Err(e) => Err(e),
        }
    }
}

impl Drop for FileStorage {
    fn drop(&mut self) {
        // SAFETY: the fds are owned by this value and closed exactly once.
        unsafe {
            libc::close(self.fd);
            if self.buffered >= 0 {
                libc::close(self.buffered);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roundtrip_and_holes() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("f");
        let f = FileStorage::open(
            &p,
            OpenMode {
                writable: true,
                direct: false,
                create: true,
            },
        )
        .unwrap();
        f.write_at(&[7u8; 8192], 4096).unwrap();
        assert_eq!(f.len().unwrap(), 12288);
        let mut b = vec![0u8; 16384];
        f.read_at(&mut b, 0).unwrap();
        assert!(b[..4096].iter().all(|&x| x == 0));
        assert!(b[4096..12288].iter().all(|&x| x == 7));
        assert!(b[12288..].iter().all(|&x| x == 0));
        f.punch_hole(4096, 4096).unwrap();
        f.read_at(&mut b[..4096], 4096).unwrap();
        assert!(b[..4096].iter().all(|&x| x == 0));
        f.sync().unwrap();
        assert!(FileStorage::open(&dir.path().join("missing"), OpenMode::READ_ONLY).is_err());
    }

    #[test]
    fn direct_unaligned() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("d");
        let f = match FileStorage::open(
            &p,
            OpenMode {
                writable: true,
                direct: true,
                create: true,
            },
        ) {
            Ok(f) => f,
            Err(_) => return, // filesystem without O_DIRECT (tmpfs)
        };
        f.write_at(b"hello", 10).unwrap();
        assert_eq!(f.len().unwrap(), 15);
        let mut b = [0u8; 7];
        f.read_at(&mut b, 9).unwrap();
        assert_eq!(&b, b"\0hello\0");
        // Vectored, unaligned pieces: bounced as one run.
        f.write_vectored_at(&[b"ab", b"", b"cd"], 4094).unwrap();
        let mut b = [0u8; 6];
        f.read_at(&mut b, 4093).unwrap();
        assert_eq!(&b, b"\0abcd\0");
        assert_eq!(f.len().unwrap(), 4098);
    }

    #[test]
    fn vectored_writes() {
        let dir = tempfile::tempdir().unwrap();
        let f = FileStorage::open(
            &dir.path().join("v"),
            OpenMode {
                writable: true,
                direct: false,
                create: true,
            },
        )
        .unwrap();
        // More pieces than one pwritev takes, of odd sizes.
        let pieces: Vec<Vec<u8>> = (0..1500u32)
            .map(|i| vec![(i % 251) as u8; 1 + (i % 7) as usize])
            .collect();
        let refs: Vec<&[u8]> = pieces.iter().map(|p| &p[..]).collect();
        f.write_vectored_at(&refs, 100).unwrap();
        let want = pieces.concat();
        let mut got = vec![0u8; want.len()];
        f.read_at(&mut got, 100).unwrap();
        assert_eq!(got, want);
        assert_eq!(f.len().unwrap(), 100 + want.len() as u64);
    }
}

#[cfg(test)]
mod page_cache_sync_tests {
    use super::*;

    fn eio() -> io::Result<()> {
        Err(io::Error::from_raw_os_error(libc::EIO))
    }

    #[test]
    fn a_failure_after_buffered_writes_stays_failed() {
        let p = PageCacheSync::default();
        // Only O_DIRECT data since the last sync: a retry is meaningful.
        assert!(p.sync(eio).is_err());
        assert!(p.sync(|| Ok(())).is_ok());
        // Buffered writes, then a failure: every later sync fails.
        p.wrote();
        assert!(p.sync(|| Ok(())).is_ok());
        p.wrote();
        assert_eq!(p.sync(eio).unwrap_err().raw_os_error(), Some(libc::EIO));
        let mut called = false;
        let r = p.sync(|| {
            called = true;
            Ok(())
        });
        assert_eq!(r.unwrap_err().raw_os_error(), Some(libc::EIO));
        assert!(!called, "not issued again");
    }
}
