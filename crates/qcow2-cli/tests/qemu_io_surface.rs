//! qemu-io's surface beyond read/write/discard: command-line options
//! (repeated options, `--aio`, `-U`, `-C`, `-s`, `file:`, `-f raw`,
//! `json:{...}`, `--image-opts`, `--object`), the other commands (readv,
//! writev, aio_*, alloc, map, length, info, open/close/reopen, help, sleep,
//! sigraise, truncate on raw) and the messages. Each case runs the same
//! command line through QEMU's `qemu-io` and through a link named `qemu-io`
//! to `qcow2`, each in its own copy of one directory of images: same result
//! lines on stdout (timings removed), same stderr, same exit status, then
//! same guest content (`qemu-img compare`) and allocation (`qemu-img map`,
//! host offsets aside) of every image, and our qcow2 images clean for
//! `qemu-img check`.

mod common;
use common::*;
use std::path::Path;

/// What a case starts from: files made in `dir` by `setup`.
struct Case<'a> {
    name: &'a str,
    setup: &'a dyn Fn(&Path),
    /// The qemu-io command line (after the program name).
    args: Vec<String>,
    /// Image files judged afterwards: (name, format).
    images: Vec<(&'a str, &'a str)>,
    /// Compare stdout (false where only the usage text differs).
    stdout: bool,
}

fn sv(v: &[&str]) -> Vec<String> {
    v.iter().map(|x| x.to_string()).collect()
}

/// `-c CMD` for each command.
fn cmds(v: &[&str]) -> Vec<String> {
    v.iter()
        .flat_map(|c| ["-c".to_string(), c.to_string()])
        .collect()
}

/// qemu-io's `-C` report lines carry rates: keep only the byte count.
fn filtered(out: &str) -> Vec<String> {
    result_lines(out)
        .into_iter()
        .map(|l| {
            let f: Vec<&str> = l.split(',').collect();
            if f.len() == 5 && f[2].contains(':') && f[0].parse::<u64>().is_ok() {
                format!("{},{}", f[0], f[1])
            } else {
                l
            }
        })
        .collect()
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).expect("mkdir");
    for e in std::fs::read_dir(from).expect("read_dir") {
        let e = e.expect("entry");
        std::fs::copy(e.path(), to.join(e.file_name())).expect("copy");
    }
}

fn run_case(c: &Case) {
    let d = tmpdir();
    let dir = d.path();
    let base = dir.join("base");
    std::fs::create_dir_all(&base).expect("mkdir");
    (c.setup)(&base);
    copy_dir(&base, &dir.join("q"));
    copy_dir(&base, &dir.join("o"));
    let bin = dir.join("bin");
    std::fs::create_dir_all(&bin).expect("mkdir");
    std::os::unix::fs::symlink(qcow2_bin(), bin.join("qemu-io")).expect("symlink");
    let args: Vec<&str> = c.args.iter().map(String::as_str).collect();
    let q = qemu_io(&dir.join("q"), &args);
    let o = run_in(&dir.join("o"), bin.join("qemu-io").to_str().unwrap(), &args);
    assert!(
        !o.stderr.contains("internal error") && !o.stderr.contains("panicked"),
        "{}: {}",
        c.name,
        o.stderr
    );
    if c.stdout {
        let (ql, ol) = (filtered(&q.stdout), filtered(&o.stdout));
        for (i, (a, b)) in ol.iter().zip(ql.iter()).enumerate() {
            assert!(
                a == b,
                "{}: stdout line {i} differs:\n  ours: {a}\n  qemu: {b}\n--- ours:\n{}\n--- qemu:\n{}",
                c.name,
                o.stdout,
                q.stdout
            );
        }
        assert_eq!(
            ol.len(),
            ql.len(),
            "{}: stdout lines\n--- ours:\n{}--- qemu-io:\n{}",
            c.name,
            o.stdout,
            q.stdout
        );
    }
    assert_eq!(o.stderr, q.stderr, "{}: stderr (left ours)", c.name);
    assert_eq!(o.code, q.code, "{}: exit status", c.name);
    for (img, fmt) in &c.images {
        let (qi, oi) = (format!("q/{img}"), format!("o/{img}"));
        let cmp = qemu_img(dir, &["compare", "-f", fmt, "-F", fmt, &qi, &oi]);
        assert_eq!(
            cmp.code, 0,
            "{}: {img}: content differs: {}{}",
            c.name, cmp.stdout, cmp.stderr
        );
        if *fmt == "qcow2" {
            let (qm, om) = (qemu_map(dir, &qi), qemu_map(dir, &oi));
            assert!(
                map_without_offsets(&om) == map_without_offsets(&qm),
                "{}: {img}: map differs\n--- ours:\n{om}--- qemu-io:\n{qm}",
                c.name
            );
            assert_qemu_check_clean(dir, &oi, c.name);
        }
    }
}

/// A 64 MiB qcow2 image with some data, zeroes and a hole.
fn plain(dir: &Path) {
    qemu_create(dir, "img.qcow2", 64 << 20, &ImgOpts::default(), None);
    qemu_io_script(
        dir,
        "img.qcow2",
        "qcow2",
        &sv(&[
            "write -P 0x11 0 192k",
            "write -z 1M 128k",
            "write -P 0x12 4M 64k",
        ]),
    )
    .ok("fill");
}

/// base.qcow2 (4 MiB, data and zeroes) under top.qcow2 (8 MiB, some data).
fn chain(dir: &Path) {
    qemu_create(dir, "base.qcow2", 4 << 20, &ImgOpts::default(), None);
    qemu_io_script(
        dir,
        "base.qcow2",
        "qcow2",
        &sv(&[
            "write -P 0x05 0 200k",
            "write -z 1M 64k",
            "write -P 0x06 2M 64k",
        ]),
    )
    .ok("fill base");
    qemu_create(
        dir,
        "top.qcow2",
        8 << 20,
        &ImgOpts::default(),
        Some(("base.qcow2", "qcow2")),
    );
    qemu_io_script(dir, "top.qcow2", "qcow2", &sv(&["write -P 0x07 64k 4k"])).ok("fill top");
}

/// A fully written 4 MiB raw file (no holes: its status does not depend on
/// the file system).
fn raw(dir: &Path) {
    raw_backing(dir, "img.raw", 4 << 20, &sv(&["write -P 0x21 0 64k"]));
}

fn with(pre: &[&str], script: &[&str], post: &[&str]) -> Vec<String> {
    let mut v = sv(pre);
    v.extend(cmds(script));
    v.extend(sv(post));
    v
}

