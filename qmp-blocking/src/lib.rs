//! A blocking QEMU Machine Protocol (QMP) client, for programs with no async runtime: std unix and
//! TCP sockets, plain threads.
//!
//! ```no_run
//! use std::time::Duration;
//! use qmp_blocking::{EventFilter, Options};
//! use serde_json::json;
//!
//! # fn main() -> Result<(), qmp_blocking::Error> {
//! let client = qmp_blocking::connect("/run/qemu/vm1.qmp", Options::new())?;
//! println!("QEMU {}", client.greeting().version);
//! let status = client.execute("query-status", ())?;
//! println!("{}", status["status"]);
//!
//! let done = EventFilter::name("BLOCK_JOB_COMPLETED").data(json!({"device": "job0"}));
//! let mut events = client.subscribe(done.clone());
//! client.execute("blockdev-backup",
//!     json!({"job-id": "job0", "device": "src", "target": "tgt", "sync": "full"}))?;
//! let event = events.wait_for(&done, Duration::from_secs(60))?;
//! println!("{event:?}");
//! # Ok(()) }
//! ```
//!
//! # How it works, and why
//!
//! The client is the same as `qmp-tokio`'s and `qmp-async-std`'s (`qmp-client`), so it behaves
//! the same to the byte: a handle that is `Clone + Send + Sync` and can be used from any number of
//! threads at once, events buffered per subscription with lag reporting, cancel-safe timeouts, fd
//! passing. Its connection task runs on one background thread per connection, in a tiny
//! `poll(2)` loop over the socket and a wake-up pipe (no runtime, no extra dependency), so events
//! are read even while no call is made, and many threads can share a handle without the deadlocks
//! of a single-threaded blocking design (a thread blocked reading while another needs to write).
//!
//! A call made while no other is under way does the work itself, on the calling thread: it
//! writes its command and reads until its reply is in (polling the connection's task, kept behind
//! a mutex), while the background thread stays off the socket. A round trip then involves no
//! other thread of ours, as with an async runtime: on one CPU against the benchmark's fake server
//! this made round trips 1.5 times faster, as fast as `qmp-tokio`'s (`BENCHMARKS.md`). Calls
//! that start while another is under way sleep until the reading thread hands them their reply.
//! When the last call is over, the background thread takes the socket back within 2 ms; an event
//! arriving in that window is read then. A thread that drives a connection and blocks on
//! anything else meanwhile (a blocking call made from inside [`Client::block_on`], say) hands
//! the connection back to its thread for that time, so nothing waits on it.
//!
//! # Many commands at once from one thread
//!
//! Threads sharing a [`Client`] each wait for their own answer, so keeping 32 commands in flight
//! that way wakes 32 threads per batch of replies. One thread can keep them in flight instead,
//! through the async client inside ([`Client::as_async`]) run by [`Client::block_on`], which
//! drives the connection from that thread while it waits; no runtime is involved. On the
//! benchmark's fake server this pipelines as fast as `qmp-tokio`, 4 times faster than 32 threads
//! (`BENCHMARKS.md`).
//!
//! ```no_run
//! use futures_util::stream::{self, StreamExt};
//! use serde_json::json;
//!
//! # fn main() -> Result<(), qmp_blocking::Error> {
//! let client = qmp_blocking::connect("/run/qemu/vm1.qmp", qmp_blocking::Options::new())?;
//! let results: Vec<_> = client.block_on(
//!     stream::iter(0..100)
//!         .map(|i| {
//!             let node = json!({"driver": "null-co", "node-name": format!("n{i}")});
//!             client.as_async().execute("blockdev-add", node)
//!         })
//!         .buffer_unordered(32) // at most 32 in flight
//!         .collect(),
//! );
//! for result in results {
//!     result?;
//! }
//! # Ok(()) }
//! ```

#![forbid(unsafe_code)]
#![warn(missing_docs, unreachable_pub)]

mod executor;

use std::collections::BTreeSet;
use std::future::Future;
use std::io;
use std::net::{TcpListener, TcpStream};
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::Value;

