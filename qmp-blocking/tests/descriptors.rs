//! The descriptors of a connection that has ended (found in review). A test binary of its own:
//! it counts the process's open descriptors, which tests running alongside would change.

use std::time::Duration;

use qmp_blocking::Options;
use qmp_testkit::FakeServer;

/// The tests here count the process's descriptors: one at a time.
static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn open_descriptors() -> usize {
    std::fs::read_dir("/proc/self/fd").expect("/proc").count()
}

/// A connection that has ended holds no descriptor, even while its handles live (it kept its two
/// wake-up pipes before).
#[test]
fn an_ended_connection_holds_no_descriptors() {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let server = FakeServer::start(|c| {
        c.handshake();
        c.close();
    });
    // Warm up whatever the process opens once (the timer thread, ...).
    drop(qmp_blocking::connect(server.path(), Options::new()));
    std::thread::sleep(Duration::from_millis(100));
    let before = open_descriptors();
    let clients: Vec<_> = (0..10)
        .map(|_| qmp_blocking::connect(server.path(), Options::new()).expect("connect"))
        .collect();
    for client in &clients {
        let _ = client.closed();
    }
    std::thread::sleep(Duration::from_millis(200));
    let after = open_descriptors();
    assert!(
        after <= before + 1,
        "{before} descriptors before, {after} after"
    );
    drop(clients);
}

/// When `disconnect` returns, every descriptor of the connection is closed: the socket and its
/// duplicate the connection's thread polls (closed a moment later before), and the wake-up pipes.
/// Repeated, as it was a race with the connection's thread.
#[test]
fn disconnect_returns_once_the_descriptors_are_closed() {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let (hold, held) = std::sync::mpsc::channel::<()>();
    let held = std::sync::Mutex::new(held);
    // The server keeps its end open until told, so that only the client's side changes.
    let server = FakeServer::start(move |c| {
        c.handshake();
        let q = c.expect("query-version");
        c.reply(&q.command, serde_json::json!({}));
        let _ = held.lock().expect("held").recv();
    });
    let warm_up = qmp_blocking::connect(server.path(), Options::new()).expect("connect");
    warm_up.execute("query-version", ()).expect("answer");
    drop(warm_up);
    hold.send(()).expect("the server waits");
    std::thread::sleep(Duration::from_millis(100));
    let base = open_descriptors();
    for round in 0..20 {
        // The server's thread closes its end of the last round's connection in its own time.
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while open_descriptors() > base && std::time::Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(1));
        }
        let before = open_descriptors();
        let client = qmp_blocking::connect(server.path(), Options::new()).expect("connect");
        client.execute("query-version", ()).expect("answer");
        client.disconnect();
        let after = open_descriptors();
        // The server's end of the connection is still open.
        assert_eq!(after, before + 1, "round {round}: descriptors left open");
        hold.send(()).expect("the server waits");
        drop(client);
    }
}
