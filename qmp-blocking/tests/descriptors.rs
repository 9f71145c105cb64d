//! The descriptors of a connection that has ended (found in review). A test binary of its own:
//! it counts the process's open descriptors, which tests running alongside would change.

use std::time::Duration;

use qmp_blocking::Options;
use qmp_testkit::FakeServer;

fn open_descriptors() -> usize {
    std::fs::read_dir("/proc/self/fd").expect("/proc").count()
}

/// A connection that has ended holds no descriptor, even while its handles live (it kept its two
/// wake-up pipes before).
#[test]
fn an_ended_connection_holds_no_descriptors() {
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
