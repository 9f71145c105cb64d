//! Test kit shared by the adapters' tests: a scripted fake QMP server, and real peers
//! (qemu-storage-daemon) started on temp-dir sockets.
//!
//! Everything here is plain `std` threads and sockets, so the same kit serves tokio, async-std,
//! smol and blocking clients alike. Peers are killed (only the ones started here) and their temp
//! dirs removed when dropped.

#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod scenarios;

use std::collections::VecDeque;
use std::io::{self, IoSliceMut, Read, Write};
use std::mem::MaybeUninit;
use std::os::fd::OwnedFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use rustix::net::{RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags};
use serde_json::{Value, json};
use tempfile::TempDir;

/// The greeting of qemu-storage-daemon 10.0.2 as the fake server sends it.
pub const GREETING: &str = r#"{"QMP": {"version": {"qemu": {"micro": 2, "minor": 0, "major": 10}, "package": "fake"}, "capabilities": ["oob"]}}"#;

/// A scripted fake QMP server on a unix socket in a temp dir. Each connection runs `script` on
/// its own thread.
pub struct FakeServer {
    dir: TempDir,
    path: PathBuf,
    stop: Arc<AtomicBool>,
    connections: Arc<AtomicUsize>,
    thread: Option<JoinHandle<()>>,
    failures: Arc<Mutex<Vec<String>>>,
}

impl FakeServer {
    /// Starts a server running `script` for every connection.
    pub fn start<F>(script: F) -> Self
    where
        F: Fn(&mut ServerConn) + Send + Sync + 'static,
    {
        Self::start_with(None, script)
    }

    /// The same, but its socket appears only after `delay` (as a QEMU just started): until then
    /// [`path`](Self::path) does not exist.
    pub fn start_later<F>(delay: Duration, script: F) -> Self
    where
        F: Fn(&mut ServerConn) + Send + Sync + 'static,
    {
        Self::start_with(Some(delay), script)
    }

    fn start_with<F>(delay: Option<Duration>, script: F) -> Self
    where
        F: Fn(&mut ServerConn) + Send + Sync + 'static,
    {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("qmp.sock");
        let bind = {
            let path = path.clone();
            move || UnixListener::bind(&path).expect("bind fake server")
        };
        let mut listener = match delay {
            None => Some(bind()),
            Some(_) => None,
        };
        let stop = Arc::new(AtomicBool::new(false));
        let connections = Arc::new(AtomicUsize::new(0));
        let failures = Arc::new(Mutex::new(Vec::new()));
        let script = Arc::new(script);
        let thread = {
            let (stop, connections, failures) =
                (stop.clone(), connections.clone(), failures.clone());
            std::thread::spawn(move || {
                if let Some(delay) = delay {
                    std::thread::sleep(delay);
                    if stop.load(Ordering::Acquire) {
                        return;
                    }
                    listener = Some(bind());
                }
                let Some(listener) = listener else { return };
                for stream in listener.incoming() {
                    if stop.load(Ordering::Acquire) {
                        break;
                    }
                    let Ok(stream) = stream else { continue };
                    connections.fetch_add(1, Ordering::AcqRel);
                    let (script, failures) = (script.clone(), failures.clone());
                    std::thread::spawn(move || {
                        let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                            let mut conn = ServerConn::from_stream(stream);
                            script(&mut conn);
                        }));
                        if let Err(panic) = result {
                            let msg = panic
                                .downcast_ref::<String>()
                                .cloned()
                                .or_else(|| panic.downcast_ref::<&str>().map(|s| (*s).to_owned()))
                                .unwrap_or_default();
                            // A client that hangs up early makes scripted writes fail: not a bug.
                            if !msg.contains("Broken pipe") && !msg.contains("Connection reset") {
                                failures.lock().expect("failures").push(msg);
                            }
                        }
                    });
                }
            })
        };
        Self {
            dir,
            path,
            stop,
            connections,
            thread: Some(thread),
            failures,
        }
    }

    /// The socket path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The temp dir the socket lives in.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// How many connections were accepted.
    pub fn connections(&self) -> usize {
        self.connections.load(Ordering::Acquire)
    }

    /// Panics if a script panicked (an assertion in the server script failed).
    pub fn check(&self) {
        let failures = self.failures.lock().expect("failures");
        assert!(
            failures.is_empty(),
            "fake server script failed: {failures:?}"
        );
    }
}

