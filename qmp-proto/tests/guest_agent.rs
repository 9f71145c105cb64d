//! Guest-agent mode: resync, matching by id and by order, commands that never reply, limits.
// Tests start a clock to build deadlines from; the core itself never reads one.
#![allow(clippy::disallowed_methods)]

mod common;

use std::time::{Duration, Instant};

use common::*;
use qmp_proto::{
    CloseReason, Command, CommandError, Config, Connection, Output, ProtocolError, RequestId,
    SendError, State,
};
use serde_json::{Value, json};

/// An agent connection whose first resync has been written; returns its bytes too.
fn agent() -> (Connection, Vec<u8>) {
    let mut conn = Connection::new_guest_agent(Config::default(), 99);
    let sent = take_transmit(&mut conn);
    (conn, sent)
}

/// The agent's answer to the resync under way: the complaint about `0xFF`, then the reply.
fn sync_reply(conn: &Connection) -> Vec<u8> {
    let id = conn.sync_id().expect("a resync is under way");
    let mut out =
        br#"{"error": {"class": "GenericError", "desc": "JSON parse error, stray '\uFFFD'"}}"#
            .to_vec();
    out.extend_from_slice(b"\n\xff");
    out.extend_from_slice(format!("{{\"return\": {id}}}\n").as_bytes());
    out
}

fn synced() -> Connection {
    let (mut conn, _) = agent();
    let reply = sync_reply(&conn);
    conn.handle_input(&reply);
    assert_eq!(drain(&mut conn), [Output::Ready { oob: false }]);
    conn
}

/// `bytes` with the one occurrence of `from` replaced by `to`.
fn replace(bytes: &[u8], from: &[u8], to: &[u8]) -> Vec<u8> {
    let at = bytes
        .windows(from.len())
        .position(|w| w == from)
        .expect("present");
    [&bytes[..at], to, &bytes[at + from.len()..]].concat()
}

fn ok(o: &Output) -> (RequestId, Value) {
    match o {
        Output::Response {
            id,
            result: Ok(raw),
        } => (*id, raw.to_value().unwrap()),
        other => panic!("not a successful response: {other:?}"),
    }
}

fn err(o: &Output) -> (RequestId, CommandError) {
    match o {
        Output::Response { id, result: Err(e) } => (*id, e.clone()),
        other => panic!("not a failed response: {other:?}"),
    }
}

#[test]
fn starts_with_sentinel_and_sync_and_queues_commands() {
    let (mut conn, sent) = agent();
    assert_eq!(conn.state(), State::Syncing);
    assert!(conn.is_guest_agent());
    let id = conn.sync_id().unwrap();
    assert!(id >= 0);
    let expected =
        format!("{{\"execute\":\"guest-sync-delimited\",\"arguments\":{{\"id\":{id}}}}}\n");
    assert_eq!(sent[0], 0xFF);
    assert_eq!(&sent[1..], expected.as_bytes());
    assert!(conn.greeting().is_none());

    let _ = conn.send(Command::new("guest-ping")).unwrap();
    assert!(
        conn.poll_transmit().is_none(),
        "nothing is written before the sync reply"
    );
    assert_eq!(conn.queued(), 1);
}

#[test]
fn different_seeds_give_different_sync_ids() {
    let a = Connection::new_guest_agent(Config::default(), 1);
    let b = Connection::new_guest_agent(Config::default(), 2);
    assert_ne!(a.sync_id(), b.sync_id());
}

