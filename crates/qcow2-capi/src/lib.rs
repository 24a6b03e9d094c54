//! The C ABI of the qcow2 engine: `libqcow2` (`cdylib` + `staticlib`), header
//! `include/qcow2.h` generated from this file by cbindgen.
//!
//! Conventions, shared by every exported function:
//!
//! - Every function returns `int`: `0` on success, a negative errno on failure.
//!   The mapping from engine errors to errno values is done once, in
//!   [`errno_of`].
//! - Out-parameters are written only on success.
//! - Every function body runs inside [`ffi_boundary`]: a Rust panic becomes
//!   `-EIO` and never unwinds into C.
//! - Every pointer argument goes through [`check_ref`] / [`check_mut`] /
//!   [`check_slice`] / [`check_slice_mut`] / [`check_cstr`], the only places
//!   that turn a raw pointer into a reference; NULL becomes `-EINVAL`.
//! - A `Qcow2Image` is `Send + Sync`: one handle may be used by several
//!   threads at once (requests are serialised inside the engine), except that
//!   `qcow2_close` must not race with any other call on the same handle.
#![warn(missing_docs)]

use qcow2_ops::{CacheMode, CreateOptions, DiscardMode, Error, Image, MapEntry, OpenOptions};
use std::ffi::{c_char, c_int, CStr, OsStr};
use std::os::unix::ffi::OsStrExt;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::Path;

// ---------------------------------------------------------------------------
// Constants (literal values: cbindgen copies them into the header)
// ---------------------------------------------------------------------------

/// Open flag: open read-write (without it the image is read-only and writes fail with -EROFS).
pub const QCOW2_OPEN_RDWR: u32 = 0x1;
/// Open flag: discard mode `unmap` (without it: `ignore`, discard is a no-op
/// and QCOW2_REQ_MAY_UNMAP is cleared from every write-zeroes request).
pub const QCOW2_OPEN_UNMAP: u32 = 0x2;
/// Open flag: do not open the backing chain (unallocated clusters read as zeroes).
pub const QCOW2_OPEN_NO_BACKING: u32 = 0x4;
/// Open flag: cache mode `writethrough` (every request is durable before it returns).
/// No QCOW2_OPEN_CACHE_* flag means `writeback`; the only combination allowed
/// is QCOW2_OPEN_CACHE_NONE | QCOW2_OPEN_CACHE_WRITETHROUGH, qemu's `directsync`
/// (O_DIRECT on the image file and every request durable before it returns).
pub const QCOW2_OPEN_CACHE_WRITETHROUGH: u32 = 0x10;
/// Open flag: cache mode `unsafe` (flushes write back caches but never sync).
pub const QCOW2_OPEN_CACHE_UNSAFE: u32 = 0x20;
/// Open flag: cache mode `none` (O_DIRECT on the image file, writeback otherwise).
/// With QCOW2_OPEN_CACHE_WRITETHROUGH: `directsync`.
pub const QCOW2_OPEN_CACHE_NONE: u32 = 0x40;
/// Every open flag known; other bits make qcow2_open fail with -EINVAL.
pub const QCOW2_OPEN_KNOWN: u32 = QCOW2_OPEN_RDWR
    | QCOW2_OPEN_UNMAP
    | QCOW2_OPEN_NO_BACKING
    | QCOW2_OPEN_CACHE_WRITETHROUGH
    | QCOW2_OPEN_CACHE_UNSAFE
    | QCOW2_OPEN_CACHE_NONE;

/// Request flag (write-zeroes): the zeroed range may be deallocated (QEMU's BDRV_REQ_MAY_UNMAP).
pub const QCOW2_REQ_MAY_UNMAP: u32 = 0x4;
/// Request flag (write, write-zeroes): the data is durable when the call returns (BDRV_REQ_FUA).
pub const QCOW2_REQ_FUA: u32 = 0x10;
/// Request flag (write-zeroes): fail with -ENOTSUP rather than write zero data (BDRV_REQ_NO_FALLBACK).
pub const QCOW2_REQ_NO_FALLBACK: u32 = 0x100;

