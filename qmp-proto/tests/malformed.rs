//! Hostile and broken server output: invalid JSON and UTF-8, stray bytes, non-objects, objects that
//! are not QMP messages, odd errors and ids. Each is reported (or tolerated) and the connection
//! carries on: a normal response right after it still completes its request.
mod common;

use common::*;
use qmp_proto::{
    CommandError, Config, Excerpt, Malformed, MalformedKind, Output, QmpError, RawJson, Timestamp,
};
use serde_json::json;

/// Sends `hostile` (then CRLF) from the server between a request and its response, under every
/// chunking, and checks that the outputs are the same each time and that the response still
/// completes request 1. Returns the outputs the hostile bytes produced.
fn survive(hostile: &[u8]) -> Vec<Output> {
    same_under_every_chunking(|chunking| {
        let mut pair = Pair::ready(Config::default(), FakeQemu::default(), chunking);
        let id = pair.execute("query-status");
        assert_eq!(id.get(), 1);
        pair.drive();
        let cmd = pair.server.next_command().unwrap();
        pair.server.send_raw(hostile);
        pair.server.send_raw(b"\r\n");
        pair.server.reply(&cmd, json!({"status": "running"}));
        pair.drive();
        let mut out = pair.take_outputs();
        assert_eq!(
            out.pop(),
            Some(Output::Response {
                id,
                result: Ok(RawJson::from_json(r#"{"status":"running"}"#).unwrap())
            }),
            "after {:?}",
            String::from_utf8_lossy(hostile)
        );
        assert_eq!(pair.client.pending(), 0);
        assert!(!pair.client.is_closed());
        let malformed = out
            .iter()
            .filter(|o| matches!(o, Output::Malformed(_)))
            .count();
        assert_eq!(pair.client.stats().malformed, malformed as u64);
        out
    })
}

/// The one `Malformed` that `hostile` produced.
fn one_malformed(hostile: &[u8]) -> Malformed {
    match &survive(hostile)[..] {
        [Output::Malformed(m)] => m.clone(),
        other => panic!(
            "{:?}: {:?}",
            String::from_utf8_lossy(hostile),
            canonical(other)
        ),
    }
}

/// Sends request 1, lets the server answer it with `response` (where `ID` stands for the id), and
/// returns the outputs; then checks a second request still completes normally.
fn answer_with(response: &str) -> Vec<Output> {
    same_under_every_chunking(|chunking| {
        let mut pair = Pair::ready(Config::default(), FakeQemu::default(), chunking);
        let id = pair.execute("x");
        pair.drive();
        let _ = pair.server.next_command().unwrap();
        pair.server
            .send_raw(response.replace("ID", &id.to_string()).as_bytes());
        pair.server.send_raw(b"\r\n");
        pair.drive();
        let out = pair.take_outputs();
        let next = pair.execute("y");
        pair.drive();
        pair.server.reply_all();
        pair.drive();
        assert!(
            matches!(&pair.outputs[..], [Output::Response { id, result: Ok(_) }] if *id == next),
            "after {response}: {:?}",
            pair.outputs
        );
        out
    })
}

// --- Invalid JSON and UTF-8 ------------------------------------------------------------------

#[test]
fn invalid_json_objects_are_reported_with_an_excerpt_and_skipped() {
    for bad in [
        r#"{"return": }"#,
        r#"{]"#,
        r#"{"return": {}, "id": 1,}"#,
        r#"{"return": [1, 2,], "id": 1}"#,
        r#"{"return": {"a": 1,}, "id": 1}"#,
        r#"{"return" {}, "id": 1}"#,
        r#"{"return": {} "id": 1}"#,
        r#"{"return": tru, "id": 1}"#,
        r#"{'return': {}, 'id': 1}"#,
        r#"{"return": {}, "id": 01}"#,
        r#"{"return": {}, "id": +1}"#,
        r#"{"return": NaN, "id": 1}"#,
        r#"{"return": "\x", "id": 1}"#,
        r#"{"return": {}, "id": 1 /* comment */}"#,
        r#"{return: {}, id: 1}"#,
    ] {
        let m = one_malformed(bad.as_bytes());
        let MalformedKind::InvalidJson { reason } = &m.kind else {
            panic!("{bad}: {m:?}")
        };
        // A position, never content.
        assert!(
            !reason.contains("return") && reason.contains("column"),
            "{bad}: {reason}"
        );
        assert_eq!(m.excerpt.as_str(), bad);
    }
}

#[test]
fn an_object_left_open_takes_in_what_follows_until_its_depth_closes() {
    // Messages are framed by depth alone (as QEMU frames its input), so the response after an
    // unclosed object becomes part of it; the stream recovers once depth is back to zero.
    let out = same_under_every_chunking(|chunking| {
        let mut pair = Pair::ready(Config::default(), FakeQemu::default(), chunking);
        let a = pair.execute("a");
        let b = pair.execute("b");
        pair.drive();
        let ca = pair.server.next_command().unwrap();
        let cb = pair.server.next_command().unwrap();
        pair.server.send_raw(br#"{"event": "A", "#);
        pair.server.reply(&ca, json!({}));
        pair.server.send_raw(b"}\r\n");
        pair.server.reply(&cb, json!({}));
        pair.drive();
        assert_eq!(pair.responses(), [(b, Ok(json!({})))]);
        assert_eq!(pair.client.pending(), 1, "{a:?} was swallowed");
        pair.take_outputs()
    });
    assert!(
        matches!(&out[0], Output::Malformed(m) if matches!(m.kind, MalformedKind::InvalidJson { .. })),
        "{:?}",
        canonical(&out)
    );
}

#[test]
fn invalid_utf8_is_reported_and_skipped() {
    for bad in [
        &b"{\"return\": \"\xff\", \"id\": 1}"[..],
        b"{\"return\": \"\xc0\xaf\", \"id\": 1}", // overlong '/'
        b"{\"return\": \"\xed\xa0\x80\", \"id\": 1}", // a surrogate
        b"{\"return\": \"\xe2\x82\", \"id\": 1}", // cut short
        b"{\"return\": \"\xf8\x88\x80\x80\x80\", \"id\": 1}",
        b"{\"\xff\": 1, \"return\": {}, \"id\": 1}",
        b"{\"event\": \"\xfe\"}",
    ] {
        let m = one_malformed(bad);
        assert_eq!(m.kind, MalformedKind::InvalidUtf8, "{bad:?}");
        assert!(m.excerpt.as_str().contains('\u{FFFD}'), "{bad:?}");
        assert!(m.excerpt.as_str().starts_with("{\""));
    }
}

#[test]
fn nul_bytes_inside_messages_are_invalid_json_and_between_them_are_stray_bytes() {
    for bad in [
        &b"{\"return\": \"a\0b\", \"id\": 1}"[..],
        b"{\"return\":\0{}, \"id\": 1}",
        b"{\"ret\0urn\": {}, \"id\": 1}",
        b"{\0}",
    ] {
        assert!(
            matches!(one_malformed(bad).kind, MalformedKind::InvalidJson { .. }),
            "{bad:?}"
        );
    }
    // Between messages: one run, the CRLF after it counted in.
    let m = one_malformed(b"\0\0\0\0");
    assert_eq!(m.kind, MalformedKind::UnexpectedBytes { len: 6 });
    assert_eq!(m.excerpt.as_str(), "\0\0\0\0\r\n");

    let out = survive(b"{\"event\": \"A\"}\0{\"event\": \"B\"}\0\0");
    assert_eq!(
        canonical(&out),
        [
            "event A Some(Null) Timestamp { seconds: -1, microseconds: -1 }",
            "malformed UnexpectedBytes { len: 1 } \0",
            "event B Some(Null) Timestamp { seconds: -1, microseconds: -1 }",
            "malformed UnexpectedBytes { len: 4 } \0\0\r\n",
        ]
    );
}

// --- Stray bytes and values that are not objects ---------------------------------------------

#[test]
fn control_bytes_and_0xff_between_messages_are_one_run_of_the_right_length() {
    // Whitespace before the run is skipped; whitespace after it, up to the next value, is counted.
    let run = b"\x01\x02\x1b\x7f\xff\xfe junk \x04\t\x00\xff";
    let mut hostile = b"\r\n  ".to_vec();
    hostile.extend_from_slice(run);
    let m = one_malformed(&hostile);
    assert_eq!(
        m.kind,
        MalformedKind::UnexpectedBytes { len: run.len() + 2 }
    );
    assert_eq!(
        m.excerpt.as_str(),
        String::from_utf8_lossy(&[&run[..], b"\r\n"].concat())
    );

    // QGA's 0xFF sentinel, alone.
    assert_eq!(
        one_malformed(b"\xff").kind,
        MalformedKind::UnexpectedBytes { len: 3 }
    );

    // Two runs with a message between them are two reports.
    let out = survive(b"\x01\x01{\"event\": \"E\"}\xff");
    assert!(
        matches!(&out[..], [Output::Malformed(a), Output::Event(_), Output::Malformed(b)]
            if a.kind == MalformedKind::UnexpectedBytes { len: 2 }
            && b.kind == MalformedKind::UnexpectedBytes { len: 3 }),
        "{:?}",
        canonical(&out)
    );

    // A long run is one report, with its first bytes as the excerpt.
    let long = vec![b'x'; 10_000];
    let m = one_malformed(&long);
    assert_eq!(m.kind, MalformedKind::UnexpectedBytes { len: 10_002 });
    assert!(m.excerpt.as_str().bytes().all(|b| b == b'x'));
    assert!(!m.excerpt.as_str().is_empty() && m.excerpt.as_str().len() <= Excerpt::MAX);
}

#[test]
fn top_level_values_that_are_not_objects_are_skipped() {
    let junk = |s: &str| MalformedKind::UnexpectedBytes { len: s.len() + 2 };
    for (bad, kind) in [
        ("42", junk("42")),
        ("-1.5e3", junk("-1.5e3")),
        // Strings are delimited, so they are skipped as values (see below).
        (r#""str""#, MalformedKind::NotAnObject { size: 5 }),
        ("null", junk("null")),
        ("true", junk("true")),
        ("42 null", junk("42 null")),
        ("[1,2]", MalformedKind::NotAnObject { size: 5 }),
        ("[]", MalformedKind::NotAnObject { size: 2 }),
        (r#"["}"]"#, MalformedKind::NotAnObject { size: 5 }),
        // A response wrapped in an array is not a response: it must not complete request 1.
        (
            r#"[{"return": {"hijacked": true}, "id": 1}]"#,
            MalformedKind::NotAnObject { size: 41 },
        ),
    ] {
        assert_eq!(one_malformed(bad.as_bytes()).kind, kind, "{bad}");
    }
}

#[test]
fn top_level_strings_holding_brackets_are_skipped_whole() {
    // As in QEMU's lexer, a quote between messages starts a string, so brackets inside it cannot
    // start a message and desynchronise the quotes of the ones that follow.
    for bad in [r#""{""#, r#""[""#, r#""}{""#, r#""a{b\"}[""#] {
        let m = one_malformed(bad.as_bytes());
        assert_eq!(
            m.kind,
            MalformedKind::NotAnObject { size: bad.len() },
            "{bad}"
        );
    }
    let out = survive(br#""a{b" 1"#);
    assert!(
        matches!(&out[..], [Output::Malformed(a), Output::Malformed(b)]
            if a.kind == MalformedKind::NotAnObject { size: 5 }
            && b.kind == MalformedKind::UnexpectedBytes { len: 3 }),
        "{:?}",
        canonical(&out)
    );
}

// --- Objects that are not QMP messages -------------------------------------------------------

#[test]
fn objects_that_are_not_qmp_messages_are_unclassifiable() {
    for bad in [
        r#"{}"#,
        r#"{"foo": 1}"#,
        r#"{"id": 7}"#,
        r#"{"data": {}, "timestamp": {"seconds": 1, "microseconds": 2}}"#,
        r#"{"event": 5}"#,
        r#"{"event": null}"#,
        r#"{"event": ["SHUTDOWN"]}"#,
        r#"{"event": {"name": "SHUTDOWN"}}"#,
        // An id no request holds.
        r#"{"Return": {}, "id": 7}"#,
        r#"{"return ": {}, "id": 7}"#,
    ] {
        let m = one_malformed(bad.as_bytes());
        assert_eq!(m.kind, MalformedKind::Unclassifiable, "{bad}");
        assert_eq!(m.excerpt.as_str(), bad);
    }
}

#[test]
fn a_reply_with_our_id_but_neither_return_nor_error_fails_its_call_at_once() {
    for bad in [
        r#"{"id": 1}"#,
        r#"{"Return": {}, "id": 1}"#,
        r#"{"return ": {}, "id": 1}"#,
        r#"{"id": 1, "status": "running"}"#,
        r#"{"data": {}, "id": 1}"#,
    ] {
        let out = same_under_every_chunking(|chunking| {
            let mut pair = Pair::ready(Config::default(), FakeQemu::default(), chunking);
            let id = pair.execute("query-status");
            let next = pair.execute("query-status");
            pair.drive();
            let _ = pair.server.next_command().unwrap();
            let second = pair.server.next_command().unwrap();
            pair.server.send_raw(bad.as_bytes());
            pair.server.send_raw(b"\r\n");
            pair.drive();
            let out = pair.take_outputs();
            // The call whose id it carries fails now, naming what arrived; the session goes on.
            assert!(
                matches!(&out[..], [Output::Response { id: got, result: Err(CommandError::NotAReply(e)) }]
                    if *got == id && e.as_str() == bad),
                "{bad}: {out:?}"
            );
            assert!(!pair.client.is_closed());
            pair.server.reply(&second, json!({}));
            pair.drive();
            let out = pair.take_outputs();
            assert!(
                matches!(&out[..], [Output::Response { id: got, result: Ok(_) }] if *got == next)
            );
            out
        });
        assert_eq!(out.len(), 1);
    }
    let e = CommandError::NotAReply(Excerpt::default()).to_string();
    assert!(e.contains("neither `return` nor `error`"), "{e}");
}

// --- Odd responses -------------------------------------------------------------------------------

#[test]
fn errors_of_any_shape_still_complete_their_request() {
    let err = |class: &str, desc: &str| Err(CommandError::Qmp(QmpError::new(class, desc)));
    for (response, want) in [
        (r#"{"error": "string", "id": ID}"#, err("", r#""string""#)),
        (r#"{"error": {}, "id": ID}"#, err("", "")),
        (r#"{"error": {"class": "X"}, "id": ID}"#, err("X", "")),
        (r#"{"error": {"desc": "only"}, "id": ID}"#, err("", "only")),
        (
            r#"{"error": {"class": 5, "desc": "d"}, "id": ID}"#,
            err("", r#"{"class": 5, "desc": "d"}"#),
        ),
        (r#"{"error": null, "id": ID}"#, err("", "null")),
        (r#"{"error": [1, 2], "id": ID}"#, err("", "[1, 2]")),
        (r#"{"error": 42, "id": ID}"#, err("", "42")),
        (
            r#"{"error": {"class": "GenericError", "desc": "d", "data": {"x": [1]}}, "id": ID}"#,
            err("GenericError", "d"),
        ),
        // Both members: one outcome, the error.
        (
            r#"{"return": {}, "error": {"class": "C", "desc": "d"}, "id": ID}"#,
            err("C", "d"),
        ),
        (
            r#"{"error": {"class": "C", "desc": "d"}, "return": {}, "id": ID}"#,
            err("C", "d"),
        ),
    ] {
        let out = answer_with(response);
        assert!(
            matches!(&out[..], [Output::Response { id, result }] if id.get() == 1 && *result == want),
            "{response}: {out:?}"
        );
    }
}

#[test]
fn odd_return_values_still_complete_their_request() {
    for (response, want) in [
        (r#"{"return": null, "id": ID}"#, "null"),
        (r#"{"return": 1e999, "id": ID}"#, "1e999"),
        (r#"{"return": "\ud800", "id": ID}"#, r#""\ud800""#),
        (r#"{"id": ID, "return": [1]}"#, "[1]"),
        // Member names are compared after unescaping.
        (r#"{"\u0072eturn": 2, "\u0069d": ID}"#, "2"),
        (
            "{\r\n    \"return\": {\r\n    },\r\n    \"id\":\r\n        ID\r\n}",
            "{\r\n    }",
        ),
    ] {
        let out = answer_with(response);
        assert!(
            matches!(&out[..], [Output::Response { id, result: Ok(raw) }] if id.get() == 1 && raw.get() == want),
            "{response}: {out:?}"
        );
    }
}

#[test]
fn ids_that_are_not_exactly_ours_are_unmatched_and_complete_nothing() {
    for id in [
        r#""1""#,
        "1.0",
        "1e0",
        "1E0",
        "-1",
        "-0",
        "[1]",
        r#"{"id": 1}"#,
        "true",
        "null",
        "0",
        "2",
        "18446744073709551617",
    ] {
        let response = format!(r#"{{"return": {{}}, "id": {id}}}"#);
        let out = survive(response.as_bytes());
        assert!(
            matches!(&out[..], [Output::Unmatched(u)]
                if u.id.as_ref().map(RawJson::get) == Some(id) && u.result.is_ok()),
            "{id}: {out:?}"
        );
        let error = format!(r#"{{"error": {{"class": "C", "desc": "d"}}, "id": {id}}}"#);
        let out = survive(error.as_bytes());
        assert!(
            matches!(&out[..], [Output::Unmatched(u)] if u.result == Err(QmpError::new("C", "d"))),
            "{id}: {out:?}"
        );
    }
}

#[test]
fn unknown_members_are_tolerated_everywhere() {
    let out = answer_with(
        r#"{"x-new": {"deep": [1, {"return": 2, "id": 3}]}, "return": {"a": 1}, "id": ID, "event": "NOT_AN_EVENT", "data": 7}"#,
    );
    assert!(
        matches!(&out[..], [Output::Response { result: Ok(raw), .. }] if raw.to_value().unwrap() == json!({"a": 1})),
        "{out:?}"
    );
    let out = answer_with(
        r#"{"error": {"class": "C", "desc": "d", "x-hint": [1]}, "id": ID, "x-more": null}"#,
    );
    assert!(
        matches!(&out[..], [Output::Response { result: Err(CommandError::Qmp(e)), .. }] if *e == QmpError::new("C", "d"))
    );

    let out = survive(
        br#"{"x-before": 1, "event": "E", "data": {"a": [1]}, "timestamp": {"seconds": 5, "microseconds": 6, "nanoseconds": 7}, "x-after": {"event": 1}}
{"event": "NO_DATA", "timestamp": {"seconds": 1}}
{"event": "ODD", "data": [1], "timestamp": "yesterday"}"#,
    );
    let [Output::Event(e), Output::Event(no_data), Output::Event(odd)] = &out[..] else {
        panic!("{out:?}")
    };
    assert_eq!(
        (e.name.as_str(), e.data_value().unwrap()),
        ("E", json!({"a": [1]}))
    );
    assert_eq!((e.timestamp.seconds, e.timestamp.microseconds), (5, 6));
    assert_eq!(
        (no_data.data.is_none(), no_data.timestamp),
        (true, Timestamp::UNKNOWN)
    );
    assert_eq!(
        (odd.data_value().unwrap(), odd.timestamp),
        (json!([1]), Timestamp::UNKNOWN)
    );
}

// --- What reports reveal ---------------------------------------------------------------------

#[test]
fn excerpts_are_redacted_in_debug_and_readable_with_as_str() {
    let out = survive(b"{\"return\": {\"password\": \"hunter2\"}, \"id\": }\x01secret=hunter2\x01");
    let [Output::Malformed(json), Output::Malformed(junk)] = &out[..] else {
        panic!("{out:?}")
    };
    for m in [json, junk] {
        let debug = format!("{m:?} {:?} {:?}", m.excerpt, out);
        assert!(!debug.contains("hunter2"), "{debug}");
        assert!(debug.contains("redacted"), "{debug}");
        assert!(m.excerpt.as_str().contains("hunter2"));
        assert!(
            m.excerpt.to_string().contains("hunter2"),
            "Display shows it"
        );
        assert!(
            !m.to_string().contains("hunter2"),
            "the report itself does not"
        );
    }
    assert_eq!(
        format!("{:?}", json.excerpt),
        format!("<{} bytes redacted>", json.excerpt.as_str().len())
    );

    // Nor do the other outputs print what the server sent.
    let out = survive(br#"{"return": {"password": "hunter2"}, "id": 99}"#);
    let debug = format!("{out:?}");
    assert!(!debug.contains("hunter2"), "{debug}");
}

#[test]
fn excerpts_are_at_most_max_bytes_and_cut_on_a_character_boundary() {
    // Long ASCII: exactly the first MAX bytes.
    let long = format!(r#"{{"return": "{}", "id": }}"#, "a".repeat(1000));
    let m = one_malformed(long.as_bytes());
    assert_eq!(m.excerpt.as_str(), &long[..Excerpt::MAX]);

    // A 3-byte character across the cut: the excerpt stops before it.
    let euro = format!(r#"{{"return": "{}", "id": }}"#, "€".repeat(100));
    let m = one_malformed(euro.as_bytes());
    let s = m.excerpt.as_str();
    assert!(
        s.len() <= Excerpt::MAX && s.len() > Excerpt::MAX - 3,
        "{}",
        s.len()
    );
    assert!(euro.starts_with(s));

    // Stray bytes: their first few.
    let m = one_malformed("x".repeat(500).as_bytes());
    assert!(m.excerpt.as_str().len() <= Excerpt::MAX);
}

#[test]
fn excerpts_of_invalid_utf8_are_at_most_max_bytes() {
    let frame = [&b"{\"return\": \""[..], &[0xFF; 100], b"\", \"id\": 1}"].concat();
    let m = one_malformed(&frame);
    assert_eq!(m.kind, MalformedKind::InvalidUtf8);
    assert!(
        m.excerpt.as_str().len() <= Excerpt::MAX,
        "{} bytes",
        m.excerpt.as_str().len()
    );
    let m = one_malformed(&[0xFF; 40]);
    assert!(
        m.excerpt.as_str().len() <= Excerpt::MAX,
        "{} bytes",
        m.excerpt.as_str().len()
    );
}
