//! Persistent dirty bitmap management (`qemu-img bitmap`'s operations).
//!
//! Each call is one durable operation: when it returns, the bitmap set on
//! disk is the new one; a crash during the call leaves the old set or the
//! new one. Like every call on a handle, these may run from several threads
//! at once (they are serialised inside the engine), but not concurrently
//! with `qcow2_close` on the same handle. Caller errors (unknown or
//! duplicate name, bad granularity, inconsistent bitmap, …) return -EINVAL
//! with QEMU's wording in `qcow2_last_error()`; a read-only image -EROFS.

use crate::error::{invalid, FfiError};
use crate::panic::ffi_boundary;
use crate::ptr::*;
use crate::types::*;
use qcow2_ops::BitmapOp;
use std::ffi::c_char;
use std::ffi::c_int;

/// A bitmap name argument: NUL-terminated UTF-8.
///
/// # Safety
/// `p` must be NULL or NUL-terminated.
unsafe fn name_arg<'a>(p: *const c_char, what: &str) -> Result<&'a str, FfiError> {
    // SAFETY: forwarded contract: `p` is NULL or NUL-terminated.
    let c = unsafe { check_cstr(p, what) }?;
    c.to_str()
        .map_err(|_| FfiError::invalid(format!("{what} is not UTF-8")))
}

/// Runs `op` on bitmap `name` of `img`.
///
/// # Safety
/// `img` NULL or an open handle, `name` NULL or NUL-terminated, `src` NULL
/// or an open handle.
unsafe fn run(
    func: &'static str,
    img: *mut Qcow2Image,
    name: *const c_char,
    op: impl FnOnce() -> Result<BitmapOp, FfiError>,
    src: *const Qcow2Image,
) -> c_int {
    ffi_boundary(func, || {
        // SAFETY: `img` is NULL or an open handle (contract above).
        let img = &unsafe { check_ref(img, "img") }?.inner;
        // SAFETY: `name` is NULL or NUL-terminated (contract above).
        let name = unsafe { name_arg(name, "name") }?;
        let src = if src.is_null() {
            None
        } else {
            // SAFETY: non-NULL `src` is an open handle (contract above).
            Some(&unsafe { check_ref(src, "source_img") }?.inner)
        };
        let op = op()?;
        img.bitmap(name, &op, src).map_err(FfiError::from)
    })
}

/// Adds an empty persistent bitmap (like `qemu-img bitmap --add`).
///
/// Parameters:
/// - `img`: the image, opened writable.
/// - `name`: the new bitmap's name (NUL-terminated UTF-8, 1 to 1023 bytes).
/// - `granularity`: bytes per bit, a power of two from 512 to 2 GiB; 0 for
///   QEMU's default (the cluster size clamped to 4 KiB..64 KiB).
/// - `enabled`: whether it records writes from now on.
///
/// Returns 0 on success; -EINVAL for NULL pointers, a name already used, a
/// bad granularity or name, a v2 image; -EROFS on a read-only image; other
/// negative errno values if the file fails.
///
/// Thread safety: may run concurrently with other calls on `img` (they are
/// serialised), not with `qcow2_close(img)`.
///
/// # Safety
/// `img` must be NULL or an open handle; `name` NULL or NUL-terminated.
#[no_mangle]
pub unsafe extern "C" fn qcow2_bitmap_add(
    img: *mut Qcow2Image,
    name: *const c_char,
    granularity: u64,
    enabled: bool,
) -> c_int {
    let op = || {
        if granularity > u32::MAX as u64 {
            return invalid(format!("granularity {granularity} is above 2 GiB"));
        }
        Ok(BitmapOp::Add {
            granularity: (granularity != 0).then_some(granularity),
            enabled,
        })
    };
    // SAFETY: forwarded contract.
    unsafe { run("qcow2_bitmap_add", img, name, op, std::ptr::null()) }
}

