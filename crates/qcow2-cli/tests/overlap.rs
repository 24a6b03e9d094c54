//! Overlap checks against QEMU 10: writes through L2 entries that point at
//! metadata (snapshot table, snapshot L1 tables, bitmap directory and
//! tables, refcount structures, L1/L2 tables), and allocations on an image
//! whose refcounts for an active L2 table were lost. The same request runs
//! through `qcow2 io` and `qemu-io` on copies of the same hand-made file; the
//! outcome (error, message, corrupt bit) must agree and the metadata must
//! stay intact.

mod common;
use common::*;
use qcow2_ops::format::header::{Header, AUTOCLEAR_BITMAPS, EXT_BITMAPS};
use qcow2_ops::format::{be64, bitmap, put_be64, snapshot};
use std::path::Path;

const COPIED: u64 = 1 << 63;
const OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;

/// Whether qemu-img and qemu-io are here; without them the test is skipped
/// with a visible note, or fails when CI is set.
fn have_qemu() -> bool {
    for tool in ["qemu-img", "qemu-io"] {
        let ok = std::process::Command::new(tool)
            .arg("--version")
            .output()
            .is_ok_and(|o| o.status.success());
        if !ok {
            assert!(
                std::env::var_os("CI").is_none(),
                "{tool} is required when CI is set"
            );
            eprintln!("skipped: {tool} not installed");
            return false;
        }
    }
    true
}

fn corrupt_bit(path: &Path) -> bool {
    let b = std::fs::read(path).expect("read image");
    b[79] & 2 != 0
}

/// The corrupt flag `qemu-img info` shows (`None`: it cannot open the image).
fn qemu_info_corrupt(dir: &Path, name: &str) -> Option<bool> {
    let r = qemu_img(dir, &["info", "-U", "--output=json", name]);
    if r.code != 0 {
        return None;
    }
    let v: serde_json::Value = serde_json::from_str(&r.stdout).expect("info json");
    v["format-specific"]["data"]["corrupt"].as_bool()
}

/// `qemu-img info` opens the image and calls it corrupt.
fn qemu_says_corrupt(dir: &Path, name: &str) -> bool {
    qemu_info_corrupt(dir, name) == Some(true)
}

fn set64(path: &Path, off: u64, v: u64) {
    let mut b = std::fs::read(path).expect("read image");
    put_be64(&mut b, off as usize, v);
    std::fs::write(path, b).expect("write image");
}

/// `len` bytes at `off` (fewer at the end of the file).
fn bytes(path: &Path, off: u64, len: u64) -> Vec<u8> {
    let b = std::fs::read(path).expect("read image");
    let end = ((off + len) as usize).min(b.len());
    b[off as usize..end].to_vec()
}

/// Where the structures of an image with a snapshot and a bitmap are.
#[derive(Debug)]
struct Layout {
    cs: u64,
    l1: u64,
    rt: u64,
    rb0: u64,
    /// Active L2 table of L1[0].
    l2: u64,
    snap_table: (u64, u64),
    snap_l1: u64,
    /// The snapshot's L2 table (an inactive L2 table: QEMU does not protect it).
    snap_l2: u64,
    bitmap_dir: u64,
    bitmap_table: u64,
    /// A cluster of bitmap data (not metadata for the overlap checks).
    bitmap_data: u64,
}

