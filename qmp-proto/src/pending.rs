//! The table of pending requests, keyed by request id.
//!
//! Request ids are handed out in order and QEMU answers roughly in order, so the table is a
//! window of slots indexed by `id - base`: insert, lookup and removal touch one slot, with no
//! hashing and no rebalancing. (A `BTreeMap` here spent about 75 ns per removal shifting the
//! entries of a leaf, 6% of the client's CPU time for 32 pipelined commands.)
//!
//! One request left unanswered while thousands of later ones complete (a command that never
//! replies, OOB commands streaming past a long in-band one) would stretch the window without
//! bound. So when the window spans more than four times the entries it holds (and more than
//! [`MIN_SPAN`] slots), its oldest entries move to an ordered side table: memory stays
//! proportional to the number of pending requests, and each entry moves at most once.
//!
//! It is a map for any ids (the unit tests check it against a `BTreeMap`); increasing ones, as a
//! connection hands out, are the fast path.

use std::collections::{BTreeMap, VecDeque};

/// Spans up to this many slots are never compacted.
const MIN_SPAN: usize = 64;

/// Pending requests by id, iterated in id order.
pub(crate) struct Pending<E> {
    /// Slots for ids `base..base + window.len()`; `None` for answered ones. Never starts or ends
    /// with `None`.
    window: VecDeque<Option<E>>,
    base: u64,
    /// Entries older than `base` (all of them are, always).
    stragglers: BTreeMap<u64, E>,
    len: usize,
}

impl<E> Default for Pending<E> {
    fn default() -> Self {
        Self {
            window: VecDeque::new(),
            base: 0,
            stragglers: BTreeMap::new(),
            len: 0,
        }
    }
}

impl<E> Pending<E> {
    pub(crate) fn len(&self) -> usize {
        self.len
    }

    /// Adds (or replaces) the entry for `id`. Ids above every id in the table are the fast path.
    pub(crate) fn insert(&mut self, id: u64, entry: E) {
        if self.window.is_empty()
            && self
                .stragglers
                .last_key_value()
                .is_none_or(|(&k, _)| k < id)
        {
            self.base = id;
        }
        if id < self.base {
            if self.stragglers.insert(id, entry).is_none() {
                self.len += 1;
            }
            return;
        }
        // Offsets from `base`, not ids past the window's end: those could overflow at the top.
        let gap = (id - self.base).saturating_sub(self.window.len() as u64);
        if gap > (MIN_SPAN as u64).max(4 * self.len as u64) {
            // Far ahead of the window: everything in it becomes a straggler.
            self.retire_all();
            self.base = id;
        }
        let index = (id - self.base) as usize;
        if index >= self.window.len() {
            self.window.resize_with(index, || None);
            self.window.push_back(Some(entry));
            self.len += 1;
        } else if self.window[index].replace(entry).is_none() {
            self.len += 1;
        }
        self.compact();
    }

    pub(crate) fn get(&self, id: u64) -> Option<&E> {
        match self.index(id) {
            Some(i) => self.window[i].as_ref(),
            None => self.stragglers.get(&id),
        }
    }

    pub(crate) fn get_mut(&mut self, id: u64) -> Option<&mut E> {
        match self.index(id) {
            Some(i) => self.window[i].as_mut(),
            None => self.stragglers.get_mut(&id),
        }
    }

    pub(crate) fn remove(&mut self, id: u64) -> Option<E> {
        let entry = match self.index(id) {
            Some(i) => {
                let entry = self.window[i].take()?;
                self.trim();
                entry
            }
            None => self.stragglers.remove(&id)?,
        };
        self.len -= 1;
        self.compact();
        Some(entry)
    }

    /// Every entry, in id order.
    pub(crate) fn iter(&self) -> impl Iterator<Item = (u64, &E)> {
        let window = (self.window.iter().zip(self.base..=u64::MAX))
            .filter_map(|(slot, id)| Some((id, slot.as_ref()?)));
        self.stragglers.iter().map(|(&id, e)| (id, e)).chain(window)
    }

    /// Every entry, in id order.
    pub(crate) fn into_entries(self) -> impl Iterator<Item = (u64, E)> {
        let Self {
            window,
            base,
            stragglers,
            ..
        } = self;
        let window =
            (window.into_iter().zip(base..=u64::MAX)).filter_map(|(slot, id)| Some((id, slot?)));
        stragglers.into_iter().chain(window)
    }

    fn index(&self, id: u64) -> Option<usize> {
        let offset = id.checked_sub(self.base)?;
        (offset < self.window.len() as u64).then_some(offset as usize)
    }

    /// Keeps the window within four times the entries it holds, retiring its oldest entries.
    fn compact(&mut self) {
        let mut live = self.len - self.stragglers.len();
        if self.window.len() <= MIN_SPAN.max(4 * live) {
            return;
        }
        while self.window.len() > MIN_SPAN.max(2 * live) {
            if let Some(Some(entry)) = self.window.pop_front() {
                self.stragglers.insert(self.base, entry);
                live -= 1;
            }
            self.base += 1;
            self.trim();
        }
    }

