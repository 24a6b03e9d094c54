//! LUKS1 header areas (cryptsetup's on-disk format, version 1.2.1 of the
//! specification, as QEMU implements it): parse, unlock with a password,
//! create.
//!
//! A header area is the 592-byte partition header followed by the key
//! material of the 8 key slots; offsets inside it are relative to its first
//! byte. Everything is big-endian.

use crate::hash::HashAlg;
use crate::sector::{AesSize, CipherSpec, IvGenKind, ModeKind};
use crate::{CryptoError, SectorCipher};
use std::time::{Duration, Instant};

/// Length of the partition header including the key slot headers.
pub const HEADER_LEN: usize = 592;
/// Number of key slots.
pub const NUM_KEY_SLOTS: usize = 8;
/// Anti-forensic stripes per key slot (the only value QEMU accepts).
pub const STRIPES: u32 = 4000;

const MAGIC: &[u8; 6] = b"LUKS\xba\xbe";
const SECTOR: u64 = 512;
/// The key material of the first slot starts at this byte offset.
const KEY_SLOT_OFFSET: u64 = 4096;
const SLOT_ENABLED: u32 = 0x00AC_71F3;
const SLOT_DISABLED: u32 = 0x0000_DEAD;
const DIGEST_LEN: usize = 20;
const SALT_LEN: usize = 32;
const MIN_SLOT_KEY_ITERS: u64 = 1000;
const MIN_MASTER_KEY_ITERS: u64 = 1000;

/// One key slot header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeySlot {
    /// Raw state word (0x00AC71F3 enabled, 0x0000DEAD disabled).
    pub active: u32,
    /// PBKDF2 iterations for the password.
    pub iterations: u32,
    /// PBKDF2 salt for the password.
    pub salt: [u8; SALT_LEN],
    /// Start of the key material, in 512-byte sectors from the start of the
    /// header area.
    pub key_offset_sector: u32,
    /// Anti-forensic stripes.
    pub stripes: u32,
}

impl KeySlot {
    /// Whether the slot holds a key.
    pub fn is_active(&self) -> bool {
        self.active == SLOT_ENABLED
    }
}

/// A parsed and validated LUKS1 partition header (the first 592 bytes of
/// the header area).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    /// `cipher_name` ("aes").
    pub cipher_name: String,
    /// `cipher_mode` ("xts-plain64", "cbc-essiv:sha256").
    pub cipher_mode: String,
    /// `hash_spec` ("sha256").
    pub hash_spec: String,
    /// Start of the encrypted payload, in 512-byte sectors.
    pub payload_offset_sector: u32,
    /// Master key length in bytes (XTS: both keys).
    pub key_bytes: u32,
    /// PBKDF2 digest of the master key.
    pub mk_digest: [u8; DIGEST_LEN],
    /// Salt of that digest.
    pub mk_digest_salt: [u8; SALT_LEN],
    /// Iterations of that digest.
    pub mk_digest_iter: u32,
    /// UUID string.
    pub uuid: String,
    /// The key slots.
    pub slots: [KeySlot; NUM_KEY_SLOTS],
    spec: CipherSpec,
    hash: HashAlg,
}

/// What `qemu-img info` shows of a LUKS header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Info {
    /// "aes-256".
    pub cipher_alg: String,
    /// "xts".
    pub cipher_mode: String,
    /// "plain64".
    pub ivgen_alg: String,
    /// The ESSIV hash; `None` unless the generator is essiv.
    pub ivgen_hash_alg: Option<String>,
    /// The PBKDF2 / AF hash ("sha256").
    pub hash_alg: String,
    /// UUID string.
    pub uuid: String,
    /// Payload offset in bytes.
    pub payload_offset: u64,
    /// Iterations of the master key digest.
    pub master_key_iters: u32,
    /// The 8 key slots.
    pub slots: Vec<SlotInfo>,
}

