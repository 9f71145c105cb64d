//! Fuzz harnesses for `qmp-proto`.
//!
//! Each public function here is one fuzz target: it takes the fuzzer's bytes, drives the core
//! with them and panics when an invariant breaks. The cargo-fuzz binaries in `fuzz_targets/` are
//! three-line wrappers around them, and this crate's own tests run the same functions on every
//! committed seed (`seeds/<target>/`) and every past crash (`regressions/<target>/`), so a plain
//! `cargo test` on stable Rust replays them without cargo-fuzz.
//!
//! | target | what it checks |
//! |---|---|
//! | [`splitter_chunks`] | the splitter gives the same frames and reports for the same bytes fed whole, byte at a time, in arbitrary chunks and all at once; size and depth bounds; every report matches the bytes it came from |
//! | [`splitter_differential`] | generated JSON values rendered compact, pretty and QEMU style (CRLF) with junk between them: every object the splitter accepts is byte for byte the one rendered and parses to the same value with `serde_json`; nothing is lost or invented |
//! | [`connection_bytes`] | a connection past a real greeting fed arbitrary bytes: no panic, bounded input buffer and output queue, exactly one outcome per request, `Closed` once and last |
//! | [`agent_ops`] | a guest-agent connection under operation sequences (sends, no-reply commands, deadlines, cancels, resyncs, sync replies current and stale, replies with and without ids, arbitrary bytes, EOF): the outcome checks above, one command in flight at most, resyncs well formed |
//! | [`members_scan`] | any text: the core's fast scanner for messages accepts only what `serde_json` accepts, and finds the same top-level members |
//! | [`connection_ops`] | operation sequences (sends, cancels, deadlines, a scripted server's replies in any order, id-less errors, junk, partial writes, EOF, close) checked against a reference model of the pending table |
//!
//! The inputs are read with [`arbitrary`]: a fixed header first, then the rest (bytes for the
//! byte-stream targets, a sequence of values or operations for the structured ones). Limits come
//! from a [`FuzzConfig`] mapped into small ranges so that every limit path is reachable.

mod agent;
mod conn;
mod ops;
mod splitter;

#[cfg(test)]
mod seeds;

use arbitrary::Arbitrary;
use qmp_proto::Config;

pub use agent::agent_ops;
pub use conn::connection_bytes;
pub use ops::connection_ops;
pub use splitter::{splitter_chunks, splitter_differential};

/// Any text, usually a mutated QEMU message: the core's fast scanner for messages must accept only
/// what `serde_json` accepts, and find the same top-level members (the last of repeated names,
/// values as their exact text). The check itself lives in the core (`qmp_proto::fuzzing`), which
/// also runs it on every message when built for fuzzing, so the connection targets check it on
/// the messages they deliver too.
pub fn members_scan(data: &[u8]) {
    qmp_proto::fuzzing::check_members_scan(&String::from_utf8_lossy(data));
}

/// Names of the targets, as in `fuzz_targets/` and `seeds/`.
pub const TARGETS: [&str; 6] = [
    "splitter_chunks",
    "splitter_differential",
    "connection_bytes",
    "connection_ops",
    "agent_ops",
    "members_scan",
];

/// Runs the target called `name` on `data`. Panics on an unknown name.
pub fn run(name: &str, data: &[u8]) {
    match name {
        "splitter_chunks" => splitter_chunks(data),
        "splitter_differential" => splitter_differential(data),
        "connection_bytes" => connection_bytes(data),
        "connection_ops" => connection_ops(data),
        "agent_ops" => agent_ops(data),
        "members_scan" => members_scan(data),
        other => panic!("unknown fuzz target {other}"),
    }
}

/// Connection limits from a few bytes, mapped into small valid ranges so the fuzzer reaches every
/// limit instead of wasting time on huge ones.
#[derive(Debug, Clone, Copy, Arbitrary)]
pub struct FuzzConfig {
    /// `max_message_size` = 64 + this % 4033 (64..=4096).
    pub max_message_size: u16,
    /// `max_depth` = 2 + this % 15 (2..=16).
    pub max_depth: u8,
    /// `max_pending` = 1 + this % 32 (1..=32).
    pub max_pending: u8,
    /// `max_in_flight` = 1 + this % 10 (1..=10).
    pub max_in_flight: u8,
    /// `max_buffered_outputs` = 1 + this % 16 (1..=16).
    pub max_buffered_outputs: u8,
    /// `max_command_size` = 64 + this % 4033 (64..=4096).
    pub max_command_size: u16,
    /// `enable_oob`.
    pub enable_oob: bool,
    /// `negotiate`.
    pub negotiate: bool,
}

impl FuzzConfig {
    /// The validated configuration.
    pub fn config(&self) -> Config {
        Config::builder()
            .max_message_size(64 + usize::from(self.max_message_size) % 4033)
            .max_depth(2 + usize::from(self.max_depth) % 15)
            .max_pending(1 + usize::from(self.max_pending) % 32)
            .max_in_flight(1 + usize::from(self.max_in_flight) % 10)
            .max_buffered_outputs(1 + usize::from(self.max_buffered_outputs) % 16)
            .max_command_size(64 + usize::from(self.max_command_size) % 4033)
            .enable_oob(self.enable_oob)
            .negotiate(self.negotiate)
            .build()
            .expect("FuzzConfig maps into valid ranges")
    }
}