/// Compression type for Qcow2CreateOptions.compression_type: zlib (the default).
pub const QCOW2_COMPRESSION_ZLIB: u32 = 0;
/// Compression type for Qcow2CreateOptions.compression_type: zstd (v3 only).
pub const QCOW2_COMPRESSION_ZSTD: u32 = 1;

/// Extent flag: allocated in some layer of the chain (reads do not fall off the chain).
pub const QCOW2_EXTENT_ALLOCATED: u32 = 0x1;
/// Extent flag: the extent reads as zeroes.
pub const QCOW2_EXTENT_ZERO: u32 = 0x2;
/// Extent flag: the extent has data (not zero-only).
pub const QCOW2_EXTENT_DATA: u32 = 0x4;
/// Extent flag: compressed clusters.
pub const QCOW2_EXTENT_COMPRESSED: u32 = 0x8;
/// Extent flag: Qcow2Extent.host_offset is valid.
pub const QCOW2_EXTENT_OFFSET_VALID: u32 = 0x10;

/// Request flags accepted by qcow2_write.
const WRITE_FLAGS: u32 = QCOW2_REQ_FUA;
/// Request flags accepted by qcow2_write_zeroes.
const WRITE_ZEROES_FLAGS: u32 = QCOW2_REQ_MAY_UNMAP | QCOW2_REQ_FUA | QCOW2_REQ_NO_FALLBACK;

// ---------------------------------------------------------------------------
// Types
// ---------------------------------------------------------------------------

/// An open qcow2 image (opaque).
///
/// Thread safety: a handle may be used from several threads at once; every
/// function except qcow2_close may be called concurrently on the same handle
/// (requests are serialised inside the engine). qcow2_close must be called
/// exactly once, after every other call on the handle has returned.
pub struct Qcow2Image {
    inner: Image,
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
    const _: () = assert!(WRITE_ZEROES_FLAGS == qcow2_ops::REQ_KNOWN);
    // Same size as the engine's Stats; the set of names is checked by the
    // destructuring in `From<qcow2_ops::Stats>`, the C order (DESIGN.md's) by
    // tests/header.rs.
    const _: () =
        assert!(std::mem::size_of::<Qcow2Stats>() == std::mem::size_of::<qcow2_ops::Stats>());
    // A handle is shared between threads by C callers.
    const _: fn() = || {
        fn send_sync<T: Send + Sync>() {}
        send_sync::<Qcow2Image>();
    };
}

// ---------------------------------------------------------------------------
// The boundary: panics, errors, pointers
// ---------------------------------------------------------------------------

/// What an exported function's body returns, and how it becomes a C value.
trait FfiOutput {
    /// The C return type.
    type C;
    /// Converts the body's result.
    fn into_c(self) -> Self::C;
    /// The value returned when the body panicked.
    fn panicked() -> Self::C;
}

/// Bodies returning `Result<(), negative errno>` become `int`.
impl FfiOutput for Result<(), c_int> {
    type C = c_int;
    fn into_c(self) -> c_int {
        match self {
            Ok(()) => 0,
            Err(e) => e,
        }
    }
    fn panicked() -> c_int {
        -libc::EIO
    }
}

/// Bodies returning a static string become `const char *`.
impl FfiOutput for &'static CStr {
    type C = *const c_char;
    fn into_c(self) -> *const c_char {
        self.as_ptr()
    }
    fn panicked() -> *const c_char {
        c"Internal error (panic in libqcow2)".as_ptr()
    }
}

/// The one panic boundary: every exported function runs its body through it.
/// A panic is caught and becomes [`FfiOutput::panicked`] (`-EIO` for `int`
/// functions); nothing ever unwinds into C.
fn ffi_boundary<T: FfiOutput>(body: impl FnOnce() -> T) -> T::C {
    match catch_unwind(AssertUnwindSafe(body)) {
        Ok(v) => v.into_c(),
        Err(_) => T::panicked(),
    }
}

/// The one place engine errors become negative errno values.
fn errno_of(e: Error) -> c_int {
    let n = e.errno();
    if n < 0 {
        n
    } else {
        -libc::EIO
    }
}

