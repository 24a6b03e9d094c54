//! Model checks of the range locks and tickets under every interleaving
//! loom explores. Run with `RUSTFLAGS="--cfg loom" cargo test -p
//! qcow2-inflight --release` (without the cfg this file is empty).
#![cfg(loom)]

use loom::sync::atomic::{AtomicU32, Ordering::SeqCst};
use loom::sync::Arc;
use loom::thread;
use qcow2_inflight::{RangeLocks, Tickets};

/// Two overlapping holders are never inside at once, in every interleaving
/// (checked to fail when the overlap test is broken). Wake-ups are not what
/// this proves: loom lets condvar waits return spuriously, and the waiter
/// re-checks its condition in a loop; `waiter_runs_after_release` in the
/// unit tests covers the release path.
#[test]
fn overlapping_ranges_exclude_each_other() {
    let mut b = loom::model::Builder::new();
    // Condvar loops explode the state space; two preemptions cover the
    // orders that matter for one lock/unlock pair per thread.
    b.preemption_bound = Some(2);
    b.check(|| {
        let locks = Arc::new(RangeLocks::new());
        let inside = Arc::new(AtomicU32::new(0));
        let other = {
            let (locks, inside) = (Arc::clone(&locks), Arc::clone(&inside));
            thread::spawn(move || {
                let _g = locks.lock(3, 6);
                assert_eq!(
                    inside.fetch_add(1, SeqCst),
                    0,
                    "overlapping ranges held at once"
                );
                inside.fetch_sub(1, SeqCst);
            })
        };
        {
            let _g = locks.lock(2, 4);
            assert_eq!(
                inside.fetch_add(1, SeqCst),
                0,
                "overlapping ranges held at once"
            );
            // A disjoint range is free meanwhile.
            assert!(locks.try_lock(6, 8).is_some());
            inside.fetch_sub(1, SeqCst);
        }
        other.join().unwrap();
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
