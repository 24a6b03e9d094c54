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
    if o.compat != "0.10" {
        // Other header extensions (bitmaps) must survive the header rewrite.
        qemu_img(dir, &["bitmap", "--add", "top.qcow2", "b0"]).ok("bitmap add");
    }
}

/// Runs `rebase args... IMG` through both tools on copies of `top.qcow2`
/// and compares everything.
fn rebase_case(o: &ImgOpts, args: &[&str], unsafe_mode: bool) {
    let ctx = format!("rebase {args:?} ({})", o.o());
    // The new backing file does not exist: the chain cannot be opened.
    let dangling = args
        .iter()
        .any(|a| a.starts_with("missing") || a.len() > 100);
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
    if !dangling {
        assert_qemu_check_clean(d, "r.qcow2", &ctx);
    }
    assert_eq!(
        backing_fields(d, "q.qcow2"),
        backing_fields(d, "r.qcow2"),
        "{ctx}: backing fields"
    );
    if !dangling {
        let c = qemu_img(d, &["compare", "q.qcow2", "r.qcow2"]);
        assert_eq!(c.code, 0, "{ctx}: compare: {}{}", c.stdout, c.stderr);
    }
    if !unsafe_mode && q.code == 0 {
        assert!(
            qemu_content(d, "r.qcow2") == before,
            "{ctx}: content changed through the new chain"
        );
    }
    if !dangling {
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
        // Long names: they fit the header, or not (small clusters), or
        // are longer than 1023 bytes.
        for n in [300, 600, 1100] {
            let name = "missing".to_string() + &"x".repeat(n);
            rebase_case(&o, &["-u", "-b", &name, "-F", "raw"], true);
        }
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
        // No -F: the data is copied, then the header switch fails.
        rebase_case(&o, &["-b", "new.qcow2"], false);
        rebase_case(&o, &["-b", "new.raw"], false);
        // Errors: no -b in safe mode, new backing missing.
        rebase_case(&o, &[], false);
        rebase_case(&o, &["-b", "nope.raw", "-F", "raw"], false);
    }
}

/// A three-layer chain: base.qcow2 <- mid.qcow2 <- top.qcow2 (plus
/// top_raw.qcow2 on a raw base), each layer with data and zeroes.
fn commit_setup(dir: &Path, o: &ImgOpts) {
    let cs = o.cluster_size;
    qemu_create(dir, "base.qcow2", 4 << 20, o, None);
    io(
        dir,
        "base.qcow2",
        "qcow2",
        &["write -P 1 0 1M", "write -P 2 2M 512k"],
    );
    qemu_create(dir, "mid.qcow2", 4 << 20, o, Some(("base.qcow2", "qcow2")));
    let m1 = format!("write -P 3 {} {}", 8 * cs, 2 * cs);
    io(dir, "mid.qcow2", "qcow2", &[&m1]);
    qemu_create(dir, "top.qcow2", 4 << 20, o, Some(("mid.qcow2", "qcow2")));
    let a = format!("write -P 5 {} {}", 4 * cs, cs);
    let b = format!("write -z {} {}", 512 << 10, 2 * cs);
    let c = format!("write -P 6 {} 512", (3 << 20) + cs);
    let d = format!("write -P 7 {} {}", (2 << 20) - cs, 3 * cs);
    io(dir, "top.qcow2", "qcow2", &[&a, &b, &c, &d]);
    raw_backing(
        dir,
        "base.raw",
        4 << 20,
        &["write -P 2 2M 512k".to_string()],
    );
    qemu_create(dir, "top_raw.qcow2", 4 << 20, o, Some(("base.raw", "raw")));
    io(dir, "top_raw.qcow2", "qcow2", &[&a, &b, &c]);
}

