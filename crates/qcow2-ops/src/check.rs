//! Consistency check and repair (placeholder until the full walk lands).

use crate::error::{Error, Result};
use crate::image::Inner;
use crate::types::{CheckReport, RepairMode};

pub(crate) fn check(inner: &mut Inner, repair: RepairMode) -> Result<CheckReport> {
    let _ = (inner, repair);
    Err(Error::NotSupported("check is not implemented yet".into()))
}
