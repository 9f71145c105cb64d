//! Real QEMU byte streams replayed whole, byte at a time and randomly split.
//!
//! The captured client numbered its commands 1, 2, ... like the core does, so replaying the
//! server's bytes into a connection that sent the same number of commands matches every response.
//! The capture negotiated itself (without an id), so these connections do not negotiate.
mod common;

use common::*;
use proptest::prelude::*;
use qmp_proto::{CloseReason, Command, CommandError, Config, Connection, Output};
use serde_json::Value;

/// A connection that has sent `commands` commands (ids 1..=commands) and replays `server`.
fn replay(server: &[u8], commands: usize, chunking: Chunking) -> Vec<Output> {
    let mut conn = Connection::new(Config::builder().negotiate(false).build().unwrap());
    for i in 0..commands {
        let _ = conn.send(Command::new(format!("cmd{i}"))).unwrap();
    }
    let mut out = feed(&mut conn, server, chunking);
    conn.handle_eof();
    out.extend(drain(&mut conn));
    out
}

/// Outputs with timestamps dropped (they differ between recordings).
fn shape(outputs: &[Output]) -> Vec<String> {
    canonical(outputs)
        .into_iter()
        .map(|s| match s.find(" Timestamp") {
            Some(i) if s.starts_with("event") => s[..i].to_owned(),
            _ => s,
        })
        .collect()
}

fn value(o: &Output) -> Value {
    match o {
        Output::Response {
            result: Ok(raw), ..
        } => raw.to_value().unwrap(),
        other => panic!("not a successful response: {other:?}"),
    }
}

/// Checks the qemu-storage-daemon session described in tests/data/README.md.
fn check_qsd_session(out: &[Output], major: u64) {
    let shape = shape(out);
    let kinds: Vec<&str> = shape.iter().map(|s| s.split(' ').next().unwrap()).collect();
    assert_eq!(
        kinds,
        [
            "Greeting(Greeting",
            "Ready",
            "unmatched",
            "unmatched", // before-negotiation; qmp_capabilities
            "response",
            "response",
            "response",
            "response", // 1..4
            "event",
            "event",
            "response", // created, running, then blockdev-mirror's return
            "event",
            "event",
            "response", // ready, BLOCK_JOB_READY, job-complete
            "event",
            "event",
            "event",
            "event",
            "event", // waiting .. null
            "response",
            "unmatched", // 7, compound id
            "response",
            "unmatched", // 2 id-less errors: the first fails 8 (the syntax error), same cascade
            "response",
            "response", // 9, schema (10)
            "Closed(PeerClosed)",
        ],
        "{shape:#?}"
    );
    assert!(
        matches!(&out[0], Output::Greeting(g) if g.version.major == major && g.has_capability("oob"))
    );
    assert_eq!(value(&out[4])["qemu"]["major"], major);
    assert!(
        matches!(&out[5], Output::Response { result: Err(CommandError::Qmp(e)), .. } if e.class == "CommandNotFound")
    );
    assert!(
        matches!(&out[8], Output::Event(e) if e.name == "JOB_STATUS_CHANGE"
        && e.data_value().unwrap() == serde_json::json!({"status": "created", "id": "job0"}))
    );
    assert!(
        matches!(&out[19], Output::Response { result: Err(CommandError::Qmp(e)), .. } if e.desc.contains("OOB"))
    );
    assert!(
        matches!(&out[20], Output::Unmatched(u) if u.id.as_ref().unwrap().to_value().unwrap()["compound"][1] == 1500)
    );
    assert!(
        matches!(&out[21], Output::Response { result: Err(CommandError::Qmp(e)), id }
            if id.get() == 8 && e.desc.contains("JSON parse error")),
        "{:?}",
        out[21]
    );
    assert!(matches!(&out[22], Output::Unmatched(u) if u.id.is_none() && u.result.is_err()));
    let schema = value(&out[24]);
    let names: Vec<&str> = schema
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|e| e["name"].as_str())
        .collect();
    assert!(names.contains(&"blockdev-mirror") && names.contains(&"JOB_STATUS_CHANGE"));
    assert_eq!(out[25], Output::Closed(CloseReason::PeerClosed));
}

