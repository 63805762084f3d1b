//! First messages on the eBPF path: a sender's first message to a mailbox
//! goes through the kernel at once, before the ring between them exists;
//! the rest take the ring, and the receiver keeps each sender's order
//! across the switch. Senders are `nefele-demo stream` processes (a
//! mailbox of the same process would get an in-process ring instead).
//! Needs root for the eBPF path (CI runs as root).

use std::process::{Command, Stdio};
use std::time::Duration;

use nefele::{Mailbox, Node, PortId};

const DEMO: &str = env!("CARGO_BIN_EXE_nefele-demo");

/// Runs `nefele-demo stream` to `to` to the end: `count` messages of
/// `size` bytes numbered from 0, sent one after the other.
fn stream(node: &Node, to: &str, count: u64, size: u64) {
    stream_early(node, to, count, size, true);
}

/// [`stream`] with its first message on the eBPF path (`early`) or not.
fn stream_early(node: &Node, to: &str, count: u64, size: u64, early: bool) {
    let (k, v) = node.env();
    let out = Command::new(DEMO)
        .args(["stream", "--to", to, "--count"])
        .arg(count.to_string())
        .arg("--size")
        .arg(size.to_string())
        .env(k, v)
        .env("NEFELE_EARLY_EBPF", if early { "1" } else { "0" })
        .stdin(Stdio::null())
        .output()
        .expect("run nefele-demo stream");
    assert!(
        out.status.success(),
        "nefele-demo stream failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Receives `total` messages and returns each one's sender and number.
fn receive(rx: &mut Mailbox, total: usize) -> Vec<(PortId, u64)> {
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
fn per_sender(got: &[(PortId, u64)]) -> Vec<Vec<u64>> {
    let mut senders: Vec<PortId> = got.iter().map(|g| g.0).collect();
    senders.sort_unstable();
    senders.dedup();
    senders
        .iter()
        .map(|s| got.iter().filter(|g| g.0 == *s).map(|g| g.1).collect())
        .collect()
}

fn embedded_with_ebpf() -> Node {
    let node = Node::embedded().expect("embedded node");
    assert_eq!(
        node.stats().ebpf,
        "available",
        "fabricd did not load the eBPF path (run as root)"
    );
    node
}

#[test]
fn the_first_message_goes_through_the_kernel_and_the_order_holds_across_the_switch_to_the_ring() {
    let node = embedded_with_ebpf();
    let mut rx = node
        .mailbox()
        .expect("mailbox")
        .bound("{7100,1}")
        .expect("bind");
    // Both senders finish before anything is read: one message from the
    // first, then 1000 from the second (its first on the socket, the rest
    // in its ring). The first message read comes from the socket, after
    // which a receive looks at rings first: without the hand-over, the
    // second sender's ring would overtake its first message.
    stream(&node, "{7100,1}", 1, 8);
    stream(&node, "{7100,1}", 1000, 64);
    let got = receive(&mut rx, 1001);
    let mut streams = per_sender(&got);
    streams.sort_by_key(Vec::len);
    assert_eq!(streams.len(), 2, "two senders");
    assert_eq!(streams[0], vec![0]);
    assert_eq!(streams[1], (0..1000).collect::<Vec<u64>>(), "out of order");
    assert_eq!(
        rx.early_received(),
        2,
        "each sender's first message (and only that) comes on the eBPF path"
    );
    assert_eq!(rx.try_recv().expect("recv"), None, "nothing twice");
}

#[test]
fn a_first_message_the_tenant_policy_stops_is_sent_again_on_the_ring_and_not_counted() {
    let node = embedded_with_ebpf();
    let mut rx = node
        .mailbox()
        .expect("mailbox")
        .bound("{7100,2}")
        .expect("bind");
    // The sender runs as root (tenant 0); the policy keeps tenant 0 from
    // reaching tenant 7 on the eBPF path, which rings do not enforce.
    rx.join_tenant(7).expect("tenant 7");
    stream(&node, "{7100,2}", 100, 64);
    let got = receive(&mut rx, 100);
    assert_eq!(per_sender(&got), vec![(0..100).collect::<Vec<u64>>()]);
    assert_eq!(rx.early_received(), 0);
    assert!(
        node.stats().ebpf_denied.is_empty(),
        "a first message counted as refused: {:?}",
        node.stats().ebpf_denied
    );
    assert_eq!(rx.try_recv().expect("recv"), None, "nothing twice");
}

#[test]
fn without_the_early_path_every_message_takes_the_ring() {
    let node = embedded_with_ebpf();
    let mut rx = node
        .mailbox()
        .expect("mailbox")
        .bound("{7100,3}")
        .expect("bind");
    stream_early(&node, "{7100,3}", 50, 8, false);
    let got = receive(&mut rx, 50);
    assert_eq!(per_sender(&got), vec![(0..50).collect::<Vec<u64>>()]);
    assert_eq!(rx.early_received(), 0);
}

#[test]
fn a_first_message_to_a_mailbox_that_closed_before_is_refused_not_lost() {
    // The first message to a port goes on the eBPF path before the
    // Connect; a receiver that closed before it was sent never had it, so
    // the send must fail (as it did before the eBPF path), not succeed.
    let node = embedded_with_ebpf();
    let closed = node.mailbox().expect("mailbox");
    let port = closed.port();
    drop(closed);
    std::thread::sleep(Duration::from_millis(50));
    let mut tx = node.mailbox().expect("mailbox");
    let err = tx
        .send_to_port(port, b"anyone?", nefele::SendMode::RELIABLE)
        .expect_err("a send to a mailbox that closed before");
    assert!(
        matches!(err, nefele::Error::NoSuchMailbox(_)),
        "unexpected error: {err}"
    );
}
