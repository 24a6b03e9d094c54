//! Hostile LUKS headers: every corruption is an error, never a panic, and
//! nothing allocates more than the key material of a sane header.

use proptest::prelude::*;
use qcow2_crypto::luks::{self, CreateParams, Header};
use qcow2_crypto::CryptoError;
use std::sync::OnceLock;

/// A valid header area (iter_time 1 ms: minimum iteration counts).
fn base() -> &'static [u8] {
    static AREA: OnceLock<Vec<u8>> = OnceLock::new();
    AREA.get_or_init(|| {
        let p = CreateParams {
            iter_time_ms: 1,
            ..CreateParams::default()
        };
        luks::create(&p, b"pw").unwrap().0
    })
}

fn with(f: impl FnOnce(&mut Vec<u8>)) -> Vec<u8> {
    let mut a = base().to_vec();
    f(&mut a);
    a
}

fn put32(a: &mut [u8], at: usize, v: u32) {
    a[at..at + 4].copy_from_slice(&v.to_be_bytes());
}

const SLOT0: usize = 208;

fn expect_invalid(a: &[u8], what: &str) {
    match Header::parse(a) {
        Err(CryptoError::Invalid(_) | CryptoError::Unsupported(_)) => {}
        other => panic!("{what}: parse gave {other:?}"),
    }
    assert!(luks::unlock(a, b"pw").is_err(), "{what}: unlock succeeded");
}

#[test]
fn the_base_header_is_valid() {
    assert!(luks::unlock(base(), b"pw").is_ok());
}

#[test]
fn truncated_headers_are_errors() {
    for n in (0..592).step_by(7).chain([591]) {
        expect_invalid(&base()[..n], &format!("truncated to {n}"));
    }
    // Header complete but key material cut off.
    let need = Header::parse(base()).unwrap().area_len() as usize;
    assert!(need <= base().len());
    assert!(luks::unlock(&base()[..need], b"pw").is_ok());
    for n in [592, 4096, 100_000, need - 1] {
        let r = luks::unlock(&base()[..n], b"pw");
        assert!(
            matches!(r, Err(CryptoError::Invalid(_))),
            "cut at {n}: {r:?}"
        );
    }
}

#[test]
fn corrupt_fields_are_errors() {
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("bad magic", with(|a| a[3] = b'X')),
        ("version 2", with(|a| a[7] = 2)),
        ("cipher name without NUL", with(|a| a[8..40].fill(b'a'))),
        ("mode without NUL", with(|a| a[40..72].fill(b'x'))),
        ("hash without NUL", with(|a| a[72..104].fill(b's'))),
        ("serpent", with(|a| a[8..13].copy_from_slice(b"serpe"))),
        (
            "mode without ivgen",
            with(|a| a[40..72].copy_from_slice(&[b"xts"[..].to_vec(), vec![0; 29]].concat())),
        ),
        (
            "unknown hash",
            with(|a| a[72..79].copy_from_slice(b"md5\0\0\0\0")),
        ),
        ("payload offset 0", with(|a| put32(a, 104, 0))),
        ("key_bytes 0", with(|a| put32(a, 108, 0))),
        ("key_bytes 17", with(|a| put32(a, 108, 17))),
        ("key_bytes huge", with(|a| put32(a, 108, u32::MAX))),
        ("mk iterations 0", with(|a| put32(a, 164, 0))),
        ("slot state garbage", with(|a| put32(a, SLOT0 + 48 * 3, 7))),
        (
            "active slot with 0 iterations",
            with(|a| put32(a, SLOT0 + 4, 0)),
        ),
        ("stripes huge", with(|a| put32(a, SLOT0 + 44, u32::MAX))),
        ("stripes 1", with(|a| put32(a, SLOT0 + 48 * 5 + 44, 1))),
        ("slot inside the header", with(|a| put32(a, SLOT0 + 40, 1))),
        (
            "slot past the payload",
            with(|a| put32(a, SLOT0 + 40, u32::MAX)),
        ),
        ("slots overlapping", with(|a| put32(a, SLOT0 + 48 + 40, 9))),
    ];
    for (what, a) in cases {
        expect_invalid(&a, what);
    }
    let e = Header::parse(&with(|a| a[8..13].copy_from_slice(b"serpe"))).unwrap_err();
    assert!(e.to_string().contains("serpe"), "{e}");
}

#[test]
fn slots_past_the_area_need_a_longer_area() {
    // A consistent header (payload and slot 7 moved far out) whose key
    // material lies past the bytes handed in: an error, not a panic or a
    // huge allocation.
    let a = with(|a| {
        put32(a, 104, u32::MAX);
        put32(a, SLOT0 + 48 * 7 + 40, u32::MAX - 1000);
    });
    let h = Header::parse(&a).unwrap();
    assert!(h.area_len() > a.len() as u64);
    assert!(matches!(
        luks::unlock(&a, b"pw"),
        Err(CryptoError::Invalid(_))
    ));
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 2000, ..ProptestConfig::default() })]

    #[test]
    fn parse_never_panics(edits in prop::collection::vec((0usize..592, any::<u8>()), 1..8)) {
        let mut a = base()[..4096].to_vec();
        for (i, b) in edits {
            a[i] = b;
        }
        if let Ok(h) = Header::parse(&a) {
            // Whatever parses stays within u32 sectors + one slot's material.
            prop_assert!(h.area_len() <= u64::from(u32::MAX) * 512 + 64 * 4000);
            let _ = h.info();
        }
    }
}
