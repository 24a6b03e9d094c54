//! Hostile images: deterministic, seeded mutations of images made by qemu-img
//! and qemu-io (header fields, L1, L2, refcount table and blocks, truncation,
//! entries pointing at metadata or past the end of the file, compressed
//! descriptors past EOF, extended-L2 bitmaps with alloc and zero both set),
//! each opened through a real file and put through open / map / read /
//! write_zeroes / discard / write / flush / check.
//!
//! Always asserted:
//! - nothing panics or hangs (each case runs in a thread with a time limit);
//! - a header that claims a huge L1 or refcount table fails to open (quickly,
//!   without allocating it);
//! - bad images fail with `Err`, never a panic (whether the message names
//!   the image is printed: header validation errors do not, see the report).
//!
//! Compared with QEMU on the targeted cases: qemu-io runs the same requests on
//! a copy of the same mutated file; when it prints "Marking image as corrupt"
//! (and `qemu-img info` then shows `corrupt: true`) we check whether this
//! engine set the corrupt bit too. Agreement is asserted for every compared
//! case except those listed in `CORRUPT_MISMATCH` (measured differences);
//! the table is printed with `--nocapture`.
//!
//! Needs qemu-img and qemu-io; without them the test prints a note and passes.

use qcow2_ops::format::header::Header;
use qcow2_ops::format::{be64, put_be32, put_be64};
use qcow2_ops::*;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::mpsc;
use std::time::{Duration, Instant};

const CASE_TIMEOUT: Duration = Duration::from_secs(20);

fn have(cmd: &str) -> bool {
    Command::new(cmd)
        .arg("--version")
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false)
}

fn run(cmd: &str, args: &[&str]) -> (i32, String) {
    let o = Command::new(cmd).args(args).output().expect(cmd);
    let mut s = String::from_utf8_lossy(&o.stdout).into_owned();
    s.push_str(&String::from_utf8_lossy(&o.stderr));
    (o.status.code().unwrap_or(-1), s)
}

/// A clean image made by qemu-img/qemu-io and where its structures are.
struct Base {
    name: &'static str,
    bytes: Vec<u8>,
    cs: u64,
    extended: bool,
    l1_off: u64,
    rt_off: u64,
    /// First L2 table (from L1[0]).
    l2_off: u64,
    /// First refcount block (from reftable[0]).
    rb_off: u64,
    /// Index in the first L2 table of a normal data cluster, of a compressed one.
    data_idx: Option<usize>,
    comp_idx: Option<usize>,
}

fn make_base(dir: &Path, name: &'static str, opts: &str, io: &[&str]) -> Base {
    let p = dir.join(format!("{name}.qcow2"));
    let p_s = p.to_str().unwrap();
    let (rc, out) = run(
        "qemu-img",
        &["create", "-q", "-f", "qcow2", "-o", opts, p_s, "1M"],
    );
    assert_eq!(rc, 0, "qemu-img create {opts}: {out}");
    let mut a = vec!["-f", "qcow2"];
    for c in io {
        a.push("-c");
        a.push(c);
    }
    a.push(p_s);
    let (rc, out) = run("qemu-io", &a);
    assert_eq!(rc, 0, "qemu-io {io:?}: {out}");
    let bytes = std::fs::read(&p).unwrap();
    let h = Header::parse(&bytes, bytes.len() as u64).unwrap();
    let cs = h.cluster_size();
    let extended = h.extended_l2();
    let l1_off = h.l1_table_offset;
    let rt_off = h.refcount_table_offset;
    let l2_off = be64(&bytes, l1_off as usize) & 0x00ff_ffff_ffff_fe00;
    let rb_off = be64(&bytes, rt_off as usize) & !511;
    assert!(l2_off != 0 && rb_off != 0, "{name}: no L2 table / refblock");
    let es = if extended { 16 } else { 8 };
    let mut data_idx = None;
    let mut comp_idx = None;
    for i in 0..(cs as usize / es) {
        let e = be64(&bytes, l2_off as usize + i * es);
        if e & (1 << 62) != 0 {
            comp_idx.get_or_insert(i);
        } else if e & 0x00ff_ffff_ffff_fe00 != 0 {
            data_idx.get_or_insert(i);
        }
    }
    Base {
        name,
        bytes,
        cs,
        extended,
        l1_off,
        rt_off,
        l2_off,
        rb_off,
        data_idx,
        comp_idx,
    }
}

