//! The types of the C interface: the opaque handle and the `#[repr(C)]`
//! structs, with their conversions from the engine's types.

use crate::consts::*;
use crate::error::FfiError;
use qcow2_ops::{Image, MapEntry};
use std::ffi::c_char;

/// An open qcow2 image (opaque).
///
/// Thread safety: a handle may be used from several threads at once; every
/// function except qcow2_close may be called concurrently on the same handle
/// (requests are serialised inside the engine). qcow2_close must be called
/// exactly once, after every other call on the handle has returned.
pub struct Qcow2Image {
    pub(crate) inner: Image,
}

/// Options of qcow2_create. A zero-filled struct (or a NULL pointer) means the
/// defaults: version 3, 64 KiB clusters, 16-bit refcounts, no extended L2, no
/// lazy refcounts, no backing file, zlib compression.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct Qcow2CreateOptions {
    /// 2 (compat=0.10) or 3 (compat=1.1); 0 means 3.
    pub version: u32,
    /// Cluster size in bytes, a power of two from 512 to 2 MiB; 0 means 65536.
    pub cluster_size: u64,
    /// Refcount width in bits (1, 2, 4, 8, 16, 32, 64); 0 means 16. v2 images need 16.
    pub refcount_bits: u32,
    /// Extended L2 entries (subclusters); v3 only.
    pub extended_l2: bool,
    /// Lazy refcounts; v3 only.
    pub lazy_refcounts: bool,
    /// Backing file name, stored as given (relative names are relative to the
    /// image's directory); NULL for none. Bytes: need not be UTF-8.
    pub backing_file: *const c_char,
    /// Backing file format ("qcow2", "raw"); NULL for none (probed on open).
    pub backing_format: *const c_char,
    /// QCOW2_COMPRESSION_ZLIB (0) or QCOW2_COMPRESSION_ZSTD.
    pub compression_type: u32,
}

/// Options of qcow2_amend, as `qemu-img amend -o ...`. Every field's zero
/// value keeps the current setting, so a zero-filled struct changes nothing;
/// set only the fields to change.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
pub struct Qcow2AmendOptions {
    /// Target version: 2 (compat=0.10) or 3 (compat=1.1); 0 keeps the
    /// current one. Downgrading to 2 fails with -EINVAL when the image uses
    /// v3-only features (refcount width other than 16, extended L2,
    /// compression type zstd, ...); zero clusters are expanded and
    /// persistent bitmaps kept in the v2 header as QEMU 10 does (v2 readers
    /// then treat them as inconsistent).
    pub version: u32,
    /// QCOW2_AMEND_LAZY_KEEP (0), QCOW2_AMEND_LAZY_OFF or QCOW2_AMEND_LAZY_ON
    /// (v3 only); other values: -EINVAL.
    pub lazy_refcounts: u32,
    /// New refcount width in bits (1, 2, 4, 8, 16, 32 or 64; v3 only unless
    /// 16); 0 keeps the current width. A width too narrow for an existing
    /// refcount fails with -EINVAL before anything is written.
    pub refcount_bits: u32,
}

impl Qcow2AmendOptions {
    /// The engine's options; `-EINVAL` for values outside the documented ones.
    pub(crate) fn to_engine(self) -> Result<qcow2_ops::AmendOptions, FfiError> {
        // Destructured so that a field added to the C struct fails to compile here.
        let Qcow2AmendOptions {
            version,
            lazy_refcounts,
            refcount_bits,
        } = self;
        let version = match version {
            0 => None,
            2 | 3 => Some(version),
            v => return Err(FfiError::invalid(format!("unknown version {v} (2 or 3)"))),
        };
        let lazy_refcounts = match lazy_refcounts {
            QCOW2_AMEND_LAZY_KEEP => None,
            QCOW2_AMEND_LAZY_OFF => Some(false),
            QCOW2_AMEND_LAZY_ON => Some(true),
            v => {
                return Err(FfiError::invalid(format!(
                    "unknown lazy_refcounts value {v} (QCOW2_AMEND_LAZY_KEEP, _OFF or _ON)"
                )))
            }
        };
        let refcount_bits = match refcount_bits {
            0 => None,
            b if b.is_power_of_two() && b <= 64 => Some(b),
            b => {
                return Err(FfiError::invalid(format!(
                    "refcount_bits {b} is not a power of two from 1 to 64"
                )))
            }
        };
        Ok(qcow2_ops::AmendOptions {
            version,
            lazy_refcounts,
            refcount_bits,
            ..Default::default()
        })
    }
}

/// Churn and cache counters since open or the last qcow2_reset_stats. Field
/// names and order are a contract shared with the Rust API and the CLI.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Qcow2Stats {
    /// L2 slice lookups served from the cache.
    pub l2_hits: u64,
    /// L2 slice lookups that read from the file.
    pub l2_misses: u64,
    /// Clean-to-dirty transitions of cached L2 slices.
    pub l2_dirty_marks: u64,
    /// L2 write calls.
    pub l2_writebacks: u64,
    /// Bytes of L2 tables written.
    pub l2_bytes_written: u64,
    /// Clean-to-dirty transitions of cached refcount block slices.
    pub refblock_dirty_marks: u64,
    /// Refcount block write calls.
    pub refblock_writebacks: u64,
    /// Bytes of refcount blocks written.
    pub refblock_bytes_written: u64,
    /// Cache flushes that wrote anything.
    pub cache_flushes: u64,
    /// fdatasync calls on the image file.
    pub file_syncs: u64,
    /// Guest data bytes written (including zero-fill fallbacks and copy-on-write).
    pub data_bytes_written: u64,
    /// Holes punched in the image file.
    pub holes_punched: u64,
    /// L2 entries already in the target state, left alone.
    pub zero_entries_skipped: u64,
}

