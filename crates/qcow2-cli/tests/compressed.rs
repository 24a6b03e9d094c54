//! Compressed writes against QEMU: the same `write -c` scripts through
//! qemu-io and `qcow2 io` on copies of one image, and `qcow2 convert -c`
//! against `qemu-img convert -c`. Judged by `qemu-img compare` (QEMU
//! decompresses our clusters), `qemu-img check` (clean, no leaks), the
//! allocation map apart from host offsets (compressed in the same places),
//! reads through qemu-io of our image, and the file size.

mod common;
use common::*;

fn s(v: &[String]) -> Vec<String> {
    v.to_vec()
}

fn file_len(dir: &std::path::Path, name: &str) -> u64 {
    std::fs::metadata(dir.join(name)).expect("stat").len()
}

/// The `write -c` script for cluster size `cs` (v3: with a zero cluster).
fn write_c_script(cs: u64, v3: bool) -> (Vec<String>, Vec<String>, Vec<String>) {
    let prefill = vec![
        format!("write -P 0x44 {} {cs}", 4 * cs),
        if v3 {
            format!("write -z {} {cs}", 5 * cs)
        } else {
            format!("discard {} {cs}", 5 * cs)
        },
    ];
    let script = vec![
        format!("write -c -P 1 0 {cs}"),
        format!("write -c -P 2 {cs} {}", 2 * cs),
        // Zero data is stored compressed too.
        format!("write -c -P 0 {} {cs}", 3 * cs),
        // Over a compressed cluster, a normal one: EIO.
        format!("write -c -P 3 0 {cs}"),
        format!("write -c -P 5 {} {cs}", 4 * cs),
        // Over a zero (v3) or discarded (v2) cluster: stored.
        format!("write -c -P 6 {} {cs}", 5 * cs),
        // Partial clusters: EINVAL.
        format!("write -c -P 7 {} {}", 6 * cs, cs / 2),
        format!("write -c -P 7 {} {cs}", 6 * cs + 512),
        // Many clusters: several share a host cluster.
        format!("write -c -P 9 {} {}", 8 * cs, 8 * cs),
        format!("write -c -z {} {cs}", 16 * cs),
        // A normal write over a compressed cluster.
        format!("write -P 0x0a {cs} {cs}"),
        format!("write -c -P 0x0b {} {cs}", 17 * cs),
        format!("read -P 1 0 {cs}"),
        format!("read -P 0x0a {cs} {cs}"),
        format!("read -P 2 {} {cs}", 2 * cs),
        format!("read -P 0 {} {cs}", 3 * cs),
        format!("read -P 9 {} {}", 8 * cs, 8 * cs),
    ];
    let check = vec![
        format!("read -P 1 0 {cs}"),
        format!("read -P 2 {} {cs}", 2 * cs),
        format!("read -P 6 {} {cs}", 5 * cs),
        format!("read -P 9 {} {}", 8 * cs, 8 * cs),
        format!("read -P 0x0b {} {cs}", 17 * cs),
    ];
    (prefill, script, check)
}

