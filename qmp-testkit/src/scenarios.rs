//! The conformance suite: every scenario, written once against [`Adapter`], run on every adapter
//! by [`conformance!`](crate::conformance) (tokio, async-std, smol, blocking), so a behaviour
//! cannot differ between runtimes without a test failing.

use std::future::Future;
use std::os::fd::OwnedFd;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::{Arc, Mutex, mpsc};
use std::time::Duration;

use futures_util::future::join_all;
use qmp_client::{
    Address, Client, CommandError, Config, Disconnect, Error, EventFilter, GuestAgent, NoReply,
    Options, ProtocolError,
};
use serde_json::{Value, json};

use crate::{FakeServer, GREETING, QemuGa, Qsd, ServerConn};

pub mod events;
pub mod peer_gone;
pub mod protocol_rules;
#[allow(unused_imports)]
pub use events::*;
#[allow(unused_imports)]
pub use peer_gone::*;
#[allow(unused_imports)]
pub use protocol_rules::*;

/// A boxed, sendable future.
pub type BoxFut<T> = Pin<Box<dyn Future<Output = T> + Send + 'static>>;

/// What the suite needs from an adapter.
pub trait Adapter: Send + Sync + 'static {
    /// Connects to the QMP socket at `address`.
    fn connect(&self, address: Address, options: Options) -> BoxFut<Result<Client, Error>>;
    /// Binds a listener at `address`, calls `bound` with its TCP address if it has one (`bound`
    /// starts a QEMU that connects to it), then accepts.
    fn accept(
        &self,
        address: Address,
        options: Options,
        bound: Bound,
    ) -> BoxFut<Result<Client, Error>>;
    /// Connects to the guest agent at `path`.
    fn connect_agent(&self, path: PathBuf, options: Options) -> BoxFut<Result<GuestAgent, Error>>;
    /// Sleeps on the adapter's runtime.
    fn sleep(&self, duration: Duration) -> BoxFut<()>;
    /// Runs a scenario to completion on the adapter's runtime.
    fn run(&self, scenario: BoxFut<()>);
}

/// What [`Adapter::accept`] calls once its listener is bound, with the listener's TCP address.
pub type Bound = Box<dyn FnOnce(Option<std::net::SocketAddr>) + Send>;

/// Runs `f` until `d` passes: `None` on timeout (and `f` is dropped).
pub async fn timeout<T>(a: &dyn Adapter, d: Duration, f: impl Future<Output = T>) -> Option<T> {
    use futures_util::future::{Either, select};
    let f = std::pin::pin!(f);
    match select(f, a.sleep(d)).await {
        Either::Left((v, _)) => Some(v),
        Either::Right(_) => None,
    }
}

/// Waits (without blocking the runtime) for a value from a server thread.
pub async fn recv<T: Send>(a: &dyn Adapter, rx: mpsc::Receiver<T>) -> T {
    for _ in 0..500 {
        if let Ok(v) = rx.try_recv() {
            return v;
        }
        a.sleep(Duration::from_millis(10)).await;
    }
    panic!("nothing from the server within 5 s");
}

async fn connect(a: &dyn Adapter, server: &FakeServer) -> Client {
    a.connect(server.path().into(), Options::new())
        .await
        .expect("connect")
}

/// Clients 2 to 4 of a peer that serves one client at a time (`connect` with the options given):
/// each must fail as `want` says, at its 300 ms deadline (well within 3 s).
async fn later_clients_fail<T: std::fmt::Debug>(
    who: &str,
    connect: impl Fn(Options) -> BoxFut<Result<T, Error>>,
    want: impl Fn(&Error) -> bool,
) {
    for attempt in 2..=4 {
        let started = std::time::Instant::now();
        let other = connect(Options::new().connect_timeout(Duration::from_millis(300))).await;
        assert!(
            matches!(&other, Err(e) if want(e)),
            "{who} {attempt}: {other:?}"
        );
        assert!(
            started.elapsed() < Duration::from_secs(3),
            "{who} {attempt}"
        );
    }
}

fn oob() -> Options {
    Options::new().config(Config::builder().enable_oob(true).build().expect("valid"))
}

// --- Real qemu-storage-daemon ------------------------------------------------------------------

/// Handshake with and without OOB, `query-version`, a clean disconnect; a second client is not
/// greeted while a first stays connected.
pub async fn qemu_handshake(a: &'static dyn Adapter) {
    let qsd = Qsd::start();
    for enable in [true, false] {
        let config = Config::builder().enable_oob(enable).build().expect("valid");
        let client = a
            .connect(qsd.socket().into(), Options::new().config(config))
            .await
            .unwrap_or_else(|e| panic!("connect, oob {enable}: {e:?}"));
        assert_eq!(client.oob_enabled(), enable);
        let version = client
            .execute("query-version", ())
            .await
            .unwrap_or_else(|e| panic!("query-version, oob {enable}: {e:?}"));
        assert_eq!(version["qemu"]["major"], client.greeting().version.major);
        client.disconnect().await;
        assert!(matches!(client.closed().await, Disconnect::Local));
    }

    // A monitor serves one client at a time: a second one is not greeted while the first stays,
    // and connecting says so; once the first leaves, the next is served.
    let first = a
        .connect(qsd.socket().into(), Options::new())
        .await
        .expect("first client");
    // QEMU's queue of pending connections holds one: the later attempts find it full, and must
    // give up at their deadline all the same (a blocking connect used to wait for ever).
    later_clients_fail(
        "client",
        |options| a.connect(qsd.socket().into(), options),
        |e| matches!(e, Error::NoGreeting),
    )
    .await;
    first.disconnect().await;
    let next = a
        .connect(qsd.socket().into(), Options::new())
        .await
        .expect("the next client, once the first left");
    next.execute("query-version", ()).await.expect("served");
}

/// A client that connects while QEMU is still starting (`Options::wait_for_server`): here over a
/// stale socket file, as a restarted QEMU at the same path finds it, which QEMU replaces.
pub async fn qemu_started_after_connect(a: &'static dyn Adapter) {
    let dir = tempfile::tempdir().expect("temp dir");
    let socket = dir.path().join("vm.qmp");
    drop(std::os::unix::net::UnixListener::bind(&socket).expect("bind"));
    let (tx, rx) = mpsc::channel();
    let starter = {
        let socket = socket.clone();
        std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(200));
            tx.send(Qsd::listen_at(&socket)).expect("send");
        })
    };
    let options = Options::new()
        .wait_for_server(true)
        .connect_timeout(Duration::from_secs(20));
    let client = a.connect(socket.into(), options).await.expect("connect");
    let _qsd = recv(a, rx).await;
    starter.join().expect("starter");
    let version = client.execute("query-version", ()).await.expect("served");
    assert_eq!(version["qemu"]["major"], client.greeting().version.major);
    client.disconnect().await;
}

