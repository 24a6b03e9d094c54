//! Crash safety: power loss at every mutating I/O of a workload, and I/O
//! errors (EIO, ENOSPC) injected at every one, on images made by qemu-img
//! and qemu-io. QEMU 10 is the oracle: after any crash `qemu-img check`
//! finds no corruption (leaks are fine), `check -r leaks` of ours leaves it
//! clean, flushed data survives, and every unit (cluster, or sector where
//! data is overwritten in place) reads one of its states between the last
//! flush and the interrupted request.
//!
//! By default crash points are sampled (every point next to a sync plus an
//! even spread, ~2 minutes in a debug build); `QCOW2_CRASH_FULL=1`
//! enumerates every crash point and more power-loss subsets.

mod crash_util;

use crash_util::*;
use qcow2_io::{FaultPlan, FaultStorage};
use qcow2_ops::*;
use std::path::Path;
use std::sync::Arc;

const K: u64 = 1024;
const M: u64 = 1024 * 1024;
const U: u32 = REQ_MAY_UNMAP;

fn wl_alloc() -> Workload {
    // 4 KiB clusters: one L2 table covers 2 MiB, so writes at 2 MiB, 4 MiB and
    // 6 MiB allocate new L2 tables.
    Workload {
        name: "alloc",
        create: "cluster_size=4096",
        size: 8 * M,
        fill: &["write -P 0x11 0 64k", "write -P 0x12 1M 8k"],
        ops: vec![
            Op::Write(128 * K, 8 * K, 0x21),
            Op::Write(2 * M + 4 * K, 12 * K, 0x22),
            Op::Flush,
            Op::Write(4 * M + 1000, 3000, 0x23),
            Op::Write(6 * M - 4 * K, 8 * K, 0x24),
            Op::Flush,
            Op::Write(M + 8 * K, 4 * K, 0x25),
            Op::Write(7 * M, 32 * K, 0x26),
        ],
        unit: 4096,
    }
}

fn wl_zero() -> Workload {
    Workload {
        name: "zero",
        create: "cluster_size=65536",
        size: 8 * M,
        fill: &[
            "write -P 0x31 0 1M",
            "write -c -P 0x32 2M 128k",
            "write -P 0x33 3M 128k",
            "write -z 3M 64k",
        ],
        ops: vec![
            Op::Zero(0, 128 * K, U),
            Op::Zero(256 * K, 192 * K, 0),
            Op::Flush,
            Op::Zero(2 * M, 64 * K, 0),
            Op::Zero(2 * M + 64 * K, 64 * K, U),
            Op::Zero(3 * M, 128 * K, U),
            Op::Write(4 * M, 128 * K, 0x34),
            Op::Flush,
            Op::Zero(256 * K, 64 * K, U),
            Op::Write(320 * K, 64 * K, 0x35),
            Op::Zero(5 * M, 64 * K, 0),
            Op::Zero(6 * M + 512, 1024, U),
            Op::Write(0, 64 * K, 0x36),
        ],
        unit: 65536,
    }
}

fn wl_discard() -> Workload {
    Workload {
        name: "discard",
        create: "cluster_size=65536",
        size: 8 * M,
        fill: &["write -P 0x41 0 2M", "write -c -P 0x42 4M 256k"],
        ops: vec![
            Op::Discard(0, 256 * K),
            Op::Discard(M, 64 * K),
            Op::Flush,
            Op::Write(0, 64 * K, 0x43),
            Op::Discard(4 * M, 128 * K),
            Op::Discard(512 * K, 512 * K),
            Op::Write(6 * M, 128 * K, 0x44),
            Op::Flush,
            Op::Discard(6 * M, 64 * K),
            Op::Write(512 * K, 64 * K, 0x45),
            Op::Discard(7 * M, 64 * K),
        ],
        unit: 65536,
    }
}

fn wl_cow() -> Workload {
    Workload {
        name: "cow",
        create: "cluster_size=65536",
        size: 8 * M,
        fill: &[
            "write -c -P 0x51 0 512k",
            "write -P 0x52 1M 256k",
            "write -z 2M 128k",
            "write -P 0x53 3M 64k",
            "write -z 3M 64k",
        ],
        ops: vec![
            Op::Write(4 * K, 8 * K, 0x61),
            Op::Write(124 * K, 8 * K, 0x62),
            Op::Write(2 * M + 512, 1024, 0x63),
            Op::Flush,
            Op::Write(3 * M + 4 * K, 4 * K, 0x64),
            Op::Write(5 * M + 100, 200, 0x65),
            Op::Write(256 * K, 128 * K, 0x66),
            Op::Flush,
            Op::Write(448 * K + 10, 70 * K, 0x67),
        ],
        unit: 65536,
    }
}

fn wl_inplace() -> Workload {
    // Overwrites of allocated clusters go in place: only sectors are atomic.
    Workload {
        name: "inplace",
        create: "cluster_size=65536",
        size: 4 * M,
        fill: &["write -P 0x71 0 1M"],
        ops: vec![
            Op::Write(4 * K, 8 * K, 0x72),
            Op::Flush,
            Op::Write(M, 64 * K, 0x73),
            Op::Write(60 * K, 8 * K, 0x74),
            Op::Zero(200 * K, 1000, 0),
            Op::Flush,
            Op::Write(128 * K, 64 * K, 0x75),
            Op::Write(2 * M - 512, 1024, 0x76),
        ],
        unit: 512,
    }
}

fn wl_mapped() -> Workload {
    // Writes the way the NBD server's event loop makes them (mapped, the
    // caller moving the data) mixed with allocating writes, zeroes and
    // discards on the engine's own path.
    Workload {
        name: "mapped",
        create: "cluster_size=4096",
        size: 4 * M,
        fill: &["write -P 0x61 0 1M"],
        ops: vec![
            Op::WriteM(4 * K, 8 * K, 0x62),
            Op::WriteM(2 * M, 4 * K, 0x63),
            Op::Flush,
            Op::WriteM(64 * K, 16 * K, 0x64),
            Op::Write(3 * M, 8 * K, 0x65),
            Op::WriteM(3 * M, 4 * K, 0x66),
            Op::Discard(128 * K, 8 * K),
            Op::WriteM(128 * K, 4 * K, 0x67),
            Op::Flush,
            Op::WriteM(512 * K, 4 * K, 0x68),
            Op::Zero(520 * K, 4 * K, 0),
            Op::WriteM(520 * K, 4 * K, 0x69),
        ],
        unit: 512,
    }
}

fn wl_refcount_growth() -> Workload {
    // 512-byte clusters with 64-bit refcounts: a refcount block covers 64
    // clusters and the one-cluster refcount table 4096 clusters (2 MiB of
    // file). The fill ends just below that, so the workload grows both.
    Workload {
        name: "refgrow",
        create: "cluster_size=512,refcount_bits=64",
        size: 8 * M,
        fill: &["write -P 0x81 0 1900k"],
        ops: vec![
            Op::Write(2 * M, 64 * K, 0x82),
            Op::Flush,
            Op::Write(3 * M, 64 * K, 0x83),
            Op::Zero(0, 32 * K, U),
            Op::Flush,
            Op::Write(4 * M, 32 * K, 0x84),
            Op::Discard(3 * M, 16 * K),
        ],
        unit: 512,
    }
}

fn wl_lazy() -> Workload {
    Workload {
        name: "lazy",
        create: "cluster_size=65536,lazy_refcounts=on",
        size: 8 * M,
        fill: &["write -P 0x91 0 512k", "write -c -P 0x92 1M 128k"],
        ops: vec![
            Op::Write(2 * M, 128 * K, 0x93),
            Op::Flush,
            Op::Zero(0, 128 * K, U),
            Op::Discard(M, 64 * K),
            Op::Write(3 * M + 512, 1024, 0x94),
            Op::Flush,
            Op::Write(0, 64 * K, 0x95),
            Op::Zero(256 * K, 64 * K, 0),
        ],
        unit: 65536,
    }
}

fn wl_lazy_alloc() -> Workload {
    // Lazy refcounts, 4 KiB clusters: new L2 tables at 2, 4 and 6 MiB,
    // clusters freed and reused while the image is dirty.
    Workload {
        name: "lazy-alloc",
        create: "cluster_size=4096,lazy_refcounts=on",
        size: 8 * M,
        fill: &["write -P 0xa1 0 64k"],
        ops: vec![
            Op::Write(128 * K, 8 * K, 0xa2),
            Op::Write(2 * M + 4 * K, 12 * K, 0xa3),
            Op::Flush,
            Op::Discard(0, 16 * K),
            Op::Write(4 * M + 1000, 3000, 0xa4),
            Op::Flush,
            Op::Write(6 * M - 4 * K, 8 * K, 0xa5),
            Op::Write(0, 8 * K, 0xa6),
            Op::Flush,
            Op::Write(7 * M, 32 * K, 0xa7),
        ],
        unit: 4096,
    }
}

