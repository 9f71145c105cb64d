//! Tokio-specific cases against real qemu-storage-daemon processes (multi-threaded runtime,
//! spawned tasks); the scenarios every adapter shares are in `conformance.rs`.

use std::time::Duration;

use qmp_testkit::Qsd;
use qmp_tokio::{Client, Disconnect, Error, EventFilter, Options};
use serde_json::{Value, json};

async fn connect(qsd: &Qsd) -> Client {
    qmp_tokio::connect(qsd.socket(), Options::new())
        .await
        .expect("connect")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_concurrent_executes_from_fifty_tasks() {
    let qsd = Qsd::start();
    let client = connect(&qsd).await;
    let tasks: Vec<_> = (0..50)
        .map(|t| {
            let client = client.clone();
            tokio::spawn(async move {
                let futures = (0..20).map(|i| {
                    let client = client.clone();
                    async move {
                        if (t + i) % 7 == 0 {
                            client
                                .execute("no-such", ())
                                .await
                                .unwrap_err()
                                .is_qmp_class("CommandNotFound")
                        } else {
                            client.execute("query-version", ()).await.unwrap()["qemu"]["major"]
                                .as_u64()
                                >= Some(7)
                        }
                    }
                });
                futures_util::future::join_all(futures)
                    .await
                    .into_iter()
                    .all(|ok| ok)
            })
        })
        .collect();
    for task in tasks {
        assert!(task.await.unwrap());
    }
}

#[tokio::test]
async fn the_daemon_killed_with_commands_in_flight() {
    let mut qsd = Qsd::start();
    let client = connect(&qsd).await;
    let mut events = client.subscribe(EventFilter::all());
    // Keep commands in flight while the process dies.
    let calls: Vec<_> = (0..200)
        .map(|_| {
            let client = client.clone();
            tokio::spawn(async move {
                client
                    .execute("query-named-block-nodes", json!({"flat": true}))
                    .await
            })
        })
        .collect();
    tokio::task::yield_now().await;
    qsd.kill();
    let mut disconnected = 0;
    for call in calls {
        match call.await.unwrap() {
            Ok(Value::Array(_)) => {}
            Err(Error::Disconnected(Disconnect::PeerClosed { .. })) => disconnected += 1,
            other => panic!("{other:?}"),
        }
    }
    // The daemon answers a few thousand a second: the kill, a moment after the calls started,
    // cuts some off (all 200, in practice).
    assert!(disconnected > 0, "every call was answered before the kill");
    let reason = tokio::time::timeout(Duration::from_secs(5), client.closed())
        .await
        .unwrap();
    assert!(
        matches!(reason, Disconnect::PeerClosed { .. }),
        "{reason:?}"
    );
    assert!(client.is_closed());
    // Subscriptions end; new calls fail at once.
    assert!(
        tokio::time::timeout(Duration::from_secs(5), events.recv())
            .await
            .unwrap()
            .is_none()
    );
    assert!(matches!(
        client.execute("query-version", ()).await,
        Err(Error::Disconnected(_))
    ));
    eprintln!("{disconnected} of 200 calls were cut off");
}
