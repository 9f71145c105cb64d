//! Target 3, and what targets 3 and 4 share: an adapter that checks every output against what it
//! knows of the requests it sent, and a reader of what the client writes.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Instant;

use arbitrary::{Arbitrary, Unstructured};
use qmp_proto::{
    CloseReason, Command, CommandError, Config, Connection, Output, RawJson, RequestId, SendError,
    State,
};
use serde_json::Value;

use crate::{FuzzConfig, pieces, queued_outputs};

/// What the adapter knows of one request returned by `send`.
#[derive(Debug)]
pub(crate) struct Req {
    pub(crate) id: RequestId,
    pub(crate) oob: bool,
    pub(crate) fds: bool,
    pub(crate) deadline: Option<Instant>,
    /// Sent before the connection was ready (queued for the handshake).
    pub(crate) before_ready: bool,
    /// Sent with `decode_value`.
    pub(crate) value: bool,
    /// `cancel` returned true.
    pub(crate) cancelled: bool,
    /// The one `Response` output.
    pub(crate) outcome: Option<Result<RawJson, CommandError>>,
    /// `handle_timeout` ran at or after its deadline while it was open: it must be done by the
    /// next full drain.
    pub(crate) must_be_done: bool,
}

impl Req {
    pub(crate) fn is_open(&self) -> bool {
        !self.cancelled && self.outcome.is_none()
    }
}

/// How a command is built, for checking `send`'s verdict.
#[derive(Debug, Clone, Copy)]
pub(crate) struct CmdInfo {
    pub(crate) oob: bool,
    pub(crate) fds: bool,
    pub(crate) deadline: Option<Instant>,
}

/// The checking adapter: every output goes through [`Tracker::on_output`].
pub(crate) struct Tracker {
    pub(crate) config: Config,
    pub(crate) sent: BTreeMap<u64, Req>,
    last_id: u64,
    pub(crate) closed: Option<CloseReason>,
    greeted: bool,
    pub(crate) ready: Option<bool>,
    /// The latest `now` given to `handle_timeout`.
    latest_timeout: Option<Instant>,
    /// Names of the events output, in order.
    pub(crate) events: Vec<String>,
    /// `handle_eof` was called.
    pub(crate) eof: bool,
    /// Input bytes accepted since `wants_read` was last seen true.
    pushed: usize,
    /// Whether the adapter drains every output after every step, so the output queue bound holds.
    pub(crate) check_queue: bool,
    /// A guest-agent connection: no greeting, a `Ready` per resync, no OOB.
    pub(crate) agent: bool,
}

impl Tracker {
    pub(crate) fn new(config: Config) -> Self {
        Self {
            config,
            sent: BTreeMap::new(),
            last_id: 0,
            closed: None,
            greeted: false,
            ready: None,
            latest_timeout: None,
            events: Vec::new(),
            eof: false,
            pushed: 0,
            check_queue: true,
            agent: false,
        }
    }

    pub(crate) fn open(&self) -> impl Iterator<Item = &Req> {
        self.sent.values().filter(|r| r.is_open())
    }

    /// The most outputs a connection may hold when its adapter drains after every step: up to
    /// `max_buffered_outputs - 1` before the last message, and what one message can add (a
    /// greeting, `Ready` and every queued OOB request failing; or every pending request and
    /// `Closed`).
    fn queue_bound(&self) -> usize {
        self.config.max_buffered_outputs() + self.config.max_pending() + 1
    }

    /// Memory: while the connection wants input it holds at most one unfinished message; when it
    /// does not, at most that plus the input accepted since.
    pub(crate) fn observe(&mut self, conn: &Connection) {
        let held = conn.buffered_input();
        let limit = self.config.max_message_size();
        if conn.wants_read() {
            assert!(
                held <= limit,
                "holds {held} input bytes while reading; limit {limit}"
            );
            self.pushed = 0;
        } else {
            assert!(
                held <= limit + self.pushed,
                "holds {held} input bytes; limit {limit} + {} accepted since",
                self.pushed
            );
        }
        if self.check_queue {
            let queued = queued_outputs(conn);
            assert!(
                queued <= self.queue_bound(),
                "{queued} outputs queued; bound {}",
                self.queue_bound()
            );
        }
    }

