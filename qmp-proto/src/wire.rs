//! Finding the top-level members of an incoming message without building them.

use std::fmt;

use serde::Deserialize;
use serde::de::{Deserializer, IgnoredAny, MapAccess, Visitor};
use serde_json::value::RawValue;

/// The top-level members of a message that matter, as the text of valid JSON values. Unknown
/// members are skipped.
#[derive(Default, Debug, PartialEq)]
pub(crate) struct Members<'a> {
    pub(crate) qmp: Option<&'a str>,
    pub(crate) ret: Option<&'a str>,
    pub(crate) error: Option<&'a str>,
    pub(crate) id: Option<&'a str>,
    pub(crate) event: Option<&'a str>,
    pub(crate) data: Option<&'a str>,
    pub(crate) timestamp: Option<&'a str>,
}

impl<'a> Members<'a> {
    /// Parses one message: with the fast scanner when it can, else with `serde_json`.
    pub(crate) fn parse(text: &'a str) -> Result<Self, serde_json::Error> {
        #[cfg(feature = "fuzzing")]
        crate::scan::agrees(text);
        match crate::scan::members(text) {
            Some(m) => Ok(m),
            None => Self::parse_with_serde(text),
        }
    }

    /// Parses one message with `serde_json`, which decides whatever the scanner leaves to it.
    pub(crate) fn parse_with_serde(text: &'a str) -> Result<Self, serde_json::Error> {
        serde_json::from_str(text)
    }

    /// The id as one of ours: a plain non-negative integer, as we send them.
    pub(crate) fn numeric_id(&self) -> Option<u64> {
        let text = self.id?;
        if text.is_empty() || !text.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        text.parse().ok()
    }
}

#[derive(Deserialize)]
#[serde(field_identifier)]
enum Field {
    #[serde(rename = "QMP")]
    Qmp,
    #[serde(rename = "return")]
    Return,
    #[serde(rename = "error")]
    Error,
    #[serde(rename = "id")]
    Id,
    #[serde(rename = "event")]
    Event,
    #[serde(rename = "data")]
    Data,
    #[serde(rename = "timestamp")]
    Timestamp,
    #[serde(other)]
    Other,
}

impl<'de> Deserialize<'de> for Members<'de> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct MembersVisitor;
        impl<'de> Visitor<'de> for MembersVisitor {
            type Value = Members<'de>;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a QMP message object")
            }

            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Members<'de>, A::Error> {
                let mut m = Members::default();
                while let Some(field) = map.next_key::<Field>()? {
                    // Read values as raw JSON, not `Option`, so an explicit `null` is kept.
                    let slot = match field {
                        Field::Qmp => &mut m.qmp,
                        Field::Return => &mut m.ret,
                        Field::Error => &mut m.error,
                        Field::Id => &mut m.id,
                        Field::Event => &mut m.event,
                        Field::Data => &mut m.data,
                        Field::Timestamp => &mut m.timestamp,
                        Field::Other => {
                            map.next_value::<IgnoredAny>()?;
                            continue;
                        }
                    };
                    *slot = Some(map.next_value::<&RawValue>()?.get());
                }
                Ok(m)
            }
        }
        deserializer.deserialize_map(MembersVisitor)
    }
}

/// Reads a JSON string member, unescaping it.
pub(crate) fn string(raw: &str) -> Option<String> {
    serde_json::from_str::<String>(raw).ok()
}
