//! Shared helpers of the differential tests: QEMU 10's qemu-img / qemu-io are
//! the oracle, `qcow2` (this crate's binary) is compared against them.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// Path of the binary under test.
pub fn qcow2_bin() -> &'static str {
    env!("CARGO_BIN_EXE_qcow2")
}

/// Result of running a program.
#[derive(Debug, Clone)]
pub struct Run {
    /// Exit status (-1 when killed by a signal).
    pub code: i32,
    /// Standard output.
    pub stdout: String,
    /// Standard error.
    pub stderr: String,
}

impl Run {
    fn from(o: Output) -> Run {
        Run {
            code: o.status.code().unwrap_or(-1),
            stdout: String::from_utf8_lossy(&o.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&o.stderr).into_owned(),
        }
    }
    /// Panics with the whole output unless the exit status is 0.
    pub fn ok(self, what: &str) -> Run {
        assert_eq!(
            self.code, 0,
            "{what} failed:\nstdout:\n{}\nstderr:\n{}",
            self.stdout, self.stderr
        );
        self
    }
}

/// Runs `prog args...` in `dir`.
pub fn run_in(dir: &Path, prog: &str, args: &[&str]) -> Run {
    let o = Command::new(prog)
        .args(args)
        .current_dir(dir)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {prog}: {e}"));
    Run::from(o)
}

/// qemu-img in `dir`.
pub fn qemu_img(dir: &Path, args: &[&str]) -> Run {
    run_in(dir, "qemu-img", args)
}

/// qemu-io in `dir`.
pub fn qemu_io(dir: &Path, args: &[&str]) -> Run {
    run_in(dir, "qemu-io", args)
}

/// `qcow2` in `dir`.
pub fn ours(dir: &Path, args: &[&str]) -> Run {
    let r = run_in(dir, qcow2_bin(), args);
    assert!(
        !r.stderr.contains("panicked") && !r.stderr.contains("internal error"),
        "qcow2 {args:?} panicked:\n{}",
        r.stderr
    );
    r
}

/// A fresh temporary directory.
pub fn tmpdir() -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix("qcow2-cli-test")
        .tempdir()
        .expect("tempdir")
}

/// Options of a qcow2 image, as qemu-img's `-o` list.
#[derive(Debug, Clone)]
pub struct ImgOpts {
    pub compat: &'static str,
    pub cluster_size: u64,
    pub refcount_bits: u32,
    pub extended_l2: bool,
    pub zstd: bool,
    pub lazy_refcounts: bool,
}

impl Default for ImgOpts {
    fn default() -> Self {
        ImgOpts {
            compat: "1.1",
            cluster_size: 65536,
            refcount_bits: 16,
            extended_l2: false,
            zstd: false,
            lazy_refcounts: false,
        }
    }
}

impl ImgOpts {
    /// The `-o` string.
    pub fn o(&self) -> String {
        format!(
            "compat={},cluster_size={},refcount_bits={},extended_l2={},compression_type={},lazy_refcounts={}",
            self.compat,
            self.cluster_size,
            self.refcount_bits,
            if self.extended_l2 { "on" } else { "off" },
            if self.zstd { "zstd" } else { "zlib" },
            if self.lazy_refcounts { "on" } else { "off" },
        )
    }
    /// Whether qemu accepts the combination.
    pub fn valid(&self) -> bool {
        let v2 = self.compat == "0.10";
        !(v2 && (self.refcount_bits != 16 || self.extended_l2 || self.zstd || self.lazy_refcounts))
            && !(self.extended_l2 && self.cluster_size < 16384)
    }
    /// The matrix: compat x cluster size x refcount bits x extended L2 x compression, valid ones.
    pub fn matrix() -> Vec<ImgOpts> {
        let mut v = Vec::new();
        for compat in ["0.10", "1.1"] {
            for cs in [512u64, 4096, 65536, 2 << 20] {
                for rb in [1u32, 16, 64] {
                    for ext in [false, true] {
                        for zstd in [false, true] {
                            let o = ImgOpts {
                                compat,
                                cluster_size: cs,
                                refcount_bits: rb,
                                extended_l2: ext,
                                zstd,
                                lazy_refcounts: false,
                            };
                            if o.valid() {
                                v.push(o);
                            }
                        }
                    }
                }
            }
        }
        v
    }
}

