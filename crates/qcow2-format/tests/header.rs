//! Header parsing against images made by qemu-img, and hostile headers.

use qcow2_format::header::{self, Header};
use qcow2_format::{FormatError, EXT_BACKING_FORMAT, EXT_FEATURE_TABLE};
use std::process::Command;

fn make(opts: &str, extra: &[&str]) -> Vec<u8> {
    let d = tempfile::tempdir().unwrap();
    let p = d.path().join("x.qcow2");
    let mut c = Command::new("qemu-img");
    c.args(["create", "-q", "-f", "qcow2", "-o", opts])
        .args(extra);
    let st = c.arg(&p).arg("1G").status().expect("qemu-img");
    assert!(st.success());
    std::fs::read(p).unwrap()
}

fn parse(b: &[u8]) -> Result<Header, FormatError> {
    Header::parse(b, b.len() as u64)
}

#[test]
fn parses_qemu_images() {
    for (opts, bits, order, ext, ver) in [
        ("compat=1.1", 16, 4, false, 3),
        ("compat=0.10", 16, 4, false, 2),
        ("cluster_size=512,refcount_bits=1", 9, 0, false, 3),
        ("cluster_size=2M,refcount_bits=64", 21, 6, false, 3),
        ("extended_l2=on", 16, 4, true, 3),
        ("compression_type=zstd,lazy_refcounts=on", 16, 4, false, 3),
    ] {
        let b = make(opts, &[]);
        let h = parse(&b).unwrap_or_else(|e| panic!("{opts}: {e}"));
        assert_eq!(h.version, ver, "{opts}");
        assert_eq!(h.cluster_bits, bits, "{opts}");
        assert_eq!(h.refcount_order, order, "{opts}");
        assert_eq!(h.extended_l2(), ext, "{opts}");
        assert_eq!(h.size, 1 << 30);
        if opts.contains("zstd") {
            assert_eq!(h.compression().name(), "zstd");
            assert!(h.lazy_refcounts());
        }
        if ver == 3 && bits > 9 {
            // (QEMU leaves the table out where it does not fit in a 512-byte cluster)
            assert!(h.extension(EXT_FEATURE_TABLE).is_some(), "{opts}");
        }
    }
}

#[test]
fn backing_name_and_format() {
    let d = tempfile::tempdir().unwrap();
    let base = d.path().join("base.qcow2");
    assert!(Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2"])
        .arg(&base)
        .arg("1G")
        .status()
        .unwrap()
        .success());
    let b = make("compat=1.1", &["-b", base.to_str().unwrap(), "-F", "qcow2"]);
    let h = parse(&b).unwrap();
    assert_eq!(h.backing_file.as_deref(), base.to_str().map(str::as_bytes));
    assert_eq!(h.backing_format().as_deref(), Some("qcow2"));
    assert!(h.extension(EXT_BACKING_FORMAT).is_some());
}

/// Replaces the backing file name bytes (and its size) of an image header.
fn patch_backing_name(b: &mut [u8], name: &[u8]) {
    let off = u64::from_be_bytes(b[8..16].try_into().unwrap()) as usize;
    let old = u32::from_be_bytes(b[16..20].try_into().unwrap()) as usize;
    b[off..off + old.max(name.len())].fill(0);
    b[off..off + name.len()].copy_from_slice(name);
    b[16..20].copy_from_slice(&(name.len() as u32).to_be_bytes());
}

#[test]
fn backing_names_are_bytes_as_qemu_reads_them() {
    let b = make("compat=1.1", &["-b", "base.qcow2", "-F", "qcow2", "-u"]);
    // Not UTF-8: kept byte for byte.
    let mut x = b.clone();
    patch_backing_name(&mut x, b"base\xff\xfe.qcow2");
    assert_eq!(
        parse(&x).unwrap().backing_file.as_deref(),
        Some(&b"base\xff\xfe.qcow2"[..])
    );
    // An embedded NUL ends the name.
    let mut x = b.clone();
    patch_backing_name(&mut x, b"base.qcow2\0junk");
    assert_eq!(
        parse(&x).unwrap().backing_file.as_deref(),
        Some(&b"base.qcow2"[..])
    );
    // Size 0 with the offset set, or a name starting with NUL: no backing file.
    for name in [&b""[..], b"\0base.qcow2"] {
        let mut x = b.clone();
        patch_backing_name(&mut x, name);
        let h = parse(&x).unwrap();
        assert_ne!(h.backing_file_offset, 0);
        assert_eq!(h.backing_file, None, "{name:?}");
    }
}

