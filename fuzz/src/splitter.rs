//! Targets 1 and 2: the JSON splitter on its own.

use arbitrary::{Arbitrary, Unstructured};
use qmp_proto::framing::{FrameError, JUNK_HEAD, JsonSplitter, SKIP_DEPTH_LIMIT};
use serde::Serialize as _;
use serde_json::{Map, Value};

use crate::{is_ws, lex_value, limit_crossing, pieces};

/// What the splitter yielded, owned.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Item {
    Frame(Vec<u8>),
    Error(FrameError),
}

/// The limits the splitter applies (it raises a size below 2 and a depth below 1).
#[derive(Debug, Clone, Copy)]
pub(crate) struct Limits {
    size_arg: usize,
    depth_arg: usize,
    pub(crate) size: usize,
    pub(crate) depth: usize,
}

impl Limits {
    pub(crate) fn new(size: usize, depth: usize) -> Self {
        Self {
            size_arg: size,
            depth_arg: depth,
            size: size.max(2),
            depth: depth.max(1),
        }
    }
}

/// Feeds `chunks` to a new splitter, taking frames after every push (`drain_each`) or only at the
/// end, then (if `finish`) ends the stream. Checks the memory bound all along.
pub(crate) fn feed(chunks: &[&[u8]], lim: Limits, finish: bool, drain_each: bool) -> Vec<Item> {
    let mut s = JsonSplitter::new(lim.size_arg, lim.depth_arg);
    let mut items = Vec::new();
    let mut pushed = 0;
    for chunk in chunks {
        s.push(chunk);
        pushed += chunk.len();
        if drain_each {
            drain(&mut s, &mut items, lim, pushed);
            pushed = 0;
        }
    }
    if finish {
        s.finish();
    }
    drain(&mut s, &mut items, lim, pushed);
    if finish {
        assert!(s.is_idle(), "not idle after finish: {s:?}");
        assert_eq!(s.buffered(), 0, "bytes held after finish");
        s.push(b"{}");
        assert!(
            s.next_frame().is_none(),
            "a frame from bytes pushed after finish"
        );
    }
    items
}

/// Takes frames until the splitter needs more. Memory: what was pushed since the last drain plus
/// at most one unfinished value of `max_size` bytes; after draining, only that value.
fn drain(s: &mut JsonSplitter, items: &mut Vec<Item>, lim: Limits, pushed: usize) {
    loop {
        assert!(
            s.buffered() <= lim.size + pushed,
            "splitter holds {} bytes; limit {} + {pushed} pushed",
            s.buffered(),
            lim.size
        );
        match s.next_frame() {
            None => break,
            Some(Ok(frame)) => items.push(Item::Frame(frame.to_vec())),
            Some(Err(e)) => items.push(Item::Error(e)),
        }
    }
    assert!(
        s.buffered() <= lim.size,
        "splitter holds {} bytes with nothing to yield; limit {}",
        s.buffered(),
        lim.size
    );
}

