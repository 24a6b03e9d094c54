//! `qcow2 amend` against `qemu-img amend`: the same `-o` options run on two
//! copies of one image, one through each tool. Both give the same exit
//! status and message; afterwards `qemu-img compare` finds the copies equal,
//! `qemu-img check` finds ours clean and `qemu-img info` shows the same
//! compat level and lazy refcounts flag, and `qemu-img map` (without host
//! offsets) is the same.
//!
//! Beyond QEMU: downgrading an image whose zero clusters share a host
//! cluster with an internal snapshot. QEMU writes into the shared cluster
//! or sets COPIED at refcount 2 (`qemu-img check` then reports OFLAG_COPIED
//! errors); ours gives the zero clusters new host clusters of zeroes
//! (snapshot intact, check clean), also those in the snapshot's own tables.

mod common;

use common::*;
use std::path::Path;

fn tools() -> bool {
    qcow2_testutil::require("amend", &["qemu-img", "qemu-io"]).is_some()
}

fn info(dir: &Path, img: &str) -> (String, Option<bool>) {
    let r = qemu_img(dir, &["info", "--output=json", "-f", "qcow2", img]).ok("qemu-img info");
    let v: serde_json::Value = serde_json::from_str(&r.stdout).expect("info json");
    let d = &v["format-specific"]["data"];
    (
        d["compat"].as_str().unwrap_or("").to_string(),
        d["lazy-refcounts"].as_bool(),
    )
}

fn msg(s: &str, prog: &str) -> String {
    s.replace(&format!("{prog}: "), "").trim().to_string()
}

/// Runs `amend -o opts` through both tools on copies of `base` and compares.
fn both(dir: &Path, base: &str, opts: &str, ctx: &str) {
    copy(dir, base, "q.qcow2");
    copy(dir, base, "o.qcow2");
    let q = qemu_img(dir, &["amend", "-f", "qcow2", "-o", opts, "q.qcow2"]);
    let o = ours(dir, &["amend", "-f", "qcow2", "-o", opts, "o.qcow2"]);
    assert_eq!(
        o.code, q.code,
        "{ctx}: exit status\nqemu: {}\nours: {}",
        q.stderr, o.stderr
    );
    assert_eq!(
        msg(&o.stderr, "qcow2"),
        msg(&q.stderr, "qemu-img"),
        "{ctx}: message"
    );
    assert_eq!(info(dir, "o.qcow2"), info(dir, "q.qcow2"), "{ctx}: info");
    assert_qemu_check_clean(dir, "o.qcow2", ctx);
    qemu_img(dir, &["compare", "-q", "q.qcow2", "o.qcow2"]).ok(ctx);
    qemu_img(dir, &["compare", "-q", base, "o.qcow2"]).ok(ctx);
    assert_eq!(
        map_without_offsets(&qemu_map(dir, "o.qcow2")),
        map_without_offsets(&qemu_map(dir, "q.qcow2")),
        "{ctx}: map"
    );
}

fn io(dir: &Path, img: &str, cmds: &[&str]) {
    let mut a = vec!["-f", "qcow2"];
    for c in cmds {
        a.push("-c");
        a.push(c);
    }
    a.push(img);
    qemu_io(dir, &a).ok("qemu-io");
}

