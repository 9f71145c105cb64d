//! Blocking-specific behaviour; the shared scenarios are in `conformance.rs`.

mod common;

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
    common::start_null_job(&client, "blockdev-backup");
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

/// Calls write their own commands (`Shared::assist`) while the connection's thread reads: many
/// threads, each reply checked against its own command, some calls timing out on a server that
/// answers late and out of order, events arriving throughout. Nothing is lost, mixed up or stuck.
#[test]
fn calls_writing_their_own_commands_stay_correct_under_contention() {
    use serde_json::Value;
    let server = qmp_testkit::FakeServer::start(|c| {
        c.handshake();
        let mut held = Vec::new();
        let mut n = 0u64;
        while let Some(r) = c.recv() {
            n += 1;
            if n.is_multiple_of(7) {
                c.event("TICK", json!({ "n": n }));
            }
            let echo = r.arguments()["echo"].clone();
            if r.name() == "slow" {
                // Answered only after the next few commands, and so after its caller gave up.
                held.push(r.command);
                continue;
            }
            c.reply(&r.command, echo);
            if held.len() >= 3 {
                for cmd in held.drain(..) {
                    c.reply(&cmd, json!("late"));
                }
            }
        }
    });
    let client = qmp_blocking::connect(server.path(), qmp_blocking::Options::new()).unwrap();
    let mut ticks = client.subscribe(qmp_blocking::EventFilter::name("TICK"));
    let threads: Vec<_> = (0..12u64)
        .map(|t| {
            let c = client.with_timeout(Duration::from_secs(10));
            std::thread::spawn(move || {
                for i in 0..300u64 {
                    let echo = t * 1000 + i;
                    if i % 50 == 7 {
                        let quick = c.with_timeout(Duration::from_millis(5));
                        // Usually too late; if the others' slow calls release it in time, it
                        // must still be this call's own reply.
                        match quick.execute("slow", json!({ "echo": echo })) {
                            Err(qmp_blocking::Error::Timeout) => {}
                            Ok(v) => assert_eq!(v, json!("late")),
                            Err(e) => panic!("{e}"),
                        }
                        continue;
                    }
                    let got: Value = c.execute("echo", json!({ "echo": echo })).unwrap();
                    assert_eq!(got, json!(echo), "thread {t} call {i} got another's reply");
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    let mut seen = 0;
    while let Ok(event) = ticks.recv_timeout(Duration::from_millis(200)) {
        assert_eq!(event.name, "TICK");
        seen += 1;
    }
    // 12 × 300 commands, an event before every 7th reply.
    assert_eq!(seen, 12 * 300 / 7);
    client.disconnect();
    server.check();
}

/// A guest-agent handle's calls take the same path.
#[test]
fn guest_agent_calls_from_many_threads() {
    let server = qmp_testkit::FakeServer::start(|c| {
        c.agent_sync();
        while let Some(r) = c.recv() {
            // An old agent: no id echoed, so only the order matches replies to commands.
            let echo = r.arguments()["echo"].clone();
            c.send(&json!({ "return": echo }));
        }
    });
    let agent =
        qmp_blocking::connect_guest_agent(server.path(), qmp_blocking::Options::new()).unwrap();
    let threads: Vec<_> = (0..6u64)
        .map(|t| {
            let a = agent.with_timeout(Duration::from_secs(10));
            std::thread::spawn(move || {
                (0..100u64).all(|i| {
                    let echo = t * 1000 + i;
                    a.execute("echo", json!({ "echo": echo })).unwrap() == json!(echo)
                })
            })
        })
        .collect();
    assert!(threads.into_iter().all(|t| t.join().unwrap()));
    agent.disconnect();
    server.check();
}

type Parked = std::pin::Pin<Box<dyn Future<Output = ()> + Send>>;

/// A waker that drops the future it holds when woken, as an executor does once the task that
/// waited is gone.
struct DropOnWake(std::sync::Mutex<Option<Parked>>);

impl std::task::Wake for DropOnWake {
    fn wake(self: std::sync::Arc<Self>) {
        self.0.lock().unwrap().take();
    }
}

/// A timer whose waker, woken, drops the sleeping future (which then forgets its timer) does not
/// stop the timers: the timer thread used to wake under its own lock, and deadlocked on it.
#[test]
fn a_wake_that_drops_a_sleeping_future_does_not_stop_the_timers() {
    let server = qmp_testkit::FakeServer::start(|c| {
        c.handshake();
        c.serve_forever();
    });
    let client = qmp_blocking::connect(server.path(), qmp_blocking::Options::new()).unwrap();
    let inner = client.as_async().clone();
    let mut sleeping: Parked = Box::pin(async move {
        let _ = inner
            .wait_for(
                qmp_blocking::EventFilter::name("NEVER"),
                Duration::from_millis(50),
            )
            .await;
    });
    let holder = std::sync::Arc::new(DropOnWake(std::sync::Mutex::new(None)));
    let waker = std::task::Waker::from(std::sync::Arc::clone(&holder));
    let poll = sleeping
        .as_mut()
        .poll(&mut std::task::Context::from_waker(&waker));
    assert!(poll.is_pending());
    *holder.0.lock().unwrap() = Some(sleeping);
    drop(waker);

    // In 50 ms the timer thread wakes it; the timers must go on working after that.
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(200));
        let waited = client.wait_for(
            qmp_blocking::EventFilter::name("NEVER"),
            Duration::from_millis(100),
        );
        let _ = tx.send(matches!(waited, Err(qmp_blocking::Error::Timeout)));
    });
    assert!(
        rx.recv_timeout(Duration::from_secs(10))
            .expect("the timers stopped"),
        "the wait did not time out"
    );
}

/// Dropping a listener removes its own socket file only: after the usual restart (remove the
/// stale path, bind a new listener there), dropping the old one leaves the new one's file alone.
#[test]
fn dropping_an_old_listener_leaves_a_newer_listeners_socket() {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("qmp.sock");
    let old = qmp_blocking::Listener::bind(&path).expect("bind");
    std::fs::remove_file(&path).expect("remove the stale path");
    let new = qmp_blocking::Listener::bind(&path).expect("bind again");
    drop(old);
    assert!(path.exists(), "the new listener's socket file is gone");
    drop(new);
    assert!(!path.exists(), "a listener removes its own socket file");
}