fn wl_extended() -> Workload {
    // Extended L2: 64 KiB clusters of 32 subclusters of 2 KiB.
    Workload {
        name: "extl2",
        create: "cluster_size=65536,extended_l2=on",
        size: 4 * M,
        fill: &["write -P 0xa1 0 256k", "write -P 0xa2 1M 6k"],
        ops: vec![
            Op::Write(512 * K + 2 * K, 4 * K, 0xa3),
            Op::Write(M + 10 * K, 2 * K, 0xa4),
            Op::Flush,
            Op::Zero(64 * K, 64 * K, U),
            Op::Zero(128 * K + 2 * K, 4 * K, 0),
            Op::Discard(192 * K, 64 * K),
            Op::Write(2 * M + 100, 300, 0xa5),
        ],
        unit: 2048,
    }
}

fn wl_v2() -> Workload {
    Workload {
        name: "v2",
        create: "cluster_size=65536,compat=0.10",
        size: 4 * M,
        fill: &["write -P 0xb1 0 512k"],
        ops: vec![
            Op::Zero(0, 128 * K, 0),
            Op::Write(M, 64 * K, 0xb2),
            Op::Flush,
            Op::Discard(128 * K, 64 * K),
            Op::Write(0, 64 * K, 0xb3),
        ],
        unit: 65536,
    }
}

fn wl_reuse() -> Workload {
    // Clusters freed in the session are taken again by later requests of
    // the same session (no flush in between): the freeing L2 change must be
    // durable before the refcount drops and before the hole is punched, and
    // no hole may be punched into a cluster once it was reused.
    Workload {
        name: "reuse",
        create: "cluster_size=65536",
        size: 8 * M,
        fill: &["write -P 0xc1 0 1M", "write -c -P 0xc2 2M 256k"],
        ops: vec![
            Op::Discard(0, 256 * K),
            Op::Write(4 * M, 128 * K, 0xc3),
            Op::Zero(512 * K, 128 * K, U),
            Op::Write(4 * M + 512 * K, 64 * K + 512, 0xc4),
            Op::Discard(4 * M, 64 * K),
            Op::Write(5 * M + 100, 1000, 0xc5),
            Op::Flush,
            Op::Write(2 * M, 64 * K, 0xc6),
            Op::Discard(2 * M + 64 * K, 192 * K),
            Op::Write(6 * M, 192 * K, 0xc7),
            Op::Discard(5 * M, 64 * K),
            Op::Write(0, 64 * K, 0xc8),
            Op::Write(7 * M + 4 * K, 8 * K, 0xc9),
        ],
        unit: 65536,
    }
}

fn wl_reuse_l2() -> Workload {
    // 4 KiB clusters (an L2 table per 2 MiB): freed data clusters become new
    // L2 tables and data clusters of other tables in the same session.
    Workload {
        name: "reuse_l2",
        create: "cluster_size=4096",
        size: 16 * M,
        fill: &["write -P 0xd1 0 256k"],
        ops: vec![
            Op::Discard(0, 64 * K),
            Op::Write(2 * M, 16 * K, 0xd2),
            Op::Write(4 * M + 4 * K, 8 * K, 0xd3),
            Op::Zero(64 * K, 32 * K, U),
            Op::Write(6 * M + 2 * K, 4 * K, 0xd4),
            Op::Discard(2 * M, 8 * K),
            Op::Write(8 * M, 24 * K, 0xd5),
            Op::Flush,
            Op::Discard(128 * K, 64 * K),
            Op::Write(10 * M, 4 * K, 0xd6),
            Op::Write(12 * M, 40 * K, 0xd7),
            Op::Discard(8 * M, 24 * K),
            Op::Write(14 * M, 16 * K, 0xd8),
        ],
        unit: 4096,
    }
}

fn wl_compressed() -> Workload {
    // 4 KiB clusters of one pattern compress to a few dozen bytes: many
    // share a host cluster, whose refcount grows with each one.
    Workload {
        name: "compressed",
        create: "cluster_size=4096",
        size: 8 * M,
        fill: &["write -P 0x11 0 64k", "write -c -P 0x12 1M 16k"],
        ops: vec![
            Op::WriteC(128 * K, 64 * K, 0xd1),
            Op::Flush,
            Op::WriteC(2 * M, 8 * K, 0xd2),
            Op::Discard(128 * K, 8 * K),
            Op::WriteC(128 * K, 4 * K, 0xd3),
            Op::Flush,
            Op::Zero(144 * K, 4 * K, U),
            Op::WriteC(3 * M, 128 * K, 0xd4),
            Op::Write(4 * M, 4 * K, 0xd5),
            Op::Discard(M, 8 * K),
            Op::WriteC(M, 4 * K, 0xd6),
        ],
        unit: 4096,
    }
}

fn cluster_of(w: &Workload) -> u64 {
    w.create
        .split(',')
        .find_map(|o| o.strip_prefix("cluster_size="))
        .map(|v| v.parse().unwrap())
        .unwrap_or(65536)
}

/// Everything asserted about one power-loss image. `states` are the guest
/// contents allowed (last flush .. interrupted request).
fn verify_crash_image(
    tag: &str,
    w: &Workload,
    scratch: &Path,
    bytes: &[u8],
    states: &[Vec<u8>],
) -> std::result::Result<(), String> {
    std::fs::write(scratch, bytes).unwrap();
    if is_dirty(bytes) {
        // Lazy refcounts: the data reads right before any repair...
        let img = Image::open(scratch, &OpenOptions::read_only())
            .map_err(|e| format!("{tag}: open dirty image read-only: {e}"))?;
        let mut got = vec![0u8; w.size as usize];
        img.read(0, &mut got)
            .map_err(|e| format!("{tag}: read dirty image: {e}"))?;
        drop(img);
        if let Some(m) = check_units(&got, states, w.unit) {
            let kept = keep_failure(tag, bytes);
            return Err(format!(
                "{tag}: dirty image: {m} (image kept at {})",
                kept.display()
            ));
        }
    }
    // ... and the read-write open repairs it (checked below by qemu-img).
    if let Err(m) = repair_if_dirty(scratch) {
        let kept = keep_failure(tag, bytes);
        return Err(format!("{tag}: {m} (image kept at {})", kept.display()));
    }
    let (code, out) = qemu_check(scratch);
    if code != 0 && code != 3 {
        let kept = keep_failure(tag, bytes);
        return Err(format!(
            "{tag}: qemu-img check exit {code} (image kept at {}):\n{out}",
            kept.display()
        ));
    }
    // Guest contents through our engine.
    let img =
        Image::open(scratch, &OpenOptions::read_only()).map_err(|e| format!("{tag}: open: {e}"))?;
    let mut got = vec![0u8; w.size as usize];
    img.read(0, &mut got)
        .map_err(|e| format!("{tag}: read: {e}"))?;
    drop(img);
    if let Some(m) = check_units(&got, states, w.unit) {
        let kept = keep_failure(tag, bytes);
        return Err(format!("{tag}: {m} (image kept at {})", kept.display()));
    }
    // Flushed (stable) data through qemu-io.
    if let Some(out) = qemu_io_reads(scratch, &stable_pattern_reads(states, 48)) {
        let kept = keep_failure(tag, bytes);
        return Err(format!(
            "{tag}: qemu-io pattern read failed (image kept at {}):\n{out}",
            kept.display()
        ));
    }
    // Our leak repair leaves it clean for qemu-img.
    if code == 3 {
        let img = Image::open(scratch, &OpenOptions::read_write())
            .map_err(|e| format!("{tag}: open rw: {e}"))?;
        let r = img
            .check(RepairMode::Leaks)
            .map_err(|e| format!("{tag}: check -r leaks: {e}"))?;
        drop(img);
        let (code2, out2) = qemu_check(scratch);
        if code2 != 0 || r.corruptions != 0 {
            let kept = keep_failure(tag, bytes);
            return Err(format!(
                "{tag}: after our leak repair ({r:?}) qemu-img check exit {code2} (image kept at {}):\n{out2}",
                kept.display()
            ));
        }
    }
    Ok(())
}

