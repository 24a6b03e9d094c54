//! Opening the device of `qcow2 io` like qemu-io: `-f`, `file:` prefixes,
//! `json:{...}` file names, `--image-opts` / `open -o` option strings,
//! cache and discard modes, `-s` (a throw-away overlay) and `-r`.

use super::dev::{Dev, Limits};
use crate::{error_text, strerror};
use qcow2_ops::io::{
    Blkdebug, DebugEvent, FileStorage, NbdAddress, NbdStorage, OpenMode, RawEvents, Rule, Rules,
    Storage,
};
use qcow2_ops::{CacheMode, CreateOptions, DiscardMode, Image, OpenOptions, StorageLayer};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// How to open the device (from the command line or an `open` command).
#[derive(Debug, Clone)]
pub struct OpenSpec {
    /// The file name operand (may be `json:{...}`); `None` with --image-opts.
    pub name: Option<String>,
    /// Block options (`driver`, `file.filename`, `cache.direct`, ...).
    pub opts: Vec<(String, String)>,
    /// `-r`.
    pub read_only: bool,
    /// `-s`: writes go to a temporary overlay.
    pub snapshot: bool,
    /// `-C`: copy-on-read.
    pub copy_on_read: bool,
    /// `-k` / `--aio native`: needs O_DIRECT (cache.direct=on), as in QEMU.
    pub native_aio: bool,
    /// `-U`: share the image with other writers (read-only only).
    pub force_share: bool,
    /// Cache mode from `-t`/`-n`.
    pub cache: CacheMode,
    /// Discard mode from `-d`.
    pub discard: DiscardMode,
    /// Engine tuning (our own options).
    pub tuning: OpenOptions,
}

impl OpenSpec {
    /// qemu-io's defaults: writethrough, discard=unmap, read-write.
    pub fn new(tuning: OpenOptions) -> OpenSpec {
        OpenSpec {
            name: None,
            opts: Vec::new(),
            read_only: false,
            snapshot: false,
            copy_on_read: false,
            force_share: false,
            native_aio: false,
            cache: CacheMode::Writethrough,
            discard: DiscardMode::Unmap,
            tuning,
        }
    }
}

/// An open device with what the commands need to know about it.
#[derive(Clone)]
pub struct Opened {
    /// The device (shared with requests running on threads of their own).
    pub dev: std::sync::Arc<Dev>,
    /// The first blkdebug node's rules (for breakpoints), if any.
    pub debug: Option<std::sync::Arc<Rules>>,
    /// Opened read-only.
    pub read_only: bool,
    /// Copy-on-read.
    pub copy_on_read: bool,
    /// Where it came from (for `reopen`).
    pub spec: OpenSpec,
}

/// Splits a QemuOpts string (`a=b,c=d`, `,,` escapes a comma); a first
/// element without `=` is `implied` (e.g. the file name).
pub fn parse_opt_string(s: &str, implied: Option<&str>) -> Result<Vec<(String, String)>, String> {
    let mut parts = Vec::new();
    let mut cur = String::new();
    let mut it = s.chars().peekable();
    while let Some(c) = it.next() {
        if c == ',' {
            if it.peek() == Some(&',') {
                it.next();
                cur.push(',');
            } else {
                parts.push(std::mem::take(&mut cur));
            }
        } else {
            cur.push(c);
        }
    }
    parts.push(cur);
    let mut out = Vec::new();
    for (i, p) in parts.into_iter().enumerate() {
        if p.is_empty() {
            continue;
        }
        match p.split_once('=') {
            Some((k, v)) => out.push((k.to_string(), v.to_string())),
            None => match (i, implied) {
                (0, Some(k)) => out.push((k.to_string(), p)),
                _ => out.push((p, "on".to_string())),
            },
        }
    }
    Ok(out)
}

/// Checks an on/off option value like QEMU.
pub fn on_off(key: &str, v: &str) -> Result<bool, String> {
    match v {
        "on" | "true" | "yes" => Ok(true),
        "off" | "false" | "no" => Ok(false),
        _ => Err(format!("Parameter '{key}' expects 'on' or 'off'")),
    }
}

