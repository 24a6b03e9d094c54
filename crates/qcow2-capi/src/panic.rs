//! The one panic boundary every exported function runs through.

use crate::error::{set_last_error, FfiError};
use std::ffi::{c_char, c_int, CStr};
use std::panic::{catch_unwind, AssertUnwindSafe};

/// What an exported function's body returns, and how it becomes a C value.
pub(crate) trait FfiOutput {
    /// The C return type.
    type C;
    /// Converts the body's result; `func` names the exported function for
    /// the thread's last-error message.
    fn into_c(self, func: &'static str) -> Self::C;
    /// The value returned when the body panicked.
    fn panicked() -> Self::C;
}

/// Bodies returning `Result<(), FfiError>` become `int` (0 or a negative
/// errno); a failure also becomes the calling thread's last error.
impl FfiOutput for Result<(), FfiError> {
    type C = c_int;
    fn into_c(self, func: &'static str) -> c_int {
        match self {
            Ok(()) => 0,
            Err(e) => {
                let errno = e.errno();
                set_last_error(func, e);
                errno
            }
        }
    }
    fn panicked() -> c_int {
        -libc::EIO
    }
}

/// Bodies returning a static string become `const char *`.
impl FfiOutput for &'static CStr {
    type C = *const c_char;
    fn into_c(self, _func: &'static str) -> *const c_char {
        self.as_ptr()
    }
    fn panicked() -> *const c_char {
        c"Internal error (panic in libqcow2)".as_ptr()
    }
}

/// Bodies returning a string owned elsewhere (the thread's last error).
impl FfiOutput for *const c_char {
    type C = *const c_char;
    fn into_c(self, _func: &'static str) -> *const c_char {
        self
    }
    fn panicked() -> *const c_char {
        c"Internal error (panic in libqcow2)".as_ptr()
    }
}

/// Bodies returning an `int` that is not an error code (queries) pass it on.
impl FfiOutput for c_int {
    type C = c_int;
    fn into_c(self, _func: &'static str) -> c_int {
        self
    }
    fn panicked() -> c_int {
        -libc::EIO
    }
}

/// Runs the body of exported function `func`. A panic is caught and becomes
/// [`FfiOutput::panicked`] (`-EIO` for `int` functions, with a last-error
/// message saying so); nothing ever unwinds into C.
pub(crate) fn ffi_boundary<T: FfiOutput>(func: &'static str, body: impl FnOnce() -> T) -> T::C {
    match catch_unwind(AssertUnwindSafe(body)) {
        Ok(v) => v.into_c(func),
        Err(payload) => {
            let what = payload
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| payload.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "unknown panic".into());
            // Best effort: the message itself must not panic again.
            let _ = catch_unwind(AssertUnwindSafe(|| {
                set_last_error(
                    func,
                    FfiError::new(-libc::EIO, format!("internal error (panic): {what}")),
                )
            }));
            T::panicked()
        }
    }
}