pub use crate::executor::block_on;
use crate::executor::{Io, Shared, block_on_assisted, block_on_driving};
pub use qmp_client::{
    AddFdInfo, Address, ArgumentsError, Command, CommandError, Config, Disconnect, Error, Event,
    EventFilter, EventItem, Greeting, Lagged, MAX_FDS, NoReply, Options, ProtocolError, QmpError,
    RawJson, SendError, State, Timestamp, Version, qmp_proto,
};
use qmp_client::{Dial, SocketFile};

/// Connects to a QMP server at `address` (a unix socket path or `host:port`, see [`Address`]),
/// and completes the handshake, all within [`Options::connect_timeout`]. A QEMU monitor serves one
/// client at a time: while another is connected, no greeting comes, and this fails with
/// [`Error::NoGreeting`] when the timeout passes.
pub fn connect(address: impl Into<Address>, options: Options) -> Result<Client, Error> {
    let (io, options) = open(address.into(), options, true)?;
    start(io, options)
}

/// Connects to a guest agent (`qemu-ga`) at `address` — the unix socket or `host:port` of the
/// VM's guest-agent chardev — and resyncs, within [`Options::connect_timeout`]. See
/// [`GuestAgent`].
///
/// ```no_run
/// # fn main() -> Result<(), qmp_blocking::Error> {
/// use std::time::Duration;
/// let agent = qmp_blocking::connect_guest_agent("/run/qemu/vm1.qga", qmp_blocking::Options::new())?
///     .with_timeout(Duration::from_secs(10));
/// println!("{}", agent.execute("guest-get-osinfo", ())?["pretty-name"]);
/// # Ok(()) }
/// ```
pub fn connect_guest_agent(
    address: impl Into<Address>,
    options: Options,
) -> Result<GuestAgent, Error> {
    let (io, options) = open(address.into(), options, false)?;
    start_guest_agent(io, options)
}

/// Opens a connection to `address` within the connect deadline; returns the options with the
/// time left of it. `monitor`: a QMP monitor, not a guest agent (for the error a busy one gives).
fn open(address: Address, options: Options, monitor: bool) -> Result<(Io, Options), Error> {
    let deadline = options.connect_timeout_value();
    let started = Instant::now();
    let mut dial = Dial::new(&options, monitor);
    let stream = loop {
        let outcome = match &address {
            Address::Unix(path) => qmp_client::try_connect_unix(path).and_then(|s| {
                s.map(|s| s.set_nonblocking(false).map(|()| Io::Unix(s)))
                    .transpose()
            }),
            Address::Tcp(hostport) => {
                let left = deadline.saturating_sub(started.elapsed());
                connect_tcp(hostport, left).map(|s| Some(Io::Tcp(s)))
            }
            other => Err(other.unsupported()),
        };
        match dial.attempt(outcome) {
            Ok(Some(stream)) => break stream,
            Ok(None) if started.elapsed() + qmp_client::CONNECT_RETRY < deadline => {
                std::thread::sleep(qmp_client::CONNECT_RETRY);
            }
            Ok(None) => return Err(dial.expired(&address)),
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::TimedOut | io::ErrorKind::WouldBlock
                ) =>
            {
                return Err(Error::Timeout);
            }
            Err(e) => return Err(address.connect_error(e).into()),
        }
    };
    let options = options.connect_timeout(deadline.saturating_sub(started.elapsed()));
    Ok((stream, options))
}

/// Connects to `hostport`, trying each address it resolves to in turn (`localhost` may be `::1`
/// first, and QEMU listening on 127.0.0.1 only), within `timeout` in all, the name lookup
/// included (it runs on a thread of its own: see [`qmp_client::lookup`]).
fn connect_tcp(hostport: &str, timeout: Duration) -> io::Result<TcpStream> {
    let started = Instant::now();
    let lookup =
        futures_util::future::select(qmp_client::lookup(hostport), executor::sleep(timeout));
    let addrs = match block_on(lookup) {
        futures_util::future::Either::Left((found, _)) => found?,
        futures_util::future::Either::Right(_) => {
            return Err(io::Error::new(
                io::ErrorKind::TimedOut,
                format!("looking up {hostport} took longer than the connect timeout"),
            ));
        }
    };
    let mut last = None;
    for addr in addrs {
        let left = timeout.saturating_sub(started.elapsed());
        if left.is_zero() {
            return Err(io::ErrorKind::TimedOut.into());
        }
        match TcpStream::connect_timeout(&addr, left) {
            Ok(s) => {
                s.set_nodelay(true)?;
                return Ok(s);
            }
            Err(e) => last = Some(e),
        }
    }
    Err(last.unwrap_or_else(|| qmp_client::no_address(hostport)))
}

