//! A QEMU Machine Protocol (QMP) client for [async-std] and [smol] users, built on the
//! runtime-neutral `futures-io` traits and the smol family of crates (`async-io`,
//! `futures-lite`).
//!
//! [async-std]: https://docs.rs/async-std
//! [smol]: https://docs.rs/smol
//!
//! async-std is discontinued upstream (RUSTSEC-2025-0052) in favour of smol, so this crate does not
//! depend on it: it runs under async-std, smol, or any executor, because its sockets and timers
//! come from `async-io`, which brings its own reactor. async-std appears only among the
//! dev-dependencies, to test that its users are served.
//!
//! ```no_run
//! use std::time::Duration;
//! use qmp_async_std::{EventFilter, Options};
//!
//! # fn main() -> Result<(), qmp_async_std::Error> {
//! smol::block_on(async {
//!     let client = qmp_async_std::connect("/run/qemu/vm1.qmp", Options::new()).await?;
//!     println!("QEMU {}", client.greeting().version);
//!     let status = client.execute("query-status", ()).await?;
//!     println!("{}", status["status"]);
//!     let shutdown = client.wait_for(EventFilter::name("SHUTDOWN"), Duration::from_secs(60)).await;
//!     println!("{shutdown:?}");
//!     Ok(())
//! })
//! # }
//! ```
//!
//! The API is the one of `qmp-tokio` — [`Client`], [`Options`], [`EventFilter`], [`Error`] come
//! from `qmp-client` — so switching runtime is a change of dependency and import. This crate adds
//! [`connect`], [`Listener`] (QEMU connecting to us), [`wrap`] and [`wrap_unix`].
//!
//! By default each connection's task runs on a thread of its own (so it never depends on which
//! executor you use, nor blocks it). Every reply then crosses threads on its way to you. For
//! speed, keep the task on your executor instead, by giving a spawner, and run the code that
//! uses the client on that same executor:
//!
//! | executor | spawner | your code runs in |
//! |---|---|---|
//! | smol | `\|task\| smol::spawn(task).detach()` (or your `Executor`'s `spawn`) | a task on that executor |
//! | async-std | `\|task\| drop(async_std::task::spawn(task))` | `async_std::task::spawn` (not `block_on`, which runs on the calling thread) |
//!
//! Measured against a fake server on one CPU (`BENCHMARKS.md`), async-std round trips took
//! 2.6 s per 100,000 on a thread of its own and 1.46 s with the spawner and the work in a
//! spawned task (tokio: 1.32 s); 32 pipelined commands 0.73 s against 0.42 s per 300,000. With
//! smol, the work as a task on the same executor rather than the `block_on` future itself made
//! round trips 8% faster (1.44–1.52 s against 1.58–1.60 s).
//!
//! ```no_run
//! # fn main() -> Result<(), qmp_async_std::Error> {
//! use qmp_async_std::Options;
//!
//! async_std::task::block_on(async_std::task::spawn(async {
//!     let options = Options::new().spawner(|task| drop(async_std::task::spawn(task)));
//!     let client = qmp_async_std::connect("/run/qemu/vm1.qmp", options).await?;
//!     println!("{}", client.execute("query-status", ()).await?["status"]);
//!     Ok(())
//! }))
//! # }
//! ```

#![forbid(unsafe_code)]
#![warn(missing_docs, unreachable_pub)]

use std::io;
use std::net::{TcpListener, TcpStream};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};
use std::time::{Duration, Instant};

use async_io::{Async, Timer as AsyncTimer};
use futures_lite::{AsyncRead, AsyncWrite, FutureExt};
use qmp_client::{BoxFuture, Dial, Runtime, SocketFile, Timer, Transport, send_with_fds};

