//! `qcow2 convert`: copies the guest contents of one or more images (qcow2
//! or raw, concatenated) into a new or existing qcow2 or raw image, with
//! `qemu-img convert`'s syntax and semantics:
//!
//! - ranges that read as zeroes (in the source's block status, or runs of at
//!   least `-S` bytes of zero data, default 4 KiB) are not copied: a new
//!   target without a backing file already reads as zeroes there; otherwise
//!   (`-n`, `-B`) they go through the write-zeroes path with MAY_UNMAP, so a
//!   range already zero in the target is left alone;
//! - `-S 0` writes everything, zeroes included (a fully allocated target);
//! - `-B BACKING` makes the target an overlay of BACKING and copies only what
//!   the source's top layer holds;
//! - `-n` writes into an existing target instead of creating one.

use crate::disk::{Disk, Progress};
use crate::num::parse_size;
use crate::{error_text, Fail};
use clap::{Args, Parser};
use qcow2_ops::io::{FileStorage, OpenMode, Storage};
use qcow2_ops::{CacheMode, DiscardMode, Image, OpenOptions, REQ_MAY_UNMAP};
use std::path::{Path, PathBuf};

/// Arguments of `qcow2 convert`.
#[derive(Args, Debug)]
pub struct ConvertArgs {
    /// Format of the sources (qcow2 or raw; probed when absent).
    #[arg(short = 'f')]
    src_fmt: Option<String>,
    /// Format of the target (qcow2 or raw; default raw, as qemu-img).
    #[arg(short = 'O', default_value = "raw")]
    out_fmt: String,
    /// Write compressed clusters.
    #[arg(short = 'c')]
    compress: bool,
    /// Zero runs of at least this many bytes are not written (multiple of 512,
    /// up to 16 MiB; 0: write everything).
    #[arg(short = 'S')]
    sparse: Option<String>,
    /// Write into an existing target (do not create it).
    #[arg(short = 'n')]
    no_create: bool,
    /// Backing file of the new target (copies only the source's top layer).
    #[arg(short = 'B')]
    backing: Option<String>,
    /// Format of the backing file given with -B.
    #[arg(short = 'F')]
    backing_fmt: Option<String>,
    /// Creation options of the target (as `qcow2 create -o`).
    #[arg(short = 'o', action = clap::ArgAction::Append)]
    options: Vec<String>,
    /// Show progress at a terminal.
    #[arg(short = 'p')]
    progress: bool,
    /// Quiet.
    #[arg(short = 'q')]
    quiet: bool,
    /// Cache mode of the target (writeback, writethrough, unsafe, none,
    /// directsync; default unsafe, as qemu-img: one flush at the end).
    #[arg(short = 't')]
    cache: Option<String>,
    /// Accepted for compatibility: cache mode of the sources.
    #[arg(short = 'T')]
    src_cache: Option<String>,
    /// Accepted for compatibility (sources are opened read-only).
    #[arg(short = 'U', long = "force-share")]
    force_share: bool,
    /// Accepted for compatibility: out-of-order writes.
    #[arg(short = 'W')]
    out_of_order: bool,
    /// Accepted for compatibility: parallel coroutines.
    #[arg(short = 'm')]
    coroutines: Option<String>,
    /// The target already reads as zeroes (with -n): zero ranges are skipped.
    #[arg(long = "target-is-zero")]
    target_is_zero: bool,
    #[command(flatten)]
    spec: crate::imgspec::SpecArgs,
    /// Sources, then the target.
    #[arg(required = true, num_args = 1..)]
    files: Vec<PathBuf>,
}

/// Bytes copied per step (QEMU's default buffer size).
const CHUNK: u64 = 2 << 20;
/// Largest -S value.
const MAX_SPARSE: u64 = 16 << 20;

/// `qcow2 create` arguments parsed from a command line we build.
#[derive(Parser, Debug)]
struct CreateCmd {
    #[command(flatten)]
    args: crate::create::CreateArgs,
}

/// Where converted data goes.
enum Target {
    Qcow2(Box<Image>),
    Raw(FileStorage),
}

