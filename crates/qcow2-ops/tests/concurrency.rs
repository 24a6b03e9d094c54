//! Concurrency: many threads on one `&Image`.
//!
//! `stress_*`: threads run seeded random mixes of write, write_zeroes (all
//! flag combinations), discard, read and flush over ranges each owns (whole
//! clusters interleaved with other threads' clusters, and slices of clusters
//! cut between all threads) and over an area shared by all. Owned ranges
//! must match each thread's model at every read and at the end, and the end
//! state must equal a serial replay of the same requests through qemu-io;
//! every sector of the shared area must be zero, its start content, or a
//! self-describing sector written there by a request not superseded by a
//! later one; `qemu-img check` finds no corruption.
//!
//! `power_loss_*`: the same kind of load over the power-loss simulating
//! storage, power cut at many points; every image that may have reached
//! the disk passes `qemu-img check` (leaks allowed), and what a completed
//! flush covered reads back (through qemu-img convert).

mod concurrency_util;

use concurrency_util::*;
use qcow2_io::{FaultPlan, FaultStorage};
use qcow2_ops::*;
use std::path::Path;
use std::sync::{Arc, Barrier};

const K: u64 = 1024;
const M: u64 = 1024 * 1024;
/// Threads of the stress tests.
const THREADS: usize = 6;
/// Threads of the power-loss tests.
const PL_THREADS: usize = 4;

/// Every combination of the write-zeroes flags.
const ZERO_FLAGS: [u32; 8] = [
    0,
    REQ_MAY_UNMAP,
    REQ_FUA,
    REQ_NO_FALLBACK,
    REQ_MAY_UNMAP | REQ_FUA,
    REQ_MAY_UNMAP | REQ_NO_FALLBACK,
    REQ_FUA | REQ_NO_FALLBACK,
    REQ_MAY_UNMAP | REQ_FUA | REQ_NO_FALLBACK,
];

/// Multiplier of request counts and cut points for long runs
/// (`QCOW2_STRESS_SCALE=20 cargo test --release ...`).
fn scale() -> u32 {
    std::env::var("QCOW2_STRESS_SCALE")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1)
        .max(1)
}

fn tools(test: &str) -> bool {
    qcow2_testutil::require(test, &["qemu-img", "qemu-io"]).is_some()
}

/// Open options: writeback, discard=unmap, small caches so that eviction
/// and writeback run concurrently with other requests.
fn opts(cluster: u64) -> OpenOptions {
    let small = cluster <= 64 * K;
    OpenOptions {
        l2_cache_bytes: if small { 16 << 10 } else { 4 << 20 },
        refcount_cache_bytes: if small { 8 << 10 } else { 1 << 20 },
        dirty_granularity: 512,
        ..OpenOptions::read_write()
    }
}

/// A random sub-range of `[off, off+len)`: sector-aligned, or with
/// `bytes` one time in four at any byte.
fn sub(rng: &mut Rng, off: u64, len: u64, max: u64, bytes: bool) -> (u64, u64) {
    let bytes = bytes && rng.chance(1, 4);
    let u = if bytes { 1 } else { SEC };
    let units = len / u;
    let a = rng.below(units);
    let n = 1 + rng.below((units - a).min(max / u));
    (off + a * u, n * u)
}

/// Whole clusters inside `[off, off+len)`.
fn whole_clusters(off: u64, len: u64, c: u64) -> Option<(u64, u64)> {
    let s = off.div_ceil(c) * c;
    let e = (off + len) / c * c;
    if e > s {
        Some((s, e - s))
    } else {
        None
    }
}

// ---------------------------------------------------------------- stress

/// What one request of the shared area did.
#[derive(Clone, Copy, Debug)]
enum Eff {
    /// Wrote the self-describing sectors of (thread, seq).
    Data(u32, u32),
    /// Zeroed the range (successful write_zeroes).
    Zero,
    /// Discard or failed NO_FALLBACK zeroes: each sector zero or unchanged.
    Maybe,
}

#[derive(Clone, Copy, Debug)]
struct SharedRec {
    off: u64,
    len: u64,
    eff: Eff,
    start: u64,
    end: u64,
}

/// What a thread hands back.
struct ThreadLog {
    /// Final model of each owned range.
    model: Vec<Vec<u8>>,
    /// qemu-io commands replaying its owned-range requests in order.
    replay: Vec<String>,
    shared: Vec<SharedRec>,
    /// (sector offset, thread, seq) of self-describing sectors seen by reads.
    seen: Vec<(u64, u32, u32)>,
    counts: [u32; 5],
}

struct Ctx<'a> {
    img: &'a Image,
    lay: &'a Layout,
    start: &'a [u8],
    clock: &'a Clock,
    dir: &'a Path,
}

