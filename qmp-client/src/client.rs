//! The client handle: cheap to clone, `Send + Sync`, usable from any number of tasks.

use std::collections::BTreeSet;
use std::fmt;
use std::future::Future;
use std::os::fd::OwnedFd;
use std::pin::{Pin, pin};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Poll, Waker};
use std::time::{Duration, Instant};

use futures_channel::oneshot;
use qmp_proto::{Command, Config, Connection, Event, Greeting, RawJson};
use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::Value;
use tracing::Instrument;

use crate::calls::{Call, Calls, Request};
use crate::driver::{Driver, Timer, Transport};
use crate::error::{Disconnect, Error};
use crate::events::{EventFilter, Hub, Subscription};

/// A boxed future, as the runtime hooks take and return them.
pub type BoxFuture = Pin<Box<dyn Future<Output = ()> + Send + 'static>>;

/// What a client needs from an async runtime: spawning the connection's task, and sleeping (for
/// connect deadlines and event waits). Adapters provide it.
pub trait Runtime: Send + Sync + 'static {
    /// Runs `future` to completion in the background.
    fn spawn(&self, future: BoxFuture);
    /// A future that completes after `duration`.
    fn sleep(&self, duration: Duration) -> BoxFuture;
    /// A future that lets the runtime's other tasks run once, then completes. The driver awaits
    /// it when a subscriber's queue fills, so subscribers catch up before more is read. The
    /// default wakes itself at once; runtimes that can defer a task behind the others (tokio's
    /// `yield_now`) should.
    fn yield_now(&self) -> BoxFuture {
        let mut yielded = false;
        Box::pin(std::future::poll_fn(move |cx| {
            if std::mem::replace(&mut yielded, true) {
                Poll::Ready(())
            } else {
                cx.waker().wake_by_ref();
                Poll::Pending
            }
        }))
    }
}

/// How a client connects and behaves. The defaults suit QEMU.
///
/// ```
/// use std::time::Duration;
/// let options = qmp_client::Options::new()
///     .name("vm1")
///     .timeout(Duration::from_secs(30))
///     .event_buffer(4096);
/// # let _ = options;
/// ```
#[derive(Clone)]
#[must_use]
pub struct Options {
    /// `None`: the default for the kind of peer (QMP or guest agent).
    pub(crate) config: Option<Config>,
    pub(crate) connect_timeout: Duration,
    pub(crate) wait_for_server: bool,
    pub(crate) timeout: Option<Duration>,
    pub(crate) event_buffer: usize,
    pub(crate) lag_after: Duration,
    pub(crate) name: Option<String>,
    pub(crate) spawner: Option<Arc<dyn Fn(BoxFuture) + Send + Sync>>,
}

impl fmt::Debug for Options {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Options")
            .field("config", &self.config)
            .field("connect_timeout", &self.connect_timeout)
            .field("wait_for_server", &self.wait_for_server)
            .field("timeout", &self.timeout)
            .field("event_buffer", &self.event_buffer)
            .field("lag_after", &self.lag_after)
            .field("name", &self.name)
            .field("spawner", &self.spawner.is_some())
            .finish()
    }
}

impl Default for Options {
    fn default() -> Self {
        Self {
            config: None,
            connect_timeout: Duration::from_secs(10),
            wait_for_server: false,
            timeout: None,
            event_buffer: 1024,
            lag_after: Duration::from_secs(1),
            name: None,
            spawner: None,
        }
    }
}

impl Options {
    /// The defaults.
    pub fn new() -> Self {
        Self::default()
    }

    /// Protocol limits and switches (message size, OOB, negotiation, ...); see
    /// [`qmp_proto::Config`]. Default: [`Config::default`] for QMP, [`Config::guest_agent`] for a
    /// guest agent.
    pub fn config(mut self, config: Config) -> Self {
        self.config = Some(config);
        self
    }

    /// How long connecting may take, greeting and negotiation included (default 10 s). QEMU
    /// serves one client per monitor: a second one gets no greeting until the first leaves, so
    /// without a deadline a connect could wait forever.
    pub fn connect_timeout(mut self, timeout: Duration) -> Self {
        self.connect_timeout = timeout;
        self
    }

