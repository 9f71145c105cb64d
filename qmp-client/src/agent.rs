//! The guest-agent handle: the client API for `qemu-ga`, which speaks QMP's wire format without
//! its session.

use std::fmt;
use std::hash::{BuildHasher, RandomState};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_channel::oneshot;
use qmp_proto::{Command, CommandError, Config, Connection, NO_SUCCESS_RESPONSE, RawJson};
use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::Value;

use crate::calls::Request;
use crate::client::{Client, Options, Runtime, State, race};
use crate::driver::{Timer, Transport};
use crate::error::{Disconnect, Error};

/// A client of a QEMU guest agent (`qemu-ga`, reached through a VM's virtio-serial chardev).
///
/// The agent speaks QMP's wire format without QMP's session: no greeting, no capabilities, no
/// events, one command at a time. What makes it hard to talk to reliably is handled here:
///
/// - **Resync.** On connect, and after any command times out, the client sends the `0xFF` byte
///   that resets the agent's parser and `guest-sync-delimited` with a random id, and discards
///   everything until the reply carrying that id; the `0xFF` the agent puts before that reply
///   resets ours in turn, so half a reply left by an earlier client cannot swallow it. A late
///   reply to a command given up on can therefore never be taken for the next command's answer.
///   A command dropped once written is resynced past when the next one is waiting to go; until
///   then its reply, should it come, is discarded.
/// - **Old agents** that do not echo ids are matched by order, which is safe because one command
///   is in flight at a time.
/// - **Commands that never reply on success** (`guest-shutdown`, `guest-suspend-*`): see
///   [`execute_no_reply`](Self::execute_no_reply); [`execute`](Self::execute) handles them too.
/// - **Large replies**: `guest-file-read` returns up to 48 MiB as base64; the default
///   [`Config::guest_agent`] admits it.
///
/// Cheap to clone, `Send + Sync`; calls from many tasks are queued and sent one at a time. Get
/// one from an adapter: `qmp_tokio::connect_guest_agent`, ...
#[derive(Clone)]
pub struct GuestAgent {
    client: Client,
}

impl fmt::Debug for GuestAgent {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("GuestAgent")
            .field("timeout", &self.client.timeout)
            .field("closed", &self.is_closed())
            .finish_non_exhaustive()
    }
}

/// How a command that never replies on success ended, from
/// [`GuestAgent::execute_no_reply`]. Every variant is a success; an error reply is an `Err`.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub enum NoReply {
    /// The agent closed the connection: the guest went down (or the agent restarted).
    Closed,
    /// Nothing came back within the wait: the command is under way. The connection resyncs
    /// before the next command, in case an error arrives late.
    Silent,
    /// The agent did reply, with this value (some agents and commands do).
    Returned(Value),
}

impl GuestAgent {
    /// Starts a guest-agent client over `io`: spawns its driver on `runtime` and performs the
    /// first resync, within the connect timeout. Adapters call this; users call an adapter.
    pub async fn start<T: Transport, S: Timer>(
        io: T,
        timer: S,
        options: Options,
        runtime: Arc<dyn Runtime>,
    ) -> Result<Self, Error> {
        let config = options.config.clone().unwrap_or_else(Config::guest_agent);
        let conn = Connection::new_guest_agent(config, random_seed());
        // A connect timeout here usually means no agent runs in the guest: the chardev accepts
        // the connection, but nobody answers the sync.
        let client = Client::launch(io, timer, options, runtime, conn).await?;
        Ok(Self { client })
    }

    /// Executes `name` with `arguments` (anything that serializes to a JSON object, or `()` for
    /// none) and returns the return value.
    ///
    /// `guest-shutdown` and `guest-suspend-*` never reply on success: for them this returns
    /// `{}` once the agent closes the connection or the handle's timeout passes in silence, and
    /// without a timeout it waits for the connection to close. Use
    /// [`execute_no_reply`](Self::execute_no_reply) to tell the cases apart.
    pub async fn execute(&self, name: &str, arguments: impl Serialize) -> Result<Value, Error> {
        let result = self
            .client
            .call(Command::new(name).arguments(&arguments)?)
            .await;
        match result {
            Ok(raw) => raw.to_value().map_err(Error::Decode),
            Err(Error::Command(CommandError::NoReply { .. }))
                if NO_SUCCESS_RESPONSE.contains(&name) =>
            {
                Ok(Value::Object(serde_json::Map::new()))
            }
            Err(e) => Err(e),
        }
    }

