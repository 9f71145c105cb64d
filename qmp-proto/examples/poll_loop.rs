//! A complete QMP client over a plain blocking [`UnixStream`], driving [`Connection`] from a
//! poll-style loop of a few dozen lines: proof that a program with its own event loop needs nothing
//! but the core (and `std`, and `serde_json` for the arguments).
//!
//! ```text
//! cargo run -p qmp-proto --example poll_loop -- --socket /path/to/qmp.sock
//! cargo run -p qmp-proto --example poll_loop
//! ```
//!
//! With `--socket` it talks to an existing QMP monitor socket. Without it, it starts its own
//! `qemu-storage-daemon` in a fresh temporary directory (and stops it and removes the directory
//! when done, on error paths too). Then it prints the greeting, runs `query-version` and
//! `query-block-jobs` (the latter with a 5 s deadline), adds two `null-co` block nodes, starts a
//! `blockdev-backup` job between them, and prints events as they arrive until
//! `BLOCK_JOB_COMPLETED`.
//!
//! The loop is `Client::turn`: write what [`Connection::poll_transmit`] holds, wait for input
//! no longer than [`Connection::poll_timeout`] says, feed what was read to
//! [`Connection::handle_input`] (or [`Connection::handle_eof`]), and let
//! [`Connection::handle_timeout`] expire deadlines. Everything else is the application draining
//! [`Connection::poll_output`].

// The crate's clippy.toml keeps sockets and clocks out of the IO-free core; this example is the IO
// side that the core leaves to its users, so it needs both.
#![allow(clippy::disallowed_types, clippy::disallowed_methods)]

use std::error::Error;
use std::io::{self, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, ExitCode, Stdio};
use std::time::{Duration, Instant};

use qmp_proto::{Command, Connection, Output, RawJson};
use serde_json::json;

type Result<T, E = Box<dyn Error>> = std::result::Result<T, E>;

/// How long to wait for a freshly started `qemu-storage-daemon` to create its socket.
const STARTUP_TIMEOUT: Duration = Duration::from_secs(10);

fn main() -> ExitCode {
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("poll_loop: error: {e}");
            ExitCode::FAILURE
        }
    }
}

fn run() -> Result<()> {
    let mut args = std::env::args().skip(1);
    let socket = match (args.next().as_deref(), args.next(), args.next()) {
        (None, ..) => None,
        (Some("--socket"), Some(path), None) => Some(PathBuf::from(path)),
        _ => return Err("usage: poll_loop [--socket PATH]".into()),
    };
    // Declared before the client so that it is dropped (the daemon stopped) after the socket.
    let mut daemon;
    let stream = match socket {
        Some(path) => UnixStream::connect(&path)
            .map_err(|e| format!("cannot connect to {}: {e}", path.display()))?,
        None => {
            daemon = Daemon::start()?;
            println!(
                "started qemu-storage-daemon (pid {}) on {}",
                daemon.child.id(),
                daemon.socket.display()
            );
            daemon.connect()?
        }
    };
    let mut client = Client::new(stream);

    let version = client.call(Command::new("query-version"))?;
    println!("query-version -> {version}");
    let deadline = Instant::now() + Duration::from_secs(5);
    let jobs = client.call(Command::new("query-block-jobs").deadline(deadline))?;
    println!("query-block-jobs (5 s deadline) -> {jobs}");

    for node in ["src", "tgt"] {
        let args = json!({"driver": "null-co", "node-name": node, "size": 67_108_864});
        let ret = client.call(Command::new("blockdev-add").arguments(&args)?)?;
        println!("blockdev-add {node} -> {ret}");
    }
    let args = json!({"job-id": "job0", "device": "src", "target": "tgt", "sync": "full"});
    let ret = client.call(Command::new("blockdev-backup").arguments(&args)?)?;
    println!("blockdev-backup -> {ret}");
    while !client.job_completed {
        let out = client.next_output()?;
        client.show(out)?;
    }
    let stats = client.conn.stats();
    println!(
        "done: {} messages, {} events, {} bytes received, {} bytes sent",
        stats.messages, stats.events, stats.bytes_received, stats.bytes_sent
    );
    Ok(())
}

/// A [`Connection`] and the socket it runs over.
struct Client {
    conn: Connection,
    sock: UnixStream,
    buf: Vec<u8>,
    /// `BLOCK_JOB_COMPLETED` was seen.
    job_completed: bool,
}

impl Client {
    fn new(sock: UnixStream) -> Self {
        Self {
            conn: Connection::default(),
            sock,
            buf: vec![0; 64 << 10],
            job_completed: false,
        }
    }

