//! Internal snapshots (`qemu-img snapshot`'s operations).
//!
//! Each call that changes the image is one durable operation: when it
//! returns, the snapshot table on disk is the new one; a crash during the
//! call leaves the old table or the new one (at worst with leaked clusters,
//! which `qemu-img check -r leaks` reclaims). Like every call on a handle,
//! these may run from several threads at once (they are serialised inside
//! the engine, and requests issued meanwhile wait for them), but not
//! concurrently with `qcow2_close` on the same handle. A snapshot that does
//! not exist gives -ENOENT; a read-only image -EROFS; the message is in
//! `qcow2_last_error()`.

use crate::error::{invalid, FfiError};
use crate::panic::ffi_boundary;
use crate::ptr::*;
use crate::types::*;
use qcow2_ops::SnapshotInfo;
use std::ffi::{c_char, c_int};

/// Bytes of [`Qcow2SnapshotInfo::id`], NUL included.
pub const QCOW2_SNAPSHOT_ID_LEN: usize = 128;
/// Bytes of [`Qcow2SnapshotInfo::name`], NUL included.
pub const QCOW2_SNAPSHOT_NAME_LEN: usize = 256;

/// One internal snapshot, as `qemu-img snapshot -l` lists it.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct Qcow2SnapshotInfo {
    /// The id, NUL-terminated (cut at 127 bytes, as QEMU's own list does).
    pub id: [c_char; QCOW2_SNAPSHOT_ID_LEN],
    /// The name, NUL-terminated (cut at 255 bytes, as QEMU's own list does).
    pub name: [c_char; QCOW2_SNAPSHOT_NAME_LEN],
    /// Size of the saved VM state in bytes (0 for disk-only snapshots).
    pub vm_state_size: u64,
    /// Creation time: seconds since the epoch.
    pub date_sec: u32,
    /// Creation time: nanoseconds.
    pub date_nsec: u32,
    /// Guest clock at creation, nanoseconds.
    pub vm_clock_nsec: u64,
    /// Virtual disk size at creation (0 when the entry does not record it).
    pub disk_size: u64,
    /// Instruction count; -1 when none is recorded.
    pub icount: i64,
}

impl Default for Qcow2SnapshotInfo {
    fn default() -> Self {
        Qcow2SnapshotInfo {
            id: [0; QCOW2_SNAPSHOT_ID_LEN],
            name: [0; QCOW2_SNAPSHOT_NAME_LEN],
            vm_state_size: 0,
            date_sec: 0,
            date_nsec: 0,
            vm_clock_nsec: 0,
            disk_size: 0,
            icount: -1,
        }
    }
}

fn put_str(dst: &mut [c_char], s: &str) {
    let n = s.len().min(dst.len() - 1);
    for (d, &b) in dst.iter_mut().zip(&s.as_bytes()[..n]) {
        *d = b as c_char;
    }
    dst[n] = 0;
}

impl From<&SnapshotInfo> for Qcow2SnapshotInfo {
    fn from(s: &SnapshotInfo) -> Self {
        let mut o = Qcow2SnapshotInfo {
            vm_state_size: s.vm_state_size,
            date_sec: s.date_sec,
            date_nsec: s.date_nsec,
            vm_clock_nsec: s.vm_clock_nsec,
            disk_size: s.disk_size.unwrap_or(0),
            icount: s.icount.map(|i| i as i64).unwrap_or(-1),
            ..Default::default()
        };
        put_str(&mut o.id, &s.id);
        put_str(&mut o.name, &s.name);
        o
    }
}

/// A snapshot name or id argument: NUL-terminated UTF-8.
///
/// # Safety
/// `p` must be NULL or NUL-terminated.
unsafe fn str_arg<'a>(p: *const c_char, what: &str) -> Result<&'a str, FfiError> {
    // SAFETY: forwarded contract: `p` is NULL or NUL-terminated.
    let c = unsafe { check_cstr(p, what) }?;
    c.to_str()
        .map_err(|_| FfiError::invalid(format!("{what} is not UTF-8")))
}

/// Creates an internal snapshot of the current state (like `qemu-img
/// snapshot -c`): the next numeric id, the given name (names need not be
/// unique; may be empty), the current time, VM state size 0.
///
/// Parameters:
/// - `img`: the image, opened writable.
/// - `name`: the name (NUL-terminated UTF-8).
/// - `out`: NULL, or receives the new snapshot's description.
///
/// Returns 0 on success; -EINVAL for NULL `img`/`name` or a name longer than
/// 65535 bytes; -EROFS on a read-only image; -ENOSPC when a refcount would
/// overflow (e.g. refcount_bits=1) or the table is full; other negative
/// errno values if the file fails.
///
/// Thread safety: may run concurrently with other calls on `img` (they are
/// serialised), not with `qcow2_close(img)`.
///
/// # Safety
/// `img` must be NULL or an open handle; `name` NULL or NUL-terminated;
/// `out` NULL or writable.
#[no_mangle]
pub unsafe extern "C" fn qcow2_snapshot_create(
    img: *mut Qcow2Image,
    name: *const c_char,
    out: *mut Qcow2SnapshotInfo,
) -> c_int {
    ffi_boundary("qcow2_snapshot_create", || {
        // SAFETY: `img` is NULL or an open handle (contract above).
        let img = &unsafe { check_ref(img, "img") }?.inner;
        // SAFETY: `name` is NULL or NUL-terminated (contract above).
        let name = unsafe { str_arg(name, "name") }?;
        let info = img.snapshot_create(name).map_err(FfiError::from)?;
        if !out.is_null() {
            // SAFETY: non-NULL `out` is writable (contract above).
            let o = unsafe { check_mut(out, "out") }?;
            *o = Qcow2SnapshotInfo::from(&info);
        }
        Ok(())
    })
}