/// Options accepted (and ignored: the engine has no such knob or does the
/// equivalent already).
const IGNORED: &[&str] = &[
    "node-name",
    "auto-read-only",
    "detect-zeroes",
    "pass-discard-request",
    "pass-discard-snapshot",
    "pass-discard-other",
    "discard-no-unref",
    "locking",
    "file.locking",
    "file.node-name",
    "file.auto-read-only",
    "file.x-check-cache-dropped",
    "file.pr-manager",
    "file.drop-cache",
    "file.discard",
    "file.detect-zeroes",
    "file.read-only",
];

/// Opens the device described by `spec`; the error is the message after
/// `can't open device NAME: ` (or `can't open: `).
pub fn open(spec: &OpenSpec) -> Result<Opened, String> {
    let mut opts: BTreeMap<String, String> = BTreeMap::new();
    let mut name = spec.name.clone();
    if let Some(n) = name.as_deref() {
        if let Some(j) = n.strip_prefix("json:") {
            opts.extend(qcow2_ops::json_options(j)?);
            name = None;
        }
    }
    for (k, v) in &spec.opts {
        opts.insert(k.clone(), v.clone());
    }
    let mut cache = spec.cache;
    let mut discard = spec.discard;
    let mut read_only = spec.read_only;
    let mut force_share = spec.force_share;
    let mut native_aio = spec.native_aio;
    let mut tuning = spec.tuning.clone();
    let mut direct: Option<bool> = None;
    let mut sizes: BTreeMap<String, usize> = BTreeMap::new();
    let mut no_flush: Option<bool> = None;
    let mut overlap: BTreeMap<String, String> = BTreeMap::new();
    let mut copy_on_read = spec.copy_on_read;
    let mut cor_filter = false;
    if opts.get("driver").map(String::as_str) == Some("copy-on-read") {
        // QEMU's copy-on-read filter: its child's options move up.
        opts.remove("driver");
        copy_on_read = true;
        cor_filter = true;
        lift(&mut opts, "file.", "");
    }
    // QEMU's compress filter over a qcow2 image.
    let mut compress = false;
    if opts.get("driver").map(String::as_str) == Some("compress") {
        opts.remove("driver");
        compress = true;
        lift(&mut opts, "file.", "");
    }
    let mut driver = opts.remove("driver");
    let mut file_driver = opts.remove("file.driver");
    // QEMU's blkdebug driver as a layer above the image
    // (`driver=blkdebug,image.driver=qcow2`) or below it
    // (`file.driver=blkdebug`, a `blkdebug:CONF:IMAGE` file name).
    let mut blkdebug = false;
    let mut above: Option<Vec<Rule>> = None;
    let mut above_limits = Limits::default();
    let mut below: Option<Vec<Rule>> = None;
    let mut debug: Option<std::sync::Arc<Rules>> = None;
    if driver.as_deref() == Some("blkdebug") {
        blkdebug = true;
        driver = opts.remove("image.driver");
        for (from, to) in [
            ("image.filename", "filename"),
            ("image.file.filename", "filename"),
        ] {
            if let Some(v) = opts.remove(from) {
                opts.insert(to.to_string(), v);
            }
        }
        let (rules, l) = blkdebug_node(&mut opts, "", &accepted_above)?;
        above = Some(rules);
        above_limits = l;
    }
    if file_driver.as_deref() == Some("blkdebug") {
        blkdebug = true;
        file_driver = opts.remove("file.image.driver");
        if let Some(v) = opts.remove("file.image.filename") {
            opts.insert("file.filename".into(), v);
        }
        below = Some(blkdebug_options(&mut opts, "file.", &accepted_below)?);
    }
    // A null-co data file: reads zeroes, writes go nowhere.
    if opts.get("data-file.driver").map(String::as_str) == Some("null-co") {
        opts.remove("data-file.driver");
        let size = match opts.remove("data-file.size") {
            Some(v) => crate::num::parse_size(&v).map_err(|_| {
                "Parameter 'size' expects a non-negative number below 2^64".to_string()
            })?,
            None => 1 << 30,
        };
        let zeroes = match opts.remove("data-file.read-zeroes") {
            Some(v) => on_off("read-zeroes", &v)?,
            None => false,
        };
        tuning.data_file_storage = Some(qcow2_ops::StorageSource(std::sync::Arc::new(move || {
            Ok(Box::new(qcow2_ops::io::NullStorage::new(size, zeroes)) as Box<dyn Storage>)
        })));
    }
    // The data file's node graph: a raw node (which reports read_aio and
    // write_aio below it), a blkdebug node, the file.
    let mut df_raw = false;
    if opts.get("data-file.driver").map(String::as_str) == Some("raw") {
        opts.remove("data-file.driver");
        df_raw = true;
        lift(&mut opts, "data-file.file.", "data-file.");
    }
    if opts.get("data-file.driver").map(String::as_str) == Some("blkdebug") {
        opts.remove("data-file.driver");
        if let Some(d) = opts.remove("data-file.image.driver") {
            opts.insert("data-file.driver".into(), d);
        }
        if let Some(f) = opts.remove("data-file.image.filename") {
            opts.insert("data-file.filename".into(), f);
        }
        let accepts = |e: DebugEvent| {
            accepted_anywhere(e) || (df_raw && RawEvents::<FileStorage>::EVENTS.contains(&e))
        };
        let rules = blkdebug_options(&mut opts, "data-file.", &accepts)?;
        tuning.data_file_layer = Some(StorageLayer(std::sync::Arc::new(move |f| {
            let f: Box<dyn Storage> = Box::new(Blkdebug::new(f, rules.clone()));
            if df_raw {
                Box::new(RawEvents(f))
            } else {
                f
            }
        })));
    } else if df_raw {
        tuning.data_file_layer = Some(StorageLayer(std::sync::Arc::new(|f| {
            Box::new(RawEvents(f)) as Box<dyn Storage>
        })));
    }
    // A qcow2 image whose file is a qcow2 image (QEMU's nested formats).
    let mut nested = false;
    if file_driver.as_deref() == Some("qcow2") {
        if let Some(d) = opts.remove("file.file.driver") {
            if d != "file" {
                return Err(format!("Unknown driver '{d}'"));
            }
        }
        if let Some(f) = opts.remove("file.file.filename") {
            opts.insert("file.filename".into(), f);
        }
        nested = true;
        file_driver = None;
    }
    let mut filename = opts
        .remove("file.filename")
        .or_else(|| opts.remove("filename"))
        .or_else(|| opts.remove("file"))
        .or(name);
    if let Some(rest) = filename
        .as_deref()
        .and_then(|f| f.strip_prefix("blkdebug:"))
    {
        let Some((conf, image)) = rest.split_once(':') else {
            return Err("Could not parse blkdebug filename".into());
        };
        let mut rules = if conf.is_empty() {
            Vec::new()
        } else {
            blkdebug_config(conf, &accepted_below)?
        };
        filename = Some(image.to_string());
        rules.extend(blkdebug_options(&mut opts, "file.", &accepted_below)?);
        below.get_or_insert_with(Vec::new).extend(rules);
    } else if blkdebug {
        let more = blkdebug_options(&mut opts, "file.", &accepted_below)?;
        if !more.is_empty() {
            below.get_or_insert_with(Vec::new).extend(more);
        }
    }
    if let Some(d) = &file_driver {
        if d != "file" {
            return Err(format!("Unknown driver '{d}'"));
        }
    }
    let fmt_name = driver.clone().unwrap_or_else(|| "qcow2".into());
    let opts_size = if fmt_name == "null-co" {
        opts.remove("size")
    } else {
        None
    };
    let mut read_zeroes = false;
    if fmt_name == "null-co" {
        if let Some(v) = opts.remove("read-zeroes") {
            read_zeroes = on_off("read-zeroes", &v)?;
        }
        filename = filename.or_else(|| Some(String::new()));
    }
    for (k, v) in std::mem::take(&mut opts) {
        match k.as_str() {
            "cache.direct" | "file.cache.direct" => direct = Some(on_off(&k, &v)?),
            "cache.no-flush" | "file.cache.no-flush" => no_flush = Some(on_off(&k, &v)?),
            "cache.writeback" => {}
            "discard" => {
                discard =
                    DiscardMode::parse(&v).ok_or_else(|| format!("Invalid discard option: {v}"))?
            }
            "read-only" => read_only = on_off(&k, &v)?,
            "force-share" => force_share = on_off(&k, &v)?,
            "lazy-refcounts" => tuning.lazy_refcounts = Some(on_off(&k, &v)?),
            "aio" | "file.aio" => {
                if !super::aio_mode_ok(&v) {
                    return Err(format!("Invalid aio option: {v}"));
                }
                native_aio = v == "native";
            }
            "backing" if v == "null" || v.is_empty() => tuning.open_backing = false,
            "encrypt.key-secret" => tuning.key_secret = Some(crate::secrets::lookup(&v)?),
            "data-file.filename" => tuning.data_file = Some(PathBuf::from(&v)),
            "backing.driver" => tuning.backing_driver = Some(v.clone()),
            "data-file.driver" if v == "file" => {}
            "backing.encrypt.key-secret" => {
                tuning.backing_key_secret = Some(crate::secrets::lookup(&v)?)
            }
            "encrypt.format" if v == "luks" || v == "aes" => {}
            "l2-cache-size" | "refcount-cache-size" | "cache-size" | "l2-cache-entry-size" => {
                // 0 asks for the smallest cache, as in QEMU.
                let n = crate::num::parse_size(&v)
                    .ok()
                    .and_then(|n| usize::try_from(n).ok())
                    .ok_or_else(|| format!("Invalid {k}: '{v}'"))?;
                sizes.insert(k.clone(), n);
            }
            // Overlap checks: the engine always checks what QEMU's
            // "cached" template does (plus bitmap tables), and the
            // snapshots' L2 tables with the "all" template or
            // `overlap-check.inactive-l2=on`; the options are validated as
            // QEMU does.
            "overlap-check" | "overlap-check.template" => {
                if !matches!(v.as_str(), "none" | "constant" | "cached" | "all") {
                    return Err(format!(
                        "Unsupported value '{v}' for qcow2 option 'overlap-check'. Allowed are any of the following: none, constant, cached, all"
                    ));
                }
                overlap.insert(k.clone(), v.clone());
            }
            _ if k.starts_with("overlap-check.") => {
                let on = on_off(&k, &v)?;
                if k == "overlap-check.inactive-l2" {
                    overlap.insert(k.clone(), on.to_string());
                }
            }
            "cache-clean-interval" => {
                let n = if v.trim_start().starts_with('-') {
                    Some(u64::MAX)
                } else {
                    crate::num::parse_size(&v).ok()
                };
                match n {
                    Some(n) if n > u32::MAX as u64 => {
                        return Err("Cache clean interval too big".into())
                    }
                    Some(_) => {}
                    None => return Err(
                        "Parameter 'cache-clean-interval' expects a non-negative number below 2^64"
                            .into(),
                    ),
                }
            }
            _ if k.starts_with("backing.") => {}
            _ if IGNORED.contains(&k.as_str()) => {}
            _ => {
                let (what, key) = match k.strip_prefix("file.") {
                    Some(rest) => ("protocol 'file'", rest.to_string()),
                    None => {
                        if fmt_name == "file" {
                            ("protocol 'file'", k.clone())
                        } else {
                            ("format", k.clone())
                        }
                    }
                };
                return Err(if what == "format" {
                    format!("Block format '{fmt_name}' does not support the option '{key}'")
                } else {
                    format!("Block {what} does not support the option '{key}'")
                });
            }
        }
    }
    if direct.is_some() || no_flush.is_some() {
        let writethrough = matches!(cache, CacheMode::Writethrough | CacheMode::DirectSync);
        let d = direct.unwrap_or(cache.direct());
        let nf = no_flush.unwrap_or(cache == CacheMode::Unsafe);
        cache = match (d, nf, writethrough) {
            (_, true, _) => CacheMode::Unsafe,
            (true, false, true) => CacheMode::DirectSync,
            (true, false, false) => CacheMode::None,
            (false, false, true) => CacheMode::Writethrough,
            (false, false, false) => CacheMode::Writeback,
        };
    }
    let (total, l2, rc) = (
        sizes.get("cache-size").copied(),
        sizes.get("l2-cache-size").copied(),
        sizes.get("refcount-cache-size").copied(),
    );
    match (total, l2, rc) {
        (Some(_), Some(_), Some(_)) => {
            return Err(
                "cache-size, l2-cache-size and refcount-cache-size may not be set at the same time"
                    .into(),
            )
        }
        (Some(t), Some(l), None) if l > t => {
            return Err("l2-cache-size may not exceed cache-size".into())
        }
        (Some(t), None, Some(r)) if r > t => {
            return Err("refcount-cache-size may not exceed cache-size".into())
        }
        (Some(t), Some(l), None) => {
            tuning.l2_cache_bytes = l;
            tuning.refcount_cache_bytes = t - l;
        }
        (Some(t), None, Some(r)) => {
            tuning.l2_cache_bytes = t - r;
            tuning.refcount_cache_bytes = r;
        }
        (Some(t), None, None) => {
            tuning.refcount_cache_bytes = (t / 4).min(tuning.refcount_cache_bytes);
            tuning.l2_cache_bytes = t - tuning.refcount_cache_bytes;
        }
        (None, l, r) => {
            if let Some(l) = l {
                tuning.l2_cache_bytes = l;
            }
            if let Some(r) = r {
                tuning.refcount_cache_bytes = r;
            }
        }
    }
    // The engine keeps at least one table in each cache.
    tuning.l2_cache_bytes = tuning.l2_cache_bytes.max(1);
    tuning.refcount_cache_bytes = tuning.refcount_cache_bytes.max(1);
    let entry_size = sizes.get("l2-cache-entry-size").copied();
    if let (Some(a), Some(b)) = (
        overlap.get("overlap-check"),
        overlap.get("overlap-check.template"),
    ) {
        if a != b {
            return Err(format!(
                "Conflicting values for qcow2 options 'overlap-check' ('{a}') and 'overlap-check.template' ('{b}')"
            ));
        }
    }
    let template = overlap
        .get("overlap-check")
        .or(overlap.get("overlap-check.template"));
    tuning.overlap_inactive_l2 = match overlap.get("overlap-check.inactive-l2") {
        Some(on) => on == "true",
        None => template.is_some_and(|t| t == "all"),
    };
    if native_aio && !cache.direct() {
        return Err(
            "aio=native was specified, but it requires cache.direct=on, which was not specified."
                .into(),
        );
    }
    if force_share && !read_only {
        return Err("force-share=on can only be used with read-only images".into());
    }
    let Some(mut filename) = filename.take() else {
        return Err("A block device must be specified for \"filename\"".into());
    };
    if let Some(f) = filename.strip_prefix("file:") {
        filename = f.to_string();
    }
    let path = PathBuf::from(&filename);
    tuning.writable = !read_only;
    tuning.cache = cache;
    tuning.discard = discard;
    // An NBD export (QEMU's nbd protocol driver): raw, or an image format
    // on top of it.
    let mut nbd: Option<NbdStorage> = None;
    if let Some(r) = qcow2_ops::io::parse_nbd_name(&filename) {
        let (addr, export) = r?;
        let n = NbdStorage::connect(&addr, &export).map_err(|e| {
            format!(
                "Failed to connect to '{}': {}",
                match &addr {
                    NbdAddress::Unix(p) => p.clone(),
                    NbdAddress::Tcp(h, port) => format!("{h}:{port}"),
                },
                e.raw_os_error().map_or_else(|| e.to_string(), strerror)
            )
        })?;
        if n.read_only() && !read_only {
            return Err("Could not open image: Permission denied".into());
        }
        nbd = Some(n);
    }
    let fmt = match (driver.as_deref(), &nbd) {
        (Some(f), _) => f.to_string(),
        (None, Some(n)) => {
            let mut m = [0u8; 4];
            n.read_at(&mut m, 0)
                .map_err(|e| format!("Could not read image for determining its format: {e}"))?;
            if &m == b"QFI\xfb" { "qcow2" } else { "raw" }.to_string()
        }
        (None, None) => crate::disk::probe(&path).map_err(|f| f.msg)?.to_string(),
    };
    if fmt == "null-co" {
        let size = match opts_size {
            Some(v) => crate::num::parse_size(&v).map_err(|_| {
                "Parameter 'size' expects a non-negative number below 2^64".to_string()
            })?,
            None => 1 << 30,
        };
        return Ok(Opened {
            dev: std::sync::Arc::new(Dev::Null { size, read_zeroes }),
            debug: None,
            read_only,
            copy_on_read,
            spec: spec.clone(),
        });
    }
    let dev = match (fmt.as_str(), nbd) {
        ("raw", Some(n)) => Dev::Raw {
            file: Box::new(n),
            unmap: discard == DiscardMode::Unmap,
            flush: cache != CacheMode::Unsafe,
            protocol_info: false,
        },
        ("qcow2", Some(n)) => Dev::Qcow2(Box::new(
            Image::open_with_storage(Box::new(n), &path, &tuning).map_err(|e| error_text(&e))?,
        )),
        (other, Some(_)) => return Err(format!("Unknown driver '{other}'")),
        (_, None) => match fmt.as_str() {
            "qcow2" if spec.snapshot => open_snapshot(&path, "qcow2", &tuning)?,
            "raw" | "file" if spec.snapshot => open_snapshot(&path, "raw", &tuning)?,
            "qcow2" => {
                // QEMU's cache limits: at most INT_MAX cache entries.
                if let Some(cs) = peek_cluster_size(&path) {
                    let e = entry_size.map_or(cs, |e| e as u64).max(1);
                    if (sizes.contains_key("l2-cache-size") || sizes.contains_key("cache-size"))
                        && tuning.l2_cache_bytes as u64 / e > i32::MAX as u64
                    {
                        return Err("L2 cache size too big".into());
                    }
                    if tuning.refcount_cache_bytes as u64 / cs > i32::MAX as u64 {
                        return Err("Refcount cache size too big".into());
                    }
                }
                let below = below.take().map(|r| std::sync::Arc::new(Rules::new(r)));
                debug = below.clone();
                let img = if nested {
                    let inner = open_qcow2(&path, &tuning, below)?;
                    Image::open_with_storage(Box::new(inner), &path, &tuning)
                        .map_err(|e| error_text(&e))?
                } else {
                    open_qcow2(&path, &tuning, below)?
                };
                if let Some(e) = entry_size {
                    let cs = img.cluster_size();
                    if !e.is_power_of_two() || e < 512 || e as u64 > cs {
                        let _ = img.close();
                        return Err(format!(
                        "L2 cache entry size must be a power of two between 512 and the cluster size ({cs})"
                    ));
                    }
                }
                Dev::Qcow2(Box::new(img))
            }
            "raw" | "file" | "host_device" | "host_cdrom" => open_raw(&path, &tuning, &fmt)?,
            other => return Err(format!("Unknown driver '{other}'")),
        },
    };
    if below.is_some_and(|r| !r.is_empty()) {
        return Err(format!(
            "blkdebug: error injection below a '{fmt}' device is not supported by this engine"
        ));
    }
    let dev = if compress {
        let cluster = match dev.base() {
            Dev::Qcow2(img) => img.cluster_size(),
            _ => return Err("Compression is not supported for this drive".into()),
        };
        Dev::Compress {
            dev: Box::new(dev),
            cluster,
        }
    } else {
        dev
    };
    let dev = match above {
        Some(rules) => {
            let rules = std::sync::Arc::new(Rules::new(rules));
            debug = debug.or_else(|| Some(std::sync::Arc::clone(&rules)));
            Dev::Debug {
                dev: Box::new(dev),
                rules,
                limits: above_limits,
            }
        }
        None => dev,
    };
    if copy_on_read && read_only && !spec.snapshot {
        return Err(if cor_filter {
            "Block node is read-only"
        } else {
            "Can't use copy-on-read on read-only device"
        }
        .into());
    }
    Ok(Opened {
        dev: std::sync::Arc::new(dev),
        debug,
        read_only: read_only && !spec.snapshot,
        copy_on_read,
        spec: spec.clone(),
    })
}

