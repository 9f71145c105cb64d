//! A QEMU Machine Protocol (QMP) client for [tokio].
//!
//! ```no_run
//! use std::time::Duration;
//! use qmp_tokio::{EventFilter, Options};
//! use serde_json::json;
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), qmp_tokio::Error> {
//! let client = qmp_tokio::connect("/run/qemu/vm1.qmp", Options::new()).await?;
//! println!("QEMU {}", client.greeting().version);
//!
//! // Subscribe before the command, so even events QEMU sends before its reply are seen.
//! let done = EventFilter::name("BLOCK_JOB_COMPLETED").data(json!({"device": "job0"}));
//! let mut events = client.subscribe(done.clone());
//! client.execute("blockdev-backup",
//!     json!({"job-id": "job0", "device": "src", "target": "tgt", "sync": "full"})).await?;
//! let event = events.wait_for(&done, Duration::from_secs(60)).await?;
//! println!("{} at {:?}", event.name, event.timestamp);
//! client.disconnect().await;
//! # Ok(()) }
//! ```
//!
//! Everything else — [`Client`], [`GuestAgent`], [`Options`], [`EventFilter`], [`Error`] — comes
//! from `qmp-client` and is the same in `qmp-async-std`; this crate adds only what ties it to
//! tokio: [`connect`], [`Listener`] (QEMU connecting to us), [`wrap`] and [`wrap_unix`] (any
//! stream), and for the guest agent [`connect_guest_agent`] and [`wrap_guest_agent`].
//!
//! The connection runs in a task spawned on the current tokio runtime, which owns the socket.
//! Commands and subscriptions only hand it requests and take its answers, so every call is
//! cancel-safe.

#![forbid(unsafe_code)]
#![warn(missing_docs, unreachable_pub)]

use std::io;
use std::os::fd::AsFd;
use std::path::Path;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};
use std::time::{Duration, Instant};

use qmp_client::{BoxFuture, Dial, Runtime, SocketFile, Timer, Transport, send_with_fds};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream, UnixListener, UnixStream};

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
///
/// ```no_run
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), qmp_tokio::Error> {
/// use std::time::Duration;
/// let agent = qmp_tokio::connect_guest_agent("/run/qemu/vm1.qga", qmp_tokio::Options::new())
///     .await?
///     .with_timeout(Duration::from_secs(10));
/// let os = agent.execute("guest-get-osinfo", ()).await?;
/// println!("{}", os["pretty-name"]);
/// # Ok(()) }
/// ```
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
                    .and_then(|s| s.map(UnixStream::from_std).transpose())
                    .map(|s| s.map(Stream::Unix)),
                Address::Tcp(hostport) => TcpStream::connect(hostport.as_str())
                    .await
                    .and_then(|s| s.set_nodelay(true).map(|()| Some(Stream::Tcp(s)))),
                other => Err(other.unsupported()),
            };
            if let Some(stream) = dial.attempt(outcome)? {
                return Ok::<_, io::Error>(stream);
            }
            tokio::time::sleep(qmp_client::CONNECT_RETRY).await;
        }
    };
    let stream = match tokio::time::timeout(deadline, connecting).await {
        Err(_) => return Err(dial.expired(&address)),
        // The system's own connect timeout (TCP), reported as the other adapters do.
        Ok(Err(e)) if e.kind() == io::ErrorKind::TimedOut => return Err(Error::Timeout),
        Ok(connected) => connected.map_err(|e| address.connect_error(e))?,
    };
    let options = options.connect_timeout(deadline.saturating_sub(started.elapsed()));
    Ok((stream, options))
}

/// Runs a client over a connected unix socket (for example one of a `socketpair`, or inherited).
/// File descriptors can be passed.
pub async fn wrap_unix(stream: UnixStream, options: Options) -> Result<Client, Error> {
    start(Stream::Unix(stream), options).await
}

/// Runs a client over any byte stream: TLS, a pipe, an in-memory duplex. File descriptors cannot
/// be passed over it.
pub async fn wrap<S>(stream: S, options: Options) -> Result<Client, Error>
where
    S: AsyncRead + AsyncWrite + Send + Unpin + 'static,
{
    start(Stream::Other(Box::new(stream)), options).await
}

/// Runs a guest-agent client over any byte stream (see [`wrap`]).
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

fn parts(stream: Stream) -> (TokioTransport, TokioTimer, Arc<dyn Runtime>) {
    let timer = TokioTimer {
        sleep: Box::pin(tokio::time::sleep(Duration::ZERO)),
        at: None,
    };
    let runtime = Arc::new(TokioRuntime(tokio::runtime::Handle::current()));
    (TokioTransport::new(stream), timer, runtime)
}

