//! How blocking calls wait, found in review: a wake while a nested `block_on` runs, and a spawner
//! in the options.

use std::sync::mpsc;
use std::time::Duration;

use futures_channel::oneshot;
use qmp_blocking::{EventFilter, Options};
use qmp_testkit::FakeServer;
use serde_json::json;

/// Runs `f` on a thread of its own: `None` if it has not returned within `limit` (it hung).
fn within<T: Send + 'static>(limit: Duration, f: impl FnOnce() -> T + Send + 'static) -> Option<T> {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(f());
    });
    rx.recv_timeout(limit).ok()
}

/// A future run by `block_on` makes a blocking call (a nested `block_on`) in one branch, while
/// another branch is woken: the thread's park token that wake left is consumed by the nested
/// loop, so the outer one must go by its own flag (it slept forever before).
#[test]
fn a_wake_during_a_nested_block_on_is_not_lost() {
    let got = within(Duration::from_secs(5), || {
        let (tx, rx) = oneshot::channel::<u32>();
        let (tx2, rx2) = oneshot::channel::<()>();
        std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(100));
            let _ = tx.send(7);
            std::thread::sleep(Duration::from_millis(200));
            let _ = tx2.send(());
        });
        qmp_blocking::block_on(async {
            let (a, ()) = futures_util::join!(rx, async {
                qmp_blocking::block_on(rx2).expect("sent");
            });
            a.expect("sent")
        })
    });
    assert_eq!(got, Some(7), "block_on hung: the wake was lost");
}

/// The same through a client: `Client::block_on` while another thread's call leads the
/// connection, awaiting an event in one branch and waiting for another subscription with a
/// blocking `recv_timeout` in the other. The event arrives during the blocking wait.
#[test]
fn client_block_on_sees_an_event_that_arrives_during_a_nested_blocking_wait() {
    let server = FakeServer::start(|c| {
        c.handshake();
        while let Some(r) = c.recv() {
            if r.name() == "slow" {
                std::thread::sleep(Duration::from_millis(100));
                c.event("E", json!({}));
                std::thread::sleep(Duration::from_millis(1500));
            }
            c.reply(&r.command, json!({}));
        }
    });
    let client = qmp_blocking::connect(server.path(), Options::new()).expect("connect");
    let other = client.clone();
    let mut sub = client.subscribe(EventFilter::name("E"));
    let mut quiet = client.subscribe(EventFilter::name("NEVER"));
    let slow = std::thread::spawn(move || other.execute("slow", ()).expect("slow"));
    std::thread::sleep(Duration::from_millis(30));
    let got = within(Duration::from_secs(6), move || {
        client.block_on(async {
            let (event, _) = futures_util::join!(sub.as_async().recv(), async {
                quiet.recv_timeout(Duration::from_millis(400))
            });
            event.map(|e| e.map(|e| e.name))
        })
    });
    slow.join().expect("slow call");
    assert!(
        matches!(&got, Some(Some(Ok(n))) if n == "E"),
        "hung: {got:?}"
    );
}

/// A spawner is for async executors; the blocking client runs its connection its own way and
/// ignores it (every connect timed out before).
#[test]
fn a_spawner_in_the_options_is_ignored() {
    let server = FakeServer::start(|c| {
        c.handshake();
        c.serve_echo();
    });
    let path = server.path().to_owned();
    let got = within(Duration::from_secs(5), move || {
        let options = Options::new()
            .connect_timeout(Duration::from_secs(3))
            .spawner(|task| {
                std::thread::spawn(move || qmp_blocking::block_on(task));
            });
        let client = qmp_blocking::connect(&path, options)?;
        client.execute("x", json!({"echo": 1}))
    });
    assert!(matches!(&got, Some(Ok(v)) if *v == json!(1)), "{got:?}");
}
