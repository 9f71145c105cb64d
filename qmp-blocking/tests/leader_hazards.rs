//! Hazards of calls that drive the connection from their own thread (see `leader.rs`), found in
//! review: wakes another thread drained, deadlines set by the connection's thread while a call
//! leads, blocking calls made from inside `Client::block_on` or a nested `block_on`, a lead
//! outliving its connection, and a spawner in the options. Each test failed (hung, or was late)
//! before the fix it names.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, mpsc};
use std::time::{Duration, Instant};

use qmp_blocking::{Client, EventFilter, Options};
use qmp_testkit::FakeServer;
use serde_json::json;

fn echo_server() -> FakeServer {
    FakeServer::start(|c| {
        c.handshake();
        while let Some(r) = c.recv() {
            c.reply(&r.command, r.arguments()["echo"].clone());
            if r.name() == "emit" {
                std::thread::sleep(Duration::from_millis(50));
                c.event("E", json!({}));
            }
        }
    })
}

/// Runs f on a thread; Err if it does not finish within `limit`.
fn within<T: Send + 'static>(
    limit: Duration,
    f: impl FnOnce() -> T + Send + 'static,
) -> Result<T, ()> {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(f());
    });
    rx.recv_timeout(limit).map_err(|_| ())
}

/// Subscription::recv_timeout (plain block_on) inside Client::block_on on the same connection.
#[test]
fn a_subscription_read_inside_block_on_gets_its_event() {
    let server = echo_server();
    let client = qmp_blocking::connect(server.path(), Options::new()).unwrap();
    let got = within(Duration::from_secs(10), move || {
        let mut ev = client.subscribe(EventFilter::name("E"));
        client.block_on(async {
            client
                .as_async()
                .execute("emit", json!({"echo": 1}))
                .await
                .unwrap();
            ev.recv_timeout(Duration::from_secs(3))
        })
    });
    eprintln!("recv inside block_on: {got:?}");
    assert!(matches!(got, Ok(Ok(_))), "{got:?}");
}

/// Client::disconnect (plain block_on) inside Client::block_on.
#[test]
fn disconnect_inside_block_on_returns() {
    let server = echo_server();
    let client = qmp_blocking::connect(server.path(), Options::new()).unwrap();
    let got = within(Duration::from_secs(5), move || {
        client.block_on(async {
            client.disconnect();
        })
    });
    assert!(got.is_ok(), "disconnect inside block_on hung");
}

/// qmp_blocking::block_on(as_async().execute()) inside Client::block_on.
#[test]
fn the_free_block_on_inside_block_on_returns() {
    let server = echo_server();
    let client = qmp_blocking::connect(server.path(), Options::new()).unwrap();
    let got = within(Duration::from_secs(5), move || {
        client.block_on(async {
            qmp_blocking::block_on(client.as_async().execute("x", json!({"echo": 1})))
        })
    });
    assert!(
        matches!(&got, Ok(Ok(v)) if *v == json!(1)),
        "free block_on inside block_on: {got:?}"
    );
}

fn cpu_time() -> Duration {
    let s = std::fs::read_to_string("/proc/self/stat").unwrap();
    let rest = &s[s.rfind(')').unwrap() + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks: u64 = f[11].parse::<u64>().unwrap() + f[12].parse::<u64>().unwrap();
    Duration::from_millis(ticks * 10)
}

/// The connection ends while Client::block_on runs a future that outlives it: the lead waits for
/// the future's own wakers, instead of polling a hung-up socket in a loop.
#[test]
fn a_lead_outliving_its_connection_does_not_spin() {
    let server = FakeServer::start(|c| {
        c.handshake();
        c.expect("bye");
        c.close();
    });
    let client = qmp_blocking::connect(server.path(), Options::new()).unwrap();
    let cpu0 = cpu_time();
    let t0 = Instant::now();
    client.block_on(async {
        let _ = client.as_async().execute("bye", ()).await;
        // Something unrelated that takes a while (a subscription to another connection, a
        // channel...): here a wait_for on a closed connection would end at once, so use a
        // thread-based timer.
        let (tx, rx) = futures_channel::oneshot::channel::<()>();
        std::thread::spawn(move || {
            std::thread::sleep(Duration::from_secs(1));
            let _ = tx.send(());
        });
        let _ = rx.await;
    });
    let cpu = cpu_time() - cpu0;
    eprintln!("wall {:?} cpu {:?}", t0.elapsed(), cpu);
    assert!(
        cpu < Duration::from_millis(300),
        "spun: {cpu:?} of CPU in {:?}",
        t0.elapsed()
    );
}

/// For `STRESS_SECS` seconds (default 4): one thread leads `client`, in rounds of
/// `Client::block_on` waiting `round` for an event that never comes, while `workers` threads
/// (`WORKERS` overrides) run `call` on `worker` in a loop. Returns how many calls took longer than
/// `slow`.
fn slow_calls_while_a_block_on_leads(
    client: &Client,
    round: Duration,
    worker: &Client,
    workers: usize,
    slow: Duration,
    call: fn(&Client),
) -> usize {
    fn env<T: std::str::FromStr>(name: &str) -> Option<T> {
        std::env::var(name).ok().and_then(|s| s.parse().ok())
    }
    let stop = Arc::new(AtomicBool::new(false));
    let leader = {
        let c = client.clone();
        let stop = stop.clone();
        std::thread::spawn(move || {
            let mut n = 0;
            while !stop.load(Ordering::Relaxed) {
                let _ = c.block_on(c.as_async().wait_for(EventFilter::name("NEVER"), round));
                n += 1;
            }
            n
        })
    };
    std::thread::sleep(Duration::from_millis(50));
    let workers: Vec<_> = (0..env("WORKERS").unwrap_or(workers))
        .map(|_| {
            let c = worker.clone();
            let stop = stop.clone();
            std::thread::spawn(move || {
                let mut worst = Duration::ZERO;
                let mut slow_calls = 0;
                let mut n = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    let t = Instant::now();
                    call(&c);
                    let e = t.elapsed();
                    if e > slow {
                        eprintln!("slow call: {e:?}");
                        slow_calls += 1;
                    }
                    worst = worst.max(e);
                    n += 1;
                }
                (n, slow_calls, worst)
            })
        })
        .collect();
    std::thread::sleep(Duration::from_secs(env("STRESS_SECS").unwrap_or(4)));
    stop.store(true, Ordering::Relaxed);
    let mut total_slow = 0;
    for w in workers {
        let (n, slow_calls, worst) = w.join().unwrap();
        eprintln!("calls {n}, slower than {slow:?}: {slow_calls}, worst {worst:?}");
        total_slow += slow_calls;
    }
    eprintln!("leader rounds {}", leader.join().unwrap());
    total_slow
}

