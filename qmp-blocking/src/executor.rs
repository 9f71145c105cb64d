//! Just enough of an executor to run a connection's task on a thread with `poll(2)`, and to block
//! a calling thread on a future.

use std::cell::{Cell, RefCell};
use std::collections::BTreeMap;
use std::future::Future;
use std::io::{self, Read, Write};
use std::net::TcpStream;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::pin::{Pin, pin};
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, Once, PoisonError, Weak};
use std::task::{Context, Poll, Wake, Waker};
use std::thread::{self, Thread};
use std::time::{Duration, Instant};

use qmp_client::{BoxFuture, Runtime, Timer, Transport, send_with_fds};
use rustix::event::{PollFd, PollFlags, Timespec};

/// A stream the connection runs over.
pub(crate) enum Io {
    Unix(UnixStream),
    Tcp(TcpStream),
    Other(Box<dyn Stream>),
}

/// What [`crate::wrap`] accepts.
pub(crate) trait Stream: Read + Write + AsFd + Send {}
impl<T: Read + Write + AsFd + Send> Stream for T {}

impl Io {
    fn fd(&self) -> BorrowedFd<'_> {
        match self {
            Self::Unix(s) => s.as_fd(),
            Self::Tcp(s) => s.as_fd(),
            Self::Other(s) => s.as_fd(),
        }
    }

    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Self::Unix(s) => s.read(buf),
            Self::Tcp(s) => s.read(buf),
            Self::Other(s) => s.read(buf),
        }
    }

    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Self::Unix(s) => s.write(buf),
            Self::Tcp(s) => s.write(buf),
            Self::Other(s) => s.write(buf),
        }
    }
}

/// State shared by the connection's thread, the transport, timer and waker its task runs, and the
/// client handles (see [`Shared::lead`]). It holds the socket's descriptors
/// only while the task runs, so handles that outlive the connection do not keep it open.
pub(crate) struct Shared {
    /// The connection's task, polled by its thread, or by a calling thread that just submitted a
    /// command ([`Shared::lead`]). `None` once it has finished.
    task: Mutex<Option<BoxFuture>>,
    want_read: AtomicBool,
    want_write: AtomicBool,
    timer: Mutex<Option<Instant>>,
    /// Written to wake the thread; `wake_pending` avoids writing more than one byte at a time.
    /// `None` once the task has ended, as `poller`.
    wake_tx: Mutex<Option<UnixStream>>,
    wake_pending: AtomicBool,
    /// A calling thread is about to poll the task itself: wakes are noted in `assist_dirty`
    /// instead of written to the pipe.
    assisting: AtomicBool,
    assist_dirty: AtomicBool,
    /// Calls under way through [`block_on_assisted`].
    calls: AtomicUsize,
    /// A lone call is waiting for its reply by running the task on its own thread (see
    /// [`Shared::lead`]); the connection's thread then sleeps on the wake pipe only.
    leader: AtomicBool,
    /// Counts leads taken, so the connection's thread can tell one long lead from many short
    /// ones.
    leads: AtomicU64,
    /// The connection's thread sleeps on the wake pipe until the lead ends: whoever ends it
    /// writes the pipe.
    lead_watched: AtomicBool,
    /// What the connection's thread waits on, shared with a leading call; `None` once the task
    /// has ended, so that handles outliving the connection hold no descriptor of it.
    poller: Mutex<Option<Arc<Poller>>>,
    /// Wakes the leading call: its own wake-up, which the connection's thread cannot drain from
    /// the shared pipe before the call sees it. Written only while the call sleeps.
    lead_tx: Mutex<Option<UnixStream>>,
    lead_woken: AtomicBool,
    lead_sleeping: AtomicBool,
    lead_waker: Waker,
    /// What the task is polled with, by its thread and by assisting callers alike.
    waker: Waker,
}

/// The descriptors the task's thread waits on: the connection's thread, or a leading call.
struct Poller {
    /// A duplicate of the stream's descriptor.
    fd: OwnedFd,
    wake_rx: UnixStream,
    lead_rx: UnixStream,
}

