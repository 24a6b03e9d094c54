//! `qcow2 bitmap` against `qemu-img bitmap`: the same scripts of bitmap
//! operations (interleaved with guest writes by qemu-io, several bitmaps,
//! granularities and cluster sizes, merges within an image and from another
//! image through -b) run on two copies, one through each tool; every step
//! must give the same exit status and message, and at the end
//! `qemu-img info` must list the same bitmaps (name, granularity, flags),
//! `qemu-nbd -B` + `nbdinfo --map` must export the same dirty maps and
//! `qemu-img check` must find both images clean.

mod common;

use common::*;
use std::path::Path;

fn nbd_tools() -> bool {
    qcow2_testutil::require(
        "bitmap management",
        &["qemu-img", "qemu-io", "qemu-nbd", "nbdinfo"],
    )
    .is_some()
}

/// The dirty map of bitmap `bm` as qemu-nbd exports it.
fn nbd_map(dir: &Path, img: &str, bm: &str) -> String {
    let ctx = format!("--map=qemu:dirty-bitmap:{bm}");
    run_in(
        dir,
        "nbdinfo",
        &[
            &ctx, "--", "[", "qemu-nbd", "-r", "-B", bm, "-f", "qcow2", img, "]",
        ],
    )
    .ok(&format!("nbdinfo map of {bm} in {img}"))
    .stdout
}

fn info_bitmaps(dir: &Path, img: &str) -> serde_json::Value {
    let r = qemu_img(dir, &["info", "--output=json", "-f", "qcow2", img]).ok("qemu-img info");
    let v: serde_json::Value = serde_json::from_str(&r.stdout).expect("info json");
    v["format-specific"]["data"]["bitmaps"].clone()
}

/// A message without the program prefix and with QEMU's node names
/// (`'#block123'`) and our image name made equal.
fn norm(s: &str) -> String {
    let mut out = String::new();
    for line in s.lines() {
        let l = line
            .strip_prefix("qemu-img: ")
            .or_else(|| line.strip_prefix("qcow2: "))
            .unwrap_or(line);
        let mut l = l.replace("'img.qcow2'", "'NODE'");
        while let Some(i) = l.find("'#block") {
            let j = l[i + 1..]
                .find('\'')
                .map(|j| i + 1 + j)
                .unwrap_or(l.len() - 1);
            l.replace_range(i..=j, "'NODE'");
        }
        out.push_str(&l);
        out.push('\n');
    }
    out
}