impl From<qcow2_ops::Stats> for Qcow2Stats {
    fn from(s: qcow2_ops::Stats) -> Self {
        // Destructured so that a counter added to the engine fails to compile here.
        let qcow2_ops::Stats {
            l2_hits,
            l2_misses,
            l2_dirty_marks,
            l2_writebacks,
            l2_bytes_written,
            refblock_dirty_marks,
            refblock_writebacks,
            refblock_bytes_written,
            cache_flushes,
            file_syncs,
            data_bytes_written,
            holes_punched,
            zero_entries_skipped,
        } = s;
        Qcow2Stats {
            l2_hits,
            l2_misses,
            l2_dirty_marks,
            l2_writebacks,
            l2_bytes_written,
            refblock_dirty_marks,
            refblock_writebacks,
            refblock_bytes_written,
            cache_flushes,
            file_syncs,
            data_bytes_written,
            holes_punched,
            zero_entries_skipped,
        }
    }
}

/// One extent of the allocation map, as one line of `qemu-img map --output=json`.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Qcow2Extent {
    /// Guest offset in bytes.
    pub start: u64,
    /// Length in bytes.
    pub length: u64,
    /// Host offset in the file of layer `depth`; valid only when `flags` has
    /// QCOW2_EXTENT_OFFSET_VALID, else 0.
    pub host_offset: u64,
    /// QCOW2_EXTENT_* bits.
    pub flags: u32,
    /// Layer of the backing chain that answered (0: this image).
    pub depth: u32,
}

impl From<&MapEntry> for Qcow2Extent {
    fn from(e: &MapEntry) -> Self {
        let mut flags = 0;
        if e.present {
            flags |= QCOW2_EXTENT_ALLOCATED;
        }
        if e.zero {
            flags |= QCOW2_EXTENT_ZERO;
        }
        if e.data {
            flags |= QCOW2_EXTENT_DATA;
        }
        if e.compressed {
            flags |= QCOW2_EXTENT_COMPRESSED;
        }
        if e.offset.is_some() {
            flags |= QCOW2_EXTENT_OFFSET_VALID;
        }
        Qcow2Extent {
            start: e.start,
            length: e.length,
            host_offset: e.offset.unwrap_or(0),
            flags,
            depth: e.depth,
        }
    }
}

/// Compile-time checks that the C values agree with the engine's.
mod abi_checks {
    use super::*;

    // The request flags are QEMU's values, as the engine's.
    const _: () = assert!(QCOW2_REQ_MAY_UNMAP == qcow2_ops::REQ_MAY_UNMAP);
    const _: () = assert!(QCOW2_REQ_FUA == qcow2_ops::REQ_FUA);
    const _: () = assert!(QCOW2_REQ_NO_FALLBACK == qcow2_ops::REQ_NO_FALLBACK);
    // Same size as the engine's Stats; the set of names is checked by the
    // destructuring in `From<qcow2_ops::Stats>`, the C order (docs/DESIGN.md) by
    // tests/header.rs.
    const _: () =
        assert!(std::mem::size_of::<Qcow2Stats>() == std::mem::size_of::<qcow2_ops::Stats>());
    // A handle is shared between threads by C callers.
    const _: fn() = || {
        fn send_sync<T: Send + Sync>() {}
        send_sync::<Qcow2Image>();
    };
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn amend_options_zero_keeps_everything() {
        let o = Qcow2AmendOptions::default().to_engine().unwrap();
        assert_eq!(o, qcow2_ops::AmendOptions::default());
    }

    #[test]
    fn amend_options_values() {
        let o = Qcow2AmendOptions {
            version: 2,
            lazy_refcounts: QCOW2_AMEND_LAZY_OFF,
            refcount_bits: 1,
        }
        .to_engine()
        .unwrap();
        assert_eq!(
            o,
            qcow2_ops::AmendOptions {
                version: Some(2),
                lazy_refcounts: Some(false),
                refcount_bits: Some(1),
                ..Default::default()
            }
        );
        let on = Qcow2AmendOptions {
            lazy_refcounts: QCOW2_AMEND_LAZY_ON,
            ..Default::default()
        };
        assert_eq!(on.to_engine().unwrap().lazy_refcounts, Some(true));
        for bad in [
            Qcow2AmendOptions {
                version: 1,
                ..Default::default()
            },
            Qcow2AmendOptions {
                lazy_refcounts: 3,
                ..Default::default()
            },
            Qcow2AmendOptions {
                refcount_bits: 3,
                ..Default::default()
            },
            Qcow2AmendOptions {
                refcount_bits: 128,
                ..Default::default()
            },
        ] {
            assert_eq!(bad.to_engine().unwrap_err().errno(), -libc::EINVAL);
        }
    }
}
