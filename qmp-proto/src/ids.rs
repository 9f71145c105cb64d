//! The ids commands carry on the wire.
//!
//! QEMU reads its monitor socket one byte per system call (about 3 µs each on the machines we
//! measured), so every byte of a command is QEMU CPU time spent before it even starts the
//! command. A request's [`RequestId`](crate::RequestId) is unique for the life of the connection
//! and grows without bound; the id written on the wire is instead the smallest number not held by
//! another written request, so it stays one or two digits. A number is held from the moment its
//! command is written until a response with it arrives (abandoned requests keep theirs, so a
//! late response can never be taken for a newer request's) or the connection closes.

/// The id `qmp_capabilities` carries; request ids on the wire start above it.
pub(crate) const NEGOTIATION_ID: u64 = 0;

/// Which request holds each wire id.
#[derive(Default)]
pub(crate) struct WireIds {
    /// `holders[w - 1]`: the request (its unique id) holding wire id `w`, if any.
    holders: Vec<Option<u64>>,
    /// Released wire ids, a bit per entry of `holders` (set: free). A bitmap rather than a heap:
    /// the smallest free id is a `trailing_zeros` away, and taking or releasing one touches one
    /// word.
    free: Vec<u64>,
    /// No word before this one has a bit set.
    first_free: usize,
}

impl WireIds {
    /// Gives `request` the smallest free wire id.
    pub(crate) fn take(&mut self, request: u64) -> u64 {
        let index = match self.free[self.first_free.min(self.free.len())..]
            .iter()
            .position(|&w| w != 0)
        {
            Some(k) => {
                let word = self.first_free + k;
                self.first_free = word;
                let bit = self.free[word].trailing_zeros() as usize;
                self.free[word] &= !(1 << bit);
                word * 64 + bit
            }
            None => {
                self.first_free = self.free.len();
                self.holders.push(None);
                if self.holders.len() > self.free.len() * 64 {
                    self.free.push(0);
                }
                self.holders.len() - 1
            }
        };
        self.holders[index] = Some(request);
        index as u64 + 1
    }

    /// The request holding `wire`, if any.
    pub(crate) fn holder(&self, wire: u64) -> Option<u64> {
        self.holders.get(index(wire)?).copied().flatten()
    }

    /// Frees `wire` for the next command.
    pub(crate) fn release(&mut self, wire: u64) {
        let Some(i) = index(wire) else { return };
        if let Some(slot) = self.holders.get_mut(i)
            && slot.take().is_some()
        {
            self.free[i / 64] |= 1 << (i % 64);
            self.first_free = self.first_free.min(i / 64);
        }
    }

    /// Frees every id (the connection closed).
    pub(crate) fn clear(&mut self) {
        self.holders.clear();
        self.free.clear();
        self.first_free = 0;
    }
}

/// Where wire id `wire` sits in `holders` (0 is the handshake's, never held).
fn index(wire: u64) -> Option<usize> {
    usize::try_from(wire.checked_sub(1)?).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn smallest_free_id_is_reused() {
        let mut ids = WireIds::default();
        assert_eq!((ids.take(10), ids.take(11), ids.take(12)), (1, 2, 3));
        ids.release(2);
        ids.release(1);
        assert_eq!(ids.holder(1), None);
        assert_eq!(ids.holder(3), Some(12));
        assert_eq!((ids.take(13), ids.take(14), ids.take(15)), (1, 2, 4));
        ids.release(2);
        ids.release(2);
        assert_eq!(
            (ids.take(16), ids.take(17)),
            (2, 5),
            "a double release frees once"
        );
        assert_eq!((ids.holder(0), ids.holder(u64::MAX)), (None, None));
    }

    /// Against a model (the smallest id no request holds), across many words of the bitmap.
    #[test]
    fn matches_a_model_past_one_word() {
        let mut ids = WireIds::default();
        let mut held = std::collections::BTreeMap::new();
        let mut x = 0x9E37_79B9_7F4A_7C15_u64;
        for request in 0..50_000_u64 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            // Mostly grow to a few hundred, then drain: ids beyond the first words get reused.
            let grow = (request / 5_000) % 2 == 0;
            if held.is_empty() || x % 10 < if grow { 6 } else { 3 } {
                let want = (1..).find(|w| !held.contains_key(w)).unwrap_or(0);
                assert_eq!(ids.take(request), want);
                held.insert(want, request);
            } else {
                let victim = *held
                    .keys()
                    .nth((x as usize / 10) % held.len())
                    .unwrap_or(&1);
                ids.release(victim);
                ids.release(victim);
                held.remove(&victim);
            }
            if request % 97 == 0 {
                for w in 0..=held.len() as u64 + 65 {
                    assert_eq!(ids.holder(w), held.get(&w).copied(), "holder of {w}");
                }
            }
        }
        ids.clear();
        assert_eq!((ids.take(1), ids.take(2)), (1, 2));
    }
}
