//! Conformance scenarios: the peer going away (QEMU killed, a disconnect), nothing listening or
//! not a socket at the address, and numbers coming back exactly as QEMU sent them.

#[allow(unused_imports)]
use super::*;

use std::io::{self, Write as _};
use std::time::Instant;

/// How long a promptness check waits before failing: far more than any answer needs, so a slow
/// machine does not fail it; the assertion on the time taken is separate and generous.
const PATIENCE: Duration = Duration::from_secs(30);

/// What "at once" means where promptness is the point: well above scheduling noise on a loaded
/// machine, well below any deadline or retry in play.
const PROMPTLY: Duration = Duration::from_secs(3);

#[track_caller]
fn assert_peer_closed(d: &Disconnect, what: &str) {
    assert!(
        matches!(d, Disconnect::PeerClosed { .. }),
        "{what}: {d:?} is not PeerClosed"
    );
}

/// SIGKILL of a real qemu-storage-daemon is `PeerClosed` however it finds the client: with
/// nothing in flight (the client reads EOF), with commands written and unread (the kernel resets
/// the connection), and with commands sent just as it dies (a write may hit the dead socket).
/// Every call that was waiting and every later call report the same; repeated, since which of
/// these the kernel reports depends on timing.
pub async fn qemu_killed_is_peer_closed(a: &'static dyn Adapter) {
    for round in 0..3 {
        // Nothing in flight.
        let mut qsd = Qsd::start();
        let client = a
            .connect(qsd.socket().into(), Options::new())
            .await
            .expect("connect");
        client.execute("query-version", ()).await.expect("answer");
        qsd.kill();
        let started = Instant::now();
        let reason = timeout(a, PATIENCE, client.closed()).await.expect("closed");
        assert!(started.elapsed() < PROMPTLY, "round {round}: idle");
        assert_peer_closed(&reason, &format!("round {round}: idle"));
        match client.execute("query-version", ()).await {
            Err(Error::Disconnected(d)) => assert_peer_closed(&d, "a call after the end"),
            other => panic!("round {round}: a call after the end: {other:?}"),
        }

        // Commands written and unread: stopped, the daemon takes them into its socket only.
        let mut qsd = Qsd::start();
        let client = a
            .connect(qsd.socket().into(), Options::new())
            .await
            .expect("connect");
        qsd.pause();
        let calls = join_all((0..50).map(|_| client.execute("query-named-block-nodes", ())));
        let kill = async {
            a.sleep(Duration::from_millis(200)).await;
            qsd.kill();
        };
        let (results, ()) = futures_util::join!(calls, kill);
        for r in results {
            match r {
                Err(Error::Disconnected(d)) => assert_peer_closed(&d, "a call in flight"),
                other => panic!("round {round}: a call in flight: {other:?}"),
            }
        }
        let reason = timeout(a, PATIENCE, client.closed()).await.expect("closed");
        assert_peer_closed(&reason, &format!("round {round}: in flight"));

        // Commands sent as it dies.
        let mut qsd = Qsd::start();
        let client = a
            .connect(qsd.socket().into(), Options::new())
            .await
            .expect("connect");
        qsd.kill();
        let results = join_all((0..20).map(|_| client.execute("query-version", ()))).await;
        for r in results {
            match r {
                // Answered before the daemon died.
                Ok(_) => {}
                Err(Error::Disconnected(d)) => assert_peer_closed(&d, "a call as it dies"),
                other => panic!("round {round}: a call as it dies: {other:?}"),
            }
        }
        let reason = timeout(a, PATIENCE, client.closed()).await.expect("closed");
        assert_peer_closed(&reason, &format!("round {round}: as it dies"));
    }
}

/// When `disconnect().await` returns, the socket is closed, not only shut down for writing: the
/// server, writing right then, finds nobody there (`EPIPE`). Repeated, as the socket used to be
/// closed a moment after `disconnect` returned, when the connection's task was dropped.
pub async fn fake_disconnect_returns_once_the_socket_is_closed(a: &'static dyn Adapter) {
    for round in 0..20 {
        let (returned, wait) = mpsc::channel::<()>();
        let wait = Mutex::new(wait);
        let (tx, written) = mpsc::channel::<io::Result<usize>>();
        let server = FakeServer::start(move |c| {
            c.handshake();
            let q = c.expect("query-version");
            c.reply(&q.command, json!({}));
            let _ = wait.lock().expect("wait").recv_timeout(PATIENCE);
            let _ = tx.send(c.stream().write(b"{\"return\": {}}\r\n"));
        });
        let client = connect(a, &server).await;
        client.execute("query-version", ()).await.expect("answer");
        let started = Instant::now();
        timeout(a, PATIENCE, client.disconnect())
            .await
            .expect("disconnect returns");
        assert!(started.elapsed() < PROMPTLY, "round {round}");
        returned.send(()).expect("the server waits");
        let written = recv(a, written).await;
        assert!(
            matches!(&written, Err(e) if e.kind() == io::ErrorKind::BrokenPipe),
            "round {round}: the server wrote to a socket still open after disconnect: {written:?}"
        );
        assert!(matches!(client.closed().await, Disconnect::Local));
        server.check();
    }
}

