//! A receiver killed with SIGKILL mid-stream: the reliable sender fails
//! fast, and the daemon frees the receiver's shared memory.
//!
//! This test has a file (so a process) of its own: it counts the memfds
//! open in the process, which tests running beside it would disturb.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use nefele::{Error, Node, SendError};

mod support;
use support::ChildGuard;

const DEMO: &str = env!("CARGO_BIN_EXE_nefele-demo");

/// Our memfd segments (rings, doorbells) open in this process: the
/// embedded daemon's and the sending client's alike.
fn open_memfds() -> usize {
    std::fs::read_dir("/proc/self/fd")
        .expect("procfs")
        .filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
        .filter(|l| l.to_string_lossy().starts_with("/memfd:nefele-"))
        .count()
}

#[test]
fn sigkilled_receiver_fails_the_sender_fast_and_its_rings_are_freed() {
    let node = Node::embedded().unwrap();
    let mut tx = node.mailbox().unwrap();
    // One round trip on tx's connection first: the daemon closes its copy
    // of a passed fd (tx's doorbell) when it has seen the send complete,
    // which can come after tx already holds the reply; by the time it
    // answers the next request it has.
    assert!(tx.lookup("sink@{9100,1,1}").unwrap().is_empty());
    // The daemon keeps a few rings made ahead (memfds of this process, as
    // the node is embedded): count from a full pool, which it is again once
    // it has replaced the rings taken below.
    let deadline = Instant::now() + Duration::from_secs(10);
    while node.stats().rings_ready < node.stats().ring_pool {
        assert!(Instant::now() < deadline, "the ring pool never filled");
        std::thread::sleep(Duration::from_millis(5));
    }
    let base_stats = node.stats();
    let base_memfds = open_memfds();

    let (k, v) = node.env();
    let mut sink = ChildGuard(
        Command::new(DEMO)
            .args(["sink", "--bind", "sink@{9100,1,1}"])
            .env(k, v)
            .stdout(Stdio::null())
            .spawn()
            .expect("spawn nefele-demo sink"),
    );
    assert!(tx
        .service_exists("sink@{9100,1,1}", Duration::from_secs(10))
        .unwrap());
    let pid = nix::unistd::Pid::from_raw(sink.0.id() as i32);
    let killed_at = std::sync::Arc::new(std::sync::Mutex::new(None::<Instant>));
    let killer = {
        let killed_at = killed_at.clone();
        std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(300));
            *killed_at.lock().unwrap() = Some(Instant::now());
            nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGKILL).unwrap();
        })
    };
    // A reliable stream into a receiver that never reads: the ring fills and
    // the sender blocks until the receiver dies.
    let msg = [7u8; 1024];
    let mut sent = 0u64;
    let err = loop {
        match tx.send("sink@{9100,1,1}", &msg) {
            Ok(()) => sent += 1,
            Err(e) => break e,
        }
        assert!(sent < 10_000_000, "sender never blocked");
    };
    let noticed = Instant::now();
    killer.join().unwrap();
    let killed = killed_at.lock().unwrap().expect("killed");
    assert_eq!(err.send_error(), Some(&SendError::PeerGone), "{err}");
    assert!(
        noticed.duration_since(killed) < Duration::from_secs(1),
        "sender noticed {:?} after the kill",
        noticed.duration_since(killed)
    );
    assert!(sent > 0);
    let _ = sink.0.wait();

    // The daemon withdraws the binding and frees the receiver's doorbell and
    // rings: its counters and the memfds open in this process return to
    // where they were before the receiver existed.
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let s = node.stats();
        if s.shm_segments == base_stats.shm_segments
            && s.rings == base_stats.rings
            && s.rings_ready == base_stats.rings_ready
            && open_memfds() == base_memfds
        {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "shm not freed: {s:?} vs {base_stats:?}, memfds {} vs {base_memfds}",
            open_memfds()
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    assert!(
        tx.lookup("sink@{9100,1,1}").unwrap().is_empty(),
        "the dead receiver's binding was not withdrawn"
    );
    assert!(matches!(
        tx.send("sink@{9100,1,1}", b"x"),
        Err(Error::NoSuchMailbox(_))
    ));
}
