//! The same qemu-io script run by qemu-io and by `qcow2 io` on two copies of
//! one image: same per-command result lines and exit status, same guest
//! content (`qemu-img compare`), same allocation map apart from host
//! offsets, and our image clean for `qemu-img check`.

mod common;
use common::*;

#[derive(Debug, Clone, Copy)]
enum Back {
    None,
    Qcow2,
    Raw,
}

#[derive(Debug)]
struct Case {
    name: &'static str,
    o: ImgOpts,
    back: Back,
    size: u64,
    prefill: Vec<String>,
    script: Vec<String>,
    extra: Vec<&'static str>,
}

fn s(v: &[&str]) -> Vec<String> {
    v.iter().map(|x| x.to_string()).collect()
}

fn case(c: &Case) {
    let d = tmpdir();
    let dir = d.path();
    match c.back {
        Back::None => qemu_create(dir, "img.qcow2", c.size, &c.o, None),
        Back::Qcow2 => {
            qemu_create(
                dir,
                "base.qcow2",
                c.size / 2,
                &ImgOpts {
                    compat: c.o.compat,
                    ..ImgOpts::default()
                },
                None,
            );
            qemu_io_script(
                dir,
                "base.qcow2",
                "qcow2",
                &s(&[
                    "write -P 0xb0 0 256k",
                    "write -z 256k 64k",
                    "write -P 0xb1 384k 64k",
                ]),
            )
            .ok("fill base");
            qemu_create(
                dir,
                "img.qcow2",
                c.size,
                &c.o,
                Some(("base.qcow2", "qcow2")),
            );
        }
        Back::Raw => {
            raw_backing(
                dir,
                "base.raw",
                c.size / 2 + 4096,
                &s(&["write -P 0xb2 0 256k", "write -z 256k 64k"]),
            );
            qemu_create(dir, "img.qcow2", c.size, &c.o, Some(("base.raw", "raw")));
        }
    }
    if !c.prefill.is_empty() {
        qemu_io_script(dir, "img.qcow2", "qcow2", &c.prefill).ok("prefill");
    }
    copy(dir, "img.qcow2", "q.qcow2");
    copy(dir, "img.qcow2", "o.qcow2");
    let mut qargs: Vec<&str> = vec!["-f", "qcow2"];
    qargs.extend(c.extra.iter().copied());
    for cmd in &c.script {
        qargs.push("-c");
        qargs.push(cmd);
    }
    qargs.push("q.qcow2");
    let q = qemu_io(dir, &qargs);
    let mut oargs: Vec<&str> = vec!["-f", "qcow2"];
    oargs.extend(c.extra.iter().copied());
    let o = ours_io_script(dir, "o.qcow2", &oargs, &c.script);
    let (ql, ol) = (result_lines(&q.stdout), result_lines(&o.stdout));
    for (i, (a, b)) in ol.iter().zip(ql.iter()).enumerate() {
        assert!(a == b, "{}: output line {i} differs:\n  qcow2: {a}\n  qemu:  {b}\n--- qcow2 stdout:\n{}\n--- stderr:\n{}", c.name, o.stdout, o.stderr);
    }
    assert_eq!(
        ol.len(),
        ql.len(),
        "{}: number of output lines\n--- qcow2:\n{}--- qemu-io:\n{}",
        c.name,
        o.stdout,
        q.stdout
    );
    assert_eq!(
        o.code, q.code,
        "{}: exit status; stderr: {}",
        c.name, o.stderr
    );
    let cmp = qemu_img(
        dir,
        &[
            "compare", "-f", "qcow2", "-F", "qcow2", "q.qcow2", "o.qcow2",
        ],
    );
    assert_eq!(
        cmp.code, 0,
        "{}: guest content differs: {}{}",
        c.name, cmp.stdout, cmp.stderr
    );
    let (qm, om) = (qemu_map(dir, "q.qcow2"), qemu_map(dir, "o.qcow2"));
    assert!(
        map_without_offsets(&om) == map_without_offsets(&qm),
        "{}: allocation map differs\n--- after qcow2 io:\n{}--- after qemu-io:\n{}",
        c.name,
        om,
        qm
    );
    assert_qemu_check_clean(dir, "o.qcow2", c.name);
}

/// Data, compressed data and zeroes laid out for the zeroing scripts (64 KiB units).
fn prefill64k() -> Vec<String> {
    s(&[
        "write -P 0x11 0 1M",
        "write -c -P 0x22 1M 64k",
        "write -c -P 0x23 1088k 64k",
        "write -z 1152k 64k",
        "write -P 0x24 1216k 64k",
        "write -z 1216k 64k",
    ])
}