/// Runs a client over a connected unix socket (one of a `socketpair`, or inherited). File
/// descriptors can be passed.
pub fn wrap_unix(stream: UnixStream, options: Options) -> Result<Client, Error> {
    start(Io::Unix(stream), options)
}

/// Runs a client over any stream whose reads and writes all go through the one descriptor its
/// `AsFd` gives: a socket, or a wrapper around one (TLS over a TCP socket, ...). That descriptor
/// is switched to non-blocking mode and watched with `poll(2)`. A stream split over two
/// descriptors (a pair of pipes) is not supported: the one not watched would block the
/// connection's thread, timeouts and all. File descriptors cannot be passed over it.
pub fn wrap<S>(stream: S, options: Options) -> Result<Client, Error>
where
    S: io::Read + io::Write + AsFd + Send + 'static,
{
    start(Io::Other(Box::new(stream)), options)
}

/// Runs a guest-agent client over any stream `poll(2)` understands (see [`wrap`]).
pub fn wrap_guest_agent<S>(stream: S, options: Options) -> Result<GuestAgent, Error>
where
    S: io::Read + io::Write + AsFd + Send + 'static,
{
    start_guest_agent(Io::Other(Box::new(stream)), options)
}

fn start(io: Io, options: Options) -> Result<Client, Error> {
    let (transport, timer, runtime, shared) = executor::parts(io)?;
    // The connection's task is this crate's to run: see `Options::spawner`.
    let options = options.without_spawner();
    let inner = block_on(qmp_client::Client::start(
        transport, timer, options, runtime,
    ))?;
    Ok(Client { inner, shared })
}

fn start_guest_agent(io: Io, options: Options) -> Result<GuestAgent, Error> {
    let (transport, timer, runtime, shared) = executor::parts(io)?;
    let options = options.without_spawner();
    let inner = block_on(qmp_client::GuestAgent::start(
        transport, timer, options, runtime,
    ))?;
    Ok(GuestAgent { inner, shared })
}

/// A socket QEMU connects to (its `server=off` chardevs): bind, start QEMU, accept.
#[derive(Debug)]
pub struct Listener {
    inner: ListenerKind,
}

#[derive(Debug)]
enum ListenerKind {
    Unix(UnixListener, SocketFile),
    Tcp(TcpListener),
}

impl Listener {
    /// Listens on `address`. A unix socket file is created (and removed when the listener is
    /// dropped); an existing file there is an error.
    pub fn bind(address: impl Into<Address>) -> Result<Self, Error> {
        let address = address.into();
        let inner = match &address {
            Address::Unix(path) => UnixListener::bind(path)
                .map(|l| ListenerKind::Unix(l, SocketFile::new(path.clone()))),
            Address::Tcp(hostport) => TcpListener::bind(hostport.as_str()).map(ListenerKind::Tcp),
            other => Err(other.unsupported()),
        };
        let inner = inner.map_err(|e| address.bind_error(e))?;
        Ok(Self { inner })
    }

    /// The unix socket path, if this is a unix listener.
    pub fn path(&self) -> Option<&Path> {
        match &self.inner {
            ListenerKind::Unix(_, file) => Some(file.path()),
            ListenerKind::Tcp(_) => None,
        }
    }

    /// The TCP address, if this is a TCP listener.
    pub fn local_addr(&self) -> Option<std::net::SocketAddr> {
        match &self.inner {
            ListenerKind::Unix(..) => None,
            ListenerKind::Tcp(l) => l.local_addr().ok(),
        }
    }