/// Reverts the image to a snapshot (like `qemu-img snapshot -a`): looked up
/// by id first, then by name. The virtual size becomes the snapshot's.
/// Refused (-ENOTSUP) while the image has persistent bitmaps, as QEMU
/// refuses it.
///
/// Returns 0 on success; -ENOENT when no snapshot matches; -EINVAL for NULL
/// pointers; -EROFS on a read-only image; other negative errno values if
/// the file fails.
///
/// Thread safety: may run concurrently with other calls on `img` (they are
/// serialised), not with `qcow2_close(img)`.
///
/// # Safety
/// `img` must be NULL or an open handle; `id_or_name` NULL or NUL-terminated.
#[no_mangle]
pub unsafe extern "C" fn qcow2_snapshot_apply(
    img: *mut Qcow2Image,
    id_or_name: *const c_char,
) -> c_int {
    ffi_boundary("qcow2_snapshot_apply", || {
        // SAFETY: `img` is NULL or an open handle (contract above).
        let img = &unsafe { check_ref(img, "img") }?.inner;
        // SAFETY: `id_or_name` is NULL or NUL-terminated (contract above).
        let key = unsafe { str_arg(id_or_name, "id_or_name") }?;
        img.snapshot_apply(key).map_err(FfiError::from)
    })
}

/// Deletes the first snapshot with this name (like `qemu-img snapshot -d`,
/// which looks names up only) and frees what only it referenced.
///
/// Returns 0 on success; -ENOENT when no snapshot has the name; -EINVAL for
/// NULL pointers; -EROFS on a read-only image; other negative errno values
/// if the file fails.
///
/// Thread safety: may run concurrently with other calls on `img` (they are
/// serialised), not with `qcow2_close(img)`.
///
/// # Safety
/// `img` must be NULL or an open handle; `name` NULL or NUL-terminated.
#[no_mangle]
pub unsafe extern "C" fn qcow2_snapshot_delete(img: *mut Qcow2Image, name: *const c_char) -> c_int {
    ffi_boundary("qcow2_snapshot_delete", || {
        // SAFETY: `img` is NULL or an open handle (contract above).
        let img = &unsafe { check_ref(img, "img") }?.inner;
        // SAFETY: `name` is NULL or NUL-terminated (contract above).
        let name = unsafe { str_arg(name, "name") }?;
        img.snapshot_delete(name).map_err(FfiError::from)
    })
}

/// Lists the snapshots in table order (like `qemu-img snapshot -l`).
///
/// Parameters:
/// - `img`: the image.
/// - `out`: the caller's buffer of `max` entries; may be NULL when `max` is 0.
/// - `max`: entries `out` holds; the first `max` snapshots are stored.
/// - `n_out`: receives the number of snapshots the image has (more than
///   `max` means the list was cut: call again with a larger buffer).
///
/// Returns 0 on success; -EINVAL for NULL pointers; other negative errno
/// values if the file fails or the table is corrupt.
///
/// Thread safety: may run concurrently with other calls on `img` (they are
/// serialised), not with `qcow2_close(img)`.
///
/// # Safety
/// `img` must be NULL or an open handle; `out` NULL or writable for `max`
/// entries; `n_out` NULL or writable.
#[no_mangle]
pub unsafe extern "C" fn qcow2_snapshot_list(
    img: *mut Qcow2Image,
    out: *mut Qcow2SnapshotInfo,
    max: usize,
    n_out: *mut usize,
) -> c_int {
    ffi_boundary("qcow2_snapshot_list", || {
        // SAFETY: `img` is NULL or an open handle (contract above).
        let img = &unsafe { check_ref(img, "img") }?.inner;
        // SAFETY: `n_out` is NULL or writable (contract above).
        let n_out = unsafe { check_mut(n_out, "n_out") }?;
        let out: &mut [Qcow2SnapshotInfo] = if max == 0 {
            &mut []
        } else {
            // SAFETY: `out` is NULL or writable for `max` entries (contract above).
            unsafe { check_array_mut(out, max, "out") }?
        };
        if out.len() > isize::MAX as usize {
            return invalid("max is too large");
        }
        let v = img.snapshots().map_err(FfiError::from)?;
        for (slot, s) in out.iter_mut().zip(&v) {
            *slot = Qcow2SnapshotInfo::from(s);
        }
        *n_out = v.len();
        Ok(())
    })
}
