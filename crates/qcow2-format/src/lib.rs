//! On-disk structures of the qcow2 image format (QEMU `docs/interop/qcow2.rst`).
//!
//! Pure codecs and validation: no I/O happens here. Every value read from an
//! image is untrusted; the parsers check alignment, ranges and table sizes
//! with overflow-checked arithmetic before anything is returned.
#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod bitmap;
pub mod entry;
pub mod error;
pub mod header;
pub mod refcount;
pub mod snapshot;

pub use entry::{
    ClusterType, CompressedDescriptor, L1Entry, L2Entry, SubclusterType, L2_BITMAP_ALL_ZERO,
};
pub use error::FormatError;
pub use header::Geometry;
pub use header::{
    CompressionType, Extension, FeatureName, Header, EXT_BACKING_FORMAT, EXT_BITMAPS,
    EXT_DATA_FILE, EXT_END, EXT_FEATURE_TABLE, EXT_FULL_DISK_ENCRYPTION,
};

/// Big-endian u64 from an 8-byte slice starting at `off` (caller guarantees bounds).
#[inline]
pub fn be64(buf: &[u8], off: usize) -> u64 {
    let mut b = [0u8; 8];
    b.copy_from_slice(&buf[off..off + 8]);
    u64::from_be_bytes(b)
}

/// Big-endian u32 from a 4-byte slice starting at `off` (caller guarantees bounds).
#[inline]
pub fn be32(buf: &[u8], off: usize) -> u32 {
    let mut b = [0u8; 4];
    b.copy_from_slice(&buf[off..off + 4]);
    u32::from_be_bytes(b)
}

/// Stores `v` big-endian at `off`.
#[inline]
pub fn put_be64(buf: &mut [u8], off: usize, v: u64) {
    buf[off..off + 8].copy_from_slice(&v.to_be_bytes());
}

/// Stores `v` big-endian at `off`.
#[inline]
pub fn put_be32(buf: &mut [u8], off: usize, v: u32) {
    buf[off..off + 4].copy_from_slice(&v.to_be_bytes());
}
