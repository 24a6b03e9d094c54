//! The error type of the image layer; every error maps to one negative errno.

use qcow2_format::FormatError;
use std::io;
use thiserror::Error;

/// Marks the context of an error of the pre-write overlap check.
pub(crate) const OVERLAP_CHECK: &str = ": overlap check: ";

/// What went wrong in an image operation.
#[derive(Debug, Error)]
pub enum Error {
    /// The underlying file failed.
    #[error("{context}: {source}")]
    Io {
        /// What was being done.
        context: String,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// On-disk data failed validation.
    #[error("{0}")]
    Format(#[from] FormatError),
    /// The header of a named image failed validation.
    #[error("'{image}': {source}")]
    BadHeader {
        /// The image.
        image: String,
        /// What is wrong.
        #[source]
        source: FormatError,
    },
    /// A caller argument is wrong (bad flags, range past the end, ...).
    #[error("invalid argument: {0}")]
    Invalid(String),
    /// The request is valid but cannot be done this way (e.g. NO_FALLBACK).
    #[error("operation not supported: {0}")]
    NotSupported(String),
    /// Write on an image opened read-only (or turned read-only after corruption).
    #[error("'{0}' is read-only")]
    ReadOnly(String),
    /// Metadata is inconsistent; the image was marked corrupt.
    #[error("image is corrupt: {0}")]
    Corrupt(String),
    /// No space left (file too large, refcount overflow, table limits).
    #[error("no space: {0}")]
    NoSpace(String),
    /// An encrypted image cannot be unlocked: no secret, or a wrong one.
    /// The message is QEMU's ("Invalid password, cannot unlock any keyslot").
    #[error("{0}")]
    Key(String),
    /// A dirty image (lazy refcounts left stale) could not be repaired on
    /// read-write open; `messages` are what the check found and did (QEMU
    /// prints them on stderr before its error).
    #[error("Could not repair dirty image: Input/output error")]
    DirtyRepair {
        /// The check's messages.
        messages: Vec<String>,
    },
}

impl Error {
    /// The negative errno for C callers.
    pub fn errno(&self) -> i32 {
        -match self {
            Error::Io { source, .. } => source.raw_os_error().unwrap_or(libc::EIO),
            Error::Format(f) | Error::BadHeader { source: f, .. } => match f {
                FormatError::UnknownIncompatible(_)
                | FormatError::Unsupported(_)
                | FormatError::UnsupportedVersion(_) => libc::ENOTSUP,
                _ => libc::EINVAL,
            },
            Error::Invalid(_) => libc::EINVAL,
            Error::NotSupported(_) => libc::ENOTSUP,
            Error::ReadOnly(_) => libc::EROFS,
            Error::Corrupt(_) | Error::DirtyRepair { .. } => libc::EIO,
            Error::NoSpace(_) => libc::ENOSPC,
            Error::Key(_) => libc::EACCES,
        }
    }
    /// Whether a write was refused by the pre-write metadata check
    /// ([`crate::OpenOptions::overlap_inactive_l2`] with an unreadable
    /// snapshot L1 table)
    /// rather than failed by the storage: a flush of the file would still
    /// succeed.
    pub fn is_overlap_check(&self) -> bool {
        matches!(self, Error::Io { context, .. } if context.contains(OVERLAP_CHECK))
    }

    /// Wraps an I/O error with context.
    pub fn io(context: impl Into<String>, source: io::Error) -> Self {
        Error::Io {
            context: context.into(),
            source,
        }
    }
}

/// Result alias.
pub type Result<T> = std::result::Result<T, Error>;

/// Maps an I/O error of the file `name` while doing `ctx` to [`Error::Io`].
/// The message is built only when an error occurs (this sits on every
/// data read and write).
pub(crate) fn ioerr<'a>(ctx: &'a str, name: &'a str) -> impl FnOnce(std::io::Error) -> Error + 'a {
    move |e| Error::io(format!("{name}: {ctx}"), e)
}
