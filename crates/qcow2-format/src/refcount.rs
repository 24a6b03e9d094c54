//! Refcount block entries of every width (1 to 64 bits).
//!
//! Sub-byte widths pack entries starting at the least significant bits of
//! each byte; widths of 8 bits and more are big-endian.

/// Offset bits of a refcount table entry.
pub const REFTABLE_OFFSET_MASK: u64 = 0xffff_ffff_ffff_fe00;

/// Largest refcount representable with `order` (width `1 << order` bits).
pub fn max_refcount(order: u32) -> u64 {
    if order >= 6 {
        u64::MAX
    } else {
        (1u64 << (1u32 << order)) - 1
    }
}

/// Entries per refcount block of `cluster_bits`.
pub fn entries_per_block(cluster_bits: u32, order: u32) -> u64 {
    (1u64 << (cluster_bits + 3)) >> order
}

/// Reads entry `index` of a refcount block (or slice of one) in `buf`.
pub fn get(buf: &[u8], index: usize, order: u32) -> u64 {
    match order {
        0..=2 => {
            let bits = 1usize << order;
            let per_byte = 8 / bits;
            let b = buf[index / per_byte];
            let shift = (index % per_byte) * bits;
            ((b >> shift) as u64) & ((1u64 << bits) - 1)
        }
        3 => buf[index] as u64,
        4 => u16::from_be_bytes([buf[index * 2], buf[index * 2 + 1]]) as u64,
        5 => {
            let mut b = [0u8; 4];
            b.copy_from_slice(&buf[index * 4..index * 4 + 4]);
            u32::from_be_bytes(b) as u64
        }
        _ => crate::be64(buf, index * 8),
    }
}

/// Writes entry `index`; `value` must not exceed [`max_refcount`]`(order)`.
pub fn set(buf: &mut [u8], index: usize, order: u32, value: u64) {
    debug_assert!(value <= max_refcount(order));
    match order {
        0..=2 => {
            let bits = 1usize << order;
            let per_byte = 8 / bits;
            let shift = (index % per_byte) * bits;
            let mask = (((1u16 << bits) - 1) as u8) << shift;
            let b = &mut buf[index / per_byte];
            *b = (*b & !mask) | (((value as u8) << shift) & mask);
        }
        3 => buf[index] = value as u8,
        4 => buf[index * 2..index * 2 + 2].copy_from_slice(&(value as u16).to_be_bytes()),
        5 => buf[index * 4..index * 4 + 4].copy_from_slice(&(value as u32).to_be_bytes()),
        _ => crate::put_be64(buf, index * 8, value),
    }
}

/// Byte offset within the block of the byte holding entry `index`.
pub fn byte_of(index: u64, order: u32) -> u64 {
    (index << order) / 8
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_bit_lsb_first() {
        let mut b = [0u8; 2];
        set(&mut b, 0, 0, 1);
        set(&mut b, 9, 0, 1);
        assert_eq!(b, [0x01, 0x02]);
        assert_eq!(get(&b, 9, 0), 1);
        assert_eq!(get(&b, 8, 0), 0);
    }

    #[test]
    fn two_and_four_bits() {
        let mut b = [0u8; 2];
        set(&mut b, 1, 1, 3);
        assert_eq!(b[0], 0b0000_1100);
        set(&mut b, 3, 2, 0xa);
        assert_eq!(b[1], 0xa0);
        assert_eq!(get(&b, 3, 2), 0xa);
        assert_eq!(get(&b, 1, 1), 3);
    }

    #[test]
    fn wide_big_endian() {
        let mut b = [0u8; 16];
        set(&mut b, 1, 4, 0x1234);
        assert_eq!(&b[2..4], &[0x12, 0x34]);
        set(&mut b, 1, 5, 0xdead_beef);
        assert_eq!(&b[4..8], &[0xde, 0xad, 0xbe, 0xef]);
        set(&mut b, 1, 6, u64::MAX - 1);
        assert_eq!(get(&b, 1, 6), u64::MAX - 1);
        set(&mut b, 3, 3, 0x7f);
        assert_eq!(b[3], 0x7f);
    }

    #[test]
    fn widths() {
        assert_eq!(max_refcount(0), 1);
        assert_eq!(max_refcount(4), 0xffff);
        assert_eq!(max_refcount(6), u64::MAX);
        assert_eq!(entries_per_block(16, 4), 32768);
        assert_eq!(entries_per_block(9, 0), 4096);
        assert_eq!(entries_per_block(21, 6), 262144);
    }
}
