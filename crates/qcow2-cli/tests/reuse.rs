//! Clusters freed in a session are reused in that session (writeback mode):
//! the same qemu-io script through qemu-io and `qcow2 io`, then the images
//! are compared. QEMU 10 is the oracle: ours must not end further into the
//! file than QEMU's (`qemu-img check` "Image end offset" and the file
//! length), `qemu-img check` must find it clean and `qemu-img compare`
//! equal. The first case is the scenario of QEMU's iotest 250 (discard at
//! both ends of a metadata-preallocated image, then writes that need new
//! clusters), where the file used to grow by 20 MiB more than QEMU's.

mod common;

use common::*;
use std::path::Path;

/// qemu-img and qemu-io are needed; without them the test fails under CI
/// and is skipped (visibly) elsewhere.
fn have_qemu() -> bool {
    let ok = ["qemu-img", "qemu-io"].iter().all(|t| {
        std::process::Command::new(t)
            .arg("--version")
            .output()
            .is_ok_and(|o| o.status.success())
    });
    if !ok {
        assert!(
            std::env::var_os("CI").is_none(),
            "qemu-img/qemu-io not installed (required under CI)"
        );
        println!("skipped: qemu-img/qemu-io not installed");
    }
    ok
}

/// `qemu-img check --output=json` "image-end-offset".
fn end_offset(dir: &Path, name: &str) -> u64 {
    let r = qemu_img(dir, &["check", "--output=json", "-f", "qcow2", name]);
    let v: serde_json::Value = serde_json::from_str(&r.stdout)
        .unwrap_or_else(|e| panic!("check json of {name}: {e}\n{}", r.stdout));
    v["image-end-offset"]
        .as_u64()
        .unwrap_or_else(|| panic!("no image-end-offset for {name}: {}", r.stdout))
}

/// Creates the start image, runs `script` through both tools in one
/// writeback session each (discard mode `unmap`, as qemu-io opens), and
/// compares the results.
fn differential(name: &str, size: &str, create_opts: &str, fill: &[String], script: &[String]) {
    let dir = tmpdir();
    let d = dir.path();
    for img in ["q.qcow2", "o.qcow2"] {
        // Each image made by qemu-img itself: no copy that could densify a
        // sparse (preallocated) file.
        qemu_img(
            d,
            &["create", "-q", "-f", "qcow2", "-o", create_opts, img, size],
        )
        .ok("qemu-img create");
        if !fill.is_empty() {
            let r = qemu_io_script(d, img, "qcow2", fill).ok("qemu-io fill");
            assert!(!r.stdout.contains("failed"), "{name}: fill: {}", r.stdout);
        }
    }
    let mut q_args: Vec<&str> = vec!["-f", "qcow2", "-t", "writeback", "-d", "unmap"];
    for c in script {
        q_args.push("-c");
        q_args.push(c);
    }
    q_args.push("q.qcow2");
    let r = qemu_io(d, &q_args).ok("qemu-io");
    assert!(
        !r.stdout.contains("failed"),
        "{name}: qemu-io: {}",
        r.stdout
    );
    let r =
        ours_io_script(d, "o.qcow2", &["-t", "writeback", "-d", "unmap"], script).ok("qcow2 io");
    assert!(
        !r.stdout.contains("failed"),
        "{name}: qcow2 io: {}",
        r.stdout
    );

    assert_qemu_check_clean(d, "o.qcow2", name);
    let cmp = qemu_img(
        d,
        &[
            "compare", "-f", "qcow2", "-F", "qcow2", "q.qcow2", "o.qcow2",
        ],
    );
    assert_eq!(
        cmp.code, 0,
        "{name}: guest contents differ from QEMU's:\n{}{}",
        cmp.stdout, cmp.stderr
    );
    let (qe, oe) = (end_offset(d, "q.qcow2"), end_offset(d, "o.qcow2"));
    let len = |f: &str| std::fs::metadata(d.join(f)).expect("stat").len();
    let (ql, ol) = (len("q.qcow2"), len("o.qcow2"));
    println!("{name}: image end offset qemu {qe} ours {oe}; file length qemu {ql} ours {ol}");
    assert!(
        oe <= qe,
        "{name}: our image ends at {oe}, QEMU's at {qe} ({} bytes more): freed clusters not reused",
        oe - qe
    );
    assert!(
        ol <= ql,
        "{name}: our file is {ol} bytes long, QEMU's {ql} ({} bytes more)",
        ol - ql
    );
}

fn s(v: &[&str]) -> Vec<String> {
    v.iter().map(|x| x.to_string()).collect()
}

/// iotest 250's scenario: 1 MiB clusters, metadata preallocation, the first
/// and last 10 MiB discarded, then written again (each write taking the
/// clusters the other discard freed).
#[test]
fn iotest250_discard_then_write_reuses_freed_clusters() {
    if !have_qemu() {
        return;
    }
    differential(
        "iotest250",
        "2100M",
        "cluster_size=1M,preallocation=metadata",
        &[],
        &s(&[
            "discard 0 10M",
            "discard 2090M 10M",
            "write -P 0x25 2090M 10M",
            "write -P 0x26 0 10M",
        ]),
    );
}

/// Discard and write-zeroes with unmap free data clusters, which later
/// requests of the session take for data and for new L2 tables (4 KiB
/// clusters: every 2 MiB region needs its own table), interleaved.
#[test]
fn freed_clusters_become_data_and_l2_tables() {
    if !have_qemu() {
        return;
    }
    let mut script = Vec::new();
    for i in 0..16u64 {
        script.push(format!("discard {} 64k", i * 64 * 1024));
        script.push(format!("write -P {:#x} {}M 64k", 0x30 + i, 64 + 2 * i));
    }
    script.push("write -z -u 1M 1M".to_string());
    script.push("write -P 0x50 100M 1M".to_string());
    script.push("write -P 0x51 104M 40k".to_string());
    differential(
        "4k interleaved",
        "1G",
        "cluster_size=4096",
        &s(&["write -P 0xab 0 4M"]),
        &script,
    );
}

/// 64 KiB clusters: one large discard, then one large write elsewhere; then
/// data written again over clusters freed by the same session twice.
#[test]
fn large_discard_then_large_write() {
    if !have_qemu() {
        return;
    }
    differential(
        "64k large",
        "4G",
        "cluster_size=65536",
        &s(&["write -P 0xab 0 96M", "write -c -P 0xac 100M 4M"]),
        &s(&[
            "discard 0 32M",
            "write -P 0x61 1G 32M",
            "write -z -u 1G 8M",
            "discard 100M 4M",
            "write -P 0x62 2G 12M",
            "write -P 0x63 40M 64k",
        ]),
    );
}
