//! Errors without an id: QEMU's answer to input it could not parse, often in long cascades.
mod common;

use common::*;
use qmp_proto::{Command, Config, Connection, Output};
use serde_json::json;

#[test]
fn a_real_cascade_of_over_a_thousand_idless_errors_is_survived() {
    // qemu-storage-daemon's answer to an over-nested write and top-level non-objects, then a
    // normal command with id "after" (which the core cannot have sent: so it is unmatched too).
    let server = data("qsd-10.0-idless-cascade.server.bin");
    for chunking in CHUNKINGS {
        let mut conn = Connection::new(Config::builder().negotiate(false).build().unwrap());
        let out = feed(&mut conn, &server, chunking);
        let unmatched = out
            .iter()
            .filter(|o| matches!(o, Output::Unmatched(u) if u.id.is_none()))
            .count();
        assert!(unmatched > 1000, "{unmatched}");
        assert!(out.iter().all(|o| matches!(
            o,
            Output::Greeting(_) | Output::Ready { .. } | Output::Unmatched(_)
        )));
        assert!(!conn.is_closed());
        assert_eq!(conn.stats().unmatched as usize, out.len() - 2);
    }
}

#[test]
fn idless_errors_are_never_attributed_to_a_pending_request() {
    // The core never writes anything QEMU cannot parse, so an id-less error is not an answer to
    // any of its commands: attributing it (to "the oldest", say) would fail the wrong request.
    for chunking in CHUNKINGS {
        let config = Config::builder().enable_oob(false).build().unwrap();
        let mut pair = Pair::ready(config, FakeQemu::default(), chunking);
        let a = pair.execute("query-version");
        let b = pair.execute("query-status");
        pair.drive();
        for _ in 0..50 {
            pair.server
                .idless_error("JSON parse error, expecting value");
        }
        pair.drive();
        assert_eq!(pair.outputs.len(), 50);
        assert_eq!(pair.client.pending(), 2);
        pair.server.reply_all();
        pair.drive();
        assert_eq!(pair.responses(), [(a, Ok(json!({}))), (b, Ok(json!({})))]);
    }
}

#[test]
fn an_idless_error_keeps_its_class_and_description() {
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
    let _ = Command::new("x");
}