/// Walks `stream` along `items`: every frame and report must account for exactly the bytes it
/// came from, in order, with only whitespace unreported between them. This checks each report's
/// size, the size and depth limits, the junk rules, and that nothing is lost or invented.
pub(crate) fn check_against_stream(stream: &[u8], items: &[Item], lim: Limits, finished: bool) {
    let mut pos = 0;
    for (n, item) in items.iter().enumerate() {
        while pos < stream.len() && is_ws(stream[pos]) {
            pos += 1;
        }
        let rest = &stream[pos..];
        let at = |what: &str| format!("item {n} ({item:?}) at byte {pos}: {what}");
        match item {
            Item::Frame(frame) => {
                assert!(
                    rest.starts_with(frame),
                    "{}",
                    at("not the bytes of the stream")
                );
                assert_eq!(frame.first(), Some(&b'{'), "{}", at("a frame is an object"));
                let (end, depth) = lex_value(frame).unwrap_or_else(|| panic!("{}", at("open")));
                assert_eq!(end, frame.len(), "{}", at("a frame is exactly one value"));
                assert!(depth <= lim.depth, "{}", at("deeper than max_depth"));
                assert!(frame.len() <= lim.size, "{}", at("larger than max_size"));
                pos += frame.len();
            }
            Item::Error(FrameError::TooLarge { size, .. } | FrameError::TooDeep { size, .. }) => {
                assert_eq!(rest.first(), Some(&b'{'), "{}", at("not an object"));
                let (end, depth) = lex_value(rest).unwrap_or_else(|| panic!("{}", at("open")));
                assert_eq!(end, *size, "{}", at("wrong size"));
                if matches!(item, Item::Error(FrameError::TooDeep { .. })) {
                    assert!(depth > lim.depth, "{}", at("not too deep"));
                } else {
                    assert!(
                        depth <= lim.depth,
                        "{}",
                        at("too deep, reported as too large")
                    );
                    assert!(*size > lim.size, "{}", at("not too large"));
                }
                pos += size;
            }
            Item::Error(FrameError::OverLimit { too_deep, size, .. }) => {
                // Said where the object passes a limit; its bytes are accounted for by what
                // reports its end (so `pos` stays).
                assert_eq!(rest.first(), Some(&b'{'), "{}", at("not an object"));
                let crossing = limit_crossing(rest, lim.size, lim.depth, false);
                assert_eq!(crossing, Some((*too_deep, *size)), "{}", at("not where"));
                assert!(
                    !matches!(items.get(n + 1), Some(Item::Frame(_))),
                    "{}",
                    at("followed by a frame")
                );
            }
            Item::Error(FrameError::TooDeepToSkip { size }) => {
                assert!(
                    matches!(rest.first(), Some(b'{' | b'[' | b'"')),
                    "{}",
                    at("not a value")
                );
                let crossing = limit_crossing(rest, usize::MAX, SKIP_DEPTH_LIMIT, true);
                assert_eq!(crossing, Some((true, *size)), "{}", at("not where"));
                pos += size;
            }
            Item::Error(FrameError::NotAnObject { size }) => {
                assert!(
                    matches!(rest.first(), Some(b'[' | b'"')),
                    "{}",
                    at("not an array or string")
                );
                let (end, _) = lex_value(rest).unwrap_or_else(|| panic!("{}", at("open")));
                assert_eq!(end, *size, "{}", at("wrong size"));
                pos += size;
            }
            Item::Error(FrameError::UnexpectedBytes { len, head }) => {
                assert!(
                    *len >= 1 && *len <= rest.len(),
                    "{}",
                    at("run out of range")
                );
                let run = &rest[..*len];
                assert!(
                    !is_ws(run[0]),
                    "{}",
                    at("a junk run starting with whitespace")
                );
                assert!(
                    !run.iter().any(|b| matches!(b, b'{' | b'[' | b'"')),
                    "{}",
                    at("a value start inside a junk run")
                );
                assert_eq!(
                    head[..],
                    run[..run.len().min(JUNK_HEAD)],
                    "{}",
                    at("head is not the start of the run")
                );
                assert!(
                    *len <= lim.size,
                    "{}",
                    at("a junk run longer than max_size")
                );
                let ends_well = *len == lim.size
                    || (finished && *len == rest.len())
                    || matches!(rest.get(*len), Some(b'{' | b'[' | b'"'));
                assert!(ends_well, "{}", at("a junk run cut short"));
                pos += len;
            }
            Item::Error(FrameError::Truncated { len }) => {
                assert!(finished, "{}", at("truncation without finish"));
                assert_eq!(n + 1, items.len(), "{}", at("truncation not last"));
                assert!(
                    matches!(rest.first(), Some(b'{' | b'[' | b'"')),
                    "{}",
                    at("not a value")
                );
                assert!(lex_value(rest).is_none(), "{}", at("a complete value"));
                assert_eq!(*len, rest.len(), "{}", at("wrong length"));
                pos += len;
            }
            Item::Error(other) => panic!("{}", at(&format!("unknown report {other:?}"))),
        }
    }
    if finished {
        while pos < stream.len() && is_ws(stream[pos]) {
            pos += 1;
        }
        assert_eq!(
            pos,
            stream.len(),
            "bytes at the end of the stream unaccounted for"
        );
    }
}

// --- Target 1 ------------------------------------------------------------------------------------

#[derive(Debug, Arbitrary)]
struct ChunksHeader {
    max_size: u16,
    max_depth: u8,
    chunk_seed: u32,
    chunk_log: u8,
    finish: bool,
}

