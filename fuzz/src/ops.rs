//! Target 4: operation sequences against a scripted server and a reference model.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use arbitrary::{Arbitrary, Unstructured};
use qmp_proto::{CloseReason, Command, CommandError, Connection, ProtocolError};
use serde_json::{Value, json};

use crate::conn::{CmdInfo, Summary, Tracker, Wire, WrittenCommand, request_of_wire};
use crate::splitter::{Style, render};
use crate::{FuzzConfig, lex_value, limit_crossing};

/// The fixed part of a `connection_ops` input; operations follow until the input runs out.
#[derive(Debug, Arbitrary)]
pub(crate) struct OpsHeader {
    pub(crate) config: FuzzConfig,
    /// The server answers `qmp_capabilities` as soon as it reads it.
    pub(crate) auto_negotiate: bool,
    /// The adapter takes outputs only on [`Op::Drain`] (otherwise after every operation).
    pub(crate) lazy: bool,
    /// A session still open after the last operation ends by EOF (otherwise by a local close).
    pub(crate) end_by_eof: bool,
}

/// One step: something the application, the transport, the clock or the server does.
#[derive(Debug, Clone, Arbitrary, PartialEq, Eq)]
pub(crate) enum Op {
    /// `send` one of the canned commands (`cmd % 9`); `size` pads the big one.
    Send {
        cmd: u8,
        oob: bool,
        fds: bool,
        deadline_ms: Option<u16>,
        size: u16,
    },
    /// `cancel` one of the ids `send` returned (`which % count`).
    Cancel { which: u8 },
    /// The clock moves on; `handle_timeout(now)`.
    Advance { ms: u16 },
    /// A spurious `handle_timeout` for a time before now.
    TimeoutEarly { back_ms: u16 },
    /// The transport takes up to `max` bytes of the next `Transmit`.
    Write { max: u16, acknowledge_more: bool },
    /// The transport takes everything.
    WriteAll,
    /// The server greets: compact with OOB, pretty with OOB, without OOB, or broken.
    Greet { style: u8 },
    /// The server answers its `k`-th unanswered command.
    Reply {
        k: u8,
        kind: ReplyKind,
        pretty: bool,
    },
    /// The server answers its `k`-th answered command again.
    Duplicate { k: u8, pretty: bool },
    /// A response with an id no request has (`which % 12`).
    UnknownId { which: u8, error: bool },
    /// An id-less error, as QEMU sends after a parse error.
    IdlessError { pretty: bool },
    /// One of the canned events (`which % 8`).
    Event { which: u8, pretty: bool },
    /// Junk between messages (`which % 19`); some of it opens a value that swallows what follows.
    Junk { which: u8 },
    /// The transport hands the client up to `max` bytes of what the server sent; unless `force`,
    /// only once the connection wants input.
    Deliver { max: u16, force: bool },
    /// The transport hands the client everything the server sent.
    DeliverAll,
    /// The adapter takes up to `n` outputs (0: all). Only in lazy mode.
    Drain { n: u8 },
    /// The transport reaches EOF.
    Eof,
    /// The application closes the connection.
    Close,
}

/// How the server answers.
#[derive(Debug, Clone, Arbitrary, PartialEq, Eq)]
pub(crate) enum ReplyKind {
    /// One of the canned return values.
    Return(u8),
    /// One of the canned errors.
    Error(u8),
    /// A return larger than `max_message_size`.
    TooLarge,
    /// A return nested deeper than `max_depth`.
    TooDeep,
}

/// What a reply should turn into on the client, given the limits.
#[derive(Debug, Clone, PartialEq)]
enum Expect {
    Return(Value),
    Error { class: String, desc: String },
    TooLarge(usize),
    TooDeep(usize),
}

struct SrvCmd {
    /// The request it is (`RequestId::get`).
    id: u64,
    /// The id it carried on the wire.
    wire: u64,
    oob: bool,
    answered: bool,
}