impl Poller {
    /// Sleeps until the socket is ready for what is asked (`None`: not watched at all), the
    /// wake pipe is written, or `deadline`; then empties the pipe. Returns whether it held a
    /// wake (seen by `poll`, or only found when draining: another thread sleeping on the pipe
    /// was woken by that byte too, and may have gone back to sleep finding it gone). A leading
    /// call (`lead`) also wakes for its own pipe.
    fn wait(
        &self,
        shared: &Shared,
        socket: Option<(bool, bool)>,
        deadline: Option<Instant>,
        lead: bool,
    ) -> bool {
        let mut flags = PollFlags::empty();
        let (read, write) = socket.unwrap_or_default();
        if read {
            flags |= PollFlags::IN;
        }
        if write {
            flags |= PollFlags::OUT;
        }
        let timeout = deadline.map(|at| {
            let d = at.saturating_duration_since(Instant::now());
            Timespec {
                tv_sec: d.as_secs() as i64,
                tv_nsec: i64::from(d.subsec_nanos()),
            }
        });
        // Even with no events asked, `poll` reports a hung-up socket: leave it out entirely when
        // it is not to be watched (a call holds it), rather than wake at once forever.
        let mut fds = [
            PollFd::new(&self.wake_rx, PollFlags::IN),
            PollFd::new(&self.lead_rx, PollFlags::IN),
            PollFd::new(&self.fd, flags),
        ];
        let mut n = if lead { 2 } else { 1 };
        if socket.is_some() {
            fds[n] = PollFd::new(&self.fd, flags);
            n += 1;
        }
        if lead {
            // Either the waker sees this flag and writes the pipe, or this sees its wake.
            shared.lead_sleeping.store(true, Ordering::SeqCst);
            if shared.lead_woken.load(Ordering::SeqCst) {
                shared.lead_sleeping.store(false, Ordering::SeqCst);
                return false;
            }
        }
        // EINTR and friends: just go round again.
        let _ = rustix::event::poll(&mut fds[..n], timeout.as_ref());
        let mut woken = !fds[0].revents().is_empty();
        let mut drain = [0u8; 64];
        if lead {
            shared.lead_sleeping.store(false, Ordering::SeqCst);
            while let Ok(1..) = (&self.lead_rx).read(&mut drain) {}
        }
        // Drain before clearing the flag: a wake in between then finds the flag still set and
        // writes nothing, but the task is polled next anyway. The other order could eat the
        // byte of a wake that set the flag, leaving the flag set and every later wake silent.
        while let Ok(1..) = (&self.wake_rx).read(&mut drain) {
            woken = true;
        }
        // SeqCst: the task is polled after this, and a waker must either see the flag clear and
        // write, or have written before the drain.
        shared.wake_pending.store(false, Ordering::SeqCst);
        woken
    }
}

/// How long a leading call whose task another thread is polling waits before it looks again;
/// and how often the connection's thread looks whether the calls holding the socket are over.
/// Bounds how late an event that arrives after a call is read.
const LEADER_CHECK: Duration = Duration::from_millis(2);

/// How many [`LEADER_CHECK`]s into one lead the connection's thread stops looking and sleeps
/// until it ends.
const LEADER_CHECKS: u32 = 10;

/// The transport, timer and runtime of one connection over `io`, and the state client handles
/// keep to [`lead`](Shared::lead) it.
pub(crate) fn parts(
    io: Io,
) -> io::Result<(PollTransport, PollTimer, Arc<PollRuntime>, Arc<Shared>)> {
    let fd = rustix::io::dup(io.fd())?;
    let flags = rustix::fs::fcntl_getfl(&fd)?;
    rustix::fs::fcntl_setfl(&fd, flags | rustix::fs::OFlags::NONBLOCK)?;
    let (wake_tx, wake_rx) = UnixStream::pair()?;
    let (lead_tx, lead_rx) = UnixStream::pair()?;
    for end in [&wake_tx, &wake_rx, &lead_tx, &lead_rx] {
        end.set_nonblocking(true)?;
    }
    let shared = Arc::new_cyclic(|shared| Shared {
        task: Mutex::new(None),
        waker: SharedWaker::waker(shared, Shared::wake),
        want_read: AtomicBool::new(false),
        want_write: AtomicBool::new(false),
        timer: Mutex::new(None),
        wake_tx: Mutex::new(Some(wake_tx)),
        wake_pending: AtomicBool::new(false),
        assisting: AtomicBool::new(false),
        assist_dirty: AtomicBool::new(false),
        calls: AtomicUsize::new(0),
        leader: AtomicBool::new(false),
        leads: AtomicU64::new(0),
        lead_watched: AtomicBool::new(false),
        poller: Mutex::new(Some(Arc::new(Poller {
            fd,
            wake_rx,
            lead_rx,
        }))),
        lead_tx: Mutex::new(Some(lead_tx)),
        lead_woken: AtomicBool::new(false),
        lead_sleeping: AtomicBool::new(false),
        lead_waker: SharedWaker::waker(shared, Shared::wake_leader),
    });
    let can_pass_fds = matches!(io, Io::Unix(_));
    Ok((
        PollTransport {
            io,
            shared: Arc::clone(&shared),
            can_pass_fds,
            drained: false,
        },
        PollTimer {
            shared: Arc::clone(&shared),
        },
        Arc::new(PollRuntime {
            start: Mutex::new(Some(Arc::clone(&shared))),
        }),
        shared,
    ))
}

pub(crate) struct PollTransport {
    io: Io,
    shared: Arc<Shared>,
    can_pass_fds: bool,
    /// The last read from a socket came back short: it is very likely empty, so the next read
    /// waits for `poll` (level-triggered: data already there wakes it at once) instead of trying
    /// and failing with `EAGAIN` first. A write clears it, as a reply may follow at once. Not for
    /// other streams, which may hold data the descriptor does not show (TLS).
    drained: bool,
}

