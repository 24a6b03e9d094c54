//! `qcow2 resize` against `qemu-img resize`: the same resize runs on two
//! copies of one image, one through each tool. Both must give the same exit
//! status and messages; afterwards `qemu-img compare` finds the copies
//! equal, `qemu-img check` finds ours clean, `qemu-img info` shows the same
//! virtual size, `qemu-img map` (without host offsets) is the same, and
//! qemu-io can write at the new end and read it back.

mod common;

use common::*;
use std::path::Path;

fn tools() -> bool {
    qcow2_testutil::require("resize", &["qemu-img", "qemu-io"]).is_some()
}

fn virtual_size(dir: &Path, img: &str) -> u64 {
    let r = qemu_img(dir, &["info", "--output=json", "-f", "qcow2", img]).ok("qemu-img info");
    let v: serde_json::Value = serde_json::from_str(&r.stdout).expect("info json");
    v["virtual-size"].as_u64().expect("virtual-size")
}

struct Case<'a> {
    /// `qemu-img create` options (before the file name and size).
    create: &'a [&'a str],
    size: &'a str,
    /// qemu-io commands run on the image before the resize.
    setup: &'a [&'a str],
    /// `resize` arguments; `IMG` stands for the image.
    args: &'a [&'a str],
    /// Compare the maps (metadata preallocation with small clusters
    /// depends on where the file holds data, i.e. on the host layout).
    map: bool,
}

/// Runs one case and returns (exit status, ours' stderr).
fn run_case(what: &str, c: &Case, prepare: impl Fn(&Path)) -> (i32, String) {
    let d = tmpdir();
    let dir = d.path();
    prepare(dir);
    let mut create = vec!["create", "-q", "-f", "qcow2"];
    create.extend_from_slice(c.create);
    create.extend_from_slice(&["a.qcow2", c.size]);
    qemu_img(dir, &create).ok("qemu-img create");
    for cmd in c.setup {
        let r = qemu_io(dir, &["-f", "qcow2", "-c", cmd, "a.qcow2"])
            .ok(&format!("{what}: qemu-io setup {cmd}"));
        assert!(
            !r.stdout.contains("failed"),
            "{what}: setup {cmd}: {}",
            r.stdout
        );
    }
    copy(dir, "a.qcow2", "b.qcow2");
    let with = |img: &str| -> Vec<String> {
        c.args
            .iter()
            .map(|a| {
                if *a == "IMG" {
                    img.to_string()
                } else {
                    a.to_string()
                }
            })
            .collect()
    };
    let qa = with("a.qcow2");
    let oa = with("b.qcow2");
    let mut qargs = vec!["resize"];
    qargs.extend(qa.iter().map(|s| s.as_str()));
    let mut oargs = vec!["resize"];
    oargs.extend(oa.iter().map(|s| s.as_str()));
    let q = qemu_img(dir, &qargs);
    let o = ours(dir, &oargs);
    assert_eq!(
        q.code, o.code,
        "{what}: exit status: qemu-img {}\n{}\nqcow2 {}\n{}",
        q.code, q.stderr, o.code, o.stderr
    );
    assert_eq!(q.stdout, o.stdout, "{what}: stdout");
    let ours_err = o.stderr.replace("qcow2: ", "qemu-img: ");
    if q.code != 0 {
        // The messages must agree (ours may name the image in front).
        for l in q.stderr.replace("qemu-img resize", "qcow2 resize").lines() {
            let msg = l.trim_start_matches("qemu-img: ");
            assert!(
                ours_err.contains(msg),
                "{what}: missing message {msg:?} in\n{}",
                o.stderr
            );
        }
    } else {
        assert_eq!(q.stderr, ours_err, "{what}: stderr");
    }
    let cmp = qemu_img(
        dir,
        &[
            "compare", "-f", "qcow2", "-F", "qcow2", "a.qcow2", "b.qcow2",
        ],
    );
    assert_eq!(cmp.code, 0, "{what}: compare: {}{}", cmp.stdout, cmp.stderr);
    assert_qemu_check_clean(dir, "b.qcow2", what);
    let chk = qemu_img(dir, &["check", "-f", "qcow2", "b.qcow2"]);
    assert!(
        !chk.stdout.contains("leaked"),
        "{what}: leaks:\n{}",
        chk.stdout
    );
    let size = virtual_size(dir, "a.qcow2");
    assert_eq!(size, virtual_size(dir, "b.qcow2"), "{what}: virtual size");
    if c.args.contains(&"--shrink") {
        // The file is cut after its last used cluster, as QEMU cuts it.
        let len = |f: &str| std::fs::metadata(dir.join(f)).unwrap().len();
        assert_eq!(len("a.qcow2"), len("b.qcow2"), "{what}: file length");
    }
    if c.map {
        assert_eq!(
            map_without_offsets(&qemu_map(dir, "a.qcow2")),
            map_without_offsets(&qemu_map(dir, "b.qcow2")),
            "{what}: map"
        );
    }
    // Usable afterwards: write at the new end, read it back.
    let at = (size - 512).to_string();
    let w = format!("write -P 0xa7 {at} 512");
    let r = format!("read -P 0xa7 {at} 512");
    let io = qemu_io(dir, &["-f", "qcow2", "-c", &w, "-c", &r, "b.qcow2"]).ok("qemu-io");
    assert!(
        !io.stdout.contains("fail") && !io.stdout.contains("Pattern verification"),
        "{what}: qemu-io after resize:\n{}",
        io.stdout
    );
    assert_qemu_check_clean(dir, "b.qcow2", what);
    (o.code, o.stderr)
}

