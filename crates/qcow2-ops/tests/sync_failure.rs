//! A failed sync stays failed. After fdatasync fails the kernel may already
//! have marked the dirty pages clean (Linux does), so a retried sync would
//! return 0 over lost data. Like QEMU's file driver, the image then fails
//! every later flush, FUA request and writethrough request with the errno of
//! the failed sync, never claims durability again, and does not even call
//! sync again; with O_DIRECT (no page cache involved) a failure is not
//! sticky, as in QEMU. Errors are injected with `FaultStorage`; the same
//! through the real file backend is in qcow2-cli's `sync_failure` test
//! (strace injection).

use qcow2_io::{FaultPlan, FaultStorage};
use qcow2_ops::*;
use std::sync::Arc;

/// A 4 MiB image whose first MiB is allocated, as bytes.
fn base() -> (tempfile::TempDir, std::path::PathBuf, Vec<u8>) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("sync.qcow2");
    Image::create(&path, 4 << 20, &CreateOptions::default()).unwrap();
    let img = Image::open(&path, &OpenOptions::read_write()).unwrap();
    img.write(0, &vec![0x11; 1 << 20], 0).unwrap();
    img.close().unwrap();
    let bytes = std::fs::read(&path).unwrap();
    (dir, path, bytes)
}

fn open(bytes: &[u8], path: &std::path::Path, cache: CacheMode) -> (Arc<FaultStorage>, Image) {
    let fs = Arc::new(FaultStorage::new(bytes.to_vec()));
    let opts = OpenOptions {
        cache,
        ..OpenOptions::read_write()
    };
    let img = Image::open_with_storage(Box::new(fs.clone()), path, &opts).unwrap();
    (fs, img)
}

/// Arms the fault storage so that its next mutating operation fails with `errno`.
fn fail_next(fs: &FaultStorage, errno: i32) {
    fs.set_plan(FaultPlan {
        fail_at: Some((1, errno)),
        crash_after: None,
    });
}

fn errno(r: Result<()>) -> i32 {
    match r {
        Ok(()) => 0,
        Err(e) => e.errno(),
    }
}

#[test]
fn failed_flush_stays_failed() {
    let (_dir, path, bytes) = base();
    for err in [libc::EIO, libc::ENOSPC] {
        let (fs, img) = open(&bytes, &path, CacheMode::Writeback);
        // In place: the data write is the only mutating operation, the sync
        // of the flush the first one after arming.
        img.write(0, &[0x22; 4096], 0).unwrap();
        fail_next(&fs, err);
        assert_eq!(errno(img.flush()), -err, "the failing flush");
        assert_eq!(fs.ops(), 1, "the flush wrote nothing before its sync");
        // The storage would now sync fine: the image must not let it.
        assert_eq!(errno(img.flush()), -err, "a retried flush (errno {err})");
        img.write(4096, &[0x33; 4096], 0).unwrap();
        assert_eq!(errno(img.flush()), -err, "a flush after more writes");
        assert_eq!(
            errno(img.write(8192, &[0x44; 4096], REQ_FUA)),
            -err,
            "a FUA write"
        );
        assert_eq!(
            errno(img.write_zeroes(65536, 65536, REQ_FUA)),
            -err,
            "a FUA write-zeroes"
        );
        assert_eq!(fs.ops(), 3, "no sync is attempted after the failure");
        // Reads still work and see what was written.
        let mut b = [0u8; 4096];
        img.read(4096, &mut b).unwrap();
        assert_eq!(b, [0x33; 4096]);
        assert_eq!(errno(img.close()), -err, "close flushes and fails");
    }
}

#[test]
fn writethrough_requests_fail_after_a_failed_sync() {
    let (_dir, path, bytes) = base();
    // directsync is writethrough on O_DIRECT: its failures are not sticky.
    for (cache, sticky) in [
        (CacheMode::Writethrough, true),
        (CacheMode::DirectSync, false),
    ] {
        let (fs, img) = open(&bytes, &path, cache);
        img.write(0, &[0x22; 4096], 0).unwrap();
        // The next write's data goes out (op 1), its sync (op 2) fails.
        fs.set_plan(FaultPlan {
            fail_at: Some((2, libc::EIO)),
            crash_after: None,
        });
        assert_eq!(errno(img.write(4096, &[0x33; 4096], 0)), -libc::EIO);
        let later = if sticky { -libc::EIO } else { 0 };
        assert_eq!(
            errno(img.write(8192, &[0x44; 4096], 0)),
            later,
            "{cache:?}: a later writethrough write"
        );
        assert_eq!(
            errno(img.discard(0, 65536)),
            later,
            "{cache:?}: a later writethrough discard"
        );
        assert_eq!(errno(img.flush()), later, "{cache:?}: a later flush");
    }
}

#[test]
fn allocation_after_a_failed_sync_fails() {
    // Allocating needs an ordering sync (refcount before L2): it must fail
    // too, rather than link new clusters on top of a sync that lost data.
    let (_dir, path, bytes) = base();
    let (fs, img) = open(&bytes, &path, CacheMode::Writeback);
    img.write(0, &[0x22; 4096], 0).unwrap();
    fail_next(&fs, libc::EIO);
    assert_eq!(errno(img.flush()), -libc::EIO);
    img.write(2 << 20, &[0x55; 4096], 0).unwrap();
    assert_eq!(errno(img.flush()), -libc::EIO, "flush of the allocation");
    // Nothing claims the allocation is durable: the durable bytes are still
    // the original image (the allocating metadata never went out synced).
    let lost = fs.after_power_loss(|_| false, |_| None);
    assert_eq!(lost, bytes);
}

#[test]
fn direct_io_failure_is_not_sticky() {
    // QEMU keeps no sticky state with O_DIRECT: no page cache was involved,
    // so a retried sync is meaningful.
    let (_dir, path, bytes) = base();
    let (fs, img) = open(&bytes, &path, CacheMode::None);
    img.write(0, &[0x22; 4096], 0).unwrap();
    fail_next(&fs, libc::EIO);
    assert_eq!(errno(img.flush()), -libc::EIO);
    assert_eq!(errno(img.flush()), 0, "the retried flush syncs again");
    img.close().unwrap();
}
