//! The internal snapshot table (`snapshots_offset`, `nb_snapshots`).
//!
//! Each entry: a 40-byte fixed part, `extra_data_size` bytes of extra data
//! (large vm-state size, disk size, instruction count), the id string, the
//! name, padded to a multiple of 8 bytes.

use crate::error::FormatError;
use crate::{be32, be64, put_be32, put_be64};

/// Most snapshots an image may have (QEMU's QCOW_MAX_SNAPSHOTS).
pub const MAX_SNAPSHOTS: u32 = 65536;
/// Largest snapshot table in bytes (QEMU's QCOW_MAX_SNAPSHOTS_SIZE).
pub const MAX_SNAPSHOTS_SIZE: u64 = 64 << 20;
/// Largest extra data of one entry that is accepted (QCOW_MAX_SNAPSHOT_EXTRA_DATA).
pub const MAX_EXTRA_DATA: u32 = 1024;
/// Size of the fixed part of an entry.
pub const FIXED_LEN: usize = 40;

/// One snapshot table entry.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct SnapshotEntry {
    /// Host offset of the snapshot's L1 table.
    pub l1_table_offset: u64,
    /// Entries in that L1 table.
    pub l1_size: u32,
    /// Unique id (usually a number).
    pub id: Vec<u8>,
    /// Name.
    pub name: Vec<u8>,
    /// Creation time, seconds.
    pub date_sec: u32,
    /// Creation time, nanoseconds.
    pub date_nsec: u32,
    /// Guest clock at creation, nanoseconds.
    pub vm_clock_nsec: u64,
    /// Size of the saved VM state (32-bit field).
    pub vm_state_size: u32,
    /// Extra data as stored (`vm_state_size_large`, `disk_size`, `icount`, …).
    pub extra: Vec<u8>,
}

impl SnapshotEntry {
    /// The 64-bit vm-state size from the extra data, if present.
    pub fn vm_state_size_large(&self) -> Option<u64> {
        (self.extra.len() >= 8).then(|| be64(&self.extra, 0))
    }
    /// The virtual disk size at creation, if present in the extra data.
    pub fn disk_size(&self) -> Option<u64> {
        (self.extra.len() >= 16).then(|| be64(&self.extra, 8))
    }
    /// The instruction count, if present (-1 / all ones: none).
    pub fn icount(&self) -> Option<u64> {
        (self.extra.len() >= 24).then(|| be64(&self.extra, 16))
    }
    /// Bytes this entry takes in the table, padding included.
    pub fn encoded_len(&self) -> usize {
        (FIXED_LEN + self.extra.len() + self.id.len() + self.name.len()).div_ceil(8) * 8
    }
    /// Appends the encoded entry (padded to 8 bytes) to `out`.
    pub fn encode(&self, out: &mut Vec<u8>) {
        let start = out.len();
        out.resize(start + FIXED_LEN, 0);
        let h = &mut out[start..];
        put_be64(h, 0, self.l1_table_offset);
        put_be32(h, 8, self.l1_size);
        h[12..14].copy_from_slice(&(self.id.len() as u16).to_be_bytes());
        h[14..16].copy_from_slice(&(self.name.len() as u16).to_be_bytes());
        put_be32(h, 16, self.date_sec);
        put_be32(h, 20, self.date_nsec);
        put_be64(h, 24, self.vm_clock_nsec);
        put_be32(h, 32, self.vm_state_size);
        put_be32(h, 36, self.extra.len() as u32);
        out.extend_from_slice(&self.extra);
        out.extend_from_slice(&self.id);
        out.extend_from_slice(&self.name);
        out.resize(start + self.encoded_len(), 0);
    }
}