/// Creates `name` in `dir` with qemu-img.
pub fn qemu_create(dir: &Path, name: &str, size: u64, o: &ImgOpts, backing: Option<(&str, &str)>) {
    let size_s = size.to_string();
    let ostr = o.o();
    let mut args = vec!["create", "-q", "-f", "qcow2", "-o", ostr.as_str()];
    if let Some((b, f)) = backing {
        args.extend(["-b", b, "-F", f]);
    }
    args.push(name);
    args.push(&size_s);
    qemu_img(dir, &args).ok("qemu-img create");
}

/// Creates a raw file of `size` bytes in `dir`, fully written (no holes) with
/// qemu-io patterns so that its allocation status does not depend on the
/// file system.
pub fn raw_backing(dir: &Path, name: &str, size: u64, cmds: &[String]) {
    std::fs::write(dir.join(name), vec![0x5au8; size as usize]).expect("write raw");
    if !cmds.is_empty() {
        qemu_io_script(dir, name, "raw", cmds).ok("qemu-io on raw backing");
    }
}

/// Runs commands with qemu-io (`-f fmt`).
pub fn qemu_io_script(dir: &Path, name: &str, fmt: &str, cmds: &[String]) -> Run {
    let mut args: Vec<&str> = vec!["-f", fmt];
    for c in cmds {
        args.push("-c");
        args.push(c);
    }
    args.push(name);
    qemu_io(dir, &args)
}

/// Runs commands with `qcow2 io` plus extra options.
pub fn ours_io_script(dir: &Path, name: &str, extra: &[&str], cmds: &[String]) -> Run {
    let mut args: Vec<&str> = vec!["io"];
    args.extend_from_slice(extra);
    for c in cmds {
        args.push("-c");
        args.push(c);
    }
    args.push(name);
    ours(dir, &args)
}

/// Whether a line is qemu-io's timing line (`64 KiB, 1 ops; 00.00 sec (...)`).
pub fn is_timing_line(l: &str) -> bool {
    l.contains(" ops; ") && l.contains(" ops/sec)")
}

/// The output lines that carry results (timing lines removed).
pub fn result_lines(out: &str) -> Vec<String> {
    out.lines()
        .filter(|l| !is_timing_line(l))
        .map(str::to_string)
        .collect()
}

/// One extent of `qemu-img map --output=json`, parsed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Extent {
    pub start: u64,
    pub length: u64,
    pub depth: u64,
    pub present: bool,
    pub zero: bool,
    pub data: bool,
    pub compressed: bool,
    pub offset: Option<u64>,
}

/// Parses map JSON.
pub fn parse_map(json: &str) -> Vec<Extent> {
    let v: serde_json::Value =
        serde_json::from_str(json).unwrap_or_else(|e| panic!("bad map json {e}: {json}"));
    v.as_array()
        .expect("map is an array")
        .iter()
        .map(|e| Extent {
            start: e["start"].as_u64().expect("start"),
            length: e["length"].as_u64().expect("length"),
            depth: e["depth"].as_u64().expect("depth"),
            present: e["present"].as_bool().expect("present"),
            zero: e["zero"].as_bool().expect("zero"),
            data: e["data"].as_bool().expect("data"),
            compressed: e["compressed"].as_bool().expect("compressed"),
            offset: e.get("offset").and_then(|o| o.as_u64()),
        })
        .collect()
}

/// The map with host offsets dropped and neighbours with equal status merged
/// (host allocation order may legitimately differ between implementations).
pub fn map_without_offsets(json: &str) -> Vec<Extent> {
    let mut out: Vec<Extent> = Vec::new();
    for mut e in parse_map(json) {
        e.offset = None;
        if let Some(last) = out.last_mut() {
            if last.start + last.length == e.start
                && (
                    last.depth,
                    last.present,
                    last.zero,
                    last.data,
                    last.compressed,
                ) == (e.depth, e.present, e.zero, e.data, e.compressed)
            {
                last.length += e.length;
                continue;
            }
        }
        out.push(e);
    }
    out
}

