//! Every limit hit on purpose: message size and depth, pending requests, command size, output
//! backpressure, and the configuration that sets them. Past each one the connection carries on.
mod common;

use common::*;
use qmp_proto::{
    CloseReason, Command, CommandError, Config, ConfigError, MAX_DEPTH_LIMIT, Malformed,
    MalformedKind, Output, ProtocolError, RawJson, SendError,
};
use serde_json::{Value, json};

/// `{"return": <pad>, "id": <id>}` padded with a string to exactly `size` bytes.
fn response_of_size(size: usize, id: u64) -> String {
    let empty = format!(r#"{{"return": "", "id": {id}}}"#);
    assert!(size >= empty.len());
    format!(
        r#"{{"return": "{}", "id": {id}}}"#,
        "p".repeat(size - empty.len())
    )
}

/// A value nested `depth` levels deep: arrays (`[[[]]]`) or objects (`{"a":{"a":1}}`).
fn nested(depth: usize, arrays: bool) -> String {
    if arrays {
        format!("{}{}", "[".repeat(depth), "]".repeat(depth))
    } else {
        format!("{}1{}", r#"{"a":"#.repeat(depth), "}".repeat(depth))
    }
}

fn malformed(kind: MalformedKind) -> impl Fn(&Output) -> bool {
    move |o| matches!(o, Output::Malformed(Malformed { kind: k, .. }) if *k == kind)
}

fn ok_response(out: &Output, want: u64) -> bool {
    matches!(out, Output::Response { id, result: Ok(_) } if id.get() == want)
}

// --- Message size --------------------------------------------------------------------------------

#[test]
fn a_message_over_max_message_size_is_skipped_with_its_exact_size_and_the_next_one_works() {
    let config = Config::builder().max_message_size(1024).build().unwrap();
    let big_event = format!(
        r#"{{"event": "BIG", "data": {{"blob": "{}"}}, "timestamp": {{"seconds": 1, "microseconds": 2}}}}"#,
        "x".repeat(2000)
    );
    let out = same_under_every_chunking(|chunking| {
        let mut pair = Pair::ready(config.clone(), FakeQemu::default(), chunking);
        let lost = pair.execute("query-big");
        let next = pair.execute("query-small");
        pair.drive();
        let big_response = response_of_size(5000, lost.get());
        pair.server.send_raw(big_event.as_bytes());
        pair.server.send_raw(b"\r\n");
        pair.server.send_raw(big_response.as_bytes());
        pair.server.send_raw(b"\r\n");
        pair.server
            .send_raw(format!("{{\"return\": {{\"ok\": true}}, \"id\": {next}}}\r\n").as_bytes());
        pair.drive();
        let out = pair.take_outputs();
        assert_eq!(
            out[2],
            Output::Response {
                id: next,
                result: Ok(RawJson::from_json(r#"{"ok": true}"#).unwrap())
            }
        );
        // Nothing of a skipped message is kept but its id, sniffed on the way past. Without an
        // id before the limit, a message passing it may be the reply to the oldest command in
        // flight: that fails at once (byte 1025), rather than when or if the message ends. Here
        // the message was an event, and the command's real reply, itself too large, is dropped
        // as late.
        assert_eq!(
            out[0],
            Output::Response {
                id: lost,
                result: Err(CommandError::ResponseTooLarge { size: 1025 })
            }
        );
        assert_eq!(pair.client.pending(), 0);
        assert_eq!(pair.client.stats().malformed, 1);
        assert_eq!(pair.client.stats().late, 1);
        out
    });
    assert!(malformed(MalformedKind::TooLarge {
        size: big_event.len()
    })(&out[1]));
    let Output::Malformed(m) = &out[1] else {
        panic!()
    };
    assert_eq!(
        m.excerpt.as_str(),
        "",
        "nothing of a skipped message is kept"
    );
}

#[test]
fn exactly_max_message_size_is_accepted_and_one_byte_more_is_not() {
    for max in [256, 1000, 4096] {
        let config = Config::builder().max_message_size(max).build().unwrap();
        let out = same_under_every_chunking(|chunking| {
            let mut pair = Pair::ready(config.clone(), FakeQemu::default(), chunking);
            let a = pair.execute("a");
            let b = pair.execute("b");
            pair.drive();
            // Whitespace around a message does not count towards its size.
            pair.server
                .send_raw(format!("\r\n {}\r\n ", response_of_size(max, a.get())).as_bytes());
            pair.server
                .send_raw(format!("{}\r\n", response_of_size(max + 1, b.get())).as_bytes());
            pair.drive();
            assert_eq!(pair.client.pending(), 0);
            pair.take_outputs()
        });
        assert_eq!(out.len(), 2, "{max}: {:?}", canonical(&out));
        assert!(ok_response(&out[0], 1), "{max}: {:?}", out[0]);
        assert!(matches!(
            out[1],
            Output::Response { result: Err(CommandError::ResponseTooLarge { size }), .. } if size == max + 1
        ));
    }
}

#[test]
fn a_fifty_megabyte_message_in_4k_pieces_keeps_the_input_buffer_bounded() {
    const MAX: usize = 1 << 20;
    const CHUNK: usize = 4096;
    let config = Config::builder().max_message_size(MAX).build().unwrap();
    let mut pair = Pair::ready(config, FakeQemu::default(), Chunking::Whole);
    let lost = pair.execute("query-named-block-nodes");
    let next = pair.execute("query-status");
    pair.drive();

    // Structure and strings mixed, as in query-named-block-nodes or a base64 guest-file-read.
    let item = br##"{"node-name": "#block0123", "file": "aGVsbG8gd29ybGQgaGVsbG8gd29ybGQ=", "children": [1, 2.5e3, {"x": null, "s": "}]\"{["}], "ro": false},"##;
    let mut big = Vec::with_capacity(50_000_200);
    big.extend_from_slice(br#"{"return": ["#);
    while big.len() < 50_000_000 {
        big.extend_from_slice(item);
    }
    big.extend_from_slice(format!(r#"{{}}], "id": {lost}}}"#).as_bytes());
    let size = big.len();
    let mut stream = big;
    stream.extend_from_slice(format!("\r\n{{\"return\": {{}}, \"id\": {next}}}\r\n").as_bytes());

    let conn = &mut pair.client;
    let before = conn.stats().bytes_received;
    let mut out = Vec::new();
    let mut peak = 0;
    for piece in stream.chunks(CHUNK) {
        conn.handle_input(piece);
        peak = peak.max(conn.buffered_input());
        assert!(
            conn.buffered_input() <= MAX + CHUNK,
            "{} bytes buffered",
            conn.buffered_input()
        );
        out.extend(drain(conn));
    }
    assert!(peak > MAX / 2, "the start of the message was buffered");
    assert_eq!(conn.buffered_input(), 0);
    assert_eq!(out.len(), 2, "{:?}", canonical(&out));
    // Failed where the limit was passed, long before the message ended.
    assert_eq!(
        out[0],
        Output::Response {
            id: lost,
            result: Err(CommandError::ResponseTooLarge { size: MAX + 1 })
        }
    );
    assert!(size > MAX + 1);
    assert!(ok_response(&out[1], next.get()));
    assert_eq!(conn.stats().late, 1, "its end is dropped as late");
    assert_eq!(conn.stats().bytes_received - before, stream.len() as u64);
}

#[test]
fn fifty_megabytes_of_junk_are_reported_in_bounded_runs_and_never_buffered() {
    const MAX: usize = 1 << 20;
    const CHUNK: usize = 4096;
    let config = Config::builder().max_message_size(MAX).build().unwrap();
    let mut pair = Pair::ready(config, FakeQemu::default(), Chunking::Whole);
    let id = pair.execute("query-status");
    pair.drive();
    let junk_len = 50_000_000;
    let mut stream = vec![0x01u8; junk_len];
    stream.extend_from_slice(format!("{{\"return\": {{}}, \"id\": {id}}}").as_bytes());
    let conn = &mut pair.client;
    let mut out = Vec::new();
    for piece in stream.chunks(CHUNK) {
        conn.handle_input(piece);
        assert!(conn.buffered_input() <= CHUNK);
        out.extend(drain(conn));
    }
    let (last, runs) = out.split_last().unwrap();
    assert!(ok_response(last, id.get()));
    let lens: Vec<usize> = runs
        .iter()
        .map(|o| match o {
            Output::Malformed(Malformed {
                kind: MalformedKind::UnexpectedBytes { len },
                ..
            }) => *len,
            other => panic!("{other:?}"),
        })
        .collect();
    assert_eq!(lens.iter().sum::<usize>(), junk_len);
    assert!(lens.iter().all(|&l| l <= MAX));
    assert_eq!(lens.len(), junk_len.div_ceil(MAX));
}

// --- Nesting depth -------------------------------------------------------------------------------

#[test]
fn a_thousand_levels_of_nesting_are_skipped_without_recursion_and_the_stream_carries_on() {
    // Deeper than any limit a caller can set, within QEMU's own (SKIP_DEPTH_LIMIT).
    const DEEP: usize = 1000;
    let arrays = nested(DEEP, true);
    let objects = nested(DEEP, false);
    // Ids no request has: a skipped response to a pending request fails that request instead.
    let in_return_arrays = format!(r#"{{"return": {arrays}, "id": 99}}"#);
    let in_return_objects = format!(r#"{{"return": {objects}, "id": 99}}"#);
    let in_event = format!(r#"{{"event": "DEEP", "data": {{"x": {arrays}}}}}"#);
    let hostile = [
        (
            in_return_arrays.clone(),
            MalformedKind::TooDeep {
                size: in_return_arrays.len(),
            },
        ),
        (
            in_return_objects.clone(),
            MalformedKind::TooDeep {
                size: in_return_objects.len(),
            },
        ),
        (
            in_event.clone(),
            MalformedKind::TooDeep {
                size: in_event.len(),
            },
        ),
        // Top level: an array is not an object, whatever its depth; an object is too deep.
        (
            arrays.clone(),
            MalformedKind::NotAnObject { size: arrays.len() },
        ),
        (
            objects.clone(),
            MalformedKind::TooDeep {
                size: objects.len(),
            },
        ),
        // Closers with nothing open are junk between values.
        (
            "]}".repeat(DEEP),
            MalformedKind::UnexpectedBytes { len: 2 * DEEP + 2 },
        ),
    ];
    for (bytes, kind) in hostile {
        let out = same_under_every_chunking(|chunking| {
            // Nothing in flight that it could be the reply to.
            let mut pair = Pair::ready(Config::default(), FakeQemu::default(), chunking);
            pair.server.send_raw(bytes.as_bytes());
            pair.server.send_raw(b"\r\n");
            pair.drive();
            let id = pair.execute("query-status");
            pair.drive();
            let cmd = pair.server.next_command().unwrap();
            pair.server.reply(&cmd, json!({"status": "running"}));
            pair.drive();
            let out = pair.take_outputs();
            assert!(ok_response(out.last().unwrap(), id.get()), "{out:?}");
            out
        });
        assert_eq!(out.len(), 2, "{kind:?}: {:?}", canonical(&out));
        assert!(malformed(kind.clone())(&out[0]), "{kind:?}: {:?}", out[0]);
    }
}

#[test]
fn nesting_past_qemus_own_limit_closes_at_once_and_fails_the_call_in_flight() {
    let arrays = nested(10_000, true);
    let objects = nested(10_000, false);
    for (bytes, in_object) in [
        (format!(r#"{{"return": {arrays}, "id": 1}}"#), true),
        (format!(r#"{{"return": {objects}, "id": 1}}"#), true),
        (arrays.clone(), false),
    ] {
        let out = same_under_every_chunking(|chunking| {
            let mut pair = Pair::ready(Config::default(), FakeQemu::default(), chunking);
            let id = pair.execute("query-status");
            pair.drive();
            // Only the first half arrives, and it never closes: no need to wait for it.
            pair.server.send_raw(&bytes.as_bytes()[..bytes.len() / 2]);
            pair.drive();
            let out = pair.take_outputs();
            assert_eq!(outputs_for(&out, id), 1, "{out:?}");
            out
        });
        let closed = out.last().unwrap();
        assert!(
            matches!(closed, Output::Closed(CloseReason::Protocol(ProtocolError::TooDeepToSkip { size }))
                if *size < 6000),
            "{closed:?}"
        );
        // The call fails at the first limit it meets: the depth limit for the reply (64), or
        // the close for a top-level array, which cannot be a reply.
        let want = match in_object {
            true => "ResponseTooDeep",
            false => "Closed",
        };
        assert!(format!("{:?}", out[0]).contains(want), "{:?}", out[0]);
    }
}

/// How many outputs answer `id`.
fn outputs_for(out: &[Output], id: qmp_proto::RequestId) -> usize {
    out.iter()
        .filter(|o| matches!(o, Output::Response { id: got, .. } if *got == id))
        .count()
}

/// How deep `json` nests (it has no brackets inside strings).
fn depth_of(json: &str) -> usize {
    let (mut depth, mut max) = (0usize, 0);
    for b in json.bytes() {
        match b {
            b'[' | b'{' => {
                depth += 1;
                max = max.max(depth);
            }
            b']' | b'}' => depth -= 1,
            _ => {}
        }
    }
    max
}

/// A response whose return value makes the whole message `depth` deep.
fn response_of_depth(depth: usize, arrays: bool, id: u64) -> String {
    format!(r#"{{"return": {}, "id": {id}}}"#, nested(depth - 1, arrays))
}

#[test]
fn exactly_max_depth_is_accepted_and_one_level_more_is_too_deep() {
    for max in [4, 5, 8, 64, MAX_DEPTH_LIMIT] {
        for arrays in [true, false] {
            let config = Config::builder().max_depth(max).build().unwrap();
            let too_deep = response_of_depth(max + 1, arrays, 2);
            let out = same_under_every_chunking(|chunking| {
                let mut pair = Pair::ready(config.clone(), FakeQemu::default(), chunking);
                let a = pair.execute("a");
                let _b = pair.execute("b"); // answered by the too-deep message: id 2
                let c = pair.execute("c");
                pair.drive();
                pair.server
                    .send_raw(response_of_depth(max, arrays, a.get()).as_bytes());
                pair.server.send_raw(too_deep.as_bytes());
                pair.server
                    .send_raw(format!(r#"{{"return": {{}}, "id": {c}}}"#).as_bytes());
                pair.drive();
                pair.take_outputs()
            });
            let label = format!("max {max}, arrays {arrays}");
            assert_eq!(out.len(), 3, "{label}: {:?}", canonical(&out));
            let Output::Response {
                result: Ok(value), ..
            } = &out[0]
            else {
                panic!("{label}: {:?}", out[0])
            };
            let want: Value = serde_json::from_str(&nested(max - 1, arrays)).unwrap();
            assert_eq!(value.to_value().unwrap(), want, "{label}");
            // b's reply: its id comes at its end, but in-band replies come in order, so it is
            // failed where it passes the depth limit; its end is then dropped as late.
            assert!(
                matches!(out[1], Output::Response { id, result: Err(CommandError::ResponseTooDeep { size }) }
                    if id.get() == 2 && size < too_deep.len()),
                "{label}: {:?}",
                out[1]
            );
            assert!(ok_response(&out[2], 3), "{label}");
        }
    }
}

#[test]
fn the_default_max_depth_is_64() {
    assert_eq!(Config::default().max_depth(), 64);
    let too_deep = response_of_depth(65, true, 2);
    let out = same_under_every_chunking(|chunking| {
        let mut pair = Pair::ready(Config::default(), FakeQemu::default(), chunking);
        let a = pair.execute("a");
        let _b = pair.execute("b");
        pair.drive();
        pair.server
            .send_raw(response_of_depth(64, false, a.get()).as_bytes());
        pair.server.send_raw(too_deep.as_bytes());
        pair.drive();
        pair.take_outputs()
    });
    assert_eq!(out.len(), 2);
    assert!(ok_response(&out[0], 1));
    assert!(
        matches!(out[1], Output::Response { id, result: Err(CommandError::ResponseTooDeep { size }) }
        if id.get() == 2 && size == too_deep.find("[".repeat(64).as_str()).unwrap() + 64)
    );
}

#[test]
fn frames_of_max_depth_limit_are_parsed_wherever_the_depth_is() {
    // The splitter accepts a frame 127 levels deep; the parser must take it too, not call it
    // invalid JSON (serde_json refuses 128 levels).
    let config = Config::builder()
        .max_depth(MAX_DEPTH_LIMIT)
        .build()
        .unwrap();
    let d = MAX_DEPTH_LIMIT;
    let out = same_under_every_chunking(|chunking| {
        let mut pair = Pair::ready(config.clone(), FakeQemu::default(), chunking);
        let ids: Vec<u64> = (0..5).map(|_| pair.execute("x").get()).collect();
        pair.drive();
        let messages = [
            format!(r#"{{"return": {}, "id": {}}}"#, nested(d - 1, true), ids[0]),
            format!(
                r#"{{"return": {}, "id": {}}}"#,
                nested(d - 1, false),
                ids[1]
            ),
            format!(
                r#"{{"error": {{"class": "GenericError", "desc": "d", "x-detail": {}}}, "id": {}}}"#,
                nested(d - 2, true),
                ids[2]
            ),
            format!(
                r#"{{"return": {{}}, "x-future": {}, "id": {}}}"#,
                nested(d - 1, false),
                ids[3]
            ),
            format!(
                r#"{{"event": "DEEP", "data": {}, "timestamp": {{"seconds": 1, "microseconds": 2}}}}"#,
                nested(d - 1, true)
            ),
            format!(r#"{{"return": {{}}, "id": {}}}"#, nested(d - 1, true)),
            format!(r#"{{"return": {{}}, "id": {}}}"#, ids[4]),
        ];
        for m in &messages[..6] {
            assert_eq!(depth_of(m), d, "{m}");
        }
        for m in &messages {
            pair.server.send_raw(m.as_bytes());
            pair.server.send_raw(b"\r\n");
        }
        pair.drive();
        pair.take_outputs()
    });
    assert_eq!(out.len(), 7, "{:#?}", canonical(&out));
    assert!(
        !out.iter().any(|o| matches!(o, Output::Malformed(_))),
        "{:#?}",
        canonical(&out)
    );
    assert!(ok_response(&out[0], 1) && ok_response(&out[1], 2));
    assert!(
        matches!(&out[2], Output::Response { id, result: Err(CommandError::Qmp(e)) } if id.get() == 3 && e.class == "GenericError")
    );
    assert!(ok_response(&out[3], 4));
    let Output::Event(e) = &out[4] else {
        panic!("{:?}", out[4])
    };
    assert_eq!(
        e.data_value().unwrap(),
        serde_json::from_str::<Value>(&nested(d - 1, true)).unwrap()
    );
    assert!(matches!(&out[5], Output::Unmatched(u) if u.id.is_some()));
    assert!(ok_response(&out[6], 5));
}

#[test]
fn a_greeting_of_max_depth_limit_is_parsed() {
    let config = Config::builder()
        .max_depth(MAX_DEPTH_LIMIT)
        .negotiate(false)
        .build()
        .unwrap();
    let greeting = format!(
        r#"{{"QMP": {{"version": {{"qemu": {{"micro": 0, "minor": 0, "major": 10}}, "package": ""}}, "capabilities": [], "x-future": {}}}}}"#,
        nested(MAX_DEPTH_LIMIT - 2, false)
    );
    for chunking in CHUNKINGS {
        let mut conn = qmp_proto::Connection::new(config.clone());
        let out = feed(&mut conn, greeting.as_bytes(), chunking);
        assert!(
            matches!(&out[..], [Output::Greeting(g), Output::Ready { oob: false }] if g.version.major == 10),
            "{out:?}"
        );
    }
}

// --- Requests and commands -------------------------------------------------------------------

#[test]
fn max_pending_refuses_more_requests_until_one_completes() {
    let config = Config::builder().max_pending(3).build().unwrap();
    let mut pair = Pair::new(config, FakeQemu::default(), Chunking::Whole);
    // Queued before the handshake counts.
    let first: Vec<_> = (0..3).map(|_| pair.execute("x")).collect();
    assert_eq!(
        pair.client.send(Command::new("y")),
        Err(SendError::TooManyPending { limit: 3 })
    );
    assert_eq!(pair.client.pending(), 3);
    pair.server.greet();
    pair.drive();
    let names: Vec<_> = pair
        .server
        .log
        .iter()
        .map(|c| c["execute"].clone())
        .collect();
    assert_eq!(
        names,
        ["qmp_capabilities", "x", "x", "x"],
        "the refused one was never written"
    );

    // A cancelled request that was written keeps its slot until its late response arrives.
    assert!(pair.client.cancel(first[0]));
    assert_eq!(pair.client.pending(), 2);
    assert_eq!(
        pair.client.send(Command::new("y")),
        Err(SendError::TooManyPending { limit: 3 })
    );
    let late = pair.server.next_command().unwrap();
    pair.server.reply(&late, json!({}));
    pair.drive();
    let fourth = pair.execute("y");
    assert!(fourth > first[2]);
    assert_eq!(
        pair.client.send(Command::new("z")),
        Err(SendError::TooManyPending { limit: 3 })
    );
    pair.drive();
    pair.server.reply_all();
    pair.drive();
    let done: Vec<_> = pair.responses().into_iter().map(|(id, _)| id).collect();
    assert_eq!(done, [first[1], first[2], fourth]);
    assert_eq!(pair.client.pending(), 0);
    let _ = pair.execute("again");
}

/// The wire id of a connection's first command, which its size is counted with.
const FIRST_ID: u64 = 1;

/// A command named `name` whose size as the first command of a connection (its wire form
/// `{"execute":...,"arguments":{"s":"ppp"},"id":1}\n`) is exactly `size` bytes.
fn command_of_size(name: &str, size: usize) -> Command {
    let base =
        format!("{{\"execute\":\"{name}\",\"arguments\":{{\"s\":\"\"}},\"id\":{FIRST_ID}}}\n")
            .len();
    assert!(size >= base, "{size} < {base}");
    Command::new(name)
        .arguments(&json!({ "s": "p".repeat(size - base) }))
        .unwrap()
}

#[test]
fn max_command_size_refuses_larger_commands_and_writes_nothing() {
    let limit = 1000;
    let config = Config::builder()
        .max_command_size(limit)
        .negotiate(false)
        .build()
        .unwrap();
    let mut pair = Pair::ready(config, FakeQemu::default(), Chunking::Whole);
    let huge = Command::new("x")
        .arguments(&json!({ "s": "p".repeat(5000) }))
        .unwrap();
    assert!(matches!(
        pair.client.send(huge),
        Err(SendError::TooLarge { limit: 1000, size }) if size > 5000
    ));
    // One byte over, then exactly at the limit.
    assert_eq!(
        pair.client.send(command_of_size("x", limit + 1)),
        Err(SendError::TooLarge {
            size: limit + 1,
            limit
        })
    );
    assert_eq!(pair.client.pending(), 0);
    assert!(pair.client.poll_transmit().is_none(), "nothing written");
    // Exactly at the limit, with the id it is written with.
    let _ = pair.send(command_of_size("x", limit));
    let wire = take_transmit(&mut pair.client);
    assert_eq!(wire.len(), limit);
    assert!(wire.ends_with(b",\"id\":1}\n"));
    assert!(wire.starts_with(b"{\"execute\":\"x\""));
}

#[test]
fn a_command_of_exactly_max_command_size_is_accepted_whatever_its_name() {
    let name = "x-".repeat(30); // 60 bytes: real command names reach 30 and more
    let limit = 1000;
    let config = Config::builder()
        .max_command_size(limit)
        .negotiate(false)
        .build()
        .unwrap();
    let mut pair = Pair::ready(config, FakeQemu::default(), Chunking::Whole);
    let cmd = command_of_size(&name, limit);
    assert_eq!(pair.client.send(cmd).map(|id| id.get()), Ok(1));
    assert_eq!(take_transmit(&mut pair.client).len(), limit);
}

#[test]
fn too_large_reports_the_serialized_size() {
    let config = Config::builder()
        .max_command_size(64)
        .negotiate(false)
        .build()
        .unwrap();
    let mut pair = Pair::ready(config, FakeQemu::default(), Chunking::Whole);
    let cmd = command_of_size("query-status", 500);
    assert_eq!(
        pair.client.send(cmd),
        Err(SendError::TooLarge {
            size: 500,
            limit: 64
        })
    );
}

// --- Output backpressure ---------------------------------------------------------------------

#[test]
fn a_full_output_queue_pauses_reading_and_polling_resumes_it_in_order() {
    let config = Config::builder().max_buffered_outputs(4).build().unwrap();
    let mut pair = Pair::ready(config, FakeQemu::default(), Chunking::Whole);
    let id = pair.execute("query-status");
    pair.drive();
    let cmd = pair.server.next_command().unwrap();
    for i in 0..100 {
        pair.server.event("TICK", json!({ "n": i }));
    }
    pair.server.reply(&cmd, json!({"status": "running"}));
    let bytes = pair.server.take_output();

    let conn = &mut pair.client;
    conn.handle_input(&bytes);
    assert!(!conn.wants_read(), "paused with 4 outputs waiting");
    assert!(!conn.is_closed());
    assert!(
        conn.buffered_input() > 0,
        "the rest of the input waits unprocessed"
    );
    let mut out = Vec::new();
    let mut paused_polls = 0;
    while let Some(o) = conn.poll_output() {
        out.push(o);
        if !conn.wants_read() {
            paused_polls += 1;
        }
    }
    assert!(conn.wants_read());
    assert_eq!(conn.buffered_input(), 0);
    // Every poll but the last four made room for exactly one more message.
    assert_eq!(paused_polls, 97);
    assert_eq!(out.len(), 101);
    for (i, o) in out[..100].iter().enumerate() {
        assert!(
            matches!(o, Output::Event(e) if e.name == "TICK" && e.data_value().unwrap()["n"] == i),
            "{i}: {o:?}"
        );
    }
    assert_eq!(
        out[100],
        Output::Response {
            id,
            result: Ok(RawJson::from_json(r#"{"status":"running"}"#).unwrap())
        }
    );
    assert_eq!(conn.stats().events, 100);
}

#[test]
fn a_paced_reader_gets_the_same_outputs_under_every_chunking() {
    for max in [1, 4] {
        let config = Config::builder().max_buffered_outputs(max).build().unwrap();
        let out = same_under_every_chunking(|chunking| {
            let mut pair = Pair::ready(config.clone(), FakeQemu::default(), chunking);
            let a = pair.execute("a");
            let b = pair.execute("b");
            pair.drive();
            let ca = pair.server.next_command().unwrap();
            let cb = pair.server.next_command().unwrap();
            for i in 0..30 {
                pair.server.event("TICK", json!({ "n": i }));
                if i == 10 {
                    pair.server.reply(&ca, json!(1));
                    pair.server.send_raw(b"\xff junk ");
                }
            }
            pair.server.reply(&cb, json!(2));
            let bytes = pair.server.take_output();
            let mut out = feed_paced(&mut pair.client, &bytes, chunking);
            out.extend(drain(&mut pair.client));
            assert_eq!(pair.client.pending(), 0);
            // 30 events, two responses and one junk report, in stream order.
            assert_eq!(out.len(), 33, "{:?}", canonical(&out));
            assert!(matches!(&out[11], Output::Response { id, .. } if *id == a));
            assert!(matches!(&out[32], Output::Response { id, .. } if *id == b));
            out
        });
        assert!(matches!(&out[12], Output::Malformed(_)));
    }
}

// --- Configuration -------------------------------------------------------------------------------

#[test]
fn the_builder_rejects_out_of_range_values() {
    let out_of_range =
        |build: Result<Config, ConfigError>, field: &'static str, value, min, max| {
            assert_eq!(
                build,
                Err(ConfigError::OutOfRange {
                    field,
                    value,
                    min,
                    max
                }),
                "{field}"
            );
        };
    let b = Config::builder;
    out_of_range(
        b().max_message_size(63).build(),
        "max_message_size",
        63,
        64,
        usize::MAX,
    );
    out_of_range(
        b().max_message_size(0).build(),
        "max_message_size",
        0,
        64,
        usize::MAX,
    );
    out_of_range(b().max_depth(1).build(), "max_depth", 1, 2, MAX_DEPTH_LIMIT);
    out_of_range(b().max_depth(0).build(), "max_depth", 0, 2, MAX_DEPTH_LIMIT);
    out_of_range(
        b().max_depth(MAX_DEPTH_LIMIT + 1).build(),
        "max_depth",
        MAX_DEPTH_LIMIT + 1,
        2,
        MAX_DEPTH_LIMIT,
    );
    out_of_range(
        b().max_depth(10_000).build(),
        "max_depth",
        10_000,
        2,
        MAX_DEPTH_LIMIT,
    );
    out_of_range(b().max_pending(0).build(), "max_pending", 0, 1, usize::MAX);
    out_of_range(
        b().max_in_flight(0).build(),
        "max_in_flight",
        0,
        1,
        usize::MAX,
    );
    out_of_range(
        b().max_buffered_outputs(0).build(),
        "max_buffered_outputs",
        0,
        1,
        usize::MAX,
    );
    out_of_range(
        b().max_command_size(63).build(),
        "max_command_size",
        63,
        64,
        usize::MAX,
    );
    // The error names the setting and its range.
    let msg = b().max_depth(200).build().unwrap_err().to_string();
    assert!(
        msg.contains("max_depth") && msg.contains("200") && msg.contains("127"),
        "{msg}"
    );

    // The bounds themselves are accepted.
    let c = b()
        .max_message_size(64)
        .max_depth(2)
        .max_pending(1)
        .max_in_flight(1)
        .max_buffered_outputs(1)
        .max_command_size(64)
        .build()
        .unwrap();
    assert_eq!(
        (c.max_message_size(), c.max_depth(), c.max_pending()),
        (64, 2, 1)
    );
    let c = b()
        .max_depth(MAX_DEPTH_LIMIT)
        .max_message_size(usize::MAX)
        .max_command_size(usize::MAX)
        .max_pending(usize::MAX)
        .build()
        .unwrap();
    assert_eq!(c.max_depth(), MAX_DEPTH_LIMIT);
    assert_eq!(MAX_DEPTH_LIMIT, 127);
}

#[test]
fn the_smallest_workable_limits_still_carry_a_whole_session() {
    // A QEMU greeting is 4 levels deep and about 100 bytes long: the floor for a usable connection.
    let config = Config::builder()
        .max_message_size(128)
        .max_depth(4)
        .max_pending(1)
        .max_in_flight(1)
        .max_buffered_outputs(1)
        .max_command_size(64)
        .build()
        .unwrap();
    let out = same_under_every_chunking(|chunking| {
        let mut pair = Pair::new(config.clone(), FakeQemu::default(), chunking);
        let mut out = Vec::new();
        pair.server.greet();
        for i in 0..3 {
            pair.drive();
            let id = pair.execute("query-status");
            assert_eq!(
                pair.client.send(Command::new("more")),
                Err(SendError::TooManyPending { limit: 1 })
            );
            pair.drive();
            let cmd = pair.server.next_command().unwrap();
            pair.server.event("E", json!({ "i": i }));
            pair.server.event("E", json!({ "i": i }));
            pair.server.reply(&cmd, json!({ "i": i }));
            let bytes = pair.server.take_output();
            out.extend(pair.take_outputs());
            out.extend(feed_paced(&mut pair.client, &bytes, chunking));
            out.extend(drain(&mut pair.client));
            assert!(
                matches!(out.last(), Some(Output::Response { id: got, result: Ok(_) }) if *got == id)
            );
        }
        out
    });
    assert_eq!(out.len(), 2 + 3 * 3, "{:?}", canonical(&out));
}

#[test]
fn a_greeting_beyond_the_limits_is_a_bad_greeting() {
    // The builder accepts limits below what a QEMU greeting needs (depth 4, ~100 bytes): the
    // greeting is then not one, said at once (where the limit is passed).
    for (config, kind) in [
        (
            Config::builder().max_depth(3).build().unwrap(),
            "nesting limit",
        ),
        (
            Config::builder().max_message_size(64).build().unwrap(),
            "size limit",
        ),
    ] {
        for chunking in CHUNKINGS {
            let mut conn = qmp_proto::Connection::new(config.clone());
            let out = feed(&mut conn, GREETING_10.as_bytes(), chunking);
            assert!(
                matches!(&out[..], [Output::Closed(CloseReason::Protocol(
                    ProtocolError::BadGreeting(e)
                ))] if e.as_str().contains(kind)),
                "{out:?}"
            );
            assert!(conn.poll_transmit().is_none());
        }
    }
}