impl PollTransport {
    /// `Pending` (with interest noted for the poll loop) instead of `WouldBlock`.
    fn ready<T>(result: io::Result<T>, want: &AtomicBool) -> Poll<io::Result<T>> {
        match result {
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                want.store(true, Ordering::Release);
                Poll::Pending
            }
            other => Poll::Ready(other),
        }
    }
}

impl Transport for PollTransport {
    fn poll_read(&mut self, _cx: &mut Context<'_>, buf: &mut [u8]) -> Poll<io::Result<usize>> {
        if std::mem::take(&mut self.drained) {
            self.shared.want_read.store(true, Ordering::Release);
            return Poll::Pending;
        }
        let read = self.io.read(buf);
        self.drained =
            !matches!(self.io, Io::Other(_)) && matches!(read, Ok(n) if n > 0 && n < buf.len());
        Self::ready(read, &self.shared.want_read)
    }

    fn poll_write(
        &mut self,
        _cx: &mut Context<'_>,
        data: &[u8],
        fds: &[OwnedFd],
    ) -> Poll<io::Result<usize>> {
        self.drained = false;
        let result = match &self.io {
            Io::Unix(s) if !fds.is_empty() => send_with_fds(s, data, fds),
            _ => self.io.write(data),
        };
        Self::ready(result, &self.shared.want_write)
    }

    fn poll_flush(&mut self, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let result = match &mut self.io {
            Io::Other(s) => s.flush(),
            _ => Ok(()),
        };
        Self::ready(result, &self.shared.want_write)
    }

    fn poll_close(&mut self, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(match &self.io {
            Io::Unix(s) => s.shutdown(std::net::Shutdown::Write),
            Io::Tcp(s) => s.shutdown(std::net::Shutdown::Write),
            Io::Other(_) => Ok(()),
        })
    }

    fn can_pass_fds(&self) -> bool {
        self.can_pass_fds
    }
}

impl Drop for PollTransport {
    /// The task is ending (it is dropped as the connection's task returns, while its thread still
    /// polls it): `disconnect` returns once it is gone, and by then the connection's descriptors
    /// must be closed, not a moment later when the thread gets round to it. The poller holds a
    /// duplicate of the socket's: released here, it closes at once unless a thread is waiting on
    /// it (a call leading, about to find its reply will never come), which drops it as it wakes.
    /// Shutting both directions down first makes the socket look closed to the peer even then.
    fn drop(&mut self) {
        let _ = match &self.io {
            Io::Unix(s) => s.shutdown(std::net::Shutdown::Both),
            Io::Tcp(s) => s.shutdown(std::net::Shutdown::Both),
            Io::Other(_) => Ok(()),
        };
        self.shared.release_descriptors();
    }
}

pub(crate) struct PollTimer {
    shared: Arc<Shared>,
}

impl Timer for PollTimer {
    fn poll_at(&mut self, _cx: &mut Context<'_>, at: Instant) -> Poll<()> {
        if Instant::now() >= at {
            return Poll::Ready(());
        }
        *self
            .shared
            .timer
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = Some(at);
        Poll::Pending
    }
}

/// Hands the connection's task and descriptors to the thread it spawns and keeps nothing: once
/// the task ends, the socket's descriptors close even while client handles (which hold the
/// runtime and the shared state) live.
pub(crate) struct PollRuntime {
    start: Mutex<Option<Arc<Shared>>>,
}

impl Runtime for PollRuntime {
    fn spawn(&self, future: BoxFuture) {
        let Some(shared) = self
            .start
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take()
        else {
            return; // One connection, one task: nothing else is ever spawned here.
        };
        if shared.poller().is_none() {
            return;
        }
        *shared.task.lock().unwrap_or_else(PoisonError::into_inner) = Some(future);
        // If no thread can be had the task is dropped, and `connect` reports the connection
        // closed.
        let spawned = thread::Builder::new().name("qmp-connection".into()).spawn({
            let shared = Arc::clone(&shared);
            move || {
                run(&shared);
                shared.ended();
            }
        });
        if spawned.is_err() {
            shared.ended();
        }
    }

    fn sleep(&self, duration: Duration) -> BoxFuture {
        sleep(duration)
    }
}

/// A future that is ready once `duration` has passed, whatever executor polls it.
pub(crate) fn sleep(duration: Duration) -> BoxFuture {
    match Instant::now().checked_add(duration) {
        Some(at) => Box::pin(Sleep { at, key: None }),
        // Beyond what an `Instant` holds (`Duration::MAX` for "no limit"): never.
        None => Box::pin(std::future::pending()),
    }
}

/// Writes a byte to a wake pipe, unless it is closed (the task has ended). Full: a wake is pending
/// anyway.
fn write_wake(tx: &Mutex<Option<UnixStream>>) {
    if let Some(tx) = &*tx.lock().unwrap_or_else(PoisonError::into_inner) {
        let _ = (&*tx).write(&[1]);
    }
}

