//! Throughput of the core: the framing alone, the whole connection, and `serde_json` floors.
//!
//! Two inputs, both built deterministically:
//!
//! * an event stream of 4 MiB: QEMU-style lines of 160 to 230 bytes, repeating the
//!   `JOB_STATUS_CHANGE` and `BLOCK_JOB_COMPLETED` events of a backup job;
//! * one ~10 MB return value shaped like `query-named-block-nodes` output.
//!
//! Every input is fed in 64 KiB chunks, as a socket read would deliver it.
//!
//! Benchmarks, in two groups named after their input (`events/*` and `reply_10MB/*`):
//!
//! * `framing`: [`JsonSplitter`] only, draining `next_frame()`, a new splitter each time;
//!   `framing_warm` (reply only) reuses one splitter, whose buffer has already grown.
//! * `core`, `core_raw`, `core_to_value`: a [`Connection`] past its handshake, draining
//!   `poll_output()`. Events are delivered with lazily parsed data, and the bench touches only
//!   their names; the big reply is measured without and with decoding it through
//!   [`RawJson::to_value`].
//! * `floor_value_per_line`, `floor_value`: `serde_json::from_slice::<Value>` over each line of the
//!   event stream, and over the whole reply: what a client that parses every message into a
//!   `Value` pays at least.
//!
//! Run with `cargo bench -p qmp-proto -- --noplot`. The run prints the size of each input and the number of events, to turn the reported times into
//! events per second.

use std::fmt::Write as _;
use std::hint::black_box;
use std::time::Duration;

use criterion::{BatchSize, Criterion, SamplingMode, Throughput, criterion_group, criterion_main};
use qmp_proto::framing::JsonSplitter;
use qmp_proto::{Command, Connection, Output, RawJson};
use serde_json::Value;

/// The read size of a typical socket loop.
const CHUNK: usize = 64 << 10;
/// Size of the event stream.
const EVENT_STREAM_BYTES: usize = 4 << 20;
/// Size of the big return value.
const BIG_REPLY_BYTES: usize = 10_000_000;

/// The events of one `blockdev-backup` job as qemu-storage-daemon 10.0 sends them (see
/// `examples/poll_loop.rs`): `JOB_STATUS_CHANGE` with these statuses, `None` standing for the
/// `BLOCK_JOB_COMPLETED` event.
const JOB_CYCLE: [Option<&str>; 9] = [
    Some("created"),
    Some("running"),
    Some("paused"),
    Some("running"),
    Some("waiting"),
    Some("pending"),
    None,
    Some("concluded"),
    Some("null"),
];

/// A stream of events as qemu-storage-daemon writes them, `\r\n` after each, and how many there are.
fn event_stream() -> (Vec<u8>, usize) {
    let mut s = String::with_capacity(EVENT_STREAM_BYTES + 512);
    let mut n = 0usize;
    let (mut seconds, mut micros) = (1_795_648_047u64, 84_562u64);
    while s.len() < EVENT_STREAM_BYTES {
        let job = n / JOB_CYCLE.len();
        // Job names of varying length, as users pick them.
        let id = format!("backup-job-{job}-drive-virtio-disk{}", job % 4);
        micros += 137 + (n as u64 * 7919) % 5000;
        if micros >= 1_000_000 {
            seconds += 1;
            micros -= 1_000_000;
        }
        let _ = write!(
            s,
            r#"{{"timestamp": {{"seconds": {seconds}, "microseconds": {micros}}}, "#
        );
        match JOB_CYCLE[n % JOB_CYCLE.len()] {
            Some(status) => {
                let _ = write!(
                    s,
                    r#""event": "JOB_STATUS_CHANGE", "data": {{"status": "{status}", "id": "{id}"}}}}"#
                );
            }
            None => {
                let len = 67_108_864u64 << (job % 5);
                let _ = write!(
                    s,
                    r#""event": "BLOCK_JOB_COMPLETED", "data": {{"device": "{id}", "len": {len}, "offset": {len}, "speed": 0, "type": "backup"}}}}"#
                );
            }
        }
        s.push_str("\r\n");
        n += 1;
    }
    (s.into_bytes(), n)
}

