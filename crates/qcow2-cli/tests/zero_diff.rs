//! Differential suite for write-zeroes and discard: the same qemu-io script
//! runs through `qemu-io` and through `qcow2 io` on copies of one image made
//! by qemu-img/qemu-io; both results are judged by qemu-img (compare, map
//! without host offsets, check) and every command must succeed or fail alike.

use std::path::{Path, PathBuf};
use std::process::Command;

const QCOW2: &str = env!("CARGO_BIN_EXE_qcow2");

fn run(cmd: &mut Command) -> (i32, String, String) {
    let o = cmd.output().expect("spawn");
    (
        o.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&o.stdout).into_owned(),
        String::from_utf8_lossy(&o.stderr).into_owned(),
    )
}

fn qemu_img(args: &[&str]) -> (i32, String, String) {
    run(Command::new("qemu-img").args(args))
}

/// One prepared image kind.
struct Kind {
    name: &'static str,
    opts: &'static str,
    size: &'static str,
    backing: bool,
    prep: &'static [&'static str],
}

fn kinds() -> Vec<Kind> {
    let rich: &'static [&'static str] = &[
        "write -P 0x11 0 256k",
        "write -c -P 0x22 256k 128k",
        "write -z 1M 128k",
        "write -P 0x33 2M 64k",
        "write -z 2M 64k",
        "write -z -u 3M 64k",
    ];
    vec![
        Kind {
            name: "v3-64k",
            opts: "compat=1.1,cluster_size=64k",
            size: "16M",
            backing: false,
            prep: rich,
        },
        Kind {
            name: "v3-512",
            opts: "compat=1.1,cluster_size=512",
            size: "8M",
            backing: false,
            prep: rich,
        },
        Kind {
            name: "v3-4k-rc1",
            opts: "compat=1.1,cluster_size=4k,refcount_bits=1",
            size: "8M",
            backing: false,
            prep: rich,
        },
        Kind {
            name: "v3-2M",
            opts: "compat=1.1,cluster_size=2M",
            size: "32M",
            backing: false,
            prep: &[
                "write -P 0x11 0 3M",
                "write -c -P 0x22 4M 2M",
                "write -z 8M 2M",
            ],
        },
        Kind {
            name: "v2-64k",
            opts: "compat=0.10,cluster_size=64k",
            size: "16M",
            backing: false,
            prep: &[
                "write -P 0x11 0 256k",
                "write -c -P 0x22 256k 128k",
                "write -P 0x33 2M 64k",
            ],
        },
        Kind {
            name: "v3-extl2",
            opts: "compat=1.1,cluster_size=64k,extended_l2=on",
            size: "16M",
            backing: false,
            prep: &[
                "write -P 0x11 0 256k",
                "write -P 0x12 300k 4k",
                "write -c -P 0x22 512k 64k",
                "write -z 1M 128k",
                "write -z 1100k 8k",
            ],
        },
        Kind {
            name: "v3-lazy",
            opts: "compat=1.1,lazy_refcounts=on",
            size: "16M",
            backing: false,
            prep: rich,
        },
        Kind {
            name: "v3-backing",
            opts: "compat=1.1,cluster_size=64k",
            size: "16M",
            backing: true,
            prep: &["write -P 0x44 128k 64k", "write -z 3M 64k"],
        },
        Kind {
            name: "v2-backing",
            opts: "compat=0.10,cluster_size=64k",
            size: "16M",
            backing: true,
            prep: &["write -P 0x44 128k 64k"],
        },
        Kind {
            name: "v3-extl2-backing",
            opts: "compat=1.1,cluster_size=64k,extended_l2=on",
            size: "16M",
            backing: true,
            prep: &["write -P 0x44 128k 8k", "write -z 200k 4k"],
        },
    ]
}

struct Case {
    dir: tempfile::TempDir,
    ours: PathBuf,
    theirs: PathBuf,
}