/// Power loss at every (sampled) mutating I/O of the workload.
fn crash_enumeration(w: Workload, budget: usize) {
    let dir = tempfile::tempdir().unwrap();
    let (path, start, guest) = start_image(dir.path(), &w);
    let cs = cluster_of(&w);
    let states = model_states(&guest, &w.ops, cs);
    let (kinds, final_bytes) = dry_run(&w, &path, &start);
    assert!(!is_dirty(&final_bytes), "{}: dirty after close", w.name);
    let scratch = dir.path().join("crash.qcow2");
    // The undisturbed run is right.
    verify_crash_image(
        &format!("{}-nocrash", w.name),
        &w,
        &scratch,
        &final_bytes,
        &states[states.len() - 1..],
    )
    .unwrap();
    let points = sample_points(&kinds, budget);
    let full = full_run();
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15 ^ w.name.len() as u64);
    let mut seen = std::collections::HashSet::new();
    let (mut images, mut failures, mut dirty) = (0usize, Vec::new(), 0usize);
    for &k in &points {
        let fs = Arc::new(FaultStorage::new(start.clone()));
        let img = Image::open_with_storage(Box::new(fs.clone()), &path, &rw_opts()).unwrap();
        fs.set_plan(FaultPlan {
            fail_at: None,
            crash_after: Some(k),
        });
        let mut lo = 0usize; // state index guaranteed durable
        let mut hi = w.ops.len(); // last state that may have reached the disk
        for (i, &op) in w.ops.iter().enumerate() {
            match exec(&img, op) {
                Ok(()) => {
                    if matches!(op, Op::Flush) {
                        lo = i + 1;
                    }
                }
                Err(e) => {
                    assert!(
                        fs.crashed(),
                        "{}: {op:?} failed without a crash: {e}",
                        w.name
                    );
                    hi = i + 1;
                    break;
                }
            }
        }
        drop(img);
        let allowed = &states[lo..=hi];
        let n = fs.pending_len();
        let mut subsets: Vec<Vec<u8>> = vec![
            fs.after_power_loss(|_| false, |_| None),
            fs.after_power_loss(|_| true, |_| None),
        ];
        // Prefixes of the unsynced writes (all, or a spread of them).
        let nprefix = if full { n } else { n.min(4) };
        for j in 1..nprefix.max(1) {
            let p = if full { j } else { j * n / nprefix };
            subsets.push(fs.after_power_loss(|i| i < p, |_| None));
        }
        // Random subsets, some writes torn at sector boundaries.
        for _ in 0..if full { 8 } else { 3 } {
            let keep: Vec<bool> = (0..n).map(|_| rng.below(2) == 0).collect();
            let torn: Vec<Option<usize>> = (0..n)
                .map(|_| match rng.below(3) {
                    0 => Some(rng.below(130) as usize),
                    _ => None,
                })
                .collect();
            subsets.push(fs.after_power_loss(|i| keep[i], |i| torn[i]));
        }
        for (s, bytes) in subsets.iter().enumerate() {
            let h = {
                use std::hash::{Hash, Hasher};
                let mut h = std::collections::hash_map::DefaultHasher::new();
                bytes.hash(&mut h);
                (lo, hi).hash(&mut h);
                h.finish()
            };
            if !seen.insert(h) {
                continue;
            }
            images += 1;
            dirty += is_dirty(bytes) as usize;
            let tag = format!("{}-k{k}-s{s}", w.name);
            if let Err(e) = verify_crash_image(&tag, &w, &scratch, bytes, allowed) {
                eprintln!("FAIL {e}");
                failures.push(e);
            }
        }
    }
    println!(
        "crash {}: {} mutating I/Os, {} crash points, {} distinct power-loss images checked ({} dirty)",
        w.name,
        kinds.len(),
        points.len(),
        images,
        dirty
    );
    if w.create.contains("lazy_refcounts=on") {
        // Not vacuous: power losses left dirty images with stale refcounts.
        assert!(dirty > 0, "{}: no power-loss image was dirty", w.name);
    }
    assert!(
        failures.is_empty(),
        "{} of {} images failed; first: {}",
        failures.len(),
        images,
        failures[0]
    );
}

/// EIO / ENOSPC at every (sampled) mutating I/O of the workload.
fn error_injection(w: Workload, budget: usize) {
    let dir = tempfile::tempdir().unwrap();
    let (path, start, guest) = start_image(dir.path(), &w);
    let cs = cluster_of(&w);
    let (kinds, _) = dry_run(&w, &path, &start);
    let total = kinds.len() as u64;
    let scratch = dir.path().join("err.qcow2");
    let mut points: Vec<(u64, i32)> = Vec::new();
    for n in sample_points(&kinds, budget) {
        let n = n + 1; // fail_at counts from 1
        if full_run() {
            points.push((n, libc::EIO));
            points.push((n, libc::ENOSPC));
        } else {
            points.push((n, if n % 2 == 0 { libc::EIO } else { libc::ENOSPC }));
        }
    }
    let mut failures: Vec<String> = Vec::new();
    let mut fail = |m: String| {
        eprintln!("FAIL {m}");
        failures.push(m);
    };
    for &(n, errno) in &points {
        let tag = format!("{}-err{n}-{errno}", w.name);
        let fs = Arc::new(FaultStorage::new(start.clone()));
        let img = Image::open_with_storage(Box::new(fs.clone()), &path, &rw_opts()).unwrap();
        fs.set_plan(FaultPlan {
            fail_at: Some((n, errno)),
            crash_after: None,
        });
        let mut failed_op: Option<usize> = None;
        // A failed sync stays failed (as in QEMU): every later sync, hence
        // every later flush, FUA or allocating request, fails too. The
        // workload stops at such an error; the handle promises nothing more.
        let sticky = kinds.get(n as usize - 1) == Some(&'s');
        // A final explicit flush, so that no injected error is left to the
        // silent flush on drop.
        let mut ops = w.ops.clone();
        ops.push(Op::Flush);
        for (i, &op) in ops.iter().enumerate() {
            let before = fs.ops();
            let r = exec(&img, op);
            let after = fs.ops();
            let hit = before < n && n <= after;
            match (&r, hit) {
                (Err(e), true) => {
                    if e.errno() != -errno {
                        fail(format!("{tag}: {op:?} failed with {e} (errno {}), want -{errno}", e.errno()));
                    }
                    failed_op = Some(i);
                    // What the disk holds right now must be consistent, with
                    // or without the writes not yet synced.
                    for (what, bytes) in [
                        ("durable", fs.after_power_loss(|_| false, |_| None)),
                        ("current", fs.current()),
                    ] {
                        std::fs::write(&scratch, &bytes).unwrap();
                        if let Err(m) = repair_if_dirty(&scratch) {
                            fail(format!("{tag}: right after the error ({what}): {m}"));
                        }
                        let (code, out) = qemu_check(&scratch);
                        if code != 0 && code != 3 {
                            let kept = keep_failure(&format!("{tag}-{what}"), &bytes);
                            fail(format!("{tag}: right after the error ({what}) qemu-img check exit {code} (kept at {}):\n{out}", kept.display()));
                        }
                    }
                }
                (Ok(()), true) => fail(format!("{tag}: injected errno swallowed by {op:?}")),
                (Err(e), false) => fail(format!(
                    "{tag}: {op:?} failed with {e} though no error was injected in it (failed op so far: {failed_op:?})"
                )),
                (Ok(()), false) => {}
            }
            if sticky && failed_op.is_some() {
                match img.flush() {
                    Err(e) if e.errno() == -errno => {}
                    r => fail(format!(
                        "{tag}: a flush after the failed sync returned {r:?}"
                    )),
                }
                break;
            }
        }
        drop(img);
        // The requests that ran: all of them, or up to a failed sync.
        let ran = match failed_op {
            Some(i) if sticky => (i + 1).min(w.ops.len()),
            _ => w.ops.len(),
        };
        if n <= total && failed_op.is_none() && fs.ops() < n {
            fail(format!(
                "{tag}: the workload did fewer I/Os than the dry run"
            ));
        }
        // Every unit reads the result with or without the failed request;
        // everything else (all flushed data among it) is exact.
        let bytes = fs.current();
        let want_with = model_states(&guest, &w.ops[..ran], cs).pop().unwrap();
        let want_without = match failed_op {
            Some(i) => {
                let ops: Vec<Op> = w.ops[..ran]
                    .iter()
                    .enumerate()
                    .filter(|&(j, _)| j != i)
                    .map(|(_, &o)| o)
                    .collect();
                model_states(&guest, &ops, cs).pop().unwrap()
            }
            None => want_with.clone(),
        };
        std::fs::write(&scratch, &bytes).unwrap();
        if let Err(m) = repair_if_dirty(&scratch) {
            fail(format!("{tag}: {m}"));
            continue;
        }
        let (code, out) = qemu_check(&scratch);
        if code != 0 && code != 3 {
            let kept = keep_failure(&tag, &bytes);
            fail(format!(
                "{tag}: qemu-img check exit {code} (kept at {}):\n{out}",
                kept.display()
            ));
            continue;
        }
        // Reopen and keep using it.
        let fs2 = Arc::new(FaultStorage::new(bytes.clone()));
        let img = match Image::open_with_storage(Box::new(fs2.clone()), &path, &rw_opts()) {
            Ok(i) => i,
            Err(e) => {
                fail(format!("{tag}: reopen failed: {e}"));
                continue;
            }
        };
        let mut allowed = vec![want_with, want_without];
        if let (Some(i), true) = (failed_op, sticky) {
            // Nothing since the last successful flush is known to be on
            // disk, and no sync can be made any more: each unit may hold any
            // state from that flush on.
            let from = w.ops[..i]
                .iter()
                .rposition(|o| matches!(o, Op::Flush))
                .map_or(0, |j| j + 1);
            allowed.extend(model_states(&guest, &w.ops[..ran], cs).drain(from..));
        }
        let mut got = vec![0u8; w.size as usize];
        img.read(0, &mut got).unwrap();
        if let Some(m) = check_units(&got, &allowed, w.unit) {
            let kept = keep_failure(&tag, &bytes);
            fail(format!(
                "{tag}: after the error in op {failed_op:?} ({:?}): {m} (kept at {})",
                failed_op.map(|i| ops[i]),
                kept.display()
            ));
        }
        let probe = w.size - 3 * cs.max(4096);
        let r = img
            .write(probe, &vec![0xee; 5000], 0)
            .and_then(|_| img.flush());
        if let Err(e) = r {
            fail(format!("{tag}: write after reopen failed: {e}"));
            continue;
        }
        let mut b = vec![0u8; 5000];
        img.read(probe, &mut b).unwrap();
        assert!(
            b.iter().all(|&x| x == 0xee),
            "{tag}: read back after reopen"
        );
        drop(img);
        std::fs::write(&scratch, fs2.current()).unwrap();
        if is_dirty(&fs2.current()) {
            fail(format!("{tag}: dirty after reopen, write, flush and close"));
        }
        let (code, out) = qemu_check(&scratch);
        if code != 0 && code != 3 {
            let kept = keep_failure(&format!("{tag}-reopened"), &fs2.current());
            fail(format!(
                "{tag}: after reopen+write qemu-img check exit {code} (kept at {}):\n{out}",
                kept.display()
            ));
        }
    }
    println!(
        "errors {}: {} mutating I/Os, {} injection points checked",
        w.name,
        total,
        points.len()
    );
    assert!(
        failures.is_empty(),
        "{} of {} injection points failed; first: {}",
        failures.len(),
        points.len(),
        failures[0]
    );
}

