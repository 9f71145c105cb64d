//! `qmp`: a command-line shell for the QEMU Machine Protocol.
//!
//! ```text
//! qmp -s /run/qemu/vm1.qmp query-status
//! qmp -s vm1.qmp blockdev-add driver=null-co node-name=n0 size=1048576
//! qmp -s vm1.qmp --json '{"execute": "query-version"}'
//! qmp -s vm1.qmp events --follow --name JOB_STATUS_CHANGE
//! qmp -s vm1.qmp wait BLOCK_JOB_READY --match device=job0 --timeout 60
//! qmp -s vm1.qmp            # interactive shell
//! ```
//!
//! Exit codes: 0 success, 1 QMP error (or another failed command), 2 connection failure,
//! 3 timeout, 64 usage error, 130 interrupted.

/// `eprintln!` that ignores a closed stderr instead of panicking.
macro_rules! warn {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stderr(), $($arg)*);
    }};
}

mod args;
mod events;
mod output;
mod peer;
mod shell;

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;
use qmp_tokio::Error;
use serde_json::Value;

use crate::output::Style;
use crate::peer::{ConnectSpec, Session, SpawnedQsd, Target};

/// Exit code: a QMP error, or a command that failed another way.
pub(crate) const EXIT_FAILED: u8 = 1;
/// Exit code: connecting failed or the connection broke.
pub(crate) const EXIT_CONNECTION: u8 = 2;
/// Exit code: a timeout (connecting, a command, or waiting for an event).
pub(crate) const EXIT_TIMEOUT: u8 = 3;
/// Exit code: bad command-line arguments.
pub(crate) const EXIT_USAGE: u8 = 64;
/// Exit code: interrupted by Ctrl-C.
pub(crate) const EXIT_INTERRUPTED: u8 = 130;

const AFTER_HELP: &str = "\
COMMAND is a QMP command name followed by KEY=VALUE arguments (qmp-shell syntax): integers become
numbers, true/false booleans, values starting with { or [ are parsed as JSON, anything else is a
string; dotted keys nest (a.b=1 is {\"a\":{\"b\":1}}). Options go before COMMAND.

Two words are reserved as COMMAND and are not sent to QEMU:
  events   stream events as JSON lines          (qmp events --help)
  wait     wait for one event, exit 0 when seen (qmp wait --help)

Without COMMAND (and without --json) qmp starts an interactive shell. With commands piped in
(qmp -s S < script) it prints only the results on stdout and exits with the worst failure's code.

Exit codes: 0 ok, 1 QMP error, 2 connection failure, 3 timeout, 64 usage error, 130 Ctrl-C.";

/// A command-line shell for the QEMU Machine Protocol.
#[derive(Debug, Parser)]
#[command(name = "qmp", version, about, after_help = AFTER_HELP)]
struct Cli {
    /// The monitor socket: a unix path or HOST:PORT [default: $QMP_SOCKET]
    #[arg(short, long, value_name = "PATH|HOST:PORT")]
    socket: Option<String>,

    /// Listen on this address and wait for QEMU to connect (a server=off chardev)
    #[arg(long, value_name = "PATH|HOST:PORT", conflicts_with_all = ["socket", "spawn_qsd"])]
    listen: Option<String>,

    /// Start a qemu-storage-daemon on a temporary socket and talk to it; it is killed at exit
    #[arg(long, conflicts_with_all = ["socket", "agent"])]
    spawn_qsd: bool,

    /// Talk to a guest agent (qemu-ga) instead of a QMP monitor
    #[arg(long)]
    agent: bool,

    /// Timeout in seconds for connecting and for each command
    #[arg(long, value_name = "SECONDS", value_parser = parse_seconds)]
    timeout: Option<Duration>,

    /// Wait (up to the connect timeout, 10 s by default) while nothing listens at --socket yet,
    /// as right after starting QEMU
    #[arg(long, conflicts_with_all = ["listen", "spawn_qsd"])]
    wait_for_server: bool,

    /// Do not send qmp_capabilities after the greeting (send it yourself)
    #[arg(long)]
    no_negotiate: bool,

    /// Send this raw JSON command object instead of COMMAND
    #[arg(long, value_name = "JSON", conflicts_with = "command")]
    json: Option<String>,

    /// Print the JSON sent and received on stderr
    #[arg(short, long)]
    verbose: bool,

    /// Append every exchange to FILE as a JSON line {"time","command","response"}
    #[arg(long, value_name = "FILE")]
    log: Option<PathBuf>,

    /// COMMAND [KEY=VALUE]..., or `events ...`, or `wait ...`
    #[arg(
        value_name = "COMMAND",
        trailing_var_arg = true,
        allow_hyphen_values = true
    )]
    command: Vec<String>,
}

fn parse_seconds(s: &str) -> Result<Duration, String> {
    let secs: f64 = s.parse().map_err(|e| format!("{e}"))?;
    Duration::try_from_secs_f64(secs).map_err(|e| format!("{e}"))
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            let _ = e.print();
            return if e.use_stderr() {
                ExitCode::from(EXIT_USAGE)
            } else {
                ExitCode::SUCCESS
            };
        }
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            warn!("qmp: cannot start the runtime: {e}");
            return ExitCode::from(EXIT_FAILED);
        }
    };
    let code = run(cli, &runtime);
    runtime.shutdown_timeout(Duration::from_millis(100));
    ExitCode::from(code)
}

