//! Conformance scenarios: what the peer has already said is wrong is reported at once (a first
//! message that is not a greeting, id-less errors, a reply that is not one, a message past a
//! limit), and the ids commands carry on the wire.

use std::time::Instant;

use qmp_client::ArgumentsError;

use super::*;

/// Timeout of every call and connect here: far beyond [`PROMPT`], so that a timeout can never
/// pass for a prompt answer.
const PATIENT: Duration = Duration::from_secs(30);
/// How soon what has already arrived must be reported.
const PROMPT: Duration = Duration::from_secs(5);

fn patient() -> Options {
    Options::new().connect_timeout(PATIENT).timeout(PATIENT)
}

/// Runs `f`, which must finish within [`PROMPT`].
async fn promptly<T>(a: &dyn Adapter, what: &str, f: impl Future<Output = T>) -> T {
    let started = Instant::now();
    let out = timeout(a, PATIENT, f)
        .await
        .unwrap_or_else(|| panic!("{what}: no answer within {PATIENT:?}"));
    let took = started.elapsed();
    assert!(took < PROMPT, "{what}: took {took:?}");
    out
}

/// A server that sends `bytes` as it accepts, then waits for the client to leave.
fn sends_first(bytes: &'static [u8]) -> FakeServer {
    FakeServer::start(move |c| {
        c.send_raw(bytes);
        let _ = c.recv();
    })
}