#[test]
fn vectored_and_aio_commands() {
    run_case(&Case {
        name: "vectored and aio",
        setup: &plain,
        args: with(
            &["-f", "qcow2"],
            &[
                "readv -P 0x11 0 4k 8k 512",
                "readv -P 0x11 190k 4k",
                "readv -q -P 0x11 0 64k",
                "readv -v 4M 16 16",
                "readv -C 0 4k",
                "writev -P 0x31 2M 4k 4k 60k",
                "writev -q 3M 1k",
                "writev -C -P 0x32 5M 512 512",
                "writev -f -P 0x33 6M 4k",
                "readv -P 0x31 2M 68k",
                "aio_write -P 0x41 8M 64k",
                "aio_flush",
                "aio_read -P 0x41 8M 64k",
                "aio_flush",
                "aio_write -z 8M 4k",
                "aio_flush",
                "aio_write -z -u 9M 64k",
                "aio_flush",
                "aio_write -f -P 0x42 10M 4k 4k",
                "aio_flush",
                "aio_read -P 0 8M 4k",
                "aio_flush",
                "aio_read -q -P 0x42 10M 8k",
                "aio_flush",
                "aio_read -v 10M 16",
                "aio_flush",
                "aio_write -u 0 512",
                "aio_write -z -P 1 0 512",
                "aio_flush",
                "aio_write -i 0 512",
                "aio_write -z 0 512 512",
                "readv -P 0x11 0 4k 1G 1.5G",
                "readv 0",
                "writev x 4k",
                "readv 64M 1",
                "writev 64M 512",
            ],
            &["img.qcow2"],
        ),
        images: vec![("img.qcow2", "qcow2")],
        stdout: true,
    });
}

#[test]
fn query_and_helper_commands() {
    run_case(&Case {
        name: "queries",
        setup: &plain,
        args: with(
            &["-f", "qcow2"],
            &[
                "alloc 0",
                "alloc 0 1M",
                "alloc 100k 1M",
                "alloc 1M 128k",
                "alloc 63M 4M",
                "alloc 70M",
                "alloc",
                "alloc x",
                "map",
                "map x",
                "length",
                "length 1",
                "info",
                "help",
                "help alloc",
                "help a",
                "help frob",
                "sleep 10",
                "sleep 0x5",
                "sleep x",
                "sigraise 0",
                "sigraise 100",
                "l",
                "frob",
            ],
            &["img.qcow2"],
        ),
        images: vec![("img.qcow2", "qcow2")],
        stdout: true,
    });
}

#[test]
fn open_close_reopen() {
    run_case(&Case {
        name: "open/close/reopen",
        setup: &plain,
        args: with(
            &["-f", "qcow2"],
            &[
                "close",
                "read 0 1",
                "length",
                "open -r img.qcow2",
                "write 0 1",
                "read -P 0x11 0 4k",
                "open img.qcow2",
                "close",
                "open -n -t writeback -d ignore img.qcow2",
                "discard 0 64k",
                "read -P 0x11 0 4k",
                "close",
                "open -o driver=qcow2 img.qcow2",
                "write -P 0x51 0 4k",
                "reopen -r",
                "write 0 1",
                "reopen -w",
                "write -P 0x52 4k 4k",
                "reopen -c none",
                "reopen -c bogus",
                "reopen -r -w",
                "reopen -o foo=bar",
                "reopen -o cache.direct=on",
                "reopen x",
                "read -P 0x52 4k 4k",
                "close",
                "open nope.qcow2",
                "open -U img.qcow2",
                "open -r -U img.qcow2",
                "read -P 0x51 0 4k",
            ],
            &[],
        ),
        images: vec![("img.qcow2", "qcow2")],
        stdout: true,
    });
}

#[test]
fn repeated_options_aio_force_share() {
    run_case(&Case {
        name: "repeated options",
        setup: &plain,
        args: with(
            &[
                "-f", "raw", "-f", "qcow2", "--aio", "io_uring", "-i", "threads", "-U", "-r",
            ],
            &["read -P 0x11 0 64k", "info", "length"],
            &["img.qcow2"],
        ),
        images: vec![("img.qcow2", "qcow2")],
        stdout: true,
    });
    run_case(&Case {
        name: "cache and discard repeated",
        setup: &plain,
        args: with(
            &[
                "-t",
                "none",
                "-t",
                "writeback",
                "-d",
                "ignore",
                "-d",
                "unmap",
                "-f",
                "qcow2",
                "-k",
            ],
            &["discard 0 64k", "write -z -u 1M 64k", "read -P 0 0 64k"],
            &["img.qcow2"],
        ),
        images: vec![("img.qcow2", "qcow2")],
        stdout: true,
    });
    run_case(&Case {
        name: "-U read-write",
        setup: &plain,
        args: with(&["-U", "-f", "qcow2"], &["read 0 1"], &["img.qcow2"]),
        images: vec![("img.qcow2", "qcow2")],
        stdout: true,
    });
}

#[test]
fn copy_on_read() {
    run_case(&Case {
        name: "-C",
        setup: &chain,
        args: with(
            &["-C", "-f", "qcow2"],
            &[
                "read -P 0x05 4k 8k",
                "read -P 0x07 64k 4k",
                "read 190k 200k",
                "readv -P 0 1M 4k",
                "aio_read -P 0x06 2M 4k",
                "aio_flush",
                "read -P 0 3M 4k",
                "read -P 0 5M 4k",
                "alloc 0 8M",
                "map",
            ],
            &["top.qcow2"],
        ),
        images: vec![("top.qcow2", "qcow2"), ("base.qcow2", "qcow2")],
        stdout: true,
    });
}

#[test]
fn snapshot_mode_leaves_the_image_alone() {
    let script = [
        "write -P 0x61 0 64k",
        "write -z 1M 64k",
        "discard 128k 64k",
        "read -P 0x61 0 64k",
        "read -P 0x07 64k 4k",
        "alloc 0 2M",
        "length",
    ];
    run_case(&Case {
        name: "-s",
        setup: &chain,
        args: with(&["-s", "-f", "qcow2"], &script, &["top.qcow2"]),
        images: vec![("top.qcow2", "qcow2"), ("base.qcow2", "qcow2")],
        stdout: true,
    });
    run_case(&Case {
        name: "open -s",
        setup: &plain,
        args: with(
            &[],
            &[
                "open -s -o driver=qcow2 img.qcow2",
                "write -P 0x62 0 4k",
                "read -P 0x62 0 4k",
            ],
            &[],
        ),
        images: vec![("img.qcow2", "qcow2")],
        stdout: true,
    });
    // Nothing changed: the image equals a copy never touched.
    let d = tmpdir();
    let dir = d.path();
    chain(dir);
    copy(dir, "top.qcow2", "orig.qcow2");
    let mut a = vec!["io", "-s", "-f", "qcow2"];
    for c in &script {
        a.push("-c");
        a.push(c);
    }
    a.push("top.qcow2");
    ours(dir, &a).ok("qcow2 io -s");
    assert_same_bytes(dir, "top.qcow2", "orig.qcow2", "-s changed the image");
}

