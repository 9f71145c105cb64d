//! A call made while no other is under way reads its own reply on the calling thread (it
//! "leads"); the connection's thread stays off the socket meanwhile and takes over again after.
//! These pin what must still hold: replies, events, deadlines and disconnects reach whoever
//! waits, whichever thread happens to be reading.

mod common;

use std::time::{Duration, Instant};

use qmp_blocking::{Error, EventFilter, Options};
use qmp_testkit::FakeServer;
use serde_json::json;

/// Events sent while no call runs, and long after the last one, still arrive: the connection's
/// thread goes back to reading once the leading call is over.
#[test]
fn events_between_and_after_calls_are_delivered() {
    let server = FakeServer::start(|c| {
        c.handshake();
        while let Some(r) = c.recv() {
            c.reply(&r.command, json!({}));
            std::thread::sleep(Duration::from_millis(30));
            c.event("AFTER", json!({ "n": r.arguments()["n"].clone() }));
        }
    });
    let client = qmp_blocking::connect(server.path(), Options::new()).unwrap();
    let mut events = client.subscribe(EventFilter::name("AFTER"));
    for n in 0..20 {
        client.execute("x", json!({ "n": n })).unwrap();
        // Nobody calls now: only the connection's thread can read this event.
        let event = events.recv_timeout(Duration::from_secs(5)).unwrap();
        assert_eq!(event.data_value().unwrap()["n"], n);
    }
    client.disconnect();
    server.check();
}

/// A leading call's deadline fires on time although it is the one reading the socket, and the
/// late reply, when it comes, goes nowhere: the next call gets its own.
#[test]
fn a_leading_call_times_out_and_the_late_reply_is_dropped() {
    let server = FakeServer::start(|c| {
        c.handshake();
        let slow = c.expect("slow");
        let next = c.expect("next");
        c.reply(&slow.command, json!("late"));
        c.reply(&next.command, json!("next"));
    });
    let client = qmp_blocking::connect(server.path(), Options::new()).unwrap();
    let started = Instant::now();
    let quick = client.with_timeout(Duration::from_millis(200));
    assert!(matches!(quick.execute("slow", ()), Err(Error::Timeout)));
    let took = started.elapsed();
    assert!(took >= Duration::from_millis(200), "{took:?}");
    assert!(took < Duration::from_secs(3), "{took:?}");
    assert_eq!(client.execute("next", ()).unwrap(), json!("next"));
    client.disconnect();
    server.check();
}

/// The server going away while a call leads fails that call at once, with the reason.
#[test]
fn a_leading_call_sees_the_server_go_away() {
    let server = FakeServer::start(|c| {
        c.handshake();
        c.expect("hang-up");
        std::thread::sleep(Duration::from_millis(100));
        c.close();
    });
    let client = qmp_blocking::connect(server.path(), Options::new()).unwrap();
    let started = Instant::now();
    let got = client.execute("hang-up", ());
    assert!(matches!(got, Err(Error::Disconnected(_))), "{got:?}");
    assert!(started.elapsed() < Duration::from_secs(5));
    server.check();
}

/// Calls that start while another leads wait on the connection's thread machinery; their replies
/// arrive while the leader still waits, and after it has left.
#[test]
fn calls_joining_a_leading_call_get_their_replies() {
    let server = FakeServer::start(|c| {
        c.handshake();
        let slow = c.expect("slow");
        // Answer the others first, then the leader, then the rest.
        let mut answered = 0;
        while let Some(r) = c.recv() {
            c.reply(&r.command, r.arguments()["echo"].clone());
            answered += 1;
            if answered == 10 {
                c.reply(&slow.command, json!("slow"));
            }
        }
    });
    let client = qmp_blocking::connect(server.path(), Options::new()).unwrap();
    let leader = {
        let c = client.clone();
        std::thread::spawn(move || c.execute("slow", ()))
    };
    std::thread::sleep(Duration::from_millis(100));
    let joiners: Vec<_> = (0..4u64)
        .map(|t| {
            let c = client.with_timeout(Duration::from_secs(10));
            std::thread::spawn(move || {
                for i in 0..25u64 {
                    let echo = t * 100 + i;
                    assert_eq!(
                        c.execute("echo", json!({ "echo": echo })).unwrap(),
                        json!(echo)
                    );
                }
            })
        })
        .collect();
    for j in joiners {
        j.join().unwrap();
    }
    assert_eq!(leader.join().unwrap().unwrap(), json!("slow"));
    client.disconnect();
    server.check();
}

