//! A direct link whose sender is killed with SIGKILL (so it cannot say
//! CLOSE on the link): its node's daemon tells the receiver's node, and the
//! receiver's link ends once its connection has closed.

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

#[test]
fn a_killed_senders_direct_link_ends_at_its_receiver() {
    // Two nodes of one cluster in this process, on loopback; the sender is
    // a process of node 2, the receiver a mailbox of node 1.
    let (a, b) = (free_loopback(1), free_loopback(2));
    let cluster = |listen| {
        let mut c =
            fabric::cluster::ClusterConfig::new(format!("direct-{}", std::process::id()), listen);
        c.broadcast = false;
        c.seeds = vec![a];
        c
    };
    let node1 = Node::embedded_member(cluster(a)).expect("node 1");
    let node2 = Node::embedded_member(cluster(b)).expect("node 2");
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

    // The receiver takes what had arrived, then the link is gone.
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
