//! Everything that can go wrong, by who caused it.
//!
//! * The caller misused the API or hit a limit: [`SendError`], [`ArgumentsError`], returned at once.
//! * The server refused a command: [`CommandError::Qmp`], an ordinary response.
//! * A request could not complete: the other [`CommandError`] variants, as its response.
//! * The server sent something unusable but the connection carries on: [`Malformed`].
//! * The session ended: [`CloseReason`], sticky, with [`ProtocolError`] when the peer broke it.

use std::fmt;

use crate::message::QmpError;

/// Why [`Connection::send`](crate::Connection::send) refused a command. Nothing was queued.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum SendError {
    /// The connection is closed; see [`Connection::close_reason`](crate::Connection::close_reason).
    #[error("the connection is closed")]
    Closed,
    /// `max_pending` requests are already queued or unanswered. Wait for some to complete, or
    /// raise [`ConfigBuilder::max_pending`](crate::ConfigBuilder::max_pending).
    #[error("too many pending requests (limit {limit}); wait for responses before sending more")]
    TooManyPending {
        /// The configured limit.
        limit: usize,
    },
    /// An out-of-band command on a connection where OOB was not negotiated (the server did not
    /// offer it, or the configuration did not ask for it).
    #[error("out-of-band execution is not enabled on this connection")]
    OobNotEnabled,
    /// The serialized command is larger than `max_command_size` (QEMU's own limit is 64 MiB; it
    /// would answer a larger one with a cascade of id-less errors).
    #[error("command of {size} bytes exceeds the limit of {limit} bytes")]
    TooLarge {
        /// Size of the serialized command.
        size: usize,
        /// The configured limit.
        limit: usize,
    },
    /// All 2^64 request ids were used. Not reachable in practice; reconnect.
    #[error("request ids exhausted; reconnect")]
    IdsExhausted,
}

/// Why a [`Command`](crate::Command) could not be built.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ArgumentsError {
    /// The arguments failed to serialize.
    #[error("arguments failed to serialize: {0}")]
    Serialize(#[from] serde_json::Error),
    /// The arguments did not serialize to a JSON object, which QMP requires.
    #[error("arguments must serialize to a JSON object")]
    NotAnObject,
    /// A raw command lacked a string `execute` or `exec-oob` member, or had both.
    #[error("a command object needs exactly one string member `execute` or `exec-oob`")]
    NotACommand,
    /// The arguments nest deeper than QEMU accepts (1024 levels for the whole command).
    #[error("arguments nest {depth} levels deep; QEMU accepts at most {limit}")]
    TooDeep {
        /// Depth of the arguments.
        depth: usize,
        /// The most QEMU accepts for arguments.
        limit: usize,
    },
    /// The arguments hold more JSON tokens than QEMU accepts (2 Mi for the whole command).
    #[error("arguments hold {tokens} JSON tokens; QEMU accepts at most {limit}")]
    TooManyTokens {
        /// Tokens in the arguments.
        tokens: usize,
        /// The most QEMU accepts for arguments.
        limit: usize,
    },
}

/// How a request ended without a return value.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum CommandError {
    /// The server refused the command.
    #[error("QMP error: {0}")]
    Qmp(QmpError),
    /// The request's deadline passed before its response arrived. If it had been written, a late
    /// response is discarded.
    #[error("timed out waiting for the response")]
    TimedOut,
    /// The connection closed before the response arrived; see
    /// [`Connection::close_reason`](crate::Connection::close_reason).
    #[error("the connection closed before the response arrived")]
    Closed,
    /// The response was larger than `max_message_size` and was skipped unread (`size`: its size,
    /// or when reported as soon as the limit was passed, before it ended, its size then). Raise
    /// [`ConfigBuilder::max_message_size`](crate::ConfigBuilder::max_message_size) if such
    /// responses are expected.
    #[error("the response of {size} bytes exceeds max_message_size and was skipped")]
    ResponseTooLarge {
        /// Size of the response.
        size: usize,
    },
    /// The response nested deeper than `max_depth` and was skipped unread. Raise
    /// [`ConfigBuilder::max_depth`](crate::ConfigBuilder::max_depth) if such responses are
    /// expected.
    #[error("the response of {size} bytes nests deeper than max_depth and was skipped")]
    ResponseTooDeep {
        /// Size of the response.
        size: usize,
    },
    /// An out-of-band command sent before the handshake, on a connection where OOB did not get
    /// negotiated. It was never written.
    #[error("out-of-band execution was requested but not negotiated")]
    OobUnavailable,
    /// A command sent [`no_reply`](crate::Command::no_reply) got no response: the peer closed
    /// the connection (`closed`), or stayed silent until the command's deadline. For the guest
    /// agent's `guest-shutdown` and `guest-suspend-*` this is what success looks like.
    #[error("no response (expected for this command on success): {}", if *.closed { "the peer closed the connection" } else { "nothing arrived by the deadline" })]
    NoReply {
        /// The peer closed the connection (the guest went down), rather than staying silent.
        closed: bool,
    },
    /// The peer broke the protocol in its reply: a message carrying this request's id has neither
    /// `return` nor `error` (the excerpt shows what arrived). The connection carries on; the
    /// command may or may not have run.
    #[error("protocol error: the reply has neither `return` nor `error`: `{0}`")]
    NotAReply(Excerpt),
    /// [`Connection::resync`](crate::Connection::resync) started a guest-agent resync while
    /// this request was in flight: its response can no longer be told apart from stale ones, so
    /// it is given up. The command may or may not have run.
    #[error("given up by a resync of the guest agent connection; it may or may not have run")]
    Resynced,
}