/// Many short calls from one thread, each leading, with events and replies interleaved at
/// random: every reply is the call's own and every event arrives.
#[test]
fn sequential_leading_calls_with_events_interleaved() {
    let server = FakeServer::start(|c| {
        c.handshake();
        let mut n = 0u64;
        while let Some(r) = c.recv() {
            n += 1;
            if n.is_multiple_of(3) {
                c.event("TICK", json!({ "n": n }));
            }
            c.reply(&r.command, r.arguments()["echo"].clone());
            if n.is_multiple_of(5) {
                c.event("TOCK", json!({ "n": n }));
            }
        }
    });
    // Room for every event: this test reads them only at the end.
    let options = Options::new().event_buffer(4096);
    let client = qmp_blocking::connect(server.path(), options).unwrap();
    let mut events = client.subscribe(EventFilter::all());
    for i in 0..3000u64 {
        assert_eq!(
            client.execute("echo", json!({ "echo": i })).unwrap(),
            json!(i)
        );
    }
    let mut seen = 0;
    while seen < 3000 / 3 + 3000 / 5 {
        events.recv_timeout(Duration::from_secs(5)).unwrap();
        seen += 1;
    }
    client.disconnect();
    server.check();
}

/// `Client::block_on` drives the connection from the calling thread: many commands in flight
/// from one thread, a deadline among them, and another thread's calls served meanwhile.
#[test]
fn block_on_drives_many_calls_and_serves_other_threads() {
    use futures_util::stream::{self, StreamExt};
    let server = FakeServer::start(|c| {
        c.handshake();
        let mut held = Vec::new();
        while let Some(r) = c.recv() {
            if r.name() == "never" {
                held.push(r);
                continue;
            }
            c.reply(&r.command, r.arguments()["echo"].clone());
        }
    });
    let client = qmp_blocking::connect(server.path(), Options::new()).unwrap();
    let other = {
        let c = client.with_timeout(Duration::from_secs(10));
        std::thread::spawn(move || {
            for i in 0..200u64 {
                let echo = 100_000 + i;
                assert_eq!(
                    c.execute("echo", json!({ "echo": echo })).unwrap(),
                    json!(echo)
                );
            }
        })
    };
    let a = client.as_async().clone();
    let short = a.with_timeout(Duration::from_millis(100));
    let (results, never) = client.block_on(async {
        let calls = stream::iter(0..2000u64)
            .map(|i| {
                let a = a.clone();
                async move { (i, a.execute("echo", json!({ "echo": i })).await) }
            })
            .buffer_unordered(32)
            .collect::<Vec<_>>();
        futures_util::join!(calls, short.execute("never", ()))
    });
    assert_eq!(results.len(), 2000);
    for (i, r) in results {
        assert_eq!(r.unwrap(), json!(i));
    }
    assert!(matches!(never, Err(Error::Timeout)), "{never:?}");
    other.join().unwrap();
    client.disconnect();
    server.check();
}

