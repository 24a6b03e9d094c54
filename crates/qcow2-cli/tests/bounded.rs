//! Every command stays bounded in memory and time by the image file, not by
//! the sizes and offsets its tables claim.
//!
//! The images are the hand-made regression inputs of the fuzz smoke run,
//! fuzz/regress/image_ops (made by fuzz/make-regress.py): a few KiB each,
//! with L1 tables whose entries all share one L2 table (millions of
//! references to one cluster, or past the end of the file), snapshot L1
//! tables claiming 32 MiB, 300 bitmaps sharing one bitmap table, refcount
//! blocks at terabyte offsets. On each, `qcow2 check`, `check -r leaks`,
//! `check -r all` (on a copy), `map` and `info` run under an address-space
//! limit and a deadline. The `cmp-*` images are small enough for qemu-img
//! to check quickly: their counts must agree with `qemu-img check
//! --output=json`.

mod common;

use common::*;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// Address space each run may use (`ulimit -v`, KiB); the starting commit
/// needed gigabytes on these images.
const MEM_LIMIT_KIB: u64 = 256 << 10;
/// Wall time each run may take (debug build, shared machine).
const TIME_LIMIT: Duration = Duration::from_secs(60);

fn regress_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fuzz/regress/image_ops")
}

fn images() -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(regress_dir())
        .expect("fuzz/regress/image_ops")
        .map(|e| e.unwrap().path())
        .collect();
    v.sort();
    assert!(v.len() >= 10, "regression images missing: {v:?}");
    v
}

struct Bounded {
    code: i32,
    stdout: String,
    stderr: String,
    secs: f64,
}

