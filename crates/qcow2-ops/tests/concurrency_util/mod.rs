//! Shared machinery of the concurrency tests: self-describing sectors, the
//! guest layout (ranges owned by one thread, ranges shared by all), images
//! prepared by qemu-img/qemu-io, and a global ticket clock that orders
//! requests by "completed before started".
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

pub const SEC: u64 = 512;
/// Thread id written into the sectors of the start image.
pub const START_THREAD: u32 = 0xffff;
const MARK: u32 = 0x5c0d_0000;

/// Runs a program; returns (exit code, stdout + stderr).
pub fn run(prog: &str, args: &[&str]) -> (i32, String) {
    let o = std::process::Command::new(prog)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {prog}: {e}"));
    (
        o.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&o.stdout).into_owned() + &String::from_utf8_lossy(&o.stderr),
    )
}

/// Runs a program that must succeed (exit 0, no "failed" in its output).
pub fn run_ok(prog: &str, args: &[&str]) -> String {
    let (c, m) = run(prog, args);
    assert!(
        c == 0 && !m.contains("failed"),
        "{prog} {args:?}: exit {c}\n{m}"
    );
    m
}

fn mix(mut x: u64) -> u64 {
    x ^= x >> 33;
    x = x.wrapping_mul(0xff51_afd7_ed55_8ccd);
    x ^= x >> 33;
    x = x.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    x ^ (x >> 33)
}

/// The 512 bytes of the self-describing sector written by request `seq` of
/// thread `thread` at guest sector offset `off`: the first 16 bytes are
/// (marker | thread, seq, off), the rest a stream derived from them.
pub fn sector(thread: u32, seq: u32, off: u64, out: &mut [u8]) {
    assert_eq!(out.len(), SEC as usize);
    out[0..4].copy_from_slice(&(MARK ^ thread).to_le_bytes());
    out[4..8].copy_from_slice(&seq.to_le_bytes());
    out[8..16].copy_from_slice(&off.to_le_bytes());
    let mut s = mix(((thread as u64) << 32 | seq as u64) ^ mix(off));
    for w in out[16..].chunks_mut(8) {
        s = mix(s.wrapping_add(0x9e37_79b9_7f4a_7c15));
        w.copy_from_slice(&s.to_le_bytes());
    }
}

/// Bytes `[off, off+len)` of the self-describing sectors of (thread, seq)
/// (unaligned ranges take the matching part of each sector).
pub fn fill(thread: u32, seq: u32, off: u64, len: u64) -> Vec<u8> {
    let mut out = Vec::with_capacity(len as usize);
    let mut s = [0u8; SEC as usize];
    let mut pos = off;
    while pos < off + len {
        let so = pos / SEC * SEC;
        sector(thread, seq, so, &mut s);
        let a = (pos - so) as usize;
        let b = ((off + len).min(so + SEC) - so) as usize;
        out.extend_from_slice(&s[a..b]);
        pos = so + b as u64;
    }
    out
}

/// (thread, seq) of a valid self-describing sector of guest offset `off`.
pub fn classify(data: &[u8], off: u64) -> Option<(u32, u32)> {
    let w = u32::from_le_bytes(data[0..4].try_into().unwrap());
    if w & 0xffff_0000 != MARK {
        return None;
    }
    let t = w ^ MARK;
    let seq = u32::from_le_bytes(data[4..8].try_into().unwrap());
    let o = u64::from_le_bytes(data[8..16].try_into().unwrap());
    if o != off {
        return None;
    }
    let mut s = [0u8; SEC as usize];
    sector(t, seq, off, &mut s);
    (s[..] == *data).then_some((t, seq))
}

/// Global clock: `tick()` before a request starts and after it returns, so
/// that `a.end < b.start` means a completed before b started.
pub struct Clock(AtomicU64);
impl Clock {
    pub fn new() -> Self {
        Clock(AtomicU64::new(1))
    }
    pub fn tick(&self) -> u64 {
        self.0.fetch_add(1, Ordering::SeqCst)
    }
}

/// Small deterministic PRNG (xorshift64*).
pub struct Rng(pub u64);
impl Rng {
    pub fn new(seed: u64) -> Self {
        Rng(mix(seed) | 1)
    }
    pub fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
    /// True with probability num/den.
    pub fn chance(&mut self, num: u64, den: u64) -> bool {
        self.below(den) < num
    }
}