/// Renames the options under `from` to be under `to`: a filter node's
/// child options move up to where the node was.
fn lift(opts: &mut BTreeMap<String, String>, from: &str, to: &str) {
    *opts = std::mem::take(opts)
        .into_iter()
        .map(|(k, v)| match k.strip_prefix(from) {
            Some(rest) => (format!("{to}{rest}"), v),
            None => (k, v),
        })
        .collect();
}

/// Events a blkdebug layer under the image file sees: what the engine
/// reports and what the layer reports itself (QEMU's block layer events of
/// a request), plus the two QEMU never reports.
fn accepted_below(e: DebugEvent) -> bool {
    qcow2_ops::blkdebug_accepts(e)
}

/// Events a blkdebug layer above the image sees: those of its own
/// requests and copy-on-read writes (the image's events go to its file).
fn accepted_above(e: DebugEvent) -> bool {
    e == DebugEvent::CorWrite || accepted_anywhere(e)
}

fn accepted_anywhere(e: DebugEvent) -> bool {
    Blkdebug::<FileStorage>::OWN_EVENTS.contains(&e)
        || matches!(e, DebugEvent::RefblockUpdate | DebugEvent::None)
}

/// QEMU's blkdebug driver options under `prefix`: the request limits are
/// accepted (the engine takes requests of any size and alignment, so they
/// change nothing it does); the rules of `config` and of the
/// `inject-error.N.*` / `set-state.N.*` lists are returned.
fn blkdebug_options(
    opts: &mut BTreeMap<String, String>,
    prefix: &str,
    accepts: &dyn Fn(DebugEvent) -> bool,
) -> Result<Vec<Rule>, String> {
    blkdebug_node(opts, prefix, accepts).map(|(rules, _)| rules)
}

