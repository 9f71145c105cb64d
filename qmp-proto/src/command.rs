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
    /// The number identifying the request on this connection, counting from 1. It is not the
    /// `id` on the wire, which is a small number reused once free: see
    /// [`Connection::wire_id`](crate::Connection::wire_id).
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
    name: Box<str>,
    /// The serialized `arguments` object.
    arguments: Option<Box<[u8]>>,
    /// Further members of a raw command, serialized as `"key":value,...`.
    extra: Option<Box<[u8]>>,
    oob: bool,
    deadline: Option<Instant>,
    fds: bool,
    no_reply: bool,
    value: bool,
}

impl fmt::Debug for Command {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Arguments can carry secrets (passwords, keys): never print them.
        f.debug_struct("Command")
            .field("name", &self.name)
            .field("arguments", &self.arguments.as_ref().map(|a| a.len()))
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
        Self {
            name: name.into().into_boxed_str(),
            arguments: None,
            extra: None,
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
                self.arguments = None;
                return Ok(self);
            }
        }
        let bytes = serde_json::to_vec(arguments)?;
        if bytes == b"null" {
            self.arguments = None;
            return Ok(self);
        }
        check_arguments(&bytes)?;
        self.arguments = Some(bytes.into_boxed_slice());
        Ok(self)
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
            // Keep the members without their braces, to splice into the command object.
            cmd.extra = Some(bytes[1..bytes.len() - 1].into());
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
        &self.name
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
        if &*self.name != "qmp_capabilities" {
            return false;
        }
        let Some(arguments) = &self.arguments else {
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
        16 + self.name.len() * 6 / 5
            + self.arguments.as_ref().map_or(0, |a| 13 + a.len())
            + self.extra.as_ref().map_or(0, |e| 1 + e.len())
            + 28
    }

    /// Writes `{"execute":...` up to where the id goes; [`end_with_id`] finishes it.
    pub(crate) fn write_body(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(if self.oob {
            b"{\"exec-oob\":"
        } else {
            b"{\"execute\":"
        });
        write_json_string(&self.name, out);
        if let Some(arguments) = &self.arguments {
            out.extend_from_slice(b",\"arguments\":");
            out.extend_from_slice(arguments);
        }
        if let Some(extra) = &self.extra {
            out.push(b',');
            out.extend_from_slice(extra);
        }
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

/// Bytes [`end_with_id`] adds for wire ids up to `max`.
pub(crate) fn id_tail_len(max: u64) -> usize {
    9 + max.checked_ilog10().unwrap_or(0) as usize
}

fn write_json_string(s: &str, out: &mut Vec<u8>) {
    if s.bytes()
        .all(|b| b >= 0x20 && b != b'"' && b != b'\\' && b < 0x7f)
    {
        out.push(b'"');
        out.extend_from_slice(s.as_bytes());
        out.push(b'"');
    } else {
        // serde_json escapes control characters and quotes; serializing a str cannot fail.
        let _ = serde_json::to_writer(&mut *out, s);
    }
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