fn bases(dir: &Path) -> Vec<Base> {
    let mix = [
        "write -P 0xaa 0 64k",
        "write -c -P 0x55 64k 64k",
        "write -z 128k 64k",
        "write -P 0x11 256k 4k",
    ];
    vec![
        make_base(dir, "v3-4k", "cluster_size=4096", &mix),
        make_base(
            dir,
            "v2-4k",
            "cluster_size=4096,compat=0.10",
            &[mix[0], mix[1], mix[3]],
        ),
        make_base(
            dir,
            "extl2-16k",
            "cluster_size=16384,extended_l2=on",
            &[
                "write -P 0xaa 0 1k",
                "write -P 1 16k 16k",
                "write -z 32k 1k",
                "write -c -P 2 64k 16k",
            ],
        ),
        make_base(dir, "v3-64k", "cluster_size=65536", &mix),
        make_base(dir, "rb1-512", "cluster_size=512,refcount_bits=1", &mix),
    ]
}

/// One mutated image.
struct Case {
    name: String,
    bytes: Vec<u8>,
    /// Compare the corrupt bit with qemu-io.
    compare: bool,
    /// Opening must fail (headers claiming huge tables and the like).
    must_fail_open: bool,
}

fn set64(b: &mut [u8], off: u64, v: u64) {
    put_be64(b, off as usize, v);
}
fn set32(b: &mut [u8], off: u64, v: u32) {
    put_be32(b, off as usize, v);
}

struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
}