/// One key slot as `qemu-img info` shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SlotInfo {
    /// Whether the slot holds a key.
    pub active: bool,
    /// Iterations, only for an active slot.
    pub iters: Option<u32>,
    /// Stripes, only for an active slot.
    pub stripes: Option<u32>,
    /// Offset of the key material in bytes.
    pub key_offset: u64,
}

fn be32(b: &[u8], at: usize) -> u32 {
    let mut w = [0u8; 4];
    w.copy_from_slice(&b[at..at + 4]);
    u32::from_be_bytes(w)
}

fn invalid(msg: impl Into<String>) -> CryptoError {
    CryptoError::Invalid(msg.into())
}

/// A NUL-terminated string field.
fn cstr(field: &[u8], what: &str) -> Result<String, CryptoError> {
    let end = field
        .iter()
        .position(|&b| b == 0)
        .ok_or_else(|| invalid(format!("LUKS header {what} is not NUL terminated")))?;
    String::from_utf8(field[..end].to_vec())
        .map_err(|_| invalid(format!("LUKS header {what} is not valid UTF-8")))
}

/// Sectors of key material of a slot with `stripes` stripes, rounded up to
/// a sector and then to the 4096-byte header alignment (cryptsetup's rule,
/// which QEMU follows).
fn split_key_sectors(key_bytes: u64, stripes: u64) -> u64 {
    let header_sectors = KEY_SLOT_OFFSET / SECTOR;
    (key_bytes * stripes)
        .div_ceil(SECTOR)
        .next_multiple_of(header_sectors)
}

/// Resolves the algorithm strings of a header.
fn parse_spec(
    cipher_name: &str,
    cipher_mode: &str,
    hash_spec: &str,
    key_bytes: u32,
) -> Result<(CipherSpec, HashAlg), CryptoError> {
    // <mode>-<ivgen>[:<ivhash>]
    let (mode, ivgen) = cipher_mode.split_once('-').ok_or_else(|| {
        invalid(format!(
            "Unexpected cipher mode string format '{cipher_mode}'"
        ))
    })?;
    let (ivgen, ivhash) = match ivgen.split_once(':') {
        Some((g, h)) => (g, Some(HashAlg::parse(h)?)),
        None => (ivgen, None),
    };
    let mode = ModeKind::parse(mode)?;
    let per_key = if mode == ModeKind::Xts {
        key_bytes / 2
    } else {
        key_bytes
    };
    let alg = match (cipher_name, AesSize::from_key_len(per_key as usize)) {
        ("aes", Some(a)) if mode.key_bytes(a) as u64 == u64::from(key_bytes) => a,
        ("cast5" | "serpent" | "twofish" | "sm4", _) => {
            return Err(CryptoError::Unsupported(format!(
                "Unsupported cipher algorithm '{cipher_name}-{}'",
                u64::from(per_key) * 8
            )))
        }
        _ => {
            return Err(CryptoError::Unsupported(format!(
                "Algorithm '{cipher_name}' with key size {per_key} bytes not supported"
            )))
        }
    };
    let hash = HashAlg::parse(hash_spec)?;
    let ivgen = IvGenKind::parse(ivgen)?;
    let spec = CipherSpec {
        alg,
        mode,
        ivgen,
        ivgen_hash: ivhash,
    };
    spec.validate()?;
    Ok((spec, hash))
}