/// Error classes, typed results, `blockdev-add`, introspection.
pub async fn qemu_errors_typed_and_introspection(a: &'static dyn Adapter) {
    let qsd = Qsd::start();
    let client = a
        .connect(qsd.socket().into(), Options::new())
        .await
        .expect("connect");
    assert!(
        client
            .execute("no-such-command", ())
            .await
            .expect_err("error")
            .is_qmp_class("CommandNotFound")
    );
    let bad = client
        .execute(
            "blockdev-add",
            json!({"driver": "no-such-driver", "node-name": "x"}),
        )
        .await;
    assert!(bad.expect_err("error").is_qmp_class("GenericError"));
    let ok = client
        .execute(
            "blockdev-add",
            json!({"driver": "null-co", "node-name": "n0", "size": 1 << 20}),
        )
        .await;
    assert_eq!(ok.expect("blockdev-add"), json!({}));
    #[derive(serde::Deserialize)]
    struct Node {
        #[serde(rename = "node-name")]
        node_name: String,
    }
    let nodes: Vec<Node> = client
        .execute_as("query-named-block-nodes", ())
        .await
        .expect("typed");
    assert_eq!(nodes[0].node_name, "n0");
    let wrong: Result<u8, _> = client.execute_as("query-version", ()).await;
    assert!(matches!(wrong, Err(Error::Decode(_))));
    assert!(
        client
            .has_command("blockdev-mirror")
            .await
            .expect("commands")
    );
    assert!(!client.has_command("getfd").await.expect("commands"));
    let schema = client.schema().await.expect("schema");
    assert!(schema.as_array().is_some_and(|s| s.len() > 100));
}

/// The mirror-job recipe: a subscription made before `blockdev-mirror` sees `created` and
/// `running` (sent before the command's return), then the job through `BLOCK_JOB_COMPLETED`.
pub async fn qemu_mirror_job_events(a: &'static dyn Adapter) {
    let qsd = Qsd::start_pretty();
    let client = a
        .connect(qsd.socket().into(), Options::new())
        .await
        .expect("connect");
    for node in ["src", "tgt"] {
        let args = json!({"driver": "null-co", "node-name": node, "size": 67108864});
        client
            .execute("blockdev-add", args)
            .await
            .expect("blockdev-add");
    }
    let mut job = client.subscribe(EventFilter::names([
        "JOB_STATUS_CHANGE",
        "BLOCK_JOB_READY",
        "BLOCK_JOB_COMPLETED",
    ]));
    let args = json!({"job-id": "job0", "device": "src", "target": "tgt", "sync": "full"});
    client
        .execute("blockdev-mirror", args)
        .await
        .expect("blockdev-mirror");
    let mut seen = Vec::new();
    loop {
        let e = job
            .recv_timeout(Duration::from_secs(10))
            .await
            .expect("event");
        let status = e.data_value().expect("data")["status"]
            .as_str()
            .unwrap_or("")
            .to_owned();
        seen.push(format!("{}:{status}", e.name));
        if e.name == "BLOCK_JOB_READY" {
            client
                .execute("job-complete", json!({"id": "job0"}))
                .await
                .expect("job-complete");
        }
        if status == "null" {
            break;
        }
    }
    assert_eq!(
        seen[..2],
        ["JOB_STATUS_CHANGE:created", "JOB_STATUS_CHANGE:running"],
        "{seen:?}"
    );
    let completed = seen
        .iter()
        .position(|s| s == "BLOCK_JOB_COMPLETED:")
        .expect("completed");
    let pending = seen
        .iter()
        .position(|s| s == "JOB_STATUS_CHANGE:pending")
        .expect("pending");
    assert!(pending < completed, "{seen:?}");
}

/// QEMU connecting to us (`server=off`); a listener that cannot bind says where.
pub async fn qemu_accept_mode(a: &'static dyn Adapter) {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("listen.sock");
    let (tx, rx) = mpsc::channel();
    let peer = path.clone();
    let bound: Bound = Box::new(move |_| tx.send(Qsd::connect_to(&peer)).expect("send"));
    let client = a
        .accept(path.clone().into(), Options::new(), bound)
        .await
        .expect("accept");
    let _qsd = rx.recv().expect("started");
    assert!(
        !path.exists(),
        "the listener, dropped after accepting, removed its socket file"
    );
    assert!(client.execute("query-version", ()).await.is_ok());

    // Binding where something already is: an I/O error of the usual kind that names the path.
    let taken = dir.path().join("taken");
    std::fs::write(&taken, b"").expect("a file in the way");
    let never: Bound = Box::new(|_| panic!("bound where a file is"));
    match a.accept(taken.clone().into(), Options::new(), never).await {
        Err(Error::Io(e)) => {
            assert_eq!(e.kind(), std::io::ErrorKind::AddrInUse, "{e}");
            assert!(e.to_string().contains(&*taken.to_string_lossy()), "{e}");
        }
        other => panic!("binding over a file: {other:?}"),
    }
    assert!(taken.exists(), "the file in the way is gone");

    // Over TCP (`host=...,port=...,server=off`): bound to port 0, QEMU told the port we got.
    let (tx, rx) = mpsc::channel();
    let bound: Bound = Box::new(move |at| {
        let at = at.expect("a TCP listener has an address");
        assert_ne!(at.port(), 0, "the port the system chose");
        tx.send(Qsd::connect_to_tcp(at)).expect("send");
    });
    let client = a
        .accept(Address::Tcp("127.0.0.1:0".into()), Options::new(), bound)
        .await
        .expect("accept over TCP");
    let _qsd = rx.recv().expect("started");
    let version = client
        .execute("query-version", ())
        .await
        .expect("query-version");
    assert!(version["qemu"]["major"].as_u64().is_some(), "{version}");
    let fd = std::fs::File::open("/dev/null")
        .expect("a descriptor")
        .into();
    assert!(
        matches!(
            client
                .execute_with_fds("getfd", json!({"fdname": "f"}), vec![fd])
                .await,
            Err(Error::FdPassingUnsupported)
        ),
        "descriptors over TCP"
    );
}

/// 1,000 executes from 50 concurrent callers.
pub async fn qemu_thousand_concurrent_executes(a: &'static dyn Adapter) {
    let qsd = Qsd::start();
    let client = a
        .connect(qsd.socket().into(), Options::new())
        .await
        .expect("connect");
    let callers = (0..50).map(|t| {
        let client = client.clone();
        async move {
            for i in 0..20 {
                if (t + i) % 7 == 0 {
                    assert!(
                        client
                            .execute("no-such", ())
                            .await
                            .expect_err("error")
                            .is_qmp_class("CommandNotFound")
                    );
                } else {
                    assert!(client.execute("query-version", ()).await.is_ok());
                }
            }
        }
    });
    join_all(callers).await;
}

/// The daemon killed with SIGKILL while commands are in flight: written, and not answered.
pub async fn qemu_killed_mid_flight(a: &'static dyn Adapter) {
    let mut qsd = Qsd::start();
    let client = a
        .connect(qsd.socket().into(), Options::new())
        .await
        .expect("connect");
    let mut events = client.subscribe(EventFilter::all());
    // Stopped, the daemon answers nothing while its socket takes the commands in.
    qsd.pause();
    let calls = join_all((0..100).map(|_| client.execute("query-named-block-nodes", ())));
    let kill = async {
        a.sleep(Duration::from_millis(200)).await;
        qsd.kill();
    };
    let (results, ()) = futures_util::join!(calls, kill);
    for r in results {
        // The daemon gone, however the system put it (our commands unread: a reset).
        assert!(
            matches!(&r, Err(Error::Disconnected(Disconnect::PeerClosed { .. }))),
            "{r:?}"
        );
    }
    let reason = timeout(a, Duration::from_secs(5), client.closed())
        .await
        .expect("closed");
    assert!(
        matches!(reason, Disconnect::PeerClosed { .. }),
        "{reason:?}"
    );
    assert!(
        timeout(a, Duration::from_secs(5), events.recv())
            .await
            .expect("ends")
            .is_none()
    );
    assert!(matches!(
        client.execute("query-version", ()).await,
        Err(Error::Disconnected(_))
    ));
}

// --- The fake server -----------------------------------------------------------------------------