/// [`blkdebug_options`] with the request limits.
fn blkdebug_node(
    opts: &mut BTreeMap<String, String>,
    prefix: &str,
    accepts: &dyn Fn(DebugEvent) -> bool,
) -> Result<(Vec<Rule>, Limits), String> {
    let mut l = Limits::default();
    for (limit, field) in [
        ("align", &mut l.align),
        ("max-transfer", &mut l.max_transfer),
        ("opt-write-zero", &mut l.opt_write_zero),
        ("max-write-zero", &mut l.max_write_zero),
        ("opt-discard", &mut l.opt_discard),
        ("max-discard", &mut l.max_discard),
    ] {
        if let Some(v) = opts.remove(&format!("{prefix}{limit}")) {
            *field = crate::num::parse_size(&v).map_err(|_| {
                format!("Parameter '{limit}' expects a non-negative number below 2^64")
            })?;
        }
    }
    Ok((qcow2_ops::io::take_rules(opts, prefix, accepts)?, l))
}

/// The rules of a blkdebug configuration file.
fn blkdebug_config(path: &str, accepts: &dyn Fn(DebugEvent) -> bool) -> Result<Vec<Rule>, String> {
    let mut o = BTreeMap::from([("config".to_string(), path.to_string())]);
    qcow2_ops::io::take_rules(&mut o, "", accepts)
}