fn flags_cmd(f: u32) -> String {
    let mut s = String::new();
    if f & REQ_MAY_UNMAP != 0 {
        s.push_str(" -u");
    }
    if f & REQ_FUA != 0 {
        s.push_str(" -f");
    }
    s
}

fn worker(cx: &Ctx, t: usize, seed: u64, nops: u32) -> ThreadLog {
    let c = cx.lay.cluster;
    let mine = &cx.lay.owned[t];
    let mut rng = Rng::new(seed ^ (t as u64) << 40);
    let mut model: Vec<Vec<u8>> = mine
        .iter()
        .map(|r| cx.start[r.off as usize..(r.off + r.len) as usize].to_vec())
        .collect();
    let mut log = ThreadLog {
        model: Vec::new(),
        replay: Vec::new(),
        shared: Vec::new(),
        seen: Vec::new(),
        counts: [0; 5],
    };
    let maxlen = (64 * K).min(c.max(16 * K));
    let tt = t as u32;
    for seq in 1..=nops {
        let kind = rng.below(100);
        let in_shared = rng.chance(35, 100);
        // 0 write, 1 zeroes, 2 discard, 3 read, 4 flush
        let k = match kind {
            0..=34 => 0,
            35..=56 => 1,
            57..=66 => 2,
            67..=91 => 3,
            _ => 4,
        };
        log.counts[k] += 1;
        if k == 4 {
            cx.img
                .flush()
                .unwrap_or_else(|e| panic!("t{t} #{seq}: flush: {e}"));
            continue;
        }
        if in_shared {
            shared_op(cx, &mut rng, &mut log, tt, seq, k);
            continue;
        }
        let ri = rng.below(mine.len() as u64) as usize;
        let r = mine[ri];
        let m = &mut model[ri];
        match k {
            0 => {
                let (o, l) = sub(&mut rng, r.off, r.len, maxlen, true);
                let data = fill(tt, seq, o, l);
                let f = if rng.chance(1, 8) { REQ_FUA } else { 0 };
                cx.img
                    .write(o, &data, f)
                    .unwrap_or_else(|e| panic!("t{t} #{seq}: write {o:#x}+{l:#x}: {e}"));
                let a = (o - r.off) as usize;
                m[a..a + l as usize].copy_from_slice(&data);
                let file = cx.dir.join(format!("w{t}_{seq}.bin"));
                std::fs::write(&file, &data).unwrap();
                log.replay.push(format!(
                    "write -q{} -s {} {o} {l}",
                    flags_cmd(f),
                    file.display()
                ));
            }
            1 => {
                let (o, l) = if r.whole && rng.chance(1, 3) {
                    let n = r.len / c;
                    let a = rng.below(n);
                    let b = 1 + rng.below(n - a);
                    (r.off + a * c, b * c)
                } else {
                    sub(&mut rng, r.off, r.len, maxlen, true)
                };
                let f = ZERO_FLAGS[rng.below(8) as usize];
                let a = (o - r.off) as usize;
                let span = a..a + l as usize;
                match cx.img.write_zeroes(o, l, f) {
                    Ok(()) => {
                        m[span].fill(0);
                        log.replay
                            .push(format!("write -q -z{} {o} {l}", flags_cmd(f)));
                    }
                    Err(Error::NotSupported(_)) if f & REQ_NO_FALLBACK != 0 => {
                        // Each byte unchanged or zero (QEMU may have done part
                        // of the request); the replay zeroes what changed.
                        let mut got = vec![0u8; l as usize];
                        cx.img.read(o, &mut got).unwrap();
                        let mut run: Option<u64> = None;
                        for (i, (&g, &old)) in got.iter().zip(&m[span.clone()]).enumerate() {
                            assert!(
                                g == old || g == 0,
                                "t{t} #{seq}: failed NO_FALLBACK zeroes {o:#x}+{l:#x} changed byte {:#x} to {g:#x} (was {old:#x})",
                                o + i as u64
                            );
                            let changed = g != old;
                            match (changed, run) {
                                (true, None) => run = Some(i as u64),
                                (false, Some(s)) => {
                                    log.replay.push(format!(
                                        "write -q -z {} {}",
                                        o + s,
                                        i as u64 - s
                                    ));
                                    run = None;
                                }
                                _ => {}
                            }
                        }
                        if let Some(s) = run {
                            log.replay.push(format!("write -q -z {} {}", o + s, l - s));
                        }
                        m[span].copy_from_slice(&got);
                    }
                    Err(e) => panic!("t{t} #{seq}: write_zeroes {o:#x}+{l:#x} flags {f:#x}: {e}"),
                }
            }
            2 => {
                let (o, l) = if r.whole && rng.chance(2, 3) {
                    let n = r.len / c;
                    let a = rng.below(n);
                    let b = 1 + rng.below(n - a);
                    (r.off + a * c, b * c)
                } else {
                    sub(&mut rng, r.off, r.len, maxlen, true)
                };
                cx.img
                    .discard(o, l)
                    .unwrap_or_else(|e| panic!("t{t} #{seq}: discard {o:#x}+{l:#x}: {e}"));
                // Whole clusters read zero afterwards (v3); partial: no-op.
                if let Some((s, n)) = whole_clusters(o, l, c) {
                    let a = (s - r.off) as usize;
                    m[a..a + n as usize].fill(0);
                }
                log.replay.push(format!("discard -q {o} {l}"));
            }
            _ => {
                let (o, l) = sub(&mut rng, r.off, r.len, maxlen, true);
                // Sometimes read the whole clusters around it (other
                // threads' slices included) and check only our part.
                let (ro, rl) = if rng.chance(1, 3) && c <= 64 * K {
                    let s = o / c * c;
                    let e = ((o + l).div_ceil(c) * c).min(cx.lay.size);
                    (s, e - s)
                } else {
                    (o, l)
                };
                let mut got = vec![0u8; rl as usize];
                cx.img
                    .read(ro, &mut got)
                    .unwrap_or_else(|e| panic!("t{t} #{seq}: read {ro:#x}+{rl:#x}: {e}"));
                let a = (o - ro) as usize;
                let want = &m[(o - r.off) as usize..(o - r.off + l) as usize];
                let have = &got[a..a + l as usize];
                if have != want {
                    let i = have.iter().zip(want).position(|(x, y)| x != y).unwrap();
                    panic!(
                        "t{t} #{seq}: read of owned {o:#x}+{l:#x}: byte {:#x} is {:#x}, model says {:#x} (reads {:02x?}..)",
                        o + i as u64,
                        have[i],
                        want[i],
                        &have[i / 512 * 512..(i / 512 * 512 + 16).min(have.len())]
                    );
                }
            }
        }
    }
    log.model = model;
    log
}