/// A waker of a connection's: `wake` applied to its [`Shared`]. Weak, so the wakers `Shared`
/// keeps do not keep it alive; once it is gone there is nothing left to wake.
struct SharedWaker {
    shared: Weak<Shared>,
    wake: fn(&Shared),
}

impl SharedWaker {
    fn waker(shared: &Weak<Shared>, wake: fn(&Shared)) -> Waker {
        Waker::from(Arc::new(Self {
            shared: Weak::clone(shared),
            wake,
        }))
    }
}

impl Wake for SharedWaker {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        if let Some(shared) = self.shared.upgrade() {
            (self.wake)(&shared);
        }
    }
}

/// How many times an assisting caller polls the task for wakes that arrive while it does, before
/// it leaves the rest to the connection's thread.
const ASSIST_ROUNDS: usize = 4;

impl Shared {
    /// Wakes the leading call of the connection (see [`Shared::lead`]).
    fn wake_leader(&self) {
        self.lead_woken.store(true, Ordering::SeqCst);
        if self.lead_sleeping.load(Ordering::SeqCst) {
            write_wake(&self.lead_tx);
        }
    }

    /// The lead has just been given up (`leader` cleared): wakes the connection's thread if it
    /// sleeps until then, or if calls that started meanwhile wait for replies nobody reads now.
    fn lead_ended(&self) {
        if self.lead_watched.load(Ordering::SeqCst) || self.calls.load(Ordering::SeqCst) > 1 {
            self.wake();
        }
    }

    /// Wakes the connection's task: notes it for an assisting caller, or wakes the thread.
    fn wake(&self) {
        if self.assisting.load(Ordering::SeqCst) {
            self.assist_dirty.store(true, Ordering::SeqCst);
            // The caller may have finished meanwhile without seeing the note: then wake as usual.
            if self.assisting.load(Ordering::SeqCst) {
                return;
            }
        }
        if !self.wake_pending.swap(true, Ordering::SeqCst) {
            write_wake(&self.wake_tx);
        }
    }

    /// Polls the task once with the thread's waker; interest and deadline are recorded as it
    /// goes. Returns what it then waits on, or `None` once the task has finished.
    fn poll_task(&self, task: &mut Option<BoxFuture>) -> Option<(bool, bool, Option<Instant>)> {
        let future = task.as_mut()?;
        self.want_read.store(false, Ordering::Release);
        self.want_write.store(false, Ordering::Release);
        *self.timer.lock().unwrap_or_else(PoisonError::into_inner) = None;
        let polled = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            future.as_mut().poll(&mut Context::from_waker(&self.waker))
        }));
        // Finished, or panicked (a subscriber's predicate can): either way it is dropped, which
        // drops the transport (the socket closes now) and, after a panic, tells every caller the
        // connection ended. A caller that happened to be polling it never sees the panic.
        if !matches!(polled, Ok(Poll::Pending)) {
            *task = None;
            return None;
        }
        Some((
            self.want_read.load(Ordering::Acquire),
            self.want_write.load(Ordering::Acquire),
            *self.timer.lock().unwrap_or_else(PoisonError::into_inner),
        ))
    }

    fn poller(&self) -> Option<Arc<Poller>> {
        self.poller
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// The task has ended (or never got a thread): drops it, and the descriptors with it.
    fn ended(&self) {
        self.task
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        self.release_descriptors();
    }

    /// Drops the descriptors kept here: the poller (and its duplicate of the socket's; threads
    /// waiting on it keep it until they wake) and the wake pipes' write ends, whose closing wakes
    /// any thread still waiting on their read ends.
    fn release_descriptors(&self) {
        self.poller
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        for tx in [&self.wake_tx, &self.lead_tx] {
            tx.lock().unwrap_or_else(PoisonError::into_inner).take();
        }
    }

    /// Runs `first` (a poll of a future that may submit commands), then polls the task on this
    /// thread, again while wakes arrive as it does (a few rounds; the rest go to the pipe). Wakes
    /// meanwhile are noted instead of written to the pipe. Returns what `first` returned and
    /// what became of the task.
    fn poll_here<T>(&self, held: &Cell<bool>, first: impl FnOnce() -> T) -> (T, Polled) {
        if self
            .assisting
            .compare_exchange(false, true, Ordering::SeqCst, Ordering::SeqCst)
            .is_err()
        {
            return (first(), Polled::Busy);
        }
        /// Stops assisting even if `first` panics (user code, in [`Client::block_on`]): a flag
        /// left set would send every later wake to nobody. Unless the lead was lost while `first`
        /// blocked ([`Suspended`]): the flags are the new leader's then.
        ///
        /// [`Client::block_on`]: crate::Client::block_on
        struct Assisting<'a>(&'a Shared, &'a Cell<bool>);
        impl Drop for Assisting<'_> {
            fn drop(&mut self) {
                if !self.1.get() {
                    return;
                }
                self.0.assisting.store(false, Ordering::SeqCst);
                if self.0.assist_dirty.swap(false, Ordering::SeqCst) {
                    self.0.wake();
                }
            }
        }
        let assisting = Assisting(self, held);
        let out = first();
        if !held.get() {
            return (out, Polled::Busy);
        }
        self.assist_dirty.store(true, Ordering::SeqCst);
        let mut polled = Polled::Busy;
        for _ in 0..ASSIST_ROUNDS {
            // A subscriber's predicate, run by the task, may block elsewhere and lose the lead.
            if !held.get() || !self.assist_dirty.swap(false, Ordering::SeqCst) {
                break;
            }
            let Ok(mut task) = self.task.try_lock() else {
                polled = Polled::Busy;
                break;
            };
            polled = match self.poll_task(&mut task) {
                Some((read, write, deadline)) => Polled::Waits(read, write, deadline),
                None => Polled::Ended,
            };
        }
        drop(assisting);
        (out, polled)
    }

    /// Runs `future` to completion on this thread, which drives the connection meanwhile: it
    /// polls the task (writing what `future` submits) and, between polls, waits on the socket
    /// and the wake pipe itself, instead of sleeping while the connection's thread reads the
    /// replies and wakes this one. A thread switch less per reply: round trips on one CPU went
    /// from 0.69 to 1.0 times tokio's speed. `leader` is set, so the connection's thread stays
    /// off the socket meanwhile. If this thread loses the lead (see [`Suspended`]), it finishes
    /// as [`block_on`].
    fn lead<F: Future>(
        &self,
        mut future: Pin<&mut F>,
        poller: &Poller,
        held: &Cell<bool>,
    ) -> F::Output {
        let mut cx = Context::from_waker(&self.lead_waker);
        loop {
            self.lead_woken.store(false, Ordering::SeqCst);
            let (polled, task) = self.poll_here(held, || future.as_mut().poll(&mut cx));
            if let Poll::Ready(output) = polled {
                return output;
            }
            if !held.get() {
                return block_on(future);
            }
            if self.lead_woken.load(Ordering::SeqCst) {
                continue;
            }
            match task {
                Polled::Waits(read, write, deadline) => {
                    poller.wait(self, Some((read, write)), deadline, true);
                }
                // Another thread holds the task: what it completes wakes this one, and it says
                // what changed; still, look again shortly.
                Polled::Busy => {
                    let check = Instant::now() + LEADER_CHECK;
                    poller.wait(self, Some((true, false)), Some(check), true);
                }
                // Only `future`'s own wakers are left to wait for, and the wake pipes close with
                // the connection (see `ended`): wait as any blocking call does.
                Polled::Ended => return block_on(future),
            }
        }
    }
}

