//! Splitting a byte stream into top-level JSON objects, before any parsing.
//!
//! QMP frames messages by JSON value, not by line: a `pretty=on` monitor spreads one message over many
//! lines, and QEMU's own reader ends a message when brace depth returns to zero. [`JsonSplitter`] does
//! the same with a small state machine that only tracks strings, escapes and nesting depth. It never
//! rescans a byte, never recurses, and never holds more than one message (bounded by
//! `max_message_size`) plus the chunk most recently pushed.
//!
//! It does not validate JSON: that is the parser's job, once per complete frame.

use std::fmt;

/// Something the splitter skipped instead of yielding a frame. The stream carries on after it.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum FrameError {
    /// An object larger than `max_message_size` bytes; it was skipped without being buffered.
    TooLarge {
        /// Size of the whole object in bytes.
        size: usize,
        /// Its top-level `id` member, if that is a non-negative integer, so that the request it
        /// answers can fail at once instead of waiting for a response that will never come.
        id: Option<u64>,
    },
    /// An object nested deeper than `max_depth`; it was skipped without being buffered.
    TooDeep {
        /// Size of the whole object in bytes.
        size: usize,
        /// Its top-level `id` member, as for [`TooLarge`](Self::TooLarge).
        id: Option<u64>,
    },
    /// A top-level array or string: QMP messages are objects. It was skipped without being
    /// buffered. (Other scalars have no delimiters and count as
    /// [`UnexpectedBytes`](Self::UnexpectedBytes).)
    NotAnObject {
        /// Size of the whole value in bytes.
        size: usize,
    },
    /// Bytes between values that cannot start one (junk, control bytes, QGA's `0xFF` sentinel,
    /// top-level scalars). Trailing whitespace up to the next value is counted in.
    UnexpectedBytes {
        /// Length of the run.
        len: usize,
        /// The first few bytes of the run (at most [`JUNK_HEAD`]).
        head: Vec<u8>,
    },
    /// An object passed the size or depth limit: from here on it is skipped without being
    /// buffered, and reported again, as [`TooLarge`](Self::TooLarge) or
    /// [`TooDeep`](Self::TooDeep), when it ends. Reported at the byte where the limit was passed,
    /// whatever the chunking, so a caller waiting for the reply it may be can be told at once,
    /// not only when (or if) the value ends.
    OverLimit {
        /// Whether it was the depth limit (else the size limit) that was passed first.
        too_deep: bool,
        /// Bytes of the object up to that point.
        size: usize,
        /// Its top-level `id` member, if that came before this point and is a non-negative
        /// integer.
        id: Option<u64>,
    },
    /// A value nested deeper than [`SKIP_DEPTH_LIMIT`] levels, which no QEMU sends (its own
    /// parser gives up there too): it was given up where that depth was passed, and what follows
    /// is read afresh. The stream is probably not QMP.
    TooDeepToSkip {
        /// Bytes of the value up to that point.
        size: usize,
    },
    /// The stream ended (see [`JsonSplitter::finish`]) inside a value.
    Truncated {
        /// Bytes of the unfinished value.
        len: usize,
    },
}

impl fmt::Display for FrameError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::TooLarge { size, .. } => {
                write!(f, "object of {size} bytes exceeds the size limit")
            }
            Self::TooDeep { size, .. } => {
                write!(f, "object of {size} bytes exceeds the depth limit")
            }
            Self::NotAnObject { size } => write!(f, "top-level non-object of {size} bytes"),
            Self::UnexpectedBytes { len, .. } => write!(f, "{len} unexpected bytes between values"),
            Self::OverLimit { too_deep, size, .. } => {
                let limit = if *too_deep { "depth" } else { "size" };
                write!(
                    f,
                    "object passed the {limit} limit after {size} bytes; skipping it"
                )
            }
            Self::TooDeepToSkip { size } => write!(
                f,
                "value nested deeper than {SKIP_DEPTH_LIMIT} levels after {size} bytes; given up"
            ),
            Self::Truncated { len } => write!(f, "stream ended inside a value after {len} bytes"),
        }
    }
}

/// Buffer capacity above which a mostly empty buffer is shrunk...
const SHRINK_ABOVE: usize = 1 << 20;
/// ... once this many pushes in a row needed less than a quarter of it.
const SHRINK_AFTER: u32 = 64;

