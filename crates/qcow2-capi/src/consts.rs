//! The constants of the C interface (literal values: cbindgen copies them
//! into the header).

/// Major version of the library; the shared object's SONAME is `libqcow2.so.<major>`.
/// Kept equal to the crate version by a test.
pub const QCOW2_VERSION_MAJOR: u32 = 0;
/// Minor version of the library (new functions, compatible changes).
pub const QCOW2_VERSION_MINOR: u32 = 1;
/// Patch version of the library.
pub const QCOW2_VERSION_PATCH: u32 = 0;

/// Open flag: open read-write (without it the image is read-only and writes fail with -EROFS).
pub const QCOW2_OPEN_RDWR: u32 = 0x1;
/// Open flag: discard mode `unmap` (without it: `ignore`, discard is a no-op
/// and QCOW2_REQ_MAY_UNMAP is cleared from every write-zeroes request).
pub const QCOW2_OPEN_UNMAP: u32 = 0x2;
/// Open flag: do not open the backing chain (unallocated clusters read as zeroes).
pub const QCOW2_OPEN_NO_BACKING: u32 = 0x4;
/// Open flag: cache mode `writethrough` (every request is durable before it returns).
/// No QCOW2_OPEN_CACHE_* flag means `writeback`; the only combination allowed
/// is QCOW2_OPEN_CACHE_NONE | QCOW2_OPEN_CACHE_WRITETHROUGH, qemu's `directsync`
/// (O_DIRECT on the image file and every request durable before it returns).
pub const QCOW2_OPEN_CACHE_WRITETHROUGH: u32 = 0x10;
/// Open flag: cache mode `unsafe` (flushes write back caches but never sync).
pub const QCOW2_OPEN_CACHE_UNSAFE: u32 = 0x20;
/// Open flag: cache mode `none` (O_DIRECT on the image file, writeback otherwise).
/// With QCOW2_OPEN_CACHE_WRITETHROUGH: `directsync`.
pub const QCOW2_OPEN_CACHE_NONE: u32 = 0x40;
/// Open flag: lazy refcounts on, whatever the header says (QEMU's
/// `lazy-refcounts=on`; v3 images only, else -EINVAL): the first write
/// that allocates marks the image dirty, refcount blocks are written at
/// close or flush-for-close only, and a crash leaves a dirty image that the
/// next read-write open repairs.
pub const QCOW2_OPEN_LAZY_REFCOUNTS: u32 = 0x80;
/// Open flag: lazy refcounts off even when the header enables them
/// (QEMU's `lazy-refcounts=off`). Not with QCOW2_OPEN_LAZY_REFCOUNTS.
pub const QCOW2_OPEN_NO_LAZY_REFCOUNTS: u32 = 0x100;
/// Open flag: also protect the L2 tables of internal snapshots from writes
/// (QEMU's `overlap-check.inactive-l2=on`); while a snapshot's L1 table
/// cannot be read, every write fails with -EINVAL or -EFBIG as in QEMU.
pub const QCOW2_OPEN_OVERLAP_INACTIVE_L2: u32 = 0x200;
/// Every open flag known; other bits make qcow2_open fail with -EINVAL.
pub const QCOW2_OPEN_KNOWN: u32 = QCOW2_OPEN_RDWR
    | QCOW2_OPEN_UNMAP
    | QCOW2_OPEN_NO_BACKING
    | QCOW2_OPEN_CACHE_WRITETHROUGH
    | QCOW2_OPEN_CACHE_UNSAFE
    | QCOW2_OPEN_CACHE_NONE
    | QCOW2_OPEN_LAZY_REFCOUNTS
    | QCOW2_OPEN_NO_LAZY_REFCOUNTS
    | QCOW2_OPEN_OVERLAP_INACTIVE_L2;

/// Request flag (write-zeroes): the zeroed range may be deallocated (QEMU's BDRV_REQ_MAY_UNMAP).
pub const QCOW2_REQ_MAY_UNMAP: u32 = 0x4;
/// Request flag (write, write-zeroes): the data is durable when the call returns (BDRV_REQ_FUA).
pub const QCOW2_REQ_FUA: u32 = 0x10;
/// Request flag (write): store whole clusters compressed with the image's
/// compression type, as QEMU's `write -c` (BDRV_REQ_WRITE_COMPRESSED): offset
/// and length cluster aligned (the image's last cluster may be short), else
/// -EINVAL; -EIO for a cluster that already has a host cluster; a cluster that
/// does not compress is written normally.
pub const QCOW2_REQ_COMPRESSED: u32 = 0x20;
/// Request flag (write-zeroes): fail with -ENOTSUP rather than write zero data (BDRV_REQ_NO_FALLBACK).
pub const QCOW2_REQ_NO_FALLBACK: u32 = 0x100;

/// Compression type for Qcow2CreateOptions.compression_type: zlib (the default).
pub const QCOW2_COMPRESSION_ZLIB: u32 = 0;
/// Compression type for Qcow2CreateOptions.compression_type: zstd (v3 only).
pub const QCOW2_COMPRESSION_ZSTD: u32 = 1;