#[test]
fn qsd_sessions_replay_identically_under_every_chunking_compact_and_pretty() {
    for (version, major) in [("10.0", 10), ("7.2", 7)] {
        let compact = data(&format!("qsd-{version}-compact.server.bin"));
        let pretty = data(&format!("qsd-{version}-pretty.server.bin"));
        let reference = replay(&compact, 10, Chunking::Whole);
        check_qsd_session(&reference, major);
        for chunking in CHUNKINGS {
            let c = replay(&compact, 10, chunking);
            assert_eq!(c, reference, "{version} compact {chunking:?}");
            let p = replay(&pretty, 10, chunking);
            check_qsd_session(&p, major);
            assert_eq!(
                shape(&p),
                shape(&reference),
                "{version} pretty {chunking:?}"
            );
        }
    }
}

#[test]
fn pretty_return_values_keep_their_text_and_parse_like_compact_ones() {
    let out = replay(&data("qsd-10.0-pretty.server.bin"), 10, Chunking::Whole);
    let Output::Response {
        result: Ok(raw), ..
    } = &out[4]
    else {
        panic!()
    };
    assert!(
        raw.get().contains("\r\n            \"micro\": 2"),
        "kept as sent: {}",
        raw.get()
    );
    assert_eq!(raw.to_value().unwrap()["qemu"]["micro"], 2);
}

#[test]
fn qemu_system_session_with_events_hmp_schema_and_quit() {
    let server = data("qemu-system-7.2-session.server.bin");
    let reference = replay(&server, 7, Chunking::Whole);
    for chunking in CHUNKINGS {
        assert_eq!(replay(&server, 7, chunking), reference, "{chunking:?}");
    }
    let shape = shape(&reference);
    let kinds: Vec<&str> = shape.iter().map(|s| s.split(' ').next().unwrap()).collect();
    assert_eq!(
        kinds,
        [
            "Greeting(Greeting",
            "Ready",
            "unmatched",
            "event",
            "response",
            "event",
            "response",
            "response",
            "response",
            "response",
            "response",
            "event",
            "response",
            "Closed(PeerClosed)"
        ],
        "{shape:#?}"
    );
    assert!(matches!(&reference[3], Output::Event(e) if e.name == "STOP" && e.data.is_none()));
    assert!(
        matches!(&reference[7], Output::Response { result: Err(CommandError::Qmp(e)), .. } if e.desc.contains("SCM_RIGHTS"))
    );
    assert_eq!(value(&reference[8])["status"], "running");
    assert_eq!(
        value(&reference[9]),
        "7.2.22Debian 1:7.2+dfsg-7+deb12u18+b3\r\n"
    );
    assert!(value(&reference[10]).as_array().unwrap().len() > 1000);
    assert!(
        matches!(&reference[11], Output::Event(e) if e.name == "SHUTDOWN" && e.timestamp.seconds == 1795648058)
    );
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, ..ProptestConfig::default() })]

    /// Any chunking of a real capture gives exactly the outputs of the whole stream.
    #[test]
    fn any_split_of_a_capture_gives_the_same_outputs(
        capture in prop::sample::select(vec!["qsd-10.0-compact", "qsd-10.0-pretty", "qsd-7.2-pretty", "qemu-system-7.2-session"]),
        sizes in prop::collection::vec(1usize..2000, 1..400),
    ) {
        let server = data(&format!("{capture}.server.bin"));
        let commands = if capture.starts_with("qemu-system") { 7 } else { 10 };
        let reference = replay(&server, commands, Chunking::Whole);

        let mut conn = Connection::new(Config::builder().negotiate(false).build().unwrap());
        for i in 0..commands {
            let _ = conn.send(Command::new(format!("cmd{i}"))).unwrap();
        }
        let mut out = Vec::new();
        let mut rest = &server[..];
        for size in sizes.iter().cycle() {
            if rest.is_empty() { break; }
            let n = (*size).min(rest.len());
            conn.handle_input(&rest[..n]);
            out.extend(drain(&mut conn));
            rest = &rest[n..];
        }
        conn.handle_eof();
        out.extend(drain(&mut conn));
        prop_assert_eq!(out, reference);
    }
}
