//! Lazy refcounts, judged by QEMU: the same qemu-io script runs through
//! `qemu-io` and `qcow2 io` on copies of one image (lazy refcounts from the
//! image's compatible bit or the `lazy-refcounts` open option), most of the
//! scripts ending with `sigraise 9`; then both images must have the same
//! incompatible feature bits (the dirty bit), `qemu-img check` must say the
//! same about both (the same stale refcounts), and both must hold the same
//! guest data. A dirty image left by qemu-io is then opened by each tool:
//! read-only without repair, read-write with the same repair messages.

mod common;

use common::*;
use std::path::Path;

fn cmds(v: &[&str]) -> Vec<String> {
    v.iter().map(|s| s.to_string()).collect()
}

/// Incompatible feature bits of the image's header.
fn incompat(dir: &Path, name: &str) -> u64 {
    let b = std::fs::read(dir.join(name)).expect("read image");
    u64::from_be_bytes(b[72..80].try_into().unwrap())
}

/// `qemu-img check` of the image: exit status and output.
fn check(dir: &Path, name: &str) -> (i32, String, String) {
    let r = qemu_img(dir, &["check", "-f", "qcow2", name]);
    (r.code, r.stdout, r.stderr)
}

#[derive(Debug)]
struct Case {
    name: &'static str,
    /// `-o` of qemu-img create.
    create: &'static str,
    /// qemu-io options before the commands.
    opts: &'static [&'static str],
    script: &'static [&'static str],
    /// Whether the image must end up dirty (not vacuous).
    dirty: bool,
}

const CASES: &[Case] = &[
    Case {
        name: "clean-close",
        create: "compat=1.1,lazy_refcounts=on",
        opts: &[],
        script: &["write -P 0x5a 0 512", "write -P 0x5b 3M 64k"],
        dirty: false,
    },
    Case {
        name: "killed",
        create: "compat=1.1,lazy_refcounts=on",
        opts: &[],
        script: &["write -P 0x5a 0 512", "sigraise 9"],
        dirty: true,
    },
    Case {
        name: "killed-after-flush",
        create: "compat=1.1,lazy_refcounts=on,cluster_size=4096",
        opts: &[],
        script: &[
            "write -P 0x2a 0 128k",
            "write -P 0x2b 2M 8k",
            "flush",
            "write -P 0x2c 5M 4k",
            "flush",
            "sigraise 9",
        ],
        dirty: true,
    },
    Case {
        name: "killed-writethrough",
        create: "compat=1.1,lazy_refcounts=on",
        opts: &["-t", "writethrough"],
        script: &["write -P 0x5a 0 512", "write -P 0x5c 40M 4k", "sigraise 9"],
        dirty: true,
    },
    Case {
        name: "killed-overwrite-discard",
        create: "compat=1.1,lazy_refcounts=on",
        opts: &[],
        script: &[
            "write -P 0x11 0 256k",
            "flush",
            "discard 64k 64k",
            "write -P 0x12 64k 4k",
            "write -z 128k 64k",
            "flush",
            "sigraise 9",
        ],
        dirty: true,
    },
    Case {
        name: "option-on",
        create: "compat=1.1,lazy_refcounts=off",
        opts: &[],
        script: &[
            "reopen -o lazy-refcounts=on",
            "write -P 0x5a 0 512",
            "sigraise 9",
        ],
        dirty: true,
    },
    Case {
        name: "option-off",
        create: "compat=1.1,lazy_refcounts=on",
        opts: &[],
        script: &[
            "reopen -o lazy-refcounts=off",
            "write -P 0x5a 0 512",
            "sigraise 9",
        ],
        dirty: false,
    },
    Case {
        name: "reopen-read-only",
        create: "compat=1.1,lazy_refcounts=on",
        opts: &[],
        script: &["write -P 0x5a 0 512", "reopen -r", "sigraise 9"],
        dirty: false,
    },
    Case {
        name: "not-lazy",
        create: "compat=1.1,lazy_refcounts=off",
        opts: &[],
        script: &["write -P 0x5a 0 512", "sigraise 9"],
        dirty: false,
    },
];

