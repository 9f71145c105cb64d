//! `qmp events` and `qmp wait`: events for scripts, as JSON lines.

use std::io::Write as _;
use std::time::Duration;

use clap::Parser;
use qmp_tokio::{Client, Event, EventFilter, Lagged, State};
use serde_json::{Value, json};

use crate::peer::Session;
use crate::{EXIT_CONNECTION, EXIT_INTERRUPTED, EXIT_TIMEOUT, EXIT_USAGE, args};

/// Streams events as JSON lines ({"event","data","timestamp"}), one per line.
#[derive(Debug, Parser)]
#[command(name = "qmp events", no_binary_name = true)]
pub(crate) struct EventsArgs {
    /// Keep streaming until the connection closes or Ctrl-C
    #[arg(short, long, required_unless_present = "count")]
    pub(crate) follow: bool,
    /// Stop after this many events
    #[arg(short = 'n', long, value_name = "N")]
    pub(crate) count: Option<u64>,
    /// Only events with this name (repeat for several)
    #[arg(long = "name", value_name = "EVENT")]
    pub(crate) names: Vec<String>,
}

/// Waits for one event and prints it as a JSON line; exits 0 when it arrives, 3 on timeout.
#[derive(Debug, Parser)]
#[command(name = "qmp wait", no_binary_name = true)]
pub(crate) struct WaitArgs {
    /// The event name, e.g. BLOCK_JOB_READY
    pub(crate) event: String,
    /// Require the event's data to contain KEY=VALUE (qmp-shell syntax; dotted keys nest; a
    /// partial match as QEMU's test harness does it). Repeat for several.
    #[arg(short, long = "match", value_name = "KEY=VALUE")]
    pub(crate) matches: Vec<String>,
    /// Give up after SECONDS (exit 3) [default: the global --timeout, else forever]
    #[arg(short, long, value_name = "SECONDS", value_parser = crate::parse_seconds)]
    pub(crate) timeout: Option<Duration>,
}

fn parse_words<T: Parser>(words: &[String]) -> Result<T, u8> {
    T::try_parse_from(words).map_err(|e| {
        let _ = e.print();
        if e.use_stderr() { EXIT_USAGE } else { 0 }
    })
}

impl EventsArgs {
    /// Parses the words after `events`; on error (or `--help`) the exit code.
    pub(crate) fn parse_from_words(words: &[String]) -> Result<Self, u8> {
        parse_words(words)
    }
}

impl WaitArgs {
    /// Parses the words after `wait`; on error (or `--help`) the exit code.
    pub(crate) fn parse_from_words(words: &[String]) -> Result<Self, u8> {
        let parsed: Self = parse_words(words)?;
        if let Err(e) = parsed.pattern() {
            warn!("qmp: --match: {e}");
            return Err(EXIT_USAGE);
        }
        Ok(parsed)
    }

    /// The filter's data pattern, if any `--match` was given.
    fn pattern(&self) -> Result<Option<Value>, args::ArgError> {
        if self.matches.is_empty() {
            return Ok(None);
        }
        args::parse_key_values(&self.matches).map(|m| Some(Value::Object(m)))
    }
}

/// An event as a JSON object: `{"event", "data", "timestamp": {"seconds", "microseconds"}}`;
/// `data` is null when the event has none.
pub(crate) fn event_json(event: &Event) -> Value {
    json!({
        "event": event.name,
        "data": event.data_value().unwrap_or(Value::Null),
        "timestamp": {
            "seconds": event.timestamp.seconds,
            "microseconds": event.timestamp.microseconds,
        },
    })
}

/// Writes one line to stdout and flushes; false when stdout is gone (a closed pipe).
fn print_line(value: &Value) -> bool {
    let mut out = std::io::stdout().lock();
    writeln!(out, "{value}").and_then(|()| out.flush()).is_ok()
}

/// `qmp events`.
pub(crate) async fn run_events(session: &Session, a: &EventsArgs, verbose: bool) -> u8 {
    let Some(client) = session.peer.client() else {
        warn!("qmp: a guest agent sends no events");
        return EXIT_USAGE;
    };
    let filter = if a.names.is_empty() {
        EventFilter::all()
    } else {
        EventFilter::names(a.names.iter().cloned())
    };
    let mut sub = client.subscribe(filter);
    if verbose {
        warn!("qmp: subscribed to events");
    }
    let limit = if a.follow { None } else { a.count };
    let mut seen = 0u64;
    let ctrl_c = tokio::signal::ctrl_c();
    tokio::pin!(ctrl_c);
    loop {
        if limit.is_some_and(|n| seen >= n) {
            return 0;
        }
        tokio::select! {
            item = sub.recv() => match item {
                Some(Ok(event)) => {
                    if !print_line(&event_json(&event)) {
                        return 0;
                    }
                    seen += 1;
                }
                Some(Err(Lagged { missed })) => {
                    warn!("qmp: missed {missed} events (output too slow)");
                }
                None => {
                    if limit.is_some() {
                        warn!(
                            "qmp: the connection closed after {seen} events{}",
                            why_closed(client)
                        );
                        return EXIT_CONNECTION;
                    }
                    return 0;
                }
            },
            _ = &mut ctrl_c => return EXIT_INTERRUPTED,
        }
    }
}

/// Why the connection closed, as a suffix for a message (": the server closed the connection
/// (QEMU exited or was killed)"); empty while it is open.
fn why_closed(client: &Client) -> String {
    match client.state() {
        State::Closed(reason) => format!(": {reason}"),
        _ => String::new(),
    }
}

/// `qmp wait`.
pub(crate) async fn run_wait(
    session: &Session,
    a: &WaitArgs,
    global_timeout: Option<Duration>,
    verbose: bool,
) -> u8 {
    let Some(client) = session.peer.client() else {
        warn!("qmp: a guest agent sends no events");
        return EXIT_USAGE;
    };
    let mut filter = EventFilter::name(a.event.clone());
    if let Ok(Some(pattern)) = a.pattern() {
        filter = filter.data(pattern);
    }
    // The subscription delivers only events that pass the filter.
    let mut sub = client.subscribe(filter);
    if verbose {
        warn!("qmp: subscribed to events");
    }
    let wait = async {
        loop {
            match sub.recv().await {
                Some(Ok(event)) => {
                    print_line(&event_json(&event));
                    return 0;
                }
                Some(Err(Lagged { missed })) => {
                    warn!("qmp: missed {missed} events (the wanted one may be among them)");
                }
                None => {
                    warn!(
                        "qmp: the connection closed before {} arrived{}",
                        a.event,
                        why_closed(client)
                    );
                    return EXIT_CONNECTION;
                }
            }
        }
    };
    let timeout = a.timeout.or(global_timeout);
    tokio::select! {
        code = async {
            match timeout {
                Some(t) => tokio::time::timeout(t, wait).await.unwrap_or_else(|_| {
                    warn!("qmp: timed out waiting for {}", a.event);
                    EXIT_TIMEOUT
                }),
                None => wait.await,
            }
        } => code,
        _ = tokio::signal::ctrl_c() => EXIT_INTERRUPTED,
    }
}
