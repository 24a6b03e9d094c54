//! `qcow2 map`.

use crate::info::{print_bytes, resolve_backing};
use crate::{check_format, error_text, open_image, Fail, OutputFormat};
use clap::Args;
use qcow2_ops::{MapEntry, OpenOptions};
use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::path::PathBuf;

/// Arguments of `qcow2 map`.
#[derive(Args, Debug)]
pub struct MapArgs {
    /// Output format.
    #[arg(long, value_enum, default_value_t = OutputFormat::Human)]
    output: OutputFormat,
    /// Image format (only qcow2).
    #[arg(short = 'f')]
    format: Option<String>,
    /// Accepted for compatibility (the image is always opened read-only).
    #[arg(short = 'U', long = "force-share")]
    force_share: bool,
    #[command(flatten)]
    spec: crate::imgspec::SpecArgs,

    /// The image.
    file: PathBuf,
}

/// One entry exactly as `qemu-img map --output=json` prints it.
pub fn json_entry(e: &MapEntry) -> String {
    let mut s = format!(
        "{{ \"start\": {}, \"length\": {}, \"depth\": {}, \"present\": {}, \"zero\": {}, \"data\": {}, \"compressed\": {}",
        e.start, e.length, e.depth, e.present, e.zero, e.data, e.compressed
    );
    if let Some(o) = e.offset {
        s.push_str(&format!(", \"offset\": {o}"));
    }
    s.push('}');
    s
}

/// The whole map as `qemu-img map --output=json` prints it (with final newline).
pub fn json_map(entries: &[MapEntry]) -> String {
    let empty = [MapEntry {
        start: 0,
        length: 0,
        depth: 0,
        present: false,
        zero: false,
        data: false,
        compressed: false,
        offset: None,
    }];
    let entries = if entries.is_empty() {
        &empty[..]
    } else {
        entries
    };
    let body: Vec<String> = entries.iter().map(json_entry).collect();
    format!("[{}]\n", body.join(",\n"))
}

/// File names of the backing chain (bytes, need not be UTF-8), index = depth.
/// A layer with an external data file shows that file (where its data is).
fn chain_names(file: &[u8], max_depth: u32) -> Vec<Vec<u8>> {
    let mut names = Vec::new();
    let mut cur = file.to_vec();
    let mut is_qcow2 = true;
    while (names.len() as u32) <= max_depth {
        let opts = OpenOptions {
            open_backing: false,
            metadata_only: true,
            ..OpenOptions::read_only()
        };
        let img = match is_qcow2 {
            true => qcow2_ops::Image::open(OsStr::from_bytes(&cur), &opts).ok(),
            false => None,
        };
        let Some(img) = img else {
            names.push(cur);
            break;
        };
        let info = img.info();
        names.push(match &info.data_file {
            Some(d) => resolve_backing(&cur, d.as_bytes()),
            None => cur.clone(),
        });
        let Some(b) = info.backing_file else { break };
        is_qcow2 = info.backing_format.as_deref() != Some("raw");
        cur = resolve_backing(&cur, &b);
    }
    names
}

/// Runs `qcow2 map`.
pub fn run(a: MapArgs) -> Result<u8, Fail> {
    check_format(&a.format)?;
    let _ = a.force_share;
    a.spec.define()?;
    let mut opts = OpenOptions::read_only();
    let spec = a.spec.resolve(&a.file, None, &mut opts)?;
    let img = open_image(&spec.path, &opts)?;
    let entries = img.map().map_err(|e| {
        Fail::new(format!(
            "{}: Could not read the allocation map: {}",
            a.file.display(),
            error_text(&e)
        ))
    })?;
    match a.output {
        OutputFormat::Json => print!("{}", json_map(&entries)),
        OutputFormat::Human => {
            let max_depth = entries.iter().map(|e| e.depth).max().unwrap_or(0);
            let names = chain_names(a.file.as_os_str().as_bytes(), max_depth);
            println!("{:<16}{:<16}{:<16}File", "Offset", "Length", "Mapped to");
            for e in &entries {
                if e.data && e.offset.is_none() {
                    return Err(Fail::new(
                        "File contains external, encrypted or compressed clusters.",
                    ));
                }
                if e.data && !e.zero {
                    let cols = format!(
                        "{:<16}{:<16}{:<16}",
                        hex(e.start),
                        hex(e.length),
                        hex(e.offset.unwrap_or(0)),
                    );
                    let name = names.get(e.depth as usize).map(Vec::as_slice);
                    print_bytes(&[cols.as_bytes(), name.unwrap_or(b""), b"\n"]);
                }
            }
        }
    }
    Ok(0)
}

fn hex(v: u64) -> String {
    if v == 0 {
        "0".into()
    } else {
        format!("{v:#x}")
    }
}
