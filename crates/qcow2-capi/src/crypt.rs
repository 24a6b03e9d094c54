//! Encrypted images: creating them (LUKS or QEMU's legacy AES), opening
//! them with their passphrase, and asking how an image is encrypted.
//!
//! The passphrase is the bytes QEMU takes from a `secret` object's data
//! (`--object secret,id=sec0,data=...` with `encrypt.key-secret=sec0`): an
//! image made here opens in QEMU with the same bytes, and the other way
//! round. Data is encrypted in 512-byte sectors; requests of any size and
//! alignment work (the engine reads and rewrites partial sectors).

use crate::consts::*;
use crate::error::{invalid, FfiError};
use crate::image::{create_options, open_options};
use crate::panic::ffi_boundary;
use crate::ptr::*;
use crate::types::*;
use qcow2_ops::{Encryption, EncryptionInfo, Image, LuksParams, Secret};
use std::ffi::{c_char, c_int, OsStr};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

/// Encryption of a new image (qcow2_create_encrypted). String fields NULL
/// (or an `iter_time_ms` of 0) take qemu-img's defaults: aes-256, xts,
/// plain64, no IV hash, sha256, 2000 ms.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct Qcow2EncryptOptions {
    /// QCOW2_ENCRYPT_LUKS or QCOW2_ENCRYPT_AES (legacy, weak: for
    /// compatibility with old images only).
    pub format: u32,
    /// The passphrase (bytes, not NUL-terminated), `secret_len` bytes.
    pub secret: *const u8,
    /// Length of `secret` in bytes.
    pub secret_len: usize,
    /// LUKS cipher: "aes-128", "aes-192" or "aes-256".
    pub cipher_alg: *const c_char,
    /// LUKS cipher mode: "xts", "cbc", "ecb" or "ctr".
    pub cipher_mode: *const c_char,
    /// LUKS IV generator: "plain", "plain64" or "essiv".
    pub ivgen_alg: *const c_char,
    /// Hash of the essiv IV generator ("sha256", ...).
    pub ivgen_hash_alg: *const c_char,
    /// LUKS hash for key derivation and the anti-forensic splitter:
    /// "sha1", "sha224", "sha256", "sha384" or "sha512".
    pub hash_alg: *const c_char,
    /// Time to spend deriving the key when the image is opened, in
    /// milliseconds (sets the PBKDF2 iteration counts, as qemu-img's
    /// `encrypt.iter-time`).
    pub iter_time_ms: u64,
}

/// Creates a new encrypted qcow2 image, as `qemu-img create -o
/// encrypt.format=luks,encrypt.key-secret=...` does: a LUKS1 header with one
/// active key slot for the passphrase, in clusters of its own after the L1
/// table (or QEMU's legacy AES method).
///
/// Parameters:
/// - `path`: NUL-terminated file name (an existing file is truncated).
/// - `size`: virtual size in bytes.
/// - `opts`: creation options, or NULL for the defaults (as qcow2_create).
/// - `enc`: the encryption; must not be NULL.
///
/// Returns 0 on success; -EINVAL for a NULL argument, an unknown format or
/// a bad option; -ENOTSUP for a cipher, mode, IV generator or hash this
/// library does not implement (serpent, twofish, ...); other negative
/// errno values from the file system.
///
/// # Safety
/// `path` must be NULL or NUL-terminated; `opts` as for qcow2_create; `enc`
/// NULL or a readable `Qcow2EncryptOptions` whose `secret` is valid for
/// `secret_len` bytes and whose strings are each NULL or NUL-terminated.
#[no_mangle]
pub unsafe extern "C" fn qcow2_create_encrypted(
    path: *const c_char,
    size: u64,
    opts: *const Qcow2CreateOptions,
    enc: *const Qcow2EncryptOptions,
) -> c_int {
    ffi_boundary("qcow2_create_encrypted", || {
        // SAFETY: `path` is NULL or NUL-terminated (contract above).
        let path = unsafe { check_cstr(path, "path") }?;
        // SAFETY: as qcow2_create's `opts` (contract above).
        let mut o = unsafe { create_options(opts) }?;
        // SAFETY: `enc` is NULL or readable (contract above).
        let e = unsafe { check_ref(enc, "enc") }?;
        // SAFETY: `secret` is valid for `secret_len` bytes (contract above).
        let secret =
            Secret(unsafe { check_slice(e.secret, e.secret_len, "enc->secret") }?.to_vec());
        o.encryption = Some(match e.format {
            QCOW2_ENCRYPT_AES => Encryption::Aes { secret },
            QCOW2_ENCRYPT_LUKS => {
                let mut params = LuksParams::default();
                let fields: [(*const c_char, &str, &mut String); 4] = [
                    (e.cipher_alg, "enc->cipher_alg", &mut params.cipher_alg),
                    (e.cipher_mode, "enc->cipher_mode", &mut params.cipher_mode),
                    (e.ivgen_alg, "enc->ivgen_alg", &mut params.ivgen_alg),
                    (e.hash_alg, "enc->hash_alg", &mut params.hash_alg),
                ];
                for (p, name, dst) in fields {
                    // SAFETY: each string field is NULL or NUL-terminated (contract above).
                    if let Some(v) = unsafe { opt_utf8(p, name) }? {
                        *dst = v;
                    }
                }
                // SAFETY: as above.
                if let Some(v) = unsafe { opt_utf8(e.ivgen_hash_alg, "enc->ivgen_hash_alg") }? {
                    params.ivgen_hash_alg = Some(v);
                }
                if e.iter_time_ms != 0 {
                    params.iter_time_ms = e.iter_time_ms;
                }
                Encryption::Luks { secret, params }
            }
            f => {
                return invalid(format!(
                    "enc->format {f}: expected QCOW2_ENCRYPT_LUKS or QCOW2_ENCRYPT_AES"
                ))
            }
        });
        let path = Path::new(OsStr::from_bytes(path.to_bytes()));
        Image::create(path, size, &o).map_err(FfiError::from)
    })
}