impl Target {
    fn write(&self, path: &Path, off: u64, buf: &[u8]) -> Result<(), Fail> {
        match self {
            Target::Qcow2(i) => i.write(off, buf, 0).map_err(|e| {
                Fail::new(format!(
                    "error while writing at byte {off}: {}",
                    error_text(&e)
                ))
            }),
            Target::Raw(f) => f.write_at(buf, off).map_err(|e| {
                Fail::new(format!(
                    "error while writing at byte {off} of '{}': {e}",
                    path.display()
                ))
            }),
        }
    }

    /// Makes `[off, off + len)` read as zeroes.
    fn zero(&self, path: &Path, off: u64, len: u64) -> Result<(), Fail> {
        match self {
            Target::Qcow2(i) => i.write_zeroes(off, len, REQ_MAY_UNMAP).map_err(|e| {
                Fail::new(format!(
                    "error while writing zeroes at byte {off}: {}",
                    error_text(&e)
                ))
            }),
            Target::Raw(f) => {
                let punched = f.punch_hole(off, len).unwrap_or(false);
                if !punched {
                    let z = vec![0u8; len.min(CHUNK) as usize];
                    let mut p = off;
                    while p < off + len {
                        let n = (off + len - p).min(CHUNK) as usize;
                        self.write(path, p, &z[..n])?;
                        p += n as u64;
                    }
                }
                Ok(())
            }
        }
    }

    fn finish(self, path: &Path) -> Result<(), Fail> {
        match self {
            Target::Qcow2(i) => i.close().map_err(|e| {
                Fail::new(format!(
                    "Could not close the new image '{}': {}",
                    path.display(),
                    error_text(&e)
                ))
            }),
            Target::Raw(f) => f
                .sync()
                .map_err(|e| Fail::new(format!("Could not sync '{}': {e}", path.display()))),
        }
    }
}

fn parse_sparse(s: &Option<String>) -> Result<u64, Fail> {
    const MSG: &str = "Invalid buffer size for sparse output specified. Valid sizes are multiples of 512 up to 16777216. Select 0 to disable sparse detection (fully allocates output).";
    let Some(s) = s else {
        return Ok(4096);
    };
    let v = parse_size(s).map_err(|_| Fail::new(MSG))?;
    if v % 512 != 0 || v > MAX_SPARSE {
        return Err(Fail::new(MSG));
    }
    Ok(v)
}