/// A socket QEMU connects to (its `server=off` chardevs): bind, start QEMU, accept.
///
/// ```no_run
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), qmp_tokio::Error> {
/// let listener = qmp_tokio::Listener::bind("/tmp/qmp.sock").await?;
/// // qemu-storage-daemon --chardev socket,path=/tmp/qmp.sock,server=off,id=m --monitor chardev=m
/// let client = listener.accept(qmp_tokio::Options::new()).await?;
/// # let _ = client; Ok(()) }
/// ```
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
    pub async fn bind(address: impl Into<Address>) -> Result<Self, Error> {
        let address = address.into();
        let inner = match &address {
            Address::Unix(path) => UnixListener::bind(path)
                .map(|l| ListenerKind::Unix(l, SocketFile::new(path.clone()))),
            Address::Tcp(hostport) => TcpListener::bind(hostport.as_str())
                .await
                .map(ListenerKind::Tcp),
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
            ListenerKind::Tcp(l) => l.local_addr().ok(),
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
                s.set_nodelay(true)?;
                Stream::Tcp(s)
            }
        })
    }
}

trait Io: AsyncRead + AsyncWrite + Send + Unpin {}
impl<T: AsyncRead + AsyncWrite + Send + Unpin> Io for T {}

enum Stream {
    Unix(UnixStream),
    Tcp(TcpStream),
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

struct TokioTransport {
    stream: Stream,
    /// Bytes were written since the last read: the reply may already be there.
    wrote: bool,
}

impl TokioTransport {
    fn new(stream: Stream) -> Self {
        Self {
            stream,
            wrote: false,
        }
    }

    /// Right after a write, reads the socket directly, without waiting for the reactor to report
    /// it readable. A peer on the same CPU (QEMU next to its manager, a test server) often answers
    /// within our `send`; then this saves an `epoll_wait` round per reply. When nothing is there
    /// yet it costs one `recv` that fails, and the usual path (which registers for readiness)
    /// follows. Reading behind tokio's back is safe: its readiness is only a hint, cleared by the
    /// next `WouldBlock`.
    fn read_after_write(&mut self, buf: &mut [u8]) -> Option<io::Result<usize>> {
        let fd = match &self.stream {
            Stream::Unix(s) => s.as_fd(),
            Stream::Tcp(s) => s.as_fd(),
            Stream::Other(_) => return None,
        };
        match rustix::net::recv(fd, buf, rustix::net::RecvFlags::DONTWAIT) {
            Ok((n, _)) => Some(Ok(n)),
            Err(rustix::io::Errno::AGAIN | rustix::io::Errno::INTR) => None,
            Err(e) => Some(Err(e.into())),
        }
    }
}

impl Transport for TokioTransport {
    fn poll_read(&mut self, cx: &mut Context<'_>, buf: &mut [u8]) -> Poll<io::Result<usize>> {
        if std::mem::take(&mut self.wrote)
            && let Some(result) = self.read_after_write(buf)
        {
            return Poll::Ready(result);
        }
        let mut buf = ReadBuf::new(buf);
        ready!(self.stream.io().poll_read(cx, &mut buf))?;
        Poll::Ready(Ok(buf.filled().len()))
    }

    fn poll_write(
        &mut self,
        cx: &mut Context<'_>,
        data: &[u8],
        fds: &[std::os::fd::OwnedFd],
    ) -> Poll<io::Result<usize>> {
        let written = match &mut self.stream {
            Stream::Unix(s) if !fds.is_empty() => loop {
                ready!(s.poll_write_ready(cx))?;
                match s.try_io(tokio::io::Interest::WRITABLE, || {
                    send_with_fds(&*s, data, fds)
                }) {
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                    result => break Poll::Ready(result),
                }
            },
            stream => stream.io().poll_write(cx, data),
        };
        self.wrote |= matches!(written, Poll::Ready(Ok(n)) if n > 0);
        written
    }

    fn poll_flush(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.stream.io().poll_flush(cx)
    }

    fn poll_close(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.stream.io().poll_shutdown(cx)
    }

    fn can_pass_fds(&self) -> bool {
        matches!(self.stream, Stream::Unix(_))
    }
}

struct TokioTimer {
    sleep: Pin<Box<tokio::time::Sleep>>,
    at: Option<Instant>,
}

impl Timer for TokioTimer {
    fn poll_at(&mut self, cx: &mut Context<'_>, at: Instant) -> Poll<()> {
        if self.at != Some(at) {
            self.sleep
                .as_mut()
                .reset(tokio::time::Instant::from_std(at));
            self.at = Some(at);
        }
        self.sleep.as_mut().poll(cx)
    }
}

struct TokioRuntime(tokio::runtime::Handle);

/// The README's examples, compiled (and the IO-free one run) as doctests so they cannot rot.
#[doc = include_str!("../../README.md")]
#[cfg(doctest)]
pub struct ReadmeDoctests;

impl Runtime for TokioRuntime {
    fn spawn(&self, future: BoxFuture) {
        drop(self.0.spawn(future));
    }

    fn sleep(&self, duration: Duration) -> BoxFuture {
        Box::pin(tokio::time::sleep(duration))
    }

    fn yield_now(&self) -> BoxFuture {
        // Deferred until the scheduler has run the other tasks (and a `block_on` future).
        Box::pin(tokio::task::yield_now())
    }
}