/// The cluster size a qcow2 file's header names (None: unreadable).
fn peek_cluster_size(path: &Path) -> Option<u64> {
    use std::io::Read;
    let mut b = [0u8; 24];
    std::fs::File::open(path).ok()?.read_exact(&mut b).ok()?;
    let bits = u32::from_be_bytes([b[20], b[21], b[22], b[23]]);
    (9..=21).contains(&bits).then(|| 1u64 << bits)
}

fn could_not_open(path: &Path, errno: i32) -> String {
    format!("Could not open '{}': {}", path.display(), strerror(errno))
}

fn open_qcow2(
    path: &Path,
    o: &OpenOptions,
    rules: Option<std::sync::Arc<Rules>>,
) -> Result<Image, String> {
    if let Err(e) = std::fs::metadata(path) {
        return Err(could_not_open(path, e.raw_os_error().unwrap_or(5)));
    }
    let r = match rules {
        // Error injection under the image file.
        Some(rules) => {
            let mode = OpenMode {
                writable: o.writable,
                direct: o.cache.direct(),
                create: false,
            };
            let file = FileStorage::open(path, mode)
                .map_err(|e| could_not_open(path, e.raw_os_error().unwrap_or(5)))?;
            Image::open_with_storage(Box::new(Blkdebug::with_rules(file, rules)), path, o)
        }
        None => Image::open(path, o),
    };
    let img = r.map_err(|e| match &e {
        qcow2_ops::Error::DirtyRepair { messages } => {
            // What QEMU's check found, on stderr before the error.
            for m in messages {
                eprintln!("{m}");
            }
            error_text(&e)
        }
        // QEMU's wording for a backing file that cannot be opened.
        qcow2_ops::Error::Io { context, source } => {
            match context
                .strip_prefix("could not open backing file '")
                .and_then(|r| r.strip_suffix('\''))
            {
                Some(b) => format!(
                    "Could not open backing file: Could not open '{b}': {}",
                    strerror(source.raw_os_error().unwrap_or(5))
                ),
                None => error_text(&e),
            }
        }
        _ => error_text(&e),
    })?;
    // A dirty image (lazy refcounts, then a crash) was repaired on open:
    // QEMU prints what its check found and did on stderr.
    if let Some(r) = img.open_repair() {
        for m in &r.messages {
            eprintln!("{m}");
        }
    }
    Ok(img)
}