/// Opens an encrypted qcow2 image with its passphrase (as qcow2_open; an
/// image that is not encrypted opens too, the passphrase unused).
///
/// Parameters:
/// - `path`: NUL-terminated file name.
/// - `flags`: QCOW2_OPEN_* bits, as for qcow2_open.
/// - `secret`, `secret_len`: the passphrase (bytes).
/// - `out`: receives the new handle on success.
///
/// Returns 0 on success; -EACCES when no key slot opens with the
/// passphrase ("Invalid password, cannot unlock any keyslot"); -ENOTSUP
/// for a cipher this library does not implement; the errors of qcow2_open
/// otherwise. qcow2_open itself fails on an encrypted image with -EACCES
/// ("Parameter 'encrypt.key-secret' is required for cipher"), as QEMU.
///
/// Opening derives the key with the PBKDF2 iteration count stored in the
/// image: about the `iter_time_ms` the image was made with.
///
/// # Safety
/// `path` must be NULL or NUL-terminated; `secret` NULL or valid for
/// `secret_len` bytes; `out` NULL or valid for writing a pointer. The handle
/// must be released with qcow2_close exactly once.
#[no_mangle]
pub unsafe extern "C" fn qcow2_open_encrypted(
    path: *const c_char,
    flags: u32,
    secret: *const u8,
    secret_len: usize,
    out: *mut *mut Qcow2Image,
) -> c_int {
    ffi_boundary("qcow2_open_encrypted", || {
        // SAFETY: `path` is NULL or NUL-terminated (contract above).
        let path = unsafe { check_cstr(path, "path") }?;
        // SAFETY: `secret` is NULL or valid for `secret_len` bytes (contract above).
        let secret = unsafe { check_slice(secret, secret_len, "secret") }?;
        // SAFETY: `out` is NULL or writable (contract above).
        let out = unsafe { check_mut(out, "out") }?;
        let mut opts = open_options(flags)?;
        opts.key_secret = Some(Secret(secret.to_vec()));
        let path = Path::new(OsStr::from_bytes(path.to_bytes()));
        let inner = Image::open(path, &opts).map_err(FfiError::from)?;
        *out = Box::into_raw(Box::new(Qcow2Image { inner }));
        Ok(())
    })
}

/// How an open image is encrypted: QCOW2_ENCRYPT_NONE, QCOW2_ENCRYPT_AES or
/// QCOW2_ENCRYPT_LUKS, written to `out`.
///
/// Returns 0 on success; -EINVAL for NULL arguments.
///
/// # Safety
/// `img` must be NULL or an open handle; `out` NULL or valid for writing.
#[no_mangle]
pub unsafe extern "C" fn qcow2_get_encryption(img: *const Qcow2Image, out: *mut u32) -> c_int {
    ffi_boundary("qcow2_get_encryption", || {
        // SAFETY: `img` is NULL or an open handle (contract above).
        let img = unsafe { check_ref(img, "img") }?;
        // SAFETY: `out` is NULL or writable (contract above).
        let out = unsafe { check_mut(out, "out") }?;
        *out = match img.inner.info().encryption {
            None => QCOW2_ENCRYPT_NONE,
            Some(EncryptionInfo::Aes) => QCOW2_ENCRYPT_AES,
            Some(EncryptionInfo::Luks(_)) => QCOW2_ENCRYPT_LUKS,
        };
        Ok(())
    })
}
