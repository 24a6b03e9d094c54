//! Backing files behind a narrow trait: what the image needs of the layer
//! below (its size, its data, its allocation status). A qcow2 backing file
//! is an [`crate::Image`] opened read-only (its reads run concurrently like
//! any other image's); a raw file reads through [`RawLayer`].

use crate::error::ioerr;
use crate::error::{Error, Result};
use crate::types::push_merged;
use crate::types::MapEntry;
use qcow2_io::{take_rules, Blkdebug, FileStorage, OpenMode, Storage};
use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// Deepest backing chain accepted.
const MAX_CHAIN: usize = 16;

/// The layer below an image.
pub(crate) trait Layer: Send + Sync {
    /// Virtual size of the layer.
    fn size(&self) -> u64;
    /// Reads `[offset, offset + buf.len())`, which lies within [`Layer::size`].
    fn read_within(&self, offset: u64, buf: &mut [u8]) -> Result<()>;
    /// Appends (merged) the status of `[offset, offset+len)`, within the
    /// layer, reported at `depth`, stopping after `limit` extents.
    fn status_into(
        &self,
        offset: u64,
        len: u64,
        depth: u32,
        limit: usize,
        out: &mut Vec<MapEntry>,
    ) -> Result<()>;
}

/// A backing layer, shared by the image's requests.
pub(crate) type Backing = Arc<dyn Layer>;

/// Reads from a layer; bytes past its end read as zeroes.
pub(crate) fn read(layer: &dyn Layer, offset: u64, buf: &mut [u8]) -> Result<()> {
    let avail = layer.size().saturating_sub(offset).min(buf.len() as u64) as usize;
    buf[avail..].fill(0);
    if avail == 0 {
        return Ok(());
    }
    layer.read_within(offset, &mut buf[..avail])
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

/// Opens the backing file `name` of the image at `image`: raw here, qcow2
/// through `qcow2` (given the opened file and its path; it opens the rest
/// of the chain recursively, bounded by [`MAX_CHAIN`]).
pub(crate) fn open(
    image: &Path,
    name: &[u8],
    format: Option<&str>,
    qcow2: impl FnOnce(Box<dyn Storage>, &Path) -> Result<Backing>,
) -> Result<Backing> {
    let (path, file, format) = match name.strip_prefix(b"json:") {
        Some(j) => {
            let j = std::str::from_utf8(j).map_err(|_| {
                Error::Invalid("Could not open backing file: json: name is not UTF-8".into())
            })?;
            let (path, file, fmt) = open_json(j)?;
            (path, file, fmt.or(format.map(str::to_string)))
        }
        None => {
            let path = resolve(image, name);
            let shown = path.display().to_string();
            let file: Box<dyn Storage> = Box::new(
                FileStorage::open(&path, OpenMode::READ_ONLY)
                    .map_err(|e| Error::io(format!("could not open backing file '{shown}'"), e))?,
            );
            (path, file, format.map(str::to_string))
        }
    };
    let format = format.as_deref();
    let shown = path.display().to_string();
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
            Ok(Arc::new(RawLayer { file, size }))
        }
        "qcow2" => {
            let depth = DEPTH.with(|d| d.get());
            if depth >= MAX_CHAIN {
                return Err(Error::Invalid(format!(
                    "backing chain deeper than {MAX_CHAIN} at '{shown}'"
                )));
            }
            DEPTH.with(|d| d.set(depth + 1));
            let r = qcow2(file, &path);
            DEPTH.with(|d| d.set(depth));
            r
        }
        other => Err(Error::NotSupported(format!(
            "Could not open backing file: Unknown driver '{other}'"
        ))),
    }
}

