//! Header drift: `include/qcow2.h` must be exactly what the pinned cbindgen
//! generates from this crate. Skipped (with a note) when cbindgen is absent or
//! is not the pinned version. `just header` regenerates it; `just
//! header-check` runs the same check with `git diff --exit-code`.

mod common;

use std::process::Command;

const PINNED: &str = "0.29.4";

#[test]
fn header_matches_cbindgen() {
    let root = common::workspace_root();
    let home_bin = std::env::var_os("HOME")
        .map(|h| std::path::PathBuf::from(h).join(".cargo/bin/cbindgen"))
        .into_iter()
        .collect::<Vec<_>>();
    let Some(cbindgen) = common::which("cbindgen", &home_bin) else {
        qcow2_testutil::skip(
            "header drift check",
            &format!("cbindgen not installed (cargo install cbindgen --version {PINNED} --locked)"),
        );
        return;
    };
    let (ok, version, _) = common::run(Command::new(&cbindgen).arg("--version"));
    if !ok || !version.contains(PINNED) {
        qcow2_testutil::skip(
            "header drift check",
            &format!(
                "{} is `{}`, not cbindgen {PINNED}",
                cbindgen.display(),
                version.trim()
            ),
        );
        return;
    }
    let tmp = common::ScratchDir::new("header");
    let out = tmp.path().join("qcow2.h");
    let (ok, stdout, stderr) = common::run(
        Command::new(&cbindgen)
            .current_dir(&root)
            .args([
                "--config",
                "crates/qcow2-capi/cbindgen.toml",
                "--quiet",
                "--output",
            ])
            .arg(&out)
            .arg("crates/qcow2-capi"),
    );
    assert!(ok, "cbindgen failed:\n{stdout}\n{stderr}");
    let generated = std::fs::read_to_string(&out).unwrap();
    let checked_in = std::fs::read_to_string(root.join("include/qcow2.h")).unwrap();
    assert!(
        generated == checked_in,
        "include/qcow2.h is stale: run `just header` (cbindgen --config crates/qcow2-capi/cbindgen.toml \
         --output include/qcow2.h crates/qcow2-capi) and commit the result"
    );
}

#[test]
fn header_has_contract_names() {
    let header = std::fs::read_to_string(common::workspace_root().join("include/qcow2.h")).unwrap();
    for name in [
        "#define QCOW2_REQ_MAY_UNMAP 4",
        "#define QCOW2_REQ_FUA 16",
        "#define QCOW2_REQ_NO_FALLBACK 256",
        "#define QCOW2_OPEN_RDWR ",
        "#define QCOW2_OPEN_UNMAP ",
        "#define QCOW2_OPEN_CACHE_WRITETHROUGH ",
        "#define QCOW2_OPEN_CACHE_UNSAFE ",
        "#define QCOW2_OPEN_CACHE_NONE ",
        "typedef struct Qcow2Image Qcow2Image;",
        "#ifndef QCOW2_H",
        "DO NOT EDIT",
        "Thread safety",
    ] {
        assert!(header.contains(name), "include/qcow2.h lacks `{name}`");
    }
    // Qcow2Stats lists the docs/DESIGN.md counters in order.
    let start = header
        .find("typedef struct Qcow2Stats {")
        .expect("Qcow2Stats");
    let body = &header[start..start + header[start..].find("} Qcow2Stats;").unwrap()];
    let fields: Vec<&str> = body
        .lines()
        .filter_map(|l| l.trim().strip_prefix("uint64_t "))
        .map(|l| l.trim_end_matches(';'))
        .collect();
    assert_eq!(
        fields,
        [
            "l2_hits",
            "l2_misses",
            "l2_dirty_marks",
            "l2_writebacks",
            "l2_bytes_written",
            "refblock_dirty_marks",
            "refblock_writebacks",
            "refblock_bytes_written",
            "cache_flushes",
            "file_syncs",
            "data_bytes_written",
            "holes_punched",
            "zero_entries_skipped",
        ]
    );
}
