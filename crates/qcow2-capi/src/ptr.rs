//! The only places raw pointers from C become references. Each check names
//! the argument, so a NULL gives `-EINVAL` with a message saying which.

use crate::error::{invalid, FfiError};
use std::ffi::{c_char, CStr};

/// The NULL check for `const T *` arguments.
///
/// # Safety
/// `p` must be NULL or valid for reads of a `T` for `'a`, with no mutable
/// alias during `'a`.
pub(crate) unsafe fn check_ref<'a, T>(p: *const T, name: &str) -> Result<&'a T, FfiError> {
    // SAFETY: the caller guarantees that a non-NULL `p` is valid for `'a`.
    unsafe { p.as_ref() }.ok_or_else(|| FfiError::invalid(format!("{name} is NULL")))
}

/// The NULL check for `T *` out-parameters.
///
/// # Safety
/// `p` must be NULL or valid for writes of a `T` for `'a`, with no other alias
/// during `'a`.
pub(crate) unsafe fn check_mut<'a, T>(p: *mut T, name: &str) -> Result<&'a mut T, FfiError> {
    // SAFETY: the caller guarantees that a non-NULL `p` is valid and unaliased for `'a`.
    unsafe { p.as_mut() }.ok_or_else(|| FfiError::invalid(format!("{name} is NULL")))
}

/// The NULL check for `(const void *buf, size_t len)` arguments. NULL is
/// refused even when `len` is 0.
///
/// # Safety
/// `p` must be NULL or valid for reads of `len` bytes for `'a`.
pub(crate) unsafe fn check_slice<'a>(
    p: *const u8,
    len: usize,
    name: &str,
) -> Result<&'a [u8], FfiError> {
    if p.is_null() {
        return invalid(format!("{name} is NULL"));
    }
    if len > isize::MAX as usize {
        return invalid(format!("{name}: length {len} is too large"));
    }
    // SAFETY: non-NULL (checked), valid for `len` bytes (caller), len <= isize::MAX (checked).
    Ok(unsafe { std::slice::from_raw_parts(p, len) })
}

/// The NULL check for `(void *buf, size_t len)` arguments. NULL is refused
/// even when `len` is 0.
///
/// # Safety
/// `p` must be NULL or valid for writes of `len` bytes for `'a`, unaliased.
pub(crate) unsafe fn check_slice_mut<'a>(
    p: *mut u8,
    len: usize,
    name: &str,
) -> Result<&'a mut [u8], FfiError> {
    if p.is_null() {
        return invalid(format!("{name} is NULL"));
    }
    if len > isize::MAX as usize {
        return invalid(format!("{name}: length {len} is too large"));
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
pub(crate) unsafe fn check_array_mut<'a, T>(
    p: *mut T,
    len: usize,
    name: &str,
) -> Result<&'a mut [T], FfiError> {
    if p.is_null() {
        return invalid(format!("{name} is NULL"));
    }
    if len
        .checked_mul(std::mem::size_of::<T>())
        .is_none_or(|b| b > isize::MAX as usize)
    {
        return invalid(format!("{name}: {len} elements are too many"));
    }
    // SAFETY: non-NULL (checked), valid for `len` elements (caller), size in range (checked).
    Ok(unsafe { std::slice::from_raw_parts_mut(p, len) })
}

/// The NULL check for NUL-terminated strings.
///
/// # Safety
/// `p` must be NULL or point to a NUL-terminated string valid for `'a`.
pub(crate) unsafe fn check_cstr<'a>(p: *const c_char, name: &str) -> Result<&'a CStr, FfiError> {
    if p.is_null() {
        return invalid(format!("{name} is NULL"));
    }
    // SAFETY: non-NULL (checked) and NUL-terminated (caller).
    Ok(unsafe { CStr::from_ptr(p) })
}

/// Like [`check_cstr`] for optional UTF-8 strings: NULL is `None`.
///
/// # Safety
/// As [`check_cstr`].
pub(crate) unsafe fn opt_utf8(p: *const c_char, name: &str) -> Result<Option<String>, FfiError> {
    if p.is_null() {
        return Ok(None);
    }
    // SAFETY: forwarded from the caller.
    let s = unsafe { check_cstr(p, name) }?;
    match s.to_str() {
        Ok(s) => Ok(Some(s.to_owned())),
        Err(_) => invalid(format!("{name} is not valid UTF-8")),
    }
}

/// A NULL or NUL-terminated string as bytes (file names need not be UTF-8).
///
/// # Safety
/// `p` must be NULL or a NUL-terminated string.
pub(crate) unsafe fn opt_bytes(p: *const c_char, name: &str) -> Result<Option<Vec<u8>>, FfiError> {
    if p.is_null() {
        return Ok(None);
    }
    // SAFETY: forwarded from the caller.
    let s = unsafe { check_cstr(p, name) }?;
    Ok(Some(s.to_bytes().to_vec()))
}
