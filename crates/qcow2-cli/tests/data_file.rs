//! External data files (`-o data_file=...[,data_file_raw=on]`) against
//! QEMU: the same qemu-io script through qemu-io and `qcow2 io` on copies
//! of one image made by qemu-img (each copy in its own directory, the data
//! file named relative to it): same output, image and data file byte for
//! byte equal, `qemu-img map` / `check` equal; `qcow2 create` against
//! qemu-img create; `qcow2 info` / `map` / `check` output against qemu-img's;
//! the errors QEMU gives.
//! Needs qemu-img and qemu-io (missing: fails under CI, else "skipped").

mod common;
use common::*;
use std::path::Path;

fn tools() -> bool {
    tool_or_skip("qemu-img", &["--version"], "data_file")
        && tool_or_skip("qemu-io", &["--version"], "data_file")
}

const SCRIPT: &[&str] = &[
    "write -P 0x11 0 64k",
    "write -P 0x22 100k 8k",
    "write -P 0x33 200000 3000",
    "write -z 1M 64k",
    "write -z 2100000 5000",
    "write -c 2M 64k",
    "discard 0 64k",
    "write -P 0x44 3M 1000",
    "read -P 0x22 100k 8k",
    "read -P 0 0 64k",
    "read -P 0x33 200000 3000",
    "read -P 0x44 3M 1000",
    "map",
];

fn files_equal(a: &Path, b: &Path, what: &str) {
    let (x, y) = (std::fs::read(a).unwrap(), std::fs::read(b).unwrap());
    assert!(x == y, "{what}: {} and {} differ", a.display(), b.display());
}

/// `base` (in `dir`/base/, data file `d.raw`) copied to q/ and o/; the
/// script run through qemu-io in q/ and `qcow2 io` in o/.
fn script_case(dir: &Path, what: &str, image: &str) {
    let (q, o) = (dir.join("q"), dir.join("o"));
    for d in [&q, &o] {
        let _ = std::fs::remove_dir_all(d);
        std::fs::create_dir(d).unwrap();
        for f in ["a.qcow2", "d.raw", "b.qcow2"] {
            let src = dir.join("base").join(f);
            if src.exists() {
                std::fs::copy(&src, d.join(f)).unwrap();
            }
        }
    }
    let mut args: Vec<&str> = Vec::new();
    for c in SCRIPT {
        args.push("-c");
        args.push(c);
    }
    args.push(image);
    let rq = qemu_io(&q, &args);
    let mut oa = vec!["io"];
    oa.extend(&args);
    let ro = ours(&o, &oa);
    assert_same_run(&rq, &ro, "qemu-io", what);
    files_equal(&q.join("a.qcow2"), &o.join("a.qcow2"), what);
    files_equal(&q.join("d.raw"), &o.join("d.raw"), what);
    for args in [
        vec!["map", "--output=json", "a.qcow2"],
        vec!["map", "a.qcow2"],
        vec!["check", "a.qcow2"],
        vec!["info", "a.qcow2"],
        vec!["info", "--output=json", "a.qcow2"],
    ] {
        assert_same_as_qemu_img(&o, &args, what);
    }
}

#[test]
fn scripts_match_qemu_io_byte_for_byte() {
    if !tools() {
        return;
    }
    let d = tmpdir();
    let dir = d.path();
    let base = dir.join("base");
    for (what, opts, backing) in [
        ("plain", "data_file=d.raw", false),
        (
            "extended_l2",
            "data_file=d.raw,extended_l2=on,cluster_size=32k",
            false,
        ),
        ("raw", "data_file=d.raw,data_file_raw=on", false),
        ("backing", "data_file=d.raw", true),
    ] {
        let _ = std::fs::remove_dir_all(&base);
        std::fs::create_dir(&base).unwrap();
        let mut args = vec!["create", "-q", "-f", "qcow2", "-o", opts];
        if backing {
            qemu_img(&base, &["create", "-q", "-f", "qcow2", "b.qcow2", "4M"]).ok("backing");
            qemu_io(&base, &["-c", "write -P 0x77 0 4M", "b.qcow2"]).ok("fill backing");
            args.extend(["-b", "b.qcow2", "-F", "qcow2"]);
        }
        args.extend(["a.qcow2", "4M"]);
        qemu_img(&base, &args).ok("qemu-img create");
        script_case(dir, what, "a.qcow2");
        // The data file named by an option (QEMU's `data-file`).
        script_case(
            dir,
            &format!("{what} (json)"),
            r#"json:{"driver":"qcow2","file":{"driver":"file","filename":"a.qcow2"},"data-file":{"driver":"file","filename":"d.raw"}}"#,
        );
    }
}

