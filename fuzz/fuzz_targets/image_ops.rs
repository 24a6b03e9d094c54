//! Fuzz target `image_ops`: the input is a whole qcow2 image held in memory.
//!
//! It is opened read-write (and read-only), mapped, read, zeroed with every
//! flag combination, discarded, written, flushed and checked. Nothing may
//! panic or hang, and every write the engine issues is checked against the
//! metadata layout the header declared at open (see [`Guard`]):
//!
//! * the header cluster is written only at 72..80 (incompatible features)
//!   and 48..60 (refcount table offset + clusters, switched in one write);
//! * the L1 table area (rounded up to whole clusters, as QEMU protects it) is
//!   written only by L1 updates: 8-byte aligned runs of whole entries inside
//!   `l1_size * 8` bytes, never also covering the refcount table;
//! * the refcount table area is written only by whole-entry updates inside
//!   it, never also covering the L1 table; after a header switch at 48..60
//!   the new location is the one that is protected;
//! * punch_hole and set_len never remove any of those areas;
//! * nothing is written far past the end of the file (see `Guard::limit`).
#![no_main]

use libfuzzer_sys::fuzz_target;
use qcow2_format::header::Header;
use qcow2_format::{be32, be64};
use qcow2_io::{MemStorage, Storage};
use qcow2_ops::{Image, OpenOptions, RepairMode};
use std::io;
use std::sync::{Arc, Mutex};

#[derive(Clone, Debug)]
struct Layout {
    cs: u64,
    l1_off: u64,
    l1_bytes: u64,
    rt_off: u64,
    rt_bytes: u64,
}

impl Layout {
    fn l1_area(&self) -> (u64, u64) {
        if self.l1_bytes == 0 {
            return (0, 0);
        }
        let end = self.l1_off + self.l1_bytes.div_ceil(self.cs) * self.cs;
        (self.l1_off, end)
    }
    fn rt_area(&self) -> (u64, u64) {
        (self.rt_off, self.rt_off + self.rt_bytes)
    }
}

fn overlaps(a: (u64, u64), b: (u64, u64)) -> bool {
    a.0 < b.1 && b.0 < a.1 && a.0 < a.1 && b.0 < b.1
}
fn inside(a: (u64, u64), b: (u64, u64)) -> bool {
    b.0 <= a.0 && a.1 <= b.1
}

/// Storage wrapper that checks every write against the declared layout.
struct Guard {
    inner: MemStorage,
    layout: Mutex<Layout>,
    /// Writes and set_len must stay below this (file length at open + 1 GiB):
    /// the bounded requests of this target never need more, so anything
    /// beyond is a write to a cluster nobody allocated (e.g. an L2 table
    /// whose L1 entry points far past the end of the file).
    limit: u64,
    /// `QCOW2_FUZZ_LENIENT=1`: such writes fail with EFBIG (as a file
    /// system would) instead of being reported, so fuzzing can go on past
    /// that known class of bug.
    lenient: bool,
}

impl Guard {
    fn check_limit(&self, what: &str, end: u64) -> io::Result<()> {
        if end > self.limit {
            if self.lenient {
                return Err(io::Error::from_raw_os_error(27 /* EFBIG */));
            }
            panic!(
                "{what} ending at {end:#x} lands far past the end of the image (limit {:#x}): not a cluster the image owns",
                self.limit
            );
        }
        Ok(())
    }
}

