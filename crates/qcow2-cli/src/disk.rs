//! A disk image as `convert` and `compare` see it: a qcow2 image (through the
//! engine) or a raw file, with its size, reads and the status of its ranges.

use crate::{error_text, open_image, strerror, Fail};
use qcow2_ops::io::{FileStorage, OpenMode, Storage};
use qcow2_ops::{CopySource, CopyTarget, Image, OpenOptions, SourceExtent, REQ_MAY_UNMAP};
use std::path::Path;

/// What a range of a disk holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Status {
    /// Reads as zeroes (no need to read it).
    pub zero: bool,
    /// Allocated in the top layer (not from the backing chain).
    pub top: bool,
    /// Allocated in some layer of the chain (QEMU's BDRV_BLOCK_ALLOCATED).
    pub present: bool,
}

/// Data allocated in the top layer.
pub const DATA: Status = Status {
    zero: false,
    top: true,
    present: true,
};

/// A qcow2 image or a raw file.
pub enum Disk {
    /// Through the engine.
    Qcow2(Box<Image>),
    /// A plain file: guest offset == file offset.
    Raw {
        /// The file.
        file: FileStorage,
        /// Its length (the virtual size).
        size: u64,
        /// Its path (for messages).
        path: std::path::PathBuf,
    },
}

/// `qcow2` when the file starts with the qcow2 magic, `raw` otherwise (as
/// qemu-img probes).
pub fn probe(path: &Path) -> Result<&'static str, Fail> {
    let file = FileStorage::open(path, OpenMode::READ_ONLY).map_err(|e| {
        Fail::new(format!(
            "Could not open '{}': {}",
            path.display(),
            strerror(e.raw_os_error().unwrap_or(5))
        ))
    })?;
    let mut m = [0u8; 4];
    let len = file.len().unwrap_or(0);
    if len >= 4 && file.read_at(&mut m, 0).is_ok() && &m == b"QFI\xfb" {
        Ok("qcow2")
    } else {
        Ok("raw")
    }
}

impl Disk {
    /// Opens `path` as `fmt` (`None`: probed).
    pub fn open(path: &Path, fmt: Option<&str>, opts: &OpenOptions) -> Result<Disk, Fail> {
        let fmt = match fmt {
            Some(f) => f.to_string(),
            None => probe(path)?.to_string(),
        };
        match fmt.as_str() {
            "qcow2" => Ok(Disk::Qcow2(Box::new(open_image(path, opts)?))),
            "raw" => {
                let mode = if opts.writable {
                    OpenMode::READ_WRITE
                } else {
                    OpenMode::READ_ONLY
                };
                let file = FileStorage::open(path, mode).map_err(|e| {
                    Fail::new(format!(
                        "Could not open '{}': {}",
                        path.display(),
                        strerror(e.raw_os_error().unwrap_or(5))
                    ))
                })?;
                let size = file.len().map_err(|e| io_fail(path, "stat", e))?;
                Ok(Disk::Raw {
                    file,
                    size,
                    path: path.to_path_buf(),
                })
            }
            other => Err(Fail::new(format!(
                "Unknown or unsupported format '{other}' (qcow2 or raw)"
            ))),
        }
    }

    /// Virtual size in bytes.
    pub fn size(&self) -> u64 {
        match self {
            Disk::Qcow2(i) => i.virtual_size(),
            Disk::Raw { size, .. } => *size,
        }
    }

    /// Reads `buf.len()` bytes at `off` (inside the disk).
    pub fn read(&self, path: &Path, off: u64, buf: &mut [u8]) -> Result<(), Fail> {
        match self {
            Disk::Qcow2(i) => i.read(off, buf).map_err(|e| {
                Fail::new(format!(
                    "error while reading at byte {off}: {}",
                    error_text(&e)
                ))
            }),
            Disk::Raw { file, .. } => file.read_at(buf, off).map_err(|e| io_fail(path, "read", e)),
        }
    }

    /// The status of `[off, off + len)` from `off`: how far it reaches (at
    /// least 1 byte, at most `len`) and what it is.
    pub fn status(&self, path: &Path, off: u64, len: u64) -> Result<(u64, Status), Fail> {
        match self {
            Disk::Qcow2(i) => {
                let m = i.block_status_limit(off, len, 1).map_err(|e| {
                    Fail::new(format!(
                        "error while reading block status at offset {off}: {}",
                        error_text(&e)
                    ))
                })?;
                let Some(e) = m.first() else {
                    return Ok((len, DATA));
                };
                let n = (e.start + e.length).saturating_sub(off).clamp(1, len);
                Ok((
                    n,
                    Status {
                        zero: e.zero,
                        top: e.present && e.depth == 0,
                        present: e.present,
                    },
                ))
            }
            Disk::Raw { file, size, .. } => {
                raw_status(file, *size, off, len).map_err(|e| io_fail(path, "seek", e))
            }
        }
    }
}

