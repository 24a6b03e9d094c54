//! The image header, its extensions and feature bits.

use crate::error::FormatError;
use crate::{be32, be64, put_be32, put_be64};

/// `QFI\xfb`.
pub const MAGIC: u32 = 0x5146_49fb;
/// Smallest cluster_bits accepted (512 B clusters).
pub const MIN_CLUSTER_BITS: u32 = 9;
/// Largest cluster_bits accepted (2 MiB clusters).
pub const MAX_CLUSTER_BITS: u32 = 21;
/// Upper bound of the L1 table in bytes (same bound as QEMU).
pub const MAX_L1_BYTES: u64 = 32 << 20;
/// Upper bound of the refcount table in bytes (same bound as QEMU).
pub const MAX_REFTABLE_BYTES: u64 = 8 << 20;
/// Length of the fixed v2 header.
pub const V2_HEADER_LEN: u32 = 72;
/// Minimal v3 header length (without the compression type byte).
pub const V3_MIN_HEADER_LEN: u32 = 104;
/// v3 header length written by this implementation (with compression type and padding).
pub const V3_HEADER_LEN: u32 = 112;
/// Longest backing file name accepted.
pub const MAX_BACKING_NAME: u32 = 1023;

/// Incompatible feature: the image was not closed cleanly (lazy refcounts).
pub const INCOMPAT_DIRTY: u64 = 1 << 0;
/// Incompatible feature: metadata is known to be corrupt.
pub const INCOMPAT_CORRUPT: u64 = 1 << 1;
/// Incompatible feature: guest data lives in an external data file.
pub const INCOMPAT_DATA_FILE: u64 = 1 << 2;
/// Incompatible feature: the compression type field is in use.
pub const INCOMPAT_COMPRESSION: u64 = 1 << 3;
/// Incompatible feature: L2 entries are 128 bits with subcluster bitmaps.
pub const INCOMPAT_EXTL2: u64 = 1 << 4;
/// All incompatible bits known here.
pub const INCOMPAT_KNOWN: u64 = 0x1f;
/// Compatible feature: lazy refcounts.
pub const COMPAT_LAZY_REFCOUNTS: u64 = 1 << 0;
/// Autoclear feature: bitmaps extension is consistent.
pub const AUTOCLEAR_BITMAPS: u64 = 1 << 0;
/// Autoclear feature: the external data file is raw (guest offset == host offset).
pub const AUTOCLEAR_DATA_FILE_RAW: u64 = 1 << 1;

/// Header extension: end of the list.
pub const EXT_END: u32 = 0;
/// Header extension: backing file format name.
pub const EXT_BACKING_FORMAT: u32 = 0xe279_2aca;
/// Header extension: feature name table.
pub const EXT_FEATURE_TABLE: u32 = 0x6803_f857;
/// Header extension: bitmaps.
pub const EXT_BITMAPS: u32 = 0x2385_2875;
/// Header extension: full disk encryption header pointer.
pub const EXT_FULL_DISK_ENCRYPTION: u32 = 0x0537_be77;
/// Header extension: external data file name.
pub const EXT_DATA_FILE: u32 = 0x4441_5441;

/// Compression algorithm of compressed clusters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CompressionType {
    /// Raw deflate (the default).
    Zlib,
    /// Zstandard frames.
    Zstd,
}

impl CompressionType {
    /// The name qemu-img prints.
    pub fn name(self) -> &'static str {
        match self {
            CompressionType::Zlib => "zlib",
            CompressionType::Zstd => "zstd",
        }
    }
}

/// One header extension, kept byte for byte.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Extension {
    /// Extension type code.
    pub kind: u32,
    /// Payload (without padding).
    pub data: Vec<u8>,
}

/// One entry of the feature name table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FeatureName {
    /// 0 incompatible, 1 compatible, 2 autoclear.
    pub kind: u8,
    /// Bit number.
    pub bit: u8,
    /// Human-readable name.
    pub name: String,
}