/// Shorthand for `-EINVAL` results.
fn einval<T>() -> Result<T, c_int> {
    Err(-libc::EINVAL)
}

/// The NULL check for `const T *` arguments.
///
/// # Safety
/// `p` must be NULL or valid for reads of a `T` for `'a`, with no mutable
/// alias during `'a`.
unsafe fn check_ref<'a, T>(p: *const T) -> Result<&'a T, c_int> {
    // SAFETY: the caller guarantees that a non-NULL `p` is valid for `'a`.
    unsafe { p.as_ref() }.ok_or(-libc::EINVAL)
}

/// The NULL check for `T *` out-parameters.
///
/// # Safety
/// `p` must be NULL or valid for writes of a `T` for `'a`, with no other alias
/// during `'a`.
unsafe fn check_mut<'a, T>(p: *mut T) -> Result<&'a mut T, c_int> {
    // SAFETY: the caller guarantees that a non-NULL `p` is valid and unaliased for `'a`.
    unsafe { p.as_mut() }.ok_or(-libc::EINVAL)
}

/// The shared body of the getters: checks both pointers, then writes
/// `f(image)` to `out`.
///
/// # Safety
/// `img` must be NULL or an open handle; `out` must be NULL or writable.
unsafe fn get_into<T>(img: *const Qcow2Image, out: *mut T, f: impl FnOnce(&Image) -> T) -> c_int {
    ffi_boundary(|| {
        // SAFETY: `img` is NULL or an open handle (contract above).
        let img = &unsafe { check_ref(img) }?.inner;
        // SAFETY: `out` is NULL or writable (contract above).
        let out = unsafe { check_mut(out) }?;
        *out = f(img);
        Ok(())
    })
}

/// The NULL check for `(const void *buf, size_t len)` arguments. NULL is
/// refused even when `len` is 0.
///
/// # Safety
/// `p` must be NULL or valid for reads of `len` bytes for `'a`.
unsafe fn check_slice<'a>(p: *const u8, len: usize) -> Result<&'a [u8], c_int> {
    if p.is_null() || len > isize::MAX as usize {
        return einval();
    }
    // SAFETY: non-NULL (checked), valid for `len` bytes (caller), len <= isize::MAX (checked).
    Ok(unsafe { std::slice::from_raw_parts(p, len) })
}

/// The NULL check for `(void *buf, size_t len)` arguments. NULL is refused
/// even when `len` is 0.
///
/// # Safety
/// `p` must be NULL or valid for writes of `len` bytes for `'a`, unaliased.
unsafe fn check_slice_mut<'a>(p: *mut u8, len: usize) -> Result<&'a mut [u8], c_int> {
    if p.is_null() || len > isize::MAX as usize {
        return einval();
    }
    // SAFETY: non-NULL (checked), valid and unaliased for `len` bytes (caller),
    // len <= isize::MAX (checked).
    Ok(unsafe { std::slice::from_raw_parts_mut(p, len) })
}

/// The NULL check for `T *` arrays of `len` elements (`len` 0 is fine
/// but the pointer must still be non-NULL).
///
/// # Safety
/// `p` must be NULL or valid for writes of `len` elements for `'a`, unaliased.
unsafe fn check_array_mut<'a, T>(p: *mut T, len: usize) -> Result<&'a mut [T], c_int> {
    if p.is_null()
        || len
            .checked_mul(std::mem::size_of::<T>())
            .is_none_or(|b| b > isize::MAX as usize)
    {
        return einval();
    }
    // SAFETY: non-NULL (checked), valid for `len` elements (caller), size in range (checked).
    Ok(unsafe { std::slice::from_raw_parts_mut(p, len) })
}

/// The NULL check for NUL-terminated strings.
///
/// # Safety
/// `p` must be NULL or point to a NUL-terminated string valid for `'a`.
unsafe fn check_cstr<'a>(p: *const c_char) -> Result<&'a CStr, c_int> {
    if p.is_null() {
        return einval();
    }
    // SAFETY: non-NULL (checked) and NUL-terminated (caller).
    Ok(unsafe { CStr::from_ptr(p) })
}