impl Drop for FakeServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
        if let Some(t) = self.thread.take() {
            // Wake the accept loop; again if it was still binding (`start_later`).
            while !t.is_finished() {
                let _ = UnixStream::connect(&self.path);
                std::thread::sleep(Duration::from_millis(5));
            }
            let _ = t.join();
        }
        if !std::thread::panicking() {
            self.check();
        }
    }
}

/// A command the fake server received.
#[derive(Debug)]
pub struct Received {
    /// The command object.
    pub command: Value,
    /// File descriptors that arrived with its bytes.
    pub fds: Vec<OwnedFd>,
}

impl Received {
    /// The command name (`execute` or `exec-oob`).
    pub fn name(&self) -> &str {
        self.command
            .get("execute")
            .or_else(|| self.command.get("exec-oob"))
            .and_then(Value::as_str)
            .unwrap_or("")
    }

    /// Whether it was sent with `exec-oob`.
    pub fn is_oob(&self) -> bool {
        self.command.get("exec-oob").is_some()
    }

    /// Its arguments (`null` when absent).
    pub fn arguments(&self) -> &Value {
        self.command.get("arguments").unwrap_or(&Value::Null)
    }
}

/// One connection of a [`FakeServer`], from the server's side.
pub struct ServerConn {
    stream: UnixStream,
    inbox: Vec<u8>,
    commands: VecDeque<Received>,
    fds: Vec<OwnedFd>,
    /// Render messages like a `pretty=on` monitor.
    pub pretty: bool,
    /// `0xFF` bytes received (a guest-agent client's resyncs); they are dropped from the input.
    pub sentinels: usize,
    /// End messages with `\n` as the guest agent does, instead of QEMU's `\r\n`.
    pub lf: bool,
}

/// Takes the whole JSON values at the start of `inbox`, leaving an incomplete one there. Clients
/// write commands back to back, with or without a newline (QEMU ends a command at its closing
/// brace), so a server reads them as a JSON stream, not as lines.
pub fn take_commands(inbox: &mut Vec<u8>) -> Vec<Value> {
    let mut stream = serde_json::Deserializer::from_slice(inbox).into_iter::<Value>();
    let mut consumed = 0;
    let mut got = Vec::new();
    while let Some(Ok(v)) = stream.next() {
        consumed = stream.byte_offset();
        got.push(v);
    }
    inbox.drain(..consumed);
    got
}

impl ServerConn {
    /// Serves the client on the other end of `stream` (for socketpair tests).
    pub fn from_stream(stream: UnixStream) -> Self {
        Self {
            stream,
            inbox: Vec::new(),
            commands: VecDeque::new(),
            fds: Vec::new(),
            pretty: false,
            sentinels: 0,
            lf: false,
        }
    }

    /// Sends raw bytes.
    pub fn send_raw(&mut self, bytes: &[u8]) {
        self.stream.write_all(bytes).expect("fake server write");
    }

    /// Sends `bytes` in pieces of `piece` bytes, pausing `pause` between them.
    pub fn send_fragmented(&mut self, bytes: &[u8], piece: usize, pause: Duration) {
        for chunk in bytes.chunks(piece.max(1)) {
            self.send_raw(chunk);
            self.stream.flush().expect("flush");
            std::thread::sleep(pause);
        }
    }

    /// Sends a JSON message (compact or pretty), CRLF-terminated as QEMU does.
    pub fn send(&mut self, msg: &Value) {
        let mut text = if self.pretty {
            serde_json::to_string_pretty(msg)
                .expect("json")
                .replace('\n', "\r\n")
        } else {
            msg.to_string()
        };
        text.push_str(if self.lf { "\n" } else { "\r\n" });
        self.send_raw(text.as_bytes());
    }

