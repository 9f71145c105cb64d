//! The client's own cost per command, with the socket taken out: the client runs over an
//! in-memory stream whose "server" answers every `query-version` the moment it is written, with
//! the bytes floodsrv sends. What is left is the whole client path (caller, driver, core,
//! decoding) on a current-thread runtime, as in the harness's `pipeline` workload.
//!
//! `cargo bench -p qmp-tokio --bench client`

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll, Waker};

use criterion::{BatchSize, Criterion, Throughput, criterion_group, criterion_main};
use futures_util::StreamExt;
use qmp_tokio::{Client, Options};
use serde::Deserialize;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

const GREETING: &[u8] = br#"{"QMP": {"version": {"qemu": {"micro": 2, "minor": 0, "major": 10}, "package": "Debian 1:10.0.2+ds-2+deb13u1~bpo12+1"}, "capabilities": ["oob"]}}"#;
const REPLY_HEAD: &[u8] = br#"{"return": {"qemu": {"micro": 2, "minor": 0, "major": 10}, "package": "Debian 1:10.0.2+ds-2+deb13u1~bpo12+1"}"#;

/// A QMP server in memory: replies to each command as it is written.
struct EchoServer {
    out: Vec<u8>,
    read_at: usize,
    reader: Option<Waker>,
}

impl EchoServer {
    fn new() -> Self {
        let mut out = GREETING.to_vec();
        out.extend_from_slice(b"\r\n");
        Self {
            out,
            read_at: 0,
            reader: None,
        }
    }

    /// Answers one command: `qmp_capabilities` with `{}`, anything else with the version.
    fn answer(&mut self, command: &[u8]) {
        let text = std::str::from_utf8(command).expect("UTF-8 command");
        let id = text
            .find("\"id\":")
            .map(|at| text[at + 5..].trim_start().trim_end_matches(['}', ' ']));
        if text.contains("qmp_capabilities") {
            self.out.extend_from_slice(br#"{"return": {}"#);
        } else {
            self.out.extend_from_slice(REPLY_HEAD);
        }
        if let Some(id) = id {
            self.out.extend_from_slice(b", \"id\": ");
            self.out.extend_from_slice(id.as_bytes());
        }
        self.out.extend_from_slice(b"}\r\n");
    }
}

impl AsyncWrite for EchoServer {
    fn poll_write(
        mut self: Pin<&mut Self>,
        _: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        // The client writes whole commands, each ending in a newline.
        for command in buf.split(|&b| b == b'\n').filter(|c| !c.is_empty()) {
            self.answer(command);
        }
        if let Some(reader) = self.reader.take() {
            reader.wake();
        }
        Poll::Ready(Ok(buf.len()))
    }

    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

impl AsyncRead for EchoServer {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        let pending = &this.out[this.read_at..];
        if pending.is_empty() {
            this.reader = Some(cx.waker().clone());
            return Poll::Pending;
        }
        let n = pending.len().min(buf.remaining());
        buf.put_slice(&pending[..n]);
        this.read_at += n;
        if this.read_at == this.out.len() {
            this.out.clear();
            this.read_at = 0;
        }
        Poll::Ready(Ok(()))
    }
}

#[derive(Deserialize)]
#[allow(dead_code)] // decoded, not read
struct VersionInfo {
    qemu: VersionTriple,
    package: String,
}

#[derive(Deserialize)]
#[allow(dead_code)]
struct VersionTriple {
    major: u64,
    minor: u64,
    micro: u64,
}

/// Commands per measured iteration.
const N: u64 = 3_200;
/// Commands in flight, as in the harness.
const WINDOW: usize = 32;

async fn pipeline(client: &Client) {
    let mut calls = futures_util::stream::iter(0..N)
        .map(|_| client.execute_as::<VersionInfo>("query-version", ()))
        .buffer_unordered(WINDOW);
    while let Some(r) = calls.next().await {
        r.expect("query-version");
    }
}

async fn roundtrips(client: &Client) {
    for _ in 0..N {
        let _: VersionInfo = client
            .execute_as("query-version", ())
            .await
            .expect("query-version");
    }
}

fn benches(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let client = rt
        .block_on(qmp_tokio::wrap(EchoServer::new(), Options::new()))
        .expect("connected");
    rt.block_on(pipeline(&client));

    let mut g = c.benchmark_group("client");
    g.throughput(Throughput::Elements(N));
    g.bench_function("pipeline_32", |b| {
        b.iter_batched(
            || (),
            |()| rt.block_on(pipeline(&client)),
            BatchSize::PerIteration,
        )
    });
    g.bench_function("roundtrip", |b| {
        b.iter_batched(
            || (),
            |()| rt.block_on(roundtrips(&client)),
            BatchSize::PerIteration,
        )
    });
    g.finish();
}

fn config() -> Criterion {
    Criterion::default()
        .sample_size(20)
        .warm_up_time(std::time::Duration::from_millis(500))
        .measurement_time(std::time::Duration::from_secs(3))
}

criterion_group! {
    name = client;
    config = config();
    targets = benches
}
criterion_main!(client);
