//! Commands to send, and the ids that name them.

use std::fmt;
use std::time::Instant;

use serde::Serialize;
use serde_json::{Map, Value};

use crate::error::ArgumentsError;

/// QEMU's nesting limit for a whole message (`MAX_NESTING` in `qobject/json-streamer.c`).
const QEMU_MAX_NESTING: usize = 1024;
/// QEMU's token limit for a whole message (`MAX_TOKEN_COUNT`).
const QEMU_MAX_TOKENS: usize = 2 << 20;
/// Depth and tokens the command wrapper around the arguments uses.
const WRAPPER_DEPTH: usize = 1;
const WRAPPER_TOKENS: usize = 16;

/// Names one request on one connection. Ids are assigned by
/// [`Connection::send`](crate::Connection::send), unique and never reused, and cannot be forged:
/// there is no public constructor.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct RequestId(pub(crate) u64);

impl RequestId {
    /// The number identifying the request on this connection, counting from 1: the `id` it
    /// carries on the wire once written (see [`Connection::wire_id`](crate::Connection::wire_id)).
    pub fn get(self) -> u64 {
        self.0
    }
}

impl fmt::Debug for RequestId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "#{}", self.0)
    }
}

impl fmt::Display for RequestId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// A command ready to send: `{"execute": name, "arguments": {...}}`.
///
/// Arguments are serialized when attached, so a bad argument is an error here and never half a
/// command on the wire.
///
/// ```
/// use qmp_proto::Command;
/// use serde_json::json;
///
/// let cmd = Command::new("blockdev-add")
///     .arguments(&json!({"driver": "null-co", "node-name": "n0"}))?;
/// assert_eq!(cmd.name(), "blockdev-add");
///
/// // Arguments must be an object, as QMP requires.
/// assert!(Command::new("stop").arguments(&[1, 2]).is_err());
/// # Ok::<(), qmp_proto::ArgumentsError>(())
/// ```
#[derive(Clone)]
#[must_use = "a command does nothing until it is sent"]
pub struct Command {
    /// One buffer for everything variable: the name (UTF-8, not yet quoted), then if any
    /// `,"arguments":<object>`, then a raw command's other members as `,"key":value,...`. One
    /// allocation, and a small struct: a command is moved four times between its caller and the
    /// socket, and every 16 bytes more made pipelined commands about 3% slower.
    text: Box<[u8]>,
    /// Where the name ends in `text`.
    name_end: usize,
    /// Where `,"arguments":<object>` ends (`name_end` when there are none).
    arguments_end: usize,
    deadline: Option<Instant>,
    oob: bool,
    fds: bool,
    no_reply: bool,
    value: bool,
}

/// What goes between a command's name and its arguments object.
const ARGUMENTS_KEY: &[u8] = b",\"arguments\":";

impl fmt::Debug for Command {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Arguments can carry secrets (passwords, keys): never print them.
        f.debug_struct("Command")
            .field("name", &self.name())
            .field("arguments", &self.arguments_json().map(<[u8]>::len))
            .field("oob", &self.oob)
            .field("deadline", &self.deadline)
            .field("fds", &self.fds)
            .field("no_reply", &self.no_reply)
            .field("value", &self.value)
            .finish()
    }
}

impl Command {
    /// A command with no arguments.
    pub fn new(name: impl Into<String>) -> Self {
        let text = name.into().into_bytes().into_boxed_slice();
        Self {
            name_end: text.len(),
            arguments_end: text.len(),
            text,
            oob: false,
            deadline: None,
            fds: false,
            no_reply: false,
            value: false,
        }
    }

    /// Attaches arguments, which must serialize to a JSON object and stay within QEMU's input
    /// limits (1024 levels of nesting, 2 Mi tokens). Arguments that serialize to `null` (`()`,
    /// `None`) mean none.
    pub fn arguments<T: Serialize + ?Sized>(
        mut self,
        arguments: &T,
    ) -> Result<Self, ArgumentsError> {
        // `()` (the common "no arguments") without allocating: zero-sized values serialize to a
        // few bytes at most, so try those in a small buffer first.
        if size_of_val(arguments) == 0 {
            let mut small = SmallBuf::default();
            if serde_json::to_writer(&mut small, arguments).is_ok() && small.get() == b"null" {
                self.set_arguments(None);
                return Ok(self);
            }
        }
        let bytes = serde_json::to_vec(arguments)?;
        if bytes == b"null" {
            self.set_arguments(None);
            return Ok(self);
        }
        check_arguments(&bytes)?;
        self.set_arguments(Some(&bytes));
        Ok(self)
    }

