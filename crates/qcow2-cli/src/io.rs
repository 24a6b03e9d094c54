//! `qcow2 io`: qemu-io command scripts.
//!
//! Defaults follow qemu-io 10 (checked against it): cache mode
//! `writethrough`, discard mode `unmap` (qemu-io opens with BDRV_O_UNMAP, so
//! `discard` and `write -z -u` deallocate unless `-d ignore`/`-d off`).
//! Numbers take qemu's size syntax (`4k`, `1.5M`, `0x10000`, `512b`).

use crate::num::{cvtstr, parse_size, timestr, SizeError};
use crate::{error_text, strerror, OutputFormat};
use clap::Args;
use qcow2_ops::{
    CacheMode, DiscardMode, Error, Image, OpenOptions, REQ_FUA, REQ_MAY_UNMAP, REQ_NO_FALLBACK,
};
use std::io::{BufRead, Write};
use std::sync::OnceLock;
use std::time::Instant;

mod cmds;
mod dev;
mod open;
pub(crate) use open::parse_opt_string;

use dev::Dev;
use open::{OpenSpec, Opened};

/// Prints a line on stdout; a closed pipe is not an error (qemu-io ignores
/// SIGPIPE and goes on).
macro_rules! out {
    ($($t:tt)*) => {{
        crate::io::emit(format_args!($($t)*));
    }};
}

thread_local! {
    /// Output of an asynchronous request, printed when it is collected.
    static CAPTURE: std::cell::RefCell<Option<String>> = const { std::cell::RefCell::new(None) };
}

/// Prints a line on standard output, or keeps it for later in a thread
/// running an asynchronous request.
pub(crate) fn emit(args: std::fmt::Arguments<'_>) {
    let kept = CAPTURE.with(|c| match c.borrow_mut().as_mut() {
        Some(buf) => {
            use std::fmt::Write as _;
            let _ = buf.write_fmt(args);
            buf.push('\n');
            true
        }
        None => false,
    });
    if !kept {
        out_bytes(format!("{args}\n").as_bytes());
    }
}

/// qemu-io's stdout as C stdio keeps it: fully buffered (4 KiB blocks,
/// the rest at exit) when it is not a terminal (nor `stdbuf -oL`), so what goes to stderr
/// meanwhile (errors at close, ...) comes first in a shared pipe, as
/// scripts and QEMU's tests see it. `None`: a terminal, line buffered.
static OUT: std::sync::Mutex<Option<Vec<u8>>> = std::sync::Mutex::new(None);

/// C stdio's buffer for a pipe or file (`st_blksize`).
const OUT_BLOCK: usize = 4096;

/// Writes to qemu-io's stdout (see [`OUT`]).
pub(crate) fn out_bytes(b: &[u8]) {
    let mut g = OUT.lock().unwrap_or_else(|e| e.into_inner());
    let mut so = std::io::stdout();
    match g.as_mut() {
        None => {
            let _ = so.write_all(b);
        }
        Some(buf) => {
            buf.extend_from_slice(b);
            if buf.len() >= OUT_BLOCK {
                let n = buf.len() / OUT_BLOCK * OUT_BLOCK;
                let _ = so.write_all(&buf[..n]);
                let _ = so.flush();
                buf.drain(..n);
            }
        }
    }
}

/// Writes out what qemu-io's stdout holds (`fflush(stdout)`).
pub(crate) fn out_flush() {
    let mut g = OUT.lock().unwrap_or_else(|e| e.into_inner());
    let mut so = std::io::stdout();
    if let Some(buf) = g.as_mut() {
        let _ = so.write_all(buf);
        buf.clear();
    }
    let _ = so.flush();
}

/// Runs `f`, returning what it printed with `out!` instead of printing it.
pub(crate) fn captured(f: impl FnOnce()) -> String {
    CAPTURE.with(|c| *c.borrow_mut() = Some(String::new()));
    f();
    CAPTURE.with(|c| c.borrow_mut().take()).unwrap_or_default()
}
pub(crate) use out;

/// Prints an error on stderr with the program name, like QEMU's error_report.
macro_rules! report_err {
    ($($t:tt)*) => {{
        let _ = writeln!(std::io::stderr(), "{}: {}", crate::io::prog(), format!($($t)*));
    }};
}
pub(crate) use report_err;

/// eprintln! that ignores a closed stderr.
macro_rules! eprint_line {
    ($($t:tt)*) => {{
        let _ = writeln!(std::io::stderr(), $($t)*);
    }};
}

static PROG: OnceLock<String> = OnceLock::new();

/// The program name messages start with (argv[0]'s file name).
pub fn prog() -> &'static str {
    PROG.get().map(String::as_str).unwrap_or("qcow2")
}

/// Arguments of `qcow2 io`: qemu-io's command line (parsed by hand, like
/// getopt_long: options may repeat, the last one wins).
#[derive(Args, Debug)]
#[command(disable_help_flag = true)]
pub struct IoArgs {
    /// qemu-io options, `-c` commands and the image (see `qcow2 io -h`).
    #[arg(trailing_var_arg = true, allow_hyphen_values = true, num_args = 0..)]
    pub args: Vec<String>,
}

