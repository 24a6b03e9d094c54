//! Persistent dirty bitmaps, judged by QEMU: images get bitmaps from
//! `qemu-img bitmap --add` (enabled, disabled, several granularities, with
//! and without stored bits, one left in use by a crash), the same script
//! runs through `qemu-io` and `qcow2 io` on copies, and then
//! `qemu-nbd -B NAME` + `nbdinfo --map=qemu:dirty-bitmap:NAME` must export
//! the same dirty map, `qemu-img info` must list the same bitmaps and flags,
//! and `qemu-img check` must find both images clean. Also: a `qcow2 io`
//! killed with SIGKILL leaves its enabled bitmaps marked in use, and
//! autoclear bits the engine does not maintain are cleared on read-write
//! open (as qemu-io clears them), never on read-only open.

mod common;

use common::*;
use std::io::{BufRead, BufReader, Write};
use std::path::Path;
use std::process::{Command, Stdio};

/// Whether the NBD tools are there; under CI their absence fails the test
/// (`qcow2_testutil::require`), elsewhere a visible "skipped" line says so.
fn nbd_tools() -> bool {
    qcow2_testutil::require("dirty bitmap NBD comparison", &["qemu-nbd", "nbdinfo"]).is_some()
}

/// The dirty map of bitmap `bm` as qemu-nbd exports it.
fn nbd_map(dir: &Path, img: &str, bm: &str) -> String {
    let ctx = format!("--map=qemu:dirty-bitmap:{bm}");
    let r = run_in(
        dir,
        "nbdinfo",
        &[
            &ctx, "--", "[", "qemu-nbd", "-r", "-B", bm, "-f", "qcow2", img, "]",
        ],
    )
    .ok(&format!("nbdinfo map of {bm} in {img}"));
    r.stdout
}

/// The `bitmaps` list of `qemu-img info --output=json` (null when none).
fn info_bitmaps(dir: &Path, img: &str) -> serde_json::Value {
    let r = qemu_img(dir, &["info", "--output=json", "-f", "qcow2", img]).ok("qemu-img info");
    let v: serde_json::Value = serde_json::from_str(&r.stdout).expect("info json");
    v["format-specific"]["data"]["bitmaps"].clone()
}

fn cmds(v: &[&str]) -> Vec<String> {
    v.iter().map(|s| s.to_string()).collect()
}

fn be32(b: &[u8], o: usize) -> u32 {
    u32::from_be_bytes(b[o..o + 4].try_into().unwrap())
}

fn be64(b: &[u8], o: usize) -> u64 {
    u64::from_be_bytes(b[o..o + 8].try_into().unwrap())
}

/// Position of the bitmaps header extension's data in a v3 image, if any.
fn bitmaps_ext(f: &[u8]) -> Option<usize> {
    let mut p = be32(f, 100) as usize;
    loop {
        let kind = be32(f, p);
        let len = be32(f, p + 4) as usize;
        match kind {
            0 => return None,
            0x2385_2875 => return Some(p + 8),
            _ => p += 8 + len.div_ceil(8) * 8,
        }
    }
}

/// Sets the in-use flag of bitmap `name` directly in the file (what a crash
/// of a program maintaining it leaves).
fn set_in_use(path: &Path, name: &str) {
    let mut f = std::fs::read(path).expect("read image");
    let x = bitmaps_ext(&f).expect("no bitmaps extension");
    let (dir, size) = (be64(&f, x + 16) as usize, be64(&f, x + 8) as usize);
    let mut e = dir;
    while e < dir + size {
        let name_len = u16::from_be_bytes([f[e + 18], f[e + 19]]) as usize;
        let extra = be32(&f, e + 20) as usize;
        let n = &f[e + 24 + extra..e + 24 + extra + name_len];
        if n == name.as_bytes() {
            let flags = be32(&f, e + 12) | 1;
            f[e + 12..e + 16].copy_from_slice(&flags.to_be_bytes());
            std::fs::write(path, f).expect("write image");
            return;
        }
        e += (24 + extra + name_len).div_ceil(8) * 8;
    }
    panic!("no bitmap {name}");
}

