//! Public option, status and report types of the image API.

use serde::Serialize;

/// Request flag: the zeroed range may be deallocated (QEMU's BDRV_REQ_MAY_UNMAP).
pub const REQ_MAY_UNMAP: u32 = 0x4;
/// Request flag: the data is durable when the call returns (BDRV_REQ_FUA).
pub const REQ_FUA: u32 = 0x10;
/// Request flag (write): store whole clusters compressed (BDRV_REQ_WRITE_COMPRESSED).
pub const REQ_COMPRESSED: u32 = 0x20;
/// Request flag: fail with ENOTSUP rather than write zero data (BDRV_REQ_NO_FALLBACK).
pub const REQ_NO_FALLBACK: u32 = 0x100;
/// Every request flag known.
pub const REQ_KNOWN: u32 = REQ_MAY_UNMAP | REQ_FUA | REQ_NO_FALLBACK;

/// Host cache mode, as qemu-io's `-t`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum CacheMode {
    /// Metadata and data may stay in caches until flush.
    #[default]
    Writeback,
    /// Every request is followed by a flush.
    Writethrough,
    /// Never sync (flush only writes back caches).
    Unsafe,
    /// O_DIRECT on the image file; writeback semantics otherwise.
    None,
    /// O_DIRECT on the image file and writethrough semantics: every request
    /// is durable before it returns (qemu's `directsync`).
    DirectSync,
}

impl CacheMode {
    /// Parses qemu's names (`writeback`, `writethrough`, `unsafe`, `none`, `directsync`).
    pub fn parse(s: &str) -> Option<CacheMode> {
        Some(match s {
            "writeback" => CacheMode::Writeback,
            "writethrough" => CacheMode::Writethrough,
            "unsafe" => CacheMode::Unsafe,
            "none" | "off" => CacheMode::None,
            "directsync" => CacheMode::DirectSync,
            _ => return None,
        })
    }

    /// Whether the image file is opened with O_DIRECT (`none`, `directsync`).
    pub fn direct(self) -> bool {
        matches!(self, CacheMode::None | CacheMode::DirectSync)
    }

    /// Whether every request is made durable before it returns
    /// (`writethrough`, `directsync`).
    pub fn writethrough(self) -> bool {
        matches!(self, CacheMode::Writethrough | CacheMode::DirectSync)
    }
}

/// What discard requests do, as qemu's `discard=` option.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DiscardMode {
    /// Discards are no-ops and MAY_UNMAP is cleared from write-zeroes.
    #[default]
    Ignore,
    /// Discards deallocate clusters and punch holes in the file.
    Unmap,
}

impl DiscardMode {
    /// Parses `ignore`/`off` and `unmap`/`on`.
    pub fn parse(s: &str) -> Option<DiscardMode> {
        match s {
            "ignore" | "off" => Some(DiscardMode::Ignore),
            "unmap" | "on" => Some(DiscardMode::Unmap),
            _ => None,
        }
    }
}

