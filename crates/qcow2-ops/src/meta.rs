//! Where the image's metadata lies, for the overlap checks run before every
//! write and allocation (QEMU's default "cached" overlap check: everything
//! but inactive L2 tables, plus the bitmap tables).
//!
//! The ranges that rarely change (header, active L1 table, snapshot table,
//! snapshot L1 tables, bitmap directory and bitmap tables) live here, sorted;
//! active L2 tables are kept by the image in a hash set and the refcount
//! structures by the refcount layer.

use std::ops::Range;

/// Kinds of metadata, as bits (an "ignore" mask combines them), QEMU's bit
/// numbers. When a write overlaps several structures, the one QEMU tests
/// first names it (the order of [`Kind::ALL`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u32)]
pub(crate) enum Kind {
    Header = 1 << 0,
    ActiveL1 = 1 << 1,
    ActiveL2 = 1 << 2,
    RefcountTable = 1 << 3,
    RefcountBlock = 1 << 4,
    SnapshotTable = 1 << 5,
    InactiveL1 = 1 << 6,
    /// Only registered with [`crate::OpenOptions::overlap_inactive_l2`].
    InactiveL2 = 1 << 7,
    BitmapDirectory = 1 << 8,
    BitmapTable = 1 << 9,
    CryptoHeader = 1 << 10,
}

impl Kind {
    /// QEMU's order of the tests (not the bit order).
    const ALL: [Kind; 11] = [
        Kind::Header,
        Kind::ActiveL1,
        Kind::RefcountTable,
        Kind::SnapshotTable,
        Kind::InactiveL1,
        Kind::ActiveL2,
        Kind::RefcountBlock,
        Kind::InactiveL2,
        Kind::BitmapDirectory,
        Kind::BitmapTable,
        Kind::CryptoHeader,
    ];

    /// The bit of this kind.
    pub(crate) const fn bit(self) -> u32 {
        self as u32
    }

    /// QEMU's name of the structure (as in "overlaps with ...").
    pub(crate) const fn name(self) -> &'static str {
        match self {
            Kind::Header => "qcow2_header",
            Kind::ActiveL1 => "active L1 table",
            Kind::ActiveL2 => "active L2 table",
            Kind::RefcountTable => "refcount table",
            Kind::RefcountBlock => "refcount block",
            Kind::SnapshotTable => "snapshot table",
            Kind::InactiveL1 => "inactive L1 table",
            Kind::InactiveL2 => "inactive L2 table",
            Kind::BitmapDirectory => "bitmap directory",
            // Not checked by QEMU; this engine protects them too.
            Kind::BitmapTable => "bitmap table",
            // Not checked by QEMU either: the LUKS header and key material.
            Kind::CryptoHeader => "crypto header",
        }
    }

    /// The kind named first among the bits of `mask`.
    pub(crate) fn first_of(mask: u32) -> Option<Kind> {
        Kind::ALL.into_iter().find(|k| mask & k.bit() != 0)
    }
}

/// Named byte ranges of metadata, sorted by start. Queries cost a binary
/// search plus a walk over the ranges that actually overlap (ranges of a
/// sane image do not overlap each other).
#[derive(Debug, Default)]
pub(crate) struct MetaRanges {
    /// (start, end, kind), sorted by start.
    ranges: Vec<(u64, u64, Kind)>,
    /// `max_end[i]`: the largest end among `ranges[..=i]`.
    max_end: Vec<u64>,
}

impl MetaRanges {
    /// Replaces every range of the kinds in `kinds` (a mask) by `new`.
    pub(crate) fn replace(
        &mut self,
        kinds: u32,
        new: impl IntoIterator<Item = (Range<u64>, Kind)>,
    ) {
        self.ranges.retain(|r| kinds & r.2.bit() == 0);
        self.ranges.extend(
            new.into_iter()
                .filter(|(r, _)| r.start < r.end)
                .map(|(r, k)| (r.start, r.end, k)),
        );
        self.ranges.sort_unstable_by_key(|r| (r.0, r.1));
        let mut m = 0;
        self.max_end = self
            .ranges
            .iter()
            .map(|r| {
                m = m.max(r.1);
                m
            })
            .collect();
    }

    /// Bits of the kinds whose ranges overlap `[start, end)`.
    #[inline]
    pub(crate) fn overlapping(&self, start: u64, end: u64) -> u32 {
        // Ranges starting before `end`: a prefix.
        let mut i = self.ranges.partition_point(|r| r.0 < end);
        let mut mask = 0;
        while i > 0 && self.max_end[i - 1] > start {
            i -= 1;
            let r = self.ranges[i];
            if r.1 > start {
                mask |= r.2.bit();
            }
        }
        mask
    }

    /// Every range, for diagnostics and tests.
    #[cfg(test)]
    pub(crate) fn ranges(&self) -> &[(u64, u64, Kind)] {
        &self.ranges
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn overlap_queries() {
        let mut m = MetaRanges::default();
        m.replace(
            0,
            [
                (0..512, Kind::Header),
                (0x30000..0x30008, Kind::ActiveL1),
                (0x80000..0x80050, Kind::SnapshotTable),
                (0x70000..0x70008, Kind::InactiveL1),
            ],
        );
        assert_eq!(m.overlapping(0, 1), Kind::Header.bit());
        assert_eq!(m.overlapping(512, 0x30000), 0);
        assert_eq!(m.overlapping(0x30000, 0x40000), Kind::ActiveL1.bit());
        assert_eq!(m.overlapping(0x30008, 0x70000), 0);
        assert_eq!(
            m.overlapping(0x30000, 0x90000),
            Kind::ActiveL1.bit() | Kind::SnapshotTable.bit() | Kind::InactiveL1.bit()
        );
        assert_eq!(m.overlapping(0x80050, u64::MAX), 0);
        // A long range before short ones is still found (prefix maximum).
        m.replace(
            Kind::InactiveL1.bit(),
            [(0x1000..0x100000, Kind::InactiveL1)],
        );
        assert_eq!(
            m.overlapping(0x90000, 0x90001),
            Kind::InactiveL1.bit(),
            "{:?}",
            m.ranges()
        );
        assert_eq!(
            Kind::first_of(Kind::InactiveL1.bit() | Kind::SnapshotTable.bit()),
            Some(Kind::SnapshotTable)
        );
        assert_eq!(Kind::first_of(0), None);
        // QEMU tests the snapshot L1 tables before the active L2 tables.
        assert_eq!(
            Kind::first_of(Kind::ActiveL2.bit() | Kind::InactiveL1.bit()),
            Some(Kind::InactiveL1)
        );
    }
}