    /// Acts as a guest agent answering a resync: reads the `0xFF` and `guest-sync-delimited`
    /// (skipping commands before it, which a resync supersedes), complains about the `0xFF` as
    /// qemu-ga does, and replies with the id behind a `0xFF`. Returns the sync id.
    pub fn agent_sync(&mut self) -> i64 {
        self.lf = true;
        let sync = loop {
            let r = self.recv().expect("EOF while expecting a resync");
            if r.name() == "guest-sync-delimited" {
                break r;
            }
        };
        assert!(self.sentinels > 0, "a resync without the 0xFF byte first");
        let id = sync.arguments()["id"].as_i64().expect("an integer sync id");
        self.send(&json!({"error": {"class": "GenericError",
            "desc": "JSON parse error, stray '\u{FFFD}'"}}));
        self.send_raw(b"\xff");
        self.send(&json!({ "return": id }));
        id
    }

    /// Sends the greeting, offering `oob` or not.
    pub fn greet(&mut self, oob: bool) {
        let caps: Vec<&str> = if oob { vec!["oob"] } else { vec![] };
        self.send(
            &json!({"QMP": {"version": {"qemu": {"micro": 2, "minor": 0, "major": 10},
            "package": "fake"}, "capabilities": caps}}),
        );
    }

    /// Greets (offering OOB) and answers `qmp_capabilities`. Returns the capabilities asked for.
    pub fn handshake(&mut self) -> Value {
        self.greet(true);
        let caps = self.recv().expect("qmp_capabilities");
        assert_eq!(caps.name(), "qmp_capabilities", "first command");
        self.reply(&caps.command, json!({}));
        caps.arguments().get("enable").cloned().unwrap_or(json!([]))
    }

    /// The next command from the client, or `None` at end of stream.
    pub fn recv(&mut self) -> Option<Received> {
        loop {
            if let Some(r) = self.commands.pop_front() {
                return Some(r);
            }
            let mut buf = vec![0u8; 64 << 10];
            let n = self.read_with_fds(&mut buf).ok()?;
            if n == 0 {
                return None;
            }
            for &b in &buf[..n] {
                // The guest agent's sentinel: never part of JSON, so count and drop it.
                if b == 0xFF {
                    self.sentinels += 1;
                } else {
                    self.inbox.push(b);
                }
            }
            let got = take_commands(&mut self.inbox);
            let mut fds = std::mem::take(&mut self.fds);
            for command in got {
                // Descriptors belong to the first command read with them.
                self.commands.push_back(Received {
                    command,
                    fds: std::mem::take(&mut fds),
                });
            }
            self.fds = fds;
        }
    }

    /// Whether nothing more arrives from the client within `wait`: no command already read and
    /// waiting, and no byte on the socket. For checking that a client sends one command at a time.
    pub fn nothing_more_within(&mut self, wait: Duration) -> bool {
        use rustix::event::{PollFd, PollFlags, Timespec};
        if !self.commands.is_empty() {
            return false;
        }
        let timeout = Timespec {
            tv_sec: wait.as_secs() as i64,
            tv_nsec: i64::from(wait.subsec_nanos()),
        };
        let mut fds = [PollFd::new(&self.stream, PollFlags::IN)];
        matches!(rustix::event::poll(&mut fds, Some(&timeout)), Ok(0))
    }

    /// Reads the next command and checks its name.
    pub fn expect(&mut self, name: &str) -> Received {
        let r = self
            .recv()
            .unwrap_or_else(|| panic!("EOF while expecting {name}"));
        assert_eq!(r.name(), name, "unexpected command {}", r.command);
        r
    }