fn write_c_case(o: &ImgOpts) {
    let d = tmpdir();
    let dir = d.path();
    let cs = o.cluster_size;
    let v3 = o.compat == "1.1";
    let (prefill, script, check) = write_c_script(cs, v3);
    qemu_create(dir, "img.qcow2", 32 * cs, o, None);
    qemu_io_script(dir, "img.qcow2", "qcow2", &prefill).ok("prefill");
    copy(dir, "img.qcow2", "q.qcow2");
    copy(dir, "img.qcow2", "o.qcow2");
    let q = qemu_io_script(dir, "q.qcow2", "qcow2", &script);
    let r = ours_io_script(dir, "o.qcow2", &["-f", "qcow2"], &s(&script));
    assert_eq!(
        result_lines(&r.stdout),
        result_lines(&q.stdout),
        "{o:?}: output\n--- stderr:\n{}",
        r.stderr
    );
    assert_eq!(r.code, q.code, "{o:?}: exit status");
    let cmp = qemu_img(
        dir,
        &[
            "compare", "-f", "qcow2", "-F", "qcow2", "q.qcow2", "o.qcow2",
        ],
    );
    assert_eq!(cmp.code, 0, "{o:?}: content: {}{}", cmp.stdout, cmp.stderr);
    let (qm, om) = (qemu_map(dir, "q.qcow2"), qemu_map(dir, "o.qcow2"));
    assert_eq!(
        map_without_offsets(&om),
        map_without_offsets(&qm),
        "{o:?}: map\n--- ours:\n{om}--- qemu:\n{qm}"
    );
    assert!(om.contains("\"compressed\": true"), "{o:?}: {om}");
    assert_qemu_check_clean(dir, "o.qcow2", &format!("{o:?}"));
    let rd = qemu_io_script(dir, "o.qcow2", "qcow2", &check);
    assert!(
        rd.code == 0 && !rd.stdout.contains("fail") && !rd.stdout.contains("Pattern"),
        "{o:?}: qemu-io reads of our image:\n{}{}",
        rd.stdout,
        rd.stderr
    );
    let (ql, ol) = (file_len(dir, "q.qcow2"), file_len(dir, "o.qcow2"));
    assert!(
        ol <= ql + 2 * cs.max(65536),
        "{o:?}: our file {ol} bytes, qemu's {ql}"
    );
}

#[test]
fn write_c_matches_qemu() {
    let mut cases = Vec::new();
    for compat in ["0.10", "1.1"] {
        for cs in [512u64, 4096, 65536, 2 << 20] {
            for ext in [false, true] {
                for zstd in [false, true] {
                    let o = ImgOpts {
                        compat,
                        cluster_size: cs,
                        extended_l2: ext,
                        zstd,
                        ..ImgOpts::default()
                    };
                    if o.valid() {
                        cases.push(o);
                    }
                }
            }
        }
    }
    // Narrow refcounts: a host cluster holds as many compressed clusters as
    // its refcount can count.
    for rb in [1u32, 2, 64] {
        cases.push(ImgOpts {
            cluster_size: 4096,
            refcount_bits: rb,
            ..ImgOpts::default()
        });
    }
    let f = run_cases(&cases, workers(), write_c_case);
    assert_no_failures("write -c", cases.len(), &f);
}

/// Deterministic pseudo-random bytes (xorshift).
fn noise(seed: u64, n: usize) -> Vec<u8> {
    let mut x = seed | 1;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect()
}

/// Text-like data: compressible, with matches far back (beyond 4 KiB).
fn text(seed: u64, n: usize) -> Vec<u8> {
    const WORDS: [&str; 12] = [
        "qcow2 ",
        "cluster ",
        "refcount ",
        "table ",
        "the ",
        "of ",
        "compressed ",
        "data\n",
        "zlib ",
        "zstd ",
        "image ",
        "guest ",
    ];
    let r = noise(seed, n);
    let mut out = Vec::with_capacity(n + 16);
    let mut i = 0;
    while out.len() < n {
        out.extend_from_slice(WORDS[r[i % r.len()] as usize % WORDS.len()].as_bytes());
        i += 1;
    }
    out.truncate(n);
    out
}

/// A raw source: text, random (incompressible) data, patterns, zero runs,
/// a cluster half data half zeroes; size not cluster aligned.
fn raw_source(dir: &std::path::Path, name: &str) {
    let mut v = Vec::new();
    v.extend(text(1, 300 << 10));
    v.extend(noise(2, 200 << 10));
    v.extend(vec![0u8; 256 << 10]);
    v.extend(vec![0x5au8; 100 << 10]);
    v.extend(vec![0u8; 1 << 20]);
    v.extend(text(3, 32 << 10));
    v.extend(vec![0u8; 32 << 10]);
    v.extend(noise(4, 70000));
    std::fs::write(dir.join(name), v).expect("write raw source");
}

fn qcow2_source(dir: &std::path::Path, name: &str) {
    qemu_create(dir, name, 4 << 20, &ImgOpts::default(), None);
    qemu_io_script(
        dir,
        name,
        "qcow2",
        &[
            "write -P 0x11 0 512k".to_string(),
            "write -c -P 0x22 512k 128k".to_string(),
            "write -z 640k 64k".to_string(),
            "write -P 0 768k 64k".to_string(),
            "write -P 0x33 1000k 10k".to_string(),
            "write -P 0x44 3M 1M".to_string(),
        ],
    )
    .ok("fill qcow2 source");
}