/// The status of `[off, off + len)` of a raw file from `off`.
fn raw_status(file: &FileStorage, size: u64, off: u64, len: u64) -> std::io::Result<(u64, Status)> {
    let end = off.saturating_add(len).min(size);
    let data = file.next_data(off)?;
    // A raw file is allocated everywhere as far as QEMU's block status
    // goes; holes read as zeroes.
    let hole = Status { zero: true, ..DATA };
    match data {
        None => Ok((end - off, hole)),
        Some(d) if d > off => Ok((d.min(end) - off, hole)),
        Some(_) => {
            let h = file.next_hole(off)?;
            Ok((h.clamp(off + 1, end) - off, DATA))
        }
    }
}

/// A disk as a source of the engine's copy loops (convert, rebase).
impl CopySource for Disk {
    fn size(&self) -> u64 {
        Disk::size(self)
    }
    fn extent(&self, offset: u64, len: u64) -> qcow2_ops::Result<SourceExtent> {
        match self {
            Disk::Qcow2(i) => i.extent(offset, len),
            Disk::Raw {
                file, size, path, ..
            } => {
                let (n, st) = raw_status(file, *size, offset, len).map_err(|e| {
                    qcow2_ops::Error::io(format!("could not seek '{}'", path.display()), e)
                })?;
                Ok(SourceExtent {
                    len: n,
                    zero: st.zero,
                    from_below: false,
                })
            }
        }
    }
    fn read(&self, offset: u64, buf: &mut [u8]) -> qcow2_ops::Result<()> {
        match self {
            Disk::Qcow2(i) => CopySource::read(&**i, offset, buf),
            Disk::Raw { file, path, .. } => file.read_at(buf, offset).map_err(|e| {
                qcow2_ops::Error::io(format!("could not read '{}'", path.display()), e)
            }),
        }
    }
}

/// A disk as a target of the engine's copy loops (convert, commit).
impl CopyTarget for Disk {
    fn size(&self) -> u64 {
        Disk::size(self)
    }
    /// A raw file: QEMU's mirror granularity on a file (64 KiB).
    fn cluster_size(&self) -> u64 {
        match self {
            Disk::Qcow2(i) => i.cluster_size(),
            Disk::Raw { .. } => 64 << 10,
        }
    }
    fn write(&self, off: u64, buf: &[u8]) -> qcow2_ops::Result<()> {
        match self {
            Disk::Qcow2(i) => i.write(off, buf, 0),
            Disk::Raw { file, path, .. } => file.write_at(buf, off).map_err(|e| {
                qcow2_ops::Error::io(format!("could not write to '{}'", path.display()), e)
            }),
        }
    }
    /// Makes `[off, off + len)` read as zeroes: unmapping on qcow2, a hole
    /// in a raw file (zero data where the file system cannot punch one).
    fn write_zeroes(&self, off: u64, len: u64) -> qcow2_ops::Result<()> {
        match self {
            Disk::Qcow2(i) => i.write_zeroes(off, len, REQ_MAY_UNMAP),
            Disk::Raw { file, .. } => {
                if !file.punch_hole(off, len).unwrap_or(false) {
                    let z = vec![0u8; len.min(qcow2_ops::COPY_CHUNK) as usize];
                    let mut p = off;
                    while p < off + len {
                        let n = (off + len - p).min(qcow2_ops::COPY_CHUNK) as usize;
                        self.write(p, &z[..n])?;
                        p += n as u64;
                    }
                }
                Ok(())
            }
        }
    }
    fn write_compressed(&self, off: u64, buf: &[u8]) -> qcow2_ops::Result<()> {
        match self {
            Disk::Qcow2(i) => i.write_compressed(off, buf),
            Disk::Raw { .. } => Err(qcow2_ops::Error::NotSupported(
                "compression on a raw target".into(),
            )),
        }
    }
    fn backing_end(&self) -> u64 {
        match self {
            Disk::Qcow2(i) => i.backing_end(),
            Disk::Raw { .. } => 0,
        }
    }
}

fn io_fail(path: &Path, what: &str, e: std::io::Error) -> Fail {
    Fail::new(format!(
        "Could not {what} '{}': {}",
        path.display(),
        strerror(e.raw_os_error().unwrap_or(5))
    ))
}

/// A progress bar for `-p` at a terminal; nothing when output is not a
/// terminal (or without `-p`).
pub struct Progress(Option<indicatif::ProgressBar>);

impl Progress {
    /// A bar over `total` bytes when `wanted` and stderr is a terminal.
    pub fn new(wanted: bool, total: u64, what: &str) -> Progress {
        use std::io::IsTerminal;
        if !wanted || !std::io::stderr().is_terminal() {
            return Progress(None);
        }
        let pb = indicatif::ProgressBar::new(total);
        pb.set_style(
            indicatif::ProgressStyle::with_template(
                "{msg} [{bar:40}] {percent:>3}% {bytes}/{total_bytes} ({bytes_per_sec}, {eta})",
            )
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar())
            .progress_chars("=> "),
        );
        pb.set_message(what.to_string());
        Progress(Some(pb))
    }
    /// Moves the bar to `pos` bytes.
    pub fn set(&self, pos: u64) {
        if let Some(pb) = &self.0 {
            pb.set_position(pos);
        }
    }
    /// Ends the bar.
    pub fn finish(&self) {
        if let Some(pb) = &self.0 {
            pb.finish_and_clear();
        }
    }
}