/// Target 1, chunking invariance. Input: a header (`max_size: u16`, `max_depth: u8`, a chunk
/// seed and size, whether the stream ends), then the stream.
///
/// The same bytes fed whole, byte at a time, in arbitrary chunks draining after each, and in
/// those chunks draining only at the end must give the same frames and reports. Along the way
/// the splitter never holds more than `max_size` plus the bytes pushed since it was last
/// drained, and the result must account for every byte of the stream (see `check_against_stream`).
pub fn splitter_chunks(data: &[u8]) {
    let mut u = Unstructured::new(data);
    let Ok(h) = ChunksHeader::arbitrary(&mut u) else {
        return;
    };
    let stream = u.take_rest();
    let lim = Limits::new(usize::from(h.max_size), usize::from(h.max_depth));

    let whole = feed(&[stream], lim, h.finish, true);
    check_against_stream(stream, &whole, lim, h.finish);

    let bytewise: Vec<&[u8]> = stream.chunks(1).collect();
    let chunks = pieces(stream, h.chunk_seed, h.chunk_log);
    for (name, cut, drain_each) in [
        ("byte at a time", &bytewise, true),
        ("in chunks", &chunks, true),
        ("in chunks, drained at the end", &chunks, false),
    ] {
        let got = feed(cut, lim, h.finish, drain_each);
        assert!(
            got == whole,
            "fed {name}, the splitter gave\n{got:?}\nbut fed whole\n{whole:?}"
        );
    }
}

// --- Target 2 ------------------------------------------------------------------------------------

#[derive(Debug, Arbitrary)]
struct DifferentialHeader {
    max_size: u16,
    max_depth: u8,
    chunk_seed: u32,
    chunk_log: u8,
}

/// How a value is written out.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Style {
    Compact,
    /// `serde_json`'s pretty printer with a 4-space indent and CRLF.
    Pretty,
    /// QEMU's `pretty=on` monitor: CRLF, 4 spaces, empty containers on two lines.
    Qemu,
}

/// What the splitter must yield for one rendered top-level value (junk and scalars yield junk
/// reports, checked by `check_against_stream` only).
#[derive(Debug)]
enum Expected {
    Frame { bytes: Vec<u8>, value: Value },
    Error(FrameError),
}

const MAX_GEN_DEPTH: usize = 20;
const SPECIAL_CHARS: [char; 18] = [
    '{', '}', '[', ']', '"', '\\', '\n', '\r', '\0', '\u{1f}', ' ', ':', ',', 'é', '\u{2028}',
    '😀', '\u{7f}', '/',
];
const SEPARATORS: [&[u8]; 6] = [b"", b"\n", b"\r\n", b" ", b"\t\r\n ", b"\r\n\r\n"];
const CANNED_JUNK: [&[u8]; 8] = [
    b"\xff",
    b"garbage",
    b"}",
    b"]",
    b"\\",
    b"\x00\x01",
    b"true null 12",
    b"\xef\xbb\xbf",
];

/// Target 2, differential against `serde_json`. Input: a header (`max_size`, `max_depth`, chunk
/// seed and size), then a description of up to 64 top-level pieces: objects (maybe with an `id`),
/// arrays, strings, scalars or junk, each rendered compact, pretty or QEMU style, with whitespace
/// between.
///
/// Every object within the limits must come out as a frame that is byte for byte its rendering
/// and parses with `serde_json` to the generated value; every other object, array and string must
/// come out as the right report (size, depth, sniffed `id`), in order, whole or chunked; when the
/// stream holds no junk, `serde_json`'s own stream reader must agree.
pub fn splitter_differential(data: &[u8]) {
    let mut u = Unstructured::new(data);
    let Ok(h) = DifferentialHeader::arbitrary(&mut u) else {
        return;
    };
    let lim = Limits::new(
        usize::from(h.max_size) % 2048,
        usize::from(h.max_depth) % 24,
    );
    let mut stream = Vec::new();
    let mut expected = Vec::new();
    let mut values = Vec::new();
    let mut clean = true;
    // A generator error means the input ran out: test what was generated so far.
    let _ = generate(
        &mut u,
        lim,
        &mut stream,
        &mut expected,
        &mut values,
        &mut clean,
    );

    let whole = feed(&[&stream], lim, true, true);
    check_against_stream(&stream, &whole, lim, true);
    let chunks = pieces(&stream, h.chunk_seed, h.chunk_log);
    let chunked = feed(&chunks, lim, true, true);
    assert!(chunked == whole, "chunked\n{chunked:?}\nwhole\n{whole:?}");

    let got: Vec<&Item> = whole
        .iter()
        // Limits passed are said again when their value ends (`check_against_stream` checks
        // where).
        .filter(|i| {
            !matches!(
                i,
                Item::Error(FrameError::UnexpectedBytes { .. } | FrameError::OverLimit { .. })
            )
        })
        .collect();
    assert_eq!(
        got.len(),
        expected.len(),
        "values lost or invented: got {got:?}, expected {expected:?}"
    );
    for (n, (got, want)) in got.iter().zip(&expected).enumerate() {
        match (got, want) {
            (Item::Frame(frame), Expected::Frame { bytes, value }) => {
                assert_eq!(
                    frame, bytes,
                    "value {n}: the frame is not the rendered object"
                );
                let parsed: Value = serde_json::from_slice(frame)
                    .unwrap_or_else(|e| panic!("value {n}: serde_json refuses a frame: {e}"));
                assert_eq!(&parsed, value, "value {n}: parses to another value");
            }
            (Item::Error(e), Expected::Error(want)) => {
                assert_eq!(e, want, "value {n}: wrong report");
            }
            _ => panic!("value {n}: got {got:?}, expected {want:?}"),
        }
    }

    if clean {
        let parsed: Vec<Value> = serde_json::Deserializer::from_slice(&stream)
            .into_iter::<Value>()
            .collect::<Result<_, _>>()
            .unwrap_or_else(|e| panic!("serde_json refuses a stream without junk: {e}"));
        assert_eq!(parsed, values, "serde_json reads another stream");
    }
}

