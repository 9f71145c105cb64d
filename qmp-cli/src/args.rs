//! qmp-shell's `key=value` argument syntax, and splitting a shell line into words.
//!
//! Values that parse as integers become numbers, `true`/`false` booleans, values starting with
//! `{` or `[` are parsed as JSON, anything else is a string. Dotted keys build nested objects:
//! `a.b=1 a.c=x` is `{"a": {"b": 1, "c": "x"}}`.

use serde_json::{Map, Value};

/// Why arguments could not be parsed.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum ArgError {
    /// A word without `=`.
    NotKeyValue(String),
    /// A key that is empty or has an empty dotted component.
    EmptyKey(String),
    /// A value starting with `{` or `[` that is not valid JSON.
    BadJson(String, String),
    /// The same key given twice, or a key that is both a value and an object.
    Conflict(String),
    /// Unbalanced quotes in a line.
    Unterminated,
}

impl std::fmt::Display for ArgError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            // No KEY=VALUE starts with `-`: an option given after the command.
            Self::NotKeyValue(w) if w.starts_with('-') => write!(
                f,
                "expected KEY=VALUE, got {w:?}: options go before the command \
                 (qmp [OPTIONS] COMMAND [KEY=VALUE]...)"
            ),
            Self::NotKeyValue(w) => write!(f, "expected KEY=VALUE, got {w:?}"),
            Self::EmptyKey(w) => write!(f, "empty key in {w:?}"),
            Self::BadJson(k, e) => write!(f, "the value of {k:?} is not valid JSON: {e}"),
            Self::Conflict(k) => {
                write!(f, "key {k:?} given twice or both as a value and an object")
            }
            Self::Unterminated => write!(f, "unterminated quote"),
        }
    }
}

impl std::error::Error for ArgError {}

/// Parses one value the way qmp-shell does.
pub(crate) fn parse_value(key: &str, text: &str) -> Result<Value, ArgError> {
    if let Ok(n) = text.parse::<i64>() {
        return Ok(Value::from(n));
    }
    if let Ok(n) = text.parse::<u64>() {
        return Ok(Value::from(n));
    }
    match text {
        "true" => return Ok(Value::Bool(true)),
        "false" => return Ok(Value::Bool(false)),
        _ => {}
    }
    if text.starts_with('{') || text.starts_with('[') {
        return serde_json::from_str(text)
            .map_err(|e| ArgError::BadJson(key.into(), e.to_string()));
    }
    Ok(Value::String(text.into()))
}

/// Builds an arguments object from `key=value` words.
pub(crate) fn parse_key_values<S: AsRef<str>>(words: &[S]) -> Result<Map<String, Value>, ArgError> {
    let mut out = Map::new();
    for word in words {
        let word = word.as_ref();
        let Some((key, text)) = word.split_once('=') else {
            return Err(ArgError::NotKeyValue(word.into()));
        };
        let path: Vec<&str> = key.split('.').collect();
        if path.iter().any(|p| p.is_empty()) {
            return Err(ArgError::EmptyKey(word.into()));
        }
        let value = parse_value(key, text)?;
        let (last, parents) = path.split_last().expect("split yields at least one part");
        let mut obj = &mut out;
        for part in parents {
            let slot = obj
                .entry(part.to_string())
                .or_insert_with(|| Value::Object(Map::new()));
            obj = match slot {
                Value::Object(map) => map,
                _ => return Err(ArgError::Conflict(key.into())),
            };
        }
        if obj.contains_key(*last) {
            return Err(ArgError::Conflict(key.into()));
        }
        obj.insert((*last).to_string(), value);
    }
    Ok(out)
}

/// Splits a shell line into words at whitespace. Single or double quotes group (and are
/// removed); inside `{...}` and `[...]` whitespace does not split, so JSON values may contain
/// spaces: `a={"x": 1, "y": "two words"}`.
pub(crate) fn split_words(line: &str) -> Result<Vec<String>, ArgError> {
    let mut words = Vec::new();
    let mut word = String::new();
    let mut in_word = false;
    let mut depth = 0usize;
    let mut quote: Option<char> = None;
    for c in line.chars() {
        if let Some(q) = quote {
            if c == q {
                quote = None;
                if depth > 0 {
                    word.push(c);
                }
            } else {
                word.push(c);
            }
            continue;
        }
        match c {
            '"' | '\'' => {
                quote = Some(c);
                in_word = true;
                if depth > 0 {
                    word.push(c);
                }
            }
            '{' | '[' => {
                depth += 1;
                in_word = true;
                word.push(c);
            }
            '}' | ']' => {
                depth = depth.saturating_sub(1);
                in_word = true;
                word.push(c);
            }
            c if c.is_whitespace() && depth == 0 => {
                if in_word {
                    words.push(std::mem::take(&mut word));
                    in_word = false;
                }
            }
            c => {
                in_word = true;
                word.push(c);
            }
        }
    }
    if quote.is_some() {
        return Err(ArgError::Unterminated);
    }
    if in_word {
        words.push(word);
    }
    Ok(words)
}

