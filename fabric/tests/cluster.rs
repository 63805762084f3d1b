//! Three daemons of one process form a cluster on loopback: membership
//! within 5 s, a binding on node 3 seen and reached from node 1 (and the
//! reply back), and node 3's death withdrawing it and failing a blocked
//! sender instead of hanging it. Loopback only; every wait is bounded.

use std::net::{SocketAddr, TcpListener};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use fabric::addr::Address;
use fabric::client::Mailbox;
use fabric::cluster::ClusterConfig;
use fabric::daemon::{Config, Daemon};
use fabric::ring::SendMode;

/// A loopback address whose TCP port is free now (UDP uses the same port).
fn free_addr() -> SocketAddr {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
}

struct Node {
    daemon: Option<Daemon>,
    _dir: tempfile::TempDir,
    socket: PathBuf,
    /// Its node-link listener.
    listen: SocketAddr,
}

fn start_cluster(n: u32) -> (Vec<Node>, ClusterConfig) {
    start_cluster_with(n, |_| {})
}

/// [`start_cluster`] with `tune` applied to every node's configuration.
fn start_cluster_with(n: u32, tune: impl Fn(&mut ClusterConfig)) -> (Vec<Node>, ClusterConfig) {
    let addrs: Vec<SocketAddr> = (0..n).map(|_| free_addr()).collect();
    let mut cc = ClusterConfig::new(format!("test-{}", std::process::id()), addrs[0]);
    cc.broadcast = false;
    tune(&mut cc);
    let nodes = (0..n)
        .map(|i| {
            let dir = tempfile::tempdir().unwrap();
            let socket = dir.path().join("fabricd.sock");
            let mut c = cc.clone();
            c.listen = addrs[i as usize];
            c.seeds = vec![addrs[0]];
            let daemon = Daemon::start(Config {
                socket_path: socket.clone(),
                node_id: i + 1,
                cluster: Some(c),
                ..Config::default()
            })
            .unwrap();
            Node {
                daemon: Some(daemon),
                _dir: dir,
                socket,
                listen: addrs[i as usize],
            }
        })
        .collect();
    (nodes, cc)
}

/// A mailbox that sends to other nodes through the daemons and their node
/// links only.
fn through_daemons(socket: &std::path::Path) -> Mailbox {
    let mut mb = Mailbox::open_at(socket).unwrap();
    mb.set_direct_links(false);
    mb
}

fn alive_count(mb: &mut Mailbox) -> usize {
    mb.nodes().unwrap().nodes.iter().filter(|n| n.alive).count()
}

/// Whether a non-blocking send found its receiver's ring full.
fn is_full(e: &fabric::client::Error) -> bool {
    matches!(
        e,
        fabric::client::Error::Send {
            reason: fabric::ring::SendError::WouldBlock,
            ..
        }
    )
}

fn wait_for(what: &str, limit: Duration, mut ok: impl FnMut() -> bool) -> Duration {
    let t0 = Instant::now();
    while !ok() {
        assert!(t0.elapsed() < limit, "{what}: not within {limit:?}");
        std::thread::sleep(Duration::from_millis(20));
    }
    t0.elapsed()
}

