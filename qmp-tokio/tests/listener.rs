//! A listener's socket file (found in review).

/// Dropping a listener removes its own socket file only: after the usual restart (remove the
/// stale path, bind a new listener there), dropping the old one leaves the new one's file alone.
/// It removed whatever was at the path before, and QEMU could no longer connect.
#[tokio::test(flavor = "current_thread")]
async fn dropping_an_old_listener_leaves_a_newer_listeners_socket() {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("qmp.sock");
    let old = qmp_tokio::Listener::bind(&path).await.expect("bind");
    std::fs::remove_file(&path).expect("remove the stale path");
    let new = qmp_tokio::Listener::bind(&path).await.expect("bind again");
    drop(old);
    assert!(path.exists(), "the new listener's socket file is gone");
    drop(new);
    assert!(!path.exists(), "a listener removes its own socket file");
}
