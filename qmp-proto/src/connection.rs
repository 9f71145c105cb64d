//! The state machine of one QMP connection.

use std::collections::{BTreeSet, VecDeque};
use std::fmt;
use std::time::Instant;

use crate::agent::{Agent, NO_SUCCESS_RESPONSE, SENTINEL};
use crate::command::{Command, RequestId, end_with_id, id_tail_len};
use crate::config::Config;
use crate::error::{
    CloseReason, CommandError, Excerpt, Malformed, MalformedKind, ProtocolError, SendError,
};
use crate::framing::{FrameError, JsonSplitter};
use crate::message::{Event, Greeting, QmpError, RawJson, Timestamp, Unmatched};
use crate::pending::Pending;
use crate::transmit::{Transmit, TransmitBuf};
use crate::wire::{self, Members};

/// The `id` the handshake's `qmp_capabilities` carries. Requests count from the next one, and the
/// id a request carries on the wire is its [`RequestId`]: unique for the life of the connection.
const NEGOTIATION_ID: u64 = 0;

/// Where a connection is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum State {
    /// Waiting for the server's greeting. Commands sent now are queued.
    AwaitingGreeting,
    /// `qmp_capabilities` sent, waiting for its response. Commands sent now are queued.
    Negotiating,
    /// Guest agent only: a resync (`0xFF`, then `guest-sync-delimited`) is under way; what
    /// arrives until its reply is discarded. Commands sent now are queued.
    Syncing,
    /// Commands flow.
    Ready,
    /// Terminal; see [`Connection::close_reason`].
    Closed,
}

/// Something that happened on the connection, from [`Connection::poll_output`], in the order the
/// bytes that caused it arrived.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Output {
    /// The server's greeting arrived.
    Greeting(Greeting),
    /// The handshake finished; queued commands are being written. `oob` says whether out-of-band
    /// execution was negotiated. On a guest-agent connection: a resync finished (the first one
    /// is the handshake).
    Ready {
        /// Whether OOB is enabled.
        oob: bool,
    },
    /// The outcome of a request. Exactly one per id returned by
    /// [`send`](Connection::send) (or an [`Output::Value`] instead), unless it was
    /// [`cancel`](Connection::cancel)led.
    Response {
        /// The request.
        id: RequestId,
        /// The return value, or why there is none.
        result: Result<RawJson, CommandError>,
    },
    /// The successful outcome of a request sent with
    /// [`Command::decode_value`](crate::Command::decode_value): its return value, parsed from
    /// the input buffer. Its errors, and a return value `Value` cannot hold, still come as
    /// [`Output::Response`].
    Value {
        /// The request.
        id: RequestId,
        /// The return value.
        value: serde_json::Value,
    },
    /// An asynchronous event.
    Event(Event),
    /// A response that matches no request (see [`Unmatched`]). The connection carries on.
    Unmatched(Unmatched),
    /// Something the server sent was skipped. The connection carries on.
    Malformed(Malformed),
    /// The session ended. Always the last output, and only once; every pending request has been
    /// completed before it.
    Closed(CloseReason),
}

/// Counters for diagnostics.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct Stats {
    /// Bytes passed to [`Connection::handle_input`] while open.
    pub bytes_received: u64,
    /// Bytes acknowledged through [`Connection::advance_transmit`].
    pub bytes_sent: u64,
    /// Complete messages received.
    pub messages: u64,
    /// Events delivered.
    pub events: u64,
    /// Malformed messages and junk runs skipped.
    pub malformed: u64,
    /// Responses that matched no request.
    pub unmatched: u64,
    /// Requests that timed out.
    pub timed_out: u64,
    /// Late responses to timed-out or cancelled requests, dropped.
    pub late: u64,
    /// Bytes passed to [`Connection::handle_input`] after the connection closed, ignored.
    pub ignored_after_close: u64,
    /// Guest agent: resyncs completed.
    pub syncs: u64,
    /// Guest agent: messages and junk discarded while a resync was under way.
    pub discarded: u64,
}

/// One QMP connection, without any IO: bytes in, outputs out, bytes to send in a buffer you drain.
///
/// # Driving it
///
/// 1. Make one input or change: [`handle_input`](Self::handle_input),
///    [`handle_eof`](Self::handle_eof), [`handle_timeout`](Self::handle_timeout),
///    [`send`](Self::send), [`cancel`](Self::cancel) or [`close`](Self::close).
/// 2. Drain [`poll_output`](Self::poll_output) until `None`.
/// 3. Write [`poll_transmit`](Self::poll_transmit) to the transport and acknowledge what was written
///    with [`advance_transmit`](Self::advance_transmit), until `None` or the transport would block.
/// 4. Wait until the transport is readable (only if [`wants_read`](Self::wants_read)), writable (if
///    [`wants_write`](Self::wants_write)), a command arrives from your application, or the time
///    [`poll_timeout`](Self::poll_timeout) says, then go to 1.
///
/// Outputs come before transmits because draining them can resume paused processing, which may
/// queue bytes to send.
///
/// ```
/// use qmp_proto::{Command, Connection, Output};
///
/// let mut conn = Connection::default();
/// let id = conn.send(Command::new("query-status"))?; // queued until the handshake is done
///
/// conn.handle_input(br#"{"QMP": {"version": {"qemu": {"micro": 2, "minor": 0, "major": 10},
///     "package": ""}, "capabilities": ["oob"]}}"#);
/// assert!(matches!(conn.poll_output(), Some(Output::Greeting(g)) if g.version.major == 10));
/// let sent = conn.poll_transmit().unwrap().data.to_vec();
/// assert_eq!(sent, b"{\"execute\":\"qmp_capabilities\",\"id\":0}\n");
/// conn.advance_transmit(sent.len());
///
/// conn.handle_input(b"{\"return\": {}, \"id\": 0}\r\n");
/// assert_eq!(conn.poll_output(), Some(Output::Ready { oob: false })); // OOB is opt-in
/// assert_eq!(conn.poll_transmit().unwrap().data, b"{\"execute\":\"query-status\",\"id\":1}\n");
///
/// conn.handle_input(b"{\"return\": {\"status\": \"running\"}, \"id\": 1}\r\n");
/// let Some(Output::Response { id: got, result: Ok(status) }) = conn.poll_output() else { panic!() };
/// assert_eq!((got, status.get()), (id, r#"{"status": "running"}"#));
/// # Ok::<(), qmp_proto::SendError>(())
/// ```
pub struct Connection {
    splitter: JsonSplitter,
    session: Session,
}

