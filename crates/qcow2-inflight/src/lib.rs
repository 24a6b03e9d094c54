//! In-flight request tracking for the qcow2 engine's data path: guest range
//! locks ([`RangeLocks`]) and mapping tickets ([`Tickets`]). See the README
//! for the part each plays; both are model-checked with loom
//! (`RUSTFLAGS="--cfg loom" cargo test -p qcow2-inflight --release`).
#![forbid(unsafe_code)]
#![warn(missing_docs)]

#[cfg(loom)]
use loom::sync::{Condvar, Mutex, MutexGuard};
#[cfg(not(loom))]
use std::sync::{Condvar, Mutex, MutexGuard};

use std::collections::BTreeMap;

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while holding these short critical sections leaves the maps
    // consistent (every mutation is a single insert or remove).
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Exclusive locks on half-open ranges `[start, end)` (of guest clusters).
///
/// Held ranges never overlap, so they are kept sorted by start: a new range
/// overlaps a held one exactly when the held range with the largest start
/// below the new end reaches past the new start.
#[derive(Default)]
pub struct RangeLocks {
    held: Mutex<Held>,
    released: Condvar,
}

/// The held ranges (start → end) and how many callers wait for one.
#[derive(Default)]
struct Held {
    ranges: BTreeMap<u64, u64>,
    waiters: usize,
}

/// A held range; released on drop.
#[must_use = "the range is unlocked when the guard is dropped"]
pub struct RangeGuard<'a> {
    locks: &'a RangeLocks,
    start: u64,
}

impl RangeLocks {
    /// A lock table with nothing held.
    pub fn new() -> RangeLocks {
        RangeLocks::default()
    }

    fn overlaps(held: &Held, start: u64, end: u64) -> bool {
        held.ranges
            .range(..end)
            .next_back()
            .is_some_and(|(_, &e)| e > start)
    }

    /// Waits until no held range overlaps `[start, end)`, then holds it.
    /// An empty range is widened to one unit.
    pub fn lock(&self, start: u64, end: u64) -> RangeGuard<'_> {
        let end = end.max(start.saturating_add(1));
        let mut held = lock(&self.held);
        while Self::overlaps(&held, start, end) {
            held.waiters += 1;
            held = self.released.wait(held).unwrap_or_else(|e| e.into_inner());
            held.waiters -= 1;
        }
        held.ranges.insert(start, end);
        RangeGuard { locks: self, start }
    }

    /// Holds `[start, end)` if nothing overlapping is held.
    pub fn try_lock(&self, start: u64, end: u64) -> Option<RangeGuard<'_>> {
        let end = end.max(start.saturating_add(1));
        let mut held = lock(&self.held);
        if Self::overlaps(&held, start, end) {
            return None;
        }
        held.ranges.insert(start, end);
        Some(RangeGuard { locks: self, start })
    }

    /// How many ranges are held.
    pub fn held(&self) -> usize {
        lock(&self.held).ranges.len()
    }
}

impl Drop for RangeGuard<'_> {
    fn drop(&mut self) {
        let mut held = lock(&self.locks.held);
        held.ranges.remove(&self.start);
        // Waking is a system call: only when somebody waits (a waiter
        // counts itself under the same lock before it sleeps).
        let wake = held.waiters > 0;
        drop(held);
        if wake {
            self.locks.released.notify_all();
        }
    }
}

/// Numbered tickets of requests in flight.
///
/// The numbers come from the caller (the image's sequence, taken under its
/// lock, so that they are ordered with the metadata changes made under that
/// lock). [`Tickets::oldest`] tells which changes every request in flight
/// has seen.
#[derive(Default)]
pub struct Tickets {
    active: Mutex<BTreeMap<u64, u32>>,
}

/// A ticket in use; returned on drop.
#[must_use = "the ticket is returned when the guard is dropped"]
pub struct Ticket<'a> {
    tickets: &'a Tickets,
    number: u64,
}

impl Tickets {
    /// No ticket out.
    pub fn new() -> Tickets {
        Tickets::default()
    }

    /// Hands out ticket `number` (several requests may share a number).
    pub fn take(&self, number: u64) -> Ticket<'_> {
        *lock(&self.active).entry(number).or_insert(0) += 1;
        Ticket {
            tickets: self,
            number,
        }
    }

    /// The lowest number still out.
    pub fn oldest(&self) -> Option<u64> {
        lock(&self.active).keys().next().copied()
    }
}

impl Ticket<'_> {
    /// The ticket's number.
    pub fn number(&self) -> u64 {
        self.number
    }
}

impl Drop for Ticket<'_> {
    fn drop(&mut self) {
        let mut a = lock(&self.tickets.active);
        if let Some(n) = a.get_mut(&self.number) {
            *n -= 1;
            if *n == 0 {
                a.remove(&self.number);
            }
        }
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;

    #[test]
    fn overlap_rules() {
        let l = RangeLocks::new();
        let a = l.lock(10, 20);
        assert!(l.try_lock(19, 30).is_none());
        assert!(l.try_lock(0, 11).is_none());
        assert!(l.try_lock(12, 13).is_none());
        assert!(l.try_lock(5, 25).is_none());
        let b = l.try_lock(20, 30).expect("adjacent after");
        let c = l.try_lock(0, 10).expect("adjacent before");
        assert!(l.try_lock(15, 15).is_none(), "empty range widened");
        assert_eq!(l.held(), 3);
        drop(a);
        assert!(l.try_lock(10, 20).is_some());
        drop((b, c));
        assert_eq!(l.held(), 0);
    }

    #[test]
    fn waiter_runs_after_release() {
        use std::sync::atomic::{AtomicBool, Ordering};
        let l = RangeLocks::new();
        let done = AtomicBool::new(false);
        std::thread::scope(|s| {
            let g = l.lock(0, 4);
            let h = s.spawn(|| {
                let _g = l.lock(3, 8);
                assert!(done.load(Ordering::SeqCst));
            });
            std::thread::sleep(std::time::Duration::from_millis(20));
            done.store(true, Ordering::SeqCst);
            drop(g);
            h.join().unwrap();
        });
    }

    #[test]
    fn oldest_ticket() {
        let t = Tickets::new();
        assert_eq!(t.oldest(), None);
        let a = t.take(5);
        let b = t.take(3);
        let c = t.take(3);
        assert_eq!(t.oldest(), Some(3));
        drop(b);
        assert_eq!(t.oldest(), Some(3));
        drop(c);
        assert_eq!(t.oldest(), Some(5));
        assert_eq!(a.number(), 5);
        drop(a);
        assert_eq!(t.oldest(), None);
    }
}