#[test]
fn file_names_json_and_image_opts() {
    let cases: Vec<(&str, Vec<String>)> = vec![
        (
            "file: prefix",
            with(&["-f", "qcow2"], &["write -P 0x71 0 4k", "read -P 0x71 0 4k"], &["file:img.qcow2"]),
        ),
        (
            "json nested",
            with(
                &[],
                &["write -P 0x72 0 4k", "read -P 0x72 0 4k", "info"],
                &[r#"json:{"driver":"qcow2","file":{"driver":"file","filename":"img.qcow2"}}"#],
            ),
        ),
        (
            "json dotted, cache and discard",
            with(
                &[],
                &["discard 0 64k", "read -P 0 0 64k", "alloc 0 64k"],
                &[r#"json:{"driver":"qcow2","file.filename":"img.qcow2","cache.direct":true,"cache.no-flush":false,"discard":"unmap"}"#],
            ),
        ),
        (
            "json unknown option",
            with(&[], &["read 0 1"], &[r#"json:{"driver":"qcow2","file":{"driver":"file","filename":"img.qcow2"},"foo":1}"#]),
        ),
        (
            "image-opts",
            with(
                &["--image-opts"],
                &["write -P 0x73 64k 4k", "read -P 0x73 64k 4k", "length"],
                &["driver=qcow2,file.driver=file,file.filename=img.qcow2,cache.direct=on,cache.no-flush=on,discard=ignore"],
            ),
        ),
        (
            "image-opts missing",
            with(&["--image-opts"], &["read 0 1"], &["driver=qcow2,file.filename=nope.qcow2"]),
        ),
        (
            "object secret",
            with(
                &["--object", "secret,id=sec0,data=123456", "-f", "qcow2"],
                &["read -P 0x11 0 4k"],
                &["img.qcow2"],
            ),
        ),
    ];
    for (name, args) in cases {
        run_case(&Case {
            name,
            setup: &plain,
            args,
            images: vec![("img.qcow2", "qcow2")],
            stdout: true,
        });
    }
    run_case(&Case {
        name: "json backing null",
        setup: &chain,
        args: with(
            &[],
            &["read -P 0 0 4k", "read -P 0x07 64k 4k", "map"],
            &[
                r#"json:{"driver":"qcow2","backing":null,"file":{"driver":"file","filename":"top.qcow2"}}"#,
            ],
        ),
        images: vec![("top.qcow2", "qcow2")],
        stdout: true,
    });
}

#[test]
fn raw_images() {
    run_case(&Case {
        name: "raw",
        setup: &raw,
        args: with(
            &["-f", "raw"],
            &[
                "read -P 0x21 0 64k",
                "write -P 0x22 64k 64k",
                "write -z 128k 64k",
                "writev -P 0x23 1M 4k 4k",
                "aio_write -P 0x24 2M 4k",
                "aio_flush",
                "readv -P 0x23 1M 8k",
                "read -P 0 128k 64k",
                "alloc 0 8M",
                "map",
                "info",
                "length",
                "flush",
                "write 4M 1",
                "truncate 2M",
                "length",
                "read -P 0x24 2M 1",
            ],
            &["img.raw"],
        ),
        images: vec![("img.raw", "raw")],
        stdout: true,
    });
}

#[test]
fn command_line_errors() {
    let cases: Vec<(&str, Vec<String>)> = vec![
        ("invalid option", sv(&["-Z", "img.qcow2"])),
        ("unknown long option", sv(&["--bogus", "img.qcow2"])),
        ("missing argument", sv(&["-f"])),
        ("two files", sv(&["-f", "qcow2", "img.qcow2", "img.qcow2"])),
        (
            "image-opts and -f",
            sv(&["-f", "qcow2", "--image-opts", "img.qcow2"]),
        ),
        ("bad aio", sv(&["--aio", "foo", "img.qcow2"])),
        ("bad cache", sv(&["-t", "foo", "img.qcow2"])),
        ("bad discard", sv(&["-d", "foo", "img.qcow2"])),
        (
            "missing image",
            sv(&["-f", "qcow2", "-c", "read 0 1", "nope.qcow2"]),
        ),
        (
            "missing backing file",
            sv(&["-f", "qcow2", "-c", "read 0 1", "nobase.qcow2"]),
        ),
        (
            "no file",
            sv(&["-c", "read 0 1", "-c", "help alloc", "-c", "sigraise 0"]),
        ),
        ("abort", sv(&["-f", "qcow2", "-c", "abort", "img.qcow2"])),
        (
            "read-only",
            sv(&["-r", "-f", "qcow2", "-c", "write 0 1", "img.qcow2"]),
        ),
        (
            "quit stops",
            sv(&["-f", "qcow2", "-c", "quit", "-c", "frob", "img.qcow2"]),
        ),
    ];
    let setup = |dir: &Path| {
        plain(dir);
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
                "nobase.qcow2",
                "1M",
            ],
        )
        .ok("create with a missing backing file");
    };
    for (name, args) in cases {
        // Our usage text is our own: stdout is compared where it is not printed.
        let usage = matches!(
            name,
            "abort" | "invalid option" | "unknown long option" | "missing argument" | "two files"
        );
        run_case(&Case {
            name,
            setup: &setup,
            args,
            images: vec![("img.qcow2", "qcow2")],
            stdout: !usage,
        });
    }
}

#[test]
fn sigraise_kills_after_flushing_output() {
    run_case(&Case {
        name: "sigraise 9",
        setup: &plain,
        args: with(
            &["-f", "qcow2"],
            &["write -P 0x55 0 4k", "sigraise 9", "read 0 1"],
            &["img.qcow2"],
        ),
        images: vec![],
        stdout: true,
    });
}

/// `qcow2 io` itself prefixes its messages with `qcow2:`.
#[test]
fn own_name_prefixes_messages() {
    let d = tmpdir();
    let dir = d.path();
    plain(dir);
    let o = ours(dir, &["io", "-r", "-c", "write 0 1", "img.qcow2"]);
    assert_eq!(o.stderr, "qcow2: Block node is read-only\n");
    assert_eq!(o.code, 1);
    let o = ours(dir, &["io", "-c", "read 0 1", "nope.qcow2"]);
    assert!(
        o.stderr.starts_with("qcow2: can't open device nope.qcow2: Could not open 'nope.qcow2': No such file or directory"),
        "{}",
        o.stderr
    );
}

/// A reader that goes away (`qcow2 io ... | head -1`) ends nothing badly:
/// no panic, the commands still run, exit status 0.
#[test]
fn closed_stdout_is_not_an_error() {
    let d = tmpdir();
    let dir = d.path();
    plain(dir);
    let mut child = std::process::Command::new(qcow2_bin())
        .args([
            "io",
            "-f",
            "qcow2",
            "-c",
            "sleep 200",
            "-c",
            "read -v 0 64k",
            "-c",
            "write -P 0x66 2M 4k",
            "img.qcow2",
        ])
        .current_dir(dir)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("spawn");
    drop(child.stdout.take());
    let out = child.wait_with_output().expect("wait");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "exit {:?}: {err}", out.status);
    assert!(err.is_empty(), "{err}");
    qemu_io_script(dir, "img.qcow2", "qcow2", &sv(&["read -P 0x66 2M 4k"])).ok("write done");
}

/// `reopen -o`: which options may change, unchanged ones, conflicts with
/// -r/-w/-c, on/off values.
#[test]
fn reopen_option_rules() {
    let lines: &[&[&str]] = &[
        &["reopen -o node-name=foo"],
        &["reopen -o file.node-name=foo"],
        &["reopen -o backing.driver=file"],
        &[
            "reopen -o driver=qcow2",
            "reopen -o file.driver=file",
            "read 0 1",
        ],
        &["reopen -o driver=raw"],
        &["reopen -r -o read-only=on"],
        &["reopen -c none -o cache.direct=on"],
        &["reopen -o read-only=foo"],
        &["reopen -o auto-read-only=bar"],
        &["reopen -o cache.no-flush=on", "write -P 0x12 0 4k"],
    ];
    for l in lines {
        run_case(&Case {
            name: l[0],
            setup: &plain,
            args: with(&["-f", "qcow2"], l, &["img.qcow2"]),
            images: vec![("img.qcow2", "qcow2")],
            stdout: true,
        });
    }
    run_case(&Case {
        name: "open -o node-name then reopen",
        setup: &plain,
        args: with(
            &[],
            &[
                "open -o node-name=foo img.qcow2",
                "reopen -o node-name=foo",
                "reopen",
            ],
            &[],
        ),
        images: vec![("img.qcow2", "qcow2")],
        stdout: true,
    });
}

/// QEMU's JSON takes 'single quotes'; null-co; the qcow2 cache options.
#[test]
fn json_quotes_null_co_and_cache_options() {
    run_case(&Case {
        name: "null-co",
        setup: &plain,
        args: with(
            &["-f", "null-co"],
            &["reopen", "info", "length", "read -P 0 0 4k", "write 0 4k"],
            &["json:{'driver': 'null-co', 'size': 65536}"],
        ),
        images: vec![],
        stdout: true,
    });
    run_case(&Case {
        name: "single-quoted json",
        setup: &plain,
        args: with(
            &[],
            &["read -P 0x11 0 4k"],
            &["json:{'driver': 'qcow2', 'file': {'driver': 'file', 'filename': 'img.qcow2'}}"],
        ),
        images: vec![("img.qcow2", "qcow2")],
        stdout: true,
    });
    for o in [
        "cache-size=1.25M,l2-cache-size=1M,refcount-cache-size=0.25M",
        "cache-size=1M,l2-cache-size=2M",
        "cache-size=1M,refcount-cache-size=2M",
        "l2-cache-entry-size=256",
        "l2-cache-entry-size=4242",
        "l2-cache-entry-size=128k",
        "cache-size=0",
        "l2-cache-size=0",
        "refcount-cache-size=0",
        "cache-size=2M,l2-cache-size=1M",
        "l2-cache-entry-size=4k",
    ] {
        let open = format!("open -o {o} img.qcow2");
        run_case(&Case {
            name: o,
            setup: &plain,
            args: with(
                &[],
                &[&open, "read -P 0x11 0 64k", "write -P 0x13 64k 64k"],
                &[],
            ),
            images: vec![("img.qcow2", "qcow2")],
            stdout: true,
        });
    }
}

/// `truncate` on a qcow2 image (the engine's resize: grow with and without
/// preallocation, shrink over data, a bad mode), then reads at the edges.
#[test]
fn truncate_qcow2() {
    run_case(&Case {
        name: "truncate",
        setup: &plain,
        args: with(
            &["-f", "qcow2"],
            &[
                "write -P 0x31 0 64k",
                "write -P 0x32 7M 64k",
                "truncate 16M",
                "length",
                "read -P 0x32 7M 64k",
                "read -P 0 15M 1M",
                "truncate -m metadata 20M",
                "length",
                "alloc 16M 4M",
                "truncate 1M",
                "length",
                "read -P 0x31 0 64k",
                "truncate -m bogus 2M",
                "length",
            ],
            &["img.qcow2"],
        ),
        images: vec![("img.qcow2", "qcow2")],
        stdout: true,
    });
}

/// The VM state area (`write -b` / `read -b`: past the disk, through the
/// same tables, growing the L1 table) and `write -s FILE` (the file's bytes,
/// repeated), with qemu-io's checks and messages.
#[test]
fn vmstate_and_source_file() {
    run_case(&Case {
        name: "vmstate and -s",
        setup: &|d: &Path| {
            plain(d);
            std::fs::write(d.join("pat.bin"), b"0123456789abcdef!").unwrap();
            std::fs::write(d.join("empty.bin"), b"").unwrap();
        },
        args: with(
            &["-f", "qcow2"],
            &[
                "write -b -P 0x51 0 4k",
                "read -b -P 0x51 0 4k",
                "read -b -P 0 4k 4k",
                "write -b -P 0x52 1T 64k",
                "read -b -P 0x52 1T 64k",
                "read -b -v 1T 32",
                "write -b 100 512",
                "read -b 0 100",
                "write -b -z 0 512",
                "write -b -f 0 512",
                "write -s pat.bin 1M 100k",
                "read -v 1M 48",
                "write -s empty.bin 2M 4k",
                "write -s missing.bin 2M 4k",
                "write -s pat.bin -P 1 2M 4k",
                "read -P 0x11 0 4k",
            ],
            &["img.qcow2"],
        ),
        images: vec![("img.qcow2", "qcow2")],
        stdout: true,
    });
    // 512-byte clusters: the L1 table that grows to reach the VM state
    // takes more clusters than one refcount block describes, so that
    // block cannot describe itself (it goes after the run).
    run_case(&Case {
        name: "vmstate with 512-byte clusters",
        setup: &|d: &Path| {
            let o = ImgOpts {
                cluster_size: 512,
                ..ImgOpts::default()
            };
            qemu_create(d, "small.qcow2", 1 << 30, &o, None);
        },
        args: with(
            &["-f", "qcow2"],
            &[
                "write -b -P 0x61 0 1M",
                "read -b -P 0x61 0 1M",
                "write -P 0x62 1020M 1M",
                "read -P 0x62 1020M 1M",
            ],
            &["small.qcow2"],
        ),
        images: vec![("small.qcow2", "qcow2")],
        stdout: true,
    });
}

/// Header fields QEMU refuses, each poked into an image qemu-img made:
/// qemu-io's messages ("... too large", "... offset invalid", "Header
/// extension too large", ...) and exit status, and a table past the end
/// of the file that QEMU reads as zeroes.
#[test]
fn header_errors_match_qemu() {
    type Pokes = &'static [(u64, &'static [u8])];
    let cases: &[(&str, Pokes)] = &[
        ("header_length huge", &[(100, b"\xff\xff\xff\xff")]),
        ("header_length short", &[(100, b"\x00\x00\x00\x40")]),
        (
            "backing_file_offset huge",
            &[(8, b"\xff\xff\xff\xff\xff\xff\xff\xff")],
        ),
        (
            "extension past the backing name",
            &[
                (8, b"\x00\x00\x00\x00\x00\x00\x00\x74"),
                (112, b"\x12\x34\x56\x78\x7f\xff\xff\xff"),
            ],
        ),
        (
            "extension too long",
            &[(112, b"\x12\x34\x56\x78\x7f\xff\xff\xff")],
        ),
        ("refcount table clusters", &[(56, b"\x00\x02\x00\x01")]),
        ("refcount table none", &[(56, b"\x00\x00\x00\x00")]),
        (
            "refcount table misaligned",
            &[(48, b"\x12\x34\x56\x78\x90\xab\xcd\xef")],
        ),
        (
            "refcount table overflow",
            &[
                (48, b"\xff\xff\xff\xff\xff\xff\x00\x00"),
                (56, b"\x00\x00\x00\x7f"),
            ],
        ),
        ("snapshots too many", &[(60, b"\x7f\xff\xff\xff")]),
        (
            "snapshots overflow",
            &[
                (64, b"\xff\xff\xff\xff\xff\xff\x00\x00"),
                (60, b"\x00\x00\xff\xff"),
            ],
        ),
        (
            "snapshots misaligned",
            &[(64, b"\x12\x34\x56\x78\x90\xab\xcd\xef")],
        ),
        (
            "snapshots past the end",
            &[
                (64, b"\x00\x00\x00\x00\x01\x00\x00\x00"),
                (60, b"\x00\x00\x00\x10"),
            ],
        ),
        ("l1 too large", &[(36, b"\x7f\xff\xff\xff")]),
        ("l1 too small", &[(36, b"\x00\x00\x00\x00")]),
        (
            "l1 overflow",
            &[
                (40, b"\x7f\xff\xff\xff\xff\xff\x00\x00"),
                (36, b"\x00\x00\xff\xff"),
            ],
        ),
        (
            "l1 misaligned",
            &[(40, b"\x12\x34\x56\x78\x90\xab\xcd\xef")],
        ),
        (
            "backing name too long",
            &[
                (8, b"\x00\x00\x00\x00\x00\x00\x10\x00"),
                (16, b"\xff\xff\xff\xff"),
            ],
        ),
    ];
    for (name, pokes) in cases {
        let setup = move |d: &Path| {
            qemu_create(d, "img.qcow2", 64 << 20, &ImgOpts::default(), None);
            let p = d.join("img.qcow2");
            let mut b = std::fs::read(&p).unwrap();
            for (off, bytes) in pokes.iter() {
                b[*off as usize..*off as usize + bytes.len()].copy_from_slice(bytes);
            }
            std::fs::write(&p, b).unwrap();
        };
        run_case(&Case {
            name,
            setup: &setup,
            args: sv(&["-c", "read 0 512", "img.qcow2"]),
            images: vec![],
            stdout: true,
        });
    }
}

