//! Streams of numbered messages from `nefele-demo stream` processes (a
//! mailbox of the test's own process would get an in-process ring), and
//! what a receiver makes of them.
#![allow(dead_code)]

use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use nefele::{Mailbox, Node, PortId};

const DEMO: &str = env!("CARGO_BIN_EXE_nefele-demo");

/// Runs `nefele-demo stream` to `to` to the end: `count` messages of
/// `size` bytes numbered from 0, sent one after the other.
pub fn stream(node: &Node, to: &str, count: u64, size: u64) {
    stream_early(node, to, count, size, true);
}

/// [`stream`] with its first message on the eBPF path (`early`) or not.
pub fn stream_early(node: &Node, to: &str, count: u64, size: u64, early: bool) {
    let out = run_stream(node.socket_path(), None, to, count, size, early);
    assert!(
        out.status.success(),
        "nefele-demo stream failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Runs `nefele-demo stream` against the fabricd at `socket` (as `uid`,
/// if given) and returns how it ended.
pub fn run_stream(
    socket: &Path,
    uid: Option<u32>,
    to: &str,
    count: u64,
    size: u64,
    early: bool,
) -> Output {
    let mut cmd = Command::new(DEMO);
    cmd.args(["stream", "--to", to, "--count"])
        .arg(count.to_string())
        .arg("--size")
        .arg(size.to_string())
        .env(fabric::daemon::SOCKET_ENV, socket)
        .env("NEFELE_EARLY_EBPF", if early { "1" } else { "0" })
        .stdin(Stdio::null());
    if let Some(uid) = uid {
        cmd.uid(uid).gid(uid);
    }
    cmd.output().expect("run nefele-demo stream")
}

/// Starts `nefele-demo count` (as `uid`, if given) against the fabricd at
/// `socket`: it binds `bind`, says "ready", and expects `count` numbered
/// 8-byte messages in order within `timeout_ms`. Killed if the test fails.
pub fn spawn_count(
    socket: &Path,
    uid: Option<u32>,
    bind: &str,
    count: u64,
    timeout_ms: u64,
) -> Counter {
    use std::io::BufRead;
    let mut cmd = Command::new(DEMO);
    cmd.args(["count", "--bind", bind, "--count"])
        .arg(count.to_string())
        .arg("--timeout-ms")
        .arg(timeout_ms.to_string())
        .env(fabric::daemon::SOCKET_ENV, socket)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    if let Some(uid) = uid {
        cmd.uid(uid).gid(uid);
    }
    let mut child = Counter(Some(cmd.spawn().expect("run nefele-demo count")));
    let stdout = child
        .0
        .as_mut()
        .and_then(|c| c.stdout.as_mut())
        .expect("stdout");
    let mut line = String::new();
    std::io::BufReader::new(stdout)
        .read_line(&mut line)
        .expect("read");
    assert_eq!(line.trim(), "ready", "nefele-demo count did not start");
    child
}

/// A running `nefele-demo count`, killed on drop unless waited for.
pub struct Counter(Option<std::process::Child>);

impl Counter {
    /// Waits for it to end and checks that it got all `count` messages,
    /// in order, none twice.
    pub fn expect_all_in_order(mut self, count: u64) {
        let child = self.0.take().expect("running");
        let out = child.wait_with_output().expect("wait");
        let said = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "nefele-demo count: {said}");
        let told = String::from_utf8_lossy(&out.stdout);
        assert_eq!(told.trim(), format!("all {count} in order"));
    }
}

impl Drop for Counter {
    fn drop(&mut self) {
        if let Some(mut c) = self.0.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Receives `total` messages and returns each one's sender and number.
pub fn receive(rx: &mut Mailbox, total: usize) -> Vec<(PortId, u64)> {
    (0..total)
        .map(|i| {
            let m = rx
                .recv_timeout(Duration::from_secs(10))
                .expect("recv")
                .unwrap_or_else(|| panic!("message {i} of {total} never came"));
            let n = u64::from_le_bytes(m.data[..8].try_into().expect("numbered"));
            (m.from, n)
        })
        .collect()
}

/// Each sender's numbers, in the order they arrived.
pub fn per_sender(got: &[(PortId, u64)]) -> Vec<Vec<u64>> {
    let mut senders: Vec<PortId> = got.iter().map(|g| g.0).collect();
    senders.sort_unstable();
    senders.dedup();
    senders
        .iter()
        .map(|s| got.iter().filter(|g| g.0 == *s).map(|g| g.1).collect())
        .collect()
}

pub fn embedded_with_ebpf() -> Node {
    let node = Node::embedded().expect("embedded node");
    assert_eq!(
        node.stats().ebpf,
        "available",
        "fabricd did not load the eBPF path (run as root)"
    );
    node
}
