//! `qcow2 commit`: write the data of an overlay into its backing file, with
//! qemu-img's syntax, messages and exit codes.
//!
//! `qcow2 commit [--object ...] [-q] [-f fmt] [-t cache] [-b base] [-r rate]
//! [-d] [-p] filename`
//!
//! Every range allocated above the base (in the image itself, or with `-b`
//! also in the layers between) is written into the base: data as data, zero
//! ranges as zeroes (unmapping). Then, unless `-d` or `-b` is given, the
//! image is emptied: all its clusters become unallocated.

use crate::disk::{Disk, Progress};
use crate::rebase::getopt;
use crate::{error_text, Fail};
use clap::Args;
use qcow2_ops::io::Storage;
use qcow2_ops::{Image, OpenOptions, REQ_MAY_UNMAP};
use std::path::{Path, PathBuf};

/// Arguments of `qcow2 commit` (parsed by hand, as qemu-img's getopt does).
#[derive(Args, Debug)]
#[command(disable_help_flag = true)]
pub struct CommitArgs {
    /// Options and FILENAME, as for `qemu-img commit`.
    #[arg(allow_hyphen_values = true, trailing_var_arg = true, num_args = 0..)]
    args: Vec<String>,
}

const HELP: &str = "Usage: qcow2 commit [--object ...] [-q] [-f fmt] [-t cache] [-b base] \
[-r rate_limit] [-d] [-p] filename";

fn usage(msg: &str) -> Fail {
    Fail::new(format!("{msg}\nTry 'qcow2 commit --help' for more info"))
}

/// Runs `qcow2 commit`.
pub fn run(a: CommitArgs) -> Result<u8, Fail> {
    let (opts, pos) = getopt(
        a.args,
        &["-f", "-t", "-b", "-r", "--object", "--format"],
        "commit",
    )?;
    let mut fmt = None;
    let mut base_arg: Option<String> = None;
    let mut drop = false;
    let mut quiet = false;
    let mut progress = false;
    let mut image_opts = false;
    for (k, v) in opts {
        match k.as_str() {
            "-f" | "--format" => fmt = Some(v),
            "-b" => base_arg = Some(v),
            "-d" => drop = true,
            "-q" => quiet = true,
            "-p" => progress = true,
            "--object" => crate::secrets::define(&v).map_err(Fail::new)?,
            "-t" | "-r" => {}
            "-h" | "--help" => {
                println!("{HELP}");
                return Ok(0);
            }
            "--image-opts" => image_opts = true,
            _ => {
                return Err(usage(&crate::qopt::unknown(&k)));
            }
        }
    }
    if pos.len() != 1 {
        return Err(usage("Expecting one image file name"));
    }
    let mut top_opts = OpenOptions::read_write();
    let spec = crate::imgspec::SpecArgs {
        object: Vec::new(),
        image_opts,
    }
    .resolve(Path::new(&pos[0]), fmt.as_deref(), &mut top_opts)?;
    let file = spec.path;
    let fmt = spec.fmt;
    match fmt.as_deref() {
        None | Some("qcow2") => {}
        Some(f) => {
            return Err(Fail::new(format!(
                "Unknown or unsupported format '{f}' (only qcow2 is supported)"
            )))
        }
    }
    let img = crate::rebase::open_with_chain(&file, &top_opts)?;
    // The chain below the image: (path, format) per layer, depth 1 first.
    let chain = chain_of(&file, &img)?;
    if chain.is_empty() {
        return Err(Fail::new("Image does not have a backing file"));
    }
    let base_depth = match &base_arg {
        None => 1,
        Some(b) => {
            let want = std::fs::canonicalize(b).ok();
            chain
                .iter()
                .position(|(p, _)| want.is_some() && std::fs::canonicalize(p).ok() == want)
                .map(|i| i as u32 + 1)
                .ok_or_else(|| {
                    Fail::new(format!(
                        "Did not find '{b}' in the backing chain of '{}'",
                        file.display()
                    ))
                })?
        }
    };
    let (base_path, base_fmt) = chain[base_depth as usize - 1].clone();
    let base_opts = OpenOptions {
        // The key of `backing.encrypt.key-secret` is the first backing file's.
        key_secret: if base_depth == 1 {
            top_opts.backing_key_secret.clone()
        } else {
            None
        },
        ..OpenOptions::read_write()
    };
    let base = Disk::open(&base_path, base_fmt.as_deref(), &base_opts)?;
    if base.size() < img.virtual_size() {
        return Err(Fail::new(format!(
            "Top image {} is larger than base image {}, and resize of base image failed: \
             Operation not supported",
            file.display(),
            base_path.display()
        )));
    }
    copy_above(&img, &file, &base, &base_path, base_depth, progress)?;
    match base {
        Disk::Qcow2(b) => b.close().map_err(|e| {
            Fail::new(format!(
                "Could not close '{}': {}",
                base_path.display(),
                error_text(&e)
            ))
        })?,
        Disk::Raw { file: f, .. } => f.sync().map_err(|e| {
            Fail::new(format!(
                "Could not flush '{}': {}",
                base_path.display(),
                crate::strerror(e.raw_os_error().unwrap_or(5))
            ))
        })?,
    }
    // With -b the image is kept as it is (qemu-img: -b implies -d).
    if !drop && base_arg.is_none() {
        img.make_empty().map_err(|e| {
            Fail::new(format!(
                "Could not empty {}: {}",
                file.display(),
                error_text(&e)
            ))
        })?;
    }
    img.close().map_err(|e| {
        Fail::new(format!(
            "Could not close '{}': {}",
            file.display(),
            error_text(&e)
        ))
    })?;
    if !quiet {
        println!("Image committed.");
    }
    Ok(0)
}