/// Like [`check_cstr`] for optional UTF-8 strings: NULL is `None`.
///
/// # Safety
/// As [`check_cstr`].
unsafe fn opt_utf8(p: *const c_char) -> Result<Option<String>, c_int> {
    if p.is_null() {
        return Ok(None);
    }
    // SAFETY: forwarded from the caller.
    let s = unsafe { check_cstr(p) }?;
    match s.to_str() {
        Ok(s) => Ok(Some(s.to_owned())),
        Err(_) => einval(),
    }
}

/// A NULL or NUL-terminated string as bytes (file names need not be UTF-8).
///
/// # Safety
/// `p` must be NULL or a NUL-terminated string.
unsafe fn opt_bytes(p: *const c_char) -> Result<Option<Vec<u8>>, c_int> {
    if p.is_null() {
        return Ok(None);
    }
    // SAFETY: forwarded from the caller.
    let s = unsafe { check_cstr(p) }?;
    Ok(Some(s.to_bytes().to_vec()))
}

/// Checks that `[offset, offset + len)` lies inside the image.
fn check_range(img: &Image, offset: u64, len: u64) -> Result<(), c_int> {
    match offset.checked_add(len) {
        Some(end) if end <= img.virtual_size() => Ok(()),
        _ => einval(),
    }
}

/// Checks that `flags` holds only bits of `known`.
fn check_flags(flags: u32, known: u32) -> Result<(), c_int> {
    if flags & !known != 0 {
        einval()
    } else {
        Ok(())
    }
}

// ---------------------------------------------------------------------------
// Exported functions
// ---------------------------------------------------------------------------

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
    ffi_boundary(|| {
        // SAFETY: `path` is NULL or NUL-terminated (contract above).
        let path = unsafe { check_cstr(path) }?;
        let mut o = CreateOptions::default();
        if !opts.is_null() {
            // SAFETY: non-NULL `opts` points to a readable struct (contract above).
            let c = unsafe { check_ref(opts) }?;
            o.version = match c.version {
                0 => 3,
                v @ (2 | 3) => v,
                _ => return einval(),
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
                _ => return einval(),
            };
            // SAFETY: each string field is NULL or NUL-terminated (contract above).
            o.backing_file = unsafe { opt_bytes(c.backing_file) }?;
            // SAFETY: as above.
            o.backing_format = unsafe { opt_utf8(c.backing_format) }?;
        }
        let path = Path::new(OsStr::from_bytes(path.to_bytes()));
        Image::create(path, size, &o).map_err(errno_of)
    })
}