/// Everything but the splitter, so a frame borrowed from the splitter can be handed to it.
struct Session {
    config: Config,
    state: State,
    greeting: Option<Greeting>,
    oob: bool,
    next_id: u64,
    pending: Pending<Entry>,
    /// Queued requests in submission order: all of them before `Ready`, then in-band ones
    /// waiting for a window slot.
    queue: VecDeque<u64>,
    deadlines: BTreeSet<(Instant, u64)>,
    /// In-band requests written and unanswered (abandoned ones included: they hold QEMU's queue).
    in_band_in_flight: usize,
    /// Entries of `pending` that are abandoned.
    abandoned: usize,
    /// An id-less error failed a request since the last in-band reply with an id: further
    /// id-less errors belong to the same cascade (see [`Session::idless_error`]).
    cascade: bool,
    transmit: TransmitBuf,
    outputs: VecDeque<Output>,
    /// Processing stopped because `outputs` was full.
    paused: bool,
    eof: bool,
    /// Size of the message cut off by EOF, if any.
    truncated: Option<usize>,
    close_reason: Option<CloseReason>,
    stats: Stats,
    /// Set on a guest-agent connection.
    agent: Option<Agent>,
}

struct Entry {
    oob: bool,
    /// Sent [`Command::no_reply`]: silence until the deadline, or EOF, is its success.
    no_reply: bool,
    deadline: Option<Instant>,
    /// A user-sent `qmp_capabilities` asking for OOB.
    enables_oob: bool,
    /// Sent [`Command::decode_value`].
    value: bool,
    stage: Stage,
}

impl Entry {
    /// Whether it is written (or in the transmit buffer): queued no longer.
    fn written(&self) -> bool {
        !matches!(self.stage, Stage::Queued { .. })
    }
}

/// What [`Session::abandon`] gave up.
enum Abandoned {
    /// A request never written: nothing of it reaches the peer.
    Unwritten,
    /// A written request, whose reply may still arrive.
    Written { no_reply: bool },
}

enum Stage {
    /// Not written yet; its wire bytes wait here.
    Queued { bytes: Vec<u8>, fds: bool },
    /// Written (or in the transmit buffer); a response is awaited.
    InFlight,
    /// Cancelled or timed out after being written: the response will be dropped.
    Abandoned,
}

impl Default for Connection {
    fn default() -> Self {
        Self::new(Config::default())
    }
}

impl fmt::Debug for Connection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let s = &self.session;
        f.debug_struct("Connection")
            .field("state", &s.state)
            .field("oob", &s.oob)
            .field("pending", &s.pending.len())
            .field("queued", &s.queue.len())
            .field("outputs", &s.outputs.len())
            .field("to_send", &s.transmit.pending())
            .field("buffered", &self.splitter.buffered())
            .field("close_reason", &s.close_reason)
            .finish_non_exhaustive()
    }
}

impl Connection {
    /// A connection waiting for the server's greeting.
    pub fn new(config: Config) -> Self {
        Self {
            splitter: JsonSplitter::new(config.max_message_size, config.max_depth),
            session: Session {
                config,
                state: State::AwaitingGreeting,
                greeting: None,
                oob: false,
                next_id: NEGOTIATION_ID + 1,
                pending: Pending::default(),
                queue: VecDeque::new(),
                deadlines: BTreeSet::new(),
                in_band_in_flight: 0,
                abandoned: 0,
                cascade: false,
                transmit: TransmitBuf::default(),
                outputs: VecDeque::new(),
                paused: false,
                eof: false,
                truncated: None,
                close_reason: None,
                stats: Stats::default(),
                agent: None,
            },
        }
    }

    /// A connection to a guest agent (`qemu-ga`), which speaks QMP's wire format without its
    /// session: no greeting, no negotiation, no events, no OOB, one command at a time.
    ///
    /// The connection starts with a resync — the `0xFF` byte that resets the agent's parser,
    /// then `guest-sync-delimited` with a fresh id — and discards everything until the reply
    /// carrying that id (a late reply left by an earlier client, the agent's complaint about the
    /// `0xFF`), then outputs [`Output::Ready`]. It resyncs the same way whenever a written
    /// command times out or is cancelled, so a late reply can never be taken for the next
    /// command's. Replies are matched by id, or, from agents that do not echo ids, by order.
    ///
    /// `sync_seed` seeds the sync ids: pass a random number, so that a stale sync reply meant for
    /// another client cannot match ours. The `Config`'s OOB and negotiation switches do not apply.
    ///
    /// ```
    /// use qmp_proto::{Command, Config, Connection, Output};
    ///
    /// let mut conn = Connection::new_guest_agent(Config::default(), 0x5eed);
    /// let id = conn.send(Command::new("guest-ping"))?; // queued until the resync is done
    /// let sync = conn.poll_transmit().unwrap().data.to_vec();
    /// assert!(sync.starts_with(b"\xff{\"execute\":\"guest-sync-delimited\""));
    /// conn.advance_transmit(sync.len());
    ///
    /// // The agent complains about the 0xFF, then answers the sync, delimited by 0xFF.
    /// let sync_id = conn.sync_id().unwrap();
    /// conn.handle_input(b"{\"error\": {\"class\": \"GenericError\", \"desc\": \"stray\"}}\n");
    /// conn.handle_input(b"\xff");
    /// conn.handle_input(format!("{{\"return\": {sync_id}}}\n").as_bytes());
    /// assert_eq!(conn.poll_output(), Some(Output::Ready { oob: false }));
    ///
    /// assert_eq!(conn.poll_transmit().unwrap().data, b"{\"execute\":\"guest-ping\",\"id\":1}\n");
    /// conn.handle_input(b"{\"return\": {}}\n"); // an old agent: no id echoed, matched by order
    /// assert!(matches!(conn.poll_output(), Some(Output::Response { id: got, result: Ok(_) }) if got == id));
    /// # Ok::<(), qmp_proto::SendError>(())
    /// ```
    pub fn new_guest_agent(config: Config, sync_seed: u64) -> Self {
        let mut conn = Self::new(config);
        conn.splitter.reset_at(SENTINEL);
        conn.session.agent = Some(Agent::new(sync_seed));
        conn.session.start_sync();
        conn
    }