/// Why the session ended. Sticky: see [`Connection::close_reason`](crate::Connection::close_reason).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum CloseReason {
    /// The server closed the stream between messages.
    #[error("the server closed the connection")]
    PeerClosed,
    /// [`Connection::close`](crate::Connection::close) was called.
    #[error("the connection was closed locally")]
    Local,
    /// The server broke the protocol.
    #[error("protocol error: {0}")]
    Protocol(#[from] ProtocolError),
}

/// How the server broke the session.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ProtocolError {
    /// The first bytes were not a QMP greeting (the excerpt shows what arrived): junk such as an
    /// SSH banner or an HMP prompt, a JSON value that is not an object, or an object without a
    /// `QMP` member. Reported as soon as they arrive. Is this a QMP monitor socket (and not, say,
    /// a guest agent, an HMP monitor or another service)?
    #[error(
        "expected a QMP greeting, got `{0}`: is this a QEMU monitor (QMP) socket? (a guest \
         agent's never greets: connect to it as a guest agent)"
    )]
    BadGreeting(Excerpt),
    /// Guest-agent mode: the peer sent a QMP greeting (the excerpt), so it is a QEMU monitor, not
    /// a guest agent. Connect to it as a QMP monitor instead.
    #[error(
        "got a QMP greeting (`{0}`): this is a QEMU monitor, not a guest agent; connect to it as \
         a QMP monitor"
    )]
    QmpGreeting(Excerpt),
    /// The server refused `qmp_capabilities`.
    #[error("capabilities negotiation was refused: {0}")]
    NegotiationRejected(QmpError),
    /// The stream ended before the handshake finished.
    #[error("the server closed the connection during the handshake")]
    EofDuringHandshake,
    /// The server sent a value nested deeper than
    /// [`SKIP_DEPTH_LIMIT`](crate::framing::SKIP_DEPTH_LIMIT) levels, which no QEMU does (its own
    /// parser gives up there): the stream cannot be followed past it. Is this a QMP peer?
    #[error(
        "the server sent a value nested deeper than {limit} levels after {size} bytes, as no QEMU \
         does; closed rather than guess where its messages resume",
        limit = crate::framing::SKIP_DEPTH_LIMIT
    )]
    TooDeepToSkip {
        /// Bytes of the value when it passed that depth.
        size: usize,
    },
    /// The stream ended in the middle of a message.
    #[error("the server closed the connection in the middle of a message ({buffered} bytes)")]
    UnexpectedEof {
        /// Bytes of the unfinished message.
        buffered: usize,
    },
}

/// Something the server sent that was skipped. The connection carries on.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{kind}")]
#[non_exhaustive]
pub struct Malformed {
    /// What was wrong.
    pub kind: MalformedKind,
    /// The start of the offending bytes (empty for values skipped without buffering).
    pub excerpt: Excerpt,
}

/// What was wrong with a [`Malformed`] message.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum MalformedKind {
    /// The message is not valid JSON.
    #[error("invalid JSON: {reason}")]
    InvalidJson {
        /// The parser's message (a position, never message content).
        reason: String,
    },
    /// The message is not valid UTF-8.
    #[error("invalid UTF-8")]
    InvalidUtf8,
    /// A top-level value that is not an object.
    #[error("a top-level value that is not an object ({size} bytes)")]
    NotAnObject {
        /// Size of the value.
        size: usize,
    },
    /// An object with none of `return`, `error`, `event` or `QMP`, or with one of the wrong type.
    #[error("an object that is not a QMP message")]
    Unclassifiable,
    /// A message larger than `max_message_size`.
    #[error("a message of {size} bytes exceeds the size limit")]
    TooLarge {
        /// Size of the message.
        size: usize,
    },
    /// A message nested deeper than `max_depth`.
    #[error("a message of {size} bytes exceeds the nesting limit")]
    TooDeep {
        /// Size of the message.
        size: usize,
    },
    /// Bytes between messages that cannot start one.
    #[error("{len} unexpected bytes between messages")]
    UnexpectedBytes {
        /// Length of the run.
        len: usize,
    },
    /// A second greeting.
    #[error("an unexpected greeting")]
    UnexpectedGreeting,
}

/// The first bytes of a message, for diagnostics.
///
/// QMP traffic can carry passwords and keys, so `Debug` shows only the length; read the text with
/// [`as_str`](Self::as_str) or `Display` when you mean to log it.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct Excerpt(String);

impl Excerpt {
    /// At most this many bytes of the message are kept.
    pub const MAX: usize = 80;

    pub(crate) fn new(bytes: &[u8]) -> Self {
        let head = &bytes[..bytes.len().min(Self::MAX)];
        let mut s = String::from_utf8_lossy(head).into_owned();
        // Replacement characters take 3 bytes and a cut may split a character: trim to the
        // limit on a character boundary, dropping a trailing partial character.
        let mut end = s.len().min(Self::MAX);
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        s.truncate(end);
        if head.len() < bytes.len() && s.ends_with('\u{FFFD}') {
            s.pop();
        }
        Self(s)
    }

    /// The excerpt (invalid UTF-8 replaced by U+FFFD).
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Excerpt {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "<{} bytes redacted>", self.0.len())
    }
}

impl fmt::Display for Excerpt {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}