impl Header {
    /// Parses and checks the partition header at the start of `bytes`.
    ///
    /// Checks what QEMU checks before it will use a header: magic, version
    /// 1, NUL-terminated strings, supported algorithms and key length,
    /// non-zero iteration counts, 4000 stripes, slot states, key material
    /// after the header, before the payload and not overlapping.
    pub fn parse(bytes: &[u8]) -> Result<Header, CryptoError> {
        if bytes.len() < HEADER_LEN {
            return Err(invalid(format!(
                "LUKS header truncated: {} bytes, need {HEADER_LEN}",
                bytes.len()
            )));
        }
        let b = &bytes[..HEADER_LEN];
        if &b[0..6] != MAGIC {
            return Err(invalid("Volume is not in LUKS format"));
        }
        let version = u16::from_be_bytes([b[6], b[7]]);
        if version != 1 {
            return Err(CryptoError::Unsupported(format!(
                "LUKS version {version} is not supported"
            )));
        }
        let cipher_name = cstr(&b[8..40], "cipher name")?;
        let cipher_mode = cstr(&b[40..72], "cipher mode")?;
        let hash_spec = cstr(&b[72..104], "hash spec")?;
        let payload_offset_sector = be32(b, 104);
        let key_bytes = be32(b, 108);
        let mut mk_digest = [0u8; DIGEST_LEN];
        mk_digest.copy_from_slice(&b[112..132]);
        let mut mk_digest_salt = [0u8; SALT_LEN];
        mk_digest_salt.copy_from_slice(&b[132..164]);
        let mk_digest_iter = be32(b, 164);
        // UUID: up to 40 bytes, NUL-terminated if shorter.
        let uuid_raw = &b[168..208];
        let uuid_end = uuid_raw.iter().position(|&c| c == 0).unwrap_or(40);
        let uuid = String::from_utf8_lossy(&uuid_raw[..uuid_end]).into_owned();
        let slots: [KeySlot; NUM_KEY_SLOTS] = std::array::from_fn(|i| {
            let s = &b[208 + 48 * i..208 + 48 * (i + 1)];
            let mut salt = [0u8; SALT_LEN];
            salt.copy_from_slice(&s[8..40]);
            KeySlot {
                active: be32(s, 0),
                iterations: be32(s, 4),
                salt,
                key_offset_sector: be32(s, 40),
                stripes: be32(s, 44),
            }
        });

        let header_sectors = KEY_SLOT_OFFSET / SECTOR;
        if u64::from(payload_offset_sector) < header_sectors {
            return Err(invalid("LUKS payload is overlapping with the header"));
        }
        if mk_digest_iter == 0 {
            return Err(invalid("LUKS key iteration count is zero"));
        }
        // Algorithms first: they bound key_bytes to 16..=64.
        let (spec, hash) = parse_spec(&cipher_name, &cipher_mode, &hash_spec, key_bytes)?;
        let kb = u64::from(key_bytes);
        for (i, s) in slots.iter().enumerate() {
            if s.stripes != STRIPES {
                return Err(invalid(format!(
                    "Keyslot {i} is corrupted (stripes {} != {STRIPES})",
                    s.stripes
                )));
            }
            if s.active != SLOT_ENABLED && s.active != SLOT_DISABLED {
                return Err(invalid(format!(
                    "Keyslot {i} state (active/disable) is corrupted"
                )));
            }
            if s.is_active() && s.iterations == 0 {
                return Err(invalid(format!("Keyslot {i} iteration count is zero")));
            }
            let start = u64::from(s.key_offset_sector);
            let len = split_key_sectors(kb, u64::from(s.stripes));
            if start < header_sectors {
                return Err(invalid(format!(
                    "Keyslot {i} is overlapping with the LUKS header"
                )));
            }
            if start + len > u64::from(payload_offset_sector) {
                return Err(invalid(format!(
                    "Keyslot {i} is overlapping with the encrypted payload"
                )));
            }
            for (j, t) in slots.iter().enumerate().skip(i + 1) {
                let start2 = u64::from(t.key_offset_sector);
                let len2 = split_key_sectors(kb, u64::from(t.stripes));
                if start < start2 + len2 && start2 < start + len {
                    return Err(invalid(format!(
                        "Keyslots {i} and {j} are overlapping in the header"
                    )));
                }
            }
        }
        Ok(Header {
            cipher_name,
            cipher_mode,
            hash_spec,
            payload_offset_sector,
            key_bytes,
            mk_digest,
            mk_digest_salt,
            mk_digest_iter,
            uuid,
            slots,
            spec,
            hash,
        })
    }

    /// Bytes of the header area needed to read every key slot: the
    /// largest `key_offset + key_bytes * stripes` over the slots.
    pub fn area_len(&self) -> u64 {
        let kb = u64::from(self.key_bytes);
        self.slots
            .iter()
            .map(|s| u64::from(s.key_offset_sector) * SECTOR + kb * u64::from(s.stripes))
            .max()
            .unwrap_or(0)
            .max(HEADER_LEN as u64)
    }

