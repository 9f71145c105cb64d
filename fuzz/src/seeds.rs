//! The committed seeds, built from the real QEMU captures in `qmp-proto/tests/data` and from
//! scripted scenarios. Run `cargo test -p qmp-proto-fuzz -- --ignored write_seeds` to rewrite
//! `seeds/` after a change to an input format.

use std::path::Path;

use crate::FuzzConfig;
use crate::lex_value;
use crate::ops::encode;
use crate::ops::{Op, OpsHeader, ReplyKind};

fn capture(name: &str) -> Vec<u8> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../qmp-proto/tests/data")
        .join(name);
    std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// Offsets where the top-level objects of a capture end.
fn message_ends(bytes: &[u8]) -> Vec<(usize, usize)> {
    let mut out = Vec::new();
    let mut pos = 0;
    while pos < bytes.len() {
        if bytes[pos] == b'{' {
            let Some((len, _)) = lex_value(&bytes[pos..]) else {
                break;
            };
            out.push((pos, pos + len));
            pos += len;
        } else {
            pos += 1;
        }
    }
    out
}

/// The capture from its `skip`-th message up to the first message larger than `limit` bytes (the
/// `query-qmp-schema` replies), cut after the line ending that follows a message.
fn head(bytes: &[u8], skip: usize, limit: usize) -> Vec<u8> {
    let ends = message_ends(bytes);
    let from = ends.get(skip).map_or(bytes.len(), |&(start, _)| start);
    let mut to = from;
    for &(start, end) in &ends[skip..] {
        if end - start > limit {
            break;
        }
        to = end;
        while to < bytes.len() && matches!(bytes[to], b'\r' | b'\n') {
            to += 1;
        }
    }
    bytes[from..to].to_vec()
}

fn big_config() -> FuzzConfig {
    FuzzConfig {
        max_message_size: 4032, // 4096 bytes
        max_depth: 14,          // 16
        max_pending: 31,        // 32
        max_in_flight: 7,       // 8
        max_buffered_outputs: 15,
        max_command_size: 4032,
        enable_oob: true,
        negotiate: true,
    }
}

fn small_config() -> FuzzConfig {
    FuzzConfig {
        max_message_size: 136, // 200 bytes
        max_depth: 2,          // 4 (a greeting needs 4)
        max_pending: 3,        // 4
        max_in_flight: 1,      // 2
        max_buffered_outputs: 1,
        max_command_size: 0, // 64 bytes
        enable_oob: true,
        negotiate: true,
    }
}

fn splitter_header(max_size: u16, max_depth: u8, chunk_log: u8, finish: bool) -> Vec<u8> {
    let mut out = max_size.to_le_bytes().to_vec();
    out.push(max_depth);
    out.extend_from_slice(&0x5eed_u32.to_le_bytes());
    out.push(chunk_log);
    out.push(u8::from(finish));
    out
}

struct BytesSeed {
    config: FuzzConfig,
    greeting: u8,
    early: u8,
    late: u8,
    oob_mask: u16,
    fds_mask: u16,
    midstream: u8,
    chunk_log: u8,
    lazy: u8,
    end: u8,
}

impl BytesSeed {
    fn new(config: FuzzConfig) -> Self {
        Self {
            config,
            greeting: 0,
            early: 0,
            late: 10,
            oob_mask: 0,
            fds_mask: 0,
            midstream: 0,
            chunk_log: 8,
            lazy: 0,
            end: 0,
        }
    }

    fn with(self, stream: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        encode::config(&mut out, &self.config);
        out.extend_from_slice(&[self.greeting, self.early, self.late]);
        out.extend_from_slice(&self.oob_mask.to_le_bytes());
        out.extend_from_slice(&self.fds_mask.to_le_bytes());
        out.push(self.midstream);
        out.extend_from_slice(&0x5eed_u32.to_le_bytes());
        out.extend_from_slice(&[self.chunk_log, self.lazy, self.end]);
        out.extend_from_slice(stream);
        out
    }
}

fn ops_seed(header: OpsHeader, ops: &[Op]) -> Vec<u8> {
    let mut out = Vec::new();
    encode::header(&mut out, &header);
    for op in ops {
        encode::op(&mut out, op);
    }
    out
}

fn header(config: FuzzConfig, auto_negotiate: bool, lazy: bool, end_by_eof: bool) -> OpsHeader {
    OpsHeader {
        config,
        auto_negotiate,
        lazy,
        end_by_eof,
    }
}

fn send(cmd: u8) -> Op {
    Op::Send {
        cmd,
        oob: false,
        fds: false,
        deadline_ms: None,
        size: 0,
    }
}

fn reply(k: u8, kind: ReplyKind) -> Op {
    Op::Reply {
        k,
        kind,
        pretty: false,
    }
}

