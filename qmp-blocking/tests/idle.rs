//! The connection's thread while a call holds the socket (found in review). A test binary of its
//! own: it finds the connection's thread by name, so no other connection may run alongside.

use std::time::Duration;

use qmp_blocking::{EventFilter, Options};
use qmp_testkit::FakeServer;
use serde_json::json;

/// How many times the connection's thread has gone to sleep and been woken.
fn connection_thread_wakeups() -> u64 {
    for task in std::fs::read_dir("/proc/self/task").expect("/proc") {
        let path = task.expect("task").path();
        let name = std::fs::read_to_string(path.join("comm")).unwrap_or_default();
        if name.trim() == "qmp-connection" {
            let status = std::fs::read_to_string(path.join("status")).expect("status");
            return status
                .lines()
                .find_map(|l| l.strip_prefix("voluntary_ctxt_switches:"))
                .and_then(|v| v.trim().parse().ok())
                .expect("voluntary_ctxt_switches");
        }
    }
    panic!("no connection thread")
}

/// While `Client::block_on` drives the connection (here waiting 2 s for an event that does not
/// come), the connection's thread sleeps, even after something arrived that woke it once (it
/// woke every 2 ms for the rest of the wait before: some 900 times).
#[test]
fn the_connection_thread_sleeps_while_a_call_holds_the_socket() {
    let server = FakeServer::start(|c| {
        c.handshake();
        while let Some(r) = c.recv() {
            c.reply(&r.command, json!({}));
            std::thread::sleep(Duration::from_millis(100));
            c.event("OTHER", json!({}));
        }
    });
    let client = qmp_blocking::connect(server.path(), Options::new()).expect("connect");
    std::thread::sleep(Duration::from_millis(100));
    let mut sub = client.subscribe(EventFilter::name("NEVER"));
    client.execute("go", ()).expect("go");
    let before = connection_thread_wakeups();
    let waited = client.block_on(sub.as_async().recv_timeout(Duration::from_secs(2)));
    assert!(waited.is_err(), "no such event");
    let wakeups = connection_thread_wakeups() - before;
    assert!(wakeups < 50, "{wakeups} wake-ups during a 2 s wait");
}
