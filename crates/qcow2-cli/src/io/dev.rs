//! The device `qcow2 io` works on: a qcow2 image through the engine or a
//! raw file (guest offset == file offset).

use qcow2_ops::io::{DebugEvent, IoType, Rules, Storage};
use qcow2_ops::{Error, Image, MapEntry, Result, REQ_MAY_UNMAP};

/// A qcow2 image or a raw file.
pub enum Dev {
    /// Through the engine.
    Qcow2(Box<Image>),
    /// A plain file.
    Raw {
        /// The file.
        file: Box<dyn Storage>,
        /// Discard requests punch holes (discard=unmap).
        unmap: bool,
        /// Flushes reach the disk (not cache.no-flush / cache=unsafe).
        flush: bool,
        /// The protocol below has driver information for `info` (a file
        /// has, an NBD export has not).
        protocol_info: bool,
    },
    /// QEMU's `null-co` driver: reads zeroes, writes go nowhere.
    Null {
        /// Its size.
        size: u64,
        /// Reads return zeroes (else the buffer is left as it was).
        read_zeroes: bool,
    },
    /// QEMU's blkdebug driver above a device: its requests fail as the
    /// error-injection rules say.
    Debug {
        /// The device below.
        dev: Box<Dev>,
        /// The rules and their state.
        rules: std::sync::Arc<Rules>,
        /// Its request limits.
        limits: Limits,
    },
    /// QEMU's compress filter: every write is widened to whole clusters
    /// (the edges read as they are) and written compressed.
    Compress {
        /// The qcow2 device below.
        dev: Box<Dev>,
        /// Its cluster size.
        cluster: u64,
    },
}

/// Request limits of a blkdebug node (bytes; 0: none): QEMU's block layer
/// splits write-zeroes and discard requests to them before the node passes
/// them on, and the node refuses pieces below its alignment (zeroes are
/// then written as data, a discard is dropped).
#[derive(Debug, Clone, Copy, Default)]
pub struct Limits {
    /// `align`: request alignment.
    pub align: u64,
    /// `max-transfer`.
    pub max_transfer: u64,
    /// `opt-write-zero`: preferred write-zeroes alignment.
    pub opt_write_zero: u64,
    /// `max-write-zero`.
    pub max_write_zero: u64,
    /// `opt-discard`: preferred discard alignment.
    pub opt_discard: u64,
    /// `max-discard`.
    pub max_discard: u64,
}

impl Limits {
    /// The pieces QEMU's block layer cuts a write-zeroes request into,
    /// each with whether the node takes it as such (else it is written as
    /// zeroes).
    fn zero_pieces(&self, mut off: u64, mut len: u64) -> Vec<(u64, u64, bool)> {
        let align = self.opt_write_zero.max(self.align).max(1);
        let max = match self.max_write_zero {
            0 => u64::MAX / 2,
            m => m,
        };
        let max = (max / align * align).max(align);
        let mut head = off % align;
        let tail = (off + len) % align;
        let mut out = Vec::new();
        while len > 0 {
            let mut num = len;
            if head != 0 {
                num = len.min(align - head);
                if self.max_transfer != 0 {
                    num = num.min(self.max_transfer);
                }
                head = (head + num) % align;
            } else if tail != 0 && num > align {
                num -= tail;
            }
            num = num.min(max);
            out.push((off, num, num >= align));
            off += num;
            len -= num;
        }
        out
    }

    /// The discard pieces the node passes on (those below its request
    /// alignment it drops).
    fn discard_pieces(&self, mut off: u64, mut len: u64) -> Vec<(u64, u64)> {
        let req = self.align.max(1);
        let align = self.opt_discard.max(req);
        let max = match self.max_discard {
            0 => u64::MAX / 2,
            m => m,
        };
        let max = (max / align * align).max(req);
        let mut head = off % align;
        let mut tail = (off + len) % align;
        let mut out = Vec::new();
        while len > 0 {
            let mut num = len;
            if head != 0 {
                num = len.min(align - head);
                if num % req != 0 {
                    num %= req;
                }
                head = (head + num) % align;
            } else if tail != 0 {
                if num > align {
                    num -= tail;
                } else if tail % req != 0 && tail > req {
                    tail %= req;
                    num -= tail;
                }
            }
            num = num.min(max);
            if num >= req {
                out.push((off, num));
            }
            off += num;
            len -= num;
        }
        out
    }

