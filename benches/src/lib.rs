//! Fixtures, scenarios and churn recording for the qcow2 benchmarks.
//!
//! A [`Scenario`] is one core path of the engine: an image template (built
//! once), the options it is opened with, a warm-up that brings the cache into
//! the state the path needs, and the operation that is timed. Every scenario
//! runs on the in-memory backend ([`Backend::Mem`], `MemStorage`) and on the
//! file backend ([`Backend::File`], a file under the temp directory).
//!
//! The criterion driver (`benches/bench.rs`) times the operation; next to the
//! time, [`Scenario::churn`] measures the engine's counters per operation
//! (`l2_dirty_marks`, `l2_writebacks`, `l2_bytes_written`, `file_syncs`, ...)
//! and [`ChurnLog`] saves both as `target/criterion/churn.json`.
//!
//! The scenarios live in one module per area: [`skip`], [`zero`],
//! [`discard`], [`writeback`], [`cache`]. The unit tests run each of them once
//! at [`Sizes::SMALL`], so `cargo test --workspace` checks them quickly.
#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod cache;
pub mod discard;
pub mod skip;
pub mod writeback;
pub mod zero;

use qcow2_ops::{CreateOptions, Image, OpenOptions, Stats};
use serde_json::{json, Map, Value};
use std::path::{Path, PathBuf};
use std::rc::Rc;
use tempfile::TempDir;

/// Result type of fixture building.
pub type Result<T> = std::result::Result<T, Box<dyn std::error::Error>>;

/// One GiB.
pub const GIB: u64 = 1 << 30;
/// One MiB.
pub const MIB: u64 = 1 << 20;
/// Cluster size of every bench image (qemu-img's default).
pub const CLUSTER: u64 = 64 << 10;
/// Guest bytes one L2 table covers at [`CLUSTER`] (8192 entries).
pub const L2_SPAN: u64 = CLUSTER / 8 * CLUSTER;

/// Where the image lives while it is benchmarked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    /// `qcow2_io::MemStorage`.
    Mem,
    /// `qcow2_io::FileStorage` on a file in the temp directory (page cache, real fdatasync).
    File,
}

impl Backend {
    /// Both backends.
    pub const ALL: [Backend; 2] = [Backend::Mem, Backend::File];
    /// Short name used in bench ids.
    pub fn name(self) -> &'static str {
        match self {
            Backend::Mem => "mem",
            Backend::File => "file",
        }
    }
}

/// Sizes of the bench images.
#[derive(Debug, Clone, Copy)]
pub struct Sizes {
    /// Range rescanned by the skip-path benches (all entries cached).
    pub skip_bytes: u64,
    /// Guest data zeroed or discarded per operation.
    pub data_bytes: u64,
    /// Unallocated range zeroed per operation (L2 tables allocated), in 1 GiB requests.
    pub alloc_bytes: u64,
    /// L2 tables touched (one entry each) per sparse-writeback operation.
    pub sparse_tables: u64,
    /// L2 tables cycled through by the cache-miss bench (cache holds 4 slices).
    pub miss_tables: u64,
}

impl Sizes {
    /// What `cargo bench` runs.
    pub const FULL: Sizes = Sizes {
        skip_bytes: 4 * GIB,
        data_bytes: 64 * MIB,
        alloc_bytes: 16 * GIB,
        sparse_tables: 32,
        miss_tables: 64,
    };
    /// What the unit tests run.
    pub const SMALL: Sizes = Sizes {
        skip_bytes: GIB,
        data_bytes: 2 * MIB,
        alloc_bytes: 2 * GIB,
        sparse_tables: 4,
        miss_tables: 8,
    };
}

/// An image file built once; fixtures are copies of it.
pub struct Template {
    path: PathBuf,
    bytes: Vec<u8>,
    _dir: TempDir,
}

impl Template {
    /// Creates an image of `size` bytes, opens it read-write, runs `build`, closes it.
    pub fn build(
        size: u64,
        build: impl FnOnce(&Image) -> qcow2_ops::Result<()>,
    ) -> Result<Rc<Self>> {
        let dir = scratch_dir()?;
        let path = dir.path().join("template.qcow2");
        Image::create(&path, size, &CreateOptions::default())?;
        let img = Image::open(&path, &OpenOptions::read_write())?;
        build(&img)?;
        img.close()?;
        let bytes = std::fs::read(&path)?;
        Ok(Rc::new(Template {
            path,
            bytes,
            _dir: dir,
        }))
    }
}