#[test]
fn three_nodes_form_route_and_lose_one() {
    let t0 = Instant::now();
    let (mut nodes, cc) = start_cluster(3);
    let mut on1 = Mailbox::open_at(&nodes[0].socket).unwrap();
    let mut on2 = Mailbox::open_at(&nodes[1].socket).unwrap();
    let mut printer = Mailbox::open_at(&nodes[2].socket).unwrap();
    let formed = wait_for("3 nodes see 3 alive nodes", Duration::from_secs(5), || {
        alive_count(&mut on1) == 3 && alive_count(&mut on2) == 3 && alive_count(&mut printer) == 3
    });
    eprintln!(
        "cluster formed {formed:?} after the mailboxes opened ({:?} in all)",
        t0.elapsed()
    );

    // The seed's printer on node 3, reached from node 1 by name, replying
    // to the sender's port.
    let addr: Address = "printer@{8080,1,1}".parse().unwrap();
    printer.bind(&addr).unwrap();
    assert!(on1.service_exists(&addr, Duration::from_secs(5)).unwrap());
    assert_eq!(on1.lookup(&addr).unwrap(), vec![printer.port()]);
    on1.send(&addr, b"inside 785 total 1000").unwrap();
    let mut buf = Vec::new();
    let from = printer
        .recv_into(&mut buf, Some(Instant::now() + Duration::from_secs(5)))
        .unwrap()
        .expect("the message crosses the node link");
    assert_eq!(from, on1.port(), "the source is the true sender's port");
    assert_eq!(buf, b"inside 785 total 1000");
    assert_eq!(
        printer.daemon_stats().unwrap().direct_links_in,
        1,
        "node 1's mailbox reached node 3's over a direct link of its own"
    );
    printer.send(&Address::Port(from), b"got it").unwrap();
    let back = on1
        .recv_into(&mut buf, Some(Instant::now() + Duration::from_secs(5)))
        .unwrap()
        .expect("the reply comes back");
    assert_eq!((back, &buf[..]), (printer.port(), &b"got it"[..]));

    // Order and completeness across the link, with large messages too.
    // Node 2 learns of the binding by gossip: wait for it.
    assert!(on2.service_exists(&addr, Duration::from_secs(5)).unwrap());
    for i in 0..2000u32 {
        let mut m = i.to_le_bytes().to_vec();
        if i % 500 == 0 {
            m.resize(3 << 20, i as u8);
        }
        on2.send(&addr, &m).unwrap();
        let got = printer
            .recv_into(&mut buf, Some(Instant::now() + Duration::from_secs(10)))
            .unwrap();
        assert_eq!(got, Some(on2.port()));
        assert_eq!(buf, m, "message {i}");
    }

    // Node 3 dies while node 1 is blocked sending to its printer (which
    // does not read): node 1's send fails, and the binding goes away.
    let target = Address::Port(printer.port());
    let sender = std::thread::spawn(move || {
        let chunk = vec![7u8; 64 << 10];
        let t0 = Instant::now();
        // Bounded: the ring (256 KiB) and the link window (4 MiB) fill
        // long before this many; then the send blocks until node 3 is lost.
        for _ in 0..100_000 {
            if let Err(e) = on1.send_with(&target, &chunk, SendMode::RELIABLE) {
                return (on1, t0.elapsed(), e.to_string());
            }
        }
        panic!("100,000 sends of 64 KiB to a reader that never reads all succeeded");
    });
    std::thread::sleep(Duration::from_millis(500));
    let killed = Instant::now();
    // The printer's process lives on; its node's daemon goes.
    nodes[2].daemon.take();
    let (mut on1, _, err) = sender.join().unwrap();
    let failed_after = killed.elapsed();
    let bound = cc.failure_detection_bound() + Duration::from_secs(1);
    assert!(
        failed_after < bound,
        "blocked send failed only after {failed_after:?} (bound {bound:?})"
    );
    assert!(err.contains("gone"), "a clear error: {err}");
    let withdrawn = wait_for("binding withdrawn on node 1", bound, || {
        !on1.service_exists(&addr, Duration::ZERO).unwrap()
    });
    eprintln!(
        "after node 3 died: send failed in {failed_after:?}, binding withdrawn by {:?} (bound {:?})",
        killed.elapsed(),
        cc.failure_detection_bound()
    );
    let _ = withdrawn;
    wait_for("node 2 sees node 3 dead", bound, || {
        alive_count(&mut on2) == 2
    });
    drop(printer);
}