/// How to open an image.
#[derive(Debug, Clone)]
pub struct OpenOptions {
    /// Open read-write.
    pub writable: bool,
    /// Cache mode.
    pub cache: CacheMode,
    /// Discard mode.
    pub discard: DiscardMode,
    /// L2 cache size in bytes (default [`OpenOptions::DEFAULT_L2_CACHE`]).
    pub l2_cache_bytes: usize,
    /// Refcount block cache size in bytes (default [`OpenOptions::DEFAULT_REFCOUNT_CACHE`]).
    pub refcount_cache_bytes: usize,
    /// Granularity of dirty tracking inside cached tables (512..=cluster size, power of two).
    pub dirty_granularity: usize,
    /// Open the backing chain (off: unallocated clusters read as zeroes).
    pub open_backing: bool,
    /// Opened to check and repair (qemu-img check -r): an image marked
    /// corrupt may be opened read-write; a dirty image is not repaired on
    /// open (the check is to find what it finds); a successful
    /// `check(RepairMode::All)` clears the corrupt bit.
    pub for_repair: bool,
    /// Lazy refcounts (QEMU's `lazy-refcounts` option); `None`: as the
    /// image's compatible bit says. See [`crate::Image::open`].
    pub lazy_refcounts: Option<bool>,
    /// Passphrase of an encrypted image (QEMU's `encrypt.key-secret`).
    pub key_secret: Option<Secret>,
    /// Passphrase of an encrypted backing file (QEMU's
    /// `backing.encrypt.key-secret`).
    pub backing_key_secret: Option<Secret>,
    /// The backing file's format, instead of what the header says (QEMU's
    /// `backing.driver`).
    pub backing_driver: Option<String>,
    /// The external data file to use instead of the one the header names
    /// (QEMU's `data-file` option).
    pub data_file: Option<std::path::PathBuf>,
    /// Open without unlocking the data (an encrypted image needs no
    /// secret; reading or writing guest data fails): what `qemu-img info`
    /// needs, as QEMU's no-I/O open.
    pub metadata_only: bool,
    /// A layer put over the external data file once it is open (error
    /// injection, a format's debug events): QEMU's node graph above the
    /// `data-file` child.
    pub data_file_layer: Option<StorageLayer>,
    /// The external data file's storage itself, instead of a file opened
    /// by name (QEMU's `data-file` given as a node, a `null-co` one say).
    pub data_file_storage: Option<StorageSource>,
    /// Also protect the L2 tables of internal snapshots from writes (QEMU's
    /// `overlap-check.inactive-l2`, part of its `all` template): their
    /// offsets are read from every snapshot's L1 table at open and after
    /// each snapshot change. While a snapshot's L1 table cannot be read
    /// (offset not cluster aligned, too large), every write to the image
    /// file fails with QEMU's errno (`EINVAL`, `EFBIG`) instead, as no
    /// write can be shown safe.
    pub overlap_inactive_l2: bool,
}

/// Makes a storage (see [`OpenOptions::data_file_storage`]).
#[derive(Clone)]
pub struct StorageSource(
    pub std::sync::Arc<dyn Fn() -> std::io::Result<Box<dyn qcow2_io::Storage>> + Send + Sync>,
);

impl std::fmt::Debug for StorageSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("StorageSource(..)")
    }
}

/// A function putting a layer over a storage.
pub type WrapStorage =
    dyn Fn(Box<dyn qcow2_io::Storage>) -> Box<dyn qcow2_io::Storage> + Send + Sync;

/// Wraps a storage in another (see [`OpenOptions::data_file_layer`]).
#[derive(Clone)]
pub struct StorageLayer(pub std::sync::Arc<WrapStorage>);

impl std::fmt::Debug for StorageLayer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("StorageLayer(..)")
    }
}

impl OpenOptions {
    /// Default L2 cache: 1 MiB.
    pub const DEFAULT_L2_CACHE: usize = 1 << 20;
    /// Default refcount cache: 256 KiB.
    pub const DEFAULT_REFCOUNT_CACHE: usize = 256 << 10;
    /// Default dirty granularity: 4 KiB.
    pub const DEFAULT_DIRTY_GRANULARITY: usize = 4096;

    /// Read-only defaults.
    pub fn read_only() -> Self {
        OpenOptions {
            writable: false,
            ..Self::default()
        }
    }
    /// Read-write defaults (writeback, discard=unmap).
    pub fn read_write() -> Self {
        OpenOptions {
            writable: true,
            discard: DiscardMode::Unmap,
            ..Self::default()
        }
    }
}

impl Default for OpenOptions {
    fn default() -> Self {
        OpenOptions {
            writable: false,
            cache: CacheMode::Writeback,
            discard: DiscardMode::Ignore,
            l2_cache_bytes: Self::DEFAULT_L2_CACHE,
            refcount_cache_bytes: Self::DEFAULT_REFCOUNT_CACHE,
            dirty_granularity: Self::DEFAULT_DIRTY_GRANULARITY,
            open_backing: true,
            for_repair: false,
            lazy_refcounts: None,
            key_secret: None,
            backing_key_secret: None,
            data_file: None,
            metadata_only: false,
            data_file_layer: None,
            data_file_storage: None,
            backing_driver: None,
            overlap_inactive_l2: false,
        }
    }
}

