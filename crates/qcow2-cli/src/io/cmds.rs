//! The qemu-io commands beyond read/write/discard: vectored and "aio"
//! requests, allocation queries, device management and the helpers.

use super::dev::Dev;
use super::open::{self, OpenSpec};
use super::{
    cvtnum, dump, eio, failed, getopt, in_bounds, out, pattern_arg, report, report_err, usage_line,
    Aio, CmdInfo, Ctx, COMMANDS, MAX_REQ,
};
use crate::num::cvtstr;
use crate::strerror;
use qcow2_ops::io::DebugEvent;
use qcow2_ops::{CacheMode, Result, REQ_FUA, REQ_MAY_UNMAP};
use std::io::Write;
use std::time::Instant;

/// Runs a command other than read/write/discard/quit.
pub(crate) fn run(ctx: &mut Ctx, ci: &'static CmdInfo, name: &str, args: &[String]) -> bool {
    match ci.name {
        "readv" => vread(ctx, name, args, ci, false),
        "aio_read" | "aio_write" if ctx.aio.threaded => spawn_aio(ctx, ci, name, args),
        "aio_read" => vread(ctx, name, args, ci, true),
        "writev" => vwrite(ctx, name, args, ci, false),
        "aio_write" => vwrite(ctx, name, args, ci, true),
        "aio_flush" => {
            let debug = debug_node(ctx);
            ctx.aio.drain(debug.as_deref());
            true
        }
        // As abort(3) in qemu-io: what stdout still buffers is lost.
        "abort" => std::process::abort(),
        // Breakpoints need a blkdebug node (QEMU reports "Operation not
        // supported" without one); zones need a zoned device.
        "break" => {
            let Some(rules) = debug_node(ctx) else {
                out!("Could not set breakpoint: {}", strerror(95));
                return false;
            };
            match DebugEvent::from_name(&args[0]) {
                Some(ev) if qcow2_ops::blkdebug_accepts(ev) || ev == DebugEvent::CorWrite => {
                    rules.add_breakpoint(ev, &args[1]);
                    ctx.aio.threaded = true;
                    true
                }
                _ => {
                    out!("Could not set breakpoint: {}", strerror(2));
                    false
                }
            }
        }
        "remove_break" => {
            if debug_node(ctx).is_some_and(|r| r.remove_breakpoint(&args[0])) {
                return true;
            }
            let e = if debug_node(ctx).is_some() { 2 } else { 95 };
            out!("Could not remove breakpoint {}: {}", args[0], strerror(e));
            false
        }
        "resume" => {
            if debug_node(ctx).is_some_and(|r| r.resume(&args[0])) {
                return true;
            }
            let e = if debug_node(ctx).is_some() { 2 } else { 95 };
            out!("Could not resume request: {}", strerror(e));
            false
        }
        "wait_break" => {
            let Some(rules) = debug_node(ctx) else {
                // qemu-io waits for ever here; we say why we do not.
                report_err!("wait_break: no blkdebug node to break in");
                return false;
            };
            // qemu-io waits for ever when no request will stop there; we
            // stop waiting once no request is running any more.
            let aio = &ctx.aio;
            if rules.wait_suspended(&args[0], &|| !aio.busy()) {
                true
            } else {
                report_err!(
                    "wait_break: no request is running that could stop at '{}'",
                    args[0]
                );
                false
            }
        }
        z if z.starts_with("zone_") => {
            if args.iter().any(|a| cvtnum(a).is_none()) {
                return false;
            }
            out!("zone {} failed: {}", &z[5..], strerror(95));
            false
        }
        "flush" => match ctx.dev().flush() {
            Ok(()) => true,
            // qemu-io's flush fails silently; under our own name we say so.
            Err(e) if super::prog() != "qemu-io" => {
                failed("flush", &e);
                false
            }
            Err(_) => false,
        },
        "alloc" => alloc(ctx, args),
        "map" => map(ctx),
        "length" => match ctx.dev().size() {
            Ok(n) => {
                out!("{}", cvtstr(n as f64));
                true
            }
            Err(e) => {
                out!("getlength: {}", strerror(e.errno()));
                false
            }
        },
        "info" => info(ctx),
        "help" => help(args),
        "sleep" => sleep(args),
        "sigraise" => sigraise(args),
        "close" => {
            close(ctx);
            true
        }
        "open" => open_cmd(ctx, ci, args),
        "reopen" => reopen(ctx, ci, args),
        "truncate" => {
            let ok = truncate(ctx, ci, args);
            ctx.size = ctx.dev().size().unwrap_or(ctx.size);
            ok
        }
        _ => false,
    }
}

