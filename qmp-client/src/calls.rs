//! Where callers and the connection's task meet: a queue of requests for the task, and a slot
//! per call for its answer, behind one lock that either side holds only briefly (no parsing, no
//! I/O under it). Once warmed up, a call allocates nothing here.
//!
//! A call's slot outlives whichever side is done first: a caller that gives up marks it
//! abandoned, and the task frees it when it is done with the request (never writing it if it was
//! still queued); a caller that is answered frees it as it takes the answer. So a slot is never
//! reused while either side may still name it.

use std::mem;
use std::os::fd::OwnedFd;
use std::pin::Pin;
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::task::{Context, Poll, Waker};

use futures_channel::oneshot;
use qmp_proto::{Command, RequestId};

use crate::client::Shared;
use crate::driver::{Answer, IdMap};
use crate::error::{Disconnect, Error};

/// What callers ask of the connection's task.
pub(crate) enum Request {
    /// A command, and the slot its answer goes to.
    Execute {
        cmd: Command,
        fds: Vec<OwnedFd>,
        slot: usize,
    },
    /// Close once what is already queued is written.
    Close { done: oneshot::Sender<()> },
    /// Guest agent: resync now; `done` fires when it has finished.
    Resync { done: oneshot::Sender<()> },
}

/// A call's answer, or where it stands.
enum Slot {
    Free,
    /// The caller waits, woken with this once it has polled.
    Waiting(Option<Waker>),
    Done(Result<Answer, Error>),
    /// The caller gave up; the task frees the slot when it is done with the request.
    Abandoned,
}

#[derive(Default)]
struct Inner {
    /// Requests the task has not taken yet, in order.
    queue: Vec<Request>,
    /// The task's waker, taken (and used) by whoever gives it work.
    task: Option<Waker>,
    slots: Vec<Slot>,
    free: Vec<usize>,
    /// The task has finished: nothing more is taken or answered.
    closed: bool,
    /// Every client handle is gone: the task should close.
    orphaned: bool,
}

/// The calls of one connection. See the module docs.
#[derive(Default)]
pub(crate) struct Calls {
    inner: Mutex<Inner>,
}

impl Calls {
    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Queues `request` for the task and wakes it. `false` if the task has finished.
    pub(crate) fn request(&self, request: Request) -> bool {
        let mut inner = self.lock();
        if inner.closed {
            return false;
        }
        inner.queue.push(request);
        wake_task(inner);
        true
    }

    /// Queues a command with a fresh slot whose answer will wake `waker`. `None` if the task has
    /// finished.
    fn submit(&self, cmd: Command, fds: Vec<OwnedFd>, waker: &Waker) -> Option<usize> {
        let mut inner = self.lock();
        if inner.closed {
            return None;
        }
        let waiting = Slot::Waiting(Some(waker.clone()));
        let slot = match inner.free.pop() {
            Some(slot) => {
                inner.slots[slot] = waiting;
                slot
            }
            None => {
                inner.slots.push(waiting);
                inner.slots.len() - 1
            }
        };
        inner.queue.push(Request::Execute { cmd, fds, slot });
        wake_task(inner);
        Some(slot)
    }

    /// The answer in `slot` if there is one (the slot is then free), else registers `waker`.
    fn poll_answer(&self, slot: usize, waker: &Waker) -> Option<Result<Answer, Error>> {
        let mut inner = self.lock();
        let old = match mem::replace(&mut inner.slots[slot], Slot::Free) {
            Slot::Done(answer) => {
                inner.free.push(slot);
                return Some(answer);
            }
            Slot::Waiting(Some(w)) if w.will_wake(waker) => {
                inner.slots[slot] = Slot::Waiting(Some(w));
                return None;
            }
            // Only its caller frees a waiting slot, so `Free` and `Abandoned` cannot be seen here.
            old => {
                inner.slots[slot] = Slot::Waiting(Some(waker.clone()));
                old
            }
        };
        drop(inner);
        // Dropping a waker may run executor code, which may drop a `Call`: never under the lock.
        drop(old);
        None
    }

    /// The caller of `slot` gives up: its answer, if any, is dropped, else the task frees the slot
    /// when it is done with the request.
    fn abandon(&self, slot: usize) {
        let mut inner = self.lock();
        let old = mem::replace(&mut inner.slots[slot], Slot::Abandoned);
        if let Slot::Done(_) = old {
            inner.slots[slot] = Slot::Free;
            inner.free.push(slot);
        }
        drop(inner);
        // A late answer (perhaps a large value) is dropped outside the lock.
        drop(old);
    }

    /// Wakes the connection's task, to look at something other than requests.
    pub(crate) fn wake_task(&self) {
        wake_task(self.lock());
    }

    /// The client handles are all gone: the task closes the connection.
    pub(crate) fn orphan(&self) {
        let mut inner = self.lock();
        inner.orphaned = true;
        wake_task(inner);
    }

