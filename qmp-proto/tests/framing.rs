//! The splitter on its own: framing by JSON value under any chunking, with junk and limits.
mod common;

use common::*;
use proptest::prelude::*;
use qmp_proto::framing::{FrameError, JsonSplitter};
use serde_json::{Map, Value};

/// Every frame and error, feeding `bytes` in `pieces`, then EOF.
fn split(
    bytes: &[u8],
    chunking: Chunking,
    max_size: usize,
    max_depth: usize,
) -> Vec<Result<Vec<u8>, FrameError>> {
    let mut s = JsonSplitter::new(max_size, max_depth);
    let mut out = Vec::new();
    for piece in pieces(bytes, chunking) {
        s.push(piece);
        while let Some(f) = s.next_frame() {
            out.push(f.map(<[u8]>::to_vec));
        }
        assert!(s.buffered() <= max_size + piece.len() + 1, "buffer bounded");
    }
    s.finish();
    while let Some(f) = s.next_frame() {
        out.push(f.map(<[u8]>::to_vec));
    }
    assert!(s.is_idle());
    out
}

fn json_value() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(Value::from),
        (-1e6f64..1e6).prop_map(Value::from),
        "[a-z{}\\[\\]\"\\\\ \u{e9}\u{1F600}\\n\\t]{0,12}".prop_map(Value::String),
    ];
    leaf.prop_recursive(6, 48, 6, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
            prop::collection::btree_map("[a-z\"{}]{0,6}", inner, 0..6)
                .prop_map(|m| Value::Object(m.into_iter().collect::<Map<_, _>>())),
        ]
    })
}

fn object() -> impl Strategy<Value = Value> {
    prop::collection::btree_map("[a-z]{1,6}", json_value(), 0..5)
        .prop_map(|m| Value::Object(m.into_iter().collect()))
}

/// Junk that cannot start a value: whitespace, control bytes, 0xFF, letters, digits, closers.
/// (A quote starts a top-level string, which is skipped as a value: see `malformed.rs`.)
fn junk() -> impl Strategy<Value = Vec<u8>> {
    prop::collection::vec(
        prop_oneof![
            Just(b' '),
            Just(b'\r'),
            Just(b'\n'),
            Just(0xFF),
            Just(0),
            Just(1),
            Just(b'x'),
            Just(b'7'),
            Just(b'}'),
            Just(b']')
        ],
        0..6,
    )
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    /// Objects rendered compact or pretty (CRLF), with junk between them, split anywhere: the frames
    /// are exactly the objects, in order, each equal to what serde_json parses.
    #[test]
    fn frames_equal_the_objects_under_any_chunking(
        items in prop::collection::vec((object(), any::<bool>(), junk()), 1..8),
        seed in any::<u64>(),
    ) {
        let mut stream = Vec::new();
        let mut want = Vec::new();
        let mut junk_runs = 0;
        for (obj, pretty, junk) in &items {
            let text = if *pretty { serde_json::to_string_pretty(obj).unwrap().replace('\n', "\r\n") } else { obj.to_string() };
            stream.extend_from_slice(text.as_bytes());
            // Compare with what serde_json reads back (its float printing does not round-trip).
            want.push(serde_json::from_str::<Value>(&text).unwrap());
            stream.extend_from_slice(junk);
            if junk.iter().any(|b| !b" \r\n".contains(b)) { junk_runs += 1; }
        }
        let whole = split(&stream, Chunking::Whole, 1 << 20, 127);
        for chunking in [Chunking::ByteAtATime, Chunking::Random(seed)] {
            prop_assert_eq!(&split(&stream, chunking, 1 << 20, 127), &whole);
        }
        let frames: Vec<Value> = whole.iter().filter_map(|f| f.as_ref().ok()).map(|f| serde_json::from_slice(f).unwrap()).collect();
        prop_assert_eq!(frames, want);
        prop_assert_eq!(whole.iter().filter(|f| matches!(f, Err(FrameError::UnexpectedBytes { .. }))).count(), junk_runs);
    }

    /// Arbitrary bytes: no panic, bounded memory, identical results under any chunking.
    #[test]
    fn arbitrary_bytes_split_the_same_under_any_chunking(
        bytes in prop::collection::vec(prop_oneof![any::<u8>(), Just(b'{'), Just(b'}'), Just(b'"'), Just(b'\\'), Just(b'[')], 0..600),
        seed in any::<u64>(),
        max_size in 2usize..200,
        max_depth in 1usize..8,
    ) {
        let whole = split(&bytes, Chunking::Whole, max_size, max_depth);
        prop_assert_eq!(&split(&bytes, Chunking::ByteAtATime, max_size, max_depth), &whole);
        prop_assert_eq!(&split(&bytes, Chunking::Random(seed), max_size, max_depth), &whole);
        for f in whole.iter().flatten() {
            prop_assert!(f.len() <= max_size);
        }
    }
}

