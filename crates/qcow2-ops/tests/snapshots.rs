//! Internal snapshots through the Rust API, on one open handle: the state
//! in memory (L1, L2 cache, COPIED knowledge, pending work) must follow
//! every create / apply / delete, so guest writes of every kind between
//! them (partial, whole-cluster, zeroes with and without unmap, discard)
//! read back as an in-memory model says, through the same handle and, after
//! close, through QEMU (`qemu-img convert` of the image and of every
//! snapshot); `qemu-img check` finds the image clean.

use qcow2_ops::*;
use std::path::Path;
use std::process::Command;

fn run(prog: &str, args: &[&str]) -> (i32, Vec<u8>, String) {
    let o = Command::new(prog)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {prog}: {e}"));
    (
        o.status.code().unwrap_or(-1),
        o.stdout,
        String::from_utf8_lossy(&o.stderr).into_owned(),
    )
}

fn content(p: &Path, snap: Option<&str>) -> Vec<u8> {
    let out = p.with_extension("raw");
    let opt = snap.map(|s| format!("snapshot.name={s}"));
    let mut args = vec!["convert", "-U", "-f", "qcow2"];
    if let Some(o) = &opt {
        args.extend(["-l", o.as_str()]);
    }
    args.extend(["-O", "raw", p.to_str().unwrap(), out.to_str().unwrap()]);
    let (c, _, e) = run("qemu-img", &args);
    assert_eq!(c, 0, "convert: {e}");
    let d = std::fs::read(&out).unwrap();
    std::fs::remove_file(&out).unwrap();
    d
}

struct Model {
    cur: Vec<u8>,
    snaps: Vec<(String, Vec<u8>)>,
}

fn check_reads(img: &Image, m: &Model, ctx: &str) {
    let mut buf = vec![0u8; m.cur.len()];
    img.read(0, &mut buf).unwrap();
    if let Some(i) = (0..buf.len()).find(|&i| buf[i] != m.cur[i]) {
        panic!(
            "{ctx}: byte {i:#x} reads {:#x}, want {:#x}",
            buf[i], m.cur[i]
        );
    }
}

fn scenario(opts: &str, cs: u64) {
    if qcow2_testutil::require("snapshots (ops)", &["qemu-img", "qemu-io"]).is_none() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("img.qcow2");
    let ps = p.to_str().unwrap();
    let size = 24 * cs;
    let (c, _, e) = run(
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            opts,
            ps,
            &size.to_string(),
        ],
    );
    assert_eq!(c, 0, "{e}");
    let (c, _, e) = run(
        "qemu-io",
        &[
            "-c",
            &format!("write -P 0x11 0 {}", 4 * cs),
            "-c",
            &format!("write -c -P 0x12 {} {}", 6 * cs, cs),
            "-c",
            &format!("write -z {} {}", 8 * cs, cs),
            ps,
        ],
    );
    assert_eq!(c, 0, "{e}");
    let mut m = Model {
        cur: content(&p, None),
        snaps: Vec::new(),
    };
    let o = OpenOptions {
        l2_cache_bytes: 4096,
        refcount_cache_bytes: 4096,
        ..OpenOptions::read_write()
    };
    let img = Image::open(&p, &o).unwrap();
    let mut step = 0u8;
    let mut write = |img: &Image, m: &mut Model, off: u64, len: u64| {
        step += 1;
        let v = 0x40 + step;
        img.write(off, &vec![v; len as usize], 0).unwrap();
        m.cur[off as usize..(off + len) as usize].fill(v);
    };
    let zero = |img: &Image, m: &mut Model, off: u64, len: u64, f: u32| {
        img.write_zeroes(off, len, f).unwrap();
        m.cur[off as usize..(off + len) as usize].fill(0);
    };
    // Dirty caches at the time of the first snapshot.
    write(&img, &mut m, cs / 2, cs);
    let a = img.snapshot_create("a").unwrap();
    assert_eq!(a.id, "1");
    assert_eq!(a.disk_size, Some(size));
    m.snaps.push(("a".into(), m.cur.clone()));
    check_reads(&img, &m, "after create a");
    // Every kind of change to clusters now shared with "a".
    write(&img, &mut m, 0, 512);
    write(&img, &mut m, 2 * cs, cs);
    write(&img, &mut m, 6 * cs + 512, 1024);
    zero(&img, &mut m, 3 * cs, cs, REQ_MAY_UNMAP);
    zero(&img, &mut m, cs, cs, 0);
    img.discard(8 * cs, cs).unwrap();
    m.cur[(8 * cs) as usize..(9 * cs) as usize].fill(0);
    write(&img, &mut m, 20 * cs, 2 * cs);
    check_reads(&img, &m, "after writes over a");
    let b = img.snapshot_create("b").unwrap();
    assert_eq!(b.id, "2");
    m.snaps.push(("b".into(), m.cur.clone()));
    write(&img, &mut m, 20 * cs + 100, 3000);
    write(&img, &mut m, 0, 3 * cs);
    img.snapshot_apply("a").unwrap();
    m.cur = m.snaps[0].1.clone();
    check_reads(&img, &m, "after apply a");
    write(&img, &mut m, cs / 4, cs / 2);
    zero(&img, &mut m, 2 * cs, 2 * cs, REQ_MAY_UNMAP);
    check_reads(&img, &m, "after writes over applied a");
    img.snapshot_delete("a").unwrap();
    m.snaps.remove(0);
    write(&img, &mut m, 0, cs);
    write(&img, &mut m, 5 * cs, cs);
    check_reads(&img, &m, "after delete a");
    img.snapshot_create("c").unwrap();
    m.snaps.push(("c".into(), m.cur.clone()));
    img.snapshot_apply("2").unwrap();
    m.cur = m.snaps[0].1.clone();
    check_reads(&img, &m, "after apply b by id");
    write(&img, &mut m, 7 * cs, cs);
    let list = img.snapshots().unwrap();
    let names: Vec<_> = list
        .iter()
        .map(|s| (s.id.as_str(), s.name.as_str()))
        .collect();
    assert_eq!(names, [("2", "b"), ("3", "c")]);
    assert!(matches!(img.snapshot_apply("zz"), Err(e) if e.errno() == -libc::ENOENT));
    assert!(matches!(img.snapshot_delete("2"), Err(e) if e.errno() == -libc::ENOENT));
    img.close().unwrap();
    let (c, out, e) = run("qemu-img", &["check", ps]);
    assert_eq!(c, 0, "{}{e}", String::from_utf8_lossy(&out));
    assert!(content(&p, None) == m.cur, "active content after close");
    for (n, want) in &m.snaps {
        assert!(&content(&p, Some(n)) == want, "snapshot {n} content");
    }
    // Deleting the rest frees everything they alone held.
    let img = Image::open(&p, &o).unwrap();
    img.snapshot_delete("b").unwrap();
    img.snapshot_delete("c").unwrap();
    check_reads(&img, &m, "after delete all");
    assert!(img.snapshots().unwrap().is_empty());
    img.close().unwrap();
    let (c, out, e) = run("qemu-img", &["check", ps]);
    assert_eq!(c, 0, "{}{e}", String::from_utf8_lossy(&out));
    // Read-only handles list but refuse changes.
    let img = Image::open(&p, &OpenOptions::read_only()).unwrap();
    assert!(matches!(img.snapshot_create("x"), Err(Error::ReadOnly(_))));
}