/// A guest byte range owned by one thread.
#[derive(Clone, Copy, Debug)]
pub struct Owned {
    pub off: u64,
    pub len: u64,
    /// Made of whole clusters (discards change it); otherwise a slice of
    /// clusters whose other slices belong to other threads.
    pub whole: bool,
}

/// Where the threads work.
#[derive(Clone, Debug)]
pub struct Layout {
    pub size: u64,
    pub cluster: u64,
    pub threads: usize,
    /// Per thread, its ranges.
    pub owned: Vec<Vec<Owned>>,
    /// Range all threads write, zero, discard and read.
    pub shared: (u64, u64),
}

impl Layout {
    /// Ranges of whole clusters interleaved between the threads (so they
    /// share L2 slices and refcount blocks), then clusters cut into one
    /// slice per thread (slice edges not aligned to 1 KiB, so not to
    /// extended-L2 subclusters either), then the shared area.
    pub fn new(cluster: u64, threads: usize) -> Layout {
        let n = threads as u64;
        let big = cluster >= 2 << 20;
        let xlen = (2 * cluster).max(16 << 10);
        let per = if big { 1 } else { 2 };
        let mut owned = vec![Vec::new(); threads];
        for i in 0..per {
            for t in 0..n {
                owned[t as usize].push(Owned {
                    off: (i * n + t) * xlen,
                    len: xlen,
                    whole: true,
                });
            }
        }
        let mut end = per * n * xlen;
        if cluster >= n * 1024 {
            let k = if big { 1 } else { 2 };
            let edge = |j: u64| {
                if j == 0 || j == n {
                    j * cluster / n
                } else {
                    (j * cluster / n) / SEC * SEC - if j % 2 == 1 { SEC } else { 0 }
                }
            };
            for c in 0..k {
                let base = end + c * cluster;
                for t in 0..n {
                    owned[t as usize].push(Owned {
                        off: base + edge(t),
                        len: edge(t + 1) - edge(t),
                        whole: false,
                    });
                }
            }
            end += k * cluster;
        }
        let shlen = if big {
            2 * cluster
        } else {
            (4 * cluster).max(256 << 10)
        };
        let shared = (end, shlen);
        end += shlen;
        Layout {
            size: end + cluster,
            cluster,
            threads,
            owned,
            shared,
        }
    }
}

/// How the start image is made.
#[derive(Clone, Copy, Debug)]
pub enum Prep {
    /// Empty image.
    Empty,
    /// Start sectors written over the first `n` bytes by qemu-io, plus a
    /// few zeroed and compressed clusters.
    Filled(u64),
    /// Empty overlay over a backing file full of start sectors.
    Backing,
    /// Full of start sectors, then an internal snapshot taken: every
    /// allocated cluster has refcount 2 and writes must copy it.
    Snapshot,
}

/// Creates `img.qcow2` in `dir`; returns its path and its guest content as
/// qemu-img convert reads it.
pub fn prepare(dir: &Path, opts: &str, cluster: u64, size: u64, prep: Prep) -> (PathBuf, Vec<u8>) {
    let start = dir.join("start.bin");
    std::fs::write(&start, fill(START_THREAD, 0, 0, size)).unwrap();
    let st = start.to_str().unwrap();
    let img = dir.join("img.qcow2");
    let ps = img.to_str().unwrap();
    let sz = size.to_string();
    match prep {
        Prep::Backing => {
            let base = dir.join("base.qcow2");
            let bs = base.to_str().unwrap();
            run_ok("qemu-img", &["create", "-q", "-f", "qcow2", bs, &sz]);
            run_ok(
                "qemu-io",
                &["-c", &format!("write -q -s {st} 0 {size}"), bs],
            );
            run_ok(
                "qemu-img",
                &[
                    "create", "-q", "-f", "qcow2", "-o", opts, "-F", "qcow2", "-b", bs, ps, &sz,
                ],
            );
        }
        _ => {
            run_ok(
                "qemu-img",
                &["create", "-q", "-f", "qcow2", "-o", opts, ps, &sz],
            );
        }
    }
    if let Prep::Filled(n) = prep {
        run_ok("qemu-io", &["-c", &format!("write -q -s {st} 0 {n}"), ps]);
        if cluster >= 64 << 10 && n >= 512 << 10 {
            // Compressed and zero-flagged clusters among them (64 KiB aligned).
            run_ok(
                "qemu-io",
                &[
                    "-c",
                    "discard -q 128k 128k",
                    "-c",
                    "write -q -c -P 0x3c 128k 128k",
                    "-c",
                    "write -q -z 320k 64k",
                    "-c",
                    "write -q -z -u 448k 64k",
                    ps,
                ],
            );
        }
    }
    if let Prep::Snapshot = prep {
        run_ok(
            "qemu-io",
            &["-c", &format!("write -q -s {st} 0 {size}"), ps],
        );
        run_ok("qemu-img", &["snapshot", "-c", "before", ps]);
    }
    let content = to_raw(&img, &dir.join("start.raw"));
    assert_eq!(content.len() as u64, size);
    (img, content)
}

