//! The fast path for reading messages: one pass over a message that validates it as JSON and
//! notes where its top-level members are, building nothing. The connection runs it straight over
//! the splitter's buffer (framing the message too), and [`Members::parse`] over frames the
//! splitter found.
//!
//! It handles the shape QEMU sends (plain member names, values nested at most [`MAX_NESTED`] deep)
//! and answers `None` for anything else, including anything invalid; the caller then asks
//! `serde_json`, which has the last word. So a message it accepts is one `serde_json` accepts,
//! with the same members (the last of repeated names wins, as there). The `members_scan` fuzz
//! target checks exactly that against `serde_json`.
//!
//! Why it exists: with a reply of a hundred bytes, `serde_json`'s generic visitor machinery cost
//! more than reading the bytes; this scanner does the same validation in a third of the time.

use crate::framing::find_string_byte;
use crate::wire::Members;

/// Deeper values are left to `serde_json` (the open containers are kept in the bits of a `u64`).
const MAX_NESTED: usize = 64;

/// The members of the JSON object `text`, or `None` if this scanner does not handle it (see the
/// module docs): then `serde_json` must decide.
pub(crate) fn members(text: &str) -> Option<Members<'_>> {
    let b = text.as_bytes();
    let start = skip_ws(b);
    let (len, spans) = object(&b[start..], MAX_NESTED)?;
    let end = start + len;
    let object = text.get(start..end)?;
    (end + skip_ws(&b[end..]) == b.len()).then(|| spans.members(object))
}

/// How many bytes of JSON whitespace (exactly `serde_json`'s set) `b` starts with.
pub(crate) fn skip_ws(b: &[u8]) -> usize {
    let mut s = Scanner { b, i: 0 };
    s.ws();
    s.i
}

/// Where the top-level members of a message are in its text, as byte ranges.
#[derive(Default)]
pub(crate) struct Spans {
    slots: [Option<(usize, usize)>; 7],
}

impl Spans {
    /// The members, in `text`: the bytes the spans were found in.
    pub(crate) fn members<'a>(&self, text: &'a str) -> Members<'a> {
        let [qmp, ret, error, id, event, data, timestamp] = self
            .slots
            .map(|slot| slot.and_then(|(a, b)| text.get(a..b)));
        Members {
            qmp,
            ret,
            error,
            id,
            event,
            data,
            timestamp,
        }
    }
}

/// One JSON object at the very start of `b`, nested at most `max_nested` levels below its top
/// level: where it ends, and its members. `None`: not handled here (incomplete, invalid, deeper,
/// or a member name with escapes); the splitter and `serde_json` decide.
pub(crate) fn object(b: &[u8], max_nested: usize) -> Option<(usize, Spans)> {
    let max_nested = max_nested.min(MAX_NESTED);
    let mut s = Scanner { b, i: 0 };
    let mut spans = Spans::default();
    s.eat(b'{')?;
    s.ws();
    if !s.eat_if(b'}') {
        loop {
            let key = s.plain_key()?;
            s.ws();
            s.eat(b':')?;
            s.ws();
            let start = s.i;
            s.value(max_nested)?;
            // In the order of `Spans::members`; other names are skipped.
            let slot = match key {
                b"QMP" => Some(0),
                b"return" => Some(1),
                b"error" => Some(2),
                b"id" => Some(3),
                b"event" => Some(4),
                b"data" => Some(5),
                b"timestamp" => Some(6),
                _ => None,
            };
            if let Some(slot) = slot.and_then(|i| spans.slots.get_mut(i)) {
                *slot = Some((start, s.i));
            }
            s.ws();
            match s.next()? {
                b',' => s.ws(),
                b'}' => break,
                _ => return None,
            }
        }
    }
    Some((s.i, spans))
}

struct Scanner<'a> {
    b: &'a [u8],
    i: usize,
}

impl<'a> Scanner<'a> {
    fn peek(&self) -> Option<u8> {
        self.b.get(self.i).copied()
    }

    fn next(&mut self) -> Option<u8> {
        let c = self.peek()?;
        self.i += 1;
        Some(c)
    }