/// Extent flag: allocated in some layer of the chain (reads do not fall off the chain).
pub const QCOW2_EXTENT_ALLOCATED: u32 = 0x1;
/// Extent flag: the extent reads as zeroes.
pub const QCOW2_EXTENT_ZERO: u32 = 0x2;
/// Extent flag: the extent has data (not zero-only).
pub const QCOW2_EXTENT_DATA: u32 = 0x4;
/// Extent flag: compressed clusters.
pub const QCOW2_EXTENT_COMPRESSED: u32 = 0x8;
/// Extent flag: Qcow2Extent.host_offset is valid.
pub const QCOW2_EXTENT_OFFSET_VALID: u32 = 0x10;

/// Resize flag: allow shrinking (everything beyond the new end is discarded),
/// like `qemu-img resize --shrink`; without it a smaller size fails with -EINVAL.
pub const QCOW2_RESIZE_SHRINK: u32 = 0x1;
/// Preallocation mode of qcow2_resize: nothing is allocated for the new area.
pub const QCOW2_PREALLOC_OFF: u32 = 0;
/// Preallocation mode of qcow2_resize: L2 tables and data clusters are allocated for the new area.
pub const QCOW2_PREALLOC_METADATA: u32 = 1;
/// Preallocation mode of qcow2_resize: as metadata, and zeroes written to the new data clusters (as FULL).
pub const QCOW2_PREALLOC_FALLOC: u32 = 2;
/// Preallocation mode of qcow2_resize: as metadata, and zeroes written to the new data clusters.
pub const QCOW2_PREALLOC_FULL: u32 = 3;

/// Qcow2AmendOptions.lazy_refcounts: keep the current setting (the zero value).
pub const QCOW2_AMEND_LAZY_KEEP: u32 = 0;
/// Qcow2AmendOptions.lazy_refcounts: turn lazy refcounts off.
pub const QCOW2_AMEND_LAZY_OFF: u32 = 1;
/// Qcow2AmendOptions.lazy_refcounts: turn lazy refcounts on (v3 only).
pub const QCOW2_AMEND_LAZY_ON: u32 = 2;

/// Encryption (qcow2_get_encryption): the image is not encrypted.
pub const QCOW2_ENCRYPT_NONE: u32 = 0;
/// Encryption: QEMU's legacy AES-CBC (crypt method 1), a key made from the
/// passphrase. Weak; for old images.
pub const QCOW2_ENCRYPT_AES: u32 = 1;
/// Encryption: LUKS (crypt method 2), `encrypt.format=luks`.
pub const QCOW2_ENCRYPT_LUKS: u32 = 2;

/// Qcow2ConvertOptions.flags: write every cluster that is not all zeroes
/// compressed, with the target's compression type (as `qemu-img convert -c`);
/// all-zero clusters are zeroed (or skipped with
/// QCOW2_CONVERT_TARGET_IS_ZERO). Clusters of the target that already have a
/// host cluster fail with -EIO, so the target should be empty.
pub const QCOW2_CONVERT_COMPRESS: u32 = 0x1;
/// Qcow2ConvertOptions.flags: the target already reads as zeroes
/// everywhere (`qemu-img convert --target-is-zero`): ranges that read as
/// zeroes in the source are not written at all.
pub const QCOW2_CONVERT_TARGET_IS_ZERO: u32 = 0x2;
/// Qcow2ConvertOptions.flags: copy only what the source allocates in its own
/// top layer (as `qemu-img convert -B`): ranges it leaves to its backing
/// chain are not written, so a target whose backing file holds the same data
/// as the source's reads the same. Without it the whole chain is copied.
pub const QCOW2_CONVERT_TOP_ONLY: u32 = 0x4;
/// Every Qcow2ConvertOptions flag known; other bits: -EINVAL.
pub const QCOW2_CONVERT_KNOWN: u32 =
    QCOW2_CONVERT_COMPRESS | QCOW2_CONVERT_TARGET_IS_ZERO | QCOW2_CONVERT_TOP_ONLY;
/// Qcow2ConvertOptions.sparse_size: write every byte, zeroes included, as
/// data (`qemu-img convert -S 0`: a fully allocated target).
pub const QCOW2_CONVERT_SPARSE_NONE: u64 = u64::MAX;

/// qcow2_commit flag: keep the top image's data after committing it (as
/// `qemu-img commit -d`); without it the top image is emptied.
pub const QCOW2_COMMIT_KEEP_TOP: u32 = 0x1;
/// Every qcow2_commit flag known; other bits: -EINVAL.
pub const QCOW2_COMMIT_KNOWN: u32 = QCOW2_COMMIT_KEEP_TOP;

/// qcow2_rebase flag: only the header changes, no data is copied (as
/// `qemu-img rebase -u`; the same as qcow2_set_backing).
pub const QCOW2_REBASE_UNSAFE: u32 = 0x1;
/// Every qcow2_rebase flag known; other bits: -EINVAL.
pub const QCOW2_REBASE_KNOWN: u32 = QCOW2_REBASE_UNSAFE;