/// Greeting and replies written a few bytes at a time.
pub async fn fake_fragmented_writes(a: &'static dyn Adapter) {
    let server = FakeServer::start(|c| {
        c.send_fragmented(
            format!("{GREETING}\r\n").as_bytes(),
            1,
            Duration::from_micros(50),
        );
        let caps = c.expect("qmp_capabilities");
        let reply = format!("{{\"return\": {{}}, \"id\": {}}}\r\n", caps.command["id"]);
        c.send_fragmented(reply.as_bytes(), 3, Duration::from_micros(50));
        let q = c.expect("query-status");
        let big = json!({"return": {"status": "running", "pad": "x".repeat(100_000)}, "id": q.command["id"]});
        c.send_fragmented(format!("{big}\r\n").as_bytes(), 7, Duration::ZERO);
        c.serve_forever();
    });
    let client = connect(a, &server).await;
    let status = client.execute("query-status", ()).await.expect("status");
    assert_eq!(status["pad"].as_str().map(str::len), Some(100_000));
}

/// A server that reads its input a line at a time, as simple test servers and proxies do: every
/// command must end with a newline (QEMU itself does not need one), or this one never answers.
pub async fn fake_line_based_server(a: &'static dyn Adapter) {
    let server = FakeServer::start(|c| {
        use std::io::BufRead;
        c.greet(false);
        let mut lines = std::io::BufReader::new(c.stream().try_clone().expect("clone"));
        let mut line = String::new();
        while matches!(lines.read_line(&mut line), Ok(n) if n > 0) {
            let cmd: Value = serde_json::from_str(&line).expect("one command per line");
            c.reply(&cmd, json!({"echo": cmd["execute"]}));
            line.clear();
        }
    });
    let client = connect(a, &server).await;
    let calls = join_all((0..20).map(|_| client.execute("query-status", ())));
    let results = timeout(a, Duration::from_secs(10), calls)
        .await
        .expect("a line-based server answers newline-terminated commands");
    for result in results {
        assert_eq!(result.expect("answered"), json!({"echo": "query-status"}));
    }
    let raw = client.execute_raw(json!({"execute": "raw-one", "id": "mine"}));
    let raw = timeout(a, Duration::from_secs(10), raw)
        .await
        .expect("answered");
    assert_eq!(raw.expect("answered"), json!({"echo": "raw-one"}));
}

/// Pretty output, junk, invalid JSON and UTF-8, non-objects, and a long id-less error cascade
/// between messages: all survived. The cascade fails the command in flight (QEMU sends them
/// about input it could not parse, which here can only be that command's), its reply then
/// answers nothing, and the next command works.
pub async fn fake_garbage_pretty_and_cascades(a: &'static dyn Adapter) {
    let server = FakeServer::start(|c| {
        c.pretty = true;
        c.handshake();
        let q = c.expect("query-status");
        c.send_raw(b"\xff\x01garbage\r\n{\"bad\": }\r\n[1]\r\n{\"return\": \"\xc3\x28\", \"id\": 99}\r\n\"{\"\r\n");
        for _ in 0..1500 {
            c.idless_error("JSON parse error, expecting value");
        }
        c.reply(&q.command, json!({"status": "running"}));
        c.serve_forever();
    });
    let client = connect(a, &server).await;
    let status = client.execute("query-status", ()).await;
    assert!(
        matches!(&status, Err(Error::Qmp(q)) if q.desc == "JSON parse error, expecting value"),
        "{status:?}"
    );
    assert!(client.execute("query-version", ()).await.is_ok());
}

/// OOB replies overtake in-band ones and are matched by id.
pub async fn fake_oob_reordering(a: &'static dyn Adapter) {
    let server = FakeServer::start(|c| {
        c.handshake();
        let slow_a = c.expect("slow-a");
        let slow_b = c.expect("slow-b");
        let urgent = c.expect("urgent");
        assert!(urgent.is_oob());
        c.reply(&urgent.command, json!("urgent"));
        c.reply(&slow_b.command, json!("b"));
        c.reply(&slow_a.command, json!("a"));
        c.serve_forever();
    });
    let client = a
        .connect(server.path().into(), oob())
        .await
        .expect("connect");
    let first = client.execute("slow-a", ());
    let second = client.execute("slow-b", ());
    let third = async {
        a.sleep(Duration::from_millis(20)).await;
        client.execute_oob("urgent", ()).await
    };
    let (x, y, z) = futures_util::join!(first, second, third);
    assert_eq!(
        (x.expect("a"), y.expect("b"), z.expect("oob")),
        (json!("a"), json!("b"), json!("urgent"))
    );
}

/// EOF in the middle of a reply.
pub async fn fake_disconnect_mid_reply(a: &'static dyn Adapter) {
    let server = FakeServer::start(|c| {
        c.handshake();
        let _ = c.expect("query-status");
        c.send_raw(b"{\"return\": {\"status\": \"runn");
        c.close();
    });
    let client = connect(a, &server).await;
    let err = client
        .execute("query-status", ())
        .await
        .expect_err("cut off");
    assert!(
        matches!(
            err,
            Error::Disconnected(Disconnect::Protocol(ProtocolError::UnexpectedEof {
                buffered: 27
            }))
        ),
        "{err:?}"
    );
}

/// A flood of events and small queues: the slow subscriber is waited for once (`lag_after`, 1 s),
/// then told exactly what it missed; the eager one loses nothing; the command's reply is held up
/// by that one wait only; order is kept.
pub async fn fake_event_flood_lag(a: &'static dyn Adapter) {
    const N: u64 = 20_000;
    let server = FakeServer::start(|c| {
        c.handshake();
        let go = c.expect("flood");
        for i in 0..N {
            c.event("TICK", json!({"i": i}));
        }
        c.reply(&go.command, json!({}));
        c.serve_forever();
    });
    let client = a
        .connect(server.path().into(), Options::new().event_buffer(16))
        .await
        .expect("connect");
    let slow = client.subscribe(EventFilter::name("TICK"));
    let eager = account(client.subscribe(EventFilter::name("TICK")), N);
    // The command's reply is held up by the subscriber that reads nothing meanwhile for the one
    // wait only.
    let both = async { futures_util::join!(client.execute("flood", ()), eager) };
    let (flood, (eager_got, eager_missed)) = timeout(a, Duration::from_secs(20), both)
        .await
        .expect("the reply was held up behind a subscriber that reads nothing");
    flood.expect("flood");
    assert_eq!((eager_got, eager_missed), (N, 0));
    let (got, missed) = account(slow, N).await;
    assert_eq!((got, missed), (16, N - 16));
}

/// Reads `n` events' worth from `sub` (received or reported missed), checking their order.
async fn account(mut sub: qmp_client::Subscription, n: u64) -> (u64, u64) {
    let (mut got, mut missed, mut last) = (0u64, 0u64, None);
    while got + missed < n {
        match sub.recv().await.expect("open") {
            Ok(e) => {
                let i = e.data_value().expect("data")["i"].as_u64().expect("i");
                assert!(last.is_none_or(|l| i > l), "out of order");
                last = Some(i);
                got += 1;
            }
            Err(l) => missed += l.missed,
        }
    }
    (got, missed)
}