/// `qemu-img map --output=json` text.
pub fn qemu_map(dir: &Path, name: &str) -> String {
    qemu_img(dir, &["map", "--output=json", "-f", "qcow2", name])
        .ok("qemu-img map")
        .stdout
}

/// `qcow2 map --output=json` text.
pub fn our_map(dir: &Path, name: &str) -> Run {
    ours(dir, &["map", "--output=json", name])
}

/// Asserts `qemu-img check` finds `name` clean.
pub fn assert_qemu_check_clean(dir: &Path, name: &str, ctx: &str) {
    let r = qemu_img(dir, &["check", "-f", "qcow2", name]);
    assert_eq!(
        r.code, 0,
        "{ctx}: qemu-img check {name} not clean:\n{}\n{}",
        r.stdout, r.stderr
    );
}

/// Reads the whole guest content through qemu (`qemu-img convert -O raw`).
pub fn qemu_content(dir: &Path, name: &str) -> Vec<u8> {
    let out = format!("{name}.content.raw");
    qemu_img(dir, &["convert", "-f", "qcow2", "-O", "raw", name, &out]).ok("qemu-img convert");
    let data = std::fs::read(dir.join(&out)).expect("read converted");
    let _ = std::fs::remove_file(dir.join(&out));
    data
}

/// Runs of equal bytes, as (offset, length, byte).
pub fn byte_runs(data: &[u8]) -> Vec<(u64, u64, u8)> {
    let mut runs: Vec<(u64, u64, u8)> = Vec::new();
    for (i, &b) in data.iter().enumerate() {
        match runs.last_mut() {
            Some(r) if r.2 == b => r.1 += 1,
            _ => runs.push((i as u64, 1, b)),
        }
    }
    runs
}

/// Asserts the content read through `qcow2 io -r` equals what qemu reads,
/// by verifying every run of equal bytes with `read -P`.
pub fn assert_content_matches_qemu(dir: &Path, name: &str, ctx: &str) {
    let data = qemu_content(dir, name);
    let runs = byte_runs(&data);
    assert!(
        runs.len() < 20000,
        "{ctx}: content too irregular for pattern checks"
    );
    for chunk in runs.chunks(400) {
        let cmds: Vec<String> = chunk
            .iter()
            .flat_map(|&(off, len, b)| {
                // qemu-io limits one request to just under 2 GiB
                let mut v = Vec::new();
                let mut o = off;
                while o < off + len {
                    let l = (off + len - o).min(1 << 30);
                    v.push(format!("read -q -P {b} {o} {l}"));
                    o += l;
                }
                v
            })
            .collect();
        let r = ours_io_script(dir, name, &["-r"], &cmds);
        assert_eq!(
            r.code, 0,
            "{ctx}: content of {name} differs from qemu's:\n{}\n{}",
            r.stdout, r.stderr
        );
    }
}

/// A copy of `src` named `dst` in the same directory.
pub fn copy(dir: &Path, src: &str, dst: &str) {
    std::fs::copy(dir.join(src), dir.join(dst)).expect("copy image");
}

/// Sets the refcount of host cluster `idx` of a qcow2 file by editing its
/// refcount block directly (any refcount width; the refcount block must exist).
pub fn set_refcount(path: &Path, idx: u64, value: u64) {
    let mut f = std::fs::read(path).expect("read image");
    let be64 = |b: &[u8], o: usize| u64::from_be_bytes(b[o..o + 8].try_into().expect("8 bytes"));
    let be32 = |b: &[u8], o: usize| u32::from_be_bytes(b[o..o + 4].try_into().expect("4 bytes"));
    let version = be32(&f, 4);
    let cluster_bits = be32(&f, 20);
    let cs = 1u64 << cluster_bits;
    let rt = be64(&f, 48) as usize;
    let order = if version >= 3 { be32(&f, 96) } else { 4 };
    let bits = 1u64 << order;
    let per_block = cs * 8 / bits;
    let rb = be64(&f, rt + 8 * (idx / per_block) as usize) & !0x1ff;
    assert!(rb != 0, "no refcount block covers cluster {idx}");
    let i = idx % per_block;
    let bitpos = i * bits;
    let base = rb as usize;
    if bits >= 8 {
        let bytes = (bits / 8) as usize;
        let off = base + (bitpos / 8) as usize;
        let be = value.to_be_bytes();
        f[off..off + bytes].copy_from_slice(&be[8 - bytes..]);
    } else {
        let off = base + (bitpos / 8) as usize;
        let shift = bitpos % 8;
        let mask = ((1u16 << bits) - 1) as u8;
        f[off] = (f[off] & !(mask << shift)) | (((value as u8) & mask) << shift);
    }
    std::fs::write(path, f).expect("write image");
}

