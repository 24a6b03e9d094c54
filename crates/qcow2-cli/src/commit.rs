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
use qcow2_ops::{CopyTarget, Image, OpenOptions};
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
    copy_above(&img, &base, &base_path, base_depth, progress)?;
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
/// `base` (the engine's commit loop, in granules of the base's cluster
/// size, at least 4 KiB; 64 KiB for a raw base, as QEMU's mirror job).
fn copy_above(
    img: &Image,
    base: &Disk,
    base_path: &Path,
    base_depth: u32,
    progress: bool,
) -> Result<(), Fail> {
    let bar = Progress::new(progress, img.virtual_size(), "commit");
    let mut report = |done: u64, _total: u64| bar.set(done);
    let gran = CopyTarget::cluster_size(base).max(4096);
    qcow2_ops::commit_into(img, base, base_depth, gran, Some(&mut report)).map_err(|e| {
        Fail::new(format!(
            "Error while committing into '{}': {}",
            base_path.display(),
            error_text(&e)
        ))
    })?;
    bar.finish();
    Ok(())
}
