//! `qcow2 info`.

use crate::num::size_to_str;
use crate::qjson::{pretty, J};
use crate::{check_format, error_text, open_image, strerror, Fail, OutputFormat};
use clap::Args;
use qcow2_ops::{BitmapInfo, EncryptionInfo, ImageInfo, OpenOptions, SnapshotInfo};
use std::ffi::OsStr;
use std::io::Write;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

/// Arguments of `qcow2 info`.
#[derive(Args, Debug)]
pub struct InfoArgs {
    /// Output format.
    #[arg(long, value_enum, default_value_t = OutputFormat::Human)]
    output: OutputFormat,
    /// Image format (qcow2 or raw; probed when not given).
    #[arg(short = 'f')]
    format: Option<String>,
    /// Describe every image of the backing chain, top first.
    #[arg(long = "backing-chain")]
    backing_chain: bool,
    /// Accepted for compatibility (the image is always opened read-only).
    #[arg(short = 'U', long = "force-share")]
    force_share: bool,
    #[command(flatten)]
    spec: crate::imgspec::SpecArgs,
    /// The image.
    file: PathBuf,
}

fn format_specific(info: &ImageInfo, bitmaps: &[BitmapInfo]) -> Vec<(&'static str, J)> {
    if info.version >= 3 {
        let mut v = vec![
            ("compat", J::S("1.1".into())),
            ("compression-type", J::S(info.compression_type.into())),
            ("lazy-refcounts", J::B(info.lazy_refcounts)),
        ];
        if !bitmaps.is_empty() {
            v.push(("bitmaps", bitmaps_json(bitmaps)));
        }
        v.push(("refcount-bits", J::U(info.refcount_bits as u64)));
        if let Some(d) = &info.data_file {
            v.push(("data-file", J::S(d.clone())));
            v.push(("data-file-raw", J::B(info.data_file_raw)));
        }
        v.extend(encrypt_json(info));
        v.extend([
            ("corrupt", J::B(info.corrupt)),
            ("extended-l2", J::B(info.extended_l2)),
        ]);
        v
    } else {
        let mut v = vec![
            ("compat", J::S("0.10".into())),
            ("compression-type", J::S(info.compression_type.into())),
            ("refcount-bits", J::U(info.refcount_bits as u64)),
        ];
        v.extend(encrypt_json(info));
        v
    }
}

/// The `"encrypt"` object of the format-specific data (keys in QEMU's order).
fn encrypt_json(info: &ImageInfo) -> Option<(&'static str, J)> {
    let l = match info.encryption.as_ref()? {
        EncryptionInfo::Aes => {
            return Some(("encrypt", J::O(vec![("format", J::S("aes".into()))])))
        }
        EncryptionInfo::Luks(l) => l,
    };
    let mut v = vec![
        ("ivgen-alg", J::S(l.ivgen_alg.clone())),
        ("detached-header", J::B(false)),
        ("hash-alg", J::S(l.hash_alg.clone())),
        ("cipher-alg", J::S(l.cipher_alg.clone())),
        ("uuid", J::S(l.uuid.clone())),
    ];
    if let Some(h) = &l.ivgen_hash_alg {
        v.push(("ivgen-hash-alg", J::S(h.clone())));
    }
    v.push(("format", J::S("luks".into())));
    v.push(("cipher-mode", J::S(l.cipher_mode.clone())));
    let slots = l
        .slots
        .iter()
        .map(|s| {
            let mut o = vec![("active", J::B(s.active))];
            if let Some(i) = s.iters {
                o.push(("iters", J::U(i as u64)));
            }
            o.push(("key-offset", J::U(s.key_offset)));
            if let Some(n) = s.stripes {
                o.push(("stripes", J::U(n as u64)));
            }
            J::O(o)
        })
        .collect();
    v.push(("slots", J::A(slots)));
    v.push(("payload-offset", J::U(l.payload_offset)));
    v.push(("master-key-iters", J::U(l.master_key_iters as u64)));
    Some(("encrypt", J::O(v)))
}

