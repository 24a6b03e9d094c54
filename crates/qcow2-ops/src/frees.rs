//! Deferred frees: host clusters whose refcount drops once the L2/L1 change
//! that dropped them is durable (ordering rule 2 in `durability`), and once
//! no request in flight may still use them (its ticket is older).

use std::collections::{BTreeSet, VecDeque};

/// Host clusters waiting to be released, in the order they were queued.
#[derive(Default)]
pub(crate) struct Frees {
    /// (host cluster index, stamp) in stamp order.
    list: VecDeque<(u64, u64)>,
    /// Clusters to punch once freed (discard requests).
    punch: BTreeSet<u64>,
    /// How many of the first entries are known to free no cluster when
    /// applied (shared clusters; see `Inner::reclaim_pending_frees`).
    checked: usize,
    /// How many of the first entries were queued by requests that completed.
    settled: usize,
    /// Stamp of the last change of a mapping (see [`Frees::stamp`]).
    stamp: u64,
}

impl Frees {
    /// Queues cluster `c`; with `punch`, a hole is punched once it is freed.
    pub(crate) fn push(&mut self, c: u64, punch: bool) {
        self.stamp += 1;
        self.list.push_back((c, self.stamp));
        if punch {
            self.punch.insert(c);
        }
    }

    /// The number a request takes as its ticket when it looks up mappings:
    /// frees queued after that carry a higher stamp.
    pub(crate) fn stamp(&self) -> u64 {
        self.stamp
    }

    pub(crate) fn len(&self) -> usize {
        self.list.len()
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.list.is_empty()
    }

    /// Every queued free belongs to a completed request.
    pub(crate) fn settle(&mut self) {
        self.settled = self.list.len();
    }

    /// The next cluster of a completed request not yet known to free
    /// nothing, for `reclaim_pending_frees`.
    pub(crate) fn next_unchecked(&self) -> Option<u64> {
        let settled = self.settled.min(self.list.len());
        (self.checked < settled).then(|| self.list[self.checked].0)
    }

    /// The cluster `next_unchecked` gave frees nothing when applied.
    pub(crate) fn mark_checked(&mut self) {
        self.checked += 1;
    }

    /// Removes the frees that every request in flight has seen (all of
    /// them when none is in flight: `oldest` is the oldest ticket out) and
    /// returns them with the set of clusters to punch among them.
    pub(crate) fn take_ready(&mut self, oldest: Option<u64>) -> (Vec<u64>, BTreeSet<u64>) {
        let n = match oldest {
            None => self.list.len(),
            Some(t) => self.list.iter().take_while(|&&(_, s)| s <= t).count(),
        };
        let ready: Vec<u64> = self.list.drain(..n).map(|(c, _)| c).collect();
        self.checked = self.checked.saturating_sub(n);
        self.settled = self.settled.saturating_sub(n);
        let mut punch = BTreeSet::new();
        for c in &ready {
            if self.punch.remove(c) {
                punch.insert(*c);
            }
        }
        (ready, punch)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_frees_seen_by_every_ticket_are_ready() {
        let mut f = Frees::default();
        f.push(10, true);
        let t = f.stamp(); // a request looks up its mappings here
        f.push(11, false);
        f.push(12, true);
        let (r, p) = f.take_ready(Some(t));
        assert_eq!(r, vec![10]);
        assert_eq!(p.into_iter().collect::<Vec<_>>(), vec![10]);
        assert_eq!(f.len(), 2);
        let (r, p) = f.take_ready(None);
        assert_eq!(r, vec![11, 12]);
        assert_eq!(p.into_iter().collect::<Vec<_>>(), vec![12]);
        assert!(f.is_empty());
    }

    #[test]
    fn checked_and_settled_follow_the_drain() {
        let mut f = Frees::default();
        f.push(1, false);
        f.push(2, false);
        assert_eq!(f.next_unchecked(), None, "nothing settled yet");
        f.settle();
        assert_eq!(f.next_unchecked(), Some(1));
        f.mark_checked();
        assert_eq!(f.next_unchecked(), Some(2));
        let t = 1;
        let _ = f.take_ready(Some(t));
        assert_eq!(f.next_unchecked(), Some(2));
        f.push(3, false);
        assert_eq!(f.next_unchecked(), Some(2));
    }
}
