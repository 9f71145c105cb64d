//! Against the scripted fake server: what QEMU will not do on demand.

use std::io::{Read, Seek, Write};
use std::os::fd::OwnedFd;
use std::sync::mpsc;
use std::time::Duration;

use qmp_testkit::{FakeServer, ServerConn};
use qmp_tokio::{
    Client, CommandError, Config, Disconnect, Error, EventFilter, Options, ProtocolError,
};
use serde_json::{Value, json};

async fn connect(server: &FakeServer) -> Client {
    qmp_tokio::connect(server.path(), Options::new())
        .await
        .expect("connect")
}

/// Options with OOB negotiated (it is opt-in), which also holds in-band commands to QEMU's queue
/// depth of 8.
fn oob() -> Options {
    small(Config::builder().enable_oob(true))
}

fn small(config: qmp_proto::ConfigBuilder) -> Options {
    Options::new().config(config.build().unwrap())
}

#[tokio::test]
async fn fragmented_writes_byte_by_byte() {
    let server = FakeServer::start(|c| {
        let greeting = format!("{}\r\n", qmp_testkit::GREETING);
        c.send_fragmented(greeting.as_bytes(), 1, Duration::from_micros(50));
        let caps = c.expect("qmp_capabilities");
        let reply = format!("{{\"return\": {{}}, \"id\": {}}}\r\n", caps.command["id"]);
        c.send_fragmented(reply.as_bytes(), 3, Duration::from_micros(50));
        let q = c.expect("query-status");
        let big = json!({"return": {"status": "running", "pad": "x".repeat(100_000)}, "id": q.command["id"]});
        c.send_fragmented(format!("{big}\r\n").as_bytes(), 7, Duration::ZERO);
        c.serve_forever();
    });
    let client = connect(&server).await;
    let status = client.execute("query-status", ()).await.unwrap();
    assert_eq!(status["status"], "running");
    assert_eq!(status["pad"].as_str().unwrap().len(), 100_000);
}

#[tokio::test]
async fn garbage_between_messages_is_survived() {
    let server = FakeServer::start(|c| {
        c.handshake();
        let q = c.expect("query-status");
        c.send_raw(b"\xff\x01\x02garbage\r\n{\"bad json\": }\r\n[1, 2]\r\n{\"return\": \"\xc3\x28\", \"id\": 99}\r\n\"str{\"\r\n{}\r\n");
        c.reply(&q.command, json!({"status": "running"}));
        c.serve_forever();
    });
    let client = connect(&server).await;
    assert_eq!(
        client.execute("query-status", ()).await.unwrap()["status"],
        "running"
    );
    assert!(client.execute("query-version", ()).await.is_ok());
}

#[tokio::test]
async fn a_cascade_of_idless_errors_does_not_disturb_pending_calls() {
    let server = FakeServer::start(|c| {
        c.handshake();
        let q = c.expect("query-status");
        for _ in 0..1500 {
            c.idless_error("JSON parse error, expecting value");
        }
        c.reply(&q.command, json!({"status": "running"}));
        c.serve_forever();
    });
    let client = connect(&server).await;
    assert_eq!(
        client.execute("query-status", ()).await.unwrap()["status"],
        "running"
    );
}

#[tokio::test]
async fn oob_replies_overtake_and_are_matched_by_id() {
    let server = FakeServer::start(|c| {
        c.handshake();
        let a = c.expect("slow-a");
        let b = c.expect("slow-b");
        let oob = c.expect("urgent");
        assert!(oob.is_oob());
        c.reply(&oob.command, json!("urgent"));
        c.reply(&b.command, json!("b"));
        c.reply(&a.command, json!("a"));
        c.serve_forever();
    });
    let client = qmp_tokio::connect(server.path(), oob()).await.unwrap();
    assert!(client.oob_enabled());
    let (a, b) = (client.execute("slow-a", ()), client.execute("slow-b", ()));
    let oob = async {
        // Sent after the two in-band commands.
        tokio::task::yield_now().await;
        client.execute_oob("urgent", ()).await
    };
    let (a, b, oob) = tokio::join!(a, b, oob);
    assert_eq!(
        (a.unwrap(), b.unwrap(), oob.unwrap()),
        (json!("a"), json!("b"), json!("urgent"))
    );
}

