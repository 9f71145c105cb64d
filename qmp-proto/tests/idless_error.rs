//! Errors without an id: QEMU's answer to input it could not parse, queued in order with its
//! in-band replies, often in long cascades. The first one fails the oldest written, unanswered
//! in-band request; further ones before an in-band reply with an id are the same cascade.
mod common;

use std::time::{Duration, Instant};

use common::*;
use qmp_proto::{Command, CommandError, Config, Connection, Output, QmpError};
use serde_json::json;

fn parse_error(desc: &str) -> Result<serde_json::Value, CommandError> {
    Err(CommandError::Qmp(QmpError::new("GenericError", desc)))
}

#[test]
fn a_real_cascade_fails_the_request_that_caused_it_and_nothing_after_it() {
    // qemu-storage-daemon's answer to one over-nested write then top-level non-objects (1,029
    // id-less errors), then a reply with id "after" (not one of ours). Replayed into a
    // connection whose command 1 stands for that write, and whose command 2 is answered after
    // the cascade.
    let mut server = data("qsd-10.0-idless-cascade.server.bin");
    server.extend_from_slice(b"{\"return\": {\"two\": 2}, \"id\": 2}\r\n");
    for chunking in CHUNKINGS {
        let mut conn = Connection::new(Config::builder().negotiate(false).build().unwrap());
        let bad = conn.send(Command::new("bad")).unwrap();
        let good = conn.send(Command::new("good")).unwrap();
        let out = feed(&mut conn, &server, chunking);
        let responses: Vec<_> = out
            .iter()
            .filter_map(|o| match o {
                Output::Response { id, result } => Some((*id, result.clone())),
                _ => None,
            })
            .collect();
        assert_eq!(responses.len(), 2, "{chunking:?}");
        assert_eq!(
            responses[0],
            (
                bad,
                Err(CommandError::Qmp(QmpError::new(
                    "GenericError",
                    "JSON nesting depth limit exceeded"
                )))
            )
        );
        assert_eq!(responses[1].0, good);
        assert_eq!(
            responses[1].1.as_ref().unwrap().to_value().unwrap(),
            json!({"two": 2})
        );
        let unmatched = out
            .iter()
            .filter(|o| matches!(o, Output::Unmatched(_)))
            .count();
        // The negotiation's reply (no id), the rest of the cascade, and id "after".
        assert_eq!(unmatched, 1 + 1028 + 1);
        assert!(!conn.is_closed());
    }
}

#[test]
fn the_oldest_in_band_request_fails_and_its_cascade_spares_the_next() {
    for chunking in CHUNKINGS {
        let config = Config::builder().enable_oob(false).build().unwrap();
        let mut pair = Pair::ready(config, FakeQemu::default(), chunking);
        let a = pair.execute("query-version");
        let b = pair.execute("query-status");
        pair.drive();
        let cmds: Vec<_> = std::iter::from_fn(|| pair.server.next_command()).collect();
        for i in 0..50 {
            pair.server.idless_error(&format!("error {i}"));
        }
        pair.drive();
        // At once, with the first error of the cascade; b still waits.
        assert_eq!(pair.responses(), [(a, parse_error("error 0"))]);
        assert_eq!(pair.client.pending(), 1);
        assert_eq!(pair.client.stats().unmatched, 49);
        pair.server.reply(&cmds[1], json!({}));
        pair.drive();
        assert_eq!(pair.responses()[1], (b, Ok(json!({}))));

        // A reply with an id ended that cascade: the next id-less error is a new one.
        let c = pair.execute("query-status");
        pair.drive();
        pair.server.idless_error("again");
        pair.drive();
        assert_eq!(pair.responses()[2], (c, parse_error("again")));
    }
}

#[test]
fn with_only_out_of_band_requests_in_flight_the_oldest_of_those_fails() {
    let mut pair = Pair::ready(oob_config(), FakeQemu::default(), Chunking::Whole);
    let oob = pair.send(Command::new("migrate-pause").oob());
    pair.drive();
    pair.server.idless_error("JSON parse error");
    pair.drive();
    assert_eq!(pair.responses(), [(oob, parse_error("JSON parse error"))]);

    // With an in-band one too, the in-band one: QEMU queues parse errors in band.
    let in_band = pair.execute("query-status");
    let _oob = pair.send(Command::new("migrate-pause").oob());
    pair.drive();
    let cmds: Vec<_> = std::iter::from_fn(|| pair.server.next_command()).collect();
    let in_band_cmd = cmds
        .iter()
        .find(|c| c["execute"] == "query-status")
        .unwrap();
    pair.server.reply(in_band_cmd, json!({})); // an in-band reply: ends the first cascade
    pair.drive();
    let next = pair.execute("query-status");
    pair.drive();
    pair.server.idless_error("second");
    pair.drive();
    let got = pair.responses();
    assert_eq!(got[1].0, in_band);
    assert_eq!(got[2], (next, parse_error("second")));
}

#[test]
#[allow(clippy::disallowed_methods)] // Instant::now: any starting instant will do
fn a_timed_out_request_still_takes_the_error_it_caused() {
    // The request that caused the error timed out: the error is its late answer, dropped, not
    // pinned on the request written after it.
    let mut conn = Connection::new(Config::builder().negotiate(false).build().unwrap());
    conn.handle_input(GREETING_10.as_bytes());
    let _ = drain(&mut conn);
    let t0 = Instant::now();
    let slow = conn
        .send(Command::new("slow").deadline(t0 + Duration::from_secs(1)))
        .unwrap();
    let next = conn.send(Command::new("next")).unwrap();
    let _ = take_transmit(&mut conn);
    conn.handle_timeout(t0 + Duration::from_secs(1));
    assert_eq!(
        drain(&mut conn),
        [Output::Response {
            id: slow,
            result: Err(CommandError::TimedOut)
        }]
    );
    conn.handle_input(b"{\"error\": {\"class\": \"GenericError\", \"desc\": \"x\"}}\r\n");
    assert_eq!(drain(&mut conn), []);
    assert_eq!(conn.stats().late, 1);
    conn.handle_input(format!("{{\"return\": {{}}, \"id\": {}}}\r\n", next.get()).as_bytes());
    assert!(matches!(
        &drain(&mut conn)[..],
        [Output::Response { id, result: Ok(_) }] if *id == next
    ));
}

#[test]
fn an_idless_error_with_nothing_in_flight_is_unmatched_and_keeps_its_text() {
    let mut pair = Pair::ready(Config::default(), FakeQemu::default(), Chunking::Whole);
    pair.server
        .idless_error("JSON parse error, stray '\\u0001'");
    pair.drive();
    let [Output::Unmatched(u)] = &pair.outputs[..] else {
        panic!()
    };
    let err = u.result.as_ref().unwrap_err();
    assert_eq!(
        (err.class.as_str(), err.desc.as_str()),
        ("GenericError", "JSON parse error, stray '\\u0001'")
    );
}
