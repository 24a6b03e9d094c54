//! L1 and L2 entry codecs (standard and extended), compressed descriptors.

use crate::error::FormatError;

/// Host offset bits 9..55 of L1 and standard L2 entries.
pub const OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;
/// COPIED flag (refcount is exactly one).
pub const FLAG_COPIED: u64 = 1 << 63;
/// Compressed cluster flag of L2 entries.
pub const FLAG_COMPRESSED: u64 = 1 << 62;
/// Zero flag of standard L2 entries (v3).
pub const FLAG_ZERO: u64 = 1;
/// L1 reserved bits.
pub const L1_RESERVED: u64 = 0x7f00_0000_0000_01ff;
/// Standard L2 reserved bits (bits 1..8 and 56..61).
pub const L2_RESERVED: u64 = 0x3f00_0000_0000_01fe;
/// Extended L2 bitmap: all 32 subclusters read as zeroes, none allocated.
pub const L2_BITMAP_ALL_ZERO: u64 = 0xffff_ffff_0000_0000;

/// An L1 table entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct L1Entry(pub u64);

impl L1Entry {
    /// Host offset of the L2 table (0: unallocated).
    pub fn l2_offset(self) -> u64 {
        self.0 & OFFSET_MASK
    }
    /// COPIED flag.
    pub fn copied(self) -> bool {
        self.0 & FLAG_COPIED != 0
    }
    /// Reserved bits set.
    pub fn reserved(self) -> u64 {
        self.0 & L1_RESERVED
    }
    /// Entry pointing at an L2 table with refcount one.
    pub fn new(l2_offset: u64) -> Self {
        L1Entry((l2_offset & OFFSET_MASK) | if l2_offset != 0 { FLAG_COPIED } else { 0 })
    }
}

/// Cluster kinds of an L2 entry (for extended L2: the cluster as a whole).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClusterType {
    /// No host cluster, no zero flag: reads from the backing file (or zeroes).
    Unallocated,
    /// Zero flag without a host cluster.
    ZeroPlain,
    /// Zero flag with a preallocated host cluster.
    ZeroAlloc,
    /// Data in a host cluster.
    Normal,
    /// Compressed data.
    Compressed,
}

/// Per-subcluster states of extended L2 entries (standard entries map to these too).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SubclusterType {
    /// Compressed cluster.
    Compressed,
    /// Reads as zeroes, has a host cluster.
    ZeroAlloc,
    /// Reads as zeroes, no host cluster.
    ZeroPlain,
    /// Data in the host cluster.
    Normal,
    /// Not allocated but the cluster has a host offset.
    UnallocatedAlloc,
    /// Not allocated, no host offset.
    UnallocatedPlain,
    /// Bitmap combination the spec forbids.
    Invalid,
}

impl SubclusterType {
    /// Whether the subcluster is allocated in this layer (does not fall through to backing).
    pub fn is_allocated(self) -> bool {
        !matches!(
            self,
            SubclusterType::UnallocatedAlloc | SubclusterType::UnallocatedPlain
        )
    }
    /// Whether it reads as zeroes from this layer.
    pub fn is_zero(self) -> bool {
        matches!(self, SubclusterType::ZeroAlloc | SubclusterType::ZeroPlain)
    }
}

/// An L2 entry: the 64-bit descriptor plus, for extended L2, the subcluster
/// bitmap (low 32 bits: allocated, high 32 bits: reads as zero).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct L2Entry {
    /// First 64 bits.
    pub raw: u64,
    /// Subcluster bitmap (0 for standard entries).
    pub bitmap: u64,
}

