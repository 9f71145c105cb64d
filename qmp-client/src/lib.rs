//! The runtime-neutral QMP client behind `qmp-tokio` and `qmp-async-std`.
//!
//! [`Client`] is the handle users hold: execute commands (by name with `serde` arguments, typed,
//! out of band, raw, with file descriptors), subscribe to events with filters, introspect, close.
//! Behind it one driver task per connection owns the socket and the IO-free
//! [`qmp_proto::Connection`]; it is written against two small traits, [`Transport`] and
//! [`Timer`], plus a [`Runtime`] hook for spawning and sleeping, which each adapter implements for
//! its runtime. Users normally depend on an adapter, which re-exports everything here.
//!
//! [`GuestAgent`] is the same machinery for the QEMU guest agent (`qemu-ga`): resyncs, one command
//! at a time, commands that never reply on success.
//!
//! Unix only (QMP lives on unix sockets, and file-descriptor passing needs them).

#![forbid(unsafe_code)]
#![warn(missing_docs, unreachable_pub)]

mod agent;
mod calls;
mod client;
mod driver;
mod error;
mod events;
mod unix;

pub use agent::{GuestAgent, NoReply};
pub use client::{AddFdInfo, BoxFuture, Client, Options, Runtime, State};
pub use driver::{Timer, Transport};
pub use error::{Disconnect, Error};
pub use events::{EventFilter, EventItem, Lagged, Subscription};
pub use qmp_proto::{
    self, ArgumentsError, Command, CommandError, Config, Event, Greeting, NO_SUCCESS_RESPONSE,
    ProtocolError, QmpError, RawJson, SendError, Timestamp, Version,
};
pub use unix::{
    Address, CONNECT_RETRY, Dial, Lookup, MAX_FDS, SocketFile, lookup, no_address, send_with_fds,
    try_connect_unix,
};