    fn eat(&mut self, c: u8) -> Option<()> {
        (self.next()? == c).then_some(())
    }

    fn eat_if(&mut self, c: u8) -> bool {
        let hit = self.peek() == Some(c);
        self.i += usize::from(hit);
        hit
    }

    /// JSON's whitespace, exactly `serde_json`'s set.
    fn ws(&mut self) {
        while let Some(b' ' | b'\n' | b'\t' | b'\r') = self.peek() {
            self.i += 1;
        }
    }

    /// A member name without escapes (with one, `serde_json` must compare it): its bytes.
    fn plain_key(&mut self) -> Option<&'a [u8]> {
        self.eat(b'"')?;
        let start = self.i;
        let k = find_string_byte::<true>(&self.b[start..])?;
        self.i += k + 1;
        let b = self.b;
        (b[start + k] == b'"').then(|| &b[start..start + k])
    }

    /// The rest of a string whose opening quote has been read.
    fn string(&mut self) -> Option<()> {
        loop {
            self.i += find_string_byte::<true>(self.b.get(self.i..)?)?;
            match self.next()? {
                b'"' => return Some(()),
                b'\\' => match self.next()? {
                    b'"' | b'\\' | b'/' | b'b' | b'f' | b'n' | b'r' | b't' => {}
                    b'u' => {
                        // Any code unit, lone surrogates included: `serde_json` accepts them when
                        // it only skips a string, as for these members.
                        let hex = self.b.get(self.i..self.i + 4)?;
                        if !hex.iter().all(u8::is_ascii_hexdigit) {
                            return None;
                        }
                        self.i += 4;
                    }
                    _ => return None,
                },
                // A control character: invalid in a string.
                _ => return None,
            }
        }
    }

    /// `-?(0|[1-9][0-9]*)(\.[0-9]+)?([eE][+-]?[0-9]+)?`, the first byte already checked to be
    /// `-` or a digit.
    fn number(&mut self) -> Option<()> {
        self.eat_if(b'-');
        match self.next()? {
            b'0' => {}
            b'1'..=b'9' => self.digits(),
            _ => return None,
        }
        if self.eat_if(b'.') {
            self.some_digits()?;
        }
        if let Some(b'e' | b'E') = self.peek() {
            self.i += 1;
            if let Some(b'+' | b'-') = self.peek() {
                self.i += 1;
            }
            self.some_digits()?;
        }
        // After `0`, a digit is not part of the number: the caller rejects it as what follows.
        Some(())
    }

    fn digits(&mut self) {
        while let Some(b'0'..=b'9') = self.peek() {
            self.i += 1;
        }
    }

    fn some_digits(&mut self) -> Option<()> {
        let start = self.i;
        self.digits();
        (self.i > start).then_some(())
    }

    fn literal(&mut self, word: &[u8]) -> Option<()> {
        let end = self.i + word.len();
        (self.b.get(self.i..end)? == word).then(|| self.i = end)
    }

    /// One value, nested containers included, without recursion: the open containers are the
    /// low `depth` bits of `arrays` (1 for an array, 0 for an object). Containers, empty ones
    /// too, may be nested `max_nested` deep (at most 64).
    fn value(&mut self, max_nested: usize) -> Option<()> {
        let mut arrays = 0u64;
        let mut depth = 0usize;
        loop {
            match self.peek()? {
                b'"' => {
                    self.i += 1;
                    self.string()?;
                }
                b'-' | b'0'..=b'9' => self.number()?,
                b't' => self.literal(b"true")?,
                b'f' => self.literal(b"false")?,
                b'n' => self.literal(b"null")?,
                open @ (b'{' | b'[') => {
                    if depth >= max_nested {
                        return None;
                    }
                    self.i += 1;
                    self.ws();
                    let array = open == b'[';
                    if !self.eat_if(if array { b']' } else { b'}' }) {
                        depth += 1;
                        arrays = arrays << 1 | u64::from(array);
                        if !array {
                            self.member_name()?;
                        }
                        continue;
                    }
                }
                _ => return None,
            }
            // A value ended: close the containers it ends, then go on to the next value.
            loop {
                if depth == 0 {
                    return Some(());
                }
                self.ws();
                let array = arrays & 1 == 1;
                match self.next()? {
                    b',' => {
                        self.ws();
                        if !array {
                            self.member_name()?;
                        }
                        break;
                    }
                    b']' if array => {}
                    b'}' if !array => {}
                    _ => return None,
                }
                depth -= 1;
                arrays >>= 1;
            }
        }
    }

    /// A nested member's name and its colon, up to its value.
    fn member_name(&mut self) -> Option<()> {
        self.eat(b'"')?;
        self.string()?;
        self.ws();
        self.eat(b':')?;
        self.ws();
        Some(())
    }
}

