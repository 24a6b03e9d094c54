//! Process death: `qcow2 io` is killed with SIGKILL at its Nth pwrite64
//! (and, separately, its Nth fdatasync) by `strace -e inject=...`, for every
//! N up to the number of such calls of the undisturbed run, in writeback and
//! writethrough modes. After each kill `qemu-img check` must find no
//! corruption (leaks are fine), `qcow2 check -r leaks` must leave the image
//! clean, and in writethrough mode every command that completed before the
//! kill must read back (qemu-io `read -P`).
//!
//! Skipped with a note when strace is not installed (or cannot trace here).
//! `QCOW2_CRASH_FULL=1` lifts the sampling of kill points.

use std::path::{Path, PathBuf};
use std::process::Command;

fn run(prog: &str, args: &[&str]) -> (i32, String, String) {
    let o = Command::new(prog)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {prog}: {e}"));
    (
        o.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&o.stdout).into_owned(),
        String::from_utf8_lossy(&o.stderr).into_owned(),
    )
}

fn strace_usable() -> bool {
    let ok = Command::new("strace")
        .args(["-f", "-qq", "-o", "/dev/null", "true"])
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false);
    if !ok {
        qcow2_testutil::skip("kill tests", "strace not installed or unable to trace here");
    }
    ok
}

struct Workload {
    name: &'static str,
    create: &'static str,
    size: &'static str,
    fill: &'static [&'static str],
    cmds: &'static [&'static str],
}

const WORKLOADS: &[Workload] = &[
    Workload {
        name: "writes",
        create: "cluster_size=4096",
        size: "16M",
        fill: &["write -P 0x01 0 64k"],
        cmds: &[
            "write -P 0x11 128k 64k",
            "write -P 0x12 2M 8k",
            "flush",
            "write -P 0x13 100k 20k",
            "write -P 0x14 6M 12k",
            "write -P 0x15 10M 4k",
        ],
    },
    Workload {
        name: "zero",
        create: "cluster_size=65536",
        size: "8M",
        fill: &["write -P 0x02 0 1M", "write -c -P 0x03 2M 128k"],
        cmds: &[
            "write -z 0 128k",
            "write -z -u 256k 128k",
            "write -z 2M 64k",
            "write -P 0x21 4M 64k",
            "write -z -u 2M 128k",
            "write -P 0x22 256k 64k",
            "write -z 600k 1000",
        ],
    },
    Workload {
        name: "discard",
        create: "cluster_size=65536",
        size: "8M",
        fill: &["write -P 0x04 0 1M", "write -c -P 0x05 2M 128k"],
        cmds: &[
            "discard 0 256k",
            "write -P 0x31 0 64k",
            "discard 2M 128k",
            "flush",
            "write -P 0x32 3M 128k",
            "discard 512k 128k",
            "write -P 0x33 512k 64k",
        ],
    },
    Workload {
        name: "refgrow",
        create: "cluster_size=512,refcount_bits=64",
        size: "8M",
        // The one-cluster refcount table covers 2 MiB of file: the fill
        // ends just below, the workload grows the table and adds blocks.
        fill: &["write -P 0x06 0 1900k"],
        cmds: &[
            "write -P 0x41 2M 64k",
            "write -z -u 0 8k",
            "discard 16k 8k",
            "write -P 0x42 3M 64k",
        ],
    },
];

fn full_run() -> bool {
    std::env::var("QCOW2_CRASH_FULL").is_ok_and(|v| v != "0" && !v.is_empty())
}

/// `qcow2 io -t MODE -c ... FILE` arguments.
fn io_args(mode: &str, cmds: &[&str], file: &Path) -> Vec<String> {
    let mut a = vec![
        env!("CARGO_BIN_EXE_qcow2").to_string(),
        "io".into(),
        "-t".into(),
        mode.into(),
    ];
    for c in cmds {
        a.push("-c".into());
        a.push((*c).into());
    }
    a.push(file.to_str().unwrap().into());
    a
}

