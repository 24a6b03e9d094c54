//! Dirty tracking granularity: writeback writes only the dirty ranges of an
//! L2 table, merged where adjacent.

use std::process::Command;

const QCOW2: &str = env!("CARGO_BIN_EXE_qcow2");

fn stats(gran: &str, img: &std::path::Path) -> serde_json::Value {
    let o = Command::new(QCOW2)
        .args(["io", "-t", "writeback", "--stats=json"])
        .arg(format!("--dirty-granularity={gran}"))
        // L2 entries 0, 160 and 640 of the first table (8 bytes each):
        // bytes 0, 1280 and 5120 of the table.
        .args([
            "-c",
            "write -z 0 64k",
            "-c",
            "write -z 10M 64k",
            "-c",
            "write -z 40M 64k",
        ])
        .arg(img)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let out = String::from_utf8_lossy(&o.stdout).into_owned();
    serde_json::from_str(out.lines().last().unwrap()).unwrap()
}

#[test]
fn writeback_follows_the_granularity() {
    let d = tempfile::tempdir().unwrap();
    let base = d.path().join("base.qcow2");
    assert!(Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2"])
        .arg(&base)
        .arg("1G")
        .status()
        .unwrap()
        .success());
    assert!(Command::new("qemu-io")
        .args(["-c", "write 0 64M"])
        .arg(&base)
        .output()
        .unwrap()
        .status
        .success());
    // (granularity, write calls, bytes): three separate 512-byte sectors;
    // with 4 KiB the two granules 0..4k and 4k..8k are adjacent and merge.
    for (gran, writes, bytes) in [("512", 3, 1536), ("4k", 1, 8192), ("64k", 1, 65536)] {
        let img = d.path().join(format!("g{gran}.qcow2"));
        std::fs::copy(&base, &img).unwrap();
        let s = stats(gran, &img);
        assert_eq!(s["l2_dirty_marks"], 1, "{gran}: {s}");
        assert_eq!(s["l2_writebacks"], writes, "{gran}: {s}");
        assert_eq!(s["l2_bytes_written"], bytes, "{gran}: {s}");
        let c = Command::new("qemu-img")
            .arg("check")
            .arg(&img)
            .output()
            .unwrap();
        assert!(c.status.success(), "{}", String::from_utf8_lossy(&c.stdout));
    }
    let bad = Command::new(QCOW2)
        .args(["io", "--dirty-granularity=100", "-c", "read 0 1"])
        .arg(&base)
        .output()
        .unwrap();
    assert!(!bad.status.success());
}
