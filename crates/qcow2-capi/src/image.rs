//! The exported functions on an image handle (and qcow2_create).

use crate::consts::*;
use crate::error::{invalid, FfiError};
use crate::panic::ffi_boundary;
use crate::ptr::*;
use crate::types::*;
use qcow2_ops::{CacheMode, CreateOptions, DiscardMode, Image, OpenOptions};
use std::ffi::{c_char, c_int, OsStr};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

/// The shared body of the getters: checks both pointers, then writes
/// `f(image)` to `out`.
///
/// # Safety
/// `img` must be NULL or an open handle; `out` must be NULL or writable.
unsafe fn get_into<T>(
    func: &'static str,
    img: *const Qcow2Image,
    out: *mut T,
    f: impl FnOnce(&Image) -> T,
) -> c_int {
    ffi_boundary(func, || {
        // SAFETY: `img` is NULL or an open handle (contract above).
        let img = &unsafe { check_ref(img, "img") }?.inner;
        // SAFETY: `out` is NULL or writable (contract above).
        let out = unsafe { check_mut(out, "out") }?;
        *out = f(img);
        Ok(())
    })
}

/// Creates a new qcow2 image file (an existing file is truncated, as qemu-img does).
///
/// Parameters:
/// - `path`: NUL-terminated file name.
/// - `size`: virtual size in bytes.
/// - `opts`: creation options, or NULL for the defaults.
///
/// Returns 0 on success; -EINVAL for a NULL `path`, a bad option or a
/// non-UTF-8 backing format name; -ENOTSUP for an unsupported combination;
/// other negative errno values from the file system (-ENOENT, -EACCES,
/// -ENOSPC, ...).
///
/// # Safety
/// `path` must be NULL or a NUL-terminated string. `opts` must be NULL or
/// point to a readable `Qcow2CreateOptions` whose string fields are each NULL
/// or NUL-terminated.
#[no_mangle]
pub unsafe extern "C" fn qcow2_create(
    path: *const c_char,
    size: u64,
    opts: *const Qcow2CreateOptions,
) -> c_int {
    ffi_boundary("qcow2_create", || {
        // SAFETY: `path` is NULL or NUL-terminated (contract above).
        let path = unsafe { check_cstr(path, "path") }?;
        // SAFETY: `opts` is NULL or readable with valid strings (contract above).
        let o = unsafe { create_options(opts) }?;
        let path = Path::new(OsStr::from_bytes(path.to_bytes()));
        Image::create(path, size, &o).map_err(FfiError::from)
    })
}

/// The engine's options for a `Qcow2CreateOptions` (NULL: the defaults).
///
/// # Safety
/// `opts` must be NULL or point to a readable `Qcow2CreateOptions` whose
/// string fields are each NULL or NUL-terminated.
pub(crate) unsafe fn create_options(
    opts: *const Qcow2CreateOptions,
) -> Result<CreateOptions, FfiError> {
    let mut o = CreateOptions::default();
    if !opts.is_null() {
        // SAFETY: non-NULL `opts` points to a readable struct (contract above).
        let c = unsafe { check_ref(opts, "opts") }?;
        o.version = match c.version {
            0 => 3,
            v @ (2 | 3) => v,
            v => return invalid(format!("opts->version {v}: expected 0, 2 or 3")),
        };
        if c.cluster_size != 0 {
            o.cluster_size = c.cluster_size;
        }
        if c.refcount_bits != 0 {
            o.refcount_bits = c.refcount_bits;
        }
        o.extended_l2 = c.extended_l2;
        o.lazy_refcounts = c.lazy_refcounts;
        o.zstd = match c.compression_type {
            QCOW2_COMPRESSION_ZLIB => false,
            QCOW2_COMPRESSION_ZSTD => true,
            t => {
                return invalid(format!(
                    "opts->compression_type {t}: expected QCOW2_COMPRESSION_ZLIB or QCOW2_COMPRESSION_ZSTD"
                ))
            }
        };
        // SAFETY: each string field is NULL or NUL-terminated (contract above).
        o.backing_file = unsafe { opt_bytes(c.backing_file, "opts->backing_file") }?;
        // SAFETY: as above.
        o.backing_format = unsafe { opt_utf8(c.backing_format, "opts->backing_format") }?;
    }
    Ok(o)
}