fn scratch_dir() -> Result<TempDir> {
    let mut b = tempfile::Builder::new();
    b.prefix("qcow2-bench-");
    Ok(match std::env::var_os("QCOW2_BENCH_DIR") {
        Some(d) => b.tempdir_in(d)?,
        None => b.tempdir()?,
    })
}

/// An open copy of a template. The image is dropped (and flushed) before its file.
pub struct Fixture {
    /// The image.
    pub image: Image,
    _dir: Option<TempDir>,
}

/// An operation on an image.
pub type Op = Box<dyn Fn(&Image) -> qcow2_ops::Result<()>>;

/// One benchmarked path.
pub struct Scenario {
    /// Area (criterion group).
    pub area: &'static str,
    /// Name inside the area.
    pub name: &'static str,
    /// L2 entries one operation covers (for per-entry figures).
    pub entries: u64,
    /// Whether the operation leaves the image as it found it, so one
    /// fixture serves every iteration; otherwise each iteration gets a fresh one.
    pub reuse: bool,
    template: Rc<Template>,
    opts: OpenOptions,
    warm: Option<Op>,
    op: Op,
}

impl Scenario {
    /// A scenario; see the area modules.
    pub fn new(
        area: &'static str,
        name: &'static str,
        entries: u64,
        template: &Rc<Template>,
        op: impl Fn(&Image) -> qcow2_ops::Result<()> + 'static,
    ) -> Self {
        Scenario {
            area,
            name,
            entries,
            reuse: false,
            template: template.clone(),
            opts: OpenOptions::read_write(),
            warm: None,
            op: Box::new(op),
        }
    }
    /// The operation leaves the image unchanged: one fixture for all iterations.
    pub fn reusable(mut self) -> Self {
        self.reuse = true;
        self
    }
    /// Opens fixtures with these options.
    pub fn options(mut self, opts: OpenOptions) -> Self {
        self.opts = opts;
        self
    }
    /// Runs `warm` after opening a fixture (not timed).
    pub fn warm(mut self, warm: impl Fn(&Image) -> qcow2_ops::Result<()> + 'static) -> Self {
        self.warm = Some(Box::new(warm));
        self
    }
    /// `area/name`.
    pub fn id(&self) -> String {
        format!("{}/{}", self.area, self.name)
    }

    /// A fresh copy of the template, opened and warmed.
    pub fn fixture(&self, backend: Backend) -> Fixture {
        self.try_fixture(backend)
            .unwrap_or_else(|e| panic!("{}: fixture: {e}", self.id()))
    }

    fn try_fixture(&self, backend: Backend) -> Result<Fixture> {
        let t = &self.template;
        let (image, dir) = match backend {
            Backend::Mem => {
                let storage = qcow2_ops::io::MemStorage::from_bytes(t.bytes.clone());
                let img = Image::open_with_storage(Box::new(storage), &t.path, &self.opts)?;
                (img, None)
            }
            Backend::File => {
                let dir = scratch_dir()?;
                let path = dir.path().join("image.qcow2");
                copy_sparse(&t.path, &path)?;
                (Image::open(&path, &self.opts)?, Some(dir))
            }
        };
        if let Some(w) = &self.warm {
            w(&image)?;
        }
        Ok(Fixture { image, _dir: dir })
    }

    /// Runs the operation once; panics on error (a bench must not time failures).
    pub fn run(&self, img: &Image) {
        if let Err(e) = (self.op)(img) {
            panic!("{}: {e}", self.id());
        }
    }

    /// Counters per operation, averaged over `ops` operations (fresh fixtures
    /// unless the scenario is reusable; counters reset after the warm-up).
    pub fn churn(&self, backend: Backend, ops: u64) -> ChurnRecord {
        let ops = ops.max(1);
        let mut total = Map::new();
        let mut add = |s: Stats| {
            if let Value::Object(m) = serde_json::to_value(s).expect("stats serialise") {
                for (k, v) in m {
                    let e = total.entry(k).or_insert(json!(0u64));
                    *e = json!(e.as_u64().unwrap_or(0) + v.as_u64().unwrap_or(0));
                }
            }
        };
        if self.reuse {
            let fx = self.fixture(backend);
            self.run(&fx.image);
            fx.image.reset_stats();
            for _ in 0..ops {
                self.run(&fx.image);
            }
            add(fx.image.stats());
        } else {
            for _ in 0..ops {
                let fx = self.fixture(backend);
                fx.image.reset_stats();
                self.run(&fx.image);
                add(fx.image.stats());
            }
        }
        let per_op = total
            .into_iter()
            .map(|(k, v)| (k, json!(v.as_u64().unwrap_or(0) as f64 / ops as f64)))
            .collect();
        ChurnRecord {
            area: self.area,
            name: self.name,
            backend,
            entries: self.entries,
            ops,
            per_op,
        }
    }
}

