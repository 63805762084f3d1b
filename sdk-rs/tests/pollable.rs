//! A pollable mailbox under tokio: receives wait on its eBPF socket through
//! the reactor (no blocking thread). Needs root for the eBPF path (CI runs
//! as root).

use std::time::Duration;

use nefele::r#async::PollableMailbox;
use nefele::{Mailbox, Node};

#[test]
fn a_pollable_mailbox_receives_under_tokio_without_a_blocking_thread() {
    let node = Node::embedded().expect("embedded node");
    assert_eq!(node.stats().ebpf, "available", "no eBPF path (run as root)");
    let rx = Mailbox::open_pollable_at(node.socket_path())
        .expect("pollable")
        .bound("sink@{9100,1,1}")
        .expect("bind");
    // One worker thread and no blocking pool: a receive that blocked its
    // thread would stall the runtime.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_io()
        .enable_time()
        .max_blocking_threads(1)
        .build()
        .expect("runtime");
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
