//! Conformance scenarios: events. None is lost from the greeting on (the first subscription gets
//! what came before it), a subscriber that keeps reading loses nothing in a burst, and one that
//! stops reading holds replies up for [`Options::lag_after`] at most, with memory bounded.
//!
//! The races these guard against showed up in a few runs of ten, so the racy ones repeat inside
//! the scenario; `qmp-tokio` also runs them on a multi-thread runtime. Counts are exact.

use std::time::Instant;

use qmp_client::Subscription;

use super::*;

/// Runs the events scenarios on an adapter: `events_conformance!(ADAPTER)`, for adapters that
/// run only these (the multi-thread tokio runtime); [`conformance!`](crate::conformance) runs
/// them too.
#[macro_export]
macro_rules! events_conformance {
    ($adapter:expr) => {
        $crate::conformance!(@tests $adapter;
            fake_events_with_negotiation_reply, fake_event_flood_from_connect,
            fake_event_burst_reader_keeps_up, fake_event_stuck_subscriber_lags,
            fake_event_stuck_subscriber_bounded, fake_event_stuck_subscriber_close,
            fake_event_flood_never_subscribed,
            qemu_events_before_first_subscribe);
    };
}

/// How many times the racy scenarios repeat.
const ROUNDS: usize = 5;

/// An event's bytes as QEMU writes them, to put several messages in one write.
fn event_bytes(name: &str, i: u64) -> Vec<u8> {
    let event = json!({"timestamp": {"seconds": 1795648047, "microseconds": 84562},
        "event": name, "data": {"i": i}});
    format!("{event}\r\n").into_bytes()
}

/// The number an event carries in `data.i`.
fn index(event: &qmp_client::Event) -> u64 {
    event.data_value().expect("data")["i"].as_u64().expect("i")
}

/// Reads exactly `n` events from `sub`, in order from 0, with no `Lagged` between them.
async fn all_in_order(sub: &mut Subscription, n: u64, what: &str) {
    for want in 0..n {
        match sub.recv().await {
            Some(Ok(e)) => assert_eq!(index(&e), want, "{what}: out of order"),
            other => panic!("{what}: event {want} of {n}: {other:?}"),
        }
    }
}

/// Events in the same write as the `qmp_capabilities` reply, and one sent right after
/// negotiation, reach the first subscription, made once `connect` returns. They were dropped:
/// nobody could subscribe before the driver had published them.
pub async fn fake_events_with_negotiation_reply(a: &'static dyn Adapter) {
    let server = FakeServer::start(|c| {
        c.greet(true);
        let caps = c.expect("qmp_capabilities");
        let reply = format!("{{\"return\": {{}}, \"id\": {}}}\r\n", caps.command["id"]);
        let mut bytes = reply.into_bytes();
        for i in 0..3 {
            bytes.extend(event_bytes("EARLY", i));
        }
        c.send_raw(&bytes);
        c.event("EARLY", json!({"i": 3}));
        c.serve_forever();
    });
    for round in 0..ROUNDS * 2 {
        let client = connect(a, &server).await;
        let mut events = client.subscribe(EventFilter::all());
        let early = timeout(
            a,
            Duration::from_secs(30),
            all_in_order(&mut events, 4, "early events"),
        );
        early
            .await
            .unwrap_or_else(|| panic!("round {round}: the early events never came"));
        client.disconnect().await;
    }
}

/// A flood that starts as the client connects: a subscription made right after `connect` gets
/// every event, in order, with no `Lagged` (the driver keeps the backlog, and then waits for the
/// subscriber, instead of dropping).
pub async fn fake_event_flood_from_connect(a: &'static dyn Adapter) {
    const N: u64 = 20_000;
    let server = FakeServer::start(|c| {
        c.handshake();
        for i in 0..N {
            c.event("TICK", json!({"i": i}));
        }
        c.serve_forever();
    });
    for round in 0..ROUNDS {
        let client = connect(a, &server).await;
        let mut ticks = client.subscribe(EventFilter::name("TICK"));
        timeout(
            a,
            Duration::from_secs(60),
            all_in_order(&mut ticks, N, "flood"),
        )
        .await
        .unwrap_or_else(|| panic!("round {round}: the flood stalled"));
        client.disconnect().await;
    }
}

/// A subscriber reading in a tight loop gets every event of a long burst, with the default
/// options (it got `Lagged` after a thousand or two on a multi-thread runtime: the driver never
/// waited for it).
pub async fn fake_event_burst_reader_keeps_up(a: &'static dyn Adapter) {
    const N: u64 = 100_000;
    let server = FakeServer::start(|c| {
        c.handshake();
        while let Some(go) = c.recv() {
            for i in 0..N {
                c.event("TICK", json!({"i": i}));
            }
            c.reply(&go.command, json!({}));
        }
    });
    let client = connect(a, &server).await;
    for round in 0..ROUNDS {
        let mut ticks = client.subscribe(EventFilter::name("TICK"));
        let patient = client.with_timeout(Duration::from_secs(60));
        let burst = patient.execute("burst", ());
        let read = all_in_order(&mut ticks, N, "burst");
        let (burst, ()) = futures_util::join!(burst, read);
        burst.unwrap_or_else(|e| panic!("round {round}: {e:?}"));
    }
}

