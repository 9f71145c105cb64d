//! Tokio-specific cases against the scripted fake server; the scenarios every adapter shares are
//! in `conformance.rs` (from `qmp_testkit::scenarios`).

use std::os::fd::OwnedFd;

use qmp_testkit::ServerConn;
use qmp_tokio::{Error, Options};
use serde_json::json;

#[tokio::test]
async fn file_descriptors_over_tcp_are_a_clear_error() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let (mut s, _) = listener.accept().await.unwrap();
        s.write_all(format!("{}\r\n", qmp_testkit::GREETING).as_bytes())
            .await
            .unwrap();
        let mut inbox = Vec::new();
        let mut buf = [0; 4096];
        while let Ok(n @ 1..) = s.read(&mut buf).await {
            inbox.extend_from_slice(&buf[..n]);
            for cmd in qmp_testkit::take_commands(&mut inbox) {
                let reply = format!("{{\"return\": {{}}, \"id\": {}}}\r\n", cmd["id"]);
                s.write_all(reply.as_bytes()).await.unwrap();
            }
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
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut b = b;
        b.write_all(format!("{}\r\n", qmp_testkit::GREETING).as_bytes())
            .await
            .unwrap();
        let mut inbox = Vec::new();
        let mut buf = [0; 64];
        while let Ok(n @ 1..) = b.read(&mut buf).await {
            inbox.extend_from_slice(&buf[..n]);
            for cmd in qmp_testkit::take_commands(&mut inbox) {
                let reply = format!(
                    "{{\"return\": {}, \"id\": {}}}\r\n",
                    cmd["execute"], cmd["id"]
                );
                b.write_all(reply.as_bytes()).await.unwrap();
            }
        }
    });
    let client = qmp_tokio::wrap(a, Options::new()).await.unwrap();
    assert_eq!(
        client.execute("echo-me", ()).await.unwrap(),
        json!("echo-me")
    );
}

/// Regression: the descriptors of a command that timed out (or was dropped) before it was ever
/// written were kept open until the connection closed.
#[tokio::test]
async fn fds_of_a_command_never_written_are_closed() {
    let server = qmp_testkit::FakeServer::start(|c| {
        c.handshake();
        let _held = c.expect("hold"); // never answered: with OOB on and a window of 1, getfd waits
        while c.recv().is_some() {}
    });
    let config = qmp_tokio::Config::builder()
        .enable_oob(true)
        .max_in_flight(1)
        .build()
        .unwrap();
    let client = qmp_tokio::connect(server.path(), Options::new().config(config))
        .await
        .unwrap();
    let held = tokio::spawn({
        let c = client.clone();
        async move { c.execute("hold", ()).await }
    });
    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    let (reader, writer) = std::io::pipe().unwrap();
    let quick = client.with_timeout(std::time::Duration::from_millis(100));
    let result = quick
        .execute_with_fds("getfd", json!({"fdname": "x"}), vec![OwnedFd::from(writer)])
        .await;
    assert!(matches!(result, Err(Error::Timeout)), "{result:?}");
    // Our copy of the write end is closed: reading the pipe sees end of file.
    let mut reader = reader;
    let mut buf = Vec::new();
    let read =
        tokio::task::spawn_blocking(move || std::io::Read::read_to_end(&mut reader, &mut buf));
    let done = tokio::time::timeout(std::time::Duration::from_secs(2), read).await;
    assert!(
        matches!(done, Ok(Ok(Ok(0)))),
        "the write end is still open: {done:?}"
    );
    held.abort();
}

/// A peer that stops reading (a stopped QEMU) cannot hold a graceful close up forever.
#[tokio::test]
async fn disconnect_gives_up_on_a_peer_that_stopped_reading() {
    let server = qmp_testkit::FakeServer::start(|c| {
        c.handshake();
        std::thread::sleep(std::time::Duration::from_secs(10));
    });
    let client = qmp_tokio::connect(server.path(), Options::new())
        .await
        .unwrap();
    // Far more than the socket buffers hold: the write cannot finish.
    let big = tokio::spawn({
        let c = client.clone();
        async move { c.execute("x", json!({"pad": "x".repeat(8 << 20)})).await }
    });
    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    let started = std::time::Instant::now();
    tokio::time::timeout(std::time::Duration::from_secs(5), client.disconnect())
        .await
        .expect("disconnect returned");
    assert!(
        started.elapsed() >= std::time::Duration::from_secs(1),
        "it did wait for the bytes first"
    );
    assert!(matches!(big.await.unwrap(), Err(Error::Disconnected(_))));
}