#[test]
fn one_handle_v3() {
    scenario("cluster_size=65536", 65536);
}

#[test]
fn one_handle_extended_l2() {
    scenario("cluster_size=65536,extended_l2=on", 65536);
}

#[test]
fn one_handle_v2_small_clusters() {
    scenario("compat=0.10,cluster_size=4096", 4096);
}

/// Snapshot operations on one handle while another thread writes: each
/// snapshot holds, for every cluster the writer touches, one of the
/// writer's values; at the end the image and all snapshots read as QEMU
/// sees them and `qemu-img check` finds the image clean.
#[test]
fn concurrent_writes_and_snapshots() {
    if qcow2_testutil::require("snapshots (threads)", &["qemu-img"]).is_none() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("t.qcow2");
    let cs = 65536u64;
    Image::create(&p, 64 * cs, &CreateOptions::default()).unwrap();
    let img = Image::open(&p, &OpenOptions::read_write()).unwrap();
    std::thread::scope(|s| {
        s.spawn(|| {
            for i in 0..200u64 {
                let v = (i % 250) as u8 + 1;
                img.write((i % 32) * cs, &vec![v; cs as usize], 0).unwrap();
                if i % 7 == 0 {
                    img.write_zeroes(((i + 3) % 32) * cs, cs, REQ_MAY_UNMAP)
                        .unwrap();
                }
            }
        });
        s.spawn(|| {
            for i in 0..12 {
                img.snapshot_create(&format!("s{i}")).unwrap();
                if i % 3 == 2 {
                    img.snapshot_delete(&format!("s{}", i - 1)).unwrap();
                }
            }
        });
    });
    let mut want = vec![0u8; (64 * cs) as usize];
    img.read(0, &mut want).unwrap();
    let names: Vec<String> = img
        .snapshots()
        .unwrap()
        .into_iter()
        .map(|s| s.name)
        .collect();
    assert_eq!(names.len(), 8);
    // Every cluster of every snapshot is uniform (never torn by a write).
    let mut snaps = Vec::new();
    img.close().unwrap();
    for n in &names {
        let c = content(&p, Some(n));
        for k in 0..64usize {
            let cl = &c[k * cs as usize..(k + 1) * cs as usize];
            assert!(
                cl.iter().all(|&b| b == cl[0]),
                "snapshot {n} cluster {k} torn"
            );
        }
        snaps.push(c);
    }
    assert!(content(&p, None) == want);
    let (c, out, e) = run("qemu-img", &["check", p.to_str().unwrap()]);
    assert_eq!(c, 0, "{}{e}", String::from_utf8_lossy(&out));
    // Applying each one through a new handle gives exactly its content.
    let img = Image::open(&p, &OpenOptions::read_write()).unwrap();
    for (n, c) in names.iter().zip(&snaps) {
        img.snapshot_apply(n).unwrap();
        let mut buf = vec![0u8; c.len()];
        img.read(0, &mut buf).unwrap();
        assert!(&buf == c, "apply {n}");
    }
    img.close().unwrap();
    let (c, out, e) = run("qemu-img", &["check", p.to_str().unwrap()]);
    assert_eq!(c, 0, "{}{e}", String::from_utf8_lossy(&out));
}
