//! The shared conformance suite (`qmp_testkit::scenarios`) on tokio.

use std::path::PathBuf;
use std::time::Duration;

use qmp_testkit::scenarios::{Adapter, Bound, BoxFut};
use qmp_tokio::{Address, Client, Error, GuestAgent, Options};

/// The connection's task on the current thread, with the scenario.
struct Tokio;

/// The connection's task on worker threads, the scenario on the thread that blocks on it: a
/// subscriber and the connection really run at once, as in most tokio programs (the events
/// scenarios' races showed up only here).
struct TokioMulti;

impl Adapter for Tokio {
    fn connect(&self, address: Address, options: Options) -> BoxFut<Result<Client, Error>> {
        Box::pin(qmp_tokio::connect(address, options))
    }

    fn connect_agent(&self, path: PathBuf, options: Options) -> BoxFut<Result<GuestAgent, Error>> {
        Box::pin(qmp_tokio::connect_guest_agent(path, options))
    }

    fn accept(
        &self,
        address: Address,
        options: Options,
        bound: Bound,
    ) -> BoxFut<Result<Client, Error>> {
        Box::pin(async move {
            let listener = qmp_tokio::Listener::bind(address).await?;
            bound(listener.local_addr());
            listener.accept(options).await
        })
    }

    fn sleep(&self, duration: Duration) -> BoxFut<()> {
        Box::pin(tokio::time::sleep(duration))
    }

    fn run(&self, scenario: BoxFut<()>) {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
            .block_on(scenario);
    }
}

impl Adapter for TokioMulti {
    fn connect(&self, address: Address, options: Options) -> BoxFut<Result<Client, Error>> {
        Tokio.connect(address, options)
    }

    fn connect_agent(&self, path: PathBuf, options: Options) -> BoxFut<Result<GuestAgent, Error>> {
        Tokio.connect_agent(path, options)
    }

    fn accept(
        &self,
        address: Address,
        options: Options,
        bound: Bound,
    ) -> BoxFut<Result<Client, Error>> {
        Tokio.accept(address, options, bound)
    }

    fn sleep(&self, duration: Duration) -> BoxFut<()> {
        Tokio.sleep(duration)
    }

    fn run(&self, scenario: BoxFut<()>) {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap()
            .block_on(scenario);
    }
}

static TOKIO: Tokio = Tokio;
static TOKIO_MULTI: TokioMulti = TokioMulti;

qmp_testkit::conformance!(TOKIO);

/// The events scenarios again, on a multi-thread runtime.
mod multi_thread {
    qmp_testkit::events_conformance!(super::TOKIO_MULTI);
}
