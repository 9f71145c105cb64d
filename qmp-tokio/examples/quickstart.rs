//! The main job, end to end: connect, ask the version, run a block-mirror job while printing its
//! events, shut down cleanly.
//!
//! ```text
//! cargo run -p qmp-tokio --example quickstart                       # starts its own qemu-storage-daemon
//! cargo run -p qmp-tokio --example quickstart -- --socket PATH      # talks to a QEMU you started
//! RUST_LOG=qmp=trace cargo run -p qmp-tokio --example quickstart    # ... and shows every message
//! ```
//!
//! With no arguments it starts `qemu-storage-daemon` on a socket in a fresh temp dir, and stops it
//! (only it) at the end. The job copies between two `null-co` nodes, so it needs no disk space;
//! against your own QEMU it adds (and removes) two such nodes too.

use std::path::PathBuf;
use std::process::{Child, Command, ExitCode, Stdio};
use std::time::{Duration, Instant};

use qmp_tokio::{Client, Disconnect, EventFilter, Options, Timestamp};
use serde_json::json;

#[tokio::main(flavor = "current_thread")]
async fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_writer(std::io::stderr)
        .init();
    match run().await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("quickstart: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn run() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    // Declared first so it outlives the client: the daemon is stopped after we disconnect.
    let daemon;
    let socket = match args.as_slice() {
        [] => {
            daemon = Daemon::start()?;
            println!(
                "started qemu-storage-daemon (pid {}) on {}",
                daemon.child.id(),
                daemon.socket.display()
            );
            daemon.socket.clone()
        }
        [flag, path] if flag == "--socket" => PathBuf::from(path),
        _ => return Err("usage: quickstart [--socket PATH]".into()),
    };

    let client = qmp_tokio::connect(&socket, Options::new().name("quickstart")).await?;
    let v = &client.greeting().version;
    println!("connected: QEMU {v}, oob {}", client.oob_enabled());
    let version = client.execute("query-version", ()).await?;
    println!("query-version: {version}");

    mirror_job(&client).await?;

    client.disconnect().await;
    match client.closed().await {
        Disconnect::Local => println!("disconnected by us"),
        other => println!("disconnected: {other}"),
    }
    Ok(())
}

/// Mirrors `src` to `tgt` (two null-co nodes) and prints the job's events until it is gone.
async fn mirror_job(client: &Client) -> Result<(), qmp_tokio::Error> {
    let started = Instant::now();
    for node in ["qs-src", "qs-tgt"] {
        client
            .execute(
                "blockdev-add",
                json!({"driver": "null-co", "node-name": node, "size": 64 << 20}),
            )
            .await?;
    }
    // Subscribe before the command: QEMU sends the first job events before its return.
    let job_events = EventFilter::names([
        "JOB_STATUS_CHANGE",
        "BLOCK_JOB_READY",
        "BLOCK_JOB_COMPLETED",
    ])
    .predicate(|e| {
        e.data_value()
            .is_ok_and(|d| d["id"] == "qs-job" || d["device"] == "qs-job")
    });
    let mut events = client.subscribe(job_events);
    let args = json!({"job-id": "qs-job", "device": "qs-src", "target": "qs-tgt", "sync": "full"});
    client.execute("blockdev-mirror", args).await?;
    println!("blockdev-mirror returned");

    let show = |e: &qmp_tokio::Event| {
        let data = e.data.as_ref().map_or("", |d| d.get());
        println!("  event {} {} {data}", time_of_day(e.timestamp), e.name);
    };
    loop {
        let e = events.recv_timeout(Duration::from_secs(30)).await?;
        show(&e);
        if e.name == "BLOCK_JOB_READY" {
            client
                .execute("job-complete", json!({"id": "qs-job"}))
                .await?;
            println!("job-complete returned");
        }
        if e.name == "JOB_STATUS_CHANGE" && e.data_value().is_ok_and(|d| d["status"] == "null") {
            break;
        }
    }
    for node in ["qs-tgt", "qs-src"] {
        client
            .execute("blockdev-del", json!({"node-name": node}))
            .await?;
    }
    println!(
        "mirror job done in {:.1} ms",
        started.elapsed().as_secs_f64() * 1e3
    );
    Ok(())
}

/// A qemu-storage-daemon on a socket in a temp dir, killed (only it) when dropped.
struct Daemon {
    child: Child,
    socket: PathBuf,
    _dir: tempfile::TempDir,
}

impl Daemon {
    fn start() -> Result<Self, Box<dyn std::error::Error>> {
        let dir = tempfile::tempdir()?;
        let socket = dir.path().join("qmp.sock");
        let chardev = format!("socket,path={},server=on,wait=off,id=m", socket.display());
        let pidfile = dir.path().join("qsd.pid");
        let child = Command::new("qemu-storage-daemon")
            .args(["--chardev", &chardev, "--monitor", "chardev=m"])
            .arg("--pidfile")
            .arg(&pidfile)
            .stdin(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| format!("cannot start qemu-storage-daemon ({e}): install it (Debian: qemu-utils) or pass --socket PATH"))?;
        let daemon = Self {
            child,
            socket,
            _dir: dir,
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        // Ready once it has written its pid file, which QEMU documents it does after setting up
        // every chardev and monitor (its socket listens earlier; a client that connects in
        // between is not always served).
        while std::fs::metadata(&pidfile).map_or(true, |m| m.len() == 0) {
            if Instant::now() > deadline {
                return Err("qemu-storage-daemon was not ready within 10 s".into());
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        Ok(daemon)
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// An event's time as a person reads it: the time of day (UTC) to the microsecond.
fn time_of_day(t: Timestamp) -> String {
    if t == Timestamp::UNKNOWN {
        return "(no time)".to_owned();
    }
    let second = t.seconds.rem_euclid(86_400);
    let (h, m, s) = (second / 3600, second / 60 % 60, second % 60);
    format!("{h:02}:{m:02}:{s:02}.{:06} UTC", t.microseconds)
}