#[test]
fn amend_matches_qemu() {
    if !tools() {
        return;
    }
    let d = tmpdir();
    let dir = d.path();
    for cs in ["512", "65536"] {
        for backing in [false, true] {
            let ctx = format!("cluster_size={cs} backing={backing}");
            let _ = std::fs::remove_file(dir.join("b.raw"));
            let mut args = vec!["create", "-q", "-f", "qcow2", "-o"];
            let o3 = format!("cluster_size={cs},compat=1.1");
            args.push(&o3);
            if backing {
                qemu_img(dir, &["create", "-q", "-f", "raw", "b.raw", "1M"]).ok("raw");
                qemu_io(dir, &["-f", "raw", "-c", "write -P 0x11 0 1M", "b.raw"]).ok("fill");
                args.extend(["-b", "b.raw", "-F", "raw"]);
            }
            args.extend(["v3.qcow2", "1M"]);
            qemu_img(dir, &args).ok("create v3");
            io(
                dir,
                "v3.qcow2",
                &[
                    "write -P 0x22 0 192k",
                    "write -z 4k 8k",       // zero-alloc (partial: data kept around)
                    "write -z 64k 64k",     // zero-alloc
                    "write -z -u 128k 64k", // zero-plain
                    "write -z 512k 64k",    // zero-plain on an unallocated range
                ],
            );
            for opts in [
                "lazy_refcounts=on",
                "lazy_refcounts=off",
                "compat=0.10",
                "compat=v2",
                "compat=1.1",
                "compat=0.10,lazy_refcounts=on",
                "refcount_bits=16",
                "refcount_bits=1",
                "refcount_bits=8",
                "refcount_bits=64",
                "refcount_bits=3",
                "refcount_bits=abc",
                "compat=0.10,refcount_bits=8",
                "compat=0.10,refcount_bits=16",
                "cluster_size=4096",
                "foo=bar",
                "compat=2",
                "lazy_refcounts=maybe",
            ] {
                both(dir, "v3.qcow2", opts, &format!("{ctx} v3 {opts}"));
            }
            // Refcounts above one: refused narrowing, widening.
            copy(dir, "v3.qcow2", "sn.qcow2");
            qemu_img(dir, &["snapshot", "-c", "s1", "sn.qcow2"]).ok("snapshot");
            qemu_img(dir, &["snapshot", "-c", "s2", "sn.qcow2"]).ok("snapshot");
            for opts in ["refcount_bits=1", "refcount_bits=2", "refcount_bits=32"] {
                both(dir, "sn.qcow2", opts, &format!("{ctx} snapshots {opts}"));
            }
            // Lazy on, then off.
            copy(dir, "v3.qcow2", "lazy.qcow2");
            qemu_img(dir, &["amend", "-o", "lazy_refcounts=on", "lazy.qcow2"]).ok("lazy");
            both(
                dir,
                "lazy.qcow2",
                "lazy_refcounts=off",
                &format!("{ctx} lazy off"),
            );
            both(
                dir,
                "lazy.qcow2",
                "compat=0.10",
                &format!("{ctx} lazy downgrade"),
            );
            // A v2 image upgraded.
            qemu_img(
                dir,
                &[
                    "convert",
                    "-O",
                    "qcow2",
                    "-o",
                    "compat=0.10",
                    "v3.qcow2",
                    "v2.qcow2",
                ],
            )
            .ok("v2");
            for opts in [
                "compat=1.1",
                "compat=v3,lazy_refcounts=on",
                "lazy_refcounts=on",
            ] {
                both(dir, "v2.qcow2", opts, &format!("{ctx} v2 {opts}"));
            }
            // Refused: refcount width, extended L2, data file.
            for (copt, name) in [
                ("refcount_bits=8", "r8.qcow2"),
                ("extended_l2=on,cluster_size=65536", "x.qcow2"),
            ] {
                qemu_img(
                    dir,
                    &["create", "-q", "-f", "qcow2", "-o", copt, name, "1M"],
                )
                .ok("c");
                both(dir, name, "compat=0.10", &format!("{ctx} {copt}"));
                both(
                    dir,
                    name,
                    "compat=0.10,refcount_bits=16",
                    &format!("{ctx} {copt} +16"),
                );
            }
        }
    }
}

/// Builds `s.qcow2` with snapshot `sn`; `zero_before`: the first cluster is
/// zeroed before the snapshot is taken; after it, both clusters are
/// zeroed with `write -z` (zero-alloc entries over shared host clusters).
/// With `backing`: over a raw backing file of 0x5a, also plain zero
/// clusters (`write -z -u`) in the snapshot, and a second snapshot sharing
/// the first one's tables.
fn snapshot_image(dir: &Path, zero_before: bool, backing: bool) {
    let _ = std::fs::remove_file(dir.join("s.qcow2"));
    if backing {
        qemu_img(dir, &["create", "-q", "-f", "raw", "bk.raw", "1M"]).ok("raw");
        qemu_io(dir, &["-f", "raw", "-c", "write -P 0x5a 0 1M", "bk.raw"]).ok("fill");
        qemu_img(
            dir,
            &[
                "create", "-q", "-f", "qcow2", "-b", "bk.raw", "-F", "raw", "s.qcow2", "1M",
            ],
        )
        .ok("create");
    } else {
        qemu_img(dir, &["create", "-q", "-f", "qcow2", "s.qcow2", "1M"]).ok("create");
    }
    io(dir, "s.qcow2", &["write -P 0xab 0 128k"]);
    if zero_before {
        io(dir, "s.qcow2", &["write -z 0 64k"]);
    }
    if backing {
        io(
            dir,
            "s.qcow2",
            &["write -z -u 192k 64k", "write -z -u 64k 64k"],
        );
    }
    qemu_img(dir, &["snapshot", "-c", "sn", "s.qcow2"]).ok("snapshot");
    if backing {
        qemu_img(dir, &["snapshot", "-c", "sn2", "s.qcow2"]).ok("snapshot 2");
    }
    io(dir, "s.qcow2", &["write -z 0 64k", "write -z 64k 64k"]);
}

