//! `qcow2 measure`: the file size a new image needs, with qemu-img's syntax,
//! output and exit codes.
//!
//! `qcow2 measure [--output=ofmt] [-O output_fmt] [-o options]
//! [--size N | [--object ...] [--image-opts] [-f fmt] [-l snapshot_param]
//! filename]`
//!
//! For qcow2 the numbers follow QEMU's model of a new image: one header
//! cluster, L2 tables covering the whole virtual size, an L1 table, and the
//! refcount blocks and table covering all of that (grown until they cover
//! themselves). "fully allocated" adds every data cluster; "required" only
//! the clusters of the input that do not read as zeroes (whole clusters).
//! "bitmaps" is the space of the input's persistent bitmaps.

use crate::disk::Disk;
use crate::num::parse_size;
use crate::rebase::getopt;
use crate::Fail;
use clap::Args;
use qcow2_ops::OpenOptions;
use std::path::Path;

/// Arguments of `qcow2 measure` (parsed by hand, as qemu-img's getopt does).
#[derive(Args, Debug)]
#[command(disable_help_flag = true)]
pub struct MeasureArgs {
    /// Options and FILENAME, as for `qemu-img measure`.
    #[arg(allow_hyphen_values = true, trailing_var_arg = true, num_args = 0..)]
    args: Vec<String>,
}

const HELP: &str = "Usage: qcow2 measure [--output=ofmt] [-O output_fmt] [-o options] \
[--size N | [--object objectdef] [--image-opts] [-f fmt] [-l snapshot_param] filename]";

fn usage(msg: &str) -> Fail {
    Fail::new(format!("{msg}\nTry 'qcow2 measure --help' for more info"))
}

/// QEMU's limit on the L1 table size.
const MAX_L1_BYTES: u64 = 32 << 20;

/// Target image options that change the numbers.
struct Target {
    cluster_size: u64,
    refcount_order: u32,
    extended_l2: bool,
    v3: bool,
    prealloc: bool,
}

/// Bytes of refcount blocks and table covering `clusters` clusters plus
/// themselves.
fn refcount_metadata(clusters: u64, cs: u64, order: u32) -> u64 {
    let per_block = (cs * 8) >> order;
    let per_table_cluster = cs / 8;
    let (mut table, mut blocks) = (0u64, 0u64);
    loop {
        let last = table;
        blocks = (clusters + table + blocks).div_ceil(per_block);
        table = blocks.div_ceil(per_table_cluster);
        if table == last {
            return (table + blocks) * cs;
        }
    }
}

/// File size of a fully allocated new image of `size` bytes.
fn prealloc_size(size: u64, t: &Target) -> u64 {
    let cs = t.cluster_size;
    let aligned = size.div_ceil(cs) * cs;
    let l2e: u64 = if t.extended_l2 { 16 } else { 8 };
    let mut meta = cs;
    let nl2e = (aligned / cs).div_ceil(cs / l2e) * (cs / l2e);
    meta += nl2e * l2e;
    let nl1e = (nl2e * l2e / cs).div_ceil(cs / 8) * (cs / 8);
    meta += nl1e * 8;
    meta += refcount_metadata((meta + aligned) / cs, cs, t.refcount_order);
    meta + aligned
}

fn parse_bool(v: &str, key: &str) -> Result<bool, Fail> {
    match v {
        "on" | "yes" | "true" => Ok(true),
        "off" | "no" | "false" => Ok(false),
        _ => Err(Fail::new(format!(
            "Parameter '{key}' expects 'on' or 'off'"
        ))),
    }
}