    /// Keeps trying to connect, until the connect timeout, while nothing listens at the address
    /// yet: the socket file does not exist, or connections are refused (`ECONNREFUSED`: a stale
    /// socket file, or a TCP port not yet open). That is QEMU right after it was started, before
    /// its monitor socket is up; with this, a program that starts QEMU can connect at once instead
    /// of polling for the socket itself. Default off, so a wrong path fails at once. If the
    /// server is still absent at the deadline, connecting fails with the last attempt's error.
    ///
    /// ```no_run
    /// # async fn f() -> Result<(), qmp_client::Error> {
    /// # let connect = |_: &str, _: qmp_client::Options| async { Err::<(), _>(qmp_client::Error::Timeout) };
    /// use std::time::Duration;
    /// use qmp_client::Options;
    ///
    /// // QEMU was just started with `-qmp unix:/run/vm1.qmp,server=on,wait=off`.
    /// let options = Options::new()
    ///     .wait_for_server(true)
    ///     .connect_timeout(Duration::from_secs(30));
    /// connect("/run/vm1.qmp", options).await?; // qmp_tokio::connect, qmp_blocking::connect, ...
    /// # Ok(()) }
    /// ```
    pub fn wait_for_server(mut self, wait: bool) -> Self {
        self.wait_for_server = wait;
        self
    }

    /// The default timeout of every command (default none: QEMU commands may legitimately take
    /// long). Per handle, [`Client::with_timeout`] overrides it.
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = Some(timeout);
        self
    }

    /// Events each subscription queues (default 1024): when its queue is full, the connection
    /// waits for it to read (see [`lag_after`](Self::lag_after)), then drops its events and
    /// reports how many as [`Lagged`](crate::Lagged). The same number of events waits for the
    /// first subscription (see [`Client::subscribe`]).
    pub fn event_buffer(mut self, events: usize) -> Self {
        self.event_buffer = events.max(1);
        self
    }

    /// How long the connection waits for a subscriber whose queue is full before it drops events
    /// for it (default 1 s; [`Duration::ZERO`]: never wait, drop at once).
    ///
    /// While it waits, it delivers nothing else, responses and command timeouts included, and
    /// soon stops reading from QEMU (memory stays bounded); it goes on as soon as the subscriber has read half its queue.
    /// So a subscriber that keeps reading loses nothing, however long the burst, even on another
    /// thread; one that stops reading holds everything up for `lag_after` at most, then lags:
    /// its events are counted, not queued, until it has read half its queue, and it then gets
    /// one [`Lagged`](crate::Lagged) with the count. It is waited for again the next time its
    /// queue fills after that.
    ///
    /// The trade-off: a longer wait drops events less readily, and lets a subscriber that stopped
    /// reading (one whose task also waits for a command's response, say) delay every caller
    /// longer. Events that come before the first subscription wait in a backlog, which is waited
    /// for only until `lag_after` after connecting: a program that never subscribes stalls once,
    /// at connect, if at all. [`Duration::MAX`] waits for ever (then a subscription that stops
    /// reading stalls the connection until it is dropped); once the connection is closing, the
    /// wait is 2 s at most, so the end is not held up.
    ///
    /// ```
    /// use std::time::Duration;
    /// // A monitoring tool that must not miss events, and whose commands can wait.
    /// let patient = qmp_client::Options::new().lag_after(Duration::from_secs(10));
    /// // Responses first: a subscriber that falls behind loses events at once.
    /// let lossy = qmp_client::Options::new().lag_after(Duration::ZERO);
    /// # let _ = (patient, lossy);
    /// ```
    pub fn lag_after(mut self, wait: Duration) -> Self {
        self.lag_after = wait;
        self
    }

    /// A name for the connection's `tracing` span (for example the VM's name).
    pub fn name(mut self, name: impl Into<String>) -> Self {
        self.name = Some(name.into());
        self
    }

    /// Runs the connection's task with `spawn` instead of the adapter's default (tokio: the
    /// current runtime; async-std/smol: a thread of its own). With smol, for example, pass
    /// `move |task| executor.spawn(task).detach()` to keep everything on your executor.
    /// `qmp-blocking` ignores it: its connection's task runs on a thread of its own that the
    /// blocking calls coordinate with, and would never be woken on another executor.
    pub fn spawner(mut self, spawn: impl Fn(BoxFuture) + Send + Sync + 'static) -> Self {
        self.spawner = Some(Arc::new(spawn));
        self
    }

    /// The options without a [`spawner`](Self::spawner), for an adapter whose connection's task
    /// must run its own way (`qmp-blocking`).
    pub fn without_spawner(mut self) -> Self {
        self.spawner = None;
        self
    }

    /// The connect deadline (for adapters).
    pub fn connect_timeout_value(&self) -> Duration {
        self.connect_timeout
    }
}

