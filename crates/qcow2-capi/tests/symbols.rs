//! The exported symbols of libqcow2 are exactly the functions of the header.

mod common;

use std::collections::BTreeSet;
use std::process::Command;

fn defined_symbols(args: &[&str], lib: &std::path::Path) -> Option<Vec<(String, String)>> {
    let (ok, out, err) = common::run(Command::new("nm").args(args).arg(lib));
    if !ok {
        eprintln!("note: nm failed on {}: {err}", lib.display());
        return None;
    }
    Some(
        out.lines()
            .filter_map(|l| {
                let mut it = l.split_whitespace().rev();
                let name = it.next()?;
                let kind = it.next()?;
                Some((kind.to_string(), name.to_string()))
            })
            .collect(),
    )
}

fn header_set() -> BTreeSet<String> {
    let header = std::fs::read_to_string(common::workspace_root().join("include/qcow2.h")).unwrap();
    let names: BTreeSet<String> = common::header_functions(&header).into_iter().collect();
    for required in [
        "qcow2_create",
        "qcow2_open",
        "qcow2_close",
        "qcow2_read",
        "qcow2_write",
        "qcow2_write_zeroes",
        "qcow2_discard",
        "qcow2_flush",
        "qcow2_get_stats",
        "qcow2_reset_stats",
        "qcow2_strerror",
        "qcow2_block_status",
        "qcow2_get_virtual_size",
        "qcow2_get_cluster_size",
    ] {
        assert!(
            names.contains(required),
            "{required} not parsed from qcow2.h: {names:?}"
        );
    }
    names
}

#[test]
fn shared_library_exports_exactly_the_header() {
    if common::which("nm", &[]).is_none() {
        qcow2_testutil::skip("symbol check", "nm not installed (binutils)");
        return;
    }
    let lib = common::shared_lib();
    assert!(lib.is_file(), "{} missing", lib.display());
    let syms = defined_symbols(&["-D", "--defined-only"], &lib).expect("nm -D");
    let exported: BTreeSet<String> = syms
        .iter()
        .filter(|(kind, _)| kind.eq_ignore_ascii_case("T"))
        .map(|(_, n)| n.clone())
        .collect();
    let header = header_set();
    let missing: Vec<_> = header.difference(&exported).collect();
    let extra: Vec<_> = exported.difference(&header).collect();
    assert!(
        missing.is_empty(),
        "declared in qcow2.h but not exported: {missing:?}"
    );
    assert!(extra.is_empty(), "exported but not in qcow2.h: {extra:?}");
    // Nothing else leaks out of the shared object (no Rust or C dependency symbols).
    let others: Vec<_> = syms
        .iter()
        .filter(|(kind, n)| !matches!(kind.as_str(), "A") && !n.starts_with("qcow2_"))
        .collect();
    assert!(others.is_empty(), "unexpected exported symbols: {others:?}");
}

#[test]
fn static_library_defines_the_header() {
    if common::which("nm", &[]).is_none() {
        qcow2_testutil::skip("symbol check", "nm not installed (binutils)");
        return;
    }
    let lib = common::static_lib();
    assert!(lib.is_file(), "{} missing", lib.display());
    let syms = defined_symbols(&["--defined-only", "-g"], &lib).expect("nm");
    let defined: BTreeSet<String> = syms
        .iter()
        .filter(|(kind, n)| kind == "T" && n.starts_with("qcow2_"))
        .map(|(_, n)| n.clone())
        .collect();
    assert_eq!(defined, header_set());
}

/// The ABI of `libqcow2.so.<major>`: every symbol in `symbols.txt` stays
/// exported. Removing one needs a new major version (and SONAME); adding one
/// is a conscious change of that list.
#[test]
fn exported_set_is_the_recorded_abi() {
    let recorded: BTreeSet<String> =
        std::fs::read_to_string(common::workspace_root().join("crates/qcow2-capi/symbols.txt"))
            .unwrap()
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty() && !l.starts_with('#'))
            .map(String::from)
            .collect();
    let header = header_set();
    let removed: Vec<_> = recorded.difference(&header).collect();
    let added: Vec<_> = header.difference(&recorded).collect();
    assert!(
        removed.is_empty(),
        "symbols of the recorded ABI gone from qcow2.h (needs a new major version): {removed:?}"
    );
    assert!(
        added.is_empty(),
        "new functions in qcow2.h: add them to crates/qcow2-capi/symbols.txt: {added:?}"
    );
}

/// `readelf -d` shows SONAME libqcow2.so.<major>, and the header's version
/// macros are the crate's version.
#[test]
fn soname_and_version_macros() {
    let header = std::fs::read_to_string(common::workspace_root().join("include/qcow2.h")).unwrap();
    for (name, want) in [
        ("QCOW2_VERSION_MAJOR", env!("CARGO_PKG_VERSION_MAJOR")),
        ("QCOW2_VERSION_MINOR", env!("CARGO_PKG_VERSION_MINOR")),
        ("QCOW2_VERSION_PATCH", env!("CARGO_PKG_VERSION_PATCH")),
    ] {
        let line = format!("#define {name} {want}");
        assert!(header.contains(&line), "qcow2.h lacks `{line}`");
    }
    if common::which("readelf", &[]).is_none() {
        qcow2_testutil::skip("SONAME check", "readelf not installed (binutils)");
        return;
    }
    let lib = common::shared_lib();
    let (ok, out, err) = common::run(Command::new("readelf").arg("-d").arg(&lib));
    assert!(ok, "readelf -d {}: {err}", lib.display());
    let want = format!("Library soname: [{}]", common::soname());
    assert!(out.contains(&want), "no `{want}` in readelf -d:\n{out}");
}