/// What became of a connection's task polled by a leading call.
enum Polled {
    /// It waits on the socket (read, write) and its deadline.
    Waits(bool, bool, Option<Instant>),
    /// Another thread is polling it.
    Busy,
    /// It has finished.
    Ended,
}

/// Runs a connection's task to completion on this thread. It holds the poller (and its duplicate
/// of the socket's descriptor) only while it waits, not while it polls the task: the transport,
/// dropped when the task ends, drops the poller then, and the descriptor closes at once (see
/// `PollTransport`'s `Drop`).
fn run(shared: &Arc<Shared>) {
    loop {
        let waits_on = {
            let mut task = shared.task.lock().unwrap_or_else(PoisonError::into_inner);
            let Some(waits_on) = shared.poll_task(&mut task) else {
                return;
            };
            waits_on
        };
        let Some(poller) = shared.poller() else {
            return;
        };
        if shared.leader.load(Ordering::SeqCst) {
            // What that poll changed (a command written, a deadline set, new interest) is the
            // leading call's to wait on now: it may be asleep on what it saw before.
            shared.lead_waker.wake_by_ref();
        }
        let (read, write, deadline) = waits_on;
        if !shared.leader.load(Ordering::SeqCst) {
            poller.wait(shared, Some((read, write)), deadline, false);
            continue;
        }
        watch_leads(shared, &poller);
    }
}

/// While calls hold the socket (each reading it and keeping the task's deadlines), the
/// connection's thread has only wakes to handle, and the socket to take back when they stop. It
/// looks every [`LEADER_CHECK`] whether they have: cheaper than being woken at the end of each of
/// many short calls. A lead that lasts [`LEADER_CHECKS`] checks (a `Client::block_on` waiting
/// for an event, say) it sleeps through, and is woken when it ends.
fn watch_leads(shared: &Shared, poller: &Poller) {
    let mut lead = shared.leads.load(Ordering::SeqCst);
    let mut checks = 0;
    while checks < LEADER_CHECKS {
        let check = Instant::now() + LEADER_CHECK;
        if poller.wait(shared, None, Some(check), false) || !shared.leader.load(Ordering::SeqCst) {
            return;
        }
        let now = shared.leads.load(Ordering::SeqCst);
        checks = if now == lead { checks + 1 } else { 0 };
        lead = now;
    }
    // SeqCst, with the leader's: either the lead's end sees the flag and writes the pipe, or
    // this sees the lead over.
    shared.lead_watched.store(true, Ordering::SeqCst);
    if shared.leader.load(Ordering::SeqCst) && shared.leads.load(Ordering::SeqCst) == lead {
        poller.wait(shared, None, None, false);
    }
    shared.lead_watched.store(false, Ordering::SeqCst);
}