/// How many bytes of a junk run [`FrameError::UnexpectedBytes`] keeps for diagnostics.
pub const JUNK_HEAD: usize = 80;

/// Nesting past which a skipped value is given up ([`FrameError::TooDeepToSkip`]): QEMU's own
/// input limit (`MAX_NESTING` in `qobject/json-streamer.c`), which no QEMU output comes near.
pub const SKIP_DEPTH_LIMIT: usize = 1024;

/// Where the scanner stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    /// Between values: whitespace is skipped, `{`, `[` or `"` starts a value, anything else is
    /// junk. Strings count as values so that braces inside them cannot start a frame, as in
    /// QEMU's own lexer.
    Between,
    /// Inside an object that is being buffered; it starts at `JsonSplitter::start`.
    Keep,
    /// Inside a value that is being skipped; only its size and depth are tracked.
    Skip(SkipReason),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum SkipReason {
    NotAnObject,
    TooLarge,
    TooDeep,
}

/// An incremental splitter of a byte stream into top-level JSON objects.
///
/// Push bytes with [`push`](Self::push), then take frames with [`next_frame`](Self::next_frame) until
/// it returns `None`. Any chunking of the same bytes yields the same frames and errors in the same
/// order.
///
/// ```
/// use qmp_proto::framing::{FrameError, JsonSplitter};
///
/// let mut s = JsonSplitter::new(1024, 32);
/// s.push(b"{\"return\": {}}\r\n\xff{\"event\":");
/// assert_eq!(s.next_frame(), Some(Ok(&b"{\"return\": {}}"[..])));
/// assert!(matches!(s.next_frame(), Some(Err(FrameError::UnexpectedBytes { len: 1, .. }))));
/// assert_eq!(s.next_frame(), None); // the event is incomplete
/// s.push(b" \"STOP\"}");
/// assert_eq!(s.next_frame(), Some(Ok(&b"{\"event\": \"STOP\"}"[..])));
/// ```
pub struct JsonSplitter {
    buf: Vec<u8>,
    /// First byte of `buf` not yet scanned.
    scan: usize,
    /// First byte of `buf` still needed: the start of the kept value, or `scan` otherwise.
    keep_from: usize,
    /// Start of the value being kept (`Mode::Keep`).
    start: usize,
    mode: Mode,
    depth: usize,
    in_string: bool,
    escape: bool,
    /// Size of a skipped value so far (bytes no longer in `buf`).
    skipped: usize,
    /// The skipped value went deeper than `max_depth` (takes precedence over size).
    too_deep: bool,
    /// The skipped value went deeper than [`SKIP_DEPTH_LIMIT`].
    hopeless: bool,
    /// The value whose [`FrameError::OverLimit`] was just reported also ended there: its end is
    /// reported next.
    ended: bool,
    /// Finds the top-level `id` of an object being skipped.
    sniffer: IdSniffer,
    junk_len: usize,
    junk_head: Vec<u8>,
    eof: bool,
    /// A byte that ends whatever value it appears in (the guest agent's `0xFF`, never part of
    /// JSON): the value so far is dropped, and the byte is read between values.
    reset_byte: Option<u8>,
    /// Pushes in a row that used little of a large buffer.
    small_pushes: u32,
    max_size: usize,
    max_depth: usize,
}

impl fmt::Debug for JsonSplitter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("JsonSplitter")
            .field("buffered", &self.buffered())
            .field("mode", &self.mode)
            .field("depth", &self.depth)
            .field("max_size", &self.max_size)
            .field("max_depth", &self.max_depth)
            .finish_non_exhaustive()
    }
}

impl JsonSplitter {
    /// A splitter that skips values larger than `max_size` bytes or nested deeper than `max_depth`.
    ///
    /// A `max_depth` of 1 allows `{"a": 1}` but not `{"a": {}}`.
    pub fn new(max_size: usize, max_depth: usize) -> Self {
        Self {
            buf: Vec::new(),
            scan: 0,
            keep_from: 0,
            start: 0,
            mode: Mode::Between,
            depth: 0,
            in_string: false,
            escape: false,
            skipped: 0,
            too_deep: false,
            hopeless: false,
            ended: false,
            sniffer: IdSniffer::default(),
            junk_len: 0,
            junk_head: Vec::new(),
            eof: false,
            reset_byte: None,
            small_pushes: 0,
            max_size: max_size.max(2),
            max_depth: max_depth.max(1),
        }
    }