/// Replies over the size and depth limits fail their call; the connection carries on.
pub async fn fake_limits(a: &'static dyn Adapter) {
    let server = FakeServer::start(|c| {
        c.handshake();
        let big = c.expect("big");
        c.reply(&big.command, json!("x".repeat(10_000)));
        let deep = c.expect("deep");
        let mut v = json!(1);
        for _ in 0..100 {
            v = json!([v]);
        }
        c.reply(&deep.command, v);
        let utf8 = c.expect("bad-utf8");
        let tail = format!(", \"id\": {}}}\r\n", utf8.command["id"]);
        c.send_raw(&[&b"{\"return\": \"\xc3\x28\""[..], tail.as_bytes()].concat());
        c.serve_forever();
    });
    let config = Config::builder()
        .max_message_size(4096)
        .max_depth(32)
        .build()
        .expect("valid");
    let client = a
        .connect(server.path().into(), Options::new().config(config))
        .await
        .expect("connect");
    let err = client.execute("big", ()).await.expect_err("too large");
    assert!(
        matches!(err, Error::Command(CommandError::ResponseTooLarge { .. })),
        "{err:?}"
    );
    let err = client.execute("deep", ()).await.expect_err("too deep");
    assert!(
        matches!(err, Error::Command(CommandError::ResponseTooDeep { .. })),
        "{err:?}"
    );
    // A reply that is not even UTF-8 cannot be attributed: only a timeout ends the call.
    let err = client
        .with_timeout(Duration::from_millis(200))
        .execute("bad-utf8", ())
        .await;
    assert!(matches!(err, Err(Error::Timeout)), "{err:?}");
    assert!(client.execute("query-version", ()).await.is_ok());
}

/// File descriptors reach the server with their command; the server reads from them.
pub async fn fake_fd_passing(a: &'static dyn Adapter) {
    use std::io::{Read, Seek, Write};
    let (tx, rx) = mpsc::channel::<String>();
    let server = FakeServer::start(move |c: &mut ServerConn| {
        c.handshake();
        let getfd = c.expect("getfd");
        assert_eq!(getfd.fds.len(), 1);
        let mut file = std::fs::File::from(getfd.fds.into_iter().next().expect("fd"));
        let mut text = String::new();
        file.rewind().expect("rewind");
        file.read_to_string(&mut text).expect("read");
        tx.send(text).expect("send");
        c.reply(&getfd.command, json!({}));
        let add = c.expect("add-fd");
        assert_eq!(add.fds.len(), 1);
        c.reply(&add.command, json!({"fdset-id": 3, "fd": 42}));
        c.serve_forever();
    });
    let client = connect(a, &server).await;
    let mut file = tempfile::tempfile().expect("temp file");
    file.write_all(b"through SCM_RIGHTS").expect("write");
    client
        .getfd("fd0", OwnedFd::from(file))
        .await
        .expect("getfd");
    assert_eq!(recv(a, rx).await, "through SCM_RIGHTS");
    let info = client
        .add_fd(
            OwnedFd::from(tempfile::tempfile().expect("temp")),
            None,
            None,
        )
        .await
        .expect("add-fd");
    assert_eq!((info.fdset_id, info.fd), (3, 42));

    // More than one message can carry: refused before sending, and the connection lives on (the
    // failed send ended it before).
    let many: Vec<OwnedFd> = (0..qmp_client::MAX_FDS + 1)
        .map(|_| OwnedFd::from(tempfile::tempfile().expect("temp")))
        .collect();
    let refused = client
        .execute_with_fds("getfd", json!({"fdname": "many"}), many)
        .await;
    assert!(
        matches!(refused, Err(Error::TooManyFds { given, limit })
            if given == qmp_client::MAX_FDS + 1 && limit == qmp_client::MAX_FDS),
        "{refused:?}"
    );
    assert!(client.execute("query-version", ()).await.is_ok());
}

/// A dropped call never corrupts the connection: queued ones are never sent, late replies of
/// written ones are discarded (not given to the command sent next).
pub async fn fake_cancel_safety(a: &'static dyn Adapter) {
    let (tx, rx) = mpsc::channel::<Vec<String>>();
    let (written_tx, written_rx) = mpsc::channel::<()>();
    let server = FakeServer::start(move |c: &mut ServerConn| {
        c.handshake();
        let held: Vec<_> = (0..8).map(|_| c.expect("hold")).collect();
        std::thread::sleep(Duration::from_millis(200));
        for h in &held {
            c.reply(&h.command, json!("held"));
        }
        let mut names = Vec::new();
        let mut dropped = None;
        while let Some(r) = c.recv() {
            names.push(r.name().to_owned());
            match r.name() {
                // Answered only once the next command is in: late.
                "dropped" => {
                    written_tx.send(()).expect("send");
                    dropped = Some(r);
                }
                "last" => {
                    if let Some(d) = dropped.take() {
                        c.reply(&d.command, json!("late"));
                    }
                    c.reply(&r.command, json!("last"));
                    break;
                }
                name => c.reply(&r.command, json!(name)),
            }
        }
        tx.send(names).expect("send");
        c.serve_forever();
    });
    // OOB on: at most 8 in-band commands in flight, so a 9th waits in the client.
    let client = a
        .connect(server.path().into(), oob())
        .await
        .expect("connect");
    let holders = join_all((0..8).map(|_| client.execute("hold", ())));
    let rest = async {
        a.sleep(Duration::from_millis(50)).await;
        let never = timeout(
            a,
            Duration::from_millis(20),
            client.execute("never-sent", ()),
        )
        .await;
        assert!(never.is_none());
    };
    let (held, ()) = futures_util::join!(holders, rest);
    assert!(held.into_iter().all(|r| r.expect("held") == json!("held")));
    // A call given up once the server has it: its reply comes after the next command's request.
    // Boxed, so that dropping it below ends the call there and then.
    let dropped = Box::pin(client.execute("dropped", ()));
    let written = Box::pin(recv(a, written_rx));
    match futures_util::future::select(dropped, written).await {
        futures_util::future::Either::Left((r, _)) => panic!("answered early: {r:?}"),
        futures_util::future::Either::Right(((), dropped)) => drop(dropped),
    }
    assert_eq!(
        client.execute("last", ()).await.expect("last"),
        json!("last")
    );
    assert_eq!(recv(a, rx).await, ["dropped", "last"]);
}

/// A timed-out call leaves a usable connection; its late reply is discarded, even when it comes
/// after a later command was sent (which must not be given the late reply).
pub async fn fake_timeouts(a: &'static dyn Adapter) {
    let server = FakeServer::start(|c| {
        c.handshake();
        let slow = c.expect("slow");
        let next = c.expect("next");
        std::thread::sleep(Duration::from_millis(300));
        c.reply(&next.command, json!("next"));
        let after = c.expect("after");
        c.reply(&slow.command, json!("late"));
        c.reply(&after.command, json!("after"));
        while let Some(r) = c.recv() {
            if r.name() == "emit" {
                c.event("E", json!({}));
            }
            c.reply(&r.command, json!({}));
        }
    });
    let client = connect(a, &server).await;
    let quick = client.with_timeout(Duration::from_millis(100));
    let (slow, next) = futures_util::join!(quick.execute("slow", ()), client.execute("next", ()));
    assert!(matches!(slow, Err(Error::Timeout)), "{slow:?}");
    assert_eq!(next.expect("next"), json!("next"));
    assert_eq!(
        client.execute("after", ()).await.expect("after"),
        json!("after")
    );

    // `Duration::MAX` is "no limit", wherever a duration is taken (no `Instant` overflow).
    let forever = client.with_timeout(Duration::MAX);
    assert!(forever.execute("query-version", ()).await.is_ok());
    let mut events = client.subscribe(EventFilter::name("E"));
    let (event, sent) = futures_util::join!(
        events.recv_timeout(Duration::MAX),
        client.execute("emit", ())
    );
    assert_eq!(event.expect("event").name, "E");
    assert!(sent.is_ok());
    let server = FakeServer::start(|c| {
        c.handshake();
        c.serve_forever();
    });
    let patient = Options::new().connect_timeout(Duration::MAX);
    let client = a
        .connect(server.path().into(), patient)
        .await
        .expect("connect");
    assert!(client.execute("query-version", ()).await.is_ok());
}

