//! Shared machinery of the crash and fault-injection tests: workloads, a
//! guest-content model, images made by qemu-img/qemu-io, and the qemu oracle.
#![allow(dead_code)]

use qcow2_io::{FaultStorage, Storage};
use qcow2_ops::*;
use std::io;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, Mutex};

/// One guest request of a workload.
#[derive(Clone, Copy, Debug)]
pub enum Op {
    /// write(offset, len) with every byte = pattern.
    Write(u64, u64, u8),
    /// write_zeroes(offset, len, flags).
    Zero(u64, u64, u32),
    /// discard(offset, len): cluster-aligned in every workload.
    Discard(u64, u64),
    /// flush.
    Flush,
    /// compressed write(offset, len) of whole clusters, every byte = pattern.
    WriteC(u64, u64, u8),
    /// write(offset, len) as a server moving its own data does it:
    /// `try_map_write` + `MappedWrite::write_now` when the engine maps it,
    /// else an ordinary write.
    WriteM(u64, u64, u8),
}

impl Op {
    /// Guest range the op may change (None: flush).
    pub fn range(&self) -> Option<(u64, u64)> {
        match *self {
            Op::Write(o, l, _)
            | Op::Zero(o, l, _)
            | Op::Discard(o, l)
            | Op::WriteC(o, l, _)
            | Op::WriteM(o, l, _) => Some((o, l)),
            Op::Flush => None,
        }
    }
}

/// A start image plus the requests run on it.
pub struct Workload {
    pub name: &'static str,
    /// `-o` options of qemu-img create.
    pub create: &'static str,
    pub size: u64,
    /// qemu-io commands filling the start image.
    pub fill: &'static [&'static str],
    pub ops: Vec<Op>,
    /// Atomicity unit: after a crash every unit reads as one of the states
    /// between the last flush and the interrupted request (cluster for
    /// allocating workloads, 512 where data is overwritten in place).
    pub unit: u64,
}

/// Runs a program; returns (exit code, stdout + stderr).
pub fn run(prog: &str, args: &[&str]) -> (i32, String) {
    let o = Command::new(prog)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {prog}: {e}"));
    (
        o.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&o.stdout).into_owned() + &String::from_utf8_lossy(&o.stderr),
    )
}

/// `qemu-img check`: exit code and output.
pub fn qemu_check(p: &Path) -> (i32, String) {
    run("qemu-img", &["check", p.to_str().unwrap()])
}

/// Start image bytes and its guest content (read by qemu-img convert).
pub fn start_image(dir: &Path, w: &Workload) -> (PathBuf, Vec<u8>, Vec<u8>) {
    let p = dir.join(format!("{}.qcow2", w.name));
    let ps = p.to_str().unwrap();
    let size = w.size.to_string();
    let (c, m) = run(
        "qemu-img",
        &["create", "-f", "qcow2", "-o", w.create, ps, &size],
    );
    assert_eq!(c, 0, "{m}");
    if !w.fill.is_empty() {
        let mut args: Vec<&str> = Vec::new();
        for f in w.fill {
            args.push("-c");
            args.push(f);
        }
        args.push(ps);
        let (c, m) = run("qemu-io", &args);
        assert!(c == 0 && !m.contains("failed"), "{m}");
    }
    let raw = dir.join(format!("{}.raw", w.name));
    let (c, m) = run(
        "qemu-img",
        &["convert", "-O", "raw", ps, raw.to_str().unwrap()],
    );
    assert_eq!(c, 0, "{m}");
    let guest = std::fs::read(&raw).unwrap();
    assert_eq!(guest.len() as u64, w.size);
    (p.clone(), std::fs::read(&p).unwrap(), guest)
}

/// Applies one op to the guest-content model (no backing files here, so
/// zeroed and discarded ranges read as zeroes).
pub fn model_apply(m: &mut [u8], op: Op, cluster: u64) {
    match op {
        Op::Write(o, l, p) | Op::WriteC(o, l, p) | Op::WriteM(o, l, p) => {
            m[o as usize..(o + l) as usize].fill(p)
        }
        Op::Zero(o, l, _) => m[o as usize..(o + l) as usize].fill(0),
        Op::Discard(o, l) => {
            let s = o.div_ceil(cluster) * cluster;
            let e = if o + l == m.len() as u64 {
                o + l
            } else {
                (o + l) / cluster * cluster
            };
            if e > s {
                m[s as usize..e as usize].fill(0);
            }
        }
        Op::Flush => {}
    }
}

/// Guest contents after each prefix of the ops: states[0] = start.
pub fn model_states(start: &[u8], ops: &[Op], cluster: u64) -> Vec<Vec<u8>> {
    let mut out = vec![start.to_vec()];
    for &op in ops {
        let mut m = out.last().unwrap().clone();
        model_apply(&mut m, op, cluster);
        out.push(m);
    }
    out
}

