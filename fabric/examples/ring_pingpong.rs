//! Bare ring ping-pong between two pinned threads (no mailbox layer), next
//! to the cache-line floor measured the same way, in alternating rounds so
//! that both see the same machine:
//! `cargo run --release -p nefele-fabric --example ring_pingpong [size…]`.
//!
//! A record is its 16-byte header and the payload, so up to 48 bytes fit
//! one cache line and 64 bytes take two: compare `48 64`.
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use fabric::ring::SendMode;
use fabric::transport::{LinkRx, LinkTx, ShmTransport, Transport};

/// Round trips per round, and rounds per size (half floor, half ring).
const ROUND_TRIPS: usize = 20_000;
const ROUNDS: usize = 10;

fn pin(core: usize) {
    let mut set = nix::sched::CpuSet::new();
    set.set(core).unwrap();
    nix::sched::sched_setaffinity(nix::unistd::Pid::from_raw(0), &set).unwrap();
}

fn p50_p99(mut rtt: Vec<u64>) -> (u64, u64) {
    rtt.sort_unstable();
    (rtt[rtt.len() / 2], rtt[rtt.len() * 99 / 100])
}

/// One cache line bounced between the two cores.
fn floor_round() -> (u64, u64) {
    let word = Arc::new(AtomicU64::new(0));
    let peer = word.clone();
    let echo = std::thread::spawn(move || {
        pin(1);
        for i in 0..ROUND_TRIPS as u64 {
            while peer.load(Ordering::Acquire) != 2 * i + 1 {
                std::hint::spin_loop();
            }
            peer.store(2 * i + 2, Ordering::Release);
        }
    });
    pin(0);
    let mut rtt = Vec::with_capacity(ROUND_TRIPS);
    for i in 0..ROUND_TRIPS as u64 {
        let t = Instant::now();
        word.store(2 * i + 1, Ordering::Release);
        while word.load(Ordering::Acquire) != 2 * i + 2 {
            std::hint::spin_loop();
        }
        rtt.push(t.elapsed().as_nanos() as u64);
    }
    echo.join().unwrap();
    p50_p99(rtt)
}

fn ring_round(size: usize) -> (u64, u64) {
    let (mut atx, mut brx) = ShmTransport.link(1 << 20).unwrap();
    let (mut btx, mut arx) = ShmTransport.link(1 << 20).unwrap();
    let echo = std::thread::spawn(move || {
        pin(1);
        let mut buf = Vec::new();
        for _ in 0..ROUND_TRIPS {
            brx.recv(&mut buf, None).unwrap();
            btx.send(&buf, SendMode::RELIABLE, None).unwrap();
        }
    });
    pin(0);
    let msg = vec![1u8; size];
    let mut buf = Vec::new();
    let mut rtt = Vec::with_capacity(ROUND_TRIPS);
    for _ in 0..ROUND_TRIPS {
        let t = Instant::now();
        atx.send(&msg, SendMode::RELIABLE, None).unwrap();
        arx.recv(&mut buf, None).unwrap();
        rtt.push(t.elapsed().as_nanos() as u64);
    }
    echo.join().unwrap();
    p50_p99(rtt)
}

fn main() {
    let mut sizes: Vec<usize> = std::env::args()
        .skip(1)
        .map(|s| s.parse().expect("sizes in bytes"))
        .collect();
    if sizes.is_empty() {
        sizes.push(64);
    }
    for size in sizes {
        let mut ratios = Vec::new();
        let (mut floor, mut ring) = ((0, 0), (0, 0));
        for _ in 0..ROUNDS / 2 {
            floor = floor_round();
            ring = ring_round(size);
            ratios.push(ring.0 as f64 / floor.0 as f64);
        }
        ratios.sort_by(f64::total_cmp);
        println!(
            "bare ring {size} B: RTT p50 {} ns p99 {} ns; floor p50 {} ns (last round); \
             ring / floor per round: median {:.2}, range {:.2}-{:.2}",
            ring.0,
            ring.1,
            floor.0,
            ratios[ratios.len() / 2],
            ratios[0],
            ratios[ratios.len() - 1]
        );
    }
}