/// Cluster size of a qcow2 file.
pub fn cluster_size_of(path: &Path) -> u64 {
    let f = std::fs::read(path).expect("read image");
    1u64 << u32::from_be_bytes(f[20..24].try_into().expect("4 bytes"))
}

/// Appends `n` zeroed clusters to the (cluster-rounded) file and gives them
/// refcount 1: leaked clusters. Returns their indexes.
pub fn plant_leaks(path: &Path, n: u64) -> Vec<u64> {
    let cs = cluster_size_of(path);
    let len = std::fs::metadata(path).expect("stat").len();
    let first = len.div_ceil(cs);
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(path)
        .expect("open");
    f.set_len((first + n) * cs).expect("extend");
    drop(f);
    let idx: Vec<u64> = (first..first + n).collect();
    for &i in &idx {
        set_refcount(path, i, 1);
    }
    idx
}

/// Host offset of the first data cluster in the map, in clusters.
pub fn first_data_cluster(map_json: &str, cs: u64) -> Option<u64> {
    parse_map(map_json)
        .iter()
        .find(|e| e.depth == 0 && e.data && !e.compressed && e.offset.is_some())
        .and_then(|e| e.offset)
        .map(|o| o / cs)
}

/// Path helper.
pub fn p(dir: &Path, name: &str) -> PathBuf {
    dir.join(name)
}

/// A fill script in units of the cluster size: patterns, zeroes with and
/// without unmap, compressed clusters, discard, partial clusters, subclusters.
pub fn fill_script(cs: u64, v3: bool) -> Vec<String> {
    let sc = cs / 32; // subcluster size with extended L2
    let mut v = vec![
        format!("write -P 0x11 0 {}", 2 * cs),
        format!("write -P 0x22 {} {}", 3 * cs + cs / 4, cs / 4),
        format!("write -z {} {}", 4 * cs, cs),
        format!("write -P 0x33 {} {}", 5 * cs, cs),
        format!("write -z -u {} {}", 5 * cs, cs),
        format!("write -c -P 0x44 {} {}", 6 * cs, cs),
        format!("write -P 0x55 {} {}", 8 * cs, 2 * cs),
        format!("discard {} {}", 8 * cs, cs),
        format!("write -z {} {}", 10 * cs + cs / 2, cs / 2),
        format!("write -P 0x66 {} {}", 12 * cs, cs),
        format!("write -z {} {}", 12 * cs + cs / 4, cs / 4),
        format!(
            "write -P 0x77 {} {}",
            14 * cs + 3 * sc.max(1),
            2 * sc.max(1)
        ),
        format!("write -P 0x78 {} {}", 15 * cs, cs),
    ];
    let _ = v3;
    v.push(format!("write -c -P 0x79 {} {}", 13 * cs, cs));
    v
}

/// Overlay script over a backing file of about 8 clusters (in cluster units):
/// COW of partial clusters, zeroes and discards over backed data, writes
/// across the end of the backing file, compressed data.
pub fn overlay_script(cs: u64) -> Vec<String> {
    vec![
        format!("write -P 0xa1 {} {}", cs / 2, cs / 4),
        format!("write -z {} {}", cs, cs),
        format!("write -z -u {} {}", 2 * cs, cs),
        format!("discard {} {}", 3 * cs, cs),
        format!("write -z {} {}", 4 * cs + cs / 2, cs / 2),
        format!("write -P 0xa2 {} {}", 6 * cs + cs / 2, cs),
        format!("write -P 0xa3 {} {}", 7 * cs + cs / 2, cs),
        format!("write -z {} {}", 9 * cs, cs / 2),
        format!("write -c -P 0xa4 {} {}", 10 * cs, cs),
        format!("discard {} {}", 12 * cs, cs),
    ]
}