/// Whether the connection is open.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub enum State {
    /// Commands can be sent.
    Open,
    /// The connection ended, for this reason.
    Closed(Disconnect),
}

/// State shared by the handles, the subscriptions and the driver of one connection.
pub(crate) struct Shared {
    pub(crate) calls: Calls,
    pub(crate) hub: Hub,
    pub(crate) runtime: Arc<dyn Runtime>,
    pub(crate) oob: AtomicBool,
    /// The server's greeting arrived.
    pub(crate) greeted: AtomicBool,
    can_pass_fds: bool,
    event_buffer: usize,
    /// [`Options::lag_after`].
    pub(crate) lag_after: Duration,
    closed: Latch<Disconnect>,
    /// The driver is gone, and the transport (the socket) with it; who waits for that.
    released: Latch<()>,
    commands: Mutex<Option<Arc<BTreeSet<String>>>>,
}

impl Shared {
    pub(crate) fn set_closed(&self, reason: Disconnect) {
        self.closed.set(reason, || self.hub.close());
    }

    fn closed_reason(&self) -> Option<Disconnect> {
        self.closed.get()
    }

    pub(crate) fn disconnect_reason(&self) -> Disconnect {
        self.closed_reason().unwrap_or(Disconnect::Local)
    }

    /// Called when the driver, and the transport with it, has been dropped.
    pub(crate) fn set_released(&self) {
        self.released.set((), || {});
    }
}

/// A value set once, that any number of tasks can wait for.
struct Latch<T> {
    state: Mutex<(Option<T>, Vec<Waker>)>,
}

impl<T: Clone> Latch<T> {
    fn new() -> Self {
        Self {
            state: Mutex::new((None, Vec::new())),
        }
    }

    /// Sets the value, unless it is set already; then runs `then` and wakes who waits, both
    /// outside the lock (waking may run executor code that takes it).
    fn set(&self, value: T, then: impl FnOnce()) {
        let wakers = {
            let mut state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
            if state.0.is_some() {
                return;
            }
            state.0 = Some(value);
            std::mem::take(&mut state.1)
        };
        then();
        wakers.into_iter().for_each(Waker::wake);
    }

    fn get(&self) -> Option<T> {
        self.state
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .0
            .clone()
    }

    /// Completes with the value once it is set.
    async fn wait(&self) -> T {
        std::future::poll_fn(|cx| {
            let mut state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
            if let Some(value) = &state.0 {
                return Poll::Ready(value.clone());
            }
            if !state.1.iter().any(|w| w.will_wake(cx.waker())) {
                state.1.push(cx.waker().clone());
            }
            Poll::Pending
        })
        .await
    }
}

/// A QMP client: execute commands and subscribe to events, from any number of tasks at once.
///
/// Clones are cheap and share one connection, driven by a background task that owns the socket.
/// Every call is cancel-safe: dropping its future at any point never leaves half a command on the
/// wire; a command not yet written is never sent, and the late response of one already written is
/// discarded. When the last handle is dropped the connection closes cleanly.
///
/// Get one from an adapter: `qmp_tokio::connect`, `qmp_async_std::connect`, ...
#[derive(Clone)]
pub struct Client {
    pub(crate) shared: Arc<Shared>,
    /// Shared by the clones: when the last is dropped, the connection closes.
    _handle: Arc<Handle>,
    /// `None` only inside a [`GuestAgent`](crate::GuestAgent), which never exposes it.
    greeting: Option<Arc<Greeting>>,
    pub(crate) timeout: Option<Duration>,
}

