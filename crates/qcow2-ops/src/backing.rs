//! Backing files: qcow2 images (opened read-only, recursively) or raw files.

use crate::error::{Error, Result};
use crate::image::{ioerr, Inner};
use crate::types::OpenOptions;
use qcow2_io::{FileStorage, OpenMode, Storage};
use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

/// Deepest backing chain accepted.
const MAX_CHAIN: usize = 16;

/// One backing layer.
pub(crate) enum Backing {
    /// A qcow2 image.
    Qcow2(Box<Inner>),
    /// A raw file: guest offset == file offset.
    Raw { file: FileStorage, size: u64 },
}

/// Backing file path relative to the directory of the image that names it.
/// The name is bytes, as stored in the image (need not be UTF-8).
pub(crate) fn resolve(image: &Path, name: &[u8]) -> PathBuf {
    let p = Path::new(OsStr::from_bytes(name));
    if p.is_absolute() {
        return p.to_path_buf();
    }
    match image.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.join(p),
        _ => p.to_path_buf(),
    }
}

thread_local! {
    static DEPTH: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
}

impl Backing {
    pub(crate) fn open(image: &Path, name: &[u8], format: Option<&str>) -> Result<Backing> {
        let path = resolve(image, name);
        let shown = path.display().to_string();
        let file = FileStorage::open(&path, OpenMode::READ_ONLY)
            .map_err(|e| Error::io(format!("could not open backing file '{shown}'"), e))?;
        let fmt = match format {
            Some(f) => f.to_string(),
            None => {
                let mut m = [0u8; 4];
                file.read_at(&mut m, 0).map_err(ioerr("read", &shown))?;
                if &m == b"QFI\xfb" { "qcow2" } else { "raw" }.to_string()
            }
        };
        match fmt.as_str() {
            "raw" => {
                let size = file.len().map_err(ioerr("stat", &shown))?;
                Ok(Backing::Raw { file, size })
            }
            "qcow2" => {
                let depth = DEPTH.with(|d| d.get());
                if depth >= MAX_CHAIN {
                    return Err(Error::Invalid(format!(
                        "backing chain deeper than {MAX_CHAIN} at '{shown}'"
                    )));
                }
                DEPTH.with(|d| d.set(depth + 1));
                let r = Inner::open_storage(Box::new(file), &path, &OpenOptions::read_only());
                DEPTH.with(|d| d.set(depth));
                Ok(Backing::Qcow2(Box::new(r?)))
            }
            other => Err(Error::NotSupported(format!(
                "backing file format '{other}' of '{shown}'"
            ))),
        }
    }

    /// Virtual size of the layer.
    pub(crate) fn size(&self) -> u64 {
        match self {
            Backing::Qcow2(i) => i.header.size,
            Backing::Raw { size, .. } => *size,
        }
    }

    /// Reads from the layer; bytes past its end read as zeroes.
    pub(crate) fn read(&mut self, offset: u64, buf: &mut [u8]) -> Result<()> {
        let size = self.size();
        let avail = size.saturating_sub(offset).min(buf.len() as u64) as usize;
        buf[avail..].fill(0);
        if avail == 0 {
            return Ok(());
        }
        match self {
            Backing::Qcow2(i) => i.read(offset, &mut buf[..avail]),
            Backing::Raw { file, .. } => file
                .read_at(&mut buf[..avail], offset)
                .map_err(|e| Error::io("read backing file", e)),
        }
    }
}
