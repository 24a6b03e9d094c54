//! `qcow2 io`: qemu-io command scripts.
//!
//! Defaults follow qemu-io 10 (checked against it): cache mode
//! `writethrough`, discard mode `unmap` (qemu-io opens with BDRV_O_UNMAP, so
//! `discard` and `write -z -u` deallocate unless `-d ignore`/`-d off`).
//! Numbers take qemu's size syntax (`4k`, `1.5M`, `0x10000`, `512b`).

use crate::num::{cvtstr, parse_size, timestr, SizeError};
use crate::{check_format, error_text, open_image, strerror, Fail, OutputFormat};
use clap::Args;
use qcow2_ops::{
    CacheMode, DiscardMode, Error, Image, OpenOptions, REQ_FUA, REQ_MAY_UNMAP, REQ_NO_FALLBACK,
};
use std::io::BufRead;
use std::path::PathBuf;
use std::time::Instant;

/// Arguments of `qcow2 io`.
#[derive(Args, Debug)]
pub struct IoArgs {
    /// Open the image read-only.
    #[arg(short = 'r', long = "read-only")]
    read_only: bool,
    /// Image format (only qcow2).
    #[arg(short = 'f', long = "format")]
    format: Option<String>,
    /// Cache mode: writeback, writethrough (default), unsafe, none, directsync.
    #[arg(short = 't', long = "cache")]
    cache: Option<String>,
    /// Disable the host cache (same as -t none).
    #[arg(short = 'n', long = "nocache")]
    nocache: bool,
    /// Discard mode: unmap/on (default, as qemu-io) or ignore/off.
    #[arg(short = 'd', long = "discard")]
    discard: Option<String>,
    /// Accepted for compatibility; no effect.
    #[arg(short = 'U', long = "force-share")]
    force_share: bool,
    /// Print the engine counters after the commands (`--stats` or `--stats=json`).
    #[arg(long = "stats", value_enum, num_args = 0..=1, require_equals = true, default_missing_value = "human")]
    stats: Option<OutputFormat>,
    /// L2 table cache size in bytes (suffixes k/M/G; default 1M).
    #[arg(long = "l2-cache-size")]
    l2_cache_size: Option<String>,
    /// Refcount block cache size in bytes (suffixes k/M/G; default 256k).
    #[arg(long = "refcount-cache-size")]
    refcount_cache_size: Option<String>,
    /// Dirty tracking granularity inside cached tables: 512 to the cluster
    /// size, a power of two (default 4k).
    #[arg(long = "dirty-granularity")]
    dirty_granularity: Option<String>,
    /// A command to run (repeatable); without -c, commands are read from stdin.
    #[arg(short = 'c', long = "cmd", allow_hyphen_values = true, action = clap::ArgAction::Append)]
    cmds: Vec<String>,
    /// The image.
    file: PathBuf,
}

/// Largest request qemu-io accepts (BDRV_REQUEST_MAX_BYTES).
const MAX_REQ: u64 = 2147483136;

const READ_USAGE: &str =
    "read [-abCqrv] [-P pattern [-s off] [-l len]] off len -- reads a number of bytes at a specified offset";
const WRITE_USAGE: &str =
    "write [-bcCfnqruz] [-P pattern | -s source_file] off len -- writes a number of bytes at a specified offset";
const DISCARD_USAGE: &str =
    "discard [-Cq] off len -- discards a number of bytes at a specified offset";

struct Ctx {
    img: Image,
    read_only: bool,
    size: u64,
}

/// A parsed option list: (flag, argument) pairs and the positional arguments.
type Parsed = (Vec<(char, Option<String>)>, Vec<String>);