/// Parses `n` entries from `buf` (the table's bytes, possibly longer than
/// the table). Returns the entries and the table's length in bytes.
/// Truncation, too many entries or a table beyond [`MAX_SNAPSHOTS_SIZE`]
/// are errors; so is extra data shorter than 16 bytes on a v3 image
/// (`require_v3_extra`), as QEMU requires.
pub fn parse_table(
    buf: &[u8],
    n: u32,
    require_v3_extra: bool,
) -> Result<(Vec<SnapshotEntry>, u64), FormatError> {
    if n > MAX_SNAPSHOTS {
        return Err(FormatError::invalid(
            "nb_snapshots",
            format!("too many snapshots ({n})"),
        ));
    }
    let field = |off: usize, len: usize| -> Result<&[u8], FormatError> {
        off.checked_add(len)
            .and_then(|e| buf.get(off..e))
            .ok_or(FormatError::Truncated("snapshot table"))
    };
    let mut out = Vec::with_capacity((n as usize).min(buf.len() / FIXED_LEN + 1));
    let mut off = 0usize;
    for i in 0..n {
        let h = field(off, FIXED_LEN)?;
        let id_len = u16::from_be_bytes([h[12], h[13]]) as usize;
        let name_len = u16::from_be_bytes([h[14], h[15]]) as usize;
        let extra_len = be32(h, 36);
        if require_v3_extra && extra_len < 16 {
            return Err(FormatError::invalid(
                "snapshot extra data",
                format!("snapshot {i} has only {extra_len} bytes of extra data"),
            ));
        }
        let mut e = SnapshotEntry {
            l1_table_offset: be64(h, 0),
            l1_size: be32(h, 8),
            date_sec: be32(h, 16),
            date_nsec: be32(h, 20),
            vm_clock_nsec: be64(h, 24),
            vm_state_size: be32(h, 32),
            ..Default::default()
        };
        let mut p = off + FIXED_LEN;
        e.extra = field(p, extra_len as usize)?.to_vec();
        p += extra_len as usize;
        e.id = field(p, id_len)?.to_vec();
        p += id_len;
        e.name = field(p, name_len)?.to_vec();
        p += name_len;
        off = p.div_ceil(8) * 8;
        if off as u64 > MAX_SNAPSHOTS_SIZE {
            return Err(FormatError::invalid(
                "snapshot table",
                "larger than 64 MiB".to_string(),
            ));
        }
        out.push(e);
    }
    Ok((out, off as u64))
}

/// Encodes a whole table.
pub fn encode_table(entries: &[SnapshotEntry]) -> Vec<u8> {
    let mut out = Vec::new();
    for e in entries {
        e.encode(&mut out);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roundtrip_and_padding() {
        let e = SnapshotEntry {
            l1_table_offset: 0x30000,
            l1_size: 2,
            id: b"1".to_vec(),
            name: b"snap\xff".to_vec(),
            date_sec: 7,
            date_nsec: 8,
            vm_clock_nsec: 9,
            vm_state_size: 0,
            extra: vec![0; 24],
        };
        let t = encode_table(&[e.clone(), e.clone()]);
        // 40 + 24 + 1 + 5 = 70 -> 72 per entry.
        assert_eq!(t.len(), 144);
        assert_eq!(e.encoded_len(), 72);
        let (v, len) = parse_table(&t, 2, true).unwrap();
        assert_eq!(len, 144);
        assert_eq!(v, vec![e.clone(), e]);
        assert_eq!(v[0].disk_size(), Some(0));
    }

    #[test]
    fn truncated_and_limits() {
        let e = SnapshotEntry {
            extra: vec![0; 16],
            id: b"1".to_vec(),
            ..Default::default()
        };
        let t = encode_table(&[e]);
        assert!(matches!(
            parse_table(&t[..50], 1, true),
            Err(FormatError::Truncated(_))
        ));
        assert!(parse_table(&t, 2, true).is_err());
        assert!(parse_table(&t, MAX_SNAPSHOTS + 1, false).is_err());
        let short = SnapshotEntry {
            extra: vec![0; 8],
            ..Default::default()
        };
        let t = encode_table(&[short]);
        assert!(parse_table(&t, 1, true).is_err());
        assert!(parse_table(&t, 1, false).is_ok());
    }
}
