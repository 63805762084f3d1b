//! Bare ring ping-pong between two pinned threads (no mailbox layer):
//! `cargo run --release -p nefele-fabric --example ring_pingpong [size]`.
use std::time::Instant;

use fabric::ring::SendMode;
use fabric::transport::{LinkRx, LinkTx, ShmTransport, Transport};

fn pin(core: usize) {
    let mut set = nix::sched::CpuSet::new();
    set.set(core).unwrap();
    nix::sched::sched_setaffinity(nix::unistd::Pid::from_raw(0), &set).unwrap();
}

fn main() {
    let size: usize = std::env::args().nth(1).map_or(64, |s| s.parse().unwrap());
    let n = 200_000;
    let (mut atx, mut brx) = ShmTransport.link(1 << 20).unwrap();
    let (mut btx, mut arx) = ShmTransport.link(1 << 20).unwrap();
    let echo = std::thread::spawn(move || {
        pin(1);
        let mut buf = Vec::new();
        for _ in 0..n {
            brx.recv(&mut buf, None).unwrap();
            btx.send(&buf, SendMode::RELIABLE, None).unwrap();
        }
    });
    pin(0);
    let msg = vec![1u8; size];
    let mut buf = Vec::new();
    let mut rtt = Vec::with_capacity(n);
    for _ in 0..n {
        let t = Instant::now();
        atx.send(&msg, SendMode::RELIABLE, None).unwrap();
        arx.recv(&mut buf, None).unwrap();
        rtt.push(t.elapsed().as_nanos() as u64);
    }
    echo.join().unwrap();
    rtt.sort_unstable();
    println!(
        "bare ring {size} B: p50 {} ns p99 {} ns",
        rtt[n / 2],
        rtt[n * 99 / 100]
    );
}