    /// One turn of the loop: write everything there is to send, wait for input until the
    /// earliest request deadline at most, and hand what happened to the connection.
    fn turn(&mut self) -> io::Result<()> {
        while let Some(transmit) = self.conn.poll_transmit() {
            // This client sends no file descriptors, so `transmit.fds_for` is always `None`.
            let n = self.sock.write(transmit.data)?;
            if n == 0 {
                return Err(io::ErrorKind::WriteZero.into());
            }
            self.conn.advance_transmit(n);
        }
        if self.conn.wants_read() {
            // `None` blocks until input; a zero timeout is an error, so wait at least 1 ms.
            let timeout = self.conn.poll_timeout().map(|at| {
                at.saturating_duration_since(Instant::now())
                    .max(Duration::from_millis(1))
            });
            self.sock.set_read_timeout(timeout)?;
            match self.sock.read(&mut self.buf) {
                Ok(0) => self.conn.handle_eof(),
                Ok(n) => self.conn.handle_input(&self.buf[..n]),
                Err(e) if is_retry(&e) => {}
                Err(e) => return Err(e),
            }
        }
        self.conn.handle_timeout(Instant::now());
        Ok(())
    }

    /// The next output, turning the loop until there is one.
    fn next_output(&mut self) -> Result<Output> {
        loop {
            if let Some(out) = self.conn.poll_output() {
                return Ok(out);
            }
            if let Some(reason) = self.conn.close_reason() {
                return Err(format!("connection closed: {reason}").into());
            }
            self.turn()?;
        }
    }

    /// Sends `cmd` and returns its return value, showing whatever else arrives meanwhile.
    fn call(&mut self, cmd: Command) -> Result<RawJson> {
        let name = cmd.name().to_owned();
        let id = self.conn.send(cmd)?;
        loop {
            match self.next_output()? {
                Output::Response { id: got, result } if got == id => {
                    return result.map_err(|e| format!("{name}: {e}").into());
                }
                other => self.show(other)?,
            }
        }
    }

    /// Prints an output that is not the response being waited for.
    fn show(&mut self, out: Output) -> Result<()> {
        match out {
            Output::Greeting(g) => println!(
                "greeting: QEMU {}, capabilities {:?}",
                g.version, g.capabilities
            ),
            Output::Ready { oob } => println!("negotiated capabilities (oob: {oob})"),
            Output::Event(e) => {
                let data = e.data.as_ref().map_or("", RawJson::get);
                let t = e.timestamp;
                println!(
                    "event {}.{:06} {} {data}",
                    t.seconds, t.microseconds, e.name
                );
                self.job_completed |= e.name == "BLOCK_JOB_COMPLETED";
            }
            Output::Response { id, result } => println!("response to #{id}: {result:?}"),
            Output::Unmatched(u) => eprintln!("warning: unmatched response: {:?}", u.result),
            Output::Malformed(m) => eprintln!("warning: skipped from the server: {m}"),
            Output::Closed(reason) => return Err(format!("connection closed: {reason}").into()),
            other => println!("{other:?}"),
        }
        Ok(())
    }
}

/// A read that timed out (a deadline may have passed) or was interrupted: try again.
fn is_retry(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut | io::ErrorKind::Interrupted
    )
}

/// A `qemu-storage-daemon` of our own, in its own temporary directory. Dropping it kills and
/// reaps exactly that process and removes the directory.
struct Daemon {
    child: Child,
    dir: PathBuf,
    socket: PathBuf,
}

impl Daemon {
    fn start() -> Result<Self> {
        let dir = std::env::temp_dir().join(format!("qmp-poll-loop-{}", std::process::id()));
        std::fs::create_dir(&dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
        let socket = dir.join("qmp.sock");
        let spawned = std::process::Command::new("qemu-storage-daemon")
            .arg("--chardev")
            .arg(format!(
                "socket,path={},server=on,wait=off,id=m",
                socket.display()
            ))
            .args(["--monitor", "chardev=m"])
            .stdin(Stdio::null())
            .spawn();
        let child = match spawned {
            Ok(child) => child,
            Err(e) => {
                let _ = std::fs::remove_dir_all(&dir);
                return Err(if e.kind() == io::ErrorKind::NotFound {
                    "qemu-storage-daemon not found in PATH: install it (Debian: qemu-utils) \
                     or pass --socket PATH"
                        .into()
                } else {
                    format!("cannot start qemu-storage-daemon: {e}").into()
                });
            }
        };
        Ok(Self { child, dir, socket })
    }

    /// Connects to the daemon's socket, waiting (bounded) for it to appear.
    fn connect(&mut self) -> Result<UnixStream> {
        let give_up = Instant::now() + STARTUP_TIMEOUT;
        loop {
            if let Some(status) = self.child.try_wait()? {
                return Err(format!("qemu-storage-daemon exited at startup: {status}").into());
            }
            match UnixStream::connect(&self.socket) {
                Ok(stream) => return Ok(stream),
                Err(e) if Instant::now() >= give_up => {
                    return Err(waited_in_vain(&self.socket, e).into());
                }
                Err(_) => std::thread::sleep(Duration::from_millis(20)),
            }
        }
    }
}

fn waited_in_vain(socket: &Path, e: io::Error) -> String {
    format!(
        "qemu-storage-daemon did not open {} within {:?}: {e}",
        socket.display(),
        STARTUP_TIMEOUT
    )
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
