//! The bytes waiting to be written, and which of them start a command that carries fds.

use std::collections::VecDeque;

use crate::command::RequestId;

/// Bytes to write to the transport, from [`Connection::poll_transmit`](crate::Connection::poll_transmit).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct Transmit<'a> {
    /// The bytes. Write as many as the transport takes, then call
    /// [`Connection::advance_transmit`](crate::Connection::advance_transmit) with that count.
    pub data: &'a [u8],
    /// `Some(id)` when `data` starts with the first byte of request `id`, which was sent
    /// [`with_fds`](crate::Command::with_fds): send its file descriptors as `SCM_RIGHTS` with the
    /// write that carries that first byte. Such a command always starts a new `Transmit`, so the
    /// descriptors never ride with an earlier command's bytes.
    pub fds_for: Option<RequestId>,
}

/// The outgoing buffer. Bytes are never dropped once queued (a half-written command would wedge
/// QEMU's parser), except when the connection closes.
#[derive(Default)]
pub(crate) struct TransmitBuf {
    buf: Vec<u8>,
    pos: usize,
    /// Offsets in `buf` where an fd-carrying command starts, in order.
    marks: VecDeque<(usize, RequestId)>,
}

impl TransmitBuf {
    /// The buffer to append a command to; call [`mark_fds`](Self::mark_fds) first if it has fds.
    pub(crate) fn buf(&mut self) -> &mut Vec<u8> {
        &mut self.buf
    }

    pub(crate) fn mark_fds(&mut self, id: RequestId) {
        self.marks.push_back((self.buf.len(), id));
    }

    /// Marks bytes already appended at `offset` (the end of the buffer before they were).
    pub(crate) fn mark_fds_at(&mut self, offset: usize, id: RequestId) {
        self.marks.push_back((offset, id));
    }

    /// Whether bytes not yet acknowledged start request `id` with file descriptors.
    pub(crate) fn has_mark(&self, id: RequestId) -> bool {
        self.marks.iter().any(|&(_, m)| m == id)
    }

    pub(crate) fn pending(&self) -> usize {
        self.buf.len() - self.pos
    }

    pub(crate) fn peek(&self) -> Option<Transmit<'_>> {
        if self.pos == self.buf.len() {
            return None;
        }
        let (end, fds_for) = match (self.marks.front(), self.marks.get(1)) {
            (Some(&(at, id)), next) if at == self.pos => {
                (next.map_or(self.buf.len(), |&(n, _)| n), Some(id))
            }
            (Some(&(at, _)), _) => (at, None),
            (None, _) => (self.buf.len(), None),
        };
        Some(Transmit {
            data: &self.buf[self.pos..end],
            fds_for,
        })
    }

    /// Acknowledges `n` bytes of the last [`peek`](Self::peek) as written (clamped to its length).
    pub(crate) fn advance(&mut self, n: usize) -> usize {
        let Some(t) = self.peek() else { return 0 };
        let n = n.min(t.data.len());
        if n == 0 {
            return 0;
        }
        if t.fds_for.is_some() {
            self.marks.pop_front();
        }
        self.pos += n;
        if self.pos == self.buf.len() {
            self.buf.clear();
            self.pos = 0;
        } else if self.pos >= 64 * 1024 && self.pos * 2 >= self.buf.len() {
            // A slow writer: reclaim the written prefix now and then, in amortized linear time.
            self.buf.drain(..self.pos);
            for mark in &mut self.marks {
                mark.0 -= self.pos;
            }
            self.pos = 0;
        }
        n
    }

    pub(crate) fn clear(&mut self) {
        self.buf = Vec::new();
        self.pos = 0;
        self.marks.clear();
    }
}
