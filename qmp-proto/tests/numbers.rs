//! Numbers in return values come out exactly as QEMU wrote them: each decimal text becomes the
//! closest `f64`, whether the core parses it (`Command::decode_value`) or the caller parses the
//! text later (`RawJson::to_value`), which keeps the text itself unchanged. Without serde_json's
//! `float_roundtrip` (a workspace feature), `1.5e-300` came out as `1.4999999999999998e-300`.
mod common;

use common::*;
use qmp_proto::{Command, Output};
use serde_json::Value;

/// Decimal texts that a fast, inexact float parser gets wrong or that sit at the edges: the
/// subnormal range, halfway cases, the largest finite value, classic trouble makers.
const NUMBERS: &[&str] = &[
    "1.5e-300",
    "2.2250738585072014e-308",
    "2.2250738585072011e-308",
    "0.1",
    "1e300",
    "5e-324",
    "2.4703282292062328e-324",
    "1.7976931348623157e308",
    "1e23",
    "8.41e21",
    "0.30000000000000004",
    "7.2057594037927933e16",
    "-4.9406564584124654e-324",
    "123456789012345678901234567890e-40",
];

#[track_caller]
fn assert_exact(value: &Value, how: &str) {
    let got = value.as_array().expect("a list");
    assert_eq!(got.len(), NUMBERS.len());
    for (text, got) in NUMBERS.iter().zip(got) {
        let want: f64 = text.parse().expect("std parses exactly");
        let got = got.as_f64().expect("a number");
        assert_eq!(
            got.to_bits(),
            want.to_bits(),
            "{how}: {text} came out as {got:e}"
        );
    }
}

#[test]
fn floats_come_out_as_the_closest_f64_to_their_text() {
    let text = format!("[{}]", NUMBERS.join(", "));
    for chunking in CHUNKINGS {
        let mut pair = Pair::ready(oob_config(), FakeQemu::default(), chunking);
        let parsed = pair.send(Command::new("x-numbers").decode_value());
        let raw = pair.execute("x-numbers");
        pair.drive();
        for _ in 0..2 {
            let cmd = pair.server.next_command().expect("a command");
            let reply = format!("{{\"return\": {text}, \"id\": {}}}\r\n", cmd["id"]);
            pair.server.send_raw(reply.as_bytes());
        }
        pair.drive();
        let outputs = pair.take_outputs();
        let value = outputs.iter().find_map(|o| match o {
            Output::Value { id, value } if *id == parsed => Some(value),
            _ => None,
        });
        assert_exact(value.expect("a parsed value"), "decode_value");
        let kept = outputs.iter().find_map(|o| match o {
            Output::Response {
                id,
                result: Ok(raw_json),
            } if *id == raw => Some(raw_json),
            _ => None,
        });
        let kept = kept.expect("a response");
        assert_eq!(
            kept.get(),
            text,
            "{chunking:?}: the text is kept as it came"
        );
        assert_exact(&kept.to_value().expect("valid JSON"), "RawJson::to_value");
    }
}