    /// Waits for QEMU to connect (no deadline), then completes the handshake within
    /// [`Options::connect_timeout`].
    pub fn accept(&self, options: Options) -> Result<Client, Error> {
        start(self.accept_stream()?, options)
    }

    /// Waits for QEMU to connect a guest-agent chardev, then resyncs within
    /// [`Options::connect_timeout`].
    pub fn accept_guest_agent(&self, options: Options) -> Result<GuestAgent, Error> {
        start_guest_agent(self.accept_stream()?, options)
    }

    fn accept_stream(&self) -> Result<Io, Error> {
        Ok(match &self.inner {
            ListenerKind::Unix(l, _) => Io::Unix(l.accept()?.0),
            ListenerKind::Tcp(l) => {
                let s = l.accept()?.0;
                s.set_nodelay(true)?;
                Io::Tcp(s)
            }
        })
    }
}

/// A blocking QMP client: the async client's API with every call waiting for its answer. Clones
/// share one connection and can be used from any number of threads.
#[derive(Clone)]
pub struct Client {
    inner: qmp_client::Client,
    /// The connection's executor state, so a call can drive the connection itself.
    shared: Arc<Shared>,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.inner.fmt(f)
    }
}

impl Client {
    /// Waits for a call that submits a command.
    fn call_on<F: Future>(&self, call: F) -> F::Output {
        block_on_assisted(&self.shared, call)
    }

    /// Executes `name` with `arguments` (anything that serializes to a JSON object, or `()` for
    /// none) and returns the return value.
    pub fn execute(&self, name: &str, arguments: impl Serialize) -> Result<Value, Error> {
        self.call_on(self.inner.execute(name, arguments))
    }

    /// Executes `name` and deserializes the return value into `R`.
    pub fn execute_as<R: DeserializeOwned>(
        &self,
        name: &str,
        arguments: impl Serialize,
    ) -> Result<R, Error> {
        self.call_on(self.inner.execute_as(name, arguments))
    }

    /// Executes `name` out of band (needs `enable_oob` and a server that offers it).
    pub fn execute_oob(&self, name: &str, arguments: impl Serialize) -> Result<Value, Error> {
        self.call_on(self.inner.execute_oob(name, arguments))
    }

    /// Executes a pre-built command object; its `id` is replaced by the client's own.
    pub fn execute_raw(&self, command: Value) -> Result<Value, Error> {
        self.call_on(self.inner.execute_raw(command))
    }

    /// Executes a [`Command`] and returns the return value unparsed.
    pub fn call(&self, command: Command) -> Result<RawJson, Error> {
        self.call_on(self.inner.call(command))
    }

    /// Executes `name` with file descriptors attached (unix sockets only).
    pub fn execute_with_fds(
        &self,
        name: &str,
        arguments: impl Serialize,
        fds: Vec<OwnedFd>,
    ) -> Result<Value, Error> {
        self.call_on(self.inner.execute_with_fds(name, arguments, fds))
    }

    /// Passes `fd` to QEMU under `fdname` (`getfd`).
    pub fn getfd(&self, fdname: &str, fd: OwnedFd) -> Result<(), Error> {
        self.call_on(self.inner.getfd(fdname, fd))
    }

    /// Adds `fd` to an fd set (`add-fd`).
    pub fn add_fd(
        &self,
        fd: OwnedFd,
        fdset_id: Option<u64>,
        opaque: Option<&str>,
    ) -> Result<AddFdInfo, Error> {
        self.call_on(self.inner.add_fd(fd, fdset_id, opaque))
    }

    /// A handle to the same connection whose commands time out after `timeout`.
    pub fn with_timeout(&self, timeout: Duration) -> Self {
        Self {
            inner: self.inner.with_timeout(timeout),
            shared: Arc::clone(&self.shared),
        }
    }

    /// A handle to the same connection whose commands never time out.
    pub fn without_timeout(&self) -> Self {
        Self {
            inner: self.inner.without_timeout(),
            shared: Arc::clone(&self.shared),
        }
    }

