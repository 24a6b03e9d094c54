//! Copying guest data between open images: convert (`qemu-img convert -n`),
//! commit (`qemu-img commit`) and the safe rebase (`qemu-img rebase -b`).
//!
//! These calls read and write many clusters; they report their progress
//! through an optional callback, called on the calling thread. Like every
//! call on a handle, they may run while other threads use the handles
//! involved (requests are serialised inside the engine; data other threads
//! write meanwhile may or may not be copied), but not concurrently with
//! `qcow2_close` on any of them.

use crate::consts::*;
use crate::error::{invalid, FfiError};
use crate::panic::ffi_boundary;
use crate::ptr::*;
use crate::types::Qcow2Image;
use std::ffi::{c_char, c_int, c_void};

/// A progress callback: called with `opaque` as given, the bytes done so
/// far and the total (the guest size being walked). `done` never decreases;
/// the last call has `done == total`. Called on the thread that made the
/// call, before it returns; it must not call into the library with the
/// same handles.
pub type Qcow2ProgressFn = Option<unsafe extern "C" fn(opaque: *mut c_void, done: u64, total: u64)>;

/// Options of qcow2_convert. A zero-filled struct (or a NULL pointer) means
/// the defaults: no flags, qemu-img's sparse size (4096), no progress
/// callback.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct Qcow2ConvertOptions {
    /// QCOW2_CONVERT_COMPRESS, QCOW2_CONVERT_TARGET_IS_ZERO,
    /// QCOW2_CONVERT_TOP_ONLY, or'ed; other bits: -EINVAL.
    pub flags: u32,
    /// Runs of zero bytes at least this long (aligned to it) are not written
    /// as data but through write-zeroes (not at all with
    /// QCOW2_CONVERT_TARGET_IS_ZERO), as `qemu-img convert -S`: a multiple of
    /// 512 up to 16 MiB; 0 means 4096 (qemu-img's default);
    /// QCOW2_CONVERT_SPARSE_NONE (UINT64_MAX) writes everything, zeroes
    /// included (`-S 0`). Other values: -EINVAL.
    pub sparse_size: u64,
    /// Progress callback; NULL for none.
    pub progress: Qcow2ProgressFn,
    /// Passed to `progress` as given.
    pub opaque: *mut c_void,
}

/// The engine's progress closure for a C callback.
///
/// # Safety
/// `f` must be NULL or a function safe to call with `opaque`.
unsafe fn closure(f: Qcow2ProgressFn, opaque: *mut c_void) -> Option<impl FnMut(u64, u64)> {
    f.map(|f| {
        move |done, total| {
            // SAFETY: the caller of the exported function vouches for `f`
            // and `opaque` (see its `# Safety`).
            unsafe { f(opaque, done, total) }
        }
    })
}