fn zero_script() -> Vec<String> {
    s(&[
        "write -z 0 64k",
        "write -z -u 64k 64k",
        "write -z 128k 32k",
        "write -z -n 192k 32k",
        "write -z -n 256k 64k",
        "write -z -u -n 320k 64k",
        "write -z -u 1M 64k",
        "write -z 1088k 16k",
        "write -z 1152k 64k",
        "write -z -u 1152k 64k",
        "write -z 1216k 64k",
        "write -z -u 1216k 64k",
        "write -z 1536k 128k",
        "write -z -u 1664k 64k",
        "write -z 0 64k",
        "write -z -u 0 64k",
        "write -z 400k 300k",
        "write -z -f 768k 64k",
        "read -P 0 0 256k",
        "read -P 0x11 448k 1k",
        "read -P 0 1M 64k",
    ])
}

fn discard_script() -> Vec<String> {
    s(&[
        "discard 0 64k",
        "discard 64k 1k",
        "d 96k 64k",
        "discard 1M 64k",
        "discard 1152k 128k",
        "discard 1536k 64k",
        "discard 512k 256k",
        "read -P 0 0 64k",
        "read -P 0x11 64k 32k",
        "read -P 0 512k 256k",
    ])
}

fn basic_script() -> Vec<String> {
    s(&[
        "write -P 1 0 64k",
        "w -P 2 100k 10k",
        "write 1000 3000",
        "write -P 0x33 1M 1536k",
        "read -P 1 0 1000",
        "r -P 0xcd 1000 3000",
        "read -P 2 100k 10k",
        "read -P 0 200k 4k",
        "read -P 7 0 1k",
        "read -P 0x33 -s 1k -l 2k 1M 4k",
        "read -q -P 0x33 1M 4k",
        "write -q -P 4 2M 4k",
        "read 0 0",
        "write 4M 1",
        "read 4194303 2",
        "read 0 3G",
        "write abc 1",
        "write 0 1x",
        "write -P 300 0 1",
        "write -u 0 4k",
        "write -z -P 1 0 4k",
        "read 0",
        "frob",
        "flush",
        "f",
        "read -P 4 2M 4k",
    ])
}

