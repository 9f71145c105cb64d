//! Greeting, capabilities negotiation, and what happens to commands sent before it ends.
mod common;

use common::*;
use qmp_proto::{
    CloseReason, Command, CommandError, Config, Connection, Output, ProtocolError, State,
};
use serde_json::json;

#[test]
fn negotiates_oob_when_offered_and_wanted() {
    for chunking in CHUNKINGS {
        let mut pair = Pair::new(oob_config(), FakeQemu::default(), chunking);
        pair.server.greet();
        pair.drive();
        assert!(
            matches!(&pair.outputs[0], Output::Greeting(g) if g.version.major == 10 && g.has_capability("oob"))
        );
        assert_eq!(pair.outputs[1], Output::Ready { oob: true });
        assert_eq!(pair.server.oob_negotiated, Some(true));
        assert!(pair.client.oob_enabled());
        assert_eq!(pair.client.state(), State::Ready);
    }
}

#[test]
fn negotiates_without_oob_when_not_offered() {
    let server = FakeQemu {
        offer_oob: false,
        ..FakeQemu::default()
    };
    let mut pair = Pair::new(oob_config(), server, Chunking::Whole);
    pair.server.greet();
    pair.drive();
    assert_eq!(pair.outputs[1], Output::Ready { oob: false });
    assert_eq!(pair.server.oob_negotiated, Some(false));
}

#[test]
fn negotiates_without_oob_when_config_says_so() {
    let config = Config::builder().enable_oob(false).build().unwrap();
    let mut pair = Pair::new(config, FakeQemu::default(), Chunking::Whole);
    pair.server.greet();
    pair.drive();
    assert_eq!(pair.outputs[1], Output::Ready { oob: false });
    assert_eq!(
        pair.server.log[0],
        json!({"execute": "qmp_capabilities", "id": 0})
    );
}

#[test]
fn commands_sent_early_wait_for_the_handshake_and_keep_their_order() {
    let mut pair = Pair::new(oob_config(), FakeQemu::default(), Chunking::ByteAtATime);
    let a = pair.execute("query-version");
    let b = pair.execute("query-status");
    assert!(
        pair.client.poll_transmit().is_none(),
        "nothing may be written before the greeting"
    );
    pair.server.greet();
    pair.drive();
    let names: Vec<_> = pair
        .server
        .log
        .iter()
        .map(|c| c["execute"].clone())
        .collect();
    assert_eq!(names, ["qmp_capabilities", "query-version", "query-status"]);
    pair.server.reply_all();
    pair.drive();
    let ids: Vec<_> = pair
        .responses()
        .into_iter()
        .map(|(id, r)| (id, r.is_ok()))
        .collect();
    assert_eq!(ids, [(a, true), (b, true)]);
}

#[test]
fn without_negotiation_the_greeting_is_enough_and_the_caller_may_negotiate_oob() {
    let config = Config::builder().negotiate(false).build().unwrap();
    let server = FakeQemu {
        auto_negotiate: false,
        ..FakeQemu::default()
    };
    let mut pair = Pair::new(config, server, Chunking::Whole);
    pair.server.greet();
    pair.drive();
    assert_eq!(pair.outputs[1], Output::Ready { oob: false });
    assert!(pair.server.log.is_empty(), "nothing sent by itself");
    // OOB is refused until the caller's own negotiation succeeds.
    assert!(pair.client.send(Command::new("x").oob()).is_err());
    let caps = Command::new("qmp_capabilities")
        .arguments(&json!({"enable": ["oob"]}))
        .unwrap();
    pair.send(caps);
    pair.drive();
    let cmd = pair.server.next_command().unwrap();
    pair.server.reply(&cmd, json!({}));
    pair.drive();
    assert!(pair.client.oob_enabled());
    pair.send(Command::new("migrate-pause").oob());
    pair.drive();
    assert_eq!(
        pair.server.next_command().unwrap()["exec-oob"],
        "migrate-pause"
    );
}

