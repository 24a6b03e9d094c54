//! Sector ciphers: AES in ECB, CBC, CTR or XTS mode, with a fresh IV per
//! 512-byte sector from one of the plain, plain64 or ESSIV generators.

use crate::hash::HashAlg;
use crate::{CryptoError, SECTOR_SIZE};
use aes::cipher::consts::U16;
use aes::cipher::generic_array::GenericArray;
use aes::cipher::{
    BlockCipher, BlockDecrypt, BlockDecryptMut, BlockEncrypt, BlockEncryptMut, BlockSizeUser,
    InnerIvInit, KeyInit, StreamCipher,
};
use aes::{Aes128, Aes192, Aes256};
use xts_mode::Xts128;

/// AES key size.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum AesSize {
    Aes128,
    Aes192,
    Aes256,
}

impl AesSize {
    pub(crate) fn key_len(self) -> usize {
        match self {
            AesSize::Aes128 => 16,
            AesSize::Aes192 => 24,
            AesSize::Aes256 => 32,
        }
    }

    pub(crate) fn from_key_len(n: usize) -> Option<AesSize> {
        match n {
            16 => Some(AesSize::Aes128),
            24 => Some(AesSize::Aes192),
            32 => Some(AesSize::Aes256),
            _ => None,
        }
    }

    /// QEMU's name ("aes-256").
    pub(crate) fn name(self) -> &'static str {
        match self {
            AesSize::Aes128 => "aes-128",
            AesSize::Aes192 => "aes-192",
            AesSize::Aes256 => "aes-256",
        }
    }
}

/// Block cipher mode.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ModeKind {
    Ecb,
    Cbc,
    Xts,
    Ctr,
}

impl ModeKind {
    pub(crate) fn parse(name: &str) -> Result<ModeKind, CryptoError> {
        Ok(match name {
            "ecb" => ModeKind::Ecb,
            "cbc" => ModeKind::Cbc,
            "xts" => ModeKind::Xts,
            "ctr" => ModeKind::Ctr,
            _ => {
                return Err(CryptoError::Unsupported(format!(
                    "Cipher mode '{name}' not supported"
                )))
            }
        })
    }

    pub(crate) fn name(self) -> &'static str {
        match self {
            ModeKind::Ecb => "ecb",
            ModeKind::Cbc => "cbc",
            ModeKind::Xts => "xts",
            ModeKind::Ctr => "ctr",
        }
    }

    /// Bytes of key material for `alg` in this mode (XTS: two keys).
    pub(crate) fn key_bytes(self, alg: AesSize) -> usize {
        match self {
            ModeKind::Xts => 2 * alg.key_len(),
            _ => alg.key_len(),
        }
    }
}

/// IV generator.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum IvGenKind {
    Plain,
    Plain64,
    Essiv,
}

impl IvGenKind {
    pub(crate) fn parse(name: &str) -> Result<IvGenKind, CryptoError> {
        Ok(match name {
            "plain" => IvGenKind::Plain,
            "plain64" => IvGenKind::Plain64,
            "essiv" => IvGenKind::Essiv,
            _ => {
                return Err(CryptoError::Unsupported(format!(
                    "IV generator '{name}' not supported"
                )))
            }
        })
    }

    pub(crate) fn name(self) -> &'static str {
        match self {
            IvGenKind::Plain => "plain",
            IvGenKind::Plain64 => "plain64",
            IvGenKind::Essiv => "essiv",
        }
    }
}

/// Everything that defines a data cipher but the key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct CipherSpec {
    pub(crate) alg: AesSize,
    pub(crate) mode: ModeKind,
    pub(crate) ivgen: IvGenKind,
    /// The ESSIV hash (ignored by the other generators).
    pub(crate) ivgen_hash: Option<HashAlg>,
}

