//! Socket plumbing for the adapters: connecting (and retrying, [`Dial`]), addresses and their
//! errors, the socket files of listeners, and passing file descriptors with `SCM_RIGHTS`.

use std::fmt;
use std::future::Future;
use std::io::{self, IoSlice};
use std::mem::MaybeUninit;
use std::net::{SocketAddr, ToSocketAddrs};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::task::{Context, Poll};

use futures_channel::oneshot;
use rustix::net::{SendAncillaryBuffer, SendAncillaryMessage, SendFlags};

use crate::{Error, Options};

/// How often a connect retries while the server's queue of connections is full.
pub const CONNECT_RETRY: std::time::Duration = std::time::Duration::from_millis(10);

/// Connects to the unix socket at `path` without blocking: a non-blocking stream, or `None` if
/// the server's queue of pending connections is full. A QEMU monitor serving a client accepts no
/// other, and its queue holds one: from the third client on, connecting fails at once (`EAGAIN`,
/// where a blocking connect would wait, deadline or not, until QEMU accepts). Adapters retry
/// every [`CONNECT_RETRY`] until their deadline (see [`Dial`]).
pub fn try_connect_unix(path: &Path) -> io::Result<Option<std::os::unix::net::UnixStream>> {
    use rustix::net::{AddressFamily, SocketAddrUnix, SocketFlags, SocketType};
    let socket = rustix::net::socket_with(
        AddressFamily::UNIX,
        SocketType::STREAM,
        SocketFlags::NONBLOCK | SocketFlags::CLOEXEC,
        None,
    )?;
    match rustix::net::connect(&socket, &SocketAddrUnix::new(path)?) {
        Ok(()) => Ok(Some(socket.into())),
        Err(rustix::io::Errno::AGAIN) => Ok(None),
        Err(e) => Err(e.into()),
    }
}

/// The bookkeeping of an adapter's connect loop, so that every adapter retries the same failures
/// and reports the same error at the deadline. Each attempt's outcome goes through
/// [`attempt`](Self::attempt); between attempts the adapter sleeps [`CONNECT_RETRY`]; if the
/// connect deadline passes first, it reports [`expired`](Self::expired).
#[derive(Debug)]
pub struct Dial {
    wait_for_server: bool,
    monitor: bool,
    last: Option<Retry>,
}

/// Why the last attempt is worth repeating.
#[derive(Debug)]
enum Retry {
    /// The server's queue of pending connections is full ([`try_connect_unix`]).
    QueueFull,
    /// Nothing listens yet ([`Options::wait_for_server`]).
    Absent(io::Error),
}

impl Dial {
    /// For a connect with `options`, to a QMP monitor (`monitor`) or a guest agent.
    pub fn new(options: &Options, monitor: bool) -> Self {
        Self {
            wait_for_server: options.wait_for_server,
            monitor,
            last: None,
        }
    }

    /// Sorts one attempt's outcome: `Ok(Some(stream))`, connected; `Ok(None)` (a full queue, or
    /// a server not there yet that the options say to wait for), try again after
    /// [`CONNECT_RETRY`]; `Err`, give up with that error.
    pub fn attempt<S>(&mut self, outcome: io::Result<Option<S>>) -> io::Result<Option<S>> {
        match outcome {
            Ok(None) => {
                self.last = Some(Retry::QueueFull);
                Ok(None)
            }
            Err(e)
                if self.wait_for_server
                    && matches!(
                        e.kind(),
                        io::ErrorKind::NotFound | io::ErrorKind::ConnectionRefused
                    ) =>
            {
                self.last = Some(Retry::Absent(e));
                Ok(None)
            }
            connected_or_failed => connected_or_failed,
        }
    }

    /// What connecting to `address` reports when the deadline passes between attempts: for a
    /// full queue, [`Error::NoGreeting`] from a QMP monitor (its message names the likely cause,
    /// another client) and [`Error::Timeout`] from a guest agent (which never greets); for a
    /// server that never came, the last attempt's error; else [`Error::Timeout`].
    pub fn expired(self, address: &Address) -> Error {
        match self.last {
            Some(Retry::QueueFull) if self.monitor => Error::NoGreeting,
            Some(Retry::Absent(e)) => Error::Io(address.connect_error(e)),
            Some(Retry::QueueFull) | None => Error::Timeout,
        }
    }
}