/// The real qemu-ga 7.2 session: its sync id replaced by ours, replayed in every chunking.
#[test]
fn real_capture_replays_in_any_chunking() {
    let server = data("qga-7.2-session.server.bin");
    let client = data("qga-7.2-session.client.bin");
    assert_eq!(
        client[0], 0xFF,
        "the capture's client started with the sentinel"
    );
    for chunking in CHUNKINGS {
        let (mut conn, _) = agent();
        let sync = conn.sync_id().unwrap().to_string();
        let server = replace(
            &server,
            b"{\"return\": 123456}",
            format!("{{\"return\": {sync}}}").as_bytes(),
        );
        let ids: Vec<RequestId> = [
            Command::new("guest-ping"),
            Command::new("guest-info"),
            Command::new("guest-get-osinfo"),
            Command::new("no-such-command"),
            Command::new("guest-sync")
                .arguments(&json!({"id": 42}))
                .unwrap(),
        ]
        .into_iter()
        .map(|c| conn.send(c).unwrap())
        .collect();
        let out = feed(&mut conn, &server, chunking);
        assert_eq!(out.len(), 6, "{chunking:?}: {out:?}");
        assert_eq!(out[0], Output::Ready { oob: false });
        assert_eq!(ok(&out[1]), (ids[0], json!({})));
        let (id, info) = ok(&out[2]);
        assert_eq!((id, info["version"].as_str()), (ids[1], Some("7.2.22")));
        assert!(info["supported_commands"].as_array().unwrap().len() > 30);
        let (id, os) = ok(&out[3]);
        assert_eq!((id, os["id"].as_str()), (ids[2], Some("debian")));
        let (id, e) = err(&out[4]);
        assert_eq!(id, ids[3]);
        assert!(matches!(e, CommandError::Qmp(q) if q.class == "CommandNotFound"));
        assert_eq!(ok(&out[5]), (ids[4], json!(42)));
        let stats = conn.stats();
        assert_eq!(
            (stats.syncs, stats.discarded, stats.malformed),
            (1, 1, 0),
            "{chunking:?}"
        );
        // The whole exchange went one command at a time.
        assert_eq!(conn.in_flight(), 0);
    }
}

#[test]
fn junk_stale_replies_and_wrong_sync_ids_are_discarded_until_ours() {
    let (mut conn, _) = agent();
    let id = conn.sync_id().unwrap();
    let ping = conn.send(Command::new("guest-ping")).unwrap();
    conn.handle_input(b"garbage \x01\x02 {\"return\": {\"late\": true}, \"id\": 1}\n");
    conn.handle_input(b"\xff{\"return\": 12345}\n"); // a sync reply meant for someone else
    conn.handle_input(
        format!(
            "{{\"error\": {{\"class\": \"GenericError\", \"desc\": \"x\"}}, \"return\": {id}}}\n"
        )
        .as_bytes(),
    );
    conn.handle_input(b"{\"return\": \"not a number\"}\n{not json}\n");
    assert_eq!(drain(&mut conn), []);
    assert_eq!(conn.state(), State::Syncing);
    assert!(conn.poll_transmit().is_none());

    conn.handle_input(format!("\u{7f}\n{{\"return\": {id}}}\n").as_bytes());
    assert_eq!(drain(&mut conn), [Output::Ready { oob: false }]);
    assert_eq!(
        take_transmit(&mut conn),
        b"{\"execute\":\"guest-ping\",\"id\":1}\n"
    );
    conn.handle_input(b"{\"return\": {}, \"id\": 1}\n");
    assert_eq!(ok(&drain(&mut conn)[0]).0, ping);
    assert!(conn.stats().discarded >= 6, "{:?}", conn.stats());
    assert_eq!(conn.stats().malformed, 0);
}

#[test]
fn one_command_at_a_time_matched_by_order_without_ids() {
    let mut conn = synced();
    let a = conn.send(Command::new("a")).unwrap();
    let b = conn.send(Command::new("b")).unwrap();
    assert_eq!(take_transmit(&mut conn), b"{\"execute\":\"a\",\"id\":1}\n");
    assert_eq!((conn.in_flight(), conn.queued()), (1, 1));
    // An id-less error here is the agent's answer to the one command it was given.
    conn.handle_input(b"{\"error\": {\"class\": \"GenericError\", \"desc\": \"no\"}}\n");
    let out = drain(&mut conn);
    assert_eq!(err(&out[0]).0, a);
    // Wire ids are never reused: b carries its own.
    assert_eq!(take_transmit(&mut conn), b"{\"execute\":\"b\",\"id\":2}\n");
    // A reply whose id is not ours answers nothing; a reply with ours does.
    conn.handle_input(b"{\"return\": 1, \"id\": \"x\"}\n{\"return\": 2, \"id\": 2}\n");
    let out = drain(&mut conn);
    assert!(matches!(out[0], Output::Unmatched(_)), "{out:?}");
    assert_eq!(ok(&out[1]), (b, json!(2)));
    // Nothing in flight: an id-less reply matches nothing.
    conn.handle_input(b"{\"return\": 3}\n");
    assert!(matches!(drain(&mut conn)[..], [Output::Unmatched(_)]));
}