/// Lifecycle: disconnect fails waiting calls and ends subscriptions; dropping the last handle
/// closes the socket; a server that never greets makes connect time out, and says so; a
/// missing socket is an I/O error that names it.
pub async fn fake_lifecycle(a: &'static dyn Adapter) {
    let server = FakeServer::start(|c| {
        c.handshake();
        let _stuck = c.expect("stuck");
        while c.recv().is_some() {}
    });
    let client = connect(a, &server).await;
    let mut events = client.subscribe(EventFilter::all());
    let stuck = client.execute("stuck", ());
    let close = async {
        a.sleep(Duration::from_millis(50)).await;
        client.disconnect().await;
    };
    let (stuck, ()) = futures_util::join!(stuck, close);
    assert!(
        matches!(stuck, Err(Error::Disconnected(Disconnect::Local))),
        "{stuck:?}"
    );
    assert!(events.recv().await.is_none());
    assert!(matches!(
        client.execute("x", ()).await,
        Err(Error::Disconnected(_))
    ));

    // A command asked for right behind a disconnect is refused, never written: the close was
    // asked for first.
    let (tx, rx) = mpsc::channel::<Vec<String>>();
    let server = FakeServer::start(move |c: &mut ServerConn| {
        c.handshake();
        let mut written = Vec::new();
        while let Some(r) = c.recv() {
            written.push(r.name().to_owned());
            c.reply(&r.command, json!({}));
        }
        tx.send(written).expect("send");
    });
    let client = connect(a, &server).await;
    let (_, after) = futures_util::join!(client.disconnect(), client.execute("after", ()));
    assert!(
        matches!(after, Err(Error::Disconnected(Disconnect::Local))),
        "{after:?}"
    );
    assert_eq!(
        recv(a, rx).await,
        Vec::<String>::new(),
        "written after disconnect()"
    );

    let (tx, rx) = mpsc::channel::<bool>();
    let server = FakeServer::start(move |c: &mut ServerConn| {
        c.handshake();
        tx.send(c.recv().is_none()).expect("send");
    });
    drop(connect(a, &server).await);
    assert!(
        recv(a, rx).await,
        "the server saw EOF after the last handle went"
    );

    let mute = FakeServer::start(|c| while c.recv().is_some() {});
    let options = Options::new().connect_timeout(Duration::from_millis(300));
    let result = a.connect(mute.path().into(), options).await;
    assert!(matches!(result, Err(Error::NoGreeting)), "{result:?}");
    // Greeted, but `qmp_capabilities` is never answered: a plain timeout. (Time enough for the
    // greeting to arrive on a loaded machine.)
    let stuck = FakeServer::start(|c| {
        c.greet(false);
        while c.recv().is_some() {}
    });
    let options = Options::new().connect_timeout(Duration::from_secs(2));
    let result = a.connect(stuck.path().into(), options).await;
    assert!(matches!(result, Err(Error::Timeout)), "{result:?}");

    // Nothing listening: an I/O error of the usual kind, whose message names the address.
    let missing = stuck.path().with_file_name("no-such.sock");
    match a.connect(missing.clone().into(), Options::new()).await {
        Err(Error::Io(e)) => {
            assert_eq!(e.kind(), std::io::ErrorKind::NotFound, "{e}");
            let message = e.to_string();
            assert!(message.contains(&*missing.to_string_lossy()), "{message}");
            let source = std::error::Error::source(&e).expect("the original error");
            assert!(source.to_string().contains("os error"), "{source}");
        }
        other => panic!("connecting to a missing socket: {other:?}"),
    }
}

/// `Options::wait_for_server`: a connect made before the server is up retries until it is (the
/// socket file missing, or refusing connections), and at the deadline reports what the last
/// attempt met; without it, a missing socket fails at once.
pub async fn fake_server_started_late(a: &'static dyn Adapter) {
    let late = FakeServer::start_later(Duration::from_millis(300), |c| {
        c.handshake();
        let r = c.expect("query-version");
        c.reply(&r.command, json!({"qemu": {"major": 10}}));
        while c.recv().is_some() {}
    });
    let started = std::time::Instant::now();
    let client = a
        .connect(
            late.path().into(),
            Options::new()
                .wait_for_server(true)
                .connect_timeout(Duration::from_secs(20)),
        )
        .await
        .expect("connected once the server came up");
    assert!(started.elapsed() >= Duration::from_millis(250));
    let version = client.execute("query-version", ()).await.expect("served");
    assert_eq!(version["qemu"]["major"], 10);
    client.disconnect().await;
    late.check();

    let dir = tempfile::tempdir().expect("temp dir");
    let missing = dir.path().join("never.sock");
    let quick = Options::new().connect_timeout(Duration::from_millis(300));
    let started = std::time::Instant::now();
    match a.connect(missing.clone().into(), quick.clone()).await {
        Err(Error::Io(e)) => assert_eq!(e.kind(), std::io::ErrorKind::NotFound, "{e}"),
        other => panic!("no server, not waiting: {other:?}"),
    }
    assert!(
        started.elapsed() < Duration::from_millis(250),
        "failed at once"
    );
    let started = std::time::Instant::now();
    match a
        .connect(missing.into(), quick.clone().wait_for_server(true))
        .await
    {
        Err(Error::Io(e)) => assert_eq!(e.kind(), std::io::ErrorKind::NotFound, "{e}"),
        other => panic!("no server, waiting: {other:?}"),
    }
    assert!(started.elapsed() >= Duration::from_millis(250), "waited");

    // A socket file nobody listens on (a QEMU that died): refused, so retried until the deadline.
    let stale = dir.path().join("stale.sock");
    drop(std::os::unix::net::UnixListener::bind(&stale).expect("bind"));
    let started = std::time::Instant::now();
    match a
        .connect(stale.clone().into(), quick.wait_for_server(true))
        .await
    {
        Err(Error::Io(e)) => {
            assert_eq!(e.kind(), std::io::ErrorKind::ConnectionRefused, "{e}");
            assert!(e.to_string().contains(&*stale.to_string_lossy()), "{e}");
        }
        other => panic!("stale socket, waiting: {other:?}"),
    }
    let waited = started.elapsed();
    assert!(
        waited >= Duration::from_millis(250) && waited < Duration::from_secs(3),
        "{waited:?}"
    );

    // TCP: a port nobody listens on yet refuses, at once without the option.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port");
    let address = Address::from(port);
    match a.connect(address, Options::new()).await {
        Err(Error::Io(e)) => assert_eq!(e.kind(), std::io::ErrorKind::ConnectionRefused, "{e}"),
        other => panic!("no TCP server, not waiting: {other:?}"),
    }
    let server = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(300));
        let listener = std::net::TcpListener::bind(port).expect("bind the port again");
        let (mut stream, _) = listener.accept().expect("accept");
        serve_replies(&mut stream);
    });
    // By name this time: the lookup runs on a thread of its own (`qmp_client::lookup`).
    let by_name = Address::Tcp(format!("localhost:{}", port.port()));
    let client = a
        .connect(
            by_name,
            Options::new()
                .wait_for_server(true)
                .connect_timeout(Duration::from_secs(20)),
        )
        .await
        .expect("connected once the TCP server came up");
    assert_eq!(
        client.execute("query-version", ()).await.expect("served"),
        json!({})
    );
    client.disconnect().await;
    server.join().expect("server thread");
}

