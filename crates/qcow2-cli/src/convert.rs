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
use qcow2_ops::{CacheMode, ConvertOptions, CopySource, DiscardMode, OpenOptions, SourceExtent};
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

/// Largest -S value.
const MAX_SPARSE: u64 = 16 << 20;

/// `qcow2 create` arguments parsed from a command line we build.
#[derive(Parser, Debug)]
struct CreateCmd {
    #[command(flatten)]
    args: crate::create::CreateArgs,
}

/// Flushes and closes the target.
fn finish(target: Disk, path: &Path) -> Result<(), Fail> {
    match target {
        Disk::Qcow2(i) => i.close().map_err(|e| {
            Fail::new(format!(
                "Could not close the new image '{}': {}",
                path.display(),
                error_text(&e)
            ))
        }),
        Disk::Raw { file, .. } => file
            .sync()
            .map_err(|e| Fail::new(format!("Could not sync '{}': {e}", path.display()))),
    }
}

/// The sources laid end to end, as one copy source.
struct Concat<'a>(&'a [(PathBuf, Disk)]);

impl Concat<'_> {
    /// The source holding guest offset `off`, and where it starts.
    fn at(&self, off: u64) -> Option<(&Disk, u64)> {
        let mut base = 0u64;
        for (_, d) in self.0 {
            if off < base + d.size() {
                return Some((d, base));
            }
            base += d.size();
        }
        None
    }
}

impl CopySource for Concat<'_> {
    fn size(&self) -> u64 {
        self.0.iter().map(|(_, d)| d.size()).sum()
    }
    fn extent(&self, off: u64, len: u64) -> qcow2_ops::Result<SourceExtent> {
        let (d, base) = self
            .at(off)
            .ok_or_else(|| qcow2_ops::Error::Invalid(format!("offset {off} past the end")))?;
        let len = len.min(base + d.size() - off);
        d.extent(off - base, len)
    }
    /// Reads within one source (the copy loops read extent by extent).
    fn read(&self, off: u64, buf: &mut [u8]) -> qcow2_ops::Result<()> {
        let (d, base) = self
            .at(off)
            .ok_or_else(|| qcow2_ops::Error::Invalid(format!("offset {off} past the end")))?;
        CopySource::read(d, off - base, buf)
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
            Disk::Qcow2(Box::new(img))
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
            let size = f
                .len()
                .map_err(|e| Fail::new(format!("Could not stat '{}': {e}", dst.display())))?;
            Disk::Raw {
                file: f,
                size,
                path: dst.clone(),
            }
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
    let bar = Progress::new(a.progress && !a.quiet, total, "convert");
    let mut report = |done: u64, _total: u64| bar.set(done);
    let opts = ConvertOptions {
        compress: a.compress,
        sparse_size: sparse,
        target_is_zero: zero_init,
        top_only: overlay,
        progress: Some(&mut report),
    };
    qcow2_ops::convert(&Concat(&sources), &target, opts)
        .map_err(|e| Fail::new(format!("error while converting: {}", error_text(&e))))?;
    bar.finish();
    if a.compress {
        // As QEMU at the end of a compressed conversion: the file ends on a
        // sector boundary.
        let len = std::fs::metadata(dst).map(|m| m.len()).unwrap_or(0);
        if len % 512 != 0 {
            let f = std::fs::OpenOptions::new().write(true).open(dst);
            f.and_then(|f| f.set_len(len.next_multiple_of(512)))
                .map_err(|e| Fail::new(format!("Could not resize '{}': {e}", dst.display())))?;
        }
    }
    finish(target, dst)?;
    Ok(0)
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
