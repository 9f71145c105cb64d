//! The interactive shell, driven through a pseudo-terminal against a real qemu-storage-daemon.

use std::process::Command;

use qmp_testkit::Qsd;

#[test]
fn interactive_session() {
    // Two monitors: the shell's, and one to cause events while the shell is idle.
    let qsd = Qsd::start_monitors(2);
    let mut sockets = qsd.sockets();
    let shell_sock = sockets.next().expect("first monitor").to_owned();
    let other_sock = sockets.next().expect("second monitor").to_owned();
    let dir = tempfile::tempdir().expect("temp dir");
    let history = dir.path().join("history");

    let mut cmd = Command::new(env!("CARGO_BIN_EXE_qmp"));
    cmd.arg("-s")
        .arg(&shell_sock)
        .env_remove("QMP_SOCKET")
        .env("QMP_HISTORY", &history)
        .env("NO_COLOR", "1")
        .env("TERM", "xterm");
    let mut p = rexpect::session::spawn_command(cmd, Some(15_000)).expect("spawn in a pty");
    p.exp_string("Connected to QEMU").expect("banner");
    p.exp_string("(QEMU) ").expect("prompt");

    // key=value command, pretty-printed on a terminal.
    p.send_line("blockdev-add driver=null-co node-name=n1 size=1024")
        .expect("send");
    p.exp_string("{}").expect("blockdev-add result");
    p.exp_string("(QEMU) ").expect("prompt");

    // Tab completes the command name, then an argument name.
    p.send("query-named-block-no\t").expect("send");
    p.flush().expect("flush");
    p.exp_string("query-named-block-nodes ")
        .expect("command name completed");
    p.send("fl\t").expect("send");
    p.flush().expect("flush");
    p.exp_string("flat=").expect("argument name completed");
    p.send("false\r").expect("send");
    p.flush().expect("flush");
    p.exp_string("\"node-name\": \"n1\"")
        .expect("completed command ran");
    p.exp_string("(QEMU) ").expect("prompt");

    // A QMP error is printed and the shell goes on.
    p.send_line("no-such-command").expect("send");
    p.exp_string("CommandNotFound: ").expect("error class");
    p.exp_string("(QEMU) ").expect("prompt");

    // HMP is refused clearly: qemu-storage-daemon has no human-monitor-command.
    p.send_line("hmp info block").expect("send");
    p.exp_string("no human-monitor-command")
        .expect("hmp message");
    p.exp_string("(QEMU) ").expect("prompt");

    // A transaction block.
    p.send_line("transaction(").expect("send");
    p.exp_string("(QEMU transaction) ")
        .expect("transaction prompt");
    p.send_line("block-dirty-bitmap-add node=n1 name=bm0")
        .expect("send");
    p.exp_string("(QEMU transaction) ")
        .expect("transaction prompt");
    p.send_line("block-dirty-bitmap-add node=n1 name=bm1")
        .expect("send");
    p.exp_string("(QEMU transaction) ")
        .expect("transaction prompt");
    p.send_line(")").expect("send");
    p.exp_string("{}").expect("transaction result");
    p.exp_string("(QEMU) ").expect("prompt");
    p.send_line(r#"{"execute": "query-named-block-nodes", "arguments": {"flat": true}}"#)
        .expect("send");
    p.exp_string("\"name\": \"bm1\"")
        .expect("bitmaps from the transaction");
    p.exp_string("(QEMU) ").expect("prompt");

    // Events caused on the other monitor are printed while the shell is idle.
    let other = other_sock.to_str().expect("utf-8");
    for node in ["src", "tgt"] {
        let out = Command::new(env!("CARGO_BIN_EXE_qmp"))
            .args([
                "-s",
                other,
                "blockdev-add",
                "driver=null-co",
                &format!("node-name={node}"),
            ])
            .env_remove("QMP_SOCKET")
            .output()
            .expect("run qmp");
        assert!(out.status.success(), "{out:?}");
    }
    let out = Command::new(env!("CARGO_BIN_EXE_qmp"))
        .args([
            "-s",
            other,
            "blockdev-mirror",
            "job-id=job0",
            "device=src",
            "target=tgt",
        ])
        .args(["sync=full"])
        .env_remove("QMP_SOCKET")
        .output()
        .expect("run qmp");
    assert!(out.status.success(), "{out:?}");
    p.exp_string("JOB_STATUS_CHANGE {\"id\":\"job0\"")
        .expect("an event while idle");
    p.exp_string("BLOCK_JOB_READY {\"device\":\"job0\"")
        .expect("ready event while idle");

    // Ctrl-D quits and saves the history.
    p.send_control('d').expect("send ^D");
    p.exp_eof().expect("exit");
    let saved = std::fs::read_to_string(&history).expect("history file");
    assert!(
        saved.contains("blockdev-add driver=null-co node-name=n1 size=1024"),
        "{saved}"
    );
    assert!(saved.contains("transaction("), "{saved}");
}