    fn splits(&self) -> bool {
        self.align > 1
            || self.opt_write_zero != 0
            || self.max_write_zero != 0
            || self.opt_discard != 0
            || self.max_discard != 0
    }
}

fn injected(e: std::io::Error) -> Error {
    io_err("blkdebug", e)
}

/// EINVAL (the CLI has no libc dependency).
fn libc_einval() -> i32 {
    22
}

fn io_err(what: &str, e: std::io::Error) -> Error {
    Error::Io {
        context: what.to_string(),
        source: e,
    }
}

/// ENOMEDIUM once a corruption found while the image was open read-write
/// marked it corrupt: QEMU then makes the node unusable, every request
/// failing with "No medium found".
fn medium(i: &Image) -> Result<()> {
    if i.corrupted_here() {
        return Err(io_err("no medium", std::io::Error::from_raw_os_error(123)));
    }
    Ok(())
}

/// Zeroes written at once to a raw file.
const ZERO_CHUNK: u64 = 1 << 20;

impl Dev {
    /// The format name qemu-io's `info` prints.
    pub fn format_name(&self) -> &'static str {
        match self {
            Dev::Qcow2(_) => "qcow2",
            Dev::Raw { .. } => "raw",
            Dev::Null { .. } => "null-co",
            Dev::Debug { .. } => "blkdebug",
            Dev::Compress { .. } => "compress",
        }
    }

    /// The device under any error-injection layers.
    pub fn base(&self) -> &Dev {
        match self {
            Dev::Debug { dev, .. } | Dev::Compress { dev, .. } => dev.base(),
            d => d,
        }
    }

    /// The device reached a named point of its work (`cor_write`).
    pub fn event(&self, ev: DebugEvent) {
        match self {
            Dev::Debug { dev, rules, .. } => {
                rules.event(ev);
                dev.event(ev);
            }
            Dev::Compress { dev, .. } => dev.event(ev),
            _ => {}
        }
    }

    /// Virtual size in bytes.
    pub fn size(&self) -> Result<u64> {
        match self {
            Dev::Qcow2(i) => medium(i).map(|()| i.virtual_size()),
            Dev::Raw { file, .. } => file.len().map_err(|e| io_err("stat", e)),
            Dev::Null { size, .. } => Ok(*size),
            Dev::Debug { dev, .. } | Dev::Compress { dev, .. } => dev.size(),
        }
    }

    /// Reads `buf.len()` bytes at `off`.
    pub fn read(&self, off: u64, buf: &mut [u8]) -> Result<()> {
        match self {
            Dev::Qcow2(i) => medium(i).and_then(|()| i.read(off, buf)),
            Dev::Raw { file, .. } => file.read_at(buf, off).map_err(|e| io_err("read", e)),
            Dev::Null { read_zeroes, .. } => {
                if *read_zeroes {
                    buf.fill(0);
                } else {
                    // qemu-io's read buffers start filled with 0xab and
                    // null-co leaves them so.
                    buf.fill(0xab);
                }
                Ok(())
            }
            Dev::Debug { dev, rules, .. } => {
                rules
                    .check(IoType::Read, off, buf.len() as u64)
                    .map_err(injected)?;
                dev.read(off, buf)
            }
            Dev::Compress { dev, .. } => dev.read(off, buf),
        }
    }

    /// Writes `buf` at `off` (`flags`: REQ_FUA).
    pub fn write(&self, off: u64, buf: &[u8], flags: u32) -> Result<()> {
        match self {
            Dev::Qcow2(i) => medium(i).and_then(|()| i.write(off, buf, flags)),
            Dev::Raw { .. } | Dev::Null { .. } if flags & qcow2_ops::REQ_COMPRESSED != 0 => Err(
                qcow2_ops::Error::NotSupported("compressed writes need a qcow2 image".into()),
            ),
            Dev::Raw { file, .. } => file.write_at(buf, off).map_err(|e| io_err("write", e)),
            Dev::Null { .. } => Ok(()),
            Dev::Debug { dev, rules, .. } => {
                rules.event(DebugEvent::Pwritev);
                rules
                    .check(IoType::Write, off, buf.len() as u64)
                    .map_err(injected)?;
                dev.write(off, buf, flags)?;
                rules.event(DebugEvent::PwritevDone);
                Ok(())
            }
            Dev::Compress { dev, cluster } => {
                let start = off / cluster * cluster;
                let end = (off + buf.len() as u64)
                    .div_ceil(*cluster)
                    .saturating_mul(*cluster)
                    .min(dev.size()?.max(off + buf.len() as u64));
                let mut whole = vec![0u8; (end - start) as usize];
                let at = (off - start) as usize;
                if at > 0 || end > off + buf.len() as u64 {
                    dev.read(start, &mut whole)?;
                }
                whole[at..at + buf.len()].copy_from_slice(buf);
                dev.write(start, &whole, flags | qcow2_ops::REQ_COMPRESSED)
            }
        }
    }

    /// Writes `buf` at `pos` of the VM state area (qcow2 only, as QEMU).
    pub fn vmstate_write(&self, pos: u64, buf: &[u8]) -> Result<()> {
        match self.base() {
            Dev::Qcow2(i) => medium(i).and_then(|()| i.vmstate_write(pos, buf)),
            _ => Err(Error::NotSupported("no VM state area".into())),
        }
    }

    /// Reads from `pos` of the VM state area.
    pub fn vmstate_read(&self, pos: u64, buf: &mut [u8]) -> Result<()> {
        match self.base() {
            Dev::Qcow2(i) => medium(i).and_then(|()| i.vmstate_read(pos, buf)),
            _ => Err(Error::NotSupported("no VM state area".into())),
        }
    }

    /// Writes zeroes over `[off, off + len)`.
    pub fn write_zeroes(&self, off: u64, len: u64, flags: u32) -> Result<()> {
        match self {
            Dev::Qcow2(i) => medium(i).and_then(|()| i.write_zeroes(off, len, flags)),
            Dev::Raw { file, unmap, .. } => {
                if flags & REQ_MAY_UNMAP != 0 && *unmap {
                    if let Ok(true) = file.punch_hole(off, len) {
                        return Ok(());
                    }
                }
                let mut pos = off;
                while pos < off + len {
                    let n = ZERO_CHUNK.min(off + len - pos);
                    let zero = vec![0u8; n as usize];
                    file.write_at(&zero, pos).map_err(|e| io_err("write", e))?;
                    pos += n;
                }
                Ok(())
            }
            Dev::Null { .. } => Ok(()),
            Dev::Debug { dev, rules, limits } => {
                if !limits.splits() {
                    rules
                        .check(IoType::WriteZeroes, off, len)
                        .map_err(injected)?;
                    return dev.write_zeroes(off, len, flags);
                }
                for (o, n, as_zeroes) in limits.zero_pieces(off, len) {
                    if as_zeroes {
                        rules.check(IoType::WriteZeroes, o, n).map_err(injected)?;
                        dev.write_zeroes(o, n, flags)?;
                        continue;
                    }
                    // Refused by the node: zeroes written as data.
                    let chunk = match limits.max_transfer {
                        0 => n,
                        m => m.min(n),
                    };
                    let mut pos = o;
                    while pos < o + n {
                        let k = chunk.min(o + n - pos);
                        let zero = vec![0u8; k as usize];
                        self.write(pos, &zero, flags & qcow2_ops::REQ_FUA)?;
                        pos += k;
                    }
                }
                Ok(())
            }
            Dev::Compress { dev, .. } => dev.write_zeroes(off, len, flags),
        }
    }

    /// Discards `[off, off + len)`.
    pub fn discard(&self, off: u64, len: u64) -> Result<()> {
        match self {
            Dev::Qcow2(i) => medium(i).and_then(|()| i.discard(off, len)),
            Dev::Raw { file, unmap, .. } => {
                if *unmap {
                    // Like QEMU: a file system that cannot punch holes
                    // ignores the discard.
                    let _ = file.punch_hole(off, len);
                }
                Ok(())
            }
            Dev::Null { .. } => Ok(()),
            Dev::Debug { dev, rules, limits } => {
                if !limits.splits() {
                    rules.check(IoType::Discard, off, len).map_err(injected)?;
                    return dev.discard(off, len);
                }
                for (o, n) in limits.discard_pieces(off, len) {
                    rules.check(IoType::Discard, o, n).map_err(injected)?;
                    dev.discard(o, n)?;
                }
                Ok(())
            }
            Dev::Compress { dev, .. } => dev.discard(off, len),
        }
    }

    /// Flushes to the disk.
    pub fn flush(&self) -> Result<()> {
        match self {
            Dev::Qcow2(i) => medium(i).and_then(|()| i.flush()),
            Dev::Raw { file, flush, .. } => {
                if *flush {
                    match file.sync() {
                        // A character device (e.g. /dev/null) cannot sync:
                        // nothing of it is cached, as QEMU treats it.
                        Err(e) if e.raw_os_error() == Some(libc_einval()) => {}
                        r => r.map_err(|e| io_err("flush", e))?,
                    }
                }
                Ok(())
            }
            Dev::Null { .. } => Ok(()),
            Dev::Debug { dev, rules, .. } => {
                rules.event(DebugEvent::FlushToOs);
                rules.event(DebugEvent::FlushToDisk);
                rules.check(IoType::Flush, 0, 0).map_err(injected)?;
                dev.flush()
            }
            Dev::Compress { dev, .. } => dev.flush(),
        }
    }

    /// Whether `[off, off + len)` starts allocated in the top layer
    /// (QEMU's bdrv_is_allocated) and how far that status reaches (0 at
    /// or past the end).
    pub fn is_allocated(&self, off: u64, len: u64) -> Result<(bool, u64)> {
        let size = self.size()?;
        if off >= size || len == 0 {
            return Ok((false, 0));
        }
        let len = len.min(size - off);
        match self {
            Dev::Qcow2(i) => {
                medium(i)?;
                let m: Vec<MapEntry> = i.block_status(off, len)?;
                let Some(first) = m.first() else {
                    return Ok((false, len));
                };
                let top = |e: &MapEntry| e.present && e.depth == 0;
                let want = top(first);
                let mut end = off;
                for e in &m {
                    if top(e) != want {
                        break;
                    }
                    end = e.start + e.length;
                }
                Ok((want, end.clamp(off + 1, off + len) - off))
            }
            // A raw file is allocated everywhere for QEMU.
            Dev::Raw { .. } | Dev::Null { .. } => Ok((true, len)),
            Dev::Debug { dev, rules, .. } => {
                rules
                    .check(IoType::BlockStatus, off, len)
                    .map_err(injected)?;
                dev.is_allocated(off, len)
            }
            Dev::Compress { dev, .. } => dev.is_allocated(off, len),
        }
    }

    /// Closes the device.
    pub fn close(self) -> Result<()> {
        match self {
            // Unusable since a corruption (QEMU closes nothing then).
            Dev::Qcow2(i) if i.corrupted_here() => Ok(()),
            Dev::Qcow2(i) => i.close(),
            Dev::Debug { dev, .. } | Dev::Compress { dev, .. } => dev.close(),
            raw => raw.flush(),
        }
    }
}