/// The blocking API itself (not `as_async`) against real peers, where each call leads:
/// qemu-storage-daemon round trips, an error, the mirror job's events through a subscription;
/// and qemu-ga calls, including one that times out and the resync after it.
#[test]
fn leading_calls_against_real_qemu_and_qemu_ga() {
    // Generous deadlines: a call that never completes fails here, naming itself, instead of
    // hanging the suite.
    let options = || Options::new().timeout(Duration::from_secs(30));
    let qsd = qmp_testkit::Qsd::start();
    let client = qmp_blocking::connect(qsd.socket(), options()).unwrap();
    for _ in 0..200 {
        let v = client.execute("query-version", ()).unwrap();
        assert!(v["qemu"]["major"].as_u64().is_some());
    }
    let err = client.execute("no-such-command", ()).unwrap_err();
    assert!(err.is_qmp_class("CommandNotFound"), "{err:?}");
    let mut jobs = client.subscribe(EventFilter::name("JOB_STATUS_CHANGE"));
    common::start_null_job(&client, "blockdev-mirror");
    let mut record_until = |statuses: &mut Vec<String>, status: &str| {
        while statuses.last().map(String::as_str) != Some(status) {
            let e = jobs.recv_timeout(Duration::from_secs(10)).unwrap();
            statuses.push(
                e.data_value().unwrap()["status"]
                    .as_str()
                    .unwrap()
                    .to_owned(),
            );
        }
    };
    let mut statuses = Vec::new();
    record_until(&mut statuses, "ready");
    assert_eq!(statuses[..2], ["created", "running"]);
    client.execute("job-complete", json!({"id": "j"})).unwrap();
    record_until(&mut statuses, "null");
    client.disconnect();

    let qga = qmp_testkit::QemuGa::start();
    let agent = qmp_blocking::connect_guest_agent(qga.socket(), options()).unwrap();
    for _ in 0..50 {
        assert_eq!(agent.execute("guest-ping", ()).unwrap(), json!({}));
    }
    // A 1 ms deadline: usually missed (the client then resyncs with the agent), sometimes met.
    // Either way it ends on time, and the next call gets its own answer.
    let started = Instant::now();
    let quick = agent.with_timeout(Duration::from_millis(1));
    match quick.execute("guest-info", ()) {
        Err(Error::Timeout) | Ok(_) => {}
        Err(e) => panic!("{e}"),
    }
    assert!(started.elapsed() < Duration::from_secs(5));
    assert_eq!(
        agent
            .with_timeout(Duration::from_secs(10))
            .execute("guest-ping", ())
            .unwrap(),
        json!({})
    );
    agent.disconnect();
}

/// Blocking calls made from inside `Client::block_on` (a blocking call in async code: a mistake,
/// but one that must not deadlock): on the same connection, through a nested `block_on`, and on
/// another connection; the outer future's own calls still complete.
#[test]
fn blocking_calls_nested_in_block_on_do_not_deadlock() {
    let server = FakeServer::start(|c| {
        c.handshake();
        c.serve_echo();
    });
    let options = || Options::new().timeout(Duration::from_secs(10));
    let client = qmp_blocking::connect(server.path(), options()).unwrap();
    let other = qmp_blocking::connect(server.path(), options()).unwrap();
    let got = client.block_on(async {
        let first = client
            .as_async()
            .execute("echo", json!({ "echo": 1 }))
            .await
            .unwrap();
        let nested = client.execute("echo", json!({ "echo": 2 })).unwrap();
        let twice = client.block_on(async {
            client
                .as_async()
                .execute("echo", json!({ "echo": 3 }))
                .await
                .unwrap()
        });
        let elsewhere = other.execute("echo", json!({ "echo": 4 })).unwrap();
        let last = client
            .as_async()
            .execute("echo", json!({ "echo": 5 }))
            .await
            .unwrap();
        [first, nested, twice, elsewhere, last]
    });
    assert_eq!(got, [json!(1), json!(2), json!(3), json!(4), json!(5)]);
    // And the connection is still driven properly afterwards.
    for i in 0..100 {
        assert_eq!(
            client.execute("echo", json!({ "echo": i })).unwrap(),
            json!(i)
        );
    }
    client.disconnect();
    other.disconnect();
    server.check();
}

/// A future that panics inside `Client::block_on` leaves the connection working.
#[test]
fn a_panic_inside_block_on_leaves_the_connection_working() {
    let server = FakeServer::start(|c| {
        c.handshake();
        c.serve_echo();
    });
    let client = qmp_blocking::connect(server.path(), Options::new()).unwrap();
    let panicked = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        client.block_on(async {
            client
                .as_async()
                .execute("echo", json!({ "echo": 1 }))
                .await
                .unwrap();
            panic!("user code");
        })
    }));
    assert!(panicked.is_err());
    // From another thread (the connection's thread must read for it) and from this one.
    let c = client.with_timeout(Duration::from_secs(10));
    let t = std::thread::spawn(move || c.execute("echo", json!({ "echo": 2 })).unwrap());
    assert_eq!(t.join().unwrap(), json!(2));
    assert_eq!(
        client.execute("echo", json!({ "echo": 3 })).unwrap(),
        json!(3)
    );
    client.disconnect();
    server.check();
}
