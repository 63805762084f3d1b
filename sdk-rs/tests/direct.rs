//! A direct link whose sender is killed with SIGKILL (so it cannot say
//! CLOSE on the link): its node's daemon tells the receiver's node, and the
//! receiver's link ends once its connection has closed; and what the
//! killed sender had sent still arrives, all of it.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use fabric::client::Mailbox;
use nefele::Node;

mod support;
use support::ChildGuard;

const DEMO: &str = env!("CARGO_BIN_EXE_nefele-demo");

/// A loopback address (`127.0.0.<host>`) whose TCP port is free now.
fn free_loopback(host: u8) -> std::net::SocketAddr {
    std::net::TcpListener::bind((std::net::Ipv4Addr::new(127, 0, 0, host), 0))
        .and_then(|l| l.local_addr())
        .expect("a free loopback port")
}

/// Two nodes of one cluster in this process, on loopback (`name` keeps
/// the clusters of parallel tests apart); senders are processes of node 2,
/// receivers mailboxes of node 1.
fn two_nodes(name: &str) -> (Node, Node) {
    let (a, b) = (free_loopback(1), free_loopback(2));
    let cluster = |listen| {
        let mut c =
            fabric::cluster::ClusterConfig::new(format!("{name}-{}", std::process::id()), listen);
        c.broadcast = false;
        c.seeds = vec![a];
        c
    };
    let node1 = Node::embedded_member(cluster(a)).expect("node 1");
    let node2 = Node::embedded_member(cluster(b)).expect("node 2");
    (node1, node2)
}

#[test]
fn a_killed_senders_direct_link_ends_at_its_receiver() {
    let (node1, node2) = two_nodes("direct");
    let mut rx = Mailbox::open_at(node1.socket_path()).expect("receiver");
    rx.bind(&"sink@{9102,1,1}".parse().unwrap()).expect("bind");
    let (k, v) = node2.env();
    let mut flood = ChildGuard(
        Command::new(DEMO)
            .args(["flood", "--to", "sink@{9102,1,1}"])
            .env(k, v)
            .stdout(Stdio::null())
            .spawn()
            .expect("spawn nefele-demo flood"),
    );

    // A few of its 64 KiB messages arrive, over a direct link.
    let mut buf = Vec::new();
    let mut from = None;
    for _ in 0..5 {
        let got = rx
            .recv_into(&mut buf, Some(Instant::now() + Duration::from_secs(10)))
            .expect("recv")
            .expect("the flood's messages arrive");
        assert_eq!(buf.len(), 64 << 10);
        from = Some(got);
    }
    let from = from.expect("received above");
    assert_eq!(node1.stats().direct_links_in, 1, "the link is direct");
    assert!(rx.has_ring_from(from));

    // Killed while blocked on a full window: no CLOSE on the link.
    let pid = nix::unistd::Pid::from_raw(flood.0.id() as i32);
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGKILL).expect("kill");
    let _ = flood.0.wait();
    let killed = Instant::now();

    // The receiver takes what the sender had sent (its daemon holds the
    // connection and sends it), then the link is gone.
    let mut after = 0u32;
    while rx.has_ring_from(from) {
        assert!(
            killed.elapsed() < Duration::from_secs(10),
            "the killed sender's link still open after {:?} ({after} messages since)",
            killed.elapsed()
        );
        if rx
            .recv_into(&mut buf, Some(Instant::now() + Duration::from_millis(20)))
            .expect("recv")
            .is_some()
        {
            assert_eq!(buf.len(), 64 << 10, "whole messages only");
            after += 1;
        }
    }
    eprintln!(
        "link ended {:?} after the kill, {after} messages received since",
        killed.elapsed()
    );
    assert_eq!(node1.stats().direct_links_in, 0);
}

