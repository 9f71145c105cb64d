//! A qmp-rs client for the comparison harness in `../shared/bench` (see its README):
//!
//! ```text
//! qmp-bench [--adapter tokio|smol|async-std|blocking] [--typed] [--one-thread]
//!           [--event-buffer E] --socket PATH [--oob | --no-oob] WORKLOAD N [ARG]
//! ```
//!
//! Workloads: `roundtrip N`, `pipeline N W`, `events N S`, `big N S`. Prints one JSON line with
//! `ops` and `seconds` (the workload only, after connect and negotiation); exits 2 for an
//! unsupported workload.

use std::process::ExitCode;
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use qmp_tokio::{Client, Config, EventFilter, Options};
use serde::Deserialize;
use serde_json::{Value, json};

/// What the harness asked for.
#[derive(Clone)]
struct Args {
    adapter: String,
    socket: String,
    oob: Option<bool>,
    workload: String,
    n: u64,
    arg: u64,
    /// Decode `big` replies into typed structs (as a client with QAPI types would) instead of a
    /// `serde_json::Value`.
    typed: bool,
    /// Blocking `pipeline` from one thread (`Client::as_async` under `Client::block_on`)
    /// instead of W threads.
    one_thread: bool,
    /// `events`: each subscription's queue; `None`: the whole flood.
    event_buffer: Option<usize>,
}

fn parse_args() -> Result<Args, String> {
    let mut args = std::env::args().skip(1);
    let (mut adapter, mut socket, mut oob, mut rest) = ("tokio".to_owned(), None, None, Vec::new());
    let (mut typed, mut one_thread, mut event_buffer) = (false, false, None);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--typed" => typed = true,
            "--one-thread" => one_thread = true,
            "--event-buffer" => {
                let e = args.next().ok_or("--event-buffer needs a value")?;
                event_buffer = Some(e.parse().map_err(|e| format!("--event-buffer: {e}"))?);
            }
            "--adapter" => adapter = args.next().ok_or("--adapter needs a value")?,
            "--socket" => socket = args.next(),
            "--oob" => oob = Some(true),
            "--no-oob" => oob = Some(false),
            _ => rest.push(a),
        }
    }
    let num = |i: usize, what: &str| -> Result<u64, String> {
        rest.get(i)
            .ok_or_else(|| format!("missing {what}"))?
            .parse()
            .map_err(|e| format!("{what}: {e}"))
    };
    Ok(Args {
        adapter,
        socket: socket.ok_or("--socket PATH is required")?,
        oob,
        workload: rest.first().cloned().ok_or("missing WORKLOAD")?,
        n: num(1, "N")?,
        arg: if rest.len() > 2 { num(2, "ARG")? } else { 0 },
        typed,
        one_thread,
        event_buffer,
    })
}

fn main() -> ExitCode {
    let args = match parse_args() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("qmp-bench: {e}");
            return ExitCode::FAILURE;
        }
    };
    if !["roundtrip", "pipeline", "events", "big"].contains(&args.workload.as_str()) {
        eprintln!("qmp-bench: unsupported workload {}", args.workload);
        return ExitCode::from(2);
    }
    let result = match args.adapter.as_str() {
        "tokio" => tokio_main(&args),
        "smol" => smol_main(&args),
        "async-std" => async_std_main(&args),
        "blocking" => blocking_main(&args),
        other => Err(format!("unknown adapter {other}")),
    };
    match result {
        Ok(report) => {
            println!("{report}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("qmp-bench: {e}");
            ExitCode::FAILURE
        }
    }
}

/// The typed `query-version` reply, as a typed client would decode it.
#[derive(Deserialize)]
#[allow(dead_code)] // decoded, not read
struct VersionInfo {
    qemu: VersionTriple,
    package: String,
}

#[derive(Deserialize)]
#[allow(dead_code)]
struct VersionTriple {
    major: u64,
    minor: u64,
    micro: u64,
}

/// `query-named-block-nodes` entries (QAPI `BlockDeviceInfo`), as far as floodsrv's `x-big`
/// renders them: every member decoded.
#[derive(Deserialize)]
#[allow(dead_code)] // decoded, not read
struct BlockDeviceInfo {
    iops_rd: u64,
    detect_zeroes: String,
    image: ImageInfo,
    iops_wr: u64,
    ro: bool,
    #[serde(rename = "node-name")]
    node_name: String,
    backing_file_depth: u64,
    drv: String,
    iops: u64,
    bps_wr: u64,
    write_threshold: u64,
    encrypted: bool,
    bps: u64,
    bps_rd: u64,
    cache: CacheInfo,
    file: String,
    #[serde(rename = "dirty-bitmaps")]
    dirty_bitmaps: Vec<BitmapInfo>,
}