macro_rules! crash_tests {
    ($($name:ident, $err:ident: $wl:expr, $budget:expr;)*) => {$(
        #[test]
        fn $name() {
            crash_enumeration($wl, $budget);
        }
        #[test]
        fn $err() {
            error_injection($wl, $budget);
        }
    )*};
}

crash_tests! {
    crash_alloc, errors_alloc: wl_alloc(), 60;
    crash_zero, errors_zero: wl_zero(), 60;
    crash_discard, errors_discard: wl_discard(), 60;
    crash_cow, errors_cow: wl_cow(), 60;
    crash_inplace, errors_inplace: wl_inplace(), 40;
    crash_refcount_growth, errors_refcount_growth: wl_refcount_growth(), 60;
    crash_lazy_refcounts, errors_lazy_refcounts: wl_lazy(), 40;
    crash_lazy_alloc, errors_lazy_alloc: wl_lazy_alloc(), 60;
    crash_extended_l2, errors_extended_l2: wl_extended(), 40;
    crash_v2, errors_v2: wl_v2(), 30;
    crash_reuse, errors_reuse: wl_reuse(), 60;
    crash_reuse_l2, errors_reuse_l2: wl_reuse_l2(), 60;
    crash_compressed, errors_compressed: wl_compressed(), 60;
    crash_mapped, errors_mapped: wl_mapped(), 60;
}

// ----- persistent dirty bitmaps -----

/// One bitmap as stored: name, flags, granularity bits and its bits (as
/// many bytes as the disk needs; all-ones table entries expanded).
#[derive(Debug, Clone, PartialEq)]
struct StoredBitmap {
    name: String,
    in_use: bool,
    auto: bool,
    granularity_bits: u8,
    bits: Vec<u8>,
}

/// The bitmaps of an image file's bytes, read as QEMU would (None when the
/// autoclear bit does not vouch for them).
fn stored_bitmaps(bytes: &[u8]) -> Option<Vec<StoredBitmap>> {
    read_bitmaps(bytes, true)
}

/// The bitmaps a bitmaps extension points at; `vouched`: only when the
/// autoclear bit vouches for them (a v2 header has no autoclear field).
fn read_bitmaps(bytes: &[u8], vouched: bool) -> Option<Vec<StoredBitmap>> {
    use qcow2_ops::format::bitmap;
    use qcow2_ops::format::header::{Header, AUTOCLEAR_BITMAPS, EXT_BITMAPS};
    let h = Header::parse(bytes, bytes.len() as u64).expect("header");
    if vouched && h.autoclear_features & AUTOCLEAR_BITMAPS == 0 {
        return None;
    }
    let ext = bitmap::BitmapsExt::parse(h.extension(EXT_BITMAPS)?).expect("bitmaps extension");
    let d = ext.directory_offset as usize;
    let dir = &bytes[d..d + ext.directory_size as usize];
    let cs = h.cluster_size() as usize;
    let entries = bitmap::parse_directory(dir, ext.nb_bitmaps).expect("bitmap directory");
    Some(
        entries
            .iter()
            .map(|e| {
                let nbytes = (h.size.div_ceil(e.granularity())).div_ceil(8) as usize;
                let mut data = vec![0u8; e.table_size as usize * cs];
                for i in 0..e.table_size as usize {
                    let t = qcow2_ops::format::be64(bytes, e.table_offset as usize + i * 8);
                    let off = (t & bitmap::BTE_OFFSET_MASK) as usize;
                    let chunk = &mut data[i * cs..(i + 1) * cs];
                    if off != 0 {
                        chunk.copy_from_slice(&bytes[off..off + cs]);
                    } else if t & bitmap::BTE_ALL_ONES != 0 {
                        chunk.fill(0xff);
                    }
                }
                data.truncate(nbytes);
                // Bits past the disk end do not count.
                let nbits = h.size.div_ceil(e.granularity());
                if nbits % 8 != 0 {
                    if let Some(last) = data.last_mut() {
                        *last &= (1u8 << (nbits % 8)) - 1;
                    }
                }
                StoredBitmap {
                    name: String::from_utf8_lossy(&e.name).into_owned(),
                    in_use: e.in_use(),
                    auto: e.auto(),
                    granularity_bits: e.granularity_bits,
                    bits: data,
                }
            })
            .collect(),
    )
}

/// Sets the bits the ops dirty (each op's whole range, at the bitmap's
/// granularity, as QEMU's block layer does).
fn model_bits(start: &StoredBitmap, ops: &[Op], size: u64) -> Vec<u8> {
    let mut b = start.bits.clone();
    let g = start.granularity_bits as u32;
    let nbits = size.div_ceil(1 << g);
    for op in ops {
        let Some((o, l)) = op.range() else { continue };
        if l == 0 {
            continue;
        }
        for bit in (o >> g)..(((o + l - 1) >> g) + 1).min(nbits) {
            b[(bit / 8) as usize] |= 1 << (bit % 8);
        }
    }
    b
}

