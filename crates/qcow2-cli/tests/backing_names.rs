//! Backing file names are bytes, as QEMU reads them: the
//! `backing_file_size` bytes at `backing_file_offset`, ending at an embedded
//! NUL; size 0 (offset set) means no backing file; a name that is not UTF-8
//! opens the file of exactly that name. Overlays made by qemu-img get their
//! name bytes patched; each is read through qemu-io and `qcow2 io`
//! (`read -P`), and `qemu-img info` / `map` (JSON and human, compared as raw
//! bytes: names are printed as stored, JSON renders them as QEMU does)
//! are compared with `qcow2 info` / `map`.
//! Needs qemu-img and qemu-io (missing: fails under CI, else "skipped").

mod common;
use common::*;
use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::process::Command;

/// Replaces the backing file name of `path` by `name` (size = its length).
fn patch_backing_name(path: &Path, name: &[u8]) {
    let mut b = std::fs::read(path).unwrap();
    let off = u64::from_be_bytes(b[8..16].try_into().unwrap()) as usize;
    let old = u32::from_be_bytes(b[16..20].try_into().unwrap()) as usize;
    assert_ne!(off, 0, "{} has no backing file", path.display());
    b[off..off + old.max(name.len())].fill(0);
    b[off..off + name.len()].copy_from_slice(name);
    b[16..20].copy_from_slice(&(name.len() as u32).to_be_bytes());
    std::fs::write(path, b).unwrap();
    pad_to_sector(path);
}

/// A file length of whole sectors: qemu-img reports the file length rounded
/// up to 512 bytes (a difference unrelated to names, left alone here).
fn pad_to_sector(path: &Path) {
    let len = std::fs::metadata(path).unwrap().len();
    let f = std::fs::OpenOptions::new().write(true).open(path).unwrap();
    f.set_len(len.div_ceil(512) * 512).unwrap();
}

/// stdout and exit code of `prog args`, raw bytes.
fn raw(dir: &Path, prog: &str, args: &[&OsStr]) -> (i32, Vec<u8>) {
    let o = Command::new(prog)
        .args(args)
        .current_dir(dir)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {prog}: {e}"));
    (o.status.code().unwrap_or(-1), o.stdout)
}

fn both(dir: &Path, args: &[&str], file: impl AsRef<OsStr>, what: &str) -> Result<(), String> {
    let mut a: Vec<&OsStr> = args.iter().map(OsStr::new).collect();
    a.push(file.as_ref());
    let q = raw(dir, "qemu-img", &a);
    let mut oa: Vec<&OsStr> = vec![OsStr::new(args[0])];
    oa.extend_from_slice(&a[1..]);
    let o = raw(dir, qcow2_bin(), &oa);
    if q != o {
        return Err(format!(
            "{what}: {args:?}: qemu-img (exit {}):\n{}\nqcow2 (exit {}):\n{}",
            q.0,
            String::from_utf8_lossy(&q.1),
            o.0,
            String::from_utf8_lossy(&o.1)
        ));
    }
    Ok(())
}

/// Reads `cmd` (a `read -P ...`) through qemu-io and `qcow2 io`: same result lines.
fn read_both(dir: &Path, file: &str, cmd: &str, what: &str) -> Result<(), String> {
    let q = qemu_io(dir, &["-r", "-c", cmd, file]);
    let o = ours(dir, &["io", "-r", "-c", cmd, file]);
    let (ql, ol) = (result_lines(&q.stdout), result_lines(&o.stdout));
    if ql != ol || q.code != o.code || ql.iter().any(|l| l.contains("failed")) {
        return Err(format!(
            "{what}: {cmd}: qemu-io (exit {}) {ql:?} {}\nqcow2 io (exit {}) {ol:?} {}",
            q.code, q.stderr, o.code, o.stderr
        ));
    }
    Ok(())
}