/// Node links multiplex every mailbox pair of two nodes: a receiver that
/// stops reading pushes back on its own senders only. Its node holds what
/// was in flight for it and pauses the pair at the sending gateway, while
/// another pair on the same link keeps flowing; once it reads again,
/// everything arrives, in order, once.
#[test]
fn a_full_receiver_holds_up_only_its_own_senders() {
    let (nodes, _) = start_cluster(2);
    let [mut to_slow, mut to_fast, mut slow, mut fast] = two_pairs(&nodes);
    // Fill everything between `to_slow` and `slow`, which does not read:
    // non-blocking sends until they keep saying the receiver is full.
    let slow_port = Address::Port(slow.port());
    let sent_to_slow = fill(&mut to_slow, &slow_port);
    eprintln!("{sent_to_slow} messages of 1 KiB fill the path to the slow receiver");
    let held = fast.daemon_stats().unwrap().link_held_bytes;
    assert!(held > 0, "node 2 holds what did not fit the full ring");
    assert!(
        held <= fabric::cluster::DEFAULT_LINK_HELD_BYTES as u64,
        "within the bound: {held}"
    );
    assert_eq!(
        to_slow.daemon_stats().unwrap().paused_pairs,
        1,
        "the pair is paused at node 1"
    );

    // The other pair on the same link is not held up.
    let fast_port = Address::Port(fast.port());
    let n_fast = 5_000u32;
    let sender = std::thread::spawn(move || {
        for i in 0..n_fast {
            to_fast.send(&fast_port, &numbered(i)).unwrap();
        }
        to_fast
    });
    let mut buf = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(20);
    for i in 0..n_fast {
        let from = fast.recv_into(&mut buf, Some(deadline)).unwrap();
        assert!(
            from.is_some(),
            "the fast receiver got only {i} of {n_fast} messages: held up by the slow one"
        );
        assert_eq!(buf, numbered(i));
    }
    let _to_fast = sender.join().unwrap();

    // The slow receiver reads again: all of it, in order, once; and its
    // sender may send again.
    expect_numbered(&mut slow, to_slow.port(), sent_to_slow, "slow");
    to_slow.send(&slow_port, &numbered(sent_to_slow)).unwrap();
    let from = slow
        .recv_into(&mut buf, Some(Instant::now() + Duration::from_secs(10)))
        .unwrap();
    assert_eq!(from, Some(to_slow.port()));
    assert_eq!(buf, numbered(sent_to_slow));
    assert_eq!(
        slow.try_recv_into(&mut buf).unwrap(),
        None,
        "nothing arrives twice"
    );
    wait_for(
        "the pair resumed, nothing held",
        Duration::from_secs(5),
        || {
            fast.daemon_stats().unwrap().link_held_bytes == 0
                && to_slow.daemon_stats().unwrap().paused_pairs == 0
        },
    );
}

/// Two senders on node 1 (`to_slow`, `to_fast`) and two receivers on node
/// 2 (`slow`, `fast`), once both nodes see each other. The senders go
/// through the daemons: the node link is what these tests are about (a
/// direct link is a pair's own connection).
fn two_pairs(nodes: &[Node]) -> [Mailbox; 4] {
    let mut to_slow = through_daemons(&nodes[0].socket);
    let to_fast = through_daemons(&nodes[0].socket);
    let mut slow = Mailbox::open_at(&nodes[1].socket).unwrap();
    let fast = Mailbox::open_at(&nodes[1].socket).unwrap();
    wait_for("2 nodes see each other", Duration::from_secs(5), || {
        alive_count(&mut to_slow) == 2 && alive_count(&mut slow) == 2
    });
    [to_slow, to_fast, slow, fast]
}

/// Sends 1 KiB messages numbered from 0 to `to`, without blocking, until
/// the path has been full for 300 ms; how many went.
fn fill(sender: &mut Mailbox, to: &Address) -> u32 {
    let mut sent = 0u32;
    let mut full_since: Option<Instant> = None;
    let t0 = Instant::now();
    while full_since.is_none_or(|t| t.elapsed() < Duration::from_millis(300)) {
        assert!(
            t0.elapsed() < Duration::from_secs(20) && sent < 200_000,
            "the full receiver never pushed back ({sent} sent)"
        );
        match sender.send_with(to, &numbered(sent), SendMode::RELIABLE_NONBLOCKING) {
            Ok(()) => {
                sent += 1;
                full_since = None;
            }
            Err(e) if is_full(&e) => {
                full_since.get_or_insert_with(Instant::now);
                std::thread::sleep(Duration::from_millis(1));
            }
            Err(e) => panic!("send: {e}"),
        }
    }
    sent
}

/// Message `i` of a numbered stream: 1 KiB.
fn numbered(i: u32) -> Vec<u8> {
    let mut m = i.to_le_bytes().to_vec();
    m.resize(1024, 0xab);
    m
}

/// Receives `n` numbered messages from `from`, in order.
fn expect_numbered(rx: &mut Mailbox, from: fabric::addr::PortId, n: u32, what: &str) {
    let mut buf = Vec::new();
    for i in 0..n {
        let got = rx
            .recv_into(&mut buf, Some(Instant::now() + Duration::from_secs(10)))
            .unwrap();
        assert_eq!(got, Some(from), "{what}: message {i} of {n}");
        assert_eq!(buf, numbered(i), "{what}: message {i} of {n}");
    }
}

