//! The end of a session: the peer's EOF (clean, or in the middle of a message) and a local close.
//! Every request gets exactly one outcome, `Closed` comes last and once, and a closed connection
//! is inert.
mod common;

use std::time::{Duration, Instant};

use common::*;
use qmp_proto::{
    CloseReason, Command, CommandError, Config, Connection, MalformedKind, Output, ProtocolError,
    RequestId, SendError, State,
};
use serde_json::json;

const PEER_CLOSED: Output = Output::Closed(CloseReason::PeerClosed);

fn closed(id: RequestId) -> Output {
    Output::Response {
        id,
        result: Err(CommandError::Closed),
    }
}

/// How many outputs complete request `id`.
fn outcomes(out: &[Output], id: RequestId) -> usize {
    out.iter()
        .filter(|o| matches!(o, Output::Response { id: got, .. } if *got == id))
        .count()
}

/// Checks the end of a closed session: exactly one `Closed`, the last output, and nothing after.
fn assert_closed_last(conn: &mut Connection, out: &[Output], reason: &CloseReason) {
    let closes: Vec<_> = out
        .iter()
        .filter(|o| matches!(o, Output::Closed(_)))
        .collect();
    assert_eq!(closes, [&Output::Closed(reason.clone())], "{out:?}");
    assert_eq!(out.last(), Some(&Output::Closed(reason.clone())));
    assert_eq!(conn.poll_output(), None);
    assert_eq!(conn.state(), State::Closed);
    assert!(conn.is_closed());
    assert_eq!(conn.close_reason(), Some(reason));
}

#[test]
fn eof_fails_every_pending_request_once_then_closes_last() {
    let out = same_under_every_chunking(|chunking| {
        // OOB on with a window of 2: some requests are written, some still queued.
        let config = Config::builder()
            .enable_oob(true)
            .max_in_flight(2)
            .build()
            .unwrap();
        let mut pair = Pair::ready(config, FakeQemu::default(), chunking);
        let ids: Vec<_> = (0..6).map(|_| pair.execute("x")).collect();
        pair.drive();
        assert_eq!(pair.server.commands.len(), 2);
        // The first response and an event arrive just before the end of the stream.
        let cmd = pair.server.next_command().unwrap();
        pair.server.reply(&cmd, json!(1));
        pair.server.event("SHUTDOWN", json!({"guest": false}));
        let bytes = pair.server.take_output();
        let mut out = feed(&mut pair.client, &bytes, chunking);
        pair.client.handle_eof();
        out.extend(drain(&mut pair.client));

        assert_closed_last(&mut pair.client, &out, &CloseReason::PeerClosed);
        for &id in &ids {
            assert_eq!(outcomes(&out, id), 1, "{id:?}: {out:?}");
        }
        assert_eq!(pair.client.pending(), 0);
        assert_eq!(pair.client.in_flight(), 0);
        assert!(!pair.client.wants_read() && !pair.client.wants_write());
        assert!(
            pair.client.poll_transmit().is_none(),
            "the queued commands are never written"
        );
        let mut want = vec![Output::Response {
            id: ids[0],
            result: Ok(qmp_proto::RawJson::from_json("1").unwrap()),
        }];
        assert_eq!(out[..1], want[..]);
        assert!(matches!(&out[1], Output::Event(e) if e.name == "SHUTDOWN"));
        want = ids[1..].iter().map(|&id| closed(id)).collect();
        want.push(PEER_CLOSED);
        assert_eq!(out[2..], want[..]);
        out
    });
    assert_eq!(out.len(), 8);
}

#[test]
fn eof_with_nothing_pending_is_just_closed() {
    let mut pair = Pair::ready(oob_config(), FakeQemu::default(), Chunking::Whole);
    pair.client.handle_eof();
    let out = drain(&mut pair.client);
    assert_eq!(out, [PEER_CLOSED]);
    assert_closed_last(&mut pair.client, &out, &CloseReason::PeerClosed);
}