fn snap_content(dir: &Path, img: &str) -> Vec<u8> {
    let out = format!("{img}.sn.raw");
    qemu_img(
        dir,
        &["convert", "-l", "snapshot.name=sn", "-O", "raw", img, &out],
    )
    .ok("convert -l");
    std::fs::read(dir.join(out)).expect("read")
}

#[test]
fn downgrade_keeps_snapshots_intact() {
    if !tools() {
        return;
    }
    let d = tmpdir();
    let dir = d.path();
    for (zero_before, backing) in [(false, false), (true, false), (true, true)] {
        let ctx = format!("zero_before={zero_before} backing={backing}");
        snapshot_image(dir, zero_before, backing);
        let before_sn = snap_content(dir, "s.qcow2");
        let before = qemu_content(dir, "s.qcow2");
        copy(dir, "s.qcow2", "q.qcow2");
        copy(dir, "s.qcow2", "o.qcow2");
        // QEMU's bug, documented: check errors or a changed snapshot.
        let q = qemu_img(dir, &["amend", "-o", "compat=0.10", "q.qcow2"]);
        if q.code == 0 {
            let chk = qemu_img(dir, &["check", "q.qcow2"]);
            let sn_changed = snap_content(dir, "q.qcow2") != before_sn;
            if chk.code == 0 && !sn_changed {
                println!("{ctx}: note: this qemu-img amend no longer corrupts the snapshot");
            } else {
                assert!(
                    chk.stderr.contains("OFLAG_COPIED") || sn_changed,
                    "{ctx}: qemu: {}",
                    chk.stderr
                );
            }
        }
        let o = ours(dir, &["amend", "-o", "compat=0.10", "o.qcow2"]);
        assert_eq!(o.stderr, "", "{ctx}");
        assert_qemu_check_clean(dir, "o.qcow2", &ctx);
        assert_eq!(
            snap_content(dir, "o.qcow2"),
            before_sn,
            "{ctx}: snapshot content"
        );
        assert_eq!(
            qemu_content(dir, "o.qcow2"),
            before,
            "{ctx}: active content"
        );
        o.ok(&ctx);
        assert_eq!(info(dir, "o.qcow2").0, "0.10", "{ctx}");
        // Reverting gives the snapshot's content back and stays clean.
        ours(dir, &["snapshot", "-a", "sn", "o.qcow2"]).ok("apply");
        assert_qemu_check_clean(dir, "o.qcow2", &ctx);
        assert_eq!(qemu_content(dir, "o.qcow2"), before_sn, "{ctx}: reverted");
    }
}

/// `info --output=json` of `img` by qemu-img, its name replaced by `X` and
/// `actual-size` left out (st_blocks: QEMU writes whole metadata tables,
/// ours only their dirty sectors, so a sparse copy fills differently).
fn info_json(dir: &Path, img: &str) -> String {
    let r = qemu_img(dir, &["info", "--output=json", img]);
    r.stdout
        .lines()
        .filter(|l| !l.contains("\"actual-size\""))
        .map(|l| l.replace(img, "X"))
        .collect::<Vec<_>>()
        .join("\n")
}

/// `qemu-img check` of `img`: exit status, stdout and stderr, the name
/// replaced by `X`.
fn check_all(dir: &Path, img: &str) -> (i32, String, String) {
    let r = qemu_img(dir, &["check", img]);
    (
        r.code,
        r.stdout.replace(img, "X"),
        r.stderr.replace(img, "X"),
    )
}

