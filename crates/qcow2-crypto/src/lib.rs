//! Data encryption for qcow2 images, independent of the file format: the
//! caller hands in bytes (a LUKS1 header area, 512-byte sectors of guest
//! data) and gets bytes back.
//!
//! Two schemes exist in qcow2:
//! - `crypt_method = 1`, the legacy "AES" scheme: [`legacy_aes`] derives the
//!   key from the password the way QEMU does (AES-128-CBC, IV plain64 of the
//!   guest sector).
//! - `crypt_method = 2`, LUKS: [`luks::unlock`] opens the LUKS1 header area
//!   stored in the image, [`luks::create`] builds a new one.
//!
//! Either way the result is a [`SectorCipher`] that encrypts or decrypts
//! runs of 512-byte sectors in place. All primitives come from the
//! RustCrypto crates (`aes`, `cbc`, `ctr`, `xts-mode`, `pbkdf2`, `sha1`,
//! `sha2`); this crate only wires them the way the on-disk formats say.
#![forbid(unsafe_code)]
#![deny(missing_docs)]

mod hash;
pub mod luks;
mod sector;

pub use sector::SectorCipher;

/// Size of the unit of encryption: every sector gets its own IV.
pub const SECTOR_SIZE: usize = 512;

/// Errors of this crate.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CryptoError {
    /// No active key slot accepts the password.
    #[error("Invalid password, cannot unlock any keyslot")]
    InvalidPassword,
    /// A well-formed header or parameter names an algorithm, mode, IV
    /// generator, hash or version this crate does not implement; the text
    /// names it.
    #[error("{0}")]
    Unsupported(String),
    /// Malformed header (or header area too short); the text says what.
    #[error("{0}")]
    Invalid(String),
    /// A buffer handed to [`SectorCipher::encrypt`]/[`SectorCipher::decrypt`]
    /// whose length is not a multiple of 512.
    #[error("Length {0} is not a multiple of the {SECTOR_SIZE}-byte sector size")]
    Misaligned(usize),
    /// The operating system's random number generator failed.
    #[error("Unable to read random bytes: {0}")]
    Random(String),
}

/// The qcow2 `crypt_method = 1` ("AES") cipher for `password`.
///
/// As QEMU does it (whatever the qcow2 specification says about 256-bit
/// keys): the key is the first 16 bytes of the password (up to its first
/// NUL byte, since QEMU handles it as a C string), zero-padded; the cipher
/// is AES-128-CBC with the plain64 IV of the *guest* sector number.
pub fn legacy_aes(password: &[u8]) -> Result<SectorCipher, CryptoError> {
    let len = password
        .iter()
        .position(|&b| b == 0)
        .unwrap_or(password.len());
    let mut key = [0u8; 16];
    let n = len.min(16);
    key[..n].copy_from_slice(&password[..n]);
    let spec = sector::CipherSpec {
        alg: sector::AesSize::Aes128,
        mode: sector::ModeKind::Cbc,
        ivgen: sector::IvGenKind::Plain64,
        ivgen_hash: None,
    };
    SectorCipher::new(&spec, &key)
}

/// Fills `buf` from the operating system's random number generator.
pub(crate) fn random(buf: &mut [u8]) -> Result<(), CryptoError> {
    getrandom::fill(buf).map_err(|e| CryptoError::Random(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn legacy_key_is_truncated_and_padded_like_a_c_string() {
        // Same 16-byte key: "pass" padded, "pass\0junk" stops at the NUL.
        let a = legacy_aes(b"pass").unwrap();
        let b = legacy_aes(b"pass\0junk").unwrap();
        let c = legacy_aes(b"0123456789abcdefXYZ").unwrap();
        let d = legacy_aes(b"0123456789abcdef").unwrap();
        let mut x = vec![7u8; 1024];
        let mut y = x.clone();
        a.encrypt(5, &mut x).unwrap();
        b.encrypt(5, &mut y).unwrap();
        assert_eq!(x, y);
        c.encrypt(9, &mut x).unwrap();
        d.encrypt(9, &mut y).unwrap();
        assert_eq!(x, y);
    }

    #[test]
    fn misaligned_buffers_are_rejected() {
        let c = legacy_aes(b"x").unwrap();
        let mut b = vec![0u8; 100];
        assert!(matches!(
            c.encrypt(0, &mut b),
            Err(CryptoError::Misaligned(100))
        ));
    }
}