fn cases(b: &Base) -> Vec<Case> {
    let mut out = Vec::new();
    let cs = b.cs;
    let end = b.bytes.len() as u64;
    let far = 0x00aa_aaaa_aaaa_0000 & !(cs - 1);
    let es = if b.extended { 16 } else { 8 };
    let mut add = |name: &str, compare: bool, must_fail: bool, f: &dyn Fn(&mut Vec<u8>)| {
        let mut bytes = b.bytes.clone();
        f(&mut bytes);
        out.push(Case {
            name: format!("{}/{name}", b.name),
            bytes,
            compare,
            must_fail_open: must_fail,
        });
    };
    // Header fields.
    add("l1_size=u32::MAX", true, true, &|x| set32(x, 36, u32::MAX));
    add("l1_size=32MiB-of-entries", true, true, &|x| {
        set32(x, 36, 4 << 20)
    });
    add("reftable_clusters=u32::MAX", true, true, &|x| {
        set32(x, 56, u32::MAX)
    });
    add("reftable_clusters=8MiB", true, true, &|x| {
        set32(x, 56, ((8u64 << 20) / cs) as u32)
    });
    add("size=2^62+1", false, true, &|x| set64(x, 24, (1 << 62) + 1));
    add("size=u64::MAX", false, true, &|x| set64(x, 24, u64::MAX));
    add("cluster_bits=8", false, true, &|x| set32(x, 20, 8));
    add("cluster_bits=31", false, true, &|x| set32(x, 20, 31));
    add("l1_offset=0", false, true, &|x| set64(x, 40, 0));
    add("l1_offset=unaligned", false, true, &|x| {
        set64(x, 40, b.l1_off + 8)
    });
    add("l1_offset=past-eof", false, true, &|x| set64(x, 40, far));
    add("reftable_offset=0", false, true, &|x| set64(x, 48, 0));
    add("reftable_offset=past-eof", false, true, &|x| {
        set64(x, 48, far)
    });
    add("reftable=l1", true, false, &|x| set64(x, 48, b.l1_off));
    add("l1=reftable", true, false, &|x| set64(x, 40, b.rt_off));
    add("nb_snapshots=u32::MAX", false, false, &|x| {
        set32(x, 60, u32::MAX)
    });
    add("backing_name_len=4096", false, false, &|x| {
        set64(x, 8, 512);
        set32(x, 16, 4096)
    });
    add("backing_offset=past-cluster", false, false, &|x| {
        set64(x, 8, cs - 4);
        set32(x, 16, 100)
    });
    add("refcount_order=7", false, false, &|x| set32(x, 96, 7));
    add("header_length=huge", false, false, &|x| {
        set32(x, 100, u32::MAX)
    });
    add("incompat=unknown", false, false, &|x| {
        x[72] |= 0x80;
    });
    add("incompat=corrupt", false, false, &|x| x[79] |= 2);
    add("incompat=dirty", false, false, &|x| x[79] |= 1);
    add("incompat=data-file", false, false, &|x| x[79] |= 4);
    add("crypt_method=aes", false, false, &|x| set32(x, 32, 1));
    add("ext=overrun", false, false, &|x| {
        let hl = if x[7] == 3 { 112 } else { 72 };
        set32(x, hl, 0x1234_5678);
        set32(x, hl + 4, u32::MAX);
    });
    // Truncation.
    for (what, len) in [
        ("0", 0),
        ("71", 71),
        ("104", 104),
        ("half-header", cs / 2),
        ("after-l1", b.l1_off + cs),
        ("half", end / 2),
        ("minus-1", end - 1),
    ] {
        add(&format!("truncate={what}"), false, false, &move |x| {
            x.truncate(len as usize)
        });
    }
    // L1 entries.
    let l1 = b.l1_off;
    add("l1[0]->header", true, false, &|x| {
        set64(x, l1, 1 << 63);
    });
    add("l1[0]->cs(header-ish)", true, false, &|x| {
        set64(x, l1, (1 << 63) | cs)
    });
    add("l1[0]->l1", true, false, &|x| set64(x, l1, (1 << 63) | l1));
    add("l1[0]->reftable", true, false, &|x| {
        set64(x, l1, (1 << 63) | b.rt_off)
    });
    add("l1[0]->refblock", true, false, &|x| {
        set64(x, l1, (1 << 63) | b.rb_off)
    });
    add("l1[0]->past-eof", true, false, &|x| {
        set64(x, l1, (1 << 63) | far)
    });
    add("l1[0]->just-past-eof", true, false, &|x| {
        set64(x, l1, (1 << 63) | end.next_multiple_of(cs))
    });
    add("l1[0]->8TiB", true, false, &|x| {
        set64(x, l1, (1 << 63) | (8u64 << 40) | (4 * cs))
    });
    add("l1[0]->unaligned", true, false, &|x| {
        set64(x, l1, (1 << 63) | (b.l2_off + 512))
    });
    add("l1[0]=reserved-bits", true, false, &|x| {
        let v = be64(x, l1 as usize);
        set64(x, l1, v | 0x0100_0000_0000_0001)
    });
    add("l1[1]=l1[0]", true, false, &|x| {
        let v = be64(x, l1 as usize);
        set64(x, l1 + 8, v)
    });
    add("l1[0]-not-copied", true, false, &|x| {
        let v = be64(x, l1 as usize);
        set64(x, l1, v & !(1 << 63))
    });
    // L2 entries.
    let l2 = b.l2_off;
    if let Some(i) = b.data_idx {
        let at = l2 + (i * es) as u64;
        let flags = |x: &Vec<u8>| be64(x, at as usize) & 0xff00_0000_0000_01ff;
        for (what, target) in [
            ("header", 0u64),
            ("cs", cs),
            ("l1", l1),
            ("reftable", b.rt_off),
            ("refblock", b.rb_off),
            ("self-l2", l2),
            ("past-eof", far),
            ("just-past-eof", end.next_multiple_of(cs)),
            ("unaligned", 0x200 + cs * 3),
        ] {
            if what == "header" {
                // Offset 0 is "unallocated"; use the zero flag bit pattern
                // QEMU rejects instead: a host offset below one cluster.
                add("l2[data]->header+512", true, false, &move |x| {
                    let f = flags(x);
                    set64(x, at, f | 512)
                });
                continue;
            }
            add(&format!("l2[data]->{what}"), true, false, &move |x| {
                let f = flags(x);
                set64(x, at, f | target)
            });
        }
        add("l2[data]=reserved-bits", true, false, &move |x| {
            let v = be64(x, at as usize);
            set64(x, at, v | 0x0100_0000_0000_0002)
        });
        add("l2[data]-dup", true, false, &move |x| {
            let v = be64(x, at as usize);
            set64(x, at + es as u64, v)
        });
        if b.extended {
            add("l2[data]-bitmap-alloc+zero", true, false, &move |x| {
                set64(x, at + 8, 0x0000_0001_0000_0001)
            });
            add("l2[data]-bitmap-all", true, false, &move |x| {
                set64(x, at + 8, u64::MAX)
            });
            add("l2[unalloc]-alloc-bits-no-offset", true, false, &move |x| {
                let j = l2 + 40 * es as u64;
                set64(x, j, 0);
                set64(x, j + 8, 0xffff)
            });
        } else {
            add("l2[data]+zero-flag", true, false, &move |x| {
                let v = be64(x, at as usize);
                set64(x, at, v | 1)
            });
        }
    }
    if let Some(i) = b.comp_idx {
        let at = l2 + (i * es) as u64;
        let bits = cs.trailing_zeros();
        let x_shift = 62 - (bits - 8);
        add("l2[comp]->past-eof", true, false, &move |x| {
            let v = be64(x, at as usize);
            let mask = (1u64 << x_shift) - 1;
            set64(x, at, (v & !mask) | ((end + 5 * cs) & mask))
        });
        add("l2[comp]->header", true, false, &move |x| {
            let v = be64(x, at as usize);
            let mask = (1u64 << x_shift) - 1;
            set64(x, at, (v & !mask) | 16)
        });
        add("l2[comp]-max-sectors", true, false, &move |x| {
            let v = be64(x, at as usize);
            set64(x, at, v | (((1u64 << (bits - 8)) - 1) << x_shift))
        });
        add("l2[comp]-garbage-data", true, false, &move |x| {
            let v = be64(x, at as usize);
            let off = (v & ((1u64 << x_shift) - 1)) as usize;
            for k in 0..64.min(x.len() - off) {
                x[off + k] ^= 0x5a;
            }
        });
    }
    // Refcount table and blocks.
    let rt = b.rt_off;
    add("reftable[0]=0", true, false, &|x| set64(x, rt, 0));
    add("reftable[0]->header", true, false, &|x| set64(x, rt, 0));
    add("reftable[0]->l1", true, false, &|x| set64(x, rt, l1));
    add("reftable[0]->reftable", true, false, &|x| set64(x, rt, rt));
    add("reftable[0]->l2", true, false, &|x| set64(x, rt, l2));
    add("reftable[0]->past-eof", true, false, &|x| set64(x, rt, far));
    add("reftable[0]->unaligned", true, false, &|x| {
        set64(x, rt, b.rb_off + 512)
    });
    add("reftable[1]->refblock0", true, false, &|x| {
        set64(x, rt + 8, b.rb_off)
    });
    let rb = b.rb_off;
    add("refblock=zeroes", true, false, &|x| {
        x[rb as usize..(rb + cs) as usize].fill(0)
    });
    add("refblock=ff", true, false, &|x| {
        x[rb as usize..(rb + cs) as usize].fill(0xff)
    });
    // Seeded random byte flips in each structure.
    let mut rng = Rng(0x5eed ^ b.bytes.len() as u64);
    let regions: [(&str, u64, u64); 5] = [
        ("header", 0, 112.min(cs)),
        ("l1", l1, 64),
        ("l2", l2, cs.min(4096)),
        ("reftable", rt, 64),
        ("refblock", rb, cs.min(512)),
    ];
    for (what, start, len) in regions {
        for k in 0..6 {
            let flips: Vec<(u64, u8)> = (0..1 + rng.below(6))
                .map(|_| (start + rng.below(len), 1u8 << rng.below(8)))
                .collect();
            add(&format!("flip-{what}-{k}"), false, false, &move |x| {
                for &(o, m) in &flips {
                    if let Some(v) = x.get_mut(o as usize) {
                        *v ^= m;
                    }
                }
            });
        }
    }
    out
}