#[test]
fn serialize_roundtrip_keeps_unknown_extensions() {
    let b = make("compat=1.1", &[]);
    let mut h = parse(&b).unwrap();
    h.extensions.push(qcow2_format::Extension {
        kind: 0x1234_5678,
        data: vec![1, 2, 3],
    });
    let out = h.serialize().unwrap();
    let h2 = parse(&[&out[..], &b[out.len()..]].concat()).unwrap();
    assert_eq!(h2.extensions, h.extensions);
    assert_eq!(h2.l1_table_offset, h.l1_table_offset);
}

#[test]
fn hostile_headers_are_errors() {
    let good = make("compat=1.1", &[]);
    // truncated
    for n in [0, 4, 71, 100] {
        assert!(parse(&good[..n]).is_err(), "len {n}");
    }
    let mut m = good.clone();
    m[0] = b'X';
    assert_eq!(parse(&m), Err(FormatError::BadMagic));
    let mut m = good.clone();
    m[7] = 4;
    assert_eq!(parse(&m), Err(FormatError::UnsupportedVersion(4)));
    for bits in [0u32, 8, 22, 63, u32::MAX] {
        let mut m = good.clone();
        m[20..24].copy_from_slice(&bits.to_be_bytes());
        assert!(parse(&m).is_err(), "cluster_bits {bits}");
    }
    // L1 table past the end of the file, unaligned, huge
    let mut m = good.clone();
    m[40..48].copy_from_slice(&(1u64 << 40).to_be_bytes());
    assert!(parse(&m).is_err());
    let mut m = good.clone();
    m[40..48].copy_from_slice(&0x30001u64.to_be_bytes());
    assert!(parse(&m).is_err());
    let mut m = good.clone();
    m[36..40].copy_from_slice(&u32::MAX.to_be_bytes());
    assert!(parse(&m).is_err());
    // refcount table of absurd size
    let mut m = good.clone();
    m[56..60].copy_from_slice(&u32::MAX.to_be_bytes());
    assert!(parse(&m).is_err());
    // refcount order 7
    let mut m = good.clone();
    m[96..100].copy_from_slice(&7u32.to_be_bytes());
    assert!(parse(&m).is_err());
    // header_length beyond the cluster
    let mut m = good.clone();
    m[100..104].copy_from_slice(&u32::MAX.to_be_bytes());
    assert!(parse(&m).is_err());
    // extension length overrunning the cluster
    let mut m = good.clone();
    let hl = u32::from_be_bytes(m[100..104].try_into().unwrap()) as usize;
    m[hl + 4..hl + 8].copy_from_slice(&0xffff_fff0u32.to_be_bytes());
    assert!(parse(&m).is_err());
    // backing name outside the first cluster
    let mut m = good.clone();
    m[8..16].copy_from_slice(&(1u64 << 20).to_be_bytes());
    m[16..20].copy_from_slice(&10u32.to_be_bytes());
    assert!(parse(&m).is_err());
}

#[test]
fn unknown_incompatible_bit_is_named() {
    let good = make("compat=1.1", &[]);
    // bit 5 is unknown; the feature table QEMU writes does not name it
    let mut m = good.clone();
    m[72..80].copy_from_slice(&(1u64 << 5).to_be_bytes());
    match parse(&m) {
        Err(FormatError::UnknownIncompatible(s)) => assert_eq!(s, "bit 5"),
        other => panic!("{other:?}"),
    }
    // rename it through the feature table
    let mut h = parse(&good).unwrap();
    let mut t = h.extension(EXT_FEATURE_TABLE).unwrap().to_vec();
    let mut e = [0u8; 48];
    e[1] = 5;
    e[2..14].copy_from_slice(b"future thing");
    t.extend_from_slice(&e);
    for x in h.extensions.iter_mut() {
        if x.kind == EXT_FEATURE_TABLE {
            x.data = t.clone();
        }
    }
    h.incompatible_features |= 1 << 5;
    let out = h.serialize().unwrap();
    let img = [&out[..], &good[out.len()..]].concat();
    match parse(&img) {
        Err(FormatError::UnknownIncompatible(s)) => assert_eq!(s, "future thing"),
        other => panic!("{other:?}"),
    }
    let _ = header::INCOMPAT_KNOWN;
}
