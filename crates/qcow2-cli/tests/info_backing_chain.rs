//! `qcow2 info --backing-chain` must print what `qemu-img info
//! --backing-chain` prints (human text and the JSON array), for chains of
//! two and three images with relative, `../` and absolute backing names,
//! qcow2 and raw bases, probed backing formats and sizes not a multiple of
//! 512.

mod common;
use common::*;
use std::path::Path;

#[derive(Debug)]
struct Case {
    /// Raw base (else a qcow2 base), and its length in bytes.
    raw_base: Option<u64>,
    /// A middle image between the base and the top.
    middle: bool,
    /// Backing names are absolute paths.
    absolute: bool,
    /// The middle image lives in `sub/` (its base is `../base.*`).
    subdir: bool,
    /// The top image records no backing format (QEMU probes it).
    probe: bool,
    /// A snapshot in the base (qcow2 only).
    snapshot: bool,
}

fn create(dir: &Path, name: &str, backing: Option<(&str, &str)>, size: Option<u64>, probe: bool) {
    let mut args = vec!["create", "-q", "-f", "qcow2"];
    let size_s = size.map(|s| s.to_string());
    if let Some((b, f)) = backing {
        args.extend(["-b", b, "-F", f]);
    }
    args.push(name);
    if let Some(s) = &size_s {
        args.push(s);
    }
    qemu_img(dir, &args).ok("qemu-img create");
    if probe {
        drop_backing_format(&dir.join(name));
    }
}

/// Removes the backing format from the header, as images made before
/// QEMU required it have none: the first header extension (QEMU writes
/// the backing format first) becomes the end of the extension list.
fn drop_backing_format(path: &Path) {
    let mut f = std::fs::read(path).expect("read image");
    let hdr_len = u32::from_be_bytes(f[100..104].try_into().expect("4")) as usize;
    assert_eq!(
        f[hdr_len..hdr_len + 4],
        0xe279_2acau32.to_be_bytes(),
        "first extension is the backing format"
    );
    f[hdr_len..hdr_len + 8].fill(0);
    std::fs::write(path, f).expect("write image");
}

fn case(c: &Case) {
    let d = tmpdir();
    let dir = d.path();
    std::fs::create_dir(dir.join("sub")).expect("mkdir");
    let absdir = dir.to_str().expect("utf-8 temp dir").to_string();
    let base_name = match c.raw_base {
        Some(len) => {
            std::fs::write(dir.join("base.raw"), vec![5u8; len as usize]).expect("raw");
            "base.raw"
        }
        None => {
            create(dir, "base.qcow2", None, Some(3 << 20), false);
            qemu_io_script(dir, "base.qcow2", "qcow2", &["write -P 1 0 64k".into()]).ok("qemu-io");
            if c.snapshot {
                qemu_img(dir, &["snapshot", "-c", "snap", "base.qcow2"]).ok("snapshot");
            }
            "base.qcow2"
        }
    };
    let base_fmt = if c.raw_base.is_some() { "raw" } else { "qcow2" };
    let mut below = (base_name.to_string(), base_fmt);
    if c.middle {
        let (mid, reference) = if c.subdir {
            ("sub/mid.qcow2", format!("../{base_name}"))
        } else {
            ("mid.qcow2", base_name.to_string())
        };
        let reference = if c.absolute {
            format!("{absdir}/{base_name}")
        } else {
            reference
        };
        let size = c.raw_base.map(|l| l.div_ceil(512) * 512).or(Some(2 << 20));
        create(dir, mid, Some((&reference, base_fmt)), size, false);
        below = (mid.to_string(), "qcow2");
    }
    let reference = if c.absolute {
        format!("{absdir}/{}", below.0)
    } else {
        below.0.clone()
    };
    let probe = c.probe;
    create(
        dir,
        "top.qcow2",
        Some((&reference, below.1)),
        Some(4 << 20),
        probe,
    );
    qemu_io_script(dir, "top.qcow2", "qcow2", &["write -P 2 64k 64k".into()]).ok("qemu-io");
    let _ = std::process::Command::new("sync").status();
    for args in [
        &["info", "--backing-chain", "top.qcow2"][..],
        &["info", "--backing-chain", "--output=json", "top.qcow2"][..],
        &[
            "info",
            "--output=json",
            "--backing-chain",
            "-U",
            "top.qcow2",
        ][..],
    ] {
        // actual-size (st_blocks) can still change while the file system
        // settles delayed allocation: take a reading between two equal ones.
        let (mut q, mut r);
        let mut tries = 0;
        loop {
            q = qemu_img(dir, args).ok("qemu-img info");
            r = ours(dir, args);
            let q2 = qemu_img(dir, args).ok("qemu-img info");
            tries += 1;
            if q2.stdout == q.stdout || tries == 5 {
                break;
            }
        }
        assert_eq!(r.code, 0, "qcow2 {args:?} failed: {}", r.stderr);
        assert!(
            r.stdout == q.stdout,
            "{args:?} differs\n--- qcow2:\n{}--- qemu-img:\n{}",
            r.stdout,
            q.stdout
        );
    }
}