/// The scripted server: it reads what the client writes and sends what the operations say.
struct Server {
    max_size: usize,
    max_depth: usize,
    auto_negotiate: bool,
    /// Everything the server sent; `out[..delivered]` was handed to the client.
    out: Vec<u8>,
    delivered: usize,
    /// Bytes the client accepted (handed over before it closed or saw EOF).
    accepted: usize,
    cmds: Vec<SrvCmd>,
    /// The replies sent per id, in order, with the offset where each ends.
    replies: BTreeMap<u64, Vec<(Expect, usize)>>,
    /// Events the client must output if it reads them: name and end offset.
    events: Vec<(String, usize)>,
    /// How each message over a limit was judged where it passed it. A request in flight then may
    /// have been failed so, without it being its reply: one whose id came later may be the
    /// reply to any in-band request (the client takes the oldest), and an event may look like
    /// one until it ends.
    crossings: Vec<Expect>,
    /// The id-less errors sent: each fails the oldest in-band request in flight, unless it
    /// continues a cascade (see the core's rule).
    idless: Vec<Expect>,
    /// Messages sent with an id but neither `return` nor `error`: each may answer (fail) the
    /// request holding that id.
    not_replies: usize,
    /// No junk that opens a value (which swallows later messages) was sent.
    framing_safe: bool,
}