    /// Payload offset in bytes (in qcow2 only informational: data lives in
    /// clusters).
    pub fn payload_offset(&self) -> u64 {
        u64::from(self.payload_offset_sector) * SECTOR
    }

    /// The header as `qemu-img info` reports it.
    pub fn info(&self) -> Info {
        Info {
            cipher_alg: self.spec.alg.name().to_string(),
            cipher_mode: self.spec.mode.name().to_string(),
            ivgen_alg: self.spec.ivgen.name().to_string(),
            ivgen_hash_alg: match (self.spec.ivgen, self.spec.ivgen_hash) {
                (IvGenKind::Essiv, Some(h)) => Some(h.name().to_string()),
                _ => None,
            },
            hash_alg: self.hash.name().to_string(),
            uuid: self.uuid.clone(),
            payload_offset: self.payload_offset(),
            master_key_iters: self.mk_digest_iter,
            slots: self
                .slots
                .iter()
                .map(|s| SlotInfo {
                    active: s.is_active(),
                    iters: s.is_active().then_some(s.iterations),
                    stripes: s.is_active().then_some(s.stripes),
                    key_offset: u64::from(s.key_offset_sector) * SECTOR,
                })
                .collect(),
        }
    }

    /// The 592 bytes of this header.
    fn to_bytes(&self) -> [u8; HEADER_LEN] {
        let mut b = [0u8; HEADER_LEN];
        b[0..6].copy_from_slice(MAGIC);
        b[6..8].copy_from_slice(&1u16.to_be_bytes());
        b[8..8 + self.cipher_name.len()].copy_from_slice(self.cipher_name.as_bytes());
        b[40..40 + self.cipher_mode.len()].copy_from_slice(self.cipher_mode.as_bytes());
        b[72..72 + self.hash_spec.len()].copy_from_slice(self.hash_spec.as_bytes());
        b[104..108].copy_from_slice(&self.payload_offset_sector.to_be_bytes());
        b[108..112].copy_from_slice(&self.key_bytes.to_be_bytes());
        b[112..132].copy_from_slice(&self.mk_digest);
        b[132..164].copy_from_slice(&self.mk_digest_salt);
        b[164..168].copy_from_slice(&self.mk_digest_iter.to_be_bytes());
        b[168..168 + self.uuid.len()].copy_from_slice(self.uuid.as_bytes());
        for (i, s) in self.slots.iter().enumerate() {
            let o = 208 + 48 * i;
            b[o..o + 4].copy_from_slice(&s.active.to_be_bytes());
            b[o + 4..o + 8].copy_from_slice(&s.iterations.to_be_bytes());
            b[o + 8..o + 40].copy_from_slice(&s.salt);
            b[o + 40..o + 44].copy_from_slice(&s.key_offset_sector.to_be_bytes());
            b[o + 44..o + 48].copy_from_slice(&s.stripes.to_be_bytes());
        }
        b
    }

    /// Tries `slot` with `password`: the master key if it opens it.
    fn try_slot(
        &self,
        slot: &KeySlot,
        area: &[u8],
        password: &[u8],
    ) -> Result<Option<Vec<u8>>, CryptoError> {
        let kb = self.key_bytes as usize;
        let mut slot_key = vec![0u8; kb];
        self.hash
            .pbkdf2(password, &slot.salt, slot.iterations, &mut slot_key);
        let past = || invalid("LUKS key material lies past the header area");
        let start = u64::from(slot.key_offset_sector) * SECTOR;
        let len = self.key_bytes as u64 * u64::from(slot.stripes);
        let start = usize::try_from(start).map_err(|_| past())?;
        let end = usize::try_from(len)
            .ok()
            .and_then(|l| start.checked_add(l))
            .ok_or_else(past)?;
        let mut material = area.get(start..end).ok_or_else(past)?.to_vec();
        SectorCipher::new(&self.spec, &slot_key)?.run(0, &mut material, false)?;
        let mut master = vec![0u8; kb];
        self.hash.af_merge(&material, &mut master);
        let mut digest = [0u8; DIGEST_LEN];
        self.hash.pbkdf2(
            &master,
            &self.mk_digest_salt,
            self.mk_digest_iter,
            &mut digest,
        );
        Ok((digest == self.mk_digest).then_some(master))
    }
}

