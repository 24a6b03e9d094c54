//! Encrypted images (LUKS and QEMU's legacy AES) against QEMU: the same
//! qemu-io script through qemu-io and `qcow2 io` on copies of one image
//! made by qemu-img (same master key, so the files must come out byte for
//! byte equal), images made by `qcow2 create` used by qemu-io and described
//! by `qemu-img info` as qemu-img's own, `qemu-img info` / `check` / `map`
//! output equal to ours, the errors of a missing or wrong passphrase, and
//! `convert` / `compare` with secrets.
//! Needs qemu-img and qemu-io (missing: fails under CI, else "skipped").

mod common;
use common::*;
use std::path::Path;

const OBJ: &str = "secret,id=sec0,data=astrochicken";
/// A LUKS image with the defaults, fast to unlock.
const LUKS: &str = "encrypt.format=luks,encrypt.key-secret=sec0,encrypt.iter-time=10";

fn tools() -> bool {
    tool_or_skip("qemu-img", &["--version"], "encryption")
        && tool_or_skip("qemu-io", &["--version"], "encryption")
}

fn spec(name: &str) -> String {
    format!("driver=qcow2,file.filename={name},encrypt.key-secret=sec0")
}

/// `qemu-img create` of an encrypted image with `-o opts`.
fn qemu_create_enc(dir: &Path, name: &str, opts: &str, size: &str) {
    qemu_img(
        dir,
        &[
            "create", "-q", "-f", "qcow2", "--object", OBJ, "-o", opts, name, size,
        ],
    )
    .ok("qemu-img create (encrypted)");
}

/// The script through `prog` (qemu-io or `qcow2 io`) with the secret.
fn script(dir: &Path, ours_too: bool, name: &str, cmds: &[&str]) -> Run {
    let s = spec(name);
    let mut args: Vec<&str> = Vec::new();
    if ours_too {
        args.push("io");
    }
    args.extend(["--object", OBJ, "--image-opts"]);
    for c in cmds {
        args.push("-c");
        args.push(c);
    }
    args.push(&s);
    if ours_too {
        ours(dir, &args)
    } else {
        qemu_io(dir, &args)
    }
}

const SCRIPT: &[&str] = &[
    "write -P 0x11 0 64k",
    "write -P 0x22 100 300",
    "write -P 0x33 65000 2000",
    "write -z 128k 64k",
    "write -P 0x44 200k 5000",
    "write -z 210000 1000",
    "read -P 0x22 100 300",
    "read -P 0x11 0 100",
    "read -P 0x33 65000 2000",
    "read -P 0 128k 64k",
    "read -P 0x44 200k 5000",
    "discard 0 64k",
    "read -P 0 0 64k",
    "map",
];

/// Runs SCRIPT through qemu-io and `qcow2 io` on copies of `base`: same
/// output, same file bytes, clean check.
fn script_case(dir: &Path, base: &str) {
    let (q, o) = (format!("q-{base}"), format!("o-{base}"));
    copy(dir, base, &q);
    copy(dir, base, &o);
    let rq = script(dir, false, &q, SCRIPT);
    let ro = script(dir, true, &o, SCRIPT);
    assert_eq!(
        rq.code, ro.code,
        "{base}: exit codes\n{}\n{}",
        rq.stderr, ro.stderr
    );
    assert_eq!(
        result_lines(&rq.stdout),
        result_lines(&ro.stdout),
        "{base}: outputs differ\nqemu-io stderr: {}\nours stderr: {}",
        rq.stderr,
        ro.stderr
    );
    assert!(!rq.stdout.contains("fail"), "{base}: {}", rq.stdout);
    let (a, b) = (
        std::fs::read(dir.join(&q)).unwrap(),
        std::fs::read(dir.join(&o)).unwrap(),
    );
    if base.starts_with("l2") {
        // With subclusters, a write-zeroes that is not sector aligned is
        // split differently (QEMU's block layer pads it to sectors before
        // the driver sees it): same content, subcluster bits may differ.
        let c = qemu_img(
            dir,
            &[
                "compare",
                "--object",
                OBJ,
                "--image-opts",
                &spec(&q),
                &spec(&o),
            ],
        );
        assert_eq!(c.code, 0, "{base}: {}{}", c.stdout, c.stderr);
    } else {
        assert!(a == b, "{base}: files differ after the same script");
    }
    let c = qemu_img(dir, &["check", "--object", OBJ, "--image-opts", &spec(&o)]);
    assert_eq!(
        c.code, 0,
        "{base}: qemu-img check: {}{}",
        c.stdout, c.stderr
    );
}