const RETURNS: [&str; 8] = [
    "{}",
    r#"{"status": "running", "running": true}"#,
    "[1, 2, 3]",
    r#""a string with \"quotes\" and {braces}""#,
    "42",
    "null",
    r#"{"nested": {"a": [{"b": "}]"}]}}"#,
    r#"{"qemu": {"micro": 2, "minor": 0, "major": 10}, "package": "Debian 1:10.0.2"}"#,
];
const ERRORS: [(&str, &str); 3] = [
    ("GenericError", "JSON parse error, expecting value"),
    (
        "CommandNotFound",
        "The command no-such-command has not been found",
    ),
    ("DeviceNotFound", "Device 'x\"}' not found"),
];
const UNKNOWN_IDS: [&str; 12] = [
    "1099511627776",
    r#""str""#,
    "-1",
    "1.5",
    "null",
    r#"{"compound": ["id", 1500.0, null]}"#,
    "[1]",
    r#""1""#,
    "18446744073709551615",
    "18446744073709551616",
    "1e3",
    "0",
];
/// Canned events: the text, and whether the client must output it as an event.
const EVENTS: [(&str, bool); 8] = [
    (
        r#"{"timestamp": {"seconds": 1795648047, "microseconds": 84562}, "event": "STOP"}"#,
        true,
    ),
    (r#"{"event": "RESUME"}"#, true),
    (
        r#"{"timestamp": {"seconds": 1, "microseconds": 2}, "event": "JOB_STATUS_CHANGE", "data": {"status": "created", "id": "job0"}}"#,
        true,
    ),
    (
        r#"{"event": "SHUTDOWN", "data": {"guest": false, "reason": "host-qmp-quit"}, "timestamp": "bad"}"#,
        true,
    ),
    (r#"{"event": 5}"#, false),
    (r#"{"event": "X", "return": {}}"#, false),
    (
        r#"{"event": "DEEP", "data": [[[[[[[[[[[[[[[[]]]]]]]]]]]]]]]], "timestamp": {"seconds": -1, "microseconds": -1}}"#,
        true,
    ),
    (
        r#"{"event": "BIG", "data": {"blob": "0123456789012345678901234567890123456789012345678901234567890123456789012345678901234567890123456789012345678901234567890123456789012345678901234567890123456789012345678901234567890123456789"}}"#,
        true,
    ),
];
/// Junk: the bytes, and whether later messages still frame as they were sent.
const JUNK: [(&[u8], bool); 19] = [
    (b"\xff", true),
    (b"garbage\r\n", true),
    (b"[1, 2]\r\n", true),
    (b"\"str\"", true),
    (b"123 ", true),
    (b"{\"foo\": 1}\r\n", true),
    (b"{bad json}\r\n", true),
    (b"{\"a\": \"\xff\"}\r\n", true),
    (b"}", true),
    (b"]\\", true),
    (b"\r\n\r\n", true),
    (
        b"{\"QMP\": {\"version\": {\"qemu\": {\"micro\": 0, \"minor\": 0, \"major\": 1}, \"package\": \"\"}, \"capabilities\": []}}\r\n",
        true,
    ),
    (b"{\"id\": 5}\r\n", true),
    (b"{\"error\": \"not an object\"}\r\n", true),
    (b"{", false),
    (b"\"", false),
    (b"[", false),
    (b"{\"a\": \"", false),
    (b"\xff{\"event\"", false),
];

impl Server {
    /// Sends one message and returns how it fits the client's limits.
    fn send(&mut self, text: &[u8], pretty: bool) -> (Option<Expect>, usize) {
        let bytes = if pretty {
            let value: Value = serde_json::from_slice(text).expect("canned messages are JSON");
            render(&value, Style::Qemu)
        } else {
            text.to_vec()
        };
        let (_, depth) = lex_value(&bytes).expect("a message is one value");
        let size = bytes.len();
        let over = if depth > self.max_depth {
            Some(Expect::TooDeep(size))
        } else if size > self.max_size {
            Some(Expect::TooLarge(size))
        } else {
            None
        };
        match limit_crossing(&bytes, self.max_size, self.max_depth, false) {
            Some((true, at)) => self.crossings.push(Expect::TooDeep(at)),
            Some((false, at)) => self.crossings.push(Expect::TooLarge(at)),
            None => {}
        }
        self.out.extend_from_slice(&bytes);
        let end = self.out.len();
        self.out.extend_from_slice(b"\r\n");
        (over, end)
    }

    fn reply(&mut self, i: usize, kind: &ReplyKind, pretty: bool) {
        let cmd = &mut self.cmds[i];
        cmd.answered = true;
        let (id, wire) = (cmd.id, cmd.wire);
        let (text, expect) = match kind {
            ReplyKind::Return(n) => {
                let ret = RETURNS[usize::from(*n) % RETURNS.len()];
                let value: Value = serde_json::from_str(ret).expect("canned returns are JSON");
                (
                    format!(r#"{{"return": {ret}, "id": {wire}}}"#),
                    Expect::Return(value),
                )
            }
            ReplyKind::Error(n) => {
                let (class, desc) = ERRORS[usize::from(*n) % ERRORS.len()];
                let error = json!({"class": class, "desc": desc});
                (
                    format!(r#"{{"id": {wire}, "error": {error}}}"#),
                    Expect::Error {
                        class: class.into(),
                        desc: desc.into(),
                    },
                )
            }
            ReplyKind::TooLarge => {
                let blob = "x".repeat(self.max_size);
                (
                    format!(r#"{{"return": {{"blob": "{blob}"}}, "id": {wire}}}"#),
                    Expect::TooLarge(0),
                )
            }
            ReplyKind::TooDeep => {
                let deep = format!(
                    "{}{}",
                    "[".repeat(self.max_depth),
                    "]".repeat(self.max_depth)
                );
                (
                    format!(r#"{{"id": {wire}, "return": {deep}}}"#),
                    Expect::TooDeep(0),
                )
            }
        };
        let (over, end) = self.send(text.as_bytes(), pretty);
        let expect = over.unwrap_or(expect);
        assert!(
            !matches!(expect, Expect::TooLarge(0) | Expect::TooDeep(0)),
            "the harness built an oversized reply that fits"
        );
        self.replies.entry(id).or_default().push((expect, end));
    }

    /// Reads what the client wrote; answers `qmp_capabilities` at once if so scripted.
    fn on_commands(&mut self, cmds: Vec<WrittenCommand>) {
        for cmd in cmds {
            self.cmds.push(SrvCmd {
                id: cmd.id,
                wire: cmd.wire,
                oob: cmd.oob,
                answered: false,
            });
            if self.auto_negotiate && cmd.name == "qmp_capabilities" {
                let i = self.cmds.len() - 1;
                self.reply(i, &ReplyKind::Return(0), false);
            }
        }
    }
}

/// Target 4, model-based operation sequences. Input: an `OpsHeader` (limits, whether the server
/// negotiates by itself, whether the adapter drains lazily, how the session ends), then `Op`s.
///
/// A scripted server reads what the client writes (checking it: valid JSON, unique ids that `send`
/// returned, fds marks, never a request cancelled before it was written, at most `max_in_flight`
/// in-band commands unanswered when OOB is on) and sends replies, duplicates, unknown ids, id-less
/// errors, events and junk as the operations say, delivered in any chunking. The `Tracker`
/// checks every output against the model of the pending table: exactly one outcome per request
/// that was not cancelled, none for cancelled ones or ids never returned by `send`, `TimedOut`
/// only at or after the deadline and always by the next drain after `handle_timeout` passes it,
/// `pending()` and `poll_timeout()` equal to the model's. At the end the outcomes are checked
/// against the server's replies, and, when the stream stayed well framed and the session ended by
/// EOF, every event and reply that was delivered must have come out.
pub fn connection_ops(data: &[u8]) {
    let _ = run_ops(data);
}

pub(crate) fn run_ops(data: &[u8]) -> Option<Summary> {
    let mut u = Unstructured::new(data);
    let h = OpsHeader::arbitrary(&mut u).ok()?;
    let config = h.config.config();
    let mut conn = Connection::new(config.clone());
    let mut t = Tracker::new(config.clone());
    t.check_queue = !h.lazy;
    let mut wire = Wire::default();
    let mut server = Server {
        max_size: config.max_message_size(),
        max_depth: config.max_depth(),
        auto_negotiate: h.auto_negotiate,
        out: Vec::new(),
        delivered: 0,
        accepted: 0,
        cmds: Vec::new(),
        replies: BTreeMap::new(),
        events: Vec::new(),
        crossings: Vec::new(),
        idless: Vec::new(),
        not_replies: 0,
        framing_safe: true,
    };
    let base = Instant::now();
    let mut now = base;
    // Requests cancelled before they were written: the server must never see them.
    let mut never_written = BTreeSet::new();
    // Once the application negotiates by itself, OOB may start mid-session and the window check
    // no longer applies to commands written before.
    let mut own_negotiation = false;

    for _ in 0..512 {
        if u.is_empty() {
            break;
        }
        let Ok(op) = Op::arbitrary(&mut u) else {
            break;
        };
        match op {
            Op::Send {
                cmd,
                oob,
                fds,
                deadline_ms,
                size,
            } => {
                let deadline = deadline_ms.map(|ms| now + Duration::from_millis(u64::from(ms)));
                let mut command = match cmd % 9 {
                    0 => Command::new("query-status"),
                    1 => Command::new("stop"),
                    2 => Command::new("cont"),
                    3 => Command::new("query-version"),
                    4 => Command::new("qmp_capabilities")
                        .arguments(&json!({"enable": ["oob"]}))
                        .expect("an object"),
                    5 => Command::new("qmp_capabilities"),
                    6 => Command::new("x-big")
                        .arguments(&json!({"data": "x".repeat(usize::from(size) % 8192)}))
                        .expect("an object"),
                    7 => Command::new("say \"hi\" é\n{"),
                    _ => Command::from_json(
                        json!({"execute": "query-status", "control": {"run-oob": true}}),
                    )
                    .expect("a command"),
                };
                if cmd % 9 == 4 || cmd % 9 == 5 {
                    own_negotiation = true;
                }
                if oob {
                    command = command.oob();
                }
                if fds {
                    command = command.with_fds();
                }
                if let Some(at) = deadline {
                    command = command.deadline(at);
                }
                // `cmd % 9` picks the command: a higher bit picks the reply's form.
                if cmd / 9 % 2 == 1 {
                    command = command.decode_value();
                }
                let info = CmdInfo { oob, fds, deadline };
                let _ = t.send(&mut conn, command, info);
            }
            Op::Cancel { which } => {
                if t.sent.is_empty() {
                    continue;
                }
                let ids: Vec<u64> = t.sent.keys().copied().collect();
                let id = ids[usize::from(which) % ids.len()];
                let written = written_ids(&conn, &t, &wire);
                // The peek shows the whole transmit buffer unless an fds mark cuts it short.
                let whole_view = t
                    .sent
                    .values()
                    .filter(|r| r.fds)
                    .all(|r| wire.has_seen(r.id.get()) || never_written.contains(&r.id.get()));
                let was_open = t.sent[&id].is_open();
                t.cancel(&mut conn, id);
                let cancelled = was_open && t.sent[&id].cancelled;
                if cancelled && whole_view && !written.contains(&id) {
                    never_written.insert(id);
                }
            }
            Op::Advance { ms } => {
                now += Duration::from_millis(u64::from(ms));
                t.timeout(&mut conn, now);
            }
            Op::TimeoutEarly { back_ms } => {
                let at = now
                    .checked_sub(Duration::from_millis(u64::from(back_ms)))
                    .unwrap_or(base)
                    .max(base);
                t.timeout(&mut conn, at);
            }
            Op::Write {
                max,
                acknowledge_more,
            } => {
                let got = wire.write(&mut conn, usize::from(max), acknowledge_more, &t);
                receive(&mut server, got, &never_written);
            }
            Op::WriteAll => {
                let got = wire.write_all(&mut conn, &t);
                receive(&mut server, got, &never_written);
            }
            Op::Greet { style } => {
                let greeting: &[u8] = match style % 4 {
                    0 | 1 => crate::conn::GREETING,
                    2 => br#"{"QMP": {"version": {"qemu": {"micro": 22, "minor": 2, "major": 7}, "package": ""}, "capabilities": []}}"#,
                    _ => br#"{"QMP": {"version": "10.0"}}"#,
                };
                server.send(greeting, style % 4 == 1);
            }
            Op::Reply { k, kind, pretty } => {
                let open: Vec<usize> = (0..server.cmds.len())
                    .filter(|&i| !server.cmds[i].answered)
                    .collect();
                if !open.is_empty() {
                    server.reply(open[usize::from(k) % open.len()], &kind, pretty);
                }
            }
            Op::Duplicate { k, pretty } => {
                // Wire ids are never reused, so a second reply must come out unmatched. Only
                // send one whose fate is certain:
                // everything before it read, no junk that could swallow it and let it resurface
                // later, its id held by nobody, delivered at once into an empty output queue
                // (expiries can fill the queue without pausing input, which would leave it unread
                // until some later command holds the id). It must come out unmatched once the
                // outputs before it are taken.
                let done: Vec<usize> = (0..server.cmds.len())
                    .filter(|&i| server.cmds[i].answered)
                    .collect();
                let settled = server.framing_safe
                    && server.delivered == server.out.len()
                    && conn.wants_read()
                    && !conn.is_closed()
                    && !t.eof;
                if !done.is_empty() && settled {
                    let i = done[usize::from(k) % done.len()];
                    let wire = server.cmds[i].wire;
                    // Id 0 is the handshake's: while it is under way, a reply with it is the
                    // handshake's answer, however many were sent.
                    let negotiating = wire == 0 && conn.state() != qmp_proto::State::Ready;
                    if !negotiating && request_of_wire(&conn, &t, wire).is_none() {
                        t.drain(&mut conn, None);
                        server.reply(i, &ReplyKind::Return(0), pretty);
                        let n = server.out.len() - server.delivered;
                        let unmatched = conn.stats().unmatched;
                        deliver(&mut t, &mut conn, &mut server, n);
                        // Junk read before it (reported when the reply's `{` ends it) may have
                        // filled a one-output queue first: take outputs until the reply is read.
                        for _ in 0..4 {
                            if conn.stats().unmatched > unmatched {
                                break;
                            }
                            t.drain(&mut conn, None);
                        }
                        assert_eq!(
                            conn.stats().unmatched,
                            unmatched + 1,
                            "a second reply to a free wire id was not reported unmatched"
                        );
                    }
                }
            }
            Op::UnknownId { which, error } => {
                let id = UNKNOWN_IDS[usize::from(which) % UNKNOWN_IDS.len()];
                let text = if error {
                    format!(r#"{{"error": {{"class": "GenericError", "desc": "?"}}, "id": {id}}}"#)
                } else {
                    format!(r#"{{"return": {{}}, "id": {id}}}"#)
                };
                server.send(text.as_bytes(), false);
            }
            Op::IdlessError { pretty } => {
                let text = br#"{"error": {"class": "GenericError", "desc": "JSON parse error, expecting value"}}"#;
                server.send(text, pretty);
                server.idless.push(Expect::Error {
                    class: "GenericError".into(),
                    desc: "JSON parse error, expecting value".into(),
                });
            }
            Op::Event { which, pretty } => {
                let (text, real) = EVENTS[usize::from(which) % EVENTS.len()];
                let (over, end) = server.send(text.as_bytes(), pretty);
                if real && over.is_none() {
                    let value: Value = serde_json::from_str(text).expect("canned events are JSON");
                    let name = value["event"].as_str().expect("a named event").to_owned();
                    server.events.push((name, end));
                }
            }
            Op::Junk { which } => {
                let (bytes, safe) = JUNK[usize::from(which) % JUNK.len()];
                server.out.extend_from_slice(bytes);
                // An id-less error among the junk answers a request like any other, and so does
                // an object with an id but neither `return` nor `error`.
                if let Ok(Value::Object(m)) = serde_json::from_slice::<Value>(bytes) {
                    let reply = ["return", "error", "event"]
                        .iter()
                        .any(|k| m.contains_key(*k));
                    if m.contains_key("id") && !reply {
                        server.not_replies += 1;
                    }
                    if let (Some(error), None) = (m.get("error"), m.get("id")) {
                        let field = |k: &str| error[k].as_str().unwrap_or_default().to_owned();
                        server.idless.push(match error {
                            Value::Object(_) => Expect::Error {
                                class: field("class"),
                                desc: field("desc"),
                            },
                            other => Expect::Error {
                                class: String::new(),
                                desc: other.to_string(),
                            },
                        });
                    }
                }
                server.framing_safe &= safe;
            }
            Op::Deliver { max, force } => {
                if h.lazy && !force {
                    t.make_room(&mut conn);
                }
                let n = usize::from(max)
                    .max(1)
                    .min(server.out.len() - server.delivered);
                deliver(&mut t, &mut conn, &mut server, n);
            }
            Op::DeliverAll => {
                if h.lazy {
                    t.make_room(&mut conn);
                }
                let n = server.out.len() - server.delivered;
                deliver(&mut t, &mut conn, &mut server, n);
            }
            Op::Drain { n } => {
                if h.lazy {
                    t.drain(&mut conn, (n != 0).then_some(usize::from(n)));
                }
            }
            Op::Eof => t.eof(&mut conn),
            Op::Close => {
                conn.close();
                t.observe(&conn);
            }
        }
        if !h.lazy {
            t.drain(&mut conn, None);
        }
        if config.negotiate() && !own_negotiation && conn.oob_enabled() {
            let unanswered = server
                .cmds
                .iter()
                .filter(|c| !c.oob && c.id != 0 && !c.answered);
            // Each id-less error, or message with an id but no reply in it, that the server sent
            // may have answered one of them, for the client.
            let freed = server.idless.len() + server.not_replies;
            let n = unanswered.count().saturating_sub(freed);
            assert!(
                n <= config.max_in_flight(),
                "{n} in-band commands in flight at the server; max_in_flight {}",
                config.max_in_flight()
            );
        }
    }
    let summary = t.finish(&mut conn, h.end_by_eof);
    check_against_server(&t, &server);
    Some(summary)
}

fn deliver(t: &mut Tracker, conn: &mut Connection, server: &mut Server, n: usize) {
    if n == 0 {
        return;
    }
    let accepted = !conn.is_closed() && !t.eof;
    let range = server.delivered..server.delivered + n;
    t.input(conn, &server.out[range]);
    server.delivered += n;
    if accepted {
        server.accepted = server.delivered;
    }
}

fn receive(server: &mut Server, cmds: Vec<WrittenCommand>, never_written: &BTreeSet<u64>) {
    for cmd in &cmds {
        assert!(
            !never_written.contains(&cmd.id),
            "request {} was cancelled before it was written, and written anyway",
            cmd.id
        );
    }
    server.on_commands(cmds);
}

/// Ids of the commands already in the transmit buffer or on the wire, as far as one peek shows.
fn written_ids(conn: &Connection, t: &Tracker, wire: &Wire) -> BTreeSet<u64> {
    let mut bytes = wire.unread().to_vec();
    if let Some(t) = conn.poll_transmit() {
        bytes.extend_from_slice(t.data);
    }
    // Commands are written back to back; the view may end inside one.
    serde_json::Deserializer::from_slice(&bytes)
        .into_iter::<Value>()
        .map_while(Result::ok)
        .filter_map(|v| v.get("id").and_then(Value::as_u64))
        .filter_map(|w| request_of_wire(conn, t, w))
        .chain(wire.seen_ids())
        .collect()
}

/// The outcomes against the replies the server sent, once the session is over.
fn check_against_server(t: &Tracker, server: &Server) {
    if !server.framing_safe {
        return;
    }
    let by_eof = matches!(
        t.closed,
        Some(
            CloseReason::PeerClosed
                | CloseReason::Protocol(
                    ProtocolError::UnexpectedEof { .. } | ProtocolError::EofDuringHandshake
                )
        )
    );
    for (id, req) in &t.sent {
        let first = server.replies.get(id).and_then(|r| r.first());
        let Some(outcome) = &req.outcome else {
            continue;
        };
        let got = match outcome {
            Ok(raw) => Expect::Return(raw.to_value().expect("a return value parses")),
            Err(CommandError::Qmp(e)) => Expect::Error {
                class: e.class.clone(),
                desc: e.desc.clone(),
            },
            Err(CommandError::ResponseTooLarge { size }) => Expect::TooLarge(*size),
            Err(CommandError::ResponseTooDeep { size }) => Expect::TooDeep(*size),
            Err(CommandError::Closed) => {
                if by_eof {
                    let delivered = server
                        .replies
                        .get(id)
                        .is_some_and(|r| r.iter().any(|&(_, end)| end <= server.accepted));
                    assert!(
                        !delivered,
                        "request {id} closed though its reply was delivered"
                    );
                }
                continue;
            }
            Err(_) => continue,
        };
        // Failed where a message passed a limit (its own reply, or one it was taken for), or by
        // an id-less error.
        if server.crossings.contains(&got) || server.idless.contains(&got) {
            continue;
        }
        let (want, end) = first.unwrap_or_else(|| panic!("request {id}: {got:?} without a reply"));
        assert!(
            *end <= server.accepted,
            "request {id} answered by undelivered bytes"
        );
        assert_eq!(
            &got, want,
            "request {id} got another outcome than the server's reply"
        );
    }
    if by_eof {
        let want: Vec<&str> = server
            .events
            .iter()
            .filter(|&&(_, end)| end <= server.accepted)
            .map(|(name, _)| name.as_str())
            .collect();
        assert_eq!(t.events, want, "events lost or invented");
    }
}

#[cfg(test)]
pub(crate) mod encode {
    //! Writes inputs that [`Op::arbitrary`] reads back, to build seeds.
    use super::*;

    /// The `u32` that the derive turns into variant `k` of `n`.
    pub(crate) fn variant(out: &mut Vec<u8>, k: u64, n: u64) {
        let x = (k << 32).div_ceil(n);
        out.extend_from_slice(&(x as u32).to_le_bytes());
    }

    pub(crate) fn config(out: &mut Vec<u8>, c: &FuzzConfig) {
        out.extend_from_slice(&c.max_message_size.to_le_bytes());
        out.extend_from_slice(&[c.max_depth, c.max_pending, c.max_in_flight]);
        out.push(c.max_buffered_outputs);
        out.extend_from_slice(&c.max_command_size.to_le_bytes());
        out.extend_from_slice(&[u8::from(c.enable_oob), u8::from(c.negotiate)]);
    }

    pub(crate) fn header(out: &mut Vec<u8>, h: &OpsHeader) {
        config(out, &h.config);
        out.extend_from_slice(&[
            u8::from(h.auto_negotiate),
            u8::from(h.lazy),
            u8::from(h.end_by_eof),
        ]);
    }

    const OPS: u64 = 18;

    pub(crate) fn op(out: &mut Vec<u8>, op: &Op) {
        let b = |v: bool| u8::from(v);
        match op {
            Op::Send {
                cmd,
                oob,
                fds,
                deadline_ms,
                size,
            } => {
                variant(out, 0, OPS);
                out.extend_from_slice(&[*cmd, b(*oob), b(*fds), b(deadline_ms.is_some())]);
                if let Some(ms) = deadline_ms {
                    out.extend_from_slice(&ms.to_le_bytes());
                }
                out.extend_from_slice(&size.to_le_bytes());
            }
            Op::Cancel { which } => {
                variant(out, 1, OPS);
                out.push(*which);
            }
            Op::Advance { ms } => {
                variant(out, 2, OPS);
                out.extend_from_slice(&ms.to_le_bytes());
            }
            Op::TimeoutEarly { back_ms } => {
                variant(out, 3, OPS);
                out.extend_from_slice(&back_ms.to_le_bytes());
            }
            Op::Write {
                max,
                acknowledge_more,
            } => {
                variant(out, 4, OPS);
                out.extend_from_slice(&max.to_le_bytes());
                out.push(b(*acknowledge_more));
            }
            Op::WriteAll => variant(out, 5, OPS),
            Op::Greet { style } => {
                variant(out, 6, OPS);
                out.push(*style);
            }
            Op::Reply { k, kind, pretty } => {
                variant(out, 7, OPS);
                out.push(*k);
                match kind {
                    ReplyKind::Return(n) => {
                        variant(out, 0, 4);
                        out.push(*n);
                    }
                    ReplyKind::Error(n) => {
                        variant(out, 1, 4);
                        out.push(*n);
                    }
                    ReplyKind::TooLarge => variant(out, 2, 4),
                    ReplyKind::TooDeep => variant(out, 3, 4),
                }
                out.push(b(*pretty));
            }
            Op::Duplicate { k, pretty } => {
                variant(out, 8, OPS);
                out.extend_from_slice(&[*k, b(*pretty)]);
            }
            Op::UnknownId { which, error } => {
                variant(out, 9, OPS);
                out.extend_from_slice(&[*which, b(*error)]);
            }
            Op::IdlessError { pretty } => {
                variant(out, 10, OPS);
                out.push(b(*pretty));
            }
            Op::Event { which, pretty } => {
                variant(out, 11, OPS);
                out.extend_from_slice(&[*which, b(*pretty)]);
            }
            Op::Junk { which } => {
                variant(out, 12, OPS);
                out.push(*which);
            }
            Op::Deliver { max, force } => {
                variant(out, 13, OPS);
                out.extend_from_slice(&max.to_le_bytes());
                out.push(b(*force));
            }
            Op::DeliverAll => variant(out, 14, OPS),
            Op::Drain { n } => {
                variant(out, 15, OPS);
                out.push(*n);
            }
            Op::Eof => variant(out, 16, OPS),
            Op::Close => variant(out, 17, OPS),
        }
    }

    #[test]
    fn encoded_ops_read_back() {
        let ops = vec![
            Op::Send {
                cmd: 3,
                oob: true,
                fds: false,
                deadline_ms: Some(500),
                size: 7,
            },
            Op::Send {
                cmd: 1,
                oob: false,
                fds: true,
                deadline_ms: None,
                size: 0,
            },
            Op::Cancel { which: 9 },
            Op::Advance { ms: 1000 },
            Op::TimeoutEarly { back_ms: 3 },
            Op::Write {
                max: 17,
                acknowledge_more: true,
            },
            Op::WriteAll,
            Op::Greet { style: 1 },
            Op::Reply {
                k: 2,
                kind: ReplyKind::Error(1),
                pretty: true,
            },
            Op::Reply {
                k: 0,
                kind: ReplyKind::TooDeep,
                pretty: false,
            },
            Op::Duplicate { k: 1, pretty: true },
            Op::UnknownId {
                which: 5,
                error: true,
            },
            Op::IdlessError { pretty: false },
            Op::Event {
                which: 3,
                pretty: true,
            },
            Op::Junk { which: 14 },
            Op::Deliver {
                max: 300,
                force: true,
            },
            Op::DeliverAll,
            Op::Drain { n: 0 },
            Op::Eof,
            Op::Close,
        ];
        let mut bytes = Vec::new();
        for o in &ops {
            op(&mut bytes, o);
        }
        let mut u = Unstructured::new(&bytes);
        let back: Vec<Op> = std::iter::from_fn(|| {
            (!u.is_empty()).then(|| Op::arbitrary(&mut u).expect("reads back"))
        })
        .collect();
        assert_eq!(back, ops);
    }
}