fn run_case(c: &Case) -> Result<(), String> {
    let d = tmpdir();
    let dir = d.path();
    qemu_img(
        dir,
        &[
            "create", "-q", "-f", "qcow2", "-o", c.create, "q.qcow2", "64M",
        ],
    )
    .ok("qemu-img create");
    copy(dir, "q.qcow2", "o.qcow2");
    let script = cmds(c.script);
    let mut qargs: Vec<&str> = vec!["-f", "qcow2"];
    qargs.extend_from_slice(c.opts);
    let mut oargs: Vec<&str> = vec!["io", "-f", "qcow2"];
    oargs.extend_from_slice(c.opts);
    for s in &script {
        qargs.extend(["-c", s]);
        oargs.extend(["-c", s]);
    }
    qargs.push("q.qcow2");
    oargs.push("o.qcow2");
    let q = qemu_io(dir, &qargs);
    let o = ours(dir, &oargs);
    if q.code != o.code || result_lines(&q.stdout) != result_lines(&o.stdout) {
        return Err(format!(
            "{}: runs differ: qemu-io {} {:?} / ours {} {:?}",
            c.name, q.code, q.stdout, o.code, o.stdout
        ));
    }
    let (qi, oi) = (incompat(dir, "q.qcow2"), incompat(dir, "o.qcow2"));
    if qi != oi {
        return Err(format!(
            "{}: incompatible bits {qi:#x} (qemu-io) vs {oi:#x} (ours)",
            c.name
        ));
    }
    if (qi & 1 != 0) != c.dirty {
        return Err(format!(
            "{}: qemu-io left incompatible bits {qi:#x}",
            c.name
        ));
    }
    let (qc, oc) = (check(dir, "q.qcow2"), check(dir, "o.qcow2"));
    if qc != oc {
        return Err(format!(
            "{}: qemu-img check differs:\nqemu-io's image: {qc:?}\nours: {oc:?}",
            c.name
        ));
    }
    // The guest data, read-only (no repair of a dirty image).
    for n in ["q.qcow2", "o.qcow2"] {
        let r = qemu_img(
            dir,
            &[
                "convert",
                "-f",
                "qcow2",
                "-O",
                "raw",
                n,
                &format!("{n}.raw"),
            ],
        );
        if r.code != 0 {
            return Err(format!("{}: convert {n}: {}", c.name, r.stderr));
        }
    }
    let (qd, od) = (
        std::fs::read(dir.join("q.qcow2.raw")).unwrap(),
        std::fs::read(dir.join("o.qcow2.raw")).unwrap(),
    );
    if qd != od {
        return Err(format!("{}: guest data differs", c.name));
    }
    if incompat(dir, "q.qcow2") != qi || incompat(dir, "o.qcow2") != oi {
        return Err(format!("{}: a read-only open changed the header", c.name));
    }
    Ok(())
}

/// A lazy-refcount image `t.qcow2` of `size` that qemu-io left dirty (the
/// `script` ends with it killed), copied to `q.qcow2` and `o.qcow2`.
/// Returns qemu-io's run.
fn dirty_image(dir: &Path, size: &str, script: &[&str]) -> Run {
    qemu_img(
        dir,
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            "compat=1.1,lazy_refcounts=on",
            "t.qcow2",
            size,
        ],
    )
    .ok("qemu-img create");
    let r = qemu_io_script(dir, "t.qcow2", "qcow2", &cmds(script));
    assert_eq!(
        incompat(dir, "t.qcow2") & 1,
        1,
        "qemu-io left a clean image"
    );
    copy(dir, "t.qcow2", "q.qcow2");
    copy(dir, "t.qcow2", "o.qcow2");
    r
}

/// Each script through both tools: same dirty bit, same `qemu-img check`
/// verdict (same stale refcounts), same data.
#[test]
fn lazy_refcounts_match_qemu_io() {
    if !tool_or_skip("qemu-io", &["--version"], "lazy refcounts") {
        return;
    }
    let failures = run_cases(CASES, workers(), |c| {
        if let Err(e) = run_case(c) {
            panic!("{e}");
        }
    });
    assert_no_failures("lazy refcounts", CASES.len(), &failures);
}

/// A dirty image left by a killed qemu-io: opened read-only by each tool
/// it stays dirty and reads the same; opened read-write each tool repairs
/// it with the same messages (as QEMU's open prints them), clears the dirty
/// bit, and `qemu-img check` then finds both clean and alike.
#[test]
fn dirty_image_open_matches_qemu_io() {
    if !tool_or_skip("qemu-io", &["--version"], "lazy refcounts") {
        return;
    }
    let d = tmpdir();
    let dir = d.path();
    let r = dirty_image(
        dir,
        "128M",
        &["write -P 0x5a 0 512", "write -P 0x5b 1M 64k", "sigraise 9"],
    );
    assert_ne!(r.code, 0, "qemu-io was not killed");
    // Read-only: no repair, same data, still dirty.
    let read = cmds(&["read -P 0x5a 0 512", "read -P 0x5b 1M 64k"]);
    let mut qa = vec!["-r", "-f", "qcow2"];
    let mut oa = vec!["io", "-r", "-f", "qcow2"];
    for c in &read {
        qa.extend(["-c", c]);
        oa.extend(["-c", c]);
    }
    qa.push("q.qcow2");
    oa.push("o.qcow2");
    let q = qemu_io(dir, &qa);
    let o = ours(dir, &oa);
    assert_same_run(&q, &o, "qemu-io", "read-only open of a dirty image");
    assert_eq!(incompat(dir, "q.qcow2"), incompat(dir, "o.qcow2"));
    assert_eq!(
        incompat(dir, "o.qcow2") & 1,
        1,
        "read-only open cleared the dirty bit"
    );
    assert_eq!(
        check(dir, "q.qcow2"),
        check(dir, "o.qcow2"),
        "qemu-img check of the dirty images"
    );
    // Read-write: repaired on open, with QEMU's messages.
    let write = cmds(&["write -P 0x5c 0 512"]);
    let q = qemu_io_script(dir, "q.qcow2", "qcow2", &write);
    let o = ours_io_script(dir, "o.qcow2", &["-f", "qcow2"], &write);
    assert!(
        q.stderr.contains("Rebuilding refcount structure"),
        "qemu-io did not repair: {}",
        q.stderr
    );
    assert_same_run(&q, &o, "qemu-io", "read-write open of a dirty image");
    assert_eq!(incompat(dir, "q.qcow2"), 0);
    assert_eq!(incompat(dir, "o.qcow2"), 0);
    assert_eq!(check(dir, "q.qcow2"), check(dir, "o.qcow2"));
    assert_qemu_check_clean(dir, "o.qcow2", "after the repairing open");
    assert_content_matches_qemu(dir, "o.qcow2", "after the repairing open");
}