fn shared_op(cx: &Ctx, rng: &mut Rng, log: &mut ThreadLog, t: u32, seq: u32, k: usize) {
    let c = cx.lay.cluster;
    let (so, sl) = cx.lay.shared;
    let whole = (k == 1 || k == 2 || (k == 0 && c <= 64 * K))
        && rng.chance(1, if c >= 2 * M { 25 } else { 5 });
    let (o, l) = if whole {
        let n = sl / c;
        let a = rng.below(n);
        let b = if k == 0 {
            1
        } else {
            1 + rng.below(2.min(n - a))
        };
        (so + a * c, b * c)
    } else if sl > 512 * K {
        // Large clusters: overlap densely in 256 KiB around a cluster edge.
        sub(rng, so + sl / 2 - 128 * K, 256 * K, 32 * SEC, false)
    } else {
        sub(rng, so, sl, 32 * SEC, false)
    };
    let start = cx.clock.tick();
    let eff = match k {
        0 => {
            let data = fill(t, seq, o, l);
            let f = if rng.chance(1, 8) { REQ_FUA } else { 0 };
            cx.img
                .write(o, &data, f)
                .unwrap_or_else(|e| panic!("t{t} #{seq}: shared write {o:#x}+{l:#x}: {e}"));
            Some(Eff::Data(t, seq))
        }
        1 => {
            let f = ZERO_FLAGS[rng.below(8) as usize];
            match cx.img.write_zeroes(o, l, f) {
                Ok(()) => Some(Eff::Zero),
                Err(Error::NotSupported(_)) if f & REQ_NO_FALLBACK != 0 => Some(Eff::Maybe),
                Err(e) => panic!("t{t} #{seq}: shared zeroes {o:#x}+{l:#x} flags {f:#x}: {e}"),
            }
        }
        2 => {
            cx.img
                .discard(o, l)
                .unwrap_or_else(|e| panic!("t{t} #{seq}: shared discard {o:#x}+{l:#x}: {e}"));
            Some(Eff::Maybe)
        }
        _ => {
            let mut got = vec![0u8; l as usize];
            cx.img
                .read(o, &mut got)
                .unwrap_or_else(|e| panic!("t{t} #{seq}: shared read {o:#x}+{l:#x}: {e}"));
            for (i, s) in got.chunks(SEC as usize).enumerate() {
                let so = o + i as u64 * SEC;
                let st = &cx.start[so as usize..(so + SEC) as usize];
                match loose_sector(s, st, so, cx.lay.threads) {
                    Ok(Some((wt, ws))) => log.seen.push((so, wt, ws)),
                    Ok(None) => {}
                    Err(m) => panic!("t{t} #{seq}: shared read {o:#x}+{l:#x}: {m}"),
                }
            }
            None
        }
    };
    let end = cx.clock.tick();
    if let Some(eff) = eff {
        log.shared.push(SharedRec {
            off: o,
            len: l,
            eff,
            start,
            end,
        });
    }
}