/// Panics unless `serde_json` accepts whatever the scanner accepts, with the same members.
/// Returns whether the scanner took `text`. For tests and the `members_scan` fuzz target.
#[cfg(any(test, feature = "fuzzing"))]
pub(crate) fn agrees(text: &str) -> bool {
    let fast = members(text);
    if let Some(m) = &fast {
        check(text, m);
    }
    fast.is_some()
}

/// Panics unless `serde_json` accepts `text` and finds the members `m`.
#[cfg(any(test, feature = "fuzzing"))]
#[allow(clippy::panic)] // a check for the fuzzer: panicking is how it reports
pub(crate) fn check(text: &str, m: &Members<'_>) {
    match Members::parse_with_serde(text) {
        Ok(s) => assert_eq!(m, &s, "members differ for {text:?}"),
        Err(e) => panic!("scanner accepted what serde_json rejects ({e}): {text:?}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn takes_what_qemu_sends() {
        for text in [
            r#"{"return": {"qemu": {"micro": 2, "minor": 0, "major": 10}, "package": "v10"}, "id": 1}"#,
            r#"{"timestamp": {"seconds": 1, "microseconds": 2}, "event": "STOP"}"#,
            r#"{"error": {"class": "GenericError", "desc": "a \"b\"\n\u00e9"}, "id": 17}"#,
            "{\n    \"return\": [\n        {\"a\": [1, -2.5e-3, 0, true, false, null, []]}\n    ]\n}",
            r#"{"QMP": {"version": {}, "capabilities": ["oob"]}}"#,
            r#"{"return": {}}"#,
            r#"{}"#,
            r#"{"id": 1, "id": "x", "other": {"deep": [[[[{}]]]]}}"#,
            "{\"return\": \"\u{e9}\u{1F600}\"}",
        ] {
            assert!(agrees(text), "{text}");
        }
    }

    #[test]
    fn leaves_the_rest_to_serde_json() {
        for text in [
            r#"{"return": 01}"#,
            r#"{"return": 1.}"#,
            r#"{"return": 1e}"#,
            r#"{"return": -}"#,
            r#"{"return": [1,]}"#,
            r#"{"return": {"a": 1,}}"#,
            r#"{"return": {"a" 1}}"#,
            r#"{"return": tru}"#,
            r#"{"return": txxx}"#,
            r#"{"return": [fal{e]}"#,
            r#"{"return": "\x"}"#,
            r#"{"return": "\u12"}"#,
            "{\"return\": \"a\tb\"}",
            r#"{"\u0069d": 1}"#,
            r#"{"id": 1} x"#,
            r#"{"id": 1"#,
            r#"{"id" : 1 ,}"#,
            r#"[1]"#,
            r#"{"return": NaN}"#,
        ] {
            assert!(!agrees(text), "{text}");
        }
        let nested = |n| format!("{{\"return\": {}1{}}}", "[".repeat(n), "]".repeat(n));
        assert!(!agrees(&nested(65)));
        assert!(agrees(&nested(64)));
    }

    #[test]
    fn finds_control_characters_in_every_position() {
        for len in 0..20 {
            for at in 0..len {
                let mut s = vec![b'a'; len];
                s[at] = 0x1f;
                assert_eq!(find_string_byte::<true>(&s), Some(at));
                s[at] = 0xc3;
                assert_eq!(find_string_byte::<true>(&s), None);
            }
        }
    }
}