    /// Replaces the arguments object (checked) in `text`, keeping the name and other members.
    fn set_arguments(&mut self, arguments: Option<&[u8]>) {
        if arguments.is_none() && self.arguments_end == self.name_end {
            return;
        }
        let (name, rest) = self.text.split_at(self.name_end);
        let extra = rest
            .get(self.arguments_end - self.name_end..)
            .unwrap_or_default();
        let added = arguments.map_or(0, |a| ARGUMENTS_KEY.len() + a.len());
        let mut text = Vec::with_capacity(name.len() + added + extra.len());
        text.extend_from_slice(name);
        if let Some(arguments) = arguments {
            text.extend_from_slice(ARGUMENTS_KEY);
            text.extend_from_slice(arguments);
        }
        self.arguments_end = text.len();
        text.extend_from_slice(extra);
        self.text = text.into_boxed_slice();
    }

    /// The serialized arguments object, if any.
    fn arguments_json(&self) -> Option<&[u8]> {
        self.text
            .get(self.name_end + ARGUMENTS_KEY.len()..self.arguments_end)
            .filter(|a| !a.is_empty())
    }

    /// A pre-built command object, sent as given (`execute` or `exec-oob`, `arguments`, and any
    /// other members) except for `id`, which the connection assigns so the response can be matched.
    ///
    /// ```
    /// let cmd = qmp_proto::Command::from_json(serde_json::json!(
    ///     {"exec-oob": "migrate-pause", "id": "ignored"}
    /// ))?;
    /// assert!(cmd.is_oob());
    /// # Ok::<(), qmp_proto::ArgumentsError>(())
    /// ```
    pub fn from_json(value: Value) -> Result<Self, ArgumentsError> {
        let Value::Object(mut object) = value else {
            return Err(ArgumentsError::NotAnObject);
        };
        let (name, oob) = match (object.remove("execute"), object.remove("exec-oob")) {
            (Some(Value::String(name)), None) => (name, false),
            (None, Some(Value::String(name))) => (name, true),
            _ => return Err(ArgumentsError::NotACommand),
        };
        object.remove("id");
        let mut cmd = Self::new(name);
        cmd.oob = oob;
        if let Some(arguments) = object.remove("arguments") {
            if !arguments.is_object() {
                return Err(ArgumentsError::NotAnObject);
            }
            cmd = cmd.arguments(&arguments)?;
        }
        if !object.is_empty() {
            let bytes = serde_json::to_vec(&object)?;
            check_arguments(&bytes)?;
            // QEMU's token limit is for the whole command: the arguments' tokens count too, or
            // two parts each under it would earn a cascade of id-less errors together.
            let tokens = measure(&bytes).1 + cmd.arguments_json().map_or(0, |a| measure(a).1);
            let limit = QEMU_MAX_TOKENS - WRAPPER_TOKENS;
            if tokens > limit {
                return Err(ArgumentsError::TooManyTokens { tokens, limit });
            }
            // Keep the members without their braces, to splice into the command object.
            let mut text = Vec::from(std::mem::take(&mut cmd.text));
            text.push(b',');
            text.extend_from_slice(&bytes[1..bytes.len() - 1]);
            cmd.text = text.into_boxed_slice();
        }
        Ok(cmd)
    }

    /// Sends the command out of band (`exec-oob`): it may overtake in-band commands and its
    /// response may arrive out of order. Only for commands QEMU marks `allow-oob`, and only once
    /// OOB is negotiated.
    pub fn oob(mut self) -> Self {
        self.oob = true;
        self
    }

    /// Fails the request with [`CommandError::TimedOut`](crate::CommandError::TimedOut) if no
    /// response has arrived by `at` (checked in
    /// [`Connection::handle_timeout`](crate::Connection::handle_timeout)).
    pub fn deadline(mut self, at: Instant) -> Self {
        self.deadline = Some(at);
        self
    }

    /// Marks the command as carrying file descriptors. Its bytes then start a
    /// [`Transmit`](crate::Transmit) of their own whose
    /// [`fds_for`](crate::Transmit::fds_for) names it, so an adapter can send the descriptors
    /// (`SCM_RIGHTS`) with exactly this command's first byte.
    pub fn with_fds(mut self) -> Self {
        self.fds = true;
        self
    }