#[derive(Debug)]
struct ConvCase {
    src: &'static str,
    o: ImgOpts,
}

fn convert_case(c: &ConvCase) {
    let d = tmpdir();
    let dir = d.path();
    let (src, fmt) = if c.src == "raw" {
        raw_source(dir, "src.raw");
        ("src.raw", "raw")
    } else {
        qcow2_source(dir, "src.qcow2");
        ("src.qcow2", "qcow2")
    };
    let ostr = c.o.o();
    let args = |out: &'static str| -> Vec<&str> {
        vec![
            "convert", "-c", "-f", fmt, "-O", "qcow2", "-o", &ostr, src, out,
        ]
    };
    qemu_img(dir, &args("q.qcow2")).ok("qemu-img convert -c");
    let r = ours(dir, &args("o.qcow2"));
    assert_eq!(
        r.code, 0,
        "{c:?}: qcow2 convert -c: {}{}",
        r.stdout, r.stderr
    );
    for (other, ofmt) in [("q.qcow2", "qcow2"), (src, fmt)] {
        let cmp = qemu_img(dir, &["compare", "-F", ofmt, "o.qcow2", other]);
        assert_eq!(
            cmp.code, 0,
            "{c:?}: vs {other}: {}{}",
            cmp.stdout, cmp.stderr
        );
    }
    let (qm, om) = (qemu_map(dir, "q.qcow2"), qemu_map(dir, "o.qcow2"));
    assert_eq!(
        map_without_offsets(&om),
        map_without_offsets(&qm),
        "{c:?}: map\n--- ours:\n{om}--- qemu:\n{qm}"
    );
    assert_qemu_check_clean(dir, "o.qcow2", &format!("{c:?}"));
    let cs = c.o.cluster_size;
    let (ql, ol) = (file_len(dir, "q.qcow2"), file_len(dir, "o.qcow2"));
    assert!(
        ol <= ql + ql / 50 + 4 * cs.max(4096),
        "{c:?}: our file {ol} bytes, qemu's {ql}"
    );
}

#[test]
fn convert_c_matches_qemu() {
    let mut cases = Vec::new();
    for src in ["raw", "qcow2"] {
        for (compat, cs, zstd, ext) in [
            ("1.1", 65536u64, false, false),
            ("1.1", 65536, true, false),
            ("1.1", 4096, false, false),
            ("1.1", 512, true, false),
            ("1.1", 65536, false, true),
            ("0.10", 65536, false, false),
            ("1.1", 2 << 20, false, false),
        ] {
            cases.push(ConvCase {
                src,
                o: ImgOpts {
                    compat,
                    cluster_size: cs,
                    zstd,
                    extended_l2: ext,
                    ..ImgOpts::default()
                },
            });
        }
    }
    let f = run_cases(&cases, workers(), convert_case);
    assert_no_failures("convert -c", cases.len(), &f);
}

#[test]
fn convert_c_to_raw_refused() {
    let d = tmpdir();
    let dir = d.path();
    raw_source(dir, "src.raw");
    let r = ours(dir, &["convert", "-c", "-O", "raw", "src.raw", "o.raw"]);
    assert_ne!(r.code, 0);
    assert!(
        r.stderr
            .contains("Compression not supported for this file format"),
        "{}",
        r.stderr
    );
}

