//! Changing the backing file name and format recorded in the header (what
//! `qemu-img rebase -u` does, and the last step of a safe rebase).
//!
//! The header, its extensions and the backing file name all live in the
//! first cluster. The new header area is serialised in memory, checked to
//! fit, and written with one write at offset 0, then synced: a power loss
//! leaves either the old header or the new one (the write of one cluster
//! at offset 0 is the commit point, as for the bitmap directory switch).

use crate::error::{Error, Result};
use crate::image::{ioerr, Image};
use qcow2_format::header::{Extension, EXT_BACKING_FORMAT};

impl Image {
    /// Records `name` as the backing file and `format` as its format
    /// (`None` name: no backing file, and the format extension is dropped).
    /// Only the header changes; the data is not touched. When the image
    /// was opened with its backing chain, the new chain is opened after
    /// the header is durable (failing to open it is not an error here: the
    /// image then reads as if it had no backing file until reopened).
    pub fn set_backing(&self, name: Option<&[u8]>, format: Option<&str>) -> Result<()> {
        let mut g = self.exclusive();
        g.check_writable()?;
        let image = g.name.clone();
        let name = name.filter(|n| !n.is_empty());
        if let Some(n) = name {
            if n.len() > 1023 {
                return Err(Error::Invalid(format!(
                    "'{image}': backing file name longer than 1023 bytes"
                )));
            }
            if n.contains(&0) {
                return Err(Error::Invalid(format!(
                    "'{image}': backing file name contains a NUL byte"
                )));
            }
        }
        let mut h = g.header.clone();
        h.extensions.retain(|e| e.kind != EXT_BACKING_FORMAT);
        if let (Some(_), Some(f)) = (name, format) {
            // QEMU writes the backing format extension first.
            h.extensions.insert(
                0,
                Extension {
                    kind: EXT_BACKING_FORMAT,
                    data: f.as_bytes().to_vec(),
                },
            );
        }
        h.backing_file = name.map(|n| n.to_vec());
        // Header, extensions and name must fit in the first cluster.
        let buf = h.serialize().map_err(|e| {
            Error::NoSpace(format!("'{image}': no space left in the file header: {e}"))
        })?;
        // Everything written before must be durable before the header
        // switches the chain the unallocated clusters read through.
        g.sync()?;
        g.file
            .write_at(&buf, 0)
            .map_err(ioerr("write header", &image))?;
        g.header = h;
        g.set_unsynced();
        g.sync()?;
        if g.backing.is_some() || g.opts.open_backing {
            g.backing = g.open_named_backing().ok().flatten();
        }
        Ok(())
    }
}

impl crate::image::Inner {
    /// Opens the backing chain the header names afresh (with empty caches);
    /// `None` when it names none.
    pub(crate) fn open_named_backing(&self) -> Result<Option<crate::backing::Backing>> {
        let fmt = self.header.backing_format();
        let key = self.opts.backing_key_secret.as_ref();
        match &self.header.backing_file {
            Some(b) => crate::image::open_backing(&self.path, b, fmt.as_deref(), key).map(Some),
            None => Ok(None),
        }
    }
}

impl Image {
    /// Makes every cluster of the image unallocated (the image then reads
    /// through its backing chain, or as zeroes), as QEMU empties the top
    /// image after `qemu-img commit`. The freed clusters are released
    /// once the emptied tables are durable, and the file is cut after its
    /// last used cluster (QEMU rebuilds the metadata from scratch instead,
    /// which a crash in the middle can leave unreadable).
    pub fn make_empty(&self) -> Result<()> {
        let mut g = self.exclusive();
        g.check_writable()?;
        let cs = g.geo.cluster_size();
        let len = g.header.size.div_ceil(cs) * cs;
        let r = (|| {
            g.file.event(qcow2_io::DebugEvent::EmptyImagePrepare);
            if len > 0 {
                g.discard_clusters(0, len, true)?;
            }
            // Entries, then the frees they allow, durable before the cut.
            g.flush_close()?;
            g.trim_tail()?;
            g.sync()
        })();
        if let Err(Error::Corrupt(_)) = &r {
            g.mark_corrupt();
        }
        r
    }
}