/// A minimal QMP server on `stream`: greets, then answers every command with `{}` until EOF.
fn serve_replies(stream: &mut (impl std::io::Read + std::io::Write)) {
    let greeting = format!("{GREETING}\r\n");
    if stream.write_all(greeting.as_bytes()).is_err() {
        return;
    }
    let (mut inbox, mut buf) = (Vec::new(), [0; 4096]);
    while let Ok(n @ 1..) = stream.read(&mut buf) {
        inbox.extend_from_slice(&buf[..n]);
        for cmd in crate::take_commands(&mut inbox) {
            let reply = format!("{{\"return\": {{}}, \"id\": {}}}\r\n", cmd["id"]);
            if stream.write_all(reply.as_bytes()).is_err() {
                return;
            }
        }
    }
}

/// Handshake failures are protocol errors that say what went wrong.
pub async fn fake_handshake_failures(a: &'static dyn Adapter) {
    let refuse = FakeServer::start(|c| {
        c.greet(true);
        let caps = c.expect("qmp_capabilities");
        c.reply_error(&caps.command, "GenericError", "no");
    });
    let err = a
        .connect(refuse.path().into(), Options::new())
        .await
        .expect_err("refused");
    assert!(
        matches!(err, Error::Protocol(ProtocolError::NegotiationRejected(_))),
        "{err:?}"
    );
    let agent = FakeServer::start(|c| c.send(&json!({"return": {}})));
    let err = a
        .connect(agent.path().into(), Options::new())
        .await
        .expect_err("no greeting");
    assert!(
        matches!(err, Error::Protocol(ProtocolError::BadGreeting(_))),
        "{err:?}"
    );
    let eof = FakeServer::start(ServerConn::close);
    let err = a
        .connect(eof.path().into(), Options::new())
        .await
        .expect_err("eof");
    assert!(
        matches!(err, Error::Protocol(ProtocolError::EofDuringHandshake)),
        "{err:?}"
    );
}

/// Raw commands keep their members but get the client's id; `wait_for` matches data patterns.
pub async fn fake_raw_commands_and_patterns(a: &'static dyn Adapter) {
    let server = FakeServer::start(|c| {
        c.handshake();
        let raw = c.expect("query-status");
        assert_eq!(raw.arguments(), &json!({"verbose": true}));
        assert!(raw.command["id"].is_u64());
        c.reply(&raw.command, json!({"status": "paused"}));
        let go = c.expect("job-run");
        c.event(
            "JOB_STATUS_CHANGE",
            json!({"status": "pending", "id": "job1"}),
        );
        c.reply(&go.command, json!({}));
        c.event(
            "JOB_STATUS_CHANGE",
            json!({"status": "pending", "id": "job0", "extra": [1]}),
        );
        let emit = c.expect("emit");
        c.reply(&emit.command, json!({}));
        c.event("A", json!({}));
        c.event("B", json!({}));
        let tick = c.expect("tick");
        c.reply(&tick.command, json!({}));
        c.event("T", json!({}));
        c.serve_forever();
    });
    let client = connect(a, &server).await;
    let raw = json!({"execute": "query-status", "arguments": {"verbose": true}, "id": "mine"});
    assert_eq!(
        client.execute_raw(raw).await.expect("raw"),
        json!({"status": "paused"})
    );
    let pending =
        EventFilter::name("JOB_STATUS_CHANGE").data(json!({"status": "pending", "id": "job0"}));
    let mut sub = client.subscribe(pending.clone());
    client.execute("job-run", ()).await.expect("job-run");
    let event = sub
        .wait_for(&pending, Duration::from_secs(5))
        .await
        .expect("event");
    assert_eq!(event.data_value().expect("data")["extra"], json!([1]));
    let err = client
        .wait_for(EventFilter::name("NEVER"), Duration::from_millis(100))
        .await;
    assert!(matches!(err, Err(Error::Timeout)), "{err:?}");

    // A filter's predicate runs with no lock of the client's held: it may use the client, here
    // to subscribe (which used to deadlock the connection's task).
    let inner: Arc<Mutex<Option<qmp_client::Subscription>>> = Arc::default();
    let (handle, slot) = (Mutex::new(Some(client.clone())), Arc::clone(&inner));
    let mut outer = client.subscribe(EventFilter::name("A").predicate(move |_| {
        if let Some(c) = handle.lock().expect("lock").take() {
            *slot.lock().expect("lock") = Some(c.subscribe(EventFilter::name("B")));
        }
        true
    }));
    client.execute("emit", ()).await.expect("emit");
    let got = outer.recv_timeout(Duration::from_secs(5)).await.expect("A");
    assert_eq!(got.name, "A");
    let mut from_predicate = inner.lock().expect("lock").take().expect("subscribed");
    let got = from_predicate
        .recv_timeout(Duration::from_secs(5))
        .await
        .expect("B, to the subscription made while A was matched");
    assert_eq!(got.name, "B");

    // A dropped subscription's filter is let go of at once, not at the next event (which may be
    // hours away): what its predicate captured is freed.
    let token = Arc::new(());
    let held = Arc::downgrade(&token);
    let mut sub = client.subscribe(EventFilter::name("T").predicate(move |_| {
        let _ = &token;
        true
    }));
    client.execute("tick", ()).await.expect("tick");
    // Matched, so the connection's task has the filter.
    sub.recv_timeout(Duration::from_secs(5)).await.expect("T");
    drop(sub);
    for _ in 0..500 {
        if held.strong_count() == 0 {
            break;
        }
        a.sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(
        held.strong_count(),
        0,
        "a dropped subscription's filter is still held"
    );
    let _: Value = client
        .execute("query-version", ())
        .await
        .expect("still fine");
}

// --- Guest agent: real qemu-ga ------------------------------------------------------------------

async fn connect_agent(a: &dyn Adapter, path: &std::path::Path) -> GuestAgent {
    a.connect_agent(path.to_owned(), Options::new())
        .await
        .expect("connect to the guest agent")
        .with_timeout(Duration::from_secs(10))
}

/// `guest-ping`, `guest-info`, `guest-get-osinfo` (typed), an unknown command, a command the
/// agent refuses, and a blocked `guest-shutdown` (an error reply, not silence).
pub async fn qga_commands_and_errors(a: &'static dyn Adapter) {
    let mut qga = QemuGa::start();
    let agent = connect_agent(a, qga.socket()).await;
    assert_eq!(
        agent.execute("guest-ping", ()).await.expect("ping"),
        json!({})
    );
    let info = agent.execute("guest-info", ()).await.expect("info");
    let version = info["version"].as_str().expect("version");
    assert!(
        version.chars().next().is_some_and(|c| c.is_ascii_digit()),
        "{version}"
    );
    let commands = info["supported_commands"].as_array().expect("commands");
    assert!(commands.iter().any(|c| c["name"] == "guest-file-read"));
    #[derive(serde::Deserialize)]
    struct OsInfo {
        id: String,
        #[serde(rename = "kernel-release")]
        kernel_release: String,
    }
    let os: OsInfo = agent
        .execute_as("guest-get-osinfo", ())
        .await
        .expect("osinfo");
    assert!(!os.id.is_empty() && !os.kernel_release.is_empty());

    let err = agent.execute("no-such-command", ()).await.unwrap_err();
    assert!(err.is_qmp_class("CommandNotFound"), "{err:?}");
    let err = agent
        .execute(
            "guest-file-open",
            json!({"path": "/nonexistent/dir/x", "mode": "r"}),
        )
        .await
        .unwrap_err();
    assert!(
        matches!(&err, Error::Qmp(q) if !q.desc.is_empty()),
        "{err:?}"
    );
    // The test agent blocks guest-shutdown: its error comes back instead of the usual silence.
    let err = agent
        .execute_no_reply(
            "guest-shutdown",
            json!({"mode": "powerdown"}),
            Duration::from_secs(5),
        )
        .await
        .unwrap_err();
    assert!(
        matches!(&err, Error::Qmp(q) if q.desc.contains("disabled")),
        "{err:?}"
    );
    // Many callers at once are served one command at a time, each getting its own answer.
    let answers = join_all((0..20).map(|i| {
        let agent = agent.clone();
        async move { agent.execute("guest-sync", json!({ "id": i })).await }
    }))
    .await;
    for (i, answer) in answers.into_iter().enumerate() {
        assert_eq!(answer.expect("guest-sync"), json!(i));
    }
    assert!(agent.resync().await.is_ok());
    assert_eq!(
        agent.execute("guest-ping", ()).await.expect("ping"),
        json!({})
    );

    // The agent serves one client at a time, and queues two more connections: every later one
    // times out at its deadline as a timeout, never as a missing QMP greeting (an agent has none).
    later_clients_fail(
        "agent client",
        |options| a.connect_agent(qga.socket().to_owned(), options),
        |e| matches!(e, Error::Timeout),
    )
    .await;
    agent.disconnect().await;
    assert!(agent.is_closed());
    let next = connect_agent(a, qga.socket()).await;
    assert_eq!(
        next.execute("guest-ping", ())
            .await
            .expect("the next client is served"),
        json!({})
    );
    next.disconnect().await;
    assert!(qga.is_running(), "qemu-ga survived the session");
}

/// File open/write/seek/read/close on a temp file, and an 8 MiB read (11 MB of base64).
pub async fn qga_files_and_large_reads(a: &'static dyn Adapter) {
    let qga = QemuGa::start();
    let agent = connect_agent(a, qga.socket()).await;
    let path = qga.dir().join("file.txt");
    let h = agent
        .execute("guest-file-open", json!({"path": path, "mode": "w+"}))
        .await
        .expect("open");
    let written = agent
        .execute(
            "guest-file-write",
            json!({"handle": h, "buf-b64": "aGVsbG8sIGFnZW50"}),
        )
        .await
        .expect("write");
    assert_eq!(written["count"], 12);
    agent
        .execute(
            "guest-file-seek",
            json!({"handle": h, "offset": 0, "whence": "set"}),
        )
        .await
        .expect("seek");
    let read = agent
        .execute("guest-file-read", json!({"handle": h, "count": 100}))
        .await
        .expect("read");
    assert_eq!(
        (read["buf-b64"].as_str(), read["eof"].as_bool()),
        (Some("aGVsbG8sIGFnZW50"), Some(true))
    );
    agent
        .execute("guest-file-close", json!({"handle": h}))
        .await
        .expect("close");
    assert_eq!(std::fs::read(&path).expect("file"), b"hello, agent");

    let big = qga.dir().join("big.bin");
    let content: Vec<u8> = (0..8u32 << 20)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 24) as u8)
        .collect();
    std::fs::write(&big, &content).expect("big file");
    let h = agent
        .execute("guest-file-open", json!({"path": big, "mode": "r"}))
        .await
        .expect("open big");
    #[derive(serde::Deserialize)]
    struct Read {
        count: usize,
        #[serde(rename = "buf-b64")]
        buf: String,
    }
    let read: Read = agent
        .execute_as("guest-file-read", json!({"handle": h, "count": 8 << 20}))
        .await
        .expect("big read");
    assert_eq!(read.count, 8 << 20);
    assert_eq!(read.buf.len(), (8 << 20) / 3 * 4 + 4);
    assert_eq!(read.buf[..8], base64_prefix(&content[..6]));
    agent
        .execute("guest-file-close", json!({"handle": h}))
        .await
        .expect("close big");
    // With a limit below that reply, only that command fails, and the next one works.
    let small = a.connect_agent(
        qga.socket().to_owned(),
        Options::new().config(
            Config::builder()
                .max_message_size(1 << 20)
                .build()
                .expect("valid"),
        ),
    );
    agent.disconnect().await;
    let small = small
        .await
        .expect("connect")
        .with_timeout(Duration::from_secs(10));
    let h = small
        .execute("guest-file-open", json!({"path": big, "mode": "r"}))
        .await
        .expect("open big");
    let err = small
        .execute("guest-file-read", json!({"handle": h, "count": 4 << 20}))
        .await
        .unwrap_err();
    // Failed where the reply passed the limit, not once all of it had streamed past.
    assert!(
        matches!(err, Error::Command(CommandError::ResponseTooLarge { size }) if size == (1 << 20) + 1),
        "{err:?}"
    );
    assert_eq!(
        small.execute("guest-ping", ()).await.expect("ping"),
        json!({})
    );
    small.disconnect().await;
}