#[test]
fn scripts_match_qemu_io_byte_for_byte() {
    if !tools() {
        return;
    }
    let d = tmpdir();
    let dir = d.path();
    let cases = [
        ("luks.qcow2", LUKS),
        (
            "cbc.qcow2",
            "encrypt.format=luks,encrypt.key-secret=sec0,encrypt.iter-time=10,\
             encrypt.cipher-alg=aes-128,encrypt.cipher-mode=cbc,encrypt.ivgen-alg=essiv,\
             encrypt.ivgen-hash-alg=sha256,encrypt.hash-alg=sha512",
        ),
        (
            "l2.qcow2",
            "encrypt.format=luks,encrypt.key-secret=sec0,encrypt.iter-time=10,\
             extended_l2=on,cluster_size=32k",
        ),
        ("aes.qcow2", "encryption=on,encrypt.key-secret=sec0"),
    ];
    for (name, opts) in cases {
        qemu_create_enc(dir, name, opts, "1M");
        script_case(dir, name);
    }
    // Copy-on-write over a backing file, and of a cluster shared with a
    // snapshot: the copy is re-encrypted for its new place.
    qemu_create_enc(dir, "snap.qcow2", LUKS, "1M");
    script(dir, false, "snap.qcow2", &["write -P 0x55 0 192k"]).ok("qemu-io fill");
    qemu_img(
        dir,
        &[
            "snapshot",
            "--object",
            OBJ,
            "--image-opts",
            "-c",
            "s1",
            &spec("snap.qcow2"),
        ],
    )
    .ok("snapshot");
    script_case(dir, "snap.qcow2");
}

/// QEMU stores `write -c` clusters of an encrypted image compressed but
/// not encrypted (its compressed write path never encrypts): we read such
/// clusters as QEMU does, but write compressed requests to an encrypted
/// image as normal, encrypted clusters, so that no guest data lies in the
/// file in clear.
#[test]
fn compressed_writes_stay_encrypted() {
    if !tools() {
        return;
    }
    let d = tmpdir();
    let dir = d.path();
    qemu_create_enc(dir, "c.qcow2", LUKS, "1M");
    let pattern = [0x3cu8; 65536];
    let has_clear = |name: &str| {
        let b = std::fs::read(dir.join(name)).unwrap();
        b.windows(4096).step_by(4096).any(|w| w == &pattern[..4096])
    };
    // QEMU's compressed cluster (plain text inside) reads right through us.
    script(dir, false, "c.qcow2", &["write -c -P 0x3c 0 64k"]).ok("qemu-io write -c");
    let m = qemu_img(
        dir,
        &[
            "map",
            "--output=json",
            "--object",
            OBJ,
            "--image-opts",
            &spec("c.qcow2"),
        ],
    );
    assert!(m.stdout.contains("\"compressed\": true"), "{}", m.stdout);
    let r = script(dir, true, "c.qcow2", &["read -P 0x3c 0 64k"]).ok("ours read");
    assert!(!r.stdout.contains("fail"), "{}", r.stdout);
    // Ours: written, readable by QEMU, not compressed, and not in clear.
    let r = script(dir, true, "c.qcow2", &["write -c -P 0x3c 64k 64k"]).ok("ours write -c");
    assert!(r.stdout.contains("wrote 65536/65536"), "{}", r.stdout);
    let r = script(dir, false, "c.qcow2", &["read -P 0x3c 64k 64k"]).ok("qemu-io read");
    assert!(!r.stdout.contains("fail"), "{}", r.stdout);
    let m = qemu_img(
        dir,
        &[
            "map",
            "--output=json",
            "--object",
            OBJ,
            "--image-opts",
            &spec("c.qcow2"),
        ],
    );
    assert!(
        m.stdout.contains("{ \"start\": 65536, \"length\": 65536, \"depth\": 0, \"present\": true, \"zero\": false, \"data\": true, \"compressed\": false}"),
        "{}",
        m.stdout
    );
    // The only clear copy of the pattern in the file is QEMU's compressed
    // cluster (compressed, so not a run of the pattern either).
    assert!(!has_clear("c.qcow2"), "guest data in clear in the file");
}