/// Runs `f` for every case on up to `workers` threads; returns the failures.
pub fn run_cases<T: Sync + std::fmt::Debug>(
    cases: &[T],
    workers: usize,
    f: impl Fn(&T) + Sync,
) -> Vec<String> {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Mutex;
    let next = AtomicUsize::new(0);
    let failures = Mutex::new(Vec::new());
    std::thread::scope(|s| {
        for _ in 0..workers.max(1) {
            s.spawn(|| loop {
                let i = next.fetch_add(1, Ordering::SeqCst);
                let Some(c) = cases.get(i) else { break };
                let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| f(c)));
                if let Err(e) = r {
                    let msg = e
                        .downcast_ref::<String>()
                        .cloned()
                        .or_else(|| e.downcast_ref::<&str>().map(|s| s.to_string()))
                        .unwrap_or_default();
                    failures
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .push(format!("{c:?}: {msg}"));
                }
            });
        }
    });
    failures.into_inner().unwrap_or_else(|p| p.into_inner())
}

/// Panics listing all failures (with a count) when there are any.
pub fn assert_no_failures(what: &str, total: usize, failures: &[String]) {
    if !failures.is_empty() {
        let mut msg = format!("{what}: {} of {total} cases failed\n", failures.len());
        for (i, f) in failures.iter().enumerate() {
            if i < 4 {
                msg.push_str(&format!("---- {f}\n"));
            } else {
                msg.push_str(&format!("---- {}\n", f.lines().next().unwrap_or("")));
            }
        }
        panic!("{msg}");
    }
}

/// Worker threads for case lists.
pub fn workers() -> usize {
    std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(2)
        .clamp(1, 4)
}

/// Whether `tool probe...` runs successfully (e.g. `strace -o /dev/null
/// true`: installed and able to trace here). When it does not: panics under
/// CI (environment variable CI set), else prints "skipped: <tool> not
/// installed" for `what` and returns false.
pub fn tool_or_skip(tool: &str, probe: &[&str], what: &str) -> bool {
    let ok = Command::new(tool)
        .args(probe)
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false);
    if !ok {
        assert!(
            std::env::var_os("CI").is_none(),
            "{what}: {tool} is not installed or does not work here (required under CI)"
        );
        println!("skipped: {tool} not installed ({what})");
    }
    ok
}

/// Runs `qemu-img args` and `qcow2 args` in `dir`: the same exit status
/// and standard output.
pub fn assert_same_as_qemu_img(dir: &Path, args: &[&str], what: &str) {
    let q = qemu_img(dir, args);
    let o = ours(dir, args);
    assert_eq!(
        (q.code, &q.stdout),
        (o.code, &o.stdout),
        "{what}: {args:?}\n{}",
        o.stderr
    );
}

/// Two runs of the same command line, QEMU's (`prog`: qemu-img or qemu-io)
/// and ours: same exit status, result lines and messages (QEMU's program
/// prefix read as ours).
pub fn assert_same_run(q: &Run, o: &Run, prog: &str, what: &str) {
    assert_eq!(
        q.code, o.code,
        "{what}: exit status\n{}\n{}",
        q.stderr, o.stderr
    );
    assert_eq!(
        result_lines(&q.stdout),
        result_lines(&o.stdout),
        "{what}: stdout"
    );
    assert_eq!(
        q.stderr.replace(&format!("{prog}:"), "qcow2:"),
        o.stderr,
        "{what}: stderr"
    );
}

/// Asserts that files `a` and `b` in `dir` are byte for byte equal; on a
/// difference, tells the first differing offset and the lengths (not the
/// whole contents).
pub fn assert_same_bytes(dir: &Path, a: &str, b: &str, what: &str) {
    let (x, y) = (
        std::fs::read(dir.join(a)).expect("read first file"),
        std::fs::read(dir.join(b)).expect("read second file"),
    );
    if x != y {
        let at = x.iter().zip(&y).position(|(p, q)| p != q);
        panic!(
            "{what}: {a} and {b} differ (first at {at:?}; lengths {} and {})",
            x.len(),
            y.len()
        );
    }
}
