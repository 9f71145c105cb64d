//! What the guest agent (QGA) needs beyond QMP: sync ids, the resync message, and the commands
//! that never reply on success.

use std::time::{Duration, Instant};

/// Commands the guest agent never answers when they succeed (`'success-response': false` in
/// QEMU's `qga/qapi-schema.json`): the guest is going down. On a guest-agent connection they are
/// sent as [`Command::no_reply`](crate::Command::no_reply) automatically.
pub const NO_SUCCESS_RESPONSE: &[&str] = &[
    "guest-shutdown",
    "guest-suspend-disk",
    "guest-suspend-ram",
    "guest-suspend-hybrid",
];

/// The byte that resets the agent's JSON parser (it is never valid in JSON text). The agent
/// answers `guest-sync-delimited` with the same byte before its reply.
pub(crate) const SENTINEL: u8 = 0xFF;

/// How long a resync may go unanswered before a command expiring behind it restarts it; doubled
/// at each restart up to [`MAX_RETRY`], reset once a resync completes.
const FIRST_RETRY: Duration = Duration::from_secs(1);
const MAX_RETRY: Duration = Duration::from_secs(64);

/// Guest-agent state of a [`Connection`](crate::Connection).
pub(crate) struct Agent {
    ids: SyncIds,
    /// The id of the resync under way: until its reply arrives, everything else is discarded.
    pub(crate) syncing: Option<i64>,
    /// When the resync under way started, as far as the caller's clock has told us (the core
    /// has none of its own: the first `handle_timeout` after it started stands in).
    pub(crate) sync_since: Option<Instant>,
    retry_after: Duration,
}

impl Agent {
    pub(crate) fn new(seed: u64) -> Self {
        Self {
            ids: SyncIds(seed),
            syncing: None,
            sync_since: None,
            retry_after: FIRST_RETRY,
        }
    }

    /// Whether the resync under way has waited long enough at `now` to be started over; if so,
    /// the next restart waits twice as long.
    pub(crate) fn retry_due(&mut self, now: Instant) -> bool {
        let Some(since) = self.sync_since else {
            self.sync_since = Some(now);
            return false;
        };
        if now.saturating_duration_since(since) < self.retry_after {
            return false;
        }
        self.retry_after = (self.retry_after * 2).min(MAX_RETRY);
        true
    }

    /// The resync under way was answered.
    pub(crate) fn synced(&mut self) {
        self.syncing = None;
        self.sync_since = None;
        self.retry_after = FIRST_RETRY;
    }

    /// Starts a new resync: returns the bytes to send. A resync under way is superseded, so a
    /// reply to it is discarded like any other stale message.
    pub(crate) fn start_sync(&mut self, out: &mut Vec<u8>) {
        let id = self.ids.next();
        self.syncing = Some(id);
        self.sync_since = None;
        out.push(SENTINEL);
        out.extend_from_slice(b"{\"execute\":\"guest-sync-delimited\",\"arguments\":{\"id\":");
        out.extend_from_slice(id.to_string().as_bytes());
        out.extend_from_slice(b"}}\n");
    }

    /// Whether `ret` (a `return` member) answers the resync under way.
    pub(crate) fn is_sync_reply(&self, ret: &str) -> bool {
        self.syncing.is_some_and(|id| ret.parse::<i64>() == Ok(id))
    }
}

/// Sync ids: splitmix64 over a caller-chosen seed. Distinct for 2^64 draws (splitmix64 is a
/// bijection of its counter), unpredictable across connections when the seed is random, and
/// non-negative because qemu-ga refuses ids beyond `i64`.
struct SyncIds(u64);

impl SyncIds {
    fn next(&mut self) -> i64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^= z >> 31;
        // The top bit dropped: fits i64, still distinct across ~2^63 draws in practice.
        i64::try_from(z >> 1).unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sync_ids_are_distinct_and_non_negative() {
        let mut ids = SyncIds(42);
        let drawn: std::collections::BTreeSet<i64> = (0..10_000).map(|_| ids.next()).collect();
        assert_eq!(drawn.len(), 10_000);
        assert!(drawn.iter().all(|&id| id >= 0));
    }

    #[test]
    fn resync_bytes_and_matching() {
        let mut agent = Agent::new(7);
        let mut out = Vec::new();
        agent.start_sync(&mut out);
        let id = agent.syncing.unwrap();
        let expected = format!(
            "\u{FFFD}{{\"execute\":\"guest-sync-delimited\",\"arguments\":{{\"id\":{id}}}}}\n"
        );
        assert_eq!(out[0], SENTINEL);
        assert_eq!(String::from_utf8_lossy(&out), expected);
        assert!(agent.is_sync_reply(&id.to_string()));
        assert!(!agent.is_sync_reply(&(id ^ 1).to_string()));
        assert!(!agent.is_sync_reply("\"x\""));
    }
}