/// One block node as `query-named-block-nodes` describes it.
fn block_node(s: &mut String, i: usize) {
    let size = 1u64 << (26 + i % 8);
    let fmt = ["qcow2", "raw", "null-co"][i % 3];
    let _ = write!(
        s,
        concat!(
            r#"{{"iops_rd": 0, "detect_zeroes": "off", "image": {{"virtual-size": {size}, "#,
            r#""filename": "/var/lib/libvirt/images/vm{vm}-disk{i}.{fmt}", "#,
            r#""cluster-size": 65536, "format": "{fmt}", "actual-size": {actual}, "#,
            r#""dirty-flag": false, "format-specific": {{"type": "{fmt}", "data": {{"#,
            r#""compat": "1.1", "compression-type": "zlib", "lazy-refcounts": false, "#,
            r#""refcount-bits": 16, "corrupt": false, "extended-l2": false}}}}}}, "#,
            r#""iops_wr": 0, "ro": {ro}, "node-name": "{name}", "backing_file_depth": 0, "#,
            r#""drv": "{fmt}", "iops": 0, "bps_wr": 0, "write_threshold": 0, "#,
            r#""encrypted": false, "bps": 0, "bps_rd": 0, "#,
            r#""cache": {{"no-flush": false, "direct": {direct}, "writeback": true}}, "#,
            r#""file": "/var/lib/libvirt/images/vm{vm}-disk{i}.{fmt}", "dirty-bitmaps": []}}"#,
        ),
        size = size,
        fmt = fmt,
        i = i,
        name = format_args!("#block{i:05}"),
        vm = i / 4,
        actual = size / 3 + (i as u64 * 4096),
        ro = i.is_multiple_of(7),
        direct = i.is_multiple_of(2),
    );
}