/// Protocol drivers and what they open: `file` regular files only,
/// `host_device` / `host_cdrom` character or block devices only (a
/// directory, /dev/null), read-only and read-write, with QEMU's messages.
#[test]
fn protocol_driver_file_types() {
    for proto in ["file", "host_device", "host_cdrom"] {
        for ro in [true, false] {
            for target in [".", "/dev/null"] {
                let open = format!(
                    "open {}-o driver={proto},filename={target},locking=off",
                    if ro { "-r " } else { "" }
                );
                run_case(&Case {
                    name: &format!("{proto} {target} ro={ro}"),
                    setup: &plain,
                    args: sv(&["-c", &open]),
                    images: vec![],
                    stdout: true,
                });
            }
        }
    }
}

/// Overlap-check and cache options at reopen: accepted and validated as
/// QEMU does (template values, conflicting template, per-structure flags,
/// cache size limits and combinations, clean interval), each reopen's
/// values replacing the previous ones of the same group.
#[test]
fn reopen_overlap_and_cache_options() {
    run_case(&Case {
        name: "reopen overlap/cache",
        setup: &plain,
        args: with(
            &["-f", "qcow2"],
            &[
                "reopen -o overlap-check=constant",
                "reopen -o overlap-check.template=all",
                "reopen -o overlap-check.main-header=off",
                "reopen -o overlap-check.inactive-l2=on",
                "reopen -o cache-size=1M",
                "reopen -o l2-cache-size=512k",
                "reopen -o refcount-cache-size=128k",
                "reopen -o l2-cache-entry-size=4k",
                "reopen -o cache-clean-interval=5",
                "write -P 7 0 1M",
                "read -P 7 0 1M",
                "reopen -o overlap-check=cached,overlap-check.template=none",
                "reopen -o overlap-check=bogus",
                "reopen -o overlap-check.template=bogus",
                "reopen -o overlap-check.active-l1=maybe",
                "reopen -o cache-size=1M,l2-cache-size=2M",
                "reopen -o refcount-cache-size=256T",
                "reopen -o cache-clean-interval=-1",
                "reopen -o l2-cache-entry-size=33k",
            ],
            &["img.qcow2"],
        ),
        images: vec![("img.qcow2", "qcow2")],
        stdout: true,
    });
}