    // --- Getters -------------------------------------------------------------------------------

    /// Where the connection is in its life.
    pub fn state(&self) -> State {
        self.session.state
    }

    /// The configuration.
    pub fn config(&self) -> &Config {
        &self.session.config
    }

    /// The server's greeting, once it has arrived.
    pub fn greeting(&self) -> Option<&Greeting> {
        self.session.greeting.as_ref()
    }

    /// Guest agent: the id of the resync under way, if one is.
    pub fn sync_id(&self) -> Option<i64> {
        self.session.agent.as_ref().and_then(|a| a.syncing)
    }

    /// Whether this is a guest-agent connection ([`new_guest_agent`](Self::new_guest_agent)).
    pub fn is_guest_agent(&self) -> bool {
        self.session.agent.is_some()
    }

    /// Whether out-of-band execution is negotiated.
    pub fn oob_enabled(&self) -> bool {
        self.session.oob
    }

    /// Requests awaiting an outcome: queued or in flight (not abandoned ones).
    pub fn pending(&self) -> usize {
        self.session.pending.len() - self.session.abandoned
    }

    /// The `id` request `id` carries on the wire, once it is written and until its response
    /// arrives. It is the request's own number: unique for the life of the connection and never
    /// reused, so QEMU's traces, `--verbose` logs, a proxy or a person reading a capture can
    /// correlate a command with its reply by id alone. (The handshake's `qmp_capabilities` is
    /// `0`; requests count from `1`.) A written request keeps listening for its id after a
    /// timeout or cancel, so its late response is recognised and dropped.
    ///
    /// ```
    /// use qmp_proto::{Command, Connection};
    /// let mut conn = Connection::default();
    /// conn.handle_input(br#"{"QMP": {"version": {"qemu": {"micro": 0, "minor": 0, "major": 10},
    ///     "package": ""}, "capabilities": []}}"#);
    /// let n = conn.poll_transmit().unwrap().data.len();
    /// conn.advance_transmit(n);
    /// conn.handle_input(b"{\"return\": {}, \"id\": 0}\r\n");
    ///
    /// let a = conn.send(Command::new("query-status")).unwrap();
    /// assert_eq!(conn.wire_id(a), Some(1));
    /// conn.handle_input(b"{\"return\": {}, \"id\": 1}\r\n");
    /// assert_eq!(conn.wire_id(a), None); // answered
    /// let b = conn.send(Command::new("query-status")).unwrap();
    /// assert!(b != a);
    /// assert_eq!(conn.wire_id(b), Some(2)); // never reused
    /// ```
    pub fn wire_id(&self, id: RequestId) -> Option<u64> {
        self.session
            .pending
            .get(id.0)
            .filter(|e| e.written())
            .map(|_| id.0)
    }

    /// Requests waiting to be written (before the handshake, or for a window slot).
    pub fn queued(&self) -> usize {
        self.session.queue.len()
    }

    /// Requests written and unanswered, abandoned ones included.
    pub fn in_flight(&self) -> usize {
        self.session.pending.len() - self.session.queue.len()
    }

    /// Whether the connection wants more input: false once closed or at EOF, and while
    /// `max_buffered_outputs` outputs wait to be polled.
    pub fn wants_read(&self) -> bool {
        let s = &self.session;
        s.state != State::Closed && !s.eof && !s.paused
    }

    /// Whether request `id`'s file descriptors are still needed: it was sent
    /// [`with_fds`](Command::with_fds) and its first byte has not been written yet (it waits in a
    /// queue or in the transmit buffer). Once this is false an adapter can close its copies, also
    /// for a request that timed out or was cancelled before it was ever written.
    pub fn fds_needed(&self, id: RequestId) -> bool {
        let queued = self
            .session
            .pending
            .get(id.0)
            .is_some_and(|e| matches!(e.stage, Stage::Queued { fds: true, .. }));
        queued || self.session.transmit.has_mark(id)
    }

    /// Whether [`poll_transmit`](Self::poll_transmit) has bytes.
    pub fn wants_write(&self) -> bool {
        self.session.transmit.pending() > 0
    }

    /// Whether the connection is closed.
    pub fn is_closed(&self) -> bool {
        self.session.state == State::Closed
    }

    /// Why the connection closed, once it has. Sticky.
    pub fn close_reason(&self) -> Option<&CloseReason> {
        self.session.close_reason.as_ref()
    }

    /// Counters for diagnostics.
    pub fn stats(&self) -> Stats {
        self.session.stats
    }

