//! The C ABI of the qcow2 engine: `libqcow2` (`cdylib` + `staticlib`), header
//! `include/qcow2.h` generated from this crate by cbindgen.
//!
//! Modules: `consts` (flag and version values), `types` (the opaque handle
//! and the `#[repr(C)]` structs), `panic` (the panic boundary), `ptr` (NULL
//! and length checks), `error` (errno values, the thread's last error
//! message, `qcow2_strerror`), `image` (the exported functions), `bitmaps`
//! (persistent dirty bitmap management), `lifecycle` (backing file change,
//! emptying, amend), `copy` (convert, commit, safe rebase), `crypt`
//! (encrypted images).
//!
//! Conventions, shared by every exported function:
//!
//! - Every function returns `int`: `0` on success, a negative errno on failure.
//!   Engine errors become errno values in one place (`From<qcow2_ops::Error>
//!   for FfiError`), and every failure also leaves a message for the calling
//!   thread (`qcow2_last_error`), naming the function, the image and the
//!   problem.
//! - Out-parameters are written only on success.
//! - Every function body runs inside `ffi_boundary`: a Rust panic becomes
//!   `-EIO` and never unwinds into C.
//! - Every pointer argument goes through the checks of `ptr`, the only places
//!   that turn a raw pointer into a reference; NULL becomes `-EINVAL`.
//!   Range and request-flag checks are the engine's own.
//! - A `Qcow2Image` is `Send + Sync`: one handle may be used by several
//!   threads at once (requests are serialised inside the engine), except that
//!   `qcow2_close` must not race with any other call on the same handle.
#![warn(missing_docs)]

mod bitmaps;
mod consts;
mod copy;
mod crypt;
mod error;
mod image;
mod lifecycle;
mod panic;
mod ptr;
mod resize;
mod snapshots;
mod types;

pub use bitmaps::*;
pub use consts::*;
pub use copy::*;
pub use crypt::*;
pub use error::{qcow2_last_errno, qcow2_last_error, qcow2_strerror};
pub use image::*;
pub use lifecycle::*;
pub use resize::*;
pub use snapshots::*;
pub use types::{Qcow2AmendOptions, Qcow2CreateOptions, Qcow2Extent, Qcow2Image, Qcow2Stats};

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::FfiError;
    use crate::panic::ffi_boundary;
    use std::ffi::CStr;

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
        let r = ffi_boundary("qcow2_test", || -> Result<(), FfiError> { panic!("boom") });
        assert_eq!(r, -libc::EIO);
        assert_eq!(qcow2_last_errno(), -libc::EIO);
        // SAFETY: qcow2_last_error returns a NUL-terminated string owned by this thread.
        let msg = unsafe { CStr::from_ptr(qcow2_last_error()) };
        assert_eq!(
            msg.to_str().unwrap(),
            "qcow2_test: internal error (panic): boom"
        );
    }

    #[test]
    fn last_error_is_per_thread_and_kept_by_successes() {
        std::thread::spawn(|| {
            // Nothing failed on this thread yet.
            assert_eq!(qcow2_last_errno(), 0);
            // SAFETY: qcow2_last_error returns a NUL-terminated string.
            assert_eq!(
                unsafe { CStr::from_ptr(qcow2_last_error()) }.to_bytes(),
                b""
            );
            // SAFETY: NULL is a valid argument.
            assert_eq!(
                unsafe { qcow2_reset_stats(std::ptr::null_mut()) },
                -libc::EINVAL
            );
            // A successful call keeps the message.
            // SAFETY: NULL is a valid argument of qcow2_close.
            assert_eq!(unsafe { qcow2_close(std::ptr::null_mut()) }, 0);
            assert_eq!(qcow2_last_errno(), -libc::EINVAL);
            // SAFETY: as above.
            let m = unsafe { CStr::from_ptr(qcow2_last_error()) };
            assert_eq!(m.to_str().unwrap(), "qcow2_reset_stats: img is NULL");
        })
        .join()
        .unwrap();
    }

    #[test]
    fn null_arguments() {
        // SAFETY: NULL pointers are valid arguments of every function.
        unsafe {
            assert_eq!(qcow2_close(std::ptr::null_mut()), 0);
            assert_eq!(qcow2_flush(std::ptr::null_mut()), -libc::EINVAL);
            let msg = CStr::from_ptr(qcow2_last_error());
            assert_eq!(msg.to_str().unwrap(), "qcow2_flush: img is NULL");
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