/// One timer thread for the whole process: sleeping futures register their deadline and waker
/// here, and are woken when it passes (whoever polls them), or forgotten when dropped.
struct Timers {
    state: Mutex<TimerState>,
    changed: Condvar,
}

struct TimerState {
    next_id: u64,
    due: BTreeMap<(Instant, u64), Waker>,
}

fn timers() -> &'static Timers {
    static TIMERS: Timers = Timers {
        state: Mutex::new(TimerState {
            next_id: 0,
            due: BTreeMap::new(),
        }),
        changed: Condvar::new(),
    };
    static STARTED: Once = Once::new();
    STARTED.call_once(|| {
        let _ = thread::Builder::new()
            .name("qmp-timers".into())
            .spawn(|| TIMERS.run());
    });
    &TIMERS
}

impl Timers {
    fn run(&self) {
        let mut state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        let mut expired = Vec::new();
        loop {
            let now = Instant::now();
            while let Some(entry) = state.due.first_entry() {
                if entry.key().0 > now {
                    break;
                }
                expired.push(entry.remove());
            }
            if !expired.is_empty() {
                // Not under the lock: a waker's `wake` may drop a sleeping future (an executor
                // whose task is gone does), which takes the lock to forget its timer.
                drop(state);
                expired.drain(..).for_each(Waker::wake);
                state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
                continue;
            }
            let wait = state
                .due
                .keys()
                .next()
                .map(|&(at, _)| at.saturating_duration_since(now));
            state = match wait {
                Some(d) => {
                    self.changed
                        .wait_timeout(state, d)
                        .unwrap_or_else(PoisonError::into_inner)
                        .0
                }
                None => self
                    .changed
                    .wait(state)
                    .unwrap_or_else(PoisonError::into_inner),
            };
        }
    }

    /// (Re)registers timer `id` (a new one if `None`) for `at`, returning its id.
    fn set(&self, id: Option<(Instant, u64)>, at: Instant, waker: &Waker) -> (Instant, u64) {
        let mut state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        // Dropped after the lock: dropping a waker may drop a sleeping future, which cancels.
        let _old = id.and_then(|key| state.due.remove(&key));
        let key = (
            at,
            id.map_or_else(
                || {
                    state.next_id += 1;
                    state.next_id
                },
                |(_, n)| n,
            ),
        );
        state.due.insert(key, waker.clone());
        drop(state);
        self.changed.notify_one();
        key
    }

    fn cancel(&self, key: (Instant, u64)) {
        let old = self
            .state
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .due
            .remove(&key);
        // After the lock (the temporary guard is gone by now): see `set`.
        drop(old);
    }
}

/// A timer future for the caller side (connect deadlines, event waits), woken by the shared timer
/// thread whatever executor polls it.
struct Sleep {
    at: Instant,
    key: Option<(Instant, u64)>,
}

impl Future for Sleep {
    type Output = ();

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        if Instant::now() >= self.at {
            if let Some(key) = self.key.take() {
                timers().cancel(key);
            }
            return Poll::Ready(());
        }
        let at = self.at;
        self.key = Some(timers().set(self.key, at, cx.waker()));
        Poll::Pending
    }
}

impl Drop for Sleep {
    fn drop(&mut self) {
        if let Some(key) = self.key.take() {
            timers().cancel(key);
        }
    }
}

/// Wakes one [`block_on`]: its own flag, then the thread. The flag is what the loop trusts. The
/// thread's park token is shared by every `block_on` on it, so a nested one (a blocking call made
/// from a future that `block_on` runs) may consume the token of an outer one's wake.
struct ThreadWaker {
    thread: Thread,
    woken: AtomicBool,
}

impl Wake for ThreadWaker {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        self.woken.store(true, Ordering::Release);
        self.thread.unpark();
    }
}

/// A call under way on a connection, counted while it lasts.
struct Call<'a>(&'a Shared);

impl<'a> Call<'a> {
    /// Counts a call; also says whether no other was under way.
    fn start(shared: &'a Shared) -> (Self, bool) {
        let alone = shared.calls.fetch_add(1, Ordering::AcqRel) == 0;
        (Self(shared), alone)
    }
}

impl Drop for Call<'_> {
    fn drop(&mut self) {
        self.0.calls.fetch_sub(1, Ordering::AcqRel);
    }
}

/// The leading call's hold on the socket, released when it ends (unless it was lost meanwhile).
struct Lead<'a> {
    shared: &'a Shared,
    held: Rc<Cell<bool>>,
}