#[test]
fn timeout_resyncs_so_a_late_reply_is_never_taken_for_the_next() {
    let mut conn = synced();
    let t0 = Instant::now();
    let slow = conn
        .send(Command::new("guest-fsfreeze-freeze").deadline(t0 + Duration::from_secs(1)))
        .unwrap();
    let next = conn.send(Command::new("guest-ping")).unwrap();
    let _ = take_transmit(&mut conn);
    conn.handle_timeout(t0 + Duration::from_secs(1));
    assert_eq!(err(&drain(&mut conn)[0]), (slow, CommandError::TimedOut));
    assert_eq!(conn.state(), State::Syncing);
    let resync = take_transmit(&mut conn);
    assert_eq!(resync[0], 0xFF);
    assert!(resync.ends_with(format!("{{\"id\":{}}}}}\n", conn.sync_id().unwrap()).as_bytes()));

    // The late reply (echoing no id) arrives, then the stray error, then the sync reply.
    conn.handle_input(b"{\"return\": 3}\n");
    assert_eq!(drain(&mut conn), []);
    let reply = sync_reply(&conn);
    conn.handle_input(&reply);
    assert_eq!(drain(&mut conn), [Output::Ready { oob: false }]);
    // The sync, not only the new id, keeps the late reply (which may echo no id) from being
    // taken for this one.
    assert_eq!(
        take_transmit(&mut conn),
        b"{\"execute\":\"guest-ping\",\"id\":2}\n"
    );
    conn.handle_input(b"{\"return\": {}}\n");
    assert_eq!(ok(&drain(&mut conn)[0]), (next, json!({})));
    assert_eq!(conn.stats().syncs, 2);
}

#[test]
fn a_resync_left_unanswered_is_restarted_with_backoff() {
    let (mut conn, _) = agent();
    let first = conn.sync_id().unwrap();
    let t0 = Instant::now();
    let at = |ms: u64| t0 + Duration::from_millis(ms);
    let expire = |conn: &mut Connection, ms: u64| {
        let q = conn
            .send(Command::new("guest-ping").deadline(at(ms)))
            .unwrap();
        conn.handle_timeout(at(ms));
        assert_eq!(err(&drain(conn)[0]), (q, CommandError::TimedOut));
        conn.sync_id().unwrap()
    };
    // The first expiry only starts the clock; a second one 1 s later restarts the resync.
    assert_eq!(expire(&mut conn, 0), first);
    assert_eq!(expire(&mut conn, 500), first);
    let second = expire(&mut conn, 1000);
    assert_ne!(second, first);
    assert_eq!(take_transmit(&mut conn)[..2], [0xFF, b'{'][..2]);
    // Then it waits twice as long before the next restart.
    assert_eq!(expire(&mut conn, 2500), second);
    let third = expire(&mut conn, 3000);
    assert_ne!(third, second);
    // The earlier syncs' replies are stale now; only the newest one counts.
    conn.handle_input(
        format!("\u{7f}{{\"return\": {first}}}\n{{\"return\": {second}}}\n").as_bytes(),
    );
    assert_eq!(conn.state(), State::Syncing);
    conn.handle_input(format!("{{\"return\": {third}}}\n").as_bytes());
    assert_eq!(drain(&mut conn), [Output::Ready { oob: false }]);
}

/// An agent that answers each resync only 3 s after it reads it, while commands keep expiring
/// every 100 ms: the backoff lets one resync be answered while it is still the newest.
#[test]
fn a_slow_agent_and_steady_expiries_still_sync() {
    let (mut conn, mut wire) = agent();
    let t0 = Instant::now();
    let latency = Duration::from_secs(3);
    // (id, when the agent answers it), in the agent's order.
    let mut answers: Vec<(i64, Instant)> = Vec::new();
    let mut last_answer = t0;
    for step in 1..=3000u64 {
        let now = t0 + Duration::from_millis(100 * step);
        // The agent reads what we wrote: each 0xFF + sync is queued behind the previous one.
        for line in wire
            .split(|&b| b == b'\n')
            .filter(|l| l.first() == Some(&0xFF))
        {
            let v: Value = serde_json::from_slice(&line[1..]).unwrap();
            let id = v["arguments"]["id"].as_i64().unwrap();
            last_answer = last_answer.max(now - Duration::from_millis(100)) + latency;
            answers.push((id, last_answer));
        }
        wire.clear();
        for (id, _) in answers.iter().filter(|(_, w)| *w <= now) {
            conn.handle_input(format!("\u{7f}{{\"return\": {id}}}\n").as_bytes());
        }
        answers.retain(|(_, w)| *w > now);
        if conn.state() == State::Ready {
            assert!(step < 600, "synced only after {step} steps");
            return;
        }
        let _ = conn.send(Command::new("guest-ping").deadline(now)).unwrap();
        conn.handle_timeout(now);
        let _ = drain(&mut conn);
        wire = take_transmit(&mut conn);
    }
    panic!("never synced: a restart always overtook the agent's answer");
}