    fn read_with_fds(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(8))];
        let mut control = RecvAncillaryBuffer::new(&mut space);
        let mut iov = [IoSliceMut::new(buf)];
        let msg = rustix::net::recvmsg(
            &self.stream,
            &mut iov,
            &mut control,
            RecvFlags::CMSG_CLOEXEC,
        )?;
        for m in control.drain() {
            if let RecvAncillaryMessage::ScmRights(fds) = m {
                self.fds.extend(fds);
            }
        }
        Ok(msg.bytes)
    }

    /// Answers `command` with a return value, echoing its id.
    pub fn reply(&mut self, command: &Value, ret: Value) {
        let mut msg = json!({ "return": ret });
        if let Some(id) = command.get("id") {
            msg["id"] = id.clone();
        }
        self.send(&msg);
    }

    /// Answers `command` with an error, echoing its id.
    pub fn reply_error(&mut self, command: &Value, class: &str, desc: &str) {
        let mut msg = json!({ "error": {"class": class, "desc": desc} });
        if let Some(id) = command.get("id") {
            msg["id"] = id.clone();
        }
        self.send(&msg);
    }

    /// An error without an id, as QEMU sends when it cannot parse its input.
    pub fn idless_error(&mut self, desc: &str) {
        self.send(&json!({"error": {"class": "GenericError", "desc": desc}}));
    }

    /// An event with a real-looking timestamp.
    pub fn event(&mut self, name: &str, data: Value) {
        self.send(
            &json!({"timestamp": {"seconds": 1795648047, "microseconds": 84562},
            "event": name, "data": data}),
        );
    }

    /// Serves until the client hangs up: `query-version` gets a real answer, everything else
    /// `{}`, each echoing its id.
    pub fn serve_forever(&mut self) {
        while let Some(r) = self.recv() {
            let ret = if r.name() == "query-version" {
                json!({"qemu": {"micro": 2, "minor": 0, "major": 10}, "package": "fake"})
            } else {
                json!({})
            };
            self.reply(&r.command, ret);
        }
    }

    /// Serves until the client hangs up, answering every command with its `echo` argument
    /// (`null` without one), so a test can tell each reply's command.
    pub fn serve_echo(&mut self) {
        while let Some(r) = self.recv() {
            let echo = r.arguments()["echo"].clone();
            self.reply(&r.command, echo);
        }
    }

    /// Closes the connection (both directions).
    pub fn close(&mut self) {
        let _ = self.stream.shutdown(std::net::Shutdown::Both);
    }

    /// The underlying socket.
    pub fn stream(&mut self) -> &mut UnixStream {
        &mut self.stream
    }
}

/// Looks a program up on `PATH`, then in the sbin directories (Debian installs `qemu-ga` in
/// `/usr/sbin`, which a non-root user's `PATH` lacks); panics with a clear message when it is
/// missing, so a test that needs a real peer fails loudly instead of passing silently.
pub fn require(program: &str, package: &str) -> PathBuf {
    let path = std::env::var_os("PATH").unwrap_or_default();
    let sbin = ["/usr/local/sbin", "/usr/sbin", "/sbin"].map(PathBuf::from);
    std::env::split_paths(&path)
        .chain(sbin)
        .map(|dir| dir.join(program))
        .find(|p| p.is_file())
        .unwrap_or_else(|| {
            panic!(
                "{program} not found on PATH nor in /usr/local/sbin, /usr/sbin, /sbin: install \
                 {package} (tests need a real peer)"
            )
        })
}

/// A qemu-storage-daemon started by a test, on a socket in its own temp dir. Dropping it kills it
/// (only it) and removes the dir.
pub struct Qsd {
    child: Child,
    dir: TempDir,
    socket: PathBuf,
    /// Further monitors ([`Qsd::start_monitors`]).
    more: Vec<PathBuf>,
}

impl Qsd {
    /// Starts a daemon listening on a QMP socket (`server=on`); waits until it is ready.
    pub fn start() -> Self {
        Self::start_with(false)
    }

    /// The same with `pretty=on` (multi-line output).
    pub fn start_pretty() -> Self {
        Self::start_with(true)
    }

    fn start_with(pretty: bool) -> Self {
        let dir = tempfile::tempdir().expect("temp dir");
        let socket = dir.path().join("qmp.sock");
        let monitor = if pretty {
            "chardev=m,pretty=on"
        } else {
            "chardev=m"
        };
        let chardev = format!("socket,path={},server=on,wait=off,id=m", socket.display());
        let child = spawn_qsd(dir.path(), &[(chardev, monitor.to_owned())]);
        let qsd = Self {
            child,
            dir,
            socket,
            more: Vec::new(),
        };
        qsd.wait_until_ready();
        qsd
    }

