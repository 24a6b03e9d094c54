//! The qcow2 image: open, create, read, write, write-zeroes, discard, flush,
//! block status, check and repair. This is the Rust API of the engine.
//!
//! An [`Image`] is `Send + Sync`: every method takes `&self`, and requests
//! from many threads run in parallel (see [`Image`] for how they share it).
#![forbid(unsafe_code)]
#![warn(missing_docs)]

mod alloc;
mod amend;
mod backing;
mod backing_change;
mod bitmaps;
mod check;
mod compress;
mod copy;
mod create;
mod crypt;
mod datafile;
mod datapath;
mod durability;
mod error;
mod frees;
mod image;
mod jsonopts;
mod meta;
mod nested;
mod resize;
mod shadow;
mod snapshots;
mod status;
mod types;
mod vmstate;
mod writeback;
mod zero;

pub use amend::AmendOptions;
pub use bitmaps::{BitmapInfo, BitmapOp};
pub use copy::{
    commit_into, convert, rebase_into, ConvertOptions, CopySource, CopyTarget, ProgressFn,
    SourceExtent, COPY_CHUNK, DEFAULT_SPARSE_SIZE, MAX_SPARSE_SIZE,
};
pub use error::{Error, Result};
pub use image::{Image, MapPiece, MappedRead, MappedWrite};
pub use jsonopts::json_options;
pub use qcow2_format as format;
pub use qcow2_io as io;
pub use resize::Prealloc;
pub use snapshots::SnapshotInfo;
pub use types::*;

/// The debug events (QEMU's blkdebug event names) this engine reports to
/// the storage of the image file, at the points where QEMU's qcow2 driver
/// reports them: error-injection rules can name these. Of QEMU's other
/// events, the block layer's own (`pwritev`, `pwritev_done`,
/// `flush_to_os`, `flush_to_disk`) are reported by the error-injecting
/// storage itself ([`io::Blkdebug`]) and `cor_write` by a device reading
/// with copy-on-read; `cluster_alloc_space` (zeroing a new cluster before
/// a partial write), `pwritev_zero` and the read-modify-write events of
/// aligned requests have no counterpart here, so a rule naming one could
/// never act.
pub const DEBUG_EVENTS: &[io::DebugEvent] = {
    use io::DebugEvent::*;
    &[
        L1Update,
        L1GrowAllocTable,
        L1GrowWriteTable,
        L1GrowActivateTable,
        L2Load,
        L2Update,
        L2UpdateCompressed,
        L2AllocCowRead,
        L2AllocWrite,
        ReadAio,
        ReadBackingAio,
        ReadCompressed,
        WriteAio,
        WriteCompressed,
        VmstateLoad,
        VmstateSave,
        CowRead,
        CowWrite,
        ReftableLoad,
        ReftableGrow,
        ReftableUpdate,
        RefblockLoad,
        RefblockUpdatePart,
        RefblockAlloc,
        RefblockAllocHookup,
        RefblockAllocWrite,
        RefblockAllocWriteBlocks,
        RefblockAllocWriteTable,
        RefblockAllocSwitchTable,
        ClusterAlloc,
        ClusterAllocBytes,
        ClusterFree,
        EmptyImagePrepare,
        L1ShrinkWriteTable,
        L1ShrinkFreeL2Clusters,
    ]
};

/// Whether an error-injection layer under the image file can act on a rule
/// for `e`: the engine reports it ([`DEBUG_EVENTS`]), the layer reports it
/// itself, or it is one of the two events QEMU never reports either
/// (`refblock_update`, `none`), accepted as QEMU accepts them.
pub fn blkdebug_accepts(e: io::DebugEvent) -> bool {
    DEBUG_EVENTS.contains(&e)
        || io::Blkdebug::<io::MemStorage>::OWN_EVENTS.contains(&e)
        || matches!(e, io::DebugEvent::RefblockUpdate | io::DebugEvent::None)
}