#[test]
fn cancelling_a_written_command_resyncs_and_an_unwritten_one_does_not() {
    let mut conn = synced();
    let a = conn.send(Command::new("a")).unwrap();
    let b = conn.send(Command::new("b")).unwrap();
    let _ = take_transmit(&mut conn);
    assert!(conn.cancel(b));
    assert_eq!(conn.state(), State::Ready);
    assert!(conn.poll_transmit().is_none());
    assert!(conn.cancel(a));
    assert_eq!(conn.state(), State::Syncing);
    assert_eq!(take_transmit(&mut conn)[0], 0xFF);
    assert_eq!(drain(&mut conn), []);
    assert_eq!((conn.pending(), conn.in_flight()), (0, 0));
}

#[test]
fn resync_on_request_gives_up_what_is_in_flight() {
    let mut conn = synced();
    let a = conn.send(Command::new("a")).unwrap();
    let _b = conn.send(Command::new("b")).unwrap();
    let _ = take_transmit(&mut conn);
    assert!(conn.resync());
    assert_eq!(err(&drain(&mut conn)[0]), (a, CommandError::Resynced));
    let _ = take_transmit(&mut conn);
    let reply = sync_reply(&conn);
    conn.handle_input(&reply);
    assert_eq!(drain(&mut conn), [Output::Ready { oob: false }]);
    assert_eq!(take_transmit(&mut conn), b"{\"execute\":\"b\",\"id\":2}\n");
    assert!(
        !Connection::default().resync(),
        "QMP connections do not resync"
    );
}

#[test]
fn shutdown_is_sent_without_waiting_for_a_reply() {
    // The guest goes down: EOF is the documented success.
    let mut conn = synced();
    let id = conn
        .send(
            Command::new("guest-shutdown")
                .arguments(&json!({"mode": "powerdown"}))
                .unwrap(),
        )
        .unwrap();
    let _ = take_transmit(&mut conn);
    conn.handle_eof();
    let out = drain(&mut conn);
    assert_eq!(err(&out[0]), (id, CommandError::NoReply { closed: true }));
    assert_eq!(out[1], Output::Closed(CloseReason::PeerClosed));

    // Silence until the deadline is success too, and a resync follows in case an error is late.
    let mut conn = synced();
    let t0 = Instant::now();
    let id = conn
        .send(Command::new("guest-suspend-ram").deadline(t0))
        .unwrap();
    let _ = take_transmit(&mut conn);
    conn.handle_timeout(t0);
    assert_eq!(
        err(&drain(&mut conn)[0]),
        (id, CommandError::NoReply { closed: false })
    );
    assert_eq!(conn.stats().timed_out, 0);
    assert_eq!(conn.state(), State::Syncing);

    // An error reply is still an error.
    let mut conn = synced();
    let id = conn.send(Command::new("guest-shutdown")).unwrap();
    let _ = take_transmit(&mut conn);
    conn.handle_input(
        b"{\"error\": {\"class\": \"GenericError\", \"desc\": \"has been disabled\"}, \"id\": 1}\n",
    );
    assert!(matches!(err(&drain(&mut conn)[0]), (got, CommandError::Qmp(_)) if got == id));

    // Any command can be marked; a command not yet written when the peer leaves just failed.
    let mut conn = synced();
    let _ = conn.send(Command::new("x")).unwrap();
    let unwritten = conn.send(Command::new("guest-shutdown")).unwrap();
    let _ = take_transmit(&mut conn);
    conn.handle_eof();
    let out = drain(&mut conn);
    assert!(out.contains(&Output::Response {
        id: unwritten,
        result: Err(CommandError::Closed)
    }));
}