/// Runs one op on the engine.
pub fn exec(img: &Image, op: Op) -> Result<()> {
    match op {
        Op::Write(o, l, p) => img.write(o, &vec![p; l as usize], 0),
        Op::Zero(o, l, f) => img.write_zeroes(o, l, f),
        Op::Discard(o, l) => img.discard(o, l),
        Op::Flush => img.flush(),
        Op::WriteC(o, l, p) => img.write(o, &vec![p; l as usize], REQ_COMPRESSED),
        Op::WriteM(o, l, p) => {
            let buf = vec![p; l as usize];
            match img.try_map_write(o, l as usize)? {
                Some(m) => m.write_now(&buf),
                None => img.write(o, &buf, 0),
            }
        }
    }
}

/// Read-write, discard=unmap, writeback (small caches so eviction paths run too).
pub fn rw_opts() -> OpenOptions {
    OpenOptions {
        l2_cache_bytes: 16 << 10,
        refcount_cache_bytes: 8 << 10,
        dirty_granularity: 512,
        ..OpenOptions::read_write()
    }
}

/// A storage wrapper recording the kind of every mutating call
/// ('w' write, 's' sync, 'p' punch, 'l' set_len).
pub struct Recorder {
    pub inner: Arc<FaultStorage>,
    pub log: Arc<Mutex<Vec<char>>>,
}

impl Recorder {
    fn note(&self, c: char) {
        self.log.lock().unwrap().push(c);
    }
}

impl Storage for Recorder {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.inner.read_at(buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.note('w');
        self.inner.write_at(buf, offset)
    }
    fn sync(&self) -> io::Result<()> {
        self.note('s');
        self.inner.sync()
    }
    fn punch_hole(&self, offset: u64, len: u64) -> io::Result<bool> {
        self.note('p');
        self.inner.punch_hole(offset, len)
    }
    fn len(&self) -> io::Result<u64> {
        self.inner.len()
    }
    fn set_len(&self, len: u64) -> io::Result<()> {
        self.note('l');
        self.inner.set_len(len)
    }
}

/// Runs the whole workload without faults; returns the kinds of the
/// mutating calls (including the flush on drop) and the final bytes.
pub fn dry_run(w: &Workload, path: &Path, start: &[u8]) -> (Vec<char>, Vec<u8>) {
    let fs = Arc::new(FaultStorage::new(start.to_vec()));
    let log = Arc::new(Mutex::new(Vec::new()));
    let rec = Recorder {
        inner: fs.clone(),
        log: log.clone(),
    };
    let img = Image::open_with_storage(Box::new(rec), path, &rw_opts()).unwrap();
    log.lock().unwrap().clear();
    for &op in &w.ops {
        exec(&img, op).unwrap_or_else(|e| panic!("{}: {op:?}: {e}", w.name));
    }
    drop(img);
    let kinds = log.lock().unwrap().clone();
    (kinds, fs.current())
}

/// Small deterministic PRNG (xorshift64*).
pub struct Rng(pub u64);
impl Rng {
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
}

/// Whether the full enumeration was asked for (QCOW2_CRASH_FULL=1).
pub fn full_run() -> bool {
    std::env::var("QCOW2_CRASH_FULL").is_ok_and(|v| v != "0" && !v.is_empty())
}

/// Picks at most `budget` of `0..total`, keeping every point next to a
/// sync (just before and just after one) and spreading the rest evenly.
pub fn sample_points(kinds: &[char], budget: usize) -> Vec<u64> {
    let total = kinds.len() as u64;
    if full_run() || total as usize <= budget {
        return (0..total).collect();
    }
    let mut pts = std::collections::BTreeSet::new();
    pts.insert(0);
    pts.insert(total - 1);
    for (i, &k) in kinds.iter().enumerate() {
        // crash_after = i: ops 1..=i done, op i+1 (kinds[i]) is the first lost.
        if k == 's' || k == 'p' {
            pts.insert(i as u64);
            pts.insert(i as u64 + 1);
        }
    }
    let mut pts: Vec<u64> = pts.into_iter().filter(|&p| p < total).collect();
    if pts.len() > budget {
        // Too many syncs: thin them evenly.
        let step = pts.len() as f64 / budget as f64;
        pts = (0..budget)
            .map(|i| pts[(i as f64 * step) as usize])
            .collect();
    }
    let room = budget.saturating_sub(pts.len());
    for i in 0..room {
        pts.push(i as u64 * total / room as u64);
    }
    pts.sort_unstable();
    pts.dedup();
    pts
}