/// Copies the guest content of `src` into `dst`, as `qemu-img convert -n`
/// does: `dst` is an existing image at least as large as `src` (a larger
/// `dst` keeps its content past the end of `src`). Ranges of `src` that read
/// as zeroes go through the write-zeroes path of `dst` (with
/// QCOW2_REQ_MAY_UNMAP, which takes effect when `dst` was opened with
/// QCOW2_OPEN_UNMAP), so they cost no data clusters; data is read through
/// the backing chain of `src` (unless QCOW2_CONVERT_TOP_ONLY) and written
/// (compressed with QCOW2_CONVERT_COMPRESS). `dst` is flushed before the call
/// returns.
///
/// Parameters:
/// - `src`: the source image (read-only or read-write).
/// - `dst`: the target image, opened with QCOW2_OPEN_RDWR; not the same
///   handle nor the same file as `src`.
/// - `opts`: options (Qcow2ConvertOptions); NULL for the defaults.
///
/// Returns 0 on success; -EINVAL for a NULL `src` or `dst`, `src` and `dst`
/// the same handle or file, unknown flags, a bad sparse size, or a `dst`
/// smaller than `src`; -EROFS when `dst` is read-only; -EIO for a
/// compressed write onto a cluster that is already allocated (on an
/// encrypted target compressed clusters are written normally, as QEMU
/// does); other negative errno values if a file fails (what was copied
/// until then stays).
/// The message is in `qcow2_last_error()`.
///
/// Thread safety: may be called while other threads use `src` and `dst`
/// (requests are serialised), but not concurrently with `qcow2_close` on
/// either.
///
/// # Safety
/// `src` and `dst` must be NULL or open handles; `opts` NULL or a valid
/// Qcow2ConvertOptions whose `progress` is NULL or a function safe to call
/// with its `opaque`.
#[no_mangle]
pub unsafe extern "C" fn qcow2_convert(
    src: *mut Qcow2Image,
    dst: *mut Qcow2Image,
    opts: *const Qcow2ConvertOptions,
) -> c_int {
    ffi_boundary("qcow2_convert", || {
        // SAFETY: NULL or open handles (contract above).
        let s = &unsafe { check_ref(src, "src") }?.inner;
        // SAFETY: as above.
        let d = &unsafe { check_ref(dst, "dst") }?.inner;
        let o = if opts.is_null() {
            Qcow2ConvertOptions {
                flags: 0,
                sparse_size: 0,
                progress: None,
                opaque: std::ptr::null_mut(),
            }
        } else {
            // SAFETY: non-NULL and valid for reads (contract above).
            *unsafe { check_ref(opts, "opts") }?
        };
        let Qcow2ConvertOptions {
            flags,
            sparse_size,
            progress,
            opaque,
        } = o;
        if flags & !QCOW2_CONVERT_KNOWN != 0 {
            return invalid(format!(
                "unknown flags {:#x} (QCOW2_CONVERT_COMPRESS, _TARGET_IS_ZERO, _TOP_ONLY)",
                flags & !QCOW2_CONVERT_KNOWN
            ));
        }
        let sparse_size = match sparse_size {
            0 => qcow2_ops::DEFAULT_SPARSE_SIZE,
            QCOW2_CONVERT_SPARSE_NONE => 0,
            n if n % 512 == 0 && n <= qcow2_ops::MAX_SPARSE_SIZE => n,
            n => {
                return invalid(format!(
                    "sparse_size {n} is not a multiple of 512 up to {} \
                     (0: 4096; QCOW2_CONVERT_SPARSE_NONE: write everything)",
                    qcow2_ops::MAX_SPARSE_SIZE
                ))
            }
        };
        if std::ptr::eq(src, dst) {
            return invalid("src and dst are the same handle");
        }
        // SAFETY: `progress` is NULL or safe to call with `opaque` (contract above).
        let mut cb = unsafe { closure(progress, opaque) };
        let o = qcow2_ops::ConvertOptions {
            compress: flags & QCOW2_CONVERT_COMPRESS != 0,
            sparse_size,
            target_is_zero: flags & QCOW2_CONVERT_TARGET_IS_ZERO != 0,
            top_only: flags & QCOW2_CONVERT_TOP_ONLY != 0,
            progress: cb.as_mut().map(|c| c as &mut dyn FnMut(u64, u64)),
        };
        s.convert_to(d, o).map_err(FfiError::from)
    })
}

/// Commits the top image into its backing file, as `qemu-img commit` does:
/// every range `top` allocates is written into `base` (data as data, ranges
/// that read as zeroes as zeroes, in granules of the base's cluster size, at
/// least 4 KiB), `base` is flushed, and then `top` is emptied (all its
/// clusters unallocated, as qcow2_make_empty) unless QCOW2_COMMIT_KEEP_TOP.
/// Afterwards the backing chain of `top` is reopened, so that reads through
/// `top` see the committed data at once (the content seen through `top` is
/// the same before and after).
///
/// Parameters:
/// - `top`: the overlay, opened with its backing chain (without
///   QCOW2_OPEN_NO_BACKING) and, unless QCOW2_COMMIT_KEEP_TOP, with
///   QCOW2_OPEN_RDWR.
/// - `base`: the file `top` names as its backing file (the same file:
///   device and inode), opened by the caller with QCOW2_OPEN_RDWR; at least
///   as large as `top`. Deeper layers of the chain cannot be the base.
/// - `flags`: 0 or QCOW2_COMMIT_KEEP_TOP.
/// - `progress`, `opaque`: progress callback (over the size of `top`) and
///   its argument; `progress` NULL for none.
///
/// Returns 0 on success; -EINVAL for a NULL `top` or `base`, unknown flags,
/// `top` and `base` the same handle, a `top` without a backing file, a
/// `base` that is not the file `top` names, or a `base` smaller than `top`;
/// -EROFS when `base` (or, without QCOW2_COMMIT_KEEP_TOP, `top`) is
/// read-only; -ENOTSUP when `top` was opened without its backing chain;
/// other negative errno values if a file fails. The message is in
/// `qcow2_last_error()`.
///
/// Thread safety: may be called while other threads use `top` and `base`
/// (requests are serialised), but not concurrently with `qcow2_close` on
/// either.
///
/// # Safety
/// `top` and `base` must be NULL or open handles; `progress` NULL or a
/// function safe to call with `opaque`.
#[no_mangle]
pub unsafe extern "C" fn qcow2_commit(
    top: *mut Qcow2Image,
    base: *mut Qcow2Image,
    flags: u32,
    progress: Qcow2ProgressFn,
    opaque: *mut c_void,
) -> c_int {
    ffi_boundary("qcow2_commit", || {
        // SAFETY: NULL or open handles (contract above).
        let t = &unsafe { check_ref(top, "top") }?.inner;
        // SAFETY: as above.
        let b = &unsafe { check_ref(base, "base") }?.inner;
        if flags & !QCOW2_COMMIT_KNOWN != 0 {
            return invalid(format!(
                "unknown flags {:#x} (QCOW2_COMMIT_KEEP_TOP)",
                flags & !QCOW2_COMMIT_KNOWN
            ));
        }
        if std::ptr::eq(top, base) {
            return invalid("top and base are the same handle");
        }
        // SAFETY: `progress` is NULL or safe to call with `opaque` (contract above).
        let mut cb = unsafe { closure(progress, opaque) };
        let keep = flags & QCOW2_COMMIT_KEEP_TOP != 0;
        t.commit(b, keep, cb.as_mut().map(|c| c as &mut dyn FnMut(u64, u64)))
            .map_err(FfiError::from)
    })
}