pub use qmp_client::{
    AddFdInfo, Address, ArgumentsError, Client, Command, CommandError, Config, Disconnect, Error,
    Event, EventFilter, EventItem, Greeting, GuestAgent, Lagged, MAX_FDS, NoReply, Options,
    ProtocolError, QmpError, RawJson, SendError, State, Subscription, Timestamp, Version,
    qmp_proto,
};

/// Connects to a QMP server at `address` (a unix socket path or `host:port`, see [`Address`]),
/// and completes the handshake, all within [`Options::connect_timeout`]. A QEMU monitor serves one
/// client at a time: while another is connected, no greeting comes, and this fails with
/// [`Error::NoGreeting`] when the timeout passes.
pub async fn connect(address: impl Into<Address>, options: Options) -> Result<Client, Error> {
    let (stream, options) = open(address.into(), options, true).await?;
    start(stream, options).await
}

/// Connects to a guest agent (`qemu-ga`) at `address` — the unix socket or `host:port` of the
/// VM's guest-agent chardev — and resyncs, within [`Options::connect_timeout`]. See
/// [`GuestAgent`].
pub async fn connect_guest_agent(
    address: impl Into<Address>,
    options: Options,
) -> Result<GuestAgent, Error> {
    let (stream, options) = open(address.into(), options, false).await?;
    start_guest_agent(stream, options).await
}

/// Opens a connection to `address` within the connect deadline; returns the options with the
/// time left of it. `monitor`: a QMP monitor, not a guest agent (for the error a busy one gives).
async fn open(
    address: Address,
    options: Options,
    monitor: bool,
) -> Result<(Stream, Options), Error> {
    let deadline = options.connect_timeout_value();
    let started = Instant::now();
    let mut dial = Dial::new(&options, monitor);
    let connecting = async {
        loop {
            let outcome = match &address {
                Address::Unix(path) => qmp_client::try_connect_unix(path)
                    .and_then(|s| s.map(Async::new).transpose())
                    .map(|s| s.map(Stream::Unix)),
                Address::Tcp(hostport) => connect_tcp(hostport).await.map(|s| Some(Stream::Tcp(s))),
                other => Err(other.unsupported()),
            };
            if let Some(stream) = dial.attempt(outcome)? {
                return Ok::<_, io::Error>(Some(stream));
            }
            AsyncTimer::after(qmp_client::CONNECT_RETRY).await;
        }
    };
    let timeout = async {
        AsyncTimer::after(deadline).await;
        Ok(None)
    };
    let stream = match connecting.or(timeout).await {
        Ok(Some(stream)) => stream,
        Ok(None) => return Err(dial.expired(&address)),
        // The system's own connect timeout (TCP).
        Err(e) if e.kind() == io::ErrorKind::TimedOut => return Err(Error::Timeout),
        Err(e) => return Err(address.connect_error(e).into()),
    };
    let options = options.connect_timeout(deadline.saturating_sub(started.elapsed()));
    Ok((stream, options))
}

/// Connects to `hostport`, trying each address it resolves to in turn (`localhost` may be `::1`
/// first, and QEMU listening on 127.0.0.1 only). A name is looked up on a thread of its own
/// ([`qmp_client::lookup`]), so a hanging resolver does not block the executor and the connect
/// deadline holds.
async fn connect_tcp(hostport: &str) -> io::Result<Async<TcpStream>> {
    let mut last = None;
    for addr in qmp_client::lookup(hostport).await? {
        match Async::<TcpStream>::connect(addr).await {
            Ok(s) => {
                s.get_ref().set_nodelay(true)?;
                return Ok(s);
            }
            Err(e) => last = Some(e),
        }
    }
    Err(last.unwrap_or_else(|| qmp_client::no_address(hostport)))
}

/// Runs a client over a connected unix socket (one of a `socketpair`, or inherited). File
/// descriptors can be passed.
pub async fn wrap_unix(stream: UnixStream, options: Options) -> Result<Client, Error> {
    start(Stream::Unix(Async::new(stream)?), options).await
}