/// Opens a qcow2 image.
///
/// Parameters:
/// - `path`: NUL-terminated file name.
/// - `flags`: QCOW2_OPEN_* bits: QCOW2_OPEN_RDWR (else read-only),
///   QCOW2_OPEN_UNMAP (else discard mode ignore), QCOW2_OPEN_NO_BACKING, and at
///   most one of QCOW2_OPEN_CACHE_WRITETHROUGH, QCOW2_OPEN_CACHE_UNSAFE,
///   QCOW2_OPEN_CACHE_NONE (none: writeback), or
///   QCOW2_OPEN_CACHE_NONE | QCOW2_OPEN_CACHE_WRITETHROUGH for `directsync`;
///   QCOW2_OPEN_LAZY_REFCOUNTS or QCOW2_OPEN_NO_LAZY_REFCOUNTS (else as the
///   header says); QCOW2_OPEN_OVERLAP_INACTIVE_L2.
/// - `out`: receives the new handle on success.
///
/// Returns 0 on success; -EINVAL for NULL arguments, unknown flag bits, two
/// cache modes (other than directsync), both lazy-refcount flags or lazy
/// refcounts on a v2 image; -ENOENT if the file does not exist;
/// -ENOTSUP for unsupported features; -EINVAL or -EIO for a damaged image;
/// other negative errno values from the file system.
///
/// # Safety
/// `path` must be NULL or a NUL-terminated string; `out` must be NULL or valid
/// for writing a pointer. The handle written to `out` must be released with
/// qcow2_close exactly once.
#[no_mangle]
pub unsafe extern "C" fn qcow2_open(
    path: *const c_char,
    flags: u32,
    out: *mut *mut Qcow2Image,
) -> c_int {
    ffi_boundary("qcow2_open", || {
        // SAFETY: `path` is NULL or NUL-terminated (contract above).
        let path = unsafe { check_cstr(path, "path") }?;
        // SAFETY: `out` is NULL or writable (contract above).
        let out = unsafe { check_mut(out, "out") }?;
        let opts = open_options(flags)?;
        let path = Path::new(OsStr::from_bytes(path.to_bytes()));
        let inner = Image::open(path, &opts).map_err(FfiError::from)?;
        *out = Box::into_raw(Box::new(Qcow2Image { inner }));
        Ok(())
    })
}

/// The engine's options for the QCOW2_OPEN_* bits `flags`.
pub(crate) fn open_options(flags: u32) -> Result<OpenOptions, FfiError> {
    if flags & !QCOW2_OPEN_KNOWN != 0 {
        return invalid(format!(
            "unknown flag bits {:#x}",
            flags & !QCOW2_OPEN_KNOWN
        ));
    }
    let cache = match flags
        & (QCOW2_OPEN_CACHE_WRITETHROUGH | QCOW2_OPEN_CACHE_UNSAFE | QCOW2_OPEN_CACHE_NONE)
    {
        0 => CacheMode::Writeback,
        QCOW2_OPEN_CACHE_WRITETHROUGH => CacheMode::Writethrough,
        QCOW2_OPEN_CACHE_UNSAFE => CacheMode::Unsafe,
        QCOW2_OPEN_CACHE_NONE => CacheMode::None,
        x if x == QCOW2_OPEN_CACHE_NONE | QCOW2_OPEN_CACHE_WRITETHROUGH => CacheMode::DirectSync,
        _ => return invalid(
            "more than one QCOW2_OPEN_CACHE_* flag (only NONE|WRITETHROUGH, directsync, combine)",
        ),
    };
    let lazy_refcounts = match (
        flags & QCOW2_OPEN_LAZY_REFCOUNTS != 0,
        flags & QCOW2_OPEN_NO_LAZY_REFCOUNTS != 0,
    ) {
        (true, true) => {
            return invalid("QCOW2_OPEN_LAZY_REFCOUNTS with QCOW2_OPEN_NO_LAZY_REFCOUNTS")
        }
        (true, false) => Some(true),
        (false, true) => Some(false),
        (false, false) => None,
    };
    Ok(OpenOptions {
        writable: flags & QCOW2_OPEN_RDWR != 0,
        lazy_refcounts,
        overlap_inactive_l2: flags & QCOW2_OPEN_OVERLAP_INACTIVE_L2 != 0,
        cache,
        discard: if flags & QCOW2_OPEN_UNMAP != 0 {
            DiscardMode::Unmap
        } else {
            DiscardMode::Ignore
        },
        open_backing: flags & QCOW2_OPEN_NO_BACKING == 0,
        ..OpenOptions::default()
    })
}

