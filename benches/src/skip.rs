//! The already-zero skip path: write-zeroes over entries that are already in
//! the target state and cached. Nothing may be dirtied, written or synced;
//! the figure of merit is time per L2 entry.

use crate::{fill_data, zero_in_gib_requests, Result, Scenario, Sizes, Template, CLUSTER, GIB};
use qcow2_ops::{Image, REQ_MAY_UNMAP};

/// Area name.
pub const AREA: &str = "skip";

/// `already_zero` (zero-plain entries, no flags), `already_zero_unmap`
/// (same with MAY_UNMAP), `zero_alloc` (zero flag with host offset, no
/// flags), `one_cluster` (per-request overhead).
pub fn scenarios(sizes: &Sizes) -> Result<Vec<Scenario>> {
    let n = sizes.skip_bytes;
    let d = sizes.data_bytes;
    // The state after the allocation pass of the demo: zero-plain entries everywhere.
    let plain = Template::build(n, move |img| zero_in_gib_requests(img, 0, n, 0))?;
    // Data zeroed without unmap: zero flag, host offsets kept.
    let zalloc = Template::build(4 * GIB, move |img| {
        fill_data(img, 0, d)?;
        img.write_zeroes(0, d, 0)
    })?;
    let rescan = move |img: &Image| zero_in_gib_requests(img, 0, n, 0);
    Ok(vec![
        Scenario::new(AREA, "already_zero", n / CLUSTER, &plain, rescan)
            .warm(rescan)
            .reusable(),
        Scenario::new(
            AREA,
            "already_zero_unmap",
            n / CLUSTER,
            &plain,
            move |img| zero_in_gib_requests(img, 0, n, REQ_MAY_UNMAP),
        )
        .warm(rescan)
        .reusable(),
        Scenario::new(AREA, "zero_alloc", d / CLUSTER, &zalloc, move |img| {
            img.write_zeroes(0, d, 0)
        })
        .warm(move |img| img.write_zeroes(0, d, 0))
        .reusable(),
        Scenario::new(AREA, "one_cluster", 1, &plain, |img| {
            img.write_zeroes(0, CLUSTER, 0)
        })
        .warm(rescan)
        .reusable(),
    ])
}