/// Runs a client over any `futures-io` byte stream: TLS, a pipe, an in-memory duplex. File
/// descriptors cannot be passed over it.
pub async fn wrap<S>(stream: S, options: Options) -> Result<Client, Error>
where
    S: AsyncRead + AsyncWrite + Send + Unpin + 'static,
{
    start(Stream::Other(Box::new(stream)), options).await
}

/// Runs a guest-agent client over any `futures-io` byte stream (see [`wrap`]).
pub async fn wrap_guest_agent<S>(stream: S, options: Options) -> Result<GuestAgent, Error>
where
    S: AsyncRead + AsyncWrite + Send + Unpin + 'static,
{
    start_guest_agent(Stream::Other(Box::new(stream)), options).await
}

async fn start(stream: Stream, options: Options) -> Result<Client, Error> {
    let (transport, timer, runtime) = parts(stream);
    Client::start(transport, timer, options, runtime).await
}

async fn start_guest_agent(stream: Stream, options: Options) -> Result<GuestAgent, Error> {
    let (transport, timer, runtime) = parts(stream);
    GuestAgent::start(transport, timer, options, runtime).await
}

fn parts(stream: Stream) -> (AsyncIoTransport, IoTimer, Arc<dyn Runtime>) {
    let timer = IoTimer {
        timer: AsyncTimer::never(),
        at: None,
    };
    let transport = AsyncIoTransport {
        stream,
        drained: false,
    };
    (transport, timer, Arc::new(AsyncIoRuntime))
}

/// A socket QEMU connects to (its `server=off` chardevs): bind, start QEMU, accept.
#[derive(Debug)]
pub struct Listener {
    inner: ListenerKind,
}

#[derive(Debug)]
enum ListenerKind {
    Unix(Async<UnixListener>, SocketFile),
    Tcp(Async<TcpListener>),
}