/// Flushes and closes an image, freeing the handle (even when the flush fails).
///
/// Parameters:
/// - `img`: the handle, or NULL (nothing happens).
///
/// Returns 0 on success (and for NULL); a negative errno if the final flush
/// failed (the handle is freed anyway).
///
/// # Safety
/// `img` must be NULL or a pointer returned by qcow2_open that has not been
/// closed, and no other call may be using it concurrently or later.
#[no_mangle]
pub unsafe extern "C" fn qcow2_close(img: *mut Qcow2Image) -> c_int {
    ffi_boundary("qcow2_close", || {
        if img.is_null() {
            return Ok(());
        }
        // SAFETY: a non-NULL `img` came from Box::into_raw in qcow2_open and
        // is given back exactly once (contract above).
        let img = unsafe { Box::from_raw(img) };
        img.inner.close().map_err(FfiError::from)
    })
}

/// Reads guest data.
///
/// Parameters:
/// - `img`: the image.
/// - `offset`: guest offset in bytes.
/// - `buf`: receives `len` bytes.
/// - `len`: number of bytes.
///
/// Returns 0 on success; -EINVAL for NULL `img` or `buf`, or a range past the
/// end of the image; -EIO (or another negative errno) if the file fails.
///
/// # Safety
/// `img` must be NULL or an open handle; `buf` must be NULL or valid for
/// writing `len` bytes.
#[no_mangle]
pub unsafe extern "C" fn qcow2_read(
    img: *mut Qcow2Image,
    offset: u64,
    buf: *mut libc::c_void,
    len: usize,
) -> c_int {
    ffi_boundary("qcow2_read", || {
        // SAFETY: `img` is NULL or an open handle (contract above).
        let img = &unsafe { check_ref(img, "img") }?.inner;
        // SAFETY: `buf` is NULL or writable for `len` bytes (contract above).
        let buf = unsafe { check_slice_mut(buf.cast(), len, "buf") }?;
        img.read(offset, buf).map_err(FfiError::from)
    })
}

/// Writes guest data.
///
/// Parameters:
/// - `img`: the image (opened with QCOW2_OPEN_RDWR).
/// - `offset`: guest offset in bytes.
/// - `buf`: `len` bytes to write.
/// - `len`: number of bytes.
/// - `flags`: 0, QCOW2_REQ_FUA, QCOW2_REQ_COMPRESSED (whole clusters only).
///
/// Returns 0 on success; -EINVAL for NULL `img` or `buf`, unknown flag bits,
/// a range past the end or a compressed write of partial clusters; -EIO for
/// a compressed write over an allocated cluster (as QEMU); -EROFS on a read-only image; -ENOSPC, -EIO or another
/// negative errno if the file fails.
///
/// # Safety
/// `img` must be NULL or an open handle; `buf` must be NULL or valid for
/// reading `len` bytes.
#[no_mangle]
pub unsafe extern "C" fn qcow2_write(
    img: *mut Qcow2Image,
    offset: u64,
    buf: *const libc::c_void,
    len: usize,
    flags: u32,
) -> c_int {
    ffi_boundary("qcow2_write", || {
        // SAFETY: `img` is NULL or an open handle (contract above).
        let img = &unsafe { check_ref(img, "img") }?.inner;
        // SAFETY: `buf` is NULL or readable for `len` bytes (contract above).
        let buf = unsafe { check_slice(buf.cast(), len, "buf") }?;
        img.write(offset, buf, flags).map_err(FfiError::from)
    })
}

