//! The ids commands carry on the wire.
//!
//! QEMU reads its monitor socket one byte per system call (about 3 µs each on the machines we
//! measured), so every byte of a command is QEMU CPU time spent before it even starts the
//! command. A request's [`RequestId`](crate::RequestId) is unique for the life of the connection
//! and grows without bound; the id written on the wire is instead the smallest number not held by
//! another written request, so it stays one or two digits. A number is held from the moment its
//! command is written until a response with it arrives (abandoned requests keep theirs, so a
//! late response can never be taken for a newer request's) or the connection closes.

use std::cmp::Reverse;
use std::collections::BinaryHeap;

/// The id `qmp_capabilities` carries; request ids on the wire start above it.
pub(crate) const NEGOTIATION_ID: u64 = 0;

/// Which request holds each wire id.
#[derive(Default)]
pub(crate) struct WireIds {
    /// `holders[w - 1]`: the request (its unique id) holding wire id `w`, if any.
    holders: Vec<Option<u64>>,
    /// Released wire ids, smallest first.
    free: BinaryHeap<Reverse<u64>>,
}

impl WireIds {
    /// Gives `request` the smallest free wire id.
    pub(crate) fn take(&mut self, request: u64) -> u64 {
        let wire = match self.free.pop() {
            Some(Reverse(wire)) => wire,
            None => {
                self.holders.push(None);
                self.holders.len() as u64
            }
        };
        if let Some(slot) = self.slot(wire) {
            *slot = Some(request);
        }
        wire
    }

    /// The request holding `wire`, if any.
    pub(crate) fn holder(&self, wire: u64) -> Option<u64> {
        self.holders.get(index(wire)?).copied().flatten()
    }

    /// Frees `wire` for the next command.
    pub(crate) fn release(&mut self, wire: u64) {
        if let Some(slot) = self.slot(wire)
            && slot.take().is_some()
        {
            self.free.push(Reverse(wire));
        }
    }

    /// Frees every id (the connection closed).
    pub(crate) fn clear(&mut self) {
        self.holders.clear();
        self.free.clear();
    }

    fn slot(&mut self, wire: u64) -> Option<&mut Option<u64>> {
        self.holders.get_mut(index(wire)?)
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
}