/// One start image: cluster size, size, bitmaps (name, granularity,
/// enabled, qemu-io commands run while it is enabled before the script).
#[derive(Debug)]
struct Case {
    name: &'static str,
    cluster: u64,
    size: &'static str,
    /// (name, granularity or 0 for the default, left enabled)
    bitmaps: &'static [(&'static str, u64, bool)],
    /// qemu-io commands run on the start image after the bitmaps exist.
    fill: &'static [&'static str],
    /// Bitmaps then marked in use (inconsistent).
    in_use: &'static [&'static str],
    script: &'static [&'static str],
}

const SCRIPT: &[&str] = &[
    "write -P 0x11 0 1000",
    "write -P 0x12 70000 5000",
    "write -z 200k 64k",
    "write -z -u 512k 128k",
    "write -z 900k 700",
    "discard 1M 100k",
    "discard 1536k 64k",
    "write -P 0x13 2040k 16k",
    "write -P 0x14 3M 512",
    "flush",
    "write -z -u 5M 1M",
    "write -P 0x15 8384512 4k",
];

const CASES: &[Case] = &[
    Case {
        name: "c64k",
        cluster: 65536,
        size: "8M",
        bitmaps: &[
            ("def", 0, true),
            ("g512", 512, true),
            ("g4k", 4096, true),
            ("g1m", 1 << 20, true),
            ("off", 0, false),
        ],
        fill: &[],
        in_use: &[],
        script: SCRIPT,
    },
    Case {
        name: "c512",
        cluster: 512,
        size: "8M",
        bitmaps: &[
            ("g512", 512, true),
            ("g64k", 65536, true),
            ("off", 4096, false),
        ],
        fill: &["write -P 0x21 1M 8k", "write -P 0x22 4100k 512"],
        in_use: &[],
        script: SCRIPT,
    },
    Case {
        name: "c2m",
        cluster: 2 << 20,
        size: "8M",
        bitmaps: &[("def", 0, true), ("g512", 512, true), ("off", 65536, false)],
        fill: &["write -P 0x31 6M 64k"],
        in_use: &[],
        script: SCRIPT,
    },
    Case {
        name: "stored-bits",
        cluster: 4096,
        size: "8M",
        bitmaps: &[("a", 4096, true), ("b", 512, true), ("frozen", 512, false)],
        fill: &[
            "write -P 0x41 100k 300k",
            "write -z 7M 64k",
            "discard 2M 1M",
        ],
        in_use: &[],
        script: SCRIPT,
    },
    Case {
        name: "in-use",
        cluster: 65536,
        size: "8M",
        bitmaps: &[
            ("ok", 4096, true),
            ("crashed", 4096, true),
            ("off", 0, false),
        ],
        fill: &["write -P 0x51 0 64k"],
        in_use: &["crashed"],
        script: SCRIPT,
    },
];

/// Creates the start image of a case.
fn start_image(dir: &Path, c: &Case, img: &str) {
    let o = format!("cluster_size={}", c.cluster);
    qemu_img(dir, &["create", "-q", "-f", "qcow2", "-o", &o, img, c.size]).ok("qemu-img create");
    for (bm, g, _) in c.bitmaps {
        let mut args = vec!["bitmap", "--add"];
        let gs = g.to_string();
        if *g != 0 {
            args.extend(["-g", gs.as_str()]);
        }
        args.extend([img, bm]);
        qemu_img(dir, &args).ok("qemu-img bitmap --add");
    }
    if !c.fill.is_empty() {
        qemu_io_script(dir, img, "qcow2", &cmds(c.fill)).ok("qemu-io fill");
    }
    for (bm, _, enabled) in c.bitmaps {
        if !enabled {
            qemu_img(dir, &["bitmap", "--disable", img, bm]).ok("qemu-img bitmap --disable");
        }
    }
    for bm in c.in_use {
        set_in_use(&p(dir, img), bm);
    }
}