#[test]
fn sizes_of_skipped_values_are_exact_and_depth_wins_over_size() {
    let deep = format!("{}{}", "{\"a\":".repeat(10), "}".repeat(10));
    for chunking in CHUNKINGS {
        let big = format!("{{\"k\": \"{}\"}}", "x".repeat(300));
        let stream = format!("{big}\r\n[1, {{\"a\": 2}}]{deep} {{}}");
        let got = split(stream.as_bytes(), chunking, 100, 4);
        assert_eq!(
            got,
            [
                // Said where the limit is passed (byte 101; the 5th `{`), and when it ends.
                Err(FrameError::OverLimit {
                    too_deep: false,
                    size: 101,
                    id: None
                }),
                Err(FrameError::TooLarge {
                    size: big.len(),
                    id: None
                }),
                Err(FrameError::NotAnObject { size: 13 }),
                Err(FrameError::OverLimit {
                    too_deep: true,
                    size: 21,
                    id: None
                }),
                Err(FrameError::TooDeep {
                    size: deep.len(),
                    id: None
                }),
                Ok(b"{}".to_vec()),
            ],
            "{chunking:?}"
        );
        // Too deep and too large at once: always reported as too deep, whatever the chunking.
        let both = format!("{{\"pad\": \"{}\", \"d\": {}}}", "x".repeat(200), deep);
        assert_eq!(
            split(both.as_bytes(), chunking, 100, 4),
            [
                Err(FrameError::OverLimit {
                    too_deep: false,
                    size: 101,
                    id: None
                }),
                Err(FrameError::TooDeep {
                    size: both.len(),
                    id: None
                })
            ]
        );
    }
}

#[test]
fn ten_thousand_levels_of_nesting_do_not_overflow_anything() {
    for open in ["[", "{\"a\":"] {
        let close = if open == "[" { "]" } else { "}" };
        let body = format!("{}{}", open.repeat(10_000), close.repeat(10_000));
        let stream = format!("{{\"x\": {body}}}{body}{{\"ok\": 1}}");
        let got = split(stream.as_bytes(), Chunking::Random(9), 1 << 20, 64);
        assert_eq!(split(stream.as_bytes(), Chunking::Whole, 1 << 20, 64), got);
        assert!(matches!(
            got[0],
            Err(FrameError::OverLimit { too_deep: true, .. })
        ));
        // Past QEMU's own nesting limit the value is given up, where that depth is passed (its
        // 1025th level, its 1024th opening after the outer `{`), and the rest is read afresh:
        // junk, then the next real message.
        let size = "{\"x\": ".len() + open.len() * 1023 + 1;
        assert_eq!(got[1], Err(FrameError::TooDeepToSkip { size }));
        assert_eq!(got.last(), Some(&Ok(b"{\"ok\": 1}".to_vec())));
    }
}

#[test]
fn a_limit_is_reported_when_passed_not_when_the_value_ends() {
    for chunking in CHUNKINGS {
        // A string that never ends, then more of it: said once, at byte 101, nothing buffered.
        let mut s = JsonSplitter::new(100, 8);
        let mut got = Vec::new();
        for piece in pieces(
            format!("{{\"return\": \"{}", "x".repeat(300)).as_bytes(),
            chunking,
        ) {
            s.push(piece);
            while let Some(f) = s.next_frame() {
                got.push(f.map(<[u8]>::to_vec));
            }
        }
        for _ in 0..100 {
            s.push(&[b'x'; 1000]);
            assert_eq!(s.next_frame(), None);
            assert!(s.buffered() <= 1000);
        }
        let over = FrameError::OverLimit {
            too_deep: false,
            size: 101,
            id: None,
        };
        assert_eq!(got, [Err(over)], "{chunking:?}");
        // Nesting that never closes: said at the level past the limit, with an id seen before.
        let mut s = JsonSplitter::new(1 << 20, 4);
        let mut got = Vec::new();
        for piece in pieces(b"{\"id\": 9, \"return\": [[[[[[[[", chunking) {
            s.push(piece);
            while let Some(f) = s.next_frame() {
                got.push(f.map(<[u8]>::to_vec));
            }
        }
        let over = FrameError::OverLimit {
            too_deep: true,
            size: 24,
            id: Some(9),
        };
        assert_eq!(got, [Err(over)], "{chunking:?}");
    }
}

