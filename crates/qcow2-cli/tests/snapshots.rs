//! `qcow2 snapshot` against `qemu-img snapshot`: the same sequence of guest
//! writes (qemu-io / `qcow2 io`) and snapshot operations runs on two copies,
//! one through each tool. Every snapshot step must give the same exit status
//! and message; after every apply `qemu-img compare` must find the images
//! equal; at the end `qemu-img snapshot -l` must list the same snapshots
//! (dates filtered), every snapshot must read the same through
//! `qemu-img convert -l snapshot.id=N`, and `qemu-img check` must find both
//! images clean. Images are also handed across: snapshots made by ours are
//! applied and used by QEMU, snapshots made by qemu-img are applied and
//! deleted by ours.

mod common;

use common::*;
use std::path::Path;

fn tools() -> bool {
    qcow2_testutil::require("snapshots", &["qemu-img", "qemu-io"]).is_some()
}

#[derive(Debug, Clone)]
enum Step {
    Io(Vec<String>),
    /// qemu-io on both copies (`qcow2 io` writes no compressed clusters).
    QemuIo(Vec<String>),
    Snap(&'static str, String),
}

fn snap(flag: &'static str, arg: &str) -> Step {
    Step::Snap(flag, arg.to_string())
}

/// The message with the program names made alike.
fn norm(s: &str) -> String {
    s.replace("qemu-img snapshot", "qcow2 snapshot")
        .replace("qemu-img: ", "qcow2: ")
}

/// The `-l` table without the date and time columns.
fn list_filtered(out: &str) -> Vec<Vec<String>> {
    out.lines()
        .map(|l| {
            l.split_whitespace()
                .filter(|t| {
                    let b = t.as_bytes();
                    let date = b.len() == 10 && b[4] == b'-' && b[7] == b'-';
                    let time = b.len() == 8 && b[2] == b':' && b[5] == b':';
                    !(date || time)
                })
                .map(str::to_string)
                .collect()
        })
        .collect()
}

fn ids(dir: &Path, img: &str) -> Vec<String> {
    let r = qemu_img(dir, &["snapshot", "-l", img]).ok("qemu-img snapshot -l");
    r.stdout
        .lines()
        .skip(2)
        .filter_map(|l| l.split_whitespace().next().map(str::to_string))
        .collect()
}

fn assert_same_content(dir: &Path, a: &str, b: &str, ctx: &str) {
    let r = qemu_img(dir, &["compare", "-f", "qcow2", "-F", "qcow2", a, b]);
    assert_eq!(r.code, 0, "{ctx}: images differ:\n{}{}", r.stdout, r.stderr);
}

/// Each snapshot of `a` reads the same as the one with the same id in `b`.
fn assert_same_snapshots(dir: &Path, a: &str, b: &str, ctx: &str) {
    let ia = ids(dir, a);
    assert_eq!(ia, ids(dir, b), "{ctx}: snapshot ids");
    for id in ia {
        let opt = format!("snapshot.id={id}");
        for (img, out) in [(a, "sa.raw"), (b, "sb.raw")] {
            qemu_img(
                dir,
                &["convert", "-f", "qcow2", "-l", &opt, "-O", "raw", img, out],
            )
            .ok("qemu-img convert -l");
        }
        let (x, y) = (
            std::fs::read(dir.join("sa.raw")).unwrap(),
            std::fs::read(dir.join("sb.raw")).unwrap(),
        );
        assert!(x == y, "{ctx}: snapshot {id} reads differently");
    }
}

/// Runs `steps` on `q.qcow2` with QEMU's tools and on `o.qcow2` with ours,
/// comparing as described at the top.
fn differential(dir: &Path, steps: &[Step], ctx: &str) {
    for (i, s) in steps.iter().enumerate() {
        let sctx = format!("{ctx}: step {i} {s:?}");
        match s {
            Step::Io(cmds) => {
                qemu_io_script(dir, "q.qcow2", "qcow2", cmds).ok(&sctx);
                ours_io_script(dir, "o.qcow2", &[], cmds).ok(&sctx);
            }
            Step::QemuIo(cmds) => {
                qemu_io_script(dir, "q.qcow2", "qcow2", cmds).ok(&sctx);
                qemu_io_script(dir, "o.qcow2", "qcow2", cmds).ok(&sctx);
            }
            Step::Snap(flag, arg) => {
                let q = qemu_img(dir, &["snapshot", flag, arg, "q.qcow2"]);
                let o = ours(dir, &["snapshot", flag, arg, "o.qcow2"]);
                assert_eq!(
                    q.code, o.code,
                    "{sctx}: exit status\nqemu: {}\nours: {}",
                    q.stderr, o.stderr
                );
                assert_eq!(
                    norm(&q.stderr).replace("q.qcow2", "X"),
                    norm(&o.stderr).replace("o.qcow2", "X"),
                    "{sctx}: messages"
                );
                if *flag == "-a" {
                    assert_same_content(dir, "q.qcow2", "o.qcow2", &sctx);
                }
                if q.code == 0 {
                    assert_qemu_check_clean(dir, "o.qcow2", &sctx);
                }
            }
        }
    }
    let q = qemu_img(dir, &["snapshot", "-l", "q.qcow2"]).ok("list q");
    let o = qemu_img(dir, &["snapshot", "-l", "o.qcow2"]).ok("list o");
    assert_eq!(
        list_filtered(&q.stdout),
        list_filtered(&o.stdout),
        "{ctx}: snapshot lists"
    );
    let ol = ours(dir, &["snapshot", "-l", "o.qcow2"]).ok("our list");
    assert_eq!(
        ol.stdout, o.stdout,
        "{ctx}: our -l output against qemu-img's"
    );
    assert_same_content(dir, "q.qcow2", "o.qcow2", ctx);
    assert_same_snapshots(dir, "q.qcow2", "o.qcow2", ctx);
    assert_qemu_check_clean(dir, "q.qcow2", ctx);
    assert_qemu_check_clean(dir, "o.qcow2", ctx);
}

fn main_sequence(cs: u64) -> Vec<Step> {
    let w = |v: &[String]| Step::Io(v.to_vec());
    vec![
        snap("-c", "s1"),
        w(&[
            format!("write -P 0xa1 0 {}", cs + cs / 2),
            format!("write -z {} {}", 4 * cs, 2 * cs),
            format!("discard {} {}", 12 * cs, cs),
            format!("write -P 0xa2 {} {}", 20 * cs, cs),
        ]),
        snap("-c", "s2"),
        w(&[
            format!("write -P 0xb1 {} {}", cs / 2, cs),
            format!("write -z -u {} {}", 15 * cs, cs),
        ]),
        Step::QemuIo(vec![format!("write -c -P 0xb2 {} {}", 7 * cs, cs)]),
        snap("-c", "s3"),
        snap("-c", "s2"),
        snap("-c", ""),
        w(&[format!("write -P 0xc1 {} {}", 2 * cs, 3 * cs)]),
        snap("-a", "s1"),
        w(&[format!("write -P 0xc2 {} {}", 5 * cs, cs)]),
        snap("-a", "2"),
        snap("-d", "s2"),
        snap("-d", "nope"),
        snap("-a", "nope"),
        snap("-d", "1"),
        snap("-a", "s2"),
        w(&[format!("write -P 0xd1 0 {}", 3 * cs)]),
        snap("-c", "s4"),
        snap("-a", "3"),
        snap("-d", "s1"),
    ]
}

fn delete_all() -> Vec<Step> {
    ["s3", "s2", "", "s4", "s3"]
        .iter()
        .map(|n| snap("-d", n))
        .collect()
}

fn run_case(o: &ImgOpts, backing: bool) {
    let dir = tmpdir();
    let d = dir.path();
    let cs = o.cluster_size;
    let size = 40 * cs;
    if backing {
        raw_backing(
            d,
            "base.raw",
            9 * cs,
            &[format!("write -P 0x5b 0 {}", 3 * cs)],
        );
        qemu_create(d, "q.qcow2", size, o, Some(("base.raw", "raw")));
    } else {
        qemu_create(d, "q.qcow2", size, o, None);
    }
    // The starting content (compressed clusters included) by qemu-io.
    qemu_io_script(d, "q.qcow2", "qcow2", &fill_script(cs, o.compat == "1.1")).ok("fill");
    copy(d, "q.qcow2", "o.qcow2");
    let ctx = format!("{o:?} backing={backing}");
    differential(d, &main_sequence(cs), &ctx);
    // Handed across: ours applies and deletes what qemu-img made, QEMU uses
    // what ours made.
    copy(d, "q.qcow2", "x.qcow2");
    copy(d, "q.qcow2", "y.qcow2");
    qemu_img(d, &["snapshot", "-a", "s3", "x.qcow2"]).ok("qemu apply");
    ours(d, &["snapshot", "-a", "s3", "y.qcow2"]).ok("our apply of qemu's snapshot");
    assert_same_content(d, "x.qcow2", "y.qcow2", &ctx);
    ours(d, &["snapshot", "-d", "s4", "y.qcow2"]).ok("our delete of qemu's snapshot");
    assert_qemu_check_clean(d, "y.qcow2", &ctx);
    qemu_img(d, &["snapshot", "-a", "s4", "o.qcow2"]).ok("qemu apply of our snapshot");
    qemu_io(
        d,
        &["-c", &format!("write -P 0xe1 {} {}", cs, 2 * cs), "o.qcow2"],
    )
    .ok("qemu-io");
    qemu_img(d, &["snapshot", "-c", "fromqemu", "o.qcow2"]).ok("qemu create on ours");
    qemu_img(d, &["snapshot", "-d", "s2", "o.qcow2"]).ok("qemu delete of our snapshot");
    assert_qemu_check_clean(d, "o.qcow2", &ctx);
    qemu_img(d, &["snapshot", "-a", "s4", "q.qcow2"]).ok("qemu apply");
    qemu_io(
        d,
        &["-c", &format!("write -P 0xe1 {} {}", cs, 2 * cs), "q.qcow2"],
    )
    .ok("qemu-io");
    qemu_img(d, &["snapshot", "-c", "fromqemu", "q.qcow2"]).ok("qemu create");
    qemu_img(d, &["snapshot", "-d", "s2", "q.qcow2"]).ok("qemu delete");
    differential(d, &delete_all(), &format!("{ctx} delete all"));
}

fn cases() -> Vec<(ImgOpts, bool)> {
    let v3 = ImgOpts::default();
    vec![
        (v3.clone(), false),
        (
            ImgOpts {
                compat: "0.10",
                ..v3.clone()
            },
            false,
        ),
        (
            ImgOpts {
                extended_l2: true,
                ..v3.clone()
            },
            false,
        ),
        (
            ImgOpts {
                cluster_size: 512,
                ..v3.clone()
            },
            false,
        ),
        (
            ImgOpts {
                cluster_size: 2 << 20,
                ..v3.clone()
            },
            false,
        ),
        (
            ImgOpts {
                refcount_bits: 64,
                zstd: true,
                ..v3.clone()
            },
            false,
        ),
        (v3.clone(), true),
        (
            ImgOpts {
                extended_l2: true,
                ..v3.clone()
            },
            true,
        ),
    ]
}

#[test]
fn snapshot_sequences_match_qemu() {
    if !tools() {
        return;
    }
    let cases = cases();
    let failures = run_cases(&cases, workers(), |(o, b)| run_case(o, *b));
    assert_no_failures("snapshot sequences", cases.len(), &failures);
}

/// Option handling and messages of the command itself.
#[test]
fn snapshot_usage_matches_qemu() {
    if !tools() {
        return;
    }
    let dir = tmpdir();
    let d = dir.path();
    qemu_create(d, "q.qcow2", 1 << 20, &ImgOpts::default(), None);
    qemu_img(d, &["snapshot", "-c", "a", "q.qcow2"]).ok("create");
    let cases: &[&[&str]] = &[
        &["-l", "q.qcow2"],
        &["q.qcow2"],
        &["-l", "-c", "x", "q.qcow2"],
        &["-c", "a", "-d", "a", "q.qcow2"],
        &["-c"],
        &["-l"],
        &["-l", "q.qcow2", "extra"],
        &["-x", "q.qcow2"],
        &["-U", "-c", "x", "q.qcow2"],
        &["-U", "-l", "q.qcow2"],
        &["-c", "x", "missing.qcow2"],
        &["-a", "nope", "q.qcow2"],
        &["-d", "nope", "q.qcow2"],
        &["-q", "-d", "1", "q.qcow2"],
    ];
    for args in cases {
        let mut qa = vec!["snapshot"];
        qa.extend_from_slice(args);
        let q = qemu_img(d, &qa);
        let o = ours(d, &qa);
        assert_eq!(
            q.code, o.code,
            "{args:?}: exit status\n{}\n{}",
            q.stderr, o.stderr
        );
        assert_eq!(
            list_filtered(&q.stdout),
            list_filtered(&o.stdout),
            "{args:?}: stdout"
        );
        assert_eq!(norm(&q.stderr), norm(&o.stderr), "{args:?}: stderr");
    }
    // Refcounts that would overflow (refcount_bits=1; refcount_bits=2 with
    // three compressed clusters sharing one host cluster): refused alike,
    // and ours leaves nothing behind.
    for (bits, cmds) in [
        (1u32, vec!["write -P 1 0 128k"]),
        (
            2,
            vec![
                "write -c -P 1 0 64k",
                "write -c -P 2 64k 64k",
                "write -c -P 3 128k 64k",
            ],
        ),
    ] {
        let o = ImgOpts {
            refcount_bits: bits,
            ..ImgOpts::default()
        };
        let ctx = format!("refcount_bits={bits}");
        qemu_create(d, "r1.qcow2", 4 << 20, &o, None);
        let cmds: Vec<String> = cmds.iter().map(|c| c.to_string()).collect();
        qemu_io_script(d, "r1.qcow2", "qcow2", &cmds).ok("qemu-io");
        copy(d, "r1.qcow2", "r1o.qcow2");
        let q = qemu_img(d, &["snapshot", "-c", "s", "r1.qcow2"]);
        let o = ours(d, &["snapshot", "-c", "s", "r1o.qcow2"]);
        assert_eq!(q.code, o.code, "{ctx}: {}\n{}", q.stderr, o.stderr);
        assert_eq!(
            norm(&q.stderr).replace("r1.qcow2", "X"),
            norm(&o.stderr).replace("r1o.qcow2", "X"),
            "{ctx}"
        );
        assert_qemu_check_clean(d, "r1o.qcow2", &ctx);
        assert_same_content(d, "r1.qcow2", "r1o.qcow2", &ctx);
    }
    // `info` shows the same "Snapshot list:" section as qemu-img info.
    qemu_img(d, &["snapshot", "-c", "second one", "q.qcow2"]).ok("create");
    let section = |s: &str| {
        s.split("Snapshot list:")
            .nth(1)
            .and_then(|t| t.split("Format specific").next())
            .map(str::to_string)
    };
    let qi = qemu_img(d, &["info", "q.qcow2"]).ok("qemu-img info");
    let oi = ours(d, &["info", "q.qcow2"]).ok("qcow2 info");
    assert!(section(&qi.stdout).is_some(), "{}", qi.stdout);
    assert_eq!(
        section(&qi.stdout),
        section(&oi.stdout),
        "info snapshot list"
    );
    // Applying is refused while the image has persistent bitmaps.
    qemu_img(d, &["bitmap", "--add", "q.qcow2", "b0"]).ok("bitmap add");
    copy(d, "q.qcow2", "o.qcow2");
    let q = qemu_img(d, &["snapshot", "-a", "a", "q.qcow2"]);
    let o = ours(d, &["snapshot", "-a", "a", "o.qcow2"]);
    assert_eq!(q.code, o.code);
    assert_eq!(
        norm(&q.stderr).replace("q.qcow2", "X"),
        norm(&o.stderr).replace("o.qcow2", "X")
    );
    // Creating one keeps the bitmaps, as in QEMU.
    qemu_img(d, &["snapshot", "-c", "b", "q.qcow2"]).ok("qemu create with bitmap");
    ours(d, &["snapshot", "-c", "b", "o.qcow2"]).ok("our create with bitmap");
    assert_qemu_check_clean(d, "o.qcow2", "bitmaps");
    let qi = qemu_img(d, &["info", "q.qcow2"]).ok("info");
    let oi = qemu_img(d, &["info", "o.qcow2"]).ok("info");
    let bm = |s: &str| {
        s.split("bitmaps:")
            .nth(1)
            .map(|t| t.split("refcount bits").next().unwrap_or("").to_string())
    };
    assert_eq!(bm(&qi.stdout), bm(&oi.stdout));
}

/// Snapshot tables and snapshot L1 tables with hostile values: every
/// operation fails or succeeds without a panic, a hang or a huge allocation,
/// and a failed apply / delete leaves the image as it was.
#[test]
fn hostile_snapshot_tables() {
    if !tools() {
        return;
    }
    let dir = tmpdir();
    let d = dir.path();
    qemu_create(d, "base.qcow2", 4 << 20, &ImgOpts::default(), None);
    qemu_io(d, &["-c", "write -P 1 0 128k", "base.qcow2"]).ok("qemu-io");
    qemu_img(d, &["snapshot", "-c", "s", "base.qcow2"]).ok("create");
    let bytes = std::fs::read(d.join("base.qcow2")).unwrap();
    let be64 = |b: &[u8], o: usize| u64::from_be_bytes(b[o..o + 8].try_into().unwrap());
    let sn = be64(&bytes, 64) as usize;
    let sn_l1 = be64(&bytes, sn) as usize;
    type Patch = Box<dyn Fn(&mut Vec<u8>)>;
    let cases: Vec<(&str, Patch)> = vec![
        (
            "huge l1_size",
            Box::new(move |b| b[sn + 8..sn + 12].copy_from_slice(&u32::MAX.to_be_bytes())),
        ),
        (
            "unaligned l1",
            Box::new(move |b| b[sn..sn + 8].copy_from_slice(&(sn_l1 as u64 + 8).to_be_bytes())),
        ),
        (
            "l1 past eof",
            Box::new(move |b| b[sn..sn + 8].copy_from_slice(&(1u64 << 40).to_be_bytes())),
        ),
        (
            "l2 past eof",
            Box::new(move |b| b[sn_l1..sn_l1 + 8].copy_from_slice(&(1u64 << 40).to_be_bytes())),
        ),
        (
            "l2 in header",
            Box::new(move |b| b[sn_l1..sn_l1 + 8].copy_from_slice(&512u64.to_be_bytes())),
        ),
        (
            "l2 on refcount table",
            Box::new(move |b| {
                let rt = u64::from_be_bytes(b[48..56].try_into().unwrap());
                b[sn_l1..sn_l1 + 8].copy_from_slice(&rt.to_be_bytes())
            }),
        ),
        (
            "active l2 on refcount table",
            Box::new(move |b| {
                let rt = u64::from_be_bytes(b[48..56].try_into().unwrap());
                let l1 = u64::from_be_bytes(b[40..48].try_into().unwrap()) as usize;
                b[l1..l1 + 8].copy_from_slice(&(rt | 1 << 63).to_be_bytes())
            }),
        ),
        (
            "table past eof",
            Box::new(|b| b[64..72].copy_from_slice(&(1u64 << 40).to_be_bytes())),
        ),
        (
            "many snapshots",
            Box::new(|b| b[60..64].copy_from_slice(&70000u32.to_be_bytes())),
        ),
        (
            "short extra",
            Box::new(move |b| b[sn + 36..sn + 40].copy_from_slice(&4u32.to_be_bytes())),
        ),
    ];
    for (what, patch) in cases {
        for args in [
            &["-l"][..],
            &["-a", "s"],
            &["-d", "s"],
            &["-c", "t"],
            &["-a", "1"],
        ] {
            let mut b = bytes.clone();
            patch(&mut b);
            std::fs::write(d.join("h.qcow2"), &b).unwrap();
            let mut a = vec!["snapshot"];
            a.extend_from_slice(args);
            a.push("h.qcow2");
            let t = std::time::Instant::now();
            let r = ours(d, &a);
            assert!(t.elapsed().as_secs() < 20, "{what} {args:?}: too slow");
            let after = std::fs::read(d.join("h.qcow2")).unwrap();
            let rt = be64(&b, 48) as usize;
            assert!(
                after[rt..rt + 512] == b[rt..rt + 512],
                "{what} {args:?}: refcount table written"
            );
            if r.code != 0 && args[0] != "-l" && args[0] != "-c" {
                // A refused apply / delete changed nothing the guest sees.
                let after = std::fs::read(d.join("h.qcow2")).unwrap();
                let same_header = after[..72] == b[..72];
                assert!(
                    same_header,
                    "{what} {args:?}: header changed by a failed operation"
                );
            }
        }
    }
}
