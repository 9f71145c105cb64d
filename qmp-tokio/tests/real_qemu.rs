//! Against real qemu-storage-daemon processes started by the tests.

use std::time::Duration;

use qmp_testkit::Qsd;
use qmp_tokio::{Client, Disconnect, Error, EventFilter, Options};
use serde_json::{Value, json};

async fn connect(qsd: &Qsd) -> Client {
    qmp_tokio::connect(qsd.socket(), Options::new())
        .await
        .expect("connect")
}

async fn add_null_nodes(client: &Client) {
    for node in ["src", "tgt"] {
        let args = json!({"driver": "null-co", "node-name": node, "size": 67108864});
        assert_eq!(
            client.execute("blockdev-add", args).await.unwrap(),
            json!({})
        );
    }
}

#[tokio::test]
async fn handshake_with_and_without_oob_and_query_version() {
    let qsd = Qsd::start();
    for oob in [true, false] {
        let config = qmp_tokio::Config::builder()
            .enable_oob(oob)
            .build()
            .unwrap();
        let client = qmp_tokio::connect(qsd.socket(), Options::new().config(config))
            .await
            .unwrap();
        assert_eq!(client.oob_enabled(), oob);
        assert!(client.greeting().has_capability("oob"));
        let version = client.execute("query-version", ()).await.unwrap();
        assert_eq!(version["qemu"]["major"], client.greeting().version.major);
        // A monitor serves one client at a time: leave before the next connects.
        client.disconnect().await;
        assert!(matches!(client.closed().await, Disconnect::Local));
    }
}

#[tokio::test]
async fn errors_carry_their_class_and_typed_results_decode() {
    let qsd = Qsd::start();
    let client = connect(&qsd).await;
    let err = client.execute("no-such-command", ()).await.unwrap_err();
    assert!(err.is_qmp_class("CommandNotFound"), "{err}");
    let err = client
        .execute(
            "blockdev-add",
            json!({"driver": "no-such-driver", "node-name": "x"}),
        )
        .await
        .unwrap_err();
    assert!(err.is_qmp_class("GenericError"), "{err}");

    #[derive(serde::Deserialize)]
    struct Version {
        qemu: Triple,
        package: String,
    }
    #[derive(serde::Deserialize)]
    struct Triple {
        major: u64,
    }
    let v: Version = client.execute_as("query-version", ()).await.unwrap();
    assert!(v.qemu.major >= 7);
    assert_eq!(v.package, client.greeting().version.package);
    let wrong: Result<Vec<u8>, _> = client.execute_as("query-version", ()).await;
    assert!(matches!(wrong, Err(Error::Decode(_))));
}

#[tokio::test]
async fn mirror_job_events_seen_by_a_subscription_made_before_the_command() {
    let qsd = Qsd::start();
    let client = connect(&qsd).await;
    add_null_nodes(&client).await;

    let mut job = client.subscribe(EventFilter::names([
        "JOB_STATUS_CHANGE",
        "BLOCK_JOB_READY",
        "BLOCK_JOB_COMPLETED",
    ]));
    let args = json!({"job-id": "job0", "device": "src", "target": "tgt", "sync": "full"});
    client.execute("blockdev-mirror", args).await.unwrap();
    // QEMU sends "created" and "running" before the command's own return: they are queued.
    let mut seen = Vec::new();
    let mut next = async || {
        let e = job.recv_timeout(Duration::from_secs(10)).await.unwrap();
        let d = e.data_value().unwrap();
        format!("{}:{}", e.name, d["status"].as_str().unwrap_or(""))
    };
    seen.push(next().await);
    seen.push(next().await);
    assert_eq!(
        seen,
        ["JOB_STATUS_CHANGE:created", "JOB_STATUS_CHANGE:running"]
    );
    loop {
        let s = next().await;
        seen.push(s.clone());
        if s == "BLOCK_JOB_READY:" {
            break;
        }
    }
    assert!(
        seen.contains(&"JOB_STATUS_CHANGE:ready".to_owned()),
        "{seen:?}"
    );

    let done =
        EventFilter::name("BLOCK_JOB_COMPLETED").data(json!({"device": "job0", "type": "mirror"}));
    let mut completed = client.subscribe(done.clone());
    client
        .execute("job-complete", json!({"id": "job0"}))
        .await
        .unwrap();
    let event = completed
        .wait_for(&done, Duration::from_secs(10))
        .await
        .unwrap();
    assert_eq!(event.data_value().unwrap()["len"], 67108864);
    // The job subscription saw the rest of the job's life too, in order.
    let concluded =
        EventFilter::name("JOB_STATUS_CHANGE").data(json!({"status": "concluded", "id": "job0"}));
    job.wait_for(&concluded, Duration::from_secs(10))
        .await
        .unwrap();
    let gone = job.recv_timeout(Duration::from_secs(10)).await.unwrap();
    assert_eq!(
        gone.data_value().unwrap(),
        json!({"status": "null", "id": "job0"})
    );
    assert!(
        job_status(&mut job).is_none(),
        "nothing after the job is gone"
    );
}