fn layout(path: &Path) -> Layout {
    let b = std::fs::read(path).expect("read image");
    let h = Header::parse(&b, b.len() as u64).expect("header");
    let cs = h.cluster_size();
    let (snaps, len) =
        snapshot::parse_table(&b[h.snapshots_offset as usize..], h.nb_snapshots, true)
            .expect("snapshot table");
    assert_eq!(snaps.len(), 1);
    assert_ne!(
        h.autoclear_features & AUTOCLEAR_BITMAPS,
        0,
        "bitmaps vouched for"
    );
    let ext = bitmap::BitmapsExt::parse(h.extension(EXT_BITMAPS).expect("bitmaps ext"))
        .expect("bitmaps ext");
    let d = ext.directory_offset as usize;
    let dir = bitmap::parse_directory(&b[d..d + ext.directory_size as usize], ext.nb_bitmaps)
        .expect("bitmap directory");
    let bt = dir[0].table_offset;
    let snap_l1 = snaps[0].l1_table_offset;
    Layout {
        cs,
        l1: h.l1_table_offset,
        rt: h.refcount_table_offset,
        rb0: be64(&b, h.refcount_table_offset as usize),
        l2: be64(&b, h.l1_table_offset as usize) & OFFSET_MASK,
        snap_table: (h.snapshots_offset, len),
        snap_l1,
        snap_l2: be64(&b, snap_l1 as usize) & OFFSET_MASK,
        bitmap_dir: ext.directory_offset,
        bitmap_table: bt,
        bitmap_data: be64(&b, bt as usize) & bitmap::BTE_OFFSET_MASK,
    }
}

/// A QEMU-made image with data, an internal snapshot (so the active L2
/// table was copied) and a persistent bitmap holding data.
fn base(dir: &Path) -> Layout {
    let o = ImgOpts::default();
    qemu_create(dir, "base.qcow2", 1 << 20, &o, None);
    qemu_io_script(
        dir,
        "base.qcow2",
        "qcow2",
        &["write -P 0xaa 0 64k".into(), "write -P 0xbb 64k 64k".into()],
    )
    .ok("qemu-io fill");
    qemu_img(dir, &["snapshot", "-c", "s1", "base.qcow2"]).ok("snapshot");
    qemu_img(dir, &["bitmap", "--add", "base.qcow2", "b0"]).ok("bitmap");
    qemu_io_script(dir, "base.qcow2", "qcow2", &["write -P 0xcc 0 64k".into()])
        .ok("qemu-io write after snapshot");
    let l = layout(&p(dir, "base.qcow2"));
    assert!(l.bitmap_data != 0, "the bitmap has a data cluster: {l:?}");
    l
}

/// What a run printed about an overlap: the structure named, if any.
fn overlap_named(r: &Run) -> Option<String> {
    let key = "Preventing invalid write on metadata (overlaps with ";
    let i = r.stderr.find(key)? + key.len();
    let rest = &r.stderr[i..];
    Some(rest[..rest.find(')')?].to_string())
}