impl fmt::Debug for Client {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Client")
            .field("version", &self.greeting.as_ref().map(|g| &g.version))
            .field("oob", &self.oob_enabled())
            .field("timeout", &self.timeout)
            .field("closed", &self.is_closed())
            .finish_non_exhaustive()
    }
}

/// Lives as long as some clone of a [`Client`] does; the last one tells the connection's task to
/// close. (Subscriptions keep [`Shared`] alive, but not the connection.)
struct Handle(Arc<Shared>);

impl Drop for Handle {
    fn drop(&mut self) {
        self.0.calls.orphan();
    }
}

/// The result of `add-fd`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize)]
#[non_exhaustive]
pub struct AddFdInfo {
    /// The fd set the descriptor was added to (open it as `/dev/fdset/<fdset-id>`).
    #[serde(rename = "fdset-id")]
    pub fdset_id: u64,
    /// The descriptor's number inside QEMU.
    pub fd: i64,
}

impl Client {
    /// Starts a client over `io`: spawns its driver on `runtime` and waits for the greeting and
    /// negotiation, within the connect timeout. Adapters call this; users call an adapter.
    pub async fn start<T: Transport, S: Timer>(
        io: T,
        timer: S,
        options: Options,
        runtime: Arc<dyn Runtime>,
    ) -> Result<Self, Error> {
        let config = options.config.clone().unwrap_or_default();
        Self::launch(io, timer, options, runtime, Connection::new(config)).await
    }

    /// Spawns the driver of `conn` and waits, within the connect timeout, until it is ready.
    pub(crate) async fn launch<T: Transport, S: Timer>(
        io: T,
        timer: S,
        options: Options,
        runtime: Arc<dyn Runtime>,
        conn: Connection,
    ) -> Result<Self, Error> {
        let (ready_tx, ready_rx) = oneshot::channel();
        // A guest agent never greets: it is synced with instead.
        let greets = conn.state() == qmp_proto::State::AwaitingGreeting;
        let shared = Arc::new(Shared {
            calls: Calls::default(),
            // A guest agent sends no events: nothing to keep for a first subscription.
            hub: Hub::new(greets.then_some(options.event_buffer)),
            runtime: Arc::clone(&runtime),
            oob: AtomicBool::new(false),
            greeted: AtomicBool::new(false),
            can_pass_fds: io.can_pass_fds(),
            event_buffer: options.event_buffer,
            lag_after: options.lag_after,
            closed: Latch::new(),
            released: Latch::new(),
            commands: Mutex::new(None),
        });
        let span = match &options.name {
            Some(name) => tracing::debug_span!("qmp", name = %name),
            None => tracing::debug_span!("qmp"),
        };
        let handle = Arc::new(Handle(Arc::clone(&shared)));
        let driver = Driver::new(conn, io, timer, Arc::clone(&shared), ready_tx);
        let task: BoxFuture = Box::pin(driver.run().instrument(span));
        match &options.spawner {
            Some(spawn) => spawn(task),
            None => runtime.spawn(task),
        }
        // Dropping `handle` on timeout or error ends the driver and closes the socket.
        match race(ready_rx, runtime.sleep(options.connect_timeout)).await {
            None if greets && !shared.greeted.load(Ordering::Acquire) => Err(Error::NoGreeting),
            None => Err(Error::Timeout),
            Some(Err(oneshot::Canceled)) => Err(Error::Disconnected(shared.disconnect_reason())),
            Some(Ok(Err(e))) => Err(e),
            Some(Ok(Ok(greeting))) => Ok(Self {
                shared,
                _handle: handle,
                greeting: greeting.map(Arc::new),
                timeout: options.timeout,
            }),
        }
    }

    // --- Commands ------------------------------------------------------------------------------

