//! Limits and switches for a [`Connection`](crate::Connection), validated once when built.

/// Configuration of a [`Connection`](crate::Connection). Build one with [`Config::builder`];
/// [`Config::default`] is right for QEMU.
///
/// There are no timeouts here: the core has no clock. Give a command a deadline with
/// [`Command::deadline`](crate::Command::deadline) instead.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    pub(crate) max_message_size: usize,
    pub(crate) max_depth: usize,
    pub(crate) max_pending: usize,
    pub(crate) max_in_flight: usize,
    pub(crate) max_buffered_outputs: usize,
    pub(crate) max_command_size: usize,
    pub(crate) enable_oob: bool,
    pub(crate) negotiate: bool,
}

/// The largest `max_depth`: `serde_json` refuses deeper values, and a frame the splitter accepts
/// must never be refused by the parser for depth.
pub const MAX_DEPTH_LIMIT: usize = 127;

/// The largest reply a guest agent sends: `guest-file-read` of its 48 MiB maximum, base64-encoded
/// (64 MiB), plus the reply around it. The default `max_message_size` of
/// [`Config::guest_agent`].
pub const QGA_MAX_MESSAGE: usize = (64 << 20) + (1 << 20);

/// QEMU's own input limit per message (`MAX_TOKEN_SIZE` in `qobject/json-streamer.c`).
pub const QEMU_MAX_MESSAGE: usize = 64 << 20;

impl Default for Config {
    fn default() -> Self {
        Self {
            max_message_size: QEMU_MAX_MESSAGE,
            max_depth: 64,
            max_pending: 1024,
            max_in_flight: 8,
            max_buffered_outputs: 1024,
            max_command_size: QEMU_MAX_MESSAGE,
            enable_oob: false,
            negotiate: true,
        }
    }
}

impl Config {
    /// The defaults for a guest agent: as [`Config::default`], but messages up to
    /// [`QGA_MAX_MESSAGE`], room for the largest `guest-file-read` (48 MiB, base64-encoded).
    pub fn guest_agent() -> Self {
        Self {
            max_message_size: QGA_MAX_MESSAGE,
            ..Self::default()
        }
    }

    /// A builder starting from the defaults.
    ///
    /// ```
    /// let config = qmp_proto::Config::builder()
    ///     .max_message_size(256 << 20)
    ///     .enable_oob(false)
    ///     .build()
    ///     .unwrap();
    /// assert_eq!(config.max_message_size(), 256 << 20);
    /// ```
    pub fn builder() -> ConfigBuilder {
        ConfigBuilder(Self::default())
    }

    /// Largest incoming message, in bytes. See [`ConfigBuilder::max_message_size`].
    pub fn max_message_size(&self) -> usize {
        self.max_message_size
    }
    /// Deepest incoming nesting. See [`ConfigBuilder::max_depth`].
    pub fn max_depth(&self) -> usize {
        self.max_depth
    }
    /// Most requests queued or unanswered. See [`ConfigBuilder::max_pending`].
    pub fn max_pending(&self) -> usize {
        self.max_pending
    }
    /// Most in-band commands in flight while OOB is on. See [`ConfigBuilder::max_in_flight`].
    pub fn max_in_flight(&self) -> usize {
        self.max_in_flight
    }
    /// Most outputs held before reading pauses. See [`ConfigBuilder::max_buffered_outputs`].
    pub fn max_buffered_outputs(&self) -> usize {
        self.max_buffered_outputs
    }
    /// Largest outgoing command. See [`ConfigBuilder::max_command_size`].
    pub fn max_command_size(&self) -> usize {
        self.max_command_size
    }
    /// Whether OOB is requested. See [`ConfigBuilder::enable_oob`].
    pub fn enable_oob(&self) -> bool {
        self.enable_oob
    }
    /// Whether the core negotiates capabilities. See [`ConfigBuilder::negotiate`].
    pub fn negotiate(&self) -> bool {
        self.negotiate
    }
}

/// Builds a [`Config`]; every setter documents its default and why.
#[derive(Debug, Clone)]
#[must_use = "a builder does nothing until `build` is called"]
pub struct ConfigBuilder(Config);

impl ConfigBuilder {
    /// Largest incoming message in bytes (default 64 MiB, QEMU's own input limit). Memory is only
    /// spent when a message really is that big; guest-agent file reads reach ~48 MB. A larger
    /// message is skipped without being buffered and reported as
    /// [`MalformedKind::TooLarge`](crate::MalformedKind::TooLarge), or, when it may be the
    /// response to a pending request, fails that request with
    /// [`CommandError::ResponseTooLarge`](crate::CommandError::ResponseTooLarge) as soon as the
    /// limit is passed: the request its `id` names if that came first, else the oldest in-band
    /// request in flight (QEMU answers those in order) and any out-of-band ones. At least 64
    /// bytes, so fuzzing and tests can use tiny limits; a QEMU greeting needs about 150 (300 from a
    /// `pretty=on` monitor).
    pub fn max_message_size(mut self, bytes: usize) -> Self {
        self.0.max_message_size = bytes;
        self
    }

