//! `qcow2 rebase` against `qemu-img rebase`: the same operation on two
//! copies of one image, one through each tool. Both must give the same exit
//! status and messages; afterwards the image's content through its new chain
//! equals its content before, `qemu-img compare` finds the two copies equal,
//! `qemu-img check` finds ours clean, `qemu-img info` shows the same backing
//! fields and `qemu-img map` is the same.

mod common;

use common::*;
use std::path::Path;

fn tools() -> bool {
    qcow2_testutil::require("rebase_commit_measure", &["qemu-img", "qemu-io"]).is_some()
}

fn backing_fields(dir: &Path, img: &str) -> Vec<(String, String)> {
    let r = qemu_img(dir, &["info", "--output=json", "-f", "qcow2", img]).ok("qemu-img info");
    let v: serde_json::Value = serde_json::from_str(&r.stdout).expect("info json");
    [
        "backing-filename",
        "backing-filename-format",
        "full-backing-filename",
    ]
    .iter()
    .map(|k| (k.to_string(), v[*k].to_string()))
    .collect()
}

fn io(dir: &Path, img: &str, fmt: &str, cmds: &[&str]) {
    let cmds: Vec<String> = cmds.iter().map(|s| s.to_string()).collect();
    qemu_io_script(dir, img, fmt, &cmds).ok("qemu-io setup");
}

/// Base (qcow2 with data), a second candidate backing in qcow2 and raw, and
/// an overlay `top.qcow2` on the base with its own data and zero clusters.
fn setup(dir: &Path, o: &ImgOpts) {
    let cs = o.cluster_size;
    qemu_create(dir, "base.qcow2", 4 << 20, o, None);
    io(
        dir,
        "base.qcow2",
        "qcow2",
        &["write -P 1 0 1M", "write -P 2 2M 512k", "write -P 7 3M 4k"],
    );
    qemu_create(dir, "new.qcow2", 4 << 20, o, None);
    io(
        dir,
        "new.qcow2",
        "qcow2",
        &["write -P 1 0 512k", "write -P 3 3M 64k"],
    );
    // A shorter raw candidate: the part past its end reads as zeroes.
    raw_backing(dir, "new.raw", 3 << 20, &["write -P 2 2M 512k".to_string()]);
    qemu_create(dir, "top.qcow2", 4 << 20, o, Some(("base.qcow2", "qcow2")));
    let a = format!("write -P 5 {} {}", 4 * cs, cs);
    let b = format!("write -z {} {}", 2 << 20, cs);
    let c = format!("write -P 6 {} 512", (3 << 20) + cs);
    io(dir, "top.qcow2", "qcow2", &[&a, &b, &c]);
}

/// Runs `rebase args... IMG` through both tools on copies of `top.qcow2`
/// and compares everything.
fn rebase_case(o: &ImgOpts, args: &[&str], unsafe_mode: bool) {
    let ctx = format!("rebase {args:?} ({})", o.o());
    let dir = tmpdir();
    let d = dir.path();
    setup(d, o);
    let before = qemu_content(d, "top.qcow2");
    copy(d, "top.qcow2", "q.qcow2");
    copy(d, "top.qcow2", "r.qcow2");
    let mut qa = vec!["rebase"];
    qa.extend_from_slice(args);
    let mut ra = qa.clone();
    qa.push("q.qcow2");
    ra.push("r.qcow2");
    let q = qemu_img(d, &qa);
    let r = ours(d, &ra);
    assert_eq!(
        q.code, r.code,
        "{ctx}: exit status\nqemu: {}\nours: {}",
        q.stderr, r.stderr
    );
    assert_eq!(
        q.stderr
            .replace("qemu-img: ", "")
            .replace("qemu-img", "qcow2"),
        r.stderr.replace("qcow2: ", ""),
        "{ctx}: messages"
    );
    assert_eq!(q.stdout, r.stdout, "{ctx}: stdout");
    if !args.contains(&"missing.qcow2") {
        assert_qemu_check_clean(d, "r.qcow2", &ctx);
    }
    assert_eq!(
        backing_fields(d, "q.qcow2"),
        backing_fields(d, "r.qcow2"),
        "{ctx}: backing fields"
    );
    if !args.contains(&"missing.qcow2") {
        let c = qemu_img(d, &["compare", "q.qcow2", "r.qcow2"]);
        assert_eq!(c.code, 0, "{ctx}: compare: {}{}", c.stdout, c.stderr);
    }
    if !unsafe_mode && q.code == 0 {
        assert!(
            qemu_content(d, "r.qcow2") == before,
            "{ctx}: content changed through the new chain"
        );
    }
    if !args.contains(&"missing.qcow2") {
        let (qm, rm) = (qemu_map(d, "q.qcow2"), qemu_map(d, "r.qcow2"));
        if o.cluster_size >= 4096 {
            assert_eq!(qm, rm, "{ctx}: map");
        } else {
            // Tiny clusters: L2 tables and data interleave differently.
            assert_eq!(
                map_without_offsets(&qm),
                map_without_offsets(&rm),
                "{ctx}: map"
            );
        }
    }
}

fn opts() -> Vec<ImgOpts> {
    let mut v = vec![ImgOpts::default()];
    v.push(ImgOpts {
        cluster_size: 4096,
        refcount_bits: 1,
        ..ImgOpts::default()
    });
    v.push(ImgOpts {
        extended_l2: true,
        ..ImgOpts::default()
    });
    v.push(ImgOpts {
        compat: "0.10",
        cluster_size: 512,
        ..ImgOpts::default()
    });
    v
}

#[test]
fn rebase_unsafe_matches_qemu() {
    if !tools() {
        return;
    }
    for o in opts() {
        rebase_case(&o, &["-u", "-b", "new.qcow2", "-F", "qcow2"], true);
        rebase_case(&o, &["-u", "-b", "new.raw", "-F", "raw"], true);
        rebase_case(&o, &["-u", "-b", ""], true);
        rebase_case(&o, &["-u"], true);
        rebase_case(&o, &["-u", "-b", "missing.qcow2", "-F", "qcow2"], true);
        // Errors: no backing format, format of the image not qcow2.
        rebase_case(&o, &["-u", "-b", "new.qcow2"], true);
        rebase_case(&o, &["-u", "-b", "x", "-F", "raw", "-f", "raw"], true);
    }
}

#[test]
fn rebase_safe_matches_qemu() {
    if !tools() {
        return;
    }
    for o in opts() {
        rebase_case(&o, &["-b", "new.qcow2", "-F", "qcow2"], false);
        rebase_case(&o, &["-b", "new.raw", "-F", "raw"], false);
        rebase_case(&o, &["-b", ""], false);
        rebase_case(&o, &["-b", "base.qcow2", "-F", "qcow2"], false);
        // Errors: no -b in safe mode, new backing missing.
        rebase_case(&o, &[], false);
        rebase_case(&o, &["-b", "nope.raw", "-F", "raw"], false);
    }
}