/// A small deterministic PRNG (xorshift64*) for chunk boundaries, so a crash replays exactly.
pub(crate) struct Rng(u64);

impl Rng {
    pub(crate) fn new(seed: u64) -> Self {
        Self(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }

    pub(crate) fn below(&mut self, n: usize) -> usize {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        (self.0.wrapping_mul(0x2545_F491_4F6C_DD1D) % n.max(1) as u64) as usize
    }
}

/// Cuts `bytes` into pieces of 1 to `2^(log % 17)` bytes at places drawn from `seed`.
pub(crate) fn pieces(bytes: &[u8], seed: u32, log: u8) -> Vec<&[u8]> {
    let max = 1usize << (log % 17);
    let mut rng = Rng::new(u64::from(seed));
    let mut out = Vec::new();
    let mut rest = bytes;
    while !rest.is_empty() {
        let n = (1 + rng.below(max)).min(rest.len());
        out.push(&rest[..n]);
        rest = &rest[n..];
    }
    out
}

/// JSON whitespace, the only bytes the splitter skips silently between values.
pub(crate) fn is_ws(b: u8) -> bool {
    matches!(b, b' ' | b'\t' | b'\r' | b'\n')
}

/// An independent lexical walk of the value starting at `bytes[0]` (`{`, `[` or `"`): calls
/// `at(index, depth, ended)` after each byte until the value ends (then `None`, unless `at`
/// returned something there), `at` returns something, or the bytes are not a value.
fn walk<R>(bytes: &[u8], mut at: impl FnMut(usize, usize, bool) -> Option<R>) -> Option<R> {
    let (mut depth, mut in_string, mut escape) = (0usize, false, false);
    for (i, &b) in bytes.iter().enumerate() {
        let mut ended = false;
        if in_string {
            if escape {
                escape = false;
            } else if b == b'\\' {
                escape = true;
            } else if b == b'"' {
                in_string = false;
                ended = depth == 0;
            }
        } else {
            match b {
                b'"' => in_string = true,
                b'{' | b'[' => depth += 1,
                // A closer at depth 0 cannot happen: the value starts with an opener or a quote.
                b'}' | b']' => {
                    depth = depth.checked_sub(1)?;
                    ended = depth == 0;
                }
                _ if depth == 0 => return None,
                _ => {}
            }
        }
        if let Some(r) = at(i, depth, ended) {
            return Some(r);
        }
        if ended {
            return None;
        }
    }
    None
}

/// Where the value starting at `bytes[0]` first passes a limit: whether by depth (checked first
/// at each byte) and its size up to that byte. `depth_only` ignores the size limit (values
/// skipped anyway: not objects). `None` if it ends, or `bytes` do, before.
pub(crate) fn limit_crossing(
    bytes: &[u8],
    max_size: usize,
    max_depth: usize,
    depth_only: bool,
) -> Option<(bool, usize)> {
    walk(bytes, |i, depth, _| {
        // The splitter judges a value's size at the byte that passes the limit, even its last.
        (depth > max_depth || !depth_only && i + 1 > max_size).then_some((depth > max_depth, i + 1))
    })
}

/// The index just past the end of the value starting at `bytes[0]` (`{`, `[` or `"`) and its
/// deepest nesting, by an independent scan, or `None` if it does not end within `bytes`.
pub(crate) fn lex_value(bytes: &[u8]) -> Option<(usize, usize)> {
    let mut deepest = 0;
    walk(bytes, |i, depth, ended| {
        deepest = deepest.max(depth);
        ended.then_some((i + 1, deepest))
    })
}

/// How many outputs the connection holds, read from its `Debug` form (there is no getter, and
/// polling to count would resume paused processing).
pub(crate) fn queued_outputs(conn: &qmp_proto::Connection) -> usize {
    let debug = format!("{conn:?}");
    let rest = debug
        .split_once("outputs: ")
        .expect("Connection's Debug shows `outputs`")
        .1;
    let digits: String = rest.chars().take_while(char::is_ascii_digit).collect();
    digits.parse().expect("`outputs` is a count")
}

#[cfg(test)]
mod tests {
    use std::path::{Path, PathBuf};

    use super::*;

    fn dir(kind: &str, target: &str) -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join(kind)
            .join(target)
    }

    fn files(kind: &str, target: &str) -> Vec<PathBuf> {
        let Ok(entries) = std::fs::read_dir(dir(kind, target)) else {
            return Vec::new();
        };
        let mut files: Vec<PathBuf> = entries
            .map(|e| e.expect("readable directory").path())
            .filter(|p| p.is_file() && p.file_name().is_some_and(|n| n != "README.md"))
            .collect();
        files.sort();
        files
    }