/// Checks the final shared area: each sector is the effect of a request
/// that no other request covering it superseded (started after it
/// completed), or its start content when no data/zero request covered it.
fn check_shared(
    lay: &Layout,
    start: &[u8],
    got: &[u8],
    logs: &[ThreadLog],
) -> std::result::Result<(), String> {
    let (so, sl) = lay.shared;
    let all: Vec<&SharedRec> = logs.iter().flat_map(|l| l.shared.iter()).collect();
    // Reads saw only sectors of shared writes that covered that sector.
    for (ti, l) in logs.iter().enumerate() {
        for &(s, wt, ws) in &l.seen {
            let ok = logs[wt as usize].shared.iter().any(|r| {
                matches!(r.eff, Eff::Data(a, b) if a == wt && b == ws)
                    && r.off <= s
                    && s < r.off + r.len
            });
            if !ok {
                return Err(format!(
                    "thread {ti} read at {s:#x} a sector of t{wt} #{ws}, which did not write there"
                ));
            }
        }
    }
    for s in (so..so + sl).step_by(SEC as usize) {
        let g = &got[s as usize..(s + SEC) as usize];
        let cov: Vec<&&SharedRec> = all
            .iter()
            .filter(|r| r.off <= s && s < r.off + r.len)
            .collect();
        let definite = |r: &SharedRec| matches!(r.eff, Eff::Data(..) | Eff::Zero);
        let m = cov.iter().filter(|r| definite(r)).map(|r| r.start).max();
        // Candidates: requests not superseded by a definite one.
        let live: Vec<&&&SharedRec> = cov.iter().filter(|r| m.is_none_or(|m| r.end > m)).collect();
        let zero = g.iter().all(|&b| b == 0);
        let ok = (m.is_none() && g == &start[s as usize..(s + SEC) as usize])
            || live.iter().any(|r| match r.eff {
                Eff::Data(t, q) => classify(g, s) == Some((t, q)),
                Eff::Zero | Eff::Maybe => zero,
            });
        if !ok {
            return Err(format!(
                "shared sector {s:#x} reads {:02x?}.. ({:?}); live requests: {:?}",
                &g[..16],
                classify(g, s),
                live
            ));
        }
    }
    Ok(())
}

fn stress(name: &str, create: &str, cluster: u64, prep: Prep, seed: u64, nops: u32) {
    stress_cached(
        name,
        create,
        cluster,
        prep,
        seed,
        nops,
        CacheMode::Writeback,
    )
}

