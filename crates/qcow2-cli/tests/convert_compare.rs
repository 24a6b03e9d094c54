//! `qcow2 convert` and `qcow2 compare` against `qemu-img convert` /
//! `qemu-img compare`: the same command on the same sources; the targets must
//! be equal by `qemu-img compare`, have the same `qemu-img map` (host offsets
//! aside) and pass `qemu-img check`; compare must give QEMU's messages and
//! exit status.

mod common;

use common::*;
use std::path::Path;

/// Sources in `dir`: a qcow2 image with data, zero clusters, zero data and a
/// small write; a raw copy; a short raw file; an overlay of the first.
fn sources(dir: &Path) {
    qemu_img(dir, &["create", "-q", "-f", "qcow2", "src.qcow2", "64M"]).ok("create");
    qemu_io(
        dir,
        &[
            "-f",
            "qcow2",
            "-c",
            "write -P 7 1M 3M",
            "-c",
            "write -z 8M 1M",
            "-c",
            "write -P 0 16M 1M",
            "-c",
            "write -P 9 20M 4k",
            "-c",
            "write -P 3 33M 100k",
            "src.qcow2",
        ],
    )
    .ok("fill src");
    qemu_img(dir, &["convert", "-O", "raw", "src.qcow2", "src.raw"]).ok("raw copy");
    std::fs::write(dir.join("small.raw"), vec![0x42u8; 3 << 20]).unwrap();
    qemu_img(
        dir,
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-b",
            "src.qcow2",
            "-F",
            "qcow2",
            "top.qcow2",
        ],
    )
    .ok("overlay");
    qemu_io(
        dir,
        &[
            "-f",
            "qcow2",
            "-c",
            "write -P 5 2M 64k",
            "-c",
            "write -z 30M 64k",
            "top.qcow2",
        ],
    )
    .ok("fill top");
}

fn map_of(dir: &Path, fmt: &str, name: &str) -> Vec<Extent> {
    let r = qemu_img(dir, &["map", "-f", fmt, "--output=json", name]).ok("map");
    map_without_offsets(&r.stdout)
}

