//! Blocking-specific behaviour; the shared scenarios are in `conformance.rs`.

use std::time::Duration;

use qmp_testkit::Qsd;
use serde_json::json;

#[test]
fn handles_are_shared_across_threads() {
    let qsd = Qsd::start();
    let client = qmp_blocking::connect(qsd.socket(), qmp_blocking::Options::new()).unwrap();
    let threads: Vec<_> = (0..8)
        .map(|_| {
            let c = client.clone();
            std::thread::spawn(move || (0..50).all(|_| c.execute("query-version", ()).is_ok()))
        })
        .collect();
    assert!(threads.into_iter().all(|t| t.join().unwrap()));
    let mut events = client.subscribe(qmp_blocking::EventFilter::name("JOB_STATUS_CHANGE"));
    for node in ["src", "tgt"] {
        client
            .execute(
                "blockdev-add",
                json!({"driver": "null-co", "node-name": node, "size": 1 << 20}),
            )
            .unwrap();
    }
    client
        .execute(
            "blockdev-backup",
            json!({"job-id": "j", "device": "src", "target": "tgt", "sync": "full"}),
        )
        .unwrap();
    let first = events.recv_timeout(Duration::from_secs(10)).unwrap();
    assert_eq!(first.data_value().unwrap()["status"], "created");
    client.disconnect();
    assert!(
        events.by_ref().all(|item| item.is_ok()),
        "the iterator ends after the queued events"
    );
}

/// Regression: a timeout awaited inside a combinator that gives inner futures their own wakers
/// (here `FuturesUnordered`, via `join_all` of many) used to hang under `block_on`, because the
/// sleep never woke its waker.
#[test]
fn timeouts_fire_inside_combinators_under_block_on() {
    let qsd = Qsd::start();
    let client = qmp_blocking::connect(qsd.socket(), qmp_blocking::Options::new()).unwrap();
    let waits = (0..40).map(|_| {
        let c = client.as_async().clone();
        async move {
            c.wait_for(
                qmp_blocking::EventFilter::name("NEVER"),
                Duration::from_millis(100),
            )
            .await
        }
    });
    let started = std::time::Instant::now();
    let results = qmp_blocking::block_on(futures_util::future::join_all(waits));
    assert!(
        results
            .iter()
            .all(|r| matches!(r, Err(qmp_blocking::Error::Timeout)))
    );
    assert!(started.elapsed() < Duration::from_secs(5));
}

/// Regression: many threads hammering one connection used to hit a lost wake-up in the
/// connection thread's poll loop (a wake between clearing its flag and draining its pipe).
#[test]
fn no_lost_wakeups_under_contention() {
    let server = qmp_testkit::FakeServer::start(|c| {
        c.handshake();
        c.serve_forever();
    });
    for _ in 0..20 {
        let client = qmp_blocking::connect(server.path(), qmp_blocking::Options::new()).unwrap();
        let threads: Vec<_> = (0..8)
            .map(|_| {
                let c = client.with_timeout(Duration::from_secs(10));
                std::thread::spawn(move || (0..100).all(|_| c.execute("query-version", ()).is_ok()))
            })
            .collect();
        assert!(threads.into_iter().all(|t| t.join().unwrap()));
    }
}