fn stress_cached(
    name: &str,
    create: &str,
    cluster: u64,
    prep: Prep,
    seed: u64,
    nops: u32,
    cache: CacheMode,
) {
    if !tools(name) {
        return;
    }
    let nops = nops * scale();
    let t0 = std::time::Instant::now();
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let lay = Layout::new(cluster, THREADS);
    let prep = match prep {
        Prep::Filled(0) => Prep::Filled(lay.size / 2 / cluster * cluster),
        p => p,
    };
    let (img_path, start) = prepare(d, create, cluster, lay.size, prep);
    let orig = d.join("orig.qcow2");
    std::fs::copy(&img_path, &orig).unwrap();

    let img = Image::open(
        &img_path,
        &OpenOptions {
            cache,
            ..opts(cluster)
        },
    )
    .unwrap();
    assert_eq!(img.cluster_size(), cluster);
    let clock = Clock::new();
    let barrier = Barrier::new(THREADS);
    let logs: Vec<ThreadLog> = std::thread::scope(|s| {
        let hs: Vec<_> = (0..THREADS)
            .map(|t| {
                let cx = Ctx {
                    img: &img,
                    lay: &lay,
                    start: &start,
                    clock: &clock,
                    dir: d,
                };
                let b = &barrier;
                s.spawn(move || {
                    b.wait();
                    worker(&cx, t, seed, nops)
                })
            })
            .collect();
        hs.into_iter()
            .map(|h| h.join().unwrap_or_else(|e| std::panic::resume_unwind(e)))
            .collect()
    });
    let stats = img.stats();
    img.close().unwrap();
    let t_run = t0.elapsed();
    // Closed: never left dirty (lazy refcounts are written back on close).
    let hdr = std::fs::read(&img_path).unwrap();
    assert_eq!(hdr[79] & 1, 0, "{name}: dirty bit set after close");

    match qemu_check_no_corruption(&img_path) {
        Ok(None) => {}
        Ok(Some(leaks)) => eprintln!("{name}: leaks (allowed):\n{leaks}"),
        Err(e) => panic!(
            "{name}: {e}\n(image kept at {})",
            keep_failure(name, &img_path).display()
        ),
    }
    // Guest content of our image, as QEMU reads it.
    let got = to_raw(&img_path, &d.join("got.raw"));
    // Serial replay of the owned-range requests through qemu-io.
    let replay = d.join("replay.qcow2");
    std::fs::copy(&orig, &replay).unwrap();
    let mut args: Vec<String> = Vec::new();
    for l in &logs {
        for c in &l.replay {
            args.push("-c".into());
            args.push(c.clone());
        }
    }
    args.push(replay.to_str().unwrap().into());
    let a: Vec<&str> = args.iter().map(|s| s.as_str()).collect();
    run_ok("qemu-io", &a);
    let want = to_raw(&replay, &d.join("replay.raw"));

    for (t, l) in logs.iter().enumerate() {
        for (r, m) in lay.owned[t].iter().zip(&l.model) {
            let span = r.off as usize..(r.off + r.len) as usize;
            for (what, other) in [
                ("qemu-io serial replay", &want[span.clone()]),
                ("thread model", &m[..]),
            ] {
                let g = &got[span.clone()];
                if g != other {
                    let i = g.iter().zip(other).position(|(x, y)| x != y).unwrap();
                    panic!(
                        "{name}: thread {t} owned {:#x}+{:#x}: byte {:#x} reads {:#x}, {what} says {:#x} (image kept at {})",
                        r.off,
                        r.len,
                        r.off + i as u64,
                        g[i],
                        other[i],
                        keep_failure(name, &img_path).display()
                    );
                }
            }
        }
    }
    if let Err(e) = check_shared(&lay, &start, &got, &logs) {
        panic!(
            "{name}: {e} (image kept at {})",
            keep_failure(name, &img_path).display()
        );
    }
    let (so, sl) = lay.shared;
    let shared_data = got[so as usize..(so + sl) as usize]
        .chunks(SEC as usize)
        .enumerate()
        .filter(|(i, g)| classify(g, so + *i as u64 * SEC).is_some())
        .count();
    let seen: usize = logs.iter().map(|l| l.seen.len()).sum();
    assert!(
        shared_data > 0 && seen > 0,
        "{name}: the shared area was not exercised"
    );
    let mut counts = [0u32; 5];
    for l in &logs {
        for (c, n) in counts.iter_mut().zip(l.counts) {
            *c += n;
        }
    }
    println!(
        "stress {name}: {THREADS} threads x {nops} requests (write/zero/discard/read/flush {counts:?}), \
         {} replayed, shared area: {shared_data} of {} sectors hold written data at the end, \
         {seen} written sectors seen by concurrent reads; run {:.2?}, total {:.2?}; syncs {}",
        args.len() / 2,
        sl / SEC,
        t_run,
        t0.elapsed(),
        stats.file_syncs
    );
}

#[test]
fn stress_512b_clusters() {
    stress("c512", "cluster_size=512", 512, Prep::Filled(0), 0x512, 500);
}

/// O_DIRECT with clusters smaller than its 4 KiB alignment: requests on
/// different clusters share file blocks, and new clusters and L2 tables
/// grow the file while other threads write past its old end.
#[test]
fn stress_512b_clusters_o_direct() {
    stress_cached(
        "c512d",
        "cluster_size=512",
        512,
        Prep::Empty,
        0x512d,
        500,
        CacheMode::None,
    );
}

#[test]
fn stress_64k_clusters() {
    stress(
        "c64k",
        "cluster_size=65536",
        64 * K,
        Prep::Filled(0),
        0x64,
        500,
    );
}

/// Lazy refcounts: the image turns dirty under concurrent allocating
/// writes; close must leave exact refcounts and the bit clear.
#[test]
fn stress_lazy_refcounts() {
    stress(
        "lazy",
        "cluster_size=4096,lazy_refcounts=on",
        4 * K,
        Prep::Filled(0),
        0x1a2,
        400,
    );
}

#[test]
fn stress_2m_clusters() {
    stress("c2m", "cluster_size=2097152", 2 * M, Prep::Empty, 0x2, 250);
}

#[test]
fn stress_extended_l2() {
    stress(
        "extl2",
        "cluster_size=65536,extended_l2=on",
        64 * K,
        Prep::Filled(0),
        0xe2,
        500,
    );
}

#[test]
fn stress_backing_file() {
    stress(
        "backing",
        "cluster_size=65536",
        64 * K,
        Prep::Backing,
        0xb4,
        500,
    );
}

#[test]
fn stress_snapshot_cow() {
    stress(
        "snapshot",
        "cluster_size=65536",
        64 * K,
        Prep::Snapshot,
        0x5a,
        500,
    );
}