/// One step of a script.
enum Step {
    /// qemu-io commands on both copies.
    Io(&'static str),
    /// qemu-io commands on both copies, then qemu-io aborts: the enabled
    /// bitmaps stay marked in use (inconsistent).
    Abort(&'static str),
    /// `bitmap` arguments before the file name, and the bitmap name.
    Bm(&'static [&'static str], &'static str),
}
use Step::*;

/// Runs `steps` on copies of an image of `size` bytes and cluster size
/// `cs` (with `src.qcow2` next to it, holding bitmap `s`) and compares.
fn differential(what: &str, cs: u64, size: u64, compat: &str, steps: &[Step]) {
    if !nbd_tools() {
        return;
    }
    let q = tmpdir();
    let o = tmpdir();
    for d in [q.path(), o.path()] {
        let opt = format!("cluster_size={cs},compat={compat}");
        let sz = size.to_string();
        qemu_img(
            d,
            &["create", "-q", "-f", "qcow2", "-o", &opt, "img.qcow2", &sz],
        )
        .ok("create");
        qemu_img(d, &["create", "-q", "-f", "qcow2", "src.qcow2", "64M"]).ok("create src");
        qemu_img(d, &["bitmap", "--add", "-g", "4k", "src.qcow2", "s"]).ok("src bitmap");
        qemu_io(d, &["-c", "write 0 8k", "-c", "write 3M 1M", "src.qcow2"]).ok("src io");
    }
    for (k, step) in steps.iter().enumerate() {
        match step {
            Io(c) => {
                for d in [q.path(), o.path()] {
                    let mut args = Vec::new();
                    for cmd in c.split(';') {
                        args.extend(["-c", cmd]);
                    }
                    args.push("img.qcow2");
                    qemu_io(d, &args).ok(&format!("{what}: step {k} qemu-io {c}"));
                }
            }
            Abort(c) => {
                for d in [q.path(), o.path()] {
                    let mut args = Vec::new();
                    for cmd in c.split(';') {
                        args.extend(["-c", cmd]);
                    }
                    args.extend(["-c", "abort", "img.qcow2"]);
                    let r = qemu_io(d, &args);
                    assert_ne!(r.code, 0, "{what}: step {k}: qemu-io abort");
                }
            }
            Bm(args, name) => {
                let mut a = vec!["bitmap"];
                a.extend_from_slice(args);
                a.extend(["img.qcow2", name]);
                let theirs = qemu_img(q.path(), &a);
                let mine = ours(o.path(), &a);
                assert_eq!(
                    (mine.code, norm(&mine.stderr)),
                    (theirs.code, norm(&theirs.stderr)),
                    "{what}: step {k}: bitmap {args:?} {name}"
                );
            }
        }
    }
    let (iq, io) = (
        info_bitmaps(q.path(), "img.qcow2"),
        info_bitmaps(o.path(), "img.qcow2"),
    );
    assert_eq!(io, iq, "{what}: qemu-img info bitmaps");
    if let Some(list) = iq.as_array() {
        for b in list {
            let name = b["name"].as_str().expect("name");
            if b["flags"]
                .as_array()
                .is_some_and(|f| f.iter().any(|x| x == "in-use"))
            {
                continue; // inconsistent: qemu-nbd refuses to export it
            }
            assert_eq!(
                nbd_map(o.path(), "img.qcow2", name),
                nbd_map(q.path(), "img.qcow2", name),
                "{what}: dirty map of {name}"
            );
        }
    }
    assert_qemu_check_clean(o.path(), "img.qcow2", what);
}

#[test]
fn add_merge_clear_remove_64k() {
    differential(
        "64k clusters",
        65536,
        64 << 20,
        "1.1",
        &[
            Io("write 0 1M"),
            Bm(&["--add"], "b1"),
            Io("write 4M 1M;write 40M 3k"),
            Bm(&["--add", "-g", "512"], "b2"),
            Io("write 8M 64k;discard 4M 64k"),
            Bm(&["--merge", "b1"], "b2"),
            Bm(&["--disable"], "b1"),
            Io("write 16M 64k"),
            Bm(&["--add", "--disable"], "b3"),
            Bm(&["--add", "-g", "1M"], "b4"),
            Bm(&["--merge", "b2"], "b4"),
            Bm(&["--add", "-g", "4k", "--merge", "b4"], "b5"),
            Bm(&["--clear"], "b1"),
            Bm(&["--enable"], "b1"),
            Bm(&["--enable"], "b2"),
            Bm(&["--remove"], "b3"),
            Io("write 20M 512"),
            Bm(&["--merge", "s", "-b", "src.qcow2", "-F", "qcow2"], "b2"),
            Bm(&["--remove", "--add", "-g", "128k"], "b4"),
        ],
    );
}

#[test]
fn small_clusters_remove_all_and_again() {
    differential(
        "512-byte clusters",
        512,
        (4 << 20) + 1536,
        "1.1",
        &[
            Io("write 0 4k;write 1M 512"),
            Bm(&["--add"], "a"),
            Bm(&["--add", "-g", "64k"], "b"),
            Io("write 2M 8k;write 4M 1536"),
            Bm(&["--merge", "a"], "b"),
            Bm(&["--remove"], "a"),
            Bm(&["--remove"], "b"),
            Io("write 3M 4k"),
            Bm(&["--add", "-g", "1k"], "a"),
            Io("write 3M 4k"),
            Bm(&["--add", "-g", "2G"], "huge"),
            Bm(&["--merge", "a"], "huge"),
        ],
    );
}

#[test]
fn large_clusters_many_bitmaps() {
    let steps: Vec<Step> = vec![
        Io("write 0 2M"),
        Bm(&["--add"], "x0"),
        Bm(&["--add", "-g", "8k"], "x1"),
        Bm(&["--add", "-g", "2M", "--disable"], "x2"),
        Bm(&["--add", "-g", "512"], "x3"),
        Io("write 5M 100k;write 90M 1k"),
        Bm(&["--merge", "x3", "--merge", "x1"], "x2"),
        Bm(&["--merge", "x2"], "x0"),
        Bm(&["--clear", "--merge", "x0"], "x3"),
        Bm(&["--remove"], "x1"),
        Io("write 60M 64k"),
    ];
    differential("2M clusters", 2 << 20, 100 << 20, "1.1", &steps);
}

#[test]
fn errors_match_qemu() {
    let name1024: &'static str = Box::leak("n".repeat(1024).into_boxed_str());
    differential(
        "errors",
        65536,
        64 << 20,
        "1.1",
        &[
            Bm(&["--add"], "b"),
            Bm(&["--add"], "b"),
            Bm(&["--remove"], "nope"),
            Bm(&["--clear"], "nope"),
            Bm(&["--enable"], "nope"),
            Bm(&["--disable"], "nope"),
            Bm(&["--merge", "nope"], "b"),
            Bm(&["--merge", "b"], "nope"),
            Bm(&["--merge", "nope", "-b", "src.qcow2"], "b"),
            Bm(&["--add", "-g", "256"], "g"),
            Bm(&["--add", "-g", "3000"], "g"),
            Bm(&["--add", "-g", "4G"], "g"),
            Bm(&["--add", "-g", "abc"], "g"),
            Bm(&["--add", "-g", "-5"], "g"),
            Bm(&["--add"], ""),
            Bm(&["--add"], name1024),
            Bm(&["-g", "64k", "--remove"], "b"),
            Bm(&["-b", "src.qcow2", "--remove"], "b"),
            Bm(&["-F", "qcow2", "--merge", "s"], "b"),
            Bm(&[], "b"),
            Bm(&["--add", "--add"], "c"),
            Bm(&["--add", "--remove", "--clear"], "d"),
            Bm(&["--add", "-f", "qcow2"], "e"),
        ],
    );
}

#[test]
fn version_2_and_size_mismatch() {
    differential("v2", 65536, 64 << 20, "0.10", &[Bm(&["--add"], "b")]);
    differential(
        "size mismatch",
        65536,
        32 << 20,
        "1.1",
        &[
            Bm(&["--add"], "b"),
            Bm(&["--merge", "s", "-b", "src.qcow2"], "b"),
        ],
    );
}

#[test]
fn inconsistent_bitmaps() {
    differential(
        "in use",
        65536,
        64 << 20,
        "1.1",
        &[
            Bm(&["--add"], "x"),
            Bm(&["--add", "--disable"], "y"),
            Bm(&["--add", "-g", "512"], "z"),
            Io("write 1M 64k"),
            Bm(&["--merge", "x"], "y"),
            Abort("write 5M 64k"),
            Bm(&["--clear"], "x"),
            Bm(&["--enable"], "x"),
            Bm(&["--disable"], "x"),
            Bm(&["--merge", "x"], "y"),
            Bm(&["--merge", "y"], "x"),
            Bm(&["--add"], "w"),
            Bm(&["--merge", "y"], "w"),
            Bm(&["--remove"], "x"),
            Io("write 9M 64k"),
            Bm(&["--merge", "y", "--remove"], "z"),
            Bm(&["--remove"], "z"),
        ],
    );
}

/// `--merge` shows a progress bar at a terminal only (qemu-img bitmap has
/// none, and no -p or -q): under `script` (a pseudo-terminal) the bar
/// appears, for a merge within the image and one from another image (-b);
/// piped, stdout, stderr and status are qemu-img's (nothing, 0); with `-q`
/// no bar at a terminal either. The merged bitmaps are qemu-img's.
#[test]
fn merge_bar_at_a_terminal_only() {
    if !nbd_tools() || qcow2_testutil::require("bitmap progress", &["script"]).is_none() {
        return;
    }
    let d = tmpdir();
    let dir = d.path();
    // 512-byte clusters and granularity: 128 bitmap clusters per bitmap.
    qemu_img(
        dir,
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            "cluster_size=512",
            "m.qcow2",
            "256M",
        ],
    )
    .ok("create");
    for b in ["b0", "b1"] {
        qemu_img(dir, &["bitmap", "--add", "-g", "512", "m.qcow2", b]).ok("add");
    }
    qemu_io(
        dir,
        &[
            "-f",
            "qcow2",
            "-c",
            "write 0 1M",
            "-c",
            "write 100M 64k",
            "-c",
            "write 200M 512",
            "m.qcow2",
        ],
    )
    .ok("write");
    qemu_img(dir, &["bitmap", "--disable", "m.qcow2", "b0"]).ok("disable");
    copy(dir, "m.qcow2", "src.qcow2");
    let ours_bin = qcow2_bin();
    let tty = |args: &str| -> String {
        let cmd = format!("cd '{}' && {ours_bin} bitmap {args}", dir.display());
        let r = run_in(dir, "script", &["-qec", &cmd, "/dev/null"]);
        r.stdout
    };
    for (what, args) in [
        ("in image", vec!["--merge", "b0"]),
        ("from -b", vec!["--merge", "b0", "-b", "src.qcow2"]),
    ] {
        copy(dir, "m.qcow2", "q.qcow2");
        copy(dir, "m.qcow2", "o.qcow2");
        copy(dir, "m.qcow2", "t.qcow2");
        copy(dir, "m.qcow2", "tq.qcow2");
        let mut qa = vec!["bitmap"];
        qa.extend(&args);
        qa.extend(["q.qcow2", "b1"]);
        let q = qemu_img(dir, &qa);
        let mut oa = vec!["bitmap"];
        oa.extend(&args);
        oa.extend(["o.qcow2", "b1"]);
        let o = ours(dir, &oa);
        assert_eq!(
            (o.code, &o.stdout, &o.stderr),
            (q.code, &q.stdout, &q.stderr),
            "{what}: piped, as qemu-img"
        );
        let a = args.join(" ");
        let shown = tty(&format!("{a} t.qcow2 b1"));
        assert!(
            shown.contains("bitmap clusters"),
            "{what}: no bar at a terminal: {shown:?}"
        );
        let quiet = tty(&format!("-q {a} tq.qcow2 b1"));
        assert!(
            !quiet.contains("bitmap clusters"),
            "{what}: bar with -q: {quiet:?}"
        );
        for img in ["o.qcow2", "t.qcow2", "tq.qcow2"] {
            assert_eq!(
                info_bitmaps(dir, img),
                info_bitmaps(dir, "q.qcow2"),
                "{what}: {img} bitmaps"
            );
            assert_eq!(
                nbd_map(dir, img, "b1"),
                nbd_map(dir, "q.qcow2", "b1"),
                "{what}: {img} merged bits"
            );
            assert_qemu_check_clean(dir, img, what);
        }
    }
}