#[derive(Deserialize)]
#[serde(rename_all = "kebab-case")]
#[allow(dead_code)]
struct ImageInfo {
    virtual_size: u64,
    filename: String,
    format: String,
    actual_size: u64,
}

#[derive(Deserialize)]
#[serde(rename_all = "kebab-case")]
#[allow(dead_code)]
struct CacheInfo {
    no_flush: bool,
    direct: bool,
    writeback: bool,
}

#[derive(Deserialize)]
#[allow(dead_code)]
struct BitmapInfo {
    name: String,
    recording: bool,
    persistent: bool,
    busy: bool,
    granularity: u64,
    count: u64,
}

fn report(args: &Args, client_name: &str, oob: bool, server: &str, seconds: f64) -> String {
    json!({
        "client": client_name, "workload": args.workload, "ops": args.n, "seconds": seconds,
        "oob": oob, "server": server,
    })
    .to_string()
}

fn options(args: &Args) -> Options {
    // Neither --oob nor --no-oob: the library's default (OOB off).
    let mut config = Config::builder().max_message_size(1 << 30);
    if let Some(oob) = args.oob {
        config = config.enable_oob(oob);
    }
    let options = Options::new()
        .config(config.build().expect("valid config"))
        .connect_timeout(Duration::from_secs(30));
    if args.workload == "events" {
        // The flood arrives far faster than QEMU ever sends events. With the connection's task on
        // another thread (async-std's default, blocking), a subscriber only keeps up if its queue
        // can hold the burst; otherwise it is told, correctly, that it lagged. Same for all.
        // `--event-buffer` measures a smaller queue, which the connection waits for.
        let whole = usize::try_from(args.n).unwrap_or(usize::MAX);
        options.event_buffer(args.event_buffer.unwrap_or(whole))
    } else {
        options
    }
}

/// Runs the workload on a connected async client and reports.
async fn run_async(
    client: Result<Client, qmp_tokio::Error>,
    args: &Args,
) -> Result<String, String> {
    let client = client.map_err(|e| e.to_string())?;
    if args.oob == Some(true) && !client.oob_enabled() {
        return Err("the server did not offer oob".to_owned());
    }
    let seconds = workload(&client, args).await.map_err(|e| e.to_string())?;
    let server = client.greeting().version.package.clone();
    let name = format!(
        "qmp-rs-{}{}",
        args.adapter,
        if args.typed { "-typed" } else { "" }
    );
    let out = report(args, &name, client.oob_enabled(), &server, seconds);
    client.disconnect().await;
    Ok(out)
}

fn tokio_main(args: &Args) -> Result<String, String> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| e.to_string())?;
    let args = args.clone();
    rt.block_on(async move {
        tokio::spawn(async move {
            run_async(
                qmp_tokio::connect(args.socket.as_str(), options(&args)).await,
                &args,
            )
            .await
        })
        .await
        .map_err(|e| e.to_string())?
    })
}

/// smol's way: one executor on this thread runs both the connection's task and the workload, as
/// tasks, under `smol::block_on` (async-io's, which drives the reactor on this thread while it
/// waits, instead of leaving it to async-io's helper thread). The workload as the `block_on`
/// future itself instead: round trips 8% slower (each wake of it goes through the reactor).
fn smol_main(args: &Args) -> Result<String, String> {
    let executor = std::sync::Arc::new(async_executor::Executor::new());
    let spawner = std::sync::Arc::clone(&executor);
    let options = options(args).spawner(move |task| spawner.spawn(task).detach());
    let args = args.clone();
    let work = executor.spawn(async move {
        run_async(
            qmp_async_std::connect(args.socket.as_str(), options).await,
            &args,
        )
        .await
    });
    async_io::block_on(executor.run(work))
}

/// async-std's way: everything on its executor — the workload in a spawned task, and the
/// connection's task given to `async_std::task::spawn` (the spawner option). With the connection
/// on a thread of its own (the crate's default) instead, every reply crosses threads: round trips
/// took twice as long.
fn async_std_main(args: &Args) -> Result<String, String> {
    let args = args.clone();
    async_std::task::block_on(async_std::task::spawn(async move {
        let options = options(&args).spawner(|task| drop(async_std::task::spawn(task)));
        run_async(
            qmp_async_std::connect(args.socket.as_str(), options).await,
            &args,
        )
        .await
    }))
}

/// No runtime: plain threads.
fn blocking_main(args: &Args) -> Result<String, String> {
    let client =
        qmp_blocking::connect(args.socket.as_str(), options(args)).map_err(|e| e.to_string())?;
    if args.oob == Some(true) && !client.oob_enabled() {
        return Err("the server did not offer oob".to_owned());
    }
    let start = Instant::now();
    blocking_workload(&client, args).map_err(|e| e.to_string())?;
    let seconds = start.elapsed().as_secs_f64();
    let server = client.greeting().version.package.clone();
    let name = format!(
        "qmp-rs-blocking{}{}",
        if args.typed { "-typed" } else { "" },
        if args.one_thread { "-one-thread" } else { "" }
    );
    let out = report(args, &name, client.oob_enabled(), &server, seconds);
    client.disconnect();
    Ok(out)
}