/// Runs `qcow2 args...` in `dir` under `ulimit -v` and a deadline; panics
/// when it is killed (out of memory aborts, the deadline kills).
fn bounded(dir: &Path, args: &[&str]) -> Bounded {
    let script = format!("ulimit -v {MEM_LIMIT_KIB} && exec \"$0\" \"$@\"");
    let mut child = Command::new("sh")
        .arg("-c")
        .arg(&script)
        .arg(qcow2_bin())
        .args(args)
        .current_dir(dir)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn sh");
    // Drain the pipes while waiting (the report can be long).
    let mut out = child.stdout.take().unwrap();
    let mut err = child.stderr.take().unwrap();
    let to = std::thread::spawn(move || {
        let mut s = Vec::new();
        std::io::Read::read_to_end(&mut out, &mut s).ok();
        s
    });
    let te = std::thread::spawn(move || {
        let mut s = Vec::new();
        std::io::Read::read_to_end(&mut err, &mut s).ok();
        s
    });
    let start = Instant::now();
    let status = loop {
        if let Some(s) = child.try_wait().expect("wait") {
            break s;
        }
        if start.elapsed() > TIME_LIMIT {
            child.kill().ok();
            child.wait().ok();
            panic!("qcow2 {args:?} ran longer than {TIME_LIMIT:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let secs = start.elapsed().as_secs_f64();
    let stdout = String::from_utf8_lossy(&to.join().unwrap()).into_owned();
    let stderr = String::from_utf8_lossy(&te.join().unwrap()).into_owned();
    let tail: String = stderr.lines().rev().take(5).collect::<Vec<_>>().join("\n");
    assert!(
        status.code().is_some(),
        "qcow2 {args:?} was killed ({status}) within {MEM_LIMIT_KIB} KiB of address space; stderr ends:\n{tail}"
    );
    assert!(
        !stderr.contains("panicked") && !stderr.contains("memory allocation"),
        "qcow2 {args:?}:\n{tail}"
    );
    Bounded {
        code: status.code().unwrap(),
        stdout,
        stderr,
        secs,
    }
}

/// The numeric fields of a `check --output=json` report.
fn numbers(json: &str) -> BTreeMap<String, u64> {
    let mut m = BTreeMap::new();
    for line in json.lines() {
        let line = line.trim().trim_end_matches(',');
        if let Some((k, v)) = line.split_once(':') {
            if let Ok(v) = v.trim().parse::<u64>() {
                m.insert(k.trim().trim_matches('"').to_string(), v);
            }
        }
    }
    m
}

fn qemu_available() -> bool {
    let ok = Command::new("qemu-img")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if !ok {
        assert!(
            std::env::var_os("CI").is_none(),
            "qemu-img is required when CI is set"
        );
        println!("skipped: qemu-img not installed");
    }
    ok
}

#[test]
fn every_command_is_bounded_by_the_file() {
    let d = tmpdir();
    let mut report = Vec::new();
    for img in images() {
        let name = img.file_name().unwrap().to_str().unwrap().to_string();
        let len = std::fs::metadata(&img).unwrap().len();
        std::fs::copy(&img, d.path().join(&name)).unwrap();
        for args in [
            vec!["check", "--output=json", name.as_str()],
            vec!["check", name.as_str()],
            vec!["info", name.as_str()],
            vec!["info", "--output=json", name.as_str()],
            vec!["map", "--output=json", name.as_str()],
            vec!["map", name.as_str()],
        ] {
            let r = bounded(d.path(), &args);
            report.push(format!("{:.2}s {args:?} -> {}", r.secs, r.code));
            if args[0] == "check" {
                // The report names what was found; kept messages are capped.
                assert!(
                    r.stderr.lines().count() <= 10_001 * 2 + 10,
                    "{args:?}: {} lines of messages",
                    r.stderr.lines().count()
                );
            }
        }
        for mode in ["leaks", "all"] {
            let copy = format!("{name}.{mode}");
            std::fs::copy(&img, d.path().join(&copy)).unwrap();
            let r = bounded(d.path(), &["check", "-r", mode, "--output=json", &copy]);
            report.push(format!(
                "{:.2}s check -r {mode} {name} -> {}",
                r.secs, r.code
            ));
            // A repair may make room for refcount blocks past the end of
            // the file, but only so far beyond its length (plus the refcount
            // structures describing that room).
            let after = std::fs::metadata(d.path().join(&copy)).unwrap().len();
            assert!(
                after <= len + (8 << 30) + (64 << 20),
                "check -r {mode} {name} grew the file from {len} to {after} bytes"
            );
            // And the repaired image is as bounded as the original.
            bounded(d.path(), &["check", "--output=json", &copy]);
            bounded(d.path(), &["map", "--output=json", &copy]);
        }
    }
    println!("{}", report.join("\n"));
}

#[test]
fn small_hostile_images_check_like_qemu() {
    if !qemu_available() {
        return;
    }
    let d = tmpdir();
    let mut compared = 0;
    for img in images() {
        let name = img.file_name().unwrap().to_str().unwrap().to_string();
        if !name.starts_with("cmp-") {
            continue;
        }
        for mode in [None, Some("leaks"), Some("all")] {
            let (q, o) = (format!("{name}.q"), format!("{name}.o"));
            std::fs::copy(&img, d.path().join(&q)).unwrap();
            std::fs::copy(&img, d.path().join(&o)).unwrap();
            let mut qa = vec!["check", "--output=json"];
            let mut oa = qa.clone();
            if let Some(m) = mode {
                qa.extend(["-r", m]);
                oa.extend(["-r", m]);
            }
            qa.push(&q);
            oa.push(&o);
            let qr = qemu_img(d.path(), &qa);
            let or = bounded(d.path(), &oa);
            let (mut qn, mut on) = (numbers(&qr.stdout), numbers(&or.stdout));
            if mode == Some("all") {
                // Where QEMU rebuilds the refcount structure, this engine
                // places the missing blocks itself: the end offset differs.
                qn.remove("image-end-offset");
                on.remove("image-end-offset");
            }
            assert_eq!(
                (or.code, &on),
                (qr.code, &qn),
                "check {mode:?} {name}: ours (left) vs qemu-img (right)\nours: {}\nqemu: {}",
                or.stderr.lines().last().unwrap_or(""),
                qr.stderr.lines().last().unwrap_or("")
            );
            compared += 1;
        }
    }
    assert_eq!(compared, 18);
}

#[test]
fn shared_l2_tables_map_like_qemu() {
    if !qemu_available() {
        return;
    }
    let d = tmpdir();
    let mut compared = 0;
    for img in images() {
        let name = img.file_name().unwrap().to_str().unwrap().to_string();
        std::fs::copy(&img, d.path().join(&name)).unwrap();
        let q = qemu_img(d.path(), &["map", "--output=json", &name]);
        let o = bounded(d.path(), &["map", "--output=json", &name]);
        if q.code != 0 || o.code != 0 {
            // This engine refuses L2 tables that overlap other metadata.
            continue;
        }
        assert_eq!(o.stdout, q.stdout, "map of {name}");
        compared += 1;
    }
    assert!(compared >= 4, "only {compared} maps compared");
}
