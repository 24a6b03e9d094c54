//! `qcow2 check`.

use crate::qjson::{pretty, J};
use crate::{check_format, error_text, open_image, strerror, Fail, OutputFormat};
use clap::{Args, ValueEnum};
use qcow2_ops::{CheckReport, OpenOptions, RepairMode};
use std::path::PathBuf;

/// What `-r` repairs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Repair {
    /// Leaked clusters only.
    Leaks,
    /// Leaks and wrong refcounts.
    All,
}

/// Arguments of `qcow2 check`.
#[derive(Args, Debug)]
pub struct CheckArgs {
    /// Output format.
    #[arg(long, value_enum, default_value_t = OutputFormat::Human)]
    output: OutputFormat,
    /// Repair (opens the image read-write).
    #[arg(short = 'r', value_enum)]
    repair: Option<Repair>,
    /// Image format (only qcow2).
    #[arg(short = 'f')]
    format: Option<String>,
    /// Quiet: print nothing on success.
    #[arg(short = 'q')]
    quiet: bool,
    #[command(flatten)]
    spec: crate::imgspec::SpecArgs,

    /// The image.
    file: PathBuf,
}

fn json(r: &CheckReport, filename: &[u8]) -> String {
    // Keys appear only when non-zero, except check-errors, filename, format;
    // the order is the one qemu-img prints.
    let mut o: Vec<(&'static str, J)> = Vec::new();
    let opt = |o: &mut Vec<(&'static str, J)>, k: &'static str, v: u64| {
        if v != 0 {
            o.push((k, J::U(v)));
        }
    };
    opt(&mut o, "image-end-offset", r.image_end_offset);
    opt(&mut o, "compressed-clusters", r.compressed_clusters);
    opt(&mut o, "total-clusters", r.total_clusters);
    opt(&mut o, "corruptions", r.corruptions);
    opt(&mut o, "corruptions-fixed", r.corruptions_fixed);
    o.push(("check-errors", J::U(r.check_errors)));
    opt(&mut o, "leaks", r.leaks);
    opt(&mut o, "leaks-fixed", r.leaks_fixed);
    opt(&mut o, "allocated-clusters", r.allocated_clusters);
    o.push(("filename", J::R(filename.to_vec())));
    o.push(("format", J::S("qcow2".into())));
    opt(&mut o, "fragmented-clusters", r.fragmented_clusters);
    pretty(&J::O(o))
}

fn human(r: &CheckReport) -> String {
    let mut s = String::new();
    if r.leaks_fixed > 0 || r.corruptions_fixed > 0 {
        s.push_str(&format!(
            "The following inconsistencies were found and repaired:\n\n    {} leaked clusters\n    {} corruptions\n\nDouble checking the fixed image now...\n",
            r.leaks_fixed, r.corruptions_fixed
        ));
    }
    if r.corruptions == 0 && r.leaks == 0 && r.check_errors == 0 {
        s.push_str("No errors were found on the image.\n");
    } else {
        if r.corruptions > 0 {
            s.push_str(&format!(
                "\n{} errors were found on the image.\nData may be corrupted, or further writes to the image may corrupt it.\n",
                r.corruptions
            ));
        }
        if r.leaks > 0 {
            s.push_str(&format!(
                "\n{} leaked clusters were found on the image.\nThis means waste of disk space, but no harm to data.\n",
                r.leaks
            ));
        }
        if r.check_errors > 0 {
            s.push_str(&format!(
                "\n{} internal errors have occurred during the check.\n",
                r.check_errors
            ));
        }
    }
    if r.total_clusters != 0 && r.allocated_clusters != 0 {
        let pct = |n: u64, d: u64| n as f64 * 100.0 / d as f64;
        s.push_str(&format!(
            "{}/{} = {:.2}% allocated, {:.2}% fragmented, {:.2}% compressed clusters\n",
            r.allocated_clusters,
            r.total_clusters,
            pct(r.allocated_clusters, r.total_clusters),
            pct(r.fragmented_clusters, r.allocated_clusters),
            pct(r.compressed_clusters, r.allocated_clusters),
        ));
    }
    if r.image_end_offset != 0 {
        s.push_str(&format!("Image end offset: {}\n", r.image_end_offset));
    }
    s
}

/// Runs `qcow2 check`; exit status 0 clean, 1 failed, 2 corruptions, 3 leaks.
pub fn run(a: CheckArgs) -> Result<u8, Fail> {
    check_format(&a.format)?;
    let filename = a.file.to_string_lossy().into_owned();
    a.spec.define()?;
    let (mode, mut opts) = match a.repair {
        None => (
            RepairMode::None,
            OpenOptions {
                open_backing: false,
                ..OpenOptions::read_only()
            },
        ),
        Some(r) => (
            if r == Repair::Leaks {
                RepairMode::Leaks
            } else {
                RepairMode::All
            },
            OpenOptions {
                open_backing: false,
                for_repair: true,
                ..OpenOptions::read_write()
            },
        ),
    };
    let spec = a.spec.resolve(&a.file, None, &mut opts)?;
    let img = open_image(&spec.path, &opts)?;
    // A bar at a terminal while the L2 tables are walked (long on large
    // images); qemu-img shows none, so never in quiet, JSON or piped use.
    let mut bar = crate::progress::Bar::new(
        !a.quiet && matches!(a.output, OutputFormat::Human),
        "Checking [{bar:40}] {percent:>3}% {pos}/{len} L2 tables ({eta})",
    );
    let checked = img.check_with_progress(mode, &mut |done, total| bar.update(done, total));
    bar.finish();
    let report = match checked {
        Ok(r) => r,
        Err(e) => {
            return Err(Fail::new(format!(
                "Check failed: {} ({})",
                strerror(e.errno()),
                error_text(&e)
            )))
        }
    };
    for m in &report.messages {
        eprintln!("{m}");
    }
    let close = img.close();
    match a.output {
        OutputFormat::Json => println!(
            "{}",
            json(
                &report,
                std::os::unix::ffi::OsStrExt::as_bytes(a.file.as_os_str())
            )
        ),
        OutputFormat::Human => {
            if !a.quiet || report.corruptions > 0 || report.leaks > 0 || report.check_errors > 0 {
                print!("{}", human(&report));
            }
        }
    }
    if let Err(e) = close {
        return Err(Fail::new(format!("{filename}: {}", error_text(&e))));
    }
    if report.check_errors > 0 {
        return Err(Fail::new("Check failed"));
    }
    Ok(if report.corruptions > 0 {
        2
    } else if report.leaks > 0 {
        3
    } else {
        0
    })
}