// ------------------------------------------------------------ power loss

/// What one thread of a power-loss run did.
struct CrashLog {
    /// Content of its owned ranges after each prefix of its requests
    /// (states[0] = start).
    states: Vec<Vec<Vec<u8>>>,
    /// Clock ticks (start, end) of each request it ran.
    ticks: Vec<(u64, u64)>,
    /// Start ticks of its flushes that succeeded.
    flushed: Vec<u64>,
    /// Requests run (the last one may have failed).
    ran: usize,
    /// The last request run failed (power loss).
    failed: bool,
    /// A failure that is not the power loss.
    error: Option<String>,
    /// (kind, offset, length, flags) of each request, for failure reports.
    ops: Vec<(char, u64, u64, u32)>,
}

/// What the threads of a power-loss run share.
struct CrashCtx<'a> {
    img: &'a Image,
    fs: &'a FaultStorage,
    lay: &'a Layout,
    start: &'a [u8],
    clock: &'a Clock,
}

fn crash_worker(cx: &CrashCtx, t: usize, seed: u64, nops: u32) -> CrashLog {
    let CrashCtx {
        img,
        fs,
        lay,
        start,
        clock,
    } = *cx;
    let c = lay.cluster;
    let mine = &lay.owned[t];
    let mut rng = Rng::new(seed ^ (t as u64) << 40);
    let model: Vec<Vec<u8>> = mine
        .iter()
        .map(|r| start[r.off as usize..(r.off + r.len) as usize].to_vec())
        .collect();
    let mut log = CrashLog {
        states: vec![model],
        ticks: Vec::new(),
        flushed: Vec::new(),
        ran: 0,
        failed: false,
        error: None,
        ops: Vec::new(),
    };
    let tt = t as u32;
    let (so, sl) = lay.shared;
    for seq in 1..=nops {
        let mut m = log.states.last().unwrap().clone();
        let kind = rng.below(100);
        let shared = rng.chance(1, 4);
        let ri = rng.below(mine.len() as u64) as usize;
        let r = mine[ri];
        let (o, l) = if shared {
            sub(&mut rng, so, sl, 32 * SEC, false)
        } else if r.whole && rng.chance(1, 2) {
            let n = r.len / c;
            let a = rng.below(n);
            (r.off + a * c, (1 + rng.below(n - a)) * c)
        } else {
            sub(&mut rng, r.off, r.len, 64 * K, false)
        };
        let a = (o - r.off) as usize;
        let st = clock.tick();
        let res = match kind {
            0..=44 => {
                let data = fill(tt, seq, o, l);
                let f = if rng.chance(1, 8) { REQ_FUA } else { 0 };
                log.ops.push(('w', o, l, f));
                let res = img.write(o, &data, f);
                if !shared {
                    m[ri][a..a + l as usize].copy_from_slice(&data);
                }
                res
            }
            45..=69 => {
                let f = ZERO_FLAGS[rng.below(8) as usize] & !REQ_NO_FALLBACK;
                log.ops.push(('z', o, l, f));
                if !shared {
                    m[ri][a..a + l as usize].fill(0);
                }
                img.write_zeroes(o, l, f)
            }
            70..=79 => {
                log.ops.push(('d', o, l, 0));
                if !shared {
                    if let Some((s, n)) = whole_clusters(o, l, c) {
                        let a = (s - r.off) as usize;
                        m[ri][a..a + n as usize].fill(0);
                    }
                }
                img.discard(o, l)
            }
            80..=89 if !shared => {
                log.ops.push(('r', o, l, 0));
                let mut got = vec![0u8; l as usize];
                let res = img.read(o, &mut got);
                if res.is_ok() && got[..] != m[ri][a..a + l as usize] {
                    log.error = Some(format!(
                        "t{t} #{seq}: read of owned {o:#x}+{l:#x} differs from the model"
                    ));
                }
                res
            }
            _ => {
                log.ops.push(('f', 0, 0, 0));
                let res = img.flush();
                if res.is_ok() {
                    log.flushed.push(st);
                }
                res
            }
        };
        let end = clock.tick();
        log.ticks.push((st, end));
        log.states.push(m);
        log.ran += 1;
        if let Err(e) = res {
            log.failed = true;
            if !fs.crashed() {
                log.error = Some(format!(
                    "t{t} #{seq}: {o:#x}+{l:#x}: failed without power loss: {e}"
                ));
            }
            break;
        }
        if log.error.is_some() {
            break;
        }
    }
    log
}

