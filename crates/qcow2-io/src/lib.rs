//! Storage backends for qcow2 images.
//!
//! [`Storage`] is positional I/O on one file: read, write, sync, punch a
//! hole, length. [`FileStorage`] implements it on `libc` (pread, pwrite,
//! fdatasync, fallocate); [`MemStorage`] keeps the bytes in memory for unit
//! tests and benchmarks. Test support, only with the `test-support`
//! feature (tests and benches enable it; the library never does):
//! `CountingStorage` counts calls of any backend, `FaultStorage` injects
//! errors and simulates power loss. [`StickySync`] keeps a failed sync
//! failed. [`Ring`] runs file I/O asynchronously on io_uring, for servers
//! that move guest data themselves ([`Storage::raw_file`]).
#![warn(missing_docs)]

mod blkdebug;
#[cfg(any(test, feature = "test-support"))]
mod counting;
mod events;
#[cfg(any(test, feature = "test-support"))]
mod fault;
mod file;
mod mem;
mod nbd;
pub mod nbd_proto;
mod signals;
mod uring;

pub use blkdebug::{take_rules, Action, Blkdebug, IoType, RawEvents, Rule, Rules};
#[cfg(any(test, feature = "test-support"))]
pub use counting::{CountingStorage, IoCounts};
pub use events::DebugEvent;
#[cfg(any(test, feature = "test-support"))]
pub use fault::{FaultPlan, FaultStorage};
pub use file::{FileStorage, OpenMode};
pub use mem::{MemStorage, NullStorage};
pub use nbd::{parse_nbd_name, NbdAddress, NbdStorage};
pub use signals::{catch_termination, termination};
pub use uring::{Completion, IoBuf, Ring, IO_ALIGN, IO_HUGE_MIN};

use std::io;
use std::sync::atomic::Ordering;

/// A file descriptor data may be moved with directly ([`Storage::raw_file`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RawFile {
    /// The descriptor, valid while the storage is.
    pub fd: std::os::fd::RawFd,
    /// Offsets, lengths and memory of direct I/O must be multiples of this
    /// (O_DIRECT); 1 for buffered files.
    pub align: usize,
}

/// Positional I/O on one image file. All methods take `&self`; backends
/// are safe to share between threads.
pub trait Storage: Send + Sync {
    /// Fills `buf` from `offset`. Bytes past the end of the file read as zeroes.
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()>;
    /// Writes all of `buf` at `offset`, growing the file as needed.
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()>;
    /// Writes the buffers one after the other from `offset` (one `pwritev`
    /// where the backend can). The default writes them one by one.
    fn write_vectored_at(&self, bufs: &[&[u8]], offset: u64) -> io::Result<()> {
        let mut pos = offset;
        for b in bufs {
            self.write_at(b, pos)?;
            pos += b.len() as u64;
        }
        Ok(())
    }
    /// Makes every completed write durable (fdatasync).
    fn sync(&self) -> io::Result<()>;
    /// Deallocates the range; it reads as zeroes afterwards. Backends that
    /// cannot punch holes write zeroes or do nothing and return `Ok(false)`.
    fn punch_hole(&self, offset: u64, len: u64) -> io::Result<bool>;
    /// Current length of the file.
    fn len(&self) -> io::Result<u64>;
    /// Whether the file is empty.
    fn is_empty(&self) -> io::Result<bool> {
        Ok(self.len()? == 0)
    }
    /// Truncates or extends the file.
    fn set_len(&self, len: u64) -> io::Result<()>;
    /// Next data at or after `offset` (SEEK_DATA); `None` when only a hole
    /// follows. Backends without hole tracking say everything is data.
    fn next_data(&self, offset: u64) -> io::Result<Option<u64>> {
        Ok(if offset < self.len()? {
            Some(offset)
        } else {
            None
        })
    }
    /// Next hole at or after `offset` (SEEK_HOLE); the end of the file counts as a hole.
    fn next_hole(&self, offset: u64) -> io::Result<u64> {
        let _ = offset;
        self.len()
    }
    /// Bytes the file really occupies on disk (st_blocks), where known.
    fn allocated_size(&self) -> io::Result<Option<u64>> {
        Ok(None)
    }
    /// The descriptor under this storage when data may be read and written
    /// with it directly (a plain file, no layer that must see each request),
    /// and the alignment such I/O needs.
    fn raw_file(&self) -> Option<RawFile> {
        None
    }
    /// The driver above reached a named point of its work (see
    /// [`DebugEvent`]). Plain storage ignores it; error injection acts on it.
    fn event(&self, ev: DebugEvent) {
        let _ = ev;
    }
}

impl<T: Storage + ?Sized> Storage for Box<T> {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        (**self).read_at(buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        (**self).write_at(buf, offset)
    }
    fn write_vectored_at(&self, bufs: &[&[u8]], offset: u64) -> io::Result<()> {
        (**self).write_vectored_at(bufs, offset)
    }
    fn sync(&self) -> io::Result<()> {
        (**self).sync()
    }
    fn punch_hole(&self, offset: u64, len: u64) -> io::Result<bool> {
        (**self).punch_hole(offset, len)
    }
    fn len(&self) -> io::Result<u64> {
        (**self).len()
    }
    fn set_len(&self, len: u64) -> io::Result<()> {
        (**self).set_len(len)
    }
    fn next_data(&self, offset: u64) -> io::Result<Option<u64>> {
        (**self).next_data(offset)
    }
    fn next_hole(&self, offset: u64) -> io::Result<u64> {
        (**self).next_hole(offset)
    }
    fn allocated_size(&self) -> io::Result<Option<u64>> {
        (**self).allocated_size()
    }
    fn raw_file(&self) -> Option<RawFile> {
        (**self).raw_file()
    }
    fn event(&self, ev: DebugEvent) {
        (**self).event(ev)
    }
}