#[test]
fn no_reply_works_on_qmp_connections_too() {
    let mut conn = Connection::new(Config::builder().negotiate(false).build().unwrap());
    conn.handle_input(br#"{"QMP": {"version": {"qemu": {"micro": 0, "minor": 0, "major": 10}, "package": ""}, "capabilities": []}}"#);
    let _ = drain(&mut conn);
    let id = conn.send(Command::new("quit").no_reply()).unwrap();
    conn.handle_eof();
    assert_eq!(
        err(&drain(&mut conn)[0]),
        (id, CommandError::NoReply { closed: true })
    );
}

#[test]
fn an_oversized_reply_fails_the_command_in_flight_even_without_an_id() {
    let config = Config::builder().max_message_size(1024).build().unwrap();
    let mut conn = Connection::new_guest_agent(config, 5);
    let _ = take_transmit(&mut conn);
    let reply = sync_reply(&conn);
    conn.handle_input(&reply);
    let _ = drain(&mut conn);
    let id = conn.send(Command::new("guest-file-read")).unwrap();
    let _ = take_transmit(&mut conn);
    let big = format!(
        "{{\"return\": {{\"count\": 3000, \"buf-b64\": \"{}\", \"eof\": false}}}}\n",
        "QUFB".repeat(1000)
    );
    conn.handle_input(big.as_bytes());
    // Failed where the limit is passed (byte 1025), not when the reply ends; its end is then
    // dropped as late.
    let out = drain(&mut conn);
    assert_eq!(out.len(), 1, "{out:?}");
    assert_eq!(
        err(&out[0]),
        (id, CommandError::ResponseTooLarge { size: 1025 })
    );
    assert_eq!(conn.stats().late, 1);
    assert_eq!(conn.buffered_input(), 0);
}

#[test]
fn large_base64_replies_work_within_the_limit() {
    let mut conn = synced();
    let id = conn.send(Command::new("guest-file-read")).unwrap();
    let _ = take_transmit(&mut conn);
    let payload = "QUJD".repeat(4 << 20); // 16 MiB of base64
    let reply = format!(
        "{{\"return\": {{\"count\": {}, \"buf-b64\": \"{payload}\", \"eof\": true}}, \"id\": 1}}\n",
        12 << 20
    );
    for piece in reply.as_bytes().chunks(64 << 10) {
        conn.handle_input(piece);
    }
    let out = drain(&mut conn);
    let Output::Response {
        id: got,
        result: Ok(raw),
    } = &out[0]
    else {
        panic!("{out:?}")
    };
    assert_eq!(*got, id);
    #[derive(serde::Deserialize)]
    struct Read {
        #[serde(rename = "buf-b64")]
        buf: String,
        eof: bool,
    }
    let read: Read = raw.deserialize().unwrap();
    assert!(read.eof);
    assert_eq!(read.buf.len(), 16 << 20);
}

#[test]
fn a_qmp_monitor_is_told_apart_from_a_guest_agent_at_once() {
    // What a QMP monitor sends as it accepts, in any chunking: the guest-agent handshake fails
    // at once saying it is a QMP monitor, not when the connect deadline passes.
    let greeting = br#"{"QMP": {"version": {"qemu": {"micro": 2, "minor": 0, "major": 10}, "package": ""}, "capabilities": ["oob"]}}"#;
    for chunking in CHUNKINGS {
        let (mut conn, _) = agent();
        let id = conn.send(Command::new("guest-ping")).unwrap();
        let mut bytes = greeting.to_vec();
        bytes.extend_from_slice(b"\r\n");
        let out = feed(&mut conn, &bytes, chunking);
        assert_eq!(err(&out[0]), (id, CommandError::Closed), "{chunking:?}");
        let Some(Output::Closed(CloseReason::Protocol(ProtocolError::QmpGreeting(e)))) = out.get(1)
        else {
            panic!("{chunking:?}: {out:?}")
        };
        assert!(e.as_str().starts_with("{\"QMP\""));
        let msg = conn.close_reason().unwrap().to_string();
        assert!(
            msg.contains("QMP greeting") && msg.contains("not a guest agent"),
            "{msg}"
        );
    }
}

#[test]
fn refusals_and_handshake_eof() {
    let mut conn = synced();
    assert_eq!(
        conn.send(Command::new("x").oob()),
        Err(SendError::OobNotEnabled)
    );
    // A greeting or an event is not what an agent sends: reported, not fatal.
    conn.handle_input(br#"{"QMP": {"version": {"qemu": {"micro": 0, "minor": 0, "major": 10}, "package": ""}, "capabilities": []}}"#);
    assert!(matches!(drain(&mut conn)[..], [Output::Malformed(_)]));
    assert_eq!(conn.state(), State::Ready);

    let (mut conn, _) = agent();
    conn.handle_eof();
    assert_eq!(
        drain(&mut conn),
        [Output::Closed(CloseReason::Protocol(
            ProtocolError::EofDuringHandshake
        ))]
    );
    // EOF during a later resync is the agent leaving.
    let mut conn = synced();
    assert!(conn.resync());
    conn.handle_eof();
    assert_eq!(drain(&mut conn), [Output::Closed(CloseReason::PeerClosed)]);
}

/// Found by the `agent_ops` fuzz target: closing during a resync left its id behind.
#[test]
fn sync_id_ends_with_the_connection() {
    let (mut conn, _) = agent();
    assert!(conn.sync_id().is_some());
    conn.handle_eof();
    let _ = drain(&mut conn);
    assert_eq!((conn.state(), conn.sync_id()), (State::Closed, None));
    let mut conn = synced();
    assert!(conn.resync());
    conn.close();
    assert_eq!(conn.sync_id(), None);
}

// --- The sentinel resets the parser (guest-sync-delimited) -------------------------------------
// A partial reply left on the channel (the tail of a reply a previous client stopped reading, or
// an agent that died mid-write) must not swallow the sync reply that follows the agent's `0xFF`.

#[test]
fn the_sentinel_resets_the_parser_after_a_stale_partial_reply() {
    let mut conn = Connection::new_guest_agent(Config::guest_agent(), 99);
    take_transmit(&mut conn);
    let id = conn.sync_id().unwrap();
    // The tail of a `guest-file-read` reply whose head went to a previous client: it starts
    // in the middle of the base64 string.
    conn.handle_input(b"QUFBQUFB\", \"count\": 6, \"eof\": false}, \"id\": 1}\n");
    // Then the agent's answer to our resync: its complaint about the 0xFF, the 0xFF, the reply.
    conn.handle_input(
        br#"{"error": {"class": "GenericError", "desc": "JSON parse error, stray '\uFFFD'"}}"#,
    );
    conn.handle_input(b"\n\xff");
    conn.handle_input(format!("{{\"return\": {id}}}\n").as_bytes());
    let outputs = drain(&mut conn);
    assert_eq!(
        (conn.state(), outputs),
        (State::Ready, vec![Output::Ready { oob: false }]),
        "the sync reply after the 0xFF sentinel was swallowed by the stale partial reply"
    );
}

/// The tail of a string before the sentinel: the sync reply after it is read (before, every
/// resync failed the same way, since whole messages carry an even number of quotes).
#[test]
fn a_stray_quote_cannot_outlive_the_next_sentinel() {
    let mut conn = Connection::new_guest_agent(Config::guest_agent(), 7);
    take_transmit(&mut conn);
    conn.handle_input(b"AAAA\", \"id\": 1}\n");
    for _ in 0..5 {
        let id = conn.sync_id().unwrap();
        conn.handle_input(b"\xff");
        conn.handle_input(format!("{{\"return\": {id}}}\n").as_bytes());
        if conn.state() == State::Ready {
            return;
        }
        assert!(conn.resync());
    }
    panic!("never synced after 5 resyncs");
}

/// The agent dies half-way through a reply and is restarted: the command times out, the client
/// resyncs, and the new agent's sync reply after its `0xFF` is read (the half reply kept the
/// splitter inside an object before).
#[test]
fn an_agent_restarted_mid_reply_is_recovered_by_the_resync() {
    let mut conn = Connection::new_guest_agent(Config::guest_agent(), 3);
    take_transmit(&mut conn);
    let id = conn.sync_id().unwrap();
    conn.handle_input(format!("\u{7f}{{\"return\": {id}}}\n").as_bytes());
    assert_eq!(conn.state(), State::Ready);
    drain(&mut conn);

    let t0 = Instant::now();
    let _ = conn
        .send(Command::new("guest-get-fsinfo").deadline(t0 + Duration::from_secs(5)))
        .unwrap();
    take_transmit(&mut conn);
    conn.handle_input(b"{\"return\": [{\"name\": \"vda1\", \"mountpoint\": \"/"); // agent killed
    conn.handle_timeout(t0 + Duration::from_secs(5));
    drain(&mut conn);
    assert_eq!(conn.state(), State::Syncing);
    take_transmit(&mut conn);
    // The restarted agent answers the resync.
    let id = conn.sync_id().unwrap();
    conn.handle_input(b"\xff");
    conn.handle_input(format!("{{\"return\": {id}}}\n").as_bytes());
    assert_eq!(
        conn.state(),
        State::Ready,
        "resync answered after the 0xFF, yet still syncing ({} bytes held)",
        conn.buffered_input()
    );
}
