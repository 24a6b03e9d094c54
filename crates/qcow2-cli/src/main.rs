//! `qcow2`: create, inspect, check and exercise qcow2 images with
//! qemu-img / qemu-io compatible syntax and output.
#![forbid(unsafe_code)]

mod amend;
mod bitmap;
mod check;
mod commit;
mod compare;
mod convert;
mod create;
mod disk;
mod imgspec;
mod info;
mod io;
mod map;
mod measure;
mod nbd;
mod num;
mod progress;
mod qjson;
mod qopt;
mod rebase;
mod resize;
mod secrets;
mod snapshot;

use clap::{Parser, Subcommand, ValueEnum};
use qcow2_ops::{Error, Image, OpenOptions};
use std::path::PathBuf;
use std::process::ExitCode;

/// Output format of the inspection commands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Default)]
pub enum OutputFormat {
    /// Text for people, like qemu-img's default.
    #[default]
    Human,
    /// JSON with qemu-img's key names and layout.
    Json,
}

#[derive(Parser, Debug)]
#[command(
    name = "qcow2",
    version,
    about = "qcow2 image tool (qemu-img / qemu-io compatible syntax)"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Show image information (like `qemu-img info`).
    Info(info::InfoArgs),
    /// Show the allocation map (like `qemu-img map`).
    Map(map::MapArgs),
    /// Create an image (like `qemu-img create`).
    Create(create::CreateArgs),
    /// Check (and repair) metadata consistency (like `qemu-img check`).
    Check(check::CheckArgs),
    /// Run qemu-io commands on an image (like `qemu-io`).
    Io(io::IoArgs),
    /// Copy images into a new or existing qcow2/raw image (like `qemu-img convert`).
    Convert(convert::ConvertArgs),
    /// Compare the contents of two images (like `qemu-img compare`).
    Compare(compare::CompareArgs),
    /// Manage persistent dirty bitmaps (like `qemu-img bitmap`).
    Bitmap(bitmap::BitmapArgs),
    /// Internal snapshots (qemu-img snapshot syntax).
    Snapshot(snapshot::SnapshotArgs),
    /// Change the virtual size (like `qemu-img resize`).
    Resize(resize::ResizeArgs),
    /// Change the backing file (like `qemu-img rebase`).
    Rebase(rebase::RebaseArgs),
    /// Write an overlay's data into its backing file (like `qemu-img commit`).
    Commit(commit::CommitArgs),
    /// Size a new image would need (like `qemu-img measure`).
    Measure(measure::MeasureArgs),
    /// Change format options (like `qemu-img amend`).
    Amend(amend::AmendArgs),
    /// Serve an image over NBD (like `qemu-nbd`).
    Nbd(nbd::NbdArgs),
}

/// The command line of a link named qemu-nbd.
#[derive(Parser, Debug)]
#[command(name = "qemu-nbd", version, about = "Serve a qcow2 image over NBD")]
struct QemuNbd {
    #[command(flatten)]
    args: nbd::NbdArgs,
}

/// An error that ends the program: message for stderr and exit status.
#[derive(Debug)]
pub struct Fail {
    /// Message (without the `qcow2: ` prefix); empty: print nothing.
    pub msg: String,
    /// Exit status.
    pub code: u8,
}

impl Fail {
    /// Exit status 1 with a message.
    pub fn new(msg: impl Into<String>) -> Fail {
        Fail {
            msg: msg.into(),
            code: 1,
        }
    }
}

/// The text of an OS error number (positive or negative), like strerror(3).
pub fn strerror(errno: i32) -> String {
    let s = std::io::Error::from_raw_os_error(errno.abs()).to_string();
    match s.find(" (os error ") {
        Some(i) => s[..i].to_string(),
        None => s,
    }
}

/// The text of an engine error: its own message with any `(os error N)` removed.
pub fn error_text(e: &Error) -> String {
    // Messages the engine words as QEMU does, shown without its prefix.
    match e {
        Error::NotSupported(m) if m.starts_with("Could not open backing file: ") => {
            return m.clone()
        }
        Error::BadHeader {
            source: qcow2_ops::format::FormatError::Qemu(m),
            ..
        }
        | Error::Format(qcow2_ops::format::FormatError::Qemu(m)) => return m.clone(),
        _ => {}
    }
    let s = e.to_string();
    let mut out = String::with_capacity(s.len());
    let mut rest = s.as_str();
    while let Some(i) = rest.find(" (os error ") {
        out.push_str(&rest[..i]);
        match rest[i..].find(')') {
            Some(j) => rest = &rest[i + j + 1..],
            None => {
                rest = "";
            }
        }
    }
    out.push_str(rest);
    out
}