/// A raw device through QEMU's protocol driver `proto`: `file` takes
/// regular files only, `host_device` / `host_cdrom` character or block
/// devices only (QEMU's checks, after the open itself).
fn open_raw(path: &Path, o: &OpenOptions, proto: &str) -> Result<Dev, String> {
    let mode = if o.writable {
        OpenMode::READ_WRITE
    } else {
        OpenMode::READ_ONLY
    };
    let file = FileStorage::open(path, mode)
        .map_err(|e| could_not_open(path, e.raw_os_error().unwrap_or(5)))?;
    if let Ok(m) = std::fs::metadata(path) {
        use std::os::unix::fs::FileTypeExt;
        let t = m.file_type();
        let device = t.is_char_device() || t.is_block_device();
        match proto {
            "file" if !t.is_file() => {
                return Err(format!(
                    "'file' driver requires '{}' to be a regular file",
                    path.display()
                ))
            }
            "host_device" | "host_cdrom" if !device => {
                return Err(format!(
                    "'{proto}' driver requires '{}' to be either a character or block device",
                    path.display()
                ))
            }
            _ => {}
        }
    }
    if let Err(e) = file.len() {
        return Err(could_not_open(path, e.raw_os_error().unwrap_or(5)));
    }
    Ok(Dev::Raw {
        file: Box::new(file),
        unmap: o.discard == DiscardMode::Unmap,
        flush: o.cache != CacheMode::Unsafe,
        protocol_info: true,
    })
}