/// `qcow2 check -r all` of a dirty image left by qemu-io finds and repairs
/// what `qemu-img check -r all` does (no repair on open first), and clears
/// the dirty bit as it does.
#[test]
fn check_repair_of_dirty_image_matches_qemu_img() {
    let d = tmpdir();
    let dir = d.path();
    let _ = dirty_image(
        dir,
        "128M",
        &["write -P 0x5a 0 512", "write -P 0x5b 64M 4k", "sigraise 9"],
    );
    // Without repair: the same errors.
    let q = qemu_img(dir, &["check", "q.qcow2"]);
    let o = ours(dir, &["check", "o.qcow2"]);
    assert_same_run(&q, &o, "qemu-img", "check of a dirty image");
    let q = qemu_img(dir, &["check", "-r", "all", "q.qcow2"]);
    let o = ours(dir, &["check", "-r", "all", "o.qcow2"]);
    assert_same_run(&q, &o, "qemu-img", "check -r all of a dirty image");
    assert_eq!(incompat(dir, "q.qcow2"), incompat(dir, "o.qcow2"));
    assert_same_bytes(dir, "q.qcow2", "o.qcow2", "the repaired images differ");
}

/// `qcow2 amend -o compat=0.10` of a dirty image left by qemu-io: repaired
/// on open with the messages qemu-img prints, then downgraded: the same
/// image as `qemu-img amend` makes.
#[test]
fn amend_of_dirty_image_matches_qemu_img() {
    let d = tmpdir();
    let dir = d.path();
    let _ = dirty_image(dir, "64M", &["write -P 0x2a 0 128k", "flush", "sigraise 9"]);
    let q = qemu_img(dir, &["amend", "-o", "compat=0.10", "q.qcow2"]);
    let o = ours(dir, &["amend", "-o", "compat=0.10", "o.qcow2"]);
    assert!(q.stderr.contains("Rebuilding"), "qemu-img: {}", q.stderr);
    assert_same_run(&q, &o, "qemu-img", "amend of a dirty image");
    assert_same_bytes(dir, "q.qcow2", "o.qcow2", "the amended images differ");
}

/// A dirty image whose repair on open fails (a refcount table entry QEMU
/// cannot follow): the read-write open fails as qemu-io's does, with the
/// same final error line.
#[test]
fn unrepairable_dirty_image_refused_as_qemu_io() {
    let d = tmpdir();
    let dir = d.path();
    qemu_img(dir, &["create", "-q", "-f", "qcow2", "t.qcow2", "64M"]).ok("qemu-img create");
    let mut b = std::fs::read(dir.join("t.qcow2")).unwrap();
    let rt = u64::from_be_bytes(b[48..56].try_into().unwrap()) as usize;
    b[rt..rt + 8].copy_from_slice(&0xffff_2a00u64.to_be_bytes());
    b[79] |= 1;
    std::fs::write(dir.join("q.qcow2"), &b).unwrap();
    std::fs::write(dir.join("o.qcow2"), &b).unwrap();
    let q = qemu_io(dir, &["-f", "qcow2", "-c", "close", "q.qcow2"]);
    let o = ours(dir, &["io", "-f", "qcow2", "-c", "close", "o.qcow2"]);
    assert_eq!(q.code, o.code, "exit status: {}\n{}", q.stderr, o.stderr);
    let last = |s: &str| s.lines().last().unwrap_or("").to_string();
    assert!(
        last(&q.stderr).ends_with("Could not repair dirty image: Input/output error"),
        "qemu-io: {}",
        q.stderr
    );
    assert_eq!(
        last(&q.stderr)
            .replace("qemu-io:", "qcow2:")
            .replace("q.qcow2", "o.qcow2"),
        last(&o.stderr),
        "final error line"
    );
    assert!(
        o.stderr.contains("Rebuilding refcount structure"),
        "{}",
        o.stderr
    );
}