/// Runs the script on copies through qemu-io and `qcow2 io` (`sessions`
/// times, reopening in between) and compares what QEMU sees.
fn compare_case(c: &Case, sessions: usize) {
    let d = tmpdir();
    let dir = d.path();
    start_image(dir, c, "start.qcow2");
    copy(dir, "start.qcow2", "q.qcow2");
    copy(dir, "start.qcow2", "o.qcow2");
    for s in 0..sessions {
        // Later sessions shift the script so they touch new bits too.
        let script: Vec<String> = c
            .script
            .iter()
            .map(|l| {
                if s == 0 {
                    l.to_string()
                } else {
                    l.replace(" 0 1000", " 6000 1000")
                        .replace("3M 512", "3147776 512")
                }
            })
            .collect();
        let q = qemu_io_script(dir, "q.qcow2", "qcow2", &script).ok("qemu-io script");
        let o = ours_io_script(dir, "o.qcow2", &[], &script).ok("qcow2 io script");
        assert_eq!(
            result_lines(&q.stdout),
            result_lines(&o.stdout),
            "{}: script output differs",
            c.name
        );
    }
    assert_eq!(
        info_bitmaps(dir, "q.qcow2"),
        info_bitmaps(dir, "o.qcow2"),
        "{}: qemu-img info bitmaps differ (left qemu-io, right qcow2 io)",
        c.name
    );
    assert_qemu_check_clean(dir, "q.qcow2", c.name);
    assert_qemu_check_clean(dir, "o.qcow2", c.name);
    qemu_img(
        dir,
        &[
            "compare", "-f", "qcow2", "-F", "qcow2", "q.qcow2", "o.qcow2",
        ],
    )
    .ok("qemu-img compare");
    for (bm, _, _) in c.bitmaps {
        if c.in_use.contains(bm) {
            continue; // qemu-nbd refuses inconsistent bitmaps
        }
        let want = nbd_map(dir, "q.qcow2", bm);
        let got = nbd_map(dir, "o.qcow2", bm);
        assert_eq!(
            want, got,
            "{}: dirty map of bitmap {bm} differs\nqemu-io:\n{want}\nqcow2 io:\n{got}",
            c.name
        );
    }
}

#[test]
fn dirty_bitmaps_match_qemu() {
    if !nbd_tools() {
        return;
    }
    let failures = run_cases(CASES, workers(), |c| compare_case(c, 1));
    assert_no_failures("dirty bitmaps", CASES.len(), &failures);
}

#[test]
fn dirty_bitmaps_match_qemu_over_two_sessions() {
    if !nbd_tools() {
        return;
    }
    let cases = &CASES[..4];
    let failures = run_cases(cases, workers(), |c| compare_case(c, 2));
    assert_no_failures("dirty bitmaps, two sessions", cases.len(), &failures);
}

/// Runs `prog args` interactively, sends one write and kills the process
/// with SIGKILL once the write was reported done.
fn write_then_sigkill(dir: &Path, prog: &str, args: &[&str]) {
    let mut child = Command::new(prog)
        .args(args)
        .current_dir(dir)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap_or_else(|e| panic!("spawn {prog}: {e}"));
    let mut stdin = child.stdin.take().expect("stdin");
    writeln!(stdin, "write -P 0x61 64k 4k").expect("send command");
    stdin.flush().expect("flush stdin");
    let mut out = BufReader::new(child.stdout.take().expect("stdout"));
    let mut line = String::new();
    loop {
        line.clear();
        let n = out.read_line(&mut line).expect("read output");
        assert!(n > 0, "{prog} ended before the write completed");
        if line.contains("wrote ") {
            break;
        }
    }
    child.kill().expect("SIGKILL");
    let _ = child.wait();
    drop(stdin);
}