/// Standard base64 of `bytes` (a multiple of 3 long), for checking a read's start.
fn base64_prefix(bytes: &[u8]) -> String {
    const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    bytes
        .chunks(3)
        .flat_map(|c| {
            let n = (u32::from(c[0]) << 16) | (u32::from(c[1]) << 8) | u32::from(c[2]);
            [18, 12, 6, 0].map(|s| ALPHABET[((n >> s) & 63) as usize] as char)
        })
        .collect()
}

/// A command that outlives its client-side timeout (the real agent stalled with `SIGSTOP`): the
/// client resyncs, the agent's late reply is discarded, and the next command gets its own answer.
pub async fn qga_resync_after_timeout(a: &'static dyn Adapter) {
    let qga = QemuGa::start();
    let agent = connect_agent(a, qga.socket()).await;
    qga.pause();
    let quick = agent.with_timeout(Duration::from_millis(300));
    let err = quick
        .execute("guest-sync", json!({"id": 999}))
        .await
        .unwrap_err();
    assert!(matches!(err, Error::Timeout), "{err:?}");
    // The agent wakes up to our command, then to the resync that followed the timeout: its reply
    // to the first arrives late, and must not answer the next.
    qga.resume();
    let next = agent
        .execute("guest-sync", json!({"id": 1}))
        .await
        .expect("guest-sync");
    assert_eq!(next, json!(1), "the next command got the late reply");
    assert_eq!(
        agent.execute("guest-ping", ()).await.expect("ping"),
        json!({})
    );
    agent.disconnect().await;
}

// --- Guest agent: fake agents ------------------------------------------------------------------

/// An old agent that echoes no ids: replies are matched by order, one command at a time, even
/// with many callers at once.
pub async fn fake_agent_without_ids(a: &'static dyn Adapter) {
    let server = FakeServer::start(|c| {
        c.agent_sync();
        while let Some(r) = c.recv() {
            // One at a time: nothing more may come before this one is answered.
            assert!(
                c.nothing_more_within(Duration::from_millis(2)),
                "a second command before {} was answered",
                r.command
            );
            // No id echoed: answer with what the command asked for.
            let n = r.arguments()["n"].clone();
            c.send(&json!({ "return": n }));
        }
    });
    let agent = connect_agent(a, server.path()).await;
    let answers = join_all((0..50).map(|n| {
        let agent = agent.clone();
        async move { agent.execute("echo", json!({ "n": n })).await }
    }))
    .await;
    for (n, answer) in answers.into_iter().enumerate() {
        assert_eq!(answer.expect("echo"), json!(n));
    }
    agent.disconnect().await;
    server.check();
}

