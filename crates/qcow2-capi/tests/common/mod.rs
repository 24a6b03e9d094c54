//! Helpers shared by the integration tests of the C library.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::Command;

/// The workspace root (holds `include/` and `ffi-tests/`).
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../..")
        .canonicalize()
        .expect("workspace root")
}

/// The directory holding `libqcow2.so` and `libqcow2.a`.
///
/// `QCOW2_LIB_DIR` overrides it (e.g. `target/release`, as `just ctest`
/// does). Otherwise it is the `deps` directory next to this test binary
/// (`target/<profile>/deps/<test>-<hash>`): before cargo builds an integration
/// test it builds this package's library with every crate type listed in
/// Cargo.toml (rlib, cdylib, staticlib), and for a local cdylib package cargo
/// names the outputs without a hash (`deps/libqcow2.so`, `deps/libqcow2.a`).
/// So a clean `cargo test --workspace` (or `cargo test --release`) always
/// finds a library built from the same sources as the test. (The copies in
/// `target/<profile>/` are only refreshed by `cargo build`, so they may be
/// stale during `cargo test`; they are the fallback.)
pub fn lib_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("QCOW2_LIB_DIR") {
        let d = PathBuf::from(d);
        let d = if d.is_absolute() {
            d
        } else {
            workspace_root().join(d)
        };
        soname_link(&d);
        return d;
    }
    let exe = std::env::current_exe().expect("current_exe");
    let deps = exe.parent().expect("target/<profile>/deps");
    let dir = if deps.join("libqcow2.so").is_file() && deps.join("libqcow2.a").is_file() {
        deps.to_path_buf()
    } else {
        deps.parent().expect("target/<profile>").to_path_buf()
    };
    soname_link(&dir);
    dir
}

/// The SONAME of the shared library (`libqcow2.so.<major>`).
pub fn soname() -> String {
    format!("libqcow2.so.{}", env!("CARGO_PKG_VERSION_MAJOR"))
}

/// Programs linked with `-lqcow2` need `libqcow2.so.<major>` at run time
/// (the SONAME): cargo only writes `libqcow2.so`, so add the link next to
/// it, as `just install` does.
pub fn soname_link(dir: &Path) {
    let link = dir.join(soname());
    if dir.join("libqcow2.so").is_file() && std::fs::symlink_metadata(&link).is_err() {
        // Several tests may race here; the loser finds the link made.
        let _ = std::os::unix::fs::symlink("libqcow2.so", &link);
    }
}

/// A fresh scratch directory under the system temporary directory (removed
/// by [`ScratchDir`]'s drop unless `QCOW2_KEEP_SCRATCH` is set).
pub struct ScratchDir(pub PathBuf);

impl ScratchDir {
    /// Makes `$TMPDIR/qcow2-<tag>-<pid>-<n>`.
    pub fn new(tag: &str) -> ScratchDir {
        use std::sync::atomic::{AtomicUsize, Ordering};
        static N: AtomicUsize = AtomicUsize::new(0);
        let n = N.fetch_add(1, Ordering::Relaxed);
        let p = std::env::temp_dir().join(format!("qcow2-{tag}-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).expect("scratch dir");
        ScratchDir(p)
    }
    /// The path.
    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for ScratchDir {
    fn drop(&mut self) {
        if std::env::var_os("QCOW2_KEEP_SCRATCH").is_none() {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}

/// The shared library.
pub fn shared_lib() -> PathBuf {
    lib_dir().join("libqcow2.so")
}

/// The static library.
pub fn static_lib() -> PathBuf {
    lib_dir().join("libqcow2.a")
}

pub use qcow2_testutil::which;

/// Runs a command, returning (success, stdout, stderr).
pub fn run(cmd: &mut Command) -> (bool, String, String) {
    match cmd.output() {
        Ok(o) => (
            o.status.success(),
            String::from_utf8_lossy(&o.stdout).into_owned(),
            String::from_utf8_lossy(&o.stderr).into_owned(),
        ),
        Err(e) => (false, String::new(), format!("cannot run {cmd:?}: {e}")),
    }
}

/// Names of the functions the header declares (`int qcow2_x(` at the start
/// of a line, possibly after a return type).
pub fn header_functions(header: &str) -> Vec<String> {
    let mut names = Vec::new();
    for line in header.lines() {
        if line.starts_with([' ', '\t', '*', '/', '#']) || !line.contains('(') {
            continue;
        }
        let before = &line[..line.find('(').unwrap()];
        if let Some(name) = before.rsplit([' ', '*']).next() {
            if name.starts_with("qcow2_") {
                names.push(name.to_string());
            }
        }
    }
    names.sort();
    names
}