/// getopt(3) with GNU argument permutation; prints errors like it.
fn getopt(name: &str, args: &[String], spec: &str, usage: &str) -> Option<Parsed> {
    let mut opts = Vec::new();
    let mut pos = Vec::new();
    let mut i = 0;
    while i < args.len() {
        let a = &args[i];
        i += 1;
        if a == "--" {
            pos.extend(args[i..].iter().cloned());
            break;
        }
        if a.len() < 2 || !a.starts_with('-') {
            pos.push(a.clone());
            continue;
        }
        let chars: Vec<char> = a[1..].chars().collect();
        let mut j = 0;
        while j < chars.len() {
            let c = chars[j];
            j += 1;
            let Some(p) = spec.find(c).filter(|_| c != ':') else {
                eprintln!("{name}: invalid option -- '{c}'");
                println!("{usage}");
                return None;
            };
            if spec[p + c.len_utf8()..].starts_with(':') {
                let val: String = if j < chars.len() {
                    let v = chars[j..].iter().collect();
                    j = chars.len();
                    v
                } else if i < args.len() {
                    i += 1;
                    args[i - 1].clone()
                } else {
                    eprintln!("{name}: option requires an argument -- '{c}'");
                    println!("{usage}");
                    return None;
                };
                opts.push((c, Some(val)));
            } else {
                opts.push((c, None));
            }
        }
    }
    Some((opts, pos))
}

/// qemu-io's cvtnum with its error messages.
fn cvtnum(s: &str) -> Option<u64> {
    match parse_size(s) {
        Ok(v) => Some(v),
        Err(SizeError::TooLarge) => {
            println!("Parsing error: argument too large -- {s}");
            None
        }
        Err(SizeError::Invalid) => {
            println!(
                "Parsing error: non-numeric argument, or extraneous/unrecognized suffix -- {s}"
            );
            None
        }
    }
}

/// strtol(s, 0) over the whole string, as a byte 0..=255.
fn parse_pattern(s: &str) -> Option<u8> {
    let t = s.trim_start();
    let (neg, t) = match t.strip_prefix('-') {
        Some(r) => (true, r),
        None => (false, t.strip_prefix('+').unwrap_or(t)),
    };
    let v = if let Some(h) = t.strip_prefix("0x").or_else(|| t.strip_prefix("0X")) {
        i64::from_str_radix(h, 16).ok()?
    } else if t.len() > 1 && t.starts_with('0') {
        i64::from_str_radix(&t[1..], 8).ok()?
    } else {
        t.parse::<i64>().ok()?
    };
    if neg || t.is_empty() || !(0..=255).contains(&v) {
        return None;
    }
    Some(v as u8)
}

fn pattern_arg(s: &str) -> Option<u8> {
    let p = parse_pattern(s);
    if p.is_none() {
        println!("{s} is not a valid pattern byte");
    }
    p
}

fn report(verb: &str, done: u64, offset: u64, secs: f64, machine: bool) {
    let secs = if secs > 0.0 { secs } else { 1e-9 };
    if machine {
        let cs = (secs * 100.0).round() as u64;
        let s = cs / 100;
        println!(
            "{},1,{}:{:02}:{:02}.{:02},{:.3},{:.3}",
            done,
            s / 3600,
            (s / 60) % 60,
            s % 60,
            cs % 100,
            done as f64 / secs,
            1.0 / secs
        );
        return;
    }
    println!("{verb} {done}/{done} bytes at offset {offset}");
    println!(
        "{}, 1 ops; {} ({}/sec and {:.4} ops/sec)",
        cvtstr(done as f64),
        timestr(secs),
        cvtstr(done as f64 / secs),
        1.0 / secs
    );
}

fn failed(cmd: &str, e: &Error) {
    if let Error::Corrupt(m) = e {
        // What QEMU reports on stderr when it marks an image corrupt.
        eprintln!("qcow2: {m}");
    }
    println!("{cmd} failed: {}", strerror(e.errno()));
}

fn eio(cmd: &str) {
    println!("{cmd} failed: {}", strerror(5));
}

/// Dumps a buffer like qemu-io's `read -v`.
fn dump(offset: u64, buf: &[u8]) {
    for (n, chunk) in buf.chunks(16).enumerate() {
        let mut line = format!("{:08x}:  ", offset + 16 * n as u64);
        for b in chunk {
            line.push_str(&format!("{b:02x} "));
        }
        line.push(' ');
        for &b in chunk {
            line.push(if (b' '..=b'~').contains(&b) {
                b as char
            } else {
                '.'
            });
        }
        println!("{line}");
    }
}