/// Runs `amend args` through both tools on copies of `base`: the same exit
/// status, stdout and stderr; then qemu-img's `info --output=json` and
/// `check` (status, stdout, stderr) of the two copies are the same, and
/// `qemu-img compare` finds them equal.
fn both_exact(dir: &Path, base: &str, args: &[&str], ctx: &str) {
    copy(dir, base, "q.qcow2");
    copy(dir, base, "o.qcow2");
    let mut qa = vec!["amend"];
    qa.extend_from_slice(args);
    let mut oa = qa.clone();
    qa.push("q.qcow2");
    oa.push("o.qcow2");
    let q = qemu_img(dir, &qa);
    let o = ours(dir, &oa);
    assert_eq!(
        (o.code, &o.stdout, msg(&o.stderr, "qcow2")),
        (q.code, &q.stdout, msg(&q.stderr, "qemu-img")),
        "{ctx}: amend status, stdout, stderr"
    );
    assert_eq!(
        info_json(dir, "o.qcow2"),
        info_json(dir, "q.qcow2"),
        "{ctx}: qemu-img info"
    );
    assert_eq!(
        check_all(dir, "o.qcow2"),
        check_all(dir, "q.qcow2"),
        "{ctx}: qemu-img check"
    );
    qemu_img(dir, &["compare", "-q", "q.qcow2", "o.qcow2"]).ok(ctx);
}

/// compat=0.10 on images with persistent dirty bitmaps: QEMU 10 downgrades
/// (no message, status 0) and keeps the bitmaps extension in the v2 header,
/// every bitmap stored anew; qemu-img then warns that the bitmaps are
/// inconsistent and `check` counts their clusters as leaks. Ours gives the
/// same image: the same `info`, the same `check` (leaked cluster numbers
/// and image end offset included).
#[test]
fn downgrade_with_bitmaps_matches_qemu() {
    if !tools() {
        return;
    }
    let d = tmpdir();
    let dir = d.path();
    for (cs, backing) in [("65536", false), ("65536", true), ("4096", false)] {
        let ctx = format!("cluster_size={cs} backing={backing}");
        let _ = std::fs::remove_file(dir.join("bm.qcow2"));
        let o = format!("cluster_size={cs}");
        let mut args = vec!["create", "-q", "-f", "qcow2", "-o", &o];
        if backing {
            qemu_img(dir, &["create", "-q", "-f", "raw", "bb.raw", "4M"]).ok("raw");
            qemu_io(dir, &["-f", "raw", "-c", "write -P 9 0 4M", "bb.raw"]).ok("fill");
            args.extend(["-b", "bb.raw", "-F", "raw"]);
        }
        args.extend(["bm.qcow2", "4M"]);
        qemu_img(dir, &args).ok("create");
        io(dir, "bm.qcow2", &["write -P 1 0 1M"]);
        qemu_img(dir, &["bitmap", "--add", "bm.qcow2", "b1"]).ok("add b1");
        qemu_img(dir, &["bitmap", "--add", "-g", "512", "bm.qcow2", "b2"]).ok("add b2");
        io(
            dir,
            "bm.qcow2",
            &[
                "write -P 2 1M 1M",
                "write -z 64k 64k",
                "write -z -u 2M 128k",
                "write -P 3 3M 64k",
            ],
        );
        qemu_img(dir, &["bitmap", "--disable", "bm.qcow2", "b2"]).ok("disable b2");
        qemu_img(dir, &["bitmap", "--add", "bm.qcow2", "empty"]).ok("add empty");
        both_exact(dir, "bm.qcow2", &["-o", "compat=0.10"], &ctx);
        // Our check and info of the result print what qemu-img's print for
        // it, the warning included (the bitmaps are inconsistent in a v2
        // image).
        let tool = |s: &str| {
            s.replace("qemu-img", "TOOL")
                .replace("qcow2 check", "TOOL check")
                .replace("qcow2: ", "TOOL: ")
                .replace("o.qcow2", "X")
        };
        for cmd in ["check", "info"] {
            let q = qemu_img(dir, &[cmd, "o.qcow2"]);
            let o = ours(dir, &[cmd, "o.qcow2"]);
            assert_eq!(
                (o.code, tool(&o.stdout), tool(&o.stderr)),
                (q.code, tool(&q.stdout), tool(&q.stderr)),
                "{ctx}: our {cmd} of the downgraded image"
            );
        }
        both_exact(
            dir,
            "bm.qcow2",
            &["-f", "qcow2", "-o", "compat=0.10,refcount_bits=16"],
            &format!("{ctx} +16"),
        );
    }
}