impl Guard {
    fn check_write(&self, buf: &[u8], off: u64) {
        let mut l = self.layout.lock().unwrap();
        let w = (off, off.saturating_add(buf.len() as u64));
        let hdr = (0, l.cs);
        if overlaps(w, hdr) {
            // Allowed: incompatible bits (corrupt, dirty), autoclear bits
            // (cleared on read-write open), a refcount table move, and a
            // rewrite of the header with its extensions (a bitmaps extension
            // no longer vouched for is dropped) that keeps the layout.
            let rewrite = off == 0
                && buf.len() >= 104
                && be64(buf, 40) == l.l1_off
                && be64(buf, 48) == l.rt_off
                && be32(buf, 56) as u64 * l.cs == l.rt_bytes;
            let ok = (w == (72, 80)) || (w == (48, 60)) || (w == (88, 96)) || rewrite;
            assert!(
                ok,
                "write at {off:#x} ({} bytes) touches the header cluster outside 48..60 / 72..80 / 88..96 \
                 and is not a header rewrite keeping the layout",
                buf.len()
            );
            if w == (48, 60) {
                let rt_off = be64(buf, 0);
                let rt_clusters = be32(buf, 8) as u64;
                let new_rt = (rt_off, rt_off + rt_clusters * l.cs);
                assert!(
                    !overlaps(new_rt, hdr) && !overlaps(new_rt, l.l1_area()),
                    "refcount table moved to {rt_off:#x} ({rt_clusters} clusters): overlaps header or L1 {:?}",
                    l
                );
                l.rt_off = rt_off;
                l.rt_bytes = rt_clusters * l.cs;
            }
            return;
        }
        let l1 = l.l1_area();
        let rt = l.rt_area();
        let hit_l1 = overlaps(w, l1);
        let hit_rt = overlaps(w, rt);
        if hit_l1 {
            let table = (l.l1_off, l.l1_off + l.l1_bytes);
            assert!(
                inside(w, table) && (off - l.l1_off) % 8 == 0 && buf.len() % 8 == 0,
                "write at {off:#x} ({} bytes) overlaps the L1 area {l1:x?} but is not an L1 update ({:?})",
                buf.len(),
                l
            );
            assert!(
                !hit_rt,
                "L1 update at {off:#x} ({} bytes) lands on the refcount table {rt:x?}",
                buf.len()
            );
        }
        if hit_rt {
            assert!(
                inside(w, rt) && (off - l.rt_off) % 8 == 0 && buf.len() % 8 == 0,
                "write at {off:#x} ({} bytes) overlaps the refcount table {rt:x?} but is not a table update ({:?})",
                buf.len(),
                l
            );
            assert!(
                !hit_l1,
                "refcount table update at {off:#x} lands on the L1 table {l1:x?}"
            );
        }
    }

    fn check_removal(&self, what: &str, r: (u64, u64)) {
        let l = self.layout.lock().unwrap();
        for (name, area) in [
            ("header", (0, l.cs)),
            ("L1", l.l1_area()),
            ("refcount table", l.rt_area()),
        ] {
            assert!(
                !overlaps(r, area),
                "{what} {r:x?} removes part of the {name} {area:x?}"
            );
        }
    }
}

impl Storage for Guard {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.inner.read_at(buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.check_limit("write", offset.saturating_add(buf.len() as u64))?;
        self.check_write(buf, offset);
        self.inner.write_at(buf, offset)
    }
    fn sync(&self) -> io::Result<()> {
        self.inner.sync()
    }
    fn punch_hole(&self, offset: u64, len: u64) -> io::Result<bool> {
        self.check_removal("punch_hole", (offset, offset.saturating_add(len)));
        self.inner.punch_hole(offset, len)
    }
    fn len(&self) -> io::Result<u64> {
        self.inner.len()
    }
    fn set_len(&self, len: u64) -> io::Result<()> {
        self.check_limit("set_len", len)?;
        self.check_removal("set_len", (len, u64::MAX));
        self.inner.set_len(len)
    }
}

/// splitmix64, seeded from the input: deterministic request parameters.
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
        if n == 0 {
            0
        } else {
            self.next() % n
        }
    }
}

fn layout_of(data: &[u8]) -> Option<Layout> {
    // What the engine reads: the first min(2 MiB, file length) bytes.
    let file_len = data.len() as u64;
    let mut first = vec![0u8; (2u64 << 20).min(file_len.max(512)) as usize];
    let n = first.len().min(data.len());
    first[..n].copy_from_slice(&data[..n]);
    let h = Header::parse(&first, file_len).ok()?;
    Some(Layout {
        cs: h.cluster_size(),
        l1_off: h.l1_table_offset,
        l1_bytes: h.l1_size as u64 * 8,
        rt_off: h.refcount_table_offset,
        rt_bytes: h.refcount_table_clusters as u64 * h.cluster_size(),
    })
}

