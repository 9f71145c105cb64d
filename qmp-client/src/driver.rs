//! The task that owns a connection: the socket, the [`Connection`] state machine, and the table of
//! callers waiting for responses. Callers hand it requests through
//! [`Calls`](crate::calls::Calls), so none of them ever touches the socket: a dropped call can
//! never leave half a command on the wire.

use std::collections::HashMap;
use std::io;
use std::os::fd::OwnedFd;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::task::{Context, Poll};
use std::time::Instant;

use futures_channel::oneshot;
use qmp_proto::{CommandError, Connection, Greeting, Output, RawJson, RequestId, SendError};
use serde_json::Value;

use crate::calls::Request;
use crate::client::Shared;
use crate::error::{Disconnect, Error};
use crate::events::{Delivery, Held, HubView, Published};

/// A byte stream a connection runs over. Adapters implement it for their runtime's
/// sockets; the driver calls it from one task only.
pub trait Transport: Send + 'static {
    /// Reads into `buf`, as `AsyncRead::poll_read`: `Ok(0)` is end of stream.
    fn poll_read(&mut self, cx: &mut Context<'_>, buf: &mut [u8]) -> Poll<io::Result<usize>>;

    /// Writes from `data`, as `AsyncWrite::poll_write`. When `fds` is not empty, they must travel
    /// with the first byte of `data` (`SCM_RIGHTS`); only called so when
    /// [`can_pass_fds`](Self::can_pass_fds) is true.
    fn poll_write(
        &mut self,
        cx: &mut Context<'_>,
        data: &[u8],
        fds: &[OwnedFd],
    ) -> Poll<io::Result<usize>>;

    /// Flushes buffered writes (a no-op for plain sockets; needed by TLS and similar wrappers).
    fn poll_flush(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>>;

    /// Shuts the write side down, telling the peer we are done.
    fn poll_close(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>>;

    /// Whether file descriptors can be passed (a unix socket).
    fn can_pass_fds(&self) -> bool;
}

/// A resettable timer, for request deadlines.
pub trait Timer: Send + 'static {
    /// Ready once `at` has passed. Called with a new `at` whenever the earliest deadline changes;
    /// must register the waker when pending.
    fn poll_at(&mut self, cx: &mut Context<'_>, at: Instant) -> Poll<()>;
}

/// A successful response, as the core delivered it.
pub(crate) enum Answer {
    /// The return value's text.
    Text(RawJson),
    /// Parsed by the core from its input buffer ([`Command::decode_value`]).
    Value(Value),
}

impl Answer {
    pub(crate) fn into_value(self) -> Result<Value, Error> {
        match self {
            Self::Value(value) => Ok(value),
            Self::Text(raw) => raw.to_value().map_err(Error::Decode),
        }
    }

    pub(crate) fn into_raw(self) -> Result<RawJson, Error> {
        match self {
            Self::Text(raw) => Ok(raw),
            Self::Value(value) => RawJson::from_json(&value.to_string()).map_err(Error::Decode),
        }
    }
}

/// Request ids are sequential, so a multiplicative hash spreads them well at a fraction of
/// SipHash's cost (these maps are on every command's path).
#[derive(Default, Clone, Copy)]
pub(crate) struct IdHasher(u64);

impl std::hash::Hasher for IdHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = (self.0.rotate_left(8) ^ u64::from(b)).wrapping_mul(0x9E37_79B9_7F4A_7C15);
        }
    }
    fn write_u64(&mut self, n: u64) {
        self.0 = n.wrapping_mul(0x9E37_79B9_7F4A_7C15);
    }
}

pub(crate) type IdMap<V> = HashMap<RequestId, V, std::hash::BuildHasherDefault<IdHasher>>;

impl<T, S> Drop for Driver<T, S> {
    fn drop(&mut self) {
        if !self.finished {
            // The task was dropped before the connection closed: its runtime shut down, or a
            // subscriber's predicate panicked on it. Everyone waiting must still hear of the end.
            let unexpected = io::Error::other("the connection's task ended unexpectedly");
            self.finish(Disconnect::Io(Arc::new(unexpected)));
        }
    }
}