impl L2Entry {
    /// Standard entry from its raw value.
    pub fn standard(raw: u64) -> Self {
        L2Entry { raw, bitmap: 0 }
    }
    /// Whether the compressed flag is set.
    pub fn is_compressed(self) -> bool {
        self.raw & FLAG_COMPRESSED != 0
    }
    /// Host cluster offset of an uncompressed entry (0: none).
    pub fn host_offset(self) -> u64 {
        if self.is_compressed() {
            0
        } else {
            self.raw & OFFSET_MASK
        }
    }
    /// COPIED flag.
    pub fn copied(self) -> bool {
        self.raw & FLAG_COPIED != 0
    }
    /// Standard-entry zero flag.
    pub fn zero_flag(self) -> bool {
        self.raw & FLAG_ZERO != 0
    }
    /// Reserved bits of an uncompressed entry (for extended L2 bit 0 is reserved too).
    pub fn reserved(self, extended: bool) -> u64 {
        if self.is_compressed() {
            return 0;
        }
        let mut r = self.raw & L2_RESERVED;
        if extended {
            r |= self.raw & FLAG_ZERO;
        }
        r
    }
    /// The cluster type (standard entries; for extended entries, the type
    /// of the cluster as a whole where it is uniform).
    pub fn cluster_type(self, extended: bool) -> ClusterType {
        if self.is_compressed() {
            return ClusterType::Compressed;
        }
        let off = self.raw & OFFSET_MASK;
        let zero = if extended {
            // The whole cluster reads as zeroes.
            self.bitmap & L2_BITMAP_ALL_ZERO == L2_BITMAP_ALL_ZERO
        } else {
            self.zero_flag()
        };
        match (zero, off != 0) {
            (true, true) => ClusterType::ZeroAlloc,
            (true, false) => ClusterType::ZeroPlain,
            (false, true) => ClusterType::Normal,
            (false, false) => ClusterType::Unallocated,
        }
    }
    /// Type of subcluster `sc` (0..31; for standard entries, pass 0).
    pub fn subcluster_type(self, extended: bool, sc: u32) -> SubclusterType {
        self.subcluster_type_in(extended, sc, false)
    }
    /// Whether the entry names a host cluster. With an external data file
    /// (`data_file`) host offset 0 is a valid one (guest cluster 0, where
    /// host = guest): there the COPIED flag, always set on allocated
    /// clusters of such images, tells an allocated entry from an empty one.
    pub fn has_host(self, data_file: bool) -> bool {
        !self.is_compressed()
            && (self.raw & OFFSET_MASK != 0 || (data_file && self.raw & FLAG_COPIED != 0))
    }
    /// [`L2Entry::subcluster_type`] in an image with an external data file
    /// or not (see [`L2Entry::has_host`]).
    pub fn subcluster_type_in(self, extended: bool, sc: u32, data_file: bool) -> SubclusterType {
        if self.is_compressed() {
            return SubclusterType::Compressed;
        }
        let host = self.has_host(data_file);
        if !extended {
            return match (self.zero_flag(), host) {
                (true, true) => SubclusterType::ZeroAlloc,
                (true, false) => SubclusterType::ZeroPlain,
                (false, true) => SubclusterType::Normal,
                (false, false) => SubclusterType::UnallocatedPlain,
            };
        }
        if self.bitmap_invalid_in(data_file) {
            // One bad subcluster makes the whole entry invalid.
            return SubclusterType::Invalid;
        }
        let alloc = (self.bitmap >> sc) & 1 != 0;
        let zero = (self.bitmap >> (32 + sc)) & 1 != 0;
        match (zero, alloc, host) {
            (true, _, true) => SubclusterType::ZeroAlloc,
            (true, _, false) => SubclusterType::ZeroPlain,
            (false, true, _) => SubclusterType::Normal,
            (false, false, true) => SubclusterType::UnallocatedAlloc,
            (false, false, false) => SubclusterType::UnallocatedPlain,
        }
    }
    /// Whether the subcluster bitmap of an extended entry breaks the spec:
    /// a subcluster both allocated and zero, or an allocated subcluster in
    /// an entry without a host offset. Such an entry is invalid as a whole
    /// (every subcluster reads as [`SubclusterType::Invalid`]). Compressed
    /// entries have no subclusters: always false for them.
    pub fn bitmap_invalid(self) -> bool {
        self.bitmap_invalid_in(false)
    }
    /// [`L2Entry::bitmap_invalid`] with or without an external data file.
    pub fn bitmap_invalid_in(self, data_file: bool) -> bool {
        if self.is_compressed() {
            return false;
        }
        let alloc = self.bitmap & 0xffff_ffff;
        if self.has_host(data_file) {
            alloc & (self.bitmap >> 32) != 0
        } else {
            alloc != 0
        }
    }
    /// Compressed descriptor (only meaningful when `is_compressed`).
    pub fn compressed(self, cluster_bits: u32) -> CompressedDescriptor {
        CompressedDescriptor::decode(self.raw, cluster_bits)
    }
}

