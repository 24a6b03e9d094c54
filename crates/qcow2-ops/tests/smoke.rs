//! End-to-end checks of the engine against qemu-img on real files.

use qcow2_ops::*;
use std::path::Path;
use std::process::Command;

fn qemu_img(args: &[&str]) -> (bool, String) {
    let o = Command::new("qemu-img")
        .args(args)
        .output()
        .expect("qemu-img");
    (
        o.status.success(),
        String::from_utf8_lossy(&o.stdout).into_owned() + &String::from_utf8_lossy(&o.stderr),
    )
}

fn qemu_io(img: &Path, cmds: &[&str]) {
    let mut c = Command::new("qemu-io");
    for x in cmds {
        c.arg("-c").arg(x);
    }
    let o = c.arg(img).output().expect("qemu-io");
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
}

fn raw_of(img: &Path) -> Vec<u8> {
    let out = img.with_extension("raw");
    let (ok, msg) = qemu_img(&[
        "convert",
        "-O",
        "raw",
        img.to_str().unwrap(),
        out.to_str().unwrap(),
    ]);
    assert!(ok, "{msg}");
    std::fs::read(out).unwrap()
}

#[test]
fn read_matches_qemu_convert() {
    let d = tempfile::tempdir().unwrap();
    let p = d.path().join("a.qcow2");
    let (ok, m) = qemu_img(&["create", "-f", "qcow2", p.to_str().unwrap(), "8M"]);
    assert!(ok, "{m}");
    qemu_io(
        &p,
        &[
            "write -P 0xaa 0 100k",
            "write -z 1M 128k",
            "write -c -P 0x33 2M 64k",
            "write -P 0x11 3000k 5k",
        ],
    );
    let img = Image::open(&p, &OpenOptions::read_only()).unwrap();
    let mut buf = vec![0u8; 8 << 20];
    img.read(0, &mut buf).unwrap();
    assert!(buf == raw_of(&p));
}

#[test]
fn writes_pass_qemu_check_and_compare() {
    let d = tempfile::tempdir().unwrap();
    let a = d.path().join("a.qcow2");
    let b = d.path().join("b.qcow2");
    for p in [&a, &b] {
        let (ok, m) = qemu_img(&["create", "-f", "qcow2", p.to_str().unwrap(), "64M"]);
        assert!(ok, "{m}");
    }
    let cmds = [
        "write -P 0x5 0 100k",
        "write -P 0x6 70k 3k",
        "write -z 1M 128k",
        "write -z -u 0 64k",
        "discard 4M 1M",
    ];
    qemu_io(&a, &cmds);
    let img = Image::open(&b, &OpenOptions::read_write()).unwrap();
    img.write(0, &vec![5u8; 100 << 10], 0).unwrap();
    img.write(70 << 10, &vec![6u8; 3 << 10], 0).unwrap();
    img.write_zeroes(1 << 20, 128 << 10, 0).unwrap();
    img.write_zeroes(0, 64 << 10, REQ_MAY_UNMAP).unwrap();
    img.discard(4 << 20, 1 << 20).unwrap();
    img.close().unwrap();
    let (ok, m) = qemu_img(&["check", b.to_str().unwrap()]);
    assert!(ok, "{m}");
    let (ok, m) = qemu_img(&["compare", a.to_str().unwrap(), b.to_str().unwrap()]);
    assert!(ok, "{m}");
}

/// An L1 entry pointing at the refcount table: QEMU refuses the metadata
/// write and marks the image corrupt; so must we.
#[test]
fn l2_on_refcount_table_marks_corrupt_like_qemu() {
    let d = tempfile::tempdir().unwrap();
    let mut paths = Vec::new();
    for name in ["q.qcow2", "o.qcow2"] {
        let p = d.path().join(name);
        let (ok, m) = qemu_img(&["create", "-f", "qcow2", p.to_str().unwrap(), "64M"]);
        assert!(ok, "{m}");
        let mut b = std::fs::read(&p).unwrap();
        let l1 = u64::from_be_bytes(b[40..48].try_into().unwrap()) as usize;
        let rt = u64::from_be_bytes(b[48..56].try_into().unwrap());
        b[l1..l1 + 8].copy_from_slice(&(rt | 1 << 63).to_be_bytes());
        std::fs::write(&p, b).unwrap();
        paths.push(p);
    }
    let o = Command::new("qemu-io")
        .args(["-c", "write 0 4k"])
        .arg(&paths[0])
        .output()
        .unwrap();
    let qemu_says =
        String::from_utf8_lossy(&o.stdout).into_owned() + &String::from_utf8_lossy(&o.stderr);
    assert!(qemu_says.contains("corrupt"), "{qemu_says}");
    let img = Image::open(&paths[1], &OpenOptions::read_write()).unwrap();
    let e = img.write(0, &[1u8; 4096], 0).unwrap_err();
    assert!(matches!(e, Error::Corrupt(_)), "{e}");
    assert!(
        img.write(1 << 20, &[1u8; 512], 0).is_err(),
        "stays read-only"
    );
    drop(img);
    for p in &paths {
        let (_, info) = qemu_img(&["info", p.to_str().unwrap()]);
        assert!(info.contains("corrupt: true"), "{}: {info}", p.display());
    }
}

