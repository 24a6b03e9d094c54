//! Discard: of data clusters (freed, punched, written back, synced) and of
//! entries that are already zero (nothing to do).

use crate::{fill_data, zero_in_gib_requests, Result, Scenario, Sizes, Template, CLUSTER, GIB};
use qcow2_ops::Image;

/// Area name.
pub const AREA: &str = "discard";

/// `data` (discard data clusters, then flush), `already_zero` (discard over
/// zero-plain entries: left alone).
pub fn scenarios(sizes: &Sizes) -> Result<Vec<Scenario>> {
    let d = sizes.data_bytes;
    let n = sizes.skip_bytes;
    let data = Template::build(4 * GIB, move |img| fill_data(img, 0, d))?;
    let plain = Template::build(n, move |img| zero_in_gib_requests(img, 0, n, 0))?;
    let discard_all = move |img: &Image| {
        let mut at = 0;
        while at < n {
            img.discard(at, GIB.min(n - at))?;
            at += GIB;
        }
        Ok(())
    };
    Ok(vec![
        Scenario::new(AREA, "data", d / CLUSTER, &data, move |img| {
            img.discard(0, d)?;
            img.flush()
        })
        .warm(|img| img.read(0, &mut [0u8; 512])),
        Scenario::new(AREA, "already_zero", n / CLUSTER, &plain, discard_all)
            .warm(discard_all)
            .reusable(),
    ])
}
