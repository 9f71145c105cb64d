//! Commands out, responses matched back to them by id.
mod common;

use common::*;
use qmp_proto::{ArgumentsError, Command, CommandError, Config, Output, QmpError};
use serde_json::{Value, json};

#[test]
fn success_and_error_responses_complete_their_requests() {
    for chunking in CHUNKINGS {
        let mut pair = Pair::ready(oob_config(), FakeQemu::default(), chunking);
        let a = pair.execute("query-version");
        let b = pair.execute("no-such-command");
        pair.drive();
        let ca = pair.server.next_command().unwrap();
        let cb = pair.server.next_command().unwrap();
        pair.server.reply(&ca, json!({"qemu": {"major": 10}}));
        pair.server.reply_error(
            &cb,
            "CommandNotFound",
            "The command no-such-command has not been found",
        );
        pair.drive();
        assert_eq!(
            pair.responses(),
            [
                (a, Ok(json!({"qemu": {"major": 10}}))),
                (
                    b,
                    Err(CommandError::Qmp(QmpError::new(
                        "CommandNotFound",
                        "The command no-such-command has not been found"
                    )))
                )
            ]
        );
        assert_eq!(pair.client.pending(), 0);
    }
}

#[test]
fn error_classes_are_an_open_set_and_unknown_members_are_tolerated() {
    let mut pair = Pair::ready(oob_config(), FakeQemu::default(), Chunking::Whole);
    let a = pair.execute("x");
    let b = pair.execute("y");
    pair.drive();
    pair.server.send_raw(b"{\"error\": {\"class\": \"FutureClass\", \"desc\": \"d\", \"hint\": 1}, \"id\": 1, \"extra\": [1]}\r\n");
    pair.server
        .send_raw(b"{\"future\": {\"a\": [\"}\"]}, \"return\": {\"k\": \"v\"}, \"id\": 2}\r\n");
    pair.drive();
    assert_eq!(
        pair.responses(),
        [
            (a, Err(CommandError::Qmp(QmpError::new("FutureClass", "d")))),
            (b, Ok(json!({"k": "v"})))
        ]
    );
}

#[test]
fn ids_are_unique_increasing_and_the_wire_carries_them() {
    let mut pair = Pair::ready(oob_config(), FakeQemu::default(), Chunking::Whole);
    let ids: Vec<_> = (0..100).map(|_| pair.execute("query-version")).collect();
    assert!(ids.windows(2).all(|w| w[0] < w[1]));
    assert_eq!(ids[0].get(), 1, "0 is the handshake's");
    // OOB is on, so at most 8 in-band commands are in flight: answer until all went out.
    pair.drive();
    while !pair.server.commands.is_empty() {
        assert!(pair.server.commands.len() <= 8);
        pair.server.reply_all();
        pair.drive();
    }
    // On the wire, each command's own id: never reused, so a trace correlates by id alone.
    let wire: Vec<u64> = pair.server.log[1..]
        .iter()
        .map(|c| c["id"].as_u64().unwrap())
        .collect();
    let want: Vec<u64> = ids.iter().map(|id| id.get()).collect();
    assert_eq!(wire, want);
}

#[test]
fn many_pipelined_commands_are_answered_in_any_order() {
    // Without OOB there is no window: everything is written at once.
    let config = Config::builder().enable_oob(false).build().unwrap();
    let mut pair = Pair::ready(config, FakeQemu::default(), Chunking::Random(7));
    let ids: Vec<_> = (0..300).map(|_| pair.execute("query-version")).collect();
    pair.drive();
    assert_eq!(pair.server.commands.len(), 300);
    let mut cmds: Vec<Value> = pair.server.commands.drain(..).collect();
    cmds.reverse();
    for c in &cmds {
        pair.server.reply(c, c["id"].clone());
    }
    pair.drive();
    let mut got = pair.responses();
    assert_eq!(got.len(), 300);
    got.sort_by_key(|(id, _)| *id);
    for ((id, result), want) in got.into_iter().zip(ids) {
        assert_eq!(id, want);
        assert_eq!(result.unwrap(), json!(want.get()));
    }
}