/// The parsed image header, including extensions and the backing file name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    /// 2 or 3.
    pub version: u32,
    /// Offset of the backing file name (0: none).
    pub backing_file_offset: u64,
    /// Length of the backing file name.
    pub backing_file_size: u32,
    /// log2 of the cluster size.
    pub cluster_bits: u32,
    /// Virtual disk size in bytes.
    pub size: u64,
    /// 0 none, 1 AES, 2 LUKS.
    pub crypt_method: u32,
    /// Number of L1 entries.
    pub l1_size: u32,
    /// Host offset of the L1 table.
    pub l1_table_offset: u64,
    /// Host offset of the refcount table.
    pub refcount_table_offset: u64,
    /// Refcount table length in clusters.
    pub refcount_table_clusters: u32,
    /// Number of internal snapshots.
    pub nb_snapshots: u32,
    /// Host offset of the snapshot table.
    pub snapshots_offset: u64,
    /// Incompatible feature bits (v3).
    pub incompatible_features: u64,
    /// Compatible feature bits (v3).
    pub compatible_features: u64,
    /// Autoclear feature bits (v3).
    pub autoclear_features: u64,
    /// log2 of the refcount width in bits.
    pub refcount_order: u32,
    /// Header length (72 for v2).
    pub header_length: u32,
    /// Compression type byte (v3 with header_length > 104).
    pub compression_type: u8,
    /// Bytes of the header beyond the fields known here (offset 105 up to header_length), kept.
    pub extra: Vec<u8>,
    /// Header extensions in file order, unknown ones included.
    pub extensions: Vec<Extension>,
    /// Backing file name, when there is one: bytes, as QEMU reads them (the
    /// `backing_file_size` bytes at `backing_file_offset`, ending at the
    /// first NUL; an empty name means no backing file). File names need not
    /// be UTF-8.
    pub backing_file: Option<Vec<u8>>,
}

fn invalid(field: &'static str, detail: impl Into<String>) -> FormatError {
    FormatError::invalid(field, detail)
}

