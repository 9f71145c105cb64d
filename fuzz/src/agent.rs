//! Target 5: a guest-agent connection under arbitrary operations and bytes.

use std::time::{Duration, Instant};

use arbitrary::{Arbitrary, Unstructured};
use qmp_proto::{Command, Connection, State};

use crate::FuzzConfig;
use crate::conn::{CmdInfo, Tracker};

/// The fixed part of an `agent_ops` input.
#[derive(Debug, Arbitrary)]
struct AgentHeader {
    config: FuzzConfig,
    seed: u64,
}

/// One step of the application, the transport, the clock or the agent.
#[derive(Debug, Arbitrary)]
enum AgentOp {
    /// `send` a canned command (`cmd % 5`, the last ones never reply on success).
    Send {
        cmd: u8,
        deadline_ms: Option<u8>,
        oob: bool,
        no_reply: bool,
    },
    /// `cancel` one of the ids `send` returned.
    Cancel { which: u8 },
    /// The clock moves on.
    Advance { ms: u8 },
    /// The transport takes everything.
    WriteAll,
    /// The application asks for a resync.
    Resync,
    /// The agent answers the resync under way (after its stray-byte complaint).
    SyncReply { stale: bool },
    /// The agent answers the command in flight, with or without echoing its id.
    Reply { echo_id: bool, error: bool },
    /// Raw bytes from the agent.
    Bytes(Vec<u8>),
    /// The transport reaches EOF.
    Eof,
}

const COMMANDS: [&str; 5] = [
    "guest-ping",
    "guest-info",
    "guest-file-read",
    "guest-shutdown",
    "guest-suspend-ram",
];

/// Target 5: a guest-agent connection driven by operations (sends with deadlines or marked
/// no-reply, cancels, resyncs, the clock, sync replies current and stale, replies with and
/// without ids, arbitrary bytes, EOF). Checks, besides everything the QMP targets check of
/// outcomes and memory: never more than one command in flight, nothing written while a resync is
/// under way except the resync itself, and every resync starts with the `0xFF` byte.
pub fn agent_ops(data: &[u8]) {
    let mut u = Unstructured::new(data);
    let Ok(h) = AgentHeader::arbitrary(&mut u) else {
        return;
    };
    let config = h.config.config();
    let mut conn = Connection::new_guest_agent(config.clone(), h.seed);
    let mut t = Tracker::new(config);
    t.agent = true;
    let start = Instant::now();
    let mut now = start;
    let mut ids = Vec::new();
    let mut last_sync = None;
    while !u.is_empty() {
        let Ok(op) = AgentOp::arbitrary(&mut u) else {
            break;
        };
        match op {
            AgentOp::Send {
                cmd,
                deadline_ms,
                oob,
                no_reply,
            } => {
                let deadline = deadline_ms.map(|ms| now + Duration::from_millis(u64::from(ms)));
                let mut c = Command::new(COMMANDS[usize::from(cmd) % COMMANDS.len()]);
                if let Some(at) = deadline {
                    c = c.deadline(at);
                }
                if oob {
                    c = c.oob();
                }
                if no_reply {
                    c = c.no_reply();
                }
                // The command index uses only the low bits: a higher one picks the reply's form.
                if usize::from(cmd) / COMMANDS.len() % 2 == 1 {
                    c = c.decode_value();
                }
                let info = CmdInfo {
                    oob,
                    fds: false,
                    deadline,
                };
                if let Some(id) = t.send(&mut conn, c, info) {
                    ids.push(id);
                }
            }
            AgentOp::Cancel { which } => {
                if !ids.is_empty() {
                    let id = ids[usize::from(which) % ids.len()];
                    t.cancel(&mut conn, id.get());
                }
            }
            AgentOp::Advance { ms } => {
                now += Duration::from_millis(u64::from(ms));
                t.timeout(&mut conn, now);
            }
            AgentOp::WriteAll => {
                while let Some(tx) = conn.poll_transmit() {
                    let data = tx.data.to_vec();
                    check_written(&data);
                    conn.advance_transmit(data.len());
                }
            }
            AgentOp::Resync => {
                let closed = conn.is_closed();
                assert_eq!(conn.resync(), !closed, "resync verdict");
            }
            AgentOp::SyncReply { stale } => {
                let id = match (stale, conn.sync_id()) {
                    (true, _) => last_sync.unwrap_or(7),
                    (false, Some(id)) => id,
                    (false, None) => continue,
                };
                let mut bytes =
                    br#"{"error": {"class": "GenericError", "desc": "stray"}}"#.to_vec();
                bytes.extend_from_slice(b"\n\xff");
                bytes.extend_from_slice(format!("{{\"return\": {id}}}\n").as_bytes());
                t.input(&mut conn, &bytes);
            }
            AgentOp::Reply { echo_id, error } => {
                let body = if error {
                    "\"error\": {\"class\": \"GenericError\", \"desc\": \"no\"}"
                } else {
                    "\"return\": {}"
                };
                // The last command's wire id while it holds one, else an id nobody holds.
                let id = ids.last().and_then(|&r| conn.wire_id(r)).unwrap_or(1 << 40);
                let reply = if echo_id {
                    format!("{{{body}, \"id\": {id}}}\n")
                } else {
                    format!("{{{body}}}\n")
                };
                t.input(&mut conn, reply.as_bytes());
            }
            AgentOp::Bytes(bytes) => t.input(&mut conn, &bytes),
            AgentOp::Eof => t.eof(&mut conn),
        }
        last_sync = conn.sync_id().or(last_sync);
        assert!(
            conn.in_flight() <= 1,
            "{} commands in flight",
            conn.in_flight()
        );
        assert_eq!(
            conn.state() == State::Syncing,
            conn.sync_id().is_some(),
            "Syncing state and sync id disagree"
        );
        t.drain(&mut conn, None);
    }
    t.finish(&mut conn, true);
}

/// What a guest-agent connection writes: every `0xFF` starts a resync, and between them are
/// whole JSON objects, back to back (a `0xFF` inside one would make it invalid JSON).
fn check_written(data: &[u8]) {
    for (i, part) in data.split(|&b| b == 0xFF).enumerate() {
        assert!(
            i == 0 || part.starts_with(b"{\"execute\":\"guest-sync-delimited\""),
            "0xFF not followed by a resync"
        );
        for value in serde_json::Deserializer::from_slice(part).into_iter::<serde_json::Value>() {
            assert!(value.expect("the client wrote invalid JSON").is_object());
        }
    }
}