    /// Gives the connection input bytes.
    pub(crate) fn input(&mut self, conn: &mut Connection, bytes: &[u8]) {
        let accepted = !conn.is_closed() && !self.eof;
        let ignored = conn.stats().ignored_after_close;
        conn.handle_input(bytes);
        if accepted {
            self.pushed += bytes.len();
        } else {
            assert_eq!(
                conn.stats().ignored_after_close,
                ignored + bytes.len() as u64,
                "input after close or EOF not counted as ignored"
            );
        }
        self.observe(conn);
    }

    pub(crate) fn eof(&mut self, conn: &mut Connection) {
        self.eof = true;
        conn.handle_eof();
        self.observe(conn);
    }

    pub(crate) fn timeout(&mut self, conn: &mut Connection, now: Instant) {
        conn.handle_timeout(now);
        self.latest_timeout = self.latest_timeout.max(Some(now));
        for req in self.sent.values_mut() {
            if req.is_open() && req.deadline.is_some_and(|d| d <= now) {
                req.must_be_done = true;
            }
        }
        self.observe(conn);
    }

    /// Sends `cmd` and checks the verdict.
    pub(crate) fn send(
        &mut self,
        conn: &mut Connection,
        cmd: Command,
        info: CmdInfo,
    ) -> Option<RequestId> {
        let closed = conn.is_closed();
        let state = conn.state();
        let oob_on = conn.oob_enabled();
        let pending = conn.pending();
        let value = cmd.is_decode_value();
        let result = conn.send(cmd);
        self.observe(conn);
        match result {
            Ok(id) => {
                assert!(!closed, "send succeeded on a closed connection");
                assert!(
                    pending < self.config.max_pending(),
                    "send succeeded with {pending} requests pending"
                );
                assert!(
                    !(info.oob && state == State::Ready && !oob_on),
                    "OOB sent without OOB"
                );
                assert!(id.get() > self.last_id, "id {id} reused or out of order");
                self.last_id = id.get();
                self.sent.insert(
                    id.get(),
                    Req {
                        id,
                        oob: info.oob,
                        fds: info.fds,
                        deadline: info.deadline,
                        before_ready: state != State::Ready,
                        value,
                        cancelled: false,
                        outcome: None,
                        must_be_done: false,
                    },
                );
                Some(id)
            }
            Err(SendError::Closed) => {
                assert!(closed, "send refused as closed on an open connection");
                None
            }
            Err(e) => {
                assert!(!closed, "a closed connection refused a send with {e:?}");
                match e {
                    SendError::TooManyPending { limit } => {
                        assert_eq!(limit, self.config.max_pending());
                    }
                    SendError::OobNotEnabled => {
                        assert!(
                            info.oob && (self.agent || state == State::Ready && !oob_on),
                            "{e:?} wrongly"
                        );
                    }
                    SendError::TooLarge { size, limit } => {
                        assert_eq!(limit, self.config.max_command_size());
                        assert!(size > limit, "{e:?} wrongly");
                    }
                    other => panic!("unexpected send error {other:?}"),
                }
                None
            }
        }
    }

    pub(crate) fn cancel(&mut self, conn: &mut Connection, id: u64) {
        let Some(req) = self.sent.get_mut(&id) else {
            return;
        };
        let closed = conn.is_closed();
        let cancelled = conn.cancel(req.id);
        if cancelled {
            assert!(!closed, "cancel succeeded on a closed connection");
            assert!(
                req.is_open(),
                "cancel succeeded on request {id}, already done: {req:?}"
            );
            req.cancelled = true;
        }
        self.observe(conn);
    }