/// One image of the chain, described as qemu-img describes it.
struct Described {
    /// The JSON object (`ImageInfo`).
    json: J,
    /// The human text.
    human: Vec<u8>,
    /// The backing file: the name it is opened by, and its format (given
    /// in the header or probed).
    backing: Option<(Vec<u8>, String)>,
}

/// The persistent bitmaps in the format-specific data (keys in QEMU's
/// order; flags "in-use" before "auto").
fn bitmaps_json(list: &[BitmapInfo]) -> J {
    J::A(
        list.iter()
            .map(|b| {
                let mut flags = Vec::new();
                if b.in_use {
                    flags.push(J::S("in-use".into()));
                }
                if b.enabled {
                    flags.push(J::S("auto".into()));
                }
                J::O(vec![
                    ("flags", J::A(flags)),
                    ("name", J::S(b.name.clone())),
                    ("granularity", J::U(b.granularity)),
                ])
            })
            .collect(),
    )
}

/// Human text of format-specific data as qemu-img prints it: one
/// `key: value` line per scalar ('-' in keys shown as ' '), nested lists
/// and objects under their key, list items as `[i]:`.
fn dump_human(items: &[(&'static str, J)], level: usize, out: &mut Vec<u8>) {
    for (k, v) in items {
        dump_value(&k.replace('-', " "), v, level, out);
    }
}

fn dump_value(label: &str, v: &J, level: usize, out: &mut Vec<u8>) {
    let pad = " ".repeat(4 * level);
    let scalar = match v {
        J::S(s) => Some(s.clone()),
        J::B(b) => Some(b.to_string()),
        J::U(n) => Some(n.to_string()),
        J::I(n) => Some(n.to_string()),
        J::R(b) => Some(String::from_utf8_lossy(b).into_owned()),
        J::A(_) | J::O(_) => None,
    };
    match (scalar, v) {
        (Some(s), _) => out.extend_from_slice(format!("{pad}{label}: {s}\n").as_bytes()),
        (None, J::A(items)) => {
            out.extend_from_slice(format!("{pad}{label}:\n").as_bytes());
            for (i, it) in items.iter().enumerate() {
                dump_value(&format!("[{i}]"), it, level + 1, out);
            }
        }
        (None, J::O(items)) => {
            out.extend_from_slice(format!("{pad}{label}:\n").as_bytes());
            dump_human(items, level + 1, out);
        }
        (None, _) => {}
    }
}

/// The `"snapshots"` array of `qemu-img info --output=json`. Keys in
/// QEMU's order (that of its dictionary's hash buckets).
fn snapshots_json(list: &[SnapshotInfo]) -> J {
    J::A(
        list.iter()
            .map(|s| {
                let mut o = Vec::new();
                if let Some(i) = s.icount.filter(|&i| i != u64::MAX) {
                    o.push(("icount", J::I(i as i64)));
                }
                o.extend([
                    ("vm-clock-nsec", J::U(s.vm_clock_nsec % 1_000_000_000)),
                    ("name", J::S(s.name.clone())),
                    ("date-sec", J::U(s.date_sec as u64)),
                    ("date-nsec", J::U(s.date_nsec as u64)),
                    ("vm-clock-sec", J::U(s.vm_clock_nsec / 1_000_000_000)),
                    ("id", J::S(s.id.clone())),
                    ("vm-state-size", J::U(s.vm_state_size)),
                ]);
                J::O(o)
            })
            .collect(),
    )
}

/// The protocol-level child node (`"file"`), JSON.
fn file_child(fname: &[u8], file_len: u64, actual: u64) -> J {
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
    J::A(vec![J::O(vec![
        ("name", J::S("file".into())),
        ("info", child),
    ])])
}

/// The protocol-level child node (`"file"`), human text.
fn file_child_human(out: &mut Vec<u8>, fname: &[u8], file_len: u64, actual: u64) {
    out.extend_from_slice(b"Child node '/file':\n    filename: ");
    out.extend_from_slice(fname);
    out.extend_from_slice(
        format!(
            "\n    protocol type: file\n    file length: {} ({} bytes)\n    disk size: {}\n",
            size_to_str(file_len),
            file_len,
            size_to_str(actual)
        )
        .as_bytes(),
    );
}

/// Describes the image `fname` of format `format` (qcow2 or raw).
fn describe(fname: &[u8], format: &str) -> Result<Described, Fail> {
    let path = Path::new(OsStr::from_bytes(fname));
    // As qemu-img: the format layer's message wraps the file layer's.
    let meta = std::fs::metadata(path).map_err(|e| {
        let p = path.display();
        Fail::new(format!(
            "Could not open '{p}': Could not open '{p}': {}",
            strerror(e.raw_os_error().unwrap_or(5))
        ))
    })?;
    let actual = meta.blocks() * 512;
    // QEMU's block layer counts whole 512-byte sectors.
    let file_len = meta.len().div_ceil(512) * 512;
    if format == "raw" {
        let json = J::O(vec![
            ("children", file_child(fname, file_len, actual)),
            ("virtual-size", J::U(file_len)),
            ("filename", J::R(fname.to_vec())),
            ("format", J::S("raw".into())),
            ("actual-size", J::U(actual)),
            ("dirty-flag", J::B(false)),
        ]);
        let mut human = Vec::new();
        human.extend_from_slice(b"image: ");
        human.extend_from_slice(fname);
        human.extend_from_slice(
            format!(
                "\nfile format: raw\nvirtual size: {} ({} bytes)\ndisk size: {}\n",
                size_to_str(file_len),
                file_len,
                size_to_str(actual)
            )
            .as_bytes(),
        );
        file_child_human(&mut human, fname, file_len, actual);
        return Ok(Described {
            json,
            human,
            backing: None,
        });
    }
    let opts = OpenOptions {
        open_backing: false,
        // As QEMU's info: an encrypted image needs no key.
        metadata_only: true,
        ..OpenOptions::read_only()
    };
    let img = open_image(path, &opts)?;
    let info = img.info();
    let snapshots = if info.snapshots > 0 {
        img.snapshots().map_err(|e| Fail::new(error_text(&e)))?
    } else {
        Vec::new()
    };
    let bitmaps = if info.version >= 3 {
        img.bitmaps().map_err(|e| Fail::new(error_text(&e)))?
    } else {
        Vec::new()
    };
    // qemu shows the name the backing file is opened by: relative names are
    // taken relative to the image's directory, exactly as written.
    let full_backing = info
        .backing_file
        .as_ref()
        .map(|b| resolve_backing(fname, b));

    let mut top = vec![("children", file_child(fname, file_len, actual))];
    if let (Some(_), Some(f)) = (&info.backing_file, &info.backing_format) {
        top.push(("backing-filename-format", J::S(f.clone())));
    }
    if !snapshots.is_empty() {
        top.push(("snapshots", snapshots_json(&snapshots)));
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
            ("data", J::O(format_specific(&info, &bitmaps))),
        ]),
    ));
    if let (Some(b), Some(fb)) = (&info.backing_file, &full_backing) {
        top.push(("full-backing-filename", J::R(fb.clone())));
        top.push(("backing-filename", J::R(b.clone())));
    }
    if info.encryption.is_some() {
        top.push(("encrypted", J::B(true)));
    }
    top.push(("dirty-flag", J::B(info.dirty)));

    let mut h = Vec::new();
    h.extend_from_slice(b"image: ");
    h.extend_from_slice(fname);
    h.extend_from_slice(
        format!(
            "\nfile format: qcow2\nvirtual size: {} ({} bytes)\ndisk size: {}\n{}cluster_size: {}\n",
            size_to_str(info.virtual_size),
            info.virtual_size,
            size_to_str(actual),
            if info.encryption.is_some() { "encrypted: yes\n" } else { "" },
            info.cluster_size
        )
        .as_bytes(),
    );
    if info.dirty {
        h.extend_from_slice(b"cleanly shut down: no\n");
    }
    if let (Some(b), Some(fb)) = (&info.backing_file, &full_backing) {
        h.extend_from_slice(b"backing file: ");
        h.extend_from_slice(b);
        if b != fb {
            h.extend_from_slice(b" (actual path: ");
            h.extend_from_slice(fb);
            h.extend_from_slice(b")");
        }
        h.extend_from_slice(b"\n");
        if let Some(f) = &info.backing_format {
            h.extend_from_slice(format!("backing file format: {f}\n").as_bytes());
        }
    }
    if !snapshots.is_empty() {
        h.extend_from_slice(crate::snapshot::format_list(&snapshots).as_bytes());
    }
    h.extend_from_slice(b"Format specific information:\n");
    dump_human(&format_specific(&info, &bitmaps), 1, &mut h);
    file_child_human(&mut h, fname, file_len, actual);

    let backing = full_backing.map(|fb| {
        let fmt = info
            .backing_format
            .clone()
            .unwrap_or_else(|| probe_format(Path::new(OsStr::from_bytes(&fb))).to_string());
        (fb, fmt)
    });
    Ok(Described {
        json: J::O(top),
        human: h,
        backing,
    })
}

