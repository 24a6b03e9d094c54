//! `qcow2 check` against `qemu-img check` on clean images and on images with
//! planted leaks and corruptions: same counts, same output, same exit status;
//! repairs leave images qemu-img calls clean.

mod common;
use common::*;
use std::path::Path;

#[derive(Debug, Clone, Copy, PartialEq)]
enum Damage {
    Clean,
    Leaks,
    Corruption,
    Both,
}

#[derive(Debug)]
struct Case {
    o: ImgOpts,
    damage: Damage,
    repair: Option<&'static str>,
}

fn json_without(s: &str, drop: &[&str]) -> serde_json::Value {
    let mut v: serde_json::Value =
        serde_json::from_str(s).unwrap_or_else(|e| panic!("bad json {e}: {s}"));
    if let Some(m) = v.as_object_mut() {
        for k in drop {
            m.remove(*k);
        }
    }
    v
}

fn make(dir: &Path, c: &Case) {
    let cs = c.o.cluster_size;
    qemu_create(dir, "img.qcow2", 16 * cs, &c.o, None);
    qemu_io_script(
        dir,
        "img.qcow2",
        "qcow2",
        &fill_script(cs, c.o.compat == "1.1"),
    )
    .ok("qemu-io fill");
    let path = dir.join("img.qcow2");
    if matches!(c.damage, Damage::Leaks | Damage::Both) {
        plant_leaks(&path, 2);
    }
    if matches!(c.damage, Damage::Corruption | Damage::Both) {
        let map = qemu_map(dir, "img.qcow2");
        let idx = first_data_cluster(&map, cs).expect("a data cluster");
        set_refcount(&path, idx, 0);
    }
    // The oracle must see the planted damage as intended.
    let expect = match c.damage {
        Damage::Clean => 0,
        Damage::Leaks => 3,
        Damage::Corruption | Damage::Both => 2,
    };
    let q = qemu_img(dir, &["check", "img.qcow2"]);
    assert_eq!(
        q.code, expect,
        "planting failed, qemu-img check says:\n{}{}",
        q.stdout, q.stderr
    );
}

fn case(c: &Case) {
    let d = tmpdir();
    let qd = d.path().join("q");
    let od = d.path().join("o");
    std::fs::create_dir(&qd).expect("mkdir");
    make(&qd, c);
    std::fs::create_dir(&od).expect("mkdir");
    std::fs::copy(qd.join("img.qcow2"), od.join("img.qcow2")).expect("copy");

    let mut args = vec!["check"];
    if let Some(r) = c.repair {
        args.extend(["-r", r]);
    }
    let mut jargs = args.clone();
    jargs.push("--output=json");
    jargs.push("img.qcow2");
    args.push("img.qcow2");

    if c.repair.is_none() {
        let q = qemu_img(&qd, &jargs);
        let o = ours(&od, &jargs);
        assert_eq!(
            o.code, q.code,
            "json exit status; qcow2 stderr: {}",
            o.stderr
        );
        assert!(
            o.stdout == q.stdout,
            "json differs\n--- qcow2:\n{}--- qemu-img:\n{}",
            o.stdout,
            q.stdout
        );
        let q = qemu_img(&qd, &args);
        let o = ours(&od, &args);
        assert_eq!(o.code, q.code, "human exit status");
        assert!(
            o.stdout == q.stdout,
            "human output differs\n--- qcow2:\n{}--- qemu-img:\n{}",
            o.stdout,
            q.stdout
        );
        return;
    }
    // Repair: compare the reports (image end offset may differ: qemu
    // truncates at its own discretion), then both images must be clean.
    let q = qemu_img(&qd, &jargs);
    let o = ours(&od, &jargs);
    assert_eq!(
        o.code, q.code,
        "repair exit status; qcow2: {}{}",
        o.stdout, o.stderr
    );
    if q.code != 1 {
        assert_eq!(
            json_without(&o.stdout, &["image-end-offset"]),
            json_without(&q.stdout, &["image-end-offset"]),
            "repair report\n--- qcow2:\n{}--- qemu-img:\n{}",
            o.stdout,
            q.stdout
        );
    }
    if q.code == 0 {
        assert_qemu_check_clean(&od, "img.qcow2", "after qcow2 check -r");
        let cmp = run_in(
            d.path(),
            "qemu-img",
            &[
                "compare",
                "-f",
                "qcow2",
                "-F",
                "qcow2",
                "q/img.qcow2",
                "o/img.qcow2",
            ],
        );
        assert_eq!(
            cmp.code, 0,
            "guest content after repair differs: {}{}",
            cmp.stdout, cmp.stderr
        );
        // A second check of our repaired image reports it clean, like qemu.
        let again = ours(&od, &["check", "img.qcow2"]);
        assert_eq!(again.code, 0, "qcow2 check after repair: {}", again.stdout);
    }
}

#[test]
fn check_matches_qemu() {
    let mut cases = Vec::new();
    let mut opts = Vec::new();
    for (compat, cs, rb) in [
        ("0.10", 65536u64, 16u32),
        ("0.10", 4096, 16),
        ("1.1", 65536, 16),
        ("1.1", 4096, 1),
        ("1.1", 512, 16),
        ("1.1", 65536, 64),
        ("1.1", 2 << 20, 16),
    ] {
        opts.push(ImgOpts {
            compat,
            cluster_size: cs,
            refcount_bits: rb,
            ..ImgOpts::default()
        });
    }
    opts.push(ImgOpts {
        extended_l2: true,
        ..ImgOpts::default()
    });
    for o in &opts {
        for damage in [
            Damage::Clean,
            Damage::Leaks,
            Damage::Corruption,
            Damage::Both,
        ] {
            cases.push(Case {
                o: o.clone(),
                damage,
                repair: None,
            });
        }
        cases.push(Case {
            o: o.clone(),
            damage: Damage::Leaks,
            repair: Some("leaks"),
        });
        cases.push(Case {
            o: o.clone(),
            damage: Damage::Corruption,
            repair: Some("all"),
        });
        cases.push(Case {
            o: o.clone(),
            damage: Damage::Both,
            repair: Some("all"),
        });
    }
    let failures = run_cases(&cases, workers(), case);
    assert_no_failures("check_matches_qemu", cases.len(), &failures);
}

/// Exit status 1 and a message when the image cannot be opened.
#[test]
fn check_open_failure() {
    let d = tmpdir();
    let q = qemu_img(d.path(), &["check", "missing.qcow2"]);
    let o = ours(d.path(), &["check", "missing.qcow2"]);
    assert_eq!(q.code, 1);
    assert_eq!(o.code, 1, "{}", o.stderr);
    assert!(o.stderr.contains("missing.qcow2"), "{}", o.stderr);
}