    /// A daemon with `n` monitors (at least one), each on its own socket: QEMU serves one client
    /// per monitor and sends events to all of them, so one client can watch while another acts.
    pub fn start_monitors(n: usize) -> Self {
        let dir = tempfile::tempdir().expect("temp dir");
        let sockets: Vec<PathBuf> = (0..n.max(1))
            .map(|i| dir.path().join(format!("qmp{i}.sock")))
            .collect();
        let monitors: Vec<(String, String)> = sockets
            .iter()
            .enumerate()
            .map(|(i, s)| {
                let chardev = format!("socket,path={},server=on,wait=off,id=m{i}", s.display());
                (chardev, format!("chardev=m{i}"))
            })
            .collect();
        let child = spawn_qsd(dir.path(), &monitors);
        let mut sockets = sockets.into_iter();
        let socket = sockets.next().expect("one monitor at least");
        let qsd = Self {
            child,
            dir,
            socket,
            more: sockets.collect(),
        };
        qsd.wait_until_ready();
        qsd
    }

    /// Every monitor socket: [`socket`](Self::socket) first.
    pub fn sockets(&self) -> impl Iterator<Item = &Path> {
        std::iter::once(self.socket.as_path()).chain(self.more.iter().map(PathBuf::as_path))
    }

    /// Starts a daemon whose monitor listens at `socket`, without waiting for it to be ready (as
    /// a program that has just started QEMU would). QEMU replaces a stale socket file there.
    pub fn listen_at(socket: &Path) -> Self {
        Self::unwaited(socket, "server=on,wait=off")
    }

    /// Starts a daemon that connects to `socket` (`server=off`), for accept-mode tests. Bind the
    /// listener first.
    pub fn connect_to(socket: &Path) -> Self {
        Self::unwaited(socket, "server=off")
    }

    /// Starts a daemon that connects to us over TCP at `address` (`host=...,port=...,server=off`),
    /// for accept-mode tests. Bind the listener first. Its [`socket`](Self::socket) is meaningless.
    pub fn connect_to_tcp(address: std::net::SocketAddr) -> Self {
        let endpoint = format!("host={},port={}", address.ip(), address.port());
        Self::with_chardev(Path::new("tcp"), &endpoint, "server=off")
    }

    /// A daemon with one monitor on a socket chardev at `socket` with `mode`, not waited for.
    fn unwaited(socket: &Path, mode: &str) -> Self {
        Self::with_chardev(socket, &format!("path={}", socket.display()), mode)
    }

    /// A daemon with one monitor on a socket chardev at `endpoint` (`path=...` or
    /// `host=...,port=...`) with `mode`, not waited for.
    fn with_chardev(socket: &Path, endpoint: &str, mode: &str) -> Self {
        let dir = tempfile::tempdir().expect("temp dir");
        let chardev = format!("socket,{endpoint},{mode},id=m");
        let child = spawn_qsd(dir.path(), &[(chardev, "chardev=m".to_owned())]);
        Self {
            child,
            dir,
            socket: socket.to_owned(),
            more: Vec::new(),
        }
    }