impl Header {
    /// Parses and validates the header from the beginning of an image.
    ///
    /// `buf` should hold at least the first cluster (or the whole file when it is
    /// shorter); `file_len` is the image file length, used for range checks.
    pub fn parse(buf: &[u8], file_len: u64) -> Result<Header, FormatError> {
        if buf.len() < V2_HEADER_LEN as usize {
            return Err(FormatError::Truncated("header"));
        }
        if be32(buf, 0) != MAGIC {
            return Err(FormatError::BadMagic);
        }
        let version = be32(buf, 4);
        if version != 2 && version != 3 {
            return Err(FormatError::UnsupportedVersion(version));
        }
        let mut h = Header {
            version,
            backing_file_offset: be64(buf, 8),
            backing_file_size: be32(buf, 16),
            cluster_bits: be32(buf, 20),
            size: be64(buf, 24),
            crypt_method: be32(buf, 32),
            l1_size: be32(buf, 36),
            l1_table_offset: be64(buf, 40),
            refcount_table_offset: be64(buf, 48),
            refcount_table_clusters: be32(buf, 56),
            nb_snapshots: be32(buf, 60),
            snapshots_offset: be64(buf, 64),
            incompatible_features: 0,
            compatible_features: 0,
            autoclear_features: 0,
            refcount_order: 4,
            header_length: V2_HEADER_LEN,
            compression_type: 0,
            extra: Vec::new(),
            extensions: Vec::new(),
            backing_file: None,
        };
        if !(MIN_CLUSTER_BITS..=MAX_CLUSTER_BITS).contains(&h.cluster_bits) {
            return Err(invalid(
                "cluster_bits",
                format!("{} (must be 9..21)", h.cluster_bits),
            ));
        }
        let cs = 1u64 << h.cluster_bits;
        if version == 3 {
            if buf.len() < V3_MIN_HEADER_LEN as usize {
                return Err(FormatError::Truncated("v3 header"));
            }
            h.incompatible_features = be64(buf, 72);
            h.compatible_features = be64(buf, 80);
            h.autoclear_features = be64(buf, 88);
            h.refcount_order = be32(buf, 96);
            h.header_length = be32(buf, 100);
            if h.header_length < V3_MIN_HEADER_LEN {
                return Err(qemu("qcow2 header too short"));
            }
            if h.header_length as u64 > cs {
                return Err(qemu("qcow2 header exceeds cluster size"));
            }
            if h.header_length as usize > buf.len() {
                return Err(FormatError::Truncated("header"));
            }
            if h.header_length > V3_MIN_HEADER_LEN {
                h.compression_type = buf[104];
                h.extra = buf[105..h.header_length as usize].to_vec();
            }
        }
        if h.refcount_order > 6 {
            return Err(invalid(
                "refcount_order",
                format!("{} (must be 0..6)", h.refcount_order),
            ));
        }
        if version == 2 && h.refcount_order != 4 {
            return Err(invalid("refcount_order", "v2 images have 16-bit refcounts"));
        }
        if h.backing_file_offset > cs {
            return Err(qemu("Invalid backing file offset"));
        }
        // Extensions follow the header, up to the backing file name or the
        // end of the first cluster. Read leniently first (the feature table
        // names unknown features); checked strictly below, in QEMU's order.
        let ext_end = if h.backing_file_offset != 0 {
            h.backing_file_offset
        } else {
            cs
        } as usize;
        let strict = parse_extensions(buf, h.header_length as usize, ext_end);
        h.extensions = match &strict {
            Ok(e) => e.clone(),
            Err(_) => Vec::new(),
        };

        let unknown = h.incompatible_features & !INCOMPAT_KNOWN;
        if unknown != 0 {
            return Err(FormatError::UnknownIncompatible(
                h.feature_names_for(0, unknown),
            ));
        }
        match h.compression_type {
            0 => {}
            1 => {
                if h.incompatible_features & INCOMPAT_COMPRESSION == 0 {
                    return Err(invalid(
                        "compression_type",
                        "zstd set without the compression-type incompatible bit",
                    ));
                }
            }
            t => return Err(invalid("compression_type", format!("unknown type {t}"))),
        }
        if h.compression_type == 0 && h.incompatible_features & INCOMPAT_COMPRESSION != 0 {
            return Err(invalid(
                "compression_type",
                "compression-type bit set but the type is zlib",
            ));
        }
        if h.incompatible_features & INCOMPAT_EXTL2 != 0 && h.cluster_bits < 14 {
            return Err(invalid(
                "cluster_bits",
                "extended L2 entries need clusters of at least 16 KiB",
            ));
        }
        h.validate_layout(file_len)?;
        h.extensions = strict?;
        if h.backing_file_offset != 0 {
            if h.backing_file_size > MAX_BACKING_NAME
                || h.backing_file_size as u64 > cs - h.backing_file_offset
            {
                return Err(qemu("Backing file name too long"));
            }
            let start = h.backing_file_offset;
            let end = start
                .checked_add(h.backing_file_size as u64)
                .ok_or_else(|| invalid("backing_file_offset", "overflow"))?;
            if end > cs || end as usize > buf.len() {
                return Err(invalid(
                    "backing_file_offset",
                    "backing file name lies outside the first cluster",
                ));
            }
            let name = trim_nul(&buf[start as usize..end as usize]);
            if !name.is_empty() {
                h.backing_file = Some(name.to_vec());
            }
        }
        Ok(h)
    }

    /// Range and alignment checks of the table offsets and sizes.
    fn validate_layout(&self, file_len: u64) -> Result<(), FormatError> {
        let cs = self.cluster_size();
        // QEMU's checks first, in its order and words.
        if self.refcount_table_clusters == 0 {
            return Err(qemu("Image does not contain a reference count table"));
        }
        qemu_table(
            "Reference count table",
            self.refcount_table_offset,
            self.refcount_table_clusters as u64,
            cs,
            MAX_REFTABLE_BYTES,
            cs,
        )?;
        qemu_table(
            "Snapshot table",
            self.snapshots_offset,
            self.nb_snapshots as u64,
            40,
            40 * 65536,
            cs,
        )?;
        qemu_table(
            "Active L1 table",
            self.l1_table_offset,
            self.l1_size as u64,
            8,
            MAX_L1_BYTES,
            cs,
        )?;
        if self.size > (1u64 << 62) {
            return Err(qemu("Image is too big"));
        }
        let geo = Geometry::new(self.cluster_bits, self.extended_l2());
        let needed_l1 = geo.l1_entries_for(self.size);
        if (self.l1_size as u64) < needed_l1 {
            return Err(qemu("L1 table is too small"));
        }
        if (self.l1_size as u64) < needed_l1 {
            return Err(invalid(
                "l1_size",
                format!(
                    "{} entries cannot map {} bytes (needs {needed_l1})",
                    self.l1_size, self.size
                ),
            ));
        }
        if self.l1_size as u64 * 8 > MAX_L1_BYTES {
            return Err(invalid(
                "l1_size",
                format!("{} entries exceed the 32 MiB limit", self.l1_size),
            ));
        }
        if self.l1_size > 0 {
            check_table(
                "l1_table_offset",
                self.l1_table_offset,
                self.l1_size as u64 * 8,
                cs,
                file_len,
            )?;
        }
        if self.refcount_table_clusters == 0 {
            return Err(invalid("refcount_table_clusters", "0"));
        }
        let rt_bytes = self.refcount_table_clusters as u64 * cs;
        if rt_bytes > MAX_REFTABLE_BYTES {
            return Err(invalid(
                "refcount_table_clusters",
                format!(
                    "{} clusters exceed the 8 MiB limit",
                    self.refcount_table_clusters
                ),
            ));
        }
        check_table(
            "refcount_table_offset",
            self.refcount_table_offset,
            rt_bytes,
            cs,
            file_len,
        )?;
        // The snapshot table is not checked against the end of the file:
        // QEMU reads what lies past it as zeroes (and so does the engine,
        // which reads the table lazily and bounded).
        if self.nb_snapshots > 0 && self.snapshots_offset == 0 {
            return Err(invalid("snapshots_offset", "table overlaps the header"));
        }
        Ok(())
    }

