//! A pollable mailbox under tokio: receives wait on its eBPF socket through
//! the reactor (no blocking thread). Needs root for the eBPF path (CI runs
//! as root).

use std::time::Duration;

use nefele::r#async::PollableMailbox;
use nefele::{Mailbox, Node};

/// One worker thread and no blocking pool: a receive that blocked its
/// thread would stall the runtime.
fn runtime_without_blocking_threads() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_io()
        .enable_time()
        .max_blocking_threads(1)
        .build()
        .expect("runtime")
}

#[test]
fn a_pollable_mailbox_receives_under_tokio_without_a_blocking_thread() {
    let node = Node::embedded().expect("embedded node");
    assert_eq!(node.stats().ebpf, "available", "no eBPF path (run as root)");
    let rx = Mailbox::open_pollable_at(node.socket_path())
        .expect("pollable")
        .bound("sink@{9100,1,1}")
        .expect("bind");
    let rt = runtime_without_blocking_threads();
    let socket = node.socket_path().to_path_buf();
    let sender = std::thread::spawn(move || {
        let mut tx = Mailbox::open_at(&socket).expect("sender");
        assert!(tx
            .service_exists("sink@{9100,1,1}", Duration::from_secs(5))
            .expect("lookup"));
        std::thread::sleep(Duration::from_millis(50));
        for i in 0..200u32 {
            tx.send("sink@{9100,1,1}", &i.to_le_bytes()).expect("send");
        }
        tx.port()
    });
    let got = rt.block_on(async move {
        let mut rx = PollableMailbox::new(rx).expect("pollable wrapper");
        let mut got = Vec::new();
        let mut ticks = 0u32;
        while got.len() < 200 {
            tokio::select! {
                m = rx.recv() => got.push(m.expect("recv")),
                // The runtime stays free to run other tasks meanwhile.
                _ = tokio::time::sleep(Duration::from_millis(1)) => ticks += 1,
            }
            assert!(ticks < 10_000, "no messages within 10 s");
        }
        got
    });
    let from = sender.join().expect("sender");
    for (i, m) in got.iter().enumerate() {
        assert_eq!(m.from, from);
        assert_eq!(m.data, (i as u32).to_le_bytes(), "message {i} out of order");
    }
}

/// A loopback address (`127.0.0.<host>`) whose TCP port is free now.
fn free_loopback(host: u8) -> std::net::SocketAddr {
    std::net::TcpListener::bind((std::net::Ipv4Addr::new(127, 0, 0, host), 0))
        .and_then(|l| l.local_addr())
        .expect("a free loopback port")
}

#[test]
fn messages_from_another_node_wake_a_pollable_mailbox_under_tokio() {
    // Over the sender's direct link: its socket joins the mailbox's fd.
    from_another_node(true);
}

#[test]
fn messages_through_the_daemons_wake_a_pollable_mailbox_under_tokio() {
    // Through node 1's daemon and a ring, not through the eBPF socket: only
    // the doorbell's futex (watched through io_uring) can wake the runtime
    // for them.
    from_another_node(false);
}

/// Two nodes of one cluster in this process, on loopback: node 1 holds
/// the pollable mailbox, node 2 the sender, which uses a `direct` link or
/// the daemons' path.
fn from_another_node(direct: bool) {
    let (a, b) = (free_loopback(1), free_loopback(2));
    let cluster = |listen| {
        let mut c =
            fabric::cluster::ClusterConfig::new(format!("pollable-{}", std::process::id()), listen);
        c.broadcast = false;
        c.seeds = vec![a];
        c
    };
    let node1 = Node::embedded_member(cluster(a)).expect("node 1");
    let node2 = Node::embedded_member(cluster(b)).expect("node 2");
    assert_eq!(
        node1.stats().ebpf,
        "available",
        "no eBPF path (run as root)"
    );
    let rx = Mailbox::open_pollable_at(node1.socket_path())
        .expect("pollable")
        .bound("sink@{9101,1,1}")
        .expect("bind");
    let rt = runtime_without_blocking_threads();
    const N: u32 = 300;
    let socket = node2.socket_path().to_path_buf();
    let sender = std::thread::spawn(move || {
        let mut tx = Mailbox::open_at(&socket).expect("sender");
        tx.set_direct_links(direct);
        assert!(
            tx.service_exists("sink@{9101,1,1}", Duration::from_secs(10))
                .expect("lookup"),
            "node 2 never learned node 1's binding"
        );
        // In bursts with pauses, so the receiver is asleep in the reactor
        // when most bursts begin.
        for i in 0..N {
            tx.send("sink@{9101,1,1}", &i.to_le_bytes()).expect("send");
            if i % 30 == 29 {
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        tx.port()
    });
    let node1 = &node1;
    let (got, links_in) = rt.block_on(async move {
        let mut rx = PollableMailbox::new(rx).expect("pollable wrapper");
        let mut got = Vec::new();
        let mut links_in = None;
        // Without a wake from the doorbell (or the direct link's socket)
        // the runtime would sleep forever: this timeout is the only other
        // way out.
        let all = async {
            while got.len() < N as usize {
                got.push(rx.recv().await.expect("recv"));
                // While the sender is still sending (it pauses every 30).
                links_in.get_or_insert_with(|| node1.stats().direct_links_in);
            }
        };
        tokio::time::timeout(Duration::from_secs(30), all)
            .await
            .expect("messages from node 2 did not wake the receiver within 30 s");
        (got, links_in)
    });
    let from = sender.join().expect("sender");
    assert_eq!(from.node, 2, "the sender is on node 2");
    assert_eq!(
        links_in,
        Some(u32::from(direct)),
        "the sender's link was direct: {direct}"
    );
    for (i, m) in got.iter().enumerate() {
        assert_eq!(m.from, from);
        assert_eq!(m.data, (i as u32).to_le_bytes(), "message {i} out of order");
    }
}