/// A guest range inside the disk: aligned to clusters or not, at most `max_clusters` long.
fn range(rng: &mut Rng, size: u64, cs: u64, max_clusters: u64) -> (u64, u64) {
    if size == 0 {
        return (0, 0);
    }
    let clusters = size.div_ceil(cs);
    let mut off = match rng.below(4) {
        0 => 0,
        1 => rng.below(clusters) * cs,
        2 => (clusters - 1) * cs,
        _ => rng.below(size),
    };
    off = off.min(size - 1);
    let mut len = match rng.below(3) {
        0 => cs * (1 + rng.below(max_clusters)),
        1 => 1 + rng.below(cs * max_clusters),
        _ => 512 * (1 + rng.below(8)),
    };
    len = len.min(size - off);
    (off, len)
}

fn exercise(img: &Image, rng: &mut Rng, writable: bool) {
    let size = img.virtual_size();
    let cs = img.cluster_size();
    let _ = img.map();
    for _ in 0..3 {
        let (off, len) = range(rng, size, cs, 2);
        let len = len.min(256 << 10);
        let mut buf = vec![0u8; len as usize];
        let _ = img.read(off, &mut buf);
    }
    let (off, len) = range(rng, size, cs, 4);
    let _ = img.block_status(off, len);
    if writable {
        for flags in [0u32, 0x4, 0x100, 0x4 | 0x100 | 0x10] {
            let (off, len) = range(rng, size, cs, 4);
            let _ = img.write_zeroes(off, len, flags);
        }
        let (off, len) = range(rng, size, cs, 4);
        let _ = img.discard(off, len);
        let (off, len) = range(rng, size, cs, 2);
        let len = len.min(256 << 10);
        let data: Vec<u8> = (0..len).map(|i| (i as u8) ^ 0x5a).collect();
        let _ = img.write(off, &data, if rng.below(2) == 0 { 0 } else { 0x10 });
        // Read back what was just written: must not panic (content may differ on error).
        let mut back = vec![0u8; len as usize];
        let _ = img.read(off, &mut back);
        let _ = img.flush();
        // Invalid arguments must be errors, not panics.
        let _ = img.write_zeroes(size, 1, 0);
        let _ = img.write_zeroes(u64::MAX - 1, 2, 0);
        let _ = img.write_zeroes(0, 512, 0x8000_0000);
        let _ = img.discard(u64::MAX, 1);
        // Repairing leaks must stay as bounded as the read-only check.
        let _ = img.check(RepairMode::Leaks);
    }
    let _ = img.check(RepairMode::None);
    let _ = img.map();
}

fuzz_target!(|data: &[u8]| {
    if data.len() > (4 << 20) {
        return;
    }
    let mut seed = 0xcbf2_9ce4_8422_2325u64;
    for &b in data.iter().take(4096) {
        seed = (seed ^ b as u64).wrapping_mul(0x100_0000_01b3);
    }
    let mut rng = Rng(seed ^ data.len() as u64);
    let layout = layout_of(data);

    // Read-write.
    let after = {
        let guard = Arc::new(Guard {
            inner: MemStorage::from_bytes(data.to_vec()),
            layout: Mutex::new(layout.clone().unwrap_or(Layout {
                cs: 512,
                l1_off: 0,
                l1_bytes: 0,
                rt_off: 0,
                rt_bytes: 0,
            })),
            limit: data.len() as u64 + (1 << 30),
            lenient: std::env::var_os("QCOW2_FUZZ_LENIENT").is_some_and(|v| v == "1"),
        });
        let mut opts = OpenOptions::read_write();
        opts.open_backing = false;
        let r = Image::open_with_storage(Box::new(guard.clone()), "fuzz.qcow2", &opts);
        if let Ok(img) = r {
            assert!(
                layout.is_some(),
                "opened an image whose header does not parse"
            );
            exercise(&img, &mut rng, true);
            let _ = img.close();
        } else if let Err(e) = r {
            let msg = e.to_string();
            assert!(!msg.is_empty());
        }
        guard.inner.to_bytes()
    };

    // Read-only, on the original bytes and on what the read-write pass left.
    for bytes in [data.to_vec(), after] {
        let mut opts = OpenOptions::read_only();
        opts.open_backing = false;
        let storage = MemStorage::from_bytes(bytes);
        if let Ok(img) = Image::open_with_storage(Box::new(storage), "fuzz.qcow2", &opts) {
            exercise(&img, &mut rng, false);
            let _ = img.write(0, &[0u8; 512], 0);
        }
    }
});