fn case(what: &str, c: Case) -> (i32, String) {
    run_case(what, &c, |_| {})
}

const SMALL: &[&str] = &["-o", "cluster_size=512"];

#[test]
fn grow_within_the_l1_cluster() {
    if !tools() {
        return;
    }
    let (code, _) = case(
        "grow, same L1",
        Case {
            create: &[],
            size: "1M",
            setup: &["write -P 0x11 0 64k", "write -P 0x22 960k 64k"],
            args: &["IMG", "2G"],
            map: true,
        },
    );
    assert_eq!(code, 0);
}

#[test]
fn grow_moves_the_l1_table() {
    if !tools() {
        return;
    }
    // 512 B clusters: one L2 table maps 32 KiB, one L1 cluster 2 MiB.
    for (size, to) in [("64k", "1M"), ("64k", "40M"), ("3M", "+300M")] {
        let (code, _) = case(
            &format!("grow {size} -> {to}"),
            Case {
                create: SMALL,
                size,
                setup: &["write -P 0x33 0 4k", "write -P 0x44 60k 4k"],
                args: &["IMG", to],
                map: true,
            },
        );
        assert_eq!(code, 0);
    }
}

#[test]
fn shrink_unallocated_tail_and_refusals() {
    if !tools() {
        return;
    }
    let base = |args: &'static [&'static str]| Case {
        create: &[],
        size: "1M",
        setup: &["write -P 0x55 0 64k"],
        args,
        map: true,
    };
    assert_eq!(case("shrink tail", base(&["--shrink", "IMG", "512k"])).0, 0);
    assert_eq!(
        case("shrink relative", base(&["--shrink", "IMG", "-256k"])).0,
        0
    );
    assert_eq!(case("grow relative", base(&["IMG", "+1536k"])).0, 0);
    assert_eq!(case("same size", base(&["IMG", "1M"])).0, 0);
    assert_eq!(case("quiet", base(&["-q", "IMG", "+1M"])).0, 0);
    let (code, err) = case("no --shrink", base(&["IMG", "512k"]));
    assert_eq!(code, 1);
    assert!(err.contains("Use the --shrink option to perform a shrink operation."));
    let (code, _) = case("no --shrink, relative", base(&["IMG", "-512k"]));
    assert_eq!(code, 1);
    for (args, msg) in [
        (
            &["IMG", "+1000"][..],
            "The new size must be a multiple of 512",
        ),
        (
            &["--shrink", "IMG", "0"][..],
            "New image size must be positive",
        ),
        (
            &["--shrink", "IMG", "-2M"][..],
            "New image size must be positive",
        ),
        (&["IMG", "100E"][..], "is out of range for parameter 'size'"),
        (
            &["IMG", "x"][..],
            "Parameter 'size' expects a non-negative number",
        ),
        (
            &["--preallocation=foo", "IMG", "2M"][..],
            "Invalid preallocation mode 'foo'",
        ),
        (
            &["--shrink", "--preallocation=metadata", "IMG", "512k"][..],
            "Preallocation can only be used for growing images",
        ),
        (&["IMG"][..], "Expecting image file name and size"),
        (
            &["IMG", "3P"][..],
            "Failed to grow the L1 table: File too large",
        ),
    ] {
        let (code, err) = case(&format!("{args:?}"), base(args));
        assert_eq!(code, 1, "{args:?}");
        assert!(err.contains(msg), "{args:?}: {err}");
    }
}

