//! Errors: a message naming the image and the problem, a non-zero exit
//! status, never a panic.

mod common;
use common::*;

fn fails(dir: &std::path::Path, args: &[&str], needle: &str) {
    let r = ours(dir, args);
    assert_ne!(
        r.code, 0,
        "qcow2 {args:?} should fail; stdout: {}",
        r.stdout
    );
    assert!(
        r.stderr.contains(needle) || r.stdout.contains(needle),
        "qcow2 {args:?}: message should mention {needle:?}; stderr: {} stdout: {}",
        r.stderr,
        r.stdout
    );
    assert!(!r.stderr.contains("panicked"), "{}", r.stderr);
}

#[test]
fn cli_errors() {
    let d = tmpdir();
    let dir = d.path();
    // Missing files.
    for sub in ["info", "map", "check"] {
        fails(dir, &[sub, "missing.qcow2"], "missing.qcow2");
    }
    fails(
        dir,
        &["io", "-c", "read 0 1", "missing.qcow2"],
        "missing.qcow2",
    );
    let r = ours(dir, &["check", "missing.qcow2"]);
    assert_eq!(r.code, 1, "check exit status for an unreadable image");
    // Not a qcow2 image.
    std::fs::write(dir.join("junk.img"), vec![0u8; 4096]).expect("write");
    // qemu-img describes it as a raw image (probed format).
    let _ = std::process::Command::new("sync").status();
    let r = ours(dir, &["info", "junk.img"]);
    let q = qemu_img(dir, &["info", "junk.img"]);
    assert_eq!((r.code, &r.stdout), (q.code, &q.stdout), "info on junk");
    for sub in ["map", "check"] {
        let r = ours(dir, &[sub, "junk.img"]);
        assert_ne!(r.code, 0, "{sub} on junk");
        assert!(r.stderr.contains("junk.img"), "{sub}: {}", r.stderr);
    }
    // Bad options and arguments.
    fails(dir, &["frobnicate"], "frobnicate");
    fails(dir, &["info", "--output=xml", "x.qcow2"], "xml");
    fails(dir, &["check", "-r", "some", "x.qcow2"], "some");
    fails(dir, &["create", "-f", "vmdk", "x.img", "1M"], "vmdk");
    fails(dir, &["create", "-o", "foo=bar", "x.qcow2", "1M"], "foo");
    fails(dir, &["create", "x.qcow2", "12q"], "12q");
    fails(dir, &["create", "x.qcow2"], "size");
    fails(
        dir,
        &["create", "-o", "cluster_size=1000", "x.qcow2", "1M"],
        "Cluster size",
    );
    fails(
        dir,
        &["create", "-b", "nothere.qcow2", "-F", "qcow2", "x.qcow2"],
        "nothere.qcow2",
    );
    assert!(!dir.join("x.qcow2").exists() || ours(dir, &["check", "x.qcow2"]).code == 0);

    // io: bad numbers, bad modes, unknown commands: qemu-io's messages.
    let q = qemu_img(dir, &["create", "-q", "-f", "qcow2", "img.qcow2", "1M"]);
    assert_eq!(q.code, 0);
    fails(
        dir,
        &["io", "-c", "read abc 1", "img.qcow2"],
        "Parsing error: non-numeric argument, or extraneous/unrecognized suffix -- abc",
    );
    fails(
        dir,
        &["io", "-c", "read 0 16E", "img.qcow2"],
        "Parsing error: argument too large -- 16E",
    );
    fails(
        dir,
        &["io", "-c", "write -P 256 0 1", "img.qcow2"],
        "256 is not a valid pattern byte",
    );
    fails(dir, &["io", "-c", "read 0 1M1", "img.qcow2"], "1M1");
    fails(
        dir,
        &["io", "-c", "frob", "img.qcow2"],
        "command \"frob\" not found",
    );
    fails(
        dir,
        &["io", "-c", "read 0", "img.qcow2"],
        "bad argument count 1 to read",
    );
    fails(
        dir,
        &["io", "-c", "write -X 0 1", "img.qcow2"],
        "invalid option -- 'X'",
    );
    fails(
        dir,
        &["io", "-c", "write 1M 1", "img.qcow2"],
        "write failed: Input/output error",
    );
    fails(
        dir,
        &["io", "-t", "bogus", "-c", "read 0 1", "img.qcow2"],
        "bogus",
    );
    fails(
        dir,
        &["io", "-d", "bogus", "-c", "read 0 1", "img.qcow2"],
        "bogus",
    );
    fails(
        dir,
        // (`-f raw` is a valid way to open any file, as in qemu-io.)
        &["io", "-f", "bogus", "-c", "read 0 1", "img.qcow2"],
        "Unknown driver 'bogus'",
    );
    fails(
        dir,
        &["io", "--stats=xml", "-c", "read 0 1", "img.qcow2"],
        "xml",
    );
    fails(
        dir,
        &["io", "-r", "-c", "write 0 1", "img.qcow2"],
        "read-only",
    );
    // The image is still fine after all that.
    let r = qemu_img(dir, &["check", "img.qcow2"]);
    assert_eq!(r.code, 0, "{}", r.stdout);
}

