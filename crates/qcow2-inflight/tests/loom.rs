//! Model checks of the range locks and tickets under every interleaving
//! loom explores. Run with `RUSTFLAGS="--cfg loom" cargo test -p
//! qcow2-inflight --release` (without the cfg this file is empty).
#![cfg(loom)]

use loom::sync::atomic::{AtomicU32, Ordering::SeqCst};
use loom::sync::Arc;
use loom::thread;
use qcow2_inflight::{RangeLocks, Tickets};

/// Two overlapping holders are never inside at once; a disjoint one may be.
#[test]
fn overlapping_ranges_exclude_each_other() {
    loom::model(|| {
        let locks = Arc::new(RangeLocks::new());
        let inside = Arc::new(AtomicU32::new(0));
        let spawn = |start: u64, end: u64, bit: u32| {
            let (locks, inside) = (Arc::clone(&locks), Arc::clone(&inside));
            thread::spawn(move || {
                let _g = locks.lock(start, end);
                let before = inside.fetch_or(bit, SeqCst);
                // Clusters 2..4 and 3..6 overlap: bits 1 and 2 never together.
                assert!(!(bit == 2 && before & 4 != 0) && !(bit == 4 && before & 2 != 0));
                inside.fetch_and(!bit, SeqCst);
            })
        };
        let a = spawn(2, 4, 2);
        let b = spawn(3, 6, 4);
        let c = spawn(6, 8, 8);
        a.join().unwrap();
        b.join().unwrap();
        c.join().unwrap();
        assert_eq!(locks.held(), 0);
    });
}

/// The oldest ticket never runs ahead of one still out: a free queued at
/// number `n` is released only when every ticket below `n` is returned.
#[test]
fn oldest_ticket_is_a_lower_bound() {
    loom::model(|| {
        let t = Arc::new(Tickets::new());
        let reader = {
            let t = Arc::clone(&t);
            thread::spawn(move || {
                let k = t.take(1);
                // While our ticket is out, nobody may see an oldest above it.
                assert!(t.oldest().unwrap() <= 1);
                drop(k);
            })
        };
        let other = {
            let t = Arc::clone(&t);
            thread::spawn(move || {
                let k = t.take(2);
                let o = t.oldest().unwrap();
                assert!(o == 1 || o == 2);
                drop(k);
            })
        };
        reader.join().unwrap();
        other.join().unwrap();
        assert_eq!(t.oldest(), None);
    });
}
