//! A subscription dropped while the connection's task refreshes its copy of the subscriber list
//! is forgotten all the same (found in review: the refresh used to record a generation read after
//! the list, missing a drop in between, so the dropped filter ran on and leaked what it held).

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::mpsc::{Receiver, Sender, channel};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use qmp_tokio::{EventFilter, Options};
use serde_json::json;

/// Captured by a predicate: dropped by the driver when it refreshes its view
/// after the subscription went away. Holds that refresh until told to go on.
struct SlowDrop {
    started: Mutex<Sender<()>>,
    go: Mutex<Receiver<()>>,
}

impl Drop for SlowDrop {
    fn drop(&mut self) {
        let _ = self.started.lock().unwrap().send(());
        let _ = self.go.lock().unwrap().recv_timeout(Duration::from_secs(5));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subscription_dropped_during_a_view_refresh_is_forgotten() {
    let (_server, client) = emitting_client().await;

    let (started_tx, started_rx) = channel();
    let (go_tx, go_rx) = channel();
    let slow_state = SlowDrop {
        started: Mutex::new(started_tx),
        go: Mutex::new(go_rx),
    };
    let slow = client.subscribe(EventFilter::name("NEVER").predicate(move |_| {
        let _ = &slow_state;
        false
    }));

    let token = Arc::new(());
    let alive = Arc::downgrade(&token);
    let checking = Arc::new(AtomicBool::new(false));
    let late_calls = Arc::new(AtomicUsize::new(0));
    let x = client.subscribe(EventFilter::name("E").predicate({
        let (checking, late_calls) = (checking.clone(), late_calls.clone());
        move |_| {
            let _ = &token;
            if checking.load(Ordering::SeqCst) {
                late_calls.fetch_add(1, Ordering::SeqCst);
            }
            true
        }
    }));
    let mut w = client.subscribe(EventFilter::name("E"));

    // The driver's view now holds slow, x and w.
    client.execute("emit", ()).await.unwrap();
    w.recv_timeout(Duration::from_secs(5)).await.unwrap();

    // Dropping `slow` makes the next event refresh the view; that refresh drops slow's state and
    // blocks in it, after `retain` has looked at x (not dropped yet).
    drop(slow);
    let emit = tokio::spawn({
        let c = client.clone();
        async move { c.execute("emit", ()).await }
    });
    started_rx
        .recv_timeout(Duration::from_secs(5))
        .expect("the refresh started");
    drop(x); // bumps the generation while the refresh is under way
    go_tx.send(()).unwrap();
    emit.await.unwrap().unwrap();
    w.recv_timeout(Duration::from_secs(5)).await.unwrap();

    // x was dropped before these events were even asked for.
    checking.store(true, Ordering::SeqCst);
    for _ in 0..3 {
        client.execute("emit", ()).await.unwrap();
        w.recv_timeout(Duration::from_secs(5)).await.unwrap();
    }
    let late = late_calls.load(Ordering::SeqCst);
    let leaked = alive.upgrade().is_some();
    assert!(
        late == 0 && !leaked,
        "dropped subscription still in the driver's view: its predicate ran {late} more times, \
         its state leaked: {leaked}"
    );
}

/// Subscriptions that come and go while no event arrives do not pile up: each one's filter, and
/// what its predicate holds, is released when it is dropped.
#[tokio::test]
async fn subscriptions_dropped_between_events_are_released_at_once() {
    let server = qmp_testkit::FakeServer::start(|c| {
        c.handshake();
        c.serve_forever();
    });
    let client = qmp_tokio::connect(server.path(), Options::new())
        .await
        .unwrap();
    for i in 0..100 {
        let token = Arc::new(());
        let held = Arc::downgrade(&token);
        let sub = client.subscribe(EventFilter::all().predicate(move |_| {
            let _ = &token;
            true
        }));
        if i % 2 == 1 {
            // The connection's task runs, and takes the filter into its view.
            client.execute("x", ()).await.unwrap();
        }
        drop(sub);
        assert!(
            released(&held).await,
            "a dropped subscription's filter is still held"
        );
    }
}

/// A client whose server answers everything and sends event `E` after each `emit`.
async fn emitting_client() -> (qmp_testkit::FakeServer, qmp_tokio::Client) {
    let server = qmp_testkit::FakeServer::start(|c| {
        c.handshake();
        while let Some(r) = c.recv() {
            c.reply(&r.command, json!({}));
            if r.name() == "emit" {
                c.event("E", json!({}));
            }
        }
    });
    let client = qmp_tokio::connect(server.path(), Options::new())
        .await
        .unwrap();
    (server, client)
}

/// Waits up to 2 s for `held` to be released.
async fn released(held: &std::sync::Weak<()>) -> bool {
    for _ in 0..200 {
        if held.strong_count() == 0 {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    false
}

/// A filter that owns another subscription: dropping the first frees the second's filter too,
/// although that second drop happens inside the task's refresh (found in review: its wake-up
/// was lost, the task's waker already taken by the first).
async fn chained_drop() {
    let (_server, client) = emitting_client().await;
    let token = Arc::new(());
    let held = Arc::downgrade(&token);
    let inner = client.subscribe(EventFilter::name("E").predicate(move |_| {
        let _ = &token;
        true
    }));
    let outer = client.subscribe(EventFilter::name("E").predicate(move |_| {
        let _ = &inner;
        true
    }));
    let mut w = client.subscribe(EventFilter::name("E"));
    // Both filters are now in the task's view.
    client.execute("emit", ()).await.unwrap();
    w.recv_timeout(Duration::from_secs(5)).await.unwrap();
    drop(outer);
    assert!(
        released(&held).await,
        "the inner subscription's filter is still held"
    );
}

#[tokio::test]
async fn a_subscription_dropped_by_a_dropped_filter_is_released_current_thread() {
    chained_drop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_subscription_dropped_by_a_dropped_filter_is_released_multi_thread() {
    chained_drop().await;
}

/// Sleeps in its `Drop`, holding up the refresh that drops it.
struct SlowToDrop;

impl Drop for SlowToDrop {
    fn drop(&mut self) {
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// A subscription dropped while the task's refresh is busy dropping another is released too
/// (found in review: its wake-up came before the task had registered a new waker, and was lost).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_subscription_dropped_during_a_slow_refresh_is_released() {
    let (_server, client) = emitting_client().await;
    let slow_state = SlowToDrop;
    let slow = client.subscribe(EventFilter::name("E").predicate(move |_| {
        let _ = &slow_state;
        true
    }));
    let token = Arc::new(());
    let held = Arc::downgrade(&token);
    let s = client.subscribe(EventFilter::name("E").predicate(move |_| {
        let _ = &token;
        true
    }));
    let mut w = client.subscribe(EventFilter::name("E"));
    client.execute("emit", ()).await.unwrap();
    w.recv_timeout(Duration::from_secs(5)).await.unwrap();
    drop(slow);
    tokio::time::sleep(Duration::from_millis(30)).await;
    drop(s);
    assert!(
        released(&held).await,
        "the second subscription's filter is still held"
    );
}

/// A waker whose `wake` drops a subscription, as an executor may when the task it wakes is gone.
struct DropOnWake(Mutex<Option<qmp_tokio::Subscription>>);

impl std::task::Wake for DropOnWake {
    fn wake(self: Arc<Self>) {
        self.0.lock().unwrap().take();
    }
}

/// When the connection closes, waking a subscriber whose waker drops a subscription does not
/// deadlock the connection's task (it used to wake under the hub's lock, which that drop takes).
#[test]
fn a_wake_that_drops_a_subscription_at_close_does_not_deadlock() {
    let (done_tx, done_rx) = channel();
    // Its own thread: on failure the runtime deadlocks, and the test must still end.
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            let server = qmp_testkit::FakeServer::start(|c| {
                c.handshake();
                let bye = c.expect("bye");
                c.reply(&bye.command, json!({}));
            });
            let client = qmp_tokio::connect(server.path(), Options::new())
                .await
                .unwrap();
            let mut watched = client.subscribe(EventFilter::all());
            let other = client.subscribe(EventFilter::all());
            let waker = std::task::Waker::from(Arc::new(DropOnWake(Mutex::new(Some(other)))));
            let mut cx = std::task::Context::from_waker(&waker);
            let poll = futures_util::Stream::poll_next(std::pin::Pin::new(&mut watched), &mut cx);
            assert!(poll.is_pending());
            client.execute("bye", ()).await.unwrap();
            client.closed().await;
            // Takes the hub's lock: blocks for ever if the task deadlocked holding it.
            drop(client.subscribe(EventFilter::all()));
        });
        let _ = done_tx.send(());
    });
    done_rx
        .recv_timeout(Duration::from_secs(10))
        .expect("the connection's task deadlocked closing");
}
