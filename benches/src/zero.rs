//! Zeroing that changes entries: data clusters with and without MAY_UNMAP,
//! and unallocated space (L2 tables allocated). Each operation ends with a
//! flush, so the writeback and the syncs are part of the time.

use crate::{fill_data, zero_in_gib_requests, Result, Scenario, Sizes, Template, CLUSTER, GIB};
use qcow2_ops::{Image, REQ_MAY_UNMAP};

/// Area name.
pub const AREA: &str = "zero";

/// `data_keep` (data → zero-alloc), `data_unmap` (data → zero-plain, clusters
/// freed and punched), `unallocated` (1 GiB requests over unallocated space).
pub fn scenarios(sizes: &Sizes) -> Result<Vec<Scenario>> {
    let d = sizes.data_bytes;
    let a = sizes.alloc_bytes;
    let data = Template::build(4 * GIB, move |img| fill_data(img, 0, d))?;
    let empty = Template::build(a * 4, |_| Ok(()))?;
    let warm = |img: &Image| img.read(0, &mut [0u8; 512]);
    Ok(vec![
        Scenario::new(AREA, "data_keep", d / CLUSTER, &data, move |img| {
            img.write_zeroes(0, d, 0)?;
            img.flush()
        })
        .warm(warm),
        Scenario::new(AREA, "data_unmap", d / CLUSTER, &data, move |img| {
            img.write_zeroes(0, d, REQ_MAY_UNMAP)?;
            img.flush()
        })
        .warm(warm),
        Scenario::new(AREA, "unallocated", a / CLUSTER, &empty, move |img| {
            zero_in_gib_requests(img, 0, a, 0)?;
            img.flush()
        }),
    ])
}