    /// Bytes of input held: an unfinished message plus input not yet processed.
    pub fn buffered_input(&self) -> usize {
        self.splitter.buffered()
    }

    // --- Inputs --------------------------------------------------------------------------------

    /// Bytes read from the transport, in any chunking. Processing stops when
    /// `max_buffered_outputs` outputs are waiting and resumes as they are polled; call this only
    /// while [`wants_read`](Self::wants_read) to keep memory bounded. Ignored after close.
    pub fn handle_input(&mut self, bytes: &[u8]) {
        if self.session.state == State::Closed || self.session.eof {
            self.session.stats.ignored_after_close += bytes.len() as u64;
            return;
        }
        self.session.stats.bytes_received += bytes.len() as u64;
        self.splitter.push(bytes);
        self.process();
    }

    /// The transport reached end of stream. Messages already received are still delivered; then
    /// every pending request fails with [`CommandError::Closed`] and [`Output::Closed`] follows.
    pub fn handle_eof(&mut self) {
        if self.session.state == State::Closed || self.session.eof {
            return;
        }
        self.session.eof = true;
        self.splitter.finish();
        self.process();
    }

    /// Fails requests whose deadline is at or before `now` with [`CommandError::TimedOut`]. Early
    /// or repeated calls do nothing.
    pub fn handle_timeout(&mut self, now: Instant) {
        self.session.expire(now);
    }

    // --- Mutators ------------------------------------------------------------------------------

    /// Queues a command and returns its id. It is written as soon as the handshake is done and,
    /// for in-band commands while OOB is on, a window slot is free. Its outcome arrives as one
    /// [`Output::Response`].
    #[must_use = "the id is how the response is recognised"]
    pub fn send(&mut self, cmd: Command) -> Result<RequestId, SendError> {
        self.session.send(cmd)
    }

    /// Gives up on a request; no response will be output for it. A request not yet written is
    /// dropped and never sent. One already written stays on the wire: its response is discarded
    /// when it arrives, and until then it keeps its window slot. Returns false if the request had
    /// already completed.
    pub fn cancel(&mut self, id: RequestId) -> bool {
        self.session.cancel(id.0)
    }

    /// Guest agent: resynchronises now (see [`new_guest_agent`](Self::new_guest_agent)), for
    /// when the caller has reason to distrust the stream. Requests in flight fail with
    /// [`CommandError::Resynced`]; queued ones are written once [`Output::Ready`] says the resync
    /// finished. Returns false, doing nothing, on a QMP connection or once closed.
    pub fn resync(&mut self) -> bool {
        let s = &mut self.session;
        if s.agent.is_none() || s.state == State::Closed {
            return false;
        }
        s.start_sync();
        true
    }

    /// Closes the connection locally: every pending request fails with [`CommandError::Closed`],
    /// then [`Output::Closed`]`(`[`CloseReason::Local`]`)` follows. Unwritten bytes are dropped.
    pub fn close(&mut self) {
        self.session.close(CloseReason::Local);
    }

    // --- Outputs -------------------------------------------------------------------------------

    /// The next output, in arrival order. Draining outputs resumes processing that was paused by
    /// `max_buffered_outputs`.
    #[must_use = "outputs carry responses that complete requests"]
    pub fn poll_output(&mut self) -> Option<Output> {
        let out = self.session.outputs.pop_front();
        if self.session.paused
            && self.session.outputs.len() < self.session.config.max_buffered_outputs
        {
            self.session.paused = false;
            self.process();
        }
        out
    }

    /// Bytes to write, if any. Call [`advance_transmit`](Self::advance_transmit) with how many
    /// were written.
    #[must_use]
    pub fn poll_transmit(&self) -> Option<Transmit<'_>> {
        self.session.transmit.peek()
    }

    /// Acknowledges `n` bytes of the last [`poll_transmit`](Self::poll_transmit) as written (a
    /// partial write is fine; the rest stays queued).
    pub fn advance_transmit(&mut self, n: usize) {
        let n = self.session.transmit.advance(n);
        self.session.stats.bytes_sent += n as u64;
    }

    /// The earliest request deadline: call [`handle_timeout`](Self::handle_timeout) then.
    #[must_use]
    pub fn poll_timeout(&self) -> Option<Instant> {
        self.session.deadlines.first().map(|&(at, _)| at)
    }

    // --- Processing ----------------------------------------------------------------------------

    fn process(&mut self) {
        let s = &mut self.session;
        while s.state != State::Closed {
            if s.state == State::AwaitingGreeting {
                // A greeting is an object: anything else first (an SSH banner, an HMP prompt) is
                // the wrong peer, and waiting for it to end would only wait out the deadline.
                let ahead = self.splitter.ahead();
                if ahead.first().is_some_and(|&b| b != b'{') {
                    let excerpt = Excerpt::new(ahead.trim_ascii_end());
                    return s.close(ProtocolError::BadGreeting(excerpt).into());
                }
            }
            if s.outputs.len() >= s.config.max_buffered_outputs {
                s.paused = true;
                return;
            }
            if let Some((len, frame, spans)) = fast_message(&self.splitter) {
                s.stats.messages += 1;
                let m = spans.members(frame);
                s.on_members(frame.as_bytes(), m);
                self.splitter.take_unscanned(len);
                continue;
            }
            match self.splitter.next_frame() {
                Some(Ok(frame)) => s.on_message(frame),
                Some(Err(e)) => s.on_frame_error(e),
                None => {
                    if s.eof {
                        s.on_eof();
                    }
                    return;
                }
            }
        }
    }
}