fn prepare(k: &Kind) -> Case {
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("base.qcow2");
    let mut create: Vec<String> = vec![
        "create".into(),
        "-q".into(),
        "-f".into(),
        "qcow2".into(),
        "-o".into(),
        k.opts.into(),
    ];
    if k.backing {
        let b = dir.path().join("backing.qcow2");
        let (c, _, e) = qemu_img(&["create", "-q", "-f", "qcow2", b.to_str().unwrap(), k.size]);
        assert_eq!(c, 0, "{e}");
        let (c, _, e) = run(Command::new("qemu-io").args([
            "-c",
            "write -P 0xbb 0 1M",
            "-c",
            "write -P 0xbc 3M 256k",
            "-c",
            "write -z 64k 64k",
            b.to_str().unwrap(),
        ]));
        assert_eq!(c, 0, "{e}");
        create.extend([
            "-b".into(),
            "backing.qcow2".into(),
            "-F".into(),
            "qcow2".into(),
        ]);
    }
    create.push(base.to_str().unwrap().into());
    create.push(k.size.into());
    let args: Vec<&str> = create.iter().map(|s| s.as_str()).collect();
    let (c, _, e) = qemu_img(&args);
    assert_eq!(c, 0, "{}: {e}", k.name);
    let mut io = Command::new("qemu-io");
    for p in k.prep {
        io.arg("-c").arg(p);
    }
    let (c, _, e) = run(io.arg(&base));
    assert_eq!(c, 0, "{}: {e}", k.name);
    let ours = dir.path().join("ours.qcow2");
    let theirs = dir.path().join("theirs.qcow2");
    std::fs::copy(&base, &ours).unwrap();
    std::fs::copy(&base, &theirs).unwrap();
    Case { dir, ours, theirs }
}

/// The result line of each command (timing lines dropped).
fn outcome_lines(out: &str) -> Vec<String> {
    out.lines()
        .filter(|l| !l.contains(" ops; ") && !l.trim().is_empty())
        .filter(|l| !l.starts_with('{'))
        .map(|l| l.to_string())
        .collect()
}

fn map_without_offsets(p: &Path) -> String {
    let (c, out, e) = qemu_img(&["map", "--output=json", p.to_str().unwrap()]);
    assert_eq!(c, 0, "{e}");
    let v: serde_json::Value = serde_json::from_str(&out).expect("map json");
    // Host offsets differ between implementations; merge what only they split.
    let mut merged: Vec<(u64, u64, String)> = Vec::new();
    for e in v.as_array().expect("array") {
        let key = format!(
            "depth={} present={} zero={} data={} compressed={} offset={}",
            e["depth"],
            e["present"],
            e["zero"],
            e["data"],
            e["compressed"],
            e.get("offset").is_some()
        );
        let (start, len) = (e["start"].as_u64().unwrap(), e["length"].as_u64().unwrap());
        match merged.last_mut() {
            Some((s0, l0, k0)) if *k0 == key && *s0 + *l0 == start => *l0 += len,
            _ => merged.push((start, len, key)),
        }
    }
    merged
        .iter()
        .map(|(s, l, k)| format!("{s} +{l} {k}\n"))
        .collect()
}

fn script_args(script: &[String]) -> Vec<String> {
    script
        .iter()
        .flat_map(|c| ["-c".to_string(), c.clone()])
        .collect()
}

/// Runs `script` both ways and judges the images. Returns a failure description.
fn differential(k: &Kind, script: &[String], discard: &str) -> Option<String> {
    let case = prepare(k);
    let args = script_args(script);
    let (qc, qout, qerr) = run(Command::new("qemu-io")
        .args(["-f", "qcow2", "-t", "writeback", "-d", discard])
        .args(&args)
        .arg(&case.theirs));
    let (oc, oout, oerr) = run(Command::new(QCOW2)
        .args(["io", "-f", "qcow2", "-t", "writeback", "-d", discard])
        .args(&args)
        .arg(&case.ours));
    let ctx = format!("kind {} discard={discard} script {script:?}", k.name);
    let q = outcome_lines(&(qout + &qerr));
    let o = outcome_lines(&(oout + &oerr));
    if q != o || qc != oc {
        return Some(format!(
            "{ctx}\nqemu-io ({qc}): {q:#?}\nqcow2 io ({oc}): {o:#?}"
        ));
    }
    let (c, out, err) = qemu_img(&[
        "compare",
        "-q",
        case.theirs.to_str().unwrap(),
        case.ours.to_str().unwrap(),
    ]);
    if c != 0 {
        return Some(format!("{ctx}\ncompare differs: {out}{err}"));
    }
    let (mq, mo) = (
        map_without_offsets(&case.theirs),
        map_without_offsets(&case.ours),
    );
    if mq != mo {
        return Some(format!("{ctx}\nmap differs\nqemu:\n{mq}\nours:\n{mo}"));
    }
    let (c, out, err) = qemu_img(&["check", case.ours.to_str().unwrap()]);
    if c != 0 {
        return Some(format!("{ctx}\ncheck of ours failed ({c}): {out}{err}"));
    }
    drop(case.dir);
    None
}