/// Zeroes a guest range with QEMU's write-zeroes semantics (see docs/DESIGN.md):
/// whole clusters get the zero flag (or are unmapped), untouched when already
/// in the target state.
///
/// Parameters:
/// - `img`: the image (opened with QCOW2_OPEN_RDWR).
/// - `offset`, `len`: the guest range in bytes.
/// - `flags`: QCOW2_REQ_MAY_UNMAP (ignored unless opened with
///   QCOW2_OPEN_UNMAP), QCOW2_REQ_FUA, QCOW2_REQ_NO_FALLBACK.
///
/// Returns 0 on success; -EINVAL for a NULL `img`, unknown flag bits or a
/// range past the end; -ENOTSUP with QCOW2_REQ_NO_FALLBACK when zero data
/// would have to be written (always on v2 images); -EROFS on a read-only
/// image; other negative errno values if the file fails.
///
/// # Safety
/// `img` must be NULL or an open handle.
#[no_mangle]
pub unsafe extern "C" fn qcow2_write_zeroes(
    img: *mut Qcow2Image,
    offset: u64,
    len: u64,
    flags: u32,
) -> c_int {
    ffi_boundary("qcow2_write_zeroes", || {
        // SAFETY: `img` is NULL or an open handle (contract above).
        let img = &unsafe { check_ref(img, "img") }?.inner;
        img.write_zeroes(offset, len, flags).map_err(FfiError::from)
    })
}

/// Discards whole clusters of a guest range (partial clusters: successful
/// no-op; an image opened without QCOW2_OPEN_UNMAP: successful no-op).
///
/// Parameters:
/// - `img`: the image (opened with QCOW2_OPEN_RDWR).
/// - `offset`, `len`: the guest range in bytes.
///
/// Returns 0 on success; -EINVAL for a NULL `img` or a range past the end;
/// -EROFS on a read-only image; other negative errno values if the file fails.
///
/// # Safety
/// `img` must be NULL or an open handle.
#[no_mangle]
pub unsafe extern "C" fn qcow2_discard(img: *mut Qcow2Image, offset: u64, len: u64) -> c_int {
    ffi_boundary("qcow2_discard", || {
        // SAFETY: `img` is NULL or an open handle (contract above).
        let img = &unsafe { check_ref(img, "img") }?.inner;
        img.discard(offset, len).map_err(FfiError::from)
    })
}

/// Writes back cached metadata and syncs the file (per cache mode). A flush
/// with nothing dirty issues no sync. Once a sync of the file has failed,
/// what reached the disk is unknown: every later flush (and every FUA or
/// writethrough request) on the handle fails with that sync's errno, as in
/// QEMU (not with QCOW2_OPEN_CACHE_NONE, where no page cache is involved).
///
/// Parameters:
/// - `img`: the image.
///
/// Returns 0 on success; -EINVAL for NULL; a negative errno if the file fails.
///
/// # Safety
/// `img` must be NULL or an open handle.
#[no_mangle]
pub unsafe extern "C" fn qcow2_flush(img: *mut Qcow2Image) -> c_int {
    ffi_boundary("qcow2_flush", || {
        // SAFETY: `img` is NULL or an open handle (contract above).
        let img = &unsafe { check_ref(img, "img") }?.inner;
        img.flush().map_err(FfiError::from)
    })
}