#[test]
fn backing_names_are_bytes() {
    if !tool_or_skip("qemu-img", &["--version"], "backing names")
        || !tool_or_skip("qemu-io", &["--version"], "backing names")
    {
        return;
    }
    let d = tmpdir();
    let dir = d.path();
    // Bases whose names are not UTF-8 (or are but not ASCII), each with its
    // own pattern in the first cluster.
    let bases: &[(&[u8], u8)] = &[
        (b"base.qcow2", 0x11),
        (b"base\xff\xfe.qcow2", 0x22),
        (b"b\xe2\x82x.qcow2", 0x33),
        (b"b\xc0\x80.qcow2", 0x44),
        ("b\u{e4}se-\u{1f600}.qcow2".as_bytes(), 0x55),
        (b"b\xed\xa0\x80\xef\xbf\xbe.qcow2", 0x66),
        (b"b,c\xff.qcow2", 0x77),
    ];
    for (i, (name, pat)) in bases.iter().enumerate() {
        let tmp = format!("tmp{i}.qcow2");
        qemu_img(dir, &["create", "-q", "-f", "qcow2", &tmp, "4M"]).ok("create base");
        qemu_io(dir, &["-c", &format!("write -P {pat} 0 64k"), &tmp]).ok("fill base");
        std::fs::rename(dir.join(&tmp), dir.join(OsStr::from_bytes(name))).unwrap();
    }
    let mut failures = Vec::new();
    let mut check = |r: Result<(), String>| {
        if let Err(e) = r {
            failures.push(e);
        }
    };
    for (i, (name, pat)) in bases.iter().enumerate() {
        // Each base by its exact bytes.
        let top = format!("top{i}.qcow2");
        qemu_img(
            dir,
            &[
                "create",
                "-q",
                "-f",
                "qcow2",
                "-F",
                "qcow2",
                "-b",
                "base.qcow2",
                &top,
                "4M",
            ],
        )
        .ok("create overlay");
        patch_backing_name(&dir.join(&top), name);
        let what = format!("backing name {:?}", String::from_utf8_lossy(name));
        check(read_both(dir, &top, &format!("read -P {pat} 0 64k"), &what));
        check(read_both(dir, &top, "read -P 0 64k 64k", &what));
        for args in [
            &["info", "--output=json"][..],
            &["info"],
            &["map", "--output=json"],
            &["map"],
        ] {
            check(both(dir, args, &top, &what));
        }
    }
    // qcow2 create stores such names byte for byte and prints them as
    // qemu-img does, from -b and from -o backing_file= (commas doubled).
    for (i, (name, _)) in bases.iter().enumerate() {
        let mut opt = b"backing_file=".to_vec();
        opt.extend(
            name.split(|&c| c == b',')
                .collect::<Vec<_>>()
                .join(&b",,"[..]),
        );
        let forms: [Vec<&OsStr>; 2] = [
            vec![OsStr::new("-b"), OsStr::from_bytes(name)],
            vec![OsStr::new("-o"), OsStr::from_bytes(&opt)],
        ];
        for (j, form) in forms.iter().enumerate() {
            let what = format!("create {form:?}");
            let (qn, on) = (format!("cq{i}-{j}.qcow2"), format!("co{i}-{j}.qcow2"));
            let mut qa: Vec<&OsStr> = ["create", "-f", "qcow2", "-F", "qcow2"]
                .iter()
                .map(OsStr::new)
                .collect();
            qa.extend_from_slice(form);
            let mut oa = qa.clone();
            qa.push(OsStr::new(&qn));
            oa.push(OsStr::new(&on));
            let q = raw(dir, "qemu-img", &qa);
            let o = raw(dir, qcow2_bin(), &oa);
            let o_out = String::from_utf8_lossy(&o.1).replace(&on, &qn);
            if q.0 != 0 || o.0 != q.0 || o_out != String::from_utf8_lossy(&q.1) || {
                // Compared as bytes too (the lossy strings hide which bytes).
                let ob = o.1.split(|&c| c == b'\'').nth(2).map(<[u8]>::to_vec);
                ob != q.1.split(|&c| c == b'\'').nth(2).map(<[u8]>::to_vec)
            } {
                check(Err(format!(
                    "{what}: qemu-img (exit {}) {:?}\nqcow2 (exit {}) {:?}",
                    q.0,
                    String::from_utf8_lossy(&q.1),
                    o.0,
                    String::from_utf8_lossy(&o.1)
                )));
                continue;
            }
            let name_of = |f: &str| {
                let b = std::fs::read(dir.join(f)).unwrap();
                let off = u64::from_be_bytes(b[8..16].try_into().unwrap()) as usize;
                let len = u32::from_be_bytes(b[16..20].try_into().unwrap()) as usize;
                b[off..off + len].to_vec()
            };
            if name_of(&qn) != *name || name_of(&on) != *name {
                check(Err(format!(
                    "{what}: stored names: qemu-img {:?} qcow2 {:?}",
                    name_of(&qn),
                    name_of(&on)
                )));
            }
            pad_to_sector(&dir.join(&qn));
            check(both(dir, &["info", "--output=json"], &qn, &what));
        }
    }
    // Image names that are not UTF-8 are printed as QEMU prints them too.
    let odd = OsStr::from_bytes(b"img\xed\xa0\x80\xf8\x88\x80\x80\x80\xff.qcow2");
    std::fs::copy(dir.join("top1.qcow2"), dir.join(odd)).unwrap();
    for args in [
        &["info", "--output=json"][..],
        &["info"],
        &["check", "--output=json"],
        &["map"],
    ] {
        check(both(dir, args, odd, "non-UTF-8 image name"));
    }
    // An embedded NUL ends the name; size 0 (offset set) or a name starting
    // with NUL means no backing file at all.
    let special: &[(&[u8], &str, u8)] = &[
        (b"base.qcow2\0junk", "embedded NUL", 0x11),
        (
            b"base\xff\xfe.qcow2\0base.qcow2",
            "NUL after a non-UTF-8 name",
            0x22,
        ),
        (b"", "size 0", 0),
        (b"\0base.qcow2", "leading NUL", 0),
    ];
    for (i, (name, what, pat)) in special.iter().enumerate() {
        let top = format!("special{i}.qcow2");
        qemu_img(
            dir,
            &[
                "create",
                "-q",
                "-f",
                "qcow2",
                "-F",
                "qcow2",
                "-b",
                "base.qcow2",
                &top,
                "4M",
            ],
        )
        .ok("create overlay");
        patch_backing_name(&dir.join(&top), name);
        check(read_both(dir, &top, &format!("read -P {pat} 0 64k"), what));
        for args in [
            &["info", "--output=json"][..],
            &["info"],
            &["map", "--output=json"],
            &["map"],
        ] {
            check(both(dir, args, &top, what));
        }
        // Writable open works too (no backing file to open is fine).
        let o = ours(dir, &["io", "-c", "write -P 0x77 1M 4k", &top]);
        check(if o.code == 0 {
            Ok(())
        } else {
            Err(format!("{what}: write: {}{}", o.stdout, o.stderr))
        });
        check(read_both(dir, &top, "read -P 0x77 1M 4k", what));
    }
    assert!(failures.is_empty(), "{}", failures.join("\n---\n"));
}