/// Runs `commit args... IMG` with qemu-img in one directory and ours in
/// another, both set up alike, and compares the results.
fn commit_case(o: &ImgOpts, args: &[&str], img: &str, base: &str) {
    let ctx = format!("commit {args:?} {img} ({})", o.o());
    let (qd, rd) = (tmpdir(), tmpdir());
    let (q_dir, r_dir) = (qd.path(), rd.path());
    commit_setup(q_dir, o);
    commit_setup(r_dir, o);
    let before = qemu_content(q_dir, img);
    let mut a = vec!["commit"];
    a.extend_from_slice(args);
    a.push(img);
    let q = qemu_img(q_dir, &a);
    let r = ours(r_dir, &a);
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
    let base_fmt = if base.ends_with(".raw") {
        "raw"
    } else {
        "qcow2"
    };
    // The chain still reads as before, in both trees.
    assert!(
        qemu_content(r_dir, img) == before,
        "{ctx}: content of {img} changed"
    );
    for name in ["base.qcow2", "mid.qcow2", "top.qcow2", "top_raw.qcow2"] {
        assert_qemu_check_clean(r_dir, name, &ctx);
        if name == "top_raw.qcow2" {
            // Reads through base.raw, whose holes depend on QEMU's mirror
            // granularity and the file system.
            continue;
        }
        // qemu-img commit runs QEMU's mirror job, whose parallel requests
        // allocate host clusters in no fixed order: compare without offsets.
        let (qm, rm) = (qemu_map(q_dir, name), qemu_map(r_dir, name));
        assert_eq!(
            map_without_offsets(&qm),
            map_without_offsets(&rm),
            "{ctx}: map of {name}"
        );
    }
    // The base holds what the committed layers showed.
    let qb = q_dir.join(base);
    let rb = r_dir.join(base);
    let c = qemu_img(
        r_dir,
        &[
            "compare",
            "-f",
            base_fmt,
            "-F",
            base_fmt,
            qb.to_str().unwrap(),
            rb.to_str().unwrap(),
        ],
    );
    assert_eq!(
        c.code, 0,
        "{ctx}: compare of {base}: {}{}",
        c.stdout, c.stderr
    );
    assert_eq!(
        backing_fields(q_dir, img),
        backing_fields(r_dir, img),
        "{ctx}: backing fields"
    );
    if !args.contains(&"-d") && img != base {
        // The emptied image gives its space back as qemu-img's does: QEMU
        // rebuilds the metadata (header, refcount table and block, L1);
        // ours cuts the file after its last used cluster, which may still
        // be an emptied L2 table.
        let len = |d: &Path| std::fs::metadata(d.join(img)).unwrap().len();
        let (q, r) = (len(q_dir), len(r_dir));
        let slack = o.cluster_size * 4;
        assert!(
            r <= q + slack,
            "{ctx}: {img} is {r} bytes after the commit, qemu-img's {q}"
        );
    }
}

#[test]
fn commit_matches_qemu() {
    if !tools() {
        return;
    }
    for o in opts() {
        commit_case(&o, &[], "top.qcow2", "mid.qcow2");
        commit_case(&o, &["-d"], "top.qcow2", "mid.qcow2");
        commit_case(&o, &["-q"], "mid.qcow2", "base.qcow2");
        commit_case(&o, &["-b", "base.qcow2"], "top.qcow2", "base.qcow2");
        commit_case(&o, &["-b", "mid.qcow2"], "top.qcow2", "mid.qcow2");
        commit_case(&o, &[], "top_raw.qcow2", "base.raw");
        // Errors: no backing file, base not in the chain, missing image.
        commit_case(&o, &[], "base.qcow2", "base.qcow2");
        commit_case(&o, &["-b", "base.raw"], "top.qcow2", "base.qcow2");
    }
    let dir = tmpdir();
    let q = qemu_img(dir.path(), &["commit", "nofile.qcow2"]);
    let r = ours(dir.path(), &["commit", "nofile.qcow2"]);
    assert_eq!(q.code, r.code);
    assert_eq!(
        q.stderr.replace("qemu-img: ", ""),
        r.stderr.replace("qcow2: ", "")
    );
}

/// `measure args...` through both tools: same exit status, same stdout,
/// same messages.
fn measure_same(dir: &Path, args: &[&str]) {
    let mut a = vec!["measure"];
    a.extend_from_slice(args);
    let q = qemu_img(dir, &a);
    let r = ours(dir, &a);
    assert_eq!(
        q.code, r.code,
        "{args:?}: exit status\nqemu: {}\nours: {}",
        q.stderr, r.stderr
    );
    assert_eq!(q.stdout, r.stdout, "{args:?}: stdout");
    assert_eq!(
        q.stderr
            .replace("qemu-img: ", "")
            .replace("qemu-img", "qcow2"),
        r.stderr.replace("qcow2: ", ""),
        "{args:?}: messages"
    );
}

