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

/// Rewrites the last entry of the snapshot table: guest clock, a large VM
/// state size and, with `drop_icount`, extra data cut to 16 bytes (no
/// icount), as an older QEMU would have written it.
fn edit_last_snapshot(
    path: &std::path::Path,
    vm_clock_nsec: u64,
    vm_state: u64,
    drop_icount: bool,
) {
    let mut f = std::fs::read(path).expect("read image");
    let be32 = |b: &[u8], o: usize| u32::from_be_bytes(b[o..o + 4].try_into().expect("4"));
    let be16 = |b: &[u8], o: usize| u16::from_be_bytes(b[o..o + 2].try_into().expect("2"));
    let n = be32(&f, 60) as usize;
    let mut off = u64::from_be_bytes(f[64..72].try_into().expect("8")) as usize;
    for _ in 0..n - 1 {
        let len = 40
            + be32(&f, off + 36) as usize
            + be16(&f, off + 12) as usize
            + be16(&f, off + 14) as usize;
        off += len.div_ceil(8) * 8;
    }
    f[off + 24..off + 32].copy_from_slice(&vm_clock_nsec.to_be_bytes());
    assert!(
        be32(&f, off + 36) >= 16,
        "extra data holds vm_state_size_large"
    );
    f[off + 40..off + 48].copy_from_slice(&vm_state.to_be_bytes());
    if drop_icount {
        assert!(be32(&f, off + 36) >= 24, "extra data holds icount");
        // Move id and name down over the icount field.
        let (id, name) = (be16(&f, off + 12) as usize, be16(&f, off + 14) as usize);
        let extra = be32(&f, off + 36) as usize;
        let strings = f[off + 40 + extra..off + 40 + extra + id + name].to_vec();
        f[off + 56..off + 56 + id + name].copy_from_slice(&strings);
        f[off + 36..off + 40].copy_from_slice(&16u32.to_be_bytes());
    }
    std::fs::write(path, f).expect("write image");
}

#[derive(Debug)]
struct SnapCase {
    compat: &'static str,
    /// Snapshot names; a name starting with '+' is created by `qcow2 snapshot`.
    names: &'static [&'static str],
    /// Edit the last entry (clock, VM state size, no icount).
    edit: Option<bool>,
}

fn snap_case(c: &SnapCase) {
    let d = tmpdir();
    let dir = d.path();
    let o = ImgOpts {
        compat: c.compat,
        ..ImgOpts::default()
    };
    qemu_create(dir, "img.qcow2", 8 << 20, &o, None);
    for (i, n) in c.names.iter().enumerate() {
        qemu_io_script(
            dir,
            "img.qcow2",
            "qcow2",
            &[format!("write -P {} {} 64k", i + 1, i << 16)],
        )
        .ok("qemu-io");
        match n.strip_prefix('+') {
            Some(n) => {
                let r = ours(dir, &["snapshot", "-c", n, "img.qcow2"]);
                assert_eq!(r.code, 0, "qcow2 snapshot -c: {}", r.stderr);
            }
            None => {
                qemu_img(dir, &["snapshot", "-c", n, "img.qcow2"]).ok("qemu-img snapshot");
            }
        }
    }
    if let Some(drop_icount) = c.edit {
        edit_last_snapshot(
            &dir.join("img.qcow2"),
            3_723_456_789_012,
            123_456_789,
            drop_icount,
        );
    }
    let _ = std::process::Command::new("sync").status();
    for args in [
        &["info", "--output=json", "img.qcow2"][..],
        &["info", "img.qcow2"][..],
    ] {
        let (mut q, mut r);
        let mut tries = 0;
        loop {
            q = qemu_img(dir, args).ok("qemu-img info");
            r = ours(dir, args);
            let q2 = qemu_img(dir, args).ok("qemu-img info");
            tries += 1;
            if q2.stdout == q.stdout || tries == 5 {
                break;
            }
        }
        assert_eq!(r.code, 0, "qcow2 {args:?} failed: {}", r.stderr);
        assert!(
            q.stdout.contains("snapshots") || q.stdout.contains("Snapshot list:"),
            "qemu lists no snapshots:\n{}",
            q.stdout
        );
        assert!(
            r.stdout == q.stdout,
            "{args:?} differs\n--- qcow2:\n{}--- qemu-img:\n{}",
            r.stdout,
            q.stdout
        );
    }
}