/// Looks `hostport` up without blocking the caller: a literal address (`127.0.0.1:4444`,
/// `[::1]:4444`) at once, a name on a thread of its own. A resolver that hangs (an unreachable DNS
/// server) then holds up only that thread, which ends when the resolver gives up, and a connect
/// deadline still holds. For adapters that resolve names themselves.
pub fn lookup(hostport: &str) -> Lookup {
    lookup_with(hostport, |name| {
        name.to_socket_addrs().map(Iterator::collect)
    })
}

fn lookup_with(
    hostport: &str,
    resolve: impl FnOnce(&str) -> io::Result<Vec<SocketAddr>> + Send + 'static,
) -> Lookup {
    let (tx, rx) = oneshot::channel();
    if let Ok(addr) = hostport.parse::<SocketAddr>() {
        let _ = tx.send(Ok(vec![addr]));
        return Lookup(rx);
    }
    let name = hostport.to_owned();
    // If the thread cannot start, the sender is dropped with it: the lookup then fails.
    let _ = std::thread::Builder::new()
        .name("qmp-lookup".into())
        .spawn(move || {
            let _ = tx.send(resolve(&name));
        });
    Lookup(rx)
}

/// A name lookup under way: resolves to the addresses found (possibly none). See [`lookup`].
#[must_use = "a lookup does nothing for the caller unless awaited"]
pub struct Lookup(oneshot::Receiver<io::Result<Vec<SocketAddr>>>);

impl Future for Lookup {
    type Output = io::Result<Vec<SocketAddr>>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        Pin::new(&mut self.0).poll(cx).map(|answer| {
            answer.unwrap_or_else(|oneshot::Canceled| {
                Err(io::Error::other(
                    "no thread could be started for the name lookup",
                ))
            })
        })
    }
}

/// The error for a TCP `hostport` that resolves to no address at all (`InvalidInput`, as tokio
/// reports it). For adapters that resolve names themselves.
pub fn no_address(hostport: &str) -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidInput,
        format!("no address for {hostport}"),
    )
}

/// How many file descriptors one command can carry: what one `SCM_RIGHTS` message holds on Linux
/// (`SCM_MAX_FD`).
pub const MAX_FDS: usize = 253;

/// Sends `data` on a unix socket with `fds` attached to its first byte (`SCM_RIGHTS`), in one
/// non-blocking `sendmsg`. For adapters' [`Transport::poll_write`](crate::Transport::poll_write).
pub fn send_with_fds(socket: impl AsFd, data: &[u8], fds: &[OwnedFd]) -> io::Result<usize> {
    let fds: Vec<BorrowedFd<'_>> = fds.iter().map(AsFd::as_fd).collect();
    let mut space = vec![MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(fds.len()))];
    let mut control = SendAncillaryBuffer::new(&mut space);
    if !control.push(SendAncillaryMessage::ScmRights(&fds)) {
        return Err(io::Error::other(
            "too many file descriptors for one message",
        ));
    }
    let iov = [IoSlice::new(data)];
    Ok(rustix::net::sendmsg(
        socket,
        &iov,
        &mut control,
        SendFlags::NOSIGNAL,
    )?)
}

/// The path of a unix socket this process bound, removed again when dropped: what the adapters'
/// `Listener`s hold, so a socket file never outlives its listener.
#[derive(Debug)]
pub struct SocketFile {
    path: PathBuf,
    /// The file bound there (device, inode): only that one is removed. Whatever replaced it
    /// meanwhile (a new listener bound after the stale path was cleared) is left alone.
    id: Option<(u64, u64)>,
}

impl SocketFile {
    /// Takes charge of `path`, which the caller has just bound.
    pub fn new(path: PathBuf) -> Self {
        let id = file_id(&path);
        Self { path, id }
    }