/// A caller that drops its call (its own timeout, not the client's) while the agent sits on the
/// command: the next command does not wait behind it forever — the client resyncs past it.
pub async fn fake_agent_dropped_call_resyncs(a: &'static dyn Adapter) {
    let server = FakeServer::start(|c| {
        c.agent_sync();
        let _hung = c.expect("guest-fsfreeze-freeze");
        // Never answered. The client gives up on it and resyncs before the next command.
        c.agent_sync();
        let ping = c.expect("guest-ping");
        c.reply(&ping.command, json!({}));
        c.serve_forever();
    });
    let agent = connect_agent(a, server.path()).await;
    let dropped = timeout(
        a,
        Duration::from_millis(200),
        agent.execute("guest-fsfreeze-freeze", ()),
    )
    .await;
    assert!(dropped.is_none(), "{dropped:?}");
    let ping = timeout(a, Duration::from_secs(5), agent.execute("guest-ping", ())).await;
    assert_eq!(
        ping.expect("not stuck behind the dropped call")
            .expect("ping"),
        json!({})
    );
    agent.disconnect().await;
    server.check();
}

/// Junk, stale replies and a sync reply with the wrong id before ours are discarded; an agent
/// that never answers our sync makes connect time out.
pub async fn fake_agent_junk_and_wrong_sync_ids(a: &'static dyn Adapter) {
    let server = FakeServer::start(|c| {
        c.lf = true;
        let sync = c.expect("guest-sync-delimited");
        let id = sync.arguments()["id"].as_i64().expect("id");
        c.send_raw(b"\x01\x02 garbage {\"return\": \"stale\"}\n");
        c.send(&json!({"return": {"late": true}, "id": 1}));
        c.send_raw(b"\xff");
        c.send(&json!({ "return": id ^ 1 }));
        c.send_raw(b"\xff");
        c.send(&json!({ "return": id }));
        let ping = c.expect("guest-ping");
        c.reply(&ping.command, json!({}));
        c.serve_forever();
    });
    let agent = connect_agent(a, server.path()).await;
    assert_eq!(
        agent.execute("guest-ping", ()).await.expect("ping"),
        json!({})
    );
    agent.disconnect().await;
    server.check();

    let silent = FakeServer::start(|c| {
        c.lf = true;
        let _ = c.expect("guest-sync-delimited");
        c.send(&json!({ "return": 12345 }));
        c.serve_forever();
    });
    let started = std::time::Instant::now();
    let err = a
        .connect_agent(
            silent.path().to_owned(),
            Options::new().connect_timeout(Duration::from_millis(300)),
        )
        .await
        .unwrap_err();
    assert!(matches!(err, Error::Timeout), "{err:?}");
    assert!(started.elapsed() < Duration::from_secs(5));
    // A QMP server is not an agent: its greeting says so at once (fake_not_a_greeting_fails_at_once
    // checks that with a long deadline).
    let qmp = FakeServer::start(|c| {
        c.greet(false);
        c.serve_forever();
    });
    let err = a
        .connect_agent(
            qmp.path().to_owned(),
            Options::new().connect_timeout(Duration::from_millis(300)),
        )
        .await
        .unwrap_err();
    assert!(
        matches!(err, Error::Protocol(ProtocolError::QmpGreeting(_))),
        "{err:?}"
    );
}

/// `guest-shutdown`, `guest-suspend-*`: EOF or silence is their success; an error still fails;
/// after silence the client resyncs before the next command.
pub async fn fake_agent_no_reply_commands(a: &'static dyn Adapter) {
    let server = FakeServer::start(|c| {
        c.agent_sync();
        // Silence: the client gives up waiting, then resyncs before its next command.
        let _ = c.expect("guest-suspend-ram");
        let before = c.sentinels;
        c.agent_sync();
        assert_eq!(c.sentinels, before + 1, "the resync starts with 0xFF");
        let ping = c.expect("guest-ping");
        c.reply(&ping.command, json!({}));
        // An error is an error.
        let hybrid = c.expect("guest-suspend-hybrid");
        c.reply_error(&hybrid.command, "GenericError", "not supported");
        // The guest goes down.
        let shutdown = c.expect("guest-shutdown");
        assert_eq!(shutdown.arguments()["mode"], "powerdown");
        c.close();
    });
    let agent = connect_agent(a, server.path()).await;
    let silent = agent
        .execute_no_reply("guest-suspend-ram", (), Duration::from_millis(200))
        .await
        .expect("suspend");
    assert_eq!(silent, NoReply::Silent);
    assert_eq!(
        agent.execute("guest-ping", ()).await.expect("ping"),
        json!({})
    );
    let err = agent
        .execute_no_reply("guest-suspend-hybrid", (), Duration::from_secs(5))
        .await
        .unwrap_err();
    assert!(
        matches!(&err, Error::Qmp(q) if q.desc == "not supported"),
        "{err:?}"
    );
    // Plain execute knows these commands: the agent hanging up is the `{}` it never sends.
    let done = agent
        .execute("guest-shutdown", json!({"mode": "powerdown"}))
        .await
        .expect("shutdown");
    assert_eq!(done, json!({}));
    assert!(matches!(
        agent.closed().await,
        Disconnect::PeerClosed { .. }
    ));
    server.check();

    // And with the detail.
    let server = FakeServer::start(|c| {
        c.agent_sync();
        let _ = c.expect("guest-shutdown");
        c.close();
    });
    let agent = connect_agent(a, server.path()).await;
    let outcome = agent
        .execute_no_reply("guest-shutdown", (), Duration::from_secs(5))
        .await
        .expect("shutdown");
    assert_eq!(outcome, NoReply::Closed);
    server.check();
}

/// Instantiates the whole conformance suite for an adapter: `conformance!(ADAPTER)` where
/// `ADAPTER` is a `static` implementing [`Adapter`].
#[macro_export]
macro_rules! conformance {
    ($adapter:expr) => {
        $crate::conformance!(@tests $adapter;
            qemu_handshake, qemu_errors_typed_and_introspection, qemu_mirror_job_events,
            qemu_accept_mode, qemu_thousand_concurrent_executes, qemu_killed_mid_flight,
            qemu_started_after_connect, fake_server_started_late,
            fake_fragmented_writes, fake_line_based_server, fake_garbage_pretty_and_cascades,
            fake_oob_reordering,
            fake_disconnect_mid_reply, fake_event_flood_lag, fake_limits, fake_fd_passing,
            fake_cancel_safety, fake_timeouts, fake_lifecycle, fake_handshake_failures,
            fake_raw_commands_and_patterns,
            qga_commands_and_errors, qga_files_and_large_reads, qga_resync_after_timeout,
            fake_agent_without_ids, fake_agent_junk_and_wrong_sync_ids, fake_agent_no_reply_commands,
            fake_agent_dropped_call_resyncs);
        // Events: none lost after connect, bounded backpressure (scenarios/events.rs).
        $crate::events_conformance!($adapter);
        // The peer going away, connect errors (scenarios/peer_gone.rs).
        $crate::conformance!(@tests $adapter; qemu_killed_is_peer_closed, fake_disconnect_returns_once_the_socket_is_closed, connect_errors_say_what_is_at_the_path, fake_numbers_round_trip_exactly);
        // Greetings, id-less errors, bad replies, limits, wire ids (scenarios/protocol_rules.rs).
        $crate::conformance!(@tests $adapter; fake_not_a_greeting_fails_at_once,
            fake_idless_error_fails_the_call_that_caused_it,
            qemu_raw_command_past_qemus_limits_fails_at_once, fake_reply_without_return_or_error,
            fake_limit_passed_by_a_message_that_never_ends, fake_wire_ids_are_unique);
    };
    (@tests $adapter:expr; $($name:ident),* $(,)?) => {
        $(
            #[test]
            fn $name() {
                let adapter: &'static dyn $crate::scenarios::Adapter = &$adapter;
                adapter.run(Box::pin($crate::scenarios::$name(adapter)));
            }
        )*
    };
}