/// Removes a bitmap and frees its clusters (like `qemu-img bitmap
/// --remove`); inconsistent (in-use) bitmaps may be removed too.
///
/// Returns 0 on success; -EINVAL for NULL pointers or an unknown name;
/// -EROFS on a read-only image; other negative errno values if the file fails.
///
/// Thread safety: may run concurrently with other calls on `img` (they are
/// serialised), not with `qcow2_close(img)`.
///
/// # Safety
/// `img` must be NULL or an open handle; `name` NULL or NUL-terminated.
#[no_mangle]
pub unsafe extern "C" fn qcow2_bitmap_remove(img: *mut Qcow2Image, name: *const c_char) -> c_int {
    // SAFETY: forwarded contract.
    unsafe {
        run(
            "qcow2_bitmap_remove",
            img,
            name,
            || Ok(BitmapOp::Remove),
            std::ptr::null(),
        )
    }
}

/// Clears every bit of a bitmap (like `qemu-img bitmap --clear`).
///
/// Returns 0 on success; -EINVAL for NULL pointers, an unknown name or an
/// inconsistent bitmap; -EROFS on a read-only image; other negative errno
/// values if the file fails.
///
/// Thread safety: may run concurrently with other calls on `img` (they are
/// serialised), not with `qcow2_close(img)`.
///
/// # Safety
/// `img` must be NULL or an open handle; `name` NULL or NUL-terminated.
#[no_mangle]
pub unsafe extern "C" fn qcow2_bitmap_clear(img: *mut Qcow2Image, name: *const c_char) -> c_int {
    // SAFETY: forwarded contract.
    unsafe {
        run(
            "qcow2_bitmap_clear",
            img,
            name,
            || Ok(BitmapOp::Clear),
            std::ptr::null(),
        )
    }
}

/// Enables (records writes) or disables a bitmap (like `qemu-img bitmap
/// --enable` / `--disable`).
///
/// Returns 0 on success; -EINVAL for NULL pointers, an unknown name or an
/// inconsistent bitmap; -EROFS on a read-only image; other negative errno
/// values if the file fails.
///
/// Thread safety: may run concurrently with other calls on `img` (they are
/// serialised), not with `qcow2_close(img)`.
///
/// # Safety
/// `img` must be NULL or an open handle; `name` NULL or NUL-terminated.
#[no_mangle]
pub unsafe extern "C" fn qcow2_bitmap_set_enabled(
    img: *mut Qcow2Image,
    name: *const c_char,
    enabled: bool,
) -> c_int {
    let op = move || {
        Ok(if enabled {
            BitmapOp::Enable
        } else {
            BitmapOp::Disable
        })
    };
    // SAFETY: forwarded contract.
    unsafe { run("qcow2_bitmap_set_enabled", img, name, op, std::ptr::null()) }
}

/// ORs bitmap `source` into bitmap `name` (like `qemu-img bitmap --merge
/// SOURCE [-b SOURCE_FILE]`); granularities may differ. The source comes
/// from `source_img` when it is not NULL (opened read-only or writable,
/// same virtual size), else from `img`.
///
/// Returns 0 on success; -EINVAL for NULL pointers, unknown names,
/// inconsistent bitmaps or different virtual sizes; -EROFS on a read-only
/// image; other negative errno values if a file fails.
///
/// Thread safety: may run concurrently with other calls on `img` and
/// `source_img` (they are serialised; the source is read before `img` is
/// locked, so two opposite merges cannot deadlock), not with `qcow2_close` of
/// either.
///
/// # Safety
/// `img` must be NULL or an open handle; `name` and `source` NULL or
/// NUL-terminated; `source_img` NULL or an open handle.
#[no_mangle]
pub unsafe extern "C" fn qcow2_bitmap_merge(
    img: *mut Qcow2Image,
    name: *const c_char,
    source: *const c_char,
    source_img: *const Qcow2Image,
) -> c_int {
    let op = || {
        // SAFETY: `source` is NULL or NUL-terminated (contract above).
        let s = unsafe { name_arg(source, "source") }?;
        Ok(BitmapOp::Merge {
            source: s.to_string(),
        })
    };
    // SAFETY: forwarded contract.
    unsafe { run("qcow2_bitmap_merge", img, name, op, source_img) }
}