#[tokio::test]
async fn disconnect_in_the_middle_of_a_reply() {
    let server = FakeServer::start(|c| {
        c.handshake();
        let _ = c.expect("query-status");
        c.send_raw(b"{\"return\": {\"status\": \"runn");
        c.close();
    });
    let client = connect(&server).await;
    let err = client.execute("query-status", ()).await.unwrap_err();
    assert!(
        matches!(
            err,
            Error::Disconnected(Disconnect::Protocol(ProtocolError::UnexpectedEof {
                buffered: 27
            }))
        ),
        "{err:?}"
    );
    assert!(matches!(client.closed().await, Disconnect::Protocol(_)));
}

#[tokio::test]
async fn an_event_flood_reports_lag_to_the_slow_subscriber_only() {
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
    let client = qmp_tokio::connect(server.path(), Options::new().event_buffer(16))
        .await
        .unwrap();
    let mut slow = client.subscribe(EventFilter::name("TICK"));
    let mut fast = client.subscribe(EventFilter::name("TICK"));
    let fast_task = tokio::spawn(async move {
        let mut got = 0u64;
        let mut missed = 0u64;
        while got + missed < N {
            match fast.recv().await.unwrap() {
                Ok(_) => got += 1,
                Err(l) => missed += l.missed,
            }
        }
        (got, missed)
    });
    // The command's response is not held up by the subscriber that reads nothing.
    client.execute("flood", ()).await.unwrap();
    let (mut got, mut missed, mut last) = (0u64, 0u64, None);
    while got + missed < N {
        match slow.recv().await.unwrap() {
            Ok(e) => {
                let i = e.data_value().unwrap()["i"].as_u64().unwrap();
                // Order is kept, and a gap is always announced by a Lagged item.
                assert!(last.is_none_or(|l| i > l));
                got += 1;
                last = Some(i);
            }
            Err(l) => missed += l.missed,
        }
    }
    assert_eq!(got + missed, N);
    assert!(missed > 0, "the slow subscriber must have lagged");
    assert!(got >= 16);
    let (fast_got, fast_missed) = fast_task.await.unwrap();
    assert_eq!(fast_got + fast_missed, N);
}

#[tokio::test]
async fn oversized_and_overdeep_replies_fail_their_call_and_the_connection_carries_on() {
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
        let id = utf8.command["id"].clone();
        c.send_raw("{\"return\": \"\u{1}".as_bytes());
        c.send_raw(b"\xc3\x28\"");
        c.send_raw(format!(", \"id\": {id}}}\r\n").as_bytes());
        c.serve_forever();
    });
    let options = small(Config::builder().max_message_size(4096).max_depth(32));
    let client = qmp_tokio::connect(server.path(), options).await.unwrap();
    let err = client.execute("big", ()).await.unwrap_err();
    assert!(
        matches!(err, Error::Command(CommandError::ResponseTooLarge { .. })),
        "{err:?}"
    );
    let err = client.execute("deep", ()).await.unwrap_err();
    assert!(
        matches!(err, Error::Command(CommandError::ResponseTooDeep { .. })),
        "{err:?}"
    );
    // A reply that is not even UTF-8 cannot be attributed: only a timeout ends the call.
    let err = client
        .with_timeout(Duration::from_millis(200))
        .execute("bad-utf8", ())
        .await
        .unwrap_err();
    assert!(matches!(err, Error::Timeout), "{err:?}");
    assert!(client.execute("query-version", ()).await.is_ok());
}