/// Runs `qcow2 convert`.
pub fn run(a: ConvertArgs) -> Result<u8, Fail> {
    if a.files.len() < 2 {
        return Err(Fail::new("Must specify image file name"));
    }
    let sparse = parse_sparse(&a.sparse)?;
    a.spec.define()?;
    if a.compress && a.out_fmt != "qcow2" {
        return Err(Fail::new("Compression not supported for this file format"));
    }
    if !matches!(a.out_fmt.as_str(), "qcow2" | "raw") {
        return Err(Fail::new(format!(
            "Unknown or unsupported format '{}' (qcow2 or raw)",
            a.out_fmt
        )));
    }
    if a.backing.is_some() && a.backing_fmt.is_none() && !a.no_create {
        return Err(Fail::new(
            "Use of backing file requires explicit backing format",
        ));
    }
    if a.backing.is_some() && a.out_fmt != "qcow2" {
        return Err(Fail::new(
            "Backing file not supported for file format 'raw'",
        ));
    }
    let (srcs, dst) = a.files.split_at(a.files.len() - 1);
    let dst = &dst[0];
    let sopts = OpenOptions::read_only();
    let mut sources = Vec::with_capacity(srcs.len());
    for p in srcs {
        let mut o = sopts.clone();
        let s = a.spec.resolve(p, a.src_fmt.as_deref(), &mut o)?;
        sources.push((s.path.clone(), Disk::open(&s.path, s.fmt.as_deref(), &o)?));
    }
    let total: u64 = sources.iter().map(|(_, d)| d.size()).sum();

    // The target: created (unless -n) with the sources' total size.
    let cache = match a.cache.as_deref() {
        None | Some("unsafe") => CacheMode::Unsafe,
        Some(c) => {
            CacheMode::parse(c).ok_or_else(|| Fail::new(format!("Invalid cache option: {c}")))?
        }
    };
    let created = !a.no_create;
    if created {
        create_target(&a, dst, total)?;
    }
    let target = match a.out_fmt.as_str() {
        "qcow2" => {
            let key_secret = match create_option(&a.options, "encrypt.key-secret") {
                Some(id) => Some(crate::secrets::lookup(&id).map_err(Fail::new)?),
                None => None,
            };
            let o = OpenOptions {
                cache,
                discard: DiscardMode::Unmap,
                key_secret,
                ..OpenOptions::read_write()
            };
            let img = crate::open_image(dst, &o)?;
            if img.virtual_size() < total {
                return Err(Fail::new(format!(
                    "Output image is too small: {} bytes, need {total}",
                    img.virtual_size()
                )));
            }
            Target::Qcow2(Box::new(img))
        }
        _ => {
            let f = FileStorage::open(dst, OpenMode::READ_WRITE).map_err(|e| {
                Fail::new(format!(
                    "Could not open '{}': {}",
                    dst.display(),
                    crate::strerror(e.raw_os_error().unwrap_or(5))
                ))
            })?;
            if created {
                f.set_len(total)
                    .map_err(|e| Fail::new(format!("Could not resize '{}': {e}", dst.display())))?;
                // As QEMU's file driver does on creation: the first block is
                // allocated, so that its alignment can be probed later.
                if total > 0 {
                    let z = vec![0u8; total.min(4096) as usize];
                    f.write_at(&z, 0).map_err(|e| {
                        Fail::new(format!("Could not write '{}': {e}", dst.display()))
                    })?;
                }
            }
            Target::Raw(f)
        }
    };
    // A new target without a backing file reads as zeroes already.
    // (Not an encrypted one with preallocated clusters: those hold zeroes
    // in the file, which do not read as zeroes through the cipher.)
    let encrypted_prealloc = create_option(&a.options, "preallocation").is_some_and(|p| p != "off")
        && (create_option(&a.options, "encrypt.format").is_some()
            || create_option(&a.options, "encryption").is_some_and(|v| v == "on"));
    let zero_init = (created && a.backing.is_none() && !encrypted_prealloc) || a.target_is_zero;
    let overlay = a.backing.is_some();
    // Past the end of the target's backing file the target reads as zeroes
    // too: zero ranges there need no write (QEMU's post-backing zero).
    let backing_end = match &a.backing {
        Some(b) => {
            use std::os::unix::ffi::OsStrExt;
            let p = crate::info::resolve_backing(dst.as_os_str().as_bytes(), b.as_bytes());
            let p = Path::new(std::ffi::OsStr::from_bytes(&p));
            Disk::open(p, a.backing_fmt.as_deref(), &sopts)?.size()
        }
        None => 0,
    };
    let bar = Progress::new(a.progress && !a.quiet, total, "convert");
    if a.compress {
        let z = ZeroTarget {
            zero_init,
            overlay,
            backing_end,
        };
        copy_compressed(&sources, &target, dst, total, &z, &bar)?;
        bar.finish();
        target.finish(dst)?;
        return Ok(0);
    }
    let mut buf = vec![0u8; CHUNK as usize];
    let mut base = 0u64;
    for (path, src) in &sources {
        let size = src.size();
        let src_has_backing = match src {
            Disk::Qcow2(i) => i.info().backing_file.is_some(),
            Disk::Raw { .. } => false,
        };
        let mut off = 0u64;
        while off < size {
            let (n, st) = src.status(path, off, (size - off).min(CHUNK))?;
            let dst_off = base + off;
            // With -B only the source's top layer is copied; what it leaves
            // unallocated (over its own backing file) stays unallocated.
            let from_backing = overlay && !st.top && src_has_backing;
            if from_backing {
            } else if st.zero && sparse != 0 {
                let len = if overlay {
                    n.min(backing_end.saturating_sub(dst_off))
                } else {
                    n
                };
                if !zero_init && len > 0 {
                    target.zero(dst, dst_off, len)?;
                }
            } else {
                let b = &mut buf[..n as usize];
                if st.zero {
                    b.fill(0);
                } else {
                    src.read(path, off, b)?;
                }
                copy_runs(&target, dst, dst_off, b, sparse, zero_init)?;
            }
            off += n;
            bar.set(base + off);
        }
        base += size;
    }
    bar.finish();
    target.finish(dst)?;
    Ok(0)
}