/// A stream that fails, once told to, with a chosen error: on its next read or its next write.
struct Failing {
    inner: tokio::io::DuplexStream,
    fail: std::sync::Arc<std::sync::Mutex<Option<(Side, std::io::ErrorKind)>>>,
}

#[derive(Clone, Copy, Debug, PartialEq)]
enum Side {
    Read,
    Write,
}

impl Failing {
    fn failure(&self, side: Side) -> Option<std::io::Error> {
        match *self.fail.lock().unwrap() {
            Some((s, kind)) if s == side => Some(kind.into()),
            _ => None,
        }
    }
}

impl tokio::io::AsyncRead for Failing {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        if let Some(e) = self.failure(Side::Read) {
            return std::task::Poll::Ready(Err(e));
        }
        std::pin::Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl tokio::io::AsyncWrite for Failing {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        if let Some(e) = self.failure(Side::Write) {
            return std::task::Poll::Ready(Err(e));
        }
        std::pin::Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// The errors that can only mean the peer went away (a reset when QEMU died with our commands
/// unread, a broken pipe when a write hit its dead socket, an abort) are `PeerClosed`, as end
/// of stream is, with the system's error as the source; any other error stays `Io`. The
/// conformance suite kills a real daemon; here each error is made to happen, deterministically.
#[tokio::test]
async fn the_peer_gone_is_peer_closed_however_the_system_reports_it() {
    use qmp_tokio::Disconnect;
    use std::io::ErrorKind::{
        BrokenPipe, ConnectionAborted, ConnectionReset, InvalidData, PermissionDenied,
    };
    for (side, kind, gone) in [
        (Side::Read, ConnectionReset, true),
        (Side::Write, BrokenPipe, true),
        (Side::Read, ConnectionAborted, true),
        (Side::Write, ConnectionReset, true),
        (Side::Read, InvalidData, false),
        (Side::Write, PermissionDenied, false),
    ] {
        let (ours, theirs) = tokio::io::duplex(4096);
        tokio::spawn(async move {
            use tokio::io::{AsyncReadExt, AsyncWriteExt};
            let mut theirs = theirs;
            theirs
                .write_all(format!("{}\r\n", qmp_testkit::GREETING).as_bytes())
                .await
                .unwrap();
            let mut inbox = Vec::new();
            let mut buf = [0; 4096];
            while let Ok(n @ 1..) = theirs.read(&mut buf).await {
                inbox.extend_from_slice(&buf[..n]);
                for cmd in qmp_testkit::take_commands(&mut inbox) {
                    if cmd["execute"] == "qmp_capabilities" {
                        let reply = format!("{{\"return\": {{}}, \"id\": {}}}\r\n", cmd["id"]);
                        theirs.write_all(reply.as_bytes()).await.unwrap();
                    }
                }
            }
        });
        let fail = std::sync::Arc::default();
        let stream = Failing {
            inner: ours,
            fail: std::sync::Arc::clone(&fail),
        };
        let client = qmp_tokio::wrap(stream, Options::new()).await.unwrap();
        *fail.lock().unwrap() = Some((side, kind));
        let what = format!("{kind:?} on {side:?}");
        let got = tokio::time::timeout(
            std::time::Duration::from_secs(30),
            client.execute("query-version", ()),
        )
        .await
        .expect("an answer");
        let Err(Error::Disconnected(reason)) = got else {
            panic!("{what}: {got:?}");
        };
        let source = match &reason {
            Disconnect::PeerClosed { source, .. } if gone => source.as_deref(),
            Disconnect::Io(e) if !gone => Some(&**e),
            other => panic!("{what}: {other:?}"),
        };
        assert_eq!(source.map(std::io::Error::kind), Some(kind), "{what}");
        if gone {
            // Chained as it is held: shared, as a `Disconnect` is `Clone`.
            let chained = std::error::Error::source(&reason).expect("the source is chained");
            assert_eq!(
                chained
                    .downcast_ref::<std::sync::Arc<std::io::Error>>()
                    .map(|e| e.kind()),
                Some(kind),
                "{what}"
            );
        }
        assert!(matches!(
            (client.closed().await, gone),
            (Disconnect::PeerClosed { .. }, true) | (Disconnect::Io(_), false)
        ));
    }
}
