//! Set-up shared by the blocking tests that run real block jobs.

use qmp_blocking::Client;
use serde_json::json;

/// Adds two `null-co` nodes, `src` and `tgt`, and starts job `j` copying one to the other with
/// `command` (`blockdev-backup`, `blockdev-mirror`): real events, no disk space.
pub(crate) fn start_null_job(client: &Client, command: &str) {
    for node in ["src", "tgt"] {
        client
            .execute(
                "blockdev-add",
                json!({"driver": "null-co", "node-name": node, "size": 1 << 20}),
            )
            .unwrap();
    }
    client
        .execute(
            command,
            json!({"job-id": "j", "device": "src", "target": "tgt", "sync": "full"}),
        )
        .unwrap();
}