    /// Cluster size in bytes.
    pub fn cluster_size(&self) -> u64 {
        1u64 << self.cluster_bits
    }

    /// Refcount width in bits.
    pub fn refcount_bits(&self) -> u32 {
        1 << self.refcount_order
    }

    /// Whether L2 entries carry subcluster bitmaps.
    pub fn extended_l2(&self) -> bool {
        self.incompatible_features & INCOMPAT_EXTL2 != 0
    }

    /// Whether lazy refcounts are enabled.
    pub fn lazy_refcounts(&self) -> bool {
        self.compatible_features & COMPAT_LAZY_REFCOUNTS != 0
    }

    /// Whether the image was left dirty (lazy refcounts need repair).
    pub fn is_dirty(&self) -> bool {
        self.incompatible_features & INCOMPAT_DIRTY != 0
    }

    /// Whether the corrupt bit is set.
    pub fn is_corrupt(&self) -> bool {
        self.incompatible_features & INCOMPAT_CORRUPT != 0
    }

    /// Whether guest data lives in an external data file.
    pub fn has_data_file(&self) -> bool {
        self.incompatible_features & INCOMPAT_DATA_FILE != 0
    }

    /// The compression algorithm.
    pub fn compression(&self) -> CompressionType {
        if self.compression_type == 1 {
            CompressionType::Zstd
        } else {
            CompressionType::Zlib
        }
    }

    /// Geometry derived from the header.
    pub fn geometry(&self) -> Geometry {
        Geometry::new(self.cluster_bits, self.extended_l2())
    }

    /// The payload of the first extension of this type.
    pub fn extension(&self, kind: u32) -> Option<&[u8]> {
        self.extensions
            .iter()
            .find(|e| e.kind == kind)
            .map(|e| e.data.as_slice())
    }

    /// Backing file format from its extension.
    pub fn backing_format(&self) -> Option<String> {
        // As QEMU reads the extensions: a later one of this type wins.
        self.extensions
            .iter()
            .rev()
            .find(|e| e.kind == EXT_BACKING_FORMAT)
            .map(|e| String::from_utf8_lossy(trim_nul(&e.data)).into_owned())
    }

    /// External data file name from its extension.
    pub fn data_file(&self) -> Option<String> {
        self.extension(EXT_DATA_FILE)
            .map(|d| String::from_utf8_lossy(trim_nul(d)).into_owned())
    }

    /// The feature name table, when present.
    pub fn feature_table(&self) -> Vec<FeatureName> {
        let Some(d) = self.extension(EXT_FEATURE_TABLE) else {
            return Vec::new();
        };
        d.chunks_exact(48)
            .map(|c| FeatureName {
                kind: c[0],
                bit: c[1],
                name: String::from_utf8_lossy(trim_nul(&c[2..])).into_owned(),
            })
            .collect()
    }