fn s(v: &[&str]) -> Vec<String> {
    v.iter().map(|x| x.to_string()).collect()
}

/// Every row of the semantics table, on every prepared kind, with every flag set.
#[test]
fn semantics_table_matches_qemu() {
    let flags = ["", "-u ", "-n ", "-u -n "];
    let mut failures = Vec::new();
    for k in kinds() {
        let big = k.name.contains("2M");
        for f in flags {
            let script = if big {
                s(&[
                    &format!("write -z {f}0 2M"),
                    &format!("write -z {f}4M 2M"),
                    &format!("write -z {f}8M 2M"),
                    &format!("write -z {f}12M 4M"),
                    &format!("write -z {f}0 2M"),
                    &format!("write -z {f}1M 4k"),
                    "read -P 0 0 2M",
                ])
            } else {
                s(&[
                    // data, compressed, zero-alloc, zero-plain, unallocated clusters (whole)
                    &format!("write -z {f}0 128k"),
                    &format!("write -z {f}256k 128k"),
                    &format!("write -z {f}2M 64k"),
                    &format!("write -z {f}3M 64k"),
                    &format!("write -z {f}5M 192k"),
                    // again: everything is in its target state
                    &format!("write -z {f}0 128k"),
                    // partial clusters: data, zero, unallocated, compressed
                    &format!("write -z {f}130k 4k"),
                    &format!("write -z {f}1M 4k"),
                    &format!("write -z {f}6M 512"),
                    &format!("write -z {f}6200k 10"),
                    &format!("write -z {f}384k 1k"),
                    // spanning many L2 tables
                    &format!("write -z {f}7M 1M"),
                    "read -P 0 0 128k",
                ])
            };
            if let Some(e) = differential(&k, &script, "unmap") {
                failures.push(e);
            }
        }
        let discard = s(&[
            "discard 0 64k",
            "discard 100k 200k",
            "discard 2M 2M",
            "discard 5M 1M",
            "discard 0 64k",
            "discard 1000 100",
        ]);
        for mode in ["unmap", "ignore"] {
            if let Some(e) = differential(&k, &discard, mode) {
                failures.push(e);
            }
        }
        let ignore = s(&["write -z -u 0 128k", "write -z -u 2M 64k"]);
        if let Some(e) = differential(&k, &ignore, "ignore") {
            failures.push(e);
        }
    }
    assert!(
        failures.is_empty(),
        "{} failures:\n{}",
        failures.len(),
        failures.join("\n\n")
    );
}

/// Requests past the end are refused by both tools alike.
#[test]
fn out_of_range_matches_qemu() {
    let k = &kinds()[0];
    let script = s(&["write -z 15M 2M", "discard 16M 64k", "write -z -u 16M 1"]);
    if let Some(e) = differential(k, &script, "unmap") {
        panic!("{e}");
    }
}

