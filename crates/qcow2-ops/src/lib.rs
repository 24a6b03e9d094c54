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
mod meta;
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
pub use image::Image;
pub use qcow2_format as format;
pub use qcow2_io as io;
pub use resize::Prealloc;
pub use snapshots::SnapshotInfo;
pub use types::*;