/// Steps per wake-up before yielding to other tasks, so a flood of input cannot starve them.
const BUDGET: usize = 64;
/// How long a graceful close waits for queued bytes to be written.
const CLOSE_GRACE: std::time::Duration = std::time::Duration::from_secs(2);
/// Size of a socket read.
const READ_CHUNK: usize = 64 << 10;

/// The connection's task. Run it with `run` on the runtime of your choice.
pub(crate) struct Driver<T, S> {
    conn: Connection,
    io: T,
    timer: S,
    shared: Arc<Shared>,
    /// Requests taken from the calls queue, being handled.
    requests: Vec<Request>,
    /// Requests that were queued behind a close; failed when the connection ends.
    behind_close: Vec<Request>,
    /// The slot of each request the connection has, by request.
    waiters: IdMap<usize>,
    /// Answers for the calls, delivered together once the outputs at hand are dispatched.
    answers: Vec<(usize, Result<Answer, Error>)>,
    fds: IdMap<Vec<OwnedFd>>,
    buf: Box<[u8]>,
    ready: Option<oneshot::Sender<Result<Option<Greeting>, Error>>>,
    /// Callers waiting for a guest-agent resync to finish.
    resyncs: Vec<oneshot::Sender<()>>,
    /// Callers and subscribers to wake once the outputs at hand are delivered.
    wakes: Vec<std::task::Waker>,
    /// The subscribers, as of the hub's last change.
    hub_view: HubView,
    /// An event waiting for room in full subscriber queues; nothing after it is dispatched
    /// meanwhile (see [`Held`]).
    held: Option<Held>,
    /// When the timer last fired: that time has passed, whatever the clock reads.
    timer_fired: Option<Instant>,
    io_error: Option<Arc<io::Error>>,
    needs_flush: bool,
    /// A subscriber's queue filled up: yield so it can catch up before more is read.
    yield_now: bool,
    yielding: Option<crate::client::BoxFuture>,
    /// Closing gracefully: no new requests; write what is queued, shut down, close.
    closing: bool,
    /// When a graceful close gives up waiting for the peer to take our bytes.
    close_by: Option<Instant>,
    /// `finish` ran: the close was announced to everyone.
    finished: bool,
    close_done: Vec<oneshot::Sender<()>>,
    /// Last, so that it is dropped after `io`: tells `disconnect` the socket is closed.
    _released: Released,
}

/// Tells [`Shared`] when the driver has been dropped, and with it the transport: fields are
/// dropped in order, and this is the driver's last.
struct Released(Arc<Shared>);

impl Drop for Released {
    fn drop(&mut self) {
        self.0.set_released();
    }
}

impl<T: Transport, S: Timer> Driver<T, S> {
    pub(crate) fn new(
        conn: Connection,
        io: T,
        timer: S,
        shared: Arc<Shared>,
        ready: oneshot::Sender<Result<Option<Greeting>, Error>>,
    ) -> Self {
        Self {
            conn,
            io,
            timer,
            _released: Released(Arc::clone(&shared)),
            shared,
            requests: Vec::new(),
            behind_close: Vec::new(),
            waiters: IdMap::default(),
            answers: Vec::new(),
            fds: IdMap::default(),
            buf: vec![0; READ_CHUNK].into_boxed_slice(),
            ready: Some(ready),
            resyncs: Vec::new(),
            wakes: Vec::new(),
            hub_view: HubView::default(),
            held: None,
            timer_fired: None,
            io_error: None,
            needs_flush: false,
            yield_now: false,
            yielding: None,
            closing: false,
            close_by: None,
            finished: false,
            close_done: Vec::new(),
        }
    }

    /// Runs the connection until it closes.
    pub(crate) async fn run(mut self) {
        std::future::poll_fn(|cx| self.poll(cx)).await;
        let reason = self.reason();
        self.finish(reason);
    }

