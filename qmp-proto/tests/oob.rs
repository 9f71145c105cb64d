//! Out-of-band commands: they overtake in-band ones, which are held to QEMU's queue depth.
mod common;

use common::*;
use qmp_proto::{Command, CommandError, Config, Output, SendError};
use serde_json::json;

#[test]
fn in_band_commands_are_held_to_the_window_and_oob_ones_overtake_them() {
    for chunking in CHUNKINGS {
        let mut pair = Pair::ready(oob_config(), FakeQemu::default(), chunking);
        let in_band: Vec<_> = (0..12).map(|_| pair.execute("slow")).collect();
        pair.drive();
        assert_eq!(
            pair.server.commands.len(),
            8,
            "QEMU queues 8: the rest wait in the client"
        );
        assert_eq!(pair.client.in_flight(), 8);
        let oob = pair.send(Command::new("migrate-pause").oob());
        pair.drive();
        let last = pair.server.commands.pop_back().unwrap();
        assert_eq!(
            last["exec-oob"], "migrate-pause",
            "written past the full window"
        );
        // QEMU answers the OOB command first.
        pair.server.reply(&last, json!("oob"));
        pair.drive();
        assert_eq!(pair.responses(), [(oob, Ok(json!("oob")))]);
        // Each in-band answer lets one more in.
        let first = pair.server.next_command().unwrap();
        pair.server.reply(&first, json!(0));
        pair.drive();
        assert_eq!(pair.server.commands.len(), 8, "7 left + the 9th written");
        loop {
            let pending: Vec<_> = pair
                .server
                .commands
                .drain(..)
                .filter(|c| c.get("execute").is_some())
                .collect();
            if pending.is_empty() {
                break;
            }
            for c in &pending {
                pair.server.reply(c, json!(0));
            }
            pair.drive();
        }
        let done: Vec<_> = pair.responses().into_iter().map(|(id, _)| id).collect();
        assert_eq!(done.len(), 13);
        assert!(in_band.iter().all(|id| done.contains(id)));
    }
}

#[test]
fn oob_responses_out_of_order_are_matched_by_id() {
    let mut pair = Pair::ready(oob_config(), FakeQemu::default(), Chunking::Random(3));
    let ids: Vec<_> = (0..5).map(|_| pair.send(Command::new("x").oob())).collect();
    pair.drive();
    let cmds: Vec<_> = pair.server.commands.drain(..).collect();
    for c in cmds.iter().rev() {
        pair.server.reply(c, c["id"].clone());
    }
    pair.drive();
    let got = pair.responses();
    let want: Vec<_> = ids
        .iter()
        .rev()
        .map(|id| (*id, Ok(json!(id.get()))))
        .collect();
    assert_eq!(got, want);
}

#[test]
fn without_oob_there_is_no_window() {
    let config = Config::builder().enable_oob(false).build().unwrap();
    let mut pair = Pair::ready(config, FakeQemu::default(), Chunking::Whole);
    for _ in 0..50 {
        pair.execute("x");
    }
    pair.drive();
    assert_eq!(pair.server.commands.len(), 50);
}

#[test]
fn the_window_is_configurable() {
    let config = Config::builder()
        .enable_oob(true)
        .max_in_flight(2)
        .build()
        .unwrap();
    let mut pair = Pair::ready(config, FakeQemu::default(), Chunking::Whole);
    for _ in 0..5 {
        pair.execute("x");
    }
    pair.drive();
    assert_eq!(pair.server.commands.len(), 2);
}

#[test]
fn oob_after_the_handshake_without_oob_is_refused_at_once() {
    let server = FakeQemu {
        offer_oob: false,
        ..FakeQemu::default()
    };
    let mut pair = Pair::ready(oob_config(), server, Chunking::Whole);
    assert_eq!(
        pair.client.send(Command::new("x").oob()).unwrap_err(),
        SendError::OobNotEnabled
    );
    assert_eq!(pair.client.pending(), 0);
}

#[test]
fn oob_sent_before_the_handshake_fails_if_oob_is_not_negotiated() {
    let server = FakeQemu {
        offer_oob: false,
        ..FakeQemu::default()
    };
    let mut pair = Pair::new(oob_config(), server, Chunking::Whole);
    let oob = pair.send(Command::new("x").oob());
    let normal = pair.execute("y");
    pair.server.greet();
    pair.drive();
    assert!(pair.outputs.contains(&Output::Response {
        id: oob,
        result: Err(CommandError::OobUnavailable)
    }));
    let names: Vec<_> = pair
        .server
        .commands
        .iter()
        .map(|c| c["execute"].clone())
        .collect();
    assert_eq!(names, ["y"], "the oob command was never written");
    pair.server.reply_all();
    pair.drive();
    assert!(
        pair.responses()
            .iter()
            .any(|(id, r)| *id == normal && r.is_ok())
    );
}

#[test]
fn oob_sent_before_the_handshake_goes_first_once_negotiated() {
    let mut pair = Pair::new(oob_config(), FakeQemu::default(), Chunking::Whole);
    pair.execute("in-band");
    pair.send(Command::new("urgent").oob());
    pair.server.greet();
    pair.drive();
    let order: Vec<String> = pair.server.log[1..]
        .iter()
        .map(|c| {
            c.get("exec-oob")
                .or_else(|| c.get("execute"))
                .unwrap()
                .as_str()
                .unwrap()
                .to_owned()
        })
        .collect();
    assert_eq!(order, ["urgent", "in-band"]);
}