/// A backing file named by QEMU's `json:{...}` syntax: its path, its
/// storage (under an error-injection layer for a `blkdebug` file), its
/// format when the name says.
fn open_json(text: &str) -> Result<(PathBuf, Box<dyn Storage>, Option<String>)> {
    let bad = |m: String| Error::NotSupported(format!("Could not open backing file: {m}"));
    let mut opts: std::collections::BTreeMap<String, String> = crate::json_options(text)
        .map_err(bad)?
        .into_iter()
        .collect();
    let format = opts.remove("driver");
    let mut file_driver = opts.remove("file.driver");
    let mut rules = None;
    if file_driver.as_deref() == Some("blkdebug") {
        file_driver = opts.remove("file.image.driver");
        if let Some(f) = opts.remove("file.image.filename") {
            opts.insert("file.filename".into(), f);
        }
        rules = Some(take_rules(&mut opts, "file.", &crate::blkdebug_accepts).map_err(bad)?);
    }
    // A raw node between the format and the file, limiting the size the
    // format sees (QEMU's `size` option of the raw driver).
    let mut limit = None;
    if file_driver.as_deref() == Some("raw") {
        file_driver = opts.remove("file.file.driver");
        if let Some(f) = opts.remove("file.file.filename") {
            opts.insert("file.filename".into(), f);
        }
        if let Some(v) = opts.remove("file.size") {
            limit = Some(v.trim().parse::<u64>().map_err(|_| {
                bad("Parameter 'size' expects a non-negative number below 2^64".into())
            })?);
        }
    }
    if let Some(d) = file_driver.filter(|d| d != "file") {
        return Err(bad(format!("Unknown driver '{d}'")));
    }
    let Some(name) = opts
        .remove("file.filename")
        .or_else(|| opts.remove("filename"))
    else {
        return Err(bad(
            "A block device must be specified for \"filename\"".into()
        ));
    };
    if let Some(k) = opts.keys().next() {
        return Err(bad(format!(
            "option '{k}' of a json: backing file name is not supported by this engine"
        )));
    }
    let path = PathBuf::from(name);
    let shown = path.display().to_string();
    let f = FileStorage::open(&path, OpenMode::READ_ONLY)
        .map_err(|e| Error::io(format!("could not open backing file '{shown}'"), e))?;
    let file: Box<dyn Storage> = match rules {
        Some(r) => Box::new(Blkdebug::new(f, r)),
        None => Box::new(f),
    };
    let file = match limit {
        Some(size) => Box::new(SizeLimit { inner: file, size }),
        None => file,
    };
    Ok((path, file, format))
}

/// A file seen through a raw node of a fixed size: reads past it return
/// zeroes, writes past it fail (ENOSPC), its length is the size.
struct SizeLimit {
    inner: Box<dyn Storage>,
    size: u64,
}

impl Storage for SizeLimit {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
        let n = self.size.saturating_sub(offset).min(buf.len() as u64) as usize;
        buf[n..].fill(0);
        if n > 0 {
            self.inner.read_at(&mut buf[..n], offset)?;
        }
        Ok(())
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> std::io::Result<()> {
        if offset.saturating_add(buf.len() as u64) > self.size {
            return Err(std::io::Error::from_raw_os_error(libc::ENOSPC));
        }
        self.inner.write_at(buf, offset)
    }
    fn sync(&self) -> std::io::Result<()> {
        self.inner.sync()
    }
    fn punch_hole(&self, offset: u64, len: u64) -> std::io::Result<bool> {
        self.inner
            .punch_hole(offset, len.min(self.size.saturating_sub(offset)))
    }
    fn len(&self) -> std::io::Result<u64> {
        Ok(self.size)
    }
    fn set_len(&self, len: u64) -> std::io::Result<()> {
        if len > self.size {
            return Err(std::io::Error::from_raw_os_error(libc::ENOSPC));
        }
        Ok(())
    }
    fn event(&self, ev: qcow2_io::DebugEvent) {
        self.inner.event(ev)
    }
}

/// A raw backing file: guest offset == file offset.
pub(crate) struct RawLayer {
    file: Box<dyn Storage>,
    size: u64,
}

impl Layer for RawLayer {
    fn size(&self) -> u64 {
        self.size
    }

    fn read_within(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        self.file
            .read_at(buf, offset)
            .map_err(|e| Error::io("read backing file", e))
    }

    fn status_into(
        &self,
        offset: u64,
        len: u64,
        depth: u32,
        _limit: usize,
        out: &mut Vec<MapEntry>,
    ) -> Result<()> {
        raw_status(&self.file, offset, len, depth, out)
    }
}

/// Status of a raw file: data where the file has data, zero in holes.
fn raw_status(
    file: &dyn Storage,
    offset: u64,
    len: u64,
    depth: u32,
    out: &mut Vec<MapEntry>,
) -> Result<()> {
    let end = offset + len;
    let mut pos = offset;
    let ent = |start: u64, length: u64, data: bool| MapEntry {
        start,
        length,
        depth,
        present: true,
        zero: !data,
        data,
        compressed: false,
        offset: Some(start),
    };
    while pos < end {
        let next_data = file
            .next_data(pos)
            .map_err(ioerr("seek", "backing file"))?
            .unwrap_or(end)
            .min(end);
        if next_data > pos {
            push_merged(out, ent(pos, next_data - pos, false));
            pos = next_data;
            continue;
        }
        let hole = file
            .next_hole(pos)
            .map_err(ioerr("seek", "backing file"))?
            .min(end);
        let hole = if hole <= pos { end } else { hole };
        push_merged(out, ent(pos, hole - pos, true));
        pos = hole;
    }
    Ok(())
}