    /// Every committed seed and every past crash, through its harness.
    #[test]
    fn replay_seeds_and_regressions() {
        let mut total = 0;
        for target in TARGETS {
            let seeds = files("seeds", target);
            assert!(!seeds.is_empty(), "no seeds for {target}");
            for path in seeds.iter().chain(&files("regressions", target)) {
                let data = std::fs::read(path).expect("readable seed");
                eprintln!("{target}: {}", path.display());
                run(target, &data);
                total += 1;
            }
        }
        eprintln!("replayed {total} inputs");
    }

    /// A few hundred pseudo-random inputs per target: a smoke run of the harnesses themselves.
    #[test]
    fn harnesses_survive_pseudo_random_inputs() {
        let mut rng = Rng::new(0x0f22);
        for target in TARGETS {
            for _ in 0..300 {
                let len = rng.below(600);
                let data: Vec<u8> = (0..len).map(|_| rng.below(256) as u8).collect();
                run(target, &data);
            }
        }
    }

    /// What the main connection seeds reach, so a seed that silently stopped doing its job (after
    /// a change to an input format) shows up.
    #[test]
    fn seeds_reach_what_they_are_for() {
        let read = |target: &str, name: &str| {
            std::fs::read(dir("seeds", target).join(name)).expect("readable seed")
        };
        let count = |s: &conn::Summary, kind: &str| s.outcomes.get(kind).copied().unwrap_or(0);

        for name in ["qsd-10.0-compact", "qsd-10.0-pretty"] {
            let s = conn::run_bytes(&read("connection_bytes", name)).expect("a header");
            assert_eq!(s.ready, Some(true), "{name}: {s:?}");
            assert!(
                count(&s, "ok") >= 6 && count(&s, "qmp") >= 2,
                "{name}: {s:?}"
            );
            assert_eq!(s.events, 9, "{name}: {s:?}");
        }
        // The cascade's first error fails the command in flight (its write caused it); the rest,
        // and the reply meant for it, answer nothing.
        let s = conn::run_bytes(&read("connection_bytes", "idless-cascade")).expect("a header");
        assert_eq!((count(&s, "ok"), count(&s, "qmp")), (0, 1), "{s:?}");

        let s = ops::run_ops(&read("connection_ops", "session")).expect("a header");
        assert_eq!(
            (count(&s, "ok"), count(&s, "qmp"), s.events),
            (2, 1, 2),
            "{s:?}"
        );
        let s = ops::run_ops(&read("connection_ops", "deadlines-and-cancels")).expect("a header");
        for kind in ["cancelled", "ok", "timed out", "too deep", "too large"] {
            assert!(count(&s, kind) >= 1, "{kind}: {s:?}");
        }
        let s = ops::run_ops(&read("connection_ops", "oob-unavailable")).expect("a header");
        assert_eq!(count(&s, "oob unavailable"), 1, "{s:?}");
        let s = ops::run_ops(&read("connection_ops", "bad-greeting")).expect("a header");
        assert!(
            matches!(
                s.closed,
                Some(qmp_proto::CloseReason::Protocol(
                    qmp_proto::ProtocolError::BadGreeting(_)
                ))
            ),
            "{s:?}"
        );
    }

    #[test]
    fn lex_value_finds_the_end_and_depth() {
        assert_eq!(lex_value(b"{}"), Some((2, 1)));
        assert_eq!(lex_value(br#"{"a": [1, "]"]} x"#), Some((15, 2)));
        assert_eq!(lex_value(br#""a\"b" x"#), Some((6, 0)));
        assert_eq!(lex_value(b"{\"a\": 1"), None);
    }

    #[test]
    fn fuzz_config_covers_the_intended_ranges() {
        let lo = FuzzConfig {
            max_message_size: 0,
            max_depth: 0,
            max_pending: 0,
            max_in_flight: 0,
            max_buffered_outputs: 0,
            max_command_size: 0,
            enable_oob: false,
            negotiate: false,
        }
        .config();
        assert_eq!(
            (lo.max_message_size(), lo.max_depth(), lo.max_pending()),
            (64, 2, 1)
        );
        let hi = FuzzConfig {
            max_message_size: 4032,
            max_depth: 14,
            max_pending: 31,
            max_in_flight: 9,
            max_buffered_outputs: 15,
            max_command_size: 4032,
            enable_oob: true,
            negotiate: true,
        }
        .config();
        assert_eq!(
            (
                hi.max_message_size(),
                hi.max_depth(),
                hi.max_pending(),
                hi.max_in_flight(),
                hi.max_buffered_outputs()
            ),
            (4096, 16, 32, 10, 16)
        );
    }

    /// Rewrites `seeds/` from the real captures and the scripted scenarios in `seeds.rs`:
    /// `cargo test -p qmp-proto-fuzz -- --ignored write_seeds`.
    #[test]
    #[ignore = "writes files; run by hand when the seed formats change"]
    fn write_seeds() {
        seeds::write_all(Path::new(env!("CARGO_MANIFEST_DIR")));
    }
}