    /// Executes `name` and deserializes the return value straight into `R`.
    pub async fn execute_as<R: DeserializeOwned>(
        &self,
        name: &str,
        arguments: impl Serialize,
    ) -> Result<R, Error> {
        self.client.execute_as(name, arguments).await
    }

    /// Executes a pre-built command object as given; its `id`, if any, is replaced by the
    /// client's own.
    pub async fn execute_raw(&self, command: Value) -> Result<Value, Error> {
        self.client.execute_raw(command).await
    }

    /// Executes a [`Command`] built with the core's builder and returns the return value unparsed.
    pub async fn call(&self, command: Command) -> Result<RawJson, Error> {
        self.client.call(command).await
    }

    /// Executes a command that sends no reply when it succeeds (`guest-shutdown`,
    /// `guest-suspend-disk`, `guest-suspend-ram`, `guest-suspend-hybrid`, or any other), waiting
    /// at most `wait` for an error.
    ///
    /// ```no_run
    /// # async fn f(agent: qmp_client::GuestAgent) -> Result<(), qmp_client::Error> {
    /// use std::time::Duration;
    /// use qmp_client::NoReply;
    /// use serde_json::json;
    ///
    /// match agent.execute_no_reply("guest-shutdown", json!({"mode": "powerdown"}),
    ///     Duration::from_secs(5)).await? {
    ///     NoReply::Closed => println!("the guest is down"),
    ///     NoReply::Silent => println!("shutting down"),
    ///     other => println!("{other:?}"),
    /// }
    /// # Ok(()) }
    /// ```
    pub async fn execute_no_reply(
        &self,
        name: &str,
        arguments: impl Serialize,
        wait: Duration,
    ) -> Result<NoReply, Error> {
        let mut cmd = Command::new(name).arguments(&arguments)?.no_reply();
        // Beyond what an `Instant` holds: wait for EOF or an error however long it takes.
        if let Some(at) = Instant::now().checked_add(wait) {
            cmd = cmd.deadline(at);
        }
        match self.client.without_timeout().call(cmd).await {
            Ok(raw) => Ok(NoReply::Returned(raw.to_value().map_err(Error::Decode)?)),
            Err(Error::Command(CommandError::NoReply { closed: true })) => Ok(NoReply::Closed),
            Err(Error::Command(CommandError::NoReply { closed: false })) => Ok(NoReply::Silent),
            Err(e) => Err(e),
        }
    }

    /// Resynchronises now: `0xFF`, `guest-sync-delimited`, and everything up to its reply
    /// discarded. The client already does this on connect and after every timeout; call it when
    /// you have another reason to distrust the stream. A command in flight fails with
    /// [`CommandError::Resynced`]. Waits at most the handle's timeout, if it has one.
    pub async fn resync(&self) -> Result<(), Error> {
        let (done, finished) = oneshot::channel();
        let closed = || Error::Disconnected(self.client.shared.disconnect_reason());
        if !self.client.shared.calls.request(Request::Resync { done }) {
            return Err(closed());
        }
        let finished = async { finished.await.map_err(|_| closed()) };
        match self.client.timeout {
            None => finished.await,
            Some(timeout) => race(finished, self.client.shared.runtime.sleep(timeout))
                .await
                .unwrap_or(Err(Error::Timeout)),
        }
    }

    /// A handle to the same connection whose commands time out after `timeout`. A command that
    /// times out makes the connection resync, so its late reply is discarded.
    pub fn with_timeout(&self, timeout: Duration) -> Self {
        Self {
            client: self.client.with_timeout(timeout),
        }
    }

    /// A handle to the same connection whose commands never time out.
    pub fn without_timeout(&self) -> Self {
        Self {
            client: self.client.without_timeout(),
        }
    }

    /// Whether the connection is open or why it closed.
    pub fn state(&self) -> State {
        self.client.state()
    }

    /// Whether the connection has closed.
    pub fn is_closed(&self) -> bool {
        self.client.is_closed()
    }

    /// Completes when the connection closes, with the reason.
    pub async fn closed(&self) -> Disconnect {
        self.client.closed().await
    }

    /// Closes the connection: queued bytes are written, waiting calls fail with
    /// [`Disconnect::Local`]; returns once the socket is closed. Note that qemu-ga can exit when a client leaves while a reply is
    /// still pending, so let calls finish first where you can.
    pub async fn disconnect(&self) {
        self.client.disconnect().await;
    }
}

/// A seed for sync ids that differs between connections and processes, without a dependency:
/// std's `RandomState` is randomly keyed per process and its keys change per instance.
fn random_seed() -> u64 {
    RandomState::new().hash_one((Instant::now(), std::process::id()))
}