/// An incoming node link that holds more than its bound for a full
/// receiver is read no more until the receiver catches up: what it holds
/// stays within the bound plus one message, and the whole link waits (so
/// does another pair on it). Then everything arrives, in order, once.
#[test]
fn a_link_that_holds_too_much_waits_for_its_receivers() {
    // Less than one message: the first message held puts the link past it
    // (how much more is held depends on how much was in flight when the
    // pair was paused).
    const BOUND: usize = 512;
    let (nodes, _) = start_cluster_with(2, |cc| cc.link_held_bytes = BOUND);
    let [mut to_slow, mut to_fast, mut slow, mut fast] = two_pairs(&nodes);
    let slow_port = Address::Port(slow.port());
    let sent_to_slow = fill(&mut to_slow, &slow_port);
    let held = fast.daemon_stats().unwrap().link_held_bytes as usize;
    eprintln!("{sent_to_slow} messages of 1 KiB fill the path; node 2 holds {held} bytes");
    assert!(
        held > BOUND && held <= BOUND + 1024,
        "node 2 holds past its bound by at most one message: {held}"
    );

    // The link is not read: the other pair's messages wait in it.
    let fast_port = Address::Port(fast.port());
    for i in 0..100 {
        to_fast
            .send_with(&fast_port, &numbered(i), SendMode::RELIABLE_NONBLOCKING)
            .unwrap();
    }
    let mut buf = Vec::new();
    assert_eq!(
        fast.recv_into(&mut buf, Some(Instant::now() + Duration::from_millis(300)))
            .unwrap(),
        None,
        "nothing is read from a link past its bound"
    );

    // The slow receiver catches up: the link is read again.
    expect_numbered(&mut slow, to_slow.port(), sent_to_slow, "slow");
    expect_numbered(&mut fast, to_fast.port(), 100, "fast");
    for rx in [&mut slow, &mut fast] {
        assert_eq!(rx.try_recv_into(&mut buf).unwrap(), None, "nothing twice");
    }
    wait_for(
        "nothing held, no pair paused",
        Duration::from_secs(5),
        || {
            fast.daemon_stats().unwrap().link_held_bytes == 0
                && to_slow.daemon_stats().unwrap().paused_pairs == 0
        },
    );
}

/// Kills (`ss -K`: the kernel aborts them and resets the peer) every TCP
/// connection to `listener`; how many there were.
fn kill_connections_to(listener: SocketAddr) -> usize {
    let out = std::process::Command::new("ss")
        .args(["-K", "-t", "-n", "dst", &listener.ip().to_string()])
        .args(["dport", "=", &listener.port().to_string()])
        .output()
        .expect("ss (iproute2) runs");
    assert!(out.status.success(), "ss -K: {out:?}");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| l.starts_with("ESTAB"))
        .count()
}

/// A node link whose connection is killed three times mid-stream comes
/// back each time, and the stream through it arrives whole: in order, none
/// lost, none twice. (The sender's gateway reconnects; node 2's loop of
/// incoming links takes the new connection in place of the old one, and
/// the link's sequence numbers drop what had arrived already.)
#[test]
fn a_node_link_survives_its_connection_being_killed() {
    let (nodes, _) = start_cluster(2);
    let mut sender = through_daemons(&nodes[0].socket);
    let mut receiver = Mailbox::open_at(&nodes[1].socket).unwrap();
    wait_for("2 nodes see each other", Duration::from_secs(5), || {
        alive_count(&mut sender) == 2 && alive_count(&mut receiver) == 2
    });
    const N: u32 = 200_000;
    let to = Address::Port(receiver.port());
    let streaming = std::thread::spawn(move || {
        for i in 0..N {
            sender.send(&to, &i.to_le_bytes()).unwrap();
        }
        sender
    });
    let received = std::sync::Arc::new(std::sync::atomic::AtomicU32::new(0));
    let killer = {
        let (received, listen) = (received.clone(), nodes[1].listen);
        std::thread::spawn(move || {
            let mut kills = Vec::new();
            for _ in 0..3 {
                let t0 = Instant::now();
                // Each kill waits for 20,000 more messages (at most 10 s).
                let from = received.load(std::sync::atomic::Ordering::SeqCst);
                while received.load(std::sync::atomic::Ordering::SeqCst) < from + 20_000
                    && t0.elapsed() < Duration::from_secs(10)
                {
                    std::thread::sleep(Duration::from_millis(1));
                }
                let at = received.load(std::sync::atomic::Ordering::SeqCst);
                kills.push((at, kill_connections_to(listen)));
            }
            kills
        })
    };
    let mut buf = Vec::new();
    for i in 0..N {
        let from = receiver
            .recv_into(&mut buf, Some(Instant::now() + Duration::from_secs(20)))
            .unwrap();
        assert!(from.is_some(), "message {i} of {N} never came");
        assert_eq!(buf, i.to_le_bytes(), "message {i} of {N}");
        received.store(i + 1, std::sync::atomic::Ordering::SeqCst);
    }
    let kills = killer.join().unwrap();
    let _sender = streaming.join().unwrap();
    eprintln!("(received so far, connections killed): {kills:?}");
    assert!(
        kills.iter().all(|&(at, n)| at < N && n >= 1),
        "each kill fell mid-stream and killed the node link: {kills:?}"
    );
    assert_eq!(
        receiver.try_recv_into(&mut buf).unwrap(),
        None,
        "nothing arrives twice"
    );
}