    /// Names of the bits in `mask` of feature class `kind`, from the feature
    /// table where it names them, else `bit N`.
    pub fn feature_names_for(&self, kind: u8, mask: u64) -> String {
        let table = self.feature_table();
        (0..64)
            .filter(|b| mask & (1u64 << b) != 0)
            .map(|b| {
                table
                    .iter()
                    .find(|f| f.kind == kind && f.bit as u32 == b)
                    .map(|f| f.name.clone())
                    .unwrap_or_else(|| format!("bit {b}"))
            })
            .collect::<Vec<_>>()
            .join(", ")
    }

    /// Serialises header, extensions (ending with the end marker) and backing
    /// file name into one buffer of `cluster_size` bytes. The backing file name
    /// is placed right after the extensions and `backing_file_offset`/`size`
    /// are updated accordingly.
    pub fn serialize(&mut self) -> Result<Vec<u8>, FormatError> {
        let cs = self.cluster_size() as usize;
        let mut buf = vec![0u8; cs];
        if self.version == 2 {
            self.header_length = V2_HEADER_LEN;
        }
        let hl = self.header_length as usize;
        let mut pos = hl;
        let mut ext_bytes = Vec::new();
        for e in &self.extensions {
            let padded = e.data.len().div_ceil(8) * 8;
            let mut hdr = [0u8; 8];
            put_be32(&mut hdr, 0, e.kind);
            put_be32(&mut hdr, 4, e.data.len() as u32);
            ext_bytes.extend_from_slice(&hdr);
            ext_bytes.extend_from_slice(&e.data);
            ext_bytes.resize(ext_bytes.len() + padded - e.data.len(), 0);
        }
        ext_bytes.extend_from_slice(&[0u8; 8]);
        let name = self.backing_file.clone().unwrap_or_default();
        if pos + ext_bytes.len() + name.len() > cs {
            return Err(invalid(
                "header",
                "header, extensions and backing name do not fit in one cluster",
            ));
        }
        buf[pos..pos + ext_bytes.len()].copy_from_slice(&ext_bytes);
        pos += ext_bytes.len();
        if self.backing_file.is_some() {
            if name.len() > MAX_BACKING_NAME as usize {
                return Err(invalid("backing_file", "name longer than 1023 bytes"));
            }
            buf[pos..pos + name.len()].copy_from_slice(&name);
            self.backing_file_offset = pos as u64;
            self.backing_file_size = name.len() as u32;
        } else {
            self.backing_file_offset = 0;
            self.backing_file_size = 0;
        }
        self.write_fixed(&mut buf);
        Ok(buf)
    }

    /// Writes the fixed header fields (not extensions) into `buf`.
    pub fn write_fixed(&self, buf: &mut [u8]) {
        put_be32(buf, 0, MAGIC);
        put_be32(buf, 4, self.version);
        put_be64(buf, 8, self.backing_file_offset);
        put_be32(buf, 16, self.backing_file_size);
        put_be32(buf, 20, self.cluster_bits);
        put_be64(buf, 24, self.size);
        put_be32(buf, 32, self.crypt_method);
        put_be32(buf, 36, self.l1_size);
        put_be64(buf, 40, self.l1_table_offset);
        put_be64(buf, 48, self.refcount_table_offset);
        put_be32(buf, 56, self.refcount_table_clusters);
        put_be32(buf, 60, self.nb_snapshots);
        put_be64(buf, 64, self.snapshots_offset);
        if self.version >= 3 {
            put_be64(buf, 72, self.incompatible_features);
            put_be64(buf, 80, self.compatible_features);
            put_be64(buf, 88, self.autoclear_features);
            put_be32(buf, 96, self.refcount_order);
            put_be32(buf, 100, self.header_length);
            if self.header_length > V3_MIN_HEADER_LEN {
                buf[104] = self.compression_type;
                let n = self.extra.len().min(self.header_length as usize - 105);
                buf[105..105 + n].copy_from_slice(&self.extra[..n]);
            }
        }
    }
}

fn trim_nul(d: &[u8]) -> &[u8] {
    let end = d.iter().position(|&b| b == 0).unwrap_or(d.len());
    &d[..end]
}

fn qemu(msg: &str) -> FormatError {
    FormatError::Qemu(msg.to_string())
}

