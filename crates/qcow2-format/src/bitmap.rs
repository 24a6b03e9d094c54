//! Persistent dirty bitmaps: the bitmaps header extension, the bitmap
//! directory and bitmap table entries.

use crate::error::FormatError;
use crate::{be32, be64, put_be32, put_be64};

/// Most bitmaps an image may have (QEMU's QCOW2_MAX_BITMAPS).
pub const MAX_BITMAPS: u32 = 65535;
/// Largest bitmap directory in bytes (QCOW2_MAX_BITMAP_DIRECTORY_SIZE).
pub const MAX_DIRECTORY_SIZE: u64 = 1024 * MAX_BITMAPS as u64;
/// Largest bitmap table, in entries (BME_MAX_TABLE_SIZE).
pub const MAX_TABLE_ENTRIES: u64 = 0x800_0000;
/// Largest bitmap data, in bytes (BME_MAX_PHYS_SIZE).
pub const MAX_PHYS_SIZE: u64 = 0x2000_0000;
/// Granularity bounds, as log2 of bytes (BME_MIN/MAX_GRANULARITY_BITS).
pub const MIN_GRANULARITY_BITS: u8 = 9;
/// See [`MIN_GRANULARITY_BITS`].
pub const MAX_GRANULARITY_BITS: u8 = 31;
/// Longest bitmap name (BME_MAX_NAME_SIZE).
pub const MAX_NAME_SIZE: usize = 1023;
/// Size of the bitmaps header extension.
pub const EXT_LEN: usize = 24;
/// Fixed part of a directory entry.
pub const ENTRY_FIXED_LEN: usize = 24;

/// Directory entry flag: the bitmap is in use (possibly inconsistent).
pub const FLAG_IN_USE: u32 = 1 << 0;
/// Directory entry flag: the bitmap tracks writes (enabled).
pub const FLAG_AUTO: u32 = 1 << 1;
/// Directory entry flag: unknown extra data may be ignored.
pub const FLAG_EXTRA_DATA_COMPATIBLE: u32 = 1 << 2;
/// Every directory flag known.
pub const FLAGS_KNOWN: u32 = FLAG_IN_USE | FLAG_AUTO | FLAG_EXTRA_DATA_COMPATIBLE;
/// Bitmap type: dirty tracking.
pub const TYPE_DIRTY_TRACKING: u8 = 1;

/// Bitmap table entry: host offset of the data cluster.
pub const BTE_OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;
/// Bitmap table entry: reserved bits.
pub const BTE_RESERVED: u64 = 0xff00_0000_0000_01fe;
/// Bitmap table entry without a cluster: every bit set (else every bit clear).
pub const BTE_ALL_ONES: u64 = 1;

/// The bitmaps header extension.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct BitmapsExt {
    /// Number of bitmaps in the directory.
    pub nb_bitmaps: u32,
    /// Directory size in bytes.
    pub directory_size: u64,
    /// Host offset of the directory.
    pub directory_offset: u64,
}

impl BitmapsExt {
    /// Parses the extension's data, checking the limits QEMU checks.
    pub fn parse(d: &[u8]) -> Result<Self, FormatError> {
        if d.len() < EXT_LEN {
            return Err(FormatError::Truncated("bitmaps extension"));
        }
        let e = BitmapsExt {
            nb_bitmaps: be32(d, 0),
            directory_size: be64(d, 8),
            directory_offset: be64(d, 16),
        };
        if be32(d, 4) != 0 {
            return Err(FormatError::invalid(
                "bitmaps extension",
                "reserved field is not zero",
            ));
        }
        if e.nb_bitmaps == 0 || e.nb_bitmaps > MAX_BITMAPS {
            return Err(FormatError::invalid(
                "nb_bitmaps",
                format!("{} bitmaps", e.nb_bitmaps),
            ));
        }
        if e.directory_size == 0 || e.directory_size > MAX_DIRECTORY_SIZE {
            return Err(FormatError::invalid(
                "bitmap_directory_size",
                format!("{} bytes", e.directory_size),
            ));
        }
        Ok(e)
    }
    /// Encodes the extension's data.
    pub fn encode(&self) -> [u8; EXT_LEN] {
        let mut b = [0u8; EXT_LEN];
        put_be32(&mut b, 0, self.nb_bitmaps);
        put_be64(&mut b, 8, self.directory_size);
        put_be64(&mut b, 16, self.directory_offset);
        b
    }
}

/// One bitmap directory entry.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct BitmapEntry {
    /// Host offset of the bitmap table.
    pub table_offset: u64,
    /// Entries in the bitmap table.
    pub table_size: u32,
    /// Flags ([`FLAG_IN_USE`], [`FLAG_AUTO`], …).
    pub flags: u32,
    /// Bitmap type ([`TYPE_DIRTY_TRACKING`]).
    pub kind: u8,
    /// log2 of the bytes one bit covers.
    pub granularity_bits: u8,
    /// Name (bytes, not NUL-terminated).
    pub name: Vec<u8>,
    /// Extra data as stored.
    pub extra: Vec<u8>,
}