/// Copies a file, keeping holes (images of 1 TiB are mostly holes).
fn copy_sparse(from: &Path, to: &Path) -> Result<()> {
    let data = std::fs::read(from)?;
    let f = std::fs::File::create(to)?;
    f.set_len(data.len() as u64)?;
    use std::os::unix::fs::FileExt;
    for (i, chunk) in data.chunks(CLUSTER as usize).enumerate() {
        if chunk.iter().any(|&b| b != 0) {
            f.write_all_at(chunk, i as u64 * CLUSTER)?;
        }
    }
    // Make the copy durable now, so that the first fdatasync of the timed
    // operation does not also write back the copy's page cache.
    f.sync_all()?;
    Ok(())
}

/// Counters of one scenario on one backend, per operation.
#[derive(Debug, Clone)]
pub struct ChurnRecord {
    /// Area.
    pub area: &'static str,
    /// Name.
    pub name: &'static str,
    /// Backend.
    pub backend: Backend,
    /// L2 entries per operation.
    pub entries: u64,
    /// Operations the counters were averaged over.
    pub ops: u64,
    /// Every `Stats` counter divided by `ops`.
    pub per_op: Map<String, Value>,
}

impl ChurnRecord {
    /// `area/name/backend`, the criterion id.
    pub fn id(&self) -> String {
        format!("{}/{}/{}", self.area, self.name, self.backend.name())
    }
    /// One counter per operation.
    pub fn get(&self, key: &str) -> f64 {
        self.per_op.get(key).and_then(Value::as_f64).unwrap_or(0.0)
    }
}

/// Churn records of a bench run, merged with criterion's time estimates.
#[derive(Default)]
pub struct ChurnLog {
    records: Vec<ChurnRecord>,
}

impl ChurnLog {
    /// Adds a record unless one with the same id exists; returns whether it was added.
    pub fn record_once(&mut self, s: &Scenario, backend: Backend, ops: u64) -> bool {
        let id = format!("{}/{}", s.id(), backend.name());
        if self.records.iter().any(|r| r.id() == id) {
            return false;
        }
        self.records.push(s.churn(backend, ops));
        true
    }

    /// Records so far.
    pub fn records(&self) -> &[ChurnRecord] {
        &self.records
    }

    /// Reads criterion's estimates under `criterion_dir` (if any), prints a
    /// table and writes `criterion_dir/churn.json`; returns the JSON.
    pub fn finish(&self, criterion_dir: &Path) -> Result<Value> {
        let mut rows = Vec::new();
        println!(
            "\n{:<40} {:>12} {:>10} {:>9} {:>9} {:>11} {:>7} {:>8}",
            "bench (time per op)",
            "time",
            "ns/entry",
            "l2 dirty",
            "l2 wb",
            "l2 bytes",
            "syncs",
            "l2 miss"
        );
        for r in &self.records {
            let est = criterion_dir
                .join(r.area)
                .join(r.name)
                .join(r.backend.name())
                .join("new/estimates.json");
            let est: Option<Value> = std::fs::read(&est)
                .ok()
                .and_then(|b| serde_json::from_slice(&b).ok());
            let point = |k: &str| est.as_ref().and_then(|e| e[k]["point_estimate"].as_f64());
            let (mean, median) = (point("mean"), point("median"));
            let ns_entry = mean.map(|m| m / r.entries.max(1) as f64);
            println!(
                "{:<40} {:>12} {:>10} {:>9.2} {:>9.2} {:>11.0} {:>7.2} {:>8.2}",
                r.id(),
                mean.map(fmt_ns).unwrap_or_else(|| "-".into()),
                ns_entry
                    .map(|n| format!("{n:.3}"))
                    .unwrap_or_else(|| "-".into()),
                r.get("l2_dirty_marks"),
                r.get("l2_writebacks"),
                r.get("l2_bytes_written"),
                r.get("file_syncs"),
                r.get("l2_misses"),
            );
            rows.push(json!({
                "id": r.id(),
                "area": r.area,
                "name": r.name,
                "backend": r.backend.name(),
                "entries_per_op": r.entries,
                "churn_ops_sampled": r.ops,
                "time_ns_mean": mean,
                "time_ns_median": median,
                "ns_per_entry": ns_entry,
                "churn_per_op": r.per_op,
            }));
        }
        let out = json!({ "benches": rows });
        std::fs::create_dir_all(criterion_dir)?;
        let path = criterion_dir.join("churn.json");
        std::fs::write(&path, serde_json::to_string_pretty(&out)? + "\n")?;
        println!("churn and times saved to {}", path.display());
        Ok(out)
    }
}