    /// Checks one output.
    pub(crate) fn on_output(&mut self, out: Output, conn: &Connection) {
        assert!(self.closed.is_none(), "output after Closed: {out:?}");
        match out {
            Output::Greeting(_) => {
                assert!(!self.greeted, "a second Greeting output");
                self.greeted = true;
            }
            Output::Ready { oob } if self.agent => {
                assert!(!oob, "OOB on a guest agent");
                self.ready = Some(oob);
            }
            Output::Ready { oob } => {
                assert!(self.greeted, "Ready before the greeting");
                assert!(self.ready.is_none(), "a second Ready");
                self.ready = Some(oob);
            }
            Output::Value { id, value } => {
                // Checked as the response it stands for.
                let raw = RawJson::from_json(&value.to_string()).expect("a Value prints as JSON");
                self.on_response(id, Ok(raw), true, conn);
            }
            Output::Response { id, result } => self.on_response(id, result, false, conn),
            Output::Event(event) => self.events.push(event.name),
            Output::Closed(reason) => {
                assert!(conn.is_closed(), "Closed output on an open connection");
                assert_eq!(conn.close_reason(), Some(&reason), "close_reason disagrees");
                for (id, req) in &self.sent {
                    assert!(
                        req.cancelled || req.outcome.is_some(),
                        "Closed before request {id} got its outcome"
                    );
                }
                self.closed = Some(reason);
            }
            _ => {}
        }
    }

    /// Checks a request's outcome; `from_value`: it came as an `Output::Value`.
    fn on_response(
        &mut self,
        id: RequestId,
        result: Result<RawJson, CommandError>,
        from_value: bool,
        conn: &Connection,
    ) {
        let req = self
            .sent
            .get_mut(&id.get())
            .unwrap_or_else(|| panic!("a Response for id {id}, never returned by send"));
        assert!(
            !req.cancelled,
            "a Response for cancelled request {id}: {result:?}"
        );
        assert!(
            req.outcome.is_none(),
            "a second Response for {id}: {result:?} after {:?}",
            req.outcome
        );
        assert!(
            req.value || !from_value,
            "a Value for request {id}, sent without decode_value"
        );
        match &result {
            Ok(raw) if req.value && !from_value => {
                assert!(
                    raw.to_value().is_err(),
                    "request {id} sent with decode_value got text its Value holds"
                );
            }
            Err(CommandError::TimedOut) => {
                let deadline = req.deadline.expect("TimedOut without a deadline");
                assert!(
                    self.latest_timeout.is_some_and(|t| t >= deadline),
                    "request {id} timed out before its deadline"
                );
            }
            Err(CommandError::Closed | CommandError::NoReply { closed: true }) => {
                assert!(conn.is_closed(), "Closed outcome on an open connection");
            }
            Err(CommandError::NoReply { closed: false }) => {
                let deadline = req.deadline.expect("NoReply without a deadline");
                assert!(self.latest_timeout.is_some_and(|t| t >= deadline));
            }
            Err(CommandError::Resynced) => assert!(self.agent, "Resynced on QMP"),
            Err(CommandError::OobUnavailable) => {
                assert!(req.oob && req.before_ready, "OobUnavailable for {req:?}");
                assert_eq!(self.ready, Some(false), "OobUnavailable with OOB on");
            }
            _ => {}
        }
        req.outcome = Some(result);
    }

    /// Takes at most `max` outputs (`None`: all, then checks the state of a drained connection).
    pub(crate) fn drain(&mut self, conn: &mut Connection, max: Option<usize>) {
        let mut taken = 0;
        while max.is_none_or(|m| taken < m) {
            let Some(out) = conn.poll_output() else {
                if max.is_none() {
                    self.drained(conn);
                }
                return;
            };
            taken += 1;
            self.on_output(out, conn);
            self.observe(conn);
        }
    }

    /// Polls outputs one at a time until the connection wants input again, as a careful adapter
    /// does before reading.
    pub(crate) fn make_room(&mut self, conn: &mut Connection) {
        while !conn.wants_read() {
            let Some(out) = conn.poll_output() else {
                return;
            };
            self.on_output(out, conn);
            self.observe(conn);
        }
    }