/// "qcow2" when the file starts with the qcow2 magic, else "raw" (as
/// QEMU's probing, limited to the two formats supported here).
fn probe_format(path: &Path) -> &'static str {
    use std::io::Read;
    let mut magic = [0u8; 4];
    match std::fs::File::open(path).and_then(|mut f| f.read_exact(&mut magic)) {
        Ok(()) if magic == *b"QFI\xfb" => "qcow2",
        _ => "raw",
    }
}

/// Runs `qcow2 info`.
pub fn run(mut a: InfoArgs) -> Result<u8, Fail> {
    // An encrypted image needs no key here; `--image-opts` and `json:`
    // operands name the file.
    a.spec.define()?;
    if a.spec.image_opts || a.file.as_os_str().as_bytes().starts_with(b"json:") {
        let s = a
            .spec
            .resolve(&a.file, a.format.as_deref(), &mut OpenOptions::default())?;
        a.file = s.path;
        a.format = s.fmt;
    }
    // qcow2 or raw, given or probed (raw images show as qemu-img shows
    // them, notably as the base of a chain).
    let mut format = match a.format.as_deref() {
        Some("raw") => "raw".to_string(),
        Some(_) => {
            check_format(&a.format)?;
            "qcow2".to_string()
        }
        None if a.file.is_file() => probe_format(&a.file).to_string(),
        None => "qcow2".to_string(),
    };
    let _ = a.force_share;
    // File names are bytes (not necessarily UTF-8), printed as such.
    let mut name = a.file.as_os_str().as_bytes().to_vec();
    let mut chain = Vec::new();
    let mut seen: Vec<std::path::PathBuf> = Vec::new();
    loop {
        let d = describe(&name, &format)?;
        let next = d.backing.clone();
        chain.push(d);
        if !a.backing_chain {
            break;
        }
        let Some((b, f)) = next else { break };
        // A chain that comes back to one of its images never ends.
        let here = std::fs::canonicalize(Path::new(OsStr::from_bytes(&name)))
            .unwrap_or_else(|_| Path::new(OsStr::from_bytes(&name)).to_path_buf());
        seen.push(here);
        let next_path = Path::new(OsStr::from_bytes(&b));
        if let Ok(c) = std::fs::canonicalize(next_path) {
            if seen.contains(&c) {
                return Err(Fail::new(format!(
                    "Backing file '{}' creates an infinite loop.",
                    String::from_utf8_lossy(&b)
                )));
            }
        }
        name = b;
        format = f;
    }
    match a.output {
        OutputFormat::Json => {
            let v = if a.backing_chain {
                J::A(chain.into_iter().map(|d| d.json).collect())
            } else {
                chain.remove(0).json
            };
            println!("{}", pretty(&v));
        }
        OutputFormat::Human => {
            let parts: Vec<Vec<u8>> = chain.into_iter().map(|d| d.human).collect();
            print_bytes(&[&parts.join(&b"\n"[..])]);
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