/// Calls of `syscall` made by an undisturbed run.
fn count_calls(dir: &Path, start: &Path, mode: &str, w: &Workload, syscall: &str) -> usize {
    let f = dir.join("count.qcow2");
    std::fs::copy(start, &f).unwrap();
    let log = dir.join("count.log");
    let mut args: Vec<String> = vec![
        "-f".into(),
        "-qq".into(),
        "-o".into(),
        log.to_str().unwrap().into(),
        "-e".into(),
        format!("trace={syscall}"),
    ];
    args.extend(io_args(mode, w.cmds, &f));
    let a: Vec<&str> = args.iter().map(|s| s.as_str()).collect();
    let (code, out, err) = run("strace", &a);
    assert_eq!(code, 0, "undisturbed run failed:\n{out}\n{err}");
    let text = std::fs::read_to_string(&log).unwrap();
    text.lines()
        .filter(|l| l.contains(&format!("{syscall}(")))
        .count()
}

/// Commands whose completion line was printed before the kill.
fn completed(stdout: &str) -> usize {
    stdout
        .lines()
        .filter(|l| l.starts_with("wrote ") || l.starts_with("discard ") || l.starts_with("flush"))
        .count()
}

/// `read -P` commands for the writes among the first `done` commands that
/// no later command (done or in flight) touches.
fn durable_reads(cmds: &[&str], done: usize) -> Vec<String> {
    fn range(c: &str) -> Option<(u64, u64)> {
        let t: Vec<&str> = c.split_whitespace().collect();
        if t.len() < 3 || t[0] == "flush" {
            return None;
        }
        let n = |s: &str| -> u64 {
            let (v, m) = match s.chars().last().unwrap() {
                'k' => (&s[..s.len() - 1], 1024),
                'M' => (&s[..s.len() - 1], 1 << 20),
                _ => (s, 1),
            };
            v.parse::<u64>().unwrap() * m
        };
        Some((n(t[t.len() - 2]), n(t[t.len() - 1])))
    }
    let mut out = Vec::new();
    for (i, c) in cmds.iter().enumerate().take(done) {
        let t: Vec<&str> = c.split_whitespace().collect();
        if t.len() != 5 || t[0] != "write" || t[1] != "-P" {
            continue;
        }
        let (o, l) = range(c).unwrap();
        let later = cmds[i + 1..].iter().filter_map(|c| range(c));
        if later.clone().any(|(o2, l2)| o < o2 + l2 && o2 < o + l) {
            continue;
        }
        out.push(format!("read -q -P {} {o} {l}", t[2]));
    }
    out
}

fn keep(tag: &str, f: &Path) -> PathBuf {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("kill-failures");
    std::fs::create_dir_all(&dir).unwrap();
    let p = dir.join(format!("{tag}.qcow2"));
    std::fs::copy(f, &p).unwrap();
    p
}