impl<'a> Lead<'a> {
    /// Takes the lead of `shared`'s connection if nobody has it, and notes it in [`LEADING`].
    fn take(shared: &'a Arc<Shared>) -> Option<Self> {
        shared
            .leader
            .compare_exchange(false, true, Ordering::SeqCst, Ordering::SeqCst)
            .ok()?;
        shared.leads.fetch_add(1, Ordering::SeqCst);
        let held = Rc::new(Cell::new(true));
        LEADING.with(|l| l.borrow_mut().push((Arc::clone(shared), Rc::clone(&held))));
        Some(Self { shared, held })
    }
}

impl Drop for Lead<'_> {
    fn drop(&mut self) {
        LEADING.with(|l| l.borrow_mut().pop());
        if !self.held.get() {
            return;
        }
        self.shared.leader.store(false, Ordering::SeqCst);
        self.shared.lead_ended();
    }
}

/// A connection this thread leads, and whether it holds the lead now.
type Led = (Arc<Shared>, Rc<Cell<bool>>);

thread_local! {
    /// The connections this thread leads, innermost last.
    static LEADING: RefCell<Vec<Led>> = const { RefCell::new(Vec::new()) };
}

/// While this thread blocks on anything but the connection it leads innermost (a blocking call
/// from async code, another connection's call), the connections it leads go back to their own
/// threads: otherwise nobody would read them, nor write other threads' commands, until it
/// returns. Dropped, it takes the leads back, unless another thread has taken one meanwhile;
/// that lead's loop then finishes as [`block_on`].
struct Suspended(Vec<(Led, bool)>);

impl Suspended {
    fn leads() -> Self {
        Self(LEADING.with(|l| {
            l.borrow()
                .iter()
                .filter(|(_, held)| held.get())
                .map(|(shared, held)| {
                    held.set(false);
                    let assisting = shared.assisting.swap(false, Ordering::SeqCst);
                    shared.leader.store(false, Ordering::SeqCst);
                    shared.wake();
                    ((Arc::clone(shared), Rc::clone(held)), assisting)
                })
                .collect()
        }))
    }
}

impl Drop for Suspended {
    fn drop(&mut self) {
        for ((shared, held), assisting) in self.0.drain(..) {
            if shared
                .leader
                .compare_exchange(false, true, Ordering::SeqCst, Ordering::SeqCst)
                .is_ok()
            {
                shared.leads.fetch_add(1, Ordering::SeqCst);
                held.set(true);
                shared.assisting.store(assisting, Ordering::SeqCst);
                // Look at everything again: wakes went elsewhere meanwhile.
                shared.assist_dirty.store(true, Ordering::SeqCst);
                shared.lead_woken.store(true, Ordering::SeqCst);
            }
        }
    }
}

/// [`block_on`] for a future that submits a command to `shared`'s connection. A call made while
/// no other is under way [`lead`](Shared::lead)s: this thread writes the command and reads the
/// reply. (With several calls under way, the connection's thread is awake anyway, and many
/// threads would only contend for the task.)
pub(crate) fn block_on_assisted<F: Future>(shared: &Arc<Shared>, future: F) -> F::Output {
    let (_call, alone) = Call::start(shared);
    lead_or_park(shared, pin!(future), alone)
}

/// [`block_on`] that drives `shared`'s connection on this thread while `future` runs, unless a
/// call already does.
pub(crate) fn block_on_driving<F: Future>(shared: &Arc<Shared>, future: F) -> F::Output {
    let (_call, _) = Call::start(shared);
    lead_or_park(shared, pin!(future), true)
}

fn lead_or_park<F: Future>(shared: &Arc<Shared>, future: Pin<&mut F>, lead: bool) -> F::Output {
    let _suspended = Suspended::leads();
    if lead
        && let Some(poller) = shared.poller()
        && let Some(lead) = Lead::take(shared)
    {
        return shared.lead(future, &poller, &lead.held);
    }
    block_on(future)
}

/// Runs `future` to completion on this thread, sleeping between polls: how every blocking call
/// here waits, and a way to use [`Client::as_async`](crate::Client::as_async) from blocking code.
pub fn block_on<F: Future>(future: F) -> F::Output {
    let _suspended = Suspended::leads();
    let mut future = pin!(future);
    let cached = CachedWaker(Some(BLOCK_ON_WAKER.take().unwrap_or_else(|| {
        let signal = Arc::new(ThreadWaker {
            thread: thread::current(),
            woken: AtomicBool::new(false),
        });
        (Waker::from(Arc::clone(&signal)), signal)
    })));
    let Some((waker, signal)) = &cached.0 else {
        unreachable!("just set")
    };
    // A wake left over from an earlier call changes nothing: the future is polled next anyway.
    signal.woken.store(false, Ordering::Relaxed);
    let mut cx = Context::from_waker(waker);
    loop {
        if let Poll::Ready(output) = future.as_mut().poll(&mut cx) {
            return output;
        }
        // A wake during the poll set the flag: poll again at once. Wake-ups without it (another
        // `block_on`'s, spurious ones) go back to sleep.
        while !signal.woken.swap(false, Ordering::Acquire) {
            thread::park();
        }
    }
}

