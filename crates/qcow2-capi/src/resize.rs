//! Resize (`qemu-img resize`).

use crate::consts::*;
use crate::error::FfiError;
use crate::panic::ffi_boundary;
use crate::ptr::*;
use crate::types::*;
use qcow2_ops::Prealloc;
use std::ffi::c_int;

/// Changes the virtual size of an image, as `qemu-img resize` does.
///
/// Growing may move the L1 table; the switch is crash-safe (at any power
/// loss the image is valid with the old or the new size, and data written
/// before the call is intact). Growing an image whose backing file is
/// longer than the old size makes the new area read as zeroes (as QEMU).
/// Shrinking needs QCOW2_RESIZE_SHRINK and discards everything beyond the
/// new end. The call is durable when it returns.
///
/// Parameters:
/// - `img`: the image (opened with QCOW2_OPEN_RDWR).
/// - `new_size`: the new virtual size in bytes, a nonzero multiple of 512.
/// - `prealloc`: QCOW2_PREALLOC_OFF, _METADATA, _FALLOC or _FULL (growing only).
/// - `flags`: 0 or QCOW2_RESIZE_SHRINK.
///
/// Returns 0 on success; -EINVAL for a NULL `img`, unknown flags or mode, a
/// size that is zero, not a multiple of 512, smaller without
/// QCOW2_RESIZE_SHRINK, or preallocation with a shrink; -ENOTSUP for a
/// v2 image with internal snapshots; -EINVAL also when a persistent bitmap
/// is inconsistent (persistent bitmaps are resized with the image, as in
/// QEMU 10); -ENOSPC when the L1 table would exceed
/// 32 MiB; -EROFS on a read-only image; other negative errno values if the
/// file fails. The message is in `qcow2_last_error()`.
///
/// Thread safety: may be called while other threads use the same handle
/// (requests are serialised inside the engine: they see the old or the new
/// size), but not concurrently with `qcow2_close` on it.
///
/// # Safety
/// `img` must be NULL or an open handle.
#[no_mangle]
pub unsafe extern "C" fn qcow2_resize(
    img: *mut Qcow2Image,
    new_size: u64,
    prealloc: u32,
    flags: u32,
) -> c_int {
    ffi_boundary("qcow2_resize", || {
        // SAFETY: `img` is NULL or an open handle (contract above).
        let img = &unsafe { check_ref(img, "img") }?.inner;
        if flags & !QCOW2_RESIZE_SHRINK != 0 {
            return Err(FfiError::invalid(format!(
                "unknown resize flags {:#x}",
                flags & !QCOW2_RESIZE_SHRINK
            )));
        }
        let p = match prealloc {
            QCOW2_PREALLOC_OFF => Prealloc::Off,
            QCOW2_PREALLOC_METADATA => Prealloc::Metadata,
            QCOW2_PREALLOC_FALLOC => Prealloc::Falloc,
            QCOW2_PREALLOC_FULL => Prealloc::Full,
            other => {
                return Err(FfiError::invalid(format!(
                    "unknown preallocation mode {other}"
                )))
            }
        };
        img.resize(new_size, p, flags & QCOW2_RESIZE_SHRINK != 0)
            .map_err(FfiError::from)
    })
}
