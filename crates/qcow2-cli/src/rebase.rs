//! `qcow2 rebase`: change the backing file of a qcow2 image with qemu-img's
//! syntax, messages and exit codes.
//!
//! `qcow2 rebase [--object ...] [-f fmt] [-t cache] [-T src_cache] [-p] [-q]
//! [-u] [-c] [-F backing_fmt] [-b backing_file] filename`
//!
//! Unsafe mode (`-u`) only rewrites the header's backing name and format.
//! Safe mode first copies into the image, for every range not allocated in
//! its top layer, the old chain's data wherever the new chain reads
//! differently (compared cluster by cluster), so that the image reads the
//! same through its new chain; then it switches the header.

use crate::disk::{Disk, Progress};
use crate::{error_text, Fail};
use clap::Args;
use qcow2_ops::{CopySource, Error, Image, OpenOptions};
use std::path::{Path, PathBuf};

/// Arguments of `qcow2 rebase` (parsed by hand, as qemu-img's getopt does).
#[derive(Args, Debug)]
#[command(disable_help_flag = true)]
pub struct RebaseArgs {
    /// Options and FILENAME, as for `qemu-img rebase`.
    #[arg(allow_hyphen_values = true, trailing_var_arg = true, num_args = 0..)]
    args: Vec<String>,
}

const HELP: &str = "Usage: qcow2 rebase [--object ...] [-f fmt] [-t cache] [-T src_cache] \
[-p] [-q] [-u] [-c] [-F backing_fmt] [-b backing_file] filename";

fn usage(msg: &str) -> Fail {
    Fail::new(format!("{msg}\nTry 'qcow2 rebase --help' for more info"))
}

/// Options (key, value) and positional arguments of a command line.
pub type Parsed = (Vec<(String, String)>, Vec<String>);

/// Splits `args` into options (key, value) and positional arguments.
/// `with_value` lists the options taking a value (`-b` and `--output` style).
pub fn getopt(args: Vec<String>, with_value: &[&str], cmd: &str) -> Result<Parsed, Fail> {
    let usage = |m: &str| Fail::new(format!("{m}\nTry 'qcow2 {cmd} --help' for more info"));
    let mut opts = Vec::new();
    let mut pos = Vec::new();
    let mut it = args.into_iter();
    let mut only_pos = false;
    while let Some(s) = it.next() {
        if only_pos || !s.starts_with('-') || s == "-" {
            pos.push(s);
            continue;
        }
        if s == "--" {
            only_pos = true;
            continue;
        }
        if let Some(l) = s.strip_prefix("--") {
            let (k, inline) = match l.split_once('=') {
                Some((k, v)) => (format!("--{k}"), Some(v.to_string())),
                None => (s.clone(), None),
            };
            if with_value.contains(&k.as_str()) {
                let v = match inline {
                    Some(v) => v,
                    None => it
                        .next()
                        .ok_or_else(|| usage(&format!("option '{k}' requires an argument")))?,
                };
                opts.push((k, v));
            } else {
                opts.push((k, String::new()));
            }
            continue;
        }
        // Short options, possibly grouped (-up), the last may take a value.
        let chars: Vec<char> = s[1..].chars().collect();
        let mut i = 0;
        while i < chars.len() {
            let k = format!("-{}", chars[i]);
            if with_value.contains(&k.as_str()) {
                let rest: String = chars[i + 1..].iter().collect();
                let v = if !rest.is_empty() {
                    rest
                } else {
                    it.next().ok_or_else(|| {
                        usage(&format!("option requires an argument -- '{}'", chars[i]))
                    })?
                };
                opts.push((k, v));
                break;
            }
            opts.push((k, String::new()));
            i += 1;
        }
    }
    Ok((opts, pos))
}

/// The path of backing file `name` of the image at `img` (relative names
/// are relative to the image's directory).
pub fn backing_path(img: &Path, name: &str) -> PathBuf {
    let p = Path::new(name);
    if p.is_absolute() {
        return p.to_path_buf();
    }
    match img.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.join(p),
        _ => p.to_path_buf(),
    }
}