    /// Waits until the daemon is ready for clients: its pid file, which it writes once every
    /// chardev and monitor is set up (an ordering QEMU documents). Its sockets listen earlier;
    /// a client that connected in between was sometimes never greeted, or dropped.
    fn wait_until_ready(&self) {
        let pidfile = self.dir.path().join(QSD_PIDFILE);
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::fs::metadata(&pidfile).map_or(true, |m| m.len() == 0) {
            assert!(
                Instant::now() < deadline,
                "qemu-storage-daemon was not ready within 10 s"
            );
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// The QMP socket path.
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// A scratch dir that lives as long as the daemon.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// The daemon's pid.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Stops the daemon (SIGSTOP): its sockets take what clients write, and nothing is answered.
    pub fn pause(&self) {
        let status = Command::new("kill")
            .arg("-STOP")
            .arg(self.child.id().to_string())
            .status()
            .expect("kill -STOP");
        assert!(status.success(), "kill -STOP failed");
    }

    /// Kills the daemon with SIGKILL now (as a crash would).
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The daemon's standard error, kept in its scratch dir.
const QSD_STDERR: &str = "qemu-storage-daemon.stderr";

/// The daemon's pid file, in its scratch dir: written once its chardevs and monitors exist.
const QSD_PIDFILE: &str = "qemu-storage-daemon.pid";

fn spawn_qsd(dir: &Path, monitors: &[(String, String)]) -> Child {
    let program = require("qemu-storage-daemon", "qemu-utils");
    let stderr = std::fs::File::create(dir.join(QSD_STDERR)).expect("a file for its stderr");
    let mut cmd = Command::new(program);
    cmd.arg("--pidfile").arg(dir.join(QSD_PIDFILE));
    for (chardev, monitor) in monitors {
        cmd.args(["--chardev", chardev, "--monitor", monitor]);
    }
    cmd.stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(stderr)
        .spawn()
        .expect("start qemu-storage-daemon")
}

impl Drop for Qsd {
    fn drop(&mut self) {
        self.kill();
        // A failing test shows what the daemon said: it is how a daemon-side fault shows up
        // (qemu-storage-daemon 10.0 sometimes logs a GLib assertion from its socket chardev and
        // then stops serving a client that reconnected at once).
        if std::thread::panicking() {
            let said =
                std::fs::read_to_string(self.dir.path().join(QSD_STDERR)).unwrap_or_default();
            if !said.is_empty() {
                eprintln!("qemu-storage-daemon's stderr:\n{said}");
            }
        }
    }
}

/// Reads everything a socket sends until EOF or `timeout` (for tests of raw wire behaviour).
pub fn read_until_eof(stream: &mut UnixStream, timeout: Duration) -> Vec<u8> {
    stream.set_read_timeout(Some(timeout)).expect("timeout");
    let mut out = Vec::new();
    let _ = stream.read_to_end(&mut out);
    out
}

/// A guest agent (`qemu-ga`) started by a test on a unix socket in its own temp dir, with its own
/// state dir and pidfile. The commands that would shut down or suspend the machine it runs on
/// are blocked (`-b`), so a test calling them gets the agent's error instead. Dropping it kills it
/// (only it) and removes the dir.
pub struct QemuGa {
    child: Child,
    dir: TempDir,
    socket: PathBuf,
}

impl QemuGa {
    /// Starts `qemu-ga -m unix-listen` and waits until its socket exists.
    pub fn start() -> Self {
        let program = require("qemu-ga", "qemu-guest-agent");
        let dir = tempfile::tempdir().expect("temp dir");
        let socket = dir.path().join("qga.sock");
        let state = dir.path().join("state");
        std::fs::create_dir(&state).expect("state dir");
        let child = Command::new(program)
            .arg("-m")
            .arg("unix-listen")
            .arg("-p")
            .arg(&socket)
            .arg("-t")
            .arg(&state)
            .arg("-f")
            .arg(dir.path().join("qga.pid"))
            .arg("-b")
            .arg(qmp_client::NO_SUCCESS_RESPONSE.join(","))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start qemu-ga");
        wait_until_listening(&socket, "qemu-ga");
        Self { child, dir, socket }
    }

    /// The agent's socket.
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// A scratch dir that lives as long as the agent (for files it reads and writes).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// Stops the agent (`SIGSTOP`) as a stalled guest would: commands wait unread until
    /// [`resume`](Self::resume).
    pub fn pause(&self) {
        self.signal("-STOP");
    }

    /// Lets a [`pause`](Self::pause)d agent go on (`SIGCONT`).
    pub fn resume(&self) {
        self.signal("-CONT");
    }

    fn signal(&self, signal: &str) {
        let status = Command::new("kill")
            .arg(signal)
            .arg(self.child.id().to_string())
            .status()
            .expect("kill");
        assert!(status.success(), "kill {signal} failed");
    }

    /// Whether the agent is still running.
    pub fn is_running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }
}

impl Drop for QemuGa {
    fn drop(&mut self) {
        // SIGKILL works on a stopped process too.
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Waits until a unix socket at `path` accepts connections. The file appears at `bind`, a moment
/// before `listen`: a connect in between is refused. `/proc/net/unix` says when the socket
/// listens, without connecting (which would take a one-client monitor's only slot).
pub fn wait_until_listening(path: &Path, program: &str) {
    // __SO_ACCEPTCON in the Flags column: a listening socket.
    const LISTENING: &str = "00010000";
    let deadline = Instant::now() + Duration::from_secs(10);
    let path = path.to_string_lossy();
    loop {
        let table = std::fs::read_to_string("/proc/net/unix").unwrap_or_default();
        let listening = table.lines().any(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            fields.len() >= 8 && fields[3] == LISTENING && fields[7..].join(" ") == path
        });
        if listening {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{program} did not listen on {path} within 10 s"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}
