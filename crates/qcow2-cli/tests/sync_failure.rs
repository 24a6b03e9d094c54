//! A failed sync stays failed, through the real file backend: strace makes
//! the first fdatasync fail (`-e inject=fdatasync:error=E:when=1`); every
//! later one would succeed. Like qemu-io, `qcow2 io` must then fail every
//! writethrough write and every flush with that errno, instead of a retried
//! sync that returns 0 over pages the kernel may have dropped. The result
//! lines of the writethrough run are compared with qemu-io's.
//! Needs strace, qemu-img, qemu-io (missing: fails under CI, else "skipped").

mod common;
use common::*;
use std::path::Path;

/// Runs `prog ... cmds image` under strace with the first fdatasync failing
/// (strace counts per thread: only reliable for a program whose syncs run on
/// one thread, or that issues no second one); returns the run and the
/// number of fdatasync calls.
fn injected(dir: &Path, prog: &[&str], errno: &str, image: &str, cmds: &[&str]) -> (Run, usize) {
    let inject = format!("inject=fdatasync:error={errno}:when=1");
    let trace = format!("{image}.strace");
    let mut args = vec!["-f", "-qq", "-o", &trace, "-e", "trace=fdatasync", "-e"];
    args.push(&inject);
    args.extend_from_slice(prog);
    for c in cmds {
        args.push("-c");
        args.push(c);
    }
    args.push(image);
    let r = run_in(dir, "strace", &args);
    let syncs = std::fs::read_to_string(dir.join(&trace))
        .unwrap_or_default()
        .lines()
        .filter(|l| l.contains("fdatasync("))
        .count();
    (r, syncs)
}

fn prepared(dir: &Path, name: &str) {
    qemu_img(dir, &["create", "-f", "qcow2", name, "64M"]).ok("create");
    // Allocated up front: the writes below need no allocation (no ordering
    // sync), so the first fdatasync is the one a writethrough write or a
    // flush issues.
    qemu_io(dir, &["-c", "write -P 9 0 1M", name]).ok("fill");
}

#[test]
fn writethrough_writes_fail_after_a_failed_sync() {
    if !tool_or_skip(
        "strace",
        &["-f", "-qq", "-o", "/dev/null", "true"],
        "sync failure",
    ) || !tool_or_skip("qemu-io", &["--version"], "sync failure")
        || !tool_or_skip("qemu-img", &["--version"], "sync failure")
    {
        return;
    }
    let d = tmpdir();
    let dir = d.path();
    prepared(dir, "q.qcow2");
    copy(dir, "q.qcow2", "o.qcow2");
    let cmds = [
        "write -P 1 0 4k",
        "write -P 2 4k 4k",
        "write -P 3 64k 4k",
        "read -P 2 4k 4k",
    ];
    let (q, q_syncs) = injected(
        dir,
        &["qemu-io", "-t", "writethrough"],
        "EIO",
        "q.qcow2",
        &cmds,
    );
    let (o, o_syncs) = injected(
        dir,
        &[qcow2_bin(), "io", "-t", "writethrough"],
        "EIO",
        "o.qcow2",
        &cmds,
    );
    let ql = result_lines(&q.stdout);
    assert_eq!(
        ql.iter()
            .filter(|l| l.as_str() == "write failed: Input/output error")
            .count(),
        3,
        "qemu-io as expected:\n{}{}",
        q.stdout,
        q.stderr
    );
    assert_eq!(
        result_lines(&o.stdout),
        ql,
        "qcow2 io vs qemu-io:\n{}{}",
        o.stdout,
        o.stderr
    );
    // Neither retries the sync: the failed one is the only fdatasync.
    assert_eq!(
        (q_syncs, o_syncs),
        (1, 1),
        "fdatasync calls (qemu-io, qcow2)"
    );
}

#[test]
fn flushes_fail_after_a_failed_sync() {
    if !tool_or_skip(
        "strace",
        &["-f", "-qq", "-o", "/dev/null", "true"],
        "sync failure",
    ) || !tool_or_skip("qemu-io", &["--version"], "sync failure")
        || !tool_or_skip("qemu-img", &["--version"], "sync failure")
    {
        return;
    }
    let d = tmpdir();
    let dir = d.path();
    prepared(dir, "o.qcow2");
    let cmds = [
        "write -P 1 0 4k",
        "flush",
        "flush",
        "write -P 2 4k 4k",
        "flush",
        "write -P 3 2M 4k",
        "flush",
        "read -P 2 4k 4k",
    ];
    // The errno of the failed sync is kept (as QEMU keeps it), not turned into EIO.
    let (o, syncs) = injected(
        dir,
        &[qcow2_bin(), "io", "-t", "writeback"],
        "ENOSPC",
        "o.qcow2",
        &cmds,
    );
    let lines = result_lines(&o.stdout);
    let failed: Vec<&String> = lines.iter().filter(|l| l.contains("failed")).collect();
    assert_eq!(
        failed,
        vec!["flush failed: No space left on device"; 4],
        "every flush after the failed sync fails:\n{}{}",
        o.stdout,
        o.stderr
    );
    assert!(
        lines.contains(&"read 4096/4096 bytes at offset 4096".to_string()),
        "{}",
        o.stdout
    );
    assert_eq!(o.code, 1, "close fails too:\n{}", o.stderr);
    assert_eq!(syncs, 1, "no sync is retried after the failed one");
    // Nothing half-done: no corruption for QEMU (the allocation whose
    // ordering sync failed may leak its cluster).
    let c = qemu_img(dir, &["check", "-f", "qcow2", "o.qcow2"]);
    assert!(
        c.code == 0 || c.code == 3,
        "qemu-img check after sync failures:\n{}{}",
        c.stdout,
        c.stderr
    );
}