    /// Subscribes to the events that pass `filter`, buffered (bounded, with lag reporting) until
    /// read. In place when this returns, so it sees the events of commands sent afterwards; the
    /// connection's first subscription also gets the events from before it (see
    /// [`qmp_client::Client::subscribe`]). When its queue is full the connection waits for it
    /// ([`Options::lag_after`], 1 s): a thread that subscribes and then blocks on a command whose
    /// events overflow the queue gets that command's reply that much later, and a `Lagged`.
    pub fn subscribe(&self, filter: EventFilter) -> Subscription {
        Subscription {
            inner: self.inner.subscribe(filter),
        }
    }

    /// Waits up to `timeout` for an event that passes `filter`, from now on.
    pub fn wait_for(&self, filter: EventFilter, timeout: Duration) -> Result<Event, Error> {
        block_on(self.inner.wait_for(filter, timeout))
    }

    /// The server's greeting.
    pub fn greeting(&self) -> &Greeting {
        self.inner.greeting()
    }

    /// Whether OOB was negotiated.
    pub fn oob_enabled(&self) -> bool {
        self.inner.oob_enabled()
    }

    /// The server's command names (`query-commands`, cached).
    pub fn commands(&self) -> Result<Arc<BTreeSet<String>>, Error> {
        self.call_on(self.inner.commands())
    }

    /// Whether the server has command `name`.
    pub fn has_command(&self, name: &str) -> Result<bool, Error> {
        self.call_on(self.inner.has_command(name))
    }

    /// The raw `query-qmp-schema`.
    pub fn schema(&self) -> Result<Value, Error> {
        self.call_on(self.inner.schema())
    }

    /// Whether the connection is open or why it closed.
    pub fn state(&self) -> State {
        self.inner.state()
    }

    /// Whether the connection has closed.
    pub fn is_closed(&self) -> bool {
        self.inner.is_closed()
    }

    /// Waits until the connection closes, and says why.
    pub fn closed(&self) -> Disconnect {
        block_on(self.inner.closed())
    }

    /// Closes the connection: queued bytes are written, waiting calls fail with
    /// [`Disconnect::Local`], subscriptions end. Returns once the socket is closed, its
    /// descriptors too.
    pub fn disconnect(&self) {
        block_on(self.inner.disconnect());
    }

    /// The async client inside, for code that mixes styles.
    pub fn as_async(&self) -> &qmp_client::Client {
        &self.inner
    }

    /// Runs `future` to completion on this thread, which also drives this connection while it
    /// waits: replies reach the future with no other thread woken. The way to keep many
    /// commands in flight from one thread (see the crate docs); any future works, this
    /// connection's calls gain. If another call is already driving the connection, this is
    /// [`crate::block_on`]. Blocking inside `future` through this crate (a blocking call, a
    /// subscription's `recv`) hands the connection back to its thread meanwhile; blocking some
    /// other way (a sleep, a lock, a channel) leaves it undriven until the future returns.
    ///
    /// ```no_run
    /// # fn main() -> Result<(), qmp_blocking::Error> {
    /// let client = qmp_blocking::connect("/run/qemu/vm1.qmp", qmp_blocking::Options::new())?;
    /// let (version, status) = client.block_on(async {
    ///     futures_util::join!(
    ///         client.as_async().execute("query-version", ()),
    ///         client.as_async().execute("query-status", ()),
    ///     )
    /// });
    /// println!("{} {}", version?, status?);
    /// # Ok(()) }
    /// ```
    pub fn block_on<F: Future>(&self, future: F) -> F::Output {
        block_on_driving(&self.shared, future)
    }
}

/// Events that pass a filter, from [`Client::subscribe`]. Also an [`Iterator`] that blocks for
/// each item and ends when the connection closes.
#[derive(Debug)]
pub struct Subscription {
    inner: qmp_client::Subscription,
}

impl Subscription {
    /// The next item, waiting for it; `None` once the connection closed and the queue is empty.
    pub fn recv(&mut self) -> Option<EventItem> {
        block_on(self.inner.recv())
    }

