//! `qcow2 create` against `qemu-img create`: same "Formatting" line, same exit
//! status, and an image qemu-img checks clean and reports with the options.

mod common;
use common::*;
use std::path::Path;

#[derive(Debug)]
struct Case {
    args: Vec<String>,
}

fn info(dir: &Path, name: &str) -> serde_json::Value {
    let r = qemu_img(dir, &["info", "--output=json", name]).ok("qemu-img info");
    serde_json::from_str(&r.stdout).expect("json")
}

fn setup(dir: &Path) {
    qemu_create(dir, "base.qcow2", 3 << 20, &ImgOpts::default(), None);
    std::fs::write(dir.join("base.raw"), vec![7u8; 1536 * 1024]).expect("raw");
}

fn case(c: &Case) {
    let d = tmpdir();
    let qd = d.path().join("q");
    let od = d.path().join("o");
    std::fs::create_dir(&qd).expect("mkdir");
    std::fs::create_dir(&od).expect("mkdir");
    setup(&qd);
    setup(&od);
    let args: Vec<&str> = c.args.iter().map(String::as_str).collect();
    let mut qargs = vec!["create"];
    qargs.extend(&args);
    let q = qemu_img(&qd, &qargs);
    let o = ours(&od, &qargs);
    assert_eq!(
        o.code == 0,
        q.code == 0,
        "exit status: qcow2 {} ({}) vs qemu-img {} ({})",
        o.code,
        o.stderr,
        q.code,
        q.stderr
    );
    assert!(
        o.stdout == q.stdout,
        "stdout differs\n--- qcow2:\n{}--- qemu-img:\n{}",
        o.stdout,
        q.stdout
    );
    if q.code != 0 {
        assert!(!o.stderr.is_empty(), "no error message");
        return;
    }
    assert_qemu_check_clean(&od, "img.qcow2", "created image");
    let (qi, oi) = (info(&qd, "img.qcow2"), info(&od, "img.qcow2"));
    for k in [
        "virtual-size",
        "cluster-size",
        "format-specific",
        "backing-filename",
        "backing-filename-format",
        "full-backing-filename",
        "dirty-flag",
    ] {
        assert_eq!(oi.get(k), qi.get(k), "qemu-img info key {k}");
    }
    let (qm, om) = (qemu_map(&qd, "img.qcow2"), qemu_map(&od, "img.qcow2"));
    assert_eq!(
        map_without_offsets(&om),
        map_without_offsets(&qm),
        "fresh map"
    );
    // The new image must be usable by qemu-io (a 0-byte disk has nothing to write).
    if qemu_info_size(&qi) == Some(0) {
        return;
    }
    let w = qemu_io(
        &od,
        &["-c", "write -P 9 0 4k", "-c", "read -P 9 0 4k", "img.qcow2"],
    );
    assert_eq!(
        w.code, 0,
        "qemu-io on created image: {}{}",
        w.stdout, w.stderr
    );
    assert_qemu_check_clean(&od, "img.qcow2", "after qemu-io write");
}

fn c(args: &[&str]) -> Case {
    Case {
        args: args.iter().map(|s| s.to_string()).collect(),
    }
}

#[test]
fn create_matches_qemu() {
    let mut cases = Vec::new();
    for o in ImgOpts::matrix() {
        if o.cluster_size == 512 && o.refcount_bits != 16 {
            continue;
        }
        cases.push(c(&["-f", "qcow2", "-o", &o.o(), "img.qcow2", "256M"]));
    }
    // The option names one at a time, defaults, size syntax.
    for (o, size) in [
        ("compat=0.10", "1M"),
        ("compat=v2", "1M"),
        ("compat=v3", "1.5G"),
        ("compat=1.1", "5000"),
        ("cluster_size=4k", "1G"),
        ("cluster_size=2M,extended_l2=on", "1T"),
        ("refcount_bits=1", "1G"),
        ("refcount_bits=64", "1G"),
        ("lazy_refcounts=on", "1M"),
        ("lazy_refcounts", "1M"),
        ("compression_type=zstd", "1M"),
        ("extended_l2=on", "0x100000"),
        ("cluster_size=1M,cluster_size=4k", "1M"),
        ("size=3M", ""),
    ] {
        let mut a = vec!["-f", "qcow2", "-o", o, "img.qcow2"];
        if !size.is_empty() {
            a.push(size);
        }
        cases.push(c(&a));
    }
    cases.push(c(&["-f", "qcow2", "img.qcow2", "64T"]));
    cases.push(c(&["-f", "qcow2", "img.qcow2", "0"]));
    // Backing files, with and without a size.
    cases.push(c(&[
        "-f",
        "qcow2",
        "-b",
        "base.qcow2",
        "-F",
        "qcow2",
        "img.qcow2",
    ]));
    cases.push(c(&[
        "-f",
        "qcow2",
        "-b",
        "base.qcow2",
        "-F",
        "qcow2",
        "img.qcow2",
        "8M",
    ]));
    cases.push(c(&[
        "-f",
        "qcow2",
        "-b",
        "base.raw",
        "-F",
        "raw",
        "img.qcow2",
    ]));
    cases.push(c(&[
        "-f",
        "qcow2",
        "-o",
        "compat=0.10",
        "-b",
        "base.raw",
        "-F",
        "raw",
        "img.qcow2",
    ]));
    cases.push(c(&[
        "-f",
        "qcow2",
        "-b",
        "base.qcow2",
        "-F",
        "qcow2",
        "-o",
        "cluster_size=4k,extended_l2=off",
        "img.qcow2",
        "1M",
    ]));
    // Errors.
    for (o, size) in [
        ("compat=0.10,lazy_refcounts=on", "1M"),
        ("compat=0.10,refcount_bits=64", "1M"),
        ("compat=0.10,extended_l2=on", "1M"),
        ("compat=0.10,compression_type=zstd", "1M"),
        ("cluster_size=4k,extended_l2=on", "1M"),
        ("cluster_size=3000", "1M"),
        ("cluster_size=4M", "1M"),
        ("refcount_bits=3", "1M"),
        ("refcount_bits=128", "1M"),
        ("compat=1.2", "1M"),
        ("foo=bar", "1M"),
        ("compression_type=lz4", "1M"),
        ("lazy_refcounts=maybe", "1M"),
        ("compat=1.1", "1x"),
        ("compat=1.1", "8E"),
        ("compat=1.1", ""),
    ] {
        let mut a = vec!["-f", "qcow2", "-o", o, "img.qcow2"];
        if !size.is_empty() {
            a.push(size);
        }
        cases.push(c(&a));
    }
    cases.push(c(&[
        "-f",
        "qcow2",
        "-b",
        "nonexistent.qcow2",
        "-F",
        "qcow2",
        "img.qcow2",
        "1M",
    ]));
    cases.push(c(&["-f", "qcow2", "-b", "base.qcow2", "img.qcow2", "1M"]));
    let failures = run_cases(&cases, workers(), case);
    assert_no_failures("create_matches_qemu", cases.len(), &failures);
}

fn qemu_info_size(info: &serde_json::Value) -> Option<u64> {
    info.get("virtual-size").and_then(|v| v.as_u64())
}