/// Largest request qemu-io accepts (BDRV_REQUEST_MAX_BYTES).
pub(crate) const MAX_REQ: u64 = 2147483136;

const READ_USAGE: &str =
    "read [-abCqrv] [-P pattern [-s off] [-l len]] off len -- reads a number of bytes at a specified offset";
const WRITE_USAGE: &str =
    "write [-bcCfnqruz] [-P pattern | -s source_file] off len -- writes a number of bytes at a specified offset";
const DISCARD_USAGE: &str =
    "discard [-Cq] off len -- discards a number of bytes at a specified offset";

/// The state of a session: the open device (if any).
pub(crate) struct Ctx {
    cur: Option<Opened>,
    size: u64,
    /// Engine tuning from the command line (used by `open`).
    tuning: OpenOptions,
    /// Asynchronous requests in flight.
    aio: Aio,
}

/// `aio_read` / `aio_write` run to completion at once, as the engine
/// serves them, except once a breakpoint was set (`break`): then each runs
/// on a thread of its own, so that one suspended at a breakpoint lets the
/// others go on, and their results are printed at `aio_flush` or close, in
/// the order they were issued (qemu-io prints them as they complete: the
/// same order where one waited for another, as with a breakpoint).
#[derive(Default)]
pub(crate) struct Aio {
    threaded: bool,
    running: Vec<std::thread::JoinHandle<String>>,
}

impl Aio {
    /// Waits for every request and prints their results (a failed
    /// request does not fail the program, as in qemu-io). A request still
    /// suspended at a breakpoint is resumed first: qemu-io would wait for
    /// ever.
    pub(crate) fn drain(&mut self, debug: Option<&qcow2_ops::io::Rules>) {
        if let Some(r) = debug {
            if !self.running.is_empty() {
                r.resume_all();
            }
        }
        for t in self.running.drain(..) {
            if let Ok(text) = t.join() {
                out_bytes(text.as_bytes());
            }
        }
    }

    /// Whether any request is still running.
    pub(crate) fn busy(&self) -> bool {
        self.running.iter().any(|t| !t.is_finished())
    }
}

impl Ctx {
    pub(crate) fn dev(&self) -> &Dev {
        match &self.cur {
            Some(o) => &o.dev,
            None => unreachable_dev(),
        }
    }
    pub(crate) fn set(&mut self, o: Option<Opened>) {
        self.size = o.as_ref().and_then(|o| o.dev.size().ok()).unwrap_or(0);
        self.cur = o;
    }
}

/// Commands that need a device run only when one is open.
fn unreachable_dev() -> &'static Dev {
    // run_line checks that a device is open before any command uses it.
    panic!("no device open")
}

/// A parsed option list: (flag, argument) pairs and the positional arguments.
pub(crate) type Parsed = (Vec<(char, Option<String>)>, Vec<String>);

