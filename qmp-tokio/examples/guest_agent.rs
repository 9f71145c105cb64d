//! The guest agent, end to end: connect (with the resync that makes the stream trustworthy), ask
//! what the agent is and runs on, write a file and read it back, share the handle.
//!
//! ```text
//! cargo run -p qmp-tokio --example guest_agent                    # starts its own qemu-ga
//! cargo run -p qmp-tokio --example guest_agent -- --socket PATH   # a VM's guest-agent chardev
//! ```
//!
//! With no arguments it starts `qemu-ga -m unix-listen` on the host, on a socket in a fresh temp
//! dir, with the commands that would shut the machine down blocked, and stops it at the end.

use std::process::ExitCode;
use std::time::Duration;

use qmp_tokio::{Error, Options};
use serde_json::json;

#[tokio::main(flavor = "current_thread")]
async fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let result = match args.as_slice() {
        [flag, path] if flag == "--socket" => run(path.into(), None).await,
        [] => {
            let agent = qmp_testkit::QemuGa::start();
            let scratch = agent.dir().join("hello.txt");
            run(agent.socket().to_owned(), Some(scratch)).await
        }
        _ => {
            eprintln!("usage: guest_agent [--socket PATH]");
            return ExitCode::from(2);
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn run(socket: std::path::PathBuf, scratch: Option<std::path::PathBuf>) -> Result<(), Error> {
    let agent = qmp_tokio::connect_guest_agent(&socket, Options::new())
        .await?
        .with_timeout(Duration::from_secs(10));
    let info = agent.execute("guest-info", ()).await?;
    let os = agent.execute("guest-get-osinfo", ()).await?;
    println!(
        "qemu-ga {} on {} ({} commands)",
        info["version"],
        os["pretty-name"],
        info["supported_commands"].as_array().map_or(0, Vec::len)
    );

    let path = scratch.unwrap_or_else(|| "/tmp/qmp-rs-guest-agent-example.txt".into());
    let handle = agent
        .execute("guest-file-open", json!({"path": path, "mode": "w+"}))
        .await?;
    agent
        .execute(
            "guest-file-write",
            json!({"handle": handle, "buf-b64": "aGVsbG8gZnJvbSB0aGUgaG9zdAo="}),
        )
        .await?;
    agent
        .execute(
            "guest-file-seek",
            json!({"handle": handle, "offset": 0, "whence": "set"}),
        )
        .await?;
    let read = agent
        .execute("guest-file-read", json!({"handle": handle, "count": 64}))
        .await?;
    agent
        .execute("guest-file-close", json!({"handle": handle}))
        .await?;
    println!(
        "wrote and read back {} (base64 {})",
        path.display(),
        read["buf-b64"]
    );

    // Callers can share the handle; the agent gets one command at a time, each answered in turn.
    let (a, b) = tokio::join!(
        agent.execute("guest-sync", json!({"id": 1})),
        agent.execute("guest-ping", ())
    );
    println!("guest-sync 1 -> {}, guest-ping -> {}", a?, b?);
    let synced = agent.execute("guest-sync", json!({"id": 42})).await?;
    println!("guest-sync 42 -> {synced}");
    assert_eq!(synced, json!(42));
    agent.disconnect().await;
    Ok(())
}