/// Power loss at every mutating I/O from open to close (the bitmap store at
/// close included) of an image with enabled and disabled bitmaps: every
/// power-loss image is clean for `qemu-img check` (leaks allowed), the
/// disabled bitmap's bits never change (it may be left marked in use, as
/// QEMU leaves it), and each enabled bitmap is either marked
/// in use (inconsistent) or correct: holding every bit the requests set, or
/// unchanged while the guest content is unchanged too.
#[test]
fn crash_bitmap_store() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bm.qcow2");
    let ps = path.to_str().unwrap();
    let size = 32 * M;
    for args in [
        vec![
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            "cluster_size=4096",
            ps,
            "32M",
        ],
        vec!["bitmap", "--add", "-g", "512", ps, "fine"],
        vec!["bitmap", "--add", "-g", "65536", ps, "coarse"],
        vec!["bitmap", "--add", "-g", "4096", ps, "frozen"],
    ] {
        let (c, m) = run("qemu-img", &args);
        assert_eq!(c, 0, "{m}");
    }
    let (c, m) = run(
        "qemu-io",
        &[
            "-c",
            "write -P 0x11 1M 64k",
            "-c",
            "write -P 0x12 15M 8k",
            ps,
        ],
    );
    assert!(c == 0 && !m.contains("failed"), "{m}");
    let (c, m) = run("qemu-img", &["bitmap", "--disable", ps, "frozen"]);
    assert_eq!(c, 0, "{m}");
    let start = std::fs::read(&path).unwrap();
    let start_bms = stored_bitmaps(&start).expect("start bitmaps");
    assert_eq!(start_bms.len(), 3);
    // The fine bitmap's data spans two clusters (16 MiB each): the first
    // has data already, the second gets its first cluster at close.
    let ops = vec![
        Op::Write(100 * K, 8 * K, 0x21),
        Op::Write(M + 512, 1000, 0x22),
        Op::Zero(20 * M, 64 * K, U),
        Op::Flush,
        Op::Discard(17 * M, M),
        Op::Zero(5 * M + 100, 3000, 0),
        Op::Write(24 * M - 4 * K, 8 * K, 0x23),
    ];
    let want: Vec<Vec<u8>> = start_bms
        .iter()
        .map(|b| {
            if b.auto {
                model_bits(b, &ops, size)
            } else {
                b.bits.clone()
            }
        })
        .collect();
    let read_guest = |bytes: &[u8]| -> Vec<u8> {
        let img = Image::open_with_storage(
            Box::new(FaultStorage::new(bytes.to_vec())),
            &path,
            &OpenOptions::read_only(),
        )
        .expect("open read-only");
        let mut g = vec![0u8; size as usize];
        img.read(0, &mut g).expect("read");
        g
    };
    let start_guest = read_guest(&start);
    let run_all = |fs: &Arc<FaultStorage>| {
        if let Ok(img) = Image::open_with_storage(Box::new(fs.clone()), &path, &rw_opts()) {
            for &op in &ops {
                if exec(&img, op).is_err() {
                    break;
                }
            }
            let _ = img.close();
        }
    };
    // Undisturbed: every enabled bitmap stored, clean, with the model's bits.
    let fs = Arc::new(FaultStorage::new(start.clone()));
    fs.set_plan(FaultPlan::default());
    run_all(&fs);
    let total = fs.ops();
    let done = stored_bitmaps(&fs.current()).expect("bitmaps after close");
    for (b, w) in done.iter().zip(&want) {
        assert!(!b.in_use, "{} still in use after close", b.name);
        assert!(
            b.bits == *w,
            "{}: stored bits differ from the model",
            b.name
        );
    }
    let scratch = dir.path().join("crash.qcow2");
    let mut rng = Rng(0x5eed_b175);
    let mut failures = Vec::new();
    let mut images = 0;
    for k in 0..total {
        let fs = Arc::new(FaultStorage::new(start.clone()));
        fs.set_plan(FaultPlan {
            fail_at: None,
            crash_after: Some(k),
        });
        run_all(&fs);
        let n = fs.pending_len();
        let mut subsets = vec![
            fs.after_power_loss(|_| false, |_| None),
            fs.after_power_loss(|_| true, |_| None),
        ];
        if n <= 6 {
            // Few unsynced writes: every subset of them.
            for mask in 1..(1u32 << n) - 1 {
                subsets.push(fs.after_power_loss(|i| mask & (1 << i) != 0, |_| None));
            }
        }
        for _ in 0..3 {
            let keep: Vec<bool> = (0..n).map(|_| rng.below(2) == 0).collect();
            let torn: Vec<Option<usize>> = (0..n)
                .map(|_| match rng.below(3) {
                    0 => Some(rng.below(10) as usize),
                    _ => None,
                })
                .collect();
            subsets.push(fs.after_power_loss(|i| keep[i], |i| torn[i]));
        }
        for (s, bytes) in subsets.iter().enumerate() {
            images += 1;
            let tag = format!("bitmaps-k{k}-s{s}");
            std::fs::write(&scratch, bytes).unwrap();
            let (code, out) = qemu_check(&scratch);
            if code != 0 && code != 3 {
                let kept = keep_failure(&tag, bytes);
                failures.push(format!(
                    "{tag}: qemu-img check exit {code} (kept at {}):\n{out}",
                    kept.display()
                ));
                continue;
            }
            let Some(bms) = stored_bitmaps(bytes) else {
                failures.push(format!("{tag}: the bitmaps autoclear bit was lost"));
                continue;
            };
            let mut guest: Option<Vec<u8>> = None;
            for ((b, w), s0) in bms.iter().zip(&want).zip(&start_bms) {
                let ok = if !s0.auto {
                    // Held in use while open (as QEMU): its bits never change.
                    b.bits == s0.bits
                } else if b.in_use || b.bits == *w {
                    true
                } else {
                    let g = guest.get_or_insert_with(|| read_guest(bytes));
                    b.bits == s0.bits && *g == start_guest
                };
                if !ok {
                    let kept = keep_failure(&tag, bytes);
                    failures.push(format!(
                        "{tag}: bitmap {} is neither in use nor correct (in_use {}, kept at {})",
                        b.name,
                        b.in_use,
                        kept.display()
                    ));
                }
            }
        }
    }
    println!(
        "crash bitmaps: {total} mutating I/Os from open to close, {images} power-loss images checked"
    );
    assert!(
        failures.is_empty(),
        "{} failures; first: {}",
        failures.len(),
        failures[0]
    );
}

/// Whether bitmap set `got` (after a power loss) is `want`: the same names,
/// flags and granularities in the same order, and the same bits unless the
/// bitmap is marked in use (inconsistent, which is safe).
fn same_bitmap_set(got: &[StoredBitmap], want: &[StoredBitmap]) -> bool {
    got.len() == want.len()
        && got.iter().zip(want).all(|(g, w)| {
            g.name == w.name
                && g.auto == w.auto
                && g.granularity_bits == w.granularity_bits
                && (g.in_use || g.bits == w.bits)
        })
}

/// Power loss at every write of one bitmap management operation (on an
/// image made by qemu-img with bitmaps holding bits): every power-loss
/// image is clean for `qemu-img check` (leaks allowed) and holds the old
/// bitmap set or the new one (bits of in-use bitmaps aside), never a mix or
/// a wrong bitmap.
fn crash_bitmap_op(tag: &str, op: BitmapOp, target: &str) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bm.qcow2");
    let ps = path.to_str().unwrap();
    for args in [
        vec![
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            "cluster_size=4096",
            ps,
            "32M",
        ],
        vec!["bitmap", "--add", "-g", "512", ps, "fine"],
        vec!["bitmap", "--add", "-g", "65536", ps, "coarse"],
        vec!["bitmap", "--add", "-g", "4096", ps, "frozen"],
    ] {
        let (c, m) = run("qemu-img", &args);
        assert_eq!(c, 0, "{m}");
    }
    let (c, m) = run(
        "qemu-io",
        &[
            "-c",
            "write -P 0x11 1M 64k",
            "-c",
            "write -P 0x12 17M 8k",
            ps,
        ],
    );
    assert!(c == 0 && !m.contains("failed"), "{m}");
    let (c, m) = run("qemu-img", &["bitmap", "--disable", ps, "frozen"]);
    assert_eq!(c, 0, "{m}");
    let late = ["bitmap", "--add", "--disable", "-g", "8192", ps, "late"];
    let (c, m) = run("qemu-img", &late);
    assert_eq!(c, 0, "{m}");
    let start = std::fs::read(&path).unwrap();
    let old = stored_bitmaps(&start).expect("start bitmaps");
    let run_op = |fs: &Arc<FaultStorage>| {
        if let Ok(img) = Image::open_with_storage(Box::new(fs.clone()), &path, &rw_opts()) {
            let _ = img.bitmap(target, &op, None);
            let _ = img.close();
        }
    };
    let fs = Arc::new(FaultStorage::new(start.clone()));
    fs.set_plan(FaultPlan::default());
    run_op(&fs);
    let total = fs.ops();
    let new = stored_bitmaps(&fs.current()).unwrap_or_default();
    assert!(
        !same_bitmap_set(&new, &old),
        "{tag}: the operation changed nothing"
    );
    assert!(new.iter().all(|b| !b.in_use), "{tag}: in use after close");
    std::fs::write(dir.path().join("done.qcow2"), fs.current()).unwrap();
    let (code, out) = qemu_check(&dir.path().join("done.qcow2"));
    assert_eq!(code, 0, "{tag}: undisturbed run not clean:\n{out}");
    let scratch = dir.path().join("crash.qcow2");
    let mut rng = Rng(0x5eed_b17a);
    let mut failures = Vec::new();
    let mut images = 0;
    for k in 0..total {
        let fs = Arc::new(FaultStorage::new(start.clone()));
        fs.set_plan(FaultPlan {
            fail_at: None,
            crash_after: Some(k),
        });
        run_op(&fs);
        let n = fs.pending_len();
        let mut subsets = vec![
            fs.after_power_loss(|_| false, |_| None),
            fs.after_power_loss(|_| true, |_| None),
        ];
        if n <= 6 {
            for mask in 1..(1u32 << n) - 1 {
                subsets.push(fs.after_power_loss(|i| mask & (1 << i) != 0, |_| None));
            }
        }
        for _ in 0..3 {
            let keep: Vec<bool> = (0..n).map(|_| rng.below(2) == 0).collect();
            let torn: Vec<Option<usize>> = (0..n)
                .map(|_| match rng.below(3) {
                    0 => Some(rng.below(10) as usize),
                    _ => None,
                })
                .collect();
            subsets.push(fs.after_power_loss(|i| keep[i], |i| torn[i]));
        }
        for (s, bytes) in subsets.iter().enumerate() {
            images += 1;
            let t = format!("{tag}-k{k}-s{s}");
            std::fs::write(&scratch, bytes).unwrap();
            let (code, out) = qemu_check(&scratch);
            if code != 0 && code != 3 {
                let kept = keep_failure(&t, bytes);
                failures.push(format!(
                    "{t}: qemu-img check exit {code} (kept at {}):\n{out}",
                    kept.display()
                ));
                continue;
            }
            let got = stored_bitmaps(bytes).unwrap_or_default();
            if !same_bitmap_set(&got, &old) && !same_bitmap_set(&got, &new) {
                let kept = keep_failure(&t, bytes);
                let names: Vec<_> = got.iter().map(|b| (&b.name, b.in_use)).collect();
                failures.push(format!(
                    "{t}: bitmap set {names:?} is neither the old nor the new one (kept at {})",
                    kept.display()
                ));
            }
        }
    }
    println!("crash {tag}: {total} mutating I/Os, {images} power-loss images checked");
    assert!(
        failures.is_empty(),
        "{} failures; first: {}",
        failures.len(),
        failures[0]
    );
}