#[test]
fn convert_matches_qemu_img() {
    let tmp = tmpdir();
    let dir = tmp.path();
    sources(dir);
    // (convert arguments before the target, target format)
    let cases: &[(&[&str], &str)] = &[
        (&["-O", "qcow2", "src.qcow2"], "qcow2"),
        (&["-O", "raw", "src.qcow2"], "raw"),
        (&["src.qcow2"], "raw"),
        (&["-S", "0", "-O", "qcow2", "src.qcow2"], "qcow2"),
        (&["-S", "64k", "-O", "qcow2", "src.qcow2"], "qcow2"),
        (
            &[
                "-O",
                "qcow2",
                "-o",
                "cluster_size=4k,compat=0.10",
                "src.qcow2",
            ],
            "qcow2",
        ),
        (
            &[
                "-O",
                "qcow2",
                "-o",
                "extended_l2=on,refcount_bits=1",
                "src.qcow2",
            ],
            "qcow2",
        ),
        (&["-f", "raw", "-O", "qcow2", "src.raw"], "qcow2"),
        (
            &["-O", "qcow2", "src.qcow2", "small.raw", "src.qcow2"],
            "qcow2",
        ),
        (&["-O", "qcow2", "top.qcow2"], "qcow2"),
        (
            &["-O", "qcow2", "-B", "src.qcow2", "-F", "qcow2", "top.qcow2"],
            "qcow2",
        ),
        (
            &["-O", "qcow2", "-B", "small.raw", "-F", "raw", "src.qcow2"],
            "qcow2",
        ),
    ];
    let mut failures = Vec::new();
    for (i, (args, fmt)) in cases.iter().enumerate() {
        let q = format!("q{i}.{fmt}");
        let o = format!("o{i}.{fmt}");
        let mut qa: Vec<&str> = vec!["convert"];
        qa.extend_from_slice(args);
        let mut oa = qa.clone();
        qa.push(&q);
        oa.push(&o);
        qemu_img(dir, &qa).ok(&format!("qemu-img {qa:?}"));
        let r = ours(dir, &oa);
        if r.code != 0 {
            failures.push(format!("{oa:?}: exit {}: {}", r.code, r.stderr));
            continue;
        }
        let c = qemu_img(dir, &["compare", "-f", fmt, "-F", fmt, &q, &o]);
        if c.code != 0 {
            failures.push(format!("{oa:?}: qemu-img compare: {}", c.stdout));
        }
        if map_of(dir, fmt, &q) != map_of(dir, fmt, &o) {
            failures.push(format!("{oa:?}: qemu-img map differs"));
        }
        if *fmt == "qcow2" {
            let ck = qemu_img(dir, &["check", &o]);
            if ck.code != 0 {
                failures.push(format!("{oa:?}: qemu-img check: {}", ck.stdout));
            }
            let info = |n: &str| {
                let j = qemu_img(dir, &["info", "--output=json", n])
                    .ok("info")
                    .stdout;
                let v: serde_json::Value = serde_json::from_str(&j).unwrap();
                (
                    v["virtual-size"].clone(),
                    v["cluster-size"].clone(),
                    v["backing-filename"].clone(),
                    v["format-specific"]["data"]["compat"].clone(),
                )
            };
            if info(&q) != info(&o) {
                failures.push(format!("{oa:?}: qemu-img info differs"));
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// `-n`: into an existing image holding other data; zero ranges of the
/// source go through write-zeroes (MAY_UNMAP), as QEMU's do.
#[test]
fn convert_into_existing_target() {
    let tmp = tmpdir();
    let dir = tmp.path();
    sources(dir);
    for (name, extra) in [("n.qcow2", "qcow2"), ("n.raw", "raw")] {
        let q = format!("q-{name}");
        let o = format!("o-{name}");
        qemu_img(dir, &["create", "-q", "-f", extra, &q, "64M"]).ok("create");
        let f = if extra == "raw" { "raw" } else { "qcow2" };
        qemu_io(dir, &["-f", f, "-c", "write -P 3 0 40M", &q]).ok("fill");
        copy(dir, &q, &o);
        qemu_img(dir, &["convert", "-n", "-O", extra, "src.qcow2", &q]).ok("qemu-img -n");
        ours(dir, &["convert", "-n", "-O", extra, "src.qcow2", &o]).ok("ours -n");
        let c = qemu_img(dir, &["compare", "-f", f, "-F", f, &q, &o]);
        assert_eq!(c.code, 0, "{name}: {}", c.stdout);
        if extra == "qcow2" {
            assert_eq!(map_of(dir, f, &q), map_of(dir, f, &o), "{name}: map");
            assert_qemu_check_clean(dir, &o, name);
        }
    }
}

#[test]
fn convert_errors_like_qemu_img() {
    let tmp = tmpdir();
    let dir = tmp.path();
    sources(dir);
    let cases: &[&[&str]] = &[
        &["convert", "-S", "100", "src.qcow2", "x.raw"],
        &["convert", "-n", "src.qcow2", "missing.raw"],
        &["convert", "src.qcow2"],
        &[
            "convert",
            "-O",
            "qcow2",
            "-B",
            "src.qcow2",
            "top.qcow2",
            "x.qcow2",
        ],
        &["convert", "missing.qcow2", "x.raw"],
    ];
    for args in cases {
        let q = qemu_img(dir, args);
        let o = ours(dir, args);
        assert_ne!(q.code, 0, "qemu-img {args:?} succeeded");
        assert_eq!(o.code, q.code, "{args:?}: ours {:?} vs qemu {:?}", o, q);
        // The same message after the program name.
        let strip = |s: &str| {
            s.lines()
                .map(|l| l.split_once(": ").map_or(l, |(_, r)| r).to_string())
                .collect::<Vec<_>>()
        };
        let (qm, om) = (strip(&q.stderr), strip(&o.stderr));
        assert!(
            qm.first()
                .zip(om.first())
                .is_some_and(|(a, b)| a.contains(b.as_str()) || b.contains(a.as_str())),
            "{args:?}: qemu says {qm:?}, ours {om:?}"
        );
    }
}

#[test]
fn compare_matches_qemu_img() {
    let tmp = tmpdir();
    let dir = tmp.path();
    sources(dir);
    qemu_img(dir, &["convert", "-O", "qcow2", "src.qcow2", "same.qcow2"]).ok("same");
    qemu_img(dir, &["convert", "-O", "qcow2", "src.qcow2", "diff.qcow2"]).ok("diff");
    qemu_io(
        dir,
        &["-f", "qcow2", "-c", "write -P 1 5000000 10", "diff.qcow2"],
    )
    .ok("w");
    qemu_img(dir, &["create", "-q", "-f", "qcow2", "big.qcow2", "80M"]).ok("big");
    qemu_img(
        dir,
        &["convert", "-n", "-O", "qcow2", "src.qcow2", "big.qcow2"],
    )
    .ok("big fill");
    qemu_img(dir, &["create", "-q", "-f", "qcow2", "bigger.qcow2", "80M"]).ok("bigger");
    qemu_img(
        dir,
        &["convert", "-n", "-O", "qcow2", "src.qcow2", "bigger.qcow2"],
    )
    .ok("fill");
    qemu_io(
        dir,
        &["-f", "qcow2", "-c", "write -P 1 70M 1000", "bigger.qcow2"],
    )
    .ok("tail");
    qemu_img(dir, &["create", "-q", "-f", "qcow2", "e1.qcow2", "4M"]).ok("e1");
    qemu_img(dir, &["create", "-q", "-f", "qcow2", "e2.qcow2", "4M"]).ok("e2");
    qemu_io(dir, &["-f", "qcow2", "-c", "write -z 0 64k", "e2.qcow2"]).ok("e2 zero");
    let cases: &[&[&str]] = &[
        &["compare", "src.qcow2", "same.qcow2"],
        &["compare", "src.qcow2", "diff.qcow2"],
        &["compare", "-q", "src.qcow2", "diff.qcow2"],
        &["compare", "-F", "raw", "src.qcow2", "src.raw"],
        &["compare", "src.qcow2", "src.raw"],
        &["compare", "src.qcow2", "big.qcow2"],
        &["compare", "-s", "src.qcow2", "big.qcow2"],
        &["compare", "src.qcow2", "bigger.qcow2"],
        &["compare", "bigger.qcow2", "src.qcow2"],
        &["compare", "e1.qcow2", "e2.qcow2"],
        &["compare", "-s", "e1.qcow2", "e2.qcow2"],
        &["compare", "src.qcow2", "top.qcow2"],
        &["compare", "src.qcow2", "missing.qcow2"],
    ];
    for args in cases {
        let q = qemu_img(dir, args);
        let o = ours(dir, args);
        assert_eq!(o.code, q.code, "{args:?}: ours {o:?}\nqemu {q:?}");
        assert_eq!(o.stdout, q.stdout, "{args:?}: stdout");
    }
}