#[test]
fn data_writes_over_metadata_fail_like_qemu() {
    if !have_qemu() {
        return;
    }
    let t = tmpdir();
    let dir = t.path();
    let l = base(dir);
    let cs = l.cs;
    // (what the L2 entry points at, its offset, the length to keep intact,
    // QEMU's verdict: the structure it names or None when it lets the write
    // through, ours).
    type Case<'a> = (&'a str, u64, u64, Option<&'a str>, Option<&'a str>);
    let cases: Vec<Case> = vec![
        (
            "snapshot table",
            l.snap_table.0,
            l.snap_table.1,
            Some("snapshot table"),
            Some("snapshot table"),
        ),
        (
            "snapshot L1",
            l.snap_l1,
            8,
            Some("inactive L1 table"),
            Some("inactive L1 table"),
        ),
        // Only the table offset and size of the first entry are compared:
        // the flags change legitimately (bitmaps marked in use at open).
        (
            "bitmap directory",
            l.bitmap_dir,
            12,
            Some("bitmap directory"),
            Some("bitmap directory"),
        ),
        // QEMU does not check bitmap tables; this engine protects them too.
        (
            "bitmap table",
            l.bitmap_table,
            8,
            None,
            Some("bitmap table"),
        ),
        (
            "refcount block",
            l.rb0,
            cs,
            Some("refcount block"),
            Some("refcount block"),
        ),
        (
            "refcount table",
            l.rt,
            cs,
            Some("refcount table"),
            Some("refcount table"),
        ),
        (
            "active L1",
            l.l1,
            8,
            Some("active L1 table"),
            Some("active L1 table"),
        ),
        (
            "active L2 (itself)",
            l.l2,
            16,
            Some("active L2 table"),
            Some("active L2 table"),
        ),
        // Not metadata for either: the write goes through.
        ("inactive L2", l.snap_l2, 0, None, None),
        ("bitmap data", l.bitmap_data, 0, None, None),
    ];
    let mut failures = Vec::new();
    for (i, (what, target, keep, qemu_want, ours_want)) in cases.iter().enumerate() {
        let case = format!("{i}");
        let (q, o) = (format!("q{case}.qcow2"), format!("o{case}.qcow2"));
        copy(dir, "base.qcow2", &q);
        // L2 entry 0 (guest offset 0) now points at the structure, in place.
        set64(&p(dir, &q), l.l2, COPIED | (target & !(cs - 1)));
        copy(dir, &q, &o);
        let before = bytes(&p(dir, &o), *target, *keep);
        let cmd = ["write -P 0x5a 0 64k".to_string()];
        let qr = qemu_io_script(dir, &q, "qcow2", &cmd);
        let or = ours_io_script(dir, &o, &[], &cmd);
        // QEMU's corruption event, word for word.
        let event = |r: &Run| {
            r.stderr
                .lines()
                .find(|l| l.starts_with("qcow2: Marking image as corrupt: "))
                .map(str::to_string)
        };
        if event(&qr).is_some() {
            assert_eq!(event(&or), event(&qr), "{what}: corruption event on stderr");
        }
        let check = |who: &str, r: &Run, file: &str, want: &Option<&str>| -> Vec<String> {
            let mut bad = Vec::new();
            let named = overlap_named(r);
            let failed = r.stdout.contains("write failed: Input/output error");
            let corrupt = corrupt_bit(&p(dir, file));
            if named.as_deref() != *want || failed != want.is_some() || corrupt != want.is_some() {
                bad.push(format!(
                    "{what}: {who}: want {want:?}, got named={named:?} failed={failed} \
                     corrupt={corrupt}\nstdout: {}\nstderr: {}",
                    r.stdout, r.stderr
                ));
            }
            let info = qemu_info_corrupt(dir, file);
            if info != Some(corrupt) {
                bad.push(format!(
                    "{what}: {who}: qemu-img info says corrupt={info:?} (None: cannot open)"
                ));
            }
            bad
        };
        failures.extend(check("qemu-io", &qr, &q, qemu_want));
        failures.extend(check("qcow2 io", &or, &o, ours_want));
        if ours_want.is_some() && bytes(&p(dir, &o), *target, *keep) != before {
            failures.push(format!("{what}: qcow2 io changed the structure's bytes"));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn refused_overlap_returns_eio_through_the_api() {
    if !have_qemu() {
        return;
    }
    let t = tmpdir();
    let dir = t.path();
    let l = base(dir);
    let path = p(dir, "base.qcow2");
    set64(&path, l.l2, COPIED | l.snap_table.0);
    let before = bytes(&path, l.snap_table.0, l.snap_table.1);
    let img = qcow2_ops::Image::open(&path, &qcow2_ops::OpenOptions::read_write()).expect("open");
    let e = img.write(0, &[0x5a; 4096], 0).expect_err("write must fail");
    assert_eq!(e.errno(), -5, "-EIO: {e}");
    assert!(
        e.to_string()
            .contains("Preventing invalid write on metadata (overlaps with snapshot table)"),
        "{e}"
    );
    assert!(e.to_string().contains("base.qcow2"), "names the image: {e}");
    // The image turned read-only: later writes fail too, nothing is written.
    assert!(img.write(0, &[0x5a; 4096], 0).is_err());
    drop(img);
    assert!(corrupt_bit(&path));
    assert_eq!(bytes(&path, l.snap_table.0, l.snap_table.1), before);
}

#[test]
fn l2_table_on_snapshot_or_bitmap_metadata_is_refused() {
    if !have_qemu() {
        return;
    }
    let t = tmpdir();
    let dir = t.path();
    let l = base(dir);
    // L1[0] points at the structure: the L2 table would be written over it.
    // QEMU refuses when writing the table back ("snapshot table", or when it
    // opens and stores the bitmaps: "active L2 table"); this engine refuses
    // on first use.
    for (i, (target, ours_name)) in [
        (l.snap_table.0, "snapshot table"),
        (l.snap_l1, "inactive L1 table"),
        (l.bitmap_dir, "bitmap directory"),
    ]
    .into_iter()
    .enumerate()
    {
        let (q, o) = (format!("l1q{i}.qcow2"), format!("l1o{i}.qcow2"));
        copy(dir, "base.qcow2", &q);
        set64(&p(dir, &q), l.l1, COPIED | target);
        copy(dir, &q, &o);
        let before = bytes(&p(dir, &o), target, l.cs);
        let cmd = ["write -P 0x5a 0 64k".to_string()];
        let or = ours_io_script(dir, &o, &[], &cmd);
        if ours_name == "bitmap directory" {
            // Marking the bitmaps in use at open would write the directory
            // over what the L1 table calls an L2 table: as QEMU, the image
            // is marked corrupt naming the active L2 table (QEMU at the
            // same point of its open; ours fails that open).
            assert!(
                or.stderr.contains("overlaps with active L2 table"),
                "{ours_name}: {}",
                or.stderr
            );
        } else {
            assert!(
                or.stderr.contains(&format!("overlaps the {ours_name}")),
                "{ours_name}: {}",
                or.stderr
            );
            assert!(or.stdout.contains("write failed: Input/output error"));
        }
        assert!(corrupt_bit(&p(dir, &o)) && qemu_says_corrupt(dir, &o));
        assert_eq!(
            bytes(&p(dir, &o), target, l.cs),
            before,
            "{ours_name} intact"
        );
        let qr = qemu_io_script(dir, &q, "qcow2", &cmd);
        eprintln!(
            "L1 -> {ours_name}: qemu-io corrupt={} ({})",
            corrupt_bit(&p(dir, &q)),
            overlap_named(&qr).unwrap_or_else(|| "no overlap reported".into())
        );
    }
}

/// A QEMU-made image with 512-byte clusters (256 per refcount block): the
/// first cluster of refcount block 1's range holds guest data, the second an
/// active L2 table, and the refcount table entry of block 1 is zeroed, so
/// both look free. The next allocation needs a new refcount block, whose
/// natural place is that L2 table.
fn lost_refcounts(dir: &Path) -> (u64, u64) {
    let o = ImgOpts {
        cluster_size: 512,
        ..ImgOpts::default()
    };
    qemu_create(dir, "lost.qcow2", 1 << 20, &o, None);
    // header, reftable, refblock 0, L1; then per 32 KiB of guest space one L2
    // table and 64 data clusters. 124k..124.5k lands on cluster 256 (the
    // first of block 1), refcount block 1 goes to 257, the next L2 to 258.
    qemu_io_script(
        dir,
        "lost.qcow2",
        "qcow2",
        &[
            "write -P 1 0 32k".into(),
            "write -P 2 32k 32k".into(),
            "write -P 3 64k 32k".into(),
            "write -P 4 96k 28k".into(),
            "write -P 5 124k 512".into(),
            "write -P 6 128k 4k".into(),
        ],
    )
    .ok("qemu-io fill");
    let path = p(dir, "lost.qcow2");
    let mut b = std::fs::read(&path).expect("read");
    let h = Header::parse(&b, b.len() as u64).expect("header");
    let (l1, rt) = (h.l1_table_offset as usize, h.refcount_table_offset as usize);
    let l2 = be64(&b, l1 + 4 * 8) & OFFSET_MASK;
    assert_eq!(
        (be64(&b, rt + 8), l2),
        (257 * 512, 258 * 512),
        "layout of the QEMU-made image changed"
    );
    // Move the L2 table of guest 128k.. onto cluster 257 (the old refcount
    // block) and drop refcount block 1 from the table: clusters 256.. lost
    // their refcounts.
    let (from, to) = (l2 as usize, 257 * 512usize);
    let t: Vec<u8> = b[from..from + 512].to_vec();
    b[to..to + 512].copy_from_slice(&t);
    b[from..from + 512].fill(0);
    put_be64(&mut b, l1 + 4 * 8, COPIED | to as u64);
    put_be64(&mut b, rt + 8, 0);
    std::fs::write(&path, b).expect("write");
    (256 * 512, to as u64)
}

#[test]
fn new_refcount_block_never_lands_on_an_l2_table() {
    if !have_qemu() {
        return;
    }
    let t = tmpdir();
    let dir = t.path();
    let (data, l2) = lost_refcounts(dir);
    // Guest data reads back before the write.
    let verify = ["read -P 6 128k 4k".to_string(), "read -P 5 124k 512".into()];
    qemu_io_script(dir, "lost.qcow2", "qcow2", &verify).ok("qemu-io read before");
    copy(dir, "lost.qcow2", "q.qcow2");
    copy(dir, "lost.qcow2", "o.qcow2");
    let before = std::fs::read(p(dir, "lost.qcow2")).expect("read");
    // Guest 160k has no L2 table yet: the write allocates.
    let cmd = ["write -P 7 160k 512".to_string()];
    let qr = qemu_io_script(dir, "q.qcow2", "qcow2", &cmd);
    let or = ours_io_script(dir, "o.qcow2", &[], &cmd);
    assert_eq!(
        overlap_named(&qr).as_deref(),
        Some("active L2 table"),
        "{qr:?}"
    );
    assert_eq!(
        overlap_named(&or).as_deref(),
        Some("active L2 table"),
        "{or:?}"
    );
    assert!(
        or.stdout.contains("write failed: Input/output error"),
        "{or:?}"
    );
    assert_ne!(or.code, 0);
    assert!(qemu_says_corrupt(dir, "q.qcow2") && qemu_says_corrupt(dir, "o.qcow2"));
    // Nothing but the corrupt bit changed, as with QEMU.
    let ours = std::fs::read(p(dir, "o.qcow2")).expect("read");
    let theirs = std::fs::read(p(dir, "q.qcow2")).expect("read");
    assert_eq!(ours.len(), before.len(), "file length");
    let changed: Vec<usize> = (0..ours.len()).filter(|&i| ours[i] != before[i]).collect();
    assert_eq!(changed, vec![79], "only the corrupt bit may change");
    assert!(ours == theirs, "same bytes as after qemu-io");
    let (d, l) = (data as usize, l2 as usize);
    assert_eq!(ours[l..l + 512], before[l..l + 512], "L2 table intact");
    assert_eq!(ours[d..d + 512], before[d..d + 512], "guest data intact");
    // And it all still reads back (read-only, the image is marked corrupt).
    let r = ours_io_script(dir, "o.qcow2", &["-r"], &verify);
    assert_eq!(r.code, 0, "{r:?}");
}

/// `prog args...` in `dir` with stderr sent into the stdout pipe, as
/// scripts and QEMU's tests run qemu-io (`2>&1 | filter`): the order of
/// the two streams is part of the output.
fn combined(dir: &Path, prog: &str, args: &[String]) -> (String, i32) {
    let o = std::process::Command::new("sh")
        .arg("-c")
        .arg("exec \"$0\" \"$@\" 2>&1")
        .arg(prog)
        .args(args)
        .current_dir(dir)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {prog}: {e}"));
    (
        String::from_utf8_lossy(&o.stdout).into_owned(),
        o.status.code().unwrap_or(-1),
    )
}

/// The same qemu-io command line through QEMU's qemu-io (`qemu_args`) and
/// through ours under the name qemu-io (`our_args`), each as [`combined`].
fn both_combined(
    dir: &Path,
    qemu_args: &[String],
    our_args: &[String],
) -> ((String, i32), (String, i32)) {
    let link = dir.join("bin").join("qemu-io");
    if !link.exists() {
        std::fs::create_dir_all(dir.join("bin")).expect("mkdir");
        std::os::unix::fs::symlink(qcow2_bin(), &link).expect("symlink");
    }
    (
        combined(dir, "qemu-io", qemu_args),
        combined(dir, link.to_str().expect("utf-8 path"), our_args),
    )
}

/// QEMU's `overlap-check.inactive-l2` (and the `all` template): the
/// snapshots' L2 tables are protected too, and while a snapshot's L1 table
/// cannot be read (offset not cluster aligned, size too large) every write
/// to the image file fails with QEMU's errno, the image not marked
/// corrupt (with bitmaps, the open fails: marking them in use is such a
/// write); the close that cannot write its refcount blocks says so before
/// the buffered output. Same combined output, exit status, corrupt bit and
/// `qemu-img check` verdict as qemu-io.
#[test]
fn inactive_l2_check_like_qemu() {
    if !have_qemu() {
        return;
    }
    let t = tmpdir();
    let dir = t.path();
    let l = base(dir);
    // The same history without the bitmap (the layout of interest is the
    // same: data, a snapshot, then a write that copied the L2 table).
    qemu_create(dir, "plain.qcow2", 1 << 20, &ImgOpts::default(), None);
    qemu_io_script(
        dir,
        "plain.qcow2",
        "qcow2",
        &["write -P 0xaa 0 64k".into(), "write -P 0xbb 64k 64k".into()],
    )
    .ok("qemu-io fill");
    qemu_img(dir, &["snapshot", "-c", "s1", "plain.qcow2"]).ok("snapshot");
    qemu_io_script(dir, "plain.qcow2", "qcow2", &["write -P 0xcc 0 64k".into()])
        .ok("qemu-io write after snapshot");
    let pl = {
        let b = std::fs::read(p(dir, "plain.qcow2")).expect("read");
        let h = Header::parse(&b, b.len() as u64).expect("header");
        let (snaps, _) =
            snapshot::parse_table(&b[h.snapshots_offset as usize..], h.nb_snapshots, true)
                .expect("snapshot table");
        let snap_l1 = snaps[0].l1_table_offset;
        (
            be64(&b, h.l1_table_offset as usize) & OFFSET_MASK,
            h.snapshots_offset,
            snap_l1,
            be64(&b, snap_l1 as usize) & OFFSET_MASK,
        )
    };
    let (l2, entry, snap_l1, snap_l2) = pl;
    assert_ne!(l2, snap_l2, "the active L2 table was copied");
    type Poke = Box<dyn Fn(&Path)>;
    let onto_snap_l2: fn(u64, u64) -> Poke =
        |l2, snap_l2| Box::new(move |f: &Path| set64(f, l2, COPIED | snap_l2));
    let unaligned: fn(u64, u64) -> Poke =
        |entry, snap_l1| Box::new(move |f: &Path| set64(f, entry, snap_l1 + 0x200));
    let too_large: fn(u64) -> Poke = |entry| {
        Box::new(move |f: &Path| {
            let mut b = std::fs::read(f).expect("read");
            let at = entry as usize + 8;
            b[at..at + 4].copy_from_slice(&0x1000_0000u32.to_be_bytes());
            std::fs::write(f, b).expect("write");
        })
    };
    // (what, image, open option, poke, command)
    let cases: Vec<(&str, &str, &str, Poke, &str)> = vec![
        (
            "write through an L2 entry onto the snapshot's L2 table",
            "plain.qcow2",
            "overlap-check.inactive-l2=on",
            onto_snap_l2(l2, snap_l2),
            "write -P 0x5a 0 64k",
        ),
        (
            "the same under the all template",
            "plain.qcow2",
            "overlap-check=all",
            onto_snap_l2(l2, snap_l2),
            "write -P 0x5a 0 64k",
        ),
        (
            "the same unchecked (cached template)",
            "plain.qcow2",
            "overlap-check=cached",
            onto_snap_l2(l2, snap_l2),
            "write -P 0x5a 0 64k",
        ),
        (
            "snapshot L1 table offset not aligned",
            "plain.qcow2",
            "overlap-check.inactive-l2=on",
            unaligned(entry, snap_l1),
            "write -P 0x5a 64k 4k",
        ),
        (
            // An L2 table must be allocated (the entry is zeroed first):
            // QEMU's first write is then a refcount block, refused.
            "snapshot L1 table too large",
            "plain.qcow2",
            "overlap-check.inactive-l2=on",
            too_large(entry),
            "write -P 0x5a 4M 4k",
        ),
        (
            "unaligned snapshot L1 table, check off",
            "plain.qcow2",
            "overlap-check.inactive-l2=off",
            unaligned(entry, snap_l1),
            "write -P 0x5a 64k 4k",
        ),
        (
            "unaligned snapshot L1 table, bitmaps to mark in use",
            "base.qcow2",
            "overlap-check.inactive-l2=on",
            unaligned(l.snap_table.0, l.snap_l1),
            "write -P 0x5a 64k 4k",
        ),
    ];
    let mut failures = Vec::new();
    for (i, (what, src, opt, poke, cmd)) in cases.iter().enumerate() {
        let (q, o) = (format!("q{i}.qcow2"), format!("o{i}.qcow2"));
        copy(dir, src, &q);
        poke(&p(dir, &q));
        copy(dir, &q, &o);
        let args = |img: &str| {
            vec![
                "-c".to_string(),
                format!("open -o {opt} {img}"),
                "-c".to_string(),
                cmd.to_string(),
            ]
        };
        let ((qout, qcode), (oout, ocode)) = both_combined(dir, &args(&q), &args(&o));
        let lines = |s: &str, name: &str| {
            s.lines()
                .filter(|l| !is_timing_line(l))
                .map(|l| l.replace(name, "IMG"))
                .collect::<Vec<_>>()
        };
        if lines(&oout, &o) != lines(&qout, &q) || ocode != qcode {
            failures.push(format!(
                "{what}: output differs (exit {ocode} vs {qcode})\n--- ours:\n{oout}--- qemu-io:\n{qout}"
            ));
        }
        if corrupt_bit(&p(dir, &o)) != corrupt_bit(&p(dir, &q)) {
            failures.push(format!("{what}: corrupt bit differs"));
        }
        let check = |f: &str| {
            let r = qemu_img(dir, &["check", "-U", f]);
            (r.code, r.stdout.replace(f, "IMG"))
        };
        if check(&o) != check(&q) {
            failures.push(format!(
                "{what}: qemu-img check differs\n--- ours:\n{:?}\n--- qemu-io:\n{:?}",
                check(&o),
                check(&q)
            ));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n\n"));
}

/// After a corruption event on an image open read-write, QEMU makes the
/// device unusable: every later request fails with "No medium found"
/// (each command in its own words: `getlength`, `is_allocated`, "Failed
/// to query image length", "No medium inserted", a silent flush and info)
/// and the close writes nothing. Same combined output and exit status as
/// qemu-io, same file afterwards.
#[test]
fn device_unusable_after_corruption_like_qemu() {
    if !have_qemu() {
        return;
    }
    let t = tmpdir();
    let dir = t.path();
    qemu_create(dir, "base.qcow2", 1 << 20, &ImgOpts::default(), None);
    qemu_io_script(dir, "base.qcow2", "qcow2", &["write -P 1 0 64k".into()]).ok("fill");
    // L2 entry 0 now points at the active L1 table: the next write to it
    // is refused and marks the image corrupt.
    let b = std::fs::read(p(dir, "base.qcow2")).expect("read");
    let h = Header::parse(&b, b.len() as u64).expect("header");
    let l2 = be64(&b, h.l1_table_offset as usize) & OFFSET_MASK;
    set64(&p(dir, "base.qcow2"), l2, COPIED | h.l1_table_offset);
    copy(dir, "base.qcow2", "q.qcow2");
    copy(dir, "base.qcow2", "o.qcow2");
    let script = [
        "write -P 2 0 4k",
        "read 0 4k",
        "write 64k 4k",
        "readv 0 4k",
        "writev 0 4k",
        "write -z 0 4k",
        "discard 0 4k",
        "alloc 0 4k",
        "length",
        "map",
        "flush",
        "aio_read 0 4k",
        "aio_flush",
        "info",
        "truncate 2M",
        "write -c 0 64k",
        "read -b 0 512",
    ];
    let args = |img: &str| {
        let mut a: Vec<String> = script
            .iter()
            .flat_map(|c| ["-c".to_string(), c.to_string()])
            .collect();
        a.push(img.to_string());
        a
    };
    let ((qout, qcode), (oout, ocode)) = both_combined(dir, &args("q.qcow2"), &args("o.qcow2"));
    assert!(
        qout.contains("read failed: No medium found"),
        "QEMU makes the device unusable:\n{qout}"
    );
    assert_eq!(
        oout.replace("o.qcow2", "IMG"),
        qout.replace("q.qcow2", "IMG"),
        "combined output (left ours)"
    );
    assert_eq!(ocode, qcode, "exit status");
    assert_same_bytes(dir, "o.qcow2", "q.qcow2", "the files afterwards");
}

/// While a snapshot's L1 table cannot be read under `overlap-check=all`,
/// nothing at all reaches the file, on any path: 401 writes that each need
/// a new L2 table (512-byte clusters), and with them new refcount blocks
/// and cache evictions, leave the file byte-identical, as qemu-io does.
#[test]
fn inactive_l2_gate_lets_nothing_through() {
    if !have_qemu() {
        return;
    }
    let t = tmpdir();
    let dir = t.path();
    let o = ImgOpts {
        cluster_size: 512,
        ..ImgOpts::default()
    };
    qemu_create(dir, "base.qcow2", 64 << 20, &o, None);
    qemu_io_script(dir, "base.qcow2", "qcow2", &["write -P 1 0 64k".into()]).ok("fill");
    qemu_img(dir, &["snapshot", "-c", "s1", "base.qcow2"]).ok("snapshot");
    let b = std::fs::read(p(dir, "base.qcow2")).expect("read");
    let h = Header::parse(&b, b.len() as u64).expect("header");
    let entry = h.snapshots_offset;
    set64(&p(dir, "base.qcow2"), entry, be64(&b, entry as usize) + 8);
    copy(dir, "base.qcow2", "q.qcow2");
    copy(dir, "base.qcow2", "o.qcow2");
    let args = |img: &str| {
        let mut a = vec!["-c".to_string(), format!("open -o overlap-check=all {img}")];
        for i in 0..401u64 {
            a.push("-c".into());
            a.push(format!("write -P 2 {} 512", i * 8192));
        }
        a
    };
    let ((qout, qcode), (oout, ocode)) = both_combined(dir, &args("q.qcow2"), &args("o.qcow2"));
    assert!(
        qout.contains("write failed: Invalid argument"),
        "QEMU refuses the writes:\n{qout}"
    );
    assert_eq!(oout, qout, "combined output (left ours)");
    assert_eq!(ocode, qcode, "exit status");
    assert_same_bytes(dir, "q.qcow2", "base.qcow2", "qemu-io left the file alone");
    assert_same_bytes(dir, "o.qcow2", "base.qcow2", "ours left the file alone");
}