#[test]
fn crash_bitmap_add() {
    let op = BitmapOp::Add {
        granularity: Some(4096),
        enabled: true,
    };
    crash_bitmap_op("bitmap-add", op, "new");
}

#[test]
fn crash_bitmap_remove() {
    crash_bitmap_op("bitmap-remove", BitmapOp::Remove, "fine");
}

#[test]
fn crash_bitmap_merge() {
    let op = BitmapOp::Merge {
        source: "fine".into(),
    };
    crash_bitmap_op("bitmap-merge", op, "late");
}

#[test]
fn crash_bitmap_clear() {
    crash_bitmap_op("bitmap-clear", BitmapOp::Clear, "fine");
}

/// Guest content of `p` (or of its snapshot `snap`) read by qemu-img.
fn snapshot_content(p: &Path, snap: Option<&str>) -> Option<Vec<u8>> {
    let out = p.with_extension("content.raw");
    let opt = snap.map(|s| format!("snapshot.name={s}"));
    let mut args = vec!["convert", "-f", "qcow2"];
    if let Some(o) = &opt {
        args.extend(["-l", o.as_str()]);
    }
    args.extend(["-O", "raw", p.to_str().unwrap(), out.to_str().unwrap()]);
    let (c, _) = run("qemu-img", &args);
    let r = (c == 0).then(|| std::fs::read(&out).ok()).flatten();
    let _ = std::fs::remove_file(&out);
    r
}

/// Names of the snapshots of `p` as `qemu-img snapshot -l` lists them.
fn snapshot_names(p: &Path) -> Option<Vec<String>> {
    let (c, out) = run("qemu-img", &["snapshot", "-l", p.to_str().unwrap()]);
    (c == 0).then(|| {
        out.lines()
            .skip(2)
            .filter_map(|l| l.split_whitespace().nth(1).map(str::to_string))
            .collect()
    })
}

/// Power loss at every mutating I/O of one snapshot operation on an image
/// made by qemu-img: `qemu-img check` finds no corruption (leaks allowed;
/// no OFLAG_COPIED mismatch either: create and delete are shadow-paged, see
/// shadow.rs), the active content is intact, and snapshot
/// `target` is either absent or reads exactly as it should. With `applied`
/// the operation reverts to `target` (which stays): the active content is
/// then the old one or the snapshot's.
fn crash_snapshot_op(tag: &str, op: impl Fn(&Image), target: &str, created: bool, applied: bool) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("sn.qcow2");
    let ps = path.to_str().unwrap();
    let steps: Vec<(&str, Vec<&str>)> = vec![
        ("qemu-img", vec!["create", "-q", "-f", "qcow2", ps, "8M"]),
        (
            "qemu-io",
            vec![
                "-c",
                "write -P 0x11 0 192k",
                "-c",
                "write -c -P 0x12 1M 64k",
                "-c",
                "write -P 0x13 4M 64k",
                ps,
            ],
        ),
        ("qemu-img", vec!["snapshot", "-c", "old", ps]),
        (
            "qemu-io",
            vec![
                "-c",
                "write -P 0x21 64k 64k",
                "-c",
                "write -P 0x22 6M 64k",
                ps,
            ],
        ),
    ];
    for (prog, args) in &steps {
        let (c, m) = run(prog, args);
        assert!(c == 0 && !m.contains("failed"), "{prog} {args:?}: {m}");
    }
    let active = snapshot_content(&path, None).expect("active content");
    let old_content = snapshot_content(&path, Some("old")).expect("old content");
    let want = if created {
        active.clone()
    } else {
        old_content.clone()
    };
    let mut active_ok = vec![active.clone()];
    if applied {
        active_ok.push(old_content.clone());
    }
    let start = std::fs::read(&path).unwrap();
    let run_op = |fs: &Arc<FaultStorage>| {
        if let Ok(img) = Image::open_with_storage(Box::new(fs.clone()), &path, &rw_opts()) {
            op(&img);
            let _ = img.close();
        }
    };
    let fs = Arc::new(FaultStorage::new(start.clone()));
    fs.set_plan(FaultPlan::default());
    run_op(&fs);
    let total = fs.ops();
    let done = dir.path().join("done.qcow2");
    std::fs::write(&done, fs.current()).unwrap();
    let (code, out) = qemu_check(&done);
    assert_eq!(code, 0, "{tag}: undisturbed run not clean:\n{out}");
    let names = snapshot_names(&done).unwrap();
    assert_eq!(
        names.iter().any(|n| n == target),
        created || applied,
        "{tag}: undisturbed run: {names:?}"
    );
    if applied {
        assert!(
            snapshot_content(&done, None).as_ref() == Some(&old_content),
            "{tag}: undisturbed run did not revert"
        );
    }
    let scratch = dir.path().join("crash.qcow2");
    let mut rng = Rng(0x5eed_5a95);
    let mut failures = Vec::new();
    let mut images = 0;
    for k in 0..total {
        let fs = Arc::new(FaultStorage::new(start.clone()));
        fs.set_plan(FaultPlan {
            fail_at: None,
            crash_after: Some(k),
        });
        run_op(&fs);
        let n = fs.pending_len();
        let mut subsets = vec![
            fs.after_power_loss(|_| false, |_| None),
            fs.after_power_loss(|_| true, |_| None),
        ];
        if n <= 4 {
            for mask in 1..(1u32 << n) - 1 {
                subsets.push(fs.after_power_loss(|i| mask & (1 << i) != 0, |_| None));
            }
        }
        for _ in 0..2 {
            let keep: Vec<bool> = (0..n).map(|_| rng.below(2) == 0).collect();
            let torn: Vec<Option<usize>> = (0..n)
                .map(|_| match rng.below(3) {
                    0 => Some(rng.below(10) as usize),
                    _ => None,
                })
                .collect();
            subsets.push(fs.after_power_loss(|i| keep[i], |i| torn[i]));
        }
        for (s, bytes) in subsets.iter().enumerate() {
            images += 1;
            let t = format!("{tag}-k{k}-s{s}");
            std::fs::write(&scratch, bytes).unwrap();
            let (code, out) = qemu_check(&scratch);
            let mut fail = |why: String| {
                let kept = keep_failure(&t, bytes);
                failures.push(format!("{t}: {why} (kept at {})", kept.display()));
            };
            if code != 0 && code != 3 {
                fail(format!("qemu-img check exit {code}:\n{out}"));
                continue;
            }
            let now = snapshot_content(&scratch, None);
            if !active_ok.iter().any(|a| now.as_ref() == Some(a)) {
                fail("active content changed".into());
                continue;
            }
            let Some(names) = snapshot_names(&scratch) else {
                fail("snapshot list unreadable".into());
                continue;
            };
            if names.iter().any(|n| n == target)
                && snapshot_content(&scratch, Some(target)).as_deref() != Some(&want[..])
            {
                fail(format!("snapshot {target} present but reads wrongly"));
            }
        }
    }
    println!("crash {tag}: {total} mutating I/Os, {images} power-loss images checked");
    assert!(
        failures.is_empty(),
        "{} failures; first: {}",
        failures.len(),
        failures[0]
    );
}

#[test]
fn crash_snapshot_create() {
    crash_snapshot_op(
        "snapshot-create",
        |img| {
            let _ = img.snapshot_create("new");
        },
        "new",
        true,
        false,
    );
}

#[test]
fn crash_snapshot_delete() {
    crash_snapshot_op(
        "snapshot-delete",
        |img| {
            let _ = img.snapshot_delete("old");
        },
        "old",
        false,
        false,
    );
}

#[test]
fn crash_snapshot_apply() {
    crash_snapshot_op(
        "snapshot-apply",
        |img| {
            let _ = img.snapshot_apply("old");
        },
        "old",
        false,
        true,
    );
}

/// Grow across an L1 table move (512 B clusters: 64 KiB -> 4 MiB needs two
/// L1 clusters instead of one), with data written and flushed before and
/// written after the resize: power loss at every mutating I/O. After any
/// crash `qemu-img check` finds no corruption, the virtual size is the old
/// or the new one, and the data flushed before the resize reads back (also
/// the data written after it once its flush completed).
#[test]
fn crash_resize_grow_l1_move() {
    crash_resize(false, false);
}

/// Shrink with allocated data beyond the new end (512 B clusters: L2
/// tables, refcount blocks and the file's tail go): power loss at every
/// mutating I/O; the data below the new end always reads back.
#[test]
fn crash_resize_shrink() {
    crash_resize(false, true);
}

/// The same with persistent bitmaps (enabled and disabled), which are
/// resized with the image: after any crash they are consistent with the
/// virtual size (QEMU opens the image read-write) or flagged in use.
#[test]
fn crash_resize_with_bitmaps() {
    crash_resize(true, false);
}