/// The next message straight from the splitter's unscanned bytes, found and validated in one pass
/// by the fast scanner: its length with the whitespace before it, its text, and where its members
/// are. `None` leaves it to the splitter and `serde_json` (anything unusual, incomplete, over a
/// limit, or not UTF-8), which then give the same frames they would have anyway.
fn fast_message(splitter: &JsonSplitter) -> Option<(usize, &str, crate::scan::Spans)> {
    let bytes = splitter.unscanned();
    let start = crate::scan::skip_ws(bytes);
    let (max_size, max_depth) = splitter.limits();
    let (len, spans) = crate::scan::object(&bytes[start..], max_depth - 1)?;
    if len > max_size {
        return None;
    }
    let frame = std::str::from_utf8(&bytes[start..start + len]).ok()?;
    #[cfg(feature = "fuzzing")]
    crate::scan::check(frame, &spans.members(frame));
    Some((start + len, frame, spans))
}

impl Session {
    fn output(&mut self, output: Output) {
        self.outputs.push_back(output);
    }

    /// Whether a guest-agent resync is under way (everything received is then discarded).
    fn syncing(&self) -> bool {
        self.agent.as_ref().is_some_and(|a| a.syncing.is_some())
    }

    fn malformed(&mut self, kind: MalformedKind, bytes: &[u8]) {
        if self.state == State::AwaitingGreeting {
            // Whatever it is, it is not the greeting that must come first.
            let excerpt = match bytes {
                [] => Excerpt::new(kind.to_string().as_bytes()),
                _ => Excerpt::new(bytes.trim_ascii_end()),
            };
            return self.close(ProtocolError::BadGreeting(excerpt).into());
        }
        if self.syncing() {
            self.stats.discarded += 1;
            return;
        }
        self.stats.malformed += 1;
        self.output(Output::Malformed(Malformed {
            kind,
            excerpt: Excerpt::new(bytes),
        }));
    }

    fn on_frame_error(&mut self, e: FrameError) {
        let answers = match e {
            FrameError::TooLarge { id, .. } | FrameError::TooDeep { id, .. } => {
                self.answered_by(id.map(Some))
            }
            _ => None,
        };
        let kind = match (e, answers) {
            (FrameError::TooLarge { size, .. }, Some(id)) => {
                return self.finish(id, Err(CommandError::ResponseTooLarge { size }));
            }
            (FrameError::TooDeep { size, .. }, Some(id)) => {
                return self.finish(id, Err(CommandError::ResponseTooDeep { size }));
            }
            (FrameError::UnexpectedBytes { len, ref head }, _)
                if self.agent.is_some()
                    && len == head.len()
                    && head.iter().all(|&b| b == SENTINEL) =>
            {
                // The guest agent's delimiter before a sync reply: expected, not junk.
                return;
            }
            (FrameError::TooLarge { size, .. }, _) => MalformedKind::TooLarge { size },
            (FrameError::TooDeep { size, .. }, _) => MalformedKind::TooDeep { size },
            (FrameError::NotAnObject { size }, _) => MalformedKind::NotAnObject { size },
            (FrameError::UnexpectedBytes { len, head }, _) => {
                return self.malformed(MalformedKind::UnexpectedBytes { len }, &head);
            }
            (FrameError::Truncated { len }, _) => {
                self.truncated = Some(len);
                return;
            }
            (FrameError::OverLimit { too_deep, size, id }, _) => {
                return self.over_limit(too_deep, size, id);
            }
            (FrameError::TooDeepToSkip { size }, _) => {
                if self.state == State::AwaitingGreeting {
                    return self.malformed(MalformedKind::TooDeep { size }, &[]);
                }
                return self.close(ProtocolError::TooDeepToSkip { size }.into());
            }
        };
        self.malformed(kind, &[]);
    }

    /// A message passed a limit and is being skipped, which may take long or never end: the
    /// requests it may be the reply to fail now, not when (or if) it ends. They are abandoned,
    /// so the end of the message, or their real reply if it was not theirs, is dropped as late.
    /// Which they are: the one its id names if the id came before the limit; else on a guest
    /// agent the one command in flight, and on QMP the oldest in-band request in flight
    /// (in-band replies come in order) and every out-of-band one (those may overtake).
    fn over_limit(&mut self, too_deep: bool, size: usize, id: Option<u64>) {
        if self.state == State::AwaitingGreeting {
            let kind = match too_deep {
                true => MalformedKind::TooDeep { size },
                false => MalformedKind::TooLarge { size },
            };
            return self.malformed(kind, &[]);
        }
        let victims: Vec<u64> = match id {
            Some(wire) => self.answered_by(Some(Some(wire))).into_iter().collect(),
            None if self.agent.is_some() => self.answered_by(None).into_iter().collect(),
            None => {
                let mut oldest_in_band = true;
                self.written()
                    .filter(|(_, e)| e.oob || std::mem::take(&mut oldest_in_band))
                    .map(|(id, _)| id)
                    .collect()
            }
        };
        for id in victims {
            // Victims are written; one abandoned already has no caller left to tell.
            if self.abandon(id).is_none() {
                continue;
            }
            let error = match too_deep {
                true => CommandError::ResponseTooDeep { size },
                false => CommandError::ResponseTooLarge { size },
            };
            self.output(Output::Response {
                id: RequestId(id),
                result: Err(error),
            });
        }
    }

    fn on_message(&mut self, frame: &[u8]) {
        self.stats.messages += 1;
        let Ok(text) = std::str::from_utf8(frame) else {
            return self.malformed(MalformedKind::InvalidUtf8, frame);
        };
        let m = match Members::parse(text) {
            Ok(m) => m,
            Err(e) => {
                let reason = e.to_string();
                return self.malformed(MalformedKind::InvalidJson { reason }, frame);
            }
        };
        self.on_members(frame, m);
    }