/// Reads, then with copy-on-read writes what came from the backing chain
/// into the top image (whole clusters, as QEMU does).
pub(crate) fn read_cor(ctx: &Ctx, off: u64, buf: &mut [u8]) -> Result<()> {
    let dev = ctx.dev();
    dev.read(off, buf)?;
    let Some(o) = &ctx.cur else { return Ok(()) };
    let Dev::Qcow2(img) = dev.base() else {
        return Ok(());
    };
    if !o.copy_on_read || o.read_only || buf.is_empty() {
        return Ok(());
    }
    // Whole clusters, or subclusters of an image with extended L2
    // entries, as QEMU copies them.
    let cs = if img.info().extended_l2 {
        img.cluster_size() / 32
    } else {
        img.cluster_size()
    };
    let size = ctx.size;
    let start = off / cs * cs;
    let end = (off + buf.len() as u64)
        .div_ceil(cs)
        .saturating_mul(cs)
        .min(size);
    let mut pos = start;
    while pos < end {
        let (alloc, n) = dev.is_allocated(pos, end - pos)?;
        if n == 0 {
            break;
        }
        if !alloc {
            let mut data = vec![0u8; n as usize];
            dev.read(pos, &mut data)?;
            dev.event(qcow2_ops::io::DebugEvent::CorWrite);
            if data.iter().all(|&b| b == 0) {
                dev.write_zeroes(pos, n, 0)?;
            } else {
                dev.write(pos, &data, 0)?;
            }
        }
        pos += n;
    }
    Ok(())
}

/// Parses the `len [len..]` operands of the vectored commands.
fn iov_lengths(lens: &[String]) -> Option<u64> {
    let mut total = 0u64;
    for a in lens {
        let n = cvtnum(a)?;
        if n > MAX_REQ {
            out!("Argument '{a}' exceeds maximum size {MAX_REQ}");
            return None;
        }
        if total > MAX_REQ - n {
            out!("The total number of bytes exceed the maximum size {MAX_REQ}");
            return None;
        }
        total += n;
    }
    Some(total)
}