#[test]
fn responses_with_unknown_duplicate_or_foreign_ids_are_unmatched() {
    let mut pair = Pair::ready(oob_config(), FakeQemu::default(), Chunking::Whole);
    let a = pair.execute("x");
    let _queued_not_sent_yet = 5u64; // ids not yet issued
    pair.drive();
    let cmd = pair.server.next_command().unwrap();
    pair.server.reply(&cmd, json!(1));
    pair.server.reply(&cmd, json!(2)); // duplicate
    for id in [
        r#""1""#,
        "1.0",
        "-1",
        "99",
        "null",
        r#"{"a":1}"#,
        "18446744073709551616",
    ] {
        pair.server
            .send_raw(format!("{{\"return\": {{}}, \"id\": {id}}}\r\n").as_bytes());
    }
    pair.drive();
    assert_eq!(pair.responses(), [(a, Ok(json!(1)))]);
    let unmatched: Vec<_> = pair
        .outputs
        .iter()
        .filter(|o| matches!(o, Output::Unmatched(_)))
        .collect();
    assert_eq!(unmatched.len(), 8);
    assert_eq!(pair.client.stats().unmatched, 8);
    assert!(
        matches!(unmatched[1], Output::Unmatched(u) if u.id.as_ref().unwrap().get() == "\"1\"")
    );
}

#[test]
fn a_response_to_a_request_not_yet_written_is_not_taken() {
    // With OOB on, the 9th in-band command waits for a window slot; a "response" to it is a stray.
    let mut pair = Pair::ready(oob_config(), FakeQemu::default(), Chunking::Whole);
    let ids: Vec<_> = (0..9).map(|_| pair.execute("x")).collect();
    pair.drive();
    assert_eq!(pair.server.commands.len(), 8);
    pair.server
        .send_raw(format!("{{\"return\": {{}}, \"id\": {}}}\r\n", ids[8]).as_bytes());
    pair.drive();
    assert!(matches!(&pair.outputs[..], [Output::Unmatched(_)]));
    assert_eq!(pair.client.pending(), 9);
}

#[test]
fn return_values_of_every_json_type_are_kept() {
    let mut pair = Pair::ready(oob_config(), FakeQemu::default(), Chunking::ByteAtATime);
    let values = [
        json!(null),
        json!(true),
        json!(-1.5e3),
        json!("s\"\\{"),
        json!([]),
        json!({"a": {"b": [1]}}),
    ];
    let ids: Vec<_> = values.iter().map(|_| pair.execute("x")).collect();
    pair.drive();
    for v in &values {
        let cmd = pair.server.next_command().unwrap();
        pair.server.reply(&cmd, v.clone());
    }
    pair.drive();
    let want: Vec<_> = ids
        .into_iter()
        .zip(values)
        .map(|(i, v)| (i, Ok(v)))
        .collect();
    assert_eq!(pair.responses(), want);
}

#[test]
fn typed_return_values_deserialize_straight_from_the_text() {
    #[derive(serde::Deserialize, Debug, PartialEq)]
    struct Status {
        status: String,
        running: bool,
    }
    let mut pair = Pair::ready(oob_config(), FakeQemu::default(), Chunking::Whole);
    pair.execute("query-status");
    pair.drive();
    let cmd = pair.server.next_command().unwrap();
    pair.server.reply(
        &cmd,
        json!({"status": "running", "singlestep": false, "running": true}),
    );
    pair.drive();
    let Some(Output::Response {
        result: Ok(raw), ..
    }) = pair.outputs.pop()
    else {
        panic!()
    };
    assert_eq!(
        raw.deserialize::<Status>().unwrap(),
        Status {
            status: "running".into(),
            running: true
        }
    );
}

#[test]
fn arguments_must_be_an_object_and_a_bad_one_writes_nothing() {
    assert!(matches!(
        Command::new("x").arguments(&42),
        Err(ArgumentsError::NotAnObject)
    ));
    assert!(matches!(
        Command::new("x").arguments(&"s"),
        Err(ArgumentsError::NotAnObject)
    ));
    assert!(matches!(
        Command::from_json(json!({"arguments": {}})),
        Err(ArgumentsError::NotACommand)
    ));
    assert!(matches!(
        Command::from_json(json!({"execute": "a", "exec-oob": "b"})),
        Err(ArgumentsError::NotACommand)
    ));
    assert!(matches!(
        Command::from_json(json!({"execute": "a", "arguments": [1]})),
        Err(ArgumentsError::NotAnObject)
    ));
    // A map with non-string keys cannot serialize: an error, not a panic.
    let mut bad = std::collections::BTreeMap::new();
    bad.insert(vec![1u8], 1);
    assert!(matches!(
        Command::new("x").arguments(&bad),
        Err(ArgumentsError::Serialize(_))
    ));
}