#[test]
fn create_matches_qemu() {
    if !tools() {
        return;
    }
    let d = tmpdir();
    let dir = d.path();
    for (i, opts) in [
        "data_file=d.raw",
        "data_file=d.raw,data_file_raw=on",
        "data_file=d.raw,extended_l2=on",
        "data_file=d.raw,preallocation=metadata",
    ]
    .iter()
    .enumerate()
    {
        let (q, o) = (dir.join(format!("q{i}")), dir.join(format!("o{i}")));
        std::fs::create_dir(&q).unwrap();
        std::fs::create_dir(&o).unwrap();
        // The data file exists with other content: it is emptied.
        std::fs::write(q.join("d.raw"), b"old").unwrap();
        std::fs::write(o.join("d.raw"), b"old").unwrap();
        let rq = qemu_img(&q, &["create", "-f", "qcow2", "-o", opts, "a.qcow2", "3M"]);
        let ro = ours(&o, &["create", "-f", "qcow2", "-o", opts, "a.qcow2", "3M"]);
        assert_eq!(
            (rq.code, &rq.stdout, &rq.stderr),
            (ro.code, &ro.stdout, &ro.stderr),
            "{opts}"
        );
        files_equal(&q.join("d.raw"), &o.join("d.raw"), opts);
        for args in [
            vec!["info", "--output=json", "a.qcow2"],
            vec!["map", "--output=json", "a.qcow2"],
            vec!["check", "a.qcow2"],
        ] {
            let a = qemu_img(&q, &args);
            let b = qemu_img(&o, &args);
            let norm = |s: &str| {
                s.lines()
                    .filter(|l| {
                        !l.contains("actual-size")
                            && !l.contains("\"virtual-size\"")
                            && !l.contains("Image end offset")
                    })
                    .collect::<Vec<_>>()
                    .join("\n")
            };
            assert_eq!(norm(&a.stdout), norm(&b.stdout), "{opts}: {args:?}");
        }
        // Usable by QEMU.
        let r = qemu_io(
            &o,
            &[
                "-c",
                "write -P 5 0 128k",
                "-c",
                "read -P 5 0 128k",
                "a.qcow2",
            ],
        )
        .ok("qemu-io");
        assert!(!r.stdout.contains("fail"), "{opts}: {}", r.stdout);
    }
}

#[test]
fn errors_match_qemu() {
    if !tools() {
        return;
    }
    let d = tmpdir();
    let dir = d.path();
    qemu_img(dir, &["create", "-q", "-f", "qcow2", "b.qcow2", "1M"]).ok("backing");
    for opts in [
        "data_file_raw=on",
        "data_file=x.raw,compat=0.10",
        "data_file=x.raw,data_file_raw=on,backing_file=b.qcow2,backing_fmt=qcow2",
    ] {
        let q = qemu_img(dir, &["create", "-f", "qcow2", "-o", opts, "e.qcow2", "1M"]);
        let o = ours(dir, &["create", "-f", "qcow2", "-o", opts, "e.qcow2", "1M"]);
        assert_same_run(&q, &o, "qemu-img", opts);
    }
    // A missing data file, and operations the format forbids.
    qemu_img(
        dir,
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            "data_file=m.raw",
            "m.qcow2",
            "1M",
        ],
    )
    .ok("create");
    std::fs::rename(dir.join("m.raw"), dir.join("m.bak")).unwrap();
    let q = qemu_io(dir, &["-c", "read 0 512", "m.qcow2"]);
    let o = ours(dir, &["io", "-c", "read 0 512", "m.qcow2"]);
    assert_eq!(
        (q.code, q.stderr.replace("qemu-io:", "qcow2:")),
        (o.code, o.stderr)
    );
    std::fs::rename(dir.join("m.bak"), dir.join("m.raw")).unwrap();
    let q = qemu_img(dir, &["snapshot", "-c", "s", "m.qcow2"]);
    let o = ours(dir, &["snapshot", "-c", "s", "m.qcow2"]);
    assert_eq!(
        (q.code, q.stderr.replace("qemu-img:", "qcow2:")),
        (o.code, o.stderr)
    );
}