#[test]
fn info_backing_chain_matches_qemu() {
    let mut cases = Vec::new();
    for raw_base in [None, Some(1 << 20), Some(1000)] {
        for middle in [false, true] {
            for absolute in [false, true] {
                for subdir in [false, true] {
                    if subdir && !middle {
                        continue;
                    }
                    cases.push(Case {
                        raw_base,
                        middle,
                        absolute,
                        subdir,
                        probe: !absolute,
                        snapshot: raw_base.is_none() && middle,
                    });
                }
            }
        }
    }
    let failures = run_cases(&cases, workers(), case);
    assert_no_failures("info_backing_chain_matches_qemu", cases.len(), &failures);
}

/// A chain that leads back to one of its images is refused, as by qemu-img.
#[test]
fn info_backing_chain_loop_fails() {
    let d = tmpdir();
    let dir = d.path();
    create(dir, "a.qcow2", None, Some(1 << 20), false);
    create(dir, "b.qcow2", Some(("a.qcow2", "qcow2")), None, false);
    qemu_img(
        dir,
        &["rebase", "-u", "-b", "b.qcow2", "-F", "qcow2", "a.qcow2"],
    )
    .ok("rebase");
    let q = qemu_img(dir, &["info", "--backing-chain", "b.qcow2"]);
    let r = ours(dir, &["info", "--backing-chain", "b.qcow2"]);
    assert_ne!(q.code, 0);
    assert_eq!(r.code, q.code, "exit status: {}", r.stderr);
    assert_eq!(r.stdout, q.stdout);
    assert_eq!(
        r.stderr.replacen("qcow2: ", "", 1),
        q.stderr.replacen("qemu-img: ", "", 1)
    );
}

/// Raw images (probed or with `-f raw`, even a qcow2 file read as raw) are
/// described as qemu-img describes them, alone or as a chain of one.
#[test]
fn info_raw_matches_qemu() {
    let d = tmpdir();
    let dir = d.path();
    std::fs::write(dir.join("full.raw"), vec![3u8; 1 << 20]).expect("raw");
    std::fs::write(dir.join("odd.raw"), vec![3u8; 1000]).expect("raw");
    std::fs::write(dir.join("empty.raw"), b"").expect("raw");
    create(dir, "img.qcow2", None, Some(1 << 20), false);
    let _ = std::process::Command::new("sync").status();
    for file in ["full.raw", "odd.raw", "empty.raw", "img.qcow2"] {
        let fmt: &[&str] = if file == "img.qcow2" {
            &["-f", "raw"]
        } else {
            &[]
        };
        for extra in [&[][..], &["--output=json"], &["--backing-chain"]] {
            let mut args = vec!["info"];
            args.extend_from_slice(fmt);
            args.extend_from_slice(extra);
            args.push(file);
            let q = qemu_img(dir, &args).ok("qemu-img info");
            let r = ours(dir, &args);
            assert_eq!(r.code, 0, "qcow2 {args:?}: {}", r.stderr);
            assert!(
                r.stdout == q.stdout,
                "{args:?} differs\n--- qcow2:\n{}--- qemu-img:\n{}",
                r.stdout,
                q.stdout
            );
        }
    }
}

/// A missing image, or a missing backing file in the chain: qemu-img's
/// message and exit status, nothing on stdout.
#[test]
fn info_missing_files_match_qemu() {
    let d = tmpdir();
    let dir = d.path();
    qemu_img(
        dir,
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-u",
            "-b",
            "gone.qcow2",
            "-F",
            "qcow2",
            "top.qcow2",
            "1M",
        ],
    )
    .ok("create");
    for args in [
        &["info", "missing.qcow2"][..],
        &["info", "--backing-chain", "missing.qcow2"],
        &["info", "--backing-chain", "top.qcow2"],
        &["info", "--backing-chain", "--output=json", "top.qcow2"],
    ] {
        let q = qemu_img(dir, args);
        let r = ours(dir, args);
        assert_ne!(q.code, 0);
        assert_eq!(r.code, q.code, "{args:?}: {}", r.stderr);
        assert_eq!(r.stdout, q.stdout, "{args:?}");
        assert_eq!(
            r.stderr.replacen("qcow2: ", "", 1),
            q.stderr.replacen("qemu-img: ", "", 1),
            "{args:?}"
        );
    }
}