#[tokio::test]
async fn file_descriptors_reach_the_server_with_their_command() {
    let (tx, rx) = mpsc::channel::<String>();
    let server = FakeServer::start(move |c: &mut ServerConn| {
        c.handshake();
        let plain = c.expect("query-version");
        assert!(plain.fds.is_empty());
        c.reply(&plain.command, json!({}));
        let getfd = c.expect("getfd");
        assert_eq!(getfd.arguments()["fdname"], "fd0");
        assert_eq!(getfd.fds.len(), 1, "exactly one fd, with getfd");
        let mut file = std::fs::File::from(getfd.fds.into_iter().next().unwrap());
        let mut text = String::new();
        file.rewind().unwrap();
        file.read_to_string(&mut text).unwrap();
        tx.send(text).unwrap();
        c.reply(&getfd.command, json!({}));
        let add = c.expect("add-fd");
        assert_eq!(add.fds.len(), 1);
        assert_eq!(add.arguments(), &json!({"opaque": "disk0"}));
        c.reply(&add.command, json!({"fdset-id": 3, "fd": 42}));
        c.serve_forever();
    });
    let client = connect(&server).await;
    client.execute("query-version", ()).await.unwrap();
    let mut file = tempfile::tempfile().unwrap();
    file.write_all(b"hello through SCM_RIGHTS").unwrap();
    client.getfd("fd0", OwnedFd::from(file)).await.unwrap();
    assert_eq!(
        rx.recv_timeout(Duration::from_secs(5)).unwrap(),
        "hello through SCM_RIGHTS"
    );
    let info = client
        .add_fd(
            OwnedFd::from(tempfile::tempfile().unwrap()),
            None,
            Some("disk0"),
        )
        .await
        .unwrap();
    assert_eq!((info.fdset_id, info.fd), (3, 42));
}

#[tokio::test]
async fn file_descriptors_over_tcp_are_a_clear_error() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
        let (s, _) = listener.accept().await.unwrap();
        let (r, mut w) = s.into_split();
        w.write_all(format!("{}\r\n", qmp_testkit::GREETING).as_bytes())
            .await
            .unwrap();
        let mut lines = BufReader::new(r).lines();
        while let Ok(Some(line)) = lines.next_line().await {
            let cmd: Value = serde_json::from_str(&line).unwrap();
            w.write_all(format!("{{\"return\": {{}}, \"id\": {}}}\r\n", cmd["id"]).as_bytes())
                .await
                .unwrap();
        }
    });
    let client = qmp_tokio::connect(addr, Options::new()).await.unwrap();
    assert!(client.execute("query-version", ()).await.is_ok());
    let fd = OwnedFd::from(tempfile::tempfile().unwrap());
    assert!(matches!(
        client.getfd("x", fd).await,
        Err(Error::FdPassingUnsupported)
    ));
}

#[tokio::test]
async fn a_dropped_call_never_corrupts_the_connection() {
    let (tx, rx) = mpsc::channel::<Vec<String>>();
    let server = FakeServer::start(move |c: &mut ServerConn| {
        c.handshake();
        // Eight in-band commands fill QEMU's queue; hold their replies.
        let held: Vec<_> = (0..8).map(|_| c.expect("hold")).collect();
        std::thread::sleep(Duration::from_millis(200));
        // The first call was dropped by now; its late reply must be discarded.
        for h in &held {
            c.reply(&h.command, json!("held"));
        }
        let mut names = Vec::new();
        while let Some(r) = c.recv() {
            names.push(r.name().to_owned());
            c.reply(&r.command, json!(r.name()));
            if r.name() == "last" {
                break;
            }
        }
        tx.send(names).unwrap();
        c.serve_forever();
    });
    // With OOB on, at most 8 in-band commands are in flight: the 9th waits in the client.
    let client = qmp_tokio::connect(server.path(), oob()).await.unwrap();
    let mut holders = Vec::new();
    for _ in 0..8 {
        let c = client.clone();
        holders.push(tokio::spawn(async move { c.execute("hold", ()).await }));
    }
    tokio::time::sleep(Duration::from_millis(50)).await;
    // Queued behind the full window, then dropped: it must never be sent.
    let never =
        tokio::time::timeout(Duration::from_millis(20), client.execute("never-sent", ())).await;
    assert!(never.is_err(), "timed out and dropped");
    // Written, then dropped.
    holders.remove(0).abort();
    for h in holders {
        assert_eq!(h.await.unwrap().unwrap(), json!("held"));
    }
    assert_eq!(client.execute("last", ()).await.unwrap(), json!("last"));
    let names = rx.recv_timeout(Duration::from_secs(5)).unwrap();
    assert_eq!(names, ["last"], "the dropped queued call was never written");
}