/// A subscriber that stops reading, with the default options: a command's reply behind a flood
/// still comes, after the one wait for it ([`Options::lag_after`], 1 s); a subscriber that keeps
/// reading meanwhile gets every event; the stuck one gets what its queue held, then `Lagged` with
/// the exact count of the rest.
pub async fn fake_event_stuck_subscriber_lags(a: &'static dyn Adapter) {
    const N: u64 = 20_000;
    const QUEUED: u64 = 1024;
    let server = FakeServer::start(|c| {
        c.handshake();
        while let Some(go) = c.recv() {
            for i in 0..N {
                c.event("TICK", json!({"i": i}));
            }
            c.reply(&go.command, json!({}));
        }
    });
    let client = connect(a, &server).await;
    for round in 0..2 {
        let mut stuck = client.subscribe(EventFilter::name("TICK"));
        let mut eager = client.subscribe(EventFilter::name("TICK"));
        let started = Instant::now();
        let patient = client.with_timeout(Duration::from_secs(30));
        let flood = patient.execute("flood", ());
        let (flood, ()) = futures_util::join!(flood, all_in_order(&mut eager, N, "eager"));
        flood.unwrap_or_else(|e| panic!("round {round}: {e:?}"));
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "round {round}: the reply took {:?}",
            started.elapsed()
        );
        all_in_order(&mut stuck, QUEUED, "stuck").await;
        let lag = stuck.recv().await;
        assert!(
            matches!(lag, Some(Err(qmp_client::Lagged { missed })) if missed == N - QUEUED),
            "round {round}: {lag:?}"
        );
    }
}

/// A subscriber that stops reading, with a long [`Options::lag_after`]: the connection stops
/// reading from the peer (the fake server's writes block) after a bounded number of events
/// instead of buffering the flood; once the subscription is dropped, the flood and the reply
/// behind it go through.
pub async fn fake_event_stuck_subscriber_bounded(a: &'static dyn Adapter) {
    const N: u64 = 200_000;
    let (tx, rx) = mpsc::channel::<u64>();
    let tx = Mutex::new(tx);
    let server = FakeServer::start(move |c| {
        c.handshake();
        let go = c.expect("flood");
        let mut reported = false;
        for i in 0..N {
            if !reported && !writable_within(c, Duration::from_millis(300)) {
                // The client stopped reading: tell how far it got.
                tx.lock().expect("tx").send(i).expect("report");
                reported = true;
            }
            c.event("TICK", json!({"i": i}));
        }
        c.reply(&go.command, json!({}));
        c.serve_forever();
    });
    let client = a
        .connect(
            server.path().into(),
            Options::new().lag_after(Duration::from_secs(120)),
        )
        .await
        .expect("connect");
    let stuck = client.subscribe(EventFilter::all());
    let patient = client.with_timeout(Duration::from_secs(60));
    let flood = patient.execute("flood", ());
    let unstick = async {
        let sent = recv(a, rx).await;
        // What the client holds: the subscriber's queue (1024), the core's outputs (1024), a read
        // (64 KiB, ~650 events) and the socket's buffers (a few hundred KiB). Reading on
        // unbounded, it took all 200,000.
        assert!(sent < 20_000, "the client read {sent} events");
        drop(stuck);
        Instant::now()
    };
    let (flood, unstuck) = futures_util::join!(flood, unstick);
    flood.expect("flood");
    assert!(
        unstuck.elapsed() < Duration::from_secs(20),
        "the reply took {:?} once the subscriber was gone",
        unstuck.elapsed()
    );
}

/// With [`Options::lag_after`] "for ever", a subscriber that stops reading holds replies until
/// it reads, but not the close: `disconnect` waits 2 s for it at most, and the subscription ends
/// after what it had queued.
pub async fn fake_event_stuck_subscriber_close(a: &'static dyn Adapter) {
    let server = FakeServer::start(|c| {
        c.handshake();
        for i in 0..100 {
            c.event("TICK", json!({"i": i}));
        }
        c.serve_forever();
    });
    let client = a
        .connect(
            server.path().into(),
            Options::new().event_buffer(4).lag_after(Duration::MAX),
        )
        .await
        .expect("connect");
    let mut stuck = client.subscribe(EventFilter::all());
    // Held behind the events (a command's own timeout would be too: the driver dispatches
    // nothing meanwhile).
    let held = timeout(
        a,
        Duration::from_millis(500),
        client.execute("query-status", ()),
    )
    .await;
    assert!(held.is_none(), "{held:?}");
    let started = Instant::now();
    timeout(a, Duration::from_secs(30), client.disconnect())
        .await
        .expect("the close was held up");
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "closing took {:?}",
        started.elapsed()
    );
    all_in_order(&mut stuck, 4, "stuck").await;
    let rest = timeout(a, Duration::from_secs(30), async {
        let mut missed = 0;
        loop {
            match stuck.recv().await {
                Some(Err(lag)) => missed += lag.missed,
                Some(Ok(e)) => panic!("an event after the queue was full: {e:?}"),
                None => return missed,
            }
        }
    });
    let missed = rest.await.expect("the subscription never ended");
    assert!(missed > 0 && missed <= 96, "missed {missed}");
}

