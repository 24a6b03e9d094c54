//! Storage backends for qcow2 images.
//!
//! [`Storage`] is positional I/O on one file: read, write, sync, punch a
//! hole, length. [`FileStorage`] implements it on `libc` (pread, pwrite,
//! fdatasync, fallocate); [`MemStorage`] keeps the bytes in memory for unit
//! tests and benchmarks. Test support, only with the `test-support`
//! feature (tests and benches enable it; the library never does):
//! `CountingStorage` counts calls of any backend, `FaultStorage` injects
//! errors and simulates power loss.
#![warn(missing_docs)]

#[cfg(any(test, feature = "test-support"))]
mod counting;
#[cfg(any(test, feature = "test-support"))]
mod fault;
mod file;
mod mem;

#[cfg(any(test, feature = "test-support"))]
pub use counting::{CountingStorage, IoCounts};
#[cfg(any(test, feature = "test-support"))]
pub use fault::{FaultPlan, FaultStorage};
pub use file::{FileStorage, OpenMode};
pub use mem::MemStorage;

use std::io;

/// Positional I/O on one image file. All methods take `&self`; backends
/// are safe to share between threads.
pub trait Storage: Send + Sync {
    /// Fills `buf` from `offset`. Bytes past the end of the file read as zeroes.
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()>;
    /// Writes all of `buf` at `offset`, growing the file as needed.
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()>;
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
}

impl<T: Storage + ?Sized> Storage for Box<T> {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        (**self).read_at(buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        (**self).write_at(buf, offset)
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
}

impl<T: Storage + ?Sized> Storage for std::sync::Arc<T> {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        (**self).read_at(buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        (**self).write_at(buf, offset)
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
}