/// What the command line asks for, once parsed.
enum Mode {
    Execute(Value),
    Events(events::EventsArgs),
    Wait(events::WaitArgs),
    Shell,
}

fn usage(message: impl std::fmt::Display) -> u8 {
    warn!("qmp: {message}");
    EXIT_USAGE
}

fn run(cli: Cli, runtime: &tokio::runtime::Runtime) -> u8 {
    // Parse everything before connecting, so usage errors never touch the peer.
    let mode = if let Some(json) = &cli.json {
        match serde_json::from_str::<Value>(json) {
            // What the client will take (`execute` or `exec-oob` naming a command, `arguments` an
            // object), checked now rather than after connecting.
            Ok(v @ Value::Object(_)) => match qmp_tokio::Command::from_json(v.clone()) {
                Ok(_) => Mode::Execute(v),
                Err(e) => return usage(format_args!("--json: {e}")),
            },
            Ok(_) => return usage("--json needs a JSON object"),
            Err(e) => return usage(format_args!("--json is not valid JSON: {e}")),
        }
    } else if let Some(first) = cli.command.first() {
        let rest = &cli.command[1..];
        match first.as_str() {
            "events" => match events::EventsArgs::parse_from_words(rest) {
                Ok(a) => Mode::Events(a),
                Err(code) => return code,
            },
            "wait" => match events::WaitArgs::parse_from_words(rest) {
                Ok(a) => Mode::Wait(a),
                Err(code) => return code,
            },
            name => match args::parse_key_values(rest) {
                Ok(arguments) => Mode::Execute(args::command(name, arguments)),
                Err(e) => return usage(e),
            },
        }
    } else {
        Mode::Shell
    };
    if cli.agent && matches!(mode, Mode::Events(_) | Mode::Wait(_)) {
        return usage("a guest agent sends no events");
    }

    let log = match &cli.log {
        Some(path) => match peer::open_log(path) {
            Ok(f) => Some(f),
            Err(e) => {
                warn!("qmp: cannot open {}: {e}", path.display());
                return EXIT_FAILED;
            }
        },
        None => None,
    };

    // Kept alive until the end of `run`, then killed.
    let mut _qsd = None;
    let target = if let Some(listen) = cli.listen.clone() {
        Target::Listen(listen)
    } else if cli.spawn_qsd {
        match SpawnedQsd::start(cli.timeout.unwrap_or(Duration::from_secs(10))) {
            Ok(qsd) => {
                let socket = qsd.socket().display().to_string();
                if cli.verbose {
                    warn!("qmp: started qemu-storage-daemon on {socket}");
                }
                _qsd = Some(qsd);
                Target::Connect(socket)
            }
            Err(e) => {
                warn!("qmp: {e}");
                return EXIT_CONNECTION;
            }
        }
    } else if let Some(socket) = cli
        .socket
        .clone()
        .or_else(|| std::env::var("QMP_SOCKET").ok().filter(|s| !s.is_empty()))
    {
        Target::Connect(socket)
    } else {
        return usage(
            "no socket: give --socket PATH (or set $QMP_SOCKET), --listen or --spawn-qsd",
        );
    };
    let spec = ConnectSpec {
        target,
        agent: cli.agent,
        timeout: cli.timeout,
        wait_for_server: cli.wait_for_server,
        no_negotiate: cli.no_negotiate,
    };

    let peer = match runtime.block_on(peer::connect(&spec)) {
        Ok(peer) => peer,
        Err(e) => {
            match (&spec.target, &e) {
                // Its message names the address already.
                (_, Error::Io(_)) => warn!("qmp: {e}"),
                (Target::Connect(a) | Target::Listen(a), _) => {
                    warn!("qmp: cannot connect to {a}: {e}")
                }
            }
            return exit_code(&e);
        }
    };
    let session = Session {
        peer,
        verbose: cli.verbose,
        log,
    };
    let style = Style::for_stdout();
    let code = match mode {
        Mode::Execute(command) => runtime.block_on(async {
            match session.execute(command).await {
                Ok(value) => {
                    use std::io::Write as _;
                    let _ = writeln!(std::io::stdout(), "{}", style.format(&value));
                    0
                }
                Err(e) => report(&e),
            }
        }),
        Mode::Events(a) => runtime.block_on(events::run_events(&session, &a, cli.verbose)),
        Mode::Wait(a) => runtime.block_on(events::run_wait(&session, &a, cli.timeout, cli.verbose)),
        Mode::Shell => shell::run(&session, runtime, style),
    };
    runtime.block_on(session.peer.disconnect());
    code
}

/// Prints a command's error on stderr (`CLASS: desc` for QMP errors) and returns its exit code.
pub(crate) fn report(e: &Error) -> u8 {
    match e {
        Error::Qmp(q) => warn!("{}: {}", q.class, q.desc),
        other => warn!("qmp: {other}"),
    }
    exit_code(e)
}

/// The exit code for an error.
pub(crate) fn exit_code(e: &Error) -> u8 {
    match e {
        Error::Timeout | Error::NoGreeting => EXIT_TIMEOUT,
        Error::Io(io) if io.kind() == std::io::ErrorKind::TimedOut => EXIT_TIMEOUT,
        Error::Disconnected(_) | Error::Io(_) | Error::Protocol(_) => EXIT_CONNECTION,
        _ => EXIT_FAILED,
    }
}