/// getopt(3) with GNU argument permutation; prints errors like it.
pub(crate) fn getopt(name: &str, args: &[String], spec: &str, usage: &str) -> Option<Parsed> {
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
                eprint_line!("{name}: invalid option -- '{c}'");
                out!("{usage}");
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
                    eprint_line!("{name}: option requires an argument -- '{c}'");
                    out!("{usage}");
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
pub(crate) fn cvtnum(s: &str) -> Option<u64> {
    match parse_size(s) {
        Ok(v) => Some(v),
        Err(SizeError::TooLarge) => {
            out!("Parsing error: argument too large -- {s}");
            None
        }
        Err(SizeError::Invalid) => {
            out!("Parsing error: non-numeric argument, or extraneous/unrecognized suffix -- {s}");
            None
        }
    }
}

/// strtol(s, 0) over the whole string.
pub(crate) fn strtol(s: &str) -> Option<i64> {
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
    Some(if neg { -v } else { v })
}

/// strtol(s, 0) over the whole string, as a byte 0..=255 (no sign).
fn parse_pattern(s: &str) -> Option<u8> {
    if s.trim_start().starts_with('-') {
        return None;
    }
    strtol(s).and_then(|v| u8::try_from(v).ok())
}

pub(crate) fn pattern_arg(s: &str) -> Option<u8> {
    let p = parse_pattern(s);
    if p.is_none() {
        out!("{s} is not a valid pattern byte");
    }
    p
}

pub(crate) fn report(verb: &str, done: u64, offset: u64, secs: f64, machine: bool) {
    let secs = if secs > 0.0 { secs } else { 1e-9 };
    if machine {
        let cs = (secs * 100.0).round() as u64;
        let s = cs / 100;
        out!(
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
    out!("{verb} {done}/{done} bytes at offset {offset}");
    out!(
        "{}, 1 ops; {} ({}/sec and {:.4} ops/sec)",
        cvtstr(done as f64),
        timestr(secs),
        cvtstr(done as f64 / secs),
        1.0 / secs
    );
}

pub(crate) fn failed(cmd: &str, e: &Error) {
    if let Error::Corrupt(m) = e {
        // QEMU reports an image's first corruption event on stderr, in
        // these words (the detail is the engine's, without the image name).
        static REPORTED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
        if !REPORTED.swap(true, std::sync::atomic::Ordering::SeqCst) {
            let mut detail = match m.split_once(": ") {
                Some((name, rest)) if std::path::Path::new(name.trim_matches('\'')).exists() => {
                    rest
                }
                _ => m.as_str(),
            };
            // QEMU names the structure only (the engine adds the request).
            let overlap = "Preventing invalid write on metadata (overlaps with ";
            if let Some(end) = detail.strip_prefix(overlap).and_then(|r| r.find(')')) {
                detail = &detail[..overlap.len() + end + 1];
            }
            eprintln!(
                "qcow2: Marking image as corrupt: {detail}; further corruption events will be suppressed"
            );
        }
    }
    out!("{cmd} failed: {}", strerror(e.errno()));
}

pub(crate) fn eio(cmd: &str) {
    out!("{cmd} failed: {}", strerror(5));
}

/// Dumps a buffer like qemu-io's `read -v`.
pub(crate) fn dump(offset: u64, buf: &[u8]) {
    for (n, chunk) in buf.chunks(16).enumerate() {
        let mut line = format!("{:08x}:  ", offset + 16 * n as u64);
        for b in chunk {
            line.push_str(&format!("{b:02x} "));
        }
        line.push(' ');
        for &b in chunk {
            // As qemu-io: letters and digits only (isalnum in the C locale).
            line.push(if b.is_ascii_alphanumeric() {
                b as char
            } else {
                '.'
            });
        }
        out!("{line}");
    }
}

/// qemu-io's `-s FILE` buffer: the file's first `len` bytes, repeated to
/// fill `len`; its messages (stderr) for a missing or empty file.
fn data_from_file(name: &str, len: usize) -> Option<Vec<u8>> {
    use std::io::Read;
    let mut f = match std::fs::File::open(name) {
        Ok(f) => f,
        Err(e) => {
            eprintln!("{name}: {}", strerror(e.raw_os_error().unwrap_or(5)));
            return None;
        }
    };
    let mut buf = vec![0u8; len];
    let mut n = 0;
    while n < len {
        match f.read(&mut buf[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) => {
                eprintln!("{name}: {}", strerror(e.raw_os_error().unwrap_or(5)));
                return None;
            }
        }
    }
    if n == 0 && len > 0 {
        eprintln!("{name}: file is empty");
        return None;
    }
    for i in n..len {
        buf[i] = buf[i % n];
    }
    Some(buf)
}

pub(crate) fn in_bounds(ctx: &Ctx, off: u64, len: u64) -> bool {
    off <= ctx.size && len <= ctx.size - off
}

pub(crate) fn cmd_read(ctx: &Ctx, name: &str, args: &[String]) -> bool {
    let Some((opts, pos)) = getopt(name, args, "abCpP:qrs:l:v", READ_USAGE) else {
        return false;
    };
    let (mut pattern, mut quiet, mut verbose, mut machine) = (None, false, false, false);
    let mut vmstate = false;
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
            'b' => vmstate = true,
            _ => {}
        }
    }
    if pos.len() != 2 {
        out!("{READ_USAGE}");
        return false;
    }
    if pattern.is_none() && (p_off.is_some() || p_len.is_some()) {
        out!("{READ_USAGE}");
        return false;
    }
    let Some((offset, count)) = offset_and_length(&pos, Some("")) else {
        return false;
    };
    let p_off = p_off.unwrap_or(0);
    let p_len = p_len.unwrap_or(count.saturating_sub(p_off));
    if pattern.is_some() && (p_off > count || p_len > count - p_off) {
        out!("pattern verification range exceeds end of read data");
        return false;
    }
    if vmstate {
        for (v, what) in [(offset, "offset"), (count, "count")] {
            if v % 512 != 0 {
                out!("{v} is not a sector-aligned value for '{what}'");
                return false;
            }
        }
    } else if !in_bounds(ctx, offset, count) {
        eio("read");
        return false;
    }
    let mut buf = vec![0xabu8; count as usize];
    let t = Instant::now();
    if vmstate {
        if let Err(e) = ctx.dev().vmstate_read(offset, &mut buf) {
            failed("read", &e);
            return false;
        }
    } else if count > 0 {
        if let Err(e) = cmds::read_cor(ctx, offset, &mut buf) {
            failed("read", &e);
            return false;
        }
    }
    let secs = t.elapsed().as_secs_f64();
    let mut ok = true;
    if let Some(p) = pattern {
        let region = &buf[p_off as usize..(p_off + p_len) as usize];
        if region.iter().any(|&b| b != p) {
            out!(
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

pub(crate) fn cmd_write(ctx: &Ctx, name: &str, args: &[String]) -> bool {
    let Some((opts, pos)) = getopt(name, args, "bcCfnpP:qrs:uz", WRITE_USAGE) else {
        return false;
    };
    let (mut pattern, mut quiet, mut machine, mut zero, mut compressed, mut vmstate) =
        (None, false, false, false, false, false);
    let mut source: Option<String> = None;
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
            's' => source = v.clone(),
            _ => {}
        }
    }
    if pos.len() != 2 {
        out!("{WRITE_USAGE}");
        return false;
    }
    if vmstate && zero {
        out!("-b and -z cannot be specified at the same time");
        return false;
    }
    if flags & REQ_FUA != 0 && (vmstate || compressed) {
        out!("-f and -b or -c cannot be specified at the same time");
        return false;
    }
    if flags & REQ_NO_FALLBACK != 0 && !zero {
        out!("-n requires -z to be specified");
        return false;
    }
    if flags & REQ_MAY_UNMAP != 0 && !zero {
        out!("-u requires -z to be specified");
        return false;
    }
    if [zero, pattern.is_some(), source.is_some()]
        .iter()
        .filter(|&&b| b)
        .count()
        > 1
    {
        out!("Only one of -z, -P, and -s can be specified at the same time");
        return false;
    }
    // qemu-io lifts the length limit for -n requests.
    let limit = (flags & REQ_NO_FALLBACK == 0).then_some(" without -n");
    let Some((offset, count)) = offset_and_length(&pos, limit) else {
        return false;
    };
    if compressed || vmstate {
        // As qemu-io: compressed and VM state requests are sector aligned.
        for (v, what) in [(offset, "offset"), (count, "count")] {
            if v % 512 != 0 {
                out!("{v} is not a sector-aligned value for '{what}'");
                return false;
            }
        }
        if !zero {
            flags |= qcow2_ops::REQ_COMPRESSED;
        }
    }
    // The data: from -s FILE (repeated to the length), else the pattern.
    let data = if zero {
        Vec::new()
    } else if let Some(f) = &source {
        match data_from_file(f, count as usize) {
            Some(d) => d,
            None => return false,
        }
    } else {
        vec![pattern.unwrap_or(0xcd); count as usize]
    };
    if !vmstate && !in_bounds(ctx, offset, count) {
        eio("write");
        return false;
    }
    let t = Instant::now();
    let r = if vmstate {
        ctx.dev().vmstate_write(offset, &data)
    } else if count == 0 {
        Ok(())
    } else if zero {
        ctx.dev().write_zeroes(offset, count, flags)
    } else {
        ctx.dev()
            .write(offset, &data, flags & (REQ_FUA | qcow2_ops::REQ_COMPRESSED))
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

pub(crate) fn cmd_discard(ctx: &Ctx, name: &str, args: &[String]) -> bool {
    let Some((opts, pos)) = getopt(name, args, "Cq", DISCARD_USAGE) else {
        return false;
    };
    let quiet = opts.iter().any(|(c, _)| *c == 'q');
    let machine = opts.iter().any(|(c, _)| *c == 'C');
    if pos.len() != 2 {
        out!("{DISCARD_USAGE}");
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
        ctx.dev().discard(offset, count)
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

/// One qemu-io command: names, argument counts, whether it needs an open
/// device and write permission, and its help line.
pub(crate) struct CmdInfo {
    pub name: &'static str,
    pub alt: Option<&'static str>,
    pub min: usize,
    /// `None`: no upper bound.
    pub max: Option<usize>,
    pub needs_file: bool,
    pub writes: bool,
    pub args: &'static str,
    pub oneline: &'static str,
}

#[allow(clippy::too_many_arguments)]
const fn ci(
    name: &'static str,
    alt: Option<&'static str>,
    min: usize,
    max: Option<usize>,
    needs_file: bool,
    writes: bool,
    args: &'static str,
    oneline: &'static str,
) -> CmdInfo {
    CmdInfo {
        name,
        alt,
        min,
        max,
        needs_file,
        writes,
        args,
        oneline,
    }
}

/// The commands, in qemu-io's (alphabetical) help order.
pub(crate) const COMMANDS: &[CmdInfo] = &[
    ci(
        "abort",
        None,
        0,
        Some(0),
        false,
        false,
        "",
        "simulate a program crash using abort(3)",
    ),
    ci(
        "aio_flush",
        None,
        0,
        Some(0),
        true,
        false,
        "",
        "completes all outstanding aio requests",
    ),
    ci(
        "aio_read",
        None,
        2,
        None,
        true,
        false,
        "[-Ciqrv] [-P pattern] off len [len..]",
        "asynchronously reads a number of bytes",
    ),
    ci(
        "aio_write",
        None,
        2,
        None,
        true,
        true,
        "[-Cfiqruz] [-P pattern] off len [len..]",
        "asynchronously writes a number of bytes",
    ),
    ci(
        "alloc",
        Some("a"),
        1,
        Some(2),
        true,
        false,
        "offset [count]",
        "checks if offset is allocated in the file",
    ),
    ci(
        "break",
        None,
        2,
        Some(2),
        true,
        false,
        "event tag",
        "sets a breakpoint on event and tags the stopped request as tag",
    ),
    ci(
        "close",
        Some("c"),
        0,
        Some(0),
        true,
        false,
        "",
        "close the current open file",
    ),
    ci(
        "discard",
        Some("d"),
        2,
        None,
        true,
        true,
        "[-Cq] off len",
        "discards a number of bytes at a specified offset",
    ),
    ci(
        "flush",
        Some("f"),
        0,
        Some(0),
        true,
        false,
        "",
        "flush all in-core file state to disk",
    ),
    ci(
        "help",
        Some("?"),
        0,
        Some(1),
        false,
        false,
        "[command]",
        "help for one or all commands",
    ),
    ci(
        "info",
        Some("i"),
        0,
        Some(0),
        true,
        false,
        "",
        "prints information about the current file",
    ),
    ci(
        "length",
        Some("l"),
        0,
        Some(0),
        true,
        false,
        "",
        "gets the length of the current file",
    ),
    ci(
        "map",
        Some("m"),
        0,
        Some(0),
        true,
        false,
        "",
        "prints the allocated areas of a file",
    ),
    ci(
        "open",
        Some("o"),
        1,
        None,
        false,
        false,
        "[-rsCnkU] [-t cache] [-d discard] [-o options] [path]",
        "open the file specified by path",
    ),
    ci(
        "quit",
        Some("q"),
        0,
        Some(0),
        false,
        false,
        "",
        "exit the program",
    ),
    ci(
        "read",
        Some("r"),
        2,
        None,
        true,
        false,
        "[-abCqrv] [-P pattern [-s off] [-l len]] off len",
        "reads a number of bytes at a specified offset",
    ),
    ci(
        "readv",
        None,
        2,
        None,
        true,
        false,
        "[-Cqrv] [-P pattern] off len [len..]",
        "reads a number of bytes at a specified offset",
    ),
    ci(
        "remove_break",
        None,
        1,
        Some(1),
        true,
        false,
        "tag",
        "remove a breakpoint by tag",
    ),
    ci(
        "reopen",
        None,
        0,
        None,
        true,
        false,
        "[(-r|-w)] [-c cache] [-o options]",
        "reopens an image with new options",
    ),
    ci(
        "resume",
        None,
        1,
        Some(1),
        true,
        false,
        "tag",
        "resumes the request tagged as tag",
    ),
    ci(
        "sigraise",
        None,
        1,
        Some(1),
        false,
        false,
        "signal",
        "raises a signal",
    ),
    ci(
        "sleep",
        None,
        1,
        Some(1),
        false,
        false,
        "",
        "waits for the given value in milliseconds",
    ),
    ci(
        "truncate",
        Some("t"),
        1,
        Some(3),
        true,
        true,
        "[-m prealloc_mode] off",
        "truncates the current file at the given offset",
    ),
    ci(
        "wait_break",
        None,
        1,
        Some(1),
        true,
        false,
        "tag",
        "waits for the suspension of a request",
    ),
    ci(
        "write",
        Some("w"),
        2,
        None,
        true,
        true,
        "[-bcCfnqruz] [-P pattern | -s source_file] off len",
        "writes a number of bytes at a specified offset",
    ),
    ci(
        "writev",
        None,
        2,
        None,
        true,
        true,
        "[-Cfqr] [-P pattern] off len [len..]",
        "writes a number of bytes at a specified offset",
    ),
    ci(
        "zone_append",
        Some("zap"),
        3,
        Some(4),
        true,
        true,
        "offset len [len..]",
        "append write a number of bytes at a specified offset",
    ),
    ci(
        "zone_close",
        Some("zc"),
        2,
        Some(2),
        true,
        true,
        "offset len",
        "close a range of zones in zone block device",
    ),
    ci(
        "zone_finish",
        Some("zf"),
        2,
        Some(2),
        true,
        true,
        "offset len",
        "finish a range of zones in zone block device",
    ),
    ci(
        "zone_open",
        Some("zo"),
        2,
        Some(2),
        true,
        true,
        "offset len",
        "explicit open a range of zones in zone block device",
    ),
    ci(
        "zone_report",
        Some("zrp"),
        2,
        Some(2),
        true,
        false,
        "offset number",
        "report zone information",
    ),
    ci(
        "zone_reset",
        Some("zrs"),
        2,
        Some(2),
        true,
        true,
        "offset len",
        "reset a zone write pointer in zone block device",
    ),
];

/// `name args -- oneline`, as qemu-io prints usage and help lines.
pub(crate) fn usage_line(c: &CmdInfo) -> String {
    if c.args.is_empty() && c.name != "map" {
        return format!("{} -- {}", c.name, c.oneline);
    }
    format!("{} {} -- {}", c.name, c.args, c.oneline)
}

fn find_cmd(name: &str) -> Option<&'static CmdInfo> {
    COMMANDS
        .iter()
        .find(|c| c.name == name || c.alt == Some(name))
}

/// What a command line did.
enum Outcome {
    Ok,
    Failed,
    Quit,
}

/// Runs one command line.
fn run_line(ctx: &mut Ctx, line: &str) -> Outcome {
    let words: Vec<String> = line.split_whitespace().map(str::to_string).collect();
    let Some(name) = words.first() else {
        return Outcome::Ok;
    };
    let args = &words[1..];
    let Some(ci) = find_cmd(name) else {
        let _ = writeln!(std::io::stderr(), "command \"{name}\" not found");
        return Outcome::Failed;
    };
    if ci.needs_file && ctx.cur.is_none() {
        let _ = writeln!(std::io::stderr(), "no file open, try 'help open'");
        return Outcome::Failed;
    }
    let n = args.len();
    if n < ci.min || ci.max.is_some_and(|m| n > m) {
        let msg = match ci.max {
            Some(m) if m == ci.min => format!("expected {m} arguments"),
            Some(m) => format!("expected between {} and {m} arguments", ci.min),
            None => format!("expected at least {} arguments", ci.min),
        };
        let _ = writeln!(std::io::stderr(), "bad argument count {n} to {name}, {msg}");
        return Outcome::Failed;
    }
    if ci.writes && ctx.cur.as_ref().is_some_and(|o| o.read_only) {
        report_err!("Block node is read-only");
        return Outcome::Failed;
    }
    let ok = match ci.name {
        "read" => cmd_read(ctx, name, args),
        "write" => cmd_write(ctx, name, args),
        "discard" => cmd_discard(ctx, name, args),
        "quit" => return Outcome::Quit,
        _ => cmds::run(ctx, ci, name, args),
    };
    if ok {
        Outcome::Ok
    } else {
        Outcome::Failed
    }
}

fn print_stats(img: &Image, fmt: OutputFormat) {
    let s = img.stats();
    match fmt {
        OutputFormat::Json => {
            out!(
                "{}",
                serde_json::to_string(&s).unwrap_or_else(|_| "{}".into())
            );
        }
        OutputFormat::Human => {
            if let Ok(serde_json::Value::Object(m)) = serde_json::to_value(s) {
                for (k, v) in m {
                    out!("{k}: {v}");
                }
            }
        }
    }
}

fn usage() {
    let p = prog();
    out!("Usage: {p} [OPTIONS]... [-c STRING]... [file]");
    out!("Run qemu-io commands on a qcow2 or raw image.");
    out!("");
    out!("  --object OBJECTDEF   define an object (accepted, e.g. secret)");
    out!("  --image-opts         treat file as option string");
    out!("  -c, --cmd STRING     execute command with its arguments");
    out!("  -f, --format FMT     the image format (qcow2, raw)");
    out!("  -r, --read-only      open read-only");
    out!("  -s, --snapshot       writes go to a temporary overlay");
    out!("  -n, --nocache        disable host cache, short for -t none");
    out!("  -C, --copy-on-read   enable copy-on-read");
    out!("  -m, --misalign       accepted, no effect");
    out!("  -k, --native-aio     accepted, no effect");
    out!("  -i, --aio=MODE       threads, native or io_uring (accepted, no effect)");
    out!("  -t, --cache=MODE     cache mode for the image");
    out!("  -d, --discard=MODE   discard mode for the image");
    out!("  -T, --trace ...      accepted, no effect");
    out!("  -U, --force-share    accepted, no effect");
    out!("  --stats[=human|json] print the engine counters at the end");
    out!("  --l2-cache-size, --refcount-cache-size, --dirty-granularity SIZE");
    out!("                       engine cache tuning");
    out!("  -h, --help           display this help and exit");
    out!("  -V, --version        output version information and exit");
    out!("");
    out!("See '{p} -c help' for information on available commands.");
}

/// Long options: (name, short equivalent or 0, takes an argument: 0 no,
/// 1 required, 2 optional).
const LONG: &[(&str, char, u8)] = &[
    ("help", 'h', 0),
    ("version", 'V', 0),
    ("cmd", 'c', 1),
    ("format", 'f', 1),
    ("read-only", 'r', 0),
    ("snapshot", 's', 0),
    ("nocache", 'n', 0),
    ("copy-on-read", 'C', 0),
    ("misalign", 'm', 0),
    ("native-aio", 'k', 0),
    ("aio", 'i', 1),
    ("discard", 'd', 1),
    ("cache", 't', 1),
    ("trace", 'T', 1),
    ("object", 'O', 1),
    ("image-opts", 'I', 0),
    ("force-share", 'U', 0),
    ("stats", 'S', 2),
    ("l2-cache-size", '2', 1),
    ("refcount-cache-size", '3', 1),
    ("dirty-granularity", '4', 1),
];

const SHORT: &str = "hVc:d:f:rsnCmki:t:T:U";

/// getopt_long over the command line (GNU permutation; a long option may
/// be abbreviated when unambiguous). Err: exit status after the message.
fn getopt_long(args: &[String]) -> Result<Parsed, u8> {
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
        if let Some(l) = a.strip_prefix("--") {
            let (name, val) = match l.split_once('=') {
                Some((n, v)) => (n, Some(v.to_string())),
                None => (l, None),
            };
            let exact = LONG.iter().find(|o| o.0 == name);
            let cands: Vec<_> = LONG.iter().filter(|o| o.0.starts_with(name)).collect();
            let o = match (exact, cands.len()) {
                (Some(o), _) => o,
                (None, 1) => cands[0],
                (None, 0) => {
                    report_err!("unrecognized option '{a}'");
                    usage();
                    return Err(1);
                }
                _ => {
                    report_err!("option '{a}' is ambiguous");
                    usage();
                    return Err(1);
                }
            };
            match (o.2, val) {
                (0, Some(_)) => {
                    report_err!("option '--{}' doesn't allow an argument", o.0);
                    usage();
                    return Err(1);
                }
                (0, None) | (2, None) => opts.push((o.1, None)),
                (_, Some(v)) => opts.push((o.1, Some(v))),
                (_, None) => {
                    if i < args.len() {
                        i += 1;
                        opts.push((o.1, Some(args[i - 1].clone())));
                    } else {
                        report_err!("option '--{}' requires an argument", o.0);
                        usage();
                        return Err(1);
                    }
                }
            }
            continue;
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
            let Some(k) = SHORT.find(c).filter(|_| c != ':') else {
                report_err!("invalid option -- '{c}'");
                usage();
                return Err(1);
            };
            if SHORT[k + c.len_utf8()..].starts_with(':') {
                let v: String = if j < chars.len() {
                    let v = chars[j..].iter().collect();
                    j = chars.len();
                    v
                } else if i < args.len() {
                    i += 1;
                    args[i - 1].clone()
                } else {
                    report_err!("option requires an argument -- '{c}'");
                    usage();
                    return Err(1);
                };
                opts.push((c, Some(v)));
            } else {
                opts.push((c, None));
            }
        }
    }
    Ok((opts, pos))
}

fn size_opt(v: &str, name: &str) -> Result<usize, u8> {
    crate::num::parse_size(v)
        .ok()
        .and_then(|n| usize::try_from(n).ok())
        .filter(|&n| n > 0)
        .ok_or_else(|| {
            report_err!("Invalid {name}: '{v}'");
            1
        })
}

/// Checks an `--aio`/`-i` mode like QEMU (the engine does its own I/O: any
/// valid mode is accepted).
pub(crate) fn aio_mode_ok(m: &str) -> bool {
    matches!(m, "threads" | "native" | "io_uring")
}

/// `qcow2 io ARGS` or `qemu-io ARGS` (a link named qemu-io): `prog` is the
/// program's name for messages. Returns the exit status.
pub fn main_args(prog_name: &str, args: &[String]) -> u8 {
    use std::io::IsTerminal as _;
    // As a C program: `stdbuf -oL` / `-o0` (which say so in `_STDBUF_O`)
    // make stdout line buffered or unbuffered (every line is written at once).
    let line_mode = matches!(std::env::var("_STDBUF_O").as_deref(), Ok("L") | Ok("0"));
    if !line_mode && !std::io::stdout().is_terminal() {
        *OUT.lock().unwrap_or_else(|e| e.into_inner()) = Some(Vec::new());
    }
    // Written out however the run ends (an engine panic unwinds to main).
    struct FlushAtEnd;
    impl Drop for FlushAtEnd {
        fn drop(&mut self) {
            out_flush();
        }
    }
    let _flush = FlushAtEnd;
    main_args_buffered(prog_name, args)
}

fn main_args_buffered(prog_name: &str, args: &[String]) -> u8 {
    let _ = PROG.set(prog_name.to_string());
    let (opts, pos) = match getopt_long(args) {
        Ok(p) => p,
        Err(code) => return code,
    };
    let mut spec = OpenSpec::new(OpenOptions::default());
    let mut format: Option<String> = None;
    let mut image_opts = false;
    let mut cmds: Vec<String> = Vec::new();
    let mut stats: Option<OutputFormat> = None;
    let mut dirty_granularity = OpenOptions::DEFAULT_DIRTY_GRANULARITY;
    let mut tuning = OpenOptions {
        l2_cache_bytes: OpenOptions::DEFAULT_L2_CACHE,
        refcount_cache_bytes: OpenOptions::DEFAULT_REFCOUNT_CACHE,
        ..OpenOptions::default()
    };
    for (c, v) in opts {
        let v = v.unwrap_or_default();
        match c {
            's' => spec.snapshot = true,
            'n' => spec.cache = CacheMode::None,
            'C' => spec.copy_on_read = true,
            'd' => match DiscardMode::parse(&v) {
                Some(d) => spec.discard = d,
                None => {
                    report_err!("Invalid discard option: {v}");
                    return 1;
                }
            },
            'f' => format = Some(v),
            'c' => cmds.push(v),
            'r' => spec.read_only = true,
            'U' => spec.force_share = true,
            'm' | 'T' => {}
            'k' => spec.native_aio = true,
            'i' => {
                if !aio_mode_ok(&v) {
                    report_err!("Invalid aio option: {v}");
                    return 1;
                }
                spec.native_aio = v == "native";
            }
            't' => match CacheMode::parse(&v) {
                Some(m) => spec.cache = m,
                None => {
                    report_err!("Invalid cache option: {v}");
                    return 1;
                }
            },
            'V' => {
                out!("{} version {}", prog(), env!("CARGO_PKG_VERSION"));
                return 0;
            }
            'h' => {
                usage();
                return 0;
            }
            'O' => {
                if let Err(m) = crate::secrets::define(&v) {
                    report_err!("{m}");
                    return 1;
                }
            }
            'I' => image_opts = true,
            'S' => {
                stats = Some(match v.as_str() {
                    "" | "human" => OutputFormat::Human,
                    "json" => OutputFormat::Json,
                    _ => {
                        report_err!("Invalid --stats format: {v} (human or json)");
                        return 1;
                    }
                })
            }
            '2' => match size_opt(&v, "L2 cache size") {
                Ok(n) => tuning.l2_cache_bytes = n,
                Err(c) => return c,
            },
            '3' => match size_opt(&v, "refcount cache size") {
                Ok(n) => tuning.refcount_cache_bytes = n,
                Err(c) => return c,
            },
            '4' => match size_opt(&v, "dirty granularity") {
                Ok(n) => dirty_granularity = n,
                Err(c) => return c,
            },
            _ => {}
        }
    }
    if !dirty_granularity.is_power_of_two() || dirty_granularity < 512 {
        report_err!(
            "Invalid dirty granularity: {dirty_granularity} (a power of two, at least 512)"
        );
        return 1;
    }
    tuning.dirty_granularity = dirty_granularity;
    spec.tuning = tuning.clone();
    if pos.len() > 1 {
        usage();
        return 1;
    }
    if format.is_some() && image_opts {
        report_err!("--image-opts and -f are mutually exclusive");
        return 1;
    }
    let mut ctx = Ctx {
        cur: None,
        size: 0,
        tuning,
        aio: Aio::default(),
    };
    if let Some(file) = pos.first() {
        if image_opts {
            match open::parse_opt_string(file, None) {
                Ok(o) => spec.opts = o,
                Err(m) => {
                    report_err!("{m}");
                    return 1;
                }
            }
        } else {
            spec.name = Some(file.clone());
            if let Some(f) = &format {
                spec.opts.push(("driver".into(), f.clone()));
            }
        }
        match open::open(&spec) {
            Ok(o) => ctx.set(Some(o)),
            Err(m) => {
                if image_opts {
                    report_err!("can't open: {m}");
                } else {
                    report_err!("can't open device {file}: {m}");
                }
                return 1;
            }
        }
    }
    let mut ok = true;
    if cmds.is_empty() {
        let stdin = std::io::stdin();
        let mut lines = stdin.lock().lines();
        loop {
            out_bytes(format!("{}> ", prog()).as_bytes());
            out_flush();
            let Some(Ok(line)) = lines.next() else { break };
            match run_line(&mut ctx, line.trim()) {
                Outcome::Ok => {}
                Outcome::Failed => ok = false,
                Outcome::Quit => break,
            }
        }
    } else {
        for c in &cmds {
            match run_line(&mut ctx, c) {
                Outcome::Ok => {}
                Outcome::Failed => ok = false,
                Outcome::Quit => break,
            }
        }
    }
    let debug = ctx.cur.as_ref().and_then(|o| o.debug.clone());
    ctx.aio.drain(debug.as_deref());
    if let Some(o) = ctx.cur.take() {
        let name = o.spec.name.clone().unwrap_or_default();
        if let (Some(fmt), Dev::Qcow2(img)) = (stats, o.dev.base()) {
            // The counters cover the whole run, the flush that closing does included.
            if let Err(e) = img.flush() {
                report_err!("{name}: flush failed: {}", error_text(&e));
                ok = false;
            }
            print_stats(img, fmt);
        }
        if let Err((e, tables_dirty)) = o.close() {
            ok &= report_close_error(&name, &e, tables_dirty);
        }
    }
    out_flush();
    if ok {
        0
    } else {
        1
    }
}

/// Parses the OFF LEN operands with qemu-io's messages. `limit` is `None`
/// when the request length is unlimited, else the note inserted in the
/// length-limit message ("" or " without -n").
pub(crate) fn offset_and_length(pos: &[String], limit: Option<&str>) -> Option<(u64, u64)> {
    let offset = cvtnum(&pos[0])?;
    let count = cvtnum(&pos[1])?;
    if let Some(note) = limit {
        if count > MAX_REQ {
            out!("length cannot exceed {MAX_REQ}{note}, given {}", pos[1]);
            return None;
        }
    }
    Some((offset, count))
}

/// Reports a failed close. An I/O error is told in QEMU's words: its close
/// flushes the L2 table cache and then the refcount block cache, each
/// ending with a flush of the file, and reports each failure without
/// failing the program (a persistent error fails both). Other errors are
/// told with the image name and fail the program. Returns whether the
/// program may still succeed.
pub(crate) fn report_close_error(name: &str, e: &qcow2_ops::Error, tables_dirty: bool) -> bool {
    if let qcow2_ops::Error::Io { source, .. } = e {
        let text = strerror(source.raw_os_error().unwrap_or(5));
        // Each cache's flush ends with a flush of the file, which fails
        // too when the file does; a write refused by the overlap check
        // fails only the caches with something to write (the L2 cache's
        // dirty tables flush their refcounts first).
        if tables_dirty || !e.is_overlap_check() {
            report_err!("Failed to flush the L2 table cache: {text}");
        }
        report_err!("Failed to flush the refcount block cache: {text}");
        return true;
    }
    report_err!("{name}: close failed: {}", error_text(e));
    false
}