/// QEMU's qcow2_validate_table: `entries` of `entry_len` bytes at most
/// `max` bytes, at a cluster-aligned offset whose end fits in an i64.
fn qemu_table(
    name: &str,
    offset: u64,
    entries: u64,
    entry_len: u64,
    max: u64,
    cluster_size: u64,
) -> Result<(), FormatError> {
    if entries > max / entry_len {
        return Err(FormatError::Qemu(format!("{name} too large")));
    }
    if (i64::MAX as u64) - entries * entry_len < offset || offset % cluster_size != 0 {
        return Err(FormatError::Qemu(format!("{name} offset invalid")));
    }
    Ok(())
}

fn check_table(
    field: &'static str,
    offset: u64,
    bytes: u64,
    cluster_size: u64,
    file_len: u64,
) -> Result<(), FormatError> {
    if offset % cluster_size != 0 {
        return Err(invalid(
            field,
            format!("{offset:#x} is not cluster aligned"),
        ));
    }
    if offset == 0 {
        return Err(invalid(field, "table overlaps the header"));
    }
    let end = offset
        .checked_add(bytes)
        .ok_or_else(|| invalid(field, "offset + size overflows"))?;
    if end > file_len {
        return Err(invalid(
            field,
            format!("table at {offset:#x} ({bytes} bytes) extends past the end of the file ({file_len} bytes)"),
        ));
    }
    Ok(())
}

fn parse_extensions(buf: &[u8], start: usize, end: usize) -> Result<Vec<Extension>, FormatError> {
    let mut out = Vec::new();
    let mut pos = start;
    // As QEMU reads them: bytes past what the buffer holds read as zeroes,
    // and an extension header or body past `end` is an error (also for the
    // end marker).
    let byte = |i: usize| buf.get(i).copied().unwrap_or(0);
    let word = |i: usize| u32::from_be_bytes([byte(i), byte(i + 1), byte(i + 2), byte(i + 3)]);
    while pos < end {
        let kind = word(pos);
        let len = word(pos + 4) as usize;
        pos += 8;
        if pos > end || len > end - pos {
            return Err(qemu("Header extension too large"));
        }
        if kind == EXT_END {
            break;
        }
        out.push(Extension {
            kind,
            data: (pos..pos + len).map(byte).collect(),
        });
        pos += len.div_ceil(8) * 8;
        if out.len() > 4096 {
            return Err(invalid("header extension", "too many extensions"));
        }
    }
    Ok(out)
}

/// Sizes derived from cluster_bits and the L2 entry width.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Geometry {
    /// log2 of the cluster size.
    pub cluster_bits: u32,
    /// Extended (128-bit) L2 entries.
    pub extended_l2: bool,
}

impl Geometry {
    /// New geometry.
    pub fn new(cluster_bits: u32, extended_l2: bool) -> Self {
        Geometry {
            cluster_bits,
            extended_l2,
        }
    }
    /// Cluster size in bytes.
    pub fn cluster_size(&self) -> u64 {
        1 << self.cluster_bits
    }
    /// Bytes per L2 entry (8 or 16).
    pub fn l2_entry_size(&self) -> u64 {
        if self.extended_l2 {
            16
        } else {
            8
        }
    }
    /// Entries per L2 table.
    pub fn l2_entries(&self) -> u64 {
        self.cluster_size() / self.l2_entry_size()
    }
    /// Bytes of guest space mapped by one L2 table.
    pub fn l2_coverage(&self) -> u64 {
        self.l2_entries() * self.cluster_size()
    }
    /// Subclusters per cluster (1 without extended L2).
    pub fn subclusters(&self) -> u64 {
        if self.extended_l2 {
            32
        } else {
            1
        }
    }
    /// Subcluster size in bytes.
    pub fn subcluster_size(&self) -> u64 {
        self.cluster_size() / self.subclusters()
    }
    /// L1 entries needed for a disk of `size` bytes.
    pub fn l1_entries_for(&self, size: u64) -> u64 {
        size.div_ceil(self.l2_coverage())
    }
    /// L1 index of a guest offset.
    pub fn l1_index(&self, guest: u64) -> u64 {
        guest / self.l2_coverage()
    }
    /// L2 index of a guest offset.
    pub fn l2_index(&self, guest: u64) -> u64 {
        (guest >> self.cluster_bits) & (self.l2_entries() - 1)
    }
    /// Offset within the cluster.
    pub fn in_cluster(&self, off: u64) -> u64 {
        off & (self.cluster_size() - 1)
    }
}