/// Opens the LUKS1 header area `area` (the whole area, at least
/// [`Header::area_len`] bytes) with `password`, trying every active slot,
/// and returns the data cipher for the master key.
///
/// The password is used as QEMU uses it: up to its first NUL byte.
pub fn unlock(area: &[u8], password: &[u8]) -> Result<SectorCipher, CryptoError> {
    let h = Header::parse(area)?;
    let need = h.area_len();
    if (area.len() as u64) < need {
        return Err(invalid(format!(
            "LUKS header area truncated: {} bytes, key slots need {need}",
            area.len()
        )));
    }
    let password = c_string(password);
    for slot in h.slots.iter().filter(|s| s.is_active()) {
        if let Some(master) = h.try_slot(slot, area, password)? {
            return SectorCipher::new(&h.spec, &master);
        }
    }
    Err(CryptoError::InvalidPassword)
}

/// QEMU reads secrets as C strings: everything from the first NUL on is
/// not part of the password.
fn c_string(p: &[u8]) -> &[u8] {
    &p[..p.iter().position(|&b| b == 0).unwrap_or(p.len())]
}

/// Parameters of [`create`], with QEMU's names and defaults.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CreateParams {
    /// "aes-128", "aes-192" or "aes-256".
    pub cipher_alg: String,
    /// "xts", "cbc", "ecb" or "ctr".
    pub cipher_mode: String,
    /// "plain", "plain64" or "essiv".
    pub ivgen_alg: String,
    /// ESSIV hash; defaults to sha256 for essiv. Given with another
    /// generator it is written into the mode string and ignored, as QEMU
    /// does.
    pub ivgen_hash_alg: Option<String>,
    /// PBKDF2 / AF hash: sha1, sha224, sha256, sha384 or sha512.
    pub hash_alg: String,
    /// Time PBKDF2 of the password should take, in milliseconds.
    pub iter_time_ms: u64,
}

impl Default for CreateParams {
    fn default() -> Self {
        CreateParams {
            cipher_alg: "aes-256".into(),
            cipher_mode: "xts".into(),
            ivgen_alg: "plain64".into(),
            ivgen_hash_alg: None,
            hash_alg: "sha256".into(),
            iter_time_ms: 2000,
        }
    }
}

/// PBKDF2 iterations per second with `hash` for `nout` output bytes,
/// measured like QEMU: start at 2^15 iterations, grow until one run takes
/// longer than a threshold, scale to one second. QEMU's threshold is
/// 500 ms; this one is `min(500, max(50, iter_time_ms))` ms so short
/// iteration times do not cost half a second per benchmark. Wall-clock
/// time, not thread CPU time.
fn iters_per_second(
    hash: HashAlg,
    key: &[u8],
    salt: &[u8],
    nout: usize,
    iter_time_ms: u64,
) -> Result<u64, CryptoError> {
    let threshold = Duration::from_millis(iter_time_ms.clamp(50, 500));
    let mut out = vec![0u8; nout];
    let mut iterations: u64 = 1 << 15;
    loop {
        let t = Instant::now();
        hash.pbkdf2(
            key,
            salt,
            iterations.min(u64::from(u32::MAX)) as u32,
            &mut out,
        );
        let dt = t.elapsed();
        if dt > threshold {
            return Ok(iterations.saturating_mul(1_000_000) / (dt.as_micros().max(1) as u64));
        }
        if dt < threshold / 5 {
            iterations = iterations.saturating_mul(10);
        } else {
            // Aim a bit past the threshold.
            let scaled = iterations as u128 * threshold.as_micros() * 6 / 5 / dt.as_micros().max(1);
            iterations = (scaled as u64).max(iterations + 1);
        }
        if iterations > u64::from(u32::MAX) {
            return Err(CryptoError::Invalid(
                "PBKDF iterations too large to benchmark".into(),
            ));
        }
    }
}

