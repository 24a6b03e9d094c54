//! L2 cache hit and miss paths, through 4 KiB reads.

use crate::{
    fill_data, zero_in_gib_requests, Result, Scenario, Sizes, Template, CLUSTER, GIB, L2_SPAN,
};
use qcow2_ops::OpenOptions;
use std::sync::atomic::{AtomicU64, Ordering};

/// Area name.
pub const AREA: &str = "cache";

/// `read_hit_data` (4 KiB of a data cluster, slice cached),
/// `read_hit_zero` (4 KiB of a zero-plain cluster: no data I/O),
/// `read_miss` (4 KiB of an unallocated cluster in a table that is not
/// cached: the cache holds 4 slices and the reads cycle through more tables).
pub fn scenarios(sizes: &Sizes) -> Result<Vec<Scenario>> {
    let d = sizes.data_bytes;
    let t = sizes.miss_tables;
    let data = Template::build(4 * GIB, move |img| fill_data(img, 0, d))?;
    let plain = Template::build(GIB, |img| zero_in_gib_requests(img, 0, GIB, 0))?;
    let tables = Template::build(t * L2_SPAN, move |img| {
        let buf = vec![0x5au8; CLUSTER as usize];
        (0..t).try_for_each(|i| img.write(i * L2_SPAN, &buf, 0))
    })?;
    let read4k = |img: &qcow2_ops::Image| img.read(0, &mut [0u8; 4096]);
    let next = AtomicU64::new(0);
    let small = OpenOptions {
        l2_cache_bytes: 4 * CLUSTER as usize,
        ..OpenOptions::read_write()
    };
    Ok(vec![
        Scenario::new(AREA, "read_hit_data", 1, &data, read4k)
            .warm(read4k)
            .reusable(),
        Scenario::new(AREA, "read_hit_zero", 1, &plain, read4k)
            .warm(read4k)
            .reusable(),
        Scenario::new(AREA, "read_miss", 1, &tables, move |img| {
            let i = next.fetch_add(1, Ordering::Relaxed) % t;
            img.read(i * L2_SPAN + CLUSTER, &mut [0u8; 4096])
        })
        .options(small)
        .reusable(),
    ])
}