/// Runs the threads on an image over `fs`; returns their logs.
fn crash_load(
    fs: &Arc<FaultStorage>,
    path: &Path,
    lay: &Layout,
    start: &[u8],
    seed: u64,
    nops: u32,
) -> Vec<CrashLog> {
    let img = Image::open_with_storage(Box::new(fs.clone()), path, &opts(lay.cluster)).unwrap();
    let clock = Clock::new();
    let barrier = Barrier::new(PL_THREADS);
    let logs = std::thread::scope(|s| {
        let hs: Vec<_> = (0..PL_THREADS)
            .map(|t| {
                let cx = CrashCtx {
                    img: &img,
                    fs,
                    lay,
                    start,
                    clock: &clock,
                };
                let b = &barrier;
                s.spawn(move || {
                    b.wait();
                    crash_worker(&cx, t, seed, nops)
                })
            })
            .collect();
        hs.into_iter()
            .map(|h| h.join().unwrap_or_else(|e| std::panic::resume_unwind(e)))
            .collect::<Vec<_>>()
    });
    drop(img);
    for l in &logs {
        if let Some(e) = &l.error {
            panic!("{e}");
        }
    }
    logs
}

/// Checks one image that may have reached the disk: `qemu-img check`
/// clean but for leaks; every owned sector one of its thread's states
/// from the last flush that covered it to its interrupted request; the
/// shared area made of zero, start or self-describing sectors.
fn verify_power_loss(
    tag: &str,
    dir: &Path,
    bytes: &[u8],
    lay: &Layout,
    start: &[u8],
    logs: &[CrashLog],
    all_done: bool,
) -> std::result::Result<bool, String> {
    let scratch = dir.join("cut.qcow2");
    std::fs::write(&scratch, bytes).unwrap();
    let leaks = qemu_check_no_corruption(&scratch).map_err(|e| {
        format!(
            "{tag}: {e} (image kept at {})",
            keep_failure(tag, &scratch).display()
        )
    })?;
    let got = to_raw(&scratch, &dir.join("cut.raw"));
    let durable = logs
        .iter()
        .flat_map(|l| l.flushed.iter())
        .copied()
        .max()
        .unwrap_or(0);
    for (t, l) in logs.iter().enumerate() {
        let lo = if all_done {
            l.ran
        } else {
            // A failed request is never durable, even when a flush
            // succeeded after it.
            let done = l.ticks.iter().take_while(|&&(_, e)| e < durable).count();
            done.min(l.ran - l.failed as usize)
        };
        for (ri, r) in lay.owned[t].iter().enumerate() {
            for s in (0..r.len).step_by(SEC as usize) {
                let span = s as usize..(s + SEC) as usize;
                let g = &got[(r.off + s) as usize..(r.off + s + SEC) as usize];
                // A completed FUA request covering the sector is durable.
                let so = r.off + s;
                let ok_ops = l.ran - l.failed as usize;
                let fua = l.ops[..ok_ops]
                    .iter()
                    .enumerate()
                    .filter(|(_, &(k, o, n, f))| {
                        matches!(k, 'w' | 'z') && f & REQ_FUA != 0 && o <= so && so < o + n
                    })
                    .map(|(i, _)| i + 1)
                    .max()
                    .unwrap_or(0);
                let lo = lo.max(fua);
                if !l.states[lo..=l.ran]
                    .iter()
                    .any(|st| &st[ri][span.clone()] == g)
                {
                    let hist: Vec<String> = l
                        .ops
                        .iter()
                        .zip(&l.ticks)
                        .enumerate()
                        .filter(|(_, ((k, o, n, _), _))| *k == 'f' || (*o <= so && so < o + n))
                        .map(|(i, (op, tk))| format!("#{} {op:?} {tk:?}", i + 1))
                        .collect();
                    return Err(format!(
                        "{tag}: thread {t} owned sector {so:#x} reads {:02x?}.., none of its states {lo}..={}; durable tick {durable}; its requests there: {hist:?} (image kept at {})",
                        &g[..16],
                        l.ran,
                        keep_failure(tag, &scratch).display()
                    ));
                }
            }
        }
    }
    let (so, sl) = lay.shared;
    for s in (so..so + sl).step_by(SEC as usize) {
        let sp = s as usize..(s + SEC) as usize;
        loose_sector(&got[sp.clone()], &start[sp], s, lay.threads).map_err(|m| {
            format!(
                "{tag}: {m} (image kept at {})",
                keep_failure(tag, &scratch).display()
            )
        })?;
    }
    Ok(leaks.is_some())
}