    /// Deepest nesting of an incoming message, counting the message object itself as 1 (default 64;
    /// `query-qmp-schema` needs 4). Deeper messages are skipped and reported as
    /// [`MalformedKind::TooDeep`](crate::MalformedKind::TooDeep) (or fail their request, as for
    /// size). 2 to [`MAX_DEPTH_LIMIT`]; a QEMU greeting needs 4.
    pub fn max_depth(mut self, depth: usize) -> Self {
        self.0.max_depth = depth;
        self
    }

    /// Most requests queued or awaiting a response at once, including abandoned ones whose late
    /// response has not arrived yet (default 1024). Past it, `send` fails with
    /// [`SendError::TooManyPending`](crate::SendError::TooManyPending). At least 1.
    pub fn max_pending(mut self, requests: usize) -> Self {
        self.0.max_pending = requests;
        self
    }

    /// Most in-band commands written and unanswered while OOB is enabled (default 8). QEMU queues
    /// at most 8 in-band commands and then stops reading its socket, which would leave an
    /// out-of-band command stuck behind them; holding the rest back keeps OOB commands able to
    /// overtake. Without OOB, QEMU runs one command at a time and reads the next only after
    /// answering, so no window is applied. At least 1.
    pub fn max_in_flight(mut self, commands: usize) -> Self {
        self.0.max_in_flight = commands;
        self
    }

    /// Most outputs (responses, events, reports) held before the connection stops processing
    /// input (default 1024). This is backpressure, not an error:
    /// [`wants_read`](crate::Connection::wants_read) turns false until
    /// [`poll_output`](crate::Connection::poll_output) drains some. The outputs of one message may
    /// exceed it (closing completes every pending request at once). At least 1.
    pub fn max_buffered_outputs(mut self, outputs: usize) -> Self {
        self.0.max_buffered_outputs = outputs;
        self
    }

    /// Largest outgoing command in bytes (default 64 MiB, QEMU's own limit: it answers a larger
    /// one with a cascade of id-less errors that match no request). At least 64.
    pub fn max_command_size(mut self, bytes: usize) -> Self {
        self.0.max_command_size = bytes;
        self
    }

    /// Negotiate out-of-band execution when the server offers it (default false). It lets
    /// [`Command::oob`](crate::Command::oob) commands overtake in-band ones, at a price: QEMU then
    /// queues at most 8 in-band commands, so the connection holds further ones back
    /// ([`max_in_flight`](Self::max_in_flight)) and pipelines less. Turn it on when you use OOB
    /// commands (`migrate-pause`, `migrate-recover`, ...).
    pub fn enable_oob(mut self, enable: bool) -> Self {
        self.0.enable_oob = enable;
        self
    }

    /// Send `qmp_capabilities` after the greeting (default true). When false the connection is
    /// ready as soon as the greeting arrives and the caller negotiates by sending
    /// `qmp_capabilities` itself; OOB is then enabled if that command asked for it and succeeded.
    pub fn negotiate(mut self, negotiate: bool) -> Self {
        self.0.negotiate = negotiate;
        self
    }

    /// Checks the values and returns the configuration.
    pub fn build(self) -> Result<Config, ConfigError> {
        let c = self.0;
        check("max_message_size", c.max_message_size, 64, usize::MAX)?;
        check("max_depth", c.max_depth, 2, MAX_DEPTH_LIMIT)?;
        check("max_pending", c.max_pending, 1, usize::MAX)?;
        check("max_in_flight", c.max_in_flight, 1, usize::MAX)?;
        check(
            "max_buffered_outputs",
            c.max_buffered_outputs,
            1,
            usize::MAX,
        )?;
        check("max_command_size", c.max_command_size, 64, usize::MAX)?;
        Ok(c)
    }
}

fn check(field: &'static str, value: usize, min: usize, max: usize) -> Result<(), ConfigError> {
    if (min..=max).contains(&value) {
        Ok(())
    } else {
        Err(ConfigError::OutOfRange {
            field,
            value,
            min,
            max,
        })
    }
}

/// A [`ConfigBuilder`] value out of range.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    /// `field` must lie in `min..=max`.
    #[error("{field} is {value}; it must be between {min} and {max}")]
    OutOfRange {
        /// The setting.
        field: &'static str,
        /// The value given.
        value: usize,
        /// Smallest allowed.
        min: usize,
        /// Largest allowed.
        max: usize,
    },
}