    fn poll(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        if let Some(yielding) = &mut self.yielding {
            if yielding.as_mut().poll(cx).is_pending() {
                return Poll::Pending;
            }
            self.yielding = None;
        }
        for _ in 0..BUDGET {
            let mut progress = self.poll_requests(cx);
            // After `poll_requests` has registered this task's waker: a subscription dropped
            // after this refresh then wakes the task (see `Subscription`'s `Drop`).
            self.shared.hub.refresh(&mut self.hub_view);
            progress |= self.poll_write(cx);
            progress |= self.poll_read(cx);
            progress |= self.poll_timer(cx);
            if self.closing && !self.conn.is_closed() && !self.conn.wants_write() {
                match self.io.poll_close(cx) {
                    Poll::Ready(_) => {
                        self.conn.close();
                        progress = true;
                    }
                    Poll::Pending => {}
                }
            }
            progress |= self.dispatch(cx);
            // A held event goes first: outputs behind it (responses, the close) are dispatched
            // after it, within `lag_after`.
            if self.conn.is_closed() && self.held.is_none() {
                return Poll::Ready(());
            }
            if !progress {
                return Poll::Pending;
            }
            if std::mem::take(&mut self.yield_now) {
                break;
            }
        }
        // Still busy, or a subscriber needs to catch up: let other tasks run, and come back.
        let mut yielding = self.shared.runtime.yield_now();
        if yielding.as_mut().poll(cx).is_pending() {
            self.yielding = Some(yielding);
        } else {
            cx.waker().wake_by_ref();
        }
        Poll::Pending
    }

    fn poll_requests(&mut self, cx: &mut Context<'_>) -> bool {
        if self.closing {
            return false;
        }
        let mut requests = std::mem::take(&mut self.requests);
        let orphaned = self.shared.calls.take(&mut requests, cx.waker());
        let mut progress = !requests.is_empty();
        let mut taken = requests.drain(..);
        while !self.closing {
            let Some(request) = taken.next() else { break };
            self.handle(request);
        }
        // Whatever was queued behind a close waits for the end, as if never taken: `finish`
        // fails it, so nothing asked for after `disconnect()` is written.
        self.behind_close.extend(taken);
        self.requests = requests;
        if orphaned {
            // Every handle is gone: nobody can send or wait any more.
            tracing::debug!("last client handle dropped; closing");
            self.start_closing();
            progress = true;
        }
        progress
    }

    fn handle(&mut self, request: Request) {
        match request {
            Request::Execute { cmd, fds, slot } => {
                let cmd = if fds.is_empty() { cmd } else { cmd.with_fds() };
                match self.conn.send(cmd) {
                    Ok(id) => {
                        self.waiters.insert(id, slot);
                        if !fds.is_empty() {
                            self.fds.insert(id, fds);
                        }
                    }
                    Err(SendError::Closed) => {
                        let e = Error::Disconnected(self.reason());
                        self.answers.push((slot, Err(e)));
                    }
                    Err(e) => self.answers.push((slot, Err(Error::Send(e)))),
                }
            }
            Request::Close { done } => {
                self.start_closing();
                self.close_done.push(done);
            }
            Request::Resync { done } => {
                if self.conn.resync() {
                    self.resyncs.push(done);
                }
            }
        }
    }

    fn poll_write(&mut self, cx: &mut Context<'_>) -> bool {
        let mut progress = false;
        while let Some(t) = self.conn.poll_transmit() {
            let fds = t
                .fds_for
                .and_then(|id| self.fds.get(&id))
                .map_or(&[][..], Vec::as_slice);
            match self.io.poll_write(cx, t.data, fds) {
                Poll::Ready(Ok(0)) => {
                    self.fail(io::ErrorKind::WriteZero.into());
                    return true;
                }
                Poll::Ready(Ok(n)) => {
                    tracing::trace!(sent = %String::from_utf8_lossy(&t.data[..n]).trim_end(), fds = fds.len());
                    if let Some(id) = t.fds_for {
                        // Sent: QEMU holds its own copies now.
                        self.fds.remove(&id);
                    }
                    self.conn.advance_transmit(n);
                    self.needs_flush = true;
                    progress = true;
                }
                Poll::Ready(Err(e)) if e.kind() == io::ErrorKind::Interrupted => {}
                Poll::Ready(Err(e)) => {
                    self.fail(e);
                    return true;
                }
                Poll::Pending => break,
            }
        }
        if self.needs_flush && !self.conn.wants_write() {
            match self.io.poll_flush(cx) {
                Poll::Ready(Ok(())) => self.needs_flush = false,
                Poll::Ready(Err(e)) => {
                    self.fail(e);
                    return true;
                }
                Poll::Pending => {}
            }
        }
        progress
    }