    /// Moves every entry of the window to `stragglers`.
    fn retire_all(&mut self) {
        for (slot, id) in self.window.drain(..).zip(self.base..=u64::MAX) {
            if let Some(entry) = slot {
                self.stragglers.insert(id, entry);
            }
        }
    }

    /// Drops answered slots at both ends, and the memory of a burst once the window is empty.
    fn trim(&mut self) {
        // The back first: the front then has a later entry behind it, so `base` stays in range.
        while let Some(None) = self.window.back() {
            self.window.pop_back();
        }
        while let Some(None) = self.window.front() {
            self.window.pop_front();
            self.base += 1;
        }
        if self.window.is_empty() && self.window.capacity() > 4 * MIN_SPAN {
            self.window.shrink_to(MIN_SPAN);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The table and a `BTreeMap` given the same operations agree, and the window stays bounded.
    fn check(ops: &[(bool, u64)]) {
        let (mut table, mut model) = (Pending::default(), BTreeMap::new());
        for (step, &(insert, id)) in ops.iter().enumerate() {
            if insert {
                table.insert(id, id.wrapping_mul(10));
                model.insert(id, id.wrapping_mul(10));
            } else {
                assert_eq!(table.remove(id), model.remove(&id), "remove {id}");
            }
            assert_eq!(table.len(), model.len());
            let live = table.len() - table.stragglers.len();
            assert!(table.window.len() <= MIN_SPAN.max(4 * live));
            if step % 61 == 0 || ops.len() < 100 {
                let got: Vec<(u64, u64)> = table.iter().map(|(id, &e)| (id, e)).collect();
                let want: Vec<(u64, u64)> = model.iter().map(|(&id, &e)| (id, e)).collect();
                assert_eq!(got, want);
            }
            assert!(!matches!(table.window.front(), Some(None)));
            assert!(!matches!(table.window.back(), Some(None)));
            assert!(table.stragglers.keys().all(|&k| k < table.base));
            for probe in [id, id.wrapping_sub(1), id.wrapping_add(1)] {
                assert_eq!(table.get(probe), model.get(&probe));
            }
        }
        let all: Vec<(u64, u64)> = table.into_entries().collect();
        assert_eq!(all, model.into_iter().collect::<Vec<_>>());
    }

    #[test]
    fn answered_in_order_and_out_of_order() {
        let mut ops = Vec::new();
        for id in 0..200 {
            ops.push((true, id));
            if id >= 32 {
                // Answered in a scrambled order 32 behind.
                ops.push((false, (id - 32) ^ 5));
            }
        }
        check(&ops);
    }

    #[test]
    fn a_request_left_behind_does_not_stretch_the_window() {
        let mut ops = vec![(true, 1)];
        for id in 2..10_000 {
            ops.push((true, id));
            ops.push((false, id));
        }
        ops.push((false, 1));
        check(&ops);
    }

    #[test]
    fn ids_out_of_order_and_far_apart() {
        check(&[
            (true, 100),
            (true, 5),
            (true, 100),
            (true, 1 << 40),
            (true, 101),
            (false, 5),
            (false, 100),
            (true, u64::MAX - 1),
            (false, 1 << 40),
            (false, 7),
            (false, 101),
        ]);
    }

    #[test]
    fn an_id_below_the_stragglers_after_the_window_empties() {
        check(&[
            (true, 0),
            (true, 100),
            (true, 300),
            (false, 300),
            (true, 50),
            (true, 100),
            (true, 400),
            (false, 0),
        ]);
    }

    #[test]
    fn ids_at_the_top() {
        let top = u64::MAX;
        check(&[
            (true, top - 2),
            (true, top),
            (true, top - 1),
            (false, top - 1),
            (false, top),
            (true, top),
            (false, top - 2),
            (false, top),
            (true, top),
            (true, 5),
            (false, top),
        ]);
    }

    /// Any ids at all, not only increasing ones: still a map.
    #[test]
    fn arbitrary_ids() {
        for seed in 1..200_u64 {
            let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15);
            let mut ops = Vec::new();
            for _ in 0..300 {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                let id = match x % 8 {
                    0 => u64::MAX - x % 4,
                    1 => x,
                    _ => x % 500,
                };
                ops.push((x % 3 != 0, id));
            }
            check(&ops);
        }
    }

    #[test]
    fn pseudo_random_operations() {
        let mut x = 0x9E37_79B9_7F4A_7C15_u64;
        let mut ops = Vec::new();
        let mut next = 0_u64;
        for _ in 0..20_000 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            if x.is_multiple_of(3) {
                ops.push((false, next.saturating_sub(x % 300)));
            } else {
                ops.push((true, next));
                next += 1 + u64::from(x.is_multiple_of(97)) * (x % 1000);
            }
        }
        check(&ops);
    }
}