#[test]
fn created_images_are_qemus() {
    if !tools() {
        return;
    }
    let d = tmpdir();
    let dir = d.path();
    for (i, opts) in [
        LUKS,
        "encrypt.format=luks,encrypt.key-secret=sec0,encrypt.iter-time=10,encrypt.cipher-alg=aes-128,\
         encrypt.cipher-mode=cbc,encrypt.ivgen-alg=essiv,encrypt.ivgen-hash-alg=sha256,encrypt.hash-alg=sha1",
        "encrypt.format=luks,encrypt.key-secret=sec0,encrypt.iter-time=10,cluster_size=4k,compat=0.10",
        "encryption=on,encrypt.key-secret=sec0",
    ]
    .iter()
    .enumerate()
    {
        let (q, o) = (format!("q{i}.qcow2"), format!("o{i}.qcow2"));
        let rq = qemu_img(dir, &["create", "-f", "qcow2", "--object", OBJ, "-o", opts, &q, "2M"]);
        let ro = ours(dir, &["create", "-f", "qcow2", "--object", OBJ, "-o", opts, &o, "2M"]);
        assert_eq!(rq.code, 0, "{opts}: {}", rq.stderr);
        assert_eq!(ro.code, 0, "{opts}: {}", ro.stderr);
        assert_eq!(
            rq.stdout.replace(&q, "X"),
            ro.stdout.replace(&o, "X"),
            "{opts}: Formatting line"
        );
        // qemu-img describes both alike (but for the random uuid and the
        // benchmarked iteration counts).
        let norm = |name: &str| {
            let r = qemu_img(dir, &["info", "--output=json", name]).ok("qemu-img info");
            r.stdout
                .lines()
                .filter(|l| {
                    !["\"uuid\"", "\"iters\"", "\"master-key-iters\"", "size\"", "\"filename\""]
                        .iter()
                        .any(|k| l.contains(k))
                })
                .collect::<Vec<_>>()
                .join("\n")
        };
        assert_eq!(norm(&q), norm(&o), "{opts}: qemu-img info");
        script(dir, false, &o, &["write -P 0x66 4096 8192"]).ok("qemu-io on ours");
        let r = script(dir, true, &o, &["read -P 0x66 4096 8192", "read -P 0 0 4096"]).ok("ours");
        assert!(!r.stdout.contains("fail"), "{opts}: {}", r.stdout);
        let c = qemu_img(dir, &["check", "--object", OBJ, "--image-opts", &spec(&o)]);
        assert_eq!(c.code, 0, "{opts}: qemu-img check: {}{}", c.stdout, c.stderr);
        // Our check counts the LUKS header as the image's (no leaks), and
        // a repair leaves it alone.
        let c = ours(dir, &["check", "--object", OBJ, "--image-opts", &spec(&o)]);
        assert_eq!(c.code, 0, "{opts}: qcow2 check: {}{}", c.stdout, c.stderr);
        ours(dir, &["check", "-r", "all", "--object", OBJ, "--image-opts", &spec(&o)])
            .ok("qcow2 check -r all");
        let r = script(dir, false, &o, &["read -P 0x66 4096 8192"]).ok("qemu-io after repair");
        assert!(!r.stdout.contains("fail"), "{opts}: {}", r.stdout);
    }
}

#[test]
fn info_check_and_map_match_qemu() {
    if !tools() {
        return;
    }
    let d = tmpdir();
    let dir = d.path();
    for (name, opts) in [
        ("i.qcow2", LUKS),
        ("a.qcow2", "encryption=on,encrypt.key-secret=sec0"),
    ] {
        qemu_create_enc(dir, name, opts, "4M");
        script(
            dir,
            false,
            name,
            &["write -P 1 64k 128k", "write -z 1M 64k"],
        )
        .ok("fill");
        for args in [vec!["info"], vec!["info", "--output=json"]] {
            let mut a = args.clone();
            a.push(name);
            let q = qemu_img(dir, &a);
            let o = ours(dir, &a);
            assert_eq!(q.stdout, o.stdout, "{args:?} {name}");
            assert_eq!(q.code, o.code);
        }
        let s = spec(name);
        for args in [
            vec!["map", "--output=json", "--object", OBJ, "--image-opts", &s],
            vec!["map", "--object", OBJ, "--image-opts", &s],
            vec!["check", "--object", OBJ, "--image-opts", &s],
            vec![
                "check",
                "--output=json",
                "--object",
                OBJ,
                "--image-opts",
                &s,
            ],
        ] {
            assert_same_as_qemu_img(dir, &args, name);
        }
    }
}