/// `readv` and `aio_read`.
fn vread(ctx: &Ctx, name: &str, args: &[String], ci: &CmdInfo, aio: bool) -> bool {
    let usage = usage_line(ci);
    let spec = if aio { "CiP:qrv" } else { "CP:qrv" };
    let Some((opts, pos)) = getopt(name, args, spec, &usage) else {
        return false;
    };
    let (mut pattern, mut quiet, mut verbose, mut machine) = (None, false, false, false);
    for (c, v) in opts {
        match c {
            'P' => match pattern_arg(v.as_deref().unwrap_or("")) {
                Some(p) => pattern = Some(p),
                None => return false,
            },
            'q' => quiet = true,
            'v' => verbose = true,
            'C' => machine = true,
            'i' => {
                // qemu-io only counts an invalid request in its statistics.
                out!("injecting invalid read request");
                return true;
            }
            _ => {}
        }
    }
    if pos.len() < 2 {
        out!("{usage}");
        return false;
    }
    let Some(offset) = cvtnum(&pos[0]) else {
        return false;
    };
    let Some(count) = iov_lengths(&pos[1..]) else {
        return false;
    };
    // The failure messages of aio_read say "readv" too.
    if !in_bounds(ctx, offset, count) {
        eio("readv");
        return false;
    }
    let mut buf = vec![0xabu8; count as usize];
    let t = Instant::now();
    if count > 0 {
        if let Err(e) = read_cor(ctx, offset, &mut buf) {
            failed("readv", &e);
            return false;
        }
    }
    let secs = t.elapsed().as_secs_f64();
    let mut ok = true;
    if let Some(p) = pattern {
        if buf.iter().any(|&b| b != p) {
            out!("Pattern verification failed at offset {offset}, {count} bytes");
            ok = false;
            if aio {
                // aio_read stops here (qemu-io prints no report then).
                return false;
            }
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

/// `writev` and `aio_write`.
fn vwrite(ctx: &Ctx, name: &str, args: &[String], ci: &CmdInfo, aio: bool) -> bool {
    let usage = usage_line(ci);
    let spec = if aio { "CfiP:qruz" } else { "CfP:qr" };
    let Some((opts, pos)) = getopt(name, args, spec, &usage) else {
        return false;
    };
    let (mut pattern, mut quiet, mut machine, mut zero) = (None, false, false, false);
    let mut flags = 0u32;
    for (c, v) in opts {
        match c {
            'P' => match pattern_arg(v.as_deref().unwrap_or("")) {
                Some(p) => pattern = Some(p),
                None => return false,
            },
            'q' => quiet = true,
            'C' => machine = true,
            'f' => flags |= REQ_FUA,
            'u' => flags |= REQ_MAY_UNMAP,
            'z' => zero = true,
            'i' => {
                // qemu-io only counts an invalid request in its statistics.
                out!("injecting invalid write request");
                return true;
            }
            _ => {}
        }
    }
    if pos.len() < 2 {
        out!("{usage}");
        return false;
    }
    if zero && pos.len() > 2 {
        out!("-z supports only a single length parameter");
        return false;
    }
    if flags & REQ_MAY_UNMAP != 0 && !zero {
        out!("-u requires -z to be specified");
        return false;
    }
    // qemu-io 10 never sets its -P flag in aio_write, so its "-z and -P"
    // check never fires: -z wins.
    if zero && pattern.is_some() && !aio {
        out!("-z and -P cannot be specified at the same time");
        return false;
    }
    let Some(offset) = cvtnum(&pos[0]) else {
        return false;
    };
    let Some(count) = iov_lengths(&pos[1..]) else {
        return false;
    };
    let verb = if aio { "aio_write" } else { "writev" };
    if !in_bounds(ctx, offset, count) {
        eio(verb);
        return false;
    }
    let t = Instant::now();
    let r = if count == 0 {
        Ok(())
    } else if zero {
        ctx.dev().write_zeroes(offset, count, flags)
    } else {
        let buf = vec![pattern.unwrap_or(0xcd); count as usize];
        ctx.dev().write(offset, &buf, flags & REQ_FUA)
    };
    let secs = t.elapsed().as_secs_f64();
    if let Err(e) = r {
        failed(verb, &e);
        return false;
    }
    if !quiet {
        report("wrote", count, offset, secs, machine);
    }
    true
}

fn alloc(ctx: &Ctx, args: &[String]) -> bool {
    let Some(start) = cvtnum(&args[0]) else {
        return false;
    };
    let mut count = match args.get(1) {
        Some(a) => match cvtnum(a) {
            Some(n) => n,
            None => return false,
        },
        None => 512,
    };
    let (mut off, mut remaining, mut sum) = (start, count, 0u64);
    while remaining > 0 {
        let (a, n) = match ctx.dev().is_allocated(off, remaining) {
            Ok(r) => r,
            Err(e) => {
                out!("is_allocated failed: {}", strerror(e.errno()));
                return false;
            }
        };
        off += n;
        remaining -= n;
        if a {
            sum += n;
        }
        if n == 0 {
            count -= remaining;
            remaining = 0;
        }
    }
    out!(
        "{sum}/{count} bytes allocated at offset {}",
        cvtstr(start as f64)
    );
    true
}

fn map(ctx: &Ctx) -> bool {
    let size = match ctx.dev().size() {
        Ok(n) => n,
        Err(e) => {
            report_err!("Failed to query image length: {}", strerror(e.errno()));
            return false;
        }
    };
    let (mut off, mut bytes) = (0u64, size);
    while bytes > 0 {
        // Merge runs of the same status, as qemu-io does.
        let (first, mut num) = match ctx.dev().is_allocated(off, bytes) {
            Ok(r) => r,
            Err(e) => {
                report_err!("Failed to get allocation status: {}", strerror(e.errno()));
                return false;
            }
        };
        while num > 0 && num < bytes {
            match ctx.dev().is_allocated(off + num, bytes - num) {
                Ok((a, n)) if a == first && n > 0 => num += n,
                Ok(_) => break,
                Err(e) => {
                    report_err!("Failed to get allocation status: {}", strerror(e.errno()));
                    return false;
                }
            }
        }
        if num == 0 {
            report_err!("Unexpected end of image");
            return false;
        }
        let what = if first {
            "    allocated"
        } else {
            "not allocated"
        };
        out!(
            "{} (0x{num:x}) bytes {what} at offset {} (0x{off:x})",
            cvtstr(num as f64),
            cvtstr(off as f64)
        );
        off += num;
        bytes -= num;
    }
    true
}

fn info(ctx: &Ctx) -> bool {
    let dev = ctx.dev();
    if dev.size().is_err() {
        // A device made unusable (no driver left): qemu-io prints nothing.
        return false;
    }
    out!("format name: {}", dev.base().format_name());
    match dev.base() {
        Dev::Qcow2(img) => {
            let i = img.info();
            let cs = i.cluster_size;
            let l2_entries = cs / if i.extended_l2 { 16 } else { 8 };
            let per_l1 = cs.saturating_mul(l2_entries);
            let vm_state = i.virtual_size.div_ceil(per_l1).saturating_mul(per_l1);
            out!("cluster size: {}", cvtstr(cs as f64));
            out!("vm state offset: {}", cvtstr(vm_state as f64));
            out!("Format specific information:");
            if i.version >= 3 {
                out!("    compat: 1.1");
                out!("    compression type: {}", i.compression_type);
                out!("    lazy refcounts: {}", i.lazy_refcounts);
                out!("    refcount bits: {}", i.refcount_bits);
                out!("    corrupt: {}", i.corrupt);
                out!("    extended l2: {}", i.extended_l2);
            } else {
                out!("    compat: 0.10");
                out!("    compression type: {}", i.compression_type);
                out!("    refcount bits: {}", i.refcount_bits);
            }
            if let Some(d) = &i.data_file {
                out!("    data file: {d}");
            }
        }
        Dev::Raw { protocol_info, .. } => {
            if !*protocol_info {
                // No driver information (an NBD export): qemu-io fails
                // after the format name.
                return false;
            }
            out!("cluster size: 0 bytes");
            out!("vm state offset: 0 bytes");
        }
        // null-co is a protocol driver too (its name comes twice) and has
        // no driver information: qemu-io fails silently.
        Dev::Null { .. } => {
            out!("format name: null-co");
            return false;
        }
        Dev::Debug { .. } | Dev::Compress { .. } => {
            unreachable!("base() is below every filter")
        }
    }
    true
}

fn help(args: &[String]) -> bool {
    match args.first() {
        None => {
            for c in COMMANDS {
                out!("{}", usage_line(c));
            }
            out!("");
            out!("Use 'help commandname' for extended help.");
            true
        }
        Some(n) => match COMMANDS
            .iter()
            .find(|c| c.name == n.as_str() || c.alt == Some(n.as_str()))
        {
            Some(c) => {
                // The line starts with the name as given (an alias too).
                let l = usage_line(c);
                out!("{n}{}", &l[c.name.len()..]);
                true
            }
            None => {
                out!("command {n} not found");
                false
            }
        },
    }
}

fn sleep(args: &[String]) -> bool {
    match crate::io::strtol(&args[0]) {
        Some(ms) if ms >= 0 => {
            std::thread::sleep(std::time::Duration::from_millis(ms as u64));
            true
        }
        _ => {
            out!("{} is not a valid number", args[0]);
            false
        }
    }
}

/// Highest signal number + 1 on Linux (NSIG).
const NSIG: u64 = 65;

fn sigraise(args: &[String]) -> bool {
    let Some(sig) = cvtnum(&args[0]) else {
        return false;
    };
    if sig > NSIG {
        out!(
            "signal argument '{}' is too large to be a valid signal",
            args[0]
        );
        return false;
    }
    super::out_flush();
    let _ = std::io::stderr().flush();
    if sig == 0 {
        return true;
    }
    // No unsafe code in this crate: kill(1) delivers the signal to us.
    let pid = std::process::id().to_string();
    let r = std::process::Command::new("kill")
        .arg(format!("-{sig}"))
        .arg(&pid)
        .status();
    if r.is_err() {
        report_err!("cannot raise signal {sig}");
        return false;
    }
    // A fatal signal is delivered before kill(1) has returned to us in
    // practice; give a slow machine a moment.
    std::thread::sleep(std::time::Duration::from_millis(100));
    true
}

pub(crate) fn close(ctx: &mut Ctx) {
    let debug = debug_node(ctx);
    ctx.aio.drain(debug.as_deref());
    if let Some(o) = ctx.cur.take() {
        let name = o.spec.name.clone();
        if let Err((e, tables_dirty)) = o.close() {
            super::report_close_error(name.as_deref().unwrap_or(""), &e, tables_dirty);
        }
    }
    ctx.set(None);
}

fn open_cmd(ctx: &mut Ctx, ci: &CmdInfo, args: &[String]) -> bool {
    let usage = usage_line(ci);
    let Some((opts, pos)) = getopt("open", args, "snCro:ki:t:d:U", &usage) else {
        return false;
    };
    let mut spec = OpenSpec::new(ctx.tuning.clone());
    for (c, v) in opts {
        let v = v.unwrap_or_default();
        match c {
            's' => spec.snapshot = true,
            'n' => spec.cache = CacheMode::None,
            'C' => spec.copy_on_read = true,
            'r' => spec.read_only = true,
            'U' => spec.force_share = true,
            'k' => spec.native_aio = true,
            't' => match CacheMode::parse(&v) {
                Some(m) => spec.cache = m,
                None => {
                    report_err!("Invalid cache option: {v}");
                    return false;
                }
            },
            'd' => match qcow2_ops::DiscardMode::parse(&v) {
                Some(d) => spec.discard = d,
                None => {
                    report_err!("Invalid discard option: {v}");
                    return false;
                }
            },
            'i' => {
                if !super::aio_mode_ok(&v) {
                    report_err!("Invalid aio option: {v}");
                    return false;
                }
                spec.native_aio = v == "native";
            }
            'o' => match open::parse_opt_string(&v, None) {
                Ok(o) => spec.opts.extend(o),
                Err(m) => {
                    report_err!("{m}");
                    return false;
                }
            },
            _ => {}
        }
    }
    if pos.len() > 1 {
        out!("{usage}");
        return false;
    }
    if ctx.cur.is_some() {
        report_err!("file open already, try 'help close'");
        return false;
    }
    spec.name = pos.first().cloned();
    match open::open(&spec) {
        Ok(o) => {
            ctx.set(Some(o));
            true
        }
        Err(m) => {
            match &spec.name {
                Some(n) => report_err!("can't open device {n}: {m}"),
                None => report_err!("can't open: {m}"),
            }
            false
        }
    }
}

/// Options `reopen -o` may change.
const REOPENABLE: &[&str] = &[
    "auto-read-only",
    "cache-size",
    "l2-cache-entry-size",
    "cache-clean-interval",
    "cache.direct",
    "cache.no-flush",
    "discard",
    "l2-cache-size",
    "refcount-cache-size",
    "read-only",
    "force-share",
    "locking",
    "lazy-refcounts",
    "pass-discard-request",
    "pass-discard-snapshot",
    "pass-discard-other",
    "overlap-check",
    "cache-clean-interval",
    "detect-zeroes",
];

/// Options whose values are on/off.
const BOOLEAN: &[&str] = &[
    "read-only",
    "auto-read-only",
    "cache.direct",
    "cache.no-flush",
    "force-share",
    "lazy-refcounts",
    "pass-discard-request",
    "pass-discard-snapshot",
    "pass-discard-other",
];

/// Whether `reopen -o KEY=VALUE` leaves an option as it is.
fn unchanged(cur: &open::Opened, k: &str, v: &str) -> bool {
    if let Some((_, old)) = cur.spec.opts.iter().rev().find(|(o, _)| o == k) {
        return old == v;
    }
    match k {
        "driver" => v == cur.dev.format_name(),
        "file.driver" => v == "file" && !matches!(*cur.dev, Dev::Null { .. }),
        "backing.driver" => match cur.dev.base() {
            Dev::Qcow2(img) => img.info().backing_format.as_deref() == Some(v),
            _ => false,
        },
        _ => false,
    }
}

fn reopen(ctx: &mut Ctx, ci: &CmdInfo, args: &[String]) -> bool {
    let usage = usage_line(ci);
    let Some((opts, pos)) = getopt("reopen", args, "c:o:rw", &usage) else {
        return false;
    };
    if !pos.is_empty() {
        out!("{usage}");
        return false;
    }
    let Some(cur) = &ctx.cur else { return false };
    let mut spec = cur.spec.clone();
    let mut rw: Option<bool> = None;
    let mut has_cache = false;
    let mut extra: Vec<(String, String)> = Vec::new();
    for (c, v) in opts {
        let v = v.unwrap_or_default();
        match c {
            'c' => match CacheMode::parse(&v) {
                Some(m) => {
                    spec.cache = m;
                    has_cache = true;
                }
                None => {
                    report_err!("Invalid cache option: {v}");
                    return false;
                }
            },
            'o' => match open::parse_opt_string(&v, None) {
                Ok(o) => extra.extend(o),
                Err(m) => {
                    report_err!("{m}");
                    return false;
                }
            },
            'r' | 'w' => {
                if rw.is_some() {
                    report_err!("Only one -r/-w option may be given");
                    return false;
                }
                rw = Some(c == 'w');
            }
            _ => {}
        }
    }
    for (k, _) in &extra {
        if k == "read-only" && rw.is_some() {
            report_err!("Cannot set both -r/-w and 'read-only'");
            return false;
        }
        if (k == "cache.direct" || k == "cache.no-flush") && has_cache {
            report_err!("Cannot set both -c and the cache options");
            return false;
        }
    }
    for (k, v) in &extra {
        if BOOLEAN.contains(&k.as_str()) {
            if let Err(m) = open::on_off(k, v) {
                report_err!("{m}");
                return false;
            }
        }
    }
    for (k, v) in &extra {
        if REOPENABLE.contains(&k.as_str())
            || k.starts_with("overlap-check")
            || unchanged(cur, k, v)
        {
            continue;
        }
        // QEMU names the option of the node it belongs to.
        let has_backing =
            matches!(cur.dev.base(), Dev::Qcow2(img) if img.info().backing_file.is_some());
        let short = k
            .strip_prefix("file.")
            .or_else(|| k.strip_prefix("backing.").filter(|_| has_backing))
            .unwrap_or(k);
        report_err!("Cannot change the option '{short}'");
        return false;
    }
    if spec.snapshot {
        // The temporary overlay lives as long as the device: keep it.
        report_err!("Cannot reopen a device opened with -s (snapshot mode)");
        return false;
    }
    if let Some(w) = rw {
        spec.read_only = !w;
    }
    // Later options win over earlier ones of the same name.
    // A new value replaces the old one; options that QEMU checks together
    // (the overlap-check template and its flags, the cache sizes) are
    // replaced as a group, so an earlier reopen's value cannot conflict.
    let group = |k: &str| -> Option<&'static str> {
        if k.starts_with("overlap-check") {
            Some("overlap")
        } else if matches!(k, "cache-size" | "l2-cache-size" | "refcount-cache-size") {
            Some("cache")
        } else {
            None
        }
    };
    spec.opts.retain(|(k, _)| {
        !extra
            .iter()
            .any(|(e, _)| e == k || (group(e).is_some() && group(e) == group(k)))
    });
    spec.opts.extend(extra);
    let old = cur.spec.clone();
    close(ctx);
    match open::open(&spec) {
        Ok(o) => {
            ctx.set(Some(o));
            true
        }
        Err(m) => {
            report_err!("{m}");
            if let Ok(o) = open::open(&old) {
                ctx.set(Some(o));
            }
            false
        }
    }
}

fn truncate(ctx: &Ctx, ci: &CmdInfo, args: &[String]) -> bool {
    let usage = usage_line(ci);
    let Some((opts, pos)) = getopt("truncate", args, "m:", &usage) else {
        return false;
    };
    let mut prealloc = qcow2_ops::Prealloc::Off;
    for (_, v) in &opts {
        let v = v.as_deref().unwrap_or("");
        prealloc = match v {
            "off" => qcow2_ops::Prealloc::Off,
            "metadata" => qcow2_ops::Prealloc::Metadata,
            "falloc" => qcow2_ops::Prealloc::Falloc,
            "full" => qcow2_ops::Prealloc::Full,
            _ => {
                report_err!("Invalid preallocation mode '{v}'");
                return false;
            }
        };
    }
    if pos.len() != 1 {
        out!("{usage}");
        return false;
    }
    let Some(size) = cvtnum(&pos[0]) else {
        return false;
    };
    if let Err(e) = ctx.dev().size() {
        // QEMU's words for a device made unusable (ENOMEDIUM).
        match e.errno() {
            -123 => report_err!("No medium inserted"),
            n => report_err!("{}", strerror(n)),
        }
        return false;
    }
    match ctx.dev().base() {
        Dev::Raw { file, .. } => {
            use qcow2_ops::io::Storage;
            if let Err(e) = file.set_len(size) {
                report_err!(
                    "Failed to resize underlying file: {}",
                    strerror(e.raw_os_error().unwrap_or(5))
                );
                return false;
            }
            true
        }
        // qemu-io's truncate is the block layer's: shrinking is allowed.
        Dev::Qcow2(img) => match img.resize(size, prealloc, true) {
            Ok(()) => true,
            Err(e) => {
                report_err!("{}", crate::error_text(&e));
                false
            }
        },
        Dev::Null { .. } => {
            report_err!("Image format driver does not support resize");
            false
        }
        Dev::Debug { .. } | Dev::Compress { .. } => {
            unreachable!("base() is below every filter")
        }
    }
}

/// The rules of the device's first blkdebug node.
fn debug_node(ctx: &Ctx) -> Option<std::sync::Arc<qcow2_ops::io::Rules>> {
    ctx.cur.as_ref().and_then(|o| o.debug.clone())
}

/// `aio_read` / `aio_write` on a thread of their own (once breakpoints are
/// in use): the output is kept until `aio_flush` or close.
fn spawn_aio(ctx: &mut Ctx, ci: &'static CmdInfo, name: &str, args: &[String]) -> bool {
    let Some(cur) = ctx.cur.clone() else {
        return false;
    };
    let view = Ctx {
        cur: Some(cur),
        size: ctx.size,
        tuning: ctx.tuning.clone(),
        aio: Aio::default(),
    };
    let (name, args) = (name.to_string(), args.to_vec());
    let t = std::thread::spawn(move || {
        super::captured(|| {
            if ci.name == "aio_read" {
                vread(&view, &name, &args, ci, true);
            } else {
                vwrite(&view, &name, &args, ci, true);
            }
        })
    });
    ctx.aio.running.push(t);
    true
}
