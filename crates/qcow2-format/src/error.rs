//! Errors of the format layer.

use thiserror::Error;

/// Why on-disk data could not be accepted.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum FormatError {
    /// The first bytes are not `QFI\xfb`.
    #[error("not a qcow2 image (bad magic)")]
    BadMagic,
    /// Version other than 2 or 3.
    #[error("unsupported qcow2 version {0}")]
    UnsupportedVersion(u32),
    /// The buffer is shorter than the structure it should hold.
    #[error("truncated {0}")]
    Truncated(&'static str),
    /// A field holds a value outside its valid range.
    #[error("invalid {field}: {detail}")]
    Invalid {
        /// Name of the offending field.
        field: &'static str,
        /// What is wrong with it.
        detail: String,
    },
    /// Incompatible feature bits this implementation does not know.
    #[error("unsupported incompatible feature(s): {0}")]
    UnknownIncompatible(String),
    /// A feature that is known but not supported.
    #[error("unsupported feature: {0}")]
    Unsupported(String),
    /// A header QEMU refuses, with QEMU's own words for it (what its tools
    /// print, e.g. "Reference count table offset invalid").
    #[error("{0}")]
    Qemu(String),
}

impl FormatError {
    /// Shorthand for [`FormatError::Invalid`].
    pub fn invalid(field: &'static str, detail: impl Into<String>) -> Self {
        FormatError::Invalid {
            field,
            detail: detail.into(),
        }
    }
}
