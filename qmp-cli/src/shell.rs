//! The interactive shell: line editing, history, completion, events as they arrive,
//! `transaction(` blocks and `hmp` passthrough.

use std::collections::{BTreeMap, BTreeSet};
use std::io::{IsTerminal as _, Write as _};
use std::path::PathBuf;

use qmp_tokio::{Event, EventFilter, Lagged};
use rustyline::completion::{Completer, Pair};
use rustyline::error::ReadlineError;
use rustyline::highlight::Highlighter;
use rustyline::hint::Hinter;
use rustyline::history::DefaultHistory;
use rustyline::validate::Validator;
use rustyline::{Context, Editor, ExternalPrinter as _, Helper};
use serde_json::{Value, json};

use crate::args;
use crate::output::Style;
use crate::peer::Session;

/// Completion data: command names and, per command, its argument names.
#[derive(Default)]
pub(crate) struct ShellHelper {
    commands: BTreeSet<String>,
    arguments: BTreeMap<String, BTreeSet<String>>,
}

/// Words the shell itself understands at the start of a line.
const SHELL_WORDS: [&str; 2] = ["hmp", "transaction("];

impl ShellHelper {
    /// Builds the completion data from `query-qmp-schema` output.
    pub(crate) fn from_schema(commands: BTreeSet<String>, schema: &Value) -> Self {
        let entries = schema.as_array().map(Vec::as_slice).unwrap_or_default();
        let by_name: BTreeMap<&str, &Value> = entries
            .iter()
            .filter_map(|e| Some((e.get("name")?.as_str()?, e)))
            .collect();
        let mut arguments = BTreeMap::new();
        for entry in entries {
            if entry["meta-type"] != "command" {
                continue;
            }
            let (Some(name), Some(arg_type)) = (entry["name"].as_str(), entry["arg-type"].as_str())
            else {
                continue;
            };
            let mut names = BTreeSet::new();
            collect_members(&by_name, arg_type, &mut names, 0);
            arguments.insert(name.to_string(), names);
        }
        Self {
            commands,
            arguments,
        }
    }

    /// Completions for `line` with the cursor at `pos`: the start of the word and candidates.
    pub(crate) fn candidates(&self, line: &str, pos: usize) -> (usize, Vec<String>) {
        let before = &line[..pos];
        let start = before.rfind(char::is_whitespace).map_or(0, |i| {
            i + before[i..].chars().next().map_or(1, char::len_utf8)
        });
        let word = &before[start..];
        let first = before.split_whitespace().next();
        if before[..start].trim().is_empty() {
            let mut out: Vec<String> = SHELL_WORDS
                .iter()
                .map(|s| s.to_string())
                .chain(self.commands.iter().cloned())
                .filter(|c| c.starts_with(word))
                .map(|c| if c.ends_with('(') { c } else { format!("{c} ") })
                .collect();
            out.sort();
            out.dedup();
            return (start, out);
        }
        if word.contains('=') {
            return (start, Vec::new());
        }
        let Some(args) = first.and_then(|c| self.arguments.get(c)) else {
            return (start, Vec::new());
        };
        (
            start,
            args.iter()
                .filter(|a| a.starts_with(word))
                .map(|a| format!("{a}="))
                .collect(),
        )
    }
}

/// Adds the member names of schema type `name` (and of its union variants) to `out`.
fn collect_members(
    by_name: &BTreeMap<&str, &Value>,
    name: &str,
    out: &mut BTreeSet<String>,
    depth: usize,
) {
    let Some(entry) = by_name.get(name) else {
        return;
    };
    if depth > 4 || entry["meta-type"] != "object" {
        return;
    }
    for m in entry["members"].as_array().into_iter().flatten() {
        if let Some(n) = m["name"].as_str() {
            out.insert(n.to_string());
        }
    }
    for v in entry["variants"].as_array().into_iter().flatten() {
        if let Some(t) = v["type"].as_str() {
            collect_members(by_name, t, out, depth + 1);
        }
    }
}

impl Completer for ShellHelper {
    type Candidate = Pair;

    fn complete(
        &self,
        line: &str,
        pos: usize,
        _ctx: &Context<'_>,
    ) -> rustyline::Result<(usize, Vec<Pair>)> {
        let (start, words) = self.candidates(line, pos);
        Ok((
            start,
            words
                .into_iter()
                .map(|w| Pair {
                    display: w.clone(),
                    replacement: w,
                })
                .collect(),
        ))
    }
}