#[test]
fn measure_matches_qemu() {
    if !tools() {
        return;
    }
    let dir = tmpdir();
    let d = dir.path();
    let target_opts = [
        "",
        "cluster_size=512",
        "cluster_size=4096",
        "cluster_size=2M",
        "refcount_bits=1",
        "refcount_bits=64",
        "cluster_size=4096,refcount_bits=64",
        "extended_l2=on",
        "cluster_size=16k,extended_l2=on",
        "compat=0.10",
        "preallocation=full",
        "preallocation=metadata",
        "cluster_size=3000",
    ];
    for size in ["1", "512", "1M", "100M", "1G", "10G", "1T", "64T"] {
        for o in target_opts {
            for out in ["--output=human", "--output=json"] {
                let mut a = vec![out, "-O", "qcow2"];
                if !o.is_empty() {
                    a.extend(["-o", o]);
                }
                a.extend(["--size", size]);
                measure_same(d, &a);
            }
        }
        measure_same(d, &["--size", size]);
    }
    // Existing images as input: a chain with data and zeroes, a raw file,
    // and an image with persistent bitmaps.
    commit_setup(d, &ImgOpts::default());
    qemu_img(d, &["bitmap", "--add", "mid.qcow2", "b1"]).ok("bitmap add");
    qemu_img(
        d,
        &[
            "bitmap",
            "--add",
            "-g",
            "512",
            "mid.qcow2",
            "a-longer-bitmap-name",
        ],
    )
    .ok("bitmap add");
    for img in [
        "base.qcow2",
        "mid.qcow2",
        "top.qcow2",
        "top_raw.qcow2",
        "base.raw",
    ] {
        for o in target_opts {
            for out in ["--output=human", "--output=json"] {
                let mut a = vec![out, "-O", "qcow2"];
                if !o.is_empty() {
                    a.extend(["-o", o]);
                }
                a.push(img);
                measure_same(d, &a);
            }
        }
        measure_same(d, &[img]);
    }
    // Errors.
    measure_same(d, &[]);
    measure_same(d, &["--size", "1G", "top.qcow2"]);
    measure_same(d, &["-O", "qcow2", "--size", "1X"]);
    measure_same(d, &["-O", "qcow2", "missing.qcow2"]);
    measure_same(d, &["--output=foo", "--size", "1G"]);
}

#[test]
fn missing_old_backing_messages_match_qemu() {
    if !tools() {
        return;
    }
    let dir = tmpdir();
    let d = dir.path();
    let o = ImgOpts::default();
    qemu_create(d, "gone.qcow2", 1 << 20, &o, None);
    qemu_create(d, "new.qcow2", 1 << 20, &o, None);
    qemu_create(d, "top.qcow2", 1 << 20, &o, Some(("gone.qcow2", "qcow2")));
    std::fs::remove_file(d.join("gone.qcow2")).expect("remove");
    for args in [
        &["rebase", "-b", "new.qcow2", "-F", "qcow2"][..],
        &["commit"][..],
        &["measure", "-O", "qcow2"][..],
    ] {
        copy(d, "top.qcow2", "q.qcow2");
        copy(d, "top.qcow2", "r.qcow2");
        let mut qa = args.to_vec();
        qa.push("q.qcow2");
        let mut ra = args.to_vec();
        ra.push("r.qcow2");
        let q = qemu_img(d, &qa);
        let r = ours(d, &ra);
        assert_eq!(q.code, r.code, "{args:?}");
        assert_eq!(
            q.stderr
                .replace("qemu-img: ", "")
                .replace("q.qcow2", "r.qcow2"),
            r.stderr.replace("qcow2: ", ""),
            "{args:?}"
        );
        assert_eq!(
            std::fs::read(d.join("q.qcow2")).ok(),
            std::fs::read(d.join("r.qcow2")).ok()
        );
    }
}