/// Grow to 1 GiB (512 B clusters): the new L1 table takes 512 clusters,
/// more than one refcount block describes (256), so the refcount blocks
/// for its place are put after it and counted in blocks made first:
/// power loss at every mutating I/O, as above.
#[test]
fn crash_resize_grow_l1_longer_than_a_refcount_block() {
    crash_resize_to(false, false, 1 << 30);
}

fn crash_resize(bitmaps: bool, shrink: bool) {
    crash_resize_to(bitmaps, shrink, if shrink { M } else { 4 * M });
}

fn crash_resize_to(bitmaps: bool, shrink: bool, new: u64) {
    let old = if shrink { 4 * M } else { 64 * K };
    let w = Workload {
        name: match (bitmaps, shrink, new > 4 * M) {
            (true, _, _) => "resize-bitmaps",
            (false, true, _) => "resize-shrink",
            (false, false, true) => "resize-long-l1",
            (false, false, false) => "resize",
        },
        create: "cluster_size=512",
        size: old,
        fill: if shrink {
            &[
                "write -P 0x61 0 16k",
                "write -P 0x62 48k 16k",
                "write -P 0x63 960k 1M",
                "write -P 0x64 3M 64k",
            ]
        } else {
            &["write -P 0x61 0 16k", "write -P 0x62 48k 16k"]
        },
        ops: vec![],
        unit: 512,
    };
    // Guest bytes checked: those below both sizes.
    let lim = old.min(new);
    let dir = tempfile::tempdir().unwrap();
    let (path, mut start, guest) = start_image(dir.path(), &w);
    if bitmaps {
        let p = path.to_str().unwrap();
        for args in [
            &["bitmap", "--add", p, "on"][..],
            &["bitmap", "--add", "-g", "4k", p, "fine"][..],
            &["bitmap", "--add", "--disable", p, "off"][..],
        ] {
            let (c, m) = run("qemu-img", args);
            assert_eq!(c, 0, "{m}");
        }
        let (c, m) = run("qemu-io", &["-c", "write -P 0x61 0 4k", p]);
        assert_eq!(c, 0, "{m}");
        let (c, m) = run("qemu-img", &["bitmap", "--merge", "on", p, "off"]);
        assert_eq!(c, 0, "{m}");
        start = std::fs::read(&path).unwrap();
    }
    let scratch = dir.path().join("crash.qcow2");
    let mut before = guest.clone();
    before[20 * K as usize..24 * K as usize].fill(0x71);
    let (mut images, mut failures) = (0usize, Vec::<String>::new());
    let mut seen = std::collections::HashSet::new();
    let mut k = 0u64;
    loop {
        let fs = Arc::new(FaultStorage::new(start.clone()));
        let img = Image::open_with_storage(Box::new(fs.clone()), &path, &rw_opts()).unwrap();
        fs.set_plan(FaultPlan {
            fail_at: None,
            crash_after: Some(k),
        });
        // Steps done (each durable once the next starts): 1 write+flush
        // before, 2 resize, 3 write+flush after.
        let mut done = 0;
        let steps: [&dyn Fn() -> Result<()>; 3] = [
            &|| {
                img.write(20 * K, &[0x71; 4096], 0)?;
                img.flush()
            },
            &|| img.resize(new, Prealloc::Off, shrink),
            &|| {
                if !shrink {
                    img.write(3 * M, &[0x72; 8192], 0)?;
                }
                let tail = vec![0x73; if shrink { 512 } else { 1024 }];
                img.write(lim - 512, &tail, 0)?;
                img.flush()
            },
        ];
        for s in steps {
            match s() {
                Ok(()) => done += 1,
                Err(e) => {
                    assert!(fs.crashed(), "step {done} failed without a crash: {e}");
                    break;
                }
            }
        }
        drop(img);
        if !fs.crashed() {
            assert_eq!(done, 3);
            break;
        }
        let subsets = power_loss_samples(&fs);
        for (s, bytes) in subsets.iter().enumerate() {
            if !seen.insert((done, bytes.clone())) {
                continue;
            }
            images += 1;
            let tag = format!("{}-k{k}-s{s}", w.name);
            let Some(img) = check_and_open(&scratch, &tag, bytes, &mut failures) else {
                continue;
            };
            let size = img.virtual_size();
            if size != new && (size != old || done >= 2) {
                failures.push(format!("{tag}: virtual size {size} after {done} steps"));
                continue;
            }
            let mut got = vec![0u8; lim as usize];
            img.read(0, &mut got).unwrap();
            let want = if done >= 1 { &before } else { &guest };
            // Bytes an interrupted write (first step) may have changed
            // read as before or after it; so do those of the third step
            // (also when the crash hit the close after it).
            let ok = got.iter().zip(want.iter()).enumerate().all(|(i, (g, w))| {
                g == w
                    || (done == 0 && *g == before[i])
                    || (done >= 2 && i as u64 >= lim - 512 && *g == 0x73)
            });
            if !ok {
                let kept = keep_failure(&tag, bytes);
                failures.push(format!(
                    "{tag}: data before the resize changed ({})",
                    kept.display()
                ));
            }
            drop(img);
            // qemu-io agrees on the flushed data.
            let (c, out) = run(
                "qemu-io",
                &[
                    "-r",
                    "-c",
                    "read -P 0x61 0 16k",
                    "-c",
                    "read -P 0x62 48k 15k",
                    scratch.to_str().unwrap(),
                ],
            );
            if c != 0 || out.contains("fail") || out.contains("verification") {
                failures.push(format!("{tag}: qemu-io read:\n{out}"));
            }
            if bitmaps {
                // QEMU loads the bitmaps read-write (refusing any whose
                // size does not fit) and can write.
                let (c, out) = run("qemu-io", &["-c", "write 0 512", scratch.to_str().unwrap()]);
                if c != 0 || out.contains("fail") {
                    let kept = keep_failure(&tag, bytes);
                    failures.push(format!("{tag}: qemu-io rw ({}):\n{out}", kept.display()));
                }
            }
        }
        k += 1;
    }
    println!(
        "crash {}: {k} mutating I/Os, {images} distinct power-loss images checked",
        w.name
    );
    assert!(
        failures.is_empty(),
        "{} of {images} images failed; first: {}",
        failures.len(),
        failures[0]
    );
}

/// `amend -o compat=0.10` on a v3 image whose zero clusters share host
/// clusters with an internal snapshot (`write -z` after the snapshot), plus
/// zero clusters of both kinds taken into two snapshots (expanded in the
/// snapshots' shared L2 tables): power loss at every mutating I/O.
/// After any crash `qemu-img check` finds no corruption (leaks allowed), the
/// active content and the snapshot's content are unchanged, and the image
/// is v3 or v2.
#[test]
fn crash_amend_downgrade() {
    crash_amend(
        "amend-downgrade",
        AmendOptions {
            version: Some(2),
            ..Default::default()
        },
        |b| u32::from_be_bytes([b[4], b[5], b[6], b[7]]) == 2,
        false,
    );
}

/// `amend -o compat=0.10` of the same image with persistent bitmaps (one
/// enabled, one disabled at another granularity): QEMU 10 keeps them in the
/// v2 header's extension, stored anew. Power loss at every mutating I/O:
/// besides the checks above, a v3 image still has both bitmaps, each with
/// its bits or (the enabled one, marked in use at open) in use; a v2 image
/// has both, not in use, with their bits.
#[test]
fn crash_amend_downgrade_bitmaps() {
    crash_amend(
        "amend-downgrade-bitmaps",
        AmendOptions {
            version: Some(2),
            ..Default::default()
        },
        |b| u32::from_be_bytes([b[4], b[5], b[6], b[7]]) == 2,
        true,
    );
}

/// `amend -o refcount_bits=64` and `=8` on the same image: power loss at
/// every mutating I/O; the same checks (the header switch is one write).
#[test]
fn crash_amend_refcount_bits() {
    for (bits, order) in [(64, 6u32), (8, 3)] {
        crash_amend(
            &format!("amend-refcount-{bits}"),
            AmendOptions {
                refcount_bits: Some(bits),
                ..Default::default()
            },
            move |b| u32::from_be_bytes([b[96], b[97], b[98], b[99]]) == order,
            false,
        );
    }
}