/// More new L2 tables than the cache holds: slices of new tables written
/// back and evicted must be read back from the file, not assumed zero.
#[test]
fn new_tables_survive_eviction() {
    for l2_cache in [16 << 10, OpenOptions::DEFAULT_L2_CACHE] {
        let d = tempfile::tempdir().unwrap();
        let a = d.path().join("a.qcow2");
        let b = d.path().join("b.qcow2");
        for p in [&a, &b] {
            let (ok, m) = qemu_img(&[
                "create",
                "-f",
                "qcow2",
                "-o",
                "cluster_size=4k",
                p.to_str().unwrap(),
                "1G",
            ]);
            assert!(ok, "{m}");
        }
        let tables = 300u64;
        let cmds: Vec<String> = (0..tables)
            .map(|i| format!("write -P 0x5a {}M 4k", i * 2))
            .collect();
        let refs: Vec<&str> = cmds.iter().map(|s| s.as_str()).collect();
        qemu_io(&a, &refs);
        let opts = OpenOptions {
            l2_cache_bytes: l2_cache,
            ..OpenOptions::read_write()
        };
        let img = Image::open(&b, &opts).unwrap();
        for i in 0..tables {
            img.write(i * (2 << 20), &[0x5a; 4096], 0).unwrap();
            if i % 7 == 0 {
                img.flush().unwrap();
            }
        }
        let mut buf = vec![0u8; 4096];
        for i in 0..tables {
            img.read(i * (2 << 20), &mut buf).unwrap();
            assert!(
                buf.iter().all(|&x| x == 0x5a),
                "cache {l2_cache}: table {i} lost its data"
            );
        }
        img.write(4096, &[1u8; 512], 0).unwrap();
        img.close().unwrap();
        qemu_io(&a, &["write -P 1 4k 512"]);
        let (ok, m) = qemu_img(&["check", b.to_str().unwrap()]);
        assert!(ok, "cache {l2_cache}: {m}");
        let (ok, m) = qemu_img(&["compare", a.to_str().unwrap(), b.to_str().unwrap()]);
        assert!(ok, "cache {l2_cache}: {m}");
    }
}

/// A limited block status is exactly the prefix of the full map.
#[test]
fn block_status_limit_is_a_prefix_of_the_map() {
    let d = tempfile::tempdir().unwrap();
    let p = d.path().join("a.qcow2");
    let (ok, m) = qemu_img(&[
        "create",
        "-f",
        "qcow2",
        "-o",
        "cluster_size=4k",
        p.to_str().unwrap(),
        "64M",
    ]);
    assert!(ok, "{m}");
    let cmds: Vec<String> = (0..40)
        .map(|i| format!("write -P 1 {}k 4k", i * 36))
        .collect();
    let refs: Vec<&str> = cmds.iter().map(|s| s.as_str()).collect();
    qemu_io(&p, &refs);
    qemu_io(&p, &["write -z 1M 8k", "write -z 1040k 4k"]);
    let img = Image::open(&p, &OpenOptions::read_only()).unwrap();
    let full = img.map().unwrap();
    assert!(full.len() > 40, "{}", full.len());
    for max in [0, 1, 2, 7, 40, full.len(), full.len() + 5] {
        let part = img.block_status_limit(0, img.virtual_size(), max).unwrap();
        assert_eq!(part[..], full[..max.min(full.len())], "max {max}");
    }
}

/// Requests that write nothing leave nothing for a flush to sync: an empty
/// write, an empty write-zeroes and an empty discard, then a flush, issue
/// no fdatasync (the rule "a flush with nothing dirty issues no sync").
#[test]
fn empty_requests_need_no_sync() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("e.qcow2");
    let (ok, msg) = qemu_img(&["create", "-q", "-f", "qcow2", p.to_str().unwrap(), "1M"]);
    assert!(ok, "{msg}");
    qemu_io(&p, &["write -P 7 0 64k"]);
    let opts = OpenOptions {
        writable: true,
        ..OpenOptions::default()
    };
    let img = Image::open(&p, &opts).unwrap();
    img.flush().unwrap();
    img.reset_stats();
    img.write(4096, &[], 0).unwrap();
    img.write_zeroes(4096, 0, 0).unwrap();
    img.discard(4096, 0).unwrap();
    img.flush().unwrap();
    assert_eq!(img.stats().file_syncs, 0, "{:?}", img.stats());
    // One real write is synced once.
    img.write(4096, &[1; 512], 0).unwrap();
    img.flush().unwrap();
    assert_eq!(img.stats().file_syncs, 1, "{:?}", img.stats());
    img.close().unwrap();
}
