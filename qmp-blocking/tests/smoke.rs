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