    /// Marks a command that sends no response when it succeeds, as the guest agent's
    /// `guest-shutdown` and `guest-suspend-*` (see [`NO_SUCCESS_RESPONSE`](crate::NO_SUCCESS_RESPONSE);
    /// on a guest-agent connection those are marked automatically). An error response still
    /// fails it as usual. If the connection closes first, or nothing arrives by its
    /// [`deadline`](Self::deadline), it completes with
    /// [`CommandError::NoReply`](crate::CommandError::NoReply): the documented success. Without a
    /// deadline it waits for the connection to close.
    pub fn no_reply(mut self) -> Self {
        self.no_reply = true;
        self
    }

    /// Asks for the return value as a [`serde_json::Value`], built straight from the input
    /// buffer: a successful response then arrives as [`Output::Value`](crate::Output::Value)
    /// instead of an [`Output::Response`](crate::Output::Response) holding a copy of its text.
    ///
    /// For large replies this is much more than the saved copy: a fresh multi-megabyte
    /// allocation per reply makes glibc return the heap to the system after the caller drops the
    /// `Value`, so every reply faults its memory in again (measured: 8 times the page faults and
    /// 1.5 times the time on 10 MB replies). A return value that `Value` cannot hold (a number
    /// such as `1e400`) still arrives as text, in an `Output::Response`.
    pub fn decode_value(mut self) -> Self {
        self.value = true;
        self
    }

    /// Whether the command asked for [`decode_value`](Self::decode_value).
    pub fn is_decode_value(&self) -> bool {
        self.value
    }

    /// Whether the command was marked [`no_reply`](Self::no_reply).
    pub fn is_no_reply(&self) -> bool {
        self.no_reply
    }

    /// The command name.
    pub fn name(&self) -> &str {
        // It went in as a `str`, whole.
        std::str::from_utf8(self.name_bytes()).unwrap_or_default()
    }

    fn name_bytes(&self) -> &[u8] {
        self.text.get(..self.name_end).unwrap_or_default()
    }

    /// Whether the command is sent out of band.
    pub fn is_oob(&self) -> bool {
        self.oob
    }

    /// Whether the command carries file descriptors.
    pub fn has_fds(&self) -> bool {
        self.fds
    }

    pub(crate) fn deadline_at(&self) -> Option<Instant> {
        self.deadline
    }

    /// True for a `qmp_capabilities` that asks for OOB (for callers that negotiate themselves).
    pub(crate) fn enables_oob(&self) -> bool {
        if self.name_bytes() != b"qmp_capabilities" {
            return false;
        }
        let Some(arguments) = self.arguments_json() else {
            return false;
        };
        serde_json::from_slice::<Map<String, Value>>(arguments)
            .ok()
            .and_then(|a| a.get("enable").and_then(Value::as_array).cloned())
            .is_some_and(|caps| caps.iter().any(|c| c == "oob"))
    }

    /// Room for the wire form, to serialize it without reallocating.
    pub(crate) fn wire_capacity(&self) -> usize {
        // {"exec-oob":"<name>","arguments":<args>,<extra>,"id":<20 digits>}
        16 + self.name_end * 6 / 5 + (self.text.len() - self.name_end) + 28
    }

    /// Writes `{"execute":...` up to where the id goes; [`end_with_id`] finishes it.
    pub(crate) fn write_body(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(if self.oob {
            b"{\"exec-oob\":"
        } else {
            b"{\"execute\":"
        });
        let name = self.name_bytes();
        if name
            .iter()
            .all(|&b| b >= 0x20 && b != b'"' && b != b'\\' && b < 0x7f)
        {
            out.push(b'"');
            out.extend_from_slice(name);
            out.push(b'"');
        } else {
            // serde_json escapes control characters and quotes; serializing a str cannot fail.
            let _ = serde_json::to_writer(&mut *out, self.name());
        }
        out.extend_from_slice(self.text.get(self.name_end..).unwrap_or_default());
    }
}