    /// Forgets requests whose caller gave up (dropped its future). Only queued requests need it
    /// (so they are never written); it runs before anything that could write them: input (a
    /// response frees a window slot) and timeouts. A written request's late response is
    /// discarded anyway, when its slot turns out abandoned.
    fn reap_cancelled(&mut self) {
        if self.conn.queued() == 0 {
            return;
        }
        let (conn, fds) = (&mut self.conn, &mut self.fds);
        self.shared.calls.reap(&mut self.waiters, |id| {
            conn.cancel(id);
            if !conn.fds_needed(id) {
                fds.remove(&id);
            }
        });
    }

    fn poll_read(&mut self, cx: &mut Context<'_>) -> bool {
        if !self.conn.wants_read() {
            return false;
        }
        self.reap_cancelled();
        match self.io.poll_read(cx, &mut self.buf) {
            Poll::Ready(Ok(0)) => {
                tracing::debug!("end of stream");
                self.conn.handle_eof();
            }
            Poll::Ready(Ok(n)) => {
                let data = &self.buf[..n];
                tracing::trace!(received = %String::from_utf8_lossy(data).trim_end());
                self.conn.handle_input(data);
            }
            Poll::Ready(Err(e)) if e.kind() == io::ErrorKind::Interrupted => {}
            Poll::Ready(Err(e)) => self.fail(e),
            Poll::Pending => return false,
        }
        true
    }

    fn poll_timer(&mut self, cx: &mut Context<'_>) -> bool {
        let held_until = self.held.as_ref().and_then(Held::until);
        let deadlines = [self.conn.poll_timeout(), self.close_by, held_until];
        let Some(at) = deadlines.into_iter().flatten().min() else {
            return false;
        };
        if self.timer.poll_at(cx, at).is_pending() {
            return false;
        }
        // The timer fired for `at`, so `at` has passed whatever the two clocks' rounding.
        let now = Instant::now().max(at);
        self.timer_fired = Some(now);
        if self.close_by.is_some_and(|by| by <= now) {
            tracing::debug!("the peer did not take our last bytes in time; closing anyway");
            self.conn.close();
            return true;
        }
        self.reap_cancelled();
        self.conn.handle_timeout(now);
        true
    }

    /// Starts a graceful close: no new requests; what is queued gets [`CLOSE_GRACE`] to be
    /// written, so a peer that stopped reading cannot hold the close up forever.
    fn start_closing(&mut self) {
        self.closing = true;
        self.close_by
            .get_or_insert_with(|| Instant::now() + CLOSE_GRACE);
    }

    fn fail(&mut self, e: io::Error) {
        tracing::debug!(error = %e, "connection failed");
        self.io_error = Some(Arc::new(e));
        self.conn.close();
    }

    /// Why the connection closed, as far as it has.
    fn reason(&self) -> Disconnect {
        match (&self.io_error, self.conn.close_reason()) {
            (Some(e), _) => Disconnect::from_io(Arc::clone(e)),
            (None, Some(reason)) => reason.clone().into(),
            (None, None) => Disconnect::Local,
        }
    }

    fn answer(&mut self, id: RequestId, result: Result<Answer, Error>) {
        if !self.fds.is_empty() && !self.conn.fds_needed(id) {
            // Timed out or failed before being written: QEMU will never see them.
            self.fds.remove(&id);
        }
        if let Some(slot) = self.waiters.remove(&id) {
            self.answers.push((slot, result));
        }
    }