/// QEMU's blkdebug driver as a layer with request limits (below or above
/// the qcow2 layer, `blkdebug::IMAGE`): the same results as qemu-io.
#[test]
fn blkdebug_limits() {
    for open in [
        "open -o driver=qcow2,file.align=4k blkdebug::img.qcow2",
        "open -o driver=blkdebug,image.driver=qcow2,align=4k,max-transfer=64k blkdebug::img.qcow2",
        "open -o driver=blkdebug,image.driver=qcow2,align=512,max-transfer=64k,opt-write-zero=64k blkdebug::img.qcow2",
    ] {
        run_case(&Case {
            name: open,
            setup: &plain,
            args: sv(&[
                "-c",
                open,
                "-c",
                "write -P 0x33 1000 128k",
                "-c",
                "read -P 0x33 1000 128k",
                "-c",
                "write -z 3M 192k",
                "-c",
                "read -P 0 3M 192k",
            ]),
            images: vec![("img.qcow2", "qcow2")],
            stdout: true,
        });
    }
}

/// `plain` plus blkdebug configuration files.
fn with_rules(dir: &Path) {
    plain(dir);
    for (name, text) in [
        (
            "l2load.conf",
            "[inject-error]\nevent = \"l2_load\"\nonce = \"on\"\n",
        ),
        (
            "nospc.conf",
            "[inject-error]\nevent = \"write_aio\"\nerrno = \"28\"\nonce = \"on\"\n",
        ),
        (
            "l2upd.conf",
            "[inject-error]\nevent = \"l2_update\"\nimmediately = \"on\"\nonce = \"off\"\n",
        ),
        (
            "refload.conf",
            "# a comment\n[inject-error]\nevent = \"refblock_load\"\nerrno = \"28\"\n",
        ),
        ("badevent.conf", "[inject-error]\nevent = \"foo\"\n"),
        ("noevent.conf", "[inject-error]\nerrno = \"5\"\n"),
        (
            "badkey.conf",
            "[inject-error]\nevent = \"l2_load\"\nbogus = \"1\"\n",
        ),
        ("badgroup.conf", "[foo]\nevent = \"l2_load\"\n"),
        (
            "badonce.conf",
            "[inject-error]\nevent = \"l2_load\"\nonce = \"maybe\"\n",
        ),
    ] {
        std::fs::write(dir.join(name), text).unwrap();
    }
}