fn in_bounds(ctx: &Ctx, off: u64, len: u64) -> bool {
    off <= ctx.size && len <= ctx.size - off
}

fn cmd_read(ctx: &Ctx, name: &str, args: &[String]) -> bool {
    let Some((opts, pos)) = getopt(name, args, "abCpP:qrs:l:v", READ_USAGE) else {
        return false;
    };
    let (mut pattern, mut quiet, mut verbose, mut machine) = (None, false, false, false);
    let (mut p_off, mut p_len): (Option<u64>, Option<u64>) = (None, None);
    for (c, v) in opts {
        match c {
            'P' => match pattern_arg(v.as_deref().unwrap_or("")) {
                Some(p) => pattern = Some(p),
                None => return false,
            },
            's' => match cvtnum(v.as_deref().unwrap_or("")) {
                Some(n) => p_off = Some(n),
                None => return false,
            },
            'l' => match cvtnum(v.as_deref().unwrap_or("")) {
                Some(n) => p_len = Some(n),
                None => return false,
            },
            'q' => quiet = true,
            'v' => verbose = true,
            'C' => machine = true,
            'b' => {
                println!("read failed: {}", strerror(95));
                return false;
            }
            _ => {}
        }
    }
    if pos.len() != 2 {
        println!("{READ_USAGE}");
        return false;
    }
    if pattern.is_none() && (p_off.is_some() || p_len.is_some()) {
        println!("{READ_USAGE}");
        return false;
    }
    let Some((offset, count)) = offset_and_length(&pos, Some("")) else {
        return false;
    };
    let p_off = p_off.unwrap_or(0);
    let p_len = p_len.unwrap_or(count.saturating_sub(p_off));
    if pattern.is_some() && (p_off > count || p_len > count - p_off) {
        println!("pattern verification range exceeds end of read data");
        return false;
    }
    if !in_bounds(ctx, offset, count) {
        eio("read");
        return false;
    }
    let mut buf = vec![0u8; count as usize];
    let t = Instant::now();
    if count > 0 {
        if let Err(e) = ctx.img.read(offset, &mut buf) {
            failed("read", &e);
            return false;
        }
    }
    let secs = t.elapsed().as_secs_f64();
    let mut ok = true;
    if let Some(p) = pattern {
        let region = &buf[p_off as usize..(p_off + p_len) as usize];
        if region.iter().any(|&b| b != p) {
            println!(
                "Pattern verification failed at offset {}, {} bytes",
                offset + p_off,
                p_len
            );
            ok = false;
        }
    }
    if quiet {
        return ok;
    }
    if verbose {
        dump(offset, &buf);
    }
    report("read", count, offset, secs, machine);
    ok
}

fn cmd_write(ctx: &Ctx, name: &str, args: &[String]) -> bool {
    let Some((opts, pos)) = getopt(name, args, "bcCfnpP:qrs:uz", WRITE_USAGE) else {
        return false;
    };
    let (mut pattern, mut quiet, mut machine, mut zero, mut compressed, mut vmstate, mut source) =
        (None, false, false, false, false, false, false);
    let mut flags = 0u32;
    for (c, v) in opts {
        match c {
            'P' => match pattern_arg(v.as_deref().unwrap_or("")) {
                Some(p) => pattern = Some(p),
                None => return false,
            },
            'q' => quiet = true,
            'C' => machine = true,
            'z' => zero = true,
            'u' => flags |= REQ_MAY_UNMAP,
            'n' => flags |= REQ_NO_FALLBACK,
            'f' => flags |= REQ_FUA,
            'c' => compressed = true,
            'b' => vmstate = true,
            's' => source = true,
            _ => {}
        }
    }
    if pos.len() != 2 {
        println!("{WRITE_USAGE}");
        return false;
    }
    if [zero, pattern.is_some(), source]
        .iter()
        .filter(|&&b| b)
        .count()
        > 1
    {
        println!("Only one of -z, -P, and -s can be specified at the same time");
        return false;
    }
    if flags & REQ_MAY_UNMAP != 0 && !zero {
        println!("-u requires -z to be specified");
        return false;
    }
    if flags & REQ_NO_FALLBACK != 0 && !zero {
        println!("-n requires -z to be specified");
        return false;
    }
    // qemu-io lifts the length limit for -n requests.
    let limit = (flags & REQ_NO_FALLBACK == 0).then_some(" without -n");
    let Some((offset, count)) = offset_and_length(&pos, limit) else {
        return false;
    };
    if compressed {
        // As qemu-io: compressed requests are sector aligned.
        for (v, what) in [(offset, "offset"), (count, "count")] {
            if v % 512 != 0 {
                println!("{v} is not a sector-aligned value for '{what}'");
                return false;
            }
        }
        if !zero {
            flags |= qcow2_ops::REQ_COMPRESSED;
        }
    }
    if vmstate || source {
        // Not provided by the engine's API.
        println!("write failed: {}", strerror(95));
        return false;
    }
    if !in_bounds(ctx, offset, count) {
        eio("write");
        return false;
    }
    let t = Instant::now();
    let r = if count == 0 {
        Ok(())
    } else if zero {
        ctx.img.write_zeroes(offset, count, flags)
    } else {
        let buf = vec![pattern.unwrap_or(0xcd); count as usize];
        ctx.img
            .write(offset, &buf, flags & (REQ_FUA | qcow2_ops::REQ_COMPRESSED))
    };
    let secs = t.elapsed().as_secs_f64();
    if let Err(e) = r {
        failed("write", &e);
        return false;
    }
    if !quiet {
        report("wrote", count, offset, secs, machine);
    }
    true
}

