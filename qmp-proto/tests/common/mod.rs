//! Test kit for the core: a sans-IO fake QEMU server, a client/server pair, chunked feeding.
#![allow(dead_code, unreachable_pub, missing_docs)]
// The test kit reads capture files and starts the simulated clock: IO the core itself may not do.
#![allow(clippy::disallowed_methods, clippy::disallowed_types)]

use std::collections::VecDeque;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use qmp_proto::{Command, Config, Connection, Output, RequestId};
use serde_json::{Value, json};

/// A real capture from `tests/data`.
pub fn data(name: &str) -> Vec<u8> {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/data")
        .join(name);
    std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// Every output available now.
pub fn drain(conn: &mut Connection) -> Vec<Output> {
    std::iter::from_fn(|| conn.poll_output()).collect()
}

/// Writes everything the connection has to send, returning the bytes.
pub fn take_transmit(conn: &mut Connection) -> Vec<u8> {
    let mut out = Vec::new();
    while let Some(t) = conn.poll_transmit() {
        out.extend_from_slice(t.data);
        let n = t.data.len();
        conn.advance_transmit(n);
    }
    out
}

/// How input bytes are cut before they reach the connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Chunking {
    Whole,
    ByteAtATime,
    /// Random cuts from this seed, pieces of 1 to 64 bytes on average.
    Random(u64),
}

pub const CHUNKINGS: [Chunking; 4] = [
    Chunking::Whole,
    Chunking::ByteAtATime,
    Chunking::Random(1),
    Chunking::Random(0x5eed),
];

/// A small deterministic PRNG (xorshift64*), so a failing split replays bit for bit.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Self(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }
    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
}

/// Cuts `bytes` into pieces as `chunking` says.
pub fn pieces(bytes: &[u8], chunking: Chunking) -> Vec<&[u8]> {
    match chunking {
        Chunking::Whole => vec![bytes],
        Chunking::ByteAtATime => bytes.chunks(1).collect(),
        Chunking::Random(seed) => {
            let mut rng = Rng::new(seed);
            let mut out = Vec::new();
            let mut rest = bytes;
            while !rest.is_empty() {
                // Mostly small pieces, sometimes large ones.
                let max = if rng.below(8) == 0 { 4096 } else { 64 };
                let n = (1 + rng.below(max) as usize).min(rest.len());
                out.push(&rest[..n]);
                rest = &rest[n..];
            }
            out
        }
    }
}

/// Feeds `bytes` in pieces, draining outputs after each one (as an adapter would).
pub fn feed(conn: &mut Connection, bytes: &[u8], chunking: Chunking) -> Vec<Output> {
    let mut outputs = Vec::new();
    for piece in pieces(bytes, chunking) {
        conn.handle_input(piece);
        outputs.extend(drain(conn));
    }
    outputs
}

/// Outputs in a form that ignores the JSON formatting of raw values, so compact and pretty
/// streams can be compared.
pub fn canonical(outputs: &[Output]) -> Vec<String> {
    outputs
        .iter()
        .map(|o| match o {
            Output::Response {
                id,
                result: Ok(raw),
            } => {
                format!("response {id} ok {}", raw.to_value().expect("valid"))
            }
            Output::Response { id, result: Err(e) } => format!("response {id} err {e}"),
            Output::Event(e) => format!(
                "event {} {:?} {:?}",
                e.name,
                e.data_value().ok(),
                e.timestamp
            ),
            Output::Unmatched(u) => format!(
                "unmatched {:?} {:?}",
                u.id.as_ref().map(|i| i.to_value().expect("valid")),
                u.result.as_ref().map(|r| r.to_value().expect("valid"))
            ),
            Output::Malformed(m) => format!("malformed {:?} {}", m.kind, m.excerpt),
            other => format!("{other:?}"),
        })
        .collect()
}

pub const GREETING_10: &str = r#"{"QMP": {"version": {"qemu": {"micro": 2, "minor": 0, "major": 10}, "package": "Debian 1:10.0.2+ds-2+deb13u1~bpo12+1"}, "capabilities": ["oob"]}}"#;