impl CipherSpec {
    /// The AES size ESSIV encrypts the sector number with: the data
    /// cipher's when the hash output has its key length, else the AES whose
    /// key length the hash output has (QEMU's rule).
    pub(crate) fn essiv_alg(&self) -> Result<AesSize, CryptoError> {
        let h = self.ivgen_hash.ok_or_else(|| {
            CryptoError::Invalid("Missing IV generator hash specification".into())
        })?;
        AesSize::from_key_len(h.len()).ok_or_else(|| {
            CryptoError::Unsupported(format!("No AES cipher with key size {} available", h.len()))
        })
    }

    /// Checks the combination can be built (ESSIV hash size).
    pub(crate) fn validate(&self) -> Result<(), CryptoError> {
        if self.ivgen == IvGenKind::Essiv {
            self.essiv_alg()?;
        }
        Ok(())
    }
}

/// What this module needs of an AES variant.
trait Aes:
    BlockCipher + BlockEncrypt + BlockDecrypt + BlockSizeUser<BlockSize = U16> + KeyInit + Clone
{
}
impl<T> Aes for T where
    T: BlockCipher + BlockEncrypt + BlockDecrypt + BlockSizeUser<BlockSize = U16> + KeyInit + Clone
{
}

/// One AES variant in one mode.
enum Mode<C: Aes> {
    Ecb(C),
    Cbc(C),
    Ctr(C),
    Xts(Box<Xts128<C>>),
}

fn new_key<C: Aes>(key: &[u8]) -> Result<C, CryptoError> {
    C::new_from_slice(key)
        .map_err(|_| CryptoError::Invalid(format!("bad key length {}", key.len())))
}

impl<C: Aes> Mode<C> {
    fn new(mode: ModeKind, key: &[u8]) -> Result<Self, CryptoError> {
        Ok(match mode {
            ModeKind::Ecb => Mode::Ecb(new_key(key)?),
            ModeKind::Cbc => Mode::Cbc(new_key(key)?),
            ModeKind::Ctr => Mode::Ctr(new_key(key)?),
            ModeKind::Xts => {
                let (k1, k2) = key.split_at(key.len() / 2);
                Mode::Xts(Box::new(Xts128::new(new_key(k1)?, new_key(k2)?)))
            }
        })
    }

    /// En/decrypts one sector (or the shorter tail of key material) with `iv`.
    fn crypt(&self, iv: &[u8; 16], chunk: &mut [u8], enc: bool) -> Result<(), CryptoError> {
        if !matches!(self, Mode::Ctr(_)) && (chunk.len() % 16 != 0 || chunk.is_empty()) {
            return Err(CryptoError::Invalid(format!(
                "Length {} is not a multiple of the cipher block size",
                chunk.len()
            )));
        }
        match self {
            Mode::Ecb(c) => {
                for b in chunk.chunks_exact_mut(16).map(GenericArray::from_mut_slice) {
                    if enc {
                        c.encrypt_block(b);
                    } else {
                        c.decrypt_block(b);
                    }
                }
            }
            Mode::Cbc(c) => {
                if enc {
                    let mut m = cbc::Encryptor::<C>::inner_iv_init(c.clone(), iv.into());
                    for b in chunk.chunks_exact_mut(16).map(GenericArray::from_mut_slice) {
                        m.encrypt_block_mut(b);
                    }
                } else {
                    let mut m = cbc::Decryptor::<C>::inner_iv_init(c.clone(), iv.into());
                    for b in chunk.chunks_exact_mut(16).map(GenericArray::from_mut_slice) {
                        m.decrypt_block_mut(b);
                    }
                }
            }
            Mode::Ctr(c) => {
                let core =
                    ctr::CtrCore::<C, ctr::flavors::Ctr128BE>::inner_iv_init(c.clone(), iv.into());
                let mut m = ctr::Ctr128BE::<C>::from_core(core);
                m.apply_keystream(chunk);
            }
            Mode::Xts(x) => {
                if enc {
                    x.encrypt_sector(chunk, *iv);
                } else {
                    x.decrypt_sector(chunk, *iv);
                }
            }
        }
        Ok(())
    }
}

