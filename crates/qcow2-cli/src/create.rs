//! `qcow2 create`.

use crate::info::{print_bytes, resolve_backing};
use crate::num::{parse_option_size, parse_size};
use crate::{error_text, strerror, Fail};
use clap::Args;
use qcow2_ops::{CreateOptions, Encryption, Image, LuksParams, OpenOptions, Prealloc};
use std::ffi::{OsStr, OsString};
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::path::PathBuf;

/// Arguments of `qcow2 create`.
#[derive(Args, Debug)]
pub struct CreateArgs {
    /// Image format (only qcow2).
    #[arg(short = 'f', default_value = "qcow2")]
    format: String,
    /// Creation options, comma separated, as qemu-img's `-o` (may be repeated).
    #[arg(short = 'o', action = clap::ArgAction::Append)]
    options: Vec<OsString>,
    /// Backing file (stored as given, bytes; relative names are relative to the image).
    #[arg(short = 'b')]
    backing: Option<OsString>,
    /// Backing file format (qcow2 or raw).
    #[arg(short = 'F')]
    backing_format: Option<String>,
    /// Do not open the backing file (SIZE is then required).
    #[arg(short = 'u')]
    unsafe_backing: bool,
    /// Quiet: do not print the "Formatting" line.
    #[arg(short = 'q')]
    quiet: bool,
    /// Object definitions (`secret,id=ID,data=...` for `encrypt.key-secret`).
    #[arg(long = "object", action = clap::ArgAction::Append)]
    object: Vec<String>,
    /// The image to create.
    file: PathBuf,
    /// Virtual size (k, M, G, T, P, E suffixes); defaults to the backing file's size.
    size: Option<String>,
}

/// Splits a qemu option string at commas (`,,` is a literal comma). Bytes:
/// a backing file name need not be UTF-8.
fn split_opts(s: &[u8]) -> Vec<Vec<u8>> {
    let mut out = Vec::new();
    let mut cur = Vec::new();
    let mut bytes = s.iter().copied().peekable();
    while let Some(c) = bytes.next() {
        if c == b',' {
            if bytes.peek() == Some(&b',') {
                bytes.next();
                cur.push(b',');
            } else {
                out.push(std::mem::take(&mut cur));
            }
        } else {
            cur.push(c);
        }
    }
    out.push(cur);
    out.into_iter().filter(|s| !s.is_empty()).collect()
}

fn parse_bool(name: &str, v: &str, file: &str) -> Result<bool, Fail> {
    match v {
        "on" | "yes" | "true" | "y" => Ok(true),
        "off" | "no" | "false" | "n" => Ok(false),
        _ => Err(Fail::new(format!(
            "{file}: Parameter '{name}' expects 'on' or 'off'"
        ))),
    }
}