/// A sans-IO model of a QEMU monitor: it parses what the client writes and answers as scripted.
pub struct FakeQemu {
    /// Offer `oob` in the greeting.
    pub offer_oob: bool,
    /// Render messages like `pretty=on` (multi-line, 4-space indent, CRLF).
    pub pretty: bool,
    /// Answer `qmp_capabilities` by itself.
    pub auto_negotiate: bool,
    /// Whether the client enabled OOB in its `qmp_capabilities`.
    pub oob_negotiated: Option<bool>,
    pub inbox: Vec<u8>,
    /// Commands received and not yet answered, in arrival order.
    pub commands: VecDeque<Value>,
    /// Every command received, in order.
    pub log: Vec<Value>,
    pub out: Vec<u8>,
}

impl Default for FakeQemu {
    fn default() -> Self {
        Self {
            offer_oob: true,
            pretty: false,
            auto_negotiate: true,
            oob_negotiated: None,
            inbox: Vec::new(),
            commands: VecDeque::new(),
            log: Vec::new(),
            out: Vec::new(),
        }
    }
}

impl FakeQemu {
    pub fn send_value(&mut self, v: &Value) {
        if self.pretty {
            let mut s = serde_json::to_string_pretty(v).expect("serializable");
            s = s.replace('\n', "\r\n");
            self.out.extend_from_slice(s.as_bytes());
        } else {
            self.out.extend_from_slice(v.to_string().as_bytes());
        }
        self.out.extend_from_slice(b"\r\n");
    }

    pub fn send_raw(&mut self, bytes: &[u8]) {
        self.out.extend_from_slice(bytes);
    }

    pub fn greet(&mut self) {
        let caps: Vec<&str> = if self.offer_oob { vec!["oob"] } else { vec![] };
        let g = json!({"QMP": {"version": {"qemu": {"micro": 2, "minor": 0, "major": 10},
            "package": "fake"}, "capabilities": caps}});
        self.send_value(&g);
    }

    /// Takes bytes the client wrote. Commands are framed with serde_json's stream reader: this
    /// side trusts the client to write valid JSON (a broken command makes the test fail).
    pub fn receive(&mut self, bytes: &[u8]) {
        self.inbox.extend_from_slice(bytes);
        let mut stream = serde_json::Deserializer::from_slice(&self.inbox).into_iter::<Value>();
        let mut consumed = 0;
        let mut got = Vec::new();
        loop {
            match stream.next() {
                Some(Ok(v)) => {
                    consumed = stream.byte_offset();
                    got.push(v);
                }
                Some(Err(e)) if e.is_eof() => break,
                Some(Err(e)) => panic!("client wrote invalid JSON: {e}"),
                None => break,
            }
        }
        self.inbox.drain(..consumed);
        for cmd in got {
            self.log.push(cmd.clone());
            if self.auto_negotiate && cmd["execute"] == "qmp_capabilities" {
                let enable = cmd["arguments"]["enable"]
                    .as_array()
                    .cloned()
                    .unwrap_or_default();
                self.oob_negotiated = Some(enable.iter().any(|c| c == "oob"));
                self.reply(&cmd, json!({}));
            } else {
                self.commands.push_back(cmd);
            }
        }
    }

    pub fn next_command(&mut self) -> Option<Value> {
        self.commands.pop_front()
    }

    /// Answers `cmd` with a return value, echoing its id.
    pub fn reply(&mut self, cmd: &Value, ret: Value) {
        let mut msg = json!({ "return": ret });
        if let Some(id) = cmd.get("id") {
            msg["id"] = id.clone();
        }
        self.send_value(&msg);
    }

    /// Answers `cmd` with an error, echoing its id.
    pub fn reply_error(&mut self, cmd: &Value, class: &str, desc: &str) {
        let mut msg = json!({ "error": {"class": class, "desc": desc} });
        if let Some(id) = cmd.get("id") {
            msg["id"] = id.clone();
        }
        self.send_value(&msg);
    }

    /// An error without an id, as QEMU sends when it cannot parse its input.
    pub fn idless_error(&mut self, desc: &str) {
        self.send_value(&json!({"error": {"class": "GenericError", "desc": desc}}));
    }

    pub fn event(&mut self, name: &str, data: Value) {
        self.send_value(
            &json!({"timestamp": {"seconds": 1795648047, "microseconds": 84562},
            "event": name, "data": data}),
        );
    }