fn power_loss(name: &str, create: &str, cluster: u64, prep: Prep, points: u64, nops: u32) {
    if !tools(name) {
        return;
    }
    let points = points * scale() as u64;
    let t0 = std::time::Instant::now();
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let lay = Layout::new(cluster, PL_THREADS);
    let prep = match prep {
        Prep::Filled(0) => Prep::Filled(lay.size / 2 / cluster * cluster),
        p => p,
    };
    let (path, start) = prepare(d, create, cluster, lay.size, prep);
    let bytes = std::fs::read(&path).unwrap();
    // Undisturbed run: its count of mutating I/Os spreads the cut points.
    let fs = Arc::new(FaultStorage::new(bytes.clone()));
    let logs = crash_load(&fs, &path, &lay, &start, 0, nops);
    let total = fs.ops();
    verify_power_loss(
        &format!("{name}-nocut"),
        d,
        &fs.current(),
        &lay,
        &start,
        &logs,
        true,
    )
    .unwrap();
    let mut rng = Rng::new(cluster ^ points);
    let (mut images, mut leaky, mut failures) = (0, 0, Vec::new());
    for p in 0..points {
        let k = p * total / points + rng.below(total / points + 1);
        let fs = Arc::new(FaultStorage::new(bytes.clone()));
        fs.set_plan(FaultPlan {
            fail_at: None,
            crash_after: Some(k),
        });
        let logs = crash_load(&fs, &path, &lay, &start, p + 1, nops);
        let n = fs.pending_len();
        let mut cuts = vec![
            fs.after_power_loss(|_| false, |_| None),
            fs.after_power_loss(|_| true, |_| None),
            fs.after_power_loss(|i| i < n / 2, |_| None),
        ];
        for _ in 0..2 {
            let keep: Vec<bool> = (0..n).map(|_| rng.chance(1, 2)).collect();
            let torn: Vec<Option<usize>> = (0..n)
                .map(|_| rng.chance(1, 3).then(|| rng.below(130) as usize))
                .collect();
            cuts.push(fs.after_power_loss(|i| keep[i], |i| torn[i]));
        }
        cuts.dedup();
        for (s, img) in cuts.iter().enumerate() {
            images += 1;
            let tag = format!("{name}-k{k}-s{s}");
            match verify_power_loss(&tag, d, img, &lay, &start, &logs, false) {
                Ok(l) => leaky += l as usize,
                Err(e) => {
                    eprintln!("FAIL {e}");
                    failures.push(e);
                }
            }
        }
    }
    println!(
        "power loss {name}: {PL_THREADS} threads x {nops} requests, {total} mutating I/Os undisturbed, \
         {points} cut points, {images} images ({leaky} with leaks), {:.2?}",
        t0.elapsed()
    );
    assert!(
        failures.is_empty(),
        "{} of {images} images failed; first: {}",
        failures.len(),
        failures[0]
    );
}

#[test]
fn power_loss_64k_clusters() {
    power_loss(
        "pl64k",
        "cluster_size=65536",
        64 * K,
        Prep::Filled(0),
        16,
        60,
    );
}

#[test]
fn power_loss_4k_clusters() {
    power_loss("pl4k", "cluster_size=4096", 4 * K, Prep::Empty, 16, 60);
}

#[test]
fn power_loss_snapshot_cow() {
    power_loss(
        "plsnap",
        "cluster_size=65536",
        64 * K,
        Prep::Snapshot,
        16,
        60,
    );
}

#[test]
fn power_loss_extended_l2() {
    power_loss(
        "plextl2",
        "cluster_size=65536,extended_l2=on",
        64 * K,
        Prep::Filled(0),
        12,
        60,
    );
}

/// The torn-read allowance of the shared-area check accepts only mixes of
/// things this very sector held, never another offset's data.
#[test]
fn torn_reads_are_told_from_wrong_data() {
    let off = 0x1a8c00;
    let start: Vec<u8> = (0..SEC).map(|i| (i * 7) as u8).collect();
    let (mut a, mut b, mut other) = (
        vec![0u8; SEC as usize],
        vec![0u8; SEC as usize],
        vec![0u8; SEC as usize],
    );
    sector(0, 217, off, &mut a);
    sector(3, 12, off, &mut b);
    sector(0, 217, off + SEC, &mut other);
    let mix = |x: &[u8], y: &[u8], p: usize| [&x[..p], &y[p..]].concat();
    assert!(torn(&mix(&a, &b, 100), &start, off, 6));
    assert!(torn(&mix(&b, &start, 17), &start, off, 6));
    assert!(torn(
        &mix(&a, &vec![0u8; SEC as usize], 300),
        &start,
        off,
        6
    ));
    assert!(!torn(&other, &start, off, 6), "another offset's sector");
    assert!(
        !torn(&mix(&a, &other, 100), &start, off, 6),
        "tail of another offset"
    );
    assert!(
        !torn(&mix(&a, &b, 100), &start, off, 3),
        "thread 3 of 3 does not exist"
    );
    let junk: Vec<u8> = (0..SEC).map(|i| (i * 13 + 5) as u8).collect();
    assert!(!torn(&junk, &start, off, 6));
}
