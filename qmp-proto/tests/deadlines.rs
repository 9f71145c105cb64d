//! Deadlines and cancellation: exactly one outcome, late responses dropped silently.
mod common;

use std::time::Duration;

use common::*;
use qmp_proto::{Command, CommandError, Config, Output};
use serde_json::json;

#[test]
fn a_request_past_its_deadline_times_out_once_and_its_late_response_is_dropped() {
    for chunking in CHUNKINGS {
        let mut pair = Pair::ready(oob_config(), FakeQemu::default(), chunking);
        let at = pair.now + Duration::from_secs(5);
        let id = pair.send(Command::new("slow").deadline(at));
        pair.drive();
        assert_eq!(pair.client.poll_timeout(), Some(at));
        pair.advance(Duration::from_secs(4)); // early: nothing
        assert!(pair.outputs.is_empty());
        pair.advance(Duration::from_secs(1));
        assert_eq!(
            pair.take_outputs(),
            [Output::Response {
                id,
                result: Err(CommandError::TimedOut)
            }]
        );
        assert_eq!(pair.client.poll_timeout(), None);
        pair.advance(Duration::from_secs(10)); // repeated: nothing
        pair.server.reply_all(); // the late response
        pair.drive();
        assert!(
            pair.outputs.is_empty(),
            "dropped silently: {:?}",
            pair.outputs
        );
        let stats = pair.client.stats();
        assert_eq!((stats.timed_out, stats.late, stats.unmatched), (1, 1, 0));
    }
}

#[test]
fn poll_timeout_is_the_earliest_deadline() {
    let mut pair = Pair::ready(oob_config(), FakeQemu::default(), Chunking::Whole);
    let now = pair.now;
    let late = pair.send(Command::new("a").deadline(now + Duration::from_secs(9)));
    let soon = pair.send(Command::new("b").deadline(now + Duration::from_secs(2)));
    pair.execute("no deadline");
    assert_eq!(
        pair.client.poll_timeout(),
        Some(now + Duration::from_secs(2))
    );
    pair.advance(Duration::from_secs(3));
    assert_eq!(
        pair.take_outputs(),
        [Output::Response {
            id: soon,
            result: Err(CommandError::TimedOut)
        }]
    );
    assert_eq!(
        pair.client.poll_timeout(),
        Some(now + Duration::from_secs(9))
    );
    // Answered in time: the deadline goes away.
    let cmd = pair
        .server
        .commands
        .iter()
        .find(|c| c["id"] == late.get())
        .unwrap()
        .clone();
    pair.server.reply(&cmd, json!(1));
    pair.drive();
    assert_eq!(pair.responses(), [(late, Ok(json!(1)))]);
    assert_eq!(pair.client.poll_timeout(), None);
}

#[test]
fn a_queued_request_that_times_out_is_never_written() {
    let config = Config::builder()
        .enable_oob(true)
        .max_in_flight(1)
        .build()
        .unwrap();
    let mut pair = Pair::ready(config, FakeQemu::default(), Chunking::Whole);
    let first = pair.execute("blocker");
    let queued = pair.send(Command::new("queued").deadline(pair.now + Duration::from_secs(1)));
    pair.drive();
    pair.advance(Duration::from_secs(2));
    assert_eq!(
        pair.take_outputs(),
        [Output::Response {
            id: queued,
            result: Err(CommandError::TimedOut)
        }]
    );
    pair.server.reply_all();
    pair.drive();
    assert_eq!(pair.responses(), [(first, Ok(json!({})))]);
    assert!(pair.server.log.iter().all(|c| c["execute"] != "queued"));
}

#[test]
fn a_timed_out_in_flight_request_keeps_its_window_slot_until_answered() {
    let config = Config::builder()
        .enable_oob(true)
        .max_in_flight(1)
        .build()
        .unwrap();
    let mut pair = Pair::ready(config, FakeQemu::default(), Chunking::Whole);
    pair.send(Command::new("stuck").deadline(pair.now + Duration::from_secs(1)));
    let next = pair.execute("next");
    pair.drive();
    pair.advance(Duration::from_secs(2));
    assert_eq!(
        pair.server.commands.len(),
        1,
        "QEMU still holds the stuck one"
    );
    let stuck = pair.server.next_command().unwrap();
    pair.server.reply(&stuck, json!({}));
    pair.drive();
    let cmd = pair.server.next_command().unwrap();
    assert_eq!(cmd["execute"], "next");
    pair.server.reply(&cmd, json!(2));
    pair.drive();
    assert_eq!(pair.responses().last().unwrap(), &(next, Ok(json!(2))));
}

#[test]
fn cancelling_a_queued_request_means_it_is_never_sent() {
    let mut pair = Pair::new(oob_config(), FakeQemu::default(), Chunking::Whole);
    let a = pair.execute("a");
    let b = pair.execute("b");
    assert!(pair.client.cancel(a));
    assert!(!pair.client.cancel(a), "already cancelled");
    pair.server.greet();
    pair.drive();
    let names: Vec<_> = pair
        .server
        .commands
        .iter()
        .map(|c| c["execute"].clone())
        .collect();
    assert_eq!(names, ["b"]);
    pair.server.reply_all();
    pair.drive();
    assert_eq!(pair.responses(), [(b, Ok(json!({})))]);
}

#[test]
fn cancelling_a_written_request_drops_its_late_response_silently() {
    for chunking in CHUNKINGS {
        let mut pair = Pair::ready(oob_config(), FakeQemu::default(), chunking);
        let a = pair.execute("a");
        pair.drive();
        assert!(pair.client.cancel(a));
        assert_eq!(pair.client.pending(), 0);
        assert_eq!(pair.client.in_flight(), 1, "still on the wire");
        pair.server.reply_all();
        pair.drive();
        assert!(pair.outputs.is_empty());
        assert_eq!(pair.client.in_flight(), 0);
        assert!(!pair.client.cancel(a));
        // A second copy of the response is now unknown.
        pair.server
            .send_raw(format!("{{\"return\": {{}}, \"id\": {a}}}\r\n").as_bytes());
        pair.drive();
        assert!(matches!(&pair.outputs[..], [Output::Unmatched(_)]));
    }
}

#[test]
fn cancelling_a_completed_request_returns_false() {
    let mut pair = Pair::ready(oob_config(), FakeQemu::default(), Chunking::Whole);
    let a = pair.execute("a");
    pair.drive();
    pair.server.reply_all();
    pair.drive();
    assert!(!pair.client.cancel(a));
}