fn parse_target(options: &[String]) -> Result<Target, Fail> {
    let mut t = Target {
        cluster_size: 65536,
        refcount_order: 4,
        extended_l2: false,
        v3: true,
        prealloc: false,
    };
    for list in options {
        for kv in list.split(',').filter(|s| !s.is_empty()) {
            let (k, v) = kv.split_once('=').unwrap_or((kv, "on"));
            match k {
                "cluster_size" => {
                    let n = parse_size(v).unwrap_or(0);
                    if !n.is_power_of_two() || !(512..=(2 << 20)).contains(&n) {
                        return Err(Fail::new(
                            "Cluster size must be a power of two between 512 and 2048k",
                        ));
                    }
                    t.cluster_size = n;
                }
                "refcount_bits" => {
                    let n: u64 = v.parse().unwrap_or(0);
                    if !n.is_power_of_two() || n > 64 {
                        return Err(Fail::new(
                            "Refcount width must be a power of two and may not exceed 64 bits",
                        ));
                    }
                    t.refcount_order = n.trailing_zeros();
                }
                "extended_l2" => t.extended_l2 = parse_bool(v, k)?,
                "compat" => {
                    t.v3 = match v {
                        "0.10" | "v2" => false,
                        "1.1" | "v3" => true,
                        _ => {
                            return Err(Fail::new(format!(
                                "Invalid parameter '{v}'\nInvalid compatibility level: '{v}'"
                            )))
                        }
                    }
                }
                "preallocation" => {
                    t.prealloc = match v {
                        // Metadata preallocation writes no data clusters.
                        "off" | "metadata" => false,
                        "falloc" | "full" => true,
                        _ => {
                            return Err(Fail::new(format!(
                                "Parameter 'preallocation' does not accept value '{v}'"
                            )))
                        }
                    }
                }
                "lazy_refcounts" | "compression_type" | "cluster_size_lazy" => {}
                _ => {
                    return Err(Fail::new(format!(
                        "Invalid parameter '{k}'\nqcow2 does not support this option"
                    )))
                }
            }
        }
    }
    if t.extended_l2 && t.cluster_size < 16384 {
        return Err(Fail::new(
            "Extended L2 tables require a cluster size of at least 16 KiB",
        ));
    }
    Ok(t)
}