    fn on_members(&mut self, frame: &[u8], m: Members<'_>) {
        let is_message = m.ret.is_some() || m.error.is_some() || m.event.is_some();
        if self.agent.is_some() && self.stats.syncs == 0 && m.qmp.is_some() && !is_message {
            // A QMP monitor greets as it accepts, so during the handshake: waiting for a sync
            // reply it will never send would only wait out the deadline.
            return self.close(ProtocolError::QmpGreeting(Excerpt::new(frame)).into());
        }
        if let Some(agent) = &self.agent
            && agent.syncing.is_some()
        {
            if m.error.is_none() && m.ret.is_some_and(|r| agent.is_sync_reply(r)) {
                return self.sync_done();
            }
            // A late reply to something given up, a stale sync reply, the agent's complaint
            // about the 0xFF: whatever it is, it predates our sync.
            self.stats.discarded += 1;
            return;
        }
        if let (Some(qmp), false) = (m.qmp, is_message) {
            return self.on_greeting(qmp, frame);
        }
        if self.state == State::AwaitingGreeting {
            return self.close(ProtocolError::BadGreeting(Excerpt::new(frame)).into());
        }
        if let Some(error) = m.error {
            let error = QmpError::parse(error);
            return self.on_response(&m, Err(error));
        }
        if let Some(ret) = m.ret {
            return self.on_response(&m, Ok(ret));
        }
        if let Some(name) = m.event.and_then(wire::string) {
            self.stats.events += 1;
            let event = Event {
                name,
                data: m.data.map(RawJson::from_raw),
                timestamp: Timestamp::parse(m.timestamp),
            };
            return self.output(Output::Event(event));
        }
        // A reply with one of our ids but neither `return` nor `error`: its caller would
        // otherwise wait for an answer that has come and gone.
        let answers = self.answered_by(m.id.map(|_| m.numeric_id()));
        if let Some(id) = answers.filter(|_| m.event.is_none()) {
            let excerpt = Excerpt::new(frame);
            return self.finish(id, Err(CommandError::NotAReply(excerpt)));
        }
        self.malformed(MalformedKind::Unclassifiable, frame);
    }