    /// Appends bytes to the stream. Bytes pushed after [`finish`](Self::finish) are ignored.
    pub fn push(&mut self, bytes: &[u8]) {
        if self.eof || bytes.is_empty() {
            return;
        }
        // Drop what is no longer needed. A partial value is moved at most once (to offset 0), so a
        // large message arriving in small pieces costs linear time.
        if self.keep_from > 0 {
            self.buf.drain(..self.keep_from);
            self.scan -= self.keep_from;
            self.start = self.start.saturating_sub(self.keep_from);
            self.keep_from = 0;
        }
        // Give back the memory of a past large message once the buffer is mostly empty, so one
        // 48 MB reply does not pin 48 MB for the life of the connection.
        // Not at once, though: a client fetching large replies one after another would pay to
        // grow the buffer (and fault its pages in) again for each.
        let needed = self.buf.len() + bytes.len();
        if self.buf.capacity() > SHRINK_ABOVE && needed < self.buf.capacity() / 4 {
            self.small_pushes += 1;
            if self.small_pushes >= SHRINK_AFTER {
                self.buf.shrink_to(needed.max(SHRINK_ABOVE / 16));
            }
        } else {
            self.small_pushes = 0;
        }
        self.buf.extend_from_slice(bytes);
    }

    /// Makes `byte` end any value it appears in, as the guest agent's protocol asks of its `0xFF`
    /// ("the client's lexer/tokenizer/parser state should be flushed/reset"): the part of the
    /// value before it is reported as [`FrameError::UnexpectedBytes`], and the byte itself is
    /// read between values. Otherwise the tail of a reply a previous client left unread (an odd
    /// quote, an open brace) would swallow every later message, the sync replies that are to
    /// recover from it included.
    pub(crate) fn reset_at(&mut self, byte: u8) {
        self.reset_byte = Some(byte);
    }

    /// Marks the end of the stream: [`next_frame`](Self::next_frame) then reports an unfinished
    /// junk run and an unfinished value (as [`FrameError::Truncated`]) before returning `None`.
    pub fn finish(&mut self) {
        self.eof = true;
    }

    /// Bytes held in memory: the unfinished value plus anything pushed but not yet scanned.
    /// (The allocation may be larger, up to 1 MiB, or four times this after a large message.)
    pub fn buffered(&self) -> usize {
        self.buf.len() - self.keep_from
    }

    /// The bytes not yet scanned, when the splitter is between values with no junk pending: a
    /// caller with a faster parser may take the next message from here itself, with
    /// [`take_unscanned`](Self::take_unscanned). Empty otherwise.
    pub(crate) fn unscanned(&self) -> &[u8] {
        if self.mode == Mode::Between && self.junk_len == 0 {
            &self.buf[self.scan..]
        } else {
            &[]
        }
    }

    /// [`unscanned`](Self::unscanned) from its first byte that is not whitespace: where the next
    /// value starts (or junk), once it has arrived.
    pub(crate) fn ahead(&self) -> &[u8] {
        let bytes = self.unscanned();
        &bytes[crate::scan::skip_ws(bytes)..]
    }

    /// Marks the first `len` bytes of [`unscanned`](Self::unscanned) as consumed: whitespace and
    /// one complete object within the limits, exactly what `next_frame` would have returned.
    pub(crate) fn take_unscanned(&mut self, len: usize) {
        self.scan += len;
        self.keep_from = self.scan;
    }

    /// The limits: largest message, deepest nesting.
    pub(crate) fn limits(&self) -> (usize, usize) {
        (self.max_size, self.max_depth)
    }

    /// True when the stream is between values with nothing buffered: an EOF here is clean.
    pub fn is_idle(&self) -> bool {
        self.mode == Mode::Between && self.junk_len == 0 && self.scan == self.buf.len()
    }

    /// The next complete top-level object, or what was skipped instead. `None` means more bytes
    /// are needed (or, after [`finish`](Self::finish), that the stream is done).
    #[allow(clippy::should_implement_trait)] // the frame borrows the splitter: not an Iterator
    pub fn next_frame(&mut self) -> Option<Result<&[u8], FrameError>> {
        match self.advance() {
            Step::Frame(start, end) => Some(Ok(&self.buf[start..end])),
            Step::Error(e) => Some(Err(e)),
            Step::NeedMore => None,
        }
    }