/// A passphrase, as bytes. Its `Debug` form does not show it.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct Secret(pub Vec<u8>);

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret(..)")
    }
}

impl From<&str> for Secret {
    fn from(s: &str) -> Self {
        Secret(s.as_bytes().to_vec())
    }
}

/// LUKS parameters of a new encrypted image (qemu-img's `encrypt.*` options).
pub use qcow2_crypto::luks::CreateParams as LuksParams;
/// What `qemu-img info` shows of a LUKS header.
pub use qcow2_crypto::luks::{Info as LuksInfo, SlotInfo as LuksSlotInfo};

/// Encryption of a new image.
#[derive(Debug, Clone)]
pub enum Encryption {
    /// `encrypt.format=luks`: a LUKS1 header in the image, data encrypted
    /// with its master key.
    Luks {
        /// Passphrase of key slot 0.
        secret: Secret,
        /// Cipher, mode, IV generator, hash, iteration time.
        params: LuksParams,
    },
    /// `encrypt.format=aes` (`encryption=on`): QEMU's legacy AES-CBC with a
    /// key made from the passphrase. For reading old images; weak.
    Aes {
        /// Passphrase.
        secret: Secret,
    },
}

/// How an image is encrypted, for `qemu-img info`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EncryptionInfo {
    /// Legacy AES (crypt method 1).
    Aes,
    /// LUKS (crypt method 2) and what its header says.
    Luks(LuksInfo),
}

/// Options of [`crate::Image::create`], named as qemu-img's `-o` options.
#[derive(Debug, Clone)]
pub struct CreateOptions {
    /// 2 (compat=0.10) or 3 (compat=1.1).
    pub version: u32,
    /// Cluster size in bytes (512..2 MiB, power of two).
    pub cluster_size: u64,
    /// Refcount width in bits (1, 2, 4, ..., 64).
    pub refcount_bits: u32,
    /// Extended L2 entries (subclusters).
    pub extended_l2: bool,
    /// Lazy refcounts.
    pub lazy_refcounts: bool,
    /// zstd instead of zlib for compressed clusters.
    pub zstd: bool,
    /// Backing file name, stored as given: bytes, need not be UTF-8
    /// (relative names are relative to the image's directory).
    pub backing_file: Option<Vec<u8>>,
    /// Backing file format (`qcow2`, `raw`).
    pub backing_format: Option<String>,
    /// Do not check that the backing file opens (qemu-img's `-u`).
    pub unsafe_backing: bool,
    /// Encrypt the image's data.
    pub encryption: Option<Encryption>,
    /// External data file name, stored as given (relative names are
    /// relative to the image's directory); the file is created (or
    /// truncated) with the virtual size.
    pub data_file: Option<String>,
    /// The data file is also a consistent raw image (`data_file_raw`).
    pub data_file_raw: bool,
}

impl Default for CreateOptions {
    fn default() -> Self {
        CreateOptions {
            version: 3,
            cluster_size: 65536,
            refcount_bits: 16,
            extended_l2: false,
            lazy_refcounts: false,
            zstd: false,
            backing_file: None,
            backing_format: None,
            unsafe_backing: false,
            encryption: None,
            data_file: None,
            data_file_raw: false,
        }
    }
}

/// Churn and cache counters (names are a contract shared with C and the CLI).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct Stats {
    /// L2 slice lookups served from the cache.
    pub l2_hits: u64,
    /// L2 slice lookups that read from the file.
    pub l2_misses: u64,
    /// Clean-to-dirty transitions of cached L2 slices.
    pub l2_dirty_marks: u64,
    /// L2 write calls.
    pub l2_writebacks: u64,
    /// Bytes of L2 tables written.
    pub l2_bytes_written: u64,
    /// Clean-to-dirty transitions of cached refcount block slices.
    pub refblock_dirty_marks: u64,
    /// Refcount block write calls.
    pub refblock_writebacks: u64,
    /// Bytes of refcount blocks written.
    pub refblock_bytes_written: u64,
    /// Cache flushes that wrote anything.
    pub cache_flushes: u64,
    /// fdatasync calls on the image file.
    pub file_syncs: u64,
    /// Guest data bytes written (including zero-fill fallbacks and COW).
    pub data_bytes_written: u64,
    /// Holes punched in the image file.
    pub holes_punched: u64,
    /// L2 entries already in the target state, left alone.
    pub zero_entries_skipped: u64,
}