enum Engine {
    A128(Mode<Aes128>),
    A192(Mode<Aes192>),
    A256(Mode<Aes256>),
}

/// A bare AES block encryptor (ESSIV).
enum Block {
    A128(Aes128),
    A192(Aes192),
    A256(Aes256),
}

impl Block {
    fn encrypt(&self, b: &mut [u8; 16]) {
        let b = GenericArray::from_mut_slice(b);
        match self {
            Block::A128(c) => c.encrypt_block(b),
            Block::A192(c) => c.encrypt_block(b),
            Block::A256(c) => c.encrypt_block(b),
        }
    }
}

enum IvGen {
    /// ECB: no IV.
    None,
    Plain,
    Plain64,
    Essiv(Box<Block>),
}

impl IvGen {
    fn iv(&self, sector: u64) -> [u8; 16] {
        let mut iv = [0u8; 16];
        match self {
            IvGen::None => {}
            IvGen::Plain => iv[..4].copy_from_slice(&(sector as u32).to_le_bytes()),
            IvGen::Plain64 => iv[..8].copy_from_slice(&sector.to_le_bytes()),
            IvGen::Essiv(c) => {
                iv[..8].copy_from_slice(&sector.to_le_bytes());
                c.encrypt(&mut iv);
            }
        }
        iv
    }
}

/// A data cipher bound to a key: AES in ECB, CBC, CTR or XTS mode with an
/// IV per 512-byte sector (plain, plain64 or ESSIV).
///
/// `Send + Sync`; holds no mutable state, so one instance can serve many
/// threads behind an `Arc`. Its `Debug` output never shows key material.
pub struct SectorCipher {
    spec: CipherSpec,
    engine: Engine,
    ivgen: IvGen,
}

impl std::fmt::Debug for SectorCipher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SectorCipher")
            .field("cipher", &self.spec.alg.name())
            .field("mode", &self.spec.mode.name())
            .field("ivgen", &self.spec.ivgen.name())
            .finish_non_exhaustive()
    }
}

impl SectorCipher {
    /// Builds the cipher for `spec` with `key` (`spec.mode.key_bytes(alg)`
    /// bytes).
    pub(crate) fn new(spec: &CipherSpec, key: &[u8]) -> Result<SectorCipher, CryptoError> {
        if key.len() != spec.mode.key_bytes(spec.alg) {
            return Err(CryptoError::Invalid(format!(
                "Key length {} does not fit {}-{}",
                key.len(),
                spec.alg.name(),
                spec.mode.name()
            )));
        }
        let engine = match spec.alg {
            AesSize::Aes128 => Engine::A128(Mode::new(spec.mode, key)?),
            AesSize::Aes192 => Engine::A192(Mode::new(spec.mode, key)?),
            AesSize::Aes256 => Engine::A256(Mode::new(spec.mode, key)?),
        };
        let ivgen = if spec.mode == ModeKind::Ecb {
            IvGen::None
        } else {
            match spec.ivgen {
                IvGenKind::Plain => IvGen::Plain,
                IvGenKind::Plain64 => IvGen::Plain64,
                IvGenKind::Essiv => {
                    let alg = spec.essiv_alg()?;
                    // `essiv_alg` guarantees the hash exists and its output
                    // is exactly the ESSIV key length.
                    let h = spec.ivgen_hash.unwrap_or(HashAlg::Sha256);
                    let salt = h.digest(&[key]);
                    let salt = &salt[..alg.key_len()];
                    IvGen::Essiv(Box::new(match alg {
                        AesSize::Aes128 => Block::A128(new_key(salt)?),
                        AesSize::Aes192 => Block::A192(new_key(salt)?),
                        AesSize::Aes256 => Block::A256(new_key(salt)?),
                    }))
                }
            }
        };
        Ok(SectorCipher {
            spec: *spec,
            engine,
            ivgen,
        })
    }