fn crash_amend(tag: &str, opts: AmendOptions, done_ok: impl Fn(&[u8]) -> bool, bitmaps: bool) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("am.qcow2");
    let ps = path.to_str().unwrap();
    let mut steps: Vec<(&str, Vec<&str>)> = vec![
        ("qemu-img", vec!["create", "-q", "-f", "qcow2", ps, "4M"]),
        (
            "qemu-io",
            vec![
                "-c",
                "write -P 0x11 0 256k",
                "-c",
                "write -P 0x12 2M 64k",
                ps,
            ],
        ),
        ("qemu-img", vec!["snapshot", "-c", "old", ps]),
        (
            "qemu-io",
            vec![
                "-c",
                "write -z 0 128k",
                "-c",
                "write -P 0x13 3M 64k",
                "-c",
                "write -z 3M 64k",
                "-c",
                "write -z -u 1M 64k",
                ps,
            ],
        ),
    ];
    if bitmaps {
        let last = steps.pop().expect("step");
        steps.push(("qemu-img", vec!["bitmap", "--add", ps, "b1"]));
        steps.push(("qemu-img", vec!["bitmap", "--add", "-g", "512", ps, "b2"]));
        steps.push(last);
        steps.push(("qemu-img", vec!["bitmap", "--disable", ps, "b2"]));
    }
    for (prog, args) in &steps {
        let (c, m) = run(prog, args);
        assert!(c == 0 && !m.contains("failed"), "{prog} {args:?}: {m}");
    }
    let active = snapshot_content(&path, None).expect("active content");
    let old = snapshot_content(&path, Some("old")).expect("old content");
    let start = std::fs::read(&path).unwrap();
    let start_bitmaps = stored_bitmaps(&start);
    assert_eq!(
        bitmaps,
        start_bitmaps.as_ref().is_some_and(|b| b.len() == 2),
        "{tag}: bitmaps at start"
    );
    // None: the bitmaps are as they should be.
    let bitmaps_wrong = |bytes: &[u8], v: u32| -> Option<String> {
        let want = start_bitmaps.as_ref()?;
        let got = read_bitmaps(bytes, v >= 3);
        let ok = got.as_ref().is_some_and(|got| {
            got.len() == want.len()
                && got.iter().zip(want).all(|(g, w)| {
                    g.name == w.name
                        && g.granularity_bits == w.granularity_bits
                        && g.auto == w.auto
                        && if g.in_use {
                            // Disabled bitmaps are held in use while open too.
                            v >= 3
                        } else {
                            g.bits == w.bits
                        }
                })
        });
        (!ok).then(|| format!("bitmaps: {got:?}"))
    };
    let run_op = |fs: &Arc<FaultStorage>| {
        if let Ok(img) = Image::open_with_storage(Box::new(fs.clone()), &path, &rw_opts()) {
            let _ = img.amend(&opts);
            let _ = img.close();
        }
    };
    let version = |b: &[u8]| u32::from_be_bytes([b[4], b[5], b[6], b[7]]);
    let fs = Arc::new(FaultStorage::new(start.clone()));
    fs.set_plan(FaultPlan::default());
    run_op(&fs);
    let total = fs.ops();
    let done = dir.path().join("done.qcow2");
    std::fs::write(&done, fs.current()).unwrap();
    let (code, out) = qemu_check(&done);
    // A v2 image's bitmaps are not vouched for: their clusters are leaks
    // to `qemu-img check`, as after QEMU's own amend.
    assert!(
        code == 0 || (bitmaps && code == 3),
        "{tag}: undisturbed run not clean:\n{out}"
    );
    assert!(
        done_ok(&fs.current()),
        "{tag}: undisturbed run did not amend"
    );
    if let Some(why) = bitmaps_wrong(&fs.current(), version(&fs.current())) {
        panic!("{tag}: undisturbed run: {why}");
    }
    let scratch = dir.path().join("crash.qcow2");
    let mut rng = Rng(0xa4e7_d0e5);
    let mut failures = Vec::new();
    let mut images = 0;
    for k in 0..total {
        let fs = Arc::new(FaultStorage::new(start.clone()));
        fs.set_plan(FaultPlan {
            fail_at: None,
            crash_after: Some(k),
        });
        run_op(&fs);
        let n = fs.pending_len();
        let mut subsets = vec![
            fs.after_power_loss(|_| false, |_| None),
            fs.after_power_loss(|_| true, |_| None),
        ];
        for _ in 0..2 {
            let keep: Vec<bool> = (0..n).map(|_| rng.below(2) == 0).collect();
            subsets.push(fs.after_power_loss(|i| keep[i], |_| None));
        }
        for (s, bytes) in subsets.iter().enumerate() {
            images += 1;
            let t = format!("{tag}-k{k}-s{s}");
            std::fs::write(&scratch, bytes).unwrap();
            let (code, out) = qemu_check(&scratch);
            let v = version(bytes);
            let why = if code != 0 && code != 3 {
                Some(format!("qemu-img check exit {code}:\n{out}"))
            } else if v != 2 && v != 3 {
                Some(format!("version {v}"))
            } else if snapshot_content(&scratch, None).as_ref() != Some(&active) {
                Some("active content changed".into())
            } else if snapshot_content(&scratch, Some("old")).as_ref() != Some(&old) {
                Some("snapshot content changed".into())
            } else {
                bitmaps_wrong(bytes, v)
            };
            if let Some(why) = why {
                let kept = keep_failure(&t, bytes);
                failures.push(format!("{t}: {why} (kept at {})", kept.display()));
            }
        }
    }
    println!("crash {tag}: {total} mutating I/Os, {images} power-loss images checked");
    assert!(
        failures.is_empty(),
        "{} failures; first: {}",
        failures.len(),
        failures[0]
    );
}

/// Power loss while an image is emptied (`Image::make_empty`, the end of
/// `qcow2 commit`) and its file cut after the last used cluster: every
/// power-loss image checks clean (leaks allowed), every cluster reads as
/// before or as emptied (zeroes: no backing file here), never anything
/// else, and once the call returned, all of it reads as zeroes.
#[test]
fn crash_make_empty() {
    let w = Workload {
        name: "make-empty",
        create: "cluster_size=512",
        size: 2 * M,
        fill: &[
            "write -P 0x61 0 16k",
            "write -P 0x62 48k 16k",
            "write -P 0x63 960k 1M",
        ],
        ops: vec![],
        unit: 512,
    };
    let dir = tempfile::tempdir().unwrap();
    let (path, start, guest) = start_image(dir.path(), &w);
    let scratch = dir.path().join("crash.qcow2");
    let (mut images, mut failures) = (0usize, Vec::<String>::new());
    let mut seen = std::collections::HashSet::new();
    let mut k = 0u64;
    loop {
        let fs = Arc::new(FaultStorage::new(start.clone()));
        let img = Image::open_with_storage(Box::new(fs.clone()), &path, &rw_opts()).unwrap();
        fs.set_plan(FaultPlan {
            fail_at: None,
            crash_after: Some(k),
        });
        let done = match img.make_empty() {
            Ok(()) => 1,
            Err(e) => {
                assert!(fs.crashed(), "make_empty failed without a crash: {e}");
                0
            }
        };
        drop(img);
        if !fs.crashed() {
            break;
        }
        let subsets = power_loss_samples(&fs);
        for (s, bytes) in subsets.iter().enumerate() {
            if !seen.insert((done, bytes.clone())) {
                continue;
            }
            images += 1;
            let tag = format!("{}-k{k}-s{s}", w.name);
            let Some(img) = check_and_open(&scratch, &tag, bytes, &mut failures) else {
                continue;
            };
            let mut got = vec![0u8; guest.len()];
            img.read(0, &mut got).unwrap();
            let ok = got
                .chunks(512)
                .zip(guest.chunks(512))
                .all(|(g, w)| g.iter().all(|&b| b == 0) || (done == 0 && g == w));
            if !ok {
                let kept = keep_failure(&tag, bytes);
                failures.push(format!(
                    "{tag}: a sector reads neither as before nor as emptied ({})",
                    kept.display()
                ));
            }
        }
        k += 1;
    }
    println!(
        "crash {}: {k} mutating I/Os, {images} distinct power-loss images checked",
        w.name
    );
    assert!(k > 3, "make_empty wrote too little to be tested ({k} I/Os)");
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// The power-loss images of a crashed run sampled as the crash tests do:
/// nothing of the unsynced writes reached the disk, all of them, and up
/// to three prefixes in between.
fn power_loss_samples(fs: &FaultStorage) -> Vec<Vec<u8>> {
    let n = fs.pending_len();
    let mut subsets = vec![
        fs.after_power_loss(|_| false, |_| None),
        fs.after_power_loss(|_| true, |_| None),
    ];
    for j in 1..n.min(4) {
        subsets.push(fs.after_power_loss(|i| i < j * n / n.min(4), |_| None));
    }
    subsets
}

/// Writes a power-loss image to `scratch`, runs `qemu-img check` on it
/// (corruption fails, leaks are allowed) and opens it read-only; a failure
/// is recorded (the image kept) and gives `None`.
fn check_and_open(
    scratch: &std::path::Path,
    tag: &str,
    bytes: &[u8],
    failures: &mut Vec<String>,
) -> Option<Image> {
    std::fs::write(scratch, bytes).unwrap();
    let (code, out) = qemu_check(scratch);
    if code != 0 && code != 3 {
        let kept = keep_failure(tag, bytes);
        failures.push(format!(
            "{tag}: qemu-img check exit {code} ({}):\n{out}",
            kept.display()
        ));
        return None;
    }
    match Image::open(scratch, &OpenOptions::read_only()) {
        Ok(i) => Some(i),
        Err(e) => {
            failures.push(format!("{tag}: open: {e}"));
            None
        }
    }
}
