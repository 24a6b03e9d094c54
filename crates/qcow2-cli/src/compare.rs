//! `qcow2 compare`: the guest contents of two images, as `qemu-img compare`
//! (exit 0 identical, 1 different, 2 error; QEMU's messages).

use crate::disk::{Disk, Progress};
use crate::Fail;
use clap::Args;
use qcow2_ops::OpenOptions;
use std::path::{Path, PathBuf};

/// Arguments of `qcow2 compare`.
#[derive(Args, Debug)]
pub struct CompareArgs {
    /// Format of the first image (qcow2 or raw; probed when absent).
    #[arg(short = 'f')]
    fmt1: Option<String>,
    /// Format of the second image.
    #[arg(short = 'F')]
    fmt2: Option<String>,
    /// Strict: a different size or allocation status is a difference.
    #[arg(short = 's')]
    strict: bool,
    /// Quiet: only the exit status tells.
    #[arg(short = 'q')]
    quiet: bool,
    /// Show progress at a terminal.
    #[arg(short = 'p')]
    progress: bool,
    /// Accepted for compatibility (images are opened read-only).
    #[arg(short = 'U', long = "force-share")]
    force_share: bool,
    /// Accepted for compatibility: cache mode of the sources.
    #[arg(short = 'T')]
    cache: Option<String>,
    #[command(flatten)]
    spec: crate::imgspec::SpecArgs,
    /// The first image.
    img1: PathBuf,
    /// The second image.
    img2: PathBuf,
}

/// Bytes compared per step.
const CHUNK: u64 = 2 << 20;
/// Differences are reported at the first differing 512-byte sector, as QEMU does.
const SECTOR: usize = 512;

/// Runs `qcow2 compare`. Errors exit with 2.
pub fn run(a: CompareArgs) -> Result<u8, Fail> {
    compare(&a).map_err(|f| Fail { code: 2, ..f })
}

fn say(a: &CompareArgs, msg: &str) {
    if !a.quiet {
        println!("{msg}");
    }
}

fn compare(a: &CompareArgs) -> Result<u8, Fail> {
    a.spec.define()?;
    let (mut o1, mut o2) = (OpenOptions::read_only(), OpenOptions::read_only());
    let i1 = a.spec.resolve(&a.img1, a.fmt1.as_deref(), &mut o1)?;
    let i2 = a.spec.resolve(&a.img2, a.fmt2.as_deref(), &mut o2)?;
    let d1 = Disk::open(&i1.path, i1.fmt.as_deref(), &o1)?;
    let d2 = Disk::open(&i2.path, i2.fmt.as_deref(), &o2)?;
    let (s1, s2) = (d1.size(), d2.size());
    if s1 != s2 {
        if a.strict {
            say(a, "Strict mode: Image size mismatch!");
            return Ok(1);
        }
        say(a, "Warning: Image size mismatch!");
    }
    let common = s1.min(s2);
    let total = s1.max(s2);
    let bar = Progress::new(a.progress && !a.quiet, total, "compare");
    let mut b1 = vec![0u8; CHUNK as usize];
    let mut b2 = vec![0u8; CHUNK as usize];
    let mut off = 0u64;
    while off < common {
        let want = (common - off).min(CHUNK);
        let (n1, st1) = d1.status(&a.img1, off, want)?;
        let (n2, st2) = d2.status(&a.img2, off, want)?;
        let n = n1.min(n2);
        if a.strict && st1.present != st2.present {
            bar.finish();
            say(
                a,
                &format!("Strict mode: Offset {off} block status mismatch!"),
            );
            return Ok(1);
        }
        if !(st1.zero && st2.zero) {
            let (x, y) = (&mut b1[..n as usize], &mut b2[..n as usize]);
            read_or_zero(&d1, &a.img1, off, st1.zero, x)?;
            read_or_zero(&d2, &a.img2, off, st2.zero, y)?;
            if let Some(i) = first_diff(x, y) {
                bar.finish();
                say(a, &format!("Content mismatch at offset {}!", off + i));
                return Ok(1);
            }
        }
        off += n;
        bar.set(off);
    }
    // The rest of the larger image must read as zeroes.
    let (big, path) = if s1 > s2 {
        (&d1, &a.img1)
    } else {
        (&d2, &a.img2)
    };
    while off < total {
        let (n, st) = big.status(path, off, (total - off).min(CHUNK))?;
        if !st.zero {
            let x = &mut b1[..n as usize];
            big.read(path, off, x)?;
            if let Some(i) = first_nonzero(x) {
                bar.finish();
                say(a, &format!("Content mismatch at offset {}!", off + i));
                return Ok(1);
            }
        }
        off += n;
        bar.set(off);
    }
    bar.finish();
    say(a, "Images are identical.");
    Ok(0)
}

fn read_or_zero(d: &Disk, path: &Path, off: u64, zero: bool, buf: &mut [u8]) -> Result<(), Fail> {
    if zero {
        buf.fill(0);
        Ok(())
    } else {
        d.read(path, off, buf)
    }
}

/// Byte offset of the first 512-byte sector where `x` and `y` differ.
fn first_diff(x: &[u8], y: &[u8]) -> Option<u64> {
    x.chunks(SECTOR)
        .zip(y.chunks(SECTOR))
        .position(|(a, b)| a != b)
        .map(|i| (i * SECTOR) as u64)
}

/// Byte offset of the first 512-byte sector of `x` that is not all zero.
fn first_nonzero(x: &[u8]) -> Option<u64> {
    x.chunks(SECTOR)
        .position(|c| c.iter().any(|&b| b != 0))
        .map(|i| (i * SECTOR) as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sector_granularity() {
        let a = vec![0u8; 4096];
        let mut b = a.clone();
        b[1000] = 1;
        assert_eq!(first_diff(&a, &b), Some(512));
        assert_eq!(first_diff(&a, &a), None);
        assert_eq!(first_nonzero(&b), Some(512));
        assert_eq!(first_nonzero(&a), None);
    }
}