/// Opens `path` and turns a failure into qemu-img's "Could not open" message.
pub fn open_image(path: &std::path::Path, opts: &OpenOptions) -> Result<Image, Fail> {
    if let Err(e) = std::fs::metadata(path) {
        return Err(Fail::new(format!(
            "Could not open '{}': {}",
            path.display(),
            strerror(e.raw_os_error().unwrap_or(libc_eio()))
        )));
    }
    warn_unvouched_bitmaps(path);
    let img = Image::open(path, opts).map_err(|e| {
        if let qcow2_ops::Error::DirtyRepair { messages } = &e {
            // What QEMU's check found, on stderr before the error.
            for m in messages {
                eprintln!("{m}");
            }
        }
        Fail::new(format!(
            "Could not open '{}': {}",
            path.display(),
            error_text(&e)
        ))
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

/// The warning qemu-img prints when it opens an image whose bitmaps
/// extension no autoclear bit vouches for (a v2 header has none: after
/// `amend -o compat=0.10` of an image with bitmaps): the bitmaps are
/// inconsistent, their clusters leaked. The same wording, without a final
/// newline, as QEMU prints it.
fn warn_unvouched_bitmaps(path: &std::path::Path) {
    use qcow2_ops::format::header::{Header, AUTOCLEAR_BITMAPS, EXT_BITMAPS};
    use std::io::Read;
    let Ok(mut f) = std::fs::File::open(path) else {
        return;
    };
    let Ok(len) = f.metadata().map(|m| m.len()) else {
        return;
    };
    let mut head = vec![0u8; 4096.min(len as usize)];
    if head.len() < 24 || f.read_exact(&mut head).is_err() {
        return;
    }
    let cluster_bits = u32::from_be_bytes([head[20], head[21], head[22], head[23]]);
    if !(9..=21).contains(&cluster_bits) {
        return;
    }
    let want = (1usize << cluster_bits).min(len as usize);
    if want > head.len() {
        let mut rest = vec![0u8; want - head.len()];
        if f.read_exact(&mut rest).is_err() {
            return;
        }
        head.extend_from_slice(&rest);
    }
    let Ok(h) = Header::parse(&head, len) else {
        return;
    };
    if h.extension(EXT_BITMAPS).is_none() || h.autoclear_features & AUTOCLEAR_BITMAPS != 0 {
        return;
    }
    let what = if h.version < 3 {
        "This qcow2 v2 image contains bitmaps, but they may have been modified by a program \
         without persistent bitmap support; so now they must all be considered inconsistent"
    } else {
        "a program lacking bitmap support modified this file, so all bitmaps are now \
         considered inconsistent"
    };
    eprint!(
        "qcow2: warning: {what}\nSome clusters may be leaked, run 'qcow2 check -r' on the image \
         file to fix."
    );
}

fn libc_eio() -> i32 {
    5
}

/// Checks a `-f` argument: only qcow2 is handled.
pub fn check_format(fmt: &Option<String>) -> Result<(), Fail> {
    match fmt.as_deref() {
        None | Some("qcow2") => Ok(()),
        Some(other) => Err(Fail::new(format!(
            "Unknown or unsupported format '{other}' (only qcow2 is supported)"
        ))),
    }
}

fn panic_message(p: &(dyn std::any::Any + Send)) -> String {
    if let Some(s) = p.downcast_ref::<&str>() {
        s.to_string()
    } else if let Some(s) = p.downcast_ref::<String>() {
        s.clone()
    } else {
        "unknown panic".into()
    }
}

fn main() -> ExitCode {
    let argv: Vec<String> = std::env::args_os()
        .map(|a| a.to_string_lossy().into_owned())
        .collect();
    // Messages start with the program's own name: a link named qemu-io
    // behaves as qemu-io.
    let prog = argv
        .first()
        .and_then(|a| std::path::Path::new(a).file_name())
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "qcow2".into());
    let io_args = if prog == "qemu-io" {
        Some(argv[1..].to_vec())
    } else if argv.get(1).map(String::as_str) == Some("io") {
        Some(argv[2..].to_vec())
    } else {
        None
    };
    // Engine bugs must not surface as a Rust panic trace: report them as errors.
    std::panic::set_hook(Box::new(|_| {}));
    if let Some(args) = io_args {
        let p = prog.clone();
        return match std::panic::catch_unwind(move || io::main_args(&p, &args)) {
            Ok(code) => ExitCode::from(code),
            Err(e) => {
                eprintln!("{prog}: internal error: {}", panic_message(e.as_ref()));
                ExitCode::from(1)
            }
        };
    }
    // A link named qemu-nbd behaves as `qcow2 nbd`.
    let cli = if prog == "qemu-nbd" {
        Cli {
            cmd: Cmd::Nbd(QemuNbd::parse().args),
        }
    } else {
        Cli::parse()
    };
    let result = std::panic::catch_unwind(move || match cli.cmd {
        Cmd::Info(a) => info::run(a),
        Cmd::Map(a) => map::run(a),
        Cmd::Create(a) => create::run(a),
        Cmd::Check(a) => check::run(a),
        Cmd::Io(a) => Ok(io::main_args("qcow2", &a.args)),
        Cmd::Convert(a) => convert::run(a),
        Cmd::Compare(a) => compare::run(a),
        Cmd::Bitmap(a) => bitmap::run(a),
        Cmd::Snapshot(a) => snapshot::run(a),
        Cmd::Resize(a) => resize::run(a),
        Cmd::Rebase(a) => rebase::run(a),
        Cmd::Commit(a) => commit::run(a),
        Cmd::Measure(a) => measure::run(a),
        Cmd::Amend(a) => amend::run(a),
        Cmd::Nbd(a) => nbd::run(a),
    });
    let result = match result {
        Ok(r) => r,
        Err(p) => Err(Fail {
            msg: format!("internal error: {}", panic_message(p.as_ref())),
            code: 1,
        }),
    };
    match result {
        Ok(code) => ExitCode::from(code),
        Err(f) => {
            if !f.msg.is_empty() {
                eprintln!("qcow2: {}", f.msg);
            }
            ExitCode::from(f.code)
        }
    }
}

/// Common path argument type.
pub type FilePath = PathBuf;
