//! The work of `map` and `check` follows the tables the file holds, not how
//! often its L1 tables claim them: on the hand-made images of
//! fuzz/regress/image_ops (fuzz/make-regress.py), whose L1 entries all share
//! one L2 table, each distinct table is walked once.

use qcow2_ops::*;
use std::path::PathBuf;

fn regress(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../fuzz/regress/image_ops")
        .join(name)
}

fn open(name: &str) -> Image {
    let mut o = OpenOptions::read_only();
    o.open_backing = false;
    Image::open(regress(name), &o).unwrap_or_else(|e| panic!("{name}: {e}"))
}

fn lookups(img: &Image) -> u64 {
    let s = img.stats();
    s.l2_hits + s.l2_misses
}

/// far-refs: 2048 L1 entries (16 KiB clusters) all point at one L2 table of
/// 2048 entries: 4 Mi clusters of guest space behind 80 KiB of file.
#[test]
fn map_walks_a_shared_l2_table_once() {
    let img = open("far-refs");
    let before = lookups(&img);
    let m = img.map().unwrap();
    let walked = lookups(&img) - before;
    // One extent per L1 entry (the table's entries are contiguous, but each
    // repetition starts over at the same host offset).
    assert_eq!(m.len(), 2048, "{:?}", &m[..3]);
    assert!(m.iter().all(|e| e.data && e.offset == Some(1 << 55)));
    assert_eq!(m.iter().map(|e| e.length).sum::<u64>(), img.virtual_size());
    assert!(
        walked <= 2 * 2048,
        "map looked up {walked} L2 entries for a file holding one table of 2048"
    );
}

#[test]
fn check_counts_shared_tables_without_keeping_every_message() {
    let img = open("far-refs");
    let r = img.check(RepairMode::None).unwrap();
    // 2048 x 2048 references past the end of the file, as qemu-img counts
    // them (the cmp-* images of tests/bounded.rs in qcow2-cli compare the
    // counts with qemu-img on smaller versions of the same shape).
    assert_eq!(r.corruptions, 2048 * 2048 + 2048 + 1);
    assert_eq!(r.allocated_clusters, 2048 * 2048);
    assert!(r.messages.len() <= 10_001, "{} messages", r.messages.len());
    assert!(r
        .messages
        .last()
        .unwrap()
        .contains("more messages not shown"));
}