/// A `{"execute": name, "arguments": {...}}` object (no `arguments` when there are none).
pub(crate) fn command(name: &str, arguments: Map<String, Value>) -> Value {
    let mut cmd = Map::new();
    cmd.insert("execute".into(), Value::String(name.into()));
    if !arguments.is_empty() {
        cmd.insert("arguments".into(), Value::Object(arguments));
    }
    Value::Object(cmd)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn kv(words: &[&str]) -> Value {
        Value::Object(parse_key_values(words).unwrap())
    }

    #[test]
    fn scalar_types() {
        assert_eq!(
            kv(&[
                "driver=null-co",
                "node-name=n0",
                "size=1048576",
                "read-only=true",
                "x=false"
            ]),
            json!({"driver": "null-co", "node-name": "n0", "size": 1048576, "read-only": true, "x": false})
        );
        assert_eq!(
            kv(&["n=-5", "big=18446744073709551615"]),
            json!({"n": -5, "big": 18446744073709551615u64})
        );
        // Not integers: strings, as qmp-shell leaves them.
        assert_eq!(
            kv(&["f=1.5", "h=0x10", "e="]),
            json!({"f": "1.5", "h": "0x10", "e": ""})
        );
        assert_eq!(kv(&["t=True", "n=null"]), json!({"t": "True", "n": "null"}));
    }

    #[test]
    fn json_values() {
        assert_eq!(
            kv(&[r#"o={"a":[1,2]}"#, "l=[1,\"x\"]"]),
            json!({"o": {"a": [1, 2]}, "l": [1, "x"]})
        );
        assert!(matches!(
            parse_key_values(&["o={nope"]),
            Err(ArgError::BadJson(..))
        ));
    }

    #[test]
    fn equals_in_value_kept() {
        assert_eq!(kv(&["cmd=a=b"]), json!({"cmd": "a=b"}));
    }

    #[test]
    fn dotted_keys_nest() {
        assert_eq!(
            kv(&["a.b=1", "a.c.d=x", "e=2"]),
            json!({"a": {"b": 1, "c": {"d": "x"}}, "e": 2})
        );
    }

    #[test]
    fn errors() {
        assert_eq!(
            parse_key_values(&["novalue"]),
            Err(ArgError::NotKeyValue("novalue".into()))
        );
        assert!(matches!(
            parse_key_values(&["=1"]),
            Err(ArgError::EmptyKey(_))
        ));
        assert!(matches!(
            parse_key_values(&["a..b=1"]),
            Err(ArgError::EmptyKey(_))
        ));
        assert!(matches!(
            parse_key_values(&["a=1", "a=2"]),
            Err(ArgError::Conflict(_))
        ));
        assert!(matches!(
            parse_key_values(&["a=1", "a.b=2"]),
            Err(ArgError::Conflict(_))
        ));
        assert!(matches!(
            parse_key_values(&["a.b=1", "a=2"]),
            Err(ArgError::Conflict(_))
        ));
    }

    #[test]
    fn split_line() {
        assert_eq!(
            split_words("  blockdev-add  driver=null-co node-name=n0 ").unwrap(),
            ["blockdev-add", "driver=null-co", "node-name=n0"]
        );
        assert_eq!(
            split_words(r#"x a="two words" b='it is' c={"k": "v w", "l": [1, 2]}"#).unwrap(),
            [
                "x",
                "a=two words",
                "b=it is",
                r#"c={"k": "v w", "l": [1, 2]}"#
            ]
        );
        assert_eq!(split_words("a 'b").unwrap_err(), ArgError::Unterminated);
        assert!(split_words("   ").unwrap().is_empty());
        assert_eq!(split_words("a=''").unwrap(), ["a="]);
    }

    #[test]
    fn command_object() {
        assert_eq!(
            command("query-status", Map::new()),
            json!({"execute": "query-status"})
        );
        assert_eq!(
            command("x", parse_key_values(&["a=1"]).unwrap()),
            json!({"execute": "x", "arguments": {"a": 1}})
        );
    }
}
