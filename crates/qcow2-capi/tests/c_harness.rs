//! Builds the C programs of `ffi-tests/` against `include/qcow2.h` and the
//! library this package builds, and runs each one:
//!
//! - `static`: linked with `libqcow2.a`, run directly;
//! - `asan`: AddressSanitizer + UndefinedBehaviorSanitizer, linked with
//!   `libqcow2.so` (rpath), leak detection on;
//! - `valgrind`: linked with `libqcow2.so`, run under
//!   `valgrind --error-exitcode=1 --leak-check=full` (skipped without valgrind).
//!
//! Every program is compiled with `-std=c11 -Wall -Wextra -Wpedantic -Werror`,
//! gets a fresh scratch directory as argv[1], and must exit 0 with the final
//! line `N passed, 0 failed`. The library is found as described in
//! `common::lib_dir` (set `QCOW2_LIB_DIR=target/release` to test a release
//! build; `just ctest` does). Needs a C compiler (`$CC` or `cc`) and
//! qemu-img/qemu-io; without them the tests print a note and pass.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Variant {
    Static,
    Asan,
    Valgrind,
}

const CFLAGS: &[&str] = &[
    "-std=c11",
    "-Wall",
    "-Wextra",
    "-Wpedantic",
    "-Werror",
    "-g",
    "-O1",
];
/// What `rustc --print native-static-libs` lists for the staticlib.
const NATIVE_STATIC_LIBS: &[&str] = &[
    "-lgcc_s",
    "-lutil",
    "-lrt",
    "-lpthread",
    "-lm",
    "-ldl",
    "-lc",
];

fn cc() -> Option<PathBuf> {
    if let Some(cc) = std::env::var_os("CC") {
        let p = PathBuf::from(cc);
        return if p.is_absolute() {
            Some(p)
        } else {
            common::which(&p.to_string_lossy(), &[])
        };
    }
    common::which("cc", &[]).or_else(|| common::which("gcc", &[]))
}

/// Compiles `ffi-tests/<name>.c` into `dir`, returning the executable.
fn compile(cc: &Path, name: &str, variant: Variant, dir: &Path) -> Result<PathBuf, String> {
    let root = common::workspace_root();
    let exe = dir.join(format!("{name}-{variant:?}").to_lowercase());
    let mut cmd = Command::new(cc);
    cmd.args(CFLAGS)
        .arg("-I")
        .arg(root.join("include"))
        .arg("-I")
        .arg(root.join("ffi-tests"))
        .arg("-pthread");
    if variant == Variant::Asan {
        cmd.args([
            "-fsanitize=address,undefined",
            "-fno-omit-frame-pointer",
            "-fno-sanitize-recover=all",
        ]);
    }
    cmd.arg(root.join("ffi-tests").join(format!("{name}.c")))
        .arg("-o")
        .arg(&exe);
    match variant {
        Variant::Static => {
            cmd.arg(common::static_lib()).args(NATIVE_STATIC_LIBS);
        }
        Variant::Asan | Variant::Valgrind => {
            let dir = common::lib_dir();
            cmd.arg("-L")
                .arg(&dir)
                .arg("-Wl,--disable-new-dtags")
                .arg(format!("-Wl,-rpath,{}", dir.display()))
                .arg("-lqcow2");
        }
    }
    let (ok, out, err) = common::run(&mut cmd);
    if ok {
        Ok(exe)
    } else {
        Err(format!(
            "compiling {name} ({variant:?}) failed: {cmd:?}\n{out}\n{err}"
        ))
    }
}

/// Whether the compiler can build and run an ASan+UBSan program here.
fn asan_works(cc: &Path, dir: &Path) -> bool {
    let src = dir.join("asan_probe.c");
    std::fs::write(&src, "int main(void) { return 0; }\n").unwrap();
    let exe = dir.join("asan_probe");
    let (ok, _, _) = common::run(
        Command::new(cc)
            .args(["-fsanitize=address,undefined"])
            .arg(&src)
            .arg("-o")
            .arg(&exe),
    );
    ok && common::run(&mut Command::new(&exe)).0
}

fn check_output(name: &str, variant: Variant, ok: bool, out: &str, err: &str) {
    let last = out
        .lines()
        .rev()
        .find(|l| !l.trim().is_empty())
        .unwrap_or("");
    let counts: Option<(u64, u64)> = (|| {
        let (p, f) = last.split_once(" passed, ")?;
        let f = f.strip_suffix(" failed")?;
        Some((p.parse().ok()?, f.parse().ok()?))
    })();
    let good = ok && matches!(counts, Some((p, 0)) if p > 0);
    eprintln!("{name} ({variant:?}): {last}");
    assert!(
        good,
        "{name} ({variant:?}) failed (exit ok: {ok}, last line: {last:?})\n--- stdout\n{out}\n--- stderr\n{err}"
    );
}