    /// The socket's path.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

/// The device and inode of the socket at `path`, if a socket is there.
fn file_id(path: &Path) -> Option<(u64, u64)> {
    use std::os::unix::fs::{FileTypeExt, MetadataExt};
    let meta = std::fs::symlink_metadata(path).ok()?;
    meta.file_type()
        .is_socket()
        .then(|| (meta.dev(), meta.ino()))
}

impl Drop for SocketFile {
    fn drop(&mut self) {
        if self.id.is_some() && file_id(&self.path) == self.id {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

/// Where a QMP server listens (or where we listen for QEMU to connect).
///
/// From a string: `unix:PATH` and `tcp:HOST:PORT` say it outright; otherwise anything with a
/// `/`, or without a `:PORT` at the end, is a unix socket path, and `HOST:PORT` is TCP.
///
/// ```
/// use qmp_client::Address;
/// assert!(matches!(Address::from("/run/qemu/vm1.qmp"), Address::Unix(_)));
/// assert!(matches!(Address::from("vm1.qmp"), Address::Unix(_)));
/// assert!(matches!(Address::from("localhost:4444"), Address::Tcp(_)));
/// assert!(matches!(Address::from("[::1]:4444"), Address::Tcp(_)));
/// assert!(matches!(Address::from("unix:odd:name"), Address::Unix(_)));
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Address {
    /// A unix socket path.
    Unix(PathBuf),
    /// A TCP `host:port`.
    Tcp(String),
}

impl From<&str> for Address {
    fn from(s: &str) -> Self {
        if let Some(path) = s.strip_prefix("unix:") {
            return Self::Unix(path.into());
        }
        if let Some(hostport) = s.strip_prefix("tcp:") {
            return Self::Tcp(hostport.into());
        }
        let tcp = !s.contains('/')
            && s.rsplit_once(':')
                .is_some_and(|(host, port)| !host.is_empty() && port.parse::<u16>().is_ok());
        if tcp {
            Self::Tcp(s.into())
        } else {
            Self::Unix(s.into())
        }
    }
}

impl From<String> for Address {
    fn from(s: String) -> Self {
        Self::from(s.as_str())
    }
}

impl From<&Path> for Address {
    fn from(p: &Path) -> Self {
        Self::Unix(p.into())
    }
}

impl From<PathBuf> for Address {
    fn from(p: PathBuf) -> Self {
        Self::Unix(p)
    }
}

impl From<&PathBuf> for Address {
    fn from(p: &PathBuf) -> Self {
        Self::Unix(p.clone())
    }
}

impl From<SocketAddr> for Address {
    fn from(a: SocketAddr) -> Self {
        Self::Tcp(a.to_string())
    }
}

impl Address {
    /// `e`, from connecting to this address, with the address in its message ("cannot connect to
    /// unix:/run/vm1.qmp: No such file or directory"). Its kind is kept and `e` is its source, so
    /// `ErrorKind::NotFound` and the like still match. For adapters.
    ///
    /// The system says "Connection refused" alike for a unix socket path that is a regular file,
    /// a directory, or a socket nobody listens on (QEMU gone, its socket file left behind); the
    /// message then says which ("cannot connect to unix:/tmp/vm1: /tmp/vm1 is not a socket: it
    /// is a regular file"), and `e` stays its source.
    pub fn connect_error(&self, e: io::Error) -> io::Error {
        let refused = match self {
            Self::Unix(path) if e.kind() == io::ErrorKind::ConnectionRefused => {
                Refused::at(path).map(|what| (path, what))
            }
            _ => None,
        };
        match refused {
            Some((path, what)) => io::Error::new(
                e.kind(),
                RefusedError {
                    address: self.to_string(),
                    path: path.display().to_string(),
                    what,
                    source: e,
                },
            ),
            None => self.context("connect to", e),
        }
    }

    /// `e`, from binding a listener to this address, with the address in its message ("cannot
    /// listen on tcp:127.0.0.1:4444: Address already in use"), as [`connect_error`](Self::connect_error)
    /// does. For adapters.
    pub fn bind_error(&self, e: io::Error) -> io::Error {
        self.context("listen on", e)
    }

    /// The error for an address of a kind the adapter cannot use (`Address` is non-exhaustive:
    /// a kind added later is unknown to an adapter built before). For adapters.
    pub fn unsupported(&self) -> io::Error {
        io::Error::new(io::ErrorKind::Unsupported, self.to_string())
    }

    fn context(&self, action: &'static str, e: io::Error) -> io::Error {
        io::Error::new(
            e.kind(),
            AddressError {
                action,
                address: self.to_string(),
                source: e,
            },
        )
    }
}

#[derive(Debug, thiserror::Error)]
#[error("cannot {action} {address}: {source}")]
struct AddressError {
    action: &'static str,
    address: String,
    source: io::Error,
}

/// What is at a unix socket path that refused a connection.
#[derive(Debug, Clone, Copy)]
enum Refused {
    /// A socket: it was bound, and nothing listens on it any more.
    Stale,
    /// Not a socket at all: a regular file, a directory, ...
    NotASocket(&'static str),
}

impl Refused {
    /// Looks at `path` (following links, as connecting does); `None` if it cannot be looked at
    /// (gone meanwhile, say): the system's error then says it all.
    fn at(path: &Path) -> Option<Self> {
        use std::os::unix::fs::FileTypeExt;
        let kind = std::fs::metadata(path).ok()?.file_type();
        Some(if kind.is_socket() {
            Self::Stale
        } else if kind.is_file() {
            Self::NotASocket("a regular file")
        } else if kind.is_dir() {
            Self::NotASocket("a directory")
        } else if kind.is_fifo() {
            Self::NotASocket("a named pipe (FIFO)")
        } else if kind.is_char_device() || kind.is_block_device() {
            Self::NotASocket("a device")
        } else {
            Self::NotASocket("something else")
        })
    }
}

/// A connection to a unix socket path refused, and why (see [`Address::connect_error`]).
#[derive(Debug, thiserror::Error)]
#[error("cannot connect to {address}: {}", describe(*what, path))]
struct RefusedError {
    address: String,
    path: String,
    what: Refused,
    source: io::Error,
}

fn describe(what: Refused, path: &str) -> String {
    match what {
        Refused::Stale => format!(
            "nothing is listening on {path} (a stale socket file): is QEMU running, with its \
             monitor on this path?"
        ),
        Refused::NotASocket(kind) => format!(
            "{path} is not a socket: it is {kind}; give the path of the socket QEMU listens on \
             (its -chardev socket,path=...)"
        ),
    }
}

impl fmt::Display for Address {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Unix(p) => write!(f, "unix:{}", p.display()),
            Self::Tcp(a) => write!(f, "tcp:{a}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::task::{Wake, Waker};
    use std::time::Duration;

    use super::*;

    struct Unpark(std::thread::Thread);

    impl Wake for Unpark {
        fn wake(self: Arc<Self>) {
            self.0.unpark();
        }
    }

    fn block_on<F: Future>(future: F) -> F::Output {
        let waker = Waker::from(Arc::new(Unpark(std::thread::current())));
        let mut future = std::pin::pin!(future);
        loop {
            if let Poll::Ready(v) = future.as_mut().poll(&mut Context::from_waker(&waker)) {
                return v;
            }
            std::thread::park();
        }
    }

    #[test]
    fn literal_addresses_need_no_lookup() {
        let waker = Waker::noop();
        for (hostport, want) in [("127.0.0.1:4444", "127.0.0.1:4444"), ("[::1]:5", "[::1]:5")] {
            let mut lookup = lookup(hostport);
            let Poll::Ready(Ok(found)) =
                Pin::new(&mut lookup).poll(&mut Context::from_waker(waker))
            else {
                panic!("{hostport} was not ready at once");
            };
            assert_eq!(found, [want.parse::<SocketAddr>().unwrap()]);
        }
    }

    #[test]
    fn names_are_looked_up_off_the_callers_thread() {
        // A resolver that hangs does not block the poll: it is still running when the first poll
        // returns, and its answer arrives later.
        let (release, hold) = std::sync::mpsc::channel::<()>();
        let mut slow = lookup_with("qemu-host:4444", move |name| {
            let _ = hold.recv_timeout(Duration::from_secs(10));
            assert_eq!(name, "qemu-host:4444");
            Ok(vec!["10.0.0.7:4444".parse().unwrap()])
        });
        let waker = Waker::noop();
        assert!(
            Pin::new(&mut slow)
                .poll(&mut Context::from_waker(waker))
                .is_pending()
        );
        release.send(()).unwrap();
        assert_eq!(
            block_on(slow).unwrap(),
            ["10.0.0.7:4444".parse::<SocketAddr>().unwrap()]
        );

        let found = block_on(lookup("localhost:4444")).expect("localhost resolves");
        assert!(
            !found.is_empty() && found.iter().all(|a| a.port() == 4444),
            "{found:?}"
        );
        let failed = block_on(lookup_with("nowhere:1", |_| {
            Err(io::ErrorKind::NotFound.into())
        }));
        assert_eq!(failed.unwrap_err().kind(), io::ErrorKind::NotFound);
    }
}