#[test]
fn refused_negotiation_closes_with_the_servers_error_and_fails_queued_commands() {
    let server = FakeQemu {
        auto_negotiate: false,
        ..FakeQemu::default()
    };
    let mut pair = Pair::new(oob_config(), server, Chunking::Whole);
    let id = pair.execute("query-status");
    pair.server.greet();
    pair.drive();
    let caps = pair.server.next_command().unwrap();
    pair.server.reply_error(&caps, "GenericError", "nope");
    pair.drive();
    let reason = CloseReason::Protocol(ProtocolError::NegotiationRejected(
        qmp_proto::QmpError::new("GenericError", "nope"),
    ));
    assert_eq!(
        pair.outputs[1..],
        [
            Output::Response {
                id,
                result: Err(CommandError::Closed)
            },
            Output::Closed(reason.clone())
        ]
    );
    assert_eq!(pair.client.close_reason(), Some(&reason));
    assert!(
        pair.server.commands.is_empty(),
        "the queued command was never written"
    );
}

#[test]
fn a_first_message_that_is_not_a_greeting_is_a_bad_greeting() {
    let mut conn = Connection::default();
    conn.handle_input(b"{\"return\": {}}\n{\"QMP\": {}}");
    let out = drain(&mut conn);
    assert!(
        matches!(&out[..], [Output::Closed(CloseReason::Protocol(ProtocolError::BadGreeting(e)))]
            if e.as_str() == "{\"return\": {}}"),
        "{out:?}"
    );
    // Display names what arrived, to tell a wrong socket from a broken one.
    let msg = conn.close_reason().unwrap().to_string();
    assert!(msg.contains("expected a QMP greeting"), "{msg}");
}