    /// For the task: moves the queued requests into `into` (dropping commands whose caller
    /// already gave up) and registers `waker` for more. Returns whether every client handle is
    /// gone.
    pub(crate) fn take(&self, into: &mut Vec<Request>, waker: &Waker) -> bool {
        let mut guard = self.lock();
        let inner = &mut *guard;
        for request in inner.queue.drain(..) {
            if let Request::Execute { slot, .. } = request
                && let Slot::Abandoned = inner.slots[slot]
            {
                inner.slots[slot] = Slot::Free;
                inner.free.push(slot);
                continue;
            }
            into.push(request);
        }
        let mut old = None;
        if !inner.task.as_ref().is_some_and(|w| w.will_wake(waker)) {
            old = inner.task.replace(waker.clone());
        }
        let orphaned = inner.orphaned;
        drop(guard);
        drop(old);
        orphaned
    }

    /// For the task: delivers answers, adding their callers' wakers to `wakers` (the task wakes
    /// them, so the buffer is reused instead of allocated per batch); answers to calls given up
    /// are dropped and their slots freed.
    pub(crate) fn answer(
        &self,
        answers: &mut Vec<(usize, Result<Answer, Error>)>,
        wakers: &mut Vec<Waker>,
    ) {
        if answers.is_empty() {
            return;
        }
        let mut dropped = Vec::new();
        let mut inner = self.lock();
        for (slot, answer) in answers.drain(..) {
            match &mut inner.slots[slot] {
                Slot::Waiting(waker) => {
                    wakers.extend(waker.take());
                    inner.slots[slot] = Slot::Done(answer);
                }
                _ => {
                    inner.slots[slot] = Slot::Free;
                    inner.free.push(slot);
                    dropped.push(answer);
                }
            }
        }
        drop(inner);
        drop(dropped);
    }

    /// For the task: forgets the requests in `waiters` (request → slot) whose caller gave up,
    /// calling `gone` with each, and frees their slots.
    pub(crate) fn reap(&self, waiters: &mut IdMap<usize>, mut gone: impl FnMut(RequestId)) {
        let mut inner = self.lock();
        let inner = &mut *inner;
        waiters.retain(|&id, &mut slot| {
            if let Slot::Abandoned = inner.slots[slot] {
                inner.slots[slot] = Slot::Free;
                inner.free.push(slot);
                gone(id);
                false
            } else {
                true
            }
        });
    }

    /// For the task, when the connection is over: nothing more is taken; every call still
    /// waiting fails with `reason`, and requests still queued are dropped (waking their
    /// callers' close and resync waits).
    pub(crate) fn close(&self, reason: &Disconnect) {
        let mut inner = self.lock();
        inner.closed = true;
        let queue = mem::take(&mut inner.queue);
        let mut wakers = Vec::new();
        for slot in 0..inner.slots.len() {
            match &mut inner.slots[slot] {
                Slot::Waiting(waker) => {
                    wakers.extend(waker.take());
                    inner.slots[slot] = Slot::Done(Err(Error::Disconnected(reason.clone())));
                }
                Slot::Abandoned => {
                    inner.slots[slot] = Slot::Free;
                    inner.free.push(slot);
                }
                Slot::Free | Slot::Done(_) => {}
            }
        }
        let task = inner.task.take();
        drop(inner);
        drop(task);
        for request in queue {
            if let Request::Close { done } = request {
                let _ = done.send(());
            }
        }
        wakers.into_iter().for_each(Waker::wake);
    }
}

/// Unlocks, then wakes the task if it waits for work.
fn wake_task(mut inner: MutexGuard<'_, Inner>) {
    let task = inner.task.take();
    drop(inner);
    if let Some(task) = task {
        task.wake();
    }
}

/// One command on its way: queued on first poll, answered through its slot. Dropping it gives the
/// call up (see the module docs).
pub(crate) struct Call<'a> {
    shared: &'a Shared,
    state: State,
}

enum State {
    New(Command, Vec<OwnedFd>),
    Waiting(usize),
    Finished,
}

impl<'a> Call<'a> {
    pub(crate) fn new(shared: &'a Shared, cmd: Command, fds: Vec<OwnedFd>) -> Self {
        Self {
            shared,
            state: State::New(cmd, fds),
        }
    }
}

impl Future for Call<'_> {
    type Output = Result<Answer, Error>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.get_mut();
        let calls = &this.shared.calls;
        match mem::replace(&mut this.state, State::Finished) {
            State::New(cmd, fds) => match calls.submit(cmd, fds, cx.waker()) {
                Some(slot) => this.state = State::Waiting(slot),
                None => {
                    return Poll::Ready(Err(Error::Disconnected(this.shared.disconnect_reason())));
                }
            },
            State::Waiting(slot) => match calls.poll_answer(slot, cx.waker()) {
                Some(answer) => return Poll::Ready(answer),
                None => this.state = State::Waiting(slot),
            },
            State::Finished => {}
        }
        Poll::Pending
    }
}

impl Drop for Call<'_> {
    fn drop(&mut self) {
        if let State::Waiting(slot) = self.state {
            self.shared.calls.abandon(slot);
        }
    }
}