#[test]
fn shrink_allocated_data() {
    if !tools() {
        return;
    }
    for create in [
        &[][..],
        SMALL,
        &["-o", "compat=0.10"][..],
        &["-o", "extended_l2=on"][..],
    ] {
        let (code, _) = case(
            &format!("shrink allocated {create:?}"),
            Case {
                create,
                size: "8M",
                setup: &[
                    "write -P 0x66 0 1M",
                    "write -P 0x77 3M 2M",
                    "write -z 6M 1M",
                    "write -P 0x78 7M 1M",
                ],
                args: &["--shrink", "IMG", "3200k"],
                map: true,
            },
        );
        assert_eq!(code, 0);
    } // Compressed clusters beyond the new end, one straddling it.
    let (code, _) = case(
        "shrink compressed",
        Case {
            create: &[],
            size: "8M",
            setup: &[
                "write -c -P 0x79 2M 128k",
                "write -c -P 0x7a 4M 128k",
                "write -P 0x7b 6M 64k",
            ],
            args: &["--shrink", "IMG", "4160k"],
            map: true,
        },
    );
    assert_eq!(code, 0);
}

#[test]
fn v2_and_extended_l2_grow() {
    if !tools() {
        return;
    }
    for create in [
        &["-o", "compat=0.10,cluster_size=512"][..],
        &["-o", "extended_l2=on,cluster_size=16k"][..],
    ] {
        let (code, _) = case(
            &format!("grow {create:?}"),
            Case {
                create,
                size: "1000k",
                setup: &["write -P 0x12 0 12k", "write -P 0x13 990k 10k"],
                args: &["IMG", "+20M"],
                map: true,
            },
        );
        assert_eq!(code, 0);
    }
}

