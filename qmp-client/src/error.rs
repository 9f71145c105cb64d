//! The one error type of the client.

use std::io;
use std::sync::Arc;

use qmp_proto::{ArgumentsError, CloseReason, CommandError, ProtocolError, QmpError, SendError};

/// Everything a client call can fail with. Match on the variant; the message says what to do.
///
/// ```
/// # use qmp_client::Error;
/// fn describe(e: &Error) -> &'static str {
///     match e {
///         Error::Qmp(q) if q.class == "DeviceNotFound" => "no such device",
///         Error::Qmp(_) => "QEMU refused the command",
///         Error::Timeout => "no answer in time",
///         Error::Disconnected(_) => "the connection is gone",
///         _ => "something else",
///     }
/// }
/// ```
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// QEMU refused the command: `class` says why (an open set), `desc` is for humans. Also
    /// QEMU's id-less error about input it could not parse (`GenericError`, "JSON parse
    /// error, ..."), as soon as it arrives, for the oldest command in flight: the one whose
    /// bytes it is about (the rest of such a cascade of errors fails nothing).
    #[error("QMP error: {0}")]
    Qmp(QmpError),
    /// No response within the timeout (or the connect deadline). A command that was written
    /// stays on the wire; its late response is discarded.
    #[error("timed out")]
    Timeout,
    /// Connecting: nothing at all arrived within the connect timeout, or the server did not even
    /// take the connection (its queue of pending ones was full). A QEMU monitor serves one
    /// client at a time and greets (or accepts) the next only when the current one leaves, so
    /// another client is probably connected to it. Or the socket is a guest agent's, which
    /// never greets (connect to it as a guest agent instead). A peer that sends something
    /// other than a greeting fails at once with [`Protocol`](Self::Protocol) instead.
    #[error(
        "no QMP greeting within the connect timeout: a QEMU monitor serves one client at a time \
         (is another client connected to it?), and a guest agent never greets"
    )]
    NoGreeting,
    /// The connection is closed, or closed before the response arrived; the [`Disconnect`] says
    /// why (QEMU gone is [`Disconnect::PeerClosed`]).
    #[error("disconnected: {0}")]
    Disconnected(Disconnect),
    /// Connecting: the peer is not what was asked for, said as soon as its first bytes show it,
    /// with an excerpt of them ([`ProtocolError::BadGreeting`]: anything but a QMP greeting
    /// first, such as an SSH banner or an HMP prompt; [`ProtocolError::QmpGreeting`]: a guest
    /// agent connect reached a QMP monitor), or the handshake failed
    /// ([`ProtocolError::NegotiationRejected`], [`ProtocolError::EofDuringHandshake`]).
    #[error("protocol error: {0}")]
    Protocol(ProtocolError),
    /// Connecting, accepting or binding failed.
    #[error("I/O error: {0}")]
    Io(#[from] io::Error),
    /// The command was refused before it was sent (too many pending, OOB not enabled, too large).
    #[error(transparent)]
    Send(#[from] SendError),
    /// The arguments could not be turned into a QMP command.
    #[error(transparent)]
    Arguments(#[from] ArgumentsError),
    /// The return value did not deserialize into the requested type.
    #[error("the return value did not deserialize into the requested type: {0}")]
    Decode(#[source] serde_json::Error),
    /// The request failed in another way the core reports: its reply passed `max_message_size`
    /// or `max_depth` ([`CommandError::ResponseTooLarge`], [`CommandError::ResponseTooDeep`],
    /// reported where the limit is passed, not when the reply ends), it was not a reply
    /// ([`CommandError::NotAReply`]: the command's id without `return` or `error`), or it asked
    /// for OOB on a connection that did not negotiate it.
    #[error(transparent)]
    Command(CommandError),
    /// File descriptors can only travel over a unix socket (`SCM_RIGHTS`); this connection is not
    /// one.
    #[error("file descriptors can only be passed over a unix socket")]
    FdPassingUnsupported,
    /// More file descriptors than one message can carry ([`MAX_FDS`](crate::MAX_FDS), the
    /// kernel's limit) were given to one command; it was not sent.
    #[error("at most {limit} file descriptors travel with one command, {given} were given")]
    TooManyFds {
        /// How many were given.
        given: usize,
        /// The limit.
        limit: usize,
    },
    /// A subscriber fell behind and missed events (see [`Lagged`](crate::Lagged)).
    #[error("missed {missed} events: the subscriber fell behind")]
    Lagged {
        /// How many events were missed.
        missed: u64,
    },
}

/// Why a connection ended.
///
/// ```
/// # use qmp_client::Disconnect;
/// fn describe(d: &Disconnect) -> &'static str {
///     match d {
///         Disconnect::PeerClosed { .. } => "QEMU went away",
///         Disconnect::Local => "we closed it",
///         Disconnect::Protocol(_) => "not QMP",
///         _ => "the socket failed",
///     }
/// }
/// ```
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum Disconnect {
    /// The server went away: QEMU exited (`quit`, a guest shutdown), crashed or was killed, or
    /// the socket was closed on its side. However the system reported it, this is the one
    /// variant: end of stream (`source` is `None`), or an error that only a peer gone can cause,
    /// kept as `source`: `ConnectionReset` (it died with our commands unread), `BrokenPipe` (a
    /// write hit the dead socket) or `ConnectionAborted`. Reconnect once QEMU is back, if it is
    /// coming back.
    #[error("the server closed the connection (QEMU exited or was killed)")]
    #[non_exhaustive]
    PeerClosed {
        /// The system's error, when the end showed as one rather than as end of stream (shared:
        /// a `Disconnect` is `Clone`; the error chain holds this `Arc<io::Error>`).
        #[source]
        source: Option<Arc<io::Error>>,
    },
    /// This side closed it: [`Client::disconnect`](crate::Client::disconnect), or the last handle
    /// was dropped.
    #[error("the connection was closed locally")]
    Local,
    /// The server broke the protocol: it is not a QMP server, or not the kind connected to (a
    /// guest agent's socket given to a QMP client, or the other way round), or it sent a value
    /// nested deeper than any QEMU does ([`ProtocolError::TooDeepToSkip`]).
    #[error(transparent)]
    Protocol(ProtocolError),
    /// Reading or writing the socket failed in a way that does not mean the peer went away
    /// (those are [`PeerClosed`](Self::PeerClosed)): the system's error says what happened.
    /// Also the error when the connection's task ended without closing it (its runtime shut
    /// down).
    #[error("I/O error: {0}")]
    Io(Arc<io::Error>),
}

impl Disconnect {
    /// The reason for a connection that failed with `e`: [`PeerClosed`](Self::PeerClosed) for
    /// the errors that mean the peer is gone, [`Io`](Self::Io) for the rest.
    pub(crate) fn from_io(e: Arc<io::Error>) -> Self {
        use io::ErrorKind::{BrokenPipe, ConnectionAborted, ConnectionReset};
        if matches!(e.kind(), ConnectionReset | BrokenPipe | ConnectionAborted) {
            Self::PeerClosed { source: Some(e) }
        } else {
            Self::Io(e)
        }
    }
}

impl From<CloseReason> for Disconnect {
    fn from(reason: CloseReason) -> Self {
        match reason {
            CloseReason::Protocol(p) => Self::Protocol(p),
            CloseReason::Local => Self::Local,
            // `CloseReason` is non-exhaustive; anything new is the peer's doing.
            _ => Self::PeerClosed { source: None },
        }
    }
}

impl Error {
    pub(crate) fn from_command(e: CommandError, closed: impl FnOnce() -> Disconnect) -> Self {
        match e {
            CommandError::Qmp(q) => Self::Qmp(q),
            CommandError::TimedOut => Self::Timeout,
            CommandError::Closed => Self::Disconnected(closed()),
            other => Self::Command(other),
        }
    }

    /// Whether this is a QMP error of class `class`.
    pub fn is_qmp_class(&self, class: &str) -> bool {
        matches!(self, Self::Qmp(q) if q.class == class)
    }
}