    /// Executes `name` with `arguments` (anything that serializes to a JSON object, or `()` for
    /// none) and returns the return value.
    pub async fn execute(&self, name: &str, arguments: impl Serialize) -> Result<Value, Error> {
        let cmd = Command::new(name).arguments(&arguments)?.decode_value();
        self.submit(cmd, Vec::new()).await?.into_value()
    }

    /// Executes `name` and deserializes the return value straight into `R` (no intermediate
    /// `Value`).
    pub async fn execute_as<R: DeserializeOwned>(
        &self,
        name: &str,
        arguments: impl Serialize,
    ) -> Result<R, Error> {
        let cmd = Command::new(name).arguments(&arguments)?;
        let raw = self.submit(cmd, Vec::new()).await?.into_raw()?;
        raw.deserialize().map_err(Error::Decode)
    }

    /// Executes `name` out of band (`exec-oob`): it overtakes in-band commands. Fails with
    /// [`SendError::OobNotEnabled`](qmp_proto::SendError::OobNotEnabled) if OOB was not negotiated.
    pub async fn execute_oob(&self, name: &str, arguments: impl Serialize) -> Result<Value, Error> {
        let cmd = Command::new(name)
            .arguments(&arguments)?
            .oob()
            .decode_value();
        self.submit(cmd, Vec::new()).await?.into_value()
    }

    /// Executes a pre-built command object as given (`{"execute": ..., "arguments": ...}`, for
    /// tools that forward user input); its `id`, if any, is replaced by the client's own.
    pub async fn execute_raw(&self, command: Value) -> Result<Value, Error> {
        let cmd = Command::from_json(command)?.decode_value();
        self.submit(cmd, Vec::new()).await?.into_value()
    }

    /// Executes a [`Command`] built with the core's builder and returns the return value unparsed.
    pub async fn call(&self, command: Command) -> Result<RawJson, Error> {
        self.submit(command, Vec::new()).await?.into_raw()
    }

    /// Executes `name` with file descriptors attached (`SCM_RIGHTS`, unix sockets only). QEMU
    /// hands them to the command that consumes them (`getfd`, `add-fd`, ...).
    pub async fn execute_with_fds(
        &self,
        name: &str,
        arguments: impl Serialize,
        fds: Vec<OwnedFd>,
    ) -> Result<Value, Error> {
        if !self.shared.can_pass_fds {
            return Err(Error::FdPassingUnsupported);
        }
        // More could not be sent, and the failed send would end the connection.
        if fds.len() > crate::MAX_FDS {
            return Err(Error::TooManyFds {
                given: fds.len(),
                limit: crate::MAX_FDS,
            });
        }
        let cmd = Command::new(name).arguments(&arguments)?.decode_value();
        self.submit(cmd, fds).await?.into_value()
    }

    /// Passes `fd` to QEMU under `fdname` (`getfd`), for commands that take an fd by name.
    pub async fn getfd(&self, fdname: &str, fd: OwnedFd) -> Result<(), Error> {
        let args = serde_json::json!({ "fdname": fdname });
        self.execute_with_fds("getfd", args, vec![fd])
            .await
            .map(drop)
    }