/// Runs `qcow2 measure`.
pub fn run(a: MeasureArgs) -> Result<u8, Fail> {
    let (opts, pos) = getopt(
        a.args,
        &[
            "-f", "-O", "-o", "-l", "--size", "--output", "--object", "--format",
        ],
        "measure",
    )?;
    let mut fmt = None;
    let mut out_fmt = "raw".to_string();
    let mut options: Vec<String> = Vec::new();
    let mut size_arg: Option<String> = None;
    let mut json = false;
    for (k, v) in opts {
        match k.as_str() {
            "-f" | "--format" => fmt = Some(v),
            "-O" => out_fmt = v,
            "-o" => options.push(v),
            "--size" => size_arg = Some(v),
            "--output" => match v.as_str() {
                "json" => json = true,
                "human" => json = false,
                _ => {
                    return Err(usage(&format!(
                        "--output expects 'human' or 'json' not '{v}'"
                    )))
                }
            },
            "-q" | "-U" | "--force-share" | "--object" => {}
            "-l" => return Err(Fail::new("-l is not supported")),
            "-h" | "--help" => {
                println!("{HELP}");
                return Ok(0);
            }
            "--image-opts" => return Err(Fail::new("--image-opts is not supported")),
            _ => {
                return Err(usage(&crate::qopt::unknown(&k)));
            }
        }
    }
    if pos.len() > 1 {
        return Err(usage(&format!("Invalid argument '{}'", pos[1])));
    }
    let file = pos.first();
    if file.is_some() && size_arg.is_some() {
        return Err(Fail::new(
            "--size N cannot be used together with a filename.",
        ));
    }
    if file.is_none() && size_arg.is_none() {
        return Err(Fail::new(
            "Either --size N or one filename must be specified.",
        ));
    }
    let target = match out_fmt.as_str() {
        "qcow2" => Some(parse_target(&options)?),
        "raw" => None,
        other => {
            return Err(Fail::new(format!(
                "Unknown or unsupported output format '{other}' (qcow2 or raw)"
            )))
        }
    };
    let cs = target.as_ref().map_or(512, |t| t.cluster_size);
    let (size, required, bitmaps) = match (file, size_arg) {
        (None, Some(s)) => {
            let n = parse_size(&s)
                .map_err(|_| Fail::new(format!("Invalid image size specified: '{s}'.")))?;
            (n, 0, None)
        }
        (Some(f), _) => {
            let p = Path::new(f);
            let ro = OpenOptions {
                writable: false,
                ..OpenOptions::default()
            };
            let qcow2 = match fmt.as_deref() {
                Some(f) => f == "qcow2",
                None => p.exists() && crate::disk::probe(p)? == "qcow2",
            };
            let disk = if qcow2 {
                Disk::Qcow2(Box::new(crate::rebase::open_with_chain(p, &ro)?))
            } else {
                Disk::open(p, fmt.as_deref(), &ro)
                    .map_err(|e| Fail::new(format!("Could not open '{f}': {}", e.msg)))?
            };
            let size = disk.size();
            let required = data_bytes(&disk, p, size, cs)?;
            let bitmaps = match &disk {
                Disk::Qcow2(img) => Some(bitmaps_size(img, cs)),
                Disk::Raw { .. } => None,
            };
            (size, required, bitmaps)
        }
        (None, None) => unreachable!(),
    };
    let (required, fully, bitmaps) = match &target {
        Some(t) => {
            let vsize = size.div_ceil(cs) * cs;
            let l2e: u64 = if t.extended_l2 { 16 } else { 8 };
            let l2_tables = (vsize / cs).div_ceil(cs / l2e);
            if l2_tables * 8 > MAX_L1_BYTES {
                return Err(Fail::new(
                    "The image size is too large (try using a larger cluster size)",
                ));
            }
            let required = if t.prealloc { vsize } else { required };
            let fully = prealloc_size(vsize, t);
            let bitmaps = if t.v3 { bitmaps } else { None };
            (fully - vsize + required, fully, bitmaps)
        }
        None => {
            // A raw file: QEMU counts every byte in both numbers.
            let size = size.div_ceil(512) * 512;
            (size, size, None)
        }
    };
    if json {
        println!("{{");
        if let Some(b) = bitmaps {
            println!("    \"bitmaps\": {b},");
        }
        println!("    \"required\": {required},");
        println!("    \"fully-allocated\": {fully}");
        println!("}}");
    } else {
        println!("required size: {required}");
        println!("fully allocated size: {fully}");
        if let Some(b) = bitmaps {
            println!("bitmaps size: {b}");
        }
    }
    Ok(0)
}

/// Bytes of the input that do not read as zeroes, each piece extended to
/// the end of its cluster (and counted from the start of the cluster).
fn data_bytes(disk: &Disk, path: &Path, size: u64, cs: u64) -> Result<u64, Fail> {
    let mut required = 0u64;
    let mut off = 0u64;
    while off < size {
        let (n, st) = disk.status(path, off, size - off)?;
        let n = n.max(1);
        if st.zero {
            off += n;
            continue;
        }
        let end = ((off + n).div_ceil(cs) * cs).min(size.div_ceil(cs) * cs);
        required += off % cs + (end - off);
        off = end;
    }
    Ok(required)
}

/// Space for the persistent bitmaps of `img` in a new image of cluster
/// size `cs`: all their data clusters, their tables and the directory.
fn bitmaps_size(img: &qcow2_ops::Image, cs: u64) -> u64 {
    let size = img.virtual_size();
    let mut total = 0u64;
    let mut dir = 0u64;
    for b in img.bitmaps().unwrap_or_default() {
        let bits = size.div_ceil(b.granularity.max(1));
        let clusters = bits.div_ceil(8).div_ceil(cs);
        total += clusters * cs;
        total += (clusters * 8).div_ceil(cs) * cs;
        dir += (24 + b.name.len() as u64).div_ceil(8) * 8;
    }
    total + dir.div_ceil(cs) * cs
}