/// `{"return": [nodes...], "id": 1}\r\n`, about `BIG_REPLY_BYTES` long.
fn big_reply() -> Vec<u8> {
    let mut s = String::with_capacity(BIG_REPLY_BYTES + 4096);
    s.push_str(r#"{"return": ["#);
    let mut i = 0;
    while s.len() < BIG_REPLY_BYTES {
        if i > 0 {
            s.push_str(", ");
        }
        block_node(&mut s, i);
        i += 1;
    }
    s.push_str("], \"id\": 1}\r\n");
    s.into_bytes()
}

/// A connection past its handshake, with nothing to read or write.
fn ready_connection() -> Connection {
    let mut conn = Connection::default();
    conn.handle_input(
        b"{\"QMP\": {\"version\": {\"qemu\": {\"micro\": 2, \"minor\": 0, \"major\": 10}, \
          \"package\": \"Debian 1:10.0.2\"}, \"capabilities\": [\"oob\"]}}\r\n",
    );
    assert!(matches!(conn.poll_output(), Some(Output::Greeting(_))));
    let n = conn.poll_transmit().expect("qmp_capabilities").data.len();
    conn.advance_transmit(n);
    conn.handle_input(b"{\"return\": {}, \"id\": 0}\r\n");
    assert!(matches!(conn.poll_output(), Some(Output::Ready { .. })));
    assert!(conn.poll_transmit().is_none());
    conn
}

/// A ready connection waiting for the response to `x-big` (id 1).
fn awaiting_big() -> Connection {
    let mut conn = ready_connection();
    let id = conn.send(Command::new("x-big")).expect("send");
    assert_eq!(id.get(), 1);
    let n = conn.poll_transmit().expect("x-big").data.len();
    conn.advance_transmit(n);
    conn
}

/// Frames `input` chunk by chunk with a new splitter; returns the number of frames.
fn split_all(input: &[u8]) -> usize {
    split_with(&mut JsonSplitter::new(64 << 20, 64), input)
}

/// Frames `input` chunk by chunk; returns the number of frames.
fn split_with(splitter: &mut JsonSplitter, input: &[u8]) -> usize {
    let mut frames = 0;
    for chunk in input.chunks(CHUNK) {
        splitter.push(chunk);
        while let Some(frame) = splitter.next_frame() {
            black_box(frame.expect("a valid frame").len());
            frames += 1;
        }
    }
    frames
}

/// Feeds the event stream to a ready connection; returns the number of events. Only the name of
/// each event is looked at.
fn deliver_events(mut conn: Connection, input: &[u8]) -> usize {
    let mut events = 0;
    for chunk in input.chunks(CHUNK) {
        conn.handle_input(chunk);
        while let Some(out) = conn.poll_output() {
            match out {
                Output::Event(e) => {
                    black_box(e.name.as_bytes()[0]);
                    events += 1;
                }
                other => panic!("unexpected output {other:?}"),
            }
        }
    }
    events
}

/// Feeds the big reply to a connection awaiting it and returns the return value.
fn receive_big(mut conn: Connection, input: &[u8]) -> RawJson {
    let mut value = None;
    for chunk in input.chunks(CHUNK) {
        conn.handle_input(chunk);
        while let Some(out) = conn.poll_output() {
            match out {
                Output::Response { result, .. } => value = Some(result.expect("a return value")),
                other => panic!("unexpected output {other:?}"),
            }
        }
    }
    value.expect("the response")
}

/// The floor: each line parsed into a `Value`, as a client that builds every message would.
fn parse_lines(lines: &[&[u8]]) {
    for line in lines {
        let v: Value = serde_json::from_slice(black_box(line)).expect("valid JSON");
        black_box(&v);
    }
}

/// Byte ranges of the lines of `stream`, without their line endings.
fn lines(stream: &[u8]) -> Vec<&[u8]> {
    stream
        .split(|&b| b == b'\n')
        .map(|l| l.strip_suffix(b"\r").unwrap_or(l))
        .filter(|l| !l.is_empty())
        .collect()
}

/// What floodsrv answers to `query-version`.
const VERSION_JSON: &str = r#"{"qemu": {"micro": 2, "minor": 0, "major": 10}, "package": "Debian 1:10.0.2+ds-2+deb13u1~bpo12+1"}"#;

/// Commands in flight per batch, as in the harness's pipeline workload.
const WINDOW: u64 = 32;

/// The replies to one batch whose first command is request `first`, as floodsrv writes them
/// (a command's wire id is its request id).
fn pipeline_replies(first: u64) -> Vec<u8> {
    let mut replies = String::new();
    for wire in first..first + WINDOW {
        let _ = write!(
            replies,
            "{{\"return\": {VERSION_JSON}, \"id\": {wire}}}\r\n"
        );
    }
    replies.into_bytes()
}

/// `iters` pipelining batches on `conn`, whose next request is `next`, timed without making
/// their replies (ids grow, so each batch needs its own).
#[allow(clippy::disallowed_methods)] // Instant::now: the bench times itself, not the core
fn timed_batches(
    conn: &mut Connection,
    next: &mut u64,
    iters: u64,
    decode_value: bool,
) -> Duration {
    let mut total = Duration::ZERO;
    for _ in 0..iters {
        let replies = pipeline_replies(*next);
        let start = std::time::Instant::now();
        let got = pipeline_batch(conn, black_box(&replies), decode_value);
        total += start.elapsed();
        assert_eq!(got, WINDOW);
        *next += WINDOW;
    }
    total
}

/// One pipelining batch: sends `WINDOW` `query-version` commands, drains what is to be written,
/// feeds their replies in one chunk (as one socket read would deliver them) and takes the
/// responses. Returns the number of responses.
fn pipeline_batch(conn: &mut Connection, replies: &[u8], decode_value: bool) -> u64 {
    for _ in 0..WINDOW {
        let mut command = Command::new("query-version");
        if decode_value {
            command = command.decode_value();
        }
        let id = conn.send(command).expect("send");
        debug_assert_eq!(conn.wire_id(id), Some(id.get()));
    }
    while let Some(t) = conn.poll_transmit() {
        let n = black_box(t.data).len();
        conn.advance_transmit(n);
    }
    conn.handle_input(replies);
    let mut got = 0;
    while let Some(out) = conn.poll_output() {
        match out {
            Output::Response { result, .. } => {
                black_box(result.expect("a return value").get().len());
                got += 1;
            }
            Output::Value { value, .. } => {
                black_box(&value);
                got += 1;
            }
            other => panic!("unexpected output {other:?}"),
        }
    }
    got
}

fn benches(c: &mut Criterion) {
    let (events, n_events) = event_stream();
    let big = big_reply();
    let lines = lines(&events);
    assert_eq!(lines.len(), n_events);

    // Sanity checks outside the measurements: every path sees what the bench claims.
    assert_eq!(split_all(&events), n_events);
    assert_eq!(split_all(&big), 1);
    assert_eq!(deliver_events(ready_connection(), &events), n_events);
    let reply = receive_big(awaiting_big(), &big);
    assert_eq!(
        reply
            .to_value()
            .expect("valid JSON")
            .as_array()
            .map(Vec::len),
        {
            let v: Value = serde_json::from_slice(&big).expect("valid JSON");
            v["return"].as_array().map(Vec::len)
        }
    );
    drop(reply);
    let shortest = lines.iter().map(|l| l.len() + 2).min().unwrap_or(0);
    let longest = lines.iter().map(|l| l.len() + 2).max().unwrap_or(0);
    eprintln!(
        "inputs: event stream {} bytes, {n_events} events of {shortest} to {longest} bytes \
         ({:.0} on average); reply {} bytes",
        events.len(),
        events.len() as f64 / n_events as f64,
        big.len()
    );

    let mut g = c.benchmark_group("events");
    g.throughput(Throughput::Bytes(events.len() as u64));
    g.bench_function("framing", |b| b.iter(|| split_all(black_box(&events))));
    g.bench_function("core", |b| {
        b.iter_batched(
            ready_connection,
            |conn| deliver_events(conn, black_box(&events)),
            BatchSize::SmallInput,
        )
    });
    g.bench_function("floor_value_per_line", |b| b.iter(|| parse_lines(&lines)));
    g.finish();

    let mut g = c.benchmark_group("pipeline_32");
    g.throughput(Throughput::Elements(WINDOW));
    let batch = pipeline_replies(1);
    let mut conn = ready_connection();
    let id = conn.send(Command::new("query-version")).expect("send");
    assert_eq!(conn.wire_id(id), Some(1), "the first command's wire id");
    let (mut conn, mut next) = (ready_connection(), 1);
    assert!(!timed_batches(&mut conn, &mut next, 2, false).is_zero());
    let lines_32 = crate::lines(&batch);
    g.bench_function("core", |b| {
        b.iter_custom(|iters| timed_batches(&mut conn, &mut next, iters, false))
    });
    g.bench_function("core_value", |b| {
        b.iter_custom(|iters| timed_batches(&mut conn, &mut next, iters, true))
    });
    g.bench_function("floor_value_per_line", |b| {
        b.iter(|| parse_lines(&lines_32))
    });
    g.finish();

    let mut g = c.benchmark_group("reply_10MB");
    g.throughput(Throughput::Bytes(big.len() as u64));
    g.sampling_mode(SamplingMode::Flat);
    g.bench_function("framing", |b| b.iter(|| split_all(black_box(&big))));
    // The same splitter throughout, as on a long-lived connection: its buffer has already grown
    // to the reply's size, so this is the scanner without the cost of growing the buffer.
    g.bench_function("framing_warm", |b| {
        let mut splitter = JsonSplitter::new(64 << 20, 64);
        b.iter(|| split_with(&mut splitter, black_box(&big)))
    });
    g.bench_function("core_raw", |b| {
        b.iter_batched(
            awaiting_big,
            |conn| {
                let raw = receive_big(conn, black_box(&big));
                black_box(raw.get().len());
            },
            BatchSize::SmallInput,
        )
    });
    g.bench_function("core_to_value", |b| {
        b.iter_batched(
            awaiting_big,
            |conn| {
                let v = receive_big(conn, black_box(&big))
                    .to_value()
                    .expect("valid JSON");
                black_box(&v);
            },
            BatchSize::SmallInput,
        )
    });
    g.bench_function("floor_value", |b| {
        b.iter(|| {
            let v: Value = serde_json::from_slice(black_box(&big)).expect("valid JSON");
            black_box(&v);
        })
    });
    g.finish();
}

fn config() -> Criterion {
    Criterion::default()
        .sample_size(20)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(3))
}

criterion_group! {
    name = core;
    config = config();
    targets = benches
}
criterion_main!(core);