    fn advance(&mut self) -> Step {
        if std::mem::take(&mut self.ended) {
            return Step::Error(self.end_skip(self.scan));
        }
        let len = self.buf.len();
        let mut i = self.scan;
        if self.mode == Mode::Between {
            // Skip whitespace and junk up to the next value.
            while i < len {
                let b = self.buf[i];
                if b == b'{' || b == b'[' || b == b'"' {
                    break;
                }
                if self.junk_len == 0 && matches!(b, b' ' | b'\t' | b'\r' | b'\n') {
                    i += 1;
                    continue;
                }
                if self.junk_head.len() < JUNK_HEAD {
                    self.junk_head.push(b);
                }
                self.junk_len += 1;
                i += 1;
                if self.junk_len >= self.max_size {
                    // Report endless junk in bounded pieces rather than never.
                    break;
                }
            }
            self.scan = i;
            self.keep_from = i;
            if self.junk_len > 0 && (i < len || self.eof || self.junk_len >= self.max_size) {
                return Step::Error(self.take_junk());
            }
            if i == len {
                return Step::NeedMore;
            }
            // A value starts here.
            let first = self.buf[i];
            self.depth = usize::from(first != b'"');
            self.in_string = first == b'"';
            self.escape = false;
            self.too_deep = false;
            self.hopeless = false;
            self.skipped = 0;
            if first == b'{' {
                self.mode = Mode::Keep;
                self.start = i;
            } else {
                self.mode = Mode::Skip(SkipReason::NotAnObject);
                self.skipped = 1;
                self.keep_from = i + 1;
            }
            i += 1;
        }

        // Inside a value, up to a reset byte if one comes first.
        let value_start = i;
        let limit = match self.reset_byte {
            Some(reset) => self.buf[i..]
                .iter()
                .position(|&b| b == reset)
                .map_or(len, |k| i + k),
            None => len,
        };
        let keep = self.mode == Mode::Keep;
        // A kept object is scanned no further than the byte that passes a limit, so that where
        // it is reported does not depend on the chunking.
        let stop = match keep {
            true => limit.min(self.start.saturating_add(self.max_size).saturating_add(1)),
            false => limit,
        };
        let end = self.scan_value(i, stop, keep);
        let done = self.depth == 0 && !self.in_string;
        if !done && end == limit && limit < len {
            let (len, head) = self.drop_value(value_start, limit);
            return Step::Error(FrameError::UnexpectedBytes { len, head });
        }
        if self.hopeless {
            // Bytes after `end` are kept: the value is given up, not the stream.
            let (size, _) = self.drop_value(value_start, end);
            return Step::Error(FrameError::TooDeepToSkip { size });
        }
        if keep {
            let size = end - self.start;
            if !self.too_deep && size <= self.max_size {
                self.scan = end;
                if done {
                    self.mode = Mode::Between;
                    self.keep_from = end;
                    return Step::Frame(self.start, end);
                }
                return self.need_more();
            }
            // Over a limit: say so now, stop buffering, keep counting to the end of the value.
            self.mode = Mode::Skip(if self.too_deep {
                SkipReason::TooDeep
            } else {
                SkipReason::TooLarge
            });
            self.skipped = size;
            self.sniffer = IdSniffer::default();
            self.sniffer.feed(&self.buf[self.start..end]);
            // Unscanned bytes after `end` stay.
            self.buf.drain(self.start..end);
            self.scan = self.start;
            self.keep_from = self.start;
            self.ended = done;
            return Step::Error(FrameError::OverLimit {
                too_deep: self.too_deep,
                size,
                id: self.sniffer.id,
            });
        }
        self.skipped += end - value_start;
        if self.mode != Mode::Skip(SkipReason::NotAnObject) {
            self.sniffer.feed(&self.buf[value_start..end]);
        }
        if done {
            return Step::Error(self.end_skip(end));
        }
        // Nothing of a skipped value is kept.
        self.buf.truncate(value_start);
        self.scan = value_start;
        self.keep_from = value_start;
        self.need_more()
    }

    /// `NeedMore`, or at end of stream the truncation of the current value (reported once).
    fn need_more(&mut self) -> Step {
        if !self.eof || self.mode == Mode::Between {
            return Step::NeedMore;
        }
        let len = match self.mode {
            Mode::Keep => self.scan - self.start,
            _ => self.skipped,
        };
        self.mode = Mode::Between;
        self.buf.truncate(self.keep_from);
        self.scan = self.keep_from;
        Step::Error(FrameError::Truncated { len })
    }

