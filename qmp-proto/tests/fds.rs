//! File descriptors: the core tells an adapter exactly which write starts a command with fds.
mod common;

use common::*;
use qmp_proto::{Command, Config};

#[test]
fn a_command_with_fds_starts_its_own_transmit() {
    let mut pair = Pair::ready(Config::default(), FakeQemu::default(), Chunking::Whole);
    let before = pair.execute("query-version");
    let getfd = pair.send(
        Command::new("getfd")
            .arguments(&serde_json::json!({"fdname": "fd0"}))
            .unwrap()
            .with_fds(),
    );
    let after = pair.execute("query-status");

    let t = pair.client.poll_transmit().unwrap();
    assert_eq!(t.fds_for, None);
    assert_eq!(
        t.data,
        format!("{{\"execute\":\"query-version\",\"id\":{before}}}\n").as_bytes()
    );
    let n = t.data.len();
    pair.client.advance_transmit(n);

    let t = pair.client.poll_transmit().unwrap();
    assert_eq!(t.fds_for, Some(getfd));
    assert!(t.data.starts_with(b"{\"execute\":\"getfd\""));
    assert!(
        t.data
            .ends_with(format!("{{\"execute\":\"query-status\",\"id\":{after}}}\n").as_bytes())
    );
    // A partial write carries the fds with its first byte; the rest has none.
    pair.client.advance_transmit(1);
    let t = pair.client.poll_transmit().unwrap();
    assert_eq!(t.fds_for, None);
    assert!(t.data.starts_with(b"\"execute\":\"getfd\""));
    let n = t.data.len();
    pair.client.advance_transmit(n);
    assert!(pair.client.poll_transmit().is_none());
    assert!(!pair.client.wants_write());
}

#[test]
fn consecutive_commands_with_fds_each_get_their_own_transmit() {
    let mut pair = Pair::ready(Config::default(), FakeQemu::default(), Chunking::Whole);
    let a = pair.send(Command::new("getfd").with_fds());
    let b = pair.send(Command::new("add-fd").with_fds());
    let t = pair.client.poll_transmit().unwrap();
    assert_eq!(t.fds_for, Some(a));
    assert!(!t.data.windows(6).any(|w| w == b"add-fd"));
    // Over-acknowledging is clamped to this transmit.
    pair.client.advance_transmit(usize::MAX);
    let t = pair.client.poll_transmit().unwrap();
    assert_eq!(t.fds_for, Some(b));
    pair.client.advance_transmit(0); // nothing written: the mark stays
    assert_eq!(pair.client.poll_transmit().unwrap().fds_for, Some(b));
}

#[test]
fn a_command_with_fds_queued_before_the_handshake_keeps_its_mark() {
    let mut pair = Pair::new(Config::default(), FakeQemu::default(), Chunking::Whole);
    let id = pair.send(Command::new("getfd").with_fds());
    pair.server.greet();
    let greeting = pair.server.take_output();
    pair.client.handle_input(&greeting);
    let _ = drain(&mut pair.client);
    let caps = pair.client.poll_transmit().unwrap();
    assert_eq!(caps.fds_for, None);
    let n = caps.data.len();
    pair.client.advance_transmit(n);
    pair.client.handle_input(b"{\"return\": {}, \"id\": 0}\r\n");
    let _ = drain(&mut pair.client);
    assert_eq!(pair.client.poll_transmit().unwrap().fds_for, Some(id));
}

#[test]
fn fds_are_needed_until_the_first_byte_is_written() {
    let config = Config::builder()
        .enable_oob(true)
        .max_in_flight(1)
        .build()
        .unwrap();
    let mut pair = Pair::ready(config, FakeQemu::default(), Chunking::Whole);
    let blocker = pair.execute("hold");
    let queued = pair.send(
        Command::new("getfd")
            .with_fds()
            .deadline(pair.now + std::time::Duration::from_secs(1)),
    );
    assert!(pair.client.fds_needed(queued), "queued behind the window");
    assert!(!pair.client.fds_needed(blocker), "no fds");
    // It times out before being written: its descriptors can go.
    pair.advance(std::time::Duration::from_secs(2));
    assert!(!pair.client.fds_needed(queued));
    // One that is in the transmit buffer needs them until its first byte goes out.
    pair.server.reply_all();
    pair.drive();
    let sent = pair.send(Command::new("add-fd").with_fds());
    assert!(pair.client.fds_needed(sent));
    assert!(
        pair.client.cancel(sent),
        "cancelled while its bytes wait to be written"
    );
    assert!(
        pair.client.fds_needed(sent),
        "the bytes still go out, so the fds must too"
    );
    let t = pair.client.poll_transmit().unwrap();
    assert_eq!(t.fds_for, Some(sent));
    let n = t.data.len();
    pair.client.advance_transmit(n);
    assert!(!pair.client.fds_needed(sent));
}
