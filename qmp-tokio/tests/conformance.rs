//! The shared conformance suite (`qmp_testkit::scenarios`) on tokio.

use std::path::PathBuf;
use std::time::Duration;

use qmp_testkit::scenarios::{Adapter, Bound, BoxFut};
use qmp_tokio::{Address, Client, Error, GuestAgent, Options};

struct Tokio;

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

static TOKIO: Tokio = Tokio;

qmp_testkit::conformance!(TOKIO);