impl Hinter for ShellHelper {
    type Hint = String;
}
impl Highlighter for ShellHelper {}
impl Validator for ShellHelper {}
impl Helper for ShellHelper {}

/// Where history is kept: `$QMP_HISTORY`, else `$XDG_STATE_HOME/qmp/history`, else
/// `~/.qmp_history`.
fn history_path() -> Option<PathBuf> {
    let var = |name| std::env::var_os(name).filter(|v| !v.is_empty());
    if let Some(p) = var("QMP_HISTORY") {
        return Some(p.into());
    }
    if let Some(state) = var("XDG_STATE_HOME") {
        return Some(PathBuf::from(state).join("qmp").join("history"));
    }
    var("HOME").map(|h| PathBuf::from(h).join(".qmp_history"))
}

/// What a line asks for.
#[derive(Debug, PartialEq)]
pub(crate) enum Line {
    /// Nothing.
    Empty,
    /// Run this command object.
    Execute(Value),
    /// Run a human monitor command.
    Hmp(String),
    /// Start a `transaction(` block.
    BeginTransaction,
    /// End the block (`)`) and run it.
    EndTransaction,
}

/// Parses one line of the shell.
pub(crate) fn parse_line(line: &str) -> Result<Line, String> {
    let trimmed = line.trim();
    if trimmed.is_empty() || trimmed.starts_with('#') {
        return Ok(Line::Empty);
    }
    if let Some(rest) = trimmed.strip_prefix("hmp ") {
        return Ok(Line::Hmp(rest.trim().to_string()));
    }
    if trimmed == "transaction(" {
        return Ok(Line::BeginTransaction);
    }
    if trimmed == ")" {
        return Ok(Line::EndTransaction);
    }
    if trimmed.starts_with('{') {
        return match serde_json::from_str::<Value>(trimmed) {
            Ok(v @ Value::Object(_)) => Ok(Line::Execute(v)),
            Ok(_) => Err("a raw command must be a JSON object".into()),
            Err(e) => Err(format!("not valid JSON: {e}")),
        };
    }
    let words = args::split_words(trimmed).map_err(|e| e.to_string())?;
    let (name, rest) = words.split_first().expect("a non-empty line has a word");
    let arguments = args::parse_key_values(rest).map_err(|e| e.to_string())?;
    Ok(Line::Execute(args::command(name, arguments)))
}

/// An event as one line: `HH:MM:SS.micros NAME {compact data}` (UTC, from QEMU's timestamp), so a
/// burst of events stays readable above the prompt.
fn event_line(event: &Event, style: Style) -> String {
    let t = event.timestamp;
    let day = t.seconds.rem_euclid(86_400);
    let time = format!(
        "{:02}:{:02}:{:02}.{:06}",
        day / 3600,
        day / 60 % 60,
        day % 60,
        t.microseconds
    );
    let data = event
        .data_value()
        .map(|d| {
            Style {
                pretty: false,
                ..style
            }
            .format(&d)
        })
        .unwrap_or_default();
    if style.color {
        format!(
            "\x1b[2m{time}\x1b[0m \x1b[33;1m{}\x1b[0m {data}",
            event.name
        )
    } else {
        format!("{time} {} {data}", event.name)
    }
}

/// A transaction action from a command object: `{"type": name, "data": arguments}`.
fn action(command: &Value) -> Value {
    json!({
        "type": command["execute"],
        "data": command.get("arguments").cloned().unwrap_or_else(|| json!({})),
    })
}

/// The worse of two exit codes: a failed command (1), then a timeout (3), then a line that does
/// not parse (64), then the connection lost (2), which ends the session.
fn worse(a: u8, b: u8) -> u8 {
    let rank = |code: u8| match code {
        0 => 0,
        crate::EXIT_FAILED => 1,
        crate::EXIT_TIMEOUT => 2,
        crate::EXIT_USAGE => 3,
        _ => 4,
    };
    if rank(b) > rank(a) { b } else { a }
}