/// Scales a per-second iteration count to `iter_time_ms`, with `div` and a
/// minimum (QEMU's rule: slots get the full time, the master key digest an
/// eighth, both at least 1000).
fn scale_iters(per_sec: u64, iter_time_ms: u64, div: u64, min: u64) -> Result<u32, CryptoError> {
    let iters = (per_sec as u128 * iter_time_ms as u128 / 1000) / div as u128;
    if iters > u32::MAX as u128 {
        return Err(CryptoError::Invalid(format!(
            "PBKDF iterations {iters} larger than {}",
            u32::MAX
        )));
    }
    Ok((iters as u64).max(min) as u32)
}

/// Builds a new LUKS1 header area: header plus the key material regions of
/// 8 slots (4096-byte aligned, as `qemu-img create` lays them out), slot 0
/// holding a random master key under `password`. Returns the area (its
/// length is what QEMU records as the qcow2 extension's length, e.g.
/// 2068480 bytes for aes-256-xts) and the data cipher for the master key.
pub fn create(
    params: &CreateParams,
    password: &[u8],
) -> Result<(Vec<u8>, SectorCipher), CryptoError> {
    let alg = match params.cipher_alg.as_str() {
        "aes-128" => AesSize::Aes128,
        "aes-192" => AesSize::Aes192,
        "aes-256" => AesSize::Aes256,
        other => {
            return Err(CryptoError::Unsupported(format!(
                "Unsupported cipher algorithm '{other}'"
            )))
        }
    };
    let mode = ModeKind::parse(&params.cipher_mode)?;
    let ivgen = IvGenKind::parse(&params.ivgen_alg)?;
    let hash = HashAlg::parse(&params.hash_alg)?;
    let ivhash_name = match (&params.ivgen_hash_alg, ivgen) {
        (Some(h), _) => Some(h.clone()),
        (None, IvGenKind::Essiv) => Some("sha256".to_string()),
        (None, _) => None,
    };
    let ivgen_hash = ivhash_name.as_deref().map(HashAlg::parse).transpose()?;
    let spec = CipherSpec {
        alg,
        mode,
        ivgen,
        ivgen_hash,
    };
    spec.validate()?;
    let cipher_mode = match &ivhash_name {
        Some(h) => format!("{}-{}:{h}", mode.name(), ivgen.name()),
        None => format!("{}-{}", mode.name(), ivgen.name()),
    };
    let password = c_string(password);
    let kb = mode.key_bytes(alg);
    if (kb as u64 * u64::from(STRIPES)) % SECTOR != 0 {
        // QEMU asserts on such key material (aes-192 outside XTS).
        return Err(CryptoError::Unsupported(format!(
            "Unsupported cipher '{}-{}': its {} bytes of key material are not whole sectors",
            alg.name(),
            mode.name(),
            kb as u64 * u64::from(STRIPES)
        )));
    }

    let mut master = vec![0u8; kb];
    crate::random(&mut master)?;
    let mut mk_digest_salt = [0u8; SALT_LEN];
    crate::random(&mut mk_digest_salt)?;
    let mut uuid = [0u8; 16];
    crate::random(&mut uuid)?;

    let iter_time = params.iter_time_ms;
    let per_sec = iters_per_second(hash, &master, &mk_digest_salt, DIGEST_LEN, iter_time)?;
    let mk_digest_iter = scale_iters(per_sec, iter_time, 8, MIN_MASTER_KEY_ITERS)?;
    let mut mk_digest = [0u8; DIGEST_LEN];
    hash.pbkdf2(&master, &mk_digest_salt, mk_digest_iter, &mut mk_digest);

    let header_sectors = KEY_SLOT_OFFSET / SECTOR;
    let split = split_key_sectors(kb as u64, u64::from(STRIPES));
    let area_sectors = header_sectors + NUM_KEY_SLOTS as u64 * split;
    let slots: [KeySlot; NUM_KEY_SLOTS] = std::array::from_fn(|i| KeySlot {
        active: SLOT_DISABLED,
        iterations: 0,
        salt: [0u8; SALT_LEN],
        key_offset_sector: (header_sectors + i as u64 * split) as u32,
        stripes: STRIPES,
    });
    let mut header = Header {
        cipher_name: "aes".into(),
        cipher_mode,
        hash_spec: hash.name().into(),
        payload_offset_sector: area_sectors as u32,
        key_bytes: kb as u32,
        mk_digest,
        mk_digest_salt,
        mk_digest_iter,
        uuid: uuid_v4_string(uuid),
        slots,
        spec,
        hash,
    };

    // Slot 0.
    let mut salt = [0u8; SALT_LEN];
    crate::random(&mut salt)?;
    let per_sec = iters_per_second(hash, password, &salt, kb, iter_time)?;
    let iterations = scale_iters(per_sec, iter_time, 1, MIN_SLOT_KEY_ITERS)?;
    let mut slot_key = vec![0u8; kb];
    hash.pbkdf2(password, &salt, iterations, &mut slot_key);
    let mut material = hash.af_split(&master, STRIPES as usize)?;
    SectorCipher::new(&spec, &slot_key)?.run(0, &mut material, true)?;
    let slot = &mut header.slots[0];
    slot.active = SLOT_ENABLED;
    slot.iterations = iterations;
    slot.salt = salt;

    let mut area = vec![0u8; (area_sectors * SECTOR) as usize];
    area[..HEADER_LEN].copy_from_slice(&header.to_bytes());
    let start = (header_sectors * SECTOR) as usize;
    area[start..start + material.len()].copy_from_slice(&material);
    let cipher = SectorCipher::new(&spec, &master)?;
    master.fill(0);
    slot_key.fill(0);
    Ok((area, cipher))
}

