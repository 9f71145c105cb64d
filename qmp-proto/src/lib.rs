//! An IO-free (sans-IO) implementation of the QEMU Machine Protocol (QMP), the JSON protocol QEMU
//! speaks on its monitor sockets.
//!
//! [`Connection`] is a state machine for one connection: give it the bytes you read, take
//! [`Output`]s (the greeting, responses, events, reports) and the bytes to write. It has no
//! sockets, threads, clock, locks, channels or randomness, and it never panics on any input, so it
//! runs under any runtime, in any event loop, and under a fuzzer. The `qmp-tokio`,
//! `qmp-async-std` and `qmp-blocking` crates bind it to transports.
//!
//! What it takes care of:
//!
//! * **Framing by JSON value**, as QEMU itself does, so `pretty=on` monitors, CRLF, junk between
//!   messages and any chunking of the input all work; each byte is scanned once
//!   ([`framing::JsonSplitter`]).
//! * **Bounds**: a maximum message size and depth (larger messages are skipped without being
//!   buffered and survived; the request they may answer fails where the limit is passed), a
//!   bounded output queue that pauses reading, a bounded table of pending requests. See
//!   [`Config`].
//! * **The handshake**: greeting, `qmp_capabilities` (asking for OOB when offered, if
//!   [`ConfigBuilder::enable_oob`] is on: it is off by default); commands sent early
//!   are queued.
//! * **Requests**: unique ids never reused, on the wire too (see [`Connection::wire_id`]);
//!   exactly one outcome per request (return value, QMP
//!   error, timed out, or closed) unless cancelled; late responses of cancelled or timed-out
//!   requests dropped; OOB commands overtaking in-band ones, which are held to QEMU's queue
//!   depth; an id-less error (QEMU could not parse its input) fails the oldest in-band request
//!   in flight, and the rest of its cascade fails nothing.
//! * **File descriptors**: a command marked [`Command::with_fds`] starts its own [`Transmit`], so an
//!   adapter knows which write must carry `SCM_RIGHTS`.
//! * **Lazy parsing**: return values and event data stay as [`RawJson`] until asked for.
//!
//! # Example: a whole handshake from bytes
//!
//! ```
//! use qmp_proto::{Command, Connection, Output, State};
//!
//! let mut conn = Connection::default();
//! conn.handle_input(b"{\"QMP\": {\"version\": {\"qemu\": {\"micro\": 2, \"minor\": 0, \"major\": 10}, \
//!     \"package\": \"Debian 1:10.0.2\"}, \"capabilities\": [\"oob\"]}}\r\n");
//! let Some(Output::Greeting(greeting)) = conn.poll_output() else { panic!("no greeting") };
//! assert!(greeting.has_capability("oob"));
//!
//! // The connection answers the greeting by itself.
//! let transmit = conn.poll_transmit().expect("qmp_capabilities");
//! assert!(transmit.data.starts_with(b"{\"execute\":\"qmp_capabilities\""));
//! let n = transmit.data.len();
//! conn.advance_transmit(n);
//!
//! conn.handle_input(b"{\"return\": {}, \"id\": 0}\r\n");
//! assert_eq!(conn.poll_output(), Some(Output::Ready { oob: false }));
//! assert_eq!(conn.state(), State::Ready);
//!
//! // A command, an event that arrives before its response, and the response.
//! let id = conn.send(Command::new("stop"))?;
//! let n = conn.poll_transmit().unwrap().data.len();
//! conn.advance_transmit(n);
//! conn.handle_input(b"{\"timestamp\": {\"seconds\": 1, \"microseconds\": 2}, \"event\": \"STOP\"}\r\n\
//!                     {\"return\": {}, \"id\": 1}\r\n");
//! assert!(matches!(conn.poll_output(), Some(Output::Event(e)) if e.name == "STOP"));
//! assert!(matches!(conn.poll_output(), Some(Output::Response { id: got, result: Ok(_) }) if got == id));
//!
//! // The server goes away.
//! conn.handle_eof();
//! assert!(matches!(conn.poll_output(), Some(Output::Closed(_))));
//! assert_eq!(conn.poll_output(), None);
//! # Ok::<(), qmp_proto::SendError>(())
//! ```
//!
//! See [`Connection`] for the driving loop, and `examples/poll_loop.rs` for a complete client over
//! a plain `std` socket.

#![forbid(unsafe_code)]
#![warn(missing_docs, unreachable_pub)]
// Peer bytes and caller input must never panic the core; the fuzz targets check this too.
#![cfg_attr(
    not(test),
    deny(clippy::unwrap_used, clippy::expect_used, clippy::panic)
)]

mod agent;
mod command;
mod config;
mod connection;
mod error;
pub mod framing;
mod message;
mod pending;
mod scan;
mod transmit;
mod wire;

pub use agent::NO_SUCCESS_RESPONSE;
pub use command::{Command, RequestId};
pub use config::{
    Config, ConfigBuilder, ConfigError, MAX_DEPTH_LIMIT, QEMU_MAX_MESSAGE, QGA_MAX_MESSAGE,
};
pub use connection::{Connection, Output, State, Stats};
pub use error::{
    ArgumentsError, CloseReason, CommandError, Excerpt, Malformed, MalformedKind, ProtocolError,
    SendError,
};
pub use message::{Event, Greeting, QmpError, RawJson, Timestamp, Unmatched, Version};
pub use transmit::Transmit;

/// Internals for the fuzz targets (the `fuzzing` feature); not part of the API.
#[cfg(feature = "fuzzing")]
#[doc(hidden)]
pub mod fuzzing {
    /// Panics unless `serde_json` accepts every message the core's fast scanner accepts, with the
    /// same top-level members. Returns whether the scanner took `text` (else `serde_json` decides).
    pub fn check_members_scan(text: &str) -> bool {
        crate::scan::agrees(text)
    }
}