/// Generates the pieces, appending the rendering to `stream` and what the splitter must yield to
/// `expected`. `clean` turns false once a piece is junk or a bare scalar.
fn generate(
    u: &mut Unstructured<'_>,
    lim: Limits,
    stream: &mut Vec<u8>,
    expected: &mut Vec<Expected>,
    values: &mut Vec<Value>,
    clean: &mut bool,
) -> arbitrary::Result<()> {
    for _ in 0..64 {
        if u.is_empty() {
            break;
        }
        let kind = u.int_in_range(0..=9u8)?;
        let style = match u.int_in_range(0..=2u8)? {
            0 => Style::Compact,
            1 => Style::Pretty,
            _ => Style::Qemu,
        };
        let mut budget = 48u32;
        let value = match kind {
            0..=5 => {
                let mut object = gen_object(u, 1, &mut budget)?;
                match u.int_in_range(0..=3u8)? {
                    0 => {}
                    1 => {
                        object.insert("id".into(), Value::from(u.arbitrary::<u64>()?));
                    }
                    2 => {
                        object.insert("id".into(), Value::from(u.int_in_range(0..=20u64)?));
                    }
                    _ => {
                        object.insert("id".into(), gen_value(u, 1, &mut budget)?);
                    }
                }
                Some(Value::Object(object))
            }
            6 => Some(Value::Array(gen_array(u, 1, &mut budget)?)),
            7 => Some(Value::String(gen_string(u)?)),
            8 => {
                *clean = false;
                Some(match u.int_in_range(0..=2u8)? {
                    0 => Value::Null,
                    1 => Value::Bool(u.arbitrary()?),
                    _ => gen_number(u)?,
                })
            }
            _ => {
                *clean = false;
                if u.arbitrary()? {
                    stream.extend_from_slice(u.choose(&CANNED_JUNK)?);
                } else {
                    let n = u.int_in_range(1..=16usize)?;
                    // Bytes that cannot start a value, so the pieces stay where they are.
                    stream.extend(u.bytes(n)?.iter().map(|&b| match b {
                        b'{' | b'[' | b'"' => b'x',
                        b => b,
                    }));
                }
                None
            }
        };
        if let Some(value) = value {
            let bytes = render(&value, style);
            let (end, depth) = match lex_value(&bytes) {
                Some(found) => found,
                None => (bytes.len(), 0), // a scalar
            };
            assert_eq!(end, bytes.len(), "the harness rendered more than one value");
            assert_eq!(
                depth,
                value_depth(&value),
                "the harness lexes its own value wrongly"
            );
            let size = bytes.len();
            match &value {
                Value::Object(object) => {
                    let id = object.get("id").and_then(Value::as_u64);
                    expected.push(if depth > lim.depth {
                        Expected::Error(FrameError::TooDeep { size, id })
                    } else if size > lim.size {
                        Expected::Error(FrameError::TooLarge { size, id })
                    } else {
                        Expected::Frame {
                            bytes: bytes.clone(),
                            value: value.clone(),
                        }
                    });
                }
                Value::Array(_) | Value::String(_) => {
                    expected.push(Expected::Error(FrameError::NotAnObject { size }));
                }
                _ => {}
            }
            stream.extend_from_slice(&bytes);
            values.push(value);
        }
        stream.extend_from_slice(u.choose(&SEPARATORS)?);
        // Two bare scalars need a separator or they merge into one; that only matters to the
        // serde_json cross-check, which skips streams with scalars.
    }
    Ok(())
}