/// A first message that is not a QMP greeting fails `connect` at once, showing what arrived; a
/// guest-agent connect to a QMP monitor (fake and real) says it got a QMP greeting.
pub async fn fake_not_a_greeting_fails_at_once(a: &'static dyn Adapter) {
    let cases: [(&'static [u8], &str); 5] = [
        (
            b"SSH-2.0-OpenSSH_9.2p1 Debian-2\r\n",
            "SSH-2.0-OpenSSH_9.2p1",
        ),
        (b"[1, 2, 3]\r\n", "[1, 2, 3]"),
        (b"\"QMP\"\r\n", "\"QMP\""),
        (b"{\"hello\": \"world\"}\r\n", "{\"hello\": \"world\"}"),
        (b"{\"return\": {}}\r\n", "{\"return\": {}}"),
    ];
    for (bytes, shown) in cases {
        let server = sends_first(bytes);
        let err = promptly(a, shown, a.connect(server.path().into(), patient()))
            .await
            .expect_err("not a QMP monitor");
        assert!(
            matches!(&err, Error::Protocol(ProtocolError::BadGreeting(e)) if e.as_str().contains(shown)),
            "{shown}: {err:?}"
        );
        let msg = err.to_string();
        assert!(msg.contains(shown) && msg.contains("QMP greeting"), "{msg}");
        server.check();
    }

    let monitor = FakeServer::start(|c| {
        c.greet(true);
        let _ = c.recv();
    });
    let qsd = Qsd::start();
    for (who, path) in [
        ("fake", monitor.path()),
        ("qemu-storage-daemon", qsd.socket()),
    ] {
        let options = patient();
        let err = promptly(a, who, a.connect_agent(path.to_path_buf(), options))
            .await
            .expect_err("a QMP monitor is not a guest agent");
        assert!(
            matches!(&err, Error::Protocol(ProtocolError::QmpGreeting(e)) if e.as_str().starts_with("{\"QMP\"")),
            "{who}: {err:?}"
        );
        assert!(err.to_string().contains("not a guest agent"), "{err}");
    }
    // The monitor is free again and speaks QMP as ever.
    let client = a
        .connect(qsd.socket().into(), patient())
        .await
        .expect("connect");
    client.execute("query-version", ()).await.expect("version");
    client.disconnect().await;
    monitor.check();
}

/// An id-less error (QEMU's answer to input it could not parse) fails the oldest command in
/// flight at once, with that error; the rest of its cascade fails nothing, and a command answered
/// after it, or sent after it, gets its own reply.
pub async fn fake_idless_error_fails_the_call_that_caused_it(a: &'static dyn Adapter) {
    let parse = "JSON parse error, expecting value";
    // Two commands in flight: the first "caused" a cascade of 1,000 errors.
    let server = FakeServer::start(move |c| {
        c.handshake();
        let _bad = c.recv().expect("bad");
        let good = c.recv().expect("good");
        for _ in 0..1000 {
            c.idless_error(parse);
        }
        c.reply(&good.command, json!({"good": true}));
        // One command, its cascade, then the next command.
        let _bad = c.recv().expect("bad");
        for _ in 0..500 {
            c.idless_error(parse);
        }
        let next = c.recv().expect("next");
        c.reply(&next.command, json!({"next": true}));
        c.serve_forever();
    });
    let client = promptly(a, "connect", a.connect(server.path().into(), patient()))
        .await
        .expect("connect");
    let (bad, good) = promptly(
        a,
        "two in flight",
        futures_util::future::join(client.execute("bad", ()), client.execute("good", ())),
    )
    .await;
    assert!(
        matches!(&bad, Err(Error::Qmp(q)) if q.class == "GenericError" && q.desc == parse),
        "{bad:?}"
    );
    assert_eq!(good.expect("good"), json!({"good": true}));
    let bad = promptly(a, "one", client.execute("bad", ())).await;
    assert!(
        matches!(&bad, Err(Error::Qmp(q)) if q.desc == parse),
        "{bad:?}"
    );
    let next = promptly(a, "after", client.execute("next", ())).await;
    assert_eq!(next.expect("next"), json!({"next": true}));
    assert!(!client.is_closed());
    client.disconnect().await;
    server.check();
}

/// A raw command past QEMU's nesting limit never reaches a real QEMU (which would answer it with
/// an id-less cascade): it fails at once, and the session carries on.
pub async fn qemu_raw_command_past_qemus_limits_fails_at_once(a: &'static dyn Adapter) {
    let qsd = Qsd::start();
    let client = a
        .connect(qsd.socket().into(), patient())
        .await
        .expect("connect");
    let mut deep = json!(1);
    for _ in 0..1100 {
        deep = json!({ "a": deep });
    }
    let raw = json!({"execute": "query-version", "arguments": deep});
    let err = promptly(a, "too deep", client.execute_raw(raw))
        .await
        .expect_err("too deep for QEMU");
    assert!(
        matches!(
            err,
            Error::Arguments(ArgumentsError::TooDeep { limit: 1023, .. })
        ),
        "{err:?}"
    );
    let version = promptly(a, "after", client.execute("query-version", ())).await;
    assert_eq!(
        version.expect("version")["qemu"]["major"],
        client.greeting().version.major
    );
    client.disconnect().await;
}

/// A reply with the caller's id but neither `return` nor `error` fails that call at once,
/// naming what arrived; the session carries on.
pub async fn fake_reply_without_return_or_error(a: &'static dyn Adapter) {
    let server = FakeServer::start(|c| {
        c.handshake();
        let r = c.recv().expect("command");
        c.send(&json!({"id": r.command["id"], "status": "weird"}));
        c.serve_forever();
    });
    let client = a
        .connect(server.path().into(), patient())
        .await
        .expect("connect");
    let err = promptly(a, "not a reply", client.execute("query-status", ()))
        .await
        .expect_err("not a reply");
    assert!(
        matches!(&err, Error::Command(CommandError::NotAReply(e)) if e.as_str().contains("weird")),
        "{err:?}"
    );
    assert!(
        err.to_string().contains("neither `return` nor `error`"),
        "{err}"
    );
    client
        .execute("query-version", ())
        .await
        .expect("the session carries on");
    client.disconnect().await;
    server.check();
}

/// A reply that passes the size limit and never ends fails its call as the limit is passed; one
/// nested past the depth limit too, and past QEMU's own nesting limit (1024) the connection
/// closes instead of skipping forever.
pub async fn fake_limit_passed_by_a_message_that_never_ends(a: &'static dyn Adapter) {
    let config = Config::builder()
        .max_message_size(4096)
        .build()
        .expect("valid");
    let server = FakeServer::start(|c| {
        c.handshake();
        let _ = c.recv().expect("command");
        c.send_raw(format!("{{\"return\": \"{}", "x".repeat(100_000)).as_bytes());
        // No end: the client must not wait for one.
        let _ = c.recv();
    });
    let client = a
        .connect(server.path().into(), patient().config(config))
        .await
        .expect("connect");
    let err = promptly(a, "too large", client.execute("query-big", ()))
        .await
        .expect_err("too large");
    assert!(
        matches!(
            err,
            Error::Command(CommandError::ResponseTooLarge { size: 4097 })
        ),
        "{err:?}"
    );
    client.disconnect().await;
    server.check();

    let server = FakeServer::start(|c| {
        c.handshake();
        let _ = c.recv().expect("command");
        c.send_raw(format!("{{\"return\": {}", "[".repeat(5000)).as_bytes());
        let _ = c.recv();
    });
    let client = a
        .connect(server.path().into(), patient())
        .await
        .expect("connect");
    let err = promptly(a, "too deep", client.execute("query-deep", ()))
        .await
        .expect_err("too deep");
    assert!(
        matches!(err, Error::Command(CommandError::ResponseTooDeep { .. })),
        "{err:?}"
    );
    let reason = promptly(a, "closed", client.closed()).await;
    assert!(
        matches!(
            reason,
            Disconnect::Protocol(ProtocolError::TooDeepToSkip { .. })
        ),
        "{reason:?}"
    );
    server.check();
}

/// Every command carries an id of its own on the wire, never reused on the connection.
pub async fn fake_wire_ids_are_unique(a: &'static dyn Adapter) {
    let (tx, rx) = mpsc::channel();
    let tx = Mutex::new(tx);
    let server = FakeServer::start(move |c| {
        c.handshake();
        let mut ids = Vec::new();
        while let Some(r) = c.recv() {
            ids.push(r.command["id"].clone());
            c.reply(&r.command, json!({}));
        }
        let _ = tx.lock().expect("sender").send(ids);
    });
    let client = a
        .connect(server.path().into(), patient())
        .await
        .expect("connect");
    for _ in 0..5 {
        client.execute("query-status", ()).await.expect("status");
    }
    let concurrent = (0..5).map(|_| client.execute("query-status", ()));
    for r in join_all(concurrent).await {
        r.expect("status");
    }
    client.disconnect().await;
    let ids = recv(a, rx).await;
    let want: Vec<Value> = (1..=10).map(Value::from).collect();
    assert_eq!(ids, want);
    server.check();
}
