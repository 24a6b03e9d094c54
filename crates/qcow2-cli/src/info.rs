//! `qcow2 info`.

use crate::num::size_to_str;
use crate::qjson::{pretty, J};
use crate::{check_format, open_image, Fail, OutputFormat};
use clap::Args;
use qcow2_ops::{ImageInfo, OpenOptions};
use std::io::Write;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::path::PathBuf;

/// Arguments of `qcow2 info`.
#[derive(Args, Debug)]
pub struct InfoArgs {
    /// Output format.
    #[arg(long, value_enum, default_value_t = OutputFormat::Human)]
    output: OutputFormat,
    /// Image format (only qcow2).
    #[arg(short = 'f')]
    format: Option<String>,
    /// Accepted for compatibility (the image is always opened read-only).
    #[arg(short = 'U', long = "force-share")]
    force_share: bool,
    /// The image.
    file: PathBuf,
}

fn format_specific(info: &ImageInfo) -> Vec<(&'static str, J)> {
    if info.version >= 3 {
        vec![
            ("compat", J::S("1.1".into())),
            ("compression-type", J::S(info.compression_type.into())),
            ("lazy-refcounts", J::B(info.lazy_refcounts)),
            ("refcount-bits", J::U(info.refcount_bits as u64)),
            ("corrupt", J::B(info.corrupt)),
            ("extended-l2", J::B(info.extended_l2)),
        ]
    } else {
        vec![
            ("compat", J::S("0.10".into())),
            ("compression-type", J::S(info.compression_type.into())),
            ("refcount-bits", J::U(info.refcount_bits as u64)),
        ]
    }
}

/// Runs `qcow2 info`.
pub fn run(a: InfoArgs) -> Result<u8, Fail> {
    check_format(&a.format)?;
    let _ = a.force_share;
    let opts = OpenOptions {
        open_backing: false,
        ..OpenOptions::read_only()
    };
    let img = open_image(&a.file, &opts)?;
    let info = img.info();
    let meta = std::fs::metadata(&a.file)
        .map_err(|e| Fail::new(format!("Could not stat '{}': {e}", a.file.display())))?;
    let actual = meta.blocks() * 512;
    let file_len = meta.len();
    // File names are bytes (not necessarily UTF-8), printed as such.
    let fname = a.file.as_os_str().as_bytes();
    // qemu shows the name the backing file is opened by: relative names are
    // taken relative to the image's directory, exactly as written.
    let full_backing = info
        .backing_file
        .as_ref()
        .map(|b| resolve_backing(fname, b));
    match a.output {
        OutputFormat::Json => {
            let child = J::O(vec![
                ("children", J::A(vec![])),
                ("virtual-size", J::U(file_len)),
                ("filename", J::R(fname.to_vec())),
                ("format", J::S("file".into())),
                ("actual-size", J::U(actual)),
                (
                    "format-specific",
                    J::O(vec![("type", J::S("file".into())), ("data", J::O(vec![]))]),
                ),
                ("dirty-flag", J::B(false)),
            ]);
            let mut top = vec![(
                "children",
                J::A(vec![J::O(vec![
                    ("name", J::S("file".into())),
                    ("info", child),
                ])]),
            )];
            if let (Some(_), Some(f)) = (&info.backing_file, &info.backing_format) {
                top.push(("backing-filename-format", J::S(f.clone())));
            }
            top.push(("virtual-size", J::U(info.virtual_size)));
            top.push(("filename", J::R(fname.to_vec())));
            top.push(("cluster-size", J::U(info.cluster_size)));
            top.push(("format", J::S("qcow2".into())));
            top.push(("actual-size", J::U(actual)));
            top.push((
                "format-specific",
                J::O(vec![
                    ("type", J::S("qcow2".into())),
                    ("data", J::O(format_specific(&info))),
                ]),
            ));
            if let (Some(b), Some(fb)) = (&info.backing_file, &full_backing) {
                top.push(("full-backing-filename", J::R(fb.clone())));
                top.push(("backing-filename", J::R(b.clone())));
            }
            top.push(("dirty-flag", J::B(info.dirty)));
            println!("{}", pretty(&J::O(top)));
        }
        OutputFormat::Human => {
            print_bytes(&[b"image: ", fname, b"\n"]);
            println!("file format: qcow2");
            println!(
                "virtual size: {} ({} bytes)",
                size_to_str(info.virtual_size),
                info.virtual_size
            );
            println!("disk size: {}", size_to_str(actual));
            println!("cluster_size: {}", info.cluster_size);
            if info.dirty {
                println!("cleanly shut down: no");
            }
            if let (Some(b), Some(fb)) = (&info.backing_file, &full_backing) {
                if b == fb {
                    print_bytes(&[b"backing file: ", b, b"\n"]);
                } else {
                    print_bytes(&[b"backing file: ", b, b" (actual path: ", fb, b")\n"]);
                }
                if let Some(f) = &info.backing_format {
                    println!("backing file format: {f}");
                }
            }
            if info.snapshots > 0 {
                let list = img
                    .snapshots()
                    .map_err(|e| Fail::new(crate::error_text(&e)))?;
                print!("{}", crate::snapshot::format_list(&list));
            }
            println!("Format specific information:");
            for (k, v) in format_specific(&info) {
                let v = match v {
                    J::S(s) => s,
                    J::B(b) => b.to_string(),
                    J::U(n) => n.to_string(),
                    _ => String::new(),
                };
                println!("    {}: {}", k.replace('-', " "), v);
            }
            if let Some(d) = &info.data_file {
                println!("    data file: {d}");
            }
            println!("Child node '/file':");
            print_bytes(&[b"    filename: ", fname, b"\n"]);
            println!("    protocol type: file");
            println!(
                "    file length: {} ({} bytes)",
                size_to_str(file_len),
                file_len
            );
            println!("    disk size: {}", size_to_str(actual));
        }
    }
    Ok(0)
}

/// Writes byte strings to stdout (file names need not be UTF-8).
pub fn print_bytes(parts: &[&[u8]]) {
    let mut o = std::io::stdout().lock();
    for p in parts {
        let _ = o.write_all(p);
    }
}

/// How qemu names a relative backing file: relative to the image's
/// directory. Bytes: file names need not be UTF-8.
pub fn resolve_backing(image: &[u8], backing: &[u8]) -> Vec<u8> {
    if backing.starts_with(b"/") {
        return backing.to_vec();
    }
    match image.iter().rposition(|&c| c == b'/') {
        Some(i) => [&image[..=i], backing].concat(),
        None => backing.to_vec(),
    }
}