/// One thread leads (Client::block_on of a 300 ms wait); others make calls that the leader must
/// serve. A lost wake shows as a call taking about as long as the leader's wait.
#[test]
fn calls_from_other_threads_while_a_block_on_leads_are_not_delayed() {
    let server = FakeServer::start(|c| {
        c.handshake();
        c.serve_forever();
    });
    let client = qmp_blocking::connect(server.path(), Options::new()).unwrap();
    let slow = slow_calls_while_a_block_on_leads(
        &client,
        Duration::from_millis(300),
        &client,
        3,
        Duration::from_millis(100),
        |c| drop(c.execute("b", ()).unwrap()),
    );
    assert_eq!(slow, 0);
}

/// As above, but the other calls time out (the server never answers them): their deadline is kept
/// by whoever polls the task, which must be the leader. A deadline lost shows as a call timing
/// out about when the leader's wait ends instead of after 20 ms.
#[test]
fn deadlines_of_other_threads_calls_are_kept_while_a_block_on_leads() {
    let server = FakeServer::start(|c| {
        c.handshake();
        while let Some(_r) = c.recv() {}
    });
    let client = qmp_blocking::connect(server.path(), Options::new()).unwrap();
    let slow = slow_calls_while_a_block_on_leads(
        &client,
        Duration::from_millis(500),
        &client.with_timeout(Duration::from_millis(20)),
        1,
        Duration::from_millis(150),
        |c| assert!(c.execute("b", ()).is_err()),
    );
    assert_eq!(slow, 0);
}

/// Thread 1 is inside `Client::block_on` on connection A, blocked in a slow call on connection B
/// (the "blocking call in async code" mistake the crate tolerates). Thread 2's ordinary call on A
/// should not have to wait for it.
#[test]
fn blocking_elsewhere_inside_block_on_does_not_starve_other_threads() {
    let server = FakeServer::start(|c| {
        c.handshake();
        while let Some(r) = c.recv() {
            if r.name() == "slow" {
                std::thread::sleep(Duration::from_secs(2));
            }
            c.reply(&r.command, json!({}));
        }
    });
    let a = qmp_blocking::connect(server.path(), Options::new()).unwrap();
    let b = qmp_blocking::connect(server.path(), Options::new()).unwrap();
    let t1 = {
        let a = a.clone();
        std::thread::spawn(move || a.block_on(async { b.execute("slow", ()).unwrap() }))
    };
    std::thread::sleep(Duration::from_millis(200));
    let t = Instant::now();
    a.execute("quick", ()).unwrap();
    let took = t.elapsed();
    t1.join().unwrap();
    eprintln!("quick call on A took {took:?}");
    assert!(took < Duration::from_millis(500), "{took:?}");
}

/// Two threads, each inside `Client::block_on` on one connection, each making a blocking call on
/// the other's.
#[test]
fn crosswise_blocking_calls_inside_block_on_do_not_deadlock() {
    let server = echo_server();
    let a = qmp_blocking::connect(server.path(), Options::new()).unwrap();
    let b = qmp_blocking::connect(server.path(), Options::new()).unwrap();
    let barrier = Arc::new(std::sync::Barrier::new(2));
    let got = within(Duration::from_secs(5), move || {
        let t1 = {
            let (a, b, barrier) = (a.clone(), b.clone(), barrier.clone());
            std::thread::spawn(move || {
                a.block_on(async {
                    barrier.wait();
                    b.execute("x", json!({"echo": 1})).unwrap()
                })
            })
        };
        let r2 = b.block_on(async {
            barrier.wait();
            a.execute("x", json!({"echo": 2})).unwrap()
        });
        (t1.join().unwrap(), r2)
    });
    assert!(got.is_ok(), "crosswise deadlock");
}

/// A future run by `block_on` makes a blocking call (a nested `block_on`) in one branch, while
/// another branch is woken: the thread's park token that wake left is consumed by the nested
/// loop, so the outer one must go by its own flag (it slept forever before).
#[test]
fn a_wake_during_a_nested_block_on_is_not_lost() {
    let got = within(Duration::from_secs(5), || {
        let (tx, rx) = futures_channel::oneshot::channel::<u32>();
        let (tx2, rx2) = futures_channel::oneshot::channel::<()>();
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
    assert_eq!(got, Ok(7), "block_on hung: the wake was lost");
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
    assert!(matches!(&got, Ok(Some(Ok(n))) if n == "E"), "hung: {got:?}");
}

/// A spawner is for async executors; the blocking client runs its connection its own way and
/// ignores it (every connect timed out before).
#[test]
fn a_spawner_in_the_options_is_ignored() {
    let server = echo_server();
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
    assert!(matches!(&got, Ok(Ok(v)) if *v == json!(1)), "{got:?}");
}