    /// Answers every waiting command with `{}` in arrival order.
    pub fn reply_all(&mut self) {
        while let Some(cmd) = self.next_command() {
            self.reply(&cmd, json!({}));
        }
    }

    pub fn take_output(&mut self) -> Vec<u8> {
        std::mem::take(&mut self.out)
    }
}

/// A client connection and a fake server wired together, with simulated time.
pub struct Pair {
    pub client: Connection,
    pub server: FakeQemu,
    pub outputs: Vec<Output>,
    pub chunking: Chunking,
    pub now: Instant,
}

impl Pair {
    pub fn new(config: Config, server: FakeQemu, chunking: Chunking) -> Self {
        Self {
            client: Connection::new(config),
            server,
            outputs: Vec::new(),
            chunking,
            now: Instant::now(),
        }
    }

    /// A pair past the handshake, with the handshake's outputs cleared.
    pub fn ready(config: Config, server: FakeQemu, chunking: Chunking) -> Self {
        let mut pair = Self::new(config, server, chunking);
        pair.server.greet();
        pair.drive();
        assert!(
            pair.outputs
                .iter()
                .any(|o| matches!(o, Output::Ready { .. })),
            "handshake did not finish: {:?}",
            pair.outputs
        );
        pair.outputs.clear();
        pair
    }

    /// Moves bytes both ways and collects outputs until nothing moves.
    pub fn drive(&mut self) {
        loop {
            self.outputs.extend(drain(&mut self.client));
            let to_server = take_transmit(&mut self.client);
            let to_client = self.server.take_output();
            if to_server.is_empty() && to_client.is_empty() {
                break;
            }
            self.server.receive(&to_server);
            let got = feed(&mut self.client, &to_client, self.chunking);
            self.outputs.extend(got);
        }
    }

    pub fn send(&mut self, cmd: Command) -> RequestId {
        self.client.send(cmd).expect("send")
    }

    pub fn execute(&mut self, name: &str) -> RequestId {
        self.send(Command::new(name))
    }

    /// Advances simulated time and lets deadlines fire.
    pub fn advance(&mut self, by: Duration) {
        self.now += by;
        self.client.handle_timeout(self.now);
        self.drive();
    }

    pub fn take_outputs(&mut self) -> Vec<Output> {
        std::mem::take(&mut self.outputs)
    }

    /// The responses among the outputs so far, by id.
    pub fn responses(&self) -> Vec<(RequestId, Result<Value, qmp_proto::CommandError>)> {
        self.outputs
            .iter()
            .filter_map(|o| match o {
                Output::Response { id, result } => Some((
                    *id,
                    result
                        .as_ref()
                        .map(|r| r.to_value().expect("valid"))
                        .map_err(Clone::clone),
                )),
                _ => None,
            })
            .collect()
    }
}

/// Runs `scenario` once under every chunking and checks that it produced the same outputs each
/// time; returns the outputs of the first (whole) run.
pub fn same_under_every_chunking(mut scenario: impl FnMut(Chunking) -> Vec<Output>) -> Vec<Output> {
    let mut first: Option<Vec<Output>> = None;
    for chunking in CHUNKINGS {
        let got = scenario(chunking);
        match &first {
            None => first = Some(got),
            Some(want) => assert!(
                got == *want,
                "outputs differ under {chunking:?}:\n{:#?}\nwhole:\n{:#?}",
                canonical(&got),
                canonical(want)
            ),
        }
    }
    first.expect("CHUNKINGS is not empty")
}

/// Feeds `bytes` in pieces as a careful adapter does: it reads only while the connection
/// [`wants_read`](Connection::wants_read), and otherwise polls one output to make room. Outputs
/// still queued at the end are left there (drain them, or test what happens while paused).
pub fn feed_paced(conn: &mut Connection, bytes: &[u8], chunking: Chunking) -> Vec<Output> {
    let mut outputs = Vec::new();
    for piece in pieces(bytes, chunking) {
        while !conn.wants_read() {
            match conn.poll_output() {
                Some(o) => outputs.push(o),
                None => break,
            }
        }
        conn.handle_input(piece);
    }
    outputs
}

/// The default configuration with OOB negotiated (it is opt-in).
pub fn oob_config() -> Config {
    Config::builder().enable_oob(true).build().expect("valid")
}