/// Runs `qcow2 create`.
pub fn run(a: CreateArgs) -> Result<u8, Fail> {
    let file = a.file.to_string_lossy().into_owned();
    if a.format != "qcow2" {
        return Err(Fail::new(format!(
            "Unknown or unsupported format '{}' (only qcow2 is supported)",
            a.format
        )));
    }
    // Collect options; later values win, as in qemu-img.
    let mut cluster_size_s: Option<String> = None;
    let mut compat_s: Option<String> = None;
    let mut refcount_s: Option<String> = None;
    let mut ext_l2_s: Option<String> = None;
    let mut lazy_s: Option<String> = None;
    let mut comp_s: Option<String> = None;
    let mut size_opt: Option<String> = None;
    let mut prealloc_s: Option<String> = None;
    let mut extent_hint_s: Option<String> = None;
    let mut backing = a.backing.clone().map(OsString::into_vec);
    // encryption= and encrypt.* options, in the order qemu-img prints them.
    let mut crypt: Vec<(&'static str, String)> = Vec::new();
    let mut data_file: Option<String> = None;
    let mut data_file_raw_s: Option<String> = None;
    let mut backing_fmt = a.backing_format.clone();
    for o in a.options.iter().flat_map(|s| split_opts(s.as_bytes())) {
        let (k, raw) = match o.iter().position(|&c| c == b'=') {
            Some(i) => (
                String::from_utf8_lossy(&o[..i]).into_owned(),
                o[i + 1..].to_vec(),
            ),
            None => (String::from_utf8_lossy(&o).into_owned(), b"on".to_vec()),
        };
        if k == "backing_file" {
            backing = Some(raw);
            continue;
        }
        let v = String::from_utf8_lossy(&raw).into_owned();
        match k.as_str() {
            "cluster_size" => cluster_size_s = Some(v),
            "compat" => compat_s = Some(v),
            "refcount_bits" => refcount_s = Some(v),
            "extended_l2" => ext_l2_s = Some(v),
            "lazy_refcounts" => lazy_s = Some(v),
            "compression_type" => comp_s = Some(v),
            "size" => size_opt = Some(v),
            "backing_fmt" => backing_fmt = Some(v),
            "preallocation" => prealloc_s = Some(v),
            "extent_size_hint" => extent_hint_s = Some(v),
            "data_file" => data_file = Some(v),
            "data_file_raw" => data_file_raw_s = Some(v),
            _ if ENCRYPT_OPTS.contains(&k.as_str()) => {
                let k = ENCRYPT_OPTS[ENCRYPT_OPTS.iter().position(|o| *o == k).unwrap_or(0)];
                crypt.retain(|(o, _)| *o != k);
                crypt.push((k, v));
            }
            "help" => {
                println!("Supported options:");
                for (n, d) in [
                    ("backing_file=<str>", "File name of a base image"),
                    ("backing_fmt=<str>", "Image format of the base image"),
                    ("cluster_size=<size>", "qcow2 cluster size"),
                    (
                        "compat=<str>",
                        "Compatibility level (v2 [0.10] or v3 [1.1])",
                    ),
                    (
                        "compression_type=<str>",
                        "Compression method used for image cluster compression (zlib, zstd)",
                    ),
                    ("extended_l2=<bool (on/off)>", "Extended L2 tables"),
                    (
                        "extent_size_hint=<size>",
                        "Extent size hint for the image file, 0 to disable",
                    ),
                    (
                        "lazy_refcounts=<bool (on/off)>",
                        "Postpone refcount updates",
                    ),
                    (
                        "preallocation=<str>",
                        "Preallocation mode (allowed values: off, metadata, falloc, full)",
                    ),
                    (
                        "refcount_bits=<num>",
                        "Width of a reference count entry in bits",
                    ),
                    ("size=<size>", "Virtual disk size"),
                ] {
                    println!("  {n:<30}- {d}");
                }
                return Ok(0);
            }
            _ => return Err(Fail::new(format!("{file}: Invalid parameter '{k}'"))),
        }
    }
    let size_arg = a.size.clone().or(size_opt);

    // Backing file: check it can be opened (unless -u) and find its size.
    let mut backing_size: Option<u64> = None;
    if let Some(b) = &backing {
        let resolved_bytes = resolve_backing(a.file.as_os_str().as_bytes(), b);
        let resolved_path = PathBuf::from(OsStr::from_bytes(&resolved_bytes));
        let resolved = String::from_utf8_lossy(&resolved_bytes).into_owned();
        let fmt = match &backing_fmt {
            Some(f) => f.clone(),
            None => {
                let detected = detect_format(&resolved_path);
                if let Some(d) = detected {
                    eprintln!("Detected format of {d}.");
                }
                return Err(Fail::new(format!(
                    "{file}: Backing file specified without backing format"
                )));
            }
        };
        if fmt != "qcow2" && fmt != "raw" {
            return Err(Fail::new(format!(
                "{file}: Unsupported backing file format '{fmt}' (qcow2 or raw)"
            )));
        }
        if !a.unsafe_backing {
            let sz = match fmt.as_str() {
                "raw" => std::fs::metadata(&resolved_path)
                    .map(|m| m.len())
                    .map_err(|e| {
                        format!(
                            "Could not open '{resolved}': {}",
                            strerror(e.raw_os_error().unwrap_or(5))
                        )
                    }),
                _ => {
                    if let Err(e) = std::fs::metadata(&resolved_path) {
                        Err(format!(
                            "Could not open '{resolved}': {}",
                            strerror(e.raw_os_error().unwrap_or(5))
                        ))
                    } else {
                        let opts = OpenOptions {
                            open_backing: false,
                            // Only its size: an encrypted backing file needs no key.
                            metadata_only: true,
                            ..OpenOptions::read_only()
                        };
                        Image::open(&resolved_path, &opts)
                            .map(|img| img.virtual_size())
                            .map_err(|e| format!("Could not open '{resolved}': {}", error_text(&e)))
                    }
                }
            };
            match sz {
                Ok(s) => backing_size = Some(s),
                Err(m) => {
                    return Err(Fail::new(format!(
                        "{file}: {m}\nCould not open backing image."
                    )))
                }
            }
        }
    }

    let size = match &size_arg {
        Some(s) => match parse_size(s) {
            Ok(v) => v,
            Err(crate::num::SizeError::TooLarge) => {
                return Err(Fail::new(
                    "Invalid image size specified. Must be between 0 and 9223372036854775807.",
                ))
            }
            Err(_) => return Err(Fail::new(format!("Invalid image size specified: '{s}'."))),
        },
        None => match backing_size {
            Some(s) => s,
            None => {
                return Err(Fail::new(format!(
                    "{file}: Image creation needs a size parameter"
                )))
            }
        },
    };

    // Values of typed options are checked before anything is printed.
    let mut opts = CreateOptions::default();
    if let Some(c) = &cluster_size_s {
        opts.cluster_size = parse_size(c).map_err(|_| {
            Fail::new(format!(
                "{file}: Parameter 'cluster_size' expects a non-negative number below 2^64\n\
                 Optional suffix k, M, G, T, P or E means kilo-, mega-, giga-, tera-, peta-\n\
                 and exabytes, respectively."
            ))
        })?;
    }
    // Size-typed options are parsed (and refused) before anything is printed.
    let extent_hint = match &extent_hint_s {
        Some(v) => Some(
            parse_option_size("extent_size_hint", v)
                .map_err(|m| Fail::new(format!("{file}: {m}")))?,
        ),
        None => None,
    };
    if let Some(v) = &ext_l2_s {
        opts.extended_l2 = parse_bool("extended_l2", v, &file)?;
    }
    if let Some(v) = &lazy_s {
        opts.lazy_refcounts = parse_bool("lazy_refcounts", v, &file)?;
    }
    crypt.sort_by_key(|(k, _)| ENCRYPT_OPTS.iter().position(|o| o == k));
    let crypt_line: String = crypt.iter().map(|(k, v)| format!(" {k}={v}")).collect();
    let mut line = format!(
        "', fmt=qcow2{crypt_line} cluster_size={} extended_l2={}{} compression_type={} size={size}",
        cluster_size_s
            .as_deref()
            .map(|s| parse_size(s)
                .map(|v| v.to_string())
                .unwrap_or_else(|_| s.to_string()))
            .unwrap_or_else(|| "65536".into()),
        ext_l2_s.as_deref().unwrap_or("off"),
        prealloc_s
            .as_deref()
            .map(|p| format!(" preallocation={p}"))
            .unwrap_or_default(),
        comp_s.as_deref().unwrap_or("zlib"),
    );
    if let Some(c) = &compat_s {
        line.push_str(&format!(" compat={c}"));
    }
    // The backing file name is printed as its bytes.
    let mut tail = String::new();
    if let Some(f) = &backing_fmt {
        tail.push_str(&format!(" backing_fmt={f}"));
    }
    if let Some(d) = &data_file {
        tail.push_str(&format!(" data_file={d}"));
    }
    if let Some(r) = &data_file_raw_s {
        tail.push_str(&format!(" data_file_raw={r}"));
    }
    tail.push_str(&format!(
        " lazy_refcounts={} refcount_bits={}",
        lazy_s.as_deref().unwrap_or("off"),
        refcount_s.as_deref().unwrap_or("16")
    ));
    if let Some(h) = extent_hint {
        // QEMU prints option sizes as signed 64-bit numbers.
        tail.push_str(&format!(" extent_size_hint={}", h as i64));
    }
    tail.push('\n');
    if !a.quiet {
        let fname = a.file.as_os_str().as_bytes();
        match &backing {
            Some(b) => print_bytes(&[
                b"Formatting '",
                fname,
                line.as_bytes(),
                b" backing_file=",
                // Option syntax, as qemu-img prints it: commas doubled.
                &b.split(|&c| c == b',').collect::<Vec<_>>().join(&b",,"[..]),
                tail.as_bytes(),
            ]),
            None => print_bytes(&[b"Formatting '", fname, line.as_bytes(), tail.as_bytes()]),
        }
    }

    // Validate the options in QEMU's order: the file protocol's first (it
    // creates the file), then the qcow2 driver's values and combinations.
    //
    // The hint is a request to the file system: QEMU sets it on every new
    // file (FS_IOC_FSSETXATTR with FS_XFLAG_EXTSIZE, 1 MiB unless given)
    // and ignores failures. XFS honours it; ext4 accepts the call without
    // effect. Setting it needs an ioctl (the I/O crate's business), so
    // only its range is checked here.
    if extent_hint.is_some_and(|h| h > u32::MAX as u64) {
        return Err(Fail::new(format!("{file}: Extent size hint is too large")));
    }
    let prealloc = match &prealloc_s {
        None => Prealloc::Off,
        Some(p) => Prealloc::parse(p).ok_or_else(|| {
            Fail::new(format!(
                "{file}: Parameter 'preallocation' does not accept value '{p}'"
            ))
        })?,
    };
    if let Some(c) = &compat_s {
        opts.version = match c.as_str() {
            "0.10" | "v2" => 2,
            "1.1" | "v3" => 3,
            _ => {
                return Err(Fail::new(format!(
                    "{file}: Parameter 'version' does not accept value '{c}'"
                )))
            }
        };
    }
    if let Some(v) = &comp_s {
        opts.zstd = match v.as_str() {
            "zlib" => false,
            "zstd" => true,
            _ => {
                return Err(Fail::new(format!(
                    "{file}: Parameter 'compression-type' does not accept value '{v}'"
                )))
            }
        };
    }
    if let Some(v) = &refcount_s {
        let bits: u64 = v.parse().map_err(|_| {
            Fail::new(format!(
                "{file}: Parameter 'refcount_bits' expects a number"
            ))
        })?;
        if bits == 0 || bits > 64 || !bits.is_power_of_two() {
            return Err(Fail::new(format!(
                "{file}: Refcount width must be a power of two and may not exceed 64 bits"
            )));
        }
        opts.refcount_bits = bits as u32;
    }
    let cs = opts.cluster_size;
    if !cs.is_power_of_two() || !(512..=2 << 20).contains(&cs) {
        return Err(Fail::new(format!(
            "{file}: Cluster size must be a power of two between 512 and 2048k"
        )));
    }
    if opts.version < 3 {
        let v3 = "compatibility level 1.1 and above (use version=v3 or greater)";
        if opts.lazy_refcounts {
            return Err(Fail::new(format!(
                "{file}: Lazy refcounts only supported with {v3}"
            )));
        }
        if opts.refcount_bits != 16 {
            return Err(Fail::new(format!(
                "{file}: Different refcount widths than 16 bits require {}",
                "compatibility level 1.1 or above (use version=v3 or greater)"
            )));
        }
        if opts.zstd {
            return Err(Fail::new(format!(
                "{file}: Non-zlib compression type is only supported with {v3}"
            )));
        }
        if opts.extended_l2 {
            return Err(Fail::new(format!(
                "{file}: Extended L2 entries are only supported with {v3}"
            )));
        }
    }
    if opts.extended_l2 && cs < 16384 {
        return Err(Fail::new(format!(
            "{file}: Extended L2 entries are only supported with cluster sizes of at least 16384 bytes"
        )));
    }
    if backing.is_some() && prealloc != Prealloc::Off && !opts.extended_l2 {
        return Err(Fail::new(format!(
            "{file}: Backing file and preallocation can only be used at the same time if extended_l2 is on"
        )));
    }
    opts.encryption =
        encryption(&crypt, &a.object).map_err(|m| Fail::new(format!("{file}: {m}")))?;
    if let Some(v) = &data_file_raw_s {
        opts.data_file_raw = parse_bool("data_file_raw", v, &file)?;
    }
    if opts.data_file_raw && data_file.is_none() {
        return Err(Fail::new(format!(
            "{file}: data-file-raw requires data-file"
        )));
    }
    if data_file.is_some() && opts.version < 3 {
        return Err(Fail::new(format!(
            "{file}: External data files are only supported with compatibility level 1.1 and above (use version=v3 or greater)"
        )));
    }
    if opts.data_file_raw && backing.is_some() {
        return Err(Fail::new(format!(
            "{file}: Backing file and data-file-raw cannot be used at the same time"
        )));
    }
    opts.data_file = data_file.clone();
    // As QEMU: a raw data file maps every cluster from the start.
    let prealloc = if opts.data_file_raw && prealloc == Prealloc::Off {
        Prealloc::Metadata
    } else {
        prealloc
    };
    // qemu rounds the virtual size up to whole 512-byte sectors.
    let size = size.div_ceil(512) * 512;
    let fail = |e: qcow2_ops::Error| Fail::new(format!("{file}: {}", error_text(&e)));
    if prealloc == Prealloc::Off {
        opts.backing_file = backing;
        opts.unsafe_backing = a.unsafe_backing;
        opts.backing_format = backing_fmt;
        Image::create(&a.file, size, &opts).map_err(fail)?;
        return Ok(0);
    }
    // As QEMU: an empty image without backing file, grown to its size with
    // the preallocation, and only then given its backing file (so the
    // preallocated clusters read as zeroes, not as the backing file).
    Image::create(&a.file, 0, &opts).map_err(fail)?;
    let key_secret = match &opts.encryption {
        Some(Encryption::Luks { secret, .. } | Encryption::Aes { secret }) => Some(secret.clone()),
        None => None,
    };
    let img = Image::open(
        &a.file,
        &OpenOptions {
            open_backing: false,
            key_secret,
            ..OpenOptions::read_write()
        },
    )
    .map_err(fail)?;
    if size > 0 {
        img.resize(size, prealloc, false).map_err(fail)?;
    }
    // Where the last data cluster lies beyond the end of the guest data,
    // QEMU sets the file length to the data's end and then (without
    // extended L2 entries) extends it to the whole cluster by writing
    // zeroes: the file holds that tail.
    let tail_fill = match prealloc {
        Prealloc::Metadata if size % opts.cluster_size != 0 => img
            .block_status(size - 1, 1)
            .map_err(fail)?
            .first()
            .and_then(|e| e.offset.map(|o| (o + 1, o - o % opts.cluster_size)))
            .map(|(end, start)| (end, start + opts.cluster_size)),
        _ => None,
    };
    if let Some(b) = &backing {
        img.set_backing(Some(b), backing_fmt.as_deref())
            .map_err(fail)?;
    }
    img.close().map_err(fail)?;
    if let Some((from, to)) = tail_fill {
        use std::os::unix::fs::FileExt;
        let io = |e: std::io::Error| Fail::new(format!("{file}: {e}"));
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(&a.file)
            .map_err(io)?;
        if f.metadata().map_err(io)?.len() == to {
            if opts.extended_l2 {
                f.set_len(from).map_err(io)?;
            } else {
                f.write_all_at(&vec![0u8; (to - from) as usize], from)
                    .map_err(io)?;
            }
            f.sync_all().map_err(io)?;
        }
    }
    Ok(0)
}

/// The `encryption` and `encrypt.*` options qemu-img knows, in its order.
const ENCRYPT_OPTS: [&str; 10] = [
    "encryption",
    "encrypt.format",
    "encrypt.key-secret",
    "encrypt.cipher-alg",
    "encrypt.cipher-mode",
    "encrypt.ivgen-alg",
    "encrypt.ivgen-hash-alg",
    "encrypt.hash-alg",
    "encrypt.iter-time",
    "encrypt.slot",
];

/// The encryption the `encryption` / `encrypt.*` options ask for, the
/// secrets defined by `objects`; errors in qemu-img's words.
pub fn encryption(
    crypt: &[(&'static str, String)],
    objects: &[String],
) -> Result<Option<Encryption>, String> {
    if crypt.is_empty() {
        return Ok(None);
    }
    for o in objects {
        crate::secrets::define(o)?;
    }
    let get = |k: &str| crypt.iter().find(|(o, _)| *o == k).map(|(_, v)| v.as_str());
    let format = match (get("encryption"), get("encrypt.format")) {
        (Some(_), Some(_)) => {
            return Err(
                "'encrypt.format' and its alias 'encryption' can't be used at the same time".into(),
            )
        }
        (Some("on"), None) => "aes",
        (Some("off"), None) if crypt.len() == 1 => return Ok(None),
        (Some("off"), None) | (None, None) => {
            return Err("Parameter 'encrypt.format' is missing".into())
        }
        (Some(v), None) => {
            return Err(format!(
                "Parameter 'encryption' expects 'on' or 'off', not '{v}'"
            ))
        }
        (None, Some(f)) => f,
    };
    if format != "luks" && format != "aes" {
        return Err(format!(
            "Parameter 'format' does not accept value '{format}'"
        ));
    }
    let secret = match get("encrypt.key-secret") {
        Some(id) => crate::secrets::lookup(id)?,
        None => return Err("Parameter 'encrypt.key-secret' is required for cipher".into()),
    };
    if format == "aes" {
        return Ok(Some(Encryption::Aes { secret }));
    }
    let mut params = LuksParams::default();
    if let Some(v) = get("encrypt.cipher-alg") {
        params.cipher_alg = v.to_string();
    }
    if let Some(v) = get("encrypt.cipher-mode") {
        params.cipher_mode = v.to_string();
    }
    if let Some(v) = get("encrypt.ivgen-alg") {
        params.ivgen_alg = v.to_string();
    }
    if let Some(v) = get("encrypt.ivgen-hash-alg") {
        params.ivgen_hash_alg = Some(v.to_string());
    }
    if let Some(v) = get("encrypt.hash-alg") {
        params.hash_alg = v.to_string();
    }
    if let Some(v) = get("encrypt.iter-time") {
        params.iter_time_ms = v
            .parse()
            .map_err(|_| "Parameter 'iter-time' expects an integer".to_string())?;
    }
    Ok(Some(Encryption::Luks { secret, params }))
}

/// "qcow2" when the file starts with the qcow2 magic, else "raw"; None when unreadable.
fn detect_format(path: &std::path::Path) -> Option<&'static str> {
    use std::io::Read;
    let mut f = std::fs::File::open(path).ok()?;
    let mut magic = [0u8; 4];
    match f.read_exact(&mut magic) {
        Ok(()) if magic == *b"QFI\xfb" => Some("qcow2"),
        _ => Some("raw"),
    }
}