#[test]
fn strings_hide_braces_and_escapes_hide_quotes() {
    let stream = br#"{"a": "}{][\"\\"}{"b": "\\\"}"}"#;
    for chunking in CHUNKINGS {
        assert_eq!(
            split(stream, chunking, 1 << 10, 8),
            [
                Ok(br#"{"a": "}{][\"\\"}"#.to_vec()),
                Ok(br#"{"b": "\\\"}"}"#.to_vec())
            ]
        );
    }
}

#[test]
fn eof_inside_a_value_or_junk_is_reported() {
    assert_eq!(
        split(b"{\"a\": [1, 2", Chunking::Whole, 100, 8),
        [Err(FrameError::Truncated { len: 11 })]
    );
    assert_eq!(
        split(b"{}\xff\xfe", Chunking::ByteAtATime, 100, 8),
        [
            Ok(b"{}".to_vec()),
            Err(FrameError::UnexpectedBytes {
                len: 2,
                head: vec![0xff, 0xfe]
            })
        ]
    );
    assert_eq!(
        split(b"{}\r\n \t", Chunking::Whole, 100, 8),
        [Ok(b"{}".to_vec())],
        "trailing whitespace is clean"
    );
}

#[test]
fn a_fifty_megabyte_message_in_small_pieces_is_buffered_once_and_scanned_once() {
    // Linear time: if the splitter rescanned or moved the buffer on every push this would take
    // minutes (12,800 pieces x 50 MB).
    let body = "y".repeat(50 << 20);
    let msg = format!("{{\"return\": \"{body}\", \"id\": 1}}");
    let mut s = JsonSplitter::new(64 << 20, 8);
    let mut frames = 0;
    for piece in msg.as_bytes().chunks(4096) {
        s.push(piece);
        while let Some(f) = s.next_frame() {
            assert_eq!(f.unwrap().len(), msg.len());
            frames += 1;
        }
    }
    assert_eq!(frames, 1);
}

#[test]
fn a_skipped_object_still_yields_its_top_level_integer_id() {
    let pad = "x".repeat(200);
    let cases = [
        (format!(r#"{{"return": "{pad}", "id": 42}}"#), Some(42)),
        (
            format!(r#"{{"id": 7, "error": {{"class": "C", "desc": "{pad}"}}}}"#),
            Some(7),
        ),
        (
            format!(r#"{{"id" : 18446744073709551615 , "return": "{pad}"}}"#),
            Some(u64::MAX),
        ),
        // Not ours: nested, a string, negative, fractional, too big, a member named "idx".
        (
            format!(r#"{{"return": {{"id": 5, "pad": "{pad}"}}}}"#),
            None,
        ),
        (format!(r#"{{"return": "{pad}", "id": "5"}}"#), None),
        (format!(r#"{{"return": "{pad}", "id": -5}}"#), None),
        (format!(r#"{{"return": "{pad}", "id": 5.0}}"#), None),
        (
            format!(r#"{{"return": "{pad}", "id": 18446744073709551616}}"#),
            None,
        ),
        (format!(r#"{{"return": "{pad}", "idx": 5}}"#), None),
        (format!(r#"{{"return": "\"id\": 5, {pad}"}}"#), None),
        (format!(r#"{{"return": "{pad}", "i\u0064": 5}}"#), None),
    ];
    for (msg, id) in cases {
        for chunking in CHUNKINGS {
            let got = split(msg.as_bytes(), chunking, 100, 8);
            assert!(
                matches!(
                    got[..],
                    [
                        Err(FrameError::OverLimit {
                            too_deep: false,
                            size: 101,
                            ..
                        }),
                        _
                    ]
                ),
                "{msg} {chunking:?}: {got:?}"
            );
            assert_eq!(
                got[1],
                Err(FrameError::TooLarge {
                    size: msg.len(),
                    id
                }),
                "{msg} {chunking:?}"
            );
        }
    }
}