#[test]
fn backing_file_longer_and_shorter() {
    if !tools() {
        return;
    }
    for (base_size, create) in [
        ("4M", &["-b", "base.qcow2", "-F", "qcow2"][..]),
        ("512k", &["-b", "base.qcow2", "-F", "qcow2"][..]),
        (
            "4M",
            &["-b", "base.qcow2", "-F", "qcow2", "-o", "extended_l2=on"][..],
        ),
        (
            "4M",
            &["-b", "base.qcow2", "-F", "qcow2", "-o", "compat=0.10"][..],
        ),
    ] {
        let what = format!("backing {base_size} {create:?}");
        let prepare = |dir: &Path| {
            qemu_img(
                dir,
                &["create", "-q", "-f", "qcow2", "base.qcow2", base_size],
            )
            .ok("create base");
            let w = format!("write -P 0x99 0 {base_size}");
            qemu_io(dir, &["-f", "qcow2", "-c", &w, "base.qcow2"]).ok("fill base");
        };
        let v2 = create.contains(&"compat=0.10");
        for (size, args) in [
            ("1000k", &["IMG", "6M"][..]),
            ("1000k", &["IMG", "+1536k"][..]),
            ("1024512", &["IMG", "3M"][..]),
            ("1M", &["--preallocation=metadata", "IMG", "3M"][..]),
            ("1024512", &["--preallocation=metadata", "IMG", "3M"][..]),
            ("1M", &["--preallocation=falloc", "IMG", "3M"][..]),
            ("1024512", &["--preallocation=full", "IMG", "3M"][..]),
        ] {
            if v2 && args[0] == "--preallocation=metadata" && size == "1024512" {
                // QEMU preallocates the partial first cluster before its
                // zeroing fails; ours refuses before anything: same data.
                continue;
            }
            run_case(
                &format!("{what} {size} {args:?}"),
                &Case {
                    create,
                    size,
                    setup: &["write -P 0x21 0 4k"],
                    args,
                    map: true,
                },
                prepare,
            );
        }
    }
}

#[test]
fn with_internal_snapshots() {
    if !tools() {
        return;
    }
    for (create, args, ok) in [
        (&[][..], &["IMG", "+3M"][..], true),
        (&[][..], &["--shrink", "IMG", "512k"][..], true),
        (SMALL, &["IMG", "+30M"][..], true),
        (SMALL, &["--shrink", "IMG", "100k"][..], true),
        (&["-o", "compat=0.10"][..], &["IMG", "+3M"][..], false),
    ] {
        let what = format!("snapshots {create:?} {args:?}");
        let d = tmpdir();
        let dir = d.path();
        let mut c = vec!["create", "-q", "-f", "qcow2"];
        c.extend_from_slice(create);
        c.extend_from_slice(&["a.qcow2", "1M"]);
        qemu_img(dir, &c).ok("create");
        qemu_io(dir, &["-f", "qcow2", "-c", "write -P 0x31 0 1M", "a.qcow2"]).ok("write");
        qemu_img(dir, &["snapshot", "-c", "s1", "a.qcow2"]).ok("snapshot");
        qemu_io(
            dir,
            &["-f", "qcow2", "-c", "write -P 0x32 256k 64k", "a.qcow2"],
        )
        .ok("write");
        copy(dir, "a.qcow2", "b.qcow2");
        let sub = |img: &str| -> Vec<String> {
            std::iter::once("resize".to_string())
                .chain(args.iter().map(|a| {
                    if *a == "IMG" {
                        img.into()
                    } else {
                        a.to_string()
                    }
                }))
                .collect()
        };
        let qa = sub("a.qcow2");
        let oa = sub("b.qcow2");
        let q = qemu_img(dir, &qa.iter().map(|s| s.as_str()).collect::<Vec<_>>());
        let o = ours(dir, &oa.iter().map(|s| s.as_str()).collect::<Vec<_>>());
        assert_eq!(q.code, o.code, "{what}: {}\n{}", q.stderr, o.stderr);
        assert_eq!(q.code == 0, ok, "{what}: {}", q.stderr);
        if !ok {
            assert!(
                o.stderr
                    .contains("Can't resize a v2 image which has snapshots"),
                "{what}: {}",
                o.stderr
            );
        }
        let cmp = qemu_img(
            dir,
            &[
                "compare", "-f", "qcow2", "-F", "qcow2", "a.qcow2", "b.qcow2",
            ],
        );
        assert_eq!(cmp.code, 0, "{what}: compare: {}{}", cmp.stdout, cmp.stderr);
        assert_qemu_check_clean(dir, "b.qcow2", &what);
        assert_eq!(
            map_without_offsets(&qemu_map(dir, "a.qcow2")),
            map_without_offsets(&qemu_map(dir, "b.qcow2")),
            "{what}: map"
        );
        // The snapshot still holds its data.
        for img in ["a.qcow2", "b.qcow2"] {
            qemu_img(dir, &["snapshot", "-a", "s1", img]).ok("apply snapshot");
        }
        let cmp = qemu_img(
            dir,
            &[
                "compare", "-f", "qcow2", "-F", "qcow2", "a.qcow2", "b.qcow2",
            ],
        );
        assert_eq!(
            cmp.code, 0,
            "{what}: snapshot compare: {}{}",
            cmp.stdout, cmp.stderr
        );
        assert_qemu_check_clean(dir, "b.qcow2", &what);
    }
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
    .ok("nbdinfo")
    .stdout
}

