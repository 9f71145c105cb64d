//! Asynchronous events: delivered in order, between any two messages, with lazily parsed data.
mod common;

use common::*;
use qmp_proto::{Config, Output, Timestamp};
use serde_json::json;

#[test]
fn events_arrive_in_order_including_before_the_response_they_follow_from() {
    for chunking in CHUNKINGS {
        for pretty in [false, true] {
            let server = FakeQemu {
                pretty,
                ..FakeQemu::default()
            };
            let mut pair = Pair::ready(Config::default(), server, chunking);
            let id = pair.execute("blockdev-mirror");
            pair.drive();
            let cmd = pair.server.next_command().unwrap();
            pair.server.event(
                "JOB_STATUS_CHANGE",
                json!({"status": "created", "id": "job0"}),
            );
            pair.server.event(
                "JOB_STATUS_CHANGE",
                json!({"status": "running", "id": "job0"}),
            );
            pair.server.reply(&cmd, json!({}));
            pair.server.event(
                "BLOCK_JOB_READY",
                json!({"device": "job0", "len": 1, "offset": 1, "speed": 0, "type": "mirror"}),
            );
            pair.drive();
            let seen: Vec<String> = pair
                .outputs
                .iter()
                .map(|o| match o {
                    Output::Event(e) => format!(
                        "{}:{}",
                        e.name,
                        e.data_value().unwrap()["status"].as_str().unwrap_or("-")
                    ),
                    Output::Response { id: got, .. } if *got == id => "response".into(),
                    other => panic!("{other:?}"),
                })
                .collect();
            assert_eq!(
                seen,
                [
                    "JOB_STATUS_CHANGE:created",
                    "JOB_STATUS_CHANGE:running",
                    "response",
                    "BLOCK_JOB_READY:-"
                ]
            );
        }
    }
}

#[test]
fn event_fields_timestamp_and_missing_data() {
    let mut pair = Pair::ready(Config::default(), FakeQemu::default(), Chunking::Whole);
    pair.server.send_raw(b"{\"timestamp\": {\"seconds\": 1795648056, \"microseconds\": 378387}, \"event\": \"STOP\"}\r\n");
    pair.server.send_raw(b"{\"event\": \"NO_CLOCK\", \"timestamp\": {\"seconds\": -1, \"microseconds\": -1}, \"data\": null}\r\n");
    pair.server.send_raw(
        b"{\"event\": \"NO_TIMESTAMP\", \"data\": {\"k\": [1, 2]}, \"future\": {\"x\": 1}}\r\n",
    );
    pair.drive();
    let [Output::Event(a), Output::Event(b), Output::Event(c)] = &pair.outputs[..] else {
        panic!("{:?}", pair.outputs)
    };
    assert_eq!((a.name.as_str(), a.data.is_none()), ("STOP", true));
    assert_eq!(a.timestamp.seconds, 1795648056);
    assert_eq!(a.timestamp.microseconds, 378387);
    assert_eq!(a.data_value().unwrap(), json!(null));
    assert_eq!(b.timestamp, Timestamp::UNKNOWN);
    assert_eq!(
        b.data.as_ref().map(|d| d.get()),
        Some("null"),
        "an explicit null is kept"
    );
    assert_eq!(c.timestamp, Timestamp::UNKNOWN);
    assert_eq!(c.data_value().unwrap(), json!({"k": [1, 2]}));
    assert_eq!(pair.client.stats().events, 3);
}

#[test]
fn event_data_is_kept_as_text_until_asked_for() {
    let mut pair = Pair::ready(Config::default(), FakeQemu::default(), Chunking::Whole);
    // A number serde_json cannot represent as f64: the event is still delivered; only parsing the
    // data reports the problem, to whoever asks.
    pair.server
        .send_raw(b"{\"event\": \"BIG\", \"data\": {\"n\": 1e400}}\r\n");
    pair.drive();
    let [Output::Event(e)] = &pair.outputs[..] else {
        panic!("{:?}", pair.outputs)
    };
    assert_eq!(e.name, "BIG");
    assert_eq!(e.data.as_ref().unwrap().get(), "{\"n\": 1e400}");
    assert!(e.data_value().is_err());
}

#[test]
fn escaped_event_names_are_unescaped() {
    let mut pair = Pair::ready(
        Config::default(),
        FakeQemu::default(),
        Chunking::ByteAtATime,
    );
    pair.server
        .send_raw(b"{\"ev\\u0065nt\": \"S\\u0054OP\"}\r\n");
    pair.drive();
    assert!(matches!(&pair.outputs[..], [Output::Event(e)] if e.name == "STOP"));
}

#[test]
fn events_before_the_handshake_finishes_are_delivered() {
    let server = FakeQemu {
        auto_negotiate: false,
        ..FakeQemu::default()
    };
    let mut pair = Pair::new(Config::default(), server, Chunking::Whole);
    pair.server.greet();
    pair.server.event("EARLY", json!({}));
    pair.drive();
    assert!(
        matches!(&pair.outputs[..], [Output::Greeting(_), Output::Event(e)] if e.name == "EARLY")
    );
}
