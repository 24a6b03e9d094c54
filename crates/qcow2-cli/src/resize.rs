//! `qcow2 resize`: change the virtual size with qemu-img's syntax, messages
//! and exit codes.
//!
//! `qcow2 resize [--object ...] [-f fmt] [--preallocation=prealloc] [-q]
//! [--shrink] filename [+ | -]size`

use crate::num::{parse_size, SizeError};
use crate::{check_format, error_text, open_image, Fail};
use clap::Args;
use qcow2_ops::{Error, OpenOptions, Prealloc};
use std::path::Path;

/// Arguments of `qcow2 resize` (parsed by hand: `-1G` is a size, not an option).
#[derive(Args, Debug)]
#[command(disable_help_flag = true)]
pub struct ResizeArgs {
    /// Options, FILENAME and [+|-]SIZE, as for `qemu-img resize`.
    #[arg(allow_hyphen_values = true, trailing_var_arg = true, num_args = 0..)]
    args: Vec<String>,
}

/// QEMU's largest image length (`BDRV_MAX_LENGTH`).
const MAX_LENGTH: i128 = (i64::MAX as i128) & !((1i128 << 30) - 1);

const HELP: &str = "Usage: qcow2 resize [--object ...] [-f fmt] [--preallocation=prealloc] \
[-q] [--shrink] filename [+ | -]size";

fn usage(msg: &str) -> Fail {
    Fail::new(format!("{msg}\nTry 'qcow2 resize --help' for more info"))
}

/// Runs `qcow2 resize`.
pub fn run(a: ResizeArgs) -> Result<u8, Fail> {
    let mut fmt = None;
    let mut quiet = false;
    let mut shrink = false;
    let mut prealloc = Prealloc::Off;
    let mut pos: Vec<String> = Vec::new();
    let mut only_pos = false;
    let mut it = a.args.into_iter();
    while let Some(s) = it.next() {
        let negative_size = s.len() > 1 && s.as_bytes()[1].is_ascii_digit();
        if only_pos || !s.starts_with('-') || s == "-" || negative_size {
            pos.push(s);
            continue;
        }
        let (key, inline) = crate::qopt::split(&s);
        let val =
            |it: &mut std::vec::IntoIter<String>| crate::qopt::value(&key, &inline, it, usage);
        match key.as_str() {
            "--" => only_pos = true,
            "-q" | "--quiet" => quiet = true,
            "--shrink" => shrink = true,
            "-f" | "--format" => fmt = Some(val(&mut it)?),
            "--preallocation" => {
                let v = val(&mut it)?;
                prealloc = Prealloc::parse(&v)
                    .ok_or_else(|| Fail::new(format!("Invalid preallocation mode '{v}'")))?;
            }
            "--object" => {
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
    if pos.len() != 2 {
        return Err(usage("Expecting image file name and size"));
    }
    let (file, size) = (&pos[0], &pos[1]);
    let (relative, digits) = match size.as_bytes().first() {
        Some(b'+') => (1i128, &size[1..]),
        Some(b'-') => (-1i128, &size[1..]),
        _ => (0, size.as_str()),
    };
    let n = match parse_size(digits) {
        Ok(n) => n as i128,
        Err(SizeError::TooLarge) => {
            return Err(Fail::new(format!(
                "Value '{digits}' is out of range for parameter 'size'"
            )))
        }
        Err(SizeError::Invalid) => {
            return Err(Fail::new(
                "Parameter 'size' expects a non-negative number below 2^64\n\
                 Optional suffix k, M, G, T, P or E means kilo-, mega-, giga-, tera-, peta-\n\
                 and exabytes, respectively.",
            ))
        }
    };
    check_format(&fmt)?;
    let img = open_image(Path::new(file), &OpenOptions::read_write())?;
    let current = img.virtual_size() as i128;
    let total = if relative != 0 {
        current + relative * n
    } else {
        n
    };
    let status = if total <= 0 {
        Err(Fail::new("New image size must be positive"))
    } else if total <= current && prealloc != Prealloc::Off {
        Err(Fail::new(
            "Preallocation can only be used for growing images",
        ))
    } else if total < current && !shrink {
        eprintln!("qcow2: Use the --shrink option to perform a shrink operation.");
        eprintln!(
            "qcow2: warning: Shrinking an image will delete all data beyond the shrunken \
             image's end. Before performing such an operation, make sure there is no \
             important data there."
        );
        Err(Fail {
            msg: String::new(),
            code: 1,
        })
    } else if total % 512 != 0 {
        Err(Fail::new("The new size must be a multiple of 512"))
    } else if total > MAX_LENGTH {
        Err(Fail::new(format!(
            "offset({total}) exceeds maximum({MAX_LENGTH})"
        )))
    } else {
        img.resize(total as u64, prealloc, true).map_err(|e| {
            Fail::new(match &e {
                Error::Invalid(m) | Error::NotSupported(m) | Error::NoSpace(m) => m.clone(),
                _ => error_text(&e),
            })
        })
    };
    let closed = img.close();
    match (status, closed) {
        (Err(f), _) => Err(f),
        (Ok(()), Err(e)) => Err(Fail::new(format!("{file}: {}", error_text(&e)))),
        (Ok(()), Ok(())) => {
            if !quiet {
                println!("Image resized.");
            }
            Ok(0)
        }
    }
}