/// One extent of the allocation map, as `qemu-img map --output=json` prints it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct MapEntry {
    /// Guest offset.
    pub start: u64,
    /// Length in bytes.
    pub length: u64,
    /// Layer of the backing chain that answered (0: this image).
    pub depth: u32,
    /// Allocated in some layer (reads do not fall off the chain).
    pub present: bool,
    /// Reads as zeroes.
    pub zero: bool,
    /// Has data (not zero-only).
    pub data: bool,
    /// Compressed cluster.
    pub compressed: bool,
    /// Host offset in the file of layer `depth`, where there is one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub offset: Option<u64>,
}

/// What `qemu-img info` shows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageInfo {
    /// Virtual size in bytes.
    pub virtual_size: u64,
    /// Cluster size in bytes.
    pub cluster_size: u64,
    /// 2 or 3.
    pub version: u32,
    /// Refcount width.
    pub refcount_bits: u32,
    /// Extended L2.
    pub extended_l2: bool,
    /// Lazy refcounts.
    pub lazy_refcounts: bool,
    /// `zlib` or `zstd`.
    pub compression_type: &'static str,
    /// Corrupt bit.
    pub corrupt: bool,
    /// Dirty bit.
    pub dirty: bool,
    /// Backing file name as stored: bytes, not necessarily UTF-8 (up to the
    /// first NUL; `None` also when the header gives an empty name).
    pub backing_file: Option<Vec<u8>>,
    /// Backing file format.
    pub backing_format: Option<String>,
    /// Backing file path as resolved (relative to the image's directory), bytes.
    pub full_backing_file: Option<Vec<u8>>,
    /// External data file name.
    pub data_file: Option<String>,
    /// The external data file is a consistent raw image too.
    pub data_file_raw: bool,
    /// Image file length.
    pub file_length: u64,
    /// Number of internal snapshots.
    pub snapshots: u32,
    /// How the data is encrypted (`None`: it is not).
    pub encryption: Option<EncryptionInfo>,
}

/// Repair mode of check.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum RepairMode {
    /// Report only.
    #[default]
    None,
    /// Repair leaked clusters.
    Leaks,
    /// Repair leaks and wrong refcounts.
    All,
}

/// Result of a consistency check, with qemu-img's counts.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CheckReport {
    /// Corruptions found (left after repair).
    pub corruptions: u64,
    /// Leaked clusters found (left after repair).
    pub leaks: u64,
    /// Errors that stopped parts of the check.
    pub check_errors: u64,
    /// Corruptions repaired.
    pub corruptions_fixed: u64,
    /// Leaks repaired.
    pub leaks_fixed: u64,
    /// First byte past the last used cluster.
    pub image_end_offset: u64,
    /// Guest clusters in the image.
    pub total_clusters: u64,
    /// Guest clusters allocated.
    pub allocated_clusters: u64,
    /// Guest clusters not contiguous with their predecessor.
    pub fragmented_clusters: u64,
    /// Compressed guest clusters.
    pub compressed_clusters: u64,
    /// One human-readable line per finding, in qemu-img's words.
    pub messages: Vec<String>,
}

/// Appends `e`, merging it into the last entry where qemu-img would.
pub(crate) fn push_merged(out: &mut Vec<MapEntry>, e: MapEntry) {
    if e.length == 0 {
        return;
    }
    if let Some(last) = out.last_mut() {
        let same = last.start + last.length == e.start
            && last.depth == e.depth
            && last.present == e.present
            && last.zero == e.zero
            && last.data == e.data
            && last.compressed == e.compressed
            && last.offset.is_some() == e.offset.is_some()
            && match (last.offset, e.offset) {
                (Some(a), Some(b)) => a + last.length == b,
                _ => true,
            };
        if same {
            last.length += e.length;
            return;
        }
    }
    out.push(e);
}