impl BitmapEntry {
    /// Whether the bitmap is marked in use.
    pub fn in_use(&self) -> bool {
        self.flags & FLAG_IN_USE != 0
    }
    /// Whether the bitmap is enabled (tracks writes).
    pub fn auto(&self) -> bool {
        self.flags & FLAG_AUTO != 0
    }
    /// Bytes covered by one bit.
    pub fn granularity(&self) -> u64 {
        1u64 << self.granularity_bits
    }
    /// Bytes this entry takes in the directory, padding included.
    pub fn encoded_len(&self) -> usize {
        (ENTRY_FIXED_LEN + self.extra.len() + self.name.len()).div_ceil(8) * 8
    }
    /// Appends the encoded entry (padded to 8 bytes) to `out`.
    pub fn encode(&self, out: &mut Vec<u8>) {
        let start = out.len();
        out.resize(start + ENTRY_FIXED_LEN, 0);
        let h = &mut out[start..];
        put_be64(h, 0, self.table_offset);
        put_be32(h, 8, self.table_size);
        put_be32(h, 12, self.flags);
        h[16] = self.kind;
        h[17] = self.granularity_bits;
        h[18..20].copy_from_slice(&(self.name.len() as u16).to_be_bytes());
        put_be32(h, 20, self.extra.len() as u32);
        out.extend_from_slice(&self.extra);
        out.extend_from_slice(&self.name);
        out.resize(start + self.encoded_len(), 0);
    }
    /// Bitmap table entries needed for a disk of `disk_size` bytes with a
    /// bitmap of this granularity and clusters of `cluster_size` bytes.
    pub fn table_entries_for(&self, disk_size: u64, cluster_size: u64) -> u64 {
        let bits = disk_size.div_ceil(self.granularity());
        bits.div_ceil(cluster_size * 8)
    }
    /// What QEMU's check_dir_entry rejects in this entry, given the disk
    /// size, the cluster size and the file length; `None` when it is valid.
    pub fn problem(&self, disk_size: u64, cluster_size: u64, file_len: u64) -> Option<String> {
        if self.kind != TYPE_DIRTY_TRACKING {
            return Some(format!("unknown bitmap type {}", self.kind));
        }
        if !(MIN_GRANULARITY_BITS..=MAX_GRANULARITY_BITS).contains(&self.granularity_bits) {
            return Some(format!("granularity bits {}", self.granularity_bits));
        }
        if self.flags & !FLAGS_KNOWN != 0 {
            return Some(format!("reserved flags {:#x}", self.flags & !FLAGS_KNOWN));
        }
        if self.name.is_empty() || self.name.len() > MAX_NAME_SIZE {
            return Some(format!("name of {} bytes", self.name.len()));
        }
        if self.table_offset & (cluster_size - 1) != 0 {
            return Some(format!(
                "bitmap table offset {:#x} is not cluster aligned",
                self.table_offset
            ));
        }
        if self.table_size as u64 > MAX_TABLE_ENTRIES {
            return Some(format!("bitmap table of {} entries", self.table_size));
        }
        let phys = (self.table_size as u64).saturating_mul(cluster_size);
        if phys > MAX_PHYS_SIZE {
            return Some(format!("bitmap data of {phys} bytes"));
        }
        if !self.in_use()
            && self.table_size as u64 != self.table_entries_for(disk_size, cluster_size)
        {
            return Some(format!(
                "bitmap table of {} entries does not match the disk size",
                self.table_size
            ));
        }
        if self.table_size > 0
            && self
                .table_offset
                .checked_add(self.table_size as u64 * 8)
                .is_none_or(|e| e > file_len)
        {
            return Some("bitmap table past the end of the file".into());
        }
        if !self.extra.is_empty() && self.flags & FLAG_EXTRA_DATA_COMPATIBLE == 0 {
            return Some("unknown extra data".into());
        }
        None
    }
}

/// Parses `n` directory entries from `buf` (exactly the directory's bytes).
pub fn parse_directory(buf: &[u8], n: u32) -> Result<Vec<BitmapEntry>, FormatError> {
    let field = |off: usize, len: usize| -> Result<&[u8], FormatError> {
        off.checked_add(len)
            .and_then(|e| buf.get(off..e))
            .ok_or(FormatError::Truncated("bitmap directory"))
    };
    let mut out = Vec::with_capacity((n as usize).min(buf.len() / ENTRY_FIXED_LEN + 1));
    let mut p = 0usize;
    for _ in 0..n {
        let h = field(p, ENTRY_FIXED_LEN)?;
        let name_len = u16::from_be_bytes([h[18], h[19]]) as usize;
        let extra_len = be32(h, 20) as usize;
        let mut e = BitmapEntry {
            table_offset: be64(h, 0),
            table_size: be32(h, 8),
            flags: be32(h, 12),
            kind: h[16],
            granularity_bits: h[17],
            ..Default::default()
        };
        let mut q = p + ENTRY_FIXED_LEN;
        e.extra = field(q, extra_len)?.to_vec();
        q += extra_len;
        e.name = field(q, name_len)?.to_vec();
        q += name_len;
        p = q.div_ceil(8) * 8;
        out.push(e);
    }
    if p != buf.len() {
        return Err(FormatError::invalid(
            "bitmap directory",
            format!("{} bytes of entries in a directory of {}", p, buf.len()),
        ));
    }
    Ok(out)
}

