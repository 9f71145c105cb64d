//! The shared conformance suite (`qmp_testkit::scenarios`) on the blocking adapter: connections
//! made by `qmp_blocking`, scenarios driven through its async core with `qmp_blocking::block_on`.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use qmp_blocking::{Address, Error, Options};
use qmp_client::{Client, GuestAgent};
use qmp_testkit::scenarios::{Adapter, Bound, BoxFut};

struct Blocking;

impl Adapter for Blocking {
    fn connect(&self, address: Address, options: Options) -> BoxFut<Result<Client, Error>> {
        Box::pin(
            async move { qmp_blocking::connect(address, options).map(|c| c.as_async().clone()) },
        )
    }

    fn connect_agent(&self, path: PathBuf, options: Options) -> BoxFut<Result<GuestAgent, Error>> {
        Box::pin(async move {
            qmp_blocking::connect_guest_agent(path, options).map(|a| a.as_async().clone())
        })
    }

    fn accept(
        &self,
        address: Address,
        options: Options,
        bound: Bound,
    ) -> BoxFut<Result<Client, Error>> {
        Box::pin(async move {
            let listener = qmp_blocking::Listener::bind(address)?;
            bound(listener.local_addr());
            listener.accept(options).map(|c| c.as_async().clone())
        })
    }

    fn sleep(&self, duration: Duration) -> BoxFut<()> {
        let at = Instant::now() + duration;
        Box::pin(std::future::poll_fn(move |cx| {
            if Instant::now() >= at {
                return std::task::Poll::Ready(());
            }
            let waker = cx.waker().clone();
            std::thread::spawn(move || {
                std::thread::sleep(at.saturating_duration_since(Instant::now()));
                waker.wake();
            });
            std::task::Poll::Pending
        }))
    }

    fn run(&self, scenario: BoxFut<()>) {
        qmp_blocking::block_on(scenario);
    }
}

static BLOCKING: Blocking = Blocking;

qmp_testkit::conformance!(BLOCKING);
