//! What the server sends: the greeting, return values, errors and events.

use std::fmt;

use serde::Deserialize;
use serde::de::DeserializeOwned;
use serde_json::Value;
use serde_json::value::RawValue;

/// A JSON value as the server sent it, parsed only when asked.
///
/// Return values and event data stay as validated JSON text until the caller decides what to
/// build from them: a [`Value`], a typed struct straight from the text (no intermediate `Value`), or
/// nothing at all. A caller that only wants an event's name never pays for its data.
///
/// ```
/// # use qmp_proto::RawJson;
/// let raw = RawJson::from_json(r#"{"running": true, "status": "running"}"#).unwrap();
/// #[derive(serde::Deserialize)]
/// struct Status { running: bool }
/// assert!(raw.deserialize::<Status>().unwrap().running);
/// assert_eq!(raw.to_value().unwrap()["status"], "running");
/// ```
#[derive(Clone)]
pub struct RawJson(Box<str>);

impl RawJson {
    /// Validates `json` and keeps it as it is.
    pub fn from_json(json: &str) -> Result<Self, serde_json::Error> {
        serde_json::from_str::<&RawValue>(json)?;
        Ok(Self(json.into()))
    }

    /// Keeps `json`, which the caller has validated.
    pub(crate) fn from_raw(json: &str) -> Self {
        Self(json.into())
    }

    /// The JSON text, exactly as received (whitespace included for `pretty=on` monitors).
    pub fn get(&self) -> &str {
        &self.0
    }

    /// Builds a [`Value`]. Fails only on numbers `serde_json` cannot represent (such as `1e400`).
    pub fn to_value(&self) -> Result<Value, serde_json::Error> {
        serde_json::from_str(&self.0)
    }

    /// Deserializes straight from the text into `T`.
    pub fn deserialize<T: DeserializeOwned>(&self) -> Result<T, serde_json::Error> {
        serde_json::from_str(&self.0)
    }

    /// The JSON text, owned.
    pub fn into_string(self) -> String {
        self.0.into()
    }
}

impl PartialEq for RawJson {
    fn eq(&self, other: &Self) -> bool {
        self.get() == other.get()
    }
}

impl Eq for RawJson {}

impl fmt::Debug for RawJson {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Return values can carry secrets; show the size, not the text.
        write!(f, "RawJson({} bytes)", self.get().len())
    }
}

impl fmt::Display for RawJson {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.get())
    }
}

/// The server's greeting: `{"QMP": {"version": ..., "capabilities": [...]}}`.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct Greeting {
    /// The QEMU version.
    pub version: Version,
    /// Capabilities the server offers (`"oob"` is the only one defined today). Unknown ones are kept.
    pub capabilities: Vec<String>,
}

impl Greeting {
    /// Whether the server offers `capability`.
    pub fn has_capability(&self, capability: &str) -> bool {
        self.capabilities.iter().any(|c| c == capability)
    }

    pub(crate) fn parse(raw: &str) -> Option<Self> {
        #[derive(Deserialize)]
        struct Wire {
            version: VersionWire,
            capabilities: Vec<Value>,
        }
        #[derive(Deserialize)]
        struct VersionWire {
            qemu: Triple,
            #[serde(default)]
            package: String,
        }
        #[derive(Deserialize)]
        struct Triple {
            major: u64,
            minor: u64,
            micro: u64,
        }
        let wire: Wire = serde_json::from_str(raw).ok()?;
        Some(Self {
            version: Version {
                major: wire.version.qemu.major,
                minor: wire.version.qemu.minor,
                micro: wire.version.qemu.micro,
                package: wire.version.package,
            },
            capabilities: wire
                .capabilities
                .into_iter()
                .filter_map(|c| match c {
                    Value::String(s) => Some(s),
                    _ => None,
                })
                .collect(),
        })
    }
}

/// A QEMU version from the greeting.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
#[non_exhaustive]
pub struct Version {
    /// Major version (`10` in 10.0.2).
    pub major: u64,
    /// Minor version.
    pub minor: u64,
    /// Micro version.
    pub micro: u64,
    /// Distribution package string, e.g. `"Debian 1:10.0.2+ds-2+deb13u1~bpo12+1"`; may be empty.
    pub package: String,
}

impl fmt::Display for Version {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}.{}", self.major, self.minor, self.micro)?;
        if !self.package.is_empty() {
            write!(f, " ({})", self.package)?;
        }
        Ok(())
    }
}

/// An asynchronous event: `{"event": name, "data": {...}, "timestamp": {...}}`.
///
/// Names and data members grow with every QEMU release; nothing here rejects unknown ones.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct Event {
    /// The event name, e.g. `"JOB_STATUS_CHANGE"`.
    pub name: String,
    /// The `data` member, unparsed; `None` when the event has none.
    pub data: Option<RawJson>,
    /// When QEMU emitted it.
    pub timestamp: Timestamp,
}

impl Event {
    /// The data as a [`Value`] (`Value::Null` when absent).
    pub fn data_value(&self) -> Result<Value, serde_json::Error> {
        self.data
            .as_ref()
            .map_or(Ok(Value::Null), RawJson::to_value)
    }
}

/// An event's timestamp. Both fields are `-1` when the host clock was unavailable (allowed by
/// the spec) or the event carried no timestamp.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Deserialize)]
#[non_exhaustive]
pub struct Timestamp {
    /// Seconds since the Unix epoch.
    pub seconds: i64,
    /// Microseconds within the second.
    pub microseconds: i64,
}

impl Timestamp {
    /// The spec's "unknown" timestamp.
    pub const UNKNOWN: Self = Self {
        seconds: -1,
        microseconds: -1,
    };

    pub(crate) fn parse(raw: Option<&str>) -> Self {
        raw.and_then(|r| serde_json::from_str(r).ok())
            .unwrap_or(Self::UNKNOWN)
    }
}

/// An error the server returned for a command: `{"error": {"class": ..., "desc": ...}}`.
///
/// This is an ordinary outcome (the command was refused), not a protocol failure.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{class}: {desc}")]
#[non_exhaustive]
pub struct QmpError {
    /// The error class, e.g. `"GenericError"` or `"CommandNotFound"`. An open set: match the ones
    /// you handle and treat the rest alike. Empty if the server sent none.
    pub class: String,
    /// A human-readable description; not meant to be matched on.
    pub desc: String,
}

impl QmpError {
    /// An error with the given class and description.
    pub fn new(class: impl Into<String>, desc: impl Into<String>) -> Self {
        Self {
            class: class.into(),
            desc: desc.into(),
        }
    }

    /// Reads an `error` member permissively: a response must still complete its request even if
    /// the error object is odd, so missing parts are left empty rather than invented.
    pub(crate) fn parse(raw: &str) -> Self {
        #[derive(Deserialize)]
        struct Wire {
            #[serde(default)]
            class: String,
            #[serde(default)]
            desc: String,
        }
        match serde_json::from_str::<Wire>(raw) {
            Ok(w) => Self {
                class: w.class,
                desc: w.desc,
            },
            Err(_) => Self {
                class: String::new(),
                desc: raw.to_owned(),
            },
        }
    }
}

/// A response that matches no request this connection is waiting for: an unknown, repeated,
/// non-numeric or missing id. QEMU sends id-less errors when it cannot parse its input (one bad
/// write can earn a long cascade of them). Reported for diagnostics; the spec says to drop them.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct Unmatched {
    /// The `id` member as sent, if any.
    pub id: Option<RawJson>,
    /// The return value or the error.
    pub result: Result<RawJson, QmpError>,
}