/// `--stats=json` prints one JSON object with the Stats field names as the
/// last line of stdout; `--stats` prints them for people.
#[test]
fn io_stats_output() {
    let d = tmpdir();
    let dir = d.path();
    assert_eq!(
        qemu_img(dir, &["create", "-q", "-f", "qcow2", "img.qcow2", "1M"]).code,
        0
    );
    let r = ours(
        dir,
        &[
            "io",
            "--stats=json",
            "-c",
            "write -P 1 0 64k",
            "-c",
            "write -z 64k 64k",
            "img.qcow2",
        ],
    );
    assert_eq!(r.code, 0, "{}", r.stderr);
    let last = r.stdout.lines().last().expect("output");
    let v: serde_json::Value = serde_json::from_str(last).expect("stats json");
    let m = v.as_object().expect("object");
    let names = [
        "l2_hits",
        "l2_misses",
        "l2_dirty_marks",
        "l2_writebacks",
        "l2_bytes_written",
        "refblock_dirty_marks",
        "refblock_writebacks",
        "refblock_bytes_written",
        "cache_flushes",
        "file_syncs",
        "data_bytes_written",
        "holes_punched",
        "zero_entries_skipped",
    ];
    assert_eq!(m.len(), names.len(), "{last}");
    for n in names {
        assert!(
            m.get(n).and_then(|x| x.as_u64()).is_some(),
            "field {n} in {last}"
        );
    }
    assert!(
        m["data_bytes_written"].as_u64().unwrap_or(0) >= 65536,
        "{last}"
    );
    let r = ours(dir, &["io", "--stats", "-c", "read 0 4k", "img.qcow2"]);
    assert_eq!(r.code, 0);
    assert!(r.stdout.contains("l2_hits: "), "{}", r.stdout);
}

/// Commands read from stdin when no -c is given (qemu-io's interactive mode).
#[test]
fn io_reads_stdin() {
    use std::io::Write;
    let d = tmpdir();
    let dir = d.path();
    assert_eq!(
        qemu_img(dir, &["create", "-q", "-f", "qcow2", "img.qcow2", "1M"]).code,
        0
    );
    let mut child = std::process::Command::new(qcow2_bin())
        .args(["io", "img.qcow2"])
        .current_dir(dir)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("spawn");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(b"write -P 7 0 4k\nread -P 7 0 4k\nquit\n")
        .expect("write stdin");
    let out = child.wait_with_output().expect("wait");
    assert!(out.status.success());
    let s = String::from_utf8_lossy(&out.stdout);
    assert!(
        s.contains("wrote 4096/4096 bytes at offset 0")
            && s.contains("read 4096/4096 bytes at offset 0"),
        "{s}"
    );
}
