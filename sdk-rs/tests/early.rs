//! First messages on the eBPF path: a sender's first message to a mailbox
//! goes through the kernel at once, before the ring between them exists;
//! the rest take the ring, and the receiver keeps each sender's order
//! across the switch. Senders are `nefele-demo stream` processes (a
//! mailbox of the same process would get an in-process ring instead).
//! Needs root for the eBPF path (CI runs as root).

use std::time::Duration;

mod streams;
use streams::{embedded_with_ebpf, per_sender, receive, stream, stream_early};

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

#[test]
fn blocking_receives_keep_each_senders_order_while_rings_come_and_go() {
    blocking_receives_from_three_senders("{7100,4}", None);
}

#[test]
fn blocking_receives_that_never_spin_keep_each_senders_order_too() {
    blocking_receives_from_three_senders("{7100,5}", Some(Duration::ZERO));
}

/// A blocking receive (no deadline) starts by polling only its rings,
/// while nothing else can bring a message (once, without spinning, if its
/// spin is zero). Three senders start while it waits, each with its first
/// message on the eBPF path and a new ring after it, and each ends (its
/// ring closes) while others still send: every message arrives once and
/// each sender's in order.
fn blocking_receives_from_three_senders(bind: &'static str, spin: Option<Duration>) {
    const SENDERS: u64 = 3;
    const EACH: u64 = 2000;
    let node = embedded_with_ebpf();
    let mut rx = node.mailbox().expect("mailbox").bound(bind).expect("bind");
    if let Some(spin) = spin {
        rx.set_spin(spin);
    }
    let (done_tx, done_rx) = std::sync::mpsc::channel();
    let receiver = std::thread::spawn(move || {
        let got: Vec<(nefele::PortId, u64)> = (0..SENDERS * EACH)
            .map(|_| {
                let m = rx.recv().expect("recv");
                (
                    m.from,
                    u64::from_le_bytes(m.data[..8].try_into().expect("numbered")),
                )
            })
            .collect();
        done_tx.send(()).expect("the test waits");
        (rx, got)
    });
    std::thread::scope(|s| {
        for i in 0..SENDERS {
            let node = &node;
            s.spawn(move || {
                std::thread::sleep(Duration::from_millis(20 * i));
                stream(node, bind, EACH, 64);
            });
        }
    });
    done_rx
        .recv_timeout(Duration::from_secs(60))
        .expect("the blocking receives took every message within 60 s");
    let (mut rx, got) = receiver.join().expect("receiver");
    let streams = per_sender(&got);
    assert_eq!(streams.len(), SENDERS as usize, "{SENDERS} senders");
    for s in &streams {
        assert_eq!(
            s,
            &(0..EACH).collect::<Vec<u64>>(),
            "lost, doubled or out of order"
        );
    }
    assert_eq!(rx.try_recv().expect("recv"), None, "nothing twice");
}