/// What a target reads as where nothing is written (for `convert -c`).
struct ZeroTarget {
    /// It reads as zeroes everywhere.
    zero_init: bool,
    /// It has a backing file (-B): only the sources' top layers are copied.
    overlay: bool,
    /// Where the backing file ends (past it the target reads as zeroes).
    backing_end: u64,
}

/// `convert -c`: every target cluster that is not all zeroes is written
/// compressed (as `qemu-img convert -c`: whole clusters, the last one of the
/// image possibly short, read through the sources' chains); all-zero
/// clusters are skipped on a target that reads as zeroes, zeroed otherwise;
/// with -B, clusters the sources' top layers leave wholly unallocated are
/// left unallocated.
fn copy_compressed(
    sources: &[(PathBuf, Disk)],
    target: &Target,
    dst: &Path,
    total: u64,
    z: &ZeroTarget,
    bar: &Progress,
) -> Result<(), Fail> {
    let Target::Qcow2(img) = target else {
        return Err(Fail::new("Compression not supported for this file format"));
    };
    let cs = img.cluster_size();
    // The image size is rounded up to whole sectors: its last cluster may
    // be longer than what the sources give.
    let img_size = img.virtual_size();
    let step = CHUNK.max(cs);
    let mut buf = vec![0u8; step as usize];
    let mut off = 0u64;
    while off < total {
        let n = step.min(total - off);
        let b = &mut buf[..n as usize];
        let (backing_runs, zero_runs) = read_concat(sources, off, b, z.overlay)?;
        let mut i = 0u64;
        while i < n {
            let m = cs.min(n - i);
            let c = &b[i as usize..(i + m) as usize];
            let at = off + i;
            i += m;
            let within = |runs: &[(u64, u64)]| runs.iter().any(|&(s, e)| s <= at && at + m <= e);
            if within(&backing_runs) {
                continue;
            }
            if c.iter().all(|&x| x == 0) {
                // Zero in the source's block status: past the end of the
                // target's backing file it reads as zeroes already (zero
                // data there is still written as zeroes, as QEMU does).
                let len = if z.overlay && within(&zero_runs) {
                    m.min(z.backing_end.saturating_sub(at))
                } else {
                    m
                };
                if !z.zero_init && len > 0 {
                    target.zero(dst, at, len)?;
                }
                continue;
            }
            let end = (at + cs).min(img_size);
            let padded;
            let c = if at + m < end {
                let mut v = vec![0u8; (end - at) as usize];
                v[..c.len()].copy_from_slice(c);
                padded = v;
                &padded[..]
            } else {
                c
            };
            img.write(at, c, qcow2_ops::REQ_COMPRESSED).map_err(|e| {
                Fail::new(format!(
                    "error while compressing sector {}: {}",
                    at / 512,
                    error_text(&e)
                ))
            })?;
        }
        off += n;
        bar.set(off);
    }
    // As QEMU at the end of a compressed conversion: the file ends on a
    // sector boundary.
    let len = std::fs::metadata(dst).map(|m| m.len()).unwrap_or(0);
    if len % 512 != 0 {
        let f = std::fs::OpenOptions::new().write(true).open(dst);
        f.and_then(|f| f.set_len(len.next_multiple_of(512)))
            .map_err(|e| Fail::new(format!("Could not resize '{}': {e}", dst.display())))?;
    }
    Ok(())
}

/// Byte ranges `[start, end)` in guest offsets.
type Runs = Vec<(u64, u64)>;

/// Reads `b.len()` bytes at `off` of the sources laid end to end; ranges
/// their block status calls zero are not read. Returns the ranges (global
/// offsets) that only the sources' backing files hold, when `overlay`, and
/// those whose block status is zero.
fn read_concat(
    sources: &[(PathBuf, Disk)],
    mut off: u64,
    b: &mut [u8],
    overlay: bool,
) -> Result<(Runs, Runs), Fail> {
    let mut backing: Runs = Vec::new();
    let mut zeroes: Runs = Vec::new();
    let add = |runs: &mut Runs, s: u64, n: u64| match runs.last_mut() {
        Some((_, e)) if *e == s => *e = s + n,
        _ => runs.push((s, s + n)),
    };
    let mut done = 0usize;
    let mut base = 0u64;
    for (path, src) in sources {
        let size = src.size();
        let has_backing = match src {
            Disk::Qcow2(i) => i.info().backing_file.is_some(),
            Disk::Raw { .. } => false,
        };
        while done < b.len() && off < base + size {
            let so = off - base;
            let want = (size - so).min((b.len() - done) as u64);
            let (n, st) = src.status(path, so, want)?;
            let part = &mut b[done..done + n as usize];
            if st.zero {
                part.fill(0);
                add(&mut zeroes, off, n);
            } else {
                src.read(path, so, part)?;
            }
            if overlay && has_backing && !st.top {
                add(&mut backing, off, n);
            }
            done += n as usize;
            off += n;
        }
        base += size;
    }
    Ok((backing, zeroes))
}