/// Connecting to a path that is a regular file, a directory or a socket nobody listens on
/// (QEMU gone, its socket file left behind) says which, instead of the system's "Connection
/// refused" for all three; the error keeps its kind (`ConnectionRefused`) and the system's error
/// as its source. With [`Options::wait_for_server`] a refused connect is still retried until the
/// deadline, which then reports the same.
pub async fn connect_errors_say_what_is_at_the_path(a: &'static dyn Adapter) {
    let dir = tempfile::tempdir().expect("temp dir");
    let file = dir.path().join("file.qmp");
    std::fs::write(&file, b"not a socket").expect("a file");
    let directory = dir.path().join("dir.qmp");
    std::fs::create_dir(&directory).expect("a dir");
    let stale = dir.path().join("stale.qmp");
    // A listener dropped leaves its socket file behind, as a QEMU killed does.
    drop(std::os::unix::net::UnixListener::bind(&stale).expect("bind"));
    let cases = [
        (&file, "is not a socket: it is a regular file"),
        (&directory, "is not a socket: it is a directory"),
        (&stale, "nothing is listening on"),
    ];
    for wait in [false, true] {
        for (path, says) in &cases {
            let options = Options::new()
                .wait_for_server(wait)
                .connect_timeout(Duration::from_millis(300));
            let started = Instant::now();
            let err = timeout(a, PATIENCE, a.connect(path.as_path().into(), options))
                .await
                .expect("an answer")
                .expect_err("not a QMP server");
            assert!(started.elapsed() < PROMPTLY, "{}", path.display());
            let Error::Io(e) = &err else {
                panic!("{}, wait {wait}: {err:?}", path.display())
            };
            assert_eq!(e.kind(), io::ErrorKind::ConnectionRefused, "{e}");
            let message = e.to_string();
            assert!(
                message.contains(says) && message.contains(&*path.to_string_lossy()),
                "{}, wait {wait}: {message}",
                path.display()
            );
            let source = std::error::Error::source(e).expect("the system's error as the source");
            let os = source
                .downcast_ref::<io::Error>()
                .expect("an io::Error source");
            assert_eq!(os.kind(), io::ErrorKind::ConnectionRefused);
            assert_eq!(os.raw_os_error(), Some(111), "ECONNREFUSED");
        }
    }
    // And a path with nothing there stays as it was.
    let err = a
        .connect(dir.path().join("absent.qmp").into(), Options::new())
        .await
        .expect_err("nothing there");
    assert!(
        matches!(&err, Error::Io(e) if e.kind() == io::ErrorKind::NotFound),
        "{err:?}"
    );
}

/// Numbers come back exactly as QEMU wrote them: the closest `f64` to each decimal text, through
/// `execute` (a `Value`), `execute_as` (typed) and `call` (the text). Without serde_json's
/// `float_roundtrip`, `1.5e-300` came back as `1.4999999999999998e-300`.
pub async fn fake_numbers_round_trip_exactly(a: &'static dyn Adapter) {
    const NUMBERS: &[&str] = &[
        "1.5e-300",
        "2.2250738585072014e-308",
        "2.2250738585072011e-308",
        "0.1",
        "1e300",
        "5e-324",
        "2.4703282292062328e-324",
        "1.7976931348623157e308",
        "1e23",
        "8.41e21",
        "0.30000000000000004",
        "7.2057594037927933e16",
        "-4.9406564584124654e-324",
        "123456789012345678901234567890e-40",
    ];
    let text = format!("[{}]", NUMBERS.join(", "));
    let reply = text.clone();
    let server = FakeServer::start(move |c| {
        c.handshake();
        while let Some(r) = c.recv() {
            let id = &r.command["id"];
            c.send_raw(format!("{{\"return\": {{\"n\": {reply}}}, \"id\": {id}}}\r\n").as_bytes());
        }
    });
    let want: Vec<f64> = NUMBERS
        .iter()
        .map(|n| n.parse().expect("std parses exactly"))
        .collect();
    let client = connect(a, &server).await;

    let value = client.execute("x-numbers", ()).await.expect("execute");
    let got: Vec<f64> = value["n"]
        .as_array()
        .expect("a list")
        .iter()
        .map(|v| v.as_f64().expect("a number"))
        .collect();
    for ((text, want), got) in NUMBERS.iter().zip(&want).zip(&got) {
        assert_eq!(
            got.to_bits(),
            want.to_bits(),
            "execute: {text} came back as {got:e}"
        );
    }

    #[derive(serde::Deserialize)]
    struct Numbers {
        n: Vec<f64>,
    }
    let typed: Numbers = client
        .execute_as("x-numbers", ())
        .await
        .expect("execute_as");
    for ((text, want), got) in NUMBERS.iter().zip(&want).zip(&typed.n) {
        assert_eq!(
            got.to_bits(),
            want.to_bits(),
            "execute_as: {text} came back as {got:e}"
        );
    }

    let raw = client
        .call(qmp_client::Command::new("x-numbers"))
        .await
        .expect("call");
    assert_eq!(
        raw.get(),
        format!("{{\"n\": {text}}}"),
        "call keeps the text"
    );
    server.check();
}