fn run_c_test(name: &str, variant: Variant) {
    let Some(cc) = cc() else {
        qcow2_testutil::skip(name, "no C compiler (cc/gcc/$CC)");
        return;
    };
    if common::which("qemu-img", &[]).is_none() || common::which("qemu-io", &[]).is_none() {
        qcow2_testutil::skip(
            name,
            "qemu-img/qemu-io not installed (apt-get install qemu-utils)",
        );
        return;
    }
    let valgrind = common::which("valgrind", &[]);
    if variant == Variant::Valgrind && valgrind.is_none() {
        qcow2_testutil::skip(&format!("{name} (valgrind)"), "valgrind not installed");
        return;
    }
    let lib = match variant {
        Variant::Static => common::static_lib(),
        _ => common::shared_lib(),
    };
    assert!(
        lib.is_file(),
        "{} missing: build it with `cargo build -p qcow2-capi` or set QCOW2_LIB_DIR",
        lib.display()
    );
    let tmp = common::ScratchDir::new(&format!("ffi-{name}-{variant:?}"));
    let bin_dir = tmp.path().join("bin");
    let scratch = tmp.path().join("scratch");
    std::fs::create_dir_all(&bin_dir).unwrap();
    std::fs::create_dir_all(&scratch).unwrap();
    if variant == Variant::Asan && !asan_works(&cc, &bin_dir) {
        qcow2_testutil::skip(
            &format!("{name} (asan)"),
            &format!("{} cannot build/run sanitizer programs here", cc.display()),
        );
        return;
    }
    let exe = compile(&cc, name, variant, &bin_dir).unwrap_or_else(|e| panic!("{e}"));
    let mut cmd = match variant {
        Variant::Valgrind => {
            let mut c = Command::new(valgrind.unwrap());
            c.args(["--error-exitcode=1", "--leak-check=full", "--quiet"])
                .arg(&exe);
            c
        }
        _ => Command::new(&exe),
    };
    // cargo's own LD_LIBRARY_PATH for tests lists target/<profile> too, whose
    // libqcow2.so may be stale (only `cargo build` refreshes it): point the
    // loader at the library under test only.
    cmd.arg(&scratch)
        .env("LD_LIBRARY_PATH", common::lib_dir())
        .env(
            "ASAN_OPTIONS",
            "detect_leaks=1:abort_on_error=0:exitcode=99",
        )
        .env("UBSAN_OPTIONS", "print_stacktrace=1:halt_on_error=1")
        .env("RUST_BACKTRACE", "1");
    let (ok, out, err) = common::run(&mut cmd);
    check_output(name, variant, ok, &out, &err);
}

macro_rules! c_tests {
    ($($fn_name:ident => ($prog:literal, $variant:ident),)*) => {
        $(
            #[test]
            fn $fn_name() {
                run_c_test($prog, Variant::$variant);
            }
        )*
    };
}

c_tests! {
    api_static => ("test_api", Static),
    api_asan => ("test_api", Asan),
    api_valgrind => ("test_api", Valgrind),
    zeroes_static => ("test_zeroes", Static),
    zeroes_asan => ("test_zeroes", Asan),
    zeroes_valgrind => ("test_zeroes", Valgrind),
    threads_static => ("test_threads", Static),
    threads_asan => ("test_threads", Asan),
    threads_valgrind => ("test_threads", Valgrind),
    misuse_fuzz_static => ("test_misuse_fuzz", Static),
    misuse_fuzz_asan => ("test_misuse_fuzz", Asan),
    misuse_fuzz_valgrind => ("test_misuse_fuzz", Valgrind),
    errors_static => ("test_errors", Static),
    errors_asan => ("test_errors", Asan),
    errors_valgrind => ("test_errors", Valgrind),
    bitmaps_static => ("test_bitmaps", Static),
    bitmaps_asan => ("test_bitmaps", Asan),
    bitmaps_valgrind => ("test_bitmaps", Valgrind),
    snapshots_static => ("test_snapshots", Static),
    snapshots_asan => ("test_snapshots", Asan),
    snapshots_valgrind => ("test_snapshots", Valgrind),
    resize_static => ("test_resize", Static),
    resize_asan => ("test_resize", Asan),
    resize_valgrind => ("test_resize", Valgrind),
    lifecycle_static => ("test_lifecycle", Static),
    lifecycle_asan => ("test_lifecycle", Asan),
    lifecycle_valgrind => ("test_lifecycle", Valgrind),
    compressed_static => ("test_compressed", Static),
    compressed_asan => ("test_compressed", Asan),
    compressed_valgrind => ("test_compressed", Valgrind),
    crypt_static => ("test_crypt", Static),
    crypt_asan => ("test_crypt", Asan),
    crypt_valgrind => ("test_crypt", Valgrind),
    copy_static => ("test_copy", Static),
    copy_asan => ("test_copy", Asan),
    copy_valgrind => ("test_copy", Valgrind),
}