/// Opens a qcow2 image.
///
/// Parameters:
/// - `path`: NUL-terminated file name.
/// - `flags`: QCOW2_OPEN_* bits: QCOW2_OPEN_RDWR (else read-only),
///   QCOW2_OPEN_UNMAP (else discard mode ignore), QCOW2_OPEN_NO_BACKING, and at
///   most one of QCOW2_OPEN_CACHE_WRITETHROUGH, QCOW2_OPEN_CACHE_UNSAFE,
///   QCOW2_OPEN_CACHE_NONE (none: writeback), or
///   QCOW2_OPEN_CACHE_NONE | QCOW2_OPEN_CACHE_WRITETHROUGH for `directsync`.
/// - `out`: receives the new handle on success.
///
/// Returns 0 on success; -EINVAL for NULL arguments, unknown flag bits or two
/// cache modes (other than directsync); -ENOENT if the file does not exist;
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
    ffi_boundary(|| {
        // SAFETY: `path` is NULL or NUL-terminated (contract above).
        let path = unsafe { check_cstr(path) }?;
        // SAFETY: `out` is NULL or writable (contract above).
        let out = unsafe { check_mut(out) }?;
        check_flags(flags, QCOW2_OPEN_KNOWN)?;
        let cache = match flags
            & (QCOW2_OPEN_CACHE_WRITETHROUGH | QCOW2_OPEN_CACHE_UNSAFE | QCOW2_OPEN_CACHE_NONE)
        {
            0 => CacheMode::Writeback,
            QCOW2_OPEN_CACHE_WRITETHROUGH => CacheMode::Writethrough,
            QCOW2_OPEN_CACHE_UNSAFE => CacheMode::Unsafe,
            QCOW2_OPEN_CACHE_NONE => CacheMode::None,
            x if x == QCOW2_OPEN_CACHE_NONE | QCOW2_OPEN_CACHE_WRITETHROUGH => {
                CacheMode::DirectSync
            }
            _ => return einval(),
        };
        let opts = OpenOptions {
            writable: flags & QCOW2_OPEN_RDWR != 0,
            cache,
            discard: if flags & QCOW2_OPEN_UNMAP != 0 {
                DiscardMode::Unmap
            } else {
                DiscardMode::Ignore
            },
            open_backing: flags & QCOW2_OPEN_NO_BACKING == 0,
            ..OpenOptions::default()
        };
        let path = Path::new(OsStr::from_bytes(path.to_bytes()));
        let inner = Image::open(path, &opts).map_err(errno_of)?;
        *out = Box::into_raw(Box::new(Qcow2Image { inner }));
        Ok(())
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
    ffi_boundary(|| {
        if img.is_null() {
            return Ok(());
        }
        // SAFETY: a non-NULL `img` came from Box::into_raw in qcow2_open and
        // is given back exactly once (contract above).
        let img = unsafe { Box::from_raw(img) };
        img.inner.close().map_err(errno_of)
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
    ffi_boundary(|| {
        // SAFETY: `img` is NULL or an open handle (contract above).
        let img = &unsafe { check_ref(img) }?.inner;
        // SAFETY: `buf` is NULL or writable for `len` bytes (contract above).
        let buf = unsafe { check_slice_mut(buf.cast(), len) }?;
        check_range(img, offset, len as u64)?;
        img.read(offset, buf).map_err(errno_of)
    })
}

/// Writes guest data.
///
/// Parameters:
/// - `img`: the image (opened with QCOW2_OPEN_RDWR).
/// - `offset`: guest offset in bytes.
/// - `buf`: `len` bytes to write.
/// - `len`: number of bytes.
/// - `flags`: 0 or QCOW2_REQ_FUA.
///
/// Returns 0 on success; -EINVAL for NULL `img` or `buf`, unknown flag bits or
/// a range past the end; -EROFS on a read-only image; -ENOSPC, -EIO or another
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
    ffi_boundary(|| {
        // SAFETY: `img` is NULL or an open handle (contract above).
        let img = &unsafe { check_ref(img) }?.inner;
        // SAFETY: `buf` is NULL or readable for `len` bytes (contract above).
        let buf = unsafe { check_slice(buf.cast(), len) }?;
        check_flags(flags, WRITE_FLAGS)?;
        check_range(img, offset, len as u64)?;
        img.write(offset, buf, flags).map_err(errno_of)
    })
}

/// Zeroes a guest range with QEMU's write-zeroes semantics (see DESIGN.md):
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
    ffi_boundary(|| {
        // SAFETY: `img` is NULL or an open handle (contract above).
        let img = &unsafe { check_ref(img) }?.inner;
        check_flags(flags, WRITE_ZEROES_FLAGS)?;
        check_range(img, offset, len)?;
        img.write_zeroes(offset, len, flags).map_err(errno_of)
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
    ffi_boundary(|| {
        // SAFETY: `img` is NULL or an open handle (contract above).
        let img = &unsafe { check_ref(img) }?.inner;
        check_range(img, offset, len)?;
        img.discard(offset, len).map_err(errno_of)
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
    ffi_boundary(|| {
        // SAFETY: `img` is NULL or an open handle (contract above).
        let img = &unsafe { check_ref(img) }?.inner;
        img.flush().map_err(errno_of)
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
    ffi_boundary(|| {
        // SAFETY: `img` is NULL or an open handle (contract above).
        let img = &unsafe { check_ref(img) }?.inner;
        // SAFETY: `out` is NULL or writable for `max` extents (contract above).
        let out = unsafe { check_array_mut(out, max) }?;
        // SAFETY: `n_out` is NULL or writable (contract above).
        let n_out = unsafe { check_mut(n_out) }?;
        if max == 0 {
            return einval();
        }
        check_range(img, offset, len)?;
        let map = if len == 0 {
            Vec::new()
        } else {
            img.block_status_limit(offset, len, max).map_err(errno_of)?
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
    unsafe { get_into(img, out, |img| img.virtual_size()) }
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
    unsafe { get_into(img, out, |img| img.cluster_size()) }
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
    unsafe { get_into(img, out, |img| Qcow2Stats::from(img.stats())) }
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
    ffi_boundary(|| {
        // SAFETY: `img` is NULL or an open handle (contract above).
        let img = &unsafe { check_ref(img) }?.inner;
        img.reset_stats();
        Ok(())
    })
}

/// A description of an error code returned by this library.
///
/// Parameters:
/// - `err`: a return value of a qcow2_* function (negative errno; positive
///   values are taken as errno values too; 0 is success).
///
/// Returns a static NUL-terminated English string, never NULL; unknown codes
/// give "Unknown error". The caller must not free it.
///
/// # Safety
/// None: any `int` is accepted.
#[no_mangle]
pub extern "C" fn qcow2_strerror(err: c_int) -> *const c_char {
    ffi_boundary(|| -> &'static CStr {
        match err.unsigned_abs() as c_int {
            0 => c"Success",
            libc::EPERM => c"Operation not permitted",
            libc::ENOENT => c"No such file or directory",
            libc::EINTR => c"Interrupted system call",
            libc::EIO => c"Input/output error",
            libc::EBADF => c"Bad file descriptor",
            libc::EAGAIN => c"Resource temporarily unavailable",
            libc::ENOMEM => c"Cannot allocate memory",
            libc::EACCES => c"Permission denied",
            libc::EFAULT => c"Bad address",
            libc::EBUSY => c"Device or resource busy",
            libc::EEXIST => c"File exists",
            libc::ENOTDIR => c"Not a directory",
            libc::EISDIR => c"Is a directory",
            libc::EINVAL => c"Invalid argument",
            libc::EMFILE => c"Too many open files",
            libc::EFBIG => c"File too large",
            libc::ENOSPC => c"No space left on device",
            libc::ESPIPE => c"Illegal seek",
            libc::EROFS => c"Read-only file system",
            libc::ERANGE => c"Numerical result out of range",
            libc::ENAMETOOLONG => c"File name too long",
            libc::ENOSYS => c"Function not implemented",
            libc::ELOOP => c"Too many levels of symbolic links",
            libc::EOVERFLOW => c"Value too large for defined data type",
            libc::ENOTSUP => c"Operation not supported",
            libc::EDQUOT => c"Disk quota exceeded",
            _ => c"Unknown error",
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strerror_never_null() {
        for e in [
            0,
            -libc::EINVAL,
            -libc::ENOTSUP,
            libc::EIO,
            -9999,
            i32::MIN,
            i32::MAX,
        ] {
            let p = qcow2_strerror(e);
            assert!(!p.is_null());
        }
        // SAFETY: qcow2_strerror returns a static NUL-terminated string.
        let s = unsafe { CStr::from_ptr(qcow2_strerror(-libc::EINVAL)) };
        assert_eq!(s.to_str().unwrap(), "Invalid argument");
    }

    #[test]
    fn panic_becomes_eio() {
        let r = ffi_boundary(|| -> Result<(), c_int> { panic!("boom") });
        assert_eq!(r, -libc::EIO);
    }

    #[test]
    fn null_arguments() {
        // SAFETY: NULL pointers are valid arguments of every function.
        unsafe {
            assert_eq!(qcow2_close(std::ptr::null_mut()), 0);
            assert_eq!(qcow2_flush(std::ptr::null_mut()), -libc::EINVAL);
            assert_eq!(
                qcow2_open(std::ptr::null(), 0, std::ptr::null_mut()),
                -libc::EINVAL
            );
            assert_eq!(
                qcow2_create(std::ptr::null(), 0, std::ptr::null()),
                -libc::EINVAL
            );
        }
    }
}