/// What our engine did with one case (`corrupt_after`: the corrupt bit is
/// set afterwards, or, on v2 images, a request failed as corrupt).
#[derive(Default, Debug)]
struct Ours {
    open_rw: Option<std::result::Result<(), String>>,
    open_ro: Option<std::result::Result<(), String>>,
    /// Error messages of requests (not open).
    op_errors: Vec<String>,
    corrupt_after: bool,
}

fn corrupt_bit(path: &Path) -> bool {
    let b = std::fs::read(path).unwrap_or_default();
    b.len() >= 80 && b[4..8] == [0, 0, 0, 3] && b[79] & 2 != 0
}

fn clamp(size: u64, off: u64, len: u64) -> Option<(u64, u64)> {
    if off >= size {
        return None;
    }
    Some((off, len.min(size - off)))
}

fn exercise(img: &Image, writable: bool, errs: &mut Vec<String>) {
    let size = img.virtual_size();
    let mut note = |r: Result<()>| {
        if let Err(e) = r {
            errs.push(e.to_string());
        }
    };
    note(img.map().map(|_| ()));
    if let Some((o, l)) = clamp(size, 0, 256 << 10) {
        let mut buf = vec![0u8; l as usize];
        note(img.read(o, &mut buf));
    }
    if writable {
        if let Some((o, l)) = clamp(size, 0, 64 << 10) {
            note(img.write_zeroes(o, l, 0));
        }
        if let Some((o, l)) = clamp(size, 64 << 10, 64 << 10) {
            note(img.write_zeroes(o, l, REQ_MAY_UNMAP));
        }
        if let Some((o, l)) = clamp(size, 8 << 10, 4 << 10) {
            note(img.write_zeroes(o, l, REQ_NO_FALLBACK));
        }
        if let Some((o, l)) = clamp(size, 128 << 10, 64 << 10) {
            note(img.discard(o, l));
        }
        if let Some((o, l)) = clamp(size, 192 << 10, 64 << 10) {
            note(img.write(o, &vec![0x5a; l as usize], 0));
        }
        note(img.flush());
    }
    note(img.check(RepairMode::None).map(|_| ()));
    note(img.map().map(|_| ()));
}