/// Runs the shell until end of input; returns the exit code. With commands piped in, no banner is
/// printed and the exit code is that of the worst failure ([`worse`]).
pub(crate) fn run(session: &Session, runtime: &tokio::runtime::Runtime, style: Style) -> u8 {
    let client = session.peer.client().cloned();
    let helper = match &client {
        Some(c) => runtime.block_on(async {
            let commands = c.commands().await.map(|s| (*s).clone()).unwrap_or_default();
            match c.schema().await {
                Ok(schema) => ShellHelper::from_schema(commands, &schema),
                Err(_) => ShellHelper {
                    commands,
                    ..ShellHelper::default()
                },
            }
        }),
        None => ShellHelper::default(),
    };
    // Bash-style: Tab completes the common prefix, a second Tab lists the candidates.
    let config = rustyline::Config::builder()
        .completion_type(rustyline::CompletionType::List)
        .auto_add_history(false)
        .max_history_size(10_000)
        .map(rustyline::config::Builder::build);
    let config = match config {
        Ok(config) => config,
        Err(e) => {
            warn!("qmp: cannot configure the line editor: {e}");
            return crate::EXIT_FAILED;
        }
    };
    let mut rl = match Editor::<ShellHelper, DefaultHistory>::with_config(config) {
        Ok(rl) => rl,
        Err(e) => {
            warn!("qmp: cannot start the line editor: {e}");
            return crate::EXIT_FAILED;
        }
    };
    rl.set_helper(Some(helper));
    let history = history_path();
    if let Some(h) = &history {
        let _ = rl.load_history(h);
    }

    // Events, printed as they arrive, above the prompt.
    let event_task = client.as_ref().and_then(|c| {
        let mut printer = rl.create_external_printer().ok()?;
        let mut sub = c.subscribe(EventFilter::all());
        Some(runtime.spawn(async move {
            while let Some(item) = sub.recv().await {
                let text = match item {
                    Ok(event) => event_line(&event, style),
                    Err(Lagged { missed }) => format!("(missed {missed} events)"),
                };
                if printer.print(format!("{text}\n")).is_err() {
                    break;
                }
            }
        }))
    });

    let banner = match &client {
        Some(c) => format!(
            "Connected to QEMU {}. Tab completes commands and arguments; Ctrl-D quits.",
            c.greeting().version
        ),
        None => "Connected to the guest agent. Ctrl-D quits.".to_owned(),
    };
    // Commands piped in (a script): no banner, only results on stdout, and the exit code of the
    // worst failure, as a script needs; a person at a terminal gets the banner and the shell.
    let script = !std::io::stdin().is_terminal();
    // Output that cannot be written (a closed pipe: `qmp < cmds | head -1`) ends the session as
    // end of input does, instead of a panic from `println!`.
    let mut out = std::io::stdout();
    if !script && writeln!(out, "{banner}").is_err() {
        return 0;
    }
    let prompt_normal = if client.is_some() {
        "(QEMU) "
    } else {
        "(QGA) "
    };
    let mut transaction: Option<Vec<Value>> = None;
    let mut code = 0;
    loop {
        let prompt = if transaction.is_some() {
            "(QEMU transaction) "
        } else {
            prompt_normal
        };
        let line = match rl.readline(prompt) {
            Ok(line) => line,
            Err(ReadlineError::Interrupted) => {
                transaction = None;
                continue;
            }
            Err(ReadlineError::Eof) => {
                if transaction.is_some() {
                    warn!("qmp: end of input inside transaction(: its actions were not sent");
                }
                break;
            }
            Err(e) => {
                warn!("qmp: {e}");
                code = crate::EXIT_FAILED;
                break;
            }
        };
        if !line.trim().is_empty() {
            let _ = rl.add_history_entry(line.as_str());
        }
        let parsed = match parse_line(&line) {
            Ok(p) => p,
            Err(e) => {
                warn!("qmp: {e}");
                if script {
                    code = worse(code, crate::EXIT_USAGE);
                }
                continue;
            }
        };
        let command = match (parsed, &mut transaction) {
            (Line::Empty, _) => continue,
            (Line::BeginTransaction, Some(_)) => {
                warn!("qmp: already in a transaction; end it with )");
                continue;
            }
            (Line::BeginTransaction, None) => {
                transaction = Some(Vec::new());
                continue;
            }
            (Line::EndTransaction, None) => {
                warn!("qmp: ) without transaction(");
                continue;
            }
            (Line::EndTransaction, Some(_)) => {
                let actions = transaction.take().unwrap_or_default();
                json!({"execute": "transaction", "arguments": {"actions": actions}})
            }
            (Line::Hmp(_), Some(_)) => {
                warn!("qmp: hmp cannot be part of a transaction");
                continue;
            }
            (Line::Execute(cmd), Some(actions)) => {
                actions.push(action(&cmd));
                continue;
            }
            (Line::Execute(cmd), None) => cmd,
            (Line::Hmp(cmdline), None) => {
                let has = match &client {
                    Some(c) => runtime
                        .block_on(c.has_command("human-monitor-command"))
                        .unwrap_or(false),
                    None => false,
                };
                if !has {
                    warn!(
                        "qmp: this server has no human-monitor-command (qemu-storage-daemon and \
                         guest agents have no HMP)"
                    );
                    continue;
                }
                json!({"execute": "human-monitor-command", "arguments": {"command-line": cmdline}})
            }
        };
        let hmp = command["execute"] == "human-monitor-command";
        let written = match runtime.block_on(session.execute(command)) {
            Ok(Value::String(text)) if hmp => write!(out, "{text}").and_then(|()| out.flush()),
            Ok(value) => writeln!(out, "{}", style.format(&value)),
            Err(e) => {
                let failed = crate::report(&e);
                if session.peer.is_closed() {
                    code = crate::EXIT_CONNECTION;
                    break;
                }
                if script {
                    code = worse(code, failed);
                }
                Ok(())
            }
        };
        if written.is_err() {
            break;
        }
    }
    if let Some(h) = &history {
        if let Some(dir) = h.parent() {
            let _ = std::fs::create_dir_all(dir);
        }
        if let Err(e) = rl.save_history(h) {
            warn!("qmp: cannot save history to {}: {e}", h.display());
        }
    }
    if let Some(task) = event_task {
        task.abort();
    }
    code
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines() {
        assert_eq!(parse_line("  ").unwrap(), Line::Empty);
        assert_eq!(parse_line("# note").unwrap(), Line::Empty);
        assert_eq!(
            parse_line("hmp info block").unwrap(),
            Line::Hmp("info block".into())
        );
        assert_eq!(parse_line("transaction(").unwrap(), Line::BeginTransaction);
        assert_eq!(parse_line(" ) ").unwrap(), Line::EndTransaction);
        assert_eq!(
            parse_line("blockdev-add driver=null-co size=1024").unwrap(),
            Line::Execute(json!({"execute": "blockdev-add",
                "arguments": {"driver": "null-co", "size": 1024}}))
        );
        assert_eq!(
            parse_line(r#"{"execute": "query-status"}"#).unwrap(),
            Line::Execute(json!({"execute": "query-status"}))
        );
        assert!(parse_line("{oops").is_err());
        assert!(parse_line("x novalue").is_err());
    }

    #[test]
    fn transaction_action() {
        let cmd =
            json!({"execute": "block-dirty-bitmap-add", "arguments": {"node": "n0", "name": "b"}});
        assert_eq!(
            action(&cmd),
            json!({"type": "block-dirty-bitmap-add", "data": {"node": "n0", "name": "b"}})
        );
        assert_eq!(
            action(&json!({"execute": "x"})),
            json!({"type": "x", "data": {}})
        );
    }

    #[test]
    fn completion() {
        let schema = json!([
            {"name": "blockdev-add", "meta-type": "command", "arg-type": "0"},
            {"name": "query-status", "meta-type": "command", "arg-type": "1"},
            {"name": "0", "meta-type": "object",
             "members": [{"name": "driver"}, {"name": "node-name"}],
             "variants": [{"case": "null-co", "type": "2"}]},
            {"name": "1", "meta-type": "object", "members": []},
            {"name": "2", "meta-type": "object", "members": [{"name": "size"}]},
        ]);
        let commands = ["blockdev-add", "query-status"].map(String::from).into();
        let h = ShellHelper::from_schema(commands, &schema);
        assert_eq!(
            h.candidates("bl", 2),
            (0, vec!["blockdev-add ".to_string()])
        );
        assert_eq!(h.candidates("", 0).1.len(), 4);
        assert_eq!(
            h.candidates("blockdev-add no", 15),
            (13, vec!["node-name=".to_string()])
        );
        assert_eq!(
            h.candidates("blockdev-add driver=null-co ", 28).1,
            ["driver=", "node-name=", "size="]
        );
        assert!(h.candidates("blockdev-add driver=nu", 22).1.is_empty());
        assert!(h.candidates("nope x", 6).1.is_empty());
    }
}