/// QEMU's blkdebug error injection (`blkdebug:CONF:IMAGE`, `json:` and
/// `open -o` rules, the state machine, `sector`, `once`): the same script
/// through qemu-io and ours fails the same requests with the same errors,
/// and leaves images qemu-img finds equal and clean.
#[test]
fn blkdebug_error_injection() {
    let json_rules = |rules: &str| {
        format!(
            "json:{{'driver': 'qcow2', 'file': {{'driver': 'blkdebug', {rules}, 'image.filename': 'img.qcow2'}}}}"
        )
    };
    let cases: Vec<(&str, Vec<String>)> = vec![
        (
            // The L2 table load is the request that fails; once: then gone.
            "l2_load once",
            sv(&[
                "-c",
                "read -P 0x11 0 4k",
                "-c",
                "read -P 0x11 0 4k",
                "blkdebug:l2load.conf:img.qcow2",
            ]),
        ),
        (
            "write_aio ENOSPC once",
            sv(&[
                "-c",
                "write -P 0x22 8M 64k",
                "-c",
                "write -P 0x23 8M 64k",
                "-c",
                "read -P 0x23 8M 64k",
                "blkdebug:nospc.conf:img.qcow2",
            ]),
        ),
        (
            // Writes of zeroes over what already reads as zeroes touch no
            // L2 table: a persistent l2_update error never fires.
            "l2_update never reached",
            sv(&[
                "-c",
                "write -z 1M 128k",
                "-c",
                "write -z -u 1M 64k",
                "-c",
                "read -P 0 1M 128k",
                "blkdebug:l2upd.conf:img.qcow2",
            ]),
        ),
        (
            "set-state then inject in state 2",
            vec![
                "-c".into(),
                "write -P 0x42 0 192k".into(),
                "-c".into(),
                "write -P 0x43 4M 4k".into(),
                "-c".into(),
                "read -P 0x42 0 192k".into(),
                json_rules(
                    "'set-state': [{'event': 'write_aio', 'new_state': 2}], 'inject-error': [{'event': 'write_aio', 'state': 2}]",
                ),
            ],
        ),
        (
            // `sector` limits the error to requests covering it.
            "sector",
            vec![
                "-c".into(),
                "write -P 0x51 0 4k".into(),
                "-c".into(),
                "write -P 0x52 0 4k".into(),
                json_rules(
                    "'inject-error': [{'event': 'write_aio', 'sector': 8, 'once': true}]",
                ),
            ],
        ),
        (
            "open -o rules",
            sv(&[
                "-c",
                "open -o driver=qcow2,file.driver=blkdebug,file.image.filename=img.qcow2,file.inject-error.0.event=l2_load,file.inject-error.0.errno=28",
                "-c",
                "read -P 0x12 4M 4k",
                "-c",
                "read -P 0x12 4M 4k",
            ]),
        ),
    ];
    for (name, args) in &cases {
        run_case(&Case {
            name,
            setup: &with_rules,
            args: args.clone(),
            images: vec![("img.qcow2", "qcow2")],
            stdout: true,
        });
    }
    // Configuration errors in QEMU's words.
    for conf in [
        "badevent.conf",
        "noevent.conf",
        "badkey.conf",
        "badgroup.conf",
        "badonce.conf",
        "missing.conf",
    ] {
        let name = format!("config {conf}");
        run_case(&Case {
            name: &name,
            setup: &with_rules,
            args: vec![
                "-c".into(),
                "read 0 512".into(),
                format!("blkdebug:{conf}:img.qcow2"),
            ],
            images: vec![("img.qcow2", "qcow2")],
            stdout: true,
        });
    }
}

/// Copy-on-read through a blkdebug node above the image (QEMU's
/// `driver=blkdebug,image.driver=qcow2` and the copy-on-read filter): a
/// `cor_write` error at a sector the copy does not cover never fires, one
/// it covers fails the read, as in qemu-io.
#[test]
fn blkdebug_copy_on_read() {
    let setup = |dir: &Path| {
        chain(dir);
        std::fs::write(
            dir.join("cor.conf"),
            "[inject-error]\nevent = \"cor_write\"\nsector = \"2048\"\n",
        )
        .unwrap();
    };
    for (name, open, read) in [
        (
            "above, uncovered",
            "open -C -o driver=blkdebug,config=cor.conf,image.driver=qcow2 top.qcow2",
            "read -P 0x05 64k 64k",
        ),
        (
            "above, covered",
            "open -C -o driver=blkdebug,config=cor.conf,image.driver=qcow2 top.qcow2",
            "read 960k 128k",
        ),
        (
            "filter",
            "open -o driver=copy-on-read,file.driver=blkdebug,file.config=cor.conf,file.image.driver=qcow2 top.qcow2",
            "read 960k 128k",
        ),
    ] {
        run_case(&Case {
            name,
            setup: &setup,
            args: sv(&["-c", open, "-c", read, "-c", "map"]),
            images: vec![("top.qcow2", "qcow2")],
            stdout: true,
        });
    }
}