/// Checks the guest contents `got` unit by unit against the allowed
/// states; returns a description of the first mismatch.
pub fn check_units(got: &[u8], states: &[Vec<u8>], unit: u64) -> Option<String> {
    let u = unit as usize;
    for (i, g) in got.chunks(u).enumerate() {
        let r = i * u..i * u + g.len();
        if !states.iter().any(|s| &s[r.clone()] == g) {
            let pos = r.start;
            return Some(format!(
                "unit at guest {pos:#x} ({unit} bytes) reads {:02x?}.. which is none of the {} allowed states (first bytes {:?})",
                &g[..8.min(g.len())],
                states.len(),
                states
                    .iter()
                    .map(|s| format!("{:02x}", s[pos]))
                    .collect::<Vec<_>>()
            ));
        }
    }
    None
}

/// qemu-io `read -P` commands for the sectors all allowed states agree on
/// and that hold one repeated byte (at most `max` commands).
pub fn stable_pattern_reads(states: &[Vec<u8>], max: usize) -> Vec<String> {
    let first = &states[0];
    let mut runs: Vec<(u64, u64, u8)> = Vec::new();
    for (i, sec) in first.chunks(512).enumerate() {
        let r = i * 512..i * 512 + sec.len();
        let b = sec[0];
        if !sec.iter().all(|&x| x == b) || !states.iter().all(|s| s[r.clone()] == *sec) {
            continue;
        }
        match runs.last_mut() {
            Some((o, l, p)) if *p == b && *o + *l == r.start as u64 => *l += sec.len() as u64,
            _ => runs.push((r.start as u64, sec.len() as u64, b)),
        }
    }
    // Prefer the non-zero runs (flushed guest data), then zero runs.
    runs.sort_by_key(|r| (r.2 == 0, r.0));
    runs.truncate(max);
    runs.iter()
        .map(|(o, l, p)| format!("read -q -P {p:#x} {o} {l}"))
        .collect()
}

/// Runs qemu-io read -P commands; returns the failure output, if any.
pub fn qemu_io_reads(p: &Path, cmds: &[String]) -> Option<String> {
    if cmds.is_empty() {
        return None;
    }
    let mut args: Vec<&str> = vec!["-r"];
    for c in cmds {
        args.push("-c");
        args.push(c);
    }
    args.push(p.to_str().unwrap());
    let (code, out) = run("qemu-io", &args);
    if code != 0 || out.contains("Pattern verification failed") || out.contains("failed") {
        Some(out)
    } else {
        None
    }
}

/// Keeps a failing image for reproduction; returns where.
pub fn keep_failure(name: &str, bytes: &[u8]) -> PathBuf {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("crash-failures");
    std::fs::create_dir_all(&dir).unwrap();
    let p = dir.join(format!("{name}.qcow2"));
    std::fs::write(&p, bytes).unwrap();
    p
}

/// Whether an image file's header has the dirty bit (lazy refcounts not
/// written back).
pub fn is_dirty(bytes: &[u8]) -> bool {
    bytes.len() >= 80
        && u32::from_be_bytes(bytes[4..8].try_into().unwrap()) >= 3
        && bytes[79] & 1 != 0
}

/// A dirty image (refcounts left stale by lazy refcounts and a crash) as
/// QEMU treats it: it must have the lazy refcounts bit, open read-only
/// without repair, and be repaired by a read-write open of ours, which
/// clears the dirty bit. Returns whether the image at `p` was dirty.
pub fn repair_if_dirty(p: &Path) -> std::result::Result<bool, String> {
    let bytes = std::fs::read(p).unwrap();
    if !is_dirty(&bytes) {
        return Ok(false);
    }
    if bytes[87] & 1 == 0 {
        return Err("dirty bit set on an image without lazy refcounts".into());
    }
    let ro = Image::open(p, &OpenOptions::read_only())
        .map_err(|e| format!("read-only open of the dirty image: {e}"))?;
    let mut b = vec![0u8; 4096.min(ro.virtual_size() as usize)];
    ro.read(0, &mut b)
        .map_err(|e| format!("read-only read of the dirty image: {e}"))?;
    drop(ro);
    if !is_dirty(&std::fs::read(p).unwrap()) {
        return Err("a read-only open cleared the dirty bit".into());
    }
    let rw = Image::open(p, &OpenOptions::read_write())
        .map_err(|e| format!("read-write open (repair) of the dirty image: {e}"))?;
    if rw.open_repair().is_none() {
        return Err("a dirty image opened read-write without a repair".into());
    }
    rw.close().map_err(|e| format!("close after repair: {e}"))?;
    if is_dirty(&std::fs::read(p).unwrap()) {
        return Err("still dirty after the repairing open".into());
    }
    Ok(true)
}