/// Allocation status of a guest range, merged like `qemu-img map`.
///
/// Fills at most `max` extents describing a prefix of `[offset, offset+len)`,
/// in order. If the range needs more than `max` extents, the first `max` are
/// returned; call again from `out[max-1].start + out[max-1].length` to go on.
///
/// Parameters:
/// - `img`: the image.
/// - `offset`, `len`: the guest range in bytes.
/// - `out`: array of `max` extents.
/// - `max`: capacity of `out`, at least 1.
/// - `n_out`: receives the number of extents written (0 only when `len` is 0).
///
/// Returns 0 on success; -EINVAL for NULL pointers, `max` 0 or a range past
/// the end; a negative errno if the file fails.
///
/// # Safety
/// `img` must be NULL or an open handle; `out` must be NULL or valid for
/// writing `max` extents; `n_out` must be NULL or writable.
#[no_mangle]
pub unsafe extern "C" fn qcow2_block_status(
    img: *mut Qcow2Image,
    offset: u64,
    len: u64,
    out: *mut Qcow2Extent,
    max: usize,
    n_out: *mut usize,
) -> c_int {
    ffi_boundary("qcow2_block_status", || {
        // SAFETY: `img` is NULL or an open handle (contract above).
        let img = &unsafe { check_ref(img, "img") }?.inner;
        // SAFETY: `out` is NULL or writable for `max` extents (contract above).
        let out = unsafe { check_array_mut(out, max, "out") }?;
        // SAFETY: `n_out` is NULL or writable (contract above).
        let n_out = unsafe { check_mut(n_out, "n_out") }?;
        if max == 0 {
            return invalid("max is 0");
        }
        let map = if len == 0 {
            Vec::new()
        } else {
            img.block_status_limit(offset, len, max)
                .map_err(FfiError::from)?
        };
        let n = map.len().min(max);
        for (slot, e) in out.iter_mut().zip(&map) {
            *slot = Qcow2Extent::from(e);
        }
        *n_out = n;
        Ok(())
    })
}

/// The virtual size of the image.
///
/// Parameters:
/// - `img`: the image.
/// - `out`: receives the size in bytes.
///
/// Returns 0 on success; -EINVAL for NULL pointers.
///
/// # Safety
/// `img` must be NULL or an open handle; `out` must be NULL or writable.
#[no_mangle]
pub unsafe extern "C" fn qcow2_get_virtual_size(img: *const Qcow2Image, out: *mut u64) -> c_int {
    // SAFETY: forwarded contract: `img` NULL or open, `out` NULL or writable.
    unsafe { get_into("qcow2_get_virtual_size", img, out, |img| img.virtual_size()) }
}

/// The cluster size of the image.
///
/// Parameters:
/// - `img`: the image.
/// - `out`: receives the cluster size in bytes.
///
/// Returns 0 on success; -EINVAL for NULL pointers.
///
/// # Safety
/// `img` must be NULL or an open handle; `out` must be NULL or writable.
#[no_mangle]
pub unsafe extern "C" fn qcow2_get_cluster_size(img: *const Qcow2Image, out: *mut u64) -> c_int {
    // SAFETY: forwarded contract: `img` NULL or open, `out` NULL or writable.
    unsafe { get_into("qcow2_get_cluster_size", img, out, |img| img.cluster_size()) }
}

/// The counters since open or the last qcow2_reset_stats.
///
/// Parameters:
/// - `img`: the image.
/// - `out`: receives the counters.
///
/// Returns 0 on success; -EINVAL for NULL pointers.
///
/// # Safety
/// `img` must be NULL or an open handle; `out` must be NULL or writable.
#[no_mangle]
pub unsafe extern "C" fn qcow2_get_stats(img: *const Qcow2Image, out: *mut Qcow2Stats) -> c_int {
    // SAFETY: forwarded contract: `img` NULL or open, `out` NULL or writable.
    unsafe {
        get_into("qcow2_get_stats", img, out, |img| {
            Qcow2Stats::from(img.stats())
        })
    }
}

/// Resets every counter to 0.
///
/// Parameters:
/// - `img`: the image.
///
/// Returns 0 on success; -EINVAL for NULL.
///
/// # Safety
/// `img` must be NULL or an open handle.
#[no_mangle]
pub unsafe extern "C" fn qcow2_reset_stats(img: *mut Qcow2Image) -> c_int {
    ffi_boundary("qcow2_reset_stats", || {
        // SAFETY: `img` is NULL or an open handle (contract above).
        let img = &unsafe { check_ref(img, "img") }?.inner;
        img.reset_stats();
        Ok(())
    })
}