    /// Encrypts `buf` in place. `buf.len()` must be a multiple of 512;
    /// `sector` is the IV sector number of the first 512 bytes, the
    /// following sectors use `sector + 1`, ...
    pub fn encrypt(&self, sector: u64, buf: &mut [u8]) -> Result<(), CryptoError> {
        if buf.len() % SECTOR_SIZE != 0 {
            return Err(CryptoError::Misaligned(buf.len()));
        }
        self.run(sector, buf, true)
    }

    /// Decrypts `buf` in place; same rules as [`SectorCipher::encrypt`].
    pub fn decrypt(&self, sector: u64, buf: &mut [u8]) -> Result<(), CryptoError> {
        if buf.len() % SECTOR_SIZE != 0 {
            return Err(CryptoError::Misaligned(buf.len()));
        }
        self.run(sector, buf, false)
    }

    /// Like encrypt/decrypt but lets the last chunk be shorter than a
    /// sector (LUKS key material, `key_bytes * stripes` bytes).
    pub(crate) fn run(&self, sector: u64, buf: &mut [u8], enc: bool) -> Result<(), CryptoError> {
        for (i, chunk) in buf.chunks_mut(SECTOR_SIZE).enumerate() {
            let iv = self.ivgen.iv(sector.wrapping_add(i as u64));
            match &self.engine {
                Engine::A128(m) => m.crypt(&iv, chunk, enc)?,
                Engine::A192(m) => m.crypt(&iv, chunk, enc)?,
                Engine::A256(m) => m.crypt(&iv, chunk, enc)?,
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn all_specs() -> Vec<CipherSpec> {
        let mut v = Vec::new();
        for alg in [AesSize::Aes128, AesSize::Aes192, AesSize::Aes256] {
            for mode in [ModeKind::Ecb, ModeKind::Cbc, ModeKind::Xts, ModeKind::Ctr] {
                for ivgen in [IvGenKind::Plain, IvGenKind::Plain64, IvGenKind::Essiv] {
                    v.push(CipherSpec {
                        alg,
                        mode,
                        ivgen,
                        ivgen_hash: Some(HashAlg::Sha256),
                    });
                }
            }
        }
        v
    }

    #[test]
    fn round_trip_every_combination() {
        for spec in all_specs() {
            let key: Vec<u8> = (0..spec.mode.key_bytes(spec.alg) as u8).collect();
            let c = SectorCipher::new(&spec, &key).unwrap();
            let plain: Vec<u8> = (0..2048u32).map(|i| i as u8).collect();
            let mut b = plain.clone();
            c.encrypt(77, &mut b).unwrap();
            assert_ne!(b, plain, "{spec:?}");
            // Sector by sector gives the same as a run.
            let mut s = plain.clone();
            for (i, ch) in s.chunks_mut(512).enumerate() {
                c.encrypt(77 + i as u64, ch).unwrap();
            }
            assert_eq!(s, b, "{spec:?}");
            c.decrypt(77, &mut b).unwrap();
            assert_eq!(b, plain, "{spec:?}");
        }
    }

    #[test]
    fn plain_wraps_at_32_bits_and_plain64_does_not() {
        let key = [3u8; 32];
        let mk = |ivgen| {
            let spec = CipherSpec {
                alg: AesSize::Aes256,
                mode: ModeKind::Cbc,
                ivgen,
                ivgen_hash: None,
            };
            SectorCipher::new(&spec, &key).unwrap()
        };
        let (p, p64) = (mk(IvGenKind::Plain), mk(IvGenKind::Plain64));
        let enc = |c: &SectorCipher, s| {
            let mut b = vec![0u8; 512];
            c.encrypt(s, &mut b).unwrap();
            b
        };
        assert_eq!(enc(&p, 5), enc(&p, 5 + (1 << 32)));
        assert_ne!(enc(&p64, 5), enc(&p64, 5 + (1 << 32)));
        assert_eq!(enc(&p, 5), enc(&p64, 5));
    }

    #[test]
    fn sector_cipher_is_send_and_sync() {
        fn f<T: Send + Sync>() {}
        f::<SectorCipher>();
    }
}