/// `qcow2 io` and `qemu-io` killed with SIGKILL after a write, on copies of
/// one image: every bitmap (enabled or disabled) is left flagged in use
/// (inconsistent) exactly as qemu-io leaves them, never clean-but-wrong;
/// the image is clean for qemu-img check. A later session keeps the
/// inconsistent bitmaps flagged, as qemu-io does.
#[test]
fn sigkill_leaves_bitmaps_in_use_as_qemu() {
    let d = tmpdir();
    let dir = d.path();
    let c = &CASES[0];
    start_image(dir, c, "k.qcow2");
    copy(dir, "k.qcow2", "kq.qcow2");
    write_then_sigkill(dir, qcow2_bin(), &["io", "k.qcow2"]);
    write_then_sigkill(dir, "qemu-io", &["-f", "qcow2", "kq.qcow2"]);
    let bms = info_bitmaps(dir, "k.qcow2");
    assert_eq!(bms, info_bitmaps(dir, "kq.qcow2"), "bitmaps after SIGKILL");
    // Not vacuous: the case has a disabled bitmap, now in use too.
    assert!(
        bms.as_array().expect("bitmaps").iter().any(|b| {
            let f = b["flags"].to_string();
            f.contains("in-use") && !f.contains("auto")
        }),
        "a disabled bitmap in use after SIGKILL: {bms}"
    );
    assert_qemu_check_clean(dir, "k.qcow2", "after SIGKILL");
    // A later session through each tool: the inconsistent ones stay flagged.
    let script = cmds(&["write -P 0x62 1M 4k", "discard 2M 64k"]);
    qemu_io_script(dir, "kq.qcow2", "qcow2", &script).ok("qemu-io");
    ours_io_script(dir, "k.qcow2", &[], &script).ok("qcow2 io");
    assert_eq!(
        info_bitmaps(dir, "kq.qcow2"),
        info_bitmaps(dir, "k.qcow2"),
        "after a session on the crashed image"
    );
    assert_qemu_check_clean(dir, "k.qcow2", "session after SIGKILL");
}

fn autoclear(path: &Path) -> u64 {
    let f = std::fs::read(path).expect("read image");
    u64::from_be_bytes(f[88..96].try_into().unwrap())
}

fn set_autoclear(path: &Path, v: u64) {
    let mut f = std::fs::read(path).expect("read image");
    f[88..96].copy_from_slice(&v.to_be_bytes());
    std::fs::write(path, f).expect("write image");
}

/// Unknown autoclear bits are cleared on read-write open (as qemu-io
/// does), kept on read-only opens, and the bitmaps bit survives.
#[test]
fn unknown_autoclear_bits_cleared_on_read_write_open() {
    let d = tmpdir();
    let dir = d.path();
    for (with_bitmap, bits) in [(false, 1u64 << 5), (true, 1 | 1 << 9 | 1 << 63)] {
        qemu_img(dir, &["create", "-q", "-f", "qcow2", "a.qcow2", "4M"]).ok("create");
        if with_bitmap {
            qemu_img(dir, &["bitmap", "--add", "a.qcow2", "b"]).ok("bitmap --add");
        }
        set_autoclear(&p(dir, "a.qcow2"), bits);
        // Read-only opens write nothing.
        let before = std::fs::read(p(dir, "a.qcow2")).unwrap();
        ours(dir, &["info", "a.qcow2"]).ok("qcow2 info");
        ours(dir, &["io", "-r", "-c", "read 0 4k", "a.qcow2"]).ok("qcow2 io -r");
        ours(dir, &["map", "--output=json", "a.qcow2"]).ok("qcow2 map");
        assert!(
            before == std::fs::read(p(dir, "a.qcow2")).unwrap(),
            "a read-only open changed the file"
        );
        copy(dir, "a.qcow2", "q.qcow2");
        let script = cmds(&["write 0 4k"]);
        qemu_io_script(dir, "q.qcow2", "qcow2", &script).ok("qemu-io");
        ours_io_script(dir, "a.qcow2", &[], &script).ok("qcow2 io");
        let (want, got) = (autoclear(&p(dir, "q.qcow2")), autoclear(&p(dir, "a.qcow2")));
        assert_eq!(want, bits & 1, "qemu-io's autoclear bits");
        assert_eq!(
            got, want,
            "autoclear bits after a read-write open: {got:#x}, qemu-io {want:#x}"
        );
        assert_eq!(info_bitmaps(dir, "q.qcow2"), info_bitmaps(dir, "a.qcow2"));
        assert_qemu_check_clean(dir, "a.qcow2", "after clearing autoclear bits");
    }
}

