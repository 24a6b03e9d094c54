//! `qcow2 snapshot`: internal snapshot management with qemu-img's syntax,
//! output, messages and exit codes.
//!
//! `qcow2 snapshot [--object ...] [--image-opts] [-U] [-q] [-l | -a snapshot |
//! -c snapshot | -d snapshot] [-f fmt] filename`
//!
//! `-a` looks the snapshot up by id, then by name; `-d` by name only (as
//! qemu-img does). Dates are printed in UTC.

use crate::num::size_to_str;
use crate::{check_format, error_text, open_image, Fail};
use clap::Args;
use qcow2_ops::{Error, OpenOptions, SnapshotInfo};
use std::path::Path;

/// Arguments of `qcow2 snapshot` (parsed by hand, as qemu-img's getopt).
#[derive(Args, Debug)]
#[command(disable_help_flag = true)]
pub struct SnapshotArgs {
    /// Options and FILENAME, as for `qemu-img snapshot`.
    #[arg(allow_hyphen_values = true, trailing_var_arg = true, num_args = 0..)]
    args: Vec<String>,
}

enum Act {
    List,
    Apply(String),
    Create(String),
    Delete(String),
}

const TRY: &str = "Try 'qcow2 snapshot --help' for more info";

/// Runs `qcow2 snapshot`.
pub fn run(a: SnapshotArgs) -> Result<u8, Fail> {
    let mut act: Option<Act> = None;
    let mut fmt = None;
    let mut force_share = false;
    let mut quiet = false;
    let mut pos = Vec::new();
    let mut it = a.args.into_iter();
    let mut only_pos = false;
    while let Some(s) = it.next() {
        if only_pos || !s.starts_with('-') || s == "-" {
            pos.push(s);
            continue;
        }
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
            None => it.next().ok_or_else(|| {
                getopt_fail(format!(
                    "option requires an argument -- '{}'",
                    key.trim_start_matches('-')
                ))
            }),
        };
        let new_act = match key.as_str() {
            "--" => {
                only_pos = true;
                None
            }
            "-l" => Some(Act::List),
            "-a" => Some(Act::Apply(val(&mut it)?)),
            "-c" => Some(Act::Create(val(&mut it)?)),
            "-d" => Some(Act::Delete(val(&mut it)?)),
            "-f" => {
                fmt = Some(val(&mut it)?);
                None
            }
            "-U" | "--force-share" => {
                force_share = true;
                None
            }
            "-q" => {
                quiet = true;
                None
            }
            "--object" => {
                val(&mut it)?;
                None
            }
            "--image-opts" => return Err(Fail::new("--image-opts is not supported")),
            "-h" | "--help" => {
                println!("{HELP}");
                return Ok(0);
            }
            _ => {
                return Err(getopt_fail(format!(
                    "invalid option -- '{}'",
                    key.trim_start_matches('-')
                )))
            }
        };
        if let Some(n) = new_act {
            if act.is_some() {
                return Err(Fail::new(format!(
                    "Cannot mix '-l', '-a', '-c', '-d'\n{TRY}"
                )));
            }
            act = Some(n);
        }
    }
    let _ = quiet;
    if pos.len() != 1 {
        return Err(Fail::new(format!("Expecting one image file name\n{TRY}")));
    }
    check_format(&fmt)?;
    let file = &pos[0];
    let act = act.unwrap_or(Act::List);
    let writable = !matches!(act, Act::List);
    if writable && force_share {
        return Err(Fail::new(format!(
            "Could not open '{file}': force-share=on can only be used with read-only images"
        )));
    }
    let opts = if writable {
        OpenOptions::read_write()
    } else {
        OpenOptions::read_only()
    };
    if let Err(e) = std::fs::metadata(file) {
        // qemu-img names the file twice (format layer, then protocol layer).
        let why = crate::strerror(e.raw_os_error().unwrap_or(5));
        return Err(Fail::new(format!(
            "Could not open '{file}': Could not open '{file}': {why}"
        )));
    }
    let img = open_image(Path::new(file), &opts)?;
    let status = match act {
        Act::List => match img.snapshots() {
            Ok(v) => {
                print!("{}", format_list(&v));
                Ok(0)
            }
            Err(e) => Err(Fail::new(format!("{file}: {}", error_text(&e)))),
        },
        Act::Create(name) => img.snapshot_create(&name).map(|_| 0).map_err(|e| {
            // qemu-img reports only the errno here.
            Fail::new(format!(
                "Could not create snapshot '{name}': {}",
                crate::strerror(e.errno())
            ))
        }),
        Act::Apply(name) => img.snapshot_apply(&name).map(|_| 0).map_err(|e| {
            let msg = if e.errno() == -2 {
                "Failed to load snapshot: No such file or directory".to_string()
            } else {
                engine_msg(&e)
            };
            Fail::new(format!("Could not apply snapshot '{name}': {msg}"))
        }),
        Act::Delete(name) => img.snapshot_delete(&name).map(|_| 0).map_err(|e| {
            let msg = if e.errno() == -2 {
                "snapshot not found".to_string()
            } else {
                engine_msg(&e)
            };
            Fail::new(format!("Could not delete snapshot '{name}': {msg}"))
        }),
    };
    let closed = img.close();
    match (status, closed) {
        (Err(f), _) => Err(f),
        (Ok(_), Err(e)) => Err(Fail::new(format!("{file}: {}", error_text(&e)))),
        (Ok(c), Ok(())) => Ok(c),
    }
}