    /// Adds `fd` to an fd set (`add-fd`); a new set unless `fdset_id` is given. Files can then be
    /// opened as `/dev/fdset/<fdset-id>`.
    pub async fn add_fd(
        &self,
        fd: OwnedFd,
        fdset_id: Option<u64>,
        opaque: Option<&str>,
    ) -> Result<AddFdInfo, Error> {
        #[derive(Serialize)]
        struct Args<'a> {
            #[serde(rename = "fdset-id", skip_serializing_if = "Option::is_none")]
            fdset_id: Option<u64>,
            #[serde(skip_serializing_if = "Option::is_none")]
            opaque: Option<&'a str>,
        }
        let value = self
            .execute_with_fds("add-fd", Args { fdset_id, opaque }, vec![fd])
            .await?;
        serde_json::from_value(value).map_err(Error::Decode)
    }

    /// A handle to the same connection whose commands time out after `timeout`.
    ///
    /// ```no_run
    /// # async fn f(client: qmp_client::Client) -> Result<(), qmp_client::Error> {
    /// use std::time::Duration;
    /// let status = client.with_timeout(Duration::from_secs(2)).execute("query-status", ()).await?;
    /// # let _ = status; Ok(()) }
    /// ```
    pub fn with_timeout(&self, timeout: Duration) -> Self {
        Self {
            timeout: Some(timeout),
            ..self.clone()
        }
    }

    /// A handle to the same connection whose commands never time out.
    pub fn without_timeout(&self) -> Self {
        Self {
            timeout: None,
            ..self.clone()
        }
    }

    /// Queues `cmd` (with `fds`) under this handle's timeout; the returned call resolves to its
    /// answer.
    ///
    /// A plain function returning the call, not an `async fn`: each layer of `async fn` would keep
    /// its own copy of the command in the caller's future, which is moved whenever the caller's
    /// future is (into a `FuturesUnordered`, a spawned task): 408 bytes for `execute_as` instead
    /// of 136.
    pub(crate) fn submit(&self, mut cmd: Command, fds: Vec<OwnedFd>) -> Call<'_> {
        // A timeout beyond what an `Instant` holds (`Duration::MAX` for "no limit") is none.
        if let Some(at) = self.timeout.and_then(|t| Instant::now().checked_add(t)) {
            cmd = cmd.deadline(at);
        }
        // Dropping the call gives it up; the driver forgets the request: never written if it was
        // still queued, its response discarded otherwise.
        Call::new(&self.shared, cmd, fds)
    }

    // --- Events --------------------------------------------------------------------------------

    /// Subscribes to the events that pass `filter`. The subscription is in place when this
    /// returns, so it sees every event a command sent afterwards causes, even those QEMU sends
    /// before the command's own response.
    ///
    /// No event is lost from the greeting on. Until the first subscription, the connection keeps
    /// the events that arrive (those in the same read as the negotiation's reply, those QEMU sends
    /// right after, a flood already under way) in a backlog of
    /// [`Options::event_buffer`] events; the first subscription (also the one inside
    /// [`wait_for`](Self::wait_for)) starts with those of them that pass its filter, in order,
    /// then carries on with what comes after. When the backlog fills, the connection waits for
    /// that subscription until [`Options::lag_after`] after connecting, then drops events; the
    /// first subscription gets a [`Lagged`](crate::Lagged) with the count where they were
    /// dropped. Later subscriptions see the events from their `subscribe` on. So to see the early
    /// events on several streams, subscribe once, broadly, first, and split from there:
    ///
    /// ```no_run
    /// # async fn f(client: qmp_client::Client) {
    /// use qmp_client::EventFilter;
    ///
    /// // Right after connect: this one also gets what came before it.
    /// let mut everything = client.subscribe(EventFilter::all());
    /// // From now on only.
    /// let jobs = client.subscribe(EventFilter::name("JOB_STATUS_CHANGE"));
    /// while let Some(item) = everything.recv().await {
    ///     match item {
    ///         Ok(event) => println!("{}", event.name),
    ///         Err(lagged) => eprintln!("{lagged}"),
    ///     }
    /// }
    /// # drop(jobs); }
    /// ```
    ///
    /// A subscription that keeps reading loses nothing: when its queue is full the connection
    /// waits for it (see [`Options::lag_after`] for the trade-off).
    pub fn subscribe(&self, filter: EventFilter) -> Subscription {
        let sub = self.shared.hub.subscribe(filter, self.shared.event_buffer);
        Subscription::new(sub, Arc::clone(&self.shared))
    }

    /// Waits up to `timeout` for an event that passes `filter`, from now on (or, as the
    /// connection's first subscription, from the greeting on: see
    /// [`subscribe`](Self::subscribe)). To catch an event a
    /// command causes, subscribe *before* sending the command and wait on the subscription:
    ///
    /// ```no_run
    /// # async fn f(client: qmp_client::Client) -> Result<(), qmp_client::Error> {
    /// use std::time::Duration;
    /// use qmp_client::EventFilter;
    /// use serde_json::json;
    ///
    /// let done = EventFilter::name("BLOCK_JOB_COMPLETED").data(json!({"device": "job0"}));
    /// let mut events = client.subscribe(done.clone());
    /// client.execute("blockdev-backup", json!({"job-id": "job0", "device": "src",
    ///     "target": "tgt", "sync": "full"})).await?;
    /// let event = events.wait_for(&done, Duration::from_secs(30)).await?;
    /// # let _ = event; Ok(()) }
    /// ```
    pub async fn wait_for(&self, filter: EventFilter, timeout: Duration) -> Result<Event, Error> {
        let mut sub = self.subscribe(filter.clone());
        sub.wait_for(&filter, timeout).await
    }

    // --- Introspection -------------------------------------------------------------------------

    /// The server's greeting (version and capabilities).
    pub fn greeting(&self) -> &Greeting {
        // Only a GuestAgent's inner client has none, and it never calls this.
        self.greeting
            .as_deref()
            .unwrap_or_else(|| unreachable!("a QMP client always has its greeting"))
    }

    /// Whether out-of-band execution was negotiated.
    pub fn oob_enabled(&self) -> bool {
        self.shared.oob.load(Ordering::Acquire)
    }

    /// The names of the commands the server has (`query-commands`, asked once and cached).
    pub async fn commands(&self) -> Result<Arc<BTreeSet<String>>, Error> {
        if let Some(cached) = self
            .shared
            .commands
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
        {
            return Ok(cached);
        }
        #[derive(serde::Deserialize)]
        struct Info {
            name: String,
        }
        let list: Vec<Info> = self.execute_as("query-commands", ()).await?;
        let names: Arc<BTreeSet<String>> = Arc::new(list.into_iter().map(|i| i.name).collect());
        *self
            .shared
            .commands
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = Some(Arc::clone(&names));
        Ok(names)
    }

    /// Whether the server has command `name`.
    pub async fn has_command(&self, name: &str) -> Result<bool, Error> {
        Ok(self.commands().await?.contains(name))
    }

    /// The raw `query-qmp-schema`, for those who want to introspect everything.
    pub async fn schema(&self) -> Result<Value, Error> {
        self.execute("query-qmp-schema", ()).await
    }

    // --- Lifecycle -----------------------------------------------------------------------------

    /// Whether the connection is open or why it closed.
    pub fn state(&self) -> State {
        self.shared
            .closed_reason()
            .map_or(State::Open, State::Closed)
    }

    /// Whether the connection has closed.
    pub fn is_closed(&self) -> bool {
        self.shared.closed_reason().is_some()
    }

    /// Completes when the connection closes, with the reason.
    pub async fn closed(&self) -> Disconnect {
        self.shared.closed.wait().await
    }

    /// Closes the connection: bytes already handed to the transport are written, the socket is
    /// shut down, calls still waiting (including ones held back for an OOB window slot) fail with
    /// [`Disconnect::Local`], and subscriptions end. Every handle sees the connection closed.
    /// Returns once the socket is closed (its descriptor too), so the peer has seen the client
    /// leave: a QEMU monitor, which serves one client at a time, is free for the next.
    pub async fn disconnect(&self) {
        let (done, wait) = oneshot::channel();
        if self.shared.calls.request(Request::Close { done }) {
            let _ = wait.await;
        }
        // The driver announces the end before it is dropped, and the socket only closes with
        // it; that holds for a connection already closed by the peer too.
        self.shared.released.wait().await;
    }
}

/// Runs `work` until `deadline` completes: `Some(output)` if the work finished first.
pub(crate) async fn race<F: Future>(
    work: F,
    deadline: impl Future<Output = ()>,
) -> Option<F::Output> {
    let mut work = pin!(work);
    let mut deadline = pin!(deadline);
    std::future::poll_fn(|cx| {
        if let Poll::Ready(out) = work.as_mut().poll(cx) {
            return Poll::Ready(Some(out));
        }
        deadline.as_mut().poll(cx).map(|()| None)
    })
    .await
}