/// A receiver that dies while its pair is paused: what its node held for
/// it is dropped, the pause is lifted, and its blocked sender fails with
/// "the receiver is gone" instead of hanging.
#[test]
fn a_receiver_that_dies_while_paused_fails_its_blocked_sender() {
    let (nodes, _) = start_cluster(2);
    let mut sender = through_daemons(&nodes[0].socket);
    let slow = Mailbox::open_at(&nodes[1].socket).unwrap();
    let mut watcher = Mailbox::open_at(&nodes[1].socket).unwrap();
    wait_for("2 nodes see each other", Duration::from_secs(5), || {
        alive_count(&mut sender) == 2 && alive_count(&mut watcher) == 2
    });
    let to = slow.port();
    let chunk = vec![5u8; 1024];
    let t0 = Instant::now();
    // Fill the path until the pair is paused and the sender's ring is full.
    let mut sent = 0u32;
    loop {
        assert!(
            t0.elapsed() < Duration::from_secs(20) && sent < 200_000,
            "the full receiver never pushed back"
        );
        match sender.send_to_port(to, &chunk, SendMode::RELIABLE_NONBLOCKING) {
            Ok(()) => sent += 1,
            Err(e) if is_full(&e) => {
                if watcher.daemon_stats().unwrap().link_held_bytes > 0 {
                    break;
                }
                std::thread::sleep(Duration::from_millis(1));
            }
            Err(e) => panic!("send: {e}"),
        }
    }
    let dies = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(200));
        drop(slow);
    });
    // Blocking sends: whatever room the pause left is taken, then the send
    // waits until the receiver's death fails it.
    let t1 = Instant::now();
    let deadline = Instant::now() + Duration::from_secs(10);
    let err = (0..10_000)
        .find_map(|_| {
            sender
                .send_to_port_until(to, &chunk, SendMode::RELIABLE, Some(deadline))
                .err()
        })
        .expect("the receiver died");
    assert!(
        matches!(
            err,
            fabric::client::Error::Send {
                reason: fabric::ring::SendError::PeerGone,
                ..
            }
        ),
        "{err}"
    );
    eprintln!(
        "the blocked sender failed {:?} after it began to send, the receiver going after 200 ms ({sent} sent first)",
        t1.elapsed()
    );
    dies.join().unwrap();
    wait_for(
        "nothing held, nothing paused",
        Duration::from_secs(5),
        || {
            watcher.daemon_stats().unwrap().link_held_bytes == 0
                && sender.daemon_stats().unwrap().paused_pairs == 0
        },
    );
}

/// A receiver with a busy direct link and a busy ring takes from both in
/// turn: neither kind starves the other.
#[test]
fn a_busy_direct_link_does_not_starve_a_ring() {
    let (nodes, _) = start_cluster(2);
    let mut remote = Mailbox::open_at(&nodes[0].socket).unwrap();
    let mut local = Mailbox::open_at(&nodes[1].socket).unwrap();
    let mut rx = Mailbox::open_at(&nodes[1].socket).unwrap();
    wait_for("2 nodes see each other", Duration::from_secs(5), || {
        alive_count(&mut remote) == 2 && alive_count(&mut rx) == 2
    });
    // Both paths full of messages before the receiver looks.
    for i in 0..2000u32 {
        remote
            .send_to_port(rx.port(), &i.to_le_bytes(), SendMode::RELIABLE)
            .unwrap();
    }
    for i in 0..200u32 {
        local
            .send_to_port(rx.port(), &i.to_le_bytes(), SendMode::RELIABLE)
            .unwrap();
    }
    assert_eq!(rx.daemon_stats().unwrap().direct_links_in, 1);
    let mut buf = Vec::new();
    let (mut from_remote, mut from_local) = (0u32, 0u32);
    for _ in 0..400 {
        let from = rx
            .recv_into(&mut buf, Some(Instant::now() + Duration::from_secs(10)))
            .unwrap()
            .expect("messages wait on both paths");
        if from == remote.port() {
            assert_eq!(buf, from_remote.to_le_bytes(), "in order over the link");
            from_remote += 1;
        } else {
            assert_eq!(from, local.port());
            assert_eq!(buf, from_local.to_le_bytes(), "in order over the ring");
            from_local += 1;
        }
    }
    assert!(
        from_local >= 150 && from_remote >= 150,
        "of the first 400: {from_remote} over the direct link, {from_local} over the ring"
    );
}

