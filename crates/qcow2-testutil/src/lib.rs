//! Test support shared by the workspace's test suites: finding external
//! tools and skipping visibly when one is missing.
//!
//! A test that cannot run must say so where a person sees it, and under CI
//! (`CI` set to anything but `""`, `0` or `false`) a missing tool is a
//! failure, not a skip. libtest captures `print!`/`eprint!` of passing
//! tests, so the skip line is written to the process's standard error
//! directly, which the capture does not intercept: it shows up in the
//! `cargo test` output next to the test's result.
#![forbid(unsafe_code)]
#![warn(missing_docs)]

use std::io::Write;
use std::path::PathBuf;

/// Whether the tests run under CI (`CI=true`, as CI sets it).
pub fn under_ci() -> bool {
    match std::env::var("CI") {
        Ok(v) => !matches!(v.trim(), "" | "0" | "false" | "FALSE" | "False"),
        Err(_) => false,
    }
}

/// Finds a program on PATH (or one of `extra` absolute candidates).
pub fn which(name: &str, extra: &[PathBuf]) -> Option<PathBuf> {
    if let Some(paths) = std::env::var_os("PATH") {
        for dir in std::env::split_paths(&paths) {
            let p = dir.join(name);
            if p.is_file() {
                return Some(p);
            }
        }
    }
    extra.iter().find(|p| p.is_file()).cloned()
}

/// Reports that `test` cannot run because of `why` (e.g. "nbdkit not
/// installed"): under CI this panics (the test fails); elsewhere it prints
/// `skipped: <test>: <why>` on the uncaptured standard error and returns,
/// so the caller returns early.
#[track_caller]
pub fn skip(test: &str, why: &str) {
    if under_ci() {
        panic!("{test} cannot run under CI: {why}");
    }
    let mut e = std::io::stderr().lock();
    let _ = writeln!(e, "skipped: {test}: {why}");
    let _ = e.flush();
}

/// Returns the path of each tool in `tools`, or reports the first missing
/// one through [`skip`] and returns `None`.
#[track_caller]
pub fn require(test: &str, tools: &[&str]) -> Option<Vec<PathBuf>> {
    let mut out = Vec::with_capacity(tools.len());
    for t in tools {
        match which(t, &[]) {
            Some(p) => out.push(p),
            None => {
                skip(test, &format!("{t} not installed"));
                return None;
            }
        }
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn which_finds_sh_and_not_nonsense() {
        assert!(which("sh", &[]).is_some());
        assert!(which("no-such-tool-qcow2-test", &[]).is_none());
    }
}