impl Listener {
    /// Listens on `address`. A unix socket file is created (and removed when the listener is
    /// dropped); an existing file there is an error.
    pub async fn bind(address: impl Into<Address>) -> Result<Self, Error> {
        let address = address.into();
        let inner = match &address {
            Address::Unix(path) => Async::<UnixListener>::bind(path)
                .map(|l| ListenerKind::Unix(l, SocketFile::new(path.clone()))),
            Address::Tcp(hostport) => {
                // std's bind tries each address found in turn, as tokio's bind does.
                qmp_client::lookup(hostport)
                    .await
                    .and_then(|addrs| TcpListener::bind(&addrs[..]))
                    .and_then(Async::new)
                    .map(ListenerKind::Tcp)
            }
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

    /// The TCP address, if this is a TCP listener (useful after binding port 0).
    pub fn local_addr(&self) -> Option<std::net::SocketAddr> {
        match &self.inner {
            ListenerKind::Unix(..) => None,
            ListenerKind::Tcp(l) => l.get_ref().local_addr().ok(),
        }
    }

    /// Waits for QEMU to connect (no deadline: it connects when it starts), then completes the
    /// handshake within [`Options::connect_timeout`].
    pub async fn accept(&self, options: Options) -> Result<Client, Error> {
        start(self.accept_stream().await?, options).await
    }

    /// Waits for QEMU to connect a guest-agent chardev, then resyncs within
    /// [`Options::connect_timeout`].
    pub async fn accept_guest_agent(&self, options: Options) -> Result<GuestAgent, Error> {
        start_guest_agent(self.accept_stream().await?, options).await
    }

    async fn accept_stream(&self) -> Result<Stream, Error> {
        Ok(match &self.inner {
            ListenerKind::Unix(l, _) => Stream::Unix(l.accept().await?.0),
            ListenerKind::Tcp(l) => {
                let s = l.accept().await?.0;
                s.get_ref().set_nodelay(true)?;
                Stream::Tcp(s)
            }
        })
    }
}

trait Io: AsyncRead + AsyncWrite + Send + Unpin {}
impl<T: AsyncRead + AsyncWrite + Send + Unpin> Io for T {}

enum Stream {
    Unix(Async<UnixStream>),
    Tcp(Async<TcpStream>),
    Other(Box<dyn Io>),
}

impl Stream {
    fn io(&mut self) -> Pin<&mut dyn Io> {
        match self {
            Self::Unix(s) => Pin::new(s),
            Self::Tcp(s) => Pin::new(s),
            Self::Other(s) => Pin::new(&mut **s),
        }
    }
}

struct AsyncIoTransport {
    stream: Stream,
    /// The last read came back short: the socket is very likely empty, so the next read waits
    /// for readiness instead of trying (and failing with `EAGAIN`) first. A write clears it, as
    /// a reply may follow at once.
    drained: bool,
}

impl Transport for AsyncIoTransport {
    fn poll_read(&mut self, cx: &mut Context<'_>, buf: &mut [u8]) -> Poll<io::Result<usize>> {
        if std::mem::take(&mut self.drained) {
            let readable = match &self.stream {
                Stream::Unix(s) => s.poll_readable(cx),
                Stream::Tcp(s) => s.poll_readable(cx),
                Stream::Other(_) => Poll::Ready(Ok(())),
            };
            if readable.is_pending() {
                self.drained = true;
                return Poll::Pending;
            }
        }
        let read = ready!(self.stream.io().poll_read(cx, buf));
        self.drained = matches!(read, Ok(n) if n > 0 && n < buf.len());
        Poll::Ready(read)
    }

    fn poll_write(
        &mut self,
        cx: &mut Context<'_>,
        data: &[u8],
        fds: &[std::os::fd::OwnedFd],
    ) -> Poll<io::Result<usize>> {
        self.drained = false;
        match &mut self.stream {
            Stream::Unix(s) if !fds.is_empty() => loop {
                match send_with_fds(s.get_ref(), data, fds) {
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => ready!(s.poll_writable(cx))?,
                    result => return Poll::Ready(result),
                }
            },
            stream => stream.io().poll_write(cx, data),
        }
    }

    fn poll_flush(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.stream.io().poll_flush(cx)
    }

    fn poll_close(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match &mut self.stream {
            // `Async`'s poll_close only flushes: shut the write side down so the peer sees EOF.
            Stream::Unix(s) => Poll::Ready(s.get_ref().shutdown(std::net::Shutdown::Write)),
            Stream::Tcp(s) => Poll::Ready(s.get_ref().shutdown(std::net::Shutdown::Write)),
            Stream::Other(s) => Pin::new(&mut **s).poll_close(cx),
        }
    }

    fn can_pass_fds(&self) -> bool {
        matches!(self.stream, Stream::Unix(_))
    }
}

struct IoTimer {
    timer: AsyncTimer,
    at: Option<Instant>,
}

impl Timer for IoTimer {
    fn poll_at(&mut self, cx: &mut Context<'_>, at: Instant) -> Poll<()> {
        if self.at != Some(at) {
            self.timer.set_at(at);
            self.at = Some(at);
        }
        Pin::new(&mut self.timer).poll(cx).map(drop)
    }
}

struct AsyncIoRuntime;

impl Runtime for AsyncIoRuntime {
    fn spawn(&self, future: BoxFuture) {
        // A thread per connection: the task then depends on no executor at all (async-io brings
        // the reactor), and can never be starved by, or starve, the application's tasks.
        // If no thread can be had, the task is dropped and `connect` reports the connection
        // closed.
        let _ = std::thread::Builder::new()
            .name("qmp-connection".into())
            .spawn(move || async_io::block_on(future));
    }

    fn sleep(&self, duration: Duration) -> BoxFuture {
        Box::pin(async move {
            AsyncTimer::after(duration).await;
        })
    }

    fn yield_now(&self) -> BoxFuture {
        Box::pin(futures_lite::future::yield_now())
    }
}