/// Kills at the Nth call of `syscall`; returns a failure description.
fn kill_at(
    dir: &Path,
    start: &Path,
    mode: &str,
    w: &Workload,
    syscall: &str,
    n: usize,
) -> Option<String> {
    let tag = format!("{}-{mode}-{syscall}-{n}", w.name);
    let f = dir.join("kill.qcow2");
    std::fs::copy(start, &f).unwrap();
    let mut args: Vec<String> = vec![
        "-f".into(),
        "-qq".into(),
        "-o".into(),
        "/dev/null".into(),
        "-e".into(),
        format!("trace={syscall}"),
        "-e".into(),
        format!("inject={syscall}:signal=SIGKILL:when={n}"),
    ];
    args.extend(io_args(mode, w.cmds, &f));
    let a: Vec<&str> = args.iter().map(|s| s.as_str()).collect();
    let (_code, out, _err) = run("strace", &a);
    let fs = f.to_str().unwrap();
    let (code, cout, cerr) = run("qemu-img", &["check", fs]);
    if code != 0 && code != 3 {
        let k = keep(&tag, &f);
        return Some(format!(
            "{tag}: qemu-img check exit {code} after the kill (kept at {}):\n{cout}{cerr}",
            k.display()
        ));
    }
    if mode == "writethrough" {
        let reads = durable_reads(w.cmds, completed(&out));
        if !reads.is_empty() {
            let mut a: Vec<&str> = vec!["-r"];
            for r in &reads {
                a.push("-c");
                a.push(r);
            }
            a.push(fs);
            let (c, o, e) = run("qemu-io", &a);
            if c != 0 || o.contains("failed") || e.contains("failed") {
                let k = keep(&tag, &f);
                return Some(format!(
                    "{tag}: completed writes lost (kept at {}): {reads:?}\n{o}{e}",
                    k.display()
                ));
            }
        }
    }
    let k = keep(&tag, &f);
    let (rc, ro, re) = run(env!("CARGO_BIN_EXE_qcow2"), &["check", "-r", "leaks", fs]);
    let (code2, cout2, cerr2) = run("qemu-img", &["check", fs]);
    if code2 != 0 {
        return Some(format!(
            "{tag}: after qcow2 check -r leaks (exit {rc}: {ro}{re}) qemu-img check exit {code2} (before repair: {}):\n{cout2}{cerr2}",
            k.display()
        ));
    }
    let _ = std::fs::remove_file(k);
    None
}

fn kill_workload(w: &Workload) -> (usize, Vec<String>) {
    let dir = tempfile::tempdir().unwrap();
    let start = dir.path().join("start.qcow2");
    let s = start.to_str().unwrap();
    let (c, o, e) = run(
        "qemu-img",
        &["create", "-f", "qcow2", "-o", w.create, s, w.size],
    );
    assert_eq!(c, 0, "{o}{e}");
    let mut a: Vec<&str> = Vec::new();
    for f in w.fill {
        a.push("-c");
        a.push(f);
    }
    a.push(s);
    let (c, o, e) = run("qemu-io", &a);
    assert_eq!(c, 0, "{o}{e}");
    let budget = if full_run() { usize::MAX } else { 40 };
    let (mut points, mut failures) = (0, Vec::new());
    for mode in ["writeback", "writethrough"] {
        for syscall in ["pwrite64", "fdatasync"] {
            let total = count_calls(dir.path(), &start, mode, w, syscall);
            if syscall == "pwrite64" {
                assert!(total > 0, "{}: no pwrite64 calls traced", w.name);
            }
            let ns: Vec<usize> = if total <= budget {
                (1..=total).collect()
            } else {
                let mut v: Vec<usize> = (0..budget).map(|i| 1 + i * total / budget).collect();
                v.push(total);
                v.dedup();
                v
            };
            for n in ns {
                points += 1;
                if let Some(f) = kill_at(dir.path(), &start, mode, w, syscall, n) {
                    eprintln!("FAIL {f}");
                    failures.push(f);
                }
            }
            println!("kill {} -t {mode}: {total} {syscall} calls", w.name);
        }
    }
    (points, failures)
}

fn kill_test(name: &str) {
    if !strace_usable() {
        return;
    }
    let w = WORKLOADS.iter().find(|w| w.name == name).unwrap();
    let (points, failures) = kill_workload(w);
    println!("kill {name}: {points} kill points checked");
    assert!(
        failures.is_empty(),
        "{} of {points} kill points failed; first: {}",
        failures.len(),
        failures[0]
    );
}

#[test]
fn kill_writes() {
    kill_test("writes");
}

#[test]
fn kill_zero() {
    kill_test("zero");
}

#[test]
fn kill_discard() {
    kill_test("discard");
}

#[test]
fn kill_refcount_growth() {
    kill_test("refgrow");
}
