//! `qcow2 info` must print what `qemu-img info` prints for the same file.

mod common;
use common::*;

fn keys_equal(ours: &serde_json::Value, qemu: &serde_json::Value, ctx: &str) {
    for k in [
        "virtual-size",
        "filename",
        "cluster-size",
        "format",
        "actual-size",
        "format-specific",
        "backing-filename",
        "full-backing-filename",
        "backing-filename-format",
        "dirty-flag",
    ] {
        assert_eq!(ours.get(k), qemu.get(k), "{ctx}: key {k} differs");
    }
}

#[derive(Debug)]
struct Case {
    o: ImgOpts,
    backing: Option<(&'static str, &'static str)>,
    size: u64,
}

fn case(c: &Case) {
    let d = tmpdir();
    let dir = d.path();
    std::fs::create_dir(dir.join("sub")).expect("mkdir");
    let mut name = "img.qcow2";
    if let Some((b, f)) = c.backing {
        if f == "raw" {
            std::fs::write(dir.join("base.raw"), vec![1u8; 3 << 16]).expect("raw");
        } else {
            qemu_create(dir, "base.qcow2", 1 << 20, &ImgOpts::default(), None);
        }
        if b.starts_with("../") {
            name = "sub/img.qcow2";
        }
        qemu_create(dir, name, c.size, &c.o, Some((b, f)));
    } else {
        qemu_create(dir, name, c.size, &c.o, None);
    }
    qemu_io_script(dir, name, "qcow2", &["write -P 3 0 4k".to_string()]).ok("qemu-io");
    // actual-size (st_blocks) can still change while the file system settles
    // delayed allocation: take a reading bracketed by two equal qemu readings.
    let _ = std::process::Command::new("sync").status();
    let (mut q, mut r);
    let mut tries = 0;
    loop {
        q = qemu_img(dir, &["info", "--output=json", name]).ok("qemu-img info");
        r = ours(dir, &["info", "--output=json", name]);
        let q2 = qemu_img(dir, &["info", "--output=json", name]).ok("qemu-img info");
        tries += 1;
        if q2.stdout == q.stdout || tries == 5 {
            break;
        }
    }
    assert_eq!(r.code, 0, "qcow2 info failed: {}", r.stderr);
    let qv: serde_json::Value = serde_json::from_str(&q.stdout).expect("qemu json");
    let ov: serde_json::Value = serde_json::from_str(&r.stdout).expect("our json");
    keys_equal(&ov, &qv, "json keys");
    assert!(
        r.stdout == q.stdout,
        "json text differs\n--- qcow2:\n{}--- qemu-img:\n{}",
        r.stdout,
        q.stdout
    );
    let qh = qemu_img(dir, &["info", name]).ok("qemu-img info");
    let oh = ours(dir, &["info", name]);
    assert!(
        oh.stdout == qh.stdout,
        "human text differs\n--- qcow2:\n{}--- qemu-img:\n{}",
        oh.stdout,
        qh.stdout
    );
}

#[test]
fn info_json_matches_qemu() {
    let mut cases = Vec::new();
    for o in ImgOpts::matrix()
        .into_iter()
        .filter(|o| o.cluster_size != 512 || o.refcount_bits == 16)
    {
        cases.push(Case {
            o,
            backing: None,
            size: 64 << 20,
        });
    }
    for lazy in [false, true] {
        let o = ImgOpts {
            lazy_refcounts: lazy,
            ..ImgOpts::default()
        };
        cases.push(Case {
            o,
            backing: None,
            size: 5000,
        });
    }
    for compat in ["0.10", "1.1"] {
        let o = ImgOpts {
            compat,
            ..ImgOpts::default()
        };
        cases.push(Case {
            o: o.clone(),
            backing: Some(("base.qcow2", "qcow2")),
            size: 2 << 20,
        });
        cases.push(Case {
            o: o.clone(),
            backing: Some(("base.raw", "raw")),
            size: 2 << 20,
        });
        cases.push(Case {
            o,
            backing: Some(("../base.qcow2", "qcow2")),
            size: 2 << 20,
        });
    }
    let failures = run_cases(&cases, workers(), case);
    assert_no_failures("info_json_matches_qemu", cases.len(), &failures);
}
