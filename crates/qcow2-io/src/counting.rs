//! A backend wrapper that counts calls (test support).

use crate::Storage;
use std::io;
use std::sync::atomic::{AtomicU64, Ordering};

/// Call counts of a [`CountingStorage`].
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct IoCounts {
    /// read_at calls.
    pub reads: u64,
    /// Bytes read.
    pub bytes_read: u64,
    /// write_at calls.
    pub writes: u64,
    /// Bytes written.
    pub bytes_written: u64,
    /// sync calls.
    pub syncs: u64,
    /// punch_hole calls.
    pub punches: u64,
}

/// Wraps a backend and counts every call.
pub struct CountingStorage<S> {
    inner: S,
    reads: AtomicU64,
    bytes_read: AtomicU64,
    writes: AtomicU64,
    bytes_written: AtomicU64,
    syncs: AtomicU64,
    punches: AtomicU64,
}

impl<S: Storage> CountingStorage<S> {
    /// Wraps `inner`.
    pub fn new(inner: S) -> Self {
        CountingStorage {
            inner,
            reads: AtomicU64::new(0),
            bytes_read: AtomicU64::new(0),
            writes: AtomicU64::new(0),
            bytes_written: AtomicU64::new(0),
            syncs: AtomicU64::new(0),
            punches: AtomicU64::new(0),
        }
    }
    /// Counts so far.
    pub fn counts(&self) -> IoCounts {
        IoCounts {
            reads: self.reads.load(Ordering::Relaxed),
            bytes_read: self.bytes_read.load(Ordering::Relaxed),
            writes: self.writes.load(Ordering::Relaxed),
            bytes_written: self.bytes_written.load(Ordering::Relaxed),
            syncs: self.syncs.load(Ordering::Relaxed),
            punches: self.punches.load(Ordering::Relaxed),
        }
    }
    /// The wrapped backend.
    pub fn inner(&self) -> &S {
        &self.inner
    }
}

impl<S: Storage> Storage for CountingStorage<S> {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.reads.fetch_add(1, Ordering::Relaxed);
        self.bytes_read
            .fetch_add(buf.len() as u64, Ordering::Relaxed);
        self.inner.read_at(buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.writes.fetch_add(1, Ordering::Relaxed);
        self.bytes_written
            .fetch_add(buf.len() as u64, Ordering::Relaxed);
        self.inner.write_at(buf, offset)
    }
    fn sync(&self) -> io::Result<()> {
        self.syncs.fetch_add(1, Ordering::Relaxed);
        self.inner.sync()
    }
    fn punch_hole(&self, offset: u64, len: u64) -> io::Result<bool> {
        self.punches.fetch_add(1, Ordering::Relaxed);
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
    fn event(&self, ev: crate::DebugEvent) {
        self.inner.event(ev)
    }
}