fn gen_value(u: &mut Unstructured<'_>, depth: usize, budget: &mut u32) -> arbitrary::Result<Value> {
    let top = if depth >= MAX_GEN_DEPTH || *budget == 0 {
        3
    } else {
        5
    };
    *budget = budget.saturating_sub(1);
    Ok(match u.int_in_range(0..=top)? {
        0 => Value::Null,
        1 => Value::Bool(u.arbitrary()?),
        2 => gen_number(u)?,
        3 => Value::String(gen_string(u)?),
        4 => Value::Array(gen_array(u, depth + 1, budget)?),
        _ => Value::Object(gen_object(u, depth + 1, budget)?),
    })
}

fn gen_array(
    u: &mut Unstructured<'_>,
    depth: usize,
    budget: &mut u32,
) -> arbitrary::Result<Vec<Value>> {
    let n = u.int_in_range(0..=4u8)?;
    (0..n).map(|_| gen_value(u, depth, budget)).collect()
}

fn gen_object(
    u: &mut Unstructured<'_>,
    depth: usize,
    budget: &mut u32,
) -> arbitrary::Result<Map<String, Value>> {
    let n = u.int_in_range(0..=4u8)?;
    let mut object = Map::new();
    for _ in 0..n {
        let key = gen_string(u)?;
        object.insert(key, gen_value(u, depth, budget)?);
    }
    Ok(object)
}

/// Numbers that survive a round trip exactly: integers, and small dyadic fractions.
fn gen_number(u: &mut Unstructured<'_>) -> arbitrary::Result<Value> {
    Ok(match u.int_in_range(0..=2u8)? {
        0 => Value::from(u.arbitrary::<u64>()?),
        1 => Value::from(u.arbitrary::<i64>()?),
        _ => {
            let mantissa = u.arbitrary::<i32>()?;
            let shift = u.int_in_range(0..=8u32)?;
            Value::from(f64::from(mantissa) / f64::from(1u32 << shift))
        }
    })
}

fn gen_string(u: &mut Unstructured<'_>) -> arbitrary::Result<String> {
    let n = u.int_in_range(0..=10u8)?;
    (0..n)
        .map(|_| {
            Ok(match u.int_in_range(0..=3u8)? {
                0 => *u.choose(&SPECIAL_CHARS)?,
                1 => u.arbitrary::<char>()?,
                _ => char::from(b'a' + u.int_in_range(0..=25u8)?),
            })
        })
        .collect()
}

/// Nesting depth as the splitter counts it: every object and array is a level.
fn value_depth(value: &Value) -> usize {
    match value {
        Value::Array(items) => 1 + items.iter().map(value_depth).max().unwrap_or(0),
        Value::Object(members) => 1 + members.values().map(value_depth).max().unwrap_or(0),
        _ => 0,
    }
}

pub(crate) fn render(value: &Value, style: Style) -> Vec<u8> {
    match style {
        Style::Compact => serde_json::to_vec(value).expect("a Value serializes"),
        Style::Pretty => {
            let mut out = Vec::new();
            let formatter = serde_json::ser::PrettyFormatter::with_indent(b"    ");
            let mut ser = serde_json::Serializer::with_formatter(&mut out, formatter);
            value.serialize(&mut ser).expect("a Value serializes");
            crlf(&out)
        }
        Style::Qemu => {
            let mut out = Vec::new();
            render_qemu(value, 0, &mut out);
            out
        }
    }
}

/// LF to CRLF. Newlines only occur as whitespace: inside strings they are escaped.
fn crlf(bytes: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(bytes.len() + bytes.len() / 8);
    for &b in bytes {
        if b == b'\n' {
            out.push(b'\r');
        }
        out.push(b);
    }
    out
}

/// QEMU's `pretty=on` layout (`qobject/qjson.c`): a newline and indent before every member and
/// before the closing bracket, even of an empty container.
pub(crate) fn render_qemu(value: &Value, level: usize, out: &mut Vec<u8>) {
    let indent = |level: usize, out: &mut Vec<u8>| {
        out.extend_from_slice(b"\r\n");
        out.extend(std::iter::repeat_n(b' ', 4 * level));
    };
    match value {
        Value::Object(members) => {
            out.push(b'{');
            for (i, (key, member)) in members.iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                indent(level + 1, out);
                out.extend(serde_json::to_vec(key).expect("a string serializes"));
                out.extend_from_slice(b": ");
                render_qemu(member, level + 1, out);
            }
            indent(level, out);
            out.push(b'}');
        }
        Value::Array(items) => {
            out.push(b'[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                indent(level + 1, out);
                render_qemu(item, level + 1, out);
            }
            indent(level, out);
            out.push(b']');
        }
        scalar => out.extend(serde_json::to_vec(scalar).expect("a Value serializes")),
    }
}