/// A rule naming an event this engine never reports is refused with a
/// message saying so, not accepted and ignored.
#[test]
fn blkdebug_event_without_a_place_is_refused() {
    let d = tmpdir();
    let dir = d.path();
    plain(dir);
    std::fs::write(
        dir.join("rules.conf"),
        "[inject-error]\nevent = \"cluster_alloc_space\"\n",
    )
    .unwrap();
    let r = ours(
        dir,
        &["io", "-c", "read 0 512", "blkdebug:rules.conf:img.qcow2"],
    );
    assert_eq!(r.code, 1, "{}{}", r.stdout, r.stderr);
    assert!(
        r.stderr
            .contains("'cluster_alloc_space' has no place in this engine"),
        "{}",
        r.stderr
    );
    assert!(!r.stdout.contains("read 512/512"), "{}", r.stdout);
}

/// Breakpoints (`break`, `wait_break`, `resume`, `remove_break`) with
/// requests in flight: a write suspended at `write_aio` holds back a second
/// write to the same cluster, both complete after `resume`, in that order,
/// and the image is what qemu-io leaves.
#[test]
fn blkdebug_breakpoints() {
    for (name, script) in [
        (
            "same cluster",
            &[
                "break write_aio A",
                "aio_write -P 10 0x38000 0x2000",
                "wait_break A",
                "aio_write -P 11 0x32000 0x2000",
                "resume A",
                "aio_flush",
                "read -P 10 0x38000 0x2000",
                "read -P 11 0x32000 0x2000",
                "read -P 5 0x30000 0x2000",
            ][..],
        ),
        (
            "errors",
            &[
                "break foo A",
                "remove_break B",
                "resume A",
                "break write_aio A",
                "remove_break A",
                "write -P 12 0 4k",
            ][..],
        ),
    ] {
        let mut args = Vec::new();
        for c in script {
            args.push("-c".to_string());
            args.push(c.to_string());
        }
        args.push("blkdebug::top.qcow2".into());
        run_case(&Case {
            name,
            setup: &chain,
            args,
            images: vec![("top.qcow2", "qcow2")],
            stdout: true,
        });
    }
}

/// QEMU's compress filter (`driver=compress`): writes widened to whole
/// clusters and stored compressed, as qemu-io leaves them.
#[test]
fn compress_filter() {
    run_case(&Case {
        name: "compress filter",
        setup: &plain,
        args: sv(&[
            "-c",
            "open -o driver=compress,file.driver=qcow2,file.file.filename=img.qcow2",
            "-c",
            "write -P 0xbb 8M 229376",
            "-c",
            "write -P 0xcc 8405000 100000",
            "-c",
            "read -P 0xbb 8M 4096",
        ]),
        images: vec![("img.qcow2", "qcow2")],
        stdout: true,
    });
}

/// A qcow2 image inside a qcow2 image (`file.driver=qcow2`), a null-co
/// external data file, and the header's refcount lost (allocation at
/// offset 0 refused in QEMU's words), each as qemu-io does them.
#[test]
fn nested_null_data_file_and_offset_zero() {
    let nested = |dir: &Path| {
        plain(dir);
        let r = qemu_img(
            dir,
            &[
                "convert",
                "-f",
                "raw",
                "-O",
                "qcow2",
                "img.qcow2",
                "outer.qcow2",
            ],
        );
        assert_eq!(r.code, 0, "{}", r.stderr);
    };
    run_case(&Case {
        name: "nested",
        setup: &nested,
        args: sv(&[
            "-c",
            "read -P 0x11 0 4k",
            "-c",
            "write -P 0x44 4k 4k",
            "-c",
            "read -P 0x44 4k 4k",
            "json:{'driver': 'qcow2', 'file': {'driver': 'qcow2', 'file': {'filename': 'outer.qcow2'}}}",
        ]),
        images: vec![("outer.qcow2", "qcow2")],
        stdout: true,
    });
    let datafile = |dir: &Path| {
        let r = qemu_img(
            dir,
            &[
                "create",
                "-f",
                "qcow2",
                "-o",
                "data_file=img.data",
                "img.qcow2",
                "64M",
            ],
        );
        assert_eq!(r.code, 0, "{}", r.stderr);
    };
    run_case(&Case {
        name: "null-co data file",
        setup: &datafile,
        args: sv(&[
            "-c",
            "write -P 0x21 64k 128k",
            "-c",
            "read -P 0 64k 4k",
            "json:{'driver': 'qcow2', 'file': {'filename': 'img.qcow2'}, 'data-file': {'driver': 'null-co', 'size': '67108864'}}",
        ]),
        images: vec![],
        stdout: true,
    });
    let zero = |dir: &Path| {
        qemu_create(dir, "img.qcow2", 64 << 20, &ImgOpts::default(), None);
        // Refcounts of clusters 0..3 (header, refcount table and block, L1) lost.
        set_refcount(&p(dir, "img.qcow2"), 0, 0);
        set_refcount(&p(dir, "img.qcow2"), 1, 0);
    };
    run_case(&Case {
        name: "offset 0",
        setup: &zero,
        args: sv(&["-c", "write 64k 64k", "img.qcow2"]),
        images: vec![],
        stdout: true,
    });
}

/// blkdebug request limits above the image split write-zeroes and discard
/// requests as QEMU's block layer does (pieces below the alignment are
/// written as zeroes, or dropped for a discard): the image qemu-io leaves,
/// map included.
#[test]
fn blkdebug_limits_split_zeroes_and_discards() {
    let setup = |dir: &Path| {
        qemu_create(dir, "base.qcow2", 128 << 20, &ImgOpts::default(), None);
        qemu_io_script(dir, "base.qcow2", "qcow2", &sv(&["write -P 11 0 128M"])).ok("base");
        let r = qemu_img(
            dir,
            &[
                "create",
                "-f",
                "qcow2",
                "-o",
                "cluster_size=1M",
                "-b",
                "base.qcow2",
                "-F",
                "qcow2",
                "top.qcow2",
            ],
        );
        assert_eq!(r.code, 0, "{}", r.stderr);
        qemu_io_script(dir, "top.qcow2", "qcow2", &sv(&["write -P 22 0 110M"])).ok("top");
    };
    let o = "driver=blkdebug,image.driver=qcow2";
    for (name, limits, cmd) in [
        (
            "opt-write-zero",
            "align=512,max-transfer=64k,opt-write-zero=1M",
            "write -z 8003584 2093056",
        ),
        (
            "15M write-zero",
            "align=512,opt-write-zero=15M,max-write-zero=15M,opt-discard=15M,max-discard=15M",
            "write -z 32M 32M",
        ),
        (
            "15M discard",
            "align=512,opt-write-zero=15M,max-write-zero=15M,opt-discard=15M,max-discard=15M",
            "discard 80000001 30M",
        ),
    ] {
        let open = format!("open -o {o},{limits} blkdebug::top.qcow2");
        run_case(&Case {
            name,
            setup: &setup,
            args: sv(&["-c", &open, "-c", cmd, "-c", "map"]),
            images: vec![("top.qcow2", "qcow2")],
            stdout: true,
        });
    }
}

