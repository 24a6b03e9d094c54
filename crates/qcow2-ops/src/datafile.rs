//! External data files (incompatible feature bit 2): guest data lives in a
//! second file, at host offset = guest offset, not refcounted; the qcow2
//! file holds only metadata. With the raw bit (autoclear bit 1) the data
//! file is also a consistent raw image: zeroes and discards reach it too.
//!
//! What differs from an ordinary image is small and lives in few places:
//! where data is read and written (`Io::data`), what "allocated" means
//! (`L2Entry::has_host`: offset 0 is a valid host offset here, told by the
//! COPIED flag), allocation (the guest cluster's own offset, no refcount),
//! and that the data file is synced with the image file.

use crate::error::{Error, Result};
use crate::types::OpenOptions;
use qcow2_format::header::Header;
use qcow2_io::{FileStorage, OpenMode, Storage};
use std::path::Path;
use std::sync::Arc;

/// Opens the data file of `h` (named by `opts.data_file`, else by the
/// header's extension, relative to the image's directory). `None` when the
/// image has none, or when opened for metadata only.
pub(crate) fn open(
    image: &Path,
    h: &Header,
    name: &str,
    opts: &OpenOptions,
) -> Result<Option<Arc<dyn Storage>>> {
    if !h.has_data_file() {
        if opts.data_file.is_some() {
            return Err(Error::Invalid(format!(
                "'{name}': 'data-file' can only be set for images with an external data file"
            )));
        }
        return Ok(None);
    }
    if opts.metadata_only {
        return Ok(None);
    }
    if let Some(src) = &opts.data_file_storage {
        let f =
            (src.0)().map_err(|e| Error::io(format!("{name}: could not open the data file"), e))?;
        let f = qcow2_io::StickySync::new(f, !opts.cache.direct());
        return Ok(Some(Arc::new(f)));
    }
    // The name as given, for messages (QEMU's).
    let given = match (&opts.data_file, h.data_file()) {
        (Some(p), _) => p.display().to_string(),
        (None, Some(n)) => n.clone(),
        (None, None) => String::new(),
    };
    let path = match (&opts.data_file, h.data_file()) {
        (Some(p), _) => p.clone(),
        (None, Some(n)) => crate::backing::resolve(image, n.as_bytes()),
        (None, None) => {
            // QEMU's words, without the image name (EINVAL).
            let _ = name;
            return Err(Error::Format(qcow2_format::FormatError::Qemu(
                "'data-file' is required for this image".into(),
            )));
        }
    };
    let mode = OpenMode {
        writable: opts.writable,
        direct: opts.cache.direct(),
        create: false,
    };
    let f = FileStorage::open(&path, mode)
        .map_err(|e| Error::io(format!("Could not open '{given}'"), e))?;
    let mut f: Box<dyn Storage> = Box::new(f);
    if let Some(layer) = &opts.data_file_layer {
        f = (layer.0)(f);
    }
    let f = qcow2_io::StickySync::new(f, !opts.cache.direct());
    Ok(Some(Arc::new(f)))
}

impl crate::image::Inner {
    /// With a raw external data file, zeroes written to the guest range are
    /// written to the data file first (it must read as the guest does), as
    /// QEMU does before it changes the metadata.
    pub(crate) fn zero_raw_data_file(&mut self, offset: u64, len: u64) -> Result<()> {
        let raw =
            self.header.autoclear_features & qcow2_format::header::AUTOCLEAR_DATA_FILE_RAW != 0;
        let Some(d) = self.data.clone().filter(|_| raw) else {
            return Ok(());
        };
        const CHUNK: u64 = 1 << 20;
        let zeros = vec![0u8; CHUNK.min(len) as usize];
        let mut pos = offset;
        while pos < offset + len {
            let n = CHUNK.min(offset + len - pos);
            d.write_at(&zeros[..n as usize], pos)
                .map_err(crate::error::ioerr(
                    "write zeroes to the data file",
                    &self.name,
                ))?;
            pos += n;
        }
        self.sh.dur.wrote();
        Ok(())
    }
}
