//! `qcow2 amend`: change format options of an image with qemu-img's syntax,
//! messages and exit codes.
//!
//! `qcow2 amend [--object ...] [-p] [-q] [-f fmt] [-t cache] [--force] -o options filename`

use crate::{check_format, error_text, open_image, Fail};
use clap::Args;
use qcow2_ops::{AmendOptions, Error, OpenOptions};
use std::path::Path;

/// Arguments of `qcow2 amend` (parsed by hand, like qemu-img's getopt).
#[derive(Args, Debug)]
#[command(disable_help_flag = true)]
pub struct AmendArgs {
    /// Options and FILENAME, as for `qemu-img amend`.
    #[arg(allow_hyphen_values = true, trailing_var_arg = true, num_args = 0..)]
    args: Vec<String>,
}

const HELP: &str = "Usage: qcow2 amend [--object ...] [-p] [-q] [-f fmt] [-t cache] [--force] \
-o options filename";

fn usage(msg: &str) -> Fail {
    Fail::new(format!("{msg}\nTry 'qcow2 amend --help' for more info"))
}

/// Creation options `amend` cannot change.
const CREATE_ONLY: &[&str] = &[
    "cluster_size",
    "preallocation",
    "extended_l2",
    "compression_type",
    "encrypt",
    "encrypt.format",
    "encryption",
];

fn on_off(k: &str, v: &str) -> Result<bool, Fail> {
    match v {
        "on" => Ok(true),
        "off" => Ok(false),
        _ => Err(Fail::new(format!("Parameter '{k}' expects 'on' or 'off'"))),
    }
}

/// Parses the `-o` options as qemu-img does after opening the image: first
/// the syntax of every option in command-line order (unknown and
/// creation-only names, values of the wrong type), then what the values
/// mean, in the order of qcow2's option list (compat, data_file,
/// data_file_raw, refcount_bits). The engine does not support external
/// data files, so an image open here has none: `data_file` is refused and
/// `data_file_raw=on` too, with QEMU's messages; `data_file_raw=off` is
/// nothing to do. A changed backing file is refused by the engine (after
/// the changes QEMU makes before that refusal).
fn parse_opts(all: &[String]) -> Result<(AmendOptions, Option<u64>), Fail> {
    let mut o = AmendOptions::default();
    let mut size = None;
    let mut compat: Option<String> = None;
    let mut data_file = false;
    let mut data_file_raw = false;
    let mut refcount_bits: Option<u64> = None;
    for s in all {
        for kv in s.split(',').filter(|p| !p.is_empty()) {
            let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
            match k {
                "compat" => compat = Some(v.to_string()),
                "lazy_refcounts" => o.lazy_refcounts = Some(on_off(k, v)?),
                "refcount_bits" => {
                    refcount_bits = Some(
                        v.parse()
                            .map_err(|_| Fail::new("Parameter 'refcount_bits' expects a number"))?,
                    )
                }
                "size" => {
                    size = Some(
                        crate::num::parse_size(v)
                            .map_err(|_| Fail::new("Parameter 'size' expects a size"))?,
                    )
                }
                "backing_file" => o.backing_file = Some(v.to_string()),
                "backing_fmt" => o.backing_fmt = Some(v.to_string()),
                "data_file" => data_file = true,
                "data_file_raw" => data_file_raw = on_off(k, v)?,
                k if CREATE_ONLY.contains(&k) => {
                    return Err(Fail::new(format!(
                        "Invalid parameter '{k}'\nThis option is only supported for image creation"
                    )))
                }
                _ => return Err(Fail::new(format!("Invalid parameter '{k}'"))),
            }
        }
    }
    if let Some(v) = compat {
        o.version = Some(match v.as_str() {
            "0.10" | "v2" => 2,
            "1.1" | "v3" => 3,
            _ => return Err(Fail::new(format!("Unknown compatibility level {v}"))),
        });
    }
    if data_file {
        return Err(Fail::new(
            "data-file can only be set for images that use an external data file",
        ));
    }
    if data_file_raw {
        return Err(Fail::new("data-file-raw cannot be set on existing images"));
    }
    if let Some(n) = refcount_bits {
        if n == 0 || n > 64 || !n.is_power_of_two() {
            return Err(Fail::new(
                "Refcount width must be a power of two and may not exceed 64 bits",
            ));
        }
        o.refcount_bits = Some(n as u32);
    }
    Ok((o, size))
}

/// Runs `qcow2 amend`.
pub fn run(a: AmendArgs) -> Result<u8, Fail> {
    let mut fmt = None;
    let mut quiet = false;
    let mut opts: Vec<String> = Vec::new();
    let mut pos: Vec<String> = Vec::new();
    let mut only_pos = false;
    let mut it = a.args.into_iter();
    while let Some(s) = it.next() {
        if only_pos || !s.starts_with('-') || s == "-" {
            pos.push(s);
            continue;
        }
        let (key, inline) = crate::qopt::split(&s);
        let val =
            |it: &mut std::vec::IntoIter<String>| crate::qopt::value(&key, &inline, it, usage);
        match key.as_str() {
            "--" => only_pos = true,
            "-q" | "--quiet" => quiet = true,
            "-p" | "--progress" | "--force" => {}
            "-f" | "--format" => fmt = Some(val(&mut it)?),
            "-o" | "--options" => opts.push(val(&mut it)?),
            "-t" | "--cache" | "--object" => {
                val(&mut it)?;
            }
            "--image-opts" => return Err(Fail::new("--image-opts is not supported")),
            "-h" | "--help" => {
                println!("{HELP}");
                return Ok(0);
            }
            _ => return Err(usage(&format!("unrecognized option '{s}'"))),
        }
    }
    let _ = quiet;
    if opts.is_empty() {
        return Err(usage("Must specify options (-o)"));
    }
    if pos.len() != 1 {
        return Err(usage("Expecting one image file name"));
    }
    let file = &pos[0];
    check_format(&fmt)?;
    // qemu-img opens the image before it reads the options.
    let img = open_image(Path::new(file), &OpenOptions::read_write())?;
    let (o, size) = match parse_opts(&opts) {
        Ok(p) => p,
        Err(f) => {
            let _ = img.close();
            return Err(f);
        }
    };
    let mut status = img.amend(&o).map_err(|e| {
        Fail::new(match &e {
            Error::Invalid(m) | Error::NotSupported(m) | Error::NoSpace(m) => m.clone(),
            _ => error_text(&e),
        })
    });
    if let (Ok(()), Some(sz)) = (&status, size) {
        if sz != img.virtual_size() {
            status = img
                .resize(sz, qcow2_ops::Prealloc::Off, true)
                .map_err(|e| Fail::new(error_text(&e)));
        }
    }
    let closed = img.close();
    match (status, closed) {
        (Err(f), _) => Err(f),
        (Ok(()), Err(e)) => Err(Fail::new(format!("{file}: {}", error_text(&e)))),
        (Ok(()), Ok(())) => Ok(0),
    }
}