    /// Delivers the outputs at hand, until an event has to wait for a full subscriber queue.
    /// Returns whether to go round again: a held event went out (the outputs behind it may now
    /// be read on), or one was newly held (the timer must be set for its deadline).
    fn dispatch(&mut self, cx: &mut Context<'_>) -> bool {
        // Once closing, a subscriber that stopped reading must not hold the end up for long:
        // `lag_after` may be "for ever".
        let lag_after = if self.closing || self.conn.is_closed() {
            self.shared.lag_after.min(CLOSE_GRACE)
        } else {
            self.shared.lag_after
        };
        let mut progress = false;
        if let Some(held) = &mut self.held {
            let mut delivery = Delivery {
                waker: cx.waker(),
                wakes: &mut self.wakes,
                lag_after,
                passed: self.timer_fired,
            };
            if !held.retry(&mut delivery) {
                // Still waiting: wake whom the retry served, and let the outputs wait.
                self.wake_answered();
                return false;
            }
            self.held = None;
            progress = true;
        }
        while self.held.is_none() {
            let Some(output) = self.conn.poll_output() else {
                break;
            };
            match output {
                Output::Greeting(g) => {
                    self.shared.greeted.store(true, Ordering::Release);
                    tracing::debug!(version = %g.version, capabilities = ?g.capabilities, "greeting")
                }
                Output::Ready { oob } => {
                    tracing::debug!(oob, "ready");
                    self.shared.hub.ready(Instant::now());
                    self.shared.oob.store(oob, Ordering::Release);
                    if let Some(ready) = self.ready.take() {
                        let _ = ready.send(Ok(self.conn.greeting().cloned()));
                    }
                    // A guest agent is ready again after each resync.
                    for done in self.resyncs.drain(..) {
                        let _ = done.send(());
                    }
                }
                Output::Response { id, result } => {
                    if let Err(
                        e @ (CommandError::ResponseTooLarge { .. }
                        | CommandError::ResponseTooDeep { .. }
                        | CommandError::NotAReply(_)),
                    ) = &result
                    {
                        tracing::warn!(error = %e, "a reply the client cannot use");
                    }
                    let result = result
                        .map(Answer::Text)
                        .map_err(|e| Error::from_command(e, || self.reason()));
                    self.answer(id, result);
                }
                Output::Value { id, value } => self.answer(id, Ok(Answer::Value(value))),
                Output::Event(event) => {
                    tracing::trace!(name = %event.name, "event");
                    let mut delivery = Delivery {
                        waker: cx.waker(),
                        wakes: &mut self.wakes,
                        lag_after,
                        passed: self.timer_fired,
                    };
                    match self
                        .shared
                        .hub
                        .publish(&mut self.hub_view, event, &mut delivery)
                    {
                        Published::Delivered { pressure } => self.yield_now |= pressure,
                        Published::Held(held) => {
                            tracing::trace!("a subscriber's queue is full; waiting for it");
                            self.held = Some(held);
                            progress = true;
                        }
                    }
                }
                Output::Unmatched(u) => {
                    tracing::debug!(id = ?u.id.as_ref().map(RawJson::get), result = ?u.result, "response matching no request");
                }
                Output::Malformed(m) => {
                    tracing::warn!(kind = %m.kind, "skipped malformed input from the server");
                }
                Output::Closed(_) => {
                    let reason = self.reason();
                    match reason {
                        // The peer is not what it should be: worth a look in anyone's logs.
                        Disconnect::Protocol(_) => tracing::warn!(%reason, "closed"),
                        _ => tracing::debug!(%reason, "closed"),
                    }
                    self.shared.set_closed(reason.clone());
                    if let Some(ready) = self.ready.take() {
                        let e = match reason {
                            Disconnect::Protocol(p) => Error::Protocol(p),
                            other => Error::Disconnected(other),
                        };
                        let _ = ready.send(Err(e));
                    }
                }
                _ => {}
            }
        }
        // Callers and subscribers are woken once per batch of outputs.
        self.wake_answered();
        progress
    }
}

impl<T, S> Driver<T, S> {
    /// Hands the answers at hand to their calls, then wakes those callers and the subscribers
    /// that got events.
    fn wake_answered(&mut self) {
        self.shared.calls.answer(&mut self.answers, &mut self.wakes);
        self.wakes.drain(..).for_each(std::task::Waker::wake);
    }

    /// After the connection closed (or its task died): refuse what is still queued, fail whoever
    /// still waits, and release everything.
    fn finish(&mut self, reason: Disconnect) {
        self.finished = true;
        // The reason first, so a call refused from here on reports it.
        self.shared.set_closed(reason.clone());
        for request in std::mem::take(&mut self.behind_close) {
            // Commands behind the close fail below, with every call still waiting.
            if let Request::Close { done } = request {
                self.close_done.push(done);
            }
        }
        self.wake_answered();
        self.shared.calls.close(&reason);
        self.waiters.clear();
        if let Some(ready) = self.ready.take() {
            let _ = ready.send(Err(Error::Disconnected(reason.clone())));
        }
        self.fds.clear();
        for done in self.close_done.drain(..) {
            let _ = done.send(());
        }
    }
}