/// An option error, worded and prefixed as getopt does for qemu-img.
fn getopt_fail(msg: String) -> Fail {
    eprintln!("qcow2 snapshot: {msg}\n{TRY}");
    Fail {
        msg: String::new(),
        code: 1,
    }
}

/// The engine's message without the image name prefix where it has one.
fn engine_msg(e: &Error) -> String {
    match e {
        Error::NotSupported(m) | Error::Invalid(m) => match m.split_once("': ") {
            Some((_, rest)) => rest.to_string(),
            None => m.clone(),
        },
        _ => error_text(e),
    }
}

/// The snapshot list as `qemu-img snapshot -l` and `qemu-img info` print it
/// (empty when there are no snapshots).
pub fn format_list(v: &[SnapshotInfo]) -> String {
    if v.is_empty() {
        return String::new();
    }
    let mut out = String::from("Snapshot list:\n");
    out.push_str(&format!(
        "{:<7} {:<16} {:>8} {:>19} {:>15} {:>10}\n",
        "ID", "TAG", "VM_SIZE", "DATE", "VM_CLOCK", "ICOUNT"
    ));
    for s in v {
        let ns = s.vm_clock_nsec;
        let secs = ns / 1_000_000_000;
        let clock = format!(
            "{:04}:{:02}:{:02}.{:03}",
            secs / 3600,
            (secs / 60) % 60,
            secs % 60,
            (ns / 1_000_000) % 1000
        );
        let icount = match s.icount {
            Some(i) if i != u64::MAX => (i as i64).to_string(),
            _ => "--".to_string(),
        };
        out.push_str(&format!(
            "{} {} {:>8} {:>19} {:>15} {:>10}\n",
            pad_bytes(&s.id, 7),
            pad_bytes(&s.name, 16),
            size_to_str(s.vm_state_size),
            utc_date(s.date_sec as u64),
            clock,
            icount
        ));
    }
    out
}

/// `s` left-aligned in `width` bytes (as C's `%-*s`, which counts bytes,
/// not characters).
fn pad_bytes(s: &str, width: usize) -> String {
    format!("{s}{}", " ".repeat(width.saturating_sub(s.len())))
}

/// `YYYY-MM-DD HH:MM:SS` in UTC.
fn utc_date(t: u64) -> String {
    let days = (t / 86400) as i64;
    let rem = t % 86400;
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = if m <= 2 { y + 1 } else { y };
    format!(
        "{y:04}-{m:02}-{d:02} {:02}:{:02}:{:02}",
        rem / 3600,
        (rem / 60) % 60,
        rem % 60
    )
}

const HELP: &str = "Usage: qcow2 snapshot [--object ...] [--image-opts] [-U] [-q] \
[-l | -a snapshot | -c snapshot | -d snapshot] [-f fmt] filename";

#[cfg(test)]
mod tests {
    #[test]
    fn dates() {
        assert_eq!(super::utc_date(0), "1970-01-01 00:00:00");
        assert_eq!(super::utc_date(1_796_103_254), "2026-12-01 05:34:14");
        assert_eq!(super::utc_date(951_782_400), "2000-02-29 00:00:00");
    }
}