/// Formats 16 random bytes as a version 4 UUID string.
fn uuid_v4_string(mut b: [u8; 16]) -> String {
    b[6] = (b[6] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    let h: String = b.iter().map(|x| format!("{x:02x}")).collect();
    format!(
        "{}-{}-{}-{}-{}",
        &h[0..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..32]
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn quick() -> CreateParams {
        CreateParams {
            iter_time_ms: 1,
            ..CreateParams::default()
        }
    }

    #[test]
    fn create_then_unlock_round_trip() {
        let (area, c) = create(&quick(), b"pw").unwrap();
        assert_eq!(area.len(), 2_068_480);
        let h = Header::parse(&area).unwrap();
        assert_eq!(h.payload_offset(), 2_068_480);
        assert_eq!(h.slots[1].key_offset_sector * 512, 262_144);
        let d = unlock(&area, b"pw").unwrap();
        let mut x = vec![9u8; 1024];
        c.encrypt(3, &mut x).unwrap();
        d.decrypt(3, &mut x).unwrap();
        assert_eq!(x, vec![9u8; 1024]);
        assert!(matches!(
            unlock(&area, b"nope"),
            Err(CryptoError::InvalidPassword)
        ));
    }

    #[test]
    fn uuid_looks_like_v4() {
        let u = uuid_v4_string([0xff; 16]);
        assert_eq!(u, "ffffffff-ffff-4fff-bfff-ffffffffffff");
    }

    #[test]
    fn unsupported_names_are_named() {
        let e = create(
            &CreateParams {
                cipher_alg: "serpent-256".into(),
                ..quick()
            },
            b"x",
        )
        .unwrap_err();
        assert_eq!(e.to_string(), "Unsupported cipher algorithm 'serpent-256'");
        let e = create(
            &CreateParams {
                hash_alg: "ripemd160".into(),
                ..quick()
            },
            b"x",
        )
        .unwrap_err();
        assert!(e.to_string().contains("ripemd160"), "{e}");
    }
}
