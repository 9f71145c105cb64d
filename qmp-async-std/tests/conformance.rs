//! The shared conformance suite (`qmp_testkit::scenarios`) on an async-std executor (connection
//! tasks on their own threads, the default) and on a smol executor (connection tasks spawned on
//! smol's executor through `Options::spawner`).

use std::path::PathBuf;
use std::time::Duration;

use qmp_async_std::{Address, Client, Error, GuestAgent, Options};
use qmp_testkit::scenarios::{Adapter, Bound, BoxFut};

struct AsyncStd;

impl Adapter for AsyncStd {
    fn connect(&self, address: Address, options: Options) -> BoxFut<Result<Client, Error>> {
        Box::pin(qmp_async_std::connect(address, options))
    }

    fn connect_agent(&self, path: PathBuf, options: Options) -> BoxFut<Result<GuestAgent, Error>> {
        Box::pin(qmp_async_std::connect_guest_agent(path, options))
    }

    fn accept(
        &self,
        address: Address,
        options: Options,
        bound: Bound,
    ) -> BoxFut<Result<Client, Error>> {
        Box::pin(async move {
            let listener = qmp_async_std::Listener::bind(address).await?;
            bound(listener.local_addr());
            listener.accept(options).await
        })
    }

    fn sleep(&self, duration: Duration) -> BoxFut<()> {
        Box::pin(async_std::task::sleep(duration))
    }

    fn run(&self, scenario: BoxFut<()>) {
        async_std::task::block_on(scenario);
    }
}

struct Smol;

fn on_smol(options: Options) -> Options {
    options.spawner(|task| smol::spawn(task).detach())
}

impl Adapter for Smol {
    fn connect(&self, address: Address, options: Options) -> BoxFut<Result<Client, Error>> {
        Box::pin(qmp_async_std::connect(address, on_smol(options)))
    }

    fn connect_agent(&self, path: PathBuf, options: Options) -> BoxFut<Result<GuestAgent, Error>> {
        Box::pin(qmp_async_std::connect_guest_agent(path, on_smol(options)))
    }

    fn accept(
        &self,
        address: Address,
        options: Options,
        bound: Bound,
    ) -> BoxFut<Result<Client, Error>> {
        Box::pin(async move {
            let listener = qmp_async_std::Listener::bind(address).await?;
            bound(listener.local_addr());
            listener.accept(on_smol(options)).await
        })
    }

    fn sleep(&self, duration: Duration) -> BoxFut<()> {
        Box::pin(async move {
            smol::Timer::after(duration).await;
        })
    }

    fn run(&self, scenario: BoxFut<()>) {
        smol::block_on(scenario);
    }
}

mod async_std_executor {
    static ASYNC_STD: super::AsyncStd = super::AsyncStd;
    qmp_testkit::conformance!(ASYNC_STD);
}

mod smol_executor {
    static SMOL: super::Smol = super::Smol;
    qmp_testkit::conformance!(SMOL);
}