    /// A connection with no outputs left.
    fn drained(&mut self, conn: &Connection) {
        if conn.is_closed() {
            assert!(self.closed.is_some(), "closed without a Closed output");
            return;
        }
        assert!(
            !self.eof,
            "EOF handled and every output taken, but not closed"
        );
        assert!(conn.wants_read(), "paused with no outputs left");
        let open = self.open().count();
        assert_eq!(
            conn.pending(),
            open,
            "pending() disagrees with the requests awaiting outcomes"
        );
        let next = self.open().filter_map(|r| r.deadline).min();
        assert_eq!(
            conn.poll_timeout(),
            next,
            "poll_timeout is not the earliest open deadline"
        );
        for req in self.open() {
            assert!(
                !req.must_be_done,
                "deadline passed and handled, no outcome: {req:?}"
            );
        }
    }

    /// Ends the session if it is still open (by EOF or a local close), takes every output, and
    /// checks the closed connection.
    pub(crate) fn finish(&mut self, conn: &mut Connection, by_eof: bool) -> Summary {
        self.drain(conn, None);
        if self.closed.is_none() {
            if by_eof {
                self.eof(conn);
            } else {
                conn.close();
                self.observe(conn);
            }
            self.drain(conn, None);
        }
        let reason = self
            .closed
            .clone()
            .expect("no Closed output after EOF or close");
        for (id, req) in &self.sent {
            assert!(
                req.cancelled || req.outcome.is_some(),
                "request {id} never got an outcome"
            );
        }
        // A closed connection stays closed and quiet.
        assert!(matches!(
            conn.send(Command::new("x")),
            Err(SendError::Closed)
        ));
        for req in self.sent.values() {
            assert!(!conn.cancel(req.id), "cancel succeeded after close");
        }
        conn.handle_input(b"{\"event\": \"LATE\"}\r\n");
        conn.handle_eof();
        conn.close();
        if let Some(t) = self.latest_timeout {
            conn.handle_timeout(t + std::time::Duration::from_secs(1 << 20));
        }
        assert!(conn.poll_output().is_none(), "output after Closed");
        assert_eq!(conn.state(), State::Closed);
        assert_eq!(conn.close_reason(), Some(&reason));
        assert!(
            conn.poll_transmit().is_none() && !conn.wants_write(),
            "bytes to send after close"
        );
        assert!(!conn.wants_read());
        assert_eq!((conn.pending(), conn.in_flight()), (0, 0));
        assert_eq!(conn.poll_timeout(), None);
        Summary::of(self)
    }
}

/// What a session came to, so tests can check that a seed reaches what it is meant to.
#[derive(Debug, Default)]
#[cfg_attr(not(test), allow(dead_code))]
pub(crate) struct Summary {
    /// Requests by outcome: `ok`, `qmp`, `timed out`, `closed`, `too large`, `too deep`,
    /// `oob unavailable`, `cancelled`.
    pub(crate) outcomes: BTreeMap<&'static str, usize>,
    pub(crate) events: usize,
    pub(crate) ready: Option<bool>,
    pub(crate) closed: Option<CloseReason>,
}

impl Summary {
    fn of(t: &Tracker) -> Self {
        let mut outcomes = BTreeMap::new();
        for req in t.sent.values() {
            let kind = match &req.outcome {
                _ if req.cancelled => "cancelled",
                Some(Ok(_)) => "ok",
                Some(Err(CommandError::Qmp(_))) => "qmp",
                Some(Err(CommandError::TimedOut)) => "timed out",
                Some(Err(CommandError::Closed)) => "closed",
                Some(Err(CommandError::ResponseTooLarge { .. })) => "too large",
                Some(Err(CommandError::ResponseTooDeep { .. })) => "too deep",
                Some(Err(CommandError::OobUnavailable)) => "oob unavailable",
                Some(Err(_)) => "other",
                None => "none",
            };
            *outcomes.entry(kind).or_insert(0) += 1;
        }
        Self {
            outcomes,
            events: t.events.len(),
            ready: t.ready,
            closed: t.closed.clone(),
        }
    }
}

