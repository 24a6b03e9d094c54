//! Encrypted images: unlocking at open, the data cipher, and the IV rule.
//!
//! Guest data is encrypted in 512-byte sectors; metadata never is. A LUKS
//! image (crypt method 2) keeps a LUKS1 header in clusters of its own,
//! named by the full disk encryption header extension, and takes the IV of
//! a sector from its host offset; the legacy AES method (1) takes it from
//! the guest offset. The cryptography itself is `qcow2-crypto`'s.
//!
//! Because the IV of a LUKS sector is its place in the file, data never
//! moves between host clusters as ciphertext: a copy-on-write decrypts the
//! old cluster and encrypts the copy for its new place (`datapath`).

use crate::error::{ioerr, Error, Result};
use crate::types::{EncryptionInfo, OpenOptions};
use qcow2_crypto::{CryptoError, SectorCipher};
use qcow2_format::header::{Header, EXT_FULL_DISK_ENCRYPTION};
use qcow2_format::{be64, put_be64};
use qcow2_io::Storage;
use std::ops::Range;

/// Sector size of the encryption: requests are done in whole sectors.
pub(crate) const SECTOR: u64 = 512;

/// Largest crypto header area read at open (QEMU's default LUKS header
/// is about 2 MiB; a header claiming more is refused, not read).
const MAX_AREA: u64 = 64 << 20;

/// crypt_method values.
pub(crate) const METHOD_AES: u32 = 1;
/// crypt_method values.
pub(crate) const METHOD_LUKS: u32 = 2;

/// The data cipher of an unlocked image.
pub(crate) struct Crypt {
    cipher: SectorCipher,
    /// IV from the guest offset (legacy AES) instead of the host offset.
    by_guest: bool,
}

impl Crypt {
    fn sector(&self, host: u64, guest: u64) -> u64 {
        if self.by_guest {
            guest / SECTOR
        } else {
            host / SECTOR
        }
    }

    /// Decrypts `buf`, read from host offset `host`, guest offset `guest`
    /// (both sector aligned, as the length).
    pub(crate) fn decrypt(&self, host: u64, guest: u64, buf: &mut [u8], name: &str) -> Result<()> {
        self.cipher
            .decrypt(self.sector(host, guest), buf)
            .map_err(|e| cipher_err(name, "decrypt", e))
    }

    /// Encrypts `buf` for host offset `host`, guest offset `guest`.
    pub(crate) fn encrypt(&self, host: u64, guest: u64, buf: &mut [u8], name: &str) -> Result<()> {
        self.cipher
            .encrypt(self.sector(host, guest), buf)
            .map_err(|e| cipher_err(name, "encrypt", e))
    }
}

fn cipher_err(name: &str, what: &str, e: CryptoError) -> Error {
    Error::io(
        format!("{name}: cannot {what} data: {e}"),
        std::io::Error::from_raw_os_error(libc::EIO),
    )
}

/// Whether `[offset, offset+len)` lies on sector boundaries.
pub(crate) fn aligned(offset: u64, len: u64) -> bool {
    (offset | len) % SECTOR == 0
}

/// The sector-aligned range that covers `[offset, offset+len)`.
pub(crate) fn widen(offset: u64, len: u64) -> Range<u64> {
    let start = offset - offset % SECTOR;
    let end = (offset + len).div_ceil(SECTOR) * SECTOR;
    start..end
}

/// The LUKS header area named by the extension: (offset, length).
pub(crate) fn header_area(h: &Header) -> Option<(u64, u64)> {
    let d = h.extension(EXT_FULL_DISK_ENCRYPTION)?;
    if d.len() < 16 {
        return Some((0, 0));
    }
    Some((be64(d, 0), be64(d, 8)))
}

/// The payload of the full disk encryption header extension.
pub(crate) fn header_extension(offset: u64, len: u64) -> Vec<u8> {
    let mut d = vec![0u8; 16];
    put_be64(&mut d, 0, offset);
    put_be64(&mut d, 8, len);
    d
}

/// What an encrypted image is, as found at open.
#[derive(Default)]
pub(crate) struct Opened {
    /// The cipher (absent when not encrypted or opened for metadata only).
    pub(crate) crypt: Option<std::sync::Arc<Crypt>>,
    pub(crate) info: Option<EncryptionInfo>,
    /// Clusters of the LUKS header (byte range), which the image owns.
    pub(crate) area: Option<Range<u64>>,
}

