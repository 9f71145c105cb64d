//! The shared conformance suite (`qmp_testkit::scenarios`) on tokio.

use std::path::PathBuf;
use std::time::Duration;

use qmp_testkit::scenarios::{Adapter, Bound, BoxFut};
use qmp_tokio::{Address, Client, Error, GuestAgent, Options};

/// Tokio, with the connection's task on the current thread with the scenario, or on worker
/// threads (`multi_thread`) while the scenario runs on the thread that blocks on it: a subscriber
/// and the connection then really run at once, as in most tokio programs (the events scenarios'
/// races showed up only there).
struct Tokio {
    multi_thread: bool,
}

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
        let mut runtime = match self.multi_thread {
            true => tokio::runtime::Builder::new_multi_thread(),
            false => tokio::runtime::Builder::new_current_thread(),
        };
        if self.multi_thread {
            runtime.worker_threads(2);
        }
        runtime.enable_all().build().unwrap().block_on(scenario);
    }
}

static TOKIO: Tokio = Tokio {
    multi_thread: false,
};
static TOKIO_MULTI: Tokio = Tokio { multi_thread: true };

qmp_testkit::conformance!(TOKIO);

/// The events scenarios again, on a multi-thread runtime.
mod multi_thread {
    qmp_testkit::events_conformance!(super::TOKIO_MULTI);
}