#[test]
fn a_greeting_without_a_version_is_a_bad_greeting() {
    let mut conn = Connection::default();
    conn.handle_input(br#"{"QMP": {"capabilities": []}}"#);
    assert!(matches!(
        drain(&mut conn)[..],
        [Output::Closed(CloseReason::Protocol(
            ProtocolError::BadGreeting(_)
        ))]
    ));
}

/// What a socket that is not a QMP monitor sends first, and what the excerpt must show.
const NOT_GREETINGS: &[(&[u8], &str)] = &[
    (
        b"SSH-2.0-OpenSSH_9.2p1 Debian-2\r\n",
        "SSH-2.0-OpenSSH_9.2p1 Debian-2",
    ),
    (
        b"QEMU 10.0.2 monitor - type 'help' for more information\r\n(qemu) ",
        "QEMU 10.0.2 monitor",
    ),
    (b"\xff\x01garbage\r\n", "\u{FFFD}\u{1}garbage"),
    (b"  [1, 2, 3]\r\n", "[1, 2, 3]"),
    (b"\"QMP\"\r\n", "\"QMP\""),
    (b"42\r\n", "42"),
    (b"{\"hello\": \"world\"}\r\n", "{\"hello\": \"world\"}"),
    (
        b"{\"event\": \"STOP\", \"timestamp\": {\"seconds\": 1, \"microseconds\": 2}}",
        "{\"event\": \"STOP\"",
    ),
    (b"{\"QMP\": nope}\r\n", "{\"QMP\": nope}"),
];

#[test]
fn anything_but_a_greeting_first_fails_at_once_showing_what_arrived() {
    for chunking in CHUNKINGS {
        for &(bytes, shown) in NOT_GREETINGS {
            let mut conn = Connection::default();
            // No end of stream, no more bytes: the verdict may not wait for either. It shows
            // what had arrived when it was reached: all of it when it came in one read.
            let out = feed(&mut conn, bytes, chunking);
            let what = String::from_utf8_lossy(bytes);
            let fits = |e: &str| match chunking {
                Chunking::Whole => e.contains(shown),
                _ => !e.is_empty() && what.trim_start().starts_with(e),
            };
            assert!(
                matches!(&out[..], [Output::Closed(CloseReason::Protocol(ProtocolError::BadGreeting(e)))]
                    if fits(e.as_str())),
                "{what:?} in {chunking:?}: {out:?} {:?}",
                conn.close_reason().map(ToString::to_string)
            );
            assert!(conn.poll_transmit().is_none(), "{what:?}: nothing written");
        }
    }
    // An object past the size limit before any greeting: not one either, and said at once.
    let config = Config::builder().max_message_size(256).build().unwrap();
    let mut conn = Connection::new(config);
    conn.handle_input(format!("{{\"QMP\": \"{}", "x".repeat(1000)).as_bytes());
    let reason = conn
        .close_reason()
        .map(ToString::to_string)
        .unwrap_or_default();
    assert!(reason.contains("expected a QMP greeting"), "{reason:?}");
}

#[test]
fn a_greeting_in_any_chunking_after_whitespace_is_fine() {
    for chunking in CHUNKINGS {
        let mut conn = Connection::default();
        let out = feed(
            &mut conn,
            format!("\r\n  {GREETING_10}\r\n").as_bytes(),
            chunking,
        );
        assert!(
            matches!(&out[..], [Output::Greeting(_)]),
            "{chunking:?}: {out:?}"
        );
        assert_eq!(conn.state(), State::Negotiating);
    }
}

#[test]
fn unknown_greeting_members_and_capabilities_are_tolerated() {
    let mut conn = Connection::default();
    conn.handle_input(
        br#"{"QMP": {"version": {"qemu": {"micro": 0, "minor": 2, "major": 11, "extra": 1}, "package": "v11", "future": true}, "capabilities": ["oob", "teleport", 7]}, "also": null}"#,
    );
    let Some(Output::Greeting(g)) = conn.poll_output() else {
        panic!("no greeting")
    };
    assert_eq!(g.capabilities, ["oob", "teleport"]);
    assert_eq!(g.version.to_string(), "11.2.0 (v11)");
}

#[test]
fn a_second_greeting_is_reported_not_fatal() {
    let mut pair = Pair::ready(oob_config(), FakeQemu::default(), Chunking::Whole);
    pair.server.greet();
    pair.drive();
    assert!(
        matches!(&pair.outputs[..], [Output::Malformed(m)] if m.kind == qmp_proto::MalformedKind::UnexpectedGreeting)
    );
    assert_eq!(pair.client.state(), State::Ready);
}

#[test]
fn eof_during_the_handshake_is_a_clear_sticky_reason() {
    for greet in [false, true] {
        let mut conn = Connection::default();
        let id = conn.send(Command::new("query-status")).unwrap();
        if greet {
            conn.handle_input(GREETING_10.as_bytes());
        }
        conn.handle_eof();
        let out = drain(&mut conn);
        let reason = CloseReason::Protocol(ProtocolError::EofDuringHandshake);
        assert_eq!(
            out[out.len() - 2..],
            [
                Output::Response {
                    id,
                    result: Err(CommandError::Closed)
                },
                Output::Closed(reason.clone())
            ]
        );
        assert_eq!(conn.close_reason(), Some(&reason));
        assert_eq!(
            conn.send(Command::new("x")).unwrap_err(),
            qmp_proto::SendError::Closed
        );
    }
}

#[test]
fn pretty_crlf_greeting_and_replies_work() {
    for chunking in CHUNKINGS {
        let server = FakeQemu {
            pretty: true,
            ..FakeQemu::default()
        };
        let mut pair = Pair::ready(oob_config(), server, chunking);
        let id = pair.execute("query-version");
        pair.drive();
        let cmd = pair.server.next_command().unwrap();
        pair.server
            .reply(&cmd, json!({"qemu": {"major": 10}, "package": ""}));
        pair.drive();
        assert_eq!(
            pair.responses(),
            [(id, Ok(json!({"qemu": {"major": 10}, "package": ""})))]
        );
    }
}