/// A handshake with a server that answers `qmp_capabilities` by itself.
fn handshake(style: u8) -> Vec<Op> {
    vec![
        Op::Greet { style },
        Op::DeliverAll,
        Op::WriteAll,
        Op::DeliverAll,
    ]
}

const JUNK: &[u8] = b"\xff\xff{\"return\": {}, \"id\": 1}\r\n\x01garbage\r\n[1, 2]\r\n\"str\"\r\n42 true null\r\n{\"foo\": 1}\r\n{bad json}\r\n{\"a\": \"\xff\"}\r\n}]\\\r\n{\"event\": \"STOP\"}{\"event\": \"RESUME\"}\r\n{\"error\": {\"class\": \"GenericError\", \"desc\": \"x\"}}\r\n{\"a\": [1, {\"b\": \"}\"}";

pub(crate) fn write_all(root: &Path) {
    let mut seeds: Vec<(&str, &str, Vec<u8>)> = Vec::new();

    let compact = capture("qsd-10.0-compact.server.bin");
    let pretty = capture("qsd-10.0-pretty.server.bin");
    let compact72 = capture("qsd-7.2-compact.server.bin");
    let pretty72 = capture("qsd-7.2-pretty.server.bin");
    let system = capture("qemu-system-7.2-session.server.bin");
    let cascade = capture("qsd-10.0-idless-cascade.server.bin");
    let cascade_client = capture("qsd-10.0-idless-cascade.client.bin");
    let client = capture("qsd-10.0-compact.client.bin");
    // The cascade's first 40 errors and its last messages.
    let cascade_ends = message_ends(&cascade);
    let mut cascade_short = cascade[..cascade_ends[42].1].to_vec();
    cascade_short.extend_from_slice(b"\n");
    cascade_short.extend_from_slice(&cascade[cascade_ends[cascade_ends.len() - 3].0..]);

    // Target 1: the splitter on raw streams.
    let t = "splitter_chunks";
    seeds.push((
        t,
        "qsd-10.0-compact",
        [splitter_header(4096, 16, 6, true), head(&compact, 0, 4096)].concat(),
    ));
    seeds.push((
        t,
        "qsd-10.0-pretty",
        [splitter_header(4096, 16, 4, true), head(&pretty, 0, 4096)].concat(),
    ));
    seeds.push((
        t,
        "qsd-7.2-pretty-small-limits",
        [splitter_header(120, 3, 3, true), head(&pretty72, 0, 4096)].concat(),
    ));
    seeds.push((
        t,
        "qemu-system-7.2",
        [splitter_header(4096, 16, 8, false), head(&system, 0, 4096)].concat(),
    ));
    seeds.push((
        t,
        "idless-cascade-client",
        [splitter_header(4096, 64, 7, true), cascade_client.clone()].concat(),
    ));
    seeds.push((
        t,
        "idless-cascade-server",
        [splitter_header(4096, 16, 5, true), cascade_short.clone()].concat(),
    ));
    seeds.push((
        t,
        "client-commands-with-junk",
        [splitter_header(4096, 16, 2, true), client.clone()].concat(),
    ));
    seeds.push((
        t,
        "junk",
        [splitter_header(64, 2, 1, true), JUNK.to_vec()].concat(),
    ));

    // Target 2: generator input. Arbitrary bytes describe values; these few cover every kind.
    let t = "splitter_differential";
    let mut rng = crate::Rng::new(0xd1ff);
    for (name, len) in [
        ("random-64", 64),
        ("random-512", 512),
        ("random-2048", 2048),
    ] {
        let mut bytes: Vec<u8> = vec![0x00, 0x04, 0x10]; // max_size 1024, max_depth 16
        bytes.extend((0..len).map(|_| rng.below(256) as u8));
        seeds.push((t, name, bytes));
    }
    seeds.push((t, "capture-bytes", head(&compact, 0, 4096)));

    // Target 3: the connection fed real streams after its own greeting.
    let t = "connection_bytes";
    // The captures answer ids 1 to 10 as recorded, which the connection's first ten commands
    // carry.
    let replay = FuzzConfig {
        max_in_flight: 9,
        ..big_config()
    };
    seeds.push((
        t,
        "qsd-10.0-compact",
        BytesSeed::new(replay).with(&head(&compact, 1, 4096)),
    ));
    seeds.push((
        t,
        "qsd-10.0-pretty",
        BytesSeed {
            greeting: 1,
            chunk_log: 3,
            ..BytesSeed::new(replay)
        }
        .with(&head(&pretty, 1, 4096)),
    ));
    seeds.push((
        t,
        "qsd-7.2-compact-lazy-oob",
        BytesSeed {
            early: 2,
            oob_mask: 0b1010_0000_0101,
            lazy: 1,
            end: 1,
            ..BytesSeed::new(big_config())
        }
        .with(&head(&compact72, 1, 4096)),
    ));
    seeds.push((
        t,
        "qsd-7.2-pretty-fds",
        BytesSeed {
            greeting: 1,
            fds_mask: 0b0110_0011,
            midstream: 7,
            ..BytesSeed::new(big_config())
        }
        .with(&head(&pretty72, 1, 4096)),
    ));
    seeds.push((
        t,
        "qemu-system-7.2",
        BytesSeed {
            greeting: 2,
            late: 6,
            ..BytesSeed::new(big_config())
        }
        .with(&head(&system, 1, 4096)),
    ));
    // The capture's last command had the id "after"; here it is request 1.
    let cascade_tail = head(&cascade_short, 2, 4096);
    let cascade_tail = String::from_utf8(cascade_tail)
        .expect("UTF-8")
        .replace(r#""id": "after""#, r#""id": 1"#);
    seeds.push((
        t,
        "idless-cascade",
        BytesSeed {
            late: 1,
            ..BytesSeed::new(big_config())
        }
        .with(cascade_tail.as_bytes()),
    ));
    seeds.push((
        t,
        "small-limits",
        BytesSeed {
            lazy: 2,
            ..BytesSeed::new(small_config())
        }
        .with(&head(&compact, 1, 4096)),
    ));
    seeds.push((
        t,
        "junk",
        BytesSeed {
            late: 3,
            chunk_log: 1,
            ..BytesSeed::new(big_config())
        }
        .with(JUNK),
    ));

    // Target 4: scripted sessions.
    let t = "connection_ops";
    let mut session = handshake(0);
    session.extend([
        send(0),
        send(3),
        Op::Send {
            cmd: 1,
            oob: true,
            fds: false,
            deadline_ms: None,
            size: 0,
        },
        Op::WriteAll,
        Op::Event {
            which: 0,
            pretty: false,
        },
        reply(1, ReplyKind::Return(7)),
        reply(0, ReplyKind::Error(1)),
        Op::Event {
            which: 2,
            pretty: false,
        },
        reply(0, ReplyKind::Return(1)),
        Op::DeliverAll,
        Op::Eof,
    ]);
    seeds.push((
        t,
        "session",
        ops_seed(header(big_config(), true, false, true), &session),
    ));

    let mut pretty_ops = handshake(1);
    pretty_ops.extend([
        send(0),
        Op::Send {
            cmd: 2,
            oob: false,
            fds: true,
            deadline_ms: None,
            size: 0,
        },
        send(7),
        Op::Write {
            max: 5,
            acknowledge_more: false,
        },
        Op::Write {
            max: 40,
            acknowledge_more: true,
        },
        Op::WriteAll,
        Op::Reply {
            k: 2,
            kind: ReplyKind::Return(6),
            pretty: true,
        },
        Op::Event {
            which: 3,
            pretty: true,
        },
        Op::Reply {
            k: 0,
            kind: ReplyKind::Return(0),
            pretty: true,
        },
        Op::Reply {
            k: 0,
            kind: ReplyKind::Error(2),
            pretty: true,
        },
    ]);
    pretty_ops.extend(std::iter::repeat_n(
        Op::Deliver {
            max: 7,
            force: false,
        },
        60,
    ));
    pretty_ops.push(Op::DeliverAll);
    seeds.push((
        t,
        "pretty-partial",
        ops_seed(header(big_config(), true, false, true), &pretty_ops),
    ));

    let mut cascade_ops = handshake(0);
    cascade_ops.extend([send(0), send(6), Op::WriteAll]);
    cascade_ops.extend(std::iter::repeat_n(Op::IdlessError { pretty: false }, 8));
    cascade_ops.extend([
        Op::UnknownId {
            which: 5,
            error: true,
        },
        Op::UnknownId {
            which: 0,
            error: false,
        },
        reply(0, ReplyKind::Return(0)),
        reply(0, ReplyKind::Return(0)),
        Op::Duplicate {
            k: 0,
            pretty: false,
        },
        Op::DeliverAll,
    ]);
    seeds.push((
        t,
        "idless-cascade",
        ops_seed(header(big_config(), true, false, true), &cascade_ops),
    ));

    let mut deadlines = vec![
        Op::Send {
            cmd: 0,
            oob: false,
            fds: false,
            deadline_ms: Some(100),
            size: 0,
        },
        Op::Send {
            cmd: 1,
            oob: true,
            fds: false,
            deadline_ms: Some(5000),
            size: 0,
        },
    ];
    deadlines.extend(handshake(0));
    deadlines.extend([
        Op::Send {
            cmd: 3,
            oob: false,
            fds: false,
            deadline_ms: Some(300),
            size: 0,
        },
        Op::Send {
            cmd: 2,
            oob: false,
            fds: false,
            deadline_ms: Some(300),
            size: 0,
        },
        send(0),
        Op::WriteAll,
        Op::Advance { ms: 50 },
        Op::TimeoutEarly { back_ms: 40 },
        Op::Cancel { which: 4 },
        Op::Advance { ms: 400 },
        reply(0, ReplyKind::Return(1)),
        reply(0, ReplyKind::Return(1)),
        Op::DeliverAll,
        Op::Advance { ms: 10_000 },
        send(0),
        send(1),
        Op::WriteAll,
        reply(0, ReplyKind::TooLarge),
        reply(0, ReplyKind::TooDeep),
        reply(0, ReplyKind::TooLarge),
        reply(0, ReplyKind::TooDeep),
        reply(0, ReplyKind::TooLarge),
        reply(0, ReplyKind::TooDeep),
        Op::DeliverAll,
    ]);
    seeds.push((
        t,
        "deadlines-and-cancels",
        ops_seed(header(big_config(), true, false, false), &deadlines),
    ));

    let mut junk_ops = handshake(0);
    junk_ops.extend([send(0), send(1), Op::WriteAll]);
    for which in 0..14 {
        junk_ops.push(Op::Junk { which });
        junk_ops.push(Op::Event {
            which: which % 8,
            pretty: which % 2 == 0,
        });
    }
    junk_ops.extend([
        reply(0, ReplyKind::Return(2)),
        Op::Junk { which: 14 },
        reply(0, ReplyKind::Return(3)),
        Op::DeliverAll,
    ]);
    seeds.push((
        t,
        "junk",
        ops_seed(header(big_config(), true, false, true), &junk_ops),
    ));

    let mut lazy = handshake(0);
    lazy.extend([send(0), send(0), send(0), send(0), Op::WriteAll]);
    for which in 0..6 {
        lazy.push(Op::Event {
            which,
            pretty: false,
        });
    }
    lazy.extend([
        reply(0, ReplyKind::Return(0)),
        reply(0, ReplyKind::Return(0)),
        Op::DeliverAll,
        Op::Drain { n: 1 },
        Op::WriteAll,
        Op::Deliver {
            max: 40,
            force: true,
        },
        Op::Drain { n: 2 },
        Op::Close,
    ]);
    seeds.push((
        t,
        "lazy-small-limits",
        ops_seed(header(small_config(), true, true, false), &lazy),
    ));

    let own = vec![
        Op::Greet { style: 0 },
        Op::DeliverAll,
        Op::Send {
            cmd: 4,
            oob: false,
            fds: false,
            deadline_ms: None,
            size: 0,
        },
        Op::Send {
            cmd: 0,
            oob: true,
            fds: false,
            deadline_ms: None,
            size: 0,
        },
        send(8),
        Op::WriteAll,
        Op::DeliverAll,
        Op::Send {
            cmd: 0,
            oob: true,
            fds: false,
            deadline_ms: None,
            size: 0,
        },
        Op::Send {
            cmd: 6,
            oob: false,
            fds: false,
            deadline_ms: None,
            size: 5000,
        },
        Op::WriteAll,
        reply(0, ReplyKind::Return(4)),
        reply(0, ReplyKind::Return(5)),
        Op::DeliverAll,
    ];
    let mut own_config = big_config();
    own_config.negotiate = false;
    seeds.push((
        t,
        "own-negotiation",
        ops_seed(header(own_config, true, false, true), &own),
    ));

    let no_oob = vec![
        Op::Send {
            cmd: 0,
            oob: true,
            fds: false,
            deadline_ms: None,
            size: 0,
        },
        send(1),
        Op::Greet { style: 2 },
        Op::DeliverAll,
        Op::WriteAll,
        Op::Reply {
            k: 0,
            kind: ReplyKind::Return(0),
            pretty: false,
        },
        Op::DeliverAll,
        Op::WriteAll,
        Op::Send {
            cmd: 0,
            oob: true,
            fds: false,
            deadline_ms: None,
            size: 0,
        },
        reply(0, ReplyKind::Return(1)),
        Op::DeliverAll,
        Op::Close,
    ];
    seeds.push((
        t,
        "oob-unavailable",
        ops_seed(header(big_config(), false, false, false), &no_oob),
    ));

    let broken = vec![
        send(0),
        Op::Event {
            which: 0,
            pretty: false,
        },
        Op::Greet { style: 0 },
        Op::DeliverAll,
        Op::Greet { style: 3 },
        Op::DeliverAll,
    ];
    seeds.push((
        t,
        "bad-greeting",
        ops_seed(header(big_config(), true, false, true), &broken),
    ));

    let dir = root.join("seeds");
    for (target, name, bytes) in seeds {
        let target_dir = dir.join(target);
        std::fs::create_dir_all(&target_dir).expect("seed directory");
        std::fs::write(target_dir.join(name), bytes).expect("seed written");
    }
}