/// Changes the backing file of the image. Safe mode (the default, as
/// `qemu-img rebase -b`): first copies into `img`, for every range it does
/// not allocate itself, the data of its current chain wherever the new
/// backing file (or nothing) reads differently, so that the guest content
/// stays the same; then records the new name and format in the header (as
/// qcow2_set_backing). With QCOW2_REBASE_UNSAFE only the header changes
/// (`qemu-img rebase -u`).
///
/// Parameters:
/// - `img`: the image, opened with QCOW2_OPEN_RDWR and (safe mode) with its
///   backing chain (without QCOW2_OPEN_NO_BACKING).
/// - `backing_file`: the new backing file name, stored as given (relative
///   names are relative to the image's directory; bytes, need not be UTF-8,
///   at most 1023 bytes); NULL or "" for none (safe mode then copies
///   everything the image reads through its chain).
/// - `backing_format`: its format ("qcow2", "raw", UTF-8), recorded in the
///   header; NULL records none (safe mode probes the file to read it).
///   Must be NULL when `backing_file` is NULL or "".
/// - `flags`: 0 or QCOW2_REBASE_UNSAFE.
/// - `progress`, `opaque`: progress callback of the safe mode's copy (over
///   the image's size) and its argument; `progress` NULL for none.
///
/// Returns 0 on success; -EINVAL for a NULL `img`, unknown flags, a name
/// longer than 1023 bytes, a format that is not UTF-8 or given without a
/// backing file; -ENOENT (or another errno) when the new backing file
/// cannot be opened; -ENOTSUP (safe mode) when `img` was opened without its
/// backing chain, or for an unknown backing format; -ENOSPC when the header
/// does not fit in the first cluster; -EROFS on a read-only image; other
/// negative errno values if a file fails (the header is then unchanged).
/// The message is in `qcow2_last_error()`.
///
/// Thread safety: may be called while other threads use the handle
/// (requests are serialised), but not concurrently with `qcow2_close` on it.
///
/// # Safety
/// `img` must be NULL or an open handle; `backing_file` and
/// `backing_format` NULL or NUL-terminated strings; `progress` NULL or a
/// function safe to call with `opaque`.
#[no_mangle]
pub unsafe extern "C" fn qcow2_rebase(
    img: *mut Qcow2Image,
    backing_file: *const c_char,
    backing_format: *const c_char,
    flags: u32,
    progress: Qcow2ProgressFn,
    opaque: *mut c_void,
) -> c_int {
    ffi_boundary("qcow2_rebase", || {
        // SAFETY: `img` is NULL or an open handle (contract above).
        let img = &unsafe { check_ref(img, "img") }?.inner;
        // SAFETY: NULL or NUL-terminated (contract above).
        let name = unsafe { opt_bytes(backing_file, "backing_file") }?.filter(|n| !n.is_empty());
        // SAFETY: as above.
        let format = unsafe { opt_utf8(backing_format, "backing_format") }?;
        if flags & !QCOW2_REBASE_KNOWN != 0 {
            return invalid(format!(
                "unknown flags {:#x} (QCOW2_REBASE_UNSAFE)",
                flags & !QCOW2_REBASE_KNOWN
            ));
        }
        if name.is_none() && format.is_some() {
            return invalid("backing_format given without backing_file");
        }
        if flags & QCOW2_REBASE_UNSAFE != 0 {
            return img
                .set_backing(name.as_deref(), format.as_deref())
                .map_err(FfiError::from);
        }
        // SAFETY: `progress` is NULL or safe to call with `opaque` (contract above).
        let mut cb = unsafe { closure(progress, opaque) };
        img.rebase(
            name.as_deref(),
            format.as_deref(),
            cb.as_mut().map(|c| c as &mut dyn FnMut(u64, u64)),
        )
        .map_err(FfiError::from)
    })
}