#[tokio::test]
async fn a_timed_out_call_leaves_a_usable_connection_and_its_late_reply_is_dropped() {
    let server = FakeServer::start(|c| {
        c.handshake();
        let slow = c.expect("slow");
        let next = c.expect("next");
        std::thread::sleep(Duration::from_millis(300));
        c.reply(&slow.command, json!("late"));
        c.reply(&next.command, json!("next"));
        c.serve_forever();
    });
    let client = connect(&server).await;
    let quick = client.with_timeout(Duration::from_millis(100));
    let (slow, next) = tokio::join!(quick.execute("slow", ()), client.execute("next", ()));
    assert!(matches!(slow, Err(Error::Timeout)), "{slow:?}");
    assert_eq!(next.unwrap(), json!("next"));
    assert!(client.execute("query-version", ()).await.is_ok());
}

#[tokio::test]
async fn dropping_the_last_handle_closes_the_connection() {
    let (tx, rx) = mpsc::channel::<bool>();
    let server = FakeServer::start(move |c: &mut ServerConn| {
        c.handshake();
        let q = c.expect("query-version");
        c.reply(&q.command, json!({}));
        tx.send(c.recv().is_none()).unwrap();
    });
    let client = connect(&server).await;
    let events = client.subscribe(EventFilter::all());
    client.execute("query-version", ()).await.unwrap();
    drop(client);
    // Wait off the runtime's thread: the connection's task must run to close the socket.
    let saw_eof = tokio::task::spawn_blocking(move || rx.recv_timeout(Duration::from_secs(5)));
    assert!(saw_eof.await.unwrap().unwrap(), "the server saw EOF");
    drop(events);
}

#[tokio::test]
async fn disconnect_fails_waiting_calls_and_ends_subscriptions() {
    let server = FakeServer::start(|c| {
        c.handshake();
        let _never_answered = c.expect("stuck");
        while c.recv().is_some() {}
    });
    let client = connect(&server).await;
    let mut events = client.subscribe(EventFilter::all());
    let stuck = {
        let c = client.clone();
        tokio::spawn(async move { c.execute("stuck", ()).await })
    };
    tokio::time::sleep(Duration::from_millis(50)).await;
    client.disconnect().await;
    assert!(matches!(
        stuck.await.unwrap(),
        Err(Error::Disconnected(Disconnect::Local))
    ));
    assert!(events.recv().await.is_none());
    assert!(matches!(
        client.state(),
        qmp_tokio::State::Closed(Disconnect::Local)
    ));
    assert!(matches!(
        client.execute("x", ()).await,
        Err(Error::Disconnected(_))
    ));
}

#[tokio::test]
async fn connect_gives_up_on_a_server_that_never_greets() {
    let server = FakeServer::start(|c| {
        // Like a second client on a busy QEMU monitor: connected, but no greeting.
        while c.recv().is_some() {}
    });
    let started = std::time::Instant::now();
    let result = qmp_tokio::connect(
        server.path(),
        Options::new().connect_timeout(Duration::from_millis(300)),
    )
    .await;
    assert!(matches!(result, Err(Error::Timeout)), "{result:?}");
    assert!(started.elapsed() < Duration::from_secs(3));
}

