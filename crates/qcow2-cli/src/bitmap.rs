//! `qcow2 bitmap`: persistent dirty bitmap management with qemu-img's
//! syntax, messages and exit codes.
//!
//! `qcow2 bitmap (--merge SOURCE | --add | --remove | --clear | --enable |
//! --disable)... [-b source_file [-F source_fmt]] [-g granularity]
//! [--object ...] [--image-opts | -f fmt] filename bitmap`
//!
//! The operations run in command-line order; the first that fails ends the
//! program with status 1 (the ones before it stay done), as in qemu-img.
//!
//! Beyond qemu-img (which has no progress option here): a merge shows a
//! progress bar on stderr when it is a terminal, never piped, and never
//! with `-q` (accepted here only for that; qemu-img bitmap refuses it).

use crate::num::{parse_size, SizeError};
use crate::{check_format, error_text, open_image, Fail};
use clap::Args;
use qcow2_ops::{BitmapOp, Error, OpenOptions};
use std::path::Path;

/// Arguments of `qcow2 bitmap` (parsed by hand: the operations are ordered).
#[derive(Args, Debug)]
#[command(disable_help_flag = true)]
pub struct BitmapArgs {
    /// Operations, options, FILENAME and BITMAP, as for `qemu-img bitmap`.
    #[arg(allow_hyphen_values = true, trailing_var_arg = true, num_args = 0..)]
    args: Vec<String>,
}

enum Act {
    Add,
    Remove,
    Clear,
    Enable,
    Disable,
    Merge(String),
}

fn usage_fail(msg: impl Into<String>) -> Fail {
    Fail::new(msg)
}

/// Runs `qcow2 bitmap`.
pub fn run(a: BitmapArgs) -> Result<u8, Fail> {
    let mut acts = Vec::new();
    let mut fmt = None;
    let mut src_file: Option<String> = None;
    let mut src_fmt: Option<String> = None;
    let mut granularity = 0u64;
    let mut quiet = false;
    let mut pos = Vec::new();
    let mut it = a.args.into_iter();
    let need = |it: &mut std::vec::IntoIter<String>, opt: &str| {
        it.next().ok_or_else(|| {
            Fail::new(format!(
                "option requires an argument -- '{}'\nTry 'qcow2 bitmap --help' for more info",
                opt.trim_start_matches('-')
            ))
        })
    };
    let mut only_pos = false;
    while let Some(s) = it.next() {
        if only_pos || !s.starts_with('-') || s == "-" {
            pos.push(s);
            continue;
        }
        // `--opt=value` and `-xVALUE` forms.
        let (key, inline) = match s.strip_prefix("--") {
            Some(l) => match l.split_once('=') {
                Some((k, v)) => (format!("--{k}"), Some(v.to_string())),
                None => (s.clone(), None),
            },
            None if s.len() > 2 => (s[..2].to_string(), Some(s[2..].to_string())),
            None => (s.clone(), None),
        };
        let val = |it: &mut std::vec::IntoIter<String>| match inline.clone() {
            Some(v) => Ok(v),
            None => need(it, &key),
        };
        match key.as_str() {
            "--" => only_pos = true,
            "--add" => acts.push(Act::Add),
            "--remove" => acts.push(Act::Remove),
            "--clear" => acts.push(Act::Clear),
            "--enable" => acts.push(Act::Enable),
            "--disable" => acts.push(Act::Disable),
            "--merge" => acts.push(Act::Merge(val(&mut it)?)),
            "-q" | "--quiet" => quiet = true,
            "-f" | "--format" => fmt = Some(val(&mut it)?),
            "-b" | "--source-file" => src_file = Some(val(&mut it)?),
            "-F" | "--source-format" => src_fmt = Some(val(&mut it)?),
            "-g" | "--granularity" => {
                let v = val(&mut it)?;
                granularity = match parse_size(&v) {
                    Ok(g) => g,
                    Err(SizeError::TooLarge) => return Err(range_fail()),
                    Err(SizeError::Invalid) if v.trim_start().starts_with('-') => {
                        return Err(range_fail())
                    }
                    Err(SizeError::Invalid) => {
                        return Err(Fail::new(format!("Invalid granularity specified: '{v}'.")))
                    }
                };
            }
            "--object" => {
                val(&mut it)?;
            }
            "--image-opts" => {
                return Err(Fail::new("--image-opts is not supported"));
            }
            "-h" | "--help" => {
                println!("{}", HELP);
                return Ok(0);
            }
            _ => {
                return Err(Fail::new(format!(
                    "unrecognized option '{s}'\nTry 'qcow2 bitmap --help' for more info"
                )))
            }
        }
    }
    if acts.is_empty() {
        return Err(usage_fail(
            "Need at least one of --add, --remove, --clear, --enable, --disable, or --merge",
        ));
    }
    let adding = acts.iter().any(|a| matches!(a, Act::Add));
    if granularity != 0 && !adding {
        return Err(usage_fail("granularity only supported with --add"));
    }
    if src_fmt.is_some() && src_file.is_none() {
        return Err(usage_fail("-F only supported with -b"));
    }
    if src_file.is_some() && !acts.iter().any(|a| matches!(a, Act::Merge(_))) {
        return Err(usage_fail(
            "Merge bitmap source file only supported with --merge",
        ));
    }
    if pos.len() != 2 {
        return Err(usage_fail("Expecting filename and bitmap name"));
    }
    check_format(&fmt)?;
    let (file, name) = (&pos[0], &pos[1]);
    let img = open_image(Path::new(file), &OpenOptions::read_write())?;
    let src = match &src_file {
        Some(f) => {
            check_format(&src_fmt)?;
            Some(open_image(Path::new(f), &OpenOptions::read_only())?)
        }
        None => None,
    };
    let mut status = Ok(0);
    for act in acts {
        let op = match act {
            Act::Add => BitmapOp::Add {
                granularity: (granularity != 0).then_some(granularity),
                enabled: true,
            },
            Act::Remove => BitmapOp::Remove,
            Act::Clear => BitmapOp::Clear,
            Act::Enable => BitmapOp::Enable,
            Act::Disable => BitmapOp::Disable,
            Act::Merge(source) => BitmapOp::Merge { source },
        };
        let mut bar = crate::progress::Bar::new(
            !quiet,
            "Merging [{bar:40}] {percent:>3}% {pos}/{len} bitmap clusters ({eta})",
        );
        let done = img.bitmap_with_progress(name, &op, src.as_ref(), &mut |d, t| bar.update(d, t));
        bar.finish();
        if let Err(e) = done {
            let msg = match &e {
                Error::Invalid(m) => m.clone(),
                _ => error_text(&e),
            };
            status = Err(Fail::new(format!(
                "Operation {} on bitmap {name} failed: {msg}",
                op.verb()
            )));
            break;
        }
    }
    drop(src);
    let closed = img.close();
    match (status, closed) {
        (Err(f), _) => Err(f),
        (Ok(_), Err(e)) => Err(Fail::new(format!("{file}: {}", error_text(&e)))),
        (Ok(c), Ok(())) => Ok(c),
    }
}

fn range_fail() -> Fail {
    Fail::new(format!(
        "Invalid granularity specified. Must be between 0 and {}.",
        i64::MAX
    ))
}

const HELP: &str = "Usage: qcow2 bitmap (--merge SOURCE | --add | --remove | --clear | \
--enable | --disable)... [-b source_file [-F source_fmt]] [-g granularity] [--object ...] \
[-f fmt] [-q] filename bitmap";