#[test]
fn unit_or_none_arguments_mean_no_arguments() {
    let mut out = Vec::new();
    let mut conn = qmp_proto::Connection::new(Config::builder().negotiate(false).build().unwrap());
    conn.handle_input(GREETING_10.as_bytes());
    let _ = drain(&mut conn);
    let _ = conn
        .send(Command::new("a").arguments(&()).unwrap())
        .unwrap();
    let _ = conn
        .send(Command::new("b").arguments(&None::<Value>).unwrap())
        .unwrap();
    out.extend(take_transmit(&mut conn));
    assert_eq!(
        out,
        b"{\"execute\":\"a\",\"id\":1}\n{\"execute\":\"b\",\"id\":2}\n"
    );
}

#[test]
fn arguments_and_raw_commands_go_out_as_given_with_our_id() {
    let mut pair = Pair::ready(oob_config(), FakeQemu::default(), Chunking::Whole);
    #[derive(serde::Serialize)]
    struct Add<'a> {
        driver: &'a str,
        #[serde(rename = "node-name")]
        node_name: &'a str,
        size: u64,
    }
    let a = pair.send(
        Command::new("blockdev-add")
            .arguments(&Add {
                driver: "null-co",
                node_name: "n0",
                size: 1 << 20,
            })
            .unwrap(),
    );
    let b = pair.send(
        Command::from_json(
            json!({"execute": "query-status", "id": "theirs", "arguments": {"x": "é"}}),
        )
        .unwrap(),
    );
    pair.drive();
    assert_eq!(
        pair.server.log[1],
        json!({"execute": "blockdev-add", "arguments": {"driver": "null-co", "node-name": "n0", "size": 1048576}, "id": a.get()})
    );
    assert_eq!(
        pair.server.log[2],
        json!({"execute": "query-status", "arguments": {"x": "é"}, "id": b.get()})
    );
}

#[test]
#[allow(clippy::disallowed_methods)] // Instant::now: any starting instant will do
fn wire_ids_are_never_reused_and_late_replies_are_dropped() {
    let mut conn = qmp_proto::Connection::new(Config::builder().negotiate(false).build().unwrap());
    conn.handle_input(GREETING_10.as_bytes());
    let _ = drain(&mut conn);
    let t0 = std::time::Instant::now();
    let slow = conn
        .send(Command::new("slow").deadline(t0 + std::time::Duration::from_secs(1)))
        .unwrap();
    assert_eq!(
        take_transmit(&mut conn),
        b"{\"execute\":\"slow\",\"id\":1}\n"
    );
    conn.handle_timeout(t0 + std::time::Duration::from_secs(1));
    assert!(matches!(
        &drain(&mut conn)[..],
        [Output::Response { id, result: Err(CommandError::TimedOut) }] if *id == slow
    ));
    // Timed out but answered later: its late reply is recognised by its id and dropped.
    let next = conn.send(Command::new("next")).unwrap();
    assert_eq!(
        take_transmit(&mut conn),
        b"{\"execute\":\"next\",\"id\":2}\n"
    );
    conn.handle_input(b"{\"return\": \"late\", \"id\": 1}\r\n");
    assert_eq!(drain(&mut conn), []);
    assert_eq!(conn.stats().late, 1);
    conn.handle_input(b"{\"return\": \"mine\", \"id\": 2}\r\n");
    assert!(matches!(
        &drain(&mut conn)[..],
        [Output::Response { id, result: Ok(v) }] if *id == next && v.get() == "\"mine\""
    ));
    // A second reply to an answered id is unmatched, never taken for another request; the next
    // command gets a new id, not a freed one.
    conn.handle_input(b"{\"return\": \"again\", \"id\": 2}\r\n");
    assert!(matches!(&drain(&mut conn)[..], [Output::Unmatched(_)]));
    let third = conn.send(Command::new("third")).unwrap();
    assert_eq!(conn.wire_id(third), Some(3));
    assert_eq!(
        take_transmit(&mut conn),
        b"{\"execute\":\"third\",\"id\":3}\n"
    );
    assert!(third > next && next > slow, "request ids are never reused");
}

