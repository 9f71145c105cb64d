//! The `qmp` binary against real qemu-storage-daemon (and qemu-ga) peers. A missing daemon fails
//! these tests loudly (`qmp_testkit::require` panics).

use std::io::{BufRead as _, BufReader};
use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use qmp_testkit::{QemuGa, Qsd};
use serde_json::{Value, json};

fn qmp() -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_qmp"));
    cmd.env_remove("QMP_SOCKET")
        .env("NO_COLOR", "1")
        .stdin(Stdio::null());
    cmd
}

fn run(args: &[&str]) -> Output {
    qmp().args(args).output().expect("run qmp")
}

fn stdout_json(out: &Output) -> Value {
    let text = String::from_utf8_lossy(&out.stdout);
    serde_json::from_str(text.trim()).unwrap_or_else(|e| panic!("stdout {text:?} is not JSON: {e}"))
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[track_caller]
fn assert_code(out: &Output, code: i32) {
    assert_eq!(
        out.status.code(),
        Some(code),
        "stdout: {}\nstderr: {}",
        String::from_utf8_lossy(&out.stdout),
        stderr(out)
    );
}

/// A qemu-storage-daemon with several monitors (one client each), for event tests.
struct MultiQsd(Qsd);

impl MultiQsd {
    fn start(monitors: usize) -> Self {
        Self(Qsd::start_monitors(monitors))
    }

    fn socket(&self, i: usize) -> &str {
        let path = self.0.sockets().nth(i).expect("that many monitors");
        path.to_str().expect("utf-8 path")
    }

    fn kill(&mut self) {
        self.0.kill();
    }
}

/// Starts `qmp -v ARGS` (an events or wait command) and returns once it has subscribed.
fn spawn_subscribed(args: &[&str]) -> (Child, BufReader<std::process::ChildStderr>) {
    let mut child = qmp()
        .arg("-v")
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn qmp");
    let mut err = BufReader::new(child.stderr.take().expect("stderr"));
    let mut line = String::new();
    loop {
        line.clear();
        let n = err.read_line(&mut line).expect("read stderr");
        assert!(n > 0, "qmp {args:?} ended before subscribing");
        if line.contains("subscribed to events") {
            break;
        }
    }
    (child, err)
}

/// Waits for `child` to exit (within `timeout`), returning its exit code and stdout.
fn finish(mut child: Child, timeout: Duration) -> (Option<i32>, String) {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(status) = child.try_wait().expect("try_wait") {
            let mut out = String::new();
            std::io::Read::read_to_string(&mut child.stdout.take().expect("stdout"), &mut out)
                .expect("read stdout");
            return (status.code(), out);
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("qmp did not exit within {timeout:?}");
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn sock(qsd: &Qsd) -> &str {
    qsd.socket().to_str().expect("utf-8 path")
}

#[test]
fn one_shot_query_version() {
    let qsd = Qsd::start();
    let out = run(&["-s", sock(&qsd), "query-version"]);
    assert_code(&out, 0);
    let v = stdout_json(&out);
    assert!(v["qemu"]["major"].as_u64().is_some(), "{v}");
    // Piped stdout: compact, one line, no colour.
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(text.lines().count(), 1, "{text:?}");
    assert!(!text.contains('\x1b'));
}

#[test]
fn socket_from_environment() {
    let qsd = Qsd::start();
    let out = qmp()
        .env("QMP_SOCKET", qsd.socket())
        .arg("query-block-jobs")
        .output()
        .expect("run qmp");
    assert_code(&out, 0);
    assert_eq!(stdout_json(&out), json!([]));
}

#[test]
fn unknown_command_is_exit_1_with_class() {
    let qsd = Qsd::start();
    let out = run(&["-s", sock(&qsd), "no-such-command"]);
    assert_code(&out, 1);
    assert!(out.stdout.is_empty());
    assert!(
        stderr(&out).starts_with("CommandNotFound: "),
        "{}",
        stderr(&out)
    );
}

#[test]
fn missing_socket_is_exit_2() {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("nothing.sock");
    let out = run(&["-s", path.to_str().expect("utf-8"), "query-version"]);
    assert_code(&out, 2);
    assert!(stderr(&out).contains("cannot connect"), "{}", stderr(&out));
}

/// A path that is not a QMP socket says what it is instead of "Connection refused": a regular
/// file, a directory, a socket file nobody listens on (QEMU gone). Exit code 2 all the same.
#[test]
fn a_path_that_is_not_a_listening_socket_says_what_it_is() {
    let dir = tempfile::tempdir().expect("temp dir");
    let file = dir.path().join("vm1.img");
    std::fs::write(&file, b"not a socket").expect("a file");
    let stale = dir.path().join("stale.qmp");
    drop(std::os::unix::net::UnixListener::bind(&stale).expect("bind"));
    for (path, says) in [
        (file.as_path(), "is not a socket: it is a regular file"),
        (dir.path(), "is not a socket: it is a directory"),
        (stale.as_path(), "nothing is listening on"),
    ] {
        let out = run(&["-s", path.to_str().expect("utf-8"), "query-version"]);
        assert_code(&out, 2);
        let err = stderr(&out);
        assert!(
            err.contains(says) && err.contains(path.to_str().expect("utf-8")),
            "{err}"
        );
        assert!(!err.contains("Connection refused"), "{err}");
    }
}

/// A socket whose server is not a QMP monitor: `qmp` prints what it sent at once, not after the
/// connect timeout (30 s here), and exits 2.
#[test]
fn a_socket_that_is_not_qmp_says_what_it_sent_at_once() {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("ssh.sock");
    let listener = std::os::unix::net::UnixListener::bind(&path).expect("bind");
    let server = std::thread::spawn(move || {
        let (mut c, _) = listener.accept().expect("accept");
        std::io::Write::write_all(&mut c, b"SSH-2.0-OpenSSH_9.2p1 Debian-2\r\n").expect("banner");
        // Waits for the client to leave, as an SSH server waits for the client's banner.
        let _ = std::io::Read::read(&mut c, &mut [0; 64]);
    });
    let started = Instant::now();
    let out = run(&[
        "--timeout",
        "30",
        "-s",
        path.to_str().expect("utf-8"),
        "query-version",
    ]);
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );
    assert_code(&out, 2);
    let err = stderr(&out);
    assert!(
        err.contains("expected a QMP greeting, got `SSH-2.0-OpenSSH_9.2p1 Debian-2`"),
        "{err}"
    );
    server.join().expect("server");
}

/// An option after the command says that options go first, before connecting.
#[test]
fn an_option_after_the_command_says_options_go_first() {
    let out = run(&["query-version", "-s", "/nonexistent.qmp"]);
    assert_code(&out, 64);
    let err = stderr(&out);
    assert!(
        err.contains("got \"-s\": options go before the command"),
        "{err}"
    );
}

/// QEMU killed under `qmp wait` is reported as the server closing the connection.
#[test]
fn wait_says_the_server_closed_when_qemu_is_killed() {
    let mut qsd = Qsd::start();
    let (child, mut err) = spawn_subscribed(&["-s", sock(&qsd), "wait", "NEVER_SENT"]);
    qsd.kill();
    let (code, _) = finish(child, Duration::from_secs(30));
    assert_eq!(code, Some(2));
    let mut rest = String::new();
    std::io::Read::read_to_string(&mut err, &mut rest).expect("read stderr");
    assert!(
        rest.contains(
            "the connection closed before NEVER_SENT arrived: the server closed the connection"
        ),
        "{rest}"
    );
}

#[test]
fn wait_for_server_connects_to_a_qemu_started_after_it() {
    let dir = tempfile::tempdir().expect("temp dir");
    let socket = dir.path().join("late.qmp");
    let path = socket.to_str().expect("utf-8 path").to_owned();
    let child = qmp()
        .args(["--wait-for-server", "-s", &path, "query-version"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run qmp");
    std::thread::sleep(Duration::from_millis(300));
    let _qsd = Qsd::listen_at(&socket);
    let out = child.wait_with_output().expect("qmp exits");
    assert_code(&out, 0);
    assert_eq!(stdout_json(&out)["qemu"]["major"], json!(10));
}

#[test]
fn silent_server_is_exit_3() {
    // A socket that accepts (backlog) but never greets: the connect deadline passes.
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("silent.sock");
    let _listener = std::os::unix::net::UnixListener::bind(&path).expect("bind");
    let started = Instant::now();
    let out = run(&[
        "-s",
        path.to_str().expect("utf-8"),
        "--timeout",
        "0.5",
        "query-version",
    ]);
    assert_code(&out, 3);
    assert!(started.elapsed() < Duration::from_secs(5));
}

#[test]
fn usage_errors_are_exit_64() {
    let qsd = Qsd::start();
    assert_code(&run(&["-s", sock(&qsd), "blockdev-add", "novalue"]), 64);
    assert_code(&run(&["-s", sock(&qsd), "--json", "{nope"]), 64);
    assert_code(&run(&["-s", sock(&qsd), "--json", "[1]"]), 64);
    assert_code(&run(&["query-version"]), 64);
    assert_code(&run(&["--bogus-flag"]), 64);
    assert_code(&run(&["--help"]), 0);
}

#[test]
fn key_value_blockdev_add_then_query() {
    let qsd = Qsd::start();
    let s = sock(&qsd);
    let out = run(&[
        "-s",
        s,
        "blockdev-add",
        "driver=null-co",
        "node-name=n0",
        "size=1048576",
        "read-only=true",
    ]);
    assert_code(&out, 0);
    assert_eq!(stdout_json(&out), json!({}));
    let out = run(&["-s", s, "query-named-block-nodes"]);
    assert_code(&out, 0);
    let nodes = stdout_json(&out);
    let node = nodes
        .as_array()
        .expect("a list")
        .iter()
        .find(|n| n["node-name"] == "n0")
        .unwrap_or_else(|| panic!("n0 not in {nodes}"));
    assert_eq!(node["drv"], "null-co");
    assert_eq!(node["ro"], true);
    assert_eq!(node["image"]["virtual-size"], 1048576);
    // A wrongly typed value is QEMU's error, exit 1.
    let out = run(&[
        "-s",
        s,
        "blockdev-add",
        "driver=null-co",
        "node-name=n1",
        "size=big",
    ]);
    assert_code(&out, 1);
    assert!(
        stderr(&out).starts_with("GenericError: "),
        "{}",
        stderr(&out)
    );
}

#[test]
fn raw_json_command() {
    let qsd = Qsd::start();
    let s = sock(&qsd);
    let cmd =
        r#"{"execute": "blockdev-add", "arguments": {"driver": "null-co", "node-name": "j0"}}"#;
    let out = run(&["-s", s, "--json", cmd]);
    assert_code(&out, 0);
    assert_eq!(stdout_json(&out), json!({}));
    let out = run(&["-s", s, "--json", r#"{"execute": "query-block-jobs"}"#]);
    assert_code(&out, 0);
    assert_eq!(stdout_json(&out), json!([]));
}

#[test]
fn verbose_and_log() {
    let qsd = Qsd::start();
    let dir = tempfile::tempdir().expect("temp dir");
    let log = dir.path().join("qmp.log");
    let log_s = log.to_str().expect("utf-8");
    let out = run(&["-s", sock(&qsd), "-v", "--log", log_s, "query-version"]);
    assert_code(&out, 0);
    let err = stderr(&out);
    assert!(err.contains(r#"-> {"execute":"query-version"}"#), "{err}");
    assert!(err.contains(r#"<- {"return":{"#), "{err}");
    let out = run(&["-s", sock(&qsd), "--log", log_s, "nope"]);
    assert_code(&out, 1);
    let text = std::fs::read_to_string(&log).expect("log");
    let lines: Vec<Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).expect("a JSON line"))
        .collect();
    assert_eq!(lines.len(), 2, "{text}");
    assert_eq!(lines[0]["command"], json!({"execute": "query-version"}));
    assert!(lines[0]["response"]["return"]["qemu"]["major"].is_u64());
    assert!(lines[0]["time"].as_f64().is_some_and(|t| t > 1e9));
    assert_eq!(lines[1]["response"]["error"]["class"], "CommandNotFound");
}

#[test]
fn no_negotiate_leaves_capabilities_mode() {
    let qsd = Qsd::start();
    // Still in capabilities negotiation mode: QEMU refuses other commands.
    let out = run(&["-s", sock(&qsd), "--no-negotiate", "query-status"]);
    assert_code(&out, 1);
    assert!(
        stderr(&out).starts_with("CommandNotFound: "),
        "{}",
        stderr(&out)
    );
    let out = run(&["-s", sock(&qsd), "--no-negotiate", "qmp_capabilities"]);
    assert_code(&out, 0);
}

#[test]
fn spawn_qsd_runs_and_cleans_up() {
    let out = run(&["--spawn-qsd", "-v", "query-version"]);
    assert_code(&out, 0);
    assert!(stdout_json(&out)["qemu"]["major"].is_u64());
    let err = stderr(&out);
    let socket = err
        .lines()
        .find_map(|l| l.strip_prefix("qmp: started qemu-storage-daemon on "))
        .unwrap_or_else(|| panic!("no socket reported: {err}"));
    assert!(!Path::new(socket).exists(), "{socket} left behind");
}

#[test]
fn listen_accepts_qemu() {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("listen.sock");
    let child = qmp()
        .args(["--listen", path.to_str().expect("utf-8"), "query-version"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn qmp");
    let deadline = Instant::now() + Duration::from_secs(10);
    while !path.exists() {
        assert!(Instant::now() < deadline, "qmp did not bind");
        std::thread::sleep(Duration::from_millis(5));
    }
    let _qsd = Qsd::connect_to(&path);
    let (code, out) = finish(child, Duration::from_secs(20));
    assert_eq!(code, Some(0), "{out}");
    let v: Value = serde_json::from_str(out.trim()).expect("JSON");
    assert!(v["qemu"]["major"].is_u64());
}

#[test]
fn guest_agent() {
    let ga = QemuGa::start();
    let s = ga.socket().to_str().expect("utf-8");
    let out = run(&["--agent", "-s", s, "guest-info"]);
    assert_code(&out, 0);
    assert!(stdout_json(&out)["version"].is_string());
    let out = run(&["--agent", "-s", s, "guest-nope"]);
    assert_code(&out, 1);
    assert!(
        stderr(&out).starts_with("CommandNotFound: "),
        "{}",
        stderr(&out)
    );
    assert_code(&run(&["--agent", "-s", s, "events", "--follow"]), 64);
}

#[test]
fn events_follow_and_wait_on_a_mirror_job() {
    // Monitor 0 runs commands, 1 streams events, 2 and 3 wait.
    let mut qsd = MultiQsd::start(4);
    let (events, _events_err) = spawn_subscribed(&["-s", qsd.socket(1), "events", "--follow"]);
    let (ready, _) = spawn_subscribed(&[
        "-s",
        qsd.socket(2),
        "wait",
        "BLOCK_JOB_READY",
        "--match",
        "device=job0",
        "--timeout",
        "30",
    ]);
    let (never, _) = spawn_subscribed(&[
        "-s",
        qsd.socket(3),
        "wait",
        "BLOCK_JOB_READY",
        "--match",
        "device=other",
        "--timeout",
        "1",
    ]);
    let cmd = qsd.socket(0).to_string();
    for node in ["src", "tgt"] {
        let arg = format!(
            r#"{{"execute":"blockdev-add","arguments":{{"driver":"null-co","node-name":"{node}","size":67108864}}}}"#
        );
        assert_code(&run(&["-s", &cmd, "--json", &arg]), 0);
    }
    assert_code(
        &run(&[
            "-s",
            &cmd,
            "blockdev-mirror",
            "job-id=job0",
            "device=src",
            "target=tgt",
            "sync=full",
        ]),
        0,
    );
    let (code, out) = finish(ready, Duration::from_secs(30));
    assert_eq!(code, Some(0), "{out}");
    let event: Value = serde_json::from_str(out.trim()).expect("one JSON line");
    assert_eq!(event["event"], "BLOCK_JOB_READY");
    assert_eq!(event["data"]["device"], "job0");

    let (code, out) = finish(never, Duration::from_secs(10));
    assert_eq!(code, Some(3), "a non-matching wait times out: {out}");
    assert!(out.is_empty());

    // Monitor 2 is free again: wait for the completion while completing.
    let (completed, _) = spawn_subscribed(&[
        "-s",
        qsd.socket(2),
        "wait",
        "BLOCK_JOB_COMPLETED",
        "--timeout",
        "30",
    ]);
    assert_code(&run(&["-s", &cmd, "job-complete", "id=job0"]), 0);
    let (code, out) = finish(completed, Duration::from_secs(30));
    assert_eq!(code, Some(0), "{out}");
    assert!(out.contains(r#""event":"BLOCK_JOB_COMPLETED""#), "{out}");

    // The daemon goes away: `events --follow` ends cleanly with everything it saw.
    std::thread::sleep(Duration::from_millis(200));
    qsd.kill();
    let (code, out) = finish(events, Duration::from_secs(10));
    assert_eq!(code, Some(0), "{out}");
    let lines: Vec<Value> = out
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{l:?}: {e}")))
        .collect();
    let names: Vec<&str> = lines.iter().filter_map(|e| e["event"].as_str()).collect();
    for l in &lines {
        assert!(l["timestamp"]["seconds"].is_i64(), "{l}");
        assert!(l.get("data").is_some(), "{l}");
    }
    let status = |s: &str| {
        lines.iter().any(|e| {
            e["event"] == "JOB_STATUS_CHANGE" && e["data"] == json!({"id": "job0", "status": s})
        })
    };
    assert!(
        status("running") && status("ready") && status("concluded"),
        "{names:?}"
    );
    let ready_at = names.iter().position(|n| *n == "BLOCK_JOB_READY");
    let done_at = names.iter().position(|n| *n == "BLOCK_JOB_COMPLETED");
    assert!(ready_at.is_some() && done_at > ready_at, "{names:?}");
}

#[test]
fn events_count_filters_by_name() {
    let qsd = MultiQsd::start(2);
    let (events, _) = spawn_subscribed(&[
        "-s",
        qsd.socket(1),
        "events",
        "--count",
        "1",
        "--name",
        "BLOCK_JOB_READY",
    ]);
    let cmd = qsd.socket(0);
    for node in ["a", "b"] {
        assert_code(
            &run(&[
                "-s",
                cmd,
                "blockdev-add",
                "driver=null-co",
                &format!("node-name={node}"),
            ]),
            0,
        );
    }
    assert_code(
        &run(&[
            "-s",
            cmd,
            "blockdev-mirror",
            "job-id=j",
            "device=a",
            "target=b",
            "sync=full",
        ]),
        0,
    );
    let (code, out) = finish(events, Duration::from_secs(30));
    assert_eq!(code, Some(0), "{out}");
    assert_eq!(out.lines().count(), 1, "{out}");
    assert!(
        out.starts_with(r#"{"data":{"#) || out.contains(r#""event":"BLOCK_JOB_READY""#),
        "{out}"
    );
    assert!(!out.contains("JOB_STATUS_CHANGE"), "{out}");
}