fn cmd_discard(ctx: &Ctx, name: &str, args: &[String]) -> bool {
    let Some((opts, pos)) = getopt(name, args, "Cq", DISCARD_USAGE) else {
        return false;
    };
    let quiet = opts.iter().any(|(c, _)| *c == 'q');
    let machine = opts.iter().any(|(c, _)| *c == 'C');
    if pos.len() != 2 {
        println!("{DISCARD_USAGE}");
        return false;
    }
    let Some((offset, count)) = offset_and_length(&pos, Some("")) else {
        return false;
    };
    if !in_bounds(ctx, offset, count) {
        eio("discard");
        return false;
    }
    let t = Instant::now();
    let r = if count == 0 {
        Ok(())
    } else {
        ctx.img.discard(offset, count)
    };
    let secs = t.elapsed().as_secs_f64();
    if let Err(e) = r {
        failed("discard", &e);
        return false;
    }
    if !quiet {
        report("discard", count, offset, secs, machine);
    }
    true
}

/// Runs one command line; false when it failed.
fn run_line(ctx: &Ctx, line: &str) -> bool {
    let words: Vec<String> = line.split_whitespace().map(str::to_string).collect();
    let Some(name) = words.first() else {
        return true;
    };
    let args = &words[1..];
    let (canon, min, max, writes) = match name.as_str() {
        "read" | "r" => ("read", 2, usize::MAX, false),
        "write" | "w" => ("write", 2, usize::MAX, true),
        "discard" | "d" => ("discard", 2, usize::MAX, true),
        "flush" | "f" => ("flush", 0, 0, false),
        _ => {
            eprintln!("command \"{name}\" not found");
            return false;
        }
    };
    if args.len() < min || args.len() > max {
        if min == max {
            eprintln!(
                "bad argument count {} to {name}, expected {min} arguments",
                args.len()
            );
        } else {
            eprintln!(
                "bad argument count {} to {name}, expected at least {min} arguments",
                args.len()
            );
        }
        return false;
    }
    if writes && ctx.read_only {
        eprintln!("qcow2: Block node is read-only");
        return false;
    }
    match canon {
        "read" => cmd_read(ctx, name, args),
        "write" => cmd_write(ctx, name, args),
        "discard" => cmd_discard(ctx, name, args),
        _ => match ctx.img.flush() {
            Ok(()) => true,
            Err(e) => {
                failed("flush", &e);
                false
            }
        },
    }
}

fn print_stats(img: &Image, fmt: OutputFormat) {
    let s = img.stats();
    match fmt {
        OutputFormat::Json => {
            println!(
                "{}",
                serde_json::to_string(&s).unwrap_or_else(|_| "{}".into())
            );
        }
        OutputFormat::Human => {
            if let Ok(serde_json::Value::Object(m)) = serde_json::to_value(s) {
                for (k, v) in m {
                    println!("{k}: {v}");
                }
            }
        }
    }
}