#[test]
fn decode_value_delivers_parsed_values_and_falls_back_to_text() {
    for chunking in CHUNKINGS {
        let mut pair = Pair::ready(oob_config(), FakeQemu::default(), chunking);
        let ok = pair.send(Command::new("query-version").decode_value());
        let err = pair.send(Command::new("nope").decode_value());
        let huge = pair.send(Command::new("x-huge").decode_value());
        let text = pair.execute("query-version");
        pair.drive();
        let cmds: Vec<Value> = std::iter::from_fn(|| pair.server.next_command()).collect();
        pair.server.reply(&cmds[0], json!({"qemu": {"major": 10}}));
        pair.server.reply_error(&cmds[1], "GenericError", "no");
        // A number `Value` cannot hold: valid JSON, delivered as text.
        let id = &cmds[2]["id"];
        pair.server
            .send_raw(format!("{{\"return\": [1e400], \"id\": {id}}}\r\n").as_bytes());
        pair.server.reply(&cmds[3], json!({"qemu": {"major": 10}}));
        pair.drive();
        let outputs = pair.take_outputs();
        let mut it = outputs
            .iter()
            .filter(|o| matches!(o, Output::Value { .. } | Output::Response { .. }));
        assert_eq!(
            it.next(),
            Some(&Output::Value {
                id: ok,
                value: json!({"qemu": {"major": 10}})
            })
        );
        assert!(
            matches!(it.next(), Some(Output::Response { id, result: Err(CommandError::Qmp(e)) })
                if *id == err && e.class == "GenericError"),
            "{chunking:?}"
        );
        assert!(
            matches!(it.next(), Some(Output::Response { id, result: Ok(raw) })
                if *id == huge && raw.get() == "[1e400]"),
            "{chunking:?}"
        );
        assert!(
            matches!(it.next(), Some(Output::Response { id, result: Ok(raw) })
                if *id == text && raw.to_value().unwrap() == json!({"qemu": {"major": 10}})),
            "{chunking:?}"
        );
        assert_eq!(it.next(), None);
    }
}

/// One request left unanswered while thousands of later ones complete (as with a long in-band
/// command and OOB commands streaming past it): every response still finds its request, the
/// late one included, and the table of pending requests stays consistent.
#[test]
fn a_request_left_behind_by_thousands_is_still_answered() {
    let mut pair = Pair::ready(oob_config(), FakeQemu::default(), Chunking::Whole);
    let slow = pair.execute("slow");
    pair.drive();
    let slow_cmd = pair.server.next_command().unwrap();
    for i in 0..5000_u64 {
        let id = pair.send(Command::new("exec").oob());
        if i % 7 == 0 {
            // Another straggler, answered a little later.
            pair.drive();
            let held = pair.server.next_command().unwrap();
            let next = pair.send(Command::new("exec").oob());
            pair.drive();
            let cmd = pair.server.next_command().unwrap();
            pair.server.reply(&cmd, json!(i));
            pair.server.reply(&held, json!(i));
            pair.drive();
            let got = pair.take_outputs();
            assert_eq!(got.len(), 2, "{got:?}");
            assert!(matches!(&got[0], Output::Response { id: r, .. } if *r == next));
            assert!(matches!(&got[1], Output::Response { id: r, .. } if *r == id));
            continue;
        }
        pair.drive();
        let cmd = pair.server.next_command().unwrap();
        pair.server.reply(&cmd, json!(i));
        pair.drive();
        assert_eq!(pair.responses(), [(id, Ok(json!(i)))]);
        pair.outputs.clear();
        assert_eq!(pair.client.pending(), 1);
    }
    pair.server.reply(&slow_cmd, json!("at last"));
    pair.drive();
    assert_eq!(pair.responses(), [(slow, Ok(json!("at last")))]);
    assert_eq!(pair.client.pending(), 0);
}