    fn take_junk(&mut self) -> FrameError {
        let len = std::mem::take(&mut self.junk_len);
        FrameError::UnexpectedBytes {
            len,
            head: std::mem::take(&mut self.junk_head),
        }
    }

    /// Ends a skipped value whose last byte is just before `end` and says why it was skipped. Depth
    /// wins over size whichever was noticed first, so the report does not depend on chunking.
    fn end_skip(&mut self, end: usize) -> FrameError {
        let reason = self.mode;
        self.mode = Mode::Between;
        self.scan = end;
        self.keep_from = end;
        let size = self.skipped;
        let id = self.sniffer.id;
        match reason {
            Mode::Skip(SkipReason::NotAnObject) => FrameError::NotAnObject { size },
            _ if self.too_deep => FrameError::TooDeep { size, id },
            _ => FrameError::TooLarge { size, id },
        }
    }

    /// Drops the value under way up to `at` (a reset byte, or where it was given up;
    /// `value_start`: where this round of scanning began): its size and first bytes.
    fn drop_value(&mut self, value_start: usize, at: usize) -> (usize, Vec<u8>) {
        let (len, head) = match self.mode {
            Mode::Keep => (
                at - self.start,
                self.buf[self.start..at.min(self.start + JUNK_HEAD)].to_vec(),
            ),
            _ => (self.skipped + (at - value_start), Vec::new()),
        };
        self.mode = Mode::Between;
        self.depth = 0;
        self.in_string = false;
        self.escape = false;
        self.buf.drain(..at);
        self.scan = 0;
        self.keep_from = 0;
        self.start = 0;
        (len, head)
    }

    /// Scans inside a value from `i` until the value ends (`depth == 0`, returns the index after
    /// its last byte) or `limit` does (returns `limit`). Also stops after the byte that takes it
    /// past [`SKIP_DEPTH_LIMIT`] (`hopeless`), and, with `stop_too_deep`, after the one that
    /// takes it past `max_depth`.
    fn scan_value(&mut self, mut i: usize, limit: usize, stop_too_deep: bool) -> usize {
        let buf = &self.buf[..limit];
        let len = buf.len();
        while i < len {
            if self.escape {
                self.escape = false;
                i += 1;
                continue;
            }
            if self.in_string {
                match find_string_byte::<false>(&buf[i..]) {
                    Some(k) => {
                        i += k;
                        if buf[i] == b'\\' {
                            self.escape = true;
                        } else {
                            self.in_string = false;
                            if self.depth == 0 {
                                // A top-level string ended.
                                return i + 1;
                            }
                        }
                        i += 1;
                    }
                    None => return len,
                }
                continue;
            }
            match find_structural(&buf[i..]) {
                Some(k) => {
                    i += k;
                    match buf[i] {
                        b'"' => self.in_string = true,
                        b'{' | b'[' => {
                            self.depth += 1;
                            if self.depth > self.max_depth && !self.too_deep {
                                self.too_deep = true;
                                if stop_too_deep {
                                    return i + 1;
                                }
                            }
                            if self.depth > SKIP_DEPTH_LIMIT {
                                self.hopeless = true;
                                return i + 1;
                            }
                        }
                        _ => {
                            self.depth -= 1;
                            if self.depth == 0 {
                                return i + 1;
                            }
                        }
                    }
                    i += 1;
                }
                None => return len,
            }
        }
        len
    }
}

/// Watches the bytes of an object being skipped for a top-level `"id": <integer>` member. Runs
/// only on skipped objects, so it favours simplicity over speed.
#[derive(Debug, Default)]
struct IdSniffer {
    depth: usize,
    in_string: bool,
    escape: bool,
    /// At depth 1, the next string is a member name.
    expect_key: bool,
    in_key: bool,
    /// Bytes of the current name that matched `id` so far; `None` once it cannot be `id`.
    key_match: Option<usize>,
    key_is_id: bool,
    value: IdValue,
    id: Option<u64>,
}

#[derive(Debug, Default, Clone, Copy)]
enum IdValue {
    /// Not reading an `id` value.
    #[default]
    Idle,
    /// After `"id":`, before any digit.
    Empty,
    Digits(u64),
    /// Not a plain non-negative integer.
    Invalid,
}