/// The bitmaps as `qemu-img info` lists them.
fn bitmap_list(dir: &Path, img: &str) -> serde_json::Value {
    let r = qemu_img(dir, &["info", "--output=json", "-f", "qcow2", img]).ok("qemu-img info");
    let v: serde_json::Value = serde_json::from_str(&r.stdout).expect("info json");
    v["format-specific"]["data"]["bitmaps"].clone()
}

/// QEMU 10 resizes persistent bitmaps with the image: bits past a new end
/// are dropped, a grown area is clean, enabled and disabled bitmaps alike.
#[test]
fn with_bitmaps() {
    if qcow2_testutil::require(
        "resize with bitmaps",
        &["qemu-img", "qemu-io", "qemu-nbd", "nbdinfo"],
    )
    .is_none()
    {
        return;
    }
    for (create, steps) in [
        (
            &[][..],
            &[&["IMG", "4M"][..], &["--shrink", "IMG", "512k"][..]][..],
        ),
        (
            SMALL,
            &[&["IMG", "+40M"][..], &["--shrink", "IMG", "-40800k"][..]][..],
        ),
    ] {
        let d = tmpdir();
        let dir = d.path();
        let mut c = vec!["create", "-q", "-f", "qcow2"];
        c.extend_from_slice(create);
        c.extend_from_slice(&["a.qcow2", "1M"]);
        qemu_img(dir, &c).ok("create");
        qemu_img(dir, &["bitmap", "--add", "a.qcow2", "bm0"]).ok("add");
        qemu_img(dir, &["bitmap", "--add", "-g", "4k", "a.qcow2", "fine"]).ok("add");
        qemu_img(dir, &["bitmap", "--add", "--disable", "a.qcow2", "dis"]).ok("add");
        qemu_io(
            dir,
            &[
                "-f",
                "qcow2",
                "-c",
                "write -P 1 0 64k",
                "-c",
                "write -P 2 900k 124k",
                "a.qcow2",
            ],
        )
        .ok("write");
        qemu_img(dir, &["bitmap", "--merge", "bm0", "a.qcow2", "dis"]).ok("merge");
        copy(dir, "a.qcow2", "b.qcow2");
        for args in steps {
            let what = format!("bitmaps {create:?} {args:?}");
            let sub = |img: &str| -> Vec<String> {
                std::iter::once("resize".to_string())
                    .chain(args.iter().map(|a| {
                        if *a == "IMG" {
                            img.into()
                        } else {
                            a.to_string()
                        }
                    }))
                    .collect()
            };
            let qa = sub("a.qcow2");
            let oa = sub("b.qcow2");
            let q = qemu_img(dir, &qa.iter().map(|s| s.as_str()).collect::<Vec<_>>());
            let o = ours(dir, &oa.iter().map(|s| s.as_str()).collect::<Vec<_>>());
            assert_eq!(
                (q.code, &q.stdout),
                (o.code, &o.stdout),
                "{what}: {}\n{}",
                q.stderr,
                o.stderr
            );
            assert_eq!(q.code, 0, "{what}: {}", q.stderr);
            assert_qemu_check_clean(dir, "b.qcow2", &what);
            let chk = qemu_img(dir, &["check", "-f", "qcow2", "b.qcow2"]);
            assert!(
                !chk.stdout.contains("leaked"),
                "{what}: leaks:\n{}",
                chk.stdout
            );
            assert_eq!(
                virtual_size(dir, "a.qcow2"),
                virtual_size(dir, "b.qcow2"),
                "{what}"
            );
            assert_eq!(
                bitmap_list(dir, "a.qcow2"),
                bitmap_list(dir, "b.qcow2"),
                "{what}"
            );
            for bm in ["bm0", "fine", "dis"] {
                assert_eq!(
                    nbd_map(dir, "a.qcow2", bm),
                    nbd_map(dir, "b.qcow2", bm),
                    "{what}: dirty map of {bm}"
                );
            }
            let cmp = qemu_img(
                dir,
                &[
                    "compare", "-f", "qcow2", "-F", "qcow2", "a.qcow2", "b.qcow2",
                ],
            );
            assert_eq!(cmp.code, 0, "{what}: compare: {}{}", cmp.stdout, cmp.stderr);
        }
        // Writes after the resize are tracked by the enabled bitmaps.
        for img in ["a.qcow2", "b.qcow2"] {
            let size = virtual_size(dir, img);
            let w = format!("write -P 3 {} 512", size - 512);
            qemu_io(dir, &["-f", "qcow2", "-c", &w, img]).ok("write at the end");
        }
        for bm in ["bm0", "fine", "dis"] {
            assert_eq!(
                nbd_map(dir, "a.qcow2", bm),
                nbd_map(dir, "b.qcow2", bm),
                "{bm} after write"
            );
        }
        assert_qemu_check_clean(dir, "b.qcow2", "bitmaps end");
    }
}

