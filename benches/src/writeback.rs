//! Writeback of sparse dirty ranges: one entry changed in each of many cached
//! L2 tables, then a flush. Only the dirty granule of each slice should be
//! written.

use crate::{Result, Scenario, Sizes, Template, CLUSTER, L2_SPAN};
use qcow2_ops::{Image, OpenOptions};

/// Area name.
pub const AREA: &str = "writeback";

/// `sparse`: write-zeroes of one unallocated cluster per L2 table (each
/// becomes zero-plain), then flush.
pub fn scenarios(sizes: &Sizes) -> Result<Vec<Scenario>> {
    let t = sizes.sparse_tables;
    // One data cluster at the start of each table, so every table exists.
    let sparse = Template::build(t * L2_SPAN, move |img| {
        let buf = vec![0x5au8; CLUSTER as usize];
        (0..t).try_for_each(|i| img.write(i * L2_SPAN, &buf, 0))
    })?;
    let opts = OpenOptions {
        l2_cache_bytes: (t * CLUSTER).max(OpenOptions::DEFAULT_L2_CACHE as u64) as usize,
        ..OpenOptions::read_write()
    };
    Ok(vec![Scenario::new(
        AREA,
        "sparse",
        t,
        &sparse,
        move |img: &Image| {
            for i in 0..t {
                img.write_zeroes(i * L2_SPAN + CLUSTER, CLUSTER, 0)?;
            }
            img.flush()
        },
    )
    .options(opts)
    .warm(move |img| {
        (0..t).try_for_each(|i| img.read(i * L2_SPAN, &mut [0u8; 512]))
    })])
}