/// A bitmaps extension whose autoclear bit is clear (a program without
/// bitmap support wrote the image) is dropped on read-write open, as
/// qemu-io drops it; its clusters are left as leaks for check -r.
#[test]
fn unvouched_bitmaps_extension_dropped() {
    let d = tmpdir();
    let dir = d.path();
    qemu_img(dir, &["create", "-q", "-f", "qcow2", "a.qcow2", "4M"]).ok("create");
    qemu_img(dir, &["bitmap", "--add", "a.qcow2", "b"]).ok("bitmap --add");
    qemu_io_script(dir, "a.qcow2", "qcow2", &cmds(&["write 0 64k"])).ok("fill");
    set_autoclear(&p(dir, "a.qcow2"), 0);
    copy(dir, "a.qcow2", "q.qcow2");
    let script = cmds(&["write 1M 4k"]);
    qemu_io_script(dir, "q.qcow2", "qcow2", &script).ok("qemu-io");
    ours_io_script(dir, "a.qcow2", &[], &script).ok("qcow2 io");
    assert_eq!(info_bitmaps(dir, "q.qcow2"), serde_json::Value::Null);
    assert_eq!(info_bitmaps(dir, "a.qcow2"), serde_json::Value::Null);
    for img in ["q.qcow2", "a.qcow2"] {
        let f = std::fs::read(p(dir, img)).unwrap();
        assert_eq!(
            bitmaps_ext(&f),
            None,
            "{img} still has its bitmaps extension"
        );
    }
    let cq = qemu_img(dir, &["check", "-f", "qcow2", "q.qcow2"]);
    let co = qemu_img(dir, &["check", "-f", "qcow2", "a.qcow2"]);
    assert_eq!(
        (cq.code, result_lines(&cq.stdout).first().cloned()),
        (co.code, result_lines(&co.stdout).first().cloned()),
        "qemu-img check after dropping the extension:\nqemu-io:\n{}\nqcow2 io:\n{}",
        cq.stdout,
        co.stdout
    );
    qemu_img(
        dir,
        &[
            "compare", "-f", "qcow2", "-F", "qcow2", "q.qcow2", "a.qcow2",
        ],
    )
    .ok("qemu-img compare");
}

/// A bitmap QEMU refuses to load (reserved flag set) makes the read-write
/// open fail, as qemu-io's does, with a message naming the image and the
/// bitmap; nothing is written. Read-only opens still work.
#[test]
fn invalid_bitmap_refused_on_read_write_open() {
    let d = tmpdir();
    let dir = d.path();
    qemu_img(dir, &["create", "-q", "-f", "qcow2", "a.qcow2", "4M"]).ok("create");
    qemu_img(dir, &["bitmap", "--add", "a.qcow2", "b0"]).ok("bitmap --add");
    let path = p(dir, "a.qcow2");
    let mut f = std::fs::read(&path).unwrap();
    let x = bitmaps_ext(&f).expect("bitmaps extension");
    let e = be64(&f, x + 16) as usize;
    let flags = be32(&f, e + 12) | 0x80;
    f[e + 12..e + 16].copy_from_slice(&flags.to_be_bytes());
    std::fs::write(&path, &f).unwrap();
    let q = qemu_io(dir, &["-c", "write 0 4k", "a.qcow2"]);
    assert_ne!(q.code, 0, "qemu-io opened it:\n{}", q.stdout);
    let o = ours(dir, &["io", "-c", "write 0 4k", "a.qcow2"]);
    assert_ne!(o.code, 0, "qcow2 io opened it:\n{}", o.stdout);
    assert!(
        o.stderr.contains("a.qcow2") && o.stderr.contains("b0"),
        "error names neither image nor bitmap: {}",
        o.stderr
    );
    assert!(f == std::fs::read(&path).unwrap(), "the file was changed");
    ours(dir, &["info", "a.qcow2"]).ok("qcow2 info (read-only)");
}