/// Drains what a subscription already holds, without waiting.
fn job_status(sub: &mut qmp_tokio::Subscription) -> Option<String> {
    use futures_util::FutureExt;
    let item = sub.recv().now_or_never()??;
    let e = item.ok()?;
    Some(format!(
        "{}:{}",
        e.name,
        e.data_value().ok()?["status"].as_str().unwrap_or("")
    ))
}

#[tokio::test]
async fn schema_introspection_and_command_lookup() {
    let qsd = Qsd::start();
    let client = connect(&qsd).await;
    let schema = client.schema().await.unwrap();
    let names: Vec<&str> = schema
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|e| e["name"].as_str())
        .collect();
    assert!(names.contains(&"blockdev-mirror"));
    assert!(client.has_command("blockdev-add").await.unwrap());
    assert!(
        !client.has_command("getfd").await.unwrap(),
        "qemu-storage-daemon has no getfd"
    );
    assert!(client.commands().await.unwrap().len() > 20);
}

#[tokio::test]
async fn a_pretty_monitor_works_the_same() {
    let qsd = Qsd::start_pretty();
    let config = qmp_tokio::Config::builder()
        .enable_oob(true)
        .build()
        .unwrap();
    let client = qmp_tokio::connect(qsd.socket(), Options::new().config(config))
        .await
        .unwrap();
    assert!(client.oob_enabled());
    assert!(
        client.execute("query-version", ()).await.unwrap()["qemu"]["major"]
            .as_u64()
            .unwrap()
            >= 7
    );
    add_null_nodes(&client).await;
    let nodes = client.execute("query-named-block-nodes", ()).await.unwrap();
    assert_eq!(nodes.as_array().unwrap().len(), 2);
    let err = client.execute("nope", ()).await.unwrap_err();
    assert!(err.is_qmp_class("CommandNotFound"));
}

#[tokio::test]
async fn accept_mode_qemu_connects_to_us() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("listen.sock");
    let listener = qmp_tokio::Listener::bind(&path).await.unwrap();
    let _qsd = Qsd::connect_to(&path);
    let client = tokio::time::timeout(Duration::from_secs(10), listener.accept(Options::new()))
        .await
        .unwrap()
        .unwrap();
    assert!(client.execute("query-version", ()).await.is_ok());
    drop(listener);
    assert!(!path.exists(), "the listener removes its socket file");
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
            Err(Error::Disconnected(_)) => disconnected += 1,
            other => panic!("{other:?}"),
        }
    }
    let reason = tokio::time::timeout(Duration::from_secs(5), client.closed())
        .await
        .unwrap();
    assert!(
        matches!(reason, Disconnect::PeerClosed | Disconnect::Io(_)),
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
