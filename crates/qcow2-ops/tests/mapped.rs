//! Requests whose data the caller moves itself (`try_map_read`,
//! `try_map_write`): what is mapped and what is left to the engine's own
//! path, what a mapping holds off while it lives, and the bookkeeping that
//! makes the next flush sync a mapped write.

use qcow2_ops::*;
use std::os::unix::fs::FileExt;
use std::sync::mpsc;
use std::time::Duration;

const K: u64 = 1024;

fn image(dir: &tempfile::TempDir, cs: u64) -> std::path::PathBuf {
    let p = dir.path().join("m.qcow2");
    let o = CreateOptions {
        cluster_size: cs,
        ..CreateOptions::default()
    };
    Image::create(&p, 1 << 20, &o).unwrap();
    p
}

/// Writes `data` at each host piece of `m` with a plain file handle, as a
/// server would with the descriptor.
fn write_pieces(f: &std::fs::File, m: &MappedWrite<'_>, data: &[u8]) -> u64 {
    let mut n = 0;
    for (h, r) in m.pieces() {
        f.write_all_at(&data[r.clone()], *h).unwrap();
        n += r.len() as u64;
    }
    n
}

#[test]
fn plain_requests_are_mapped_the_rest_is_not() {
    let dir = tempfile::tempdir().unwrap();
    let p = image(&dir, 64 * K);
    let img = Image::open(&p, &OpenOptions::read_write()).unwrap();
    assert!(img.data_file().is_some(), "a plain file is mapped");
    // Unallocated: a write would allocate (not mapped), a read is zeroes.
    assert!(img.try_map_write(0, 4096).unwrap().is_none());
    let r = img.try_map_read(0, 8192).unwrap().unwrap();
    assert_eq!(
        r.pieces(),
        &[MapPiece {
            at: 0,
            len: 8192,
            host: None
        }]
    );
    drop(r);
    img.write(0, &vec![7u8; 128 * K as usize], 0).unwrap();
    // Two allocated clusters: one piece each, or one when adjacent in the file.
    let r = img.try_map_read(60 * K, 8192).unwrap().unwrap();
    let hosts: Vec<_> = r.pieces().iter().map(|p| p.host.is_some()).collect();
    assert!(hosts.iter().all(|&h| h));
    assert_eq!(r.pieces().iter().map(|p| p.len).sum::<usize>(), 8192);
    drop(r);
    // Out of range: the request's own error.
    assert!(img.try_map_read((1 << 20) - 512, 1024).is_err());
    assert!(img.try_map_write((1 << 20) - 512, 1024).is_err());
    // A compressed cluster is left to the engine.
    img.write_compressed(256 * K, &vec![9u8; 64 * K as usize])
        .unwrap();
    assert!(img.try_map_read(256 * K, 4096).unwrap().is_none());
    assert!(img.try_map_write(256 * K, 4096).unwrap().is_none());
    // A zero cluster that keeps its allocation: written anew, not mapped.
    img.write_zeroes(0, 64 * K, 0).unwrap();
    assert!(img.try_map_write(0, 4096).unwrap().is_none());
    img.close().unwrap();
}

#[test]
fn a_mapped_write_holds_its_clusters_and_the_next_flush_syncs_it() {
    let dir = tempfile::tempdir().unwrap();
    let p = image(&dir, 4 * K);
    let img = Image::open(&p, &OpenOptions::read_write()).unwrap();
    img.write(0, &vec![1u8; 16 * K as usize], 0).unwrap();
    img.flush().unwrap();
    let f = std::fs::OpenOptions::new().write(true).open(&p).unwrap();

    let syncs = img.stats().file_syncs;
    img.flush().unwrap();
    assert_eq!(img.stats().file_syncs, syncs, "nothing written: no sync");

    let m = img.try_map_write(4 * K, 4096).unwrap().expect("in place");
    assert_eq!(m.pieces().len(), 1);
    // The same cluster cannot be mapped twice, nor written meanwhile.
    assert!(img.try_map_write(4 * K + 512, 512).unwrap().is_none());
    let (tx, rx) = mpsc::channel();
    std::thread::scope(|s| {
        s.spawn(|| {
            img.write(4 * K, &[3u8; 512], 0).unwrap();
            tx.send(()).unwrap();
        });
        assert!(
            rx.recv_timeout(Duration::from_millis(300)).is_err(),
            "a write to a mapped cluster waits for the mapping"
        );
        let n = write_pieces(&f, &m, &[2u8; 4096]);
        m.finish(Ok(n)).unwrap();
        rx.recv_timeout(Duration::from_secs(10))
            .expect("the write ran once the mapping finished");
    });
    let mut b = vec![0u8; 4096];
    img.read(4 * K, &mut b).unwrap();
    assert!(b[..512].iter().all(|&x| x == 3) && b[512..].iter().all(|&x| x == 2));
    let syncs = img.stats().file_syncs;
    img.flush().unwrap();
    assert!(img.stats().file_syncs > syncs, "the mapped write is synced");

    // Other clusters are mapped meanwhile; write_now writes through the engine.
    let a = img.try_map_write(8 * K, 4096).unwrap().unwrap();
    let b2 = img.try_map_write(12 * K, 4096).unwrap().unwrap();
    b2.write_now(&[5u8; 4096]).unwrap();
    a.finish(Ok(0)).unwrap();
    let mut b = vec![0u8; 4096];
    img.read(12 * K, &mut b).unwrap();
    assert!(b.iter().all(|&x| x == 5));
    img.close().unwrap();
    let o = std::process::Command::new("qemu-img")
        .args(["check", p.to_str().unwrap()])
        .output()
        .expect("qemu-img");
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stdout));
}

#[test]
fn nothing_is_mapped_under_writethrough_encryption_or_read_only() {
    let dir = tempfile::tempdir().unwrap();
    let p = image(&dir, 64 * K);
    {
        let img = Image::open(&p, &OpenOptions::read_write()).unwrap();
        img.write(0, &[1u8; 4096], 0).unwrap();
        img.close().unwrap();
    }
    let img = Image::open(
        &p,
        &OpenOptions {
            cache: CacheMode::Writethrough,
            ..OpenOptions::read_write()
        },
    )
    .unwrap();
    assert!(img.try_map_write(0, 4096).unwrap().is_none());
    assert!(img.try_map_read(0, 4096).unwrap().is_some());
    img.close().unwrap();
    let img = Image::open(&p, &OpenOptions::read_only()).unwrap();
    assert!(img.try_map_write(0, 4096).is_err(), "read-only");
    img.close().unwrap();
}
