//! Printing JSON: pretty and coloured for a terminal, compact for pipes.

use std::fmt::Write as _;

use serde_json::Value;

/// How results are printed.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Style {
    /// Indented, one member per line.
    pub(crate) pretty: bool,
    /// ANSI colours.
    pub(crate) color: bool,
}

impl Style {
    /// Pretty and coloured on a terminal (no colour with `$NO_COLOR` set), compact otherwise.
    pub(crate) fn for_stdout() -> Self {
        use std::io::IsTerminal;
        let tty = std::io::stdout().is_terminal();
        Self {
            pretty: tty,
            color: tty && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty()),
        }
    }

    /// Formats `value` in this style (no trailing newline).
    pub(crate) fn format(self, value: &Value) -> String {
        match (self.pretty, self.color) {
            (false, false) => value.to_string(),
            (true, false) => serde_json::to_string_pretty(value).unwrap_or_default(),
            (pretty, true) => {
                let mut out = String::new();
                write_colored(&mut out, value, pretty, 0);
                out
            }
        }
    }
}

const KEY: &str = "\x1b[34;1m";
const STRING: &str = "\x1b[32m";
const NUMBER: &str = "\x1b[36m";
const LITERAL: &str = "\x1b[35m";
const RESET: &str = "\x1b[0m";

fn write_colored(out: &mut String, value: &Value, pretty: bool, depth: usize) {
    let indent = |out: &mut String, depth: usize| {
        if pretty {
            out.push('\n');
            out.extend(std::iter::repeat_n("  ", depth));
        }
    };
    match value {
        Value::Null | Value::Bool(_) => {
            let _ = write!(out, "{LITERAL}{value}{RESET}");
        }
        Value::Number(_) => {
            let _ = write!(out, "{NUMBER}{value}{RESET}");
        }
        Value::String(_) => {
            let _ = write!(out, "{STRING}{value}{RESET}");
        }
        Value::Array(items) if items.is_empty() => out.push_str("[]"),
        Value::Object(map) if map.is_empty() => out.push_str("{}"),
        Value::Array(items) => {
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                indent(out, depth + 1);
                write_colored(out, item, pretty, depth + 1);
            }
            indent(out, depth);
            out.push(']');
        }
        Value::Object(map) => {
            out.push('{');
            for (i, (k, v)) in map.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                indent(out, depth + 1);
                let _ = write!(out, "{KEY}{}{RESET}:", Value::String(k.clone()));
                if pretty {
                    out.push(' ');
                }
                write_colored(out, v, pretty, depth + 1);
            }
            indent(out, depth);
            out.push('}');
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn plain_styles() {
        let v = json!({"a": [1, "x"], "b": {}});
        let compact = Style {
            pretty: false,
            color: false,
        };
        assert_eq!(compact.format(&v), r#"{"a":[1,"x"],"b":{}}"#);
        let pretty = Style {
            pretty: true,
            color: false,
        };
        assert_eq!(pretty.format(&v), serde_json::to_string_pretty(&v).unwrap());
    }

    #[test]
    fn colored_strips_to_pretty() {
        let v = json!({"a": [1, "x\"y", true, null], "b": {"c": []}});
        let colored = Style {
            pretty: true,
            color: true,
        }
        .format(&v);
        assert!(colored.contains("\x1b["));
        let mut stripped = String::new();
        let mut chars = colored.chars();
        while let Some(c) = chars.next() {
            if c == '\x1b' {
                for c in chars.by_ref() {
                    if c == 'm' {
                        break;
                    }
                }
            } else {
                stripped.push(c);
            }
        }
        assert_eq!(stripped, serde_json::to_string_pretty(&v).unwrap());
    }
}