fn blocking_workload(
    client: &qmp_blocking::Client,
    args: &Args,
) -> Result<(), qmp_blocking::Error> {
    let n = args.n;
    match args.workload.as_str() {
        "roundtrip" => {
            for _ in 0..n {
                let _: VersionInfo = client.execute_as("query-version", ())?;
            }
        }
        "pipeline" if args.one_thread => {
            // One thread keeps W in flight through the async client inside.
            client.block_on(workload(client.as_async(), args))?;
        }
        "pipeline" => {
            // W threads sharing the client, each waiting for its own answers.
            let w = args.arg.max(1);
            std::thread::scope(|s| {
                let workers: Vec<_> = (0..w)
                    .map(|i| {
                        let count = n / w + u64::from(i < n % w);
                        s.spawn(move || -> Result<(), qmp_blocking::Error> {
                            for _ in 0..count {
                                let _: VersionInfo = client.execute_as("query-version", ())?;
                            }
                            Ok(())
                        })
                    })
                    .collect();
                workers
                    .into_iter()
                    .try_for_each(|w| w.join().unwrap_or(Err(qmp_blocking::Error::Timeout)))
            })?;
        }
        "events" => {
            let mut events = client.subscribe(EventFilter::all());
            let flood = {
                let client = client.clone();
                let size = args.arg;
                std::thread::spawn(move || {
                    client.execute("x-flood", json!({"count": n, "size": size}))
                })
            };
            for _ in 0..n {
                match events.recv() {
                    Some(Ok(event)) => {
                        std::hint::black_box(&event.name);
                    }
                    Some(Err(lagged)) => {
                        return Err(qmp_blocking::Error::Lagged {
                            missed: lagged.missed,
                        });
                    }
                    None => return Err(qmp_blocking::Error::Timeout),
                }
            }
            flood.join().unwrap_or(Err(qmp_blocking::Error::Timeout))?;
        }
        "big" if args.typed => {
            for _ in 0..n {
                let nodes: Vec<BlockDeviceInfo> =
                    client.execute_as("x-big", json!({"size": args.arg}))?;
                std::hint::black_box(nodes);
            }
        }
        "big" => {
            for _ in 0..n {
                std::hint::black_box(client.execute("x-big", json!({"size": args.arg}))?);
            }
        }
        _ => unreachable!("checked in main"),
    }
    Ok(())
}

async fn workload(client: &Client, args: &Args) -> Result<f64, qmp_tokio::Error> {
    let n = args.n;
    let start = Instant::now();
    match args.workload.as_str() {
        "roundtrip" => {
            for _ in 0..n {
                let _: VersionInfo = client.execute_as("query-version", ()).await?;
            }
        }
        "pipeline" => {
            let mut calls = futures_util::stream::iter(0..n)
                .map(|_| client.execute_as::<VersionInfo>("query-version", ()))
                .buffer_unordered(args.arg.max(1) as usize);
            while let Some(r) = calls.next().await {
                r?;
            }
        }
        "events" => {
            let mut events = client.subscribe(EventFilter::all());
            let start = Instant::now();
            let flood = client.execute("x-flood", json!({"count": n, "size": args.arg}));
            let consume = async {
                let mut got = 0;
                while got < n {
                    match events.next().await {
                        Some(Ok(event)) => {
                            // Decoded: name and timestamp parsed, data validated JSON.
                            std::hint::black_box(&event.name);
                            got += 1;
                        }
                        Some(Err(lagged)) => {
                            return Err(qmp_tokio::Error::Lagged {
                                missed: lagged.missed,
                            });
                        }
                        None => return Err(qmp_tokio::Error::Timeout),
                    }
                }
                Ok(())
            };
            let (reply, consumed) = futures_util::join!(flood, consume);
            reply?;
            consumed?;
            return Ok(start.elapsed().as_secs_f64());
        }
        "big" if args.typed => {
            for _ in 0..n {
                let nodes: Vec<BlockDeviceInfo> = client
                    .execute_as("x-big", json!({"size": args.arg}))
                    .await?;
                std::hint::black_box(nodes);
            }
        }
        "big" => {
            for _ in 0..n {
                let value: Value = client.execute("x-big", json!({"size": args.arg})).await?;
                std::hint::black_box(value);
            }
        }
        _ => unreachable!("checked in main"),
    }
    Ok(start.elapsed().as_secs_f64())
}