fn fmt_ns(ns: f64) -> String {
    if ns >= 1e9 {
        format!("{:.3} s", ns / 1e9)
    } else if ns >= 1e6 {
        format!("{:.3} ms", ns / 1e6)
    } else if ns >= 1e3 {
        format!("{:.3} us", ns / 1e3)
    } else {
        format!("{ns:.1} ns")
    }
}

/// Criterion's output directory: `$CARGO_TARGET_DIR/criterion`, else the workspace's `target/criterion`.
pub fn criterion_dir() -> PathBuf {
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../target"));
    target.join("criterion")
}

/// Every scenario of every area at `sizes`.
pub fn all_scenarios(sizes: &Sizes) -> Result<Vec<Scenario>> {
    let mut v = Vec::new();
    v.extend(skip::scenarios(sizes)?);
    v.extend(zero::scenarios(sizes)?);
    v.extend(discard::scenarios(sizes)?);
    v.extend(writeback::scenarios(sizes)?);
    v.extend(cache::scenarios(sizes)?);
    Ok(v)
}

/// Writes `len` bytes of a non-zero pattern at `offset` in 1 MiB requests.
pub fn fill_data(img: &Image, offset: u64, len: u64) -> qcow2_ops::Result<()> {
    let buf = vec![0xa5u8; (MIB.min(len)) as usize];
    let mut at = offset;
    while at < offset + len {
        let n = (offset + len - at).min(buf.len() as u64) as usize;
        img.write(at, &buf[..n], 0)?;
        at += n as u64;
    }
    Ok(())
}

/// Zeroes `[offset, offset+len)` in requests of at most 1 GiB (as the demo does).
pub fn zero_in_gib_requests(
    img: &Image,
    offset: u64,
    len: u64,
    flags: u32,
) -> qcow2_ops::Result<()> {
    let mut at = offset;
    while at < offset + len {
        let n = (offset + len - at).min(GIB);
        img.write_zeroes(at, n, flags)?;
        at += n;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn find<'a>(v: &'a [ChurnRecord], id: &str) -> &'a ChurnRecord {
        v.iter()
            .find(|r| r.id() == id)
            .unwrap_or_else(|| panic!("no record {id}"))
    }

    #[test]
    fn every_scenario_runs_and_churn_is_as_expected() {
        let scenarios = all_scenarios(&Sizes::SMALL).unwrap();
        let mut log = ChurnLog::default();
        for s in &scenarios {
            for b in Backend::ALL {
                // Twice on a fixture: the timed loop runs the op repeatedly.
                let fx = s.fixture(b);
                s.run(&fx.image);
                if s.reuse {
                    s.run(&fx.image);
                }
                assert!(log.record_once(s, b, 2));
                assert!(!log.record_once(s, b, 2));
            }
        }
        let r = log.records();
        for b in ["mem", "file"] {
            for id in [
                "skip/already_zero",
                "skip/already_zero_unmap",
                "discard/already_zero",
            ] {
                let c = find(r, &format!("{id}/{b}"));
                assert_eq!(c.get("l2_dirty_marks"), 0.0, "{id}/{b}");
                assert_eq!(c.get("file_syncs"), 0.0, "{id}/{b}");
                assert_eq!(c.get("l2_misses"), 0.0, "{id}/{b}");
            }
            let c = find(r, &format!("writeback/sparse/{b}"));
            assert_eq!(c.get("l2_dirty_marks"), Sizes::SMALL.sparse_tables as f64);
            assert!(c.get("l2_writebacks") >= Sizes::SMALL.sparse_tables as f64);
            let c = find(r, &format!("cache/read_miss/{b}"));
            assert_eq!(c.get("l2_misses"), 1.0);
            let c = find(r, &format!("cache/read_hit_data/{b}"));
            assert_eq!(c.get("l2_misses"), 0.0);
        }
        let dir = tempfile::tempdir().unwrap();
        let out = log.finish(dir.path()).unwrap();
        assert_eq!(
            out["benches"].as_array().unwrap().len(),
            scenarios.len() * 2
        );
    }
}