/// What the client wrote, read back as a server would.
#[derive(Default)]
pub(crate) struct Wire {
    /// Bytes not yet read as a whole command.
    inbox: Vec<u8>,
    /// Offset of `inbox[0]` in the client's byte stream.
    base: usize,
    /// Offsets in the client's stream where a `Transmit` marked with fds started.
    fds_marks: BTreeMap<usize, u64>,
    /// Bytes written so far.
    pub(crate) written: usize,
    seen: BTreeSet<u64>,
    /// The server's input is arbitrary bytes, which may answer a command before it is written:
    /// its wire id is then free, or held by a newer request, by the time it is read here. Which
    /// request a command is cannot be told then, so only its form is checked (`connection_ops`,
    /// whose server only answers what it read, checks the rest).
    pub(crate) forged_replies: bool,
}

/// One command the client wrote.
#[derive(Debug)]
pub(crate) struct WrittenCommand {
    /// The request (`RequestId::get`) it is; 0 for the connection's own negotiation.
    pub(crate) id: u64,
    /// The id it carries on the wire, which a reply must echo.
    pub(crate) wire: u64,
    pub(crate) name: String,
    pub(crate) oob: bool,
}

impl Wire {
    /// Writes up to `max` bytes of the connection's next `Transmit` (`acknowledge_more`: tell the
    /// connection a larger count, which it must clamp) and reads the commands they complete.
    pub(crate) fn write(
        &mut self,
        conn: &mut Connection,
        max: usize,
        acknowledge_more: bool,
        tracker: &Tracker,
    ) -> Vec<WrittenCommand> {
        let Some(t) = conn.poll_transmit() else {
            return Vec::new();
        };
        assert!(!t.data.is_empty(), "an empty Transmit");
        if let Some(id) = t.fds_for {
            self.fds_marks.insert(self.written, id.get());
        }
        let n = max.min(t.data.len());
        let bytes = t.data[..n].to_vec();
        let ack = if acknowledge_more && n == t.data.len() {
            n + 1 + max
        } else {
            n
        };
        let before = conn.stats().bytes_sent;
        conn.advance_transmit(ack);
        assert_eq!(
            conn.stats().bytes_sent,
            before + n as u64,
            "advance_transmit miscounted"
        );
        self.written += n;
        self.receive(&bytes, tracker)
    }

    /// Writes everything the connection has to send.
    pub(crate) fn write_all(
        &mut self,
        conn: &mut Connection,
        tracker: &Tracker,
    ) -> Vec<WrittenCommand> {
        let mut got = Vec::new();
        while conn.poll_transmit().is_some() {
            got.extend(self.write(conn, usize::MAX, false, tracker));
        }
        got
    }

    /// Whether the server has read a command with this id.
    pub(crate) fn has_seen(&self, id: u64) -> bool {
        self.seen.contains(&id)
    }