#[test]
fn errors_match_qemu() {
    if !tools() {
        return;
    }
    let d = tmpdir();
    let dir = d.path();
    qemu_create_enc(dir, "e.qcow2", LUKS, "1M");
    let s = spec("e.qcow2");
    let s1 = "driver=qcow2,file.filename=e.qcow2,encrypt.key-secret=sec1".to_string();
    let cases: Vec<Vec<&str>> = vec![
        vec!["-c", "read 0 512", "e.qcow2"],
        vec![
            "--object",
            "secret,id=sec0,data=platypus",
            "--image-opts",
            &s,
            "-c",
            "read 0 512",
        ],
        vec!["--object", OBJ, "--image-opts", &s1, "-c", "read 0 512"],
        vec![
            "--object",
            "secret,id=sec0",
            "--image-opts",
            &s,
            "-c",
            "read 0 512",
        ],
        vec![
            "--object",
            "secret,id=sec0,format=base64,data=!!",
            "--image-opts",
            &s,
        ],
        vec![
            "--object",
            "secret,id=sec0,format=base64,data=YXN0cm9jaGlja2Vu",
            "--image-opts",
            &s,
            "-c",
            "read -P 0 0 512",
        ],
    ];
    for c in cases {
        let q = qemu_io(dir, &c);
        let mut a = vec!["io"];
        a.extend(&c);
        let o = ours(dir, &a);
        assert_same_run(&q, &o, "qemu-io", &format!("{c:?}"));
    }
    // qemu-img create's option errors.
    for opts in [
        "encrypt.format=luks",
        "encryption=on,encrypt.format=luks,encrypt.key-secret=sec0",
        "encrypt.key-secret=sec0",
        "encrypt.format=foo,encrypt.key-secret=sec0",
        "encrypt.format=luks,encrypt.key-secret=nosuch",
    ] {
        let q = qemu_img(
            dir,
            &[
                "create", "-f", "qcow2", "--object", OBJ, "-o", opts, "c.qcow2", "1M",
            ],
        );
        let o = ours(
            dir,
            &[
                "create", "-f", "qcow2", "--object", OBJ, "-o", opts, "c.qcow2", "1M",
            ],
        );
        assert_same_run(&q, &o, "qemu-img", opts);
    }
}

#[test]
fn convert_and_compare_with_secrets() {
    if !tools() {
        return;
    }
    let d = tmpdir();
    let dir = d.path();
    qemu_img(dir, &["create", "-q", "-f", "qcow2", "plain.qcow2", "2M"]).ok("create");
    qemu_io(
        dir,
        &[
            "-c",
            "write -P 7 0 300k",
            "-c",
            "write -P 9 1M 4k",
            "plain.qcow2",
        ],
    )
    .ok("fill");
    // Plain to encrypted, by us; qemu-img compares equal and checks clean.
    for (name, extra) in [("enc.qcow2", ""), ("encp.qcow2", ",preallocation=metadata")] {
        let o = format!("encrypt.format=luks,encrypt.key-secret=sec0,encrypt.iter-time=10{extra}");
        ours(
            dir,
            &[
                "convert",
                "-O",
                "qcow2",
                "--object",
                OBJ,
                "-o",
                &o,
                "plain.qcow2",
                name,
            ],
        )
        .ok("convert to encrypted");
        let c = qemu_img(
            dir,
            &[
                "compare",
                "--object",
                OBJ,
                "--image-opts",
                "driver=qcow2,file.filename=plain.qcow2",
                &spec(name),
            ],
        );
        assert_eq!(c.code, 0, "{name}: {}{}", c.stdout, c.stderr);
        let c = qemu_img(
            dir,
            &["check", "--object", OBJ, "--image-opts", &spec(name)],
        );
        assert_eq!(c.code, 0, "{name}: {}{}", c.stdout, c.stderr);
    }
    // Encrypted to raw, by both; same bytes. Our compare with secrets.
    let s = spec("enc.qcow2");
    for (prog, out) in [("qemu-img", "q.raw"), (qcow2_bin(), "o.raw")] {
        let mut a = vec!["convert"];
        a.extend(["-O", "raw", "--object", OBJ, "--image-opts", &s, out]);
        run_in(dir, prog, &a).ok("convert to raw");
    }
    assert_same_bytes(dir, "q.raw", "o.raw", "raw images converted back");
    let r = ours(
        dir,
        &[
            "compare",
            "--object",
            OBJ,
            "--image-opts",
            &s,
            "driver=raw,file.filename=o.raw",
        ],
    );
    assert_eq!(r.code, 0, "{}{}", r.stdout, r.stderr);
    assert_eq!(r.stdout, "Images are identical.\n");
}
