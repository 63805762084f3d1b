//! What the mailbox examples share.
use std::path::PathBuf;

use fabric::daemon::{Config, Daemon};

/// A daemon of its own, its control socket in a fresh temporary directory;
/// keep all three alive while its mailboxes are in use.
pub fn temp_daemon() -> (tempfile::TempDir, Daemon, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let d = Daemon::start(Config {
        socket_path: dir.path().join("s"),
        ..Config::default()
    })
    .unwrap();
    let path = d.socket_path().to_path_buf();
    (dir, d, path)
}