/// `convert -c -B`: only the source's top layer is copied (compressed),
/// zero data there becomes zero clusters, the rest stays unallocated over
/// the new backing file.
#[test]
fn convert_c_with_backing_matches_qemu() {
    let d = tmpdir();
    let dir = d.path();
    qemu_create(dir, "b.qcow2", 2 << 20, &ImgOpts::default(), None);
    qemu_io_script(dir, "b.qcow2", "qcow2", &["write -P 0xbb 0 2M".to_string()]).ok("base");
    qemu_create(
        dir,
        "s.qcow2",
        3 << 20,
        &ImgOpts {
            cluster_size: 4096,
            ..ImgOpts::default()
        },
        Some(("b.qcow2", "qcow2")),
    );
    let fill: Vec<String> = [
        "write -P 1 0 64k",
        "write -z 128k 64k",
        "write -P 0 256k 64k",
        "write -P 2 448k 4k",
        "write -P 3 512k 100k",
        "write -P 0 2304k 64k",
        "write -z 2432k 64k",
        "write -z 1M 64k",
        "write -P 4 2560k 8k",
    ]
    .iter()
    .map(|x| x.to_string())
    .collect();
    qemu_io_script(dir, "s.qcow2", "qcow2", &fill).ok("fill source");
    let args = |out: &'static str| -> Vec<&'static str> {
        vec![
            "convert", "-c", "-O", "qcow2", "-B", "b.qcow2", "-F", "qcow2", "s.qcow2", out,
        ]
    };
    qemu_img(dir, &args("q.qcow2")).ok("qemu-img convert -c -B");
    let r = ours(dir, &args("o.qcow2"));
    assert_eq!(r.code, 0, "qcow2 convert -c -B: {}{}", r.stdout, r.stderr);
    let cmp = qemu_img(dir, &["compare", "o.qcow2", "q.qcow2"]);
    assert_eq!(cmp.code, 0, "{}{}", cmp.stdout, cmp.stderr);
    let cmp = qemu_img(dir, &["compare", "o.qcow2", "s.qcow2"]);
    assert_eq!(cmp.code, 0, "{}{}", cmp.stdout, cmp.stderr);
    let (qm, om) = (qemu_map(dir, "q.qcow2"), qemu_map(dir, "o.qcow2"));
    assert_eq!(
        map_without_offsets(&om),
        map_without_offsets(&qm),
        "map\n--- ours:\n{om}--- qemu:\n{qm}"
    );
    assert_qemu_check_clean(dir, "o.qcow2", "convert -c -B");
}

/// `write -c` over clusters that read from a backing file, and the short
/// last cluster of an image whose size is not cluster aligned.
#[test]
fn write_c_backing_and_short_tail_matches_qemu() {
    let d = tmpdir();
    let dir = d.path();
    let size = (1u64 << 20) + 3 * 512;
    qemu_create(dir, "b.qcow2", size, &ImgOpts::default(), None);
    qemu_io_script(dir, "b.qcow2", "qcow2", &["write -P 0xbb 0 1M".to_string()]).ok("base");
    qemu_create(
        dir,
        "img.qcow2",
        size,
        &ImgOpts::default(),
        Some(("b.qcow2", "qcow2")),
    );
    copy(dir, "img.qcow2", "q.qcow2");
    copy(dir, "img.qcow2", "o.qcow2");
    let script: Vec<String> = [
        "write -c -P 1 0 64k",
        "write -c -P 2 1M 1536",
        "write -c -P 3 1M 512",
        "write -c -P 4 960k 66048",
        "read -P 1 0 64k",
        "read -P 0xbb 64k 64k",
    ]
    .iter()
    .map(|x| x.to_string())
    .collect();
    let q = qemu_io_script(dir, "q.qcow2", "qcow2", &script);
    let r = ours_io_script(dir, "o.qcow2", &["-f", "qcow2"], &script);
    assert_eq!(
        result_lines(&r.stdout),
        result_lines(&q.stdout),
        "{}",
        r.stderr
    );
    assert_eq!(r.code, q.code);
    let cmp = qemu_img(dir, &["compare", "o.qcow2", "q.qcow2"]);
    assert_eq!(cmp.code, 0, "{}{}", cmp.stdout, cmp.stderr);
    let (qm, om) = (qemu_map(dir, "q.qcow2"), qemu_map(dir, "o.qcow2"));
    assert_eq!(
        map_without_offsets(&om),
        map_without_offsets(&qm),
        "map\n--- ours:\n{om}--- qemu:\n{qm}"
    );
    assert_qemu_check_clean(dir, "o.qcow2", "write -c over backing");
}