/// Runs `qcow2 rebase`.
pub fn run(a: RebaseArgs) -> Result<u8, Fail> {
    let (opts, pos) = getopt(
        a.args,
        &["-f", "-F", "-b", "-t", "-T", "--object", "--format"],
        "rebase",
    )?;
    let mut fmt = None;
    let mut backing_fmt = None;
    let mut backing: Option<String> = None;
    let mut unsafe_mode = false;
    let mut progress = false;
    for (k, v) in opts {
        match k.as_str() {
            "-f" | "--format" => fmt = Some(v),
            "-F" => backing_fmt = Some(v),
            "-b" => backing = Some(v),
            "-u" => unsafe_mode = true,
            "-p" => progress = true,
            "-q" | "-c" | "-U" | "--force-share" | "-t" | "-T" | "--object" => {}
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
    if pos.len() != 1 {
        return Err(usage("Expecting one image file name"));
    }
    if !unsafe_mode && backing.is_none() {
        return Err(usage(
            "Must specify backing file (-b) or use unsafe mode (-u)",
        ));
    }
    let file = PathBuf::from(&pos[0]);
    match fmt.as_deref() {
        None | Some("qcow2") => {}
        Some(_) => {
            return Err(Fail::new(format!(
                "Could not change the backing file to '{}': Operation not supported",
                backing.as_deref().unwrap_or("")
            )))
        }
    }
    let new_name = backing.filter(|b| !b.is_empty());
    let change_fail = |msg: String| {
        Fail::new(format!(
            "Could not change the backing file to '{}': {msg}",
            new_name.as_deref().unwrap_or("")
        ))
    };
    // Without -F the header cannot record the format: qemu-img fails when
    // it switches the header (in safe mode after copying the data, which
    // it reads from the new backing file with a probed format).
    let no_format = new_name.is_some() && backing_fmt.is_none();
    if no_format && unsafe_mode {
        return Err(change_fail("backing format must be specified".into()));
    }
    let mut oo = OpenOptions::read_write();
    oo.open_backing = !unsafe_mode;
    let img = open_with_chain(&file, &oo)?;
    if !unsafe_mode {
        let new = match &new_name {
            Some(n) => {
                let p = backing_path(&file, n);
                let ro = OpenOptions {
                    writable: false,
                    ..OpenOptions::default()
                };
                Some((
                    Disk::open(&p, backing_fmt.as_deref(), &ro).map_err(|f| {
                        Fail::new(format!("Could not open new backing file '{n}': {}", f.msg))
                    })?,
                    p,
                ))
            }
            None => None,
        };
        copy_differences(
            &img,
            &file,
            new.as_ref().map(|(d, p)| (d, p.as_path())),
            progress,
        )?;
    }
    if no_format {
        img.close().map_err(|e| {
            Fail::new(format!(
                "Could not close '{}': {}",
                file.display(),
                error_text(&e)
            ))
        })?;
        return Err(change_fail("backing format must be specified".into()));
    }
    img.set_backing(
        new_name.as_deref().map(str::as_bytes),
        new_name.as_ref().and(backing_fmt.as_deref()),
    )
    .map_err(|e| {
        change_fail(match e {
            Error::Invalid(_) => "Invalid argument".into(),
            Error::NoSpace(_) => "No space left in the file header".into(),
            e => error_text(&e),
        })
    })?;
    img.close().map_err(|e| {
        Fail::new(format!(
            "Could not close '{}': {}",
            file.display(),
            error_text(&e)
        ))
    })?;
    Ok(0)
}

/// Copies into `img` the old chain's data of every range not allocated in
/// its top layer where the new chain (`new`, or zeroes) reads differently
/// (the engine's safe-rebase loop).
fn copy_differences(
    img: &Image,
    file: &Path,
    new: Option<(&Disk, &Path)>,
    progress: bool,
) -> Result<(), Fail> {
    let bar = Progress::new(progress, img.virtual_size(), "rebase");
    let mut report = |done: u64, _total: u64| bar.set(done);
    let new = new.map(|(d, _)| d as &dyn CopySource);
    qcow2_ops::rebase_into(img, new, Some(&mut report)).map_err(|e| {
        Fail::new(format!(
            "error while rebasing '{}': {}",
            file.display(),
            error_text(&e)
        ))
    })?;
    bar.finish();
    Ok(())
}

/// Opens the qcow2 image at `path` (with its backing chain when `opts`
/// say so) with qemu-img's messages: "Could not open 'IMG': REASON", where
/// a backing file that cannot be opened reads "Could not open backing
/// file: Could not open 'NAME': ERROR".
pub fn open_with_chain(path: &Path, opts: &OpenOptions) -> Result<Image, Fail> {
    let wrap = |m: String| Fail::new(format!("Could not open '{}': {m}", path.display()));
    if let Err(e) = std::fs::metadata(path) {
        return Err(wrap(format!(
            "Could not open '{}': {}",
            path.display(),
            crate::strerror(e.raw_os_error().unwrap_or(5))
        )));
    }
    Image::open(path, opts).map_err(|e| {
        let backing = match &e {
            Error::Io { context, source } => context
                .strip_prefix("could not open backing file '")
                .and_then(|r| r.strip_suffix('\''))
                .map(|b| {
                    format!(
                        "Could not open backing file: Could not open '{b}': {}",
                        crate::strerror(source.raw_os_error().unwrap_or(5))
                    )
                }),
            _ => None,
        };
        wrap(
            backing.unwrap_or_else(|| {
                format!("Could not open '{}': {}", path.display(), error_text(&e))
            }),
        )
    })
}