/// Runs `qcow2 io`; exit status 1 when any command (or the open/close) failed.
pub fn run(a: IoArgs) -> Result<u8, Fail> {
    check_format(&a.format)?;
    let _ = a.force_share;
    let cache = match (&a.cache, a.nocache) {
        (Some(c), _) => {
            CacheMode::parse(c).ok_or_else(|| Fail::new(format!("Invalid cache option: {c}")))?
        }
        (None, true) => CacheMode::None,
        (None, false) => CacheMode::Writethrough,
    };
    let discard = match &a.discard {
        Some(d) => DiscardMode::parse(d)
            .ok_or_else(|| Fail::new(format!("Invalid discard option: {d}")))?,
        None => DiscardMode::Unmap,
    };
    let size_opt = |v: &Option<String>, name: &str, default: usize| -> Result<usize, Fail> {
        match v {
            None => Ok(default),
            Some(s) => crate::num::parse_size(s)
                .ok()
                .and_then(|n| usize::try_from(n).ok())
                .filter(|&n| n > 0)
                .ok_or_else(|| Fail::new(format!("Invalid {name}: '{s}'"))),
        }
    };
    let dirty_granularity = size_opt(
        &a.dirty_granularity,
        "dirty granularity",
        OpenOptions::DEFAULT_DIRTY_GRANULARITY,
    )?;
    if !dirty_granularity.is_power_of_two() || dirty_granularity < 512 {
        return Err(Fail::new(format!(
            "Invalid dirty granularity: {dirty_granularity} (a power of two, at least 512)"
        )));
    }
    let opts = OpenOptions {
        writable: !a.read_only,
        cache,
        discard,
        l2_cache_bytes: size_opt(
            &a.l2_cache_size,
            "L2 cache size",
            OpenOptions::DEFAULT_L2_CACHE,
        )?,
        refcount_cache_bytes: size_opt(
            &a.refcount_cache_size,
            "refcount cache size",
            OpenOptions::DEFAULT_REFCOUNT_CACHE,
        )?,
        dirty_granularity,
        ..OpenOptions::default()
    };
    let img = open_image(&a.file, &opts)
        .map_err(|f| Fail::new(format!("can't open device {}: {}", a.file.display(), f.msg)))?;
    let ctx = Ctx {
        size: img.virtual_size(),
        img,
        read_only: a.read_only,
    };
    let mut ok = true;
    if a.cmds.is_empty() {
        let stdin = std::io::stdin();
        for line in stdin.lock().lines() {
            let Ok(line) = line else { break };
            let t = line.trim();
            if t == "quit" || t == "q" {
                break;
            }
            ok &= run_line(&ctx, t);
        }
    } else {
        for c in &a.cmds {
            ok &= run_line(&ctx, c);
        }
    }
    let Ctx { img, .. } = ctx;
    if let Some(fmt) = a.stats {
        // The counters cover the whole run, the flush that closing does included.
        if let Err(e) = img.flush() {
            eprintln!(
                "qcow2: {}: flush failed: {}",
                a.file.display(),
                error_text(&e)
            );
            ok = false;
        }
        print_stats(&img, fmt);
    }
    if let Err(e) = img.close() {
        eprintln!(
            "qcow2: {}: close failed: {}",
            a.file.display(),
            error_text(&e)
        );
        ok = false;
    }
    Ok(if ok { 0 } else { 1 })
}

/// Parses the OFF LEN operands with qemu-io's messages. `limit` is `None`
/// when the request length is unlimited, else the note inserted in the
/// length-limit message ("" or " without -n").
fn offset_and_length(pos: &[String], limit: Option<&str>) -> Option<(u64, u64)> {
    let offset = cvtnum(&pos[0])?;
    let count = cvtnum(&pos[1])?;
    if let Some(note) = limit {
        if count > MAX_REQ {
            println!("length cannot exceed {MAX_REQ}{note}, given {}", pos[1]);
            return None;
        }
    }
    Some((offset, count))
}
