//! `qcow2 map --output=json` must be byte-identical to `qemu-img map
//! --output=json`, and the content read through `qcow2 io` equal to what
//! `qemu-img convert -O raw` reads, on images written by qemu-io.

mod common;
use common::*;

#[derive(Debug, Clone)]
enum Backing {
    None,
    Qcow2,
    Raw,
    Chain,
}

fn case(o: &ImgOpts, backing: &Backing) {
    let d = tmpdir();
    let dir = d.path();
    let cs = o.cluster_size;
    let v3 = o.compat == "1.1";
    match backing {
        Backing::None => {
            qemu_create(dir, "img.qcow2", 16 * cs, o, None);
            qemu_io_script(dir, "img.qcow2", "qcow2", &fill_script(cs, v3)).ok("qemu-io fill");
        }
        Backing::Qcow2 | Backing::Chain => {
            qemu_create(dir, "base.qcow2", 8 * cs, o, None);
            qemu_io_script(dir, "base.qcow2", "qcow2", &fill_script(cs, v3)[..6])
                .ok("qemu-io base");
            let top_backing = if matches!(backing, Backing::Chain) {
                qemu_create(dir, "mid.qcow2", 12 * cs, o, Some(("base.qcow2", "qcow2")));
                qemu_io_script(
                    dir,
                    "mid.qcow2",
                    "qcow2",
                    &[
                        format!("write -P 0xb1 {} {}", 2 * cs, 2 * cs),
                        format!("write -z {} {}", 5 * cs, cs),
                    ],
                )
                .ok("qemu-io mid");
                "mid.qcow2"
            } else {
                "base.qcow2"
            };
            qemu_create(dir, "img.qcow2", 16 * cs, o, Some((top_backing, "qcow2")));
            qemu_io_script(dir, "img.qcow2", "qcow2", &overlay_script(cs)).ok("qemu-io overlay");
        }
        Backing::Raw => {
            let raw_len = 7 * cs + cs / 2;
            raw_backing(
                dir,
                "base.raw",
                raw_len,
                &[
                    format!("write -P 0x91 0 {}", 2 * cs),
                    format!("write -z {} {}", 4 * cs, cs),
                ],
            );
            qemu_create(dir, "img.qcow2", 16 * cs, o, Some(("base.raw", "raw")));
            qemu_io_script(dir, "img.qcow2", "qcow2", &overlay_script(cs)).ok("qemu-io overlay");
        }
    }
    // qemu-img map also asks the host file system (SEEK_DATA/SEEK_HOLE) about
    // data clusters; right after qemu-io wrote, ext4 may still report the
    // unwritten (fallocated) parts of partially written clusters as holes and
    // change its answer once writeback is done. Let the file settle, and
    // compare against a qemu reading bracketed by two equal ones.
    let _ = std::process::Command::new("sync").status();
    let mut tries = 0;
    let (expected, got) = loop {
        let before = qemu_map(dir, "img.qcow2");
        let got = our_map(dir, "img.qcow2");
        let after = qemu_map(dir, "img.qcow2");
        tries += 1;
        if before == after || tries == 5 {
            break (after, got);
        }
        std::thread::sleep(std::time::Duration::from_millis(200));
    };
    assert_eq!(got.code, 0, "qcow2 map failed: {}", got.stderr);
    assert!(
        got.stdout == expected,
        "map differs\n--- qcow2 map:\n{}--- qemu-img map:\n{}",
        got.stdout,
        expected
    );
    assert_content_matches_qemu(dir, "img.qcow2", "content");
}

#[test]
fn map_matches_qemu() {
    let mut cases: Vec<(ImgOpts, Backing)> = ImgOpts::matrix()
        .into_iter()
        .map(|o| (o, Backing::None))
        .collect();
    for compat in ["0.10", "1.1"] {
        for cs in [4096u64, 65536] {
            let o = ImgOpts {
                compat,
                cluster_size: cs,
                ..ImgOpts::default()
            };
            for b in [Backing::Qcow2, Backing::Raw, Backing::Chain] {
                cases.push((o.clone(), b));
            }
        }
    }
    for cs in [65536u64, 2 << 20] {
        let o = ImgOpts {
            extended_l2: true,
            cluster_size: cs,
            ..ImgOpts::default()
        };
        for b in [Backing::Qcow2, Backing::Raw] {
            cases.push((o.clone(), b));
        }
    }
    let o = ImgOpts {
        refcount_bits: 1,
        zstd: true,
        ..ImgOpts::default()
    };
    cases.push((o, Backing::Qcow2));
    let failures = run_cases(&cases, workers(), |(o, b)| case(o, b));
    assert_no_failures("map_matches_qemu", cases.len(), &failures);
}

/// Human map output: same lines as qemu-img map (no compressed clusters there).
#[test]
fn map_human_matches_qemu() {
    let d = tmpdir();
    let dir = d.path();
    let o = ImgOpts::default();
    qemu_create(dir, "base.qcow2", 8 << 16, &o, None);
    qemu_io_script(
        dir,
        "base.qcow2",
        "qcow2",
        &[
            "write -P 1 0 128k".to_string(),
            "write -z 256k 64k".to_string(),
        ],
    )
    .ok("fill base");
    qemu_create(
        dir,
        "img.qcow2",
        16 << 16,
        &o,
        Some(("base.qcow2", "qcow2")),
    );
    qemu_io_script(
        dir,
        "img.qcow2",
        "qcow2",
        &[
            "write -P 2 64k 128k".to_string(),
            "write -z 512k 64k".to_string(),
        ],
    )
    .ok("fill");
    let expected = qemu_img(dir, &["map", "img.qcow2"]).ok("qemu-img map");
    let got = ours(dir, &["map", "img.qcow2"]);
    assert_eq!(got.code, 0, "{}", got.stderr);
    assert_eq!(got.stdout, expected.stdout);
}