impl<T: Storage + ?Sized> Storage for std::sync::Arc<T> {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        (**self).read_at(buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        (**self).write_at(buf, offset)
    }
    fn write_vectored_at(&self, bufs: &[&[u8]], offset: u64) -> io::Result<()> {
        (**self).write_vectored_at(bufs, offset)
    }
    fn sync(&self) -> io::Result<()> {
        (**self).sync()
    }
    fn punch_hole(&self, offset: u64, len: u64) -> io::Result<bool> {
        (**self).punch_hole(offset, len)
    }
    fn len(&self) -> io::Result<u64> {
        (**self).len()
    }
    fn set_len(&self, len: u64) -> io::Result<()> {
        (**self).set_len(len)
    }
    fn next_data(&self, offset: u64) -> io::Result<Option<u64>> {
        (**self).next_data(offset)
    }
    fn next_hole(&self, offset: u64) -> io::Result<u64> {
        (**self).next_hole(offset)
    }
    fn allocated_size(&self) -> io::Result<Option<u64>> {
        (**self).allocated_size()
    }
    fn raw_file(&self) -> Option<RawFile> {
        (**self).raw_file()
    }
    fn event(&self, ev: DebugEvent) {
        (**self).event(ev)
    }
}

/// Keeps a failed sync failed. After fdatasync fails, the kernel may already
/// have marked the dirty pages clean (Linux does), so a retried sync would
/// return 0 over lost data: every later `sync` fails with the errno of the
/// first failure and is not issued at all, as in QEMU's file driver. Off for
/// O_DIRECT files, as in QEMU (their data never sits in the page cache; the
/// unaligned writes a `FileStorage` sends through its buffered descriptor
/// get the same rule from `FileStorage` itself).
pub struct StickySync<S> {
    inner: S,
    enabled: bool,
    failed: std::sync::Arc<std::sync::atomic::AtomicI32>,
}

impl<S: Storage> StickySync<S> {
    /// Wraps `inner`; with `enabled` false, failures are passed on only.
    pub fn new(inner: S, enabled: bool) -> Self {
        StickySync {
            inner,
            enabled,
            failed: Default::default(),
        }
    }
    /// Shared view of the state: the errno of the failed sync, 0 while none failed.
    pub fn failed_errno(&self) -> std::sync::Arc<std::sync::atomic::AtomicI32> {
        std::sync::Arc::clone(&self.failed)
    }
}

impl<S: Storage> Storage for StickySync<S> {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.inner.read_at(buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.inner.write_at(buf, offset)
    }
    fn write_vectored_at(&self, bufs: &[&[u8]], offset: u64) -> io::Result<()> {
        self.inner.write_vectored_at(bufs, offset)
    }
    fn sync(&self) -> io::Result<()> {
        let errno = self.failed.load(Ordering::SeqCst);
        if errno != 0 {
            return Err(io::Error::from_raw_os_error(errno));
        }
        let r = self.inner.sync();
        if let Err(e) = &r {
            if self.enabled {
                let errno = e.raw_os_error().unwrap_or(libc::EIO);
                let _ = self
                    .failed
                    .compare_exchange(0, errno, Ordering::SeqCst, Ordering::SeqCst);
            }
        }
        r
    }
    fn punch_hole(&self, offset: u64, len: u64) -> io::Result<bool> {
        self.inner.punch_hole(offset, len)
    }
    fn len(&self) -> io::Result<u64> {
        self.inner.len()
    }
    fn set_len(&self, len: u64) -> io::Result<()> {
        self.inner.set_len(len)
    }
    fn next_data(&self, offset: u64) -> io::Result<Option<u64>> {
        self.inner.next_data(offset)
    }
    fn next_hole(&self, offset: u64) -> io::Result<u64> {
        self.inner.next_hole(offset)
    }
    fn allocated_size(&self) -> io::Result<Option<u64>> {
        self.inner.allocated_size()
    }
    fn raw_file(&self) -> Option<RawFile> {
        self.inner.raw_file()
    }
    fn event(&self, ev: DebugEvent) {
        self.inner.event(ev)
    }
}

#[cfg(test)]
mod sticky_tests {
    use super::*;

    #[test]
    fn failed_sync_stays_failed() {
        let f = std::sync::Arc::new(FaultStorage::new(vec![0; 512]));
        f.set_plan(FaultPlan {
            fail_at: Some((2, libc::ENOSPC)),
            crash_after: None,
        });
        let s = StickySync::new(std::sync::Arc::clone(&f), true);
        s.write_at(b"x", 0).unwrap();
        assert_eq!(s.sync().unwrap_err().raw_os_error(), Some(libc::ENOSPC));
        assert_eq!(s.failed_errno().load(Ordering::SeqCst), libc::ENOSPC);
        // The inner storage would sync now; the wrapper does not even ask it.
        assert_eq!(s.sync().unwrap_err().raw_os_error(), Some(libc::ENOSPC));
        assert_eq!(f.ops(), 2);
        // Without stickiness (O_DIRECT) the retry goes through.
        let g = FaultStorage::new(vec![0; 512]);
        g.set_plan(FaultPlan {
            fail_at: Some((1, libc::EIO)),
            crash_after: None,
        });
        let d = StickySync::new(g, false);
        assert!(d.sync().is_err());
        d.sync().unwrap();
    }
}