/// The π sample's printer, run after run: each run kills the printer and
/// starts a new one under the same name, and a worker of the next run (a
/// new mailbox, on another node) may still find the dead one in its node's
/// table. Its send to the name then reaches the new binder (whether or not
/// this run catches that window); with no binder left, a send fails within
/// `REBIND_WAIT` and a little instead of hanging.
#[test]
fn a_send_to_a_name_whose_binder_just_closed_reaches_its_successor() {
    let (nodes, _) = start_cluster(2);
    let addr: Address = "printer@{8181,1,1}".parse().unwrap();
    let mut buf = Vec::new();
    let soon = || Some(Instant::now() + Duration::from_secs(5));
    let worker = || {
        let mut mb = Mailbox::open_at(&nodes[0].socket).unwrap();
        assert!(mb.service_exists(&addr, Duration::from_secs(5)).unwrap());
        mb
    };
    let mut printer = Mailbox::open_at(&nodes[1].socket).unwrap();
    printer.bind(&addr).unwrap();
    for round in 0..10u8 {
        worker().send(&addr, &[round, 0]).unwrap();
        printer
            .recv_into(&mut buf, soon())
            .unwrap()
            .expect("a message");
        assert_eq!(buf, [round, 0]);
        drop(printer);
        printer = Mailbox::open_at(&nodes[1].socket).unwrap();
        printer.bind(&addr).unwrap();
        worker().send(&addr, &[round, 1]).unwrap_or_else(|e| {
            panic!("round {round}: the send after the printer changed failed: {e}")
        });
        printer
            .recv_into(&mut buf, soon())
            .unwrap()
            .expect("the new printer got the message");
        assert_eq!(buf, [round, 1], "round {round}");
    }
    let mut last = worker();
    // The binder's own node must have seen it go: a send that reaches that
    // node before it noticed the close is handed to the closing mailbox
    // and lost with it (accepted, not failed). The sender's node may still
    // list the binding; that is the case under test.
    let mut on_binders_node = Mailbox::open_at(&nodes[1].socket).unwrap();
    drop(printer);
    wait_for(
        "the binder's node withdrew the binding",
        Duration::from_secs(5),
        || {
            !on_binders_node
                .service_exists(&addr, Duration::ZERO)
                .unwrap()
        },
    );
    let t0 = Instant::now();
    let e = last.send(&addr, b"nobody").unwrap_err();
    assert!(
        t0.elapsed() < fabric::client::REBIND_WAIT + Duration::from_secs(2),
        "a send to a name with no binder left took {:?} to fail ({e})",
        t0.elapsed()
    );
}

#[test]
fn a_new_binding_reaches_the_other_nodes_before_the_next_gossip_round() {
    // Gossip rounds 3 s apart: a binding that waited for one would take
    // 0-3 s to show on the other nodes; pushed at once, it takes a round
    // trip.
    let gossip = Duration::from_secs(3);
    let (nodes, _) = start_cluster_with(3, |c| c.gossip_interval = gossip);
    let mut watchers: Vec<Mailbox> = nodes[1..]
        .iter()
        .map(|n| Mailbox::open_at(&n.socket).unwrap())
        .collect();
    for w in &mut watchers {
        wait_for("three live nodes", Duration::from_secs(30), || {
            alive_count(w) == 3
        });
    }
    let mut binder = Mailbox::open_at(&nodes[0].socket).unwrap();
    for i in 1..=4u32 {
        let addr: Address = format!("{{8300,{i},{i}}}").parse().unwrap();
        binder.bind(&addr).unwrap();
        let bound = Instant::now();
        for (k, w) in watchers.iter_mut().enumerate() {
            assert!(w.service_exists(&addr, gossip * 2).unwrap());
            let seen = bound.elapsed();
            assert!(
                seen < Duration::from_millis(500),
                "binding {i} showed on node {} after {seen:?} (gossip rounds are {gossip:?} apart)",
                k + 2
            );
        }
    }
}