thread_local! {
    /// The thread's waker for [`block_on`], kept between calls: every blocking call (each
    /// `Subscription::recv` of an event flood) would otherwise allocate one. A nested call, finding
    /// it taken, makes its own.
    static BLOCK_ON_WAKER: Cell<Option<(Waker, Arc<ThreadWaker>)>> = const { Cell::new(None) };
}

/// Puts the waker back for the thread's next [`block_on`], whether the call returns or unwinds.
struct CachedWaker(Option<(Waker, Arc<ThreadWaker>)>);

impl Drop for CachedWaker {
    fn drop(&mut self) {
        // During thread exit the slot may be gone: the waker is dropped instead.
        let _ = BLOCK_ON_WAKER.try_with(|slot| slot.set(self.0.take()));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::OnceLock;
    use std::sync::mpsc;

    /// A lead suspended by a blocking call, and lost to another thread's `Client::block_on`
    /// meanwhile, still runs the rest of `poll_here` when the blocking call returns: it consumes
    /// `assist_dirty` (a wake the new leader's task poll received) and, failing `try_lock`,
    /// drops it. Nobody polls the task again.
    #[test]
    fn a_lost_lead_returning_into_poll_here_eats_the_new_leaders_wake() {
        let (a, _b) = UnixStream::pair().unwrap();
        let (_t, _tm, rt, shared) = parts(Io::Unix(a)).unwrap();

        struct St {
            work: AtomicBool,
            done: AtomicBool,
            done_waker: Mutex<Option<Waker>>,
            l_thread: OnceLock<thread::ThreadId>,
            hooked: AtomicBool,
            gate_tx: Mutex<Option<mpsc::Sender<()>>>,
            stale_rx: Mutex<Option<mpsc::Receiver<()>>>,
        }
        let (gate_tx, gate_rx) = mpsc::channel::<()>();
        let (stale_tx, stale_rx) = mpsc::channel::<()>();
        let st = Arc::new(St {
            work: AtomicBool::new(false),
            done: AtomicBool::new(false),
            done_waker: Mutex::new(None),
            l_thread: OnceLock::new(),
            hooked: AtomicBool::new(false),
            gate_tx: Mutex::new(Some(gate_tx)),
            stale_rx: Mutex::new(Some(stale_rx)),
        });
        let task = {
            let st = st.clone();
            std::future::poll_fn(move |cx| {
                if st.work.swap(false, Ordering::SeqCst) {
                    st.done.store(true, Ordering::SeqCst);
                    if let Some(w) = st.done_waker.lock().unwrap().take() {
                        w.wake();
                    }
                }
                if st.l_thread.get() == Some(&thread::current().id())
                    && !st.hooked.swap(true, Ordering::SeqCst)
                {
                    // A command is submitted while the leader polls the task, after the task
                    // looked: its wake is what must make the task be polled again.
                    st.work.store(true, Ordering::SeqCst);
                    cx.waker().wake_by_ref();
                    // The suspended thread's blocking call returns now.
                    st.gate_tx.lock().unwrap().take().unwrap().send(()).unwrap();
                    st.stale_rx.lock().unwrap().take().unwrap().recv().unwrap();
                }
                Poll::<()>::Pending
            })
        };
        rt.spawn(Box::pin(task));
        thread::sleep(Duration::from_millis(50));

        // S leads, then blocks (suspending its lead) until the gate opens.
        let (susp_tx, susp_rx) = mpsc::channel::<()>();
        let s = {
            let shared = shared.clone();
            thread::spawn(move || {
                lead_or_park(
                    &shared,
                    pin!(async {
                        block_on(std::future::poll_fn(|_| {
                            susp_tx.send(()).unwrap();
                            gate_rx.recv().unwrap();
                            Poll::Ready(())
                        }))
                    }),
                    true,
                );
                stale_tx.send(()).unwrap();
            })
        };
        susp_rx.recv().unwrap();
        assert!(!shared.leader.load(Ordering::SeqCst));

        // L takes the lead and waits for the work to be done by the task.
        let (done_tx, done_rx) = mpsc::channel();
        {
            let shared = shared.clone();
            let st = st.clone();
            thread::spawn(move || {
                st.l_thread.set(thread::current().id()).unwrap();
                lead_or_park(
                    &shared,
                    pin!(std::future::poll_fn(|cx| {
                        *st.done_waker.lock().unwrap() = Some(cx.waker().clone());
                        if st.done.load(Ordering::SeqCst) {
                            Poll::Ready(())
                        } else {
                            Poll::Pending
                        }
                    })),
                    true,
                );
                done_tx.send(()).unwrap();
            });
        }
        s.join().unwrap();
        let r = done_rx.recv_timeout(Duration::from_secs(3));
        assert!(
            r.is_ok(),
            "the wake submitted during the leader's task poll was lost: work={} assisting={} dirty={} leader={}",
            st.work.load(Ordering::SeqCst),
            shared.assisting.load(Ordering::SeqCst),
            shared.assist_dirty.load(Ordering::SeqCst),
            shared.leader.load(Ordering::SeqCst),
        );
    }
}