#[test]
fn preallocation_modes() {
    if !tools() {
        return;
    }
    for (create, size, to, map) in [
        (&[][..], "1M", "3M", true),
        (&[][..], "1M", "+200M", true),
        (&["-o", "extended_l2=on"][..], "1M", "5M", true),
        (SMALL, "64k", "1M", false),
    ] {
        for mode in ["metadata", "falloc", "full"] {
            let arg = format!("--preallocation={mode}");
            let (code, _) = case(
                &format!("prealloc {mode} {create:?} {size} {to}"),
                Case {
                    create,
                    size,
                    setup: &["write -P 0x51 0 4k"],
                    args: &[&arg, "IMG", to],
                    map: map || mode != "metadata",
                },
            );
            assert_eq!(code, 0);
        }
    }
}

/// An allocated cluster holding an unaligned old end, over a longer backing
/// file: its new part reads as zeroes whatever the preallocation.
#[test]
fn allocated_partial_last_cluster_over_backing() {
    if !tools() {
        return;
    }
    let prepare = |dir: &Path| {
        qemu_img(dir, &["create", "-q", "-f", "qcow2", "base.qcow2", "4M"]).ok("create base");
        qemu_io(
            dir,
            &["-f", "qcow2", "-c", "write -P 0x99 0 4M", "base.qcow2"],
        )
        .ok("fill base");
    };
    for create in [
        &["-b", "base.qcow2", "-F", "qcow2"][..],
        &["-b", "base.qcow2", "-F", "qcow2", "-o", "extended_l2=on"][..],
    ] {
        for (size, setup) in [
            ("1024512", "write -P 0x5a 996k 4k"),
            ("1023488", "write -P 0x5a 996k 3k"),
        ] {
            for mode in ["off", "metadata", "falloc", "full"] {
                let arg = format!("--preallocation={mode}");
                run_case(
                    &format!("partial last cluster {create:?} {size} {mode}"),
                    &Case {
                        create,
                        size,
                        setup: &[setup],
                        args: &[&arg, "IMG", "3M"],
                        map: true,
                    },
                    prepare,
                );
            }
        }
    }
}