/// Copy-on-write of subclusters of clusters shared with an internal
/// snapshot (extended L2): the new cluster gets the span from the first
/// allocated subcluster to the last, allocated, as in qemu-io (the map
/// tells which subclusters are allocated).
#[test]
fn subcluster_cow_over_a_snapshot() {
    let setup = |dir: &Path| {
        let r = qemu_img(
            dir,
            &[
                "create",
                "-f",
                "qcow2",
                "-o",
                "extended_l2=on",
                "img.qcow2",
                "1M",
            ],
        );
        assert_eq!(r.code, 0, "{}", r.stderr);
        let mut script = Vec::new();
        for c in 0..6u64 {
            script.push(format!("write -q -z {}k 2k", 64 * c + 14));
            script.push(format!("write -q -P {} {}k 2k", 0xd0 + c, 64 * c + 26));
            script.push(format!("write -q -P {} {}k 2k", 0xe0 + c, 64 * c + 36));
        }
        qemu_io_script(dir, "img.qcow2", "qcow2", &script).ok("fill");
        let r = qemu_img(dir, &["snapshot", "-c", "snap1", "img.qcow2"]);
        assert_eq!(r.code, 0, "{}", r.stderr);
    };
    run_case(&Case {
        name: "subcluster COW over a snapshot",
        setup: &setup,
        args: sv(&[
            "-c",
            "write -q -P 0xf0 30k 1k",
            "-c",
            "write -q -P 0xf1 84k 1k",
            "-c",
            "write -q -P 0xf2 168k 1k",
            "-c",
            "write -q -P 0xf3 218k 1k",
            "-c",
            "write -q -P 0xf4 270k 1k",
            "-c",
            "write -q -P 0xf5 321k 1k",
            "img.qcow2",
        ]),
        images: vec![("img.qcow2", "qcow2")],
        stdout: true,
    });
}

/// An NBD export (`nbd:unix:SOCKET`, `nbd+unix:///?socket=`) served by
/// qemu-nbd, opened raw or as qcow2 by qemu-io and by ours: the same
/// reads, `info`, writes (then the same image), and QEMU's errors for a
/// missing server and for writing to a read-only export.
#[test]
fn nbd_exports() {
    if !tool_or_skip("qemu-nbd", &["--version"], "NBD client") {
        return;
    }
    let d = tmpdir();
    let dir = d.path();
    plain(dir);
    copy(dir, "img.qcow2", "q.qcow2");
    copy(dir, "img.qcow2", "o.qcow2");
    let serve = |image: &str, sock: &str, extra: &[&str]| {
        let _ = std::fs::remove_file(dir.join(sock));
        let path = dir.join(sock).display().to_string();
        let mut args = vec!["-t", "-k", path.as_str(), "-f", "qcow2"];
        args.extend(extra);
        args.push(image);
        let child = std::process::Command::new("qemu-nbd")
            .current_dir(dir)
            .args(&args)
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .spawn()
            .expect("qemu-nbd");
        let server = KillOnDrop(child);
        for _ in 0..250 {
            if dir.join(sock).exists() {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        assert!(dir.join(sock).exists(), "qemu-nbd did not start");
        server
    };
    let ro = serve("img.qcow2", "ro.sock", &["-r"]);
    // The image file itself exported raw: qcow2 over NBD.
    let file = serve("img.qcow2", "file.sock", &["-r", "-f", "raw"]);
    let file_name = format!("nbd:unix:{}", dir.join("file.sock").display());
    let ro_name = format!("nbd:unix:{}", dir.join("ro.sock").display());
    let uri = format!("nbd+unix:///?socket={}", dir.join("ro.sock").display());
    for (args, what) in [
        (
            vec![
                "-f",
                "raw",
                "-r",
                "-c",
                "read -P 0x11 0 4k",
                "-c",
                "info",
                &ro_name,
            ],
            "raw read-only",
        ),
        (
            vec![
                "-r",
                "-c",
                "read -P 0x12 4M 64k",
                "-c",
                "read -P 0 1M 64k",
                &uri,
            ],
            "URI, format probed",
        ),
        (
            vec!["-f", "raw", "-c", "read 0 512", &ro_name],
            "read-only export opened read-write",
        ),
        (
            vec![
                "-r",
                "-f",
                "qcow2",
                "-c",
                "read -P 0x11 0 192k",
                "-c",
                "map",
                &file_name,
            ],
            "qcow2 over NBD",
        ),
        (
            vec![
                "-f",
                "raw",
                "-c",
                "read 0 512",
                "nbd:unix:/nonexistent.sock",
            ],
            "no server",
        ),
    ] {
        let q = qemu_io(dir, &args);
        let mut oa = vec!["io"];
        oa.extend(&args);
        let o = ours(dir, &oa);
        assert_eq!(filtered(&o.stdout), filtered(&q.stdout), "{what}: stdout");
        assert_eq!(
            o.stderr.replace("qcow2:", "qemu-io:"),
            q.stderr,
            "{what}: stderr"
        );
        assert_eq!(o.code, q.code, "{what}: exit status");
    }
    drop(ro);
    drop(file);
    // Writes through a writable export, each tool on its own copy.
    for (image, who) in [("q.qcow2", "qemu"), ("o.qcow2", "ours")] {
        let rw = serve(image, "rw.sock", &[]);
        let name = format!("nbd:unix:{}", dir.join("rw.sock").display());
        let cmds = [
            "-c",
            "write -P 0x66 100000 70000",
            "-c",
            "flush",
            "-c",
            "read -P 0x66 100000 70000",
        ];
        let mut args = vec!["-f", "raw"];
        args.extend(cmds);
        args.push(&name);
        let r = if who == "qemu" {
            qemu_io(dir, &args)
        } else {
            let mut oa = vec!["io"];
            oa.extend(&args);
            ours(dir, &oa)
        };
        assert_eq!(r.code, 0, "{who}: {}{}", r.stdout, r.stderr);
        drop(rw);
    }
    let cmp = qemu_img(dir, &["compare", "q.qcow2", "o.qcow2"]);
    assert_eq!(cmp.code, 0, "images differ: {}{}", cmp.stdout, cmp.stderr);
}

/// A server process killed when the test ends, panicking or not.
struct KillOnDrop(std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}