fn run_ours(path: &Path) -> Ours {
    let mut o = Ours::default();
    let mut ro = OpenOptions::read_only();
    ro.open_backing = false;
    match Image::open(path, &ro) {
        Ok(img) => {
            o.open_ro = Some(Ok(()));
            exercise(&img, false, &mut o.op_errors);
        }
        Err(e) => o.open_ro = Some(Err(e.to_string())),
    }
    let mut rw = OpenOptions::read_write();
    rw.open_backing = false;
    match Image::open(path, &rw) {
        Ok(img) => {
            o.open_rw = Some(Ok(()));
            exercise(&img, true, &mut o.op_errors);
            if let Err(e) = img.close() {
                o.op_errors.push(e.to_string());
            }
        }
        Err(e) => o.open_rw = Some(Err(e.to_string())),
    }
    // v2 images have no corrupt bit: count an error that says so.
    o.corrupt_after =
        corrupt_bit(path) || o.op_errors.iter().any(|e| e.contains("image is corrupt"));
    o
}

/// Runs our engine on `path` in a thread: Err on panic or timeout.
fn run_ours_guarded(path: &Path) -> std::result::Result<Ours, String> {
    let (tx, rx) = mpsc::channel();
    let p = path.to_path_buf();
    std::thread::spawn(move || {
        let r = std::panic::catch_unwind(|| run_ours(&p));
        let _ = tx.send(r.map_err(|e| {
            e.downcast_ref::<String>()
                .cloned()
                .or_else(|| e.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_else(|| "non-string panic".into())
        }));
    });
    match rx.recv_timeout(CASE_TIMEOUT) {
        Ok(Ok(o)) => Ok(o),
        Ok(Err(p)) => Err(format!("PANIC: {p}")),
        Err(_) => Err(format!("HANG: no answer within {CASE_TIMEOUT:?}")),
    }
}

/// qemu-io on `path` with the same requests: (opened, marked corrupt).
fn run_qemu(path: &Path) -> (bool, bool) {
    let p = path.to_str().unwrap();
    let (_, out) = run(
        "qemu-io",
        &[
            "-f",
            "qcow2",
            "-d",
            "unmap",
            "-c",
            "read 0 256k",
            "-c",
            "write -z 0 64k",
            "-c",
            "write -z -u 64k 64k",
            "-c",
            "discard 128k 64k",
            "-c",
            "write -P 0x5a 192k 64k",
            "-c",
            "flush",
            p,
        ],
    );
    let opened = !out.contains("Could not open") && !out.contains("can't open");
    let marked = out.contains("Marking image as corrupt");
    let v3 = std::fs::read(path)
        .map(|b| b.len() >= 8 && b[7] == 3)
        .unwrap_or(false);
    if marked && v3 {
        let (_, info) = run("qemu-img", &["info", "-U", p]);
        assert!(
            info.contains("corrupt: true"),
            "qemu-io said it marked {p} corrupt but qemu-img info disagrees:\n{info}"
        );
    }
    (opened, marked)
}

/// Cases where our corrupt marking differs from QEMU 10's (measured here);
/// agreement is asserted for every other compared case.
const CORRUPT_MISMATCH: &[&str] = &[
    // Ours refuses to open (L1 / refcount table past EOF, unaligned L2 offset
    // in L1); QEMU opens and marks corrupt on first access.
    "v3-4k/l1_size=32MiB-of-entries",
    "v2-4k/l1_size=32MiB-of-entries",
    "extl2-16k/l1_size=32MiB-of-entries",
    "v3-64k/l1_size=32MiB-of-entries",
    "rb1-512/l1_size=32MiB-of-entries",
    "v3-4k/reftable_clusters=8MiB",
    "v2-4k/reftable_clusters=8MiB",
    "extl2-16k/reftable_clusters=8MiB",
    "v3-64k/reftable_clusters=8MiB",
    "rb1-512/reftable_clusters=8MiB",
    "v3-4k/l1[0]->unaligned",
    "v2-4k/l1[0]->unaligned",
    "extl2-16k/l1[0]->unaligned",
    "v3-64k/l1[0]->unaligned",
    // Compressed descriptor on the header: ours marks corrupt, QEMU only
    // fails the read.
    "v3-4k/l2[comp]->header",
    "v2-4k/l2[comp]->header",
    "extl2-16k/l2[comp]->header",
    // v2: ours refuses an L2 table on the L1 table; QEMU does not notice.
    "v2-4k/l1[0]->l1",
    // v2: discard of a cluster shared by two L2 entries (refcount 1): the
    // second decrement fails at the flush and ours marks corrupt, QEMU only
    // logs.
    "v2-4k/l2[data]-dup",
    // The invalid entry lies outside the requests both engines run; only
    // ours maps the whole image (block status marks it corrupt, as
    // `qemu-io -c map` on the same file does).
    "extl2-16k/l2[unalloc]-alloc-bits-no-offset",
    // v2: zeroing discards the data entry that points at metadata (or just
    // past EOF), and the write later in the session reuses freed clusters:
    // ours applies the free first, then refuses to allocate the metadata
    // cluster (overlap check) or to drop a refcount below zero (the unowned
    // cluster just past EOF). QEMU takes the write's clusters as one run
    // elsewhere and notices nothing (l2[data]->cs: 39 `qemu-img check`
    // errors afterwards, no message; v2 has no corrupt bit).
    "v2-4k/l2[data]->cs",
    "v2-4k/l2[data]->l1",
    "v2-4k/l2[data]->reftable",
    "v2-4k/l2[data]->refblock",
    "v2-4k/l2[data]->self-l2",
    "v2-4k/l2[data]->just-past-eof",
    // L1 entry pointing past EOF: QEMU writes an L2 table there (8 TiB out
    // for l1[0]->8TiB); ours refuses to use a table it does not own and
    // marks the image corrupt (deliberate).
    "v3-4k/l1[0]->past-eof",
    "v3-4k/l1[0]->8TiB",
    "v2-4k/l1[0]->past-eof",
    "v2-4k/l1[0]->8TiB",
    "extl2-16k/l1[0]->past-eof",
    "extl2-16k/l1[0]->8TiB",
    "v3-64k/l1[0]->past-eof",
    "v3-64k/l1[0]->8TiB",
    "rb1-512/l1[0]->past-eof",
    "rb1-512/l1[0]->8TiB",
    // L2 table just past EOF: the next allocation lands on it; ours refuses
    // (overlap check) and marks corrupt, QEMU writes there.
    "rb1-512/l1[0]->just-past-eof",
];

/// Known bugs: (case-name suffix, what happens). These cases are skipped
/// (they would hit the time limit) unless `HOSTILE_KNOWN=1`, and then
/// reported without failing; every other panic or hang fails the test.
const KNOWN_BUGS: &[(&str, &str)] = &[
    // (none left: L2 tables past EOF are refused, and the metadata
    // preallocation scan skips ranges without refcount blocks)
];

fn names_image(msg: &str, path: &Path) -> bool {
    let file = path.file_name().unwrap().to_str().unwrap();
    msg.contains(file)
}

#[test]
fn hostile_images() {
    if !have("qemu-img") || !have("qemu-io") {
        qcow2_testutil::skip("hostile_images", "qemu-img/qemu-io not installed");
        return;
    }
    let t0 = Instant::now();
    // HOSTILE_ONLY=<substring>: run only matching cases;
    // HOSTILE_KEEP=<dir>: write the files there and keep them.
    let only = std::env::var("HOSTILE_ONLY").ok();
    let keep = std::env::var_os("HOSTILE_KEEP").map(PathBuf::from);
    let tmp = tempfile::tempdir().unwrap();
    let dir: &Path = match &keep {
        Some(k) => {
            std::fs::create_dir_all(k).unwrap();
            k
        }
        None => tmp.path(),
    };
    let bases = bases(dir);
    let mut failures: Vec<String> = Vec::new();
    let mut known: Vec<String> = Vec::new();
    let mut unnamed: Vec<String> = Vec::new();
    let mut unnamed_open: Vec<String> = Vec::new();
    let mut corrupt_rows: Vec<String> = Vec::new();
    let mut n = 0;
    for b in &bases {
        for c in cases(b) {
            if only.as_ref().is_some_and(|o| !c.name.contains(o.as_str())) {
                continue;
            }
            let known_bug = KNOWN_BUGS.iter().find(|k| c.name.ends_with(k.0));
            if let Some((_, what)) = known_bug {
                if std::env::var_os("HOSTILE_KNOWN").is_none() {
                    known.push(format!(
                        "{} (skipped, HOSTILE_KNOWN=1 runs it): {what}",
                        c.name
                    ));
                    continue;
                }
            }
            n += 1;
            let file = c.name.replace('/', "--").replace(['(', ')', '>', '='], "_");
            let ours_path: PathBuf = dir.join(format!("{file}.ours.qcow2"));
            std::fs::write(&ours_path, &c.bytes).unwrap();
            if keep.is_some() {
                std::fs::write(dir.join(format!("{file}.case.qcow2")), &c.bytes).unwrap();
            }
            let t = Instant::now();
            let ours = match run_ours_guarded(&ours_path) {
                Ok(o) => o,
                Err(e) => {
                    let msg = format!("{}: {e}", c.name);
                    if known_bug.is_some() {
                        known.push(msg);
                    } else {
                        failures.push(msg);
                    }
                    continue;
                }
            };
            let took = t.elapsed();
            if c.must_fail_open {
                if !matches!(ours.open_rw, Some(Err(_))) || !matches!(ours.open_ro, Some(Err(_))) {
                    failures.push(format!("{}: opened, but must fail to open", c.name));
                }
                if took > Duration::from_secs(2) {
                    failures.push(format!("{}: failing to open took {took:?}", c.name));
                }
            }
            for r in [&ours.open_rw, &ours.open_ro] {
                if let Some(Err(m)) = r {
                    if !names_image(m, &ours_path) {
                        unnamed_open.push(format!("{}: {m}", c.name));
                    }
                }
            }
            for m in &ours.op_errors {
                if !names_image(m, &ours_path) {
                    unnamed.push(format!("{}: {m}", c.name));
                }
            }
            if c.compare {
                let q_path = dir.join(format!("{file}.qemu.qcow2"));
                std::fs::write(&q_path, &c.bytes).unwrap();
                let (q_open, q_marked) = run_qemu(&q_path);
                let ours_opened = matches!(ours.open_rw, Some(Ok(())));
                let agree = q_marked == ours.corrupt_after;
                let row = format!(
                    "{:<45} qemu: open={:<5} corrupt={:<5} | ours: open_rw={:<5} corrupt={:<5} {}",
                    c.name,
                    q_open,
                    q_marked,
                    ours_opened,
                    ours.corrupt_after,
                    if agree { "" } else { "MISMATCH" }
                );
                if !agree {
                    if !CORRUPT_MISMATCH.contains(&c.name.as_str()) {
                        failures.push(format!("corrupt bit disagrees with QEMU: {row}"));
                    }
                    let why = match &ours.open_rw {
                        Some(Err(e)) => format!("    ours open_rw: {e}"),
                        _ => format!(
                            "    ours errors: {:?}",
                            ours.op_errors.iter().take(3).collect::<Vec<_>>()
                        ),
                    };
                    corrupt_rows.push(format!("{row}\n{why}"));
                } else {
                    corrupt_rows.push(row);
                }
            }
        }
    }
    eprintln!("hostile images: {n} cases in {:?}", t0.elapsed());
    eprintln!("--- corrupt bit vs qemu-io (same requests, same mutated file):");
    for r in &corrupt_rows {
        eprintln!("{r}");
    }
    if !unnamed_open.is_empty() {
        eprintln!(
            "--- open errors whose message does not name the image ({}):",
            unnamed_open.len()
        );
        let mut seen = std::collections::BTreeSet::new();
        for u in &unnamed_open {
            let msg = u.split_once(": ").map(|x| x.1).unwrap_or(u);
            let kind: String = msg.chars().take(30).collect();
            if seen.insert(kind) {
                eprintln!("  {u}");
            }
        }
    }
    if !unnamed.is_empty() {
        eprintln!(
            "--- request errors whose message does not name the image ({}):",
            unnamed.len()
        );
        let mut seen = std::collections::BTreeSet::new();
        for u in &unnamed {
            let msg = u.split_once(": ").map(|x| x.1).unwrap_or(u);
            if seen.insert(msg.to_string()) {
                eprintln!("  {u}");
            }
        }
    }
    if !known.is_empty() {
        eprintln!("--- known bugs (not failing):");
        for k in &known {
            eprintln!("  {k}");
        }
    }
    assert!(
        failures.is_empty(),
        "{} failures:\n{}",
        failures.len(),
        failures.join("\n")
    );
}