/// Byte position of each entry in the encoded directory of `entries`.
pub fn entry_positions(entries: &[BitmapEntry]) -> Vec<usize> {
    let mut p = 0usize;
    entries
        .iter()
        .map(|e| {
            let at = p;
            p += e.encoded_len();
            at
        })
        .collect()
}

/// Byte offset of the flags field within a directory entry.
pub const ENTRY_FLAGS_POS: usize = 12;

/// What is wrong with a bitmap table entry (QEMU's check_table_entry):
/// reserved bits set, or a data cluster offset that is misaligned or comes
/// with the all-ones flag. `None` when it is valid.
pub fn table_entry_problem(entry: u64, cluster_size: u64) -> Option<&'static str> {
    let off = entry & BTE_OFFSET_MASK;
    if entry & BTE_RESERVED != 0 {
        Some("reserved bits set")
    } else if off != 0 && entry & BTE_ALL_ONES != 0 {
        Some("all-ones flag with a data cluster")
    } else if off & (cluster_size - 1) != 0 {
        Some("data cluster offset not cluster aligned")
    } else {
        None
    }
}

/// Encodes a whole directory.
pub fn encode_directory(entries: &[BitmapEntry]) -> Vec<u8> {
    let mut out = Vec::new();
    for e in entries {
        e.encode(&mut out);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry() -> BitmapEntry {
        BitmapEntry {
            table_offset: 0x50000,
            table_size: 1,
            flags: FLAG_AUTO,
            kind: TYPE_DIRTY_TRACKING,
            granularity_bits: 16,
            name: b"b0".to_vec(),
            extra: Vec::new(),
        }
    }

    #[test]
    fn directory_roundtrip() {
        let mut b = entry();
        b.name = b"a-longer-name".to_vec();
        let d = encode_directory(&[entry(), b.clone()]);
        assert_eq!(d.len(), 32 + 40);
        let v = parse_directory(&d, 2).unwrap();
        assert_eq!(v, vec![entry(), b]);
        assert!(parse_directory(&d[..40], 2).is_err());
        // Directory size must match the entries exactly.
        assert!(parse_directory(&d, 1).is_err());
    }

    #[test]
    fn positions_and_table_entries() {
        let mut b = entry();
        b.name = b"a-longer-name".to_vec();
        let v = vec![entry(), b, entry()];
        let d = encode_directory(&v);
        let pos = entry_positions(&v);
        assert_eq!(pos, vec![0, 32, 72]);
        for (e, &p) in v.iter().zip(&pos) {
            assert_eq!(be32(&d, p + ENTRY_FLAGS_POS), e.flags);
        }
        let cs = 65536;
        assert_eq!(table_entry_problem(0, cs), None);
        assert_eq!(table_entry_problem(BTE_ALL_ONES, cs), None);
        assert_eq!(table_entry_problem(0x30000, cs), None);
        assert!(table_entry_problem(0x30000 | BTE_ALL_ONES, cs).is_some());
        assert!(table_entry_problem(0x30200, cs).is_some());
        assert!(table_entry_problem(1 << 1, cs).is_some());
        assert!(table_entry_problem(1 << 60, cs).is_some());
    }

    #[test]
    fn ext_roundtrip_and_limits() {
        let e = BitmapsExt {
            nb_bitmaps: 2,
            directory_size: 72,
            directory_offset: 0x40000,
        };
        assert_eq!(BitmapsExt::parse(&e.encode()).unwrap(), e);
        let mut z = e;
        z.nb_bitmaps = 0;
        assert!(BitmapsExt::parse(&z.encode()).is_err());
        assert!(BitmapsExt::parse(&[0; 10]).is_err());
    }

    #[test]
    fn entry_validation() {
        let cs = 65536;
        // 1 GiB at 64 KiB granularity: 16384 bits = 2 KiB, one cluster.
        let e = entry();
        assert_eq!(e.table_entries_for(1 << 30, cs), 1);
        assert_eq!(e.problem(1 << 30, cs, 1 << 20), None);
        let mut bad = e.clone();
        bad.table_size = 2;
        assert!(bad.problem(1 << 30, cs, 1 << 20).is_some());
        bad.flags |= FLAG_IN_USE;
        assert_eq!(bad.problem(1 << 30, cs, 1 << 20), None);
        let mut bad = e.clone();
        bad.granularity_bits = 8;
        assert!(bad.problem(1 << 30, cs, 1 << 20).is_some());
        let mut bad = e.clone();
        bad.table_offset = 0x50200;
        assert!(bad.problem(1 << 30, cs, 1 << 20).is_some());
        let mut bad = e;
        bad.flags |= 1 << 7;
        assert!(bad.problem(1 << 30, cs, 1 << 20).is_some());
    }
}