/// Ends a command written by [`Command::write_body`] with `,"id":<wire>}\n`. QEMU's parser needs
/// no newline (it ends a command at its closing brace), but line-based peers and logs do, and it
/// costs QEMU one more one-byte read.
pub(crate) fn end_with_id(wire: u64, out: &mut Vec<u8>) {
    // By hand: `write!` through `fmt` cost more than the rest of writing a command.
    let mut digits = [0u8; 20];
    let mut at = digits.len();
    let mut n = wire;
    loop {
        at -= 1;
        digits[at] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    out.extend_from_slice(b",\"id\":");
    out.extend_from_slice(&digits[at..]);
    out.extend_from_slice(b"}\n");
}

/// Bytes [`end_with_id`] adds for wire id `max`, and for every smaller one.
pub(crate) fn id_tail_len(max: u64) -> usize {
    9 + max.checked_ilog10().unwrap_or(0) as usize
}

/// A few bytes of output, for serializing zero-sized values; more fails the write.
#[derive(Default)]
struct SmallBuf {
    buf: [u8; 8],
    len: usize,
}

impl SmallBuf {
    fn get(&self) -> &[u8] {
        &self.buf[..self.len]
    }
}

impl std::io::Write for SmallBuf {
    fn write(&mut self, data: &[u8]) -> std::io::Result<usize> {
        let end = self.len + data.len();
        let room = self
            .buf
            .get_mut(self.len..end)
            .ok_or(std::io::ErrorKind::WriteZero)?;
        room.copy_from_slice(data);
        self.len = end;
        Ok(data.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Checks serialized arguments: an object within QEMU's nesting and token limits.
fn check_arguments(bytes: &[u8]) -> Result<(), ArgumentsError> {
    if bytes.first() != Some(&b'{') {
        return Err(ArgumentsError::NotAnObject);
    }
    let (depth, tokens) = measure(bytes);
    let depth_limit = QEMU_MAX_NESTING - WRAPPER_DEPTH;
    if depth > depth_limit {
        return Err(ArgumentsError::TooDeep {
            depth,
            limit: depth_limit,
        });
    }
    let token_limit = QEMU_MAX_TOKENS - WRAPPER_TOKENS;
    if tokens > token_limit {
        return Err(ArgumentsError::TooManyTokens {
            tokens,
            limit: token_limit,
        });
    }
    Ok(())
}

/// Maximum nesting depth and number of JSON tokens (as QEMU's lexer counts them) of valid JSON.
fn measure(json: &[u8]) -> (usize, usize) {
    let (mut depth, mut max_depth, mut tokens) = (0usize, 0usize, 0usize);
    let (mut in_string, mut escape, mut in_scalar) = (false, false, false);
    for &b in json {
        if in_string {
            if escape {
                escape = false;
            } else if b == b'\\' {
                escape = true;
            } else if b == b'"' {
                in_string = false;
            }
            continue;
        }
        match b {
            b'"' => {
                in_string = true;
                in_scalar = false;
                tokens += 1;
            }
            b'{' | b'[' => {
                depth += 1;
                max_depth = max_depth.max(depth);
                in_scalar = false;
                tokens += 1;
            }
            b'}' | b']' => {
                depth = depth.saturating_sub(1);
                in_scalar = false;
                tokens += 1;
            }
            b',' | b':' => {
                in_scalar = false;
                tokens += 1;
            }
            b' ' | b'\t' | b'\r' | b'\n' => in_scalar = false,
            _ => {
                if !in_scalar {
                    tokens += 1;
                    in_scalar = true;
                }
            }
        }
    }
    (max_depth, tokens)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn wire(cmd: &Command) -> String {
        let mut out = Vec::new();
        cmd.write_body(&mut out);
        String::from_utf8(out).unwrap()
    }

    #[test]
    fn zero_sized_arguments_are_none_or_what_they_serialize_to() {
        #[derive(Serialize)]
        struct Unit;
        #[derive(Serialize)]
        struct Empty {}
        /// Zero-sized, but longer than the small buffer.
        struct Long;
        impl Serialize for Long {
            fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.serialize_str("a string longer than eight bytes")
            }
        }
        let plain = r#"{"execute":"x""#;
        fn cmd<T: Serialize>(args: &T) -> Result<Command, ArgumentsError> {
            Command::new("x").arguments(args)
        }
        assert_eq!(wire(&cmd(&()).unwrap()), plain);
        assert_eq!(wire(&cmd(&Unit).unwrap()), plain);
        assert_eq!(wire(&cmd(&None::<Value>).unwrap()), plain);
        assert_eq!(
            wire(&cmd(&Empty {}).unwrap()),
            r#"{"execute":"x","arguments":{}"#
        );
        assert!(matches!(cmd(&Long), Err(ArgumentsError::NotAnObject)));
    }

    #[test]
    fn a_raw_command_is_within_the_token_limit_as_a_whole() {
        let half = Value::Array(vec![0.into(); (QEMU_MAX_TOKENS / 2 + 10) / 2]);
        let each = serde_json::json!({"execute": "x", "arguments": {"a": half}});
        assert!(Command::from_json(each.clone()).is_ok());
        let mut both = each;
        both["control"] = serde_json::json!({"b": half});
        assert!(matches!(
            Command::from_json(both),
            Err(ArgumentsError::TooManyTokens { tokens, .. }) if tokens > QEMU_MAX_TOKENS
        ));
    }

    #[test]
    fn measure_counts_depth_and_tokens() {
        assert_eq!(measure(br#"{}"#), (1, 2));
        assert_eq!(measure(br#"{"a":[1,true,"x\"y"]}"#), (2, 11));
        assert_eq!(measure(br#"{"a":{"b":{}}}"#), (3, 10));
    }

    #[test]
    fn wire_form_is_compact_and_escaped() {
        let mut out = Vec::new();
        Command::new("say \"hi\"")
            .arguments(&serde_json::json!({"k": 1}))
            .unwrap()
            .write_body(&mut out);
        end_with_id(7, &mut out);
        assert_eq!(
            out,
            b"{\"execute\":\"say \\\"hi\\\"\",\"arguments\":{\"k\":1},\"id\":7}\n"
        );
        let raw = Command::from_json(
            serde_json::json!({"exec-oob": "x", "control": {"a": 1}, "id": "no"}),
        )
        .unwrap();
        out.clear();
        raw.write_body(&mut out);
        end_with_id(1, &mut out);
        assert_eq!(
            out,
            b"{\"exec-oob\":\"x\",\"control\":{\"a\":1},\"id\":1}\n"
        );
        for max in [0, 1, 9, 10, 99, 100, 1023, u64::MAX] {
            out.clear();
            end_with_id(max, &mut out);
            assert_eq!(out, format!(",\"id\":{max}}}\n").as_bytes());
            assert_eq!(out.len(), id_tail_len(max), "{max}");
        }
    }

    /// Arguments replaced on a raw command: the other members stay, after the arguments.
    #[test]
    fn arguments_can_be_replaced_and_removed() {
        let body = |cmd: &Command| {
            let mut out = Vec::new();
            cmd.write_body(&mut out);
            String::from_utf8(out).unwrap()
        };
        let raw = Command::from_json(serde_json::json!(
            {"execute": "x", "arguments": {"a": 1}, "control": {"b": 2}}
        ))
        .unwrap();
        assert_eq!(
            body(&raw),
            r#"{"execute":"x","arguments":{"a":1},"control":{"b":2}"#
        );
        let raw = raw.arguments(&serde_json::json!({"c": 3})).unwrap();
        assert_eq!(
            body(&raw),
            r#"{"execute":"x","arguments":{"c":3},"control":{"b":2}"#
        );
        let raw = raw.arguments(&()).unwrap();
        assert_eq!(body(&raw), r#"{"execute":"x","control":{"b":2}"#);
        assert_eq!((raw.name(), raw.arguments_json()), ("x", None));
        let named = Command::new("ünï \"q\"")
            .arguments(
                &[("k", 1)]
                    .into_iter()
                    .collect::<std::collections::BTreeMap<_, _>>(),
            )
            .unwrap();
        assert_eq!(named.name(), "ünï \"q\"");
        assert_eq!(named.arguments_json(), Some(&br#"{"k":1}"#[..]));
        assert!(
            Command::new("qmp_capabilities")
                .arguments(&serde_json::json!({"enable": ["oob"]}))
                .unwrap()
                .enables_oob()
        );
        // Moved several times per command: keep it small.
        assert!(size_of::<Command>() <= 56, "{}", size_of::<Command>());
    }

    #[test]
    fn too_deep_arguments_are_refused() {
        let mut v = serde_json::json!({});
        for _ in 0..1100 {
            v = serde_json::json!({ "a": v });
        }
        // serde_json's own recursion limit is not involved in serializing.
        let err = Command::new("x").arguments(&v).unwrap_err();
        assert!(
            matches!(
                err,
                ArgumentsError::TooDeep {
                    depth: 1101,
                    limit: 1023
                }
            ),
            "{err:?}"
        );
    }
}