    fn on_greeting(&mut self, qmp: &str, frame: &[u8]) {
        if self.state != State::AwaitingGreeting {
            return self.malformed(MalformedKind::UnexpectedGreeting, frame);
        }
        let Some(greeting) = Greeting::parse(qmp) else {
            return self.close(ProtocolError::BadGreeting(Excerpt::new(frame)).into());
        };
        let offers_oob = greeting.has_capability("oob");
        self.greeting = Some(greeting.clone());
        self.output(Output::Greeting(greeting));
        if !self.config.negotiate {
            return self.become_ready(false);
        }
        self.state = State::Negotiating;
        let out = self.transmit.buf();
        if self.config.enable_oob && offers_oob {
            out.extend_from_slice(
                br#"{"execute":"qmp_capabilities","arguments":{"enable":["oob"]},"id":0}"#,
            );
        } else {
            out.extend_from_slice(br#"{"execute":"qmp_capabilities","id":0}"#);
        }
        out.push(b'\n');
    }

    fn become_ready(&mut self, oob: bool) {
        self.state = State::Ready;
        self.oob = oob;
        self.output(Output::Ready { oob });
        // Out-of-band commands queued before the handshake go first (that is what OOB is for);
        // without OOB they cannot be sent at all.
        let queued: Vec<u64> = self.queue.iter().copied().collect();
        for id in queued {
            if !self.pending.get(id).is_some_and(|e| e.oob) {
                continue;
            }
            self.queue.retain(|&q| q != id);
            if oob {
                self.write(id);
            } else {
                self.complete(id, Err(CommandError::OobUnavailable));
            }
        }
        self.pump();
    }

    fn on_response(&mut self, m: &Members<'_>, result: Result<&str, QmpError>) {
        if self.state == State::Negotiating && m.numeric_id() == Some(NEGOTIATION_ID) {
            return match result {
                Ok(_) => {
                    let oob = self.config.enable_oob
                        && self
                            .greeting
                            .as_ref()
                            .is_some_and(|g| g.has_capability("oob"));
                    self.become_ready(oob)
                }
                Err(e) => self.close(ProtocolError::NegotiationRejected(e).into()),
            };
        }
        let id = match m.id {
            Some(_) => {
                let id = self.answered_by(Some(m.numeric_id()));
                // An in-band reply with an id: whatever cascade was under way is over.
                if self.cascade && id.is_some_and(|id| self.pending.get(id).is_some_and(|e| !e.oob))
                {
                    self.cascade = false;
                }
                id
            }
            None if self.agent.is_none() && result.is_err() => self.idless_error(),
            None => self.answered_by(None),
        };
        match id {
            Some(id) => self.finish(id, result.map_err(CommandError::Qmp)),
            None => {
                self.stats.unmatched += 1;
                let unmatched = Unmatched {
                    id: m.id.map(RawJson::from_raw),
                    result: result.map(RawJson::from_raw),
                };
                self.output(Output::Unmatched(unmatched));
            }
        }
    }

    /// The request a response (or an unreadable one, by its sniffed id) answers: `Some(wire id)`,
    /// `Some(None)` for an id that is not a wire id, `None` for no id. Without an id: on a
    /// guest-agent connection the one command in flight (old agents do not echo ids, and the
    /// agent answers in order); on QMP nothing, as QEMU's id-less errors are about input it
    /// could not parse, not about any request.
    fn answered_by(&self, id: Option<Option<u64>>) -> Option<u64> {
        match id {
            Some(wire) => wire.filter(|&id| self.awaits(id)),
            None if self.agent.is_some() && self.state == State::Ready => {
                self.written().next().map(|(id, _)| id)
            }
            None => None,
        }
    }

    /// The request an id-less error answers on QMP. QEMU sends one when it could not parse what it
    /// read (too large, too deep, too many tokens, not an object), queued in order with its
    /// in-band replies; and as its parser resets and lexes the rest of that input afresh, one bad
    /// input can earn a long cascade of them. So the first id-less error fails the oldest written
    /// and unanswered in-band request (the oldest out-of-band one if none is in band: QEMU could
    /// not have told it was out of band), and further ones before an in-band reply with an id
    /// belong to the same cascade and answer nothing. (Two bad inputs in a row, with no reply
    /// between them, count as one cascade: the second request waits for its deadline.)
    fn idless_error(&mut self) -> Option<u64> {
        if self.cascade || self.state != State::Ready {
            return None;
        }
        let target = self
            .written()
            .find(|(_, e)| !e.oob)
            .or_else(|| self.written().next())
            .map(|(id, _)| id);
        self.cascade = target.is_some();
        target
    }

    /// Whether `id` was written and awaits a response (abandoned requests included). A response to
    /// a request not yet written is a forgery or a stray, not an answer.
    fn awaits(&self, id: u64) -> bool {
        self.pending.get(id).is_some_and(Entry::written)
    }

    /// The requests written (abandoned ones included), oldest first: in-band ones in the order
    /// they went on the wire.
    fn written(&self) -> impl Iterator<Item = (u64, &Entry)> {
        self.pending.iter().filter(|(_, e)| e.written())
    }

    /// Completes a written request with the response that arrived for it (dropped if abandoned),
    /// freeing its window slot.
    fn finish(&mut self, id: u64, result: Result<&str, CommandError>) {
        let Some(e) = self.remove(id) else {
            return;
        };
        if !e.oob {
            self.in_band_in_flight -= 1;
        }
        if matches!(e.stage, Stage::Abandoned) {
            self.abandoned -= 1;
            self.stats.late += 1;
        } else {
            if e.enables_oob && result.is_ok() {
                self.oob = true;
            }
            let id = RequestId(id);
            // Straight from the input buffer, while it is still borrowed: no copy of the text.
            let value = match result {
                Ok(raw) if e.value => serde_json::from_str(raw).ok(),
                _ => None,
            };
            self.output(match value {
                Some(value) => Output::Value { id, value },
                None => Output::Response {
                    id,
                    result: result.map(RawJson::from_raw),
                },
            });
        }
        self.pump();
    }

    fn on_eof(&mut self) {
        let reason = match (self.state, self.truncated) {
            (State::AwaitingGreeting | State::Negotiating, _) => {
                ProtocolError::EofDuringHandshake.into()
            }
            (State::Syncing, _) if self.stats.syncs == 0 => {
                ProtocolError::EofDuringHandshake.into()
            }
            (_, Some(buffered)) => ProtocolError::UnexpectedEof { buffered }.into(),
            _ => CloseReason::PeerClosed,
        };
        self.close(reason);
    }

    fn send(&mut self, cmd: Command) -> Result<RequestId, SendError> {
        if self.state == State::Closed {
            return Err(SendError::Closed);
        }
        if self.pending.len() >= self.config.max_pending {
            return Err(SendError::TooManyPending {
                limit: self.config.max_pending,
            });
        }
        if cmd.is_oob() && (self.agent.is_some() || self.state == State::Ready && !self.oob) {
            return Err(SendError::OobNotEnabled);
        }
        let no_reply =
            cmd.is_no_reply() || self.agent.is_some() && NO_SUCCESS_RESPONSE.contains(&cmd.name());
        let id = self.next_id;
        let next_id = id.checked_add(1).ok_or(SendError::IdsExhausted)?;
        let oob = cmd.is_oob();
        // Straight to the transmit buffer when nothing has to wait: saves a copy per command.
        let write_now = self.state == State::Ready
            && (oob || (self.queue.is_empty() && self.in_band_in_flight < self.window()));
        let limit = self.config.max_command_size;
        let id_room = id_tail_len(id);
        let stage = if write_now {
            let out = self.transmit.buf();
            let start = out.len();
            cmd.write_body(out);
            let size = out.len() - start + id_room;
            if size > limit {
                out.truncate(start);
                // The id is not used up: ids stay dense for the commands actually sent.
                return Err(SendError::TooLarge { size, limit });
            }
            end_with_id(id, self.transmit.buf());
            if cmd.has_fds() {
                self.transmit.mark_fds_at(start, RequestId(id));
            }
            if !oob {
                self.in_band_in_flight += 1;
            }
            Stage::InFlight
        } else {
            let mut bytes = Vec::with_capacity(cmd.wire_capacity());
            cmd.write_body(&mut bytes);
            let size = bytes.len() + id_room;
            if size > limit {
                return Err(SendError::TooLarge { size, limit });
            }
            self.queue.push_back(id);
            Stage::Queued {
                bytes,
                fds: cmd.has_fds(),
            }
        };
        self.next_id = next_id;
        let deadline = cmd.deadline_at();
        if let Some(at) = deadline {
            self.deadlines.insert((at, id));
        }
        let entry = Entry {
            oob,
            no_reply,
            deadline,
            enables_oob: cmd.enables_oob(),
            value: cmd.is_decode_value(),
            stage,
        };
        self.pending.insert(id, entry);
        Ok(RequestId(id))
    }

    /// How many in-band requests may be in flight: QEMU's queue depth with OOB, else no limit. A
    /// guest agent gets one at a time: replies from agents that do not echo ids can only be
    /// matched by order, and a command that never replies must not hold others' replies hostage.
    fn window(&self) -> usize {
        if self.agent.is_some() {
            1
        } else if self.oob {
            self.config.max_in_flight
        } else {
            usize::MAX
        }
    }

    /// Writes queued in-band requests while the window allows.
    fn pump(&mut self) {
        if self.state != State::Ready {
            return;
        }
        while self.in_band_in_flight < self.window() {
            let Some(id) = self.queue.pop_front() else {
                return;
            };
            self.write(id);
        }
    }

    /// Moves a queued request's bytes to the transmit buffer.
    fn write(&mut self, id: u64) {
        let Some(e) = self.pending.get_mut(id) else {
            return;
        };
        let Stage::Queued { bytes, fds } = std::mem::replace(&mut e.stage, Stage::InFlight) else {
            return;
        };
        if !e.oob {
            self.in_band_in_flight += 1;
        }
        if fds {
            self.transmit.mark_fds(RequestId(id));
        }
        let out = self.transmit.buf();
        out.extend_from_slice(&bytes);
        end_with_id(id, out);
    }

    /// Forgets request `id`: its entry and deadline.
    fn remove(&mut self, id: u64) -> Option<Entry> {
        let e = self.pending.remove(id)?;
        if let Some(at) = e.deadline {
            self.deadlines.remove(&(at, id));
        }
        Some(e)
    }

    /// Completes a request that has not been answered, with `result`.
    fn complete(&mut self, id: u64, result: Result<RawJson, CommandError>) {
        if self.remove(id).is_none() {
            return;
        }
        self.output(Output::Response {
            id: RequestId(id),
            result,
        });
    }

    /// Stops waiting for request `id` without outputting anything. Returns what it was, or
    /// `None` if unknown or already abandoned.
    fn abandon(&mut self, id: u64) -> Option<Abandoned> {
        let e = self.pending.get_mut(id)?;
        if let Some(at) = e.deadline.take() {
            self.deadlines.remove(&(at, id));
        }
        match e.stage {
            Stage::Queued { .. } => {
                self.pending.remove(id);
                self.queue.retain(|&q| q != id);
                Some(Abandoned::Unwritten)
            }
            Stage::InFlight => {
                e.stage = Stage::Abandoned;
                self.abandoned += 1;
                Some(Abandoned::Written {
                    no_reply: e.no_reply,
                })
            }
            Stage::Abandoned => None,
        }
    }

    fn cancel(&mut self, id: u64) -> bool {
        if self.state == State::Closed {
            return false;
        }
        match self.abandon(id) {
            None => false,
            Some(what) => {
                if matches!(what, Abandoned::Written { .. }) && self.agent.is_some() {
                    // Its reply may still come; only a resync can tell it from the next one's.
                    self.start_sync();
                }
                true
            }
        }
    }

    fn expire(&mut self, now: Instant) {
        let mut resync = false;
        let mut lost_sync = false;
        while self.deadlines.first().is_some_and(|&(at, _)| at <= now) {
            let Some((_, id)) = self.deadlines.pop_first() else {
                break;
            };
            let (result, written) = match self.abandon(id) {
                None => continue,
                // Silence was its success; an error may still come, so it is resynced past too.
                Some(Abandoned::Written { no_reply: true }) => {
                    (Err(CommandError::NoReply { closed: false }), true)
                }
                Some(what) => {
                    self.stats.timed_out += 1;
                    (
                        Err(CommandError::TimedOut),
                        matches!(what, Abandoned::Written { .. }),
                    )
                }
            };
            resync |= written;
            lost_sync |= self.syncing();
            self.output(Output::Response {
                id: RequestId(id),
                result,
            });
        }
        // A resync under way may have been lost (a guest agent restarting in the guest drops
        // what it had read): start it over, but back off, or an agent slower to answer than
        // commands expire would never catch up with our newest sync id.
        if lost_sync && !resync && self.agent.as_mut().is_some_and(|a| a.retry_due(now)) {
            resync = true;
        }
        if resync && self.agent.is_some() && self.state != State::Closed {
            self.start_sync();
            if let Some(agent) = &mut self.agent {
                agent.sync_since = Some(now);
            }
        }
        self.pump();
    }

    /// Guest agent: gives up everything in flight and sends `0xFF` + `guest-sync-delimited`.
    fn start_sync(&mut self) {
        let in_flight: Vec<u64> = self.written().map(|(id, _)| id).collect();
        for id in in_flight {
            let Some(e) = self.remove(id) else {
                continue;
            };
            if matches!(e.stage, Stage::Abandoned) {
                self.abandoned -= 1;
            } else {
                self.output(Output::Response {
                    id: RequestId(id),
                    result: Err(CommandError::Resynced),
                });
            }
        }
        self.in_band_in_flight = 0;
        let Some(agent) = &mut self.agent else {
            return;
        };
        agent.start_sync(self.transmit.buf());
        self.state = State::Syncing;
    }

    fn sync_done(&mut self) {
        if let Some(agent) = &mut self.agent {
            agent.synced();
        }
        self.stats.syncs += 1;
        self.become_ready(false);
    }

    fn close(&mut self, reason: CloseReason) {
        if self.state == State::Closed {
            return;
        }
        self.state = State::Closed;
        if let Some(agent) = &mut self.agent {
            agent.syncing = None;
        }
        for (id, e) in std::mem::take(&mut self.pending).into_entries() {
            let result = match e.stage {
                Stage::Abandoned => continue,
                // The guest went down, as it does when such a command succeeds.
                Stage::InFlight if e.no_reply && self.eof => {
                    Err(CommandError::NoReply { closed: true })
                }
                _ => Err(CommandError::Closed),
            };
            self.output(Output::Response {
                id: RequestId(id),
                result,
            });
        }
        self.queue.clear();
        self.deadlines.clear();
        self.transmit.clear();
        self.in_band_in_flight = 0;
        self.abandoned = 0;
        self.paused = false;
        self.close_reason = Some(reason.clone());
        self.output(Output::Closed(reason));
    }
}