/// Reads the encryption of the image `h` and unlocks it with the secret
/// of `opts`, as QEMU's open does.
pub(crate) fn open(
    file: &dyn Storage,
    h: &Header,
    file_len: u64,
    name: &str,
    opts: &OpenOptions,
) -> Result<Opened> {
    let ext = header_area(h);
    let key = opts.key_secret.as_ref().map(|s| s.0.as_slice());
    let missing = || Error::Key("Parameter 'encrypt.key-secret' is required for cipher".into());
    match h.crypt_method {
        0 => {
            if ext.is_some() {
                return Err(Error::Invalid(format!(
                    "'{name}': Crypto header extension only expected when LUKS encryption is used"
                )));
            }
            Ok(Opened::default())
        }
        METHOD_AES => {
            if ext.is_some() {
                return Err(Error::Invalid(format!(
                    "'{name}': Crypto header extension only expected when LUKS encryption is used"
                )));
            }
            let crypt = match key {
                Some(k) => Some(std::sync::Arc::new(Crypt {
                    cipher: qcow2_crypto::legacy_aes(k).map_err(|e| key_err(name, e))?,
                    by_guest: true,
                })),
                None if opts.metadata_only => None,
                None => return Err(missing()),
            };
            Ok(Opened {
                crypt,
                info: Some(EncryptionInfo::Aes),
                area: None,
            })
        }
        METHOD_LUKS => {
            let Some((off, len)) = ext else {
                return Err(Error::Invalid(format!(
                    "'{name}': LUKS encryption without a crypto header extension"
                )));
            };
            let cs = 1u64 << h.cluster_bits;
            if off == 0 || off % cs != 0 || !(592..=MAX_AREA).contains(&len) {
                return Err(Error::Invalid(format!(
                    "'{name}': invalid crypto header (offset {off:#x}, length {len})"
                )));
            }
            if off.checked_add(len).is_none_or(|end| end > file_len) {
                return Err(Error::Invalid(format!(
                    "'{name}': crypto header at {off:#x} (length {len}) lies past the end of the file"
                )));
            }
            let mut first = vec![0u8; 592];
            file.read_at(&mut first, off)
                .map_err(ioerr("read LUKS header", name))?;
            let luks = qcow2_crypto::luks::Header::parse(&first).map_err(|e| key_err(name, e))?;
            let need = luks.area_len();
            if need > len {
                return Err(Error::Invalid(format!(
                    "'{name}': LUKS key material ({need} bytes) exceeds the crypto header ({len} bytes)"
                )));
            }
            let crypt = match key {
                Some(k) => {
                    let mut area = vec![0u8; need.max(592) as usize];
                    file.read_at(&mut area, off)
                        .map_err(ioerr("read LUKS key material", name))?;
                    let cipher =
                        qcow2_crypto::luks::unlock(&area, k).map_err(|e| key_err(name, e))?;
                    Some(std::sync::Arc::new(Crypt {
                        cipher,
                        by_guest: false,
                    }))
                }
                None if opts.metadata_only => None,
                None => return Err(missing()),
            };
            Ok(Opened {
                crypt,
                info: Some(EncryptionInfo::Luks(luks.info())),
                area: Some(off..off + len.div_ceil(cs) * cs),
            })
        }
        m => Err(Error::NotSupported(format!(
            "'{name}': Unsupported encryption method: {m}"
        ))),
    }
}

impl crate::image::Inner {
    /// Writes the guest bytes `buf` of guest offset `guest` to host offset
    /// `host`, encrypted when the image is (sector-aligned then).
    pub(crate) fn write_guest_data(&mut self, host: u64, guest: u64, buf: &[u8]) -> Result<()> {
        match self.crypt.clone() {
            None => self.write_data(host, buf),
            Some(c) => {
                let mut b = buf.to_vec();
                c.encrypt(host, guest, &mut b, &self.name)?;
                self.write_data(host, &b)
            }
        }
    }

    /// Whether host data cannot be moved or zeroed without knowing the guest
    /// offset it holds (legacy AES takes its IV from there).
    pub(crate) fn iv_from_guest(&self) -> bool {
        self.crypt.as_ref().is_some_and(|c| c.by_guest)
    }
}

pub(crate) fn key_err(name: &str, e: CryptoError) -> Error {
    match e {
        CryptoError::InvalidPassword => Error::Key(e.to_string()),
        CryptoError::Unsupported(m) => Error::NotSupported(format!("'{name}': {m}")),
        e => Error::Invalid(format!("'{name}': {e}")),
    }
}