/// Guest content of an image, read by qemu-img convert.
pub fn to_raw(img: &Path, raw: &Path) -> Vec<u8> {
    run_ok(
        "qemu-img",
        &[
            "convert",
            "-O",
            "raw",
            img.to_str().unwrap(),
            raw.to_str().unwrap(),
        ],
    );
    std::fs::read(raw).unwrap()
}

/// `qemu-img check`: Err on corruption or check errors; Ok(leak report).
pub fn qemu_check_no_corruption(p: &Path) -> Result<Option<String>, String> {
    let (code, out) = run("qemu-img", &["check", p.to_str().unwrap()]);
    match code {
        0 => Ok(None),
        3 => Ok(Some(out)),
        _ => Err(format!("qemu-img check exit {code}:\n{out}")),
    }
}

/// Checks a sector of a shared area read at any time: zero, start content,
/// or a self-describing sector of this very offset written by a thread.
/// Returns the writer's (thread, seq) when it is one.
pub fn loose_sector(
    got: &[u8],
    start: &[u8],
    off: u64,
    threads: usize,
) -> Result<Option<(u32, u32)>, String> {
    if got.iter().all(|&b| b == 0) || got == start {
        return Ok(None);
    }
    match classify(got, off) {
        Some((t, s)) if (t as usize) < threads => Ok(Some((t, s))),
        _ if torn(got, start, off, threads) => Ok(None),
        _ => Err(format!(
            "sector at guest {off:#x} reads {:02x?}.. : neither zero, nor its start content, nor a sector written for this offset",
            &got[..16]
        )),
    }
}

/// Whether `got` is a read torn by a write of the same sector in flight:
/// a prefix of one thing the sector held (zeroes, its start content or a
/// sector written for `off`) and the rest of another. The page cache gives
/// a buffered read that overlaps a write in flight no sector atomicity (the
/// engine, like QEMU, does not order reads against in-place writes), so a
/// concurrent shared read may see that; a stale or misplaced mapping never
/// produces it (every part still belongs to this offset).
pub fn torn(got: &[u8], start: &[u8], off: u64, threads: usize) -> bool {
    let zero = vec![0u8; got.len()];
    let mut heads: Vec<Vec<u8>> = vec![zero.clone(), start.to_vec()];
    let w = u32::from_le_bytes(got[0..4].try_into().unwrap());
    if w & 0xffff_0000 == MARK && ((w ^ MARK) as usize) < threads {
        let seq = u32::from_le_bytes(got[4..8].try_into().unwrap());
        let mut s = vec![0u8; got.len()];
        sector(w ^ MARK, seq, off, &mut s);
        heads.push(s);
    }
    let common = |a: &[u8]| a.iter().zip(got).take_while(|(x, y)| x == y).count();
    let Some(split) = heads.iter().map(|h| common(h)).max().filter(|&p| p >= 1) else {
        return false;
    };
    let tail = &got[split..];
    if zero[split..] == *tail || start[split..] == *tail {
        return true;
    }
    let mut s = vec![0u8; got.len()];
    // Any sector a thread may have written there (sequence numbers are
    // small: a few thousand requests per run at most).
    (0..threads as u32).any(|t| {
        (0..8192u32).any(|q| {
            sector(t, q, off, &mut s);
            s[split..] == *tail
        })
    })
}

/// Keeps a failing image for reproduction; returns where.
pub fn keep_failure(name: &str, src: &Path) -> PathBuf {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("concurrency-failures");
    std::fs::create_dir_all(&dir).unwrap();
    let p = dir.join(format!("{name}.qcow2"));
    let _ = std::fs::copy(src, &p);
    p
}