    /// The ids of every command the server has read.
    pub(crate) fn seen_ids(&self) -> impl Iterator<Item = u64> + '_ {
        self.seen.iter().copied()
    }

    /// Bytes the server has received but not read as a whole command.
    pub(crate) fn unread(&self) -> &[u8] {
        &self.inbox
    }

    fn receive(&mut self, bytes: &[u8], tracker: &Tracker) -> Vec<WrittenCommand> {
        self.inbox.extend_from_slice(bytes);
        let mut got = Vec::new();
        let mut stream = serde_json::Deserializer::from_slice(&self.inbox).into_iter::<Value>();
        let mut consumed = 0;
        let mut starts = Vec::new();
        loop {
            let start = consumed
                + self.inbox[consumed..]
                    .iter()
                    .take_while(|b| b.is_ascii_whitespace())
                    .count();
            match stream.next() {
                Some(Ok(v)) => {
                    consumed = stream.byte_offset();
                    starts.push(self.base + start);
                    got.push(v);
                }
                Some(Err(e)) if e.is_eof() => break,
                Some(Err(e)) => panic!(
                    "the client wrote invalid JSON: {e}: {:?}",
                    String::from_utf8_lossy(&self.inbox)
                ),
                None => break,
            }
        }
        self.inbox.drain(..consumed);
        self.base += consumed;
        got.into_iter()
            .zip(starts)
            .map(|(value, start)| self.check_command(value, start, tracker))
            .collect()
    }

    fn check_command(&mut self, value: Value, start: usize, tracker: &Tracker) -> WrittenCommand {
        let object = value.as_object().expect("the client wrote a non-object");
        let (name, oob) = match (object.get("execute"), object.get("exec-oob")) {
            (Some(Value::String(name)), None) => (name.clone(), false),
            (None, Some(Value::String(name))) => (name.clone(), true),
            _ => panic!("the client wrote a command without one execute/exec-oob: {value}"),
        };
        let wire = object
            .get("id")
            .and_then(Value::as_u64)
            .unwrap_or_else(|| panic!("the client wrote a command without a numeric id: {value}"));
        let mark = self.fds_marks.remove(&start);
        if self.forged_replies && wire != 0 {
            return WrittenCommand {
                id: u64::MAX,
                wire,
                name,
                oob,
            };
        }
        // A request's wire id is its own (which the checks below confirm through `sent`); it
        // may be answered already, by bytes read before these.
        let id = wire;
        assert!(self.seen.insert(id), "the client wrote request {id} twice");
        if id == 0 {
            assert!(
                name == "qmp_capabilities" && tracker.config.negotiate() && !oob,
                "id 0 is the connection's own negotiation: {value}"
            );
            assert_eq!(mark, None, "the negotiation marked with fds");
        } else {
            let req = tracker
                .sent
                .get(&id)
                .unwrap_or_else(|| panic!("the client wrote id {id}, never returned by send"));
            assert_eq!(req.oob, oob, "request {id} written with the wrong OOB flag");
            if req.fds {
                assert_eq!(
                    mark,
                    Some(id),
                    "request {id} with fds did not start a Transmit"
                );
            } else {
                assert_eq!(mark, None, "request {id} without fds marked with fds");
            }
        }
        WrittenCommand {
            id,
            wire,
            name,
            oob,
        }
    }
}

/// The request holding wire id `wire` now, if any.
pub(crate) fn request_of_wire(conn: &Connection, tracker: &Tracker, wire: u64) -> Option<u64> {
    tracker
        .sent
        .values()
        .find(|r| conn.wire_id(r.id) == Some(wire))
        .map(|r| r.id.get())
}

// --- Target 3 ------------------------------------------------------------------------------------

/// The greeting of qemu-storage-daemon 10.0.2, byte for byte (`tests/data/qsd-10.0-compact`).
pub(crate) const GREETING: &[u8] = br#"{"QMP": {"version": {"qemu": {"micro": 2, "minor": 0, "major": 10}, "package": "Debian 1:10.0.2+ds-2+deb13u1~bpo12+1"}, "capabilities": ["oob"]}}"#;
/// The same greeting from a `pretty=on` monitor (`tests/data/qsd-10.0-pretty`).
pub(crate) const GREETING_PRETTY: &[u8] = b"{\r\n    \"QMP\": {\r\n        \"version\": {\r\n            \"qemu\": {\r\n                \"micro\": 2,\r\n                \"minor\": 0,\r\n                \"major\": 10\r\n            },\r\n            \"package\": \"Debian 1:10.0.2+ds-2+deb13u1~bpo12+1\"\r\n        },\r\n        \"capabilities\": [\r\n            \"oob\"\r\n        ]\r\n    }\r\n}";
/// QEMU 7.2's greeting without OOB (a monitor configured without it).
const GREETING_NO_OOB: &[u8] =
    br#"{"QMP": {"version": {"qemu": {"micro": 22, "minor": 2, "major": 7}, "package": ""}, "capabilities": []}}"#;

const COMMANDS: [&str; 6] = [
    "query-version",
    "query-status",
    "blockdev-add",
    "query-block-jobs",
    "job-complete",
    "query-qmp-schema",
];