/// A sender that is killed right after its last send has much of what it
/// sent still in its socket (the receiver reads slowly). A socket closed
/// with data unread (the receiver's acks) is reset and throws its unsent
/// bytes away; the sender's daemon holds the connection too, so they go
/// out, and every message whose send returned arrives, in order.
#[test]
fn what_a_killed_direct_sender_sent_all_arrives() {
    const COUNT: u64 = 200;
    const SIZE: usize = 16 << 10;
    let (node1, node2) = two_nodes("direct-kill");
    let mut rx = Mailbox::open_at(node1.socket_path()).expect("receiver");
    rx.bind(&"sink@{9103,1,1}".parse().unwrap()).expect("bind");
    let (k, v) = node2.env();
    let mut stream = ChildGuard(
        Command::new(DEMO)
            .args(["stream", "--to", "sink@{9103,1,1}", "--then-die"])
            .args(["--count", &COUNT.to_string(), "--size", &SIZE.to_string()])
            .env(k, v)
            .stdout(Stdio::piped())
            .spawn()
            .expect("spawn nefele-demo stream"),
    );

    let mut buf = Vec::new();
    let mut received_when_killed = None;
    let deadline = Instant::now() + Duration::from_secs(30);
    for i in 0..COUNT {
        if received_when_killed.is_none() {
            if let Some(status) = stream.0.try_wait().expect("wait") {
                use std::os::unix::process::ExitStatusExt as _;
                assert_eq!(status.signal(), Some(9), "it killed itself: {status}");
                received_when_killed = Some(i);
            }
        }
        let got = rx.recv_into(&mut buf, Some(deadline)).expect("recv");
        assert!(
            got.is_some(),
            "message {i} of {COUNT} never came (the sender was killed after {:?} had arrived)",
            received_when_killed
        );
        assert_eq!(buf.len(), SIZE);
        let n = u64::from_le_bytes(buf[..8].try_into().unwrap());
        assert_eq!(n, i, "out of order, lost or repeated");
        if i == 0 {
            // Counted since the start: the sender may be gone already, and
            // its link with it from `direct_links_in`.
            assert_eq!(node1.stats().direct_links_accepted, 1, "the link is direct");
        }
        // Slowly, so that the sender's socket still holds much when it dies.
        std::thread::sleep(Duration::from_millis(3));
    }
    let mut out = String::new();
    std::io::Read::read_to_string(stream.0.stdout.as_mut().unwrap(), &mut out).unwrap();
    assert_eq!(out.trim(), "sent", "the sender got through all its sends");
    let at_kill =
        received_when_killed.expect("the sender was dead before the last message arrived");
    eprintln!(
        "{} of {COUNT} messages arrived after the sender was killed",
        COUNT - at_kill
    );
    assert!(
        rx.recv_into(&mut buf, Some(Instant::now() + Duration::from_millis(200)))
            .expect("recv")
            .is_none(),
        "nothing more than was sent"
    );
}

/// A mailbox that closes does not wait for its direct links' receivers
/// (before, it waited up to 2 s per link, then reset what was unread):
/// its daemon holds the connections and sees them out, so a receiver that
/// reads only after the sender is gone still gets everything, in order.
#[test]
fn a_closing_direct_sender_neither_waits_nor_loses() {
    const COUNT: u64 = 64;
    const SIZE: usize = 16 << 10;
    let (node1, node2) = two_nodes("direct-close");
    let mut rx = Mailbox::open_at(node1.socket_path()).expect("receiver");
    rx.bind(&"sink@{9104,1,1}".parse().unwrap()).expect("bind");
    let (closed_tx, closed_rx) = std::sync::mpsc::channel();
    let (go_tx, go_rx) = std::sync::mpsc::channel::<()>();
    let socket = node2.socket_path().to_path_buf();
    let sender = std::thread::spawn(move || {
        let mut tx = Mailbox::open_at(&socket).expect("sender");
        let to = "sink@{9104,1,1}".parse().unwrap();
        assert!(tx
            .service_exists(&to, Duration::from_secs(10))
            .expect("exists"));
        let port = tx.lookup(&to).expect("lookup")[0];
        let mut msg = vec![0u8; SIZE];
        for i in 0..COUNT {
            msg[..8].copy_from_slice(&i.to_le_bytes());
            tx.send_to_port(port, &msg, fabric::ring::SendMode::RELIABLE)
                .expect("send");
        }
        closed_tx.send(None).expect("report");
        go_rx.recv().expect("go");
        let t = Instant::now();
        drop(tx);
        closed_tx.send(Some(t.elapsed())).expect("report");
    });
    // Nothing is read until the sender has closed.
    let sent = closed_rx.recv_timeout(Duration::from_secs(20));
    assert_eq!(sent, Ok(None), "the sender sent everything");
    assert_eq!(node1.stats().direct_links_in, 1, "the link is direct");
    go_tx.send(()).expect("go");
    let closing = closed_rx
        .recv_timeout(Duration::from_secs(20))
        .expect("the sender closes")
        .expect("after sending");
    sender.join().expect("sender");
    assert!(
        closing < Duration::from_millis(500),
        "closing took {closing:?}"
    );
    let mut buf = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut from = None;
    for i in 0..COUNT {
        let got = rx.recv_into(&mut buf, Some(deadline)).expect("recv");
        assert!(got.is_some(), "message {i} of {COUNT} never came");
        from = got;
        assert_eq!(u64::from_le_bytes(buf[..8].try_into().unwrap()), i);
    }
    let from = from.expect("received");
    let t = Instant::now();
    while rx.has_ring_from(from) {
        assert!(t.elapsed() < Duration::from_secs(5), "the link never ended");
        let _ = rx.recv_into(&mut buf, Some(Instant::now() + Duration::from_millis(20)));
    }
    eprintln!("closing took {closing:?}");
}