/// Where the compressed data of a cluster lives.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CompressedDescriptor {
    /// Host byte offset of the compressed data (not aligned).
    pub offset: u64,
    /// Number of 512-byte sectors the data occupies, counting the one holding `offset`.
    pub sectors: u64,
}

impl CompressedDescriptor {
    /// Bit position where the sector count starts: `62 - (cluster_bits - 8)`.
    pub fn shift(cluster_bits: u32) -> u32 {
        62 - (cluster_bits - 8)
    }
    /// Decodes bits 0..61 of a compressed L2 entry.
    pub fn decode(raw: u64, cluster_bits: u32) -> Self {
        let x = Self::shift(cluster_bits);
        let offset = raw & ((1u64 << x) - 1);
        let nb_bits = cluster_bits - 8;
        let add = (raw >> x) & ((1u64 << nb_bits) - 1);
        CompressedDescriptor {
            offset,
            sectors: add + 1,
        }
    }
    /// Encodes into an L2 entry value (compressed flag set).
    pub fn encode(self, cluster_bits: u32) -> Result<u64, FormatError> {
        let x = Self::shift(cluster_bits);
        if self.offset >= (1u64 << x) {
            return Err(FormatError::invalid(
                "compressed offset",
                "too large for the descriptor",
            ));
        }
        let nb_bits = cluster_bits - 8;
        if self.sectors == 0 || self.sectors > (1u64 << nb_bits) {
            return Err(FormatError::invalid(
                "compressed size",
                "sector count out of range",
            ));
        }
        Ok(FLAG_COMPRESSED | self.offset | ((self.sectors - 1) << x))
    }
    /// Bytes to read from `offset` to cover the compressed data.
    pub fn byte_len(self) -> u64 {
        self.sectors * 512 - (self.offset & 511)
    }
    /// Host cluster holding the first byte.
    pub fn first_cluster(self, cluster_bits: u32) -> u64 {
        self.offset & !((1u64 << cluster_bits) - 1)
    }
    /// Host cluster holding the last byte.
    pub fn last_cluster(self, cluster_bits: u32) -> u64 {
        (self.offset + self.byte_len() - 1) & !((1u64 << cluster_bits) - 1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn l1_entry_bits() {
        let e = L1Entry(0x8000_0000_0005_0000);
        assert_eq!(e.l2_offset(), 0x50000);
        assert!(e.copied());
        assert_eq!(e.reserved(), 0);
        assert_eq!(
            L1Entry(0x0100_0000_0000_0000).reserved(),
            0x0100_0000_0000_0000
        );
        assert_eq!(L1Entry(1).reserved(), 1);
        assert_eq!(L1Entry::new(0x70000).0, 0x8000_0000_0007_0000);
        assert_eq!(L1Entry::new(0).0, 0);
    }

    #[test]
    fn standard_types() {
        assert_eq!(
            L2Entry::standard(0).cluster_type(false),
            ClusterType::Unallocated
        );
        assert_eq!(
            L2Entry::standard(1).cluster_type(false),
            ClusterType::ZeroPlain
        );
        assert_eq!(
            L2Entry::standard(0x8000_0000_0005_0001).cluster_type(false),
            ClusterType::ZeroAlloc
        );
        assert_eq!(
            L2Entry::standard(0x8000_0000_0005_0000).cluster_type(false),
            ClusterType::Normal
        );
        assert_eq!(
            L2Entry::standard(0x4000_0000_0000_0000).cluster_type(false),
            ClusterType::Compressed
        );
        assert_eq!(L2Entry::standard(0x2).reserved(false), 2);
        assert_eq!(L2Entry::standard(0x1).reserved(true), 1);
    }

    #[test]
    fn extended_subclusters() {
        // host offset 0x50000, subcluster 0 allocated, 1 zero, 2 unallocated.
        let e = L2Entry {
            raw: 0x8000_0000_0005_0000,
            bitmap: (1 << 33) | 1,
        };
        assert_eq!(e.subcluster_type(true, 0), SubclusterType::Normal);
        assert_eq!(e.subcluster_type(true, 1), SubclusterType::ZeroAlloc);
        assert_eq!(e.subcluster_type(true, 2), SubclusterType::UnallocatedAlloc);
        let both = L2Entry {
            raw: 0x8000_0000_0005_0000,
            bitmap: (1 << 32) | 1,
        };
        assert_eq!(both.subcluster_type(true, 0), SubclusterType::Invalid);
        // The whole entry is invalid, not only the bad subcluster.
        assert_eq!(both.subcluster_type(true, 1), SubclusterType::Invalid);
        assert!(both.bitmap_invalid());
        assert!(!e.bitmap_invalid());
        let plain = L2Entry {
            raw: 0,
            bitmap: L2_BITMAP_ALL_ZERO,
        };
        assert_eq!(plain.cluster_type(true), ClusterType::ZeroPlain);
        assert_eq!(plain.subcluster_type(true, 31), SubclusterType::ZeroPlain);
        let bad = L2Entry { raw: 0, bitmap: 1 };
        assert_eq!(bad.subcluster_type(true, 0), SubclusterType::Invalid);
        assert_eq!(bad.subcluster_type(true, 5), SubclusterType::Invalid);
        // Offset 0 with the COPIED flag is still "no host offset".
        let copied = L2Entry {
            raw: FLAG_COPIED,
            bitmap: 1 << 31,
        };
        assert!(copied.bitmap_invalid());
        // Compressed entries have no subcluster bitmap to check.
        let comp = L2Entry {
            raw: FLAG_COMPRESSED | 0x1000,
            bitmap: u64::MAX,
        };
        assert!(!comp.bitmap_invalid());
        assert_eq!(comp.subcluster_type(true, 0), SubclusterType::Compressed);
    }

    #[test]
    fn compressed_descriptor_64k() {
        // cluster_bits 16: x = 54; sector count in bits 54..61.
        let raw = FLAG_COMPRESSED | (3u64 << 54) | 0x12_3456;
        let d = L2Entry::standard(raw).compressed(16);
        assert_eq!(d.offset, 0x12_3456);
        assert_eq!(d.sectors, 4);
        assert_eq!(d.byte_len(), 4 * 512 - 0x56);
        assert_eq!(d.encode(16).unwrap(), raw);
    }

    #[test]
    fn compressed_descriptor_all_cluster_sizes() {
        for bits in 9..=21u32 {
            let x = 62 - (bits - 8);
            let max_sectors = 1u64 << (bits - 8);
            let d = CompressedDescriptor {
                offset: (1u64 << x) - 1,
                sectors: max_sectors,
            };
            let raw = d.encode(bits).unwrap();
            assert_eq!(raw & !FLAG_COMPRESSED, (1u64 << 62) - 1, "bits {bits}");
            assert_eq!(CompressedDescriptor::decode(raw, bits), d);
            assert!(CompressedDescriptor {
                offset: 1u64 << x,
                sectors: 1
            }
            .encode(bits)
            .is_err());
        }
    }
}
