//! What a ring's first mapping costs, and why fabricd makes rings ahead
//! (`fabric::ringpool`): the first process to map a fresh ring with its
//! pages faulted in waits while the kernel allocates and zeroes them; a
//! later mapping only maps pages that exist.
//! `cargo run --release -p nefele-fabric --example ring_mapping`.
use fabric::ring::{segment_bytes, DEFAULT_RING_CAPACITY_BYTES};
use fabric::ringpool::new_ring;
use fabric::segment::Segment;
use std::time::{Duration, Instant};

const ROUNDS: usize = 20;

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort_unstable();
    v[v.len() / 2]
}

fn map(seg: &Segment) -> (Segment, Duration) {
    let fd = seg.fd().unwrap().try_clone_to_owned().unwrap();
    let t = Instant::now();
    let m = Segment::from_fd_populated(fd).unwrap();
    (m, t.elapsed())
}

fn main() {
    let (mut fresh, mut ahead) = (Vec::new(), Vec::new());
    for _ in 0..ROUNDS {
        // As before the pool: fabricd creates the ring, the sender maps it.
        let seg = new_ring(DEFAULT_RING_CAPACITY_BYTES, false).unwrap();
        fresh.push(map(&seg).1);
        // From the pool: fabricd made it with its pages allocated.
        let seg = new_ring(DEFAULT_RING_CAPACITY_BYTES, true).unwrap();
        ahead.push(map(&seg).1);
    }
    println!(
        "mapping a {} KiB ring segment, median of {ROUNDS}: fresh {:?}, made ahead {:?}",
        segment_bytes(DEFAULT_RING_CAPACITY_BYTES) >> 10,
        median(fresh),
        median(ahead)
    );
}