struct Lcg(u64);
impl Lcg {
    fn next(&mut self) -> u64 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        self.0 >> 33
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// Seeded random sequences of writes, zeroes and discards.
#[test]
fn random_sequences_match_qemu() {
    let cases: u64 = std::env::var("QCOW2_RANDOM_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(40);
    let seed0: u64 = std::env::var("QCOW2_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(0x5eed);
    let all = kinds();
    let mut failures = Vec::new();
    for case in 0..cases {
        let mut r = Lcg(seed0 ^ (case * 0x9e37_79b9));
        let k = &all[r.below(all.len() as u64) as usize];
        let size: u64 = if k.size == "32M" {
            32 << 20
        } else if k.size == "8M" {
            8 << 20
        } else {
            16 << 20
        };
        let mut script = Vec::new();
        for _ in 0..(4 + r.below(8)) {
            let gran = [1u64, 512, 4096, 65536][r.below(4) as usize];
            let off = r.below(size / gran) * gran;
            let len = ((1 + r.below(300_000 / gran + 1)) * gran)
                .min(size - off)
                .max(1);
            let cmd = match r.below(6) {
                0 => format!("write -P {} {off} {len}", r.below(255) + 1),
                1 => format!("write -z {off} {len}"),
                2 => format!("write -z -u {off} {len}"),
                3 => format!("write -z -n {off} {len}"),
                4 => format!("discard {off} {len}"),
                _ => format!("write -z -u -n {off} {len}"),
            };
            script.push(cmd);
        }
        script.push(format!("read 0 {}", size));
        if let Some(e) = differential(k, &script, "unmap") {
            failures.push(format!("case {case} (seed {seed0:#x}):\n{e}"));
            if failures.len() >= 5 {
                break;
            }
        }
    }
    assert!(
        failures.is_empty(),
        "{} failures:\n{}",
        failures.len(),
        failures.join("\n\n")
    );
}

/// Images with an internal snapshot: writes, zeroes and discards copy the
/// shared L2 tables and clusters; the snapshot's content stays intact.
#[test]
fn internal_snapshots_match_qemu() {
    for (opts, prep) in [
        (
            "compat=1.1,cluster_size=64k",
            &[
                "write -P 0x11 0 1M",
                "write -c -P 0x22 1M 128k",
                "write -z 2M 64k",
            ][..],
        ),
        (
            "compat=1.1,cluster_size=4k,extended_l2=off",
            &["write -P 0x11 0 300k", "write -z 400k 8k"][..],
        ),
        (
            "compat=1.1,cluster_size=64k,extended_l2=on",
            &["write -P 0x11 0 256k", "write -P 0x12 300k 4k"][..],
        ),
        ("compat=0.10,cluster_size=64k", &["write -P 0x11 0 1M"][..]),
    ] {
        let dir = tempfile::tempdir().unwrap();
        let base = dir.path().join("base.qcow2");
        let (c, _, e) = qemu_img(&[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            opts,
            base.to_str().unwrap(),
            "8M",
        ]);
        assert_eq!(c, 0, "{e}");
        let mut io = Command::new("qemu-io");
        for p in prep {
            io.arg("-c").arg(p);
        }
        let (c, _, e) = run(io.arg(&base));
        assert_eq!(c, 0, "{e}");
        let (c, _, e) = qemu_img(&["snapshot", "-c", "s1", base.to_str().unwrap()]);
        assert_eq!(c, 0, "{e}");
        let snap_raw = dir.path().join("snap.raw");
        let (c, _, e) = qemu_img(&[
            "convert",
            "-O",
            "raw",
            base.to_str().unwrap(),
            snap_raw.to_str().unwrap(),
        ]);
        assert_eq!(c, 0, "{e}");
        let script = s(&[
            "write -P 0x33 4k 8k",
            "write -P 0x34 70k 1k",
            "write -z 128k 128k",
            "write -z -u 256k 64k",
            "discard 512k 128k",
            "write -P 0x35 1M 4k",
            "write -P 0x36 6M 64k",
            "read -P 0x33 4k 8k",
        ]);
        let args = script_args(&script);
        let ours = dir.path().join("ours.qcow2");
        let theirs = dir.path().join("theirs.qcow2");
        std::fs::copy(&base, &ours).unwrap();
        std::fs::copy(&base, &theirs).unwrap();
        let (qc, qout, qerr) = run(Command::new("qemu-io")
            .args(["-t", "writeback", "-d", "unmap"])
            .args(&args)
            .arg(&theirs));
        let (oc, oout, oerr) = run(Command::new(QCOW2)
            .args(["io", "-t", "writeback", "-d", "unmap"])
            .args(&args)
            .arg(&ours));
        assert_eq!(
            (qc, outcome_lines(&(qout + &qerr))),
            (oc, outcome_lines(&(oout + &oerr))),
            "{opts}"
        );
        let (c, out, err) =
            qemu_img(&["compare", theirs.to_str().unwrap(), ours.to_str().unwrap()]);
        assert_eq!(c, 0, "{opts}: {out}{err}");
        let (c, out, err) = qemu_img(&["check", ours.to_str().unwrap()]);
        assert_eq!(c, 0, "{opts}: {out}{err}");
        // The snapshot still holds what it held.
        let (c, _, e) = qemu_img(&["snapshot", "-a", "s1", ours.to_str().unwrap()]);
        assert_eq!(c, 0, "{e}");
        let (c, out, err) = qemu_img(&[
            "compare",
            "-f",
            "qcow2",
            "-F",
            "raw",
            ours.to_str().unwrap(),
            snap_raw.to_str().unwrap(),
        ]);
        assert_eq!(c, 0, "{opts}: snapshot content changed: {out}{err}");
        let (c, out, err) = qemu_img(&["check", ours.to_str().unwrap()]);
        assert_eq!(c, 0, "{opts}: after applying the snapshot: {out}{err}");
    }
}