/// `-s`: a temporary qcow2 overlay over the image (opened read-only as its
/// backing file), deleted at once after opening so nothing is left behind.
fn open_snapshot(path: &Path, fmt: &str, o: &OpenOptions) -> Result<Dev, String> {
    let size = {
        let ro = OpenOptions {
            writable: false,
            ..o.clone()
        };
        match fmt {
            "qcow2" => open_qcow2(path, &ro, None)?.virtual_size(),
            _ => open_raw(path, &ro, "raw")?
                .size()
                .map_err(|e| error_text(&e))?,
        }
    };
    let abs = std::fs::canonicalize(path)
        .map_err(|e| could_not_open(path, e.raw_os_error().unwrap_or(5)))?;
    let dir = std::env::var_os("TMPDIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/var/tmp"));
    let mut n = 0u32;
    let tmp_path = loop {
        let p = dir.join(format!("vl.{}.{n}", std::process::id()));
        match std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&p)
        {
            Ok(_) => break p,
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists && n < 1000 => n += 1,
            Err(e) => return Err(format!("Could not get temporary filename: {e}")),
        }
    };
    let remove = |_: ()| {
        let _ = std::fs::remove_file(&tmp_path);
    };
    let co = CreateOptions {
        backing_file: Some(abs.as_os_str().as_encoded_bytes().to_vec()),
        backing_format: Some(fmt.to_string()),
        ..CreateOptions::default()
    };
    if let Err(e) = Image::create(&tmp_path, size, &co) {
        remove(());
        return Err(format!(
            "Could not create temporary overlay '{}': {}",
            tmp_path.display(),
            error_text(&e)
        ));
    }
    let ov = OpenOptions {
        writable: true,
        ..o.clone()
    };
    let r = Image::open(&tmp_path, &ov);
    remove(());
    Ok(Dev::Qcow2(Box::new(r.map_err(|e| error_text(&e))?)))
}

impl Opened {
    /// Closes the device (every request sharing it must have ended). On
    /// failure, also says whether L2 tables were waiting to be written
    /// (what decides QEMU's messages, see `report_close_error`).
    pub fn close(self) -> std::result::Result<(), (qcow2_ops::Error, bool)> {
        let tables_dirty = match self.dev.base() {
            Dev::Qcow2(img) => img.tables_dirty(),
            _ => false,
        };
        match std::sync::Arc::try_unwrap(self.dev) {
            Ok(dev) => dev.close(),
            Err(dev) => dev.flush(),
        }
        .map_err(|e| (e, tables_dirty))
    }
}