#[tokio::test]
async fn refused_negotiation_and_bad_greetings_are_protocol_errors() {
    let refuse = FakeServer::start(|c| {
        c.greet(true);
        let caps = c.expect("qmp_capabilities");
        c.reply_error(&caps.command, "GenericError", "no");
    });
    let err = qmp_tokio::connect(refuse.path(), Options::new())
        .await
        .unwrap_err();
    assert!(
        matches!(err, Error::Protocol(ProtocolError::NegotiationRejected(_))),
        "{err:?}"
    );

    let agent = FakeServer::start(|c| {
        // A guest agent answers but never greets.
        c.send(&json!({"return": {}}));
    });
    let err = qmp_tokio::connect(agent.path(), Options::new())
        .await
        .unwrap_err();
    assert!(
        matches!(err, Error::Protocol(ProtocolError::BadGreeting(_))),
        "{err:?}"
    );

    let eof = FakeServer::start(ServerConn::close);
    let err = qmp_tokio::connect(eof.path(), Options::new())
        .await
        .unwrap_err();
    assert!(
        matches!(err, Error::Protocol(ProtocolError::EofDuringHandshake)),
        "{err:?}"
    );
}

#[tokio::test]
async fn wrap_any_stream_and_raw_commands() {
    let (ours, theirs) = std::os::unix::net::UnixStream::pair().unwrap();
    std::thread::spawn(move || {
        let mut c = ServerConn::from_stream(theirs);
        c.pretty = true;
        c.handshake();
        let raw = c.expect("query-status");
        assert_eq!(raw.arguments(), &json!({"verbose": true}));
        assert!(
            raw.command["id"].is_u64(),
            "the client's own id replaced the caller's"
        );
        c.reply(&raw.command, json!({"status": "paused"}));
        c.serve_forever();
    });
    ours.set_nonblocking(true).unwrap();
    let stream = tokio::net::UnixStream::from_std(ours).unwrap();
    let client = qmp_tokio::wrap_unix(stream, Options::new()).await.unwrap();
    let raw = json!({"execute": "query-status", "arguments": {"verbose": true}, "id": "mine"});
    assert_eq!(
        client.execute_raw(raw).await.unwrap(),
        json!({"status": "paused"})
    );

    // And over a generic in-memory stream (no fds there).
    let (a, b) = tokio::io::duplex(64);
    tokio::spawn(async move {
        use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
        let (r, mut w) = tokio::io::split(b);
        w.write_all(format!("{}\r\n", qmp_testkit::GREETING).as_bytes())
            .await
            .unwrap();
        let mut lines = BufReader::new(r).lines();
        while let Ok(Some(line)) = lines.next_line().await {
            let cmd: Value = serde_json::from_str(&line).unwrap();
            w.write_all(
                format!(
                    "{{\"return\": {}, \"id\": {}}}\r\n",
                    cmd["execute"], cmd["id"]
                )
                .as_bytes(),
            )
            .await
            .unwrap();
        }
    });
    let client = qmp_tokio::wrap(a, Options::new()).await.unwrap();
    assert_eq!(
        client.execute("echo-me", ()).await.unwrap(),
        json!("echo-me")
    );
}

#[tokio::test]
async fn wait_for_matches_a_partial_pattern_of_the_data() {
    let server = FakeServer::start(|c| {
        c.handshake();
        let go = c.expect("job-run");
        c.event(
            "JOB_STATUS_CHANGE",
            json!({"status": "running", "id": "job0"}),
        );
        c.event(
            "JOB_STATUS_CHANGE",
            json!({"status": "pending", "id": "job1"}),
        );
        c.reply(&go.command, json!({}));
        c.event(
            "JOB_STATUS_CHANGE",
            json!({"status": "pending", "id": "job0", "extra": [1]}),
        );
        c.serve_forever();
    });
    let client = connect(&server).await;
    let pending =
        EventFilter::name("JOB_STATUS_CHANGE").data(json!({"status": "pending", "id": "job0"}));
    let mut sub = client.subscribe(pending.clone());
    client.execute("job-run", ()).await.unwrap();
    let event = sub
        .wait_for(&pending, Duration::from_secs(5))
        .await
        .unwrap();
    assert_eq!(event.data_value().unwrap()["extra"], json!([1]));
    // Nothing else matches: a timeout, not a hang.
    let err = client
        .wait_for(EventFilter::name("NEVER"), Duration::from_millis(100))
        .await
        .unwrap_err();
    assert!(matches!(err, Error::Timeout));
}
