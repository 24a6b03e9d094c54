//! Image lifecycle operations on an open image: changing the recorded
//! backing file (`qemu-img rebase -u`), emptying the image (what `qemu-img
//! commit` leaves in the top image) and changing format options (`qemu-img
//! amend`).
//!
//! Each call is durable when it returns; a crash during it leaves the old
//! or the new state (at worst with leaked clusters, which `qemu-img check
//! -r leaks` reclaims). Like every call on a handle, these may run while
//! other threads use it (they are serialised inside the engine), but not
//! concurrently with `qcow2_close` on it.

use crate::error::{invalid, FfiError};
use crate::panic::ffi_boundary;
use crate::ptr::*;
use crate::types::*;
use std::ffi::{c_char, c_int};

/// Records a new backing file name and format in the image header, as
/// `qemu-img rebase -u` does. Only the header changes: no data is copied,
/// so the guest content changes wherever the new backing file differs from
/// the old one in clusters this image does not allocate.
///
/// When the image was opened with its backing chain (without
/// QCOW2_OPEN_NO_BACKING), the new chain is opened once the header is
/// durable; if it cannot be opened, unallocated clusters read as zeroes
/// until the image is reopened (this is not an error here).
///
/// Parameters:
/// - `img`: the image (opened with QCOW2_OPEN_RDWR).
/// - `backing_file`: the new backing file name, stored as given (relative
///   names are relative to the image's directory; bytes, need not be
///   UTF-8, at most 1023 bytes); NULL or "" for no backing file.
/// - `backing_format`: the backing file's format ("qcow2", "raw", UTF-8),
///   recorded in the header; NULL records none (the format is then probed
///   on open). Must be NULL when `backing_file` is NULL or "".
///
/// Returns 0 on success; -EINVAL for a NULL `img`, a name longer than 1023
/// bytes, a format that is not UTF-8 or given without a backing file;
/// -ENOSPC when the header, its extensions and the name do not fit in the
/// first cluster; -EROFS on a read-only image; other negative errno values
/// if the file fails. The message is in `qcow2_last_error()`.
///
/// Thread safety: may be called while other threads use the same handle
/// (they are serialised), but not concurrently with `qcow2_close` on it.
///
/// # Safety
/// `img` must be NULL or an open handle; `backing_file` and
/// `backing_format` NULL or NUL-terminated strings.
#[no_mangle]
pub unsafe extern "C" fn qcow2_set_backing(
    img: *mut Qcow2Image,
    backing_file: *const c_char,
    backing_format: *const c_char,
) -> c_int {
    ffi_boundary("qcow2_set_backing", || {
        // SAFETY: `img` is NULL or an open handle (contract above).
        let img = &unsafe { check_ref(img, "img") }?.inner;
        // SAFETY: NULL or NUL-terminated (contract above).
        let name = unsafe { opt_bytes(backing_file, "backing_file") }?.filter(|n| !n.is_empty());
        // SAFETY: as above.
        let format = unsafe { opt_utf8(backing_format, "backing_format") }?;
        if name.is_none() && format.is_some() {
            return invalid("backing_format given without backing_file");
        }
        img.set_backing(name.as_deref(), format.as_deref())
            .map_err(FfiError::from)
    })
}

/// Makes every cluster of the image unallocated, as `qemu-img commit`
/// leaves the top image: it then reads through its backing chain (or as
/// zeroes without one). The freed clusters are released and the file is
/// cut after its last used cluster. Internal snapshots keep their data.
///
/// Parameters:
/// - `img`: the image (opened with QCOW2_OPEN_RDWR).
///
/// Returns 0 on success; -EINVAL for a NULL `img`; -EROFS on a read-only
/// image; other negative errno values if the file fails. The message is in
/// `qcow2_last_error()`.
///
/// Thread safety: may be called while other threads use the same handle
/// (they are serialised), but not concurrently with `qcow2_close` on it.
///
/// # Safety
/// `img` must be NULL or an open handle.
#[no_mangle]
pub unsafe extern "C" fn qcow2_make_empty(img: *mut Qcow2Image) -> c_int {
    ffi_boundary("qcow2_make_empty", || {
        // SAFETY: `img` is NULL or an open handle (contract above).
        let img = &unsafe { check_ref(img, "img") }?.inner;
        img.make_empty().map_err(FfiError::from)
    })
}

/// Changes format options of the image, as `qemu-img amend -o` does: the
/// version (compat level), lazy refcounts and the refcount width (see
/// Qcow2AmendOptions; zero fields keep the current value). Every refusal
/// comes before anything is written.
///
/// Parameters:
/// - `img`: the image (opened with QCOW2_OPEN_RDWR).
/// - `opts`: what to change; must not be NULL (a zero-filled struct changes
///   nothing).
///
/// Returns 0 on success; -EINVAL for a NULL `img` or `opts`, a version other
/// than 0, 2 or 3, an unknown lazy_refcounts value, a refcount width that
/// is not a power of two up to 64 (or too narrow for the refcounts in use,
/// or not 16 on a v2 target), lazy refcounts on a v2 target, or a downgrade
/// the image's features do not allow; -ENOTSUP for a downgrade of an image
/// with persistent bitmaps; -EROFS on a read-only image; other negative
/// errno values if the file fails. The message is in `qcow2_last_error()`.
///
/// Thread safety: may be called while other threads use the same handle
/// (they are serialised), but not concurrently with `qcow2_close` on it.
///
/// # Safety
/// `img` must be NULL or an open handle; `opts` NULL or a valid
/// Qcow2AmendOptions.
#[no_mangle]
pub unsafe extern "C" fn qcow2_amend(
    img: *mut Qcow2Image,
    opts: *const Qcow2AmendOptions,
) -> c_int {
    ffi_boundary("qcow2_amend", || {
        // SAFETY: `img` is NULL or an open handle (contract above).
        let img = &unsafe { check_ref(img, "img") }?.inner;
        // SAFETY: `opts` is NULL or valid for reads (contract above).
        let opts = unsafe { check_ref(opts, "opts") }?;
        let o = opts.to_engine()?;
        img.amend(&o).map_err(FfiError::from)
    })
}