/// `-o backing_file=...,backing_fmt=...` and the external data file options:
/// QEMU 10 refuses any change of the backing file (pointing at `rebase`)
/// and accepts the current values unchanged; its refusal comes after an
/// upgrade or a refcount width change asked for with it (those stay done)
/// and before lazy refcounts and a downgrade. `data_file` is refused on an
/// image without one, `data_file_raw=on` on every existing image,
/// `data_file_raw=off` is nothing to do there.
#[test]
fn amend_backing_and_data_file_match_qemu() {
    if !tools() {
        return;
    }
    let d = tmpdir();
    let dir = d.path();
    qemu_img(dir, &["create", "-q", "-f", "raw", "b.raw", "1M"]).ok("raw");
    qemu_img(dir, &["create", "-q", "-f", "qcow2", "b2.qcow2", "1M"]).ok("b2");
    qemu_img(dir, &["create", "-q", "-f", "qcow2", "plain.qcow2", "1M"]).ok("plain");
    qemu_img(
        dir,
        &[
            "create", "-q", "-f", "qcow2", "-b", "b.raw", "-F", "raw", "ov.qcow2", "1M",
        ],
    )
    .ok("overlay");
    qemu_img(
        dir,
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            "compat=0.10",
            "v2.qcow2",
            "1M",
        ],
    )
    .ok("v2");
    let cases: &[(&str, &str)] = &[
        ("plain.qcow2", "backing_file=b.raw"),
        ("plain.qcow2", "backing_file=b.raw,backing_fmt=raw"),
        ("plain.qcow2", "backing_fmt=raw"),
        ("plain.qcow2", "backing_file=missing,backing_fmt=raw"),
        ("plain.qcow2", "backing_file="),
        ("plain.qcow2", "backing_file=b2.qcow2,backing_fmt=qcow2"),
        ("ov.qcow2", "backing_file=b.raw,backing_fmt=raw"),
        ("ov.qcow2", "backing_file=b.raw"),
        ("ov.qcow2", "backing_fmt=raw"),
        ("ov.qcow2", "backing_file=./b.raw,backing_fmt=raw"),
        ("ov.qcow2", "backing_file=b2.qcow2,backing_fmt=qcow2"),
        ("ov.qcow2", "backing_file=b.raw,backing_fmt=raw,compat=0.10"),
        (
            "ov.qcow2",
            "backing_file=b.raw,backing_fmt=raw,lazy_refcounts=on",
        ),
        ("plain.qcow2", "compat=0.10,backing_file=b2.qcow2"),
        (
            "plain.qcow2",
            "compat=0.10,lazy_refcounts=on,backing_file=x",
        ),
        ("plain.qcow2", "lazy_refcounts=on,backing_file=x"),
        ("plain.qcow2", "refcount_bits=8,backing_file=x"),
        ("plain.qcow2", "refcount_bits=3,backing_file=x"),
        ("plain.qcow2", "backing_file=x,compat=2"),
        ("v2.qcow2", "compat=1.1,backing_file=x"),
        ("v2.qcow2", "refcount_bits=8,backing_file=x"),
        ("plain.qcow2", "data_file=x"),
        ("plain.qcow2", "data_file="),
        ("plain.qcow2", "data_file_raw=on"),
        ("plain.qcow2", "data_file_raw=off"),
        ("plain.qcow2", "data_file_raw=maybe"),
        ("plain.qcow2", "data_file=x,backing_file=b2.qcow2"),
        ("plain.qcow2", "backing_file=b2.qcow2,data_file=x"),
        ("plain.qcow2", "data_file_raw=on,data_file=x"),
        ("plain.qcow2", "data_file=x,compat=2"),
        ("plain.qcow2", "refcount_bits=3,data_file=x"),
        ("plain.qcow2", "data_file=x,refcount_bits=abc"),
        ("plain.qcow2", "data_file=x,lazy_refcounts=maybe"),
        ("plain.qcow2", "data_file_raw=on,refcount_bits=3"),
        ("plain.qcow2", "data_file=x,cluster_size=4k"),
        ("plain.qcow2", "data_file=x,foo=bar"),
        ("plain.qcow2", "refcount_bits=3,foo=bar"),
        ("plain.qcow2", "encryption=on"),
        ("ov.qcow2", "data_file_raw=off,backing_file=x"),
    ];
    for (base, opts) in cases {
        both_exact(dir, base, &["-o", opts], &format!("{base} -o {opts}"));
    }
}
