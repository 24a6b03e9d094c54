//! Errors of the C interface: negative errno values, the calling thread's
//! last error message (`qcow2_last_error`), and `qcow2_strerror`.

use crate::panic::ffi_boundary;
use std::cell::RefCell;
use std::ffi::{c_char, c_int, CStr, CString};

/// A failure of an exported function: the negative errno it returns and the
/// message `qcow2_last_error` gives.
#[derive(Debug)]
pub(crate) struct FfiError {
    errno: c_int,
    msg: String,
}

impl FfiError {
    /// A failure with `errno` (negative) and a message.
    pub(crate) fn new(errno: c_int, msg: impl Into<String>) -> Self {
        FfiError {
            errno,
            msg: msg.into(),
        }
    }
    /// `-EINVAL` with a message about the caller's arguments.
    pub(crate) fn invalid(msg: impl Into<String>) -> Self {
        FfiError::new(-libc::EINVAL, msg)
    }
    /// The negative errno.
    pub(crate) fn errno(&self) -> c_int {
        self.errno
    }
}

/// The one place engine errors become negative errno values: the engine's
/// own mapping (`Error::errno`), and its message, which names the image.
impl From<qcow2_ops::Error> for FfiError {
    fn from(e: qcow2_ops::Error) -> Self {
        let n = e.errno();
        FfiError::new(if n < 0 { n } else { -libc::EIO }, e.to_string())
    }
}

/// Shorthand for `-EINVAL` results.
pub(crate) fn invalid<T>(msg: impl Into<String>) -> Result<T, FfiError> {
    Err(FfiError::invalid(msg))
}

thread_local! {
    /// The last failure on this thread: (negative errno, message).
    static LAST_ERROR: RefCell<Option<(c_int, CString)>> = const { RefCell::new(None) };
}

/// Records `e` as the calling thread's last error, as "func: message".
pub(crate) fn set_last_error(func: &str, e: FfiError) {
    let text = format!("{func}: {}", e.msg).replace('\0', "\\0");
    let c = CString::new(text).unwrap_or_default();
    LAST_ERROR.with(|l| *l.borrow_mut() = Some((e.errno, c)));
}

/// The message of the last failed call on the calling thread.
///
/// Every qcow2_* function that returns a negative errno also records a
/// message here, saying what failed and why, naming the image where there is
/// one (for example `qcow2_open: 'disk.qcow2': L2 table offset 0x10200 of L1
/// entry 0 is not cluster aligned`). Successful calls leave it as it is.
///
/// Returns a NUL-terminated string owned by the library, valid on this thread
/// until its next failing qcow2_* call; the empty string when no call has
/// failed on this thread yet. Never NULL. The caller must not free it.
///
/// # Safety
/// None: takes no arguments. Thread-safe (the message is per thread).
#[no_mangle]
pub extern "C" fn qcow2_last_error() -> *const c_char {
    ffi_boundary("qcow2_last_error", || -> *const c_char {
        // The CString stays in this thread's slot until the next failing
        // call on this thread replaces it: the lifetime documented above.
        LAST_ERROR.with(|l| match &*l.borrow() {
            Some((_, msg)) => msg.as_ptr(),
            None => c"".as_ptr(),
        })
    })
}

/// The negative errno of the last failed call on the calling thread (the
/// value that call returned), or 0 when no call has failed on this thread.
///
/// # Safety
/// None: takes no arguments. Thread-safe.
#[no_mangle]
pub extern "C" fn qcow2_last_errno() -> c_int {
    ffi_boundary("qcow2_last_errno", || -> c_int {
        LAST_ERROR.with(|l| l.borrow().as_ref().map_or(0, |(e, _)| *e))
    })
}

/// A description of an error code returned by this library.
///
/// Parameters:
/// - `err`: a return value of a qcow2_* function (negative errno; positive
///   values are taken as errno values too; 0 is success).
///
/// Returns a static NUL-terminated English string, never NULL; unknown codes
/// give "Unknown error". The caller must not free it. For what went wrong in
/// a particular call, use qcow2_last_error().
///
/// # Safety
/// None: any `int` is accepted.
#[no_mangle]
pub extern "C" fn qcow2_strerror(err: c_int) -> *const c_char {
    ffi_boundary("qcow2_strerror", || -> &'static CStr {
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