#[test]
fn io_matches_qemu() {
    let v3 = ImgOpts::default();
    let v2 = ImgOpts {
        compat: "0.10",
        ..ImgOpts::default()
    };
    let ext = ImgOpts {
        extended_l2: true,
        ..ImgOpts::default()
    };
    let mb4 = 4 << 20;
    let mut cases = Vec::new();
    let mk = |name,
              o: &ImgOpts,
              back,
              prefill: Vec<String>,
              script: Vec<String>,
              extra: Vec<&'static str>| Case {
        name,
        o: o.clone(),
        back,
        size: mb4,
        prefill,
        script,
        extra,
    };
    cases.push(mk(
        "basic v3",
        &v3,
        Back::None,
        vec![],
        basic_script(),
        vec![],
    ));
    cases.push(mk(
        "basic v2",
        &v2,
        Back::None,
        vec![],
        basic_script(),
        vec![],
    ));
    cases.push(mk(
        "basic ext-l2",
        &ext,
        Back::None,
        vec![],
        basic_script(),
        vec![],
    ));
    cases.push(mk(
        "basic v3 backing",
        &v3,
        Back::Qcow2,
        vec![],
        basic_script(),
        vec![],
    ));
    for (n, o) in [("v3", &v3), ("v2", &v2), ("ext-l2", &ext)] {
        let names: [(
            &'static str,
            &'static str,
            &'static str,
            &'static str,
            &'static str,
            &'static str,
        ); 1] = [(
            match n {
                "v3" => "zero v3",
                "v2" => "zero v2",
                _ => "zero ext-l2",
            },
            match n {
                "v3" => "zero v3 backing",
                "v2" => "zero v2 backing",
                _ => "zero ext-l2 backing",
            },
            match n {
                "v3" => "zero v3 raw backing",
                "v2" => "zero v2 raw backing",
                _ => "zero ext-l2 raw backing",
            },
            match n {
                "v3" => "discard v3",
                "v2" => "discard v2",
                _ => "discard ext-l2",
            },
            match n {
                "v3" => "discard v3 backing",
                "v2" => "discard v2 backing",
                _ => "discard ext-l2 backing",
            },
            match n {
                "v3" => "zero v3 -d ignore",
                "v2" => "zero v2 -d ignore",
                _ => "zero ext-l2 -d ignore",
            },
        )];
        let (z, zb, zr, di, db, zi) = names[0];
        cases.push(mk(z, o, Back::None, prefill64k(), zero_script(), vec![]));
        cases.push(mk(
            zb,
            o,
            Back::Qcow2,
            s(&["write -P 0x11 448k 64k", "write -c -P 0x22 1M 64k"]),
            zero_script(),
            vec![],
        ));
        cases.push(mk(
            zr,
            o,
            Back::Raw,
            s(&["write -P 0x11 448k 64k"]),
            zero_script(),
            vec![],
        ));
        cases.push(mk(
            di,
            o,
            Back::None,
            prefill64k(),
            discard_script(),
            vec![],
        ));
        cases.push(mk(
            db,
            o,
            Back::Qcow2,
            s(&["write -P 0x11 64k 64k", "write -c -P 0x22 1M 64k"]),
            discard_script(),
            vec![],
        ));
        cases.push(mk(
            zi,
            o,
            Back::None,
            prefill64k(),
            [zero_script(), discard_script()].concat(),
            vec!["-d", "ignore"],
        ));
    }
    // Subclusters: 2 KiB subclusters of a 64 KiB cluster.
    let sub = s(&[
        "write -P 1 0 4k",
        "write -z 2k 2k",
        "write -z 5k 1k",
        "write -z 8k 4k",
        "write -z -u 16k 2k",
        "write -z -n 20k 1k",
        "write -z -n 24k 2k",
        "write -P 2 66k 2k",
        "discard 64k 64k",
        "write -z 130k 4k",
        "write -z -u 192k 64k",
        "read -P 0 2k 2k",
        "read -P 1 0 2k",
    ]);
    cases.push(mk(
        "subclusters",
        &ext,
        Back::None,
        vec![],
        sub.clone(),
        vec![],
    ));
    cases.push(mk(
        "subclusters backing",
        &ext,
        Back::Qcow2,
        vec![],
        sub.clone(),
        vec![],
    ));
    let ext2m = ImgOpts {
        extended_l2: true,
        cluster_size: 2 << 20,
        ..ImgOpts::default()
    };
    cases.push(Case {
        size: 8 << 20,
        ..mk("subclusters 2M", &ext2m, Back::None, vec![], sub, vec![])
    });
    // Other cluster sizes and refcount widths, partial clusters, compressed clusters.
    let partial = s(&[
        "write -P 1 0 1536",
        "write -P 2 3k 5k",
        "write -z 256 256",
        "write -z 4k 512",
        "write -z -u 8k 8k",
        "write -P 4 66k 1k",
        "write -z 96k 32k",
        "discard 128k 64k",
        "write -z -u 200k 100k",
    ]);
    for (n, cs, rb) in [
        ("partial 512", 512u64, 16u32),
        ("partial 4k rb1", 4096, 1),
        ("partial 2M rb64", 2 << 20, 64),
    ] {
        let o = ImgOpts {
            cluster_size: cs,
            refcount_bits: rb,
            ..ImgOpts::default()
        };
        let c_off = cs.max(65536);
        let pre = vec![
            "write -P 9 0 32k".to_string(),
            format!("write -c -P 3 {c_off} {cs}"),
        ];
        cases.push(mk(n, &o, Back::None, pre, partial.clone(), vec![]));
    }
    cases.push(mk(
        "partial v2 backing",
        &v2,
        Back::Qcow2,
        s(&["write -c -P 3 64k 64k"]),
        partial.clone(),
        vec![],
    ));
    cases.push(mk(
        "read-only",
        &v3,
        Back::None,
        s(&["write -P 5 0 64k"]),
        s(&[
            "read -P 5 0 64k",
            "write 0 4k",
            "write -z 0 4k",
            "discard 0 64k",
            "flush",
        ]),
        vec!["-r"],
    ));
    cases.push(mk(
        "writeback",
        &v3,
        Back::None,
        vec![],
        basic_script(),
        vec!["-t", "writeback"],
    ));
    cases.push(mk(
        "unsafe",
        &v3,
        Back::None,
        prefill64k(),
        zero_script(),
        vec!["-t", "unsafe"],
    ));
    let failures = run_cases(&cases, workers(), case);
    assert_no_failures("io_matches_qemu", cases.len(), &failures);
}