/// The backing chain of the image at `file`: (path, format) per layer.
fn chain_of(file: &Path, img: &Image) -> Result<Vec<(PathBuf, Option<String>)>, Fail> {
    let mut out = Vec::new();
    let mut info = img.info();
    let mut cur = file.to_path_buf();
    while let Some(name) = info.backing_file.clone() {
        let name = String::from_utf8_lossy(&name).into_owned();
        let p = crate::rebase::backing_path(&cur, &name);
        let fmt = info.backing_format.clone();
        out.push((p.clone(), fmt.clone()));
        if out.len() > 64 || fmt.as_deref() == Some("raw") {
            break;
        }
        let o = OpenOptions {
            writable: false,
            open_backing: false,
            ..OpenOptions::default()
        };
        match Image::open(&p, &o) {
            Ok(i) => info = i.info(),
            Err(_) => break,
        }
        cur = p;
    }
    Ok(out)
}

/// Writes every range of `img` allocated above layer `base_depth` into
/// `base`. As QEMU's commit (a mirror job), the work is done in granules of
/// the base's cluster size, at least 4 KiB (64 KiB for a raw base): a granule with any byte
/// allocated above the base is copied whole, or zeroed (unmapping) when all
/// of it reads as zeroes from above.
fn copy_above(
    img: &Image,
    file: &Path,
    base: &Disk,
    base_path: &Path,
    base_depth: u32,
    progress: bool,
) -> Result<(), Fail> {
    let size = img.virtual_size();
    let gran = match base {
        Disk::Qcow2(b) => b.cluster_size().max(4096),
        Disk::Raw { .. } => 64 << 10,
    };
    let bar = Progress::new(progress, size, "commit");
    let werr = |e: String| {
        Fail::new(format!(
            "Error while committing: could not write to '{}': {e}",
            base_path.display()
        ))
    };
    let mut buf = vec![0u8; gran as usize];
    let mut off = 0u64;
    while off < size {
        let end = (off + gran).min(size);
        // What the granule holds above the base.
        let (mut any_above, mut all_zero) = (false, true);
        let mut p = off;
        while p < end {
            let m = img.block_status_limit(p, end - p, 1).map_err(|e| {
                Fail::new(format!(
                    "Error while committing: block status of '{}' at offset {p}: {}",
                    file.display(),
                    error_text(&e)
                ))
            })?;
            let (n_end, above, zero) = match m.first() {
                Some(e) => (
                    (e.start + e.length).clamp(p + 1, end),
                    e.present && e.depth < base_depth,
                    e.zero,
                ),
                None => (end, false, false),
            };
            any_above |= above;
            all_zero &= above && zero;
            p = n_end;
        }
        if any_above {
            let n = end - off;
            if all_zero {
                match base {
                    Disk::Qcow2(b) => b
                        .write_zeroes(off, n, REQ_MAY_UNMAP)
                        .map_err(|e| werr(error_text(&e)))?,
                    Disk::Raw { file: f, .. } => {
                        // Unmapping zeroes on a file: a hole, as QEMU punches.
                        if !f.punch_hole(off, n).unwrap_or(false) {
                            let z = vec![0u8; n as usize];
                            f.write_at(&z, off).map_err(|e| {
                                werr(crate::strerror(e.raw_os_error().unwrap_or(5)))
                            })?;
                        }
                    }
                }
            } else {
                let b = &mut buf[..n as usize];
                img.read(off, b).map_err(|e| {
                    Fail::new(format!(
                        "Error while committing: could not read '{}': {}",
                        file.display(),
                        error_text(&e)
                    ))
                })?;
                match base {
                    Disk::Qcow2(bi) => bi.write(off, b, 0).map_err(|e| werr(error_text(&e)))?,
                    Disk::Raw { file: f, .. } => f
                        .write_at(b, off)
                        .map_err(|e| werr(crate::strerror(e.raw_os_error().unwrap_or(5))))?,
                }
            }
        }
        off = end;
        bar.set(off);
    }
    bar.finish();
    Ok(())
}