/// Writes `b` at `off`, except runs of zero bytes of at least `sparse`
/// bytes (aligned to `sparse`), which are zeroed (or skipped on a target
/// that reads as zeroes). `sparse == 0` writes everything.
fn copy_runs(
    t: &Target,
    path: &Path,
    off: u64,
    b: &[u8],
    sparse: u64,
    zero_init: bool,
) -> Result<(), Fail> {
    if sparse == 0 {
        return t.write(path, off, b);
    }
    let unit = sparse as usize;
    // Units aligned to guest offsets; a short unit at either edge counts as
    // data (a zero run shorter than -S is written).
    let mut runs: Vec<(usize, usize, bool)> = Vec::new();
    let mut i = 0usize;
    while i < b.len() {
        let n = (unit - (off as usize + i) % unit).min(b.len() - i);
        let zero = n == unit && b[i..i + n].iter().all(|&x| x == 0);
        match runs.last_mut() {
            Some((_, e, z)) if *z == zero => *e = i + n,
            _ => runs.push((i, i + n, zero)),
        }
        i += n;
    }
    for (s, e, zero) in runs {
        if !zero {
            t.write(path, off + s as u64, &b[s..e])?;
        } else if !zero_init {
            t.zero(path, off + s as u64, (e - s) as u64)?;
        }
    }
    Ok(())
}

/// Creates the target as `qcow2 create` does (quietly), with -o options and
/// -B/-F.
/// The last value of the creation option `key` among `-o` strings.
fn create_option(options: &[String], key: &str) -> Option<String> {
    options
        .iter()
        .rev()
        .flat_map(|o| o.rsplit(','))
        .filter_map(|kv| kv.split_once('='))
        .find(|(k, _)| *k == key)
        .map(|(_, v)| v.to_string())
}

fn create_target(a: &ConvertArgs, dst: &Path, size: u64) -> Result<(), Fail> {
    if a.out_fmt == "raw" {
        if !a.options.is_empty() {
            let o = a.options.join(",");
            let k = o
                .split(',')
                .next()
                .unwrap_or("")
                .split('=')
                .next()
                .unwrap_or("");
            return Err(Fail::new(format!(
                "{}: Invalid parameter '{k}'",
                dst.display()
            )));
        }
        std::fs::File::create(dst).map_err(|e| {
            Fail::new(format!(
                "{}: Could not create '{}': {}",
                dst.display(),
                dst.display(),
                crate::strerror(e.raw_os_error().unwrap_or(5))
            ))
        })?;
        return Ok(());
    }
    let mut argv: Vec<String> = vec!["create".into(), "-q".into(), "-f".into(), "qcow2".into()];
    for o in &a.options {
        argv.push("-o".into());
        argv.push(o.clone());
    }
    if let Some(b) = &a.backing {
        argv.push("-b".into());
        argv.push(b.clone());
    }
    if let Some(f) = &a.backing_fmt {
        argv.push("-F".into());
        argv.push(f.clone());
    }
    argv.push(dst.to_string_lossy().into_owned());
    argv.push(size.to_string());
    let cmd = CreateCmd::try_parse_from(&argv)
        .map_err(|e| Fail::new(format!("invalid creation options: {e}")))?;
    crate::create::run(cmd.args).map(|_| ())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sparse_values() {
        assert_eq!(parse_sparse(&None).unwrap(), 4096);
        assert_eq!(parse_sparse(&Some("0".into())).unwrap(), 0);
        assert_eq!(parse_sparse(&Some("64k".into())).unwrap(), 65536);
        assert!(parse_sparse(&Some("100".into())).is_err());
        assert!(parse_sparse(&Some("32M".into())).is_err());
    }
}