/// Whether the fake server's socket takes more bytes within `wait`.
fn writable_within(c: &mut ServerConn, wait: Duration) -> bool {
    use rustix::event::{PollFd, PollFlags, Timespec};
    let timeout = Timespec {
        tv_sec: wait.as_secs() as i64,
        tv_nsec: i64::from(wait.subsec_nanos()),
    };
    let mut fds = [PollFd::new(c.stream(), PollFlags::OUT)];
    !matches!(rustix::event::poll(&mut fds, Some(&timeout)), Ok(0))
}

/// A client that never subscribes, flooded from connect on: its command's reply still comes
/// (after the backlog's one wait, [`Options::lag_after`] from connect), and a subscription made
/// later gets the backlog (the first `event_buffer` events) and how many were dropped after it.
pub async fn fake_event_flood_never_subscribed(a: &'static dyn Adapter) {
    const N: u64 = 20_000;
    const KEPT: u64 = 1024;
    let server = FakeServer::start(|c| {
        c.handshake();
        for i in 0..N {
            c.event("TICK", json!({"i": i}));
        }
        c.serve_forever();
    });
    let client = connect(a, &server).await;
    let started = Instant::now();
    client
        .with_timeout(Duration::from_secs(30))
        .execute("query-status", ())
        .await
        .expect("query-status");
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "the reply took {:?}",
        started.elapsed()
    );
    let mut late = client.subscribe(EventFilter::all());
    let backlog = async {
        all_in_order(&mut late, KEPT, "backlog").await;
        late.recv().await
    };
    let lag = timeout(a, Duration::from_secs(30), backlog)
        .await
        .expect("the backlog never came");
    assert!(
        matches!(lag, Some(Err(qmp_client::Lagged { missed })) if missed == N - KEPT),
        "{lag:?}"
    );
    let more = late.recv_timeout(Duration::from_millis(200)).await;
    assert!(matches!(more, Err(Error::Timeout)), "{more:?}");
}

/// Real QEMU: events sent between a client's handshake and its first subscription (a job another
/// client runs, on a second monitor) reach that subscription, in order.
pub async fn qemu_events_before_first_subscribe(a: &'static dyn Adapter) {
    let qsd = Qsd::start_monitors(2);
    let mut sockets = qsd.sockets();
    let (actor_at, watcher_at) = (
        sockets.next().expect("monitor 0"),
        sockets.next().expect("monitor 1"),
    );
    let watcher = a
        .connect(watcher_at.into(), Options::new())
        .await
        .expect("watcher");
    let actor = a
        .connect(actor_at.into(), Options::new())
        .await
        .expect("actor");
    for node in ["src", "tgt"] {
        let args = json!({"driver": "null-co", "node-name": node, "size": 67108864});
        actor
            .execute("blockdev-add", args)
            .await
            .expect("blockdev-add");
    }
    let ready = EventFilter::name("BLOCK_JOB_READY");
    let mut actor_ready = actor.subscribe(ready.clone());
    let args = json!({"job-id": "job0", "device": "src", "target": "tgt", "sync": "full"});
    actor
        .execute("blockdev-mirror", args)
        .await
        .expect("blockdev-mirror");
    actor_ready
        .wait_for(&ready, Duration::from_secs(10))
        .await
        .expect("ready");
    // The watcher's events are all in by now: QEMU sends each event to every monitor at once,
    // and the watcher's connection read them meanwhile.
    a.sleep(Duration::from_millis(200)).await;
    let mut watched =
        watcher.subscribe(EventFilter::names(["JOB_STATUS_CHANGE", "BLOCK_JOB_READY"]));
    let mut seen = Vec::new();
    for _ in 0..4 {
        let e = watched
            .recv_timeout(Duration::from_secs(10))
            .await
            .unwrap_or_else(|e| panic!("after {seen:?}: {e:?}"));
        let status = e.data_value().expect("data")["status"]
            .as_str()
            .unwrap_or("")
            .to_owned();
        seen.push(format!("{}:{status}", e.name));
    }
    assert_eq!(
        seen,
        [
            "JOB_STATUS_CHANGE:created",
            "JOB_STATUS_CHANGE:running",
            "JOB_STATUS_CHANGE:ready",
            "BLOCK_JOB_READY:"
        ]
    );
    actor
        .execute("job-complete", json!({"id": "job0"}))
        .await
        .expect("job-complete");
}
