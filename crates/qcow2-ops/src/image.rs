//! The image handle.

use crate::error::{Error, Result};
use crate::types::*;
use std::path::Path;

/// An open qcow2 image.
pub struct Image {
    _p: (),
}

fn todo_err() -> Error {
    Error::NotSupported("not implemented yet".into())
}

impl Image {
    /// Opens the image at `path`.
    pub fn open(path: impl AsRef<Path>, opts: &OpenOptions) -> Result<Image> {
        let _ = (path.as_ref(), opts);
        Err(todo_err())
    }
    /// Creates a new image file at `path` of `size` bytes (fails if it exists? no: truncates, as qemu-img).
    pub fn create(path: impl AsRef<Path>, size: u64, opts: &CreateOptions) -> Result<()> {
        let _ = (path.as_ref(), size, opts);
        Err(todo_err())
    }
    /// Virtual size in bytes.
    pub fn virtual_size(&self) -> u64 {
        0
    }
    /// Cluster size in bytes.
    pub fn cluster_size(&self) -> u64 {
        0
    }
    /// Header information.
    pub fn info(&self) -> ImageInfo {
        unimplemented!()
    }
    /// Reads `buf.len()` bytes at guest `offset`.
    pub fn read(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        let _ = (offset, buf);
        Err(todo_err())
    }
    /// Writes `buf` at guest `offset`; `flags` may hold [`REQ_FUA`].
    pub fn write(&self, offset: u64, buf: &[u8], flags: u32) -> Result<()> {
        let _ = (offset, buf, flags);
        Err(todo_err())
    }
    /// Zeroes `len` bytes at `offset` with QEMU's semantics; flags [`REQ_MAY_UNMAP`],
    /// [`REQ_FUA`], [`REQ_NO_FALLBACK`].
    pub fn write_zeroes(&self, offset: u64, len: u64, flags: u32) -> Result<()> {
        let _ = (offset, len, flags);
        Err(todo_err())
    }
    /// Discards whole clusters in the range (partial clusters: no-op).
    pub fn discard(&self, offset: u64, len: u64) -> Result<()> {
        let _ = (offset, len);
        Err(todo_err())
    }
    /// Writes back caches and syncs (per cache mode).
    pub fn flush(&self) -> Result<()> {
        Err(todo_err())
    }
    /// Allocation status of `[offset, offset+len)`, merged like `qemu-img map`.
    pub fn block_status(&self, offset: u64, len: u64) -> Result<Vec<MapEntry>> {
        let _ = (offset, len);
        Err(todo_err())
    }
    /// The whole map, equal to `qemu-img map --output=json`.
    pub fn map(&self) -> Result<Vec<MapEntry>> {
        self.block_status(0, self.virtual_size())
    }
    /// Checks (and optionally repairs) metadata consistency.
    pub fn check(&self, repair: RepairMode) -> Result<CheckReport> {
        let _ = repair;
        Err(todo_err())
    }
    /// Counters since open or the last reset.
    pub fn stats(&self) -> Stats {
        Stats::default()
    }
    /// Resets the counters.
    pub fn reset_stats(&self) {}
    /// Flushes and closes.
    pub fn close(self) -> Result<()> {
        Err(todo_err())
    }
}