    /// The next event within `timeout` ([`Error::Timeout`], [`Error::Disconnected`],
    /// [`Error::Lagged`] otherwise).
    pub fn recv_timeout(&mut self, timeout: Duration) -> Result<Event, Error> {
        block_on(self.inner.recv_timeout(timeout))
    }

    /// The next event that also passes `filter`, within `timeout`.
    pub fn wait_for(&mut self, filter: &EventFilter, timeout: Duration) -> Result<Event, Error> {
        block_on(self.inner.wait_for(filter, timeout))
    }

    /// The async subscription inside.
    pub fn as_async(&mut self) -> &mut qmp_client::Subscription {
        &mut self.inner
    }
}

impl Iterator for Subscription {
    type Item = EventItem;

    fn next(&mut self) -> Option<EventItem> {
        self.recv()
    }
}

/// A blocking guest-agent client: [`qmp_client::GuestAgent`]'s API with every call waiting for its
/// answer. Clones share one connection and can be used from any number of threads; commands go
/// to the agent one at a time.
#[derive(Clone)]
pub struct GuestAgent {
    inner: qmp_client::GuestAgent,
    shared: Arc<Shared>,
}

impl std::fmt::Debug for GuestAgent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.inner.fmt(f)
    }
}

impl GuestAgent {
    /// Waits for a call that submits a command.
    fn call_on<F: Future>(&self, call: F) -> F::Output {
        block_on_assisted(&self.shared, call)
    }

    /// Executes `name` with `arguments` and returns the return value (`{}` for a
    /// `guest-shutdown` or `guest-suspend-*` that got no reply, as they do on success).
    pub fn execute(&self, name: &str, arguments: impl Serialize) -> Result<Value, Error> {
        self.call_on(self.inner.execute(name, arguments))
    }

    /// Executes `name` and deserializes the return value into `R`.
    pub fn execute_as<R: DeserializeOwned>(
        &self,
        name: &str,
        arguments: impl Serialize,
    ) -> Result<R, Error> {
        self.call_on(self.inner.execute_as(name, arguments))
    }

    /// Executes a pre-built command object; its `id` is replaced by the client's own.
    pub fn execute_raw(&self, command: Value) -> Result<Value, Error> {
        self.call_on(self.inner.execute_raw(command))
    }

    /// Executes a [`Command`] and returns the return value unparsed.
    pub fn call(&self, command: Command) -> Result<RawJson, Error> {
        self.call_on(self.inner.call(command))
    }

    /// Executes a command that sends no reply when it succeeds, waiting at most `wait` for an
    /// error; see [`qmp_client::GuestAgent::execute_no_reply`].
    pub fn execute_no_reply(
        &self,
        name: &str,
        arguments: impl Serialize,
        wait: Duration,
    ) -> Result<NoReply, Error> {
        self.call_on(self.inner.execute_no_reply(name, arguments, wait))
    }

    /// Resynchronises now (`0xFF` and `guest-sync-delimited`); the client already does on
    /// connect and after every timeout.
    pub fn resync(&self) -> Result<(), Error> {
        self.call_on(self.inner.resync())
    }

    /// A handle to the same connection whose commands time out after `timeout`.
    pub fn with_timeout(&self, timeout: Duration) -> Self {
        Self {
            inner: self.inner.with_timeout(timeout),
            shared: Arc::clone(&self.shared),
        }
    }

    /// A handle to the same connection whose commands never time out.
    pub fn without_timeout(&self) -> Self {
        Self {
            inner: self.inner.without_timeout(),
            shared: Arc::clone(&self.shared),
        }
    }

    /// Whether the connection is open or why it closed.
    pub fn state(&self) -> State {
        self.inner.state()
    }

    /// Whether the connection has closed.
    pub fn is_closed(&self) -> bool {
        self.inner.is_closed()
    }

    /// Waits until the connection closes, and says why.
    pub fn closed(&self) -> Disconnect {
        block_on(self.inner.closed())
    }

    /// Closes the connection; returns once the socket is closed.
    pub fn disconnect(&self) {
        block_on(self.inner.disconnect());
    }

    /// The async handle inside, for code that mixes styles.
    pub fn as_async(&self) -> &qmp_client::GuestAgent {
        &self.inner
    }
}
