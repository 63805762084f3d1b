//! Mailbox ping-pong between two pinned threads on an embedded daemon:
//! `cargo run --release -p nefele-fabric --example mailbox_pingpong`.
use std::time::Instant;

mod common;

use fabric::client::Mailbox;
use fabric::ring::SendMode;

fn pin(core: usize) {
    let mut set = nix::sched::CpuSet::new();
    set.set(core).unwrap();
    nix::sched::sched_setaffinity(nix::unistd::Pid::from_raw(0), &set).unwrap();
}

fn main() {
    let (_dir, _daemon, path) = common::temp_daemon();
    let n = 200_000;
    let mut a = Mailbox::open_at(&path).unwrap();
    let a_port = a.port();
    let echo = std::thread::spawn(move || {
        pin(1);
        let mut b = Mailbox::open_at(&path).unwrap();
        let mut buf = Vec::new();
        b.send_to_port(a_port, b"hi", SendMode::RELIABLE).unwrap();
        for _ in 0..n {
            let from = b.recv_into(&mut buf, None).unwrap().unwrap();
            b.send_to_port(from, &buf, SendMode::RELIABLE).unwrap();
        }
    });
    pin(0);
    let mut buf = Vec::new();
    let b_port = a.recv_into(&mut buf, None).unwrap().unwrap();
    let msg = vec![1u8; 64];
    let mut rtt = Vec::with_capacity(n);
    for _ in 0..n {
        let t = Instant::now();
        a.send_to_port(b_port, &msg, SendMode::RELIABLE).unwrap();
        a.recv_into(&mut buf, None).unwrap();
        rtt.push(t.elapsed().as_nanos() as u64);
    }
    echo.join().unwrap();
    rtt.sort_unstable();
    let q = |p: f64| rtt[(n as f64 * p) as usize];
    println!(
        "mailbox 64 B: p50 {} p90 {} p95 {} p99 {} p99.9 {}",
        q(0.5),
        q(0.9),
        q(0.95),
        q(0.99),
        q(0.999)
    );
}