#[test]
fn info_snapshots_match_qemu() {
    let mut cases = Vec::new();
    for compat in ["0.10", "1.1"] {
        cases.push(SnapCase {
            compat,
            names: &["one"],
            edit: None,
        });
        cases.push(SnapCase {
            compat,
            names: &["s 1", "+ours", "b\u{e4}se \"q\""],
            edit: None,
        });
        cases.push(SnapCase {
            compat,
            names: &["a", "b"],
            edit: Some(false),
        });
        cases.push(SnapCase {
            compat,
            names: &["a", "+b", "c"],
            edit: Some(true),
        });
    }
    let failures = run_cases(&cases, workers(), snap_case);
    assert_no_failures("info_snapshots_match_qemu", cases.len(), &failures);
}

/// Marks the first bitmap of the directory in use, as a crash leaves it.
fn mark_first_bitmap_in_use(path: &std::path::Path) {
    let mut f = std::fs::read(path).expect("read image");
    let be32 = |b: &[u8], o: usize| u32::from_be_bytes(b[o..o + 4].try_into().expect("4"));
    let mut off = be32(&f, 100) as usize;
    let dir = loop {
        let (kind, len) = (be32(&f, off), be32(&f, off + 4) as usize);
        assert_ne!(kind, 0, "no bitmaps extension");
        if kind == 0x2385_2875 {
            let d = off + 8 + 16;
            break u64::from_be_bytes(f[d..d + 8].try_into().expect("8")) as usize;
        }
        off += 8 + len.div_ceil(8) * 8;
    };
    let flags = be32(&f, dir + 12) | 1;
    f[dir + 12..dir + 16].copy_from_slice(&flags.to_be_bytes());
    std::fs::write(path, f).expect("write image");
}

/// Persistent bitmaps appear in the format-specific data (JSON and human
/// text) as qemu-img shows them: flags, name, granularity.
#[test]
fn info_bitmaps_match_qemu() {
    let d = tmpdir();
    let dir = d.path();
    let mut names = Vec::new();
    for (i, (cs, bitmaps, in_use)) in [
        (65536u64, &[][..], false),
        (
            65536,
            &[("b0", "-g", "128k", true), ("b 1", "-g", "64k", false)][..],
            false,
        ),
        (4096, &[("x", "-g", "4k", true)][..], true),
        (
            65536,
            &[("a", "-g", "1M", false), ("b", "-g", "512", true)][..],
            true,
        ),
    ]
    .into_iter()
    .enumerate()
    {
        let name = format!("img{i}.qcow2");
        let o = ImgOpts {
            cluster_size: cs,
            ..ImgOpts::default()
        };
        qemu_create(dir, &name, 4 << 20, &o, None);
        for (b, g, gv, enabled) in bitmaps {
            let mut args = vec!["bitmap", "--add", g, gv];
            if !enabled {
                args.push("--disable");
            }
            args.extend([name.as_str(), b]);
            qemu_img(dir, &args).ok("qemu-img bitmap --add");
        }
        if !bitmaps.is_empty() {
            qemu_io_script(dir, &name, "qcow2", &["write -P 1 0 64k".into()]).ok("qemu-io");
        }
        if in_use {
            mark_first_bitmap_in_use(&dir.join(&name));
        }
        names.push(name);
    }
    let _ = std::process::Command::new("sync").status();
    for name in &names {
        for args in [
            &["info", "--output=json", name.as_str()][..],
            &["info", name.as_str()][..],
        ] {
            let (mut q, mut r);
            let mut tries = 0;
            loop {
                q = qemu_img(dir, args).ok("qemu-img info");
                r = ours(dir, args);
                let q2 = qemu_img(dir, args).ok("qemu-img info");
                tries += 1;
                if q2.stdout == q.stdout || tries == 5 {
                    break;
                }
            }
            assert_eq!(r.code, 0, "qcow2 {args:?}: {}", r.stderr);
            assert!(
                r.stdout == q.stdout,
                "{args:?} differs\n--- qcow2:\n{}--- qemu-img:\n{}",
                r.stdout,
                q.stdout
            );
        }
    }
}