impl IdSniffer {
    fn feed(&mut self, bytes: &[u8]) {
        for &b in bytes {
            if self.in_string {
                if self.escape {
                    self.escape = false;
                    self.key_match = None;
                } else if b == b'\\' {
                    self.escape = true;
                } else if b == b'"' {
                    self.in_string = false;
                    if self.in_key {
                        self.in_key = false;
                        self.key_is_id = self.key_match == Some(2);
                    }
                } else if self.in_key {
                    self.key_match = self
                        .key_match
                        .filter(|&n| n < 2 && b"id"[n] == b)
                        .map(|n| n + 1);
                }
                continue;
            }
            let top = self.depth == 1;
            match b {
                b' ' | b'\t' | b'\r' | b'\n' => {}
                b',' | b'}' | b']' if top => {
                    if let IdValue::Digits(id) = self.value {
                        self.id = Some(id);
                    }
                    self.value = IdValue::Idle;
                    self.expect_key = b == b',';
                    if b != b',' {
                        self.depth -= 1;
                    }
                }
                b':' if top => {
                    self.expect_key = false;
                    self.value = if self.key_is_id {
                        IdValue::Empty
                    } else {
                        IdValue::Idle
                    };
                    self.key_is_id = false;
                }
                b'0'..=b'9' if top => {
                    let d = u64::from(b - b'0');
                    self.value = match self.value {
                        IdValue::Empty => IdValue::Digits(d),
                        IdValue::Digits(n) => n
                            .checked_mul(10)
                            .and_then(|n| n.checked_add(d))
                            .map_or(IdValue::Invalid, IdValue::Digits),
                        other => other,
                    };
                }
                _ => {
                    if top && matches!(self.value, IdValue::Empty | IdValue::Digits(_)) {
                        self.value = IdValue::Invalid;
                    }
                    match b {
                        b'"' => {
                            self.in_string = true;
                            if top && self.expect_key {
                                self.in_key = true;
                                self.key_match = Some(0);
                            }
                        }
                        b'{' | b'[' => {
                            self.depth += 1;
                            self.expect_key = self.depth == 1;
                        }
                        b'}' | b']' => self.depth = self.depth.saturating_sub(1),
                        _ => {}
                    }
                }
            }
        }
    }
}

enum Step {
    Frame(usize, usize),
    Error(FrameError),
    NeedMore,
}

const fn byte_mask(b: u8) -> u64 {
    0x0101_0101_0101_0101 * b as u64
}

/// High bit set in each byte of `w` that equals `b` (exact for the lowest match, which is all the
/// callers use).
#[inline(always)]
fn match_byte(w: u64, b: u8) -> u64 {
    let x = w ^ byte_mask(b);
    x.wrapping_sub(byte_mask(1)) & !x & byte_mask(0x80)
}

/// Index of the first `"` or `\` in `s` and, with `CONTROLS`, of the first control character
/// (below 0x20, invalid in a JSON string). Eight bytes at a time: strings are most of QMP's bytes.
#[inline]
pub(crate) fn find_string_byte<const CONTROLS: bool>(s: &[u8]) -> Option<usize> {
    let mut chunks = s.chunks_exact(8);
    let mut base = 0;
    for c in &mut chunks {
        let w = u64::from_le_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]);
        let mut m = match_byte(w, b'"') | match_byte(w, b'\\');
        if CONTROLS {
            // Bytes below 0x20: the borrow of `w - 0x20` reaches their high bit; bytes with the
            // high bit already set (UTF-8) are masked out by `!w`. Exact for the lowest match.
            m |= w.wrapping_sub(byte_mask(0x20)) & !w & byte_mask(0x80);
        }
        if m != 0 {
            return Some(base + (m.trailing_zeros() / 8) as usize);
        }
        base += 8;
    }
    chunks
        .remainder()
        .iter()
        .position(|&b| b == b'"' || b == b'\\' || CONTROLS && b < 0x20)
        .map(|k| base + k)
}

/// Index of the first byte outside a string that can change the scanner's state.
#[inline]
fn find_structural(s: &[u8]) -> Option<usize> {
    s.iter().position(|&b| STRUCTURAL[b as usize])
}

static STRUCTURAL: [bool; 256] = {
    let mut t = [false; 256];
    t[b'"' as usize] = true;
    t[b'{' as usize] = true;
    t[b'}' as usize] = true;
    t[b'[' as usize] = true;
    t[b']' as usize] = true;
    t
};
