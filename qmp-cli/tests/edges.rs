//! The `qmp` binary at its edges (found in review): a shell whose output pipe closes, a guest
//! agent that goes away under the shell, and `--json` objects that are not commands.

use std::io::Write as _;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use qmp_testkit::{QemuGa, Qsd};

fn qmp() -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_qmp"));
    cmd.env_remove("QMP_SOCKET")
        .env("NO_COLOR", "1")
        .env("QMP_HISTORY", "/dev/null");
    cmd
}

/// Starts `qmp ARGS` (the interactive shell) with every stream piped.
fn spawn_shell(args: &[&str]) -> Child {
    qmp()
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn qmp")
}

/// Waits for `child` (20 s at most; killed and a panic otherwise); returns its exit status and
/// what it wrote on stderr.
fn finish(mut child: Child) -> (ExitStatus, String) {
    let deadline = Instant::now() + Duration::from_secs(20);
    let status = loop {
        if let Some(status) = child.try_wait().expect("try_wait") {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("qmp did not exit within 20 s");
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    let mut err = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().expect("stderr"), &mut err)
        .expect("read stderr");
    (status, err)
}

/// `qmp -s SOCK < commands | head -n1`: once stdout is a closed pipe the shell ends as at end of
/// input (it panicked in `println!` before: exit 101 and a backtrace).
#[test]
fn shell_with_a_closed_stdout_ends_without_a_panic() {
    let qsd = Qsd::start();
    let mut child = spawn_shell(&["-s", qsd.socket().to_str().expect("utf-8")]);
    // The reader goes away at once, as `head` does after its first line.
    drop(child.stdout.take());
    let mut stdin = child.stdin.take().expect("stdin");
    for _ in 0..3 {
        let _ = stdin.write_all(b"query-version\n");
    }
    drop(stdin);
    let (status, err) = finish(child);
    assert!(
        !err.contains("panicked") && status.code() != Some(101),
        "status {status:?}, stderr:\n{err}"
    );
}

/// The shell ends with exit code 2 when the connection breaks, a guest agent's as a QMP
/// monitor's (with an agent it went on, failing every line, and exited 0).
#[test]
fn agent_shell_exits_2_when_the_connection_breaks() {
    let qga = QemuGa::start();
    let socket = qga.socket().to_str().expect("utf-8").to_owned();
    let mut child = spawn_shell(&["--agent", "-s", &socket]);
    let mut stdin = child.stdin.take().expect("stdin");
    stdin.write_all(b"guest-ping\n").expect("write");
    std::thread::sleep(Duration::from_millis(500));
    // The agent goes away (a guest rebooting, say).
    drop(qga);
    std::thread::sleep(Duration::from_millis(300));
    for _ in 0..3 {
        let _ = stdin.write_all(b"guest-ping\n");
    }
    drop(stdin);
    let (status, err) = finish(child);
    assert_eq!(status.code(), Some(2), "stderr:\n{err}");
}

/// A `--json` object that is not a command (no `execute`, arguments not an object) is a usage
/// error found before connecting (it connected first, then failed with 1, or 2 with no socket).
#[test]
fn json_that_is_not_a_command_is_a_usage_error() {
    let dir = tempfile::tempdir().expect("temp dir");
    let missing = dir.path().join("missing.qmp");
    for json in [
        r#"{"arguments": {}}"#,
        r#"{"execute": 5}"#,
        r#"{"execute": "x", "arguments": [1]}"#,
    ] {
        let out = qmp()
            .args(["-s", missing.to_str().expect("utf-8")])
            .args(["--json", json])
            .stdin(Stdio::null())
            .output()
            .expect("run qmp");
        assert_eq!(
            out.status.code(),
            Some(64),
            "{json}: stderr: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

/// End of input inside a `transaction(` block says its actions were not sent (they were dropped
/// silently before).
#[test]
fn end_of_input_inside_a_transaction_says_it_was_not_sent() {
    let qsd = Qsd::start();
    let mut child = spawn_shell(&["-s", qsd.socket().to_str().expect("utf-8")]);
    let mut stdin = child.stdin.take().expect("stdin");
    stdin
        .write_all(b"transaction(\nblock-dirty-bitmap-add node=n0 name=b0\n")
        .expect("write");
    drop(stdin);
    let (status, err) = finish(child);
    assert_eq!(status.code(), Some(0), "stderr:\n{err}");
    assert!(err.contains("were not sent"), "stderr:\n{err}");
}

/// Commands piped in, as a script runs them: no banner, only results on stdout, and the exit code
/// of the worst failure (a failed command 1, a line that does not parse 64).
#[test]
fn piped_commands_print_results_only_and_exit_with_the_worst_failure() {
    let qsd = Qsd::start();
    let socket = qsd.socket().to_str().expect("utf-8");
    for (input, code) in [
        ("query-version\nquery-version\n", 0),
        ("query-version\nnope\nquery-version\n", 1),
        ("nope\nquery-version foo\nquery-version\n", 64),
    ] {
        let mut child = spawn_shell(&["-s", socket]);
        let mut stdin = child.stdin.take().expect("stdin");
        stdin.write_all(input.as_bytes()).expect("commands");
        drop(stdin);
        let mut out = String::new();
        std::io::Read::read_to_string(&mut child.stdout.take().expect("stdout"), &mut out)
            .expect("read stdout");
        let (status, err) = finish(child);
        assert_eq!(status.code(), Some(code), "{input:?}: {err}");
        // One JSON result per successful command, nothing else.
        let ok = input.lines().filter(|l| *l == "query-version").count();
        assert_eq!(out.lines().count(), ok, "{input:?}: {out}");
        for line in out.lines() {
            let v: serde_json::Value = serde_json::from_str(line).expect("a JSON result");
            assert_eq!(v["qemu"]["major"], 10, "{line}");
        }
    }
}
