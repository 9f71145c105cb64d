//! The connection: a QMP monitor or a guest agent, how to reach it, and the exchange log.

use std::fs::File;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use qmp_tokio::{Address, Client, Config, Error, GuestAgent, Options};
use serde_json::{Value, json};

/// What the CLI talks to.
#[derive(Clone)]
pub(crate) enum Peer {
    /// A QMP monitor (QEMU, qemu-storage-daemon).
    Qmp(Client),
    /// A guest agent (`qemu-ga`).
    Agent(GuestAgent),
}

impl Peer {
    /// The QMP client, if this is a monitor.
    /// Whether the connection has ended.
    pub(crate) fn is_closed(&self) -> bool {
        match self {
            Self::Qmp(c) => c.is_closed(),
            Self::Agent(a) => a.is_closed(),
        }
    }

    pub(crate) fn client(&self) -> Option<&Client> {
        match self {
            Self::Qmp(c) => Some(c),
            Self::Agent(_) => None,
        }
    }

    async fn execute_raw(&self, command: Value) -> Result<Value, Error> {
        match self {
            Self::Qmp(c) => c.execute_raw(command).await,
            Self::Agent(a) => a.execute_raw(command).await,
        }
    }

    /// Closes the connection.
    pub(crate) async fn disconnect(&self) {
        match self {
            Self::Qmp(c) => c.disconnect().await,
            Self::Agent(a) => a.disconnect().await,
        }
    }
}

/// Where to find the peer.
#[derive(Debug)]
pub(crate) enum Target {
    /// Connect to this address.
    Connect(String),
    /// Listen here and wait for QEMU to connect.
    Listen(String),
}

/// How to connect.
#[derive(Debug)]
pub(crate) struct ConnectSpec {
    /// Where.
    pub(crate) target: Target,
    /// A guest agent rather than a QMP monitor.
    pub(crate) agent: bool,
    /// Connect and per-command timeout.
    pub(crate) timeout: Option<Duration>,
    /// Retry while nothing listens at the address yet.
    pub(crate) wait_for_server: bool,
    /// Skip `qmp_capabilities`.
    pub(crate) no_negotiate: bool,
}

/// Connects (or accepts) as `spec` says.
pub(crate) async fn connect(spec: &ConnectSpec) -> Result<Peer, Error> {
    let mut options = Options::new()
        .name("qmp")
        .wait_for_server(spec.wait_for_server);
    if let Some(t) = spec.timeout {
        options = options.connect_timeout(t).timeout(t);
    }
    // A guest agent has no capabilities to negotiate (and keeps its own limits).
    if spec.no_negotiate && !spec.agent {
        let config = Config::builder()
            .negotiate(false)
            .build()
            .expect("the default limits are valid");
        options = options.config(config);
    }
    match &spec.target {
        Target::Connect(address) => {
            let address = Address::from(address.as_str());
            Ok(if spec.agent {
                Peer::Agent(qmp_tokio::connect_guest_agent(address, options).await?)
            } else {
                Peer::Qmp(qmp_tokio::connect(address, options).await?)
            })
        }
        Target::Listen(address) => {
            let listener = qmp_tokio::Listener::bind(address.as_str()).await?;
            warn!("qmp: waiting for QEMU to connect to {address}");
            Ok(if spec.agent {
                Peer::Agent(listener.accept_guest_agent(options).await?)
            } else {
                Peer::Qmp(listener.accept(options).await?)
            })
        }
    }
}

/// A connected peer plus the `--verbose` and `--log` options.
pub(crate) struct Session {
    /// The peer.
    pub(crate) peer: Peer,
    /// Print what is sent and received on stderr.
    pub(crate) verbose: bool,
    /// Append every exchange here as a JSON line.
    pub(crate) log: Option<Mutex<File>>,
}

impl Session {
    /// Sends `command` (a full `{"execute": ...}` object) and returns the return value, echoing
    /// and logging the exchange as configured.
    pub(crate) async fn execute(&self, command: Value) -> Result<Value, Error> {
        if self.verbose {
            warn!("-> {command}");
        }
        let result = self.peer.execute_raw(command.clone()).await;
        let response = match &result {
            Ok(v) => json!({"return": v}),
            Err(Error::Qmp(q)) => json!({"error": {"class": q.class, "desc": q.desc}}),
            Err(e) => json!({"client-error": e.to_string()}),
        };
        if self.verbose {
            warn!("<- {response}");
        }
        if let Some(log) = &self.log {
            let time = SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0.0, |d| d.as_secs_f64());
            let line = json!({"time": time, "command": command, "response": response});
            let mut file = log
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            if let Err(e) = writeln!(file, "{line}") {
                warn!("qmp: cannot write the log: {e}");
            }
        }
        result
    }
}

/// Opens `path` for appending the exchange log.
pub(crate) fn open_log(path: &Path) -> std::io::Result<Mutex<File>> {
    File::options()
        .create(true)
        .append(true)
        .open(path)
        .map(Mutex::new)
}

/// A qemu-storage-daemon started by `--spawn-qsd` on a socket in a temp dir; killed (and the dir
/// removed) when dropped.
pub(crate) struct SpawnedQsd {
    child: Child,
    socket: PathBuf,
    _dir: tempfile::TempDir,
}

impl SpawnedQsd {
    /// Starts the daemon and waits (up to `timeout`) until it is ready for clients.
    pub(crate) fn start(timeout: Duration) -> std::io::Result<Self> {
        let dir = tempfile::Builder::new().prefix("qmp-cli-").tempdir()?;
        let socket = dir.path().join("qmp.sock");
        let chardev = format!("socket,path={},server=on,wait=off,id=m", socket.display());
        let pidfile = dir.path().join("qsd.pid");
        let child = Command::new("qemu-storage-daemon")
            .args(["--chardev", &chardev, "--monitor", "chardev=m"])
            .arg("--pidfile")
            .arg(&pidfile)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .spawn()
            .map_err(|e| {
                std::io::Error::new(e.kind(), format!("cannot start qemu-storage-daemon: {e}"))
            })?;
        let mut qsd = Self {
            child,
            socket,
            _dir: dir,
        };
        // `None`: a timeout too large for an `Instant`, no limit.
        let deadline = Instant::now().checked_add(timeout);
        // Ready once it has written its pid file, which QEMU documents it does after setting up
        // every chardev and monitor (its socket listens earlier; a client that connects in
        // between is not always served).
        while std::fs::metadata(&pidfile).map_or(true, |m| m.len() == 0) {
            if let Some(status) = qsd.child.try_wait()? {
                return Err(std::io::Error::other(format!(
                    "qemu-storage-daemon exited early ({status})"
                )));
            }
            if deadline.is_some_and(|d| Instant::now() > d) {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    "qemu-storage-daemon was not ready in time",
                ));
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        Ok(qsd)
    }

    /// The daemon's QMP socket.
    pub(crate) fn socket(&self) -> &Path {
        &self.socket
    }
}

impl Drop for SpawnedQsd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