#[test]
fn eof_in_the_middle_of_a_message_says_how_much_was_cut_off() {
    // Deeper than max_depth, not so deep that it is given up (SKIP_DEPTH_LIMIT).
    let deep = format!(r#"{{"return": {}"#, "[".repeat(1000));
    let kept = format!(r#"{{"return": "{}"#, "x".repeat(3000));
    let big = format!(r#"{{"return": "{}"#, "x".repeat(5000));
    let cases: Vec<(Vec<u8>, Vec<MalformedKind>, usize)> = vec![
        (br#"{"return": {}, "id""#.to_vec(), vec![], 19),
        // Whitespace before the message does not count.
        (b"\r\n  {\"return\": {}".to_vec(), vec![], 13),
        (br#"{"return": "a\"b"#.to_vec(), vec![], 16),
        (br#"{"return": "abc\"#.to_vec(), vec![], 16),
        (b"{".to_vec(), vec![], 1),
        (kept.clone().into_bytes(), vec![], kept.len()),
        // A value being skipped (not an object, too deep, too large): its size so far.
        (b"[1, 2, [3".to_vec(), vec![], 9),
        (deep.clone().into_bytes(), vec![], deep.len()),
        (big.clone().into_bytes(), vec![], big.len()),
        // Stray bytes before it are reported on their own.
        (
            b"\xff\xff{\"ret".to_vec(),
            vec![MalformedKind::UnexpectedBytes { len: 2 }],
            5,
        ),
    ];
    for (tail, reports, buffered) in cases {
        let reason = CloseReason::Protocol(ProtocolError::UnexpectedEof { buffered });
        let label = String::from_utf8_lossy(&tail[..tail.len().min(40)]).into_owned();
        let out = same_under_every_chunking(|chunking| {
            let config = Config::builder()
                .enable_oob(true)
                .max_message_size(4096)
                .build()
                .unwrap();
            let mut pair = Pair::ready(config, FakeQemu::default(), chunking);
            let id = pair.execute("query-status");
            pair.drive();
            pair.server.send_raw(&tail);
            let bytes = pair.server.take_output();
            let mut out = feed(&mut pair.client, &bytes, chunking);
            assert!(!pair.client.is_closed());
            pair.client.handle_eof();
            out.extend(drain(&mut pair.client));
            assert_closed_last(&mut pair.client, &out, &reason);
            assert_eq!(outcomes(&out, id), 1);
            // A message over a limit fails the call it may answer as soon as the limit is
            // passed; anything else leaves it to the close.
            let over_limit = out.iter().any(|o| {
                matches!(o, Output::Response { id: got, result: Err(
                    CommandError::ResponseTooDeep { .. } | CommandError::ResponseTooLarge { .. }
                ) } if *got == id)
            });
            if !over_limit {
                assert_eq!(out[out.len() - 2], closed(id), "{label}");
            }
            assert_eq!(
                over_limit,
                tail == deep.as_bytes() || tail == big.as_bytes()
            );
            out
        });
        let got: Vec<_> = out[..out.len() - 1]
            .iter()
            .filter_map(|o| match o {
                Output::Malformed(m) => Some(m.kind.clone()),
                Output::Response { .. } => None,
                other => panic!("{label}: {other:?}"),
            })
            .collect();
        assert_eq!(got, reports, "{label}");
        // Display says what happened and how much.
        let msg = reason.to_string();
        assert!(
            msg.contains("middle of a message") && msg.contains(&buffered.to_string()),
            "{msg}"
        );
    }
}

#[test]
fn eof_after_stray_bytes_or_whitespace_is_a_clean_close() {
    for (tail, reports) in [
        (&b"\r\n \t\r\n"[..], vec![]),
        (
            b"\xff\xff\r\n",
            vec![MalformedKind::UnexpectedBytes { len: 4 }],
        ),
        (b"42", vec![MalformedKind::UnexpectedBytes { len: 2 }]),
        (
            b"{\"event\": \"E\"}\r\n]]",
            vec![MalformedKind::UnexpectedBytes { len: 2 }],
        ),
    ] {
        let out = same_under_every_chunking(|chunking| {
            let mut pair = Pair::ready(oob_config(), FakeQemu::default(), chunking);
            pair.server.send_raw(tail);
            let bytes = pair.server.take_output();
            let mut out = feed(&mut pair.client, &bytes, chunking);
            pair.client.handle_eof();
            out.extend(drain(&mut pair.client));
            assert_closed_last(&mut pair.client, &out, &CloseReason::PeerClosed);
            out
        });
        let got: Vec<_> = out
            .iter()
            .filter_map(|o| match o {
                Output::Malformed(m) => Some(m.kind.clone()),
                _ => None,
            })
            .collect();
        assert_eq!(got, reports, "{tail:?}");
    }
}

#[test]
fn messages_received_before_eof_are_all_delivered_even_when_eof_arrives_while_paused() {
    for truncated in [false, true] {
        let config = Config::builder()
            .enable_oob(true)
            .max_buffered_outputs(4)
            .build()
            .unwrap();
        let out = same_under_every_chunking(|chunking| {
            let mut pair = Pair::ready(config.clone(), FakeQemu::default(), chunking);
            let a = pair.execute("a");
            let b = pair.execute("b");
            pair.drive();
            let ca = pair.server.next_command().unwrap();
            for i in 0..10 {
                pair.server.event("TICK", json!({ "n": i }));
            }
            let first = pair.server.take_output();
            let mut out = feed_paced(&mut pair.client, &first, chunking);
            // The last read brings many messages at once, then the transport ends while
            // outputs wait to be polled.
            for i in 10..20 {
                pair.server.event("TICK", json!({ "n": i }));
            }
            pair.server.reply(&ca, json!("a"));
            if truncated {
                pair.server.send_raw(br#"{"return": "b", "id""#);
            }
            let last = pair.server.take_output();
            while !pair.client.wants_read() {
                out.extend(pair.client.poll_output());
            }
            pair.client.handle_input(&last);
            assert!(!pair.client.wants_read(), "paused before EOF");
            pair.client.handle_eof();
            assert!(
                !pair.client.is_closed(),
                "not closed before its outputs are polled"
            );
            assert_eq!(pair.client.state(), State::Ready);
            // Input after EOF is ignored, even before the close is delivered.
            let after = br#"{"return": "b", "id": 2}"#;
            pair.client.handle_input(after);
            assert_eq!(pair.client.stats().ignored_after_close, after.len() as u64);
            out.extend(drain(&mut pair.client));
            let reason = if truncated {
                CloseReason::Protocol(ProtocolError::UnexpectedEof { buffered: 20 })
            } else {
                CloseReason::PeerClosed
            };
            assert_closed_last(&mut pair.client, &out, &reason);
            assert_eq!(pair.client.stats().events, 20);
            assert_eq!((outcomes(&out, a), outcomes(&out, b)), (1, 1));
            assert_eq!(out[out.len() - 2], closed(b));
            out
        });
        assert_eq!(out.len(), 23);
        for (i, o) in out[..20].iter().enumerate() {
            assert!(
                matches!(o, Output::Event(e) if e.data_value().unwrap()["n"] == i),
                "{i}: {o:?}"
            );
        }
        assert!(matches!(&out[20], Output::Response { result: Ok(v), .. } if v.get() == "\"a\""));
    }
}

/// Checks that a closed connection ignores everything and outputs nothing more.
fn assert_inert(conn: &mut Connection, stale: RequestId, reason: &CloseReason, now: Instant) {
    let stats = conn.stats();
    let late = br#"{"return": {}, "id": 1}{"event": "LATE"}"#;
    conn.handle_input(late);
    conn.handle_input(b"");
    assert_eq!(
        conn.stats().ignored_after_close,
        stats.ignored_after_close + late.len() as u64
    );
    assert_eq!(conn.stats().bytes_received, stats.bytes_received);
    assert_eq!(conn.stats().messages, stats.messages);
    assert_eq!(conn.send(Command::new("x")), Err(SendError::Closed));
    assert_eq!(conn.send(Command::new("x").oob()), Err(SendError::Closed));
    assert!(!conn.cancel(stale));
    assert!(conn.poll_transmit().is_none());
    assert!(!conn.wants_write());
    assert!(!conn.wants_read());
    assert_eq!(conn.poll_timeout(), None);
    conn.handle_eof();
    conn.handle_eof();
    conn.close();
    conn.handle_timeout(now + Duration::from_secs(3600));
    conn.advance_transmit(100);
    assert_eq!(conn.poll_output(), None);
    assert_eq!(conn.close_reason(), Some(reason));
    assert_eq!(conn.state(), State::Closed);
    assert_eq!(conn.pending(), 0);
}

#[test]
fn after_eof_the_connection_is_inert() {
    for chunking in CHUNKINGS {
        let mut pair = Pair::ready(oob_config(), FakeQemu::default(), chunking);
        let at = pair.now + Duration::from_secs(5);
        let id = pair.send(Command::new("slow").deadline(at));
        pair.drive();
        pair.client.handle_eof();
        let out = drain(&mut pair.client);
        assert_eq!(out, [closed(id), PEER_CLOSED]);
        assert_inert(&mut pair.client, id, &CloseReason::PeerClosed, pair.now);
    }
}

#[test]
fn a_local_close_fails_pending_requests_and_closes_with_local() {
    for chunking in CHUNKINGS {
        let config = Config::builder()
            .enable_oob(true)
            .max_in_flight(1)
            .build()
            .unwrap();
        let mut pair = Pair::ready(config, FakeQemu::default(), chunking);
        let at = pair.now + Duration::from_secs(5);
        let written = pair.send(Command::new("a").deadline(at));
        let queued = pair.execute("b");
        let unwritten = pair.send(Command::new("c").oob());
        assert!(pair.client.wants_write(), "c's bytes wait to be written");
        pair.client.close();
        let out = drain(&mut pair.client);
        assert_eq!(
            out,
            [
                closed(written),
                closed(queued),
                closed(unwritten),
                Output::Closed(CloseReason::Local)
            ]
        );
        assert!(
            pair.client.poll_transmit().is_none(),
            "unwritten bytes are dropped"
        );
        let msg = CloseReason::Local.to_string();
        assert!(msg.contains("locally"), "{msg}");
        assert_closed_last(&mut pair.client, &out, &CloseReason::Local);
        assert_inert(&mut pair.client, written, &CloseReason::Local, pair.now);
    }
}

#[test]
fn a_local_close_while_paused_keeps_outputs_already_queued_before_closed() {
    let config = Config::builder()
        .enable_oob(true)
        .max_buffered_outputs(2)
        .build()
        .unwrap();
    let mut pair = Pair::ready(config, FakeQemu::default(), Chunking::Whole);
    let id = pair.execute("a");
    pair.drive();
    for _ in 0..5 {
        pair.server.event("E", json!({}));
    }
    let bytes = pair.server.take_output();
    pair.client.handle_input(&bytes);
    assert!(!pair.client.wants_read());
    pair.client.close();
    let out = drain(&mut pair.client);
    assert!(
        matches!(&out[..], [Output::Event(_), Output::Event(_), r, Output::Closed(CloseReason::Local)] if *r == closed(id)),
        "{out:?}"
    );
    assert_inert(&mut pair.client, id, &CloseReason::Local, pair.now);
}

#[test]
fn a_timed_out_or_cancelled_request_gets_no_second_outcome_at_close() {
    for local in [false, true] {
        let out = same_under_every_chunking(|chunking| {
            let config = Config::builder()
                .enable_oob(true)
                .max_in_flight(2)
                .build()
                .unwrap();
            let mut pair = Pair::ready(config, FakeQemu::default(), chunking);
            let soon = pair.now + Duration::from_secs(1);
            let timed_out = pair.send(Command::new("a").deadline(soon));
            let cancelled = pair.execute("b");
            // Beyond the window: still queued when they time out or are cancelled.
            let queued_timed_out = pair.send(Command::new("c").deadline(soon));
            let queued_cancelled = pair.execute("d");
            let open = pair.execute("e");
            pair.drive();
            assert_eq!(pair.server.commands.len(), 2);
            assert!(pair.client.cancel(cancelled));
            assert!(pair.client.cancel(queued_cancelled));
            pair.advance(Duration::from_secs(2));
            // The late response to the timed-out one arrives just before the end.
            let late = pair.server.next_command().unwrap();
            assert_eq!(late["id"], timed_out.get());
            pair.server.reply(&late, json!({}));
            pair.drive();
            if local {
                pair.client.close();
            } else {
                pair.client.handle_eof();
            }
            pair.outputs.extend(drain(&mut pair.client));
            let out = pair.take_outputs();
            let reason = if local {
                CloseReason::Local
            } else {
                CloseReason::PeerClosed
            };
            assert_closed_last(&mut pair.client, &out, &reason);
            let timed = |id| Output::Response {
                id,
                result: Err(CommandError::TimedOut),
            };
            assert_eq!(
                out,
                [
                    timed(timed_out),
                    timed(queued_timed_out),
                    closed(open),
                    Output::Closed(reason.clone())
                ]
            );
            assert_eq!(outcomes(&out, cancelled), 0);
            assert_eq!(outcomes(&out, queued_cancelled), 0);
            assert_eq!(pair.client.stats().late, 1);
            out
        });
        assert_eq!(out.len(), 4);
    }
}

#[test]
fn a_second_eof_or_close_adds_nothing() {
    let mut pair = Pair::ready(oob_config(), FakeQemu::default(), Chunking::Whole);
    let id = pair.execute("a");
    pair.client.handle_eof();
    pair.client.handle_eof();
    pair.client.close();
    let out = drain(&mut pair.client);
    assert_eq!(out, [closed(id), PEER_CLOSED]);

    let mut pair = Pair::ready(oob_config(), FakeQemu::default(), Chunking::Whole);
    let id = pair.execute("a");
    pair.client.close();
    pair.client.close();
    pair.client.handle_eof();
    let out = drain(&mut pair.client);
    assert_eq!(out, [closed(id), Output::Closed(CloseReason::Local)]);
}

#[test]
fn a_request_sent_after_eof_but_before_the_close_is_polled_still_gets_one_outcome() {
    let config = Config::builder()
        .enable_oob(true)
        .max_buffered_outputs(1)
        .build()
        .unwrap();
    let mut pair = Pair::ready(config, FakeQemu::default(), Chunking::Whole);
    for _ in 0..3 {
        pair.server.event("E", json!({}));
    }
    let bytes = pair.server.take_output();
    pair.client.handle_input(&bytes);
    pair.client.handle_eof();
    assert!(!pair.client.is_closed());
    // The close has not happened yet: the request is taken, and then closed with the rest.
    let id = pair.execute("late");
    let out = drain(&mut pair.client);
    assert_eq!(outcomes(&out, id), 1);
    assert_eq!(out[out.len() - 2..], [closed(id), PEER_CLOSED]);
    assert_eq!(out.len(), 5);
}