/// The fixed part of a `connection_bytes` input.
#[derive(Debug, Arbitrary)]
pub(crate) struct BytesHeader {
    pub(crate) config: FuzzConfig,
    /// The greeting: 0 compact, 1 pretty, 2 without OOB.
    pub(crate) greeting: u8,
    /// Commands sent before the greeting: `% 4`.
    pub(crate) early: u8,
    /// Commands sent once the handshake is done: `% 16`.
    pub(crate) late: u8,
    /// Bit `i`: command `i` is OOB.
    pub(crate) oob_mask: u16,
    /// Bit `i`: command `i` carries fds.
    pub(crate) fds_mask: u16,
    /// Send another command after every `n`-th piece of input (0: never).
    pub(crate) midstream: u8,
    pub(crate) chunk_seed: u32,
    pub(crate) chunk_log: u8,
    /// `% 4`: 0 drains every output after every piece; `n` polls at most `n` per piece.
    pub(crate) lazy: u8,
    /// Even: the stream ends with EOF; odd: with a local close.
    pub(crate) end: u8,
}

/// Target 3, a connection fed arbitrary bytes. Input: a `BytesHeader`-shaped header (limits,
/// which greeting, how many commands are sent before and after the handshake, which are OOB or
/// carry fds, chunking, how eagerly outputs are drained, how the session ends), then the bytes
/// the server sends after its greeting and the `qmp_capabilities` return.
///
/// Ids 1 to 10 are the ones the captured sessions answer, so the seeds' replies match requests.
/// Checks: no panic; the input buffer stays within `max_message_size` plus the input accepted
/// since the connection last wanted more; the output queue within its bound; every request gets
/// exactly one outcome, none invented; `Closed` comes once and last; what the client writes is
/// valid JSON with unique ids and fds marks in the right places.
pub fn connection_bytes(data: &[u8]) {
    let _ = run_bytes(data);
}

pub(crate) fn run_bytes(data: &[u8]) -> Option<Summary> {
    let mut u = Unstructured::new(data);
    let h = BytesHeader::arbitrary(&mut u).ok()?;
    let stream = u.take_rest();
    let config = h.config.config();
    let mut conn = Connection::new(config.clone());
    let mut t = Tracker::new(config);
    let lazy = usize::from(h.lazy % 4);
    t.check_queue = lazy == 0;
    let mut wire = Wire {
        forged_replies: true,
        ..Wire::default()
    };
    let mut next_cmd = 0usize;
    let mut send = |t: &mut Tracker, conn: &mut Connection| {
        let i = next_cmd;
        next_cmd += 1;
        let bit = |mask: u16| mask & (1 << (i % 16)) != 0;
        let mut cmd = Command::new(COMMANDS[i % COMMANDS.len()]);
        let info = CmdInfo {
            oob: bit(h.oob_mask),
            fds: bit(h.fds_mask),
            deadline: None,
        };
        if info.oob {
            cmd = cmd.oob();
        }
        if info.fds {
            cmd = cmd.with_fds();
        }
        if bit(h.oob_mask ^ h.fds_mask) {
            cmd = cmd.decode_value();
        }
        let _ = t.send(conn, cmd, info);
    };

    for _ in 0..h.early % 4 {
        send(&mut t, &mut conn);
    }
    let greeting = match h.greeting % 3 {
        0 => GREETING,
        1 => GREETING_PRETTY,
        _ => GREETING_NO_OOB,
    };
    t.input(&mut conn, greeting);
    t.input(&mut conn, b"\r\n");
    t.drain(&mut conn, None);
    wire.write_all(&mut conn, &t);
    if conn.state() == State::Negotiating {
        t.input(&mut conn, b"{\"return\": {}, \"id\": 0}\r\n");
        t.drain(&mut conn, None);
    }
    for _ in 0..h.late % 16 {
        send(&mut t, &mut conn);
    }
    t.drain(&mut conn, None);
    wire.write_all(&mut conn, &t);

    for (n, piece) in pieces(stream, h.chunk_seed, h.chunk_log)
        .into_iter()
        .enumerate()
    {
        if lazy != 0 {
            t.make_room(&mut conn);
        }
        t.input(&mut conn, piece);
        if h.midstream != 0 && n % usize::from(h.midstream) == 0 {
            send(&mut t, &mut conn);
        }
        t.drain(&mut conn, (lazy != 0).then_some(lazy));
        wire.write_all(&mut conn, &t);
    }
    Some(t.finish(&mut conn, h.end % 2 == 0))
}
